//! Hosts (one agent each), placement, and the client the control plane uses to drive agents.

use aloft_api::internal::{AgentMachine, MachineSpec, VolumeDisk, VolumeDiskRequest};
use aloft_api::{
    ExecResponse, MachineExecRequest, ProcessStat, SignalRequest, StopRequest, regions,
};
use aloft_client::{Client, ClientError};
use http::Method;

use std::collections::HashMap;

use aloft_api::internal::HOST_DOWN_AFTER_SECS;
use aloft_api::{MachineConfig, MachineGuest};

use crate::error::ApiError;
use crate::store::{HostRow, MachineRow};

/// Where a machine goes: the host, and the region it is in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    pub host: HostRow,
    pub region: String,
}

/// Picks a host in `wanted` (a region code), or in the nearest region that has one.
pub fn place(hosts: &[HostRow], wanted: &str) -> Result<Placement, ApiError> {
    let regions: Vec<String> = {
        let mut r: Vec<String> = hosts.iter().map(|h| h.region.clone()).collect();
        r.sort();
        r.dedup();
        r
    };
    let region = regions::nearest(wanted, &regions)
        .ok_or_else(|| ApiError::unavailable("no hosts are registered; is the agent running?"))?
        .to_string();
    let host = hosts
        .iter()
        .find(|h| h.region == region)
        .cloned()
        .ok_or_else(|| ApiError::unavailable(format!("no host in region {region}")))?;
    Ok(Placement { host, region })
}

/// Where a host stands for placement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostStatus {
    /// Heartbeating, takes new machines.
    Up,
    /// No heartbeat for [`HOST_DOWN_AFTER_SECS`]: no new machines, its machines unreachable.
    Down,
    /// Heartbeating, but an operator cordoned it: no new machines.
    Cordoned,
}

impl HostStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            HostStatus::Up => "up",
            HostStatus::Down => "down",
            HostStatus::Cordoned => "cordoned",
        }
    }
}

/// The host's status at `now_ms` (the control plane's clock, Unix milliseconds).
pub fn host_status(host: &HostRow, now_ms: i64) -> HostStatus {
    let seen = chrono::DateTime::parse_from_rfc3339(&host.last_seen)
        .map(|t| t.timestamp_millis())
        .unwrap_or(i64::MIN);
    if now_ms.saturating_sub(seen) > HOST_DOWN_AFTER_SECS * 1000 {
        HostStatus::Down
    } else if host.cordoned {
        HostStatus::Cordoned
    } else {
        HostStatus::Up
    }
}

/// CPUs are counted in shares, sixteenths of a core: a `performance` CPU reserves a
/// whole core, a `shared` one its baseline, a sixteenth (Fly's shared vCPUs are
/// guaranteed 1/16 of a core and burst above it), so many small machines fit on a host.
pub const SHARES_PER_CPU: u64 = 16;

/// A number of CPU shares as CPUs (`2`, `0.19`).
pub fn cpus_of_shares(shares: u64) -> String {
    if shares.is_multiple_of(SHARES_PER_CPU) {
        (shares / SHARES_PER_CPU).to_string()
    } else {
        format!("{:.2}", shares as f64 / SHARES_PER_CPU as f64)
    }
}

/// What a machine reserves on its host.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Need {
    /// In [`SHARES_PER_CPU`]ths of a core.
    pub cpu_shares: u64,
    pub memory_mb: u64,
}

impl Need {
    /// What a machine with `config` reserves (the default guest's size when it names none).
    pub fn of(config: &MachineConfig) -> Self {
        let shared = MachineGuest::default_shared();
        let guest = config.guest.as_ref();
        let cpus = u64::from(
            guest
                .map(|g| g.cpus)
                .filter(|c| *c > 0)
                .unwrap_or(shared.cpus),
        );
        let performance = guest.is_some_and(|g| g.cpu_kind == "performance");
        Self {
            cpu_shares: if performance {
                cpus.saturating_mul(SHARES_PER_CPU)
            } else {
                cpus
            },
            memory_mb: guest
                .map(|g| g.memory_mb)
                .filter(|m| *m > 0)
                .unwrap_or(shared.memory_mb)
                .into(),
        }
    }
}

/// What is on one host already.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Load {
    /// Machines not destroyed.
    pub machines: u64,
    /// Of them, the ones of the app being placed.
    pub app_machines: u64,
    pub reserved: Need,
}

