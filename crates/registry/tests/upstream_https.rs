//! Pull-through from a Docker-Hub-like upstream: HTTPS with its own CA, a Bearer token
//! server (`WWW-Authenticate: Bearer realm=...`) that wants Basic credentials, and blob
//! downloads redirected to another origin (a "CDN") that must not get the credentials.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use aloft_registry::{EgressPolicy, PullClient, UpstreamConfig};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use common::{Http, TestRegistry};
use http::{HeaderValue, StatusCode, header};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tower::ServiceExt;

#[derive(Clone)]
struct Hub {
    /// The real registry behind the imitation.
    backend: axum::Router,
    /// `https://localhost:PORT`
    base: String,
    /// `https://127.0.0.1:PORT` (a different origin for redirects)
    cdn: String,
    log: Arc<Mutex<Vec<String>>>,
}

const HUB_BEARER: &str = "Bearer hub-issued-token";

async fn token(State(hub): State<Hub>, req: Request) -> Response {
    let auth = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    hub.log.lock().expect("log").push(format!(
        "token {} {}",
        req.uri().query().unwrap_or_default(),
        auth
    ));
    let expected = format!("Basic {}", b64("hub-user:hub-pass"));
    if auth != expected {
        return (StatusCode::UNAUTHORIZED, "bad credentials").into_response();
    }
    axum::Json(serde_json::json!({"token": "hub-issued-token"})).into_response()
}

async fn v2(State(hub): State<Hub>, mut req: Request) -> Response {
    let path = req.uri().path().to_string();
    let auth = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    hub.log
        .lock()
        .expect("log")
        .push(format!("{} {path} {auth}", req.method()));
    if auth != HUB_BEARER {
        let repo = path
            .trim_start_matches("/v2/")
            .split("/manifests/")
            .next()
            .unwrap_or_default()
            .split("/blobs/")
            .next()
            .unwrap_or_default()
            .to_string();
        let challenge = format!(
            "Bearer realm=\"{}/token\",service=\"hub.test\",scope=\"repository:{repo}:pull\"",
            hub.base
        );
        let mut resp = (StatusCode::UNAUTHORIZED, "{}").into_response();
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_str(&challenge).expect("header"),
        );
        return resp;
    }
    if path.contains("/blobs/") && req.method() == http::Method::GET {
        // Blobs live on the "CDN".
        let loc = format!("{}/cdn{}", hub.cdn, path);
        let mut resp = StatusCode::TEMPORARY_REDIRECT.into_response();
        resp.headers_mut().insert(
            header::LOCATION,
            HeaderValue::from_str(&loc).expect("header"),
        );
        return resp;
    }
    req.headers_mut().insert(
        header::AUTHORIZATION,
        HeaderValue::from_static("Bearer admin"),
    );
    hub.backend
        .clone()
        .oneshot(req)
        .await
        .unwrap_or_else(|e| match e {})
}

async fn cdn(State(hub): State<Hub>, req: Request) -> Response {
    let path = req.uri().path().trim_start_matches("/cdn").to_string();
    let auth = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    hub.log
        .lock()
        .expect("log")
        .push(format!("cdn {path} {auth}"));
    let fwd = Request::builder()
        .uri(path)
        .header(header::AUTHORIZATION, "Bearer admin")
        .body(Body::empty())
        .expect("request");
    hub.backend
        .clone()
        .oneshot(fwd)
        .await
        .unwrap_or_else(|e| match e {})
}

fn b64(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// Serves `app` over TLS on 127.0.0.1 with a fresh self-signed certificate for
/// `localhost` and `127.0.0.1`. Returns the port and the certificate (PEM).
async fn serve_tls(app: impl FnOnce(u16) -> axum::Router) -> (u16, String) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
        .expect("certificate");
    let cert_pem = ck.cert.pem();
    let key = rustls_pki_types::PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(vec![ck.cert.der().clone()], key)
    .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let app = app(port);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, app) = (acceptor.clone(), app.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper_util::service::TowerToHyperService::new(app);
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (port, cert_pem)
}

