//! `aloft dev cluster up|down|status`: a multi-host platform on one machine, for testing.
//!
//! `up` makes a bridge (the hosts' "datacenter network"), starts the control plane on it
//! (`aloft control`, in this network namespace, so the CLI of the same user reaches it
//! without flags), and N hosts, each a network namespace with a veth on the bridge running
//! `aloft server --join` (agent, proxy, private DNS, mesh). It stays in the foreground until
//! Ctrl-C or SIGTERM, then stops everything and removes what it made; `down` does that from
//! another shell. What a cluster is made of is kept in `<data-dir>/cluster.json`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aloft_api::{CreateTokenRequest, CreateTokenResponse};
use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use crate::settings::Settings;

#[derive(clap::Subcommand, Debug)]
pub enum DevCommand {
    /// A multi-host platform on this machine: a control plane and hosts as network
    /// namespaces on a bridge (needs root).
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
}

#[derive(clap::Subcommand, Debug)]
pub enum ClusterCommand {
    /// Start a control plane and N hosts; stays in the foreground until Ctrl-C.
    Up(UpArgs),
    /// Stop the cluster of a data dir and remove everything it made.
    Down {
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// The cluster's API URL and hosts.
    Status {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(short = 'j', long)]
        json: bool,
    },
}

#[derive(clap::Args, Debug)]
pub struct UpArgs {
    /// How many hosts.
    #[arg(long, default_value_t = 3)]
    pub hosts: u8,
    /// Where the control plane and every host keep their state.
    #[arg(long)]
    pub data_dir: PathBuf,
    /// The hosts' regions, in turn (`--regions iad,ams`: iad, ams, iad, ...).
    #[arg(long, value_delimiter = ',', default_value = "local")]
    pub regions: Vec<String>,
    /// Keep the control plane's state in PostgreSQL.
    #[arg(long, env = "ALOFT_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Control-plane replicas (several need --database-url).
    #[arg(long, default_value_t = 1)]
    pub replicas: u8,
    /// How the hosts run machines (`aloft server --driver`).
    #[arg(long, default_value = "container")]
    pub driver: String,
}

/// What `up` made, for `status` and `down`.
#[derive(Debug, Serialize, Deserialize)]
struct ClusterFile {
    /// The `aloft dev cluster up` process.
    pid: u32,
    api_url: String,
    bridge: String,
    control_pids: Vec<u32>,
    hosts: Vec<ClusterHost>,
}

#[derive(Debug, Serialize, Deserialize)]
struct ClusterHost {
    id: String,
    region: String,
    netns: String,
    /// The address:port of the host's HTTP proxy, reachable from where `up` runs.
    proxy: String,
    pid: u32,
    data_dir: PathBuf,
}

/// Names and addresses of one data dir's cluster (several clusters may run at once).
struct Layout {
    tag: String,
    subnet: u8,
}

impl Layout {
    fn of(data_dir: &Path) -> Self {
        let mut hash: u32 = 0x811c_9dc5;
        for byte in data_dir.as_os_str().as_encoded_bytes() {
            hash ^= u32::from(*byte);
            hash = hash.wrapping_mul(0x0100_0193);
        }
        Layout {
            tag: format!("{:04x}", hash & 0xffff),
            subnet: (hash >> 16) as u8,
        }
    }
    fn bridge(&self) -> String {
        format!("adc{}", self.tag)
    }
    fn gateway(&self) -> String {
        format!("10.213.{}.1", self.subnet)
    }
    fn netns(&self, host: u8) -> String {
        format!("adc{}-h{host}", self.tag)
    }
    fn host_ip(&self, host: u8) -> String {
        format!("10.213.{}.{}", self.subnet, 10 + u16::from(host))
    }
}

fn cluster_file(data_dir: &Path) -> PathBuf {
    data_dir.join("cluster.json")
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    Ok(aloft_wireguard::ip(args)?)
}

/// Whether process `pid` runs (an exited child not yet reaped does not).
fn alive(pid: u32) -> bool {
    if pid == 0 || nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_err() {
        return false;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The state follows the command name in parentheses, which may hold spaces.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    !matches!(state, Some("Z") | Some("X") | None)
}

fn signal(pid: u32, signal: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal);
}

fn log_file(path: &Path) -> anyhow::Result<(Stdio, Stdio)> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    Ok((log.try_clone()?.into(), log.into()))
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

