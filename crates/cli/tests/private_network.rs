//! Private networking end to end: machines of two orgs and of two networks of one org,
//! each running a small busybox image, talk (or fail to talk) over real TCP from inside
//! the machines; names resolve with busybox `nslookup` inside machines and `dig` in their
//! network namespaces; a frontend calls `backend.internal`; Flycast goes through the
//! proxy; `aloft dig`, `aloft ips` and `aloft proxy` work from the host.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Platform, Run};
use serde_json::Value;

const APPLETS: &[&str] = &[
    "sh", "httpd", "wget", "nc", "nslookup", "cat", "echo", "timeout", "sleep", "env",
];

/// An app dir whose image is busybox serving `/www` on port 8080, with CGI scripts: `id`
/// (this machine and app) and `call?<url>` (fetches the URL from inside the machine).
fn busybox_app(platform: &Platform, name: &str) -> PathBuf {
    let dir = platform.root.path().join(format!("app-{name}"));
    let bin = dir.join("rootfs/bin");
    let cgi = dir.join("rootfs/www/cgi-bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(&cgi).unwrap();
    std::fs::copy("/bin/busybox", bin.join("busybox"))
        .expect("busybox-static is installed (scripts/setup.sh)");
    for applet in APPLETS {
        std::os::unix::fs::symlink("busybox", bin.join(applet)).unwrap();
    }
    let scripts = [
        ("id", "echo \"machine=$FLY_MACHINE_ID app=$FLY_APP_NAME\""),
        ("call", "timeout 10 wget -qO- \"http://$QUERY_STRING\""),
    ];
    for (script, body) in scripts {
        let path = cgi.join(script);
        std::fs::write(
            &path,
            format!("#!/bin/sh\necho \"Content-Type: text/plain\"\necho\n{body}\n"),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::write(dir.join("rootfs/www/index.html"), "hello\n").unwrap();
    std::fs::write(dir.join("Dockerfile"), "FROM scratch\nCOPY rootfs/ /\nCMD [\"/bin/httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\n").unwrap();
    let toml = format!(
        "app = \"{name}\"\nprimary_region = \"local\"\n\n[http_service]\n  internal_port = 8080\n  auto_stop_machines = \"off\"\n  auto_start_machines = true\n  min_machines_running = 0\n"
    );
    std::fs::write(dir.join("fly.toml"), toml).unwrap();
    dir
}

/// A second organization, the operator a member, with an org token, written into the
/// server's database with a
/// plain root key, as tokens were stored before their keys were sealed: restart the
/// server before using it, and the start seals it.
fn create_org(platform: &Platform, slug: &str) -> String {
    let db = rusqlite::Connection::open(platform.data_dir().join("control.db")).unwrap();
    db.busy_timeout(Duration::from_secs(5)).unwrap();
    let now = "2026-01-01T00:00:00Z";
    let org_id = format!("org{slug}");
    db.execute(
        "INSERT INTO orgs(id, slug, name, created_at) VALUES (?1, ?2, ?2, ?3)",
        (&org_id, slug, now),
    )
    .unwrap();
    // The operator is a member, as `aloft orgs create` makes its creator.
    db.execute(
        "INSERT INTO token_orgs(token_id, org_id) SELECT value, ?1 FROM settings WHERE key = 'admin_token_id'",
        [&org_id],
    )
    .unwrap();
    let token_id = format!("tok{slug}");
    let key: Vec<u8> = (0..32u8)
        .map(|b| b.wrapping_mul(7).wrapping_add(slug.len() as u8))
        .collect();
    db.execute(
        "INSERT INTO tokens(id, org_id, kind, name, key, created_at, revoked) VALUES (?1, ?2, 'org', 'test', ?3, ?4, 0)",
        (&token_id, &org_id, &key, now),
    )
    .unwrap();
    aloft_api::token::Token::mint(&token_id, &key, Vec::new()).encode()
}

struct MachineInfo {
    id: String,
    ip: String,
}

fn machines(platform: &Platform, app: &str, token: Option<&str>) -> Vec<MachineInfo> {
    let mut args = vec!["ips", "private", "-a", app, "--json"];
    if let Some(token) = token {
        args.extend(["-t", token]);
    }
    let run = platform.aloft(&args);
    assert!(run.ok(), "{run}");
    let list: Vec<Value> = serde_json::from_str(&run.stdout).unwrap();
    list.iter()
        .map(|m| MachineInfo {
            id: m["id"].as_str().unwrap().to_string(),
            ip: m["private_ip"].as_str().unwrap_or_default().to_string(),
        })
        .collect()
}

fn deploy(platform: &Platform, name: &str, token: Option<&str>, create: &[&str]) -> MachineInfo {
    let mut args: Vec<&str> = vec!["apps", "create", name];
    args.extend(create);
    if let Some(token) = token {
        args.extend(["-t", token]);
    }
    let created = platform.aloft(&args);
    assert!(created.ok(), "{created}");
    let dir = busybox_app(platform, name);
    let mut args = vec!["deploy", "--ha=false"];
    if let Some(token) = token {
        args.extend(["-t", token]);
    }
    let run = platform.aloft_in(Some(&dir), &args);
    assert!(run.ok(), "{run}\n{}", platform.server_log());
    let mut list = machines(platform, name, token);
    assert_eq!(list.len(), 1, "one machine for {name}");
    list.remove(0)
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// The machine's httpd, found by its network namespace.
fn machine_pid(id: &str) -> i32 {
    let netns = PathBuf::from(format!("/run/netns/aloft-{id}"));
    let deadline = Instant::now() + Duration::from_secs(10);
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

/// The environment of the machine's httpd (what init gave the entrypoint).
fn machine_env(id: &str, name: &str) -> String {
    let environ = std::fs::read(format!("/proc/{}/environ", machine_pid(id))).unwrap_or_default();
    environ
        .split(|b| *b == 0)
        .filter_map(|pair| std::str::from_utf8(pair).ok())
        .find_map(|pair| pair.strip_prefix(&format!("{name}=")).map(str::to_string))
        .unwrap_or_default()
}

fn output(command: &mut Command) -> Run {
    let out = command
        .stdin(Stdio::null())
        .output()
        .expect("running a command");
    Run {
        status: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A shell command inside the machine (its namespaces, its root filesystem, busybox).
fn inside(id: &str, script: &str) -> Run {
    let pid = machine_pid(id);
    output(Command::new("nsenter").args(["-t", &pid.to_string(), "-a", "/bin/sh", "-c", script]))
}

/// A host program in the machine's network namespace (dig).
fn in_machine_netns(id: &str, program: &str, args: &[&str]) -> Run {
    output(
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/aloft-{id}"))
            .arg(program)
            .args(args),
    )
}

/// Whether a TCP connection from inside the machine to `host port` is accepted.
fn connects(id: &str, host: &str, port: u16) -> bool {
    let run = inside(
        id,
        &format!("echo | timeout 10 nc -w 3 {host} {port} >/dev/null 2>&1; echo rc=$?"),
    );
    run.stdout.contains("rc=0")
}

fn dig_short(id: &str, kind: &str, name: &str) -> String {
    let run = in_machine_netns(
        id,
        "dig",
        &["+short", "+time=3", "+tries=2", "@fdaa::3", kind, name],
    );
    assert!(run.ok(), "{run}");
    run.stdout.trim().to_string()
}

fn have_dig() -> bool {
    Command::new("sh")
        .args(["-c", "command -v dig"])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn in_netns(platform: &Platform, program: &str, args: &[&str]) -> Run {
    output(
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", platform.netns))
            .arg(program)
            .args(args),
    )
}

/// A network namespace standing for the outside world, linked to the platform's.
struct World {
    netns: String,
    server: std::process::Child,
}

impl World {
    fn start(platform: &Platform) -> Self {
        let netns = format!("{}-w", platform.netns);
        let ip = |args: &[&str]| {
            assert!(
                Command::new("ip").args(args).status().unwrap().success(),
                "ip {args:?}"
            )
        };
        ip(&["netns", "add", &netns]);
        ip(&[
            "link",
            "add",
            "wan0",
            "netns",
            &platform.netns,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &netns,
        ]);
        ip(&[
            "-n",
            &platform.netns,
            "addr",
            "add",
            "198.18.0.1/30",
            "dev",
            "wan0",
        ]);
        ip(&["-n", &platform.netns, "link", "set", "wan0", "up"]);
        ip(&["-n", &netns, "addr", "add", "198.18.0.2/30", "dev", "eth0"]);
        ip(&["-n", &netns, "link", "set", "eth0", "up"]);
        let www = platform.root.path().join("world-www");
        std::fs::create_dir_all(&www).unwrap();
        std::fs::write(www.join("hello.txt"), "hello from the outside world\n").unwrap();
        // No route back to the machines' private IPv4: only NATed connections get answers.
        let server = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{netns}"))
            .args(["busybox", "httpd", "-f", "-p", "198.18.0.2:9000", "-h"])
            .arg(&www)
            .spawn()
            .unwrap();
        Self { netns, server }
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
    }
}

#[test]
fn machines_reach_their_own_network_only() {
    require_platform!();
    if !have_dig() {
        aloft_testkit::skip("needs `dig` (scripts/setup.sh --test installs dnsutils)");
        return;
    }
    // The API listens on every IPv4 address and the agent on every address, so a refused
    // connection below is the packet filter's doing, not a missing listener.
    let mut platform = Platform::start_with(&[
        "--api-listen",
        "0.0.0.0:4280",
        "--agent-listen",
        "[::]:4281",
    ]);
    let other_token = create_org(&platform, "other");
    platform.restart();

    let backend = deploy(&platform, "backend", None, &[]);
    let frontend = deploy(&platform, "frontend", None, &[]);
    let bluey = deploy(&platform, "bluey", None, &["--network", "blue"]);
    let outsider = deploy(&platform, "outsider", Some(&other_token), &["-o", "other"]);

    // Addresses: one /48 per network, the machine's own address in its environment,
    // /etc/hosts and resolver.
    let prefix = |ip: &str| ip.split(':').take(3).collect::<Vec<_>>().join(":");
    assert!(backend.ip.starts_with("fdaa:"), "{}", backend.ip);
    assert_eq!(prefix(&backend.ip), prefix(&frontend.ip), "one org network");
    assert_ne!(
        prefix(&backend.ip),
        prefix(&bluey.ip),
        "a custom network is another /48"
    );
    assert_ne!(
        prefix(&backend.ip),
        prefix(&outsider.ip),
        "another org is another /48"
    );
    assert_eq!(machine_env(&backend.id, "FLY_PRIVATE_IP"), backend.ip);
    let env = inside(&backend.id, "cat /etc/hosts /etc/resolv.conf");
    assert!(
        env.stdout
            .contains(&format!("{}\tfly-local-6pn", backend.ip)),
        "{env}"
    );
    assert!(env.stdout.contains("nameserver fdaa::3"), "{env}");

    // Names, from inside machines: busybox nslookup, and dig in the machine's netns.
    let looked_up = inside(&frontend.id, "nslookup -type=aaaa backend.internal");
    assert!(looked_up.stdout.contains(&backend.ip), "{looked_up}");
    assert_eq!(
        dig_short(&frontend.id, "AAAA", "backend.internal"),
        backend.ip
    );
    assert_eq!(
        dig_short(
            &frontend.id,
            "AAAA",
            &format!("{}.vm.backend.internal", backend.id)
        ),
        backend.ip
    );
    assert_eq!(
        dig_short(&frontend.id, "AAAA", "local.backend.internal"),
        backend.ip
    );
    assert_eq!(
        dig_short(&frontend.id, "AAAA", "app.process.backend.internal"),
        backend.ip
    );
    assert_eq!(
        dig_short(&frontend.id, "AAAA", "top1.nearest.of.backend.internal"),
        backend.ip
    );
    assert_eq!(
        dig_short(&frontend.id, "TXT", "vms.backend.internal"),
        format!("\"{} local\"", backend.id)
    );
    assert_eq!(
        dig_short(&frontend.id, "TXT", "regions.backend.internal"),
        "\"local\""
    );
    assert_eq!(
        dig_short(&frontend.id, "TXT", "_apps.internal"),
        "\"backend,frontend\""
    );
    let instances = dig_short(&frontend.id, "TXT", "_instances.internal");
    assert!(
        instances.contains(&format!(
            "instance={},app=backend,ip={},region=local",
            backend.id, backend.ip
        )),
        "{instances}"
    );
    assert!(
        !instances.contains(&bluey.id) && !instances.contains(&outsider.id),
        "{instances}"
    );
    assert_eq!(dig_short(&bluey.id, "TXT", "_apps.internal"), "\"bluey\"");
    assert_eq!(
        dig_short(&outsider.id, "TXT", "_apps.internal"),
        "\"outsider\""
    );
    assert_eq!(
        dig_short(&outsider.id, "AAAA", "backend.internal"),
        "",
        "another org's names do not resolve"
    );
    assert_eq!(
        dig_short(&bluey.id, "AAAA", "backend.internal"),
        "",
        "another network's names do not resolve"
    );
    let nx = in_machine_netns(
        &outsider.id,
        "dig",
        &["+time=3", "@fdaa::3", "AAAA", "backend.internal"],
    );
    assert!(nx.stdout.contains("status: NXDOMAIN"), "{nx}");

    // The two-app example: the frontend calls backend.internal (through the public proxy).
    let url = "backend.internal:8080/cgi-bin/id";
    let called = platform.curl(&[
        "-H",
        "Host: frontend.localhost",
        &format!("http://127.0.0.1:8080/cgi-bin/call?{url}"),
    ]);
    assert_eq!(
        called.stdout.trim(),
        format!("machine={} app=backend", backend.id),
        "{called}"
    );

    // TCP from inside machines: the own network over 6PN yes; other networks, other
    // machines' private IPv4 and the host's control ports no.
    let backend_v6 = backend.ip.clone();
    assert!(
        connects(&frontend.id, &backend_v6, 8080),
        "same network over 6PN"
    );
    assert!(
        !connects(&outsider.id, &backend_v6, 8080),
        "another org's machine"
    );
    assert!(
        !connects(&bluey.id, &backend_v6, 8080),
        "another network of the same org"
    );
    assert!(
        !connects(&backend.id, &outsider.ip, 8080),
        "and the other way"
    );
    let backend_v4 = machine_env(&backend.id, "FLY_PRIVATE_IPV4");
    let gateway = {
        let mut octets: Vec<u8> = backend_v4.split('.').map(|o| o.parse().unwrap()).collect();
        octets[3] -= 1;
        octets
            .iter()
            .map(u8::to_string)
            .collect::<Vec<_>>()
            .join(".")
    };
    let host_sees = platform.curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &format!("http://{backend_v4}:8080/"),
    ]);
    assert_eq!(
        host_sees.stdout, "200",
        "the host (its proxy) reaches the private IPv4: {host_sees}"
    );
    assert!(
        !connects(&frontend.id, &backend_v4, 8080),
        "another machine's private IPv4"
    );
    let api_there = platform.curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &format!("http://{gateway}:4280/v1/apps"),
    ]);
    assert_eq!(
        api_there.stdout, "401",
        "the API listens on the gateway address: {api_there}"
    );
    assert!(
        !connects(&backend.id, &gateway, 4280),
        "the host's API port"
    );
    assert!(
        !connects(&backend.id, &gateway, 4281),
        "the host's agent port"
    );
    let agent_there = platform.curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "http://[fdaa::3]:4281/v1/machines",
    ]);
    assert_eq!(
        agent_there.stdout, "401",
        "the agent listens on fdaa::3: {agent_there}"
    );
    assert!(
        !connects(&backend.id, "fdaa::3", 4281),
        "the host's agent port over 6PN"
    );

    // The outside world over NATed IPv4.
    let world = World::start(&platform);
    let fetched = inside(
        &backend.id,
        "timeout 10 wget -qO- http://198.18.0.2:9000/hello.txt",
    );
    assert_eq!(
        fetched.stdout.trim(),
        "hello from the outside world",
        "{fetched}"
    );
    drop(world);

    // Flycast: a private address routed through the proxy, for the app's own network.
    let allocated = platform.aloft(&["ips", "allocate-v6", "--private", "-a", "backend"]);
    assert!(allocated.ok(), "{allocated}");
    let flycast = allocated
        .stdout
        .lines()
        .nth(1)
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or_default()
        .to_string();
    assert!(
        flycast.starts_with(&format!("{}::", prefix(&backend.ip))),
        "{allocated}"
    );
    let listed = platform.aloft(&["ips", "list", "-a", "backend"]);
    assert!(
        listed.stdout.contains(&flycast) && listed.stdout.contains("private"),
        "{listed}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while dig_short(&frontend.id, "AAAA", "backend.flycast") != flycast && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(dig_short(&frontend.id, "AAAA", "backend.flycast"), flycast);
    let via_flycast = inside(
        &frontend.id,
        "timeout 10 wget -qO- http://backend.flycast:80/cgi-bin/id",
    );
    assert_eq!(
        via_flycast.stdout.trim(),
        format!("machine={} app=backend", backend.id),
        "{via_flycast}"
    );
    assert!(
        !connects(&outsider.id, &flycast, 80),
        "another org cannot reach the Flycast address"
    );
    assert_eq!(dig_short(&outsider.id, "AAAA", "backend.flycast"), "");
    // ... until the app exposes one in that org's network.
    let exposed = platform.aloft(&[
        "ips",
        "allocate-v6",
        "--private",
        "--org",
        "other",
        "-a",
        "backend",
    ]);
    assert!(exposed.ok(), "{exposed}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while dig_short(&outsider.id, "AAAA", "backend.flycast").is_empty() && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    let exposed_ip = dig_short(&outsider.id, "AAAA", "backend.flycast");
    assert_eq!(
        prefix(&exposed_ip),
        prefix(&outsider.ip),
        "in the other org's network"
    );
    let across = inside(
        &outsider.id,
        "timeout 10 wget -qO- http://backend.flycast:80/cgi-bin/id",
    );
    assert_eq!(
        across.stdout.trim(),
        format!("machine={} app=backend", backend.id),
        "{across}"
    );
    let released = platform.aloft(&["ips", "release", &exposed_ip, "-a", "backend"]);
    assert!(
        released.ok() && released.stdout.contains("Released"),
        "{released}"
    );

    // From the host: aloft dig asks as a machine of the app would; aloft proxy forwards.
    let dug = platform.aloft(&[
        "dig",
        "aaaa",
        "backend.internal",
        "-a",
        "frontend",
        "--short",
    ]);
    assert_eq!(dug.stdout.trim(), backend.ip, "{dug}");
    let dug = platform.aloft(&[
        "dig",
        "txt",
        "_apps.internal",
        "-a",
        "outsider",
        "-t",
        &other_token,
        "--short",
    ]);
    assert_eq!(dug.stdout.trim(), "\"outsider\"", "{dug}");
    let full = platform.aloft(&[
        "dig",
        "backend.internal",
        "-a",
        "outsider",
        "-t",
        &other_token,
    ]);
    assert!(full.stdout.contains("status: NXDOMAIN"), "{full}");
    let mut proxy = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", platform.netns))
        .arg(common::aloft_binary())
        .args(["proxy", "15080:8080", "backend.internal", "-a", "frontend"])
        .env("HOME", platform.home())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut through = in_netns(
        &platform,
        "curl",
        &["-s", "--max-time", "5", "http://127.0.0.1:15080/cgi-bin/id"],
    );
    while !through.stdout.contains("machine=") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        through = in_netns(
            &platform,
            "curl",
            &["-s", "--max-time", "5", "http://127.0.0.1:15080/cgi-bin/id"],
        );
    }
    let _ = proxy.kill();
    let _ = proxy.wait();
    assert_eq!(
        through.stdout.trim(),
        format!("machine={} app=backend", backend.id),
        "{through}"
    );

    // A stopped machine leaves the started names and stays in the `all` ones; Flycast
    // starts it again (the proxy's autostart).
    let token = platform.aloft(&["auth", "token"]).stdout.trim().to_string();
    let stop_url = format!(
        "http://127.0.0.1:4280/v1/apps/backend/machines/{}/stop",
        backend.id
    );
    let stopped = platform.curl(&[
        "-X",
        "POST",
        "-H",
        &format!("Authorization: Bearer {token}"),
        "-d",
        "{}",
        &stop_url,
    ]);
    assert!(stopped.ok(), "{stopped}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !dig_short(&frontend.id, "AAAA", "backend.internal").is_empty()
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        dig_short(&frontend.id, "AAAA", "backend.internal"),
        "",
        "stopped machines are not in AAAA answers"
    );
    assert_eq!(
        dig_short(&frontend.id, "TXT", "vms.backend.internal"),
        "\"\""
    );
    assert_eq!(
        dig_short(&frontend.id, "TXT", "all.vms.backend.internal"),
        format!("\"{} local\"", backend.id)
    );
    let woken = inside(
        &frontend.id,
        "timeout 20 wget -qO- http://backend.flycast:80/cgi-bin/id",
    );
    assert_eq!(
        woken.stdout.trim(),
        format!("machine={} app=backend", backend.id),
        "{woken}"
    );
}
