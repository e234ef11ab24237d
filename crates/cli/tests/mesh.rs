//! The WireGuard mesh between hosts, end to end: `aloft server --mesh-listen` in one
//! network namespace, `aloft server --join --mesh-listen` in a second one linked to it by
//! a veth pair. Machines of one org on the two hosts reach each other over TCP by 6PN
//! address and by `.internal` names their own host's DNS answers; another org's machine
//! does not reach them across hosts; a restarted host registers a new mesh key and traffic
//! flows again; bad mesh registrations are refused and change no host's peers. A request
//! at either host's proxy reaches machines on both hosts over the backhaul, with the same
//! Fly headers, autostart and Flycast as local machines, and only hosts may use it.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{JoinedHost, Platform, Run, wait_until};
use serde_json::{Value, json};

const CONTROL_MESH: &str = "10.77.0.1:51820";

fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// The machine's httpd, found by its network namespace (on whichever host it runs).
fn machine_pid(id: &str) -> i32 {
    let netns = PathBuf::from(format!("/run/netns/aloft-{id}"));
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim() == "httpd" && same_file(&entry.path().join("ns/net"), &netns) {
                return pid;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("no httpd in machine {id}");
}

/// A shell command inside the machine (its namespaces, its root filesystem, busybox).
fn inside(id: &str, script: &str) -> Run {
    let pid = machine_pid(id);
    Run::from(
        Command::new("nsenter")
            .args(["-t", &pid.to_string(), "-a", "/bin/sh", "-c", script])
            .stdin(Stdio::null())
            .output()
            .expect("running nsenter"),
    )
}

/// Whether a TCP connection from inside machine `from` to `[address]:port` is accepted.
fn connects(from: &str, address: &str, port: u16) -> bool {
    let run = inside(
        from,
        &format!("echo | timeout 10 nc -w 3 {address} {port} >/dev/null 2>&1; echo rc=$?"),
    );
    run.stdout.contains("rc=0")
}

/// `GET path` on the control plane (at the platform's end of the link) with `token`:
/// (status, body).
fn control_api(
    platform: &Platform,
    token: &str,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> (u16, String) {
    let url = format!("http://{}:4280{path}", JoinedHost::CONTROL_IP);
    let auth = format!("Authorization: Bearer {token}");
    let body = body.map(Value::to_string);
    let mut args = vec!["-X", method, "-H", &auth, "-w", "\n%{http_code}", &url];
    if let Some(body) = &body {
        args.extend(["-H", "Content-Type: application/json", "-d", body]);
    }
    let run = platform.curl(&args);
    assert!(run.ok(), "{run}");
    let (body, code) = run.stdout.rsplit_once('\n').expect("a status line");
    (code.trim().parse().expect("a status"), body.to_string())
}

fn mesh_peers(platform: &Platform) -> Vec<Value> {
    let (status, body) = control_api(
        platform,
        &platform.host_token(),
        "GET",
        "/v1/hosts/mesh",
        None,
    );
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

fn hosts(platform: &Platform) -> Vec<Value> {
    let run = platform.aloft(&["hosts", "list", "--json"]);
    assert!(run.ok(), "{run}");
    serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{e}: {run}"))
}

fn machines_on(platform: &Platform, host: &str) -> Vec<String> {
    let run = platform.aloft(&["hosts", "show", host, "--json"]);
    assert!(run.ok(), "{run}");
    let info: Value = serde_json::from_str(&run.stdout).unwrap();
    info["machine_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap().to_string())
        .collect()
}

/// `(id, 6PN address)` of each of `app`'s machines.
fn private_ips(platform: &Platform, app: &str, token: Option<&str>) -> Vec<(String, String)> {
    let mut args = vec!["ips", "private", "-a", app, "--json"];
    if let Some(token) = token {
        args.extend(["-t", token]);
    }
    let run = platform.aloft(&args);
    assert!(run.ok(), "{run}");
    let list: Vec<Value> = serde_json::from_str(&run.stdout).unwrap();
    list.iter()
        .map(|m| {
            (
                m["id"].as_str().unwrap().to_string(),
                m["private_ip"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

fn wait_started(platform: &Platform, app: &str, token: Option<&str>, second: &JoinedHost) {
    wait_until(
        &format!("{app}'s machines started"),
        Duration::from_secs(90),
        || {
            let states: Vec<Value> = private_ips(platform, app, token)
                .iter()
                .map(|(id, _)| {
                    let mut args = vec!["machine", "status", id, "-a", app, "--json"];
                    if let Some(token) = token {
                        args.extend(["-t", token]);
                    }
                    serde_json::from_str(&platform.aloft(&args).stdout).unwrap_or_default()
                })
                .collect();
            (!states.iter().all(|m: &Value| m["state"] == "started"))
                .then(|| format!("{states:?}\n--- joined host\n{}", second.agent_log()))
        },
    );
}

#[test]
fn machines_of_one_org_reach_each_other_across_hosts_over_the_mesh() {
    require_platform!();
    let mut second = JoinedHost::new();
    let api = format!("{}:4280", JoinedHost::CONTROL_IP);
    let control = format!("http://{api}");
    let platform = Platform::start_prepared(
        &[
            "--driver",
            "container",
            "--api-listen",
            &api,
            "--mesh-listen",
            CONTROL_MESH,
        ],
        |a| second.link_to(a),
    );
    let first_id = hosts(&platform)[0]["id"].as_str().unwrap().to_string();

    // `--join` refuses what only a local control plane uses, and a token it does not know.
    let conflicting = Run::from(
        Command::new(common::aloft_binary())
            .args(["server", "--join", &control, "--token", "x"])
            .args(["--database-url", "postgresql:///nowhere"])
            .output()
            .unwrap(),
    );
    assert!(!conflicting.ok(), "{conflicting}");
    assert!(
        conflicting.stderr.contains("--database-url") && conflicting.stderr.contains("--join"),
        "{conflicting}"
    );
    let token = platform.aloft(&["tokens", "create", "host"]);
    assert!(token.ok(), "{token}");
    let token = token.stdout.trim().to_string();
    second.start_joined_server(&control, "FlyV1 bogus", &[]);
    wait_until("a bogus token refused", Duration::from_secs(30), || {
        second
            .running()
            .then(|| format!("still running\n{}", second.agent_log()))
    });
    assert!(
        second.agent_log().contains("refused host"),
        "{}",
        second.agent_log()
    );

    second.start_joined_server(&control, &token, &[]);
    let mut second_id = String::new();
    let mut peers = Vec::new();
    wait_until(
        "both hosts up and in the mesh",
        Duration::from_secs(60),
        || {
            let list = hosts(&platform);
            if let Some(b) = list.iter().find(|h| h["id"] != first_id.as_str()) {
                second_id = b["id"].as_str().unwrap().to_string();
            }
            peers = mesh_peers(&platform);
            (list.iter().filter(|h| h["status"] == "up").count() != 2 || peers.len() != 2).then(
                || {
                    format!(
                        "{list:?}\n{peers:?}\n--- joined host\n{}",
                        second.agent_log()
                    )
                },
            )
        },
    );
    let second_peer = peers
        .iter()
        .find(|p| p["id"] == second_id.as_str())
        .unwrap();
    assert_eq!(second_peer["endpoint"], JoinedHost::MESH_LISTEN);
    let first_key = second_peer["public_key"].as_str().unwrap().to_string();
    assert_eq!(first_key.len(), 44, "{second_peer}");

    // Org A: two machines, one on each host.
    assert!(platform.aloft(&["apps", "create", "mesh-a"]).ok());
    let dir = common::busybox_app_with(platform.root.path(), "mesh-a", "");
    let deployed = platform.aloft_in(Some(&dir), &["deploy", "--ha=false"]);
    assert!(deployed.ok(), "{deployed}\n{}", platform.server_log());
    let scaled = platform.aloft(&["scale", "count", "2", "-a", "mesh-a", "-y"]);
    assert!(
        scaled.ok(),
        "{scaled}\n{}\n--- joined host\n{}",
        platform.server_log(),
        second.agent_log()
    );
    wait_started(&platform, "mesh-a", None, &second);
    let on_second = machines_on(&platform, &second_id);
    let a_machines = private_ips(&platform, "mesh-a", None);
    assert_eq!(a_machines.len(), 2, "{a_machines:?}");
    assert_eq!(
        on_second.len(),
        1,
        "one machine on each host: {on_second:?}"
    );
    let (a2, a2_ip) = a_machines
        .iter()
        .find(|(id, _)| on_second.contains(id))
        .cloned()
        .unwrap();
    let (a1, a1_ip) = a_machines
        .iter()
        .find(|(id, _)| !on_second.contains(id))
        .cloned()
        .unwrap();
    // Each host has its own 6PN prefix: the number the mesh lists it under.
    let host_of = |ip: &str| aloft_api::sixpn::parts(&ip.parse().unwrap()).unwrap().host;
    let number_of = |id: &str| peers.iter().find(|p| p["id"] == id).unwrap()["number"].as_u64();
    assert_eq!(
        Some(u64::from(host_of(&a1_ip))),
        number_of(&first_id),
        "{a1_ip} {peers:?}"
    );
    assert_eq!(
        Some(u64::from(host_of(&a2_ip))),
        number_of(&second_id),
        "{a2_ip} {peers:?}"
    );

    // Org B: one machine, on the second host (the first is cordoned meanwhile).
    assert!(platform.aloft(&["orgs", "create", "Bravo"]).ok());
    let created = platform.aloft(&["tokens", "create", "org", "-o", "bravo", "--json"]);
    assert!(created.ok(), "{created}");
    let bravo: Value = serde_json::from_str(&created.stdout).unwrap();
    let bravo = bravo["token"].as_str().unwrap().to_string();
    assert!(platform.aloft(&["hosts", "cordon", &first_id]).ok());
    let created = platform.aloft(&["apps", "create", "mesh-b", "-o", "bravo", "-t", &bravo]);
    assert!(created.ok(), "{created}");
    let dir = common::busybox_app_with(platform.root.path(), "mesh-b", "");
    let deployed = platform.aloft_in(Some(&dir), &["deploy", "--ha=false", "-t", &bravo]);
    assert!(deployed.ok(), "{deployed}\n{}", platform.server_log());
    assert!(platform.aloft(&["hosts", "uncordon", &first_id]).ok());
    wait_started(&platform, "mesh-b", Some(&bravo), &second);
    let b_machines = private_ips(&platform, "mesh-b", Some(&bravo));
    let (b2, _) = b_machines[0].clone();
    assert!(
        machines_on(&platform, &second_id).contains(&b2),
        "org B's machine is on the second host"
    );

    // Across hosts by address, both ways, and by name through the machine's own host's DNS.
    wait_until(
        "host 2 → host 1 by 6PN address",
        Duration::from_secs(30),
        || (!connects(&a2, &a1_ip, 8080)).then(|| second.agent_log()),
    );
    assert!(
        connects(&a1, &a2_ip, 8080),
        "host 1 → host 2 by 6PN address"
    );
    let by_name = inside(
        &a2,
        &format!("timeout 10 wget -qO- http://{a1}.vm.mesh-a.internal:8080/cgi-bin/id"),
    );
    assert!(
        by_name.stdout.contains(&format!("machine={a1}")),
        "{by_name}"
    );
    let looked_up = inside(&a2, "nslookup -type=aaaa mesh-a.internal");
    assert!(
        looked_up.stdout.contains(&a1_ip) && looked_up.stdout.contains(&a2_ip),
        "{looked_up}"
    );

    // Another org's machine on the second host does not reach org A's on the first, while
    // org A's machine beside it does.
    assert!(
        !connects(&b2, &a1_ip, 8080),
        "org B reached org A across hosts"
    );
    let refused = inside(
        &b2,
        &format!("timeout 10 wget -qO- http://{a1}.vm.mesh-a.internal:8080/cgi-bin/id; echo rc=$?"),
    );
    assert!(!refused.stdout.contains("machine="), "{refused}");
    assert!(connects(&a2, &a1_ip, 8080));

    // Bad mesh registrations: refused, naming the field, and nobody's peers change.
    let host_token = platform.host_token();
    let registration = |key: &str, endpoint: &str| {
        json!({
            "id": first_id, "region": "local", "agent_url": "http://127.0.0.1:4281",
            "mesh_public_key": key, "mesh_endpoint": endpoint,
        })
    };
    let before = mesh_peers(&platform);
    let (status, body) = control_api(
        &platform,
        &host_token,
        "POST",
        "/v1/hosts",
        Some(&registration("bm90IGEga2V5", CONTROL_MESH)),
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("mesh_public_key"), "{body}");
    let (status, body) = control_api(
        &platform,
        &host_token,
        "POST",
        "/v1/hosts",
        Some(&registration(&first_key, CONTROL_MESH)),
    );
    assert_eq!(status, 409, "another host's key: {body}");
    assert!(
        body.contains("mesh_public_key") && body.contains(&second_id),
        "{body}"
    );
    let (status, body) = control_api(
        &platform,
        &host_token,
        "POST",
        "/v1/hosts",
        Some(&registration(
            before
                .iter()
                .find(|p| p["id"] == first_id.as_str())
                .unwrap()["public_key"]
                .as_str()
                .unwrap(),
            "nowhere",
        )),
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("mesh_endpoint"), "{body}");
    assert_eq!(mesh_peers(&platform), before);
    // The peer list is the hosts' alone.
    let (status, body) = control_api(&platform, &bravo, "GET", "/v1/hosts/mesh", None);
    assert_eq!(status, 403, "an org token read the mesh's peers: {body}");
    assert!(connects(&a2, &a1_ip, 8080), "the mesh still carries org A");

    // kill -9 of the second host's process and a start again: a new key, listed, and
    // traffic over the mesh again (the machines kept running).
    second.kill_agent();
    second.start_joined_server(&control, &token, &[]);
    wait_until("the second host re-keyed", Duration::from_secs(60), || {
        let peers = mesh_peers(&platform);
        let key = peers
            .iter()
            .find(|p| p["id"] == second_id.as_str())
            .map(|p| p["public_key"].as_str().unwrap_or_default().to_string());
        (key.is_none() || key.as_deref() == Some(first_key.as_str()))
            .then(|| format!("{peers:?}\n--- joined host\n{}", second.agent_log()))
    });
    wait_until("traffic over the new key", Duration::from_secs(30), || {
        (!connects(&a2, &a1_ip, 8080)).then(|| second.agent_log())
    });
    assert!(
        connects(&a1, &a2_ip, 8080),
        "host 1 → host 2 after the re-key"
    );
    assert!(!connects(&b2, &a1_ip, 8080), "org B still kept out");
    let log = platform.server_log();
    assert!(log.contains("mesh peers changed"), "{log}");
    drop(second);
}

#[test]
fn an_agent_joins_the_mesh_and_leaves_it_when_its_host_goes_down() {
    require_platform!();
    let mut second = JoinedHost::new();
    let api = format!("{}:4280", JoinedHost::CONTROL_IP);
    let control = format!("http://{api}");
    // The first host's agent API listens on every address: on its backhaul address too.
    let platform = Platform::start_prepared(
        &[
            "--driver",
            "container",
            "--api-listen",
            &api,
            "--agent-listen",
            "[::]:4281",
            "--mesh-listen",
            CONTROL_MESH,
        ],
        |a| second.link_to(a),
    );
    let first_id = hosts(&platform)[0]["id"].as_str().unwrap().to_string();
    let token = platform.aloft(&["tokens", "create", "host"]);
    assert!(token.ok(), "{token}");
    let token = token.stdout.trim().to_string();
    second.start_agent_with(
        &control,
        token.trim(),
        "local",
        &["--mesh-listen", JoinedHost::MESH_LISTEN],
    );
    let mut peers = Vec::new();
    wait_until("both hosts in the mesh", Duration::from_secs(60), || {
        peers = mesh_peers(&platform);
        (peers.len() != 2).then(|| format!("{peers:?}\n--- agent\n{}", second.agent_log()))
    });
    let first_number = peers.iter().find(|p| p["id"] == first_id.as_str()).unwrap()["number"]
        .as_u64()
        .unwrap();
    let first_address = aloft_api::sixpn::host_address(first_number as u32);

    // TCP from the second host to the first host's backhaul address, over the mesh (the
    // veth between them carries no 6PN route): the first host's agent API answers there.
    let url = format!("http://[{first_address}]:4281/v1/machines");
    wait_until(
        "the first host's backhaul address over the mesh",
        Duration::from_secs(30),
        || {
            let run = Run::from(
                Command::new("nsenter")
                    .arg(format!("--net=/run/netns/{}", second.netns))
                    .args(["curl", "-s", "--max-time", "5", "-o", "/dev/null"])
                    .args(["-w", "%{http_code}", &url])
                    .output()
                    .unwrap(),
            );
            (run.stdout.trim() == "000" || run.stdout.trim().is_empty())
                .then(|| format!("{run}\n--- agent\n{}", second.agent_log()))
        },
    );

    // kill -9: once the host is down it leaves every peer list.
    second.kill_agent();
    wait_until(
        "the second host out of the mesh",
        Duration::from_secs(30),
        || {
            let peers = mesh_peers(&platform);
            (peers.len() != 1).then(|| format!("{peers:?}"))
        },
    );
    assert_eq!(mesh_peers(&platform)[0]["id"], first_id.as_str());
}

/// `aloft server` with a mesh (and `extra` arguments), and `aloft server --join` in a second
/// namespace: both up and in the mesh. Returns the platform, the second host, and the two hosts' ids and 6PN
/// host numbers.
fn two_hosts_in_the_mesh(extra: &[&str]) -> (Platform, JoinedHost, [(String, u32); 2], String) {
    let mut second = JoinedHost::new();
    let api = format!("{}:4280", JoinedHost::CONTROL_IP);
    let control = format!("http://{api}");
    let mut args = vec![
        "--driver",
        "container",
        "--api-listen",
        &api,
        "--mesh-listen",
        CONTROL_MESH,
    ];
    args.extend_from_slice(extra);
    let platform = Platform::start_prepared(&args, |a| second.link_to(a));
    let first_id = hosts(&platform)[0]["id"].as_str().unwrap().to_string();
    let token = platform.aloft(&["tokens", "create", "host"]);
    assert!(token.ok(), "{token}");
    let token = token.stdout.trim().to_string();
    second.start_joined_server(&control, &token, &[]);
    let mut peers = Vec::new();
    wait_until(
        "both hosts up and in the mesh",
        Duration::from_secs(60),
        || {
            let list = hosts(&platform);
            peers = mesh_peers(&platform);
            (list.iter().filter(|h| h["status"] == "up").count() != 2 || peers.len() != 2).then(
                || {
                    format!(
                        "{list:?}\n{peers:?}\n--- joined host\n{}",
                        second.agent_log()
                    )
                },
            )
        },
    );
    let numbered = |id: &str| {
        let peer = peers.iter().find(|p| p["id"] == id).unwrap();
        (id.to_string(), peer["number"].as_u64().unwrap() as u32)
    };
    let second_id = peers.iter().find(|p| p["id"] != first_id.as_str()).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let ids = [numbered(&first_id), numbered(&second_id)];
    (platform, second, ids, token)
}

/// `key=value` lines of a CGI `id` answer.
fn fields(body: &str) -> std::collections::HashMap<String, String> {
    body.lines()
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// `GET /cgi-bin/id` of `app` through the proxy (127.0.0.1:8080) of namespace `netns`.
fn through_proxy(netns: &str, app: &str, headers: &[&str]) -> Run {
    let mut command = Command::new("nsenter");
    command
        .arg(format!("--net=/run/netns/{netns}"))
        .args([
            "curl",
            "-s",
            "--max-time",
            "40",
            "-w",
            "\nstatus=%{http_code}",
        ])
        .args(["-H", &format!("Host: {app}.localhost")]);
    for header in headers {
        command.args(["-H", header]);
    }
    command.arg("http://127.0.0.1:8080/cgi-bin/id");
    Run::from(command.output().expect("running curl"))
}

#[test]
fn a_request_at_either_host_reaches_machines_on_both_over_the_backhaul() {
    require_platform!();
    let (platform, second, [(_, first_number), (second_id, second_number)], _) =
        two_hosts_in_the_mesh(&[]);
    assert!(platform.aloft(&["apps", "create", "edge-a"]).ok());
    let dir = common::busybox_app_with(
        platform.root.path(),
        "edge-a",
        concat!(
            "[http_service]\ninternal_port = 8080\nauto_start_machines = true\n",
            "auto_stop_machines = \"off\"\nmin_machines_running = 0\n",
            "[http_service.concurrency]\ntype = \"requests\"\nsoft_limit = 1\nhard_limit = 1\n",
        ),
    );
    let deployed = platform.aloft_in(Some(&dir), &["deploy", "--ha=false"]);
    assert!(deployed.ok(), "{deployed}\n{}", platform.server_log());
    let scaled = platform.aloft(&["scale", "count", "2", "-a", "edge-a", "-y"]);
    assert!(scaled.ok(), "{scaled}\n{}", second.agent_log());
    wait_started(&platform, "edge-a", None, &second);
    let on_second = machines_on(&platform, &second_id);
    let machines = private_ips(&platform, "edge-a", None);
    let (a2, a2_ip) = machines
        .iter()
        .find(|(id, _)| on_second.contains(id))
        .cloned()
        .expect("a machine on the second host");
    let (a1, _) = machines
        .iter()
        .find(|(id, _)| !on_second.contains(id))
        .cloned()
        .expect("a machine on the first host");
    let host_of = |ip: &str| aloft_api::sixpn::parts(&ip.parse().unwrap()).unwrap().host;
    assert_eq!(host_of(&a2_ip), second_number);

    // Each host's proxy reaches the machines of both hosts, with the same Fly headers.
    for netns in [platform.netns.clone(), second.netns.clone()] {
        let mut seen = std::collections::HashSet::new();
        wait_until(
            &format!("the proxy in {netns} reaching both machines"),
            Duration::from_secs(60),
            || {
                let run = through_proxy(&netns, "edge-a", &[]);
                let answer = fields(&run.stdout);
                if answer.get("status").map(String::as_str) == Some("200") {
                    assert_eq!(answer["fly-client-ip"], "127.0.0.1", "{run}");
                    assert_eq!(answer["fly-forwarded-port"], "8080", "{run}");
                    assert_eq!(answer["fly-region"], "local", "{run}");
                    assert!(answer["via"].contains("1.1 "), "{run}");
                    seen.insert(answer["machine"].clone());
                }
                (!(seen.contains(&a1) && seen.contains(&a2))).then(|| {
                    format!(
                        "seen {seen:?}; last: {run}\n{}\n--- joined host\n{}",
                        platform.server_log(),
                        second.agent_log()
                    )
                })
            },
        );
    }
    // A request for one machine, at the other host's proxy.
    let forced = through_proxy(
        &platform.netns,
        "edge-a",
        &[&format!("fly-force-instance-id: {a2}")],
    );
    assert_eq!(fields(&forced.stdout)["machine"], a2, "{forced}");

    // Autostart across hosts: the second host's machine, stopped, is started by a request
    // at the first host's proxy.
    let stopped = platform.aloft(&["machine", "stop", &a2, "-a", "edge-a"]);
    assert!(stopped.ok(), "{stopped}");
    wait_until("the machine stopped", Duration::from_secs(60), || {
        let state = common::machine_json(&platform, "edge-a", &a2)["state"].clone();
        (state != "stopped").then(|| format!("{state}"))
    });
    let autostarted = through_proxy(
        &platform.netns,
        "edge-a",
        &[&format!("fly-force-instance-id: {a2}")],
    );
    assert_eq!(
        fields(&autostarted.stdout)["machine"],
        a2,
        "{autostarted}\n{}\n--- joined host\n{}",
        platform.server_log(),
        second.agent_log()
    );
    assert_eq!(
        common::machine_json(&platform, "edge-a", &a2)["state"],
        "started"
    );

    // Flycast across hosts: from the second host's machine, the app's Flycast address
    // reaches the first host's machine too.
    let allocated = platform.aloft(&["ips", "allocate-v6", "--private", "-a", "edge-a"]);
    assert!(allocated.ok(), "{allocated}");
    let flycast = allocated
        .stdout
        .split_whitespace()
        .find(|word| word.starts_with("fdaa:"))
        .unwrap_or_else(|| panic!("no address in {allocated}"))
        .to_string();
    let mut seen = std::collections::HashSet::new();
    wait_until(
        "Flycast from the second host reaching the first host's machine",
        Duration::from_secs(60),
        || {
            let run = inside(
                &a2,
                &format!("timeout 10 wget -qO- http://[{flycast}]:80/cgi-bin/id"),
            );
            if let Some(machine) = fields(&run.stdout).get("machine") {
                seen.insert(machine.clone());
            }
            (!seen.contains(&a1)).then(|| format!("seen {seen:?}; last: {run}"))
        },
    );

    // Load balancing sees the other hosts' load: a slow request to one machine from one
    // host's proxy puts it at its hard limit (1) for the other host's proxy too, which then
    // sends every request to the other machine (by chance, 1 in 64 for six requests).
    for (slow_from, asked, busy, free) in [
        (&second.netns, &platform.netns, &a1, &a2),
        (&platform.netns, &second.netns, &a1, &a2),
    ] {
        let slow = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{slow_from}"))
            .args([
                "curl",
                "-s",
                "--max-time",
                "30",
                "-H",
                "Host: edge-a.localhost",
            ])
            .args(["-H", &format!("fly-force-instance-id: {busy}")])
            .arg("http://127.0.0.1:8080/cgi-bin/slow")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(1500));
        for _ in 0..6 {
            let run = through_proxy(asked, "edge-a", &[]);
            assert_eq!(
                fields(&run.stdout).get("machine"),
                Some(free),
                "the proxy in {asked} sent a request to {busy}, busy from {slow_from}: {run}"
            );
        }
        let slow = slow.wait_with_output().unwrap();
        assert!(
            String::from_utf8_lossy(&slow.stdout).contains(&format!("machine={busy}")),
            "{slow:?}"
        );
    }

    // Only hosts speak to the backhaul: not a machine, and not a process on the worker
    // itself (it reaches the listener over `lo`, not the mesh). Another host does reach
    // it, and a preamble it does not understand is refused.
    let first_backhaul = aloft_api::sixpn::host_address(first_number).to_string();
    let second_backhaul = aloft_api::sixpn::host_address(second_number).to_string();
    assert!(
        !connects(&a2, &first_backhaul, 4290),
        "a machine reached the backhaul"
    );
    assert!(
        !connects(&a1, &second_backhaul, 4290),
        "a machine reached the backhaul"
    );
    let url = format!("http://[{first_backhaul}]:4290/");
    let local = platform.curl(&["--http0.9", &url]);
    assert!(
        !local.ok() && local.stdout.is_empty(),
        "a local process got an answer from the backhaul: {local}"
    );
    let from_host = Run::from(
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", second.netns))
            .args(["curl", "-s", "--max-time", "10", "--http0.9", &url])
            .output()
            .unwrap(),
    );
    assert_eq!(
        from_host.stdout, "\u{5}",
        "the second host is answered: its preamble is malformed: {from_host}"
    );
    assert!(
        through_proxy(
            &platform.netns,
            "edge-a",
            &[&format!("fly-force-instance-id: {a2}")]
        )
        .stdout
        .contains(&format!("machine={a2}")),
        "the backhaul still serves"
    );

    // Host loss: kill -9 of the second host's process (its machines keep running, out of
    // reach) under a steady stream of requests at the first host's proxy. Within 5 s its
    // machine leaves routing: every request goes to the first host's machine and succeeds
    // at once, and the lost machine shows `host_status: unreachable`.
    let killed_at = Instant::now();
    let mut second = second;
    second.kill_agent();
    let mut late_answers = Vec::new();
    while killed_at.elapsed() < Duration::from_secs(12) {
        let sent_at = killed_at.elapsed();
        let run = through_proxy(&platform.netns, "edge-a", &[]);
        if sent_at >= Duration::from_secs(5) {
            late_answers.push((sent_at, fields(&run.stdout)));
        }
    }
    // A machine still routed to would hold a request for the whole connect timeout (5 s)
    // about every other time: a handful of answers at most, not dozens.
    assert!(late_answers.len() >= 10, "{late_answers:?}");
    assert!(
        platform
            .server_log()
            .contains("worker host does not answer: its machines leave routing"),
        "{}",
        platform.server_log()
    );
    for (sent_at, answer) in &late_answers {
        assert_eq!(
            (answer.get("status"), answer.get("machine")),
            (Some(&"200".to_string()), Some(&a1)),
            "a request {sent_at:?} after the second host was lost: {late_answers:?}\n{}",
            platform.server_log()
        );
    }
    let lost = common::machine_json(&platform, "edge-a", &a2);
    assert_eq!(lost["host_status"], "unreachable", "{lost}");
    drop(second);
}

#[test]
fn a_lost_hosts_machines_without_volumes_are_replaced_on_healthy_hosts() {
    require_platform!();
    let (platform, mut second, [(first_id, _), (second_id, _)], token) =
        two_hosts_in_the_mesh(&["--reschedule-lost-after", "2s"]);
    // Everything on the second host: an app's machine, and another app's machine with a
    // volume.
    assert!(platform.aloft(&["hosts", "cordon", &first_id]).ok());
    assert!(platform.aloft(&["apps", "create", "lost-a"]).ok());
    let dir = common::busybox_app_with(
        platform.root.path(),
        "lost-a",
        "[http_service]\ninternal_port = 8080\nauto_stop_machines = \"off\"\n",
    );
    let deployed = platform.aloft_in(Some(&dir), &["deploy", "--ha=false"]);
    assert!(deployed.ok(), "{deployed}\n{}", second.agent_log());
    assert!(platform.aloft(&["apps", "create", "lost-v"]).ok());
    let created = platform.aloft(&[
        "volumes", "create", "data", "-a", "lost-v", "--size", "1", "-y",
    ]);
    assert!(created.ok(), "{created}");
    let dir = common::busybox_app_with(
        platform.root.path(),
        "lost-v",
        "[mounts]\nsource = \"data\"\ndestination = \"/data\"\n",
    );
    let deployed = platform.aloft_in(Some(&dir), &["deploy", "--ha=false"]);
    assert!(deployed.ok(), "{deployed}\n{}", second.agent_log());
    assert!(platform.aloft(&["hosts", "uncordon", &first_id]).ok());
    wait_started(&platform, "lost-a", None, &second);
    let on_second = machines_on(&platform, &second_id);
    let [(lost, _)] = private_ips(&platform, "lost-a", None).try_into().unwrap();
    let [(pinned, _)] = private_ips(&platform, "lost-v", None).try_into().unwrap();
    assert!(
        on_second.contains(&lost) && on_second.contains(&pinned),
        "{on_second:?}"
    );

    // kill -9 of the second host: once it has been down for 2 s, lost-a's machine is
    // replaced by a new one on the first host; lost-v's stays with its volume.
    second.kill_agent();
    let mut replacement = String::new();
    wait_until(
        "lost-a's machine replaced on the first host",
        Duration::from_secs(90),
        || {
            let machines = private_ips(&platform, "lost-a", None);
            if let Some((id, _)) = machines.iter().find(|(id, _)| *id != lost) {
                replacement = id.clone();
            }
            let state = |id: &str| common::machine_json(&platform, "lost-a", id)["state"].clone();
            (replacement.is_empty()
                || state(&replacement) != "started"
                || state(&lost) != "destroyed")
                .then(|| format!("{machines:?}\n{}", platform.server_log()))
        },
    );
    assert!(machines_on(&platform, &first_id).contains(&replacement));
    let kept = common::machine_json(&platform, "lost-v", &pinned);
    assert_ne!(kept["state"], "destroyed", "{kept}");
    assert_eq!(kept["host_status"], "unreachable", "{kept}");
    let events = platform.aloft(&["machine", "status", &lost, "-a", "lost-a", "--json"]);
    assert!(
        events.stdout.contains("was lost; replaced by machine"),
        "{events}"
    );
    wait_until(
        "the proxy serving the replacement",
        Duration::from_secs(30),
        || {
            let run = through_proxy(&platform.netns, "lost-a", &[]);
            (fields(&run.stdout).get("machine") != Some(&replacement)).then(|| run.to_string())
        },
    );

    // The second host comes back: what it still runs of the replaced machine is destroyed
    // there; the machine with the volume is its own again.
    let stale = PathBuf::from(format!("/run/netns/aloft-{lost}"));
    assert!(
        stale.exists(),
        "the lost machine still runs on its host while it is away"
    );
    let control = format!("http://{}:4280", JoinedHost::CONTROL_IP);
    second.start_joined_server(&control, &token, &[]);
    wait_until(
        "the replaced machine gone from the second host",
        Duration::from_secs(60),
        || stale.exists().then(|| second.agent_log()),
    );
    wait_until("lost-v's host back", Duration::from_secs(60), || {
        let kept = common::machine_json(&platform, "lost-v", &pinned);
        (kept["host_status"] != "ok").then(|| kept.to_string())
    });
    drop(second);
}
