//! The proxy's view of the platform: apps, their hostnames and machines, fed by the
//! control plane's catalog stream (or in-process through [`Catalog::apply`]).
//!
//! Writers (the catalog follower, tests) take a mutex, change the authoritative maps and
//! publish a fresh immutable [`Snapshot`] through an `ArcSwap`. Readers on the request hot
//! path only do a lock-free `load()` of the current snapshot: no lock is ever held while a
//! request is routed, and a change never blocks in-flight requests. Per-machine runtime
//! state (load counters, pooled backend connections) lives in [`Backend`]s that survive
//! snapshot rebuilds, so a catalog change neither resets load accounting nor drops pooled
//! connections.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use aloft_api::internal::{CatalogApp, CatalogMachine, CatalogUpdate};
use aloft_api::{MachineService, MachineState};
use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::backend::{Backend, Route};

/// One immutable view of the catalog. Cheap to load, never mutated once published.
#[derive(Default)]
pub struct Snapshot {
    pub seq: u64,
    /// App name → app.
    pub apps: HashMap<String, Arc<AppView>>,
    /// Lower-case hostname → app (`CatalogApp.hostnames`).
    pub hosts: HashMap<String, Arc<AppView>>,
    /// Dedicated IP address → app.
    pub dedicated_ips: HashMap<IpAddr, Arc<AppView>>,
    /// Every shared IP known to apps (routed by Host/SNI).
    pub shared_ips: HashSet<IpAddr>,
    /// Certificates by lower-case hostname (exact, or `*.domain` for wildcards).
    pub certs: HashMap<String, Arc<rustls::sign::CertifiedKey>>,
}

impl Snapshot {
    /// The app a request's host names: `<app>.<base_domain>` or one of an app's hostnames.
    /// `host` must already be lower case and without a port.
    ///
    /// Under the base domain a name belongs to the app it names: `<app>.<base>` is app
    /// `<app>` and nothing else, and a deeper name (`x.<app>.<base>`) routes only to app
    /// `<app>`, whatever hostnames other apps list.
    pub fn app_for_host(&self, host: &str, base_domain: &str) -> Option<&Arc<AppView>> {
        let under_base = host
            .strip_suffix(base_domain)
            .and_then(|prefix| prefix.strip_suffix('.'))
            .filter(|prefix| !prefix.is_empty() && !base_domain.is_empty());
        match under_base {
            Some(prefix) => match prefix.rsplit_once('.') {
                None => self.apps.get(prefix),
                Some((_, owner)) => self
                    .apps
                    .get(owner)
                    .filter(|app| app.hostnames.iter().any(|h| h == host)),
            },
            None => self.hosts.get(host),
        }
    }

    /// The certificate for an SNI name: exact match, then a wildcard one level up.
    pub fn cert_for(&self, host: &str) -> Option<&Arc<rustls::sign::CertifiedKey>> {
        if let Some(cert) = self.certs.get(host) {
            return Some(cert);
        }
        let (_, parent) = host.split_once('.')?;
        let mut wildcard = String::with_capacity(parent.len() + 2);
        wildcard.push_str("*.");
        wildcard.push_str(parent);
        self.certs.get(&wildcard)
    }
}

/// An app as the router sees it.
pub struct AppView {
    pub name: String,
    pub org: String,
    pub network: String,
    pub hostnames: Vec<String>,
    pub machines: Vec<Arc<MachineView>>,
    pub stats: Arc<crate::metrics::AppStats>,
}

impl AppView {
    /// Some machine of the app serves `path` from its image (`[[statics]]`).
    pub fn serves_static(&self, path: &str) -> bool {
        self.machines
            .iter()
            .any(|m| crate::statics::matching(&m.statics, path).is_some())
    }

