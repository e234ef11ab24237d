//! Server-side deploys: a parsed fly.toml plus an image become a release and one machine
//! config per process group, rolled out here with the chosen strategy (rolling, immediate,
//! canary, bluegreen), so a deploy goes on whatever the client does. The client watches an
//! NDJSON stream of [`DeployEvent`]s; other clients can join it by the deploy's id.
//!
//! Every strategy keeps new machines out of routing until they are healthy and drains
//! machines before they stop, so the proxies only ever route to started, healthy machines.
//! A machine that exits or fails a check stops the deploy at once; the machines it had
//! already changed go back to their previous config, so the previous release keeps serving.
//!
//! A deploy is run by the control plane that holds its lease in the store (see
//! [`crate::store::Store::claim_deploy`]): the one that started it, renewing it as it goes;
//! after a restart, the same control plane at once; when its holder stops renewing, any
//! control plane sharing the database, once the lease expires.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aloft_api::internal::{DeployEvent, DeployFailure, DeployOperation, DeployRequest, ExitStatus};
use aloft_api::{
    MachineConfig, MachineInit, MachineRestart, MachineState, RestartPolicy, StopRequest, regions,
};
use aloft_config::{AppConfig, MachineConfigOptions, RELEASE_COMMAND_GROUP, Severity};
use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use futures_util::future::join_all;
use http::header;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::ControlPlane;
use crate::api::{JsonBody, visible_app};
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::hosts::place;

/// flyctl's `DefaultVolumeInitialSizeGB`.
const DEFAULT_VOLUME_INITIAL_SIZE_GB: u64 = 1;
use crate::rollout::{self, MachineFailure, group_of};
use crate::store::{AppRow, DeployRow, MachineRow, Store, StoreError, now_rfc3339};

const DEFAULT_WAIT_TIMEOUT: Duration = Duration::from_secs(5 * 60);
const DEFAULT_RELEASE_COMMAND_TIMEOUT: Duration = Duration::from_secs(5 * 60);
const DEFAULT_MAX_UNAVAILABLE: f64 = 0.33;
/// Finished operations kept in memory (and finished deploys kept in the store, per app) so a
/// client can still read how they ended.
const KEPT_OPERATIONS: usize = 64;
/// How long a control plane's hold on a deploy lasts unless renewed; it is renewed every
/// third of that while the deploy runs, and another control plane may take the deploy
/// over once it has run out.
pub const DEPLOY_LEASE: Duration = Duration::from_secs(30);

/// The description of the releases that roll secrets out (`aloft secrets set|deploy`).
pub const SECRETS_DESCRIPTION: &str = "secrets";

pub const STRATEGIES: [&str; 4] = ["rolling", "immediate", "canary", "bluegreen"];

pub fn routes() -> Router<Arc<ControlPlane>> {
    Router::new()
        .route(
            "/v1/apps/{app}/deploys",
            post(start_deploy).get(list_deploys),
        )
        .route("/v1/apps/{app}/deploys/{id}", get(watch_deploy))
        .merge(crate::releases::routes())
        .merge(crate::scale::routes())
}

// ---- operations: deploys (and scalings) in progress, with their event log ----

/// Recent deploys and scalings, by id.
#[derive(Default)]
pub struct Deploys {
    recent: Mutex<VecDeque<Arc<Operation>>>,
    /// Deploys this process runs (it holds their leases).
    running: Mutex<HashSet<String>>,
}

/// One server-side operation and everything it has reported so far.
pub struct Operation {
    pub id: String,
    pub app: String,
    events: Mutex<Vec<DeployEvent>>,
    sender: broadcast::Sender<DeployEvent>,
    finished: AtomicBool,
    /// Where a deploy's events are kept (scalings are kept in memory only).
    store: Option<Arc<Store>>,
    /// Events already in the store (they are numbered from 0).
    stored: AtomicU64,
}

impl Deploys {
    pub fn begin(&self, app: &str) -> Arc<Operation> {
        self.remember(Operation::new(
            ulid::Ulid::new().to_string().to_lowercase(),
            app,
            Vec::new(),
            None,
        ))
    }

    /// A deploy, recorded in the store with its request so it outlives this process, and
    /// held by `owner` (this control plane): run it with [`run_held`].
    pub fn begin_deploy(
        &self,
        store: &Arc<Store>,
        owner: &str,
        app: &AppRow,
        request: &DeployRequest,
        user: &str,
    ) -> Result<Arc<Operation>, StoreError> {
        store.prune_deploys(&app.id, KEPT_OPERATIONS)?;
        let id = ulid::Ulid::new().to_string().to_lowercase();
        let now = now_rfc3339();
        // Running here from before its row exists, so the takeover of abandoned deploys
        // never picks it up as one.
        self.mark_running(&id);
        let inserted = store.insert_deploy(&DeployRow {
            id: id.clone(),
            app_id: app.id.clone(),
            status: "running".into(),
            request: serde_json::to_string(request)
                .map_err(|e| StoreError::Corrupt(format!("encoding a deploy request: {e}")))?,
            user: user.to_string(),
            release_id: String::new(),
            progress: "{}".into(),
            created_at: now.clone(),
            updated_at: now,
            lease_owner: owner.to_string(),
            lease_expires_at: lease_end(),
        });
        if let Err(err) = inserted {
            self.stop_running(&id);
            return Err(err);
        }
        Ok(self.remember(Operation::new(
            id,
            &app.name,
            Vec::new(),
            Some(store.clone()),
        )))
    }

    /// A deploy recorded in the store, with the events it reported before.
    fn adopt(&self, store: &Arc<Store>, row: &DeployRow, app: &str) -> Arc<Operation> {
        if let Some(known) = self.get(&row.id) {
            return known;
        }
        let past = store
            .deploy_events(&row.id)
            .unwrap_or_default()
            .iter()
            .filter_map(|e| serde_json::from_str(e).ok())
            .collect();
        self.remember(Operation::new(
            row.id.clone(),
            app,
            past,
            Some(store.clone()),
        ))
    }

    /// Whether this process runs deploy `id`, and if not, marks it as run here.
    fn mark_running(&self, id: &str) -> bool {
        !self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_string())
    }

    /// Whether this process runs deploy `id`.
    fn runs(&self, id: &str) -> bool {
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(id)
    }

    fn stop_running(&self, id: &str) {
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }

    /// Forgets an operation, so the next reader takes it from the store.
    fn forget(&self, id: &str) {
        self.recent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|o| o.id != id);
    }

    fn remember(&self, operation: Arc<Operation>) -> Arc<Operation> {
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if recent.len() >= KEPT_OPERATIONS
            && let Some(position) = recent
                .iter()
                .position(|o| o.finished.load(Ordering::SeqCst))
        {
            recent.remove(position);
        }
        recent.push_back(operation.clone());
        operation
    }

    pub fn get(&self, id: &str) -> Option<Arc<Operation>> {
        self.recent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|o| o.id == id)
            .cloned()
    }
}

fn is_terminal(event: &DeployEvent) -> bool {
    matches!(event, DeployEvent::Done { .. } | DeployEvent::Error { .. })
}

impl Operation {
    fn new(id: String, app: &str, past: Vec<DeployEvent>, store: Option<Arc<Store>>) -> Arc<Self> {
        let (sender, _) = broadcast::channel(1024);
        Arc::new(Operation {
            id,
            app: app.to_string(),
            finished: AtomicBool::new(past.iter().any(is_terminal)),
            stored: AtomicU64::new(past.len() as u64),
            events: Mutex::new(past),
            sender,
            store,
        })
    }

    pub fn is_finished(&self) -> bool {
        self.finished.load(Ordering::SeqCst)
    }

    /// Ends the stream of those watching it here, without recording anything: this
    /// control plane no longer runs the deploy, another one goes on with it.
    fn abandon(&self, message: String) {
        let event = DeployEvent::Error {
            message,
            failure: None,
        };
        let mut events = self.events.lock().unwrap_or_else(|p| p.into_inner());
        self.finished.store(true, Ordering::SeqCst);
        events.push(event.clone());
        let _ = self.sender.send(event);
    }

    pub fn emit(&self, event: DeployEvent) {
        let mut events = self.events.lock().unwrap_or_else(|p| p.into_inner());
        if is_terminal(&event) {
            self.finished.store(true, Ordering::SeqCst);
        }
        if let Some(store) = &self.store {
            let seq = self.stored.fetch_add(1, Ordering::SeqCst);
            let line = serde_json::to_string(&event).unwrap_or_default();
            if let Err(err) = store.append_deploy_event(&self.id, seq, &line) {
                tracing::warn!(deploy = %self.id, error = %err, "recording a deploy event");
            }
            let status = match &event {
                DeployEvent::Done { .. } => Some("complete"),
                DeployEvent::Error { .. } => Some("failed"),
                _ => None,
            };
            if let Some(status) = status
                && let Err(err) = store.set_deploy_status(&self.id, status)
            {
                tracing::warn!(deploy = %self.id, error = %err, "recording how a deploy ended");
            }
        }
        events.push(event.clone());
        // Nobody may be watching: the operation goes on regardless.
        let _ = self.sender.send(event);
    }

