//! Listeners and connections: accept loops, the per-connection handler pipeline (TLS,
//! PROXY protocol, HTTP, raw TCP), dynamic listeners for the apps' IPs and ports, and
//! graceful draining.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use aloft_api::MachinePort;
use http::{Response, StatusCode};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::body::RespBody;
use crate::http::ConnInfo;
use crate::lb::Constraints;
use crate::{BoundAddrs, Proxy, ProxyConfig};

/// What a listener does with its connections.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Role {
    /// Plain HTTP on a shared address, routed by Host.
    Http {
        public_port: u16,
    },
    /// TLS on a shared address, routed by SNI (then Host).
    Https {
        public_port: u16,
    },
    /// Another public port on a shared address: TLS by SNI or HTTP by Host.
    Shared {
        public_port: u16,
    },
    /// A dedicated IP of one app: handlers of the app's service on the port.
    Dedicated {
        app: String,
        public_port: u16,
    },
    /// A UDP service port on a dedicated IP of one app.
    Udp {
        app: String,
        public_port: u16,
    },
    Metrics,
}

pub(crate) struct Bound {
    listeners: Vec<(TcpListener, Role)>,
    /// The backhaul listener and this host's number.
    backhaul: Option<(TcpListener, u32)>,
}

impl Bound {
    pub(crate) fn addrs(&self) -> BoundAddrs {
        let mut addrs = BoundAddrs::default();
        for (listener, role) in &self.listeners {
            let addr = listener.local_addr().ok();
            match role {
                Role::Http { .. } => addrs.http = addr,
                Role::Https { .. } => addrs.https = addr,
                Role::Metrics => addrs.metrics = addr,
                _ => {}
            }
        }
        addrs
    }
}

/// A listening socket with a deep backlog, SO_REUSEADDR, and (for addresses that may not
/// be configured yet) IP_FREEBIND.
pub(crate) fn listen(addr: SocketAddr, freebind: bool) -> io::Result<TcpListener> {
    let domain = if addr.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if freebind {
        let _ = if addr.is_ipv4() {
            socket.set_freebind_v4(true)
        } else {
            socket.set_freebind_v6(true)
        };
    }
    if addr.is_ipv6() {
        let _ = socket.set_only_v6(true);
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    TcpListener::from_std(socket.into())
}

pub(crate) fn bind_static(config: &ProxyConfig) -> anyhow::Result<Bound> {
    let mut listeners = Vec::new();
    let http = listen(config.http_listen, false)
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.http_listen))?;
    listeners.push((http, Role::Http { public_port: 80 }));
    if let Some(addr) = config.https_listen {
        let https =
            listen(addr, false).map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
        listeners.push((https, Role::Https { public_port: 443 }));
    }
    if let Some(addr) = config.metrics_listen {
        let metrics =
            listen(addr, false).map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
        listeners.push((metrics, Role::Metrics));
    }
    let backhaul = match (&config.backhaul, config.host_number) {
        (Some(backhaul), Some(number)) => {
            let listener = crate::backhaul_worker::bind(backhaul).map_err(|e| {
                anyhow::anyhow!("cannot listen for the backhaul on {}: {e}", backhaul.listen)
            })?;
            Some((listener, number))
        }
        (Some(_), None) => {
            anyhow::bail!("the proxy's backhaul needs this host's number (host_number)")
        }
        (None, _) => None,
    };
    Ok(Bound {
        listeners,
        backhaul,
    })
}

