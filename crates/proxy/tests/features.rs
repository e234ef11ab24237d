//! fly-replay (§14), compression (§9.6), response header options, h2c backends,
//! WebSocket upgrades, metrics, graceful drain.

mod common;

use std::io::Read;
use std::time::Duration;

use aloft_api::internal::CatalogUpdate;
use aloft_api::{HttpOptions, HttpResponseOptions, MachineState};
use bytes::Bytes;
use common::*;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// m1 (ams) replays according to the `x-replay` request header, unless the request was
/// already replayed or is a fallback; then it echoes.
fn replayer(name: &'static str) -> Handler {
    handler(move |req: Request<Incoming>| async move {
        let replayed = req.headers().contains_key("fly-replay-src")
            || req.headers().contains_key("fly-replay-failed");
        let ask = req
            .headers()
            .get("x-replay")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let json = req
            .headers()
            .get("x-replay-json")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        if !replayed && (ask.is_some() || json.is_some()) {
            // Read the request body first, as apps do.
            let _ = http_body_util::BodyExt::collect(req.into_body()).await;
            if let Some(ask) = ask {
                return Response::builder()
                    .header("fly-replay", ask)
                    .body(Full::new(Bytes::from("replaying")))
                    .unwrap();
            }
            if let Some(json) = json {
                return Response::builder()
                    .header("content-type", "application/vnd.fly.replay+json")
                    .body(Full::new(Bytes::from(json)))
                    .unwrap();
            }
            unreachable!("one of them is set");
        }
        echo(name)(req).await
    })
}

