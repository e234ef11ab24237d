//! The private-network resolver (Fly's `fdaa::3`): authoritative `.internal` and
//! `.flycast` names built from the control plane's catalog stream, answered only within
//! the asking client's own 6PN network, and everything else forwarded to the host's
//! upstream resolvers. Served with hickory-server on `fdaa::3` (the network is read from
//! the client's address) and on every network's own `fdaa:<network>::3`.
//!
//! ```no_run
//! # async fn run() -> anyhow::Result<()> {
//! use aloft_dns::{DnsConfig, DnsServer};
//! let dns = DnsServer::new(DnsConfig { region: "ams".into(), ..DnsConfig::default() });
//! dns.listen("[fdaa::3]:53".parse()?, None)?;
//! tokio::spawn(dns.clone().follow_catalog("http://127.0.0.1:4280".into(), "token".into()));
//! # Ok(()) }
//! ```

pub mod follow;
pub mod forward;
mod server;
pub mod zone;

use std::collections::HashSet;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aloft_api::internal::CatalogUpdate;
use aloft_api::sixpn;
use arc_swap::ArcSwap;
use tokio::sync::watch;

pub use forward::{Forwarder, upstreams_from_resolv_conf};
pub use server::client_network;
pub use zone::{Answer, QueryKind, Zone};

/// Called for every network the resolver learns of, before it binds the network's DNS
/// address (the host makes the network's service block local there).
pub type NetworkHook = Arc<dyn Fn(u32) -> Result<(), String> + Send + Sync>;

#[derive(Clone)]
pub struct DnsConfig {
    /// The region of this host (`top<N>.nearest.of` sorts from here).
    pub region: String,
    /// Where non-platform names go.
    pub upstreams: Vec<SocketAddr>,
    /// How long one upstream may take.
    pub upstream_timeout: Duration,
    /// UDP sockets per listening address (SO_REUSEPORT); 0 = one per core.
    pub udp_sockets: usize,
    /// Serve `fdaa:<network>::3` for every network in the catalog, on this port.
    pub network_listeners: Option<u16>,
    /// Runs before a network's listener is bound.
    pub on_network: Option<NetworkHook>,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            region: "local".into(),
            upstreams: Vec::new(),
            upstream_timeout: Duration::from_secs(3),
            udp_sockets: 0,
            network_listeners: None,
            on_network: None,
        }
    }
}

impl std::fmt::Debug for DnsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsConfig")
            .field("region", &self.region)
            .field("upstreams", &self.upstreams)
            .field("network_listeners", &self.network_listeners)
            .finish_non_exhaustive()
    }
}

pub(crate) struct Shared {
    pub(crate) zone: ArcSwap<Zone>,
    pub(crate) forwarder: Forwarder,
}

pub struct DnsServer {
    config: DnsConfig,
    shared: Arc<Shared>,
    catalog: Mutex<zone::CatalogState>,
    changes: watch::Sender<u64>,
    servers: Mutex<Vec<hickory_server::Server<server::Handler>>>,
}

impl DnsServer {
    pub fn new(config: DnsConfig) -> Arc<Self> {
        let shared = Arc::new(Shared {
            zone: ArcSwap::from_pointee(Zone {
                region: config.region.clone(),
                ..Zone::default()
            }),
            forwarder: Forwarder::new(config.upstreams.clone(), config.upstream_timeout),
        });
        let (changes, _) = watch::channel(0);
        Arc::new(Self {
            config,
            shared,
            catalog: Mutex::new(zone::CatalogState::default()),
            changes,
            servers: Mutex::new(Vec::new()),
        })
    }

    /// Applies catalog updates and publishes the new zone (queries never wait for this).
    pub fn apply_all(&self, updates: impl IntoIterator<Item = CatalogUpdate>) {
        let mut catalog = self.catalog.lock().unwrap_or_else(|p| p.into_inner());
        for update in updates {
            catalog.apply(update);
        }
        let zone = catalog.build(&self.config.region);
        let seq = catalog.seq;
        drop(catalog);
        self.shared.zone.store(Arc::new(zone));
        self.changes.send_replace(seq);
    }

    pub fn apply(&self, update: CatalogUpdate) {
        self.apply_all(std::iter::once(update));
    }

    /// Sets the WireGuard peers of a network (`<peer>._peer.internal`).
    pub fn set_peers(&self, network: u32, peers: impl IntoIterator<Item = (String, Ipv6Addr)>) {
        let mut catalog = self.catalog.lock().unwrap_or_else(|p| p.into_inner());
        catalog.peers.insert(network, peers.into_iter().collect());
        let zone = catalog.build(&self.config.region);
        drop(catalog);
        self.shared.zone.store(Arc::new(zone));
    }

    /// The current zone.
    pub fn zone(&self) -> Arc<Zone> {
        self.shared.zone.load_full()
    }

    /// The last catalog sequence number applied.
    pub fn seq(&self) -> u64 {
        *self.changes.borrow()
    }

    /// Serves DNS on `addr` (UDP and TCP). `network`: answer as that network (a network's
    /// own DNS address); `None`: the network of each client's 6PN address.
    pub fn listen(&self, addr: SocketAddr, network: Option<u32>) -> std::io::Result<()> {
        let sockets = match self.config.udp_sockets {
            0 => std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            n => n,
        };
        let (udp, tcp) = server::bind(addr, sockets)?;
        let mut dns = hickory_server::Server::new(server::Handler {
            shared: self.shared.clone(),
            network,
        });
        for socket in udp {
            dns.register_socket(socket);
        }
        dns.register_listener(tcp, server::TCP_TIMEOUT, 64 * 1024);
        self.servers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(dns);
        tracing::info!(%addr, ?network, "DNS listening");
        Ok(())
    }

    /// Follows the control plane's catalog forever (see [`follow`]); with
    /// `network_listeners` set, also serves every network's own DNS address.
    pub async fn follow_catalog(self: Arc<Self>, control_url: String, token: String) {
        if let Some(port) = self.config.network_listeners {
            tokio::spawn(self.clone().serve_networks(port));
        }
        follow::follow(self, control_url, token).await
    }

    async fn serve_networks(self: Arc<Self>, port: u16) {
        let mut changes = self.changes.subscribe();
        let mut serving: HashSet<u32> = HashSet::new();
        loop {
            for network in self.zone().network_ids() {
                if serving.contains(&network) {
                    continue;
                }
                if let Some(hook) = &self.config.on_network
                    && let Err(err) = hook(network)
                {
                    tracing::warn!(network, error = %err, "preparing the network's service addresses");
                }
                let addr = SocketAddr::new(IpAddr::V6(sixpn::network_dns(network)), port);
                match self.listen(addr, Some(network)) {
                    Ok(()) => {
                        serving.insert(network);
                    }
                    Err(err) => {
                        tracing::warn!(%addr, error = %err, "cannot serve the network's DNS address");
                        serving.insert(network);
                    }
                }
            }
            if changes.changed().await.is_err() {
                return;
            }
        }
    }

    /// Waits until the catalog sequence `seq` (or a later one) is applied.
    pub async fn wait_for_seq(&self, seq: u64) {
        let mut changes = self.changes.subscribe();
        let _ = changes.wait_for(|applied| *applied >= seq).await;
    }
}
