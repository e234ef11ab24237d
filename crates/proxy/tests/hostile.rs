//! Hostile input: malformed requests, header floods, oversized headers, slowloris, garbage
//! and bad SNI on TLS ports, half-open connections. Each gets a clean error or a close
//! within the configured timeouts, memory stays bounded, and other apps stay served.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use aloft_api::MachineState;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn hostile_config() -> aloft_proxy::ProxyConfig {
    let mut cfg = config();
    cfg.https_listen = Some("127.0.0.1:0".parse().unwrap());
    cfg.header_read_timeout = Duration::from_millis(500);
    cfg.handshake_timeout = Duration::from_millis(500);
    cfg
}

/// Reads until the peer closes (or 30 s pass, which fails the test); returns what came.
async fn read_to_close(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(30), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return out,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => panic!(
                "connection not closed; got {:?}",
                String::from_utf8_lossy(&out)
            ),
        }
    }
}

async fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(bytes).await;
    String::from_utf8_lossy(&read_to_close(&mut s).await).to_string()
}

async fn healthy(addr: SocketAddr) {
    let r = get(addr, "ok.aloft.test", "/", &[]).await;
    assert_eq!(r.status, 200, "other apps stay served");
}

#[tokio::test]
async fn malformed_requests_and_oversized_or_flooded_headers_get_4xx() {
    let be = backend(echo("ok")).await;
    let proxy = start(hostile_config()).await;
    proxy.proxy.catalog().apply(snapshot(
        1,
        vec![app("ok")],
        vec![machine("m1", "ok", "ams", be.addr, MachineState::Started)],
    ));
    let h = proxy.http;

    let out = raw(h, b"THIS IS NOT HTTP\r\n\r\n").await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    assert!(
        out.contains("fly-request-id: "),
        "every response has one: {out}"
    );
    let out = raw(
        h,
        b"GET / HTTP/1.1\r\nHost: ok.aloft.test\r\nBad Header Line\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    let out = raw(h, b"GET / HTTP/1.1\r\nHost: ok.aloft.test\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello").await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");

    // Header flood: more fields than allowed.
    let mut req = b"GET / HTTP/1.1\r\nHost: ok.aloft.test\r\n".to_vec();
    for i in 0..500 {
        req.extend_from_slice(format!("X-Flood-{i}: x\r\n").as_bytes());
    }
    req.extend_from_slice(b"\r\n");
    let out = raw(h, &req).await;
    assert!(
        out.starts_with("HTTP/1.1 431") || out.starts_with("HTTP/1.1 400"),
        "{out}"
    );

    // One oversized header.
    let mut req = b"GET / HTTP/1.1\r\nHost: ok.aloft.test\r\nX-Big: ".to_vec();
    req.extend(std::iter::repeat_n(b'a', 200 * 1024));
    req.extend_from_slice(b"\r\n\r\n");
    let out = raw(h, &req).await;
    assert!(
        out.starts_with("HTTP/1.1 431") || out.is_empty(),
        "{}",
        &out[..out.len().min(200)]
    );

    // A request with no Host at all.
    let out = raw(h, b"GET / HTTP/1.0\r\n\r\n").await;
    assert!(
        out.starts_with("HTTP/1.0 404") || out.starts_with("HTTP/1.1 404"),
        "{out}"
    );
    assert!(out.to_lowercase().contains("fly-request-id"), "{out}");
    healthy(h).await;
    proxy.shutdown().await;
}