#[tokio::test]
async fn fly_replay_header_and_json_forms() {
    let b1 = backend(replayer("m1")).await;
    let b2 = backend(echo("m2")).await;
    let b3 = backend(echo("other-app")).await;
    let b4 = backend(echo("elsewhere")).await;
    let mut cfg = config();
    cfg.machine_wait = Duration::from_secs(2);
    let proxy = start(cfg).await;
    let mut other_org = app("foreign");
    other_org.org = "someone-else".into();
    proxy.proxy.catalog().apply(snapshot(
        1,
        vec![app("web"), app("worker"), other_org],
        vec![
            machine("m1", "web", "ams", b1.addr, MachineState::Started),
            machine("m2", "web", "fra", b2.addr, MachineState::Started),
            machine("w1", "worker", "ams", b3.addr, MachineState::Started),
            machine("f1", "foreign", "ams", b3.addr, MachineState::Started),
        ],
    ));
    let h = proxy.http;

    // Header form: region, with state echoed in fly-replay-src.
    let r = send(
        h,
        "POST",
        "web.aloft.test",
        "/w",
        &[("x-replay", "region=fra;state=abc")],
        Bytes::from("payload"),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let json = r.json();
    assert_eq!(json["backend"], "m2");
    assert_eq!(json["body"], "payload", "the body is replayed too");
    let src = echoed(&json, "fly-replay-src").unwrap();
    assert!(src.starts_with("instance=m1;region=ams;t="), "{src}");
    assert!(src.ends_with(";state=abc"), "{src}");

    // instance=, and a region list with an alias.
    let r = get(h, "web.aloft.test", "/", &[("x-replay", "instance=m2")]).await;
    assert_eq!(r.json()["backend"], "m2");
    let r = get(
        h,
        "web.aloft.test",
        "/",
        &[("x-replay", r#"region="nrt,eu";elsewhere=true"#)],
    )
    .await;
    assert_eq!(r.json()["backend"], "m2");

    // app= (same org and network).
    let r = get(h, "web.aloft.test", "/", &[("x-replay", "app=worker")]).await;
    assert_eq!(r.json()["backend"], "other-app");
    let r = get(h, "web.aloft.test", "/", &[("x-replay", "app=foreign")]).await;
    assert_eq!(r.status, 502);

    // prefer_instance that does not exist: any machine, with the unavailable header.
    let r = get(
        h,
        "web.aloft.test",
        "/",
        &[("x-replay", "prefer_instance=nope;elsewhere=true")],
    )
    .await;
    let json = r.json();
    assert_eq!(json["backend"], "m2");
    assert_eq!(
        echoed(&json, "fly-preferred-instance-unavailable"),
        Some("nope")
    );

    // Fallback: no machine in the target region; force_self sends it back to m1 with
    // fly-replay-failed.
    let r = get(
        h,
        "web.aloft.test",
        "/",
        &[("x-replay", "region=syd;timeout=300ms;fallback=force_self")],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let json = r.json();
    assert_eq!(json["backend"], "m1");
    let failed = echoed(&json, "fly-replay-failed").unwrap();
    assert!(
        failed.starts_with("region=syd;replay_source=m1;reason="),
        "{failed}"
    );
    assert!(failed.contains("elapsed_ms="), "{failed}");
    // Without a fallback: an error after the timeout.
    let r = get(
        h,
        "web.aloft.test",
        "/",
        &[("x-replay", "region=syd;timeout=200ms")],
    )
    .await;
    assert_eq!(r.status, 503);

    // JSON form with a transform.
    let body = r#"{"region":"fra","transform":{"path":"/rewritten?x=1","delete_headers":["x-secret"],"set_headers":[{"name":"x-added","value":"yes"}]}}"#;
    let r = get(
        h,
        "web.aloft.test",
        "/orig",
        &[("x-replay-json", body), ("x-secret", "s")],
    )
    .await;
    let json = r.json();
    assert_eq!(json["backend"], "m2");
    assert_eq!(json["path"], "/rewritten?x=1");
    assert_eq!(echoed(&json, "x-secret"), None);
    assert_eq!(echoed(&json, "x-added"), Some("yes"));

    // Bodies over 1 MB are not replayed: a clear 413.
    let big = Bytes::from(vec![b'a'; 1024 * 1024 + 1]);
    let r = send(
        h,
        "POST",
        "web.aloft.test",
        "/",
        &[("x-replay", "region=fra")],
        big,
    )
    .await;
    assert_eq!(r.status, 413);
    assert!(r.text().contains("1 MB"), "{}", r.text());
    // ...while they are proxied normally when no replay is asked.
    let big = Bytes::from(vec![b'a'; 1024 * 1024 + 1]);
    let r = send(h, "POST", "web.aloft.test", "/", &[], big).await;
    assert_eq!(r.status, 200);
    drop(b4);
    proxy.shutdown().await;
}

fn text_backend() -> Handler {
    handler(|req: Request<Incoming>| async move {
        let path = req.uri().path().to_string();
        let text = "compressible text ".repeat(200);
        let mut b = Response::builder()
            .header("content-type", "text/html; charset=utf-8")
            .header("x-app", "1")
            .header("server", "app");
        if path == "/encoded" {
            b = b.header("content-encoding", "identity");
        }
        b.body(Full::new(Bytes::from(text))).unwrap()
    })
}

#[tokio::test]
async fn compression_and_response_header_options() {
    let be = backend(text_backend()).await;
    let proxy = start(config()).await;
    let mut svc = http_service(be.addr.port());
    let mut headers = std::collections::BTreeMap::new();
    headers.insert("x-app".to_string(), serde_json::Value::Bool(false));
    headers.insert("x-frame-options".to_string(), serde_json::json!("DENY"));
    headers.insert("x-multi".to_string(), serde_json::json!(["a", "b"]));
    svc.ports[0].http_options = Some(HttpOptions {
        response: Some(HttpResponseOptions {
            pristine: None,
            headers,
        }),
        ..HttpOptions::default()
    });
    proxy.proxy.catalog().apply(snapshot(
        1,
        vec![app("web")],
        vec![machine_with(
            "m1",
            "web",
            "ams",
            be.addr,
            MachineState::Started,
            vec![svc.clone()],
        )],
    ));
    let h = proxy.http;
    let original = "compressible text ".repeat(200);
    for (accept, expected) in [
        ("gzip, deflate, br, zstd", "zstd"),
        ("gzip, br", "br"),
        ("deflate, gzip", "gzip"),
        ("deflate", "deflate"),
    ] {
        let r = get(h, "web.aloft.test", "/", &[("accept-encoding", accept)]).await;
        assert_eq!(r.header("content-encoding"), Some(expected), "{accept}");
        assert!(r.body.len() < original.len() / 4);
        let plain = match expected {
            "zstd" => zstd::stream::decode_all(&r.body[..]).unwrap(),
            "br" => {
                let mut v = Vec::new();
                brotli::BrotliDecompress(&mut &r.body[..], &mut v).unwrap();
                v
            }
            "gzip" => {
                let mut v = Vec::new();
                flate2::read::GzDecoder::new(&r.body[..])
                    .read_to_end(&mut v)
                    .unwrap();
                v
            }
            _ => {
                let mut v = Vec::new();
                flate2::read::ZlibDecoder::new(&r.body[..])
                    .read_to_end(&mut v)
                    .unwrap();
                v
            }
        };
        assert_eq!(plain, original.as_bytes());
        assert!(r.header("vary").unwrap_or("").contains("Accept-Encoding"));
    }
    let r = get(h, "web.aloft.test", "/", &[]).await;
    assert_eq!(r.header("content-encoding"), None);
    assert_eq!(r.text(), original);
    // The app's own Content-Encoding passes untouched.
    let r = get(
        h,
        "web.aloft.test",
        "/encoded",
        &[("accept-encoding", "gzip")],
    )
    .await;
    assert_eq!(r.header("content-encoding"), Some("identity"));
    // Response header options: removed, set, multi-valued.
    assert_eq!(r.header("x-app"), None);
    assert_eq!(r.header("x-frame-options"), Some("DENY"));
    let multi: Vec<_> = r
        .headers
        .get_all("x-multi")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect();
    assert_eq!(multi, vec!["a", "b"]);
    assert!(r.header("fly-request-id").is_some());
    assert!(
        r.header("server").unwrap().starts_with("aloft/"),
        "Server is the proxy's"
    );

    // pristine: no Via / Fly-Request-Id added.
    svc.ports[0].http_options = Some(HttpOptions {
        response: Some(HttpResponseOptions {
            pristine: Some(true),
            ..Default::default()
        }),
        ..HttpOptions::default()
    });
    proxy.proxy.catalog().apply(CatalogUpdate::Machine {
        seq: 2,
        machine: machine_with(
            "m1",
            "web",
            "ams",
            be.addr,
            MachineState::Started,
            vec![svc],
        ),
    });
    let r = get(h, "web.aloft.test", "/", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("via"), None);
    assert_eq!(r.header("fly-request-id"), None);
    assert_eq!(
        r.header("server"),
        Some("app"),
        "pristine keeps the app's Server"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn h2c_backend_and_websocket_upgrade() {
    let be = backend(echo("h2")).await;
    let ws = backend(handler(|mut req: Request<Incoming>| async move {
        // A WebSocket-style upgrade: 101, then echo raw bytes.
        let on_upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(upgraded) = on_upgrade.await {
                let mut io = hyper_util::rt::TokioIo::new(upgraded);
                let mut buf = [0u8; 64];
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        });
        Response::builder()
            .status(101)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .body(Full::new(Bytes::new()))
            .unwrap()
    }))
    .await;
    let proxy = start(config()).await;
    let mut h2svc = http_service(be.addr.port());
    h2svc.ports[0].http_options = Some(HttpOptions {
        h2_backend: Some(true),
        ..HttpOptions::default()
    });
    proxy.proxy.catalog().apply(snapshot(
        1,
        vec![app("grpc"), app("ws")],
        vec![
            machine_with(
                "g1",
                "grpc",
                "ams",
                be.addr,
                MachineState::Started,
                vec![h2svc],
            ),
            machine("w1", "ws", "ams", ws.addr, MachineState::Started),
        ],
    ));
    let r = get(proxy.http, "grpc.aloft.test", "/svc.Method", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["version"], "HTTP/2.0", "the app gets h2c");

    let mut s = TcpStream::connect(proxy.http).await.unwrap();
    s.write_all(b"GET /chat HTTP/1.1\r\nHost: ws.aloft.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut byte).await.unwrap(), 1);
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    assert!(head.contains("fly-request-id:"), "{head}");
    s.write_all(b"frame-bytes").await.unwrap();
    let mut buf = [0u8; 11];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"frame-bytes");
    drop(s);
    proxy.shutdown().await;
}

#[tokio::test]
async fn metrics_endpoint_counts_requests_per_app() {
    let be = backend(echo("b1")).await;
    let mut cfg = config();
    cfg.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let proxy = start(cfg).await;
    proxy.proxy.catalog().apply(snapshot(
        1,
        vec![app("web")],
        vec![machine("m1", "web", "ams", be.addr, MachineState::Started)],
    ));
    for _ in 0..3 {
        assert_eq!(
            get(proxy.http, "web.aloft.test", "/", &[]).await.status,
            200
        );
    }
    assert_eq!(
        get(proxy.http, "nope.aloft.test", "/", &[]).await.status,
        404
    );
    let m = get(proxy.metrics.unwrap(), "metrics", "/metrics", &[]).await;
    assert_eq!(m.status, 200);
    let text = m.text();
    let has = |needle: &str| text.lines().any(|l| l.contains(needle));
    assert!(
        has(r#"aloft_app_http_responses_total{region="ams",app="web",status="200"} 3"#),
        "{text}"
    );
    assert!(
        has(r#"aloft_app_http_response_time_seconds_count{region="ams",app="web",status="2xx"} 3"#),
        "{text}"
    );
    assert!(
        has(r#"aloft_edge_http_responses_total{region="ams",app="",status="404"} 1"#),
        "{text}"
    );
    assert!(
        has(
            r#"aloft_app_concurrency{region="ams",app="web",instance="m1",machine_region="ams"} 0"#
        ),
        "{text}"
    );
    assert!(has("aloft_edge_tcp_connects_total"), "{text}");
    assert!(has("aloft_catalog_seq"), "{text}");
    proxy.shutdown().await;
}

#[tokio::test]
async fn shutdown_drains_in_flight_requests() {
    let (open, gate) = tokio::sync::watch::channel(false);
    let be = backend(handler(move |_req: Request<Incoming>| {
        let mut gate = gate.clone();
        async move {
            let _ = gate.wait_for(|o| *o).await;
            Response::new(Full::new(Bytes::from("done")))
        }
    }))
    .await;
    let mut proxy = start(config()).await;
    proxy.proxy.catalog().apply(snapshot(
        1,
        vec![app("web")],
        vec![machine("m1", "web", "ams", be.addr, MachineState::Started)],
    ));
    let addr = proxy.http;
    let inflight = tokio::spawn(async move { get(addr, "web.aloft.test", "/", &[]).await });
    eventually("request reached the app", || async {
        be.requests.load(std::sync::atomic::Ordering::SeqCst) == 1
    })
    .await;
    let serve = proxy.begin_shutdown();
    // New connections are refused once the listener is closed...
    eventually("listener closed", || async move {
        TcpStream::connect(addr).await.is_err()
    })
    .await;
    // ...while the in-flight request completes.
    open.send(true).unwrap();
    let r = inflight.await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "done");
    serve.await.unwrap().unwrap();
}
