//! `aloft machine run|list|status|start|stop|restart|destroy|update|clone|cordon|uncordon|leases`,
//! with flyctl's names, flags and output.

use std::collections::BTreeMap;

use aloft_api::{
    CreateAppRequest, CreateMachineRequest, LeaseResponse, Machine, MachineConfig, MachineGuest,
    MachineInit, MachinePort, MachineRestart, MachineService, RestartPolicy, StopRequest,
    UpdateMachineRequest,
};
use aloft_client::{Client, ClientError, encode_component};
use anyhow::{Context, bail};
use http::Method;

use crate::output::{table, when};
use crate::settings::ApiArgs;

#[derive(clap::Args, Debug, Clone, Default)]
pub struct AppArg {
    /// The app (default: `app` in ./fly.toml).
    #[arg(short = 'a', long = "app")]
    pub app: Option<String>,
    #[arg(short = 'c', long = "config")]
    pub config: Option<std::path::PathBuf>,
}

/// `machine clone`'s volume flags, as flyctl's.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct CloneVolumeFlags {
    /// Clone attached volumes and restore from snapshot, use 'last' for most recent
    /// snapshot. The default is an empty volume.
    #[arg(long = "from-snapshot")]
    pub from_snapshot: Option<String>,
    /// Existing volume to attach to the new Machine in the form of
    /// <volume_id>[:/path/inside/machine]
    #[arg(long = "attach-volume")]
    pub attach_volume: Option<String>,
    /// Require volume to be placed in separate hardware zone from existing volumes.
    #[arg(long = "volume-requires-unique-zone", default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub volume_requires_unique_zone: bool,
}

fn volume_id_of(attach_spec: &str) -> &str {
    attach_spec.split(':').next().unwrap_or(attach_spec)
}

/// The clone's mounts, as flyctl makes them: the volume given with `--attach-volume`
/// (unattached, in the clone's region), or else a new volume per source mount with the
/// source volume's name, size and encryption, empty or restored from `--from-snapshot`.
async fn clone_mounts(
    client: &Client,
    app: &str,
    source: &MachineConfig,
    region: &str,
    flags: &CloneVolumeFlags,
    attached: Option<aloft_api::Volume>,
) -> anyhow::Result<Vec<aloft_api::MachineMount>> {
    let mut wanted = source.mounts.clone();
    if let Some(spec) = &flags.attach_volume {
        let path = spec.split_once(':').map(|(_, path)| path.to_string());
        match (wanted.len(), path) {
            (n, _) if n > 1 => {
                bail!("Can't use --attach-volume for Machines with more than 1 volume.")
            }
            (0, None) => bail!(
                "Please specify a mount path on '{spec}' using <volume_id>:/path/inside/machine"
            ),
            (0, Some(path)) => wanted.push(aloft_api::MachineMount {
                path,
                ..Default::default()
            }),
            (_, Some(path)) => {
                println!(
                    "Info: --attach-volume is overriding previous mount point from `{}` to `{path}`.",
                    wanted[0].path
                );
                wanted[0].path = path;
            }
            (_, None) => {}
        }
    }
    let mut mounts = Vec::with_capacity(wanted.len());
    for mount in wanted {
        let volume = if let Some(volume) = &attached {
            println!("Attaching existing volume {}", volume.id);
            if volume
                .attached_machine_id
                .as_deref()
                .is_some_and(|m| !m.is_empty())
            {
                bail!("volume {} is already attached to a machine", volume.id);
            }
            volume.clone()
        } else {
            let source_volume =
                crate::commands::volumes::get_volume(client, app, &mount.volume).await?;
            let snapshot_id = match flags.from_snapshot.as_deref() {
                None | Some("") => {
                    println!("Volume '{}' will start empty", source_volume.name);
                    None
                }
                Some("last") => {
                    let snapshots =
                        crate::commands::volumes::list_snapshots(client, app, &source_volume.id)
                            .await?;
                    match snapshots
                        .into_iter()
                        .max_by(|a, b| a.created_at.cmp(&b.created_at))
                    {
                        Some(snapshot) => {
                            println!(
                                "Creating new volume from snapshot {} of {}",
                                snapshot.id, source_volume.id
                            );
                            Some(snapshot.id)
                        }
                        None => {
                            println!(
                                "No snapshot for source volume {}, the new volume will start empty",
                                source_volume.id
                            );
                            None
                        }
                    }
                }
                Some(id) => {
                    println!("Creating new volume from snapshot: {id}");
                    Some(id.to_string())
                }
            };
            let request = aloft_api::CreateVolumeRequest {
                name: source_volume.name.clone(),
                region: Some(region.to_string()),
                size_gb: Some(mount.size_gb.map_or(source_volume.size_gb, u64::from)),
                encrypted: Some(mount.encrypted.unwrap_or(source_volume.encrypted)),
                snapshot_id,
                require_unique_zone: Some(flags.volume_requires_unique_zone),
                compute: source.guest.clone(),
                compute_image: Some(source.image.clone()),
                ..Default::default()
            };
            crate::commands::volumes::create_volume(client, app, &request).await?
        };
        mounts.push(aloft_api::MachineMount {
            volume: volume.id.clone(),
            name: volume.name.clone(),
            path: mount.path,
            extend_threshold_percent: mount.extend_threshold_percent,
            add_size_gb: mount.add_size_gb,
            size_gb_limit: mount.size_gb_limit,
            ..Default::default()
        });
    }
    Ok(mounts)
}

