//! Allocations per proxied request: the proxy's share (requests through the proxy minus
//! the same requests straight to the backend) stays small and bounded.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};

use aloft_api::MachineState;
use bytes::Bytes;
use common::*;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;

struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

async fn run(addr: std::net::SocketAddr, host: &str, n: u64) -> u64 {
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(
        tokio::net::TcpStream::connect(addr).await.unwrap(),
    ))
    .await
    .unwrap();
    tokio::spawn(conn);
    let send = |sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>| {
        let req = Request::builder()
            .uri("/")
            .header("host", host)
            .header("user-agent", "bench")
            .header("accept", "*/*")
            .body(Full::new(Bytes::new()))
            .unwrap();
        sender.send_request(req)
    };
    // Warm up: connections, pools, caches.
    for _ in 0..50 {
        sender.ready().await.unwrap();
        let resp = send(&mut sender).await.unwrap();
        resp.into_body().collect().await.unwrap();
    }
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    for _ in 0..n {
        sender.ready().await.unwrap();
        let resp = send(&mut sender).await.unwrap();
        assert_eq!(resp.status(), 200);
        resp.into_body().collect().await.unwrap();
    }
    ALLOCATIONS.load(Ordering::Relaxed) - before
}

#[tokio::test(flavor = "current_thread")]
async fn the_proxy_allocates_little_per_request() {
    let be = backend(handler(|_req: Request<Incoming>| async move {
        Response::new(Full::new(Bytes::from_static(b"hello")))
    }))
    .await;
    let proxy = start(config()).await;
    let mut svc = http_service(be.addr.port());
    svc.concurrency = None;
    proxy.proxy.catalog().apply(snapshot(
        1,
        vec![app("web")],
        vec![machine_with(
            "m1",
            "web",
            "ams",
            be.addr,
            MachineState::Started,
            vec![svc],
        )],
    ));
    let n = 2000;
    let direct = run(be.addr, "web.aloft.test", n).await;
    let proxied = run(proxy.http, "web.aloft.test", n).await;
    // Through the proxy the backend side runs twice (the proxy's client and server ends),
    // so count the proxy's share against one more direct hop.
    let per_request = proxied.saturating_sub(direct) as f64 / n as f64;
    eprintln!(
        "allocations per request: direct {:.1}, proxied {:.1}, the proxy's share {per_request:.1}",
        direct as f64 / n as f64,
        proxied as f64 / n as f64
    );
    assert!(
        per_request < 40.0,
        "the proxy allocates {per_request:.1} times per request"
    );
    proxy.shutdown().await;
}
