//! Pull client for the host agent: resolves references to linux/amd64 image manifests
//! and downloads blobs, verifying every digest.
//!
//! HTTP (the platform's registry, over loopback or the private network) and HTTPS
//! (upstream registries; rustls, trusting Debian's CA bundle plus any extra CA given) with
//! hyper 1 and hyper-util. Authentication: a platform token is sent as `Bearer`; with user name
//! and password, HTTP Basic. A `401` with a `Bearer realm=..` challenge (Docker-style
//! token servers) is answered by fetching a token from the realm and retrying once.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::io::AsyncWriteExt;

use crate::RegistryError;
use crate::digest::{Digest, Hasher};
use crate::egress::{EgressPolicy, EgressRefused};
use crate::manifest::{self, Descriptor, MAX_MANIFEST_SIZE};
use crate::names::{validate_repository, validate_tag};
use crate::tls::Connector;

type Result<T, E = RegistryError> = std::result::Result<T, E>;

/// How long to wait for response headers, and between two pieces of a body.
const IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// A manifest resolved for linux/amd64.
#[derive(Clone, Debug)]
pub struct ResolvedManifest {
    /// Repository the manifest was pulled from (without the host).
    pub repository: String,
    /// Digest of the image manifest (not of the index).
    pub digest: String,
    /// Media type of the image manifest, as served.
    pub media_type: String,
    /// Digest of the index / manifest list the image was picked from, if any.
    pub index_digest: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
    /// The manifest bytes (their digest is `digest`).
    pub raw: Bytes,
}

/// A parsed image reference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageReference {
    /// `host:port` if the reference named one.
    pub host: Option<String>,
    pub repository: String,
    /// A tag or a digest (`latest` if the reference had neither).
    pub reference: String,
}

/// Parses `host:port/repo:tag`, `repo@sha256:..`, `repo:tag@sha256:..`, `repo`.
pub fn parse_reference(s: &str) -> Result<ImageReference> {
    let bad = || RegistryError::NameInvalid(format!("invalid image reference {s:?}"));
    let (name, digest) = match s.split_once('@') {
        Some((n, d)) => (n, Some(d)),
        None => (s, None),
    };
    let (host, name) = match name.split_once('/') {
        Some((first, rest))
            if first.contains('.') || first.contains(':') || first == "localhost" =>
        {
            (Some(first.to_string()), rest)
        }
        _ => (None, name),
    };
    let (repo, tag) = match name.rfind(':') {
        Some(i) if !name[i..].contains('/') => (&name[..i], Some(&name[i + 1..])),
        _ => (name, None),
    };
    validate_repository(repo).map_err(|_| bad())?;
    let reference = match (digest, tag) {
        (Some(d), _) => {
            d.parse::<Digest>()?;
            d.to_string()
        }
        (None, Some(t)) => {
            validate_tag(t)?;
            t.to_string()
        }
        (None, None) => "latest".to_string(),
    };
    Ok(ImageReference {
        host,
        repository: repo.to_string(),
        reference,
    })
}

/// Pull client. Cheap to clone-by-Arc; reuses connections.
///
/// Where it may connect is its [`EgressPolicy`]: by default its own registry's origin at
/// any address, everything else (redirect targets, token servers) only at public
/// addresses. A redirect to another origin must be `https` (blob downloads redirect to a
/// CDN); it never gets the credentials.
pub struct PullClient {
    base: String,
    client: Client<Connector, Full<Bytes>>,
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    egress: std::sync::Arc<EgressPolicy>,
    token: Option<String>,
    basic: Option<(String, String)>,
    /// Bearer tokens obtained from a token server, by scope.
    bearer: Mutex<HashMap<String, String>>,
}

fn basic_header(user: &str, pass: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    )
}

