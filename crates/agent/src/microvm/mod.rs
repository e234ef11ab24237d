//! The microVM driver: every machine its own QEMU virtual machine, from the same OCI
//! images and with the same contract as containers. `microvm` machines under KVM where
//! the host's KVM boots the guest kernel, `q35` under TCG elsewhere; Debian's cloud kernel
//! with `init` in an initramfs; the image as an ext4 disk behind a per-run qcow2 overlay;
//! a tap device on the machine's routed link; virtio-serial between init and the agent.

pub mod accel;
pub mod assets;
pub mod exec;
pub mod jail;
pub mod rootfs;
pub mod shim;
pub mod volume;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use aloft_api::internal::ProcessStat;
use aloft_init::vm::channel::{self, BootConfig, Frame, GuestNetwork, GuestVolume};
use nix::sys::signal::Signal;

use crate::driver::{
    Driver, DriverError, ExecCommand, ExecProcess, ResourceUsage, StartRequest, io,
};
use crate::network::{self, MachineLink, NetworkError};
pub use accel::{Accel, AccelChoice};

/// What `aloft server` says about the microVM driver.
#[derive(Clone, Debug, Default)]
pub struct MicrovmOptions {
    pub accel: AccelChoice,
    /// The guest kernel (a vmlinuz or vmlinux); default: the newest Debian cloud kernel.
    pub kernel: Option<PathBuf>,
    /// How long a guest may take from QEMU's start to init running the program.
    pub ready_timeout: Option<Duration>,
}

/// Memory QEMU itself may use beyond the guest's (TCG's translation cache, devices).
const VMM_OVERHEAD_BYTES: u64 = 192 * 1024 * 1024;
/// A guest needs this much memory for the kernel, the initramfs and init.
pub const MIN_GUEST_MEMORY_MB: u32 = 128;
/// First uid of the range QEMU processes run as (one uid per machine network slot).
const UID_BASE: u32 = 1_900_000_000;

pub struct MicrovmDriver {
    qemu: PathBuf,
    kernel: Option<PathBuf>,
    accel: Accel,
    accel_reason: String,
    aloft_binary: PathBuf,
    cache: PathBuf,
    ready_timeout: Duration,
    assets: Mutex<Option<(String, PathBuf, PathBuf)>>,
    images: Mutex<()>,
}

fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")
        .unwrap_or_else(|| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

impl MicrovmDriver {
    pub fn new(state_dir: &Path, options: &MicrovmOptions) -> Result<Self, DriverError> {
        let qemu = find_program("qemu-system-x86_64").ok_or_else(|| {
            DriverError::NoRuntime(
                "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86 qemu-utils)"
                    .into(),
            )
        })?;
        let kernel = options.kernel.clone().or_else(assets::default_kernel);
        let aloft_binary = std::env::current_exe().map_err(io("finding the aloft binary"))?;
        let cache = state_dir.join("vm");
        std::fs::create_dir_all(&cache).map_err(io(format!("creating {}", cache.display())))?;
        let mut driver = Self {
            qemu,
            kernel,
            accel: Accel::Tcg,
            accel_reason: String::new(),
            aloft_binary,
            cache,
            ready_timeout: Duration::from_secs(60),
            assets: Mutex::new(None),
            images: Mutex::new(()),
        };
        match options.accel {
            AccelChoice::Fixed(accel) => {
                driver.accel = accel;
                driver.accel_reason = "chosen with --vm-accel".into();
            }
            AccelChoice::Auto => {
                let probe = driver.probe_kvm();
                driver.accel = if probe.kvm_boots {
                    Accel::Kvm
                } else {
                    Accel::Tcg
                };
                driver.accel_reason = probe.detail;
            }
        }
        driver.ready_timeout = options.ready_timeout.unwrap_or(match driver.accel {
            Accel::Kvm => Duration::from_secs(20),
            Accel::Tcg => Duration::from_secs(90),
        });
        tracing::info!(
            accel = driver.accel.as_str(),
            machine_type = driver.accel.machine_type(),
            why = %driver.accel_reason,
            kernel = %driver.kernel.as_deref().map(|k| k.display().to_string()).unwrap_or_else(|| "none".into()),
            "microVM driver ready"
        );
        Ok(driver)
    }

    pub fn accel(&self) -> Accel {
        self.accel
    }

    pub fn accel_reason(&self) -> &str {
        &self.accel_reason
    }

    /// Whether KVM boots this driver's kernel here (cached per kernel, QEMU and host).
    pub fn probe_kvm(&self) -> accel::Probe {
        match self.vmlinux() {
            Ok(vmlinux) => accel::kvm_boots(&self.qemu, &vmlinux),
            Err(err) => accel::Probe {
                kvm_boots: false,
                detail: err.to_string(),
            },
        }
    }

    fn kernel(&self) -> Result<&Path, DriverError> {
        self.kernel.as_deref().ok_or_else(|| {
            DriverError::Start(
                "no guest kernel: install linux-image-cloud-amd64 or give one with --vm-kernel"
                    .into(),
            )
        })
    }

    /// The kernel unpacked for QEMU, once per kernel file.
    fn vmlinux(&self) -> Result<PathBuf, DriverError> {
        let kernel = self.kernel()?;
        let vmlinux = self
            .cache
            .join(format!("vmlinux-{}", assets::file_key(kernel)?));
        if !vmlinux.exists() {
            assets::unpack_kernel(kernel, &vmlinux)?;
        }
        Ok(vmlinux)
    }

    /// The unpacked kernel and the initramfs, built once per kernel and `aloft` binary.
    fn boot_assets(&self) -> Result<(PathBuf, PathBuf), DriverError> {
        let kernel = self.kernel()?;
        let key = format!(
            "{}-{}",
            assets::file_key(kernel)?,
            assets::file_key(&self.aloft_binary)?
        );
        let mut cached = self.assets.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((have, vmlinux, initrd)) = cached.as_ref()
            && *have == key
            && vmlinux.exists()
            && initrd.exists()
        {
            return Ok((vmlinux.clone(), initrd.clone()));
        }
        let vmlinux = self.vmlinux()?;
        let initrd = self.cache.join(format!("initrd-{key}.cpio"));
        if !initrd.exists() {
            let release = assets::kernel_release(kernel).ok_or_else(|| {
                DriverError::Start(format!(
                    "the guest kernel {} is not named vmlinuz-<release>, so its modules cannot be found",
                    kernel.display()
                ))
            })?;
            let modules = Path::new("/lib/modules").join(&release).join("kernel");
            assets::build_initramfs(&self.aloft_binary, &modules, &initrd)?;
        }
        *cached = Some((key, vmlinux.clone(), initrd.clone()));
        Ok((vmlinux, initrd))
    }

    fn kernel_cmdline(&self, request: &StartRequest<'_>) -> String {
        let mut words = vec![
            "console=ttyS0",
            // Only critical kernel messages reach the machine's log.
            "loglevel=2",
            "panic=-1",
            "i8042.noaux",
            "i8042.nomux",
            "i8042.nopnp",
            "i8042.dumbkbd",
            "random.trust_cpu=on",
            "8250.nr_uarts=1",
        ]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
        words.extend(request.guest.kernel_args.iter().cloned());
        if let Some(init) = &request.config.init {
            words.extend(init.kernel_args.iter().cloned());
        }
        words.join(" ")
    }

    fn spawn_shim(&self, machine_dir: &Path, launch: &shim::Launch) -> Result<i32, DriverError> {
        let mut command = Command::new(&self.aloft_binary);
        command
            .arg(shim::SHIM_COMMAND)
            .arg(machine_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        // SAFETY: setsid between fork and exec.
        unsafe {
            command.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let mut child = command.spawn().map_err(io("spawning the VM supervisor"))?;
        let mut description =
            serde_json::to_vec(launch).map_err(|e| DriverError::Start(e.to_string()))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(&description)
                .map_err(io("handing the launch description to the VM supervisor"))?;
        }
        description.fill(0);
        let mut report = String::new();
        if let Some(stdout) = child.stdout.take() {
            let _ = BufReader::new(stdout).read_line(&mut report);
        }
        let pid = child.id() as i32;
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
                "the VM supervisor exited without starting the VM".into(),
            ))
        }
    }

    fn start_vm(&self, request: &StartRequest<'_>) -> Result<i32, DriverError> {
        let mut volumes = Vec::new();
        let mut guest_volumes = Vec::new();
        for (i, mount) in request.volumes.iter().enumerate() {
            let disk = mount.vm_disk.clone().ok_or_else(|| {
                DriverError::Start(format!(
                    "volume {} (mounts[{i}].volume) was prepared as a host mount, not as a microVM disk",
                    mount.volume
                ))
            })?;
            guest_volumes.push(GuestVolume {
                serial: volume::disk_serial(i),
                destination: disk.destination.clone(),
            });
            volumes.push(disk);
        }
        if request.guest.memory_mb < MIN_GUEST_MEMORY_MB {
            return Err(DriverError::Start(format!(
                "guest.memory_mb {} is too little for a microVM: give at least {MIN_GUEST_MEMORY_MB}",
                request.guest.memory_mb
            )));
        }
        let (vmlinux, initrd) = self.boot_assets()?;
        let swap_mb = request
            .config
            .init
            .as_ref()
            .and_then(|i| i.swap_size_mb)
            .unwrap_or(0);
        let disk_mb = u64::from(request.rootfs_size_gb) * 1024 + swap_mb;
        let base = {
            let _building = self.images.lock().unwrap_or_else(|p| p.into_inner());
            rootfs::base_image(&self.cache.join("images"), request.image, disk_mb)?
        };
        let vm_dir = request.machine_dir.join("vm");
        let _ = std::fs::remove_dir_all(&vm_dir);
        std::fs::create_dir_all(&vm_dir).map_err(io(format!("creating {}", vm_dir.display())))?;
        for (source, name) in [(&vmlinux, "vmlinux"), (&initrd, "initrd")] {
            let target = vm_dir.join(name);
            std::fs::hard_link(source, &target)
                .or_else(|_| std::fs::copy(source, &target).map(|_| ()))
                .map_err(io(format!("placing {}", target.display())))?;
        }
        let disk = rootfs::machine_disk(&vm_dir, &base)?;
        let uid = machine_uid(request.link);
        std::os::unix::fs::chown(&disk, Some(uid), Some(uid))
            .map_err(io(format!("handing {} to uid {uid}", disk.display())))?;
        let mut init = request.init.clone();
        init.mount_standard_filesystems = true;
        let launch = shim::Launch {
            machine_id: request.machine_id.to_string(),
            qemu: self.qemu.clone(),
            accel: self.accel,
            cpus: request.guest.cpus.max(1),
            memory_mb: request.guest.memory_mb,
            tap: request.link.host_interface.clone(),
            mac: machine_mac(request.machine_id),
            uid,
            vmm_memory_limit_bytes: u64::from(request.guest.memory_mb) * 1024 * 1024
                + VMM_OVERHEAD_BYTES,
            ready_timeout_secs: self.ready_timeout.as_secs(),
            kernel_cmdline: self.kernel_cmdline(request),
            boot: BootConfig {
                init,
                network: guest_network(request.link),
                root_device: "/dev/vda".into(),
                swap_size_mb: swap_mb as u32,
                volumes: guest_volumes,
            },
            volumes,
        };
        self.spawn_shim(request.machine_dir, &launch)
    }

    fn qemu_pid(machine_dir: &Path) -> Option<i32> {
        let pid: i32 = std::fs::read_to_string(machine_dir.join(shim::QEMU_PID_FILE))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
    }
}

