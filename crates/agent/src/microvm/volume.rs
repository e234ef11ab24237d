//! Volumes for microVMs. A volume on a microVM host is a disk image the VM gets as a
//! virtio-blk disk (init mounts it at the mount's path), never mounted on the host.
//!
//! Encrypted volumes (the default) are LUKS images (QEMU's own LUKS1 format, AES-256-XTS)
//! with an ext4 filesystem inside, opened by QEMU's host-side block layer
//! (`-blockdev driver=luks`). The passphrase is the volume's 64-byte key from the vault
//! (hex). It reaches `qemu-img` and QEMU only through an inherited pipe (`file=` of a
//! `secret` object naming that descriptor): never a file on disk, never a command line.
//!
//! The image is made on the host, fully formed, before any VM sees it: an empty ext4
//! is made in a sparse scratch file with `mkfs.ext4` and `qemu-img convert` encrypts it
//! into the LUKS image, writing every block (so the volume's blocks are reserved on the
//! host, as a container volume's are, and every block of it decrypts to what mkfs meant,
//! zeros included). Nothing depends on tools inside the guest, and a failure leaves no
//! half-made volume.
//!
//! `--no-encryption` volumes are plain ext4 images, the same as a container host makes.
//!
//! This module depends on no other part of the agent but [`crate::block_image`].

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};

use crate::block_image;

/// The magic at the start of a LUKS (v1 or v2) header.
const LUKS_MAGIC: &[u8; 6] = b"LUKS\xba\xbe";
/// Where an ext4 superblock starts, and its magic within it.
const SUPERBLOCK_OFFSET: usize = 1024;
const EXT4_MAGIC: u16 = 0xEF53;

/// What a volume's image holds, read from its first bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskFormat {
    /// A LUKS container (a microVM volume, encrypted).
    Luks,
    /// A plain ext4 filesystem (unencrypted, or a container host's fscrypt volume).
    Ext4,
    /// Neither (damaged, or not a volume).
    Unknown,
}

/// The format of the image at `path`.
pub fn detect(path: &Path) -> std::io::Result<DiskFormat> {
    let mut head = vec![0u8; 2048];
    let mut file = std::fs::File::open(path)?;
    let mut filled = 0;
    while filled < head.len() {
        let n = file.read(&mut head[filled..])?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    head.truncate(filled);
    if head.starts_with(LUKS_MAGIC) {
        return Ok(DiskFormat::Luks);
    }
    if Superblock::parse(&head).is_ok() {
        return Ok(DiskFormat::Ext4);
    }
    Ok(DiskFormat::Unknown)
}

/// Where the filesystem starts in the image: after the LUKS header (its payload offset,
/// in 512-byte sectors at byte 104 of a LUKS1 header), or at 0 for a plain image.
pub fn payload_offset(path: &Path) -> std::io::Result<u64> {
    let mut head = [0u8; 108];
    std::fs::File::open(path)?.read_exact(&mut head)?;
    if !head.starts_with(LUKS_MAGIC) {
        return Ok(0);
    }
    if head[6..8] != [0, 1] {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "a LUKS header of another version than 1",
        ));
    }
    Ok(u64::from(u32::from_be_bytes([
        head[104], head[105], head[106], head[107],
    ])) * 512)
}

/// The LUKS passphrase of a volume: its key, in hex.
pub fn passphrase(key: &[u8]) -> String {
    key.iter().map(|b| format!("{b:02x}")).collect()
}

/// A volume handed to a microVM: its image and, when it is LUKS, the passphrase.
/// Travels only in the launch description (the shim's stdin), never to disk.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmDisk {
    pub volume: String,
    pub image: PathBuf,
    /// `Some` for a LUKS image: the passphrase that opens it.
    pub passphrase: Option<String>,
    pub destination: String,
}

impl std::fmt::Debug for VmDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmDisk")
            .field("volume", &self.volume)
            .field("image", &self.image)
            .field("encrypted", &self.passphrase.is_some())
            .field("destination", &self.destination)
            .finish()
    }
}

/// The virtio-blk serial of the `index`th volume disk (init finds the disk by it).
pub fn disk_serial(index: usize) -> String {
    format!("fly-vol-{index}")
}

/// A pipe holding `secret` and closed for writing: its read end, for a child to read
/// the secret from `/proc/self/fd/N` (or `/dev/fd/N`).
pub fn secret_pipe(secret: &[u8]) -> std::io::Result<OwnedFd> {
    let mut fds = [0; 2];
    // SAFETY: room for two descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: two fresh descriptors we own.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    if secret.len() > 4096 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "a secret larger than a pipe's atomic write",
        ));
    }
    std::fs::File::from(write).write_all(secret)?;
    Ok(read)
}

/// Descriptor number the secret has in `qemu-img`.
const SECRET_FD: i32 = 3;

