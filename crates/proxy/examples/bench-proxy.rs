//! The proxy with a fixed catalog, for bench/proxy/run.sh: one app (`bench`) whose one
//! machine is the benchmark backend.
//!
//! Usage: bench-proxy HTTP_LISTEN BACKEND_ADDR [TLS_IP TLS_PORT]
//! - HTTP_LISTEN: the plain listener (e.g. 127.0.0.1:18090); Host `127.0.0.1` routes to the app.
//! - BACKEND_ADDR: the backend (e.g. 127.0.0.1:18081).
//! - TLS_IP/TLS_PORT: a dedicated IP of the app where TLS+HTTP is served on TLS_PORT.

use std::net::SocketAddr;
use std::time::Duration;

use aloft_api::internal::{CatalogApp, CatalogMachine, CatalogUpdate};
use aloft_api::{MachinePort, MachineService, MachineState, ServiceConcurrency};
use aloft_proxy::{AppExtras, Proxy, ProxyConfig};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        anyhow::bail!("usage: bench-proxy HTTP_LISTEN BACKEND_ADDR [TLS_IP TLS_PORT]");
    }
    let listen: SocketAddr = args[1].parse()?;
    let backend: SocketAddr = args[2].parse()?;
    let tls: Option<(std::net::IpAddr, u16)> = match (args.get(3), args.get(4)) {
        (Some(ip), Some(port)) => Some((ip.parse()?, port.parse()?)),
        _ => None,
    };
    let workers: usize = std::env::var("BENCH_WORKERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    // One worker: a current-thread runtime, the event-loop shape of one nginx worker.
    let runtime = if workers <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()?
    };
    runtime.block_on(async move {
        let config = ProxyConfig {
            http_listen: listen,
            region: "bench".into(),
            base_domain: "bench.test".into(),
            control_url: "http://127.0.0.1:9".into(),
            header_read_timeout: Duration::from_secs(120),
            ..ProxyConfig::default()
        };
        let proxy = Proxy::new(config);
        let mut ports = vec![MachinePort {
            port: Some(80),
            handlers: vec!["http".into()],
            ..MachinePort::default()
        }];
        if let Some((_, port)) = tls {
            ports.push(MachinePort {
                port: Some(port),
                handlers: vec!["tls".into(), "http".into()],
                ..MachinePort::default()
            });
        }
        let service = MachineService {
            protocol: "tcp".into(),
            internal_port: backend.port(),
            ports,
            concurrency: Some(ServiceConcurrency {
                kind: "requests".into(),
                soft_limit: 100_000,
                hard_limit: 200_000,
            }),
            ..MachineService::default()
        };
        let app = CatalogApp {
            name: "bench".into(),
            org: "bench".into(),
            network: "default".into(),
            hostnames: vec!["127.0.0.1".into(), "bench.test".into()],
            ..CatalogApp::default()
        };
        let machine = CatalogMachine {
            id: "m1".into(),
            app: "bench".into(),
            state: MachineState::Started,
            region: "bench".into(),
            host: "local".into(),
            instance_id: "i1".into(),
            process_group: Some("app".into()),
            private_ipv4: Some(backend.ip().to_string()),
            private_ip: None,
            services: vec![service],
            checks: Vec::new(),
            statics: Vec::new(),
        };
        proxy.catalog().apply(CatalogUpdate::Snapshot {
            seq: 1,
            apps: vec![app],
            machines: vec![machine],
        });
        if let Some((ip, _)) = tls {
            proxy.catalog().set_app_extras(
                "bench",
                AppExtras {
                    ips: vec![(ip, false)],
                    primary_region: None,
                },
            );
        }
        proxy.serve(aloft_proxy::shutdown_signal()).await
    })
}
