//! Scaling on the server: `POST /v1/apps/{app}/scale/count` (clone or destroy machines of a
//! process group, new ones out of routing until healthy, all or nothing) and
//! `POST /v1/apps/{app}/scale/vm` (new guest size, rolled out like a deploy). Both answer
//! with the deploy event stream and run whatever the client does.

use std::collections::BTreeMap;
use std::sync::Arc;

use aloft_api::internal::DeployEvent;
use aloft_api::{MachineConfig, MachineGuest, MachineState};
use axum::Router;
use axum::extract::{Path, State};
use axum::response::Response;
use axum::routing::post;
use futures_util::future::join_all;
use serde::{Deserialize, Serialize};

use crate::ControlPlane;
use crate::api::{JsonBody, visible_app};
use crate::auth::Caller;
use crate::deploy::{DeployError, Deployer, Progress, RolloutSettings, ndjson_response};
use crate::error::{ApiError, ApiResult};
use crate::rollout::{self, group_of};
use crate::store::{AppRow, MachineRow};

pub fn routes() -> Router<Arc<ControlPlane>> {
    Router::new()
        .route("/v1/apps/{app}/scale/count", post(scale_count))
        .route("/v1/apps/{app}/scale/vm", post(scale_vm))
        .route("/v1/platform/regions", axum::routing::get(platform_regions))
}

/// A region machines can be placed in (one with hosts).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PlatformRegion {
    pub code: String,
    pub name: String,
    pub hosts: usize,
}

/// `GET /v1/platform/regions`: the regions that have hosts, the control plane's own first.
async fn platform_regions(
    State(plane): Plane,
    _caller: Caller,
) -> ApiResult<axum::Json<Vec<PlatformRegion>>> {
    Ok(axum::Json(region_list(&plane)?))
}

/// The regions that have hosts, the control plane's own first.
pub fn region_list(plane: &ControlPlane) -> ApiResult<Vec<PlatformRegion>> {
    let mut regions: BTreeMap<String, usize> = BTreeMap::new();
    for host in plane.store.hosts()? {
        *regions.entry(host.region).or_default() += 1;
    }
    let mut list: Vec<PlatformRegion> = regions
        .into_iter()
        .map(|(code, hosts)| PlatformRegion {
            name: aloft_api::regions::find(&code)
                .map(|r| r.name.to_string())
                .unwrap_or_else(|| code.clone()),
            code,
            hosts,
        })
        .collect();
    list.sort_by_key(|r| r.code != plane.config.region);
    Ok(list)
}

type Plane = State<Arc<ControlPlane>>;

/// `POST /v1/apps/{app}/scale/count`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ScaleCountRequest {
    /// Process group (default `app`).
    #[serde(default)]
    pub group: Option<String>,
    pub count: usize,
    /// Only machines in this region are counted, created and destroyed.
    #[serde(default)]
    pub region: Option<String>,
}

/// `POST /v1/apps/{app}/scale/vm`: a preset size and/or a memory size.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ScaleVmRequest {
    /// Only this process group (default: every group).
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub size: Option<String>,
    #[serde(default)]
    pub memory_mb: Option<u32>,
}

fn app_machines(plane: &ControlPlane, app: &AppRow) -> ApiResult<Vec<MachineRow>> {
    Ok(plane
        .store
        .list_machines(&app.id, false)?
        .into_iter()
        .filter(|m| !group_of(m).starts_with("fly_app_"))
        .collect())
}

fn default_wait() -> std::time::Duration {
    std::time::Duration::from_secs(5 * 60)
}

async fn scale_count(
    State(plane): Plane,
    caller: Caller,
    Path(name): Path<String>,
    JsonBody(request): JsonBody<ScaleCountRequest>,
) -> ApiResult<Response> {
    let app = visible_app(&plane, &caller, &name)?;
    caller.require_write()?;
    let group = request
        .group
        .clone()
        .filter(|g| !g.is_empty())
        .unwrap_or_else(|| "app".into());
    let machines = app_machines(&plane, &app)?;
    if !machines.iter().any(|m| group_of(m) == group) && request.count > 0 {
        return Err(ApiError::bad_request(format!(
            "there are no machines in process group '{group}' to clone; run `aloft deploy` first (it creates the machines of every group in fly.toml)"
        )));
    }
    let operation = plane.deploys.begin(&app.name);
    operation.emit(DeployEvent::Started {
        deploy_id: operation.id.clone(),
    });
    let response = ndjson_response(&operation);
    let progress = Progress::new(operation);
    tokio::spawn(async move {
        let lock = plane.app_lock(&app.name);
        let _guard = lock.lock().await;
        match count(&plane, &app, &group, &request, &progress).await {
            Ok(()) => progress.emit(DeployEvent::Done {
                release_version: current_release(&plane, &app),
                url: None,
            }),
            Err(err) => progress.emit(DeployEvent::Error {
                message: err.message,
                failure: err.failure.map(|f| *f),
            }),
        }
    });
    Ok(response)
}

