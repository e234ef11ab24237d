//! What every microVM boots from: the guest kernel (Debian's cloud kernel, unpacked once
//! to its ELF `vmlinux` with the PVH entry) and the initramfs (the `aloft` binary as
//! `/init` and the virtio modules), built once per kernel and binary and cached.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::driver::DriverError;

/// Modules the guest loads, in order: the virtio transports, then the devices.
pub const MODULES: &[(&str, &str)] = &[
    ("virtio_ring", "drivers/virtio/virtio_ring.ko"),
    ("virtio", "drivers/virtio/virtio.ko"),
    ("virtio_mmio", "drivers/virtio/virtio_mmio.ko"),
    (
        "virtio_pci_legacy_dev",
        "drivers/virtio/virtio_pci_legacy_dev.ko",
    ),
    (
        "virtio_pci_modern_dev",
        "drivers/virtio/virtio_pci_modern_dev.ko",
    ),
    ("virtio_pci", "drivers/virtio/virtio_pci.ko"),
    ("failover", "net/core/failover.ko"),
    ("net_failover", "drivers/net/net_failover.ko"),
    ("virtio_net", "drivers/net/virtio_net.ko"),
    ("virtio_blk", "drivers/block/virtio_blk.ko"),
    ("virtio_console", "drivers/char/virtio_console.ko"),
];

/// The guest kernel: the newest Debian cloud kernel in /boot.
pub fn default_kernel() -> Option<PathBuf> {
    let mut kernels: Vec<PathBuf> = std::fs::read_dir("/boot")
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-") && n.ends_with("-cloud-amd64"))
        })
        .collect();
    kernels.sort();
    kernels.pop()
}

/// The kernel's release (`6.1.0-56-cloud-amd64`), from its file name.
pub fn kernel_release(kernel: &Path) -> Option<String> {
    kernel
        .file_name()?
        .to_str()?
        .strip_prefix("vmlinuz-")
        .map(str::to_string)
}

/// A key that changes whenever the file does (path, size, modification time).
pub fn file_key(path: &Path) -> Result<String, DriverError> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path)
        .map_err(|e| DriverError::Start(format!("the guest kernel {}: {e}", path.display())))?;
    let mut hasher = sha2::Sha256::default();
    use sha2::Digest;
    hasher.update(path.as_os_str().as_encoded_bytes());
    hasher.update(meta.len().to_le_bytes());
    hasher.update(meta.mtime().to_le_bytes());
    hasher.update(meta.mtime_nsec().to_le_bytes());
    Ok(hex::encode(&hasher.finalize()[..8]))
}

const LZ4_MAGIC: &[u8] = &[0x02, 0x21, 0x4c, 0x18];

/// Turns a kernel file into something QEMU boots quickly: an ELF `vmlinux` is used as is;
/// a bzImage is unpacked to its ELF (LZ4, with the `lz4` tool), else used as it is.
pub fn unpack_kernel(kernel: &Path, out: &Path) -> Result<(), DriverError> {
    let bad = |why: String| {
        DriverError::Start(format!(
            "the guest kernel {} is not usable: {why} (give a Debian linux-image-cloud-amd64 vmlinuz with --vm-kernel)",
            kernel.display()
        ))
    };
    let data = std::fs::read(kernel).map_err(|e| bad(e.to_string()))?;
    if data.starts_with(b"\x7fELF") {
        return std::fs::copy(kernel, out)
            .map(|_| ())
            .map_err(|e| bad(format!("copying it: {e}")));
    }
    if data.len() < 0x206 || &data[0x202..0x206] != b"HdrS" {
        return Err(bad("it is neither a bzImage nor an ELF vmlinux".into()));
    }
    let temp = out.with_extension("tmp");
    let unpacked = data
        .windows(4)
        .position(|w| w == LZ4_MAGIC)
        .and_then(|start| {
            let mut child = Command::new("lz4")
                .args(["-dc", "-q"])
                .stdin(std::process::Stdio::piped())
                .stdout(File::create(&temp).ok()?)
                .stderr(std::process::Stdio::null())
                .spawn()
                .ok()?;
            let mut stdin = child.stdin.take()?;
            let payload = data[start..].to_vec();
            let writer = std::thread::spawn(move || {
                let _ = stdin.write_all(&payload);
            });
            let status = child.wait().ok()?;
            let _ = writer.join();
            // lz4 complains about the trailing bytes after the frame but has written it all.
            let _ = status;
            let head = std::fs::read(&temp).ok()?;
            head.starts_with(b"\x7fELF").then_some(())
        })
        .is_some();
    if unpacked {
        std::fs::rename(&temp, out).map_err(|e| bad(e.to_string()))
    } else {
        let _ = std::fs::remove_file(&temp);
        // QEMU boots the bzImage itself, only more slowly.
        std::fs::write(out, &data).map_err(|e| bad(e.to_string()))
    }
}

