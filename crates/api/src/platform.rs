//! The rest of the Machines API surface: machine operations' answers, versions,
//! processes, exec, leases, volumes, secrets (names and digests only), IP assignments,
//! certificates, orgs and tokens.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::machine::{Lease, MachineConfig, MachineGuest, MachineState};

/// `{"ok": true}`, the answer of stop, restart, signal, suspend, cordon, destroy, wait.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct OkResponse {
    pub ok: bool,
}

/// The answer of `POST …/start`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StartResponse {
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub status: String,
    pub previous_state: MachineState,
    #[serde(default)]
    pub migrated: bool,
    #[serde(default)]
    pub new_host: String,
}

/// The answer of `POST/GET …/lease`: the lease's fields, and the same wrapped as flaps
/// clients read it (`{"status": "success", "data": {...}}`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LeaseResponse {
    #[serde(flatten)]
    pub lease: Lease,
    pub status: String,
    pub data: Lease,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MetadataValueRequest {
    pub value: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MachineVersion {
    pub version: String,
    pub user_config: MachineConfig,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
}

/// `POST /v1/apps/{app}/machines/{id}/exec` (the Machines API's `MachineExecRequest`;
/// the agent takes the same body at `POST /v1/machines/{id}/exec`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MachineExecRequest {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// Deprecated: a command line split like a shell would (use `command`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<String>,
    /// Seconds before the command is killed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u64>,
    /// Bytes fed to the command's standard input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
}

/// The answer to an exec (`flydv1.ExecResponse`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ExecResponse {
    pub exit_code: i32,
    #[serde(default)]
    pub exit_signal: i32,
    #[serde(default)]
    pub stdout: String,
    #[serde(default)]
    pub stderr: String,
}

/// One process of a machine (`GET .../ps`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ProcessStat {
    pub pid: i32,
    #[serde(default)]
    pub command: String,
    #[serde(default)]
    pub directory: String,
    /// CPU time used, in clock ticks (user + system).
    #[serde(default)]
    pub cpu: u64,
    /// Resident memory, in bytes.
    #[serde(default)]
    pub rss: u64,
    /// User-mode CPU time in milliseconds.
    #[serde(default)]
    pub rtime: u64,
    /// Kernel-mode CPU time in milliseconds.
    #[serde(default)]
    pub stime: u64,
    #[serde(default)]
    pub listen_sockets: Vec<ListenSocket>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ListenSocket {
    pub proto: String,
    pub address: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Volume {
    pub id: String,
    pub name: String,
    pub state: String,
    pub size_gb: u64,
    pub region: String,
    pub zone: String,
    pub encrypted: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attached_machine_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attached_alloc_id: Option<String>,
    pub created_at: String,
    #[serde(default)]
    pub blocks: u64,
    #[serde(default)]
    pub block_size: u64,
    #[serde(default)]
    pub blocks_free: u64,
    #[serde(default)]
    pub blocks_avail: u64,
    pub fstype: String,
    pub snapshot_retention: u64,
    pub auto_backup_enabled: bool,
    pub host_status: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CreateVolumeRequest {
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_gb: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encrypted: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fstype: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub require_unique_zone: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_volume_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_retention: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_backup_enabled: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compute: Option<MachineGuest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compute_image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machines_only: Option<bool>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct UpdateVolumeRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_retention: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_backup_enabled: Option<bool>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ExtendVolumeRequest {
    pub size_gb: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ExtendVolumeResponse {
    pub volume: Volume,
    pub needs_restart: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VolumeSnapshot {
    pub id: String,
    pub size: u64,
    pub digest: String,
    pub created_at: String,
    pub status: String,
    pub retention_days: u64,
}

/// A secret as the API shows it: its name and a digest of its value, never the value.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AppSecret {
    pub name: String,
    pub digest: String,
    pub created_at: String,
    pub updated_at: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ListSecretsResponse {
    pub secrets: Vec<AppSecret>,
    /// Increases with every change; `min_secrets_version` on machine create refers to it.
    pub version: u64,
}

/// `POST /apps/{app}/secrets`: values to set; a null value unsets the secret.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SetSecretsRequest {
    pub values: BTreeMap<String, Option<String>>,
}

/// `POST /apps/{app}/secrets/{name}`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SetSecretRequest {
    pub value: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Certificate {
    pub hostname: String,
    /// `acme` or `custom`.
    pub source: String,
    /// `pending` (nothing tried yet), `issuing`, `failed` or `ready`.
    pub status: String,
    pub configured: bool,
    pub created_at: String,
    /// What flyctl shows: `Awaiting configuration`, `Awaiting certificates` or `Ready`.
    #[serde(default)]
    pub client_status: String,
    /// Who issued the certificate served now (its issuer's common name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_authority: Option<String>,
    /// When the certificate served now expires (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// Why no certificate is served: the last attempt to get one failed, or (an ACME
    /// hostname on a server without an ACME CA) none will be issued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ListCertificatesResponse {
    pub certificates: Vec<Certificate>,
    pub total_count: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CreateCertificateRequest {
    pub hostname: String,
    /// PEM chain, for `/custom` imports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fullchain: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_key: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct OrgInfo {
    pub id: String,
    pub slug: String,
    pub name: String,
    /// `PERSONAL` for the org `aloft server` creates, `SHARED` for the others.
    #[serde(rename = "type")]
    pub kind: String,
    pub created_at: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ListOrgsResponse {
    pub orgs: Vec<OrgInfo>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CreateOrgRequest {
    pub name: String,
    /// Defaults to the name, lowercased, with dashes for anything else.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slug: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TokenInfo {
    pub id: String,
    pub name: String,
    /// `org`, `deploy`, `readonly`, `user`.
    #[serde(rename = "type")]
    pub kind: String,
    pub org_slug: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub apps: Vec<String>,
    pub created_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    pub revoked: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ListTokensResponse {
    pub tokens: Vec<TokenInfo>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CreateTokenRequest {
    /// `org`, `deploy`, `readonly`, or `host` (a host's join token; the admin token only).
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub org_slug: Option<String>,
    /// The app a deploy token is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_name: Option<String>,
    /// Go duration (`1h`, `720h`); default 175200h (20 years), as flyctl.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expiry: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CreateTokenResponse {
    #[serde(flatten)]
    pub info: TokenInfo,
    pub token: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RegionInfo {
    pub code: String,
    pub name: String,
    pub latitude: f64,
    pub longitude: f64,
    /// Whether a host of this platform runs in the region.
    pub available: bool,
}