/// Parses `Bearer realm="..",service="..",scope=".."` into its parameters.
fn parse_challenge(v: &str) -> Option<(String, HashMap<String, String>)> {
    let v = v.trim();
    let (scheme, rest) = v.split_once(' ').unwrap_or((v, ""));
    let mut params = HashMap::new();
    let mut rest = rest.trim();
    while !rest.is_empty() {
        let (key, after) = rest.split_once('=')?;
        let key = key
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        let after = after.trim_start();
        let (value, remaining) = if let Some(q) = after.strip_prefix('"') {
            let end = q.find('"')?;
            (&q[..end], &q[end + 1..])
        } else {
            match after.find(',') {
                Some(i) => (&after[..i], &after[i..]),
                None => (after, ""),
            }
        };
        params.insert(key, value.to_string());
        rest = remaining.trim_start().trim_start_matches(',').trim_start();
    }
    Some((scheme.to_ascii_lowercase(), params))
}

fn query_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// At most this many characters of a remote registry's error message are kept.
const ERROR_SUMMARY_CHARS: usize = 200;

/// A remote's error text as it may be shown further: control characters (newlines, escape
/// sequences) become spaces, runs of spaces one, and only the first 200 characters stay.
pub(crate) fn summarize_remote_text(text: &str) -> String {
    let mut out = String::new();
    let mut chars = 0;
    let mut space = false;
    for c in text.trim().chars() {
        let c = if c.is_control() || c.is_whitespace() {
            ' '
        } else {
            c
        };
        if c == ' ' {
            if space {
                continue;
            }
            space = true;
        } else {
            space = false;
        }
        if chars == ERROR_SUMMARY_CHARS {
            out.truncate(out.trim_end().len());
            out.push('…');
            return out;
        }
        out.push(c);
        chars += 1;
    }
    out
}

/// Turns an error response into a [`RegistryError`]; the remote's message is kept only as
/// a short summary ([`summarize_remote_text`]).
async fn error_from(resp: Response<Incoming>) -> RegistryError {
    let status = resp.status();
    let body = Limited::new(resp.into_body(), 64 * 1024)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let (code, message) = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| {
            let e = v.get("errors")?.get(0)?;
            Some((
                e.get("code")?.as_str()?.to_string(),
                e.get("message")
                    .and_then(|m| m.as_str())
                    .unwrap_or_default()
                    .to_string(),
            ))
        })
        .unwrap_or_else(|| (String::new(), String::from_utf8_lossy(&body).into_owned()));
    let message = summarize_remote_text(&message);
    let code = if code.len() <= 64
        && code
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
    {
        code
    } else {
        String::new()
    };
    match (status, code.as_str()) {
        (StatusCode::UNAUTHORIZED, _) => RegistryError::Unauthorized,
        (StatusCode::FORBIDDEN, _) => RegistryError::Denied,
        (StatusCode::TOO_MANY_REQUESTS, _) => RegistryError::TooManyRequests,
        (_, "MANIFEST_UNKNOWN") => RegistryError::ManifestUnknown(message),
        (_, "BLOB_UNKNOWN") => RegistryError::BlobUnknown(message),
        (_, "NAME_UNKNOWN") => RegistryError::NameUnknown(message),
        (StatusCode::NOT_FOUND, _) => RegistryError::ManifestUnknown(message),
        _ => RegistryError::Remote {
            status: status.as_u16(),
            code: if code.is_empty() {
                "UNKNOWN".into()
            } else {
                code
            },
            message,
        },
    }
}

/// The egress refusal somewhere in an error's chain, if the connection was refused.
fn refusal_in<'e>(err: &'e (dyn std::error::Error + 'static)) -> Option<&'e EgressRefused> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = current {
        if let Some(refused) = e.downcast_ref::<EgressRefused>() {
            return Some(refused);
        }
        if let Some(refused) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<EgressRefused>())
        {
            return Some(refused);
        }
        current = e.source();
    }
    None
}

/// An error and its causes, `: `-separated (hyper's own message says only "Connect").
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut current = err.source();
    while let Some(e) = current {
        let cause = e.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
        current = e.source();
    }
    text
}

