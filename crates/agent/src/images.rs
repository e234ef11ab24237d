//! Images on a host: pulled from the registry once, each layer unpacked once into a
//! content-addressed directory (OCI whiteouts turned into overlayfs whiteouts), so a
//! machine's root filesystem is an overlay of cached layers.

use std::collections::HashMap;
use std::ffi::CString;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use aloft_api::internal::ImagePull;
use aloft_registry::client::PullClient;
use serde::{Deserialize, Serialize};

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
    locks: std::sync::Mutex<HashMap<String, std::sync::Arc<tokio::sync::Mutex<()>>>>,
}

impl ImageStore {
    pub fn new(root: &Path) -> Result<Self, ImageError> {
        for dir in ["layers", "blobs", "tmp"] {
            std::fs::create_dir_all(root.join(dir))
                .map_err(io(format!("creating {}", root.join(dir).display())))?;
        }
        Ok(Self {
            root: root.to_path_buf(),
            locks: Default::default(),
        })
    }

    fn layer_dir(&self, digest: &str) -> PathBuf {
        self.root.join("layers").join(digest.replace(':', "-"))
    }

    fn lock_for(&self, digest: &str) -> std::sync::Arc<tokio::sync::Mutex<()>> {
        self.locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(digest.to_string())
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
            let lock = self.lock_for(&layer.digest);
            let _guard = lock.lock().await;
            if !dir.exists() {
                let blob = self.root.join("blobs").join(layer.digest.replace(':', "-"));
                client
                    .blob_to_file(&manifest.repository, &layer.digest, &blob)
                    .await
                    .map_err(|e| pull_error(format!("layer {}: {e}", layer.digest)))?;
                let staging = self.root.join("tmp").join(format!(
                    "{}-{}",
                    layer.digest.replace(':', "-"),
                    std::process::id()
                ));
                let digest = layer.digest.clone();
                let (blob_for_task, staging_for_task) = (blob.clone(), staging.clone());
                tokio::task::spawn_blocking(move || {
                    unpack_layer(&blob_for_task, &staging_for_task)
                })
                .await
                .map_err(|e| ImageError::Unpack {
                    digest: digest.clone(),
                    reason: e.to_string(),
                })?
                .map_err(|reason| ImageError::Unpack {
                    digest: digest.clone(),
                    reason,
                })?;
                std::fs::rename(&staging, &dir)
                    .map_err(io(format!("moving layer into {}", dir.display())))?;
                let _ = std::fs::remove_file(&blob);
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
            let lock = self.lock_for(&entry.file_name().to_string_lossy().replacen('-', ":", 1));
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

fn open_layer(blob: &Path) -> Result<Box<dyn Read>, String> {
    let mut file =
        std::fs::File::open(blob).map_err(|e| format!("opening {}: {e}", blob.display()))?;
    let mut magic = [0u8; 4];
    let read = file.read(&mut magic).map_err(|e| e.to_string())?;
    let file = std::fs::File::open(blob).map_err(|e| e.to_string())?;
    let reader = std::io::BufReader::new(file);
    Ok(match &magic[..read] {
        [0x1f, 0x8b, ..] => Box::new(flate2::read::GzDecoder::new(reader)),
        [0x28, 0xb5, 0x2f, 0xfd] => {
            Box::new(zstd::stream::read::Decoder::new(reader).map_err(|e| e.to_string())?)
        }
        _ => Box::new(reader),
    })
}

/// An error and what caused it, on one line.
fn with_causes(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

/// A relative path inside a layer with no `..`, no root and no prefix.
fn safe_relative(path: &Path) -> Option<PathBuf> {
    let mut clean = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => clean.push(part),
            Component::CurDir => {}
            _ => return None,
        }
    }
    Some(clean)
}

fn mknod_whiteout(path: &Path) -> Result<(), String> {
    let c_path = CString::new(path.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
    // An overlayfs whiteout is a character device with device number 0:0.
    let rc = unsafe { libc::mknod(c_path.as_ptr(), libc::S_IFCHR, 0) };
    if rc != 0 {
        return Err(format!(
            "creating whiteout {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

fn set_opaque(dir: &Path) -> Result<(), String> {
    let c_path = CString::new(dir.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
    let name = c"trusted.overlay.opaque";
    let rc = unsafe { libc::setxattr(c_path.as_ptr(), name.as_ptr(), b"y".as_ptr().cast(), 1, 0) };
    if rc != 0 {
        return Err(format!(
            "marking {} opaque: {}",
            dir.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Unpacks one layer tarball into `dest`, turning OCI whiteouts (`.wh.NAME`) into overlayfs
/// whiteouts and opaque markers (`.wh..wh..opq`) into the opaque xattr.
pub fn unpack_layer(blob: &Path, dest: &Path) -> Result<(), String> {
    if dest.exists() {
        std::fs::remove_dir_all(dest).map_err(|e| format!("clearing {}: {e}", dest.display()))?;
    }
    std::fs::create_dir_all(dest).map_err(|e| format!("creating {}: {e}", dest.display()))?;
    let mut archive = tar::Archive::new(open_layer(blob)?);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_unpack_xattrs(true);
    archive.set_overwrite(true);
    archive.set_preserve_mtime(true);
    let mut opaque_dirs = Vec::new();
    for entry in archive
        .entries()
        .map_err(|e| format!("reading layer: {e}"))?
    {
        let mut entry = entry.map_err(|e| format!("reading layer entry: {e}"))?;
        let path = entry
            .path()
            .map_err(|e| format!("layer entry path: {e}"))?
            .into_owned();
        let Some(relative) = safe_relative(&path) else {
            return Err(format!("layer entry {} escapes the layer", path.display()));
        };
        let file_name = relative
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let parent = relative.parent().map(Path::to_path_buf).unwrap_or_default();
        if file_name == ".wh..wh..opq" {
            let dir = dest.join(&parent);
            std::fs::create_dir_all(&dir)
                .map_err(|e| format!("creating {}: {e}", dir.display()))?;
            opaque_dirs.push(dir);
            continue;
        }
        if let Some(hidden) = file_name.strip_prefix(".wh.") {
            let dir = dest.join(&parent);
            std::fs::create_dir_all(&dir)
                .map_err(|e| format!("creating {}: {e}", dir.display()))?;
            let target = dir.join(hidden);
            if target.symlink_metadata().is_ok() {
                let _ = std::fs::remove_file(&target).or_else(|_| std::fs::remove_dir_all(&target));
            }
            mknod_whiteout(&target)?;
            continue;
        }
        entry
            .unpack_in(dest)
            .map_err(|e| format!("unpacking {}: {}", relative.display(), with_causes(&e)))?;
    }
    for dir in opaque_dirs {
        set_opaque(&dir)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
            eprintln!("skipping: creating whiteout devices and trusted xattrs needs root");
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
        unpack_layer(&blob, &dest).unwrap();
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
        let store = ImageStore::new(dir.path()).unwrap();
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
    fn entries_escaping_the_layer_are_refused() {
        assert!(safe_relative(Path::new("../etc/passwd")).is_none());
        assert!(safe_relative(Path::new("/abs")).is_none());
        assert_eq!(
            safe_relative(Path::new("./a/b")),
            Some(PathBuf::from("a/b"))
        );
    }
}
