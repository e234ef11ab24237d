//! Following the control plane's catalog stream (server-sent events), resuming with
//! Last-Event-ID after a reconnect.

mod common;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use aloft_api::MachineState;
use aloft_api::internal::CatalogUpdate;
use bytes::Bytes;
use common::*;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

fn sse(id: u64, update: &CatalogUpdate) -> Bytes {
    Bytes::from(format!(
        ": keepalive\n\nid: {id}\ndata: {}\n\n",
        serde_json::to_string(update).unwrap()
    ))
}

#[tokio::test]
async fn follows_the_catalog_stream_and_resumes_after_reconnect() {
    let b1 = backend(echo("b1")).await;
    let b2 = backend(echo("b2")).await;
    let seen_ids: Arc<Mutex<Vec<Option<String>>>> = Arc::new(Mutex::new(Vec::new()));
    let (more_tx, more_rx) = mpsc::unbounded_channel::<Bytes>();
    let more_rx = Arc::new(tokio::sync::Mutex::new(Some(more_rx)));

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let control = listener.local_addr().unwrap();
    let (seen, b1a, b2a) = (seen_ids.clone(), b1.addr, b2.addr);
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let (seen, more_rx) = (seen.clone(), more_rx.clone());
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let (seen, more_rx) = (seen.clone(), more_rx.clone());
                    async move {
                        let auth = req
                            .headers()
                            .get("authorization")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("");
                        if req.uri().path() != "/v1/catalog/watch" || auth != "Bearer proxy-token" {
                            let body: BoxBody<Bytes, Infallible> =
                                Full::new(Bytes::from("no")).boxed();
                            return Ok::<_, Infallible>(
                                Response::builder().status(401).body(body).unwrap(),
                            );
                        }
                        let last = req
                            .headers()
                            .get("last-event-id")
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_string);
                        let first = last.is_none();
                        seen.lock().unwrap().push(last);
                        let body: BoxBody<Bytes, Infallible> = if first {
                            // A snapshot, then the stream ends (the proxy must reconnect).
                            let snap = snapshot(
                                5,
                                vec![app("web")],
                                vec![machine("m1", "web", "ams", b1a, MachineState::Started)],
                            );
                            Full::new(sse(5, &snap)).boxed()
                        } else {
                            // The missed changes, then stay open for more.
                            let stopped = CatalogUpdate::Machine {
                                seq: 6,
                                machine: machine("m1", "web", "ams", b1a, MachineState::Stopped),
                            };
                            let started = CatalogUpdate::Machine {
                                seq: 7,
                                machine: machine("m2", "web", "ams", b2a, MachineState::Started),
                            };
                            let mut rx = more_rx.lock().await.take().expect("one resumed stream");
                            let head = futures_util::stream::iter(vec![
                                sse(6, &stopped),
                                sse(7, &started),
                            ]);
                            let tail = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
                            let frames = futures_util::StreamExt::map(
                                futures_util::StreamExt::chain(head, tail),
                                |b| Ok::<_, Infallible>(Frame::data(b)),
                            );
                            BodyExt::boxed(StreamBody::new(frames))
                        };
                        Ok(Response::builder()
                            .header("content-type", "text/event-stream")
                            .body(body)
                            .unwrap())
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });

    let mut cfg = config();
    cfg.control_url = format!("http://{control}");
    let proxy = start(cfg).await;
    tokio::spawn(proxy.proxy.clone().follow_catalog());

    let addr = proxy.http;
    eventually("m2 serves after the resumed stream", || async move {
        let r = get(addr, "web.aloft.test", "/", &[]).await;
        r.status == 200 && r.header("x-backend") == Some("b2")
    })
    .await;
    assert_eq!(proxy.proxy.catalog().seq(), 7);
    let ids = seen_ids.lock().unwrap().clone();
    assert_eq!(ids, vec![None, Some("5".to_string())]);

    // A change on the open stream takes effect.
    more_tx
        .send(sse(
            8,
            &CatalogUpdate::AppRemoved {
                seq: 8,
                name: "web".into(),
            },
        ))
        .unwrap();
    eventually("app removal applied", || async move {
        get(addr, "web.aloft.test", "/", &[]).await.status == 404
    })
    .await;
    proxy.shutdown().await;
}
