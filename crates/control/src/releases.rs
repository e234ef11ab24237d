//! Releases (`GET /v1/apps/{app}/releases`) and registry garbage collection: images of
//! releases older than the last N are untagged after every deploy and by
//! `POST /v1/registry/gc` (`aloft registry gc`), then unreferenced blobs are deleted.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use aloft_api::internal::Release;
use aloft_registry::{GcOptions, GcReport, Registry};
use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::ControlPlane;
use crate::api::{JsonBody, visible_app};
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::store::{AppRow, Store};

/// Releases whose images are kept when nothing else says.
pub const DEFAULT_KEEP_RELEASES: usize = 10;
/// The setting `aloft server --keep-releases` writes.
pub const SETTING_KEEP_RELEASES: &str = "registry_keep_releases";

pub fn routes() -> Router<Arc<ControlPlane>> {
    Router::new()
        .route("/v1/apps/{app}/releases", get(list_releases))
        .route("/v1/registry", get(registry_info))
        .route("/v1/registry/gc", post(registry_gc))
}

/// `GET /v1/registry`: where the registry is, and whether it mirrors Docker Hub.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RegistryInfo {
    pub host: String,
    /// Repository prefix under which pulls go through to the upstream registry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker_hub_mirror: Option<String>,
    pub keep_releases: usize,
}

async fn registry_info(State(plane): Plane, _caller: Caller) -> ApiResult<Json<RegistryInfo>> {
    Ok(Json(RegistryInfo {
        host: plane.registry_host(),
        docker_hub_mirror: plane
            .config
            .registry_upstream
            .as_ref()
            .map(|u| u.prefix.clone()),
        keep_releases: keep_releases(&plane.store),
    }))
}

type Plane = State<Arc<ControlPlane>>;

