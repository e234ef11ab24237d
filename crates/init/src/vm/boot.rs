//! Stage one of a microVM's init: `/init` in the initramfs. It mounts the kernel's
//! filesystems, loads the virtio modules, opens the agent channel and receives its boot
//! config there, sets up the network, mounts the image's disk (with a swap file if
//! asked), switches root to it and runs `/.fly/init` there (stage two, the ordinary init
//! with the channel on fd 4 and its config on fd 3).

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::mount::{MsFlags, mount};

use crate::InitError;
use crate::vm::channel::{self, BootConfig, Frame, GuestExit};
use crate::vm::{CHANNEL_ENV, CHANNEL_FD, net};

/// Where the initramfs keeps the modules to load, and the file listing their load order.
pub const MODULES_DIR: &str = "/lib/modules";
pub const MODULES_ORDER: &str = "/lib/modules/order";
const NEW_ROOT: &str = "/newroot";
/// Where stage one sits in the initramfs (the kernel runs it as PID 1).
pub const STAGE_ONE_PATH: &str = "/init";
/// How long devices may take to appear after their driver loads.
const DEVICE_WAIT: Duration = Duration::from_secs(20);

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> InitError {
    let path = what.into();
    move |source| InitError::Io { path, source }
}

fn mount_err(target: &str) -> impl FnOnce(nix::errno::Errno) -> InitError + '_ {
    move |source| InitError::Mount {
        target: target.to_string(),
        source,
    }
}

/// Runs stage one; never returns (it execs stage two or powers the machine off).
pub fn boot() -> ! {
    let mut channel: Option<File> = None;
    let error = match stage_one(&mut channel) {
        Ok(never) => match never {},
        Err(error) => error,
    };
    eprintln!("init: {error}");
    if let Some(port) = channel.as_mut() {
        let exit = GuestExit {
            exit_code: crate::SETUP_FAILURE_EXIT,
            error: Some(error.to_string()),
            ..Default::default()
        };
        let _ = channel::write_frame(port, &Frame::json(0, channel::EXIT, &exit));
    }
    power_off()
}

/// Flushes the disks and turns the machine off (QEMU then exits).
pub fn power_off() -> ! {
    // SAFETY: sync and reboot take no pointers.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
    std::process::exit(1)
}

enum Never {}

fn stage_one(channel: &mut Option<File>) -> Result<Never, InitError> {
    for (source, target, fstype) in [
        ("proc", "/proc", "proc"),
        ("sysfs", "/sys", "sysfs"),
        ("devtmpfs", "/dev", "devtmpfs"),
    ] {
        std::fs::create_dir_all(target).map_err(io_err(target))?;
        mount(
            Some(source),
            target,
            Some(fstype),
            MsFlags::empty(),
            None::<&str>,
        )
        .or_else(|e| {
            if e == nix::errno::Errno::EBUSY {
                Ok(())
            } else {
                Err(e)
            }
        })
        .map_err(mount_err(target))?;
    }
    load_modules()?;
    let port = open_channel()?;
    *channel = Some(port.try_clone().map_err(io_err("the agent channel"))?);
    let mut port_reader = port.try_clone().map_err(io_err("the agent channel"))?;
    let mut port_writer = port;
    channel::write_frame(&mut port_writer, &Frame::new(0, channel::HELLO, Vec::new()))
        .map_err(io_err("writing to the agent channel"))?;
    let config: BootConfig = loop {
        let frame = channel::read_frame(&mut port_reader)
            .map_err(io_err("reading the boot config from the agent channel"))?;
        if frame.stream == 0 && frame.kind == channel::BOOT {
            break serde_json::from_slice(&frame.payload)?;
        }
    };
    net::configure(&config.network)?;
    mount_root(&config)?;
    if config.swap_size_mb > 0 {
        make_swap(config.swap_size_mb)?;
    }
    switch_root()?;
    // Inside the new root, so the image's own symlinks resolve there.
    mount_volumes(&config.volumes)?;
    exec_stage_two(port_writer, &config)
}

