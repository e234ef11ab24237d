//! A rolling deploy survives `kill -9` of `aloft server`: started with --detach, the
//! server is killed mid-way and started again, the deploy goes on from where it stopped
//! (machines already updated are not updated again), `aloft status` shows it and
//! `aloft deploy --resume` follows it to the end. A deploy whose new version fails its
//! health check, killed mid-way, ends after the restart as its strategy says it ends
//! without a kill; the rollout of `aloft secrets set` goes on after a kill as well.

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
    let command = if version == "v1" {
        r#"["/hello"]"#.to_string()
    } else {
        format!(r#"["/busybox", "sh", "-c", "sleep {SLOW_START_SECONDS}; exec /hello"]"#)
    };
    app_dir_running(platform, version, &command)
}

/// A version whose process never listens: its health check cannot pass, and fails once
/// the grace period and one interval are over, so a kill that follows the first new
/// machine's appearance lands while the deploy waits for it.
fn broken_app_dir(platform: &Platform) -> PathBuf {
    app_dir_running(platform, "v2", r#"["/busybox", "sleep", "3600"]"#)
}

fn app_dir_running(platform: &Platform, version: &str, command: &str) -> PathBuf {
    let dir = platform.root.path().join(version);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(common::hello_binary(), dir.join("hello")).unwrap();
    std::fs::copy("/bin/busybox", dir.join("busybox"))
        .expect("busybox-static is installed (scripts/setup.sh)");
    std::fs::write(dir.join("version.txt"), version).unwrap();
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

/// The machines of the app: (id, how many configs it has had), in id order.
fn machines_with_versions(platform: &Platform) -> Vec<(String, usize)> {
    let mut list: Vec<(String, usize)> = machines(platform)
        .iter()
        .map(|m| {
            let id = m["id"].as_str().unwrap_or_default().to_string();
            let count = versions(platform, &id);
            (id, count)
        })
        .collect();
    list.sort();
    list
}

/// Deploys a working v1 (two machines), then with `strategy` a v2 whose health check
/// fails; once `new_machines` machines run v2 the server is killed and started again, and
/// `aloft deploy --resume` follows the deploy to its end. Returns the machines before v2
/// and what `deploy --resume` printed, after checking what every strategy shares: the
/// resumed deploy fails as `aloft deploy` fails (non-zero, the failing check named), the
/// release is marked failed, and v1 serves on the machines it ran on before.
fn kill_a_failing_deploy(
    strategy: &str,
    new_machines: usize,
) -> (Platform, Vec<(String, usize)>, Run) {
    let mut platform = Platform::start();
    must(
        platform.aloft(&["apps", "create", "rs"]),
        "apps create",
        &platform,
    );
    let v1 = app_dir(&platform, "v1");
    must(deploy(&platform, &v1, &[]), "first deploy", &platform);
    let before = machines_with_versions(&platform);
    assert_eq!(before.len(), 2, "{before:?}");

    let v2 = broken_app_dir(&platform);
    must(
        deploy(
            &platform,
            &v2,
            &["--detach", "--strategy", strategy, "--max-unavailable", "1"],
        ),
        "detached deploy",
        &platform,
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let list = machines(&platform);
        if list.iter().filter(|m| release_of(m) == "2").count() >= new_machines {
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

    let resumed = platform.aloft(&["deploy", "--resume", "-a", "rs"]);
    println!("{resumed}");
    assert!(
        !resumed.ok(),
        "deploy --resume fails as the deploy did: {resumed}"
    );
    assert!(
        resumed.stdout.contains("goes on from where it stopped"),
        "{resumed}"
    );
    assert!(
        resumed.stderr.contains("deploy failed:")
            && resumed.stderr.contains("failed its health check"),
        "{resumed}\n--- server log (tail)\n{}",
        tail(&platform.server_log(), 200)
    );
    assert!(
        !resumed.stdout.contains("Release v2 of rs deployed"),
        "{resumed}"
    );

    let releases = must(
        platform.aloft(&["releases", "-a", "rs", "--json"]),
        "releases",
        &platform,
    );
    let releases: Value = serde_json::from_str(&releases.stdout).unwrap();
    assert_eq!(releases[0]["version"], 2, "{releases}");
    assert_eq!(releases[0]["status"], "failed", "{releases}");

    let after = machines(&platform);
    let mut ids: Vec<&str> = after
        .iter()
        .map(|m| m["id"].as_str().unwrap_or_default())
        .collect();
    ids.sort();
    let ids_before: Vec<&str> = before.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(
        ids, ids_before,
        "the machines of v1, no other: {after:?}\n{resumed}"
    );
    for machine in &after {
        assert_eq!(release_of(machine), "1", "{machine}\n{resumed}");
        assert_eq!(machine["state"], "started", "{machine}");
        assert_eq!(machine["config"]["env"]["VERSION"], "v1", "{machine}");
    }
    let status = must(platform.aloft(&["status", "-a", "rs"]), "status", &platform);
    assert!(!status.stdout.contains("Deployment Status"), "{status}");
    (platform, before, resumed)
}

/// Rolling: as without a kill, the machine being updated when its check failed goes back
/// to v1 (updated twice: to v2 and back), and the machines after it are never touched.
#[test]
fn a_failing_rolling_deploy_killed_mid_way_puts_the_machine_it_changed_back() {
    require_platform!();
    let (platform, before, resumed) = kill_a_failing_deploy("rolling", 1);
    assert!(
        resumed
            .stdout
            .contains("Rolling back the machines this deploy changed"),
        "{resumed}"
    );
    let after = machines_with_versions(&platform);
    let changed: Vec<_> = before
        .iter()
        .zip(&after)
        .filter(|((_, first), (_, now))| first != now)
        .collect();
    assert_eq!(
        changed.len(),
        1,
        "one machine was changed: {before:?} -> {after:?}\n{resumed}"
    );
    let ((id, first), (_, now)) = changed[0];
    assert_eq!(
        *now,
        first + 2,
        "machine {id} was updated to v2 once and back to v1 once\n{resumed}"
    );
}

/// Blue/green: as without a kill, the green machines go and the blue ones stay untouched.
#[test]
fn a_failing_bluegreen_deploy_killed_mid_way_keeps_the_blue_machines() {
    require_platform!();
    let (platform, before, resumed) = kill_a_failing_deploy("bluegreen", 2);
    assert!(
        resumed
            .stdout
            .contains("destroying the green machines, the blue ones keep serving"),
        "{resumed}"
    );
    assert_eq!(machines_with_versions(&platform), before, "{resumed}");
}

/// Canary: as without a kill, the canary machine goes and the others are never touched.
#[test]
fn a_failing_canary_deploy_killed_mid_way_keeps_the_old_machines() {
    require_platform!();
    let (platform, before, resumed) = kill_a_failing_deploy("canary", 1);
    assert!(
        resumed.stdout.contains("Creating a canary machine"),
        "{resumed}"
    );
    assert_eq!(machines_with_versions(&platform), before, "{resumed}");
}

/// `aloft secrets set --detach` starts a rollout (a new release); `aloft server` killed
/// mid-way and started again finishes it, every machine gets the secret, and `aloft
/// deploy --resume` follows it to its end.
#[test]
fn a_secrets_rollout_goes_on_after_the_server_is_killed() {
    require_platform!();
    let mut platform = Platform::start();
    must(
        platform.aloft(&["apps", "create", "rs"]),
        "apps create",
        &platform,
    );
    // Each machine of this version takes SLOW_START_SECONDS to pass its check, so the
    // rollout is still going when the first machine has the secrets release.
    let slow = app_dir(&platform, "slow");
    must(deploy(&platform, &slow, &[]), "first deploy", &platform);
    let before = machines_with_versions(&platform);
    assert_eq!(before.len(), 2, "{before:?}");

    let set = must(
        platform.aloft(&[
            "secrets",
            "set",
            "--detach",
            "-a",
            "rs",
            "ROLLED_SECRET=s3cret-value",
        ]),
        "secrets set --detach",
        &platform,
    );
    assert!(set.stdout.contains("goes on on the server"), "{set}");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let list = machines(&platform);
        if list.iter().any(|m| release_of(m) == "2") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the rollout never started: {list:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    platform.kill_server();
    platform.restart_server();

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
        resumed.stdout.contains("Release v2 of rs deployed"),
        "{resumed}"
    );
    let releases = must(
        platform.aloft(&["releases", "-a", "rs", "--json"]),
        "releases",
        &platform,
    );
    let releases: Value = serde_json::from_str(&releases.stdout).unwrap();
    assert_eq!(releases[0]["version"], 2, "{releases}");
    assert_eq!(releases[0]["status"], "complete", "{releases}");

    let after = machines_with_versions(&platform);
    assert_eq!(
        after.iter().map(|(id, _)| id).collect::<Vec<_>>(),
        before.iter().map(|(id, _)| id).collect::<Vec<_>>(),
        "the same machines, updated in place\n{resumed}"
    );
    for ((id, first), (_, now)) in before.iter().zip(&after) {
        assert_eq!(
            *now,
            first + 1,
            "machine {id} was updated exactly once\n{resumed}"
        );
        let env = must(
            platform.aloft(&["machine", "exec", id, "-a", "rs", "--", "/busybox", "env"]),
            "machine exec env",
            &platform,
        );
        assert!(
            env.stdout.contains("ROLLED_SECRET=s3cret-value"),
            "machine {id} has the secret: {env}"
        );
    }
    let listed = must(
        platform.aloft(&["secrets", "list", "-a", "rs", "--json"]),
        "secrets list",
        &platform,
    );
    let listed: Value = serde_json::from_str(&listed.stdout).unwrap();
    assert_eq!(listed[0]["name"], "ROLLED_SECRET", "{listed}");
    assert_eq!(listed[0]["status"], "Deployed", "{listed}");
}
