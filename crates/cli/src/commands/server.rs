//! `aloft server`: a whole single-host platform in the foreground: the control plane's
//! API (with the registry), one agent, and the proxy.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use aloft_agent::{Agent, AgentConfig};
use aloft_control::{ControlConfig, ControlPlane};
use aloft_proxy::{Proxy, ProxyConfig};
use anyhow::Context;

use crate::settings::Settings;

#[derive(clap::Args, Debug)]
pub struct ServerArgs {
    /// Where all state lives (SQLite databases, images, machines).
    #[arg(long, env = "ALOFT_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Join the control plane at this API URL (e.g. http://10.0.0.1:4280) instead of
    /// running one: this host runs its agent, proxy, private DNS and mesh only.
    #[arg(long, value_name = "URL", requires = "token")]
    pub join: Option<String>,
    /// With --join: this host's token, a join token from `aloft tokens create host` (it
    /// then stays this host's).
    #[arg(long, requires = "join")]
    pub token: Option<String>,
    /// Join the WireGuard mesh between hosts, listening (UDP) at this address of the
    /// datacenter network, where other hosts reach this one (e.g. 10.0.0.2:51820).
    #[arg(long, value_name = "IP:PORT")]
    pub mesh_listen: Option<SocketAddr>,
    /// Address of the Machines API (and the image registry under /v2/).
    #[arg(long, default_value = "127.0.0.1:4280", conflicts_with = "join")]
    pub api_listen: SocketAddr,
    /// Address the proxy serves plain HTTP on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub proxy_listen: SocketAddr,
    /// Address the proxy serves HTTPS on (off when not given).
    #[arg(long)]
    pub proxy_https_listen: Option<SocketAddr>,
    /// Get certificates from this ACME CA (e.g.
    /// https://acme-v02.api.letsencrypt.org/directory) for every app's <app>.<base-domain>
    /// and every hostname added with `aloft certs add`: TLS-ALPN-01 on the HTTPS port (or
    /// HTTP-01 on the HTTP port without one). Off when not given: HTTPS serves imported
    /// certificates and a self-signed fallback.
    #[arg(conflicts_with = "join", long, value_name = "URL")]
    pub acme_directory: Option<String>,
    /// Contact address of the ACME account (expiry notices).
    #[arg(long, value_name = "ADDR", requires = "acme_directory")]
    pub acme_email: Option<String>,
    /// A PEM root that signs the ACME CA's own HTTPS certificate (a private CA such as
    /// Pebble); default: the system's roots.
    #[arg(long, value_name = "PEM", requires = "acme_directory")]
    pub acme_ca_root: Option<PathBuf>,
    /// How long a client may take to send a request body the proxy buffers for fly-replay
    /// (up to 1 MiB), whole; past it the request gets a 408.
    #[arg(long, default_value = "60s")]
    pub proxy_request_body_timeout: aloft_api::Duration,
    /// Most request-body bytes the proxy buffers at once across all connections (bytes, or
    /// with a k, m or g suffix); past it bodies stream to the app without fly-replay.
    #[arg(long, default_value = "64m", value_parser = parse_size)]
    pub proxy_max_buffered_request_bytes: u64,
    /// Where Prometheus scrapes `/metrics`: the proxy's (requests per app and status,
    /// latency, connections, TLS) and the agent's (each machine's CPU, memory, network).
    #[arg(long, default_value = "127.0.0.1:9091")]
    pub metrics_listen: SocketAddr,
    /// Address of this host's agent API.
    #[arg(long, default_value = "127.0.0.1:4281")]
    pub agent_listen: SocketAddr,
    /// This host's region.
    #[arg(long, default_value = "local")]
    pub region: String,
    /// The CPUs this host's machines may reserve (default: the host's CPUs).
    #[arg(long)]
    pub cpus: Option<u64>,
    /// The memory (MB) this host's machines may reserve (default: the host's memory).
    #[arg(long)]
    pub memory_mb: Option<u64>,
    /// Apps are served at <app>.<base-domain>.
    #[arg(long, default_value = "localhost")]
    pub base_domain: String,
    /// OCI runtime for containers: runc, crun or a path (default: whichever is installed).
    #[arg(long)]
    pub runtime: Option<String>,
    /// Keep the control plane's state in PostgreSQL (`postgresql://user@host/db`) instead
    /// of SQLite in the data dir; several servers may share one database.
    #[arg(
        conflicts_with = "join",
        long,
        env = "ALOFT_DATABASE_URL",
        hide_env_values = true
    )]
    pub database_url: Option<String>,
    /// What runs machines: `container` (runc/crun), `microvm` (a QEMU VM each), or `auto`
    /// (microVMs where KVM boots the guest kernel, containers elsewhere).
    #[arg(long, default_value = "auto")]
    pub driver: aloft_agent::microvm::DriverChoice,
    /// The microVMs' accelerator: `kvm` (machine type microvm), `tcg` (emulation, q35), or
    /// `auto` (KVM if it boots the guest kernel here; probed once and cached).
    #[arg(long, default_value = "auto")]
    pub vm_accel: aloft_agent::microvm::AccelChoice,
    /// The microVMs' kernel (default: the newest /boot/vmlinuz-*-cloud-amd64).
    #[arg(long)]
    pub vm_kernel: Option<PathBuf>,
    /// How long a microVM may take from QEMU's start until init runs its program
    /// (default: 20s under KVM, 90s under TCG).
    #[arg(long)]
    pub vm_ready_timeout: Option<aloft_api::Duration>,
    /// Rotate a machine's log when it reaches this size (bytes, or with a k, m or g suffix).
    #[arg(long, default_value = "10m", value_parser = parse_size)]
    pub log_max_size: u64,
    /// How many log files each machine keeps, the live one included.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub log_max_files: u32,
    /// Root filesystem size (GB) of machines whose config sets no `rootfs.size_gb`: a
    /// container's writable layer (a sparse ext4 image, so a quota that costs nothing
    /// until written), a microVM's root disk.
    #[arg(long, default_value_t = aloft_agent::DEFAULT_ROOTFS_GB, value_parser = clap::value_parser!(u32).range(1..=i64::from(aloft_control::validate::MAX_ROOTFS_SIZE_GB)))]
    pub machine_rootfs_default_gb: u32,
    /// Leave machines running when the server exits (they are re-attached on the next start).
    #[arg(long)]
    pub keep_machines: bool,
    /// Keep the images of this many most recent releases per app; older ones are
    /// garbage-collected after each deploy.
    #[arg(conflicts_with = "join", long, default_value_t = aloft_control::releases::DEFAULT_KEEP_RELEASES)]
    pub keep_releases: usize,
    /// Replace the machines of a host that has been down this long (e.g. 5m) with new
    /// machines on healthy hosts; machines with volumes stay with their host. Off unless
    /// given.
    #[arg(conflicts_with = "join", long, value_name = "DURATION")]
    pub reschedule_lost_after: Option<aloft_api::Duration>,
    /// At most this many machines per organization (0: no limit); more answer 422.
    #[arg(conflicts_with = "join", long, default_value_t = aloft_control::machines::DEFAULT_ORG_MAX_MACHINES)]
    pub org_max_machines: u64,
    /// At most this much memory (MB) in all of an organization's machines together (0: no
    /// limit); more answers 422.
    #[arg(conflicts_with = "join", long, default_value_t = aloft_control::machines::DEFAULT_ORG_MAX_MEMORY_MB)]
    pub org_max_memory_mb: u64,
    /// Pull-through from this upstream registry (e.g. https://registry-1.docker.io), so
    /// `FROM debian:bookworm-slim` resolves through the platform's registry. Off by default.
    #[arg(conflicts_with = "join", long)]
    pub registry_upstream: Option<String>,
    /// The repository prefix that is pulled through from the upstream.
    #[arg(long, default_value = "dockerhub")]
    pub registry_upstream_prefix: String,
    /// A registry (`host:port`) that image imports and pull-through may reach although it
    /// is at a loopback, private or link-local address (repeatable). Other registries must
    /// be at public addresses; the `--registry-upstream` itself always may.
    #[arg(
        conflicts_with = "join",
        long = "allow-private-registry",
        value_name = "HOST:PORT"
    )]
    pub allow_private_registries: Vec<String>,
    /// Where machines' DNS server (`.internal` names) listens; every network's own
    /// `fdaa:<network>::3` gets the same port.
    #[arg(long, default_value = "[fdaa::3]:53")]
    pub dns_listen: SocketAddr,
    /// Upstream resolver for names outside the private network (repeatable; default:
    /// the nameservers of /etc/resolv.conf).
    #[arg(long = "dns-upstream")]
    pub dns_upstreams: Vec<SocketAddr>,
    /// Let machines reach this address range (repeatable; e.g. 10.8.0.0/16 or
    /// fd00:1::/64). By default a machine reaches its own private network, its host's DNS
    /// and the internet; private (RFC 1918, CGNAT, ULA), link-local (169.254.169.254 among
    /// them), loopback and multicast ranges are dropped. Other networks' 6PN addresses and
    /// other machines' private IPv4 stay closed whatever this says.
    #[arg(long = "allow-egress", value_name = "CIDR")]
    pub allow_egress: Vec<aloft_agent::network::Cidr>,
    /// Make machine schedules (`--schedule hourly` …) run this many times faster than real
    /// time; for tests (1800 makes an hour pass in 2 s).
    #[arg(long, default_value_t = 1, hide = true, value_parser = clap::value_parser!(u64).range(1..))]
    pub schedule_time_scale: u64,
}

