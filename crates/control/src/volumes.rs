//! Volumes: `GET/POST /v1/apps/{app}/volumes`, get/update/delete one, extend, snapshots.
//! The control plane keeps the record (name, region, size, state, attachment); creating
//! the disk on a host belongs to the agent.

use std::sync::Arc;

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
        .route(
            "/v1/apps/{app_name}/volumes/{volume_id}/snapshots",
            get(list_snapshots).post(create_snapshot),
        )
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
    Ok(Json(
        plane
            .store
            .list_volumes(&app.id, all)?
            .iter()
            .map(view)
            .collect(),
    ))
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
                "invalid region: {r:?} is not a region code"
            )));
        }
        None => plane.config.region.clone(),
    };
    if let Some(source) = request
        .source_volume_id
        .as_deref()
        .filter(|s| !s.is_empty())
    {
        visible_volume(&plane, &app, source)?;
    }
    let row = VolumeRow {
        id: format!("vol_{}", names::random_id(16)),
        app_id: app.id.clone(),
        name: request.name.clone(),
        region,
        zone: names::random_id(4),
        size_gb: size as i64,
        state: "created".into(),
        encrypted: request.encrypted.unwrap_or(true),
        fstype,
        snapshot_retention: retention as i64,
        auto_backup_enabled: request.auto_backup_enabled.unwrap_or(true),
        attached_machine_id: None,
        created_at: now_rfc3339(),
    };
    plane.store.insert_volume(&row)?;
    Ok(Json(view(&row)))
}

#[utoipa::path(get, path = "/v1/apps/{app_name}/volumes/{volume_id}", tag = "Volumes", operation_id = "Volumes_get_by_id",
    params(("app_name" = String, Path), ("volume_id" = String, Path)), responses((status = 200, body = Volume), ErrorAnswers))]
async fn get_volume(
    State(plane): Plane,
    caller: Caller,
    Path((app_name, id)): Path<(String, String)>,
) -> ApiResult<Json<Volume>> {
    let app = visible_app(&plane, &caller, &app_name)?;
    Ok(Json(view(&visible_volume(&plane, &app, &id)?)))
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
    if let Some(machine) = row.attached_machine_id.as_deref() {
        return Err(ApiError::precondition(format!(
            "volume {id} is attached to machine {machine}; destroy the machine first"
        )));
    }
    row.state = "destroyed".into();
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
    row.size_gb = request.size_gb as i64;
    plane.store.update_volume(&row)?;
    Ok(Json(ExtendVolumeResponse {
        volume: view(&row),
        needs_restart: false,
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
    let row = SnapshotRow {
        id: format!("vs_{}", names::random_id(16)),
        volume_id: volume.id.clone(),
        size: 0,
        digest: String::new(),
        status: "created".into(),
        retention_days: volume.snapshot_retention,
        created_at: now_rfc3339(),
    };
    plane.store.insert_snapshot(&row)?;
    Ok(Json(VolumeSnapshot {
        id: row.id,
        size: 0,
        digest: row.digest,
        created_at: row.created_at,
        status: row.status,
        retention_days: row.retention_days.max(0) as u64,
    }))
}
