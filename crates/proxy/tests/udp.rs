//! UDP services on dedicated IPs: datagrams relayed per client flow to a machine, replies
//! back from the public address, nothing on ports no UDP service exposes.

mod common;

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use aloft_api::internal::CatalogUpdate;
use aloft_api::{MachinePort, MachineService, MachineState};
use aloft_proxy::AppExtras;
use common::*;
use tokio::net::{TcpStream, UdpSocket};

/// A UDP server on 127.0.0.1 answering every datagram with `echo:` and the datagram.
async fn udp_echo() -> SocketAddr {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_535];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            let mut reply = b"echo:".to_vec();
            reply.extend_from_slice(&buf[..n]);
            let _ = socket.send_to(&reply, from).await;
        }
    });
    addr
}

async fn free_udp_port(ip: &str) -> u16 {
    let socket = UdpSocket::bind(format!("{ip}:0")).await.unwrap();
    socket.local_addr().unwrap().port()
}

/// Sends `payload` until an answer to it comes back (the proxy opens its UDP listener once
/// the catalog names the port). Sending again after a slow answer gets two answers: a
/// late one, to this or an earlier exchange, is not taken for the answer to this one
/// (the echo server's answer ends with the datagram it answers).
async fn exchange(client: &UdpSocket, payload: &[u8]) -> io::Result<Vec<u8>> {
    let mut last = io::Error::new(io::ErrorKind::TimedOut, "no answer");
    let mut buf = vec![0u8; 65_535];
    for _ in 0..100 {
        client.send(payload).await?;
        let wait_until = tokio::time::Instant::now() + Duration::from_millis(100);
        while let Ok(received) = tokio::time::timeout_at(wait_until, client.recv(&mut buf)).await {
            match received {
                Ok(n) if buf[..n].ends_with(payload) => return Ok(buf[..n].to_vec()),
                Ok(_) => {} // a late answer to an earlier exchange
                Err(e) => {
                    last = e;
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    Err(last)
}

#[tokio::test]
async fn udp_services_relay_per_client_flow_on_dedicated_ips() {
    let echo = udp_echo().await;
    let udp_port = free_udp_port("127.0.0.2").await;
    let unexposed = free_udp_port("127.0.0.2").await;
    let service = MachineService {
        protocol: "udp".into(),
        internal_port: echo.port(),
        ports: vec![MachinePort {
            port: Some(udp_port),
            ..MachinePort::default()
        }],
        ..MachineService::default()
    };
    let mut cfg = config();
    cfg.service_listeners = true;
    cfg.machine_wait = Duration::from_secs(5);
    let proxy = start(cfg).await;
    proxy.proxy.catalog().apply(snapshot(
        1,
        vec![app("dns")],
        vec![machine_with(
            "m1",
            "dns",
            "ams",
            echo,
            MachineState::Started,
            vec![service],
        )],
    ));
    proxy.proxy.catalog().set_app_extras(
        "dns",
        AppExtras {
            ips: vec![("127.0.0.2".parse().unwrap(), false)],
            primary_region: None,
        },
    );
    let public: SocketAddr = format!("127.0.0.2:{udp_port}").parse().unwrap();

    // Two clients, each with its own flow: each gets its own answers, from the public address.
    let alice = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    alice.connect(public).await.unwrap();
    assert_eq!(exchange(&alice, b"alice").await.unwrap(), b"echo:alice");
    let bob = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    bob.connect(public).await.unwrap();
    assert_eq!(exchange(&bob, b"bob").await.unwrap(), b"echo:bob");
    assert_eq!(exchange(&alice, b"again").await.unwrap(), b"echo:again");
    // A datagram of the largest size comes back whole.
    let big = vec![b'x'; 60_000];
    let answer = exchange(&bob, &big).await.unwrap();
    assert_eq!(answer.len(), 5 + big.len());

    // Default-deny: no TCP listener on the UDP port, nothing on a port no service exposes.
    assert!(TcpStream::connect(public).await.is_err());
    let stray = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    stray
        .connect(format!("127.0.0.2:{unexposed}"))
        .await
        .unwrap();
    stray.send(b"hello").await.unwrap();
    let mut buf = [0u8; 64];
    let refused = tokio::time::timeout(Duration::from_secs(5), stray.recv(&mut buf))
        .await
        .expect("an ICMP port unreachable on loopback")
        .unwrap_err();
    assert_eq!(
        refused.kind(),
        io::ErrorKind::ConnectionRefused,
        "{refused}"
    );

    // The port goes away with the app's last machine.
    proxy.proxy.catalog().apply(CatalogUpdate::MachineRemoved {
        seq: 2,
        id: "m1".into(),
    });
    let gone = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    gone.connect(public).await.unwrap();
    eventually("the UDP listener closed", || async {
        let _ = gone.send(b"anyone?").await;
        let mut buf = [0u8; 64];
        matches!(
            tokio::time::timeout(Duration::from_millis(100), gone.recv(&mut buf)).await,
            Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused
        )
    })
    .await;
    proxy.shutdown().await;
}
