//! Volumes on this host: each one a file holding its own ext4 filesystem
//! (`agent/volumes/<id>.ext4`, 0600, in a directory only root can enter), so its size is
//! a hard quota. Its blocks are reserved on the host's disk when it is made (or grown,
//! or restored): a sparse image on a host whose disk fills up would turn the volume's
//! writes into I/O errors and abort its journal, so a host without room refuses the
//! volume instead. While the agent needs it (a machine starts with it, the control plane
//! asks for its counts) it is mounted on a loop device at `agent/volumes/mnt/<id>`, and
//! a container gets that directory bind-mounted at the mount's path. A host that stops
//! (or reboots) unmounts them all; the next use mounts them again. The filesystem keeps
//! a journal, so a crash loses no acknowledged write.
//!
//! Encrypted volumes (the default) are made with ext4's encryption (fscrypt, v2 policy,
//! AES-256-XTS contents and AES-256-CTS names): the machine sees the directory `data/`
//! of the filesystem, encrypted under the volume's own 64-byte key. The key is never on
//! the host's disk: the control plane keeps it sealed in its vault and hands it, sealed
//! for this host, to the agent, which adds it to the filesystem's keyring
//! (`FS_IOC_ADD_ENCRYPTION_KEY`) when a machine starts with the volume. An unmounted
//! image holds only ciphertext.

use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;

use aloft_api::internal::{MachineSpec, SnapshotFile, VolumeDisk};
use serde_json::json;

use crate::block_image;
use crate::microvm::volume::{self as vm_volume, DiskFormat, VmDisk};
use crate::unpack::IdShift;

const GIB: u64 = 1024 * 1024 * 1024;
/// The directory of an encrypted volume's filesystem that machines see.
const ENCRYPTED_DIR: &str = "data";
/// `<linux/loop.h>`: re-read the backing file's size.
const LOOP_SET_CAPACITY: libc::c_ulong = 0x4C07;

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("volume {0} is not on this host")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Failed(String),
}

/// A volume bind-mounted into a machine: the host directory and the path inside.
#[derive(Clone, Debug)]
pub struct VolumeMount {
    pub volume: String,
    pub source: PathBuf,
    pub destination: String,
    /// For a microVM: the volume as a disk (its image, never mounted on the host).
    pub vm_disk: Option<VmDisk>,
}

impl VolumeMount {
    /// The bind mount in a container's OCI spec; the runtime resolves `destination`
    /// inside the rootfs (an image's symlinks cannot lead it out).
    pub fn oci_mount(&self) -> serde_json::Value {
        json!({
            "destination": self.destination,
            "type": "bind",
            "source": self.source,
            "options": ["rbind", "rw", "nosuid", "nodev"],
        })
    }
}

/// The volumes of this host, under one directory. Mounting and unmounting take one lock,
/// so a volume is never attached to two loop devices (two filesystems on one image).
#[derive(Clone)]
pub struct Volumes {
    dir: PathBuf,
    lock: Arc<Mutex<()>>,
    /// The user namespace machines run in, whose root must own a volume's top directory.
    machine_ids: Option<IdShift>,
    /// Machines here are microVMs: volumes are disks for them (LUKS when encrypted),
    /// never mounted on the host.
    as_disks: bool,
}

/// Volume ids are made by the control plane: `vol_` and letters or digits.
fn check_id(id: &str) -> Result<(), VolumeError> {
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        return Err(VolumeError::BadRequest(format!(
            "invalid volume id {id:?}: letters, digits and underscores only"
        )));
    }
    Ok(())
}

