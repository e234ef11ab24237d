//! The agent's HTTP API, called by the control plane with the host token. Bodies are the
//! Machines API's shapes (StopRequest, SignalRequest, MachineExecRequest, ExecResponse,
//! ProcessStat, CheckStatus); logs stream as NDJSON [`LogLine`]s; interactive sessions
//! are HTTP upgrades carrying console frames.

use std::sync::Arc;
use std::time::Duration;

use aloft_api::internal::{
    AgentMachine, ExecResponse, LogLine, MachineExecRequest, MachineSpec, ProcessStat,
    SnapshotFile, VolumeDisk, VolumeDiskRequest,
};
use aloft_api::{CheckStatus, SignalRequest, StopRequest};
use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use http::{StatusCode, header};
use serde::Deserialize;

use aloft_api::internal::console_frame::PROTOCOL as CONSOLE_PROTOCOL;

use crate::driver::WindowSize;
use crate::logs::{Follower, Record};
use crate::{Agent, AgentError};

struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

impl From<AgentError> for ApiError {
    fn from(err: AgentError) -> Self {
        let status = match err {
            AgentError::NotFound(_) => StatusCode::NOT_FOUND,
            AgentError::Failed(_) => StatusCode::UNPROCESSABLE_ENTITY,
            AgentError::BadRequest(_) => StatusCode::BAD_REQUEST,
            AgentError::Conflict(_) => StatusCode::PRECONDITION_FAILED,
            AgentError::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
            AgentError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, err.to_string())
    }
}

type Result<T> = std::result::Result<Json<T>, ApiError>;

pub fn router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route("/v1/machines", get(list))
        .route(
            "/v1/machines/{id}",
            get(get_machine).put(put).delete(destroy),
        )
        .route("/v1/machines/{id}/start", post(start))
        .route("/v1/machines/{id}/stop", post(stop))
        .route("/v1/machines/{id}/restart", post(restart))
        .route("/v1/machines/{id}/signal", post(signal))
        .route("/v1/machines/{id}/suspend", post(suspend))
        .route("/v1/machines/{id}/exec", post(exec))
        .route("/v1/machines/{id}/ps", get(ps))
        .route("/v1/machines/{id}/logs", get(logs))
        .route("/v1/machines/{id}/checks", get(checks))
        .route("/v1/machines/{id}/probe", post(probe))
        .route("/v1/machines/{id}/console", get(console))
        .route(
            "/v1/volumes/{id}",
            get(get_volume).put(create_volume).delete(destroy_volume),
        )
        .route("/v1/volumes/{id}/extend", axum::routing::put(extend_volume))
        .route(
            "/v1/volumes/{id}/snapshots/{snapshot}",
            post(snapshot_volume).delete(delete_snapshot),
        )
        .route("/metrics", get(metrics))
        .layer(axum::middleware::from_fn_with_state(
            agent.clone(),
            require_token,
        ))
        .with_state(agent)
}

async fn require_token(State(agent): State<Arc<Agent>>, request: Request, next: Next) -> Response {
    let expected = format!("Bearer {}", agent.config.token);
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let matches = given.is_some_and(|given| {
        aloft_api::token::constant_time_eq(given.as_bytes(), expected.as_bytes())
    });
    if !matches {
        return ApiError(
            StatusCode::UNAUTHORIZED,
            "this agent API needs the host token".into(),
        )
        .into_response();
    }
    next.run(request).await
}

async fn get_volume(State(agent): State<Arc<Agent>>, Path(id): Path<String>) -> Result<VolumeDisk> {
    Ok(Json(agent.volume(&id).await?))
}

async fn create_volume(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
    Json(request): Json<VolumeDiskRequest>,
) -> Result<VolumeDisk> {
    Ok(Json(
        agent
            .create_volume(
                &id,
                request.size_gb,
                request.key.as_ref(),
                request.snapshot_id.as_deref(),
                request.source_volume_id.as_deref(),
            )
            .await?,
    ))
}

async fn snapshot_volume(
    State(agent): State<Arc<Agent>>,
    Path((id, snapshot)): Path<(String, String)>,
) -> Result<SnapshotFile> {
    Ok(Json(agent.snapshot_volume(&id, &snapshot).await?))
}

async fn delete_snapshot(
    State(agent): State<Arc<Agent>>,
    Path((_id, snapshot)): Path<(String, String)>,
) -> Result<serde_json::Value> {
    agent.delete_snapshot(&snapshot).await?;
    Ok(Json(serde_json::json!({ "ok": true })))
}

async fn extend_volume(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
    Json(request): Json<VolumeDiskRequest>,
) -> Result<VolumeDisk> {
    Ok(Json(agent.extend_volume(&id, request.size_gb).await?))
}

