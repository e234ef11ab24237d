//! `aloft agent`: joins this host to a control plane (with a join token from `aloft
//! tokens create host`) and runs its machines: it registers its region, agent URL and
//! capacity, heartbeats, and serves the agent API the control plane drives.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use aloft_agent::{Agent, AgentConfig, HostCapacity};
use anyhow::Context;

#[derive(clap::Args, Debug)]
pub struct AgentArgs {
    /// The control plane's API URL, e.g. http://10.0.0.1:4280.
    #[arg(long, value_name = "URL")]
    pub control: String,
    /// This host's token: a join token from `aloft tokens create host` (it then stays this
    /// host's).
    #[arg(long, env = "ALOFT_HOST_TOKEN", hide_env_values = true)]
    pub token: String,
    /// This host's region.
    #[arg(long, default_value = "local")]
    pub region: String,
    /// Where this host's state lives (its id, images, machines).
    #[arg(long, env = "ALOFT_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Address of the agent API; the control plane must reach it there.
    #[arg(long, default_value = "127.0.0.1:4281")]
    pub listen: SocketAddr,
    /// The CPUs machines may reserve here (default: the host's CPUs).
    #[arg(long)]
    pub cpus: Option<u64>,
    /// The memory (MB) machines may reserve here (default: the host's memory).
    #[arg(long)]
    pub memory_mb: Option<u64>,
    /// OCI runtime for containers: runc, crun or a path (default: whichever is installed).
    #[arg(long)]
    pub runtime: Option<String>,
    /// What runs machines: `container`, `microvm`, or `auto`.
    #[arg(long, default_value = "auto")]
    pub driver: aloft_agent::microvm::DriverChoice,
    /// Root filesystem size (GB) of machines whose config sets no `rootfs.size_gb`.
    #[arg(long, default_value_t = aloft_agent::DEFAULT_ROOTFS_GB, value_parser = clap::value_parser!(u32).range(1..=i64::from(aloft_control::validate::MAX_ROOTFS_SIZE_GB)))]
    pub machine_rootfs_default_gb: u32,
    /// Leave machines running when the agent exits (they are re-attached on the next start).
    #[arg(long)]
    pub keep_machines: bool,
    /// Join the WireGuard mesh between hosts, listening (UDP) at this address of the
    /// datacenter network, where other hosts reach this one (e.g. 10.0.0.2:51820).
    #[arg(long, value_name = "IP:PORT")]
    pub mesh_listen: Option<SocketAddr>,
}

/// Binds the agent's API on `listen` and serves it in the background. Done before the
/// host registers: the control plane probes a host's agent as soon as it registers.
pub(crate) async fn serve_agent_api(agent: &Arc<Agent>, listen: SocketAddr) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding the agent API to {listen}"))?;
    let served = agent.clone();
    tokio::spawn(async move {
        if let Err(err) = served.serve(listener).await {
            tracing::error!(error = %err, "agent API stopped");
        }
    });
    Ok(())
}

/// Registers the host with the control plane at `control`; a refusal (a wrong or revoked
/// token, another host's id) is an error to exit with, not to retry forever. Waits (and
/// retries) while the control plane does not answer. The host's number in 6PN addresses.
pub(crate) async fn register_or_refuse(agent: &Arc<Agent>, control: &str) -> anyhow::Result<u32> {
    let mut backoff = Duration::from_millis(200);
    loop {
        match agent.register().await {
            Ok(number) => return Ok(number),
            Err(aloft_client::ClientError::Api { status, message }) if status.is_client_error() => {
                anyhow::bail!(
                    "the control plane at {control} refused host {} ({status}): {message}",
                    agent.host_id
                );
            }
            Err(err) => {
                tracing::warn!(error = %err, "the control plane does not answer yet; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Starts this host's mesh (with `--mesh-listen`) and keeps its peers current: at once
/// when the host's number is known, else once the agent has registered.
pub(crate) fn start_mesh(agent: &Arc<Agent>, host_number: Option<u32>) -> anyhow::Result<()> {
    let Some(identity) = agent.mesh_identity() else {
        return Ok(());
    };
    let Some(number) = host_number else {
        tokio::spawn(aloft_agent::mesh::start_when_registered(agent.clone()));
        return Ok(());
    };
    let mesh = aloft_agent::mesh::HostMesh::start(identity, number)
        .with_context(|| format!("starting the mesh at {}", identity.endpoint))?;
    tracing::info!(host_number = number, address = %mesh.host_address(), "this host is in the mesh");
    tokio::spawn(mesh.follow_peers(agent.clone()));
    Ok(())
}

pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    if let Err(why) = crate::commands::doctor::cgroups_visible() {
        anyhow::bail!(
            "cgroups are not visible ({why}); {}",
            crate::commands::doctor::CGROUPS_HINT
        );
    }
    let control = args.control.trim_end_matches('/').to_string();
    if !(control.starts_with("http://") || control.starts_with("https://")) {
        anyhow::bail!("--control {control:?} is not an http:// or https:// URL");
    }
    if args.token.trim().is_empty() {
        anyhow::bail!("--token is empty; pass the join token `aloft tokens create host` printed");
    }
    let data_dir = args
        .data_dir
        .clone()
        .unwrap_or_else(crate::commands::server::default_data_dir);
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating the data dir {}", data_dir.display()))?;
    aloft_agent::network::set_egress_policy(aloft_agent::network::EgressPolicy::default());
    if let Err(err) = aloft_agent::network::prepare_host() {
        tracing::warn!(error = %err, "machine networking is unavailable: no 6PN");
    }
    let agent = Agent::open(AgentConfig {
        data_dir: data_dir.clone(),
        listen: args.listen,
        region: args.region.clone(),
        control_url: control.clone(),
        token: args.token.trim().to_string(),
        runtime: args.runtime.clone(),
        driver: args.driver,
        vm: aloft_agent::microvm::MicrovmOptions::default(),
        log_limits: aloft_agent::logs::LogLimits::default(),
        rootfs_default_gb: args.machine_rootfs_default_gb,
        capacity: HostCapacity::detect(args.cpus, args.memory_mb),
        mesh_listen: args.mesh_listen,
    })?;
    serve_agent_api(&agent, args.listen).await?;
    // A token the control plane refuses is a mistake to say now, not to retry forever.
    let host_number = match agent.register().await {
        Ok(number) => Some(number),
        Err(aloft_client::ClientError::Api { status, message }) if status.is_client_error() => {
            anyhow::bail!(
                "the control plane at {control} refused host {} ({status}): {message}",
                agent.host_id
            );
        }
        Err(err) => {
            tracing::warn!(error = %err, "the control plane does not answer yet; retrying");
            None
        }
    };
    start_mesh(&agent, host_number)?;
    tokio::spawn(agent.clone().report());
    agent.reconcile().await.context("reconciling machines")?;
    let capacity = agent.config.capacity;
    println!(
        "Aloft agent is running: host {} in region {}, joined to {control}",
        agent.host_id, args.region
    );
    println!("  Agent API         http://{}", args.listen);
    println!(
        "  Capacity          {} CPUs, {} MB",
        capacity.cpus, capacity.memory_mb
    );
    if let Some(mesh) = args.mesh_listen {
        println!(
            "  Mesh              udp {mesh} (device {})",
            aloft_agent::mesh::TUN_NAME
        );
    }
    println!("  Machines          {}", agent.driver_description());
    crate::commands::server::shutdown_signal().await;
    println!("Shutting down...");
    if !args.keep_machines {
        agent.stop_all_for_shutdown().await;
    }
    Ok(())
}