/// Writes a `newc` cpio archive (what the kernel unpacks as the initramfs).
pub struct CpioWriter<W: Write> {
    out: W,
    inode: u32,
    written: u64,
}

impl<W: Write> CpioWriter<W> {
    pub fn new(out: W) -> Self {
        Self {
            out,
            inode: 1,
            written: 0,
        }
    }

    fn pad(&mut self) -> std::io::Result<()> {
        let pad = (4 - (self.written % 4) as usize) % 4;
        self.out.write_all(&[0u8; 3][..pad])?;
        self.written += pad as u64;
        Ok(())
    }

    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> std::io::Result<()> {
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.inode,
            mode,
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() + 1,
            0
        );
        self.inode += 1;
        self.out.write_all(header.as_bytes())?;
        self.out.write_all(name.as_bytes())?;
        self.out.write_all(&[0])?;
        self.written += (header.len() + name.len() + 1) as u64;
        self.pad()?;
        self.out.write_all(data)?;
        self.written += data.len() as u64;
        self.pad()
    }

    pub fn dir(&mut self, name: &str) -> std::io::Result<()> {
        self.entry(name, 0o040755, (0, 0), &[])
    }

    pub fn file(&mut self, name: &str, mode: u32, data: &[u8]) -> std::io::Result<()> {
        self.entry(name, 0o100000 | mode, (0, 0), data)
    }

    pub fn char_device(&mut self, name: &str, major: u32, minor: u32) -> std::io::Result<()> {
        self.entry(name, 0o020600, (major, minor), &[])
    }

    pub fn finish(mut self) -> std::io::Result<W> {
        self.entry("TRAILER!!!", 0, (0, 0), &[])?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// Builds the initramfs: `/init` (the `aloft` binary, stripped), the modules
/// and their load order, and `/dev/console`.
pub fn build_initramfs(
    aloft_binary: &Path,
    modules_dir: &Path,
    out: &Path,
) -> Result<(), DriverError> {
    let fail = |what: String| DriverError::Start(format!("building the initramfs: {what}"));
    let stripped = out.with_extension("init");
    let strip = Command::new("objcopy")
        .arg("--strip-all")
        .arg(aloft_binary)
        .arg(&stripped)
        .status();
    let init = match strip {
        Ok(status) if status.success() => std::fs::read(&stripped),
        _ => std::fs::read(aloft_binary),
    }
    .map_err(|e| fail(format!("reading {}: {e}", aloft_binary.display())))?;
    let _ = std::fs::remove_file(&stripped);
    let temp = out.with_extension("tmp");
    let file = File::create(&temp).map_err(|e| fail(format!("{}: {e}", temp.display())))?;
    let mut cpio = CpioWriter::new(BufWriter::new(file));
    let write = (|| -> std::io::Result<()> {
        for dir in ["dev", "proc", "sys", "newroot", "lib", "lib/modules"] {
            cpio.dir(dir)?;
        }
        cpio.char_device("dev/console", 5, 1)?;
        cpio.file("init", 0o755, &init)?;
        let mut order = String::new();
        for (name, relative) in MODULES {
            let path = modules_dir.join(relative);
            let data = std::fs::read(&path)
                .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
            cpio.file(&format!("lib/modules/{name}.ko"), 0o644, &data)?;
            order.push_str(name);
            order.push('\n');
        }
        cpio.file("lib/modules/order", 0o644, order.as_bytes())?;
        Ok(())
    })();
    write.map_err(|e| fail(e.to_string()))?;
    cpio.finish().map_err(|e| fail(e.to_string()))?;
    std::fs::rename(&temp, out).map_err(|e| fail(e.to_string()))?;
    remove_stale_initramfs(out);
    Ok(())
}

/// Removes initramfs files of older `aloft` binaries that no machine links any more.
fn remove_stale_initramfs(current: &Path) {
    use std::os::unix::fs::MetadataExt;
    let Some(dir) = current.parent() else { return };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let stale = path != current
            && path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("initrd-"))
            && entry.metadata().is_ok_and(|m| m.nlink() == 1);
        if stale {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_entries_are_aligned_newc() {
        let mut cpio = CpioWriter::new(Vec::new());
        cpio.dir("dev").unwrap();
        cpio.file("init", 0o755, b"abc").unwrap();
        let bytes = cpio.finish().unwrap();
        assert!(bytes.starts_with(b"070701"));
        assert_eq!(bytes.len() % 4, 0);
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("init\0"));
        assert!(text.contains("abc"));
        assert!(text.contains("TRAILER!!!"));
    }

    #[test]
    fn junk_is_no_kernel() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("vmlinuz-junk");
        std::fs::write(&junk, b"not a kernel at all").unwrap();
        let err = unpack_kernel(&junk, &dir.path().join("out")).unwrap_err();
        assert!(err.to_string().contains("neither a bzImage"), "{err}");
        let missing = unpack_kernel(&dir.path().join("nope"), &dir.path().join("out"));
        assert!(missing.unwrap_err().to_string().contains("nope"));
    }
}
