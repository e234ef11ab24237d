//! Machine-level steps shared by deploys and scaling: new machines stay out of routing
//! (cordoned) until they are healthy, serving machines are drained before they stop, and a
//! machine that exits or fails a check is reported at once with its last log lines.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use aloft_api::internal::{DeployFailure, ExitStatus, ProbeOutcome as Probe, ProbeRequest};
use aloft_api::{
    CheckStatus, CreateMachineRequest, MachineCheck, MachineConfig, MachineState, StopRequest,
};

use crate::ControlPlane;
use crate::deploy::Progress;
use crate::error::ApiError;
use crate::store::{AppRow, MachineRow, now_millis};

/// How long a machine taken out of routing keeps running before it is stopped, so the
/// proxies have learnt about it and requests already on their way complete.
pub const DRAIN: Duration = Duration::from_millis(300);

/// How often a waiting deploy looks again when nothing wakes it earlier.
const POLL: Duration = Duration::from_millis(100);

/// Lines of a failing machine's log that a deploy reports.
pub const LOG_LINES: usize = 20;

/// A step of a rollout that failed on one machine.
#[derive(Clone, Debug)]
pub struct MachineFailure {
    pub message: String,
    pub failure: DeployFailure,
}

impl MachineFailure {
    fn new(row: &MachineRow, message: String) -> Self {
        Self {
            message,
            failure: DeployFailure {
                machine_id: row.id.clone(),
                process_group: group_of(row).to_string(),
                ..DeployFailure::default()
            },
        }
    }

    pub fn from_api(row: &MachineRow, err: ApiError) -> Self {
        Self::new(
            row,
            format!("machine {} [{}]: {}", row.id, group_of(row), err.message),
        )
    }
}

pub fn group_of(row: &MachineRow) -> &str {
    row.process_group().unwrap_or("app")
}

fn reload(plane: &ControlPlane, id: &str) -> Result<MachineRow, ApiError> {
    plane
        .store
        .machine(id)?
        .ok_or_else(|| ApiError::not_found(format!("machine {id} not found")))
}

/// Takes a machine out of routing or puts it back.
pub fn set_routed(plane: &ControlPlane, id: &str, routed: bool) -> Result<(), ApiError> {
    let row = reload(plane, id)?;
    plane.catalog.set_cordoned(&row, !routed);
    Ok(())
}

fn serves_traffic(row: &MachineRow) -> bool {
    !row.config.services.is_empty()
        && matches!(row.state, MachineState::Started | MachineState::Starting)
}

/// Cordons a machine and, if it was serving, waits out the drain period.
pub async fn drain(plane: &ControlPlane, row: &MachineRow) -> Result<(), ApiError> {
    let was_routed = !plane.catalog.is_cordoned(&row.id);
    set_routed(plane, &row.id, false)?;
    if was_routed && serves_traffic(row) {
        tokio::time::sleep(DRAIN).await;
    }
    Ok(())
}

/// Creates a machine out of routing and starts it (unless `start` is false). Returns the
/// machine and the time (ms) its start was asked for.
pub async fn launch_unrouted(
    plane: &ControlPlane,
    app: &AppRow,
    config: MachineConfig,
    region: &str,
    start: bool,
) -> Result<(MachineRow, i64), MachineFailure> {
    let request = CreateMachineRequest {
        region: Some(region.to_string()),
        config,
        skip_launch: true,
        ..Default::default()
    };
    let row = plane
        .create_machine(app, request)
        .await
        .map_err(|e| MachineFailure {
            message: format!("creating a machine failed: {}", e.message),
            failure: DeployFailure::default(),
        })?;
    plane.catalog.set_cordoned(&row, true);
    let started_ms = now_millis();
    if !start {
        return Ok((row, started_ms));
    }
    match plane.start_machine(&row).await {
        Ok(row) => Ok((row, started_ms)),
        Err(err) => Err(MachineFailure::from_api(&row, err)),
    }
}

