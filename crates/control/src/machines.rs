//! Machine lifecycle as the control plane drives it: create, start, stop, update, destroy,
//! and what agents report back.

use aloft_api::internal::{AgentEvent, AgentMachine, ImagePull, MachineSpec};
use aloft_api::{
    CreateMachineRequest, ImageRef, Machine, MachineConfig, MachineEvent, MachineState, StopRequest,
};

use crate::ControlPlane;
use crate::error::{ApiError, ApiResult};
use crate::hosts::place;
use crate::names;
use crate::store::{AppRow, MachineRow, now_millis, now_rfc3339};

const EVENTS_IN_VIEW: usize = 10;

impl ControlPlane {
    /// The machine as the Machines API shows it.
    pub fn machine_view(&self, row: &MachineRow) -> ApiResult<Machine> {
        let events = self.store.events(&row.id, EVENTS_IN_VIEW)?;
        Ok(Machine {
            id: row.id.clone(),
            name: row.name.clone(),
            state: row.state,
            region: row.region.clone(),
            instance_id: row.instance_id.clone(),
            version: Some(row.instance_id.clone()),
            private_ip: row.private_ip.clone().unwrap_or_default(),
            config: row.config.clone(),
            image_ref: ImageRef::parse(&row.config.image),
            created_at: row.created_at.clone(),
            updated_at: row.updated_at.clone(),
            events,
            checks: self.machine_checks(&row.id),
            nonce: None,
            host_status: "ok".into(),
            cordoned: None,
            incomplete_config: None,
        })
    }

    fn record_event(
        &self,
        machine_id: &str,
        kind: &str,
        status: MachineState,
        source: &str,
        request: Option<serde_json::Value>,
    ) {
        let event = MachineEvent {
            id: ulid::Ulid::new().to_string(),
            kind: kind.to_string(),
            status: status.as_str().to_string(),
            source: source.to_string(),
            timestamp: now_millis(),
            request,
        };
        if let Err(err) = self.store.insert_event(machine_id, &event) {
            tracing::error!(machine = machine_id, error = %err, "recording a machine event failed");
        }
    }

    fn reload(&self, id: &str) -> ApiResult<MachineRow> {
        self.store
            .machine(id)?
            .ok_or_else(|| ApiError::not_found(format!("machine {id} not found")))
    }

    fn set_state(&self, row: &MachineRow, state: MachineState) -> ApiResult<MachineRow> {
        self.store.set_machine_state(&row.id, state)?;
        let row = self.reload(&row.id)?;
        self.catalog.machine_changed(&row);
        Ok(row)
    }

    fn spec(&self, row: &MachineRow, app: &AppRow) -> MachineSpec {
        let registry = self.registry_host();
        let ours = row.config.image.starts_with(&format!("{registry}/"));
        MachineSpec {
            id: row.id.clone(),
            name: row.name.clone(),
            app: app.name.clone(),
            org: app.org_slug.clone(),
            region: row.region.clone(),
            instance_id: row.instance_id.clone(),
            config: row.config.clone(),
            image: ImagePull {
                reference: row.config.image.clone(),
                registry_url: if ours {
                    format!("http://{registry}")
                } else {
                    String::new()
                },
                token: if ours {
                    self.host_token().to_string()
                } else {
                    String::new()
                },
            },
            private_ip: row.private_ip.clone(),
        }
    }

    /// Applies an agent's answer about a machine; returns the machine as now stored.
    pub fn apply_agent_machine(&self, reported: &AgentMachine) -> ApiResult<MachineRow> {
        if self.store.apply_agent_status(
            &reported.id,
            reported.seq,
            reported.state,
            reported.private_ipv4.as_deref(),
        )? {
            let row = self.reload(&reported.id)?;
            self.catalog.machine_changed(&row);
            return Ok(row);
        }
        self.reload(&reported.id)
    }

    /// Events an agent delivers (in its sequence order, possibly again after a retry).
    pub fn apply_agent_events(&self, host_id: &str, events: &[AgentEvent]) -> ApiResult<()> {
        let mut events: Vec<&AgentEvent> = events.iter().collect();
        events.sort_by_key(|e| e.seq);
        for event in events {
            if !self.store.advance_host_event_seq(host_id, event.seq)? {
                continue;
            }
            let Some(row) = self.store.machine(&event.machine_id)? else {
                continue;
            };
            let request = event
                .exit
                .as_ref()
                .map(|exit| serde_json::json!({ "exit_event": exit, "message": event.message }));
            let request = request.or_else(|| {
                event
                    .message
                    .as_ref()
                    .map(|m| serde_json::json!({ "message": m }))
            });
            self.record_event(&row.id, &event.kind, event.state, "flyd", request);
            if row.state == MachineState::Destroyed {
                continue;
            }
            if self.store.apply_agent_status(
                &row.id,
                event.seq,
                event.state,
                event.private_ipv4.as_deref(),
            )? {
                let row = self.reload(&row.id)?;
                self.catalog.machine_changed(&row);
            }
        }
        Ok(())
    }

