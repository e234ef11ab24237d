//! Machines on a real host agent, under both drivers: containers (runc, init, overlay
//! rootfs, netns) and microVMs (QEMU under TCG here, init in an initramfs, ext4 + qcow2,
//! tap, virtio-serial): logs, exec, ssh console, health checks, ps, metrics, signals and
//! the restart policy, suspend/resume, restart, surviving a `kill -9` of the platform, and
//! bad input ending in clear states.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{Platform, Run};
use serde_json::Value;

const LAB_TOML: &str = r#"
app = "lab"
primary_region = "local"

[env]
  PORT = "8080"

[http_service]
  internal_port = 8080
  auto_stop_machines = "off"
  auto_start_machines = false
  min_machines_running = 1

  [[http_service.checks]]
    grace_period = "0s"
    interval = "2s"
    timeout = "1s"
    method = "GET"
    path = "/"

[checks.alive]
  type = "tcp"
  port = 8080
  interval = "2s"
  timeout = "1s"
  grace_period = "0s"

[[vm]]
  memory = "256mb"
"#;

/// An app directory whose image has busybox (a shell and tools) next to the example app,
/// and a file that is executable but no program.
fn lab_app(platform: &Platform) -> PathBuf {
    let dir = platform.hello_app_dir("lab");
    std::fs::write(dir.join("fly.toml"), LAB_TOML).unwrap();
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy("/bin/busybox", bin.join("busybox")).expect("busybox-static is installed");
    for applet in [
        "sh", "echo", "cat", "sleep", "hostname", "env", "id", "ls", "ps", "head", "tr",
    ] {
        std::os::unix::fs::symlink("busybox", bin.join(applet)).unwrap();
    }
    let not_a_program = bin.join("not-a-program");
    std::fs::write(&not_a_program, "this is text, not a program\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&not_a_program, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(
        dir.join("Dockerfile"),
        "FROM scratch\nCOPY bin /bin\nCOPY hello /hello\nCMD [\"/hello\"]\n",
    )
    .unwrap();
    std::fs::write(dir.join(".dockerignore"), "fly.toml\n").unwrap();
    dir
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Driver {
    Container,
    Microvm,
}

impl Driver {
    fn server_args(self) -> &'static [&'static str] {
        match self {
            Driver::Container => &["--driver", "container"],
            Driver::Microvm => &["--driver", "microvm", "--vm-accel", "tcg"],
        }
    }
}

/// Starts a platform on `driver`, or says why this host cannot (then the test returns).
fn platform_on(driver: Driver) -> Option<(Platform, Option<common::VmLock>)> {
    if let Some(reason) = common::missing_prerequisite() {
        aloft_testkit::skip(format!("platform test: {reason}"));
        return None;
    }
    let lock = match driver {
        Driver::Container => None,
        Driver::Microvm => {
            if let Some(reason) = common::missing_vm_prerequisite() {
                aloft_testkit::skip(format!("microVM test: {reason}"));
                return None;
            }
            Some(common::vm_lock())
        }
    };
    Some((Platform::start_with(driver.server_args()), lock))
}

/// What changes when a machine's run is replaced by a new one (and only then): the
/// container's init pid, or the guest kernel's boot id.
fn run_id(platform: &Platform, id: &str, driver: Driver) -> String {
    match driver {
        Driver::Container => init_pid(platform, id).to_string(),
        Driver::Microvm => {
            let run = platform.aloft(&[
                "machine",
                "exec",
                id,
                "-a",
                "lab",
                "--",
                "cat",
                "/proc/sys/kernel/random/boot_id",
            ]);
            if run.ok() {
                run.stdout.trim().to_string()
            } else {
                String::new()
            }
        }
    }
}

fn deploy_lab(platform: &Platform, driver: Driver) -> (PathBuf, String) {
    assert!(platform.aloft(&["apps", "create", "lab"]).ok());
    let dir = lab_app(platform);
    // One machine is enough for these tests, and a microVM boot under TCG takes seconds.
    let deploy = match driver {
        Driver::Container => platform.aloft_in(Some(&dir), &["deploy"]),
        Driver::Microvm => platform.aloft_in(Some(&dir), &["deploy", "--ha=false"]),
    };
    assert!(deploy.ok(), "{deploy}\n{}", platform.server_log());
    let ids = platform.aloft(&["machine", "list", "-a", "lab", "-q"]);
    let id = ids
        .stdout
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_string();
    assert_eq!(id.len(), 14, "{ids}");
    (dir, id)
}

/// The agent's answer as JSON, asserting the status code.
fn agent_json(
    platform: &Platform,
    method: &str,
    path: &str,
    body: Option<&str>,
    status: &str,
) -> Value {
    let run = platform.agent(method, path, body);
    let (body, code) = run.stdout.rsplit_once('\n').unwrap_or_default();
    assert_eq!(code, status, "{method} {path}: {run}");
    serde_json::from_str(body).unwrap_or(Value::Null)
}

fn machine_state(platform: &Platform, id: &str) -> Value {
    agent_json(platform, "GET", &format!("/v1/machines/{id}"), None, "200")
}

