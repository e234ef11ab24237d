//! The `tls` handler: TLS 1.2/1.3 termination with the cipher list of spec §9.7, SNI
//! routing and certificate selection, ALPN and versions from `tls_options`, TLS-ALPN-01
//! challenge answers, and the loop that keeps every hostname's certificate current.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use aloft_api::{MachinePort, TlsOptions};
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, ServerConfig};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpStream;
use tokio_rustls::LazyConfigAcceptor;
use tokio_rustls::server::TlsStream;

use crate::Proxy;
use crate::catalog::Catalog;

/// ALPN protocol of TLS-ALPN-01 challenges (RFC 8737).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("no certificate in PEM")]
    NoCertificate,
    #[error("no usable private key in PEM: {0}")]
    Key(String),
    #[error("certificate generation: {0}")]
    Generate(String),
}

/// The crypto provider: ring, restricted to the cipher suites of spec §9.7.
pub fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite as cs;
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = vec![
        cs::TLS13_AES_128_GCM_SHA256,
        cs::TLS13_AES_256_GCM_SHA384,
        cs::TLS13_CHACHA20_POLY1305_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(provider)
}

/// Parses a PEM certificate chain and private key into a signing key for rustls.
pub fn certified_key_from_pem(chain_pem: &str, key_pem: &str) -> Result<CertifiedKey, CertError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .filter_map(Result::ok)
        .collect();
    if chain.is_empty() {
        return Err(CertError::NoCertificate);
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| CertError::Key(e.to_string()))?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| CertError::Key(e.to_string()))?;
    Ok(CertifiedKey::new(chain, signing))
}

/// A self-signed certificate for `host` (ECDSA P-256).
pub fn self_signed(host: &str) -> Result<CertifiedKey, CertError> {
    let generated = rcgen::generate_simple_self_signed(vec![host.to_string()])
        .map_err(|e| CertError::Generate(e.to_string()))?;
    certified_key_from_pem(
        &generated.cert.pem(),
        &generated.signing_key.serialize_pem(),
    )
}

/// The end of validity (`notAfter`) of a DER certificate.
pub fn not_after(der: &[u8]) -> Option<SystemTime> {
    validity(der).map(|(_, not_after)| not_after)
}

/// The validity (`notBefore`, `notAfter`) of a DER certificate.
pub fn validity(der: &[u8]) -> Option<(SystemTime, SystemTime)> {
    // Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version?, serial, sigAlg,
    //   issuer, validity SEQUENCE { notBefore, notAfter }, ... } ... }
    fn tlv(data: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let tag = *data.first()?;
        let first = *data.get(1)? as usize;
        let (len, header) = if first < 0x80 {
            (first, 2)
        } else {
            let n = first & 0x7f;
            if n == 0 || n > 4 {
                return None;
            }
            let mut len = 0usize;
            for i in 0..n {
                len = (len << 8) | *data.get(2 + i)? as usize;
            }
            (len, 2 + n)
        };
        let body = data.get(header..header + len)?;
        Some((tag, body, &data[header + len..]))
    }
    let (_, cert, _) = tlv(der)?;
    let (_, tbs, _) = tlv(cert)?;
    let mut rest = tbs;
    let (tag, _, after) = tlv(rest)?;
    if tag == 0xa0 {
        rest = after;
    }
    let (_, _, rest) = tlv(rest)?; // serial
    let (_, _, rest) = tlv(rest)?; // signature algorithm
    let (_, _, rest) = tlv(rest)?; // issuer
    let (_, validity, _) = tlv(rest)?;
    let (before_tag, before, validity) = tlv(validity)?;
    let (after_tag, after, _) = tlv(validity)?;
    Some((time_of(before_tag, before)?, time_of(after_tag, after)?))
}

/// An X.509 `UTCTime` (tag 0x17) or `GeneralizedTime` (0x18) as a system time.
fn time_of(tag: u8, time: &[u8]) -> Option<SystemTime> {
    let text = std::str::from_utf8(time).ok()?;
    let (year, rest) = match tag {
        0x17 => {
            let yy: i64 = text.get(0..2)?.parse().ok()?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, text.get(2..)?)
        }
        0x18 => (text.get(0..4)?.parse().ok()?, text.get(4..)?),
        _ => return None,
    };
    let field = |i: usize| -> Option<i64> { rest.get(i..i + 2)?.parse().ok() };
    let (month, day, hour, minute, second) =
        (field(0)?, field(2)?, field(4)?, field(6)?, field(8)?);
    // Days from the civil date (proleptic Gregorian), as in Howard Hinnant's algorithm.
    let y = if month <= 2 { year - 1 } else { year };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second;
    if secs < 0 {
        return None;
    }
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs as u64))
}

/// Server configs are shared by (ALPN protocols, version mask).
type ConfigKey = (Vec<Vec<u8>>, u8);

