//! `aloft deploy`: read fly.toml, build the image (Dockerfile, the built-in static builder)
//! or take one (`--image`, `[build] image`), push it to the platform's registry, and follow
//! the rollout that runs on the server (Ctrl-C stops watching, not the deploy).

use std::path::{Path, PathBuf};
use std::time::Instant;

use aloft_api::App;
use aloft_api::internal::{DeployEvent, DeployFailure, DeployOperation, DeployRequest};
use aloft_build::static_site::StaticBuild;
use aloft_build::{BuildError, DockerfileBuild, DockerfileBuilder, RegistryAccess};
use aloft_client::{Client, ClientError};
use aloft_config::{AppConfig, Severity};
use anyhow::{Context, bail};
use futures_util::StreamExt;

use crate::settings::{ApiArgs, cache_dir};

#[derive(clap::Args, Debug, Default)]
pub struct DeployArgs {
    /// The directory to deploy from (default: the current directory).
    pub dir: Option<PathBuf>,
    /// Path to the app's config file, or a directory holding fly.toml.
    #[arg(short = 'c', long = "config")]
    pub config: Option<PathBuf>,
    /// The app to deploy (default: `app` in the config file).
    #[arg(short = 'a', long = "app")]
    pub app: Option<String>,
    /// Deploy this image instead of building one (any registry; it is copied into the
    /// platform's registry).
    #[arg(short = 'i', long)]
    pub image: Option<String>,
    /// Path to a Dockerfile (default: `[build] dockerfile`, else ./Dockerfile).
    #[arg(long)]
    pub dockerfile: Option<PathBuf>,
    /// Path to an ignore file for the build context (default: `[build] ignorefile`, else .dockerignore).
    #[arg(long)]
    pub ignorefile: Option<PathBuf>,
    /// Build arguments, NAME=VALUE (repeatable).
    #[arg(long = "build-arg")]
    pub build_args: Vec<String>,
    /// Build secrets, NAME=VALUE (repeatable); `RUN --mount=type=secret,id=NAME` reads /run/secrets/NAME.
    #[arg(long = "build-secret")]
    pub build_secrets: Vec<String>,
    /// The Dockerfile stage to build.
    #[arg(long = "build-target")]
    pub build_target: Option<String>,
    /// Build without the layer cache.
    #[arg(long)]
    pub no_cache: bool,
    /// Build and push the image, but do not deploy it.
    #[arg(long)]
    pub build_only: bool,
    /// Tag of the pushed image (default: deployment-<id>).
    #[arg(long)]
    pub image_label: Option<String>,
    /// Deployment strategy: rolling, immediate, canary or bluegreen (overrides fly.toml).
    #[arg(long)]
    pub strategy: Option<String>,
    /// Rolling only: machines down at once (a fraction, or a count of 1 or more).
    #[arg(long)]
    pub max_unavailable: Option<f64>,
    /// How long to wait for each machine to be started and healthy (e.g. 5m, 30s).
    #[arg(long)]
    pub wait_timeout: Option<String>,
    /// How long the release command may run (e.g. 5m).
    #[arg(long)]
    pub release_command_timeout: Option<String>,
    /// Do not run the release command.
    #[arg(long)]
    pub skip_release_command: bool,
    /// Two machines for each new process group with services (use --ha=false for one).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub ha: bool,
    /// Return once the server has started the deploy; it goes on without the CLI.
    #[arg(long)]
    pub detach: bool,
    /// Build nothing and start nothing: follow the app's deploy in progress (one the
    /// server took up again after a restart, or one started with --detach) to its end.
    #[arg(long, conflicts_with_all = ["image", "build_only", "detach"])]
    pub resume: bool,
}

/// A one-line explanation for an API failure, naming what to do about it.
pub fn explain(error: ClientError, api_url: &str, app: &str) -> anyhow::Error {
    match error {
        ClientError::Unreachable { reason, .. } => {
            anyhow::anyhow!(
                "cannot reach the Aloft API at {api_url} ({reason}); is `aloft server` running?"
            )
        }
        ClientError::Api { status, .. } if status == http::StatusCode::NOT_FOUND => {
            anyhow::anyhow!("app {app} not found; create it with `aloft apps create {app}`")
        }
        ClientError::Api { status, message } if status == http::StatusCode::UNAUTHORIZED => {
            anyhow::anyhow!(
                "the API refused the access token ({message}); check ~/.config/aloft/config.toml or --access-token"
            )
        }
        other => other.into(),
    }
}

