//! The names the resolver answers itself, built from the catalog: one immutable [`Zone`]
//! per catalog change, split by 6PN network so a query only ever sees its own network.

use std::collections::{BTreeSet, HashMap};
use std::net::Ipv6Addr;

use aloft_api::MachineState;
use aloft_api::internal::{CatalogApp, CatalogMachine, CatalogUpdate};
use aloft_api::sixpn;

/// What a query asks for, as far as the zone cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueryKind {
    Aaaa,
    Txt,
    Other,
}

/// The zone's answer to one question.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    Aaaa(Vec<Ipv6Addr>),
    /// One TXT record whose text is this string.
    Txt(String),
    /// The name exists but has no records of the asked type (or none right now).
    NoData,
    NxDomain,
    /// A `.internal`/`.flycast` name asked by someone outside any 6PN network.
    Refused,
    /// Not ours: forward to the upstream resolvers.
    Forward,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MachineEntry {
    pub id: String,
    pub region: String,
    pub address: Ipv6Addr,
    pub started: bool,
    pub process_group: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AppZone {
    /// Sorted by machine id.
    pub machines: Vec<MachineEntry>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetworkZone {
    pub apps: HashMap<String, AppZone>,
    /// App name → its Flycast addresses in this network (the app may live in another).
    pub flycast: HashMap<String, Vec<Ipv6Addr>>,
    /// WireGuard peer name → address.
    pub peers: HashMap<String, Ipv6Addr>,
}

/// Everything the resolver answers, by network.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Zone {
    pub networks: HashMap<u32, NetworkZone>,
    /// The region of the host this resolver runs on (`nearest.of` sorts from here).
    pub region: String,
}

/// TTL of every answer: names follow machines starting and stopping.
pub const TTL: u32 = 5;

/// The catalog as the resolver keeps it between updates.
#[derive(Default)]
pub struct CatalogState {
    pub seq: u64,
    pub apps: HashMap<String, CatalogApp>,
    pub machines: HashMap<String, CatalogMachine>,
    pub peers: HashMap<u32, HashMap<String, Ipv6Addr>>,
}

impl CatalogState {
    pub fn apply(&mut self, update: CatalogUpdate) {
        match update {
            CatalogUpdate::Snapshot {
                seq,
                apps,
                machines,
            } => {
                self.seq = seq;
                self.apps = apps.into_iter().map(|a| (a.name.clone(), a)).collect();
                self.machines = machines.into_iter().map(|m| (m.id.clone(), m)).collect();
            }
            CatalogUpdate::App { seq, app } => {
                self.seq = self.seq.max(seq);
                self.apps.insert(app.name.clone(), app);
            }
            CatalogUpdate::AppRemoved { seq, name } => {
                self.seq = self.seq.max(seq);
                self.apps.remove(&name);
                self.machines.retain(|_, m| m.app != name);
            }
            CatalogUpdate::Machine { seq, machine } => {
                self.seq = self.seq.max(seq);
                if machine.state == MachineState::Destroyed {
                    self.machines.remove(&machine.id);
                } else {
                    self.machines.insert(machine.id.clone(), machine);
                }
            }
            CatalogUpdate::MachineRemoved { seq, id } => {
                self.seq = self.seq.max(seq);
                self.machines.remove(&id);
            }
        }
    }

    pub fn build(&self, region: &str) -> Zone {
        let mut zone = Zone {
            networks: HashMap::new(),
            region: region.to_string(),
        };
        for app in self.apps.values() {
            if app.network_id != 0 {
                zone.networks
                    .entry(app.network_id)
                    .or_default()
                    .apps
                    .insert(app.name.clone(), AppZone::default());
            }
            for ip in app.ips.iter().filter(|ip| ip.kind == "private_v6") {
                let Ok(address) = ip.address.parse::<Ipv6Addr>() else {
                    continue;
                };
                let Some(network) = sixpn::network_of(&address) else {
                    continue;
                };
                zone.networks
                    .entry(network)
                    .or_default()
                    .flycast
                    .entry(app.name.clone())
                    .or_default()
                    .push(address);
            }
        }
        for machine in self.machines.values() {
            let Some(app) = self.apps.get(&machine.app).filter(|a| a.network_id != 0) else {
                continue;
            };
            let Some(address) = machine
                .private_ip
                .as_deref()
                .and_then(|ip| ip.parse::<Ipv6Addr>().ok())
            else {
                continue;
            };
            let entry = MachineEntry {
                id: machine.id.clone(),
                region: machine.region.clone(),
                address,
                started: machine.state == MachineState::Started,
                process_group: machine.process_group.clone(),
            };
            if let Some(app_zone) = zone
                .networks
                .get_mut(&app.network_id)
                .and_then(|n| n.apps.get_mut(&app.name))
            {
                app_zone.machines.push(entry);
            }
        }
        for (network, peers) in &self.peers {
            zone.networks.entry(*network).or_default().peers = peers.clone();
        }
        for network in zone.networks.values_mut() {
            for app in network.apps.values_mut() {
                app.machines.sort_by(|a, b| a.id.cmp(&b.id));
            }
            for addresses in network.flycast.values_mut() {
                addresses.sort();
            }
        }
        zone
    }
}

fn join<I: IntoIterator<Item = String>>(items: I, separator: &str) -> String {
    items.into_iter().collect::<Vec<_>>().join(separator)
}

impl Zone {
    /// Every network the zone knows (each gets its own DNS address on every host).
    pub fn network_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self.networks.keys().copied().collect();
        ids.sort();
        ids
    }

    /// Answers `name` (any case, with or without the final dot) for a client in
    /// `network`.
    pub fn resolve(&self, network: Option<u32>, name: &str, kind: QueryKind) -> Answer {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let (labels, flycast) = if let Some(rest) = name.strip_suffix(".internal") {
            (rest, false)
        } else if let Some(rest) = name.strip_suffix(".flycast") {
            (rest, true)
        } else if name == "internal" || name == "flycast" {
            return if network.is_some() {
                Answer::NoData
            } else {
                Answer::Refused
            };
        } else {
            return Answer::Forward;
        };
        let Some(network) = network else {
            return Answer::Refused;
        };
        let empty = NetworkZone::default();
        let zone = self.networks.get(&network).unwrap_or(&empty);
        let labels: Vec<&str> = labels.split('.').collect();
        if flycast {
            return match labels.as_slice() {
                [app] => match zone.flycast.get(*app) {
                    Some(addresses) => aaaa(kind, addresses.clone()),
                    None => Answer::NxDomain,
                },
                _ => Answer::NxDomain,
            };
        }
        let Some((last, prefix)) = labels.split_last() else {
            return Answer::NxDomain;
        };
        match (*last, prefix) {
            ("_apps", []) => {
                let names: BTreeSet<&String> = zone.apps.keys().collect();
                txt(kind, join(names.into_iter().cloned(), ","))
            }
            ("_peer", []) => {
                let names: BTreeSet<&String> = zone
                    .peers
                    .keys()
                    .filter(|n| !n.starts_with("interactive-"))
                    .collect();
                txt(kind, join(names.into_iter().cloned(), ","))
            }
            ("_peer", [peer]) => match zone.peers.get(*peer) {
                Some(address) => aaaa(kind, vec![*address]),
                None => Answer::NxDomain,
            },
            ("_instances", []) => txt(kind, instances(zone, true)),
            ("_instances", ["all"]) => txt(kind, instances(zone, false)),
            (app, prefix) => match zone.apps.get(app) {
                Some(app_zone) => self.resolve_app(app_zone, prefix, kind),
                None => Answer::NxDomain,
            },
        }
    }

    fn resolve_app(&self, app: &AppZone, prefix: &[&str], kind: QueryKind) -> Answer {
        let started = || app.machines.iter().filter(|m| m.started);
        let addresses = |machines: Vec<&MachineEntry>| {
            aaaa(kind, machines.into_iter().map(|m| m.address).collect())
        };
        match prefix {
            [] | ["global"] => addresses(started().collect()),
            ["vms"] => txt(
                kind,
                join(started().map(|m| format!("{} {}", m.id, m.region)), ","),
            ),
            ["all", "vms"] => txt(
                kind,
                join(
                    app.machines
                        .iter()
                        .map(|m| format!("{} {}", m.id, m.region)),
                    ",",
                ),
            ),
            ["regions"] => txt(
                kind,
                join(
                    started().map(|m| m.region.clone()).collect::<BTreeSet<_>>(),
                    ",",
                ),
            ),
            ["all", "regions"] => txt(
                kind,
                join(
                    app.machines
                        .iter()
                        .map(|m| m.region.clone())
                        .collect::<BTreeSet<_>>(),
                    ",",
                ),
            ),
            [id, "vm"] => match app.machines.iter().find(|m| m.id == *id) {
                Some(machine) => addresses(started().filter(|m| m.id == machine.id).collect()),
                None => Answer::NxDomain,
            },
            [group, "process"] => addresses(
                started()
                    .filter(|m| m.process_group.as_deref().unwrap_or("app") == *group)
                    .collect(),
            ),
            [top, "nearest", "of"] => match top
                .strip_prefix("top")
                .and_then(|n| n.parse::<usize>().ok())
                .filter(|n| *n > 0)
            {
                Some(count) => {
                    let mut machines: Vec<(f64, &MachineEntry)> = started()
                        .map(|m| {
                            (
                                aloft_api::regions::distance_km(&self.region, &m.region)
                                    .unwrap_or(f64::MAX),
                                m,
                            )
                        })
                        .collect();
                    machines.sort_by(|a, b| a.0.total_cmp(&b.0).then_with(|| a.1.id.cmp(&b.1.id)));
                    addresses(machines.into_iter().take(count).map(|(_, m)| m).collect())
                }
                None => Answer::NxDomain,
            },
            [region] => {
                let known = app.machines.iter().any(|m| m.region == *region)
                    || aloft_api::regions::find(region).is_some();
                if !known {
                    return Answer::NxDomain;
                }
                addresses(started().filter(|m| m.region == *region).collect())
            }
            _ => Answer::NxDomain,
        }
    }
}

