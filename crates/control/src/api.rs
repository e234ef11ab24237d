//! HTTP routes: the Machines API under `/v1/apps`, deploys, the catalog stream, the
//! internal endpoints agents use, and `/openapi.json`. Other modules add their routes
//! with `.merge(module::routes())` (orgs and tokens, volumes, secrets, certificates, IPs).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use aloft_api::internal::AgentEvent;
use aloft_api::{
    App, CreateAppRequest, CreateLeaseRequest, CreateMachineRequest, ErrorResponse, ExecResponse,
    LeaseResponse, ListApp, ListAppsResponse, Machine, MachineEvent, MachineExecRequest,
    MachineState, MachineVersion, MetadataValueRequest, OkResponse, Organization, ProcessStat,
    SignalRequest, StartResponse, StopRequest, UpdateMachineRequest,
};
use axum::body::Body;
use axum::extract::{FromRequestParts, Path, State};
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
use crate::catalog::{Published, Resume};
use crate::error::{ApiError, ApiResult};
use crate::machines::{UpdateOptions, WaitState};
use crate::names;
use crate::store::{AppRow, MachineFilter, MachineRow, now_rfc3339};

pub type Plane = State<Arc<ControlPlane>>;

/// Request bodies larger than this are refused with 413.
pub const MAX_BODY: usize = 1024 * 1024;
pub const LEASE_NONCE_HEADER: &str = "fly-machine-lease-nonce";
const WAIT_DEFAULT_SECS: u64 = 60;
const WAIT_MAX_SECS: u64 = 60;

pub fn router(plane: Arc<ControlPlane>) -> Router {
    Router::new()
        .route("/v1/apps", get(list_apps).post(create_app))
        .route("/v1/apps/{app_name}", get(get_app).delete(delete_app))
        .route(
            "/v1/apps/{app_name}/machines",
            get(list_machines).post(create_machine),
        )
        .route(
            "/v1/apps/{app_name}/machines/{machine_id}",
            get(get_machine)
                .post(update_machine)
                .delete(destroy_machine),
        )
        .route(
            "/v1/apps/{app_name}/machines/{machine_id}/start",
            post(start_machine),
        )
        .route(
            "/v1/apps/{app_name}/machines/{machine_id}/stop",
            post(stop_machine),
        )
        .route(
            "/v1/apps/{app_name}/machines/{machine_id}/restart",
            post(restart_machine),
        )
        .route(
            "/v1/apps/{app_name}/machines/{machine_id}/suspend",
            post(suspend_machine),
        )
        .route(
            "/v1/apps/{app_name}/machines/{machine_id}/signal",
            post(signal_machine),
        )
        .route(
            "/v1/apps/{app_name}/machines/{machine_id}/wait",
            get(wait_machine),
        )
        .route(
            "/v1/apps/{app_name}/machines/{machine_id}/events",
            get(machine_events),
        )
        .route(
            "/v1/apps/{app_name}/machines/{machine_id}/versions",
            get(machine_versions),
        )
        .route(
            "/v1/apps/{app_name}/machines/{machine_id}/ps",
            get(machine_ps),
        )
        .route(
            "/v1/apps/{app_name}/machines/{machine_id}/exec",
            post(machine_exec),
        )
        .route(
            "/v1/apps/{app_name}/machines/{machine_id}/lease",
            get(show_lease).post(acquire_lease).delete(release_lease),
        )
        .route(
            "/v1/apps/{app_name}/machines/{machine_id}/cordon",
            post(cordon_machine),
        )
        .route(
            "/v1/apps/{app_name}/machines/{machine_id}/uncordon",
            post(uncordon_machine),
        )
        .route(
            "/v1/apps/{app_name}/machines/{machine_id}/metadata",
            get(show_metadata),
        )
        .route(
            "/v1/apps/{app_name}/machines/{machine_id}/metadata/{key}",
            post(set_metadata).delete(delete_metadata),
        )
        .route("/v1/catalog/watch", get(watch_catalog))
        .route("/v1/hosts/{id}/events", post(host_events))
        .route("/openapi.json", get(crate::openapi::serve))
        .merge(crate::deploy::routes())
        .merge(crate::runtime::router())
        .merge(crate::orgs::routes())
        .merge(crate::host_api::routes())
        .merge(crate::volumes::routes())
        .merge(crate::secrets::routes())
        .merge(crate::certs::routes())
        .merge(crate::ips::routes())
        .merge(crate::flyctl::routes())
        .fallback(not_found)
        .layer(axum::middleware::map_response(errors_as_json))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(plane)
}

async fn not_found() -> ApiError {
    ApiError::not_found("not found")
}

/// Error answers that did not come from a handler (a wrong method, an unparsable path)
/// get the API's `{"error": "..."}` shape too. A body refused as too large was not read
/// to its end, so its connection cannot carry another request: the answer says so, and
/// a client does not send its next request into a connection the server is closing.
async fn errors_as_json(response: Response) -> Response {
    let too_large = response.status() == StatusCode::PAYLOAD_TOO_LARGE;
    let mut response = json_error_shape(response).await;
    if too_large {
        response
            .headers_mut()
            .insert(header::CONNECTION, http::HeaderValue::from_static("close"));
    }
    response
}

