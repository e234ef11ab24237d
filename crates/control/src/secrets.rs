//! App secrets through the API (names and digests only, never values), their rollout, and
//! the internal endpoints an agent fetches them from when it starts a machine. Storage and
//! keys are the vault's ([`crate::vault`], whose doc describes the key path).
//!
//! - `GET /v1/apps/{app}/secrets`: names, digests, times and deployment status.
//! - `POST /v1/apps/{app}/secrets` `{values: {NAME: value | null}}`: sets and unsets as one
//!   batch, all or nothing. Only stores (what `--stage` does); machines get the values when
//!   they next start.
//! - `POST /v1/apps/{app}/secrets/{name}` `{value}`, `DELETE /v1/apps/{app}/secrets/{name}`.
//! - `POST /v1/apps/{app}/secrets:deploy`: rolls the stored secrets out to every machine as
//!   a new release of the current config and image, through the deploy path (NDJSON
//!   [`DeployEvent`]s, like `/deploys`): recorded as a deploy, so it goes on after a
//!   restart of the server and `aloft deploy --resume` follows it. (An app whose machines
//!   were made without a release has its machines updated one by one instead, in memory.)
//! - `GET /v1/hosts/{host}/secrets-key` and `GET /v1/hosts/{host}/machines/{id}/secrets`:
//!   that host's own token only; the second answers only for a live machine placed on it.
//! - `POST /v1/secrets/rotate-key`: re-seals every app's data key under a new root key
//!   (the operator's admin token only; the root key is the whole platform's).
//!
//! Setting and listing need deploy rights on the app: a read-only token gets 403, a token
//! for other apps (or another org) 404, as for every app route; a host token 403.

use std::collections::BTreeMap;
use std::sync::Arc;

use aloft_api::MachineState;
use aloft_api::internal::{DeployEvent, DeployRequest};
use aloft_api::secrets::{
    AppSecret, HostSecretsKey, ListSecretsResponse, MachineSecrets, RotateKeyResponse,
    STATUS_DEPLOYED, STATUS_PARTIAL, STATUS_STAGED, SetSecretRequest, SetSecretsRequest,
    encode_key,
};
use axum::extract::{Path, State};
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};

use crate::ControlPlane;
use crate::api::{ErrorAnswers, JsonBody, visible_app};
use crate::auth::Caller;
use crate::deploy::{self, Progress};
use crate::error::{ApiError, ApiResult};
use crate::store::AppRow;
use crate::vault::{AppRef, Change, SecretInfo, VaultError};

/// Longest secret name.
pub const MAX_NAME_BYTES: usize = 256;
/// Largest value of one secret.
pub const MAX_VALUE_BYTES: usize = 64 * 1024;
/// Largest total of an app's secret names and values: they all go into the environment
/// of every process the machine starts, which the kernel limits to a few MiB.
pub const MAX_APP_BYTES: usize = 1024 * 1024;
/// Most secrets one app may have.
pub const MAX_SECRETS_PER_APP: usize = 1000;

type Plane = State<Arc<ControlPlane>>;

pub fn routes() -> Router<Arc<ControlPlane>> {
    Router::new()
        .route(
            "/v1/apps/{app}/secrets",
            get(list_secrets).post(set_secrets),
        )
        .route(
            "/v1/apps/{app}/secrets/{name}",
            post(set_secret).delete(unset_secret),
        )
        .route("/v1/apps/{app}/secrets:deploy", post(deploy_secrets))
        .route("/v1/hosts/{host}/secrets-key", get(host_secrets_key))
        .route(
            "/v1/hosts/{host}/machines/{id}/secrets",
            get(machine_secrets),
        )
        .route("/v1/secrets/rotate-key", post(rotate_root_key))
}

impl From<VaultError> for ApiError {
    fn from(err: VaultError) -> Self {
        tracing::error!(error = %err, "secrets vault failure");
        ApiError::internal(err.to_string())
    }
}

fn app_ref(app: &AppRow) -> AppRef<'_> {
    AppRef {
        id: &app.id,
        name: &app.name,
    }
}

