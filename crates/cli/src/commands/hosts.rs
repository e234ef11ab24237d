//! `aloft hosts list|show|cordon|uncordon|remove`: the platform's hosts, for the operator
//! (the admin token `aloft server` saved).

use aloft_api::internal::HostInfo;
use aloft_client::encode_component;
use anyhow::Context;
use http::Method;

use crate::output::table;
use crate::settings::ApiArgs;

#[derive(clap::Subcommand, Debug)]
pub enum HostsCommand {
    /// List the hosts: region, status (up, down, cordoned), machines, capacity.
    #[command(alias = "ls")]
    List {
        #[arg(short = 'j', long)]
        json: bool,
    },
    /// Show one host, with its machines and volumes.
    Show {
        id: String,
        #[arg(short = 'j', long)]
        json: bool,
    },
    /// Give the host no new machines (its machines stay).
    Cordon { id: String },
    /// Let the host take new machines again.
    Uncordon { id: String },
    /// Forget a host that has no machines or volumes left, and revoke its token.
    #[command(alias = "rm")]
    Remove { id: String },
}

fn row(h: &HostInfo) -> Vec<String> {
    let size = |reserved: String, declared: u64, unit: &str| {
        if declared == 0 {
            format!("{reserved}/-{unit}")
        } else {
            format!("{reserved}/{declared}{unit}")
        }
    };
    vec![
        h.id.clone(),
        h.region.clone(),
        h.status.clone(),
        h.machines.to_string(),
        size(format!("{:.2}", h.cpus_reserved), h.cpus, ""),
        size(h.memory_reserved_mb.to_string(), h.memory_mb, " MB"),
        h.last_seen.clone(),
    ]
}

const HEADERS: [&str; 7] = [
    "ID",
    "REGION",
    "STATUS",
    "MACHINES",
    "CPUS",
    "MEMORY",
    "LAST SEEN",
];

pub async fn run(api: &ApiArgs, command: HostsCommand) -> anyhow::Result<()> {
    let client = api.client()?;
    match command {
        HostsCommand::List { json } => {
            let hosts: Vec<HostInfo> = client.get("/v1/hosts").await.context("listing hosts")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&hosts)?);
            } else {
                println!("{}", table(&HEADERS, hosts.iter().map(row).collect()));
            }
        }
        HostsCommand::Show { id, json } => {
            let host: HostInfo = client
                .get(&format!("/v1/hosts/{}", encode_component(&id)))
                .await
                .with_context(|| format!("showing host {id}"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&host)?);
            } else {
                println!("{}", table(&HEADERS, vec![row(&host)]));
                println!("\nAgent URL: {}", host.agent_url);
                println!("Machines:  {}", host.machine_ids.join(", "));
                println!("Volumes:   {}", host.volume_ids.join(", "));
            }
        }
        HostsCommand::Cordon { id } => {
            let _: HostInfo = client
                .post(&format!("/v1/hosts/{}/cordon", encode_component(&id)), &())
                .await
                .with_context(|| format!("cordoning host {id}"))?;
            println!("Host {id} is cordoned: it gets no new machines");
        }
        HostsCommand::Uncordon { id } => {
            let _: HostInfo = client
                .post(
                    &format!("/v1/hosts/{}/uncordon", encode_component(&id)),
                    &(),
                )
                .await
                .with_context(|| format!("uncordoning host {id}"))?;
            println!("Host {id} takes new machines again");
        }
        HostsCommand::Remove { id } => {
            let _: HostInfo = client
                .json::<(), HostInfo>(
                    Method::DELETE,
                    &format!("/v1/hosts/{}", encode_component(&id)),
                    None,
                )
                .await
                .with_context(|| format!("removing host {id}"))?;
            println!("Host {id} removed; its token is revoked");
        }
    }
    Ok(())
}
