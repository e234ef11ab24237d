//! The edge proxy (Fly's fly-proxy): listeners, handlers (tls, http, proxy_proto, raw
//! TCP), routing by IP/SNI/Host, load balancing by load and closeness, request/response
//! headers, autostart/autostop, fly-replay, certificates (ACME) and metrics.
//!
//! ```no_run
//! # async fn run() -> anyhow::Result<()> {
//! use aloft_proxy::{Proxy, ProxyConfig};
//! let proxy = Proxy::new(ProxyConfig { region: "ams".into(), ..ProxyConfig::default() });
//! tokio::spawn(proxy.clone().follow_catalog());
//! proxy.serve(async { let _ = tokio::signal::ctrl_c().await; }).await
//! # }
//! ```

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ::http::HeaderValue;
use tokio::sync::{Notify, watch};

pub mod acme;
mod autoscale;
pub mod backend;
pub mod backhaul;
mod backhaul_worker;
mod body;
pub mod catalog;
pub mod compress;
pub mod control;
mod fast;
mod follow;
pub mod headers;
pub mod http;
mod http_date;
pub mod lb;
mod load_share;
pub mod metrics;
mod proxy_proto;
pub mod raw;
pub mod replay;
mod server;
pub mod statics;
pub mod tls;
mod udp;

pub use acme::AcmeConfig;
pub use catalog::{AppExtras, Catalog, CertificatePem, Health, Snapshot};

/// How a proxy runs. Construct with `..ProxyConfig::default()` so new fields keep working.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// The plain HTTP listener; it stands in for public port 80.
    pub http_listen: SocketAddr,
    /// The region this edge runs in (`Fly-Region`, closeness, autostop scope).
    pub region: String,
    /// `<app>.<base_domain>` routes to an app.
    pub base_domain: String,
    /// Base URL of the control plane (catalog stream, Machines API, certificates).
    pub control_url: String,
    /// Bearer token for the control plane.
    pub token: String,
    /// The TLS listener; it stands in for public port 443. `None`: no TLS listener.
    pub https_listen: Option<SocketAddr>,
    /// Where `/metrics` is served. `None`: nowhere.
    pub metrics_listen: Option<SocketAddr>,
    /// The name in `Via` headers (`1.1 <name>`).
    pub via_name: String,
    /// How long a request waits for a started machine or for capacity before a 503.
    pub machine_wait: Duration,
    /// How long a client may take to send a request head (also the keep-alive idle limit).
    pub header_read_timeout: Duration,
    /// How long a client may take to send a request body the proxy buffers (one of up to
    /// 1 MiB, kept so fly-replay can deliver it again), from the end of its head: a
    /// deadline for the whole body, not per read. Past it the request gets a 408.
    pub request_body_timeout: Duration,
    /// Most bytes of request bodies buffered at once, across all connections. Past it,
    /// further bodies are streamed to the app instead (without fly-replay redelivery).
    pub max_buffered_request_bytes: usize,
    /// How long a TLS handshake (or a PROXY/SNI peek) may take.
    pub handshake_timeout: Duration,
    /// Idle limit of raw TCP (passthrough) connections.
    pub tcp_idle_timeout: Duration,
    /// How long `serve` waits for in-flight requests after shutdown.
    pub drain_timeout: Duration,
    /// Largest request head accepted (bytes).
    pub max_header_bytes: usize,
    /// Most header fields in a request.
    pub max_headers: usize,
    /// Most client connections at once (further ones are refused).
    pub max_connections: usize,
    /// How often the autostop loop runs.
    pub autostop_interval: Duration,
    /// Bind listeners for every public port the apps' services expose (on shared
    /// addresses, the IP of `http_listen`) and on dedicated IPs from the catalog.
    pub service_listeners: bool,
    /// Certificates from an ACME CA. `None`: only certificates the control plane holds.
    pub acme: Option<AcmeConfig>,
    /// Serve a self-signed certificate for hostnames that have none yet.
    pub self_signed_fallback: bool,
    /// Backend connection pool.
    pub pool: backend::PoolSettings,
    /// How often to measure RTT to other regions' machines. `None`: never (distances and
    /// `Proxy::set_rtt` only).
    pub rtt_probe_interval: Option<Duration>,
    /// This host's number in 6PN addresses, once it has registered: machines whose
    /// addresses name another host are reached through that host's backhaul listener
    /// (with `backhaul` set) or not at all. `None`: every machine is local.
    pub host_number: Option<u32>,
    /// This host's end of the backhaul (over the mesh). `None`: not in a mesh.
    pub backhaul: Option<backhaul::BackhaulConfig>,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            http_listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            region: "local".to_string(),
            base_domain: "localhost".to_string(),
            control_url: "http://127.0.0.1:4280".to_string(),
            token: String::new(),
            https_listen: None,
            metrics_listen: None,
            via_name: "aloft".to_string(),
            machine_wait: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(10),
            request_body_timeout: Duration::from_secs(60),
            max_buffered_request_bytes: 64 * 1024 * 1024,
            tcp_idle_timeout: Duration::from_secs(600),
            drain_timeout: Duration::from_secs(30),
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            max_connections: 100_000,
            autostop_interval: Duration::from_secs(300),
            service_listeners: true,
            acme: None,
            self_signed_fallback: true,
            pool: backend::PoolSettings::default(),
            rtt_probe_interval: Some(Duration::from_secs(30)),
            host_number: None,
            backhaul: None,
        }
    }
}