/// The guest's end of its routed link: the same addresses and routes a container's
/// namespace gets (private IPv4 /30, link-local next hop, 6PN address, `fdaa::/16` and the IPv6 default route).
pub fn guest_network(link: &MachineLink) -> GuestNetwork {
    let mut addresses = vec![
        format!("{}/30", link.machine_address),
        format!("{}/64", network::MACHINE_LINK_LOCAL),
    ];
    let mut ipv6_routes = Vec::new();
    if let Some(address) = link.private_ip {
        addresses.push(format!(
            "{address}/{}",
            aloft_api::sixpn::MACHINE_PREFIX_LEN
        ));
        ipv6_routes.push("fdaa::/16".to_string());
        // The internet over IPv6, NATed from the 6PN address by the host.
        ipv6_routes.push("::/0".to_string());
    }
    GuestNetwork {
        interface: "eth0".into(),
        addresses,
        ipv4_gateway: Some(link.host_address.to_string()),
        ipv6_gateway: Some(network::HOST_LINK_LOCAL.to_string()),
        ipv6_routes,
    }
}

/// One unprivileged uid per network slot (the slot is in the link's addresses).
pub fn machine_uid(link: &MachineLink) -> u32 {
    UID_BASE + (u32::from(link.host_address) & 0xffff)
}

