//! `GET /api/v1/apps/{app}/logs?next_token=&instance=&region=`: an app's recent log
//! lines in Fly's JSON shape, which `fly logs` polls (`--no-tail` stops after the first
//! answer with lines). `meta.next_token` is the newest line's timestamp; asked again with
//! it, only lines written after it come back.

use std::sync::Arc;

use aloft_api::internal::LogLine;
use axum::Json;
use axum::extract::{Path, State};
use serde::{Deserialize, Serialize};

use crate::ControlPlane;
use crate::api::{QueryParams, visible_app};
use crate::auth::Caller;
use crate::error::ApiResult;

/// Lines of a first answer (no token), newest last.
const FIRST_PAGE: usize = 100;
/// Lines read from each machine when looking for those after a token.
const SINCE_TOKEN_SCAN: usize = 1000;

#[derive(Deserialize, Default)]
pub struct LogsQuery {
    #[serde(default)]
    next_token: String,
    #[serde(default)]
    instance: String,
    #[serde(default)]
    region: String,
}

#[derive(Serialize, Debug, PartialEq)]
pub struct LogsResponse {
    data: Vec<LogRecord>,
    meta: LogsMeta,
}

#[derive(Serialize, Debug, PartialEq)]
struct LogsMeta {
    next_token: String,
}

#[derive(Serialize, Debug, PartialEq)]
struct LogRecord {
    id: String,
    #[serde(rename = "type")]
    kind: &'static str,
    attributes: LogAttributes,
}

#[derive(Serialize, Debug, PartialEq)]
struct LogAttributes {
    timestamp: String,
    message: String,
    level: String,
    instance: String,
    region: String,
    meta: LogMeta,
}

#[derive(Serialize, Debug, PartialEq)]
struct LogMeta {
    instance: String,
    region: String,
    event: LogEvent,
}

#[derive(Serialize, Debug, PartialEq)]
struct LogEvent {
    provider: &'static str,
}

pub async fn app_logs(
    State(plane): State<Arc<ControlPlane>>,
    caller: Caller,
    Path(name): Path<String>,
    QueryParams(query): QueryParams<LogsQuery>,
) -> ApiResult<Json<LogsResponse>> {
    let app = visible_app(&plane, &caller, &name)?;
    let machines: Vec<_> = plane
        .store
        .list_machines(&app.id, true)?
        .into_iter()
        .filter(|m| query.instance.is_empty() || m.id == query.instance)
        .filter(|m| query.region.is_empty() || m.region == query.region)
        .collect();
    let scan = if query.next_token.is_empty() {
        FIRST_PAGE
    } else {
        SINCE_TOKEN_SCAN
    };
    let mut lines = Vec::new();
    for machine in &machines {
        lines.extend(crate::logs::backlog(&plane, machine, scan).await);
    }
    Ok(Json(page(lines, &query.next_token)))
}

/// The lines after `token` (all of them without one), oldest first, at most a page.
fn page(mut lines: Vec<LogLine>, token: &str) -> LogsResponse {
    lines.retain(|line| token.is_empty() || line.timestamp.as_str() > token);
    lines.sort_by(|a, b| a.timestamp.cmp(&b.timestamp));
    let start = lines.len().saturating_sub(FIRST_PAGE);
    let lines = &lines[start..];
    let next_token = lines
        .last()
        .map_or_else(|| token.to_string(), |line| line.timestamp.clone());
    LogsResponse {
        data: lines
            .iter()
            .map(|line| LogRecord {
                id: format!("{}-{}", line.machine_id, line.timestamp),
                kind: "logs",
                attributes: LogAttributes {
                    timestamp: line.timestamp.clone(),
                    message: line.message.clone(),
                    level: line.level.clone(),
                    instance: line.machine_id.clone(),
                    region: line.region.clone(),
                    meta: LogMeta {
                        instance: line.machine_id.clone(),
                        region: line.region.clone(),
                        event: LogEvent { provider: "app" },
                    },
                },
            })
            .collect(),
        meta: LogsMeta { next_token },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(machine: &str, timestamp: &str, message: &str) -> LogLine {
        LogLine {
            timestamp: timestamp.into(),
            app: "a".into(),
            machine_id: machine.into(),
            region: "iad".into(),
            stream: "stdout".into(),
            level: "info".into(),
            message: message.into(),
        }
    }

    #[test]
    fn lines_come_in_flys_shape_and_the_token_moves_on() {
        let lines = vec![
            line("m2", "2026-01-01T00:00:02.000000000Z", "second"),
            line("m1", "2026-01-01T00:00:01.000000000Z", "first"),
        ];
        let first = page(lines.clone(), "");
        let json = serde_json::to_value(&first).unwrap();
        assert_eq!(json["data"][0]["attributes"]["message"], "first");
        assert_eq!(json["data"][0]["attributes"]["instance"], "m1");
        assert_eq!(json["data"][0]["attributes"]["meta"]["region"], "iad");
        assert_eq!(json["data"][1]["type"], "logs");
        assert_eq!(json["meta"]["next_token"], "2026-01-01T00:00:02.000000000Z");

        let again = page(lines, "2026-01-01T00:00:02.000000000Z");
        assert!(again.data.is_empty());
        assert_eq!(again.meta.next_token, "2026-01-01T00:00:02.000000000Z");
    }
}
