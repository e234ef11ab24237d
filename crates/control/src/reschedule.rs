//! Lost hosts' machines. An operator may have the control plane replace the machines of a
//! host that has been down for a while (`aloft server --reschedule-lost-after 5m`): each
//! machine without a volume (a volume pins its machine to its host) gets a new machine with
//! the same config, placed as any new machine is (its region first, healthy hosts only),
//! started when the lost one was; then the lost one is destroyed in the catalog. When the
//! lost host comes back, its agent is told to destroy what it still runs of those machines.

use std::time::Duration;

use aloft_api::{CreateMachineRequest, MachineState};

use crate::ControlPlane;
use crate::error::ApiError;
use crate::hosts::{HostStatus, host_status};
use crate::store::{MachineRow, now_millis};

/// How long a host is down before its machines are replaced (seconds; unset: never).
pub const SETTING_RESCHEDULE_LOST_AFTER_SECS: &str = "hosts.reschedule_lost_after_secs";

impl ControlPlane {
    fn reschedule_after(&self) -> Option<Duration> {
        self.store
            .setting(SETTING_RESCHEDULE_LOST_AFTER_SECS)
            .ok()
            .flatten()
            .and_then(|s| s.parse::<u64>().ok())
            .map(Duration::from_secs)
    }

    /// Replaces the machines of every host down for longer than the operator's setting.
    pub async fn reschedule_lost_machines(&self) -> Result<(), ApiError> {
        let Some(after) = self.reschedule_after() else {
            return Ok(());
        };
        let now = now_millis();
        let after_ms = i64::try_from(after.as_millis()).unwrap_or(i64::MAX);
        let lost: Vec<String> = self
            .store
            .hosts()?
            .into_iter()
            .filter(|host| host_status(host, now) == HostStatus::Down)
            .filter(|host| {
                chrono::DateTime::parse_from_rfc3339(&host.last_seen)
                    .is_ok_and(|seen| now.saturating_sub(seen.timestamp_millis()) >= after_ms)
            })
            .map(|host| host.id)
            .collect();
        if lost.is_empty() {
            return Ok(());
        }
        for row in self.store.all_live_machines()? {
            if !lost.contains(&row.host_id)
                || row.state == MachineState::Destroyed
                || !row.config.mounts.is_empty()
            {
                continue;
            }
            if let Err(err) = self.replace_lost_machine(&row).await {
                tracing::warn!(machine = %row.id, host = %row.host_id, error = %err.message, "replacing a lost host's machine");
            }
        }
        Ok(())
    }

    async fn replace_lost_machine(&self, lost: &MachineRow) -> Result<(), ApiError> {
        let app = self
            .store
            .app_by_id(&lost.app_id)?
            .ok_or_else(|| ApiError::not_found(format!("app {} not found", lost.app_name)))?;
        let was_started = matches!(
            lost.state,
            MachineState::Started | MachineState::Starting | MachineState::Replacing
        );
        let request = CreateMachineRequest {
            config: lost.config.clone(),
            region: Some(lost.region.clone()),
            skip_launch: !was_started,
            ..Default::default()
        };
        let replacement = self.create_machine(&app, request).await?;
        let note = serde_json::json!({
            "message": format!(
                "host {} was lost; replaced by machine {} on host {}",
                lost.host_id, replacement.id, replacement.host_id
            )
        });
        self.record_destroyed(&lost.id, Some(note))?;
        self.publish(&self.reload(&lost.id)?);
        tracing::warn!(machine = %lost.id, host = %lost.host_id, replacement = %replacement.id, on = %replacement.host_id, "replaced a lost host's machine");
        Ok(())
    }

    /// Destroys, on a host that (re)joined, the machines it still runs that the platform
    /// destroyed or placed elsewhere while it was away.
    pub(crate) async fn reclaim_replaced_machines(&self, host_id: &str) {
        let Ok(agent) = self.agent(host_id) else {
            return;
        };
        let listed = agent
            .http()
            .get::<Vec<aloft_api::internal::AgentMachine>>("/v1/machines")
            .await;
        let Ok(listed) = listed else {
            return;
        };
        for machine in listed {
            let Ok(Some(row)) = self.store.machine(&machine.id) else {
                continue;
            };
            if row.state == MachineState::Destroyed || row.host_id != host_id {
                tracing::info!(machine = %machine.id, host = %host_id, "destroying a machine the platform replaced while its host was away");
                if let Err(err) = agent.destroy(&machine.id).await {
                    tracing::warn!(machine = %machine.id, host = %host_id, error = %err.message, "destroying a replaced machine");
                }
            }
        }
    }
}
