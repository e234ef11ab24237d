//! Pull-through from an upstream registry.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use crate::client::PullClient;
use crate::digest::Digest;
use crate::manifest;
use crate::{Registry, RegistryError, UpstreamConfig};

type Result<T, E = RegistryError> = std::result::Result<T, E>;

pub(crate) struct Upstream {
    cfg: UpstreamConfig,
    client: PullClient,
    /// One fetch per blob at a time: concurrent pulls of the same blob wait for the first.
    inflight: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Upstream {
    pub fn new(cfg: UpstreamConfig) -> Result<Upstream> {
        if !cfg.url.starts_with("http://") && !cfg.url.starts_with("https://") {
            return Err(RegistryError::Config(format!(
                "upstream {:?}: the URL must start with http:// or https://",
                cfg.url
            )));
        }
        let prefix = cfg.prefix.trim_matches('/');
        if !prefix.is_empty() {
            crate::validate_repository(prefix).map_err(|_| {
                RegistryError::Config(format!("invalid upstream prefix {prefix:?}"))
            })?;
        }
        let mut client = match (&cfg.username, &cfg.password) {
            (Some(u), Some(p)) => PullClient::with_basic_auth(&cfg.url, u, p),
            (None, Some(p)) => PullClient::new(&cfg.url, Some(p.clone())),
            _ => PullClient::new(&cfg.url, None),
        };
        let egress = cfg.trusted_origins.iter().fold(
            crate::EgressPolicy::public_only().trust(&cfg.url),
            |policy, origin| policy.trust(origin),
        );
        client = client.with_egress(egress);
        if let Some(ca) = &cfg.ca_file {
            client = client.with_tls_config(crate::tls::config_with_ca_file(ca)?);
        }
        Ok(Upstream {
            cfg,
            client,
            inflight: std::sync::Mutex::new(HashMap::new()),
        })
    }

    /// The upstream repository for a local one, if it is proxied.
    pub fn upstream_repo(&self, local: &str) -> Option<String> {
        let prefix = self.cfg.prefix.trim_matches('/');
        if prefix.is_empty() {
            return Some(local.to_string());
        }
        local
            .strip_prefix(prefix)
            .and_then(|r| r.strip_prefix('/'))
            .map(str::to_string)
    }

    async fn store_manifest(
        &self,
        reg: &Arc<Registry>,
        local: &str,
        body: bytes::Bytes,
        media_type: &str,
        digest: &Digest,
        tag: Option<&str>,
    ) -> Result<()> {
        let parsed = manifest::parse_manifest(media_type, &body)?;
        let (l2, d2, tags) = (
            local.to_string(),
            digest.clone(),
            tag.map(|t| vec![t.to_string()]).unwrap_or_default(),
        );
        let reg2 = reg.clone();
        tokio::task::spawn_blocking(move || {
            reg2.store
                .put_manifest(&l2, &d2, &body, &parsed, &tags, false)
        })
        .await
        .map_err(|e| RegistryError::Internal(format!("storage task failed: {e}")))?
    }

    /// A manifest of proxied repository `local`: from the cache if it is there (for tags:
    /// and fresh), else from upstream, stored and returned.
    pub async fn manifest(
        &self,
        reg: &Arc<Registry>,
        local: &str,
        reference: &str,
    ) -> Result<(Digest, String, Vec<u8>)> {
        let up_repo = self
            .upstream_repo(local)
            .ok_or_else(|| RegistryError::ManifestUnknown(format!("{local}:{reference}")))?;
        let is_digest = Digest::looks_like_digest(reference);
        let cached: Option<(Digest, bool)> = if is_digest {
            None
        } else {
            reg.store
                .resolve_tag(local, reference)?
                .map(|(d, updated)| {
                    let age = SystemTime::now()
                        .duration_since(updated)
                        .unwrap_or_default();
                    (d, age < self.cfg.tag_ttl)
                })
        };
        if let Some((d, true)) = &cached
            && let Ok((meta, body)) = reg.store.read_manifest(local, d)
        {
            return Ok((d.clone(), meta.media_type, body));
        }
        match self.client.fetch_manifest(&up_repo, reference).await {
            Ok((body, media_type, digest)) => {
                tracing::info!(repo = local, upstream = %self.cfg.url, reference, %digest, "pull-through: manifest fetched");
                let tag = if is_digest { None } else { Some(reference) };
                self.store_manifest(reg, local, body.clone(), &media_type, &digest, tag)
                    .await?;
                Ok((digest, media_type, body.to_vec()))
            }
            Err(e) => {
                if let Some((d, _)) = cached
                    && let Ok((meta, body)) = reg.store.read_manifest(local, &d)
                {
                    tracing::warn!(repo = local, reference, error = %e, "pull-through: upstream failed, serving cached tag");
                    return Ok((d, meta.media_type, body));
                }
                if e.is_not_found() {
                    Err(RegistryError::ManifestUnknown(format!(
                        "{local}:{reference}"
                    )))
                } else if matches!(e, RegistryError::Unauthorized | RegistryError::Denied) {
                    Err(RegistryError::Upstream(format!(
                        "upstream refused access: {e}"
                    )))
                } else {
                    Err(e)
                }
            }
        }
    }

    /// A blob of proxied repository `local`, fetched from upstream into the store.
    pub async fn blob(
        &self,
        reg: &Arc<Registry>,
        local: &str,
        d: &Digest,
    ) -> Result<(PathBuf, u64)> {
        let up_repo = self
            .upstream_repo(local)
            .ok_or_else(|| RegistryError::BlobUnknown(d.to_string()))?;
        let key = format!("{local}@{d}");
        let lock = self
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.clone())
            .or_default()
            .clone();
        let _guard = lock.lock().await;
        let result = self.fetch_blob(reg, local, &up_repo, d).await;
        self.inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key);
        result
    }

    async fn fetch_blob(
        &self,
        reg: &Arc<Registry>,
        local: &str,
        up_repo: &str,
        d: &Digest,
    ) -> Result<(PathBuf, u64)> {
        // A concurrent request may have fetched it while this one waited.
        if let Some(found) = reg.store.repo_blob(local, d) {
            return Ok(found);
        }
        let tmp = reg.store.tmp_dir().join(crate::storage::random_id());
        match self
            .client
            .blob_to_file(up_repo, &d.to_string(), &tmp)
            .await
        {
            Ok(()) => {}
            Err(e) if e.is_not_found() => return Err(RegistryError::BlobUnknown(d.to_string())),
            Err(e) if matches!(e, RegistryError::Unauthorized | RegistryError::Denied) => {
                return Err(RegistryError::Upstream(format!(
                    "upstream refused access: {e}"
                )));
            }
            Err(e) => return Err(e),
        }
        tracing::info!(repo = local, upstream = %self.cfg.url, digest = %d, "pull-through: blob fetched");
        let (reg2, l2, d2) = (reg.clone(), local.to_string(), d.clone());
        tokio::task::spawn_blocking(move || {
            let r = reg2.store.ingest_file(&l2, &d2, &tmp);
            if r.is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
            r?;
            let size = reg2
                .store
                .blob_size(&d2)
                .ok_or_else(|| RegistryError::BlobUnknown(d2.to_string()))?;
            Ok((reg2.store.blob_path(&d2), size))
        })
        .await
        .map_err(|e| RegistryError::Internal(format!("storage task failed: {e}")))?
    }
}

impl Registry {
    /// The upstream that proxies `repo`, if pull-through is on and covers it.
    pub(crate) fn upstream_for(&self, repo: &str) -> Option<&Upstream> {
        self.upstream
            .as_ref()
            .filter(|u| u.upstream_repo(repo).is_some())
    }
}