    /// The service of the app that exposes `port` (first machine that has one, preferring
    /// started machines), which decides the handlers of a connection.
    pub fn port_config(&self, port: u16) -> Option<(&MachineService, &aloft_api::MachinePort)> {
        let mut fallback = None;
        for machine in &self.machines {
            for service in &machine.services {
                if let Some(p) = service.ports.iter().find(|p| p.covers(port)) {
                    if machine.state == MachineState::Started {
                        return Some((service, p));
                    }
                    if fallback.is_none() {
                        fallback = Some((service, p));
                    }
                }
            }
        }
        fallback
    }

    /// Where `port_config` finds its answer: (machine, service, port) indices.
    pub fn port_location(&self, port: u16) -> Option<(usize, usize, usize)> {
        let mut fallback = None;
        for (mi, machine) in self.machines.iter().enumerate() {
            for (si, service) in machine.services.iter().enumerate() {
                if let Some(pi) = service.ports.iter().position(|p| p.covers(port)) {
                    if machine.state == MachineState::Started {
                        return Some((mi, si, pi));
                    }
                    if fallback.is_none() {
                        fallback = Some((mi, si, pi));
                    }
                }
            }
        }
        fallback
    }

    /// Every public port some UDP service of the app exposes.
    pub fn udp_ports(&self) -> HashSet<u16> {
        let mut ports = HashSet::new();
        for machine in &self.machines {
            for service in machine.services.iter().filter(|s| s.protocol == "udp") {
                for p in &service.ports {
                    match (p.port, p.start_port, p.end_port) {
                        (Some(port), _, _) => {
                            ports.insert(port);
                        }
                        (None, Some(start), Some(end)) if end >= start && end - start < 1024 => {
                            ports.extend(start..=end);
                        }
                        _ => {}
                    }
                }
            }
        }
        ports
    }

    /// Every public port some service of the app exposes.
    pub fn exposed_ports(&self) -> HashSet<u16> {
        let mut ports = HashSet::new();
        for machine in &self.machines {
            for service in &machine.services {
                if service.protocol == "udp" {
                    continue;
                }
                for p in &service.ports {
                    match (p.port, p.start_port, p.end_port) {
                        (Some(port), _, _) => {
                            ports.insert(port);
                        }
                        (None, Some(start), Some(end)) if end >= start && end - start < 1024 => {
                            ports.extend(start..=end);
                        }
                        _ => {}
                    }
                }
            }
        }
        ports
    }
}

/// A machine as the router sees it.
pub struct MachineView {
    pub id: String,
    pub app: String,
    pub instance_id: String,
    pub region: String,
    pub host: String,
    pub state: MachineState,
    pub process_group: Option<String>,
    pub private_ipv4: Option<IpAddr>,
    /// The host the machine runs on, as its 6PN address names it.
    pub host_number: Option<u32>,
    pub services: Vec<MachineService>,
    /// Service-level checks pass (or there are none); a machine whose checks have not run
    /// yet counts only when this proxy just started it (autostart holds the request until
    /// its app accepts connections).
    pub healthy: bool,
    /// One backend per service (same order as `services`): `private_ipv4:internal_port`.
    pub backends: Vec<Option<Arc<Backend>>>,
    /// `[[statics]]` of the machine's config, served from its image.
    pub statics: Vec<aloft_api::Static>,
}

impl MachineView {
    /// The service (index) that exposes public `port`.
    pub fn service_for_port(&self, port: u16) -> Option<usize> {
        self.services
            .iter()
            .position(|s| s.ports.iter().any(|p| p.covers(port)))
    }
}

/// Extra per-app data that the catalog stream may carry beyond the api types.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AppExtras {
    /// Allocated public IPs: (address, shared).
    pub ips: Vec<(IpAddr, bool)>,
    /// The app's primary region (`min_machines_running` applies there only).
    pub primary_region: Option<String>,
}

/// What a machine's service-level checks (`servicecheck-*`) say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    /// Every check passes, or the machine has none.
    Passing,
    /// Some check has not run yet (`warning`, "waiting for status update"), none fails.
    Pending,
    /// Some check is `critical`.
    Critical,
}

