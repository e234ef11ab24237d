//! Backends (a machine's `private_ipv4:internal_port`) and their pooled connections.
//!
//! Each backend keeps its own small stack of idle HTTP/1.1 connections (LIFO, so the
//! warmest connection is reused and surplus ones age out) and, for `h2_backend`, one shared
//! HTTP/2 connection. The lock of a backend is held only to push or pop a connection; there
//! is no global lock. A connection goes back to the pool only when the response body it
//! carried has been read to its end.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::body::ReqBody;

/// How backends connect and keep connections.
#[derive(Clone, Debug)]
pub struct PoolSettings {
    /// An idle pooled connection older than this is not reused.
    pub idle_timeout: Duration,
    /// Idle connections kept per backend.
    pub max_idle: usize,
    pub connect_timeout: Duration,
}

impl Default for PoolSettings {
    fn default() -> Self {
        PoolSettings {
            idle_timeout: Duration::from_secs(4),
            max_idle: 512,
            connect_timeout: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("connect to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("connect to {0}: timed out")]
    ConnectTimeout(SocketAddr),
    #[error("backend {addr}: {source}")]
    Http {
        addr: SocketAddr,
        source: hyper::Error,
    },
    /// The request was (maybe) sent, and no response head came back.
    #[error("backend {addr}: no response: {source}")]
    NoResponse {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("backend {0}: not a valid HTTP/1.1 response")]
    InvalidResponse(SocketAddr),
}

impl BackendError {
    /// Whether nothing reached the app (the request may be retried elsewhere).
    pub fn is_connect(&self) -> bool {
        matches!(
            self,
            BackendError::Connect { .. } | BackendError::ConnectTimeout(_)
        )
    }

    /// Whether the request may go to another machine: nothing reached the app, or the
    /// request is idempotent and no response came back.
    pub fn may_retry(&self, idempotent: bool) -> bool {
        self.is_connect()
            || (idempotent
                && matches!(
                    self,
                    BackendError::Http { .. } | BackendError::NoResponse { .. }
                ))
    }
}

struct Idle {
    sender: http1::SendRequest<ReqBody>,
    since: Instant,
}

/// How the proxy reaches a backend.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Route {
    /// The machine runs on this host: connect to its address.
    Direct,
    /// The machine runs on another host: through that host's backhaul listener.
    Backhaul { worker: SocketAddr, app: String },
}

/// One backend address of one machine.
pub struct Backend {
    /// The machine's `private_ipv4:internal_port` (on its own host).
    pub addr: SocketAddr,
    pub machine_id: String,
    pub route: Route,
    /// Requests (or connections) in flight to this backend from this proxy.
    load: AtomicU32,
    /// Requests in flight to this backend from other hosts' proxies (`load_share`).
    shared: AtomicU32,
    /// The machine's host does not answer over the backhaul (`load_share`).
    unreachable: AtomicBool,
    idle: Mutex<Vec<Idle>>,
    /// Idle raw connections of the fast path (LIFO).
    raw_idle: Mutex<Vec<crate::raw::IdleStream>>,
    h2: tokio::sync::Mutex<Option<http2::SendRequest<ReqBody>>>,
    retired: AtomicBool,
    settings: PoolSettings,
    /// Open connections to this backend (pooled or in use).
    open: Arc<AtomicUsize>,
}

impl Backend {
    pub fn new(addr: SocketAddr, machine_id: String, settings: PoolSettings) -> Self {
        Backend {
            addr,
            machine_id,
            route: Route::Direct,
            load: AtomicU32::new(0),
            shared: AtomicU32::new(0),
            unreachable: AtomicBool::new(false),
            idle: Mutex::new(Vec::new()),
            raw_idle: Mutex::new(Vec::new()),
            h2: tokio::sync::Mutex::new(None),
            retired: AtomicBool::new(false),
            settings,
            open: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// The same backend, reached by `route`.
    pub fn with_route(mut self, route: Route) -> Self {
        self.route = route;
        self
    }

    /// Whether the machine runs on this host.
    pub fn is_direct(&self) -> bool {
        self.route == Route::Direct
    }

    /// Requests in flight to this backend, from every proxy.
    pub fn load(&self) -> u32 {
        self.own_load().saturating_add(self.shared_load())
    }

    /// Requests in flight to this backend from this proxy.
    pub fn own_load(&self) -> u32 {
        self.load.load(Ordering::Relaxed)
    }

    /// Requests in flight to this backend from other hosts' proxies, as last shared.
    pub fn shared_load(&self) -> u32 {
        self.shared.load(Ordering::Relaxed)
    }

    pub fn set_shared(&self, load: u32) {
        self.shared.store(load, Ordering::Relaxed);
    }

    /// Whether requests may go to this backend (its host answers).
    pub fn is_reachable(&self) -> bool {
        !self.unreachable.load(Ordering::Relaxed)
    }

    /// Records whether the backend's host answers; true when it answers again after not
    /// answering.
    pub fn set_reachable(&self, reachable: bool) -> bool {
        self.unreachable.swap(!reachable, Ordering::Relaxed) && reachable
    }

    /// Counts one more request/connection on this backend until the guard drops.
    pub fn acquire(self: &Arc<Self>, released: Arc<Released>) -> LoadGuard {
        self.load.fetch_add(1, Ordering::Relaxed);
        LoadGuard {
            backend: self.clone(),
            released,
        }
    }

    /// Takes a slot only when the backend is below `hard_limit` (atomically).
    pub fn try_acquire(
        self: &Arc<Self>,
        hard_limit: u32,
        released: &Arc<Released>,
    ) -> Option<LoadGuard> {
        let mut current = self.load.load(Ordering::Relaxed);
        loop {
            if current.saturating_add(self.shared_load()) >= hard_limit {
                return None;
            }
            match self.load.compare_exchange_weak(
                current,
                current + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    return Some(LoadGuard {
                        backend: self.clone(),
                        released: released.clone(),
                    });
                }
                Err(now) => current = now,
            }
        }
    }

    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// The machine went away: close idle connections; in-use ones finish normally.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Release);
        self.lock_idle().clear();
        self.lock_raw().clear();
    }

    pub(crate) fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }

    pub(crate) fn settings(&self) -> &PoolSettings {
        &self.settings
    }

    fn lock_idle(&self) -> std::sync::MutexGuard<'_, Vec<Idle>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn lock_raw(&self) -> std::sync::MutexGuard<'_, Vec<crate::raw::IdleStream>> {
        self.raw_idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn pop_idle(&self) -> Option<http1::SendRequest<ReqBody>> {
        let mut idle = self.lock_idle();
        while let Some(entry) = idle.pop() {
            if entry.since.elapsed() < self.settings.idle_timeout && !entry.sender.is_closed() {
                return Some(entry.sender);
            }
        }
        None
    }

    /// Closes pooled connections idle for longer than the idle timeout.
    pub fn expire_idle(&self) {
        let mut idle = self.lock_idle();
        let timeout = self.settings.idle_timeout;
        idle.retain(|e| e.since.elapsed() < timeout && !e.sender.is_closed());
        drop(idle);
        self.lock_raw().retain(|e| e.since.elapsed() < timeout);
    }

    fn push_idle(&self, sender: http1::SendRequest<ReqBody>) {
        if self.retired.load(Ordering::Acquire) || sender.is_closed() {
            return;
        }
        let mut idle = self.lock_idle();
        let now = Instant::now();
        // Age out the oldest entries (at the bottom of the stack).
        let expired = idle
            .iter()
            .take_while(|e| now.duration_since(e.since) >= self.settings.idle_timeout)
            .count();
        if expired > 0 {
            idle.drain(..expired);
        }
        if idle.len() >= self.settings.max_idle {
            idle.remove(0);
        }
        idle.push(Idle { sender, since: now });
    }

    async fn connect_tcp(&self) -> Result<TcpStream, BackendError> {
        if let Route::Backhaul { worker, app } = &self.route {
            let port = self.addr.port();
            let timeout = self.settings.connect_timeout;
            return crate::backhaul::dial(*worker, app, &self.machine_id, port, timeout)
                .await
                .map_err(|source| match source.kind() {
                    std::io::ErrorKind::TimedOut => BackendError::ConnectTimeout(*worker),
                    _ => BackendError::Connect {
                        addr: *worker,
                        source,
                    },
                });
        }
        let addr = self.addr;
        let stream = tokio::time::timeout(self.settings.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| BackendError::ConnectTimeout(addr))?
            .map_err(|source| BackendError::Connect { addr, source })?;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    async fn connect_h1(
        &self,
        upgrades: bool,
    ) -> Result<http1::SendRequest<ReqBody>, BackendError> {
        let addr = self.addr;
        let stream = self.connect_tcp().await?;
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|source| BackendError::Http { addr, source })?;
        let open = self.open.clone();
        open.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            let result = if upgrades {
                conn.with_upgrades().await
            } else {
                conn.await
            };
            if let Err(e) = result {
                tracing::debug!(%addr, error = %e, "backend connection ended");
            }
            open.fetch_sub(1, Ordering::Relaxed);
        });
        Ok(sender)
    }

