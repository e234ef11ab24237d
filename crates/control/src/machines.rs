//! Machine lifecycle as the control plane drives it: create, start, stop, suspend,
//! restart, signal, update, destroy, leases, cordon, metadata, wait; and what agents
//! report back. Every operation checks the state machine (`states`), runs under the
//! machine's lock, and records its transitions and events in one store transaction each.

use std::time::Duration;

use aloft_api::internal::{AgentEvent, AgentMachine, CatalogUpdate, ImagePull, MachineSpec};
use aloft_api::{
    CreateMachineRequest, ImageRef, Lease, Machine, MachineConfig, MachineEvent,
    MachineExecRequest, MachineState, SignalRequest, StopRequest,
};
use http::StatusCode;
use tokio::sync::broadcast;

use crate::ControlPlane;
use crate::catalog::Published;
use crate::error::{ApiError, ApiResult};
use crate::hosts::AgentClient;
use crate::names;
use crate::states::{Operation, Plan, plan};
use crate::store::{
    AppRow, LeaseRow, MachineFilter, MachineRow, StoreError, now_millis, now_rfc3339, now_secs,
};
use aloft_api::token::constant_time_eq;
use std::sync::Arc;

const DEFAULT_LEASE_TTL: u64 = 30;
const MAX_LEASE_TTL: u64 = 24 * 3600;

/// Settings keys of the per-org limits (`aloft server --org-max-machines`,
/// `--org-max-memory-mb`); 0 means no limit.
pub const SETTING_ORG_MAX_MACHINES: &str = "limits.org_max_machines";
pub const SETTING_ORG_MAX_MEMORY_MB: &str = "limits.org_max_memory_mb";
pub const DEFAULT_ORG_MAX_MACHINES: u64 = 100;
pub const DEFAULT_ORG_MAX_MEMORY_MB: u64 = 64 * 1024;

/// The memory a machine with `config` gets (the default guest's when it names none).
fn memory_mb(config: &aloft_api::MachineConfig) -> u64 {
    config
        .guest
        .as_ref()
        .map(|g| g.memory_mb)
        .filter(|m| *m > 0)
        .unwrap_or(aloft_api::MachineGuest::default_shared().memory_mb)
        .into()
}

/// The machine states `GET …/wait` can wait for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitState {
    Started,
    Stopped,
    Suspended,
    Destroyed,
    /// Any persistent state (`fly machine wait`'s default).
    Settled,
}

impl WaitState {
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "" | "started" => Some(WaitState::Started),
            "stopped" => Some(WaitState::Stopped),
            "suspended" => Some(WaitState::Suspended),
            "destroyed" => Some(WaitState::Destroyed),
            "settled" => Some(WaitState::Settled),
            _ => None,
        }
    }

    fn reached(self, row: &MachineRow, instance_id: Option<&str>) -> bool {
        // An older version than the one asked about has been replaced: it is as stopped
        // (and destroyed) as it will ever be.
        if let Some(wanted) = instance_id
            && wanted != row.instance_id
            && matches!(self, WaitState::Stopped | WaitState::Destroyed)
        {
            return true;
        }
        let state = row.state;
        match self {
            WaitState::Started => state == MachineState::Started,
            WaitState::Stopped => matches!(
                state,
                MachineState::Stopped
                    | MachineState::Created
                    | MachineState::Destroyed
                    | MachineState::Failed
            ),
            WaitState::Suspended => state == MachineState::Suspended,
            WaitState::Destroyed => state == MachineState::Destroyed,
            WaitState::Settled => !crate::states::is_transient(state),
        }
    }
}

/// Whether a machine is destroyed once it stops: `auto_destroy`, except on the platform's
/// own one-off machines (release commands, machine checks, consoles), whose owner reads
/// their logs and exit before retiring them.
fn destroys_itself(config: &MachineConfig) -> bool {
    config.auto_destroy
        && !config
            .process_group()
            .is_some_and(|group| group.starts_with("fly_app_"))
}

/// Options of an update beyond the new config.
#[derive(Clone, Debug, Default)]
pub struct UpdateOptions {
    /// Leave the machine stopped after the update (`skip_launch`).
    pub skip_launch: bool,
    /// Start a machine that was stopped before the update (the API's behaviour; deploys
    /// leave stopped machines stopped).
    pub start_stopped: bool,
    pub skip_service_registration: Option<bool>,
}