fn duration_flag(
    name: &str,
    value: &Option<String>,
) -> anyhow::Result<Option<aloft_api::Duration>> {
    let Some(text) = value else { return Ok(None) };
    let parsed = match text.parse::<u64>() {
        Ok(seconds) => aloft_api::Duration::from_secs(seconds as i64),
        Err(_) => aloft_api::Duration::parse(text)
            .map_err(|e| anyhow::anyhow!("--{name} {text:?}: {e}; use e.g. 30s or 5m"))?,
    };
    Ok(Some(parsed))
}

fn pairs(flag: &str, values: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    values
        .iter()
        .map(|pair| {
            let (name, value) = pair
                .split_once('=')
                .with_context(|| format!("--{flag} {pair:?} must be NAME=VALUE"))?;
            Ok((name.to_string(), value.to_string()))
        })
        .collect()
}

/// The loaded, valid app config and where it lives.
pub struct LoadedApp {
    pub config: AppConfig,
    pub dir: PathBuf,
    pub name: String,
}

pub fn load_app(
    config: Option<&Path>,
    dir: Option<&Path>,
    app: Option<&str>,
) -> anyhow::Result<LoadedApp> {
    let cwd = std::env::current_dir().context("reading the current directory")?;
    let base = dir.map(|d| cwd.join(d)).unwrap_or(cwd);
    let path = aloft_config::locate(config, &base);
    if !path.exists() {
        bail!(
            "no app config found at {}; run this in a directory with fly.toml, or pass -c PATH",
            path.display()
        );
    }
    let loaded = aloft_config::load(&path).map_err(|e| anyhow::anyhow!("{e}"))?;
    for warning in loaded
        .warnings
        .iter()
        .filter(|d| d.severity == Severity::Warning)
    {
        eprintln!("WARN {warning}");
    }
    let errors: Vec<String> = loaded
        .config
        .validate()
        .into_iter()
        .filter(|d| d.severity == Severity::Error)
        .map(|d| d.to_string())
        .collect();
    if !errors.is_empty() {
        for error in &errors[1..] {
            eprintln!("{error}");
        }
        bail!("{} is not valid: {}", path.display(), errors[0]);
    }
    let mut config = loaded.config;
    config
        .inline_local_files()
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let name = app
        .filter(|a| !a.is_empty())
        .map(str::to_string)
        .unwrap_or_else(|| config.app.clone());
    if name.is_empty() {
        bail!(
            "no app name: set `app` in {} or pass -a APP",
            path.display()
        );
    }
    let dir = match dir {
        Some(_) => base,
        None => path.parent().map(Path::to_path_buf).unwrap_or(base),
    };
    Ok(LoadedApp { config, dir, name })
}

pub fn registry_host(api_url: &str) -> String {
    api_url
        .trim_start_matches("http://")
        .trim_start_matches("https://")
        .trim_end_matches('/')
        .to_string()
}

