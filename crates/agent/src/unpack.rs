//! Unpacking one image layer, confined to its directory: every entry, whiteout and opaque
//! marker is resolved beneath the layer's root without following symlinks (`openat2` with
//! `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`), everything is created relative to directory
//! fds, and a layer's size, entry count and path depth are bounded.

use std::ffi::{CStr, CString};
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

/// Bounds on what one layer may unpack to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnpackLimits {
    /// Bytes of file content.
    pub max_bytes: u64,
    /// Entries (files, directories, links, whiteouts...).
    pub max_entries: u64,
    /// Components in one entry's path.
    pub max_depth: usize,
    /// Bytes in one entry's path.
    pub max_path_bytes: usize,
}

/// The limits every layer gets unless told otherwise.
pub const DEFAULT_LIMITS: UnpackLimits = UnpackLimits {
    max_bytes: 16 << 30,
    max_entries: 1_000_000,
    max_depth: 128,
    max_path_bytes: 4096,
};

/// Shifts a layer's owners for a container in a user namespace: id `n` of the image is
/// written as `base + n` on the host, for `n < size`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IdShift {
    pub base: u32,
    pub size: u32,
}

impl IdShift {
    /// The host id for image id `id`; ids beyond the range become the range's `nobody`.
    pub fn host_id(&self, id: u64) -> u32 {
        let nobody = 65534.min(self.size.saturating_sub(1));
        let inside = u32::try_from(id)
            .ok()
            .filter(|id| *id < self.size)
            .unwrap_or(nobody);
        self.base + inside
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error(
        "the layer unpacks to more than {} bytes ({} GiB), the limit for one layer",
        limit,
        limit >> 30
    )]
    TooLarge { limit: u64 },
    #[error("the layer has more than {limit} entries, the limit for one layer")]
    TooManyEntries { limit: u64 },
    #[error("layer entry {path} is nested deeper than {limit} directories, the limit")]
    TooDeep { path: String, limit: usize },
    #[error("layer entry {path}... is longer than {limit} bytes, the limit for a path")]
    PathTooLong { path: String, limit: usize },
    #[error("layer entry {path} {reason}; refusing to unpack it")]
    Refused { path: String, reason: String },
    #[error("reading the layer: {0}")]
    Archive(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
}

fn refused(path: &Path, reason: impl Into<String>) -> UnpackError {
    UnpackError::Refused {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

fn io_at(context: impl FnOnce() -> String) -> impl FnOnce(std::io::Error) -> UnpackError {
    move |source| UnpackError::Io {
        context: context(),
        source,
    }
}

fn last_error() -> std::io::Error {
    std::io::Error::last_os_error()
}

fn c_name(name: &[u8]) -> Result<CString, std::io::Error> {
    CString::new(name).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))
}

/// Opens `path` (relative, may be empty for `dir` itself) beneath `dir`, refusing symlinks,
/// `..` escapes and mount crossings anywhere on the way.
fn open_beneath(dir: BorrowedFd<'_>, path: &Path, flags: i32) -> std::io::Result<OwnedFd> {
    let path = if path.as_os_str().is_empty() {
        c".".to_owned()
    } else {
        c_name(path.as_os_str().as_bytes())?
    };
    // SAFETY: open_how is plain integers; all-zero is its empty value.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC | libc::O_NOFOLLOW) as u64;
    how.resolve = libc::RESOLVE_BENEATH
        | libc::RESOLVE_NO_SYMLINKS
        | libc::RESOLVE_NO_MAGICLINKS
        | libc::RESOLVE_NO_XDEV;
    loop {
        // SAFETY: `path` and `how` outlive the call; the size is the struct's.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dir.as_raw_fd(),
                path.as_ptr(),
                &how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        if fd >= 0 {
            // SAFETY: the kernel just gave us this descriptor.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) });
        }
        let err = last_error();
        if err.raw_os_error() != Some(libc::EAGAIN) && err.raw_os_error() != Some(libc::EINTR) {
            return Err(err);
        }
    }
}

fn open_dir_beneath(dir: BorrowedFd<'_>, path: &Path) -> std::io::Result<OwnedFd> {
    open_beneath(dir, path, libc::O_RDONLY | libc::O_DIRECTORY)
}

/// `/proc/self/fd/N`: a path std's functions can use for an fd we hold.
fn fd_path(fd: BorrowedFd<'_>) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// The kind of whatever `name` in `dir` is, without following a symlink.
fn kind_at(dir: BorrowedFd<'_>, name: &CStr) -> std::io::Result<Option<libc::mode_t>> {
    let mut stat = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: valid fd, NUL-terminated name, stat buffer of the right type.
    let rc = unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            stat.as_mut_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc != 0 {
        let err = last_error();
        return if err.raw_os_error() == Some(libc::ENOENT) {
            Ok(None)
        } else {
            Err(err)
        };
    }
    // SAFETY: fstatat succeeded, so it filled the buffer.
    Ok(Some(unsafe { stat.assume_init() }.st_mode & libc::S_IFMT))
}

/// Removes `name` from `dir` (a directory with all it holds), never following a symlink.
fn remove_at(dir: BorrowedFd<'_>, name: &CStr) -> std::io::Result<()> {
    match kind_at(dir, name)? {
        None => Ok(()),
        Some(libc::S_IFDIR) => {
            // std's remove_dir_all works with openat/unlinkat and never follows symlinks;
            // the fd path pins the parent we resolved.
            let name = Path::new(std::ffi::OsStr::from_bytes(name.to_bytes()));
            std::fs::remove_dir_all(fd_path(dir).join(name))
        }
        Some(_) => {
            // SAFETY: valid fd and NUL-terminated name.
            if unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) } != 0 {
                return Err(last_error());
            }
            Ok(())
        }
    }
}

