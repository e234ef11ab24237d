//! The `/v2/` HTTP API.

use std::io::SeekFrom;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use base64::Engine as _;
use futures_util::StreamExt;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use crate::digest::{Algorithm, Digest, Hasher};
use crate::manifest::{self, MAX_MANIFEST_SIZE};
use crate::names::{Route, parse_route, validate_repository, validate_tag};
use crate::{Action, AuthError, Registry, RegistryError, UploadHash};

type Result<T, E = RegistryError> = std::result::Result<T, E>;

pub(crate) fn router(reg: Arc<Registry>) -> Router {
    Router::new()
        .route("/v2", any(dispatch))
        .route("/v2/", any(dispatch))
        .route("/v2/{*rest}", any(dispatch))
        .with_state(reg)
}

async fn dispatch(State(reg): State<Arc<Registry>>, req: Request) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let result = match parse_route(&path) {
        Some(route) => handle(&reg, route, req).await,
        None => Err(RegistryError::EndpointUnknown(path.clone())),
    };
    let mut resp = result.unwrap_or_else(IntoResponse::into_response);
    tracing::debug!(%method, %path, status = resp.status().as_u16(), "registry request");
    resp.headers_mut().insert(
        "docker-distribution-api-version",
        HeaderValue::from_static("registry/2.0"),
    );
    resp
}

/// Query parameters, percent-decoded, in order (keys may repeat).
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(q: Option<&str>) -> Query {
        let mut out = Vec::new();
        for pair in q.unwrap_or_default().split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            out.push((percent_decode(k), percent_decode(v)));
        }
        Query(out)
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn all(&self, key: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let hex = |c: u8| (c as char).to_digit(16).map(|v| v as u8);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h * 16 + l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The token of the request: a Bearer token, or the password of Basic credentials.
fn request_token(headers: &HeaderMap) -> Result<Option<String>> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value
        .to_str()
        .map_err(|_| RegistryError::Unauthorized)?
        .trim();
    let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        if rest.is_empty() {
            return Err(RegistryError::Unauthorized);
        }
        return Ok(Some(rest.to_string()));
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(rest)
            .map_err(|_| RegistryError::Unauthorized)?;
        let creds = String::from_utf8(raw).map_err(|_| RegistryError::Unauthorized)?;
        let (user, pass) = creds.split_once(':').unwrap_or((creds.as_str(), ""));
        let token = if pass.is_empty() { user } else { pass };
        if token.is_empty() {
            return Ok(None);
        }
        return Ok(Some(token.to_string()));
    }
    Err(RegistryError::Unauthorized)
}

fn header_value(s: &str) -> Result<HeaderValue> {
    HeaderValue::from_str(s).map_err(|_| RegistryError::Internal(format!("bad header value {s:?}")))
}

fn build(builder: http::response::Builder, body: Body) -> Result<Response> {
    builder
        .body(body)
        .map_err(|e| RegistryError::Internal(format!("building response: {e}")))
}

fn json_response(status: StatusCode, value: &serde_json::Value) -> Result<Response> {
    build(
        Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, "application/json"),
        Body::from(value.to_string()),
    )
}

