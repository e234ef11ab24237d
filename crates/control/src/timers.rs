//! What the control plane does on its own clock: it starts machines whose `schedule` is due,
//! and it probes every host's agent so machines can say whether their host answers
//! (`host_status`); it takes volumes' daily snapshots and drops expired ones
//! (`volumes::run_scheduled_snapshots`), and grows volumes past their mount's
//! auto-extend threshold (`volumes::run_auto_extend`).
//!
//! A schedule's next run is computed from stored state only (the machine's latest `start`
//! event, else its creation time), so it survives restarts of the control plane. Runs
//! missed while the control plane was down are not replayed one by one: a machine whose
//! run is overdue starts once, as soon as the control plane is back, and its next run is
//! a period after that start (Fly's schedules are fuzzy and count from the last run).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aloft_api::MachineState;

use crate::ControlPlane;
use crate::store::{MachineRow, StoreError, now_millis};

/// Settings key of `aloft server --schedule-time-scale`: how many times faster than real
/// time schedule periods pass (1 in production; tests make an hour pass in seconds).
pub const SETTING_SCHEDULE_TIME_SCALE: &str = "schedule.time_scale";

/// How often the control plane looks for due schedules (and probes hosts).
const TICK: Duration = Duration::from_secs(1);
/// How often each host's agent is probed.
const PROBE_EVERY: Duration = Duration::from_secs(5);
/// How often volumes are checked for a due daily snapshot or an expired one.
const SNAPSHOTS_EVERY: Duration = Duration::from_secs(2);
/// A probe that takes longer than this counts as a failure.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// The period of a schedule Fly accepts (`hourly`, `daily`, `weekly`, `monthly`).
pub fn schedule_period(schedule: &str) -> Option<Duration> {
    const HOUR: u64 = 3600;
    match schedule {
        "hourly" => Some(Duration::from_secs(HOUR)),
        "daily" => Some(Duration::from_secs(24 * HOUR)),
        "weekly" => Some(Duration::from_secs(7 * 24 * HOUR)),
        "monthly" => Some(Duration::from_secs(30 * 24 * HOUR)),
        _ => None,
    }
}

/// When (unix millis) a machine that last ran at `last_run_ms` runs next, its schedule's
/// `period` divided by `time_scale`.
pub fn next_run_ms(last_run_ms: i64, period: Duration, time_scale: u64) -> i64 {
    let scaled = period.as_millis() / u128::from(time_scale.max(1));
    last_run_ms.saturating_add(i64::try_from(scaled).unwrap_or(i64::MAX))
}

/// When the machine last ran: its newest `start` event, else its creation.
fn last_run_ms(plane: &ControlPlane, row: &MachineRow) -> Result<i64, StoreError> {
    let started = plane
        .store
        .events(&row.id, 200)?
        .into_iter()
        .find(|e| e.kind == "start")
        .map(|e| e.timestamp);
    Ok(started.unwrap_or_else(|| {
        chrono::DateTime::parse_from_rfc3339(&row.created_at)
            .map(|t| t.timestamp_millis())
            .unwrap_or(0)
    }))
}

/// What the control plane last learned about a host's agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostHealth {
    Reachable,
    Unreachable,
}

/// The latest probe result of each host, by host id.
#[derive(Default)]
pub struct HostProbes {
    results: Mutex<HashMap<String, (HostHealth, Instant)>>,
}

impl HostProbes {
    fn record(&self, host_id: &str, health: HostHealth) {
        self.results
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(host_id.to_string(), (health, Instant::now()));
    }

    /// `ok`, `unreachable`, or `unknown` (never probed, or no answer for too long to say).
    pub fn status(&self, host_id: &str) -> &'static str {
        let results = self.results.lock().unwrap_or_else(|p| p.into_inner());
        match results.get(host_id) {
            Some((HostHealth::Reachable, at)) if at.elapsed() < PROBE_EVERY * 3 => "ok",
            Some((HostHealth::Unreachable, _)) => "unreachable",
            _ => "unknown",
        }
    }
}

impl ControlPlane {
    fn schedule_time_scale(&self) -> u64 {
        self.store
            .setting(SETTING_SCHEDULE_TIME_SCALE)
            .ok()
            .flatten()
            .and_then(|s| s.parse().ok())
            .filter(|s| *s > 0)
            .unwrap_or(1)
    }

    /// Starts every stopped machine whose schedule is due.
    pub async fn run_due_schedules(&self) -> Result<(), StoreError> {
        let scale = self.schedule_time_scale();
        let now = now_millis();
        for row in self.store.all_live_machines()? {
            let Some(period) = row.config.schedule.as_deref().and_then(schedule_period) else {
                continue;
            };
            if !matches!(row.state, MachineState::Stopped | MachineState::Created) {
                continue;
            }
            if next_run_ms(last_run_ms(self, &row)?, period, scale) > now {
                continue;
            }
            tracing::info!(machine = %row.id, schedule = ?row.config.schedule, "starting a scheduled machine");
            if let Err(err) = self.start_machine(&row).await {
                tracing::warn!(machine = %row.id, error = %err.message, "starting a scheduled machine");
            }
        }
        Ok(())
    }

