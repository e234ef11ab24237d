//! Volumes: `GET/POST /v1/apps/{app}/volumes`, get/update/delete one, extend, snapshots.
//! The control plane keeps the record (name, region, host, size, state, attachment) and
//! has the volume's host make, grow and delete the disk; the counts (`blocks`...) come
//! from the host's filesystem. A machine that mounts a volume runs on its host, and one
//! volume is attached to at most one machine ([`claim_for_machine`]).

use std::sync::Arc;

use aloft_api::internal::VolumeDisk;
use aloft_api::secrets::{Sealed, volume_key_aad, volume_key_host_aad};
use aloft_api::{
    CreateVolumeRequest, ExtendVolumeRequest, ExtendVolumeResponse, UpdateVolumeRequest, Volume,
    VolumeSnapshot,
};
use axum::extract::{Path, State};
use axum::routing::{get, put};
use axum::{Json, Router};

use crate::ControlPlane;
use crate::api::{ErrorAnswers, JsonBody, Plane, QueryParams, visible_app};
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::names;
use crate::store::{AppRow, SnapshotRow, VolumeRow, now_rfc3339};

/// The API's default size (flyctl asks for 1 GB itself).
const DEFAULT_SIZE_GB: u64 = 3;
const MAX_SIZE_GB: u64 = 500;
/// ext4 encryption's key size (AES-256-XTS).
const VOLUME_KEY_LEN: usize = 64;

pub fn routes() -> Router<Arc<ControlPlane>> {
    Router::new()
        .route(
            "/v1/apps/{app_name}/volumes",
            get(list_volumes).post(create_volume),
        )
        .route(
            "/v1/apps/{app_name}/volumes/{volume_id}",
            get(get_volume)
                .post(update_volume)
                .put(update_volume)
                .delete(delete_volume),
        )
        .route(
            "/v1/apps/{app_name}/volumes/{volume_id}/extend",
            put(extend_volume),
        )
        .route("/v1/hosts/{host}/volumes/{volume_id}/key", get(volume_key))
        .route(
            "/v1/apps/{app_name}/volumes/{volume_id}/snapshots",
            get(list_snapshots).post(create_snapshot),
        )
}

/// The volume with its host's counts (`host_status` says whether the host answered).
async fn live_view(plane: &ControlPlane, v: &VolumeRow) -> Volume {
    let mut volume = view(v);
    if v.state == "destroyed" {
        return volume;
    }
    let disk = match plane.agent(&v.host_id) {
        Ok(agent) => agent.volume(&v.id).await,
        Err(err) => Err(err),
    };
    match disk {
        Ok(disk) => with_disk(&mut volume, &disk),
        Err(err) => {
            tracing::warn!(volume = %v.id, host = %v.host_id, error = %err.message, "volume's host did not answer");
            volume.host_status = "unreachable".into();
        }
    }
    volume
}

fn with_disk(volume: &mut Volume, disk: &VolumeDisk) {
    volume.blocks = disk.blocks;
    volume.block_size = disk.block_size;
    volume.blocks_free = disk.blocks_free;
    volume.blocks_avail = disk.blocks_avail;
}

fn view(v: &VolumeRow) -> Volume {
    Volume {
        id: v.id.clone(),
        name: v.name.clone(),
        state: v.state.clone(),
        size_gb: v.size_gb.max(0) as u64,
        region: v.region.clone(),
        zone: v.zone.clone(),
        encrypted: v.encrypted,
        attached_machine_id: v.attached_machine_id.clone(),
        attached_alloc_id: v.attached_machine_id.clone(),
        created_at: v.created_at.clone(),
        blocks: 0,
        block_size: 4096,
        blocks_free: 0,
        blocks_avail: 0,
        fstype: v.fstype.clone(),
        snapshot_retention: v.snapshot_retention.max(0) as u64,
        auto_backup_enabled: v.auto_backup_enabled,
        host_status: "ok".into(),
    }
}

fn visible_volume(plane: &ControlPlane, app: &AppRow, id: &str) -> ApiResult<VolumeRow> {
    match plane.store.volume(id)? {
        Some(v) if v.app_id == app.id && v.state != "destroyed" => Ok(v),
        _ => Err(ApiError::not_found(format!("volume not found: {id}"))),
    }
}

