//! Certificates through the API: `GET /v1/apps/{app}/certificates`, `POST …/acme` and
//! `…/custom` to add a hostname, `GET/DELETE …/{hostname}`, `POST …/{hostname}/check`.
//! This module keeps which hostnames an app serves (published on the catalog so proxies
//! route them); issuing and storing the certificates themselves is the proxy's ACME work.

use std::sync::Arc;

use aloft_api::{Certificate, CreateCertificateRequest, ListCertificatesResponse};
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use http::StatusCode;

use crate::ControlPlane;
use crate::api::{ErrorAnswers, JsonBody, Plane, visible_app};
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::store::{AppRow, CertificateRow, StoreError, now_rfc3339};

pub fn routes() -> Router<Arc<ControlPlane>> {
    Router::new()
        .route("/v1/apps/{app_name}/certificates", get(list_certificates))
        .route("/v1/apps/{app_name}/certificates/acme", post(add_acme))
        .route("/v1/apps/{app_name}/certificates/custom", post(add_custom))
        .route(
            "/v1/apps/{app_name}/certificates/{hostname}",
            get(get_certificate).delete(delete_certificate),
        )
        .route(
            "/v1/apps/{app_name}/certificates/{hostname}/check",
            post(check_certificate),
        )
}

fn view(row: &CertificateRow) -> Certificate {
    Certificate {
        hostname: row.hostname.clone(),
        source: row.source.clone(),
        status: row.status.clone(),
        configured: row.status == "ready",
        created_at: row.created_at.clone(),
    }
}

/// A DNS name (optionally `*.` wildcard): labels of letters, digits and dashes.
pub fn check_hostname(hostname: &str) -> ApiResult<String> {
    let name = hostname.trim().trim_end_matches('.').to_ascii_lowercase();
    let bare = name.strip_prefix("*.").unwrap_or(&name);
    let labels: Vec<&str> = bare.split('.').collect();
    let valid = name.len() <= 253
        && labels.len() >= 2
        && labels.iter().all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if !valid {
        return Err(ApiError::bad_request(format!(
            "invalid hostname: {hostname:?} is not a domain name such as www.example.com"
        )));
    }
    Ok(name)
}

/// Who may claim a hostname, as far as the platform's own domain goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PlatformName<'a> {
    /// Not under the base domain: a custom domain, first come first served.
    Custom,
    /// The base domain itself, or a wildcard covering every app: nobody's to claim.
    Platform,
    /// `<app>.<base>` or deeper (`x.<app>.<base>`, `*.<app>.<base>`): app `<app>`'s only.
    App(&'a str),
}

/// Which app a hostname belongs to under `base_domain` (compared without case).
pub fn platform_name<'a>(hostname: &'a str, base_domain: &str) -> PlatformName<'a> {
    let base = base_domain.trim_end_matches('.');
    let bare = hostname.strip_prefix("*.").unwrap_or(hostname);
    if base.is_empty() {
        return PlatformName::Custom;
    }
    // The base domain itself, and `*.<base>` (every app at once).
    if bare.eq_ignore_ascii_case(base) {
        return PlatformName::Platform;
    }
    let Some(prefix) = bare
        .len()
        .checked_sub(base.len() + 1)
        .filter(|&cut| cut > 0)
        .and_then(|cut| Some((bare.get(..cut)?, bare.get(cut..)?)))
        .and_then(|(prefix, suffix)| {
            let domain = suffix.strip_prefix('.')?;
            domain.eq_ignore_ascii_case(base).then_some(prefix)
        })
    else {
        return PlatformName::Custom;
    };
    match prefix.rsplit('.').next() {
        Some(app) if !app.is_empty() => PlatformName::App(app),
        _ => PlatformName::Platform,
    }
}

/// Whether `app` may serve `hostname`: any custom domain, and under the platform's domain
/// only names of its own (`<app>.<base>` and below).
pub fn may_claim(app_name: &str, hostname: &str, base_domain: &str) -> bool {
    match platform_name(hostname, base_domain) {
        PlatformName::Custom => true,
        PlatformName::Platform => false,
        PlatformName::App(owner) => owner.eq_ignore_ascii_case(app_name),
    }
}

fn find(plane: &ControlPlane, app: &AppRow, hostname: &str) -> ApiResult<CertificateRow> {
    let name = hostname.trim().trim_end_matches('.').to_ascii_lowercase();
    plane
        .store
        .certificates(Some(&app.id))?
        .into_iter()
        .find(|c| c.hostname == name)
        .ok_or_else(|| ApiError::not_found(format!("certificate not found: {hostname}")))
}

fn add(plane: &ControlPlane, app: &AppRow, hostname: &str, source: &str) -> ApiResult<Response> {
    let hostname = check_hostname(hostname)?;
    let base = &plane.config.base_domain;
    if !may_claim(&app.name, &hostname, base) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "invalid hostname: {hostname} is under the platform's domain {base}; only the app it names may use it (app {}'s own names are {}.{base} and below)",
                app.name, app.name
            ),
        ));
    }
    let row = CertificateRow {
        app_id: app.id.clone(),
        hostname: hostname.clone(),
        source: source.into(),
        status: "pending".into(),
        created_at: now_rfc3339(),
    };
    plane.store.insert_certificate(&row).map_err(|e| match e {
        StoreError::Conflict(_) => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("hostname {hostname} already has a certificate"),
        ),
        other => other.into(),
    })?;
    plane.catalog.app_changed(app);
    Ok((StatusCode::CREATED, Json(view(&row))).into_response())
}