/// Replaces a machine's config: drained first, restarted with the new config if it was
/// running, and left out of routing (the caller puts it back once it is healthy).
pub async fn update_unrouted(
    plane: &ControlPlane,
    app: &AppRow,
    row: &MachineRow,
    config: MachineConfig,
) -> Result<(MachineRow, i64), MachineFailure> {
    drain(plane, row)
        .await
        .map_err(|e| MachineFailure::from_api(row, e))?;
    let current = reload(plane, &row.id).map_err(|e| MachineFailure::from_api(row, e))?;
    let started_ms = now_millis();
    match plane.update_machine(app, &current, config).await {
        Ok(updated) => Ok((updated, started_ms)),
        Err(err) => Err(MachineFailure::from_api(&current, err)),
    }
}

/// Drains, stops and destroys a machine.
pub async fn retire(plane: &ControlPlane, row: &MachineRow) -> Result<(), ApiError> {
    drain(plane, row).await?;
    let current = reload(plane, &row.id)?;
    if matches!(
        current.state,
        MachineState::Started | MachineState::Starting
    ) && let Err(err) = plane.stop_machine(&current, &StopRequest::default()).await
    {
        tracing::warn!(machine = %row.id, error = %err, "stopping a machine before destroying it");
    }
    let current = reload(plane, &row.id)?;
    if current.state == MachineState::Destroyed {
        return Ok(());
    }
    plane.destroy_machine(&current, true).await
}

/// A health check a machine has to pass: service checks are named as Fly names them
/// (`servicecheck-00-http-8080`), top-level checks by their own names.
#[derive(Clone, Debug, PartialEq)]
pub struct ExpectedCheck {
    pub name: String,
    pub check: MachineCheck,
    /// The port checked when the check names none.
    pub port: u16,
}

pub fn expected_checks(config: &MachineConfig) -> Vec<ExpectedCheck> {
    config
        .named_checks()
        .into_iter()
        .map(|named| ExpectedCheck {
            port: named.port().unwrap_or_default(),
            name: named.name,
            check: named.check.clone(),
        })
        .collect()
}

/// Looks at a machine's port from its own host (the only one that reaches its address).
async fn probe_on_host(plane: &ControlPlane, row: &MachineRow, request: ProbeRequest) -> Probe {
    let agent = match plane.agent(&row.host_id) {
        Ok(agent) => agent,
        Err(err) => return Probe::NoAnswer(format!("its host does not answer: {}", err.message)),
    };
    match agent.probe(&row.id, &request).await {
        Ok(outcome) => outcome,
        Err(err) => Probe::NoAnswer(format!("its host did not look: {}", err.message)),
    }
}

/// Check results the agent reported for the machine's current run (newer than `since_ms`).
fn reported_checks(
    plane: &ControlPlane,
    row: &MachineRow,
    since_ms: i64,
) -> BTreeMap<String, CheckStatus> {
    plane
        .machine_view(row)
        .checks
        .into_iter()
        .filter(|c| {
            c.updated_at
                .as_deref()
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                .is_some_and(|t| t.timestamp_millis() >= since_ms - 1000)
        })
        .map(|c| (c.name.clone(), c))
        .collect()
}

/// An exit the agent reported for the machine since `since_ms` that nobody asked for (the
/// stop of the machine's previous run, reported late, does not count).
fn exit_since(
    plane: &ControlPlane,
    machine_id: &str,
    since_ms: i64,
) -> Option<(ExitStatus, String)> {
    let events = plane.store.events(machine_id, 20).ok()?;
    events
        .into_iter()
        .filter(|e| e.timestamp >= since_ms && e.kind == "exit")
        .find_map(|e| {
            let request = e.request?;
            let exit: ExitStatus =
                serde_json::from_value(request.get("exit_event")?.clone()).ok()?;
            if exit.requested_stop {
                return None;
            }
            let message = request
                .get("message")
                .and_then(|m| m.as_str())
                .unwrap_or_default()
                .to_string();
            Some((exit, message))
        })
}

