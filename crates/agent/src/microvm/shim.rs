//! `aloft vm-shim MACHINE_DIR`: the supervisor of one microVM. Like the container shim it
//! outlives the agent. It starts QEMU in its jail with the launch description the agent
//! writes on its stdin, serves the guest's agent channel (boot config with the secrets,
//! ready, exit, signals, exec streams), writes the serial console into the machine's log,
//! answers the agent on `control.sock` (signal, exec, suspend, resume, kill), snapshots
//! the VM to a file on suspend and restores it on resume, and records how the machine
//! ended in `exit.json`.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use aloft_api::internal::{ExitStatus, ProcessStat};
use aloft_init::vm::channel::{self, BootConfig, Frame, GuestExit};
use serde::{Deserialize, Serialize};

use super::accel::Accel;
use super::jail::{self, Jail, JailSpec};
use crate::driver::write_exit;
use crate::logs::{LogWriter, pump};

pub const SHIM_COMMAND: &str = "vm-shim";
pub const CONTROL_SOCKET: &str = "control.sock";
pub const QEMU_PID_FILE: &str = "qemu.pid";
pub const SNAPSHOT_FILE: &str = "snapshot";

/// Control requests from the agent (first frame on a control connection, stream 0).
pub const CTL_SUSPEND: u8 = 40;
pub const CTL_RESUME: u8 = 41;
pub const CTL_KILL: u8 = 42;
pub const CTL_OK: u8 = 43;
pub const CTL_ERROR: u8 = 44;
/// Pauses the VM (its disks drained and flushed) for as long as the connection stays
/// open: a volume's image is then a consistent copy source.
pub const CTL_HOLD_IO: u8 = 45;

/// What the agent tells the shim (on its stdin, never on disk: `boot` holds secrets).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Launch {
    pub machine_id: String,
    pub qemu: PathBuf,
    pub accel: Accel,
    pub cpus: u32,
    pub memory_mb: u32,
    pub tap: String,
    pub mac: String,
    pub uid: u32,
    pub vmm_memory_limit_bytes: u64,
    pub ready_timeout_secs: u64,
    pub kernel_cmdline: String,
    pub boot: BootConfig,
    /// Volumes, as disks in this order (serials `fly-vol-N`); LUKS passphrases included.
    #[serde(default)]
    pub volumes: Vec<super::volume::VmDisk>,
}

impl Launch {
    /// QEMU's arguments (inside the jail), with the descriptors it is handed.
    pub fn qemu_args(&self, fds: &QemuFds, incoming: Option<RawFd>) -> Vec<String> {
        let microvm = self.accel == Accel::Kvm;
        let bus = |pci: &str, mmio: &str| {
            if microvm {
                mmio.to_string()
            } else {
                pci.to_string()
            }
        };
        let vm = jail::VM_DIR;
        let mut args: Vec<String> = vec![
            "-name".into(),
            format!("guest={},debug-threads=off", self.machine_id),
            "-M".into(),
            if microvm {
                "microvm,x-option-roms=off,pit=off,pic=off,rtc=off".into()
            } else {
                "q35".into()
            },
        ];
        match self.accel {
            Accel::Kvm => {
                args.extend(["-accel".into(), "kvm".into(), "-cpu".into(), "host".into()])
            }
            Accel::Tcg => args.extend([
                "-accel".into(),
                "tcg,tb-size=64".into(),
                "-cpu".into(),
                "max".into(),
            ]),
        }
        args.extend([
            "-smp".into(),
            self.cpus.max(1).to_string(),
            "-m".into(),
            self.memory_mb.to_string(),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-nographic".into(),
            "-no-reboot".into(),
            "-sandbox".into(),
            "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny".into(),
            "-kernel".into(),
            format!("{vm}/vmlinux"),
            "-initrd".into(),
            format!("{vm}/initrd"),
            "-append".into(),
            self.kernel_cmdline.clone(),
            "-chardev".into(),
            format!("socket,id=console,fd={}", fds.console),
            "-serial".into(),
            "chardev:console".into(),
            "-device".into(),
            bus("virtio-serial-pci,id=vser", "virtio-serial-device,id=vser"),
            "-chardev".into(),
            format!("socket,id=agent,fd={}", fds.agent),
            "-device".into(),
            format!(
                "virtserialport,bus=vser.0,chardev=agent,name={}",
                channel::PORT_NAME
            ),
            "-drive".into(),
            format!("file={vm}/disk.qcow2,format=qcow2,if=none,id=root,cache=unsafe,discard=unmap"),
            "-device".into(),
            bus("virtio-blk-pci,drive=root", "virtio-blk-device,drive=root"),
            "-netdev".into(),
            format!("tap,id=net,fd={}", fds.tap),
            "-device".into(),
            format!(
                "{},netdev=net,mac={}",
                bus("virtio-net-pci,romfile=", "virtio-net-device"),
                self.mac
            ),
            "-chardev".into(),
            format!("socket,id=qmp,fd={}", fds.qmp),
            "-mon".into(),
            "chardev=qmp,mode=control".into(),
        ]);
        for (i, (disk, volume_fds)) in self.volumes.iter().zip(&fds.volumes).enumerate() {
            // The image is opened by the shim and handed over (an fd set); QEMU's uid
            // cannot open it. The passphrase is read from an inherited pipe.
            let set = i + 1;
            args.extend([
                "-add-fd".into(),
                format!("fd={},set={set}", volume_fds.image),
                "-blockdev".into(),
                format!(
                    "driver=file,node-name=vol{i}-file,filename=/dev/fdset/{set},cache.direct=off,cache.no-flush=off"
                ),
            ]);
            match (disk.passphrase.as_ref(), volume_fds.key) {
                (Some(_), Some(key)) => args.extend([
                    "-object".into(),
                    format!("secret,id=vol{i}-key,file=/proc/self/fd/{key}"),
                    "-blockdev".into(),
                    format!("driver=luks,node-name=vol{i},file=vol{i}-file,key-secret=vol{i}-key"),
                ]),
                _ => args.extend([
                    "-blockdev".into(),
                    format!("driver=raw,node-name=vol{i},file=vol{i}-file"),
                ]),
            }
            args.extend([
                "-device".into(),
                format!(
                    "{},drive=vol{i},serial={}",
                    bus("virtio-blk-pci", "virtio-blk-device"),
                    super::volume::disk_serial(i)
                ),
            ]);
        }
        if !microvm {
            // SeaBIOS would print its banner on the serial console (the machine's log).
            args.extend(["-fw_cfg".into(), "name=etc/sercon-port,string=0".into()]);
        }
        if let Some(fd) = incoming {
            args.extend(["-incoming".into(), format!("fd:{fd}")]);
        }
        args
    }
}

