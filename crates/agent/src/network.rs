//! Machine networking on a host. Each machine gets its own network namespace and its own
//! routed veth link (no shared L2 between machines) with
//! - its 6PN address (`fdaa:<network>:<host>:<machine>::2/112`, see `aloft_api::sixpn`),
//!   routing `fdaa::/16` to the host, which routes the machine's /112 back down the link;
//! - a private /30 IPv4 that only this host's proxy uses, with IPv4 egress NATed.
//!
//! nftables (table `inet aloft`, see [`RULESET`]) lets a machine reach its own network's
//! 6PN addresses, the host's DNS (`fdaa::3`) and the sockets the host binds in the
//! machine's network (Flycast listeners of the proxy, the network's DNS address), and the
//! internet over IPv4 and IPv6 (both NATed); nothing of another network, no other
//! machine's private IPv4, no other port of the host, and no private, link-local or
//! platform address unless the operator allows it (`aloft server --allow-egress`). Per-machine facts live in three sets keyed by the
//! host-side interface name, so the rules never change when machines come and go.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;

use aloft_api::sixpn;

use crate::unpack::IdShift;

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("network slot {0} is out of range")]
    SlotOutOfRange(u32),
    #[error("`{program} {args}` failed: {stderr}")]
    Command {
        program: &'static str,
        args: String,
        stderr: String,
    },
    #[error("running `{program}`: {source} (is {package} installed?)")]
    Spawn {
        program: &'static str,
        package: &'static str,
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Namespace {
        what: String,
        source: std::io::Error,
    },
    #[error("writing {path}: {source}")]
    Sysctl {
        path: String,
        source: std::io::Error,
    },
}

/// The addresses of one machine's link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MachineLink {
    pub netns: String,
    pub host_interface: String,
    pub host_address: Ipv4Addr,
    pub machine_address: Ipv4Addr,
    /// The machine's 6PN address, when the control plane assigned one.
    pub private_ip: Option<Ipv6Addr>,
}

const PRIVATE_BASE: u32 = u32::from_be_bytes([172, 19, 0, 0]);
const MAX_SLOTS: u32 = 1 << 14;
/// Every machine's private IPv4 is in here.
pub const PRIVATE_V4_CIDR: &str = "172.19.0.0/16";
/// The host end of every machine link (the machine's IPv6 next hop).
pub const HOST_LINK_LOCAL: &str = "fe80::1";
/// The machine end of every machine link.
pub const MACHINE_LINK_LOCAL: &str = "fe80::2";
/// Host-side machine interfaces are `al<first 12 characters of the machine id>`.
pub const INTERFACE_PREFIX: &str = "al";

impl MachineLink {
    pub fn for_machine(machine_id: &str, slot: u32) -> Result<Self, NetworkError> {
        if slot >= MAX_SLOTS {
            return Err(NetworkError::SlotOutOfRange(slot));
        }
        let base = PRIVATE_BASE + slot * 4;
        let short: String = machine_id.chars().take(12).collect();
        Ok(Self {
            netns: format!("aloft-{machine_id}"),
            host_interface: format!("{INTERFACE_PREFIX}{short}"),
            host_address: Ipv4Addr::from(base + 1),
            machine_address: Ipv4Addr::from(base + 2),
            private_ip: None,
        })
    }

    /// The link with the machine's 6PN address (ignored unless it is in `fdaa::/16`).
    pub fn with_private_ip(mut self, private_ip: Option<&str>) -> Self {
        self.private_ip = private_ip
            .and_then(|ip| ip.parse::<Ipv6Addr>().ok())
            .filter(|ip| sixpn::parts(ip).is_some());
        self
    }

    pub fn netns_path(&self) -> PathBuf {
        PathBuf::from(NETNS_DIR).join(&self.netns)
    }

    /// The user namespace that owns the machine's network namespace, when the machine runs
    /// in one (see [`ensure`]).
    pub fn userns_path(&self) -> PathBuf {
        PathBuf::from(USERNS_DIR).join(&self.netns)
    }
}

/// Where network namespaces are kept, as `ip netns` keeps them.
const NETNS_DIR: &str = "/run/netns";
/// Where machines' user namespaces are kept (bind mounts, like `ip netns`' files).
pub const USERNS_DIR: &str = "/run/aloft/userns";