async fn destroy_volume(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
) -> Result<serde_json::Value> {
    agent.destroy_volume(&id).await?;
    Ok(Json(serde_json::json!({ "ok": true })))
}

async fn list(State(agent): State<Arc<Agent>>) -> Result<Vec<AgentMachine>> {
    Ok(Json(agent.list()?))
}

async fn get_machine(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
) -> Result<AgentMachine> {
    Ok(Json(agent.get(&id)?))
}

async fn put(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
    Json(spec): Json<MachineSpec>,
) -> Result<AgentMachine> {
    if spec.id != id {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("spec id {} does not match the path's {id}", spec.id),
        ));
    }
    Ok(Json(agent.put(spec).await?))
}

async fn destroy(State(agent): State<Arc<Agent>>, Path(id): Path<String>) -> Result<AgentMachine> {
    Ok(Json(agent.destroy(&id).await?))
}

async fn start(State(agent): State<Arc<Agent>>, Path(id): Path<String>) -> Result<AgentMachine> {
    Ok(Json(agent.start(&id).await?))
}

async fn stop(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
    body: Option<Json<StopRequest>>,
) -> Result<AgentMachine> {
    let request = body.map(|Json(r)| r).unwrap_or_default();
    Ok(Json(agent.stop(&id, &request).await?))
}

#[derive(Deserialize, Default)]
struct RestartQuery {
    timeout: Option<String>,
    signal: Option<String>,
}

/// `timeout` as a Go duration (`10s`) or a number of seconds.
fn parse_timeout(text: &str) -> std::result::Result<aloft_api::Duration, ApiError> {
    if let Ok(seconds) = text.trim().parse::<i64>() {
        return Ok(aloft_api::Duration::from_secs(seconds));
    }
    aloft_api::Duration::parse(text).map_err(|e| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("invalid timeout {text:?}: {e}"),
        )
    })
}

async fn restart(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
    Query(query): Query<RestartQuery>,
    body: Option<Json<StopRequest>>,
) -> Result<AgentMachine> {
    let mut request = body.map(|Json(r)| r).unwrap_or_default();
    if let Some(timeout) = query.timeout.as_deref().filter(|t| !t.is_empty()) {
        request.timeout = Some(parse_timeout(timeout)?);
    }
    if let Some(signal) = query.signal.filter(|s| !s.is_empty()) {
        request.signal = Some(signal);
    }
    Ok(Json(agent.restart(&id, &request).await?))
}

async fn signal(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
    Json(request): Json<SignalRequest>,
) -> Result<AgentMachine> {
    agent.signal(&id, &request.signal).await?;
    Ok(Json(agent.get(&id)?))
}

async fn suspend(State(agent): State<Arc<Agent>>, Path(id): Path<String>) -> Result<AgentMachine> {
    Ok(Json(agent.suspend(&id).await?))
}

async fn exec(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
    Json(request): Json<MachineExecRequest>,
) -> Result<ExecResponse> {
    Ok(Json(agent.exec(&id, &request).await?))
}

#[derive(Deserialize, Default)]
struct PsQuery {
    sort_by: Option<String>,
    order: Option<String>,
}

async fn ps(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
    Query(query): Query<PsQuery>,
) -> Result<Vec<ProcessStat>> {
    let mut processes = agent.processes(&id).await?;
    match query.sort_by.as_deref().unwrap_or("pid") {
        "cpu" => processes.sort_by_key(|p| p.cpu),
        "rss" | "mem" => processes.sort_by_key(|p| p.rss),
        "pid" | "" => processes.sort_by_key(|p| p.pid),
        other => {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                format!("invalid sort_by {other:?}: use pid, cpu or rss"),
            ));
        }
    }
    if query
        .order
        .as_deref()
        .is_some_and(|o| o.eq_ignore_ascii_case("desc"))
    {
        processes.reverse();
    }
    Ok(Json(processes))
}

async fn checks(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
) -> Result<Vec<CheckStatus>> {
    Ok(Json(agent.check_results(&id)?))
}

async fn probe(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
    Json(request): Json<aloft_api::internal::ProbeRequest>,
) -> Result<aloft_api::internal::ProbeOutcome> {
    Ok(Json(agent.probe_machine(&id, &request).await?))
}

#[derive(Deserialize, Default)]
struct LogsQuery {
    follow: Option<bool>,
    /// How many earlier lines come first (default 100).
    lines: Option<usize>,
}

const DEFAULT_BACKLOG: usize = 100;
const FOLLOW_POLL: Duration = Duration::from_millis(100);

