//! The `tls` handler (SNI routing, certificate chain, ALPN, versions), dedicated IPs,
//! raw TCP passthrough, PROXY protocol, default-deny and force_https.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use aloft_api::internal::CatalogUpdate;
use aloft_api::{MachinePort, MachineService, MachineState, ProxyProtoOptions, TlsOptions};
use aloft_proxy::AppExtras;
use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

struct Pki {
    ca_pem: String,
    ca_der: CertificateDer<'static>,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

fn pki() -> Pki {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Aloft Test CA");
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    Pki {
        ca_pem: cert.pem(),
        ca_der: cert.der().clone(),
        issuer: rcgen::Issuer::new(params, key),
    }
}

impl Pki {
    /// (chain PEM, key PEM) for `host`.
    fn leaf(&self, host: &str) -> (String, String) {
        let params = rcgen::CertificateParams::new(vec![host.to_string()]).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (
            format!("{}{}", cert.pem(), self.ca_pem),
            key.serialize_pem(),
        )
    }

    fn install(&self, proxy: &aloft_proxy::Proxy, host: &str) {
        let (chain, key) = self.leaf(host);
        let certified = aloft_proxy::tls::certified_key_from_pem(&chain, &key).unwrap();
        proxy.catalog().set_certificate(host, Arc::new(certified));
    }

    fn client(
        &self,
        alpn: &[&str],
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> tokio_rustls::TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_der.clone()).unwrap();
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }
}

async fn tls_get(
    connector: &tokio_rustls::TlsConnector,
    addr: SocketAddr,
    sni: &str,
    path: &str,
) -> Result<(Option<Vec<u8>>, u16, serde_json::Value), String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let tls = connector
        .connect(ServerName::try_from(sni.to_string()).unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let alpn = tls.get_ref().1.alpn_protocol().map(|p| p.to_vec());
    let req = http::Request::builder()
        .uri(format!("https://{sni}{path}"))
        .header("host", sni)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = if alpn.as_deref() == Some(b"h2") {
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        sender.send_request(req).await.map_err(|e| e.to_string())?
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let mut req = req;
        *req.uri_mut() = path.parse().unwrap();
        sender.send_request(req).await.map_err(|e| e.to_string())?
    };
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((
        alpn,
        status,
        serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
    ))
}

fn tls_config() -> aloft_proxy::ProxyConfig {
    let mut cfg = config();
    cfg.https_listen = Some("127.0.0.1:0".parse().unwrap());
    cfg.self_signed_fallback = false;
    cfg
}

