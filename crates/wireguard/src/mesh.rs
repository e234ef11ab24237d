//! The mesh: one TUN device, one UDP socket, a WireGuard session per peer host, and three
//! threads (TUN to network, network to TUN, timers).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, UdpSocket};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use aloft_api::sixpn;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};

use crate::keys::{PrivateKey, PublicKey};
use crate::tun::Tun;

/// Room for a full-size packet plus WireGuard's 32 bytes of header and tag.
const BUFFER: usize = 65_535 + 64;
/// The TUN device's MTU: a 1500-byte underlay less IPv6 (40), UDP (8) and WireGuard (32).
pub const MTU: u32 = 1420;
/// The UDP socket's buffers (the kernel caps them at net.core.rmem_max / wmem_max).
const SOCKET_BUFFER: usize = 4 << 20;
/// How long a blocking read waits before the thread looks at the stop flag.
const POLL: Duration = Duration::from_millis(200);
/// Handshakes per second before the mesh answers with cookies. Each handshake is counted
/// twice (once before the key exchange, once by the session), so this is twice the rate.
const HANDSHAKES_PER_SECOND: u64 = 200;
/// A session's index is 24 bits in WireGuard (boringtun keeps the low 8 for the session).
const INDEX_LIMIT: u32 = 1 << 24;

#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error("creating TUN device {name}: {source} (needs CAP_NET_ADMIN and /dev/net/tun)")]
    Tun {
        name: String,
        source: std::io::Error,
    },
    #[error("binding the mesh's UDP socket to {addr}: {source}")]
    Socket {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{what}: {detail}")]
    Command { what: String, detail: String },
    #[error("peer for host {host}: {reason}")]
    Peer { host: u32, reason: String },
}

/// Another host of the mesh.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    /// The host number in 6PN addresses (bits 48..80).
    pub host: u32,
    pub public_key: PublicKey,
    /// Where its mesh listens (its address on the datacenter network).
    pub endpoint: SocketAddr,
}

pub struct MeshConfig {
    pub private_key: PrivateKey,
    /// This host's number in 6PN addresses.
    pub host: u32,
    pub listen: SocketAddr,
    /// The TUN device's name. Not `al*`: the agent's packet filter reserves that for
    /// machines' links.
    pub tun_name: String,
    /// IPv6 prefixes routed into the mesh (normally `fdaa::/16`).
    pub routes: Vec<String>,
    pub peers: Vec<Peer>,
}

/// What the mesh has done, for metrics and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MeshStats {
    pub packets_sent: u64,
    pub packets_received: u64,
    /// Handshakes from keys that are no peer of this host.
    pub refused_unknown_key: u64,
    /// Decrypted packets whose source is not an address of the sending host, or whose
    /// destination is not this host.
    pub refused_address: u64,
    /// Packets from the TUN device to a host that is no peer.
    pub no_route: u64,
}

#[derive(Default)]
struct Counters {
    packets_sent: AtomicU64,
    packets_received: AtomicU64,
    refused_unknown_key: AtomicU64,
    refused_address: AtomicU64,
    no_route: AtomicU64,
}

struct PeerState {
    peer: Peer,
    index: u32,
    tunnel: Mutex<Tunn>,
    endpoint: Mutex<SocketAddr>,
}

