//! Hosts joining the control plane and the operator's view of them: agents register
//! (`POST /v1/hosts`) and heartbeat (`POST /v1/hosts/{id}/heartbeat`) with their host's
//! token; the operator's admin token mints join tokens (`aloft tokens create host`) and
//! lists, cordons and removes hosts (`aloft hosts …`).

use std::sync::Arc;

use aloft_api::internal::{
    HOST_MAX_CLOCK_SKEW_SECS, HostHeartbeat, HostInfo, HostRegistered, HostRegistration,
    MeshPeerInfo,
};
use aloft_api::token::Token;
use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use http::StatusCode;

use crate::ControlPlane;
use crate::api::{JsonBody, Plane};
use crate::auth::{Caller, TokenKind};
use crate::error::{ApiError, ApiResult};
use crate::hosts::{Need, SHARES_PER_CPU, host_status};
use crate::store::{HostRow, JOIN_TOKEN_HOST, TokenRow, now_millis, now_rfc3339};

pub fn routes() -> Router<Arc<ControlPlane>> {
    Router::new()
        .route("/v1/hosts", get(list_hosts).post(register_host))
        .route("/v1/hosts/mesh", get(mesh_peers))
        .route("/v1/hosts/{id}", get(show_host).delete(remove_host))
        .route("/v1/hosts/{id}/heartbeat", post(heartbeat))
        .route("/v1/hosts/{id}/cordon", post(cordon_host))
        .route("/v1/hosts/{id}/uncordon", post(uncordon_host))
}

/// Hosts are the platform operator's: the admin token `aloft server` made on first start.
pub(crate) fn require_operator(plane: &ControlPlane, caller: &Caller) -> ApiResult<()> {
    let admin = plane.store.setting(crate::SETTING_ADMIN_TOKEN_ID)?;
    if caller.is_host() || admin.as_deref() != Some(caller.token_id.as_str()) {
        return Err(ApiError::forbidden(
            "managing hosts needs the platform operator's admin token (the one `aloft server` wrote to its config)",
        ));
    }
    caller.require_org_write()
}

/// Mints a join token: a `host` token bound to no host until the first host registers
/// with it (then to that host only). It has no caveats, so the control plane can mint the
/// same string again to call the host's agent.
pub(crate) fn mint_join_token(
    plane: &ControlPlane,
    caller: &Caller,
    name: Option<String>,
) -> ApiResult<(TokenRow, String)> {
    require_operator(plane, caller)?;
    let (row, root_key) = plane.token_keys.new_row(
        String::new(),
        TokenKind::Host,
        name,
        "host join token".into(),
    )?;
    plane.store.insert_token(&row)?;
    plane.store.bind_host_token(&row.id, JOIN_TOKEN_HOST)?;
    let token = Token::mint(&row.id, &root_key, Vec::new()).encode();
    Ok((row, token))
}

/// A host id as agents make them (`host-…`), or any short name of letters, digits, `-`
/// and `_`.
fn check_host_id(id: &str) -> ApiResult<()> {
    if id.is_empty()
        || id.len() > 63
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(ApiError::bad_request(format!(
            "invalid id: {id:?} must be 1 to 63 letters, digits, '-' or '_'"
        )));
    }
    Ok(())
}

fn check_registration(registration: &HostRegistration) -> ApiResult<()> {
    check_host_id(&registration.id)?;
    if registration.region.is_empty()
        || registration.region.len() > 32
        || !registration
            .region
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-')
    {
        return Err(ApiError::bad_request(format!(
            "invalid region: {:?} must be a region code such as iad or local",
            registration.region
        )));
    }
    if !(registration.agent_url.starts_with("http://")
        || registration.agent_url.starts_with("https://"))
    {
        return Err(ApiError::bad_request(format!(
            "invalid agent_url: {:?} must be an http:// or https:// URL",
            registration.agent_url
        )));
    }
    check_mesh(registration)
}