impl Health {
    /// The health the catalog entry's check results give.
    pub fn of(checks: &[aloft_api::CheckStatus]) -> Health {
        let mut health = Health::Passing;
        for check in checks
            .iter()
            .filter(|c| c.name.starts_with("servicecheck-"))
        {
            match check.status.as_str() {
                "critical" => return Health::Critical,
                "passing" => {}
                _ => health = Health::Pending,
            }
        }
        health
    }
}

/// A certificate for one hostname, as PEM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertificatePem {
    pub hostname: String,
    pub chain_pem: String,
    pub key_pem: String,
}

#[derive(Default)]
struct State {
    seq: u64,
    apps: HashMap<String, CatalogApp>,
    machines: HashMap<String, CatalogMachine>,
    extras: HashMap<String, AppExtras>,
    /// Machine id → health, from its catalog entry's check results (or set in-process).
    health: HashMap<String, Health>,
    /// Machines this proxy started whose checks have not given a result since: routed to
    /// while their checks are pending.
    autostarted: HashSet<String>,
    /// (machine id, internal port, address, route) → backend.
    backends: HashMap<(String, u16, SocketAddr, Route), Arc<Backend>>,
    certs: HashMap<String, Arc<rustls::sign::CertifiedKey>>,
    /// App name → the seq of its last `app` (or snapshot) update: a republished app tells
    /// the proxy to look again at its certificates.
    app_versions: HashMap<String, u64>,
}

/// The catalog: authoritative maps behind a mutex (writers), published snapshots (readers).
pub struct Catalog {
    state: Mutex<State>,
    snapshot: ArcSwap<Snapshot>,
    changes: watch::Sender<u64>,
    applied: AtomicU64,
    backend_settings: crate::backend::PoolSettings,
    stats: crate::metrics::StatsTable,
    place: Option<HostPlace>,
}

/// Where this proxy runs among the platform's hosts: which machines are local, and
/// whether the others are reachable through the backhaul.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostPlace {
    /// This host's number in 6PN addresses.
    pub number: u32,
    /// Whether this host is in the mesh (machines on other hosts are reachable).
    pub backhaul: bool,
}

impl Default for Catalog {
    fn default() -> Self {
        Self::new(crate::backend::PoolSettings::default())
    }
}

impl Catalog {
    pub fn new(backend_settings: crate::backend::PoolSettings) -> Self {
        Self::on_host(backend_settings, None)
    }

    /// A catalog of a proxy on host `place` (`None`: every machine is local).
    pub fn on_host(
        backend_settings: crate::backend::PoolSettings,
        place: Option<HostPlace>,
    ) -> Self {
        let (changes, _) = watch::channel(0);
        Catalog {
            state: Mutex::new(State::default()),
            snapshot: ArcSwap::from_pointee(Snapshot::default()),
            changes,
            applied: AtomicU64::new(0),
            backend_settings,
            stats: crate::metrics::StatsTable::default(),
            place,
        }
    }

    /// Request counters of every app.
    pub fn stats(&self) -> &crate::metrics::StatsTable {
        &self.stats
    }

    /// The current snapshot (lock-free).
    pub fn load(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.snapshot.load()
    }

    /// The current snapshot, owned.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// The sequence number of the last update applied (0 before any).
    pub fn seq(&self) -> u64 {
        self.applied.load(Ordering::Acquire)
    }

    /// A receiver that sees every published change (its value is the seq).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Applies one catalog update and publishes the new snapshot.
    pub fn apply(&self, update: CatalogUpdate) {
        self.apply_all(std::iter::once(update));
    }

    /// Applies several updates, publishing one snapshot at the end.
    pub fn apply_all(&self, updates: impl IntoIterator<Item = CatalogUpdate>) {
        let mut state = self.lock();
        for update in updates {
            apply_one(&mut state, update);
        }
        self.publish(&mut state);
    }