pub fn default_data_dir() -> PathBuf {
    if nix::unistd::Uid::effective().is_root() {
        return PathBuf::from("/var/lib/aloft");
    }
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("aloft")
}

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

/// The proxy's ACME settings from `--acme-*`, checked before anything starts.
fn acme_config(args: &ServerArgs) -> anyhow::Result<Option<aloft_proxy::AcmeConfig>> {
    let Some(directory) = &args.acme_directory else {
        return Ok(None);
    };
    if !directory.starts_with("https://") {
        anyhow::bail!(
            "--acme-directory {directory:?} is not an https:// URL; give the CA's directory, e.g. https://acme-v02.api.letsencrypt.org/directory"
        );
    }
    if let Some(root) = &args.acme_ca_root
        && !root.is_file()
    {
        anyhow::bail!(
            "--acme-ca-root {}: no such file; give the PEM file of the root that signs the ACME server's certificate",
            root.display()
        );
    }
    let contact = match &args.acme_email {
        Some(email) if !email.contains('@') || email.contains(char::is_whitespace) => {
            anyhow::bail!("--acme-email {email:?} is not an email address")
        }
        Some(email) => vec![format!("mailto:{email}")],
        None => Vec::new(),
    };
    Ok(Some(aloft_proxy::AcmeConfig {
        directory_url: directory.clone(),
        contact,
        ca_root_pem: args.acme_ca_root.clone(),
        ..aloft_proxy::AcmeConfig::default()
    }))
}