/// The mesh key must be a WireGuard public key and the endpoint an `ip:port` other hosts
/// can send to; both or neither.
fn check_mesh(registration: &HostRegistration) -> ApiResult<()> {
    use base64::Engine;
    match (&registration.mesh_public_key, &registration.mesh_endpoint) {
        (None, None) => Ok(()),
        (Some(_), None) => Err(ApiError::bad_request(
            "invalid mesh_endpoint: missing; a host with a mesh_public_key says where its mesh listens (ip:port)",
        )),
        (None, Some(_)) => Err(ApiError::bad_request(
            "invalid mesh_public_key: missing; a host with a mesh_endpoint gives its WireGuard public key",
        )),
        (Some(key), Some(endpoint)) => {
            let decoded = base64::engine::general_purpose::STANDARD.decode(key.as_bytes());
            if !decoded.is_ok_and(|bytes| bytes.len() == 32) {
                return Err(ApiError::bad_request(format!(
                    "invalid mesh_public_key: {key:?} is not a WireGuard public key (base64 of 32 bytes, as `wg pubkey` prints)"
                )));
            }
            match endpoint.parse::<std::net::SocketAddr>() {
                Ok(addr) if !addr.ip().is_unspecified() && addr.port() != 0 => Ok(()),
                _ => Err(ApiError::bad_request(format!(
                    "invalid mesh_endpoint: {endpoint:?} must be ip:port (e.g. 10.0.0.2:51820 or [2001:db8::2]:51820) where other hosts reach this host's mesh"
                ))),
            }
        }
    }
}

/// Logs a refused host request (the operator's to hear about) and passes the error on.
fn refused(host: &str, err: ApiError) -> ApiError {
    tracing::warn!(host, status = %err.status, error = %err.message, "refused a host's request");
    err
}

/// `POST /v1/hosts`: a host's agent says where it is and what it has. Only the host
/// itself may (the control plane sends that host's token there); a join token becomes
/// the token of the first host that registers with it.
async fn register_host(
    State(plane): Plane,
    caller: Caller,
    JsonBody(registration): JsonBody<HostRegistration>,
) -> ApiResult<Json<HostRegistered>> {
    let id = registration.id.clone();
    if caller.is_joining() {
        check_registration(&registration).map_err(|e| refused(&id, e))?;
        check_mesh_key_free(&plane, &registration).map_err(|e| refused(&id, e))?;
        if plane.store.host_token(&id)?.is_some() {
            return Err(refused(
                &id,
                ApiError::forbidden(&format!(
                    "host {id} has joined already with another token; a join token cannot take over a host (remove it first with `aloft hosts remove {id}`)"
                )),
            ));
        }
        if !plane.store.claim_join_token(&caller.token_id, &id)? {
            return Err(refused(
                &id,
                ApiError::conflict("this join token was used by another host at the same time"),
            ));
        }
        tracing::info!(host = %id, region = %registration.region, "a host joined");
    } else {
        caller
            .require_host_itself(&id)
            .map_err(|e| refused(&id, e))?;
        check_registration(&registration).map_err(|e| refused(&id, e))?;
        check_mesh_key_free(&plane, &registration).map_err(|e| refused(&id, e))?;
    }
    plane.store.upsert_host(&HostRow {
        id: id.clone(),
        region: registration.region,
        agent_url: registration.agent_url,
        last_seen: now_rfc3339(),
        cpus: registration.cpus,
        memory_mb: registration.memory_mb,
        cordoned: false,
    })?;
    // A host's key is for this run of its agent: registering without one leaves the mesh.
    plane.store.set_host_mesh(
        &id,
        registration.mesh_public_key.as_deref().unwrap_or_default(),
        registration.mesh_endpoint.as_deref().unwrap_or_default(),
    )?;
    let host_number = crate::ips::host_number(&plane.store, &id)?;
    plane.forget_agent(&id);
    // A host that (re)joins is probed now, not at the next round: until then its machines
    // would show the last round's answer, `unreachable` for a host that was restarting.
    let probing = plane.clone();
    let probed = id.clone();
    tokio::spawn(async move {
        probing.probe_host(&probed).await;
        probing.reclaim_replaced_machines(&probed).await;
    });
    if let Some(key) = &registration.mesh_public_key {
        tracing::info!(host = %id, host_number, public_key = %key, "host registered its mesh key");
    }
    Ok(Json(HostRegistered { host_number }))
}

