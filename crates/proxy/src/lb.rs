//! Load balancing (spec §11.1): least-loaded, closest eligible machine.
//!
//! Load is bucketed: under `soft_limit`, between soft and hard, at `hard_limit`. Traffic
//! leaves the local region only when every local machine is unhealthy or at its hard
//! limit; within the chosen set the order is bucket, then closeness (RTT from this edge),
//! then exact load, then a random tie-break.

use std::collections::HashMap;
use std::sync::Arc;

use aloft_api::{MachineState, ServiceConcurrency};
use arc_swap::ArcSwap;

use crate::backend::Backend;
use crate::catalog::{AppView, MachineView};

/// Default soft limit when a service sets none (§11).
pub const DEFAULT_SOFT_LIMIT: u32 = 20;

/// Concurrency limits of one service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub soft: u32,
    pub hard: u32,
    pub requests: bool,
}

impl Limits {
    pub fn of(concurrency: Option<&ServiceConcurrency>) -> Limits {
        let Some(c) = concurrency else {
            return Limits {
                soft: DEFAULT_SOFT_LIMIT,
                hard: u32::MAX,
                requests: false,
            };
        };
        let hard = if c.hard_limit == 0 {
            u32::MAX
        } else {
            c.hard_limit
        };
        let soft = if c.soft_limit == 0 {
            DEFAULT_SOFT_LIMIT.min(hard)
        } else {
            c.soft_limit.min(hard)
        };
        Limits {
            soft,
            hard,
            requests: c.kind == "requests",
        }
    }

    /// 0 under soft, 1 between soft and hard, 2 at hard.
    pub fn bucket(&self, load: u32) -> u8 {
        if load >= self.hard {
            2
        } else if load >= self.soft {
            1
        } else {
            0
        }
    }
}

/// Round-trip times from this edge to other regions, in milliseconds. Measured in
/// production; injected by tests. Regions without a measurement fall back to the great-
/// circle distance (1 ms per 100 km), and to a large constant when that is unknown.
pub struct RttTable {
    local_region: String,
    measured: ArcSwap<HashMap<String, f64>>,
    /// Regions whose RTT was set explicitly (tests, operators): probes leave them alone.
    pinned: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl RttTable {
    pub fn new(local_region: &str) -> Self {
        RttTable {
            local_region: local_region.to_string(),
            measured: ArcSwap::from_pointee(HashMap::new()),
            pinned: std::sync::Mutex::new(std::collections::HashSet::new()),
        }
    }

    /// Sets a region's RTT and pins it (probes no longer change it).
    pub fn set(&self, region: &str, rtt_ms: f64) {
        self.pinned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(region.to_string());
        self.store(region, rtt_ms);
    }

    /// Records a probe measurement (smoothed), unless the region is pinned.
    pub fn observe(&self, region: &str, rtt_ms: f64) {
        if region == self.local_region
            || self
                .pinned
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(region)
        {
            return;
        }
        let smoothed = match self.measured.load().get(region) {
            Some(old) => old * 0.7 + rtt_ms * 0.3,
            None => rtt_ms,
        };
        self.store(region, smoothed);
    }

    fn store(&self, region: &str, rtt_ms: f64) {
        let mut map = HashMap::clone(&self.measured.load());
        map.insert(region.to_string(), rtt_ms);
        self.measured.store(Arc::new(map));
    }

    pub fn rtt(&self, region: &str) -> f64 {
        if region == self.local_region {
            return 0.0;
        }
        if let Some(ms) = self.measured.load().get(region) {
            return *ms;
        }
        match aloft_api::regions::distance_km(&self.local_region, region) {
            Some(km) => km / 100.0,
            None => 10_000.0,
        }
    }
}

/// Constraints on a pick, from routing headers or a replay.
#[derive(Default, Debug, Clone)]
pub struct Constraints {
    /// Only these regions (in order of preference).
    pub force_regions: Option<Vec<String>>,
    /// These regions first, in order, then anything.
    pub prefer_regions: Option<Vec<String>>,
    /// Only this machine (id or instance id).
    pub force_instance: Option<String>,
    /// This machine if it can take the request.
    pub prefer_instance: Option<String>,
    /// Never these machines (replay `elsewhere`, a machine that just refused a connection).
    pub exclude: Vec<String>,
    /// Only machines of this host (what the backhaul cannot carry: UDP).
    pub local_only: bool,
}

/// A machine chosen for a request, with its load slot taken.
pub struct Chosen {
    pub machine: Arc<MachineView>,
    pub service: usize,
    pub guard: crate::backend::LoadGuard,
    pub limits: Limits,
    /// The preferred instance could not be used.
    pub preferred_unavailable: Option<String>,
}

pub enum Pick {
    Chosen(Chosen),
    /// Every eligible machine is at its hard limit: queue.
    Full,
    /// No started machine can take it, but these stopped ones could be started (nearest first).
    Startable(Vec<Arc<MachineView>>),
    /// Eligible started machines exist but are all over their soft limit; these could be started.
    OverSoft {
        chosen: Chosen,
        startable: Vec<Arc<MachineView>>,
    },
    /// Nothing can serve this port.
    None,
}

struct Candidate<'a> {
    machine: &'a Arc<MachineView>,
    service: usize,
    backend: &'a Arc<Backend>,
    limits: Limits,
    bucket: u8,
    rtt: f64,
    load: u32,
    tiebreak: u32,
}

