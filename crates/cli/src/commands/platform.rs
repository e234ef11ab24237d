//! `aloft platform regions|vm-sizes`: what the platform offers, as flyctl lists it.

use aloft_api::regions::REGIONS;

use crate::commands::machine::preset;
use crate::output::table;

/// The presets `--vm-size` takes, smallest first.
const VM_SIZES: &[&str] = &[
    "shared-cpu-1x",
    "shared-cpu-2x",
    "shared-cpu-4x",
    "shared-cpu-8x",
    "performance-1x",
    "performance-2x",
    "performance-4x",
    "performance-8x",
    "performance-16x",
];

#[derive(clap::Subcommand, Debug)]
pub enum PlatformCommand {
    /// List the regions machines can run in.
    Regions {
        #[arg(short = 'j', long)]
        json: bool,
    },
    /// List the VM sizes (`--vm-size`).
    #[command(name = "vm-sizes")]
    VmSizes {
        #[arg(short = 'j', long)]
        json: bool,
    },
}

fn memory_text(mb: u32) -> String {
    if mb >= 1024 && mb.is_multiple_of(1024) {
        format!("{} GB", mb / 1024)
    } else {
        format!("{mb} MB")
    }
}

pub fn run(command: PlatformCommand) -> anyhow::Result<()> {
    match command {
        PlatformCommand::Regions { json } => {
            let regions: Vec<_> = REGIONS.iter().filter(|r| !r.deprecated).collect();
            if json {
                let list: Vec<serde_json::Value> = regions
                    .iter()
                    .map(|r| {
                        serde_json::json!({
                            "code": r.code,
                            "name": r.name,
                            "latitude": r.latitude,
                            "longitude": r.longitude,
                            "gatewayAvailable": r.gateway,
                            "requiresPaidPlan": false,
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
                return Ok(());
            }
            let rows = regions
                .iter()
                .map(|r| {
                    vec![
                        r.name.to_string(),
                        r.code.to_string(),
                        if r.gateway { "✓" } else { "" }.to_string(),
                    ]
                })
                .collect();
            println!("{}", table(&["NAME", "CODE", "GATEWAY"], rows));
        }
        PlatformCommand::VmSizes { json } => {
            let sizes: Vec<(&str, &str, u32, u32)> = VM_SIZES
                .iter()
                .filter_map(|name| preset(name).map(|(kind, cpus, mb)| (*name, kind, cpus, mb)))
                .collect();
            if json {
                let list: Vec<serde_json::Value> = sizes
                    .iter()
                    .map(|(name, kind, cpus, mb)| {
                        serde_json::json!({
                            "name": name,
                            "cpu_kind": kind,
                            "cpu_cores": cpus,
                            "memory_mb": mb,
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
                return Ok(());
            }
            let rows = sizes
                .iter()
                .map(|(name, _, cpus, mb)| {
                    vec![name.to_string(), cpus.to_string(), memory_text(*mb)]
                })
                .collect();
            println!("{}", table(&["NAME", "CPU CORES", "MEMORY"], rows));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_reads_like_flyctl() {
        assert_eq!(memory_text(256), "256 MB");
        assert_eq!(memory_text(2048), "2 GB");
    }

    #[test]
    fn every_listed_size_is_a_preset() {
        assert!(VM_SIZES.iter().all(|s| preset(s).is_some()));
    }
}