fn describe_exit(exit: &ExitStatus) -> String {
    if exit.oom_killed {
        return "it ran out of memory and was killed (oom)".into();
    }
    match exit.signal {
        Some(signal) => format!("its main process was killed by signal {signal}"),
        None => format!("its main process exited with code {}", exit.exit_code),
    }
}

/// Waits until a machine is started and healthy: every check passing (probed from here;
/// a critical result the agent reports counts too), or with no checks, accepting
/// connections on every service port. Fails at once when the machine
/// exits or stops, or when a check fails after its grace period; else after `timeout`.
pub async fn wait_healthy(
    plane: &ControlPlane,
    machine_id: &str,
    started_ms: i64,
    timeout: Duration,
    progress: &Progress,
) -> Result<MachineRow, MachineFailure> {
    let start = Instant::now();
    let deadline = start + timeout;
    let (mut wake, _, _) = plane.catalog.follow(None);
    let mut last_reason: String;
    let mut next_notice = start + Duration::from_secs(10);
    loop {
        let row = match reload(plane, machine_id) {
            Ok(row) => row,
            Err(err) => {
                return Err(MachineFailure {
                    message: format!("machine {machine_id}: {}", err.message),
                    failure: DeployFailure {
                        machine_id: machine_id.to_string(),
                        ..Default::default()
                    },
                });
            }
        };
        if let Some((exit, message)) = exit_since(plane, &row.id, started_ms) {
            let mut failure = MachineFailure::new(
                &row,
                format!(
                    "machine {} [{}] exited: {}",
                    row.id,
                    group_of(&row),
                    describe_exit(&exit)
                ),
            );
            if !message.is_empty() {
                failure.message.push_str(&format!(" ({message})"));
            }
            failure.failure.exit = Some(exit);
            return Err(failure);
        }
        match row.state {
            MachineState::Started => match health(plane, &row, started_ms, start.elapsed()).await {
                Health::Healthy => return Ok(row),
                Health::Waiting(reason) => last_reason = reason,
                Health::Failing { check, output } => {
                    let mut failure = MachineFailure::new(
                        &row,
                        format!(
                            "machine {} [{}] failed its health check {check}: {output}",
                            row.id,
                            group_of(&row)
                        ),
                    );
                    failure.failure.check = Some(check);
                    failure.failure.check_output = output;
                    return Err(failure);
                }
            },
            MachineState::Created | MachineState::Starting => {
                last_reason = format!("it is {}", row.state)
            }
            other => {
                let reason = plane.failure_reason(&row.id);
                return Err(MachineFailure::new(
                    &row,
                    format!(
                        "machine {} [{}] is {other} instead of started: {reason}",
                        row.id,
                        group_of(&row)
                    ),
                ));
            }
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(MachineFailure::new(
                &row,
                format!(
                    "machine {} [{}] was not healthy within the wait timeout of {}: {last_reason}",
                    row.id,
                    group_of(&row),
                    humantime(timeout)
                ),
            ));
        }
        if now >= next_notice {
            progress
                .say(format!(
                    "Waiting for machine {} [{}] to be healthy: {last_reason}",
                    row.id,
                    group_of(&row)
                ))
                .await;
            next_notice = now + Duration::from_secs(10);
        }
        tokio::select! {
            _ = wake.recv() => {}
            _ = tokio::time::sleep(POLL.min(deadline - now)) => {}
        }
    }
}

pub fn humantime(duration: Duration) -> String {
    let secs = duration.as_secs();
    if secs >= 60 && secs.is_multiple_of(60) {
        format!("{}m", secs / 60)
    } else if secs >= 1 {
        format!("{secs}s")
    } else {
        format!("{}ms", duration.as_millis())
    }
}

