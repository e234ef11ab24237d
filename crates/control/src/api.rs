//! HTTP routes: the Machines API under `/v1/apps`, deploys, the catalog stream, and the
//! internal endpoints agents use.

use std::convert::Infallible;
use std::sync::Arc;

use aloft_api::internal::{AgentEvent, CatalogUpdate, HostRegistration};
use aloft_api::{
    App, CreateAppRequest, CreateMachineRequest, ListApp, ListAppsResponse, Machine, MachineEvent,
    Organization, StopRequest, UpdateMachineRequest,
};
use axum::body::Body;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderMap, StatusCode, header};
use serde::Deserialize;
use tokio::sync::broadcast;

use crate::ControlPlane;
use crate::auth::{Caller, authenticate};
use crate::catalog::{Resume, update_seq};
use crate::error::{ApiError, ApiResult};
use crate::names;
use crate::store::{AppRow, HostRow, MachineRow, now_rfc3339};

type Plane = State<Arc<ControlPlane>>;

const MAX_BODY: usize = 4 * 1024 * 1024;

pub fn router(plane: Arc<ControlPlane>) -> Router {
    Router::new()
        .route("/v1/apps", get(list_apps).post(create_app))
        .route("/v1/apps/{app}", get(get_app).delete(delete_app))
        .route(
            "/v1/apps/{app}/machines",
            get(list_machines).post(create_machine),
        )
        .route(
            "/v1/apps/{app}/machines/{id}",
            get(get_machine)
                .post(update_machine)
                .delete(destroy_machine),
        )
        .route("/v1/apps/{app}/machines/{id}/start", post(start_machine))
        .route("/v1/apps/{app}/machines/{id}/stop", post(stop_machine))
        .route("/v1/apps/{app}/machines/{id}/events", get(machine_events))
        .route("/v1/catalog/watch", get(watch_catalog))
        .route("/v1/hosts", post(register_host))
        .route("/v1/hosts/{id}/events", post(host_events))
        .merge(crate::deploy::routes())
        .merge(crate::runtime::router())
        .merge(crate::ips::routes())
        .merge(crate::secrets::routes())
        .fallback(not_found)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(plane)
}

async fn not_found() -> ApiError {
    ApiError::not_found("not found")
}

impl FromRequestParts<Arc<ControlPlane>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        plane: &Arc<ControlPlane>,
    ) -> Result<Self, Self::Rejection> {
        let header = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        authenticate(&plane.store, header, chrono::Utc::now().timestamp())
    }
}

/// JSON bodies with errors in the API's own shape, naming what is wrong.
pub struct JsonBody<T>(pub T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> axum::extract::FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("request body is larger than {MAX_BODY} bytes"),
                )
            } else {
                ApiError::bad_request(format!("cannot read request body: {e}"))
            }
        })?;
        let bytes = if bytes.is_empty() {
            Bytes::from_static(b"{}")
        } else {
            bytes
        };
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
    }
}

/// Finds an app the caller may see; apps of other orgs answer exactly like missing ones.
pub(crate) fn visible_app(plane: &ControlPlane, caller: &Caller, name: &str) -> ApiResult<AppRow> {
    match plane.store.app(name)? {
        Some(app) if caller.sees_app(&app) => Ok(app),
        _ => Err(ApiError::not_found(format!("app not found: {name}"))),
    }
}

fn visible_machine(plane: &ControlPlane, app: &AppRow, id: &str) -> ApiResult<MachineRow> {
    match plane.store.machine(id)? {
        Some(machine) if machine.app_id == app.id => Ok(machine),
        _ => Err(ApiError::not_found(format!("machine not found: {id}"))),
    }
}

