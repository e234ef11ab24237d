//! Where the pull client may connect. Images come from registries outside the platform
//! (deploys of `--image other.registry/app:tag`, pull-through), so a tenant could name an
//! address inside the host's networks (loopback services, the cloud metadata service at
//! 169.254.169.254, private LANs) and use the platform to reach it. An [`EgressPolicy`]
//! allows only public addresses, except for the origins the operator named.
//!
//! The check is on the resolved addresses, at connect time: a name is resolved once, the
//! addresses are checked, and the connection goes to a checked address, so a DNS answer
//! that changes between a check and the connect (rebinding) cannot slip through.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::net::TcpStream;

/// How long a TCP connect may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// Which addresses a client may connect to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EgressPolicy {
    /// Any address at all (the platform's own registry, reached over loopback).
    unrestricted: bool,
    /// Origins (`host:port`, lower case) allowed at any address: named by the operator.
    trusted: Vec<String>,
}

/// Why a connection was not made.
#[derive(Debug, thiserror::Error)]
#[error(
    "refusing to connect to {host}: it resolves to {addresses}, which is not a public address (loopback, private, link-local and unspecified addresses are reachable only for registries the operator allows)"
)]
pub struct EgressRefused {
    pub host: String,
    pub addresses: String,
}

impl EgressPolicy {
    /// Connects anywhere: only for the platform's own registry.
    pub fn unrestricted() -> EgressPolicy {
        EgressPolicy {
            unrestricted: true,
            trusted: Vec::new(),
        }
    }

    /// Public addresses only.
    pub fn public_only() -> EgressPolicy {
        EgressPolicy::default()
    }

    /// Also allows `origin` at any address: a URL (`http://127.0.0.1:5000`), or
    /// `host:port`, or a bare host (port 443).
    pub fn trust(mut self, origin: &str) -> EgressPolicy {
        if let Some(authority) = authority_of(origin)
            && !self.trusted.contains(&authority)
        {
            self.trusted.push(authority);
        }
        self
    }

    /// Whether `host:port` was named by the operator (or the policy is unrestricted).
    pub fn trusts(&self, host: &str, port: u16) -> bool {
        if self.unrestricted {
            return true;
        }
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let authority = format_authority(&host.to_ascii_lowercase(), port);
        self.trusted.contains(&authority)
    }

    /// Resolves `host` once, checks every address it gave, and connects to a checked one.
    pub async fn connect(&self, host: &str, port: u16) -> io::Result<TcpStream> {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let resolved: Vec<SocketAddr> =
            tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::lookup_host((host, port)))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("resolving {host}")))??
                .collect();
        let allowed = self.check(host, port, &resolved)?;
        let mut last = io::Error::new(
            io::ErrorKind::NotFound,
            format!("{host} resolves to no address"),
        );
        for address in allowed {
            match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(address)).await {
                Ok(Ok(stream)) => {
                    let _ = stream.set_nodelay(true);
                    return Ok(stream);
                }
                Ok(Err(e)) => last = e,
                Err(_) => {
                    last = io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("connecting to {address}: no answer within {CONNECT_TIMEOUT:?}"),
                    )
                }
            }
        }
        Err(last)
    }

    /// The addresses of `resolved` this policy lets `host:port` connect to; an error
    /// naming them when there is none.
    pub fn check(
        &self,
        host: &str,
        port: u16,
        resolved: &[SocketAddr],
    ) -> io::Result<Vec<SocketAddr>> {
        if self.trusts(host, port) {
            return Ok(resolved.to_vec());
        }
        let allowed: Vec<SocketAddr> = resolved
            .iter()
            .copied()
            .filter(|a| is_public(a.ip()))
            .collect();
        if allowed.is_empty() && !resolved.is_empty() {
            let addresses = resolved
                .iter()
                .map(|a| a.ip().to_string())
                .collect::<Vec<_>>()
                .join(", ");
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                EgressRefused {
                    host: host.to_string(),
                    addresses,
                },
            ));
        }
        Ok(allowed)
    }
}

fn format_authority(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// `host:port` (lower case) of a URL or authority; the port defaults by scheme (443
/// without one).
fn authority_of(origin: &str) -> Option<String> {
    let origin = origin.trim();
    let (default_port, rest) = if let Some(rest) = origin.strip_prefix("http://") {
        (80, rest)
    } else if let Some(rest) = origin.strip_prefix("https://") {
        (443, rest)
    } else {
        (443, origin)
    };
    let authority = rest.split('/').next()?.rsplit('@').next()?;
    if authority.is_empty() {
        return None;
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None => default_port,
        };
        (host.to_string(), port)
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host.to_string(), port.parse().ok()?),
            None => (authority.to_string(), default_port),
        }
    };
    Some(format_authority(&host.to_ascii_lowercase(), port))
}

