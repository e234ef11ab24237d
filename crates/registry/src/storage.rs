//! Content-addressed storage on the local file system.
//!
//! Layout under the registry root:
//!
//! ```text
//! blobs/<alg>/<hex[0..2]>/<hex>             blob (and manifest) content, immutable
//! uploads/<id>/{repo,data}                  upload sessions in progress
//! tmp/                                      temporary files, renamed into place
//! repos/<name>/_blobs/<alg>/<hex>           empty file: the blob is linked into <name>
//! repos/<name>/_manifests/<alg>/<hex>       JSON metadata: the manifest is in <name>
//! repos/<name>/_tags/<tag>                  the digest the tag points at
//! repos/<name>/_referrers/<alg>/<hex>/<alg>-<hex>   empty file: a manifest whose subject is <alg:hex>
//! ```
//!
//! Repository name components never start with `_`, so the `_` directories cannot clash
//! with nested repositories (`a` and `a/b`). Everything that is written is first written to
//! a temporary file, flushed, and renamed into place, so a crash leaves either the old or
//! the new file, never a half-written one.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::digest::{Algorithm, Digest, digest_file};
use crate::manifest::{Descriptor, ParsedManifest};
use crate::{GcOptions, GcReport, RegistryError, TagInfo};

/// What the registry records about a manifest in a repository.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub(crate) struct ManifestMeta {
    pub media_type: String,
    pub size: u64,
    #[serde(default)]
    pub artifact_type: Option<String>,
    #[serde(default)]
    pub subject: Option<String>,
    #[serde(default)]
    pub annotations: Option<BTreeMap<String, String>>,
    /// Blobs the manifest references (config and layers).
    #[serde(default)]
    pub blobs: Vec<String>,
    /// Manifests an index references.
    #[serde(default)]
    pub children: Vec<String>,
}

pub(crate) struct Store {
    root: PathBuf,
    /// Writers that create references take it shared; garbage collection takes it exclusive.
    gc_lock: RwLock<()>,
}

pub(crate) fn random_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

fn not_found(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound
}

/// Flushes a directory entry change (a rename into `dir`) to disk.
fn sync_dir(dir: Option<&Path>) {
    if let Some(dir) = dir
        && let Ok(d) = fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
}

fn touch(path: &Path) {
    let now = SystemTime::now();
    if let Ok(f) = fs::OpenOptions::new().write(true).open(path) {
        let _ = f.set_modified(now);
    }
}

fn is_old(meta: &fs::Metadata, now: SystemTime, grace: Duration) -> bool {
    match meta.modified() {
        Ok(t) => now.duration_since(t).unwrap_or_default() >= grace,
        Err(_) => true,
    }
}

/// Entries of a directory; a missing directory is empty.
fn read_dir_names(dir: &Path) -> io::Result<Vec<String>> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if not_found(&e) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for entry in rd {
        let entry = entry?;
        if let Ok(name) = entry.file_name().into_string() {
            out.push(name);
        }
    }
    Ok(out)
}

impl Store {
    pub fn open(root: &Path) -> io::Result<Store> {
        for d in ["blobs", "uploads", "repos", "tmp"] {
            fs::create_dir_all(root.join(d))?;
        }
        Ok(Store {
            root: root.to_path_buf(),
            gc_lock: RwLock::new(()),
        })
    }

    fn shared(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.gc_lock.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        self.root
            .join("blobs")
            .join(d.algorithm().name())
            .join(&d.hex()[..2])
            .join(d.hex())
    }

    fn repo_dir(&self, repo: &str) -> PathBuf {
        self.root.join("repos").join(repo)
    }

    fn blob_link(&self, repo: &str, d: &Digest) -> PathBuf {
        self.repo_dir(repo)
            .join("_blobs")
            .join(d.algorithm().name())
            .join(d.hex())
    }

    fn manifest_meta_path(&self, repo: &str, d: &Digest) -> PathBuf {
        self.repo_dir(repo)
            .join("_manifests")
            .join(d.algorithm().name())
            .join(d.hex())
    }

    fn tag_path(&self, repo: &str, tag: &str) -> PathBuf {
        self.repo_dir(repo).join("_tags").join(tag)
    }

    fn referrer_dir(&self, repo: &str, subject: &Digest) -> PathBuf {
        self.repo_dir(repo)
            .join("_referrers")
            .join(subject.algorithm().name())
            .join(subject.hex())
    }

