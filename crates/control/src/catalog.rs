//! The catalog: every change that proxies and DNS servers need (apps with their IPs and
//! certificate hostnames; machines with state, region, host, addresses, services,
//! checks), numbered, kept for a while so followers can resume, and broadcast as it
//! happens.
//!
//! Each update is a `CatalogUpdate` plus fields the shared types do not carry, added to
//! its JSON: an app's `certificates`, a machine's `cordoned` and `metadata` (a cordoned
//! machine is published with no services, so nothing routes to it). An app's network and
//! addresses come from `ips`; a machine's check results from the agents' reports
//! (`checks`).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};

use aloft_api::internal::{CatalogApp, CatalogMachine, CatalogUpdate};
use serde_json::json;
use tokio::sync::broadcast;

use crate::store::{AppRow, CertificateRow, MachineRow, Store, StoreResult};

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
    /// Machines' latest health check results, carried in their catalog entries.
    pub checks: crate::checks::CheckBoard,
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

/// A machine update as followers receive it: the shared entry plus `cordoned` and
/// `metadata`.
#[derive(serde::Serialize)]
struct MachineWire<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    seq: u64,
    machine: MachineEntryWire<'a>,
}

#[derive(serde::Serialize)]
struct MachineEntryWire<'a> {
    #[serde(flatten)]
    entry: &'a CatalogMachine,
    cordoned: bool,
    metadata: &'a BTreeMap<String, String>,
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
            checks: Default::default(),
            store,
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Published> {
        self.sender.subscribe()
    }

    pub fn app_entry(&self, app: &AppRow, certificates: &[CertificateRow]) -> CatalogApp {
        let mut hostnames = vec![format!("{}.{}", app.name, self.base_domain)];
        hostnames.extend(certificates.iter().map(|c| c.hostname.clone()));
        let (network_id, ips) = crate::ips::catalog_fields(&self.store, app).unwrap_or_else(|err| {
            tracing::error!(app = %app.name, error = %err, "reading the app's network and addresses");
            (0, Vec::new())
        });
        CatalogApp {
            name: app.name.clone(),
            org: app.org_slug.clone(),
            network: app.network.clone(),
            hostnames,
            network_id,
            ips,
            primary_region: self.primary_region(app),
        }
    }

    /// The app's certificates without hostnames under the base domain that name another
    /// app: rows stored before such claims were refused are never published, so the
    /// platform name `<app>.<base>` (and below) routes to app `<app>` only.
    fn claimable(&self, app: &AppRow, certificates: Vec<CertificateRow>) -> Vec<CertificateRow> {
        certificates
            .into_iter()
            .filter(|cert| {
                let ok = crate::certs::may_claim(&app.name, &cert.hostname, &self.base_domain);
                if !ok {
                    tracing::warn!(app = %app.name, hostname = %cert.hostname, "not publishing a hostname under the platform's domain that names another app");
                }
                ok
            })
            .collect()
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

    fn app_json(&self, entry: &CatalogApp, certificates: &[CertificateRow]) -> serde_json::Value {
        let mut value = serde_json::to_value(entry).unwrap_or_default();
        value["certificates"] = certificates
            .iter()
            .map(|c| json!({ "hostname": c.hostname, "source": c.source, "status": c.status }))
            .collect();
        value
    }

    /// The entry followers see: a cordoned machine has no services, so no proxy routes to
    /// it; checks are the latest its agent reported.
    pub fn machine_entry(&self, machine: &MachineRow) -> CatalogMachine {
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
            checks: self.checks.get(&machine.id),
            statics: machine.config.statics.clone(),
        }
    }

    fn machine_json(entry: &CatalogMachine, machine: &MachineRow) -> serde_json::Value {
        let mut value = serde_json::to_value(entry).unwrap_or_default();
        value["cordoned"] = machine.cordoned.into();
        value["metadata"] = serde_json::to_value(&machine.config.metadata).unwrap_or_default();
        value
    }

    fn publish(&self, make: impl FnOnce(u64) -> (CatalogUpdate, serde_json::Value)) {
        self.publish_text(|seq| {
            let (update, value) = make(seq);
            (update, value.to_string())
        });
    }

    fn publish_text(&self, make: impl FnOnce(u64) -> (CatalogUpdate, String)) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.seq += 1;
        let (update, data) = make(state.seq);
        let published = Published {
            update,
            data: Arc::from(data),
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
        let certificates = self.store.certificates(Some(&app.id)).unwrap_or_else(|err| {
            tracing::error!(app = %app.name, error = %err, "reading certificates for the catalog failed");
            Vec::new()
        });
        let certificates = self.claimable(app, certificates);
        let entry = self.app_entry(app, &certificates);
        let value = self.app_json(&entry, &certificates);
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
        let entry = self.machine_entry(machine);
        self.publish_text(|seq| {
            // Written straight to text (no `serde_json::Value` in between): this runs on
            // every change of every machine.
            let data = serde_json::to_string(&MachineWire {
                kind: "machine",
                seq,
                machine: MachineEntryWire {
                    entry: &entry,
                    cordoned: machine.cordoned,
                    metadata: &machine.config.metadata,
                },
            })
            .unwrap_or_default();
            let update = CatalogUpdate::Machine {
                seq,
                machine: entry,
            };
            (update, data)
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
        match self.store.set_machine_cordoned(&machine.id, cordoned) {
            Ok(true) => {}
            Ok(false) => return,
            Err(err) => {
                tracing::error!(machine = %machine.id, error = %err, "recording cordon failed");
                return;
            }
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
        let mut certificates: BTreeMap<String, Vec<CertificateRow>> = BTreeMap::new();
        for cert in self.store.certificates(None)? {
            certificates
                .entry(cert.app_id.clone())
                .or_default()
                .push(cert);
        }
        for app in &apps {
            if let Some(certs) = certificates.remove(&app.id) {
                certificates.insert(app.id.clone(), self.claimable(app, certs));
            }
        }
        let machines = self.store.all_live_machines()?;
        let none = Vec::new();
        let app_parts: Vec<(CatalogApp, serde_json::Value)> = apps
            .iter()
            .map(|a| {
                let certs = certificates.get(&a.id).unwrap_or(&none);
                let entry = self.app_entry(a, certs);
                let value = self.app_json(&entry, certs);
                (entry, value)
            })
            .collect();
        let machine_parts: Vec<(CatalogMachine, serde_json::Value)> = machines
            .iter()
            .map(|m| {
                let entry = self.machine_entry(m);
                let value = Self::machine_json(&entry, m);
                (entry, value)
            })
            .collect();
        let wire = json!({
            "type": "snapshot",
            "seq": seq,
            "apps": app_parts.iter().map(|(_, value)| value).collect::<Vec<_>>(),
            "machines": machine_parts.iter().map(|(_, value)| value).collect::<Vec<_>>(),
        });
        let update = CatalogUpdate::Snapshot {
            seq,
            apps: app_parts.into_iter().map(|(entry, _)| entry).collect(),
            machines: machine_parts.into_iter().map(|(entry, _)| entry).collect(),
        };
        Ok(Published {
            update,
            data: Arc::from(wire.to_string()),
        })
    }
}