/// Runs blocking storage work off the async threads.
async fn blocking<T, F>(reg: &Arc<Registry>, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce(&Registry) -> Result<T> + Send + 'static,
{
    let reg = reg.clone();
    tokio::task::spawn_blocking(move || f(&reg))
        .await
        .map_err(|e| RegistryError::Internal(format!("storage task failed: {e}")))?
}

impl Registry {
    pub(crate) fn check(&self, token: Option<&str>, repo: &str, action: Action) -> Result<()> {
        match self.auth.authorize(token, repo, action) {
            Ok(()) => Ok(()),
            Err(AuthError::Unauthenticated) => Err(RegistryError::Unauthorized),
            Err(AuthError::Denied) => Err(RegistryError::Denied),
        }
    }

    /// For endpoints without a repository: is the token known at all?
    fn check_authenticated(&self, token: Option<&str>) -> Result<()> {
        match self.auth.authorize(token, "", Action::Pull) {
            Err(AuthError::Unauthenticated) => Err(RegistryError::Unauthorized),
            _ => Ok(()),
        }
    }

    fn upload_state(&self, id: &str) -> Arc<tokio::sync::Mutex<UploadHash>> {
        let mut map = self.uploads.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(id.to_string())
            .or_insert_with(|| {
                Arc::new(tokio::sync::Mutex::new(UploadHash {
                    offset: 0,
                    hasher: Some(Hasher::new(Algorithm::Sha256)),
                }))
            })
            .clone()
    }

    fn forget_upload(&self, id: &str) {
        let mut map = self.uploads.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(id);
    }
}

async fn handle(reg: &Arc<Registry>, route: Route, req: Request) -> Result<Response> {
    let token = request_token(req.headers())?;
    let token = token.as_deref();
    let method = req.method().clone();
    let query = Query::parse(req.uri().query());
    match route {
        Route::Base => {
            reg.check_authenticated(token)?;
            json_response(StatusCode::OK, &serde_json::json!({}))
        }
        Route::Token => token_endpoint(reg, token, &query),
        Route::Catalog => catalog(reg, token, &query).await,
        Route::Tags { name } => {
            validate_repository(&name)?;
            reg.check(token, &name, Action::Pull)?;
            only(&method, &[Method::GET, Method::HEAD])?;
            tags_list(reg, &name, &query).await
        }
        Route::Manifest { name, reference } => {
            validate_repository(&name)?;
            match method {
                Method::GET | Method::HEAD => {
                    reg.check(token, &name, Action::Pull)?;
                    get_manifest(reg, &name, &reference, method == Method::HEAD).await
                }
                Method::PUT => {
                    reg.check(token, &name, Action::Push)?;
                    put_manifest(reg, &name, &reference, &query, req).await
                }
                Method::DELETE => {
                    reg.check(token, &name, Action::Delete)?;
                    delete_manifest(reg, &name, &reference).await
                }
                _ => Err(RegistryError::Unsupported(method.to_string())),
            }
        }
        Route::Blob { name, digest } => {
            validate_repository(&name)?;
            match method {
                Method::GET | Method::HEAD => {
                    reg.check(token, &name, Action::Pull)?;
                    let d: Digest = digest.parse()?;
                    get_blob(reg, &name, &d, method == Method::HEAD, req.headers()).await
                }
                Method::DELETE => {
                    reg.check(token, &name, Action::Delete)?;
                    let d: Digest = digest.parse()?;
                    blocking(reg, move |r| r.store.unlink_blob(&name, &d)).await?;
                    build(
                        Response::builder()
                            .status(StatusCode::ACCEPTED)
                            .header(header::CONTENT_LENGTH, "0"),
                        Body::empty(),
                    )
                }
                _ => Err(RegistryError::Unsupported(method.to_string())),
            }
        }
        Route::UploadStart { name } => {
            validate_repository(&name)?;
            reg.check(token, &name, Action::Push)?;
            only(&method, &[Method::POST])?;
            start_upload(reg, token, &name, &query, req).await
        }
        Route::Upload { name, id } => {
            validate_repository(&name)?;
            reg.check(token, &name, Action::Push)?;
            // The session must exist and belong to this repository before anything else.
            let size = blocking(reg, {
                let (name, id) = (name.clone(), id.clone());
                move |r| r.store.upload_size(&name, &id)
            })
            .await?;
            match method {
                Method::GET => upload_status(&name, &id, size, StatusCode::NO_CONTENT),
                Method::PATCH => patch_upload(reg, &name, &id, req).await,
                Method::PUT => put_upload(reg, &name, &id, &query, req).await,
                Method::DELETE => {
                    let state = reg.upload_state(&id);
                    let _guard = state.lock().await;
                    let i2 = id.clone();
                    blocking(reg, move |r| {
                        r.store.cancel_upload(&i2);
                        Ok(())
                    })
                    .await?;
                    reg.forget_upload(&id);
                    build(
                        Response::builder()
                            .status(StatusCode::NO_CONTENT)
                            .header(header::CONTENT_LENGTH, "0"),
                        Body::empty(),
                    )
                }
                _ => Err(RegistryError::Unsupported(method.to_string())),
            }
        }
        Route::Referrers { name, digest } => {
            validate_repository(&name)?;
            reg.check(token, &name, Action::Pull)?;
            only(&method, &[Method::GET, Method::HEAD])?;
            let d: Digest = digest.parse()?;
            referrers(reg, &name, &d, query.get("artifactType")).await
        }
    }
}

fn only(method: &Method, allowed: &[Method]) -> Result<()> {
    if allowed.contains(method) {
        Ok(())
    } else {
        Err(RegistryError::Unsupported(method.to_string()))
    }
}

/// `GET /v2/token?service=..&scope=repository:name:pull,push`: Docker-style token
/// endpoint. The platform token itself is the bearer token, so the answer echoes the
/// presented credentials once they have been checked against the requested scopes.
fn token_endpoint(reg: &Registry, token: Option<&str>, query: &Query) -> Result<Response> {
    reg.check_authenticated(token)?;
    for scope in query.all("scope") {
        for s in scope.split(' ') {
            let mut parts = s.splitn(3, ':');
            let (Some("repository"), Some(name), Some(actions)) =
                (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            for a in actions.split(',') {
                let action = match a {
                    "pull" => Action::Pull,
                    "push" => Action::Push,
                    "delete" => Action::Delete,
                    _ => continue,
                };
                // Denied scopes are simply not granted (the later request gets 403).
                if let Err(AuthError::Unauthenticated) = reg.auth.authorize(token, name, action) {
                    return Err(RegistryError::Unauthorized);
                }
            }
        }
    }
    let token = token.unwrap_or_default();
    json_response(
        StatusCode::OK,
        &serde_json::json!({
            "token": token,
            "access_token": token,
            "expires_in": 3600,
        }),
    )
}

async fn catalog(reg: &Arc<Registry>, token: Option<&str>, query: &Query) -> Result<Response> {
    reg.check_authenticated(token)?;
    let repos = blocking(reg, |r| r.store.repositories()).await?;
    let visible: Vec<String> = repos
        .into_iter()
        .filter(|name| reg.auth.authorize(token, name, Action::Pull).is_ok())
        .collect();
    let (page, next) = paginate(visible, query)?;
    let mut builder = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json");
    if let Some((n, last)) = next {
        builder = builder.header(
            header::LINK,
            header_value(&format!(
                "</v2/_catalog?n={n}&last={}>; rel=\"next\"",
                percent_encode(&last)
            ))?,
        );
    }
    build(
        builder,
        Body::from(serde_json::json!({ "repositories": page }).to_string()),
    )
}

/// Applies `n` and `last` to a sorted list. Returns the page and, if more entries
/// follow, `(n, last entry of the page)` for the Link header.
/// A page of names and, if more follow, `(n, last)` for the next page's link.
type Page = (Vec<String>, Option<(usize, String)>);

fn paginate(items: Vec<String>, query: &Query) -> Result<Page> {
    let n = match query.get("n") {
        Some(n) => Some(n.parse::<usize>().map_err(|_| {
            RegistryError::BadRequest(format!("invalid pagination parameter n={n:?}"))
        })?),
        None => None,
    };
    let mut items: Vec<String> = match query.get("last") {
        Some(last) => items.into_iter().filter(|t| t.as_str() > last).collect(),
        None => items,
    };
    let Some(n) = n else {
        return Ok((items, None));
    };
    if items.len() > n {
        items.truncate(n);
        let next = items.last().cloned().map(|last| (n, last));
        return Ok((items, next));
    }
    Ok((items, None))
}

async fn tags_list(reg: &Arc<Registry>, name: &str, query: &Query) -> Result<Response> {
    let n2 = name.to_string();
    let tags = blocking(reg, move |r| r.store.tags(&n2)).await?;
    let names: Vec<String> = tags.into_iter().map(|t| t.name).collect();
    let (page, next) = paginate(names, query)?;
    let mut builder = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json");
    if let Some((n, last)) = next {
        builder = builder.header(
            header::LINK,
            header_value(&format!(
                "</v2/{name}/tags/list?n={n}&last={}>; rel=\"next\"",
                percent_encode(&last)
            ))?,
        );
    }
    build(
        builder,
        Body::from(serde_json::json!({ "name": name, "tags": page }).to_string()),
    )
}

async fn get_manifest(
    reg: &Arc<Registry>,
    name: &str,
    reference: &str,
    head: bool,
) -> Result<Response> {
    let (digest, media_type, body) = if Digest::looks_like_digest(reference) {
        let d: Digest = reference.parse()?;
        let (n2, d2) = (name.to_string(), d.clone());
        match blocking(reg, move |r| r.store.read_manifest(&n2, &d2)).await {
            Ok((meta, body)) => (d, meta.media_type, body),
            Err(e) if e.is_not_found() => match reg.upstream_for(name) {
                Some(up) => up.manifest(reg, name, reference).await?,
                None => return Err(e),
            },
            Err(e) => return Err(e),
        }
    } else {
        validate_tag(reference)?;
        if let Some(up) = reg.upstream_for(name) {
            up.manifest(reg, name, reference).await?
        } else {
            let (n2, t2) = (name.to_string(), reference.to_string());
            let (d, _) = blocking(reg, move |r| r.store.resolve_tag(&n2, &t2))
                .await?
                .ok_or_else(|| RegistryError::ManifestUnknown(format!("{name}:{reference}")))?;
            let (n2, d2) = (name.to_string(), d.clone());
            let (meta, body) = blocking(reg, move |r| r.store.read_manifest(&n2, &d2)).await?;
            (d, meta.media_type, body)
        }
    };
    let builder = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, header_value(&media_type)?)
        .header(header::CONTENT_LENGTH, body.len())
        .header("docker-content-digest", header_value(&digest.to_string())?)
        .header(header::ETAG, header_value(&format!("\"{digest}\""))?);
    build(
        builder,
        if head {
            Body::empty()
        } else {
            Body::from(body)
        },
    )
}

async fn put_manifest(
    reg: &Arc<Registry>,
    name: &str,
    reference: &str,
    query: &Query,
    req: Request,
) -> Result<Response> {
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let body = axum::body::to_bytes(req.into_body(), MAX_MANIFEST_SIZE)
        .await
        .map_err(|e| {
            RegistryError::TooLarge(format!(
                "manifest larger than {MAX_MANIFEST_SIZE} bytes or unreadable: {e}"
            ))
        })?;
    let parsed = manifest::parse_manifest(&content_type, &body)?;
    let mut tags = Vec::new();
    let digest = if Digest::looks_like_digest(reference) {
        let expected: Digest = reference.parse()?;
        let actual = Digest::of(expected.algorithm(), &body);
        if actual != expected {
            return Err(RegistryError::DigestInvalid(format!(
                "manifest digest is {actual}, not {expected}"
            )));
        }
        expected
    } else {
        validate_tag(reference)?;
        tags.push(reference.to_string());
        Digest::of(Algorithm::Sha256, &body)
    };
    for t in query.all("tag") {
        validate_tag(t)?;
        tags.push(t.to_string());
    }
    let subject = parsed.subject.as_ref().map(|s| s.digest.clone());
    let (n2, d2) = (name.to_string(), digest.clone());
    blocking(reg, move |r| {
        r.store.put_manifest(&n2, &d2, &body, &parsed, &tags, true)
    })
    .await?;
    tracing::info!(repo = name, reference, digest = %digest, "manifest pushed");
    let mut builder = Response::builder()
        .status(StatusCode::CREATED)
        .header(
            header::LOCATION,
            header_value(&format!("/v2/{name}/manifests/{digest}"))?,
        )
        .header("docker-content-digest", header_value(&digest.to_string())?)
        .header(header::CONTENT_LENGTH, "0");
    if let Some(s) = subject {
        builder = builder.header("oci-subject", header_value(&s)?);
    }
    build(builder, Body::empty())
}

async fn delete_manifest(reg: &Arc<Registry>, name: &str, reference: &str) -> Result<Response> {
    let n2 = name.to_string();
    if Digest::looks_like_digest(reference) {
        let d: Digest = reference.parse()?;
        blocking(reg, move |r| r.store.delete_manifest(&n2, &d)).await?;
    } else {
        validate_tag(reference)?;
        let t2 = reference.to_string();
        blocking(reg, move |r| r.store.delete_tag(&n2, &t2)).await?;
    }
    build(
        Response::builder()
            .status(StatusCode::ACCEPTED)
            .header(header::CONTENT_LENGTH, "0"),
        Body::empty(),
    )
}

/// Parses `Range: bytes=a-b` (one range). `Ok(None)` when absent.
fn parse_get_range(headers: &HeaderMap, size: u64) -> Result<Option<(u64, u64)>> {
    let Some(v) = headers.get(header::RANGE) else {
        return Ok(None);
    };
    let bad = || RegistryError::RangeInvalid(format!("{v:?} for a blob of {size} bytes"));
    let s = v.to_str().map_err(|_| bad())?;
    let spec = s.strip_prefix("bytes=").ok_or_else(bad)?;
    let (a, b) = spec.split_once('-').ok_or_else(bad)?;
    let (start, end) = if a.is_empty() {
        // Suffix range: the last b bytes.
        let n: u64 = b.parse().map_err(|_| bad())?;
        if n == 0 || size == 0 {
            return Err(bad());
        }
        (size.saturating_sub(n), size - 1)
    } else {
        let start: u64 = a.parse().map_err(|_| bad())?;
        let end: u64 = if b.is_empty() {
            size.saturating_sub(1)
        } else {
            b.parse::<u64>()
                .map_err(|_| bad())?
                .min(size.saturating_sub(1))
        };
        (start, end)
    };
    if start >= size || end < start {
        return Err(bad());
    }
    Ok(Some((start, end)))
}

async fn get_blob(
    reg: &Arc<Registry>,
    name: &str,
    d: &Digest,
    head: bool,
    headers: &HeaderMap,
) -> Result<Response> {
    let (n2, d2) = (name.to_string(), d.clone());
    let found = blocking(reg, move |r| Ok(r.store.repo_blob(&n2, &d2))).await?;
    let (path, size) = match found {
        Some(x) => x,
        None => match reg.upstream_for(name) {
            Some(up) => up.blob(reg, name, d).await?,
            None => return Err(RegistryError::BlobUnknown(d.to_string())),
        },
    };
    let range = parse_get_range(headers, size)?;
    let mut builder = Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header("docker-content-digest", header_value(&d.to_string())?)
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::ETAG, header_value(&format!("\"{d}\""))?);
    let (start, len) = match range {
        Some((start, end)) => {
            builder = builder.status(StatusCode::PARTIAL_CONTENT).header(
                header::CONTENT_RANGE,
                header_value(&format!("bytes {start}-{end}/{size}"))?,
            );
            (start, end - start + 1)
        }
        None => {
            builder = builder.status(StatusCode::OK);
            (0, size)
        }
    };
    builder = builder.header(header::CONTENT_LENGTH, len);
    if head {
        return build(builder, Body::empty());
    }
    let mut file = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(RegistryError::BlobUnknown(d.to_string()));
        }
        Err(e) => return Err(e.into()),
    };
    if start > 0 {
        file.seek(SeekFrom::Start(start)).await?;
    }
    let stream = tokio_util::io::ReaderStream::with_capacity(file.take(len), 256 * 1024);
    build(builder, Body::from_stream(stream))
}

