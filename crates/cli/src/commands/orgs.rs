//! `aloft orgs list|show|create`.

use aloft_api::{CreateOrgRequest, ListOrgsResponse, OrgInfo};
use aloft_client::encode_component;

use crate::output::table;
use crate::settings::ApiArgs;

#[derive(clap::Subcommand, Debug)]
pub enum OrgsCommand {
    /// List the organizations this token can use.
    #[command(alias = "ls")]
    List {
        #[arg(short = 'j', long)]
        json: bool,
    },
    /// Show one organization.
    Show {
        slug: String,
        #[arg(short = 'j', long)]
        json: bool,
    },
    /// Create an organization (you become a member).
    Create {
        name: String,
        /// The slug (default: from the name).
        #[arg(long)]
        slug: Option<String>,
    },
}

pub async fn run(api: &ApiArgs, command: OrgsCommand) -> anyhow::Result<()> {
    let client = api.client()?;
    match command {
        OrgsCommand::List { json } => {
            let list: ListOrgsResponse = client.get("/v1/orgs").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list.orgs)?);
                return Ok(());
            }
            let rows = list
                .orgs
                .iter()
                .map(|o| vec![o.name.clone(), o.slug.clone(), o.kind.clone()])
                .collect();
            println!("{}", table(&["NAME", "SLUG", "TYPE"], rows));
        }
        OrgsCommand::Show { slug, json } => {
            let org: OrgInfo = client
                .get(&format!("/v1/orgs/{}", encode_component(&slug)))
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&org)?);
                return Ok(());
            }
            println!("Organization");
            println!("  Name    = {}", org.name);
            println!("  Slug    = {}", org.slug);
            println!("  Type    = {}", org.kind);
            println!("  Created = {}", org.created_at);
        }
        OrgsCommand::Create { name, slug } => {
            let org: OrgInfo = client
                .post("/v1/orgs", &CreateOrgRequest { name, slug })
                .await?;
            println!("Your organization {} ({}) was created", org.name, org.slug);
        }
    }
    Ok(())
}