#[utoipa::path(get, path = "/v1/apps/{app_name}/certificates", tag = "Certificates", operation_id = "Certificates_list",
    params(("app_name" = String, Path)), responses((status = 200, body = ListCertificatesResponse), ErrorAnswers))]
async fn list_certificates(
    State(plane): Plane,
    caller: Caller,
    Path(app_name): Path<String>,
) -> ApiResult<Json<ListCertificatesResponse>> {
    let app = visible_app(&plane, &caller, &app_name)?;
    let certificates: Vec<Certificate> = plane
        .store
        .certificates(Some(&app.id))?
        .iter()
        .map(view)
        .collect();
    Ok(Json(ListCertificatesResponse {
        total_count: certificates.len() as u64,
        certificates,
    }))
}

#[utoipa::path(post, path = "/v1/apps/{app_name}/certificates/acme", tag = "Certificates", operation_id = "Certificates_request_acme",
    params(("app_name" = String, Path)), request_body = CreateCertificateRequest, responses((status = 201, body = Certificate), ErrorAnswers))]
async fn add_acme(
    State(plane): Plane,
    caller: Caller,
    Path(app_name): Path<String>,
    JsonBody(request): JsonBody<CreateCertificateRequest>,
) -> ApiResult<Response> {
    let app = visible_app(&plane, &caller, &app_name)?;
    caller.require_write()?;
    add(&plane, &app, &request.hostname, "acme")
}

#[utoipa::path(post, path = "/v1/apps/{app_name}/certificates/custom", tag = "Certificates", operation_id = "Certificates_import_custom",
    params(("app_name" = String, Path)), request_body = CreateCertificateRequest, responses((status = 201, body = Certificate), ErrorAnswers))]
async fn add_custom(
    State(plane): Plane,
    caller: Caller,
    Path(app_name): Path<String>,
    JsonBody(request): JsonBody<CreateCertificateRequest>,
) -> ApiResult<Response> {
    let app = visible_app(&plane, &caller, &app_name)?;
    caller.require_write()?;
    for (field, value) in [
        ("fullchain", &request.fullchain),
        ("private_key", &request.private_key),
    ] {
        if !value.as_deref().is_some_and(|v| v.contains("-----BEGIN ")) {
            return Err(ApiError::bad_request(format!(
                "invalid {field}: a PEM document is required for a custom certificate"
            )));
        }
    }
    add(&plane, &app, &request.hostname, "custom")
}

#[utoipa::path(get, path = "/v1/apps/{app_name}/certificates/{hostname}", tag = "Certificates", operation_id = "Certificates_show",
    params(("app_name" = String, Path), ("hostname" = String, Path)), responses((status = 200, body = Certificate), ErrorAnswers))]
async fn get_certificate(
    State(plane): Plane,
    caller: Caller,
    Path((app_name, hostname)): Path<(String, String)>,
) -> ApiResult<Json<Certificate>> {
    let app = visible_app(&plane, &caller, &app_name)?;
    Ok(Json(view(&find(&plane, &app, &hostname)?)))
}

#[utoipa::path(post, path = "/v1/apps/{app_name}/certificates/{hostname}/check", tag = "Certificates", operation_id = "Certificates_check",
    params(("app_name" = String, Path), ("hostname" = String, Path)), responses((status = 200, body = Certificate), ErrorAnswers))]
async fn check_certificate(
    plane: Plane,
    caller: Caller,
    path: Path<(String, String)>,
) -> ApiResult<Json<Certificate>> {
    get_certificate(plane, caller, path).await
}

#[utoipa::path(delete, path = "/v1/apps/{app_name}/certificates/{hostname}", tag = "Certificates", operation_id = "Certificates_delete",
    params(("app_name" = String, Path), ("hostname" = String, Path)), responses((status = 200, body = Certificate), ErrorAnswers))]
async fn delete_certificate(
    State(plane): Plane,
    caller: Caller,
    Path((app_name, hostname)): Path<(String, String)>,
) -> ApiResult<Json<Certificate>> {
    let app = visible_app(&plane, &caller, &app_name)?;
    caller.require_write()?;
    let row = find(&plane, &app, &hostname)?;
    plane.store.delete_certificate(&app.id, &row.hostname)?;
    plane.catalog.app_changed(&app);
    Ok(Json(view(&row)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_under_the_base_domain_belong_to_the_app_they_name() {
        let base = "apps.example.net";
        for (hostname, owner) in [
            ("foo.apps.example.net", PlatformName::App("foo")),
            ("x.y.foo.apps.example.net", PlatformName::App("foo")),
            ("*.foo.apps.example.net", PlatformName::App("foo")),
            ("FOO.Apps.Example.NET", PlatformName::App("FOO")),
            ("apps.example.net", PlatformName::Platform),
            ("*.apps.example.net", PlatformName::Platform),
            ("www.example.net", PlatformName::Custom),
            ("fooapps.example.net", PlatformName::Custom),
            ("foo.apps.example.net.evil.com", PlatformName::Custom),
        ] {
            assert_eq!(platform_name(hostname, base), owner, "{hostname}");
        }
        assert!(may_claim("foo", "x.foo.apps.example.net", base));
        assert!(may_claim("foo", "www.example.com", base));
        assert!(!may_claim("bar", "x.foo.apps.example.net", base));
        assert!(!may_claim("bar", "*.apps.example.net", base));
    }
}