async fn logs(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
    Query(query): Query<LogsQuery>,
) -> std::result::Result<Response, ApiError> {
    let (path, record) = agent.log_source(&id)?;
    let app = record
        .as_ref()
        .map(|r| r.spec.app.clone())
        .unwrap_or_default();
    let region = agent.config.region.clone();
    let to_line = move |record: Record| {
        let line = LogLine {
            timestamp: record.timestamp,
            app: app.clone(),
            machine_id: id.clone(),
            region: region.clone(),
            stream: record.stream,
            level: "info".into(),
            message: record.message,
        };
        let mut text = serde_json::to_string(&line).unwrap_or_default();
        text.push('\n');
        text
    };
    let backlog = query.lines.unwrap_or(DEFAULT_BACKLOG);
    // Start following before reading the backlog, so no line falls between the two.
    let mut follower = Follower::at_end(&path);
    let earlier: String = crate::logs::tail(&path, backlog)
        .into_iter()
        .map(&to_line)
        .collect();
    if !query.follow.unwrap_or(false) {
        return Ok(ndjson(Body::from(earlier)));
    }
    let (sender, receiver) =
        tokio::sync::mpsc::channel::<std::result::Result<String, std::io::Error>>(64);
    tokio::spawn(async move {
        if !earlier.is_empty() && sender.send(Ok(earlier)).await.is_err() {
            return;
        }
        let mut idle = Duration::ZERO;
        loop {
            let batch: String = follower.poll().into_iter().map(&to_line).collect();
            if batch.is_empty() {
                // A heartbeat now and then tells a gone client apart from a quiet machine.
                idle += FOLLOW_POLL;
                if idle >= Duration::from_secs(15) {
                    idle = Duration::ZERO;
                    if sender.send(Ok("\n".into())).await.is_err() {
                        return;
                    }
                }
            } else {
                idle = Duration::ZERO;
                if sender.send(Ok(batch)).await.is_err() {
                    return;
                }
            }
            tokio::time::sleep(FOLLOW_POLL).await;
        }
    });
    Ok(ndjson(Body::from_stream(tokio_stream(receiver))))
}

fn tokio_stream<T: Send + 'static>(
    mut receiver: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> {
    futures_util::stream::poll_fn(move |cx| receiver.poll_recv(cx))
}

fn ndjson(body: Body) -> Response {
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(body)
        .unwrap_or_default()
}

#[derive(Deserialize, Default)]
struct ConsoleQuery {
    /// The command, as JSON array of words (default: a shell).
    command: Option<String>,
    tty: Option<bool>,
    cols: Option<u16>,
    rows: Option<u16>,
}

/// The shell an interactive session gets when no command is given.
pub const DEFAULT_SHELL: &[&str] = &[
    "/bin/sh",
    "-c",
    "if command -v bash >/dev/null 2>&1; then exec bash -l; else exec sh -l; fi",
];

async fn console(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
    Query(query): Query<ConsoleQuery>,
    mut request: Request,
) -> std::result::Result<Response, ApiError> {
    let argv: Vec<String> = match query.command.as_deref().filter(|c| !c.is_empty()) {
        Some(text) => serde_json::from_str(text).map_err(|e| {
            ApiError(
                StatusCode::BAD_REQUEST,
                format!("invalid command {text:?}: a JSON array of words is expected: {e}"),
            )
        })?,
        None => DEFAULT_SHELL.iter().map(|s| s.to_string()).collect(),
    };
    if argv.first().is_none_or(|a| a.is_empty()) {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "invalid command: it is empty".into(),
        ));
    }
    let wants_upgrade = request
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(CONSOLE_PROTOCOL));
    if !wants_upgrade {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("this endpoint needs `Connection: Upgrade` and `Upgrade: {CONSOLE_PROTOCOL}`"),
        ));
    }
    let tty = query.tty.unwrap_or(false).then(|| WindowSize {
        cols: query.cols.unwrap_or(80).max(1),
        rows: query.rows.unwrap_or(24).max(1),
    });
    let process = agent.exec_session(&id, argv, tty).await?;
    let upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        match upgrade.await {
            Ok(upgraded) => {
                crate::console::bridge(process, hyper_util::rt::TokioIo::new(upgraded)).await
            }
            Err(err) => {
                tracing::warn!(error = %err, "console upgrade failed");
                let mut handle = process.handle;
                handle.kill();
            }
        }
    });
    Ok(Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, CONSOLE_PROTOCOL)
        .body(Body::empty())
        .unwrap_or_default())
}

async fn metrics(State(agent): State<Arc<Agent>>) -> Response {
    let text = tokio::task::spawn_blocking(move || agent.render_metrics())
        .await
        .unwrap_or_default();
    Response::builder()
        .header(header::CONTENT_TYPE, "text/plain; version=0.0.4")
        .body(Body::from(text))
        .unwrap_or_default()
}