/// Whether an address is on the public internet: not loopback, unspecified, private
/// (RFC 1918, ULA), shared (CGNAT 100.64/10), link-local (169.254/16, fe80::/10, where
/// cloud metadata services live), multicast, broadcast, documentation or reserved.
/// IPv6 forms that carry an IPv4 address (mapped, compatible, NAT64, 6to4) are judged by
/// that address.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6),
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(a == 0                                    // "this network", 0.0.0.0
        || a == 10                              // RFC 1918
        || a == 127                             // loopback
        || (a == 100 && (64..128).contains(&b)) // CGNAT
        || (a == 169 && b == 254)               // link-local, metadata services
        || (a == 172 && (16..32).contains(&b))  // RFC 1918
        || (a == 192 && b == 168)               // RFC 1918
        || (a == 192 && b == 0 && c == 0)       // IETF protocol assignments
        || (a == 192 && b == 0 && c == 2)       // documentation
        || (a == 198 && (b == 18 || b == 19))   // benchmarking
        || (a == 198 && b == 51 && c == 100)    // documentation
        || (a == 203 && b == 0 && c == 113)     // documentation
        || a >= 224) // multicast, reserved, broadcast
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let segments = ip.segments();
    if let Some(v4) = ip.to_ipv4_mapped() {
        return is_public_v4(v4);
    }
    // IPv4-compatible (::a.b.c.d, deprecated) and NAT64 (64:ff9b::/96).
    if segments[..6] == [0, 0, 0, 0, 0, 0] && !ip.is_loopback() && !ip.is_unspecified()
        || segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0]
    {
        let [.., a, b] = segments;
        return is_public_v4(Ipv4Addr::new(
            (a >> 8) as u8,
            a as u8,
            (b >> 8) as u8,
            b as u8,
        ));
    }
    // 6to4 (2002::/16) carries an IPv4 address in its next 32 bits.
    if segments[0] == 0x2002 {
        let (a, b) = (segments[1], segments[2]);
        return is_public_v4(Ipv4Addr::new(
            (a >> 8) as u8,
            a as u8,
            (b >> 8) as u8,
            b as u8,
        ));
    }
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || (segments[0] & 0xfe00) == 0xfc00 // ULA fc00::/7 (the 6PN fdaa::/16 included)
        || (segments[0] & 0xffc0) == 0xfe80 // link-local fe80::/10
        || (segments[0] & 0xffc0) == 0xfec0 // site-local (deprecated) fec0::/10
        || (segments[0] == 0x2001 && segments[1] == 0x0db8) // documentation
        || (segments[0] == 0x0100 && segments[1..4] == [0, 0, 0])) // discard-only 100::/64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_and_special_addresses_are_not_public() {
        for blocked in [
            "127.0.0.1",
            "127.8.9.10",
            "0.0.0.0",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "100.64.0.1",
            "100.127.255.254",
            "169.254.169.254",
            "224.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "fe80::1",
            "fd00::1",
            "fdaa:0:1::3",
            "fc00::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "2002:7f00:1::1",
            "ff02::1",
        ] {
            let ip: IpAddr = blocked.parse().unwrap();
            assert!(!is_public(ip), "{blocked} must not count as public");
        }
        for public in [
            "1.1.1.1",
            "8.8.8.8",
            "100.63.255.255",
            "100.128.0.1",
            "172.15.0.1",
            "172.32.0.1",
            "2606:4700:4700::1111",
            "2a00:1450:4001:80b::200e",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
        ] {
            let ip: IpAddr = public.parse().unwrap();
            assert!(is_public(ip), "{public} is public");
        }
    }

    #[test]
    fn operators_name_origins_that_may_be_private() {
        let policy = EgressPolicy::public_only()
            .trust("http://127.0.0.1:5000/")
            .trust("Registry.LAN:8443")
            .trust("https://[fd00::5]");
        assert!(policy.trusts("127.0.0.1", 5000));
        assert!(!policy.trusts("127.0.0.1", 5001));
        assert!(policy.trusts("registry.lan", 8443));
        assert!(policy.trusts("[fd00::5]", 443));
        assert!(!policy.trusts("localhost", 5000));
        assert!(EgressPolicy::unrestricted().trusts("127.0.0.1", 1));
    }

    /// The check is on what a name resolved to, and the connection may only go to an
    /// address that passed it: a name that resolves to a public and a private address
    /// (a rebinding attempt) connects to the public one only.
    #[test]
    fn checks_the_resolved_addresses() {
        let policy = EgressPolicy::public_only();
        let private: SocketAddr = "169.254.169.254:80".parse().unwrap();
        let public: SocketAddr = "93.184.215.14:80".parse().unwrap();
        let refused = policy
            .check("metadata.example", 80, &[private])
            .expect_err("a name for a link-local address is refused");
        assert_eq!(refused.kind(), io::ErrorKind::PermissionDenied);
        assert!(refused.to_string().contains("169.254.169.254"), "{refused}");
        assert_eq!(
            policy
                .check("mixed.example", 80, &[private, public])
                .unwrap(),
            vec![public]
        );
    }

    #[tokio::test]
    async fn connect_refuses_loopback_names_without_connecting() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        for host in ["127.0.0.1", "localhost"] {
            let err = EgressPolicy::public_only()
                .connect(host, port)
                .await
                .expect_err("loopback refused");
            assert_eq!(err.kind(), io::ErrorKind::PermissionDenied, "{err}");
        }
        let accepted = tokio::time::timeout(Duration::from_millis(200), listener.accept()).await;
        assert!(accepted.is_err(), "nothing connected to the listener");
        let trusted = EgressPolicy::public_only().trust(&format!("127.0.0.1:{port}"));
        trusted
            .connect("127.0.0.1", port)
            .await
            .expect("a trusted origin connects");
    }
}