fn run(
    program: &'static str,
    package: &'static str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<(), NetworkError> {
    let mut command = Command::new(program);
    command
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    command.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let mut child = command.spawn().map_err(|source| NetworkError::Spawn {
        program,
        package,
        source,
    })?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        use std::io::Write;
        pipe.write_all(text.as_bytes())
            .map_err(|source| NetworkError::Spawn {
                program,
                package,
                source,
            })?;
    }
    let output = child
        .wait_with_output()
        .map_err(|source| NetworkError::Spawn {
            program,
            package,
            source,
        })?;
    if output.status.success() {
        Ok(())
    } else {
        Err(NetworkError::Command {
            program,
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        })
    }
}

fn ip(args: &[&str]) -> Result<(), NetworkError> {
    run("ip", "iproute2", args, None)
}

fn nft(script: &str) -> Result<(), NetworkError> {
    run("nft", "nftables", &["-f", "-"], Some(script))
}

fn sysctl(path: &str, value: &str) -> Result<(), NetworkError> {
    let full = format!("/proc/sys/{path}");
    if std::fs::read_to_string(&full).is_ok_and(|current| current.trim() == value) {
        return Ok(());
    }
    std::fs::write(&full, value).map_err(|source| NetworkError::Sysctl { path: full, source })
}

/// The host's packet filter and NAT. Sets are created once and keep their elements when
/// the agent restarts; chains are flushed and refilled, all in one transaction.
///
/// Every rule means the same after `nft list ruleset | nft -f -` (hosts save and reload
/// rulesets): a family is chosen by jumping to a per-family chain, never by a
/// `meta nfproto` match beside a `reject`, which nft's listing leaves out (the rule then
/// reloads matching both families: all of a machine's outbound TCP was reset that way).
///
/// A machine's egress: its own network's 6PN, then (refused) other networks' 6PN and other
/// machines' private IPv4, then (dropped) the platform's own addresses, then the
/// operator's allowed ranges, then (dropped) loopback, link-local (the metadata address
/// 169.254.169.254 among them), RFC 1918, CGNAT, ULA, multicast and reserved ranges, then
/// the internet: IPv4 NATed to the host's address, IPv6 NATed from the 6PN address.
/// Packets to the host itself (the input hook) reach only DNS on `fdaa::3` and the sockets
/// the host binds in the machine's own network.
pub const RULESET: &str = r#"
add table inet aloft
add set inet aloft machine_nets6 { type ifname . ipv6_addr; flags interval; }
add set inet aloft machine_addrs6 { type ifname . ipv6_addr; }
add set inet aloft machine_addrs4 { type ifname . ipv4_addr; }
add set inet aloft egress_allowed4 { type ipv4_addr; flags interval; }
add set inet aloft egress_allowed6 { type ipv6_addr; flags interval; }
add set inet aloft platform_addrs4 { type ipv4_addr; flags interval; }
add set inet aloft platform_addrs6 { type ipv6_addr; flags interval; }
add chain inet aloft input { type filter hook input priority filter; policy accept; }
add chain inet aloft forward { type filter hook forward priority filter; policy accept; }
add chain inet aloft postrouting { type nat hook postrouting priority srcnat; policy accept; }
add chain inet aloft machine_to_host
add chain inet aloft from_machine
add chain inet aloft from_machine4
add chain inet aloft from_machine6
add chain inet aloft refuse
add chain inet aloft to_machine
flush chain inet aloft input
flush chain inet aloft forward
flush chain inet aloft postrouting
flush chain inet aloft machine_to_host
flush chain inet aloft from_machine
flush chain inet aloft from_machine4
flush chain inet aloft from_machine6
flush chain inet aloft refuse
flush chain inet aloft to_machine
flush set inet aloft egress_allowed4
flush set inet aloft egress_allowed6
flush set inet aloft platform_addrs4
flush set inet aloft platform_addrs6
add rule inet aloft input iifname "al*" jump machine_to_host
add rule inet aloft machine_to_host ct state established,related accept
add rule inet aloft machine_to_host ct state invalid drop
add rule inet aloft machine_to_host icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit } accept
add rule inet aloft machine_to_host iifname . ip6 saddr != @machine_addrs6 drop
add rule inet aloft machine_to_host iifname . ip saddr != @machine_addrs4 drop
add rule inet aloft machine_to_host ip6 daddr fdaa::3 meta l4proto { tcp, udp } th dport 53 accept
add rule inet aloft machine_to_host iifname . ip6 daddr @machine_nets6 socket wildcard 0 accept
add rule inet aloft machine_to_host goto refuse
add rule inet aloft forward iifname "al*" jump from_machine
add rule inet aloft forward oifname "al*" jump to_machine
add rule inet aloft from_machine ct state established,related accept
add rule inet aloft from_machine ct state invalid drop
add rule inet aloft from_machine iifname . ip6 saddr != @machine_addrs6 drop
add rule inet aloft from_machine iifname . ip saddr != @machine_addrs4 drop
add rule inet aloft from_machine meta nfproto ipv4 goto from_machine4
add rule inet aloft from_machine meta nfproto ipv6 goto from_machine6
add rule inet aloft from_machine drop
add rule inet aloft from_machine6 iifname . ip6 daddr @machine_nets6 accept
add rule inet aloft from_machine6 ip6 daddr fdaa::/16 goto refuse
add rule inet aloft from_machine6 ip6 daddr @platform_addrs6 drop
add rule inet aloft from_machine6 ip6 daddr @egress_allowed6 accept
add rule inet aloft from_machine6 ip6 daddr { ::/127, ::ffff:0:0/96, 64:ff9b:1::/48, 100::/64, fc00::/7, fe80::/10, fec0::/10, ff00::/8 } drop
add rule inet aloft from_machine6 accept
add rule inet aloft from_machine4 ip daddr 172.19.0.0/16 goto refuse
add rule inet aloft from_machine4 ip daddr @platform_addrs4 drop
add rule inet aloft from_machine4 ip daddr @egress_allowed4 accept
add rule inet aloft from_machine4 ip daddr { 0.0.0.0/8, 10.0.0.0/8, 100.64.0.0/10, 127.0.0.0/8, 169.254.0.0/16, 172.16.0.0/12, 192.168.0.0/16, 224.0.0.0/3 } drop
add rule inet aloft from_machine4 accept
add rule inet aloft refuse meta l4proto tcp reject with tcp reset
add rule inet aloft refuse reject with icmpx type admin-prohibited
add rule inet aloft to_machine ct state established,related accept
add rule inet aloft to_machine oifname . ip6 saddr @machine_nets6 accept
add rule inet aloft to_machine goto refuse
add rule inet aloft postrouting ip saddr 172.19.0.0/16 oifname != "al*" masquerade
add rule inet aloft postrouting ip6 saddr fdaa::/16 ip6 daddr != fdaa::/16 oifname != "al*" masquerade
"#;

