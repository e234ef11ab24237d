//! microVM benchmark (run by `bench/vm/run.sh`, as root): a stopped machine →
//! `POST .../start` → the example app accepting TCP, median and p95 over `STARTS` runs,
//! with the accelerator used and QEMU's RSS per machine; next to the same machine under
//! the container driver (the peer), run the same way in the same process.
//!
//! Everything runs in a network namespace this program creates; nothing leaves it.
//! Usage: bench-vm ALOFT_BINARY HELLO_BINARY EXAMPLE_DIR

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

const API: &str = "http://127.0.0.1:4280";

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

fn percentile(samples: &[f64], q: f64) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    sorted[((sorted.len() as f64 - 1.0) * q).round() as usize]
}

fn wait_for_tcp(address: SocketAddr, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while TcpStream::connect_timeout(&address, Duration::from_millis(50)).is_err() {
        if Instant::now() > deadline {
            bail!("nothing accepted TCP at {address} within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

fn status_kb(pid: &str, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

struct Platform {
    work: tempfile::TempDir,
    aloft: PathBuf,
    server: Child,
    runtime: tokio::runtime::Runtime,
    client: aloft_client::Client,
}

impl Platform {
    fn start(aloft: &Path, args: &[&str]) -> anyhow::Result<Self> {
        let work = tempfile::tempdir()?;
        std::fs::create_dir_all(work.path().join("home"))?;
        let log = std::fs::File::create(work.path().join("server.log"))?;
        let server = Command::new(aloft)
            .env("HOME", work.path().join("home"))
            .arg("server")
            .arg("--data-dir")
            .arg(work.path().join("data"))
            .args(args)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting aloft server")?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let token = Command::new(aloft)
                .env("HOME", work.path().join("home"))
                .args(["auth", "token"])
                .output()?;
            if token.status.success() {
                let client = aloft_client::Client::new(
                    API,
                    Some(String::from_utf8_lossy(&token.stdout).trim().to_string()),
                );
                if runtime.block_on(client.get::<Value>("/v1/apps")).is_ok() {
                    return Ok(Self {
                        work,
                        aloft: aloft.to_path_buf(),
                        server,
                        runtime,
                        client,
                    });
                }
            }
            if Instant::now() > deadline {
                bail!("aloft server did not come up");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn call(&self, method: http::Method, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        self.runtime
            .block_on(self.client.json(method, path, body.as_ref()))
            .map_err(|e| anyhow::anyhow!("{path}: {e}"))
    }

    fn banner(&self) -> String {
        std::fs::read_to_string(self.work.path().join("server.log"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| {
                l.trim()
                    .strip_prefix("Machines")
                    .map(|m| m.trim().to_string())
            })
            .unwrap_or_default()
    }
}

impl Drop for Platform {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.server.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.server.wait();
    }
}

struct Result {
    boots: Vec<f64>,
    rss_mib: Vec<f64>,
    banner: String,
}

/// Deploys the example on a platform with `args`, then times `starts` cold starts.
fn measure(
    aloft: &Path,
    hello: &Path,
    example: &Path,
    args: &[&str],
    starts: usize,
) -> anyhow::Result<Result> {
    let platform = Platform::start(aloft, args)?;
    platform.call(
        http::Method::POST,
        "/v1/apps",
        Some(json!({ "app_name": "bench", "org_slug": "personal" })),
    )?;
    let app = platform.work.path().join("app");
    std::fs::create_dir_all(&app)?;
    for file in ["Dockerfile", ".dockerignore"] {
        std::fs::copy(example.join(file), app.join(file))?;
    }
    std::fs::copy(hello, app.join("hello"))?;
    std::fs::write(
        app.join("fly.toml"),
        "app = \"bench\"\nprimary_region = \"local\"\n[env]\n  PORT = \"8080\"\n[http_service]\n  internal_port = 8080\n  auto_stop_machines = \"off\"\n",
    )?;
    run(Command::new(&platform.aloft)
        .env("HOME", platform.work.path().join("home"))
        .args(["deploy", "--ha=false"])
        .current_dir(&app))?;
    let machines = platform.call(http::Method::GET, "/v1/apps/bench/machines", None)?;
    let id = machines[0]["id"]
        .as_str()
        .context("no machine after deploy")?
        .to_string();
    let path = format!("/v1/apps/bench/machines/{id}");
    let machine_dir = platform.work.path().join("data/agent/machines").join(&id);
    let mut boots = Vec::new();
    let mut rss_mib = Vec::new();
    for round in 0..starts + 1 {
        platform.call(
            http::Method::POST,
            &format!("{path}/stop"),
            Some(json!({ "signal": "SIGKILL", "timeout": "1s" })),
        )?;
        let begin = Instant::now();
        platform.call(http::Method::POST, &format!("{path}/start"), None)?;
        let view = platform.call(http::Method::GET, &path, None)?;
        let ip = view["private_ip"]
            .as_str()
            .filter(|s| !s.is_empty())
            .map(str::to_string);
        let address: SocketAddr = match ip {
            Some(ip) if ip.contains('.') => SocketAddr::new(ip.parse()?, 8080),
            _ => {
                let agent_view: Value = serde_json::from_str(&run(Command::new("curl").args([
                    "-s",
                    "-H",
                    &format!(
                        "Authorization: Bearer {}",
                        std::fs::read_to_string(platform.work.path().join("data/host.token"))?
                            .trim()
                    ),
                    &format!("http://127.0.0.1:4281/v1/machines/{id}"),
                ]))?)?;
                SocketAddr::new(
                    agent_view["private_ipv4"]
                        .as_str()
                        .context("private_ipv4")?
                        .parse()?,
                    8080,
                )
            }
        };
        wait_for_tcp(address, Duration::from_secs(120))?;
        let elapsed = begin.elapsed().as_secs_f64() * 1000.0;
        // The first start warms caches (initramfs, root disk); it is not counted.
        if round > 0 {
            boots.push(elapsed);
            if let Ok(pid) = std::fs::read_to_string(machine_dir.join("qemu.pid")) {
                rss_mib.push(status_kb(pid.trim(), "VmRSS:") as f64 / 1024.0);
            }
        }
    }
    let banner = platform.banner();
    Ok(Result {
        boots,
        rss_mib,
        banner,
    })
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, aloft, hello, example] = args.as_slice() else {
        bail!("usage: bench-vm ALOFT_BINARY HELLO_BINARY EXAMPLE_DIR");
    };
    let starts: usize = std::env::var("STARTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let accel = std::env::var("ACCEL").unwrap_or_else(|_| "auto".into());
    let netns = format!("aloft-benchvm-{}", std::process::id());
    run(Command::new("ip").args(["netns", "add", &netns]))?;
    let result = (|| {
        let file = std::fs::File::open(format!("/run/netns/{netns}"))?;
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
            .context("entering the bench namespace")?;
        run(Command::new("ip").args(["link", "set", "lo", "up"]))?;
        let (aloft, hello, example) = (Path::new(aloft), Path::new(hello), Path::new(example));
        eprintln!("microVMs: {starts} starts...");
        let vm = measure(
            aloft,
            hello,
            example,
            &["--driver", "microvm", "--vm-accel", &accel],
            starts,
        )?;
        eprintln!("containers (peer): {starts} starts...");
        let container = measure(aloft, hello, example, &["--driver", "container"], starts)?;
        let (vm_median, vm_p95) = (percentile(&vm.boots, 0.5), percentile(&vm.boots, 0.95));
        let (c_median, c_p95) = (
            percentile(&container.boots, 0.5),
            percentile(&container.boots, 0.95),
        );
        println!("driver       {}", vm.banner);
        println!("start → example app accepting TCP ({starts} runs each):");
        println!("  microVM    median {vm_median:8.1} ms   p95 {vm_p95:8.1} ms");
        println!(
            "  container  median {c_median:8.1} ms   p95 {c_p95:8.1} ms   ({})",
            container.banner
        );
        println!(
            "  ratio      microVM / container = {:.1}x (median)",
            vm_median / c_median
        );
        if !vm.rss_mib.is_empty() {
            println!(
                "QEMU RSS per machine once the app accepts: median {:.1} MiB, max {:.1} MiB (guest memory 256 MB)",
                percentile(&vm.rss_mib, 0.5),
                percentile(&vm.rss_mib, 1.0)
            );
        }
        println!("targets on a KVM host: ≤ 300 ms to accepting, ≤ 40 MiB VMM overhead");
        Ok(())
    })();
    let _ = run(Command::new("ip").args(["netns", "del", &netns]));
    result
}