pub async fn run(command: DevCommand) -> anyhow::Result<()> {
    let DevCommand::Cluster { command } = command;
    match command {
        ClusterCommand::Up(args) => up(args).await,
        ClusterCommand::Down { data_dir } => down(&data_dir),
        ClusterCommand::Status { data_dir, json } => status(&data_dir, json),
    }
}

fn read_cluster(data_dir: &Path) -> anyhow::Result<ClusterFile> {
    let path = cluster_file(data_dir);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "no cluster in {} (no {}): start one with `aloft dev cluster up --data-dir {}`",
            data_dir.display(),
            path.display(),
            data_dir.display()
        )
    })?;
    serde_json::from_str(&text).with_context(|| format!("reading {}", path.display()))
}

fn status(data_dir: &Path, json: bool) -> anyhow::Result<()> {
    let cluster = read_cluster(data_dir)?;
    if json {
        let hosts: Vec<serde_json::Value> = cluster
            .hosts
            .iter()
            .map(|h| {
                serde_json::json!({
                    "id": h.id, "region": h.region, "netns": h.netns, "proxy": h.proxy,
                    "running": alive(h.pid),
                })
            })
            .collect();
        let out = serde_json::json!({
            "api_url": cluster.api_url,
            "running": alive(cluster.pid),
            "hosts": hosts,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "API  {}  ({})",
        cluster.api_url,
        if alive(cluster.pid) {
            "up"
        } else {
            "not running"
        }
    );
    for host in &cluster.hosts {
        println!(
            "{}  region {}  netns {}  proxy {}{}",
            host.id,
            host.region,
            host.netns,
            host.proxy,
            if alive(host.pid) {
                ""
            } else {
                "  (not running)"
            }
        );
    }
    Ok(())
}

fn down(data_dir: &Path) -> anyhow::Result<()> {
    let cluster = read_cluster(data_dir)?;
    if alive(cluster.pid) && cluster.pid != std::process::id() {
        // `up` tears down what it made; wait for it.
        signal(cluster.pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(90);
        while alive(cluster.pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    if cluster_file(data_dir).exists() {
        teardown(data_dir, &cluster);
    }
    println!("The cluster in {} is down.", data_dir.display());
    Ok(())
}

/// Stops every process of the cluster and removes its namespaces, links and mounts.
fn teardown(data_dir: &Path, cluster: &ClusterFile) {
    let pids: Vec<u32> = cluster.hosts.iter().map(|h| h.pid).collect();
    stop_all(&pids);
    stop_all(&cluster.control_pids);
    for host in &cluster.hosts {
        let machines = host.data_dir.join("agent/machines");
        if let Ok(machines) = std::fs::read_dir(machines) {
            for machine in machines.flatten() {
                let netns = format!("aloft-{}", machine.file_name().to_string_lossy());
                // Machines of a host that was killed still run.
                if let Ok(out) = Command::new("ip").args(["netns", "pids", &netns]).output() {
                    for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                        if let Ok(pid) = pid.parse::<u32>() {
                            signal(pid, nix::sys::signal::Signal::SIGKILL);
                        }
                    }
                }
                let _ = ip(&["netns", "del", &netns]);
            }
        }
        let _ = ip(&["netns", "del", &host.netns]);
    }
    let _ = ip(&["link", "del", &cluster.bridge]);
    aloft_agent::block_image::release_everything_under(data_dir);
    let _ = std::fs::remove_file(cluster_file(data_dir));
}

fn stop_all(pids: &[u32]) {
    for pid in pids {
        signal(*pid, nix::sys::signal::Signal::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while pids.iter().any(|p| alive(*p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    for pid in pids.iter().filter(|p| alive(**p)) {
        signal(*pid, nix::sys::signal::Signal::SIGKILL);
    }
}

/// The processes `up` started, killed if `up` fails half way.
struct Started {
    children: Vec<Child>,
}

impl Drop for Started {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

async fn up(args: UpArgs) -> anyhow::Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!("aloft dev cluster up needs root (network namespaces, a bridge, machines)");
    }
    if args.hosts == 0 || args.hosts > 200 {
        bail!("--hosts {}: give 1 to 200 hosts", args.hosts);
    }
    if args.regions.iter().any(|r| r.trim().is_empty()) {
        bail!("--regions: a region name is empty");
    }
    if args.replicas != 1 {
        bail!(
            "--replicas {}: only one control-plane replica for now (catalog changes do not yet cross replicas)",
            args.replicas
        );
    }
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating {}", args.data_dir.display()))?;
    let data_dir = std::fs::canonicalize(&args.data_dir)
        .with_context(|| format!("reading {}", args.data_dir.display()))?;
    if let Ok(existing) = read_cluster(&data_dir) {
        if alive(existing.pid) {
            bail!(
                "a cluster already runs in {} (pid {}); `aloft dev cluster down --data-dir {}` stops it",
                data_dir.display(),
                existing.pid,
                data_dir.display()
            );
        }
        // A cluster whose `up` was killed: clear what it left.
        teardown(&data_dir, &existing);
    }
    let layout = Layout::of(&data_dir);
    let exe = std::env::current_exe().context("finding the aloft binary")?;

    let bridge = layout.bridge();
    ip(&["link", "add", &bridge, "type", "bridge"])
        .with_context(|| format!("making the cluster's bridge {bridge} (is one left from an earlier cluster? `ip link del {bridge}`)"))?;
    let mut cluster = ClusterFile {
        pid: std::process::id(),
        api_url: String::new(),
        bridge: bridge.clone(),
        control_pids: Vec::new(),
        hosts: Vec::new(),
    };
    let result = start(&args, &data_dir, &layout, &exe, &mut cluster).await;
    let started = match result {
        Ok(started) => started,
        Err(err) => {
            teardown(&data_dir, &cluster);
            return Err(err);
        }
    };
    println!(
        "Aloft dev cluster is up ({} hosts, data in {})",
        cluster.hosts.len(),
        data_dir.display()
    );
    println!("  API     {}  (the aloft CLI uses it)", cluster.api_url);
    for host in &cluster.hosts {
        println!(
            "  {}  region {}  netns {}  proxy http://{}",
            host.id, host.region, host.netns, host.proxy
        );
    }
    println!(
        "Ctrl-C (or `aloft dev cluster down --data-dir {}`) stops it and removes what it made.",
        data_dir.display()
    );
    crate::commands::control::shutdown_signal().await;
    println!("Stopping the cluster...");
    // The teardown stops the processes gently; dropping `started` then only reaps them.
    teardown(&data_dir, &cluster);
    drop(started);
    Ok(())
}

async fn start(
    args: &UpArgs,
    data_dir: &Path,
    layout: &Layout,
    exe: &Path,
    cluster: &mut ClusterFile,
) -> anyhow::Result<Started> {
    let mut started = Started {
        children: Vec::new(),
    };
    let bridge = &cluster.bridge;
    ip(&[
        "addr",
        "add",
        &format!("{}/24", layout.gateway()),
        "dev",
        bridge,
    ])?;
    ip(&["link", "set", bridge, "up"])?;
    write_cluster(data_dir, cluster)?;

    // The control plane, on the bridge.
    let api_listen = format!("{}:4280", layout.gateway());
    let control_dir = data_dir.join("control");
    std::fs::create_dir_all(&control_dir)?;
    let (out, err) = log_file(&data_dir.join("control.log"))?;
    let mut control = Command::new(exe);
    control
        .arg("control")
        .arg("--data-dir")
        .arg(&control_dir)
        .args(["--listen", &api_listen, "--region", &args.regions[0]])
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    match &args.database_url {
        Some(url) => control.env("ALOFT_DATABASE_URL", url),
        None => control.env_remove("ALOFT_DATABASE_URL"),
    };
    let control = control.spawn().context("starting the control plane")?;
    cluster.control_pids.push(control.id());
    started.children.push(control);
    write_cluster(data_dir, cluster)?;
    cluster.api_url = format!("http://{api_listen}");
    let client = wait_for_api(&cluster.api_url, &data_dir.join("control.log")).await?;

    for number in 1..=args.hosts {
        let region = args.regions[usize::from(number - 1) % args.regions.len()].clone();
        let netns = layout.netns(number);
        let host_ip = layout.host_ip(number);
        let outer = format!("adc{}h{number}", layout.tag);
        let inner = format!("adc{}p{number}", layout.tag);
        let host_dir = data_dir.join("hosts").join(format!("h{number}"));
        ip(&["netns", "add", &netns])?;
        // Recorded at once, so a failure half way removes it.
        cluster.hosts.push(ClusterHost {
            id: String::new(),
            region: region.clone(),
            netns: netns.clone(),
            proxy: format!("{host_ip}:8080"),
            pid: 0,
            data_dir: host_dir.clone(),
        });
        ip(&[
            "link", "add", &outer, "type", "veth", "peer", "name", &inner,
        ])?;
        ip(&["link", "set", &inner, "netns", &netns])?;
        ip(&["link", "set", &outer, "master", bridge, "up"])?;
        ip(&["-n", &netns, "link", "set", &inner, "name", "eth0"])?;
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{host_ip}/24"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
        ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            &netns,
            "route",
            "add",
            "default",
            "via",
            &layout.gateway(),
        ])?;

        let id = aloft_agent::local_host_id(&host_dir)?;
        let token: CreateTokenResponse = client
            .post(
                "/v1/tokens",
                &CreateTokenRequest {
                    kind: "host".into(),
                    name: Some(format!("dev cluster host {number}")),
                    ..Default::default()
                },
            )
            .await
            .context("minting a host's join token")?;
        let (out, err) = log_file(&host_dir.join("host.log"))?;
        let host = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{netns}"))
            .arg(exe)
            .arg("server")
            .args(["--join", &cluster.api_url, "--token", &token.token])
            .arg("--data-dir")
            .arg(&host_dir)
            .args(["--region", &region, "--driver", &args.driver])
            .args(["--agent-listen", &format!("{host_ip}:4281")])
            .args(["--mesh-listen", &format!("{host_ip}:51820")])
            .args(["--proxy-listen", &format!("{host_ip}:8080")])
            .args(["--metrics-listen", &format!("{host_ip}:9091")])
            .env_remove("ALOFT_DATABASE_URL")
            .env_remove("ALOFT_HOST_TOKEN")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting host {number}"))?;
        if let Some(entry) = cluster.hosts.last_mut() {
            entry.id = id;
            entry.pid = host.id();
        }
        started.children.push(host);
        write_cluster(data_dir, cluster)?;
    }
    wait_for_hosts(&client, cluster, &mut started).await?;
    Ok(started)
}

fn write_cluster(data_dir: &Path, cluster: &ClusterFile) -> anyhow::Result<()> {
    let path = cluster_file(data_dir);
    let temp = path.with_extension("json.tmp");
    std::fs::write(&temp, serde_json::to_vec_pretty(cluster)?)
        .with_context(|| format!("writing {}", temp.display()))?;
    std::fs::rename(&temp, &path).with_context(|| format!("writing {}", path.display()))
}

/// Waits until the control plane answers with the token it saved for this user.
async fn wait_for_api(api_url: &str, log: &Path) -> anyhow::Result<aloft_client::Client> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(settings) = Settings::load()
            && settings.api_url.as_deref() == Some(api_url)
            && let Some(token) = settings.access_token
        {
            let client = aloft_client::Client::new(api_url, Some(token));
            if client.get::<serde_json::Value>("/v1/apps").await.is_ok() {
                return Ok(client);
            }
        }
        if Instant::now() > deadline {
            bail!(
                "the control plane did not answer at {api_url} within 60 s; its log:\n{}",
                tail(log)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until every host is up, or says which one is not and why.
async fn wait_for_hosts(
    client: &aloft_client::Client,
    cluster: &ClusterFile,
    started: &mut Started,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let listed: Vec<serde_json::Value> = client.get("/v1/hosts").await.unwrap_or_default();
        let up = |id: &str| listed.iter().any(|h| h["id"] == id && h["status"] == "up");
        let waiting: Vec<&ClusterHost> = cluster.hosts.iter().filter(|h| !up(&h.id)).collect();
        if waiting.is_empty() {
            return Ok(());
        }
        for child in &mut started.children {
            if let Ok(Some(exit)) = child.try_wait()
                && let Some(host) = cluster.hosts.iter().find(|h| h.pid == child.id())
            {
                let log = host.data_dir.join("host.log");
                bail!("host {} exited ({exit}); its log:\n{}", host.id, tail(&log));
            }
        }
        if Instant::now() > deadline {
            let names: Vec<&str> = waiting.iter().map(|h| h.id.as_str()).collect();
            bail!("hosts not up within 120 s: {}", names.join(", "));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_dir_names_its_own_links_and_subnet() {
        let a = Layout::of(Path::new("/tmp/a"));
        let b = Layout::of(Path::new("/tmp/b"));
        assert_ne!(a.tag, b.tag);
        // Interface names fit IFNAMSIZ (15 bytes) with 200 hosts.
        assert!(format!("adc{}h200", a.tag).len() <= 15);
        assert!(a.netns(200).len() <= 15);
        assert_eq!(a.host_ip(3), format!("10.213.{}.13", a.subnet));
        assert_eq!(a.bridge(), format!("adc{}", a.tag));
    }
}
