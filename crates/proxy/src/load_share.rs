//! Load sharing between hosts' proxies, so every edge balances on the platform's load and
//! not only on the requests it sends itself.
//!
//! Every 250 ms each edge sends every worker host (over the backhaul, one session per
//! worker) the requests it has in flight to that worker's machines, and the worker answers
//! with what everyone else has in flight to them: its own proxy's requests plus the other
//! edges' latest reports. The edge keeps that figure on its backend as shared load; the
//! worker keeps the edges' reports on its own backends the same way. A report older than a
//! second no longer counts (its edge went away).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::Proxy;
use crate::backend::{Backend, Route};
use crate::backhaul::{LoadEntry, dial_load, encode_loads, read_loads};
use crate::catalog::Snapshot;

/// How often an edge shares its load with each worker.
pub const SHARE_EVERY: Duration = Duration::from_millis(250);
/// How long an edge's report counts.
const REPORT_FRESH: Duration = Duration::from_secs(1);
/// How long an edge waits for a worker's answer (or to connect to it).
const ANSWER_WITHIN: Duration = Duration::from_secs(1);
/// Failed exchanges in a row after which a worker's machines leave routing.
const UNREACHABLE_AFTER: u32 = 2;
/// How long a worker waits for an edge's next report before ending the session.
const SESSION_IDLE: Duration = Duration::from_secs(5);

type BackendKey = (String, u16);

struct EdgeReport {
    at: Instant,
    loads: HashMap<BackendKey, u32>,
}

/// The latest load reports of other hosts' edges about this host's machines.
#[derive(Default)]
pub(crate) struct Reports {
    by_edge: Mutex<HashMap<u32, EdgeReport>>,
}

impl Reports {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, EdgeReport>> {
        self.by_edge.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record(&self, edge: u32, entries: &[LoadEntry]) {
        let loads = entries
            .iter()
            .map(|e| ((e.machine_id.clone(), e.port), e.load))
            .collect();
        self.lock().insert(
            edge,
            EdgeReport {
                at: Instant::now(),
                loads,
            },
        );
    }