pub async fn run(api: &ApiArgs, args: DeployArgs) -> anyhow::Result<()> {
    if args.resume {
        return resume(api, &args).await;
    }
    let started = Instant::now();
    let app = load_app(
        args.config.as_deref(),
        args.dir.as_deref(),
        args.app.as_deref(),
    )?;
    let api_url = api.api_url()?;
    let token = api.token()?;
    let client = api.client()?;
    let _app: App = client
        .get(&format!(
            "/v1/apps/{}",
            aloft_client::encode_component(&app.name)
        ))
        .await
        .map_err(|e| explain(e, &api_url, &app.name))?;

    let wait_timeout = duration_flag("wait-timeout", &args.wait_timeout)?;
    let release_command_timeout =
        duration_flag("release-command-timeout", &args.release_command_timeout)?;
    let build_started = Instant::now();
    let (image, built) = match args
        .image
        .clone()
        .or_else(|| app.config.build.as_ref().and_then(|b| b.image.clone()))
    {
        Some(image) => {
            println!("==> Deploying image {image} (no build)");
            (image, false)
        }
        None => (
            build_image(&args, &app, &client, &api_url, &token).await?,
            true,
        ),
    };
    let build_seconds = build_started.elapsed().as_secs_f64();
    if built {
        println!("--> Image built and pushed in {build_seconds:.1}s");
    }
    if args.build_only {
        println!("Image: {image}");
        return Ok(());
    }

    println!("==> Deploying {}", app.name);
    let request = DeployRequest {
        config: serde_json::to_value(&app.config).context("encoding the app config")?,
        image,
        strategy: args.strategy.clone(),
        max_unavailable: args.max_unavailable,
        wait_timeout,
        release_command_timeout,
        skip_release_command: args.skip_release_command,
        ha: Some(args.ha),
        description: None,
    };
    let path = format!(
        "/v1/apps/{}/deploys",
        aloft_client::encode_component(&app.name)
    );
    let rollout_started = Instant::now();
    let lines = client
        .lines(http::Method::POST, &path, Some(&request), &[])
        .await
        .map_err(|e| explain(e, &api_url, &app.name))?;
    let outcome = watch(lines, &app.name, args.detach).await?;
    match outcome {
        Watched::Detached { deploy_id, release } => {
            let release = release
                .map(|v| format!("release v{v}"))
                .unwrap_or_else(|| "the release".into());
            println!(
                "Deploy {deploy_id} of {release} goes on on the server; follow it with `aloft deploy --resume -a {}` or `aloft status -a {}`",
                app.name, app.name
            );
        }
        Watched::Done {
            release_version,
            url,
        } => {
            println!("Release v{release_version} of {} deployed", app.name);
            let total = started.elapsed().as_secs_f64();
            let rollout = rollout_started.elapsed().as_secs_f64();
            if built {
                println!(
                    "Deployed in {total:.1}s (image build and push {build_seconds:.1}s, rollout {rollout:.1}s)"
                );
            } else {
                println!("Deployed in {total:.1}s (no build, rollout {rollout:.1}s)");
            }
            if let Some(url) = url {
                println!();
                println!("Visit your newly deployed app at {url}");
            }
        }
    }
    Ok(())
}

/// The app's deploys, newest first.
pub async fn deploys(client: &Client, app: &str) -> Result<Vec<DeployOperation>, ClientError> {
    client
        .get(&format!(
            "/v1/apps/{}/deploys",
            aloft_client::encode_component(app)
        ))
        .await
}

/// `deploy --resume`: follows the app's unfinished deploy (else shows how the latest ended).
async fn resume(api: &ApiArgs, args: &DeployArgs) -> anyhow::Result<()> {
    let name = match args.app.as_deref().filter(|a| !a.is_empty()) {
        Some(app) => app.to_string(),
        None => load_app(args.config.as_deref(), args.dir.as_deref(), None)?.name,
    };
    let api_url = api.api_url()?;
    let client = api.client()?;
    let list = deploys(&client, &name)
        .await
        .map_err(|e| explain(e, &api_url, &name))?;
    let deploy = match list.iter().find(|d| d.status == "running") {
        Some(running) => {
            println!("==> Following deploy {} of {name}", running.id);
            running
        }
        None => {
            let Some(latest) = list.first() else {
                bail!("app {name} has no deploy to resume; start one with `aloft deploy`");
            };
            println!(
                "==> No deploy of {name} is in progress; deploy {} ended ({}). Its output:",
                latest.id, latest.status
            );
            latest
        }
    };
    let path = format!(
        "/v1/apps/{}/deploys/{}",
        aloft_client::encode_component(&name),
        aloft_client::encode_component(&deploy.id)
    );
    let started = Instant::now();
    let lines = client
        .lines(http::Method::GET, &path, None::<&()>, &[])
        .await
        .map_err(|e| explain(e, &api_url, &name))?;
    if let Watched::Done {
        release_version,
        url,
    } = watch(lines, &name, false).await?
    {
        println!("Release v{release_version} of {name} deployed");
        println!("Followed for {:.1}s", started.elapsed().as_secs_f64());
        if let Some(url) = url {
            println!();
            println!("Visit your newly deployed app at {url}");
        }
    }
    Ok(())
}

