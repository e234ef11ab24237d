//! `aloft config`: validate, show, convert and normalise an app's fly.toml (flyctl's
//! `fly config ...` commands, working on the local file).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use aloft_config::{
    AppConfig, CONSOLE_GROUP, Diagnostic, Loaded, MachineConfigOptions, RELEASE_COMMAND_GROUP,
    Severity,
};
use anyhow::Context;

#[derive(clap::Subcommand, Debug)]
pub enum ConfigCommand {
    /// Validate the app's config file, reporting every problem at once.
    Validate {
        /// Path to the config file, or a directory holding fly.toml.
        #[arg(short = 'c', long = "config")]
        config: Option<PathBuf>,
        /// Treat unknown sections and keys as errors.
        #[arg(long)]
        strict: bool,
    },
    /// Print the normalised config as JSON.
    Show {
        /// Path to the config file, or a directory holding fly.toml.
        #[arg(short = 'c', long = "config")]
        config: Option<PathBuf>,
    },
    /// Print the Machines API config of each process group as JSON.
    MachineConfig {
        /// Path to the config file, or a directory holding fly.toml.
        #[arg(short = 'c', long = "config")]
        config: Option<PathBuf>,
        /// Only this process group (also `fly_app_release_command`, `fly_app_console`).
        #[arg(long)]
        group: Option<String>,
    },
    /// Rewrite the config file in normalised form, keeping comments of untouched parts.
    Save {
        /// Path to the config file, or a directory holding fly.toml.
        #[arg(short = 'c', long = "config")]
        config: Option<PathBuf>,
    },
}

/// Runs a `config` subcommand; returns the process exit code.
pub fn run(cmd: ConfigCommand) -> anyhow::Result<i32> {
    let cwd = std::env::current_dir().context("reading the current directory")?;
    match cmd {
        ConfigCommand::Validate { config, strict } => {
            validate(&resolve(config.as_deref(), &cwd), strict)
        }
        ConfigCommand::Show { config } => show(&resolve(config.as_deref(), &cwd)),
        ConfigCommand::MachineConfig { config, group } => {
            machine_config(&resolve(config.as_deref(), &cwd), group)
        }
        ConfigCommand::Save { config } => save(&resolve(config.as_deref(), &cwd)),
    }
}

fn resolve(explicit: Option<&Path>, cwd: &Path) -> PathBuf {
    aloft_config::locate(explicit, cwd)
}

fn print_problem(diagnostic: &Diagnostic) {
    match diagnostic.severity {
        Severity::Error => println!("✘{diagnostic}"),
        Severity::Warning => println!("WARNING {diagnostic}"),
    }
}

/// Loads the file, printing why it can't be read when it can't.
fn load_or_report(path: &Path) -> Option<Loaded> {
    match aloft_config::load(path) {
        Ok(loaded) => Some(loaded),
        Err(error) => {
            println!("✘{error}");
            eprintln!("Error: App configuration is not valid");
            None
        }
    }
}

fn validate(path: &Path, strict: bool) -> anyhow::Result<i32> {
    println!("Validating {}", path.display());
    let Some(loaded) = load_or_report(path) else {
        return Ok(1);
    };
    let diagnostics = loaded.diagnostics(strict);
    for diagnostic in diagnostics
        .iter()
        .filter(|d| d.severity == Severity::Warning)
    {
        print_problem(diagnostic);
    }
    let errors: Vec<&Diagnostic> = diagnostics
        .iter()
        .filter(|d| d.severity == Severity::Error)
        .collect();
    if errors.is_empty() {
        println!("✓ Configuration is valid");
        return Ok(0);
    }
    for error in &errors {
        print_problem(error);
    }
    let unknown_only = errors
        .iter()
        .all(|d| d.code == aloft_config::DiagnosticCode::UnknownKey);
    if strict && unknown_only {
        eprintln!("Error: strict validation failed");
    } else {
        eprintln!("Error: App configuration is not valid");
    }
    Ok(1)
}

/// Prints the load errors of a config that only holds `app`; true when there were some.
fn report_load_errors(config: &AppConfig) -> bool {
    for error in config.load_errors() {
        eprintln!("✘{error}");
    }
    !config.load_errors().is_empty()
}

fn show(path: &Path) -> anyhow::Result<i32> {
    let Some(loaded) = load_or_report(path) else {
        return Ok(1);
    };
    println!("{}", aloft_config::to_flyctl_json(&loaded.config)?);
    if report_load_errors(&loaded.config) {
        eprintln!("Error: App configuration is not valid");
        return Ok(1);
    }
    Ok(0)
}

fn machine_config(path: &Path, group: Option<String>) -> anyhow::Result<i32> {
    let Some(loaded) = load_or_report(path) else {
        return Ok(1);
    };
    let config = &loaded.config;
    if report_load_errors(config) {
        eprintln!("Error: App configuration is not valid");
        return Ok(1);
    }
    let opts = MachineConfigOptions {
        image: config
            .build
            .as_ref()
            .and_then(|b| b.image.clone())
            .unwrap_or_default(),
        ..MachineConfigOptions::default()
    };
    let output = match group.as_deref() {
        Some(RELEASE_COMMAND_GROUP) => match config.release_command_machine_config(&opts) {
            Some(result) => serde_json::to_value(result?)?,
            None => {
                eprintln!("Error: the config has no [deploy] release_command");
                return Ok(1);
            }
        },
        Some(CONSOLE_GROUP) => serde_json::to_value(config.console_machine_config(&opts)?)?,
        Some(group) => match config.to_machine_config(group, &opts) {
            Ok(machine) => serde_json::to_value(machine)?,
            Err(error) => {
                eprintln!("Error: {error}");
                return Ok(1);
            }
        },
        None => {
            let mut all = BTreeMap::new();
            for group in config.process_groups() {
                match config.to_machine_config(&group, &opts) {
                    Ok(machine) => {
                        all.insert(group, machine);
                    }
                    Err(error) => {
                        eprintln!("Error: {error}");
                        return Ok(1);
                    }
                }
            }
            serde_json::to_value(all)?
        }
    };
    println!("{}", serde_json::to_string_pretty(&output)?);
    Ok(0)
}

fn save(path: &Path) -> anyhow::Result<i32> {
    let Some(loaded) = load_or_report(path) else {
        return Ok(1);
    };
    if report_load_errors(&loaded.config) {
        eprintln!("Error: not saving: the config has errors that would lose data; fix them first");
        return Ok(1);
    }
    aloft_config::save(&loaded.config, &loaded.path)
        .with_context(|| format!("writing {}", loaded.path.display()))?;
    println!("Wrote config file {}", loaded.path.display());
    Ok(0)
}
