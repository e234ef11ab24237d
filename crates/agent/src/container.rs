//! The container driver: an OCI runtime (runc or crun) runs each machine from an overlay of
//! its image's cached layers, in the machine's own network namespace, under cgroup limits,
//! with the `aloft` binary bind-mounted as `/.fly/init` to be PID 1.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use aloft_api::MachineGuest;
use aloft_api::internal::InitConfig;
use serde_json::json;

use crate::images::PreparedImage;
use crate::network::MachineLink;
use crate::shim::cgroup_path;

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("no working OCI runtime: {0}")]
    NoRuntime(String),
    #[error("preparing the root filesystem: {0}")]
    Rootfs(String),
    #[error("starting the container: {0}")]
    Start(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> DriverError {
    let context = context.into();
    move |source| DriverError::Io { context, source }
}

pub struct ContainerDriver {
    runtime: PathBuf,
    runtime_root: PathBuf,
    aloft_binary: PathBuf,
}

/// Capabilities Docker grants a container by default.
const DEFAULT_CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")
        .unwrap_or_else(|| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

impl ContainerDriver {
    /// Picks the OCI runtime: `preferred` if given, else runc, else crun.
    pub fn new(state_dir: &Path, preferred: Option<&str>) -> Result<Self, DriverError> {
        let candidates: Vec<&str> = match preferred {
            Some(name) => vec![name],
            None => vec!["runc", "crun"],
        };
        let runtime = candidates
            .iter()
            .find_map(|name| {
                if name.contains('/') {
                    Some(PathBuf::from(name)).filter(|p| p.is_file())
                } else {
                    find_in_path(name)
                }
            })
            .ok_or_else(|| {
                DriverError::NoRuntime(format!(
                    "none of {} found; install runc (apt-get install runc)",
                    candidates.join(", ")
                ))
            })?;
        let aloft_binary = std::env::current_exe().map_err(io("finding the aloft binary"))?;
        let runtime_root = state_dir.join("runtime");
        std::fs::create_dir_all(&runtime_root)
            .map_err(io(format!("creating {}", runtime_root.display())))?;
        Ok(Self {
            runtime,
            runtime_root,
            aloft_binary,
        })
    }

    pub fn runtime_name(&self) -> String {
        self.runtime
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    fn runtime_command(&self) -> Command {
        let mut command = Command::new(&self.runtime);
        command.arg("--root").arg(&self.runtime_root);
        command
    }

    /// Mounts a fresh overlay of the image's layers at `machine_dir/rootfs` (the root
    /// filesystem is rebuilt from the image on every start).
    pub fn prepare_rootfs(
        &self,
        machine_dir: &Path,
        image: &PreparedImage,
    ) -> Result<PathBuf, DriverError> {
        let rootfs = machine_dir.join("rootfs");
        let upper = machine_dir.join("upper");
        let work = machine_dir.join("work");
        unmount(&rootfs);
        for dir in [&upper, &work] {
            if dir.exists() {
                std::fs::remove_dir_all(dir).map_err(io(format!("clearing {}", dir.display())))?;
            }
        }
        for dir in [&rootfs, &upper, &work] {
            std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
        }
        if image.layers.is_empty() {
            return Err(DriverError::Rootfs(format!(
                "image {} has no layers",
                image.reference
            )));
        }
        // overlayfs lists lower directories top first.
        let lower: Vec<String> = image
            .layers
            .iter()
            .rev()
            .map(|p| p.display().to_string())
            .collect();
        let options = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.join(":"),
            upper.display(),
            work.display()
        );
        nix::mount::mount(
            Some("overlay"),
            &rootfs,
            Some("overlay"),
            nix::mount::MsFlags::empty(),
            Some(options.as_str()),
        )
        .map_err(|e| {
            DriverError::Rootfs(format!("mounting overlay at {}: {e}", rootfs.display()))
        })?;
        Ok(rootfs)
    }

    /// Writes the OCI bundle's config.json.
    pub fn write_bundle(
        &self,
        machine_dir: &Path,
        container_id: &str,
        hostname: &str,
        rootfs: &Path,
        link: &MachineLink,
        guest: &MachineGuest,
    ) -> Result<(), DriverError> {
        let bundle = machine_dir.join("bundle");
        std::fs::create_dir_all(&bundle).map_err(io(format!("creating {}", bundle.display())))?;
        let spec = oci_spec(
            container_id,
            hostname,
            rootfs,
            &self.aloft_binary,
            link,
            guest,
        );
        let text =
            serde_json::to_vec_pretty(&spec).map_err(|e| DriverError::Start(e.to_string()))?;
        std::fs::write(bundle.join("config.json"), text).map_err(io("writing config.json"))
    }

    /// Starts the machine's shim and waits until the container runs. Returns the shim's pid.
    pub fn launch(
        &self,
        machine_dir: &Path,
        container_id: &str,
        init: &InitConfig,
    ) -> Result<i32, DriverError> {
        let mut command = Command::new(&self.aloft_binary);
        command
            .arg("shim")
            .arg(machine_dir)
            .arg(&self.runtime)
            .arg(&self.runtime_root)
            .arg(container_id)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        unsafe {
            // Its own session, so signals aimed at the agent's process group miss it.
            command.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let mut child = command.spawn().map_err(io("spawning the machine shim"))?;
        let config = serde_json::to_vec(init).map_err(|e| DriverError::Start(e.to_string()))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(&config)
                .map_err(io("handing the init config to the shim"))?;
        }
        let mut report = String::new();
        if let Some(stdout) = child.stdout.take() {
            let _ = BufReader::new(stdout).read_line(&mut report);
        }
        let pid = child.id() as i32;
        // The shim stays our child until we exit; reap it whenever it ends.
        std::thread::spawn(move || {
            let _ = child.wait();
        });
        let report = report.trim();
        if report.starts_with("started ") {
            Ok(pid)
        } else if let Some(reason) = report.strip_prefix("error ") {
            Err(DriverError::Start(reason.to_string()))
        } else {
            Err(DriverError::Start(
                "the machine shim exited without starting the container".into(),
            ))
        }
    }

    pub fn signal(&self, container_id: &str, signal: &str) -> Result<(), DriverError> {
        let output = self
            .runtime_command()
            .args(["kill", container_id, signal])
            .output()
            .map_err(io(format!("running {} kill", self.runtime.display())))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(DriverError::Start(format!(
                "{} kill {signal}: {}",
                self.runtime_name(),
                String::from_utf8_lossy(&output.stderr).trim()
            )))
        }
    }

    /// Removes what a run left: the container, the overlay mount and its upper layer.
    pub fn cleanup(&self, machine_dir: &Path, container_id: &str) {
        let _ = self
            .runtime_command()
            .args(["delete", "--force", container_id])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        unmount(&machine_dir.join("rootfs"));
        let _ = std::fs::remove_dir_all(machine_dir.join("upper"));
        let _ = std::fs::remove_dir_all(machine_dir.join("work"));
    }
}

fn unmount(path: &Path) {
    for _ in 0..3 {
        if nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH).is_err() {
            break;
        }
    }
}