    /// Asks every registered host's agent whether it answers.
    pub async fn probe_hosts(&self) -> Result<(), StoreError> {
        let now = crate::store::now_millis();
        for host in self.store.hosts()? {
            if crate::hosts::host_status(&host, now) == crate::hosts::HostStatus::Down {
                continue;
            }
            self.probe_host(&host.id).await;
        }
        Ok(())
    }

    /// Asks one host's agent whether it answers, and records the answer.
    pub(crate) async fn probe_host(&self, host_id: &str) {
        let health = match self.agent(host_id) {
            Ok(agent) => {
                match tokio::time::timeout(
                    PROBE_TIMEOUT,
                    agent.http().get::<serde_json::Value>("/v1/machines"),
                )
                .await
                {
                    Ok(Ok(_)) => HostHealth::Reachable,
                    Ok(Err(aloft_client::ClientError::Api { .. })) => HostHealth::Reachable,
                    _ => HostHealth::Unreachable,
                }
            }
            Err(_) => HostHealth::Unreachable,
        };
        self.host_probes.record(host_id, health);
    }

    /// Marks the machines of every host that stopped heartbeating unreachable.
    pub fn mark_silent_hosts(&self) -> Result<(), StoreError> {
        let now = crate::store::now_millis();
        for host in self.store.hosts()? {
            if crate::hosts::host_status(&host, now) == crate::hosts::HostStatus::Down
                && self.host_probes.status(&host.id) != "unreachable"
            {
                tracing::warn!(host = %host.id, last_seen = %host.last_seen, "host stopped heartbeating: down");
                self.host_probes.record(&host.id, HostHealth::Unreachable);
            }
        }
        Ok(())
    }

    /// The control plane's clock: schedules and host probes, until the process ends.
    pub async fn run_timers(self: Arc<Self>) {
        let mut last_probe: Option<Instant> = None;
        let mut last_snapshots: Option<Instant> = None;
        loop {
            if last_probe.is_none_or(|at| at.elapsed() >= PROBE_EVERY) {
                last_probe = Some(Instant::now());
                if let Err(err) = self.probe_hosts().await {
                    tracing::warn!(error = %err, "probing hosts");
                }
            }
            if let Err(err) = self.mark_silent_hosts() {
                tracing::warn!(error = %err, "checking hosts' heartbeats");
            }
            if let Err(err) = self.reschedule_lost_machines().await {
                tracing::warn!(error = %err.message, "replacing lost hosts' machines");
            }
            if let Err(err) = self.run_due_schedules().await {
                tracing::warn!(error = %err, "running scheduled machines");
            }
            if last_snapshots.is_none_or(|at| at.elapsed() >= SNAPSHOTS_EVERY) {
                last_snapshots = Some(Instant::now());
                if let Err(err) = crate::volumes::run_scheduled_snapshots(&self).await {
                    tracing::warn!(error = %err, "taking daily volume snapshots");
                }
                if let Err(err) = crate::volumes::run_auto_extend(&self).await {
                    tracing::warn!(error = %err, "extending volumes automatically");
                }
            }
            tokio::time::sleep(TICK).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_have_fly_periods() {
        assert_eq!(schedule_period("hourly"), Some(Duration::from_secs(3600)));
        assert_eq!(schedule_period("daily"), Some(Duration::from_secs(86_400)));
        assert_eq!(
            schedule_period("weekly"),
            Some(Duration::from_secs(604_800))
        );
        assert_eq!(
            schedule_period("monthly"),
            Some(Duration::from_secs(2_592_000))
        );
        assert_eq!(schedule_period("yearly"), None);
    }

    #[test]
    fn next_run_is_a_period_after_the_last() {
        let hour = Duration::from_secs(3600);
        assert_eq!(next_run_ms(1_000, hour, 1), 1_000 + 3_600_000);
        assert_eq!(next_run_ms(1_000, hour, 1800), 1_000 + 2_000);
        assert_eq!(next_run_ms(1_000, hour, 0), 1_000 + 3_600_000, "0 is 1");
    }

    #[test]
    fn host_status_follows_probes() {
        let probes = HostProbes::default();
        assert_eq!(probes.status("h"), "unknown");
        probes.record("h", HostHealth::Reachable);
        assert_eq!(probes.status("h"), "ok");
        probes.record("h", HostHealth::Unreachable);
        assert_eq!(probes.status("h"), "unreachable");
    }
}
