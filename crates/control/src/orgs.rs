//! Organizations and access tokens: `GET/POST /v1/orgs`, `GET /v1/orgs/{slug}`,
//! `GET/POST /v1/tokens`, `DELETE /v1/tokens/{id}`.
//!
//! Tokens are minted here with a root key of their own and their limits (app, read-only,
//! expiry) as caveats in the token itself, so a holder can narrow them further offline
//! (`aloft tokens attenuate`) and the server checks the whole chain on every request.

use std::sync::Arc;

use aloft_api::token::{Caveat, Token};
use aloft_api::{
    CreateOrgRequest, CreateTokenRequest, CreateTokenResponse, ListOrgsResponse,
    ListTokensResponse, OrgInfo, TokenInfo,
};
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Json, Router};
use http::StatusCode;

use crate::ControlPlane;
use crate::api::{ErrorAnswers, JsonBody, Plane, visible_app};
use crate::auth::{Caller, TokenKind};
use crate::error::{ApiError, ApiResult};
use crate::store::{OrgRow, StoreError, TokenRow, now_rfc3339, now_secs};
use crate::{DEFAULT_ORG, names};

/// flyctl's default token lifetime: 175200h (20 years).
const DEFAULT_EXPIRY_SECS: i64 = 175_200 * 3600;

pub fn routes() -> Router<Arc<ControlPlane>> {
    Router::new()
        .route("/v1/orgs", get(list_orgs).post(create_org))
        .route("/v1/orgs/{org_slug}", get(get_org))
        .route("/v1/tokens", get(list_tokens).post(create_token))
        .route("/v1/tokens/{token_id}", delete(revoke_token))
}

fn org_info(org: &OrgRow) -> OrgInfo {
    OrgInfo {
        id: org.id.clone(),
        slug: org.slug.clone(),
        name: org.name.clone(),
        kind: if org.slug == DEFAULT_ORG {
            "PERSONAL".into()
        } else {
            "SHARED".into()
        },
        created_at: org.created_at.clone(),
    }
}

fn visible_org(plane: &ControlPlane, caller: &Caller, slug: &str) -> ApiResult<OrgRow> {
    match plane.store.org_by_slug(slug)? {
        Some(org) if caller.in_org(&org.id) => Ok(org),
        _ => Err(ApiError::not_found(format!(
            "organization not found: {slug}"
        ))),
    }
}

#[utoipa::path(get, path = "/v1/orgs", tag = "Organizations", operation_id = "Orgs_list",
    responses((status = 200, body = ListOrgsResponse), ErrorAnswers))]
async fn list_orgs(State(plane): Plane, caller: Caller) -> ApiResult<Json<ListOrgsResponse>> {
    let orgs = plane
        .store
        .list_orgs()?
        .iter()
        .filter(|o| caller.in_org(&o.id))
        .map(org_info)
        .collect();
    Ok(Json(ListOrgsResponse { orgs }))
}

#[utoipa::path(get, path = "/v1/orgs/{org_slug}", tag = "Organizations", operation_id = "Orgs_show",
    params(("org_slug" = String, Path)), responses((status = 200, body = OrgInfo), ErrorAnswers))]
async fn get_org(
    State(plane): Plane,
    caller: Caller,
    Path(slug): Path<String>,
) -> ApiResult<Json<OrgInfo>> {
    Ok(Json(org_info(&visible_org(&plane, &caller, &slug)?)))
}

/// `Acme Corp` → `acme-corp`.
fn slug_from_name(name: &str) -> String {
    let mut slug = String::new();
    for c in name.trim().chars() {
        if c.is_ascii_alphanumeric() {
            slug.push(c.to_ascii_lowercase());
        } else if !slug.ends_with('-') && !slug.is_empty() {
            slug.push('-');
        }
    }
    slug.trim_end_matches('-').to_string()
}

#[utoipa::path(post, path = "/v1/orgs", tag = "Organizations", operation_id = "Orgs_create", request_body = CreateOrgRequest,
    responses((status = 201, body = OrgInfo), ErrorAnswers))]