/// TLS state shared by every handshake: server configs by options, self-signed fallbacks,
/// pending TLS-ALPN-01 challenge certificates, session resumption state.
pub struct CertStore {
    configs: Mutex<HashMap<ConfigKey, Arc<ServerConfig>>>,
    self_signed: Mutex<HashMap<String, Arc<CertifiedKey>>>,
    challenges: Mutex<HashMap<String, Arc<CertifiedKey>>>,
    challenge_config: Mutex<Option<Arc<ServerConfig>>>,
    sessions: Arc<dyn rustls::server::StoresServerSessions>,
    ticketer: Option<Arc<dyn rustls::server::ProducesTickets>>,
}

impl Default for CertStore {
    fn default() -> Self {
        Self::new()
    }
}

impl CertStore {
    pub fn new() -> Self {
        CertStore {
            configs: Mutex::new(HashMap::new()),
            self_signed: Mutex::new(HashMap::new()),
            challenges: Mutex::new(HashMap::new()),
            challenge_config: Mutex::new(None),
            sessions: rustls::server::ServerSessionMemoryCache::new(4096),
            ticketer: rustls::crypto::ring::Ticketer::new().ok(),
        }
    }

    /// Installs the TLS-ALPN-01 answer for `host` (until `clear_challenge`).
    pub fn set_challenge(&self, host: &str, key: Arc<CertifiedKey>) {
        lock(&self.challenges).insert(host.to_ascii_lowercase(), key);
    }

    pub fn clear_challenge(&self, host: &str) {
        lock(&self.challenges).remove(&host.to_ascii_lowercase());
    }

    fn self_signed_for(&self, host: &str) -> Option<Arc<CertifiedKey>> {
        if let Some(key) = lock(&self.self_signed).get(host) {
            return Some(key.clone());
        }
        let key = Arc::new(self_signed(host).ok()?);
        let mut cache = lock(&self.self_signed);
        if cache.len() > 10_000 {
            cache.clear();
        }
        cache.insert(host.to_string(), key.clone());
        Some(key)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Chooses the certificate for a handshake by SNI.
struct Resolver {
    catalog: Arc<Catalog>,
    store: Arc<ResolverState>,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Resolver")
    }
}

struct ResolverState {
    proxy: std::sync::Weak<Proxy>,
    /// Serve a self-signed certificate when no real one exists.
    self_signed: bool,
}

impl std::fmt::Debug for ResolverState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResolverState")
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let host = hello.server_name().map(str::to_ascii_lowercase);
        let snapshot = self.catalog.load();
        if let Some(host) = &host
            && let Some(cert) = snapshot.cert_for(host)
        {
            return Some(cert.clone());
        }
        if !self.store.self_signed {
            return None;
        }
        let proxy = self.store.proxy.upgrade()?;
        let name = host.unwrap_or_else(|| proxy.config.base_domain.clone());
        proxy.certs.self_signed_for(&name)
    }
}

/// Answers TLS-ALPN-01 validation handshakes with the challenge certificate.
#[derive(Debug)]
struct ChallengeResolver {
    store: std::sync::Weak<Proxy>,
}

impl ResolvesServerCert for ChallengeResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let host = hello.server_name()?.to_ascii_lowercase();
        let proxy = self.store.upgrade()?;
        lock(&proxy.certs.challenges).get(&host).cloned()
    }
}

fn versions_mask(options: Option<&TlsOptions>) -> u8 {
    let Some(versions) = options.map(|o| &o.versions).filter(|v| !v.is_empty()) else {
        return 0b11;
    };
    let mut mask = 0;
    for v in versions {
        match v.to_ascii_lowercase().replace(['v', ' ', '_'], "").as_str() {
            "tls1.2" | "tls12" => mask |= 0b01,
            "tls1.3" | "tls13" => mask |= 0b10,
            _ => {}
        }
    }
    if mask == 0 { 0b11 } else { mask }
}

fn alpn_list(port: &MachinePort) -> Vec<Vec<u8>> {
    if let Some(alpn) = port
        .tls_options
        .as_ref()
        .map(|o| &o.alpn)
        .filter(|a| !a.is_empty())
    {
        return alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    }
    if port.handlers.iter().any(|h| h == "http") {
        return vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    }
    if port.handlers.iter().any(|h| h == "pg_tls") {
        // What libpq 17+ asks for; older clients send no ALPN at all.
        return vec![b"postgresql".to_vec()];
    }
    Vec::new()
}

