//! The catalog: every change that proxies and DNS servers need (apps, machines), numbered,
//! kept for a while so followers can resume, and broadcast as it happens.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use aloft_api::internal::{CatalogApp, CatalogMachine, CatalogUpdate};
use tokio::sync::broadcast;

use crate::store::{AppRow, MachineRow, Store, StoreResult};

const HISTORY: usize = 4096;

pub struct Catalog {
    state: Mutex<History>,
    sender: broadcast::Sender<CatalogUpdate>,
    base_domain: String,
    /// Machines kept out of routing (published without services): new machines of a
    /// deploy until they are healthy, old ones while they drain.
    cordoned: Mutex<HashSet<String>>,
    /// Machines' latest health check results, carried in their catalog entries.
    pub checks: crate::checks::CheckBoard,
    store: Arc<Store>,
}

struct History {
    seq: u64,
    recent: VecDeque<CatalogUpdate>,
}

/// Where a follower starts: the changes it missed, or a fresh snapshot.
pub enum Resume {
    Replay(Vec<CatalogUpdate>),
    Snapshot,
}

pub fn update_seq(update: &CatalogUpdate) -> u64 {
    match update {
        CatalogUpdate::Snapshot { seq, .. }
        | CatalogUpdate::App { seq, .. }
        | CatalogUpdate::AppRemoved { seq, .. }
        | CatalogUpdate::Machine { seq, .. }
        | CatalogUpdate::MachineRemoved { seq, .. } => *seq,
    }
}

impl Catalog {
    pub fn new(base_domain: &str, store: Arc<Store>) -> Self {
        let (sender, _) = broadcast::channel(HISTORY);
        Self {
            state: Mutex::new(History {
                seq: 0,
                recent: VecDeque::new(),
            }),
            sender,
            base_domain: base_domain.to_string(),
            cordoned: Mutex::new(HashSet::new()),
            checks: Default::default(),
            store,
        }
    }

    pub fn app_entry(&self, app: &AppRow) -> CatalogApp {
        let (network_id, ips) = crate::ips::catalog_fields(&self.store, app).unwrap_or_else(|err| {
            tracing::error!(app = %app.name, error = %err, "reading the app's network and addresses");
            (0, Vec::new())
        });
        CatalogApp {
            name: app.name.clone(),
            org: app.org_slug.clone(),
            network: app.network.clone(),
            hostnames: vec![format!("{}.{}", app.name, self.base_domain)],
            network_id,
            ips,
            primary_region: self.primary_region(app),
        }
    }

    /// Where the app's latest release put its machines: its config's `primary_region`, or
    /// the nearest region that has hosts, as the deploy placed them.
    fn primary_region(&self, app: &AppRow) -> Option<String> {
        let release = match self.store.releases(&app.id, 1) {
            Ok(releases) => releases.into_iter().next()?,
            Err(err) => {
                tracing::error!(app = %app.name, error = %err, "reading the app's latest release");
                return None;
            }
        };
        let config: serde_json::Value = serde_json::from_str(&release.config).ok()?;
        let wanted = config
            .get("primary_region")
            .and_then(|r| r.as_str())
            .filter(|r| !r.is_empty())?;
        let placed = self
            .store
            .hosts()
            .ok()
            .and_then(|hosts| crate::hosts::place(&hosts, wanted).ok())
            .map(|p| p.region);
        Some(placed.unwrap_or_else(|| wanted.to_string()))
    }

    pub fn machine_entry(machine: &MachineRow) -> CatalogMachine {
        CatalogMachine {
            id: machine.id.clone(),
            app: machine.app_name.clone(),
            state: machine.state,
            region: machine.region.clone(),
            host: machine.host_id.clone(),
            instance_id: machine.instance_id.clone(),
            process_group: machine.process_group().map(str::to_string),
            private_ipv4: machine.private_ipv4.clone(),
            private_ip: machine.private_ip.clone(),
            services: machine.config.services.clone(),
            checks: Vec::new(),
        }
    }

    /// The entry followers see: a cordoned machine has no services, so no proxy routes to it.
    fn routed_entry(&self, machine: &MachineRow) -> CatalogMachine {
        let mut entry = Self::machine_entry(machine);
        entry.checks = self.checks.get(&machine.id);
        if self.is_cordoned(&machine.id) {
            entry.services.clear();
        }
        entry
    }

    pub fn is_cordoned(&self, machine_id: &str) -> bool {
        self.cordoned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(machine_id)
    }

    /// Takes a machine out of routing (or puts it back) and tells the followers.
    pub fn set_cordoned(&self, machine: &MachineRow, cordoned: bool) {
        let changed = {
            let mut set = self.cordoned.lock().unwrap_or_else(|p| p.into_inner());
            if cordoned {
                set.insert(machine.id.clone())
            } else {
                set.remove(&machine.id)
            }
        };
        if changed {
            self.machine_changed(machine);
        }
    }

    fn publish(&self, make: impl FnOnce(u64) -> CatalogUpdate) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.seq += 1;
        let update = make(state.seq);
        if state.recent.len() == HISTORY {
            state.recent.pop_front();
        }
        state.recent.push_back(update.clone());
        // No receivers is fine: nobody follows yet.
        let _ = self.sender.send(update);
    }

    pub fn app_changed(&self, app: &AppRow) {
        let entry = self.app_entry(app);
        self.publish(|seq| CatalogUpdate::App { seq, app: entry });
    }

    pub fn app_removed(&self, name: &str) {
        self.publish(|seq| CatalogUpdate::AppRemoved {
            seq,
            name: name.to_string(),
        });
    }

    pub fn machine_changed(&self, machine: &MachineRow) {
        let entry = self.routed_entry(machine);
        self.publish(|seq| CatalogUpdate::Machine {
            seq,
            machine: entry,
        });
    }

    pub fn machine_removed(&self, id: &str) {
        self.cordoned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        self.publish(|seq| CatalogUpdate::MachineRemoved {
            seq,
            id: id.to_string(),
        });
    }

    /// Subscribes, then says how the follower catches up from `last_seen`. Subscribing
    /// first means nothing published in between is lost (at worst it is seen twice, and
    /// every update is an idempotent upsert or removal).
    pub fn follow(
        &self,
        last_seen: Option<u64>,
    ) -> (broadcast::Receiver<CatalogUpdate>, Resume, u64) {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let receiver = self.sender.subscribe();
        let current = state.seq;
        let resume = match last_seen {
            Some(seen) if seen == current => Resume::Replay(Vec::new()),
            Some(seen) if seen < current => {
                let oldest = state.recent.front().map(update_seq).unwrap_or(current + 1);
                if seen + 1 >= oldest {
                    Resume::Replay(
                        state
                            .recent
                            .iter()
                            .filter(|u| update_seq(u) > seen)
                            .cloned()
                            .collect(),
                    )
                } else {
                    Resume::Snapshot
                }
            }
            _ => Resume::Snapshot,
        };
        (receiver, resume, current)
    }

    pub fn snapshot(&self, store: &Store, seq: u64) -> StoreResult<CatalogUpdate> {
        let apps = store
            .list_apps(None)?
            .iter()
            .map(|a| self.app_entry(a))
            .collect();
        let machines = store
            .all_live_machines()?
            .iter()
            .map(|m| self.routed_entry(m))
            .collect();
        Ok(CatalogUpdate::Snapshot {
            seq,
            apps,
            machines,
        })
    }
}
