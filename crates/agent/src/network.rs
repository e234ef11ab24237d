//! Machine networking on a host: each machine gets its own network namespace and a routed
//! veth link with a private /30 IPv4 that only this host's proxy uses.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("network slot {0} is out of range")]
    SlotOutOfRange(u32),
    #[error("`ip {args}` failed: {stderr}")]
    Command { args: String, stderr: String },
    #[error("running `ip`: {0} (is iproute2 installed?)")]
    Spawn(std::io::Error),
}

/// The addresses of one machine's link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MachineLink {
    pub netns: String,
    pub host_interface: String,
    pub host_address: Ipv4Addr,
    pub machine_address: Ipv4Addr,
}

const PRIVATE_BASE: u32 = u32::from_be_bytes([172, 19, 0, 0]);
const MAX_SLOTS: u32 = 1 << 14;

impl MachineLink {
    pub fn for_machine(machine_id: &str, slot: u32) -> Result<Self, NetworkError> {
        if slot >= MAX_SLOTS {
            return Err(NetworkError::SlotOutOfRange(slot));
        }
        let base = PRIVATE_BASE + slot * 4;
        let short: String = machine_id.chars().take(12).collect();
        Ok(Self {
            netns: format!("aloft-{machine_id}"),
            host_interface: format!("al{short}"),
            host_address: Ipv4Addr::from(base + 1),
            machine_address: Ipv4Addr::from(base + 2),
        })
    }

    pub fn netns_path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.netns)
    }
}

fn ip(args: &[&str]) -> Result<(), NetworkError> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .map_err(NetworkError::Spawn)?;
    if output.status.success() {
        Ok(())
    } else {
        Err(NetworkError::Command {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        })
    }
}

/// Creates the namespace and link if they don't exist yet (idempotent: a restarted agent
/// finds them in place).
pub fn ensure(link: &MachineLink) -> Result<(), NetworkError> {
    if link.netns_path().exists()
        && std::path::Path::new("/sys/class/net")
            .join(&link.host_interface)
            .exists()
    {
        return Ok(());
    }
    teardown(link);
    ip(&["netns", "add", &link.netns])?;
    let result = (|| {
        ip(&[
            "link",
            "add",
            &link.host_interface,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &link.netns,
        ])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/30", link.host_address),
            "dev",
            &link.host_interface,
        ])?;
        ip(&["link", "set", &link.host_interface, "up"])?;
        ip(&[
            "-n",
            &link.netns,
            "addr",
            "add",
            &format!("{}/30", link.machine_address),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &link.netns, "link", "set", "eth0", "up"])?;
        ip(&["-n", &link.netns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            &link.netns,
            "route",
            "add",
            "default",
            "via",
            &link.host_address.to_string(),
        ])
    })();
    if result.is_err() {
        teardown(link);
    }
    result
}

/// Removes the namespace (and with it the veth pair). Missing pieces are not an error.
pub fn teardown(link: &MachineLink) {
    let _ = ip(&["link", "del", &link.host_interface]);
    let _ = ip(&["netns", "del", &link.netns]);
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
}