async fn json_error_shape(response: Response) -> Response {
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json {
        return response;
    }
    let body = axum::body::to_bytes(response.into_body(), 64 * 1024)
        .await
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&body).trim().to_string();
    let message = match status {
        StatusCode::METHOD_NOT_ALLOWED => "method not allowed for this path".to_string(),
        _ if text.is_empty() => status.canonical_reason().unwrap_or("error").to_lowercase(),
        _ => text,
    };
    ApiError::new(status, message).into_response()
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
        let caller = authenticate(
            &plane.store,
            &plane.token_keys,
            header,
            chrono::Utc::now().timestamp(),
        );
        if let Err(err) = &caller
            && parts.uri.path().starts_with("/v1/hosts")
        {
            // A host that cannot join or heartbeat is the operator's to hear about.
            tracing::warn!(path = %parts.uri.path(), error = %err.message, "refused a host's request");
        }
        caller
    }
}

/// JSON bodies with errors in the API's own shape, naming the field that is wrong.
/// Unknown fields are ignored, as Fly's API does.
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
        let bytes = if bytes.iter().all(u8::is_ascii_whitespace) {
            Bytes::from_static(b"{}")
        } else {
            bytes
        };
        let mut deserializer = serde_json::Deserializer::from_slice(&bytes);
        let value = serde_path_to_error::deserialize(&mut deserializer).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let syntax = matches!(
                inner.classify(),
                serde_json::error::Category::Syntax | serde_json::error::Category::Eof
            );
            if syntax || path.is_empty() || path == "." || path.contains('?') {
                ApiError::bad_request(format!("invalid JSON body: {inner}"))
            } else {
                ApiError::bad_request(format!("invalid {path}: {inner}"))
            }
        })?;
        deserializer
            .end()
            .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))?;
        Ok(JsonBody(value))
    }
}

/// Query strings with errors in the API's own shape.
pub struct QueryParams<T>(pub T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> FromRequestParts<S> for QueryParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let query = parts.uri.query().unwrap_or_default();
        serde_urlencoded::from_str(query)
            .map(QueryParams)
            .map_err(|e| ApiError::bad_request(format!("invalid query string: {e}")))
    }
}

/// Finds an app the caller may see; apps of other orgs answer exactly like missing ones.
pub fn visible_app(plane: &ControlPlane, caller: &Caller, name: &str) -> ApiResult<AppRow> {
    match plane.store.app(name)? {
        Some(app) if caller.sees_app(&app) => Ok(app),
        _ => Err(ApiError::not_found(format!("app not found: {name}"))),
    }
}

pub fn visible_machine(plane: &ControlPlane, app: &AppRow, id: &str) -> ApiResult<MachineRow> {
    match plane.store.machine(id)? {
        Some(machine) if machine.app_id == app.id => Ok(machine),
        _ => Err(ApiError::not_found(format!("machine not found: {id}"))),
    }
}

fn lease_nonce(headers: &HeaderMap) -> Option<String> {
    headers
        .get(LEASE_NONCE_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_string)
}

/// A machine the caller may change: visible, writable, and not leased by someone else.
fn writable_machine(
    plane: &ControlPlane,
    caller: &Caller,
    app_name: &str,
    id: &str,
    headers: &HeaderMap,
) -> ApiResult<(AppRow, MachineRow)> {
    let app = visible_app(plane, caller, app_name)?;
    let row = visible_machine(plane, &app, id)?;
    caller.require_write()?;
    plane.check_lease(&row.id, lease_nonce(headers).as_deref())?;
    Ok((app, row))
}

/// Hosts pull a machine's image from the platform's registry with their own token, so the
/// API checks that the caller could pull it itself: other orgs' (and, for app-limited
/// tokens, other apps') images stay out of reach, with the same answer whether or not
/// the repository exists.
fn check_image_access(plane: &ControlPlane, caller: &Caller, image: &str) -> ApiResult<()> {
    let registry = plane.registry_host();
    if caller.is_host() || !image.starts_with(&format!("{registry}/")) {
        return Ok(());
    }
    let refused = |repository: &str| {
        ApiError::bad_request(format!(
            "invalid config.image: {image} is in repository {repository}, which this token may not pull from"
        ))
    };
    let reference = aloft_registry::client::parse_reference(image).map_err(|_| {
        ApiError::bad_request(format!(
            "invalid config.image: {image:?} is not an image reference"
        ))
    })?;
    let pull_through = plane
        .config
        .registry_upstream
        .as_ref()
        .map(|u| u.prefix.trim_matches('/'))
        .filter(|p| !p.is_empty());
    if let Some(prefix) = pull_through
        && reference
            .repository
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('/'))
    {
        return Ok(());
    }
    match plane.store.app(&reference.repository)? {
        Some(app) if caller.sees_app(&app) => Ok(()),
        _ => Err(refused(&reference.repository)),
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
        app_url: Some(plane.app_url(&app.name)),
        created_at: Some(app.created_at.clone()),
    }
}

fn truthy(value: Option<&str>) -> bool {
    matches!(
        value.map(str::to_ascii_lowercase).as_deref(),
        Some("true" | "1" | "yes" | "t")
    )
}