pub(crate) async fn serve(
    proxy: Arc<Proxy>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let bound = proxy.bound.lock().unwrap_or_else(|p| p.into_inner()).take();
    let bound = match bound {
        Some(bound) => bound,
        None => {
            let bound = bind_static(&proxy.config)?;
            *proxy.addrs.lock().unwrap_or_else(|p| p.into_inner()) = bound.addrs();
            bound
        }
    };
    let _ = proxy.stop.send(false);
    let mut tasks: Vec<JoinHandle<()>> = Vec::new();
    for (listener, role) in bound.listeners {
        tasks.push(tokio::spawn(accept_loop(
            proxy.clone(),
            listener,
            role,
            proxy.stop.subscribe(),
        )));
    }
    let mut background: Vec<JoinHandle<()>> = Vec::new();
    if let Some((listener, number)) = bound.backhaul {
        tasks.push(tokio::spawn(crate::backhaul_worker::serve(
            proxy.clone(),
            listener,
            number,
            proxy.stop.subscribe(),
        )));
        background.push(tokio::spawn(crate::load_share::share(proxy.clone())));
    }
    background.extend([
        tokio::spawn(manage_listeners(proxy.clone())),
        tokio::spawn(crate::autoscale::autostop_loop(proxy.clone())),
        tokio::spawn(crate::tls::certificate_loop(proxy.clone())),
        tokio::spawn(sweep_idle_backends(proxy.clone())),
        tokio::spawn(probe_rtt(proxy.clone())),
    ]);
    shutdown.await;
    tracing::info!(
        connections = proxy.tracker.active(),
        "shutting down: draining"
    );
    let _ = proxy.stop.send(true);
    for task in background {
        task.abort();
    }
    for task in tasks {
        let _ = task.await;
    }
    // Wait for open connections to finish their in-flight work.
    let deadline = tokio::time::Instant::now() + proxy.config.drain_timeout;
    loop {
        let idle = proxy.tracker.idle.notified();
        if proxy.tracker.active() == 0 {
            break;
        }
        if tokio::time::timeout_at(deadline, idle).await.is_err() {
            tracing::warn!(
                connections = proxy.tracker.active(),
                "drain timeout: closing remaining connections"
            );
            break;
        }
    }
    Ok(())
}

