//! `aloft control`: the control plane alone (Machines API, registry, catalog stream), for
//! a host that runs no machines itself, or several such hosts sharing one PostgreSQL
//! database (`--database-url`). Agents and proxies elsewhere join it with the host token
//! it writes to `<data-dir>/host-token`.

use std::net::SocketAddr;
use std::path::PathBuf;

use aloft_control::{ControlConfig, ControlPlane};
use anyhow::Context;

use crate::settings::Settings;

#[derive(clap::Args, Debug)]
pub struct ControlArgs {
    /// Where state lives (SQLite database, registry blobs).
    #[arg(long, env = "ALOFT_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Address of the Machines API (and the image registry under /v2/).
    #[arg(long, default_value = "127.0.0.1:4280")]
    pub listen: SocketAddr,
    /// The region machines go to when a request names none.
    #[arg(long, default_value = "local")]
    pub region: String,
    /// Apps are served at <app>.<base-domain>.
    #[arg(long, default_value = "localhost")]
    pub base_domain: String,
    /// The port proxies serve plain HTTP on (for the URLs printed after deploys).
    #[arg(long, default_value_t = 8080)]
    pub proxy_port: u16,
    /// Keep state in PostgreSQL (`postgresql://user@host/db`) instead of SQLite.
    #[arg(long, env = "ALOFT_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
}

/// Completes on SIGINT or SIGTERM.
pub(crate) async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut interrupt), Ok(mut terminate)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = interrupt.recv() => {}
        _ = terminate.recv() => {}
    }
}

fn write_secret(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let temp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&temp)
        .with_context(|| format!("writing {}", temp.display()))?;
    file.write_all(text.as_bytes())
        .with_context(|| format!("writing {}", temp.display()))?;
    std::fs::rename(&temp, path).with_context(|| format!("writing {}", path.display()))
}

pub async fn run(args: ControlArgs) -> anyhow::Result<()> {
    let data_dir = args
        .data_dir
        .clone()
        .unwrap_or_else(super::server::default_data_dir);
    let (plane, credentials) = ControlPlane::open(ControlConfig {
        data_dir: data_dir.clone(),
        listen: args.listen,
        region: args.region.clone(),
        base_domain: args.base_domain.clone(),
        proxy_http_port: args.proxy_port,
        database_url: args.database_url.clone(),
        acme: false,
        registry_upstream: None,
        allowed_private_registries: Vec::new(),
    })?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding the API to {}", args.listen))?;
    let api_url = format!("http://{}", listener.local_addr().unwrap_or(args.listen));
    let host_token_path = data_dir.join("host-token");
    write_secret(&host_token_path, &credentials.host_token)?;
    let settings_path = Settings {
        api_url: Some(api_url.clone()),
        access_token: Some(credentials.admin_token.clone()),
    }
    .save()
    .context("saving the CLI settings")?;
    println!(
        "Aloft control plane is running (region {}, {} store)",
        args.region,
        plane.store.backend()
    );
    println!("  API and registry  {api_url}");
    println!("  Organization      {}", credentials.org_slug);
    println!("  Access token      saved to {}", settings_path.display());
    println!(
        "  Platform token    saved to {} (for proxies; it acts as no host: each agent has its own)",
        host_token_path.display()
    );
    plane.serve(listener, shutdown_signal()).await
}
