//! Health checks of running machines: the service checks (`services[].checks`, named
//! `servicecheck-NN-<type>-<port>` as Fly names them) and the top-level `checks` map.
//! TCP checks connect; HTTP checks send one request (http or https, method, path,
//! headers, TLS server name, optional verification) and pass on a 2xx answer; redirects
//! fail. Results are `passing`, `warning` (not checked yet) or `critical`, with output, and
//! go to the control plane whenever one changes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aloft_api::internal::{ChecksReport, MachineChecks};
use aloft_api::{CheckStatus, MachineCheck, MachineConfig};
use aloft_client::Client;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::Agent;
use crate::network::MachineLink;
use crate::store::MachineRecord;

pub const PASSING: &str = "passing";
pub const WARNING: &str = "warning";
pub const CRITICAL: &str = "critical";

const DEFAULT_INTERVAL: Duration = Duration::from_secs(15);
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
/// Shortest interval honoured, so a mistyped config cannot flood a machine.
const MIN_INTERVAL: Duration = Duration::from_millis(100);

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CheckKind {
    Tcp,
    Http,
}

/// One check to run, with Fly's defaults filled in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckDefinition {
    pub name: String,
    pub kind: CheckKind,
    pub port: u16,
    pub interval: Duration,
    pub timeout: Duration,
    pub grace_period: Duration,
    pub method: String,
    pub path: String,
    pub https: bool,
    pub tls_skip_verify: bool,
    pub tls_server_name: Option<String>,
    pub headers: Vec<(String, String)>,
}

fn definition(
    name: String,
    check: &MachineCheck,
    default_port: Option<u16>,
) -> Option<CheckDefinition> {
    let kind = match check.check_type.to_ascii_lowercase().as_str() {
        "http" => CheckKind::Http,
        "tcp" => CheckKind::Tcp,
        "" if check.path.is_some() => CheckKind::Http,
        "" => CheckKind::Tcp,
        _ => return None,
    };
    let port = check.port.or(default_port)?;
    Some(CheckDefinition {
        name,
        kind,
        port,
        interval: check
            .interval
            .map(|d| d.to_std())
            .unwrap_or(DEFAULT_INTERVAL)
            .max(MIN_INTERVAL),
        timeout: check
            .timeout
            .map(|d| d.to_std())
            .filter(|d| !d.is_zero())
            .unwrap_or(DEFAULT_TIMEOUT),
        grace_period: check.grace_period.map(|d| d.to_std()).unwrap_or_default(),
        method: check
            .method
            .clone()
            .filter(|m| !m.is_empty())
            .unwrap_or_else(|| "GET".into())
            .to_ascii_uppercase(),
        path: check
            .path
            .clone()
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| "/".into()),
        https: check
            .protocol
            .as_deref()
            .is_some_and(|p| p.eq_ignore_ascii_case("https")),
        tls_skip_verify: check.tls_skip_verify.unwrap_or(false),
        tls_server_name: check.tls_server_name.clone().filter(|n| !n.is_empty()),
        headers: check
            .headers
            .iter()
            .flat_map(|h| h.values.iter().map(move |v| (h.name.clone(), v.clone())))
            .collect(),
    })
}

