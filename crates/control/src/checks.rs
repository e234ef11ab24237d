//! Health check results: agents report them (`POST /v1/hosts/{id}/checks`) whenever one
//! changes; the latest are kept per machine, shown on the machine (`checks`) and published
//! on the catalog stream so proxies route around machines whose service checks fail.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use aloft_api::CheckStatus;
use aloft_api::internal::ChecksReport;
use axum::extract::{Path, State};
use axum::routing::post;
use axum::{Json, Router};
use http::StatusCode;

use crate::ControlPlane;
use crate::auth::Caller;
use crate::error::ApiResult;

/// The latest check results of every machine (kept in memory: agents resend all of
/// theirs whenever they reconnect), each with the stamp of its last change.
#[derive(Default)]
pub struct CheckBoard {
    results: Mutex<HashMap<String, (u64, Vec<CheckStatus>)>>,
    changes: AtomicU64,
}

impl CheckBoard {
    pub fn get(&self, machine_id: &str) -> Vec<CheckStatus> {
        self.results
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(machine_id)
            .map(|(_, checks)| checks.clone())
            .unwrap_or_default()
    }

    /// Changes whenever the machine's results change (0: none reported), so a cached
    /// view of the machine can tell it is stale.
    pub fn stamp(&self, machine_id: &str) -> u64 {
        self.results
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(machine_id)
            .map_or(0, |(stamp, _)| *stamp)
    }

    /// Replaces a machine's results; says whether anything changed.
    pub fn set(&self, machine_id: &str, checks: Vec<CheckStatus>) -> bool {
        let mut results = self.results.lock().unwrap_or_else(|p| p.into_inner());
        if checks.is_empty() {
            return results.remove(machine_id).is_some();
        }
        if results
            .get(machine_id)
            .is_some_and(|(_, old)| *old == checks)
        {
            return false;
        }
        let stamp = self.changes.fetch_add(1, Ordering::Relaxed) + 1;
        results.insert(machine_id.to_string(), (stamp, checks));
        true
    }
}

impl ControlPlane {
    /// The latest check results of a machine.
    pub fn machine_checks(&self, machine_id: &str) -> Vec<CheckStatus> {
        self.catalog.checks.get(machine_id)
    }

    /// Applies an agent's check report: results of machines on that host only.
    pub fn apply_checks_report(&self, host_id: &str, report: ChecksReport) -> ApiResult<()> {
        for entry in report.machines {
            let Some(row) = self.store.machine(&entry.machine_id)? else {
                continue;
            };
            if row.host_id != host_id {
                continue;
            }
            if self.catalog.checks.set(&row.id, entry.checks)
                && row.state != aloft_api::MachineState::Destroyed
            {
                self.catalog.machine_changed(&row);
            }
        }
        Ok(())
    }
}

pub fn routes() -> Router<Arc<ControlPlane>> {
    Router::new().route("/v1/hosts/{id}/checks", post(host_checks))
}

async fn host_checks(
    State(plane): State<Arc<ControlPlane>>,
    caller: Caller,
    Path(host): Path<String>,
    Json(report): Json<ChecksReport>,
) -> ApiResult<StatusCode> {
    caller.require_host_itself(&host)?;
    plane.apply_checks_report(&host, report)?;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(name: &str, status: &str) -> CheckStatus {
        CheckStatus {
            name: name.into(),
            status: status.into(),
            output: String::new(),
            updated_at: None,
        }
    }

    #[test]
    fn the_board_reports_changes_only() {
        let board = CheckBoard::default();
        assert_eq!(board.stamp("m"), 0);
        assert!(board.set("m", vec![status("a", "warning")]));
        let first = board.stamp("m");
        assert!(!board.set("m", vec![status("a", "warning")]));
        assert_eq!(board.stamp("m"), first);
        assert!(board.set("m", vec![status("a", "passing")]));
        assert_ne!(board.stamp("m"), first);
        assert_eq!(board.get("m")[0].status, "passing");
        assert!(board.set("m", vec![]));
        assert!(board.get("m").is_empty());
        assert_eq!(board.stamp("m"), 0);
        assert!(!board.set("m", vec![]));
    }
}
