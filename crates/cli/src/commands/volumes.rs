//! `aloft volumes create|list|show|extend|destroy`, with flyctl's flags, output and
//! `--json`.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use aloft_api::{
    CreateVolumeRequest, ExtendVolumeRequest, ExtendVolumeResponse, Volume, VolumeSnapshot,
};
use aloft_client::{Client, encode_component};
use anyhow::bail;
use http::Method;

use crate::output::{table, when};
use crate::settings::ApiArgs;

#[derive(clap::Args, Debug, Clone)]
pub struct AppArgs {
    #[arg(short = 'a', long = "app")]
    app: Option<String>,
    #[arg(short = 'c', long = "config")]
    config: Option<PathBuf>,
}

#[derive(clap::Subcommand, Debug)]
pub enum VolumesCommand {
    /// Create a new volume for an app.
    Create {
        /// The volume's name (letters, digits and underscores).
        name: String,
        #[command(flatten)]
        app: AppArgs,
        /// The target region.
        #[arg(short = 'r', long)]
        region: Option<String>,
        /// The size of volume in gigabytes.
        #[arg(short = 's', long, default_value_t = 1)]
        size: u64,
        /// Snapshot retention in days.
        #[arg(long = "snapshot-retention", default_value_t = 5)]
        snapshot_retention: u64,
        /// Enable scheduled automatic snapshots.
        #[arg(long = "scheduled-snapshots")]
        scheduled_snapshots: Option<bool>,
        /// Do not encrypt the volume contents. Volume contents are encrypted by default.
        #[arg(long = "no-encryption")]
        no_encryption: bool,
        /// Place the volume in a separate hardware zone from existing volumes.
        #[arg(long = "require-unique-zone", num_args = 0..=1, default_missing_value = "true", default_value_t = true)]
        require_unique_zone: bool,
        /// Create the volume from the specified snapshot.
        #[arg(long = "snapshot-id")]
        snapshot_id: Option<String>,
        /// The number of volumes to create.
        #[arg(short = 'n', long, default_value_t = 1)]
        count: u32,
        /// Accept without asking.
        #[arg(short = 'y', long)]
        yes: bool,
        #[arg(short = 'j', long)]
        json: bool,
    },
    /// List the volumes associated with an app.
    #[command(alias = "ls")]
    List {
        #[command(flatten)]
        app: AppArgs,
        /// Show all volumes including those in destroyed states.
        #[arg(long)]
        all: bool,
        #[arg(short = 'j', long)]
        json: bool,
    },
    /// Show the details of the specified volume.
    Show {
        /// The volume's ID.
        id: String,
        #[command(flatten)]
        app: AppArgs,
        #[arg(short = 'j', long)]
        json: bool,
    },
    /// Extend a volume to the specified size.
    Extend {
        /// The volume's ID.
        id: String,
        #[command(flatten)]
        app: AppArgs,
        /// Target volume size in gigabytes (`+N` adds N).
        #[arg(short = 's', long, allow_hyphen_values = true)]
        size: String,
        #[arg(short = 'y', long)]
        yes: bool,
        #[arg(short = 'j', long)]
        json: bool,
    },
    /// Fork the specified volume: an independent copy of it, on its host.
    Fork {
        /// The volume's ID.
        id: String,
        #[command(flatten)]
        app: AppArgs,
        /// The name of the new volume (default: the source's).
        #[arg(long)]
        name: Option<String>,
        /// The target region (default: the source volume's).
        #[arg(short = 'r', long)]
        region: Option<String>,
        #[arg(long = "require-unique-zone", num_args = 0..=1, default_missing_value = "true")]
        require_unique_zone: Option<bool>,
        #[arg(short = 'j', long)]
        json: bool,
    },
    /// Manage volume snapshots.
    #[command(alias = "snapshot", alias = "snaps")]
    Snapshots {
        #[command(subcommand)]
        command: SnapshotsCommand,
    },
    /// Destroy one or more volumes. When you destroy a volume, you permanently delete all its data.
    #[command(alias = "delete", alias = "rm")]
    Destroy {
        /// The volumes' IDs.
        #[arg(required = true)]
        ids: Vec<String>,
        #[command(flatten)]
        app: AppArgs,
        #[arg(short = 'y', long)]
        yes: bool,
    },
}