/// The load of every host that has machines, counting `app_id`'s own apart.
pub fn loads(machines: &[MachineRow], app_id: &str) -> HashMap<String, Load> {
    let mut loads: HashMap<String, Load> = HashMap::new();
    for machine in machines {
        let load = loads.entry(machine.host_id.clone()).or_default();
        let need = Need::of(&machine.config);
        load.machines += 1;
        if machine.app_id == app_id {
            load.app_machines += 1;
        }
        load.reserved.cpu_shares = load.reserved.cpu_shares.saturating_add(need.cpu_shares);
        load.reserved.memory_mb = load.reserved.memory_mb.saturating_add(need.memory_mb);
    }
    loads
}

/// What is left of `declared` (0: not declared, no limit) once `reserved` is taken.
fn free(declared: u64, reserved: u64) -> u64 {
    if declared == 0 {
        u64::MAX
    } else {
        declared.saturating_sub(reserved)
    }
}

/// Picks the host for a new machine that reserves `need`: among hosts that are up (not
/// down, not cordoned) and have room for it, those in `wanted` or the nearest region that
/// has such a host; of them, the one with the fewest machines of the app (so an app's
/// machines spread over hosts), then the most free memory, then the fewest machines.
pub fn place_machine(
    hosts: &[HostRow],
    loads: &HashMap<String, Load>,
    wanted: &str,
    need: Need,
    now_ms: i64,
) -> Result<Placement, ApiError> {
    if hosts.is_empty() {
        return Err(ApiError::unavailable(
            "no hosts are registered; is the agent running?",
        ));
    }
    let up: Vec<&HostRow> = hosts
        .iter()
        .filter(|h| host_status(h, now_ms) == HostStatus::Up)
        .collect();
    if up.is_empty() {
        let states: Vec<String> = hosts
            .iter()
            .map(|h| format!("{} is {}", h.id, host_status(h, now_ms).as_str()))
            .collect();
        return Err(ApiError::unavailable(format!(
            "no host takes new machines: {}",
            states.join(", ")
        )));
    }
    let empty = Load::default();
    let load = |h: &HostRow| loads.get(&h.id).unwrap_or(&empty);
    let free_memory = |h: &HostRow| free(h.memory_mb, load(h).reserved.memory_mb);
    let fits = |h: &HostRow| {
        free(
            h.cpus.saturating_mul(SHARES_PER_CPU),
            load(h).reserved.cpu_shares,
        ) >= need.cpu_shares
            && free_memory(h) >= need.memory_mb
    };
    let roomy: Vec<&HostRow> = up.iter().copied().filter(|h| fits(h)).collect();
    if roomy.is_empty() {
        let room: Vec<String> = up
            .iter()
            .map(|h| {
                let l = load(h);
                format!(
                    "{} has {} of {} CPUs and {} of {} MB free",
                    h.id,
                    cpus_of_shares(
                        h.cpus
                            .saturating_mul(SHARES_PER_CPU)
                            .saturating_sub(l.reserved.cpu_shares)
                    ),
                    h.cpus,
                    h.memory_mb.saturating_sub(l.reserved.memory_mb),
                    h.memory_mb
                )
            })
            .collect();
        return Err(ApiError::unavailable(format!(
            "insufficient resources: no host has room for a machine of {} CPUs and {} MB ({}); add a host, or use a smaller machine",
            cpus_of_shares(need.cpu_shares),
            need.memory_mb,
            room.join("; ")
        )));
    }
    let mut regions: Vec<String> = roomy.iter().map(|h| h.region.clone()).collect();
    regions.sort();
    regions.dedup();
    let region = regions::nearest(wanted, &regions)
        .unwrap_or(regions[0].as_str())
        .to_string();
    let host = roomy
        .into_iter()
        .filter(|h| h.region == region)
        .min_by(|a, b| {
            (
                load(a).app_machines,
                std::cmp::Reverse(free_memory(a)),
                load(a).machines,
                &a.id,
            )
                .cmp(&(
                    load(b).app_machines,
                    std::cmp::Reverse(free_memory(b)),
                    load(b).machines,
                    &b.id,
                ))
        })
        .cloned()
        .ok_or_else(|| ApiError::unavailable(format!("no host in region {region}")))?;
    Ok(Placement { host, region })
}

/// Talks to one agent's API: the lifecycle calls, and (through `http()`) the streams and
/// upgrades of logs and consoles. One per host, kept by the control plane.
#[derive(Clone)]
pub struct AgentClient {
    client: Client,
    /// The host's own token, which its agent takes (and pulls images with).
    token: String,
}

fn agent_error(err: ClientError) -> ApiError {
    match err {
        ClientError::Api { status, message } => ApiError::new(status, message),
        other => ApiError::unavailable(format!("host agent unavailable: {other}")),
    }
}