fn ok() -> Json<OkResponse> {
    Json(OkResponse { ok: true })
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListAppsQuery {
    /// Only apps of this organization.
    org_slug: Option<String>,
}

/// Error answers every endpoint may give, in the `{"error": "..."}` shape.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
pub enum ErrorAnswers {
    #[response(status = 400, description = "Bad request: the message names the field")]
    BadRequest(ErrorResponse),
    #[response(
        status = 401,
        description = "Missing, invalid, revoked or expired token"
    )]
    Unauthorized(ErrorResponse),
    #[response(status = 403, description = "The token may not do this")]
    Forbidden(ErrorResponse),
    #[response(status = 404, description = "Not found (or not visible to this token)")]
    NotFound(ErrorResponse),
    #[response(status = 405, description = "Method not allowed")]
    MethodNotAllowed(ErrorResponse),
    #[response(status = 408, description = "Timed out")]
    Timeout(ErrorResponse),
    #[response(
        status = 409,
        description = "Conflict: leased by someone else, or another operation is in progress"
    )]
    Conflict(ErrorResponse),
    #[response(
        status = 412,
        description = "Precondition failed: the machine's state or version does not allow this"
    )]
    Precondition(ErrorResponse),
    #[response(status = 413, description = "Request body too large")]
    TooLarge(ErrorResponse),
    #[response(status = 422, description = "Unprocessable: the name is taken")]
    Unprocessable(ErrorResponse),
    #[response(status = 500, description = "Internal error")]
    Internal(ErrorResponse),
    #[response(
        status = 501,
        description = "Not implemented by the machine's host yet"
    )]
    NotImplemented(ErrorResponse),
    #[response(
        status = 503,
        description = "No host can take the machine, or its host is unreachable"
    )]
    Unavailable(ErrorResponse),
}

#[utoipa::path(get, path = "/v1/apps", tag = "Apps", operation_id = "Apps_list", params(ListAppsQuery),
    responses((status = 200, body = ListAppsResponse), ErrorAnswers))]
async fn list_apps(
    State(plane): Plane,
    caller: Caller,
    QueryParams(query): QueryParams<ListAppsQuery>,
) -> ApiResult<Json<ListAppsResponse>> {
    let org_filter: Option<Vec<String>> = match query.org_slug.as_deref().filter(|s| !s.is_empty())
    {
        Some(slug) => match plane.store.org_by_slug(slug)? {
            Some(org) if caller.in_org(&org.id) => Some(vec![org.id]),
            _ => {
                return Err(ApiError::not_found(format!(
                    "organization not found: {slug}"
                )));
            }
        },
        None if caller.is_host() => None,
        None => Some(caller.org_ids.clone()),
    };
    let rows = match &org_filter {
        None => plane.store.list_apps(None)?,
        Some(orgs) => {
            let mut rows = Vec::new();
            for org in orgs {
                rows.extend(plane.store.list_apps(Some(org))?);
            }
            rows.sort_by(|a, b| a.name.cmp(&b.name));
            rows
        }
    };
    let counts = plane.store.machine_counts()?;
    let latest = plane.store.latest_release_times()?;
    let apps: Vec<ListApp> = rows
        .into_iter()
        .filter(|app| caller.sees_app(app))
        .map(|app| ListApp {
            machine_count: counts.get(&app.id).copied().unwrap_or(0),
            latest_deploy: latest.get(&app.id).cloned(),
            id: app.id.clone(),
            name: app.name.clone(),
            network: serde_json::Value::String(app.network.clone()),
            organization: Some(Organization {
                id: app.org_id.clone(),
                name: app.org_slug.clone(),
                slug: app.org_slug.clone(),
            }),
            status: Some(app.status.clone()),
        })
        .collect();
    Ok(Json(ListAppsResponse {
        total_apps: apps.len() as u64,
        apps,
    }))
}

#[utoipa::path(post, path = "/v1/apps", tag = "Apps", operation_id = "Apps_create", request_body = CreateAppRequest,
    responses((status = 201, body = App), ErrorAnswers))]
async fn create_app(
    State(plane): Plane,
    caller: Caller,
    JsonBody(request): JsonBody<CreateAppRequest>,
) -> ApiResult<Response> {
    caller.require_org_write()?;
    names::validate_app_name(&request.app_name)
        .map_err(|e| ApiError::bad_request(format!("invalid app_name: {e}")))?;
    if let Some(network) = request.network.as_deref().filter(|n| !n.is_empty()) {
        crate::names::validate_app_name(network).map_err(|e| {
            ApiError::bad_request(format!(
                "invalid network: {}",
                e.replace("app name", "network name")
            ))
        })?;
    }
    let org = match request.org_slug.as_str() {
        "" => plane.store.org_by_id(&caller.org_id)?,
        slug => plane.store.org_by_slug(slug)?,
    };
    let org = match org {
        Some(org) if caller.in_org(&org.id) => org,
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

#[utoipa::path(get, path = "/v1/apps/{app_name}", tag = "Apps", operation_id = "Apps_show",
    params(("app_name" = String, Path)), responses((status = 200, body = App), ErrorAnswers))]
async fn get_app(
    State(plane): Plane,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<Json<App>> {
    let app = visible_app(&plane, &caller, &name)?;
    Ok(Json(app_view(&plane, &app)))
}

#[utoipa::path(delete, path = "/v1/apps/{app_name}", tag = "Apps", operation_id = "Apps_delete",
    params(("app_name" = String, Path)), responses((status = 202, description = "Deleted"), ErrorAnswers))]