impl Proxy {
    fn server_config(self: &Arc<Self>, port: &MachinePort) -> Option<Arc<ServerConfig>> {
        let alpn = alpn_list(port);
        let mask = versions_mask(port.tls_options.as_ref());
        let key = (alpn.clone(), mask);
        if let Some(config) = lock(&self.certs.configs).get(&key) {
            return Some(config.clone());
        }
        let versions: Vec<&'static rustls::SupportedProtocolVersion> = [
            (0b01, &rustls::version::TLS12),
            (0b10, &rustls::version::TLS13),
        ]
        .into_iter()
        .filter(|(bit, _)| mask & bit != 0)
        .map(|(_, v)| v)
        .collect();
        let self_signed = self.config.self_signed_fallback
            || port
                .tls_options
                .as_ref()
                .and_then(|o| o.default_self_signed)
                .unwrap_or(false);
        let resolver = Resolver {
            catalog: self.catalog.clone(),
            store: Arc::new(ResolverState {
                proxy: Arc::downgrade(self),
                self_signed,
            }),
        };
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&versions)
            .ok()?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(resolver));
        config.alpn_protocols = alpn;
        config.session_storage = self.certs.sessions.clone();
        if let Some(ticketer) = &self.certs.ticketer {
            config.ticketer = ticketer.clone();
        }
        let config = Arc::new(config);
        lock(&self.certs.configs).insert(key, config.clone());
        Some(config)
    }

    fn challenge_config(self: &Arc<Self>) -> Option<Arc<ServerConfig>> {
        if let Some(config) = lock(&self.certs.challenge_config).as_ref() {
            return Some(config.clone());
        }
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS12, &rustls::version::TLS13])
            .ok()?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(ChallengeResolver {
                store: Arc::downgrade(self),
            }));
        config.alpn_protocols = vec![ACME_TLS_ALPN.to_vec()];
        let config = Arc::new(config);
        *lock(&self.certs.challenge_config) = Some(config.clone());
        Some(config)
    }
}

/// Accepts TLS on a connection: reads the ClientHello, routes by SNI (unless the app is
/// already known), checks that the app terminates TLS on this port (default-deny), and
/// completes the handshake with the app's ALPN and versions.
pub(crate) async fn accept(
    proxy: &Arc<Proxy>,
    stream: TcpStream,
    fixed_app: Option<&str>,
    public_port: u16,
    timeout: Duration,
) -> Option<(TlsStream<TcpStream>, String, MachinePort)> {
    let started = Instant::now();
    let acceptor = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream);
    let start = match tokio::time::timeout(timeout, acceptor).await {
        Ok(Ok(start)) => start,
        _ => {
            proxy.metrics.tls_handshake_errors.inc();
            return None;
        }
    };
    let hello = start.client_hello();
    let sni = hello.server_name().map(str::to_ascii_lowercase);
    let acme_challenge = hello
        .alpn()
        .is_some_and(|mut protocols| protocols.any(|p| p == ACME_TLS_ALPN));

    if acme_challenge {
        let host = sni?;
        if !lock(&proxy.certs.challenges).contains_key(&host) {
            proxy.metrics.tls_handshake_errors.inc();
            return None;
        }
        let config = proxy.challenge_config()?;
        // Validation only: finish the handshake and close.
        if let Ok(Ok(mut tls)) = tokio::time::timeout(timeout, start.into_stream(config)).await {
            let _ = tokio::io::AsyncWriteExt::shutdown(&mut tls).await;
        }
        return None;
    }

    let app = match fixed_app {
        Some(app) => Some(app.to_string()),
        None => {
            let snapshot = proxy.catalog.load();
            sni.as_deref()
                .and_then(|host| snapshot.app_for_host(host, &proxy.config.base_domain))
                .map(|a| a.name.clone())
        }
    };
    let Some(app) = app else {
        tracing::debug!(sni = ?sni, "TLS for an unknown host");
        proxy.metrics.tls_handshake_errors.inc();
        return None;
    };
    let port = crate::server::port_config(proxy, &app, public_port).filter(|p| {
        crate::server::has_handler(p, "tls") || crate::server::has_handler(p, "pg_tls")
    });
    let Some(port) = port else {
        proxy.metrics.tls_handshake_errors.inc();
        return None;
    };
    let config = proxy.server_config(&port)?;
    match tokio::time::timeout(timeout, start.into_stream(config)).await {
        Ok(Ok(tls)) => {
            let version = match tls.get_ref().1.protocol_version() {
                Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
                Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
                _ => "other",
            };
            proxy
                .metrics
                .tls_handshakes
                .get_or_create(&[("version", version)])
                .inc();
            proxy
                .metrics
                .tls_handshake_time
                .observe(started.elapsed().as_secs_f64());
            Some((tls, app, port))
        }
        _ => {
            proxy.metrics.tls_handshake_errors.inc();
            None
        }
    }
}

/// Keeps a certificate for every hostname of every app: fetched from the control plane,
/// or issued by the ACME CA (then stored in the control plane), renewed before expiry,
/// dropped when the hostname goes away; failures back off.
pub(crate) async fn certificate_loop(proxy: Arc<Proxy>) {
    crate::acme::certificate_loop(proxy).await
}