fn upload_status(name: &str, id: &str, size: u64, status: StatusCode) -> Result<Response> {
    let end = size.saturating_sub(1);
    build(
        Response::builder()
            .status(status)
            .header(
                header::LOCATION,
                header_value(&format!("/v2/{name}/blobs/uploads/{id}"))?,
            )
            .header(header::RANGE, header_value(&format!("0-{end}"))?)
            .header("docker-upload-uuid", header_value(id)?)
            .header(header::CONTENT_LENGTH, "0"),
        Body::empty(),
    )
}

fn blob_created(name: &str, d: &Digest) -> Result<Response> {
    build(
        Response::builder()
            .status(StatusCode::CREATED)
            .header(
                header::LOCATION,
                header_value(&format!("/v2/{name}/blobs/{d}"))?,
            )
            .header("docker-content-digest", header_value(&d.to_string())?)
            .header(header::CONTENT_LENGTH, "0"),
        Body::empty(),
    )
}

async fn start_upload(
    reg: &Arc<Registry>,
    token: Option<&str>,
    name: &str,
    query: &Query,
    req: Request,
) -> Result<Response> {
    // Cross-repository mount: only from a repository the token may pull, and only a blob
    // linked there. Otherwise fall back to a new upload session, as the spec says.
    if let Some(mount) = query.get("mount") {
        let d: Digest = mount.parse()?;
        if let Some(from) = query.get("from")
            && validate_repository(from).is_ok()
            && reg.check(token, from, Action::Pull).is_ok()
        {
            let (n2, f2, d2) = (name.to_string(), from.to_string(), d.clone());
            let mounted = blocking(reg, move |r| {
                if r.store.repo_blob(&f2, &d2).is_some() {
                    r.store.link_blob(&n2, &d2)?;
                    Ok(true)
                } else {
                    Ok(false)
                }
            })
            .await?;
            if mounted {
                tracing::info!(repo = name, from, digest = %d, "blob mounted");
                return blob_created(name, &d);
            }
        }
    }
    let n2 = name.to_string();
    let id = blocking(reg, move |r| r.store.create_upload(&n2)).await?;
    if let Some(digest) = query.get("digest") {
        // Monolithic upload in one POST.
        let expected: Digest = match digest.parse() {
            Ok(d) => d,
            Err(e) => {
                reg.store.cancel_upload(&id);
                return Err(e);
            }
        };
        let state = reg.upload_state(&id);
        let mut st = state.lock().await;
        let result = async {
            append_body(reg, &id, 0, &mut st, req.into_body()).await?;
            finish(reg, name, &id, &expected, &mut st).await
        }
        .await;
        drop(st);
        reg.forget_upload(&id);
        if result.is_err() {
            reg.store.cancel_upload(&id);
        }
        result?;
        return blob_created(name, &expected);
    }
    upload_status(name, &id, 0, StatusCode::ACCEPTED)
}

