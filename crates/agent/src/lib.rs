//! The host agent (Fly's flyd): a durable state machine per machine, images to root
//! filesystems, the container driver, machine networking, restart policy, and the report
//! of every state change to the control plane.

pub mod api;
pub mod container;
pub mod images;
pub mod network;
pub mod shim;
pub mod store;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use aloft_api::internal::{
    AgentEvent, AgentMachine, ExitStatus, HostRegistration, InitConfig, MachineSpec,
};
use aloft_api::{MachineState, RestartPolicy, StopRequest};
use aloft_client::Client;
use anyhow::Context;

use crate::container::ContainerDriver;
use crate::images::{ImageStore, PreparedImage};
use crate::network::MachineLink;
use crate::store::{Desired, MachineRecord, Store};

#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub region: String,
    pub control_url: String,
    pub token: String,
    /// `runc`, `crun` or a path; `None` picks whichever is installed.
    pub runtime: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("machine {0} not found on this host")]
    NotFound(String),
    #[error("{0}")]
    Failed(String),
    #[error(transparent)]
    Store(#[from] store::StoreError),
}

pub struct Agent {
    pub config: AgentConfig,
    pub host_id: String,
    store: Store,
    images: ImageStore,
    driver: ContainerDriver,
    machines_dir: PathBuf,
    locks: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    outbox: tokio::sync::Notify,
}

const DEFAULT_KILL_SIGNAL: &str = "SIGINT";
const DEFAULT_KILL_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_MAX_RETRIES: u32 = 10;