/// Loads the modules named in [`MODULES_ORDER`], in order (built-in ones are skipped).
fn load_modules() -> Result<(), InitError> {
    let order = match std::fs::read_to_string(MODULES_ORDER) {
        Ok(order) => order,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(MODULES_ORDER)(e)),
    };
    for name in order.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let path = Path::new(MODULES_DIR).join(format!("{name}.ko"));
        let file = File::open(&path).map_err(io_err(path.display().to_string()))?;
        let params = CString::default();
        // SAFETY: finit_module with an open module file and an empty parameter string.
        let rc =
            unsafe { libc::syscall(libc::SYS_finit_module, file.as_raw_fd(), params.as_ptr(), 0) };
        if rc != 0 {
            let errno = nix::errno::Errno::last();
            if errno != nix::errno::Errno::EEXIST {
                return Err(InitError::Sys {
                    what: format!("loading module {name}"),
                    source: errno,
                });
            }
        }
    }
    Ok(())
}

fn wait_for<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> Result<T, InitError> {
    let deadline = Instant::now() + DEVICE_WAIT;
    loop {
        if let Some(found) = probe() {
            return Ok(found);
        }
        if Instant::now() >= deadline {
            return Err(InitError::Invalid(format!(
                "{what} did not appear within {}s",
                DEVICE_WAIT.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The device of the virtio-serial port named [`channel::PORT_NAME`].
fn find_port() -> Option<PathBuf> {
    let entries = std::fs::read_dir("/sys/class/virtio-ports").ok()?;
    for entry in entries.flatten() {
        let name = std::fs::read_to_string(entry.path().join("name")).unwrap_or_default();
        if name.trim() == channel::PORT_NAME {
            let device = Path::new("/dev").join(entry.file_name());
            if device.exists() {
                return Some(device);
            }
        }
    }
    None
}

fn open_channel() -> Result<File, InitError> {
    let device = wait_for(
        "the agent channel (virtio-serial port fly.agent)",
        find_port,
    )?;
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(&device)
        .map_err(io_err(device.display().to_string()))
}

fn mount_root(config: &BootConfig) -> Result<(), InitError> {
    let device = PathBuf::from(&config.root_device);
    wait_for(&format!("the root disk {}", device.display()), || {
        device.exists().then_some(())
    })?;
    std::fs::create_dir_all(NEW_ROOT).map_err(io_err(NEW_ROOT))?;
    mount(
        Some(&device),
        NEW_ROOT,
        Some("ext4"),
        MsFlags::MS_NOATIME,
        // The inode tables are zeroed lazily by a kernel thread otherwise: pointless
        // writes to a disk that lives for one run.
        Some("noinit_itable"),
    )
    .map_err(|source| {
        InitError::Invalid(format!(
            "mounting the root filesystem {} (ext4): {}",
            device.display(),
            source.desc()
        ))
    })
}

/// The virtio-blk disk (`/dev/vdX`) whose serial is `serial`.
fn find_disk(serial: &str) -> Option<PathBuf> {
    let entries = std::fs::read_dir("/sys/block").ok()?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("vd") {
            continue;
        }
        let found = std::fs::read_to_string(entry.path().join("serial")).unwrap_or_default();
        if found.trim_end_matches(['\0', '\n']) == serial {
            let device = Path::new("/dev").join(&name);
            if device.exists() {
                return Some(device);
            }
        }
    }
    None
}

/// Mounts each volume's disk (ext4) at its destination, made if the image lacks it.
/// The volume's root directory belongs to root, as it does in a container.
fn mount_volumes(volumes: &[channel::GuestVolume]) -> Result<(), InitError> {
    for volume in volumes {
        let device = wait_for(
            &format!("the disk of the volume at {}", volume.destination),
            || find_disk(&volume.serial),
        )?;
        std::fs::create_dir_all(&volume.destination).map_err(io_err(volume.destination.clone()))?;
        mount(
            Some(&device),
            volume.destination.as_str(),
            Some("ext4"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            // Its inode tables were zero when it was made (and are kept so).
            Some("noinit_itable"),
        )
        .map_err(|source| {
            InitError::Invalid(format!(
                "mounting the volume at {} ({}, ext4): {}",
                volume.destination,
                device.display(),
                source.desc()
            ))
        })?;
        // A volume extended since it was last mounted: its filesystem grows (online)
        // into the whole disk. The machine runs anyway if it cannot.
        if let Err(error) = grow_to_device(&device, &volume.destination) {
            eprintln!(
                "init: growing the volume at {} to its disk's size: {error}",
                volume.destination
            );
        }
    }
    Ok(())
}

/// Grows the ext4 mounted at `mount_point` to the size of `device` (the kernel's online
/// resize, as resize2fs does on a mounted filesystem); nothing when it fills it already.
fn grow_to_device(device: &Path, mount_point: &str) -> std::io::Result<()> {
    // <linux/fs.h> BLKGETSIZE64 _IOR(0x12, 114, size_t); <linux/ext4.h>
    // EXT4_IOC_RESIZE_FS _IOW('f', 16, __u64).
    const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
    const EXT4_IOC_RESIZE_FS: libc::c_ulong = 0x4008_6610;
    let disk = File::open(device)?;
    let mut bytes: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64.
    if unsafe { libc::ioctl(disk.as_raw_fd(), BLKGETSIZE64 as _, &mut bytes) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let stat = nix::sys::statfs::statfs(mount_point).map_err(std::io::Error::from)?;
    let block_size = stat.block_size() as u64;
    if block_size == 0 {
        return Ok(());
    }
    let blocks: u64 = bytes / block_size;
    let dir = File::open(mount_point)?;
    // SAFETY: EXT4_IOC_RESIZE_FS reads one u64; equal to the current count, it does nothing.
    if unsafe { libc::ioctl(dir.as_raw_fd(), EXT4_IOC_RESIZE_FS as _, &blocks) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A swap file of `size_mb` on the root filesystem, in use.
fn make_swap(size_mb: u32) -> Result<(), InitError> {
    let path = Path::new(NEW_ROOT).join(".fly-swapfile");
    let size = u64::from(size_mb) * 1024 * 1024;
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .map_err(io_err(path.display().to_string()))?;
    // SAFETY: fallocate on our own open file.
    if unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, size as libc::off_t) } != 0 {
        return Err(InitError::Invalid(format!(
            "making a {size_mb} MB swap file (swap_size_mb): {}; the root disk has too little room",
            std::io::Error::last_os_error()
        )));
    }
    file.seek(SeekFrom::Start(0))
        .and_then(|_| file.write_all(&swap_header(size)))
        .and_then(|_| file.sync_all())
        .map_err(io_err(path.display().to_string()))?;
    drop(file);
    let c_path = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| InitError::Invalid("swap path".into()))?;
    // SAFETY: a valid C string.
    if unsafe { libc::swapon(c_path.as_ptr(), 0) } != 0 {
        return Err(InitError::Sys {
            what: "swapon".into(),
            source: nix::errno::Errno::last(),
        });
    }
    Ok(())
}

/// The first page of a swap area (mkswap's format, version 1, no bad pages).
pub fn swap_header(size: u64) -> Vec<u8> {
    const PAGE: usize = 4096;
    let mut page = vec![0u8; PAGE];
    let last_page = (size / PAGE as u64).saturating_sub(1) as u32;
    page[1024..1028].copy_from_slice(&1u32.to_ne_bytes());
    page[1028..1032].copy_from_slice(&last_page.to_ne_bytes());
    page[PAGE - 10..].copy_from_slice(b"SWAPSPACE2");
    page
}

/// Moves the kernel filesystems under the new root and makes it `/` (switch_root without
/// the exec), with this binary bind-mounted at `/.fly/init` there.
fn switch_root() -> Result<(), InitError> {
    let root = Path::new(NEW_ROOT);
    for target in ["/dev", "/proc", "/sys"] {
        let inside = root.join(target.trim_start_matches('/'));
        std::fs::create_dir_all(&inside).map_err(io_err(inside.display().to_string()))?;
        mount(
            Some(target),
            &inside,
            None::<&str>,
            MsFlags::MS_MOVE,
            None::<&str>,
        )
        .map_err(mount_err(target))?;
    }
    let fly = root.join(".fly");
    std::fs::create_dir_all(&fly).map_err(io_err(fly.display().to_string()))?;
    let init = fly.join("init");
    if !init.exists() {
        File::create(&init).map_err(io_err(init.display().to_string()))?;
    }
    let _ = std::fs::set_permissions(&init, std::fs::Permissions::from_mode(0o755));
    mount(
        Some("/init"),
        &init,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(mount_err(crate::INIT_PATH))?;
    std::env::set_current_dir(root).map_err(io_err(NEW_ROOT))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>).map_err(mount_err("/"))?;
    nix::unistd::chroot(".").map_err(|source| InitError::Sys {
        what: "chroot to the new root".into(),
        source,
    })?;
    std::env::set_current_dir("/").map_err(io_err("/"))
}

/// Execs `/.fly/init` with its config on fd 3 (a memfd, never a file on disk) and the
/// channel on fd 4.
fn exec_stage_two(port: File, config: &BootConfig) -> Result<Never, InitError> {
    let mut init = config.init.clone();
    init.mount_standard_filesystems = true;
    let json = serde_json::to_vec(&init)?;
    let name = CString::new("init-config").unwrap_or_default();
    // SAFETY: memfd_create with a valid name.
    let memfd = unsafe { libc::memfd_create(name.as_ptr(), 0) };
    if memfd < 0 {
        return Err(InitError::Sys {
            what: "memfd_create".into(),
            source: nix::errno::Errno::last(),
        });
    }
    // SAFETY: a fresh descriptor we own.
    let mut config_file = unsafe { File::from_raw_fd(memfd) };
    config_file
        .write_all(&json)
        .and_then(|_| config_file.seek(SeekFrom::Start(0)).map(|_| ()))
        .map_err(io_err("the init config memfd"))?;
    let config_fd = config_file.into_raw_fd();
    let port_fd = port.into_raw_fd();
    // Park both above the target numbers first, so neither dup2 clobbers the other.
    // SAFETY: dup2/close on descriptors we own.
    unsafe {
        libc::dup2(config_fd, 20);
        libc::dup2(port_fd, 21);
        libc::close(config_fd);
        libc::close(port_fd);
        libc::dup2(20, crate::CONFIG_FD);
        libc::dup2(21, CHANNEL_FD);
        libc::close(20);
        libc::close(21);
    }
    let path = CString::new(crate::INIT_PATH).unwrap_or_default();
    let argv = [path.as_ptr(), std::ptr::null()];
    let env = CString::new(format!("{CHANNEL_ENV}={CHANNEL_FD}")).unwrap_or_default();
    let envp = [env.as_ptr(), std::ptr::null()];
    // SAFETY: NULL-terminated arrays of valid C strings.
    unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    Err(InitError::Sys {
        what: format!("exec {}", crate::INIT_PATH),
        source: nix::errno::Errno::last(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swap_header_has_mkswap_layout() {
        let header = swap_header(64 * 1024 * 1024);
        assert_eq!(header.len(), 4096);
        assert_eq!(&header[4086..], b"SWAPSPACE2");
        assert_eq!(
            u32::from_ne_bytes(header[1024..1028].try_into().unwrap()),
            1
        );
        assert_eq!(
            u32::from_ne_bytes(header[1028..1032].try_into().unwrap()),
            16383
        );
    }
}
