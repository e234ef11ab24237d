//! `aloft deploy`: read fly.toml, build the image (or take one), push it to the platform's
//! registry, and follow the server-side rollout.

use std::path::{Path, PathBuf};

use aloft_api::App;
use aloft_api::internal::{DeployEvent, DeployRequest};
use aloft_build::{BuildError, Buildah, DockerfileBuild};
use aloft_client::ClientError;
use aloft_config::Severity;
use anyhow::{Context, bail};
use futures_util::StreamExt;

use crate::settings::{ApiArgs, cache_dir};

#[derive(clap::Args, Debug)]
pub struct DeployArgs {
    /// Path to the app's config file, or a directory holding fly.toml.
    #[arg(short = 'c', long = "config")]
    pub config: Option<PathBuf>,
    /// The app to deploy (default: `app` in the config file).
    #[arg(short = 'a', long = "app")]
    pub app: Option<String>,
    /// Deploy this image instead of building one.
    #[arg(short = 'i', long)]
    pub image: Option<String>,
    /// Path to a Dockerfile (default: `[build] dockerfile`, else ./Dockerfile).
    #[arg(long)]
    pub dockerfile: Option<PathBuf>,
    /// Build arguments, NAME=VALUE (repeatable).
    #[arg(long = "build-arg")]
    pub build_args: Vec<String>,
    /// The Dockerfile stage to build.
    #[arg(long = "build-target")]
    pub build_target: Option<String>,
    /// Build without the layer cache.
    #[arg(long)]
    pub no_cache: bool,
    /// Deployment strategy (rolling, immediate, canary, bluegreen).
    #[arg(long)]
    pub strategy: Option<String>,
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

pub async fn run(api: &ApiArgs, args: DeployArgs) -> anyhow::Result<()> {
    let cwd = std::env::current_dir().context("reading the current directory")?;
    let path = aloft_config::locate(args.config.as_deref(), &cwd);
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
    let app_name = args
        .app
        .clone()
        .filter(|a| !a.is_empty())
        .unwrap_or_else(|| config.app.clone());
    if app_name.is_empty() {
        bail!(
            "no app name: set `app` in {} or pass -a APP",
            path.display()
        );
    }

    let api_url = api.api_url()?;
    let token = api.token()?;
    let client = api.client()?;
    let _app: App = client
        .get(&format!(
            "/v1/apps/{}",
            aloft_client::encode_component(&app_name)
        ))
        .await
        .map_err(|e| explain(e, &api_url, &app_name))?;

    let config_dir = path.parent().map(Path::to_path_buf).unwrap_or(cwd);
    let image = match args
        .image
        .clone()
        .or_else(|| config.build.as_ref().and_then(|b| b.image.clone()))
    {
        Some(image) => {
            println!("Deploying image {image}");
            image
        }
        None => build_and_push(&args, &config, &config_dir, &app_name, &api_url, &token).await?,
    };

    println!("Deploying {app_name}");
    let request = DeployRequest {
        config: serde_json::to_value(&config).context("encoding the app config")?,
        image,
        strategy: args.strategy.clone(),
    };
    let path = format!(
        "/v1/apps/{}/deploys",
        aloft_client::encode_component(&app_name)
    );
    let mut lines = client
        .lines(http::Method::POST, &path, Some(&request), &[])
        .await
        .map_err(|e| explain(e, &api_url, &app_name))?;
    let mut warned = std::collections::HashSet::new();
    while let Some(line) = lines.next().await {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let event: DeployEvent = serde_json::from_str(&line)
            .with_context(|| format!("unexpected deploy output: {line}"))?;
        match event {
            DeployEvent::Progress { message } => println!("  {message}"),
            DeployEvent::Warning { message } => {
                if warned.insert(message.clone()) {
                    eprintln!("WARN {message}");
                }
            }
            DeployEvent::Done {
                release_version,
                url,
            } => {
                println!("Release v{release_version} of {app_name} deployed");
                if let Some(url) = url {
                    println!();
                    println!("Visit your newly deployed app at {url}");
                }
                return Ok(());
            }
            DeployEvent::Error { message } => bail!("deploy failed: {message}"),
        }
    }
    bail!(
        "the server stopped answering before the deploy finished; check `aloft status -a {app_name}`"
    )
}

async fn build_and_push(
    args: &DeployArgs,
    config: &aloft_config::AppConfig,
    config_dir: &Path,
    app: &str,
    api_url: &str,
    token: &str,
) -> anyhow::Result<String> {
    let build_section = config.build.clone().unwrap_or_default();
    let dockerfile = match &args.dockerfile {
        Some(path) => path.clone(),
        None => config_dir.join(build_section.dockerfile.as_deref().unwrap_or("Dockerfile")),
    };
    if !dockerfile.is_file() {
        bail!(
            "no Dockerfile at {}; add one, set [build] dockerfile or image in fly.toml, or pass --image",
            dockerfile.display()
        );
    }
    let registry = api_url
        .trim_start_matches("http://")
        .trim_start_matches("https://")
        .trim_end_matches('/');
    let tag = format!("deployment-{}", ulid::Ulid::new());
    let reference = format!("{registry}/{app}:{tag}");
    let mut build_args: Vec<(String, String)> = build_section.args.clone().into_iter().collect();
    for pair in &args.build_args {
        let (name, value) = pair
            .split_once('=')
            .with_context(|| format!("--build-arg {pair:?} must be NAME=VALUE"))?;
        build_args.push((name.to_string(), value.to_string()));
    }
    let build = DockerfileBuild {
        context: config_dir.to_path_buf(),
        dockerfile: dockerfile.clone(),
        tag: reference.clone(),
        build_args,
        target: args
            .build_target
            .clone()
            .or(build_section.build_target.clone()),
        ignorefile: build_section
            .ignorefile
            .as_ref()
            .map(|f| config_dir.join(f)),
        no_cache: args.no_cache,
    };
    let buildah = Buildah::new(&cache_dir()?.join("buildah"));
    println!(
        "==> Building image with buildah from {}",
        dockerfile.display()
    );
    match buildah.build(&build, |line| println!("{line}")).await {
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
        Err(other) => return Err(other.into()),
    }
    println!("==> Pushing image to {reference}");
    let digest = buildah.push(&reference, &reference, token).await?;
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
