//! The container driver: an OCI runtime (runc or crun) runs each machine from an overlay of
//! its image's cached layers, in the machine's own network namespace, under cgroup limits
//! and a seccomp filter, with the `aloft` binary bind-mounted as `/.fly/init` to be PID 1.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use aloft_api::MachineGuest;
use aloft_api::internal::{InitConfig, ProcessStat};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::json;

use crate::driver::{
    Driver, DriverError, ExecCommand, ExecProcess, ResourceUsage, StartRequest, io,
};
use crate::images::PreparedImage;
use crate::network::MachineLink;
use crate::procfs;
use crate::unpack::IdShift;

pub struct ContainerDriver {
    runtime: PathBuf,
    runtime_root: PathBuf,
    /// The platform's data dir: the machine's root traverses from here to its rootfs.
    data_dir: PathBuf,
    aloft_binary: PathBuf,
    /// The OCI `linux.seccomp` section every container gets.
    seccomp: serde_json::Value,
}

/// Every container machine runs in a user namespace whose ids `0..65536` are host ids
/// from `1 << 30`: root in a machine is an unprivileged user on the host. All machines
/// share the range (see SECURITY.md).
pub const USER_NAMESPACE: IdShift = IdShift {
    base: 1 << 30,
    size: 65536,
};

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

/// The cgroup every machine's container lives in (under each controller).
pub fn cgroup_path(container_id: &str) -> String {
    format!("/aloft/{container_id}")
}

fn cgroup_file(controller: &str, container_id: &str, file: &str) -> PathBuf {
    Path::new("/sys/fs/cgroup")
        .join(controller)
        .join(cgroup_path(container_id).trim_start_matches('/'))
        .join(file)
}

fn read_number(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// How many processes the kernel's OOM killer killed in the container's memory cgroup.
pub fn oom_kills(container_id: &str) -> u64 {
    let Ok(text) =
        std::fs::read_to_string(cgroup_file("memory", container_id, "memory.oom_control"))
    else {
        return 0;
    };
    text.lines()
        .find_map(|line| {
            line.strip_prefix("oom_kill ")
                .and_then(|n| n.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// This host's memory in MB (`MemTotal`).
pub fn host_memory_mb() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb / 1024)
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
            data_dir: state_dir.parent().unwrap_or(state_dir).to_path_buf(),
            aloft_binary,
            seccomp: crate::seccomp::default_profile(
                DEFAULT_CAPABILITIES,
                crate::seccomp::kernel_version(),
            ),
        })
    }

    fn runtime_command(&self) -> Command {
        let mut command = Command::new(&self.runtime);
        command.arg("--root").arg(&self.runtime_root);
        command
    }

    fn run_runtime(&self, args: &[&str]) -> Result<(), DriverError> {
        let output = self
            .runtime_command()
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(io(format!("running {}", self.runtime.display())))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(DriverError::Operation(format!(
                "{} {}: {}",
                self.name(),
                args.join(" "),
                String::from_utf8_lossy(&output.stderr).trim()
            )))
        }
    }

    /// Mounts a fresh overlay of the image's layers at `machine_dir/rootfs` (the root
    /// filesystem is rebuilt from the image on every start), its writable layer in an
    /// ext4 image of `layer_bytes` (the machine's disk quota).
    pub fn prepare_rootfs(
        &self,
        machine_dir: &Path,
        image: &PreparedImage,
        layer_bytes: u64,
    ) -> Result<PathBuf, DriverError> {
        let rootfs = machine_dir.join("rootfs");
        unmount(&rootfs);
        std::fs::create_dir_all(&rootfs).map_err(io(format!("creating {}", rootfs.display())))?;
        open_to_machine_root(machine_dir, &self.data_dir)?;
        let (upper, work) = writable_layer(machine_dir, layer_bytes, LayerOwner::MACHINE_ROOT)?;
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

    /// Writes the OCI bundle's config.json for `request`, with its root at `rootfs`.
    fn write_bundle(&self, request: &StartRequest<'_>, rootfs: &Path) -> Result<(), DriverError> {
        let bundle = bundle_dir(request.machine_dir);
        std::fs::create_dir_all(&bundle).map_err(io(format!("creating {}", bundle.display())))?;
        let mut spec = oci_spec(
            request.machine_id,
            &request.init.hostname,
            rootfs,
            &self.aloft_binary,
            request.link,
            request.guest,
            &self.seccomp,
        );
        // After the runtime's own mounts, so nothing of the platform's is shadowed.
        if let Some(mounts) = spec["mounts"].as_array_mut() {
            mounts.extend(
                request
                    .volumes
                    .iter()
                    .map(crate::volumes::VolumeMount::oci_mount),
            );
        }
        let text = serde_json::to_vec(&spec).map_err(|e| DriverError::Start(e.to_string()))?;
        std::fs::write(bundle.join("config.json"), text).map_err(io("writing config.json"))
    }

    /// Starts the machine's shim and waits until the container runs. Returns the shim's pid.
    fn launch(
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
            tracing::debug!(machine = container_id, report, "shim report");
            Ok(pid)
        } else if let Some(reason) = report.strip_prefix("error ") {
            Err(DriverError::Start(reason.to_string()))
        } else {
            Err(DriverError::Start(
                "the machine shim exited without starting the container".into(),
            ))
        }
    }

    /// The host pid of the container's init, while it runs.
    fn init_pid(&self, machine_dir: &Path) -> Result<Pid, DriverError> {
        let text = std::fs::read_to_string(machine_dir.join(crate::shim::PID_FILE))
            .map_err(|_| DriverError::NotRunning)?;
        let pid: i32 = text.trim().parse().map_err(|_| DriverError::NotRunning)?;
        if !Path::new(&format!("/proc/{pid}")).exists() {
            return Err(DriverError::NotRunning);
        }
        Ok(Pid::from_raw(pid))
    }

    fn frozen(container_id: &str) -> bool {
        std::fs::read_to_string(cgroup_file("freezer", container_id, "freezer.state"))
            .is_ok_and(|s| s.trim() != "THAWED")
    }
}