/// Why `name` cannot be a secret's name, if it cannot.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("a secret needs a name (NAME=VALUE)".into());
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(format!(
            "secret name {}... is {} bytes long; names are at most {MAX_NAME_BYTES}",
            name.chars().take(32).collect::<String>(),
            name.len()
        ));
    }
    let bytes = name.as_bytes();
    let valid = !bytes[0].is_ascii_digit()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'_');
    if !valid {
        return Err(format!(
            "secret name {name:?} is not a valid environment variable name: use letters, digits and '_', not starting with a digit"
        ));
    }
    if name.to_ascii_uppercase().starts_with("FLY_") {
        return Err(format!(
            "secret name {name:?} starts with FLY_, which is reserved for the platform's own variables"
        ));
    }
    Ok(())
}

/// Why `value` cannot be the value of secret `name`, if it cannot.
pub fn check_value(name: &str, value: &str) -> Result<(), String> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(format!(
            "secret {name} is {} bytes; a secret's value is at most {MAX_VALUE_BYTES} bytes (keep large files out of secrets)",
            value.len()
        ));
    }
    if value.contains('\0') {
        return Err(format!(
            "secret {name} contains a NUL byte, which an environment variable cannot hold; base64 it and use [[files]] secret_name"
        ));
    }
    Ok(())
}

/// Checks a whole batch against the app's current secrets; the first bad entry fails it.
pub fn validate_batch(
    current: &[SecretInfo],
    values: &BTreeMap<String, Option<String>>,
) -> ApiResult<Vec<(String, Change)>> {
    if values.is_empty() {
        return Err(ApiError::bad_request(
            "no secrets given: pass at least one NAME=VALUE to set (or NAME to unset)",
        ));
    }
    let mut sizes: BTreeMap<&str, usize> = current
        .iter()
        .map(|s| (s.name.as_str(), s.name.len() + s.size))
        .collect();
    let mut changes = Vec::with_capacity(values.len());
    for (name, value) in values {
        check_name(name).map_err(ApiError::bad_request)?;
        match value {
            Some(value) => {
                check_value(name, value).map_err(ApiError::bad_request)?;
                sizes.insert(name, name.len() + value.len());
                changes.push((name.clone(), Change::Set(value.clone())));
            }
            None => {
                if sizes.remove(name.as_str()).is_none() {
                    return Err(ApiError::not_found(format!(
                        "secret {name} is not set, so it cannot be unset"
                    )));
                }
                changes.push((name.clone(), Change::Unset));
            }
        }
    }
    if sizes.len() > MAX_SECRETS_PER_APP {
        return Err(ApiError::bad_request(format!(
            "an app has at most {MAX_SECRETS_PER_APP} secrets; this would make {}",
            sizes.len()
        )));
    }
    let total: usize = sizes.values().sum();
    if total > MAX_APP_BYTES {
        return Err(ApiError::bad_request(format!(
            "the app's secrets would total {total} bytes; at most {MAX_APP_BYTES} fit the environment of a machine"
        )));
    }
    Ok(changes)
}

/// The app's secrets with each one's deployment status: `Deployed` when every live
/// machine last started with this value, `Staged` when none did, `Partial` in between.
pub fn listing(plane: &ControlPlane, app: &AppRow) -> ApiResult<ListSecretsResponse> {
    let (infos, version) = plane.secrets.list(&app.id)?;
    let machines: Vec<String> = plane
        .store
        .list_machines(&app.id, false)?
        .into_iter()
        .filter(|m| m.state != MachineState::Destroyed)
        .map(|m| m.id)
        .collect();
    let delivered = plane.secrets.delivered_versions(&app.id)?;
    let secrets = infos
        .into_iter()
        .map(|info| {
            let have = machines
                .iter()
                .filter(|id| delivered.get(*id).is_some_and(|v| *v >= info.version))
                .count();
            let status = if have == 0 {
                STATUS_STAGED
            } else if have == machines.len() {
                STATUS_DEPLOYED
            } else {
                STATUS_PARTIAL
            };
            AppSecret {
                name: info.name,
                digest: info.digest,
                created_at: info.created_at,
                updated_at: info.updated_at,
                status: status.to_string(),
            }
        })
        .collect();
    Ok(ListSecretsResponse { secrets, version })
}

/// Finds the app for a caller with deploy rights on it.
fn app_for_deployer(plane: &ControlPlane, caller: &Caller, name: &str) -> ApiResult<AppRow> {
    if caller.is_host() {
        // A host gets secrets only for machines placed on it (`/v1/hosts/...`).
        return Err(ApiError::forbidden(
            "host tokens cannot list or change an app's secrets",
        ));
    }
    let app = visible_app(plane, caller, name)?;
    caller.require_write()?;
    Ok(app)
}