fn init_pid(platform: &Platform, id: &str) -> i32 {
    let path = platform
        .data_dir()
        .join("agent/machines")
        .join(id)
        .join("container.pid");
    std::fs::read_to_string(&path)
        .unwrap_or_default()
        .trim()
        .parse()
        .unwrap_or(0)
}

fn alive(pid: i32) -> bool {
    pid > 0 && Path::new(&format!("/proc/{pid}")).exists()
}

fn answers(platform: &Platform, ipv4: &str) -> bool {
    platform
        .curl(&[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "2",
            &format!("http://{ipv4}:8080/"),
        ])
        .stdout
        == "200"
}

/// Waits (with a deadline) until the app in the machine accepts and answers: a machine
/// reported `started` has run its process, which may not be listening yet.
fn wait_for_answer(platform: &Platform, ipv4: &str, what: &str) {
    common::wait_until(what, Duration::from_secs(30), || {
        (!answers(platform, ipv4)).then(String::new)
    });
}

fn events(platform: &Platform, id: &str) -> Vec<Value> {
    let token = platform.aloft(&["auth", "token"]).stdout.trim().to_string();
    let run = platform.curl(&[
        "-H",
        &format!("Authorization: Bearer {token}"),
        &format!("http://127.0.0.1:4280/v1/apps/lab/machines/{id}/events"),
    ]);
    serde_json::from_str(&run.stdout).unwrap_or_default()
}

#[test]
fn logs_exec_console_checks_ps_metrics_signals_suspend_and_restart() {
    lifecycle(Driver::Container);
}

#[test]
fn microvm_logs_exec_console_checks_ps_metrics_signals_suspend_and_restart() {
    lifecycle(Driver::Microvm);
}

