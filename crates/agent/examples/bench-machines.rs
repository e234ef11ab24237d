//! Machine benchmarks (run by `bench/agent/run.sh`, as root):
//!
//! (a) start latency: a stopped machine → `POST .../start` → the example app accepting TCP,
//!     median and p95 over `STARTS` runs, next to the bare OCI runtime (`runc run -d`)
//!     starting the same root filesystem in a prepared network namespace (the floor);
//! (b) create with the image cached (`POST .../machines`, `skip_launch`);
//! (c) density: `DENSITY` idle example machines, the platform's RSS and memory per machine.
//!
//! Everything runs in a network namespace this program creates; nothing leaves it.
//! Usage: bench-machines ALOFT_BINARY HELLO_BINARY EXAMPLE_DIR

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

const API: &str = "http://127.0.0.1:4280";

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn run(command: &mut Command) -> anyhow::Result<String> {
    let output = command
        .output()
        .with_context(|| format!("running {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    run(Command::new("ip").args(args)).map(|_| ())
}

struct Stats {
    median: Duration,
    p95: Duration,
}

fn stats(samples: &mut [Duration]) -> Stats {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    Stats {
        median: at(0.5),
        p95: at(0.95),
    }
}

fn ms(duration: Duration) -> String {
    format!("{:.1} ms", duration.as_secs_f64() * 1000.0)
}

/// Waits until something accepts TCP at `address`.
fn wait_for_tcp(address: SocketAddr, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        if TcpStream::connect_timeout(&address, Duration::from_millis(50)).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("nothing accepted TCP at {address} within {limit:?}");
        }
        std::thread::sleep(Duration::from_micros(500));
    }
}

struct Bench {
    work: tempfile::TempDir,
    aloft: PathBuf,
    server: Option<Child>,
    token: String,
    runtime: tokio::runtime::Runtime,
    client: Option<aloft_client::Client>,
}

impl Bench {
    fn aloft(&self) -> Command {
        let mut command = Command::new(&self.aloft);
        command
            .env("HOME", self.work.path().join("home"))
            .env_remove("ALOFT_API_URL");
        command
    }

    fn call(&self, method: http::Method, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let client = self.client.as_ref().context("no client")?;
        self.runtime
            .block_on(client.json(method, path, body.as_ref()))
            .map_err(|e| anyhow::anyhow!("{path}: {e}"))
    }