async fn list_releases(
    State(plane): Plane,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<Json<Vec<Release>>> {
    let app = visible_app(&plane, &caller, &name)?;
    let releases = plane
        .store
        .releases(&app.id, 200)?
        .into_iter()
        .map(|r| Release {
            id: r.id,
            version: r.version,
            status: r.status,
            description: r.description,
            image: r.image,
            created_at: r.created_at,
            user: r.user,
        })
        .collect();
    Ok(Json(releases))
}

/// `POST /v1/registry/gc`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct GcRequest {
    /// Keep the images of this many most recent releases per app (default: the server's
    /// setting, else 10).
    #[serde(default)]
    pub keep: Option<usize>,
    /// Only this app's images are pruned (blobs are collected registry-wide regardless).
    #[serde(default)]
    pub app: Option<String>,
    /// Unreferenced content younger than this survives (default 15 minutes, so pushes in
    /// flight are safe).
    #[serde(default)]
    pub grace_seconds: Option<u64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct GcResponse {
    /// `repository:tag` of every image untagged because its release is older than the last N.
    pub untagged: Vec<String>,
    pub repositories: usize,
    pub manifests_deleted: usize,
    pub blobs_deleted: usize,
    pub bytes_freed: u64,
    pub uploads_removed: usize,
}

impl GcResponse {
    fn new(untagged: Vec<String>, report: &GcReport) -> Self {
        Self {
            untagged,
            repositories: report.repositories,
            manifests_deleted: report.manifests_deleted,
            blobs_deleted: report.blobs_deleted,
            bytes_freed: report.bytes_freed,
            uploads_removed: report.uploads_removed,
        }
    }
}

pub fn keep_releases(store: &Store) -> usize {
    store
        .setting(SETTING_KEEP_RELEASES)
        .ok()
        .flatten()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(DEFAULT_KEEP_RELEASES)
}

async fn registry_gc(
    State(plane): Plane,
    caller: Caller,
    JsonBody(request): JsonBody<GcRequest>,
) -> ApiResult<Json<GcResponse>> {
    if !caller.is_host() {
        caller.require_org_write().map_err(|_| {
            ApiError::forbidden(
                "registry garbage collection needs an org token (not a deploy or read-only token)",
            )
        })?;
    }
    let apps: Vec<AppRow> = match request.app.as_deref().filter(|a| !a.is_empty()) {
        Some(name) => vec![visible_app(&plane, &caller, name)?],
        None => plane.store.list_apps(if caller.is_host() {
            None
        } else {
            Some(caller.org_id.as_str())
        })?,
    };
    let keep = request
        .keep
        .filter(|k| *k > 0)
        .unwrap_or_else(|| keep_releases(&plane.store));
    let options = GcOptions {
        grace_period: Duration::from_secs(request.grace_seconds.unwrap_or(15 * 60)),
        ..GcOptions::default()
    };
    let (store, registry, host) = (
        plane.store.clone(),
        plane.registry.clone(),
        plane.registry_host(),
    );
    let response = tokio::task::spawn_blocking(move || -> Result<GcResponse, ApiError> {
        let mut untagged = Vec::new();
        for app in &apps {
            untagged.extend(prune_app(&store, &registry, &host, app, keep)?);
        }
        let report = registry
            .gc_with(&options)
            .map_err(|e| ApiError::internal(format!("registry garbage collection failed: {e}")))?;
        Ok(GcResponse::new(untagged, &report))
    })
    .await
    .map_err(|e| ApiError::internal(format!("registry garbage collection stopped: {e}")))??;
    Ok(Json(response))
}

/// Untags the images of `app`'s releases older than its last `keep`, unless a newer
/// release or a machine still uses them. Tags no release names (pushes in flight,
/// `--build-only` images) are left alone. Returns `repository:tag` of what was untagged.
pub fn prune_app(
    store: &Store,
    registry: &Registry,
    registry_host: &str,
    app: &AppRow,
    keep: usize,
) -> Result<Vec<String>, ApiError> {
    let releases = store.releases(&app.id, usize::MAX >> 1)?;
    let tag_of = |image: &str| -> Option<String> {
        let rest = image.strip_prefix(registry_host)?.strip_prefix('/')?;
        let (repo, tag) = rest.rsplit_once(':')?;
        (repo == app.name && !tag.contains('@')).then(|| tag.to_string())
    };
    let mut protected: BTreeSet<String> = releases
        .iter()
        .take(keep)
        .filter_map(|r| tag_of(&r.image))
        .collect();
    for machine in store.list_machines(&app.id, false)? {
        protected.extend(tag_of(&machine.config.image));
    }
    let old: BTreeSet<String> = releases
        .iter()
        .skip(keep)
        .filter_map(|r| tag_of(&r.image))
        .filter(|t| !protected.contains(t))
        .collect();
    if old.is_empty() {
        return Ok(Vec::new());
    }
    let existing: BTreeSet<String> = match registry.list_tags(&app.name) {
        Ok(tags) => tags.into_iter().map(|t| t.name).collect(),
        Err(_) => return Ok(Vec::new()),
    };
    let mut untagged = Vec::new();
    for tag in old.intersection(&existing) {
        registry
            .delete_tag(&app.name, tag)
            .map_err(|e| ApiError::internal(format!("untagging {}:{tag}: {e}", app.name)))?;
        untagged.push(format!("{}:{tag}", app.name));
    }
    Ok(untagged)
}

/// Deletes an app's image repository (tags, manifests, blob links), then collects the
/// blobs nothing else uses in the background.
pub async fn delete_app_repository(plane: &ControlPlane, app_name: &str) -> ApiResult<()> {
    let (registry, repo) = (plane.registry.clone(), app_name.to_string());
    tokio::task::spawn_blocking(move || match registry.delete_repository(&repo) {
        // A name the registry refuses never had a repository.
        Err(aloft_registry::RegistryError::NameInvalid(_)) => Ok(false),
        other => other,
    })
    .await
    .map_err(|e| ApiError::internal(format!("deleting the image repository stopped: {e}")))?
    .map_err(|e| ApiError::internal(format!("deleting the image repository {app_name}: {e}")))?;
    let registry = plane.registry.clone();
    tokio::task::spawn_blocking(move || {
        if let Err(err) = registry.gc() {
            tracing::warn!(error = %err, "registry garbage collection failed");
        }
    });
    Ok(())
}

/// After a deploy: prune the app's old release images and collect garbage, in the
/// background (the deploy does not wait for it).
pub fn collect_old_images_later(plane: &ControlPlane, app: &AppRow) {
    let (store, registry, host, app) = (
        plane.store.clone(),
        plane.registry.clone(),
        plane.registry_host(),
        app.clone(),
    );
    tokio::task::spawn_blocking(move || {
        let keep = keep_releases(&store);
        match prune_app(&store, &registry, &host, &app, keep) {
            Ok(untagged) if untagged.is_empty() => return,
            Ok(untagged) => {
                tracing::info!(app = %app.name, ?untagged, "untagged images of releases older than the last {keep}")
            }
            Err(err) => {
                tracing::warn!(app = %app.name, error = %err, "pruning old release images failed");
                return;
            }
        }
        if let Err(err) = registry.gc() {
            tracing::warn!(error = %err, "registry garbage collection failed");
        }
    });
}