async fn delete_app(
    State(plane): Plane,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    let app = visible_app(&plane, &caller, &name)?;
    caller.require_org_write()?;
    let lock = plane.app_lock(&app.name);
    let _guard = lock.lock().await;
    for machine in plane.store.list_machines(&app.id, false)? {
        plane.destroy_machine(&machine, true).await?;
    }
    crate::volumes::destroy_all(&plane, &app).await?;
    // Before the app goes: once it is gone, another org may create an app of the same
    // name, and its repository must start empty.
    crate::releases::delete_app_repository(&plane, &app.name).await?;
    plane.store.delete_app(&app.id)?;
    plane.secrets.forget_app(&app.id)?;
    plane.catalog.app_removed(&app.name);
    Ok(StatusCode::ACCEPTED)
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListMachinesQuery {
    /// Include destroyed machines.
    include_deleted: Option<String>,
    /// Only machines in this region.
    region: Option<String>,
    /// Only machines in this state (comma-separated states).
    state: Option<String>,
    /// `summary=true`: leave out configs' bulky parts (accepted, ignored).
    #[allow(dead_code)]
    summary: Option<String>,
}

/// `?metadata.KEY=VALUE` filters (any number).
fn metadata_filters(query: Option<&str>) -> Vec<(String, String)> {
    serde_urlencoded::from_str::<Vec<(String, String)>>(query.unwrap_or_default())
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(k, v)| k.strip_prefix("metadata.").map(|key| (key.to_string(), v)))
        .collect()
}

#[utoipa::path(get, path = "/v1/apps/{app_name}/machines", tag = "Machines", operation_id = "Machines_list",
    params(("app_name" = String, Path), ListMachinesQuery), responses((status = 200, body = Vec<Machine>), ErrorAnswers))]
async fn list_machines(
    State(plane): Plane,
    caller: Caller,
    Path(name): Path<String>,
    uri: http::Uri,
    QueryParams(query): QueryParams<ListMachinesQuery>,
) -> ApiResult<Response> {
    let app = visible_app(&plane, &caller, &name)?;
    let mut states = Vec::new();
    for text in query
        .state
        .as_deref()
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        states.push(MachineState::parse(text).ok_or_else(|| {
            ApiError::bad_request(format!("invalid state: {text:?} is not a machine state"))
        })?);
    }
    let filter = MachineFilter {
        include_destroyed: truthy(query.include_deleted.as_deref()),
        region: query.region.filter(|r| !r.is_empty()),
        metadata: metadata_filters(uri.query()),
        states,
    };
    let body = plane.list_machine_views(&app, &filter)?;
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

#[utoipa::path(post, path = "/v1/apps/{app_name}/machines", tag = "Machines", operation_id = "Machines_create",
    params(("app_name" = String, Path)), request_body = CreateMachineRequest, responses((status = 200, body = Machine), ErrorAnswers))]
async fn create_machine(
    State(plane): Plane,
    caller: Caller,
    Path(name): Path<String>,
    JsonBody(request): JsonBody<CreateMachineRequest>,
) -> ApiResult<Json<Machine>> {
    let app = visible_app(&plane, &caller, &name)?;
    caller.require_write()?;
    check_image_access(&plane, &caller, &request.config.image)?;
    let (row, lease) = plane.create_machine_with_lease(&app, request).await?;
    let mut view = plane.machine_view(&row);
    view.nonce = lease.map(|l| l.nonce);
    Ok(Json(view))
}

#[utoipa::path(get, path = "/v1/apps/{app_name}/machines/{machine_id}", tag = "Machines", operation_id = "Machines_show",
    params(("app_name" = String, Path), ("machine_id" = String, Path)), responses((status = 200, body = Machine), ErrorAnswers))]
async fn get_machine(
    State(plane): Plane,
    caller: Caller,
    Path((name, id)): Path<(String, String)>,
) -> ApiResult<Json<Machine>> {
    let app = visible_app(&plane, &caller, &name)?;
    let row = visible_machine(&plane, &app, &id)?;
    Ok(Json(plane.machine_view(&row)))
}

#[utoipa::path(post, path = "/v1/apps/{app_name}/machines/{machine_id}", tag = "Machines", operation_id = "Machines_update",
    params(("app_name" = String, Path), ("machine_id" = String, Path), ("fly-machine-lease-nonce" = Option<String>, Header)),
    request_body = UpdateMachineRequest, responses((status = 200, body = Machine), ErrorAnswers))]
async fn update_machine(
    State(plane): Plane,
    caller: Caller,
    Path((name, id)): Path<(String, String)>,
    headers: HeaderMap,
    JsonBody(request): JsonBody<UpdateMachineRequest>,
) -> ApiResult<Json<Machine>> {
    let (app, row) = writable_machine(&plane, &caller, &name, &id, &headers)?;
    if request.create.config.image != row.config.image {
        check_image_access(&plane, &caller, &request.create.config.image)?;
    }
    if let Some(version) = request.current_version.as_deref().filter(|v| !v.is_empty())
        && version != row.instance_id
    {
        return Err(ApiError::precondition(format!(
            "machine version {version} is not the current version {}",
            row.instance_id
        )));
    }
    if let Some(region) = request.create.region.as_deref().filter(|r| !r.is_empty())
        && region != row.region
    {
        return Err(ApiError::bad_request(format!(
            "invalid region: a machine's region cannot change (it is {}); create a new machine instead",
            row.region
        )));
    }
    if let Some(new_name) = request.create.name.as_deref().filter(|n| !n.is_empty())
        && new_name != row.name
    {
        return Err(ApiError::bad_request(format!(
            "invalid name: a machine's name cannot change (it is {})",
            row.name
        )));
    }
    let options = UpdateOptions {
        skip_launch: request.create.skip_launch,
        start_stopped: true,
        skip_service_registration: Some(request.create.skip_service_registration)
            .filter(|s| *s || row.cordoned),
    };
    let updated = plane
        .update_machine_with(&app, &row, request.create.config, options)
        .await?;
    Ok(Json(plane.machine_view(&updated)))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DestroyQuery {
    /// Destroy even if running.
    force: Option<String>,
    /// flyctl's spelling of `force`.
    kill: Option<String>,
}

#[utoipa::path(delete, path = "/v1/apps/{app_name}/machines/{machine_id}", tag = "Machines", operation_id = "Machines_delete",
    params(("app_name" = String, Path), ("machine_id" = String, Path), DestroyQuery, ("fly-machine-lease-nonce" = Option<String>, Header)),
    responses((status = 200, body = OkResponse), ErrorAnswers))]