impl PeerState {
    fn endpoint(&self) -> SocketAddr {
        *self.endpoint.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[derive(Default)]
struct PeerTable {
    by_host: HashMap<u32, Arc<PeerState>>,
    by_key: HashMap<PublicKey, Arc<PeerState>>,
    by_index: HashMap<u32, Arc<PeerState>>,
}

struct Shared {
    key: PrivateKey,
    host: u32,
    tun: Tun,
    udp: UdpSocket,
    peers: RwLock<Arc<PeerTable>>,
    rate_limiter: Arc<RateLimiter>,
    next_index: AtomicU32,
    stop: AtomicBool,
    counters: Counters,
    last_warning: Mutex<Option<Instant>>,
}

/// A running mesh; dropping it stops its threads (the TUN device goes with the process).
pub struct Mesh {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

/// Runs `ip ARGS` (iproute2), its stderr as the error.
pub fn ip(args: &[&str]) -> Result<(), MeshError> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| MeshError::Command {
            what: format!("ip {}", args.join(" ")),
            detail: e.to_string(),
        })?;
    if output.status.success() {
        Ok(())
    } else {
        Err(MeshError::Command {
            what: format!("ip {}", args.join(" ")),
            detail: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        })
    }
}

impl Mesh {
    /// Creates the TUN device and routes in the calling thread's network namespace, binds
    /// the socket, and starts the mesh's threads.
    pub fn start(config: MeshConfig) -> Result<Self, MeshError> {
        if config.tun_name.starts_with("al") {
            return Err(MeshError::Tun {
                name: config.tun_name,
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "names starting with `al` are machines' links",
                ),
            });
        }
        let tun = Tun::create(&config.tun_name).map_err(|source| MeshError::Tun {
            name: config.tun_name.clone(),
            source,
        })?;
        ip(&[
            "link",
            "set",
            "dev",
            &config.tun_name,
            "mtu",
            &MTU.to_string(),
            "up",
        ])?;
        for route in &config.routes {
            ip(&["-6", "route", "replace", route, "dev", &config.tun_name])?;
        }
        let udp = UdpSocket::bind(config.listen).map_err(|source| MeshError::Socket {
            addr: config.listen,
            source,
        })?;
        // Bursts from the TUN side outrun one receiving thread for a moment; a drop here
        // is a TCP retransmission inside the mesh.
        let sock = socket2::SockRef::from(&udp);
        let _ = sock.set_recv_buffer_size(SOCKET_BUFFER);
        let _ = sock.set_send_buffer_size(SOCKET_BUFFER);
        udp.set_read_timeout(Some(POLL))
            .map_err(|source| MeshError::Socket {
                addr: config.listen,
                source,
            })?;
        let public = config.private_key.public_key().dalek();
        let shared = Arc::new(Shared {
            rate_limiter: Arc::new(RateLimiter::new(&public, HANDSHAKES_PER_SECOND)),
            key: config.private_key,
            host: config.host,
            tun,
            udp,
            peers: RwLock::new(Arc::new(PeerTable::default())),
            next_index: AtomicU32::new(1),
            stop: AtomicBool::new(false),
            counters: Counters::default(),
            last_warning: Mutex::new(None),
        });
        shared.set_peers(config.peers)?;
        let mut threads = Vec::new();
        for (name, body) in [
            ("mesh-out", Shared::outbound as fn(&Shared)),
            ("mesh-in", Shared::inbound),
            ("mesh-timers", Shared::timers),
        ] {
            let shared = shared.clone();
            let thread = std::thread::Builder::new()
                .name(name.into())
                .spawn(move || body(&shared))
                .map_err(|e| MeshError::Command {
                    what: format!("starting thread {name}"),
                    detail: e.to_string(),
                })?;
            threads.push(thread);
        }
        tracing::info!(host = config.host, listen = %config.listen, public_key = %shared.key.public_key(), "mesh up");
        Ok(Self { shared, threads })
    }

    /// Replaces the set of peers. A peer whose host and key are unchanged keeps its
    /// session (its endpoint is updated); a new or re-keyed one starts afresh.
    pub fn set_peers(&self, peers: Vec<Peer>) -> Result<(), MeshError> {
        self.shared.set_peers(peers)
    }

    pub fn public_key(&self) -> PublicKey {
        self.shared.key.public_key()
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.shared.udp.local_addr().ok()
    }

