//! Filesystem images on loop devices: a sparse file of a fixed size formatted ext4,
//! attached to a loop device and mounted. The size is a hard quota: writes beyond it get
//! `ENOSPC` inside the filesystem, and the host's disk holds at most the file's size.
//!
//! Loop devices are attached with `LOOP_CONFIGURE` and autoclear, so the device goes away
//! with the last unmount (or at once if mounting fails); [`release`] clears devices whose
//! mounts were lost track of (an agent killed at the wrong moment).

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

#[derive(Debug, thiserror::Error)]
pub enum BlockImageError {
    #[error("{path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: String,
        source: std::io::Error,
    },
    #[error("{path}: formatting with mkfs.ext4 (is e2fsprogs installed?): {message}")]
    Format { path: PathBuf, message: String },
}

impl BlockImageError {
    /// Whether the host's filesystem ran out of space.
    pub fn is_no_space(&self) -> bool {
        match self {
            Self::Io { source, .. } => source.raw_os_error() == Some(libc::ENOSPC),
            Self::Format { message, .. } => message.contains("No space left on device"),
        }
    }
}

/// Fails with ENOSPC when the filesystem holding `dir` has fewer than `bytes` available
/// (its root reserve left to the host): checked before preallocating, which would
/// otherwise fill the host's disk up to the last block before failing.
pub fn check_room(dir: &Path, bytes: u64) -> std::io::Result<()> {
    let stat = nix::sys::statvfs::statvfs(dir).map_err(std::io::Error::from)?;
    if stat.blocks_available().saturating_mul(stat.fragment_size()) < bytes {
        return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
    }
    Ok(())
}

/// Allocates the host's blocks for bytes `from..to` of `file` (reading as zeros, as the
/// holes they replace did), so writes there never need new space on the host.
pub fn preallocate(file: &File, from: u64, to: u64) -> std::io::Result<()> {
    if to <= from {
        return Ok(());
    }
    let (Ok(offset), Ok(len)) = (i64::try_from(from), i64::try_from(to - from)) else {
        return Err(std::io::Error::from_raw_os_error(libc::EFBIG));
    };
    // SAFETY: fallocate on a descriptor we own; no memory is passed.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, offset, len) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn io_error(
    path: &Path,
    what: impl Into<String>,
) -> impl FnOnce(std::io::Error) -> BlockImageError {
    let (path, what) = (path.to_path_buf(), what.into());
    move |source| BlockImageError::Io { path, what, source }
}

fn errno_error(path: &Path, what: impl Into<String>) -> impl FnOnce(nix::Error) -> BlockImageError {
    let (path, what) = (path.to_path_buf(), what.into());
    move |errno| BlockImageError::Io {
        path,
        what,
        source: std::io::Error::from(errno),
    }
}

/// How [`create`] formats an image.
#[derive(Clone, Debug)]
pub struct FormatOptions {
    /// A journal protects the content across crashes; a filesystem made afresh at every
    /// attach does without (and without a journal thread per mount).
    pub journal: bool,
    pub label: Option<String>,
    /// Owner of the filesystem's root directory (a user namespace's shifted root).
    pub root_uid: u32,
    pub root_gid: u32,
    /// Reserve every block of the image on the host's disk at once (fallocate), so the
    /// filesystem in it never meets a host that can't store its writes: a sparse image
    /// on a full host turns the inner filesystem's writes into I/O errors, and ext4 then
    /// aborts its journal. Creating the image fails instead, when the host lacks room.
    pub preallocate: bool,
}

impl Default for FormatOptions {
    fn default() -> Self {
        Self {
            journal: true,
            label: None,
            root_uid: 0,
            root_gid: 0,
            preallocate: false,
        }
    }
}

