//! The host agent (Fly's flyd): a durable state machine per machine, images to root
//! filesystems, the runtime driver (containers; microVMs slot in behind [`Driver`]),
//! machine networking, restart policy, health checks, logs, exec, metrics, and the report
//! of every state change to the control plane.

pub mod api;
pub mod block_image;
pub mod checks;
pub mod console;
pub mod container;
pub mod driver;
pub mod image_files;
pub mod images;
pub mod init_config;
pub mod logs;
pub mod mesh;
pub mod metrics;
pub mod microvm;
pub mod network;
pub mod probe;
pub mod procfs;
pub mod seccomp;
pub mod secrets;
pub mod shim;
pub mod store;
pub mod unpack;
pub mod volumes;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use aloft_api::internal::{
    AgentEvent, AgentMachine, ExecResponse, ExitStatus, HostRegistration, MachineExecRequest,
    MachineSpec, ProcessStat,
};
use aloft_api::{MachineState, RestartPolicy, StopRequest};
use aloft_client::Client;
use anyhow::Context;
use nix::sys::signal::Signal;

pub use crate::driver::Driver;
pub use crate::init_config::init_config;

use crate::container::ContainerDriver;
use crate::driver::{DriverError, ExecCommand, StartRequest};
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
    /// Containers, microVMs, or microVMs where KVM boots the guest kernel.
    pub driver: microvm::DriverChoice,
    pub vm: microvm::MicrovmOptions,
    /// How much of each machine's log is kept.
    pub log_limits: logs::LogLimits,
    /// The root filesystem size of machines whose config sets no `rootfs.size_gb`.
    pub rootfs_default_gb: u32,
    /// What machines may reserve on this host (registered with the control plane).
    pub capacity: HostCapacity,
    /// Where this host's WireGuard mesh listens (and other hosts send to); None: this host
    /// is no mesh member.
    pub mesh_listen: Option<SocketAddr>,
}

/// The CPUs and memory a host offers its machines.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostCapacity {
    pub cpus: u64,
    pub memory_mb: u64,
}

impl HostCapacity {
    /// This host's CPUs and memory, each replaced by `cpus`/`memory_mb` when given; 0
    /// where it cannot be read (no limit).
    pub fn detect(cpus: Option<u64>, memory_mb: Option<u64>) -> Self {
        let detected_cpus = || {
            std::thread::available_parallelism()
                .map(|n| n.get() as u64)
                .unwrap_or(0)
        };
        let detected_memory = || {
            std::fs::read_to_string("/proc/meminfo")
                .ok()
                .and_then(|text| meminfo_total_mb(&text))
                .unwrap_or(0)
        };
        Self {
            cpus: cpus.unwrap_or_else(detected_cpus),
            memory_mb: memory_mb.unwrap_or_else(detected_memory),
        }
    }
}

/// `MemTotal` of /proc/meminfo, in MB.
fn meminfo_total_mb(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024)
}

