//! App secrets through the API: names and digests only. Values are accepted on set and
//! reduced to a digest here; storing them (envelope-encrypted) for machines to use is the
//! secrets store's job, not this module's.

use std::sync::Arc;

use aloft_api::{AppSecret, ListSecretsResponse, SetSecretRequest, SetSecretsRequest};
use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use sha2::{Digest, Sha256};

use crate::ControlPlane;
use crate::api::{ErrorAnswers, JsonBody, Plane, visible_app};
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::store::AppRow;

const MAX_SECRET_BYTES: usize = 64 * 1024;

pub fn routes() -> Router<Arc<ControlPlane>> {
    Router::new()
        .route(
            "/v1/apps/{app_name}/secrets",
            get(list_secrets).post(set_secrets),
        )
        .route(
            "/v1/apps/{app_name}/secrets/{secret_name}",
            post(set_secret).delete(unset_secret),
        )
}

/// Fly shows the first 16 hex digits of the value's SHA-256.
pub fn digest(value: &str) -> String {
    hex::encode(Sha256::digest(value.as_bytes()))[..16].to_string()
}

/// Secret names are environment variable names.
fn check_name(name: &str) -> ApiResult<()> {
    let valid = !name.is_empty()
        && name.len() <= 256
        && !name.as_bytes()[0].is_ascii_digit()
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !valid {
        return Err(ApiError::bad_request(format!(
            "invalid secret name {name:?}: use letters, digits and '_', not starting with a digit"
        )));
    }
    Ok(())
}

fn listing(plane: &ControlPlane, app: &AppRow) -> ApiResult<ListSecretsResponse> {
    let (rows, version) = plane.store.secrets(&app.id)?;
    let secrets = rows
        .into_iter()
        .map(|s| AppSecret {
            name: s.name,
            digest: s.digest,
            created_at: s.created_at,
            updated_at: s.updated_at,
        })
        .collect();
    Ok(ListSecretsResponse { secrets, version })
}

#[utoipa::path(get, path = "/v1/apps/{app_name}/secrets", tag = "Secrets", operation_id = "Secrets_list",
    params(("app_name" = String, Path)), responses((status = 200, body = ListSecretsResponse), ErrorAnswers))]
async fn list_secrets(
    State(plane): Plane,
    caller: Caller,
    Path(app_name): Path<String>,
) -> ApiResult<Json<ListSecretsResponse>> {
    let app = visible_app(&plane, &caller, &app_name)?;
    Ok(Json(listing(&plane, &app)?))
}

#[utoipa::path(post, path = "/v1/apps/{app_name}/secrets", tag = "Secrets", operation_id = "Secrets_set",
    params(("app_name" = String, Path)), request_body = SetSecretsRequest, responses((status = 200, body = ListSecretsResponse), ErrorAnswers))]
async fn set_secrets(
    State(plane): Plane,
    caller: Caller,
    Path(app_name): Path<String>,
    JsonBody(request): JsonBody<SetSecretsRequest>,
) -> ApiResult<Json<ListSecretsResponse>> {
    let app = visible_app(&plane, &caller, &app_name)?;
    caller.require_write()?;
    if request.values.is_empty() {
        return Err(ApiError::bad_request(
            "invalid values: name at least one secret to set (a value) or unset (null)",
        ));
    }
    let mut changes = Vec::new();
    for (name, value) in &request.values {
        check_name(name)?;
        if value.as_ref().is_some_and(|v| v.len() > MAX_SECRET_BYTES) {
            return Err(ApiError::bad_request(format!(
                "invalid values.{name}: a secret is at most {MAX_SECRET_BYTES} bytes"
            )));
        }
        changes.push((name.clone(), value.as_deref().map(digest)));
    }
    plane.store.change_secrets(&app.id, &changes)?;
    Ok(Json(listing(&plane, &app)?))
}

#[utoipa::path(post, path = "/v1/apps/{app_name}/secrets/{secret_name}", tag = "Secrets", operation_id = "Secrets_set_one",
    params(("app_name" = String, Path), ("secret_name" = String, Path)), request_body = SetSecretRequest,
    responses((status = 200, body = AppSecret), ErrorAnswers))]
async fn set_secret(
    State(plane): Plane,
    caller: Caller,
    Path((app_name, name)): Path<(String, String)>,
    JsonBody(request): JsonBody<SetSecretRequest>,
) -> ApiResult<Json<AppSecret>> {
    let app = visible_app(&plane, &caller, &app_name)?;
    caller.require_write()?;
    check_name(&name)?;
    if request.value.len() > MAX_SECRET_BYTES {
        return Err(ApiError::bad_request(format!(
            "invalid value: a secret is at most {MAX_SECRET_BYTES} bytes"
        )));
    }
    plane
        .store
        .change_secrets(&app.id, &[(name.clone(), Some(digest(&request.value)))])?;
    listing(&plane, &app)?
        .secrets
        .into_iter()
        .find(|s| s.name == name)
        .map(Json)
        .ok_or_else(|| ApiError::internal("the secret vanished"))
}

#[utoipa::path(delete, path = "/v1/apps/{app_name}/secrets/{secret_name}", tag = "Secrets", operation_id = "Secrets_unset",
    params(("app_name" = String, Path), ("secret_name" = String, Path)), responses((status = 200, body = ListSecretsResponse), ErrorAnswers))]
async fn unset_secret(
    State(plane): Plane,
    caller: Caller,
    Path((app_name, name)): Path<(String, String)>,
) -> ApiResult<Json<ListSecretsResponse>> {
    let app = visible_app(&plane, &caller, &app_name)?;
    caller.require_write()?;
    if !listing(&plane, &app)?
        .secrets
        .iter()
        .any(|s| s.name == name)
    {
        return Err(ApiError::not_found(format!("secret not found: {name}")));
    }
    plane.store.change_secrets(&app.id, &[(name, None)])?;
    Ok(Json(listing(&plane, &app)?))
}