/// Flags that shape a machine's config (`run`, `create`, `update`).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ConfigFlags {
    /// Environment variables, NAME=VALUE (repeatable).
    #[arg(short = 'e', long = "env")]
    pub env: Vec<String>,
    /// Published ports: port[:machinePort][/protocol[:handler...]] (repeatable), e.g. 80:8080/tcp:http.
    #[arg(short = 'p', long = "port")]
    pub ports: Vec<String>,
    /// Metadata, KEY=VALUE (repeatable).
    #[arg(short = 'm', long = "metadata")]
    pub metadata: Vec<String>,
    /// A preset size such as shared-cpu-1x or performance-2x.
    #[arg(long = "vm-size", alias = "size", short = 's')]
    pub vm_size: Option<String>,
    /// Number of CPUs.
    #[arg(long = "vm-cpus", alias = "cpus")]
    pub vm_cpus: Option<u32>,
    /// Memory in MB.
    #[arg(long = "vm-memory", alias = "memory")]
    pub vm_memory: Option<u32>,
    /// shared or performance.
    #[arg(long = "vm-cpu-kind")]
    pub vm_cpu_kind: Option<String>,
    /// The entrypoint, replacing the image's.
    #[arg(long)]
    pub entrypoint: Option<String>,
    /// Size of the machine's root filesystem in GB (its writable layer's quota).
    #[arg(long = "rootfs-size")]
    pub rootfs_size: Option<u32>,
    /// Restart policy: no, always or on-fail.
    #[arg(long)]
    pub restart: Option<String>,
    /// Start the machine when a request arrives for it.
    #[arg(long)]
    pub autostart: Option<bool>,
    /// Stop (or suspend) the machine when idle: off, stop, suspend.
    #[arg(long, num_args = 0..=1, default_missing_value = "stop")]
    pub autostop: Option<String>,
    /// hourly, daily, weekly or monthly.
    #[arg(long)]
    pub schedule: Option<String>,
    /// Keep the machine out of internal DNS.
    #[arg(long)]
    pub skip_dns_registration: bool,
    /// Volume to mount, as <volume_id_or_name>:/path/inside/machine.
    #[arg(short = 'v', long = "volume")]
    pub volumes: Vec<String>,
}