async fn destroy_machine(
    State(plane): Plane,
    caller: Caller,
    Path((name, id)): Path<(String, String)>,
    headers: HeaderMap,
    QueryParams(query): QueryParams<DestroyQuery>,
) -> ApiResult<Json<OkResponse>> {
    let (_, row) = writable_machine(&plane, &caller, &name, &id, &headers)?;
    plane
        .destroy_machine(
            &row,
            truthy(query.force.as_deref()) || truthy(query.kill.as_deref()),
        )
        .await?;
    Ok(ok())
}

#[utoipa::path(post, path = "/v1/apps/{app_name}/machines/{machine_id}/start", tag = "Machines", operation_id = "Machines_start",
    params(("app_name" = String, Path), ("machine_id" = String, Path), ("fly-machine-lease-nonce" = Option<String>, Header)),
    responses((status = 200, body = StartResponse), ErrorAnswers))]
async fn start_machine(
    State(plane): Plane,
    caller: Caller,
    Path((name, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult<Json<StartResponse>> {
    let (_, row) = writable_machine(&plane, &caller, &name, &id, &headers)?;
    let previous = row.state;
    plane.start_machine(&row).await?;
    Ok(Json(StartResponse {
        message: String::new(),
        status: String::new(),
        previous_state: previous,
        migrated: false,
        new_host: String::new(),
    }))
}

#[utoipa::path(post, path = "/v1/apps/{app_name}/machines/{machine_id}/stop", tag = "Machines", operation_id = "Machines_stop",
    params(("app_name" = String, Path), ("machine_id" = String, Path), ("fly-machine-lease-nonce" = Option<String>, Header)),
    request_body = StopRequest, responses((status = 200, body = OkResponse), ErrorAnswers))]
async fn stop_machine(
    State(plane): Plane,
    caller: Caller,
    Path((name, id)): Path<(String, String)>,
    headers: HeaderMap,
    JsonBody(request): JsonBody<StopRequest>,
) -> ApiResult<Json<OkResponse>> {
    let (_, row) = writable_machine(&plane, &caller, &name, &id, &headers)?;
    if let Some(signal) = request.signal.as_deref() {
        check_signal(signal)?;
    }
    plane.stop_machine(&row, &request).await?;
    Ok(ok())
}

const SIGNALS: [&str; 14] = [
    "SIGABRT", "SIGALRM", "SIGFPE", "SIGHUP", "SIGILL", "SIGINT", "SIGKILL", "SIGPIPE", "SIGQUIT",
    "SIGSEGV", "SIGTERM", "SIGTRAP", "SIGUSR1", "SIGUSR2",
];

fn check_signal(signal: &str) -> ApiResult<()> {
    if signal.is_empty() || SIGNALS.contains(&signal) {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "invalid signal: {signal:?} is not one of {}",
            SIGNALS.join(", ")
        )))
    }
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RestartQuery {
    /// How long to wait for the machine to stop (Go duration or seconds).
    timeout: Option<String>,
    /// Signal to stop it with.
    signal: Option<String>,
    /// Accepted for flyctl; the stop always escalates to SIGKILL after the timeout.
    #[allow(dead_code)]
    force_stop: Option<String>,
}

fn parse_timeout(text: &str, field: &str) -> ApiResult<aloft_api::Duration> {
    if let Ok(seconds) = text.parse::<u64>() {
        return Ok(aloft_api::Duration::from_secs(seconds.min(86_400) as i64));
    }
    aloft_api::Duration::parse(text)
        .map_err(|e| ApiError::bad_request(format!("invalid {field}: {e}")))
}

#[utoipa::path(post, path = "/v1/apps/{app_name}/machines/{machine_id}/restart", tag = "Machines", operation_id = "Machines_restart",
    params(("app_name" = String, Path), ("machine_id" = String, Path), RestartQuery, ("fly-machine-lease-nonce" = Option<String>, Header)),
    responses((status = 200, body = OkResponse), ErrorAnswers))]
async fn restart_machine(
    State(plane): Plane,
    caller: Caller,
    Path((name, id)): Path<(String, String)>,
    headers: HeaderMap,
    QueryParams(query): QueryParams<RestartQuery>,
) -> ApiResult<Json<OkResponse>> {
    let (_, row) = writable_machine(&plane, &caller, &name, &id, &headers)?;
    let timeout = query
        .timeout
        .as_deref()
        .filter(|t| !t.is_empty())
        .map(|t| parse_timeout(t, "timeout"))
        .transpose()?;
    let signal = query.signal.filter(|s| !s.is_empty());
    if let Some(signal) = signal.as_deref() {
        check_signal(signal)?;
    }
    plane
        .restart_machine(&row, &StopRequest { signal, timeout })
        .await?;
    Ok(ok())
}