    fn start_server(&mut self) -> anyhow::Result<()> {
        std::fs::create_dir_all(self.work.path().join("home"))?;
        let log = std::fs::File::create(self.work.path().join("server.log"))?;
        let child = self
            .aloft()
            .arg("server")
            .arg("--data-dir")
            .arg(self.work.path().join("data"))
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting aloft server")?;
        self.server = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(token) = run(self.aloft().args(["auth", "token"])) {
                self.token = token.trim().to_string();
                self.client = Some(aloft_client::Client::new(API, Some(self.token.clone())));
                if self.call(http::Method::GET, "/v1/apps", None).is_ok() {
                    return Ok(());
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!(
            "aloft server did not come up; see {}",
            self.work.path().join("server.log").display()
        )
    }

    fn server_pid(&self) -> u32 {
        self.server.as_ref().map(|s| s.id()).unwrap_or(0)
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        if let Ok(copy) = std::env::var("BENCH_SERVER_LOG") {
            let _ = std::fs::copy(self.work.path().join("server.log"), copy);
        }
        if let Some(mut server) = self.server.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(server.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = server.wait();
        }
    }
}

/// The floor: `runc run -d` of the same root filesystem, in a network namespace made once.
struct Floor {
    dir: PathBuf,
    rootfs: PathBuf,
    netns: String,
}

impl Floor {
    fn prepare(dir: &Path, layers: &[PathBuf], hello_port: u16) -> anyhow::Result<Self> {
        let rootfs = dir.join("rootfs");
        std::fs::create_dir_all(&rootfs)?;
        let lower: Vec<String> = layers
            .iter()
            .rev()
            .map(|p| p.display().to_string())
            .collect();
        let (upper, work) = (dir.join("upper"), dir.join("work"));
        std::fs::create_dir_all(&upper)?;
        std::fs::create_dir_all(&work)?;
        let options = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.join(":"),
            upper.display(),
            work.display()
        );
        nix::mount::mount(
            Some("overlay"),
            &rootfs,
            Some("overlay"),
            nix::mount::MsFlags::empty(),
            Some(options.as_str()),
        )
        .context("mounting the floor's rootfs")?;
        let netns = format!("aloft-floor-{}", std::process::id());
        ip(&["netns", "add", &netns])?;
        ip(&[
            "link", "add", "flo0", "type", "veth", "peer", "name", "eth0", "netns", &netns,
        ])?;
        ip(&["addr", "add", "172.31.255.1/30", "dev", "flo0"])?;
        ip(&["link", "set", "flo0", "up"])?;
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            "172.31.255.2/30",
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
        ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        let config = json!({
            "ociVersion": "1.0.2",
            "process": {
                "terminal": false, "user": { "uid": 0, "gid": 0 }, "args": ["/hello"],
                "env": ["PATH=/usr/bin:/bin", format!("PORT={hello_port}")], "cwd": "/",
                "capabilities": { "bounding": ["CAP_NET_BIND_SERVICE"], "effective": ["CAP_NET_BIND_SERVICE"], "permitted": ["CAP_NET_BIND_SERVICE"] }
            },
            "root": { "path": rootfs, "readonly": false },
            "hostname": "floor",
            "mounts": [
                { "destination": "/proc", "type": "proc", "source": "proc" },
                { "destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755", "size=65536k"] }
            ],
            "linux": {
                "namespaces": [{ "type": "pid" }, { "type": "ipc" }, { "type": "uts" }, { "type": "mount" }, { "type": "network", "path": format!("/run/netns/{netns}") }],
                "cgroupsPath": format!("/aloft-floor/{}", std::process::id()),
                "resources": { "memory": { "limit": 268435456 } }
            }
        });
        std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&config)?)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            rootfs,
            netns,
        })
    }

    fn runc(&self) -> Command {
        let mut command = Command::new("runc");
        command
            .arg("--root")
            .arg(self.dir.join("state"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        command
    }

    fn start_once(&self, id: &str) -> anyhow::Result<Duration> {
        let begin = Instant::now();
        let status = self
            .runc()
            .args(["run", "--detach", "--bundle"])
            .arg(&self.dir)
            .arg(id)
            .status()?;
        if !status.success() {
            bail!("runc run failed");
        }
        wait_for_tcp("172.31.255.2:8080".parse()?, Duration::from_secs(10))?;
        let elapsed = begin.elapsed();
        let _ = self.runc().args(["delete", "--force", id]).status();
        Ok(elapsed)
    }
}

impl Drop for Floor {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.rootfs, nix::mount::MntFlags::MNT_DETACH);
        let _ = ip(&["link", "del", "flo0"]);
        let _ = ip(&["netns", "del", &self.netns]);
        let _ = std::fs::remove_dir(format!(
            "/sys/fs/cgroup/memory/aloft-floor/{}",
            std::process::id()
        ));
    }
}

/// Proportional set size: shared pages (the `aloft` binary all supervisors map) split
/// among the processes sharing them.
fn pss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("Pss:")
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            })
        })
        .unwrap_or(0)
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("VmRSS:")
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            })
        })
        .unwrap_or(0)
}

/// Supervisors of this bench's machines (their machine directory is under `data_dir`).
fn shim_pids(data_dir: &Path) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let prefix = data_dir.as_os_str().as_encoded_bytes();
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                let args: Vec<&[u8]> = c.split(|b| *b == 0).collect();
                args.get(1) == Some(&b"shim".as_slice())
                    && args.get(2).is_some_and(|dir| dir.starts_with(prefix))
            })
        })
        .collect()
}