async fn create_org(
    State(plane): Plane,
    caller: Caller,
    JsonBody(request): JsonBody<CreateOrgRequest>,
) -> ApiResult<Response> {
    caller.require_org_write()?;
    if caller.kind != TokenKind::User {
        return Err(ApiError::forbidden(
            "only a user token (the one `aloft server` saves) can create organizations; org tokens are limited to their org",
        ));
    }
    let name = request.name.trim();
    if name.is_empty() || name.len() > 100 {
        return Err(ApiError::bad_request(
            "invalid name: an organization name of 1 to 100 characters is required",
        ));
    }
    let slug = request
        .slug
        .clone()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| slug_from_name(name));
    crate::validate::org_slug(&slug)?;
    let org = OrgRow {
        id: names::random_id(12),
        slug: slug.clone(),
        name: name.to_string(),
        created_at: now_rfc3339(),
    };
    plane
        .store
        .create_org_for(&org, Some(&caller.token_id))
        .map_err(|e| match e {
            StoreError::Conflict(_) => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("organization slug {slug} is already taken"),
            ),
            other => other.into(),
        })?;
    Ok((StatusCode::CREATED, Json(org_info(&org))).into_response())
}

fn token_info(plane: &ControlPlane, row: &TokenRow) -> TokenInfo {
    let org_slug = plane
        .store
        .org_by_id(&row.org_id)
        .ok()
        .flatten()
        .map(|o| o.slug)
        .unwrap_or_default();
    TokenInfo {
        id: row.id.clone(),
        name: row.name.clone(),
        kind: row.kind.clone(),
        org_slug,
        apps: row.apps.clone(),
        created_at: row.created_at.clone(),
        expires_at: row
            .expires_at
            .and_then(|t| chrono::DateTime::from_timestamp(t, 0))
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
        revoked: row.revoked,
    }
}

/// Whether `caller` may see and revoke `row`: tokens of its orgs, never a wider one than
/// its own. Host tokens are nobody's to manage and manage none; a user token (the
/// operator's, a member of several orgs) is seen only by a user token.
fn manages_token(caller: &Caller, row: &TokenRow) -> bool {
    if caller.is_host() {
        return false;
    }
    match TokenKind::parse(&row.kind) {
        None | Some(TokenKind::Host) => false,
        Some(TokenKind::User) => caller.kind == TokenKind::User && caller.in_org(&row.org_id),
        Some(_) => caller.in_org(&row.org_id),
    }
}

#[utoipa::path(get, path = "/v1/tokens", tag = "Tokens", operation_id = "Tokens_list",
    responses((status = 200, body = ListTokensResponse), ErrorAnswers))]
async fn list_tokens(State(plane): Plane, caller: Caller) -> ApiResult<Json<ListTokensResponse>> {
    caller.require_org_write()?;
    let mut tokens = Vec::new();
    for org in &caller.org_ids {
        tokens.extend(
            plane
                .store
                .list_tokens(org)?
                .iter()
                .filter(|t| manages_token(&caller, t))
                .map(|t| token_info(&plane, t)),
        );
    }
    Ok(Json(ListTokensResponse { tokens }))
}

#[utoipa::path(post, path = "/v1/tokens", tag = "Tokens", operation_id = "Tokens_create", request_body = CreateTokenRequest,
    responses((status = 201, body = CreateTokenResponse), ErrorAnswers))]