/// A locally administered MAC derived from the machine id.
pub fn machine_mac(machine_id: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(machine_id.as_bytes());
    format!(
        "06:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        digest[0], digest[1], digest[2], digest[3], digest[4]
    )
}

impl Driver for MicrovmDriver {
    fn name(&self) -> String {
        format!("qemu-{}", self.accel.as_str())
    }

    fn describe(&self) -> String {
        format!(
            "microVMs (QEMU, machine type {} under {}: {})",
            self.accel.machine_type(),
            self.accel.as_str().to_uppercase(),
            self.accel_reason
        )
    }

    fn volumes_as_disks(&self) -> bool {
        true
    }

    fn hold_io(
        &self,
        _machine_id: &str,
        machine_dir: &Path,
    ) -> Result<Option<Box<dyn Send>>, DriverError> {
        let held = shim::hold_io_until_dropped(machine_dir).map_err(map_control)?;
        Ok(Some(Box::new(held)))
    }

    fn ensure_network(&self, link: &MachineLink) -> Result<(), NetworkError> {
        network::ensure_tap(link)
    }

    fn start(&self, request: &StartRequest<'_>) -> Result<i32, DriverError> {
        let started = self.start_vm(request);
        if started.is_err() {
            // A machine that never ran leaves nothing behind: no QEMU, disk or tap.
            self.cleanup(request.machine_id, request.machine_dir);
            network::teardown(request.link);
        }
        started
    }

    fn signal(
        &self,
        _machine_id: &str,
        machine_dir: &Path,
        signal: Signal,
    ) -> Result<(), DriverError> {
        shim::control(
            machine_dir,
            &Frame::new(0, channel::SIGNAL, (signal as i32).to_be_bytes()),
        )
        .map_err(map_control)
    }