/// The control plane this host follows: its own (`aloft server`), or a remote one it
/// joined (`aloft server --join`).
struct ControlSide {
    api_url: String,
    host_token: String,
    /// The local control plane's API task and its stop switch.
    local: Option<LocalControl>,
}

struct LocalControl {
    credentials: aloft_control::Credentials,
    settings_path: PathBuf,
    stop_api: tokio::sync::oneshot::Sender<()>,
    /// The plane and its bound listener until [`LocalControl::serve_api`] starts serving.
    pending_api: Option<PendingApi>,
    api_task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

struct PendingApi {
    plane: Arc<ControlPlane>,
    listener: tokio::net::TcpListener,
    stopped: tokio::sync::oneshot::Receiver<()>,
}

impl LocalControl {
    /// Serves the API. Called once this host's agent answers: a client that sees the API up
    /// can place machines at once, and deploys left unfinished resume against a live agent.
    fn serve_api(&mut self) {
        if let Some(PendingApi {
            plane,
            listener,
            stopped,
        }) = self.pending_api.take()
        {
            self.api_task = Some(tokio::spawn(plane.serve(listener, async {
                let _ = stopped.await;
            })));
        }
    }
}

/// Opens this host's own control plane, mints this host's token, and serves the API.
async fn start_control_plane(
    args: &ServerArgs,
    data_dir: &std::path::Path,
    acme: bool,
) -> anyhow::Result<ControlSide> {
    let (plane, credentials) = ControlPlane::open(ControlConfig {
        data_dir: data_dir.to_path_buf(),
        listen: args.api_listen,
        region: args.region.clone(),
        base_domain: args.base_domain.clone(),
        proxy_http_port: args.proxy_listen.port(),
        registry_upstream: args.registry_upstream.as_ref().map(|url| {
            let mut upstream = aloft_registry::UpstreamConfig::new(
                url.trim_end_matches('/'),
                args.registry_upstream_prefix.trim_matches('/'),
            );
            upstream.trusted_origins = args.allow_private_registries.clone();
            upstream
        }),
        allowed_private_registries: args.allow_private_registries.clone(),
        database_url: args.database_url.clone(),
        acme,
    })?;
    plane
        .store
        .set_setting(
            aloft_control::releases::SETTING_KEEP_RELEASES,
            &args.keep_releases.max(1).to_string(),
        )
        .context("saving the release retention setting")?;
    // Empty: off.
    let reschedule_after = args
        .reschedule_lost_after
        .map(|after| after.to_std().as_secs().to_string())
        .unwrap_or_default();
    plane
        .store
        .set_setting(
            aloft_control::reschedule::SETTING_RESCHEDULE_LOST_AFTER_SECS,
            &reschedule_after,
        )
        .context("saving --reschedule-lost-after")?;
    for (key, value) in [
        (
            aloft_control::machines::SETTING_ORG_MAX_MACHINES,
            args.org_max_machines,
        ),
        (
            aloft_control::machines::SETTING_ORG_MAX_MEMORY_MB,
            args.org_max_memory_mb,
        ),
        (
            aloft_control::timers::SETTING_SCHEDULE_TIME_SCALE,
            args.schedule_time_scale,
        ),
    ] {
        plane
            .store
            .set_setting(key, &value.to_string())
            .context("saving the per-org limits")?;
    }
    let api_url = format!("http://{}", args.api_listen);
    // This host's own credential: its agent, proxy and resolver act as this host only.
    let host_id = aloft_agent::local_host_id(data_dir)?;
    let host_token = plane
        .host_token_for(&host_id)
        .context("making this host's token")?;
    write_private(&data_dir.join("host.token"), &host_token).context("saving the host token")?;
    // Shared IPv4 addresses are the proxy's.
    plane.store.set_setting(
        aloft_control::ips::SETTING_SHARED_V4,
        &args.proxy_listen.ip().to_string(),
    )?;
    let settings_path = Settings {
        api_url: Some(api_url.clone()),
        access_token: Some(credentials.admin_token.clone()),
    }
    .save()
    .context("saving the CLI settings")?;
    // The local host is known before the API answers its first call (the agent re-registers
    // as it reports).
    let capacity = aloft_agent::HostCapacity::detect(args.cpus, args.memory_mb);
    plane
        .store
        .upsert_host(&aloft_control::store::HostRow {
            id: host_id,
            region: args.region.clone(),
            agent_url: format!("http://{}", args.agent_listen),
            last_seen: aloft_control::store::now_rfc3339(),
            cpus: capacity.cpus,
            memory_mb: capacity.memory_mb,
            cordoned: false,
        })
        .context("registering the local host")?;
    let api_listener = tokio::net::TcpListener::bind(args.api_listen)
        .await
        .with_context(|| format!("binding the API to {}", args.api_listen))?;
    let (stop_api, stopped) = tokio::sync::oneshot::channel::<()>();
    Ok(ControlSide {
        api_url,
        host_token,
        local: Some(LocalControl {
            credentials,
            settings_path,
            stop_api,
            pending_api: Some(PendingApi {
                plane,
                listener: api_listener,
                stopped,
            }),
            api_task: None,
        }),
    })
}

/// `--join URL --token T`: the remote control plane, checked before anything starts.
fn remote_control(join: &str, token: Option<&str>) -> anyhow::Result<ControlSide> {
    let api_url = join.trim_end_matches('/').to_string();
    if !(api_url.starts_with("http://") || api_url.starts_with("https://")) {
        anyhow::bail!("--join {join:?} is not an http:// or https:// URL of a control plane's API");
    }
    let host_token = token.map(str::trim).unwrap_or_default();
    if host_token.is_empty() {
        anyhow::bail!(
            "--join needs --token: the join token `aloft tokens create host` printed (or this host's token)"
        );
    }
    Ok(ControlSide {
        api_url,
        host_token: host_token.to_string(),
        local: None,
    })
}

pub async fn run(args: ServerArgs) -> anyhow::Result<()> {
    // Machines cannot start without cgroups: say so now, not at the first machine start.
    if let Err(why) = crate::commands::doctor::cgroups_visible() {
        anyhow::bail!(
            "cgroups are not visible ({why}); {}",
            crate::commands::doctor::CGROUPS_HINT
        );
    }
    let acme = acme_config(&args)?;
    let data_dir = args.data_dir.clone().unwrap_or_else(default_data_dir);
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating the data dir {}", data_dir.display()))?;
    let mut control = match &args.join {
        Some(join) => remote_control(join, args.token.as_deref())?,
        None => start_control_plane(&args, &data_dir, acme.is_some()).await?,
    };
    let api_url = control.api_url.clone();
    let host_token = control.host_token.clone();

    aloft_agent::network::set_egress_policy(aloft_agent::network::EgressPolicy {
        allowed: args.allow_egress.clone(),
        platform: database_addresses(args.database_url.as_deref()),
    });
    let agent = Agent::open(AgentConfig {
        data_dir: data_dir.clone(),
        listen: args.agent_listen,
        region: args.region.clone(),
        control_url: api_url.clone(),
        token: host_token.clone(),
        runtime: args.runtime.clone(),
        driver: args.driver,
        vm: aloft_agent::microvm::MicrovmOptions {
            accel: args.vm_accel,
            kernel: args.vm_kernel.clone(),
            ready_timeout: args.vm_ready_timeout.map(|d| d.to_std()),
        },
        log_limits: aloft_agent::logs::LogLimits::new(args.log_max_size, args.log_max_files),
        rootfs_default_gb: args.machine_rootfs_default_gb,
        capacity: aloft_agent::HostCapacity::detect(args.cpus, args.memory_mb),
        mesh_listen: args.mesh_listen,
    })?;
    crate::commands::agent::serve_agent_api(&agent, args.agent_listen).await?;
    if let Some(local) = control.local.as_mut() {
        local.serve_api();
    }
    // A joining host learns now whether the control plane takes it (this host's own control
    // plane, serving already, always does), and its number in 6PN addresses.
    let host_number = crate::commands::agent::register_or_refuse(&agent, &api_url).await?;
    crate::commands::agent::start_mesh(&agent, Some(host_number))?;
    // Where this host's proxy serves the backhaul: its own mesh address, when in the mesh.
    let backhaul_listen = args.mesh_listen.map(|_| {
        SocketAddr::new(
            aloft_api::sixpn::host_address(host_number).into(),
            aloft_api::sixpn::BACKHAUL_PORT,
        )
    });

    tokio::spawn(agent.clone().report());
    agent.reconcile().await.context("reconciling machines")?;

    let dns = start_dns(&args, &api_url, &host_token);

    let proxy = Proxy::new(ProxyConfig {
        http_listen: args.proxy_listen,
        https_listen: args.proxy_https_listen,
        region: args.region.clone(),
        base_domain: args.base_domain.clone(),
        control_url: api_url.clone(),
        token: host_token.clone(),
        request_body_timeout: args.proxy_request_body_timeout.to_std(),
        max_buffered_request_bytes: usize::try_from(args.proxy_max_buffered_request_bytes)
            .context("--proxy-max-buffered-request-bytes is larger than this host's memory")?,
        acme: acme.clone(),
        host_number: Some(host_number),
        backhaul: backhaul_listen.map(|listen| aloft_proxy::backhaul::BackhaulConfig {
            listen,
            device: Some(aloft_agent::mesh::TUN_NAME.to_string()),
        }),
        ..ProxyConfig::default()
    });
    proxy.serve_statics_from(Arc::new(AgentImageFiles(agent.clone())));
    proxy.bind().await.context("binding the proxy")?;
    tokio::spawn(proxy.clone().follow_catalog());
    let (stop_proxy, proxy_stopped) = tokio::sync::oneshot::channel::<()>();
    let proxy_task = tokio::spawn(proxy.clone().serve(async {
        let _ = proxy_stopped.await;
    }));

    let metrics_listener = tokio::net::TcpListener::bind(args.metrics_listen)
        .await
        .with_context(|| format!("binding the metrics endpoint to {}", args.metrics_listen))?;
    tokio::spawn(crate::commands::metrics_endpoint::serve(
        metrics_listener,
        agent.clone(),
        proxy.clone(),
    ));

    println!(
        "Aloft is running (region {}, data in {})",
        args.region,
        data_dir.display()
    );
    match &control.local {
        Some(_) => println!("  API and registry  {api_url}"),
        None => println!("  Joined            {api_url} as host {}", agent.host_id),
    }
    println!(
        "  Proxy             http://{}  (apps at http://<app>.{}:{}/)",
        args.proxy_listen,
        args.base_domain,
        args.proxy_listen.port()
    );
    println!("  Metrics           http://{}/metrics", args.metrics_listen);
    if let Some(https) = args.proxy_https_listen {
        match &acme {
            Some(acme) => println!(
                "  HTTPS             https://{https}  (certificates from {})",
                acme.directory_url
            ),
            None => println!(
                "  HTTPS             https://{https}  (imported certificates, else self-signed)"
            ),
        }
    }
    match &dns {
        Some(dns) => println!("  Private DNS       {dns} (and fdaa:<network>::3 for each network)"),
        None => println!("  Private DNS       off (machine networking needs root; see the log)"),
    }
    if let Some(mesh) = args.mesh_listen {
        println!(
            "  Mesh              udp {mesh} (device {})",
            aloft_agent::mesh::TUN_NAME
        );
    }
    println!("  Machines          {}", agent.driver_description());
    if let Some(local) = &control.local {
        println!("  Organization      {}", local.credentials.org_slug);
        println!(
            "  Access token      saved to {} (`aloft auth token` prints it)",
            local.settings_path.display()
        );
    }

    shutdown_signal().await;
    println!("Shutting down...");
    if !args.keep_machines {
        agent.stop_all_for_shutdown().await;
    }
    let _ = stop_proxy.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), proxy_task).await;
    if let Some(local) = control.local {
        let _ = local.stop_api.send(());
        if let Some(api_task) = local.api_task {
            let _ = tokio::time::timeout(Duration::from_secs(5), api_task).await;
        }
    }
    Ok(())
}