/// Whether two URLs have the same scheme, host and port.
fn is_same_origin(a: &str, b: &str) -> bool {
    let origin = |url: &str| -> Option<(String, String, u16)> {
        let uri: http::Uri = url.parse().ok()?;
        let scheme = uri.scheme_str()?.to_ascii_lowercase();
        let port = uri
            .port_u16()
            .unwrap_or(if scheme == "https" { 443 } else { 80 });
        Some((scheme, uri.host()?.to_ascii_lowercase(), port))
    };
    matches!((origin(a), origin(b)), (Some(x), Some(y)) if x == y)
}

impl PullClient {
    /// A client for the registry at `registry_url` (`http://127.0.0.1:4280`), sending
    /// `token` (if any) as a Bearer token.
    ///
    /// The registry's own origin may be at any address (it is the platform's registry, or
    /// one the operator configured); see [`PullClient::with_egress`] for a registry a
    /// tenant named.
    pub fn new(registry_url: &str, token: Option<String>) -> Self {
        let base = registry_url.trim_end_matches('/').to_string();
        let egress = std::sync::Arc::new(EgressPolicy::public_only().trust(&base));
        PullClient {
            client: Self::build(None, egress.clone()),
            base,
            tls: None,
            egress,
            token,
            basic: None,
            bearer: Mutex::new(HashMap::new()),
        }
    }

    /// A client that authenticates with HTTP Basic credentials.
    pub fn with_basic_auth(registry_url: &str, username: &str, password: &str) -> Self {
        let mut c = PullClient::new(registry_url, None);
        c.basic = Some((username.to_string(), password.to_string()));
        c
    }

    fn build(
        tls: Option<std::sync::Arc<rustls::ClientConfig>>,
        egress: std::sync::Arc<EgressPolicy>,
    ) -> Client<Connector, Full<Bytes>> {
        Client::builder(TokioExecutor::new()).build(Connector::new(tls, egress))
    }

    /// Also trusts the CA certificates in `pem` for HTTPS registries.
    pub fn with_extra_root_certificates(self, pem: &[u8]) -> Result<Self> {
        let cfg = crate::tls::config_with_extra_roots(pem)?;
        Ok(self.with_tls_config(cfg))
    }

    pub(crate) fn with_tls_config(mut self, cfg: std::sync::Arc<rustls::ClientConfig>) -> Self {
        self.tls = Some(cfg);
        self.client = Self::build(self.tls.clone(), self.egress.clone());
        self
    }

    /// Replaces where the client may connect: for a registry a tenant named, pass
    /// [`EgressPolicy::public_only`] (plus the origins the operator allows), so the
    /// registry's own address is checked like any other.
    pub fn with_egress(mut self, egress: EgressPolicy) -> Self {
        self.egress = std::sync::Arc::new(egress);
        self.client = Self::build(self.tls.clone(), self.egress.clone());
        self
    }

    fn auth_header(&self, scope: &str) -> Option<String> {
        if let Some(t) = self
            .bearer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(scope)
        {
            return Some(format!("Bearer {t}"));
        }
        if let Some(t) = &self.token {
            return Some(format!("Bearer {t}"));
        }
        self.basic.as_ref().map(|(u, p)| basic_header(u, p))
    }

    async fn raw_request(
        &self,
        method: &Method,
        url: &str,
        accept: Option<&str>,
        auth: Option<&str>,
    ) -> Result<Response<Incoming>> {
        let mut b = Request::builder().method(method.clone()).uri(url);
        if let Some(a) = accept {
            b = b.header(header::ACCEPT, a);
        }
        if let Some(a) = auth {
            b = b.header(header::AUTHORIZATION, a);
        }
        let req = b
            .body(Full::new(Bytes::new()))
            .map_err(|e| RegistryError::Http(format!("building request for {url}: {e}")))?;
        match tokio::time::timeout(IDLE_TIMEOUT, self.client.request(req)).await {
            Ok(r) => r.map_err(|e| match refusal_in(&e) {
                Some(refused) => RegistryError::Refused(refused.to_string()),
                None => RegistryError::Http(format!("{method} {url}: {}", error_chain(&e))),
            }),
            Err(_) => Err(RegistryError::Http(format!(
                "{method} {url}: no response within {IDLE_TIMEOUT:?}"
            ))),
        }
    }