/// Volume names: lowercase letters, digits and underscores, at most 30 characters.
fn check_name(name: &str) -> ApiResult<()> {
    if name.is_empty()
        || name.len() > 30
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(ApiError::bad_request(format!(
            "invalid name: {name:?} must be 1 to 30 lowercase letters, digits or underscores"
        )));
    }
    Ok(())
}

fn check_retention(days: u64) -> ApiResult<()> {
    if !(1..=60).contains(&days) {
        return Err(ApiError::bad_request(format!(
            "invalid snapshot_retention: {days} must be between 1 and 60 days"
        )));
    }
    Ok(())
}

#[derive(serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListVolumesQuery {
    /// Include destroyed volumes.
    include_deleted: Option<String>,
    /// Accepted for flyctl; ignored.
    #[allow(dead_code)]
    summary: Option<String>,
}

#[utoipa::path(get, path = "/v1/apps/{app_name}/volumes", tag = "Volumes", operation_id = "Volumes_list",
    params(("app_name" = String, Path), ListVolumesQuery), responses((status = 200, body = Vec<Volume>), ErrorAnswers))]
async fn list_volumes(
    State(plane): Plane,
    caller: Caller,
    Path(app_name): Path<String>,
    QueryParams(query): QueryParams<ListVolumesQuery>,
) -> ApiResult<Json<Vec<Volume>>> {
    let app = visible_app(&plane, &caller, &app_name)?;
    let all = matches!(query.include_deleted.as_deref(), Some("true" | "1"));
    let rows = plane.store.list_volumes(&app.id, all)?;
    let views = futures_util::future::join_all(rows.iter().map(|row| live_view(&plane, row))).await;
    Ok(Json(views))
}

#[utoipa::path(post, path = "/v1/apps/{app_name}/volumes", tag = "Volumes", operation_id = "Volumes_create",
    params(("app_name" = String, Path)), request_body = CreateVolumeRequest, responses((status = 200, body = Volume), ErrorAnswers))]
async fn create_volume(
    State(plane): Plane,
    caller: Caller,
    Path(app_name): Path<String>,
    JsonBody(request): JsonBody<CreateVolumeRequest>,
) -> ApiResult<Json<Volume>> {
    let app = visible_app(&plane, &caller, &app_name)?;
    caller.require_write()?;
    Ok(Json(create(&plane, &app, &request).await?))
}