#[utoipa::path(post, path = "/v1/apps/{app_name}/machines/{machine_id}/suspend", tag = "Machines", operation_id = "Machines_suspend",
    params(("app_name" = String, Path), ("machine_id" = String, Path), ("fly-machine-lease-nonce" = Option<String>, Header)),
    responses((status = 200, body = OkResponse), ErrorAnswers))]
async fn suspend_machine(
    State(plane): Plane,
    caller: Caller,
    Path((name, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult<Json<OkResponse>> {
    let (_, row) = writable_machine(&plane, &caller, &name, &id, &headers)?;
    plane.suspend_machine(&row).await?;
    Ok(ok())
}

#[utoipa::path(post, path = "/v1/apps/{app_name}/machines/{machine_id}/signal", tag = "Machines", operation_id = "Machines_signal",
    params(("app_name" = String, Path), ("machine_id" = String, Path), ("fly-machine-lease-nonce" = Option<String>, Header)),
    request_body = SignalRequest, responses((status = 200, body = OkResponse), ErrorAnswers))]
async fn signal_machine(
    State(plane): Plane,
    caller: Caller,
    Path((name, id)): Path<(String, String)>,
    headers: HeaderMap,
    JsonBody(request): JsonBody<SignalRequest>,
) -> ApiResult<Json<OkResponse>> {
    let (_, row) = writable_machine(&plane, &caller, &name, &id, &headers)?;
    if request.signal.is_empty() {
        return Err(ApiError::bad_request(
            "invalid signal: a signal name such as SIGUSR1 is required",
        ));
    }
    check_signal(&request.signal)?;
    plane.signal_machine(&row, &request).await?;
    Ok(ok())
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WaitQuery {
    /// `started` (default), `stopped`, `suspended`, `destroyed` or `settled`.
    state: Option<String>,
    /// The version to wait for (`version` is flyctl's name for it).
    instance_id: Option<String>,
    version: Option<String>,
    /// Seconds, at most 60 (default 60).
    timeout: Option<String>,
    /// Accepted for flyctl; ignored.
    #[allow(dead_code)]
    from_event_id: Option<String>,
}

#[utoipa::path(get, path = "/v1/apps/{app_name}/machines/{machine_id}/wait", tag = "Machines", operation_id = "Machines_wait",
    params(("app_name" = String, Path), ("machine_id" = String, Path), WaitQuery), responses((status = 200, body = OkResponse), ErrorAnswers))]
async fn wait_machine(
    State(plane): Plane,
    caller: Caller,
    Path((name, id)): Path<(String, String)>,
    QueryParams(query): QueryParams<WaitQuery>,
) -> ApiResult<Json<OkResponse>> {
    let app = visible_app(&plane, &caller, &name)?;
    let row = visible_machine(&plane, &app, &id)?;
    let state_text = query.state.unwrap_or_default();
    let wanted = WaitState::parse(&state_text)
        .ok_or_else(|| ApiError::bad_request(format!("invalid state: {state_text:?} must be started, stopped, suspended, destroyed or settled")))?;
    let seconds = match query.timeout.as_deref().filter(|t| !t.is_empty()) {
        None => WAIT_DEFAULT_SECS,
        Some(text) => parse_timeout(text, "timeout")?
            .to_std()
            .as_secs_f64()
            .ceil() as u64,
    };
    let instance_id = query
        .instance_id
        .or(query.version)
        .filter(|v| !v.is_empty());
    plane
        .wait_for(
            &row.id,
            wanted,
            instance_id.as_deref(),
            Duration::from_secs(seconds.clamp(0, WAIT_MAX_SECS)),
        )
        .await?;
    Ok(ok())
}

#[utoipa::path(get, path = "/v1/apps/{app_name}/machines/{machine_id}/events", tag = "Machines", operation_id = "Machines_list_events",
    params(("app_name" = String, Path), ("machine_id" = String, Path)), responses((status = 200, body = Vec<MachineEvent>), ErrorAnswers))]
async fn machine_events(
    State(plane): Plane,
    caller: Caller,
    Path((name, id)): Path<(String, String)>,
) -> ApiResult<Json<Vec<MachineEvent>>> {
    let app = visible_app(&plane, &caller, &name)?;
    let row = visible_machine(&plane, &app, &id)?;
    Ok(Json(plane.store.events(&row.id, 1000)?))
}

#[utoipa::path(get, path = "/v1/apps/{app_name}/machines/{machine_id}/versions", tag = "Machines", operation_id = "Machines_list_versions",
    params(("app_name" = String, Path), ("machine_id" = String, Path)), responses((status = 200, body = Vec<MachineVersion>), ErrorAnswers))]
async fn machine_versions(
    State(plane): Plane,
    caller: Caller,
    Path((name, id)): Path<(String, String)>,
) -> ApiResult<Json<Vec<MachineVersion>>> {
    let app = visible_app(&plane, &caller, &name)?;
    let row = visible_machine(&plane, &app, &id)?;
    let versions = plane.store.machine_versions(&row.id)?;
    Ok(Json(
        versions
            .into_iter()
            .map(|v| MachineVersion {
                version: v.version,
                user_config: v.config,
                created_at: Some(v.created_at),
            })
            .collect(),
    ))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PsQuery {
    /// `cpu`, `rss`, `pid` or `command`.
    sort_by: Option<String>,
    /// `asc` or `desc`.
    order: Option<String>,
}

#[utoipa::path(get, path = "/v1/apps/{app_name}/machines/{machine_id}/ps", tag = "Machines", operation_id = "Machines_list_processes",
    params(("app_name" = String, Path), ("machine_id" = String, Path), PsQuery), responses((status = 200, body = Vec<ProcessStat>), ErrorAnswers))]