async fn build_image(
    args: &DeployArgs,
    app: &LoadedApp,
    client: &Client,
    api_url: &str,
    token: &str,
) -> anyhow::Result<String> {
    let build_section = app.config.build.clone().unwrap_or_default();
    let registry = registry_host(api_url);
    let tag = args
        .image_label
        .clone()
        .filter(|l| !l.is_empty())
        .unwrap_or_else(|| format!("deployment-{}", ulid::Ulid::new()));
    let reference = format!("{registry}/{}:{tag}", app.name);
    if build_section.builder.is_some() || !build_section.buildpacks.is_empty() {
        bail!(
            "[build] builder/buildpacks (Cloud Native Buildpacks) are not supported by Aloft; build with a Dockerfile, the built-in static builder ([build] builtin = \"static\"), or deploy an image with [build] image / --image"
        );
    }
    if let Some(builtin) = build_section
        .builtin
        .as_deref()
        .filter(|_| args.dockerfile.is_none())
    {
        if builtin != "static" {
            bail!(
                "[build] builtin = {builtin:?} is not a builder Aloft has; the built-in builder is \"static\""
            );
        }
        return build_static(&build_section, app, &registry, token, &reference).await;
    }
    let dockerfile = match &args.dockerfile {
        Some(path) => path.clone(),
        None => match &build_section.dockerfile {
            Some(file) => app.dir.join(file),
            None => ["Dockerfile", "dockerfile"]
                .iter()
                .map(|f| app.dir.join(f))
                .find(|p| p.is_file())
                .unwrap_or_else(|| app.dir.join("Dockerfile")),
        },
    };
    if !dockerfile.is_file() {
        bail!(
            "no Dockerfile at {}; add one, set [build] dockerfile, builtin = \"static\" or image in fly.toml, or pass --image",
            dockerfile.display()
        );
    }
    let mut build_args: Vec<(String, String)> = build_section.args.clone().into_iter().collect();
    for (name, value) in pairs("build-arg", &args.build_args)? {
        build_args.retain(|(n, _)| n != &name);
        build_args.push((name, value));
    }
    let ignorefile = args
        .ignorefile
        .clone()
        .or_else(|| build_section.ignorefile.as_ref().map(|f| app.dir.join(f)));
    let build = DockerfileBuild {
        context: app.dir.clone(),
        dockerfile: dockerfile.clone(),
        tag: reference.clone(),
        build_args,
        target: args
            .build_target
            .clone()
            .or(build_section.build_target.clone()),
        ignorefile,
        no_cache: args.no_cache,
        secrets: pairs("build-secret", &args.build_secrets)?,
    };
    let builder = DockerfileBuilder::detect(&cache_dir()?.join("buildah")).await?;
    let access = RegistryAccess {
        host: registry.clone(),
        token: token.to_string(),
        docker_hub_mirror: docker_hub_mirror(client).await,
    };
    println!(
        "==> Building image with {} from {}",
        builder.name(),
        dockerfile.display()
    );
    match builder
        .build(&build, Some(&access), |line| println!("{line}"))
        .await
    {
        Ok(()) => {}
        Err(BuildError::Failed {
            step,
            reason,
            output,
        }) => {
            eprintln!("--> Output of the failing step ({step}):");
            for line in output {
                eprintln!("    {line}");
            }
            bail!("image build failed at {step}: {reason}");
        }
        Err(BuildError::Syntax {
            file,
            line,
            message,
        }) => {
            bail!("image build failed: the Dockerfile has a syntax error: {file}:{line}: {message}")
        }
        Err(other) => return Err(anyhow::anyhow!("image build failed: {other}")),
    }
    println!("==> Pushing image to {reference}");
    let digest = builder
        .push(&reference, token)
        .await
        .map_err(|e| anyhow::anyhow!("image push failed: {e}"))?;
    println!(
        "--> Pushed {reference}{}",
        if digest.is_empty() {
            String::new()
        } else {
            format!(" ({digest})")
        }
    );
    Ok(reference)
}

/// The repository prefix under which the platform's registry mirrors Docker Hub, if any.
async fn docker_hub_mirror(client: &Client) -> Option<String> {
    let info: serde_json::Value = client.get("/v1/registry").await.ok()?;
    info.get("docker_hub_mirror")
        .and_then(|v| v.as_str())
        .filter(|p| !p.is_empty())
        .map(str::to_string)
}