/// The descriptor numbers QEMU gets.
pub struct QemuFds {
    pub console: RawFd,
    pub agent: RawFd,
    pub qmp: RawFd,
    pub tap: RawFd,
    /// Per volume disk: its image, and the pipe holding its passphrase (LUKS).
    pub volumes: Vec<VolumeFds>,
}

/// The descriptors of one volume disk.
pub struct VolumeFds {
    pub image: RawFd,
    pub key: Option<RawFd>,
}

struct Qemu {
    pid: i32,
    console: UnixStream,
    agent: UnixStream,
    qmp: UnixStream,
}

/// Opens the persistent tap device `name` (made by the agent) for QEMU.
pub fn open_tap(name: &str) -> Result<OwnedFd, String> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(|e| format!("opening /dev/net/tun: {e}"))?;
    // SAFETY: ifreq is plain data.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(name.bytes().take(15)) {
        *slot = byte as libc::c_char;
    }
    request.ifr_ifru.ifru_flags =
        (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    // SAFETY: TUNSETIFF with an ifreq.
    if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut request) } < 0 {
        return Err(format!(
            "attaching to tap {name}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(OwnedFd::from(file))
}

fn socketpair() -> Result<(UnixStream, UnixStream), String> {
    UnixStream::pair().map_err(|e| format!("socketpair: {e}"))
}

fn start_qemu(launch: &Launch, dir: &Path, incoming: Option<&File>) -> Result<Qemu, String> {
    let (console, console_qemu) = socketpair()?;
    let (agent, agent_qemu) = socketpair()?;
    let (qmp, qmp_qemu) = socketpair()?;
    let tap = open_tap(&launch.tap)?;
    // Held open until QEMU has its copies (the jail keeps them across exec).
    let mut volume_files: Vec<(File, Option<OwnedFd>)> = Vec::new();
    for disk in &launch.volumes {
        let image = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&disk.image)
            .map_err(|e| format!("opening the disk of volume {}: {e}", disk.volume))?;
        let key = match &disk.passphrase {
            Some(passphrase) => {
                let pipe = super::volume::secret_pipe(passphrase.as_bytes())
                    .map_err(|e| format!("handing the key of volume {}: {e}", disk.volume))?;
                // QEMU reopens the pipe through /proc/self/fd: it must be its uid's.
                // SAFETY: fchown on a descriptor we own.
                if unsafe { libc::fchown(pipe.as_raw_fd(), launch.uid, launch.uid) } != 0 {
                    return Err(format!(
                        "handing the key pipe of volume {} to uid {}: {}",
                        disk.volume,
                        launch.uid,
                        std::io::Error::last_os_error()
                    ));
                }
                Some(pipe)
            }
            None => None,
        };
        volume_files.push((image, key));
    }
    let fds = QemuFds {
        console: console_qemu.as_raw_fd(),
        agent: agent_qemu.as_raw_fd(),
        qmp: qmp_qemu.as_raw_fd(),
        tap: tap.as_raw_fd(),
        volumes: volume_files
            .iter()
            .map(|(image, key)| VolumeFds {
                image: image.as_raw_fd(),
                key: key.as_ref().map(|k| k.as_raw_fd()),
            })
            .collect(),
    };
    let incoming_fd = incoming.map(|f| f.as_raw_fd());
    let args = launch.qemu_args(&fds, incoming_fd);
    let null = File::open("/dev/null").map_err(|e| format!("/dev/null: {e}"))?;
    let (errors_read, errors_write) = pipe()?;
    let mut keep = vec![fds.console, fds.agent, fds.qmp, fds.tap];
    keep.extend(incoming_fd);
    for volume in &fds.volumes {
        keep.push(volume.image);
        keep.extend(volume.key);
    }
    let jail_root = dir.join("jail");
    std::fs::create_dir_all(&jail_root)
        .map_err(|e| format!("creating {}: {e}", jail_root.display()))?;
    let jail = Jail::new(JailSpec {
        root: &jail_root,
        qemu: &launch.qemu,
        vm_dir: &dir.join("vm"),
        kvm: launch.accel == Accel::Kvm,
        uid: launch.uid,
        args: &args,
        keep,
        stdio: [null.as_raw_fd(), null.as_raw_fd(), errors_write.as_raw_fd()],
    });
    let pid = jail.spawn()?.as_raw();
    drop(errors_write);
    drop(volume_files);
    jail::enter_cgroups(
        &launch.machine_id,
        pid,
        launch.vmm_memory_limit_bytes,
        launch.cpus,
    );
    let _ = std::fs::write(dir.join(QEMU_PID_FILE), pid.to_string());
    let log = dir.to_path_buf();
    std::thread::spawn(move || {
        // QEMU's own complaints go to the log too (prefixed, so they are told apart).
        let mut text = String::new();
        let mut reader = errors_read;
        let _ = reader.read_to_string(&mut text);
        if !text.trim().is_empty() {
            let mut writer = LogWriter::open(&log);
            // (QEMU warns about the SeaBIOS fw_cfg item it is given; that is expected.)
            for line in text
                .lines()
                .filter(|l| !l.trim().is_empty() && !l.contains("fw_cfg item names"))
            {
                writer.line("stderr", &format!("qemu: {line}"));
            }
        }
    });
    Ok(Qemu {
        pid,
        console,
        agent,
        qmp,
    })
}

fn pipe() -> Result<(File, File), String> {
    let mut fds = [0; 2];
    // SAFETY: room for two descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(format!("pipe: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: fresh descriptors.
    Ok(unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) })
}