/// Makes a volume of `app`: its disk on a host of the region, then its record.
pub async fn create(
    plane: &ControlPlane,
    app: &AppRow,
    request: &CreateVolumeRequest,
) -> ApiResult<Volume> {
    check_name(&request.name)?;
    let size = request.size_gb.unwrap_or(DEFAULT_SIZE_GB);
    if size == 0 || size > MAX_SIZE_GB {
        return Err(ApiError::bad_request(format!(
            "invalid size_gb: {size} must be between 1 and {MAX_SIZE_GB}"
        )));
    }
    let retention = request.snapshot_retention.unwrap_or(5);
    check_retention(retention)?;
    let fstype = request
        .fstype
        .clone()
        .filter(|f| !f.is_empty())
        .unwrap_or_else(|| "ext4".into());
    if !matches!(fstype.as_str(), "ext4" | "raw") {
        return Err(ApiError::bad_request(format!(
            "invalid fstype: {fstype:?} must be ext4 or raw"
        )));
    }
    let hosts = plane.store.hosts()?;
    let region = match request.region.as_deref().filter(|r| !r.is_empty()) {
        Some(r)
            if aloft_api::regions::find(r).is_some()
                || hosts.iter().any(|h| h.region == r)
                || r == plane.config.region =>
        {
            r.to_string()
        }
        Some(r) => {
            return Err(ApiError::bad_request(format!(
                "invalid region: {r:?} is not a region code (see GET /v1/platform/regions)"
            )));
        }
        None => plane.config.region.clone(),
    };
    // A volume from a snapshot is made on the host that keeps the snapshot, with the
    // source volume's encryption key (the snapshot is its ciphertext).
    let source = match request.snapshot_id.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(snapshot) => {
            let found = plane
                .store
                .snapshot(snapshot)?
                .filter(|s| s.status == "created")
                .and_then(|s| plane.store.volume(&s.volume_id).ok().flatten())
                .filter(|v| v.app_id == app.id);
            let Some(volume) = found else {
                return Err(ApiError::bad_request(format!(
                    "invalid snapshot_id: {snapshot:?} is not a snapshot of a volume of app {} (see `aloft volumes snapshots list VOLUME_ID`)",
                    app.name
                )));
            };
            if request
                .region
                .as_deref()
                .is_some_and(|r| !r.is_empty() && r != volume.region)
            {
                return Err(ApiError::bad_request(format!(
                    "invalid region: snapshot {snapshot} is in region {}; restore it there",
                    volume.region
                )));
            }
            Some((snapshot.to_string(), volume))
        }
    };
    let forked = match request
        .source_volume_id
        .as_deref()
        .filter(|s| !s.is_empty())
    {
        None => None,
        Some(id) => {
            let volume = visible_volume(plane, app, id).map_err(|_| {
                ApiError::bad_request(format!(
                    "invalid source_volume_id: volume {id:?} not found in app {}",
                    app.name
                ))
            })?;
            if request
                .region
                .as_deref()
                .is_some_and(|r| !r.is_empty() && r != volume.region)
            {
                return Err(ApiError::bad_request(format!(
                    "invalid region: volume {id} is in region {}; a fork is made on its host, in its region",
                    volume.region
                )));
            }
            Some(volume)
        }
    };
    if source.is_some() && forked.is_some() {
        return Err(ApiError::bad_request(
            "invalid snapshot_id: give snapshot_id or source_volume_id, not both",
        ));
    }
    let source = source.or_else(|| forked.clone().map(|v| (String::new(), v)));
    let region = match &source {
        Some((_, volume)) => volume.region.clone(),
        None => region,
    };
    let size = match &source {
        Some((_, volume)) => size.max(volume.size_gb.max(1) as u64),
        None => size,
    };
    let placement = match &source {
        Some((_, volume)) => crate::hosts::Placement {
            host: hosts
                .iter()
                .find(|h| h.id == volume.host_id)
                .cloned()
                .ok_or_else(|| {
                    ApiError::unavailable(format!(
                        "the host of the snapshot ({}) is not registered",
                        volume.host_id
                    ))
                })?,
            region: volume.region.clone(),
        },
        None => {
            // A new volume goes to a host that takes new machines (its machines follow it).
            let now = crate::store::now_millis();
            let open: Vec<_> = hosts
                .iter()
                .filter(|h| crate::hosts::host_status(h, now) == crate::hosts::HostStatus::Up)
                .cloned()
                .collect();
            if open.is_empty() && !hosts.is_empty() {
                return Err(ApiError::unavailable(
                    "no host takes new volumes: every host is down or cordoned",
                ));
            }
            crate::hosts::place(&open, &region)?
        }
    };
    let mut row = VolumeRow {
        id: format!("vol_{}", names::random_id(16)),
        app_id: app.id.clone(),
        name: request.name.clone(),
        region,
        zone: names::random_id(4),
        size_gb: size as i64,
        state: "created".into(),
        encrypted: match &source {
            Some((_, volume)) => volume.encrypted,
            None => request.encrypted.unwrap_or(true),
        },
        fstype,
        snapshot_retention: retention as i64,
        auto_backup_enabled: request.auto_backup_enabled.unwrap_or(true),
        attached_machine_id: None,
        created_at: now_rfc3339(),
        host_id: placement.host.id.clone(),
    };
    // A key of its own for an encrypted volume: sealed in the vault for the record, and
    // for the host that holds the disk.
    let keys = if let Some((_, volume)) = source.as_ref().filter(|(_, v)| v.encrypted) {
        let sealing = plane
            .secrets
            .volume_sealing_key()
            .map_err(|_| ApiError::internal("opening the vault"))?;
        let stored: Sealed = plane
            .store
            .volume_key(&volume.id)?
            .and_then(|k| serde_json::from_str(&k).ok())
            .ok_or_else(|| ApiError::internal(format!("volume {} has no key", volume.id)))?;
        let mut key = stored
            .open(&sealing, &volume_key_aad(&volume.id))
            .map_err(|_| {
                ApiError::internal(format!("the key of volume {} does not open", volume.id))
            })?;
        let copied = Sealed::seal(&sealing, &volume_key_aad(&row.id), &key)
            .map_err(|_| ApiError::internal("sealing the volume's key"));
        // The disk is the snapshot's ciphertext; a microVM host still needs the key to
        // read the new volume's counts through its LUKS layer.
        let for_host = Sealed::seal(
            &plane.secrets.host_key(&row.host_id),
            &volume_key_host_aad(&row.host_id, &row.id),
            &key,
        )
        .map_err(|_| ApiError::internal("sealing the volume's key for its host"));
        key.fill(0);
        Some((copied?, for_host?))
    } else if source.is_some() {
        None
    } else if row.encrypted {
        let mut key = vec![0u8; VOLUME_KEY_LEN];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut key);
        let stored = plane
            .secrets
            .volume_sealing_key()
            .ok()
            .and_then(|k| Sealed::seal(&k, &volume_key_aad(&row.id), &key).ok())
            .ok_or_else(|| ApiError::internal("sealing the volume's key"))?;
        let for_host = Sealed::seal(
            &plane.secrets.host_key(&row.host_id),
            &volume_key_host_aad(&row.host_id, &row.id),
            &key,
        )
        .map_err(|_| ApiError::internal("sealing the volume's key for its host"))?;
        key.fill(0);
        Some((stored, for_host))
    } else {
        None
    };
    // The disk first: a record only ever names a disk that exists.
    let agent = plane.agent(&row.host_id)?;
    let disk = agent
        .create_volume(
            &row.id,
            size,
            keys.as_ref().map(|(_, host)| host.clone()),
            source
                .as_ref()
                .filter(|_| forked.is_none())
                .map(|(snapshot, _)| snapshot.clone()),
            forked.as_ref().map(|v| v.id.clone()),
        )
        .await?;
    let recorded = plane.store.insert_volume(&row).and_then(|()| match &keys {
        Some((stored, _)) => plane
            .store
            .set_volume_key(&row.id, &serde_json::to_string(stored).unwrap_or_default()),
        None => Ok(()),
    });
    if let Err(err) = recorded {
        if let Err(cleanup) = agent.destroy_volume(&row.id).await {
            tracing::warn!(volume = %row.id, error = %cleanup.message, "removing the disk of a volume that was not recorded");
        }
        return Err(err.into());
    }
    row.state = "created".into();
    let mut volume = view(&row);
    with_disk(&mut volume, &disk);
    Ok(volume)
}