pub fn user_event(
    kind: &str,
    status: MachineState,
    request: Option<serde_json::Value>,
) -> MachineEvent {
    MachineEvent {
        id: ulid::Ulid::new().to_string(),
        kind: kind.to_string(),
        status: status.as_str().to_string(),
        source: "user".to_string(),
        timestamp: now_millis(),
        request,
    }
}

fn lease_view(lease: &LeaseRow) -> Lease {
    Lease {
        nonce: lease.nonce.clone(),
        expires_at: lease.expires_at,
        owner: lease.owner.clone(),
        description: lease.description.clone(),
        version: lease.version.clone(),
    }
}

/// A machine's API view, serialized, and the row it came from.
pub struct CachedView {
    rev: i64,
    /// The check board's stamp of the machine's results when the view was made.
    checks: u64,
    /// The `host_status` the view shows (it changes without the row changing).
    host_status: &'static str,
    row: Arc<MachineRow>,
    json: bytes::Bytes,
}

impl ControlPlane {
    /// The machines of an app that pass `filter`, as the JSON array the API answers with.
    /// Serialized views are cached by the store revision of their row, so a listing reads
    /// only ids and revisions from the store and re-renders just the machines that changed
    /// (also when another control plane changed them: the revision is in the database) or
    /// whose check results changed.
    pub fn list_machine_views(
        &self,
        app: &AppRow,
        filter: &MachineFilter,
    ) -> ApiResult<bytes::Bytes> {
        let revisions = self.store.machine_revisions(
            &app.id,
            filter.include_destroyed,
            filter.region.as_deref(),
        )?;
        let board = &self.catalog.checks;
        let current =
            |views: &std::collections::HashMap<String, CachedView>, id: &String, rev: i64| {
                views.get(id).is_some_and(|v| {
                    v.rev == rev
                        && v.checks == board.stamp(id)
                        && v.host_status == self.host_probes.status(&v.row.host_id)
                })
            };
        let mut views = self.views.lock().unwrap_or_else(|p| p.into_inner());
        let missing = revisions
            .iter()
            .filter(|(id, rev)| !current(&views, id, *rev))
            .count();
        if missing > 0 {
            drop(views);
            let fresh: Vec<(MachineRow, i64)> = if missing > 64 {
                self.store.machines_with_revisions(&app.id)?
            } else {
                let mut rows = Vec::with_capacity(missing);
                let cached = self.views.lock().unwrap_or_else(|p| p.into_inner());
                let stale: Vec<String> = revisions
                    .iter()
                    .filter(|(id, rev)| !current(&cached, id, *rev))
                    .map(|(id, _)| id.clone())
                    .collect();
                drop(cached);
                for id in stale {
                    if let Some(found) = self.store.machine_with_revision(&id)? {
                        rows.push(found);
                    }
                }
                rows
            };
            let rendered: Vec<(String, CachedView)> = fresh
                .into_iter()
                .map(|(row, rev)| {
                    let checks = board.stamp(&row.id);
                    let host_status = self.host_probes.status(&row.host_id);
                    let json = bytes::Bytes::from(
                        serde_json::to_vec(&self.machine_view(&row)).unwrap_or_default(),
                    );
                    (
                        row.id.clone(),
                        CachedView {
                            rev,
                            checks,
                            host_status,
                            row: Arc::new(row),
                            json,
                        },
                    )
                })
                .collect();
            views = self.views.lock().unwrap_or_else(|p| p.into_inner());
            for (id, view) in rendered {
                if views.get(&id).is_none_or(|v| {
                    v.rev < view.rev || (v.rev == view.rev && v.checks <= view.checks)
                }) {
                    views.insert(id, view);
                }
            }
        }
        let mut body = Vec::with_capacity(revisions.len() * 1024 + 2);
        body.push(b'[');
        let mut first = true;
        for (id, _) in &revisions {
            let Some(view) = views.get(id) else { continue };
            let row = &view.row;
            if !filter.states.is_empty() && !filter.states.contains(&row.state) {
                continue;
            }
            if !filter
                .metadata
                .iter()
                .all(|(k, v)| row.config.metadata.get(k) == Some(v))
            {
                continue;
            }
            if !first {
                body.push(b',');
            }
            first = false;
            body.extend_from_slice(&view.json);
        }
        body.push(b']');
        Ok(bytes::Bytes::from(body))
    }

    /// The machine as the Machines API shows it.
    pub fn machine_view(&self, row: &MachineRow) -> Machine {
        Machine {
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
            events: row.recent_events.clone(),
            checks: self.machine_checks(&row.id),
            nonce: None,
            host_status: self.host_probes.status(&row.host_id).into(),
            cordoned: Some(row.cordoned),
            incomplete_config: None,
        }
    }

