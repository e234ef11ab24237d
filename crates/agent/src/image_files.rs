//! Reading single files of an image, for the proxy's `[[statics]]`: a path is looked up
//! in the union of the image's unpacked layers as overlayfs would (upper layers first,
//! whiteouts hide what is below, opaque directories end the merge), read-only, and never
//! through a symlink: every step opens the next component relative to the directory
//! descriptor of the previous one with `O_NOFOLLOW`, so nothing outside the layers' own
//! directories is ever reached, whatever the image holds.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::SystemTime;

/// What a path names in an image.
#[derive(Debug)]
pub enum ImageEntry {
    /// A regular file, opened read-only.
    File {
        file: File,
        len: u64,
        modified: SystemTime,
    },
    /// A directory.
    Directory,
    /// Nothing, a whiteout, a symlink (on the way or at the end), or a special file.
    Missing,
}

#[derive(Debug, thiserror::Error)]
pub enum ImageFileError {
    #[error("{0:?} is not a plain path component")]
    BadComponent(String),
    #[error("reading the image: {0}")]
    Io(#[from] io::Error),
}

/// A component is one plain name: not empty, not `.` or `..`, no `/` or NUL.
fn check_component(name: &str) -> Result<CString, ImageFileError> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') {
        return Err(ImageFileError::BadComponent(name.to_string()));
    }
    CString::new(name).map_err(|_| ImageFileError::BadComponent(name.to_string()))
}