impl Driver for ContainerDriver {
    fn name(&self) -> String {
        self.runtime
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    fn layer_id_shift(&self) -> Option<IdShift> {
        Some(USER_NAMESPACE)
    }

    fn start(&self, request: &StartRequest<'_>) -> Result<i32, DriverError> {
        let began = std::time::Instant::now();
        let layer_bytes = u64::from(request.rootfs_size_gb) * GIB;
        let rootfs = self.prepare_rootfs(request.machine_dir, request.image, layer_bytes)?;
        let mounted = began.elapsed();
        self.write_bundle(request, &rootfs)?;
        let bundled = began.elapsed();
        let pid = self.launch(request.machine_dir, request.machine_id, request.init)?;
        tracing::debug!(machine = request.machine_id, ?mounted, ?bundled, total = ?began.elapsed(), "container started");
        Ok(pid)
    }

    fn signal(
        &self,
        _machine_id: &str,
        machine_dir: &Path,
        signal: Signal,
    ) -> Result<(), DriverError> {
        let init = self.init_pid(machine_dir)?;
        // init forwards the usual stop and control signals; others go straight to the
        // main process, which init would otherwise swallow.
        let target = if signal == Signal::SIGKILL || aloft_init::FORWARDED_SIGNALS.contains(&signal)
        {
            init
        } else {
            procfs::children(init.as_raw())
                .first()
                .map(|p| Pid::from_raw(*p))
                .unwrap_or(init)
        };
        kill(target, signal)
            .map_err(|e| DriverError::Operation(format!("sending {signal} to pid {target}: {e}")))
    }

    fn kill(&self, machine_id: &str, machine_dir: &Path) -> Result<(), DriverError> {
        let init = self.init_pid(machine_dir)?;
        kill(init, Signal::SIGKILL)
            .map_err(|e| DriverError::Operation(format!("killing pid {init}: {e}")))?;
        if Self::frozen(machine_id) {
            // Frozen processes die only once thawed.
            let _ = std::fs::write(
                cgroup_file("freezer", machine_id, "freezer.state"),
                "THAWED",
            );
        }
        Ok(())
    }

    fn suspend(&self, machine_id: &str, _machine_dir: &Path) -> Result<(), DriverError> {
        self.run_runtime(&["pause", machine_id])
    }

    fn resume(&self, machine_id: &str, _machine_dir: &Path) -> Result<(), DriverError> {
        self.run_runtime(&["resume", machine_id])
    }

    fn exec(
        &self,
        machine_id: &str,
        machine_dir: &Path,
        command: &ExecCommand,
    ) -> Result<ExecProcess, DriverError> {
        self.init_pid(machine_dir)?;
        if command.argv.is_empty() || command.argv[0].is_empty() {
            return Err(DriverError::Operation("no command given".into()));
        }
        // The process goes to the runtime through a pipe, not as `--env` arguments: its
        // environment holds the app's secrets, which the host's process list must not show.
        let process = exec_process(machine_dir, command)?;
        let (spec_read, spec_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| DriverError::Operation(format!("creating a pipe: {e}")))?;
        let spec_fd = spec_read.as_raw_fd();
        let mut runc = self.runtime_command();
        runc.arg("exec")
            .arg("--process")
            .arg(format!("/proc/self/fd/{spec_fd}"))
            .arg(machine_id);
        // SAFETY: only fcntl between fork and exec.
        unsafe {
            runc.pre_exec(move || {
                if libc::fcntl(spec_fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        // Written from a thread: a large environment does not fit in the pipe's buffer.
        // A runtime that fails before reading closes the pipe, which ends the thread.
        std::thread::spawn(move || {
            let _ = std::fs::File::from(spec_write).write_all(&process);
        });
        let spawned =
            crate::driver::spawn_host_exec(runc, command.tty, "the container runtime's exec");
        drop(spec_read);
        spawned
    }

    fn processes(
        &self,
        machine_id: &str,
        machine_dir: &Path,
    ) -> Result<Vec<ProcessStat>, DriverError> {
        self.init_pid(machine_dir)?;
        let pids = procfs::cgroup_pids(&cgroup_file("pids", machine_id, "cgroup.procs"));
        Ok(pids.into_iter().filter_map(procfs::process_stat).collect())
    }
    fn usage(&self, machine_id: &str, machine_dir: &Path) -> Option<ResourceUsage> {
        self.init_pid(machine_dir).ok()?;
        Some(ResourceUsage {
            cpu_nanoseconds: read_number(&cgroup_file("cpuacct", machine_id, "cpuacct.usage"))
                .unwrap_or(0),
            memory_bytes: read_number(&cgroup_file("memory", machine_id, "memory.usage_in_bytes"))
                .unwrap_or(0),
            memory_limit_bytes: read_number(&cgroup_file(
                "memory",
                machine_id,
                "memory.limit_in_bytes",
            ))
            .unwrap_or(0),
            oom_kills: oom_kills(machine_id),
        })
    }

    fn cleanup(&self, machine_id: &str, machine_dir: &Path) {
        if Self::frozen(machine_id) {
            let _ = std::fs::write(
                cgroup_file("freezer", machine_id, "freezer.state"),
                "THAWED",
            );
        }
        let _ = self
            .runtime_command()
            .args(["delete", "--force", machine_id])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        unmount(&machine_dir.join("rootfs"));
        let _ = std::fs::remove_dir_all(machine_dir.join("upper"));
        let _ = std::fs::remove_dir_all(machine_dir.join("work"));
        // The runtime removes the leaf cgroups it made, except when it never got that far.
        for controller in [
            "cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "blkio", "pids", "systemd",
        ] {
            let _ = std::fs::remove_dir(cgroup_file(controller, machine_id, ""));
        }
    }

    fn release_storage(&self, _machine_id: &str, machine_dir: &Path) {
        release_writable_layer(machine_dir);
    }
}

const GIB: u64 = 1024 * 1024 * 1024;
/// A machine's writable layer: an ext4 image in the machine's directory, mounted at
/// [`LAYER_DIR`], holding the overlay's `upper/` and `work/`.
pub const LAYER_IMAGE: &str = "layer.ext4";
pub const LAYER_DIR: &str = "layer";
/// Where the last runs' layers go to be deleted in the background.
const DISCARDED_DIR: &str = "discarded";

/// Who owns the writable layer's root, `upper/` and `work/` (the container's root user).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerOwner {
    pub uid: u32,
    pub gid: u32,
}

impl LayerOwner {
    pub const HOST_ROOT: Self = Self { uid: 0, gid: 0 };
    /// Root of [`USER_NAMESPACE`].
    pub const MACHINE_ROOT: Self = Self {
        uid: USER_NAMESPACE.base,
        gid: USER_NAMESPACE.base,
    };
}

/// Lets the machine's root (host id [`USER_NAMESPACE`]`.base`) traverse from `top` (the
/// data dir, closed to other users) down to `machine_dir`, whose rootfs the runtime
/// mounts from inside the machine's user namespace: each directory on the way becomes
/// 0710, group the machine's root. Nothing is listed or read through them.
fn open_to_machine_root(machine_dir: &Path, top: &Path) -> Result<(), DriverError> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let gid = USER_NAMESPACE.base;
    for dir in machine_dir.ancestors().filter(|dir| dir.starts_with(top)) {
        let meta = std::fs::metadata(dir).map_err(io(format!("reading {}", dir.display())))?;
        if meta.mode() & 0o7777 != 0o710 || meta.gid() != gid {
            std::os::unix::fs::chown(dir, None, Some(gid))
                .map_err(io(format!("handing {} to group {gid}", dir.display())))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o710))
                .map_err(io(format!("opening {} to group {gid}", dir.display())))?;
        }
    }
    // Above the data dir nothing is changed: those directories must let anyone pass.
    for dir in top.ancestors().skip(1) {
        let meta = std::fs::metadata(dir).map_err(io(format!("reading {}", dir.display())))?;
        if meta.mode() & 0o001 == 0 {
            return Err(DriverError::Rootfs(format!(
                "{} (mode {:o}) is closed to other users, so machines, which run as an \
                 unprivileged host user in a user namespace, cannot reach their root \
                 filesystems in the data dir {}: `chmod o+x {}`, or keep the data dir under \
                 a directory anyone may pass, such as /var/lib",
                dir.display(),
                meta.mode() & 0o7777,
                top.display(),
                dir.display()
            )));
        }
    }
    Ok(())
}

/// Makes the machine's writable layer ready for a run and returns its `upper/` and
/// `work/`, both empty. The layer's filesystem stays mounted between runs of the machine,
/// so a start costs no mkfs or mount: the last run's directories are moved aside and
/// deleted in the background. It is made afresh (a new ext4 of `size_bytes`) when it is
/// not mounted (first start, after a host reboot or a platform shutdown) or its size
/// changed; nothing in it outlives a run, so it needs no journal.
pub fn writable_layer(
    machine_dir: &Path,
    size_bytes: u64,
    owner: LayerOwner,
) -> Result<(PathBuf, PathBuf), DriverError> {
    let image = machine_dir.join(LAYER_IMAGE);
    let layer = machine_dir.join(LAYER_DIR);
    let reusable = crate::block_image::is_mount_point(&layer)
        && std::fs::metadata(&image).is_ok_and(|m| m.len() == size_bytes);
    if reusable {
        discard_last_run(&layer)?;
    } else {
        release_writable_layer(machine_dir);
        std::fs::create_dir_all(&layer).map_err(io(format!("creating {}", layer.display())))?;
        let options = crate::block_image::FormatOptions {
            journal: false,
            label: Some("layer".into()),
            root_uid: owner.uid,
            root_gid: owner.gid,
            preallocate: false,
        };
        crate::block_image::create(&image, size_bytes, &options)
            .map_err(|e| DriverError::Rootfs(e.to_string()))?;
        crate::block_image::mount(&image, &layer, nix::mount::MsFlags::empty())
            .map_err(|e| DriverError::Rootfs(e.to_string()))?;
    }
    let (upper, work) = (layer.join("upper"), layer.join("work"));
    for dir in [&upper, &work] {
        std::fs::create_dir(dir).map_err(io(format!("creating {}", dir.display())))?;
        std::os::unix::fs::chown(dir, Some(owner.uid), Some(owner.gid)).map_err(io(format!(
            "handing {} to uid {}",
            dir.display(),
            owner.uid
        )))?;
    }
    Ok((upper, work))
}

/// Moves the last run's `upper/` and `work/` aside and deletes them (and whatever an
/// earlier deletion left) in the background.
fn discard_last_run(layer: &Path) -> Result<(), DriverError> {
    let discarded = layer.join(DISCARDED_DIR);
    std::fs::create_dir_all(&discarded).map_err(io(format!("creating {}", discarded.display())))?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    for name in ["upper", "work"] {
        let dir = layer.join(name);
        if dir.exists() {
            let aside = discarded.join(format!("{stamp}-{name}"));
            std::fs::rename(&dir, &aside).map_err(io(format!("moving {} aside", dir.display())))?;
        }
    }
    std::thread::spawn(move || {
        let Ok(entries) = std::fs::read_dir(&discarded) else {
            return;
        };
        for entry in entries.flatten() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    });
    Ok(())
}

/// Unmounts the machine's writable layer, detaches its loop device and deletes its image.
pub fn release_writable_layer(machine_dir: &Path) {
    let layer = machine_dir.join(LAYER_DIR);
    let image = machine_dir.join(LAYER_IMAGE);
    if let Err(err) = crate::block_image::unmount(&layer) {
        tracing::warn!(error = %err, "releasing a machine's writable layer");
    }
    for device in crate::block_image::loop_devices_under(&image) {
        if let Err(err) = crate::block_image::release(&device) {
            tracing::warn!(error = %err, "releasing a machine's writable layer");
        }
    }
    let _ = std::fs::remove_file(&image);
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

/// The machine's OCI bundle (its `config.json`).
fn bundle_dir(machine_dir: &Path) -> PathBuf {
    machine_dir.join("bundle")
}

/// The process an `exec` runs, as the runtime's `--process` file: the container's own
/// process (user, capabilities, limits) with the command, its environment and terminal.
fn exec_process(machine_dir: &Path, command: &ExecCommand) -> Result<Vec<u8>, DriverError> {
    let config_path = bundle_dir(machine_dir).join("config.json");
    let text =
        std::fs::read(&config_path).map_err(io(format!("reading {}", config_path.display())))?;
    let config: serde_json::Value = serde_json::from_slice(&text)
        .map_err(|e| DriverError::Operation(format!("{}: {e}", config_path.display())))?;
    let mut process = config.get("process").cloned().unwrap_or_else(|| json!({}));
    let mut env: Vec<String> = process
        .get("env")
        .and_then(|e| e.as_array())
        .map(|list| {
            list.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    env.retain(|entry| {
        let name = entry.split('=').next().unwrap_or_default();
        !command.env.contains_key(name)
    });
    env.extend(
        command
            .env
            .iter()
            .map(|(key, value)| format!("{key}={value}")),
    );
    if command.tty.is_some() && !env.iter().any(|e| e.starts_with("TERM=")) {
        env.push("TERM=xterm".into());
    }
    process["args"] = json!(command.argv);
    process["env"] = json!(env);
    process["cwd"] = json!("/");
    process["terminal"] = json!(command.tty.is_some());
    if let Some(size) = command.tty {
        process["consoleSize"] = json!({ "height": size.rows, "width": size.cols });
    }
    serde_json::to_vec(&process).map_err(|e| DriverError::Operation(e.to_string()))
}

fn oci_spec(
    container_id: &str,
    hostname: &str,
    rootfs: &Path,
    aloft_binary: &Path,
    link: &MachineLink,
    guest: &MachineGuest,
    seccomp: &serde_json::Value,
) -> serde_json::Value {
    let memory_bytes = u64::from(guest.memory_mb.max(64)) * 1024 * 1024;
    // The same as the user namespace's own (the runtime joins it by path).
    let id_mapping = json!({
        "containerID": 0,
        "hostID": USER_NAMESPACE.base,
        "size": USER_NAMESPACE.size,
    });
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
            { "destination": "/run", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=755", "size=65536k"] },
            { "destination": "/.fly/init", "type": "bind", "source": aloft_binary, "options": ["bind", "ro"] }
        ],
        "linux": {
            "namespaces": [
                { "type": "user", "path": link.userns_path() },
                { "type": "pid" },
                { "type": "ipc" },
                { "type": "uts" },
                { "type": "mount" },
                { "type": "network", "path": link.netns_path() }
            ],
            "uidMappings": [id_mapping],
            "gidMappings": [id_mapping],
            "cgroupsPath": cgroup_path(container_id),
            "resources": {
                "devices": [{ "allow": false, "access": "rwm" }],
                "memory": { "limit": memory_bytes, "swap": memory_bytes },
                "cpu": cpu_resources(guest),
                "pids": { "limit": 32768 }
            },
            "seccomp": seccomp,
            "maskedPaths": [
                "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
                "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware",
                "/sys/devices/virtual/powercap"
            ],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_processes_keep_the_containers_limits_and_carry_the_commands_env() {
        let dir = tempfile::tempdir().unwrap();
        let link = MachineLink::for_machine("0123456789abcd", 3).unwrap();
        let guest = MachineGuest {
            cpu_kind: "shared".into(),
            cpus: 1,
            memory_mb: 256,
            ..Default::default()
        };
        let spec = oci_spec(
            "m1",
            "m1",
            Path::new("/r"),
            Path::new("/a"),
            &link,
            &guest,
            &json!(null),
        );
        std::fs::create_dir_all(dir.path().join("bundle")).unwrap();
        std::fs::write(
            dir.path().join("bundle/config.json"),
            serde_json::to_vec(&spec).unwrap(),
        )
        .unwrap();
        let command = ExecCommand {
            argv: vec!["env".into()],
            env: [
                ("PATH".to_string(), "/app/bin".to_string()),
                ("SECRET".to_string(), "v=1".to_string()),
            ]
            .into(),
            tty: Some(crate::driver::WindowSize { cols: 80, rows: 24 }),
        };
        let process: serde_json::Value =
            serde_json::from_slice(&exec_process(dir.path(), &command).unwrap()).unwrap();
        assert_eq!(process["args"], json!(["env"]));
        assert_eq!(
            process["env"],
            json!(["PATH=/app/bin", "SECRET=v=1", "TERM=xterm"]),
            "the command's variables replace the container's of the same name"
        );
        assert_eq!(process["terminal"], true);
        assert_eq!(process["consoleSize"], json!({ "height": 24, "width": 80 }));
        assert_eq!(process["capabilities"], spec["process"]["capabilities"]);
        assert_eq!(process["rlimits"], spec["process"]["rlimits"]);
        assert_eq!(process["user"], spec["process"]["user"]);

        let missing = exec_process(&dir.path().join("nowhere"), &command).unwrap_err();
        assert!(missing.to_string().contains("config.json"), "{missing}");
    }

    #[test]
    fn spec_carries_limits_namespace_seccomp_and_init() {
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
            &crate::seccomp::default_profile(DEFAULT_CAPABILITIES, (6, 1)),
        );
        assert_eq!(
            spec["linux"]["resources"]["memory"]["limit"],
            512 * 1024 * 1024
        );
        assert_eq!(spec["linux"]["resources"]["cpu"]["quota"], 200_000);
        assert_eq!(spec["linux"]["resources"]["cpu"]["shares"], 256);
        assert_eq!(
            spec["linux"]["namespaces"][5]["path"],
            "/run/netns/aloft-0123456789abcd"
        );
        assert_eq!(
            spec["linux"]["namespaces"][0],
            json!({ "type": "user", "path": "/run/aloft/userns/aloft-0123456789abcd" })
        );
        assert_eq!(spec["linux"]["uidMappings"][0]["hostID"], 1 << 30);
        assert_eq!(spec["linux"]["gidMappings"], spec["linux"]["uidMappings"]);
        assert_eq!(spec["process"]["args"][0], "/.fly/init");
        assert!(
            spec["mounts"]
                .as_array()
                .unwrap()
                .iter()
                .any(|m| m["source"] == "/usr/bin/aloft" && m["destination"] == "/.fly/init")
        );
        assert_eq!(spec["linux"]["seccomp"]["defaultAction"], "SCMP_ACT_ERRNO");
        assert_eq!(
            spec["process"]["capabilities"]["bounding"]
                .as_array()
                .unwrap()
                .len(),
            14
        );
    }

    #[test]
    fn powercap_is_masked() {
        let link = MachineLink::for_machine("0123456789abcd", 0).unwrap();
        let spec = oci_spec(
            "c",
            "h",
            Path::new("/r"),
            Path::new("/a"),
            &link,
            &MachineGuest::default(),
            &serde_json::Value::Null,
        );
        let masked = spec["linux"]["maskedPaths"].as_array().unwrap();
        assert!(
            masked.iter().any(|p| p == "/sys/devices/virtual/powercap"),
            "RAPL energy counters leak what other tenants compute: {masked:?}"
        );
    }

    #[test]
    fn performance_cpus_weigh_more_than_shared() {
        let shared = cpu_resources(&MachineGuest {
            cpu_kind: "shared".into(),
            cpus: 1,
            ..Default::default()
        });
        let performance = cpu_resources(&MachineGuest {
            cpu_kind: "performance".into(),
            cpus: 1,
            ..Default::default()
        });
        assert!(performance["shares"].as_u64() > shared["shares"].as_u64());
        assert_eq!(performance["quota"], shared["quota"]);
    }

    #[test]
    fn the_machines_root_may_pass_down_to_its_rootfs_and_a_closed_parent_is_named() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        if !nix::unistd::Uid::effective().is_root() {
            aloft_testkit::skip("needs root (handing directories to group 2^30)");
            return;
        }
        let base = tempfile::tempdir().unwrap();
        let data = base.path().join("data");
        let machine = data.join("agent/machines/0123456789abcd");
        std::fs::create_dir_all(&machine).unwrap();
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o700)).unwrap();

        // The temp dir is 0700: machines could never reach their rootfs below it.
        let err = open_to_machine_root(&machine, &data)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&base.path().display().to_string()) && err.contains("chmod o+x"),
            "{err}"
        );