fn check(rc: libc::c_int) -> std::io::Result<()> {
    if rc == 0 { Ok(()) } else { Err(last_error()) }
}

/// The owner, mode and times an entry's header asks for.
struct Attributes {
    uid: u32,
    gid: u32,
    mode: u32,
    mtime: i64,
}

fn set_owner_and_times(
    dir: BorrowedFd<'_>,
    name: &CStr,
    attributes: &Attributes,
    set_mode: bool,
) -> std::io::Result<()> {
    // SAFETY (all three): valid fd and NUL-terminated name; AT_SYMLINK_NOFOLLOW keeps
    // the calls on the entry itself.
    check(unsafe {
        libc::fchownat(
            dir.as_raw_fd(),
            name.as_ptr(),
            attributes.uid,
            attributes.gid,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    if set_mode {
        // After chown, which clears setuid bits. `name` is what we just created in `dir`
        // and is not a symlink.
        check(unsafe { libc::fchmodat(dir.as_raw_fd(), name.as_ptr(), attributes.mode, 0) })?;
    }
    let time = libc::timespec {
        tv_sec: attributes.mtime as libc::time_t,
        tv_nsec: 0,
    };
    check(unsafe {
        libc::utimensat(
            dir.as_raw_fd(),
            name.as_ptr(),
            [time, time].as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
}

/// Extended attributes a layer may carry. Others (`trusted.overlay.*` above all, which
/// would steer overlayfs) are dropped.
fn xattr_allowed(name: &[u8]) -> bool {
    name.starts_with(b"user.") || name == b"security.capability"
}

fn set_xattr(fd: BorrowedFd<'_>, name: &CStr, value: &[u8]) -> std::io::Result<()> {
    // SAFETY: valid fd, NUL-terminated name, value pointer and length from one slice.
    check(unsafe {
        libc::fsetxattr(
            fd.as_raw_fd(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    })
}

/// Counts the bytes read from the decompressed stream and stops past a limit, so a
/// decompression bomb ends early even in tar metadata the entry checks don't see.
struct Bounded<R> {
    inner: R,
    remaining: u64,
    exceeded: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl<R: Read> Read for Bounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.remaining == 0 {
            self.exceeded
                .store(true, std::sync::atomic::Ordering::Relaxed);
            return Err(std::io::Error::other("the layer exceeds its size limit"));
        }
        let want = buf
            .len()
            .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        let read = self.inner.read(&mut buf[..want])?;
        self.remaining -= read as u64;
        Ok(read)
    }
}

/// A relative path inside a layer with no `..`, no root and no prefix.
pub fn safe_relative(path: &Path) -> Option<PathBuf> {
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

struct Unpacker {
    root: OwnedFd,
    limits: UnpackLimits,
    shift: Option<IdShift>,
    bytes: u64,
    entries: u64,
}

impl Unpacker {
    fn owner(&self, uid: u64, gid: u64) -> (u32, u32) {
        match self.shift {
            Some(shift) => (shift.host_id(uid), shift.host_id(gid)),
            None => (
                u32::try_from(uid).unwrap_or(65534),
                u32::try_from(gid).unwrap_or(65534),
            ),
        }
    }

    fn check_path(&self, relative: &Path) -> Result<(), UnpackError> {
        let bytes = relative.as_os_str().len();
        if bytes > self.limits.max_path_bytes {
            let shown: String = relative.display().to_string().chars().take(80).collect();
            return Err(UnpackError::PathTooLong {
                path: shown,
                limit: self.limits.max_path_bytes,
            });
        }
        if relative.components().count() > self.limits.max_depth {
            let shown: String = relative.display().to_string().chars().take(80).collect();
            return Err(UnpackError::TooDeep {
                path: format!("{shown}..."),
                limit: self.limits.max_depth,
            });
        }
        Ok(())
    }

    /// Opens the directory `parent` beneath the root, creating missing directories (owned
    /// by the image's root, mode 0755) on the way.
    fn parent_dir(&self, entry: &Path, parent: &Path) -> Result<OwnedFd, UnpackError> {
        let root = self.root.as_fd();
        match open_dir_beneath(root, parent) {
            Ok(fd) => return Ok(fd),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(resolve_error(entry, parent, e)),
        }
        let (uid, gid) = self.owner(0, 0);
        let mut dir = open_dir_beneath(root, Path::new(""))
            .map_err(io_at(|| "opening the layer's root".to_string()))?;
        let mut walked = PathBuf::new();
        for component in parent.components() {
            walked.push(component);
            let name = c_name(component.as_os_str().as_bytes())
                .map_err(|_| refused(entry, "has a NUL byte in its path"))?;
            dir = match open_dir_beneath(dir.as_fd(), Path::new(component.as_os_str())) {
                Ok(fd) => fd,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                    // SAFETY: valid fd and NUL-terminated single-component name.
                    check(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), 0o755) })
                        .map_err(io_at(|| format!("creating {}", walked.display())))?;
                    check(unsafe {
                        libc::fchownat(
                            dir.as_raw_fd(),
                            name.as_ptr(),
                            uid,
                            gid,
                            libc::AT_SYMLINK_NOFOLLOW,
                        )
                    })
                    .map_err(io_at(|| format!("chown {}", walked.display())))?;
                    open_dir_beneath(dir.as_fd(), Path::new(component.as_os_str()))
                        .map_err(|e| resolve_error(entry, &walked, e))?
                }
                Err(e) => return Err(resolve_error(entry, &walked, e)),
            };
        }
        Ok(dir)
    }

    fn unpack<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), UnpackError> {
        self.entries += 1;
        if self.entries > self.limits.max_entries {
            return Err(UnpackError::TooManyEntries {
                limit: self.limits.max_entries,
            });
        }
        let kind = entry.header().entry_type();
        if kind.is_pax_global_extensions() {
            return Ok(());
        }
        let raw_path = entry
            .path()
            .map_err(|e| UnpackError::Archive(format!("an entry's path: {e}")))?
            .into_owned();
        let Some(relative) = safe_relative(&raw_path) else {
            return Err(refused(&raw_path, "escapes the layer (absolute or `..`)"));
        };
        self.check_path(&relative)?;
        let header = entry.header();
        let (uid, gid) = self.owner(header.uid().unwrap_or(0), header.gid().unwrap_or(0));
        let attributes = Attributes {
            uid,
            gid,
            mode: header.mode().unwrap_or(0o644) & 0o7777,
            mtime: header.mtime().unwrap_or(0) as i64,
        };
        let Some(file_name) = relative.file_name().map(|n| n.as_bytes().to_vec()) else {
            // The layer's root itself ("./").
            if kind.is_dir() {
                let fd = self.root.as_fd();
                set_owner_and_times(fd, c".", &attributes, true)
                    .map_err(io_at(|| "setting the layer root's owner".to_string()))?;
            }
            return Ok(());
        };
        let parent_path = relative.parent().unwrap_or(Path::new(""));
        let parent = self.parent_dir(&relative, parent_path)?;
        let parent = parent.as_fd();
        let context = || relative.display().to_string();
        if file_name == b".wh..wh..opq" {
            return set_xattr(parent, c"trusted.overlay.opaque", b"y").map_err(io_at(|| {
                format!("marking {} opaque", parent_path.display())
            }));
        }
        if let Some(hidden) = file_name.strip_prefix(b".wh.") {
            if hidden.is_empty() || hidden == b"." || hidden == b".." {
                return Err(refused(&relative, "is a whiteout of no valid name"));
            }
            let hidden = c_name(hidden).map_err(|_| refused(&relative, "has a NUL byte"))?;
            remove_at(parent, &hidden).map_err(io_at(context))?;
            // An overlayfs whiteout is a character device with device number 0:0.
            // SAFETY: valid fd and NUL-terminated single-component name.
            return check(unsafe {
                libc::mknodat(parent.as_raw_fd(), hidden.as_ptr(), libc::S_IFCHR, 0)
            })
            .map_err(io_at(|| {
                format!("creating whiteout {}", relative.display())
            }));
        }
        let name = c_name(&file_name).map_err(|_| refused(&relative, "has a NUL byte"))?;
        let fd = parent.as_raw_fd();
        match kind {
            tar::EntryType::Directory => {
                if kind_at(parent, &name).map_err(io_at(context))? != Some(libc::S_IFDIR) {
                    remove_at(parent, &name).map_err(io_at(context))?;
                    // SAFETY: valid fd and NUL-terminated single-component name.
                    check(unsafe { libc::mkdirat(fd, name.as_ptr(), 0o700) })
                        .map_err(io_at(context))?;
                }
                set_owner_and_times(parent, &name, &attributes, true).map_err(io_at(context))?;
                self.set_xattrs(entry, parent, &name, &relative)?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                let size = entry.size();
                if self.bytes.saturating_add(size) > self.limits.max_bytes {
                    return Err(UnpackError::TooLarge {
                        limit: self.limits.max_bytes,
                    });
                }
                remove_at(parent, &name).map_err(io_at(context))?;
                // SAFETY: valid fd and NUL-terminated single-component name; O_EXCL and
                // O_NOFOLLOW make this a new file, never something a symlink points at.
                let raw = unsafe {
                    libc::openat(
                        fd,
                        name.as_ptr(),
                        libc::O_WRONLY
                            | libc::O_CREAT
                            | libc::O_EXCL
                            | libc::O_NOFOLLOW
                            | libc::O_CLOEXEC,
                        0o600,
                    )
                };
                if raw < 0 {
                    return Err(io_at(context)(last_error()));
                }
                // SAFETY: openat just returned this descriptor.
                let mut file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(raw) });
                let copied = std::io::copy(&mut entry.take(size), &mut file)
                    .map_err(|e| UnpackError::Archive(format!("{}: {e}", relative.display())))?;
                self.bytes += copied;
                set_owner_and_times(parent, &name, &attributes, true).map_err(io_at(context))?;
                self.set_xattrs(entry, parent, &name, &relative)?;
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| refused(&relative, "is a symlink with no target"))?;
                let target = c_name(&target).map_err(|_| refused(&relative, "has a NUL byte"))?;
                remove_at(parent, &name).map_err(io_at(context))?;
                // SAFETY: NUL-terminated strings and a valid fd.
                check(unsafe { libc::symlinkat(target.as_ptr(), fd, name.as_ptr()) })
                    .map_err(io_at(context))?;
                set_owner_and_times(parent, &name, &attributes, false).map_err(io_at(context))?;
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name()
                    .map_err(|e| UnpackError::Archive(format!("{}: {e}", relative.display())))?
                    .ok_or_else(|| refused(&relative, "is a hard link with no target"))?
                    .into_owned();
                let inside = target
                    .strip_prefix("/")
                    .ok()
                    .unwrap_or(&target)
                    .to_path_buf();
                let (Some(target_relative), Some(target_name)) =
                    (safe_relative(&inside), inside.file_name())
                else {
                    return Err(refused(
                        &relative,
                        format!("is a hard link to {}, outside the layer", target.display()),
                    ));
                };
                self.check_path(&target_relative)?;
                let target_parent = target_relative.parent().unwrap_or(Path::new(""));
                let target_dir =
                    open_dir_beneath(self.root.as_fd(), target_parent).map_err(|e| {
                        refused(
                            &relative,
                            format!(
                                "is a hard link to {}, which is not in the layer ({})",
                                target.display(),
                                describe_resolve(&e)
                            ),
                        )
                    })?;
                let target_name = c_name(target_name.as_bytes())
                    .map_err(|_| refused(&relative, "has a NUL byte"))?;
                if target_relative == relative {
                    return Ok(());
                }
                remove_at(parent, &name).map_err(io_at(context))?;
                // SAFETY: valid fds and NUL-terminated names; flags 0 links a symlink
                // itself, never what it points at.
                check(unsafe {
                    libc::linkat(
                        target_dir.as_raw_fd(),
                        target_name.as_ptr(),
                        fd,
                        name.as_ptr(),
                        0,
                    )
                })
                .map_err(|e| {
                    refused(
                        &relative,
                        format!("is a hard link to {} that failed: {e}", target.display()),
                    )
                })?;
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                let file_type = match kind {
                    tar::EntryType::Char => libc::S_IFCHR,
                    tar::EntryType::Block => libc::S_IFBLK,
                    _ => libc::S_IFIFO,
                };
                let major = entry.header().device_major().ok().flatten().unwrap_or(0);
                let minor = entry.header().device_minor().ok().flatten().unwrap_or(0);
                remove_at(parent, &name).map_err(io_at(context))?;
                // SAFETY: valid fd and NUL-terminated single-component name.
                check(unsafe {
                    libc::mknodat(
                        fd,
                        name.as_ptr(),
                        file_type | 0o600,
                        libc::makedev(major, minor),
                    )
                })
                .map_err(io_at(context))?;
                set_owner_and_times(parent, &name, &attributes, true).map_err(io_at(context))?;
            }
            other => {
                tracing::debug!(path = %relative.display(), kind = ?other, "skipping layer entry of an unsupported kind");
            }
        }
        Ok(())
    }

    fn set_xattrs<R: Read>(
        &self,
        entry: &mut tar::Entry<'_, R>,
        parent: BorrowedFd<'_>,
        name: &CStr,
        relative: &Path,
    ) -> Result<(), UnpackError> {
        let Ok(Some(extensions)) = entry.pax_extensions() else {
            return Ok(());
        };
        let mut wanted = Vec::new();
        for extension in extensions.flatten() {
            let Some(xattr) = extension.key_bytes().strip_prefix(b"SCHILY.xattr.") else {
                continue;
            };
            if xattr_allowed(xattr) {
                wanted.push((xattr.to_vec(), extension.value_bytes().to_vec()));
            } else {
                tracing::debug!(path = %relative.display(), xattr = %String::from_utf8_lossy(xattr), "dropping an extended attribute a layer may not set");
            }
        }
        if wanted.is_empty() {
            return Ok(());
        }
        let fd = open_beneath(
            parent,
            Path::new(std::ffi::OsStr::from_bytes(name.to_bytes())),
            libc::O_RDONLY,
        )
        .map_err(io_at(|| relative.display().to_string()))?;
        for (xattr, value) in wanted {
            let xattr_name = c_name(&xattr).map_err(|_| refused(relative, "has a NUL byte"))?;
            set_xattr(fd.as_fd(), &xattr_name, &value).map_err(io_at(|| {
                format!(
                    "setting {} on {}",
                    String::from_utf8_lossy(&xattr),
                    relative.display()
                )
            }))?;
        }
        Ok(())
    }
}

