//! A rolling deploy survives `kill -9` of `aloft server`: started with --detach, the
//! server is killed mid-way and started again, the deploy goes on from where it stopped
//! (machines already updated are not updated again), `aloft status` shows it and
//! `aloft deploy --resume` follows it to the end.

mod common;

use std::path::{Path, PathBuf};
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
    grace_period = "10s"
    interval = "1s"
    timeout = "2s"
    method = "GET"
    path = "/"
"#;

/// How long a machine of the second version waits before it listens: its checks cannot
/// pass sooner, so a rolling deploy spends this long on each machine and a kill that
/// follows the second machine's update lands while the deploy is still going.
const SLOW_START_SECONDS: u32 = 4;

fn app_dir(platform: &Platform, version: &str) -> PathBuf {
    let dir = platform.root.path().join(version);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(common::hello_binary(), dir.join("hello")).unwrap();
    std::fs::copy("/bin/busybox", dir.join("busybox"))
        .expect("busybox-static is installed (scripts/setup.sh)");
    std::fs::write(dir.join("version.txt"), version).unwrap();
    let command = if version == "v1" {
        r#"["/hello"]"#.to_string()
    } else {
        format!(r#"["/busybox", "sh", "-c", "sleep {SLOW_START_SECONDS}; exec /hello"]"#)
    };
    std::fs::write(
        dir.join("Dockerfile"),
        format!(
            "FROM scratch\nCOPY busybox /busybox\nCOPY hello /hello\nCOPY version.txt /version.txt\nCMD {command}\n"
        ),
    )
    .unwrap();
    let toml = format!(
        "app = \"rs\"\nprimary_region = \"local\"\n\n[env]\n  PORT = \"8080\"\n  VERSION = \"{version}\"\n{CHECKED_SERVICE}"
    );
    std::fs::write(dir.join("fly.toml"), toml).unwrap();
    dir
}

fn must(run: Run, what: &str, platform: &Platform) -> Run {
    assert!(
        run.ok(),
        "{what} failed: {run}\n--- server log (tail)\n{}",
        tail(&platform.server_log(), 80)
    );
    run
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn deploy(platform: &Platform, dir: &Path, args: &[&str]) -> Run {
    let mut all = vec!["deploy"];
    all.extend_from_slice(args);
    platform.aloft_in(Some(dir), &all)
}

fn machines(platform: &Platform) -> Vec<Value> {
    let run = platform.aloft(&["machine", "list", "-a", "rs", "--json"]);
    serde_json::from_str::<Value>(&run.stdout)
        .ok()
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
}

fn release_of(machine: &Value) -> String {
    machine["config"]["metadata"]["fly_release_version"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// How many configs a machine has had (one when made, one more per update).
fn versions(platform: &Platform, id: &str) -> usize {
    let token = platform.aloft(&["auth", "token"]).stdout.trim().to_string();
    let run = platform.curl(&[
        "-H",
        &format!("Authorization: Bearer {token}"),
        &format!("http://127.0.0.1:4280/v1/apps/rs/machines/{id}/versions"),
    ]);
    serde_json::from_str::<Value>(&run.stdout)
        .ok()
        .and_then(|v| v.as_array().map(Vec::len))
        .unwrap_or_else(|| panic!("versions of {id}: {run}"))
}

#[test]
fn a_rolling_deploy_goes_on_after_the_server_is_killed_and_deploy_resume_follows_it() {
    require_platform!();
    let mut platform = Platform::start();
    must(
        platform.aloft(&["apps", "create", "rs"]),
        "apps create",
        &platform,
    );
    let v1 = app_dir(&platform, "v1");
    must(deploy(&platform, &v1, &[]), "first deploy", &platform);
    must(
        platform.aloft(&["scale", "count", "3", "-a", "rs", "--yes"]),
        "scale count 3",
        &platform,
    );
    let before = machines(&platform);
    assert_eq!(before.len(), 3, "{before:?}");
    let ids: Vec<String> = before
        .iter()
        .map(|m| m["id"].as_str().unwrap_or_default().to_string())
        .collect();
    let first_versions: Vec<usize> = ids.iter().map(|id| versions(&platform, id)).collect();

    // One machine at a time; each takes SLOW_START_SECONDS before its check passes.
    let v2 = app_dir(&platform, "v2");
    let run = must(
        deploy(&platform, &v2, &["--detach", "--max-unavailable", "1"]),
        "detached deploy",
        &platform,
    );

    // Once a second machine has the new config, the first one is finished.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let list = machines(&platform);
        if list.iter().filter(|m| release_of(m) == "2").count() >= 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the deploy never got mid-way: {list:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    platform.kill_server();
    platform.restart_server();

    let status = must(platform.aloft(&["status", "-a", "rs"]), "status", &platform);
    assert!(
        status.stdout.contains("Deployment Status") && status.stdout.contains("v2"),
        "aloft status shows the deploy in progress: {status}"
    );

    let resumed = must(
        platform.aloft(&["deploy", "--resume", "-a", "rs"]),
        "deploy --resume",
        &platform,
    );
    println!("{resumed}");
    assert!(
        resumed.stdout.contains("goes on from where it stopped"),
        "{resumed}"
    );
    assert!(
        resumed.stdout.contains("was updated before the restart"),
        "{resumed}"
    );
    assert!(
        resumed.stdout.contains("Release v2 of rs deployed"),
        "{resumed}"
    );

    let after = machines(&platform);
    assert_eq!(after.len(), 3, "no machine was added or lost: {after:?}");
    for machine in &after {
        assert_eq!(release_of(machine), "2", "{machine}");
        assert_eq!(machine["state"], "started", "{machine}");
        assert_eq!(machine["config"]["env"]["VERSION"], "v2", "{machine}");
    }
    for (id, first) in ids.iter().zip(&first_versions) {
        assert!(
            after.iter().any(|m| m["id"] == id.as_str()),
            "machine {id} was updated in place"
        );
        assert_eq!(
            versions(&platform, id),
            first + 1,
            "machine {id} was updated exactly once\n{resumed}"
        );
    }
    let releases = must(
        platform.aloft(&["releases", "-a", "rs", "--json"]),
        "releases",
        &platform,
    );
    let releases: Value = serde_json::from_str(&releases.stdout).unwrap();
    assert_eq!(releases[0]["version"], 2, "{releases}");
    assert_eq!(releases[0]["status"], "complete", "{releases}");
    let status = must(platform.aloft(&["status", "-a", "rs"]), "status", &platform);
    assert!(!status.stdout.contains("Deployment Status"), "{status}");

    assert!(run.stdout.contains("aloft deploy --resume"), "{run}");

    // The finished deploy can still be read back.
    let again = must(
        platform.aloft(&["deploy", "--resume", "-a", "rs"]),
        "deploy --resume after the end",
        &platform,
    );
    assert!(
        again.stdout.contains("No deploy of rs is in progress"),
        "{again}"
    );
    assert!(
        again.stdout.contains("Release v2 of rs deployed"),
        "{again}"
    );
}

/// Blue/green, killed while the green machines are coming up: the restarted server
/// destroys the half-launched green machines, makes new ones and switches to them; the
/// blue ones serve until then and are destroyed at the end.
#[test]
fn a_bluegreen_deploy_cut_short_by_a_kill_starts_its_green_machines_again() {
    require_platform!();
    let mut platform = Platform::start();
    must(
        platform.aloft(&["apps", "create", "rs"]),
        "apps create",
        &platform,
    );
    let v1 = app_dir(&platform, "v1");
    must(deploy(&platform, &v1, &[]), "first deploy", &platform);
    let blue: Vec<String> = machines(&platform)
        .iter()
        .map(|m| m["id"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(blue.len(), 2, "{blue:?}");

    let v2 = app_dir(&platform, "v2");
    must(
        deploy(&platform, &v2, &["--detach", "--strategy", "bluegreen"]),
        "detached bluegreen deploy",
        &platform,
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    let green: Vec<String> = loop {
        let list = machines(&platform);
        let green: Vec<String> = list
            .iter()
            .filter(|m| release_of(m) == "2")
            .map(|m| m["id"].as_str().unwrap_or_default().to_string())
            .collect();
        if green.len() >= 2 {
            break green;
        }
        assert!(Instant::now() < deadline, "no green machines: {list:?}");
        std::thread::sleep(Duration::from_millis(100));
    };
    platform.kill_server();
    platform.restart_server();

    let resumed = must(
        platform.aloft(&["deploy", "--resume", "-a", "rs"]),
        "deploy --resume",
        &platform,
    );
    println!("{resumed}");
    assert!(
        resumed.stdout.contains("Release v2 of rs deployed"),
        "{resumed}"
    );
    let after = machines(&platform);
    assert_eq!(after.len(), 2, "two machines, as before: {after:?}");
    for machine in &after {
        let id = machine["id"].as_str().unwrap_or_default().to_string();
        assert_eq!(release_of(machine), "2", "{machine}");
        assert_eq!(machine["state"], "started", "{machine}");
        assert!(!blue.contains(&id), "blue machine {id} was destroyed");
        if !resumed.stdout.contains("which this deploy was launching") {
            assert!(green.contains(&id), "{id} is one of {green:?}\n{resumed}");
        }
    }
}