#[derive(clap::Subcommand, Debug)]
pub enum MachineCommand {
    /// Run a new machine (creating the app when it does not exist).
    Run(RunArgs),
    /// Create a new machine without starting it.
    Create(RunArgs),
    /// List an app's machines.
    #[command(alias = "ls")]
    List {
        #[command(flatten)]
        app: AppArg,
        #[arg(short = 'j', long)]
        json: bool,
        /// Only machine IDs.
        #[arg(short = 'q', long)]
        quiet: bool,
    },
    /// Run a command in a machine.
    Exec(crate::commands::exec::ExecArgs),
    /// Show a machine's details, checks and events.
    Status {
        id: String,
        #[command(flatten)]
        app: AppArg,
        /// Show the machine's config as JSON.
        #[arg(short = 'd', long = "display-config")]
        display_config: bool,
        #[arg(short = 'j', long)]
        json: bool,
    },
    /// Start machines.
    Start {
        #[arg(required = true)]
        ids: Vec<String>,
        #[command(flatten)]
        app: AppArg,
    },
    /// Stop machines.
    Stop {
        #[arg(required = true)]
        ids: Vec<String>,
        #[command(flatten)]
        app: AppArg,
        /// Signal to stop with (default: the machine's kill signal, else SIGINT).
        #[arg(short = 's', long)]
        signal: Option<String>,
        /// Seconds to wait before killing.
        #[arg(long)]
        timeout: Option<u64>,
        /// Wait for the machine to be stopped (default true).
        #[arg(short = 'w', long = "wait-timeout")]
        wait_timeout: Option<u64>,
    },
    /// Suspend machines: their memory is saved and the next start resumes them.
    Suspend {
        #[arg(required = true)]
        ids: Vec<String>,
        #[command(flatten)]
        app: AppArg,
    },
    /// Kill a machine's main process with SIGKILL.
    Kill {
        id: String,
        #[command(flatten)]
        app: AppArg,
    },
    /// Restart machines.
    Restart {
        #[arg(required = true)]
        ids: Vec<String>,
        #[command(flatten)]
        app: AppArg,
        #[arg(short = 's', long)]
        signal: Option<String>,
        /// Seconds to wait for the stop.
        #[arg(long = "time")]
        time: Option<u64>,
        /// Kill rather than stop gracefully.
        #[arg(long)]
        force: bool,
    },
    /// Destroy machines.
    #[command(alias = "remove", alias = "rm")]
    Destroy {
        #[arg(required = true)]
        ids: Vec<String>,
        #[command(flatten)]
        app: AppArg,
        /// Destroy even if running.
        #[arg(short = 'f', long)]
        force: bool,
    },
    /// Change a machine's config (a new version of it).
    Update {
        id: String,
        #[command(flatten)]
        app: AppArg,
        /// A new image.
        #[arg(short = 'i', long)]
        image: Option<String>,
        /// A new command (replaces the image's CMD).
        #[arg(long = "command", short = 'C')]
        command: Option<String>,
        #[command(flatten)]
        flags: ConfigFlags,
        /// Do not start the machine after the update.
        #[arg(long)]
        skip_start: bool,
        /// Accept without asking.
        #[arg(short = 'y', long)]
        yes: bool,
    },
    /// Make a copy of a machine, optionally in another region.
    Clone {
        id: String,
        #[command(flatten)]
        app: AppArg,
        #[arg(short = 'r', long)]
        region: Option<String>,
        #[arg(short = 'n', long)]
        name: Option<String>,
        #[command(flatten)]
        volumes: CloneVolumeFlags,
    },
    /// Take machines out of load balancing.
    Cordon {
        #[arg(required = true)]
        ids: Vec<String>,
        #[command(flatten)]
        app: AppArg,
    },
    /// Put machines back into load balancing.
    Uncordon {
        #[arg(required = true)]
        ids: Vec<String>,
        #[command(flatten)]
        app: AppArg,
    },
    /// Show or clear machine leases.
    Leases {
        #[command(subcommand)]
        command: LeasesCommand,
    },
}

#[derive(clap::Subcommand, Debug)]
pub enum LeasesCommand {
    /// Show the leases of machines (all of the app's when none named).
    #[command(alias = "list", alias = "show")]
    View {
        ids: Vec<String>,
        #[command(flatten)]
        app: AppArg,
        #[arg(short = 'j', long)]
        json: bool,
    },
    /// Release the leases of machines.
    Clear {
        #[arg(required = true)]
        ids: Vec<String>,
        #[command(flatten)]
        app: AppArg,
    },
}

#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// The image to run.
    pub image: String,
    /// Command and arguments (replace the image's CMD).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
    #[command(flatten)]
    pub app: AppArg,
    /// The machine's name.
    #[arg(short = 'n', long)]
    pub name: Option<String>,
    /// The region to run in.
    #[arg(short = 'r', long)]
    pub region: Option<String>,
    /// Destroy the machine when it exits.
    #[arg(long)]
    pub rm: bool,
    /// The organization of an app this creates.
    #[arg(short = 'o', long)]
    pub org: Option<String>,
    /// Return once the machine is created instead of waiting for it to start.
    #[arg(short = 'd', long)]
    pub detach: bool,
    #[command(flatten)]
    pub flags: ConfigFlags,
}

fn app_name(arg: &AppArg) -> anyhow::Result<String> {
    crate::app_name(arg.app.clone(), arg.config.as_deref())
}

pub fn machines_path(app: &str) -> String {
    format!("/v1/apps/{}/machines", encode_component(app))
}

fn machine_path(app: &str, id: &str) -> String {
    format!("{}/{}", machines_path(app), encode_component(id))
}

fn pair(text: &str, what: &str) -> anyhow::Result<(String, String)> {
    let (k, v) = text
        .split_once('=')
        .with_context(|| format!("invalid {what} {text:?}: expected KEY=VALUE"))?;
    if k.is_empty() {
        bail!("invalid {what} {text:?}: the key is empty");
    }
    Ok((k.to_string(), v.to_string()))
}