/// Makes `path` a sparse file of `size_bytes` holding an empty ext4 filesystem (replacing
/// whatever was there). It takes no disk space until written.
pub fn create(
    path: &Path,
    size_bytes: u64,
    options: &FormatOptions,
) -> Result<(), BlockImageError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(io_error(path, "removing the old image")(e));
        }
        _ => {}
    }
    if options.preallocate {
        let dir = path.parent().unwrap_or(Path::new("."));
        check_room(dir, size_bytes).map_err(io_error(
            path,
            format!("reserving {size_bytes} bytes on the host's disk"),
        ))?;
    }
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io_error(path, "creating the image"))?;
    let sized = file.set_len(size_bytes).map_err(io_error(
        path,
        format!("sizing the image to {size_bytes} bytes"),
    ));
    let reserved = sized.and_then(|()| {
        if options.preallocate {
            preallocate(&file, 0, size_bytes).map_err(io_error(
                path,
                format!("reserving {size_bytes} bytes on the host's disk"),
            ))
        } else {
            Ok(())
        }
    });
    drop(file);
    if let Err(e) = reserved {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    let mut mkfs = Command::new("mkfs.ext4");
    // No reserved blocks (nothing privileged runs on it); inode tables are known to be
    // zero in a fresh sparse file, so nothing is initialised later either.
    // nodiscard: mkfs would otherwise punch the whole file back into holes, undoing the
    // preallocation.
    mkfs.args(["-q", "-F", "-m", "0"]).arg("-E").arg(format!(
        "lazy_itable_init=1,lazy_journal_init=1,root_owner={}:{}{}",
        options.root_uid,
        options.root_gid,
        if options.preallocate {
            ",nodiscard"
        } else {
            ""
        }
    ));
    if !options.journal {
        mkfs.args(["-O", "^has_journal"]);
    }
    if let Some(label) = &options.label {
        mkfs.arg("-L").arg(label);
    }
    let output = mkfs
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .map_err(io_error(
            path,
            "running mkfs.ext4 (is e2fsprogs installed?)",
        ))?;
    if !output.status.success() {
        let _ = std::fs::remove_file(path);
        return Err(BlockImageError::Format {
            path: path.to_path_buf(),
            message: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(())
}

// <linux/loop.h>
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
const LO_FLAGS_DIRECT_IO: u32 = 16;

#[repr(C)]
struct LoopInfo64 {
    device: u64,
    inode: u64,
    rdevice: u64,
    offset: u64,
    size_limit: u64,
    number: u32,
    encrypt_type: u32,
    encrypt_key_size: u32,
    flags: u32,
    file_name: [u8; 64],
    crypt_name: [u8; 64],
    encrypt_key: [u8; 32],
    init: [u64; 2],
}

#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// Attaches `image` to a free loop device with autoclear (it detaches when the last user
/// closes it). Returns the device, open: close it only once something else (a mount)
/// holds the device, or it goes away at once.
fn attach(image: &Path) -> Result<(PathBuf, File), BlockImageError> {
    let backing = OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .map_err(io_error(image, "opening the image"))?;
    let control = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/loop-control")
        .map_err(io_error(image, "opening /dev/loop-control"))?;
    let mut last_error = None;
    // Another process may take the free device between asking and configuring it.
    for _ in 0..16 {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device number.
        let number = unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE as _) };
        if number < 0 {
            return Err(io_error(image, "finding a free loop device")(
                std::io::Error::last_os_error(),
            ));
        }
        let device_path = PathBuf::from(format!("/dev/loop{number}"));
        let device = match OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&device_path)
        {
            Ok(device) => device,
            Err(err) => {
                last_error = Some(err);
                continue;
            }
        };
        for flags in [LO_FLAGS_AUTOCLEAR | LO_FLAGS_DIRECT_IO, LO_FLAGS_AUTOCLEAR] {
            // SAFETY: plain old data; zero is valid for every field.
            let mut config: LoopConfig = unsafe { std::mem::zeroed() };
            config.fd = backing.as_raw_fd() as u32;
            config.info.flags = flags;
            // SAFETY: LOOP_CONFIGURE reads a `struct loop_config` we own for the call.
            let result = unsafe { libc::ioctl(device.as_raw_fd(), LOOP_CONFIGURE as _, &config) };
            if result == 0 {
                return Ok((device_path, device));
            }
            let err = std::io::Error::last_os_error();
            // EINVAL: the backing file's filesystem can't do direct I/O; try without.
            if err.raw_os_error() != Some(libc::EINVAL) {
                last_error = Some(err);
                break;
            }
            last_error = Some(err);
        }
    }
    Err(io_error(image, "attaching the image to a loop device")(
        last_error.unwrap_or_else(|| std::io::Error::from_raw_os_error(libc::EBUSY)),
    ))
}