#[tokio::test]
async fn terminates_tls_by_sni_with_chain_alpn_and_versions() {
    let be = backend(echo("b1")).await;
    let pki = pki();
    let proxy = start(tls_config()).await;
    let https = proxy.https.unwrap();
    proxy.proxy.catalog().apply(snapshot(
        1,
        vec![app("web")],
        vec![machine("m1", "web", "ams", be.addr, MachineState::Started)],
    ));
    pki.install(&proxy.proxy, "web.aloft.test");

    // HTTP/2 over TLS (ALPN h2), verified chain.
    let h2 = pki.client(&["h2", "http/1.1"], &[&rustls::version::TLS13]);
    let (alpn, status, json) = tls_get(&h2, https, "web.aloft.test", "/secure")
        .await
        .unwrap();
    assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
    assert_eq!(status, 200);
    assert_eq!(echoed(&json, "x-forwarded-proto"), Some("https"));
    assert_eq!(echoed(&json, "x-forwarded-ssl"), Some("on"));
    assert_eq!(echoed(&json, "via"), Some("2 aloft"));
    assert_eq!(json["version"], "HTTP/1.1");

    // HTTP/1.1 over TLS 1.2.
    let h1 = pki.client(&["http/1.1"], &[&rustls::version::TLS12]);
    let (alpn, status, json) = tls_get(&h1, https, "web.aloft.test", "/one").await.unwrap();
    assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));
    assert_eq!(status, 200);
    assert_eq!(json["path"], "/one");

    // Unknown SNI: no certificate, the handshake fails.
    assert!(tls_get(&h2, https, "other.aloft.test", "/").await.is_err());

    // openssl s_client checks the chain, SNI selection and ALPN.
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &pki.ca_pem).unwrap();
    let out = s_client(&[
        "-connect",
        &https.to_string(),
        "-servername",
        "web.aloft.test",
        "-alpn",
        "h2",
        "-CAfile",
        ca.to_str().unwrap(),
    ])
    .await;
    assert!(out.contains("Verify return code: 0 (ok)"), "{out}");
    assert!(out.contains("ALPN protocol: h2"), "{out}");
    assert!(
        out.contains("CN = Aloft Test CA") || out.contains("CN=Aloft Test CA"),
        "{out}"
    );
    let out = s_client(&[
        "-connect",
        &https.to_string(),
        "-servername",
        "web.aloft.test",
        "-tls1_2",
        "-CAfile",
        ca.to_str().unwrap(),
    ])
    .await;
    assert!(out.contains("Verify return code: 0 (ok)"), "{out}");
    assert!(out.contains("ECDHE-ECDSA-"), "{out}");
    // TLS 1.1 is refused; so is a cipher outside the list.
    let out = s_client(&[
        "-connect",
        &https.to_string(),
        "-servername",
        "web.aloft.test",
        "-tls1_1",
    ])
    .await;
    assert!(out.contains("no peer certificate available"), "{out}");
    let out = s_client(&[
        "-connect",
        &https.to_string(),
        "-servername",
        "web.aloft.test",
        "-tls1_2",
        "-cipher",
        "ECDHE-ECDSA-AES128-SHA256",
    ])
    .await;
    assert!(out.contains("no peer certificate available"), "{out}");

    // A new certificate in the catalog is served on the next handshake.
    let pki2 = self::pki();
    pki2.install(&proxy.proxy, "web.aloft.test");
    let fresh = pki2.client(&["h2"], &[&rustls::version::TLS13]);
    assert!(tls_get(&fresh, https, "web.aloft.test", "/").await.is_ok());
    let old = pki.client(&["h2"], &[&rustls::version::TLS13]);
    assert!(
        tls_get(&old, https, "web.aloft.test", "/").await.is_err(),
        "old CA no longer matches"
    );

    // Plain HTTP on port 80 for a tls-only port is refused; force_https redirects.
    let mut svc = http_service(be.addr.port());
    svc.ports[0].force_https = Some(true);
    proxy.proxy.catalog().apply(CatalogUpdate::Machine {
        seq: 2,
        machine: machine_with(
            "m1",
            "web",
            "ams",
            be.addr,
            MachineState::Started,
            vec![svc],
        ),
    });
    let r = get(proxy.http, "web.aloft.test", "/path?q=1", &[]).await;
    assert_eq!(r.status, 301);
    assert_eq!(
        r.header("location"),
        Some("https://web.aloft.test/path?q=1")
    );
    assert!(r.header("fly-request-id").is_some());
    proxy.shutdown().await;
}

async fn s_client(args: &[&str]) -> String {
    let mut child = tokio::process::Command::new("openssl")
        .arg("s_client")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("openssl runs");
    drop(child.stdin.take());
    let out = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A TCP server that answers each connection with what it received first (up to 200 bytes).
async fn tcp_echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
            });
        }
    });
    addr
}

async fn free_port(ip: &str) -> u16 {
    let l = TcpListener::bind(format!("{ip}:0")).await.unwrap();
    l.local_addr().unwrap().port()
}

async fn connect_when_listening(addr: SocketAddr) -> TcpStream {
    for _ in 0..400 {
        if let Ok(s) = TcpStream::connect(addr).await {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{addr} never listened");
}

async fn read_some(s: &mut (impl AsyncReadExt + Unpin), n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    let mut got = 0;
    while got < n {
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf[got..])).await {
            Ok(Ok(0)) | Err(_) => break,
            Ok(Ok(k)) => got += k,
            Ok(Err(_)) => break,
        }
    }
    buf.truncate(got);
    buf
}