#[utoipa::path(get, path = "/v1/apps/{app_name}/volumes/{volume_id}", tag = "Volumes", operation_id = "Volumes_get_by_id",
    params(("app_name" = String, Path), ("volume_id" = String, Path)), responses((status = 200, body = Volume), ErrorAnswers))]
async fn get_volume(
    State(plane): Plane,
    caller: Caller,
    Path((app_name, id)): Path<(String, String)>,
) -> ApiResult<Json<Volume>> {
    let app = visible_app(&plane, &caller, &app_name)?;
    let row = visible_volume(&plane, &app, &id)?;
    Ok(Json(live_view(&plane, &row).await))
}

#[utoipa::path(post, path = "/v1/apps/{app_name}/volumes/{volume_id}", tag = "Volumes", operation_id = "Volumes_update",
    params(("app_name" = String, Path), ("volume_id" = String, Path)), request_body = UpdateVolumeRequest,
    responses((status = 200, body = Volume), ErrorAnswers))]
async fn update_volume(
    State(plane): Plane,
    caller: Caller,
    Path((app_name, id)): Path<(String, String)>,
    JsonBody(request): JsonBody<UpdateVolumeRequest>,
) -> ApiResult<Json<Volume>> {
    let app = visible_app(&plane, &caller, &app_name)?;
    caller.require_write()?;
    let mut row = visible_volume(&plane, &app, &id)?;
    if let Some(days) = request.snapshot_retention {
        check_retention(days)?;
        row.snapshot_retention = days as i64;
    }
    if let Some(enabled) = request.auto_backup_enabled {
        row.auto_backup_enabled = enabled;
    }
    plane.store.update_volume(&row)?;
    Ok(Json(view(&row)))
}