fn current_release(plane: &ControlPlane, app: &AppRow) -> u64 {
    plane
        .store
        .releases(&app.id, 1)
        .ok()
        .and_then(|r| r.first().map(|r| r.version))
        .unwrap_or(0)
}

async fn count(
    plane: &ControlPlane,
    app: &AppRow,
    group: &str,
    request: &ScaleCountRequest,
    progress: &Progress,
) -> Result<(), DeployError> {
    let all = app_machines(plane, app)?;
    let region = request.region.clone().filter(|r| !r.is_empty());
    let members: Vec<MachineRow> = all
        .iter()
        .filter(|m| group_of(m) == group && region.as_ref().is_none_or(|r| &m.region == r))
        .cloned()
        .collect();
    let current = members.len();
    if request.count == current {
        progress
            .say(format!(
                "App '{}' already has {current} machine(s) in process group '{group}'",
                app.name
            ))
            .await;
        return Ok(());
    }
    if request.count > current {
        let template = members
            .first()
            .or_else(|| all.iter().find(|m| group_of(m) == group))
            .cloned()
            .ok_or_else(|| {
                DeployError::from(ApiError::bad_request(format!(
                    "there are no machines in process group '{group}' to clone"
                )))
            })?;
        let target_region = region.clone().unwrap_or_else(|| template.region.clone());
        let adding = request.count - current;
        progress
            .say(format!(
                "Creating {adding} machine(s) in process group '{group}' in region {target_region}"
            ))
            .await;
        let settings = RolloutSettings {
            strategy: "rolling".into(),
            max_unavailable: 1.0,
            wait_timeout: default_wait(),
            ha: false,
        };
        let deployer = Deployer {
            plane,
            app,
            progress,
            record: None,
        };
        // Each new machine gets a volume of its own (an unattached one of the same name,
        // else a new one the size of the template's), never the template's.
        let mut configs = Vec::new();
        let mut taken = Vec::new();
        for _ in 0..adding {
            let mut config = template.config.clone();
            if let Some(mount) = config.mounts.first_mut() {
                let template_volume = plane.store.volume(&mount.volume)?;
                if mount.name.is_empty() {
                    mount.name = template_volume
                        .as_ref()
                        .map(|v| v.name.clone())
                        .unwrap_or_default();
                }
                if let Some(volume) = &template_volume {
                    mount.size_gb = Some(u32::try_from(volume.size_gb).unwrap_or(1));
                }
                mount.volume.clear();
                deployer
                    .volume_for_new_machine(group, &mut config, &target_region, true, &mut taken)
                    .await?;
            }
            configs.push(config);
        }
        let launches = configs
            .into_iter()
            .map(|config| deployer.launch_healthy(config, &target_region, &settings));
        let mut created = Vec::new();
        let mut first_error = None;
        for result in join_all(launches).await {
            match result {
                Ok(id) => created.push(id),
                Err((id, err)) => {
                    created.extend(id);
                    first_error.get_or_insert(err);
                }
            }
        }
        if let Some(err) = first_error {
            progress
                .say("A new machine failed; destroying the machines this scaling created")
                .await;
            for id in &created {
                if let Ok(Some(row)) = plane.store.machine(id) {
                    let _ = rollout::retire(plane, &row).await;
                }
            }
            return Err(err);
        }
        for id in &created {
            rollout::set_routed(plane, id, true)?;
            progress
                .say(format!("Machine {id} [{group}] is started and healthy"))
                .await;
        }
        return Ok(());
    }
    // Fewer: stopped machines go first, then the newest.
    let mut victims = members;
    victims.sort_by_key(|m| {
        (
            matches!(m.state, MachineState::Started | MachineState::Starting),
            std::cmp::Reverse(m.created_at.clone()),
        )
    });
    let removing = current - request.count;
    progress
        .say(format!(
            "Destroying {removing} machine(s) in process group '{group}'"
        ))
        .await;
    for machine in victims.into_iter().take(removing) {
        rollout::retire(plane, &machine).await?;
        progress
            .say(format!("Machine {} [{group}] destroyed", machine.id))
            .await;
    }
    Ok(())
}

/// Memory sizes a cpu kind allows: multiples of 256 MB between these per-cpu bounds.
fn memory_bounds(cpu_kind: &str) -> (u32, u32) {
    match cpu_kind {
        "performance" => (2048, 8192),
        _ => (256, 2048),
    }
}