enum Health {
    Healthy,
    Waiting(String),
    Failing { check: String, output: String },
}

async fn health(
    plane: &ControlPlane,
    row: &MachineRow,
    started_ms: i64,
    elapsed: Duration,
) -> Health {
    if row
        .private_ipv4
        .as_deref()
        .and_then(|ip| ip.parse::<IpAddr>().ok())
        .is_none()
    {
        return if row.config.services.is_empty() && row.config.checks.is_empty() {
            Health::Healthy
        } else {
            Health::Waiting("it has no private address yet".into())
        };
    }
    let checks = expected_checks(&row.config);
    if checks.is_empty() {
        // No checks: ready once every service port accepts connections.
        for service in &row.config.services {
            let tcp = ProbeRequest {
                port: service.internal_port,
                check: MachineCheck {
                    check_type: "tcp".into(),
                    timeout: Some(aloft_api::Duration::from_secs(1)),
                    ..Default::default()
                },
            };
            match probe_on_host(plane, row, tcp).await {
                Probe::Passing => {}
                Probe::Answered(err) | Probe::NoAnswer(err) => {
                    return Health::Waiting(format!(
                        "nothing accepts connections on port {} yet ({err})",
                        service.internal_port
                    ));
                }
            }
        }
        return Health::Healthy;
    }
    let reported = reported_checks(plane, row, started_ms);
    for expected in &checks {
        let grace = expected.check.grace_period.map(|g| g.to_std());
        let past_grace = elapsed >= grace.unwrap_or_default();
        // Silence (nothing listening yet) is given one more check interval after the
        // grace period; an explicit failure answer counts as soon as the grace period ends.
        let interval = expected
            .check
            .interval
            .map(|i| i.to_std())
            .filter(|i| !i.is_zero())
            .unwrap_or(Duration::from_secs(10));
        let past_patience = grace.is_some_and(|g| elapsed >= g + interval);
        // The agent's verdict can fail a deploy; passing is confirmed from here too, so a
        // result left over from the machine's previous run never lets traffic in early.
        if let Some(status) = reported.get(&expected.name)
            && status.status == "critical"
            && past_patience
        {
            return Health::Failing {
                check: expected.name.clone(),
                output: status.output.clone(),
            };
        }
        let request = ProbeRequest {
            port: expected.port,
            check: expected.check.clone(),
        };
        match probe_on_host(plane, row, request).await {
            Probe::Passing => {}
            Probe::Answered(output) if past_grace => {
                return Health::Failing {
                    check: expected.name.clone(),
                    output,
                };
            }
            Probe::NoAnswer(output) if past_patience => {
                return Health::Failing {
                    check: expected.name.clone(),
                    output,
                };
            }
            Probe::Answered(output) | Probe::NoAnswer(output) => {
                return Health::Waiting(format!(
                    "check {} is not passing yet: {output}",
                    expected.name
                ));
            }
        }
    }
    Health::Healthy
}

/// The machine's last `LOG_LINES` log lines, from the platform's log API.
pub async fn machine_logs(plane: &ControlPlane, app: &str, machine_id: &str) -> Vec<String> {
    let base = format!("http://{}", plane.config.listen);
    let client = aloft_client::Client::new(&base, Some(plane.host_token().to_string()))
        .with_timeout(Duration::from_secs(3));
    let path = format!(
        "/v1/apps/{}/logs?machine={machine_id}&lines={LOG_LINES}",
        aloft_client::encode_component(app)
    );
    let Ok((status, body)) = client.raw(http::Method::GET, &path, None, &[]).await else {
        return Vec::new();
    };
    if !status.is_success() {
        return Vec::new();
    }
    let mut lines = parse_log_lines(&body, machine_id);
    if lines.len() > LOG_LINES {
        lines.drain(..lines.len() - LOG_LINES);
    }
    lines
}