/// An address range, `10.0.0.0/8` or `2001:db8::/32` (a bare address is a /32 or /128).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub address: IpAddr,
    pub prefix: u8,
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let address: IpAddr = address.trim().parse().map_err(|_| {
            format!("{text:?} is not an address range; write e.g. 10.1.0.0/16 or 2001:db8::/32")
        })?;
        let max = if address.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(prefix) => prefix
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{text:?}: the prefix length must be 0 to {max}"))?,
        };
        // The range's first address: nft refuses a prefix with host bits set.
        let address = match address {
            IpAddr::V4(v4) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(v4) & mask))
            }
            IpAddr::V6(v6) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
            }
        };
        Ok(Self { address, prefix })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix)
    }
}

/// What the operator lets machines reach beyond the internet, and the platform's own
/// addresses outside this host that no machine may reach (a remote database, other hosts).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EgressPolicy {
    pub allowed: Vec<Cidr>,
    pub platform: Vec<Cidr>,
}

/// [`RULESET`] with the policy's sets filled.
pub fn ruleset(policy: &EgressPolicy) -> String {
    let mut script = RULESET.to_string();
    for (set, cidrs) in [
        ("egress_allowed", &policy.allowed),
        ("platform_addrs", &policy.platform),
    ] {
        for cidr in cidrs {
            let family = if cidr.address.is_ipv4() { 4 } else { 6 };
            script.push_str(&format!(
                "add element inet aloft {set}{family} {{ {cidr} }}\n"
            ));
        }
    }
    script
}

static EGRESS_POLICY: Mutex<Option<EgressPolicy>> = Mutex::new(None);

/// Sets the egress policy; the packet filter is (re)loaded with it on the next
/// [`prepare_host`].
pub fn set_egress_policy(policy: EgressPolicy) {
    *EGRESS_POLICY.lock().unwrap_or_else(|p| p.into_inner()) = Some(policy);
    *HOST_READY.lock().unwrap_or_else(|p| p.into_inner()) = false;
}

static HOST_READY: Mutex<bool> = Mutex::new(false);

