//! `aloft scale count|show|vm|memory`: machine counts and sizes per process group on the
//! server, planned and confirmed here, carried out there (like a deploy).

use std::collections::BTreeMap;
use std::io::{BufRead, IsTerminal, Write};

use aloft_api::Machine;
use aloft_control::scale::{ScaleCountRequest, ScaleVmRequest};
use anyhow::{Context, bail};

use crate::commands::deploy::{Watched, watch};
use crate::output::table;
use crate::settings::ApiArgs;

#[derive(clap::Subcommand, Debug)]
pub enum ScaleCommand {
    /// Set the number of machines of a process group: `3`, or `web=2 worker=1`.
    Count {
        #[arg(required = true)]
        counts: Vec<String>,
        #[arg(short = 'a', long = "app")]
        app: Option<String>,
        #[arg(short = 'c', long = "config")]
        config: Option<std::path::PathBuf>,
        /// The process group a bare count applies to (default `app`).
        #[arg(short = 'g', long = "process-group")]
        process_group: Option<String>,
        /// Only count, create and destroy machines in this region.
        #[arg(short = 'r', long)]
        region: Option<String>,
        /// Do not ask for confirmation.
        #[arg(short = 'y', long)]
        yes: bool,
    },
    /// Show the machines' counts and sizes per process group.
    Show {
        #[arg(short = 'a', long = "app")]
        app: Option<String>,
        #[arg(short = 'c', long = "config")]
        config: Option<std::path::PathBuf>,
        #[arg(short = 'j', long)]
        json: bool,
    },
    /// Resize machines to a VM size preset (e.g. shared-cpu-2x, performance-1x).
    Vm {
        size: String,
        /// Memory in MB, instead of the preset's.
        #[arg(long = "vm-memory")]
        memory: Option<u32>,
        #[arg(short = 'a', long = "app")]
        app: Option<String>,
        #[arg(short = 'c', long = "config")]
        config: Option<std::path::PathBuf>,
        #[arg(short = 'g', long = "process-group")]
        process_group: Option<String>,
    },
    /// Set the machines' memory in MB.
    Memory {
        memory: u32,
        #[arg(short = 'a', long = "app")]
        app: Option<String>,
        #[arg(short = 'c', long = "config")]
        config: Option<std::path::PathBuf>,
        #[arg(short = 'g', long = "process-group")]
        process_group: Option<String>,
    },
}

/// `3` or `web=2 worker=1` as (group, count).
pub fn parse_counts(
    counts: &[String],
    default_group: &str,
) -> anyhow::Result<Vec<(String, usize)>> {
    let mut parsed = Vec::new();
    for item in counts {
        let (group, number) = match item.split_once('=') {
            Some((group, number)) => (group.trim().to_string(), number),
            None => (default_group.to_string(), item.as_str()),
        };
        let count: usize = number.trim().parse().with_context(|| {
            format!("{item:?} is not a machine count; use a number, or GROUP=NUMBER")
        })?;
        if group.is_empty() {
            bail!("{item:?} names no process group; use GROUP=NUMBER");
        }
        parsed.push((group, count));
    }
    Ok(parsed)
}

fn group(machine: &Machine) -> String {
    machine.config.process_group().unwrap_or("app").to_string()
}

fn size_name(machine: &Machine) -> String {
    let guest = machine
        .config
        .guest
        .clone()
        .unwrap_or_else(aloft_api::MachineGuest::default_shared);
    aloft_config::VM_SIZES
        .iter()
        .find(|p| {
            p.cpu_kind == guest.cpu_kind
                && p.cpus == guest.cpus
                && p.memory_mb == guest.memory_mb
                && p.gpus == guest.gpus.unwrap_or(0)
        })
        .map(|p| p.name.to_string())
        .unwrap_or_else(|| {
            format!(
                "{}-cpu-{}x ({}MB)",
                guest.cpu_kind, guest.cpus, guest.memory_mb
            )
        })
}

async fn machines(api: &ApiArgs, app: &str) -> anyhow::Result<Vec<Machine>> {
    let all: Vec<Machine> = api
        .client()?
        .get(&format!(
            "/v1/apps/{}/machines",
            aloft_client::encode_component(app)
        ))
        .await?;
    Ok(all
        .into_iter()
        .filter(|m| !group(m).starts_with("fly_app_"))
        .collect())
}

fn confirm(question: &str, yes: bool) -> anyhow::Result<bool> {
    if yes {
        return Ok(true);
    }
    if !std::io::stdin().is_terminal() {
        bail!("--yes is required when not running interactively");
    }
    print!("? {question} (y/N) ");
    std::io::stdout().flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    Ok(matches!(answer.trim().to_lowercase().as_str(), "y" | "yes"))
}

async fn follow(
    api: &ApiArgs,
    path: &str,
    body: &impl serde::Serialize,
    app: &str,
) -> anyhow::Result<()> {
    let lines = api
        .client()?
        .lines(http::Method::POST, path, Some(body), &[])
        .await?;
    match watch(lines, app, false).await? {
        Watched::Done { .. } | Watched::Detached { .. } => Ok(()),
    }
}

