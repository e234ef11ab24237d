//! Test harness: real backends (small hyper servers), a real proxy on ephemeral ports, and
//! catalog entries pointing at the backends.
#![allow(dead_code)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use aloft_api::internal::{CatalogApp, CatalogMachine, CatalogUpdate};
use aloft_api::{MachinePort, MachineService, MachineState, ServiceConcurrency};
use aloft_proxy::{Proxy, ProxyConfig};
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

pub type Handler = Arc<
    dyn Fn(
            Request<Incoming>,
        ) -> std::pin::Pin<Box<dyn Future<Output = Response<Full<Bytes>>> + Send>>
        + Send
        + Sync,
>;

/// A backend: an HTTP/1.1 (and h2c) server on 127.0.0.1 with a handler.
pub struct Backend {
    pub addr: SocketAddr,
    pub connections: Arc<AtomicUsize>,
    pub requests: Arc<AtomicUsize>,
    _stop: oneshot::Sender<()>,
}

pub fn handler<F, Fut>(f: F) -> Handler
where
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    Arc::new(move |req| Box::pin(f(req)))
}

/// A handler answering with the request (method, path, headers) as JSON.
pub fn echo(name: &'static str) -> Handler {
    handler(move |req: Request<Incoming>| async move {
        let mut headers = serde_json::Map::new();
        for (k, v) in req.headers() {
            let entry = headers
                .entry(k.as_str().to_string())
                .or_insert(serde_json::Value::Array(vec![]));
            if let serde_json::Value::Array(list) = entry {
                list.push(serde_json::Value::String(
                    v.to_str().unwrap_or("").to_string(),
                ));
            }
        }
        let method = req.method().to_string();
        let path = req.uri().to_string();
        let version = format!("{:?}", req.version());
        let body = req
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let json = serde_json::json!({
            "backend": name, "method": method, "path": path, "version": version,
            "headers": headers, "body": String::from_utf8_lossy(&body),
        });
        Response::builder()
            .header("content-type", "application/json")
            .header("x-backend", name)
            .body(Full::new(Bytes::from(json.to_string())))
            .unwrap()
    })
}

pub async fn backend(handler: Handler) -> Backend {
    backend_on("127.0.0.1:0".parse().unwrap(), handler).await
}