fn lifecycle(driver: Driver) {
    let Some((platform, _lock)) = platform_on(driver) else {
        return;
    };
    let (_dir, id) = deploy_lab(&platform, driver);
    let ipv4 = machine_state(&platform, &id)["private_ipv4"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    wait_for_answer(&platform, &ipv4, "the app to answer");

    // Logs, in flyctl's line format and as JSON.
    let expected = format!("app[{id}] local [info] hello: listening on [::]:8080 and 0.0.0.0:8080");
    let logs = common::wait_until(
        "the app's first line in the logs",
        Duration::from_secs(20),
        || {
            let run = platform.aloft(&["logs", "-a", "lab", "--no-tail"]);
            (!run.stdout.contains(&expected)).then(|| run.to_string())
        },
    );
    let _ = logs;
    let line = platform
        .aloft(&["logs", "-a", "lab", "--no-tail"])
        .stdout
        .lines()
        .find(|l| l.contains(&expected))
        .unwrap_or_default()
        .to_string();
    assert!(
        line.len() > 20 && line.as_bytes()[4] == b'-' && line.contains("Z app["),
        "{line}"
    );
    let json = platform.aloft(&["logs", "-a", "lab", "--no-tail", "--json", "--machine", &id]);
    let entry: Value = json
        .stdout
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .find(|v: &Value| v["message"] == "hello: listening on [::]:8080 and 0.0.0.0:8080")
        .unwrap_or_else(|| panic!("{json}"));
    assert_eq!(
        (
            entry["machine_id"].as_str(),
            entry["region"].as_str(),
            entry["stream"].as_str()
        ),
        (Some(id.as_str()), Some("local"), Some("stdout"))
    );
    assert!(
        platform
            .aloft(&["logs", "-a", "lab", "--no-tail", "--region", "fra"])
            .stdout
            .trim()
            .is_empty(),
        "region filter"
    );

    // exec: output, exit code, the machine's environment.
    let echo = platform.aloft(&[
        "machine", "exec", &id, "-a", "lab", "--", "echo", "hi from", "inside",
    ]);
    assert!(echo.ok(), "{echo}");
    assert_eq!(echo.stdout, "hi from inside\n");
    let failing = platform.aloft(&[
        "machine",
        "exec",
        &id,
        "-a",
        "lab",
        "sh -c 'echo oops >&2; exit 3'",
    ]);
    assert_eq!(
        (failing.status, failing.stderr.contains("oops")),
        (3, true),
        "{failing}"
    );
    let env = platform.aloft(&[
        "machine",
        "exec",
        &id,
        "-a",
        "lab",
        "--",
        "sh",
        "-c",
        "echo $FLY_MACHINE_ID $FLY_APP_NAME $PORT",
    ]);
    assert_eq!(env.stdout.trim(), format!("{id} lab 8080"), "{env}");
    let missing = platform.aloft(&[
        "machine",
        "exec",
        &id,
        "-a",
        "lab",
        "--",
        "/no/such/program",
    ]);
    assert_ne!(missing.status, 0, "{missing}");

    if driver == Driver::Container {
        // Docker's default seccomp profile, an allowlist: a call outside it fails with
        // EPERM even where the kernel lets any process make it (a new user namespace
        // needs no capability, and works in a runc container without the profile).
        let blocked = platform.aloft(&[
            "machine", "exec", &id, "-a", "lab", "--", "busybox", "unshare", "-U", "true",
        ]);
        assert!(
            blocked.status != 0 && blocked.stderr.contains("Operation not permitted"),
            "{blocked}"
        );
        // Ordinary calls pass, clone3 included (glibc and musl fall back to clone).
        let allowed = platform.aloft(&[
            "machine",
            "exec",
            &id,
            "-a",
            "lab",
            "--",
            "sh",
            "-c",
            "sleep 0 & wait; echo ok",
        ]);
        assert_eq!(allowed.stdout.trim(), "ok", "{allowed}");
    }

    // ssh console with a command runs in the machine's namespaces.
    let console = platform.aloft(&["ssh", "console", "-a", "lab", "--command", "hostname"]);
    assert!(console.ok(), "{console}");
    assert_eq!(console.stdout.trim(), id);
    let pid_one = platform.aloft(&["ssh", "console", "-a", "lab", "-C", "cat /proc/1/cmdline"]);
    assert!(
        pid_one.stdout.starts_with("/.fly/init"),
        "init is PID 1: {pid_one}"
    );
    let tty = platform.aloft(&[
        "ssh",
        "console",
        "-a",
        "lab",
        "--pty",
        "-C",
        "sh -c 'test -t 0 && echo terminal'",
    ]);
    assert!(
        tty.stdout.contains("terminal"),
        "--pty gives the command a terminal: {tty}"
    );

    // Health checks: both pass and show in `checks list` and on the machine.
    common::wait_until("passing checks", Duration::from_secs(30), || {
        let run = platform.aloft(&["checks", "list", "-a", "lab"]);
        let passing = run
            .stdout
            .lines()
            .filter(|l| l.contains("passing") && l.contains(&id))
            .count();
        (passing < 2).then(|| run.to_string())
    });
    let listed = platform.aloft(&["checks", "list", "-a", "lab"]).stdout;
    assert!(
        listed.contains("servicecheck-00-http-8080") && listed.contains("alive"),
        "{listed}"
    );

    // ps: the app and its listening socket (a microVM's init lists them from inside).
    {
        let processes = agent_json(
            &platform,
            "GET",
            &format!("/v1/machines/{id}/ps"),
            None,
            "200",
        );
        let hello = processes
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["command"] == "/hello")
            .unwrap_or_else(|| panic!("{processes}"));
        // hello listens on [::]:8080, dual-stack (IPv4 arrives mapped).
        assert!(
            hello["listen_sockets"].to_string().contains("[::]:8080"),
            "{processes}"
        );
        assert!(hello["rss"].as_u64().unwrap_or(0) > 0);
    }

    // Metrics from cgroups (the container's, or the VMM's for a microVM).
    let metrics = platform.agent("GET", "/metrics", None).stdout;
    let labels = format!("{{app=\"lab\",machine=\"{id}\",region=\"local\"}}");
    assert!(
        metrics.contains(&format!("aloft_machine_up{labels} 1")),
        "{metrics}"
    );
    let memory: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix(&format!("aloft_machine_memory_bytes{labels} ")))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(memory > 0.0, "{metrics}");
    let limit: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix(&format!("aloft_machine_memory_limit_bytes{labels} ")))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    match driver {
        Driver::Container => assert_eq!(limit, 268435456, "{metrics}"),
        // The guest's 256 MB plus what QEMU itself may use.
        Driver::Microvm => assert!(limit > 268435456, "{metrics}"),
    }
    let received: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix(&format!("aloft_machine_net_receive_bytes_total{labels} ")))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(
        received > 0.0,
        "the checks' and curl's traffic is counted: {metrics}"
    );

    // A follower of the logs sees the lines of the next run as they come.
    let followed = platform.root.path().join("followed.log");
    let mut follower = platform.spawn_aloft(&["logs", "-a", "lab"], &followed);

    // A signal the app does not handle ends it; on-failure brings it back.
    let before = run_id(&platform, &id, driver);
    agent_json(
        &platform,
        "POST",
        &format!("/v1/machines/{id}/signal"),
        Some(r#"{"signal":"SIGUSR1"}"#),
        "200",
    );
    common::wait_until("a restart after SIGUSR1", Duration::from_secs(90), || {
        let now = run_id(&platform, &id, driver);
        let state = machine_state(&platform, &id);
        (now == before || now.is_empty() || state["state"] != "started").then(|| state.to_string())
    });
    let exit = common::wait_until("the exit event", Duration::from_secs(10), || {
        let found = events(&platform, &id)
            .into_iter()
            .any(|e| e["type"] == "exit" && e["request"]["exit_event"]["signal"] == 10);
        (!found).then(|| format!("{:?}", events(&platform, &id)))
    });
    let _ = exit;
    let exit_event = events(&platform, &id)
        .into_iter()
        .find(|e| e["type"] == "exit")
        .unwrap();
    assert_eq!(
        exit_event["request"]["exit_event"]["restarting"], true,
        "{exit_event}"
    );
    assert!(
        exit_event["request"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("SIGUSR1"),
        "{exit_event}"
    );
    let metrics = platform.agent("GET", "/metrics", None).stdout;
    assert!(
        metrics.contains(&format!("aloft_machine_restarts_total{labels} 1")),
        "{metrics}"
    );
    assert!(
        agent_json(
            &platform,
            "POST",
            &format!("/v1/machines/{id}/signal"),
            Some(r#"{"signal":"SIGNOPE"}"#),
            "400"
        )["error"]
            .as_str()
            .unwrap_or_default()
            .contains("SIGNOPE")
    );

    common::wait_until(
        "the follower to see the restarted app",
        Duration::from_secs(20),
        || {
            let text = std::fs::read_to_string(&followed).unwrap_or_default();
            (text
                .matches("hello: listening on [::]:8080 and 0.0.0.0:8080")
                .count()
                < 2)
            .then_some(text)
        },
    );
    let _ = follower.kill();
    let _ = follower.wait();

    // Suspend freezes the machine in place; start thaws it (same processes).
    common::wait_until("the app after its restart", Duration::from_secs(20), || {
        (!answers(&platform, &ipv4)).then(String::new)
    });
    let frozen_run = run_id(&platform, &id, driver);
    assert_eq!(
        agent_json(
            &platform,
            "POST",
            &format!("/v1/machines/{id}/suspend"),
            None,
            "200"
        )["state"],
        "suspended"
    );
    assert!(
        !answers(&platform, &ipv4),
        "a suspended machine does not answer"
    );
    assert_eq!(
        agent_json(
            &platform,
            "POST",
            &format!("/v1/machines/{id}/start"),
            None,
            "200"
        )["state"],
        "started"
    );
    wait_for_answer(&platform, &ipv4, "the resumed app to answer");
    assert_eq!(
        run_id(&platform, &id, driver),
        frozen_run,
        "resumed, not rebooted"
    );

    // Restart: a new run from a fresh root filesystem.
    let written = platform.aloft(&[
        "machine",
        "exec",
        &id,
        "-a",
        "lab",
        "--",
        "sh",
        "-c",
        "echo scribble > /scribble && cat /scribble",
    ]);
    assert!(
        written.ok() && written.stdout.contains("scribble"),
        "writing /scribble before the restart: {written}"
    );
    let restarted = agent_json(
        &platform,
        "POST",
        &format!("/v1/machines/{id}/restart?timeout=2s&signal=SIGTERM"),
        None,
        "200",
    );
    assert_eq!(restarted["state"], "started");
    assert_ne!(run_id(&platform, &id, driver), frozen_run);
    let scribble = platform.aloft(&[
        "machine",
        "exec",
        &id,
        "-a",
        "lab",
        "--",
        "cat",
        "/scribble",
    ]);
    assert_ne!(
        scribble.status, 0,
        "the root filesystem is rebuilt from the image: {scribble}"
    );

    // Destroy removes the machine; its logs stay readable.
    assert!(
        agent_json(
            &platform,
            "DELETE",
            &format!("/v1/machines/{id}"),
            None,
            "200"
        )["state"]
            == "destroyed"
    );
    let kept = platform.agent("GET", &format!("/v1/machines/{id}/logs"), None);
    assert!(kept.stdout.contains("hello: listening"), "{kept}");
    assert!(
        !Path::new(&format!("/run/netns/aloft-{id}")).exists(),
        "the network namespace is gone"
    );
    assert!(
        !links(&platform).contains(&format!("al{}", &id[..12])),
        "the machine's link (veth or tap) is gone"
    );
    if driver == Driver::Microvm {
        assert!(!qemu_running_for(&id), "no QEMU is left for {id}");
    }
}

/// Whether a QEMU process for machine `id` runs (its `-name guest=ID`).
fn qemu_running_for(id: &str) -> bool {
    std::fs::read_dir("/proc").is_ok_and(|entries| {
        entries.flatten().any(|e| {
            std::fs::read(e.path().join("cmdline")).is_ok_and(|c| {
                let text = String::from_utf8_lossy(&c);
                text.contains("qemu-system") && text.contains(&format!("guest={id}"))
            })
        })
    })
}

#[test]
fn machines_survive_a_killed_platform_and_exits_meanwhile_go_through_the_restart_policy() {
    survive_killed_platform(Driver::Container);
}

#[test]
fn microvms_survive_a_killed_platform_and_exits_meanwhile_go_through_the_restart_policy() {
    survive_killed_platform(Driver::Microvm);
}

/// The process that stands for the machine's run on the host: the container's init, or
/// the machine's QEMU.
fn host_pid(platform: &Platform, id: &str, driver: Driver) -> i32 {
    match driver {
        Driver::Container => init_pid(platform, id),
        Driver::Microvm => std::fs::read_to_string(
            platform
                .data_dir()
                .join("agent/machines")
                .join(id)
                .join("qemu.pid"),
        )
        .unwrap_or_default()
        .trim()
        .parse()
        .unwrap_or(0),
    }
}

fn survive_killed_platform(driver: Driver) {
    let Some((mut platform, _lock)) = platform_on(driver) else {
        return;
    };
    let (_dir, id) = deploy_lab(&platform, driver);
    let ipv4 = machine_state(&platform, &id)["private_ipv4"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let pid = host_pid(&platform, &id, driver);
    assert!(alive(pid));
    wait_for_answer(&platform, &ipv4, "the app to answer");

    platform.kill_server();
    assert!(alive(pid), "the machine outlives the platform");
    assert!(answers(&platform, &ipv4), "and keeps serving");

    platform.restart_server();
    let state = machine_state(&platform, &id);
    assert_eq!(state["state"], "started", "{state}");
    assert_eq!(
        host_pid(&platform, &id, driver),
        pid,
        "re-attached, not restarted"
    );
    let exits_before = events(&platform, &id)
        .iter()
        .filter(|e| e["type"] == "exit")
        .count();

    // The machine dies while the platform is down.
    platform.kill_server();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    common::wait_until("the machine to die", Duration::from_secs(10), || {
        alive(pid).then(String::new)
    });
    platform.restart_server();
    common::wait_until(
        "the restart policy to bring the machine back",
        Duration::from_secs(90),
        || {
            let state = machine_state(&platform, &id);
            let now = host_pid(&platform, &id, driver);
            (state["state"] != "started" || now == pid || !alive(now)).then(|| state.to_string())
        },
    );
    wait_for_answer(&platform, &ipv4, "the restarted app to answer");
    let all = common::wait_until(
        "the exit event at the control plane",
        Duration::from_secs(10),
        || {
            let exits = events(&platform, &id)
                .iter()
                .filter(|e| e["type"] == "exit")
                .count();
            (exits <= exits_before).then(|| format!("{:?}", events(&platform, &id)))
        },
    );
    let _ = all;
    let exit = events(&platform, &id)
        .into_iter()
        .find(|e| e["type"] == "exit")
        .unwrap();
    assert_eq!(exit["request"]["exit_event"]["restarting"], true, "{exit}");
    let status = platform.aloft(&["machine", "status", &id, "-a", "lab"]);
    assert!(
        status.ok() && status.stdout.contains("restarting=true"),
        "{status}"
    );
}

fn create_machine(platform: &Platform, app: &str, config: &Value) -> (Run, String) {
    let token = platform.aloft(&["auth", "token"]).stdout.trim().to_string();
    let body = serde_json::json!({ "config": config, "region": "local" }).to_string();
    let run = platform.curl(&[
        // A start waits for the machine (a microVM's boot, or its ready timeout).
        "--max-time",
        "120",
        "-X",
        "POST",
        "-H",
        &format!("Authorization: Bearer {token}"),
        "-H",
        "Content-Type: application/json",
        "-d",
        &body,
        &format!("http://127.0.0.1:4280/v1/apps/{app}/machines"),
    ]);
    let id = serde_json::from_str::<Value>(&run.stdout)
        .ok()
        .and_then(|v| v["id"].as_str().map(str::to_string))
        .unwrap_or_default();
    (run, id)
}

#[test]
fn bad_input_ends_in_clear_states_and_the_agent_keeps_serving() {
    bad_input(Driver::Container);
}

#[test]
fn microvm_bad_input_ends_in_clear_states_and_the_agent_keeps_serving() {
    bad_input(Driver::Microvm);
}

fn bad_input(driver: Driver) {
    let Some((platform, _lock)) = platform_on(driver) else {
        return;
    };
    let (_dir, good) = deploy_lab(&platform, driver);
    let token = platform.aloft(&["auth", "token"]).stdout.trim().to_string();
    let machine: Value = serde_json::from_str(
        &platform
            .curl(&[
                "-H",
                &format!("Authorization: Bearer {token}"),
                &format!("http://127.0.0.1:4280/v1/apps/lab/machines/{good}"),
            ])
            .stdout,
    )
    .unwrap();
    let image = machine["config"]["image"].as_str().unwrap().to_string();

    let mut cases: Vec<(Value, &str)> = vec![
        (
            serde_json::json!({ "image": image, "init": { "exec": ["/no/such/entrypoint"] }, "restart": { "policy": "no" } }),
            "/no/such/entrypoint",
        ),
        (
            serde_json::json!({ "image": image, "init": { "exec": ["/bin/not-a-program"] }, "restart": { "policy": "no" } }),
            "Exec format error",
        ),
        (
            serde_json::json!({ "image": image, "init": { "exec": ["/hello"] }, "guest": { "cpu_kind": "shared", "cpus": 1, "memory_mb": 100000000 }, "restart": { "policy": "no" } }),
            "guest.memory_mb: 100000000 is more than",
        ),
        (
            serde_json::json!({ "image": image, "init": { "exec": ["/bin/sh", "-c", "exit 9"] }, "restart": { "policy": "on-failure", "max_retries": 1 } }),
            "exited with code 9",
        ),
    ];
    // A root filesystem of no size is refused when the machine is created.
    cases.push((
        serde_json::json!({ "image": image, "init": { "exec": ["/hello"] }, "rootfs": { "size_gb": 0 }, "restart": { "policy": "no" } }),
        "invalid config.rootfs.size_gb: 0 must be between 1 and 500",
    ));
    // (The guest kernel's OOM killer under TCG takes minutes to get there; containers only.)
    if driver == Driver::Container {
        cases.push((
            serde_json::json!({ "image": image, "init": { "exec": ["/bin/sh", "-c", "x=$(head -c 400000000 /dev/zero | tr '\\0' a); echo survived"] }, "guest": { "cpu_kind": "shared", "cpus": 1, "memory_mb": 256 }, "restart": { "policy": "no" } }),
            "out of memory",
        ));
    }
    let mut machines = vec![good.clone()];
    for (config, reason) in cases {
        let (run, id) = create_machine(&platform, "lab", &config);
        assert!(!id.is_empty() || run.stdout.contains(reason), "{run}");
        if id.is_empty() {
            continue;
        }
        machines.push(id.clone());
        let status = common::wait_until(reason, Duration::from_secs(90), || {
            let run = platform.aloft(&["machine", "status", &id, "-a", "lab"]);
            let settled =
                run.stdout.contains("State: stopped") || run.stdout.contains("State: failed");
            (!(settled && run.stdout.contains(reason))).then(|| run.to_string())
        });
        let _ = status;
    }
    // The starts that failed (too big a guest or image) left no QEMU or tap: every one
    // left belongs to a machine that exists. (VM tests take turns: all QEMUs are ours.)
    if driver == Driver::Microvm {
        let known: Vec<String> = machines
            .iter()
            .map(|id| format!("al{}", &id[..12]))
            .collect();
        let taps = links(&platform);
        assert!(
            taps.iter().all(|tap| known.contains(tap)),
            "taps {taps:?}, machines {known:?}"
        );
        let qemus: Vec<String> = std::fs::read_dir("/proc")
            .map(|entries| {
                entries
                    .flatten()
                    .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
                    .map(|c| String::from_utf8_lossy(&c).into_owned())
                    .filter_map(|c| {
                        let guest = c.split("guest=").nth(1)?.split(',').next()?.to_string();
                        c.contains("qemu-system").then_some(guest)
                    })
                    .filter(|guest| !machines.contains(guest))
                    .collect()
            })
            .unwrap_or_default();
        assert!(qemus.is_empty(), "QEMUs of no machine: {qemus:?}");
    }

    // An image with no command, and an image user that does not exist (its deploy fails).
    assert!(platform.aloft(&["apps", "create", "bare"]).ok());
    let dir = platform.hello_app_dir("bare");
    std::fs::write(
        dir.join("Dockerfile"),
        "FROM scratch\nCOPY hello /hello\nUSER ghost\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("fly.toml"),
        "app = \"bare\"\nprimary_region = \"local\"\n",
    )
    .unwrap();
    let deploy = platform.aloft_in(Some(&dir), &["deploy"]);
    assert_ne!(deploy.status, 0, "{deploy}");
    assert!(deploy.stderr.contains("has no command to run"), "{deploy}");
    let bare_image = deploy
        .stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("--> Pushed "))
        .and_then(|l| l.split(" (").next())
        .map(str::to_string)
        .unwrap_or_else(|| panic!("no pushed image in the deploy output: {deploy}"));
    let no_command = create_machine(
        &platform,
        "bare",
        &serde_json::json!({ "image": bare_image, "restart": { "policy": "no" } }),
    );
    let no_user = create_machine(
        &platform,
        "bare",
        &serde_json::json!({ "image": bare_image, "init": { "exec": ["/hello"] }, "restart": { "policy": "no" } }),
    );
    for ((run, id), reason) in [(no_command, "has no command to run"), (no_user, "ghost")] {
        if id.is_empty() {
            assert!(
                run.stdout.contains(reason),
                "the failed start says why: {run}"
            );
            continue;
        }
        common::wait_until(reason, Duration::from_secs(90), || {
            let run = platform.aloft(&["machine", "status", &id, "-a", "bare"]);
            (!run.stdout.contains(reason)).then(|| run.to_string())
        });
    }

    // The good machine and the agent are unaffected.
    assert_eq!(machine_state(&platform, &good)["state"], "started");
    let response = platform.curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-H",
        "Host: lab.localhost",
        "http://127.0.0.1:8080/",
    ]);
    assert_eq!(response.stdout, "200", "{response}");
}

