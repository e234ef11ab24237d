//! Slow request bodies: a deadline for the whole body (not per read), and a cap on the
//! request bytes buffered across all connections, so stalled uploads can neither grow the
//! proxy's memory nor keep other apps from being served.
//!
//! In a test binary of its own, and one test at a time, because it measures the RSS of
//! the process.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use aloft_api::MachineState;
use bytes::Bytes;
use common::*;
use http_body_util::StreamBody;
use hyper::body::Frame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const MIB: usize = 1024 * 1024;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("VmRSS"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap()
}

fn raise_open_file_limit(want: u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        if limit.rlim_cur < want {
            limit.rlim_cur = want.min(limit.rlim_max);
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
        }
        assert!(
            limit.rlim_cur >= want,
            "need {want} open files, the hard limit is {}",
            limit.rlim_max
        );
    }
}

/// An app that reads request bodies and throws them away (and never answers), so the
/// only place a body can pile up is the proxy.
async fn discarding_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 2048];
                while let Ok(n) = stream.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// The proxy with an upload app `up` (no concurrency limit: every request reaches it) and
/// an ordinary app `ok`.
async fn proxy_with_apps(cfg: aloft_proxy::ProxyConfig) -> (Running, Backend) {
    let up = discarding_backend().await;
    let ok = backend(echo("ok")).await;
    let proxy = start(cfg).await;
    let mut unlimited = http_service(up.port());
    unlimited.concurrency = None;
    proxy.proxy.catalog().apply(snapshot(
        1,
        vec![app("up"), app("ok")],
        vec![
            machine_with(
                "m-up",
                "up",
                "ams",
                up,
                MachineState::Started,
                vec![unlimited],
            ),
            machine("m-ok", "ok", "ams", ok.addr, MachineState::Started),
        ],
    ));
    (proxy, ok)
}

/// Reads until the peer closes (failing the test after `limit`); returns what came.
async fn read_to_close(s: &mut TcpStream, limit: Duration) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return out,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => panic!(
                "connection not closed within {limit:?}; got {:?}",
                String::from_utf8_lossy(&out)
            ),
        }
    }
}

async fn ok_app_answers_promptly(addr: SocketAddr) {
    let started = Instant::now();
    let reply = get(addr, "ok.aloft.test", "/", &[]).await;
    let took = started.elapsed();
    assert_eq!(reply.status, 200, "another app stays served");
    assert!(
        took < Duration::from_secs(2),
        "another app took {took:?} to answer"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_stalled_uploads_keep_memory_bounded_and_other_apps_served() {
    let _one = ONE_AT_A_TIME.lock().await;
    raise_open_file_limit(8192);
    let mut cfg = config();
    cfg.request_body_timeout = Duration::from_secs(20);
    cfg.header_read_timeout = Duration::from_secs(10);
    let cap = cfg.max_buffered_request_bytes;
    let (proxy, _ok) = proxy_with_apps(cfg).await;
    let addr = proxy.http;
    ok_app_answers_promptly(addr).await;
    let before = rss_kib();

    // 1,000 uploads of 1 MiB, each sending all but the last 48 KiB and then stalling.
    let head = Bytes::from(format!(
        "POST /upload HTTP/1.1\r\nHost: up.aloft.test\r\nContent-Length: {MIB}\r\n\r\n"
    ));
    let most_of_the_body = Bytes::from(vec![b'x'; MIB - 48 * 1024]);
    let mut senders = Vec::new();
    for _ in 0..1000 {
        let (head, body) = (head.clone(), most_of_the_body.clone());
        senders.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(&head).await.unwrap();
            s.write_all(&body).await.unwrap();
            s
        }));
    }
    let mut stalled = Vec::new();
    for sender in senders {
        stalled.push(sender.await.unwrap());
    }
    // Let the proxy read what is in flight.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let grown_mib = rss_kib().saturating_sub(before) / 1024;
    let buffered = proxy.proxy.buffered_request_bytes();
    eprintln!(
        "1,000 stalled uploads: RSS grew by {grown_mib} MiB, {} MiB of bodies buffered",
        buffered / MIB
    );
    assert!(buffered <= cap, "buffered {buffered} bytes, over the cap");
    assert!(grown_mib < 256, "RSS grew by {grown_mib} MiB");
    ok_app_answers_promptly(addr).await;

    // Past the whole-body deadline every stalled upload is closed; those whose body
    // the proxy was buffering got a 408 first.
    let mut timed_out = 0;
    for mut s in stalled {
        let out = read_to_close(&mut s, Duration::from_secs(60)).await;
        if out.starts_with(b"HTTP/1.1 408") {
            timed_out += 1;
        }
    }
    assert!(timed_out > 0, "no upload got a 408");
    eventually("buffers released", || async {
        proxy.proxy.buffered_request_bytes() == 0 && proxy.proxy.active_connections() <= 1
    })
    .await;
    eprintln!(
        "after the deadline: {timed_out} uploads got a 408, RSS {} MiB above the start",
        rss_kib().saturating_sub(before) / 1024
    );
    ok_app_answers_promptly(addr).await;
    proxy.shutdown().await;
}