#[tokio::test]
async fn pull_through_https_bearer_upstream_with_cdn_redirects() {
    let real = TestRegistry::start().await;
    let rh = Http::new(&real.url());
    let (md, _, _, layers) = rh
        .push_image(
            "library/debian",
            "bookworm-slim",
            "admin",
            &[b"debian rootfs"],
        )
        .await;

    let log = Arc::new(Mutex::new(Vec::new()));
    let hub_log_handle = log.clone();
    let backend = real.registry.router();
    let log2 = log.clone();
    let (port, ca_pem) = serve_tls(move |port| {
        let hub = Hub {
            backend,
            base: format!("https://localhost:{port}"),
            cdn: format!("https://127.0.0.1:{port}"),
            log: log2,
        };
        axum::Router::new()
            .route("/token", get(token))
            .route("/v2/{*rest}", any(v2))
            .route("/cdn/{*rest}", any(cdn))
            .with_state(hub)
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().join("hub-ca.pem");
    std::fs::write(&ca, &ca_pem).expect("ca");

    // Without the CA the upstream is not trusted.
    let untrusted = PullClient::new(&format!("https://localhost:{port}"), None);
    assert!(
        untrusted
            .manifest("library/debian:bookworm-slim")
            .await
            .is_err()
    );
    // With it, the client speaks to the hub directly (token dance, redirects).
    // The CDN is on loopback too: only allowed because it is named, as an operator
    // would name it.
    let cdn = format!("https://127.0.0.1:{port}");
    let direct =
        PullClient::with_basic_auth(&format!("https://localhost:{port}"), "hub-user", "hub-pass")
            .with_extra_root_certificates(ca_pem.as_bytes())
            .expect("ca")
            .with_egress(
                EgressPolicy::public_only()
                    .trust(&format!("https://localhost:{port}"))
                    .trust(&cdn),
            );
    let m = direct
        .manifest("library/debian:bookworm-slim")
        .await
        .expect("direct pull");
    assert_eq!(m.digest, md);

    let mut cfg = UpstreamConfig::new(format!("https://localhost:{port}"), "dockerhub");
    cfg.username = Some("hub-user".into());
    cfg.password = Some("hub-pass".into());
    cfg.ca_file = Some(ca);
    cfg.tag_ttl = Duration::from_secs(60);
    let mut cfg_without_cdn = cfg.clone();
    cfg.trusted_origins = vec![cdn.clone()];
    let local = TestRegistry::start_with(Some(cfg)).await;
    log.lock().expect("log").clear();

    // What buildah does for `FROM debian:bookworm-slim` with a mirror at
    // `<registry>/dockerhub`: pull dockerhub/library/debian:bookworm-slim here.
    let c = PullClient::new(&local.url(), Some("admin".into()));
    let m = c
        .manifest("dockerhub/library/debian:bookworm-slim")
        .await
        .expect("pull-through");
    assert_eq!(m.digest, md);
    let bytes = c
        .blob_bytes("dockerhub/library/debian", &layers[0])
        .await
        .expect("layer through the CDN");
    assert_eq!(&bytes[..], b"debian rootfs");

    let log = log.lock().expect("log").clone();
    let token_calls: Vec<&String> = log.iter().filter(|l| l.starts_with("token ")).collect();
    assert!(!token_calls.is_empty(), "{log:#?}");
    assert!(
        token_calls[0].contains("scope=repository%3Alibrary%2Fdebian%3Apull")
            && token_calls[0].contains("service=hub.test"),
        "{log:#?}"
    );
    assert!(
        log.iter().any(|l| l
            .starts_with("GET /v2/library/debian/manifests/bookworm-slim Bearer hub-issued-token")),
        "{log:#?}"
    );
    let cdn_calls: Vec<&String> = log.iter().filter(|l| l.starts_with("cdn ")).collect();
    assert_eq!(cdn_calls.len(), 1, "{log:#?}");
    assert!(
        cdn_calls[0].trim_end().ends_with(&layers[0]),
        "the CDN gets no credentials: {log:#?}"
    );

    // An upstream that redirects to an address the operator did not name (here a
    // loopback one, as a redirect to 169.254.169.254 or a private LAN would be): refused
    // before any connection is made.
    cfg_without_cdn.trusted_origins.clear();
    let strict = TestRegistry::start_with(Some(cfg_without_cdn)).await;
    let hub_log = hub_log_handle;
    hub_log.lock().expect("log").clear();
    let c = PullClient::new(&strict.url(), Some("admin".into()));
    let refused = c
        .blob_bytes("dockerhub/library/debian", &layers[0])
        .await
        .expect_err("a redirect to a loopback origin is refused");
    assert!(
        refused
            .to_string()
            .contains("refusing to connect to 127.0.0.1"),
        "{refused}"
    );
    let log = hub_log.lock().expect("log").clone();
    assert!(
        !log.iter().any(|l| l.starts_with("cdn ")),
        "the CDN was never reached: {log:#?}"
    );
}

/// An upstream's error body reaches the registry's clients only as a short summary: no
/// control characters (terminal escapes, forged log lines), at most 200 characters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_error_bodies_are_summarised() {
    let hostile =
        "first line\n\u{1b}[31mforged: log line\r\n".to_string() + &"internal detail ".repeat(500);
    let app = axum::Router::new().fallback(any(move || {
        let body = hostile.clone();
        async move { (StatusCode::INTERNAL_SERVER_ERROR, body) }
    }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let upstream = format!("http://{}", listener.local_addr().expect("address"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    let local = TestRegistry::start_with(Some(UpstreamConfig::new(upstream, "up"))).await;
    let resp = Http::new(&local.url())
        .get("/v2/up/library/x/manifests/v1", Some("admin"))
        .await;
    let body = String::from_utf8_lossy(&resp.body).into_owned();
    let message = resp.json()["errors"][0]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(message.contains("first line"), "{body}");
    assert!(
        !message.chars().any(char::is_control) && !body.contains("\\u001b"),
        "no control characters: {body}"
    );
    assert!(
        message.chars().count() <= 260,
        "a short summary, not the whole body ({} chars): {message}",
        message.chars().count()
    );
}
