//! OCI distribution registry (distribution-spec v1.1) served by the control plane at
//! `/v2/`, and the pull client the host agent uses.
//!
//! * [`Registry`]: storage ([`RegistryConfig::root`]), HTTP API ([`Registry::router`]),
//!   garbage collection ([`Registry::gc`]) and tag maintenance ([`Registry::delete_tag`],
//!   [`Registry::prune_tags`]).
//! * [`Authorizer`]: the control plane decides which token may do what on which repository.
//! * [`client::PullClient`]: resolves references and downloads verified blobs.
//! * Pull-through: with [`RegistryConfig::upstream`] set, pulls of repositories under the
//!   configured prefix that are not stored locally are fetched from the upstream registry,
//!   verified, cached and served.
//!
//! Authorization: every request is checked with [`Authorizer::authorize`] *before* the
//! registry looks at its storage, and a denied request gets `403 DENIED` whether or not the
//! repository exists, so a token for one app learns nothing about other repositories.
//! `Unauthenticated` gets `401 UNAUTHORIZED` with `WWW-Authenticate: Basic realm="aloft"`.

pub mod client;
mod digest;
mod egress;
mod error;
mod manifest;
mod names;
mod server;
mod storage;
mod tls;
mod upstream;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::Serialize;

pub use client::{PullClient, ResolvedManifest};
pub use digest::{Algorithm, Digest};
pub use egress::{EgressPolicy, EgressRefused, is_public};
pub use error::RegistryError;
pub use manifest::{
    DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, Descriptor, OCI_INDEX, OCI_MANIFEST, Platform,
};
pub use names::{validate_repository, validate_tag};

/// Configuration of a registry instance.
#[derive(Clone, Debug)]
pub struct RegistryConfig {
    /// Directory that holds blobs, manifests, tags and uploads.
    pub root: PathBuf,
    /// Pull-through from an upstream registry; `None` (the default) turns it off.
    pub upstream: Option<UpstreamConfig>,
}

/// Pull-through cache settings.
///
/// A pull of local repository `<prefix>/<rest>` whose manifest or blob is not stored
/// locally is fetched from `<url>` as repository `<rest>`, verified, stored and served.
/// With the prefix `"dockerhub"` and the upstream `https://registry-1.docker.io`, buildah
/// configured with a mirror `location = "<registry>/dockerhub"` for `docker.io` resolves
/// `FROM debian:bookworm-slim` as `dockerhub/library/debian:bookworm-slim` here.
/// Pushes to proxied repositories are stored locally like any other push.
#[derive(Clone, Debug)]
pub struct UpstreamConfig {
    /// Base URL of the upstream registry, e.g. `https://registry-1.docker.io` or
    /// `http://127.0.0.1:5000`. HTTPS trusts Debian's CA bundle and [`Self::ca_file`].
    pub url: String,
    /// Local repository prefix that is proxied (no trailing slash); empty proxies every
    /// repository.
    pub prefix: String,
    /// Credentials for the upstream (HTTP Basic, also used to get Bearer tokens).
    pub username: Option<String>,
    pub password: Option<String>,
    /// How long a tag fetched from upstream is served from the cache before the upstream
    /// is asked again. On upstream errors the cached tag is served regardless of age.
    pub tag_ttl: Duration,
    /// Extra CA certificates (PEM) to trust for an HTTPS upstream.
    pub ca_file: Option<PathBuf>,
    /// Other origins (`host:port` or URLs) the upstream's redirects and token server may
    /// be at even on loopback or private addresses. The upstream's own origin always may;
    /// anything else must be public (see [`EgressPolicy`]).
    pub trusted_origins: Vec<String>,
}

impl UpstreamConfig {
    /// An anonymous upstream proxied under `prefix`, with a 5 minute tag cache.
    pub fn new(url: impl Into<String>, prefix: impl Into<String>) -> UpstreamConfig {
        UpstreamConfig {
            url: url.into(),
            prefix: prefix.into(),
            username: None,
            password: None,
            tag_ttl: Duration::from_secs(300),
            ca_file: None,
            trusted_origins: Vec::new(),
        }
    }
}