#[derive(Default)]
struct State {
    ready: bool,
    exit: Option<GuestExit>,
    /// The VM is saved to its snapshot file and QEMU is gone.
    suspended: bool,
    resume_requested: bool,
    resumed: Option<Result<(), String>>,
    kill_requested: bool,
    qemu_pid: i32,
}

struct Shared {
    dir: PathBuf,
    launch: Mutex<Launch>,
    guest: Mutex<Option<UnixStream>>,
    qmp: Mutex<Option<Qmp>>,
    clients: Mutex<HashMap<u32, UnixStream>>,
    next_stream: Mutex<u32>,
    state: Mutex<State>,
    changed: Condvar,
    log: Arc<Mutex<LogWriter>>,
}

impl Shared {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn send_guest(&self, frame: &Frame) -> bool {
        let mut guest = self.guest.lock().unwrap_or_else(|p| p.into_inner());
        match guest.as_mut() {
            Some(stream) => channel::write_frame(stream, frame).is_ok(),
            None => false,
        }
    }

    fn note(&self, message: &str) {
        self.log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .line("stderr", message);
    }
}

/// Entry point of `aloft vm-shim MACHINE_DIR`; returns the shim's exit code.
pub fn main(args: &[String]) -> i32 {
    let [dir] = args else {
        eprintln!("usage: aloft vm-shim MACHINE_DIR");
        return 2;
    };
    let dir = PathBuf::from(dir);
    // SAFETY: fd 1 is the pipe the agent reads our one-line report from.
    let mut report = unsafe { File::from_raw_fd(1) };
    let mut input = Vec::new();
    let launch = std::io::stdin()
        .read_to_end(&mut input)
        .map_err(|e| e.to_string())
        .and_then(|_| serde_json::from_slice::<Launch>(&input).map_err(|e| e.to_string()));
    input.fill(0);
    let launch = match launch {
        Ok(launch) => launch,
        Err(e) => {
            let _ = writeln!(report, "error invalid launch description: {e}");
            return 2;
        }
    };
    let _ = std::fs::remove_file(dir.join(crate::driver::EXIT_FILE));
    let _ = std::fs::remove_file(dir.join(SNAPSHOT_FILE));
    let listener = match bind_control(&dir) {
        Ok(listener) => listener,
        Err(e) => {
            let _ = writeln!(report, "error {e}");
            return 1;
        }
    };
    let qemu = match start_qemu(&launch, &dir, None) {
        Ok(qemu) => qemu,
        Err(e) => {
            let _ = writeln!(report, "error {e}");
            return 1;
        }
    };
    let ready_timeout = Duration::from_secs(launch.ready_timeout_secs.max(1));
    let shared = Arc::new(Shared {
        dir: dir.clone(),
        launch: Mutex::new(launch),
        guest: Mutex::new(None),
        qmp: Mutex::new(None),
        clients: Mutex::new(HashMap::new()),
        next_stream: Mutex::new(1),
        state: Mutex::new(State::default()),
        changed: Condvar::new(),
        log: Arc::new(Mutex::new(LogWriter::open(&dir))),
    });
    let mut pumps = Vec::new();
    let qemu_pid = attach(&shared, qemu, &mut pumps);
    watch_qemu(&shared, qemu_pid);
    // Wait for the guest: ready (or an exit: the program could not start, which is the
    // machine's business), QEMU dying, or the time running out.
    let deadline = Instant::now() + ready_timeout;
    let outcome = {
        let mut state = shared.state();
        loop {
            if state.ready {
                break Ok(());
            }
            if let Some(exit) = &state.exit {
                break match &exit.error {
                    Some(error) if !exit_is_program_failure(error) => Err(error.clone()),
                    _ => Ok(()),
                };
            }
            if state.qemu_pid == 0 {
                break Err(
                    "QEMU exited before the guest signalled ready (see the machine's log)".into(),
                );
            }
            let now = Instant::now();
            if now >= deadline {
                break Err(format!(
                    "the guest did not signal ready within {}s (the kernel or init did not come up; see the machine's log)",
                    ready_timeout.as_secs()
                ));
            }
            state = shared
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    };
    if let Err(reason) = outcome {
        shared.note(&format!("init: {reason}"));
        let pid = shared.state().qemu_pid;
        if pid > 0 {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        wait_for_qemu_gone(&shared);
        jail::remove_cgroups(
            &shared
                .launch
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .machine_id,
        );
        let _ = writeln!(report, "error {}", reason.replace('\n', " "));
        return 1;
    }
    let _ = writeln!(report, "started {qemu_pid}");
    let _ = report.flush();
    drop(report);
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        // SAFETY: replacing our stdout with /dev/null.
        unsafe { libc::dup2(null.as_raw_fd(), 1) };
    }
    {
        let shared = shared.clone();
        std::thread::spawn(move || serve_control(shared, listener));
    }
    supervise(&shared, pumps)
}

/// A setup error that is the program's own failure (bad entrypoint, user, ...), which
/// ends the machine like a crash rather than failing its start.
fn exit_is_program_failure(error: &str) -> bool {
    !error.starts_with("mounting the root filesystem")
        && !error.contains("did not appear")
        && !error.contains("agent channel")
        && !error.contains("network")
}

fn bind_control(dir: &Path) -> Result<UnixListener, String> {
    let path = dir.join(CONTROL_SOCKET);
    let _ = std::fs::remove_file(&path);
    let listener =
        UnixListener::bind(&path).map_err(|e| format!("binding {}: {e}", path.display()))?;
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
    Ok(listener)
}

/// Wires a freshly started QEMU to the shim; returns its pid.
fn attach(shared: &Arc<Shared>, qemu: Qemu, pumps: &mut Vec<std::thread::JoinHandle<()>>) -> i32 {
    let Qemu {
        pid,
        console,
        agent,
        qmp,
    } = qemu;
    shared.state().qemu_pid = pid;
    pumps.push(pump("stdout", console, shared.log.clone()));
    *shared.guest.lock().unwrap_or_else(|p| p.into_inner()) = agent.try_clone().ok();
    *shared.qmp.lock().unwrap_or_else(|p| p.into_inner()) = Some(Qmp::new(qmp));
    let reader_shared = shared.clone();
    std::thread::spawn(move || read_guest(reader_shared, agent));
    pid
}

fn watch_qemu(shared: &Arc<Shared>, pid: i32) {
    let shared = shared.clone();
    std::thread::spawn(move || {
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        if libc::WIFEXITED(status)
            && let Some(step) = jail::setup_failure(libc::WEXITSTATUS(status))
        {
            shared.note(&format!("vm-shim: QEMU did not start: {step} failed"));
        }
        let mut state = shared.state();
        if state.qemu_pid == pid {
            state.qemu_pid = 0;
        }
        shared.changed.notify_all();
    });
}

fn wait_for_qemu_gone(shared: &Shared) {
    let mut state = shared.state();
    while state.qemu_pid != 0 {
        state = shared
            .changed
            .wait(state)
            .unwrap_or_else(|p| p.into_inner());
    }
}

/// Frames from the guest: boot handshake, ready, exit, and exec output for clients.
fn read_guest(shared: Arc<Shared>, mut agent: UnixStream) {
    loop {
        let frame = match channel::read_frame(&mut agent) {
            Ok(frame) => frame,
            Err(_) => return,
        };
        match (frame.stream, frame.kind) {
            (0, channel::HELLO) => {
                let boot = shared
                    .launch
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .boot
                    .clone();
                shared.send_guest(&Frame::json(0, channel::BOOT, &boot));
            }
            (0, channel::READY) => {
                shared.state().ready = true;
                shared.changed.notify_all();
            }
            (0, channel::EXIT) => {
                let exit = serde_json::from_slice::<GuestExit>(&frame.payload).unwrap_or_default();
                if let Some(error) = &exit.error {
                    shared.note(&format!("init: {error}"));
                }
                shared.state().exit = Some(exit);
                shared.changed.notify_all();
            }
            (0, _) => {}
            (stream, kind) => {
                let mut clients = shared.clients.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(client) = clients.get_mut(&stream) {
                    let forwarded = Frame::new(0, kind, frame.payload);
                    if channel::write_frame(client, &forwarded).is_err()
                        || kind == channel::EXEC_EXIT
                    {
                        clients.remove(&stream);
                    }
                }
            }
        }
    }
}

fn serve_control(shared: Arc<Shared>, listener: UnixListener) {
    for connection in listener.incoming().flatten() {
        let shared = shared.clone();
        std::thread::spawn(move || serve_client(shared, connection));
    }
}

fn reply(client: &mut UnixStream, result: Result<(), String>) {
    let frame = match result {
        Ok(()) => Frame::new(0, CTL_OK, Vec::new()),
        Err(message) => Frame::new(0, CTL_ERROR, message),
    };
    let _ = channel::write_frame(client, &frame);
}

fn serve_client(shared: Arc<Shared>, mut client: UnixStream) {
    let Ok(first) = channel::read_frame(&mut client) else {
        return;
    };
    match first.kind {
        channel::SIGNAL => {
            let sent = shared.send_guest(&Frame::new(0, channel::SIGNAL, first.payload));
            reply(
                &mut client,
                if sent {
                    Ok(())
                } else {
                    Err("the machine is not running".into())
                },
            );
        }
        CTL_SUSPEND => {
            let result = suspend(&shared);
            reply(&mut client, result);
        }
        CTL_RESUME => {
            let result = request_resume(&shared);
            reply(&mut client, result);
        }
        CTL_HOLD_IO => hold_io(&shared, client),
        CTL_KILL => {
            let mut state = shared.state();
            state.kill_requested = true;
            if state.qemu_pid > 0 {
                // SAFETY: signalling our own child.
                unsafe { libc::kill(state.qemu_pid, libc::SIGKILL) };
            }
            shared.changed.notify_all();
            drop(state);
            reply(&mut client, Ok(()));
        }
        // An exec, or a process listing: a stream of its own until the guest ends it.
        channel::EXEC | channel::PS => {
            let stream = {
                let mut next = shared.next_stream.lock().unwrap_or_else(|p| p.into_inner());
                *next += 1;
                *next
            };
            let Ok(writer) = client.try_clone() else {
                return;
            };
            shared
                .clients
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(stream, writer);
            if !shared.send_guest(&Frame::new(stream, first.kind, first.payload)) {
                shared
                    .clients
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&stream);
                let _ = channel::write_frame(
                    &mut client,
                    &Frame::new(0, channel::EXEC_ERROR, "the machine is not running"),
                );
                let _ = channel::write_frame(
                    &mut client,
                    &Frame::new(0, channel::EXEC_EXIT, (-1i32).to_be_bytes()),
                );
                return;
            }
            while let Ok(frame) = channel::read_frame(&mut client) {
                shared.send_guest(&Frame::new(stream, frame.kind, frame.payload));
            }
            // The client went away: end what it ran, if it still runs.
            if shared
                .clients
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&stream)
                .is_some()
            {
                shared.send_guest(&Frame::new(
                    stream,
                    channel::SIGNAL,
                    libc::SIGHUP.to_be_bytes(),
                ));
                shared.send_guest(&Frame::new(
                    stream,
                    channel::SIGNAL,
                    libc::SIGKILL.to_be_bytes(),
                ));
            }
        }
        _ => reply(
            &mut client,
            Err(format!("unknown control request {}", first.kind)),
        ),
    }
}

