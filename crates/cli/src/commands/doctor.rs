//! `aloft doctor`: whether this host has what `aloft server` needs, and how to get what
//! is missing (Debian package names). Also the cgroup check `aloft server` makes at start.

use std::path::{Path, PathBuf};

use crate::commands::server::default_data_dir;

#[derive(clap::Args, Debug)]
pub struct DoctorArgs {
    /// The data dir whose free disk space is checked.
    #[arg(long, env = "ALOFT_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
}

/// Below this much free space in the data dir, images and machines will not fit.
const MIN_FREE_BYTES: u64 = 2 << 30;
/// Below this much, the check warns.
const LOW_FREE_BYTES: u64 = 10 << 30;

/// The controllers the agent limits machines with.
const CGROUP_CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];

const CGROUP_SUPER_MAGIC: i64 = 0x0027_e0eb;
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Ok,
    /// Works without it, less well (no microVMs, little disk).
    Warning,
    /// `aloft server` cannot run machines without it.
    Missing,
}

struct Check {
    name: &'static str,
    outcome: Outcome,
    detail: String,
}

impl Check {
    fn new(name: &'static str, outcome: Outcome, detail: impl Into<String>) -> Self {
        Check {
            name,
            outcome,
            detail: detail.into(),
        }
    }
}

/// Runs every check, prints one line each; the exit code is 1 when something required is
/// missing.
pub fn run(args: DoctorArgs) -> anyhow::Result<i32> {
    let data_dir = args.data_dir.unwrap_or_else(default_data_dir);
    println!(
        "Checking this host for `aloft server` (data dir {})",
        data_dir.display()
    );
    let checks = vec![
        oci_runtime(),
        program("buildah", "buildah", "builds images from Dockerfiles"),
        program("nft", "nftables", "machines' firewall"),
        program("ip", "iproute2", "machines' network links"),
        program("nsenter", "util-linux", "enters machines' namespaces"),
        program(
            "mkfs.ext4",
            "e2fsprogs",
            "machines' writable layers and volumes",
        ),
        cgroups(),
        tun(),
        kvm(),
        free_disk(&data_dir),
    ];
    for check in &checks {
        let mark = match check.outcome {
            Outcome::Ok => "✓",
            Outcome::Warning => "!",
            Outcome::Missing => "✘",
        };
        println!("{mark} {:<14} {}", check.name, check.detail);
    }
    let missing: Vec<&str> = checks
        .iter()
        .filter(|c| c.outcome == Outcome::Missing)
        .map(|c| c.name)
        .collect();
    if missing.is_empty() {
        println!("This host can run `aloft server`.");
        Ok(0)
    } else {
        eprintln!(
            "Error: this host lacks what `aloft server` needs: {}",
            missing.join(", ")
        );
        Ok(1)
    }
}

fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")
        .unwrap_or_else(|| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

fn program(name: &'static str, package: &str, what_for: &str) -> Check {
    match find_program(name) {
        Some(path) => Check::new(name, Outcome::Ok, path.display().to_string()),
        None => Check::new(
            name,
            Outcome::Missing,
            format!("`{name}` is not in PATH ({what_for}); install it: apt-get install {package}"),
        ),
    }
}

fn oci_runtime() -> Check {
    match ["runc", "crun"]
        .iter()
        .find_map(|name| find_program(name).map(|path| (name, path)))
    {
        Some((name, path)) => Check::new(
            "OCI runtime",
            Outcome::Ok,
            format!("{name} ({})", path.display()),
        ),
        None => Check::new(
            "OCI runtime",
            Outcome::Missing,
            "neither runc nor crun is in PATH (they run machines' containers); install one: apt-get install runc",
        ),
    }
}

fn filesystem_magic(path: &Path) -> Option<i64> {
    nix::sys::statfs::statfs(path)
        .ok()
        .map(|fs| fs.filesystem_type().0)
}

/// Whether the cgroup controllers machines are limited with are mounted (v1 under
/// /sys/fs/cgroup/<controller>, or a v2 hierarchy at /sys/fs/cgroup). They are not under
/// `ip netns exec`, which mounts a fresh /sys.
pub fn cgroups_visible() -> Result<String, String> {
    let root = Path::new("/sys/fs/cgroup");
    if filesystem_magic(root) == Some(CGROUP2_SUPER_MAGIC) {
        let controllers =
            std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
        let absent: Vec<&str> = CGROUP_CONTROLLERS
            .iter()
            .copied()
            .filter(|c| !controllers.split_whitespace().any(|have| have == *c))
            .collect();
        if !absent.is_empty() {
            return Err(format!(
                "the cgroup v2 hierarchy at /sys/fs/cgroup lacks the {} controller(s)",
                absent.join(", ")
            ));
        }
        return Ok("v2 at /sys/fs/cgroup".into());
    }
    let absent: Vec<&str> = CGROUP_CONTROLLERS
        .iter()
        .copied()
        .filter(|c| filesystem_magic(&root.join(c)) != Some(CGROUP_SUPER_MAGIC))
        .collect();
    if absent.is_empty() {
        Ok(format!(
            "v1 controllers {} under /sys/fs/cgroup",
            CGROUP_CONTROLLERS.join(", ")
        ))
    } else {
        Err(format!(
            "no cgroup mount found for {} under /sys/fs/cgroup",
            absent.join(", ")
        ))
    }
}

/// What to do when cgroups are not visible.
pub const CGROUPS_HINT: &str = "mount cgroups at /sys/fs/cgroup (systemd does; else `mount -t cgroup2 none /sys/fs/cgroup`); \
     to run in a network namespace, enter it with `nsenter --net=/run/netns/NAME` (not `ip netns exec`, which mounts a fresh /sys that hides cgroups)";

/// Whether a cgroup can be made where the agent makes machines' cgroups.
fn cgroup_writable() -> Result<(), String> {
    let root = Path::new("/sys/fs/cgroup");
    let parent = if filesystem_magic(root) == Some(CGROUP2_SUPER_MAGIC) {
        root.to_path_buf()
    } else {
        root.join("memory")
    };
    let probe = parent.join(format!("aloft-doctor-{}", std::process::id()));
    std::fs::create_dir(&probe).map_err(|e| format!("cannot create {}: {e}", probe.display()))?;
    std::fs::remove_dir(&probe).map_err(|e| format!("cannot remove {}: {e}", probe.display()))
}

fn cgroups() -> Check {
    match cgroups_visible() {
        Err(why) => Check::new(
            "cgroups",
            Outcome::Missing,
            format!("{why}; {CGROUPS_HINT}"),
        ),
        Ok(what) => match cgroup_writable() {
            Ok(()) => Check::new("cgroups", Outcome::Ok, format!("{what}, writable")),
            Err(why) => Check::new(
                "cgroups",
                Outcome::Missing,
                format!("{what}, but not writable: {why}; run `aloft server` as root"),
            ),
        },
    }
}

fn tun() -> Check {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::metadata("/dev/net/tun") {
        Ok(meta) if meta.file_type().is_char_device() => {
            Check::new("/dev/net/tun", Outcome::Ok, "present")
        }
        _ => Check::new(
            "/dev/net/tun",
            Outcome::Warning,
            "missing, so no microVMs (their tap devices need it); containers are unaffected. Load the tun module (`modprobe tun`) or create it: mkdir -p /dev/net && mknod /dev/net/tun c 10 200",
        ),
    }
}

/// KVM is optional: without it microVMs run under TCG emulation, containers are unaffected.
fn kvm() -> Check {
    const NAME: &str = "KVM";
    if !Path::new("/dev/kvm").exists() {
        return Check::new(
            NAME,
            Outcome::Warning,
            "/dev/kvm is missing: microVMs run under TCG emulation (slow); containers are unaffected. Enable virtualization (VT-x/AMD-V, nested on a VM) and load kvm_intel or kvm_amd",
        );
    }
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        return Check::new(
            NAME,
            Outcome::Warning,
            format!("/dev/kvm cannot be opened ({e}): run as root or join the kvm group"),
        );
    }
    let Some(qemu) = find_program("qemu-system-x86_64") else {
        return Check::new(
            NAME,
            Outcome::Warning,
            "/dev/kvm is present, but QEMU is not installed, so no microVMs: apt-get install qemu-system-x86 qemu-utils",
        );
    };
    let Some(kernel) = aloft_agent::microvm::assets::default_kernel() else {
        return Check::new(
            NAME,
            Outcome::Warning,
            "/dev/kvm is present, but there is no guest kernel in /boot, so no microVMs: apt-get install linux-image-cloud-amd64",
        );
    };
    let probe = aloft_agent::microvm::accel::kvm_boots(&qemu, &kernel);
    if probe.kvm_boots {
        Check::new(NAME, Outcome::Ok, format!("usable: {}", probe.detail))
    } else {
        Check::new(
            NAME,
            Outcome::Warning,
            format!(
                "/dev/kvm is present but not usable for microVMs ({}): they run under TCG emulation (slow); containers are unaffected",
                probe.detail
            ),
        )
    }
}

/// The nearest existing directory at or above `path`.
fn existing_ancestor(path: &Path) -> PathBuf {
    let mut current = path;
    loop {
        if current.is_dir() {
            return current.to_path_buf();
        }
        match current.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => current = parent,
            _ => return PathBuf::from("."),
        }
    }
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / f64::from(1u32 << 30))
}

fn free_disk(data_dir: &Path) -> Check {
    const NAME: &str = "free disk";
    let dir = existing_ancestor(data_dir);
    let stat = match nix::sys::statvfs::statvfs(&dir) {
        Ok(stat) => stat,
        Err(e) => {
            return Check::new(
                NAME,
                Outcome::Missing,
                format!("cannot read the free space of {}: {e}", dir.display()),
            );
        }
    };
    let free = stat.blocks_available() * stat.fragment_size();
    let text = format!("{} free in {}", gib(free), dir.display());
    if free < MIN_FREE_BYTES {
        Check::new(
            NAME,
            Outcome::Missing,
            format!(
                "{text}: images and machines need at least {}; free some space or pass --data-dir on a larger disk",
                gib(MIN_FREE_BYTES)
            ),
        )
    } else if free < LOW_FREE_BYTES {
        Check::new(
            NAME,
            Outcome::Warning,
            format!("{text}: little room for images and machines"),
        )
    } else {
        Check::new(NAME, Outcome::Ok, text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_nearest_existing_directory_is_measured() {
        let dir = tempfile::tempdir().unwrap();
        let deep = dir.path().join("a/b/c");
        assert_eq!(existing_ancestor(&deep), dir.path());
    }
}
