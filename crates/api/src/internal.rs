//! Aloft's own wire types between its parts: deploys (CLI ↔ control plane), the agent
//! API (control plane ↔ agent), and the catalog stream (control plane → proxies, DNS).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::Duration;
use crate::machine::{CheckStatus, MachineConfig, MachineService, MachineState};

/// `POST /v1/apps/{app}/deploys`: roll out `config` (a parsed fly.toml, as JSON) with `image`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DeployRequest {
    pub config: serde_json::Value,
    pub image: String,
    /// `rolling`, `immediate`, `canary` or `bluegreen`; overrides `[deploy] strategy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<String>,
    /// Overrides `[deploy] max_unavailable`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_unavailable: Option<f64>,
    /// Overrides `[deploy] wait_timeout`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_timeout: Option<Duration>,
    /// Overrides `[deploy] release_command_timeout`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release_command_timeout: Option<Duration>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub skip_release_command: bool,
    /// First-deploy redundancy (`--ha`, default true): two machines per new process group
    /// that has services.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ha: Option<bool>,
    /// What the release list shows as its description (default `deploy`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

fn is_false(value: &bool) -> bool {
    !*value
}

/// One line of the NDJSON stream a deploy answers with.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum DeployEvent {
    /// The deploy was accepted and runs on the server from now on, whatever the client does.
    Started {
        deploy_id: String,
    },
    /// The release this deploy rolls out was recorded.
    Release {
        version: u64,
        image: String,
        strategy: String,
    },
    Progress {
        message: String,
    },
    Warning {
        message: String,
    },
    /// Output of the release command or of a failing machine, as it is known.
    Log {
        machine_id: String,
        line: String,
    },
    Done {
        release_version: u64,
        url: Option<String>,
    },
    Error {
        message: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        failure: Option<DeployFailure>,
    },
}

/// `GET /v1/apps/{app}/deploys`: one of the app's deploys (newest first), kept in the store
/// so it outlives the server that ran it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployOperation {
    pub id: String,
    /// `running`, `complete` or `failed`.
    pub status: String,
    /// The release it rolls out, once made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release_version: Option<u64>,
    #[serde(default)]
    pub strategy: String,
    #[serde(default)]
    pub user: String,
    pub created_at: String,
    pub updated_at: String,
}

/// Which machine stopped a deploy, and why.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployFailure {
    pub machine_id: String,
    #[serde(default)]
    pub process_group: String,
    /// The check that failed, if a check did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub check_output: String,
    /// How the machine's main process ended, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit: Option<ExitStatus>,
    /// The machine's last log lines (at most 20).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub logs: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Release {
    pub id: String,
    pub version: u64,
    pub status: String,
    pub description: String,
    pub image: String,
    pub created_at: String,
    /// Who deployed it (the token's name).
    #[serde(default)]
    pub user: String,
}

/// Where and how an agent pulls an image from the platform's registry.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImagePull {
    /// `host:port/repository:tag` (or `@digest`).
    pub reference: String,
    /// Base URL of the registry (`http://127.0.0.1:4280`).
    pub registry_url: String,
    /// Bearer token that may pull `reference`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub token: String,
}

/// `PUT /v1/machines/{id}` on an agent: everything the agent needs to run a machine.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MachineSpec {
    pub id: String,
    pub name: String,
    pub app: String,
    pub org: String,
    pub region: String,
    pub instance_id: String,
    pub config: MachineConfig,
    pub image: ImagePull,
    /// The machine's 6PN address, when networking assigns one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_ip: Option<String>,
}

/// How a machine's main process ended.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    pub exit_code: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    #[serde(default)]
    pub oom_killed: bool,
    /// The exit followed a stop the platform asked for.
    #[serde(default)]
    pub requested_stop: bool,
    /// When the main process ended (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exited_at: Option<String>,
    /// The restart policy brings the machine back after this exit.
    #[serde(default)]
    pub restarting: bool,
}

/// An agent's view of one machine (`GET /v1/machines/{id}` on the agent).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AgentMachine {
    pub id: String,
    /// The agent's event sequence number of this machine's latest change; the control
    /// plane ignores anything older than what it already applied.
    pub seq: u64,
    pub app: String,
    pub instance_id: String,
    pub state: MachineState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_ipv4: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<ExitStatus>,
}