    pub(crate) fn reload(&self, id: &str) -> ApiResult<MachineRow> {
        self.store
            .machine(id)?
            .ok_or_else(|| ApiError::not_found(format!("machine not found: {id}")))
    }

    pub(crate) fn publish(&self, row: &MachineRow) {
        if row.state == MachineState::Destroyed {
            self.catalog.machine_removed(&row.id);
        } else {
            self.catalog.machine_changed(row);
        }
    }

    /// Moves the machine into `to` if it is still in the state `plan` saw, recording an
    /// event; a concurrent change in between is refused like the state machine would.
    fn enter(
        &self,
        row: &MachineRow,
        operation: Operation,
        to: MachineState,
        kind: &str,
    ) -> ApiResult<MachineRow> {
        let event = user_event(kind, to, None);
        match self
            .store
            .enter_state(&row.id, &[row.state], to, Some(&event))?
        {
            Some((_, row)) => {
                self.publish(&row);
                Ok(row)
            }
            None => {
                let current = self.reload(&row.id)?;
                plan(operation, current.state)?;
                Err(ApiError::conflict(format!(
                    "machine {} changed state while {kind} was requested; try again",
                    row.id
                )))
            }
        }
    }

    /// Checks that the caller may change the machine while a lease may be held: with no
    /// live lease anyone may; with one, only the request carrying its nonce.
    pub fn check_lease(&self, machine_id: &str, nonce: Option<&str>) -> ApiResult<()> {
        if let Some(lease) = self.store.lease(machine_id)?
            && lease.expires_at > now_secs()
            && !nonce.is_some_and(|n| constant_time_eq(n.as_bytes(), lease.nonce.as_bytes()))
        {
            return Err(ApiError::conflict(crate::store::lease_conflict(&lease)));
        }
        Ok(())
    }