/// Completes on SIGTERM or SIGINT: the usual `shutdown` future for [`Proxy::serve`], so
/// a `SIGTERM` drains gracefully.
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = term => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Addresses the proxy's listeners are bound to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BoundAddrs {
    pub http: Option<SocketAddr>,
    pub https: Option<SocketAddr>,
    pub metrics: Option<SocketAddr>,
}

/// Counts live client connections, so shutdown can wait for them to drain.
#[derive(Default)]
pub(crate) struct Tracker {
    active: AtomicUsize,
    idle: Notify,
}

pub(crate) struct TrackGuard(Arc<Tracker>);

impl Tracker {
    pub(crate) fn enter(self: &Arc<Self>) -> TrackGuard {
        self.active.fetch_add(1, Ordering::AcqRel);
        TrackGuard(self.clone())
    }
    pub(crate) fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }
}

impl Drop for TrackGuard {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// The edge proxy.
pub struct Proxy {
    pub(crate) config: ProxyConfig,
    pub(crate) catalog: Arc<Catalog>,
    pub(crate) metrics: metrics::Metrics,
    pub(crate) rtt: lb::RttTable,
    pub(crate) released: Arc<backend::Released>,
    pub(crate) request_ids: headers::RequestIds,
    pub(crate) via_h1: HeaderValue,
    pub(crate) via_h2: HeaderValue,
    pub(crate) region_value: HeaderValue,
    pub(crate) server_value: HeaderValue,
    pub(crate) control: Option<control::ControlClient>,
    pub(crate) tracker: Arc<Tracker>,
    /// Request bodies buffered across all connections.
    pub(crate) body_budget: Arc<body::BodyBudget>,
    pub(crate) certs: tls::CertStore,
    /// Machines this proxy asked to start, and when.
    pub(crate) starting: Mutex<HashMap<String, Instant>>,
    /// Listeners bound by `bind` and not yet served.
    pub(crate) bound: Mutex<Option<server::Bound>>,
    pub(crate) addrs: Mutex<BoundAddrs>,
    pub(crate) stop: watch::Sender<bool>,
    /// Answers to ACME HTTP-01 challenges: token → key authorization.
    pub(crate) http01: Mutex<HashMap<String, String>>,
    /// Where `[[statics]]` are read from; unset: requests under their prefixes go to the app.
    pub(crate) image_files: std::sync::OnceLock<Arc<dyn statics::ImageFiles>>,
    /// Other hosts' edges' load on this host's machines.
    pub(crate) load_reports: load_share::Reports,
}

impl Proxy {
    pub fn new(config: ProxyConfig) -> Arc<Proxy> {
        let place = config.host_number.map(|number| catalog::HostPlace {
            number,
            backhaul: config.backhaul.is_some(),
        });
        let catalog = Arc::new(Catalog::on_host(config.pool.clone(), place));
        let metrics = metrics::Metrics::new(&config.region, catalog.clone());
        let control = match control::ControlClient::new(&config.control_url, &config.token) {
            Ok(client) => Some(client),
            Err(e) => {
                tracing::warn!(error = %e, "no control plane client");
                None
            }
        };
        let (stop, _) = watch::channel(false);
        Arc::new(Proxy {
            rtt: lb::RttTable::new(&config.region),
            released: Arc::new(backend::Released::default()),
            request_ids: headers::RequestIds::new(&config.region),
            via_h1: headers::value_of(&format!("1.1 {}", config.via_name)),
            via_h2: headers::value_of(&format!("2 {}", config.via_name)),
            region_value: headers::value_of(&config.region),
            server_value: headers::value_of(&format!(
                "{}/{}",
                config.via_name,
                env!("CARGO_PKG_VERSION")
            )),
            certs: tls::CertStore::new(),
            catalog,
            metrics,
            control,
            tracker: Arc::new(Tracker::default()),
            body_budget: body::BodyBudget::new(config.max_buffered_request_bytes),
            starting: Mutex::new(HashMap::new()),
            bound: Mutex::new(None),
            addrs: Mutex::new(BoundAddrs::default()),
            stop,
            http01: Mutex::new(HashMap::new()),
            image_files: std::sync::OnceLock::new(),
            load_reports: load_share::Reports::default(),
            config,
        })
    }

