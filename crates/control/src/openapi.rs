//! The OpenAPI document of the public API, generated from the handlers' annotations and
//! the wire types (utoipa), served at `/openapi.json`.

use axum::response::IntoResponse;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::{api, certs, ips, orgs, secrets, volumes};

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Aloft Machines API", description = "The Fly.io-compatible Machines API of Aloft. Every call needs `Authorization: Bearer <token>`."),
    modifiers(&BearerAuth),
    components(schemas(aloft_api::ErrorResponse)),
    security(("bearer" = [])),
    paths(
        api::list_apps, api::create_app, api::get_app, api::delete_app,
        api::list_machines, api::create_machine, api::get_machine, api::update_machine, api::destroy_machine,
        api::start_machine, api::stop_machine, api::restart_machine, api::suspend_machine, api::signal_machine,
        api::wait_machine, api::machine_events, api::machine_versions, api::machine_ps, api::machine_exec,
        api::show_lease, api::acquire_lease, api::release_lease, api::cordon_machine, api::uncordon_machine,
        api::show_metadata, api::set_metadata, api::delete_metadata,
        orgs::list_orgs, orgs::get_org, orgs::create_org, orgs::list_tokens, orgs::create_token, orgs::revoke_token,
        volumes::list_volumes, volumes::create_volume, volumes::get_volume, volumes::update_volume, volumes::delete_volume,
        volumes::extend_volume, volumes::list_snapshots, volumes::create_snapshot,
        secrets::list_secrets, secrets::set_secrets, secrets::set_secret, secrets::unset_secret,
        certs::list_certificates, certs::add_acme, certs::add_custom, certs::get_certificate, certs::check_certificate, certs::delete_certificate,
        ips::list, ips::assign, ips::release, ips::private_network,
    )
)]
pub struct ApiDoc;

/// The document, built once.
pub fn document() -> &'static str {
    static DOCUMENT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DOCUMENT.get_or_init(|| {
        ApiDoc::openapi()
            .to_json()
            .unwrap_or_else(|e| format!("{{\"error\":\"building the OpenAPI document: {e}\"}}"))
    })
}

/// `GET /openapi.json`: public, like Fly's published spec.
pub async fn serve() -> impl IntoResponse {
    (
        [(http::header::CONTENT_TYPE, "application/json")],
        document(),
    )
}