fn now_millis() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl Agent {
    pub fn open(config: AgentConfig) -> anyhow::Result<Arc<Self>> {
        let root = config.data_dir.join("agent");
        std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
        let host_id = host_id(&root)?;
        let store = Store::open(&root.join("agent.db")).context("opening the agent database")?;
        let images = ImageStore::new(&root.join("images")).context("opening the image cache")?;
        let driver = ContainerDriver::new(&root, config.runtime.as_deref())
            .context("setting up the container driver")?;
        let machines_dir = root.join("machines");
        std::fs::create_dir_all(&machines_dir)
            .with_context(|| format!("creating {}", machines_dir.display()))?;
        tracing::info!(host = %host_id, runtime = %driver.runtime_name(), "agent ready");
        Ok(Arc::new(Self {
            config,
            host_id,
            store,
            images,
            driver,
            machines_dir,
            locks: Default::default(),
            outbox: tokio::sync::Notify::new(),
        }))
    }

    fn machine_dir(&self, id: &str) -> PathBuf {
        self.machines_dir.join(id)
    }

    fn lock(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id.to_string())
            .or_default()
            .clone()
    }

    fn record(&self, id: &str) -> Result<MachineRecord, AgentError> {
        self.store
            .machine(id)?
            .ok_or_else(|| AgentError::NotFound(id.to_string()))
    }

    fn view(record: &MachineRecord) -> AgentMachine {
        let link = MachineLink::for_machine(&record.spec.id, record.slot).ok();
        AgentMachine {
            id: record.spec.id.clone(),
            seq: record.seq,
            app: record.spec.app.clone(),
            instance_id: record.spec.instance_id.clone(),
            state: record.state,
            private_ipv4: link.map(|l| l.machine_address.to_string()),
            last_exit: record.last_exit.clone(),
        }
    }

    /// Records a state change with its event (delivered to the control plane later).
    fn transition(
        &self,
        record: &MachineRecord,
        kind: &str,
        state: MachineState,
        exit: Option<ExitStatus>,
        message: Option<String>,
    ) -> Result<MachineRecord, AgentError> {
        let mut event = AgentEvent {
            seq: 0,
            machine_id: record.spec.id.clone(),
            instance_id: record.spec.instance_id.clone(),
            kind: kind.to_string(),
            state,
            timestamp: now_millis(),
            exit: exit.clone(),
            private_ipv4: MachineLink::for_machine(&record.spec.id, record.slot)
                .ok()
                .map(|l| l.machine_address.to_string()),
            message,
        };
        self.store.transition(&mut event, exit.as_ref())?;
        self.outbox.notify_one();
        self.record(&record.spec.id)
    }

    pub fn list(&self) -> Result<Vec<AgentMachine>, AgentError> {
        Ok(self.store.machines()?.iter().map(Self::view).collect())
    }

    pub fn get(&self, id: &str) -> Result<AgentMachine, AgentError> {
        Ok(Self::view(&self.record(id)?))
    }

    /// Stores a machine's spec; it applies from the next start.
    pub async fn put(&self, spec: MachineSpec) -> Result<AgentMachine, AgentError> {
        let lock = self.lock(&spec.id);
        let _guard = lock.lock().await;
        let record = self.store.put_spec(&spec)?;
        std::fs::create_dir_all(self.machine_dir(&spec.id))
            .map_err(|e| AgentError::Failed(format!("creating machine directory: {e}")))?;
        Ok(Self::view(&record))
    }

    pub async fn start(self: &Arc<Self>, id: &str) -> Result<AgentMachine, AgentError> {
        let lock = self.lock(id);
        let _guard = lock.lock().await;
        let record = self.record(id)?;
        if record.state == MachineState::Started && record.shim_pid.is_some() {
            return Ok(Self::view(&record));
        }
        self.store.set_desired(id, Desired::Started)?;
        self.store.set_restarts(id, 0)?;
        let record = self.launch(&record, "start").await?;
        Ok(Self::view(&record))
    }

    /// Brings a machine up; on failure records why and leaves it `failed`.
    async fn launch(
        self: &Arc<Self>,
        record: &MachineRecord,
        kind: &str,
    ) -> Result<MachineRecord, AgentError> {
        match self.try_launch(record).await {
            Ok(pid) => {
                self.store.set_shim(&record.spec.id, Some(pid))?;
                let started = self.transition(record, kind, MachineState::Started, None, None)?;
                self.watch(&record.spec.id, pid);
                Ok(started)
            }
            Err(reason) => {
                let dir = self.machine_dir(&record.spec.id);
                self.driver.cleanup(&dir, &record.spec.id);
                self.store.set_desired(&record.spec.id, Desired::Stopped)?;
                self.transition(
                    record,
                    kind,
                    MachineState::Failed,
                    None,
                    Some(reason.clone()),
                )?;
                Err(AgentError::Failed(reason))
            }
        }
    }

    async fn try_launch(&self, record: &MachineRecord) -> Result<i32, String> {
        let spec = &record.spec;
        let dir = self.machine_dir(&spec.id);
        std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let image = self.image_for(spec, &dir).await?;
        let link = MachineLink::for_machine(&spec.id, record.slot).map_err(|e| e.to_string())?;
        let init = init_config(spec, &image, &link)?;
        let guest = spec
            .config
            .guest
            .clone()
            .unwrap_or_else(aloft_api::MachineGuest::default_shared);
        let driver_dir = dir.clone();
        let id = spec.id.clone();
        let driver = &self.driver;
        tokio::task::block_in_place(|| {
            network::ensure(&link).map_err(|e| format!("machine network: {e}"))?;
            let rootfs = driver
                .prepare_rootfs(&driver_dir, &image)
                .map_err(|e| e.to_string())?;
            driver
                .write_bundle(&driver_dir, &id, &id, &rootfs, &link, &guest)
                .map_err(|e| e.to_string())?;
            driver
                .launch(&driver_dir, &id, &init)
                .map_err(|e| e.to_string())
        })
    }

    /// The prepared image for the spec's reference, pulled once per machine and cached.
    async fn image_for(&self, spec: &MachineSpec, dir: &Path) -> Result<PreparedImage, String> {
        let cache = dir.join("image.json");
        if let Ok(bytes) = std::fs::read(&cache) {
            if let Ok(image) = serde_json::from_slice::<PreparedImage>(&bytes) {
                if image.reference == spec.image.reference
                    && image.layers.iter().all(|l| l.exists())
                {
                    return Ok(image);
                }
            }
        }
        let image = self
            .images
            .prepare(&spec.image)
            .await
            .map_err(|e| e.to_string())?;
        if let Ok(bytes) = serde_json::to_vec(&image) {
            let _ = std::fs::write(&cache, bytes);
        }
        Ok(image)
    }

    /// Follows the shim until it exits, then handles the exit.
    fn watch(self: &Arc<Self>, id: &str, pid: i32) {
        let agent = self.clone();
        let id = id.to_string();
        tokio::spawn(async move {
            match shim::exit_watch(pid) {
                Ok(fd) => {
                    let _ = fd.readable().await;
                }
                Err(err) => {
                    tracing::warn!(machine = %id, error = %err, "cannot watch the machine shim; polling");
                    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
            agent.handle_exit(&id, pid).await;
        });
    }

    /// A machine's shim has exited: record how, then apply the restart policy.
    async fn handle_exit(self: &Arc<Self>, id: &str, pid: i32) {
        let lock = self.lock(id);
        let _guard = lock.lock().await;
        let Ok(record) = self.record(id) else { return };
        if record.shim_pid != Some(pid) {
            return;
        }
        let dir = self.machine_dir(id);
        let mut exit = shim::read_exit(&dir).unwrap_or(ExitStatus {
            exit_code: -1,
            ..Default::default()
        });
        exit.requested_stop = record.desired == Desired::Stopped;
        self.driver.cleanup(&dir, id);
        if let Err(err) = self.store.set_shim(id, None) {
            tracing::error!(machine = id, error = %err, "recording the shim's exit failed");
            return;
        }
        let record = match self.transition(
            &record,
            "exit",
            MachineState::Stopped,
            Some(exit.clone()),
            None,
        ) {
            Ok(record) => record,
            Err(err) => {
                tracing::error!(machine = id, error = %err, "recording a machine exit failed");
                return;
            }
        };
        if record.desired != Desired::Started {
            return;
        }
        let restart = record.spec.config.restart.clone().unwrap_or_default();
        let failed = exit.exit_code != 0 || exit.signal.is_some() || exit.oom_killed;
        let max_retries = restart.max_retries.unwrap_or(DEFAULT_MAX_RETRIES);
        let again = match restart.policy {
            RestartPolicy::No | RestartPolicy::SpotPrice => false,
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => failed && record.restarts < max_retries,
        };
        if !again {
            let _ = self.store.set_desired(id, Desired::Stopped);
            return;
        }
        let restarts = record.restarts + 1;
        let _ = self.store.set_restarts(id, restarts);
        let backoff = Duration::from_millis((100u64 << restarts.min(6)).min(5_000));
        let agent = self.clone();
        let id = id.to_string();
        tokio::spawn(async move {
            tokio::time::sleep(backoff).await;
            let lock = agent.lock(&id);
            let _guard = lock.lock().await;
            let Ok(record) = agent.record(&id) else {
                return;
            };
            if record.desired != Desired::Started || record.shim_pid.is_some() {
                return;
            }
            let restarts = record.restarts;
            if let Err(err) = agent.launch(&record, "restart").await {
                tracing::warn!(machine = %id, error = %err, "restart failed");
            }
            let _ = agent.store.set_restarts(&id, restarts);
        });
    }

    pub async fn stop(
        self: &Arc<Self>,
        id: &str,
        request: &StopRequest,
    ) -> Result<AgentMachine, AgentError> {
        let pid = {
            let lock = self.lock(id);
            let _guard = lock.lock().await;
            let record = self.record(id)?;
            self.store.set_desired(id, Desired::Stopped)?;
            let Some(pid) = record.shim_pid else {
                return Ok(Self::view(&record));
            };
            let stop_config = record.spec.config.stop_config.clone().unwrap_or_default();
            let signal = request
                .signal
                .clone()
                .or(stop_config.signal)
                .unwrap_or_else(|| DEFAULT_KILL_SIGNAL.to_string());
            let timeout = request
                .timeout
                .or(stop_config.timeout)
                .map(|d| d.to_std())
                .unwrap_or(DEFAULT_KILL_TIMEOUT);
            if let Err(err) = self.driver.signal(id, &signal) {
                tracing::debug!(machine = id, error = %err, "signalling the machine");
            }
            if !wait_for_exit(pid, timeout).await {
                let _ = self.driver.signal(id, "SIGKILL");
                wait_for_exit(pid, Duration::from_secs(10)).await;
            }
            pid
        };
        self.handle_exit(id, pid).await;
        self.get(id)
    }

    pub async fn destroy(self: &Arc<Self>, id: &str) -> Result<AgentMachine, AgentError> {
        let record = self.record(id)?;
        if record.shim_pid.is_some() {
            self.stop(
                id,
                &StopRequest {
                    signal: Some("SIGKILL".into()),
                    timeout: Some(aloft_api::Duration::from_secs(1)),
                },
            )
            .await?;
        }
        let lock = self.lock(id);
        let _guard = lock.lock().await;
        let record = self.record(id)?;
        let dir = self.machine_dir(id);
        self.driver.cleanup(&dir, id);
        if let Ok(link) = MachineLink::for_machine(id, record.slot) {
            tokio::task::block_in_place(|| network::teardown(&link));
        }
        let record = self.transition(&record, "destroy", MachineState::Destroyed, None, None)?;
        self.store.remove_machine(id)?;
        let _ = std::fs::remove_dir_all(&dir);
        Ok(Self::view(&record))
    }

    /// After a restart: re-attach to machines whose shims still run, account for those
    /// that ended meanwhile, and bring back machines that should be running.
    pub async fn reconcile(self: &Arc<Self>) -> anyhow::Result<()> {
        for record in self.store.machines()? {
            let id = record.spec.id.clone();
            match record.shim_pid {
                Some(pid) if shim::is_shim_of(pid, &self.machine_dir(&id)) => {
                    tracing::info!(machine = %id, pid, "re-attached to running machine");
                    self.watch(&id, pid);
                }
                Some(pid) => self.handle_exit(&id, pid).await,
                None if record.desired == Desired::Started => {
                    let agent = self.clone();
                    tokio::spawn(async move {
                        let lock = agent.lock(&id);
                        let _guard = lock.lock().await;
                        if let Ok(record) = agent.record(&id) {
                            if record.shim_pid.is_none() {
                                let _ = agent.launch(&record, "start").await;
                            }
                        }
                    });
                }
                None => {}
            }
        }
        Ok(())
    }

    /// Stops every running machine (the server is shutting down) but keeps them wanted,
    /// so the next start brings them back.
    pub async fn stop_all_for_shutdown(self: &Arc<Self>) {
        let Ok(records) = self.store.machines() else {
            return;
        };
        let mut stops = Vec::new();
        for record in records.into_iter().filter(|r| r.shim_pid.is_some()) {
            let agent = self.clone();
            stops.push(tokio::spawn(async move {
                let id = record.spec.id.clone();
                let _ = agent.stop(&id, &StopRequest::default()).await;
                let _ = agent.store.set_desired(&id, Desired::Started);
            }));
        }
        for stop in stops {
            let _ = stop.await;
        }
    }

    /// Serves the agent API on `listener` forever.
    pub async fn serve(self: Arc<Self>, listener: tokio::net::TcpListener) -> anyhow::Result<()> {
        axum::serve(listener, api::router(self))
            .await
            .context("serving the agent API")
    }

    /// Registers with the control plane, then delivers events forever.
    pub async fn report(self: Arc<Self>) {
        let client = Client::new(&self.config.control_url, Some(self.config.token.clone()))
            .with_timeout(Duration::from_secs(10));
        let registration = HostRegistration {
            id: self.host_id.clone(),
            region: self.config.region.clone(),
            agent_url: format!("http://{}", self.config.listen),
        };
        let mut backoff = Duration::from_millis(100);
        loop {
            match client
                .call(http::Method::POST, "/v1/hosts", Some(&registration))
                .await
            {
                Ok(()) => break,
                Err(err) => {
                    tracing::warn!(error = %err, "registering with the control plane");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        let path = format!("/v1/hosts/{}/events", self.host_id);
        loop {
            let events = match self.store.pending_events(256) {
                Ok(events) => events,
                Err(err) => {
                    tracing::error!(error = %err, "reading the event outbox");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let Some(last) = events.last().map(|e| e.seq) else {
                let _ = tokio::time::timeout(Duration::from_secs(1), self.outbox.notified()).await;
                continue;
            };
            match client.call(http::Method::POST, &path, Some(&events)).await {
                Ok(()) => {
                    if let Err(err) = self.store.delivered(last) {
                        tracing::error!(error = %err, "clearing delivered events");
                    }
                    backoff = Duration::from_millis(100);
                }
                Err(err) => {
                    tracing::warn!(error = %err, "delivering events to the control plane");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

async fn wait_for_exit(pid: i32, timeout: Duration) -> bool {
    let exited = async {
        match shim::exit_watch(pid) {
            Ok(fd) => {
                let _ = fd.readable().await;
            }
            Err(_) => {
                while std::path::Path::new(&format!("/proc/{pid}")).exists() {
                    tokio::time::sleep(container::STOP_POLL).await;
                }
            }
        }
    };
    tokio::time::timeout(timeout, exited).await.is_ok()
}

/// This host's stable identity, created on first start.
fn host_id(root: &Path) -> anyhow::Result<String> {
    let path = root.join("host_id");
    if let Ok(text) = std::fs::read_to_string(&path) {
        let id = text.trim().to_string();
        if !id.is_empty() {
            return Ok(id);
        }
    }
    let id = format!(
        "host-{}",
        &ulid::Ulid::new().to_string().to_lowercase()[16..]
    );
    std::fs::write(&path, &id).with_context(|| format!("writing {}", path.display()))?;
    Ok(id)
}

/// What init runs, with which environment: the machine config's init section over the
/// image's entrypoint and cmd (Docker's rules), and the platform's variables.
pub fn init_config(
    spec: &MachineSpec,
    image: &PreparedImage,
    link: &MachineLink,
) -> Result<InitConfig, String> {
    let init = spec.config.init.clone().unwrap_or_default();
    let argv = if !init.exec.is_empty() {
        init.exec.clone()
    } else {
        let entrypoint = if init.entrypoint.is_empty() {
            image.run.entrypoint.clone().unwrap_or_default()
        } else {
            init.entrypoint.clone()
        };
        let cmd = if !init.cmd.is_empty() {
            init.cmd.clone()
        } else if init.entrypoint.is_empty() {
            image.run.cmd.clone().unwrap_or_default()
        } else {
            Vec::new()
        };
        entrypoint.into_iter().chain(cmd).collect()
    };
    if argv.is_empty() {
        return Err(format!(
            "image {} has no command to run: it sets no entrypoint or cmd, and the machine config gives none",
            image.reference
        ));
    }
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    for pair in image.run.env.clone().unwrap_or_default() {
        if let Some((key, value)) = pair.split_once('=') {
            env.insert(key.to_string(), value.to_string());
        }
    }
    env.entry("PATH".into())
        .or_insert_with(|| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    for (key, value) in &spec.config.env {
        env.insert(key.clone(), value.clone());
    }
    let group = spec.config.process_group().unwrap_or("app").to_string();
    let memory = spec
        .config
        .guest
        .as_ref()
        .map(|g| g.memory_mb)
        .filter(|m| *m > 0)
        .unwrap_or(256);
    let platform = [
        ("FLY_APP_NAME", spec.app.clone()),
        ("FLY_MACHINE_ID", spec.id.clone()),
        ("FLY_ALLOC_ID", spec.id.clone()),
        ("FLY_REGION", spec.region.clone()),
        ("FLY_IMAGE_REF", spec.config.image.clone()),
        ("FLY_MACHINE_VERSION", spec.instance_id.clone()),
        ("FLY_PROCESS_GROUP", group),
        ("FLY_VM_MEMORY_MB", memory.to_string()),
        ("FLY_PRIVATE_IPV4", link.machine_address.to_string()),
    ];
    for (key, value) in platform {
        env.insert(key.to_string(), value);
    }
    let mut etc_hosts = vec![(link.machine_address.to_string(), spec.id.clone())];
    if let Some(ip) = spec.private_ip.as_ref().filter(|ip| !ip.is_empty()) {
        env.insert("FLY_PRIVATE_IP".into(), ip.clone());
        etc_hosts.push((ip.clone(), "fly-local-6pn".into()));
    }
    let files = spec
        .config
        .files
        .iter()
        .filter_map(|f| {
            f.raw_value
                .as_ref()
                .map(|raw| aloft_api::internal::InitFile {
                    path: f.guest_path.clone(),
                    content: raw.clone(),
                    mode: f.mode,
                })
        })
        .collect();
    Ok(InitConfig {
        argv,
        env,
        user: image.run.user.clone().unwrap_or_default(),
        workdir: image.run.working_dir.clone().unwrap_or_default(),
        hostname: spec.id.clone(),
        etc_hosts,
        nameservers: Vec::new(),
        files,
        mount_standard_filesystems: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::images::RunConfig;

    fn image(entrypoint: Option<Vec<&str>>, cmd: Option<Vec<&str>>) -> PreparedImage {
        PreparedImage {
            reference: "r".into(),
            digest: "d".into(),
            layers: vec![],
            run: RunConfig {
                entrypoint: entrypoint.map(|v| v.into_iter().map(String::from).collect()),
                cmd: cmd.map(|v| v.into_iter().map(String::from).collect()),
                env: Some(vec!["PATH=/bin".into(), "A=image".into()]),
                ..Default::default()
            },
        }
    }

    fn spec() -> MachineSpec {
        let mut spec = MachineSpec {
            id: "0123456789abcd".into(),
            app: "hello".into(),
            region: "local".into(),
            instance_id: "v1".into(),
            ..Default::default()
        };
        spec.config.env.insert("A".into(), "config".into());
        spec.config
            .metadata
            .insert("fly_process_group".into(), "web".into());
        spec
    }

    #[test]
    fn command_follows_docker_rules() {
        let link = MachineLink::for_machine("0123456789abcd", 0).unwrap();
        let mut s = spec();
        let i = init_config(&s, &image(Some(vec!["/ep"]), Some(vec!["a"])), &link).unwrap();
        assert_eq!(i.argv, vec!["/ep", "a"]);
        s.config.init = Some(aloft_api::MachineInit {
            cmd: vec!["b".into()],
            ..Default::default()
        });
        assert_eq!(
            init_config(&s, &image(Some(vec!["/ep"]), Some(vec!["a"])), &link)
                .unwrap()
                .argv,
            vec!["/ep", "b"]
        );
        s.config.init = Some(aloft_api::MachineInit {
            entrypoint: vec!["/other".into()],
            ..Default::default()
        });
        assert_eq!(
            init_config(&s, &image(Some(vec!["/ep"]), Some(vec!["a"])), &link)
                .unwrap()
                .argv,
            vec!["/other"]
        );
        s.config.init = Some(aloft_api::MachineInit {
            exec: vec!["/x".into()],
            ..Default::default()
        });
        assert_eq!(
            init_config(&s, &image(Some(vec!["/ep"]), Some(vec!["a"])), &link)
                .unwrap()
                .argv,
            vec!["/x"]
        );
        assert!(
            init_config(&spec(), &image(None, None), &link)
                .unwrap_err()
                .contains("no command")
        );
    }

    #[test]
    fn env_layers_image_config_and_platform() {
        let link = MachineLink::for_machine("0123456789abcd", 0).unwrap();
        let i = init_config(&spec(), &image(None, Some(vec!["/bin/app"])), &link).unwrap();
        assert_eq!(i.env["A"], "config");
        assert_eq!(i.env["PATH"], "/bin");
        assert_eq!(i.env["FLY_APP_NAME"], "hello");
        assert_eq!(i.env["FLY_MACHINE_ID"], "0123456789abcd");
        assert_eq!(i.env["FLY_ALLOC_ID"], "0123456789abcd");
        assert_eq!(i.env["FLY_PROCESS_GROUP"], "web");
        assert_eq!(i.env["FLY_MACHINE_VERSION"], "v1");
        assert_eq!(i.env["FLY_VM_MEMORY_MB"], "256");
        assert_eq!(i.hostname, "0123456789abcd");
    }
}