/// Prepares the host once per process: forwarding on, `fdaa::3` on `lo` (the DNS
/// server's address), and the packet filter. Idempotent; safe while machines run.
pub fn prepare_host() -> Result<(), NetworkError> {
    let mut ready = HOST_READY.lock().unwrap_or_else(|p| p.into_inner());
    if *ready {
        return Ok(());
    }
    sysctl("net/ipv4/ip_forward", "1")?;
    sysctl("net/ipv6/conf/all/forwarding", "1")?;
    ip(&["link", "set", "lo", "up"])?;
    ip(&[
        "-6",
        "addr",
        "replace",
        &format!("{}/128", sixpn::DNS),
        "dev",
        "lo",
    ])?;
    let policy = EGRESS_POLICY
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .unwrap_or_default();
    nft(&ruleset(&policy))?;
    *ready = true;
    Ok(())
}

/// Makes a network's service block (`fdaa:<network>::/80`: Flycast addresses and the
/// network's DNS address) local to this host, so the sockets bound there receive.
pub fn ensure_service_block(network: u32) -> Result<(), NetworkError> {
    ip(&[
        "-6",
        "route",
        "replace",
        "local",
        &sixpn::service_cidr(network),
        "dev",
        "lo",
    ])
}

/// Creates the namespace and link if they don't exist yet, and (again, idempotently) the
/// routes and filter entries: a restarted agent finds everything in place.
///
/// With `users`, the network namespace is owned by a user namespace of its own whose
/// root is host id `users.base` (the machine runs in that user namespace: only a network
/// namespace its user namespace owns lets the runtime mount `/sys` and configure it from
/// inside). A namespace of the other kind left from before is replaced.
pub fn ensure(link: &MachineLink, users: Option<IdShift>) -> Result<(), NetworkError> {
    prepare_host()?;
    let exists = link.netns_path().exists()
        && interface_exists(&link.host_interface)
        && users.is_some() == owned_by_its_user_namespace(link);
    if exists && addressed_this_run(link, false) {
        return Ok(());
    }
    if !exists {
        teardown(link);
        match users {
            Some(users) => create_owned_namespaces(link, users)?,
            None => ip(&["netns", "add", &link.netns])?,
        }
        if let Err(err) = create_link(link) {
            teardown(link);
            return Err(err);
        }
    }
    if let Err(err) = apply_machine_addressing(link, true) {
        if !exists {
            teardown(link);
        }
        return Err(err);
    }
    addressed_this_run(link, true);
    Ok(())
}

fn namespace_error(what: String) -> impl FnOnce(std::io::Error) -> NetworkError {
    move |source| NetworkError::Namespace { what, source }
}