/// `80:8080/tcp:http:tls` → external 80, internal 8080, tcp, handlers http+tls.
pub fn parse_port(text: &str) -> anyhow::Result<(u16, MachinePort, String)> {
    let (ports, rest) = text.split_once('/').unwrap_or((text, "tcp"));
    let mut rest = rest.split(':');
    let protocol = rest
        .next()
        .filter(|p| !p.is_empty())
        .unwrap_or("tcp")
        .to_string();
    if !matches!(protocol.as_str(), "tcp" | "udp") {
        bail!("invalid --port {text:?}: protocol {protocol:?} must be tcp or udp");
    }
    let handlers: Vec<String> = rest.filter(|h| !h.is_empty()).map(str::to_string).collect();
    let (external, internal) = ports.split_once(':').unwrap_or((ports, ports));
    let external: u16 = external
        .parse()
        .with_context(|| format!("invalid --port {text:?}: {external:?} is not a port number"))?;
    let internal: u16 = internal
        .parse()
        .with_context(|| format!("invalid --port {text:?}: {internal:?} is not a port number"))?;
    Ok((
        internal,
        MachinePort {
            port: Some(external),
            handlers,
            ..Default::default()
        },
        protocol,
    ))
}

fn apply_flags(config: &mut MachineConfig, flags: &ConfigFlags) -> anyhow::Result<()> {
    for text in &flags.env {
        let (k, v) = pair(text, "--env")?;
        config.env.insert(k, v);
    }
    for text in &flags.metadata {
        let (k, v) = pair(text, "--metadata")?;
        config.metadata.insert(k, v);
    }
    for text in &flags.ports {
        let (internal, port, protocol) = parse_port(text)?;
        match config
            .services
            .iter_mut()
            .find(|s| s.internal_port == internal && s.protocol == protocol)
        {
            Some(service) => service.ports.push(port),
            None => config.services.push(MachineService {
                protocol,
                internal_port: internal,
                ports: vec![port],
                ..Default::default()
            }),
        }
    }
    if flags.autostart.is_some() || flags.autostop.is_some() {
        let autostop = match flags.autostop.as_deref() {
            None => None,
            Some(text) => Some(aloft_api::AutoStop::parse(text).with_context(|| {
                format!("invalid --autostop {text:?}: use off, stop or suspend")
            })?),
        };
        for service in &mut config.services {
            if flags.autostart.is_some() {
                service.autostart = flags.autostart;
            }
            if autostop.is_some() {
                service.autostop = autostop;
            }
        }
    }
    if let Some(size) = &flags.vm_size {
        config.size = Some(size.clone());
        let (kind, cpus, memory) = preset(size).with_context(|| {
            format!("invalid --vm-size {size:?}: use e.g. shared-cpu-1x or performance-2x")
        })?;
        config.guest = Some(MachineGuest {
            cpu_kind: kind.into(),
            cpus,
            memory_mb: memory,
            ..Default::default()
        });
    }
    if flags.vm_cpus.is_some() || flags.vm_memory.is_some() || flags.vm_cpu_kind.is_some() {
        let guest = config
            .guest
            .get_or_insert_with(MachineGuest::default_shared);
        if let Some(cpus) = flags.vm_cpus {
            guest.cpus = cpus;
        }
        if let Some(memory) = flags.vm_memory {
            guest.memory_mb = memory;
        }
        if let Some(kind) = &flags.vm_cpu_kind {
            guest.cpu_kind = kind.clone();
        }
    }
    if let Some(size) = flags.rootfs_size {
        config.rootfs.get_or_insert_with(Default::default).size_gb = Some(size);
    }
    if let Some(entrypoint) = &flags.entrypoint {
        config
            .init
            .get_or_insert_with(MachineInit::default)
            .entrypoint = shell_split(entrypoint);
    }
    if let Some(restart) = &flags.restart {
        let policy = match restart.as_str() {
            "no" | "never" => RestartPolicy::No,
            "always" => RestartPolicy::Always,
            "on-fail" | "on-failure" => RestartPolicy::OnFailure,
            other => bail!("invalid --restart {other:?}: use no, always or on-fail"),
        };
        config.restart = Some(MachineRestart {
            policy,
            max_retries: None,
        });
    }
    if let Some(schedule) = &flags.schedule {
        config.schedule = Some(schedule.clone());
    }
    for volume in &flags.volumes {
        let Some((source, path)) = volume.split_once(':') else {
            bail!("invalid --volume {volume:?}: use <volume_id_or_name>:/path/inside/machine");
        };
        if source.is_empty() || !path.starts_with('/') {
            bail!("invalid --volume {volume:?}: use <volume_id_or_name>:/path/inside/machine");
        }
        config.mounts = vec![aloft_api::MachineMount {
            volume: source.to_string(),
            path: path.to_string(),
            ..Default::default()
        }];
    }
    if flags.skip_dns_registration {
        config
            .dns
            .get_or_insert_with(Default::default)
            .skip_registration = true;
    }
    Ok(())
}