#[derive(clap::Subcommand, Debug)]
pub enum SnapshotsCommand {
    /// List snapshots associated with the specified volume.
    #[command(alias = "ls")]
    List {
        /// The volume's ID.
        id: String,
        #[command(flatten)]
        app: AppArgs,
        #[arg(short = 'j', long)]
        json: bool,
    },
    /// Snapshot a volume.
    Create {
        /// The volume's ID.
        id: String,
        #[command(flatten)]
        app: AppArgs,
        #[arg(short = 'j', long)]
        json: bool,
    },
}

/// go-humanize's `IBytes`: 1.2 MiB.
fn ibytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if value < 10.0 {
        format!("{value:.1} {}", UNITS[unit])
    } else {
        format!("{value:.0} {}", UNITS[unit])
    }
}

async fn snapshots(
    api_client: &Client,
    app: &str,
    command: SnapshotsCommand,
) -> anyhow::Result<()> {
    match command {
        SnapshotsCommand::List { id, json, .. } => {
            let volume = get_volume(api_client, app, &id).await?;
            let list = list_snapshots(api_client, app, &id).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
                return Ok(());
            }
            if list.is_empty() {
                eprintln!("No snapshots available for volume {id}");
                return Ok(());
            }
            let total: u64 = list.iter().map(|s| s.size).sum();
            let rows = list
                .iter()
                .map(|s| {
                    vec![
                        s.id.clone(),
                        s.status.clone(),
                        ibytes(s.size),
                        ibytes(volume.size_gb << 30),
                        when(&s.created_at),
                        s.retention_days.to_string(),
                    ]
                })
                .collect();
            println!("Snapshots");
            println!(
                "{}",
                table(
                    &[
                        "ID",
                        "STATUS",
                        "STORED SIZE",
                        "VOL SIZE",
                        "CREATED AT",
                        "RETENTION DAYS"
                    ],
                    rows
                )
            );
            println!("\nTotal stored size: {}", ibytes(total));
        }
        SnapshotsCommand::Create { id, json, .. } => {
            let snapshot: aloft_api::VolumeSnapshot = api_client
                .post(&format!("{}/snapshots", volume_path(app, &id)), &())
                .await
                .map_err(|e| anyhow::anyhow!("failed to snapshot volume: {e}"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&snapshot)?);
            } else {
                println!("Scheduled to snapshot volume {id}");
            }
        }
    }
    Ok(())
}

pub(crate) async fn get_volume(client: &Client, app: &str, id: &str) -> anyhow::Result<Volume> {
    Ok(client.get(&volume_path(app, id)).await?)
}

pub(crate) async fn list_snapshots(
    client: &Client,
    app: &str,
    id: &str,
) -> anyhow::Result<Vec<VolumeSnapshot>> {
    Ok(client
        .get(&format!("{}/snapshots", volume_path(app, id)))
        .await?)
}

pub(crate) async fn create_volume(
    client: &Client,
    app: &str,
    request: &CreateVolumeRequest,
) -> anyhow::Result<Volume> {
    Ok(client.post(&volumes_path(app), request).await?)
}

fn volumes_path(app: &str) -> String {
    format!("/v1/apps/{}/volumes", encode_component(app))
}

fn volume_path(app: &str, id: &str) -> String {
    format!("{}/{}", volumes_path(app), encode_component(id))
}

/// flyctl's `printVolume`.
fn print_volume(volume: &Volume, app: &str) -> String {
    let created = chrono::DateTime::parse_from_rfc3339(&volume.created_at)
        .map(|t| {
            t.with_timezone(&chrono::Utc)
                .format("%d %b %y %H:%M UTC")
                .to_string()
        })
        .unwrap_or_else(|_| volume.created_at.clone());
    let fields = [
        ("ID", volume.id.clone()),
        ("Name", volume.name.clone()),
        ("App", app.to_string()),
        ("Region", volume.region.clone()),
        ("Zone", volume.zone.clone()),
        ("Size GB", volume.size_gb.to_string()),
        ("Encrypted", volume.encrypted.to_string()),
        ("Created at", created),
        ("Snapshot retention", volume.snapshot_retention.to_string()),
        (
            "Scheduled snapshots",
            volume.auto_backup_enabled.to_string(),
        ),
    ];
    fields
        .iter()
        .map(|(label, value)| format!("{label:>20}: {value}\n"))
        .collect()
}