fn aaaa(kind: QueryKind, addresses: Vec<Ipv6Addr>) -> Answer {
    if kind == QueryKind::Aaaa && !addresses.is_empty() {
        Answer::Aaaa(addresses)
    } else {
        Answer::NoData
    }
}

fn txt(kind: QueryKind, text: String) -> Answer {
    if kind == QueryKind::Txt {
        Answer::Txt(text)
    } else {
        Answer::NoData
    }
}

fn instances(zone: &NetworkZone, started_only: bool) -> String {
    let mut rows: Vec<(&String, &MachineEntry)> = zone
        .apps
        .iter()
        .flat_map(|(name, app)| app.machines.iter().map(move |m| (name, m)))
        .filter(|(_, m)| m.started || !started_only)
        .collect();
    rows.sort_by(|a, b| a.1.id.cmp(&b.1.id));
    join(
        rows.into_iter().map(|(app, m)| {
            format!(
                "instance={},app={app},ip={},region={}",
                m.id, m.address, m.region
            )
        }),
        ";",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use aloft_api::internal::CatalogIp;

    fn app(name: &str, network_id: u32) -> CatalogApp {
        CatalogApp {
            name: name.into(),
            org: "o".into(),
            network: "default".into(),
            network_id,
            ..Default::default()
        }
    }

    fn machine(
        id: &str,
        app: &str,
        region: &str,
        ip: &str,
        state: MachineState,
        group: &str,
    ) -> CatalogMachine {
        CatalogMachine {
            id: id.into(),
            app: app.into(),
            state,
            region: region.into(),
            host: "h".into(),
            instance_id: "i".into(),
            process_group: Some(group.into()),
            private_ipv4: None,
            private_ip: Some(ip.into()),
            services: vec![],
            checks: vec![],
            statics: Vec::new(),
        }
    }

    fn zone() -> Zone {
        let mut state = CatalogState::default();
        let mut api = app("api", 1);
        api.ips.push(CatalogIp {
            address: "fdaa:0:1::1:1".into(),
            kind: "private_v6".into(),
        });
        api.ips.push(CatalogIp {
            address: "fdaa:0:2::1:1".into(),
            kind: "private_v6".into(),
        });
        api.ips.push(CatalogIp {
            address: "198.51.100.1".into(),
            kind: "v4".into(),
        });
        state.apply(CatalogUpdate::Snapshot {
            seq: 1,
            apps: vec![api, app("web", 1), app("other", 2)],
            machines: vec![
                machine(
                    "m1",
                    "api",
                    "ams",
                    "fdaa:0:1:0:1:0:1:2",
                    MachineState::Started,
                    "app",
                ),
                machine(
                    "m2",
                    "api",
                    "iad",
                    "fdaa:0:1:0:1:0:2:2",
                    MachineState::Started,
                    "worker",
                ),
                machine(
                    "m3",
                    "api",
                    "syd",
                    "fdaa:0:1:0:1:0:3:2",
                    MachineState::Stopped,
                    "app",
                ),
                machine(
                    "m4",
                    "other",
                    "ams",
                    "fdaa:0:2:0:1:0:4:2",
                    MachineState::Started,
                    "app",
                ),
            ],
        });
        state.peers.insert(
            1,
            [
                ("laptop".to_string(), "fdaa:0:1:0:9::2".parse().unwrap()),
                (
                    "interactive-x".to_string(),
                    "fdaa:0:1:0:9::3".parse().unwrap(),
                ),
            ]
            .into(),
        );
        state.build("fra")
    }

    fn ips(list: &[&str]) -> Answer {
        Answer::Aaaa(list.iter().map(|s| s.parse().unwrap()).collect())
    }

    #[test]
    fn aaaa_names_answer_started_machines_only() {
        let z = zone();
        let n = Some(1);
        let both = ips(&["fdaa:0:1:0:1:0:1:2", "fdaa:0:1:0:1:0:2:2"]);
        assert_eq!(z.resolve(n, "api.internal", QueryKind::Aaaa), both);
        assert_eq!(z.resolve(n, "API.Internal.", QueryKind::Aaaa), both);
        assert_eq!(z.resolve(n, "global.api.internal", QueryKind::Aaaa), both);
        assert_eq!(
            z.resolve(n, "ams.api.internal", QueryKind::Aaaa),
            ips(&["fdaa:0:1:0:1:0:1:2"])
        );
        assert_eq!(
            z.resolve(n, "syd.api.internal", QueryKind::Aaaa),
            Answer::NoData,
            "its only machine is stopped"
        );
        assert_eq!(
            z.resolve(n, "m2.vm.api.internal", QueryKind::Aaaa),
            ips(&["fdaa:0:1:0:1:0:2:2"])
        );
        assert_eq!(
            z.resolve(n, "m3.vm.api.internal", QueryKind::Aaaa),
            Answer::NoData
        );
        assert_eq!(
            z.resolve(n, "nope.vm.api.internal", QueryKind::Aaaa),
            Answer::NxDomain
        );
        assert_eq!(
            z.resolve(n, "worker.process.api.internal", QueryKind::Aaaa),
            ips(&["fdaa:0:1:0:1:0:2:2"])
        );
        assert_eq!(
            z.resolve(n, "top1.nearest.of.api.internal", QueryKind::Aaaa),
            ips(&["fdaa:0:1:0:1:0:1:2"]),
            "ams is nearer fra than iad"
        );
        assert_eq!(
            z.resolve(n, "top5.nearest.of.api.internal", QueryKind::Aaaa),
            ips(&["fdaa:0:1:0:1:0:1:2", "fdaa:0:1:0:1:0:2:2"])
        );
        assert_eq!(
            z.resolve(n, "top0.nearest.of.api.internal", QueryKind::Aaaa),
            Answer::NxDomain
        );
        assert_eq!(
            z.resolve(n, "web.internal", QueryKind::Aaaa),
            Answer::NoData,
            "an app without machines exists"
        );
        assert_eq!(
            z.resolve(n, "xyz.api.internal", QueryKind::Aaaa),
            Answer::NxDomain
        );
        assert_eq!(z.resolve(n, "api.internal", QueryKind::Txt), Answer::NoData);
        assert_eq!(
            z.resolve(n, "laptop._peer.internal", QueryKind::Aaaa),
            ips(&["fdaa:0:1:0:9::2"])
        );
    }

    #[test]
    fn txt_names_follow_started_and_all() {
        let z = zone();
        let n = Some(1);
        let t = |s: &str| Answer::Txt(s.into());
        assert_eq!(
            z.resolve(n, "vms.api.internal", QueryKind::Txt),
            t("m1 ams,m2 iad")
        );
        assert_eq!(
            z.resolve(n, "all.vms.api.internal", QueryKind::Txt),
            t("m1 ams,m2 iad,m3 syd")
        );
        assert_eq!(
            z.resolve(n, "regions.api.internal", QueryKind::Txt),
            t("ams,iad")
        );
        assert_eq!(
            z.resolve(n, "all.regions.api.internal", QueryKind::Txt),
            t("ams,iad,syd")
        );
        assert_eq!(z.resolve(n, "_apps.internal", QueryKind::Txt), t("api,web"));
        assert_eq!(
            z.resolve(n, "_peer.internal", QueryKind::Txt),
            t("laptop"),
            "interactive peers are left out"
        );
        assert_eq!(
            z.resolve(n, "_instances.internal", QueryKind::Txt),
            t(
                "instance=m1,app=api,ip=fdaa:0:1:0:1:0:1:2,region=ams;instance=m2,app=api,ip=fdaa:0:1:0:1:0:2:2,region=iad"
            )
        );
        let all = z.resolve(n, "all._instances.internal", QueryKind::Txt);
        assert!(
            matches!(&all, Answer::Txt(s) if s.contains("instance=m3,app=api") && !s.contains("m4")),
            "{all:?}"
        );
    }

    #[test]
    fn networks_see_only_their_own_names() {
        let z = zone();
        assert_eq!(
            z.resolve(Some(2), "api.internal", QueryKind::Aaaa),
            Answer::NxDomain
        );
        assert_eq!(
            z.resolve(Some(2), "_apps.internal", QueryKind::Txt),
            Answer::Txt("other".into())
        );
        assert_eq!(
            z.resolve(Some(1), "other.internal", QueryKind::Aaaa),
            Answer::NxDomain
        );
        assert_eq!(
            z.resolve(Some(3), "api.internal", QueryKind::Aaaa),
            Answer::NxDomain
        );
        assert_eq!(
            z.resolve(None, "api.internal", QueryKind::Aaaa),
            Answer::Refused
        );
    }

    #[test]
    fn flycast_answers_in_the_network_the_address_is_in() {
        let z = zone();
        assert_eq!(
            z.resolve(Some(1), "api.flycast", QueryKind::Aaaa),
            ips(&["fdaa:0:1::1:1"])
        );
        assert_eq!(
            z.resolve(Some(2), "api.flycast", QueryKind::Aaaa),
            ips(&["fdaa:0:2::1:1"]),
            "exposed to network 2 with --network"
        );
        assert_eq!(
            z.resolve(Some(1), "web.flycast", QueryKind::Aaaa),
            Answer::NxDomain
        );
    }

    #[test]
    fn other_names_are_forwarded() {
        let z = zone();
        assert_eq!(
            z.resolve(Some(1), "example.com", QueryKind::Aaaa),
            Answer::Forward
        );
        assert_eq!(
            z.resolve(None, "example.com.", QueryKind::Other),
            Answer::Forward
        );
        assert_eq!(
            z.resolve(Some(1), "internal.example.com", QueryKind::Aaaa),
            Answer::Forward
        );
    }

    #[test]
    fn updates_change_answers() {
        let mut state = CatalogState::default();
        state.apply(CatalogUpdate::App {
            seq: 1,
            app: app("api", 1),
        });
        assert_eq!(
            state
                .build("fra")
                .resolve(Some(1), "api.internal", QueryKind::Aaaa),
            Answer::NoData
        );
        state.apply(CatalogUpdate::Machine {
            seq: 2,
            machine: machine(
                "m1",
                "api",
                "ams",
                "fdaa:0:1:0:1:0:1:2",
                MachineState::Started,
                "app",
            ),
        });
        assert_eq!(
            state
                .build("fra")
                .resolve(Some(1), "api.internal", QueryKind::Aaaa),
            ips(&["fdaa:0:1:0:1:0:1:2"])
        );
        state.apply(CatalogUpdate::MachineRemoved {
            seq: 3,
            id: "m1".into(),
        });
        assert_eq!(
            state
                .build("fra")
                .resolve(Some(1), "api.internal", QueryKind::Aaaa),
            Answer::NoData
        );
        state.apply(CatalogUpdate::AppRemoved {
            seq: 4,
            name: "api".into(),
        });
        assert_eq!(
            state
                .build("fra")
                .resolve(Some(1), "api.internal", QueryKind::Aaaa),
            Answer::NxDomain
        );
        assert_eq!(state.seq, 4);
    }
}