    pub fn stats(&self) -> MeshStats {
        let c = &self.shared.counters;
        MeshStats {
            packets_sent: c.packets_sent.load(Ordering::Relaxed),
            packets_received: c.packets_received.load(Ordering::Relaxed),
            refused_unknown_key: c.refused_unknown_key.load(Ordering::Relaxed),
            refused_address: c.refused_address.load(Ordering::Relaxed),
            no_route: c.no_route.load(Ordering::Relaxed),
        }
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

impl Shared {
    fn table(&self) -> Arc<PeerTable> {
        self.peers.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_peers(&self, peers: Vec<Peer>) -> Result<(), MeshError> {
        let old = self.table();
        let mut table = PeerTable::default();
        for peer in peers {
            if peer.host == self.host {
                return Err(MeshError::Peer {
                    host: peer.host,
                    reason: "that is this host's own number".into(),
                });
            }
            if table.by_host.contains_key(&peer.host) {
                return Err(MeshError::Peer {
                    host: peer.host,
                    reason: "two peers claim this host number".into(),
                });
            }
            if table.by_key.contains_key(&peer.public_key) {
                return Err(MeshError::Peer {
                    host: peer.host,
                    reason: format!("public key {} is another peer's", peer.public_key),
                });
            }
            let state = match old.by_host.get(&peer.host) {
                Some(existing) if existing.peer.public_key == peer.public_key => {
                    *existing.endpoint.lock().unwrap_or_else(|p| p.into_inner()) = peer.endpoint;
                    existing.clone()
                }
                _ => Arc::new(self.new_peer(peer)?),
            };
            table.by_key.insert(state.peer.public_key, state.clone());
            table.by_index.insert(state.index, state.clone());
            table.by_host.insert(state.peer.host, state);
        }
        *self.peers.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(table);
        Ok(())
    }

    fn new_peer(&self, peer: Peer) -> Result<PeerState, MeshError> {
        let index = self.next_index.fetch_add(1, Ordering::Relaxed) % INDEX_LIMIT;
        let tunnel = Tunn::new(
            self.key.secret().clone(),
            peer.public_key.dalek(),
            None,
            None,
            index,
            Some(self.rate_limiter.clone()),
        )
        .map_err(|reason| MeshError::Peer {
            host: peer.host,
            reason: reason.to_string(),
        })?;
        Ok(PeerState {
            endpoint: Mutex::new(peer.endpoint),
            peer,
            index,
            tunnel: Mutex::new(tunnel),
        })
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Logs a refusal at most once a second (a flood must not flood the log too).
    fn warn_refused(&self, what: &str, from: SocketAddr) {
        let mut last = self.last_warning.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
            *last = Some(Instant::now());
            tracing::warn!(%from, "mesh packet refused: {what}");
        }
    }

    fn send(&self, packet: &[u8], to: SocketAddr) {
        match self.udp.send_to(packet, to) {
            Ok(_) => {
                self.counters.packets_sent.fetch_add(1, Ordering::Relaxed);
            }
            Err(err) => tracing::debug!(%to, error = %err, "mesh send failed"),
        }
    }

    /// TUN → network: the destination's host number picks the peer.
    fn outbound(&self) {
        let mut packet = vec![0u8; BUFFER];
        let mut out = vec![0u8; BUFFER];
        while !self.stopping() {
            let n = match self.tun.read_timeout(&mut packet, POLL) {
                Ok(0) => continue,
                Ok(n) => n,
                Err(err) => {
                    tracing::error!(error = %err, "reading the mesh's TUN device");
                    std::thread::sleep(POLL);
                    continue;
                }
            };
            let Some(IpAddr::V6(destination)) = Tunn::dst_address(&packet[..n]) else {
                continue;
            };
            let Some(host) = sixpn::parts(&destination).map(|p| p.host) else {
                continue;
            };
            let Some(peer) = self.table().by_host.get(&host).cloned() else {
                self.counters.no_route.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let mut tunnel = peer.tunnel.lock().unwrap_or_else(|p| p.into_inner());
            match tunnel.encapsulate(&packet[..n], &mut out) {
                TunnResult::WriteToNetwork(datagram) => self.send(datagram, peer.endpoint()),
                TunnResult::Err(err) => {
                    tracing::debug!(host, error = ?err, "mesh encapsulation failed")
                }
                _ => {}
            }
        }
    }

    /// The peer a datagram is from: by its static key for a handshake initiation, by our
    /// session index for everything else.
    fn peer_of(&self, packet: &Packet<'_>, table: &PeerTable) -> Option<Arc<PeerState>> {
        match packet {
            Packet::HandshakeInit(init) => {
                let public = self.key.public_key().dalek();
                let half = parse_handshake_anon(self.key.secret(), &public, init).ok()?;
                table
                    .by_key
                    .get(&PublicKey(half.peer_static_public))
                    .cloned()
            }
            Packet::HandshakeResponse(response) => {
                table.by_index.get(&(response.receiver_idx >> 8)).cloned()
            }
            Packet::PacketCookieReply(reply) => {
                table.by_index.get(&(reply.receiver_idx >> 8)).cloned()
            }
            Packet::PacketData(data) => table.by_index.get(&(data.receiver_idx >> 8)).cloned(),
        }
    }

    /// Network → TUN, accepting only packets between the sending host's machines and ours.
    fn inbound(&self) {
        let mut datagram = vec![0u8; BUFFER];
        let mut out = vec![0u8; BUFFER];
        while !self.stopping() {
            let (n, from) = match self.udp.recv_from(&mut datagram) {
                Ok(received) => received,
                Err(err)
                    if matches!(
                        err.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    continue;
                }
                Err(err) => {
                    tracing::error!(error = %err, "reading the mesh's socket");
                    std::thread::sleep(POLL);
                    continue;
                }
            };
            let table = self.table();
            // MACs and the handshake rate limit first: only then the key exchange.
            let packet =
                match self
                    .rate_limiter
                    .verify_packet(Some(from.ip()), &datagram[..n], &mut out)
                {
                    Ok(packet) => packet,
                    Err(TunnResult::WriteToNetwork(cookie)) => {
                        self.send(cookie, from);
                        continue;
                    }
                    Err(_) => continue,
                };
            let Some(peer) = self.peer_of(&packet, &table) else {
                if matches!(packet, Packet::HandshakeInit(_)) {
                    self.counters
                        .refused_unknown_key
                        .fetch_add(1, Ordering::Relaxed);
                    self.warn_refused("a handshake from a key that is no peer", from);
                }
                continue;
            };
            let mut tunnel = peer.tunnel.lock().unwrap_or_else(|p| p.into_inner());
            match tunnel.decapsulate(Some(from.ip()), &datagram[..n], &mut out) {
                TunnResult::WriteToNetwork(reply) => {
                    *peer.endpoint.lock().unwrap_or_else(|p| p.into_inner()) = from;
                    self.send(reply, from);
                    while let TunnResult::WriteToNetwork(queued) =
                        tunnel.decapsulate(None, &[], &mut out)
                    {
                        self.send(queued, from);
                    }
                }
                TunnResult::WriteToTunnelV6(inner, source) => {
                    *peer.endpoint.lock().unwrap_or_else(|p| p.into_inner()) = from;
                    if inner.is_empty() {
                        continue; // a keepalive
                    }
                    let destination = Tunn::dst_address(inner);
                    if !self.allowed(&peer.peer, source, destination) {
                        self.counters
                            .refused_address
                            .fetch_add(1, Ordering::Relaxed);
                        self.warn_refused(
                            &format!(
                                "host {} sent {source} -> {destination:?}, which is not between its machines and this host's",
                                peer.peer.host
                            ),
                            from,
                        );
                        continue;
                    }
                    self.counters
                        .packets_received
                        .fetch_add(1, Ordering::Relaxed);
                    if let Err(err) = self.tun.write(inner) {
                        tracing::debug!(error = %err, "writing to the mesh's TUN device");
                    }
                }
                TunnResult::WriteToTunnelV4(..) => {
                    self.counters
                        .refused_address
                        .fetch_add(1, Ordering::Relaxed);
                }
                TunnResult::Err(err) => {
                    tracing::debug!(%from, error = ?err, "mesh decapsulation failed")
                }
                TunnResult::Done => {}
            }
        }
    }

    /// A peer speaks only for its own machines, and only to this host's.
    fn allowed(&self, peer: &Peer, source: Ipv6Addr, destination: Option<IpAddr>) -> bool {
        let from_peer = sixpn::parts(&source).is_some_and(|p| p.host == peer.host);
        let to_us = match destination {
            Some(IpAddr::V6(destination)) => {
                sixpn::parts(&destination).is_some_and(|p| p.host == self.host)
            }
            _ => false,
        };
        from_peer && to_us
    }

    /// Handshake retries, rekeys and keepalives; the rate limiter's window.
    fn timers(&self) {
        let mut out = vec![0u8; BUFFER];
        let mut window = Instant::now();
        while !self.stopping() {
            std::thread::sleep(Duration::from_millis(250));
            if window.elapsed() >= Duration::from_secs(1) {
                self.rate_limiter.reset_count();
                window = Instant::now();
            }
            for peer in self.table().by_host.values() {
                let mut tunnel = peer.tunnel.lock().unwrap_or_else(|p| p.into_inner());
                match tunnel.update_timers(&mut out) {
                    TunnResult::WriteToNetwork(datagram) => self.send(datagram, peer.endpoint()),
                    TunnResult::Err(err) => {
                        tracing::trace!(host = peer.peer.host, error = ?err, "mesh timers")
                    }
                    _ => {}
                }
            }
        }
    }
}
