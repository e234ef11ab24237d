//! Certificates from an ACME CA: Pebble (Debian package) as the CA, pebble-challtestsrv as
//! its DNS (every name → 127.0.0.1), the proxy answering TLS-ALPN-01 or HTTP-01, then a
//! real TLS client (rustls, openssl s_client) checking the chain against Pebble's root.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aloft_api::MachineState;
use aloft_api::internal::CatalogUpdate;
use aloft_proxy::AcmeConfig;
use bytes::Bytes;
use common::*;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::{TcpListener, TcpStream};

struct Child(tokio::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.start_kill();
    }
}

async fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn free_udp_port() -> u16 {
    tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Pebble {
    _pebble: Child,
    _dns: Child,
    directory: String,
    management: SocketAddr,
    https_ca: std::path::PathBuf,
}

/// Starts pebble-challtestsrv (DNS only) and Pebble validating on `http_port`/`tls_port`.
async fn pebble(dir: &Path, http_port: u16, tls_port: u16) -> Pebble {
    // Pebble's own HTTPS certificate, from a throwaway CA.
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .unwrap()
            .signed_by(&leaf_key, &issuer)
            .unwrap();
    let https_ca = dir.join("pebble-https-ca.pem");
    std::fs::write(&https_ca, ca_cert.pem()).unwrap();
    std::fs::write(dir.join("pebble-cert.pem"), leaf.pem()).unwrap();
    std::fs::write(dir.join("pebble-key.pem"), leaf_key.serialize_pem()).unwrap();

    let (listen, mgmt, dns, dns_mgmt) = (
        free_port().await,
        free_port().await,
        free_udp_port().await,
        free_port().await,
    );
    let config = serde_json::json!({"pebble": {
        "listenAddress": format!("127.0.0.1:{listen}"),
        "managementListenAddress": format!("127.0.0.1:{mgmt}"),
        "certificate": dir.join("pebble-cert.pem"),
        "privateKey": dir.join("pebble-key.pem"),
        "httpPort": http_port,
        "tlsPort": tls_port,
        "ocspResponderURL": "",
        "externalAccountBindingRequired": false
    }});
    std::fs::write(dir.join("pebble.json"), config.to_string()).unwrap();
    let dns_child = tokio::process::Command::new("pebble-challtestsrv")
        .args([
            "-dns01",
            &format!("127.0.0.1:{dns}"),
            "-http01",
            "",
            "-https01",
            "",
            "-tlsalpn01",
            "",
        ])
        .args([
            "-management",
            &format!("127.0.0.1:{dns_mgmt}"),
            "-defaultIPv4",
            "127.0.0.1",
            "-defaultIPv6",
            "",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("pebble-challtestsrv (apt-get install pebble)");
    let pebble_child = tokio::process::Command::new("pebble")
        .args([
            "-config",
            dir.join("pebble.json").to_str().unwrap(),
            "-dnsserver",
            &format!("127.0.0.1:{dns}"),
        ])
        .env("PEBBLE_VA_NOSLEEP", "1")
        .env("PEBBLE_WFE_NONCEREJECT", "0")
        .env("PEBBLE_AUTHZREUSE", "0")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("pebble (apt-get install pebble)");
    for port in [listen, mgmt] {
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        eventually("pebble listening", || async move {
            TcpStream::connect(addr).await.is_ok()
        })
        .await;
    }
    Pebble {
        _pebble: Child(pebble_child),
        _dns: Child(dns_child),
        directory: format!("https://127.0.0.1:{listen}/dir"),
        management: format!("127.0.0.1:{mgmt}").parse().unwrap(),
        https_ca,
    }
}

impl Pebble {
    /// The root that signs the certificates Pebble issues.
    async fn issuing_root(&self, dir: &Path) -> std::path::PathBuf {
        let out = tokio::process::Command::new("curl")
            // (The management API presents its own self-signed certificate.)
            .args(["-sSk", &format!("https://{}/roots/0", self.management)])
            .output()
            .await
            .unwrap();
        let path = dir.join("pebble-root.pem");
        std::fs::write(&path, &out.stdout).unwrap();
        path
    }
}

/// A control plane that stores certificates the proxy obtained (and has none to give).
async fn cert_store() -> (SocketAddr, Arc<Mutex<Vec<(String, serde_json::Value)>>>) {
    cert_store_with(None).await
}

type StoredDoc = Arc<Mutex<Option<(String, serde_json::Value)>>>;

/// Like `cert_store`, also answering GET for one hostname with `stored`.
async fn cert_store_with(
    stored_cert: Option<(String, serde_json::Value)>,
) -> (SocketAddr, Arc<Mutex<Vec<(String, serde_json::Value)>>>) {
    cert_store_shared(Arc::new(Mutex::new(stored_cert))).await
}

/// A control plane whose stored certificate (for GET) the test can replace.
async fn cert_store_shared(
    stored_cert: StoredDoc,
) -> (SocketAddr, Arc<Mutex<Vec<(String, serde_json::Value)>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stored = Arc::new(Mutex::new(Vec::new()));
    let s = stored.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (s, stored_cert) = (s.clone(), stored_cert.clone());
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let (s, stored_cert) = (s.clone(), stored_cert.clone());
                    async move {
                        let path = req.uri().path().to_string();
                        let current = stored_cert.lock().unwrap().clone();
                        if req.method() == http::Method::GET
                            && let Some((host, doc)) = current
                            && path == format!("/v1/proxy/certificates/{host}")
                        {
                            return Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(
                                doc.to_string(),
                            ))));
                        }
                        let status = if req.method() == http::Method::PUT
                            && path.starts_with("/v1/proxy/certificates/")
                        {
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            s.lock()
                                .unwrap()
                                .push((path, serde_json::from_slice(&body).unwrap()));
                            200
                        } else {
                            404
                        };
                        Ok::<_, Infallible>(
                            Response::builder()
                                .status(status)
                                .body(Full::new(Bytes::from("{}")))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, stored)
}

async fn verify_with(root: &Path, addr: SocketAddr, host: &str) -> Result<(), String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(root).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    connector
        .connect(ServerName::try_from(host.to_string()).unwrap(), tcp)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

async fn run(prefer_http01: bool) {
    let dir = tempfile::tempdir().unwrap();
    let be = backend(echo("b1")).await;
    let (http_port, tls_port) = (free_port().await, free_port().await);
    let pebble = pebble(dir.path(), http_port, tls_port).await;
    let (control, stored) = cert_store().await;
    let mut cfg = config();
    cfg.http_listen = format!("127.0.0.1:{http_port}").parse().unwrap();
    cfg.https_listen = Some(format!("127.0.0.1:{tls_port}").parse().unwrap());
    cfg.self_signed_fallback = false;
    cfg.control_url = format!("http://{control}");
    cfg.acme = Some(AcmeConfig {
        directory_url: pebble.directory.clone(),
        contact: vec!["mailto:ops@aloft.test".into()],
        ca_root_pem: Some(pebble.https_ca.clone()),
        prefer_http01,
        retry_after: Duration::from_millis(200),
        ..AcmeConfig::default()
    });
    let proxy = start(cfg).await;
    let https = proxy.https.unwrap();
    let mut web = app("web");
    web.hostnames = vec!["web.aloft.test".into(), "www.example.com".into()];
    proxy.proxy.catalog().apply(snapshot(
        1,
        vec![web],
        vec![machine("m1", "web", "ams", be.addr, MachineState::Started)],
    ));

    let p = proxy.proxy.clone();
    for host in ["web.aloft.test", "www.example.com"] {
        let p = p.clone();
        eventually(&format!("certificate for {host}"), || {
            let p = p.clone();
            async move { p.catalog().has_certificate(host) }
        })
        .await;
    }
    let root = pebble.issuing_root(dir.path()).await;
    verify_with(&root, https, "web.aloft.test").await.unwrap();
    verify_with(&root, https, "www.example.com").await.unwrap();
    // SNI selects the certificate: openssl checks the chain and the name.
    let out = tokio::process::Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &https.to_string(),
            "-servername",
            "www.example.com",
            "-verify_hostname",
            "www.example.com",
        ])
        .args(["-CAfile", root.to_str().unwrap(), "-alpn", "h2,http/1.1"])
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Verify return code: 0 (ok)"), "{text}");
    assert!(text.contains("ALPN protocol: h2"), "{text}");
    // And the proxy stored what it obtained in the control plane (right after serving it).
    eventually("the certificate stored in the control plane", || {
        let stored = stored.lock().unwrap().clone();
        async move {
            stored.iter().any(|(path, doc)| {
                path == "/v1/proxy/certificates/web.aloft.test"
                    && doc["certificate"]
                        .as_str()
                        .unwrap()
                        .contains("BEGIN CERTIFICATE")
                    && doc["private_key"].as_str().unwrap().contains("PRIVATE KEY")
            })
        }
    })
    .await;

    // A removed hostname loses its certificate.
    let mut web = app("web");
    web.hostnames = vec!["web.aloft.test".into()];
    proxy
        .proxy
        .catalog()
        .apply(CatalogUpdate::App { seq: 2, app: web });
    let p2 = proxy.proxy.clone();
    eventually("certificate dropped", || {
        let p2 = p2.clone();
        async move { !p2.catalog().has_certificate("www.example.com") }
    })
    .await;
    assert!(verify_with(&root, https, "www.example.com").await.is_err());
    verify_with(&root, https, "web.aloft.test").await.unwrap();
    proxy.shutdown().await;
}