/// Attaches `image` to a loop device and mounts its ext4 filesystem at `target` (which
/// must exist). Unmounting it ([`unmount`]) detaches the device. Returns the device.
pub fn mount(
    image: &Path,
    target: &Path,
    flags: nix::mount::MsFlags,
) -> Result<PathBuf, BlockImageError> {
    let (device_path, device) = attach(image)?;
    nix::mount::mount(
        Some(device_path.as_path()),
        target,
        Some("ext4"),
        flags,
        None::<&str>,
    )
    .map_err(errno_error(
        image,
        format!("mounting {} at {}", device_path.display(), target.display()),
    ))?;
    // The mount holds the device now; autoclear detaches it when that goes.
    drop(device);
    Ok(device_path)
}

/// Unmounts whatever is mounted at `target` (lazily: a process still inside keeps it alive
/// until it leaves). Nothing mounted there is fine.
pub fn unmount(target: &Path) -> Result<(), BlockImageError> {
    match nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => Ok(()),
        Err(err) => Err(errno_error(target, "unmounting")(err)),
    }
}

/// Whether `path` is the root of a mount (on another device than its parent).
pub fn is_mount_point(path: &Path) -> bool {
    let (Ok(own), Some(Ok(parent))) = (
        std::fs::symlink_metadata(path),
        path.parent().map(std::fs::symlink_metadata),
    ) else {
        return false;
    };
    own.is_dir() && own.dev() != parent.dev()
}

/// A loop device and the file behind it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoopDevice {
    pub device: PathBuf,
    /// As the kernel recorded it when attaching (a deleted file still shows its old path).
    pub backing_file: PathBuf,
}

/// Loop devices whose backing file is `under` or beneath it.
pub fn loop_devices_under(under: &Path) -> Vec<LoopDevice> {
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(entry.path().join("loop/backing_file")) else {
            continue;
        };
        let backing = text.trim_end_matches('\n');
        let backing = PathBuf::from(backing.strip_suffix(" (deleted)").unwrap_or(backing));
        if backing.starts_with(under) {
            found.push(LoopDevice {
                device: PathBuf::from("/dev").join(&name),
                backing_file: backing,
            });
        }
    }
    found
}

/// Unmounts everything mounted under `root` (lazily, deepest first) and detaches the loop
/// devices backed by files there: what machines leave behind when their host process is
/// killed, so that removing `root` removes everything. The devices are found before
/// unmounting: a file on a filesystem unmounted lazily no longer shows its path.
pub fn release_everything_under(root: &Path) {
    let devices = loop_devices_under(root);
    let mut mounts: Vec<PathBuf> = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|mount_point| PathBuf::from(unescape_mountinfo(mount_point)))
        .filter(|p| p.starts_with(root))
        .collect();
    mounts.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for mount in mounts {
        let _ = nix::mount::umount2(&mount, nix::mount::MntFlags::MNT_DETACH);
    }
    for device in devices {
        let _ = std::process::Command::new("losetup")
            .arg("-d")
            .arg(&device.device)
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// Mount points (in this mount namespace) whose source is `device`.
fn mounts_of(device: &Path) -> Vec<PathBuf> {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let device = device.to_string_lossy();
    text.lines()
        .filter_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            let mount_point = before.split(' ').nth(4)?;
            let source = after.split(' ').nth(1)?;
            (source == device).then(|| PathBuf::from(unescape_mountinfo(mount_point)))
        })
        .collect()
}