#[tokio::test]
async fn dedicated_ip_raw_tcp_proxy_protocol_tls_passthrough_and_default_deny() {
    let echo_addr = tcp_echo().await;
    let pki = pki();
    let raw_port = free_port("127.0.0.2").await;
    let pp1_port = free_port("127.0.0.2").await;
    let pp2_port = free_port("127.0.0.2").await;
    let mqtt_port = free_port("127.0.0.2").await;
    let pg_port = free_port("127.0.0.2").await;
    let closed_port = free_port("127.0.0.2").await;
    let port = |p: u16, handlers: &[&str]| MachinePort {
        port: Some(p),
        handlers: handlers.iter().map(|h| h.to_string()).collect(),
        ..MachinePort::default()
    };
    let mut pp2 = port(pp2_port, &["proxy_proto"]);
    pp2.proxy_proto_options = Some(ProxyProtoOptions {
        version: "v2".into(),
    });
    let mut mqtt = port(mqtt_port, &["tls"]);
    mqtt.tls_options = Some(TlsOptions {
        alpn: vec!["mqtt".into()],
        versions: vec!["TLSv1.3".into()],
        default_self_signed: None,
    });
    let service = MachineService {
        protocol: "tcp".into(),
        internal_port: echo_addr.port(),
        ports: vec![
            port(raw_port, &[]),
            port(pp1_port, &["proxy_proto"]),
            pp2,
            mqtt,
            port(pg_port, &["pg_tls"]),
        ],
        ..MachineService::default()
    };
    let mut cfg = tls_config();
    cfg.service_listeners = true;
    let proxy = start(cfg).await;
    proxy.proxy.catalog().apply(snapshot(
        1,
        vec![app("db")],
        vec![machine_with(
            "m1",
            "db",
            "ams",
            echo_addr,
            MachineState::Started,
            vec![service],
        )],
    ));
    proxy.proxy.catalog().set_app_extras(
        "db",
        AppExtras {
            ips: vec![("127.0.0.2".parse().unwrap(), false)],
            primary_region: None,
        },
    );
    pki.install(&proxy.proxy, "db.aloft.test");

    // Raw TCP passthrough.
    let mut s = connect_when_listening(format!("127.0.0.2:{raw_port}").parse().unwrap()).await;
    s.write_all(b"ping").await.unwrap();
    assert_eq!(read_some(&mut s, 4).await, b"ping");

    // PROXY protocol v1: the app sees the client and the dedicated address first.
    let mut s = connect_when_listening(format!("127.0.0.2:{pp1_port}").parse().unwrap()).await;
    let local = s.local_addr().unwrap();
    s.write_all(b"x").await.unwrap();
    let expected = format!(
        "PROXY TCP4 {} 127.0.0.2 {} {}\r\nx",
        local.ip(),
        local.port(),
        pp1_port
    );
    assert_eq!(
        String::from_utf8_lossy(&read_some(&mut s, expected.len()).await),
        expected
    );

    // PROXY protocol v2 (binary).
    let mut s = connect_when_listening(format!("127.0.0.2:{pp2_port}").parse().unwrap()).await;
    s.write_all(b"y").await.unwrap();
    let got = read_some(&mut s, 29).await;
    assert_eq!(&got[..12], b"\r\n\r\n\0\r\nQUIT\n");
    assert_eq!(got[13], 0x11);
    assert_eq!(&got[20..24], &[127, 0, 0, 2]);
    assert_eq!(u16::from_be_bytes([got[26], got[27]]), pp2_port);
    assert_eq!(got[28], b'y');

    // tls with alpn=mqtt, TLS 1.3 only: terminated, plaintext to the app.
    connect_when_listening(format!("127.0.0.2:{mqtt_port}").parse().unwrap()).await;
    let connector = pki.client(&["mqtt"], &[&rustls::version::TLS13]);
    let tcp = TcpStream::connect(format!("127.0.0.2:{mqtt_port}"))
        .await
        .unwrap();
    let mut tls = connector
        .connect(ServerName::try_from("db.aloft.test").unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"mqtt"[..]));
    tls.write_all(b"CONNECT").await.unwrap();
    assert_eq!(read_some(&mut tls, 7).await, b"CONNECT");
    let tls12 = pki.client(&["mqtt"], &[&rustls::version::TLS12]);
    let tcp = TcpStream::connect(format!("127.0.0.2:{mqtt_port}"))
        .await
        .unwrap();
    assert!(
        tls12
            .connect(ServerName::try_from("db.aloft.test").unwrap(), tcp)
            .await
            .is_err(),
        "TLS 1.2 refused"
    );

    // pg_tls: an SSLRequest is answered `S`, then TLS (ALPN `postgresql`) is terminated
    // and the plaintext protocol goes to the app.
    let pg_addr: SocketAddr = format!("127.0.0.2:{pg_port}").parse().unwrap();
    let both: &[&'static rustls::SupportedProtocolVersion] =
        &[&rustls::version::TLS13, &rustls::version::TLS12];
    let mut tcp = connect_when_listening(pg_addr).await;
    tcp.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
        .await
        .unwrap();
    assert_eq!(read_some(&mut tcp, 1).await, b"S");
    let mut tls = pki
        .client(&["postgresql"], both)
        .connect(ServerName::try_from("db.aloft.test").unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"postgresql"[..]));
    tls.write_all(b"startup").await.unwrap();
    assert_eq!(read_some(&mut tls, 7).await, b"startup");
    // A GSS encryption request is declined first; clients without ALPN are served too.
    let mut tcp = TcpStream::connect(pg_addr).await.unwrap();
    tcp.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30])
        .await
        .unwrap();
    assert_eq!(read_some(&mut tcp, 1).await, b"N");
    tcp.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
        .await
        .unwrap();
    assert_eq!(read_some(&mut tcp, 1).await, b"S");
    let mut tls = pki
        .client(&[], both)
        .connect(ServerName::try_from("db.aloft.test").unwrap(), tcp)
        .await
        .unwrap();
    tls.write_all(b"query").await.unwrap();
    assert_eq!(read_some(&mut tls, 5).await, b"query");
    // Direct TLS (PostgreSQL 17 `sslnegotiation=direct`).
    let tcp = TcpStream::connect(pg_addr).await.unwrap();
    let mut tls = pki
        .client(&["postgresql"], both)
        .connect(ServerName::try_from("db.aloft.test").unwrap(), tcp)
        .await
        .unwrap();
    tls.write_all(b"direct").await.unwrap();
    assert_eq!(read_some(&mut tls, 6).await, b"direct");
    // A client starting without TLS gets a FATAL ErrorResponse naming the fix.
    let mut tcp = TcpStream::connect(pg_addr).await.unwrap();
    tcp.write_all(&[0, 0, 0, 8, 0, 3, 0, 0]).await.unwrap();
    let reply = read_some(&mut tcp, 4096).await;
    assert_eq!(reply.first(), Some(&b'E'), "{reply:?}");
    assert!(
        String::from_utf8_lossy(&reply).contains("sslmode=require"),
        "{}",
        String::from_utf8_lossy(&reply)
    );

    // Default-deny: a port no service exposes has no listener.
    assert!(
        TcpStream::connect(format!("127.0.0.2:{closed_port}"))
            .await
            .is_err()
    );

    // The app's ports go away with its machine: listeners close, existing connections stay.
    let mut open = connect_when_listening(format!("127.0.0.2:{raw_port}").parse().unwrap()).await;
    open.write_all(b"open").await.unwrap();
    assert_eq!(read_some(&mut open, 4).await, b"open");
    proxy.proxy.catalog().apply(CatalogUpdate::MachineRemoved {
        seq: 2,
        id: "m1".into(),
    });
    eventually("listener closed", || async move {
        TcpStream::connect(format!("127.0.0.2:{raw_port}"))
            .await
            .is_err()
    })
    .await;
    open.write_all(b"still").await.unwrap();
    assert_eq!(read_some(&mut open, 5).await, b"still");
    drop(open);
    proxy.shutdown().await;
}

