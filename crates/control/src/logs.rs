//! App logs: `GET /v1/apps/{app}/logs?machine=&region=&follow=&lines=` fans out to the
//! agents of the app's machines (`GET /v1/machines/{id}/logs` there) and answers with
//! NDJSON `LogLine`s (timestamp, app, machine id, region, stream, level, message). Without
//! `follow` the recent lines of every machine come back in time order; with it, they
//! stream as they are written, machines started later included.

use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use aloft_api::internal::LogLine;
use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::response::Response;
use axum::routing::get;
use bytes::Bytes;
use futures_util::StreamExt;
use http::header;
use serde::Deserialize;
use tokio::sync::mpsc;

use crate::ControlPlane;
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::store::{AppRow, MachineRow};

const DEFAULT_LINES: usize = 100;
/// How often a follow looks for machines that appeared since it began.
const RESCAN: Duration = Duration::from_secs(2);

#[derive(Deserialize, Default)]
pub struct LogsQuery {
    pub machine: Option<String>,
    pub region: Option<String>,
    pub follow: Option<bool>,
    pub lines: Option<usize>,
}

pub fn routes() -> Router<Arc<ControlPlane>> {
    Router::new().route("/v1/apps/{app}/logs", get(app_logs))
}

fn wanted(query: &LogsQuery, machine: &MachineRow) -> bool {
    query
        .machine
        .as_deref()
        .filter(|m| !m.is_empty())
        .is_none_or(|m| m == machine.id)
        && query
            .region
            .as_deref()
            .filter(|r| !r.is_empty())
            .is_none_or(|r| r == machine.region)
}

fn machines_for(
    plane: &ControlPlane,
    app: &AppRow,
    query: &LogsQuery,
) -> ApiResult<Vec<MachineRow>> {
    Ok(plane
        .store
        .list_machines(&app.id, true)?
        .into_iter()
        .filter(|m| wanted(query, m))
        .collect())
}

async fn app_logs(
    State(plane): State<Arc<ControlPlane>>,
    caller: Caller,
    Path(name): Path<String>,
    Query(query): Query<LogsQuery>,
) -> ApiResult<Response> {
    let app = match plane.store.app(&name)? {
        Some(app) if caller.sees_app(&app) => app,
        _ => return Err(ApiError::not_found(format!("app not found: {name}"))),
    };
    let machines = machines_for(&plane, &app, &query)?;
    if let Some(id) = query.machine.as_deref().filter(|m| !m.is_empty())
        && machines.is_empty()
    {
        return Err(ApiError::not_found(format!("machine not found: {id}")));
    }
    let lines = query.lines.unwrap_or(DEFAULT_LINES);
    if !query.follow.unwrap_or(false) {
        let mut all: Vec<LogLine> = Vec::new();
        for machine in &machines {
            all.extend(backlog(&plane, machine, lines).await);
        }
        all.sort_by(|a, b| a.timestamp.cmp(&b.timestamp));
        let start = all.len().saturating_sub(lines);
        let mut text = String::new();
        for line in &all[start..] {
            text.push_str(&serde_json::to_string(line).unwrap_or_default());
            text.push('\n');
        }
        return Ok(ndjson(Body::from(text)));
    }
    let (sender, receiver) = mpsc::channel::<String>(256);
    tokio::spawn(follow_app(plane, app, query, lines, sender));
    let stream = futures_util::stream::unfold(receiver, |mut receiver| async move {
        receiver
            .recv()
            .await
            .map(|line| (Ok::<Bytes, Infallible>(Bytes::from(line)), receiver))
    });
    Ok(ndjson(Body::from_stream(stream)))
}

fn ndjson(body: Body) -> Response {
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(body)
        .unwrap_or_default()
}

fn parse(line: &str) -> Option<LogLine> {
    serde_json::from_str(line).ok()
}

/// A machine's log from its agent, as NDJSON lines.
async fn agent_logs(
    plane: &ControlPlane,
    machine: &MachineRow,
    follow: bool,
    lines: usize,
) -> ApiResult<aloft_client::LineStream> {
    let client = crate::runtime::agent_endpoint(plane, &machine.host_id)?;
    let path = format!(
        "/v1/machines/{}/logs?follow={follow}&lines={lines}",
        machine.id
    );
    client
        .lines::<()>(http::Method::GET, &path, None, &[])
        .await
        .map_err(|e| ApiError::unavailable(format!("host agent unavailable: {e}")))
}

/// A machine's recent lines (none if its host cannot be reached).
pub(crate) async fn backlog(
    plane: &ControlPlane,
    machine: &MachineRow,
    lines: usize,
) -> Vec<LogLine> {
    let Ok(mut stream) = agent_logs(plane, machine, false, lines).await else {
        return Vec::new();
    };
    let mut out = Vec::new();
    while let Some(Ok(line)) = stream.next().await {
        out.extend(parse(&line));
    }
    out
}

/// Streams every wanted machine's log into `sender` until the client goes away.
async fn follow_app(
    plane: Arc<ControlPlane>,
    app: AppRow,
    query: LogsQuery,
    lines: usize,
    sender: mpsc::Sender<String>,
) {
    let mut following: HashSet<String> = HashSet::new();
    let mut first_scan = true;
    loop {
        if sender.is_closed() {
            return;
        }
        for machine in machines_for(&plane, &app, &query).unwrap_or_default() {
            if following.contains(&machine.id) {
                continue;
            }
            // Machines that appear later are followed from their first line.
            let backlog = if first_scan { lines } else { usize::MAX >> 1 };
            let Ok(mut stream) = agent_logs(&plane, &machine, true, backlog).await else {
                continue;
            };
            following.insert(machine.id.clone());
            let sender = sender.clone();
            tokio::spawn(async move {
                // Blank lines are the agent's heartbeats: passed on, they let a client that
                // went away be noticed while the machine is quiet.
                while let Some(Ok(line)) = stream.next().await {
                    if sender.send(format!("{}\n", line.trim_end())).await.is_err() {
                        return;
                    }
                }
            });
        }
        first_scan = false;
        tokio::time::sleep(RESCAN).await;
    }
}
