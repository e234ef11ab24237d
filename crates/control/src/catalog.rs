//! The catalog: every change that proxies and DNS servers need (apps with their IPs and
//! certificate hostnames; machines with state, region, host, addresses, services,
//! checks), numbered, kept for a while so followers can resume, and broadcast as it
//! happens.
//!
//! Each update is a `CatalogUpdate` plus fields the shared types do not carry yet, added
//! to its JSON: an app's `ips` (`[{address, type}]`) and `certificates`, a machine's
//! `checks` and `cordoned` (a cordoned machine is published with no services, so nothing
//! routes to it).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};

use aloft_api::internal::{CatalogApp, CatalogMachine, CatalogUpdate};
use serde_json::json;
use tokio::sync::broadcast;

use crate::store::{AppRow, CertificateRow, IpRow, MachineRow, Store, StoreResult};

const HISTORY: usize = 4096;

/// One numbered change, with its wire form.
#[derive(Clone, Debug)]
pub struct Published {
    pub update: CatalogUpdate,
    /// The JSON sent as the event's data.
    pub data: Arc<str>,
}

impl Published {
    pub fn seq(&self) -> u64 {
        update_seq(&self.update)
    }
}

pub struct Catalog {
    state: Mutex<History>,
    sender: broadcast::Sender<Published>,
    base_domain: String,
    store: Arc<Store>,
}

struct History {
    seq: u64,
    recent: VecDeque<Published>,
}

/// Where a follower starts: the changes it missed, or a fresh snapshot.
pub enum Resume {
    Replay(Vec<Published>),
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

fn ip_json(ip: &IpRow) -> serde_json::Value {
    json!({ "address": ip.ip, "type": ip.kind, "region": ip.region })
}

impl Catalog {
    /// Sequence numbers start at the start time in microseconds, so they keep growing
    /// across restarts and a follower's old `Last-Event-ID` is never mistaken for a
    /// current one.
    pub fn new(base_domain: &str, store: Arc<Store>) -> Self {
        let (sender, _) = broadcast::channel(HISTORY);
        let start = chrono::Utc::now().timestamp_micros().max(0) as u64;
        Self {
            state: Mutex::new(History {
                seq: start,
                recent: VecDeque::new(),
            }),
            sender,
            base_domain: base_domain.to_string(),
            store,
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Published> {
        self.sender.subscribe()
    }

    pub fn app_entry(&self, app: &AppRow, certificates: &[CertificateRow]) -> CatalogApp {
        let mut hostnames = vec![format!("{}.{}", app.name, self.base_domain)];
        hostnames.extend(certificates.iter().map(|c| c.hostname.clone()));
        CatalogApp {
            name: app.name.clone(),
            org: app.org_slug.clone(),
            network: app.network.clone(),
            hostnames,
        }
    }

    fn app_json(
        &self,
        app: &AppRow,
        ips: &[IpRow],
        certificates: &[CertificateRow],
    ) -> serde_json::Value {
        let mut value = serde_json::to_value(self.app_entry(app, certificates)).unwrap_or_default();
        value["ips"] = ips.iter().map(ip_json).collect();
        value["certificates"] = certificates
            .iter()
            .map(|c| json!({ "hostname": c.hostname, "source": c.source, "status": c.status }))
            .collect();
        value
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
            services: if machine.cordoned {
                Vec::new()
            } else {
                machine.config.services.clone()
            },
        }
    }

    fn machine_json(machine: &MachineRow) -> serde_json::Value {
        let mut value = serde_json::to_value(Self::machine_entry(machine)).unwrap_or_default();
        value["checks"] = serde_json::to_value(&machine.checks).unwrap_or_default();
        value["cordoned"] = machine.cordoned.into();
        value["metadata"] = serde_json::to_value(&machine.config.metadata).unwrap_or_default();
        value
    }

    fn publish(&self, make: impl FnOnce(u64) -> (CatalogUpdate, serde_json::Value)) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.seq += 1;
        let (update, value) = make(state.seq);
        let published = Published {
            update,
            data: Arc::from(value.to_string()),
        };
        if state.recent.len() == HISTORY {
            state.recent.pop_front();
        }
        state.recent.push_back(published.clone());
        // No receivers is fine: nobody follows yet.
        let _ = self.sender.send(published);
    }

    /// Publishes the app as stored now, with its IPs and certificates.
    pub fn app_changed(&self, app: &AppRow) {
        let ips = self.store.ips(Some(&app.id)).unwrap_or_else(|err| {
            tracing::error!(app = %app.name, error = %err, "reading IPs for the catalog failed");
            Vec::new()
        });
        let certificates = self.store.certificates(Some(&app.id)).unwrap_or_else(|err| {
            tracing::error!(app = %app.name, error = %err, "reading certificates for the catalog failed");
            Vec::new()
        });
        let entry = self.app_entry(app, &certificates);
        let value = self.app_json(app, &ips, &certificates);
        self.publish(|seq| {
            let update = CatalogUpdate::App { seq, app: entry };
            let mut wire = serde_json::to_value(&update).unwrap_or_default();
            wire["app"] = value;
            (update, wire)
        });
    }