/// CPU quota and shares for a guest: `performance` CPUs are whole cores; `shared` CPUs
/// get the same ceiling but a smaller share under contention.
fn cpu_resources(guest: &MachineGuest) -> serde_json::Value {
    let cpus = u64::from(guest.cpus.max(1));
    let shares = if guest.cpu_kind == "performance" {
        1024 * cpus
    } else {
        128 * cpus
    };
    json!({ "shares": shares, "quota": (cpus * 100_000) as i64, "period": 100_000 })
}

fn oci_spec(
    container_id: &str,
    hostname: &str,
    rootfs: &Path,
    aloft_binary: &Path,
    link: &MachineLink,
    guest: &MachineGuest,
) -> serde_json::Value {
    let memory_bytes = u64::from(guest.memory_mb.max(64)) * 1024 * 1024;
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": { "uid": 0, "gid": 0 },
            "args": ["/.fly/init"],
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "cwd": "/",
            "capabilities": {
                "bounding": DEFAULT_CAPABILITIES,
                "effective": DEFAULT_CAPABILITIES,
                "permitted": DEFAULT_CAPABILITIES,
            },
            "rlimits": [{ "type": "RLIMIT_NOFILE", "hard": 10240, "soft": 10240 }],
            "noNewPrivileges": false
        },
        "root": { "path": rootfs, "readonly": false },
        "hostname": hostname,
        "mounts": [
            { "destination": "/proc", "type": "proc", "source": "proc" },
            { "destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"] },
            { "destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"] },
            { "destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"] },
            { "destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"] },
            { "destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"] },
            { "destination": "/.fly/init", "type": "bind", "source": aloft_binary, "options": ["bind", "ro"] }
        ],
        "linux": {
            "namespaces": [
                { "type": "pid" },
                { "type": "ipc" },
                { "type": "uts" },
                { "type": "mount" },
                { "type": "network", "path": link.netns_path() }
            ],
            "cgroupsPath": cgroup_path(container_id),
            "resources": {
                "devices": [{ "allow": false, "access": "rwm" }],
                "memory": { "limit": memory_bytes },
                "cpu": cpu_resources(guest)
            },
            "maskedPaths": [
                "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
                "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware"
            ],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
        }
    })
}

/// How long to wait between checks for a stopping machine.
pub const STOP_POLL: Duration = Duration::from_millis(20);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_carries_limits_namespace_and_init() {
        let link = MachineLink::for_machine("0123456789abcd", 3).unwrap();
        let guest = MachineGuest {
            cpu_kind: "shared".into(),
            cpus: 2,
            memory_mb: 512,
            ..Default::default()
        };
        let spec = oci_spec(
            "0123456789abcd",
            "0123456789abcd",
            Path::new("/r"),
            Path::new("/usr/bin/aloft"),
            &link,
            &guest,
        );
        assert_eq!(
            spec["linux"]["resources"]["memory"]["limit"],
            512 * 1024 * 1024
        );
        assert_eq!(spec["linux"]["resources"]["cpu"]["quota"], 200_000);
        assert_eq!(
            spec["linux"]["namespaces"][4]["path"],
            "/run/netns/aloft-0123456789abcd"
        );
        assert_eq!(spec["process"]["args"][0], "/.fly/init");
        assert_eq!(spec["mounts"][6]["source"], "/usr/bin/aloft");
    }
}