async fn accept_loop(
    proxy: Arc<Proxy>,
    listener: TcpListener,
    role: Role,
    mut stop: watch::Receiver<bool>,
) {
    let role = Arc::new(role);
    loop {
        let accepted = tokio::select! {
            _ = stopped(&mut stop) => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                if proxy.tracker.active() >= proxy.config.max_connections {
                    drop(stream);
                    continue;
                }
                let _ = stream.set_nodelay(true);
                let proxy = proxy.clone();
                let role = role.clone();
                let stop = stop.clone();
                tokio::spawn(async move {
                    let _track = proxy.tracker.enter();
                    proxy.metrics.tcp_connects.inc();
                    // An idle connection holds only this small future: the handler's
                    // (much larger) state is allocated once the client sends something.
                    let mut stop_wait = stop.clone();
                    // (Dedicated IPs may carry server-speaks-first protocols: no wait.)
                    let client_first = !matches!(*role, Role::Dedicated { .. } | Role::Metrics);
                    let mut first = [0u8; 1];
                    let ready = !client_first
                        || tokio::select! {
                            peeked = stream.peek(&mut first) => matches!(peeked, Ok(n) if n > 0),
                            _ = stopped(&mut stop_wait) => false,
                            _ = tokio::time::sleep(proxy.config.header_read_timeout) => false,
                        };
                    if ready {
                        Box::pin(handle_connection(proxy.clone(), stream, peer, &role, stop)).await;
                    }
                    proxy.metrics.tcp_disconnects.inc();
                });
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn handle_connection(
    proxy: Arc<Proxy>,
    stream: TcpStream,
    peer: SocketAddr,
    role: &Role,
    stop: watch::Receiver<bool>,
) {
    let Ok(local) = stream.local_addr() else {
        return;
    };
    match role {
        Role::Metrics => Box::pin(serve_metrics(proxy, stream)).await,
        Role::Http { public_port } => {
            let Some(h2) = detect_h2(&stream, proxy.config.header_read_timeout).await else {
                return;
            };
            let info = Arc::new(ConnInfo::new(peer, local, *public_port, false, None));
            serve_client(proxy, stream, info, stop, h2).await;
        }
        // Boxed: the pipeline's state (a TLS handshake, ~14 KiB) would otherwise be part
        // of every connection's future, plain HTTP keep-alive connections included.
        Role::Https { public_port } => {
            Box::pin(pipeline(
                proxy,
                stream,
                peer,
                local,
                *public_port,
                None,
                true,
                stop,
            ))
            .await;
        }
        Role::Shared { public_port } => {
            Box::pin(pipeline(
                proxy,
                stream,
                peer,
                local,
                *public_port,
                None,
                false,
                stop,
            ))
            .await;
        }
        Role::Udp { .. } => {}
        Role::Dedicated { app, public_port } => {
            Box::pin(pipeline(
                proxy,
                stream,
                peer,
                local,
                *public_port,
                Some(app.clone()),
                false,
                stop,
            ))
            .await;
        }
    }
}

/// Closes pooled backend connections that stayed idle too long, even without traffic.
async fn sweep_idle_backends(proxy: Arc<Proxy>) {
    let period = proxy.config.pool.idle_timeout.max(Duration::from_secs(1));
    loop {
        tokio::time::sleep(period).await;
        let snapshot = proxy.catalog.snapshot();
        for app in snapshot.apps.values() {
            for machine in &app.machines {
                for backend in machine.backends.iter().flatten() {
                    backend.expire_idle();
                }
            }
        }
    }
}

/// Measures the round trip to other regions: the time a TCP connect takes to a started
/// machine there (over the backhaul in production), smoothed into the RTT table.
async fn probe_rtt(proxy: Arc<Proxy>) {
    let Some(period) = proxy.config.rtt_probe_interval else {
        return;
    };
    loop {
        let mut targets: HashMap<String, Arc<crate::backend::Backend>> = HashMap::new();
        {
            let snapshot = proxy.catalog.snapshot();
            for app in snapshot.apps.values() {
                for machine in &app.machines {
                    if machine.region == proxy.config.region
                        || machine.state != aloft_api::MachineState::Started
                    {
                        continue;
                    }
                    if let Some(backend) = machine.backends.iter().flatten().next() {
                        targets
                            .entry(machine.region.clone())
                            .or_insert_with(|| backend.clone());
                    }
                }
            }
        }
        for (region, backend) in targets {
            let started = Instant::now();
            // Through the backhaul for a machine of another host, as requests go.
            if let Ok(Ok(_)) =
                tokio::time::timeout(Duration::from_secs(2), backend.connect_raw()).await
            {
                proxy
                    .rtt
                    .observe(&region, started.elapsed().as_secs_f64() * 1000.0);
            }
        }
        tokio::time::sleep(period).await;
    }
}

/// Completes once shutdown has begun.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Serves a client connection: HTTP/2 through hyper, HTTP/1.x through the fast path
/// (which hands what it does not serve itself to hyper).
pub(crate) async fn serve_client<I>(
    proxy: Arc<Proxy>,
    io: I,
    info: Arc<ConnInfo>,
    stop: watch::Receiver<bool>,
    h2: bool,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    if h2 {
        Box::pin(serve_http(proxy, io, info, stop, true)).await;
    } else {
        crate::fast::serve(proxy, io, info, stop).await;
    }
}

/// Serves HTTP/1.1 and HTTP/2 on one client connection with hyper.
pub(crate) async fn serve_http<I>(
    proxy: Arc<Proxy>,
    io: I,
    info: Arc<ConnInfo>,
    mut stop: watch::Receiver<bool>,
    h2: bool,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let handler = proxy.clone();
    // Boxed per request: hyper keeps room for one service future per connection for the
    // connection's whole life, and an idle keep-alive connection should not pin ~6 KiB.
    let service = service_fn(move |req| Box::pin(handler.clone().handle_http(info.clone(), req)));
    let drain = proxy.config.drain_timeout;
    if h2 {
        let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .max_concurrent_streams(256)
            .max_header_list_size(proxy.config.max_header_bytes as u32)
            .max_pending_accept_reset_streams(64)
            .max_local_error_reset_streams(256)
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .keep_alive_timeout(Duration::from_secs(20));
        let conn = builder.serve_connection(TokioIo::new(io), service);
        tokio::pin!(conn);
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "client h2 connection ended with an error");
                }
            }
            _ = stopped(&mut stop) => {
                conn.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(drain, conn.as_mut()).await;
            }
        }
    } else {
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(proxy.config.header_read_timeout)
            .max_buf_size(proxy.config.max_header_bytes.max(8192))
            .max_headers(proxy.config.max_headers)
            .keep_alive(true);
        let conn = builder
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades();
        tokio::pin!(conn);
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "client connection ended with an error");
                }
            }
            _ = stopped(&mut stop) => {
                conn.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(drain, conn.as_mut()).await;
            }
        }
    }
}