/// A mesh key belongs to one host: another host registering it would receive that host's
/// traffic.
fn check_mesh_key_free(plane: &ControlPlane, registration: &HostRegistration) -> ApiResult<()> {
    let Some(key) = &registration.mesh_public_key else {
        return Ok(());
    };
    match plane.store.host_with_mesh_key(key)? {
        Some(holder) if holder != registration.id => Err(ApiError::conflict(format!(
            "invalid mesh_public_key: another host ({holder}) uses this key; every host registers a key of its own"
        ))),
        _ => Ok(()),
    }
}

/// `GET /v1/hosts/mesh`: the hosts of the mesh that are up, for agents to keep their
/// peers current. Host tokens only: where each host's mesh listens is the platform's, not
/// an org's.
async fn mesh_peers(State(plane): Plane, caller: Caller) -> ApiResult<Json<Vec<MeshPeerInfo>>> {
    if !caller.is_host() || caller.is_joining() {
        return Err(ApiError::forbidden(
            "the mesh's peers are for hosts: call with a registered host's token",
        ));
    }
    let now = now_millis();
    let hosts = plane.store.hosts()?;
    let peers = plane
        .store
        .mesh_hosts()?
        .into_iter()
        .filter(|peer| {
            hosts.iter().any(|host| {
                host.id == peer.id && host_status(host, now) != crate::hosts::HostStatus::Down
            })
        })
        .map(|peer| MeshPeerInfo {
            id: peer.id,
            number: peer.number,
            public_key: peer.public_key,
            endpoint: peer.endpoint,
        })
        .collect();
    Ok(Json(peers))
}

/// `POST /v1/hosts/{id}/heartbeat`: the host is alive. A heartbeat whose clock is off by
/// more than [`HOST_MAX_CLOCK_SKEW_SECS`] is refused (its host then goes down), as one
/// from an unregistered host (the agent registers again).
async fn heartbeat(
    State(plane): Plane,
    caller: Caller,
    Path(id): Path<String>,
    JsonBody(beat): JsonBody<HostHeartbeat>,
) -> ApiResult<StatusCode> {
    caller
        .require_host_itself(&id)
        .map_err(|e| refused(&id, e))?;
    let time = chrono::DateTime::parse_from_rfc3339(&beat.time).map_err(|e| {
        refused(
            &id,
            ApiError::bad_request(format!(
                "invalid time: {:?} is not an RFC 3339 time ({e})",
                beat.time
            )),
        )
    })?;
    let skew_ms = time.timestamp_millis().saturating_sub(now_millis());
    if skew_ms.abs() > HOST_MAX_CLOCK_SKEW_SECS * 1000 {
        let seconds = skew_ms.abs() / 1000;
        let way = if skew_ms > 0 { "ahead of" } else { "behind" };
        return Err(refused(
            &id,
            ApiError::bad_request(format!(
                "invalid time: host {id}'s clock is {seconds}s {way} the control plane's (at most {HOST_MAX_CLOCK_SKEW_SECS}s allowed); set its clock (NTP)"
            )),
        ));
    }
    if !plane.store.touch_host(&id, &now_rfc3339())? {
        return Err(ApiError::not_found(format!(
            "host {id} is not registered; register it first (POST /v1/hosts)"
        )));
    }
    Ok(StatusCode::NO_CONTENT)
}