#[test]
fn microvm_with_a_guest_that_never_gets_ready_or_a_corrupt_kernel_fails_cleanly() {
    let Some((_, lock)) = platform_on(Driver::Microvm) else {
        return;
    };
    let mut args: Vec<&str> = Driver::Microvm.server_args().to_vec();
    args.extend(["--vm-ready-timeout", "40s"]);
    let mut platform = Platform::start_with(&args);
    let (_dir, good) = deploy_lab(&platform, Driver::Microvm);
    let image = machine_image(&platform, &good);

    // A guest whose kernel never reaches init (no such init in the initramfs, and a
    // panic that waits forever): the start gives up after the ready timeout.
    let (run, id) = create_machine(
        &platform,
        "lab",
        &serde_json::json!({
            "image": image,
            "init": { "exec": ["/hello"], "kernel_args": ["rdinit=/no/such/init", "panic=0"] },
            "restart": { "policy": "no" }
        }),
    );
    expect_failed_start(&platform, &run, &id, "did not signal ready within 40s");
    assert_only_machine(&platform, Some(&good));

    // A kernel file that is no kernel: starts fail saying so, and leave nothing behind.
    let scratch = tempfile::tempdir().unwrap();
    let junk = scratch.path().join("vmlinuz-6.1.0-0-cloud-amd64");
    std::fs::write(&junk, vec![0x5a; 64 * 1024]).unwrap();
    let junk_arg = junk.display().to_string();
    args.extend(["--vm-kernel", &junk_arg]);
    platform.restart_server_with(&args);
    let (run, id) = create_machine(
        &platform,
        "lab",
        &serde_json::json!({ "image": image, "restart": { "policy": "no" } }),
    );
    expect_failed_start(&platform, &run, &id, "is not usable");
    // The good machine, brought back after the restart, cannot boot that kernel either.
    common::wait_until(
        "the good machine to fail too",
        Duration::from_secs(60),
        || {
            let state = machine_state(&platform, &good);
            (state["state"] != "failed").then(|| state.to_string())
        },
    );
    assert_only_machine(&platform, None);
    assert!(
        platform.aloft(&["apps", "list"]).ok(),
        "the agent keeps serving"
    );

    // A kernel that is not there: the same, naming the file.
    let gone = scratch.path().join("vmlinuz-6.1.0-1-cloud-amd64");
    let gone_arg = gone.display().to_string();
    let last = args.len() - 1;
    args[last] = &gone_arg;
    platform.restart_server_with(&args);
    let (run, id) = create_machine(
        &platform,
        "lab",
        &serde_json::json!({ "image": image, "restart": { "policy": "no" } }),
    );
    expect_failed_start(
        &platform,
        &run,
        &id,
        "vmlinuz-6.1.0-1-cloud-amd64: No such file",
    );
    assert_only_machine(&platform, None);
    assert!(
        platform.aloft(&["apps", "list"]).ok(),
        "the agent keeps serving"
    );
    drop(lock);
}