async fn build_static(
    section: &aloft_config::Build,
    app: &LoadedApp,
    registry: &str,
    token: &str,
    reference: &str,
) -> anyhow::Result<String> {
    let root = match section.settings.get("root").and_then(|v| v.as_str()) {
        Some(root) => app.dir.join(root),
        None => app.dir.clone(),
    };
    let server_binary = std::env::current_exe()
        .context("finding the aloft binary to ship as the static file server")?;
    let build = StaticBuild {
        root: root.clone(),
        server_binary,
        cache_dir: cache_dir()?.join("static"),
    };
    println!(
        "==> Building a static site image from {} (built-in static builder)",
        root.display()
    );
    let push = aloft_build::oci::PushClient::new(registry, Some(token.to_string()))
        .map_err(|e| anyhow::anyhow!("image push failed: {e}"))?;
    let digest = aloft_build::static_site::build_and_push(&build, &push, reference, |line| {
        println!("{line}")
    })
    .await
    .map_err(|e| anyhow::anyhow!("static site build failed: {e}"))?;
    println!("--> Pushed {reference} ({digest})");
    Ok(reference.to_string())
}

/// How watching a server-side operation ended.
pub enum Watched {
    Done {
        release_version: u64,
        url: Option<String>,
    },
    Detached {
        deploy_id: String,
        release: Option<u64>,
    },
}

/// Prints a deploy's (or scaling's) events as they come. With `detach`, returns once the
/// server has accepted it and recorded its release.
pub async fn watch(
    mut lines: impl futures_util::Stream<Item = Result<String, ClientError>> + Unpin,
    app: &str,
    detach: bool,
) -> anyhow::Result<Watched> {
    let mut warned = std::collections::HashSet::new();
    let mut deploy_id = String::new();
    while let Some(line) = lines.next().await {
        let line = line.map_err(|e| anyhow::anyhow!("lost the deploy's progress stream ({e}); it goes on on the server: follow it again with `aloft deploy --resume -a {app}`"))?;
        if line.trim().is_empty() {
            continue;
        }
        let event: DeployEvent = serde_json::from_str(&line)
            .with_context(|| format!("unexpected deploy output: {line}"))?;
        match event {
            DeployEvent::Started { deploy_id: id } => deploy_id = id,
            DeployEvent::Release { version, .. } => {
                if detach {
                    return Ok(Watched::Detached {
                        deploy_id,
                        release: Some(version),
                    });
                }
            }
            DeployEvent::Progress { message } => println!("  {message}"),
            DeployEvent::Warning { message } => {
                if warned.insert(message.clone()) {
                    eprintln!("WARN {message}");
                }
            }
            DeployEvent::Log { machine_id, line } => println!("  {machine_id} | {line}"),
            DeployEvent::Done {
                release_version,
                url,
            } => {
                return Ok(Watched::Done {
                    release_version,
                    url,
                });
            }
            DeployEvent::Error { message, failure } => {
                if let Some(failure) = failure {
                    print_failure(&failure);
                }
                bail!("deploy failed: {message}");
            }
        }
    }
    if detach && !deploy_id.is_empty() {
        return Ok(Watched::Detached {
            deploy_id,
            release: None,
        });
    }
    bail!(
        "the server stopped answering before the deploy finished; it goes on when the server is back: follow it with `aloft deploy --resume -a {app}`"
    )
}

fn print_failure(failure: &DeployFailure) {
    let group = if failure.process_group.is_empty() {
        String::new()
    } else {
        format!(" [{}]", failure.process_group)
    };
    eprintln!("--> Failing machine: {}{group}", failure.machine_id);
    if let Some(check) = &failure.check {
        eprintln!(
            "    failing check: {check}{}",
            if failure.check_output.is_empty() {
                String::new()
            } else {
                format!(": {}", failure.check_output)
            }
        );
    }
    if let Some(exit) = &failure.exit {
        let how = if exit.oom_killed {
            "killed: out of memory".to_string()
        } else if let Some(signal) = exit.signal {
            format!("killed by signal {signal}")
        } else {
            format!("exit code {}", exit.exit_code)
        };
        eprintln!("    main process ended: {how}");
    }
    if failure.logs.is_empty() {
        eprintln!("    (no log lines from machine {})", failure.machine_id);
    } else {
        eprintln!(
            "--> Last {} log lines of machine {}:",
            failure.logs.len(),
            failure.machine_id
        );
        for line in &failure.logs {
            eprintln!("    {line}");
        }
    }
}