/// Makes `dir` a shared mount point, as `ip netns` does with its directory, so the
/// namespaces bound in it show in mount namespaces made from this one later.
fn prepare_namespace_dir(dir: &Path) -> Result<(), NetworkError> {
    use nix::mount::{MsFlags, mount};
    std::fs::create_dir_all(dir).map_err(namespace_error(format!("creating {}", dir.display())))?;
    let shared = || {
        mount(
            None::<&str>,
            dir,
            None::<&str>,
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
    };
    if shared().is_ok() {
        return Ok(());
    }
    mount(
        Some(dir),
        dir,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .and_then(|_| shared())
    .map_err(|e| NetworkError::Namespace {
        what: format!("making {} a shared mount", dir.display()),
        source: e.into(),
    })
}

/// Creates the machine's user namespace (ids `0..users.size` are host ids from
/// `users.base`) and a network namespace it owns, both kept by bind mounts at
/// [`MachineLink::userns_path`] and [`MachineLink::netns_path`].
fn create_owned_namespaces(link: &MachineLink, users: IdShift) -> Result<(), NetworkError> {
    use std::os::unix::process::CommandExt;
    let targets = [("user", link.userns_path()), ("net", link.netns_path())];
    for (_, path) in &targets {
        if let Some(dir) = path.parent() {
            prepare_namespace_dir(dir)?;
        }
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(namespace_error(format!("creating {}", path.display())))?;
    }
    // A process that holds both namespaces while they are mapped and bound: the
    // namespaces are made between its fork and exec (a threaded process can't make a user
    // namespace), and it waits on its stdin until we are done.
    let mut holder = Command::new("cat");
    holder
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: only unshare(2) between fork and exec.
    unsafe {
        holder.pre_exec(|| {
            if libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut holder = holder.spawn().map_err(namespace_error(format!(
        "creating the user and network namespaces of {}",
        link.netns
    )))?;
    let proc_dir = PathBuf::from(format!("/proc/{}", holder.id()));
    let bound = (|| {
        let map = format!("0 {} {}\n", users.base, users.size);
        for file in ["uid_map", "gid_map"] {
            let path = proc_dir.join(file);
            std::fs::write(&path, &map).map_err(namespace_error(format!(
                "writing {} of {}'s user namespace",
                file, link.netns
            )))?;
        }
        for (kind, target) in &targets {
            let source = proc_dir.join("ns").join(kind);
            nix::mount::mount(
                Some(&source),
                target,
                None::<&str>,
                nix::mount::MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(|e| NetworkError::Namespace {
                what: format!("binding {} at {}", source.display(), target.display()),
                source: e.into(),
            })?;
        }
        Ok(())
    })();
    drop(holder.stdin.take());
    let _ = holder.kill();
    let _ = holder.wait();
    if bound.is_err() {
        teardown(link);
    }
    bound
}

/// Whether the machine's network namespace is owned by the user namespace kept at
/// [`MachineLink::userns_path`].
fn owned_by_its_user_namespace(link: &MachineLink) -> bool {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::fs::MetadataExt;
    // NS_GET_USERNS, _IO(0xb7, 0x1): a descriptor of the namespace's owning user namespace.
    const NS_GET_USERNS: libc::c_ulong = 0xb701;
    let (Ok(netns), Ok(userns)) = (
        std::fs::File::open(link.netns_path()),
        std::fs::metadata(link.userns_path()),
    ) else {
        return false;
    };
    // SAFETY: the ioctl takes no argument and returns a new descriptor or -1.
    let owner = unsafe { libc::ioctl(netns.as_raw_fd(), NS_GET_USERNS as _) };
    if owner < 0 {
        return false;
    }
    // SAFETY: `owner` is a descriptor the kernel just opened for us.
    let owner = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(owner) });
    owner
        .metadata()
        .is_ok_and(|m| m.dev() == userns.dev() && m.ino() == userns.ino())
}

/// A microVM's routed link: a persistent tap device named like the veth it replaces
/// (`al<id>`), in the host's namespace, with the host end's addresses, routes and filter
/// entries; the guest configures its own end (see [`MACHINE_LINK_LOCAL`]). Idempotent.
pub fn ensure_tap(link: &MachineLink) -> Result<(), NetworkError> {
    prepare_host()?;
    let host = link.host_interface.as_str();
    let exists = interface_exists(host) && is_tap(host);
    if exists && addressed_this_run(link, false) {
        return Ok(());
    }
    if !exists {
        teardown(link);
        let created = ip(&["tuntap", "add", "dev", host, "mode", "tap"])
            .and_then(|_| ip(&["link", "set", host, "addrgenmode", "none"]))
            .and_then(|_| {
                ip(&[
                    "addr",
                    "add",
                    &format!("{}/30", link.host_address),
                    "dev",
                    host,
                ])
            })
            .and_then(|_| {
                ip(&[
                    "addr",
                    "add",
                    &format!("{HOST_LINK_LOCAL}/64"),
                    "dev",
                    host,
                    "nodad",
                ])
            })
            .and_then(|_| ip(&["link", "set", host, "up"]));
        if let Err(err) = created {
            teardown(link);
            return Err(err);
        }
    }
    if let Err(err) = apply_machine_addressing(link, false) {
        if !exists {
            teardown(link);
        }
        return Err(err);
    }
    addressed_this_run(link, true);
    Ok(())
}

/// Links whose addresses, routes and filter entries this process has already applied
/// (`record` adds one). The ruleset is reloaded once per process, so after an agent
/// restart every link is addressed again on its first start.
fn addressed_this_run(link: &MachineLink, record: bool) -> bool {
    let mut guard = ADDRESSED.lock().unwrap_or_else(|p| p.into_inner());
    let addressed = guard.get_or_insert_with(Default::default);
    let key = (link.host_interface.clone(), link.private_ip);
    if record {
        addressed.insert(key);
        true
    } else {
        addressed.contains(&key)
    }
}

type AddressedLinks = std::collections::HashSet<(String, Option<std::net::Ipv6Addr>)>;
static ADDRESSED: Mutex<Option<AddressedLinks>> = Mutex::new(None);

/// Whether the interface `name` (which exists) is a tap device, not a container's veth
/// left from a previous driver. `ip` asks the kernel of the caller's namespace, unlike sysfs.
fn is_tap(name: &str) -> bool {
    Command::new("ip")
        .args(["-d", "-o", "link", "show", "dev", name])
        .output()
        .is_ok_and(|out| {
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("tun type tap")
        })
}

/// Whether `name` is an interface of this process's network namespace. `/sys/class/net`
/// shows the namespace sysfs was mounted in, which differs after `setns`/`nsenter --net`;
/// `/proc/self/net/dev` always follows the caller's namespace.
fn interface_exists(name: &str) -> bool {
    std::fs::read_to_string("/proc/self/net/dev").is_ok_and(|table| {
        table
            .lines()
            .filter_map(|line| line.split_once(':'))
            .any(|(interface, _)| interface.trim() == name)
    })
}

fn create_link(link: &MachineLink) -> Result<(), NetworkError> {
    let host = link.host_interface.as_str();
    let ns = link.netns.as_str();
    ip(&[
        "link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", ns,
    ])?;
    // Fixed link-local addresses without duplicate address detection: IPv6 works the
    // moment the machine starts.
    ip(&["link", "set", host, "addrgenmode", "none"])?;
    ip(&["-n", ns, "link", "set", "eth0", "addrgenmode", "none"])?;
    ip(&[
        "addr",
        "add",
        &format!("{}/30", link.host_address),
        "dev",
        host,
    ])?;
    ip(&[
        "addr",
        "add",
        &format!("{HOST_LINK_LOCAL}/64"),
        "dev",
        host,
        "nodad",
    ])?;
    ip(&["link", "set", host, "up"])?;
    ip(&[
        "-n",
        ns,
        "addr",
        "add",
        &format!("{}/30", link.machine_address),
        "dev",
        "eth0",
    ])?;
    ip(&[
        "-n",
        ns,
        "addr",
        "add",
        &format!("{MACHINE_LINK_LOCAL}/64"),
        "dev",
        "eth0",
        "nodad",
    ])?;
    ip(&["-n", ns, "link", "set", "eth0", "up"])?;
    ip(&["-n", ns, "link", "set", "lo", "up"])?;
    ip(&[
        "-n",
        ns,
        "route",
        "add",
        "default",
        "via",
        &link.host_address.to_string(),
    ])
}

/// The machine's 6PN address and routes, and its filter entries. `in_netns`: the machine
/// end is a veth in the machine's namespace (a microVM's guest sets its end itself).
fn apply_machine_addressing(link: &MachineLink, in_netns: bool) -> Result<(), NetworkError> {
    let host = link.host_interface.as_str();
    let mut elements = format!(
        "add element inet aloft machine_addrs4 {{ \"{host}\" . {} }}\n",
        link.machine_address
    );
    if let Some(address) = link.private_ip {
        let ns = link.netns.as_str();
        let cidr = sixpn::machine_cidr(&address);
        if in_netns {
            ip(&[
                "-n",
                ns,
                "-6",
                "addr",
                "replace",
                &format!("{address}/{}", sixpn::MACHINE_PREFIX_LEN),
                "dev",
                "eth0",
                "nodad",
            ])?;
            ip(&[
                "-n",
                ns,
                "-6",
                "route",
                "replace",
                "fdaa::/16",
                "via",
                HOST_LINK_LOCAL,
                "dev",
                "eth0",
            ])?;
            // The internet over IPv6, NATed from the 6PN address by the host.
            ip(&[
                "-n",
                ns,
                "-6",
                "route",
                "replace",
                "default",
                "via",
                HOST_LINK_LOCAL,
                "dev",
                "eth0",
            ])?;
        }
        ip(&[
            "-6",
            "route",
            "replace",
            &cidr,
            "via",
            MACHINE_LINK_LOCAL,
            "dev",
            host,
        ])?;
        if let Some(network) = sixpn::network_of(&address) {
            elements.push_str(&format!(
                "add element inet aloft machine_addrs6 {{ \"{host}\" . {address} }}\n"
            ));
            elements.push_str(&format!(
                "add element inet aloft machine_nets6 {{ \"{host}\" . {} }}\n",
                sixpn::network_cidr(network)
            ));
            // The network's Flycast addresses must be local here for its machines to reach them.
            ensure_service_block(network)?;
        }
    }
    nft(&elements)
}

/// Removes the namespace (and with it the veth pair and its route) and the machine's
/// filter entries, found by interface name (the caller need not know the 6PN address).
/// Missing pieces are not an error.
pub fn teardown(link: &MachineLink) {
    let host = link.host_interface.as_str();
    if let Some(addressed) = ADDRESSED.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
        addressed.retain(|(interface, _)| interface != host);
    }
    let mut deletions = vec![format!(
        "delete element inet aloft machine_addrs4 {{ \"{host}\" . {} }}",
        link.machine_address
    )];
    for set in ["machine_addrs6", "machine_nets6"] {
        for value in set_values_of(set, host) {
            deletions.push(format!(
                "delete element inet aloft {set} {{ \"{host}\" . {value} }}"
            ));
        }
    }
    // One at a time: a missing element fails its own transaction only.
    for deletion in deletions {
        let _ = nft(&deletion);
    }
    let _ = ip(&["link", "del", host]);
    let _ = ip(&["netns", "del", &link.netns]);
    let userns = link.userns_path();
    let _ = nix::mount::umount2(&userns, nix::mount::MntFlags::MNT_DETACH);
    let _ = std::fs::remove_file(&userns);
}

/// The values paired with `interface` in one of the table's `ifname . address` sets.
fn set_values_of(set: &str, interface: &str) -> Vec<String> {
    let Ok(output) = Command::new("nft")
        .args(["list", "set", "inet", "aloft", set])
        .stderr(Stdio::null())
        .output()
    else {
        return Vec::new();
    };
    elements_of(&String::from_utf8_lossy(&output.stdout), interface)
}

fn elements_of(listing: &str, interface: &str) -> Vec<String> {
    let key = format!("\"{interface}\" . ");
    let mut values = Vec::new();
    let mut rest = listing;
    while let Some(at) = rest.find(&key) {
        rest = &rest[at + key.len()..];
        let value: String = rest
            .chars()
            .take_while(|c| c.is_ascii_hexdigit() || matches!(c, ':' | '.' | '/'))
            .collect();
        if !value.is_empty() {
            values.push(value);
        }
    }
    values
}

/// The address this host sends outbound traffic from (and so machines, whose traffic it
/// masquerades): the source the kernel picks for a public IPv6 destination, else for a
/// public IPv4 one. Connecting a UDP socket only consults the routing table; nothing is
/// sent. `None` when the host has no route out.
pub fn outbound_address() -> Option<std::net::IpAddr> {
    let probes: [(&str, &str); 2] = [
        ("[::]:0", "[2001:4860:4860::8888]:53"),
        ("0.0.0.0:0", "8.8.8.8:53"),
    ];
    probes.iter().find_map(|(local, remote)| {
        let socket = std::net::UdpSocket::bind(local).ok()?;
        socket.connect(remote).ok()?;
        let ip = socket.local_addr().ok()?.ip();
        (!ip.is_unspecified() && !ip.is_loopback()).then_some(ip)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_map_to_distinct_slash30s() {
        let a = MachineLink::for_machine("0123456789abcd", 0).unwrap();
        assert_eq!(a.host_address, Ipv4Addr::new(172, 19, 0, 1));
        assert_eq!(a.machine_address, Ipv4Addr::new(172, 19, 0, 2));
        assert_eq!(a.host_interface, "al0123456789ab");
        assert!(a.host_interface.len() <= 15);
        let b = MachineLink::for_machine("0123456789abcd", 100).unwrap();
        assert_eq!(b.machine_address, Ipv4Addr::new(172, 19, 1, 146));
        assert!(MachineLink::for_machine("x", MAX_SLOTS).is_err());
    }

    #[test]
    fn only_6pn_addresses_are_taken() {
        let link = MachineLink::for_machine("0123456789abcd", 0).unwrap();
        let with = link.clone().with_private_ip(Some("fdaa:0:1:0:1:0:5:2"));
        assert_eq!(with.private_ip, Some("fdaa:0:1:0:1:0:5:2".parse().unwrap()));
        assert_eq!(
            link.clone().with_private_ip(Some("2001:db8::1")).private_ip,
            None
        );
        assert_eq!(
            link.clone().with_private_ip(Some("garbage")).private_ip,
            None
        );
        assert_eq!(link.with_private_ip(None).private_ip, None);
    }

    #[test]
    fn set_listings_yield_one_interfaces_values() {
        let listing = "table inet aloft {\n\tset machine_nets6 {\n\t\telements = { \"alabc\" . fdaa:0:1::/48,\n\t\t\t     \"alxyz\" . fdaa:0:2::/48 }\n\t}\n}";
        assert_eq!(elements_of(listing, "alabc"), vec!["fdaa:0:1::/48"]);
        assert_eq!(elements_of(listing, "alxyz"), vec!["fdaa:0:2::/48"]);
        assert!(elements_of(listing, "alnone").is_empty());
    }

    /// Runs `nft` in the network namespace `netns` with `script` on stdin.
    fn nft_in(netns: &str, args: &[&str], script: Option<&str>) -> String {
        use std::io::Write;
        let mut child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{netns}"))
            .arg("nft")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running nft");
        let mut stdin = child.stdin.take().expect("nft's stdin");
        if let Some(script) = script {
            stdin.write_all(script.as_bytes()).expect("writing to nft");
        }
        drop(stdin);
        let output = child.wait_with_output().expect("nft's output");
        assert!(
            output.status.success(),
            "nft {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// The kernel's bytecode of the table: its rules in order, and its sets' elements in
    /// sorted order, without the handles and anonymous set numbers that differ between two
    /// loads of the same rules.
    fn bytecode(netns: &str) -> Vec<String> {
        let listing = nft_in(
            netns,
            &["--debug=netlink", "list", "table", "inet", "aloft"],
            None,
        );
        let normal = |line: &str| {
            let line = match line.strip_prefix("inet aloft ") {
                Some(rest) => rest
                    .split_whitespace()
                    .filter(|word| !word.chars().all(|c| c.is_ascii_digit()))
                    .collect::<Vec<_>>()
                    .join(" "),
                None => line.trim().to_string(),
            };
            let mut normal = String::new();
            let mut rest = line.as_str();
            while let Some(at) = rest.find("__set") {
                normal.push_str(&rest[..at + 5]);
                rest = rest[at + 5..].trim_start_matches(|c: char| c.is_ascii_digit());
            }
            normal.push_str(rest);
            normal
        };
        let bytecode = listing
            .split("table inet aloft {")
            .next()
            .unwrap_or_default();
        let (mut rules, mut sets) = (Vec::new(), Vec::new());
        for block in bytecode.split("\n\n") {
            let mut lines: Vec<String> = block
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(normal)
                .collect();
            if lines.first().is_some_and(|l| l.starts_with('@')) {
                // A set: its header, then its elements in the kernel's (unstable) order.
                lines.sort();
                sets.extend(lines);
            } else {
                rules.push(lines.join(" "));
            }
        }
        sets.sort();
        rules.extend(sets);
        rules
    }

    /// Hosts save `nft list ruleset` and load it again (nftables.service, firewall
    /// managers, an operator's backup). nft leaves out of its listing a `meta nfproto`
    /// match it takes for a `reject`'s dependency, so a rule written that way comes back
    /// matching both families: the ruleset must mean the same after such a round trip.
    #[test]
    fn the_ruleset_means_the_same_after_a_listing_round_trip() {
        if !nix::unistd::Uid::effective().is_root()
            || Command::new("nft").arg("-v").output().is_err()
        {
            aloft_testkit::skip("needs root and nft");
            return;
        }
        let loaded = format!("aloft-rt{}a", std::process::id());
        let reloaded = format!("aloft-rt{}b", std::process::id());
        for netns in [&loaded, &reloaded] {
            let _ = Command::new("ip").args(["netns", "del", netns]).status();
            assert!(
                Command::new("ip")
                    .args(["netns", "add", netns])
                    .status()
                    .unwrap()
                    .success()
            );
        }
        let ruleset = ruleset(&EgressPolicy::default());
        nft_in(&loaded, &["-f", "-"], Some(&ruleset));
        let listing = nft_in(&loaded, &["list", "table", "inet", "aloft"], None);
        nft_in(&reloaded, &["-f", "-"], Some(&listing));
        let (before, after) = (bytecode(&loaded), bytecode(&reloaded));
        for netns in [&loaded, &reloaded] {
            let _ = Command::new("ip").args(["netns", "del", netns]).status();
        }
        assert!(
            before.iter().any(|rule| rule.contains("reject")),
            "{before:?}"
        );
        let differences: Vec<_> = before
            .iter()
            .zip(after.iter())
            .filter(|(a, b)| a != b)
            .collect();
        assert!(
            differences.is_empty() && before.len() == after.len(),
            "the reloaded listing differs from the ruleset (first differences: {:?})\nlisting:\n{listing}",
            &differences[..differences.len().min(4)]
        );
    }

    #[test]
    fn ruleset_names_the_private_ranges_it_filters() {
        assert!(RULESET.contains(PRIVATE_V4_CIDR));
        assert!(RULESET.contains(&format!("ip6 daddr {}", sixpn::DNS)));
        assert!(RULESET.contains(&format!("iifname \"{INTERFACE_PREFIX}*\"")));
    }
}