/// The operator's view of every host, with what is on it.
fn host_infos(plane: &ControlPlane) -> ApiResult<Vec<HostInfo>> {
    let machines = plane.store.all_live_machines()?;
    let now = now_millis();
    plane
        .store
        .hosts()?
        .into_iter()
        .map(|host| {
            let mut info = HostInfo {
                status: host_status(&host, now).as_str().into(),
                id: host.id.clone(),
                region: host.region.clone(),
                cordoned: host.cordoned,
                agent_url: host.agent_url.clone(),
                last_seen: host.last_seen.clone(),
                cpus: host.cpus,
                memory_mb: host.memory_mb,
                volume_ids: plane
                    .store
                    .volumes_on_host(&host.id)?
                    .into_iter()
                    .map(|v| v.id)
                    .collect(),
                ..HostInfo::default()
            };
            let mut shares = 0u64;
            for machine in machines.iter().filter(|m| m.host_id == host.id) {
                let need = Need::of(&machine.config);
                info.machines += 1;
                info.machine_ids.push(machine.id.clone());
                shares += need.cpu_shares;
                info.memory_reserved_mb += need.memory_mb;
            }
            info.cpus_reserved = shares as f64 / SHARES_PER_CPU as f64;
            Ok(info)
        })
        .collect()
}

fn host_info(plane: &ControlPlane, id: &str) -> ApiResult<HostInfo> {
    host_infos(plane)?
        .into_iter()
        .find(|h| h.id == id)
        .ok_or_else(|| ApiError::not_found(format!("host not found: {id}")))
}

/// `GET /v1/hosts`.
async fn list_hosts(State(plane): Plane, caller: Caller) -> ApiResult<Json<Vec<HostInfo>>> {
    require_operator(&plane, &caller)?;
    Ok(Json(host_infos(&plane)?))
}

/// `GET /v1/hosts/{id}`.
async fn show_host(
    State(plane): Plane,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<HostInfo>> {
    require_operator(&plane, &caller)?;
    Ok(Json(host_info(&plane, &id)?))
}

async fn set_cordon(
    plane: &ControlPlane,
    caller: &Caller,
    id: &str,
    cordoned: bool,
) -> ApiResult<Json<HostInfo>> {
    require_operator(plane, caller)?;
    if !plane.store.set_host_cordoned(id, cordoned)? {
        return Err(ApiError::not_found(format!("host not found: {id}")));
    }
    tracing::info!(host = %id, cordoned, "host cordon changed");
    Ok(Json(host_info(plane, id)?))
}

/// `POST /v1/hosts/{id}/cordon`: the host gets no new machines; its machines stay.
async fn cordon_host(
    State(plane): Plane,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<HostInfo>> {
    set_cordon(&plane, &caller, &id, true).await
}

/// `POST /v1/hosts/{id}/uncordon`.
async fn uncordon_host(
    State(plane): Plane,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<HostInfo>> {
    set_cordon(&plane, &caller, &id, false).await
}

/// `DELETE /v1/hosts/{id}`: forgets a host that has no machines and no volumes left, and
/// revokes its tokens (joining again takes a new join token).
async fn remove_host(
    State(plane): Plane,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<HostInfo>> {
    require_operator(&plane, &caller)?;
    let info = host_info(&plane, &id)?;
    if !info.machine_ids.is_empty() || !info.volume_ids.is_empty() {
        let mut what = Vec::new();
        if !info.machine_ids.is_empty() {
            what.push(format!("machines {}", info.machine_ids.join(", ")));
        }
        if !info.volume_ids.is_empty() {
            what.push(format!("volumes {}", info.volume_ids.join(", ")));
        }
        return Err(ApiError::precondition(format!(
            "host {id} still has {}; destroy them first",
            what.join(" and ")
        )));
    }
    plane.store.delete_host(&id)?;
    plane.forget_agent(&id);
    tracing::info!(host = %id, "host removed");
    Ok(Json(info))
}