/// `Content-Range: <start>-<end>` (also accepts a `bytes ` prefix and `/<total>` suffix).
fn parse_content_range(headers: &HeaderMap) -> Result<Option<(u64, u64)>> {
    let Some(v) = headers.get(header::CONTENT_RANGE) else {
        return Ok(None);
    };
    let bad = || RegistryError::RangeInvalid(format!("invalid Content-Range {v:?}"));
    let s = v.to_str().map_err(|_| bad())?.trim();
    let s = s.strip_prefix("bytes ").unwrap_or(s);
    let s = s.split('/').next().unwrap_or(s);
    let (a, b) = s.split_once('-').ok_or_else(bad)?;
    let a: u64 = a.trim().parse().map_err(|_| bad())?;
    let b: u64 = b.trim().parse().map_err(|_| bad())?;
    if b < a {
        return Err(bad());
    }
    Ok(Some((a, b)))
}

/// Appends a request body to an upload; on failure the upload is cut back to `offset`.
async fn append_body(
    reg: &Arc<Registry>,
    id: &str,
    offset: u64,
    st: &mut UploadHash,
    body: Body,
) -> Result<u64> {
    let path = reg.store.upload_data_path(id);
    let mut file = match tokio::fs::OpenOptions::new().write(true).open(&path).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(RegistryError::BlobUploadUnknown);
        }
        Err(e) => return Err(e.into()),
    };
    file.seek(SeekFrom::Start(offset)).await?;
    if st.offset != offset {
        // Not hashed from the start (e.g. after a restart): hash at completion instead.
        st.hasher = None;
    }
    let mut written = 0u64;
    let mut stream = body.into_data_stream();
    let result: Result<()> = async {
        while let Some(chunk) = stream.next().await {
            let chunk = chunk
                .map_err(|e| RegistryError::BlobUploadInvalid(format!("reading body: {e}")))?;
            file.write_all(&chunk).await?;
            if let Some(h) = st.hasher.as_mut() {
                h.update(&chunk);
            }
            written += chunk.len() as u64;
        }
        file.flush().await?;
        Ok(())
    }
    .await;
    if let Err(e) = result {
        let _ = file.set_len(offset).await;
        st.hasher = None;
        return Err(e);
    }
    st.offset = offset + written;
    Ok(written)
}