/// Fly's presets: (cpu kind, cpus, memory MB).
pub fn preset(size: &str) -> Option<(&'static str, u32, u32)> {
    let (kind, rest) = if let Some(rest) = size.strip_prefix("shared-cpu-") {
        ("shared", rest)
    } else {
        ("performance", size.strip_prefix("performance-")?)
    };
    let cpus: u32 = rest.strip_suffix('x')?.parse().ok()?;
    let memory = if kind == "shared" {
        256 * cpus
    } else {
        2048 * cpus
    };
    Some((kind, cpus, memory))
}

fn shell_split(text: &str) -> Vec<String> {
    text.split_whitespace().map(str::to_string).collect()
}

async fn get_machine(client: &Client, app: &str, id: &str) -> anyhow::Result<Machine> {
    client
        .get(&machine_path(app, id))
        .await
        .map_err(|e| not_found(e, app, id))
}

fn not_found(err: ClientError, app: &str, id: &str) -> anyhow::Error {
    match err {
        ClientError::Api { status, .. } if status == http::StatusCode::NOT_FOUND => {
            anyhow::anyhow!("machine {id} not found in app {app}")
        }
        other => other.into(),
    }
}

async fn ensure_app(client: &Client, app: &str, org: Option<&str>) -> anyhow::Result<()> {
    match client
        .get::<serde_json::Value>(&format!("/v1/apps/{}", encode_component(app)))
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if e.is_not_found() => {
            let request = CreateAppRequest {
                app_name: app.to_string(),
                org_slug: org.unwrap_or_default().to_string(),
                network: None,
                enable_subdomains: None,
            };
            client
                .post::<_, serde_json::Value>("/v1/apps", &request)
                .await
                .with_context(|| format!("creating app {app}"))?;
            println!("App '{app}' does not exist, created it");
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

async fn wait(
    client: &Client,
    app: &str,
    id: &str,
    state: &str,
    instance_id: Option<&str>,
    seconds: u64,
) -> anyhow::Result<()> {
    let mut path = format!(
        "{}/wait?state={state}&timeout={seconds}",
        machine_path(app, id)
    );
    if let Some(instance) = instance_id {
        path.push_str(&format!("&instance_id={}", encode_component(instance)));
    }
    client
        .call::<()>(Method::GET, &path, None)
        .await
        .with_context(|| format!("waiting for machine {id} to be {state}"))
}

pub async fn run(api: &ApiArgs, command: MachineCommand) -> anyhow::Result<()> {
    let client = api.client()?;
    match command {
        MachineCommand::Run(args) => run_machine(&client, args, true).await,
        MachineCommand::Create(args) => run_machine(&client, args, false).await,
        MachineCommand::List { app, json, quiet } => {
            crate::commands::status::machine_list(api, &app_name(&app)?, json, quiet).await
        }
        MachineCommand::Exec(args) => {
            let app = app_name(&AppArg {
                app: args.app.clone(),
                config: args.config.clone(),
            })?;
            match crate::commands::exec::run(api, &app, &args).await? {
                0 => Ok(()),
                code => bail!("the command exited with code {code}"),
            }
        }
        MachineCommand::Status {
            id,
            app,
            display_config,
            json,
        } => status(&client, &app_name(&app)?, &id, display_config, json).await,
        MachineCommand::Start { ids, app } => {
            let app = app_name(&app)?;
            for id in ids {
                client
                    .call::<()>(
                        Method::POST,
                        &format!("{}/start", machine_path(&app, &id)),
                        None,
                    )
                    .await
                    .map_err(|e| not_found(e, &app, &id))?;
                println!("{id} has been started");
            }
            Ok(())
        }
        MachineCommand::Suspend { ids, app } => {
            let app = app_name(&app)?;
            for id in ids {
                println!("Suspending machine {id}");
                client
                    .call::<()>(
                        Method::POST,
                        &format!("{}/suspend", machine_path(&app, &id)),
                        None,
                    )
                    .await
                    .map_err(|e| not_found(e, &app, &id))?;
                wait(&client, &app, &id, "suspended", None, 60).await?;
                println!("Machine {id} was suspended");
            }
            Ok(())
        }
        MachineCommand::Kill { id, app } => {
            let app = app_name(&app)?;
            client
                .call(
                    Method::POST,
                    &format!("{}/signal", machine_path(&app, &id)),
                    Some(&aloft_api::SignalRequest {
                        signal: "SIGKILL".into(),
                    }),
                )
                .await
                .map_err(|e| not_found(e, &app, &id))?;
            println!("Kill signal has been sent");
            Ok(())
        }
        MachineCommand::Stop {
            ids,
            app,
            signal,
            timeout,
            wait_timeout,
        } => {
            let app = app_name(&app)?;
            for id in ids {
                let request = StopRequest {
                    signal: signal.clone(),
                    timeout: timeout.map(|t| aloft_api::Duration::from_secs(t as i64)),
                };
                println!("Sending kill signal to machine {id}...");
                client
                    .call(
                        Method::POST,
                        &format!("{}/stop", machine_path(&app, &id)),
                        Some(&request),
                    )
                    .await
                    .map_err(|e| not_found(e, &app, &id))?;
                wait(
                    &client,
                    &app,
                    &id,
                    "stopped",
                    None,
                    wait_timeout.unwrap_or(60).min(60),
                )
                .await?;
                println!("{id} has been successfully stopped");
            }
            Ok(())
        }
        MachineCommand::Restart {
            ids,
            app,
            signal,
            time,
            force,
        } => {
            let app = app_name(&app)?;
            for id in ids {
                println!("Restarting machine {id}");
                let mut path = format!("{}/restart?force_stop={force}", machine_path(&app, &id));
                if let Some(signal) = &signal {
                    path.push_str(&format!("&signal={}", encode_component(signal)));
                }
                if let Some(time) = time {
                    path.push_str(&format!("&timeout={time}s"));
                }
                client
                    .call::<()>(Method::POST, &path, None)
                    .await
                    .map_err(|e| not_found(e, &app, &id))?;
                println!("  Waiting for {id} to become healthy (started)");
                wait(&client, &app, &id, "started", None, 60).await?;
                println!("Machine {id} restarted successfully!");
            }
            Ok(())
        }
        MachineCommand::Destroy { ids, app, force } => {
            let app = app_name(&app)?;
            for id in ids {
                let machine = get_machine(&client, &app, &id).await?;
                println!(
                    "machine {id} was found and is currently in {} state, attempting to destroy...",
                    machine.state
                );
                client
                    .call::<()>(
                        Method::DELETE,
                        &format!("{}?force={force}", machine_path(&app, &id)),
                        None,
                    )
                    .await
                    .map_err(|e| match e {
                        ClientError::Api { status, message }
                            if status == http::StatusCode::PRECONDITION_FAILED && !force =>
                        {
                            anyhow::anyhow!("{message} (use --force to destroy a running machine)")
                        }
                        other => other.into(),
                    })?;
                println!("{id} has been destroyed");
            }
            Ok(())
        }
        MachineCommand::Update {
            id,
            app,
            image,
            command,
            flags,
            skip_start,
            yes: _,
        } => {
            let app = app_name(&app)?;
            let machine = get_machine(&client, &app, &id).await?;
            let mut config = machine.config.clone();
            if let Some(image) = image {
                config.image = image;
            }
            if let Some(command) = command {
                config.init.get_or_insert_with(MachineInit::default).cmd = shell_split(&command);
            }
            apply_flags(&mut config, &flags)?;
            println!("Updating machine {id}");
            let request = UpdateMachineRequest {
                create: CreateMachineRequest {
                    config,
                    skip_launch: skip_start,
                    ..Default::default()
                },
                current_version: Some(machine.instance_id.clone()),
            };
            let updated: Machine = client
                .post(&machine_path(&app, &id), &request)
                .await
                .map_err(|e| not_found(e, &app, &id))?;
            if !skip_start && updated.state != aloft_api::MachineState::Stopped {
                println!("  Waiting for {id} to become healthy (started)");
                wait(
                    &client,
                    &app,
                    &id,
                    "started",
                    Some(&updated.instance_id),
                    60,
                )
                .await?;
            }
            println!("Machine {id} updated successfully!");
            Ok(())
        }
        MachineCommand::Clone {
            id,
            app,
            region,
            name,
            volumes,
        } => {
            let app = app_name(&app)?;
            let source = get_machine(&client, &app, &id).await?;
            if source.host_status != "ok" {
                bail!("the machine is on an unreachable host, try again later");
            }
            let attached = match &volumes.attach_volume {
                Some(spec) => Some(
                    crate::commands::volumes::get_volume(&client, &app, volume_id_of(spec))
                        .await
                        .context("could not get existing volume")?,
                ),
                None => None,
            };
            let region = match (&attached, region) {
                (Some(volume), Some(region)) if volume.region != region => bail!(
                    "specified region {region} but volume is in region {}, use the same region as the volume",
                    volume.region
                ),
                (Some(volume), None) => volume.region.clone(),
                (_, Some(region)) => region,
                (None, None) => source.region.clone(),
            };
            println!("Cloning machine {id} into region {region}");
            let mut config = source.config.clone();
            config.mounts =
                clone_mounts(&client, &app, &source.config, &region, &volumes, attached).await?;
            let request = CreateMachineRequest {
                name,
                region: Some(region),
                config,
                ..Default::default()
            };
            let machine: Machine = client.post(&machines_path(&app), &request).await?;
            println!("  Machine {} has been created...", machine.id);
            println!("  Waiting for machine {} to start...", machine.id);
            wait(
                &client,
                &app,
                &machine.id,
                "started",
                Some(&machine.instance_id),
                60,
            )
            .await?;
            println!("Machine has been cloned: {} ({})", machine.id, machine.name);
            Ok(())
        }
        MachineCommand::Cordon { ids, app } => {
            toggle_cordon(&client, &app_name(&app)?, &ids, true).await
        }
        MachineCommand::Uncordon { ids, app } => {
            toggle_cordon(&client, &app_name(&app)?, &ids, false).await
        }
        MachineCommand::Leases { command } => leases(&client, command).await,
    }
}

async fn toggle_cordon(
    client: &Client,
    app: &str,
    ids: &[String],
    cordon: bool,
) -> anyhow::Result<()> {
    let (verb, path) = if cordon {
        ("Cordoning", "cordon")
    } else {
        ("Uncordoning", "uncordon")
    };
    for id in ids {
        client
            .call::<()>(
                Method::POST,
                &format!("{}/{path}", machine_path(app, id)),
                None,
            )
            .await
            .map_err(|e| not_found(e, app, id))?;
        println!("{verb} machine {id}... done");
    }
    Ok(())
}

async fn run_machine(client: &Client, args: RunArgs, start: bool) -> anyhow::Result<()> {
    let app = app_name(&args.app)?;
    ensure_app(client, &app, args.org.as_deref()).await?;
    let mut config = MachineConfig {
        image: args.image.clone(),
        ..Default::default()
    };
    if !args.command.is_empty() {
        config.init = Some(MachineInit {
            cmd: args.command.clone(),
            ..Default::default()
        });
    }
    // `fly machine run` restarts always by default; --rm never restarts and destroys on
    // exit; a scheduled machine restarts only on failure (it is meant to exit).
    config.restart = Some(MachineRestart {
        policy: if args.rm {
            RestartPolicy::No
        } else if args.flags.schedule.is_some() {
            RestartPolicy::OnFailure
        } else {
            RestartPolicy::Always
        },
        max_retries: None,
    });
    config.auto_destroy = args.rm;
    apply_flags(&mut config, &args.flags)?;
    resolve_volume_names(client, &app, &mut config).await?;
    let request = CreateMachineRequest {
        name: args.name.clone(),
        region: args.region.clone(),
        config,
        skip_launch: !start,
        ..Default::default()
    };
    let machine: Machine = client
        .post(&machines_path(&app), &request)
        .await
        .with_context(|| format!("launching a machine in app {app}"))?;
    println!("Success! A Machine has been successfully launched in app {app}");
    println!(" Machine ID: {}", machine.id);
    println!(" Instance ID: {}", machine.instance_id);
    println!(" State: {}", machine.state);
    if start && !args.detach && machine.state != aloft_api::MachineState::Started {
        println!();
        println!(" Attempting to start machine...");
        wait(
            client,
            &app,
            &machine.id,
            "started",
            Some(&machine.instance_id),
            60,
        )
        .await?;
    }
    if start {
        let machine = get_machine(client, &app, &machine.id).await?;
        println!();
        println!("Machine started, you can connect via the following private ip");
        println!(
            "  {}",
            if machine.private_ip.is_empty() {
                "(no private address assigned)"
            } else {
                &machine.private_ip
            }
        );
    }
    Ok(())
}

/// A `--volume` given by name becomes the ID of an unattached volume of that name.
async fn resolve_volume_names(
    client: &Client,
    app: &str,
    config: &mut MachineConfig,
) -> anyhow::Result<()> {
    for mount in &mut config.mounts {
        if mount.volume.starts_with("vol_") {
            continue;
        }
        let volumes: Vec<aloft_api::Volume> = client
            .get(&format!("/v1/apps/{}/volumes", encode_component(app)))
            .await?;
        let Some(volume) = volumes
            .iter()
            .find(|v| v.name == mount.volume && v.attached_machine_id.is_none())
        else {
            bail!(
                "invalid --volume: app {app} has no unattached volume named {:?}; create one with `aloft volumes create {}`",
                mount.volume,
                mount.volume
            );
        };
        mount.name = volume.name.clone();
        mount.volume = volume.id.clone();
    }
    Ok(())
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

async fn status(
    client: &Client,
    app: &str,
    id: &str,
    display_config: bool,
    json: bool,
) -> anyhow::Result<()> {
    let machine = get_machine(client, app, id).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&machine)?);
        return Ok(());
    }
    let events: Vec<aloft_api::MachineEvent> = client
        .get(&format!("{}/events", machine_path(app, id)))
        .await?;
    let guest = machine
        .config
        .guest
        .clone()
        .unwrap_or_else(MachineGuest::default_shared);
    let init = machine.config.init.clone().unwrap_or_default();
    println!("Machine ID: {}", machine.id);
    println!("Instance ID: {}", machine.instance_id);
    println!("State: {}", machine.state);
    println!();
    println!("VM");
    let rows: Vec<(&str, String)> = vec![
        ("ID", machine.id.clone()),
        ("Instance ID", machine.instance_id.clone()),
        ("State", machine.state.to_string()),
        (
            "Image",
            format!("{}:{}", machine.image_ref.repository, machine.image_ref.tag),
        ),
        ("Name", machine.name.clone()),
        ("Private IP", machine.private_ip.clone()),
        ("Region", machine.region.clone()),
        (
            "Process Group",
            // As `machine list` shows it: a machine outside any group is in `app`.
            machine.config.process_group().unwrap_or("app").to_string(),
        ),
        (
            "CPU Kind",
            if guest.cpu_kind.is_empty() {
                "shared".into()
            } else {
                guest.cpu_kind.clone()
            },
        ),
        ("vCPUs", guest.cpus.max(1).to_string()),
        ("Memory", guest.memory_mb.to_string()),
        ("Created", machine.created_at.clone()),
        ("Updated", machine.updated_at.clone()),
        ("Entrypoint", init.entrypoint.join(" ")),
        ("Command", init.cmd.join(" ")),
        ("Cordoned", machine.cordoned.unwrap_or(false).to_string()),
    ];
    for (key, value) in rows {
        println!("  {key:<13} = {value}");
    }
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
    if display_config {
        println!();
        println!("Config:");
        println!("{}", serde_json::to_string_pretty(&machine.config)?);
    }
    Ok(())
}

