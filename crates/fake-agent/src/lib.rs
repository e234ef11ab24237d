//! An agent that runs nothing: it keeps each machine's state in memory and answers the
//! control plane's calls at once. For tests and benchmarks that measure the control
//! plane itself (`bench/control`), never for serving apps.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use aloft_api::MachineState;
use aloft_api::internal::{AgentMachine, MachineSpec, SnapshotFile, VolumeDisk, VolumeDiskRequest};
use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use http::StatusCode;

#[derive(Default)]
pub struct FakeAgent {
    machines: Mutex<HashMap<String, AgentMachine>>,
    /// Volumes by id: their size in GB (a disk of nothing).
    volumes: Mutex<HashMap<String, u64>>,
    seq: AtomicU64,
}

type Shared = Arc<FakeAgent>;
type Answer = Result<Json<AgentMachine>, (StatusCode, Json<serde_json::Value>)>;

impl FakeAgent {
    /// Serves on 127.0.0.1 (any free port) the machine calls the real agent answers (put, get,
    /// start, stop, destroy, restart, signal, suspend, ps, exec); returns its base URL.
    pub async fn spawn() -> std::io::Result<(String, Arc<FakeAgent>)> {
        let agent = Arc::new(FakeAgent::default());
        let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        let url = format!("http://{}", listener.local_addr()?);
        let router = Router::new()
            .route(
                "/v1/machines/{id}",
                get(get_machine).put(put).delete(destroy),
            )
            .route("/v1/machines/{id}/start", post(start))
            .route("/v1/machines/{id}/stop", post(stop))
            .route("/v1/machines/{id}/restart", post(start))
            .route("/v1/machines/{id}/signal", post(get_machine))
            .route("/v1/machines/{id}/suspend", post(suspend))
            .route("/v1/machines/{id}/ps", get(ps))
            .route("/v1/machines/{id}/exec", post(exec))
            .route(
                "/v1/volumes/{id}",
                get(get_volume).put(put_volume).delete(destroy_volume),
            )
            .route("/v1/volumes/{id}/extend", axum::routing::put(put_volume))
            .route(
                "/v1/volumes/{id}/snapshots/{snapshot}",
                post(snapshot_volume),
            )
            .with_state(agent.clone());
        tokio::spawn(async move {
            use axum::serve::ListenerExt;
            let listener = listener.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            });
            let _ = axum::serve(listener, router).await;
        });
        Ok((url, agent))
    }

    pub fn machine_count(&self) -> usize {
        self.machines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    fn set(&self, id: &str, state: MachineState) -> Answer {
        let mut machines = self.machines.lock().unwrap_or_else(|p| p.into_inner());
        let machine = machines.get_mut(id).ok_or_else(|| {
            (
                StatusCode::NOT_FOUND,
                Json(serde_json::json!({ "error": format!("machine {id} not found") })),
            )
        })?;
        machine.state = state;
        machine.seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        Ok(Json(machine.clone()))
    }
}

fn disk(id: &str, size_gb: u64) -> VolumeDisk {
    let blocks = size_gb * 262_144;
    VolumeDisk {
        id: id.to_string(),
        size_bytes: size_gb << 30,
        blocks,
        block_size: 4096,
        blocks_free: blocks,
        blocks_avail: blocks,
        needs_restart: false,
    }
}

type VolumeAnswer = Result<Json<VolumeDisk>, (StatusCode, Json<serde_json::Value>)>;

fn no_volume(id: &str) -> (StatusCode, Json<serde_json::Value>) {
    (
        StatusCode::NOT_FOUND,
        Json(serde_json::json!({ "error": format!("volume {id} is not on this host") })),
    )
}

async fn put_volume(
    State(agent): State<Shared>,
    Path(id): Path<String>,
    Json(request): Json<VolumeDiskRequest>,
) -> VolumeAnswer {
    let mut volumes = agent.volumes.lock().unwrap_or_else(|p| p.into_inner());
    volumes.insert(id.clone(), request.size_gb);
    Ok(Json(disk(&id, request.size_gb)))
}

async fn snapshot_volume(
    State(agent): State<Shared>,
    Path((id, snapshot)): Path<(String, String)>,
) -> Result<Json<SnapshotFile>, (StatusCode, Json<serde_json::Value>)> {
    let volumes = agent.volumes.lock().unwrap_or_else(|p| p.into_inner());
    let size = volumes.get(&id).copied().ok_or_else(|| no_volume(&id))?;
    Ok(Json(SnapshotFile {
        id: snapshot,
        volume: id,
        size: 4096,
        volume_size: size << 30,
        digest: "sha256:0".into(),
        encrypted: false,
    }))
}

async fn get_volume(State(agent): State<Shared>, Path(id): Path<String>) -> VolumeAnswer {
    let volumes = agent.volumes.lock().unwrap_or_else(|p| p.into_inner());
    let size = volumes.get(&id).copied().ok_or_else(|| no_volume(&id))?;
    Ok(Json(disk(&id, size)))
}

async fn destroy_volume(
    State(agent): State<Shared>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, (StatusCode, Json<serde_json::Value>)> {
    let mut volumes = agent.volumes.lock().unwrap_or_else(|p| p.into_inner());
    volumes.remove(&id).ok_or_else(|| no_volume(&id))?;
    Ok(Json(serde_json::json!({ "ok": true })))
}

async fn put(
    State(agent): State<Shared>,
    Path(id): Path<String>,
    Json(spec): Json<MachineSpec>,
) -> Answer {
    let mut machines = agent.machines.lock().unwrap_or_else(|p| p.into_inner());
    let seq = agent.seq.fetch_add(1, Ordering::Relaxed) + 1;
    let entry = machines.entry(id.clone()).or_insert_with(|| AgentMachine {
        id: id.clone(),
        seq,
        app: spec.app.clone(),
        instance_id: spec.instance_id.clone(),
        state: MachineState::Created,
        private_ipv4: Some(format!(
            "172.19.{}.{}",
            (seq / 64) % 256,
            (seq % 64) * 4 + 2
        )),
        last_exit: None,
    });
    entry.instance_id = spec.instance_id;
    entry.seq = seq;
    Ok(Json(entry.clone()))
}

async fn get_machine(State(agent): State<Shared>, Path(id): Path<String>) -> Answer {
    let machines = agent.machines.lock().unwrap_or_else(|p| p.into_inner());
    machines.get(&id).cloned().map(Json).ok_or_else(|| {
        (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({ "error": format!("machine {id} not found") })),
        )
    })
}

async fn start(State(agent): State<Shared>, Path(id): Path<String>) -> Answer {
    agent.set(&id, MachineState::Started)
}

async fn stop(State(agent): State<Shared>, Path(id): Path<String>) -> Answer {
    agent.set(&id, MachineState::Stopped)
}

async fn suspend(State(agent): State<Shared>, Path(id): Path<String>) -> Answer {
    agent.set(&id, MachineState::Suspended)
}

async fn ps() -> Json<Vec<aloft_api::ProcessStat>> {
    Json(vec![aloft_api::ProcessStat {
        pid: 1,
        command: "/.fly/init".into(),
        ..Default::default()
    }])
}

async fn exec() -> Json<aloft_api::ExecResponse> {
    Json(aloft_api::ExecResponse::default())
}

async fn destroy(State(agent): State<Shared>, Path(id): Path<String>) -> Answer {
    let answer = agent.set(&id, MachineState::Destroyed);
    agent
        .machines
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&id);
    answer
}
