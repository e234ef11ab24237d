//! Scale benchmark of the control plane: 10,000 machines in one org.
//!
//! The control plane runs in a child process (this binary, `serve`), so its RSS is its
//! own; machines are placed on an agent that runs nothing (`aloft_fake_agent`),
//! so only the control plane is measured. Prints creates/s, p50/p99 of GET machine, of a
//! filtered list and of the full list, the server's RSS, and ratios against a peer: the
//! same rows written and read through the store directly, in this process, with no HTTP.
//!
//! Usage: `aloft-bench-control [--machines N] [--concurrency C]` (see bench/control/run.sh).

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use aloft_client::Client;
use aloft_control::store::{AppRow, MachineFilter, MachineRow, OrgRow, Store, now_rfc3339};
use aloft_control::{ControlConfig, ControlPlane};
use aloft_fake_agent::FakeAgent;
use anyhow::{Context, bail};
use http::{Method, StatusCode};
use serde_json::json;

const GROUPS: usize = 10;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("serve") {
        return serve(&args[1..]);
    }
    let flag = |name: &str, default: usize| -> anyhow::Result<usize> {
        match args.iter().position(|a| a == name) {
            Some(i) => args
                .get(i + 1)
                .context("flag needs a value")?
                .parse()
                .with_context(|| format!("{name} needs a number")),
            None => Ok(default),
        }
    };
    let machines = flag("--machines", 10_000)?;
    let concurrency = flag("--concurrency", 32)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    runtime.block_on(drive(machines, concurrency))
}

/// The child: a control plane on `--listen`, state in `--data-dir`.
fn serve(args: &[String]) -> anyhow::Result<()> {
    let data_dir = args.first().context("serve DATA_DIR LISTEN")?;
    let listen: std::net::SocketAddr = args.get(1).context("serve DATA_DIR LISTEN")?.parse()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let (plane, credentials) = ControlPlane::open(ControlConfig {
            data_dir: data_dir.into(),
            listen,
            region: "iad".into(),
            base_domain: "localhost".into(),
            proxy_http_port: 8080,
            database_url: None,
            acme: false,
            registry_upstream: None,
            allowed_private_registries: Vec::new(),
        })?;
        std::fs::write(
            std::path::Path::new(data_dir).join("tokens"),
            // The fake agent registers as bench-host, with that host's own token.
            format!(
                "{}\n{}\n",
                credentials.admin_token,
                plane.host_token_for("bench-host")?
            ),
        )?;
        let listener = tokio::net::TcpListener::bind(listen).await?;
        plane.serve(listener, std::future::pending()).await
    })
}

struct Server {
    child: Child,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// CPU seconds (user + system) a process has used.
fn cpu_secs(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// Counts machines in a listing without parsing it (each view has one `instance_id`).
fn count_machines(body: &[u8]) -> usize {
    body.windows(14)
        .filter(|w| w == b"\"instance_id\":")
        .count()
}

/// The machine's load averages (1, 5, 15 min) as /proc/loadavg has them.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|| "unknown".into())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

/// Runs `f` `rounds` times, one at a time; returns the sorted durations and what each
/// round answered (checked by the caller after the clock has stopped, so the checking is
/// not part of the measured latency).
async fn timed<F, Fut, T>(rounds: usize, mut f: F) -> anyhow::Result<(Vec<Duration>, Vec<T>)>
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let mut times = Vec::with_capacity(rounds);
    let mut answers = Vec::with_capacity(rounds);
    for i in 0..rounds {
        let start = Instant::now();
        answers.push(f(i).await?);
        times.push(start.elapsed());
    }
    times.sort();
    Ok((times, answers))
}

async fn drive(machines: usize, concurrency: usize) -> anyhow::Result<()> {
    let load_before = load_average();
    let dir = tempfile::tempdir()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let listen = format!("127.0.0.1:{port}");
    let child = Command::new(std::env::current_exe()?)
        .args(["serve", &dir.path().display().to_string(), &listen])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting the control plane")?;
    let server = Server { child };
    let url = format!("http://{listen}");
    let tokens_path = dir.path().join("tokens");
    let deadline = Instant::now() + Duration::from_secs(30);
    let (admin_token, host_token) = loop {
        if let Ok(text) = std::fs::read_to_string(&tokens_path) {
            let mut lines = text.lines();
            if let (Some(a), Some(h)) = (lines.next(), lines.next()) {
                let probe = Client::new(&url, Some(a.to_string()));
                if probe.get::<serde_json::Value>("/v1/apps").await.is_ok() {
                    break (a.to_string(), h.to_string());
                }
            }
        }
        if Instant::now() > deadline {
            bail!("the control plane did not come up");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let admin = Client::new(&url, Some(admin_token)).with_timeout(Duration::from_secs(30));
    let (agent_url, agent) = FakeAgent::spawn().await?;
    let host = Client::new(&url, Some(host_token));
    host.call(
        Method::POST,
        "/v1/hosts",
        Some(&json!({ "id": "bench-host", "region": "iad", "agent_url": agent_url })),
    )
    .await?;
    // Heartbeat as an agent does: a host silent for 10 s is down and gets no machines.
    let beating = host.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let beat = json!({ "time": now_rfc3339() });
            let _ = beating
                .call(Method::POST, "/v1/hosts/bench-host/heartbeat", Some(&beat))
                .await;
        }
    });
    admin
        .call(
            Method::POST,
            "/v1/apps",
            Some(&json!({ "app_name": "bench", "org_slug": "personal" })),
        )
        .await?;
    let (rss_before, _) = rss_kib(server.child.id());