    fn upload_dir(&self, id: &str) -> PathBuf {
        self.root.join("uploads").join(id)
    }

    pub fn upload_data_path(&self, id: &str) -> PathBuf {
        self.upload_dir(id).join("data")
    }

    /// Writes `data` to `path` through a flushed temporary file and a rename.
    fn write_atomic(&self, path: &Path, data: &[u8]) -> io::Result<()> {
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)?;
        }
        let tmp = self.tmp_dir().join(random_id());
        let result = (|| {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(data)?;
            f.sync_all()?;
            fs::rename(&tmp, path)?;
            sync_dir(path.parent());
            Ok(())
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// Size of a blob in the global store.
    pub fn blob_size(&self, d: &Digest) -> Option<u64> {
        fs::metadata(self.blob_path(d))
            .ok()
            .filter(|m| m.is_file())
            .map(|m| m.len())
    }

    /// The blob's path and size, if the blob is linked into `repo` (as a blob or a manifest).
    pub fn repo_blob(&self, repo: &str, d: &Digest) -> Option<(PathBuf, u64)> {
        let linked =
            self.blob_link(repo, d).is_file() || self.manifest_meta_path(repo, d).is_file();
        if !linked {
            return None;
        }
        self.blob_size(d).map(|size| (self.blob_path(d), size))
    }

    fn link_blob_locked(&self, repo: &str, d: &Digest) -> io::Result<()> {
        let link = self.blob_link(repo, d);
        if let Some(parent) = link.parent() {
            fs::create_dir_all(parent)?;
        }
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&link)?;
        let _ = f.set_modified(SystemTime::now());
        touch(&self.blob_path(d));
        Ok(())
    }

    /// Links an existing blob into `repo` (cross-repository mount).
    pub fn link_blob(&self, repo: &str, d: &Digest) -> Result<(), RegistryError> {
        let _g = self.shared();
        if self.blob_size(d).is_none() {
            return Err(RegistryError::BlobUnknown(d.to_string()));
        }
        self.link_blob_locked(repo, d)?;
        Ok(())
    }

    pub fn unlink_blob(&self, repo: &str, d: &Digest) -> Result<(), RegistryError> {
        match fs::remove_file(self.blob_link(repo, d)) {
            Ok(()) => Ok(()),
            Err(e) if not_found(&e) => Err(RegistryError::BlobUnknown(d.to_string())),
            Err(e) => Err(e.into()),
        }
    }

    /// Moves a verified file (on the same file system) into the blob store and links it.
    pub fn ingest_file(&self, repo: &str, d: &Digest, file: &Path) -> Result<(), RegistryError> {
        let _g = self.shared();
        let dest = self.blob_path(d);
        if dest.is_file() {
            let _ = fs::remove_file(file);
        } else {
            if let Some(parent) = dest.parent() {
                fs::create_dir_all(parent)?;
            }
            fs::File::open(file)?.sync_all()?;
            fs::rename(file, &dest)?;
            sync_dir(dest.parent());
        }
        self.link_blob_locked(repo, d)?;
        Ok(())
    }

    // ---- uploads ----

    pub fn create_upload(&self, repo: &str) -> Result<String, RegistryError> {
        let id = random_id();
        let dir = self.upload_dir(&id);
        fs::create_dir_all(&dir)?;
        fs::write(dir.join("repo"), repo)?;
        fs::File::create(dir.join("data"))?;
        Ok(id)
    }

    /// Checks that upload `id` exists and belongs to `repo`; returns its current size.
    pub fn upload_size(&self, repo: &str, id: &str) -> Result<u64, RegistryError> {
        if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(RegistryError::BlobUploadUnknown);
        }
        let dir = self.upload_dir(id);
        let owner = match fs::read_to_string(dir.join("repo")) {
            Ok(s) => s,
            Err(e) if not_found(&e) => return Err(RegistryError::BlobUploadUnknown),
            Err(e) => return Err(e.into()),
        };
        if owner != repo {
            return Err(RegistryError::BlobUploadUnknown);
        }
        match fs::metadata(dir.join("data")) {
            Ok(m) => Ok(m.len()),
            Err(e) if not_found(&e) => Err(RegistryError::BlobUploadUnknown),
            Err(e) => Err(e.into()),
        }
    }

    /// Verifies an upload against `expected` and moves it into the blob store.
    /// `precomputed` is the digest of the whole upload if the caller hashed it on the way in.
    pub fn finish_upload(
        &self,
        repo: &str,
        id: &str,
        expected: &Digest,
        precomputed: Option<Digest>,
    ) -> Result<u64, RegistryError> {
        let data = self.upload_data_path(id);
        let size = fs::metadata(&data)?.len();
        let actual = match precomputed {
            Some(d) if d.algorithm() == expected.algorithm() => d,
            _ => digest_file(expected.algorithm(), &data)?.0,
        };
        if &actual != expected {
            self.cancel_upload(id);
            return Err(RegistryError::DigestInvalid(format!(
                "expected {expected}, content has {actual}"
            )));
        }
        let _g = self.shared();
        let dest = self.blob_path(expected);
        if !dest.is_file() {
            if let Some(parent) = dest.parent() {
                fs::create_dir_all(parent)?;
            }
            fs::OpenOptions::new().write(true).open(&data)?.sync_all()?;
            fs::rename(&data, &dest)?;
            sync_dir(dest.parent());
        }
        self.link_blob_locked(repo, expected)?;
        drop(_g);
        self.cancel_upload(id);
        Ok(size)
    }

    pub fn cancel_upload(&self, id: &str) {
        if let Err(e) = fs::remove_dir_all(self.upload_dir(id))
            && !not_found(&e)
        {
            tracing::warn!(upload = id, error = %e, "could not remove upload");
        }
    }

    // ---- manifests and tags ----

    pub fn manifest_meta(
        &self,
        repo: &str,
        d: &Digest,
    ) -> Result<Option<ManifestMeta>, RegistryError> {
        let raw = match fs::read(self.manifest_meta_path(repo, d)) {
            Ok(raw) => raw,
            Err(e) if not_found(&e) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let meta = serde_json::from_slice(&raw)
            .map_err(|e| RegistryError::Internal(format!("corrupt manifest metadata {d}: {e}")))?;
        Ok(Some(meta))
    }

    /// Stores a manifest under its digest and points `tags` at it.
    /// With `check_refs`, every referenced blob (or child manifest of an index) must
    /// already be in the repository.
    pub fn put_manifest(
        &self,
        repo: &str,
        digest: &Digest,
        body: &[u8],
        parsed: &ParsedManifest,
        tags: &[String],
        check_refs: bool,
    ) -> Result<(), RegistryError> {
        let _g = self.shared();
        let mut blobs = Vec::new();
        for d in parsed.config.iter().chain(parsed.layers.iter()) {
            let dg: Digest = d.digest.parse()?;
            // Non-distributable layers (with URLs) live elsewhere.
            if check_refs && d.urls.is_empty() && self.repo_blob(repo, &dg).is_none() {
                return Err(RegistryError::ManifestBlobUnknown(d.digest.clone()));
            }
            blobs.push(dg.to_string());
        }
        let mut children = Vec::new();
        for d in &parsed.manifests {
            let dg: Digest = d.digest.parse()?;
            if check_refs && self.manifest_meta(repo, &dg)?.is_none() {
                return Err(RegistryError::ManifestBlobUnknown(d.digest.clone()));
            }
            children.push(dg.to_string());
        }
        let subject = match &parsed.subject {
            Some(s) => Some(s.digest.parse::<Digest>()?),
            None => None,
        };
        let dest = self.blob_path(digest);
        if dest.is_file() {
            touch(&dest);
        } else {
            self.write_atomic(&dest, body)?;
        }
        let meta = ManifestMeta {
            media_type: parsed.media_type.clone(),
            size: body.len() as u64,
            artifact_type: parsed.effective_artifact_type(),
            subject: subject.as_ref().map(|s| s.to_string()),
            annotations: parsed.annotations.clone(),
            blobs,
            children,
        };
        let meta_json = serde_json::to_vec(&meta)
            .map_err(|e| RegistryError::Internal(format!("serialize manifest metadata: {e}")))?;
        self.write_atomic(&self.manifest_meta_path(repo, digest), &meta_json)?;
        if let Some(subject) = subject {
            let dir = self.referrer_dir(repo, &subject);
            fs::create_dir_all(&dir)?;
            fs::File::create(dir.join(format!("{}-{}", digest.algorithm().name(), digest.hex())))?;
        }
        for tag in tags {
            self.write_atomic(&self.tag_path(repo, tag), digest.to_string().as_bytes())?;
        }
        Ok(())
    }

    pub fn resolve_tag(
        &self,
        repo: &str,
        tag: &str,
    ) -> Result<Option<(Digest, SystemTime)>, RegistryError> {
        let path = self.tag_path(repo, tag);
        let raw = match fs::read_to_string(&path) {
            Ok(s) => s,
            Err(e) if not_found(&e) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let updated = fs::metadata(&path)?
            .modified()
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let d = raw
            .trim()
            .parse::<Digest>()
            .map_err(|_| RegistryError::Internal(format!("corrupt tag file {repo}:{tag}")))?;
        Ok(Some((d, updated)))
    }

    /// Reads a manifest by digest: its metadata and bytes.
    pub fn read_manifest(
        &self,
        repo: &str,
        d: &Digest,
    ) -> Result<(ManifestMeta, Vec<u8>), RegistryError> {
        let meta = self
            .manifest_meta(repo, d)?
            .ok_or_else(|| RegistryError::ManifestUnknown(d.to_string()))?;
        match fs::read(self.blob_path(d)) {
            Ok(body) => Ok((meta, body)),
            Err(e) if not_found(&e) => Err(RegistryError::ManifestUnknown(d.to_string())),
            Err(e) => Err(e.into()),
        }
    }

    pub fn delete_manifest(&self, repo: &str, d: &Digest) -> Result<(), RegistryError> {
        let meta = self
            .manifest_meta(repo, d)?
            .ok_or_else(|| RegistryError::ManifestUnknown(d.to_string()))?;
        self.remove_manifest(repo, d, &meta)?;
        // Tags that pointed at it go too.
        for t in self.tags(repo)? {
            if t.digest == d.to_string() {
                let _ = fs::remove_file(self.tag_path(repo, &t.name));
            }
        }
        Ok(())
    }

    fn remove_manifest(
        &self,
        repo: &str,
        d: &Digest,
        meta: &ManifestMeta,
    ) -> Result<(), RegistryError> {
        match fs::remove_file(self.manifest_meta_path(repo, d)) {
            Ok(()) => {}
            Err(e) if not_found(&e) => {}
            Err(e) => return Err(e.into()),
        }
        if let Some(subject) = meta
            .subject
            .as_deref()
            .and_then(|s| s.parse::<Digest>().ok())
        {
            let dir = self.referrer_dir(repo, &subject);
            let _ = fs::remove_file(dir.join(format!("{}-{}", d.algorithm().name(), d.hex())));
            let _ = fs::remove_dir(dir);
        }
        Ok(())
    }

    pub fn delete_tag(&self, repo: &str, tag: &str) -> Result<(), RegistryError> {
        match fs::remove_file(self.tag_path(repo, tag)) {
            Ok(()) => Ok(()),
            Err(e) if not_found(&e) => Err(RegistryError::ManifestUnknown(format!("{repo}:{tag}"))),
            Err(e) => Err(e.into()),
        }
    }

    pub fn repo_exists(&self, repo: &str) -> bool {
        self.repo_dir(repo).is_dir()
    }

    /// Tags of a repository, sorted by name.
    pub fn tags(&self, repo: &str) -> Result<Vec<TagInfo>, RegistryError> {
        if !self.repo_exists(repo) {
            return Err(RegistryError::NameUnknown(repo.to_string()));
        }
        let mut names = read_dir_names(&self.repo_dir(repo).join("_tags"))?;
        names.sort();
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            if crate::names::validate_tag(&name).is_err() {
                continue;
            }
            if let Some((d, updated)) = self.resolve_tag(repo, &name)? {
                out.push(TagInfo {
                    name,
                    digest: d.to_string(),
                    updated,
                });
            }
        }
        Ok(out)
    }

    /// Manifests in `repo` whose subject is `subject`, optionally of one artifact type.
    pub fn referrers(
        &self,
        repo: &str,
        subject: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<Vec<Descriptor>, RegistryError> {
        let mut names = read_dir_names(&self.referrer_dir(repo, subject))?;
        names.sort();
        let mut out = Vec::new();
        for name in names {
            let Some((alg, hex)) = name.split_once('-') else {
                continue;
            };
            let Ok(d) = format!("{alg}:{hex}").parse::<Digest>() else {
                continue;
            };
            let Some(meta) = self.manifest_meta(repo, &d)? else {
                continue;
            };
            if let Some(want) = artifact_type
                && meta.artifact_type.as_deref() != Some(want)
            {
                continue;
            }
            out.push(Descriptor {
                media_type: meta.media_type,
                digest: d.to_string(),
                size: meta.size,
                artifact_type: meta.artifact_type,
                annotations: meta.annotations,
                urls: Vec::new(),
                platform: None,
            });
        }
        Ok(out)
    }

    /// All repositories, sorted.
    pub fn repositories(&self) -> Result<Vec<String>, RegistryError> {
        let mut out = Vec::new();
        let mut stack = vec![(self.root.join("repos"), String::new())];
        while let Some((dir, name)) = stack.pop() {
            let mut is_repo = false;
            for entry in read_dir_names(&dir)? {
                if entry.starts_with('_') {
                    is_repo = true;
                } else if dir.join(&entry).is_dir() {
                    let child = if name.is_empty() {
                        entry.clone()
                    } else {
                        format!("{name}/{entry}")
                    };
                    stack.push((dir.join(&entry), child));
                }
            }
            if is_repo && !name.is_empty() {
                out.push(name);
            }
        }
        out.sort();
        Ok(out)
    }

    /// Lists `<base>/<alg>/<hex>` entries as digests with their file metadata.
    fn list_digest_files(
        base: &Path,
        fanout: bool,
    ) -> io::Result<Vec<(Digest, PathBuf, fs::Metadata)>> {
        let mut out = Vec::new();
        for alg in read_dir_names(base)? {
            if Algorithm::from_name(&alg).is_none() {
                continue;
            }
            let alg_dir = base.join(&alg);
            let dirs = if fanout {
                read_dir_names(&alg_dir)?
                    .into_iter()
                    .map(|p| alg_dir.join(p))
                    .collect()
            } else {
                vec![alg_dir.clone()]
            };
            for dir in dirs {
                for hex in read_dir_names(&dir)? {
                    let Ok(d) = format!("{alg}:{hex}").parse::<Digest>() else {
                        continue;
                    };
                    let path = dir.join(&hex);
                    if let Ok(meta) = fs::metadata(&path) {
                        out.push((d, path, meta));
                    }
                }
            }
        }
        Ok(out)
    }

    /// Mark and sweep. See [`crate::Registry::gc`].
    pub fn gc(&self, opts: &GcOptions) -> Result<GcReport, RegistryError> {
        let _g = self.gc_lock.write().unwrap_or_else(|p| p.into_inner());
        let now = SystemTime::now();
        let mut report = GcReport::default();
        let mut live_blobs: HashSet<Digest> = HashSet::new();

        for repo in self.repositories()? {
            report.repositories += 1;
            let repo_dir = self.repo_dir(&repo);
            let mut manifests: HashMap<Digest, (ManifestMeta, bool)> = HashMap::new();
            for (d, path, fmeta) in Self::list_digest_files(&repo_dir.join("_manifests"), false)? {
                let raw = fs::read(&path)?;
                match serde_json::from_slice::<ManifestMeta>(&raw) {
                    Ok(m) => {
                        manifests.insert(d, (m, is_old(&fmeta, now, opts.grace_period)));
                    }
                    Err(e) => {
                        tracing::warn!(repo, digest = %d, error = %e, "skipping corrupt manifest metadata")
                    }
                }
            }
            let mut live: HashSet<Digest> = HashSet::new();
            for t in self.tags(&repo)? {
                match t.digest.parse::<Digest>() {
                    Ok(d) if manifests.contains_key(&d) => {
                        live.insert(d);
                    }
                    _ => {
                        // A tag whose manifest is gone points nowhere.
                        let _ = fs::remove_file(self.tag_path(&repo, &t.name));
                        report.tags_removed += 1;
                    }
                }
            }
            for (d, (_, old)) in &manifests {
                if !opts.delete_untagged || !old {
                    live.insert(d.clone());
                }
            }
            // Children of live indexes and referrers of live manifests are live.
            loop {
                let mut changed = false;
                for (d, (meta, _)) in &manifests {
                    if live.contains(d) {
                        for c in &meta.children {
                            if let Ok(c) = c.parse::<Digest>()
                                && manifests.contains_key(&c)
                                && live.insert(c)
                            {
                                changed = true;
                            }
                        }
                    } else if let Some(s) = meta
                        .subject
                        .as_deref()
                        .and_then(|s| s.parse::<Digest>().ok())
                        && live.contains(&s)
                    {
                        live.insert(d.clone());
                        changed = true;
                    }
                }
                if !changed {
                    break;
                }
            }
            let mut repo_live: HashSet<Digest> = HashSet::new();
            for (d, (meta, _)) in &manifests {
                if live.contains(d) {
                    repo_live.insert(d.clone());
                    for b in &meta.blobs {
                        if let Ok(b) = b.parse::<Digest>() {
                            repo_live.insert(b);
                        }
                    }
                } else {
                    tracing::info!(repo, digest = %d, "gc: deleting unreferenced manifest");
                    self.remove_manifest(&repo, d, meta)?;
                    report.manifests_deleted += 1;
                }
            }
            for (d, path, fmeta) in Self::list_digest_files(&repo_dir.join("_blobs"), false)? {
                if repo_live.contains(&d) || !is_old(&fmeta, now, opts.grace_period) {
                    live_blobs.insert(d);
                } else {
                    fs::remove_file(&path)?;
                    report.blob_links_removed += 1;
                }
            }
            live_blobs.extend(repo_live);
            if live.is_empty() {
                self.remove_if_empty(&repo);
            }
        }

        for (d, path, fmeta) in Self::list_digest_files(&self.root.join("blobs"), true)? {
            if live_blobs.contains(&d) || !is_old(&fmeta, now, opts.grace_period) {
                continue;
            }
            tracing::info!(digest = %d, size = fmeta.len(), "gc: deleting unreferenced blob");
            fs::remove_file(&path)?;
            if let Some(parent) = path.parent() {
                let _ = fs::remove_dir(parent);
            }
            report.blobs_deleted += 1;
            report.bytes_freed += fmeta.len();
        }

        for id in read_dir_names(&self.root.join("uploads"))? {
            let dir = self.upload_dir(&id);
            let m = fs::metadata(dir.join("data")).or_else(|_| fs::metadata(&dir));
            if m.map(|m| is_old(&m, now, opts.upload_max_age))
                .unwrap_or(true)
            {
                let _ = fs::remove_dir_all(&dir);
                report.uploads_removed += 1;
            }
        }
        for name in read_dir_names(&self.tmp_dir())? {
            let path = self.tmp_dir().join(name);
            if let Ok(m) = fs::metadata(&path)
                && is_old(&m, now, opts.upload_max_age)
            {
                let _ = fs::remove_file(&path);
            }
        }
        Ok(report)
    }

    /// Deletes a repository: its tags, manifests, blob links, referrers and upload
    /// sessions (not repositories nested under its name). The blobs themselves stay until
    /// [`Store::gc`] finds nothing else linking them. Returns whether it existed.
    pub fn delete_repository(&self, repo: &str) -> Result<bool, RegistryError> {
        let _g = self.gc_lock.write().unwrap_or_else(|p| p.into_inner());
        let dir = self.repo_dir(repo);
        let existed = self.repo_exists(repo);
        for sub in ["_tags", "_manifests", "_blobs", "_referrers"] {
            match fs::remove_dir_all(dir.join(sub)) {
                Ok(()) => {}
                Err(e) if not_found(&e) => {}
                Err(e) => return Err(e.into()),
            }
        }
        for id in read_dir_names(&self.root.join("uploads"))? {
            let owner = fs::read_to_string(self.upload_dir(&id).join("repo")).unwrap_or_default();
            if owner == repo {
                self.cancel_upload(&id);
            }
        }
        self.remove_if_empty(repo);
        sync_dir(Some(&self.root.join("repos")));
        Ok(existed)
    }

    /// Removes a repository's directories if nothing is left in them.
    fn remove_if_empty(&self, repo: &str) {
        let dir = self.repo_dir(repo);
        for sub in ["_tags", "_manifests", "_blobs", "_referrers"] {
            let p = dir.join(sub);
            let empty = match sub {
                "_tags" => read_dir_names(&p).map(|v| v.is_empty()).unwrap_or(false),
                "_referrers" => true,
                _ => Self::list_digest_files(&p, false)
                    .map(|v| v.is_empty())
                    .unwrap_or(false),
            };
            if empty {
                let _ = fs::remove_dir_all(&p);
            }
        }
        // Remove the repository directory and empty parents up to `repos/`.
        let stop = self.root.join("repos");
        let mut cur = dir;
        while cur != stop && cur.starts_with(&stop) {
            if fs::remove_dir(&cur).is_err() {
                break;
            }
            match cur.parent() {
                Some(p) => cur = p.to_path_buf(),
                None => break,
            }
        }
    }
}
