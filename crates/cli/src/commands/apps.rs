//! `aloft apps create|list|destroy`.

use aloft_api::{App, CreateAppRequest, ListAppsResponse};
use anyhow::Context;

use crate::output::{table, when};
use crate::settings::ApiArgs;

#[derive(clap::Subcommand, Debug)]
pub enum AppsCommand {
    /// Create a new app.
    Create {
        /// The app's name (lowercase letters, digits and dashes).
        name: String,
        /// The organization that owns the app.
        #[arg(short = 'o', long, default_value = "")]
        org: String,
        /// A custom private network for the app.
        #[arg(long)]
        network: Option<String>,
    },
    /// List apps.
    #[command(alias = "ls")]
    List {
        #[arg(short = 'o', long)]
        org: Option<String>,
        #[arg(short = 'j', long)]
        json: bool,
    },
    /// Restart every running machine of an app, one at a time.
    Restart {
        name: String,
        /// Stop each machine with SIGKILL rather than its kill signal.
        #[arg(long)]
        force_stop: bool,
    },
    /// Destroy an app and all its machines.
    #[command(alias = "delete")]
    Destroy {
        name: String,
        #[arg(short = 'y', long)]
        yes: bool,
    },
}

pub async fn run(api: &ApiArgs, command: AppsCommand) -> anyhow::Result<()> {
    let client = api.client()?;
    match command {
        AppsCommand::Create { name, org, network } => {
            let request = CreateAppRequest {
                app_name: name.clone(),
                org_slug: org,
                network,
                enable_subdomains: None,
            };
            let app: App = client.post("/v1/apps", &request).await?;
            println!("New app created: {}", app.name);
        }
        AppsCommand::List { org, json } => {
            let path = match org {
                Some(org) => format!("/v1/apps?org_slug={}", aloft_client::encode_component(&org)),
                None => "/v1/apps".to_string(),
            };
            let list: ListAppsResponse = client.get(&path).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list.apps)?);
                return Ok(());
            }
            let rows = list
                .apps
                .iter()
                .map(|app| {
                    vec![
                        app.name.clone(),
                        app.organization
                            .as_ref()
                            .map(|o| o.slug.clone())
                            .unwrap_or_default(),
                        app.status.clone().unwrap_or_default(),
                        app.latest_deploy.as_deref().map(when).unwrap_or_default(),
                    ]
                })
                .collect();
            println!(
                "{}",
                table(&["NAME", "OWNER", "STATUS", "LATEST DEPLOY"], rows)
            );
        }
        AppsCommand::Restart { name, force_stop } => {
            let machines: Vec<aloft_api::Machine> = client
                .get(&crate::commands::machine::machines_path(&name))
                .await
                .with_context(|| format!("listing the machines of app {name}"))?;
            let running: Vec<&aloft_api::Machine> = machines
                .iter()
                .filter(|m| m.state == aloft_api::MachineState::Started)
                .collect();
            if running.is_empty() {
                println!("App {name} has no running machines to restart");
                return Ok(());
            }
            println!("Restarting {} machine(s) of app {name}", running.len());
            for machine in running {
                let path = format!(
                    "{}/{}/restart{}",
                    crate::commands::machine::machines_path(&name),
                    aloft_client::encode_component(&machine.id),
                    if force_stop { "?signal=SIGKILL" } else { "" }
                );
                println!("Restarting machine {}", machine.id);
                client
                    .call::<()>(http::Method::POST, &path, None)
                    .await
                    .with_context(|| format!("restarting machine {}", machine.id))?;
                println!("  Machine {} restarted successfully!", machine.id);
            }
        }
        AppsCommand::Destroy { name, yes } => {
            if !yes {
                anyhow::bail!("destroying {name} deletes all its machines; pass --yes to confirm");
            }
            client
                .call::<()>(
                    http::Method::DELETE,
                    &format!("/v1/apps/{}", aloft_client::encode_component(&name)),
                    None,
                )
                .await
                .with_context(|| format!("destroying app {name}"))?;
            println!("Destroyed app {name}");
        }
    }
    Ok(())
}