/// The HTTP/2 connection preface (prior knowledge, h2c).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Whether a plain connection speaks HTTP/2 with prior knowledge: peeks until the first
/// bytes differ from the preface (HTTP/1) or match all of it (h2). `None` on timeout/close.
pub(crate) async fn detect_h2(stream: &TcpStream, timeout: Duration) -> Option<bool> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = [0u8; 24];
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
            Ok(Ok(n)) => n,
        };
        if buf[..n] != H2_PREFACE[..n] {
            return Some(false);
        }
        if n == H2_PREFACE.len() {
            return Some(true);
        }
        // A prefix of the preface so far: wait for more bytes.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn serve_metrics(proxy: Arc<Proxy>, stream: TcpStream) {
    let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let proxy = proxy.clone();
        async move {
            let resp = if req.uri().path() == "/metrics" {
                let mut resp = Response::new(RespBody::full(proxy.render_metrics()));
                resp.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                resp
            } else {
                crate::http::error_response(StatusCode::NOT_FOUND, "not found")
            };
            Ok::<_, std::convert::Infallible>(resp)
        }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30))
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

/// Peeks at the first byte of a connection without consuming it.
async fn peek_first(stream: &TcpStream, timeout: Duration) -> Option<u8> {
    let mut byte = [0u8; 1];
    match tokio::time::timeout(timeout, stream.peek(&mut byte)).await {
        Ok(Ok(1)) => Some(byte[0]),
        _ => None,
    }
}

/// The handler pipeline of a connection on a TLS, shared or dedicated listener.
#[allow(clippy::too_many_arguments)]
async fn pipeline(
    proxy: Arc<Proxy>,
    stream: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    public_port: u16,
    fixed_app: Option<String>,
    tls_listener: bool,
    stop: watch::Receiver<bool>,
) {
    let handshake_timeout = proxy.config.handshake_timeout;
    // What the app (when already known) does on this port.
    let known_port = fixed_app
        .as_ref()
        .and_then(|app| port_config(&proxy, app, public_port));
    if fixed_app.is_some() && known_port.is_none() {
        // Default-deny: no service exposes this port.
        return;
    }
    let mut stream = stream;
    let wants_tls = match &known_port {
        Some(port) if has_handler(port, "pg_tls") => {
            if !postgres_tls_start(&mut stream, handshake_timeout).await {
                return;
            }
            true
        }
        Some(port) => has_handler(port, "tls"),
        None => {
            if tls_listener {
                true
            } else {
                // Shared address, other port: TLS by SNI, plain HTTP by Host, or a
                // Postgres client asking for TLS (then routed by SNI to a `pg_tls` port).
                match peek_first(&stream, handshake_timeout).await {
                    Some(0x16) => true,
                    Some(0) => {
                        if !postgres_tls_start(&mut stream, handshake_timeout).await {
                            return;
                        }
                        true
                    }
                    Some(_) => false,
                    None => return,
                }
            }
        }
    };

    if !wants_tls {
        match known_port {
            Some(port) if has_handler(&port, "http") => {
                let Some(h2) = detect_h2(&stream, proxy.config.header_read_timeout).await else {
                    return;
                };
                let info = Arc::new(ConnInfo::new(peer, local, public_port, false, fixed_app));
                serve_client(proxy, stream, info, stop, h2).await;
            }
            Some(port) => {
                let app = fixed_app.unwrap_or_default();
                passthrough(proxy, stream, peer, local, &app, public_port, &port).await;
            }
            None => {
                let Some(h2) = detect_h2(&stream, proxy.config.header_read_timeout).await else {
                    return;
                };
                let info = Arc::new(ConnInfo::new(peer, local, public_port, false, None));
                serve_client(proxy, stream, info, stop, h2).await;
            }
        }
        return;
    }

    let accepted = crate::tls::accept(
        &proxy,
        stream,
        fixed_app.as_deref(),
        public_port,
        handshake_timeout,
    )
    .await;
    let Some((tls_stream, app, port)) = accepted else {
        return;
    };
    if has_handler(&port, "http") {
        let h2 = tls_stream.get_ref().1.alpn_protocol() == Some(b"h2");
        let info = Arc::new(ConnInfo::new(peer, local, public_port, true, Some(app)));
        serve_client(proxy, tls_stream, info, stop, h2).await;
    } else {
        passthrough(proxy, tls_stream, peer, local, &app, public_port, &port).await;
    }
}

/// The PostgreSQL `SSLRequest` and `GSSENCRequest` messages (length 8, then the code).
const PG_SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
const PG_GSSENC_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30];