    /// Fetches a token from a Bearer challenge's realm and caches it for `scope`.
    async fn fetch_bearer(&self, scope: &str, params: &HashMap<String, String>) -> Result<()> {
        let realm = params
            .get("realm")
            .ok_or_else(|| RegistryError::Http("Bearer challenge without realm".into()))?;
        if !realm.starts_with("https://") && !is_same_origin(realm, &self.base) {
            return Err(RegistryError::Refused(format!(
                "refusing a token server of {} that is neither https nor the registry itself",
                self.base
            )));
        }
        let mut url = format!("{realm}?");
        if let Some(service) = params.get("service") {
            url.push_str(&format!("service={}&", query_encode(service)));
        }
        let scope_param = params.get("scope").map(String::as_str).unwrap_or(scope);
        url.push_str(&format!("scope={}", query_encode(scope_param)));
        let auth = match (&self.basic, &self.token) {
            (Some((u, p)), _) => Some(basic_header(u, p)),
            (None, Some(t)) => Some(basic_header("aloft", t)),
            (None, None) => None,
        };
        let resp = self
            .raw_request(&Method::GET, &url, None, auth.as_deref())
            .await?;
        if !resp.status().is_success() {
            return Err(error_from(resp).await);
        }
        let body = Limited::new(resp.into_body(), 1024 * 1024)
            .collect()
            .await
            .map_err(|e| RegistryError::Http(format!("reading token response: {e}")))?
            .to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| RegistryError::Http(format!("token response is not JSON: {e}")))?;
        let token = v
            .get("token")
            .or_else(|| v.get("access_token"))
            .and_then(|t| t.as_str())
            .ok_or_else(|| RegistryError::Http("token response without token".into()))?;
        self.bearer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(scope.to_string(), token.to_string());
        Ok(())
    }

    /// Sends a request to `path` (starting with `/v2/`), answering auth challenges and
    /// following redirects. Returns the successful response.
    async fn send(
        &self,
        method: Method,
        path: &str,
        accept: Option<&str>,
        repo: &str,
    ) -> Result<Response<Incoming>> {
        let scope = format!("repository:{repo}:pull");
        let mut url = format!("{}{}", self.base, path);
        let mut same_origin = true;
        let mut auth_retried = false;
        for _ in 0..8 {
            let auth = if same_origin {
                self.auth_header(&scope)
            } else {
                None
            };
            let resp = self
                .raw_request(&method, &url, accept, auth.as_deref())
                .await?;
            let status = resp.status();
            if status.is_success() {
                return Ok(resp);
            }
            if status.is_redirection()
                && let Some(loc) = resp.headers().get(header::LOCATION)
            {
                let loc = loc
                    .to_str()
                    .map_err(|_| RegistryError::Http("bad redirect location".into()))?;
                if loc.starts_with('/') && !loc.starts_with("//") {
                    url = format!("{}{}", self.base, loc);
                } else {
                    // Another origin (a CDN for blobs) only over https, never with the
                    // credentials, and only at an address the egress policy allows.
                    same_origin = is_same_origin(loc, &self.base);
                    if !same_origin && !loc.starts_with("https://") {
                        return Err(RegistryError::Refused(format!(
                            "refusing a redirect from {} to another origin that is not https",
                            self.base
                        )));
                    }
                    url = loc.to_string();
                }
                continue;
            }
            if status == StatusCode::UNAUTHORIZED && same_origin && !auth_retried {
                auth_retried = true;
                let challenge = resp
                    .headers()
                    .get(header::WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_challenge);
                if let Some((scheme, params)) = challenge
                    && scheme == "bearer"
                {
                    self.fetch_bearer(&scope, &params).await?;
                    continue;
                }
            }
            return Err(error_from(resp).await);
        }
        Err(RegistryError::Http(format!(
            "too many redirects for {path}"
        )))
    }

    /// `GET /v2/`: checks that the registry answers and accepts the credentials.
    pub async fn ping(&self) -> Result<()> {
        let resp = self.send(Method::GET, "/v2/", None, "").await?;
        drop(resp);
        Ok(())
    }

    /// Fetches a manifest as served (`reference` is a tag or digest) and verifies its
    /// digest: against the reference if it is a digest, else against the
    /// `Docker-Content-Digest` header if present. Returns bytes, media type and digest.
    pub async fn fetch_manifest(
        &self,
        repo: &str,
        reference: &str,
    ) -> Result<(Bytes, String, Digest)> {
        validate_repository(repo)?;
        let resp = self
            .send(
                Method::GET,
                &format!("/v2/{repo}/manifests/{reference}"),
                Some(manifest::ACCEPT_ALL),
                repo,
            )
            .await?;
        let headers: HeaderMap = resp.headers().clone();
        let body = Limited::new(resp.into_body(), MAX_MANIFEST_SIZE)
            .collect()
            .await
            .map_err(|e| RegistryError::Http(format!("reading manifest {repo}:{reference}: {e}")))?
            .to_bytes();
        let expected: Option<Digest> = if Digest::looks_like_digest(reference) {
            Some(reference.parse()?)
        } else {
            match headers
                .get("docker-content-digest")
                .and_then(|v| v.to_str().ok())
            {
                Some(h) => Some(h.parse()?),
                None => None,
            }
        };
        let digest = match expected {
            Some(exp) => {
                let actual = Digest::of(exp.algorithm(), &body);
                if actual != exp {
                    return Err(RegistryError::DigestMismatch {
                        expected: exp.to_string(),
                        actual: actual.to_string(),
                    });
                }
                exp
            }
            None => Digest::of(crate::Algorithm::Sha256, &body),
        };
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_string();
        let parsed = manifest::parse_manifest(&content_type, &body)?;
        Ok((body, parsed.media_type, digest))
    }

    /// Resolves `reference` (`host:port/repo:tag` or `repo@sha256:..`; the host part is
    /// ignored, the client talks to its own registry) to the linux/amd64 image manifest,
    /// following an index or manifest list, verifying digests.
    pub async fn manifest(&self, reference: &str) -> Result<ResolvedManifest> {
        let r = parse_reference(reference)?;
        let (mut body, mut media_type, mut digest) =
            self.fetch_manifest(&r.repository, &r.reference).await?;
        let mut index_digest = None;
        for _ in 0..4 {
            let parsed = manifest::parse_manifest(&media_type, &body)?;
            if !parsed.is_index() {
                let config = parsed.config.ok_or_else(|| {
                    RegistryError::ManifestInvalid(format!("{reference}: manifest without config"))
                })?;
                return Ok(ResolvedManifest {
                    repository: r.repository,
                    digest: digest.to_string(),
                    media_type,
                    index_digest,
                    config,
                    layers: parsed.layers,
                    raw: body,
                });
            }
            let pick = parsed
                .manifests
                .iter()
                .filter(|m| {
                    m.platform
                        .as_ref()
                        .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
                })
                .min_by_key(|m| {
                    m.platform
                        .as_ref()
                        .and_then(|p| p.variant.clone())
                        .map(|v| if v == "v1" { 1 } else { 2 })
                        .unwrap_or(0)
                })
                .ok_or_else(|| {
                    RegistryError::ManifestUnknown(format!(
                        "{reference}: no linux/amd64 image in the index"
                    ))
                })?;
            let child: Digest = pick.digest.parse()?;
            index_digest.get_or_insert_with(|| digest.to_string());
            let (b, m, d) = self
                .fetch_manifest(&r.repository, &child.to_string())
                .await?;
            if b.len() as u64 != pick.size {
                return Err(RegistryError::ManifestInvalid(format!(
                    "{child}: index says {} bytes, got {}",
                    pick.size,
                    b.len()
                )));
            }
            (body, media_type, digest) = (b, m, d);
        }
        Err(RegistryError::ManifestInvalid(format!(
            "{reference}: indexes nested too deeply"
        )))
    }

    async fn blob_response(&self, repo: &str, digest: &Digest) -> Result<Response<Incoming>> {
        validate_repository(repo)?;
        self.send(
            Method::GET,
            &format!("/v2/{repo}/blobs/{digest}"),
            None,
            repo,
        )
        .await
    }

    /// Downloads a blob into `dest`: streamed to a temporary file beside it, verified,
    /// flushed and renamed. On any error `dest` is left untouched.
    pub async fn blob_to_file(&self, repo: &str, digest: &str, dest: &Path) -> Result<()> {
        let expected: Digest = digest.parse()?;
        let parent = dest
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or_else(|| Path::new("."));
        tokio::fs::create_dir_all(parent).await?;
        let file_name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "blob".into());
        let tmp = parent.join(format!(".{file_name}.{}.part", crate::storage::random_id()));
        let result = self.download(repo, &expected, &tmp).await;
        match result {
            Ok(()) => {
                if let Err(e) = tokio::fs::rename(&tmp, dest).await {
                    let _ = tokio::fs::remove_file(&tmp).await;
                    return Err(e.into());
                }
                Ok(())
            }
            Err(e) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                Err(e)
            }
        }
    }

    async fn download(&self, repo: &str, expected: &Digest, tmp: &Path) -> Result<()> {
        let resp = self.blob_response(repo, expected).await?;
        let mut body = resp.into_body();
        let mut file = tokio::fs::File::create(tmp).await?;
        let mut hasher = Hasher::new(expected.algorithm());
        loop {
            let frame = match tokio::time::timeout(IDLE_TIMEOUT, body.frame()).await {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(_) => {
                    return Err(RegistryError::Http(format!(
                        "blob {expected}: download stalled for {IDLE_TIMEOUT:?}"
                    )));
                }
            };
            let frame =
                frame.map_err(|e| RegistryError::Http(format!("reading blob {expected}: {e}")))?;
            if let Ok(data) = frame.into_data() {
                hasher.update(&data);
                file.write_all(&data).await?;
            }
        }
        let actual = hasher.finish();
        if &actual != expected {
            return Err(RegistryError::DigestMismatch {
                expected: expected.to_string(),
                actual: actual.to_string(),
            });
        }
        file.flush().await?;
        file.sync_all().await?;
        Ok(())
    }

    /// Downloads a blob into memory and verifies it.
    pub async fn blob_bytes(&self, repo: &str, digest: &str) -> Result<Bytes> {
        let expected: Digest = digest.parse()?;
        let resp = self.blob_response(repo, &expected).await?;
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| RegistryError::Http(format!("reading blob {expected}: {e}")))?
            .to_bytes();
        let actual = Digest::of(expected.algorithm(), &body);
        if actual != expected {
            return Err(RegistryError::DigestMismatch {
                expected: expected.to_string(),
                actual: actual.to_string(),
            });
        }
        Ok(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn references() {
        let r = parse_reference("127.0.0.1:4280/org/app:v3").expect("parse");
        assert_eq!(r.host.as_deref(), Some("127.0.0.1:4280"));
        assert_eq!(r.repository, "org/app");
        assert_eq!(r.reference, "v3");
        let r = parse_reference(&format!("app@{D}")).expect("parse");
        assert_eq!(
            (r.host, r.repository.as_str(), r.reference.as_str()),
            (None, "app", D)
        );
        let r = parse_reference(&format!("localhost/app:v1@{D}")).expect("parse");
        assert_eq!(r.reference, D);
        assert_eq!(r.repository, "app");
        let r = parse_reference("library/debian").expect("parse");
        assert_eq!(r.reference, "latest");
        assert!(parse_reference("App:x").is_err());
        assert!(parse_reference("app@sha256:zz").is_err());
        assert!(parse_reference("app:-bad").is_err());
    }

    #[test]
    fn challenges() {
        let (s, p) = parse_challenge(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#,
        )
        .expect("parse");
        assert_eq!(s, "bearer");
        assert_eq!(p["realm"], "https://auth.example/token");
        assert_eq!(p["service"], "registry.example");
        assert_eq!(p["scope"], "repository:a/b:pull,push");
        let (s, p) = parse_challenge(r#"Basic realm="aloft""#).expect("parse");
        assert_eq!(s, "basic");
        assert_eq!(p["realm"], "aloft");
    }
}