/// Saves the running VM to the snapshot file and ends QEMU (the shim stays).
/// Stops the VM's CPUs (QEMU drains and flushes its disks), answers, and continues it
/// when the client closes the connection, whatever happened to the client meanwhile.
fn hold_io(shared: &Arc<Shared>, mut client: UnixStream) {
    let stopped = {
        let mut qmp_guard = shared.qmp.lock().unwrap_or_else(|p| p.into_inner());
        match qmp_guard.as_mut() {
            Some(qmp) => qmp.execute("stop", None).map(|_| ()),
            None => Err("the machine is not running".to_string()),
        }
    };
    if let Err(err) = stopped {
        reply(&mut client, Err(err));
        return;
    }
    shared.note("paused while a snapshot of its volumes is taken");
    reply(&mut client, Ok(()));
    let mut rest = Vec::new();
    let _ = client.read_to_end(&mut rest);
    let continued = shared
        .qmp
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_mut()
        .map(|qmp| qmp.execute("cont", None));
    match continued {
        Some(Err(err)) => shared.note(&format!("continuing after the snapshot: {err}")),
        _ => shared.note("continued after the snapshot"),
    }
}

/// Holds the VM paused (see [`CTL_HOLD_IO`]) until the returned connection is dropped.
pub fn hold_io_until_dropped(machine_dir: &Path) -> Result<UnixStream, String> {
    let path = machine_dir.join(CONTROL_SOCKET);
    let mut stream =
        UnixStream::connect(&path).map_err(|_| "the machine is not running".to_string())?;
    let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
    channel::write_frame(&mut stream, &Frame::new(0, CTL_HOLD_IO, Vec::new()))
        .map_err(|e| format!("talking to the machine's supervisor: {e}"))?;
    let answer = channel::read_frame(&mut stream)
        .map_err(|e| format!("the machine's supervisor did not answer: {e}"))?;
    match answer.kind {
        CTL_OK => Ok(stream),
        _ => Err(String::from_utf8_lossy(&answer.payload).into_owned()),
    }
}