/// Every check a machine config asks for.
pub fn definitions(config: &MachineConfig) -> Vec<CheckDefinition> {
    config
        .named_checks()
        .into_iter()
        .filter_map(|named| definition(named.name, named.check, named.service_port))
        .collect()
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

#[derive(Default)]
struct State {
    /// machine → check name → latest status.
    results: HashMap<String, BTreeMap<String, CheckStatus>>,
    runners: HashMap<String, Vec<tokio::task::AbortHandle>>,
    /// Machines whose results the control plane has not seen yet.
    dirty: HashSet<String>,
}

/// The checks of every machine on this host.
#[derive(Default)]
pub struct Checks {
    state: Mutex<State>,
    changed: tokio::sync::Notify,
}

impl Checks {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts checking a machine that just started (replacing any earlier runners).
    pub fn watch(&self, agent: &Arc<Agent>, record: &MachineRecord) {
        let id = record.spec.id.clone();
        self.forget(&id);
        let definitions = definitions(&record.spec.config);
        if definitions.is_empty() {
            return;
        }
        let Ok(link) = MachineLink::for_machine(&id, record.slot) else {
            return;
        };
        let address = IpAddr::V4(link.machine_address);
        let mut state = self.lock();
        let results = state.results.entry(id.clone()).or_default();
        for definition in &definitions {
            results.insert(
                definition.name.clone(),
                CheckStatus {
                    name: definition.name.clone(),
                    status: WARNING.into(),
                    output: "waiting for status update".into(),
                    updated_at: Some(now()),
                },
            );
        }
        let mut handles = Vec::new();
        for definition in definitions {
            let agent = Arc::downgrade(agent);
            let machine = id.clone();
            let task = tokio::spawn(async move {
                tokio::time::sleep(definition.grace_period).await;
                loop {
                    let (status, output) = run(&definition, address).await;
                    let Some(agent) = agent.upgrade() else { return };
                    agent
                        .checks
                        .record(&machine, &definition.name, status, output);
                    drop(agent);
                    tokio::time::sleep(definition.interval).await;
                }
            });
            handles.push(task.abort_handle());
        }
        state.runners.insert(id.clone(), handles);
        state.dirty.insert(id);
        drop(state);
        self.changed.notify_one();
    }

    fn record(&self, machine: &str, name: &str, status: &str, output: String) {
        let mut state = self.lock();
        if !state.runners.contains_key(machine) {
            return;
        }
        let Some(current) = state.results.get_mut(machine).and_then(|r| r.get_mut(name)) else {
            return;
        };
        let changed = current.status != status;
        if changed {
            current.updated_at = Some(now());
        }
        if changed || current.output != output {
            current.status = status.to_string();
            current.output = output;
            state.dirty.insert(machine.to_string());
            drop(state);
            self.changed.notify_one();
        }
    }

    /// Stops checking a machine (it stopped); its results are withdrawn.
    pub fn forget(&self, machine: &str) {
        let mut state = self.lock();
        for handle in state.runners.remove(machine).unwrap_or_default() {
            handle.abort();
        }
        if state.results.remove(machine).is_some() {
            state.dirty.insert(machine.to_string());
            drop(state);
            self.changed.notify_one();
        }
    }

    /// The machine is gone.
    pub fn removed(&self, machine: &str) {
        self.forget(machine);
    }

    pub fn results(&self, machine: &str) -> Vec<CheckStatus> {
        self.lock()
            .results
            .get(machine)
            .map(|r| r.values().cloned().collect())
            .unwrap_or_default()
    }

    fn take_dirty(&self) -> Vec<MachineChecks> {
        let mut state = self.lock();
        let dirty: Vec<String> = state.dirty.drain().collect();
        dirty
            .into_iter()
            .map(|id| {
                let checks = state
                    .results
                    .get(&id)
                    .map(|r| r.values().cloned().collect())
                    .unwrap_or_default();
                MachineChecks {
                    machine_id: id,
                    checks,
                }
            })
            .collect()
    }

    fn mark_dirty(&self, machines: impl IntoIterator<Item = String>) {
        self.lock().dirty.extend(machines);
    }
}

/// Delivers check results to the control plane as they change (every machine's at first).
pub async fn report(agent: Arc<Agent>, client: Client) {
    if let Ok(records) = agent.store.machines() {
        agent
            .checks
            .mark_dirty(records.into_iter().map(|r| r.spec.id));
    }
    let path = format!("/v1/hosts/{}/checks", agent.host_id);
    let mut backoff = Duration::from_millis(100);
    loop {
        let machines = agent.checks.take_dirty();
        if machines.is_empty() {
            agent.checks.changed.notified().await;
            continue;
        }
        let report = ChecksReport { machines };
        match client.call(http::Method::POST, &path, Some(&report)).await {
            Ok(()) => backoff = Duration::from_millis(100),
            Err(err) => {
                tracing::warn!(error = %err, "delivering check results to the control plane");
                agent
                    .checks
                    .mark_dirty(report.machines.into_iter().map(|m| m.machine_id));
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Runs one check once: its status and output.
pub async fn run(check: &CheckDefinition, address: IpAddr) -> (&'static str, String) {
    let target = SocketAddr::new(address, check.port);
    let attempt = async {
        let stream = TcpStream::connect(target)
            .await
            .map_err(|e| format!("dial tcp {target}: {e}"))?;
        match check.kind {
            CheckKind::Tcp => Ok(format!("TCP connect {target}: Success")),
            CheckKind::Http if check.https => {
                let server_name = check
                    .tls_server_name
                    .clone()
                    .unwrap_or_else(|| address.to_string());
                let tls = tls_connect(stream, &server_name, check.tls_skip_verify).await?;
                http_exchange(tls, check, target).await
            }
            CheckKind::Http => http_exchange(stream, check, target).await,
        }
    };
    match tokio::time::timeout(check.timeout, attempt).await {
        Ok(Ok(output)) => (PASSING, output),
        Ok(Err(output)) => (CRITICAL, output),
        Err(_) => (
            CRITICAL,
            format!("{target}: timed out after {}", humanize(check.timeout)),
        ),
    }
}

fn humanize(duration: Duration) -> String {
    if duration.subsec_millis() == 0 {
        format!("{}s", duration.as_secs())
    } else {
        format!("{}ms", duration.as_millis())
    }
}

async fn http_exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    check: &CheckDefinition,
    target: SocketAddr,
) -> Result<String, String> {
    let host = check
        .headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("host"))
        .map(|(_, v)| v.clone())
        .or_else(|| check.tls_server_name.clone())
        .unwrap_or_else(|| target.to_string());
    let mut request = format!(
        "{} {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: Consul Health Check\r\nAccept: text/plain,text/*,*/*\r\nConnection: close\r\n",
        check.method, check.path
    );
    for (name, value) in &check.headers {
        if !name.eq_ignore_ascii_case("host") {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
    }
    request.push_str("\r\n");
    let scheme = if check.https { "https" } else { "http" };
    let url = format!("{scheme}://{target}{}", check.path);
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("{} {url}: {e}", check.method))?;
    let mut head = Vec::new();
    let mut buffer = [0u8; 1024];
    while !head.windows(2).any(|w| w == b"\r\n") && head.len() < 8192 {
        let read = stream
            .read(&mut buffer)
            .await
            .map_err(|e| format!("{} {url}: {e}", check.method))?;
        if read == 0 {
            break;
        }
        head.extend_from_slice(&buffer[..read]);
    }
    let text = String::from_utf8_lossy(&head);
    let status_line = text.lines().next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let (Some(version), Some(code)) = (parts.next(), parts.next()) else {
        return Err(format!("{} {url}: no HTTP answer", check.method));
    };
    if !version.starts_with("HTTP/") {
        return Err(format!("{} {url}: not an HTTP answer", check.method));
    }
    let reason = parts.next().unwrap_or_default().trim();
    let code: u16 = code
        .parse()
        .map_err(|_| format!("{} {url}: bad status line {status_line:?}", check.method))?;
    let summary = format!("{} {url}: {code} {reason}", check.method);
    if (200..300).contains(&code) {
        Ok(summary)
    } else {
        Err(summary)
    }
}

async fn tls_connect(
    stream: TcpStream,
    server_name: &str,
    skip_verify: bool,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    let config = if skip_verify {
        tls::insecure()
    } else {
        tls::verifying()
    };
    let name = rustls_pki_types::ServerName::try_from(server_name.to_string())
        .map_err(|e| format!("TLS server name {server_name:?}: {e}"))?;
    tokio_rustls::TlsConnector::from(config)
        .connect(name, stream)
        .await
        .map_err(|e| format!("TLS handshake with {server_name}: {e}"))
}

mod tls {
    use std::sync::{Arc, OnceLock};

    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
    use rustls_pki_types::pem::PemObject;

    const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    /// Verifies against the host's CA bundle.
    pub fn verifying() -> Arc<ClientConfig> {
        static CONFIG: OnceLock<Arc<ClientConfig>> = OnceLock::new();
        CONFIG
            .get_or_init(|| {
                let mut roots = RootCertStore::empty();
                if let Ok(certs) = CertificateDer::pem_file_iter(SYSTEM_ROOTS) {
                    for cert in certs.flatten() {
                        let _ = roots.add(cert);
                    }
                }
                let config = ClientConfig::builder_with_provider(provider())
                    .with_safe_default_protocol_versions()
                    .map(|b| b.with_root_certificates(roots).with_no_client_auth())
                    .unwrap_or_else(|_| {
                        ClientConfig::builder()
                            .with_root_certificates(RootCertStore::empty())
                            .with_no_client_auth()
                    });
                Arc::new(config)
            })
            .clone()
    }

    /// `tls_skip_verify`: any certificate is accepted.
    pub fn insecure() -> Arc<ClientConfig> {
        static CONFIG: OnceLock<Arc<ClientConfig>> = OnceLock::new();
        CONFIG
            .get_or_init(|| {
                let verifier = Arc::new(AcceptAnything(provider()));
                let config = ClientConfig::builder_with_provider(provider())
                    .with_safe_default_protocol_versions()
                    .map(|b| {
                        b.dangerous()
                            .with_custom_certificate_verifier(verifier)
                            .with_no_client_auth()
                    })
                    .unwrap_or_else(|_| {
                        ClientConfig::builder()
                            .with_root_certificates(RootCertStore::empty())
                            .with_no_client_auth()
                    });
                Arc::new(config)
            })
            .clone()
    }

    #[derive(Debug)]
    struct AcceptAnything(Arc<rustls::crypto::CryptoProvider>);

    impl ServerCertVerifier for AcceptAnything {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Ok(HandshakeSignatureValid::assertion())
        }
        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Ok(HandshakeSignatureValid::assertion())
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aloft_api::{HttpHeader, MachineService};
    use tokio::net::TcpListener;

    fn http_check(port: u16, path: &str) -> CheckDefinition {
        let check = MachineCheck {
            check_type: "http".into(),
            port: Some(port),
            path: Some(path.into()),
            headers: vec![HttpHeader {
                name: "X-Probe".into(),
                values: vec!["yes".into()],
            }],
            ..Default::default()
        };
        definition("c".into(), &check, None).unwrap()
    }

    #[test]
    fn definitions_name_service_checks_like_fly_and_fill_defaults() {
        let mut config = MachineConfig::default();
        config.services.push(MachineService {
            internal_port: 8080,
            checks: vec![
                MachineCheck {
                    check_type: "http".into(),
                    path: Some("/health".into()),
                    ..Default::default()
                },
                MachineCheck {
                    check_type: "tcp".into(),
                    ..Default::default()
                },
            ],
            ..Default::default()
        });
        config.checks.insert(
            "db".into(),
            MachineCheck {
                check_type: "tcp".into(),
                port: Some(5432),
                ..Default::default()
            },
        );
        config.checks.insert(
            "portless".into(),
            MachineCheck {
                check_type: "tcp".into(),
                ..Default::default()
            },
        );
        let all = definitions(&config);
        let names: Vec<&str> = all.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "servicecheck-00-http-8080",
                "servicecheck-01-tcp-8080",
                "db"
            ],
            "a top-level check without a port is skipped"
        );
        assert_eq!(all[0].method, "GET");
        assert_eq!(all[0].interval, DEFAULT_INTERVAL);
        assert_eq!(all[0].timeout, DEFAULT_TIMEOUT);
        assert_eq!(all[2].port, 5432);
    }

    async fn serve_once(answer: &'static str) -> (u16, tokio::task::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = vec![0u8; 4096];
            let read = socket.read(&mut request).await.unwrap();
            socket.write_all(answer.as_bytes()).await.unwrap();
            String::from_utf8_lossy(&request[..read]).into_owned()
        });
        (port, task)
    }

    #[tokio::test]
    async fn http_checks_pass_on_2xx_and_send_method_path_and_headers() {
        let (port, server) = serve_once("HTTP/1.1 204 No Content\r\n\r\n").await;
        let (status, output) =
            run(&http_check(port, "/health"), "127.0.0.1".parse().unwrap()).await;
        assert_eq!(status, PASSING, "{output}");
        assert!(output.contains("204"), "{output}");
        let request = server.await.unwrap();
        assert!(request.starts_with("GET /health HTTP/1.1\r\n"), "{request}");
        assert!(request.contains("X-Probe: yes\r\n"), "{request}");
    }

    #[tokio::test]
    async fn http_checks_fail_on_redirects_and_errors() {
        let (port, _server) =
            serve_once("HTTP/1.1 301 Moved Permanently\r\nLocation: /x\r\n\r\n").await;
        let (status, output) = run(&http_check(port, "/"), "127.0.0.1".parse().unwrap()).await;
        assert_eq!(
            (status, output.contains("301")),
            (CRITICAL, true),
            "{output}"
        );
        let (port, _server) = serve_once("HTTP/1.1 500 Internal Server Error\r\n\r\n").await;
        assert_eq!(
            run(&http_check(port, "/"), "127.0.0.1".parse().unwrap())
                .await
                .0,
            CRITICAL
        );
    }

    #[tokio::test]
    async fn tcp_checks_follow_the_listener() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let check = definition(
            "t".into(),
            &MachineCheck {
                check_type: "tcp".into(),
                port: Some(port),
                ..Default::default()
            },
            None,
        )
        .unwrap();
        assert_eq!(run(&check, "127.0.0.1".parse().unwrap()).await.0, PASSING);
        drop(listener);
        let (status, output) = run(&check, "127.0.0.1".parse().unwrap()).await;
        assert_eq!(status, CRITICAL);
        assert!(output.contains("refused"), "{output}");
    }

    #[tokio::test]
    async fn a_silent_server_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut check = http_check(port, "/");
        check.timeout = Duration::from_millis(200);
        let (status, output) = run(&check, "127.0.0.1".parse().unwrap()).await;
        assert_eq!(status, CRITICAL);
        assert!(output.contains("timed out after 200ms"), "{output}");
        drop(listener);
    }

    #[tokio::test]
    async fn https_checks_verify_unless_told_not_to_and_send_the_server_name() {
        let certified =
            rcgen::generate_simple_self_signed(vec!["app.internal".to_string()]).unwrap();
        let cert = rustls::pki_types::CertificateDer::from(certified.cert.der().to_vec());
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(
            rustls::pki_types::PrivatePkcs8KeyDer::from(certified.signing_key.serialize_der()),
        );
        let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let mut names = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                let Ok(mut tls) = acceptor.accept(socket).await else {
                    continue;
                };
                names.push(tls.get_ref().1.server_name().map(str::to_string));
                let mut request = vec![0u8; 2048];
                let _ = tls.read(&mut request).await;
                let _ = tls
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                    .await;
                let _ = tls.shutdown().await;
                if names.len() == 1 {
                    return names;
                }
            }
            names
        });
        let mut check = http_check(port, "/");
        check.https = true;
        check.tls_server_name = Some("app.internal".into());
        let (status, output) = run(&check, "127.0.0.1".parse().unwrap()).await;
        assert_eq!(
            status, CRITICAL,
            "a self-signed certificate fails verification: {output}"
        );
        assert!(output.contains("TLS"), "{output}");
        check.tls_skip_verify = true;
        let (status, output) = run(&check, "127.0.0.1".parse().unwrap()).await;
        assert_eq!(status, PASSING, "{output}");
        assert!(output.starts_with("GET https://"), "{output}");
        assert_eq!(
            server.await.unwrap(),
            vec![Some("app.internal".to_string())]
        );
    }
}