fn open_at(
    dir: Option<&OwnedFd>,
    name: &std::ffi::CStr,
    flags: libc::c_int,
) -> io::Result<OwnedFd> {
    let base = dir.map_or(libc::AT_FDCWD, |d| d.as_raw_fd());
    // SAFETY: `name` is a valid C string; the returned descriptor is owned from here on.
    let fd = unsafe {
        libc::openat(
            base,
            name.as_ptr(),
            flags | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by openat and is not owned elsewhere.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn stat_at(dir: &OwnedFd, name: &std::ffi::CStr) -> io::Result<Option<libc::stat>> {
    let mut stat = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `stat` is written by fstatat on success; `name` is a valid C string.
    let rc = unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            stat.as_mut_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc != 0 {
        let err = io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::ENOENT) | Some(libc::ENOTDIR) => Ok(None),
            _ => Err(err),
        };
    }
    // SAFETY: fstatat succeeded, so `stat` is initialised.
    Ok(Some(unsafe { stat.assume_init() }))
}

fn is_opaque(dir: &OwnedFd) -> bool {
    let mut value = [0u8; 1];
    // SAFETY: the buffer is one byte long, as passed.
    let len = unsafe {
        libc::fgetxattr(
            dir.as_raw_fd(),
            c"trusted.overlay.opaque".as_ptr(),
            value.as_mut_ptr().cast(),
            value.len(),
        )
    };
    len == 1 && value[0] == b'y'
}

fn file_type(stat: &libc::stat) -> libc::mode_t {
    stat.st_mode & libc::S_IFMT
}

/// Looks `components` (from the image's root) up in `layers` (bottom layer first, as in
/// [`crate::images::PreparedImage`]).
pub fn lookup(layers: &[PathBuf], components: &[&str]) -> Result<ImageEntry, ImageFileError> {
    let names = components
        .iter()
        .map(|c| check_component(c))
        .collect::<Result<Vec<_>, _>>()?;
    // The directories that make up the current (merged) directory, topmost first.
    let mut merged: Vec<OwnedFd> = Vec::with_capacity(layers.len());
    for layer in layers.iter().rev() {
        let path = CString::new(layer.as_os_str().as_encoded_bytes())
            .map_err(|_| io::Error::other("a layer path holds a NUL byte"))?;
        merged.push(open_at(None, &path, libc::O_RDONLY | libc::O_DIRECTORY)?);
    }
    for (index, name) in names.iter().enumerate() {
        let last = index + 1 == names.len();
        let mut below: Vec<OwnedFd> = Vec::new();
        for dir in &merged {
            let Some(stat) = stat_at(dir, name)? else {
                continue;
            };
            match file_type(&stat) {
                libc::S_IFDIR => {
                    let opened = match open_at(Some(dir), name, libc::O_RDONLY | libc::O_DIRECTORY)
                    {
                        Ok(fd) => fd,
                        // Replaced by something else since the stat: layers are immutable,
                        // so this is not an image we can trust to read.
                        Err(err) if err.raw_os_error() == Some(libc::ELOOP) => {
                            return Ok(ImageEntry::Missing);
                        }
                        Err(err) => return Err(err.into()),
                    };
                    let opaque = is_opaque(&opened);
                    below.push(opened);
                    if opaque {
                        break;
                    }
                }
                // The topmost entry that is not a directory decides; under a directory
                // of an upper layer it is hidden.
                libc::S_IFREG if below.is_empty() && last => {
                    let fd = match open_at(Some(dir), name, libc::O_RDONLY) {
                        Ok(fd) => fd,
                        Err(err) if err.raw_os_error() == Some(libc::ELOOP) => {
                            return Ok(ImageEntry::Missing);
                        }
                        Err(err) => return Err(err.into()),
                    };
                    let file = File::from(fd);
                    let meta = file.metadata()?;
                    if !meta.is_file() {
                        return Ok(ImageEntry::Missing);
                    }
                    return Ok(ImageEntry::File {
                        len: meta.len(),
                        modified: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                        file,
                    });
                }
                // A whiteout, symlink, special file, or a file on the way: nothing to
                // serve here, and nothing below it is visible.
                _ if below.is_empty() => return Ok(ImageEntry::Missing),
                _ => break,
            }
        }
        if below.is_empty() {
            return Ok(ImageEntry::Missing);
        }
        merged = below;
    }
    Ok(ImageEntry::Directory)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn read(entry: ImageEntry) -> Option<String> {
        match entry {
            ImageEntry::File { mut file, .. } => {
                let mut text = String::new();
                io::Read::read_to_string(&mut file, &mut text).unwrap();
                Some(text)
            }
            _ => None,
        }
    }

    fn write(path: &Path, text: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn upper_layers_win_and_directories_merge() {
        let root = tempfile::tempdir().unwrap();
        let (lower, upper) = (root.path().join("lower"), root.path().join("upper"));
        write(&lower.join("app/public/a.css"), "lower a");
        write(&lower.join("app/public/b.css"), "lower b");
        write(&upper.join("app/public/a.css"), "upper a");
        let layers = vec![lower, upper];
        let get = |path: &[&str]| read(lookup(&layers, path).unwrap());
        assert_eq!(get(&["app", "public", "a.css"]).as_deref(), Some("upper a"));
        assert_eq!(get(&["app", "public", "b.css"]).as_deref(), Some("lower b"));
        assert_eq!(get(&["app", "public", "c.css"]), None);
        assert!(matches!(
            lookup(&layers, &["app", "public"]).unwrap(),
            ImageEntry::Directory
        ));
    }

    #[test]
    fn symlinks_are_never_followed() {
        let root = tempfile::tempdir().unwrap();
        let layer = root.path().join("layer");
        write(&layer.join("secret.txt"), "secret");
        write(&layer.join("app/public/ok.txt"), "ok");
        std::os::unix::fs::symlink("/etc/passwd", layer.join("app/public/passwd")).unwrap();
        std::os::unix::fs::symlink("../../secret.txt", layer.join("app/public/up")).unwrap();
        std::os::unix::fs::symlink("/", layer.join("app/public/root")).unwrap();
        std::os::unix::fs::symlink("public", layer.join("app/alias")).unwrap();
        let layers = vec![layer];
        for path in [
            &["app", "public", "passwd"][..],
            &["app", "public", "up"],
            &["app", "public", "root", "etc", "passwd"],
            &["app", "alias", "ok.txt"],
        ] {
            assert!(
                matches!(lookup(&layers, path).unwrap(), ImageEntry::Missing),
                "{path:?}"
            );
        }
    }

    #[test]
    fn dot_dot_and_odd_components_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let layers = vec![root.path().to_path_buf()];
        for bad in ["..", ".", "", "a/b", "a\0b"] {
            assert!(
                matches!(
                    lookup(&layers, &["app", bad]),
                    Err(ImageFileError::BadComponent(_))
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn whiteouts_and_opaque_directories_hide_lower_layers() {
        if !nix::unistd::Uid::effective().is_root() {
            aloft_testkit::skip("whiteout devices and trusted xattrs need root");
            return;
        }
        let root = tempfile::tempdir().unwrap();
        let (lower, upper) = (root.path().join("lower"), root.path().join("upper"));
        write(&lower.join("app/public/gone.css"), "deleted");
        write(&lower.join("app/hidden/old.css"), "old");
        write(&lower.join("app/public/kept.css"), "kept");
        std::fs::create_dir_all(upper.join("app/public")).unwrap();
        std::fs::create_dir_all(upper.join("app/hidden")).unwrap();
        let whiteout = CString::new(
            upper
                .join("app/public/gone.css")
                .as_os_str()
                .as_encoded_bytes(),
        )
        .unwrap();
        // SAFETY: a valid path; creates an overlayfs whiteout (char device 0:0).
        assert_eq!(
            unsafe { libc::mknod(whiteout.as_ptr(), libc::S_IFCHR, 0) },
            0
        );
        let hidden = CString::new(upper.join("app/hidden").as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: valid path and a one-byte value.
        let rc = unsafe {
            libc::setxattr(
                hidden.as_ptr(),
                c"trusted.overlay.opaque".as_ptr(),
                b"y".as_ptr().cast(),
                1,
                0,
            )
        };
        assert_eq!(rc, 0, "{}", io::Error::last_os_error());
        let layers = vec![lower, upper];
        assert!(matches!(
            lookup(&layers, &["app", "public", "gone.css"]).unwrap(),
            ImageEntry::Missing
        ));
        assert!(matches!(
            lookup(&layers, &["app", "hidden", "old.css"]).unwrap(),
            ImageEntry::Missing
        ));
        assert!(read(lookup(&layers, &["app", "public", "kept.css"]).unwrap()).is_some());
    }
}