/// flyctl's `renderTable`.
fn render_table(volumes: &[Volume]) -> String {
    let mut unreachable = false;
    let rows = volumes
        .iter()
        .map(|v| {
            let note = if v.host_status == "unreachable" {
                unreachable = true;
                "*"
            } else {
                ""
            };
            vec![
                format!("{}{note}", v.id),
                v.state.clone(),
                v.name.clone(),
                format!("{}GB", v.size_gb),
                v.region.clone(),
                v.zone.clone(),
                v.encrypted.to_string(),
                v.attached_machine_id.clone().unwrap_or_default(),
                when(&v.created_at),
            ]
        })
        .collect();
    let mut text = table(
        &[
            "ID",
            "STATE",
            "NAME",
            "SIZE",
            "REGION",
            "ZONE",
            "ENCRYPTED",
            "ATTACHED VM",
            "CREATED AT",
        ],
        rows,
    );
    if unreachable {
        text.push_str("\n* These volumes' hosts could not be reached.");
    }
    text
}

fn confirm(question: &str, yes: bool) -> anyhow::Result<bool> {
    if yes {
        return Ok(true);
    }
    if !std::io::stdin().is_terminal() {
        bail!("yes flag must be specified when not running interactively");
    }
    print!("? {question} (y/N) ");
    std::io::stdout().flush()?;
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer)?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes"))
}

async fn list(client: &Client, app: &str, all: bool) -> anyhow::Result<Vec<Volume>> {
    let mut path = volumes_path(app);
    if all {
        path.push_str("?include_deleted=true");
    }
    Ok(client.get(&path).await?)
}

/// `+N` (grow by N GB) or `N` in GB (a unit such as `10GB` is accepted).
fn parse_size(text: &str) -> anyhow::Result<(bool, u64)> {
    let (relative, rest) = match text.strip_prefix('+') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let gb = aloft_config::parse_volume_size_gb(rest)
        .map_err(|e| anyhow::anyhow!("invalid --size {text:?}: {e}"))?;
    if gb == 0 {
        bail!("Volume size must be specified");
    }
    Ok((relative, gb))
}

