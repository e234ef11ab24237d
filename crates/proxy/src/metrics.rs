//! Prometheus metrics (`/metrics`): per app and region, requests by status, latency
//! histograms, concurrency per machine, TLS handshakes, connections.
//!
//! Per-app request counters are plain atomics held by the app's view in the catalog
//! snapshot, so recording a request takes no lock and allocates nothing; they are turned
//! into metric families only when scraped, by a prometheus-client `Collector`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::catalog::Catalog;

/// Upper bounds (seconds) of the latency histogram buckets.
const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Default)]
struct AtomicHistogram {
    buckets: [AtomicU64; BUCKETS.len()],
    sum_nanos: AtomicU64,
    count: AtomicU64,
}

impl AtomicHistogram {
    fn observe(&self, seconds: f64) {
        if let Some(i) = BUCKETS.iter().position(|b| seconds <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.sum_nanos
            .fetch_add((seconds * 1e9) as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn encode(&self, mut encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        let mut cumulative = 0;
        let mut buckets: Vec<(f64, u64)> = BUCKETS
            .iter()
            .zip(self.buckets.iter())
            .map(|(bound, n)| {
                cumulative += n.load(Ordering::Relaxed);
                (*bound, cumulative)
            })
            .collect();
        let count = self.count.load(Ordering::Relaxed);
        buckets.push((f64::MAX, count));
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }
}

/// Request counters of one app on this edge.
pub struct AppStats {
    pub app: String,
    /// Responses by status code (index = code - 100).
    statuses: Box<[AtomicU64; 500]>,
    /// Latency by status class (1xx..5xx).
    latency: [AtomicHistogram; 5],
    pub tcp_connects: AtomicU64,
}

impl AppStats {
    fn new(app: &str) -> Self {
        AppStats {
            app: app.to_string(),
            statuses: Box::new(std::array::from_fn(|_| AtomicU64::new(0))),
            latency: Default::default(),
            tcp_connects: AtomicU64::new(0),
        }
    }

    pub fn record(&self, status: u16, seconds: f64) {
        if (100..600).contains(&status) {
            self.statuses[(status - 100) as usize].fetch_add(1, Ordering::Relaxed);
            self.latency[(status / 100 - 1) as usize].observe(seconds);
        }
    }
}

/// A request being timed; recorded when its response ends.
pub struct RequestDone {
    pub stats: Option<Arc<AppStats>>,
    pub edge: Arc<EdgeStats>,
    pub status: u16,
    pub start: Instant,
}

impl RequestDone {
    pub fn finish(self) {
        let seconds = self.start.elapsed().as_secs_f64();
        self.edge.record(self.status, seconds);
        if let Some(stats) = &self.stats {
            stats.record(self.status, seconds);
        }
    }
}

/// Counters of the whole edge (every app, and requests that matched none).
pub struct EdgeStats {
    inner: AppStats,
}

impl EdgeStats {
    pub fn record(&self, status: u16, seconds: f64) {
        self.inner.record(status, seconds);
    }
}

/// Stats of every app, kept across catalog snapshots.
#[derive(Default)]
pub struct StatsTable {
    apps: Mutex<HashMap<String, Arc<AppStats>>>,
}

impl StatsTable {
    pub fn for_app(&self, app: &str) -> Arc<AppStats> {
        let mut apps = self.apps.lock().unwrap_or_else(|p| p.into_inner());
        apps.entry(app.to_string())
            .or_insert_with(|| Arc::new(AppStats::new(app)))
            .clone()
    }

    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        let mut apps = self.apps.lock().unwrap_or_else(|p| p.into_inner());
        apps.retain(|name, _| keep(name));
    }

    fn all(&self) -> Vec<Arc<AppStats>> {
        let apps = self.apps.lock().unwrap_or_else(|p| p.into_inner());
        let mut all: Vec<_> = apps.values().cloned().collect();
        all.sort_by(|a, b| a.app.cmp(&b.app));
        all
    }
}

/// Global metrics and the registry that renders everything.
pub struct Metrics {
    registry: Registry,
    pub edge: Arc<EdgeStats>,
    pub tcp_connects: Counter,
    pub tcp_disconnects: Counter,
    pub tls_handshakes: Family<[(&'static str, &'static str); 1], Counter>,
    pub tls_handshake_errors: Counter,
    pub tls_handshake_time: Histogram,
    pub machine_starts: Counter,
    pub machine_stops: Counter,
    pub replays: Counter,
}

impl Metrics {
    pub fn new(region: &str, catalog: Arc<Catalog>) -> Self {
        let mut registry = Registry::with_prefix_and_labels(
            "aloft",
            [(
                std::borrow::Cow::Borrowed("region"),
                std::borrow::Cow::Owned(region.to_string()),
            )]
            .into_iter(),
        );
        let tcp_connects = Counter::default();
        let tcp_disconnects = Counter::default();
        let tls_handshakes = Family::<[(&'static str, &'static str); 1], Counter>::default();
        let tls_handshake_errors = Counter::default();
        let tls_handshake_time = Histogram::new(exponential_buckets(0.0005, 2.0, 14));
        let machine_starts = Counter::default();
        let machine_stops = Counter::default();
        let replays = Counter::default();
        registry.register(
            "edge_tcp_connects",
            "Client connections accepted",
            tcp_connects.clone(),
        );
        registry.register(
            "edge_tcp_disconnects",
            "Client connections closed",
            tcp_disconnects.clone(),
        );
        registry.register(
            "edge_tls_handshakes",
            "TLS handshakes completed, by version",
            tls_handshakes.clone(),
        );
        registry.register(
            "edge_tls_handshake_errors",
            "TLS handshakes that failed",
            tls_handshake_errors.clone(),
        );
        registry.register(
            "edge_tls_handshake_time_seconds",
            "TLS handshake duration",
            tls_handshake_time.clone(),
        );
        registry.register(
            "proxy_machine_starts",
            "Machines started by autostart",
            machine_starts.clone(),
        );
        registry.register(
            "proxy_machine_stops",
            "Machines stopped or suspended by autostop",
            machine_stops.clone(),
        );
        registry.register(
            "proxy_replays",
            "Requests replayed on fly-replay",
            replays.clone(),
        );
        let edge = Arc::new(EdgeStats {
            inner: AppStats::new(""),
        });
        registry.register_collector(Box::new(AppCollector {
            catalog,
            edge: edge.clone(),
        }));
        Metrics {
            registry,
            edge,
            tcp_connects,
            tcp_disconnects,
            tls_handshakes,
            tls_handshake_errors,
            tls_handshake_time,
            machine_starts,
            machine_stops,
            replays,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "encoding metrics");
        }
        out
    }
}

struct AppCollector {
    catalog: Arc<Catalog>,
    edge: Arc<EdgeStats>,
}

impl std::fmt::Debug for AppCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AppCollector")
    }
}