async fn machine_ps(
    State(plane): Plane,
    caller: Caller,
    Path((name, id)): Path<(String, String)>,
    QueryParams(query): QueryParams<PsQuery>,
) -> ApiResult<Json<Vec<ProcessStat>>> {
    let app = visible_app(&plane, &caller, &name)?;
    let row = visible_machine(&plane, &app, &id)?;
    let sort_by = query.sort_by.unwrap_or_default();
    if !matches!(sort_by.as_str(), "" | "cpu" | "rss" | "pid" | "command") {
        return Err(ApiError::bad_request(format!(
            "invalid sort_by: {sort_by:?} must be cpu, rss, pid or command"
        )));
    }
    let order = query.order.unwrap_or_default();
    if !matches!(order.as_str(), "" | "asc" | "desc") {
        return Err(ApiError::bad_request(format!(
            "invalid order: {order:?} must be asc or desc"
        )));
    }
    let mut processes = plane.machine_processes(&row).await?;
    match sort_by.as_str() {
        "cpu" => processes.sort_by_key(|p| p.cpu),
        "rss" => processes.sort_by_key(|p| p.rss),
        "command" => processes.sort_by(|a, b| a.command.cmp(&b.command)),
        _ => processes.sort_by_key(|p| p.pid),
    }
    if order == "desc" {
        processes.reverse();
    }
    Ok(Json(processes))
}

#[utoipa::path(post, path = "/v1/apps/{app_name}/machines/{machine_id}/exec", tag = "Machines", operation_id = "Machines_exec",
    params(("app_name" = String, Path), ("machine_id" = String, Path)), request_body = MachineExecRequest,
    responses((status = 200, body = ExecResponse), ErrorAnswers))]
async fn machine_exec(
    State(plane): Plane,
    caller: Caller,
    Path((name, id)): Path<(String, String)>,
    headers: HeaderMap,
    JsonBody(mut request): JsonBody<MachineExecRequest>,
) -> ApiResult<Json<ExecResponse>> {
    let (_, row) = writable_machine(&plane, &caller, &name, &id, &headers)?;
    if request.command.is_empty()
        && let Some(cmd) = request.cmd.as_deref().filter(|c| !c.trim().is_empty())
    {
        request.command = shell_words_split(cmd)?;
    }
    if request.command.is_empty() {
        return Err(ApiError::bad_request(
            "invalid command: a command to run is required",
        ));
    }
    Ok(Json(plane.exec_machine(&row, &request).await?))
}

fn shell_words_split(cmd: &str) -> ApiResult<Vec<String>> {
    Ok(cmd.split_whitespace().map(str::to_string).collect())
}

#[utoipa::path(get, path = "/v1/apps/{app_name}/machines/{machine_id}/lease", tag = "Machines", operation_id = "Machines_show_lease",
    params(("app_name" = String, Path), ("machine_id" = String, Path)), responses((status = 200, body = LeaseResponse), ErrorAnswers))]
async fn show_lease(
    State(plane): Plane,
    caller: Caller,
    Path((name, id)): Path<(String, String)>,
) -> ApiResult<Json<LeaseResponse>> {
    let app = visible_app(&plane, &caller, &name)?;
    let row = visible_machine(&plane, &app, &id)?;
    let lease = plane.current_lease(&row)?;
    Ok(Json(LeaseResponse {
        lease: lease.clone(),
        status: "success".into(),
        data: lease,
    }))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LeaseQuery {
    /// Seconds (flyctl passes it here as well as in the body).
    ttl: Option<u64>,
}

#[utoipa::path(post, path = "/v1/apps/{app_name}/machines/{machine_id}/lease", tag = "Machines", operation_id = "Machines_create_lease",
    params(("app_name" = String, Path), ("machine_id" = String, Path), LeaseQuery, ("fly-machine-lease-nonce" = Option<String>, Header)),
    request_body = CreateLeaseRequest, responses((status = 200, body = LeaseResponse), ErrorAnswers))]
async fn acquire_lease(
    State(plane): Plane,
    caller: Caller,
    Path((name, id)): Path<(String, String)>,
    headers: HeaderMap,
    QueryParams(query): QueryParams<LeaseQuery>,
    JsonBody(request): JsonBody<CreateLeaseRequest>,
) -> ApiResult<Json<LeaseResponse>> {
    let app = visible_app(&plane, &caller, &name)?;
    let row = visible_machine(&plane, &app, &id)?;
    caller.require_write()?;
    let lease = plane.acquire_lease(
        &row,
        request.ttl.or(query.ttl),
        request.description,
        lease_nonce(&headers).as_deref(),
        &caller.name,
    )?;
    Ok(Json(LeaseResponse {
        lease: lease.clone(),
        status: "success".into(),
        data: lease,
    }))
}

#[utoipa::path(delete, path = "/v1/apps/{app_name}/machines/{machine_id}/lease", tag = "Machines", operation_id = "Machines_release_lease",
    params(("app_name" = String, Path), ("machine_id" = String, Path), ("fly-machine-lease-nonce" = String, Header)),
    responses((status = 200, body = OkResponse), ErrorAnswers))]