/// The guest after applying a preset and/or memory size to `current`.
pub fn resize(
    current: Option<&MachineGuest>,
    size: Option<&str>,
    memory_mb: Option<u32>,
) -> Result<MachineGuest, String> {
    let mut guest = match size.filter(|s| !s.is_empty()) {
        Some(name) => {
            let preset = aloft_config::preset(name).ok_or_else(|| {
                let names: Vec<&str> = aloft_config::VM_SIZES.iter().map(|p| p.name).collect();
                format!(
                    "'{name}' is an invalid machine size, choose one of: {}",
                    names.join(", ")
                )
            })?;
            MachineGuest {
                cpu_kind: preset.cpu_kind.to_string(),
                cpus: preset.cpus,
                memory_mb: preset.memory_mb,
                gpus: (preset.gpus > 0).then_some(preset.gpus),
                gpu_kind: preset.gpu_kind.map(str::to_string),
                ..MachineGuest::default()
            }
        }
        None => current
            .cloned()
            .unwrap_or_else(MachineGuest::default_shared),
    };
    if let Some(memory) = memory_mb {
        guest.memory_mb = memory;
    }
    let (low, high) = memory_bounds(&guest.cpu_kind);
    let cpus = guest.cpus.max(1);
    if guest.memory_mb % 256 != 0 || guest.memory_mb < low * cpus || guest.memory_mb > high * cpus {
        return Err(format!(
            "invalid memory size {}MB for {cpus} {} cpu(s): it must be a multiple of 256MB between {}MB and {}MB",
            guest.memory_mb,
            guest.cpu_kind,
            low * cpus,
            high * cpus
        ));
    }
    Ok(guest)
}

async fn scale_vm(
    State(plane): Plane,
    caller: Caller,
    Path(name): Path<String>,
    JsonBody(request): JsonBody<ScaleVmRequest>,
) -> ApiResult<Response> {
    let app = visible_app(&plane, &caller, &name)?;
    caller.require_write()?;
    if request.size.as_deref().is_none_or(str::is_empty) && request.memory_mb.is_none() {
        return Err(ApiError::bad_request(
            "give a VM size (e.g. shared-cpu-2x) or a memory size in MB",
        ));
    }
    let group = request.group.clone().filter(|g| !g.is_empty());
    let mut targets: Vec<(MachineRow, MachineConfig)> = Vec::new();
    for machine in app_machines(&plane, &app)? {
        if group.as_ref().is_some_and(|g| g != group_of(&machine)) {
            continue;
        }
        let guest = resize(
            machine.config.guest.as_ref(),
            request.size.as_deref(),
            request.memory_mb,
        )
        .map_err(ApiError::bad_request)?;
        let mut config = machine.config.clone();
        config.guest = Some(guest);
        targets.push((machine, config));
    }
    if targets.is_empty() {
        return Err(ApiError::bad_request(match &group {
            Some(g) => format!("process group '{g}' has no machines"),
            None => format!(
                "app {} has no machines to resize; run `aloft deploy` first",
                app.name
            ),
        }));
    }
    let operation = plane.deploys.begin(&app.name);
    operation.emit(DeployEvent::Started {
        deploy_id: operation.id.clone(),
    });
    let response = ndjson_response(&operation);
    let progress = Progress::new(operation);
    tokio::spawn(async move {
        let lock = plane.app_lock(&app.name);
        let _guard = lock.lock().await;
        let settings = RolloutSettings {
            strategy: "rolling".into(),
            max_unavailable: 0.33,
            wait_timeout: default_wait(),
            ha: false,
        };
        let deployer = Deployer {
            plane: &plane,
            app: &app,
            progress: &progress,
            record: None,
        };
        let mut sizes: BTreeMap<String, String> = BTreeMap::new();
        for (machine, config) in &targets {
            if let Some(guest) = &config.guest {
                sizes.insert(
                    group_of(machine).to_string(),
                    format!(
                        "{} cpu(s) {}, {}MB",
                        guest.cpus, guest.cpu_kind, guest.memory_mb
                    ),
                );
            }
        }
        for (group, size) in sizes {
            progress
                .say(format!("Resizing process group '{group}' to {size}"))
                .await;
        }
        match deployer.update_in_place(&targets, &settings).await {
            Ok(()) => progress.emit(DeployEvent::Done {
                release_version: current_release(&plane, &app),
                url: None,
            }),
            Err(err) => progress.emit(DeployEvent::Error {
                message: err.message,
                failure: err.failure.map(|f| *f),
            }),
        }
    });
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_and_memory_resize_within_the_platform_rules() {
        let guest = resize(None, Some("shared-cpu-2x"), None).unwrap();
        assert_eq!(
            (guest.cpu_kind.as_str(), guest.cpus, guest.memory_mb),
            ("shared", 2, 512)
        );
        let guest = resize(Some(&guest), None, Some(1024)).unwrap();
        assert_eq!((guest.cpus, guest.memory_mb), (2, 1024));
        let guest = resize(None, Some("performance-1x"), None).unwrap();
        assert_eq!(
            (guest.cpu_kind.as_str(), guest.memory_mb),
            ("performance", 2048)
        );
        assert!(
            resize(None, Some("huge-9x"), None)
                .unwrap_err()
                .contains("invalid machine size")
        );
        assert!(
            resize(None, None, Some(300))
                .unwrap_err()
                .contains("multiple of 256MB")
        );
        assert!(
            resize(None, None, Some(4096))
                .unwrap_err()
                .contains("between 256MB and 2048MB")
        );
        assert!(resize(None, Some("performance-1x"), Some(1024)).is_err());
    }
}