fn cgroup_memory(id: &str) -> u64 {
    std::fs::read_to_string(format!(
        "/sys/fs/cgroup/memory/aloft/{id}/memory.usage_in_bytes"
    ))
    .ok()
    .and_then(|s| s.trim().parse().ok())
    .unwrap_or(0)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, aloft, hello, example] = args.as_slice() else {
        bail!("usage: bench-machines ALOFT_BINARY HELLO_BINARY EXAMPLE_DIR");
    };
    // Our own network namespace first, while this process has one thread.
    let netns = format!("aloft-bench-{}", std::process::id());
    ip(&["netns", "add", &netns])?;
    let result = (|| {
        let file = std::fs::File::open(format!("/run/netns/{netns}"))?;
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
            .context("entering the bench network namespace")?;
        ip(&["link", "set", "lo", "up"])?;
        let absolute = |p: &str| std::fs::canonicalize(p).with_context(|| format!("finding {p}"));
        bench(&absolute(aloft)?, &absolute(hello)?, &absolute(example)?)
    })();
    let _ = ip(&["netns", "del", &netns]);
    result
}

fn bench(aloft: &Path, hello: &Path, example: &Path) -> anyhow::Result<()> {
    let starts = env_number("STARTS", 50);
    let creates = env_number("CREATES", 20);
    let density = env_number("DENSITY", 200);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut bench = Bench {
        work: tempfile::tempdir()?,
        aloft: aloft.to_path_buf(),
        server: None,
        token: String::new(),
        runtime,
        client: None,
    };
    bench.start_server()?;
    bench.call(
        http::Method::POST,
        "/v1/apps",
        Some(json!({ "app_name": "bench", "org_slug": "personal" })),
    )?;
    let app_dir = bench.work.path().join("app");
    std::fs::create_dir_all(&app_dir)?;
    for file in ["Dockerfile", ".dockerignore"] {
        std::fs::copy(example.join(file), app_dir.join(file))?;
    }
    std::fs::copy(hello, app_dir.join("hello"))?;
    std::fs::write(
        app_dir.join("fly.toml"),
        "app = \"bench\"\nprimary_region = \"local\"\n[env]\n  PORT = \"8080\"\n[http_service]\n  internal_port = 8080\n  auto_stop_machines = \"off\"\n",
    )?;
    eprintln!("building and deploying the example app...");
    run(bench.aloft().arg("deploy").current_dir(&app_dir))?;
    let machines = bench.call(http::Method::GET, "/v1/apps/bench/machines", None)?;
    let machine = machines
        .as_array()
        .and_then(|m| m.first())
        .cloned()
        .context("no machine after deploy")?;
    let id = machine["id"].as_str().context("machine id")?.to_string();
    let config = machine["config"].clone();
    let agent_machine_dir = bench.work.path().join("data/agent/machines").join(&id);
    let image: Value =
        serde_json::from_slice(&std::fs::read(agent_machine_dir.join("image.json"))?)?;
    let layers: Vec<PathBuf> = image["layers"]
        .as_array()
        .context("layers")?
        .iter()
        .filter_map(|l| l.as_str().map(PathBuf::from))
        .collect();
    let machine_path = format!("/v1/apps/bench/machines/{id}");
    let host_token = std::fs::read_to_string(bench.work.path().join("data/host.token"))?
        .trim()
        .to_string();
    let agent = aloft_client::Client::new("http://127.0.0.1:4281", Some(host_token));
    let view: Value = bench
        .runtime
        .block_on(agent.get(&format!("/v1/machines/{id}")))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let address = SocketAddr::new(
        view["private_ipv4"]
            .as_str()
            .context("private_ipv4")?
            .parse()?,
        8080,
    );
    wait_for_tcp(address, Duration::from_secs(20))?;

    // (a) start latency: machine vs floor, interleaved so load elsewhere hits both alike.
    let floor = Floor::prepare(&bench.work.path().join("floor"), &layers, 8080)?;
    let mut machine_samples = Vec::new();
    let mut floor_samples = Vec::new();
    for round in 0..starts + 2 {
        bench.call(
            http::Method::POST,
            &format!("{machine_path}/stop"),
            Some(json!({ "signal": "SIGKILL" })),
        )?;
        let begin = Instant::now();
        bench.call(http::Method::POST, &format!("{machine_path}/start"), None)?;
        wait_for_tcp(address, Duration::from_secs(10))?;
        let machine_time = begin.elapsed();
        let floor_time = floor.start_once(&format!("floor-{round}"))?;
        if round >= 2 {
            machine_samples.push(machine_time);
            floor_samples.push(floor_time);
        }
    }
    drop(floor);
    let machine_stats = stats(&mut machine_samples);
    let floor_stats = stats(&mut floor_samples);
    println!("(a) start latency, stopped -> started -> example app accepting TCP, {starts} starts");
    println!(
        "    aloft machine start      median {:>9}   p95 {:>9}",
        ms(machine_stats.median),
        ms(machine_stats.p95)
    );
    println!(
        "    bare runc run (floor)    median {:>9}   p95 {:>9}",
        ms(floor_stats.median),
        ms(floor_stats.p95)
    );
    println!(
        "    ratio aloft/floor        median {:>7.2}x   p95 {:>7.2}x   (targets: median <= 100 ms and <= 2x)",
        machine_stats.median.as_secs_f64() / floor_stats.median.as_secs_f64(),
        machine_stats.p95.as_secs_f64() / floor_stats.p95.as_secs_f64()
    );

    // (b) create with the image cached.
    let mut create_samples = Vec::new();
    for _ in 0..creates {
        let begin = Instant::now();
        let created = bench.call(
            http::Method::POST,
            "/v1/apps/bench/machines",
            Some(json!({ "config": config, "skip_launch": true })),
        )?;
        create_samples.push(begin.elapsed());
        let new_id = created["id"].as_str().context("created id")?;
        bench.call(
            http::Method::DELETE,
            &format!("/v1/apps/bench/machines/{new_id}?force=true"),
            None,
        )?;
    }
    let create_stats = stats(&mut create_samples);
    println!("(b) create with the image cached, {creates} creates (skip_launch)");
    println!(
        "    median {:>9}   p95 {:>9}   (target <= 300 ms)",
        ms(create_stats.median),
        ms(create_stats.p95)
    );

    // (c) density.
    let before_kb = rss_kb(bench.server_pid());
    let mut ids = Vec::new();
    let begin = Instant::now();
    for n in 0..density {
        match bench.call(
            http::Method::POST,
            "/v1/apps/bench/machines",
            Some(json!({ "config": config })),
        ) {
            Ok(created) => ids.extend(created["id"].as_str().map(str::to_string)),
            Err(err) => {
                eprintln!("machine {n} failed: {err}");
                break;
            }
        }
        if n % 50 == 49 {
            eprint!("{} machines...", n + 1);
            let _ = std::io::stderr().flush();
        }
    }
    eprintln!();
    let took = begin.elapsed();
    std::thread::sleep(Duration::from_secs(3));
    let server_kb = rss_kb(bench.server_pid());
    let shims = shim_pids(&bench.work.path().join("data"));
    let shim_kb: u64 = shims.iter().map(|p| rss_kb(*p)).sum();
    let shim_pss_kb: u64 = shims.iter().map(|p| pss_kb(*p)).sum();
    let cgroup_bytes: u64 = ids.iter().map(|id| cgroup_memory(id)).sum();
    let count = ids.len().max(1) as f64;
    println!(
        "(c) density: {} idle example machines started in {:.1} s",
        ids.len(),
        took.as_secs_f64()
    );
    println!(
        "    platform process RSS     {:>8.1} MiB (was {:.1} MiB with 1 machine; control plane, registry, proxy and agent in one)",
        server_kb as f64 / 1024.0,
        before_kb as f64 / 1024.0
    );
    println!(
        "    per machine: cgroup      {:>8.2} MiB (init + app, page cache included)",
        cgroup_bytes as f64 / count / 1048576.0
    );
    println!(
        "    per machine: shim RSS    {:>8.2} MiB ({} shims)",
        shim_kb as f64 / shims.len().max(1) as f64 / 1024.0,
        shims.len()
    );
    println!(
        "    per machine: shim PSS    {:>8.2} MiB (the shared aloft binary split among them)",
        shim_pss_kb as f64 / shims.len().max(1) as f64 / 1024.0
    );
    println!(
        "    per machine: total       {:>8.2} MiB (cgroup + shim PSS)",
        (cgroup_bytes as f64 + shim_pss_kb as f64 * 1024.0) / count / 1048576.0
    );
    for id in &ids {
        let _ = bench.call(
            http::Method::DELETE,
            &format!("/v1/apps/bench/machines/{id}?force=true"),
            None,
        );
    }
    Ok(())
}