async fn create_token(
    State(plane): Plane,
    caller: Caller,
    JsonBody(request): JsonBody<CreateTokenRequest>,
) -> ApiResult<Response> {
    caller.require_org_write()?;
    if request.kind == "host" {
        let (row, token) = crate::host_api::mint_join_token(&plane, &caller, request.name.clone())?;
        return Ok((
            StatusCode::CREATED,
            Json(CreateTokenResponse {
                info: token_info(&plane, &row),
                token,
            }),
        )
            .into_response());
    }
    let kind = match request.kind.as_str() {
        "org" => TokenKind::Org,
        "deploy" => TokenKind::Deploy,
        "readonly" => TokenKind::ReadOnly,
        other => {
            return Err(ApiError::bad_request(format!(
                "invalid type: {other:?} must be org, deploy, readonly or host"
            )));
        }
    };
    let mut caveats = Vec::new();
    let mut apps = Vec::new();
    let org = match (kind, request.app_name.as_deref().filter(|a| !a.is_empty())) {
        (TokenKind::Deploy, None) => {
            return Err(ApiError::bad_request(
                "invalid app_name: a deploy token is for one app; pass its name",
            ));
        }
        (_, Some(app_name)) => {
            let app = visible_app(&plane, &caller, app_name)?;
            if let Some(slug) = request
                .org_slug
                .as_deref()
                .filter(|s| !s.is_empty() && *s != app.org_slug)
            {
                return Err(ApiError::bad_request(format!(
                    "invalid org_slug: app {app_name} belongs to {}, not {slug}",
                    app.org_slug
                )));
            }
            apps.push(app.name.clone());
            caveats.push(Caveat::Apps(vec![app.name.clone()]));
            plane.store.org_by_id(&app.org_id)?.ok_or_else(|| {
                ApiError::not_found(format!("organization of app {app_name} not found"))
            })?
        }
        (_, None) => match request.org_slug.as_deref().filter(|s| !s.is_empty()) {
            Some(slug) => visible_org(&plane, &caller, slug)?,
            None => plane
                .store
                .org_by_id(&caller.org_id)?
                .ok_or_else(|| ApiError::not_found("organization not found"))?,
        },
    };
    if kind == TokenKind::ReadOnly {
        caveats.push(Caveat::ReadOnly);
    }
    let lifetime = match request.expiry.as_deref().filter(|e| !e.is_empty()) {
        None => DEFAULT_EXPIRY_SECS,
        Some(text) => {
            let duration = aloft_api::Duration::parse(text)
                .map_err(|e| ApiError::bad_request(format!("invalid expiry: {e}")))?;
            if duration.as_secs() <= 0 {
                return Err(ApiError::bad_request(format!(
                    "invalid expiry: {text:?} must be positive, such as 1h or 720h"
                )));
            }
            duration.as_secs()
        }
    };
    // A token never outlives the one that made it.
    let mut expires_at = now_secs().saturating_add(lifetime);
    if let Some(limit) = caller.expires_at {
        expires_at = expires_at.min(limit);
    }
    caveats.push(Caveat::ExpiresAt(expires_at));
    let (row, root_key) = plane.token_keys.new_row(
        org.id.clone(),
        kind,
        request.name.clone(),
        format!("{} token", kind.as_str()),
    )?;
    let row = TokenRow {
        expires_at: Some(expires_at),
        apps,
        ..row
    };
    plane.store.insert_token(&row)?;
    let token = Token::mint(&row.id, &root_key, caveats).encode();
    Ok((
        StatusCode::CREATED,
        Json(CreateTokenResponse {
            info: token_info(&plane, &row),
            token,
        }),
    )
        .into_response())
}

#[utoipa::path(delete, path = "/v1/tokens/{token_id}", tag = "Tokens", operation_id = "Tokens_revoke",
    params(("token_id" = String, Path)), responses((status = 200, body = TokenInfo), ErrorAnswers))]
async fn revoke_token(
    State(plane): Plane,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<TokenInfo>> {
    caller.require_org_write()?;
    let row = match plane.store.token(&id)? {
        Some(row) if manages_token(&caller, &row) => row,
        _ => return Err(ApiError::not_found(format!("token not found: {id}"))),
    };
    plane.store.revoke_token(&row.id)?;
    let row = plane.store.token(&row.id)?.unwrap_or(row);
    Ok(Json(token_info(&plane, &row)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs_come_from_names() {
        assert_eq!(slug_from_name("Acme Corp"), "acme-corp");
        assert_eq!(slug_from_name("  R&D -- Team "), "r-d-team");
    }
}
