//! The runtime driver seam: what the agent asks of whatever runs a machine (OCI
//! containers now, microVMs later). The agent owns state, restart policy, events, checks
//! and logs; a driver only builds, runs, signals and inspects one machine at a time.
//!
//! The contract every driver keeps:
//! - `start` returns the pid of a supervisor process that outlives the agent. When the
//!   machine ends, the supervisor writes `exit.json` (an [`ExitStatus`]) into the
//!   machine directory and then exits; the agent watches that pid.
//! - The machine's stdout and stderr go, as JSON lines, to `machine.log` in the machine
//!   directory (see [`crate::logs`]).
//! - Methods block (they may run processes); the agent calls them off the async executor.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::Path;
use std::process::Child;

use aloft_api::MachineGuest;
use aloft_api::internal::{ExitStatus, InitConfig, ProcessStat};
use nix::sys::signal::Signal;

use crate::images::PreparedImage;
use crate::network::{MachineLink, NetworkError};

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("no working OCI runtime: {0}")]
    NoRuntime(String),
    #[error("preparing the root filesystem: {0}")]
    Rootfs(String),
    #[error("starting the machine: {0}")]
    Start(String),
    #[error("the machine is not running")]
    NotRunning,
    #[error("{0}")]
    Operation(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
}

pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> DriverError {
    let context = context.into();
    move |source| DriverError::Io { context, source }
}

/// Everything needed to bring one machine up.
pub struct StartRequest<'a> {
    pub machine_id: &'a str,
    pub machine_dir: &'a Path,
    pub image: &'a PreparedImage,
    pub link: &'a MachineLink,
    pub guest: &'a MachineGuest,
    pub config: &'a aloft_api::MachineConfig,
    pub init: &'a InitConfig,
    /// The machine's root filesystem size (`rootfs.size_gb`, or the host's default): a
    /// container's writable layer, a microVM's root disk.
    pub rootfs_size_gb: u32,
    /// Volumes mounted on the host, to appear at their paths inside the machine.
    pub volumes: &'a [crate::volumes::VolumeMount],
}

/// A terminal's size in characters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowSize {
    pub cols: u16,
    pub rows: u16,
}

/// A command to run inside a running machine, in its namespaces.
#[derive(Clone, Debug, Default)]
pub struct ExecCommand {
    pub argv: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// Allocate a terminal of this size; `None` runs the command on pipes.
    pub tty: Option<WindowSize>,
}

/// A command running in a machine, however the driver runs it (a runtime `exec` process
/// on the host for containers; a request to init over the guest channel for microVMs).
pub trait ExecHandle: Send {
    /// Its exit code (128 + signal when killed) once it has ended.
    fn try_wait(&mut self) -> std::io::Result<Option<i32>>;
    /// Asks it to end (SIGTERM; SIGHUP too for a terminal session).
    fn terminate(&mut self);
    /// Ends it now.
    fn kill(&mut self);
}

/// A started command and its I/O.
pub struct ExecProcess {
    pub handle: Box<dyn ExecHandle>,
    pub io: ExecIo,
}

pub enum ExecIo {
    /// The controlling side of the command's terminal (stdin and output in one).
    Terminal(OwnedFd),
    Pipes {
        stdin: Option<Box<dyn Write + Send>>,
        stdout: Box<dyn Read + Send>,
        stderr: Box<dyn Read + Send>,
    },
}

/// An exec'd command that is a process on the host.
pub struct HostProcess(pub Child);

impl ExecHandle for HostProcess {
    fn try_wait(&mut self) -> std::io::Result<Option<i32>> {
        use std::os::unix::process::ExitStatusExt;
        Ok(self.0.try_wait()?.map(|status| {
            status
                .code()
                .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
        }))
    }

    fn terminate(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, Signal::SIGHUP);
        let _ = nix::sys::signal::kill(pid, Signal::SIGTERM);
    }

    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts a host process that stands for an exec'd command (`runc exec`, `aloft
