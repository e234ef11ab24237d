//! Pushing OCI images to a registry over HTTP, and copying an image from any registry into
//! the platform's (so hosts pull from one place).
//!
//! Pushes use the distribution spec's monolithic upload (`POST .../blobs/uploads/?digest=`),
//! skip blobs the registry already has, and push the manifest last, so a failed push never
//! leaves a tag pointing at missing content.

use std::path::Path;
use std::time::Duration;

use aloft_registry::client::{PullClient, ResolvedManifest, parse_reference};
use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use sha2::{Digest as _, Sha256};

/// Why a push or a copy failed; every variant names the step.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error("registry {registry} is not reachable: {reason}")]
    Unreachable { registry: String, reason: String },
    #[error("the registry refused {step}: {status} {message}")]
    Refused {
        step: String,
        status: u16,
        message: String,
    },
    #[error("reading the source image {reference}: {reason}")]
    Source { reference: String, reason: String },
    #[error("{0}")]
    Invalid(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
}

/// The sha256 digest of `bytes`, as `sha256:<hex>`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Splits `host:port/repo:tag` into (`host:port`, `repo`, `tag or digest`).
pub fn split_reference(reference: &str) -> Result<(String, String, String), PushError> {
    let parsed = parse_reference(reference)
        .map_err(|e| PushError::Invalid(format!("image reference {reference:?}: {e}")))?;
    let host = parsed.host.ok_or_else(|| {
        PushError::Invalid(format!(
            "image reference {reference:?} names no registry host"
        ))
    })?;
    Ok((host, parsed.repository, parsed.reference))
}

/// A minimal push client for one registry (plain HTTP: the platform's registry on
/// loopback or the private network).
#[derive(Clone)]
pub struct PushClient {
    base: String,
    token: Option<String>,
    http: Client<HttpConnector, Full<Bytes>>,
}

impl PushClient {
    /// `registry` is `host:port` or `http://host:port`.
    pub fn new(registry: &str, token: Option<String>) -> Result<Self, PushError> {
        let base = if registry.starts_with("https://") {
            return Err(PushError::Invalid(format!(
                "pushing to {registry} needs HTTPS, which this client does not speak; use the registry's plain HTTP address"
            )));
        } else if registry.starts_with("http://") {
            registry.trim_end_matches('/').to_string()
        } else {
            format!("http://{}", registry.trim_end_matches('/'))
        };
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        let http = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Ok(Self { base, token, http })
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        body: Bytes,
    ) -> Result<(StatusCode, http::HeaderMap, Bytes), PushError> {
        let url = format!("{}{path}", self.base);
        let mut builder = Request::builder().method(method).uri(&url);
        if let Some(token) = &self.token {
            builder = builder.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        if let Some(content_type) = content_type {
            builder = builder.header(header::CONTENT_TYPE, content_type);
        }
        builder = builder.header(header::CONTENT_LENGTH, body.len());
        let request = builder
            .body(Full::new(body))
            .map_err(|e| PushError::Invalid(e.to_string()))?;
        let exchange = async {
            let response =
                self.http
                    .request(request)
                    .await
                    .map_err(|e| PushError::Unreachable {
                        registry: self.base.clone(),
                        reason: e.to_string(),
                    })?;
            let status = response.status();
            let headers = response.headers().clone();
            let bytes = response
                .into_body()
                .collect()
                .await
                .map_err(|e| PushError::Unreachable {
                    registry: self.base.clone(),
                    reason: e.to_string(),
                })?
                .to_bytes();
            Ok((status, headers, bytes))
        };
        tokio::time::timeout(Duration::from_secs(600), exchange)
            .await
            .map_err(|_| PushError::Unreachable {
                registry: self.base.clone(),
                reason: format!("no answer to {url} within 10 minutes"),
            })?
    }

    fn refused(step: String, status: StatusCode, body: &[u8]) -> PushError {
        // Registry errors are `{"errors":[{"code":..,"message":..}]}`.
        let message = serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .and_then(|v| {
                let first = v.get("errors")?.get(0)?.clone();
                let code = first
                    .get("code")
                    .and_then(|c| c.as_str())
                    .unwrap_or_default()
                    .to_string();
                let message = first
                    .get("message")
                    .and_then(|c| c.as_str())
                    .unwrap_or_default()
                    .to_string();
                Some(format!("({code}) {message}").trim().to_string())
            })
            .unwrap_or_else(|| {
                String::from_utf8_lossy(body)
                    .trim()
                    .chars()
                    .take(200)
                    .collect()
            });
        PushError::Refused {
            step,
            status: status.as_u16(),
            message,
        }
    }

    pub async fn has_blob(&self, repo: &str, digest: &str) -> Result<bool, PushError> {
        let (status, _, body) = self
            .send(
                Method::HEAD,
                &format!("/v2/{repo}/blobs/{digest}"),
                None,
                Bytes::new(),
            )
            .await?;
        match status {
            s if s.is_success() => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            other => Err(Self::refused(
                format!("checking for blob {digest} in {repo}"),
                other,
                &body,
            )),
        }
    }

    /// Uploads `bytes` as blob `digest` unless the repository already has it.
    pub async fn push_blob(&self, repo: &str, digest: &str, bytes: Bytes) -> Result<(), PushError> {
        if self.has_blob(repo, digest).await? {
            return Ok(());
        }
        let path = format!(
            "/v2/{repo}/blobs/uploads/?digest={}",
            digest.replace(':', "%3A")
        );
        let (status, _, body) = self
            .send(Method::POST, &path, Some("application/octet-stream"), bytes)
            .await?;
        if status != StatusCode::CREATED {
            return Err(Self::refused(
                format!("the upload of blob {digest} to {repo}"),
                status,
                &body,
            ));
        }
        Ok(())
    }

    pub async fn push_blob_file(
        &self,
        repo: &str,
        digest: &str,
        path: &Path,
    ) -> Result<(), PushError> {
        if self.has_blob(repo, digest).await? {
            return Ok(());
        }
        let bytes = tokio::fs::read(path)
            .await
            .map_err(|source| PushError::Io {
                context: format!("reading {}", path.display()),
                source,
            })?;
        self.push_blob(repo, digest, Bytes::from(bytes)).await
    }

    /// Pushes a manifest under `reference` (a tag); returns its digest.
    pub async fn push_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<String, PushError> {
        let digest = sha256_digest(&bytes);
        let (status, headers, body) = self
            .send(
                Method::PUT,
                &format!("/v2/{repo}/manifests/{reference}"),
                Some(media_type),
                bytes,
            )
            .await?;
        if status != StatusCode::CREATED {
            return Err(Self::refused(
                format!("the manifest of {repo}:{reference}"),
                status,
                &body,
            ));
        }
        if let Some(answered) = headers
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            && answered != digest
        {
            return Err(PushError::Invalid(format!(
                "the registry stored the manifest as {answered}, not {digest}"
            )));
        }
        Ok(digest)
    }
}

/// Media types of runnable image manifests and their configs.
const IMAGE_MANIFESTS: &[&str] = &[
    aloft_registry::OCI_MANIFEST,
    aloft_registry::DOCKER_MANIFEST,
];
const IMAGE_CONFIGS: &[&str] = &[
    "application/vnd.oci.image.config.v1+json",
    "application/vnd.docker.container.image.v1+json",
];

/// Whether a resolved manifest is a container image a machine can run; the reason if not.
pub fn check_runnable(manifest: &ResolvedManifest) -> Result<(), String> {
    if !IMAGE_MANIFESTS.contains(&manifest.media_type.as_str()) {
        return Err(format!(
            "its manifest has media type {:?}, which is not a container image (expected {} or an index of them)",
            manifest.media_type,
            IMAGE_MANIFESTS.join(" or ")
        ));
    }
    if !IMAGE_CONFIGS.contains(&manifest.config.media_type.as_str()) {
        return Err(format!(
            "its config has media type {:?}, which is not a container image config",
            manifest.config.media_type
        ));
    }
    Ok(())
}

/// What was copied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Copied {
    /// Digest of the image manifest now in the destination.
    pub digest: String,
    pub layers: usize,
    /// Blobs that had to be transferred (the others were already there).
    pub blobs_copied: usize,
}