#[utoipa::path(delete, path = "/v1/apps/{app_name}/volumes/{volume_id}", tag = "Volumes", operation_id = "Volume_delete",
    params(("app_name" = String, Path), ("volume_id" = String, Path)), responses((status = 200, body = Volume), ErrorAnswers))]
async fn delete_volume(
    State(plane): Plane,
    caller: Caller,
    Path((app_name, id)): Path<(String, String)>,
) -> ApiResult<Json<Volume>> {
    let app = visible_app(&plane, &caller, &app_name)?;
    caller.require_write()?;
    let mut row = visible_volume(&plane, &app, &id)?;
    if let Some(machine) = attached_machine(&plane, &row)? {
        return Err(ApiError::precondition(format!(
            "volume {id} is attached to machine {machine}; destroy the machine first"
        )));
    }
    match plane.agent(&row.host_id) {
        Ok(agent) => match agent.destroy_volume(&row.id).await {
            Ok(()) => {}
            Err(err) if err.status == http::StatusCode::NOT_FOUND => {}
            Err(err) => return Err(err),
        },
        Err(err) if row.host_id.is_empty() => {
            tracing::debug!(volume = %row.id, error = %err.message, "a volume recorded before volumes had disks");
        }
        Err(err) => return Err(err),
    }
    row.state = "destroyed".into();
    row.attached_machine_id = None;
    plane.store.update_volume(&row)?;
    Ok(Json(view(&row)))
}

#[utoipa::path(put, path = "/v1/apps/{app_name}/volumes/{volume_id}/extend", tag = "Volumes", operation_id = "Volumes_extend",
    params(("app_name" = String, Path), ("volume_id" = String, Path)), request_body = ExtendVolumeRequest,
    responses((status = 200, body = ExtendVolumeResponse), ErrorAnswers))]
async fn extend_volume(
    State(plane): Plane,
    caller: Caller,
    Path((app_name, id)): Path<(String, String)>,
    JsonBody(request): JsonBody<ExtendVolumeRequest>,
) -> ApiResult<Json<ExtendVolumeResponse>> {
    let app = visible_app(&plane, &caller, &app_name)?;
    caller.require_write()?;
    let mut row = visible_volume(&plane, &app, &id)?;
    if request.size_gb <= row.size_gb.max(0) as u64 || request.size_gb > MAX_SIZE_GB {
        return Err(ApiError::bad_request(format!(
            "invalid size_gb: {} must be more than the current {} GB and at most {MAX_SIZE_GB} (volumes only grow)",
            request.size_gb, row.size_gb
        )));
    }
    let disk = plane
        .agent(&row.host_id)?
        .extend_volume(&row.id, request.size_gb)
        .await?;
    row.size_gb = request.size_gb as i64;
    plane.store.update_volume(&row)?;
    let mut volume = view(&row);
    with_disk(&mut volume, &disk);
    Ok(Json(ExtendVolumeResponse {
        volume,
        needs_restart: disk.needs_restart,
    }))
}

#[utoipa::path(get, path = "/v1/apps/{app_name}/volumes/{volume_id}/snapshots", tag = "Volumes", operation_id = "Volumes_list_snapshots",
    params(("app_name" = String, Path), ("volume_id" = String, Path)), responses((status = 200, body = Vec<VolumeSnapshot>), ErrorAnswers))]
async fn list_snapshots(
    State(plane): Plane,
    caller: Caller,
    Path((app_name, id)): Path<(String, String)>,
) -> ApiResult<Json<Vec<VolumeSnapshot>>> {
    let app = visible_app(&plane, &caller, &app_name)?;
    let volume = visible_volume(&plane, &app, &id)?;
    let snapshots = plane.store.snapshots(&volume.id)?;
    Ok(Json(
        snapshots
            .into_iter()
            .map(|s| VolumeSnapshot {
                id: s.id,
                size: s.size.max(0) as u64,
                digest: s.digest,
                created_at: s.created_at,
                status: s.status,
                retention_days: s.retention_days.max(0) as u64,
            })
            .collect(),
    ))
}

