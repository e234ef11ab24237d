//! Phase 1: routing by Host, platform headers, pooling, errors.

mod common;

use std::time::Duration;

use aloft_api::MachineState;
use bytes::Bytes;
use common::*;

#[tokio::test]
async fn routes_by_app_host_and_adds_platform_headers() {
    let be = backend(echo("b1")).await;
    let proxy = start(config()).await;
    proxy.proxy.catalog().apply(snapshot(
        1,
        vec![app("web")],
        vec![machine("m1", "web", "ams", be.addr, MachineState::Started)],
    ));

    let r = get(
        proxy.http,
        "web.aloft.test:8080",
        "/hello?x=1",
        &[
            ("x-forwarded-for", "203.0.113.9"),
            ("connection", "x-private"),
            ("x-private", "secret"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let json = r.json();
    assert_eq!(json["path"], "/hello?x=1");
    assert_eq!(json["version"], "HTTP/1.1");
    assert_eq!(echoed(&json, "host"), Some("web.aloft.test:8080"));
    assert_eq!(echoed(&json, "fly-client-ip"), Some("127.0.0.1"));
    assert_eq!(
        echoed(&json, "fly-forwarded-port"),
        Some(proxy.http.port().to_string().as_str())
    );
    assert_eq!(echoed(&json, "fly-region"), Some("ams"));
    assert_eq!(
        echoed(&json, "x-forwarded-for"),
        Some("203.0.113.9, 127.0.0.1")
    );
    assert_eq!(echoed(&json, "x-forwarded-proto"), Some("http"));
    assert_eq!(echoed(&json, "x-forwarded-ssl"), Some("off"));
    assert_eq!(
        echoed(&json, "x-forwarded-port"),
        Some(proxy.http.port().to_string().as_str())
    );
    assert_eq!(echoed(&json, "via"), Some("1.1 aloft"));
    for hop in ["x-private", "keep-alive", "proxy-connection"] {
        assert_eq!(echoed(&json, hop), None, "{hop} forwarded");
    }
    assert_eq!(r.header("via"), Some("1.1 aloft"));
    let id = r.header("fly-request-id").unwrap();
    assert!(id.ends_with("-ams"), "{id}");
    assert_eq!(r.header("x-backend"), Some("b1"));

    // Custom hostnames of the app route too.
    let mut web = app("web");
    web.hostnames = vec!["www.example.com".into()];
    proxy
        .proxy
        .catalog()
        .apply(aloft_api::internal::CatalogUpdate::App { seq: 2, app: web });
    let r = get(proxy.http, "WWW.Example.com", "/", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["backend"], "b1");
    proxy.shutdown().await;
}

#[tokio::test]
async fn unknown_host_is_404_with_request_id() {
    let proxy = start(config()).await;
    let r = get(proxy.http, "nope.aloft.test", "/", &[]).await;
    assert_eq!(r.status, 404);
    assert!(r.header("content-type").unwrap().starts_with("text/plain"));
    assert!(r.text().len() < 200);
    assert!(r.header("fly-request-id").unwrap().ends_with("-ams"));
    assert_eq!(r.header("via"), Some("1.1 aloft"));
    proxy.shutdown().await;
}

#[tokio::test]
async fn no_started_machine_is_503_after_a_bounded_wait() {
    let be = backend(echo("b1")).await;
    let proxy = start(config()).await;
    proxy.proxy.catalog().apply(snapshot(
        1,
        vec![app("web")],
        vec![machine("m1", "web", "ams", be.addr, MachineState::Stopped)],
    ));
    let r = get(proxy.http, "web.aloft.test", "/", &[]).await;
    assert_eq!(r.status, 503);
    assert!(r.header("fly-request-id").is_some());
    // An app with no machines at all, too.
    proxy
        .proxy
        .catalog()
        .apply(snapshot(2, vec![app("empty")], vec![]));
    let r = get(proxy.http, "empty.aloft.test", "/", &[]).await;
    assert_eq!(r.status, 503);
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_machine_started_while_waiting_gets_the_request() {
    let be = backend(echo("b1")).await;
    let mut cfg = config();
    cfg.machine_wait = Duration::from_secs(20);
    let proxy = start(cfg).await;
    let catalog_proxy = proxy.proxy.clone();
    proxy.proxy.catalog().apply(snapshot(
        1,
        vec![app("web")],
        vec![machine("m1", "web", "ams", be.addr, MachineState::Stopped)],
    ));
    let request = tokio::spawn({
        let addr = proxy.http;
        async move { get(addr, "web.aloft.test", "/", &[]).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    catalog_proxy
        .catalog()
        .apply(aloft_api::internal::CatalogUpdate::Machine {
            seq: 2,
            machine: machine("m1", "web", "ams", be.addr, MachineState::Started),
        });
    let r = request.await.unwrap();
    assert_eq!(r.status, 200);
    proxy.shutdown().await;
}

#[tokio::test]
async fn backend_connect_error_is_502() {
    let dead = dead_addr().await;
    let proxy = start(config()).await;
    proxy.proxy.catalog().apply(snapshot(
        1,
        vec![app("web")],
        vec![machine("m1", "web", "ams", dead, MachineState::Started)],
    ));
    let r = get(proxy.http, "web.aloft.test", "/", &[]).await;
    assert_eq!(r.status, 502);
    assert!(r.header("fly-request-id").is_some());
    assert!(r.text().len() < 200);
    proxy.shutdown().await;
}

#[tokio::test]
async fn backend_connections_are_pooled() {
    let be = backend(echo("b1")).await;
    let proxy = start(config()).await;
    proxy.proxy.catalog().apply(snapshot(
        1,
        vec![app("web")],
        vec![machine("m1", "web", "ams", be.addr, MachineState::Started)],
    ));
    for i in 0..20 {
        let r = send(
            proxy.http,
            "POST",
            "web.aloft.test",
            "/p",
            &[],
            Bytes::from(format!("body-{i}")),
        )
        .await;
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["body"], format!("body-{i}"));
    }
    assert_eq!(be.requests.load(std::sync::atomic::Ordering::SeqCst), 20);
    assert_eq!(
        be.connections.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "sequential requests reuse one backend connection"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn curl_sees_the_same() {
    let be = backend(echo("b1")).await;
    let proxy = start(config()).await;
    proxy.proxy.catalog().apply(snapshot(
        1,
        vec![app("web")],
        vec![machine("m1", "web", "ams", be.addr, MachineState::Started)],
    ));
    let out = tokio::process::Command::new("curl")
        .args([
            "-sS",
            "-i",
            "--http1.1",
            "-H",
            "Host: web.aloft.test",
            &format!("http://{}/curl", proxy.http),
        ])
        .output()
        .await
        .expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).to_lowercase();
    assert!(text.starts_with("http/1.1 200"), "{text}");
    assert!(text.contains("fly-request-id: "), "{text}");
    assert!(text.contains("via: 1.1 aloft"), "{text}");
    // HTTP/2 with prior knowledge from the client.
    let out = tokio::process::Command::new("curl")
        .args([
            "-sS",
            "-i",
            "--http2-prior-knowledge",
            "-H",
            "Host: web.aloft.test",
            &format!("http://{}/h2", proxy.http),
        ])
        .output()
        .await
        .expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).to_lowercase();
    assert!(text.starts_with("http/2 200"), "{text}");
    assert!(text.contains("via: 2 aloft"), "{text}");
    assert!(
        text.contains("\"version\":\"http/1.1\""),
        "backend still gets HTTP/1.1: {text}"
    );
    proxy.shutdown().await;
}