/// Mount points (in this mount namespace) at or beneath `under`, deepest first.
pub fn mount_points_under(under: &Path) -> Vec<PathBuf> {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = text
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mountinfo(p)))
        .filter(|p| p.starts_with(under))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    found
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && let Ok(digits) = std::str::from_utf8(&bytes[i + 1..i + 4])
            && let Ok(value) = u8::from_str_radix(digits, 8)
        {
            out.push(value);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Unmounts every mount of `device` and detaches it (for devices whose owner is gone).
pub fn release(device: &LoopDevice) -> Result<(), BlockImageError> {
    for mount_point in mounts_of(&device.device) {
        unmount(&mount_point)?;
    }
    let file = match OpenOptions::new().read(true).open(&device.device) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_error(&device.device, "opening the loop device")(e)),
    };
    // SAFETY: LOOP_CLR_FD takes no argument.
    if unsafe { libc::ioctl(file.as_raw_fd(), LOOP_CLR_FD as _, 0) } < 0 {
        let err = std::io::Error::last_os_error();
        // ENXIO: already detached.
        if err.raw_os_error() != Some(libc::ENXIO) {
            return Err(io_error(&device.device, "detaching the loop device")(err));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn root() -> bool {
        nix::unistd::Uid::effective().is_root() && Path::new("/dev/loop-control").exists()
    }

    /// Waits for the kernel to let go of loop devices backed by files under `dir`.
    fn no_loop_devices_under(dir: &Path) -> bool {
        for _ in 0..100 {
            if loop_devices_under(dir).is_empty() {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        false
    }

    #[test]
    fn an_image_is_a_quota_that_goes_away_with_its_mount() {
        if !root() {
            aloft_testkit::skip("needs root and loop devices");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("fs.ext4");
        let target = dir.path().join("mnt");
        std::fs::create_dir(&target).unwrap();
        let size = 32 * 1024 * 1024;
        create(
            &image,
            size,
            &FormatOptions {
                journal: false,
                root_uid: 1234,
                root_gid: 5678,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(std::fs::metadata(&image).unwrap().len(), size);
        assert!(
            std::fs::metadata(&image).unwrap().blocks() * 512 < size / 4,
            "the image is sparse"
        );
        let device = mount(&image, &target, nix::mount::MsFlags::empty()).unwrap();
        assert!(is_mount_point(&target));
        let owner = std::fs::metadata(&target).unwrap();
        assert_eq!((owner.uid(), owner.gid()), (1234, 5678));
        assert_eq!(
            loop_devices_under(dir.path()),
            vec![LoopDevice {
                device: device.clone(),
                backing_file: image.clone()
            }]
        );

        let mut file = File::create(target.join("big")).unwrap();
        let chunk = vec![1u8; 1024 * 1024];
        let mut written = 0u64;
        let full = loop {
            match file.write_all(&chunk).and_then(|()| file.sync_data()) {
                Ok(()) => written += chunk.len() as u64,
                Err(err) => break err,
            }
            assert!(written <= size, "wrote more than the image holds");
        };
        assert_eq!(full.raw_os_error(), Some(libc::ENOSPC), "{full}");
        assert!(written > size / 2, "only {written} bytes fit");
        drop(file);
        assert!(std::fs::metadata(&image).unwrap().blocks() * 512 <= size);

        unmount(&target).unwrap();
        assert!(!is_mount_point(&target));
        assert!(
            no_loop_devices_under(dir.path()),
            "autoclear detaches the device with the mount"
        );
    }

    #[test]
    fn a_preallocated_image_holds_its_blocks_on_the_host() {
        if !root() {
            aloft_testkit::skip("needs root (mkfs.ext4)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("fs.ext4");
        let size = 64 * 1024 * 1024;
        let options = FormatOptions {
            preallocate: true,
            ..Default::default()
        };
        create(&image, size, &options).unwrap();
        let meta = std::fs::metadata(&image).unwrap();
        assert_eq!(meta.len(), size);
        assert!(meta.blocks() * 512 >= size, "{} blocks", meta.blocks());

        // More than the host's filesystem has: refused before anything is allocated, and
        // no file is left.
        let free = nix::sys::statvfs::statvfs(dir.path()).unwrap();
        let too_big = free.blocks_available() * free.fragment_size() + (1 << 30);
        let err = create(&image, too_big, &options).unwrap_err();
        assert!(err.is_no_space(), "{err}");
        assert!(err.to_string().contains("reserving"), "{err}");
        assert!(!image.exists());
    }

    #[test]
    fn released_devices_lose_their_mounts_and_detach() {
        if !root() {
            aloft_testkit::skip("needs root and loop devices");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("fs.ext4");
        let target = dir.path().join("mnt");
        std::fs::create_dir(&target).unwrap();
        create(&image, 16 * 1024 * 1024, &FormatOptions::default()).unwrap();
        mount(&image, &target, nix::mount::MsFlags::empty()).unwrap();
        assert_eq!(mount_points_under(dir.path()), vec![target.clone()]);
        for device in loop_devices_under(dir.path()) {
            release(&device).unwrap();
        }
        assert!(mount_points_under(dir.path()).is_empty());
        assert!(no_loop_devices_under(dir.path()));
    }

    #[test]
    fn failures_name_the_image() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("missing/fs.ext4");
        let err = create(&image, 1024 * 1024, &FormatOptions::default()).unwrap_err();
        assert!(err.to_string().contains("missing/fs.ext4"), "{err}");
        let err = mount(&image, dir.path(), nix::mount::MsFlags::empty()).unwrap_err();
        assert!(err.to_string().contains("missing/fs.ext4"), "{err}");
    }

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape_mountinfo("/a\\040b\\134c"), "/a b\\c");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
    }
}