impl AgentClient {
    pub fn new(agent_url: &str, token: &str) -> Self {
        Self {
            client: Client::new(agent_url, Some(token.to_string())),
            token: token.to_string(),
        }
    }

    /// The host's own token.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The underlying HTTP client, for calls that stream (logs) or upgrade (consoles).
    pub fn http(&self) -> &Client {
        &self.client
    }

    pub async fn put(&self, spec: &MachineSpec) -> Result<AgentMachine, ApiError> {
        self.client
            .put(&format!("/v1/machines/{}", spec.id), spec)
            .await
            .map_err(agent_error)
    }

    /// Asks the machine's host to look at one of its ports (`POST /v1/machines/{id}/probe`).
    pub async fn probe(
        &self,
        id: &str,
        request: &aloft_api::internal::ProbeRequest,
    ) -> Result<aloft_api::internal::ProbeOutcome, ApiError> {
        self.client
            .post(&format!("/v1/machines/{id}/probe"), request)
            .await
            .map_err(agent_error)
    }

    pub async fn start(&self, id: &str) -> Result<AgentMachine, ApiError> {
        self.client
            .post(&format!("/v1/machines/{id}/start"), &())
            .await
            .map_err(agent_error)
    }

    pub async fn stop(&self, id: &str, request: &StopRequest) -> Result<AgentMachine, ApiError> {
        self.client
            .post(&format!("/v1/machines/{id}/stop"), request)
            .await
            .map_err(agent_error)
    }

    pub async fn destroy(&self, id: &str) -> Result<AgentMachine, ApiError> {
        self.client
            .json::<(), AgentMachine>(Method::DELETE, &format!("/v1/machines/{id}"), None)
            .await
            .map_err(agent_error)
    }

    /// Restarts the machine's main process in place (`POST /v1/machines/{id}/restart`).
    pub async fn restart(&self, id: &str, request: &StopRequest) -> Result<AgentMachine, ApiError> {
        self.client
            .post(&format!("/v1/machines/{id}/restart"), request)
            .await
            .map_err(agent_error)
    }

    /// Sends a signal to the machine's main process (`POST /v1/machines/{id}/signal`).
    pub async fn signal(
        &self,
        id: &str,
        request: &SignalRequest,
    ) -> Result<AgentMachine, ApiError> {
        self.client
            .post(&format!("/v1/machines/{id}/signal"), request)
            .await
            .map_err(agent_error)
    }

    /// Suspends the machine (`POST /v1/machines/{id}/suspend`).
    pub async fn suspend(&self, id: &str) -> Result<AgentMachine, ApiError> {
        self.client
            .post(&format!("/v1/machines/{id}/suspend"), &())
            .await
            .map_err(agent_error)
    }

    /// The machine's processes (`GET /v1/machines/{id}/ps`), by pid.
    pub async fn ps(&self, id: &str) -> Result<Vec<ProcessStat>, ApiError> {
        self.client
            .get(&format!("/v1/machines/{id}/ps"))
            .await
            .map_err(agent_error)
    }

    /// Runs a command in the machine (`POST /v1/machines/{id}/exec`).
    pub async fn exec(
        &self,
        id: &str,
        request: &MachineExecRequest,
    ) -> Result<ExecResponse, ApiError> {
        self.client
            .post(&format!("/v1/machines/{id}/exec"), request)
            .await
            .map_err(agent_error)
    }

    /// Makes a volume's disk on the host (`PUT /v1/volumes/{id}`).
    pub async fn create_volume(
        &self,
        id: &str,
        size_gb: u64,
        key: Option<aloft_api::secrets::Sealed>,
        snapshot_id: Option<String>,
        source_volume_id: Option<String>,
    ) -> Result<VolumeDisk, ApiError> {
        self.client
            .put(
                &format!("/v1/volumes/{id}"),
                &VolumeDiskRequest {
                    size_gb,
                    key,
                    snapshot_id,
                    source_volume_id,
                },
            )
            .await
            .map_err(agent_error)
    }

    /// A volume's sizes and filesystem counts (`GET /v1/volumes/{id}`).
    pub async fn volume(&self, id: &str) -> Result<VolumeDisk, ApiError> {
        self.client
            .get(&format!("/v1/volumes/{id}"))
            .await
            .map_err(agent_error)
    }

    /// Grows a volume (`PUT /v1/volumes/{id}/extend`).
    pub async fn extend_volume(&self, id: &str, size_gb: u64) -> Result<VolumeDisk, ApiError> {
        self.client
            .put(
                &format!("/v1/volumes/{id}/extend"),
                &VolumeDiskRequest {
                    size_gb,
                    key: None,
                    snapshot_id: None,
                    source_volume_id: None,
                },
            )
            .await
            .map_err(agent_error)
    }

