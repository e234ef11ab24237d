//! Certificates through the API: `GET /v1/apps/{app}/certificates`, `POST …/acme` and
//! `…/custom` to add a hostname, `GET/DELETE …/{hostname}`, `POST …/{hostname}/check`.
//! This module keeps which hostnames an app serves (published on the catalog so proxies
//! route them) and the certificates themselves: those the proxies obtain from their ACME
//! CA, and custom ones imported with `…/custom`, each with its private key sealed under a
//! key the secrets vault keeps ([`crate::vault::Vault::certificate_sealing_key`]).
//!
//! For proxies (host tokens only): `GET/PUT /v1/proxy/certificates/{hostname}` (the
//! certificate with its private key, as PEM) and `PUT …/{hostname}/status` (an ACME order
//! started or failed, which `aloft certs show` reports).

use std::sync::Arc;

use aloft_api::{Certificate, CreateCertificateRequest, ListCertificatesResponse};
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use http::StatusCode;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};

use crate::ControlPlane;
use crate::api::{ErrorAnswers, JsonBody, Plane, visible_app};
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::store::{AppRow, CertificateRow, StoreError, TlsCertificateRow, now_rfc3339};

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
        .route(
            "/v1/proxy/certificates/{hostname}",
            get(proxy_get_certificate).put(proxy_put_certificate),
        )
        .route(
            "/v1/proxy/certificates/{hostname}/status",
            put(proxy_put_status),
        )
}

/// Why no certificate comes for an ACME hostname on a server without an ACME CA.
pub fn no_acme_reason(hostname: &str) -> String {
    format!(
        "no ACME certificate authority is configured on this server, so no certificate will be issued for {hostname}; import one with `aloft certs import`, or start the server with --acme-directory"
    )
}

/// The API's view of a hostname: its row, and where its certificate stands; `acme` says
/// whether this server gets certificates from an ACME CA.
fn view(row: &CertificateRow, tls: Option<&TlsCertificateRow>, acme: bool) -> Certificate {
    let issued = tls.filter(|t| !t.certificate.is_empty() && !expired(&t.not_after));
    let (status, client_status) = match (issued, tls.map(|t| t.state.as_str())) {
        (Some(_), _) => ("ready", "Ready"),
        (None, Some("issuing")) => ("issuing", "Awaiting certificates"),
        (None, Some("failed")) => ("failed", "Awaiting configuration"),
        _ => ("pending", "Awaiting configuration"),
    };
    Certificate {
        hostname: row.hostname.clone(),
        source: row.source.clone(),
        status: status.into(),
        configured: issued.is_some(),
        created_at: row.created_at.clone(),
        client_status: client_status.into(),
        certificate_authority: issued.map(|t| t.issuer.clone()),
        expires_at: issued.map(|t| t.not_after.clone()),
        error: tls
            .filter(|t| t.state == "failed" && !t.error.is_empty())
            .map(|t| t.error.clone())
            .or_else(|| {
                (issued.is_none() && !acme && row.source == "acme")
                    .then(|| no_acme_reason(&row.hostname))
            }),
    }
}

fn expired(not_after: &str) -> bool {
    chrono::DateTime::parse_from_rfc3339(not_after)
        .map(|t| t <= chrono::Utc::now())
        .unwrap_or(true)
}

fn view_of(plane: &ControlPlane, row: &CertificateRow) -> ApiResult<Certificate> {
    Ok(view(
        row,
        plane.store.tls_certificate(&row.hostname)?.as_ref(),
        plane.config.acme,
    ))
}

/// What a certificate says about itself, once checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckedCertificate {
    /// The issuer's common name (or organization).
    pub issuer: String,
    /// RFC 3339.
    pub not_after: String,
}