async fn release_lease(
    State(plane): Plane,
    caller: Caller,
    Path((name, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult<Json<OkResponse>> {
    let app = visible_app(&plane, &caller, &name)?;
    let row = visible_machine(&plane, &app, &id)?;
    caller.require_write()?;
    plane.release_lease(&row, lease_nonce(&headers).as_deref())?;
    Ok(ok())
}

#[utoipa::path(post, path = "/v1/apps/{app_name}/machines/{machine_id}/cordon", tag = "Machines", operation_id = "Machines_cordon",
    params(("app_name" = String, Path), ("machine_id" = String, Path), ("fly-machine-lease-nonce" = Option<String>, Header)),
    responses((status = 200, body = OkResponse), ErrorAnswers))]
async fn cordon_machine(
    State(plane): Plane,
    caller: Caller,
    Path((name, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult<Json<OkResponse>> {
    let (_, row) = writable_machine(&plane, &caller, &name, &id, &headers)?;
    plane.set_cordoned(&row, true)?;
    Ok(ok())
}

#[utoipa::path(post, path = "/v1/apps/{app_name}/machines/{machine_id}/uncordon", tag = "Machines", operation_id = "Machines_uncordon",
    params(("app_name" = String, Path), ("machine_id" = String, Path), ("fly-machine-lease-nonce" = Option<String>, Header)),
    responses((status = 200, body = OkResponse), ErrorAnswers))]
async fn uncordon_machine(
    State(plane): Plane,
    caller: Caller,
    Path((name, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult<Json<OkResponse>> {
    let (_, row) = writable_machine(&plane, &caller, &name, &id, &headers)?;
    plane.set_cordoned(&row, false)?;
    Ok(ok())
}

#[utoipa::path(get, path = "/v1/apps/{app_name}/machines/{machine_id}/metadata", tag = "Machines", operation_id = "Machines_show_metadata",
    params(("app_name" = String, Path), ("machine_id" = String, Path)),
    responses((status = 200, body = std::collections::BTreeMap<String, String>), ErrorAnswers))]
async fn show_metadata(
    State(plane): Plane,
    caller: Caller,
    Path((name, id)): Path<(String, String)>,
) -> ApiResult<Json<std::collections::BTreeMap<String, String>>> {
    let app = visible_app(&plane, &caller, &name)?;
    let row = visible_machine(&plane, &app, &id)?;
    Ok(Json(row.config.metadata))
}

#[utoipa::path(post, path = "/v1/apps/{app_name}/machines/{machine_id}/metadata/{key}", tag = "Machines", operation_id = "Machines_update_metadata",
    params(("app_name" = String, Path), ("machine_id" = String, Path), ("key" = String, Path), ("fly-machine-lease-nonce" = Option<String>, Header)),
    request_body = MetadataValueRequest, responses((status = 204, description = "Set"), ErrorAnswers))]
async fn set_metadata(
    State(plane): Plane,
    caller: Caller,
    Path((name, id, key)): Path<(String, String, String)>,
    headers: HeaderMap,
    JsonBody(request): JsonBody<MetadataValueRequest>,
) -> ApiResult<StatusCode> {
    let (_, row) = writable_machine(&plane, &caller, &name, &id, &headers)?;
    plane.set_metadata(&row, &key, Some(&request.value))?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(delete, path = "/v1/apps/{app_name}/machines/{machine_id}/metadata/{key}", tag = "Machines", operation_id = "Machines_delete_metadata",
    params(("app_name" = String, Path), ("machine_id" = String, Path), ("key" = String, Path), ("fly-machine-lease-nonce" = Option<String>, Header)),
    responses((status = 204, description = "Deleted"), ErrorAnswers))]
async fn delete_metadata(
    State(plane): Plane,
    caller: Caller,
    Path((name, id, key)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> ApiResult<StatusCode> {
    let (_, row) = writable_machine(&plane, &caller, &name, &id, &headers)?;
    plane.set_metadata(&row, &key, None)?;
    Ok(StatusCode::NO_CONTENT)
}

fn sse_frame(published: &Published) -> Bytes {
    Bytes::from(format!(
        "id: {}\ndata: {}\n\n",
        published.seq(),
        published.data
    ))
}

/// `GET /v1/catalog/watch`: server-sent events; a snapshot (or, with `Last-Event-ID`,
/// the changes since), then every change.
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
    let first: Vec<Published> = match resume {
        Resume::Replay(updates) => updates,
        Resume::Snapshot => vec![plane.catalog.snapshot(current)?],
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
            match receiver.recv().await {
                Ok(update) => Some((Ok::<_, Infallible>(sse_frame(&update)), (receiver, plane))),
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    // Too far behind to replay: start over from a snapshot.
                    let (fresh, _, current) = plane.catalog.follow(None);
                    match plane.catalog.snapshot(current) {
                        Ok(snapshot) => Some((Ok(sse_frame(&snapshot)), (fresh, plane))),
                        Err(err) => {
                            tracing::error!(error = %err, "building a catalog snapshot failed");
                            None
                        }
                    }
                }
                Err(broadcast::error::RecvError::Closed) => None,
            }
        },
    );
    let keepalive = futures_util::stream::unfold((), |()| async {
        tokio::time::sleep(Duration::from_secs(15)).await;
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

async fn host_events(
    State(plane): Plane,
    caller: Caller,
    Path(host): Path<String>,
    JsonBody(events): JsonBody<Vec<AgentEvent>>,
) -> ApiResult<StatusCode> {
    caller.require_host_itself(&host)?;
    let stopped = plane.apply_agent_events(&host, &events)?;
    plane.destroy_stopped(stopped);
    Ok(StatusCode::NO_CONTENT)
}