fn trickle_config() -> aloft_proxy::ProxyConfig {
    let mut cfg = config();
    cfg.request_body_timeout = Duration::from_secs(3);
    // Longer than the pause between two bytes: per-read timeouts never fire.
    cfg.header_read_timeout = Duration::from_secs(2);
    cfg
}

/// Sends `head` and then one body byte a second; returns the response and when it came.
async fn trickle(addr: SocketAddr, head: &str) -> (String, Duration) {
    let started = Instant::now();
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    write.write_all(head.as_bytes()).await.unwrap();
    let writer = tokio::spawn(async move {
        for _ in 0..100 {
            if write.write_all(b"x").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(Duration::from_secs(15), read.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => panic!(
                "no answer 15 s into a trickled body; got {:?}",
                String::from_utf8_lossy(&out)
            ),
        }
    }
    writer.abort();
    (String::from_utf8_lossy(&out).to_string(), started.elapsed())
}

fn assert_timed_out(what: &str, out: &str, took: Duration) {
    assert!(out.starts_with("HTTP/1.1 408"), "{what}: {out}");
    assert!(
        took >= Duration::from_millis(2500) && took < Duration::from_secs(8),
        "{what}: answered after {took:?}, the deadline is 3 s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_trickled_a_byte_a_second_hits_the_whole_body_deadline() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (proxy, _ok) = proxy_with_apps(trickle_config()).await;
    let addr = proxy.http;

    // The HTTP/1.1 fast path.
    let (out, took) = trickle(
        addr,
        "POST / HTTP/1.1\r\nHost: up.aloft.test\r\nContent-Length: 100\r\n\r\n",
    )
    .await;
    assert_timed_out("fast path", &out, took);

    // The general (hyper) path: an absolute-form target goes there.
    let (out, took) = trickle(
        addr,
        "POST http://up.aloft.test/ HTTP/1.1\r\nHost: up.aloft.test\r\nContent-Length: 100\r\n\r\n",
    )
    .await;
    assert_timed_out("general path", &out, took);
    assert_eq!(proxy.proxy.buffered_request_bytes(), 0);
    ok_app_answers_promptly(addr).await;
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_body_trickled_a_byte_a_second_hits_the_whole_body_deadline() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (proxy, _ok) = proxy_with_apps(trickle_config()).await;
    let stream = TcpStream::connect(proxy.http).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(1);
    let trickler = tokio::spawn(async move {
        for _ in 0..100 {
            if tx
                .send(Ok(Frame::data(Bytes::from_static(b"x"))))
                .await
                .is_err()
            {
                return;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    let body = StreamBody::new(tokio_stream_from(rx));
    let req = http::Request::builder()
        .method("POST")
        .uri("http://up.aloft.test/")
        .header("content-length", "100")
        .body(body)
        .unwrap();
    let started = Instant::now();
    let resp = tokio::time::timeout(Duration::from_secs(15), sender.send_request(req))
        .await
        .expect("no answer 15 s into a trickled HTTP/2 body")
        .unwrap();
    let took = started.elapsed();
    trickler.abort();
    assert_eq!(resp.status(), 408);
    assert!(
        took >= Duration::from_millis(2500) && took < Duration::from_secs(8),
        "answered after {took:?}, the deadline is 3 s"
    );
    assert_eq!(proxy.proxy.buffered_request_bytes(), 0);
    proxy.shutdown().await;
}

/// A `Stream` of what a channel receives.
fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send + 'static {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