/// Log messages out of a log API answer: a JSON array, NDJSON, or Fly's
/// `{"data":[{"attributes":{"message":..}}]}`; entries of other machines are skipped.
pub fn parse_log_lines(body: &[u8], machine_id: &str) -> Vec<String> {
    fn message(entry: &serde_json::Value, machine_id: &str) -> Option<String> {
        let entry = entry.get("attributes").unwrap_or(entry);
        let instance = entry
            .get("instance")
            .or_else(|| entry.get("machine_id"))
            .and_then(|v| v.as_str());
        if instance.is_some_and(|i| i != machine_id) {
            return None;
        }
        match entry.get("message") {
            Some(serde_json::Value::String(text)) => Some(text.trim_end().to_string()),
            Some(other) => Some(other.to_string()),
            None => entry.as_str().map(str::to_string),
        }
    }
    if let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) {
        let entries = match &value {
            serde_json::Value::Array(items) => items.clone(),
            serde_json::Value::Object(map) => map
                .get("data")
                .or_else(|| map.get("logs"))
                .and_then(|d| d.as_array())
                .cloned()
                .unwrap_or_default(),
            _ => Vec::new(),
        };
        return entries
            .iter()
            .filter_map(|e| message(e, machine_id))
            .collect();
    }
    String::from_utf8_lossy(body)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter_map(
            |line| match serde_json::from_str::<serde_json::Value>(line) {
                Ok(entry) => message(&entry, machine_id),
                Err(_) => Some(line.to_string()),
            },
        )
        .collect()
}

/// Adds the machine's last log lines to a failure, and reports them.
pub async fn with_logs(
    plane: &ControlPlane,
    app: &str,
    mut failure: MachineFailure,
) -> MachineFailure {
    if !failure.failure.machine_id.is_empty() && failure.failure.logs.is_empty() {
        failure.failure.logs = machine_logs(plane, app, &failure.failure.machine_id).await;
    }
    failure
}

#[cfg(test)]
mod tests {
    use super::*;
    use aloft_api::MachineService;

    #[test]
    fn service_checks_are_named_as_fly_names_them() {
        let mut config = MachineConfig::default();
        config.services.push(MachineService {
            internal_port: 8080,
            checks: vec![
                MachineCheck {
                    check_type: "http".into(),
                    path: Some("/health".into()),
                    ..Default::default()
                },
                MachineCheck {
                    check_type: "tcp".into(),
                    ..Default::default()
                },
            ],
            ..Default::default()
        });
        config.checks.insert(
            "db".into(),
            MachineCheck {
                check_type: "tcp".into(),
                port: Some(5432),
                ..Default::default()
            },
        );
        let names: Vec<(String, u16)> = expected_checks(&config)
            .into_iter()
            .map(|c| (c.name, c.port))
            .collect();
        assert_eq!(
            names,
            vec![
                ("servicecheck-00-http-8080".into(), 8080),
                ("servicecheck-01-tcp-8080".into(), 8080),
                ("db".into(), 5432)
            ]
        );
    }

    #[test]
    fn log_lines_come_from_every_known_answer_shape() {
        let fly = br#"{"data":[{"id":"1","attributes":{"message":"one","instance":"m1"}},{"attributes":{"message":"other","instance":"m2"}}]}"#;
        assert_eq!(parse_log_lines(fly, "m1"), vec!["one"]);
        let array = br#"[{"message":"a\n","machine_id":"m1"},{"message":"b"}]"#;
        assert_eq!(parse_log_lines(array, "m1"), vec!["a", "b"]);
        let ndjson =
            b"{\"message\":\"x\",\"instance\":\"m1\"}\n{\"message\":\"y\",\"instance\":\"m1\"}\n";
        assert_eq!(parse_log_lines(ndjson, "m1"), vec!["x", "y"]);
        assert_eq!(
            parse_log_lines(b"plain line\n\nnext\n", "m1"),
            vec!["plain line", "next"]
        );
    }
}
