//! Images on a host: pulled from the registry once, each layer unpacked once into a
//! content-addressed directory (OCI whiteouts turned into overlayfs whiteouts), so a
//! machine's root filesystem is an overlay of cached layers.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use aloft_api::internal::ImagePull;
use aloft_registry::client::PullClient;
use serde::{Deserialize, Serialize};

use crate::unpack::{DEFAULT_LIMITS, IdShift, UnpackLimits, unpack_layer};

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("pulling image {reference}: {reason}")]
    Pull { reference: String, reason: String },
    #[error("image {reference} is not a usable image: {reason}")]
    Invalid { reference: String, reason: String },
    #[error("unpacking layer {digest}: {reason}")]
    Unpack { digest: String, reason: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ImageError {
    let context = context.into();
    move |source| ImageError::Io { context, source }
}

/// The parts of an image config (`config` of the OCI image config) a machine needs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunConfig {
    #[serde(rename = "Entrypoint", default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(rename = "Cmd", default)]
    pub cmd: Option<Vec<String>>,
    #[serde(rename = "Env", default)]
    pub env: Option<Vec<String>>,
    #[serde(rename = "User", default)]
    pub user: Option<String>,
    #[serde(rename = "WorkingDir", default)]
    pub working_dir: Option<String>,
}

#[derive(Deserialize)]
struct ImageConfigDocument {
    #[serde(default)]
    config: Option<RunConfig>,
}

/// A pulled image ready to run: its layers (bottom first) and its run config.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreparedImage {
    pub reference: String,
    pub digest: String,
    /// Unpacked layer directories, bottom layer first.
    pub layers: Vec<PathBuf>,
    pub run: RunConfig,
}

/// How long a freshly unpacked layer is safe from garbage collection.
pub const LAYER_GRACE: std::time::Duration = std::time::Duration::from_secs(600);

pub struct ImageStore {
    root: PathBuf,
    /// Owners in unpacked layers are shifted by this (containers in a user namespace).
    shift: Option<IdShift>,
    limits: UnpackLimits,
    locks: std::sync::Mutex<HashMap<String, std::sync::Arc<tokio::sync::Mutex<()>>>>,
}

impl ImageStore {
    /// Opens the cache at `root`. Layers unpack with owners shifted by `shift`, if given;
    /// shifted and unshifted layers are kept apart. Partly unpacked layers a crash left
    /// behind (in `tmp`) are removed: a layer is in `layers` only once complete.
    pub fn new(root: &Path, shift: Option<IdShift>) -> Result<Self, ImageError> {
        for dir in ["layers", "blobs", "tmp"] {
            std::fs::create_dir_all(root.join(dir))
                .map_err(io(format!("creating {}", root.join(dir).display())))?;
        }
        let tmp = root.join("tmp");
        let leftovers =
            std::fs::read_dir(&tmp).map_err(io(format!("listing {}", tmp.display())))?;
        for leftover in leftovers.filter_map(|e| e.ok()) {
            let path = leftover.path();
            tracing::info!(path = %path.display(), "removing a partly unpacked layer");
            std::fs::remove_dir_all(&path)
                .or_else(|_| std::fs::remove_file(&path))
                .map_err(io(format!("removing {}", path.display())))?;
        }
        Ok(Self {
            root: root.to_path_buf(),
            shift,
            limits: DEFAULT_LIMITS,
            locks: Default::default(),
        })
    }

    /// Unpacks layers within `limits` instead of the defaults.
    pub fn with_limits(mut self, limits: UnpackLimits) -> Self {
        self.limits = limits;
        self
    }

    /// The directory name of a layer in `layers` (and its lock's key).
    fn layer_name(&self, digest: &str) -> String {
        let name = digest.replace(':', "-");
        match self.shift {
            Some(shift) => format!("{name}+ids{}", shift.base),
            None => name,
        }
    }