    /// Everything reported so far, then what comes, up to and including the final event.
    pub fn stream(self: &Arc<Self>) -> Body {
        let (past, receiver) = {
            let events = self.events.lock().unwrap_or_else(|p| p.into_inner());
            (events.clone(), self.sender.subscribe())
        };
        let done = past.iter().any(is_terminal);
        let replay = futures_util::stream::iter(
            past.into_iter()
                .map(|e| Ok::<_, std::convert::Infallible>(ndjson(&e))),
        );
        let live =
            futures_util::stream::unfold((receiver, done), |(mut receiver, done)| async move {
                if done {
                    return None;
                }
                loop {
                    match receiver.recv().await {
                        Ok(event) => {
                            let last = is_terminal(&event);
                            return Some((Ok(ndjson(&event)), (receiver, last)));
                        }
                        Err(broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(broadcast::error::RecvError::Closed) => return None,
                    }
                }
            });
        use futures_util::StreamExt;
        Body::from_stream(replay.chain(live))
    }
}

/// A deploy's events as they are recorded in the store (by whichever control plane runs
/// it), up to and including the final one, or until it is no longer running.
fn recorded_events(
    store: Arc<Store>,
    id: String,
) -> impl futures_util::Stream<Item = Result<Bytes, std::convert::Infallible>> {
    futures_util::stream::unfold(
        (store, id, 0u64, false),
        |(store, id, next, done)| async move {
            if done {
                return None;
            }
            loop {
                let lines = store.deploy_events_since(&id, next).unwrap_or_default();
                if !lines.is_empty() {
                    let mut chunk = Vec::new();
                    let mut read = next;
                    let mut last = false;
                    for line in &lines {
                        chunk.extend_from_slice(line.as_bytes());
                        chunk.push(b'\n');
                        read += 1;
                        if serde_json::from_str::<DeployEvent>(line).is_ok_and(|e| is_terminal(&e))
                        {
                            last = true;
                            break;
                        }
                    }
                    return Some((Ok(Bytes::from(chunk)), (store, id, read, last)));
                }
                match store.deploy(&id) {
                    Ok(Some(row)) if row.status == "running" => {}
                    // Ended without a final event in the log, or gone.
                    _ => return None,
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        },
    )
}

fn ndjson(event: &DeployEvent) -> Bytes {
    let mut line = serde_json::to_vec(event).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

/// Reports an operation's progress.
#[derive(Clone)]
pub struct Progress {
    operation: Arc<Operation>,
}

impl Progress {
    pub fn new(operation: Arc<Operation>) -> Self {
        Self { operation }
    }
    pub async fn say(&self, message: impl Into<String>) {
        self.operation.emit(DeployEvent::Progress {
            message: message.into(),
        });
    }
    pub async fn warn(&self, message: impl Into<String>) {
        self.operation.emit(DeployEvent::Warning {
            message: message.into(),
        });
    }
    pub async fn log(&self, machine_id: &str, line: &str) {
        self.operation.emit(DeployEvent::Log {
            machine_id: machine_id.to_string(),
            line: line.to_string(),
        });
    }
    pub fn emit(&self, event: DeployEvent) {
        self.operation.emit(event);
    }
    /// The record of a deploy kept in the store (none for scalings).
    fn recorder(&self) -> Option<Arc<Recorder>> {
        let store = self.operation.store.clone()?;
        Some(Arc::new(Recorder {
            store,
            id: self.operation.id.clone(),
            record: Mutex::new(Record::default()),
        }))
    }
}

// ---- the record of a deploy's progress, so a restarted server resumes it ----

const PHASE_RELEASE: &str = "release";
const PHASE_ROLLOUT: &str = "rollout";

/// How far a deploy got, kept in the store as it goes.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Record {
    #[serde(default)]
    pub strategy: String,
    /// Where new machines go.
    #[serde(default)]
    pub region: String,
    /// `release` (release command and machine checks) or `rollout`.
    #[serde(default)]
    pub phase: String,
    /// Machines this deploy finished: on the new release, started if they should run,
    /// healthy and routed.
    #[serde(default)]
    pub done: Vec<String>,
    /// Machines that have a healthy replacement and are to be destroyed.
    #[serde(default)]
    pub retiring: Vec<String>,
    /// Machines updated in place, with what to put back if the deploy fails.
    #[serde(default)]
    pub touched: Vec<Touched>,
}

pub struct Recorder {
    store: Arc<Store>,
    id: String,
    record: Mutex<Record>,
}

impl Recorder {
    fn snapshot(&self) -> Record {
        self.record
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn change(&self, change: impl FnOnce(&mut Record)) {
        let mut record = self.record.lock().unwrap_or_else(|p| p.into_inner());
        change(&mut record);
        let text = serde_json::to_string(&*record).unwrap_or_default();
        if let Err(err) = self.store.set_deploy_progress(&self.id, &text) {
            tracing::warn!(deploy = %self.id, error = %err, "recording a deploy's progress");
        }
    }
}

pub fn ndjson_response(operation: &Arc<Operation>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        operation.stream(),
    )
        .into_response()
}

type Plane = State<Arc<ControlPlane>>;

async fn start_deploy(
    State(plane): Plane,
    caller: Caller,
    Path(name): Path<String>,
    JsonBody(request): JsonBody<DeployRequest>,
) -> ApiResult<Response> {
    let app = visible_app(&plane, &caller, &name)?;
    caller.require_write()?;
    let user = plane
        .store
        .token(&caller.token_id)?
        .map(|t| t.name)
        .unwrap_or_default();
    let operation =
        plane
            .deploys
            .begin_deploy(&plane.store, &plane.node_id, &app, &request, &user)?;
    operation.emit(DeployEvent::Started {
        deploy_id: operation.id.clone(),
    });
    let response = ndjson_response(&operation);
    let work = run(
        plane.clone(),
        app,
        request,
        caller,
        user,
        Progress::new(operation.clone()),
    );
    tokio::spawn(run_held(plane, operation, work));
    Ok(response)
}

async fn watch_deploy(
    State(plane): Plane,
    caller: Caller,
    Path((name, id)): Path<(String, String)>,
) -> ApiResult<Response> {
    let app = visible_app(&plane, &caller, &name)?;
    if let Some(operation) = plane.deploys.get(&id) {
        if operation.app == app.name {
            return Ok(ndjson_response(&operation));
        }
    } else if let Some(row) = plane.store.deploy(&id)?
        && row.app_id == app.id
    {
        if row.status == "running" && !plane.deploys.runs(&id) {
            // Another control plane runs it: its events as that one records them.
            return Ok((
                [(header::CONTENT_TYPE, "application/x-ndjson")],
                Body::from_stream(recorded_events(plane.store.clone(), id)),
            )
                .into_response());
        }
        // Older than what is kept in memory: its recorded events.
        return Ok(ndjson_response(&plane.deploys.adopt(
            &plane.store,
            &row,
            &app.name,
        )));
    }
    Err(ApiError::not_found(format!(
        "deploy {id} not found for app {}",
        app.name
    )))
}

/// The app's recent deploys, newest first (`aloft deploy --resume` and `aloft status`).
async fn list_deploys(
    State(plane): Plane,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<axum::Json<Vec<DeployOperation>>> {
    let app = visible_app(&plane, &caller, &name)?;
    let mut list = Vec::new();
    for row in plane.store.deploys_of_app(&app.id, 20)? {
        let record: Record = serde_json::from_str(&row.progress).unwrap_or_default();
        let release_version = match row.release_id.as_str() {
            "" => None,
            id => plane.store.release(id)?.map(|r| r.version),
        };
        list.push(DeployOperation {
            id: row.id,
            status: row.status,
            release_version,
            strategy: record.strategy,
            user: row.user,
            created_at: row.created_at,
            updated_at: row.updated_at,
        });
    }
    Ok(axum::Json(list))
}

// ---- the deploy ----

/// Why a deploy stopped.
#[derive(Debug)]
pub struct DeployError {
    pub message: String,
    pub failure: Option<Box<DeployFailure>>,
}

impl From<ApiError> for DeployError {
    fn from(err: ApiError) -> Self {
        Self {
            message: err.message,
            failure: None,
        }
    }
}

impl From<StoreError> for DeployError {
    fn from(err: StoreError) -> Self {
        ApiError::from(err).into()
    }
}

impl From<MachineFailure> for DeployError {
    fn from(failure: MachineFailure) -> Self {
        let failure_detail =
            (!failure.failure.machine_id.is_empty()).then(|| Box::new(failure.failure));
        Self {
            message: failure.message,
            failure: failure_detail,
        }
    }
}

fn bad(message: impl Into<String>) -> DeployError {
    DeployError {
        message: message.into(),
        failure: None,
    }
}

/// Runs a deploy to completion, one per app at a time.
pub async fn run(
    plane: Arc<ControlPlane>,
    app: AppRow,
    request: DeployRequest,
    caller: Caller,
    user: String,
    progress: Progress,
) {
    let lock = plane.app_lock(&app.name);
    let _guard = match lock.clone().try_lock_owned() {
        Ok(guard) => guard,
        Err(_) => {
            progress
                .say(format!(
                    "Waiting for the deploy or scaling of {} in progress to finish",
                    app.name
                ))
                .await;
            lock.lock_owned().await
        }
    };
    let deployer = Deployer {
        plane: &plane,
        app: &app,
        progress: &progress,
        record: progress.recorder(),
    };
    let result = deployer.deploy(&request, &caller, &user).await;
    report(&plane, &app, &progress, result);
}

fn report(
    plane: &ControlPlane,
    app: &AppRow,
    progress: &Progress,
    result: Result<u64, DeployError>,
) {
    match result {
        Ok(version) => progress.emit(DeployEvent::Done {
            release_version: version,
            url: Some(plane.app_url(&app.name)),
        }),
        Err(err) => progress.emit(DeployEvent::Error {
            message: err.message,
            failure: err.failure.map(|f| *f),
        }),
    }
}

/// When a lease taken now ends.
fn lease_end() -> i64 {
    crate::store::now_millis() + DEPLOY_LEASE.as_millis() as i64
}

/// Runs a deploy this control plane holds the lease of, renewing the lease as it goes.
/// Should the lease be lost (the store refused the renewal, or could not be reached until
/// the lease ran out), the work stops where it is: another control plane takes the
/// deploy over from its record.
pub async fn run_held(
    plane: Arc<ControlPlane>,
    operation: Arc<Operation>,
    work: impl Future<Output = ()>,
) {
    let id = operation.id.clone();
    let keeper = async {
        let mut held_until = tokio::time::Instant::now() + DEPLOY_LEASE;
        loop {
            tokio::time::sleep(DEPLOY_LEASE / 3).await;
            let asked = tokio::time::Instant::now();
            match plane
                .store
                .renew_deploy_lease(&id, &plane.node_id, lease_end())
            {
                Ok(true) => held_until = asked + DEPLOY_LEASE,
                Ok(false) => return "another control plane took the deploy over".to_string(),
                Err(err) => {
                    tracing::warn!(deploy = %id, error = %err, "renewing a deploy's lease");
                    if tokio::time::Instant::now() >= held_until {
                        return format!(
                            "its lease ran out while the database was unreachable ({err})"
                        );
                    }
                }
            }
        }
    };
    tokio::select! {
        () = work => {}
        reason = keeper => {
            tracing::warn!(deploy = %id, app = %operation.app, %reason, "this control plane stopped running a deploy");
            operation.abandon(format!(
                "this control plane stopped running deploy {id}: {reason}; it goes on there: follow it with `aloft deploy --resume -a {}`",
                operation.app
            ));
            plane.deploys.forget(&id);
        }
    }
    plane.deploys.stop_running(&id);
}

/// Takes up the deploys nobody runs: at start, those this control plane ran before it
/// stopped; on any control plane sharing the database, those whose holder's lease ran
/// out. Each goes on from where its record says it was, holding its app's lock from
/// before the API answers.
pub fn resume_unfinished(plane: &Arc<ControlPlane>) {
    let rows = match plane.store.unfinished_deploys() {
        Ok(rows) => rows,
        Err(err) => {
            tracing::error!(error = %err, "reading unfinished deploys");
            return;
        }
    };
    for row in rows {
        if plane.deploys.mark_running(&row.id) {
            continue;
        }
        match plane.store.claim_deploy(
            &row.id,
            &plane.node_id,
            crate::store::now_millis(),
            lease_end(),
        ) {
            Ok(true) => {}
            Ok(false) => {
                plane.deploys.stop_running(&row.id);
                continue;
            }
            Err(err) => {
                tracing::warn!(deploy = %row.id, error = %err, "claiming an unfinished deploy");
                plane.deploys.stop_running(&row.id);
                continue;
            }
        }
        let app = match plane.store.app_by_id(&row.app_id) {
            Ok(Some(app)) => app,
            _ => {
                let _ = plane.store.set_deploy_status(&row.id, "failed");
                plane.deploys.stop_running(&row.id);
                continue;
            }
        };
        let taken_over = !row.lease_owner.is_empty() && row.lease_owner != plane.node_id;
        tracing::info!(deploy = %row.id, app = %app.name, taken_over, "resuming an unfinished deploy");
        // What another process of this or another control plane recorded, read afresh.
        plane.deploys.forget(&row.id);
        let operation = plane.deploys.adopt(&plane.store, &row, &app.name);
        let guard = plane.app_lock(&app.name).try_lock_owned().ok();
        let work = resume(
            plane.clone(),
            app,
            row,
            Progress::new(operation.clone()),
            guard,
            taken_over,
        );
        tokio::spawn(run_held(plane.clone(), operation, work));
    }
}

/// Every half lease, takes over the deploys whose holder stopped renewing its lease (a
/// control plane sharing the database that died), until the server stops.
pub async fn take_over_abandoned(plane: Arc<ControlPlane>) {
    loop {
        tokio::time::sleep(DEPLOY_LEASE / 2).await;
        resume_unfinished(&plane);
    }
}

async fn resume(
    plane: Arc<ControlPlane>,
    app: AppRow,
    row: DeployRow,
    progress: Progress,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
    taken_over: bool,
) {
    let _guard = match guard {
        Some(guard) => guard,
        None => plane.app_lock(&app.name).lock_owned().await,
    };
    let why = if taken_over {
        "The control plane running it stopped"
    } else {
        "The server restarted"
    };
    progress
        .say(format!(
            "{why}; deploy {} goes on from where it stopped",
            row.id
        ))
        .await;
    let record: Record = serde_json::from_str(&row.progress).unwrap_or_default();
    let recorder = Arc::new(Recorder {
        store: plane.store.clone(),
        id: row.id.clone(),
        record: Mutex::new(record),
    });
    let deployer = Deployer {
        plane: &plane,
        app: &app,
        progress: &progress,
        record: Some(recorder),
    };
    let result = deployer.resume(&row).await;
    report(&plane, &app, &progress, result);
}

/// Settings of one rollout.
#[derive(Clone, Debug)]
pub struct RolloutSettings {
    pub strategy: String,
    pub max_unavailable: f64,
    pub wait_timeout: Duration,
    pub ha: bool,
}

impl RolloutSettings {
    /// How many machines of `total` may be down at once.
    pub fn batch_size(&self, total: usize) -> usize {
        let size = if self.max_unavailable >= 1.0 {
            self.max_unavailable.floor() as usize
        } else {
            (self.max_unavailable * total as f64).ceil() as usize
        };
        size.clamp(1, total.max(1))
    }
}

/// Whether a machine is between two states (an operation on it is under way).
fn between_states(state: MachineState) -> bool {
    matches!(
        state,
        MachineState::Starting
            | MachineState::Stopping
            | MachineState::Replacing
            | MachineState::Destroying
            | MachineState::Suspending
    )
}

/// Where a restart left the update of a machine.
enum Caught {
    /// Its agent runs the new config.
    InPlace,
    /// The store has the new config, its agent the old one.
    StoredOnly,
    /// It was not updated yet (or how far is unknown): it is updated.
    Not,
}

/// A machine a rollout changed, to put back if the rollout fails.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Touched {
    Updated {
        id: String,
        previous: Box<MachineConfig>,
        was_running: bool,
    },
    Created {
        id: String,
    },
}

impl Touched {
    fn id(&self) -> &str {
        match self {
            Touched::Updated { id, .. } | Touched::Created { id } => id,
        }
    }
}

pub struct Deployer<'a> {
    pub plane: &'a ControlPlane,
    pub app: &'a AppRow,
    pub progress: &'a Progress,
    /// Where a deploy keeps its progress (none for scalings).
    pub record: Option<Arc<Recorder>>,
}

fn parse_config(value: &serde_json::Value) -> Result<AppConfig, DeployError> {
    let config = AppConfig::from_json_value(value.clone())
        .map_err(|e| bad(format!("invalid app configuration: {e}")))?;
    let problems: Vec<String> = config
        .validate()
        .into_iter()
        .filter(|d| d.severity == Severity::Error)
        .map(|d| d.to_string())
        .chain(config.statics.iter().enumerate().filter_map(|(i, s)| {
            crate::validate::static_unsupported(i, s.tigris_bucket.as_deref())
        }))
        .collect();
    if !problems.is_empty() {
        return Err(bad(format!(
            "app configuration is not valid: {}",
            problems.join("; ")
        )));
    }
    Ok(config)
}

fn settings_for(
    config: &AppConfig,
    request: &DeployRequest,
) -> Result<RolloutSettings, DeployError> {
    let section = config.deploy.clone().unwrap_or_default();
    let strategy = request
        .strategy
        .clone()
        .filter(|s| !s.is_empty())
        .or(section.strategy)
        .unwrap_or_else(|| "rolling".into())
        .to_lowercase();
    if !STRATEGIES.contains(&strategy.as_str()) {
        return Err(bad(format!(
            "unsupported deployment strategy '{strategy}'; use one of: {}",
            STRATEGIES.join(", ")
        )));
    }
    let max_unavailable = request
        .max_unavailable
        .or(section.max_unavailable)
        .unwrap_or(DEFAULT_MAX_UNAVAILABLE);
    if max_unavailable.is_nan() || max_unavailable <= 0.0 || !max_unavailable.is_finite() {
        return Err(bad(format!(
            "max_unavailable must be a fraction between 0 and 1 or a machine count of 1 or more, not {max_unavailable}"
        )));
    }
    let wait_timeout = request
        .wait_timeout
        .or(section.wait_timeout)
        .map(|d| d.to_std())
        .filter(|d| !d.is_zero())
        .unwrap_or(DEFAULT_WAIT_TIMEOUT);
    Ok(RolloutSettings {
        strategy,
        max_unavailable,
        wait_timeout,
        ha: request.ha.unwrap_or(true),
    })
}

impl Deployer<'_> {
    async fn say(&self, message: impl Into<String>) {
        self.progress.say(message).await;
    }

    fn note(&self, change: impl FnOnce(&mut Record)) {
        if let Some(record) = &self.record {
            record.change(change);
        }
    }

    fn recorded(&self) -> Record {
        self.record
            .as_ref()
            .map(|r| r.snapshot())
            .unwrap_or_default()
    }

    /// Goes on with a deploy a restart interrupted, from its record.
    async fn resume(&self, row: &DeployRow) -> Result<u64, DeployError> {
        let request: DeployRequest = serde_json::from_str(&row.request)
            .map_err(|e| bad(format!("the recorded deploy request is unreadable: {e}")))?;
        if row.release_id.is_empty() {
            let again = if request.description.as_deref() == Some(SECRETS_DESCRIPTION) {
                "aloft secrets deploy"
            } else {
                "aloft deploy"
            };
            return Err(bad(format!(
                "the server stopped before this deploy made its release, so no machine was changed; run `{again}` again"
            )));
        }
        let release = self
            .plane
            .store
            .release(&row.release_id)?
            .ok_or_else(|| bad(format!("release {} of this deploy is gone", row.release_id)))?;
        let value: serde_json::Value = serde_json::from_str(&release.config).map_err(|e| {
            bad(format!(
                "release v{} has an unreadable config: {e}",
                release.version
            ))
        })?;
        let config = parse_config(&value)?;
        let settings = settings_for(&config, &request)?;
        self.plane
            .store
            .set_release_status(&release.id, "running")?;
        self.wait_for_hosts().await;
        let record = self.recorded();
        let region = if record.region.is_empty() {
            self.plane.config.region.clone()
        } else {
            record.region.clone()
        };
        let options = MachineConfigOptions {
            image: release.image.clone(),
            release_id: Some(release.id.clone()),
            release_version: Some(release.version),
            primary_region: Some(region.clone()),
        };
        let result = match self.tidy_after_restart(&release.id).await {
            Ok(()) => {
                self.roll_out_release(
                    &config,
                    &request,
                    &options,
                    &settings,
                    &region,
                    record.phase == PHASE_ROLLOUT,
                )
                .await
            }
            Err(err) => Err(err),
        };
        self.conclude(&release, result)
    }

    /// Waits (a minute at most) until the agents of the app's machines answer and no
    /// machine is between two states, as after a restart they may not yet be. A machine
    /// the store shows between two states once its agent answers was left so by an
    /// operation of the stopped server, which will never finish it: it takes the state
    /// its agent reports.
    async fn wait_for_hosts(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let mut settled: HashSet<String> = HashSet::new();
        loop {
            let machines = self
                .plane
                .store
                .list_machines(&self.app.id, false)
                .unwrap_or_default();
            let mut hosts: Vec<&str> = machines.iter().map(|m| m.host_id.as_str()).collect();
            hosts.sort();
            hosts.dedup();
            let mut answering = HashSet::new();
            for host in hosts {
                let answers = match self.plane.agent(host) {
                    Ok(agent) => tokio::time::timeout(
                        Duration::from_secs(3),
                        agent.http().get::<serde_json::Value>("/v1/machines"),
                    )
                    .await
                    .is_ok_and(|r| r.is_ok()),
                    Err(_) => false,
                };
                if answers {
                    answering.insert(host.to_string());
                }
            }
            let mut ready = true;
            for machine in &machines {
                ready &= answering.contains(&machine.host_id);
                if !between_states(machine.state) {
                    continue;
                }
                ready = false;
                if answering.contains(&machine.host_id) && settled.insert(machine.id.clone()) {
                    self.plane.settle_from_agent(machine).await;
                }
            }
            if ready || tokio::time::Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Finishes what the restart cut short: replaced machines not yet destroyed go; new
    /// machines this deploy had not finished launching (replacements, canaries, green
    /// machines, machines of new groups) are destroyed, and made again as the rollout goes on.
    async fn tidy_after_restart(&self, release_id: &str) -> Result<(), DeployError> {
        let record = self.recorded();
        for id in &record.retiring {
            if let Some(row) = self.plane.store.machine(id)?
                && row.state != MachineState::Destroyed
            {
                self.say(format!(
                    "Destroying machine {id}, which a healthy machine of the new release replaced before the restart"
                ))
                .await;
                rollout::retire(self.plane, &row).await?;
            }
            self.note(|r| r.retiring.retain(|m| m != id));
        }
        for machine in self.plane.store.list_machines(&self.app.id, false)? {
            let on_release = machine
                .config
                .metadata
                .get(aloft_api::METADATA_RELEASE_ID)
                .is_some_and(|r| r == release_id);
            let known = record.done.contains(&machine.id)
                || record.touched.iter().any(|t| t.id() == machine.id);
            if on_release && !known {
                self.say(format!(
                    "Destroying machine {} [{}], which this deploy was launching when the server stopped",
                    machine.id,
                    group_of(&machine)
                ))
                .await;
                rollout::retire(self.plane, &machine).await?;
            }
        }
        Ok(())
    }

    /// Records how the release's rollout ended.
    fn conclude(
        &self,
        release: &crate::store::ReleaseRow,
        result: Result<(), DeployError>,
    ) -> Result<u64, DeployError> {
        let status = if result.is_ok() { "complete" } else { "failed" };
        self.plane.store.set_release_status(&release.id, status)?;
        result?;
        self.plane.store.set_app_status(&self.app.id, "deployed")?;
        crate::releases::collect_old_images_later(self.plane, self.app);
        Ok(release.version)
    }

    async fn deploy(
        &self,
        request: &DeployRequest,
        caller: &Caller,
        user: &str,
    ) -> Result<u64, DeployError> {
        let config = parse_config(&request.config)?;
        let settings = settings_for(&config, request)?;
        let image = self.resolve_image(&request.image, caller).await?;

        let wanted_region = if config.primary_region.is_empty() {
            self.plane.config.region.clone()
        } else {
            config.primary_region.clone()
        };
        let placement = place(&self.plane.store.hosts()?, &wanted_region)?;
        if placement.region != wanted_region {
            let known = regions::find(&wanted_region)
                .map(|r| format!(" ({})", r.name))
                .unwrap_or_default();
            self.progress
                .warn(format!("region {wanted_region}{known} has no hosts here; machines will run in {}, the nearest region that has one", placement.region))
                .await;
        }

        let config_json = serde_json::to_string(&config).map_err(|e| bad(e.to_string()))?;
        let description = request
            .description
            .clone()
            .filter(|d| !d.is_empty())
            .unwrap_or_else(|| "deploy".into());
        let release = self.plane.store.create_release(
            &self.app.id,
            &ulid::Ulid::new().to_string(),
            &image,
            &config_json,
            &description,
            user,
        )?;
        if let Some(record) = &self.record {
            self.plane
                .store
                .set_deploy_release(&record.id, &release.id)?;
        }
        self.note(|r| {
            r.strategy = settings.strategy.clone();
            r.region = placement.region.clone();
            r.phase = PHASE_RELEASE.into();
        });
        // Proxies learn the release's primary region (min_machines_running applies there).
        self.plane.catalog.app_changed(self.app);
        self.progress.emit(DeployEvent::Release {
            version: release.version,
            image: image.clone(),
            strategy: settings.strategy.clone(),
        });
        self.say(format!(
            "Release v{} created with image {image}",
            release.version
        ))
        .await;

        let options = MachineConfigOptions {
            image: image.clone(),
            release_id: Some(release.id.clone()),
            release_version: Some(release.version),
            primary_region: Some(placement.region.clone()),
        };
        let result = self
            .roll_out_release(
                &config,
                request,
                &options,
                &settings,
                &placement.region,
                false,
            )
            .await;
        self.conclude(&release, result)
    }

    async fn roll_out_release(
        &self,
        config: &AppConfig,
        request: &DeployRequest,
        options: &MachineConfigOptions,
        settings: &RolloutSettings,
        region: &str,
        rolling_out_already: bool,
    ) -> Result<(), DeployError> {
        let mut wanted: BTreeMap<String, MachineConfig> = BTreeMap::new();
        for group in config.process_groups() {
            let machine_config = config
                .to_machine_config(&group, options)
                .map_err(|e| bad(format!("process group {group}: {e}")))?;
            let mut machine_config = machine_config;
            // The size of the volumes a first deploy makes (flyctl's default: 1 GB).
            for mount in &mut machine_config.mounts {
                let initial = config
                    .mounts
                    .iter()
                    .find(|m| m.source == mount.name)
                    .and_then(|m| m.initial_size.as_deref())
                    .filter(|s| !s.trim().is_empty());
                if let Some(text) = initial {
                    let gb = aloft_config::parse_volume_size_gb(text)
                        .map_err(|e| bad(format!("mounts: initial_size {text:?}: {e}")))?;
                    mount.size_gb = Some(u32::try_from(gb).unwrap_or(u32::MAX));
                }
            }
            wanted.insert(group, machine_config);
        }
        if rolling_out_already {
            return self.roll_out(&wanted, region, settings).await;
        }
        if !request.skip_release_command {
            let timeout = request
                .release_command_timeout
                .or(config
                    .deploy
                    .as_ref()
                    .and_then(|d| d.release_command_timeout))
                .map(|d| d.to_std())
                .filter(|d| !d.is_zero())
                .unwrap_or(DEFAULT_RELEASE_COMMAND_TIMEOUT);
            self.release_command(config, options, region, timeout)
                .await?;
        }
        if matches!(settings.strategy.as_str(), "rolling" | "canary") {
            self.machine_checks(config, &wanted, region, settings)
                .await?;
        }
        self.note(|r| r.phase = PHASE_ROLLOUT.into());
        self.roll_out(&wanted, region, settings).await
    }

    /// Copies an image from elsewhere into the platform's registry (hosts pull only from
    /// there), and checks that an image of ours exists and may be used by this app.
    async fn resolve_image(&self, image: &str, caller: &Caller) -> Result<String, DeployError> {
        let image = image.trim();
        if image.is_empty() {
            return Err(bad("deploy needs an image"));
        }
        let ours = self.plane.registry_host();
        let reference = aloft_registry::client::parse_reference(image)
            .map_err(|e| bad(format!("image {image:?} is not a valid reference: {e}")))?;
        if reference.host.as_deref() == Some(ours.as_str()) {
            let repo_app = self.plane.store.app(&reference.repository)?;
            if !repo_app.is_some_and(|a| caller.sees_app(&a)) {
                return Err(bad(format!(
                    "image {image} is in repository {}, which this app's token may not pull from",
                    reference.repository
                )));
            }
            let pull = aloft_registry::PullClient::new(
                &format!("http://{ours}"),
                Some(self.plane.host_token().to_string()),
            );
            match pull.manifest(image).await {
                Ok(manifest) => aloft_build::oci::check_runnable(&manifest)
                    .map_err(|reason| bad(format!("image {image} cannot be deployed: {reason}")))?,
                Err(
                    aloft_registry::RegistryError::ManifestUnknown(_)
                    | aloft_registry::RegistryError::NameUnknown(_),
                ) => {
                    return Err(bad(format!(
                        "image {image} is not in the registry (it was never pushed, or garbage collection removed it)"
                    )));
                }
                Err(err) => {
                    return Err(bad(format!(
                        "reading image {image} from the registry: {err}"
                    )));
                }
            }
            return Ok(image.to_string());
        }
        self.import_image(image, &reference).await
    }

    /// Where an image import may connect: public addresses, plus the pull-through upstream
    /// and the registries the operator allowed by name.
    fn import_egress(&self) -> aloft_registry::EgressPolicy {
        let config = &self.plane.config;
        let mut policy = aloft_registry::EgressPolicy::public_only();
        if let Some(upstream) = &config.registry_upstream {
            policy = policy.trust(&upstream.url);
        }
        for origin in &config.allowed_private_registries {
            policy = policy.trust(origin);
        }
        policy
    }

    async fn import_image(
        &self,
        image: &str,
        reference: &aloft_registry::client::ImageReference,
    ) -> Result<String, DeployError> {
        let (url, repository) = match reference.host.as_deref() {
            None | Some("docker.io") | Some("index.docker.io") => {
                let repo = if reference.repository.contains('/') {
                    reference.repository.clone()
                } else {
                    format!("library/{}", reference.repository)
                };
                ("https://registry-1.docker.io".to_string(), repo)
            }
            Some(host) => {
                let plain = host.starts_with("localhost")
                    || host.starts_with("127.")
                    || host.starts_with("[::1]");
                (
                    format!("{}://{host}", if plain { "http" } else { "https" }),
                    reference.repository.clone(),
                )
            }
        };
        let source_reference = if aloft_registry::Digest::looks_like_digest(&reference.reference) {
            format!("{repository}@{}", reference.reference)
        } else {
            format!("{repository}:{}", reference.reference)
        };
        let destination = format!(
            "{}/{}:deployment-{}",
            self.plane.registry_host(),
            self.app.name,
            ulid::Ulid::new()
        );
        self.say(format!(
            "Copying image {image} into the platform registry as {destination}"
        ))
        .await;
        let source = aloft_registry::PullClient::new(&url, None).with_egress(self.import_egress());
        let target = aloft_build::oci::PushClient::new(
            &self.plane.registry_host(),
            Some(self.plane.host_token().to_string()),
        )
        .map_err(|e| bad(e.to_string()))?;
        let scratch = self
            .plane
            .config
            .data_dir
            .join("tmp")
            .join(format!("import-{}", ulid::Ulid::new()));
        let copied = aloft_build::oci::copy_image(
            &source,
            &source_reference,
            &target,
            &destination,
            &scratch,
            |_| {},
        )
        .await;
        let _ = std::fs::remove_dir_all(&scratch);
        let copied = copied.map_err(|e| {
            bad(format!(
                "copying image {image} into the platform registry failed: {e}"
            ))
        })?;
        self.say(format!(
            "Image copied ({} layers, {} new blobs, {})",
            copied.layers, copied.blobs_copied, copied.digest
        ))
        .await;
        Ok(destination)
    }

    // ---- one-off machines: release command, machine checks ----

    /// Runs a machine until its main process exits; returns the exit and the log lines.
    async fn run_once(
        &self,
        config: MachineConfig,
        region: &str,
        timeout: Duration,
        what: &str,
    ) -> Result<(MachineRow, ExitStatus, Vec<String>), DeployError> {
        let (row, started_ms) =
            rollout::launch_unrouted(self.plane, self.app, config, region, true)
                .await
                .map_err(DeployError::from)?;
        let outcome = self.wait_for_exit(&row, started_ms, timeout, what).await;
        let logs = rollout::machine_logs(self.plane, &self.app.name, &row.id).await;
        if let Ok(current) = self.plane.store.machine(&row.id)
            && let Some(current) = current.filter(|m| m.state != MachineState::Destroyed)
            && let Err(err) = rollout::retire(self.plane, &current).await
        {
            tracing::warn!(machine = %row.id, error = %err, "destroying a one-off machine");
        }
        let exit = outcome?;
        Ok((row, exit, logs))
    }

    async fn wait_for_exit(
        &self,
        row: &MachineRow,
        started_ms: i64,
        timeout: Duration,
        what: &str,
    ) -> Result<ExitStatus, DeployError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let (mut wake, _, _) = self.plane.catalog.follow(None);
        let mut stopped_since: Option<tokio::time::Instant> = None;
        loop {
            let events = self.plane.store.events(&row.id, 20)?;
            let exit = events
                .iter()
                .filter(|e| e.timestamp >= started_ms && e.kind == "exit")
                .find_map(|e| {
                    e.request
                        .as_ref()
                        .and_then(|r| r.get("exit_event"))
                        .and_then(|x| serde_json::from_value::<ExitStatus>(x.clone()).ok())
                });
            if let Some(exit) = exit {
                return Ok(exit);
            }
            let current = self
                .plane
                .store
                .machine(&row.id)?
                .ok_or_else(|| bad(format!("the {what} machine {} disappeared", row.id)))?;
            match current.state {
                MachineState::Failed => {
                    return Err(bad(format!(
                        "the {what} machine {} failed to start: {}",
                        row.id,
                        self.plane.failure_reason(&row.id)
                    )));
                }
                MachineState::Stopped | MachineState::Destroyed => {
                    // The exit event is on its way; give it a moment.
                    let since = *stopped_since.get_or_insert_with(tokio::time::Instant::now);
                    if since.elapsed() > Duration::from_secs(3) {
                        return Ok(ExitStatus {
                            exit_code: -1,
                            ..Default::default()
                        });
                    }
                }
                _ => {}
            }
            if tokio::time::Instant::now() >= deadline {
                let kill = StopRequest {
                    signal: Some("SIGKILL".into()),
                    timeout: Some(aloft_api::Duration::from_secs(1)),
                };
                let _ = self.plane.stop_machine(&current, &kill).await;
                return Err(bad(format!(
                    "the {what} did not finish within {}; it was killed",
                    rollout::humantime(timeout)
                )));
            }
            tokio::select! {
                _ = wake.recv() => {}
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
    }

    async fn release_command(
        &self,
        config: &AppConfig,
        options: &MachineConfigOptions,
        region: &str,
        timeout: Duration,
    ) -> Result<(), DeployError> {
        let Some(machine_config) = config.release_command_machine_config(options) else {
            return Ok(());
        };
        let machine_config = machine_config.map_err(|e| bad(format!("release_command: {e}")))?;
        let command = config
            .deploy
            .as_ref()
            .and_then(|d| d.release_command.clone())
            .unwrap_or_default();
        self.say(format!("Running release command: {command}"))
            .await;
        let (row, exit, logs) = self
            .run_once(machine_config, region, timeout, "release command")
            .await?;
        for line in &logs {
            self.progress.log(&row.id, line).await;
        }
        if exit.exit_code == 0 && exit.signal.is_none() {
            self.say(format!(
                "Release command finished successfully on machine {}",
                row.id
            ))
            .await;
            return Ok(());
        }
        let how = match exit.signal {
            Some(signal) => format!("was killed by signal {signal}"),
            None if exit.exit_code < 0 => "stopped without an exit status".to_string(),
            None => format!("exited with code {}", exit.exit_code),
        };
        Err(DeployError {
            message: format!(
                "release command failed on machine {}: `{command}` {how}; the deploy stopped before any machine was changed",
                row.id
            ),
            failure: Some(Box::new(DeployFailure {
                machine_id: row.id.clone(),
                process_group: RELEASE_COMMAND_GROUP.to_string(),
                exit: Some(exit),
                logs,
                ..Default::default()
            })),
        })
    }

    /// `machine_checks`: for each group that has them, a test machine of the new release,
    /// and a throwaway machine per check that must exit 0 (with `FLY_TEST_MACHINE_IP`).
    async fn machine_checks(
        &self,
        config: &AppConfig,
        wanted: &BTreeMap<String, MachineConfig>,
        region: &str,
        settings: &RolloutSettings,
    ) -> Result<(), DeployError> {
        for (group, machine_config) in wanted {
            let checks = machine_checks_for(config, group);
            if checks.is_empty() {
                continue;
            }
            self.say(format!(
                "Running {} machine check(s) for process group '{group}'",
                checks.len()
            ))
            .await;
            let (tested, started_ms) = rollout::launch_unrouted(
                self.plane,
                self.app,
                machine_config.clone(),
                region,
                true,
            )
            .await?;
            let result = self
                .run_machine_checks(
                    &tested,
                    started_ms,
                    machine_config,
                    &checks,
                    region,
                    settings,
                )
                .await;
            if let Err(err) = rollout::retire(self.plane, &tested).await {
                tracing::warn!(machine = %tested.id, error = %err, "destroying the machine-check test machine");
            }
            result?;
        }
        Ok(())
    }

    async fn run_machine_checks(
        &self,
        tested: &MachineRow,
        started_ms: i64,
        machine_config: &MachineConfig,
        checks: &[aloft_config::MachineCheckConfig],
        region: &str,
        settings: &RolloutSettings,
    ) -> Result<(), DeployError> {
        let healthy = rollout::wait_healthy(
            self.plane,
            &tested.id,
            started_ms,
            settings.wait_timeout,
            self.progress,
        )
        .await;
        let healthy = match healthy {
            Ok(row) => row,
            Err(failure) => {
                return Err(rollout::with_logs(self.plane, &self.app.name, failure)
                    .await
                    .into());
            }
        };
        let address = healthy
            .private_ip
            .clone()
            .or(healthy.private_ipv4.clone())
            .unwrap_or_default();
        for (index, check) in checks.iter().enumerate() {
            let mut config = MachineConfig {
                image: check
                    .image
                    .clone()
                    .filter(|i| !i.is_empty())
                    .unwrap_or_else(|| machine_config.image.clone()),
                env: machine_config.env.clone(),
                guest: machine_config.guest.clone(),
                metadata: machine_config.metadata.clone(),
                restart: Some(MachineRestart {
                    policy: RestartPolicy::No,
                    max_retries: None,
                }),
                auto_destroy: true,
                ..Default::default()
            };
            config.metadata.insert(
                aloft_api::METADATA_PROCESS_GROUP.into(),
                aloft_config::TEST_MACHINE_GROUP.into(),
            );
            config
                .env
                .insert("FLY_TEST_MACHINE_IP".into(), address.clone());
            config.init = Some(MachineInit {
                entrypoint: check.entrypoint.clone(),
                cmd: check.command.clone(),
                ..Default::default()
            });
            let timeout = check
                .kill_timeout
                .map(|d| d.to_std())
                .filter(|d| !d.is_zero())
                .unwrap_or(settings.wait_timeout);
            let (row, exit, logs) = self
                .run_once(config, region, timeout, "machine check")
                .await?;
            for line in &logs {
                self.progress.log(&row.id, line).await;
            }
            if exit.exit_code != 0 || exit.signal.is_some() {
                return Err(DeployError {
                    message: format!(
                        "machine check {index} failed against machine {}: it exited with code {}",
                        tested.id, exit.exit_code
                    ),
                    failure: Some(Box::new(DeployFailure {
                        machine_id: row.id.clone(),
                        process_group: aloft_config::TEST_MACHINE_GROUP.into(),
                        check: Some(format!("machine_checks[{index}]")),
                        exit: Some(exit),
                        logs,
                        ..Default::default()
                    })),
                });
            }
            self.say(format!(
                "Machine check {index} passed against machine {}",
                tested.id
            ))
            .await;
        }
        Ok(())
    }

    // ---- rollout ----

    /// Existing machines of the app by process group (one-off machines left aside).
    fn machines_by_group(&self) -> Result<BTreeMap<String, Vec<MachineRow>>, DeployError> {
        let mut by_group: BTreeMap<String, Vec<MachineRow>> = BTreeMap::new();
        for machine in self.plane.store.list_machines(&self.app.id, false)? {
            let group = group_of(&machine).to_string();
            if group.starts_with("fly_app_") {
                continue;
            }
            by_group.entry(group).or_default().push(machine);
        }
        Ok(by_group)
    }

    pub async fn roll_out(
        &self,
        wanted: &BTreeMap<String, MachineConfig>,
        region: &str,
        settings: &RolloutSettings,
    ) -> Result<(), DeployError> {
        let mut by_group = self.machines_by_group()?;
        let mut targets: Vec<(MachineRow, MachineConfig)> = Vec::new();
        let mut new_groups: Vec<(String, MachineConfig)> = Vec::new();
        for (group, config) in wanted {
            match by_group.remove(group) {
                Some(machines) if !machines.is_empty() => {
                    targets.extend(machines.into_iter().map(|m| (m, config.clone())))
                }
                _ => new_groups.push((group.clone(), config.clone())),
            }
        }
        let obsolete: Vec<MachineRow> = by_group.into_values().flatten().collect();

        for (group, config) in wanted {
            if (settings.strategy == "bluegreen" || settings.strategy == "canary")
                && !config.mounts.is_empty()
            {
                return Err(bad(format!(
                    "{} deployment strategy is not supported when using mounted volumes (process group '{group}' mounts one); use rolling or immediate",
                    settings.strategy
                )));
            }
            if settings.strategy == "bluegreen"
                && !config.services.is_empty()
                && rollout::expected_checks(config).is_empty()
            {
                return Err(bad(format!(
                    "the bluegreen strategy needs at least one health check: process group '{group}' has services but no checks; add [[http_service.checks]] (or [[services.http_checks]]/[[services.tcp_checks]]) to fly.toml"
                )));
            }
        }

        // A volume can't be attached to an existing machine: one that gains a mount is
        // replaced by a new machine with an unattached volume of that name, as flyctl does.
        let mut replacements: Vec<(MachineRow, MachineConfig)> = Vec::new();
        let mut missing: BTreeMap<(String, String, String), usize> = BTreeMap::new();
        let mut taken = Vec::new();
        let mut kept = Vec::new();
        for (machine, config) in targets {
            if config.mounts.is_empty() || !machine.config.mounts.is_empty() {
                kept.push((machine, config));
                continue;
            }
            let group = group_of(&machine).to_string();
            let mut replacement = config.clone();
            match self
                .volume_for_new_machine(
                    &group,
                    &mut replacement,
                    &machine.region,
                    false,
                    &mut taken,
                )
                .await
            {
                Ok(()) => replacements.push((machine, replacement)),
                Err(_) => {
                    let name = config.mounts[0].name.clone();
                    *missing
                        .entry((group, name, machine.region.clone()))
                        .or_default() += 1;
                }
            }
        }
        let targets = kept;
        if let Some(((group, name, _), _)) = missing.iter().next() {
            let counts: Vec<String> = missing
                .iter()
                .filter(|((g, n, _), _)| g == group && n == name)
                .map(|((_, _, region), count)| format!("{region}={count}"))
                .collect();
            return Err(bad(format!(
                "Process group '{group}' needs volumes with name '{name}' to fulfill mounts defined in fly.toml; Run `aloft volume create {name} -r REGION -n COUNT` for the following regions and counts: {}",
                counts.join(" ")
            )));
        }

        if !targets.is_empty() {
            self.say(format!(
                "Updating existing machines in '{}' with {} strategy",
                self.app.name, settings.strategy
            ))
            .await;
            match settings.strategy.as_str() {
                "bluegreen" => self.bluegreen(&targets, settings).await?,
                "immediate" => self.in_place(&targets, |n| n, false, settings).await?,
                "canary" => {
                    let record = self.recorded();
                    if record.done.is_empty() && record.touched.is_empty() {
                        self.canary(&targets, settings).await?;
                    }
                    self.in_place(&targets, |n| settings.batch_size(n), true, settings)
                        .await?;
                }
                _ => {
                    self.in_place(&targets, |n| settings.batch_size(n), true, settings)
                        .await?
                }
            }
        }
        for (machine, config) in replacements {
            let group = group_of(&machine).to_string();
            self.say(format!(
                "Replacing machine {} [{group}] with one that mounts volume {}",
                machine.id, config.mounts[0].volume
            ))
            .await;
            let id = match self.launch_healthy(config, &machine.region, settings).await {
                Ok(id) => id,
                Err((id, err)) => {
                    if let Some(id) = id {
                        self.destroy_quietly(&id).await;
                    }
                    return Err(err);
                }
            };
            rollout::set_routed(self.plane, &id, true)?;
            rollout::retire(self.plane, &machine).await?;
            self.say(format!("Machine {id} [{group}] is started and healthy"))
                .await;
        }
        for (group, config) in &new_groups {
            self.create_group(group, config, region, settings).await?;
        }
        for machine in obsolete {
            self.say(format!(
                "Destroying machine {} of process group '{}', which the config no longer has",
                machine.id,
                group_of(&machine)
            ))
            .await;
            rollout::retire(self.plane, &machine).await?;
        }
        Ok(())
    }

    /// First machines of a group: two when it has services and HA is on, else one.
    async fn create_group(
        &self,
        group: &str,
        config: &MachineConfig,
        region: &str,
        settings: &RolloutSettings,
    ) -> Result<(), DeployError> {
        let count = if settings.ha && !config.services.is_empty() && config.mounts.is_empty() {
            2
        } else {
            1
        };
        self.say(format!(
            "Creating {count} machine(s) for process group '{group}' in region {region}"
        ))
        .await;
        let mut configs = Vec::new();
        let mut taken = Vec::new();
        for _ in 0..count {
            let mut config = config.clone();
            let first_deploy = self.plane.store.releases(&self.app.id, 2)?.len() <= 1;
            self.volume_for_new_machine(group, &mut config, region, first_deploy, &mut taken)
                .await?;
            configs.push(config);
        }
        let launches = configs
            .into_iter()
            .map(|config| self.launch_healthy(config, region, settings));
        let results = join_all(launches).await;
        let mut created = Vec::new();
        let mut first_error = None;
        for result in results {
            match result {
                Ok(id) => created.push(id),
                Err((id, err)) => {
                    created.extend(id);
                    first_error.get_or_insert(err);
                }
            }
        }
        if let Some(err) = first_error {
            for id in &created {
                self.destroy_quietly(id).await;
            }
            return Err(err);
        }
        for id in &created {
            rollout::set_routed(self.plane, id, true)?;
            self.say(format!("Machine {id} [{group}] is started and healthy"))
                .await;
        }
        self.note(|r| r.done.extend(created.iter().cloned()));
        Ok(())
    }

    /// Fills in the volume a new machine of `group` mounts (`mounts[0].volume`): an
    /// unattached volume of the app with the mount's name in `region`, or, when `create`
    /// (the app's first deploy, `scale count`), a new one of the mount's `size_gb`
    /// (fly.toml's `initial_size`; 1 GB unless set), as flyctl does.
    pub(crate) async fn volume_for_new_machine(
        &self,
        group: &str,
        config: &mut MachineConfig,
        region: &str,
        create: bool,
        taken: &mut Vec<String>,
    ) -> Result<(), DeployError> {
        let Some(mount) = config.mounts.first_mut() else {
            return Ok(());
        };
        if !mount.volume.is_empty() {
            return Ok(());
        }
        let name = mount.name.clone();
        let free = self
            .plane
            .store
            .list_volumes(&self.app.id, false)?
            .into_iter()
            .find(|v| {
                v.name == name
                    && v.region == region
                    && !taken.contains(&v.id)
                    && v.attached_machine_id.as_deref().is_none_or(|m| {
                        !matches!(self.plane.store.machine(m), Ok(Some(row)) if row.state != MachineState::Destroyed)
                    })
            });
        if let Some(volume) = free {
            taken.push(volume.id.clone());
            mount.volume = volume.id;
            return Ok(());
        }
        if !create {
            return Err(bad(format!(
                "creating a new machine in group '{group}' requires an unattached '{name}' volume. Create it with `aloft volume create {name}`"
            )));
        }
        let size = mount
            .size_gb
            .map(u64::from)
            .unwrap_or(DEFAULT_VOLUME_INITIAL_SIZE_GB);
        self.say(format!(
            "Creating a {size} GB volume named '{name}' for process group '{group}'. Use 'aloft vol extend' to increase its size"
        ))
        .await;
        let volume = crate::volumes::create(
            self.plane,
            self.app,
            &aloft_api::CreateVolumeRequest {
                name: name.clone(),
                region: Some(region.to_string()),
                size_gb: Some(size),
                encrypted: Some(true),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| {
            bad(format!(
                "creating volume '{name}' for process group '{group}': {}",
                e.message
            ))
        })?;
        taken.push(volume.id.clone());
        mount.volume = volume.id;
        Ok(())
    }

    /// Creates and starts a machine out of routing and waits for it to be healthy.
    /// On failure returns the machine's id (if one was created) with the error.
    pub(crate) async fn launch_healthy(
        &self,
        config: MachineConfig,
        region: &str,
        settings: &RolloutSettings,
    ) -> Result<String, (Option<String>, DeployError)> {
        let (row, started_ms) =
            match rollout::launch_unrouted(self.plane, self.app, config, region, true).await {
                Ok(launched) => launched,
                Err(failure) => {
                    let id = (!failure.failure.machine_id.is_empty())
                        .then(|| failure.failure.machine_id.clone());
                    return Err((
                        id,
                        rollout::with_logs(self.plane, &self.app.name, failure)
                            .await
                            .into(),
                    ));
                }
            };
        match rollout::wait_healthy(
            self.plane,
            &row.id,
            started_ms,
            settings.wait_timeout,
            self.progress,
        )
        .await
        {
            Ok(_) => Ok(row.id),
            Err(failure) => Err((
                Some(row.id),
                rollout::with_logs(self.plane, &self.app.name, failure)
                    .await
                    .into(),
            )),
        }
    }

    async fn destroy_quietly(&self, id: &str) {
        if let Ok(Some(row)) = self.plane.store.machine(id)
            && row.state != MachineState::Destroyed
            && let Err(err) = rollout::retire(self.plane, &row).await
        {
            tracing::warn!(machine = id, error = %err, "destroying a machine of a failed deploy");
        }
    }

    /// A rolling update of `targets` (machine, new config), as a deploy does it.
    pub(crate) async fn update_in_place(
        &self,
        targets: &[(MachineRow, MachineConfig)],
        settings: &RolloutSettings,
    ) -> Result<(), DeployError> {
        self.in_place(targets, |n| settings.batch_size(n), true, settings)
            .await
    }

    /// Updates machines in place, each process group `batch(group size)` machines at a
    /// time; with `wait`, each batch must be healthy before the next. A group's only
    /// serving machine is replaced by a new one that is healthy before the old one stops,
    /// so a single machine serves throughout.
    async fn in_place(
        &self,
        targets: &[(MachineRow, MachineConfig)],
        batch: impl Fn(usize) -> usize,
        wait: bool,
        settings: &RolloutSettings,
    ) -> Result<(), DeployError> {
        let mut groups: BTreeMap<&str, Vec<&(MachineRow, MachineConfig)>> = BTreeMap::new();
        for target in targets {
            groups.entry(group_of(&target.0)).or_default().push(target);
        }
        // After a restart: what the deploy changed before it, to put back on failure.
        let recorded = self.recorded();
        let mut touched: Vec<Touched> = recorded.touched.clone();
        let total = targets.len();
        let mut done = 0;
        for members in groups.values() {
            // Serving before this deploy: started, or (after a restart) taken down by it.
            let serving = members
                .iter()
                .filter(|(row, _)| {
                    !row.config.services.is_empty()
                        && (row.state == MachineState::Started
                            || recorded.touched.iter().any(|t| {
                                matches!(t, Touched::Updated { id, was_running: true, .. } if *id == row.id)
                            }))
                })
                .count();
            let (finished, members): (Vec<&(MachineRow, MachineConfig)>, Vec<_>) = members
                .iter()
                .copied()
                .partition(|(row, _)| recorded.done.contains(&row.id));
            for (row, _) in finished {
                done += 1;
                self.say(format!(
                    "[{done}/{total}] Machine {} [{}] was updated before the restart",
                    row.id,
                    group_of(row)
                ))
                .await;
            }
            for chunk in members.chunks(batch(members.len()).max(1)) {
                let steps = chunk.iter().map(|(row, config)| {
                    let surge = wait
                        && serving == 1
                        && row.state == MachineState::Started
                        && !row.config.services.is_empty()
                        && row.config.mounts.is_empty();
                    self.update_one(row, config.clone(), surge, wait, settings)
                });
                let mut failed = None;
                for (changes, outcome) in join_all(steps).await {
                    for change in changes {
                        if !touched.iter().any(|t| t.id() == change.id()) {
                            touched.push(change);
                        }
                    }
                    match outcome {
                        Ok(message) => {
                            done += 1;
                            self.say(format!("[{done}/{total}] {message}")).await;
                        }
                        Err(err) => {
                            failed.get_or_insert(err);
                        }
                    }
                }
                if let Some(err) = failed {
                    self.revert(touched, settings).await;
                    return Err(err);
                }
            }
        }
        Ok(())
    }

    /// One machine of a rolling or immediate update. Returns what it changed (for a revert)
    /// and a line for the progress report.
    async fn update_one(
        &self,
        row: &MachineRow,
        config: MachineConfig,
        surge: bool,
        wait: bool,
        settings: &RolloutSettings,
    ) -> (Vec<Touched>, Result<String, DeployError>) {
        let group = group_of(row).to_string();
        if surge {
            return match self.launch_healthy(config, &row.region, settings).await {
                Ok(id) => {
                    let mut touched = vec![Touched::Created { id: id.clone() }];
                    if let Err(err) = rollout::set_routed(self.plane, &id, true) {
                        return (touched, Err(err.into()));
                    }
                    self.note(|r| {
                        r.done.push(id.clone());
                        r.retiring.push(row.id.clone());
                    });
                    match rollout::retire(self.plane, row).await {
                        Ok(()) => {
                            self.note(|r| r.retiring.retain(|m| m != &row.id));
                            touched.clear();
                            (
                                touched,
                                Ok(format!(
                                    "Machine {} [{group}] replaced by {id}, which is healthy",
                                    row.id
                                )),
                            )
                        }
                        Err(err) => (touched, Err(err.into())),
                    }
                }
                Err((id, err)) => (
                    id.map(|id| Touched::Created { id }).into_iter().collect(),
                    Err(err),
                ),
            };
        }
        // A machine the restart caught mid-update is put back as it was before this deploy.
        let earlier = self
            .recorded()
            .touched
            .into_iter()
            .find(|t| t.id() == row.id);
        let earlier_update = matches!(earlier, Some(Touched::Updated { .. }));
        let change = match earlier {
            Some(change @ Touched::Updated { .. }) => change,
            _ => Touched::Updated {
                id: row.id.clone(),
                previous: Box::new(row.config.clone()),
                was_running: matches!(row.state, MachineState::Started | MachineState::Starting),
            },
        };
        let was_running = matches!(
            change,
            Touched::Updated {
                was_running: true,
                ..
            }
        );
        self.note(|r| {
            if !r.touched.iter().any(|t| t.id() == row.id) {
                r.touched.push(change.clone());
            }
        });
        let touched = vec![change];
        let caught = if earlier_update {
            self.caught_mid_update(row, &config).await
        } else {
            Caught::Not
        };
        let update = match caught {
            // Caught mid-update by a restart with the new config in place: started (if it
            // should run), not updated again.
            Caught::InPlace => self.start_unrouted(row, was_running).await,
            // The store took the new config, its agent never got it: the agent gets the
            // stored one (no new version), as the update would have given it.
            Caught::StoredOnly => self.push_unrouted(row).await,
            Caught::Not => rollout::update_unrouted(self.plane, self.app, row, config).await,
        };
        let (mut updated, started_ms) = match update {
            Ok(updated) => updated,
            Err(failure) => {
                return (
                    touched,
                    Err(rollout::with_logs(self.plane, &self.app.name, failure)
                        .await
                        .into()),
                );
            }
        };
        if was_running && matches!(updated.state, MachineState::Stopped | MachineState::Created) {
            // Stopped for an update that a restart cut short: an update keeps a stopped
            // machine stopped, and this one ran before the deploy, so it is started.
            match self.plane.start_machine(&updated).await {
                Ok(started) => updated = started,
                Err(err) => {
                    let failure = MachineFailure::from_api(&updated, err);
                    return (
                        touched,
                        Err(rollout::with_logs(self.plane, &self.app.name, failure)
                            .await
                            .into()),
                    );
                }
            }
        }
        let starts = was_running || updated.state == MachineState::Started;
        if starts && wait {
            if let Err(failure) = rollout::wait_healthy(
                self.plane,
                &row.id,
                started_ms,
                settings.wait_timeout,
                self.progress,
            )
            .await
            {
                return (
                    touched,
                    Err(rollout::with_logs(self.plane, &self.app.name, failure)
                        .await
                        .into()),
                );
            }
        } else if starts && updated.state != MachineState::Started {
            let failure = MachineFailure::from_api(
                &updated,
                ApiError::unavailable(format!("it is {} instead of started", updated.state)),
            );
            return (
                touched,
                Err(rollout::with_logs(self.plane, &self.app.name, failure)
                    .await
                    .into()),
            );
        }
        if let Err(err) = rollout::set_routed(self.plane, &row.id, true) {
            return (touched, Err(err.into()));
        }
        self.note(|r| r.done.push(row.id.clone()));
        let state = if starts {
            if wait {
                "started and healthy"
            } else {
                "started"
            }
        } else {
            "updated (left stopped)"
        };
        (
            touched,
            Ok(format!(
                "Machine {} [{group}] update finished: {state}",
                row.id
            )),
        )
    }

    /// How far the update of a machine that a restart interrupted got: whether the store
    /// has `config` (of the same release) for it, and its agent as well (the agent's
    /// instance is the store's).
    async fn caught_mid_update(&self, row: &MachineRow, config: &MachineConfig) -> Caught {
        let release = |c: &MachineConfig| c.metadata.get(aloft_api::METADATA_RELEASE_ID).cloned();
        if release(config).is_none() || release(config) != release(&row.config) {
            return Caught::Not;
        }
        let Ok(agent) = self.plane.agent(&row.host_id) else {
            return Caught::Not;
        };
        match agent.get(&row.id).await {
            Ok(m) if m.instance_id == row.instance_id && m.state != MachineState::Failed => {
                Caught::InPlace
            }
            Ok(_) if matches!(row.state, MachineState::Stopped | MachineState::Created) => {
                Caught::StoredOnly
            }
            _ => Caught::Not,
        }
    }

    /// Gives a machine's agent the config the store has for it, out of routing.
    async fn push_unrouted(&self, row: &MachineRow) -> Result<(MachineRow, i64), MachineFailure> {
        rollout::set_routed(self.plane, &row.id, false)
            .map_err(|e| MachineFailure::from_api(row, e))?;
        let started_ms = crate::store::now_millis();
        let pushed = self
            .plane
            .push_stored_config(self.app, row)
            .await
            .map_err(|e| MachineFailure::from_api(row, e))?;
        Ok((pushed, started_ms))
    }

    async fn start_unrouted(
        &self,
        row: &MachineRow,
        was_running: bool,
    ) -> Result<(MachineRow, i64), MachineFailure> {
        rollout::set_routed(self.plane, &row.id, false)
            .map_err(|e| MachineFailure::from_api(row, e))?;
        let started_ms = crate::store::now_millis();
        // As the agent reported it since the restart, not as the rollout first listed it.
        let row = &match self.plane.store.machine(&row.id) {
            Ok(Some(current)) => current,
            _ => row.clone(),
        };
        if was_running && matches!(row.state, MachineState::Stopped | MachineState::Created) {
            let started = self
                .plane
                .start_machine(row)
                .await
                .map_err(|e| MachineFailure::from_api(row, e))?;
            return Ok((started, started_ms));
        }
        Ok((row.clone(), started_ms))
    }

    /// Puts machines a failed rollout changed back as they were.
    async fn revert(&self, touched: Vec<Touched>, settings: &RolloutSettings) {
        if touched.is_empty() {
            return;
        }
        self.say("Rolling back the machines this deploy changed to the previous release")
            .await;
        for change in touched.into_iter().rev() {
            match change {
                Touched::Created { id } => self.destroy_quietly(&id).await,
                Touched::Updated {
                    id,
                    previous,
                    was_running,
                } => {
                    let Ok(Some(row)) = self.plane.store.machine(&id) else {
                        continue;
                    };
                    if let Err(err) = self.restore(&row, *previous, was_running, settings).await {
                        self.progress
                            .warn(format!(
                                "machine {id} could not be put back on the previous release: {}",
                                err.message
                            ))
                            .await;
                    }
                }
            }
        }
    }

    async fn restore(
        &self,
        row: &MachineRow,
        previous: MachineConfig,
        was_running: bool,
        settings: &RolloutSettings,
    ) -> Result<(), DeployError> {
        let (updated, started_ms) =
            rollout::update_unrouted(self.plane, self.app, row, previous).await?;
        if was_running && updated.state != MachineState::Started {
            let current = self.plane.start_machine(&updated).await?;
            if current.state != MachineState::Started {
                return Err(bad(format!("machine {} is {}", row.id, current.state)));
            }
        }
        if was_running {
            rollout::wait_healthy(
                self.plane,
                &row.id,
                started_ms,
                settings.wait_timeout,
                self.progress,
            )
            .await?;
        } else if updated.state == MachineState::Started {
            let _ = self
                .plane
                .stop_machine(&updated, &StopRequest::default())
                .await;
        }
        rollout::set_routed(self.plane, &row.id, true)?;
        self.say(format!(
            "Machine {} is back on the previous release",
            row.id
        ))
        .await;
        Ok(())
    }

    /// Canary: one extra machine of the new release per group, healthy, then destroyed.
    async fn canary(
        &self,
        targets: &[(MachineRow, MachineConfig)],
        settings: &RolloutSettings,
    ) -> Result<(), DeployError> {
        let mut seen = std::collections::BTreeSet::new();
        for (row, config) in targets {
            let group = group_of(row).to_string();
            if !seen.insert(group.clone()) {
                continue;
            }
            self.say(format!(
                "Creating a canary machine for process group '{group}'"
            ))
            .await;
            match self
                .launch_healthy(config.clone(), &row.region, settings)
                .await
            {
                Ok(id) => {
                    self.say(format!(
                        "Canary machine {id} [{group}] is healthy; destroying it"
                    ))
                    .await;
                    self.destroy_quietly(&id).await;
                }
                Err((id, err)) => {
                    if let Some(id) = id {
                        self.destroy_quietly(&id).await;
                    }
                    return Err(err);
                }
            }
        }
        Ok(())
    }

    /// Blue/green: a new (green) machine for every running (blue) one, all out of routing;
    /// once every green machine is healthy traffic switches to them and the blue ones are
    /// destroyed. If any green machine fails, the green ones go and the blue ones stay.
    async fn bluegreen(
        &self,
        targets: &[(MachineRow, MachineConfig)],
        settings: &RolloutSettings,
    ) -> Result<(), DeployError> {
        let finished = self.recorded().done;
        let (running, idle): (Vec<_>, Vec<_>) = targets
            .iter()
            .filter(|(row, _)| !finished.contains(&row.id))
            .partition(|(row, _)| {
                matches!(row.state, MachineState::Started | MachineState::Starting)
            });
        self.say(format!("Creating {} green machine(s)", running.len()))
            .await;
        let launches = running
            .iter()
            .map(|(row, config)| self.launch_healthy(config.clone(), &row.region, settings));
        let results = join_all(launches).await;
        let mut green = Vec::new();
        let mut first_error = None;
        for result in results {
            match result {
                Ok(id) => green.push(id),
                Err((id, err)) => {
                    green.extend(id);
                    first_error.get_or_insert(err);
                }
            }
        }
        if let Some(err) = first_error {
            self.say(
                "A green machine failed; destroying the green machines, the blue ones keep serving",
            )
            .await;
            for id in &green {
                self.destroy_quietly(id).await;
            }
            return Err(err);
        }
        self.say(format!(
            "All {} green machine(s) are healthy; switching traffic to them",
            green.len()
        ))
        .await;
        for id in &green {
            rollout::set_routed(self.plane, id, true)?;
        }
        self.note(|r| {
            r.done.extend(green.iter().cloned());
            r.retiring
                .extend(running.iter().map(|(row, _)| row.id.clone()));
        });
        let retirements = running
            .iter()
            .map(|(row, _)| rollout::retire(self.plane, row));
        for (result, (row, _)) in join_all(retirements).await.into_iter().zip(&running) {
            match result {
                Ok(()) => {
                    self.note(|r| r.retiring.retain(|m| m != &row.id));
                    self.say(format!("Blue machine {} destroyed", row.id)).await
                }
                Err(err) => {
                    self.progress
                        .warn(format!(
                            "blue machine {} could not be destroyed: {}",
                            row.id, err.message
                        ))
                        .await
                }
            }
        }
        for (row, config) in idle {
            // As it is now: one destroyed meanwhile needs no update.
            match self.plane.store.machine(&row.id)? {
                Some(current) if current.state != MachineState::Destroyed => {
                    self.plane
                        .update_machine(self.app, &current, config.clone())
                        .await?;
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// The `machine_checks` that apply to a process group.
fn machine_checks_for(config: &AppConfig, group: &str) -> Vec<aloft_config::MachineCheckConfig> {
    let mut checks = config.machine_checks.clone();
    if let Some(http) = &config.http_service
        && config.applies_to(&http.processes, group)
    {
        checks.extend(http.machine_checks.iter().cloned());
    }
    for service in &config.services {
        if config.applies_to(&service.processes, group) {
            checks.extend(service.machine_checks.iter().cloned());
        }
    }
    checks
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(max_unavailable: f64) -> RolloutSettings {
        RolloutSettings {
            strategy: "rolling".into(),
            max_unavailable,
            wait_timeout: DEFAULT_WAIT_TIMEOUT,
            ha: true,
        }
    }

    /// A deploy another control plane runs is followed from the store: what it recorded,
    /// then what it records, up to its final event.
    #[tokio::test]
    async fn a_deploy_run_elsewhere_is_followed_from_its_recorded_events() {
        use futures_util::StreamExt;
        let store = Arc::new(Store::open_in_memory().unwrap());
        store
            .create_org(&crate::store::OrgRow {
                id: "o1".into(),
                slug: "personal".into(),
                name: "Personal".into(),
                created_at: now_rfc3339(),
            })
            .unwrap();
        store
            .create_app(&AppRow {
                id: "a1".into(),
                name: "hello".into(),
                org_id: "o1".into(),
                org_slug: "personal".into(),
                network: "default".into(),
                status: "deployed".into(),
                created_at: now_rfc3339(),
            })
            .unwrap();
        store
            .insert_deploy(&DeployRow {
                id: "d1".into(),
                app_id: "a1".into(),
                status: "running".into(),
                request: "{}".into(),
                user: "admin".into(),
                release_id: String::new(),
                progress: "{}".into(),
                created_at: now_rfc3339(),
                updated_at: now_rfc3339(),
                lease_owner: "cp-other".into(),
                lease_expires_at: i64::MAX,
            })
            .unwrap();
        let event = |e: &DeployEvent| serde_json::to_string(e).unwrap();
        let started = DeployEvent::Started {
            deploy_id: "d1".into(),
        };
        store
            .append_deploy_event("d1", 0, &event(&started))
            .unwrap();
        let mut stream = Box::pin(recorded_events(store.clone(), "d1".into()));
        let first = stream.next().await.unwrap().unwrap();
        assert_eq!(first, Bytes::from(format!("{}\n", event(&started))));

        // The other control plane goes on: its events come as it records them.
        let later = store.clone();
        let writer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let progress = DeployEvent::Progress {
                message: "Machine m1 updated".into(),
            };
            later
                .append_deploy_event("d1", 1, &event(&progress))
                .unwrap();
            let done = DeployEvent::Done {
                release_version: 2,
                url: None,
            };
            later.append_deploy_event("d1", 2, &event(&done)).unwrap();
            later.set_deploy_status("d1", "complete").unwrap();
        });
        let rest: Vec<Bytes> = stream.map(|chunk| chunk.unwrap()).collect().await;
        writer.await.unwrap();
        let text: String = rest
            .iter()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .collect();
        let lines: Vec<DeployEvent> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(matches!(lines[0], DeployEvent::Progress { .. }), "{text}");
        assert!(
            matches!(
                lines[1],
                DeployEvent::Done {
                    release_version: 2,
                    ..
                }
            ),
            "{text}"
        );
    }

    #[test]
    fn batches_follow_max_unavailable() {
        assert_eq!(settings(0.33).batch_size(3), 1);
        assert_eq!(settings(0.33).batch_size(10), 4);
        assert_eq!(settings(0.5).batch_size(1), 1);
        assert_eq!(settings(2.0).batch_size(5), 2);
        assert_eq!(settings(10.0).batch_size(3), 3);
        assert_eq!(settings(1.0).batch_size(0), 1);
    }

    #[test]
    fn strategy_comes_from_the_request_then_the_config() {
        let config = AppConfig::from_json_value(serde_json::json!({"app": "a", "deploy": {"strategy": "canary", "wait_timeout": "30s"}})).unwrap();
        let request = DeployRequest::default();
        let chosen = settings_for(&config, &request).unwrap();
        assert_eq!(chosen.strategy, "canary");
        assert_eq!(chosen.wait_timeout, Duration::from_secs(30));
        let request = DeployRequest {
            strategy: Some("bluegreen".into()),
            ..Default::default()
        };
        assert_eq!(
            settings_for(&config, &request).unwrap().strategy,
            "bluegreen"
        );
        let request = DeployRequest {
            strategy: Some("yolo".into()),
            ..Default::default()
        };
        let err = settings_for(&config, &request).unwrap_err();
        assert!(
            err.message
                .contains("unsupported deployment strategy 'yolo'"),
            "{}",
            err.message
        );
        let request = DeployRequest {
            max_unavailable: Some(0.0),
            ..Default::default()
        };
        assert!(
            settings_for(&config, &request)
                .unwrap_err()
                .message
                .contains("max_unavailable")
        );
    }
}