/// Appends one chunk after checking its `Content-Range` against the upload's size.
async fn append_chunk(
    reg: &Arc<Registry>,
    name: &str,
    id: &str,
    st: &mut UploadHash,
    req: Request,
) -> Result<u64> {
    let (n2, i2) = (name.to_string(), id.to_string());
    let size = blocking(reg, move |r| r.store.upload_size(&n2, &i2)).await?;
    let range = parse_content_range(req.headers())?;
    if let Some((start, _)) = range
        && start != size
    {
        return Err(RegistryError::RangeInvalid(format!(
            "chunk starts at {start}, upload has {size} bytes"
        )));
    }
    let written = append_body(reg, id, size, st, req.into_body()).await?;
    if let Some((start, end)) = range
        && written != end - start + 1
    {
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .open(reg.store.upload_data_path(id))
            .await?;
        file.set_len(size).await?;
        st.offset = size;
        st.hasher = None;
        return Err(RegistryError::RangeInvalid(format!(
            "Content-Range {start}-{end} but {written} bytes sent"
        )));
    }
    Ok(size + written)
}

async fn patch_upload(reg: &Arc<Registry>, name: &str, id: &str, req: Request) -> Result<Response> {
    let state = reg.upload_state(id);
    let mut st = state.lock().await;
    let size = append_chunk(reg, name, id, &mut st, req).await?;
    upload_status(name, id, size, StatusCode::ACCEPTED)
}

