//! `aloft`: every user command, and the platform's daemons.

mod commands;
mod output;
mod settings;

use clap::{Parser, Subcommand};

use crate::commands::apps::AppsCommand;
use crate::commands::deploy::DeployArgs;
use crate::commands::launch::LaunchArgs;
use crate::commands::machine::MachineCommand;
use crate::commands::orgs::OrgsCommand;
use crate::commands::registry::RegistryCommand;
use crate::commands::scale::ScaleCommand;
use crate::commands::server::ServerArgs;
use crate::commands::tokens::TokensCommand;
use crate::settings::ApiArgs;

#[derive(Parser, Debug)]
#[command(
    name = "aloft",
    version = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("ALOFT_COMMIT"), ")"),
    about = "Aloft: a self-hosted application platform that runs fly.toml apps"
)]
struct Cli {
    #[command(flatten)]
    api: ApiArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a single-host platform in the foreground (API, registry, agent, proxy), or with
    /// `--join URL` a host of a remote control plane (agent, proxy, DNS, mesh).
    Server(Box<ServerArgs>),
    /// Run the control plane alone (API, registry, catalog), e.g. on PostgreSQL.
    Control(commands::control::ControlArgs),
    /// Join this host to a control plane and run its machines (`aloft tokens create host`
    /// makes the token).
    Agent(commands::agent::AgentArgs),
    /// Development tools: `aloft dev cluster up|down|status` runs a multi-host platform on
    /// this machine.
    Dev {
        #[command(subcommand)]
        command: commands::dev_cluster::DevCommand,
    },
    /// The platform's hosts: list, show, cordon, uncordon, remove (admin token).
    #[command(alias = "host")]
    Hosts {
        #[command(subcommand)]
        command: commands::hosts::HostsCommand,
    },
    /// Manage apps.
    Apps {
        #[command(subcommand)]
        command: AppsCommand,
    },
    /// Deploy an app from fly.toml.
    Deploy(DeployArgs),
    /// Create an app from a directory of source code: writes fly.toml (and a Dockerfile).
    Launch(LaunchArgs),
    /// List an app's releases.
    Releases {
        #[arg(short = 'a', long = "app")]
        app: Option<String>,
        #[arg(short = 'c', long = "config")]
        config: Option<std::path::PathBuf>,
        /// Show each release's image.
        #[arg(long)]
        image: bool,
        #[arg(short = 'j', long)]
        json: bool,
    },
    /// Scale an app's machines: count, size, memory.
    Scale {
        #[command(subcommand)]
        command: ScaleCommand,
    },
    /// The platform's image registry.
    Registry {
        #[command(subcommand)]
        command: RegistryCommand,
    },
    /// Serve a directory of static files (the server inside images of the static builder).
    #[command(name = "static-server", hide = true)]
    StaticServer {
        dir: std::path::PathBuf,
        /// Port (default: $PORT, else 8080).
        #[arg(long)]
        port: Option<u16>,
    },
    /// Show an app's status and machines.
    Status {
        #[arg(short = 'a', long = "app")]
        app: Option<String>,
        #[arg(short = 'c', long = "config")]
        config: Option<std::path::PathBuf>,
        #[arg(short = 'j', long)]
        json: bool,
    },
    /// Manage machines.
    #[command(alias = "machines", alias = "m")]
    Machine {
        #[command(subcommand)]
        command: MachineCommand,
    },
    /// Manage app secrets (sealed at rest, set as env vars in the app's machines).
    Secrets {
        #[command(subcommand)]
        command: commands::secrets::SecretsCommand,
    },
    /// Validate, show and convert the app's fly.toml.
    Config {
        #[command(subcommand)]
        command: commands::config::ConfigCommand,
    },
    /// Stream an app's logs.
    Logs(commands::logs::LogsArgs),
    /// Shells inside machines.
    Ssh {
        #[command(subcommand)]
        command: commands::ssh::SshCommand,
    },
    /// Health checks.
    Checks {
        #[command(subcommand)]
        command: commands::checks::ChecksCommand,
    },
    /// Manage organizations.
    #[command(alias = "org")]
    Orgs {
        #[command(subcommand)]
        command: OrgsCommand,
    },
    /// Check that this host has what `aloft server` needs, and say how to get what is missing.
    Doctor(commands::doctor::DoctorArgs),
    /// Operator commands run as root on the host, from the data dir (`admin token`).
    Admin {
        #[command(subcommand)]
        command: commands::admin::AdminCommand,
    },
    /// Manage access tokens.
    #[command(alias = "token")]
    Tokens {
        #[command(subcommand)]
        command: TokensCommand,
    },
    /// Authentication.
    Auth {
        #[command(subcommand)]
        command: AuthCommand,
    },
    /// Manage certificates: the app's hostnames and their TLS certificates.
    Certs {
        #[command(subcommand)]
        command: commands::certs::CertsCommand,
    },
    /// Manage the app's IP addresses (public and Flycast).
    Ips {
        #[command(subcommand)]
        command: commands::ips::IpsCommand,
    },
    /// Manage Fly Volumes: persistent storage for machines.
    #[command(alias = "volume", alias = "vol", alias = "v")]
    Volumes {
        #[command(subcommand)]
        command: commands::volumes::VolumesCommand,
    },
    /// Look up a name with the app's private-network resolver.
    Dig(commands::dig::DigArgs),
    /// Forward a local port to an address in the app's private network.
    Proxy(commands::proxy::ProxyArgs),
    /// What the platform offers: regions and VM sizes.
    Platform {
        #[command(subcommand)]
        command: commands::platform::PlatformCommand,
    },
    /// Open the app's URL in a browser (prints it).
    Open(commands::open::OpenArgs),
    /// Print the environment that points the real flyctl at this Aloft:
    /// `eval "$(aloft flyctl-env)"`.
    #[command(name = "flyctl-env")]
    FlyctlEnv,
    /// The per-machine shim (started by the agent).
    #[command(hide = true)]
    Shim {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
enum AuthCommand {
    /// Print the access token.
    Token,
}

/// The app a command is about: `-a`, else `app` in the config file.
fn app_name(app: Option<String>, config: Option<&std::path::Path>) -> anyhow::Result<String> {
    if let Some(app) = app.filter(|a| !a.is_empty()) {
        return Ok(app);
    }
    let cwd = std::env::current_dir()?;
    let path = aloft_config::locate(config, &cwd);
    if path.exists() {
        let loaded = aloft_config::load(&path).map_err(|e| anyhow::anyhow!("{e}"))?;
        if !loaded.config.app.is_empty() {
            return Ok(loaded.config.app);
        }
    }
    anyhow::bail!("no app name: pass -a APP or run this in a directory whose fly.toml sets `app`")
}

fn runs_as_init() -> bool {
    let argv0 = std::env::args_os().next().unwrap_or_default();
    argv0 == aloft_init::INIT_PATH
        || (std::process::id() == 1
            && std::path::Path::new(&argv0)
                .file_name()
                .is_some_and(|n| n == "init"))
}

fn main() {
    // As PID 1 inside a machine, nothing else may run first: init owns fd 3 and signals.
    if runs_as_init() {
        aloft_init::run();
    }
    // A machine's supervisor stays for the machine's life: it skips argument parsing
    // and everything else the CLI sets up, to stay small. So do the microVM supervisor
    // and exec helper (hidden commands the agent starts).
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("shim") => std::process::exit(aloft_agent::shim::main(&args[2..])),
        Some(aloft_agent::microvm::shim::SHIM_COMMAND) => {
            std::process::exit(aloft_agent::microvm::shim::main(&args[2..]))
        }
        Some(aloft_agent::microvm::exec::EXEC_COMMAND) => {
            std::process::exit(aloft_agent::microvm::exec::main(&args[2..]))
        }
        _ => {}
    }
    let cli = Cli::parse();
    let server = matches!(
        cli.command,
        Command::Server(_) | Command::Control(_) | Command::Agent(_)
    );
    if server {
        // The secrets root key leaves the environment before any thread or child process
        // starts (no runtime yet), so no process the server starts inherits it.
        aloft_control::take_root_key_from_env();
    }
    // hickory logs every DNS query at info.
    let default_filter = if server {
        "info,hickory_server=warn"
    } else {
        "warn"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("ALOFT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("Error: starting the async runtime: {err}");
            std::process::exit(1);
        }
    };
    let code = match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("Error: {}", one_line(&err));
            1
        }
    };
    std::process::exit(code);
}