    fn layer_dir(&self, digest: &str) -> PathBuf {
        self.root.join("layers").join(self.layer_name(digest))
    }

    /// Unpacks a downloaded layer into a temporary directory, syncs it and renames it into
    /// place: the rename is the commit point. On error nothing of the layer is left.
    #[cfg(test)]
    fn install_layer(&self, digest: &str, blob: &Path) -> Result<PathBuf, ImageError> {
        install_layer(
            &self.root,
            &self.layer_name(digest),
            &self.limits,
            self.shift,
            digest,
            blob,
        )
    }

    fn lock_for(&self, layer_name: &str) -> std::sync::Arc<tokio::sync::Mutex<()>> {
        self.locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(layer_name.to_string())
            .or_default()
            .clone()
    }

    /// Pulls `image` (manifest, config, missing layers) and unpacks what isn't cached.
    pub async fn prepare(&self, image: &ImagePull) -> Result<PreparedImage, ImageError> {
        let reference = image.reference.clone();
        let pull_error = |reason: String| ImageError::Pull {
            reference: reference.clone(),
            reason,
        };
        if image.registry_url.is_empty() {
            return Err(pull_error(
                "only images in the platform's registry can be pulled on this host".into(),
            ));
        }
        let token = (!image.token.is_empty()).then(|| image.token.clone());
        let client = PullClient::new(&image.registry_url, token);
        let manifest = client
            .manifest(&image.reference)
            .await
            .map_err(|e| pull_error(e.to_string()))?;
        let config_bytes = client
            .blob_bytes(&manifest.repository, &manifest.config.digest)
            .await
            .map_err(|e| pull_error(format!("image config: {e}")))?;
        let document: ImageConfigDocument =
            serde_json::from_slice(&config_bytes).map_err(|e| ImageError::Invalid {
                reference: reference.clone(),
                reason: format!("image config is not valid JSON: {e}"),
            })?;
        let mut layers = Vec::with_capacity(manifest.layers.len());
        for layer in &manifest.layers {
            let dir = self.layer_dir(&layer.digest);
            let lock = self.lock_for(&self.layer_name(&layer.digest));
            let _guard = lock.lock().await;
            if !dir.exists() {
                let blob = self.root.join("blobs").join(layer.digest.replace(':', "-"));
                client
                    .blob_to_file(&manifest.repository, &layer.digest, &blob)
                    .await
                    .map_err(|e| pull_error(format!("layer {}: {e}", layer.digest)))?;
                let (root, name, limits, shift) = (
                    self.root.clone(),
                    self.layer_name(&layer.digest),
                    self.limits,
                    self.shift,
                );
                let (digest, blob_path) = (layer.digest.clone(), blob.clone());
                let installed = tokio::task::spawn_blocking(move || {
                    install_layer(&root, &name, &limits, shift, &digest, &blob_path)
                })
                .await
                .map_err(|e| ImageError::Unpack {
                    digest: layer.digest.clone(),
                    reason: e.to_string(),
                })
                .and_then(|installed| installed);
                let _ = std::fs::remove_file(&blob);
                installed?;
            }
            layers.push(dir);
        }
        Ok(PreparedImage {
            reference,
            digest: manifest.digest,
            layers,
            run: document.config.unwrap_or_default(),
        })
    }

    /// Removes unpacked layers that are not in `used`, except ones unpacked in the last
    /// `LAYER_GRACE` (a pull may be about to use them). Returns how many went.
    pub fn remove_unused(
        &self,
        used: &std::collections::HashSet<PathBuf>,
    ) -> Result<usize, ImageError> {
        self.remove_unused_older_than(used, LAYER_GRACE)
    }