/// A state change an agent reports to the control plane.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AgentEvent {
    /// Per-agent sequence number, so the control plane can drop duplicates.
    pub seq: u64,
    pub machine_id: String,
    pub instance_id: String,
    /// `launch`, `start`, `exit`, `restart`, `stop`, `destroy`, ...
    #[serde(rename = "type")]
    pub kind: String,
    pub state: MachineState,
    /// Milliseconds since the Unix epoch.
    pub timestamp: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit: Option<ExitStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_ipv4: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// With an exit: how many times the restart policy has restarted the machine (Fly's
    /// `request.restart_count`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_count: Option<u64>,
}

/// The exec and ps shapes are the Machines API's own; the agent takes and answers them too.
pub use crate::platform::{ExecResponse, ListenSocket, MachineExecRequest, ProcessStat};

/// The health checks of the machines on one host, as an agent reports them
/// (`POST /v1/hosts/{id}/checks`): each entry replaces what was known of that machine.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChecksReport {
    pub machines: Vec<MachineChecks>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineChecks {
    pub machine_id: String,
    pub checks: Vec<CheckStatus>,
}

/// One line of a machine's log, as the log streams carry it (NDJSON).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// RFC 3339 with nanoseconds, UTC.
    pub timestamp: String,
    #[serde(default)]
    pub app: String,
    pub machine_id: String,
    #[serde(default)]
    pub region: String,
    /// `stdout` or `stderr`.
    pub stream: String,
    /// `info` for the machine's own output.
    #[serde(default = "info_level")]
    pub level: String,
    pub message: String,
}

fn info_level() -> String {
    "info".to_string()
}

/// Frames of an interactive exec session (`aloft ssh console`), both directions:
/// one type byte, a big-endian u32 length, then the payload.
pub mod console_frame {
    /// The `Upgrade` protocol name of interactive sessions.
    pub const PROTOCOL: &str = "aloft-console";
    /// Client → machine: bytes for the process's standard input.
    pub const STDIN: u8 = 0;
    /// Machine → client: output (the terminal's, or standard output).
    pub const STDOUT: u8 = 1;
    /// Machine → client: standard error (sessions without a terminal).
    pub const STDERR: u8 = 2;
    /// Machine → client: the process ended; payload is its exit code, i32 big-endian.
    pub const EXIT: u8 = 3;
    /// Client → machine: the terminal's new size; payload is cols u16 then rows u16.
    pub const RESIZE: u8 = 4;
    /// Client → machine: standard input has ended.
    pub const STDIN_EOF: u8 = 5;

    /// Encodes one frame.
    pub fn encode(kind: u8, payload: &[u8]) -> Vec<u8> {
        let mut frame = Vec::with_capacity(5 + payload.len());
        frame.push(kind);
        frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        frame.extend_from_slice(payload);
        frame
    }

    /// Splits the first complete frame off `buffer`, if there is one.
    pub fn decode(buffer: &mut Vec<u8>) -> Option<(u8, Vec<u8>)> {
        if buffer.len() < 5 {
            return None;
        }
        let len = u32::from_be_bytes([buffer[1], buffer[2], buffer[3], buffer[4]]) as usize;
        if buffer.len() < 5 + len {
            return None;
        }
        let kind = buffer[0];
        let payload = buffer[5..5 + len].to_vec();
        buffer.drain(..5 + len);
        Some((kind, payload))
    }

    /// Largest payload a peer accepts in one frame.
    pub const MAX_PAYLOAD: usize = 1 << 20;
}

/// An agent introducing itself to the control plane.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRegistration {
    pub id: String,
    pub region: String,
    /// Base URL of the agent's API.
    pub agent_url: String,
    /// The CPUs machines may reserve on the host (0: not declared, no limit).
    #[serde(default)]
    pub cpus: u64,
    /// The memory (MB) machines may reserve on the host (0: not declared, no limit).
    #[serde(default)]
    pub memory_mb: u64,
    /// The host's WireGuard mesh key for this run (base64 of 32 bytes; a fresh one at
    /// every agent start). None: the host is no mesh member.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh_public_key: Option<String>,
    /// Where the host's mesh listens (`ip:port` on the datacenter network).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh_endpoint: Option<String>,
}