/// Copies the linux/amd64 image `source` (from `source_registry_url`, e.g.
/// `https://registry.example.com` or `http://127.0.0.1:5000`) into `destination`
/// (`host:port/repo:tag`) on the registry at `destination_url` (plain HTTP).
/// Blobs go first, each verified against its digest; the manifest last.
pub async fn copy_image(
    source: &PullClient,
    source_reference: &str,
    destination: &PushClient,
    destination_reference: &str,
    scratch: &Path,
    mut progress: impl FnMut(&str),
) -> Result<Copied, PushError> {
    let source_error = |reason: String| PushError::Source {
        reference: source_reference.to_string(),
        reason,
    };
    let manifest = source
        .manifest(source_reference)
        .await
        .map_err(|e| source_error(e.to_string()))?;
    check_runnable(&manifest).map_err(source_error)?;
    let (_, repo, tag) = split_reference(destination_reference)?;
    std::fs::create_dir_all(scratch).map_err(|e| PushError::Io {
        context: format!("creating {}", scratch.display()),
        source: e,
    })?;
    let mut blobs: Vec<(String, &str)> = vec![(manifest.config.digest.clone(), "config")];
    blobs.extend(manifest.layers.iter().map(|l| (l.digest.clone(), "layer")));
    let mut copied = 0;
    for (digest, kind) in &blobs {
        if destination.has_blob(&repo, digest).await? {
            continue;
        }
        progress(&format!("copying {kind} {digest}"));
        let file = scratch.join(digest.replace(':', "-"));
        source
            .blob_to_file(&manifest.repository, digest, &file)
            .await
            .map_err(|e| source_error(format!("{kind} {digest}: {e}")))?;
        let pushed = destination.push_blob_file(&repo, digest, &file).await;
        let _ = std::fs::remove_file(&file);
        pushed?;
        copied += 1;
    }
    let digest = destination
        .push_manifest(&repo, &tag, &manifest.media_type, manifest.raw.clone())
        .await?;
    Ok(Copied {
        digest,
        layers: manifest.layers.len(),
        blobs_copied: copied,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_split_into_host_repository_and_tag() {
        assert_eq!(
            split_reference("127.0.0.1:4280/hello:deployment-1").unwrap(),
            (
                "127.0.0.1:4280".to_string(),
                "hello".to_string(),
                "deployment-1".to_string()
            )
        );
        assert!(
            split_reference("hello:latest").is_err(),
            "a reference without a host cannot be pushed"
        );
        assert_eq!(
            sha256_digest(b""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn https_registries_are_refused_with_a_reason() {
        let err = PushClient::new("https://registry.example.com", None)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("HTTPS"), "{err}");
    }
}
