//! The agent's HTTP API, called by the control plane with the host token.

use std::sync::Arc;

use aloft_api::StopRequest;
use aloft_api::internal::{AgentMachine, MachineSpec};
use axum::extract::{Path, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use http::{StatusCode, header};

use crate::{Agent, AgentError};

struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

impl From<AgentError> for ApiError {
    fn from(err: AgentError) -> Self {
        match err {
            AgentError::NotFound(_) => ApiError(StatusCode::NOT_FOUND, err.to_string()),
            AgentError::Failed(_) => ApiError(StatusCode::UNPROCESSABLE_ENTITY, err.to_string()),
            AgentError::Store(_) => ApiError(StatusCode::INTERNAL_SERVER_ERROR, err.to_string()),
        }
    }
}

type Result<T> = std::result::Result<Json<T>, ApiError>;

pub fn router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route("/v1/machines", get(list))
        .route(
            "/v1/machines/{id}",
            get(get_machine).put(put).delete(destroy),
        )
        .route("/v1/machines/{id}/start", post(start))
        .route("/v1/machines/{id}/stop", post(stop))
        .layer(axum::middleware::from_fn_with_state(
            agent.clone(),
            require_token,
        ))
        .with_state(agent)
}

async fn require_token(State(agent): State<Arc<Agent>>, request: Request, next: Next) -> Response {
    let expected = format!("Bearer {}", agent.config.token);
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if given != Some(expected.as_str()) {
        return ApiError(
            StatusCode::UNAUTHORIZED,
            "this agent API needs the host token".into(),
        )
        .into_response();
    }
    next.run(request).await
}

async fn list(State(agent): State<Arc<Agent>>) -> Result<Vec<AgentMachine>> {
    Ok(Json(agent.list()?))
}

async fn get_machine(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
) -> Result<AgentMachine> {
    Ok(Json(agent.get(&id)?))
}

async fn put(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
    Json(spec): Json<MachineSpec>,
) -> Result<AgentMachine> {
    if spec.id != id {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("spec id {} does not match the path's {id}", spec.id),
        ));
    }
    Ok(Json(agent.put(spec).await?))
}

async fn start(State(agent): State<Arc<Agent>>, Path(id): Path<String>) -> Result<AgentMachine> {
    Ok(Json(agent.start(&id).await?))
}

async fn stop(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
    body: Option<Json<StopRequest>>,
) -> Result<AgentMachine> {
    let request = body.map(|Json(r)| r).unwrap_or_default();
    Ok(Json(agent.stop(&id, &request).await?))
}

async fn destroy(State(agent): State<Arc<Agent>>, Path(id): Path<String>) -> Result<AgentMachine> {
    Ok(Json(agent.destroy(&id).await?))
}