    /// Takes a snapshot of a volume (`POST /v1/volumes/{id}/snapshots/{snapshot}`).
    pub async fn snapshot_volume(
        &self,
        id: &str,
        snapshot: &str,
    ) -> Result<aloft_api::internal::SnapshotFile, ApiError> {
        self.client
            .post(&format!("/v1/volumes/{id}/snapshots/{snapshot}"), &())
            .await
            .map_err(agent_error)
    }

    /// Deletes a snapshot (`DELETE /v1/volumes/{id}/snapshots/{snapshot}`).
    pub async fn delete_snapshot(&self, id: &str, snapshot: &str) -> Result<(), ApiError> {
        self.client
            .json::<(), serde_json::Value>(
                Method::DELETE,
                &format!("/v1/volumes/{id}/snapshots/{snapshot}"),
                None,
            )
            .await
            .map(|_| ())
            .map_err(agent_error)
    }

    /// Deletes a volume's disk (`DELETE /v1/volumes/{id}`).
    pub async fn destroy_volume(&self, id: &str) -> Result<(), ApiError> {
        self.client
            .json::<(), serde_json::Value>(Method::DELETE, &format!("/v1/volumes/{id}"), None)
            .await
            .map(|_| ())
            .map_err(agent_error)
    }

    pub async fn get(&self, id: &str) -> Result<AgentMachine, ApiError> {
        self.client
            .get(&format!("/v1/machines/{id}"))
            .await
            .map_err(agent_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_900_000_000_000;

    fn at(ms: i64) -> String {
        chrono::DateTime::from_timestamp_millis(ms)
            .unwrap()
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    }

    fn host(id: &str, region: &str) -> HostRow {
        HostRow {
            id: id.into(),
            region: region.into(),
            agent_url: "http://x".into(),
            last_seen: at(NOW),
            cpus: 0,
            memory_mb: 0,
            cordoned: false,
        }
    }

    fn sized(id: &str, region: &str, cpus: u64, memory_mb: u64) -> HostRow {
        HostRow {
            cpus,
            memory_mb,
            ..host(id, region)
        }
    }

    /// Whole (performance) CPUs.
    fn need(cpus: u64, memory_mb: u64) -> Need {
        Need {
            cpu_shares: cpus * SHARES_PER_CPU,
            memory_mb,
        }
    }

    fn load(machines: u64, app_machines: u64, cpus: u64, memory_mb: u64) -> Load {
        Load {
            machines,
            app_machines,
            reserved: need(cpus, memory_mb),
        }
    }

    fn placed(hosts: &[HostRow], loads: &[(&str, Load)], wanted: &str, n: Need) -> String {
        let loads = loads
            .iter()
            .map(|(id, l)| (id.to_string(), l.clone()))
            .collect();
        place_machine(hosts, &loads, wanted, n, NOW)
            .map(|p| p.host.id)
            .unwrap_or_else(|e| format!("error: {}", e.message))
    }

    #[test]
    fn a_host_is_down_after_the_timeout_and_cordoned_when_told() {
        let mut h = host("h1", "iad");
        assert_eq!(host_status(&h, NOW), HostStatus::Up);
        assert_eq!(
            host_status(&h, NOW + HOST_DOWN_AFTER_SECS * 1000),
            HostStatus::Up
        );
        assert_eq!(
            host_status(&h, NOW + HOST_DOWN_AFTER_SECS * 1000 + 1000),
            HostStatus::Down
        );
        h.cordoned = true;
        assert_eq!(host_status(&h, NOW), HostStatus::Cordoned);
        h.last_seen = "garbage".into();
        assert_eq!(host_status(&h, NOW), HostStatus::Down);
    }

    #[test]
    fn machines_go_to_the_wanted_or_nearest_region_that_has_room() {
        let hosts = vec![sized("h1", "fra", 4, 4096), sized("h2", "iad", 4, 4096)];
        assert_eq!(placed(&hosts, &[], "iad", need(1, 256)), "h2");
        assert_eq!(placed(&hosts, &[], "ams", need(1, 256)), "h1");
        // iad is full: the nearest region with room takes it.
        let full = [("h2", load(4, 0, 4, 4096))];
        assert_eq!(placed(&hosts, &full, "iad", need(1, 256)), "h1");
    }

    #[test]
    fn an_apps_machines_spread_over_hosts_then_free_memory_decides() {
        let hosts = vec![sized("h1", "iad", 8, 8192), sized("h2", "iad", 8, 8192)];
        // h1 has more free memory but already one of the app's machines.
        let loads = [("h1", load(1, 1, 1, 256)), ("h2", load(3, 0, 3, 3072))];
        assert_eq!(placed(&hosts, &loads, "iad", need(1, 256)), "h2");
        // Equal spread: the most free memory wins.
        let loads = [("h1", load(1, 1, 1, 256)), ("h2", load(2, 1, 2, 2048))];
        assert_eq!(placed(&hosts, &loads, "iad", need(1, 256)), "h1");
        // Nothing anywhere: the first by id.
        assert_eq!(placed(&hosts, &[], "iad", need(1, 256)), "h1");
    }

    #[test]
    fn cordoned_and_down_hosts_get_no_machines() {
        let mut cordoned = host("h1", "iad");
        cordoned.cordoned = true;
        let mut down = host("h2", "iad");
        down.last_seen = at(NOW - HOST_DOWN_AFTER_SECS * 1000 - 5000);
        let up = host("h3", "fra");
        let hosts = vec![cordoned.clone(), down.clone(), up];
        assert_eq!(placed(&hosts, &[], "iad", need(1, 256)), "h3");
        let err = placed(&[cordoned, down], &[], "iad", need(1, 256));
        assert_eq!(
            err,
            "error: no host takes new machines: h1 is cordoned, h2 is down"
        );
    }

    #[test]
    fn a_clear_error_when_no_host_has_room() {
        let hosts = vec![sized("h1", "iad", 2, 1024)];
        let loads = [("h1", load(2, 0, 1, 768))];
        assert_eq!(placed(&hosts, &loads, "iad", need(1, 256)), "h1");
        let err = placed(&hosts, &loads, "iad", need(1, 512));
        assert!(err.starts_with("error: insufficient resources: no host has room for a machine of 1 CPUs and 512 MB (h1 has 1 of 2 CPUs and 256 of 1024 MB free)"), "{err}");
        let shared = Need {
            cpu_shares: 1,
            memory_mb: 1,
        };
        let nearly = [("h1", load(2, 0, 1, 768))];
        assert_eq!(placed(&hosts, &nearly, "iad", shared), "h1");
        let err = placed(&hosts, &loads, "iad", need(2, 256));
        assert!(err.contains("no host has room"), "{err}");
        // Undeclared sizes have no limit.
        let hosts = vec![host("h1", "iad")];
        assert_eq!(placed(&hosts, &loads, "iad", need(64, 1 << 20)), "h1");
        assert_eq!(
            placed(&[], &[], "iad", need(1, 256)),
            "error: no hosts are registered; is the agent running?"
        );
    }

    #[test]
    fn loads_count_machines_and_their_guests() {
        let a = MachineRow {
            id: "m1".into(),
            app_id: "app1".into(),
            app_name: "one".into(),
            name: "m1".into(),
            region: "iad".into(),
            host_id: "h1".into(),
            state: aloft_api::MachineState::Started,
            instance_id: String::new(),
            config: MachineConfig::default(),
            private_ip: None,
            private_ipv4: None,
            created_at: String::new(),
            updated_at: String::new(),
            cordoned: false,
            recent_events: Vec::new(),
        };
        let mut b = a.clone();
        b.app_id = "app2".into();
        b.config.guest = Some(MachineGuest {
            cpu_kind: "performance".into(),
            cpus: 2,
            memory_mb: 1024,
            ..MachineGuest::default()
        });
        let mut c = b.clone();
        c.config.guest = Some(MachineGuest {
            cpu_kind: "shared".into(),
            cpus: 4,
            memory_mb: 512,
            ..MachineGuest::default()
        });
        let loads = loads(&[a, b, c], "app1");
        // The default machine: 1 shared CPU, 256 MB; 2 performance CPUs; 4 shared.
        assert_eq!(
            loads["h1"],
            Load {
                machines: 3,
                app_machines: 1,
                reserved: Need {
                    cpu_shares: 1 + 32 + 4,
                    memory_mb: 256 + 1024 + 512
                }
            }
        );
        assert_eq!(cpus_of_shares(37), "2.31");
        assert_eq!(cpus_of_shares(32), "2");
    }

    #[test]
    fn places_in_wanted_or_nearest_region() {
        let hosts = vec![host("h1", "fra"), host("h2", "iad")];
        assert_eq!(place(&hosts, "iad").unwrap().host.id, "h2");
        assert_eq!(place(&hosts, "ams").unwrap().region, "fra");
        let single = vec![host("h1", "local")];
        assert_eq!(place(&single, "iad").unwrap().region, "local");
        assert_eq!(
            place(&[], "iad").unwrap_err().status,
            http::StatusCode::SERVICE_UNAVAILABLE
        );
    }
}