    /// The catalog: `apply` updates to it to route without a control plane.
    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    pub fn config(&self) -> &ProxyConfig {
        &self.config
    }

    /// Serves `[[statics]]` from the images `files` reads (once; later calls are ignored).
    pub fn serve_statics_from(&self, files: Arc<dyn statics::ImageFiles>) {
        let _ = self.image_files.set(files);
    }

    /// Records a measured round-trip time from this edge to `region`.
    pub fn set_rtt(&self, region: &str, rtt: Duration) {
        self.rtt.set(region, rtt.as_secs_f64() * 1000.0);
    }

    /// How many requests are queued waiting for a machine under its hard limit.
    pub fn queued_requests(&self) -> usize {
        self.released
            .waiters
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The Prometheus text of every metric.
    pub fn render_metrics(&self) -> String {
        self.metrics.render()
    }

    /// Addresses of the bound listeners (after `bind` or once `serve` has bound them).
    pub fn local_addrs(&self) -> BoundAddrs {
        self.addrs.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Client connections currently open.
    pub fn active_connections(&self) -> usize {
        self.tracker.active()
    }

    /// Bytes of request bodies buffered right now, across all connections.
    pub fn buffered_request_bytes(&self) -> usize {
        self.body_budget.used()
    }

    /// Binds the configured listeners now (so a caller can learn ephemeral ports before
    /// `serve`). `serve` binds them itself when this was not called.
    pub async fn bind(self: &Arc<Self>) -> anyhow::Result<BoundAddrs> {
        let bound = server::bind_static(&self.config)?;
        let addrs = bound.addrs();
        *self.addrs.lock().unwrap_or_else(|p| p.into_inner()) = addrs.clone();
        *self.bound.lock().unwrap_or_else(|p| p.into_inner()) = Some(bound);
        Ok(addrs)
    }

    /// Follows the control plane's catalog stream forever: applies every update,
    /// reconnects with backoff, and resumes from the last sequence number it applied.
    pub async fn follow_catalog(self: Arc<Self>) {
        follow::follow(self).await
    }

    /// Serves until `shutdown` completes, then stops accepting, lets in-flight requests
    /// and open connections finish (up to `drain_timeout`) and returns.
    pub async fn serve(self: Arc<Self>, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        server::serve(self, shutdown).await
    }
}