    /// [`ImageStore::remove_unused`] with a given grace period.
    pub fn remove_unused_older_than(
        &self,
        used: &std::collections::HashSet<PathBuf>,
        grace: std::time::Duration,
    ) -> Result<usize, ImageError> {
        use std::os::unix::fs::MetadataExt;
        let dir = self.root.join("layers");
        let entries = std::fs::read_dir(&dir).map_err(io(format!("listing {}", dir.display())))?;
        let now = chrono::Utc::now().timestamp();
        let mut removed = 0;
        for entry in entries.filter_map(|e| e.ok()) {
            let path = entry.path();
            if used.contains(&path) {
                continue;
            }
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            if now - meta.ctime() < grace.as_secs() as i64 {
                continue;
            }
            let lock = self.lock_for(&entry.file_name().to_string_lossy());
            let Ok(_guard) = lock.try_lock() else {
                continue;
            };
            if std::fs::remove_dir_all(&path).is_ok() {
                removed += 1;
            }
        }
        Ok(removed)
    }
}

/// [`ImageStore::install_layer`], with what it needs passed in (it runs on a blocking thread).
fn install_layer(
    root: &Path,
    name: &str,
    limits: &UnpackLimits,
    shift: Option<IdShift>,
    digest: &str,
    blob: &Path,
) -> Result<PathBuf, ImageError> {
    let layers = root.join("layers");
    let dir = layers.join(name);
    let staging = root
        .join("tmp")
        .join(format!("{name}-{}", std::process::id()));
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(io(format!("clearing {}", staging.display())))?;
    }
    let installed = unpack_layer(blob, &staging, limits, shift)
        .map_err(|e| ImageError::Unpack {
            digest: digest.to_string(),
            reason: e.to_string(),
        })
        .and_then(|()| {
            std::fs::rename(&staging, &dir)
                .map_err(io(format!("moving layer into {}", dir.display())))
        })
        .and_then(|()| {
            std::fs::File::open(&layers)
                .and_then(|d| d.sync_all())
                .map_err(io(format!("syncing {}", layers.display())))
        });
    if let Err(err) = installed {
        if let Err(e) = std::fs::remove_dir_all(&staging)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %staging.display(), error = %e, "removing a failed layer");
        }
        return Err(err);
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;

    fn layer(entries: &[(&str, Option<&[u8]>)]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (path, content) in entries {
            let mut header = tar::Header::new_gnu();
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(0);
            match content {
                Some(bytes) => {
                    header.set_entry_type(tar::EntryType::Regular);
                    header.set_size(bytes.len() as u64);
                    header.set_mode(0o644);
                    header.set_cksum();
                    builder.append_data(&mut header, path, *bytes).unwrap();
                }
                None => {
                    header.set_entry_type(tar::EntryType::Directory);
                    header.set_size(0);
                    header.set_mode(0o755);
                    header.set_cksum();
                    builder.append_data(&mut header, path, &[][..]).unwrap();
                }
            }
        }
        builder.into_inner().unwrap()
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(bytes).unwrap();
        encoder.finish().unwrap()
    }

    #[test]
    fn whiteouts_and_opaque_dirs_become_overlay_markers() {
        if !nix::unistd::Uid::effective().is_root() {
            aloft_testkit::skip("creating whiteout devices and trusted xattrs needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let blob = dir.path().join("layer.tar.gz");
        let tarball = layer(&[
            ("etc/", None),
            ("etc/hostname", Some(b"x")),
            ("etc/.wh.passwd", Some(b"")),
            ("var/", None),
            ("var/.wh..wh..opq", Some(b"")),
        ]);
        std::fs::write(&blob, gzip(&tarball)).unwrap();
        let dest = dir.path().join("out");
        unpack_layer(&blob, &dest, &DEFAULT_LIMITS, None).unwrap();
        assert_eq!(std::fs::read(dest.join("etc/hostname")).unwrap(), b"x");
        let whiteout = std::fs::symlink_metadata(dest.join("etc/passwd")).unwrap();
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        assert!(whiteout.file_type().is_char_device());
        assert_eq!(whiteout.rdev(), 0);
        let mut value = [0u8; 4];
        let path = CString::new(dest.join("var").as_os_str().as_bytes()).unwrap();
        let len = unsafe {
            libc::getxattr(
                path.as_ptr(),
                c"trusted.overlay.opaque".as_ptr(),
                value.as_mut_ptr().cast(),
                4,
            )
        };
        assert_eq!(&value[..len as usize], b"y");
    }

    #[test]
    fn unused_layers_are_collected_after_their_grace_period() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::new(dir.path(), None).unwrap();
        let used = store.layer_dir("sha256:aaaa");
        let unused = store.layer_dir("sha256:bbbb");
        std::fs::create_dir_all(used.join("etc")).unwrap();
        std::fs::create_dir_all(unused.join("etc")).unwrap();
        let keep = std::collections::HashSet::from([used.clone()]);
        assert_eq!(
            store.remove_unused(&keep).unwrap(),
            0,
            "fresh layers are spared"
        );
        assert_eq!(
            store
                .remove_unused_older_than(&keep, std::time::Duration::ZERO)
                .unwrap(),
            1
        );
        assert!(used.exists() && !unused.exists());
    }

    #[test]
    fn a_layer_is_in_place_only_once_complete() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("images");
        // A crash mid-unpack leaves a partial layer in tmp; the next start clears it, and
        // the layer, not being in `layers`, is pulled and unpacked again.
        let partial = root.join("tmp/sha256-aaaa-1234");
        std::fs::create_dir_all(partial.join("etc")).unwrap();
        std::fs::write(partial.join("etc/half"), b"x").unwrap();
        let store = ImageStore::new(&root, None).unwrap();
        assert!(!partial.exists(), "leftover partial layers are removed");
        assert!(!store.layer_dir("sha256:aaaa").exists());

        let blob = dir.path().join("layer.tar.gz");
        std::fs::write(
            &blob,
            gzip(&layer(&[("etc/", None), ("etc/a", Some(b"a"))])),
        )
        .unwrap();
        let placed = store.install_layer("sha256:aaaa", &blob).unwrap();
        assert_eq!(placed, store.layer_dir("sha256:aaaa"));
        assert_eq!(std::fs::read(placed.join("etc/a")).unwrap(), b"a");

        // A layer that fails midway (here: over the size limit) leaves nothing behind.
        let store = ImageStore::new(&root, None)
            .unwrap()
            .with_limits(UnpackLimits {
                max_bytes: 1 << 20,
                ..DEFAULT_LIMITS
            });
        let zeros = vec![0u8; 4 << 20];
        std::fs::write(
            &blob,
            gzip(&layer(&[
                ("etc/", None),
                ("etc/small", Some(b"s")),
                ("zeros", Some(&zeros)),
            ])),
        )
        .unwrap();
        let err = store.install_layer("sha256:bbbb", &blob).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("sha256:bbbb") && text.contains("1048576 bytes"),
            "the error names the layer and the limit: {text}"
        );
        assert!(!store.layer_dir("sha256:bbbb").exists());
        assert_eq!(std::fs::read_dir(root.join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn shifted_layers_are_kept_apart_from_unshifted_ones() {
        let dir = tempfile::tempdir().unwrap();
        let plain = ImageStore::new(dir.path(), None).unwrap();
        let shifted = ImageStore::new(
            dir.path(),
            Some(IdShift {
                base: 1 << 30,
                size: 65536,
            }),
        )
        .unwrap();
        assert_ne!(plain.layer_dir("sha256:aa"), shifted.layer_dir("sha256:aa"));
    }

    #[test]
    fn entries_escaping_the_layer_are_refused() {
        use crate::unpack::safe_relative;
        assert!(safe_relative(Path::new("../etc/passwd")).is_none());
        assert!(safe_relative(Path::new("/abs")).is_none());
        assert_eq!(
            safe_relative(Path::new("./a/b")),
            Some(PathBuf::from("a/b"))
        );
    }
}