#[tokio::test]
async fn issues_certificates_with_tls_alpn_01() {
    run(false).await;
}

#[tokio::test]
async fn issues_certificates_with_http_01() {
    run(true).await;
}

/// (year, month, day) of a Unix day number (Howard Hinnant's civil-from-days).
fn civil(days: i64) -> (i32, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let year = (yoe + era * 400 + i64::from(month <= 2)) as i32;
    (year, month, day)
}

#[tokio::test]
async fn renews_a_stored_certificate_close_to_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let be = backend(echo("b1")).await;
    // The control plane holds a certificate (from some other CA) expiring in two days.
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let today = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / 86_400) as i64;
    let (y, m, d) = civil(today + 2);
    let (y0, m0, d0) = civil(today - 60);
    let mut leaf_params =
        rcgen::CertificateParams::new(vec!["web.aloft.test".to_string()]).unwrap();
    leaf_params.not_before = rcgen::date_time_ymd(y0, m0, d0);
    leaf_params.not_after = rcgen::date_time_ymd(y, m, d);
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();
    let doc = serde_json::json!({
        "hostname": "web.aloft.test",
        "certificate": format!("{}{}", leaf.pem(), ca_cert.pem()),
        "private_key": leaf_key.serialize_pem(),
    });
    let (control, stored) = cert_store_with(Some(("web.aloft.test".into(), doc))).await;

    let (http_port, tls_port) = (free_port().await, free_port().await);
    let pebble = pebble(dir.path(), http_port, tls_port).await;
    let mut cfg = config();
    cfg.http_listen = format!("127.0.0.1:{http_port}").parse().unwrap();
    cfg.https_listen = Some(format!("127.0.0.1:{tls_port}").parse().unwrap());
    cfg.self_signed_fallback = false;
    cfg.control_url = format!("http://{control}");
    cfg.acme = Some(AcmeConfig {
        directory_url: pebble.directory.clone(),
        ca_root_pem: Some(pebble.https_ca.clone()),
        retry_after: Duration::from_millis(200),
        ..AcmeConfig::default()
    });
    let proxy = start(cfg).await;
    let mut web = app("web");
    web.hostnames = vec!["web.aloft.test".into()];
    proxy.proxy.catalog().apply(snapshot(
        1,
        vec![web],
        vec![machine("m1", "web", "ams", be.addr, MachineState::Started)],
    ));
    let root = pebble.issuing_root(dir.path()).await;
    let https = proxy.https.unwrap();
    // Renewed from the ACME CA (the stored one had under 30 days left) and stored back.
    eventually("renewed certificate served", || {
        let root = root.clone();
        async move { verify_with(&root, https, "web.aloft.test").await.is_ok() }
    })
    .await;
    // Stored back right after it is served.
    eventually("the renewed certificate stored", || {
        let stored = stored.lock().unwrap().clone();
        async move {
            stored
                .iter()
                .any(|(p, _)| p == "/v1/proxy/certificates/web.aloft.test")
        }
    })
    .await;
    proxy.shutdown().await;
}