/// The proxy reads `[[statics]]` from the images of this host's machines through the
/// agent (read-only, no symlinks). A proxy on another host than the machine has no
/// access to its image yet.
struct AgentImageFiles(Arc<Agent>);

impl aloft_proxy::statics::ImageFiles for AgentImageFiles {
    fn lookup(
        &self,
        machine_id: &str,
        components: &[&str],
    ) -> Result<aloft_proxy::statics::ImageEntry, String> {
        use aloft_agent::image_files::ImageEntry as Agent;
        use aloft_proxy::statics::ImageEntry as Proxy;
        match self.0.image_entry(machine_id, components) {
            Ok(Agent::File {
                file,
                len,
                modified,
            }) => Ok(Proxy::File {
                file,
                len,
                modified,
            }),
            Ok(Agent::Directory) => Ok(Proxy::Directory),
            Ok(Agent::Missing) => Ok(Proxy::Missing),
            Err(aloft_agent::AgentError::BadRequest(_)) => Ok(Proxy::Missing),
            Err(err) => Err(err.to_string()),
        }
    }
}

/// Writes a credential readable by its owner only (the host token, which agents joining
/// from other hosts and operators' tools need).
fn write_private(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(text.as_bytes())
}

/// Prepares the host's machine networking and starts the private-network resolver; `None`
/// (with a warning) where this host cannot (not root).
fn start_dns(args: &ServerArgs, api_url: &str, host_token: &str) -> Option<SocketAddr> {
    if let Err(err) = aloft_agent::network::prepare_host() {
        tracing::warn!(error = %err, "machine networking is unavailable: no 6PN, no private DNS");
        return None;
    }
    let upstreams = if args.dns_upstreams.is_empty() {
        aloft_dns::upstreams_from_resolv_conf(
            std::path::Path::new("/etc/resolv.conf"),
            &[
                std::net::IpAddr::V6(aloft_api::sixpn::DNS),
                args.dns_listen.ip(),
            ],
        )
    } else {
        args.dns_upstreams.clone()
    };
    let hook: aloft_dns::NetworkHook = std::sync::Arc::new(|network| {
        aloft_agent::network::ensure_service_block(network).map_err(|e| e.to_string())
    });
    let dns = aloft_dns::DnsServer::new(aloft_dns::DnsConfig {
        region: args.region.clone(),
        upstreams,
        network_listeners: Some(args.dns_listen.port()),
        on_network: Some(hook),
        ..aloft_dns::DnsConfig::default()
    });
    if let Err(err) = dns.listen(args.dns_listen, None) {
        tracing::warn!(addr = %args.dns_listen, error = %err, "cannot serve private DNS");
        return None;
    }
    tokio::spawn(dns.follow_catalog(api_url.to_string(), host_token.to_string()));
    Some(args.dns_listen)
}