    fn kill(&self, _machine_id: &str, machine_dir: &Path) -> Result<(), DriverError> {
        if shim::control(machine_dir, &Frame::new(0, shim::CTL_KILL, Vec::new())).is_ok() {
            return Ok(());
        }
        match Self::qemu_pid(machine_dir) {
            Some(pid) => nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL)
                .map_err(|e| DriverError::Operation(format!("killing QEMU (pid {pid}): {e}"))),
            None => Err(DriverError::NotRunning),
        }
    }

    fn suspend(&self, _machine_id: &str, machine_dir: &Path) -> Result<(), DriverError> {
        shim::control(machine_dir, &Frame::new(0, shim::CTL_SUSPEND, Vec::new()))
            .map_err(map_control)
    }

    fn resume(&self, _machine_id: &str, machine_dir: &Path) -> Result<(), DriverError> {
        shim::control(machine_dir, &Frame::new(0, shim::CTL_RESUME, Vec::new()))
            .map_err(map_control)
    }

    fn exec(
        &self,
        _machine_id: &str,
        machine_dir: &Path,
        command: &ExecCommand,
    ) -> Result<ExecProcess, DriverError> {
        exec::start(&self.aloft_binary, machine_dir, command)
    }

    fn processes(
        &self,
        _machine_id: &str,
        machine_dir: &Path,
    ) -> Result<Vec<ProcessStat>, DriverError> {
        shim::processes(machine_dir).map_err(map_control)
    }

    fn usage(&self, machine_id: &str, machine_dir: &Path) -> Option<ResourceUsage> {
        Self::qemu_pid(machine_dir)?;
        let read = |controller: &str, file: &str| -> u64 {
            std::fs::read_to_string(
                Path::new("/sys/fs/cgroup")
                    .join(controller)
                    .join("aloft")
                    .join(machine_id)
                    .join(file),
            )
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0)
        };
        Some(ResourceUsage {
            cpu_nanoseconds: read("cpuacct", "cpuacct.usage"),
            memory_bytes: read("memory", "memory.usage_in_bytes"),
            memory_limit_bytes: read("memory", "memory.limit_in_bytes"),
            oom_kills: 0,
        })
    }

    fn cleanup(&self, machine_id: &str, machine_dir: &Path) {
        if let Some(pid) = Self::qemu_pid(machine_dir) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
            for _ in 0..100 {
                if !Path::new(&format!("/proc/{pid}")).exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = std::fs::remove_dir_all(machine_dir.join("vm"));
        let _ = std::fs::remove_dir(machine_dir.join("jail"));
        let _ = std::fs::remove_file(machine_dir.join(shim::CONTROL_SOCKET));
        let _ = std::fs::remove_file(machine_dir.join(shim::QEMU_PID_FILE));
        jail::remove_cgroups(machine_id);
    }
}

fn map_control(message: String) -> DriverError {
    if message.contains("not running") {
        DriverError::NotRunning
    } else {
        DriverError::Operation(message)
    }
}

/// `--driver`: which runtime runs machines.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DriverChoice {
    Container,
    Microvm,
    /// microVMs where KVM boots the guest kernel, containers elsewhere.
    #[default]
    Auto,
}

impl std::str::FromStr for DriverChoice {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "container" => Ok(Self::Container),
            "microvm" => Ok(Self::Microvm),
            "auto" => Ok(Self::Auto),
            other => Err(format!(
                "unknown driver {other:?}: use container, microvm or auto"
            )),
        }
    }
}

/// For `auto`: a microVM driver when KVM boots the guest kernel here, else why not.
pub fn auto_select(state_dir: &Path, options: &MicrovmOptions) -> Result<MicrovmDriver, String> {
    if options.accel == AccelChoice::Fixed(Accel::Tcg) {
        return Err("--vm-accel tcg was given (auto uses microVMs only with KVM)".into());
    }
    if !Path::new("/dev/kvm").exists() {
        return Err("/dev/kvm is missing".into());
    }
    let kernel = options.kernel.clone().or_else(assets::default_kernel);
    if kernel.is_none() {
        return Err("no guest kernel is installed (linux-image-cloud-amd64)".into());
    }
    if find_program("qemu-system-x86_64").is_none() {
        return Err("QEMU is not installed (qemu-system-x86)".into());
    }
    let driver = MicrovmDriver::new(state_dir, options).map_err(|e| e.to_string())?;
    if driver.accel() == Accel::Kvm {
        Ok(driver)
    } else {
        Err(driver.accel_reason().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uids_and_macs_are_per_machine() {
        let a = MachineLink::for_machine("0123456789abcd", 0).unwrap();
        let b = MachineLink::for_machine("0123456789abce", 1).unwrap();
        assert_ne!(machine_uid(&a), machine_uid(&b));
        assert!(machine_uid(&a) >= UID_BASE);
        assert_ne!(machine_mac("a"), machine_mac("b"));
        assert!(machine_mac("a").starts_with("06:"));
        assert_eq!(machine_mac("a").len(), 17);
    }

    #[test]
    fn driver_choices_parse() {
        assert_eq!(
            "microvm".parse::<DriverChoice>().unwrap(),
            DriverChoice::Microvm
        );
        assert!(
            "vm".parse::<DriverChoice>()
                .unwrap_err()
                .contains("container, microvm or auto")
        );
    }
}