#[utoipa::path(post, path = "/v1/apps/{app_name}/volumes/{volume_id}/snapshots", tag = "Volumes", operation_id = "createVolumeSnapshot",
    params(("app_name" = String, Path), ("volume_id" = String, Path)), responses((status = 200, body = VolumeSnapshot), ErrorAnswers))]
async fn create_snapshot(
    State(plane): Plane,
    caller: Caller,
    Path((app_name, id)): Path<(String, String)>,
) -> ApiResult<Json<VolumeSnapshot>> {
    let app = visible_app(&plane, &caller, &app_name)?;
    caller.require_write()?;
    let volume = visible_volume(&plane, &app, &id)?;
    let snapshot_id = format!("vs_{}", names::random_id(16));
    let file = plane
        .agent(&volume.host_id)?
        .snapshot_volume(&volume.id, &snapshot_id)
        .await?;
    let row = SnapshotRow {
        id: snapshot_id,
        volume_id: volume.id.clone(),
        size: file.size as i64,
        digest: file.digest,
        status: "created".into(),
        retention_days: volume.snapshot_retention,
        created_at: now_rfc3339(),
    };
    plane.store.insert_snapshot(&row)?;
    Ok(Json(VolumeSnapshot {
        id: row.id,
        size: row.size.max(0) as u64,
        digest: row.digest,
        created_at: row.created_at,
        status: row.status,
        retention_days: row.retention_days.max(0) as u64,
    }))
}

/// The machine a volume is attached to, if that machine still exists.
fn attached_machine(plane: &ControlPlane, row: &VolumeRow) -> ApiResult<Option<String>> {
    let Some(machine) = row.attached_machine_id.as_deref() else {
        return Ok(None);
    };
    Ok(match plane.store.machine(machine)? {
        Some(m) if m.state != aloft_api::MachineState::Destroyed => Some(machine.to_string()),
        _ => None,
    })
}

/// The volume a new machine of `app` mounts (its config's `mounts[0].volume`), checked:
/// it exists in the app, is in the machine's region (`region`, when the request names
/// one) and attached to no other machine. The machine goes to the volume's host.
pub fn volume_for_machine(
    plane: &ControlPlane,
    app: &AppRow,
    config: &aloft_api::MachineConfig,
    region: Option<&str>,
) -> ApiResult<Option<VolumeRow>> {
    let Some(mount) = config.mounts.first() else {
        return Ok(None);
    };
    if mount.volume.is_empty() {
        return Err(ApiError::bad_request(
            "invalid config.mounts[0].volume: a mount needs the ID of a volume of the app (see `aloft volumes list`; create one with `aloft volumes create NAME`)",
        ));
    }
    let row = match plane.store.volume(&mount.volume)? {
        Some(v) if v.app_id == app.id && v.state != "destroyed" => v,
        _ => {
            return Err(ApiError::bad_request(format!(
                "invalid config.mounts[0].volume: volume {:?} not found in app {}",
                mount.volume, app.name
            )));
        }
    };
    if let Some(region) = region.map(str::trim).filter(|r| !r.is_empty())
        && region != row.region
    {
        return Err(ApiError::bad_request(format!(
            "invalid region: volume {} (config.mounts[0].volume) is in region {}, not {region}; a machine runs where its volume is: ask for region {} or use a volume in {region}",
            row.id, row.region, row.region
        )));
    }
    if let Some(machine) = attached_machine(plane, &row)? {
        return Err(ApiError::precondition(format!(
            "volume {} (config.mounts[0].volume) is already attached to machine {machine}; a volume is attached to one machine at a time",
            row.id
        )));
    }
    Ok(Some(row))
}

/// Attaches `volume` to the new machine `machine_id`, or says which machine won it.
pub fn attach(plane: &ControlPlane, volume: &VolumeRow, machine_id: &str) -> ApiResult<()> {
    if plane.store.attach_volume(&volume.id, machine_id)? {
        return Ok(());
    }
    let holder = plane
        .store
        .volume(&volume.id)?
        .and_then(|v| v.attached_machine_id)
        .unwrap_or_default();
    Err(ApiError::precondition(format!(
        "volume {} (config.mounts[0].volume) is already attached to machine {holder}; a volume is attached to one machine at a time",
        volume.id
    )))
}