    /// Fresh reports summed per backend, leaving out edge `except`.
    fn totals(&self, except: Option<u32>) -> HashMap<BackendKey, u32> {
        let mut by_edge = self.lock();
        by_edge.retain(|_, report| report.at.elapsed() < REPORT_FRESH);
        let mut totals: HashMap<BackendKey, u32> = HashMap::new();
        for (edge, report) in by_edge.iter() {
            if Some(*edge) == except {
                continue;
            }
            for (key, load) in &report.loads {
                let total = totals.entry(key.clone()).or_default();
                *total = total.saturating_add(*load);
            }
        }
        totals
    }
}

fn key_of(backend: &Backend) -> BackendKey {
    (backend.machine_id.clone(), backend.addr.port())
}

/// Every backend of the snapshot.
fn backends(snapshot: &Snapshot) -> impl Iterator<Item = &Arc<Backend>> {
    snapshot
        .apps
        .values()
        .flat_map(|app| app.machines.iter())
        .flat_map(|machine| machine.backends.iter().flatten())
}

/// Puts the other edges' fresh reports on this host's backends.
fn apply_reports(proxy: &Proxy) {
    let totals = proxy.load_reports.totals(None);
    let snapshot = proxy.catalog.snapshot();
    for backend in backends(&snapshot).filter(|b| b.is_direct()) {
        backend.set_shared(totals.get(&key_of(backend)).copied().unwrap_or(0));
    }
}

/// The worker side of one edge's session: record each report, answer with the load
/// everyone else puts on the same backends.
pub(crate) async fn answer_edge(
    proxy: &Arc<Proxy>,
    mut edge: TcpStream,
    edge_host: u32,
) -> io::Result<()> {
    loop {
        let entries = match tokio::time::timeout(SESSION_IDLE, read_loads(&mut edge)).await {
            Ok(entries) => entries?,
            Err(_) => return Ok(()),
        };
        proxy.load_reports.record(edge_host, &entries);
        apply_reports(proxy);
        let others = proxy.load_reports.totals(Some(edge_host));
        let snapshot = proxy.catalog.snapshot();
        let local: HashMap<BackendKey, &Arc<Backend>> = backends(&snapshot)
            .filter(|b| b.is_direct())
            .map(|b| (key_of(b), b))
            .collect();
        let answer: Vec<LoadEntry> = entries
            .into_iter()
            .map(|entry| {
                let key = (entry.machine_id, entry.port);
                let own = local.get(&key).map_or(0, |b| b.own_load());
                let load = own.saturating_add(others.get(&key).copied().unwrap_or(0));
                LoadEntry {
                    machine_id: key.0,
                    port: key.1,
                    load,
                }
            })
            .collect();
        edge.write_all(&encode_loads(&answer)?).await?;
    }
}

/// One exchange with a worker: this edge's load on its machines out, everyone else's in.
async fn exchange(
    session: &mut Option<TcpStream>,
    worker: SocketAddr,
    backends: &[Arc<Backend>],
) -> io::Result<()> {
    let entries: Vec<LoadEntry> = backends
        .iter()
        .map(|b| LoadEntry {
            machine_id: b.machine_id.clone(),
            port: b.addr.port(),
            load: b.own_load(),
        })
        .collect();
    let wire = encode_loads(&entries)?;
    let stream = match session {
        Some(stream) => stream,
        None => session.insert(dial_load(worker, ANSWER_WITHIN).await?),
    };
    let answer = tokio::time::timeout(ANSWER_WITHIN, async {
        stream.write_all(&wire).await?;
        read_loads(stream).await
    })
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no load answer"))??;
    for (backend, answer) in backends.iter().zip(&answer) {
        if answer.machine_id == backend.machine_id && answer.port == backend.addr.port() {
            backend.set_shared(answer.load);
        }
    }
    Ok(())
}

/// This edge's backends on the machines of `worker`.
fn backends_of(proxy: &Proxy, worker: SocketAddr) -> Vec<Arc<Backend>> {
    let snapshot = proxy.catalog.snapshot();
    backends(&snapshot)
        .filter(|b| matches!(&b.route, Route::Backhaul { worker: w, .. } if *w == worker))
        .cloned()
        .collect()
}

/// Shares load with one worker for as long as it has machines. A worker that does not
/// answer twice in a row is unreachable (its host is down, or the mesh to it is): its
/// machines leave this proxy's routing until it answers again.
async fn share_with(proxy: Arc<Proxy>, worker: SocketAddr) {
    let mut session = None;
    let mut failures = 0u32;
    loop {
        tokio::time::sleep(SHARE_EVERY).await;
        let backends = backends_of(&proxy, worker);
        if backends.is_empty() {
            return;
        }
        match exchange(&mut session, worker, &backends).await {
            Ok(()) => {
                if failures >= UNREACHABLE_AFTER {
                    tracing::info!(%worker, "worker host answers again");
                }
                failures = 0;
                let mut regained = false;
                for backend in &backends {
                    regained |= backend.set_reachable(true);
                }
                if regained {
                    proxy.released.notify.notify_waiters();
                }
            }
            Err(e) => {
                session = None;
                failures = failures.saturating_add(1);
                tracing::debug!(%worker, error = %e, failures, "load sharing with a worker host failed");
                if failures == UNREACHABLE_AFTER {
                    tracing::warn!(%worker, error = %e, "worker host does not answer: its machines leave routing");
                }
                for backend in &backends {
                    backend.set_shared(0);
                    if failures >= UNREACHABLE_AFTER {
                        backend.set_reachable(false);
                    }
                }
            }
        }
    }
}

/// The edge side: one sharing task per worker host with machines in the catalog, and the
/// other edges' reports kept current on this host's backends.
pub(crate) async fn share(proxy: Arc<Proxy>) {
    let mut workers: HashMap<SocketAddr, tokio::task::JoinHandle<()>> = HashMap::new();
    loop {
        tokio::time::sleep(SHARE_EVERY).await;
        apply_reports(&proxy);
        workers.retain(|_, task| !task.is_finished());
        let snapshot = proxy.catalog.snapshot();
        for backend in backends(&snapshot) {
            if let Route::Backhaul { worker, .. } = &backend.route {
                workers
                    .entry(*worker)
                    .or_insert_with(|| tokio::spawn(share_with(proxy.clone(), *worker)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(machine: &str, load: u32) -> LoadEntry {
        LoadEntry {
            machine_id: machine.into(),
            port: 8080,
            load,
        }
    }

    #[test]
    fn totals_sum_the_edges_and_leave_out_the_one_asking() {
        let reports = Reports::default();
        reports.record(2, &[entry("m1", 3), entry("m2", 1)]);
        reports.record(3, &[entry("m1", 4)]);
        let all = reports.totals(None);
        assert_eq!(all[&("m1".to_string(), 8080)], 7);
        assert_eq!(all[&("m2".to_string(), 8080)], 1);
        let without_2 = reports.totals(Some(2));
        assert_eq!(without_2[&("m1".to_string(), 8080)], 4);
        assert!(!without_2.contains_key(&("m2".to_string(), 8080)));
    }

    #[test]
    fn a_stale_report_no_longer_counts() {
        let reports = Reports::default();
        reports.record(2, &[entry("m1", 3)]);
        reports.lock().get_mut(&2).unwrap().at = Instant::now() - REPORT_FRESH;
        assert!(reports.totals(None).is_empty());
    }
}