fn app_view(plane: &ControlPlane, app: &AppRow) -> App {
    App {
        id: app.id.clone(),
        name: app.name.clone(),
        status: app.status.clone(),
        organization: Organization {
            id: app.org_id.clone(),
            name: app.org_slug.clone(),
            slug: app.org_slug.clone(),
        },
        network: Some(app.network.clone()),
        hostname: Some(format!("{}.{}", app.name, plane.config.base_domain)),
        created_at: Some(app.created_at.clone()),
    }
}

#[derive(Deserialize)]
struct ListAppsQuery {
    org_slug: Option<String>,
}

async fn list_apps(
    State(plane): Plane,
    caller: Caller,
    Query(query): Query<ListAppsQuery>,
) -> ApiResult<Json<ListAppsResponse>> {
    let org_filter = match query.org_slug.as_deref().filter(|s| !s.is_empty()) {
        Some(slug) => match plane.store.org_by_slug(slug)? {
            Some(org) if caller.is_host() || org.id == caller.org_id => Some(org.id),
            _ => {
                return Err(ApiError::not_found(format!(
                    "organization not found: {slug}"
                )));
            }
        },
        None if caller.is_host() => None,
        None => Some(caller.org_id.clone()),
    };
    let mut apps = Vec::new();
    for app in plane.store.list_apps(org_filter.as_deref())? {
        if !caller.sees_app(&app) {
            continue;
        }
        let latest = plane
            .store
            .releases(&app.id, 1)?
            .into_iter()
            .next()
            .map(|r| r.created_at);
        apps.push(ListApp {
            id: app.id.clone(),
            name: app.name.clone(),
            machine_count: plane.store.count_machines(&app.id)?,
            network: serde_json::Value::String(app.network.clone()),
            organization: Some(Organization {
                id: app.org_id.clone(),
                name: app.org_slug.clone(),
                slug: app.org_slug.clone(),
            }),
            status: Some(app.status.clone()),
            latest_deploy: latest,
        });
    }
    Ok(Json(ListAppsResponse {
        total_apps: apps.len() as u64,
        apps,
    }))
}

async fn create_app(
    State(plane): Plane,
    caller: Caller,
    JsonBody(request): JsonBody<CreateAppRequest>,
) -> ApiResult<Response> {
    caller.require_org_write()?;
    names::validate_app_name(&request.app_name)
        .map_err(|e| ApiError::bad_request(format!("app_name: {e}")))?;
    let org = match request.org_slug.as_str() {
        "" => plane.store.org_by_id(&caller.org_id)?,
        slug => plane.store.org_by_slug(slug)?,
    };
    let org = match org {
        Some(org) if caller.is_host() || org.id == caller.org_id => org,
        _ => {
            return Err(ApiError::not_found(format!(
                "organization not found: {}",
                request.org_slug
            )));
        }
    };
    let app = AppRow {
        id: names::random_id(16),
        name: request.app_name.clone(),
        org_id: org.id.clone(),
        org_slug: org.slug.clone(),
        network: request
            .network
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "default".into()),
        status: "pending".into(),
        created_at: now_rfc3339(),
    };
    plane.store.create_app(&app).map_err(|e| match e {
        crate::store::StoreError::Conflict(_) => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("app name {} is already taken", app.name),
        ),
        other => other.into(),
    })?;
    plane.catalog.app_changed(&app);
    Ok((StatusCode::CREATED, Json(app_view(&plane, &app))).into_response())
}