#[utoipa::path(get, path = "/v1/apps/{app_name}/secrets", tag = "Secrets", operation_id = "Secrets_list",
    params(("app_name" = String, Path)), responses((status = 200, body = ListSecretsResponse), ErrorAnswers))]
async fn list_secrets(
    State(plane): Plane,
    caller: Caller,
    Path(app): Path<String>,
) -> ApiResult<Json<ListSecretsResponse>> {
    let app = app_for_deployer(&plane, &caller, &app)?;
    Ok(Json(listing(&plane, &app)?))
}

fn apply(
    plane: &ControlPlane,
    app: &AppRow,
    values: &BTreeMap<String, Option<String>>,
) -> ApiResult<()> {
    let (current, _) = plane.secrets.list(&app.id)?;
    let changes = validate_batch(&current, values)?;
    let version = plane.secrets.change(app_ref(app), &changes)?;
    tracing::info!(app = %app.name, version, names = ?values.keys().collect::<Vec<_>>(), "secrets changed");
    Ok(())
}

#[utoipa::path(post, path = "/v1/apps/{app_name}/secrets", tag = "Secrets", operation_id = "Secrets_set",
    params(("app_name" = String, Path)), request_body = SetSecretsRequest, responses((status = 200, body = ListSecretsResponse), ErrorAnswers))]
async fn set_secrets(
    State(plane): Plane,
    caller: Caller,
    Path(app): Path<String>,
    JsonBody(request): JsonBody<SetSecretsRequest>,
) -> ApiResult<Json<ListSecretsResponse>> {
    let app = app_for_deployer(&plane, &caller, &app)?;
    apply(&plane, &app, &request.values)?;
    Ok(Json(listing(&plane, &app)?))
}

#[utoipa::path(post, path = "/v1/apps/{app_name}/secrets/{secret_name}", tag = "Secrets", operation_id = "Secrets_set_one",
    params(("app_name" = String, Path), ("secret_name" = String, Path)), request_body = SetSecretRequest,
    responses((status = 200, body = AppSecret), ErrorAnswers))]
async fn set_secret(
    State(plane): Plane,
    caller: Caller,
    Path((app, name)): Path<(String, String)>,
    JsonBody(request): JsonBody<SetSecretRequest>,
) -> ApiResult<Json<AppSecret>> {
    let app = app_for_deployer(&plane, &caller, &app)?;
    apply(
        &plane,
        &app,
        &BTreeMap::from([(name.clone(), Some(request.value))]),
    )?;
    listing(&plane, &app)?
        .secrets
        .into_iter()
        .find(|s| s.name == name)
        .map(Json)
        .ok_or_else(|| ApiError::internal(format!("secret {name} was stored but is not listed")))
}

#[utoipa::path(delete, path = "/v1/apps/{app_name}/secrets/{secret_name}", tag = "Secrets", operation_id = "Secrets_unset",
    params(("app_name" = String, Path), ("secret_name" = String, Path)), responses((status = 200, body = ListSecretsResponse), ErrorAnswers))]
async fn unset_secret(
    State(plane): Plane,
    caller: Caller,
    Path((app, name)): Path<(String, String)>,
) -> ApiResult<Json<ListSecretsResponse>> {
    let app = app_for_deployer(&plane, &caller, &app)?;
    apply(&plane, &app, &BTreeMap::from([(name, None)]))?;
    Ok(Json(listing(&plane, &app)?))
}

async fn deploy_secrets(
    State(plane): Plane,
    caller: Caller,
    Path(app): Path<String>,
) -> ApiResult<Response> {
    let app = app_for_deployer(&plane, &caller, &app)?;
    let user = plane
        .store
        .token(&caller.token_id)?
        .map(|t| t.name)
        .unwrap_or_default();
    let Some(release) = plane.store.releases(&app.id, 1)?.into_iter().next() else {
        // Machines made without a release: each is updated with its own config.
        let operation = plane.deploys.begin(&app.name);
        operation.emit(DeployEvent::Started {
            deploy_id: operation.id.clone(),
        });
        let response = deploy::ndjson_response(&operation);
        tokio::spawn(update_without_release(
            plane.clone(),
            app,
            Progress::new(operation),
        ));
        return Ok(response);
    };
    // A new release of the current config and image through the deploy path, recorded
    // like any deploy, so it goes on after a restart of the server.
    let config = serde_json::from_str::<serde_json::Value>(&release.config).map_err(|err| {
        ApiError::internal(format!(
            "release v{} has an unreadable config: {err}",
            release.version
        ))
    })?;
    let request = DeployRequest {
        config,
        image: release.image,
        description: Some(deploy::SECRETS_DESCRIPTION.into()),
        ..Default::default()
    };
    let operation =
        plane
            .deploys
            .begin_deploy(&plane.store, &plane.node_id, &app, &request, &user)?;
    operation.emit(DeployEvent::Started {
        deploy_id: operation.id.clone(),
    });
    let response = deploy::ndjson_response(&operation);
    let progress = Progress::new(operation.clone());
    let work = {
        let plane = plane.clone();
        async move {
            progress
                .say(format!(
                    "Rolling out secrets with the config and image of release v{}",
                    release.version
                ))
                .await;
            deploy::run(plane, app, request, caller, user, progress).await;
        }
    };
    tokio::spawn(deploy::run_held(plane, operation, work));
    Ok(response)
}