    pub fn app_removed(&self, name: &str) {
        self.publish(|seq| {
            let update = CatalogUpdate::AppRemoved {
                seq,
                name: name.to_string(),
            };
            let wire = serde_json::to_value(&update).unwrap_or_default();
            (update, wire)
        });
    }

    pub fn machine_changed(&self, machine: &MachineRow) {
        let entry = Self::machine_entry(machine);
        let value = Self::machine_json(machine);
        self.publish(|seq| {
            let update = CatalogUpdate::Machine {
                seq,
                machine: entry,
            };
            let mut wire = serde_json::to_value(&update).unwrap_or_default();
            wire["machine"] = value;
            (update, wire)
        });
    }

    pub fn machine_removed(&self, id: &str) {
        self.publish(|seq| {
            let update = CatalogUpdate::MachineRemoved {
                seq,
                id: id.to_string(),
            };
            let wire = serde_json::to_value(&update).unwrap_or_default();
            (update, wire)
        });
    }

    /// Takes a machine out of routing (or puts it back): recorded on the machine, so it
    /// holds across restarts, and published to followers.
    pub fn set_cordoned(&self, machine: &MachineRow, cordoned: bool) {
        if machine.cordoned == cordoned {
            return;
        }
        if let Err(err) = self.store.set_machine_cordoned(&machine.id, cordoned) {
            tracing::error!(machine = %machine.id, error = %err, "recording cordon failed");
            return;
        }
        match self.store.machine(&machine.id) {
            Ok(Some(row)) => self.machine_changed(&row),
            Ok(None) => {}
            Err(err) => {
                tracing::error!(machine = %machine.id, error = %err, "reading a cordoned machine failed")
            }
        }
    }

    pub fn is_cordoned(&self, machine_id: &str) -> bool {
        self.store
            .machine(machine_id)
            .ok()
            .flatten()
            .is_some_and(|m| m.cordoned)
    }

    /// Subscribes, then says how the follower catches up from `last_seen`. Subscribing
    /// first means nothing published in between is lost (at worst it is seen twice, and
    /// every update is an idempotent upsert or removal).
    pub fn follow(&self, last_seen: Option<u64>) -> (broadcast::Receiver<Published>, Resume, u64) {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let receiver = self.sender.subscribe();
        let current = state.seq;
        let resume = match last_seen {
            Some(seen) if seen == current => Resume::Replay(Vec::new()),
            Some(seen) if seen < current => {
                let oldest = state
                    .recent
                    .front()
                    .map(Published::seq)
                    .unwrap_or(current + 1);
                if seen + 1 >= oldest {
                    Resume::Replay(
                        state
                            .recent
                            .iter()
                            .filter(|u| u.seq() > seen)
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

    /// Everything as stored now, numbered `seq` (the last update it includes).
    pub fn snapshot(&self, seq: u64) -> StoreResult<Published> {
        let apps = self.store.list_apps(None)?;
        let mut ips: BTreeMap<String, Vec<IpRow>> = BTreeMap::new();
        for ip in self.store.ips(None)? {
            ips.entry(ip.app_id.clone()).or_default().push(ip);
        }
        let mut certificates: BTreeMap<String, Vec<CertificateRow>> = BTreeMap::new();
        for cert in self.store.certificates(None)? {
            certificates
                .entry(cert.app_id.clone())
                .or_default()
                .push(cert);
        }
        let machines = self.store.all_live_machines()?;
        let none_ips = Vec::new();
        let none_certs = Vec::new();
        let app_parts: Vec<(CatalogApp, serde_json::Value)> = apps
            .iter()
            .map(|a| {
                let certs = certificates.get(&a.id).unwrap_or(&none_certs);
                (
                    self.app_entry(a, certs),
                    self.app_json(a, ips.get(&a.id).unwrap_or(&none_ips), certs),
                )
            })
            .collect();
        let update = CatalogUpdate::Snapshot {
            seq,
            apps: app_parts.iter().map(|(entry, _)| entry.clone()).collect(),
            machines: machines.iter().map(Self::machine_entry).collect(),
        };
        let wire = json!({
            "type": "snapshot",
            "seq": seq,
            "apps": app_parts.into_iter().map(|(_, value)| value).collect::<Vec<_>>(),
            "machines": machines.iter().map(Self::machine_json).collect::<Vec<_>>(),
        });
        Ok(Published {
            update,
            data: Arc::from(wire.to_string()),
        })
    }
}