    /// Applies an update together with the extra data of the apps it carries (public IPs,
    /// primary region); a snapshot replaces all of it.
    pub fn apply_with(&self, update: CatalogUpdate, extras: Vec<(String, AppExtras)>) {
        let mut state = self.lock();
        let snapshot = matches!(update, CatalogUpdate::Snapshot { .. });
        apply_one(&mut state, update);
        if snapshot {
            state.extras.clear();
        }
        for (app, e) in extras {
            state.extras.insert(app, e);
        }
        self.publish(&mut state);
    }

    /// Notes that this proxy started `machine_id`: while its checks have not run yet, it
    /// takes the requests that woke it.
    pub fn mark_autostarted(&self, machine_id: &str) {
        let mut state = self.lock();
        if !state.autostarted.insert(machine_id.to_string()) {
            return;
        }
        if state.health.get(machine_id) == Some(&Health::Pending) {
            self.publish(&mut state);
        }
    }

    /// The primary region of an app, when the catalog says.
    pub fn primary_region(&self, app: &str) -> Option<String> {
        self.lock()
            .extras
            .get(app)
            .and_then(|e| e.primary_region.clone())
    }

    /// Sets the extra data of an app (public IPs).
    pub fn set_app_extras(&self, app: &str, extras: AppExtras) {
        let mut state = self.lock();
        if state.extras.get(app) == Some(&extras) {
            return;
        }
        state.extras.insert(app.to_string(), extras);
        self.publish(&mut state);
    }

    /// Marks a machine healthy or not (service-level checks); unhealthy machines get no
    /// traffic. The machine's next catalog entry sets its health from its check results.
    pub fn set_machine_health(&self, machine_id: &str, healthy: bool) {
        let health = if healthy {
            Health::Passing
        } else {
            Health::Critical
        };
        let mut state = self.lock();
        if state.health.get(machine_id) == Some(&health) {
            return;
        }
        set_health(&mut state, machine_id, health);
        self.publish(&mut state);
    }

    /// Installs (or replaces) the certificate of a hostname.
    pub fn set_certificate(&self, hostname: &str, key: Arc<rustls::sign::CertifiedKey>) {
        let mut state = self.lock();
        state.certs.insert(hostname.to_ascii_lowercase(), key);
        self.publish(&mut state);
    }

    /// Drops the certificate of a hostname.
    pub fn remove_certificate(&self, hostname: &str) {
        let mut state = self.lock();
        if state.certs.remove(&hostname.to_ascii_lowercase()).is_some() {
            self.publish(&mut state);
        }
    }

    /// Every hostname the proxy should hold a certificate for (app hostnames).
    pub fn hostnames(&self) -> Vec<(String, String)> {
        self.hostnames_with_versions()
            .into_iter()
            .map(|(app, host, _)| (app, host))
            .collect()
    }

    /// (app, hostname, version of the app's last update) for every app hostname.
    pub fn hostnames_with_versions(&self) -> Vec<(String, String, u64)> {
        let state = self.lock();
        let mut out = Vec::new();
        for app in state.apps.values() {
            let version = state.app_versions.get(&app.name).copied().unwrap_or(0);
            for host in &app.hostnames {
                out.push((app.name.clone(), host.to_ascii_lowercase(), version));
            }
        }
        out.sort();
        out.dedup();
        out
    }