        std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        open_to_machine_root(&machine, &data).unwrap();
        for dir in [
            &data,
            &data.join("agent"),
            &data.join("agent/machines"),
            &machine,
        ] {
            let meta = std::fs::metadata(dir).unwrap();
            assert_eq!(meta.mode() & 0o7777, 0o710, "{}", dir.display());
            assert_eq!(meta.gid(), USER_NAMESPACE.base, "{}", dir.display());
        }
        let above = std::fs::metadata(base.path()).unwrap();
        assert_eq!(
            above.mode() & 0o7777,
            0o711,
            "nothing above the data dir changes"
        );
        assert_ne!(above.gid(), USER_NAMESPACE.base);
    }

    #[test]
    fn the_writable_layer_is_kept_across_runs_emptied_and_remade_when_resized() {
        if !nix::unistd::Uid::effective().is_root() {
            aloft_testkit::skip("needs root (loop devices, mounts)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let mib = 1024 * 1024;
        let (upper, work) = writable_layer(dir.path(), 32 * mib, LayerOwner::HOST_ROOT).unwrap();
        assert!(upper.starts_with(dir.path().join(LAYER_DIR)) && work.exists());
        let devices = crate::block_image::loop_devices_under(dir.path());
        assert_eq!(devices.len(), 1, "{devices:?}");
        std::fs::write(upper.join("left-over"), b"x").unwrap();

        let (upper, _) = writable_layer(dir.path(), 32 * mib, LayerOwner::HOST_ROOT).unwrap();
        assert_eq!(
            std::fs::read_dir(&upper).unwrap().count(),
            0,
            "a run starts empty"
        );
        assert_eq!(
            crate::block_image::loop_devices_under(dir.path()),
            devices,
            "the same filesystem serves the next run"
        );

        let owner = LayerOwner {
            uid: 100000,
            gid: 100000,
        };
        let (upper, _) = writable_layer(dir.path(), 48 * mib, owner).unwrap();
        assert_eq!(
            std::fs::metadata(dir.path().join(LAYER_IMAGE))
                .unwrap()
                .len(),
            48 * mib
        );
        use std::os::unix::fs::MetadataExt;
        assert_eq!(std::fs::metadata(&upper).unwrap().uid(), 100000);

        release_writable_layer(dir.path());
        assert!(!dir.path().join(LAYER_IMAGE).exists());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !crate::block_image::loop_devices_under(dir.path()).is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "the loop device stays attached"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}