/// What a request wants to do with a repository.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    Pull,
    Push,
    Delete,
}

/// Why a request was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token, or a token the platform does not know: `401` with a challenge.
    #[error("authentication required")]
    Unauthenticated,
    /// A valid token without the right: `403 DENIED`.
    #[error("access denied")]
    Denied,
}

/// Decides who may do what. Implemented by the control plane with the platform's tokens.
pub trait Authorizer: Send + Sync + 'static {
    /// `token` is the bearer token, or the password of HTTP Basic credentials (any user
    /// name; the user name is used when the password is empty).
    ///
    /// Returns Ok if the token may do `action` on `repository`. The registry calls it with
    /// `repository == ""` and [`Action::Pull`] for the base endpoint `GET /v2/` and the token
    /// endpoint: there `Denied` counts as "authenticated" and only `Unauthenticated` fails.
    fn authorize(
        &self,
        token: Option<&str>,
        repository: &str,
        action: Action,
    ) -> Result<(), AuthError>;
}

/// An authorizer that lets everyone do everything (tests, single-user setups).
pub struct AllowAll;

impl Authorizer for AllowAll {
    fn authorize(&self, _: Option<&str>, _: &str, _: Action) -> Result<(), AuthError> {
        Ok(())
    }
}

/// A tag and what it points at.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TagInfo {
    pub name: String,
    /// `sha256:...`
    pub digest: String,
    /// When the tag was last pushed.
    pub updated: SystemTime,
}

/// Options of a garbage collection run.
#[derive(Clone, Debug)]
pub struct GcOptions {
    /// Delete manifests that no tag reaches (directly, through an index, or as a referrer
    /// of a kept manifest). Without it every stored manifest is a root.
    pub delete_untagged: bool,
    /// Manifests, blob links and blobs younger than this are kept even if unreferenced, so
    /// a push in progress (blobs uploaded, manifest not yet) is never collected.
    pub grace_period: Duration,
    /// Upload sessions and temporary files untouched for this long are removed.
    pub upload_max_age: Duration,
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions {
            delete_untagged: true,
            grace_period: Duration::from_secs(15 * 60),
            upload_max_age: Duration::from_secs(24 * 3600),
        }
    }
}

/// What a garbage collection run removed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct GcReport {
    pub repositories: usize,
    pub manifests_deleted: usize,
    pub tags_removed: usize,
    pub blob_links_removed: usize,
    pub blobs_deleted: usize,
    pub bytes_freed: u64,
    pub uploads_removed: usize,
}

/// Incremental sha256 of an upload in progress, so completion needs no re-read.
pub(crate) struct UploadHash {
    pub offset: u64,
    pub hasher: Option<digest::Hasher>,
}

/// The registry: storage, HTTP API, garbage collection.
pub struct Registry {
    pub(crate) store: storage::Store,
    pub(crate) auth: Arc<dyn Authorizer>,
    pub(crate) upstream: Option<upstream::Upstream>,
    pub(crate) uploads: Mutex<HashMap<String, Arc<tokio::sync::Mutex<UploadHash>>>>,
}

impl Registry {
    /// Opens (creating if needed) the registry at `config.root`.
    pub fn open(
        config: RegistryConfig,
        auth: Arc<dyn Authorizer>,
    ) -> Result<Arc<Registry>, RegistryError> {
        let store = storage::Store::open(&config.root)?;
        let upstream = match config.upstream {
            Some(u) => Some(upstream::Upstream::new(u)?),
            None => None,
        };
        Ok(Arc::new(Registry {
            store,
            auth,
            upstream,
            uploads: Mutex::new(HashMap::new()),
        }))
    }

    /// The HTTP API: every path under `/v2` (`/v2/`, `/v2/token`, `/v2/_catalog` and the
    /// repository endpoints). Uses routes, not a fallback, so it merges into other routers.
    pub fn router(self: &Arc<Self>) -> axum::Router {
        server::router(self.clone())
    }

