//! Deploys end to end on a real single-host platform (see tests/common): strategies with
//! traffic flowing through the proxy, failures, the release command, images from another
//! registry, rollback, registry garbage collection, scaling, launch and the static builder.

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Platform, Run};
use serde_json::Value;

const CHECKED_SERVICE: &str = r#"
[http_service]
  internal_port = 8080
  force_https = false
  auto_stop_machines = "off"
  auto_start_machines = false
  min_machines_running = 0

  [[http_service.checks]]
    grace_period = "2s"
    interval = "1s"
    timeout = "2s"
    method = "GET"
    path = "/"
"#;

/// An app directory: the example binary (and busybox as /bin/sh), a `version.txt` so each
/// version is a new image with one layer changed, and a fly.toml.
fn app_dir(
    platform: &Platform,
    dir_name: &str,
    app: &str,
    version: &str,
    extra_toml: &str,
) -> PathBuf {
    let dir = platform.root.path().join(dir_name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(common::hello_binary(), dir.join("hello")).unwrap();
    std::fs::copy("/bin/busybox", dir.join("busybox")).unwrap();
    std::fs::write(dir.join("version.txt"), version).unwrap();
    std::fs::write(
        dir.join("Dockerfile"),
        "FROM scratch\nCOPY busybox /bin/sh\nCOPY hello /hello\nCOPY version.txt /version.txt\nCMD [\"/hello\"]\n",
    )
    .unwrap();
    let toml = format!(
        "app = \"{app}\"\nprimary_region = \"local\"\n\n[env]\n  PORT = \"8080\"\n  VERSION = \"{version}\"\n{extra_toml}"
    );
    std::fs::write(dir.join("fly.toml"), toml).unwrap();
    dir
}

fn deploy(platform: &Platform, dir: &Path, args: &[&str]) -> Run {
    let mut all = vec!["deploy"];
    all.extend_from_slice(args);
    platform.aloft_in(Some(dir), &all)
}

fn must(run: Run, what: &str, platform: &Platform) -> Run {
    assert!(
        run.ok(),
        "{what} failed: {run}\n--- server log (tail)\n{}",
        tail(&platform.server_log(), 60)
    );
    run
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn json(run: &Run) -> Value {
    serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{e}: {run}"))
}

fn machines(platform: &Platform, app: &str) -> Vec<Value> {
    let run = platform.aloft(&["machine", "list", "-a", app, "--json"]);
    json(&run).as_array().cloned().unwrap_or_default()
}

fn release_of(machine: &Value) -> String {
    machine["config"]["metadata"]["fly_release_version"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn releases(platform: &Platform, app: &str) -> Vec<Value> {
    json(&platform.aloft(&["releases", "-a", app, "--json"]))
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// GET / through the proxy: (status, VERSION env of the machine that answered).
fn get(platform: &Platform, host: &str) -> (String, String) {
    let run = platform.curl(&[
        "-s",
        "-w",
        "\n%{http_code}",
        "-H",
        &format!("Host: {host}"),
        "http://127.0.0.1:8080/",
    ]);
    let (body, status) = run.stdout.rsplit_once('\n').unwrap_or(("", ""));
    let version = serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|d| d["env"]["VERSION"].as_str().map(str::to_string))
        .unwrap_or_default();
    (status.to_string(), version)
}

fn wait_for(what: &str, limit: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if condition() {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("timed out waiting for {what}");
}

/// Requests at a steady rate through the proxy, from a thread inside the platform's
/// network namespace; every answer that is not a 200 (or no answer) is a failure.
struct Load {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<BTreeSet<String>>>,
    handle: std::thread::JoinHandle<(u64, Vec<String>)>,
}

impl Load {
    fn start(platform: &Platform, host: &str, per_second: u32) -> Load {
        let netns = format!("/run/netns/{}", platform.netns);
        let host = host.to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(BTreeSet::new()));
        let (stop_flag, seen_versions) = (stop.clone(), seen.clone());
        let handle = std::thread::spawn(move || {
            let file = std::fs::File::open(&netns).expect("opening the netns");
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("entering the netns");
            let interval = Duration::from_secs(1) / per_second;
            let mut next = Instant::now();
            let (mut sent, mut failures) = (0u64, Vec::new());
            while !stop_flag.load(Ordering::SeqCst) {
                sent += 1;
                match request(&host) {
                    Ok((200, version)) => {
                        seen_versions.lock().unwrap().insert(version);
                    }
                    Ok((status, _)) => failures.push(format!("request {sent}: HTTP {status}")),
                    Err(err) => failures.push(format!("request {sent}: {err}")),
                }
                next += interval;
                if let Some(wait) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
            (sent, failures)
        });
        Load { stop, seen, handle }
    }

    fn versions(&self) -> BTreeSet<String> {
        self.seen.lock().unwrap().clone()
    }

    fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.join().expect("load thread")
    }
}

fn request(host: &str) -> std::io::Result<(u16, String)> {
    let mut stream =
        TcpStream::connect_timeout(&"127.0.0.1:8080".parse().unwrap(), Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    let text = String::from_utf8_lossy(&answer);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or_default();
    let version = serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|d| d["env"]["VERSION"].as_str().map(str::to_string))
        .unwrap_or_default();
    Ok((status, version))
}

#[test]
fn rolling_and_bluegreen_deploys_drop_no_requests() {
    require_platform!();
    let platform = Platform::start();
    must(
        platform.aloft(&["apps", "create", "zdt"]),
        "apps create",
        &platform,
    );
    let v0 = app_dir(&platform, "v0", "zdt", "v0", CHECKED_SERVICE);
    must(
        deploy(&platform, &v0, &["--ha=false"]),
        "first deploy",
        &platform,
    );
    let single = machines(&platform, "zdt");
    assert_eq!(single.len(), 1);

    // One machine: the rolling deploy starts its replacement, waits for it to be
    // healthy, and only then drains and destroys the old one.
    let v1 = app_dir(&platform, "v1", "zdt", "v1", CHECKED_SERVICE);
    let load = Load::start(&platform, "zdt.localhost", 50);
    let run = must(
        deploy(&platform, &v1, &[]),
        "rolling deploy of one machine",
        &platform,
    );
    wait_for("answers from v1", Duration::from_secs(30), || {
        get(&platform, "zdt.localhost").1 == "v1"
    });
    let (sent, failures) = load.finish();
    println!(
        "single-machine rolling deploy: {sent} requests, {} failed",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {sent} requests failed: {failures:?}\n{run}",
        failures.len()
    );
    let replaced = machines(&platform, "zdt");
    assert_eq!(replaced.len(), 1);
    assert_ne!(
        replaced[0]["id"], single[0]["id"],
        "the machine was replaced, not restarted"
    );

    must(
        platform.aloft(&["scale", "count", "3", "-a", "zdt", "--yes"]),
        "scale count 3",
        &platform,
    );
    assert_eq!(get(&platform, "zdt.localhost"), ("200".into(), "v1".into()));

    for (version, strategy) in [("v2", "rolling"), ("v3", "bluegreen")] {
        let dir = app_dir(&platform, version, "zdt", version, CHECKED_SERVICE);
        let load = Load::start(&platform, "zdt.localhost", 50);
        let run = must(
            deploy(&platform, &dir, &["--strategy", strategy]),
            strategy,
            &platform,
        );
        // Keep the load on until every answer comes from the new release.
        wait_for(
            "answers from the new release",
            Duration::from_secs(30),
            || get(&platform, "zdt.localhost").1 == version,
        );
        wait_for(
            "the load's own requests to reach the new release",
            Duration::from_secs(30),
            || load.versions().contains(version),
        );
        let versions = load.versions();
        let (sent, failures) = load.finish();
        println!(
            "{strategy} deploy to {version}: {sent} requests, {} failed, versions served {versions:?}",
            failures.len()
        );
        assert!(
            failures.is_empty(),
            "{strategy}: {} of {sent} requests failed: {failures:?}\n{run}",
            failures.len()
        );
        assert!(
            sent >= 5,
            "the load ran during the deploy ({sent} requests)"
        );
        assert!(versions.contains(version), "{versions:?}");
        let list = machines(&platform, "zdt");
        assert_eq!(
            list.len(),
            3,
            "the deploy keeps the group's count: {list:?}"
        );
        assert!(
            list.iter()
                .all(|m| m["config"]["env"]["VERSION"] == version),
            "{list:?}"
        );
    }
    let run = platform.aloft(&["releases", "-a", "zdt"]);
    assert!(
        run.stdout
            .lines()
            .filter(|l| l.contains("complete"))
            .count()
            >= 3,
        "{run}"
    );
}

#[test]
fn a_failing_machine_stops_the_deploy_and_the_previous_release_keeps_serving() {
    require_platform!();
    let platform = Platform::start();
    must(
        platform.aloft(&["apps", "create", "fail"]),
        "apps create",
        &platform,
    );
    let good = app_dir(&platform, "good", "fail", "good", CHECKED_SERVICE);
    must(deploy(&platform, &good, &[]), "good deploy", &platform);
    let before: Vec<(String, String)> = machines(&platform, "fail")
        .iter()
        .map(|m| (m["id"].to_string(), m["instance_id"].to_string()))
        .collect();

    // A release whose main process exits: the deploy stops at once (not after the 5m
    // wait timeout) and names the machine and its exit.
    let crashing = app_dir(
        &platform,
        "crashing",
        "fail",
        "crashing",
        &format!(
            "{CHECKED_SERVICE}\n[experimental]\n  cmd = [\"/bin/sh\", \"-c\", \"echo booting the bad release; echo giving up >&2; exit 3\"]\n"
        ),
    );
    let run = deploy(&platform, &crashing, &["--wait-timeout", "5m"]);
    assert!(!run.ok(), "{run}");
    assert!(run.stderr.contains("--> Failing machine: "), "{run}");
    assert!(
        run.stderr.contains("main process ended: exit code 3"),
        "{run}"
    );
    let logs = run.stderr.split("--> Last ").nth(1).unwrap_or_default();
    assert!(
        logs.contains("booting the bad release") && logs.contains("giving up"),
        "the failing machine's last log lines: {run}"
    );
    let last = run.stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("Error: deploy failed: machine ")
            && last.contains("exited: its main process exited with code 3"),
        "{run}"
    );
    assert!(!last.contains("wait timeout"), "{run}");
    assert_eq!(
        get(&platform, "fail.localhost"),
        ("200".into(), "good".into()),
        "the previous release keeps serving"
    );

    // A release whose health check fails: named with the check and its output.
    let unhealthy = app_dir(
        &platform,
        "unhealthy",
        "fail",
        "unhealthy",
        &CHECKED_SERVICE
            .replace("method = \"GET\"", "method = \"POST\"")
            .replace("grace_period = \"2s\"", "grace_period = \"0s\""),
    );
    let run = deploy(&platform, &unhealthy, &[]);
    assert!(!run.ok(), "{run}");
    assert!(
        run.stderr
            .contains("failing check: servicecheck-00-http-8080: POST /: HTTP/1.1 405"),
        "{run}"
    );
    assert_eq!(
        get(&platform, "fail.localhost"),
        ("200".into(), "good".into())
    );

    // A release that never listens where its check looks: the wait timeout ends it.
    let deaf = app_dir(
        &platform,
        "deaf",
        "fail",
        "deaf",
        &format!(
            "{}\n[experimental]\n  cmd = [\"/bin/sh\", \"-c\", \"PORT=9090 exec /hello\"]\n",
            CHECKED_SERVICE.replace("    grace_period = \"2s\"\n", "")
        ),
    );
    let run = deploy(&platform, &deaf, &["--wait-timeout", "4s"]);
    assert!(!run.ok(), "{run}");
    assert!(
        run.stderr
            .lines()
            .last()
            .unwrap_or_default()
            .contains("was not healthy within the wait timeout of 4s"),
        "{run}"
    );
    assert_eq!(
        get(&platform, "fail.localhost"),
        ("200".into(), "good".into())
    );

    let after: Vec<(String, String)> = machines(&platform, "fail")
        .iter()
        .map(|m| (m["id"].to_string(), m["instance_id"].to_string()))
        .collect();
    assert_eq!(after.len(), before.len(), "{after:?}");
    assert!(
        machines(&platform, "fail")
            .iter()
            .all(|m| release_of(m) == "1" && m["state"] == "started"),
        "every machine is back on release 1"
    );
    let list = releases(&platform, "fail");
    let statuses: Vec<(u64, String)> = list
        .iter()
        .map(|r| {
            (
                r["version"].as_u64().unwrap_or(0),
                r["status"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    assert_eq!(
        statuses,
        vec![
            (4, "failed".into()),
            (3, "failed".into()),
            (2, "failed".into()),
            (1, "complete".into())
        ]
    );
    assert!(
        list.iter().all(|r| r["user"] == "admin"),
        "releases record who deployed: {list:?}"
    );
}

#[test]
fn the_release_command_runs_first_and_its_failure_stops_the_deploy() {
    require_platform!();
    let platform = Platform::start();
    must(
        platform.aloft(&["apps", "create", "rel"]),
        "apps create",
        &platform,
    );
    let ok = app_dir(
        &platform,
        "ok",
        "rel",
        "ok",
        &format!(
            "{CHECKED_SERVICE}\n[deploy]\n  release_command = \"/bin/sh -c 'echo migrating with RELEASE_COMMAND=$RELEASE_COMMAND; test $RELEASE_COMMAND = 1'\"\n"
        ),
    );
    let run = must(
        deploy(&platform, &ok, &[]),
        "deploy with a release command",
        &platform,
    );
    let ran = run
        .stdout
        .find("Running release command")
        .unwrap_or(usize::MAX);
    let created = run.stdout.find("Creating 2 machine(s)").unwrap_or(0);
    assert!(
        ran < created,
        "the release command runs before any machine is created: {run}"
    );
    assert!(
        run.stdout.contains("Release command finished successfully"),
        "{run}"
    );
    let machines_before = machines(&platform, "rel");
    assert_eq!(
        machines_before.len(),
        2,
        "the release command machine is gone: {machines_before:?}"
    );

    let failing = app_dir(
        &platform,
        "failing",
        "rel",
        "failing",
        &format!(
            "{CHECKED_SERVICE}\n[deploy]\n  release_command = \"/bin/sh -c 'echo migration failed >&2; exit 7'\"\n"
        ),
    );
    let run = deploy(&platform, &failing, &[]);
    assert!(!run.ok(), "{run}");
    let last = run.stderr.lines().last().unwrap_or_default();
    assert!(
        last.contains("release command failed") && last.contains("exited with code 7"),
        "{run}"
    );
    assert!(
        run.stderr.contains("main process ended: exit code 7"),
        "{run}"
    );
    assert!(
        run.stderr.contains("migration failed"),
        "the release command's log lines: {run}"
    );
    let after = machines(&platform, "rel");
    assert_eq!(after.len(), 2);
    assert!(
        after.iter().all(|m| release_of(m) == "1"),
        "no machine changed: {after:?}"
    );
    assert_eq!(get(&platform, "rel.localhost"), ("200".into(), "ok".into()));

    // --skip-release-command deploys without it.
    must(
        deploy(&platform, &failing, &["--skip-release-command"]),
        "deploy skipping the release command",
        &platform,
    );
    assert_eq!(get(&platform, "rel.localhost").1, "failing");

    // Machine checks run against a test machine of the new release before any update.
    let checked = app_dir(
        &platform,
        "checked",
        "rel",
        "checked",
        &format!(
            "{CHECKED_SERVICE}\n  [[http_service.machine_checks]]\n    command = [\"/bin/sh\", \"-c\", \"test -n \\\"$FLY_TEST_MACHINE_IP\\\"\"]\n"
        ),
    );
    let run = must(
        deploy(&platform, &checked, &[]),
        "deploy with a passing machine check",
        &platform,
    );
    assert!(
        run.stdout
            .contains("Machine check 0 passed against machine"),
        "{run}"
    );
    let refused = app_dir(
        &platform,
        "refused",
        "rel",
        "refused",
        &format!(
            "{CHECKED_SERVICE}\n  [[http_service.machine_checks]]\n    command = [\"/bin/sh\", \"-c\", \"echo not today; exit 4\"]\n"
        ),
    );
    let run = deploy(&platform, &refused, &[]);
    assert!(!run.ok(), "{run}");
    assert!(
        run.stderr
            .lines()
            .last()
            .unwrap_or_default()
            .contains("machine check 0 failed"),
        "{run}"
    );
    assert!(
        run.stderr.contains("failing check: machine_checks[0]"),
        "{run}"
    );
    assert_eq!(get(&platform, "rel.localhost").1, "checked");
    assert_eq!(
        machines(&platform, "rel").len(),
        2,
        "test machines are gone"
    );
}

#[test]
fn deploys_go_on_when_the_client_detaches_or_is_interrupted() {
    require_platform!();
    let platform = Platform::start();
    must(
        platform.aloft(&["apps", "create", "bg"]),
        "apps create",
        &platform,
    );
    let v1 = app_dir(&platform, "v1", "bg", "v1", CHECKED_SERVICE);
    let run = must(
        deploy(&platform, &v1, &["--detach"]),
        "detached deploy",
        &platform,
    );
    assert!(run.stdout.contains("goes on on the server"), "{run}");
    wait_for("release v1 to complete", Duration::from_secs(120), || {
        releases(&platform, "bg")
            .first()
            .is_some_and(|r| r["status"] == "complete")
    });
    assert_eq!(get(&platform, "bg.localhost"), ("200".into(), "v1".into()));

    // Ctrl-C in the CLI once the server has the deploy: the deploy finishes anyway.
    let v2 = app_dir(&platform, "v2", "bg", "v2", CHECKED_SERVICE);
    let mut child = platform.in_netns(&common::aloft_binary());
    child
        .arg("deploy")
        .current_dir(&v2)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    let mut child = child.spawn().expect("aloft deploy");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut seen = String::new();
    let mut buffer = [0u8; 4096];
    while !seen.contains("Release v2 created") {
        let n = stdout.read(&mut buffer).expect("reading aloft deploy");
        assert!(n > 0, "aloft deploy ended early: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buffer[..n]));
    }
    // nsenter forwards the signal to the aloft it runs.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .expect("SIGINT");
    let _ = child.wait();
    wait_for("release v2 to complete", Duration::from_secs(120), || {
        releases(&platform, "bg")
            .first()
            .is_some_and(|r| r["version"] == 2 && r["status"] == "complete")
    });
    assert_eq!(get(&platform, "bg.localhost"), ("200".into(), "v2".into()));
}

/// A plain registry (no auth) inside the platform's network namespace: "any registry".
struct OtherRegistry {
    _dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl OtherRegistry {
    fn start(platform: &Platform, port: u16) -> OtherRegistry {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("registry");
        let netns = format!("/run/netns/{}", platform.netns);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready, is_ready) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let file = std::fs::File::open(&netns).expect("netns");
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let registry = aloft_registry::Registry::open(
                    aloft_registry::RegistryConfig {
                        root,
                        upstream: None,
                    },
                    Arc::new(aloft_registry::AllowAll),
                )
                .expect("registry");
                let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
                    .await
                    .expect("bind");
                let _ = ready.send(());
                let _ = axum::serve(listener, registry.router())
                    .with_graceful_shutdown(async move {
                        let _ = stopped.await;
                    })
                    .await;
            });
        });
        is_ready
            .recv_timeout(Duration::from_secs(10))
            .expect("the other registry started");
        OtherRegistry {
            _dir: dir,
            stop: Some(stop),
        }
    }
}

impl Drop for OtherRegistry {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

#[test]
fn images_from_another_registry_deploy_roll_back_and_old_ones_are_collected() {
    require_platform!();
    if std::process::Command::new("skopeo")
        .arg("--version")
        .output()
        .is_err()
    {
        aloft_testkit::skip("needs skopeo (scripts/setup.sh --test installs it)");
        return;
    }
    let platform = Platform::start_with(&[
        "--keep-releases",
        "2",
        "--registry-upstream",
        "http://127.0.0.1:5000",
    ]);
    let _other = OtherRegistry::start(&platform, 5000);
    must(
        platform.aloft(&["apps", "create", "img"]),
        "apps create",
        &platform,
    );
    let v1 = app_dir(&platform, "v1", "img", "v1", CHECKED_SERVICE);
    must(deploy(&platform, &v1, &[]), "first deploy", &platform);
    let v1_image = releases(&platform, "img")[0]["image"]
        .as_str()
        .unwrap_or_default()
        .to_string();

    // Put a new image into the other registry with skopeo, then deploy it from there.
    let v2 = app_dir(&platform, "v2", "img", "v2", CHECKED_SERVICE);
    let built = must(
        deploy(&platform, &v2, &["--build-only"]),
        "build-only",
        &platform,
    );
    let v2_platform_image = built
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("Image: "))
        .unwrap_or_default()
        .trim()
        .to_string();
    let token = platform.aloft(&["auth", "token"]).stdout.trim().to_string();
    let mut copy = platform.in_netns(Path::new("skopeo"));
    copy.args([
        "copy",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
        "--src-creds",
        &format!("x:{token}"),
        &format!("docker://{v2_platform_image}"),
        "docker://127.0.0.1:5000/elsewhere/hello:v2",
    ]);
    let copied = Run::from(copy.output().expect("skopeo"));
    assert!(copied.ok(), "{copied}");
    let skopeo_copy = |source: &str, destination: &str, creds: &str| {
        let mut copy = platform.in_netns(Path::new("skopeo"));
        copy.args(["copy", "--src-tls-verify=false", "--dest-tls-verify=false"]);
        if !creds.is_empty() {
            copy.args(["--src-creds", creds, "--dest-creds", creds]);
        }
        copy.args([source, destination]);
        Run::from(copy.output().expect("skopeo"))
    };

    // A token limited to this app pushes and pulls its repository and nothing else.
    let app_token = aloft_api::token::Token::decode(&token)
        .expect("token")
        .attenuate(aloft_api::token::Caveat::Apps(vec!["img".into()]))
        .encode();
    must(
        platform.aloft(&["apps", "create", "other"]),
        "apps create other",
        &platform,
    );
    let mine = skopeo_copy(
        &format!("docker://{v2_platform_image}"),
        "docker://127.0.0.1:4280/img:copied",
        &format!("x:{app_token}"),
    );
    assert!(mine.ok(), "{mine}");
    let theirs = skopeo_copy(
        &format!("docker://{v2_platform_image}"),
        "docker://127.0.0.1:4280/other:stolen",
        &format!("x:{app_token}"),
    );
    let refusal = theirs.stderr.to_lowercase();
    assert!(
        !theirs.ok() && (refusal.contains("403") || refusal.contains("denied")),
        "{theirs}"
    );
    let peek = platform
        .in_netns(Path::new("skopeo"))
        .args([
            "inspect",
            "--tls-verify=false",
            "--creds",
            &format!("x:{app_token}"),
            "docker://127.0.0.1:4280/other:nothing",
        ])
        .output()
        .expect("skopeo");
    assert!(
        !peek.status.success(),
        "another app's repository cannot be read with this app's token"
    );

    // Pull-through (server started with --registry-upstream): a Dockerfile's short
    // `FROM base:v1` resolves through the platform registry's Docker Hub mirror.
    let pushed = skopeo_copy(
        &format!("docker://{v2_platform_image}"),
        "docker://127.0.0.1:5000/library/base:v1",
        &format!("x:{token}"),
    );
    assert!(pushed.ok(), "{pushed}");
    let derived = app_dir(&platform, "derived", "img", "derived", CHECKED_SERVICE);
    std::fs::write(
        derived.join("Dockerfile"),
        "FROM base:v1\nCOPY version.txt /version.txt\nCMD [\"/hello\"]\n",
    )
    .unwrap();
    let built = must(
        deploy(&platform, &derived, &["--build-only"]),
        "build FROM a pulled-through base",
        &platform,
    );
    assert!(built.stdout.contains("STEP 1/3: FROM base:v1"), "{built}");

    let run = must(
        deploy(
            &platform,
            &v2,
            &["--image", "127.0.0.1:5000/elsewhere/hello:v2"],
        ),
        "deploy --image from another registry",
        &platform,
    );
    assert!(
        run.stdout
            .contains("Copying image 127.0.0.1:5000/elsewhere/hello:v2 into the platform registry"),
        "{run}"
    );
    assert_eq!(get(&platform, "img.localhost").1, "v2");
    let served = machines(&platform, "img");
    assert!(
        served.iter().all(|m| m["config"]["image"]
            .as_str()
            .unwrap_or_default()
            .starts_with("127.0.0.1:4280/img:deployment-")),
        "hosts pull from the platform's registry: {served:?}"
    );

    // Rollback: deploying release 1's image again.
    let run = must(
        deploy(&platform, &v1, &["--image", &v1_image]),
        "rollback",
        &platform,
    );
    assert!(run.stdout.contains("Release v3"), "{run}");
    assert_eq!(get(&platform, "img.localhost").1, "v1");
    let listed = platform.aloft(&["releases", "-a", "img", "--image"]);
    assert!(listed.stdout.contains(&v1_image), "{listed}");

    // Two more releases with --keep-releases 2: the images of v1..v3's releases that no
    // newer release uses are untagged after the deploy, then collected.
    let v4 = app_dir(&platform, "v4", "img", "v4", CHECKED_SERVICE);
    must(deploy(&platform, &v4, &[]), "v4", &platform);
    let v5 = app_dir(&platform, "v5", "img", "v5", CHECKED_SERVICE);
    must(deploy(&platform, &v5, &[]), "v5", &platform);
    let gc = must(
        platform.aloft(&["registry", "gc", "--grace", "0s", "--json"]),
        "registry gc",
        &platform,
    );
    let report = json(&gc);
    assert!(report["blobs_deleted"].as_u64().unwrap_or(0) > 0, "{gc}");
    let run = deploy(&platform, &v1, &["--image", &v1_image]);
    assert!(!run.ok(), "{run}");
    assert!(
        run.stderr.contains(
            "is not in the registry (it was never pushed, or garbage collection removed it)"
        ),
        "{run}"
    );
    assert_eq!(
        get(&platform, "img.localhost").1,
        "v5",
        "the app still runs its latest release"
    );

    // Unknown registries are named.
    let run = deploy(
        &platform,
        &v1,
        &["--image", "127.0.0.1:5999/nothing/here:v1"],
    );
    assert!(
        !run.ok()
            && run.stderr.contains(
                "copying image 127.0.0.1:5999/nothing/here:v1 into the platform registry failed"
            ),
        "{run}"
    );
}

#[test]
fn scaling_counts_and_sizes_and_deploys_keep_them() {
    require_platform!();
    let platform = Platform::start();
    must(
        platform.aloft(&["apps", "create", "sc"]),
        "apps create",
        &platform,
    );
    let v1 = app_dir(&platform, "v1", "sc", "v1", CHECKED_SERVICE);
    must(deploy(&platform, &v1, &["--ha=false"]), "deploy", &platform);
    assert_eq!(machines(&platform, "sc").len(), 1);

    let run = must(
        platform.aloft(&["scale", "count", "3", "-a", "sc", "--yes"]),
        "scale count 3",
        &platform,
    );
    assert!(
        run.stdout
            .contains("+2 machines for group 'app' on region 'local' of size 'shared-cpu-1x'"),
        "{run}"
    );
    assert_eq!(machines(&platform, "sc").len(), 3);
    let show = must(
        platform.aloft(&["scale", "show", "-a", "sc"]),
        "scale show",
        &platform,
    );
    assert!(
        show.stdout
            .lines()
            .any(|l| l.starts_with("app") && l.contains(" 3 ") && l.contains("local(3)")),
        "{show}"
    );

    let without_yes = platform.aloft(&["scale", "count", "2", "-a", "sc"]);
    assert!(
        !without_yes.ok() && without_yes.stderr.contains("--yes is required"),
        "{without_yes}"
    );

    // A deploy (canary here) keeps the count.
    let v2 = app_dir(&platform, "v2", "sc", "v2", CHECKED_SERVICE);
    let run = must(
        deploy(&platform, &v2, &["--strategy", "canary"]),
        "canary deploy",
        &platform,
    );
    assert!(run.stdout.contains("Creating a canary machine"), "{run}");
    let list = machines(&platform, "sc");
    assert_eq!(list.len(), 3, "{list:?}");
    assert!(list.iter().all(|m| release_of(m) == "2"));

    must(
        platform.aloft(&["scale", "vm", "shared-cpu-2x", "-a", "sc"]),
        "scale vm",
        &platform,
    );
    let list = machines(&platform, "sc");
    assert!(
        list.iter()
            .all(|m| m["config"]["guest"]["cpus"] == 2 && m["config"]["guest"]["memory_mb"] == 512),
        "{list:?}"
    );
    must(
        platform.aloft(&["scale", "memory", "1024", "-a", "sc"]),
        "scale memory",
        &platform,
    );
    assert!(
        machines(&platform, "sc")
            .iter()
            .all(|m| m["config"]["guest"]["memory_mb"] == 1024)
    );
    let bad = platform.aloft(&["scale", "memory", "300", "-a", "sc"]);
    assert!(
        !bad.ok() && bad.stderr.contains("multiple of 256MB"),
        "{bad}"
    );

    must(
        platform.aloft(&["scale", "count", "1", "-a", "sc", "--yes"]),
        "scale count 1",
        &platform,
    );
    assert_eq!(machines(&platform, "sc").len(), 1);
    assert_eq!(get(&platform, "sc.localhost"), ("200".into(), "v2".into()));

    let v3 = app_dir(&platform, "v3", "sc", "v3", CHECKED_SERVICE);
    must(
        deploy(&platform, &v3, &["--strategy", "immediate"]),
        "immediate deploy",
        &platform,
    );
    assert_eq!(machines(&platform, "sc").len(), 1);
    wait_for(
        "the immediate deploy's machine to serve",
        Duration::from_secs(30),
        || get(&platform, "sc.localhost").1 == "v3",
    );
}

#[test]
fn launch_writes_the_config_and_static_sites_deploy_with_the_built_in_builder() {
    require_platform!();
    let platform = Platform::start();
    let site = platform.root.path().join("my-site");
    std::fs::create_dir_all(site.join("public/docs")).unwrap();
    std::fs::write(
        site.join("public/index.html"),
        "<h1>hello from a static site</h1>\n",
    )
    .unwrap();
    std::fs::write(site.join("public/docs/index.html"), "docs\n").unwrap();
    let run = must(
        platform.aloft_in(Some(&site), &["launch", "--yes", "--ha=false"]),
        "launch",
        &platform,
    );
    assert!(
        run.stdout
            .contains("Detected a static site (public/index.html) app"),
        "{run}"
    );
    let toml = std::fs::read_to_string(site.join("fly.toml")).unwrap();
    assert!(
        toml.contains("builtin = 'static'") && toml.contains("primary_region = 'local'"),
        "{toml}"
    );
    assert!(!site.join("Dockerfile").exists());
    let page = platform.curl(&["-H", "Host: my-site.localhost", "http://127.0.0.1:8080/"]);
    assert_eq!(
        page.stdout,
        "<h1>hello from a static site</h1>\n",
        "{page}\n{}",
        tail(&platform.server_log(), 40)
    );
    let docs = platform.curl(&[
        "-H",
        "Host: my-site.localhost",
        "http://127.0.0.1:8080/docs/",
    ]);
    assert_eq!(docs.stdout, "docs\n");
    let missing = platform.curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-H",
        "Host: my-site.localhost",
        "http://127.0.0.1:8080/nope",
    ]);
    assert_eq!(missing.stdout, "404");

    // A Go app: fly.toml and a Dockerfile written, the app created, nothing deployed.
    let go = platform.root.path().join("go-svc");
    std::fs::create_dir_all(&go).unwrap();
    std::fs::write(go.join("go.mod"), "module example.com/svc\n\ngo 1.22\n").unwrap();
    std::fs::write(go.join("main.go"), "package main\nfunc main() {}\n").unwrap();
    let run = must(
        platform.aloft_in(
            Some(&go),
            &[
                "launch",
                "--no-deploy",
                "--name",
                "gosvc",
                "--region",
                "local",
                "--yes",
            ],
        ),
        "launch --no-deploy",
        &platform,
    );
    assert!(run.stdout.contains("Detected a Go app"), "{run}");
    assert!(
        std::fs::read_to_string(go.join("Dockerfile"))
            .unwrap()
            .contains("go build")
    );
    assert!(
        std::fs::read_to_string(go.join("fly.toml"))
            .unwrap()
            .contains("app = 'gosvc'")
    );
    assert!(platform.aloft(&["apps", "list"]).stdout.contains("gosvc"));
    assert!(machines(&platform, "gosvc").is_empty());
    let again = platform.aloft_in(Some(&go), &["launch", "--yes"]);
    assert!(
        !again.ok() && again.stderr.contains("fly.toml already exists"),
        "{again}"
    );
}

#[test]
fn bad_builds_and_refused_pushes_fail_naming_the_step() {
    require_platform!();
    let platform = Platform::start();
    must(
        platform.aloft(&["apps", "create", "bad"]),
        "apps create",
        &platform,
    );
    let good = app_dir(&platform, "good", "bad", "good", CHECKED_SERVICE);
    must(deploy(&platform, &good, &[]), "good deploy", &platform);

    let syntax = app_dir(&platform, "syntax", "bad", "syntax", CHECKED_SERVICE);
    std::fs::write(
        syntax.join("Dockerfile"),
        "FROM scratch\nCOPYY hello /hello\n",
    )
    .unwrap();
    let run = deploy(&platform, &syntax, &[]);
    assert!(!run.ok(), "{run}");
    assert!(
        run.stderr
            .lines()
            .last()
            .unwrap_or_default()
            .contains("the Dockerfile has a syntax error")
            && run
                .stderr
                .contains("Dockerfile:2: unknown instruction: COPYY"),
        "{run}"
    );

    let missing_base = app_dir(&platform, "missing-base", "bad", "x", CHECKED_SERVICE);
    std::fs::write(
        missing_base.join("Dockerfile"),
        "FROM 127.0.0.1:4280/bad:no-such-tag\nCOPY hello /hello\n",
    )
    .unwrap();
    let run = deploy(&platform, &missing_base, &[]);
    assert!(!run.ok(), "{run}");
    assert!(
        run.stderr
            .lines()
            .last()
            .unwrap_or_default()
            .contains("image build failed at STEP 1/2: FROM 127.0.0.1:4280/bad:no-such-tag"),
        "{run}"
    );

    // A read-only token may look at the app but the registry refuses its push.
    let admin = platform.aloft(&["auth", "token"]).stdout.trim().to_string();
    let read_only = aloft_api::token::Token::decode(&admin)
        .expect("token")
        .attenuate(aloft_api::token::Caveat::ReadOnly)
        .encode();
    let pushy = app_dir(&platform, "pushy", "bad", "pushy", CHECKED_SERVICE);
    let run = platform.aloft_in(Some(&pushy), &["--access-token", &read_only, "deploy"]);
    assert!(!run.ok(), "{run}");
    let last = run.stderr.lines().last().unwrap_or_default();
    assert!(
        last.contains("image push failed") && last.contains("127.0.0.1:4280/bad:deployment-"),
        "{run}"
    );

    let list = releases(&platform, "bad");
    assert_eq!(
        list.len(),
        1,
        "no release for failed builds and pushes: {list:?}"
    );
    assert_eq!(
        get(&platform, "bad.localhost"),
        ("200".into(), "good".into())
    );
}
