//! Shared helpers: a registry on an ephemeral loopback port, a test authorizer, and a raw
//! HTTP client.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;

use aloft_registry::{Action, AuthError, Authorizer, Registry, RegistryConfig, UpstreamConfig};
use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use sha2::{Digest as _, Sha256};

/// Tokens:
/// * `admin`: everything.
/// * `tok-a`: pull/push/delete `app-a` (and `app-a/...`).
/// * `tok-b`: pull/push/delete `org/app-b`.
/// * `reader-a`: pull `app-a` only.
/// * anything else, or none: unauthenticated.
pub struct TestAuth;

impl Authorizer for TestAuth {
    fn authorize(
        &self,
        token: Option<&str>,
        repository: &str,
        action: Action,
    ) -> Result<(), AuthError> {
        let owns =
            |prefix: &str| repository == prefix || repository.starts_with(&format!("{prefix}/"));
        match token {
            Some("admin") => Ok(()),
            Some("tok-a") if owns("app-a") => Ok(()),
            Some("tok-b") if owns("org/app-b") => Ok(()),
            Some("reader-a") if owns("app-a") && action == Action::Pull => Ok(()),
            Some("tok-a") | Some("tok-b") | Some("reader-a") => Err(AuthError::Denied),
            _ => Err(AuthError::Unauthenticated),
        }
    }
}

pub struct TestRegistry {
    pub addr: SocketAddr,
    pub registry: Arc<Registry>,
    pub dir: Arc<tempfile::TempDir>,
    upstream: Option<UpstreamConfig>,
    server: tokio::task::JoinHandle<()>,
}

impl TestRegistry {
    pub async fn start() -> TestRegistry {
        Self::start_with(None).await
    }

    pub async fn start_with(upstream: Option<UpstreamConfig>) -> TestRegistry {
        let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
        Self::start_in(dir, upstream).await
    }

    /// Stops this instance and starts a new one on the same storage (a restart).
    pub async fn restart(self) -> TestRegistry {
        self.stop();
        Self::start_in(self.dir.clone(), self.upstream.clone()).await
    }

    async fn start_in(
        dir: Arc<tempfile::TempDir>,
        upstream: Option<UpstreamConfig>,
    ) -> TestRegistry {
        let registry = Registry::open(
            RegistryConfig {
                root: dir.path().join("registry"),
                upstream: upstream.clone(),
            },
            Arc::new(TestAuth),
        )
        .expect("open registry");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let app = registry.router();
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        TestRegistry {
            addr,
            registry,
            dir,
            upstream,
            server,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn root(&self) -> std::path::PathBuf {
        self.dir.path().join("registry")
    }

    /// Stops serving (the storage stays).
    pub fn stop(&self) {
        self.server.abort();
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        self.server.abort();
    }
}

pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The `code` of the first distribution-spec error in the body.
    pub fn error_code(&self) -> String {
        self.json()["errors"][0]["code"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

pub struct Http {
    client: Client<HttpConnector, Full<Bytes>>,
    pub base: String,
}

impl Http {
    pub fn new(base: &str) -> Http {
        Http {
            client: Client::builder(TokioExecutor::new()).build_http(),
            base: base.to_string(),
        }
    }

    pub async fn send(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Resp {
        let url = if path.starts_with("http") {
            path.to_string()
        } else {
            format!("{}{}", self.base, path)
        };
        let mut b = Request::builder().method(method).uri(url);
        if let Some(t) = token {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let req = b.body(Full::new(body.into())).expect("request");
        let resp = self.client.request(req).await.expect("send request");
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp
            .into_body()
            .collect()
            .await
            .expect("read body")
            .to_bytes();
        Resp {
            status,
            headers,
            body,
        }
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> Resp {
        self.send(Method::GET, path, token, &[], Bytes::new()).await
    }

    pub async fn head(&self, path: &str, token: Option<&str>) -> Resp {
        self.send(Method::HEAD, path, token, &[], Bytes::new())
            .await
    }

    /// Monolithic upload in one POST; asserts 201. Returns the digest.
    pub async fn push_blob(&self, repo: &str, token: &str, data: &[u8]) -> String {
        let d = sha256(data);
        let r = self
            .send(
                Method::POST,
                &format!("/v2/{repo}/blobs/uploads/?digest={d}"),
                Some(token),
                &[("content-type", "application/octet-stream")],
                Bytes::copy_from_slice(data),
            )
            .await;
        assert_eq!(
            r.status,
            StatusCode::CREATED,
            "push blob: {}",
            String::from_utf8_lossy(&r.body)
        );
        d
    }

    /// PUT a manifest; asserts 201 and returns the digest.
    pub async fn push_manifest(
        &self,
        repo: &str,
        reference: &str,
        token: &str,
        media_type: &str,
        body: &str,
    ) -> String {
        let r = self
            .send(
                Method::PUT,
                &format!("/v2/{repo}/manifests/{reference}"),
                Some(token),
                &[("content-type", media_type)],
                body.to_string(),
            )
            .await;
        assert_eq!(
            r.status,
            StatusCode::CREATED,
            "push manifest: {}",
            String::from_utf8_lossy(&r.body)
        );
        let d = sha256(body.as_bytes());
        assert_eq!(r.header("docker-content-digest"), Some(d.as_str()));
        d
    }

    /// Pushes a config and the given layers and an OCI manifest tagged `tag`.
    /// Returns (manifest digest, manifest body, config digest, layer digests).
    pub async fn push_image(
        &self,
        repo: &str,
        tag: &str,
        token: &str,
        layers: &[&[u8]],
    ) -> (String, String, String, Vec<String>) {
        let config = format!(
            r#"{{"architecture":"amd64","os":"linux","rootfs":{{"type":"layers","diff_ids":[]}},"config":{{}},"x":"{repo}:{tag}"}}"#
        );
        let cd = self.push_blob(repo, token, config.as_bytes()).await;
        let mut lds = Vec::new();
        let mut descs = Vec::new();
        for l in layers {
            let d = self.push_blob(repo, token, l).await;
            descs.push(format!(
                r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{d}","size":{}}}"#,
                l.len()
            ));
            lds.push(d);
        }
        let manifest = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{cd}","size":{}}},"layers":[{}]}}"#,
            aloft_registry::OCI_MANIFEST,
            config.len(),
            descs.join(",")
        );
        let md = self
            .push_manifest(repo, tag, token, aloft_registry::OCI_MANIFEST, &manifest)
            .await;
        (md, manifest, cd, lds)
    }
}

pub fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}
