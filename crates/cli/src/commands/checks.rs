//! `aloft checks list`: the health checks of an app's machines and their latest results.

use aloft_api::Machine;

use crate::output::{table, when};
use crate::settings::ApiArgs;

#[derive(clap::Subcommand, Debug)]
pub enum ChecksCommand {
    /// List the app's health checks and their status.
    #[command(alias = "ls")]
    List(ChecksListArgs),
}

#[derive(clap::Args, Debug)]
pub struct ChecksListArgs {
    #[arg(short = 'a', long = "app")]
    pub app: Option<String>,
    #[arg(short = 'c', long = "config")]
    pub config: Option<std::path::PathBuf>,
    /// Only checks with this name.
    #[arg(long = "check-name")]
    pub check_name: Option<String>,
    #[arg(short = 'j', long)]
    pub json: bool,
}

pub async fn list(api: &ApiArgs, app: &str, args: &ChecksListArgs) -> anyhow::Result<()> {
    let machines: Vec<Machine> = api
        .client()?
        .get(&format!("{}/machines", super::status::app_path(app)))
        .await?;
    let wanted = |name: &str| args.check_name.as_deref().is_none_or(|n| n == name);
    if args.json {
        let entries: Vec<serde_json::Value> = machines
            .iter()
            .flat_map(|m| {
                m.checks.iter().filter(|c| wanted(&c.name)).map(move |c| {
                    serde_json::json!({ "machine": m.id, "region": m.region, "name": c.name, "status": c.status, "output": c.output, "updated_at": c.updated_at })
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&entries)?);
        return Ok(());
    }
    println!("Health Checks for {app}");
    let mut rows = Vec::new();
    for machine in &machines {
        for check in machine.checks.iter().filter(|c| wanted(&c.name)) {
            let output = check.output.replace('\n', " ");
            rows.push(vec![
                check.name.clone(),
                check.status.clone(),
                machine.id.clone(),
                when(check.updated_at.as_deref().unwrap_or_default()),
                output,
            ]);
        }
    }
    println!(
        "{}",
        table(
            &["NAME", "STATUS", "MACHINE", "LAST UPDATED", "OUTPUT"],
            rows
        )
    );
    Ok(())
}
