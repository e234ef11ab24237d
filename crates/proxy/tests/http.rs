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

async fn h2_send(
    client: &TestClient,
    proxy: std::net::SocketAddr,
    method: &str,
    path: &str,
    body: &'static str,
) -> Reply {
    let reply = send_via(
        client,
        proxy,
        method,
        "web.aloft.test",
        path,
        &[],
        Bytes::from_static(body.as_bytes()),
    )
    .await;
    assert_eq!(reply.version, http::Version::HTTP_2);
    reply
}

#[tokio::test]
async fn http2_requests_reach_http1_apps_over_pooled_connections() {
    let be = backend(echo("b1")).await;
    let proxy = start(config()).await;
    proxy.proxy.catalog().apply(snapshot(
        1,
        vec![app("web")],
        vec![machine("m1", "web", "ams", be.addr, MachineState::Started)],
    ));
    let client = h2_client();

    let concurrent = futures_util::future::join_all((0..24).map(|i| {
        h2_send(
            &client,
            proxy.http,
            "GET",
            if i % 2 == 0 { "/a?x=1" } else { "/b" },
            "",
        )
    }))
    .await;
    for (i, r) in concurrent.iter().enumerate() {
        assert_eq!(r.status, 200, "{}", r.text());
        let json = r.json();
        assert_eq!(json["version"], "HTTP/1.1");
        assert_eq!(json["path"], if i % 2 == 0 { "/a?x=1" } else { "/b" });
        assert_eq!(echoed(&json, "host"), Some("web.aloft.test"));
        assert_eq!(echoed(&json, "via"), Some("2 aloft"));
        assert!(r.header("fly-request-id").is_some());
    }
    let opened = be.connections.load(std::sync::atomic::Ordering::SeqCst);
    for _ in 0..10 {
        assert_eq!(
            h2_send(&client, proxy.http, "GET", "/seq", "").await.status,
            200
        );
    }
    assert_eq!(
        be.connections.load(std::sync::atomic::Ordering::SeqCst),
        opened,
        "sequential requests reuse the pooled app connections"
    );

    let posted = h2_send(&client, proxy.http, "POST", "/p", "hello, app").await;
    assert_eq!(posted.json()["body"], "hello, app");
    assert_eq!(echoed(&posted.json(), "content-length"), Some("10"));
    let empty = h2_send(&client, proxy.http, "POST", "/p", "").await;
    assert_eq!(echoed(&empty.json(), "content-length"), Some("0"));
    let head = h2_send(&client, proxy.http, "HEAD", "/h", "").await;
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    // After a HEAD (a response head with a length and no body) the pool still works.
    let after = h2_send(&client, proxy.http, "GET", "/after-head", "").await;
    assert_eq!(after.json()["path"], "/after-head");
    proxy.shutdown().await;
}

/// An app speaking HTTP/1.1 by hand: each path picks a way of framing the response.
async fn hand_written_app() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = connections.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let head_end = loop {
                        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break at + 4;
                        }
                        let mut chunk = [0u8; 4096];
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
                    buf.drain(..head_end);
                    let path = head.split(' ').nth(1).unwrap_or("/").to_string();
                    let (answer, close): (&[u8], bool) = match path.as_str() {
                        "/chunked" => (
                            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
                            false,
                        ),
                        "/close" => (b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nuntil the end", true),
                        "/then-close" => (b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nbye!", true),
                        "/interim" => (
                            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
                            false,
                        ),
                        "/garbage" => (b"NOT HTTP AT ALL\r\n\r\n", true),
                        "/trailers" => (
                            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-checksum\r\n\r\n4\r\ndata\r\n0\r\nx-checksum: abc123\r\nx-count: 1\r\n\r\n",
                            false,
                        ),
                        _ => (b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n", false),
                    };
                    if stream.write_all(answer).await.is_err() || close {
                        return;
                    }
                }
            });
        }
    });
    (addr, connections)
}

#[tokio::test]
async fn http2_requests_to_http1_apps_follow_every_response_framing() {
    let (addr, connections) = hand_written_app().await;
    let proxy = start(config()).await;
    proxy.proxy.catalog().apply(snapshot(
        1,
        vec![app("web")],
        vec![machine("m1", "web", "ams", addr, MachineState::Started)],
    ));
    let client = h2_client();
    for round in 0..3 {
        let chunked = h2_send(&client, proxy.http, "GET", "/chunked", "").await;
        assert_eq!(
            (chunked.status, chunked.text().as_str()),
            (200, "hello world"),
            "round {round}"
        );
        let interim = h2_send(&client, proxy.http, "GET", "/interim", "").await;
        assert_eq!((interim.status, interim.text().as_str()), (200, "ok"));
        let until_close = h2_send(&client, proxy.http, "GET", "/close", "").await;
        assert_eq!(until_close.text(), "until the end");
        // The app closes a connection it announced as reusable: the next request finds
        // the pooled connection dead and goes over a fresh one.
        let then_close = h2_send(&client, proxy.http, "GET", "/then-close", "").await;
        assert_eq!(then_close.text(), "bye!");
        let missing = h2_send(&client, proxy.http, "GET", "/nothing", "").await;
        assert_eq!(missing.status, 404);
        let garbage = h2_send(&client, proxy.http, "GET", "/garbage", "").await;
        assert_eq!(garbage.status, 502, "{}", garbage.text());
    }
    // Trailers of a chunked response reach the HTTP/2 client as a trailers frame.
    let req = http::Request::builder()
        .uri(format!("http://{}/trailers", proxy.http))
        .header("host", "web.aloft.test")
        .header("te", "trailers")
        .body(http_body_util::Full::new(Bytes::new()))
        .unwrap();
    let resp = client.request(req).await.expect("h2 request");
    let collected = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap();
    let trailers = collected.trailers().cloned().expect("trailers arrive");
    assert_eq!(trailers.get("x-checksum").unwrap(), "abc123");
    assert_eq!(trailers.get("x-count").unwrap(), "1");
    assert_eq!(collected.to_bytes(), "data");
    // The connection is reused after the trailers were read.
    let chunked = h2_send(&client, proxy.http, "GET", "/chunked", "").await;
    assert_eq!(chunked.text(), "hello world");
    // Each round opens a connection for the first request and after each close.
    let opened = connections.load(std::sync::atomic::Ordering::SeqCst);
    assert!(opened <= 3 * 4, "app connections opened: {opened}");
    proxy.shutdown().await;
}
