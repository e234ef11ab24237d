//! `aloft machine status ID`: a machine's state, config summary and recent events, with
//! the reason of each exit or failure.

use aloft_api::Machine;

use crate::output::table;
use crate::settings::ApiArgs;

#[derive(clap::Args, Debug)]
pub struct MachineStatusArgs {
    /// The machine.
    pub machine: String,
    #[arg(short = 'a', long = "app")]
    pub app: Option<String>,
    #[arg(short = 'c', long = "config")]
    pub config: Option<std::path::PathBuf>,
    /// Print the machine's config as JSON too.
    #[arg(short = 'd', long)]
    pub display_config: bool,
}

fn event_time(millis: i64) -> String {
    chrono::DateTime::from_timestamp_millis(millis)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string())
        .unwrap_or_default()
}

/// What an event's request says, in a line: the exit details and the reason.
fn event_info(request: Option<&serde_json::Value>) -> String {
    let Some(request) = request else {
        return String::new();
    };
    let mut parts = Vec::new();
    if let Some(exit) = request.get("exit_event") {
        let code = exit.get("exit_code").and_then(|c| c.as_i64()).unwrap_or(-1);
        parts.push(format!("exit_code={code}"));
        if let Some(signal) = exit.get("signal").and_then(|s| s.as_i64()) {
            parts.push(format!("signal={signal}"));
        }
        if exit.get("oom_killed").and_then(|o| o.as_bool()) == Some(true) {
            parts.push("oom_killed=true".into());
        }
        if exit.get("requested_stop").and_then(|o| o.as_bool()) == Some(true) {
            parts.push("requested_stop=true".into());
        }
        if exit.get("restarting").and_then(|o| o.as_bool()) == Some(true) {
            parts.push("restarting=true".into());
        }
    }
    if let Some(message) = request.get("message").and_then(|m| m.as_str()) {
        parts.push(message.to_string());
    }
    parts.join(", ")
}

pub async fn run(api: &ApiArgs, app: &str, args: &MachineStatusArgs) -> anyhow::Result<()> {
    let path = format!(
        "{}/machines/{}",
        super::status::app_path(app),
        aloft_client::encode_component(&args.machine)
    );
    let client = api.client()?;
    let machine: Machine = client.get(&path).await?;
    let events: Vec<aloft_api::MachineEvent> = client
        .get(&format!("{path}/events"))
        .await
        .unwrap_or_else(|_| machine.events.clone());
    let guest = machine
        .config
        .guest
        .clone()
        .unwrap_or_else(aloft_api::MachineGuest::default_shared);
    println!("Machine ID: {}", machine.id);
    println!("Instance ID: {}", machine.instance_id);
    println!("State: {}", machine.state);
    println!();
    println!("VM");
    println!("  ID            = {}", machine.id);
    println!("  Instance ID   = {}", machine.instance_id);
    println!("  State         = {}", machine.state);
    println!("  Image         = {}", machine.config.image);
    println!("  Name          = {}", machine.name);
    println!("  Private IP    = {}", machine.private_ip);
    println!("  Region        = {}", machine.region);
    println!(
        "  Process Group = {}",
        machine.config.process_group().unwrap_or("app")
    );
    println!("  CPU Kind      = {}", guest.cpu_kind);
    println!("  vCPUs         = {}", guest.cpus);
    println!("  Memory        = {}", guest.memory_mb);
    println!("  Created       = {}", machine.created_at);
    println!("  Updated       = {}", machine.updated_at);
    println!();
    if !machine.checks.is_empty() {
        println!("Checks");
        let rows = machine
            .checks
            .iter()
            .map(|c| {
                vec![
                    c.name.clone(),
                    c.status.clone(),
                    c.output.replace('\n', " "),
                ]
            })
            .collect();
        println!("{}", table(&["NAME", "STATUS", "OUTPUT"], rows));
        println!();
    }
    println!("Event Logs");
    let rows = events
        .iter()
        .map(|e| {
            vec![
                e.status.clone(),
                e.kind.clone(),
                e.source.clone(),
                event_time(e.timestamp),
                event_info(e.request.as_ref()),
            ]
        })
        .collect();
    println!(
        "{}",
        table(&["STATE", "EVENT", "SOURCE", "TIMESTAMP", "INFO"], rows)
    );
    if args.display_config {
        println!();
        println!("{}", serde_json::to_string_pretty(&machine.config)?);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_events_say_how_and_why() {
        let request = serde_json::json!({ "exit_event": { "exit_code": 127, "oom_killed": false, "restarting": true }, "message": "executable file not found in $PATH: nope" });
        assert_eq!(
            event_info(Some(&request)),
            "exit_code=127, restarting=true, executable file not found in $PATH: nope"
        );
        assert_eq!(event_info(None), "");
    }
}