fn describe_resolve(err: &std::io::Error) -> String {
    match err.raw_os_error() {
        Some(libc::ELOOP) | Some(libc::ENOTDIR) => {
            "its path goes through a symlink or a non-directory".into()
        }
        Some(libc::EXDEV) => "its path leaves the layer".into(),
        Some(libc::ENOENT) => "no such entry".into(),
        _ => err.to_string(),
    }
}

fn resolve_error(entry: &Path, parent: &Path, err: std::io::Error) -> UnpackError {
    match err.raw_os_error() {
        Some(libc::ELOOP) | Some(libc::EXDEV) | Some(libc::ENOTDIR) => refused(
            entry,
            format!(
                "lies beneath {}, and {}",
                parent.display(),
                match err.raw_os_error() {
                    Some(libc::EXDEV) => "that path leaves the layer",
                    _ => "that path is (or goes through) a symlink or a non-directory",
                }
            ),
        ),
        _ => UnpackError::Io {
            context: format!("opening {}", parent.display()),
            source: err,
        },
    }
}

fn open_layer(blob: &Path) -> Result<Box<dyn Read>, UnpackError> {
    let mut file =
        std::fs::File::open(blob).map_err(io_at(|| format!("opening {}", blob.display())))?;
    let mut magic = [0u8; 4];
    let read = file
        .read(&mut magic)
        .map_err(io_at(|| format!("reading {}", blob.display())))?;
    let file =
        std::fs::File::open(blob).map_err(io_at(|| format!("opening {}", blob.display())))?;
    let reader = std::io::BufReader::new(file);
    Ok(match &magic[..read] {
        [0x1f, 0x8b, ..] => Box::new(flate2::read::GzDecoder::new(reader)),
        [0x28, 0xb5, 0x2f, 0xfd] => Box::new(
            zstd::stream::read::Decoder::new(reader)
                .map_err(|e| UnpackError::Archive(format!("zstd: {e}")))?,
        ),
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

/// Unpacks one layer tarball into `dest` (created; it must not exist), turning OCI
/// whiteouts (`.wh.NAME`) into overlayfs whiteouts and opaque markers (`.wh..wh..opq`)
/// into the opaque xattr, then syncs it to disk. On error `dest` may hold a part of the
/// layer: the caller unpacks into a temporary directory and removes it.
pub fn unpack_layer(
    blob: &Path,
    dest: &Path,
    limits: &UnpackLimits,
    shift: Option<IdShift>,
) -> Result<(), UnpackError> {
    std::fs::create_dir(dest).map_err(io_at(|| format!("creating {}", dest.display())))?;
    let root = std::fs::File::open(dest)
        .map_err(io_at(|| format!("opening {}", dest.display())))?
        .into();
    let mut unpacker = Unpacker {
        root,
        limits: *limits,
        shift,
        bytes: 0,
        entries: 0,
    };
    let (uid, gid) = unpacker.owner(0, 0);
    std::os::unix::fs::chown(dest, Some(uid), Some(gid))
        .map_err(io_at(|| format!("chown {}", dest.display())))?;
    let exceeded = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Tar headers and padding take room beyond file contents; allow for them.
    let stream_limit = limits
        .max_bytes
        .saturating_add(limits.max_entries.saturating_mul(1024));
    let mut archive = tar::Archive::new(Bounded {
        inner: open_layer(blob)?,
        remaining: stream_limit,
        exceeded: exceeded.clone(),
    });
    let too_large = || UnpackError::TooLarge {
        limit: limits.max_bytes,
    };
    let entries = archive
        .entries()
        .map_err(|e| UnpackError::Archive(with_causes(&e)))?;
    for entry in entries {
        let mut entry = match entry {
            Ok(entry) => entry,
            Err(_) if exceeded.load(std::sync::atomic::Ordering::Relaxed) => {
                return Err(too_large());
            }
            Err(e) => return Err(UnpackError::Archive(with_causes(&e))),
        };
        match unpacker.unpack(&mut entry) {
            Err(UnpackError::Archive(_)) if exceeded.load(std::sync::atomic::Ordering::Relaxed) => {
                return Err(too_large());
            }
            result => result?,
        }
    }
    // SAFETY: a valid fd.
    check(unsafe { libc::syncfs(unpacker.root.as_raw_fd()) })
        .map_err(io_at(|| format!("syncing {}", dest.display())))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tar entry written with raw header fields, so hostile names get through as given.
    enum Entry<'a> {
        Dir(&'a str),
        File(&'a str, &'a [u8]),
        Symlink(&'a str, &'a str),
        Hardlink(&'a str, &'a str),
    }

    fn tarball(entries: &[Entry<'_>]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for entry in entries {
            let mut header = tar::Header::new_ustar();
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(1_600_000_000);
            header.set_size(0);
            let (name, link, data): (&str, &str, &[u8]) = match entry {
                Entry::Dir(name) => {
                    header.set_entry_type(tar::EntryType::Directory);
                    header.set_mode(0o755);
                    (name, "", &[])
                }
                Entry::File(name, data) => {
                    header.set_entry_type(tar::EntryType::Regular);
                    header.set_mode(0o644);
                    header.set_size(data.len() as u64);
                    (name, "", data)
                }
                Entry::Symlink(name, target) => {
                    header.set_entry_type(tar::EntryType::Symlink);
                    header.set_mode(0o777);
                    (name, target, &[])
                }
                Entry::Hardlink(name, target) => {
                    header.set_entry_type(tar::EntryType::Link);
                    header.set_mode(0o644);
                    (name, target, &[])
                }
            };
            let old = header.as_old_mut();
            old.name = [0; 100];
            old.name[..name.len()].copy_from_slice(name.as_bytes());
            old.linkname = [0; 100];
            old.linkname[..link.len()].copy_from_slice(link.as_bytes());
            header.set_cksum();
            builder.append(&header, data).unwrap();
        }
        builder.into_inner().unwrap()
    }

    fn unpack(blob: &Path, dest: &Path) -> Result<(), UnpackError> {
        unpack_layer(blob, dest, &DEFAULT_LIMITS, None)
    }

    fn is_root() -> bool {
        nix::unistd::Uid::effective().is_root()
    }

    fn xattrs(path: &Path) -> Vec<u8> {
        let c_path = CString::new(path.as_os_str().as_bytes()).unwrap();
        let mut buf = vec![0u8; 4096];
        let len = unsafe { libc::llistxattr(c_path.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        buf.truncate(len.max(0) as usize);
        buf
    }

    /// Everything under `dir` (path, kind, content, xattrs), to compare before and after.
    fn snapshot(dir: &Path) -> Vec<(PathBuf, String, Vec<u8>, Vec<u8>)> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(path) = stack.pop() {
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let content = if meta.is_file() {
                std::fs::read(&path).unwrap()
            } else {
                Vec::new()
            };
            out.push((
                path.clone(),
                format!("{:?}", meta.file_type()),
                content,
                xattrs(&path),
            ));
            if meta.is_dir() {
                for entry in std::fs::read_dir(&path).unwrap() {
                    stack.push(entry.unwrap().path());
                }
            }
        }
        out.sort();
        out
    }

    /// A "host" directory beside the layer, with files an attacker would like to touch.
    fn host(dir: &Path) -> PathBuf {
        let host = dir.join("host");
        std::fs::create_dir_all(host.join("keep")).unwrap();
        std::fs::write(host.join("victim"), b"control database").unwrap();
        std::fs::write(host.join("keep/root.key"), b"secret").unwrap();
        host
    }

    /// Unpacks `entries` as a gzip layer; asserts the host directory is untouched.
    fn unpack_hostile(entries: impl FnOnce(&str) -> Vec<u8>) -> Result<PathBuf, String> {
        let dir = tempfile::tempdir().unwrap();
        let host = host(dir.path());
        let before = snapshot(&host);
        let blob = dir.path().join("layer.tar");
        std::fs::write(&blob, entries(host.to_str().unwrap())).unwrap();
        let dest = dir.path().join("out");
        let result = unpack(&blob, &dest).map_err(|e| e.to_string());
        assert_eq!(snapshot(&host), before, "the host directory changed");
        result.map(|()| dest)
    }

    #[test]
    fn whiteouts_beneath_a_symlink_leave_the_host_alone() {
        if !is_root() {
            aloft_testkit::skip("whiteout devices and trusted xattrs need root");
            return;
        }
        let err = unpack_hostile(|host| {
            tarball(&[
                Entry::Symlink("escape", host),
                Entry::File("escape/.wh.victim", b""),
            ])
        })
        .unwrap_err();
        assert!(err.contains("escape"), "{err}");
        let err = unpack_hostile(|host| {
            tarball(&[
                Entry::Symlink("escape", host),
                Entry::File("escape/.wh..wh..opq", b""),
            ])
        })
        .unwrap_err();
        assert!(err.contains("symlink"), "{err}");
    }

    #[test]
    fn files_beneath_a_symlink_leave_the_host_alone() {
        let err = unpack_hostile(|host| {
            tarball(&[
                Entry::Symlink("escape", host),
                Entry::File("escape/victim", b"pwned"),
            ])
        })
        .unwrap_err();
        assert!(err.contains("symlink"), "{err}");
        let err = unpack_hostile(|host| {
            tarball(&[
                Entry::Symlink("abs", "/"),
                Entry::Dir("abs/"),
                Entry::Symlink("abs2", host),
                Entry::Dir("abs2/keep/"),
                Entry::File("abs2/keep/new", b"x"),
            ])
        })
        .unwrap_err();
        assert!(err.contains("symlink"), "{err}");
    }

    #[test]
    fn hard_links_out_of_the_layer_are_refused() {
        for target in [
            |host: &str| format!("{host}/victim"),
            |_: &str| "../host/victim".to_string(),
            |_: &str| "escape/victim".to_string(),
        ] {
            let result = unpack_hostile(|host| {
                let target = target(host);
                tarball(&[
                    Entry::Symlink("escape", host),
                    Entry::Hardlink("stolen", &target),
                    Entry::File("stolen", b"overwritten"),
                ])
            });
            // Either refused, or linked to nothing of the host's (checked by the snapshot).
            if let Ok(dest) = result {
                let stolen = std::fs::read(dest.join("stolen")).unwrap();
                assert_eq!(stolen, b"overwritten");
            }
        }
        let err = unpack_hostile(|host| {
            tarball(&[
                Entry::Symlink("escape", host),
                Entry::Hardlink("stolen", "escape/victim"),
            ])
        })
        .unwrap_err();
        assert!(err.contains("stolen"), "{err}");
    }

    #[test]
    fn later_entries_replace_earlier_ones() {
        let dir = tempfile::tempdir().unwrap();
        let blob = dir.path().join("layer.tar");
        std::fs::write(
            &blob,
            tarball(&[
                Entry::Dir("etc/"),
                Entry::File("etc/a", b"first"),
                Entry::File("etc/a", b"second"),
                Entry::Symlink("etc/b", "a"),
                Entry::File("etc/b", b"file now"),
                Entry::Dir("etc/c/"),
                Entry::File("etc/c/inner", b"x"),
                Entry::Symlink("etc/c", "a"),
                Entry::Hardlink("etc/d", "etc/a"),
                Entry::File("deep/er/file", b"parents made"),
            ]),
        )
        .unwrap();
        let dest = dir.path().join("out");
        unpack(&blob, &dest).unwrap();
        assert_eq!(std::fs::read(dest.join("etc/a")).unwrap(), b"second");
        assert_eq!(std::fs::read(dest.join("etc/b")).unwrap(), b"file now");
        assert_eq!(
            std::fs::read_link(dest.join("etc/c")).unwrap(),
            Path::new("a")
        );
        assert_eq!(std::fs::read(dest.join("etc/d")).unwrap(), b"second");
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            std::fs::metadata(dest.join("etc/d")).unwrap().ino(),
            std::fs::metadata(dest.join("etc/a")).unwrap().ino()
        );
        assert_eq!(
            std::fs::read(dest.join("deep/er/file")).unwrap(),
            b"parents made"
        );
        assert_eq!(
            std::fs::metadata(dest.join("etc/a")).unwrap().mtime(),
            1_600_000_000
        );
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        encoder.write_all(bytes).unwrap();
        encoder.finish().unwrap()
    }

    #[test]
    fn a_decompression_bomb_stops_at_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let blob = dir.path().join("layer.tar.gz");
        let zeros = vec![0u8; 8 << 20];
        std::fs::write(&blob, gzip(&tarball(&[Entry::File("zeros", &zeros)]))).unwrap();
        assert!(std::fs::metadata(&blob).unwrap().len() < 64 << 10);
        let limits = UnpackLimits {
            max_bytes: 1 << 20,
            ..DEFAULT_LIMITS
        };
        let err = unpack_layer(&blob, &dir.path().join("out"), &limits, None).unwrap_err();
        assert!(
            matches!(err, UnpackError::TooLarge { limit } if limit == 1 << 20),
            "{err}"
        );
        assert!(err.to_string().contains("1048576 bytes"), "{err}");

        let many: Vec<String> = (0..50).map(|i| format!("f{i}")).collect();
        let entries: Vec<Entry<'_>> = many.iter().map(|n| Entry::File(n, b"")).collect();
        std::fs::write(&blob, gzip(&tarball(&entries))).unwrap();
        let limits = UnpackLimits {
            max_entries: 10,
            ..DEFAULT_LIMITS
        };
        let err = unpack_layer(&blob, &dir.path().join("out2"), &limits, None).unwrap_err();
        assert!(err.to_string().contains("more than 10 entries"), "{err}");
    }

    #[test]
    fn too_deep_and_too_long_paths_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let blob = dir.path().join("layer.tar");
        let unpack_path = |path: &str, out: &str| {
            let mut builder = tar::Builder::new(Vec::new());
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(tar::EntryType::Regular);
            header.set_size(1);
            header.set_mode(0o644);
            builder.append_data(&mut header, path, &b"x"[..]).unwrap();
            std::fs::write(&blob, builder.into_inner().unwrap()).unwrap();
            unpack(&blob, &dir.path().join(out))
        };
        let deep = "d/".repeat(129) + "file";
        let err = unpack_path(&deep, "deep").unwrap_err();
        assert!(err.to_string().contains("deeper than 128"), "{err}");
        let fine = "d/".repeat(100) + "file";
        unpack_path(&fine, "fine").unwrap();
        let long = format!("{}/file", "n".repeat(200)).repeat(21);
        let err = unpack_path(&long, "long").unwrap_err();
        assert!(err.to_string().contains("longer than 4096 bytes"), "{err}");
    }

    #[test]
    fn overlay_xattrs_from_a_layer_are_dropped_and_owners_shift() {
        if !is_root() {
            aloft_testkit::skip("trusted xattrs and chown need root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let blob = dir.path().join("layer.tar");
        let mut builder = tar::Builder::new(Vec::new());
        builder
            .append_pax_extensions([
                ("SCHILY.xattr.trusted.overlay.redirect", &b"/etc"[..]),
                ("SCHILY.xattr.user.kept", &b"yes"[..]),
            ])
            .unwrap();
        let mut header = tar::Header::new_ustar();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_size(1);
        header.set_mode(0o4755);
        header.set_uid(1000);
        header.set_gid(70000);
        builder
            .append_data(&mut header, "bin/tool", &b"x"[..])
            .unwrap();
        std::fs::write(&blob, builder.into_inner().unwrap()).unwrap();
        let dest = dir.path().join("out");
        let shift = IdShift {
            base: 200_000,
            size: 65536,
        };
        unpack_layer(&blob, &dest, &DEFAULT_LIMITS, Some(shift)).unwrap();
        let names = xattrs(&dest.join("bin/tool"));
        assert_eq!(names, b"user.kept\0");
        use std::os::unix::fs::MetadataExt;
        let tool = std::fs::metadata(dest.join("bin/tool")).unwrap();
        assert_eq!((tool.uid(), tool.gid()), (201_000, 200_000 + 65534));
        assert_eq!(tool.mode() & 0o7777, 0o4755, "setuid survives the chown");
        let made = std::fs::metadata(dest.join("bin")).unwrap();
        assert_eq!((made.uid(), made.gid()), (200_000, 200_000));
        let root = std::fs::metadata(&dest).unwrap();
        assert_eq!((root.uid(), root.gid()), (200_000, 200_000));
    }

    #[test]
    fn whiteout_names_must_name_an_entry() {
        let err = unpack_hostile(|_| tarball(&[Entry::Dir("a/"), Entry::File("a/.wh...", b"")]))
            .unwrap_err();
        assert!(err.contains("whiteout"), "{err}");
    }
}