struct HistogramRef<'a>(&'a AtomicHistogram);

impl EncodeMetric for HistogramRef<'_> {
    fn encode(&self, encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        self.0.encode(encoder)
    }
    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

fn encode_stats(
    encoder: &mut DescriptorEncoder<'_>,
    prefix: &str,
    all: &[(String, &AppStats)],
) -> Result<(), std::fmt::Error> {
    {
        let name = format!("{prefix}_http_responses");
        let mut metric = encoder.encode_descriptor(
            &name,
            "HTTP responses by status",
            None,
            MetricType::Counter,
        )?;
        for (app, stats) in all {
            for (i, n) in stats.statuses.iter().enumerate() {
                let value = n.load(Ordering::Relaxed);
                if value == 0 {
                    continue;
                }
                let status = (i + 100).to_string();
                let labels = [("app", app.as_str()), ("status", status.as_str())];
                let family = metric.encode_family(&labels)?;
                ConstCounter::new(value).encode(family)?;
            }
        }
    }
    {
        let name = format!("{prefix}_http_response_time_seconds");
        let mut metric = encoder.encode_descriptor(
            &name,
            "HTTP response time by status class",
            None,
            MetricType::Histogram,
        )?;
        for (app, stats) in all {
            for (class, hist) in CLASSES.iter().zip(stats.latency.iter()) {
                if hist.count.load(Ordering::Relaxed) == 0 {
                    continue;
                }
                let labels = [("app", app.as_str()), ("status", class)];
                let family = metric.encode_family(&labels)?;
                HistogramRef(hist).encode(family)?;
            }
        }
    }
    Ok(())
}

impl Collector for AppCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snapshot = self.catalog.snapshot();
        let stats = self.catalog.stats().all();
        let apps: Vec<(String, &AppStats)> =
            stats.iter().map(|s| (s.app.clone(), s.as_ref())).collect();
        encode_stats(&mut encoder, "app", &apps)?;
        let edge = [(String::new(), &self.edge.inner)];
        encode_stats(&mut encoder, "edge", &edge)?;

        let mut metric = encoder.encode_descriptor(
            "app_concurrency",
            "Requests or connections in flight per machine",
            None,
            MetricType::Gauge,
        )?;
        let mut apps: Vec<_> = snapshot.apps.values().collect();
        apps.sort_by(|a, b| a.name.cmp(&b.name));
        for app in apps {
            for machine in &app.machines {
                let load: u32 = machine.backends.iter().flatten().map(|b| b.load()).sum();
                let labels = [
                    ("app", app.name.as_str()),
                    ("instance", machine.id.as_str()),
                    ("machine_region", machine.region.as_str()),
                ];
                let family = metric.encode_family(&labels)?;
                ConstGauge::new(load as i64).encode(family)?;
            }
        }
        let metric = encoder.encode_descriptor(
            "catalog_seq",
            "Last catalog sequence applied",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(self.catalog.seq() as i64).encode(metric)?;
        Ok(())
    }
}