/// The control plane's answer to a [`HostRegistration`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRegistered {
    /// The host's number in 6PN addresses (`sixpn::host_address(host_number)` is its own).
    pub host_number: u32,
}

/// A host of the mesh as `GET /v1/hosts/mesh` lists it (hosts that are up and have a key).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshPeerInfo {
    pub id: String,
    /// Its host number in 6PN addresses.
    pub number: u32,
    /// Its WireGuard public key (base64).
    pub public_key: String,
    /// Where its mesh listens (`ip:port`).
    pub endpoint: String,
}

/// How often an agent says it is alive (`POST /v1/hosts/{id}/heartbeat`).
pub const HOST_HEARTBEAT_EVERY_SECS: u64 = 2;
/// A host that has not heartbeated for this long is down: it gets no new machines and
/// its machines show `host_status: unreachable`.
pub const HOST_DOWN_AFTER_SECS: i64 = 10;
/// A heartbeat whose clock is further than this from the control plane's is refused.
pub const HOST_MAX_CLOCK_SKEW_SECS: i64 = 60;

/// An agent's heartbeat: its clock, so that a host whose clock is off is told so.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostHeartbeat {
    /// The host's time (RFC 3339).
    pub time: String,
}

/// A host as `aloft hosts list|show` sees it (`GET /v1/hosts`, `GET /v1/hosts/{id}`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HostInfo {
    pub id: String,
    pub region: String,
    /// `up`, `down` (no heartbeat for a while) or `cordoned`.
    pub status: String,
    pub cordoned: bool,
    pub agent_url: String,
    pub last_seen: String,
    /// Machines on the host that are not destroyed.
    pub machines: u64,
    /// Their IDs.
    #[serde(default)]
    pub machine_ids: Vec<String>,
    /// Volumes on the host that are not destroyed.
    #[serde(default)]
    pub volume_ids: Vec<String>,
    /// What the host declared (0: not declared).
    pub cpus: u64,
    pub memory_mb: u64,
    /// What its machines reserve: CPUs (a shared CPU reserves a sixteenth of a core, a
    /// performance CPU a whole one) and memory.
    pub cpus_reserved: f64,
    pub memory_reserved_mb: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogApp {
    pub name: String,
    pub org: String,
    #[serde(default)]
    pub network: String,
    /// Hostnames the proxy routes to this app (`<app>.<base-domain>`, certificates).
    #[serde(default)]
    pub hostnames: Vec<String>,
    /// The app's 6PN network number: its machines are in `fdaa:<network_id>::/48`
    /// (see `sixpn`). 0 when the control plane has not assigned one.
    #[serde(default)]
    pub network_id: u32,
    /// Addresses allocated to the app: public ones and Flycast (`private_v6`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<CatalogIp>,
    /// The region the app's latest release placed its machines in (fly.toml's
    /// `primary_region`, or the nearest region with hosts); proxies keep
    /// `min_machines_running` there. None before a release names one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary_region: Option<String>,
}

/// An address allocated to an app, as the proxy and DNS servers need it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogIp {
    pub address: String,
    /// `v4`, `shared_v4`, `v6` or `private_v6` (Flycast).
    #[serde(rename = "type")]
    pub kind: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CatalogMachine {
    pub id: String,
    pub app: String,
    pub state: MachineState,
    pub region: String,
    pub host: String,
    pub instance_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process_group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_ipv4: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_ip: Option<String>,
    #[serde(default)]
    pub services: Vec<MachineService>,
    /// The latest result of each of the machine's health checks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<CheckStatus>,
    /// The machine config's `[[statics]]`: URL prefixes the proxy serves from the files
    /// of the machine's image.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub statics: Vec<crate::Static>,
}

/// One message of the catalog stream (`GET /v1/catalog`, NDJSON).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum CatalogUpdate {
    Snapshot {
        seq: u64,
        apps: Vec<CatalogApp>,
        machines: Vec<CatalogMachine>,
    },
    App {
        seq: u64,
        app: CatalogApp,
    },
    AppRemoved {
        seq: u64,
        name: String,
    },
    Machine {
        seq: u64,
        machine: CatalogMachine,
    },
    MachineRemoved {
        seq: u64,
        id: String,
    },
}