/// (CA PEM, stored-certificate document) for `host`, from a fresh CA.
fn ca_and_doc(host: &str) -> (String, serde_json::Value) {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec![host.to_string()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    let doc = serde_json::json!({
        "hostname": host,
        "certificate": format!("{}{}", leaf.pem(), ca_cert.pem()),
        "private_key": leaf_key.serialize_pem(),
    });
    (ca_cert.pem(), doc)
}

#[tokio::test]
async fn a_certificate_replaced_in_the_control_plane_is_served_after_the_app_is_republished() {
    let dir = tempfile::tempdir().unwrap();
    let be = backend(echo("b1")).await;
    let (ca1, doc1) = ca_and_doc("web.aloft.test");
    let (ca2, doc2) = ca_and_doc("web.aloft.test");
    let (ca1_path, ca2_path) = (dir.path().join("ca1.pem"), dir.path().join("ca2.pem"));
    std::fs::write(&ca1_path, ca1).unwrap();
    std::fs::write(&ca2_path, ca2).unwrap();
    let shared: StoredDoc = Arc::new(Mutex::new(Some(("web.aloft.test".into(), doc1))));
    let (control, _) = cert_store_shared(shared.clone()).await;
    let mut cfg = config();
    cfg.https_listen = Some("127.0.0.1:0".parse().unwrap());
    cfg.self_signed_fallback = false;
    cfg.control_url = format!("http://{control}");
    let proxy = start(cfg).await;
    let https = proxy.https.unwrap();
    let mut web = app("web");
    web.hostnames = vec!["web.aloft.test".into()];
    proxy.proxy.catalog().apply(snapshot(
        1,
        vec![web.clone()],
        vec![machine("m1", "web", "ams", be.addr, MachineState::Started)],
    ));
    let p1 = ca1_path.clone();
    eventually("stored certificate served", || {
        let p1 = p1.clone();
        async move { verify_with(&p1, https, "web.aloft.test").await.is_ok() }
    })
    .await;
    // `aloft certs import` (say) replaces it; the control plane republishes the app.
    *shared.lock().unwrap() = Some(("web.aloft.test".into(), doc2));
    proxy
        .proxy
        .catalog()
        .apply(CatalogUpdate::App { seq: 2, app: web });
    let p2 = ca2_path.clone();
    eventually("replacement served", || {
        let p2 = p2.clone();
        async move { verify_with(&p2, https, "web.aloft.test").await.is_ok() }
    })
    .await;
    proxy.shutdown().await;
}