/// Checks a PEM chain and private key for `hostname`: every certificate parses, the leaf
/// is valid now and names the hostname (exactly, or by a `*.` wildcard one level up), and
/// the key is the leaf's. Errors name the field (`fullchain`, `private_key`) and the fix.
pub fn check_certificate_pem(
    hostname: &str,
    chain_pem: &str,
    key_pem: &str,
) -> ApiResult<CheckedCertificate> {
    let invalid_chain = |why: String| ApiError::bad_request(format!("invalid fullchain: {why}"));
    let mut chain = Vec::new();
    for cert in CertificateDer::pem_slice_iter(chain_pem.as_bytes()) {
        chain.push(
            cert.map_err(|e| invalid_chain(format!("a certificate in it is not valid PEM ({e})")))?,
        );
    }
    let leaf_der = chain.first().ok_or_else(|| {
        invalid_chain("no certificate in it; give the PEM chain, your certificate first".into())
    })?;
    for der in &chain {
        x509_parser::parse_x509_certificate(der.as_ref()).map_err(|e| {
            invalid_chain(format!("a certificate in it does not parse as X.509 ({e})"))
        })?;
    }
    let (_, leaf) = x509_parser::parse_x509_certificate(leaf_der.as_ref())
        .map_err(|e| invalid_chain(format!("the certificate does not parse ({e})")))?;
    let now = chrono::Utc::now().timestamp();
    let validity = leaf.validity();
    if validity.not_after.timestamp() <= now {
        return Err(invalid_chain(format!(
            "the certificate expired on {}; get a current one",
            validity.not_after
        )));
    }
    if validity.not_before.timestamp() > now {
        return Err(invalid_chain(format!(
            "the certificate is not valid before {}",
            validity.not_before
        )));
    }
    let names = certificate_names(&leaf);
    if !names.iter().any(|name| name_covers(name, hostname)) {
        return Err(invalid_chain(format!(
            "the certificate is for {} and does not cover {hostname}; give one whose subject alternative names include it",
            if names.is_empty() {
                "no DNS name".to_string()
            } else {
                names.join(", ")
            }
        )));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| {
        ApiError::bad_request(format!(
            "invalid private_key: no PEM private key in it ({e})"
        ))
    })?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| {
        ApiError::bad_request(format!(
            "invalid private_key: not a usable RSA, ECDSA or Ed25519 key ({e})"
        ))
    })?;
    rustls::sign::CertifiedKey::new(chain.clone(), signing)
        .keys_match()
        .map_err(|_| {
            ApiError::bad_request(
                "invalid private_key: it is not the key of the certificate (the first one in fullchain)",
            )
        })?;
    let issuer = leaf
        .issuer()
        .iter_common_name()
        .chain(leaf.issuer().iter_organization())
        .find_map(|a| a.as_str().ok().map(str::to_string))
        .unwrap_or_default();
    let not_after = chrono::DateTime::from_timestamp(validity.not_after.timestamp(), 0)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    Ok(CheckedCertificate { issuer, not_after })
}

/// The DNS names a certificate is for: its subject alternative names, else its CN.
fn certificate_names(cert: &x509_parser::certificate::X509Certificate<'_>) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let sans: Vec<String> = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::DNSName(name) => Some(name.to_ascii_lowercase()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    if !sans.is_empty() {
        return sans;
    }
    cert.subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(str::to_ascii_lowercase))
        .collect()
}

/// Whether a certificate name covers `hostname` (a `*.` wildcard covers one label).
fn name_covers(name: &str, hostname: &str) -> bool {
    let hostname = hostname.to_ascii_lowercase();
    if name == hostname {
        return true;
    }
    match (name.strip_prefix("*."), hostname.split_once('.')) {
        (Some(suffix), Some((_, rest))) => suffix == rest && !hostname.starts_with("*."),
        _ => false,
    }
}

/// Seals and opens TLS private keys for the `tls_certificates` table: XChaCha20-Poly1305
/// under the vault's certificate key, with the hostname as associated data, so a sealed key
/// copied to another hostname's row does not open.
pub struct KeySealer {
    key: Vec<u8>,
}

/// What a sealed key starts with in its column.
const SEALED_KEY_PREFIX: &[u8] = b"aloft-sealed-v1:";

fn key_aad(hostname: &str) -> Vec<u8> {
    format!("aloft/tls-private-key/v1\0{hostname}").into_bytes()
}

impl KeySealer {
    pub fn new(key: Vec<u8>) -> Self {
        Self { key }
    }