/// vm-exec`), on a new terminal of `tty`'s size or on pipes. `what` names it in errors.
pub(crate) fn spawn_host_exec(
    mut process: std::process::Command,
    tty: Option<WindowSize>,
    what: &str,
) -> Result<ExecProcess, DriverError> {
    use std::os::unix::process::CommandExt;
    use std::process::Stdio;
    match tty {
        Some(size) => {
            let winsize = nix::pty::Winsize {
                ws_row: size.rows,
                ws_col: size.cols,
                ws_xpixel: 0,
                ws_ypixel: 0,
            };
            let pty = nix::pty::openpty(Some(&winsize), None)
                .map_err(|e| DriverError::Operation(format!("allocating a terminal: {e}")))?;
            let slave = pty.slave;
            let clone = |fd: &OwnedFd| fd.try_clone().map_err(io("duplicating the terminal"));
            process
                .stdin(Stdio::from(clone(&slave)?))
                .stdout(Stdio::from(clone(&slave)?))
                .stderr(Stdio::from(slave));
            // SAFETY: setsid/ioctl between fork and exec. The process gets the terminal as
            // its controlling one, so it follows window size changes (SIGWINCH).
            unsafe {
                process.pre_exec(|| {
                    libc::setsid();
                    libc::ioctl(0, libc::TIOCSCTTY, 0);
                    Ok(())
                });
            }
            let child = process.spawn().map_err(io(format!("starting {what}")))?;
            drop(process);
            Ok(ExecProcess {
                handle: Box::new(HostProcess(child)),
                io: ExecIo::Terminal(pty.master),
            })
        }
        None => {
            process
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            let mut child = process.spawn().map_err(io(format!("starting {what}")))?;
            let stdin = child.stdin.take();
            let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
                return Err(DriverError::Operation(
                    "the exec'd command has no output pipes".into(),
                ));
            };
            Ok(ExecProcess {
                handle: Box::new(HostProcess(child)),
                io: ExecIo::Pipes {
                    stdin: stdin.map(|pipe| Box::new(pipe) as Box<dyn Write + Send>),
                    stdout: Box::new(stdout),
                    stderr: Box::new(stderr),
                },
            })
        }
    }
}

/// Resource use of one machine, from its cgroups.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResourceUsage {
    /// CPU time used since the machine started, in nanoseconds.
    pub cpu_nanoseconds: u64,
    pub memory_bytes: u64,
    pub memory_limit_bytes: u64,
    /// Times the kernel's OOM killer killed a process of the machine.
    pub oom_kills: u64,
}