/// What `init` (PID 1 in a machine) is told to do. Built by the agent from the machine
/// config and the image config; handed over on a pipe, never written to disk.
///
/// It holds the app's secrets in plaintext (in `env` and `files`): never log it, write it
/// to disk or put it on a command line. Its `Debug` shows names, not values.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitConfig {
    /// The program and its arguments; `argv[0]` is looked up in `PATH` when it has no `/`.
    pub argv: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// `user`, `uid`, `user:group` or `uid:gid`, as an image's `User` says. Empty = root.
    #[serde(default)]
    pub user: String,
    #[serde(default)]
    pub workdir: String,
    pub hostname: String,
    /// Extra `/etc/hosts` lines (`address name`).
    #[serde(default)]
    pub etc_hosts: Vec<(String, String)>,
    #[serde(default)]
    pub nameservers: Vec<String>,
    #[serde(default)]
    pub files: Vec<InitFile>,
    /// Mount `/proc`, `/sys`, `/dev` etc. itself (microVMs); container runtimes do it already.
    #[serde(default)]
    pub mount_standard_filesystems: bool,
}

#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitFile {
    pub path: String,
    /// Base64 of the content.
    pub content: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
}

impl std::fmt::Debug for InitConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InitConfig")
            .field("argv", &self.argv)
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .field("user", &self.user)
            .field("workdir", &self.workdir)
            .field("hostname", &self.hostname)
            .field("etc_hosts", &self.etc_hosts)
            .field("nameservers", &self.nameservers)
            .field("files", &self.files)
            .field(
                "mount_standard_filesystems",
                &self.mount_standard_filesystems,
            )
            .finish()
    }
}

impl std::fmt::Debug for InitFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InitFile")
            .field("path", &self.path)
            .field("content_bytes", &self.content.len())
            .field("mode", &self.mode)
            .finish()
    }
}

/// `PUT /v1/volumes/{id}` on the agent: make the volume's disk (a new, empty ext4 of
/// `size_gb`), or `PUT /v1/volumes/{id}/extend`: grow it to `size_gb`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeDiskRequest {
    pub size_gb: u64,
    /// On create: the volume's encryption key, sealed for the host
    /// ([`crate::secrets::volume_key_host_aad`]); none for an unencrypted volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<crate::secrets::Sealed>,
    /// On create: fill the volume from this snapshot (taken on this host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_id: Option<String>,
    /// On create: fill the volume with a copy of this volume of the host (a fork).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_volume_id: Option<String>,
}

/// A volume snapshot on its host: the compressed image's size and checksum.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotFile {
    pub id: String,
    pub volume: String,
    /// The compressed snapshot's size in bytes.
    pub size: u64,
    /// The volume's size in bytes when it was taken.
    pub volume_size: u64,
    /// `sha256:` and the hex digest of the compressed file.
    pub digest: String,
    pub encrypted: bool,
}

/// A volume's disk on its host, as the agent sees it: the image's size and the
/// filesystem's counts (statvfs).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeDisk {
    pub id: String,
    pub size_bytes: u64,
    pub blocks: u64,
    pub block_size: u64,
    pub blocks_free: u64,
    pub blocks_avail: u64,
    /// Whether a size change needs the machine using the volume to restart.
    #[serde(default)]
    pub needs_restart: bool,
}

/// `POST /v1/machines/{id}/probe` (agent): the control plane asks a machine's own host to
/// look at one of its ports, the way a health check does (only that host reaches it).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProbeRequest {
    /// The port looked at when the check names none.
    pub port: u16,
    /// What to look for: a `tcp` check accepts a connection, an `http` one a 2xx answer.
    pub check: crate::MachineCheck,
}

/// What one look at a machine's port found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", content = "output", rename_all = "snake_case")]
pub enum ProbeOutcome {
    Passing,
    /// The app answered, and the answer is a failure (e.g. HTTP 500).
    Answered(String),
    /// Nothing answered (refused, timed out): the app may still be starting.
    NoAnswer(String),
}