pub async fn run(api: &ApiArgs, command: VolumesCommand) -> anyhow::Result<()> {
    let client = api.client()?;
    let name = |app: &AppArgs| crate::app_name(app.app.clone(), app.config.as_deref());
    match command {
        VolumesCommand::Create {
            name: volume_name,
            app,
            region,
            size,
            snapshot_retention,
            scheduled_snapshots,
            no_encryption,
            require_unique_zone,
            snapshot_id,
            count,
            yes,
            json,
        } => {
            let app = name(&app)?;
            if !yes && count <= 1 {
                let existing = list(&client, &app, false).await?;
                if !existing.iter().any(|v| v.name == volume_name) {
                    eprintln!(
                        "Warning! Every volume is pinned to a specific physical host. You should create two or more volumes per application to avoid downtime. Learn more at https://fly.io/docs/volumes/overview/"
                    );
                    if !confirm("Do you still want to use the volumes feature?", false)? {
                        return Ok(());
                    }
                }
            }
            let request = CreateVolumeRequest {
                name: volume_name,
                region: region.filter(|r| !r.is_empty()),
                size_gb: Some(size),
                encrypted: Some(!no_encryption),
                require_unique_zone: Some(require_unique_zone),
                snapshot_id: snapshot_id.filter(|s| !s.is_empty()),
                snapshot_retention: Some(snapshot_retention),
                auto_backup_enabled: scheduled_snapshots,
                ..Default::default()
            };
            for _ in 0..count.max(1) {
                let volume = create_volume(&client, &app, &request).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&volume)?);
                } else {
                    print!("{}", print_volume(&volume, &app));
                }
            }
        }
        VolumesCommand::List { app, all, json } => {
            let app = name(&app)?;
            let volumes = list(&client, &app, all)
                .await
                .map_err(|e| anyhow::anyhow!("failed retrieving volumes: {e}"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&volumes)?);
            } else {
                println!("{}", render_table(&volumes));
            }
        }
        VolumesCommand::Show { id, app, json } => {
            let app = name(&app)?;
            let volume: Volume = client
                .get(&volume_path(&app, &id))
                .await
                .map_err(|e| anyhow::anyhow!("failed retrieving volume: {e}"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&volume)?);
            } else {
                print!("{}", print_volume(&volume, &app));
            }
        }
        VolumesCommand::Extend {
            id,
            app,
            size,
            yes: _,
            json,
        } => {
            let app = name(&app)?;
            let (relative, mut gb) = parse_size(&size)?;
            if relative {
                let volume: Volume = client.get(&volume_path(&app, &id)).await?;
                gb += volume.size_gb;
            }
            let extended: ExtendVolumeResponse = client
                .put(
                    &format!("{}/extend", volume_path(&app, &id)),
                    &ExtendVolumeRequest { size_gb: gb },
                )
                .await
                .map_err(|e| anyhow::anyhow!("failed to extend volume: {e}"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&extended.volume)?);
                return Ok(());
            }
            print!("{}", print_volume(&extended.volume, &app));
            if extended.needs_restart {
                println!(
                    "You will need to stop and start your Machine to increase the size of the file system"
                );
            } else {
                println!("Your Machine got its volume size extended without needing a restart");
            }
        }
        VolumesCommand::Fork {
            id,
            app,
            name: new_name,
            region,
            require_unique_zone,
            json,
        } => {
            let app = name(&app)?;
            let source: Volume = client.get(&volume_path(&app, &id)).await?;
            let request = CreateVolumeRequest {
                name: new_name.unwrap_or_else(|| source.name.clone()),
                region: region.filter(|r| !r.is_empty()),
                size_gb: Some(source.size_gb),
                source_volume_id: Some(source.id.clone()),
                require_unique_zone,
                ..Default::default()
            };
            let volume: Volume = client
                .post(&volumes_path(&app), &request)
                .await
                .map_err(|e| anyhow::anyhow!("failed to fork volume: {e}"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&volume)?);
            } else {
                print!("{}", print_volume(&volume, &app));
            }
        }
        VolumesCommand::Snapshots { command } => {
            let app = match &command {
                SnapshotsCommand::List { app, .. } | SnapshotsCommand::Create { app, .. } => {
                    name(app)?
                }
            };
            snapshots(&client, &app, command).await?;
        }
        VolumesCommand::Destroy { ids, app, yes } => {
            let app = name(&app)?;
            for id in ids {
                if !confirm("Are you sure you want to destroy this volume?", yes)? {
                    return Ok(());
                }
                let volume: Volume = client
                    .json::<(), Volume>(Method::DELETE, &volume_path(&app, &id), None)
                    .await
                    .map_err(|e| anyhow::anyhow!("failed destroying volume: {e}"))?;
                println!("Destroyed volume ID: {id} name: {}", volume.name);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_gigabytes_or_increments() {
        assert_eq!(parse_size("3").unwrap(), (false, 3));
        assert_eq!(parse_size("+2").unwrap(), (true, 2));
        assert!(parse_size("0").is_err());
        assert!(parse_size("lots").is_err());
    }

    #[test]
    fn volumes_print_as_flyctl_prints_them() {
        let volume = Volume {
            id: "vol_1".into(),
            name: "data".into(),
            state: "created".into(),
            size_gb: 1,
            region: "local".into(),
            zone: "ab12".into(),
            encrypted: true,
            created_at: "2026-12-05T21:00:00Z".into(),
            snapshot_retention: 5,
            auto_backup_enabled: true,
            host_status: "ok".into(),
            ..Default::default()
        };
        let text = print_volume(&volume, "app");
        assert!(text.contains("                  ID: vol_1\n"), "{text}");
        assert!(
            text.contains("          Created at: 05 Dec 26 21:00 UTC\n"),
            "{text}"
        );
        let table = render_table(&[volume]);
        assert!(table.starts_with("ID"), "{table}");
        assert!(table.contains("ATTACHED VM"), "{table}");
    }
}
