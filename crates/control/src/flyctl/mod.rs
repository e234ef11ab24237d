//! The API flyctl finds at `FLY_API_BASE_URL`, answered from the same store as the
//! Machines API: Fly's GraphQL API at `POST /graphql` (the part of Fly's schema that
//! flyctl's app commands query, see [`schema`]) and the logs endpoint
//! `GET /api/v1/apps/{app}/logs` in Fly's JSON shape ([`logs`]), and the releases REST
//! routes flyctl's own machine deploys use and the organizations it looks apps' orgs up in
//! (`FLY_UIEX_BASE_URL`, [`releases`], [`organizations`]). The Machines API
//! (`FLY_FLAPS_BASE_URL`) is Aloft's own, under `/v1`.

mod graphql;
mod logs;
mod organizations;
mod releases;
mod schema;

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::routing::{get, patch, post};
use bytes::Bytes;
use http::HeaderMap;

use crate::ControlPlane;

pub use schema::{FlySchema, build_schema};

pub fn routes() -> Router<Arc<ControlPlane>> {
    let schema = build_schema();
    Router::new()
        .route(
            "/graphql",
            post(
                move |State(plane): State<Arc<ControlPlane>>, headers: HeaderMap, body: Bytes| {
                    graphql::serve(schema.clone(), plane, headers, body)
                },
            ),
        )
        .route("/api/v1/apps/{app}/logs", get(logs::app_logs))
        .route("/api/v1/organizations", get(organizations::list))
        .route("/api/v1/organizations/{slug}", get(organizations::show))
        .route("/api/v1/apps/{app}/releases", get(releases::list))
        .route("/api/v1/releases", post(releases::create))
        .route("/api/v1/releases/{id}", patch(releases::update))
}