fn suspend(shared: &Arc<Shared>) -> Result<(), String> {
    {
        let state = shared.state();
        if state.suspended {
            return Ok(());
        }
        if state.qemu_pid == 0 {
            return Err("the machine is not running".into());
        }
    }
    let path = shared.dir.join("vm").join(SNAPSHOT_FILE);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .map_err(|e| format!("creating {}: {e}", path.display()))?;
    let mut qmp_guard = shared.qmp.lock().unwrap_or_else(|p| p.into_inner());
    let qmp = qmp_guard
        .as_mut()
        .ok_or("QEMU's monitor is not connected")?;
    qmp.execute("stop", None)?;
    qmp.send_fd("snapshot", file.as_raw_fd())?;
    drop(file);
    qmp.execute("migrate", Some(serde_json::json!({ "uri": "fd:snapshot" })))?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let status = qmp.execute("query-migrate", None)?;
        match status["status"].as_str().unwrap_or_default() {
            "completed" => break,
            "failed" | "cancelled" => {
                let _ = qmp.execute("cont", None);
                return Err(format!(
                    "saving the VM failed: {}",
                    status["error-desc"].as_str().unwrap_or("no reason given")
                ));
            }
            _ if Instant::now() > deadline => {
                let _ = qmp.execute("migrate_cancel", None);
                let _ = qmp.execute("cont", None);
                return Err("saving the VM took longer than 120s".into());
            }
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    {
        let mut state = shared.state();
        state.suspended = true;
        state.resumed = None;
    }
    let _ = qmp.execute("quit", None);
    drop(qmp_guard);
    wait_for_qemu_gone(shared);
    Ok(())
}

fn request_resume(shared: &Arc<Shared>) -> Result<(), String> {
    let mut state = shared.state();
    if !state.suspended {
        return if state.qemu_pid > 0 {
            Ok(())
        } else {
            Err("the machine is not running".into())
        };
    }
    state.resume_requested = true;
    shared.changed.notify_all();
    loop {
        if let Some(result) = state.resumed.take() {
            return result;
        }
        state = shared
            .changed
            .wait(state)
            .unwrap_or_else(|p| p.into_inner());
    }
}

/// Follows QEMU (and its successors across suspend/resume) until the machine ends.
fn supervise(shared: &Arc<Shared>, mut pumps: Vec<std::thread::JoinHandle<()>>) -> i32 {
    loop {
        wait_for_qemu_gone(shared);
        let mut state = shared.state();
        if !state.suspended || state.kill_requested {
            break;
        }
        while !state.resume_requested && !state.kill_requested {
            state = shared
                .changed
                .wait(state)
                .unwrap_or_else(|p| p.into_inner());
        }
        if state.kill_requested {
            break;
        }
        state.resume_requested = false;
        drop(state);
        let restored = restore(shared, &mut pumps);
        let mut state = shared.state();
        if restored.is_ok() {
            state.suspended = false;
        }
        state.resumed = Some(restored);
        shared.changed.notify_all();
    }
    for pump in pumps {
        let _ = pump.join();
    }
    let launch = shared
        .launch
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    jail::remove_cgroups(&launch.machine_id);
    let state = shared.state();
    let mut status = ExitStatus {
        exit_code: -1,
        exited_at: Some(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
        ..Default::default()
    };
    match &state.exit {
        Some(exit) => {
            status.exit_code = exit.exit_code;
            status.signal = exit.signal;
            status.oom_killed = exit.oom_killed;
        }
        None if state.kill_requested => {
            status.exit_code = 128 + libc::SIGKILL;
            status.signal = Some(libc::SIGKILL);
        }
        None => {
            drop(state);
            shared.note("init: the VM ended without init reporting an exit (guest kernel crash? see the console above)");
            write_exit(&shared.dir, &status);
            let _ = std::fs::remove_file(shared.dir.join(QEMU_PID_FILE));
            return 0;
        }
    }
    write_exit(&shared.dir, &status);
    let _ = std::fs::remove_file(shared.dir.join(QEMU_PID_FILE));
    0
}

/// Starts a new QEMU from the snapshot file; the guest continues where it was.
fn restore(
    shared: &Arc<Shared>,
    pumps: &mut Vec<std::thread::JoinHandle<()>>,
) -> Result<(), String> {
    let path = shared.dir.join("vm").join(SNAPSHOT_FILE);
    let snapshot = File::open(&path).map_err(|e| format!("opening {}: {e}", path.display()))?;
    let launch = shared
        .launch
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let qemu = start_qemu(&launch, &shared.dir, Some(&snapshot))?;
    drop(snapshot);
    let pid = attach(shared, qemu, pumps);
    watch_qemu(shared, pid);
    // Incoming migration runs the VM as soon as it is loaded.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let status = {
            let mut qmp = shared.qmp.lock().unwrap_or_else(|p| p.into_inner());
            let qmp = qmp.as_mut().ok_or("QEMU's monitor is not connected")?;
            qmp.execute("query-status", None)?
        };
        match status["status"].as_str().unwrap_or_default() {
            "running" => break,
            "postmigrate" | "paused" => {
                let mut qmp = shared.qmp.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(qmp) = qmp.as_mut() {
                    qmp.execute("cont", None)?;
                }
                break;
            }
            _ if Instant::now() > deadline => {
                return Err("restoring the VM took longer than 120s".into());
            }
            _ if shared.state().qemu_pid == 0 => {
                return Err("QEMU exited while restoring the VM (see the machine's log)".into());
            }
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    let _ = std::fs::remove_file(&path);
    Ok(())
}

/// A QMP (QEMU's JSON monitor) connection.
pub struct Qmp {
    stream: UnixStream,
    buffer: Vec<u8>,
    negotiated: bool,
}

impl Qmp {
    fn new(stream: UnixStream) -> Self {
        let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
        Self {
            stream,
            buffer: Vec::new(),
            negotiated: false,
        }
    }

    fn read_message(&mut self) -> Result<serde_json::Value, String> {
        loop {
            if let Some(end) = self.buffer.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buffer.drain(..=end).collect();
                if let Ok(value) = serde_json::from_slice::<serde_json::Value>(&line) {
                    return Ok(value);
                }
                continue;
            }
            let mut chunk = [0u8; 4096];
            let n = self
                .stream
                .read(&mut chunk)
                .map_err(|e| format!("QMP: {e}"))?;
            if n == 0 {
                return Err("QMP: QEMU closed its monitor".into());
            }
            self.buffer.extend_from_slice(&chunk[..n]);
        }
    }

    fn negotiate(&mut self) -> Result<(), String> {
        if self.negotiated {
            return Ok(());
        }
        // The greeting, then capabilities negotiation.
        loop {
            if self.read_message()?.get("QMP").is_some() {
                break;
            }
        }
        self.negotiated = true;
        self.execute("qmp_capabilities", None).map(|_| ())
    }

    fn write_command(
        &mut self,
        command: &str,
        arguments: Option<serde_json::Value>,
        fd: Option<RawFd>,
    ) -> Result<(), String> {
        let mut message = serde_json::json!({ "execute": command });
        if let Some(arguments) = arguments {
            message["arguments"] = arguments;
        }
        let mut bytes = serde_json::to_vec(&message).map_err(|e| e.to_string())?;
        bytes.push(b'\n');
        match fd {
            None => self
                .stream
                .write_all(&bytes)
                .map_err(|e| format!("QMP: {e}")),
            Some(fd) => send_with_fd(&self.stream, &bytes, fd),
        }
    }

    fn wait_reply(&mut self, command: &str) -> Result<serde_json::Value, String> {
        loop {
            let message = self.read_message()?;
            if let Some(value) = message.get("return") {
                return Ok(value.clone());
            }
            if let Some(error) = message.get("error") {
                return Err(format!(
                    "QMP {command}: {}",
                    error["desc"].as_str().unwrap_or("failed")
                ));
            }
        }
    }

    pub fn execute(
        &mut self,
        command: &str,
        arguments: Option<serde_json::Value>,
    ) -> Result<serde_json::Value, String> {
        if command != "qmp_capabilities" {
            self.negotiate()?;
        }
        self.write_command(command, arguments, None)?;
        self.wait_reply(command)
    }

    /// Hands QEMU a descriptor under `name` (`getfd` with SCM_RIGHTS).
    pub fn send_fd(&mut self, name: &str, fd: RawFd) -> Result<(), String> {
        self.negotiate()?;
        self.write_command(
            "getfd",
            Some(serde_json::json!({ "fdname": name })),
            Some(fd),
        )?;
        self.wait_reply("getfd").map(|_| ())
    }
}

fn send_with_fd(stream: &UnixStream, bytes: &[u8], fd: RawFd) -> Result<(), String> {
    // SAFETY: sendmsg with one iovec and one SCM_RIGHTS control message, all sized here.
    unsafe {
        let mut iov = libc::iovec {
            iov_base: bytes.as_ptr() as *mut libc::c_void,
            iov_len: bytes.len(),
        };
        let space = libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) as usize;
        let mut control = vec![0u8; space];
        let mut message: libc::msghdr = std::mem::zeroed();
        message.msg_iov = &mut iov;
        message.msg_iovlen = 1;
        message.msg_control = control.as_mut_ptr().cast();
        message.msg_controllen = space;
        let header = libc::CMSG_FIRSTHDR(&message);
        (*header).cmsg_level = libc::SOL_SOCKET;
        (*header).cmsg_type = libc::SCM_RIGHTS;
        (*header).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(header).cast::<RawFd>(), fd);
        if libc::sendmsg(stream.as_raw_fd(), &message, 0) < 0 {
            return Err(format!(
                "QMP: passing a descriptor: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

/// Sends one control request to a machine's shim and waits for its answer.
pub fn control(machine_dir: &Path, frame: &Frame) -> Result<(), String> {
    let path = machine_dir.join(CONTROL_SOCKET);
    let mut stream =
        UnixStream::connect(&path).map_err(|_| "the machine is not running".to_string())?;
    let _ = stream.set_read_timeout(Some(Duration::from_secs(180)));
    channel::write_frame(&mut stream, frame)
        .map_err(|e| format!("talking to the machine's supervisor: {e}"))?;
    let answer = channel::read_frame(&mut stream)
        .map_err(|e| format!("the machine's supervisor did not answer: {e}"))?;
    match answer.kind {
        CTL_OK => Ok(()),
        _ => Err(String::from_utf8_lossy(&answer.payload).into_owned()),
    }
}

/// The guest's processes, listed by init inside it.
pub fn processes(machine_dir: &Path) -> Result<Vec<ProcessStat>, String> {
    let path = machine_dir.join(CONTROL_SOCKET);
    let mut stream =
        UnixStream::connect(&path).map_err(|_| "the machine is not running".to_string())?;
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    channel::write_frame(&mut stream, &Frame::new(0, channel::PS, Vec::new()))
        .map_err(|e| format!("talking to the machine's supervisor: {e}"))?;
    loop {
        let frame = channel::read_frame(&mut stream)
            .map_err(|e| format!("the machine did not list its processes: {e}"))?;
        match frame.kind {
            channel::PROCESSES => {
                return serde_json::from_slice(&frame.payload)
                    .map_err(|e| format!("the machine's process list is unreadable: {e}"));
            }
            channel::EXEC_ERROR => return Err(String::from_utf8_lossy(&frame.payload).into_owned()),
            channel::EXEC_EXIT => return Err("the machine is not running".into()),
            _ => {}
        }
    }
}