/// The error and its causes on one line.
fn one_line(err: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
    }
    parts.join(": ").replace('\n', " ")
}

async fn run(cli: Cli) -> anyhow::Result<i32> {
    let api = cli.api;
    match cli.command {
        Command::Server(args) => commands::server::run(*args).await?,
        Command::Doctor(args) => return commands::doctor::run(args),
        Command::Admin { command } => commands::admin::run(command)?,
        Command::Control(args) => commands::control::run(args).await?,
        Command::Agent(args) => commands::agent::run(args).await?,
        Command::Dev { command } => commands::dev_cluster::run(command).await?,
        Command::Hosts { command } => commands::hosts::run(&api, command).await?,
        Command::Apps { command } => commands::apps::run(&api, command).await?,
        Command::Deploy(args) => commands::deploy::run(&api, args).await?,
        Command::Config { command } => return commands::config::run(command),
        Command::Launch(args) => commands::launch::run(&api, args).await?,
        Command::Releases {
            app,
            config,
            image,
            json,
        } => {
            let app = app_name(app, config.as_deref())?;
            commands::releases::run(&api, &app, image, json)
                .await
                .map_err(|e| explain_app(e, &api, &app))?
        }
        Command::Scale { command } => {
            let (app, config) = match &command {
                ScaleCommand::Count { app, config, .. }
                | ScaleCommand::Show { app, config, .. }
                | ScaleCommand::Vm { app, config, .. }
                | ScaleCommand::Memory { app, config, .. } => (app.clone(), config.clone()),
            };
            let app = app_name(app, config.as_deref())?;
            commands::scale::run(&api, &app, command)
                .await
                .map_err(|e| explain_app(e, &api, &app))?
        }
        Command::Registry { command } => commands::registry::run(&api, command).await?,
        Command::StaticServer { dir, port } => {
            let port = port
                .or_else(|| std::env::var("PORT").ok().and_then(|p| p.parse().ok()))
                .unwrap_or(aloft_build::static_site::DEFAULT_PORT);
            aloft_build::static_site::serve(dir, std::net::SocketAddr::from(([0, 0, 0, 0], port)))
                .await?
        }
        Command::Secrets { command } => {
            commands::secrets::run(&api, command, |args| {
                app_name(args.app.clone(), args.config.as_deref())
            })
            .await?
        }
        Command::Status { app, config, json } => {
            let app = app_name(app, config.as_deref())?;
            commands::status::status(&api, &app, json)
                .await
                .map_err(|e| explain_app(e, &api, &app))?
        }
        Command::Machine {
            command: MachineCommand::Exec(args),
        } => {
            let app = app_name(args.app.clone(), args.config.as_deref())?;
            return commands::exec::run(&api, &app, &args)
                .await
                .map_err(|e| explain_app(e, &api, &app));
        }
        Command::Machine { command } => commands::machine::run(&api, command)
            .await
            .map_err(|e| explain(e, &api))?,
        Command::Logs(args) => {
            let app = app_name(args.app.clone(), args.config.as_deref())?;
            commands::logs::run(&api, &app, &args)
                .await
                .map_err(|e| explain_app(e, &api, &app))?
        }
        Command::Ssh {
            command: commands::ssh::SshCommand::Console(args),
        } => {
            let app = app_name(args.app.clone(), args.config.as_deref())?;
            return commands::ssh::console(&api, &app, &args)
                .await
                .map_err(|e| explain_app(e, &api, &app));
        }
        Command::Checks {
            command: commands::checks::ChecksCommand::List(args),
        } => {
            let app = app_name(args.app.clone(), args.config.as_deref())?;
            commands::checks::list(&api, &app, &args)
                .await
                .map_err(|e| explain_app(e, &api, &app))?
        }
        Command::Certs { command } => commands::certs::run(&api, command).await?,
        Command::Ips { command } => commands::ips::run(&api, command).await?,
        Command::Volumes { command } => commands::volumes::run(&api, command).await?,
        Command::Dig(args) => commands::dig::run(&api, args).await?,
        Command::Proxy(args) => commands::proxy::run(&api, args).await?,
        Command::Orgs { command } => commands::orgs::run(&api, command)
            .await
            .map_err(|e| explain(e, &api))?,
        Command::Tokens { command } => commands::tokens::run(&api, command)
            .await
            .map_err(|e| explain(e, &api))?,
        Command::Auth {
            command: AuthCommand::Token,
        } => println!("{}", api.token()?),
        Command::Platform { command } => commands::platform::run(command)?,
        Command::FlyctlEnv => commands::flyctl_env::run(&api)?,
        Command::Open(args) => {
            let app = app_name(args.app.clone(), args.config.as_deref())?;
            commands::open::run(&api, &app, &args)
                .await
                .map_err(|e| explain_app(e, &api, &app))?
        }
        Command::Shim { .. } => unreachable!("handled before the runtime starts"),
    }
    Ok(0)
}

/// Connection and token problems, said in terms of what to do about them.
fn explain(err: anyhow::Error, api: &ApiArgs) -> anyhow::Error {
    match err.downcast::<aloft_client::ClientError>() {
        Ok(aloft_client::ClientError::Unreachable { reason, .. }) => anyhow::anyhow!(
            "cannot reach the Aloft API at {} ({reason}); is `aloft server` running?",
            api.api_url().unwrap_or_default()
        ),
        Ok(aloft_client::ClientError::Api { status, message })
            if status == http::StatusCode::UNAUTHORIZED =>
        {
            anyhow::anyhow!(
                "the API refused the access token ({message}); check ~/.config/aloft/config.toml or --access-token"
            )
        }
        Ok(other) => other.into(),
        Err(other) => other,
    }
}

fn explain_app(err: anyhow::Error, api: &ApiArgs, app: &str) -> anyhow::Error {
    match err.downcast::<aloft_client::ClientError>() {
        Ok(client_error) => {
            commands::deploy::explain(client_error, &api.api_url().unwrap_or_default(), app)
        }
        Err(other) => other,
    }
}