fn failed(message: impl Into<String>) -> DeployEvent {
    DeployEvent::Error {
        message: message.into(),
        failure: None,
    }
}

/// Rolls the app's current secrets out to machines made without a release, one by one
/// with their own config.
async fn update_without_release(plane: Arc<ControlPlane>, app: AppRow, progress: Progress) {
    let lock = plane.app_lock(&app.name);
    let _guard = lock.lock().await;
    match update_each_machine(&plane, &app, &progress).await {
        Ok(()) => progress.emit(DeployEvent::Done {
            release_version: 0,
            url: None,
        }),
        Err(err) => progress.emit(failed(err.message)),
    }
}

async fn update_each_machine(
    plane: &ControlPlane,
    app: &AppRow,
    progress: &Progress,
) -> ApiResult<()> {
    let machines = plane.store.list_machines(&app.id, false)?;
    if machines.is_empty() {
        progress
            .say(format!(
                "{} has no machines yet; its first deploy starts them with these secrets",
                app.name
            ))
            .await;
        return Ok(());
    }
    for machine in machines {
        progress
            .say(format!(
                "Updating machine {} with the new secrets",
                machine.id
            ))
            .await;
        let was_running = matches!(
            machine.state,
            MachineState::Started | MachineState::Starting
        );
        let updated = plane
            .update_machine(app, &machine, machine.config.clone())
            .await?;
        if was_running && updated.state != MachineState::Started {
            return Err(ApiError::unavailable(format!(
                "machine {} is {} instead of started after the update: {}",
                updated.id,
                updated.state,
                plane.failure_reason(&updated.id)
            )));
        }
    }
    Ok(())
}

async fn host_secrets_key(
    State(plane): Plane,
    caller: Caller,
    Path(host): Path<String>,
) -> ApiResult<Json<HostSecretsKey>> {
    caller.require_host_itself(&host)?;
    if !plane.store.hosts()?.iter().any(|h| h.id == host) {
        return Err(ApiError::not_found(format!(
            "host {host} is not registered"
        )));
    }
    Ok(Json(HostSecretsKey {
        key: encode_key(&plane.secrets.host_key(&host)),
    }))
}

async fn machine_secrets(
    State(plane): Plane,
    caller: Caller,
    Path((host, id)): Path<(String, String)>,
) -> ApiResult<Json<MachineSecrets>> {
    caller.require_host_itself(&host)?;
    let machine = match plane.store.machine(&id)? {
        Some(machine) if machine.state != MachineState::Destroyed => machine,
        _ => return Err(ApiError::not_found(format!("machine not found: {id}"))),
    };
    if machine.host_id != host {
        return Err(ApiError::forbidden(&format!(
            "machine {id} is not placed on host {host}"
        )));
    }
    let bundle = plane.secrets.machine_secrets(
        AppRef {
            id: &machine.app_id,
            name: &machine.app_name,
        },
        &host,
        &machine.id,
    )?;
    Ok(Json(bundle))
}

/// Platform-wide operations on secrets are the operator's: the admin token `aloft server`
/// made on first start, without caveats.
fn require_operator(plane: &ControlPlane, caller: &Caller) -> ApiResult<()> {
    let admin = plane.store.setting(crate::SETTING_ADMIN_TOKEN_ID)?;
    if caller.is_host() || admin.as_deref() != Some(caller.token_id.as_str()) {
        return Err(ApiError::forbidden(
            "rotating the secrets root key needs the platform operator's admin token (the one `aloft server` wrote to its config)",
        ));
    }
    caller.require_org_write()
}