/// `aloft server --machine-rootfs-default-gb`'s default.
pub const DEFAULT_ROOTFS_GB: u32 = 8;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("machine {0} not found on this host")]
    NotFound(String),
    #[error("{0}")]
    Failed(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Timeout(String),
    #[error(transparent)]
    Store(#[from] store::StoreError),
}

pub struct Agent {
    pub config: AgentConfig,
    pub host_id: String,
    store: Store,
    images: ImageStore,
    driver: Arc<dyn Driver>,
    secrets: secrets::SecretsSource,
    machines_dir: PathBuf,
    logs_archive: PathBuf,
    locks: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    outbox: tokio::sync::Notify,
    checks: checks::Checks,
    volumes: volumes::Volumes,
    /// This run's mesh key (with `mesh_listen`).
    mesh: Option<mesh::MeshIdentity>,
    /// This host's number in 6PN addresses, as the control plane answered registration.
    host_number: std::sync::OnceLock<u32>,
}

const DEFAULT_KILL_SIGNAL: &str = "SIGINT";
const DEFAULT_KILL_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_MAX_RETRIES: u32 = 10;
/// Longest wait between two restarts of a crashing machine.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// `max_retries` counts restarts of runs shorter than this (Fly's 5-minute window).
const RESTART_WINDOW: Duration = Duration::from_secs(300);
/// A machine needs at least this much memory to run init and a program.
const MIN_MEMORY_MB: u32 = 64;

fn now_millis() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn volume_failure(err: volumes::VolumeError) -> AgentError {
    match err {
        volumes::VolumeError::NotFound(_) => AgentError::NotFound(err.to_string()),
        volumes::VolumeError::BadRequest(m) => AgentError::BadRequest(m),
        volumes::VolumeError::Conflict(m) => AgentError::Conflict(m),
        volumes::VolumeError::Failed(m) => AgentError::Failed(m),
    }
}

fn driver_failure(err: DriverError) -> AgentError {
    match err {
        DriverError::NotRunning => AgentError::Conflict("the machine is not running".into()),
        other => AgentError::Failed(other.to_string()),
    }
}

/// The consecutive restarts that still count once a run that began at `run_started`
/// (Unix ms) ends at `now`: all of them if it ended within the window, none otherwise
/// (or when its start is unknown).
pub fn restarts_in_window(restarts: u32, run_started: Option<i64>, now: i64) -> u32 {
    let window = RESTART_WINDOW.as_millis() as i64;
    match run_started {
        Some(started) if now.saturating_sub(started) < window => restarts,
        _ => 0,
    }
}

/// Wait after the `restarts`-th consecutive restart: 200 ms doubling, at most 5 s.
pub fn restart_backoff(restarts: u32) -> Duration {
    Duration::from_millis(100u64 << restarts.clamp(1, 16)).min(MAX_BACKOFF)
}

/// Whether the restart policy brings a machine back after `exit`, given how many times
/// it was restarted in a row already.
pub fn should_restart(
    policy: Option<&aloft_api::MachineRestart>,
    exit: &ExitStatus,
    restarts: u32,
) -> bool {
    let restart = policy.cloned().unwrap_or_default();
    let failed = exit.exit_code != 0 || exit.signal.is_some() || exit.oom_killed;
    match restart.policy {
        RestartPolicy::No | RestartPolicy::SpotPrice => false,
        RestartPolicy::Always => true,
        RestartPolicy::OnFailure => {
            failed && restarts < restart.max_retries.unwrap_or(DEFAULT_MAX_RETRIES)
        }
    }
}

impl Agent {
    pub fn open(config: AgentConfig) -> anyhow::Result<Arc<Self>> {
        let root = config.data_dir.join("agent");
        std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
        let driver: Arc<dyn Driver> = match config.driver {
            microvm::DriverChoice::Microvm => Arc::new(
                microvm::MicrovmDriver::new(&root, &config.vm)
                    .context("setting up the microVM driver")?,
            ),
            microvm::DriverChoice::Auto => match microvm::auto_select(&root, &config.vm) {
                Ok(driver) => {
                    tracing::info!("driver auto: microVMs (KVM boots the guest kernel)");
                    Arc::new(driver)
                }
                Err(why) => {
                    tracing::info!(why = %why, "driver auto: containers");
                    Arc::new(
                        ContainerDriver::new(&root, config.runtime.as_deref())
                            .context("setting up the container driver")?,
                    )
                }
            },
            microvm::DriverChoice::Container => Arc::new(
                ContainerDriver::new(&root, config.runtime.as_deref())
                    .context("setting up the container driver")?,
            ),
        };
        Self::open_with_driver(config, driver)
    }

    /// Opens the agent with a given runtime driver (containers, microVMs).
    pub fn open_with_driver(
        config: AgentConfig,
        driver: Arc<dyn Driver>,
    ) -> anyhow::Result<Arc<Self>> {
        let root = config.data_dir.join("agent");
        std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
        let host_id = host_id(&root)?;
        let store = Store::open(&root.join("agent.db")).context("opening the agent database")?;
        let images = ImageStore::new(&root.join("images"), driver.layer_id_shift())
            .context("opening the image cache")?;
        let machines_dir = root.join("machines");
        let logs_archive = root.join("logs");
        for dir in [&machines_dir, &logs_archive] {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        logs::expire(&logs_archive, logs::RETENTION);
        let volumes = volumes::Volumes::new(&root.join("volumes"))
            .map_err(|e| anyhow::anyhow!("opening the volumes directory: {e}"))?
            .for_machines_in(driver.layer_id_shift())
            .as_disks(driver.volumes_as_disks());
        tracing::info!(host = %host_id, runtime = %driver.name(), "agent ready");
        let secrets = secrets::SecretsSource::new(&config.control_url, &config.token, &host_id);
        let mesh = config
            .mesh_listen
            .map(mesh::MeshIdentity::generate)
            .transpose()?;
        Ok(Arc::new(Self {
            mesh,
            host_number: std::sync::OnceLock::new(),
            config,
            host_id,
            store,
            images,
            driver,
            secrets,
            machines_dir,
            logs_archive,
            locks: Default::default(),
            outbox: tokio::sync::Notify::new(),
            checks: checks::Checks::default(),
            volumes,
        }))
    }

    pub fn driver_name(&self) -> String {
        self.driver.name()
    }

    pub fn driver_description(&self) -> String {
        self.driver.describe()
    }

    fn machine_dir(&self, id: &str) -> PathBuf {
        self.machines_dir.join(id)
    }

    /// What `components` (from the image's root) name in the image of machine `id` on
    /// this host: read-only, never through a symlink (see [`image_files`]). The proxy
    /// serves `[[statics]]` with it.
    pub fn image_entry(
        &self,
        id: &str,
        components: &[&str],
    ) -> Result<image_files::ImageEntry, AgentError> {
        if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(AgentError::NotFound(id.to_string()));
        }
        let bytes = std::fs::read(self.machine_dir(id).join("image.json"))
            .map_err(|_| AgentError::NotFound(id.to_string()))?;
        let image: PreparedImage = serde_json::from_slice(&bytes)
            .map_err(|e| AgentError::Failed(format!("the image record of machine {id}: {e}")))?;
        image_files::lookup(&image.layers, components).map_err(|e| match e {
            image_files::ImageFileError::BadComponent(_) => AgentError::BadRequest(e.to_string()),
            image_files::ImageFileError::Io(_) => AgentError::Failed(e.to_string()),
        })
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

    /// Looks at a port of machine `id` from this host (`probe::probe`).
    pub async fn probe_machine(
        &self,
        id: &str,
        request: &aloft_api::internal::ProbeRequest,
    ) -> Result<aloft_api::internal::ProbeOutcome, AgentError> {
        let record = self.record(id)?;
        let link = MachineLink::for_machine(&record.spec.id, record.slot)
            .map_err(|e| AgentError::Failed(format!("machine {id} has no network link: {e}")))?;
        Ok(probe::probe(link.machine_address.into(), request).await)
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
            restart_count: exit.is_some().then_some(record.restart_total),
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

    /// Stores a machine's spec and pulls its image (layers already cached are not pulled
    /// again); the spec applies from the next start.
    pub async fn put(&self, spec: MachineSpec) -> Result<AgentMachine, AgentError> {
        let lock = self.lock(&spec.id);
        let _guard = lock.lock().await;
        let dir = self.machine_dir(&spec.id);
        std::fs::create_dir_all(&dir)
            .map_err(|e| AgentError::Failed(format!("creating machine directory: {e}")))?;
        self.image_for(&spec, &dir)
            .await
            .map_err(AgentError::Failed)?;
        let record = self.store.put_spec(&spec)?;
        Ok(Self::view(&record))
    }

    pub async fn start(self: &Arc<Self>, id: &str) -> Result<AgentMachine, AgentError> {
        let lock = self.lock(id);
        let _guard = lock.lock().await;
        let record = self.record(id)?;
        if record.state == MachineState::Suspended && record.shim_pid.is_some() {
            let dir = self.machine_dir(id);
            let driver = self.driver.clone();
            let resumed =
                tokio::task::spawn_blocking(move || driver.resume(&record.spec.id, &dir)).await;
            if let Ok(Ok(())) = resumed {
                self.store.set_desired(id, Desired::Started)?;
                let record = self.record(id)?;
                let record =
                    self.transition(&record, "resume", MachineState::Started, None, None)?;
                self.checks.watch(self, &record);
                return Ok(Self::view(&record));
            }
            // It could not be thawed: fall back to a cold start.
            let record = self.record(id)?;
            if let Some(pid) = record.shim_pid {
                self.kill_and_wait(id, pid).await;
            }
        }
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
                let waiting = std::time::Instant::now();
                wait_for_services(record, pid).await;
                tracing::debug!(machine = %record.spec.id, waited = ?waiting.elapsed(), "services accept connections");
                let started = self.transition(record, kind, MachineState::Started, None, None)?;
                self.store
                    .set_run_started(&record.spec.id, Some(now_millis()))?;
                self.watch(&record.spec.id, pid);
                self.checks.watch(self, &started);
                Ok(started)
            }
            Err(reason) => {
                let dir = self.machine_dir(&record.spec.id);
                self.driver.cleanup(&record.spec.id, &dir);
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
        let began = std::time::Instant::now();
        let dir = self.machine_dir(&spec.id);
        std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let guest = spec
            .config
            .guest
            .clone()
            .unwrap_or_else(aloft_api::MachineGuest::default_shared);
        check_guest(&guest)?;
        let rootfs_size_gb = rootfs_size_gb(&spec.config, self.config.rootfs_default_gb)?;
        let image = self.image_for(spec, &dir).await?;
        let link = MachineLink::for_machine(&spec.id, record.slot)
            .map_err(|e| e.to_string())?
            .with_private_ip(spec.private_ip.as_deref());
        let mut init = init_config(spec, &image, &link, network::outbound_address())?;
        let secrets = self.secrets.for_machine(spec).await?;
        secrets::apply(&mut init, spec, &secrets)?;
        let _ = std::fs::remove_file(dir.join(driver::EXIT_FILE));
        self.config
            .log_limits
            .save(&dir)
            .map_err(|e| format!("recording the log limits in {}: {e}", dir.display()))?;
        let driver = self.driver.clone();
        let id = spec.id.clone();
        let prepared = began.elapsed();
        let config = spec.config.clone();
        let volumes = self.volumes.clone();
        let spec_for_volumes = spec.clone();
        let mut volume_keys = HashMap::new();
        for mount in &spec.config.mounts {
            if volumes.is_encrypted(&mount.volume) {
                let key = self.secrets.volume_key(&mount.volume).await?;
                volume_keys.insert(mount.volume.clone(), key);
            }
        }
        tokio::task::spawn_blocking(move || {
            let scheduled = began.elapsed();
            let volume_mounts = volumes
                .mounts_for(&spec_for_volumes, &volume_keys)
                .map_err(|e| format!("volumes: {e}"))?;
            driver
                .ensure_network(&link)
                .map_err(|e| format!("machine network: {e}"))?;
            let networked = began.elapsed();
            let request = StartRequest {
                machine_id: &id,
                machine_dir: &dir,
                image: &image,
                link: &link,
                guest: &guest,
                config: &config,
                init: &init,
                rootfs_size_gb,
                volumes: &volume_mounts,
            };
            let started = driver.start(&request).map_err(|e| e.to_string());
            tracing::debug!(machine = %id, ?prepared, ?scheduled, ?networked, total = ?began.elapsed(), "machine launched");
            started
        })
        .await
        .map_err(|e| format!("starting the machine: {e}"))?
    }

    /// The prepared image for the spec's reference, pulled once per machine and cached.
    async fn image_for(&self, spec: &MachineSpec, dir: &Path) -> Result<PreparedImage, String> {
        let cache = dir.join("image.json");
        if let Ok(bytes) = std::fs::read(&cache)
            && let Ok(image) = serde_json::from_slice::<PreparedImage>(&bytes)
            && image.reference == spec.image.reference
            && image.layers.iter().all(|l| l.exists())
        {
            return Ok(image);
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

    /// Follows the supervisor until it exits, then handles the exit.
    fn watch(self: &Arc<Self>, id: &str, pid: i32) {
        let agent = self.clone();
        let id = id.to_string();
        tokio::spawn(async move {
            wait_for_exit(pid, None).await;
            agent.handle_exit(&id, pid).await;
        });
    }

    /// Why a run ended, in words, from its exit status and init's last words in the log.
    fn exit_reason(
        &self,
        id: &str,
        exit: &ExitStatus,
        guest: &aloft_api::MachineGuest,
    ) -> Option<String> {
        if exit.oom_killed {
            return Some(format!(
                "out of memory: the machine used all of its {} MB (guest.memory_mb) and was killed",
                guest.memory_mb.max(MIN_MEMORY_MB)
            ));
        }
        if exit.requested_stop || exit.exit_code == 0 {
            return None;
        }
        let log = self.machine_dir(id).join(logs::LOG_FILE);
        let said = logs::tail(&log, 20)
            .into_iter()
            .rev()
            .find(|r| r.message.starts_with("init: ") && !r.message.starts_with("init: main child"))
            .map(|r| r.message.trim_start_matches("init: ").to_string());
        Some(match (said, exit.signal) {
            (Some(said), _) => said,
            (None, Some(signal)) => {
                format!("the main process was killed by {}", signal_name(signal))
            }
            (None, None) => format!("the main process exited with code {}", exit.exit_code),
        })
    }

    /// A machine's supervisor has exited: record how, then apply the restart policy.
    async fn handle_exit(self: &Arc<Self>, id: &str, pid: i32) {
        let lock = self.lock(id);
        let _guard = lock.lock().await;
        let Ok(record) = self.record(id) else { return };
        if record.shim_pid != Some(pid) {
            return;
        }
        self.checks.forget(id);
        let dir = self.machine_dir(id);
        let mut exit = driver::read_exit(&dir).unwrap_or(ExitStatus {
            exit_code: -1,
            ..Default::default()
        });
        exit.requested_stop = record.desired == Desired::Stopped;
        {
            let driver = self.driver.clone();
            let (id, dir) = (id.to_string(), dir.clone());
            let _ = tokio::task::spawn_blocking(move || driver.cleanup(&id, &dir)).await;
        }
        if let Err(err) = self.store.set_shim(id, None) {
            tracing::error!(machine = id, error = %err, "recording the machine's exit failed");
            return;
        }
        let guest = record
            .spec
            .config
            .guest
            .clone()
            .unwrap_or_else(aloft_api::MachineGuest::default_shared);
        let message = self.exit_reason(id, &exit, &guest);
        // Retries count within a window: a machine that ran for a while before failing
        // starts counting again. The run's start is stored, so this holds across restarts
        // of the agent.
        let run_started = self.store.run_started(id).ok().flatten();
        let _ = self.store.set_run_started(id, None);
        let mut record = record;
        let restarts = restarts_in_window(record.restarts, run_started, now_millis());
        if restarts != record.restarts {
            let _ = self.store.set_restarts(id, restarts);
            record.restarts = restarts;
        }
        let again = record.desired == Desired::Started
            && should_restart(record.spec.config.restart.as_ref(), &exit, record.restarts);
        exit.restarting = again;
        let record = match self.transition(
            &record,
            "exit",
            MachineState::Stopped,
            Some(exit.clone()),
            message,
        ) {
            Ok(record) => record,
            Err(err) => {
                tracing::error!(machine = id, error = %err, "recording a machine exit failed");
                return;
            }
        };
        if !again {
            let _ = self.store.set_desired(id, Desired::Stopped);
            return;
        }
        let restarts = record.restarts + 1;
        let _ = self.store.set_restarts(id, restarts);
        let _ = self.store.count_restart(id);
        let backoff = restart_backoff(restarts);
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
            if let Err(err) = agent.launch(&record, "restart").await {
                tracing::warn!(machine = %id, error = %err, "restart failed");
            }
        });
    }

    /// SIGKILL and wait until the supervisor is gone (a frozen machine is thawed for it).
    async fn kill_and_wait(&self, id: &str, pid: i32) {
        let driver = self.driver.clone();
        let (machine, dir) = (id.to_string(), self.machine_dir(id));
        let _ = tokio::task::spawn_blocking(move || driver.kill(&machine, &dir)).await;
        wait_for_exit(pid, Some(Duration::from_secs(10))).await;
    }

    /// Sends the stop signal, waits up to the timeout, then kills. Returns the supervisor
    /// pid that was running, if any. The caller holds the machine's lock.
    async fn stop_locked(
        &self,
        id: &str,
        request: &StopRequest,
    ) -> Result<Option<i32>, AgentError> {
        let record = self.record(id)?;
        let Some(pid) = record.shim_pid else {
            return Ok(None);
        };
        self.checks.forget(id);
        if record.state == MachineState::Suspended {
            self.kill_and_wait(id, pid).await;
            return Ok(Some(pid));
        }
        let stop_config = record.spec.config.stop_config.clone().unwrap_or_default();
        let signal_name = request
            .signal
            .clone()
            .or(stop_config.signal)
            .unwrap_or_else(|| DEFAULT_KILL_SIGNAL.to_string());
        let signal = driver::parse_signal(&signal_name).unwrap_or(Signal::SIGINT);
        let timeout = request
            .timeout
            .or(stop_config.timeout)
            .map(|d| d.to_std())
            .unwrap_or(DEFAULT_KILL_TIMEOUT);
        let driver = self.driver.clone();
        let (machine, dir) = (id.to_string(), self.machine_dir(id));
        let sent = tokio::task::spawn_blocking(move || driver.signal(&machine, &dir, signal)).await;
        if let Ok(Err(err)) = sent {
            tracing::debug!(machine = id, error = %err, "signalling the machine");
        }
        if !wait_for_exit(pid, Some(timeout)).await {
            self.kill_and_wait(id, pid).await;
        }
        Ok(Some(pid))
    }

    pub async fn stop(
        self: &Arc<Self>,
        id: &str,
        request: &StopRequest,
    ) -> Result<AgentMachine, AgentError> {
        if let Some(signal) = &request.signal {
            driver::parse_signal(signal).map_err(AgentError::BadRequest)?;
        }
        let pid = {
            let lock = self.lock(id);
            let _guard = lock.lock().await;
            self.record(id)?;
            self.store.set_desired(id, Desired::Stopped)?;
            self.stop_locked(id, request).await?
        };
        if let Some(pid) = pid {
            self.handle_exit(id, pid).await;
        }
        self.get(id)
    }

    /// Stops the machine (signal, timeout) and starts it again from a fresh root filesystem.
    pub async fn restart(
        self: &Arc<Self>,
        id: &str,
        request: &StopRequest,
    ) -> Result<AgentMachine, AgentError> {
        if let Some(signal) = &request.signal {
            driver::parse_signal(signal).map_err(AgentError::BadRequest)?;
        }
        let lock = self.lock(id);
        let _guard = lock.lock().await;
        let record = self.record(id)?;
        if !matches!(
            record.state,
            MachineState::Started | MachineState::Suspended
        ) {
            return Err(AgentError::Conflict(format!(
                "unable to restart machine from current state: '{}'",
                record.state
            )));
        }
        // Stopped on purpose, so the exit is not the restart policy's business.
        self.store.set_desired(id, Desired::Stopped)?;
        if let Some(pid) = self.stop_locked(id, request).await? {
            self.checks.forget(id);
            let dir = self.machine_dir(id);
            let mut exit = driver::read_exit(&dir).unwrap_or(ExitStatus {
                exit_code: -1,
                ..Default::default()
            });
            exit.requested_stop = true;
            exit.restarting = true;
            let driver = self.driver.clone();
            let (machine, dir_for_cleanup) = (id.to_string(), dir.clone());
            let _ = tokio::task::spawn_blocking(move || driver.cleanup(&machine, &dir_for_cleanup))
                .await;
            if self.record(id)?.shim_pid == Some(pid) {
                self.store.set_shim(id, None)?;
                let record = self.record(id)?;
                self.transition(&record, "exit", MachineState::Stopped, Some(exit), None)?;
            }
        }
        self.store.set_desired(id, Desired::Started)?;
        self.store.set_restarts(id, 0)?;
        let record = self.record(id)?;
        let record = self.launch(&record, "restart").await?;
        Ok(Self::view(&record))
    }

    /// Sends a signal to the machine's main process.
    pub async fn signal(&self, id: &str, signal: &str) -> Result<(), AgentError> {
        let signal = driver::parse_signal(signal).map_err(AgentError::BadRequest)?;
        let record = self.record(id)?;
        if record.state != MachineState::Started {
            return Err(AgentError::Conflict(format!(
                "unable to signal machine in state '{}': it is not running",
                record.state
            )));
        }
        let driver = self.driver.clone();
        let (machine, dir) = (id.to_string(), self.machine_dir(id));
        tokio::task::spawn_blocking(move || driver.signal(&machine, &dir, signal))
            .await
            .map_err(|e| AgentError::Failed(e.to_string()))?
            .map_err(driver_failure)
    }

    /// Freezes a running machine in place (the cgroup freezer for containers).
    pub async fn suspend(self: &Arc<Self>, id: &str) -> Result<AgentMachine, AgentError> {
        let lock = self.lock(id);
        let _guard = lock.lock().await;
        let record = self.record(id)?;
        match record.state {
            MachineState::Suspended => return Ok(Self::view(&record)),
            MachineState::Started if record.shim_pid.is_some() => {}
            other => {
                return Err(AgentError::Conflict(format!(
                    "unable to suspend machine from current state: '{other}'"
                )));
            }
        }
        self.checks.forget(id);
        let driver = self.driver.clone();
        let (machine, dir) = (id.to_string(), self.machine_dir(id));
        tokio::task::spawn_blocking(move || driver.suspend(&machine, &dir))
            .await
            .map_err(|e| AgentError::Failed(e.to_string()))?
            .map_err(driver_failure)?;
        let record = self.transition(&record, "suspend", MachineState::Suspended, None, None)?;
        Ok(Self::view(&record))
    }

    /// The environment commands run with inside the machine: what its main process got,
    /// the app's secrets included.
    async fn machine_env(
        &self,
        record: &MachineRecord,
    ) -> Result<std::collections::BTreeMap<String, String>, AgentError> {
        let spec = &record.spec;
        let dir = self.machine_dir(&spec.id);
        let image = self
            .image_for(spec, &dir)
            .await
            .map_err(AgentError::Failed)?;
        let link = MachineLink::for_machine(&spec.id, record.slot)
            .map_err(|e| AgentError::Failed(e.to_string()))?;
        let mut env = match init_config(spec, &image, &link, network::outbound_address()) {
            Ok(mut init) => {
                self.add_delivered_secrets(&mut init, spec).await;
                init.env
            }
            Err(_) => Default::default(),
        };
        env.entry("HOME".into()).or_insert_with(|| "/root".into());
        Ok(env)
    }

    /// The secrets the machine's main process got, for a command run beside it.
    async fn add_delivered_secrets(
        &self,
        init: &mut aloft_api::internal::InitConfig,
        spec: &MachineSpec,
    ) {
        let missing = match self.secrets.last_delivered(spec).await {
            Some(Ok(secrets)) => match secrets::apply(init, spec, &secrets) {
                Ok(()) => return,
                Err(e) => format!("some of the app's secrets: {e}"),
            },
            Some(Err(e)) => format!("the app's secrets: {e}"),
            None => {
                tracing::info!(machine = %spec.id, "the command runs without the app's secrets: this agent has not started the machine since it started itself");
                return;
            }
        };
        tracing::warn!(machine = %spec.id, "the command runs without {missing}");
    }

    fn running_record(&self, id: &str) -> Result<MachineRecord, AgentError> {
        let record = self.record(id)?;
        if record.state != MachineState::Started || record.shim_pid.is_none() {
            return Err(AgentError::Conflict(format!(
                "machine {id} is not running (state '{}')",
                record.state
            )));
        }
        Ok(record)
    }

    /// Runs a command in the machine and returns its output.
    pub async fn exec(
        &self,
        id: &str,
        request: &MachineExecRequest,
    ) -> Result<ExecResponse, AgentError> {
        let argv = console::exec_argv(request).map_err(AgentError::BadRequest)?;
        let record = self.running_record(id)?;
        let env = self.machine_env(&record).await?;
        let command = ExecCommand {
            argv,
            env,
            tty: None,
        };
        let timeout = Duration::from_secs(
            request
                .timeout
                .filter(|t| *t > 0)
                .unwrap_or(console::DEFAULT_EXEC_TIMEOUT_SECS),
        );
        let stdin = request.stdin.clone().unwrap_or_default().into_bytes();
        let driver = self.driver.clone();
        let dir = self.machine_dir(id);
        let machine = id.to_string();
        tokio::task::spawn_blocking(move || {
            let process = driver
                .exec(&machine, &dir, &command)
                .map_err(driver_failure)?;
            console::collect(process, &stdin, timeout)
        })
        .await
        .map_err(|e| AgentError::Failed(e.to_string()))?
    }

    /// Starts an interactive command in the machine (`aloft ssh console`).
    pub async fn exec_session(
        &self,
        id: &str,
        argv: Vec<String>,
        tty: Option<driver::WindowSize>,
    ) -> Result<driver::ExecProcess, AgentError> {
        let record = self.running_record(id)?;
        let env = self.machine_env(&record).await?;
        let command = ExecCommand { argv, env, tty };
        let driver = self.driver.clone();
        let dir = self.machine_dir(id);
        let machine = id.to_string();
        tokio::task::spawn_blocking(move || {
            driver
                .exec(&machine, &dir, &command)
                .map_err(driver_failure)
        })
        .await
        .map_err(|e| AgentError::Failed(e.to_string()))?
    }

    /// The machine's processes.
    pub async fn processes(&self, id: &str) -> Result<Vec<ProcessStat>, AgentError> {
        self.running_record(id)?;
        let driver = self.driver.clone();
        let dir = self.machine_dir(id);
        let machine = id.to_string();
        tokio::task::spawn_blocking(move || {
            driver.processes(&machine, &dir).map_err(driver_failure)
        })
        .await
        .map_err(|e| AgentError::Failed(e.to_string()))?
    }

    /// The machine's log file (in its directory, or archived after destroy) and its record.
    pub fn log_source(&self, id: &str) -> Result<(PathBuf, Option<MachineRecord>), AgentError> {
        if let Some(record) = self.store.machine(id)? {
            return Ok((self.machine_dir(id).join(logs::LOG_FILE), Some(record)));
        }
        let archived = self.logs_archive.join(id).join(logs::LOG_FILE);
        if archived.parent().is_some_and(|p| p.exists()) {
            return Ok((archived, None));
        }
        Err(AgentError::NotFound(id.to_string()))
    }

    /// The latest check results of a machine.
    pub fn check_results(&self, id: &str) -> Result<Vec<aloft_api::CheckStatus>, AgentError> {
        self.record(id)?;
        Ok(self.checks.results(id))
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
        self.checks.forget(id);
        let dir = self.machine_dir(id);
        let driver = self.driver.clone();
        let link = MachineLink::for_machine(id, record.slot).ok();
        let machine = id.to_string();
        let dir_for_cleanup = dir.clone();
        let _ = tokio::task::spawn_blocking(move || {
            driver.cleanup(&machine, &dir_for_cleanup);
            driver.release_storage(&machine, &dir_for_cleanup);
            if let Some(link) = link {
                network::teardown(&link);
            }
        })
        .await;
        let record = self.transition(&record, "destroy", MachineState::Destroyed, None, None)?;
        self.store.remove_machine(id)?;
        self.checks.removed(id);
        logs::archive(&dir, &self.logs_archive, id);
        self.secrets.forget(id);
        let _ = std::fs::remove_dir_all(&dir);
        self.collect_garbage();
        Ok(Self::view(&record))
    }

    /// Makes a volume's disk on this host (see [`volumes`]).
    pub async fn create_volume(
        &self,
        id: &str,
        size_gb: u64,
        key: Option<&aloft_api::secrets::Sealed>,
        snapshot_id: Option<&str>,
        source_volume_id: Option<&str>,
    ) -> Result<aloft_api::internal::VolumeDisk, AgentError> {
        let key = match key {
            Some(sealed) => Some(
                self.secrets
                    .open_volume_key(id, sealed)
                    .await
                    .map_err(AgentError::Failed)?,
            ),
            None => None,
        };
        let (volumes, id) = (self.volumes.clone(), id.to_string());
        if let Some(source) = source_volume_id.map(str::to_string) {
            return tokio::task::spawn_blocking(move || {
                volumes.fork_with_key(&id, &source, size_gb, key.as_deref())
            })
            .await
            .map_err(|e| AgentError::Failed(e.to_string()))?
            .map_err(volume_failure);
        }
        if let Some(snapshot) = snapshot_id.map(str::to_string) {
            return tokio::task::spawn_blocking(move || {
                volumes.restore_with_key(&id, &snapshot, size_gb, key.as_deref())
            })
            .await
            .map_err(|e| AgentError::Failed(e.to_string()))?
            .map_err(volume_failure);
        }
        tokio::task::spawn_blocking(move || volumes.create(&id, size_gb, key.as_deref()))
            .await
            .map_err(|e| AgentError::Failed(e.to_string()))?
            .map_err(volume_failure)
    }

    /// Takes a snapshot of a volume (see [`volumes::Volumes::snapshot`]).
    pub async fn snapshot_volume(
        &self,
        id: &str,
        snapshot: &str,
    ) -> Result<aloft_api::internal::SnapshotFile, AgentError> {
        let (volumes, id, snapshot) = (self.volumes.clone(), id.to_string(), snapshot.to_string());
        // A microVM writes its volume's image itself: it is held paused (its disks
        // flushed) while the image is read, so the copy is one moment of the disk.
        let user = if self.driver.volumes_as_disks() {
            self.store
                .machines()?
                .into_iter()
                .find(|r| {
                    r.shim_pid.is_some() && r.spec.config.mounts.iter().any(|m| m.volume == id)
                })
                .map(|r| r.spec.id)
        } else {
            None
        };
        let driver = self.driver.clone();
        let machines_dir = self.machines_dir.clone();
        tokio::task::spawn_blocking(move || {
            let held = match &user {
                Some(machine) => match driver.hold_io(machine, &machines_dir.join(machine)) {
                    Ok(held) => held,
                    Err(DriverError::NotRunning) => None,
                    Err(err) => {
                        return Err(volumes::VolumeError::Failed(format!(
                            "pausing machine {machine} for the snapshot of volume {id}: {err}"
                        )));
                    }
                },
                None => None,
            };
            let taken = volumes.snapshot(&id, &snapshot);
            drop(held);
            taken
        })
        .await
        .map_err(|e| AgentError::Failed(e.to_string()))?
        .map_err(volume_failure)
    }

    /// Deletes a snapshot taken on this host.
    pub async fn delete_snapshot(&self, snapshot: &str) -> Result<(), AgentError> {
        let (volumes, snapshot) = (self.volumes.clone(), snapshot.to_string());
        tokio::task::spawn_blocking(move || volumes.delete_snapshot(&snapshot))
            .await
            .map_err(|e| AgentError::Failed(e.to_string()))?
            .map_err(volume_failure)
    }

    /// The key of a volume whose filesystem is inside a LUKS image (a microVM volume):
    /// reading its counts or growing it takes the key. `None` for other volumes.
    async fn volume_key_for_status(&self, id: &str) -> Result<Option<Vec<u8>>, AgentError> {
        if !self.volumes.needs_key_for_status(id) {
            return Ok(None);
        }
        self.secrets
            .volume_key(id)
            .await
            .map(Some)
            .map_err(AgentError::Failed)
    }

    /// A volume's sizes and filesystem counts.
    pub async fn volume(&self, id: &str) -> Result<aloft_api::internal::VolumeDisk, AgentError> {
        let key = self.volume_key_for_status(id).await?;
        let (volumes, id) = (self.volumes.clone(), id.to_string());
        tokio::task::spawn_blocking(move || volumes.status_with_key(&id, key.as_deref()))
            .await
            .map_err(|e| AgentError::Failed(e.to_string()))?
            .map_err(volume_failure)
    }

    /// Grows a volume online.
    pub async fn extend_volume(
        &self,
        id: &str,
        size_gb: u64,
    ) -> Result<aloft_api::internal::VolumeDisk, AgentError> {
        let in_use =
            self.store.machines()?.into_iter().any(|r| {
                r.shim_pid.is_some() && r.spec.config.mounts.iter().any(|m| m.volume == id)
            });
        let key = self.volume_key_for_status(id).await?;
        let (volumes, id) = (self.volumes.clone(), id.to_string());
        tokio::task::spawn_blocking(move || {
            volumes.extend_with_key(&id, size_gb, in_use, key.as_deref())
        })
        .await
        .map_err(|e| AgentError::Failed(e.to_string()))?
        .map_err(volume_failure)
    }

    /// Deletes a volume's disk, unless a machine on this host mounts it.
    pub async fn destroy_volume(&self, id: &str) -> Result<(), AgentError> {
        let user = self
            .store
            .machines()?
            .into_iter()
            .find(|r| r.spec.config.mounts.iter().any(|m| m.volume == id))
            .map(|r| r.spec.id);
        let (volumes, id) = (self.volumes.clone(), id.to_string());
        tokio::task::spawn_blocking(move || volumes.destroy(&id, user.as_deref()))
            .await
            .map_err(|e| AgentError::Failed(e.to_string()))?
            .map_err(volume_failure)
    }

    /// Removes cached image layers no machine on this host uses any more.
    pub fn collect_garbage(&self) {
        let Ok(records) = self.store.machines() else {
            return;
        };
        let mut used = std::collections::HashSet::new();
        for record in &records {
            let Ok(bytes) = std::fs::read(self.machine_dir(&record.spec.id).join("image.json"))
            else {
                continue;
            };
            if let Ok(image) = serde_json::from_slice::<PreparedImage>(&bytes) {
                used.extend(image.layers);
            }
        }
        match self.images.remove_unused(&used) {
            Ok(0) => {}
            Ok(removed) => tracing::info!(removed, "removed unused image layers"),
            Err(err) => tracing::warn!(error = %err, "removing unused image layers"),
        }
        logs::expire(&self.logs_archive, logs::RETENTION);
    }

    /// After a restart: re-attach to machines whose supervisors still run, account for
    /// those that ended meanwhile (through their restart policy), and bring back machines
    /// that should be running.
    pub async fn reconcile(self: &Arc<Self>) -> anyhow::Result<()> {
        let records = self.store.machines()?;
        let known: std::collections::HashSet<String> =
            records.iter().map(|r| r.spec.id.clone()).collect();
        let machines_dir = self.machines_dir.clone();
        let driver = self.driver.clone();
        let _ = tokio::task::spawn_blocking(move || {
            release_orphaned_storage(&machines_dir, &known, driver.as_ref())
        })
        .await;
        for record in records {
            let id = record.spec.id.clone();
            match record.shim_pid {
                Some(pid) if shim::is_shim_of(pid, &self.machine_dir(&id)) => {
                    tracing::info!(machine = %id, pid, "re-attached to running machine");
                    self.watch(&id, pid);
                    if record.state == MachineState::Started {
                        self.checks.watch(self, &record);
                    }
                }
                Some(pid) => self.handle_exit(&id, pid).await,
                None if record.desired == Desired::Started => {
                    let agent = self.clone();
                    tokio::spawn(async move {
                        let lock = agent.lock(&id);
                        let _guard = lock.lock().await;
                        if let Ok(record) = agent.record(&id)
                            && record.shim_pid.is_none()
                        {
                            let _ = agent.launch(&record, "start").await;
                        }
                    });
                }
                None => {}
            }
        }
        self.collect_garbage();
        Ok(())
    }

    /// Stops every running machine (the server is shutting down) but keeps them wanted,
    /// so the next start brings them back; their network namespaces go too (a start
    /// makes them again).
    pub async fn stop_all_for_shutdown(self: &Arc<Self>) {
        let Ok(records) = self.store.machines() else {
            return;
        };
        let links: Vec<MachineLink> = records
            .iter()
            .filter_map(|r| MachineLink::for_machine(&r.spec.id, r.slot).ok())
            .collect();
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
        // What stopped machines keep between runs goes too (a start makes it again), so
        // a stopped host holds no mounts or loop devices.
        let stopped: Vec<(String, PathBuf)> = self
            .store
            .machines()
            .unwrap_or_default()
            .into_iter()
            .filter(|r| r.shim_pid.is_none())
            .map(|r| (r.spec.id.clone(), self.machine_dir(&r.spec.id)))
            .collect();
        let driver = self.driver.clone();
        let volumes = self.volumes.clone();
        let _ = tokio::task::spawn_blocking(move || {
            for (id, dir) in stopped {
                driver.release_storage(&id, &dir);
            }
            volumes.release_all();
        })
        .await;
        let _ = tokio::task::spawn_blocking(move || links.iter().for_each(network::teardown)).await;
    }

    /// Serves the agent API on `listener` forever.
    pub async fn serve(self: Arc<Self>, listener: tokio::net::TcpListener) -> anyhow::Result<()> {
        axum::serve(listener, api::router(self))
            .await
            .context("serving the agent API")
    }

    /// Registers with the control plane, then delivers events and check results forever.
    pub(crate) fn control_client(&self) -> Client {
        Client::new(&self.config.control_url, Some(self.config.token.clone()))
            .with_timeout(Duration::from_secs(10))
    }

    /// Registers this host with the control plane once: its id, region, agent URL,
    /// capacity and this run's mesh key; the answer is the host's number in 6PN addresses.
    pub async fn register(&self) -> Result<u32, aloft_client::ClientError> {
        let registration = HostRegistration {
            id: self.host_id.clone(),
            region: self.config.region.clone(),
            agent_url: format!("http://{}", self.config.listen),
            cpus: self.config.capacity.cpus,
            memory_mb: self.config.capacity.memory_mb,
            mesh_public_key: self.mesh.as_ref().map(|m| m.public_key().to_string()),
            mesh_endpoint: self.mesh.as_ref().map(|m| m.endpoint.to_string()),
        };
        let registered: aloft_api::internal::HostRegistered = self
            .control_client()
            .post("/v1/hosts", &registration)
            .await?;
        if let Some(known) = self.host_number.get()
            && *known != registered.host_number
        {
            tracing::error!(
                before = known,
                now = registered.host_number,
                "the control plane changed this host's number; restart the agent"
            );
        }
        let _ = self.host_number.set(registered.host_number);
        Ok(registered.host_number)
    }

    /// This host's number in 6PN addresses, once it has registered.
    pub fn host_number(&self) -> Option<u32> {
        self.host_number.get().copied()
    }

    /// This run's mesh key and endpoint (with `mesh_listen`).
    pub fn mesh_identity(&self) -> Option<&mesh::MeshIdentity> {
        self.mesh.as_ref()
    }

    /// Says every few seconds that this host is alive (with its clock); registers again
    /// when the control plane no longer knows it.
    async fn heartbeat(self: Arc<Self>) {
        let client = self.control_client();
        let path = format!("/v1/hosts/{}/heartbeat", self.host_id);
        let every = Duration::from_secs(aloft_api::internal::HOST_HEARTBEAT_EVERY_SECS);
        loop {
            tokio::time::sleep(every).await;
            let beat = aloft_api::internal::HostHeartbeat {
                time: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            };
            match client.call(http::Method::POST, &path, Some(&beat)).await {
                Ok(()) => {}
                Err(aloft_client::ClientError::Api { status, .. })
                    if status == http::StatusCode::NOT_FOUND =>
                {
                    if let Err(err) = self.register().await {
                        tracing::warn!(error = %err, "registering again with the control plane");
                    }
                }
                Err(err) => tracing::warn!(error = %err, "heartbeat to the control plane"),
            }
        }
    }

    pub async fn report(self: Arc<Self>) {
        let client = self.control_client();
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.register().await {
                Ok(_) => break,
                Err(err) => {
                    tracing::warn!(error = %err, "registering with the control plane");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        tokio::spawn(self.clone().heartbeat());
        tokio::spawn(checks::report(self.clone(), client.clone()));
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

/// Longest a start waits for the machine's services to accept connections.
const SERVICE_WAIT: Duration = Duration::from_secs(3);

/// Waits (up to [`SERVICE_WAIT`]) until every TCP service port of a machine that just
/// started accepts connections, so `started` means traffic can flow: a deploy that sees
/// the machine started does not send requests to a port not yet bound. Gives up early
/// when the machine ends.
async fn wait_for_services(record: &MachineRecord, supervisor: i32) {
    let ports: Vec<u16> = record
        .spec
        .config
        .services
        .iter()
        .filter(|s| s.protocol.is_empty() || s.protocol.eq_ignore_ascii_case("tcp"))
        .map(|s| s.internal_port)
        .filter(|p| *p != 0)
        .collect();
    let Ok(link) = MachineLink::for_machine(&record.spec.id, record.slot) else {
        return;
    };
    let deadline = tokio::time::Instant::now() + SERVICE_WAIT;
    for port in ports {
        let address = std::net::SocketAddr::new(link.machine_address.into(), port);
        loop {
            if let Ok(Ok(_)) = tokio::time::timeout(
                Duration::from_millis(100),
                tokio::net::TcpStream::connect(address),
            )
            .await
            {
                break;
            }
            if tokio::time::Instant::now() >= deadline
                || !Path::new(&format!("/proc/{supervisor}")).exists()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

/// Refuses guest sizes no machine can have on this host.
fn check_guest(guest: &aloft_api::MachineGuest) -> Result<(), String> {
    if let Some(host) = container::host_memory_mb()
        && u64::from(guest.memory_mb) > host
    {
        return Err(format!(
            "guest.memory_mb {} is more memory than this host has ({host} MB): ask for less (a multiple of 256, e.g. 256 or 1024)",
            guest.memory_mb
        ));
    }
    if guest.cpus > 64 {
        return Err(format!(
            "guest.cpus {} is more than a machine can have (at most 64)",
            guest.cpus
        ));
    }
    Ok(())
}

fn signal_name(signal: i32) -> String {
    Signal::try_from(signal)
        .map(|s| s.as_str().to_string())
        .unwrap_or_else(|_| format!("signal {signal}"))
}

/// Waits until `pid` exits (`true`), or `timeout` passes (`false`).
async fn wait_for_exit(pid: i32, timeout: Option<Duration>) -> bool {
    let exited = async {
        match shim::exit_watch(pid) {
            Ok(fd) => {
                let _ = fd.readable().await;
            }
            Err(_) => {
                while Path::new(&format!("/proc/{pid}")).exists() {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    };
    match timeout {
        Some(limit) => tokio::time::timeout(limit, exited).await.is_ok(),
        None => {
            exited.await;
            true
        }
    }
}

/// The identity of the agent whose data is under `data_dir` (created on first use), for
/// minting its host token before it starts.
pub fn local_host_id(data_dir: &Path) -> anyhow::Result<String> {
    let root = data_dir.join("agent");
    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    host_id(&root)
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

/// The root filesystem size a machine gets, in GB: its `rootfs.size_gb`, or the host's
/// default.
pub fn rootfs_size_gb(config: &aloft_api::MachineConfig, default_gb: u32) -> Result<u32, String> {
    match config.rootfs.as_ref().and_then(|r| r.size_gb) {
        Some(0) => {
            Err("rootfs.size_gb 0 leaves the machine no root filesystem: give at least 1".into())
        }
        Some(size) => Ok(size),
        None => Ok(default_gb.max(1)),
    }
}

/// Releases the mounts and loop devices of machine directories this host no longer has a
/// machine for (an agent killed while destroying one).
fn release_orphaned_storage(
    machines_dir: &Path,
    known: &std::collections::HashSet<String>,
    driver: &dyn Driver,
) {
    let orphan = |path: &Path| {
        path.strip_prefix(machines_dir)
            .ok()
            .and_then(|rest| rest.components().next())
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .filter(|id| !known.contains(id))
    };
    let mut orphans = std::collections::BTreeSet::new();
    for mount_point in block_image::mount_points_under(machines_dir) {
        if let Some(id) = orphan(&mount_point) {
            if let Err(err) = block_image::unmount(&mount_point) {
                tracing::warn!(error = %err, "releasing a destroyed machine's mount");
            }
            orphans.insert(id);
        }
    }
    for device in block_image::loop_devices_under(machines_dir) {
        if let Some(id) = orphan(&device.backing_file) {
            if let Err(err) = block_image::release(&device) {
                tracing::warn!(error = %err, "releasing a destroyed machine's loop device");
            }
            orphans.insert(id);
        }
    }
    for id in orphans {
        tracing::info!(machine = %id, "released the storage of a destroyed machine");
        driver.release_storage(&id, &machines_dir.join(&id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_is_detected_or_declared() {
        assert_eq!(
            meminfo_total_mb("MemTotal:        8048576 kB\nMemFree: 1 kB\n"),
            Some(7859)
        );
        assert_eq!(meminfo_total_mb("MemFree: 1 kB\n"), None);
        let declared = HostCapacity::detect(Some(3), Some(2048));
        assert_eq!(
            declared,
            HostCapacity {
                cpus: 3,
                memory_mb: 2048
            }
        );
        let detected = HostCapacity::detect(None, None);
        assert!(detected.cpus >= 1 && detected.memory_mb > 0, "{detected:?}");
    }

    #[test]
    fn the_rootfs_size_comes_from_the_config_or_the_hosts_default() {
        let mut config = aloft_api::MachineConfig::default();
        assert_eq!(rootfs_size_gb(&config, 8), Ok(8));
        config.rootfs = Some(aloft_api::RootfsConfig {
            size_gb: Some(2),
            ..Default::default()
        });
        assert_eq!(rootfs_size_gb(&config, 8), Ok(2));
        config.rootfs = Some(aloft_api::RootfsConfig {
            size_gb: Some(0),
            ..Default::default()
        });
        assert!(
            rootfs_size_gb(&config, 8)
                .unwrap_err()
                .contains("rootfs.size_gb")
        );
    }
    use aloft_api::MachineRestart;

    fn exit(code: i32) -> ExitStatus {
        ExitStatus {
            exit_code: code,
            ..Default::default()
        }
    }

    #[test]
    fn restart_policies() {
        let no = MachineRestart {
            policy: RestartPolicy::No,
            max_retries: None,
        };
        let always = MachineRestart {
            policy: RestartPolicy::Always,
            max_retries: None,
        };
        let on_failure = MachineRestart {
            policy: RestartPolicy::OnFailure,
            max_retries: Some(2),
        };
        assert!(!should_restart(Some(&no), &exit(1), 0));
        assert!(should_restart(Some(&always), &exit(0), 100));
        assert!(!should_restart(Some(&on_failure), &exit(0), 0));
        assert!(should_restart(Some(&on_failure), &exit(3), 1));
        assert!(
            !should_restart(Some(&on_failure), &exit(3), 2),
            "max_retries reached"
        );
        let oom = ExitStatus {
            oom_killed: true,
            ..exit(0)
        };
        assert!(
            should_restart(Some(&on_failure), &oom, 0),
            "an OOM kill is a failure"
        );
        assert!(
            should_restart(None, &exit(1), 9),
            "on-failure with 10 retries by default"
        );
        assert!(!should_restart(None, &exit(1), 10));
    }

    #[test]
    fn backoff_doubles_up_to_a_ceiling() {
        assert_eq!(restart_backoff(1), Duration::from_millis(200));
        assert_eq!(restart_backoff(2), Duration::from_millis(400));
        assert_eq!(restart_backoff(30), MAX_BACKOFF);
        let start = 1_700_000_000_000;
        assert_eq!(restarts_in_window(4, Some(start), start + 2_000), 4);
        assert_eq!(restarts_in_window(4, Some(start), start + 300_000), 0);
        assert_eq!(restarts_in_window(4, None, start), 0);
    }

    #[test]
    fn impossible_guests_are_refused() {
        let huge = aloft_api::MachineGuest {
            memory_mb: 100_000_000,
            cpus: 1,
            ..Default::default()
        };
        assert!(
            check_guest(&huge)
                .unwrap_err()
                .contains("guest.memory_mb 100000000")
        );
        assert!(check_guest(&aloft_api::MachineGuest::default_shared()).is_ok());
    }
}
