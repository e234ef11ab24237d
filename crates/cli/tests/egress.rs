//! What a machine reaches outside its host, end to end: `aloft server` in a namespace the
//! test creates, a busybox machine, an "internet" namespace behind the platform's default
//! route (203.0.113.10 and 2001:db8::10, TCP and DNS over UDP) and a "LAN" namespace with
//! a fake metadata server (169.254.169.254) and two 10.x addresses, one of them allowed
//! with `--allow-egress`. The host's ruleset is saved and reloaded first, as hosts do.

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{Platform, Run};

const WORLD_V4: &str = "203.0.113.10";
const WORLD_V6: &str = "2001:db8::10";
const METADATA: &str = "169.254.169.254";
const LAN_ALLOWED: &str = "10.88.0.2";
const LAN_CLOSED: &str = "10.88.0.3";
/// What the fake DNS servers answer for any A question.
const DNS_ANSWER: [u8; 4] = [192, 0, 2, 53];

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("running ip");
    assert!(status.success(), "ip {args:?}");
}

/// A network namespace linked to the platform's by a veth pair, with TCP and DNS
/// servers on its addresses that say which namespace answered.
struct Neighbour {
    netns: String,
    stop: Arc<AtomicBool>,
    server: Option<std::thread::JoinHandle<()>>,
}

impl Neighbour {
    /// `platform_side`/`own_side`: the addresses of the link's two ends; `served`: the
    /// addresses (on `lo`) the servers listen on.
    fn start(
        platform: &Platform,
        name: &str,
        platform_side: &[&str],
        own_side: &[&str],
        served: &[&str],
    ) -> Self {
        let netns = format!("{}-{name}", platform.netns);
        let host_end = format!("{name}0");
        ip(&["netns", "add", &netns]);
        ip(&[
            "link",
            "add",
            &host_end,
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
        // IPv6 addresses without duplicate address detection: usable at once.
        let add = |netns: &str, cidr: &str, device: &str| {
            let mut args = vec!["-n", netns, "addr", "add", cidr, "dev", device];
            if cidr.contains(':') {
                args.push("nodad");
            }
            ip(&args);
        };
        for cidr in platform_side {
            add(&platform.netns, cidr, &host_end);
        }
        for cidr in own_side {
            add(&netns, cidr, "eth0");
        }
        for address in served {
            let prefix = if address.contains(':') { 128 } else { 32 };
            add(&netns, &format!("{address}/{prefix}"), "lo");
        }
        ip(&["-n", &platform.netns, "link", "set", &host_end, "up"]);
        ip(&["-n", &netns, "link", "set", "eth0", "up"]);
        ip(&["-n", &netns, "link", "set", "lo", "up"]);
        let stop = Arc::new(AtomicBool::new(false));
        let server = {
            let (netns, stop, name) = (netns.clone(), stop.clone(), name.to_string());
            let served: Vec<String> = served.iter().map(|a| a.to_string()).collect();
            std::thread::spawn(move || serve(&netns, &name, &served, &stop))
        };
        std::thread::sleep(Duration::from_millis(200));
        Self {
            netns,
            stop,
            server: Some(server),
        }
    }

    fn netns_run(&self, args: &[&str]) {
        let status = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.netns))
            .args(args)
            .status()
            .expect("nsenter");
        assert!(status.success(), "{args:?} in {}", self.netns);
    }
}

impl Drop for Neighbour {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(server) = self.server.take() {
            let _ = server.join();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
    }
}

