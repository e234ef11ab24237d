//! IP assignments through the API: `GET/POST /v1/apps/{app}/ip_assignments`,
//! `DELETE …/{ip}`. Addresses come from fixed pools (public IPv6 from 2001:db8:a10f::/48,
//! dedicated IPv4 from 198.18.0.0/15, one shared IPv4, Flycast from fdaa::/16) and are
//! published on the catalog with their app. How traffic reaches them is networking's job.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use aloft_api::{AssignIpRequest, IpAssignment, ListIpAssignmentsResponse};
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Json, Router};
use http::StatusCode;
use rand::Rng;

use crate::ControlPlane;
use crate::api::{ErrorAnswers, JsonBody, Plane, visible_app};
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::store::{AppRow, IpRow, StoreError, now_rfc3339};

/// The address every app's `shared_v4` assignment answers on.
pub const SHARED_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);

pub fn routes() -> Router<Arc<ControlPlane>> {
    Router::new()
        .route(
            "/v1/apps/{app_name}/ip_assignments",
            get(list_ips).post(assign_ip),
        )
        .route(
            "/v1/apps/{app_name}/ip_assignments/{ip}",
            delete(release_ip),
        )
}

fn view(row: &IpRow) -> IpAssignment {
    IpAssignment {
        ip: row.ip.clone(),
        region: row.region.clone(),
        service_name: row.service_name.clone(),
        shared: row.kind == "shared_v4",
        kind: row.kind.clone(),
        network: row.network.clone(),
        created_at: row.created_at.clone(),
    }
}

fn pick(kind: &str, app: &AppRow) -> String {
    let mut rng = rand::thread_rng();
    match kind {
        "shared_v4" => SHARED_V4.to_string(),
        "v4" => {
            // 198.18.0.0/15 minus the shared address and the network/broadcast ends.
            let offset: u32 = rng.gen_range(2..(1 << 17) - 1);
            Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + offset).to_string()
        }
        "private_v6" => {
            let org = app
                .org_id
                .bytes()
                .fold(0u16, |h, b| h.wrapping_mul(31).wrapping_add(b as u16));
            Ipv6Addr::new(
                0xfdaa,
                0,
                org,
                0,
                1,
                0,
                rng.r#gen(),
                rng.r#gen::<u16>().max(1),
            )
            .to_string()
        }
        _ => Ipv6Addr::new(
            0x2001,
            0xdb8,
            0xa10f,
            0,
            rng.r#gen(),
            rng.r#gen(),
            rng.r#gen(),
            rng.r#gen::<u16>().max(1),
        )
        .to_string(),
    }
}

#[utoipa::path(get, path = "/v1/apps/{app_name}/ip_assignments", tag = "IPs", operation_id = "IPs_list",
    params(("app_name" = String, Path)), responses((status = 200, body = ListIpAssignmentsResponse), ErrorAnswers))]
async fn list_ips(
    State(plane): Plane,
    caller: Caller,
    Path(app_name): Path<String>,
) -> ApiResult<Json<ListIpAssignmentsResponse>> {
    let app = visible_app(&plane, &caller, &app_name)?;
    Ok(Json(ListIpAssignmentsResponse {
        ips: plane.store.ips(Some(&app.id))?.iter().map(view).collect(),
    }))
}

#[utoipa::path(post, path = "/v1/apps/{app_name}/ip_assignments", tag = "IPs", operation_id = "IPs_assign",
    params(("app_name" = String, Path)), request_body = AssignIpRequest, responses((status = 201, body = IpAssignment), ErrorAnswers))]
async fn assign_ip(
    State(plane): Plane,
    caller: Caller,
    Path(app_name): Path<String>,
    JsonBody(request): JsonBody<AssignIpRequest>,
) -> ApiResult<Response> {
    let app = visible_app(&plane, &caller, &app_name)?;
    caller.require_write()?;
    let kind = match request.kind.as_str() {
        "v4" | "shared_v4" | "v6" | "private_v6" => request.kind.clone(),
        other => {
            return Err(ApiError::bad_request(format!(
                "invalid type: {other:?} must be v4, shared_v4, v6 or private_v6"
            )));
        }
    };
    let region = match request
        .region
        .as_deref()
        .filter(|r| !r.is_empty() && *r != "global")
    {
        None => "global".to_string(),
        Some(r) if aloft_api::regions::find(r).is_some() || r == plane.config.region => {
            r.to_string()
        }
        Some(r) => {
            return Err(ApiError::bad_request(format!(
                "invalid region: {r:?} is not a region code"
            )));
        }
    };
    if kind == "shared_v4"
        && plane
            .store
            .ips(Some(&app.id))?
            .iter()
            .any(|ip| ip.kind == "shared_v4")
    {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("app {} already has a shared IPv4 address", app.name),
        ));
    }
    for _ in 0..8 {
        let row = IpRow {
            ip: pick(&kind, &app),
            app_id: app.id.clone(),
            kind: kind.clone(),
            region: region.clone(),
            network: request.network.clone().unwrap_or_default(),
            service_name: request.service_name.clone().unwrap_or_default(),
            created_at: now_rfc3339(),
        };
        match plane.store.insert_ip(&row) {
            Ok(()) => {
                plane.catalog.app_changed(&app);
                return Ok((StatusCode::CREATED, Json(view(&row))).into_response());
            }
            Err(StoreError::Conflict(_)) => continue,
            Err(other) => return Err(other.into()),
        }
    }
    Err(ApiError::unavailable(
        "no free address in the pool; try again",
    ))
}

#[utoipa::path(delete, path = "/v1/apps/{app_name}/ip_assignments/{ip}", tag = "IPs", operation_id = "IPs_release",
    params(("app_name" = String, Path), ("ip" = String, Path)), responses((status = 204, description = "Released"), ErrorAnswers))]
async fn release_ip(
    State(plane): Plane,
    caller: Caller,
    Path((app_name, ip)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let app = visible_app(&plane, &caller, &app_name)?;
    caller.require_write()?;
    if !plane.store.delete_ip(&app.id, ip.trim())? {
        return Err(ApiError::not_found(format!(
            "IP assignment not found: {ip}"
        )));
    }
    plane.catalog.app_changed(&app);
    Ok(StatusCode::NO_CONTENT)
}