fn failed(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> VolumeError {
    let what = what.to_string();
    move |e| VolumeError::Failed(format!("{what}: {e}"))
}

/// Creates `dir` (and parents) and closes it to everyone but root.
fn private_dir(dir: &Path) -> Result<(), VolumeError> {
    std::fs::create_dir_all(dir).map_err(failed(format!("creating {}", dir.display())))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(failed(format!("closing {}", dir.display())))
}

impl Volumes {
    pub fn new(dir: &Path) -> Result<Self, VolumeError> {
        private_dir(dir)?;
        private_dir(&dir.join("mnt"))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            lock: Arc::default(),
            machine_ids: None,
            as_disks: false,
        })
    }

    /// Volumes for microVMs (`true`): made as disk images QEMU opens (LUKS when
    /// encrypted), read without mounting them on the host.
    pub fn as_disks(mut self, as_disks: bool) -> Self {
        self.as_disks = as_disks;
        self
    }

    /// What the volume's image holds.
    fn format(&self, id: &str) -> Result<DiskFormat, VolumeError> {
        let image = self.image(id);
        vm_volume::detect(&image).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                VolumeError::NotFound(id.to_string())
            } else {
                VolumeError::Failed(format!("reading volume {id}: {e}"))
            }
        })
    }

    /// Whether reading the volume's counts takes its key (a LUKS image).
    pub fn needs_key_for_status(&self, id: &str) -> bool {
        check_id(id).is_ok() && matches!(self.format(id), Ok(DiskFormat::Luks))
    }

    /// Refuses a volume whose image this host's driver cannot use, before anything
    /// touches it.
    fn check_usable_here(&self, id: &str) -> Result<DiskFormat, VolumeError> {
        let format = self.format(id)?;
        match format {
            DiskFormat::Luks if !self.as_disks => Err(VolumeError::BadRequest(format!(
                "volume {id} was made on a microVM host (a LUKS-encrypted disk image): containers cannot mount it; run its machine with aloft server --driver microvm"
            ))),
            DiskFormat::Ext4 if self.as_disks && self.encrypted_marker(id).exists() => {
                Err(VolumeError::BadRequest(format!(
                    "volume {id} was made on a container host (ext4 encryption): microVMs cannot open it; run its machine with aloft server --driver container"
                )))
            }
            DiskFormat::Unknown => Err(VolumeError::Failed(format!(
                "volume {id}: its image holds neither ext4 nor LUKS"
            ))),
            _ => Ok(format),
        }
    }

    /// Volumes for machines in a user namespace (`ids`): a volume's top directory, made
    /// by host root, is handed to the machine's root when it is mounted.
    pub fn for_machines_in(mut self, ids: Option<IdShift>) -> Self {
        self.machine_ids = ids;
        self
    }

    /// Hands `top` (a volume's top directory as machines see it) to the machines' root
    /// when it still belongs to host root; what a machine made inside stays as it is.
    fn hand_to_machine_root(&self, top: &Path) -> Result<(), VolumeError> {
        use std::os::unix::fs::MetadataExt;
        let Some(ids) = self.machine_ids else {
            return Ok(());
        };
        let meta = std::fs::metadata(top).map_err(failed(format!("reading {}", top.display())))?;
        if meta.uid() == 0 && meta.gid() == 0 {
            let root = ids.host_id(0);
            std::os::unix::fs::chown(top, Some(root), Some(root)).map_err(failed(format!(
                "handing {} to the machines' root (host id {root})",
                top.display()
            )))?;
        }
        Ok(())
    }

    fn image(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.ext4"))
    }

    fn mount_point(&self, id: &str) -> PathBuf {
        self.dir.join("mnt").join(id)
    }

    fn guard(&self) -> std::sync::MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes the volume's disk: an image of `size_gb` with an empty ext4, its blocks
    /// reserved on the host (refused with a clear error when the host lacks room). Asking
    /// again for a volume that exists with that size answers its counts; nothing is left
    /// behind when it fails.
    pub fn create(
        &self,
        id: &str,
        size_gb: u64,
        key: Option<&[u8]>,
    ) -> Result<VolumeDisk, VolumeError> {
        check_id(id)?;
        if !(1..=16 * 1024).contains(&size_gb) {
            return Err(VolumeError::BadRequest(format!(
                "invalid size_gb: {size_gb} must be between 1 and 16384"
            )));
        }
        let size = size_gb * GIB;
        let image = self.image(id);
        {
            let _guard = self.guard();
            match std::fs::metadata(&image) {
                Ok(meta) if meta.len() == size => {}
                // A LUKS image: the payload and its header (2 MiB for LUKS1).
                Ok(meta)
                    if meta.len() > size
                        && meta.len() - size < 16 * 1024 * 1024
                        && matches!(self.format(id), Ok(DiskFormat::Luks)) => {}
                Ok(meta) => {
                    return Err(VolumeError::Conflict(format!(
                        "volume {id} exists here with another size ({} bytes)",
                        meta.len()
                    )));
                }
                Err(_) if self.as_disks && key.is_some() => {
                    self.create_luks(id, size, key.unwrap_or_default())?;
                }
                Err(_) => {
                    let partial = self.dir.join(format!("{id}.ext4.partial"));
                    let options = block_image::FormatOptions {
                        journal: true,
                        label: None,
                        root_uid: 0,
                        root_gid: 0,
                        preallocate: true,
                    };
                    block_image::create(&partial, size, &options).map_err(|e| {
                        if e.is_no_space() {
                            self.no_room(&format!("a {size_gb} GB volume"))
                        } else {
                            VolumeError::Failed(e.to_string())
                        }
                    })?;
                    if key.is_some() && !self.as_disks {
                        std::fs::write(self.encrypted_marker(id), b"").map_err(|e| {
                            let _ = std::fs::remove_file(&partial);
                            VolumeError::Failed(format!("marking volume {id} encrypted: {e}"))
                        })?;
                        run_e2fs(
                            "tune2fs",
                            &["-O".as_ref(), "encrypt".as_ref(), partial.as_os_str()],
                        )
                        .map_err(|e| {
                            let _ = std::fs::remove_file(&partial);
                            VolumeError::Failed(format!("enabling encryption on volume {id}: {e}"))
                        })?;
                    }
                    if let Err(e) = std::fs::File::open(&partial)
                        .and_then(|f| f.sync_all())
                        .and_then(|()| std::fs::rename(&partial, &image))
                    {
                        let _ = std::fs::remove_file(&partial);
                        return Err(VolumeError::Failed(format!(
                            "storing the disk of volume {id}: {e}"
                        )));
                    }
                    if let Ok(dir) = std::fs::File::open(&self.dir) {
                        let _ = dir.sync_all();
                    }
                    if let Some(key) = key.filter(|_| !self.as_disks)
                        && let Err(err) = self.set_up_encryption(id, key)
                    {
                        self.release(id);
                        let _ = std::fs::remove_file(&image);
                        let _ = std::fs::remove_file(self.encrypted_marker(id));
                        return Err(err);
                    }
                    tracing::info!(
                        volume = id,
                        size_gb,
                        encrypted = key.is_some(),
                        "volume created"
                    );
                }
            }
        }
        self.status_with_key(id, key)
    }

    /// Makes a microVM host's encrypted volume: a LUKS image with ext4 inside, opened by
    /// `key` (see [`vm_volume::create_luks`]). The caller holds the lock.
    fn create_luks(&self, id: &str, size: u64, key: &[u8]) -> Result<(), VolumeError> {
        if block_image::check_room(&self.dir, size).is_err() {
            return Err(self.no_room(&format!("a {} GB volume", size / GIB)));
        }
        let partial = self.dir.join(format!("{id}.ext4.partial"));
        let _ = std::fs::remove_file(&partial);
        vm_volume::create_luks(&partial, size, key, &self.dir)
            .map_err(|e| VolumeError::Failed(format!("making the disk of volume {id}: {e}")))?;
        let stored = std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o600))
            .and_then(|()| std::fs::write(self.encrypted_marker(id), b""))
            .and_then(|()| std::fs::File::open(&partial))
            .and_then(|f| f.sync_all())
            .and_then(|()| std::fs::rename(&partial, self.image(id)));
        if let Err(e) = stored {
            let _ = std::fs::remove_file(&partial);
            let _ = std::fs::remove_file(self.encrypted_marker(id));
            return Err(VolumeError::Failed(format!(
                "storing the disk of volume {id}: {e}"
            )));
        }
        if let Ok(dir) = std::fs::File::open(&self.dir) {
            let _ = dir.sync_all();
        }
        tracing::info!(
            volume = id,
            size_gb = size / GIB,
            "volume created (LUKS image for microVMs)"
        );
        Ok(())
    }

    /// Mounts the volume at its mount point unless it is already; returns that directory.
    /// The caller holds the lock.
    fn ensure_mounted(&self, id: &str) -> Result<PathBuf, VolumeError> {
        let image = self.image(id);
        if !image.exists() {
            return Err(VolumeError::NotFound(id.to_string()));
        }
        self.check_usable_here(id)?;
        if self.as_disks {
            return Err(VolumeError::Failed(format!(
                "volume {id} is a microVM's disk on this host and is never mounted here"
            )));
        }
        let target = self.mount_point(id);
        if block_image::is_mount_point(&target) {
            return Ok(target);
        }
        std::fs::create_dir_all(&target)
            .map_err(failed(format!("creating {}", target.display())))?;
        // A device still attached to the image (a machine's mount namespace kept the
        // filesystem alive) is mounted again rather than attaching a second one: the
        // kernel then shares one filesystem between both mounts.
        let attached = block_image::loop_devices_under(&image)
            .into_iter()
            .find(|d| d.backing_file == image);
        match attached {
            Some(device) => nix::mount::mount(
                Some(device.device.as_path()),
                &target,
                Some("ext4"),
                nix::mount::MsFlags::empty(),
                None::<&str>,
            )
            .map_err(|e| {
                VolumeError::Failed(format!(
                    "mounting volume {id} ({}): {e}",
                    device.device.display()
                ))
            })?,
            None => {
                block_image::mount(&image, &target, nix::mount::MsFlags::empty())
                    .map_err(|e| VolumeError::Failed(format!("mounting volume {id}: {e}")))?;
            }
        }
        Ok(target)
    }

    /// The volume's sizes and counts (mounting it if it is not).
    pub fn status(&self, id: &str) -> Result<VolumeDisk, VolumeError> {
        self.status_with_key(id, None)
    }

    /// The volume's sizes and counts. On a container host the volume is mounted (if it
    /// is not) and its filesystem asked (statvfs). A microVM host never mounts a volume:
    /// the counts come from the ext4 superblock, read from the image (through QEMU's
    /// LUKS driver with `key` when it is encrypted). The superblock's free count is the
    /// one the guest's kernel last wrote there (at mount, unmount and journal commits
    /// of the superblock), so it can lag behind a running machine's writes.
    pub fn status_with_key(&self, id: &str, key: Option<&[u8]>) -> Result<VolumeDisk, VolumeError> {
        check_id(id)?;
        let _guard = self.guard();
        if self.as_disks {
            let image = self.image(id);
            self.check_usable_here(id)?;
            let size_bytes = std::fs::metadata(&image)
                .map(|m| m.len())
                .map_err(failed(format!("volume {id}")))?;
            let sb = vm_volume::read_superblock(&image, key, &self.dir)
                .map_err(|e| VolumeError::Failed(format!("volume {id}: {e}")))?;
            // The payload, without a LUKS header.
            let size_bytes = size_bytes.saturating_sub(
                vm_volume::payload_offset(&image).map_err(failed(format!("volume {id}")))?,
            );
            if sb.blocks * sb.block_size >= size_bytes {
                // The filesystem fills its disk: nothing left to grow at the next start.
                let _ = std::fs::remove_file(self.pending_resize(id));
            }
            return Ok(VolumeDisk {
                id: id.to_string(),
                size_bytes,
                blocks: sb.blocks.saturating_sub(sb.overhead),
                block_size: sb.block_size,
                blocks_free: sb.free,
                blocks_avail: sb.free.saturating_sub(sb.reserved),
                needs_restart: false,
            });
        }
        let target = self.ensure_mounted(id)?;
        let size_bytes = std::fs::metadata(self.image(id))
            .map(|m| m.len())
            .map_err(failed(format!("volume {id}")))?;
        let stat = nix::sys::statvfs::statvfs(&target)
            .map_err(|e| VolumeError::Failed(format!("statvfs of volume {id}: {e}")))?;
        Ok(VolumeDisk {
            id: id.to_string(),
            size_bytes,
            blocks: stat.blocks(),
            block_size: stat.fragment_size(),
            blocks_free: stat.blocks_free(),
            blocks_avail: stat.blocks_available(),
            needs_restart: false,
        })
    }

    /// Grows the volume to `size_gb`. ext4 grows online (mounted) where the agent may
    /// (CAP_SYS_RESOURCE); otherwise a volume no running machine uses is grown offline at
    /// once, and one in use when its machine next starts (`needs_restart`).
    pub fn extend(&self, id: &str, size_gb: u64, in_use: bool) -> Result<VolumeDisk, VolumeError> {
        self.extend_with_key(id, size_gb, in_use, None)
    }

    /// [`Volumes::extend`], with the volume's key (a microVM host reads an encrypted
    /// volume's counts through it). On a microVM host the image grows at once (a LUKS
    /// image's payload is the rest of the file after its header, so the same holds for
    /// it) and the filesystem grows when a machine next mounts it (init resizes it
    /// online to the disk): `needs_restart`.
    pub fn extend_with_key(
        &self,
        id: &str,
        size_gb: u64,
        in_use: bool,
        key: Option<&[u8]>,
    ) -> Result<VolumeDisk, VolumeError> {
        check_id(id)?;
        if self.as_disks {
            let grew = self.grow_disk(id, size_gb)?;
            let mut disk = self.status_with_key(id, key)?;
            disk.needs_restart = grew || self.pending_resize(id).exists();
            let _ = in_use;
            return Ok(disk);
        }
        let size = size_gb.saturating_mul(GIB);
        let needs_restart = {
            let _guard = self.guard();
            let image = self.image(id);
            let current = std::fs::metadata(&image)
                .map_err(|_| VolumeError::NotFound(id.to_string()))?
                .len();
            if size < current {
                return Err(VolumeError::BadRequest(format!(
                    "invalid size_gb: {size_gb} is smaller than the volume ({} GB); volumes only grow",
                    current / GIB
                )));
            }
            if size > current {
                if block_image::check_room(&self.dir, size - current).is_err() {
                    return Err(self.no_room(&format!("volume {id} to grow to {size_gb} GB")));
                }
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&image)
                    .map_err(failed(format!("opening volume {id}")))?;
                file.set_len(size)
                    .map_err(failed(format!("growing volume {id}")))?;
                if let Err(e) = block_image::preallocate(&file, current, size) {
                    let _ = file.set_len(current);
                    return Err(if e.raw_os_error() == Some(libc::ENOSPC) {
                        self.no_room(&format!("volume {id} to grow to {size_gb} GB"))
                    } else {
                        VolumeError::Failed(format!("growing volume {id}: {e}"))
                    });
                }
                file.sync_all()
                    .map_err(failed(format!("growing volume {id}")))?;
            }
            match self.resize_online(id) {
                Ok(()) => false,
                Err(why) if in_use => {
                    tracing::info!(volume = id, why = %why, "the volume grows when its machine restarts");
                    std::fs::write(self.pending_resize(id), b"")
                        .map_err(failed(format!("recording the resize of volume {id}")))?;
                    true
                }
                Err(why) => {
                    tracing::debug!(volume = id, why = %why, "growing the volume offline");
                    std::fs::write(self.pending_resize(id), b"")
                        .map_err(failed(format!("recording the resize of volume {id}")))?;
                    !self.resize_if_unused(id)?
                }
            }
        };
        let mut disk = self.status(id)?;
        disk.needs_restart = needs_restart;
        Ok(disk)
    }

    /// Grows a microVM volume's image so its payload is `size_gb`; `true` when it grew.
    /// The filesystem inside grows at its machine's next start (recorded until then).
    fn grow_disk(&self, id: &str, size_gb: u64) -> Result<bool, VolumeError> {
        let _guard = self.guard();
        self.check_usable_here(id)?;
        let image = self.image(id);
        let header =
            vm_volume::payload_offset(&image).map_err(failed(format!("reading volume {id}")))?;
        let length = std::fs::metadata(&image)
            .map_err(|_| VolumeError::NotFound(id.to_string()))?
            .len();
        let current = length.saturating_sub(header);
        let size = size_gb.saturating_mul(GIB);
        if size < current {
            return Err(VolumeError::BadRequest(format!(
                "invalid size_gb: {size_gb} is smaller than the volume ({} GB); volumes only grow",
                current / GIB
            )));
        }
        if size == current {
            return Ok(false);
        }
        if block_image::check_room(&self.dir, size - current).is_err() {
            return Err(self.no_room(&format!("volume {id} to grow to {size_gb} GB")));
        }
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&image)
            .map_err(failed(format!("opening volume {id}")))?;
        file.set_len(header + size)
            .map_err(failed(format!("growing volume {id}")))?;
        if let Err(e) = block_image::preallocate(&file, length, header + size) {
            let _ = file.set_len(length);
            return Err(if e.raw_os_error() == Some(libc::ENOSPC) {
                self.no_room(&format!("volume {id} to grow to {size_gb} GB"))
            } else {
                VolumeError::Failed(format!("growing volume {id}: {e}"))
            });
        }
        file.sync_all()
            .map_err(failed(format!("growing volume {id}")))?;
        std::fs::write(self.pending_resize(id), b"")
            .map_err(failed(format!("recording the resize of volume {id}")))?;
        Ok(true)
    }

    /// The error for a host whose disk can't hold `what`, with the room it has.
    fn no_room(&self, what: &str) -> VolumeError {
        let free = nix::sys::statvfs::statvfs(&self.dir)
            .map(|s| {
                format!(
                    " ({:.1} GB free)",
                    (s.blocks_available() * s.fragment_size()) as f64 / GIB as f64
                )
            })
            .unwrap_or_default();
        VolumeError::Failed(format!(
            "not enough space on this host for {what}{free}: No space left on device"
        ))
    }

    fn encrypted_marker(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.encrypted"))
    }

    /// Whether the volume's content is encrypted (it then needs its key to be used).
    pub fn is_encrypted(&self, id: &str) -> bool {
        check_id(id).is_ok() && self.encrypted_marker(id).exists()
    }

    /// Mounts a new volume, adds its key and makes `data/` the encrypted directory
    /// machines see. The caller holds the lock.
    fn set_up_encryption(&self, id: &str, key: &[u8]) -> Result<(), VolumeError> {
        let target = self.ensure_mounted(id)?;
        let identifier = fscrypt::add_key(&target, key)
            .map_err(|e| VolumeError::Failed(format!("adding the key of volume {id}: {e}")))?;
        let data = target.join(ENCRYPTED_DIR);
        std::fs::create_dir(&data).map_err(failed(format!("creating {}", data.display())))?;
        fscrypt::set_policy(&data, &identifier).map_err(|e| {
            VolumeError::Failed(format!(
                "encrypting volume {id} (does this kernel have ext4 encryption?): {e}"
            ))
        })
    }

    /// Mounts the volume and, when it is encrypted, adds its key so its content opens.
    fn unlock(&self, id: &str, key: Option<&[u8]>) -> Result<PathBuf, VolumeError> {
        let target = self.ensure_mounted(id)?;
        if !self.encrypted_marker(id).exists() {
            return Ok(target);
        }
        let Some(key) = key else {
            return Err(VolumeError::Failed(format!(
                "volume {id} is encrypted and its key was not available"
            )));
        };
        fscrypt::add_key(&target, key)
            .map_err(|e| VolumeError::Failed(format!("adding the key of volume {id}: {e}")))?;
        Ok(target.join(ENCRYPTED_DIR))
    }

    fn pending_resize(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.resize"))
    }

    /// Tells the loop device the image grew and has ext4 grow into it, mounted.
    fn resize_online(&self, id: &str) -> Result<(), String> {
        let image = self.image(id);
        self.ensure_mounted(id).map_err(|e| e.to_string())?;
        let device = block_image::loop_devices_under(&image)
            .into_iter()
            .find(|d| d.backing_file == image)
            .ok_or_else(|| format!("volume {id} has no loop device"))?;
        let handle = std::fs::File::open(&device.device)
            .map_err(|e| format!("opening {}: {e}", device.device.display()))?;
        // SAFETY: LOOP_SET_CAPACITY takes no argument.
        if unsafe { libc::ioctl(handle.as_raw_fd(), LOOP_SET_CAPACITY as _, 0) } < 0 {
            return Err(format!(
                "resizing {}: {}",
                device.device.display(),
                std::io::Error::last_os_error()
            ));
        }
        run_e2fs("resize2fs", &[device.device.as_os_str()])
    }

    /// Unmounts the volume and, once nothing holds its filesystem any more (no loop
    /// device left on the image), grows it offline; `false` (the resize stays pending)
    /// when something still does: a filesystem in use is never touched from outside.
    /// The caller holds the lock.
    fn resize_if_unused(&self, id: &str) -> Result<bool, VolumeError> {
        self.release(id);
        let image = self.image(id);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        // The last machine's mount namespace lets go of the device a moment after its
        // processes end.
        while block_image::loop_devices_under(&image)
            .iter()
            .any(|d| d.backing_file == image)
        {
            if std::time::Instant::now() > deadline {
                tracing::warn!(
                    volume = id,
                    "the volume is still in use; it grows at its machine's next start"
                );
                return Ok(false);
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
            self.release(id);
        }
        self.resize_offline(id)?;
        Ok(true)
    }

    /// Checks and grows an unmounted volume's filesystem to its image's size.
    fn resize_offline(&self, id: &str) -> Result<(), VolumeError> {
        let image = self.image(id);
        // resize2fs wants a filesystem checked since it was last mounted; -p repairs only
        // what is safe without asking, and exits 1 when it fixed something.
        let status = std::process::Command::new("e2fsck")
            .args(["-f", "-p"])
            .arg(&image)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .map_err(failed("running e2fsck (is e2fsprogs installed?)"))?;
        if !matches!(status.code(), Some(0 | 1)) {
            return Err(VolumeError::Failed(format!(
                "checking volume {id} before growing it: e2fsck exited with {status}"
            )));
        }
        run_e2fs("resize2fs", &[image.as_os_str()])
            .map_err(|e| VolumeError::Failed(format!("growing volume {id}: {e}")))?;
        let _ = std::fs::remove_file(self.pending_resize(id));
        Ok(())
    }

    /// Unmounts the volume and deletes its disk. Refused while `in_use_by` names a
    /// machine on this host that mounts it.
    pub fn destroy(&self, id: &str, in_use_by: Option<&str>) -> Result<(), VolumeError> {
        check_id(id)?;
        if let Some(machine) = in_use_by {
            return Err(VolumeError::Conflict(format!(
                "volume {id} is mounted by machine {machine} on this host; destroy the machine first"
            )));
        }
        let _guard = self.guard();
        let image = self.image(id);
        if !image.exists() {
            return Err(VolumeError::NotFound(id.to_string()));
        }
        self.release(id);
        std::fs::remove_file(&image).map_err(failed(format!("deleting volume {id}")))?;
        let _ = std::fs::remove_file(self.pending_resize(id));
        let _ = std::fs::remove_file(self.encrypted_marker(id));
        let _ = std::fs::remove_dir(self.mount_point(id));
        tracing::info!(volume = id, "volume destroyed");
        Ok(())
    }

    fn snapshots_dir(&self) -> PathBuf {
        self.dir.join("snapshots")
    }

    fn snapshot_file(&self, snapshot: &str) -> PathBuf {
        self.snapshots_dir().join(format!("{snapshot}.ext4.zst"))
    }

    /// Takes a snapshot of the volume: its whole image, zstd-compressed, with its sha256,
    /// stored beside the volumes (not in the volume). A mounted filesystem is frozen
    /// while it is read, so the copy is consistent.
    pub fn snapshot(&self, id: &str, snapshot: &str) -> Result<SnapshotFile, VolumeError> {
        check_id(id)?;
        check_id(snapshot)?;
        let _guard = self.guard();
        let image = self.image(id);
        if !image.exists() {
            return Err(VolumeError::NotFound(id.to_string()));
        }
        private_dir(&self.snapshots_dir())?;
        let target = self.mount_point(id);
        let frozen = block_image::is_mount_point(&target)
            && fsfreeze(&target, true)
                .map_err(|e| VolumeError::Failed(format!("freezing volume {id}: {e}")))
                .is_ok();
        let written = self.write_snapshot(id, snapshot, &image);
        if frozen && let Err(err) = fsfreeze(&target, false) {
            tracing::error!(volume = id, error = %err, "thawing a volume after its snapshot");
        }
        written
    }

    fn write_snapshot(
        &self,
        id: &str,
        snapshot: &str,
        image: &Path,
    ) -> Result<SnapshotFile, VolumeError> {
        use sha2::Digest;
        let partial = self.snapshots_dir().join(format!("{snapshot}.partial"));
        let result = (|| -> std::io::Result<(u64, String, u64)> {
            let mut input = std::fs::File::open(image)?;
            let volume_size = input.metadata()?.len();
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&partial)?;
            let mut encoder = zstd::Encoder::new(file, 3)?;
            std::io::copy(&mut input, &mut encoder)?;
            let file = encoder.finish()?;
            file.sync_all()?;
            let mut hasher = sha2::Sha256::new();
            std::io::copy(&mut std::fs::File::open(&partial)?, &mut hasher)?;
            let size = std::fs::metadata(&partial)?.len();
            std::fs::rename(&partial, self.snapshot_file(snapshot))?;
            Ok((
                size,
                format!("sha256:{}", hex(&hasher.finalize())),
                volume_size,
            ))
        })();
        let (size, digest, volume_size) = result.map_err(|e| {
            let _ = std::fs::remove_file(&partial);
            VolumeError::Failed(format!("taking snapshot {snapshot} of volume {id}: {e}"))
        })?;
        let record = SnapshotFile {
            id: snapshot.to_string(),
            volume: id.to_string(),
            size,
            volume_size,
            digest,
            encrypted: self.encrypted_marker(id).exists(),
        };
        let meta = self.snapshots_dir().join(format!("{snapshot}.json"));
        std::fs::write(&meta, serde_json::to_vec(&record).unwrap_or_default())
            .map_err(failed(format!("recording snapshot {snapshot}")))?;
        tracing::info!(volume = id, snapshot, size, "snapshot taken");
        Ok(record)
    }

    /// Makes volume `id` from a snapshot taken here, after checking its checksum; it is
    /// grown to `size_gb` when that is larger than the snapshot's volume.
    pub fn restore(
        &self,
        id: &str,
        snapshot: &str,
        size_gb: u64,
    ) -> Result<VolumeDisk, VolumeError> {
        self.restore_with_key(id, snapshot, size_gb, None)
    }

    /// [`Volumes::restore`], with the volume's key (a microVM host reads an encrypted
    /// volume's counts through it).
    pub fn restore_with_key(
        &self,
        id: &str,
        snapshot: &str,
        size_gb: u64,
        key: Option<&[u8]>,
    ) -> Result<VolumeDisk, VolumeError> {
        use sha2::Digest;
        check_id(id)?;
        check_id(snapshot)?;
        {
            let _guard = self.guard();
            let image = self.image(id);
            if image.exists() {
                return Err(VolumeError::Conflict(format!(
                    "volume {id} exists here already"
                )));
            }
            let meta = std::fs::read(self.snapshots_dir().join(format!("{snapshot}.json")))
                .map_err(|_| VolumeError::NotFound(format!("snapshot {snapshot}")))?;
            let record: SnapshotFile = serde_json::from_slice(&meta)
                .map_err(|e| VolumeError::Failed(format!("snapshot {snapshot}: {e}")))?;
            let file = self.snapshot_file(snapshot);
            let mut hasher = sha2::Sha256::new();
            std::io::copy(
                &mut std::fs::File::open(&file).map_err(failed(format!("snapshot {snapshot}")))?,
                &mut hasher,
            )
            .map_err(failed(format!("reading snapshot {snapshot}")))?;
            if format!("sha256:{}", hex(&hasher.finalize())) != record.digest {
                return Err(VolumeError::Failed(format!(
                    "snapshot {snapshot} is damaged: its checksum does not match {}",
                    record.digest
                )));
            }
            if self.as_disks && size_gb.saturating_mul(GIB) > record.volume_size {
                return Err(VolumeError::BadRequest(format!(
                    "invalid size_gb: {size_gb} is larger than snapshot {snapshot}'s volume; microVM volumes are restored at their snapshot's size on this host"
                )));
            }
            let partial = self.dir.join(format!("{id}.ext4.partial"));
            let size = record.volume_size.max(size_gb.saturating_mul(GIB));
            if block_image::check_room(&self.dir, size).is_err() {
                return Err(self.no_room(&format!("volume {id} restored from snapshot {snapshot}")));
            }
            let written = (|| -> std::io::Result<()> {
                use std::io::{Seek, SeekFrom};
                let mut decoder = zstd::Decoder::new(std::fs::File::open(&file)?)?;
                let mut output = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&partial)?;
                // Zero blocks are skipped rather than written; the host's blocks for them
                // are reserved below, as for any volume.
                let mut block = vec![0u8; 64 * 1024];
                loop {
                    let mut filled = 0;
                    while filled < block.len() {
                        let n = decoder.read(&mut block[filled..])?;
                        if n == 0 {
                            break;
                        }
                        filled += n;
                    }
                    if filled == 0 {
                        break;
                    }
                    if block[..filled].iter().all(|b| *b == 0) {
                        output.seek(SeekFrom::Current(filled as i64))?;
                    } else {
                        output.write_all(&block[..filled])?;
                    }
                    if filled < block.len() {
                        break;
                    }
                }
                output.set_len(size)?;
                block_image::preallocate(&output, 0, size)?;
                output.sync_all()?;
                Ok(())
            })();
            if let Err(e) = written {
                let _ = std::fs::remove_file(&partial);
                if e.raw_os_error() == Some(libc::ENOSPC) {
                    return Err(
                        self.no_room(&format!("volume {id} restored from snapshot {snapshot}"))
                    );
                }
                return Err(VolumeError::Failed(format!(
                    "restoring snapshot {snapshot} into volume {id}: {e}"
                )));
            }
            if record.encrypted {
                std::fs::write(self.encrypted_marker(id), b"")
                    .map_err(failed(format!("marking volume {id} encrypted")))?;
            }
            std::fs::rename(&partial, &image).map_err(failed(format!("storing volume {id}")))?;
            if size_gb.saturating_mul(GIB) > record.volume_size {
                self.resize_offline(id)?;
            }
            tracing::info!(volume = id, snapshot, "volume restored from a snapshot");
        }
        self.status_with_key(id, key)
    }

    /// Deletes a snapshot's files.
    pub fn delete_snapshot(&self, snapshot: &str) -> Result<(), VolumeError> {
        check_id(snapshot)?;
        let file = self.snapshot_file(snapshot);
        if !file.exists() {
            return Err(VolumeError::NotFound(format!("snapshot {snapshot}")));
        }
        std::fs::remove_file(&file).map_err(failed(format!("deleting snapshot {snapshot}")))?;
        let _ = std::fs::remove_file(self.snapshots_dir().join(format!("{snapshot}.json")));
        Ok(())
    }

    /// Makes volume `id` a copy of volume `source` (a fork): a snapshot restored, then
    /// the snapshot removed.
    pub fn fork(&self, id: &str, source: &str, size_gb: u64) -> Result<VolumeDisk, VolumeError> {
        self.fork_with_key(id, source, size_gb, None)
    }

    /// [`Volumes::fork`], with the volume's key (see [`Volumes::restore_with_key`]).
    pub fn fork_with_key(
        &self,
        id: &str,
        source: &str,
        size_gb: u64,
        key: Option<&[u8]>,
    ) -> Result<VolumeDisk, VolumeError> {
        check_id(id)?;
        let snapshot = format!("{id}_fork");
        self.snapshot(source, &snapshot)?;
        let restored = self.restore_with_key(id, &snapshot, size_gb, key);
        let _ = std::fs::remove_file(self.snapshot_file(&snapshot));
        let _ = std::fs::remove_file(self.snapshots_dir().join(format!("{snapshot}.json")));
        restored
    }

    /// Unmounts one volume and detaches its loop devices. The caller holds the lock.
    fn release(&self, id: &str) {
        let target = self.mount_point(id);
        if let Err(err) = block_image::unmount(&target) {
            tracing::warn!(volume = id, error = %err, "unmounting a volume");
        }
        let image = self.image(id);
        for device in block_image::loop_devices_under(&image) {
            if device.backing_file != image {
                continue;
            }
            if let Err(err) = block_image::release(&device) {
                tracing::warn!(volume = id, error = %err, "detaching a volume's loop device");
            }
        }
    }

    /// Unmounts every volume (the host stops): nothing stays mounted or attached.
    pub fn release_all(&self) {
        let _guard = self.guard();
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(id) = name.strip_suffix(".ext4") {
                self.release(id);
            }
        }
    }

    /// The volumes a machine mounts, each mounted on the host and ready to bind.
    pub fn mounts_for(
        &self,
        spec: &MachineSpec,
        keys: &std::collections::HashMap<String, Vec<u8>>,
    ) -> Result<Vec<VolumeMount>, VolumeError> {
        let _guard = self.guard();
        let mut mounts = Vec::new();
        for (i, mount) in spec.config.mounts.iter().enumerate() {
            if mount.volume.is_empty() {
                continue;
            }
            check_id(&mount.volume)?;
            if self.as_disks {
                mounts.push(self.vm_disk(spec, i, &mount.volume, &mount.path, keys)?);
                continue;
            }
            if self.pending_resize(&mount.volume).exists() {
                // Its machine is starting, so nothing else should hold the filesystem.
                self.resize_if_unused(&mount.volume)?;
            }
            let key = keys.get(&mount.volume).map(Vec::as_slice);
            let source = self.unlock(&mount.volume, key).map_err(|e| match e {
                VolumeError::NotFound(id) => VolumeError::NotFound(format!(
                    "{id} (mounts[{i}].volume of machine {})",
                    spec.id
                )),
                other => other,
            })?;
            self.hand_to_machine_root(&source)?;
            mounts.push(VolumeMount {
                volume: mount.volume.clone(),
                source,
                destination: mount.path.clone(),
                vm_disk: None,
            });
        }
        Ok(mounts)
    }

    /// The volume as a microVM's disk: checked to be a format microVMs open, not in use
    /// on the host, with its key when it is LUKS. The caller holds the lock.
    fn vm_disk(
        &self,
        spec: &MachineSpec,
        index: usize,
        id: &str,
        destination: &str,
        keys: &std::collections::HashMap<String, Vec<u8>>,
    ) -> Result<VolumeMount, VolumeError> {
        let format = self.check_usable_here(id).map_err(|e| match e {
            VolumeError::NotFound(id) => VolumeError::NotFound(format!(
                "{id} (mounts[{index}].volume of machine {})",
                spec.id
            )),
            other => other,
        })?;
        let image = self.image(id);
        // A mount left by an earlier run as a container host goes first; an image still
        // attached to a loop device is in use and is not handed to a VM as well.
        self.release(id);
        if block_image::loop_devices_under(&image)
            .iter()
            .any(|d| d.backing_file == image)
        {
            return Err(VolumeError::Conflict(format!(
                "volume {id} is still attached to a loop device on this host; it cannot be a microVM's disk while it is"
            )));
        }
        let passphrase = match format {
            DiskFormat::Luks => Some(vm_volume::passphrase(keys.get(id).ok_or_else(|| {
                VolumeError::Failed(format!(
                    "volume {id} is encrypted and its key was not available"
                ))
            })?)),
            _ => None,
        };
        Ok(VolumeMount {
            volume: id.to_string(),
            source: image.clone(),
            destination: destination.to_string(),
            vm_disk: Some(VmDisk {
                volume: id.to_string(),
                image,
                passphrase,
                destination: destination.to_string(),
            }),
        })
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Freezes (or thaws) the filesystem mounted at `mount`: writes wait while it is frozen.
fn fsfreeze(mount: &Path, freeze: bool) -> std::io::Result<()> {
    // <linux/fs.h>: FIFREEZE _IOWR('X', 119, int), FITHAW _IOWR('X', 120, int).
    const FIFREEZE: libc::c_ulong = 0xC004_5877;
    const FITHAW: libc::c_ulong = 0xC004_5878;
    let dir = std::fs::File::open(mount)?;
    let request = if freeze { FIFREEZE } else { FITHAW };
    // SAFETY: both take an ignored int argument.
    if unsafe { libc::ioctl(dir.as_raw_fd(), request as _, 0) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// ext4 encryption's ioctls (`<linux/fscrypt.h>`), v2 policies: the key goes into the
/// filesystem's own keyring, so every process using the mount (the machine's) sees the
/// files, and it goes away with the filesystem.
mod fscrypt {
    use std::os::fd::AsRawFd;
    use std::path::Path;

    const FS_IOC_ADD_ENCRYPTION_KEY: libc::c_ulong = 0xC050_6617;
    const FS_IOC_SET_ENCRYPTION_POLICY: libc::c_ulong = 0x800C_6613;
    const KEY_SPEC_TYPE_IDENTIFIER: u32 = 2;
    const POLICY_V2: u8 = 2;
    const MODE_AES_256_XTS: u8 = 1;
    const MODE_AES_256_CTS: u8 = 4;
    const FLAGS_PAD_32: u8 = 0x03;
    pub const KEY_SIZE: usize = 64;

    #[repr(C)]
    struct AddKeyArg {
        spec_type: u32,
        spec_reserved: u32,
        identifier: [u8; 32],
        raw_size: u32,
        key_id: u32,
        reserved: [u32; 8],
        raw: [u8; KEY_SIZE],
    }

    #[repr(C)]
    struct PolicyV2 {
        version: u8,
        contents_mode: u8,
        filenames_mode: u8,
        flags: u8,
        reserved: [u8; 4],
        identifier: [u8; 16],
    }

    /// Adds `key` to the keyring of the filesystem mounted at `mount`; returns its
    /// identifier. Adding a key that is there already is fine.
    pub fn add_key(mount: &Path, key: &[u8]) -> std::io::Result<[u8; 16]> {
        if key.len() != KEY_SIZE {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("a volume key has {KEY_SIZE} bytes, not {}", key.len()),
            ));
        }
        let dir = std::fs::File::open(mount)?;
        let mut arg = AddKeyArg {
            spec_type: KEY_SPEC_TYPE_IDENTIFIER,
            spec_reserved: 0,
            identifier: [0; 32],
            raw_size: KEY_SIZE as u32,
            key_id: 0,
            reserved: [0; 8],
            raw: [0; KEY_SIZE],
        };
        arg.raw.copy_from_slice(key);
        // SAFETY: the kernel reads `struct fscrypt_add_key_arg` followed by `raw_size`
        // bytes of key, all inside `arg`, and writes the identifier back into it.
        let result =
            unsafe { libc::ioctl(dir.as_raw_fd(), FS_IOC_ADD_ENCRYPTION_KEY as _, &mut arg) };
        arg.raw.fill(0);
        if result < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut identifier = [0u8; 16];
        identifier.copy_from_slice(&arg.identifier[..16]);
        Ok(identifier)
    }

    /// Makes the empty directory `dir` encrypted under the key `identifier` names.
    pub fn set_policy(dir: &Path, identifier: &[u8; 16]) -> std::io::Result<()> {
        let handle = std::fs::File::open(dir)?;
        let policy = PolicyV2 {
            version: POLICY_V2,
            contents_mode: MODE_AES_256_XTS,
            filenames_mode: MODE_AES_256_CTS,
            flags: FLAGS_PAD_32,
            reserved: [0; 4],
            identifier: *identifier,
        };
        // SAFETY: the kernel reads a `struct fscrypt_policy_v2` we own for the call.
        if unsafe {
            libc::ioctl(
                handle.as_raw_fd(),
                FS_IOC_SET_ENCRYPTION_POLICY as _,
                &policy,
            )
        } < 0
        {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

/// A new random volume key.
#[cfg(test)]
fn new_key() -> Vec<u8> {
    let mut key = vec![0u8; fscrypt::KEY_SIZE];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut key);
    key
}

fn run_e2fs(program: &str, args: &[&std::ffi::OsStr]) -> Result<(), String> {
    let output = std::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("running {program} (is e2fsprogs installed?): {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn root() -> bool {
        nix::unistd::Uid::effective().is_root() && Path::new("/dev/loop-control").exists()
    }

    #[test]
    fn a_volume_is_a_private_preallocated_ext4_that_grows_and_goes() {
        if !root() {
            aloft_testkit::skip("needs root and loop devices");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let volumes = Volumes::new(&dir.path().join("volumes")).unwrap();
        let disk = volumes.create("vol_test1", 1, None).unwrap();
        assert_eq!(disk.size_bytes, GIB);
        assert!(disk.blocks > 0 && disk.blocks_avail > 0 && disk.block_size == 4096);
        let image = dir.path().join("volumes/vol_test1.ext4");
        let meta = std::fs::metadata(&image).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert!(
            meta.blocks() * 512 >= GIB,
            "the host's blocks are reserved for the whole volume"
        );
        let dir_mode = std::fs::metadata(dir.path().join("volumes"))
            .unwrap()
            .mode();
        assert_eq!(dir_mode & 0o777, 0o700);
        // Asking again answers the same volume; another size is refused.
        assert_eq!(
            volumes.create("vol_test1", 1, None).unwrap().blocks,
            disk.blocks
        );
        assert!(matches!(
            volumes.create("vol_test1", 2, None),
            Err(VolumeError::Conflict(_))
        ));
        std::fs::write(dir.path().join("volumes/mnt/vol_test1/kept"), "data").unwrap();
        // Released (a host stop) and mounted again: the file is there.
        volumes.release_all();
        assert!(!block_image::is_mount_point(
            &dir.path().join("volumes/mnt/vol_test1")
        ));
        volumes.status("vol_test1").unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join("volumes/mnt/vol_test1/kept")).unwrap(),
            "data"
        );
        let grown = volumes.extend("vol_test1", 2, false).unwrap();
        assert_eq!(grown.size_bytes, 2 * GIB);
        assert!(!grown.needs_restart);
        assert!(grown.blocks > disk.blocks * 3 / 2, "{grown:?} vs {disk:?}");
        assert!(
            std::fs::metadata(&image).unwrap().blocks() * 512 >= 2 * GIB,
            "the grown part is reserved too"
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join("volumes/mnt/vol_test1/kept")).unwrap(),
            "data"
        );
        assert!(matches!(
            volumes.extend("vol_test1", 1, false),
            Err(VolumeError::BadRequest(_))
        ));
        assert!(matches!(
            volumes.destroy("vol_test1", Some("m1")),
            Err(VolumeError::Conflict(_))
        ));
        volumes.destroy("vol_test1", None).unwrap();
        assert!(!image.exists());
        assert!(matches!(
            volumes.status("vol_test1"),
            Err(VolumeError::NotFound(_))
        ));
    }

    /// Whether `needle` appears anywhere in the file at `path`.
    fn file_contains(path: &Path, needle: &[u8]) -> bool {
        use std::io::Read;
        let mut file = std::fs::File::open(path).unwrap();
        let mut buffer = vec![0u8; 1 << 20];
        let mut carry: Vec<u8> = Vec::new();
        loop {
            let n = file.read(&mut buffer).unwrap();
            if n == 0 {
                return false;
            }
            let mut window = std::mem::take(&mut carry);
            window.extend_from_slice(&buffer[..n]);
            if window.windows(needle.len()).any(|w| w == needle) {
                return true;
            }
            carry = window[window.len().saturating_sub(needle.len())..].to_vec();
        }
    }

    #[test]
    fn an_encrypted_volume_holds_only_ciphertext_at_rest() {
        if !root() {
            aloft_testkit::skip("needs root and loop devices");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let volumes = Volumes::new(&dir.path().join("volumes")).unwrap();
        let key = new_key();
        volumes.create("vol_secret", 1, Some(&key)).unwrap();
        volumes.create("vol_plain", 1, None).unwrap();
        assert!(volumes.is_encrypted("vol_secret") && !volumes.is_encrypted("vol_plain"));
        let spec = |volume: &str| MachineSpec {
            id: "m1".into(),
            config: aloft_api::MachineConfig {
                mounts: vec![aloft_api::MachineMount {
                    volume: volume.into(),
                    path: "/data".into(),
                    ..Default::default()
                }],
                ..Default::default()
            },
            ..Default::default()
        };
        use std::collections::HashMap;
        let keys = HashMap::from([("vol_secret".to_string(), key.clone())]);
        let needle = b"a-recognisable-secret-line-0123456789";
        for volume in ["vol_secret", "vol_plain"] {
            let mounts = volumes.mounts_for(&spec(volume), &keys).unwrap();
            std::fs::write(mounts[0].source.join("kept"), needle).unwrap();
            std::fs::File::open(mounts[0].source.join("kept"))
                .unwrap()
                .sync_all()
                .unwrap();
        }
        volumes.release_all();
        let image = |v: &str| dir.path().join(format!("volumes/{v}.ext4"));
        assert!(
            file_contains(&image("vol_plain"), needle),
            "the probe works"
        );
        assert!(
            !file_contains(&image("vol_secret"), needle),
            "an encrypted volume's image holds no plaintext"
        );
        // A snapshot restores into a new volume, encrypted with the same key.
        let taken = volumes.snapshot("vol_secret", "vs_one").unwrap();
        assert!(taken.encrypted && taken.digest.starts_with("sha256:"));
        assert!(taken.size < GIB / 16, "compressed: {taken:?}");
        volumes.restore("vol_copy", "vs_one", 2).unwrap();
        let copy = volumes
            .mounts_for(
                &spec("vol_copy"),
                &HashMap::from([("vol_copy".to_string(), key.clone())]),
            )
            .unwrap();
        assert_eq!(
            std::fs::read(copy[0].source.join("kept")).unwrap(),
            needle.to_vec()
        );
        assert!(
            volumes.status("vol_copy").unwrap().blocks
                > volumes.status("vol_secret").unwrap().blocks * 3 / 2
        );
        assert!(matches!(
            volumes.restore("vol_copy", "vs_one", 2),
            Err(VolumeError::Conflict(_))
        ));
        // Without its key the volume does not start; with it, the data is back.
        assert!(
            volumes
                .mounts_for(&spec("vol_secret"), &Default::default())
                .is_err()
        );
        let mounts = volumes.mounts_for(&spec("vol_secret"), &keys).unwrap();
        assert_eq!(
            std::fs::read(mounts[0].source.join("kept")).unwrap(),
            needle.to_vec()
        );
        volumes.release_all();
    }

    #[test]
    fn a_volume_made_for_one_driver_is_refused_by_the_other_untouched() {
        if !root()
            || std::process::Command::new("qemu-img")
                .arg("--version")
                .output()
                .is_err()
        {
            aloft_testkit::skip("needs root, loop devices and qemu-img");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("volumes");
        let key = new_key();
        let vm_host = Volumes::new(&path).unwrap().as_disks(true);
        let container_host = Volumes::new(&path).unwrap();
        // A microVM host's encrypted volume: a LUKS image, its counts read through it.
        let disk = vm_host.create("vol_luks", 1, Some(&key)).unwrap();
        assert_eq!(disk.size_bytes, GIB);
        assert!(disk.blocks * disk.block_size > GIB * 9 / 10, "{disk:?}");
        assert!(disk.blocks_avail > disk.blocks * 9 / 10, "{disk:?}");
        assert!(vm_host.is_encrypted("vol_luks") && vm_host.needs_key_for_status("vol_luks"));
        let image = path.join("vol_luks.ext4");
        assert!(std::fs::metadata(&image).unwrap().blocks() * 512 >= GIB);
        assert_eq!(std::fs::metadata(&image).unwrap().mode() & 0o777, 0o600);
        // Asking again answers the same volume.
        assert_eq!(
            vm_host.create("vol_luks", 1, Some(&key)).unwrap().blocks,
            disk.blocks
        );
        let before = std::fs::read(&image).unwrap();
        let spec = |volume: &str| MachineSpec {
            id: "m1".into(),
            config: aloft_api::MachineConfig {
                mounts: vec![aloft_api::MachineMount {
                    volume: volume.into(),
                    path: "/data".into(),
                    ..Default::default()
                }],
                ..Default::default()
            },
            ..Default::default()
        };
        use std::collections::HashMap;
        let keys = |v: &str| HashMap::from([(v.to_string(), key.clone())]);
        for err in [
            container_host.status("vol_luks").unwrap_err(),
            container_host
                .mounts_for(&spec("vol_luks"), &keys("vol_luks"))
                .unwrap_err(),
        ] {
            assert!(
                err.to_string().contains("made on a microVM host")
                    && err.to_string().contains("--driver microvm"),
                "{err}"
            );
        }
        assert!(
            std::fs::read(&image).unwrap() == before,
            "the LUKS image is untouched"
        );
        // A container host's encrypted volume (ext4 encryption) is refused by a VM host.
        container_host.create("vol_fscrypt", 1, Some(&key)).unwrap();
        container_host.release_all();
        let err = vm_host
            .mounts_for(&spec("vol_fscrypt"), &keys("vol_fscrypt"))
            .unwrap_err();
        assert!(
            err.to_string().contains("made on a container host"),
            "{err}"
        );
        // The VM host hands its volume over as a disk with its passphrase, unmounted.
        let mounts = vm_host
            .mounts_for(&spec("vol_luks"), &keys("vol_luks"))
            .unwrap();
        let disk = mounts[0].vm_disk.as_ref().unwrap();
        assert_eq!(disk.image, image);
        assert_eq!(
            disk.passphrase.as_deref(),
            Some(vm_volume::passphrase(&key).as_str())
        );
        assert!(!block_image::is_mount_point(&path.join("mnt/vol_luks")));
        // Without its key it does not start.
        assert!(
            vm_host
                .mounts_for(&spec("vol_luks"), &HashMap::new())
                .is_err()
        );
        // A snapshot restores into a LUKS volume opened by the same key, at its size.
        let taken = vm_host.snapshot("vol_luks", "vs_luks").unwrap();
        assert!(taken.encrypted);
        let restored = vm_host
            .restore_with_key("vol_luks2", "vs_luks", 1, Some(&key))
            .unwrap();
        assert_eq!(
            restored.blocks,
            vm_host
                .status_with_key("vol_luks", Some(&key))
                .unwrap()
                .blocks
        );
        assert_eq!(
            vm_volume::detect(&path.join("vol_luks2.ext4")).unwrap(),
            DiskFormat::Luks
        );
        assert!(matches!(
            vm_host.restore_with_key("vol_luks3", "vs_luks", 2, Some(&key)),
            Err(VolumeError::BadRequest(_))
        ));
        assert!(!path.join("vol_luks3.ext4").exists());
        // Extending grows the image (the LUKS payload) at once, the filesystem at the
        // next start; shrinking is refused.
        let grown = vm_host
            .extend_with_key("vol_luks", 2, false, Some(&key))
            .unwrap();
        assert_eq!(grown.size_bytes, 2 * GIB);
        assert!(grown.needs_restart);
        assert!(
            std::fs::metadata(&image).unwrap().blocks() * 512 >= 2 * GIB,
            "the grown part is reserved"
        );
        assert!(matches!(
            vm_host.extend_with_key("vol_luks", 1, false, Some(&key)),
            Err(VolumeError::BadRequest(_))
        ));
        // An unencrypted volume is plain ext4 for both.
        let plain = vm_host.create("vol_plain", 1, None).unwrap();
        assert!(plain.blocks * plain.block_size > GIB * 9 / 10);
        let mounts = vm_host
            .mounts_for(&spec("vol_plain"), &HashMap::new())
            .unwrap();
        assert!(mounts[0].vm_disk.as_ref().unwrap().passphrase.is_none());
        container_host.release_all();
    }

    #[test]
    fn ids_that_are_not_ids_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let volumes = Volumes::new(dir.path()).unwrap();
        for id in ["", "../x", "a/b", "vol x"] {
            assert!(matches!(
                volumes.status(id),
                Err(VolumeError::BadRequest(_))
            ));
        }
    }
}