/// The start of a `pg_tls` connection: a client that asks for TLS with an `SSLRequest` is
/// told yes (`S`); one that opens with a TLS handshake right away (PostgreSQL 17's
/// `sslnegotiation=direct`) goes straight on; a request for GSS encryption is declined
/// (`N`, the client then asks for TLS). A client starting without TLS gets a FATAL error
/// naming the fix. Returns whether a TLS handshake follows.
async fn postgres_tls_start(stream: &mut TcpStream, timeout: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    for _ in 0..2 {
        match peek_first(stream, timeout).await {
            Some(0x16) => return true,
            Some(_) => {}
            None => return false,
        }
        let mut message = [0u8; 8];
        if !matches!(
            tokio::time::timeout(timeout, stream.read_exact(&mut message)).await,
            Ok(Ok(_))
        ) {
            return false;
        }
        match message {
            PG_SSL_REQUEST => return stream.write_all(b"S").await.is_ok(),
            PG_GSSENC_REQUEST => {
                if stream.write_all(b"N").await.is_err() {
                    return false;
                }
            }
            _ => {
                let _ = stream
                    .write_all(&postgres_fatal(
                        "08P01",
                        "this port accepts only TLS connections (connect with sslmode=require)",
                    ))
                    .await;
                let _ = stream.shutdown().await;
                return false;
            }
        }
    }
    false
}

/// A PostgreSQL `ErrorResponse` with severity FATAL.
fn postgres_fatal(code: &str, message: &str) -> Vec<u8> {
    let mut fields = Vec::new();
    for (tag, value) in [
        (b'S', "FATAL"),
        (b'V', "FATAL"),
        (b'C', code),
        (b'M', message),
    ] {
        fields.push(tag);
        fields.extend_from_slice(value.as_bytes());
        fields.push(0);
    }
    fields.push(0);
    let mut out = vec![b'E'];
    out.extend_from_slice(&((fields.len() + 4) as u32).to_be_bytes());
    out.extend_from_slice(&fields);
    out
}

pub(crate) fn has_handler(port: &MachinePort, handler: &str) -> bool {
    port.handlers.iter().any(|h| h == handler)
}

pub(crate) fn port_config(proxy: &Proxy, app: &str, public_port: u16) -> Option<MachinePort> {
    let snapshot = proxy.catalog.load();
    let app = snapshot.apps.get(app)?;
    app.port_config(public_port).map(|(_, p)| p.clone())
}

/// Raw TCP to a machine (no `http` handler), with a PROXY protocol header when asked.
async fn passthrough<S>(
    proxy: Arc<Proxy>,
    client: S,
    peer: SocketAddr,
    local: SocketAddr,
    app: &str,
    public_port: u16,
    port: &MachinePort,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let deadline = Instant::now() + proxy.config.machine_wait;
    let chosen = match proxy
        .choose(app, public_port, &Constraints::default(), deadline)
        .await
    {
        Ok(chosen) => chosen,
        Err((_, message)) => {
            tracing::debug!(app, message, "no machine for a TCP connection");
            return;
        }
    };
    let backend = chosen.guard.backend().clone();
    let mut upstream = match backend.connect_raw().await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(app, error = %e, "backend connect failed");
            return;
        }
    };
    if has_handler(port, "proxy_proto") {
        let v2 = port
            .proxy_proto_options
            .as_ref()
            .is_some_and(|o| o.version == "v2");
        let header = crate::proxy_proto::encode(peer, local, v2);
        if upstream.write_all(&header).await.is_err() {
            return;
        }
    }
    let _guard = chosen.guard;
    copy_with_idle(client, upstream, proxy.config.tcp_idle_timeout).await;
}

/// Copies both ways until both sides close, or until nothing moved for `idle`.
pub(crate) async fn copy_with_idle<A, B>(a: A, b: B, idle: Duration)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let activity = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut a = Activity {
        inner: a,
        activity: activity.clone(),
        start,
    };
    let mut b = Activity {
        inner: b,
        activity: activity.clone(),
        start,
    };
    let copy = tokio::io::copy_bidirectional(&mut a, &mut b);
    tokio::pin!(copy);
    let check = (idle / 4).max(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = &mut copy => return,
            _ = tokio::time::sleep(check) => {
                let last = Duration::from_millis(activity.load(Ordering::Relaxed));
                if start.elapsed().saturating_sub(last) >= idle {
                    return;
                }
            }
        }
    }
}

struct Activity<S> {
    inner: S,
    activity: Arc<AtomicU64>,
    start: Instant,
}