/// The addresses of the PostgreSQL server in `database_url` (machines must not reach
/// the platform's database even where it has a public address); none for a Unix socket
/// or a name that does not resolve.
fn database_addresses(database_url: Option<&str>) -> Vec<aloft_agent::network::Cidr> {
    use std::net::ToSocketAddrs;
    let Some(url) = database_url else {
        return Vec::new();
    };
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let (host, port) = match host_port.strip_prefix('[') {
        Some(bracketed) => match bracketed.split_once(']') {
            Some((host, port)) => (host, port.trim_start_matches(':')),
            None => return Vec::new(),
        },
        None => match host_port.rsplit_once(':') {
            Some((host, port)) => (host, port),
            None => (host_port, ""),
        },
    };
    if host.is_empty() {
        return Vec::new();
    }
    let port: u16 = port.parse().unwrap_or(5432);
    match (host, port).to_socket_addrs() {
        Ok(addresses) => addresses
            .map(|a| aloft_agent::network::Cidr {
                address: a.ip(),
                prefix: if a.is_ipv4() { 32 } else { 128 },
            })
            .collect(),
        Err(err) => {
            tracing::warn!(host, error = %err, "cannot resolve the database host to keep machines from it");
            Vec::new()
        }
    }
}

/// A size in bytes: `1048576`, `512k`, `10m`, `1g` (binary multiples; `kb`/`mib`-style
/// spellings too).
fn parse_size(text: &str) -> Result<u64, String> {
    let lower = text.trim().to_ascii_lowercase();
    let digits_end = lower
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(lower.len());
    let (digits, unit) = lower.split_at(digits_end);
    let multiplier: u64 = match unit.trim() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        other => {
            return Err(format!(
                "unknown size unit {other:?}; use k, m or g (e.g. 10m)"
            ));
        }
    };
    let value: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a size; write e.g. 10m or 1048576"))?;
    match value.checked_mul(multiplier) {
        Some(0) => Err("the size must be more than 0".into()),
        Some(bytes) => Ok(bytes),
        None => Err(format!("{text:?} is too large")),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_database_host_is_kept_from_machines() {
        let found = |url| {
            super::database_addresses(Some(url))
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            found("postgresql://u:p@192.0.2.7:6543/db"),
            ["192.0.2.7/32"]
        );
        assert_eq!(found("postgres://[2001:db8::7]/db"), ["2001:db8::7/128"]);
        assert!(found("postgresql:///db?host=/run/postgresql").is_empty());
        assert!(super::database_addresses(None).is_empty());
    }

    #[test]
    fn sizes_take_binary_suffixes() {
        assert_eq!(super::parse_size("10m"), Ok(10 << 20));
        assert_eq!(super::parse_size("512KiB"), Ok(512 << 10));
        assert_eq!(super::parse_size("4096"), Ok(4096));
        assert!(super::parse_size("0").is_err());
        assert!(super::parse_size("ten").is_err());
        assert!(super::parse_size("5x").is_err());
    }
}