fn matches_instance(machine: &MachineView, id: &str) -> bool {
    machine.id == id || machine.instance_id == id
}

/// Expands region aliases and groups (`us`, `eu`, `any`, ...) in a list of regions.
pub fn expand_regions(list: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for r in list {
        let r = r.trim().to_ascii_lowercase();
        if r.is_empty() {
            continue;
        }
        if r == "any" || r == "*" {
            out.push("*".to_string());
        } else if let Some((_, members)) = aloft_api::regions::REGION_GROUPS
            .iter()
            .find(|(g, _)| *g == r)
        {
            out.extend(members.iter().map(|m| m.to_string()));
        } else {
            out.push(r);
        }
    }
    out
}

/// Picks a machine of `app` for a connection or request on public `port`.
pub fn pick(
    app: &AppView,
    port: u16,
    rtt: &RttTable,
    local_region: &str,
    constraints: &Constraints,
    released: &Arc<crate::backend::Released>,
) -> Pick {
    let unconstrained = constraints.force_regions.is_none()
        && constraints.prefer_regions.is_none()
        && constraints.force_instance.is_none()
        && constraints.prefer_instance.is_none()
        && constraints.exclude.is_empty()
        && !constraints.local_only;
    if unconstrained && let Some(chosen) = fast_pick(app, port, rtt, local_region, released) {
        return Pick::Chosen(chosen);
    }
    let mut rng_state: u32 = rand::random();
    let mut next_random = || {
        // xorshift: cheap per-candidate tie-break without touching a shared RNG.
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 17;
        rng_state ^= rng_state << 5;
        rng_state
    };

    let mut startable: Vec<(&Arc<MachineView>, f64)> = Vec::new();
    let mut candidates: Vec<Candidate<'_>> = Vec::with_capacity(app.machines.len());
    let mut preferred_unavailable = None;
    let mut any_serving = false;
    let force_regions = constraints
        .force_regions
        .as_ref()
        .map(|r| expand_regions(r));

    for machine in &app.machines {
        let Some(service) = machine.service_for_port(port) else {
            continue;
        };
        if let Some(force) = &constraints.force_instance
            && !matches_instance(machine, force)
        {
            continue;
        }
        if constraints
            .exclude
            .iter()
            .any(|id| matches_instance(machine, id))
        {
            continue;
        }
        if constraints.local_only
            && !matches!(machine.backends.get(service), Some(Some(b)) if b.is_direct())
        {
            continue;
        }
        // A machine whose host does not answer over the backhaul can neither serve nor be
        // started from here.
        if matches!(machine.backends.get(service), Some(Some(b)) if !b.is_reachable()) {
            continue;
        }
        if let Some(regions) = &force_regions
            && !regions.iter().any(|r| r == "*" || *r == machine.region)
        {
            continue;
        }
        any_serving = true;
        let svc = &machine.services[service];
        match machine.state {
            MachineState::Started => {}
            MachineState::Stopped | MachineState::Suspended => {
                if svc.autostart.unwrap_or(false) {
                    startable.push((machine, rtt.rtt(&machine.region)));
                }
                continue;
            }
            _ => continue,
        }
        if !machine.healthy {
            continue;
        }
        let Some(Some(backend)) = machine.backends.get(service) else {
            continue;
        };
        let limits = Limits::of(svc.concurrency.as_ref());
        let load = backend.load();
        candidates.push(Candidate {
            machine,
            service,
            backend,
            limits,
            bucket: limits.bucket(load),
            rtt: rtt.rtt(&machine.region),
            load,
            tiebreak: next_random(),
        });
    }
    startable.sort_by(|a, b| a.1.total_cmp(&b.1));
    let startable: Vec<Arc<MachineView>> = startable.into_iter().map(|(m, _)| m.clone()).collect();

    if let Some(prefer) = &constraints.prefer_instance {
        if let Some(c) = candidates
            .iter()
            .find(|c| matches_instance(c.machine, prefer) && c.bucket < 2)
            && let Some(guard) = c.backend.try_acquire(c.limits.hard, released)
        {
            return Pick::Chosen(Chosen {
                machine: c.machine.clone(),
                service: c.service,
                guard,
                limits: c.limits,
                preferred_unavailable: None,
            });
        }
        preferred_unavailable = Some(prefer.clone());
    }

    if candidates.is_empty() {
        if !startable.is_empty() {
            return Pick::Startable(startable);
        }
        return if any_serving { Pick::Full } else { Pick::None };
    }

    // The set to choose from: preferred/forced regions in order, else local first and
    // remote only when no local machine is below its hard limit.
    let region_order: Option<Vec<String>> = constraints
        .prefer_regions
        .as_ref()
        .map(|r| expand_regions(r))
        .or_else(|| force_regions.clone());
    let mut pool: Vec<&Candidate<'_>> = Vec::new();
    if let Some(order) = &region_order {
        for region in order {
            pool = candidates
                .iter()
                .filter(|c| c.bucket < 2 && (region == "*" || c.machine.region == *region))
                .collect();
            if !pool.is_empty() {
                break;
            }
        }
    }
    if pool.is_empty() {
        pool = candidates
            .iter()
            .filter(|c| c.bucket < 2 && c.machine.region == local_region)
            .collect();
    }
    if pool.is_empty() {
        pool = candidates.iter().filter(|c| c.bucket < 2).collect();
    }
    pool.sort_by(|a, b| {
        a.bucket
            .cmp(&b.bucket)
            .then(a.rtt.total_cmp(&b.rtt))
            .then(a.load.cmp(&b.load))
            .then(a.tiebreak.cmp(&b.tiebreak))
    });
    for c in pool {
        if let Some(guard) = c.backend.try_acquire(c.limits.hard, released) {
            let chosen = Chosen {
                machine: c.machine.clone(),
                service: c.service,
                guard,
                limits: c.limits,
                preferred_unavailable,
            };
            if c.bucket >= 1 && !startable.is_empty() {
                return Pick::OverSoft { chosen, startable };
            }
            return Pick::Chosen(chosen);
        }
    }
    if !startable.is_empty() {
        return Pick::Startable(startable);
    }
    Pick::Full
}