    /// Garbage collection with [`GcOptions::default`] (untagged manifests older than 15
    /// minutes and unreferenced blobs are deleted). Blocks: call it from
    /// `spawn_blocking` in async code.
    pub fn gc(&self) -> Result<GcReport, RegistryError> {
        self.gc_with(&GcOptions::default())
    }

    /// Garbage collection with explicit options. Pushes wait while it runs.
    pub fn gc_with(&self, opts: &GcOptions) -> Result<GcReport, RegistryError> {
        let report = self.store.gc(opts)?;
        // Forget the hash state of upload sessions that no longer exist.
        self.uploads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|id, _| self.store.upload_data_path(id).exists());
        tracing::info!(?report, "registry garbage collection done");
        Ok(report)
    }

    /// Deletes a tag (the manifest stays until [`Registry::gc`] finds it unreferenced).
    pub fn delete_tag(&self, repo: &str, tag: &str) -> Result<(), RegistryError> {
        validate_repository(repo)?;
        validate_tag(tag)?;
        self.store.delete_tag(repo, tag)
    }

    /// Deletes a repository (tags, manifests, blob links, upload sessions), so a later
    /// repository of the same name starts empty; blobs nothing else links are freed by the
    /// next [`Registry::gc`]. Returns whether the repository existed.
    pub fn delete_repository(&self, repo: &str) -> Result<bool, RegistryError> {
        validate_repository(repo)?;
        let existed = self.store.delete_repository(repo)?;
        // Forget the hash state of the upload sessions that went with it.
        self.uploads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|id, _| self.store.upload_data_path(id).exists());
        if existed {
            tracing::info!(repo, "registry repository deleted");
        }
        Ok(existed)
    }

    /// Tags of a repository, sorted by name. `NameUnknown` if the repository does not exist.
    pub fn list_tags(&self, repo: &str) -> Result<Vec<TagInfo>, RegistryError> {
        validate_repository(repo)?;
        self.store.tags(repo)
    }

    /// Keeps the `keep` most recently pushed tags of `repo` (and any tag for which
    /// `protect` returns true) and deletes the others; returns the deleted tags. Follow
    /// with [`Registry::gc`] to free the space ("releases older than the last N").
    pub fn prune_tags(
        &self,
        repo: &str,
        keep: usize,
        protect: &dyn Fn(&str) -> bool,
    ) -> Result<Vec<String>, RegistryError> {
        let mut tags = self.list_tags(repo)?;
        tags.sort_by(|a, b| b.updated.cmp(&a.updated).then_with(|| b.name.cmp(&a.name)));
        let mut deleted = Vec::new();
        for t in tags.into_iter().skip(keep) {
            if protect(&t.name) {
                continue;
            }
            self.store.delete_tag(repo, &t.name)?;
            deleted.push(t.name);
        }
        Ok(deleted)
    }

    /// The digest a tag points at.
    pub fn resolve_tag(&self, repo: &str, tag: &str) -> Result<Option<String>, RegistryError> {
        validate_repository(repo)?;
        validate_tag(tag)?;
        Ok(self
            .store
            .resolve_tag(repo, tag)?
            .map(|(d, _)| d.to_string()))
    }

    /// The manifest a tag or digest of `repo` names: its digest and bytes, `None` when
    /// the repository has no such tag or manifest.
    pub fn manifest(
        &self,
        repo: &str,
        reference: &str,
    ) -> Result<Option<(String, Vec<u8>)>, RegistryError> {
        validate_repository(repo)?;
        let digest = if Digest::looks_like_digest(reference) {
            match reference.parse::<Digest>() {
                Ok(d) => d,
                Err(_) => return Ok(None),
            }
        } else {
            validate_tag(reference)?;
            match self.store.resolve_tag(repo, reference)? {
                Some((d, _)) => d,
                None => return Ok(None),
            }
        };
        match self.store.read_manifest(repo, &digest) {
            Ok((_, body)) => Ok(Some((digest.to_string(), body))),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// All repositories, sorted.
    pub fn repositories(&self) -> Result<Vec<String>, RegistryError> {
        self.store.repositories()
    }
}
