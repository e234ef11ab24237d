//! Root disks of microVMs: the image's layers become one ext4 filesystem (`mkfs.ext4 -d`
//! over a read-only overlay of the cached layers), built once per image and disk size;
//! each machine boots from a qcow2 overlay of it, made fresh on every start, so whatever
//! a run writes is gone at the next.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::driver::DriverError;
use crate::images::PreparedImage;

const MIB: u64 = 1024 * 1024;

/// Bytes a tree takes on ext4, roughly: each file rounded up to 4 KiB plus an inode.
pub fn tree_bytes(root: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.path().symlink_metadata() else {
                continue;
            };
            total += 4096 + meta.len().div_ceil(4096) * 4096;
            if meta.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    total
}

/// Refuses an image that cannot fit the disk, saying by how much.
pub fn check_fits(reference: &str, content_bytes: u64, disk_mb: u64) -> Result<(), DriverError> {
    // ext4's own metadata and reserve take about a tenth of a small disk.
    let needed_mb = (content_bytes + content_bytes / 10).div_ceil(MIB) + 16;
    if needed_mb > disk_mb {
        return Err(DriverError::Rootfs(format!(
            "image {reference} needs about {needed_mb} MB but the machine's root disk is {disk_mb} MB: set rootfs.size_gb in the machine config to {} or more",
            needed_mb.div_ceil(1024)
        )));
    }
    Ok(())
}

fn run(command: &mut Command, what: &str) -> Result<(), DriverError> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(|e| DriverError::Rootfs(format!("{what}: {e}")))?;
    if output.status.success() {
        return Ok(());
    }
    Err(DriverError::Rootfs(format!(
        "{what}: {}",
        String::from_utf8_lossy(&output.stderr).trim()
    )))
}

/// The image's ext4 root filesystem of `disk_mb`, built into `cache` unless it is there.
pub fn base_image(
    cache: &Path,
    image: &PreparedImage,
    disk_mb: u64,
) -> Result<PathBuf, DriverError> {
    let digest = image.digest.trim_start_matches("sha256:");
    let short = &digest[..digest.len().min(24)];
    let path = cache.join(format!("{short}-{disk_mb}m.ext4"));
    if path.exists() {
        return Ok(path);
    }
    if image.layers.is_empty() {
        return Err(DriverError::Rootfs(format!(
            "image {} has no layers",
            image.reference
        )));
    }
    std::fs::create_dir_all(cache)
        .map_err(|e| DriverError::Rootfs(format!("creating {}: {e}", cache.display())))?;
    let content: u64 = image.layers.iter().map(|l| tree_bytes(l)).sum();
    check_fits(&image.reference, content, disk_mb)?;
    let merged = cache.join(format!("{short}.merged"));
    let temp = cache.join(format!("{short}-{disk_mb}m.ext4.tmp"));
    let _ = nix::mount::umount2(&merged, nix::mount::MntFlags::MNT_DETACH);
    std::fs::create_dir_all(&merged)
        .map_err(|e| DriverError::Rootfs(format!("creating {}: {e}", merged.display())))?;
    let source = if image.layers.len() == 1 {
        image.layers[0].clone()
    } else {
        // A read-only overlay of the layers (top first) applies their whiteouts.
        let lower: Vec<String> = image
            .layers
            .iter()
            .rev()
            .map(|p| p.display().to_string())
            .collect();
        nix::mount::mount(
            Some("overlay"),
            &merged,
            Some("overlay"),
            nix::mount::MsFlags::MS_RDONLY,
            Some(format!("lowerdir={}", lower.join(":")).as_str()),
        )
        .map_err(|e| DriverError::Rootfs(format!("mounting the image's layers: {e}")))?;
        merged.clone()
    };
    let built = run(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "root", "-m", "0"])
            .args(["-E", "lazy_itable_init=1,lazy_journal_init=1"])
            .arg("-d")
            .arg(&source)
            .arg(&temp)
            .arg(format!("{disk_mb}M")),
        "building the root filesystem with mkfs.ext4 (is e2fsprogs installed?)",
    );
    let _ = nix::mount::umount2(&merged, nix::mount::MntFlags::MNT_DETACH);
    let _ = std::fs::remove_dir(&merged);
    if let Err(err) = built {
        let _ = std::fs::remove_file(&temp);
        return Err(err);
    }
    std::fs::rename(&temp, &path)
        .map_err(|e| DriverError::Rootfs(format!("storing {}: {e}", path.display())))?;
    Ok(path)
}

/// A fresh copy-on-write disk over `base` (which is linked in next to it, so the disk
/// names its backing file relatively and works inside the machine's jail too).
pub fn machine_disk(vm_dir: &Path, base: &Path) -> Result<PathBuf, DriverError> {
    let linked = vm_dir.join("base.ext4");
    let disk = vm_dir.join("disk.qcow2");
    let _ = std::fs::remove_file(&linked);
    let _ = std::fs::remove_file(&disk);
    std::fs::hard_link(base, &linked)
        .or_else(|_| std::os::unix::fs::symlink(base, &linked))
        .map_err(|e| DriverError::Rootfs(format!("linking {}: {e}", base.display())))?;
    run(
        Command::new("qemu-img")
            .args([
                "create",
                "-q",
                "-f",
                "qcow2",
                "-F",
                "raw",
                "-b",
                "base.ext4",
            ])
            .arg(&disk),
        "creating the machine's disk with qemu-img (is qemu-utils installed?)",
    )?;
    Ok(disk)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_too_big_for_the_disk_are_refused_with_sizes() {
        assert!(check_fits("small", 10 * MIB, 1024).is_ok());
        let err = check_fits("big", 3000 * MIB, 1024).unwrap_err().to_string();
        assert!(err.contains("image big needs about 3316 MB"), "{err}");
        assert!(err.contains("rootfs.size_gb"), "{err}");
    }

    #[test]
    fn trees_are_measured() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), vec![0u8; 5000]).unwrap();
        std::fs::create_dir(dir.path().join("d")).unwrap();
        std::fs::write(dir.path().join("d/b"), b"x").unwrap();
        // a: inode + 2 blocks; d: inode + its 4 KiB directory block; d/b: inode + 1 block.
        assert_eq!(
            tree_bytes(dir.path()),
            (4096 + 8192) + (4096 + 4096) + (4096 + 4096)
        );
    }
}
