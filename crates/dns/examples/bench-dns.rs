//! The resolver for benchmarks (bench/dns/run.sh): a synthetic catalog of APPS apps with
//! MACHINES started machines each in network 1, served on LISTEN as network 1.
//!
//! `bench-dns serve LISTEN APPS MACHINES QUERIES HOSTS` writes a dnsperf query file and an
//! equivalent hosts file (for the peer), then serves until killed.
//! `bench-dns update LISTEN` measures how long a machine that starts in the catalog takes
//! to be answered over UDP, 50 times, and prints the median and worst.

use std::io::Write;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use aloft_api::MachineState;
use aloft_api::internal::{CatalogApp, CatalogMachine, CatalogUpdate};
use aloft_api::sixpn;
use aloft_dns::{DnsConfig, DnsServer};

fn app(name: &str) -> CatalogApp {
    CatalogApp {
        name: name.into(),
        org: "bench".into(),
        network: "default".into(),
        network_id: 1,
        ..Default::default()
    }
}

fn machine(id: &str, app: &str, number: u32, state: MachineState) -> CatalogMachine {
    CatalogMachine {
        id: id.into(),
        app: app.into(),
        state,
        region: "ams".into(),
        host: "h1".into(),
        instance_id: "i1".into(),
        process_group: Some("app".into()),
        private_ipv4: None,
        private_ip: Some(sixpn::machine_address(1, 1, number).to_string()),
        services: vec![],
        checks: vec![],
        statics: Vec::new(),
    }
}

/// A minimal AAAA query for `name` with id `id`.
fn aaaa_query(id: u16, name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.extend_from_slice(&[0, 0, 28, 0, 1]);
    out
}

/// Number of answer records in a response to query `id`.
fn answers(response: &[u8], id: u16) -> Option<u16> {
    if response.len() < 12 || u16::from_be_bytes([response[0], response[1]]) != id {
        return None;
    }
    Some(u16::from_be_bytes([response[6], response[7]]))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).map(String::as_str).unwrap_or("");
    let listen: SocketAddr = args
        .get(2)
        .map(String::as_str)
        .unwrap_or("127.0.0.1:5390")
        .parse()?;
    let dns = DnsServer::new(DnsConfig {
        region: "ams".into(),
        ..DnsConfig::default()
    });
    dns.listen(listen, Some(1))?;
    match mode {
        "serve" => {
            let apps: u32 = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(100);
            let per_app: u32 = args.get(4).and_then(|a| a.parse().ok()).unwrap_or(4);
            let mut catalog_apps = Vec::new();
            let mut machines = Vec::new();
            let mut queries =
                std::fs::File::create(args.get(5).map(String::as_str).unwrap_or("queries.txt"))?;
            let mut hosts =
                std::fs::File::create(args.get(6).map(String::as_str).unwrap_or("hosts.txt"))?;
            let mut number = 0;
            for a in 0..apps {
                let name = format!("app{a}");
                catalog_apps.push(app(&name));
                writeln!(queries, "{name}.internal AAAA")?;
                for m in 0..per_app {
                    number += 1;
                    let id = format!("{a:07x}{m:07x}");
                    machines.push(machine(&id, &name, number, MachineState::Started));
                    writeln!(
                        hosts,
                        "{} {name}.internal",
                        sixpn::machine_address(1, 1, number)
                    )?;
                    if m == 0 {
                        writeln!(queries, "{id}.vm.{name}.internal AAAA")?;
                    }
                }
            }
            dns.apply(CatalogUpdate::Snapshot {
                seq: 1,
                apps: catalog_apps,
                machines,
            });
            println!("ready");
            std::future::pending::<()>().await;
        }
        "update" => {
            dns.apply(CatalogUpdate::Snapshot {
                seq: 1,
                apps: vec![app("fresh")],
                machines: vec![],
            });
            let socket = UdpSocket::bind("127.0.0.1:0")?;
            socket.connect(listen)?;
            socket.set_read_timeout(Some(Duration::from_millis(200)))?;
            let mut samples = Vec::new();
            let mut buffer = [0u8; 1500];
            for round in 0..50u32 {
                let id = format!("{round:014x}");
                let started = Instant::now();
                dns.apply(CatalogUpdate::Machine {
                    seq: 2 + u64::from(round),
                    machine: machine(&id, "fresh", 1000 + round, MachineState::Started),
                });
                let name = format!("{id}.vm.fresh.internal");
                loop {
                    let query_id = (round as u16).wrapping_mul(31).wrapping_add(7);
                    socket.send(&aaaa_query(query_id, &name))?;
                    if let Ok(n) = socket.recv(&mut buffer)
                        && answers(&buffer[..n], query_id).unwrap_or(0) > 0
                    {
                        break;
                    }
                    anyhow::ensure!(
                        started.elapsed() < Duration::from_secs(5),
                        "{name} never resolved"
                    );
                }
                samples.push(started.elapsed());
            }
            samples.sort();
            println!(
                "catalog update to answer over UDP: median {:.3} ms, worst {:.3} ms (50 machines)",
                samples[samples.len() / 2].as_secs_f64() * 1000.0,
                samples[samples.len() - 1].as_secs_f64() * 1000.0
            );
        }
        _ => anyhow::bail!("usage: bench-dns serve|update LISTEN [APPS MACHINES QUERIES HOSTS]"),
    }
    Ok(())
}