async fn get_app(
    State(plane): Plane,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<Json<App>> {
    let app = visible_app(&plane, &caller, &name)?;
    Ok(Json(app_view(&plane, &app)))
}

async fn delete_app(
    State(plane): Plane,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    let app = visible_app(&plane, &caller, &name)?;
    caller.require_write()?;
    let lock = plane.app_lock(&app.name);
    let _guard = lock.lock().await;
    for machine in plane.store.list_machines(&app.id, false)? {
        plane.destroy_machine(&machine, true).await?;
    }
    plane.store.delete_app(&app.id)?;
    plane.secrets.forget_app(&app.id)?;
    plane.catalog.app_removed(&app.name);
    Ok(StatusCode::ACCEPTED)
}

#[derive(Deserialize)]
struct ListMachinesQuery {
    #[serde(default)]
    include_deleted: Option<String>,
    #[serde(default)]
    region: Option<String>,
}

fn truthy(value: Option<&str>) -> bool {
    matches!(value, Some("true" | "1" | "yes"))
}

async fn list_machines(
    State(plane): Plane,
    caller: Caller,
    Path(name): Path<String>,
    Query(query): Query<ListMachinesQuery>,
) -> ApiResult<Json<Vec<Machine>>> {
    let app = visible_app(&plane, &caller, &name)?;
    let rows = plane
        .store
        .list_machines(&app.id, truthy(query.include_deleted.as_deref()))?;
    let mut machines = Vec::with_capacity(rows.len());
    for row in rows {
        if query
            .region
            .as_deref()
            .is_some_and(|r| !r.is_empty() && r != row.region)
        {
            continue;
        }
        machines.push(plane.machine_view(&row)?);
    }
    Ok(Json(machines))
}

async fn create_machine(
    State(plane): Plane,
    caller: Caller,
    Path(name): Path<String>,
    JsonBody(request): JsonBody<CreateMachineRequest>,
) -> ApiResult<Json<Machine>> {
    let app = visible_app(&plane, &caller, &name)?;
    caller.require_write()?;
    let row = plane.create_machine(&app, request).await?;
    Ok(Json(plane.machine_view(&row)?))
}

async fn get_machine(
    State(plane): Plane,
    caller: Caller,
    Path((name, id)): Path<(String, String)>,
) -> ApiResult<Json<Machine>> {
    let app = visible_app(&plane, &caller, &name)?;
    let row = visible_machine(&plane, &app, &id)?;
    Ok(Json(plane.machine_view(&row)?))
}

async fn update_machine(
    State(plane): Plane,
    caller: Caller,
    Path((name, id)): Path<(String, String)>,
    JsonBody(request): JsonBody<UpdateMachineRequest>,
) -> ApiResult<Json<Machine>> {
    let app = visible_app(&plane, &caller, &name)?;
    caller.require_write()?;
    let row = visible_machine(&plane, &app, &id)?;
    if let Some(version) = request.current_version.as_deref().filter(|v| !v.is_empty()) {
        if version != row.instance_id {
            return Err(ApiError::precondition(format!(
                "machine version {version} is not the current version {}",
                row.instance_id
            )));
        }
    }
    let updated = plane
        .update_machine(&app, &row, request.create.config)
        .await?;
    Ok(Json(plane.machine_view(&updated)?))
}

#[derive(Deserialize)]
struct DestroyQuery {
    force: Option<String>,
    kill: Option<String>,
}

async fn destroy_machine(
    State(plane): Plane,
    caller: Caller,
    Path((name, id)): Path<(String, String)>,
    Query(query): Query<DestroyQuery>,
) -> ApiResult<Json<serde_json::Value>> {
    let app = visible_app(&plane, &caller, &name)?;
    caller.require_write()?;
    let row = visible_machine(&plane, &app, &id)?;
    plane
        .destroy_machine(
            &row,
            truthy(query.force.as_deref()) || truthy(query.kill.as_deref()),
        )
        .await?;
    Ok(Json(serde_json::json!({ "ok": true })))
}

async fn start_machine(
    State(plane): Plane,
    caller: Caller,
    Path((name, id)): Path<(String, String)>,
) -> ApiResult<Json<serde_json::Value>> {
    let app = visible_app(&plane, &caller, &name)?;
    caller.require_write()?;
    let row = visible_machine(&plane, &app, &id)?;
    let previous = row.state;
    plane.start_machine(&row).await?;
    Ok(Json(
        serde_json::json!({ "message": "", "status": "", "previous_state": previous }),
    ))
}

async fn stop_machine(
    State(plane): Plane,
    caller: Caller,
    Path((name, id)): Path<(String, String)>,
    JsonBody(request): JsonBody<StopRequest>,
) -> ApiResult<Json<serde_json::Value>> {
    let app = visible_app(&plane, &caller, &name)?;
    caller.require_write()?;
    let row = visible_machine(&plane, &app, &id)?;
    plane.stop_machine(&row, &request).await?;
    Ok(Json(serde_json::json!({ "ok": true })))
}

async fn machine_events(
    State(plane): Plane,
    caller: Caller,
    Path((name, id)): Path<(String, String)>,
) -> ApiResult<Json<Vec<MachineEvent>>> {
    let app = visible_app(&plane, &caller, &name)?;
    let row = visible_machine(&plane, &app, &id)?;
    Ok(Json(plane.store.events(&row.id, 1000)?))
}

fn sse_frame(update: &CatalogUpdate) -> Bytes {
    let data = serde_json::to_string(update).unwrap_or_default();
    Bytes::from(format!("id: {}\ndata: {data}\n\n", update_seq(update)))
}

async fn watch_catalog(
    State(plane): Plane,
    caller: Caller,
    headers: HeaderMap,
) -> ApiResult<Response> {
    caller.require_host()?;
    let last_seen = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let (receiver, resume, current) = plane.catalog.follow(last_seen);
    let first: Vec<CatalogUpdate> = match resume {
        Resume::Replay(updates) => updates,
        Resume::Snapshot => vec![plane.catalog.snapshot(&plane.store, current)?],
    };
    let plane_for_stream = plane.clone();
    let initial = futures_util::stream::iter(
        first
            .into_iter()
            .map(|u| Ok::<_, Infallible>(sse_frame(&u))),
    );
    let live = futures_util::stream::unfold(
        (receiver, plane_for_stream),
        |(mut receiver, plane)| async move {
            loop {
                match receiver.recv().await {
                    Ok(update) => {
                        return Some((Ok::<_, Infallible>(sse_frame(&update)), (receiver, plane)));
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        // Too far behind to replay: start over from a snapshot.
                        let (fresh, _, current) = plane.catalog.follow(None);
                        receiver = fresh;
                        match plane.catalog.snapshot(&plane.store, current) {
                            Ok(snapshot) => {
                                return Some((Ok(sse_frame(&snapshot)), (receiver, plane)));
                            }
                            Err(err) => {
                                tracing::error!(error = %err, "building a catalog snapshot failed");
                                return None;
                            }
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        },
    );
    let keepalive = futures_util::stream::unfold((), |()| async {
        tokio::time::sleep(std::time::Duration::from_secs(15)).await;
        Some((
            Ok::<_, Infallible>(Bytes::from_static(b": keepalive\n\n")),
            (),
        ))
    });
    let body = initial.chain(futures_util::stream::select(live, keepalive));
    Ok((
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(body),
    )
        .into_response())
}

async fn register_host(
    State(plane): Plane,
    caller: Caller,
    JsonBody(registration): JsonBody<HostRegistration>,
) -> ApiResult<StatusCode> {
    caller.require_host()?;
    if registration.id.is_empty() || registration.region.is_empty() {
        return Err(ApiError::bad_request(
            "host registration needs an id and a region",
        ));
    }
    plane.store.upsert_host(&HostRow {
        id: registration.id.clone(),
        region: registration.region,
        agent_url: registration.agent_url,
        last_seen: now_rfc3339(),
    })?;
    plane.forget_agent(&registration.id);
    Ok(StatusCode::NO_CONTENT)
}

async fn host_events(
    State(plane): Plane,
    caller: Caller,
    Path(host): Path<String>,
    JsonBody(events): JsonBody<Vec<AgentEvent>>,
) -> ApiResult<StatusCode> {
    caller.require_host()?;
    plane.apply_agent_events(&host, &events)?;
    Ok(StatusCode::NO_CONTENT)
}