#[tokio::test]
async fn slowloris_and_half_open_connections_are_closed_and_others_served() {
    let be = backend(echo("ok")).await;
    let proxy = start(hostile_config()).await;
    proxy.proxy.catalog().apply(snapshot(
        1,
        vec![app("ok")],
        vec![machine("m1", "ok", "ams", be.addr, MachineState::Started)],
    ));
    let h = proxy.http;

    // Slowloris: a header line every 100 ms never finishes the head in time.
    let mut slow = TcpStream::connect(h).await.unwrap();
    let writer = tokio::spawn(async move {
        let _ = slow
            .write_all(b"GET / HTTP/1.1\r\nHost: ok.aloft.test\r\n")
            .await;
        for i in 0..600 {
            if slow
                .write_all(format!("X-{i}: y\r\n").as_bytes())
                .await
                .is_err()
            {
                return (true, slow);
            }
            let mut buf = [0u8; 512];
            match tokio::time::timeout(Duration::from_millis(100), slow.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return (true, slow),
                _ => {}
            }
        }
        (false, slow)
    });
    // Many half-open connections (connected, silent), plain and TLS.
    let mut silent = Vec::new();
    for _ in 0..200 {
        silent.push(TcpStream::connect(h).await.unwrap());
        silent.push(TcpStream::connect(proxy.https.unwrap()).await.unwrap());
    }
    // Other apps stay served meanwhile.
    for _ in 0..5 {
        healthy(h).await;
    }
    let (closed, _slow) = writer.await.unwrap();
    assert!(closed, "slowloris connection was closed");
    for mut s in silent {
        read_to_close(&mut s).await;
    }
    eventually("connections released", || async {
        proxy.proxy.active_connections() <= 1
    })
    .await;
    healthy(h).await;
    proxy.shutdown().await;
}

#[tokio::test]
async fn garbage_and_bad_sni_on_tls_ports_close_cleanly() {
    let be = backend(echo("ok")).await;
    let proxy = start(hostile_config()).await;
    proxy.proxy.catalog().apply(snapshot(
        1,
        vec![app("ok")],
        vec![machine("m1", "ok", "ams", be.addr, MachineState::Started)],
    ));
    let https = proxy.https.unwrap();

    // Not TLS at all.
    raw(https, b"GET / HTTP/1.1\r\nHost: ok.aloft.test\r\n\r\n").await;
    raw(https, &[0x16, 0x03, 0x01, 0xff, 0xff, 1, 2, 3, 4]).await;
    raw(https, &vec![0u8; 70_000]).await;
    // A ClientHello naming a host nobody serves, and one with an invalid name.
    for sni in ["unknown.example", "bad..name", "a"] {
        let out = tokio::process::Command::new("openssl")
            .args([
                "s_client",
                "-connect",
                &https.to_string(),
                "-servername",
                sni,
            ])
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("no peer certificate available"),
            "{sni}: {text}"
        );
    }
    // A handshake that stops halfway.
    let mut s = TcpStream::connect(https).await.unwrap();
    s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc])
        .await
        .unwrap();
    read_to_close(&mut s).await;
    healthy(proxy.http).await;
    let metrics = proxy.proxy.render_metrics();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("aloft_edge_tls_handshake_errors_total") && !l.ends_with(" 0")),
        "{metrics}"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn connection_limit_and_bounded_memory_under_a_flood() {
    let be = backend(echo("ok")).await;
    let mut cfg = hostile_config();
    cfg.max_connections = 300;
    cfg.header_read_timeout = Duration::from_secs(60);
    let proxy = start(cfg).await;
    proxy.proxy.catalog().apply(snapshot(
        1,
        vec![app("ok")],
        vec![machine("m1", "ok", "ams", be.addr, MachineState::Started)],
    ));
    let h = proxy.http;
    let rss = || {
        std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .find(|l| l.starts_with("VmRSS"))
            .and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<u64>().ok())
            })
            .unwrap()
    };
    let before = rss();
    // 1,000 connections that each send half a request head and stall.
    let mut held = Vec::new();
    for _ in 0..1000 {
        let mut s = TcpStream::connect(h).await.unwrap();
        let _ = s
            .write_all(b"GET / HTTP/1.1\r\nHost: ok.aloft.test\r\nX-Partial: ")
            .await;
        held.push(s);
    }
    eventually("limit enforced", || async {
        proxy.proxy.active_connections() <= 300
    })
    .await;
    let grown = rss().saturating_sub(before);
    assert!(grown < 64 * 1024, "memory grew by {grown} KiB");
    // Past the limit new connections are refused until some close.
    drop(held);
    eventually("capacity back", || async move {
        try_status(h, "ok.aloft.test", "/").await == Some(200)
    })
    .await;
    proxy.shutdown().await;
}