pub async fn run(api: &ApiArgs, app: &str, command: ScaleCommand) -> anyhow::Result<()> {
    let app_path = format!("/v1/apps/{}", aloft_client::encode_component(app));
    match command {
        ScaleCommand::Count {
            counts,
            process_group,
            region,
            yes,
            ..
        } => {
            let wanted = parse_counts(&counts, process_group.as_deref().unwrap_or("app"))?;
            let current = machines(api, app).await?;
            let mut plan = Vec::new();
            for (group_name, count) in &wanted {
                let members: Vec<&Machine> = current
                    .iter()
                    .filter(|m| {
                        &group(m) == group_name && region.as_ref().is_none_or(|r| &m.region == r)
                    })
                    .collect();
                let template = members
                    .first()
                    .copied()
                    .or_else(|| current.iter().find(|m| &group(m) == group_name));
                let Some(template) = template else {
                    if *count > 0 {
                        bail!(
                            "there are no machines in process group '{group_name}' to clone; run `aloft deploy` first"
                        );
                    }
                    continue;
                };
                let where_ = region.clone().unwrap_or_else(|| template.region.clone());
                let delta = *count as i64 - members.len() as i64;
                match delta {
                    0 => println!("Process group '{group_name}' already has {count} machine(s)"),
                    d if d > 0 => plan.push(format!(
                        "+{d} machines for group '{group_name}' on region '{where_}' of size '{}'",
                        size_name(template)
                    )),
                    d => plan.push(format!(
                        "{d} machines for group '{group_name}' on region '{where_}'"
                    )),
                }
            }
            if plan.is_empty() {
                return Ok(());
            }
            println!("App '{app}' is going to be scaled according to this plan:");
            for line in &plan {
                println!("{line}");
            }
            if !confirm("Scale app?", yes)? {
                println!("Nothing changed");
                return Ok(());
            }
            for (group_name, count) in wanted {
                let request = ScaleCountRequest {
                    group: Some(group_name),
                    count,
                    region: region.clone(),
                };
                follow(api, &format!("{app_path}/scale/count"), &request, app).await?;
            }
            println!("Scaled {app}");
        }
        ScaleCommand::Show { json, .. } => {
            let current = machines(api, app).await?;
            let mut groups: BTreeMap<String, Vec<&Machine>> = BTreeMap::new();
            for machine in &current {
                groups.entry(group(machine)).or_default().push(machine);
            }
            let summary: Vec<serde_json::Value> = groups
                .iter()
                .map(|(name, members)| {
                    let guest = members[0]
                        .config
                        .guest
                        .clone()
                        .unwrap_or_else(aloft_api::MachineGuest::default_shared);
                    let mut regions: BTreeMap<String, usize> = BTreeMap::new();
                    for m in members {
                        *regions.entry(m.region.clone()).or_default() += 1;
                    }
                    serde_json::json!({
                        "Process": name,
                        "Count": members.len(),
                        "CPUKind": guest.cpu_kind,
                        "CPUs": guest.cpus,
                        "Memory": guest.memory_mb,
                        "Regions": regions,
                    })
                })
                .collect();
            if json {
                println!("{}", serde_json::to_string_pretty(&summary)?);
                return Ok(());
            }
            println!("VM Resources for app: {app}");
            println!();
            println!("Groups");
            let rows = summary
                .iter()
                .map(|g| {
                    let regions = g["Regions"]
                        .as_object()
                        .map(|r| {
                            r.iter()
                                .map(|(name, n)| {
                                    if n.as_u64() == Some(1) {
                                        name.clone()
                                    } else {
                                        format!("{name}({n})")
                                    }
                                })
                                .collect::<Vec<_>>()
                                .join(",")
                        })
                        .unwrap_or_default();
                    vec![
                        g["Process"].as_str().unwrap_or_default().to_string(),
                        g["Count"].to_string(),
                        g["CPUKind"].as_str().unwrap_or_default().to_string(),
                        g["CPUs"].to_string(),
                        format!("{} MB", g["Memory"]),
                        regions,
                    ]
                })
                .collect();
            println!(
                "{}",
                table(
                    &["NAME", "COUNT", "KIND", "CPUS", "MEMORY", "REGIONS"],
                    rows
                )
            );
        }
        ScaleCommand::Vm {
            size,
            memory,
            process_group,
            ..
        } => {
            let request = ScaleVmRequest {
                group: process_group,
                size: Some(size.clone()),
                memory_mb: memory,
            };
            follow(api, &format!("{app_path}/scale/vm"), &request, app).await?;
            println!(
                "Scaled VM of {app} to {size}{}",
                memory
                    .map(|m| format!(" with {m}MB of memory"))
                    .unwrap_or_default()
            );
        }
        ScaleCommand::Memory {
            memory,
            process_group,
            ..
        } => {
            let request = ScaleVmRequest {
                group: process_group,
                size: None,
                memory_mb: Some(memory),
            };
            follow(api, &format!("{app_path}/scale/vm"), &request, app).await?;
            println!("Scaled VM memory of {app} to {memory}MB");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_bare_or_per_group() {
        assert_eq!(
            parse_counts(&["3".into()], "app").unwrap(),
            vec![("app".to_string(), 3)]
        );
        assert_eq!(
            parse_counts(&["web=2".into(), "worker=0".into()], "app").unwrap(),
            vec![("web".to_string(), 2), ("worker".to_string(), 0)]
        );
        assert!(
            parse_counts(&["many".into()], "app")
                .unwrap_err()
                .to_string()
                .contains("not a machine count")
        );
        assert!(parse_counts(&["=2".into()], "app").is_err());
    }
}
