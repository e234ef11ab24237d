//! The layout of 6PN (private network) addresses in `fdaa::/16`. Every part of the
//! platform reads addresses with these functions, so a route or a filter never needs a
//! lookup: the network, host and machine are in the address itself.
//!
//! ```text
//! bits   0..16   16..48       48..80      80..112          112..128
//!        fdaa    network id   host id     machine number   low 16 bits
//! ```
//!
//! - A network (an org's default network, or a custom `--network`) owns the /48
//!   `fdaa:<network>::/48`. Network 0 is the platform's own: `fdaa::3` is the DNS
//!   server on every host.
//! - A machine owns the /112 `fdaa:<network>:<host>:<machine>::/112` and its address is
//!   that prefix with low bits `2` (as Fly's `fdaa:0:18:a7b:7d:f066:b83b:2`).
//! - Host id 0 inside a network is the network's service block `fdaa:<network>::/80`,
//!   local on every host: `fdaa:<network>::3` is the network's DNS address (what a
//!   WireGuard peer uses), and Flycast address `k` (k ≥ 1) is
//!   `fdaa:<network>:0:0:<k>:1`.

use std::net::Ipv6Addr;

/// The first 16 bits of every 6PN address.
pub const PREFIX: u16 = 0xfdaa;

/// The DNS server every machine uses (`/etc/resolv.conf`), on every host.
pub const DNS: Ipv6Addr = Ipv6Addr::new(PREFIX, 0, 0, 0, 0, 0, 0, 3);

/// Length of a network's prefix.
pub const NETWORK_PREFIX_LEN: u8 = 48;
/// Length of a network's service block (Flycast addresses, the network's DNS address).
pub const SERVICE_PREFIX_LEN: u8 = 80;
/// Length of a machine's own prefix.
pub const MACHINE_PREFIX_LEN: u8 = 112;

fn split(value: u32) -> (u16, u16) {
    ((value >> 16) as u16, value as u16)
}

fn join(high: u16, low: u16) -> u32 {
    (u32::from(high) << 16) | u32::from(low)
}

/// The address of machine `machine` on host `host` in network `network`.
pub fn machine_address(network: u32, host: u32, machine: u32) -> Ipv6Addr {
    let (n1, n2) = split(network);
    let (h1, h2) = split(host);
    let (m1, m2) = split(machine);
    Ipv6Addr::new(PREFIX, n1, n2, h1, h2, m1, m2, 2)
}

/// `fdaa:<network>::` (the /48 of the network).
pub fn network_prefix(network: u32) -> Ipv6Addr {
    let (n1, n2) = split(network);
    Ipv6Addr::new(PREFIX, n1, n2, 0, 0, 0, 0, 0)
}

/// The network's DNS address, `fdaa:<network>::3`.
pub fn network_dns(network: u32) -> Ipv6Addr {
    let (n1, n2) = split(network);
    Ipv6Addr::new(PREFIX, n1, n2, 0, 0, 0, 0, 3)
}

/// Flycast address number `k` (k ≥ 1) of `network`.
pub fn flycast_address(network: u32, k: u32) -> Ipv6Addr {
    let (n1, n2) = split(network);
    let (k1, k2) = split(k);
    Ipv6Addr::new(PREFIX, n1, n2, 0, 0, k1, k2, 1)
}

/// A host's own address on the backhaul, `fdaa:0:0:<host>::1` (network 0 is the
/// platform's, so no machine is ever in it). The mesh carries it like a machine address
/// of that host: its proxy's backhaul listener is there.
pub fn host_address(host: u32) -> Ipv6Addr {
    let (h1, h2) = split(host);
    Ipv6Addr::new(PREFIX, 0, 0, h1, h2, 0, 0, 1)
}

/// The port of a host proxy's backhaul listener on [`host_address`]: edges on other hosts
/// reach this host's machines through it.
pub const BACKHAUL_PORT: u16 = 4290;

/// The parts of a 6PN address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Parts {
    pub network: u32,
    pub host: u32,
    pub machine: u32,
}

/// Reads network, host and machine from an address in `fdaa::/16`.
pub fn parts(address: &Ipv6Addr) -> Option<Parts> {
    let s = address.segments();
    if s[0] != PREFIX {
        return None;
    }
    Some(Parts {
        network: join(s[1], s[2]),
        host: join(s[3], s[4]),
        machine: join(s[5], s[6]),
    })
}

/// The network an address belongs to (`None` outside `fdaa::/16`).
pub fn network_of(address: &Ipv6Addr) -> Option<u32> {
    parts(address).map(|p| p.network)
}

/// Whether the address is in a network's service block (host id 0): a Flycast address
/// or a network's DNS address.
pub fn is_service_address(address: &Ipv6Addr) -> bool {
    parts(address).is_some_and(|p| p.host == 0)
}

/// `fdaa:<network>::/48` as text.
pub fn network_cidr(network: u32) -> String {
    format!("{}/{NETWORK_PREFIX_LEN}", network_prefix(network))
}

/// `fdaa:<network>::/80` as text.
pub fn service_cidr(network: u32) -> String {
    format!("{}/{SERVICE_PREFIX_LEN}", network_prefix(network))
}

/// The machine's /112 as text, from its address.
pub fn machine_cidr(address: &Ipv6Addr) -> String {
    let mut s = address.segments();
    s[7] = 0;
    format!("{}/{MACHINE_PREFIX_LEN}", Ipv6Addr::from(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_addresses_embed_network_host_and_machine() {
        let address = machine_address(0x18, 0x0a7b_007d, 0xf066_b83b);
        assert_eq!(address.to_string(), "fdaa:0:18:a7b:7d:f066:b83b:2");
        assert_eq!(
            parts(&address),
            Some(Parts {
                network: 0x18,
                host: 0x0a7b_007d,
                machine: 0xf066_b83b
            })
        );
        assert_eq!(machine_cidr(&address), "fdaa:0:18:a7b:7d:f066:b83b:0/112");
        assert_eq!(network_cidr(0x18), "fdaa:0:18::/48");
        assert_eq!(
            network_of(&"fdaa:2:45b::1".parse().unwrap()),
            Some(0x0002_045b)
        );
        assert_eq!(network_of(&"fd00::1".parse().unwrap()), None);
    }

    #[test]
    fn host_addresses_name_their_host_in_network_zero() {
        let address = host_address(0x0001_0002);
        assert_eq!(address.to_string(), "fdaa::1:2:0:0:1");
        assert_eq!(
            parts(&address),
            Some(Parts {
                network: 0,
                host: 0x0001_0002,
                machine: 0
            })
        );
        assert!(!is_service_address(&host_address(3)));
    }

    #[test]
    fn service_block_holds_dns_and_flycast() {
        assert_eq!(DNS.to_string(), "fdaa::3");
        assert_eq!(network_dns(1).to_string(), "fdaa:0:1::3");
        let flycast = flycast_address(1, 5);
        assert_eq!(flycast.to_string(), "fdaa:0:1::5:1");
        assert!(is_service_address(&flycast));
        assert_eq!(network_of(&flycast), Some(1));
        assert!(!is_service_address(&machine_address(1, 1, 1)));
        assert_eq!(service_cidr(0x0001_0002), "fdaa:1:2::/80");
    }
}
