//! Server-side deploys: a parsed fly.toml plus an image become a release and one machine
//! config per process group, rolled out here so a deploy survives the client going away.

use std::collections::BTreeMap;
use std::sync::Arc;

use aloft_api::internal::{DeployEvent, DeployRequest};
use aloft_api::{CreateMachineRequest, MachineConfig, MachineState, StopRequest, regions};
use aloft_config::{AppConfig, MachineConfigOptions, Severity};
use tokio::sync::mpsc;

use crate::ControlPlane;
use crate::error::{ApiError, ApiResult};
use crate::hosts::place;
use crate::store::{AppRow, MachineRow};

struct Progress {
    sender: mpsc::Sender<DeployEvent>,
}

impl Progress {
    async fn say(&self, message: impl Into<String>) {
        // The client may have gone away; the deploy goes on regardless.
        let _ = self
            .sender
            .send(DeployEvent::Progress {
                message: message.into(),
            })
            .await;
    }
    async fn warn(&self, message: impl Into<String>) {
        let _ = self
            .sender
            .send(DeployEvent::Warning {
                message: message.into(),
            })
            .await;
    }
    async fn finish(&self, event: DeployEvent) {
        let _ = self.sender.send(event).await;
    }
}

/// Runs a deploy to completion, reporting on `sender`.
pub async fn run(
    plane: Arc<ControlPlane>,
    app: AppRow,
    request: DeployRequest,
    sender: mpsc::Sender<DeployEvent>,
) {
    let progress = Progress { sender };
    let lock = plane.app_lock(&app.name);
    let _guard = lock.lock().await;
    match deploy(&plane, &app, &request, &progress).await {
        Ok(version) => {
            progress
                .finish(DeployEvent::Done {
                    release_version: version,
                    url: Some(plane.app_url(&app.name)),
                })
                .await;
        }
        Err(err) => {
            progress
                .finish(DeployEvent::Error {
                    message: err.message,
                })
                .await
        }
    }
}

async fn deploy(
    plane: &ControlPlane,
    app: &AppRow,
    request: &DeployRequest,
    progress: &Progress,
) -> ApiResult<u64> {
    let config = AppConfig::from_json_value(request.config.clone())
        .map_err(|e| ApiError::bad_request(format!("invalid app configuration: {e}")))?;
    let problems: Vec<String> = config
        .validate()
        .into_iter()
        .filter(|d| d.severity == Severity::Error)
        .map(|d| d.to_string())
        .collect();
    if !problems.is_empty() {
        return Err(ApiError::bad_request(format!(
            "app configuration is not valid: {}",
            problems.join("; ")
        )));
    }
    if request.image.trim().is_empty() {
        return Err(ApiError::bad_request("deploy needs an image"));
    }

    let wanted_region = if config.primary_region.is_empty() {
        plane.config.region.clone()
    } else {
        config.primary_region.clone()
    };
    let placement = place(&plane.store.hosts()?, &wanted_region)?;
    if placement.region != wanted_region {
        let known = regions::find(&wanted_region)
            .map(|r| format!(" ({})", r.name))
            .unwrap_or_default();
        progress
            .warn(format!(
                "region {wanted_region}{known} has no hosts here; machines will run in {}, the nearest region that has one",
                placement.region
            ))
            .await;
    }

    let config_json =
        serde_json::to_string(&config).map_err(|e| ApiError::internal(e.to_string()))?;
    let release = plane.store.create_release(
        &app.id,
        &ulid::Ulid::new().to_string(),
        &request.image,
        &config_json,
        "deploy",
    )?;
    progress
        .say(format!(
            "Release v{} created with image {}",
            release.version, request.image
        ))
        .await;

    let options = MachineConfigOptions {
        image: request.image.clone(),
        release_id: Some(release.id.clone()),
        release_version: Some(release.version),
        primary_region: Some(placement.region.clone()),
    };
    let mut wanted: BTreeMap<String, MachineConfig> = BTreeMap::new();
    for group in config.process_groups() {
        let machine_config = config
            .to_machine_config(&group, &options)
            .map_err(|e| ApiError::bad_request(format!("process group {group}: {e}")))?;
        wanted.insert(group, machine_config);
    }

    let result = roll_out(plane, app, &wanted, &placement.region, progress).await;
    let status = if result.is_ok() { "complete" } else { "failed" };
    plane.store.set_release_status(&release.id, status)?;
    result?;
    plane.store.set_app_status(&app.id, "deployed")?;
    Ok(release.version)
}

/// Rolling update: each existing machine of a group is updated in turn; a group with no
/// machine gets one; machines of groups no longer in the config are destroyed.
async fn roll_out(
    plane: &ControlPlane,
    app: &AppRow,
    wanted: &BTreeMap<String, MachineConfig>,
    region: &str,
    progress: &Progress,
) -> ApiResult<()> {
    let existing = plane.store.list_machines(&app.id, false)?;
    let mut by_group: BTreeMap<String, Vec<MachineRow>> = BTreeMap::new();
    for machine in existing {
        let group = machine.process_group().unwrap_or("app").to_string();
        by_group.entry(group).or_default().push(machine);
    }
    for (group, config) in wanted {
        let machines = by_group.remove(group).unwrap_or_default();
        if machines.is_empty() {
            progress
                .say(format!(
                    "Creating a machine for process group '{group}' in region {region}"
                ))
                .await;
            let request = CreateMachineRequest {
                region: Some(region.to_string()),
                config: config.clone(),
                ..Default::default()
            };
            let machine = plane.create_machine(app, request).await?;
            expect_started(plane, &machine, group, progress).await?;
            continue;
        }
        for machine in machines {
            progress
                .say(format!("Updating machine {} [{group}]", machine.id))
                .await;
            let updated = plane.update_machine(app, &machine, config.clone()).await?;
            expect_started(plane, &updated, group, progress).await?;
        }
    }
    for (group, machines) in by_group {
        for machine in machines {
            progress.say(format!("Destroying machine {} of process group '{group}', which the config no longer has", machine.id)).await;
            plane
                .stop_machine(&machine, &StopRequest::default())
                .await
                .ok();
            let current = plane.store.machine(&machine.id)?.unwrap_or(machine);
            plane.destroy_machine(&current, true).await?;
        }
    }
    Ok(())
}

async fn expect_started(
    plane: &ControlPlane,
    machine: &MachineRow,
    group: &str,
    progress: &Progress,
) -> ApiResult<()> {
    if machine.state == MachineState::Started {
        progress
            .say(format!("Machine {} [{group}] is started", machine.id))
            .await;
        return Ok(());
    }
    Err(ApiError::unavailable(format!(
        "machine {} [{group}] is {} instead of started: {}",
        machine.id,
        machine.state,
        plane.failure_reason(&machine.id)
    )))
}