    /// Whether the catalog holds a certificate for `hostname`.
    pub fn has_certificate(&self, hostname: &str) -> bool {
        self.lock()
            .certs
            .contains_key(&hostname.to_ascii_lowercase())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn publish(&self, state: &mut State) {
        let snapshot = build_snapshot(state, &self.backend_settings, &self.stats, self.place);
        let seq = snapshot.seq;
        self.snapshot.store(Arc::new(snapshot));
        self.applied.store(seq, Ordering::Release);
        self.changes
            .send_modify(|value| *value = value.wrapping_add(1));
    }
}

fn apply_one(state: &mut State, update: CatalogUpdate) {
    match update {
        CatalogUpdate::Snapshot {
            seq,
            apps,
            machines,
        } => {
            state.seq = seq;
            state.apps = apps.into_iter().map(|a| (a.name.clone(), a)).collect();
            state.app_versions = state.apps.keys().map(|name| (name.clone(), seq)).collect();
            state.health.clear();
            for m in &machines {
                set_health(state, &m.id, Health::of(&m.checks));
            }
            state.autostarted.retain(|id| state.health.contains_key(id));
            state.machines = machines.into_iter().map(|m| (m.id.clone(), m)).collect();
        }
        CatalogUpdate::App { seq, app } => {
            state.seq = state.seq.max(seq);
            state.app_versions.insert(app.name.clone(), seq);
            state.apps.insert(app.name.clone(), app);
        }
        CatalogUpdate::AppRemoved { seq, name } => {
            state.seq = state.seq.max(seq);
            state.apps.remove(&name);
            state.extras.remove(&name);
            state.machines.retain(|_, m| m.app != name);
        }
        CatalogUpdate::Machine { seq, machine } => {
            state.seq = state.seq.max(seq);
            if machine.state == MachineState::Destroyed {
                state.health.remove(&machine.id);
                state.autostarted.remove(&machine.id);
                state.machines.remove(&machine.id);
            } else {
                set_health(state, &machine.id, Health::of(&machine.checks));
                state.machines.insert(machine.id.clone(), machine);
            }
        }
        CatalogUpdate::MachineRemoved { seq, id } => {
            state.seq = state.seq.max(seq);
            state.machines.remove(&id);
            state.health.remove(&id);
            state.autostarted.remove(&id);
        }
    }
}

/// Records a machine's health; a result from its checks ends the autostart allowance.
fn set_health(state: &mut State, machine_id: &str, health: Health) {
    if health != Health::Pending {
        state.autostarted.remove(machine_id);
    }
    state.health.insert(machine_id.to_string(), health);
}

fn build_snapshot(
    state: &mut State,
    settings: &crate::backend::PoolSettings,
    stats: &crate::metrics::StatsTable,
    place: Option<HostPlace>,
) -> Snapshot {
    let mut live_backends = HashMap::new();
    let mut machines_by_app: HashMap<&str, Vec<Arc<MachineView>>> = HashMap::new();
    let mut ids: Vec<&String> = state.machines.keys().collect();
    ids.sort();
    for id in ids {
        let m = &state.machines[id];
        let ipv4 = m
            .private_ipv4
            .as_deref()
            .and_then(|ip| ip.parse::<IpAddr>().ok());
        let host_number = m
            .private_ip
            .as_deref()
            .and_then(|ip| ip.parse::<std::net::Ipv6Addr>().ok())
            .and_then(|ip| aloft_api::sixpn::parts(&ip))
            .map(|parts| parts.host);
        // A machine of another host is reached through that host, never by its IPv4
        // address (another host's machine may have the same one as a machine here).
        let route = match (place, host_number) {
            (Some(place), Some(host)) if host != place.number => {
                place.backhaul.then(|| Route::Backhaul {
                    worker: crate::backhaul::worker_address(host),
                    app: m.app.clone(),
                })
            }
            _ => Some(Route::Direct),
        };
        let backends = m
            .services
            .iter()
            .map(|service| {
                let ip = ipv4?;
                let route = route.clone()?;
                let addr = SocketAddr::new(ip, service.internal_port);
                let key = (m.id.clone(), service.internal_port, addr, route.clone());
                let backend = state.backends.get(&key).cloned().unwrap_or_else(|| {
                    Arc::new(Backend::new(addr, m.id.clone(), settings.clone()).with_route(route))
                });
                live_backends.insert(key, backend.clone());
                Some(backend)
            })
            .collect();
        let healthy = match state.health.get(&m.id) {
            None | Some(Health::Passing) => true,
            Some(Health::Pending) => state.autostarted.contains(&m.id),
            Some(Health::Critical) => false,
        };
        let view = MachineView {
            id: m.id.clone(),
            app: m.app.clone(),
            instance_id: m.instance_id.clone(),
            region: m.region.clone(),
            host: m.host.clone(),
            state: m.state,
            process_group: m.process_group.clone(),
            private_ipv4: ipv4,
            host_number,
            services: m.services.clone(),
            statics: m.statics.clone(),
            healthy,
            backends,
        };
        machines_by_app
            .entry(m.app.as_str())
            .or_default()
            .push(Arc::new(view));
    }
    // Backends of machines that went away: close their idle connections.
    for (key, backend) in state.backends.iter() {
        if !live_backends.contains_key(key) {
            backend.retire();
        }
    }
    state.backends = live_backends;

    let mut snapshot = Snapshot {
        seq: state.seq,
        certs: state.certs.clone(),
        ..Snapshot::default()
    };
    // In name order, and the first app to list a hostname keeps it: which app answers
    // never depends on hash-map order.
    let mut apps: Vec<&CatalogApp> = state.apps.values().collect();
    apps.sort_by(|a, b| a.name.cmp(&b.name));
    for app in apps {
        let view = Arc::new(AppView {
            name: app.name.clone(),
            org: app.org.clone(),
            network: app.network.clone(),
            hostnames: app
                .hostnames
                .iter()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
            machines: machines_by_app
                .remove(app.name.as_str())
                .unwrap_or_default(),
            stats: stats.for_app(&app.name),
        });
        for host in &view.hostnames {
            snapshot
                .hosts
                .entry(host.clone())
                .or_insert_with(|| view.clone());
        }
        if let Some(extras) = state.extras.get(&app.name) {
            for (ip, shared) in &extras.ips {
                if *shared {
                    snapshot.shared_ips.insert(*ip);
                } else {
                    snapshot.dedicated_ips.insert(*ip, view.clone());
                }
            }
        }
        snapshot.apps.insert(app.name.clone(), view);
    }
    stats.retain(|name| state.apps.contains_key(name));
    snapshot
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app(name: &str, hostnames: &[&str]) -> CatalogApp {
        CatalogApp {
            name: name.into(),
            org: format!("org-{name}"),
            network: String::new(),
            hostnames: hostnames.iter().map(|h| h.to_string()).collect(),
            network_id: 0,
            ips: Vec::new(),
            primary_region: None,
        }
    }

    fn answer(catalog: &Catalog, host: &str) -> Option<String> {
        catalog
            .load()
            .app_for_host(host, "example.net")
            .map(|a| a.name.clone())
    }

    /// App `zzz` (another org) listed `foo.example.net` and `x.foo.example.net` before
    /// such claims were refused; app `foo` owns both. Each fresh catalog has fresh
    /// hash-map seeds, so forty of them would hit either order of `apps`.
    #[test]
    fn platform_names_go_to_the_app_they_name_whatever_the_map_order() {
        for _ in 0..40 {
            let catalog = Catalog::default();
            catalog.apply(CatalogUpdate::Snapshot {
                seq: 1,
                apps: vec![
                    app(
                        "zzz",
                        &[
                            "zzz.example.net",
                            "foo.example.net",
                            "x.foo.example.net",
                            "shop.example.com",
                        ],
                    ),
                    app("foo", &["foo.example.net", "x.foo.example.net"]),
                    app(
                        "aaa",
                        &["aaa.example.net", "shop.example.com", "y.foo.example.net"],
                    ),
                ],
                machines: Vec::new(),
            });
            assert_eq!(answer(&catalog, "foo.example.net").as_deref(), Some("foo"));
            assert_eq!(
                answer(&catalog, "x.foo.example.net").as_deref(),
                Some("foo")
            );
            assert_eq!(answer(&catalog, "zzz.example.net").as_deref(), Some("zzz"));
            // Only app `foo` may answer below its name, and `foo` did not list this one.
            assert_eq!(answer(&catalog, "y.foo.example.net"), None);
            // A custom domain two apps list: the first by name, every time.
            assert_eq!(answer(&catalog, "shop.example.com").as_deref(), Some("aaa"));
        }
    }
}
