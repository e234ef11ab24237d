//! Hosts (one agent each), placement, and the client the control plane uses to drive agents.

use aloft_api::internal::{AgentMachine, MachineSpec, VolumeDisk, VolumeDiskRequest};
use aloft_api::{
    ExecResponse, MachineExecRequest, ProcessStat, SignalRequest, StopRequest, regions,
};
use aloft_client::{Client, ClientError};
use http::Method;

use crate::error::ApiError;
use crate::store::HostRow;

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

    fn host(id: &str, region: &str) -> HostRow {
        HostRow {
            id: id.into(),
            region: region.into(),
            agent_url: "http://x".into(),
            last_seen: String::new(),
        }
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