/// A new config for an existing machine keeps its volume: a mount without a volume ID
/// (a deploy from fly.toml) gets the one the machine has, and a different volume is
/// refused (a machine can't change volumes; replace it).
pub fn keep_volume(
    old: &aloft_api::MachineConfig,
    new: &mut aloft_api::MachineConfig,
    machine_id: &str,
) -> ApiResult<()> {
    let (Some(was), Some(now)) = (old.mounts.first(), new.mounts.first_mut()) else {
        if old.mounts.is_empty() && !new.mounts.is_empty() {
            return Err(ApiError::bad_request(format!(
                "invalid config.mounts: machine {machine_id} has no volume, and a volume can't be attached to an existing machine; create a new machine with the volume"
            )));
        }
        return Ok(());
    };
    if now.volume.is_empty() {
        if !now.name.is_empty() && !was.name.is_empty() && now.name != was.name {
            return Err(ApiError::bad_request(format!(
                "machine {machine_id} can't update the attached volume {} with name '{}' by '{}'",
                was.volume, was.name, now.name
            )));
        }
        now.volume = was.volume.clone();
        if now.name.is_empty() {
            now.name = was.name.clone();
        }
    } else if now.volume != was.volume {
        return Err(ApiError::bad_request(format!(
            "invalid config.mounts[0].volume: machine {machine_id} has volume {} attached and can't change it to {}; create a new machine with that volume",
            was.volume, now.volume
        )));
    }
    Ok(())
}

/// Deletes the disks of all of `app`'s volumes (the app is being destroyed, its machines
/// already are) and marks them destroyed.
pub async fn destroy_all(plane: &ControlPlane, app: &AppRow) -> ApiResult<()> {
    for mut row in plane.store.list_volumes(&app.id, false)? {
        if !row.host_id.is_empty() {
            match plane.agent(&row.host_id)?.destroy_volume(&row.id).await {
                Ok(()) => {}
                Err(err) if err.status == http::StatusCode::NOT_FOUND => {}
                Err(err) => return Err(err),
            }
        }
        row.state = "destroyed".into();
        row.attached_machine_id = None;
        plane.store.update_volume(&row)?;
    }
    Ok(())
}

/// `GET /v1/hosts/{host}/volumes/{id}/key`: a volume's encryption key sealed for the host
/// that holds it (its agent adds it to the filesystem when a machine starts), for that
/// host's token only.
async fn volume_key(
    State(plane): Plane,
    caller: Caller,
    Path((host, id)): Path<(String, String)>,
) -> ApiResult<Json<Sealed>> {
    caller.require_host_itself(&host)?;
    let row = match plane.store.volume(&id)? {
        Some(v) if v.host_id == host && v.state != "destroyed" => v,
        _ => return Err(ApiError::not_found(format!("volume not found: {id}"))),
    };
    let stored = plane
        .store
        .volume_key(&row.id)?
        .filter(|k| !k.is_empty())
        .ok_or_else(|| ApiError::not_found(format!("volume {id} is not encrypted")))?;
    let stored: Sealed = serde_json::from_str(&stored)
        .map_err(|_| ApiError::internal(format!("the stored key of volume {id} is unreadable")))?;
    let sealing = plane
        .secrets
        .volume_sealing_key()
        .map_err(|_| ApiError::internal("opening the vault"))?;
    let mut key = stored
        .open(&sealing, &volume_key_aad(&row.id))
        .map_err(|_| ApiError::internal(format!("the key of volume {id} does not open")))?;
    let for_host = Sealed::seal(
        &plane.secrets.host_key(&host),
        &volume_key_host_aad(&host, &row.id),
        &key,
    )
    .map_err(|_| ApiError::internal("sealing the volume's key for its host"));
    key.fill(0);
    Ok(Json(for_host?))
}

/// A day of volume time: 24 hours, divided by `aloft server --schedule-time-scale` (tests).
fn day_ms(plane: &ControlPlane) -> i64 {
    let scale = plane
        .store
        .setting(crate::timers::SETTING_SCHEDULE_TIME_SCALE)
        .ok()
        .flatten()
        .and_then(|s| s.parse::<i64>().ok())
        .filter(|s| *s > 0)
        .unwrap_or(1);
    86_400_000 / scale
}

