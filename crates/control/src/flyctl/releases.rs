//! Releases as flyctl records them when it deploys machines itself (`fly deploy`, and the
//! restart `fly secrets set` does): `POST /api/v1/releases` makes one, `PATCH
//! /api/v1/releases/{id}` moves its status on, `GET /api/v1/apps/{app}/releases` lists an
//! app's. They are the same releases Aloft's own deploys make (`fly releases` shows both).

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use http::StatusCode;
use serde::{Deserialize, Serialize};

use crate::ControlPlane;
use crate::api::{JsonBody, QueryParams, visible_app};
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::store::ReleaseRow;

/// The statuses a release may be given.
const STATUSES: &[&str] = &["pending", "running", "complete", "failed", "cancelled"];

/// fly's uiex `Release`.
#[derive(Serialize, Debug, PartialEq)]
pub struct UiexRelease {
    id: String,
    version: u64,
    stable: bool,
    in_progress: bool,
    status: String,
    strategy: String,
    user: String,
    created_at: String,
    image_ref: String,
}

impl UiexRelease {
    fn new(row: ReleaseRow, strategy: &str) -> Self {
        Self {
            stable: row.status == "complete",
            in_progress: row.status == "running",
            id: row.id,
            version: row.version,
            status: row.status,
            strategy: strategy.to_string(),
            user: row.user,
            created_at: row.created_at,
            image_ref: row.image,
        }
    }
}

#[derive(Deserialize, Default)]
pub struct CreateReleaseRequest {
    #[serde(default)]
    app_name: String,
    #[serde(default)]
    definition: serde_json::Value,
    #[serde(default)]
    image: String,
    #[serde(default)]
    strategy: String,
}

#[derive(Serialize)]
pub struct ReleaseAnswer {
    release: UiexRelease,
}

pub async fn create(
    State(plane): State<Arc<ControlPlane>>,
    caller: Caller,
    JsonBody(request): JsonBody<CreateReleaseRequest>,
) -> ApiResult<(StatusCode, Json<ReleaseAnswer>)> {
    let app = visible_app(&plane, &caller, &request.app_name)?;
    caller.require_write()?;
    if request.image.is_empty() {
        return Err(ApiError::bad_request("invalid image: a release needs one"));
    }
    let config = match &request.definition {
        serde_json::Value::Null => "{}".to_string(),
        definition => definition.to_string(),
    };
    let strategy = request.strategy.to_ascii_lowercase();
    let row = plane.store.create_release(
        &app.id,
        &ulid::Ulid::new().to_string(),
        &request.image,
        &config,
        "deploy (flyctl)",
        &caller.name,
    )?;
    plane.store.set_release_status(&row.id, "pending")?;
    let row = ReleaseRow {
        status: "pending".to_string(),
        ..row
    };
    Ok((
        StatusCode::CREATED,
        Json(ReleaseAnswer {
            release: UiexRelease::new(row, &strategy),
        }),
    ))
}

#[derive(Deserialize, Default)]
pub struct UpdateReleaseRequest {
    #[serde(default)]
    status: String,
}

pub async fn update(
    State(plane): State<Arc<ControlPlane>>,
    caller: Caller,
    Path(id): Path<String>,
    JsonBody(request): JsonBody<UpdateReleaseRequest>,
) -> ApiResult<Json<UiexRelease>> {
    let not_found = || ApiError::not_found(format!("release not found: {id}"));
    let row = plane.store.release(&id)?.ok_or_else(not_found)?;
    let app = plane
        .store
        .app_by_id(&row.app_id)?
        .filter(|app| caller.sees_app(app))
        .ok_or_else(not_found)?;
    caller.require_write()?;
    let status = request.status.to_ascii_lowercase();
    if !STATUSES.contains(&status.as_str()) {
        return Err(ApiError::bad_request(format!(
            "invalid status: {:?} is not one of {}",
            request.status,
            STATUSES.join(", ")
        )));
    }
    plane.store.set_release_status(&row.id, &status)?;
    if status == "complete" {
        plane.store.set_app_status(&app.id, "deployed")?;
    }
    Ok(Json(UiexRelease::new(ReleaseRow { status, ..row }, "")))
}

#[derive(Deserialize, Default)]
pub struct ListQuery {
    limit: Option<usize>,
}

#[derive(Serialize)]
pub struct ReleaseList {
    releases: Vec<UiexRelease>,
}

pub async fn list(
    State(plane): State<Arc<ControlPlane>>,
    caller: Caller,
    Path(name): Path<String>,
    QueryParams(query): QueryParams<ListQuery>,
) -> ApiResult<Json<ReleaseList>> {
    let app = visible_app(&plane, &caller, &name)?;
    let releases = plane
        .store
        .releases(&app.id, query.limit.unwrap_or(25).min(200))?
        .into_iter()
        .map(|row| UiexRelease::new(row, ""))
        .collect();
    Ok(Json(ReleaseList { releases }))
}
