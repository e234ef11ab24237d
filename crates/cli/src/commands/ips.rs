//! `aloft ips list|allocate-v4|allocate-v6|release|private`.

use std::path::PathBuf;

use aloft_api::Machine;
use aloft_control::ips::{AssignIpRequest, IpAssignment, ListIpAssignments};
use http::Method;

use crate::output::table;
use crate::settings::ApiArgs;

#[derive(clap::Args, Debug, Clone)]
pub struct AppArgs {
    #[arg(short = 'a', long = "app")]
    app: Option<String>,
    #[arg(short = 'c', long = "config")]
    config: Option<PathBuf>,
}

#[derive(clap::Subcommand, Debug)]
pub enum IpsCommand {
    /// List allocated IP addresses.
    #[command(alias = "ls")]
    List {
        #[command(flatten)]
        app: AppArgs,
        #[arg(short = 'j', long)]
        json: bool,
    },
    /// Allocate an IPv4 address (dedicated, or with --shared the proxy's shared one).
    #[command(name = "allocate-v4")]
    AllocateV4 {
        #[command(flatten)]
        app: AppArgs,
        /// Allocate a shared IPv4 (routed by Host/SNI) instead of a dedicated one.
        #[arg(long)]
        shared: bool,
        #[arg(short = 'r', long)]
        region: Option<String>,
        /// Accept the allocation without asking.
        #[arg(short = 'y', long)]
        yes: bool,
    },
    /// Allocate an IPv6 address (public, or with --private a Flycast address).
    #[command(name = "allocate-v6")]
    AllocateV6 {
        #[command(flatten)]
        app: AppArgs,
        /// A Flycast address: private, routed through the proxy.
        #[arg(long)]
        private: bool,
        /// Expose the Flycast address to this organization's network instead.
        #[arg(short = 'o', long)]
        org: Option<String>,
        /// Expose the Flycast address to this custom network instead.
        #[arg(long)]
        network: Option<String>,
        #[arg(short = 'r', long)]
        region: Option<String>,
    },
    /// Release IP addresses.
    Release {
        #[command(flatten)]
        app: AppArgs,
        #[arg(required = true, value_name = "ADDRESS")]
        addresses: Vec<String>,
    },
    /// List the machines' private (6PN) addresses.
    Private {
        #[command(flatten)]
        app: AppArgs,
        #[arg(short = 'j', long)]
        json: bool,
    },
}

fn type_label(ip: &IpAssignment) -> &'static str {
    match ip.kind.as_str() {
        "private_v6" => "private",
        "shared_v4" => "public (shared)",
        _ => "public (dedicated)",
    }
}

fn render(ips: &[IpAssignment]) -> String {
    let rows = ips
        .iter()
        .map(|ip| {
            let version = if ip.ip.contains(':') { "v6" } else { "v4" };
            let mut kind = type_label(ip).to_string();
            if let Some(network) = &ip.network {
                let name = if network.name.is_empty() {
                    "default".to_string()
                } else {
                    network.name.clone()
                };
                kind = format!("{kind} ({}/{name})", network.org_slug);
            }
            vec![
                version.to_string(),
                ip.ip.clone(),
                kind,
                ip.region.clone(),
                ip.created_at.clone(),
            ]
        })
        .collect();
    table(&["VERSION", "IP", "TYPE", "REGION", "CREATED AT"], rows)
}

async fn assign(api: &ApiArgs, app: &str, request: AssignIpRequest) -> anyhow::Result<()> {
    let client = api.client()?;
    let ip: IpAssignment = client
        .post(
            &format!(
                "/v1/apps/{}/ip_assignments",
                aloft_client::encode_component(app)
            ),
            &request,
        )
        .await?;
    println!("{}", render(&[ip]));
    Ok(())
}

pub async fn run(api: &ApiArgs, command: IpsCommand) -> anyhow::Result<()> {
    let client = api.client()?;
    let name = |app: &AppArgs| crate::app_name(app.app.clone(), app.config.as_deref());
    match command {
        IpsCommand::List { app, json } => {
            let app = name(&app)?;
            let list: ListIpAssignments = client
                .get(&format!(
                    "/v1/apps/{}/ip_assignments",
                    aloft_client::encode_component(&app)
                ))
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list.ips)?);
            } else {
                println!("{}", render(&list.ips));
            }
        }
        IpsCommand::AllocateV4 {
            app,
            shared,
            region,
            yes: _,
        } => {
            let app = name(&app)?;
            let kind = if shared { "shared_v4" } else { "v4" };
            let request = AssignIpRequest {
                kind: kind.into(),
                region: region.unwrap_or_default(),
                ..AssignIpRequest::default()
            };
            assign(api, &app, request).await?;
        }
        IpsCommand::AllocateV6 {
            app,
            private,
            org,
            network,
            region,
        } => {
            let app = name(&app)?;
            if !private && (org.is_some() || network.is_some()) {
                anyhow::bail!(
                    "--org and --network only apply to private (Flycast) addresses: add --private"
                );
            }
            let request = AssignIpRequest {
                kind: if private { "private_v6" } else { "v6" }.into(),
                region: region.unwrap_or_default(),
                org_slug: org.unwrap_or_default(),
                network: network.unwrap_or_default(),
                ..AssignIpRequest::default()
            };
            assign(api, &app, request).await?;
        }
        IpsCommand::Release { app, addresses } => {
            let app = name(&app)?;
            for address in addresses {
                let path = format!(
                    "/v1/apps/{}/ip_assignments/{}",
                    aloft_client::encode_component(&app),
                    aloft_client::encode_component(&address)
                );
                client.call::<()>(Method::DELETE, &path, None).await?;
                println!("Released {address} from {app}");
            }
        }
        IpsCommand::Private { app, json } => {
            let app = name(&app)?;
            let machines: Vec<Machine> = client
                .get(&format!(
                    "/v1/apps/{}/machines",
                    aloft_client::encode_component(&app)
                ))
                .await?;
            if json {
                let rows: Vec<serde_json::Value> = machines
                    .iter()
                    .map(|m| serde_json::json!({"id": m.id, "region": m.region, "process_group": m.config.process_group(), "private_ip": m.private_ip}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&rows)?);
                return Ok(());
            }
            let rows = machines
                .iter()
                .map(|m| {
                    vec![
                        m.id.clone(),
                        m.config.process_group().unwrap_or("app").to_string(),
                        m.region.clone(),
                        m.private_ip.clone(),
                    ]
                })
                .collect();
            println!("{}", table(&["ID", "PROCESS GROUP", "REGION", "IP"], rows));
        }
    }
    Ok(())
}