    /// What `agent` (the machine's host's) is given; it pulls our registry's images with
    /// its own token.
    fn spec(&self, row: &MachineRow, app: &AppRow, agent: &AgentClient) -> MachineSpec {
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
                    agent.token().to_string()
                } else {
                    String::new()
                },
            },
            private_ip: row.private_ip.clone(),
        }
    }

    /// Applies an agent's answer about a machine; returns the machine as now stored.
    pub fn apply_agent_machine(&self, reported: &AgentMachine) -> ApiResult<MachineRow> {
        if let Some(row) = self.store.apply_agent_status(
            &reported.id,
            reported.seq,
            reported.state,
            reported.private_ipv4.as_deref(),
            None,
        )? {
            self.publish(&row);
            return Ok(row);
        }
        self.reload(&reported.id)
    }

    /// Events an agent delivers (in its sequence order, possibly again after a retry).
    /// Returns the machines these events stopped that are to be destroyed now
    /// (`auto_destroy`, as `machine run --rm` sets it).
    pub fn apply_agent_events(
        &self,
        host_id: &str,
        events: &[AgentEvent],
    ) -> ApiResult<Vec<String>> {
        let mut to_destroy: Vec<String> = Vec::new();
        let mut events: Vec<&AgentEvent> = events.iter().collect();
        events.sort_by_key(|e| e.seq);
        for event in events {
            if !self.store.advance_host_event_seq(host_id, event.seq)? {
                continue;
            }
            let Some(row) = self.store.machine(&event.machine_id)? else {
                continue;
            };
            if row.host_id != host_id {
                tracing::warn!(host = %host_id, machine = %row.id, placed_on = %row.host_id, "ignoring an event about a machine placed on another host");
                continue;
            }
            let request = event.exit.as_ref().map(|exit| {
                serde_json::json!({
                    "exit_event": exit,
                    "restart_count": event.restart_count.unwrap_or(0),
                    "message": event.message,
                })
            });
            let request = request.or_else(|| {
                event
                    .message
                    .as_ref()
                    .map(|m| serde_json::json!({ "message": m }))
            });
            let recorded = MachineEvent {
                id: ulid::Ulid::new().to_string(),
                kind: event.kind.clone(),
                status: event.state.as_str().to_string(),
                source: "flyd".to_string(),
                timestamp: event.timestamp,
                request,
            };
            if row.state == MachineState::Destroyed {
                self.store.insert_event(&row.id, &recorded)?;
                continue;
            }
            if let Some(row) = self.store.apply_agent_status(
                &row.id,
                event.seq,
                event.state,
                event.private_ipv4.as_deref(),
                Some(&recorded),
            )? {
                self.publish(&row);
                if row.state == MachineState::Stopped
                    && destroys_itself(&row.config)
                    && !to_destroy.contains(&row.id)
                {
                    to_destroy.push(row.id.clone());
                }
            }
        }
        Ok(to_destroy)
    }

    /// Destroys machines that stopped with `auto_destroy` set (in the background: the
    /// agent that reported the stop is waiting for its answer).
    pub fn destroy_stopped(self: &Arc<Self>, ids: Vec<String>) {
        for id in ids {
            let plane = self.clone();
            tokio::spawn(async move {
                let Ok(Some(row)) = plane.store.machine(&id) else {
                    return;
                };
                if row.state != MachineState::Stopped {
                    return;
                }
                tracing::info!(machine = %id, "destroying a machine that exited (auto_destroy)");
                if let Err(err) = plane.destroy_machine(&row, false).await {
                    tracing::warn!(machine = %id, error = %err.message, "auto-destroying a machine");
                }
            });
        }
    }

    /// The region a new machine goes to: the one asked for (a Fly region code, or a region
    /// some host is in) or this control plane's.
    fn wanted_region(
        &self,
        requested: Option<&str>,
        hosts: &[crate::store::HostRow],
    ) -> ApiResult<String> {
        match requested.map(str::trim).filter(|r| !r.is_empty()) {
            None => Ok(self.config.region.clone()),
            Some(region) => {
                let known = aloft_api::regions::find(region).is_some()
                    || hosts.iter().any(|h| h.region == region)
                    || region == self.config.region;
                if !known {
                    return Err(ApiError::bad_request(format!(
                        "invalid region: {region:?} is not a region code (see GET /v1/platform/regions)"
                    )));
                }
                Ok(region.to_string())
            }
        }
    }

    fn org_limit(&self, key: &str, default: u64) -> ApiResult<u64> {
        Ok(self
            .store
            .setting(key)?
            .and_then(|v| v.parse().ok())
            .unwrap_or(default))
    }

    /// Refuses (422, creating nothing) a machine with `config` that would take the org of
    /// `app` past its limits; `replacing` is the machine whose config it replaces.
    fn check_org_limits(
        &self,
        app: &AppRow,
        config: &aloft_api::MachineConfig,
        replacing: Option<&str>,
    ) -> ApiResult<()> {
        let max_machines = self.org_limit(SETTING_ORG_MAX_MACHINES, DEFAULT_ORG_MAX_MACHINES)?;
        let max_memory = self.org_limit(SETTING_ORG_MAX_MEMORY_MB, DEFAULT_ORG_MAX_MEMORY_MB)?;
        if max_machines == 0 && max_memory == 0 {
            return Ok(());
        }
        let mut machines = 0u64;
        let mut memory = memory_mb(config);
        for other in self.store.list_apps(Some(&app.org_id))? {
            for row in self.store.list_machines(&other.id, false)? {
                if Some(row.id.as_str()) == replacing {
                    continue;
                }
                machines += 1;
                memory = memory.saturating_add(memory_mb(&row.config));
            }
        }
        let org = &app.org_slug;
        let refuse =
            |message: String| Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, message));
        if replacing.is_none() && max_machines > 0 && machines + 1 > max_machines {
            return refuse(format!(
                "organization {org} has reached its limit of {max_machines} machines; destroy one, or ask the operator to raise --org-max-machines"
            ));
        }
        if max_memory > 0 && memory > max_memory {
            return refuse(format!(
                "organization {org} would use {memory} MB of memory, over its limit of {max_memory} MB; use smaller machines, or ask the operator to raise --org-max-memory-mb"
            ));
        }
        Ok(())
    }

    /// Creates (and unless `skip_launch`, starts) a machine. Returns it and, when the
    /// request asked for one, the lease nonce.
    pub async fn create_machine_with_lease(
        &self,
        app: &AppRow,
        request: CreateMachineRequest,
    ) -> ApiResult<(MachineRow, Option<Lease>)> {
        crate::validate::machine_config(&request.config)?;
        if let Some(name) = request.name.as_deref().filter(|n| !n.is_empty()) {
            crate::validate::machine_name(name)?;
        }
        if request
            .lease_ttl
            .is_some_and(|ttl| ttl == 0 || ttl > MAX_LEASE_TTL)
        {
            return Err(ApiError::bad_request(format!(
                "invalid lease_ttl: must be between 1 and {MAX_LEASE_TTL} seconds"
            )));
        }
        // One create at a time per org between the limit check and the insert.
        let org_lock = self.app_lock(&format!("org-limits:{}", app.org_id));
        let org_guard = org_lock.lock().await;
        self.check_org_limits(app, &request.config, None)?;
        let hosts = self.store.hosts()?;
        let volume = crate::volumes::volume_for_machine(
            self,
            app,
            &request.config,
            request.region.as_deref(),
        )?;
        let placement = match &volume {
            // The machine runs where its volume is.
            Some(volume) => {
                let host = hosts
                    .iter()
                    .find(|h| h.id == volume.host_id)
                    .cloned()
                    .ok_or_else(|| {
                        ApiError::unavailable(format!(
                            "the host of volume {} ({}) is not registered",
                            volume.id, volume.host_id
                        ))
                    })?;
                crate::hosts::Placement {
                    region: host.region.clone(),
                    host,
                }
            }
            None => {
                let wanted = self.wanted_region(request.region.as_deref(), &hosts)?;
                let loads = crate::hosts::loads(&self.store.all_live_machines()?, &app.id);
                crate::hosts::place_machine(
                    &hosts,
                    &loads,
                    &wanted,
                    crate::hosts::Need::of(&request.config),
                    crate::store::now_millis(),
                )?
            }
        };
        let now = now_rfc3339();
        let mut row = MachineRow {
            id: names::machine_id(),
            app_id: app.id.clone(),
            app_name: app.name.clone(),
            name: request
                .name
                .clone()
                .filter(|n| !n.is_empty())
                .unwrap_or_else(names::machine_name),
            region: placement.region.clone(),
            host_id: placement.host.id.clone(),
            state: MachineState::Created,
            instance_id: ulid::Ulid::new().to_string(),
            config: request.config.clone(),
            private_ip: None,
            private_ipv4: None,
            created_at: now.clone(),
            updated_at: now,
            cordoned: request.skip_service_registration,
            recent_events: vec![user_event("launch", MachineState::Created, None)],
        };
        let agent = self.agent(&row.host_id)?;
        let host_id = row.host_id.clone();
        row.private_ip = Some(self.store.insert_machine_allocating(&row, |c| {
            crate::ips::machine_private_ip_in(c, app, &host_id)
        })?);
        if let Some(volume) = &volume
            && let Err(err) = crate::volumes::attach(self, volume, &row.id)
        {
            self.store.delete_machine(&row.id)?;
            return Err(err);
        }
        drop(org_guard);
        if let Err(err) = agent.put(&self.spec(&row, app, &agent)).await {
            self.store.detach_volumes_of(&row.id)?;
            self.store.delete_machine(&row.id)?;
            self.forget_agent(&row.host_id);
            return Err(err);
        }
        let lease = match request.lease_ttl {
            Some(ttl) => {
                let wanted = LeaseRow {
                    machine_id: row.id.clone(),
                    nonce: names::random_id(16),
                    owner: String::new(),
                    description: String::new(),
                    expires_at: now_secs() + ttl as i64,
                    version: row.instance_id.clone(),
                };
                Some(lease_view(&self.store.acquire_lease(
                    &wanted,
                    None,
                    now_secs(),
                )?))
            }
            None => None,
        };
        self.publish(&row);
        if request.skip_launch {
            return Ok((row, lease));
        }
        let lock = self.machine_lock(&row.id);
        let _guard = lock.lock().await;
        let started = self.start_locked(&row).await?;
        Ok((started, lease))
    }

    pub async fn create_machine(
        &self,
        app: &AppRow,
        request: CreateMachineRequest,
    ) -> ApiResult<MachineRow> {
        self.create_machine_with_lease(app, request)
            .await
            .map(|(row, _)| row)
    }

    pub async fn start_machine(&self, row: &MachineRow) -> ApiResult<MachineRow> {
        let lock = self.machine_lock(&row.id);
        let _guard = lock.lock().await;
        let row = self.reload(&row.id)?;
        self.start_locked(&row).await
    }

    async fn start_locked(&self, row: &MachineRow) -> ApiResult<MachineRow> {
        let Plan::Proceed { transient } = plan(Operation::Start, row.state)? else {
            return Ok(row.clone());
        };
        let row = self.enter(row, Operation::Start, transient, "start")?;
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
        let lock = self.machine_lock(&row.id);
        let _guard = lock.lock().await;
        let row = self.reload(&row.id)?;
        self.stop_locked(&row, request).await
    }

    async fn stop_locked(&self, row: &MachineRow, request: &StopRequest) -> ApiResult<MachineRow> {
        let Plan::Proceed { transient } = plan(Operation::Stop, row.state)? else {
            return Ok(row.clone());
        };
        let row = self.enter(row, Operation::Stop, transient, "stop")?;
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

    pub async fn suspend_machine(&self, row: &MachineRow) -> ApiResult<MachineRow> {
        let lock = self.machine_lock(&row.id);
        let _guard = lock.lock().await;
        let row = self.reload(&row.id)?;
        let Plan::Proceed { transient } = plan(Operation::Suspend, row.state)? else {
            return Ok(row);
        };
        let row = self.enter(&row, Operation::Suspend, transient, "suspend")?;
        let agent = self.agent(&row.host_id)?;
        match agent.suspend(&row.id).await {
            Ok(reported) => self.apply_agent_machine(&reported),
            Err(err) => {
                self.resync(&row).await;
                Err(err)
            }
        }
    }

    /// Restarts a running machine in place on its host (stop with the request's signal and
    /// timeout, then start from a fresh root filesystem).
    pub async fn restart_machine(
        &self,
        row: &MachineRow,
        request: &StopRequest,
    ) -> ApiResult<MachineRow> {
        let lock = self.machine_lock(&row.id);
        let _guard = lock.lock().await;
        let row = self.reload(&row.id)?;
        plan(Operation::Restart, row.state)?;
        let agent = self.agent(&row.host_id)?;
        match agent.restart(&row.id, request).await {
            Ok(reported) => {
                self.store
                    .insert_event(&row.id, &user_event("restart", reported.state, None))?;
                self.apply_agent_machine(&reported)
            }
            Err(err) => {
                self.resync(&row).await;
                Err(err)
            }
        }
    }

    pub async fn signal_machine(&self, row: &MachineRow, request: &SignalRequest) -> ApiResult<()> {
        plan(Operation::Signal, row.state)?;
        let agent = self.agent(&row.host_id)?;
        agent.signal(&row.id, request).await?;
        self.store.insert_event(
            &row.id,
            &user_event(
                "signal",
                row.state,
                Some(serde_json::json!({ "signal": request.signal })),
            ),
        )?;
        Ok(())
    }

    pub async fn machine_processes(
        &self,
        row: &MachineRow,
    ) -> ApiResult<Vec<aloft_api::ProcessStat>> {
        plan(Operation::Inspect, row.state)?;
        self.agent(&row.host_id)?.ps(&row.id).await
    }

    pub async fn exec_machine(
        &self,
        row: &MachineRow,
        request: &MachineExecRequest,
    ) -> ApiResult<aloft_api::ExecResponse> {
        plan(Operation::Inspect, row.state)?;
        self.agent(&row.host_id)?.exec(&row.id, request).await
    }

    /// Replaces a machine's config: a new version, restarted if it was running (deploys).
    pub async fn update_machine(
        &self,
        app: &AppRow,
        row: &MachineRow,
        config: MachineConfig,
    ) -> ApiResult<MachineRow> {
        self.update_machine_with(app, row, config, UpdateOptions::default())
            .await
    }

    pub async fn update_machine_with(
        &self,
        app: &AppRow,
        row: &MachineRow,
        mut config: MachineConfig,
        options: UpdateOptions,
    ) -> ApiResult<MachineRow> {
        crate::validate::machine_config(&config)?;
        let lock = self.machine_lock(&row.id);
        let _guard = lock.lock().await;
        let row = self.reload(&row.id)?;
        plan(Operation::Update, row.state)?;
        crate::volumes::keep_volume(&row.config, &mut config, &row.id)?;
        self.check_org_limits(app, &config, Some(&row.id))?;
        let was_running = matches!(row.state, MachineState::Started);
        let before = row.state;
        let row = if was_running {
            self.stop_locked(&row, &StopRequest::default()).await?
        } else {
            row
        };
        let Plan::Proceed { transient } = plan(Operation::Update, row.state)? else {
            return Ok(row);
        };
        let replacing = self.enter(&row, Operation::Update, transient, "update")?;
        let instance_id = ulid::Ulid::new().to_string();
        let settled = match row.state {
            MachineState::Created | MachineState::Failed => MachineState::Created,
            MachineState::Suspended | MachineState::Stopped | MachineState::Started => {
                MachineState::Stopped
            }
            other => other,
        };
        self.store
            .update_machine_config(&row.id, &instance_id, &config, settled, None)?;
        if config.mounts.is_empty() && !row.config.mounts.is_empty() {
            self.store.detach_volumes_of(&row.id)?;
        }
        if let Some(cordoned) = options.skip_service_registration {
            self.store.set_machine_cordoned(&row.id, cordoned)?;
        }
        let updated = self.reload(&replacing.id)?;
        let agent = self.agent(&updated.host_id)?;
        if let Err(err) = agent.put(&self.spec(&updated, app, &agent)).await {
            self.resync(&updated).await;
            return Err(err);
        }
        self.publish(&updated);
        let start = !options.skip_launch
            && (was_running
                || matches!(before, MachineState::Created | MachineState::Failed)
                || options.start_stopped);
        if start {
            return self.start_locked(&updated).await;
        }
        Ok(updated)
    }

    /// A machine the store shows between two states takes the state its agent reports:
    /// for one left so by an operation of a control plane that stopped mid-way (after a
    /// restart nothing finishes it).
    pub async fn settle_from_agent(&self, row: &MachineRow) {
        let lock = self.machine_lock(&row.id);
        let _guard = lock.lock().await;
        let Ok(row) = self.reload(&row.id) else {
            return;
        };
        if matches!(
            row.state,
            MachineState::Starting
                | MachineState::Stopping
                | MachineState::Replacing
                | MachineState::Destroying
                | MachineState::Suspending
        ) {
            tracing::info!(machine = %row.id, state = %row.state, "taking the agent's state for a machine an interrupted operation left between two states");
            self.resync(&row).await;
        }
    }

    /// Gives a stopped machine's agent the config (and instance) the store has for it,
    /// without a new version: for an update that a restart of the control plane cut short
    /// after the store took the new config and before the agent had it.
    pub async fn push_stored_config(
        &self,
        app: &AppRow,
        row: &MachineRow,
    ) -> ApiResult<MachineRow> {
        let lock = self.machine_lock(&row.id);
        let _guard = lock.lock().await;
        let row = self.reload(&row.id)?;
        if !matches!(row.state, MachineState::Stopped | MachineState::Created) {
            return Err(ApiError::conflict(format!(
                "machine {} is {}; only a stopped machine gets its stored config again",
                row.id, row.state
            )));
        }
        let agent = self.agent(&row.host_id)?;
        if let Err(err) = agent.put(&self.spec(&row, app, &agent)).await {
            self.resync(&row).await;
            return Err(err);
        }
        let row = self.reload(&row.id)?;
        self.publish(&row);
        Ok(row)
    }

    pub async fn destroy_machine(&self, row: &MachineRow, force: bool) -> ApiResult<()> {
        let lock = self.machine_lock(&row.id);
        let _guard = lock.lock().await;
        let row = self.reload(&row.id)?;
        let Plan::Proceed { transient } = plan(Operation::Destroy { force }, row.state)? else {
            return Ok(());
        };
        let row = self.enter(&row, Operation::Destroy { force }, transient, "destroy")?;
        let agent = self.agent(&row.host_id)?;
        if let Err(err) = agent.destroy(&row.id).await
            && err.status != StatusCode::NOT_FOUND
        {
            self.resync(&row).await;
            return Err(err);
        }
        // The agent destroyed it: whatever state its reports moved the machine to while
        // that ran (stopped, as its process ended), it is destroyed now.
        self.record_destroyed(&row.id, None)?;
        self.store.detach_volumes_of(&row.id)?;
        self.publish(&self.reload(&row.id)?);
        self.forget_machine_lock(&row.id);
        Ok(())
    }

    /// Records machine `id` destroyed, from whatever state it is in, with the destroy
    /// event (carrying `note`), and lets go of its lease.
    pub(crate) fn record_destroyed(
        &self,
        id: &str,
        note: Option<serde_json::Value>,
    ) -> ApiResult<()> {
        let not_destroyed: Vec<MachineState> = MachineState::ALL
            .into_iter()
            .filter(|s| *s != MachineState::Destroyed)
            .collect();
        self.store.transition(
            id,
            &not_destroyed,
            MachineState::Destroyed,
            Some(&user_event("destroy", MachineState::Destroyed, note)),
        )?;
        let _ = self.store.release_lease(id, "", i64::MAX);
        Ok(())
    }

    pub fn set_cordoned(&self, row: &MachineRow, cordoned: bool) -> ApiResult<MachineRow> {
        plan(Operation::Annotate, row.state)?;
        self.store.set_machine_cordoned(&row.id, cordoned)?;
        self.store.insert_event(
            &row.id,
            &user_event(
                if cordoned { "cordon" } else { "uncordon" },
                row.state,
                None,
            ),
        )?;
        let row = self.reload(&row.id)?;
        self.publish(&row);
        Ok(row)
    }

    pub fn set_metadata(&self, row: &MachineRow, key: &str, value: Option<&str>) -> ApiResult<()> {
        plan(Operation::Annotate, row.state)?;
        crate::validate::metadata_key(key)?;
        if let Some(value) = value {
            crate::validate::metadata_value(value)?;
        }
        self.store.set_machine_metadata(&row.id, key, value)?;
        self.publish(&self.reload(&row.id)?);
        Ok(())
    }

    pub fn acquire_lease(
        &self,
        row: &MachineRow,
        ttl: Option<u64>,
        description: Option<String>,
        nonce: Option<&str>,
        owner: &str,
    ) -> ApiResult<Lease> {
        plan(Operation::Annotate, row.state)?;
        let ttl = ttl.unwrap_or(DEFAULT_LEASE_TTL);
        if ttl == 0 || ttl > MAX_LEASE_TTL {
            return Err(ApiError::bad_request(format!(
                "invalid ttl: must be between 1 and {MAX_LEASE_TTL} seconds"
            )));
        }
        let now = now_secs();
        let wanted = LeaseRow {
            machine_id: row.id.clone(),
            nonce: names::random_id(16),
            owner: owner.to_string(),
            description: description.unwrap_or_default(),
            expires_at: now + ttl as i64,
            version: row.instance_id.clone(),
        };
        match self.store.acquire_lease(&wanted, nonce, now) {
            Ok(lease) => Ok(lease_view(&lease)),
            Err(StoreError::Conflict(message)) => Err(ApiError::conflict(message)),
            Err(other) => Err(other.into()),
        }
    }

    pub fn current_lease(&self, row: &MachineRow) -> ApiResult<Lease> {
        match self.store.lease(&row.id)? {
            Some(lease) if lease.expires_at > now_secs() => Ok(lease_view(&lease)),
            _ => Err(ApiError::not_found(format!(
                "machine {} has no active lease",
                row.id
            ))),
        }
    }

    pub fn release_lease(&self, row: &MachineRow, nonce: Option<&str>) -> ApiResult<()> {
        let Some(nonce) = nonce.filter(|n| !n.is_empty()) else {
            return Err(ApiError::bad_request(
                "releasing a lease needs its nonce in the fly-machine-lease-nonce header",
            ));
        };
        match self.store.release_lease(&row.id, nonce, now_secs()) {
            Ok(true) => Ok(()),
            Ok(false) => Err(ApiError::not_found(format!(
                "machine {} has no lease",
                row.id
            ))),
            Err(StoreError::Conflict(message)) => Err(ApiError::conflict(message)),
            Err(other) => Err(other.into()),
        }
    }

    /// Waits until the machine reaches `wanted` (or `timeout` passes: 408).
    pub async fn wait_for(
        &self,
        id: &str,
        wanted: WaitState,
        instance_id: Option<&str>,
        timeout: Duration,
    ) -> ApiResult<MachineRow> {
        let mut changes = self.catalog.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let row = self.reload(id)?;
            if wanted.reached(&row, instance_id) {
                return Ok(row);
            }
            loop {
                match tokio::time::timeout_at(deadline, changes.recv()).await {
                    Err(_) => {
                        return Err(ApiError::new(
                            StatusCode::REQUEST_TIMEOUT,
                            format!(
                                "deadline_exceeded: machine {id} is {} after waiting {}s",
                                row.state,
                                timeout.as_secs()
                            ),
                        ));
                    }
                    Ok(Ok(Published {
                        update: CatalogUpdate::Machine { machine, .. },
                        ..
                    })) if machine.id == id => break,
                    Ok(Ok(Published {
                        update: CatalogUpdate::MachineRemoved { id: removed, .. },
                        ..
                    })) if removed == id => break,
                    Ok(Ok(_)) => continue,
                    Ok(Err(broadcast::error::RecvError::Lagged(_))) => break,
                    Ok(Err(broadcast::error::RecvError::Closed)) => {
                        return Err(ApiError::unavailable("the control plane is shutting down"));
                    }
                }
            }
        }
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
                    if self.apply_agent_machine(&reported).is_ok() {
                        // The agent's view wins even when its sequence number is not newer:
                        // the control plane moved the state itself in between.
                        let _ = self.store.set_machine_state(&row.id, reported.state);
                        if let Ok(row) = self.reload(&row.id) {
                            self.publish(&row);
                        }
                    }
                }
                Err(err) => {
                    tracing::warn!(machine = %row.id, error = %err, "cannot read machine state from its agent")
                }
            }
        }
    }
}