async fn rotate_root_key(
    State(plane): Plane,
    caller: Caller,
) -> ApiResult<Json<RotateKeyResponse>> {
    require_operator(&plane, &caller)?;
    let vault = plane.secrets.clone();
    let rotation = tokio::task::spawn_blocking(move || vault.rotate_root_key())
        .await
        .map_err(|e| ApiError::internal(format!("the rotation stopped: {e}")))?
        .map_err(|err| match err {
            VaultError::RootKeyNotReplaceable => ApiError::conflict(err.to_string()),
            other => other.into(),
        })?;
    tracing::info!(
        data_keys = rotation.data_keys,
        key_file = %rotation.key_file.display(),
        "secrets root key rotated"
    );
    Ok(Json(RotateKeyResponse {
        // Apps' keys: the one sealing token root keys (always there) is re-sealed too.
        data_keys: rotation.data_keys.saturating_sub(1) as u64,
        key_file: rotation.key_file.display().to_string(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(name: &str, size: usize) -> SecretInfo {
        SecretInfo {
            name: name.into(),
            digest: String::new(),
            version: 1,
            size,
            created_at: String::new(),
            updated_at: String::new(),
        }
    }

    fn batch(pairs: &[(&str, Option<&str>)]) -> BTreeMap<String, Option<String>> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.map(str::to_string)))
            .collect()
    }

    #[test]
    fn names_are_environment_variable_names_outside_fly() {
        assert!(check_name("DATABASE_URL").is_ok());
        assert!(check_name("_x9").is_ok());
        assert!(check_name("lower_case").is_ok());
        for bad in ["", "9LIVES", "A-B", "A B", "A=B", "ÄB"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        let err = check_name("FLY_REGION").unwrap_err();
        assert!(err.contains("reserved"), "{err}");
        assert!(check_name("fly_x").is_err());
        assert!(check_name(&"A".repeat(MAX_NAME_BYTES)).is_ok());
        assert!(check_name(&"A".repeat(MAX_NAME_BYTES + 1)).is_err());
    }

    #[test]
    fn a_bad_entry_fails_the_whole_batch_and_is_named() {
        let err = validate_batch(&[], &batch(&[("GOOD", Some("1")), ("BAD-NAME", Some("2"))]))
            .unwrap_err();
        assert_eq!(err.status, http::StatusCode::BAD_REQUEST);
        assert!(err.message.contains("\"BAD-NAME\""), "{}", err.message);

        let big = "x".repeat(MAX_VALUE_BYTES + 1);
        let err = validate_batch(&[], &batch(&[("BIG", Some(&big))])).unwrap_err();
        assert!(
            err.message.starts_with("secret BIG is 65537 bytes"),
            "{}",
            err.message
        );

        let err = validate_batch(&[], &batch(&[("NUL", Some("a\0b"))])).unwrap_err();
        assert!(
            err.message.contains("secret NUL contains a NUL byte"),
            "{}",
            err.message
        );

        let err = validate_batch(&[info("A", 1)], &batch(&[("MISSING", None)])).unwrap_err();
        assert_eq!(err.status, http::StatusCode::NOT_FOUND);
        assert!(err.message.contains("MISSING"), "{}", err.message);

        assert!(validate_batch(&[], &BTreeMap::new()).is_err());
        let changes =
            validate_batch(&[info("A", 1)], &batch(&[("A", None), ("B", Some(""))])).unwrap();
        assert_eq!(
            changes,
            vec![
                ("A".to_string(), Change::Unset),
                ("B".to_string(), Change::Set(String::new()))
            ]
        );
    }

    #[test]
    fn app_totals_are_bounded() {
        let value = "v".repeat(MAX_VALUE_BYTES);
        let current: Vec<SecretInfo> = (0..15)
            .map(|i| info(&format!("S{i}"), MAX_VALUE_BYTES))
            .collect();
        assert!(validate_batch(&current, &batch(&[("S0", Some(&value))])).is_ok());
        let err = validate_batch(&current, &batch(&[("MORE", Some(&value))])).unwrap_err();
        assert!(err.message.contains("would total"), "{}", err.message);
        // Replacing a big secret with a small one frees its space.
        let mut changes = batch(&[("S0", Some("small"))]);
        changes.insert("MORE".into(), Some(value.clone()));
        assert!(validate_batch(&current, &changes).is_ok());
    }
}
