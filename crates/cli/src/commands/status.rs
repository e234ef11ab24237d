//! `aloft status` and `aloft machine list`.

use aloft_api::{App, Machine};

use crate::output::{table, when};
use crate::settings::ApiArgs;

pub fn app_path(app: &str) -> String {
    format!("/v1/apps/{}", aloft_client::encode_component(app))
}

fn process_group(machine: &Machine) -> String {
    machine.config.process_group().unwrap_or("app").to_string()
}

fn release_version(machine: &Machine) -> String {
    machine
        .config
        .metadata
        .get(aloft_api::METADATA_RELEASE_VERSION)
        .cloned()
        .unwrap_or_default()
}

pub async fn status(api: &ApiArgs, app_name: &str, json: bool) -> anyhow::Result<()> {
    let client = api.client()?;
    let app: App = client.get(&app_path(app_name)).await?;
    let machines: Vec<Machine> = client
        .get(&format!("{}/machines", app_path(app_name)))
        .await?;
    let deploying = crate::commands::deploy::deploys(&client, app_name)
        .await?
        .into_iter()
        .find(|d| d.status == "running");
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({ "app": app, "machines": machines, "deployment": deploying })
            )?
        );
        return Ok(());
    }
    let image = machines
        .first()
        .map(|m| m.config.image.clone())
        .unwrap_or_default();
    println!("App");
    println!("  Name     = {}", app.name);
    println!("  Owner    = {}", app.organization.slug);
    println!("  Hostname = {}", app.hostname.clone().unwrap_or_default());
    println!("  Image    = {image}");
    println!("  Platform = machines");
    println!();
    if let Some(deploy) = &deploying {
        println!("Deployment Status");
        println!("  ID       = {}", deploy.id);
        println!(
            "  Version  = {}",
            deploy
                .release_version
                .map(|v| format!("v{v}"))
                .unwrap_or_else(|| "(not yet made)".into())
        );
        println!("  Status   = running");
        println!("  Strategy = {}", deploy.strategy);
        println!("  Started  = {}", when(&deploy.created_at));
        println!("  Follow it with `aloft deploy --resume -a {}`", app.name);
        println!();
    }
    if machines.is_empty() {
        println!("No machines are available on this app {}", app.name);
        return Ok(());
    }
    let rows = machines
        .iter()
        .map(|m| {
            vec![
                process_group(m),
                m.id.clone(),
                release_version(m),
                m.region.clone(),
                m.state.to_string(),
                String::new(),
                String::new(),
                when(&m.updated_at),
            ]
        })
        .collect();
    println!("Machines");
    println!(
        "{}",
        table(
            &[
                "PROCESS",
                "ID",
                "VERSION",
                "REGION",
                "STATE",
                "ROLE",
                "CHECKS",
                "LAST UPDATED"
            ],
            rows
        )
    );
    Ok(())
}

pub async fn machine_list(
    api: &ApiArgs,
    app_name: &str,
    json: bool,
    quiet: bool,
) -> anyhow::Result<()> {
    let client = api.client()?;
    let machines: Vec<Machine> = client
        .get(&format!("{}/machines", app_path(app_name)))
        .await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&machines)?);
        return Ok(());
    }
    if quiet {
        for machine in &machines {
            println!("{}", machine.id);
        }
        return Ok(());
    }
    if machines.is_empty() {
        println!("No machines are available on this app {app_name}");
        return Ok(());
    }
    println!(
        "{} machines have been retrieved from app {app_name}.",
        machines.len()
    );
    println!();
    let rows = machines
        .iter()
        .map(|m| {
            let size = m
                .config
                .guest
                .as_ref()
                .map(|g| {
                    format!(
                        "{}-cpu-{}x:{}MB",
                        if g.cpu_kind.is_empty() {
                            "shared"
                        } else {
                            &g.cpu_kind
                        },
                        g.cpus.max(1),
                        g.memory_mb
                    )
                })
                .unwrap_or_default();
            let image = format!("{}:{}", m.image_ref.repository, m.image_ref.tag);
            vec![
                m.id.clone(),
                m.name.clone(),
                m.state.to_string(),
                String::new(),
                m.region.clone(),
                String::new(),
                image,
                m.private_ip.clone(),
                String::new(),
                m.created_at.clone(),
                m.updated_at.clone(),
                process_group(m),
                size,
            ]
        })
        .collect();
    println!(
        "{}",
        table(
            &[
                "ID",
                "NAME",
                "STATE",
                "CHECKS",
                "REGION",
                "ROLE",
                "IMAGE",
                "IP ADDRESS",
                "VOLUME",
                "CREATED",
                "LAST UPDATED",
                "PROCESS GROUP",
                "SIZE"
            ],
            rows
        )
    );
    Ok(())
}