/// The best candidate so far: (sort key, machine, service index, backend, limits).
type Best<'a> = (
    (bool, u8, f64, u32, u32),
    &'a Arc<MachineView>,
    usize,
    &'a Arc<Backend>,
    Limits,
);

/// The common case without routing constraints, in one pass and without allocating:
/// the best running machine by (remote, bucket, closeness, load, random). `None` defers to
/// the full algorithm (stopped machines that could start, everything full, a lost race).
fn fast_pick(
    app: &AppView,
    port: u16,
    rtt: &RttTable,
    local_region: &str,
    released: &Arc<crate::backend::Released>,
) -> Option<Chosen> {
    let mut rng_state: u32 = rand::random::<u32>() | 1;
    let mut best: Option<Best<'_>> = None;
    for machine in &app.machines {
        let Some(service) = machine.service_for_port(port) else {
            continue;
        };
        let svc = &machine.services[service];
        match machine.state {
            MachineState::Started => {}
            MachineState::Stopped | MachineState::Suspended if svc.autostart.unwrap_or(false) => {
                return None;
            }
            _ => continue,
        }
        if !machine.healthy {
            continue;
        }
        let Some(Some(backend)) = machine.backends.get(service) else {
            continue;
        };
        if !backend.is_reachable() {
            continue;
        }
        let limits = Limits::of(svc.concurrency.as_ref());
        let load = backend.load();
        let bucket = limits.bucket(load);
        if bucket >= 2 {
            continue;
        }
        let remote = machine.region != local_region;
        let closeness = if remote {
            rtt.rtt(&machine.region)
        } else {
            0.0
        };
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 17;
        rng_state ^= rng_state << 5;
        let key = (remote, bucket, closeness, load, rng_state);
        let better = match &best {
            None => true,
            Some((k, ..)) => {
                (key.0, key.1)
                    .cmp(&(k.0, k.1))
                    .then(key.2.total_cmp(&k.2))
                    .then((key.3, key.4).cmp(&(k.3, k.4)))
                    == std::cmp::Ordering::Less
            }
        };
        if better {
            best = Some((key, machine, service, backend, limits));
        }
    }
    // (No machine could be started, or we would have returned above: over-soft is fine.)
    let (_, machine, service, backend, limits) = best?;
    let guard = backend.try_acquire(limits.hard, released)?;
    Some(Chosen {
        machine: machine.clone(),
        service,
        guard,
        limits,
        preferred_unavailable: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_default_and_buckets() {
        let l = Limits::of(None);
        assert_eq!((l.soft, l.hard, l.requests), (20, u32::MAX, false));
        assert_eq!(l.bucket(19), 0);
        assert_eq!(l.bucket(20), 1);
        let l = Limits::of(Some(&ServiceConcurrency {
            kind: "requests".into(),
            hard_limit: 25,
            soft_limit: 20,
        }));
        assert_eq!(l.bucket(24), 1);
        assert_eq!(l.bucket(25), 2);
        assert!(l.requests);
    }

    #[test]
    fn regions_expand_groups_and_any() {
        let r = expand_regions(&["iad".into(), "eu".into(), "any".into()]);
        assert_eq!(r[0], "iad");
        assert!(r.contains(&"ams".to_string()));
        assert_eq!(r.last().map(String::as_str), Some("*"));
    }

    #[test]
    fn rtt_falls_back_to_distance() {
        let t = RttTable::new("ams");
        assert_eq!(t.rtt("ams"), 0.0);
        assert!(t.rtt("fra") < t.rtt("syd"));
        t.set("syd", 1.0);
        assert_eq!(t.rtt("syd"), 1.0);
        // Probes smooth into unpinned regions and leave pinned ones alone.
        t.observe("syd", 50.0);
        assert_eq!(t.rtt("syd"), 1.0);
        t.observe("fra", 10.0);
        assert_eq!(t.rtt("fra"), 10.0);
        t.observe("fra", 20.0);
        assert!((t.rtt("fra") - 13.0).abs() < 1e-9);
    }
}