    fn of(plane: &ControlPlane) -> ApiResult<Self> {
        let key = plane.secrets.certificate_sealing_key().map_err(|err| {
            tracing::error!(error = %err, "reading the key that seals TLS private keys");
            ApiError::internal("the certificate store is unavailable")
        })?;
        Ok(Self::new(key))
    }

    pub fn seal(&self, hostname: &str, key_pem: &str) -> ApiResult<Vec<u8>> {
        let (nonce, ciphertext) =
            aloft_api::secrets::seal_raw(&self.key, &key_aad(hostname), key_pem.as_bytes())
                .map_err(|_| ApiError::internal("sealing a private key failed"))?;
        let mut stored = SEALED_KEY_PREFIX.to_vec();
        stored.push(
            u8::try_from(nonce.len())
                .map_err(|_| ApiError::internal("sealing a private key failed"))?,
        );
        stored.extend(nonce);
        stored.extend(ciphertext);
        Ok(stored)
    }

    pub fn open(&self, hostname: &str, stored: &[u8]) -> ApiResult<String> {
        let does_not_open = || {
            tracing::error!(hostname, "a stored TLS private key does not open");
            ApiError::internal(format!(
                "the private key of {hostname} does not open (was the secrets root key replaced?)"
            ))
        };
        let sealed = stored
            .strip_prefix(SEALED_KEY_PREFIX)
            .ok_or_else(does_not_open)?;
        let (&nonce_len, rest) = sealed.split_first().ok_or_else(does_not_open)?;
        let (nonce, ciphertext) = rest
            .split_at_checked(usize::from(nonce_len))
            .ok_or_else(does_not_open)?;
        let plain = aloft_api::secrets::open_raw(&self.key, &key_aad(hostname), nonce, ciphertext)
            .map_err(|_| does_not_open())?;
        String::from_utf8(plain).map_err(|_| does_not_open())
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

/// The hostname as stored, after the checks every new name gets: a domain name, and under
/// the platform's domain only the app's own names.
fn claimable(plane: &ControlPlane, app: &AppRow, hostname: &str) -> ApiResult<String> {
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
    Ok(hostname)
}

fn insert(
    plane: &ControlPlane,
    app: &AppRow,
    hostname: &str,
    source: &str,
) -> ApiResult<CertificateRow> {
    let row = CertificateRow {
        app_id: app.id.clone(),
        hostname: hostname.to_string(),
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
    Ok(row)
}

fn add(plane: &ControlPlane, app: &AppRow, hostname: &str, source: &str) -> ApiResult<Response> {
    let hostname = claimable(plane, app, hostname)?;
    let row = insert(plane, app, &hostname, source)?;
    plane.catalog.app_changed(app);
    Ok((StatusCode::CREATED, Json(view_of(plane, &row)?)).into_response())
}

#[utoipa::path(get, path = "/v1/apps/{app_name}/certificates", tag = "Certificates", operation_id = "Certificates_list",
    params(("app_name" = String, Path)), responses((status = 200, body = ListCertificatesResponse), ErrorAnswers))]
async fn list_certificates(
    State(plane): Plane,
    caller: Caller,
    Path(app_name): Path<String>,
) -> ApiResult<Json<ListCertificatesResponse>> {
    let app = visible_app(&plane, &caller, &app_name)?;
    let certificates = plane
        .store
        .certificates(Some(&app.id))?
        .iter()
        .map(|row| view_of(&plane, row))
        .collect::<ApiResult<Vec<Certificate>>>()?;
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

/// Imports a certificate of the user's own (checked: parses, valid now, names the
/// hostname, key matches) for a new hostname or one the app already has; the proxies serve
/// it from the next catalog update, and no ACME order replaces it.
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
    let mut pem = Vec::new();
    for (field, value) in [
        ("fullchain", &request.fullchain),
        ("private_key", &request.private_key),
    ] {
        match value.as_deref().filter(|v| v.contains("-----BEGIN ")) {
            Some(v) => pem.push(v),
            None => {
                return Err(ApiError::bad_request(format!(
                    "invalid {field}: a PEM document is required for a custom certificate"
                )));
            }
        }
    }
    let (chain, key) = (pem[0], pem[1]);
    let hostname = claimable(&plane, &app, &request.hostname)?;
    let checked = check_certificate_pem(&hostname, chain, key)?;
    let sealed_key = KeySealer::of(&plane)?.seal(&hostname, key)?;
    let existing = plane
        .store
        .certificates(Some(&app.id))?
        .into_iter()
        .find(|c| c.hostname == hostname);
    let row = match existing {
        Some(mut row) => {
            plane
                .store
                .set_certificate_source(&app.id, &hostname, "custom")?;
            row.source = "custom".into();
            row
        }
        None => insert(&plane, &app, &hostname, "custom")?,
    };
    plane.store.put_tls_certificate(&TlsCertificateRow {
        hostname: hostname.clone(),
        app_id: app.id.clone(),
        source: "custom".into(),
        certificate: chain.to_string(),
        sealed_key,
        issuer: checked.issuer,
        not_after: checked.not_after,
        state: "issued".into(),
        error: String::new(),
        updated_at: now_rfc3339(),
    })?;
    plane.catalog.app_changed(&app);
    Ok((StatusCode::CREATED, Json(view_of(&plane, &row)?)).into_response())
}

#[utoipa::path(get, path = "/v1/apps/{app_name}/certificates/{hostname}", tag = "Certificates", operation_id = "Certificates_show",
    params(("app_name" = String, Path), ("hostname" = String, Path)), responses((status = 200, body = Certificate), ErrorAnswers))]