pub trait Driver: Send + Sync + 'static {
    /// A short name for logs and metrics (`runc`, `crun`, `qemu`).
    fn name(&self) -> String;

    /// What runs machines, in words, for `aloft server`'s banner.
    fn describe(&self) -> String {
        format!("containers ({})", self.name())
    }

    /// How image layers' owners are shifted for this driver's machines (containers in a
    /// user namespace); `None` unpacks them as the image says.
    fn layer_id_shift(&self) -> Option<crate::unpack::IdShift> {
        None
    }

    /// Whether machines get volumes as block devices (microVMs: never mounted on the
    /// host, encrypted by QEMU's LUKS driver) rather than host mounts (containers).
    fn volumes_as_disks(&self) -> bool {
        false
    }

    /// Holds the running machine's disk writes (a microVM paused, its disks flushed)
    /// until the returned handle is dropped, so a volume image can be copied whole.
    /// `None`: nothing to hold (volumes are host filesystems, frozen by the agent).
    fn hold_io(
        &self,
        _machine_id: &str,
        _machine_dir: &Path,
    ) -> Result<Option<Box<dyn Send>>, DriverError> {
        Ok(None)
    }

    /// Sets up the machine's routed link (a veth into a network namespace for containers,
    /// owned by the machine's user namespace when [`Driver::layer_id_shift`] gives one; a
    /// tap device for microVMs). Idempotent.
    fn ensure_network(&self, link: &MachineLink) -> Result<(), NetworkError> {
        crate::network::ensure(link, self.layer_id_shift())
    }

    /// Builds the machine from its image (a fresh root filesystem every time) and starts
    /// it. Returns the supervisor's pid.
    fn start(&self, request: &StartRequest<'_>) -> Result<i32, DriverError>;

    /// Sends `signal` to the machine's main process (through init where init forwards it).
    fn signal(
        &self,
        machine_id: &str,
        machine_dir: &Path,
        signal: Signal,
    ) -> Result<(), DriverError>;

    /// Ends the machine at once (every process, no grace).
    fn kill(&self, machine_id: &str, machine_dir: &Path) -> Result<(), DriverError>;

    /// Freezes the machine in place; [`Driver::resume`] thaws it.
    fn suspend(&self, machine_id: &str, machine_dir: &Path) -> Result<(), DriverError>;

    fn resume(&self, machine_id: &str, machine_dir: &Path) -> Result<(), DriverError>;

    /// Starts `command` inside the running machine.
    fn exec(
        &self,
        machine_id: &str,
        machine_dir: &Path,
        command: &ExecCommand,
    ) -> Result<ExecProcess, DriverError>;

    /// The machine's processes.
    fn processes(
        &self,
        machine_id: &str,
        machine_dir: &Path,
    ) -> Result<Vec<ProcessStat>, DriverError>;

    /// The machine's resource use, if it is running.
    fn usage(&self, machine_id: &str, machine_dir: &Path) -> Option<ResourceUsage>;

    /// Removes what a run left (runtime state, mounts, cgroups). Idempotent.
    fn cleanup(&self, machine_id: &str, machine_dir: &Path);

    /// Releases what a machine keeps between runs on the host's devices (a container's
    /// writable layer: its mount and loop device), after [`Driver::cleanup`]; the machine
    /// is being destroyed or the host is shutting down. Idempotent.
    fn release_storage(&self, _machine_id: &str, _machine_dir: &Path) {}
}

/// Reads how a machine's last run ended, if it has ended.
pub fn read_exit(machine_dir: &Path) -> Option<ExitStatus> {
    let text = std::fs::read(machine_dir.join(EXIT_FILE)).ok()?;
    serde_json::from_slice(&text).ok()
}

/// Where a supervisor records how the machine ended.
pub const EXIT_FILE: &str = "exit.json";

/// Writes `exit.json` atomically (a supervisor's last act).
pub fn write_exit(machine_dir: &Path, status: &ExitStatus) {
    let temp = machine_dir.join("exit.json.tmp");
    if let Ok(text) = serde_json::to_vec(status)
        && std::fs::write(&temp, text).is_ok()
    {
        let _ = std::fs::rename(&temp, machine_dir.join(EXIT_FILE));
    }
}

/// Parses `SIGTERM`, `TERM` or `15` into a signal.
pub fn parse_signal(text: &str) -> Result<Signal, String> {
    let trimmed = text.trim();
    if let Ok(number) = trimmed.parse::<i32>() {
        return Signal::try_from(number).map_err(|_| format!("unknown signal {number}"));
    }
    let upper = trimmed.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    name.parse::<Signal>()
        .map_err(|_| format!("unknown signal {trimmed:?}: use a name like SIGTERM or SIGUSR1"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_parse_by_name_short_name_and_number() {
        assert_eq!(parse_signal("SIGTERM").unwrap(), Signal::SIGTERM);
        assert_eq!(parse_signal("usr1").unwrap(), Signal::SIGUSR1);
        assert_eq!(parse_signal("9").unwrap(), Signal::SIGKILL);
        assert!(parse_signal("SIGNOPE").unwrap_err().contains("SIGNOPE"));
    }
}
