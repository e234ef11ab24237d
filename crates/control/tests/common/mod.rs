//! A control plane on a loopback port with an agent that runs nothing, for API tests.

#![allow(dead_code)]

use std::sync::Arc;

use aloft_client::Client;
use aloft_control::{ControlConfig, ControlPlane};
use aloft_fake_agent::FakeAgent;
use bytes::Bytes;
use http::{Method, StatusCode};
use serde_json::Value;

pub struct Harness {
    pub url: String,
    pub agent_url: String,
    pub admin: Client,
    pub host: Client,
    pub admin_token: String,
    pub plane: Arc<ControlPlane>,
    pub agent: Arc<FakeAgent>,
    pub dir: tempfile::TempDir,
}

pub async fn start() -> Harness {
    let dir = tempfile::tempdir().expect("temp dir");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("address");
    let (plane, credentials) = ControlPlane::open(ControlConfig {
        data_dir: dir.path().to_path_buf(),
        listen: addr,
        region: "iad".into(),
        base_domain: "localhost".into(),
        proxy_http_port: 8080,
        database_url: None,
        acme: false,
        registry_upstream: None,
        allowed_private_registries: Vec::new(),
    })
    .expect("opening the control plane");
    tokio::spawn(plane.clone().serve(listener, std::future::pending()));
    let url = format!("http://{addr}");
    let (agent_url, agent) = FakeAgent::spawn().await.expect("fake agent");
    let host = Client::new(
        &url,
        Some(plane.host_token_for("h1").expect("minting h1's token")),
    );
    host.call(
        Method::POST,
        "/v1/hosts",
        Some(&serde_json::json!({ "id": "h1", "region": "iad", "agent_url": agent_url })),
    )
    .await
    .expect("registering the fake agent");
    keep_alive(host.clone(), "h1");
    Harness {
        agent_url,
        admin: Client::new(&url, Some(credentials.admin_token.clone())),
        host,
        admin_token: credentials.admin_token,
        url,
        plane,
        agent,
        dir,
    }
}

impl Harness {
    pub fn client(&self, token: &str) -> Client {
        Client::new(&self.url, Some(token.to_string()))
    }

    /// A client with host `id`'s own token.
    pub fn host_client(&self, id: &str) -> Client {
        self.client(&self.plane.host_token_for(id).expect("minting a host token"))
    }

    /// Registers another host (the same fake agent) in `region`, with its own token.
    pub async fn add_host(&self, id: &str, region: &str) {
        self.host_client(id)
            .call(
                Method::POST,
                "/v1/hosts",
                Some(
                    &serde_json::json!({ "id": id, "region": region, "agent_url": self.agent_url }),
                ),
            )
            .await
            .expect("registering a host");
        keep_alive(self.host_client(id), id);
    }

    pub fn anonymous(&self) -> Client {
        Client::new(&self.url, None)
    }
}

/// Heartbeats for host `id` as its agent would, every 2 s, for as long as the test runs
/// (a host that stops heartbeating is down and gets no machines).
pub fn keep_alive(client: Client, id: &str) {
    let path = format!("/v1/hosts/{id}/heartbeat");
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            let beat = serde_json::json!({ "time": chrono::Utc::now().to_rfc3339() });
            let _ = client.call(Method::POST, &path, Some(&beat)).await;
        }
    });
}

/// Sends a request and returns the status and the body as JSON (Null when empty).
pub async fn send(
    client: &Client,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    send_with(
        client,
        method,
        path,
        body.map(|b| b.to_string().into_bytes()),
        &[],
    )
    .await
}

pub async fn send_with(
    client: &Client,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
    headers: &[(&str, &str)],
) -> (StatusCode, Value) {
    let (status, bytes): (StatusCode, Bytes) = client
        .raw(method, path, body, headers)
        .await
        .expect("request");
    let value = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
    };
    (status, value)
}

pub async fn create_app(client: &Client, name: &str) {
    let (status, body) = send(
        client,
        Method::POST,
        "/v1/apps",
        Some(serde_json::json!({ "app_name": name, "org_slug": "personal" })),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
}

pub async fn create_machine(client: &Client, app: &str, body: Value) -> Value {
    let (status, machine) = send(
        client,
        Method::POST,
        &format!("/v1/apps/{app}/machines"),
        Some(body),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{machine}");
    machine
}
