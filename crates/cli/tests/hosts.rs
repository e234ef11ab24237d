//! Two hosts, one control plane: `aloft server` in one network namespace, `aloft agent`
//! in a second one linked to it by a veth pair, joined with a token from `aloft tokens
//! create host`. Both show up in `aloft hosts list`; an app's machines spread over both
//! and run there; a cordoned host gets no new machines; kill -9 of the second host's agent
//! marks it down and its machines `unreachable`. (Requests through the proxy to the second
//! host's machines need the backhaul, which is not built yet.)

mod common;

use std::time::Duration;

use common::{JoinedHost, Platform, wait_until};
use serde_json::Value;

fn hosts(platform: &Platform) -> Vec<Value> {
    let run = platform.aloft(&["hosts", "list", "--json"]);
    assert!(run.ok(), "{run}");
    serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{e}: {run}"))
}

fn host(platform: &Platform, id: &str) -> Value {
    let run = platform.aloft(&["hosts", "show", id, "--json"]);
    assert!(run.ok(), "{run}");
    serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{e}: {run}"))
}

fn machines_on(platform: &Platform, id: &str) -> Vec<String> {
    host(platform, id)["machine_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn a_joined_host_runs_machines_is_cordoned_and_goes_down_when_killed() {
    require_platform!();
    let mut second = JoinedHost::new();
    let api = format!("{}:4280", JoinedHost::CONTROL_IP);
    let control = format!("http://{api}");
    let platform =
        Platform::start_prepared(&["--driver", "container", "--api-listen", &api], |a| {
            second.link_to(a)
        });

    // A token the control plane does not know: the agent says so and exits.
    let refused = second.run_agent(&[
        "--control",
        &control,
        "--token",
        "FlyV1 bogus",
        "--data-dir",
        &second.data_dir().join("refused").to_string_lossy(),
    ]);
    assert!(!refused.ok(), "{refused}");
    assert!(refused.stderr.contains("refused host"), "{refused}");
    // Only the operator's admin token makes join tokens.
    let created = platform.aloft(&["tokens", "create", "org", "--json"]);
    assert!(created.ok(), "{created}");
    let org_token: Value = serde_json::from_str(&created.stdout).unwrap();
    let denied = platform.aloft(&[
        "tokens",
        "create",
        "host",
        "--access-token",
        org_token["token"].as_str().unwrap(),
    ]);
    assert!(!denied.ok(), "{denied}");

    let token = platform.aloft(&["tokens", "create", "host"]);
    assert!(token.ok(), "{token}");
    let token = token.stdout.trim().to_string();
    second.start_agent(&control, &token, "local");

    let mut second_id = String::new();
    wait_until("both hosts up", Duration::from_secs(60), || {
        let list = hosts(&platform);
        let up = list.iter().filter(|h| h["status"] == "up").count();
        if let Some(b) = list
            .iter()
            .find(|h| h["agent_url"].as_str().unwrap().contains(JoinedHost::IP))
        {
            second_id = b["id"].as_str().unwrap().to_string();
        }
        (up != 2 || second_id.is_empty())
            .then(|| format!("{list:?}\n--- agent log\n{}", second.agent_log()))
    });
    let table = platform.aloft(&["hosts", "list"]);
    assert!(table.ok(), "{table}");
    for column in [
        "ID",
        "REGION",
        "STATUS",
        "MACHINES",
        "CPUS",
        "MEMORY",
        "LAST SEEN",
    ] {
        assert!(table.stdout.contains(column), "{table}");
    }
    assert!(table.stdout.contains(&second_id), "{table}");
    let b = host(&platform, &second_id);
    assert!(b["cpus"].as_u64().unwrap() >= 1, "{b}");
    assert!(b["memory_mb"].as_u64().unwrap() > 0, "{b}");

    // Two machines: one on each host, both running.
    let dir = common::idle_busybox_app(&platform, "spread", "");
    assert!(platform.aloft(&["apps", "create", "spread"]).ok());
    let deployed = platform.aloft_in(Some(&dir), &["deploy", "--ha=false"]);
    assert!(
        deployed.ok(),
        "{deployed}\n{}\n--- agent log\n{}",
        platform.server_log(),
        second.agent_log()
    );
    let scaled = platform.aloft(&["scale", "count", "2", "-a", "spread", "-y"]);
    assert!(
        scaled.ok(),
        "{scaled}\n{}\n--- agent log\n{}",
        platform.server_log(),
        second.agent_log()
    );
    let ids = common::machine_ids(&platform, "spread");
    assert_eq!(ids.len(), 2, "{ids:?}");
    let on_b = machines_on(&platform, &second_id);
    assert_eq!(
        on_b.len(),
        1,
        "one machine on each host: {on_b:?} of {ids:?}"
    );
    let b_machine = on_b[0].clone();
    wait_until("both machines started", Duration::from_secs(60), || {
        let states: Vec<Value> = ids
            .iter()
            .map(|id| common::machine_json(&platform, "spread", id))
            .collect();
        (!states
            .iter()
            .all(|m| m["state"] == "started" && m["host_status"] == "ok"))
        .then(|| format!("{states:?}\n--- agent log\n{}", second.agent_log()))
    });
    // The second host's agent runs it.
    assert!(
        second
            .data_dir()
            .join("agent/machines")
            .join(&b_machine)
            .exists(),
        "machine {b_machine} is on the second host's disk"
    );

    // Cordoned: new machines go to the first host only.
    let cordon = platform.aloft(&["hosts", "cordon", &second_id]);
    assert!(cordon.ok(), "{cordon}");
    assert_eq!(host(&platform, &second_id)["status"], "cordoned");
    let scaled = platform.aloft(&["scale", "count", "4", "-a", "spread", "-y"]);
    assert!(scaled.ok(), "{scaled}\n{}", platform.server_log());
    assert_eq!(common::machine_ids(&platform, "spread").len(), 4);
    assert_eq!(machines_on(&platform, &second_id), vec![b_machine.clone()]);

    // Remove refuses a host that still has a machine, naming it.
    let remove = platform.aloft(&["hosts", "remove", &second_id]);
    assert!(!remove.ok(), "{remove}");
    assert!(remove.stderr.contains(&b_machine), "{remove}");

    // kill -9 of the agent: the host goes down, its machine is unreachable.
    second.kill_agent();
    wait_until("the second host down", Duration::from_secs(30), || {
        let b = host(&platform, &second_id);
        let m = common::machine_json(&platform, "spread", &b_machine);
        (b["status"] != "down" || m["host_status"] != "unreachable").then(|| format!("{b}\n{m}"))
    });
    // The first host's machines are not affected.
    for id in common::machine_ids(&platform, "spread") {
        if id != b_machine {
            let m = common::machine_json(&platform, "spread", &id);
            assert_eq!(m["host_status"], "ok", "{m}");
            assert_eq!(m["state"], "started", "{m}");
        }
    }

    // The agent comes back with the same data dir and token: the same host, still cordoned.
    second.start_agent(&control, &token, "local");
    wait_until("the second host back", Duration::from_secs(30), || {
        let b = host(&platform, &second_id);
        let m = common::machine_json(&platform, "spread", &b_machine);
        (b["status"] != "cordoned" || m["host_status"] != "ok").then(|| format!("{b}\n{m}"))
    });
    assert_eq!(hosts(&platform).len(), 2);
    drop(second);
}
