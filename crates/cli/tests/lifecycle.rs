//! Machine lifecycle as flyctl users expect it, and the guest environment, through
//! `aloft server` and the `aloft` CLI: `machine run --rm` destroys the machine when it
//! exits, `--schedule` runs it again on the server's clock (across a server restart),
//! `machine suspend|kill`, `apps restart`, `platform regions|vm-sizes`, `open`,
//! `host_status` from the agent's real reachability; every platform variable and
//! /etc/hosts entry spec/platform.md §7 lists; and one machine reaching another's 6PN
//! address (the example app listens on `[::]`).

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::Platform;
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
"#;

/// What the test's own route out looks like: a documentation address on a link in
/// the test's namespace (nothing leaves it).
const HOST_PUBLIC_V6: &str = "2001:db8:5::5";

/// An hour of schedule passes in two seconds.
const SCHEDULE_TIME_SCALE: &str = "1800";

fn lab_app(platform: &Platform) -> PathBuf {
    let dir = platform.hello_app_dir("lab");
    std::fs::write(dir.join("fly.toml"), LAB_TOML).unwrap();
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy("/bin/busybox", bin.join("busybox")).expect("busybox-static is installed");
    for applet in ["sh", "cat", "env", "wget", "sleep", "echo"] {
        std::os::unix::fs::symlink("busybox", bin.join(applet)).unwrap();
    }
    std::fs::write(
        dir.join("Dockerfile"),
        "FROM scratch\nCOPY bin /bin\nCOPY hello /hello\nCMD [\"/hello\"]\n",
    )
    .unwrap();
    std::fs::write(dir.join(".dockerignore"), "fly.toml\n").unwrap();
    dir
}

fn in_namespace(platform: &Platform, program: &str, args: &[&str]) {
    let status = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", platform.netns))
        .arg(program)
        .args(args)
        .status()
        .expect("nsenter");
    assert!(status.success(), "{program} {args:?}");
}

