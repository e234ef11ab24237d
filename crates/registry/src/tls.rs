//! HTTP and HTTPS connections for the pull client (rustls, ring provider).

use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::RegistryError;
use crate::egress::EgressPolicy;

/// Debian's CA bundle (package `ca-certificates`).
const SYSTEM_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

fn add_pem(store: &mut RootCertStore, pem: &[u8]) -> Result<usize, RegistryError> {
    let mut added = 0;
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| RegistryError::Config(format!("bad PEM certificate: {e}")))?;
        if store.add(cert).is_ok() {
            added += 1;
        }
    }
    Ok(added)
}

fn config_with(store: RootCertStore) -> Result<Arc<rustls::ClientConfig>, RegistryError> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| RegistryError::Config(format!("TLS setup: {e}")))?
    .with_root_certificates(store)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

fn system_roots() -> RootCertStore {
    let mut store = RootCertStore::empty();
    match std::fs::read(SYSTEM_BUNDLE) {
        Ok(pem) => {
            if let Err(e) = add_pem(&mut store, &pem) {
                tracing::warn!(error = %e, "could not load the system CA bundle");
            }
        }
        Err(e) => tracing::debug!(error = %e, path = SYSTEM_BUNDLE, "no system CA bundle"),
    }
    store
}

/// The TLS configuration trusting the system's CAs (loaded once).
fn system_config() -> Option<Arc<rustls::ClientConfig>> {
    static CONFIG: OnceLock<Option<Arc<rustls::ClientConfig>>> = OnceLock::new();
    CONFIG
        .get_or_init(|| match config_with(system_roots()) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(error = %e, "TLS client setup failed");
                None
            }
        })
        .clone()
}

/// A TLS configuration trusting the system's CAs plus those in `pem`.
pub(crate) fn config_with_extra_roots(
    pem: &[u8],
) -> Result<Arc<rustls::ClientConfig>, RegistryError> {
    let mut store = system_roots();
    if add_pem(&mut store, pem)? == 0 {
        return Err(RegistryError::Config("no certificate in the CA PEM".into()));
    }
    config_with(store)
}

pub(crate) fn config_with_ca_file(path: &Path) -> Result<Arc<rustls::ClientConfig>, RegistryError> {
    let pem = std::fs::read(path)
        .map_err(|e| RegistryError::Config(format!("reading CA file {}: {e}", path.display())))?;
    config_with_extra_roots(&pem)
}

/// Connects over TCP (to addresses its [`EgressPolicy`] allows), and for `https` URIs
/// does a TLS handshake on top.
#[derive(Clone)]
pub(crate) struct Connector {
    egress: Arc<EgressPolicy>,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl Connector {
    pub fn new(tls: Option<Arc<rustls::ClientConfig>>, egress: Arc<EgressPolicy>) -> Connector {
        Connector {
            egress,
            tls: tls.or_else(system_config),
        }
    }
}

pub(crate) enum Stream {
    Plain(TokioIo<TcpStream>),
    Tls(Box<TokioIo<TlsStream<TcpStream>>>),
}

impl Connection for Stream {
    fn connected(&self) -> Connected {
        match self {
            Stream::Plain(s) => s.connected(),
            Stream::Tls(_) => Connected::new(),
        }
    }
}

impl hyper::rt::Read for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl hyper::rt::Write for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower::Service<Uri> for Connector {
    type Response = Stream;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Stream, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let egress = self.egress.clone();
        let tls = self.tls.clone();
        Box::pin(async move {
            let https = match uri.scheme_str() {
                Some("https") => true,
                Some("http") => false,
                other => return Err(format!("unsupported URL scheme {other:?}").into()),
            };
            let host = uri
                .host()
                .ok_or("URI without host")?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
            let tcp = egress.connect(&host, port).await?;
            if !https {
                return Ok(Stream::Plain(TokioIo::new(tcp)));
            }
            let cfg = tls.ok_or("TLS is not available")?;
            let name = ServerName::try_from(host)?;
            let tls = TlsConnector::from(cfg).connect(name, tcp).await?;
            Ok(Stream::Tls(Box::new(TokioIo::new(tls))))
        })
    }
}