async fn leases(client: &Client, command: LeasesCommand) -> anyhow::Result<()> {
    match command {
        LeasesCommand::View { ids, app, json } => {
            let app = app_name(&app)?;
            let ids = if ids.is_empty() {
                let machines: Vec<Machine> = client.get(&machines_path(&app)).await?;
                machines.into_iter().map(|m| m.id).collect()
            } else {
                ids
            };
            let mut found: BTreeMap<String, aloft_api::Lease> = BTreeMap::new();
            for id in &ids {
                match client
                    .get::<LeaseResponse>(&format!("{}/lease", machine_path(&app, id)))
                    .await
                {
                    Ok(lease) => {
                        found.insert(id.clone(), lease.lease);
                    }
                    Err(e) if e.is_not_found() => {}
                    Err(e) => return Err(e.into()),
                }
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&found)?);
                return Ok(());
            }
            if found.is_empty() {
                println!("No machine leases are held in app {app}");
                return Ok(());
            }
            let rows = found
                .iter()
                .map(|(id, lease)| {
                    let expires = chrono::DateTime::from_timestamp(lease.expires_at, 0)
                        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
                        .unwrap_or_default();
                    vec![
                        id.clone(),
                        lease.nonce.clone(),
                        when(&expires),
                        lease.owner.clone(),
                        lease.description.clone(),
                    ]
                })
                .collect();
            println!(
                "{}",
                table(
                    &[
                        "MACHINE ID",
                        "LEASE NONCE",
                        "EXPIRES AT",
                        "OWNER",
                        "DESCRIPTION"
                    ],
                    rows
                )
            );
            Ok(())
        }
        LeasesCommand::Clear { ids, app } => {
            let app = app_name(&app)?;
            for id in ids {
                let path = format!("{}/lease", machine_path(&app, &id));
                let lease = match client.get::<LeaseResponse>(&path).await {
                    Ok(lease) => lease.lease,
                    Err(e) if e.is_not_found() => {
                        println!("machine {id} has no lease");
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                };
                let (status, body) = client
                    .raw(
                        Method::DELETE,
                        &path,
                        None,
                        &[("fly-machine-lease-nonce", &lease.nonce)],
                    )
                    .await?;
                if !status.is_success() {
                    return Err(aloft_client::api_error(status, &body).into());
                }
                println!("clearing lease for machine {id}... done");
            }
            Ok(())
        }
    }
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

    #[test]
    fn ports_parse_like_flyctl() {
        let (internal, port, protocol) = parse_port("443:8080/tcp:tls:http").unwrap();
        assert_eq!(
            (internal, port.port, protocol.as_str()),
            (8080, Some(443), "tcp")
        );
        assert_eq!(port.handlers, vec!["tls", "http"]);
        let (internal, port, _) = parse_port("80").unwrap();
        assert_eq!((internal, port.port), (80, Some(80)));
        assert!(parse_port("80/sctp").is_err());
        assert!(parse_port("eighty").is_err());
    }

    #[test]
    fn presets_match_fly_sizes() {
        assert_eq!(preset("shared-cpu-2x"), Some(("shared", 2, 512)));
        assert_eq!(preset("performance-1x"), Some(("performance", 1, 2048)));
        assert_eq!(preset("huge"), None);
    }
}