/// In this thread's own network namespace `netns`: on port 80 of each address, TCP that
/// answers `tcp from <name>`; on port 53, DNS over UDP that answers every A question with
/// [`DNS_ANSWER`].
fn serve(netns: &str, name: &str, addresses: &[String], stop: &AtomicBool) {
    let file = std::fs::File::open(format!("/run/netns/{netns}")).expect("the namespace");
    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
    let mut tcp = Vec::new();
    let mut udp = Vec::new();
    for address in addresses {
        let ip: std::net::IpAddr = address.parse().expect("an address");
        let listener = TcpListener::bind(SocketAddr::new(ip, 80)).expect("binding TCP");
        listener.set_nonblocking(true).unwrap();
        tcp.push(listener);
        let socket = UdpSocket::bind(SocketAddr::new(ip, 53)).expect("binding UDP");
        socket.set_nonblocking(true).unwrap();
        udp.push(socket);
    }
    let reply = format!("tcp from {name}\n");
    while !stop.load(Ordering::Relaxed) {
        for listener in &tcp {
            if let Ok((mut stream, _)) = listener.accept() {
                let _ = stream.set_nonblocking(false);
                let _ = stream.write_all(reply.as_bytes());
            }
        }
        for socket in &udp {
            let mut query = [0u8; 512];
            if let Ok((len, from)) = socket.recv_from(&mut query)
                && let Some(answer) = dns_answer(&query[..len])
            {
                let _ = socket.send_to(&answer, from);
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The answer to one DNS question: [`DNS_ANSWER`] for an A question, no records otherwise.
fn dns_answer(query: &[u8]) -> Option<Vec<u8>> {
    let mut end = 12;
    while *query.get(end)? != 0 {
        end += 1 + usize::from(query[end]);
    }
    let question_end = end + 5;
    let question = query.get(12..question_end)?;
    let is_a = query.get(end + 1..end + 3)? == [0, 1];
    let mut answer = vec![
        query[0],
        query[1],
        0x81,
        0x80,
        0,
        1,
        0,
        u8::from(is_a),
        0,
        0,
        0,
        0,
    ];
    answer.extend_from_slice(question);
    if is_a {
        answer.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
        answer.extend_from_slice(&DNS_ANSWER);
    }
    Some(answer)
}

/// An app whose image is busybox running httpd, with the network tools.
fn busybox_app(platform: &Platform, name: &str) -> PathBuf {
    let dir = platform.root.path().join(format!("app-{name}"));
    let bin = dir.join("rootfs/bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(dir.join("rootfs/www")).unwrap();
    std::fs::copy("/bin/busybox", bin.join("busybox"))
        .expect("busybox-static is installed (scripts/setup.sh)");
    for applet in [
        "sh", "httpd", "wget", "nc", "nslookup", "cat", "echo", "timeout", "ls", "printf",
    ] {
        std::os::unix::fs::symlink("busybox", bin.join(applet)).unwrap();
    }
    std::fs::write(dir.join("rootfs/www/index.html"), "hello\n").unwrap();
    std::fs::set_permissions(
        dir.join("rootfs/www/index.html"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    std::fs::write(
        dir.join("Dockerfile"),
        "FROM scratch\nCOPY rootfs/ /\nCMD [\"/bin/httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("fly.toml"),
        format!(
            "app = \"{name}\"\nprimary_region = \"local\"\n\n[http_service]\n  internal_port = 8080\n  auto_stop_machines = \"off\"\n  min_machines_running = 0\n"
        ),
    )
    .unwrap();
    dir
}

/// Deploys the busybox app and returns its machine's id.
fn deploy(platform: &Platform, name: &str) -> String {
    let created = platform.aloft(&["apps", "create", name]);
    assert!(created.ok(), "{created}");
    let dir = busybox_app(platform, name);
    let run = platform.aloft_in(Some(&dir), &["deploy", "--ha=false"]);
    assert!(run.ok(), "{run}\n{}", platform.server_log());
    let ids = platform.aloft(&["machine", "list", "-a", name, "-q"]);
    let id = ids
        .stdout
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_string();
    assert_eq!(id.len(), 14, "{ids}");
    id
}

/// A shell command in the machine, through `aloft machine exec`.
fn in_machine(platform: &Platform, app: &str, id: &str, script: &str) -> Run {
    platform.aloft(&["machine", "exec", id, "-a", app, "--", "sh", "-c", script])
}

/// What a TCP connection from the machine to port 80 of `host` reads.
fn tcp_reply(platform: &Platform, app: &str, id: &str, host: &str) -> String {
    in_machine(
        platform,
        app,
        id,
        &format!("echo | timeout 8 nc -w 3 {host} 80 2>&1; echo rc=$?"),
    )
    .stdout
}

/// Whether a DNS question over UDP from the machine to `server` is answered.
fn dns_answered(platform: &Platform, app: &str, id: &str, server: &str) -> String {
    in_machine(
        platform,
        app,
        id,
        &format!("timeout 8 nslookup -type=a probe.test {server} 2>&1; echo rc=$?"),
    )
    .stdout
}

#[test]
fn machines_reach_the_internet_and_nothing_private() {
    require_platform!();
    egress(&["--driver", "container"]);
}

/// A microVM's tap goes through the same forward chain as a container's veth.
#[test]
fn microvms_reach_the_internet_and_nothing_private() {
    require_platform!();
    if let Some(reason) = common::missing_vm_prerequisite() {
        aloft_testkit::skip(format!("microVM test: {reason}"));
        return;
    }
    let _lock = common::vm_lock();
    egress(&["--driver", "microvm", "--vm-accel", "tcg"]);
}

fn egress(driver: &[&str]) {
    let allowed = format!("{LAN_ALLOWED}/32");
    let mut args = driver.to_vec();
    args.extend(["--api-listen", "0.0.0.0:4280", "--allow-egress", &allowed]);
    let platform = Platform::start_with(&args);
    let world = Neighbour::start(
        &platform,
        "wan",
        &["198.51.100.1/24", "2001:db8:1::1/64"],
        &["198.51.100.2/24", "2001:db8:1::2/64"],
        &[WORLD_V4, WORLD_V6],
    );
    // The world is behind the platform's default routes and has no route back to the
    // machines' addresses: only NATed traffic gets answers.
    ip(&[
        "-n",
        &platform.netns,
        "route",
        "add",
        "default",
        "via",
        "198.51.100.2",
    ]);
    ip(&[
        "-n",
        &platform.netns,
        "-6",
        "route",
        "add",
        "default",
        "via",
        "2001:db8:1::2",
    ]);
    let lan = Neighbour::start(
        &platform,
        "lan",
        &["169.254.169.1/24", "10.88.0.1/24"],
        &["169.254.169.2/24", "10.88.0.254/24"],
        &[METADATA, LAN_ALLOWED, LAN_CLOSED],
    );
    lan.netns_run(&["ip", "route", "add", "default", "via", "10.88.0.1"]);

    let id = deploy(&platform, "prober");

    // The host saves its ruleset and loads it again (as nftables.service and firewall
    // managers do): the rules must mean what they meant.
    let netns = format!("--net=/run/netns/{}", platform.netns);
    let saved = Command::new("nsenter")
        .args([netns.as_str(), "nft", "list", "ruleset"])
        .output()
        .expect("nft list ruleset");
    assert!(saved.status.success());
    let dump = platform.root.path().join("ruleset.nft");
    std::fs::write(&dump, &saved.stdout).unwrap();
    for args in [
        vec![netns.as_str(), "nft", "flush", "ruleset"],
        vec![netns.as_str(), "nft", "-f", dump.to_str().unwrap()],
    ] {
        assert!(
            Command::new("nsenter")
                .args(&args)
                .status()
                .unwrap()
                .success()
        );
    }

    // The internet: TCP and UDP, over IPv4 and IPv6.
    for host in [WORLD_V4, WORLD_V6] {
        let reply = tcp_reply(&platform, "prober", &id, host);
        assert!(reply.contains("tcp from wan"), "TCP to {host}: {reply}");
        let answer = dns_answered(&platform, "prober", &id, host);
        assert!(
            answer.contains("192.0.2.53"),
            "UDP (DNS) to {host}: {answer}"
        );
    }
    // What the operator allowed.
    let reply = tcp_reply(&platform, "prober", &id, LAN_ALLOWED);
    assert!(reply.contains("tcp from lan"), "--allow-egress: {reply}");
    // Not the metadata address, another private address, nor the platform's API on the
    // host's own addresses (it listens on all of them).
    for host in [METADATA, LAN_CLOSED] {
        let reply = tcp_reply(&platform, "prober", &id, host);
        assert!(!reply.contains("tcp from"), "TCP to {host}: {reply}");
        let answer = dns_answered(&platform, "prober", &id, host);
        assert!(!answer.contains("192.0.2.53"), "UDP to {host}: {answer}");
    }
    let api_from_host = platform.curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "http://198.51.100.1:4280/v1/apps",
    ]);
    assert_eq!(
        api_from_host.stdout, "401",
        "the API listens there: {api_from_host}"
    );
    for host in ["198.51.100.1", "2001:db8:1::1"] {
        let api = in_machine(
            &platform,
            "prober",
            &id,
            &format!(
                "printf 'GET /v1/apps HTTP/1.0\\r\\n\\r\\n' | timeout 8 nc -w 3 {host} 4280 2>&1; echo rc=$?"
            ),
        );
        assert!(!api.stdout.contains("HTTP/"), "the API at {host}: {api}");
    }
    drop(lan);
    drop(world);
}
