//! What the control plane passes between users and the agents that run their machines,
//! beyond the lifecycle calls: check results (`checks`), logs (`logs`), and interactive
//! sessions (`GET /v1/apps/{app}/machines/{id}/console`, an HTTP upgrade relayed to the
//! machine's agent byte for byte).

use std::sync::Arc;

use aloft_api::internal::console_frame::PROTOCOL;
use axum::Router;
use axum::body::Body;
use axum::extract::{Path, RawQuery, Request, State};
use axum::response::Response;
use axum::routing::get;
use http::{StatusCode, header};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;

use crate::ControlPlane;
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};

/// The HTTP client of the agent of `host_id` (the control plane's one `AgentClient` for
/// that host), for streams and upgrades.
pub fn agent_endpoint(plane: &ControlPlane, host_id: &str) -> ApiResult<aloft_client::Client> {
    Ok(plane.agent(host_id)?.http().clone())
}

pub fn router() -> Router<Arc<ControlPlane>> {
    Router::new()
        .merge(crate::checks::routes())
        .merge(crate::logs::routes())
        .route("/v1/apps/{app}/machines/{id}/console", get(console))
}

fn wants_console(request: &Request) -> bool {
    request
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(PROTOCOL))
}

async fn console(
    State(plane): State<Arc<ControlPlane>>,
    caller: Caller,
    Path((name, id)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    mut request: Request,
) -> ApiResult<Response> {
    caller.require_write()?;
    let app = match plane.store.app(&name)? {
        Some(app) if caller.sees_app(&app) => app,
        _ => return Err(ApiError::not_found(format!("app not found: {name}"))),
    };
    let machine = match plane.store.machine(&id)? {
        Some(machine) if machine.app_id == app.id => machine,
        _ => return Err(ApiError::not_found(format!("machine not found: {id}"))),
    };
    if !wants_console(&request) {
        return Err(ApiError::bad_request(format!(
            "this endpoint needs `Connection: Upgrade` and `Upgrade: {PROTOCOL}`"
        )));
    }
    let agent = agent_endpoint(&plane, &machine.host_id)?;
    let (base, token) = (agent.base_url(), agent.token());
    let path = match query {
        Some(query) => format!("/v1/machines/{id}/console?{query}"),
        None => format!("/v1/machines/{id}/console"),
    };
    let upstream = open_upgrade(base, token, &path).await?;
    let downstream = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        let Ok(client) = downstream.await else { return };
        let mut client = TokioIo::new(client);
        let mut agent = TokioIo::new(upstream);
        let _ = tokio::io::copy_bidirectional(&mut client, &mut agent).await;
    });
    Ok(Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, PROTOCOL)
        .body(Body::empty())
        .unwrap_or_default())
}

/// Opens an upgraded connection to an agent's console endpoint.
async fn open_upgrade(
    base: &str,
    token: Option<&str>,
    path: &str,
) -> ApiResult<hyper::upgrade::Upgraded> {
    let authority = base
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let unavailable =
        |reason: String| ApiError::unavailable(format!("host agent unavailable: {reason}"));
    let stream = tokio::net::TcpStream::connect(&authority)
        .await
        .map_err(|e| unavailable(format!("connecting to {authority}: {e}")))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| unavailable(e.to_string()))?;
    tokio::spawn(async move {
        let _ = connection.with_upgrades().await;
    });
    let mut builder = http::Request::builder()
        .method(http::Method::GET)
        .uri(path)
        .header(header::HOST, &authority)
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, PROTOCOL);
    if let Some(token) = token {
        builder = builder.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let request = builder
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| unavailable(e.to_string()))?;
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let message = serde_json::from_slice::<aloft_api::ErrorResponse>(&body)
            .map(|e| e.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
        return Err(ApiError::new(status, message));
    }
    hyper::upgrade::on(response)
        .await
        .map_err(|e| unavailable(format!("upgrading: {e}")))
}