/// Output of `argv` run in machine `id` of app `lab`, asserting it succeeded.
fn exec_output(platform: &Platform, id: &str, argv: &[&str]) -> String {
    let mut args = vec!["machine", "exec", id, "-a", "lab", "--"];
    args.extend_from_slice(argv);
    let run = platform.aloft(&args);
    assert!(run.ok(), "{argv:?}: {run}");
    run.stdout
}

/// Every file under `root` that holds `needle` (GNU grep, which skips the holes of the
/// machines' large sparse disks).
fn files_containing(root: &Path, needle: &str) -> Vec<String> {
    let output = std::process::Command::new("grep")
        .args(["-r", "-l", "-F", "--", needle])
        .arg(root)
        .output()
        .expect("grep");
    assert!(
        output.status.code().is_some_and(|code| code <= 1),
        "grep: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn microvm_guest_size_swap_and_secrets_over_the_channel() {
    let Some((platform, _lock)) = platform_on(Driver::Microvm) else {
        return;
    };
    let (_dir, good) = deploy_lab(&platform, Driver::Microvm);
    let image = machine_image(&platform, &good);
    let mut random = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut random);
    let marker = format!("VMSECRET{}", hex::encode(random));
    let set = platform.aloft(&[
        "secrets",
        "set",
        "-a",
        "lab",
        "--stage",
        &format!("VM_SECRET={marker}"),
    ]);
    assert!(set.ok(), "{set}");

    // Two vCPUs, 512 MB and a 64 MB swap file, with the app's secrets.
    let (run, id) = create_machine(
        &platform,
        "lab",
        &serde_json::json!({
            "image": image,
            "init": { "exec": ["/hello"], "swap_size_mb": 64 },
            "env": { "PORT": "8080" },
            "guest": { "cpu_kind": "shared", "cpus": 2, "memory_mb": 512 },
            "restart": { "policy": "no" }
        }),
    );
    assert!(!id.is_empty(), "{run}\n{}", platform.server_log());
    common::wait_until(
        "the sized machine to start",
        Duration::from_secs(120),
        || {
            let state = machine_state(&platform, &id);
            (state["state"] != "started").then(|| state.to_string())
        },
    );

    let cpuinfo = exec_output(&platform, &id, &["cat", "/proc/cpuinfo"]);
    let cpus = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    assert_eq!(cpus, 2, "guest.cpus: {cpuinfo}");
    let meminfo = exec_output(&platform, &id, &["cat", "/proc/meminfo"]);
    let total_kb: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    assert!(
        (400 * 1024..=512 * 1024).contains(&total_kb),
        "guest.memory_mb 512 gives the guest about that much: {meminfo}"
    );
    let swaps = exec_output(&platform, &id, &["cat", "/proc/swaps"]);
    let swap_kb: u64 = swaps
        .lines()
        .find(|l| l.contains(".fly-swapfile"))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(
        (60 * 1024..=64 * 1024).contains(&swap_kb),
        "swap_size_mb 64 is a swap file in use: {swaps}"
    );

    // The secret reaches the app inside the guest...
    let environments = exec_output(
        &platform,
        &id,
        &["sh", "-c", "cat /proc/[0-9]*/environ | tr '\\0' '\\n'"],
    );
    assert!(
        environments.contains(&format!("VM_SECRET={marker}")),
        "the app has its secret: {environments}"
    );
    // ...over the channel only: no host process carries it (QEMU's command line holds the
    // kernel's), and no file of the platform's (disks, logs, state) holds it.
    let marker_bytes = marker.as_bytes();
    let processes: Vec<String> = std::fs::read_dir("/proc")
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| {
                    let path = e.path();
                    ["cmdline", "environ"].into_iter().find_map(|file| {
                        std::fs::read(path.join(file))
                            .is_ok_and(|b| b.windows(marker_bytes.len()).any(|w| w == marker_bytes))
                            .then(|| format!("{} {file}", path.display()))
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(
        processes,
        Vec::<String>::new(),
        "host processes with the secret"
    );
    let qemu = host_pid(&platform, &id, Driver::Microvm);
    let qemu_cmdline = std::fs::read_to_string(format!("/proc/{qemu}/cmdline")).unwrap_or_default();
    assert!(
        qemu_cmdline.contains("-append"),
        "the machine's QEMU was found: {qemu_cmdline}"
    );

    // QEMU's jail: its own uid, seccomp (-sandbox on), pid and mount namespaces, a chroot
    // with little in it, and the machine's cgroups with the guest's size in the limits.
    let status = std::fs::read_to_string(format!("/proc/{qemu}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_default()
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string()
    };
    let uid: u32 = field("Uid:").parse().unwrap_or(0);
    assert!(uid >= 1000, "QEMU runs as an unprivileged uid: {status}");
    assert_eq!(field("Seccomp:"), "2", "QEMU is under seccomp: {status}");
    for namespace in ["pid", "mnt"] {
        let theirs = std::fs::read_link(format!("/proc/{qemu}/ns/{namespace}")).unwrap();
        let ours = std::fs::read_link(format!("/proc/self/ns/{namespace}")).unwrap();
        assert_ne!(theirs, ours, "QEMU has its own {namespace} namespace");
    }
    let jail_root: Vec<String> = std::fs::read_dir(format!("/proc/{qemu}/root"))
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        !jail_root.is_empty()
            && !jail_root
                .iter()
                .any(|n| n == "etc" || n == "home" || n == "root"),
        "QEMU's root holds only what it needs: {jail_root:?}"
    );
    let cgroups = std::fs::read_to_string(format!("/proc/{qemu}/cgroup")).unwrap_or_default();
    assert!(
        cgroups.contains(&format!("/aloft/{id}")),
        "QEMU is in the machine's cgroups: {cgroups}"
    );
    let metrics = platform.agent("GET", "/metrics", None).stdout;
    let limit: u64 = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!(
                "aloft_machine_memory_limit_bytes{{app=\"lab\",machine=\"{id}\",region=\"local\"}} "
            ))
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(
        limit > 512 << 20 && limit < 1024 << 20,
        "the VMM's memory limit is the guest's 512 MB plus QEMU's own: {limit}"
    );
    assert!(
        !files_containing(&platform.data_dir(), &id).is_empty(),
        "the search finds what is on disk (the machine's id)"
    );
    let files = files_containing(&platform.data_dir(), &marker);
    assert_eq!(files, Vec::<String>::new(), "files with the secret");
}

fn machine_image(platform: &Platform, id: &str) -> String {
    let token = platform.aloft(&["auth", "token"]).stdout.trim().to_string();
    let machine: Value = serde_json::from_str(
        &platform
            .curl(&[
                "-H",
                &format!("Authorization: Bearer {token}"),
                &format!("http://127.0.0.1:4280/v1/apps/lab/machines/{id}"),
            ])
            .stdout,
    )
    .unwrap_or_default();
    machine["config"]["image"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// The start failed saying `reason`: in the create's answer, or on the failed machine.
fn expect_failed_start(platform: &Platform, run: &Run, id: &str, reason: &str) {
    if id.is_empty() {
        assert!(
            run.stdout.contains(reason),
            "the failed start says why: {run}"
        );
        return;
    }
    common::wait_until(reason, Duration::from_secs(60), || {
        let run = platform.aloft(&["machine", "status", id, "-a", "lab"]);
        (!(run.stdout.contains("State: failed") && run.stdout.contains(reason)))
            .then(|| run.to_string())
    });
}

/// The machine links (`al…`) in the platform's network namespace.
fn links(platform: &Platform) -> Vec<String> {
    let output = std::process::Command::new("ip")
        .args(["-n", &platform.netns, "-o", "link", "show"])
        .output()
        .expect("ip link show");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|name| {
            name.trim()
                .split('@')
                .next()
                .unwrap_or_default()
                .to_string()
        })
        .filter(|name| name.starts_with("al"))
        .collect()
}

/// Only `good`'s QEMU and tap exist, if any (failed starts left none behind).
fn assert_only_machine(platform: &Platform, good: Option<&str>) {
    let taps = links(platform);
    let expected: Vec<String> = good.iter().map(|g| format!("al{}", &g[..12])).collect();
    assert_eq!(taps, expected, "only the good machine's tap is left");
    let good = good.unwrap_or("none");
    let qemus = std::fs::read_dir("/proc")
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
                .map(|c| String::from_utf8_lossy(&c).into_owned())
                .filter(|c| c.contains("qemu-system") && c.contains("guest="))
                .filter(|c| !c.contains(&format!("guest={good}")))
                .count()
        })
        .unwrap_or(0);
    assert_eq!(qemus, 0, "no QEMU is left but the good machine's");
}
