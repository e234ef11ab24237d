//! Autostart and autostop (spec §13), through the control plane's Machines API.
//!
//! Start: a request that finds no running machine under its soft limit starts a stopped
//! (or suspended) one in the nearest region; the request waits (bounded) until the machine
//! is started and accepts connections.
//!
//! Stop: every `autostop_interval`, per app service with autostop and per region of this
//! edge, `excess = machines_running − (machines_over_soft_limit + 1)`; when `excess ≥ 1`
//! one machine is stopped (or suspended); a region's only machine is stopped when its load
//! is 0. At most one machine per region per pass; `min_machines_running` is kept in the
//! primary region.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aloft_api::{AutoStop, MachineState};

use crate::Proxy;
use crate::catalog::MachineView;
use crate::lb::Limits;

/// A machine this proxy asked to start is not asked again for this long.
const START_RETRY: Duration = Duration::from_secs(10);

impl Proxy {
    /// Starts the first of `candidates` (nearest first) that is not already starting.
    pub(crate) fn start_in_background(self: Arc<Self>, candidates: &[Arc<MachineView>]) {
        let Some(control) = self.control.clone() else {
            return;
        };
        let chosen = {
            let mut starting = self.starting.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            starting.retain(|_, at| now.duration_since(*at) < START_RETRY);
            // One start in flight per app and port is enough to make progress.
            if candidates.iter().any(|m| starting.contains_key(&m.id)) {
                return;
            }
            let Some(machine) = candidates.first() else {
                return;
            };
            starting.insert(machine.id.clone(), now);
            machine.clone()
        };
        self.catalog.mark_autostarted(&chosen.id);
        let proxy = self.clone();
        tokio::spawn(async move {
            tracing::info!(app = %chosen.app, machine = %chosen.id, "autostart");
            proxy.metrics.machine_starts.inc();
            if let Err(e) = control
                .machine_action(&chosen.app, &chosen.id, "start")
                .await
            {
                tracing::warn!(app = %chosen.app, machine = %chosen.id, error = %e, "autostart failed");
            }
        });
    }

    /// Whether this proxy recently asked `machine` to start (its app may still be booting).
    pub(crate) fn recently_started(&self, machine: &str) -> bool {
        let starting = self.starting.lock().unwrap_or_else(|p| p.into_inner());
        starting
            .get(machine)
            .is_some_and(|at| at.elapsed() < Duration::from_secs(60))
    }

    /// One pass of the autostop loop; returns the machines it stopped or suspended.
    pub async fn autostop_pass(self: &Arc<Self>) -> Vec<String> {
        let Some(control) = self.control.clone() else {
            return Vec::new();
        };
        let plan = self.autostop_plan();
        let mut stopped = Vec::new();
        for (machine, mode) in plan {
            let action = if mode == AutoStop::Suspend {
                "suspend"
            } else {
                "stop"
            };
            tracing::info!(app = %machine.app, machine = %machine.id, action, "autostop");
            let mut result = control
                .machine_action(&machine.app, &machine.id, action)
                .await;
            if result.is_err() && mode == AutoStop::Suspend {
                // The driver cannot suspend: stop instead.
                result = control
                    .machine_action(&machine.app, &machine.id, "stop")
                    .await;
            }
            match result {
                Ok(()) => {
                    self.metrics.machine_stops.inc();
                    stopped.push(machine.id.clone());
                }
                Err(e) => {
                    tracing::warn!(app = %machine.app, machine = %machine.id, error = %e, "autostop failed")
                }
            }
        }
        stopped
    }

    /// The machines to stop now, by the excess-capacity rule.
    pub(crate) fn autostop_plan(&self) -> Vec<(Arc<MachineView>, AutoStop)> {
        let snapshot = self.catalog.snapshot();
        let mut plan = Vec::new();
        let mut apps: Vec<_> = snapshot.apps.values().collect();
        apps.sort_by(|a, b| a.name.cmp(&b.name));
        for app in apps {
            let primary = self.catalog.primary_region(&app.name);
            // Group started machines by (service internal port, region) for services with autostop.
            let mut groups: HashMap<(String, String), Vec<Member>> = HashMap::new();
            for machine in &app.machines {
                if machine.state != MachineState::Started || machine.region != self.config.region {
                    continue;
                }
                if self.recently_started(&machine.id) {
                    continue;
                }
                for (i, service) in machine.services.iter().enumerate() {
                    let mode = service.autostop.unwrap_or(AutoStop::Off);
                    if mode == AutoStop::Off {
                        continue;
                    }
                    let load = machine
                        .backends
                        .get(i)
                        .and_then(|b| b.as_ref())
                        .map(|b| b.load())
                        .unwrap_or(0);
                    let limits = Limits::of(service.concurrency.as_ref());
                    let min = service.min_machines_running.unwrap_or(0);
                    groups
                        .entry((service_key(service), machine.region.clone()))
                        .or_default()
                        .push((machine.clone(), load, limits, mode, min));
                }
            }
            let mut keys: Vec<_> = groups.keys().cloned().collect();
            keys.sort();
            let mut chosen_regions = std::collections::HashSet::new();
            for key in keys {
                let region = key.1.clone();
                if chosen_regions.contains(&region) {
                    continue; // one machine per region per pass
                }
                let members = &groups[&key];
                let running = members.len() as i64;
                let over_soft = members
                    .iter()
                    .filter(|(_, load, limits, _, _)| *load >= limits.soft)
                    .count() as i64;
                let candidate = members
                    .iter()
                    .min_by_key(|(m, load, ..)| (*load, m.id.clone()));
                let Some((machine, load, _, mode, min)) = candidate else {
                    continue;
                };
                let stop = if running > 1 {
                    running - (over_soft + 1) >= 1
                } else {
                    *load == 0
                };
                if !stop {
                    continue;
                }
                let in_primary = primary.as_deref().is_none_or(|p| p == region);
                if in_primary && running - 1 < *min as i64 {
                    continue;
                }
                chosen_regions.insert(region);
                plan.push((machine.clone(), *mode));
            }
        }
        plan
    }
}

/// What makes services of different machines "the same service": protocol and public ports.
fn service_key(service: &aloft_api::MachineService) -> String {
    let mut ports: Vec<String> = service
        .ports
        .iter()
        .map(|p| format!("{:?}-{:?}-{:?}", p.port, p.start_port, p.end_port))
        .collect();
    ports.sort();
    format!("{}/{}", service.protocol, ports.join(","))
}

/// A started machine in an autostop group: (machine, load, limits, mode, min running).
type Member = (Arc<MachineView>, u32, Limits, AutoStop, u32);

pub(crate) async fn autostop_loop(proxy: Arc<Proxy>) {
    let mut interval = tokio::time::interval(proxy.config.autostop_interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    interval.tick().await;
    loop {
        interval.tick().await;
        proxy.autostop_pass().await;
    }
}