/// Runs `qemu-img SUBCOMMAND ARGS` with `passphrase` (when given) as the secret object
/// `volkey`, read from an inherited pipe at `/dev/fd/3`.
fn qemu_img(args: &[&std::ffi::OsStr], passphrase: Option<&str>) -> Result<(), String> {
    let (subcommand, rest) = args.split_first().ok_or("qemu-img: no subcommand")?;
    let pipe = match passphrase {
        Some(p) => {
            Some(secret_pipe(p.as_bytes()).map_err(|e| format!("a pipe for the volume key: {e}"))?)
        }
        None => None,
    };
    let object = format!("secret,id=volkey,file=/dev/fd/{SECRET_FD}");
    let mut command = Command::new("qemu-img");
    command.arg(subcommand);
    if pipe.is_some() {
        // `--object` belongs to the subcommand's options.
        command.arg("--object").arg(&object);
    }
    command
        .args(rest)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(pipe) = &pipe {
        let fd = pipe.as_raw_fd();
        // SAFETY: only dup2/fcntl between fork and exec.
        unsafe {
            command.pre_exec(move || {
                if fd == SECRET_FD {
                    libc::fcntl(fd, libc::F_SETFD, 0);
                } else if libc::dup2(fd, SECRET_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let output = command
        .output()
        .map_err(|e| format!("running qemu-img (is qemu-utils installed?): {e}"))?;
    drop(pipe);
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "qemu-img {}: {}",
            subcommand.to_string_lossy(),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// Makes `image` (which must not exist): a LUKS image of `size` bytes of payload, opened
/// by `key`, holding an empty ext4 whose root belongs to root. `scratch` is a private
/// directory on the same filesystem for the plain filesystem on its way in.
pub fn create_luks(image: &Path, size: u64, key: &[u8], scratch: &Path) -> Result<(), String> {
    let plain = scratch.join(format!(
        "{}.plain",
        image
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    ));
    let options = block_image::FormatOptions {
        journal: true,
        label: None,
        root_uid: 0,
        root_gid: 0,
        preallocate: false,
    };
    // The LUKS image's blocks are all written by the conversion: check the room first.
    block_image::check_room(scratch, size).map_err(|e| format!("No space left on device: {e}"))?;
    block_image::create(&plain, size, &options).map_err(|e| e.to_string())?;
    let secret = passphrase(key);
    let mut converted = Err(String::new());
    for _ in 0..PBKDF_BENCHMARK_TRIES {
        converted = qemu_img(
            &[
                "convert".as_ref(),
                "-q".as_ref(),
                "-f".as_ref(),
                "raw".as_ref(),
                "-O".as_ref(),
                "luks".as_ref(),
                "-o".as_ref(),
                // A short PBKDF time: the passphrase is a random 512-bit key, not a password.
                "key-secret=volkey,iter-time=100,cipher-alg=aes-256,cipher-mode=xts,ivgen-alg=plain64"
                    .as_ref(),
                plain.as_os_str(),
                image.as_os_str(),
            ],
            Some(&secret),
        );
        match &converted {
            // QEMU times a first PBKDF2 round with the thread's CPU clock to choose the
            // iteration count, and gives up when that clock did not move (about one run
            // in eight on this host's coarse CPU accounting): nothing was written, so it
            // is tried again.
            Err(e) if e.contains(PBKDF_BENCHMARK_FLAKE) => {
                let _ = std::fs::remove_file(image);
            }
            _ => break,
        }
    }
    let _ = std::fs::remove_file(&plain);
    if let Err(e) = converted {
        let _ = std::fs::remove_file(image);
        return Err(e);
    }
    Ok(())
}

/// How often `qemu-img` may fail its PBKDF benchmark before a volume is refused.
const PBKDF_BENCHMARK_TRIES: usize = 8;
const PBKDF_BENCHMARK_FLAKE: &str = "Unable to get accurate CPU usage";

/// What an ext4 superblock says about the filesystem's blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Superblock {
    pub block_size: u64,
    pub blocks: u64,
    pub free: u64,
    pub reserved: u64,
    pub overhead: u64,
}

impl Superblock {
    /// Reads the superblock from the first bytes (at least 2048) of an ext4 image.
    pub fn parse(head: &[u8]) -> Result<Self, String> {
        let sb = head
            .get(SUPERBLOCK_OFFSET..SUPERBLOCK_OFFSET + 1024)
            .ok_or("too short to hold an ext4 superblock")?;
        let u32_at = |offset: usize| {
            u64::from(u32::from_le_bytes([
                sb[offset],
                sb[offset + 1],
                sb[offset + 2],
                sb[offset + 3],
            ]))
        };
        let magic = u16::from_le_bytes([sb[0x38], sb[0x39]]);
        if magic != EXT4_MAGIC {
            return Err("no ext4 superblock (wrong magic)".into());
        }
        let log_block_size = u32_at(0x18);
        if log_block_size > 6 {
            return Err(format!(
                "ext4 superblock with block size 2^{}",
                10 + log_block_size
            ));
        }
        let wide = u32_at(0x60) & 0x80 != 0;
        let high = |offset: usize| if wide { u32_at(offset) << 32 } else { 0 };
        Ok(Self {
            block_size: 1024 << log_block_size,
            blocks: u32_at(0x04) | high(0x150),
            reserved: u32_at(0x08) | high(0x154),
            free: u32_at(0x0C) | high(0x158),
            overhead: u32_at(0x248),
        })
    }
}

/// The superblock of a volume's filesystem, read without mounting it: straight from
/// a plain image, through QEMU's LUKS driver (`qemu-img dd`, sharing the image with a
/// running VM) from an encrypted one. `scratch` is a private directory for the copy.
pub fn read_superblock(
    image: &Path,
    key: Option<&[u8]>,
    scratch: &Path,
) -> Result<Superblock, String> {
    match detect(image).map_err(|e| format!("reading {}: {e}", image.display()))? {
        DiskFormat::Ext4 => {
            let mut head = vec![0u8; 2048];
            std::fs::File::open(image)
                .and_then(|mut f| f.read_exact(&mut head))
                .map_err(|e| format!("reading {}: {e}", image.display()))?;
            Superblock::parse(&head)
        }
        DiskFormat::Luks => {
            let key = key.ok_or("the volume is encrypted and its key was not available")?;
            let name = image
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let copy = scratch.join(format!("{name}.superblock"));
            let _ = std::fs::remove_file(&copy);
            let source = format!(
                "if=driver=luks,key-secret=volkey,file.driver=file,file.filename={}",
                image.display()
            );
            let target = format!("of={}", copy.display());
            let read = qemu_img(
                &[
                    "dd".as_ref(),
                    "-U".as_ref(),
                    "--image-opts".as_ref(),
                    "-O".as_ref(),
                    "raw".as_ref(),
                    "bs=4096".as_ref(),
                    "count=1".as_ref(),
                    source.as_ref(),
                    target.as_ref(),
                ],
                Some(&passphrase(key)),
            )
            .and_then(|()| {
                std::fs::read(&copy).map_err(|e| format!("reading the superblock copy: {e}"))
            });
            let _ = std::fs::remove_file(&copy);
            Superblock::parse(&read?)
        }
        DiskFormat::Unknown => Err(format!("{} holds neither ext4 nor LUKS", image.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> bool {
        nix::unistd::Uid::effective().is_root()
    }

    #[test]
    fn a_luks_volume_holds_ext4_readable_only_with_its_key() {
        if !root() || Command::new("qemu-img").arg("--version").output().is_err() {
            aloft_testkit::skip("needs root, mkfs.ext4 and qemu-img");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("vol_a.ext4");
        let key = [7u8; 64];
        create_luks(&image, 64 * 1024 * 1024, &key, dir.path()).unwrap();
        assert_eq!(detect(&image).unwrap(), DiskFormat::Luks);
        let header = payload_offset(&image).unwrap();
        assert_eq!(
            std::fs::metadata(&image).unwrap().len() - header,
            64 * 1024 * 1024,
            "the header ends where the payload starts"
        );
        let sb = read_superblock(&image, Some(&key), dir.path()).unwrap();
        assert_eq!(sb.block_size * sb.blocks, 64 * 1024 * 1024, "{sb:?}");
        assert!(sb.free > 0 && sb.free < sb.blocks);
        assert!(read_superblock(&image, Some(&[8u8; 64]), dir.path()).is_err());
        assert!(read_superblock(&image, None, dir.path()).is_err());
        // Nothing left behind in the scratch directory.
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("vol_a.ext4")]);
    }

    #[test]
    fn superblocks_are_parsed_and_junk_refused() {
        let mut head = vec![0u8; 2048];
        assert!(Superblock::parse(&head).is_err());
        head[1024 + 0x38..1024 + 0x3a].copy_from_slice(&EXT4_MAGIC.to_le_bytes());
        head[1024 + 0x04..1024 + 0x08].copy_from_slice(&1000u32.to_le_bytes());
        head[1024 + 0x0C..1024 + 0x10].copy_from_slice(&400u32.to_le_bytes());
        head[1024 + 0x18..1024 + 0x1C].copy_from_slice(&2u32.to_le_bytes());
        let sb = Superblock::parse(&head).unwrap();
        assert_eq!((sb.block_size, sb.blocks, sb.free), (4096, 1000, 400));
        assert!(Superblock::parse(&head[..1500]).is_err());
    }
}