    pub async fn create_machine(
        &self,
        app: &AppRow,
        request: CreateMachineRequest,
    ) -> ApiResult<MachineRow> {
        let config = request.config;
        if config.image.trim().is_empty() {
            return Err(ApiError::bad_request(
                "invalid config.image: an image is required",
            ));
        }
        let wanted = request
            .region
            .clone()
            .filter(|r| !r.is_empty())
            .unwrap_or_else(|| self.config.region.clone());
        let placement = place(&self.store.hosts()?, &wanted)?;
        let now = now_rfc3339();
        let row = MachineRow {
            id: names::machine_id(),
            app_id: app.id.clone(),
            app_name: app.name.clone(),
            name: request
                .name
                .filter(|n| !n.is_empty())
                .unwrap_or_else(names::machine_name),
            region: placement.region.clone(),
            host_id: placement.host.id.clone(),
            state: MachineState::Created,
            instance_id: ulid::Ulid::new().to_string(),
            config,
            private_ip: Some(crate::ips::machine_private_ip(
                &self.store,
                app,
                &placement.host.id,
            )?),
            private_ipv4: None,
            created_at: now.clone(),
            updated_at: now,
        };
        self.store.insert_machine(&row)?;
        let agent = self.agent(&row.host_id)?;
        if let Err(err) = agent.put(&self.spec(&row, app)).await {
            self.store.delete_machine(&row.id)?;
            self.forget_agent(&row.host_id);
            return Err(err);
        }
        self.record_event(&row.id, "launch", MachineState::Created, "user", None);
        self.catalog.machine_changed(&row);
        if request.skip_launch {
            return Ok(row);
        }
        self.start_machine(&row).await
    }

    pub async fn start_machine(&self, row: &MachineRow) -> ApiResult<MachineRow> {
        match row.state {
            MachineState::Created
            | MachineState::Stopped
            | MachineState::Suspended
            | MachineState::Failed => {}
            other => {
                return Err(ApiError::precondition(format!(
                    "unable to start machine from current state: '{other}'"
                )));
            }
        }
        let row = self.set_state(row, MachineState::Starting)?;
        let agent = self.agent(&row.host_id)?;
        match agent.start(&row.id).await {
            Ok(reported) => self.apply_agent_machine(&reported),
            Err(err) => {
                self.resync(&row).await;
                Err(err)
            }
        }
    }

    pub async fn stop_machine(
        &self,
        row: &MachineRow,
        request: &StopRequest,
    ) -> ApiResult<MachineRow> {
        match row.state {
            MachineState::Started | MachineState::Starting | MachineState::Stopping => {}
            MachineState::Stopped | MachineState::Created => return Ok(row.clone()),
            other => {
                return Err(ApiError::precondition(format!(
                    "unable to stop machine from current state: '{other}'"
                )));
            }
        }
        let row = self.set_state(row, MachineState::Stopping)?;
        let request = StopRequest {
            signal: request.signal.clone().or_else(|| {
                row.config
                    .stop_config
                    .as_ref()
                    .and_then(|s| s.signal.clone())
            }),
            timeout: request
                .timeout
                .or_else(|| row.config.stop_config.as_ref().and_then(|s| s.timeout)),
        };
        let agent = self.agent(&row.host_id)?;
        match agent.stop(&row.id, &request).await {
            Ok(reported) => self.apply_agent_machine(&reported),
            Err(err) => {
                self.resync(&row).await;
                Err(err)
            }
        }
    }

    /// Replaces a machine's config: a new instance, restarted if it was running.
    pub async fn update_machine(
        &self,
        app: &AppRow,
        row: &MachineRow,
        config: MachineConfig,
    ) -> ApiResult<MachineRow> {
        if config.image.trim().is_empty() {
            return Err(ApiError::bad_request(
                "invalid config.image: an image is required",
            ));
        }
        let was_running = matches!(row.state, MachineState::Started | MachineState::Starting);
        if was_running {
            self.stop_machine(row, &StopRequest::default()).await?;
        }
        let instance_id = ulid::Ulid::new().to_string();
        self.store
            .update_machine_config(&row.id, &instance_id, &config)?;
        let updated = self.reload(&row.id)?;
        self.record_event(&row.id, "update", updated.state, "user", None);
        self.agent(&updated.host_id)?
            .put(&self.spec(&updated, app))
            .await?;
        if was_running || matches!(updated.state, MachineState::Created | MachineState::Failed) {
            return self.start_machine(&updated).await;
        }
        self.catalog.machine_changed(&updated);
        Ok(updated)
    }

    pub async fn destroy_machine(&self, row: &MachineRow, force: bool) -> ApiResult<()> {
        if matches!(row.state, MachineState::Started | MachineState::Starting) && !force {
            return Err(ApiError::precondition(
                "unable to destroy machine, not currently stopped: stop it first or pass force=true",
            ));
        }
        let row = self.set_state(row, MachineState::Destroying)?;
        let agent = self.agent(&row.host_id)?;
        let reported = agent.destroy(&row.id).await?;
        self.apply_agent_machine(&reported)?;
        self.store
            .set_machine_state(&row.id, MachineState::Destroyed)?;
        self.record_event(&row.id, "destroy", MachineState::Destroyed, "user", None);
        self.catalog.machine_removed(&row.id);
        Ok(())
    }

    /// Why a machine is not running, from its latest event that says so.
    pub fn failure_reason(&self, id: &str) -> String {
        self.store
            .events(id, 5)
            .ok()
            .into_iter()
            .flatten()
            .find_map(|e| {
                e.request.and_then(|r| {
                    r.get("message")
                        .and_then(|m| m.as_str())
                        .map(str::to_string)
                })
            })
            .unwrap_or_else(|| "no reason recorded".into())
    }

    /// After a failed call, asks the agent what the machine's state really is.
    async fn resync(&self, row: &MachineRow) {
        if let Ok(agent) = self.agent(&row.host_id) {
            match agent.get(&row.id).await {
                Ok(reported) => {
                    let _ = self.apply_agent_machine(&reported);
                }
                Err(err) => {
                    tracing::warn!(machine = %row.id, error = %err, "cannot read machine state from its agent")
                }
            }
        }
    }
}
