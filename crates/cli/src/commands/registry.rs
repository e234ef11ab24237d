//! `aloft registry gc`: untag images of releases older than the last N and delete the
//! blobs nothing references any more.

use aloft_control::releases::{GcRequest, GcResponse};

use crate::settings::ApiArgs;

#[derive(clap::Subcommand, Debug)]
pub enum RegistryCommand {
    /// Garbage-collect the registry: images of releases older than the last N, and
    /// unreferenced blobs.
    Gc {
        /// Keep the images of this many most recent releases per app (default: the server's setting).
        #[arg(long)]
        keep: Option<usize>,
        /// Only prune this app's release images.
        #[arg(short = 'a', long = "app")]
        app: Option<String>,
        /// Unreferenced content younger than this is kept (default 15m; 0s collects everything now).
        #[arg(long)]
        grace: Option<String>,
        #[arg(short = 'j', long)]
        json: bool,
    },
}

pub async fn run(api: &ApiArgs, command: RegistryCommand) -> anyhow::Result<()> {
    match command {
        RegistryCommand::Gc {
            keep,
            app,
            grace,
            json,
        } => {
            let grace_seconds = match grace {
                Some(text) => Some(
                    aloft_api::Duration::parse(&text)
                        .map_err(|e| anyhow::anyhow!("--grace {text:?}: {e}; use e.g. 0s or 15m"))?
                        .to_std()
                        .as_secs(),
                ),
                None => None,
            };
            let request = GcRequest {
                keep,
                app,
                grace_seconds,
            };
            let response: GcResponse = api.client()?.post("/v1/registry/gc", &request).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&response)?);
                return Ok(());
            }
            for image in &response.untagged {
                println!("Untagged {image} (its release is older than the ones kept)");
            }
            println!(
                "Registry garbage collection: {} manifest(s) and {} blob(s) deleted, {} freed, {} stale upload(s) removed",
                response.manifests_deleted,
                response.blobs_deleted,
                human_bytes(response.bytes_freed),
                response.uploads_removed
            );
        }
    }
    Ok(())
}

fn human_bytes(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.1} GB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KB", b as f64 / (1u64 << 10) as f64),
        b => format!("{b} B"),
    }
}