async fn get_certificate(
    State(plane): Plane,
    caller: Caller,
    Path((app_name, hostname)): Path<(String, String)>,
) -> ApiResult<Json<Certificate>> {
    let app = visible_app(&plane, &caller, &app_name)?;
    Ok(Json(view_of(&plane, &find(&plane, &app, &hostname)?)?))
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
    let shown = view_of(&plane, &row)?;
    plane.store.delete_certificate(&app.id, &row.hostname)?;
    plane.catalog.app_changed(&app);
    Ok(Json(shown))
}

/// A certificate as proxies fetch and store it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ProxyCertificate {
    pub hostname: String,
    /// PEM chain, leaf first.
    pub certificate: String,
    /// PEM private key.
    pub private_key: String,
    /// `acme` or `custom` (a custom one is never replaced by an ACME order).
    #[serde(default)]
    pub source: String,
}

/// Where a proxy's ACME order for a hostname stands.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ProxyCertificateStatus {
    /// `issuing` or `failed`.
    pub state: String,
    /// Why it failed.
    #[serde(default)]
    pub error: String,
}

/// The app that serves `hostname`: `<app>.<base domain>` is the app's own; other names
/// are the apps' added hostnames.
fn app_serving(plane: &ControlPlane, hostname: &str) -> ApiResult<(String, AppRow)> {
    let name = check_hostname(hostname)?;
    let not_found = || ApiError::not_found(format!("no app serves {name}"));
    if let Some(app_name) = name
        .strip_suffix(plane.config.base_domain.trim_end_matches('.'))
        .and_then(|prefix| prefix.strip_suffix('.'))
        .filter(|prefix| !prefix.contains('.'))
        && let Some(app) = plane.store.app(app_name)?
    {
        return Ok((name, app));
    }
    let row = plane
        .store
        .certificates(None)?
        .into_iter()
        .find(|c| c.hostname == name)
        .ok_or_else(not_found)?;
    let app = plane.store.app_by_id(&row.app_id)?.ok_or_else(not_found)?;
    Ok((name, app))
}

#[utoipa::path(get, path = "/v1/proxy/certificates/{hostname}", tag = "Certificates", operation_id = "Proxy_certificate_get",
    params(("hostname" = String, Path)), responses((status = 200, body = ProxyCertificate), ErrorAnswers))]
async fn proxy_get_certificate(
    State(plane): Plane,
    caller: Caller,
    Path(hostname): Path<String>,
) -> ApiResult<Json<ProxyCertificate>> {
    caller.require_host()?;
    let (name, _) = app_serving(&plane, &hostname)?;
    let row = plane
        .store
        .tls_certificate(&name)?
        .filter(|row| !row.certificate.is_empty())
        .ok_or_else(|| ApiError::not_found(format!("no certificate stored for {name}")))?;
    let private_key = KeySealer::of(&plane)?.open(&name, &row.sealed_key)?;
    Ok(Json(ProxyCertificate {
        hostname: name,
        certificate: row.certificate,
        private_key,
        source: row.source,
    }))
}