impl<S> Activity<S> {
    fn touch(&self) {
        self.activity
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Activity<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.touch();
        }
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Activity<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        result
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Keeps one listener per (address, port) that the catalog asks for: every public port
/// the apps expose (on the shared address) and every port on each dedicated IP.
async fn manage_listeners(proxy: Arc<Proxy>) {
    if !proxy.config.service_listeners {
        return;
    }
    let mut changes = proxy.catalog.subscribe();
    let mut running: HashMap<(SocketAddr, Role), JoinHandle<()>> = HashMap::new();
    let mut failed: HashSet<(SocketAddr, Role)> = HashSet::new();
    let static_addrs: HashSet<SocketAddr> = [
        Some(proxy.config.http_listen),
        proxy.config.https_listen,
        proxy.config.metrics_listen,
    ]
    .into_iter()
    .flatten()
    .collect();
    loop {
        let wanted = wanted_listeners(&proxy);
        running.retain(|key, task| {
            let keep = wanted.contains(key);
            if !keep {
                task.abort();
            }
            keep
        });
        failed.retain(|key| wanted.contains(key));
        for key in wanted {
            if running.contains_key(&key) || static_addrs.contains(&key.0) {
                continue;
            }
            if let Role::Udp { app, public_port } = &key.1 {
                match crate::udp::bind(key.0) {
                    Ok(socket) => {
                        failed.remove(&key);
                        tracing::info!(addr = %key.0, role = ?key.1, "listening (udp)");
                        let task = tokio::spawn(crate::udp::relay(
                            proxy.clone(),
                            socket,
                            app.clone(),
                            *public_port,
                            proxy.stop.subscribe(),
                        ));
                        running.insert(key, task);
                    }
                    Err(e) => {
                        if failed.insert(key.clone()) {
                            tracing::warn!(addr = %key.0, error = %e, "cannot listen (udp)");
                        }
                    }
                }
                continue;
            }
            match listen(key.0, true) {
                Ok(listener) => {
                    failed.remove(&key);
                    tracing::info!(addr = %key.0, role = ?key.1, "listening");
                    let task = tokio::spawn(accept_loop(
                        proxy.clone(),
                        listener,
                        key.1.clone(),
                        proxy.stop.subscribe(),
                    ));
                    running.insert(key, task);
                }
                Err(e) => {
                    if failed.insert(key.clone()) {
                        tracing::warn!(addr = %key.0, error = %e, "cannot listen");
                    }
                }
            }
        }
        if changes.changed().await.is_err() {
            break;
        }
        // Coalesce bursts of catalog changes.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn wanted_listeners(proxy: &Proxy) -> HashSet<(SocketAddr, Role)> {
    let snapshot = proxy.catalog.load();
    let shared_ip: IpAddr = proxy.config.http_listen.ip();
    let static_ports: HashSet<u16> = [80u16, 443].into_iter().collect();
    let mut wanted = HashSet::new();
    for app in snapshot.apps.values() {
        let ports = app.exposed_ports();
        for port in &ports {
            if static_ports.contains(port) {
                continue;
            }
            // Shared addresses only route what can be told apart by Host or SNI.
            if let Some((_, p)) = app.port_config(*port)
                && (has_handler(p, "tls") || has_handler(p, "http") || has_handler(p, "pg_tls"))
            {
                wanted.insert((
                    SocketAddr::new(shared_ip, *port),
                    Role::Shared { public_port: *port },
                ));
            }
        }
    }
    for (ip, app) in &snapshot.dedicated_ips {
        for port in app.exposed_ports() {
            wanted.insert((
                SocketAddr::new(*ip, port),
                Role::Dedicated {
                    app: app.name.clone(),
                    public_port: port,
                },
            ));
        }
        for port in app.udp_ports() {
            wanted.insert((
                SocketAddr::new(*ip, port),
                Role::Udp {
                    app: app.name.clone(),
                    public_port: port,
                },
            ));
        }
    }
    wanted
}

#[cfg(test)]
mod tests {
    /// What every open client connection keeps while it waits for its next request: the
    /// connection future (10,000 idle keep-alive connections must fit in a few MiB).
    #[tokio::test]
    async fn an_idle_plain_http_connection_holds_a_small_future() {
        let proxy = crate::Proxy::new(crate::ProxyConfig::default());
        let (_stop_tx, stop) = tokio::sync::watch::channel(false);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let role = super::Role::Http { public_port: 80 };
        let connection = super::handle_connection(proxy, stream, addr, &role, stop);
        let size = std::mem::size_of_val(&connection);
        assert!(size <= 2048, "a connection future takes {size} bytes");
    }
}