fn millis(rfc3339: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(rfc3339)
        .map(|t| t.timestamp_millis())
        .unwrap_or(0)
}

/// Daily automatic snapshots of volumes with `auto_backup_enabled`, and the end of
/// snapshots older than their `retention_days` (Fly's defaults: daily, kept 5 days).
pub async fn run_scheduled_snapshots(plane: &ControlPlane) -> Result<(), crate::store::StoreError> {
    let day = day_ms(plane);
    let now = crate::store::now_millis();
    for volume in plane.store.all_live_volumes()? {
        let Ok(agent) = plane.agent(&volume.host_id) else {
            continue;
        };
        let snapshots = plane.store.snapshots(&volume.id)?;
        for old in &snapshots {
            let age = now - millis(&old.created_at);
            if age > day.saturating_mul(old.retention_days.max(1)) {
                match agent.delete_snapshot(&volume.id, &old.id).await {
                    Ok(()) => {}
                    Err(err) if err.status == http::StatusCode::NOT_FOUND => {}
                    Err(err) => {
                        tracing::warn!(snapshot = %old.id, error = %err.message, "removing an expired snapshot");
                        continue;
                    }
                }
                plane.store.delete_snapshot(&old.id)?;
                tracing::info!(volume = %volume.id, snapshot = %old.id, "expired snapshot removed");
            }
        }
        if !volume.auto_backup_enabled {
            continue;
        }
        let last = snapshots
            .iter()
            .map(|s| millis(&s.created_at))
            .max()
            .unwrap_or_else(|| millis(&volume.created_at));
        if now - last < day {
            continue;
        }
        let id = format!("vs_{}", names::random_id(16));
        match agent.snapshot_volume(&volume.id, &id).await {
            Ok(file) => plane.store.insert_snapshot(&SnapshotRow {
                id,
                volume_id: volume.id.clone(),
                size: file.size as i64,
                digest: file.digest,
                status: "created".into(),
                retention_days: volume.snapshot_retention,
                created_at: now_rfc3339(),
            })?,
            Err(err) => {
                tracing::warn!(volume = %volume.id, error = %err.message, "daily snapshot failed")
            }
        }
    }
    Ok(())
}

/// `[mounts]`' `auto_extend_size_*`: a volume whose machine's mount sets a threshold grows
/// by `add_size_gb` (up to `size_gb_limit`) once that much of it is used.
pub async fn run_auto_extend(plane: &ControlPlane) -> Result<(), crate::store::StoreError> {
    for mut volume in plane.store.all_live_volumes()? {
        let Some(machine_id) = volume.attached_machine_id.clone() else {
            continue;
        };
        let Some(machine) = plane.store.machine(&machine_id)? else {
            continue;
        };
        let Some(mount) = machine.config.mounts.iter().find(|m| m.volume == volume.id) else {
            continue;
        };
        let (Some(threshold), Some(add)) = (mount.extend_threshold_percent, mount.add_size_gb)
        else {
            continue;
        };
        let limit = mount
            .size_gb_limit
            .map(u64::from)
            .unwrap_or(MAX_SIZE_GB)
            .min(MAX_SIZE_GB);
        let size = volume.size_gb.max(0) as u64;
        if threshold == 0 || add == 0 || size >= limit {
            continue;
        }
        let Ok(agent) = plane.agent(&volume.host_id) else {
            continue;
        };
        let Ok(disk) = agent.volume(&volume.id).await else {
            continue;
        };
        if disk.blocks == 0 {
            continue;
        }
        let used = disk.blocks.saturating_sub(disk.blocks_avail) * 100 / disk.blocks;
        if used < u64::from(threshold) {
            continue;
        }
        let wanted = (size + u64::from(add)).min(limit);
        match agent.extend_volume(&volume.id, wanted).await {
            Ok(disk) => {
                tracing::info!(volume = %volume.id, used_percent = used, from = size, to = wanted, needs_restart = disk.needs_restart, "volume extended automatically");
                volume.size_gb = wanted as i64;
                plane.store.update_volume(&volume)?;
            }
            Err(err) => {
                tracing::warn!(volume = %volume.id, error = %err.message, "extending a volume automatically")
            }
        }
    }
    Ok(())
}