    /// Sends a request over HTTP/1.1, reusing a pooled connection when one is idle. A
    /// request that a stale pooled connection refused unsent is retried on a fresh one.
    pub async fn send_h1(
        self: &Arc<Self>,
        req: Request<ReqBody>,
    ) -> Result<(Response<Incoming>, PooledH1), BackendError> {
        let addr = self.addr;
        let mut req = req;
        // A few stale pooled connections at most, then a fresh one.
        for _ in 0..4 {
            let Some(mut sender) = self.pop_idle() else {
                break;
            };
            if sender.ready().await.is_err() {
                continue;
            }
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    return Ok((
                        resp,
                        PooledH1 {
                            backend: self.clone(),
                            sender: Some(sender),
                        },
                    ));
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) => req = unsent,
                    None => {
                        return Err(BackendError::Http {
                            addr,
                            source: e.into_error(),
                        });
                    }
                },
            }
        }
        // (Boxed: the connect path is rare and large; keep the common future small.)
        let mut sender = Box::pin(self.connect_h1(false)).await?;
        sender
            .ready()
            .await
            .map_err(|source| BackendError::Http { addr, source })?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|source| BackendError::Http { addr, source })?;
        Ok((
            resp,
            PooledH1 {
                backend: self.clone(),
                sender: Some(sender),
            },
        ))
    }

    /// Sends a request on a connection of its own that may be upgraded (WebSocket).
    pub async fn send_upgrade(
        &self,
        req: Request<ReqBody>,
    ) -> Result<Response<Incoming>, BackendError> {
        let addr = self.addr;
        let mut sender = self.connect_h1(true).await?;
        sender
            .ready()
            .await
            .map_err(|source| BackendError::Http { addr, source })?;
        sender
            .send_request(req)
            .await
            .map_err(|source| BackendError::Http { addr, source })
    }

    /// Sends a request over the backend's shared HTTP/2 (h2c, prior knowledge) connection.
    pub async fn send_h2(&self, req: Request<ReqBody>) -> Result<Response<Incoming>, BackendError> {
        let addr = self.addr;
        let mut sender = {
            let mut slot = self.h2.lock().await;
            match slot.as_ref() {
                Some(sender) if !sender.is_closed() => sender.clone(),
                _ => {
                    let stream = self.connect_tcp().await?;
                    let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                        .timer(TokioTimer::new())
                        .handshake(TokioIo::new(stream))
                        .await
                        .map_err(|source| BackendError::Http { addr, source })?;
                    let open = self.open.clone();
                    open.fetch_add(1, Ordering::Relaxed);
                    tokio::spawn(async move {
                        if let Err(e) = conn.await {
                            tracing::debug!(%addr, error = %e, "backend h2 connection ended");
                        }
                        open.fetch_sub(1, Ordering::Relaxed);
                    });
                    *slot = Some(sender.clone());
                    sender
                }
            }
        };
        sender
            .ready()
            .await
            .map_err(|source| BackendError::Http { addr, source })?;
        sender
            .send_request(req)
            .await
            .map_err(|source| BackendError::Http { addr, source })
    }

    /// Opens a raw TCP connection (passthrough handlers).
    pub async fn connect_raw(&self) -> Result<TcpStream, BackendError> {
        self.connect_tcp().await
    }
}

/// A pooled HTTP/1.1 connection lent to one request; it goes back to its backend's pool
/// when the response body has been read to its end, and is closed otherwise.
pub struct PooledH1 {
    backend: Arc<Backend>,
    sender: Option<http1::SendRequest<ReqBody>>,
}

impl PooledH1 {
    pub fn release(mut self, complete: bool) {
        if let Some(sender) = self.sender.take()
            && complete
        {
            self.backend.push_idle(sender);
        }
    }
}

/// Wakes requests queued because every machine was at its hard limit.
#[derive(Default)]
pub struct Released {
    pub notify: Notify,
    pub waiters: AtomicUsize,
}

/// One unit of load on a backend, given back on drop.
pub struct LoadGuard {
    backend: Arc<Backend>,
    released: Arc<Released>,
}

impl LoadGuard {
    pub fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }
}

impl Drop for LoadGuard {
    fn drop(&mut self) {
        self.backend.load.fetch_sub(1, Ordering::Relaxed);
        if self.released.waiters.load(Ordering::Relaxed) > 0 {
            self.released.notify.notify_waiters();
        }
    }
}