fn machine_json(platform: &Platform, id: &str) -> Value {
    let run = platform.aloft(&["machine", "status", id, "-a", "lab", "--json"]);
    assert!(run.ok(), "{run}");
    serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{e}: {run}"))
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

fn starts(platform: &Platform, id: &str) -> usize {
    events(platform, id)
        .iter()
        .filter(|e| e["type"] == "start")
        .count()
}

fn exec(platform: &Platform, id: &str, argv: &[&str]) -> String {
    let mut args = vec!["machine", "exec", id, "-a", "lab", "--"];
    args.extend(argv);
    let run = platform.aloft(&args);
    assert!(run.ok(), "{run}");
    run.stdout
}

#[test]
fn machine_lifecycle_and_guest_environment_as_flyctl_users_expect() {
    require_platform!();
    let mut platform = Platform::start_with(&["--schedule-time-scale", SCHEDULE_TIME_SCALE]);
    // The host's route out: FLY_PUBLIC_IP is the address machines' traffic leaves from.
    in_namespace(
        &platform,
        "ip",
        &[
            "link",
            "add",
            "uplink",
            "type",
            "veth",
            "peer",
            "name",
            "uplink-peer",
        ],
    );
    in_namespace(&platform, "ip", &["link", "set", "uplink", "up"]);
    in_namespace(&platform, "ip", &["link", "set", "uplink-peer", "up"]);
    in_namespace(
        &platform,
        "ip",
        &[
            "-6",
            "addr",
            "add",
            &format!("{HOST_PUBLIC_V6}/64"),
            "dev",
            "uplink",
            "nodad",
        ],
    );
    in_namespace(
        &platform,
        "ip",
        &["-6", "route", "add", "default", "dev", "uplink"],
    );

    assert!(platform.aloft(&["apps", "create", "lab"]).ok());
    let dir = lab_app(&platform);
    let deploy = platform.aloft_in(Some(&dir), &["deploy"]);
    assert!(deploy.ok(), "{deploy}\n{}", platform.server_log());
    let list = platform.aloft(&["machine", "list", "-a", "lab", "--json"]);
    let machines: Vec<Value> = serde_json::from_str(&list.stdout).expect("machine list json");
    assert_eq!(machines.len(), 2, "{list}");
    let id = machines[0]["id"].as_str().unwrap().to_string();
    let other_6pn = machines[1]["private_ip"].as_str().unwrap().to_string();
    let image = machines[0]["config"]["image"].as_str().unwrap().to_string();

    // ---- the guest environment (spec/platform.md §7) ----
    let env: std::collections::BTreeMap<String, String> = exec(&platform, &id, &["env"])
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let machine = machine_json(&platform, &id);
    let expected = [
        ("FLY_APP_NAME", "lab".to_string()),
        ("FLY_MACHINE_ID", id.clone()),
        ("FLY_ALLOC_ID", id.clone()),
        ("FLY_REGION", "local".to_string()),
        ("FLY_PUBLIC_IP", HOST_PUBLIC_V6.to_string()),
        ("FLY_IMAGE_REF", image.clone()),
        (
            "FLY_MACHINE_VERSION",
            machine["instance_id"].as_str().unwrap().to_string(),
        ),
        (
            "FLY_PRIVATE_IP",
            machine["private_ip"].as_str().unwrap().to_string(),
        ),
        ("FLY_PROCESS_GROUP", "app".to_string()),
        ("PRIMARY_REGION", "local".to_string()),
    ];
    for (name, value) in &expected {
        assert_eq!(env.get(*name), Some(value), "{name} in {env:#?}");
    }
    assert!(
        env.get("FLY_VM_MEMORY_MB")
            .is_some_and(|m| m.parse::<u32>().is_ok_and(|m| m > 0)),
        "{env:#?}"
    );
    let hosts = exec(&platform, &id, &["cat", "/etc/hosts"]);
    let names: Vec<&str> = hosts
        .lines()
        .flat_map(|l| l.split_whitespace().skip(1))
        .collect();
    for name in ["fly-local-6pn", "fly-global-services", id.as_str()] {
        assert!(names.contains(&name), "{name} in /etc/hosts:\n{hosts}");
    }

    // ---- one machine reaches another's 6PN address (hello listens on [::]) ----
    let answer = exec(
        &platform,
        &id,
        &[
            "wget",
            "-q",
            "-O",
            "-",
            &format!("http://[{other_6pn}]:8080/"),
        ],
    );
    assert!(answer.contains("\"FLY_MACHINE_ID\""), "{answer}");

    // ---- host_status follows the agent's reachability ----
    let host_status = |platform: &Platform| {
        machine_json(platform, &id)["host_status"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    common::wait_until("host_status ok", Duration::from_secs(20), || {
        let status = host_status(&platform);
        (status != "ok").then_some(status)
    });
    // The agent stops answering the control plane (its API port drops every packet).
    in_namespace(
        &platform,
        "nft",
        &["add", "table", "inet", "lifecycle_test"],
    );
    in_namespace(
        &platform,
        "nft",
        &["add chain inet lifecycle_test out { type filter hook output priority 0 ; }"],
    );
    in_namespace(
        &platform,
        "nft",
        &["add rule inet lifecycle_test out tcp dport 4281 drop"],
    );
    common::wait_until("host_status unreachable", Duration::from_secs(30), || {
        let status = host_status(&platform);
        (status != "unreachable").then_some(status)
    });
    in_namespace(
        &platform,
        "nft",
        &["delete", "table", "inet", "lifecycle_test"],
    );
    common::wait_until("host_status ok again", Duration::from_secs(30), || {
        let status = host_status(&platform);
        (status != "ok").then_some(status)
    });

    // ---- machine run --rm: destroyed when it exits ----
    let run = platform.aloft(&[
        "machine", "run", &image, "-a", "lab", "--rm", "-d", "--", "/bin/sh", "-c", "sleep 1",
    ]);
    assert!(run.ok(), "{run}");
    let once = common::launched_machine_id(&run.stdout);
    common::wait_until(
        "the --rm machine destroyed",
        Duration::from_secs(30),
        || {
            let state = machine_json(&platform, &once)["state"].to_string();
            (state != "\"destroyed\"").then_some(state)
        },
    );

    // ---- machine suspend, kill ----
    let suspend = platform.aloft(&["machine", "suspend", &id, "-a", "lab"]);
    assert!(suspend.ok(), "{suspend}\n{}", platform.server_log());
    assert_eq!(machine_json(&platform, &id)["state"], "suspended");
    assert!(platform.aloft(&["machine", "start", &id, "-a", "lab"]).ok());
    common::wait_until("resumed", Duration::from_secs(30), || {
        let state = machine_json(&platform, &id)["state"].to_string();
        (state != "\"started\"").then_some(state)
    });
    let kill = platform.aloft(&["machine", "kill", &id, "-a", "lab"]);
    assert!(kill.ok(), "{kill}");
    assert!(kill.stdout.contains("Kill signal has been sent"), "{kill}");
    common::wait_until("an exit by SIGKILL", Duration::from_secs(30), || {
        let all = events(&platform, &id);
        let killed = all
            .iter()
            .any(|e| e["type"] == "exit" && e["request"]["exit_event"]["signal"] == 9);
        (!killed).then(|| format!("{all:#?}"))
    });

    // ---- apps restart ----
    common::wait_until("both machines started", Duration::from_secs(60), || {
        let list = platform.aloft(&["machine", "list", "-a", "lab", "--json"]);
        let machines: Vec<Value> = serde_json::from_str(&list.stdout).unwrap_or_default();
        (machines.iter().filter(|m| m["state"] == "started").count() != 2).then_some(list.stdout)
    });
    let before = starts(&platform, &id);
    let restart = platform.aloft(&["apps", "restart", "lab"]);
    assert!(restart.ok(), "{restart}");
    assert_eq!(
        restart.stdout.matches("restarted successfully").count(),
        2,
        "{restart}"
    );
    assert!(
        events(&platform, &id)
            .iter()
            .any(|e| e["type"] == "restart"),
        "a restart event (starts before: {before})"
    );

    // ---- platform regions, vm-sizes; open ----
    let regions = platform.aloft(&["platform", "regions", "--json"]);
    let regions: Vec<Value> = serde_json::from_str(&regions.stdout).expect("regions json");
    assert!(regions.iter().any(|r| r["code"] == "iad"));
    let table = platform.aloft(&["platform", "regions"]);
    assert!(table.stdout.starts_with("NAME"), "{}", table.stdout);
    assert!(table.stdout.contains("Ashburn"), "{}", table.stdout);
    let sizes = platform.aloft(&["platform", "vm-sizes"]);
    assert!(sizes.stdout.contains("performance-2x"), "{}", sizes.stdout);
    assert!(sizes.stdout.contains("CPU CORES"), "{}", sizes.stdout);
    let open = platform.aloft(&["open", "/admin", "-a", "lab"]);
    assert!(open.ok(), "{open}");
    assert_eq!(
        open.stdout.trim(),
        "opening http://lab.localhost:8080/admin ...",
        "{open}"
    );

    // ---- --schedule: runs again on the server's clock, also after a restart ----
    let run = platform.aloft(&[
        "machine",
        "run",
        &image,
        "-a",
        "lab",
        "--schedule",
        "hourly",
        "-d",
        "--",
        "/bin/sh",
        "-c",
        "echo scheduled run",
    ]);
    assert!(run.ok(), "{run}");
    let scheduled = common::launched_machine_id(&run.stdout);
    common::wait_until(
        "two scheduled runs after the first",
        Duration::from_secs(40),
        || {
            let count = starts(&platform, &scheduled);
            (count < 3).then(|| format!("{count} starts"))
        },
    );
    platform.restart();
    let after_restart = starts(&platform, &scheduled);
    common::wait_until(
        "a scheduled run after the server restarted",
        Duration::from_secs(40),
        || {
            let count = starts(&platform, &scheduled);
            (count <= after_restart).then(|| format!("{count} starts"))
        },
    );
    assert_ne!(
        machine_json(&platform, &scheduled)["state"],
        "destroyed",
        "a scheduled machine stays"
    );
}