#[utoipa::path(put, path = "/v1/proxy/certificates/{hostname}", tag = "Certificates", operation_id = "Proxy_certificate_put",
    params(("hostname" = String, Path)), request_body = ProxyCertificate, responses((status = 200, body = ProxyCertificate), ErrorAnswers))]
async fn proxy_put_certificate(
    State(plane): Plane,
    caller: Caller,
    Path(hostname): Path<String>,
    JsonBody(request): JsonBody<ProxyCertificate>,
) -> ApiResult<StatusCode> {
    caller.require_host()?;
    let (name, app) = app_serving(&plane, &hostname)?;
    if plane
        .store
        .tls_certificate(&name)?
        .is_some_and(|row| row.source == "custom")
    {
        return Err(ApiError::conflict(format!(
            "{name} has a custom certificate; remove it (aloft certs remove) before ACME may replace it"
        )));
    }
    let checked = check_certificate_pem(&name, &request.certificate, &request.private_key)?;
    let sealed_key = KeySealer::of(&plane)?.seal(&name, &request.private_key)?;
    plane.store.put_tls_certificate(&TlsCertificateRow {
        hostname: name.clone(),
        app_id: app.id.clone(),
        source: "acme".into(),
        certificate: request.certificate,
        sealed_key,
        issuer: checked.issuer,
        not_after: checked.not_after,
        state: "issued".into(),
        error: String::new(),
        updated_at: now_rfc3339(),
    })?;
    tracing::info!(hostname = %name, app = %app.name, "certificate stored");
    Ok(StatusCode::OK)
}

#[utoipa::path(put, path = "/v1/proxy/certificates/{hostname}/status", tag = "Certificates", operation_id = "Proxy_certificate_status",
    params(("hostname" = String, Path)), request_body = ProxyCertificateStatus, responses((status = 200), ErrorAnswers))]
async fn proxy_put_status(
    State(plane): Plane,
    caller: Caller,
    Path(hostname): Path<String>,
    JsonBody(request): JsonBody<ProxyCertificateStatus>,
) -> ApiResult<StatusCode> {
    caller.require_host()?;
    if !matches!(request.state.as_str(), "issuing" | "failed") {
        return Err(ApiError::bad_request(format!(
            "invalid state: {:?}; use issuing or failed",
            request.state
        )));
    }
    let (name, app) = app_serving(&plane, &hostname)?;
    let mut row = plane
        .store
        .tls_certificate(&name)?
        .unwrap_or_else(|| TlsCertificateRow {
            hostname: name.clone(),
            app_id: app.id.clone(),
            source: "acme".into(),
            certificate: String::new(),
            sealed_key: Vec::new(),
            issuer: String::new(),
            not_after: String::new(),
            state: String::new(),
            error: String::new(),
            updated_at: String::new(),
        });
    row.state = request.state;
    row.error = request.error.chars().take(2000).collect();
    row.updated_at = now_rfc3339();
    plane.store.put_tls_certificate(&row)?;
    Ok(StatusCode::OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_acme_an_acme_hostname_says_no_certificate_will_come() {
        let row = CertificateRow {
            app_id: "a1".into(),
            hostname: "www.example.com".into(),
            source: "acme".into(),
            status: "pending".into(),
            created_at: now_rfc3339(),
        };
        let shown = view(&row, None, false);
        assert_eq!(shown.status, "pending");
        let error = shown.error.expect("a reason");
        assert!(
            error.contains("no ACME certificate authority is configured on this server")
                && error.contains("aloft certs import")
                && error.contains("--acme-directory"),
            "{error}"
        );
        // With ACME, nothing has been tried yet: no error.
        assert_eq!(view(&row, None, true).error, None);
        // A custom hostname waits for its import, not for ACME.
        let custom = CertificateRow {
            source: "custom".into(),
            ..row
        };
        assert_eq!(view(&custom, None, false).error, None);
    }

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