async fn put_upload(
    reg: &Arc<Registry>,
    name: &str,
    id: &str,
    query: &Query,
    req: Request,
) -> Result<Response> {
    let expected: Digest = query
        .get("digest")
        .ok_or_else(|| RegistryError::DigestInvalid("digest parameter missing".into()))?
        .parse()?;
    let state = reg.upload_state(id);
    let mut st = state.lock().await;
    let result = async {
        append_chunk(reg, name, id, &mut st, req).await?;
        finish(reg, name, id, &expected, &mut st).await
    }
    .await;
    drop(st);
    if !matches!(result, Err(RegistryError::RangeInvalid(_))) {
        reg.forget_upload(id);
    }
    result?;
    blob_created(name, &expected)
}

async fn finish(
    reg: &Arc<Registry>,
    name: &str,
    id: &str,
    expected: &Digest,
    st: &mut UploadHash,
) -> Result<u64> {
    let pre = st.hasher.take().map(Hasher::finish);
    let (n2, i2, e2) = (name.to_string(), id.to_string(), expected.clone());
    let size = blocking(reg, move |r| r.store.finish_upload(&n2, &i2, &e2, pre)).await?;
    tracing::info!(repo = name, digest = %expected, size, "blob uploaded");
    Ok(size)
}

async fn referrers(
    reg: &Arc<Registry>,
    name: &str,
    subject: &Digest,
    artifact_type: Option<&str>,
) -> Result<Response> {
    let (n2, s2, a2) = (
        name.to_string(),
        subject.clone(),
        artifact_type.map(str::to_string),
    );
    let list = blocking(reg, move |r| r.store.referrers(&n2, &s2, a2.as_deref())).await?;
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": manifest::OCI_INDEX,
        "manifests": list,
    });
    let mut builder = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, manifest::OCI_INDEX);
    if artifact_type.is_some() {
        builder = builder.header("oci-filters-applied", "artifactType");
    }
    build(builder, Body::from(index.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_and_percent() {
        let q = Query::parse(Some("mount=sha256%3Aab&from=a%2Fb&tag=x&tag=y&n"));
        assert_eq!(q.get("mount"), Some("sha256:ab"));
        assert_eq!(q.get("from"), Some("a/b"));
        assert_eq!(q.all("tag"), vec!["x", "y"]);
        assert_eq!(q.get("n"), Some(""));
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(percent_decode("%zz"), "%zz");
        assert_eq!(percent_encode("a:b/c"), "a%3Ab%2Fc");
    }

    #[test]
    fn tokens() {
        let mut h = HeaderMap::new();
        assert_eq!(request_token(&h).ok(), Some(None));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer abc"),
        );
        assert_eq!(request_token(&h).ok(), Some(Some("abc".into())));
        let b = base64::engine::general_purpose::STANDARD.encode("x:secret:with:colons");
        h.insert(
            header::AUTHORIZATION,
            header_value(&format!("Basic {b}")).expect("hv"),
        );
        assert_eq!(
            request_token(&h).ok(),
            Some(Some("secret:with:colons".into()))
        );
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic !!"));
        assert!(request_token(&h).is_err());
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Digest x"));
        assert!(request_token(&h).is_err());
    }

    #[test]
    fn ranges() {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_RANGE, HeaderValue::from_static("0-99"));
        assert_eq!(parse_content_range(&h).ok(), Some(Some((0, 99))));
        h.insert(
            header::CONTENT_RANGE,
            HeaderValue::from_static("bytes 100-199/*"),
        );
        assert_eq!(parse_content_range(&h).ok(), Some(Some((100, 199))));
        h.insert(header::CONTENT_RANGE, HeaderValue::from_static("9-1"));
        assert!(parse_content_range(&h).is_err());
        let mut g = HeaderMap::new();
        g.insert(header::RANGE, HeaderValue::from_static("bytes=2-5"));
        assert_eq!(parse_get_range(&g, 10).ok(), Some(Some((2, 5))));
        g.insert(header::RANGE, HeaderValue::from_static("bytes=-3"));
        assert_eq!(parse_get_range(&g, 10).ok(), Some(Some((7, 9))));
        g.insert(header::RANGE, HeaderValue::from_static("bytes=10-"));
        assert!(parse_get_range(&g, 10).is_err());
    }

    #[test]
    fn pagination() {
        let items: Vec<String> = ["a", "b", "c", "d"].iter().map(|s| s.to_string()).collect();
        let (p, next) = paginate(items.clone(), &Query::parse(Some("n=2"))).expect("page");
        assert_eq!(p, vec!["a", "b"]);
        assert_eq!(next, Some((2, "b".to_string())));
        let (p, next) = paginate(items.clone(), &Query::parse(Some("n=2&last=b"))).expect("page");
        assert_eq!(p, vec!["c", "d"]);
        assert_eq!(next, None);
        let (p, _) = paginate(items.clone(), &Query::parse(Some("n=0"))).expect("page");
        assert!(p.is_empty());
        assert!(paginate(items, &Query::parse(Some("n=x"))).is_err());
    }
}