pub async fn backend_on(addr: SocketAddr, handler: Handler) -> Backend {
    let listener = TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let requests = Arc::new(AtomicUsize::new(0));
    let (stop_tx, mut stop_rx) = oneshot::channel::<()>();
    let (c, r) = (connections.clone(), requests.clone());
    tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                _ = &mut stop_rx => break,
                accepted = listener.accept() => match accepted { Ok(a) => a, Err(_) => continue },
            };
            c.fetch_add(1, Ordering::SeqCst);
            let handler = handler.clone();
            let r = r.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    r.fetch_add(1, Ordering::SeqCst);
                    let handler = handler.clone();
                    async move { Ok::<_, Infallible>(handler(req).await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Backend {
        addr,
        connections,
        requests,
        _stop: stop_tx,
    }
}

pub fn http_service(internal_port: u16) -> MachineService {
    MachineService {
        protocol: "tcp".into(),
        internal_port,
        ports: vec![
            MachinePort {
                port: Some(80),
                handlers: vec!["http".into()],
                ..MachinePort::default()
            },
            MachinePort {
                port: Some(443),
                handlers: vec!["tls".into(), "http".into()],
                ..MachinePort::default()
            },
        ],
        concurrency: Some(ServiceConcurrency {
            kind: "requests".into(),
            soft_limit: 20,
            hard_limit: 25,
        }),
        ..MachineService::default()
    }
}

pub fn app(name: &str) -> CatalogApp {
    CatalogApp {
        name: name.into(),
        org: "personal".into(),
        network: "default".into(),
        hostnames: vec![],
        ..CatalogApp::default()
    }
}

pub fn machine(
    id: &str,
    app: &str,
    region: &str,
    addr: SocketAddr,
    state: MachineState,
) -> CatalogMachine {
    machine_with(
        id,
        app,
        region,
        addr,
        state,
        vec![http_service(addr.port())],
    )
}

pub fn machine_with(
    id: &str,
    app: &str,
    region: &str,
    addr: SocketAddr,
    state: MachineState,
    services: Vec<MachineService>,
) -> CatalogMachine {
    CatalogMachine {
        id: id.into(),
        app: app.into(),
        state,
        region: region.into(),
        host: "h1".into(),
        instance_id: format!("inst-{id}"),
        process_group: Some("app".into()),
        private_ipv4: Some(addr.ip().to_string()),
        private_ip: None,
        services,
        checks: Vec::new(),
        statics: Vec::new(),
    }
}

pub fn snapshot(seq: u64, apps: Vec<CatalogApp>, machines: Vec<CatalogMachine>) -> CatalogUpdate {
    CatalogUpdate::Snapshot {
        seq,
        apps,
        machines,
    }
}

pub fn config() -> ProxyConfig {
    ProxyConfig {
        http_listen: "127.0.0.1:0".parse().unwrap(),
        region: "ams".into(),
        base_domain: "aloft.test".into(),
        control_url: "http://127.0.0.1:1".into(),
        token: "proxy-token".into(),
        machine_wait: Duration::from_millis(500),
        service_listeners: false,
        drain_timeout: Duration::from_secs(5),
        // Every "region" is on this machine: tests inject RTTs instead.
        rtt_probe_interval: None,
        ..ProxyConfig::default()
    }
}

/// A running proxy and the way to stop it.
pub struct Running {
    pub proxy: Arc<Proxy>,
    pub http: SocketAddr,
    pub https: Option<SocketAddr>,
    pub metrics: Option<SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
    pub task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Running {
    /// Triggers shutdown and waits for `serve` to return.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }
    pub fn begin_shutdown(&mut self) -> tokio::task::JoinHandle<anyhow::Result<()>> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.take().unwrap()
    }
}

pub async fn start(config: ProxyConfig) -> Running {
    let proxy = Proxy::new(config);
    let addrs = proxy.bind().await.unwrap();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let task = tokio::spawn(proxy.clone().serve(async move {
        let _ = stop_rx.await;
    }));
    Running {
        proxy,
        http: addrs.http.unwrap(),
        https: addrs.https,
        metrics: addrs.metrics,
        stop: Some(stop_tx),
        task: Some(task),
    }
}

/// A client of the proxy.
pub type TestClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
>;

/// A plain HTTP/1.1 client (keep-alive pool) of the proxy.
pub fn client() -> TestClient {
    hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http()
}

pub struct Reply {
    pub status: u16,
    pub version: http::Version,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|_| panic!("not json: {:?}", self.body))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).to_string()
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

pub async fn get(proxy: SocketAddr, host: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
    send(proxy, "GET", host, path, headers, Bytes::new()).await
}

/// The status of a GET, or None when the connection is refused or cut (a proxy at its
/// connection limit).
pub async fn try_status(proxy: SocketAddr, host: &str, path: &str) -> Option<u16> {
    let req = Request::builder()
        .uri(format!("http://{proxy}{path}"))
        .header("host", host)
        .body(Full::new(Bytes::new()))
        .ok()?;
    let resp = client().request(req).await.ok()?;
    Some(resp.status().as_u16())
}

pub async fn send(
    proxy: SocketAddr,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Reply {
    send_via(&client(), proxy, method, host, path, headers, body).await
}

/// A client of the proxy speaking HTTP/2 only (prior knowledge, one connection).
pub fn h2_client() -> TestClient {
    hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// A request through `client`, whichever HTTP version it speaks.
pub async fn send_via(
    client: &TestClient,
    proxy: SocketAddr,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Reply {
    let mut builder = Request::builder()
        .method(method)
        .uri(format!("http://{proxy}{path}"))
        .header("host", host);
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    let resp = client
        .request(builder.body(Full::new(body)).unwrap())
        .await
        .expect("request failed");
    let status = resp.status().as_u16();
    let version = resp.version();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        version,
        headers,
        body,
    }
}

/// Header value of an echoed request.
pub fn echoed<'a>(json: &'a serde_json::Value, name: &str) -> Option<&'a str> {
    json["headers"][name].as_array()?.first()?.as_str()
}

pub fn echoed_all(json: &serde_json::Value, name: &str) -> Vec<String> {
    json["headers"][name]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// An address nothing listens on.
pub async fn dead_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    addr
}

/// Polls `f` until it returns true (bounded; no timing assertion).
pub async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    for _ in 0..400 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("never happened: {what}");
}