#[tokio::test]
async fn other_public_ports_on_the_shared_address_route_by_host_and_sni() {
    let be = backend(echo("b1")).await;
    let pki = pki();
    let http_port = free_port("127.0.0.1").await;
    let tls_port = free_port("127.0.0.1").await;
    let pg_port = free_port("127.0.0.1").await;
    let pg_echo = tcp_echo().await;
    let port = |p: u16, handlers: &[&str]| MachinePort {
        port: Some(p),
        handlers: handlers.iter().map(|h| h.to_string()).collect(),
        ..MachinePort::default()
    };
    let service = MachineService {
        protocol: "tcp".into(),
        internal_port: be.addr.port(),
        ports: vec![port(http_port, &["http"]), port(tls_port, &["tls", "http"])],
        ..MachineService::default()
    };
    // A Postgres-style service on the same machine, on its own internal port.
    let database = MachineService {
        protocol: "tcp".into(),
        internal_port: pg_echo.port(),
        ports: vec![port(pg_port, &["pg_tls"])],
        ..MachineService::default()
    };
    let mut cfg = tls_config();
    cfg.service_listeners = true;
    let proxy = start(cfg).await;
    proxy.proxy.catalog().apply(snapshot(
        1,
        vec![app("web")],
        vec![machine_with(
            "m1",
            "web",
            "ams",
            be.addr,
            MachineState::Started,
            vec![service, database],
        )],
    ));
    pki.install(&proxy.proxy, "web.aloft.test");
    let http_addr: SocketAddr = format!("127.0.0.1:{http_port}").parse().unwrap();
    connect_when_listening(http_addr).await;
    let r = get(http_addr, "web.aloft.test", "/shared", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        echoed(&r.json(), "fly-forwarded-port"),
        Some(http_port.to_string().as_str())
    );
    // Another host on the same port: no such app.
    assert_eq!(
        get(http_addr, "nope.aloft.test", "/", &[]).await.status,
        404
    );
    let tls_addr: SocketAddr = format!("127.0.0.1:{tls_port}").parse().unwrap();
    connect_when_listening(tls_addr).await;
    let client = pki.client(&["h2", "http/1.1"], &[&rustls::version::TLS13]);
    let (alpn, status, json) = tls_get(&client, tls_addr, "web.aloft.test", "/tls")
        .await
        .unwrap();
    assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
    assert_eq!(status, 200);
    assert_eq!(echoed(&json, "x-forwarded-proto"), Some("https"));
    // Plain HTTP to the TLS port is not let through.
    let r = get(tls_addr, "web.aloft.test", "/", &[]).await;
    assert_eq!(r.status, 404);

    // pg_tls on the shared address: the SSLRequest is answered, then SNI picks the app.
    let pg_addr: SocketAddr = format!("127.0.0.1:{pg_port}").parse().unwrap();
    let postgres = pki.client(&["postgresql"], &[&rustls::version::TLS13]);
    let sslrequest = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
    let mut tcp = connect_when_listening(pg_addr).await;
    tcp.write_all(&sslrequest).await.unwrap();
    assert_eq!(read_some(&mut tcp, 1).await, b"S");
    let mut tls = postgres
        .connect(ServerName::try_from("web.aloft.test").unwrap(), tcp)
        .await
        .unwrap();
    tls.write_all(b"startup").await.unwrap();
    assert_eq!(read_some(&mut tls, 7).await, b"startup");
    // A name no app has gets no handshake.
    let mut tcp = TcpStream::connect(pg_addr).await.unwrap();
    tcp.write_all(&sslrequest).await.unwrap();
    assert_eq!(read_some(&mut tcp, 1).await, b"S");
    assert!(
        postgres
            .connect(ServerName::try_from("nope.aloft.test").unwrap(), tcp)
            .await
            .is_err()
    );
    proxy.shutdown().await;
}