    // Creates: `concurrency` clients until `machines` exist.
    println!("creating {machines} machines with {concurrency} concurrent clients...");
    let next = Arc::new(AtomicUsize::new(0));
    let ids = Arc::new(std::sync::Mutex::new(Vec::with_capacity(machines)));
    let server_pid = server.child.id().to_string();
    let (server_cpu_before, own_cpu_before) = (cpu_secs(&server_pid), cpu_secs("self"));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (admin, next, ids) = (admin.clone(), next.clone(), ids.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= machines {
                    return Ok::<_, anyhow::Error>(());
                }
                let body = json!({
                    "config": {
                        "image": "registry-1.docker.io/library/nginx:latest",
                        "guest": { "cpu_kind": "shared", "cpus": 1, "memory_mb": 256 },
                        "services": [{ "protocol": "tcp", "internal_port": 8080, "ports": [{ "port": 80, "handlers": ["http"] }] }],
                        "metadata": { "fly_process_group": "app", "group": format!("g{}", n % GROUPS) }
                    }
                });
                let (status, answer) = admin.raw(Method::POST, "/v1/apps/bench/machines", Some(body.to_string().into_bytes()), &[]).await?;
                if status != StatusCode::OK {
                    bail!("create {n}: {status} {}", String::from_utf8_lossy(&answer));
                }
                let machine: serde_json::Value = serde_json::from_slice(&answer)?;
                if machine["state"] != "started" {
                    bail!("create {n}: machine is {}", machine["state"]);
                }
                ids.lock().unwrap_or_else(|p| p.into_inner()).push(machine["id"].as_str().unwrap_or_default().to_string());
            }
        }));
    }
    for task in tasks {
        task.await??;
    }
    let create_secs = start.elapsed().as_secs_f64();
    let server_cpu = cpu_secs(&server_pid) - server_cpu_before;
    let driver_cpu = cpu_secs("self") - own_cpu_before;
    let creates_per_sec = machines as f64 / create_secs;
    let ids = Arc::try_unwrap(ids)
        .map_err(|_| anyhow::anyhow!("ids still shared"))?
        .into_inner()
        .unwrap_or_default();
    if agent.machine_count() != machines {
        bail!(
            "the agent has {} machines, expected {machines}",
            agent.machine_count()
        );
    }

    // The listing is the API's JSON: parse it once in full.
    let list: Vec<aloft_api::Machine> = admin.get("/v1/apps/bench/machines").await?;
    if list.len() != machines {
        bail!("the listing has {} machines", list.len());
    }
    // Reads, one client at a time (latency, not throughput).
    let (gets, _) = timed(2000, |i| {
        let path = format!("/v1/apps/bench/machines/{}", ids[(i * 7919) % ids.len()]);
        let admin = admin.clone();
        async move {
            admin.get::<serde_json::Value>(&path).await?;
            Ok(())
        }
    })
    .await?;
    let (filtered, answers) = timed(30, |i| {
        let admin = admin.clone();
        async move {
            Ok(admin
                .raw(
                    Method::GET,
                    &format!(
                        "/v1/apps/bench/machines?region=iad&metadata.group=g{}",
                        i % GROUPS
                    ),
                    None,
                    &[],
                )
                .await?)
        }
    })
    .await?;
    for (status, body) in answers {
        if status != StatusCode::OK || count_machines(&body) != machines / GROUPS {
            bail!(
                "filtered list: {status}, {} machines",
                count_machines(&body)
            );
        }
    }
    let (full, answers) = timed(10, |_| {
        let admin = admin.clone();
        async move {
            Ok(admin
                .raw(Method::GET, "/v1/apps/bench/machines", None, &[])
                .await?)
        }
    })
    .await?;
    for (status, body) in answers {
        if status != StatusCode::OK || count_machines(&body) != machines {
            bail!("list: {status}, {} machines", count_machines(&body));
        }
    }
    let (rss, hwm) = rss_kib(server.child.id());
    drop(server);

    // The peer: the same rows through the store directly, no HTTP, no agent.
    let peer_dir = tempfile::tempdir()?;
    let store = Store::open(&peer_dir.path().join("control.db"))?;
    store.create_org(&OrgRow {
        id: "o".into(),
        slug: "personal".into(),
        name: "Personal".into(),
        created_at: now_rfc3339(),
    })?;
    let app = AppRow {
        id: "a".into(),
        name: "bench".into(),
        org_id: "o".into(),
        org_slug: "personal".into(),
        network: "default".into(),
        status: "deployed".into(),
        created_at: now_rfc3339(),
    };
    store.create_app(&app)?;
    let start = Instant::now();
    for n in 0..machines {
        let mut config: aloft_api::MachineConfig = serde_json::from_value(json!({
            "image": "registry-1.docker.io/library/nginx:latest",
            "guest": { "cpu_kind": "shared", "cpus": 1, "memory_mb": 256 },
            "metadata": { "fly_process_group": "app", "group": format!("g{}", n % GROUPS) }
        }))?;
        config.env.clear();
        store.insert_machine(&MachineRow {
            id: format!("{n:014x}"),
            app_id: app.id.clone(),
            app_name: app.name.clone(),
            name: format!("m{n}"),
            region: "iad".into(),
            host_id: "h".into(),
            state: aloft_api::MachineState::Started,
            instance_id: format!("v{n}"),
            config,
            private_ip: None,
            private_ipv4: None,
            created_at: now_rfc3339(),
            updated_at: now_rfc3339(),
            cordoned: false,
            recent_events: Vec::new(),
        })?;
    }
    let peer_inserts_per_sec = machines as f64 / start.elapsed().as_secs_f64();
    let mut peer_gets = Vec::with_capacity(2000);
    for i in 0..2000 {
        let t = Instant::now();
        store.machine(&format!("{:014x}", (i * 7919) % machines))?;
        peer_gets.push(t.elapsed());
    }
    peer_gets.sort();
    let mut peer_lists = Vec::new();
    for _ in 0..10 {
        let t = Instant::now();
        store.list_machines_filtered(&app.id, &MachineFilter::default())?;
        peer_lists.push(t.elapsed());
    }
    peer_lists.sort();

    println!();
    println!(
        "control plane, {machines} machines in one org, SQLite (WAL), agent that runs nothing"
    );
    println!(
        "  creates              {creates_per_sec:>9.0}/s   ({create_secs:.1} s; target >= 1000/s)   store-only peer {peer_inserts_per_sec:.0}/s (API at {:.2}x of it)",
        creates_per_sec / peer_inserts_per_sec
    );
    println!(
        "                       CPU during creates: server {server_cpu:.1} s, driver + fake agent {driver_cpu:.1} s (of {:.1} s on 2 cores)",
        create_secs * 2.0
    );
    println!(
        "  GET machine          p50 {}  p99 {}   (target p99 < 5 ms)   store-only peer p50 {} (API/peer {:.1}x)",
        ms(percentile(&gets, 0.5)),
        ms(percentile(&gets, 0.99)),
        ms(percentile(&peer_gets, 0.5)),
        percentile(&gets, 0.5).as_secs_f64() / percentile(&peer_gets, 0.5).as_secs_f64().max(1e-9)
    );
    println!(
        "  list, region+metadata filter ({} of {machines})  p50 {}  p99 {}",
        machines / GROUPS,
        ms(percentile(&filtered, 0.5)),
        ms(percentile(&filtered, 0.99))
    );
    println!(
        "  list all {machines}      p50 {}  p99 {}   (target < 100 ms)   store-only peer p50 {} (API/peer {:.1}x)",
        ms(percentile(&full, 0.5)),
        ms(percentile(&full, 0.99)),
        ms(percentile(&peer_lists, 0.5)),
        percentile(&full, 0.5).as_secs_f64() / percentile(&peer_lists, 0.5).as_secs_f64().max(1e-9)
    );
    println!(
        "  server RSS           {} MiB now, {} MiB peak ({} MiB before the machines)",
        rss / 1024,
        hwm / 1024,
        rss_before / 1024
    );
    println!(
        "  load average         {load_before} before, {} after (other work on the machine skews every figure)",
        load_average()
    );
    Ok(())
}
