//! The per-machine shim: `aloft shim MACHINE_DIR RUNTIME RUNTIME_ROOT CONTAINER_ID`.
//!
//! It outlives the agent, so machines keep running when the agent restarts. It creates
//! and starts the container through the OCI runtime, hands init its config on a pipe,
//! reports `started <pid>` (or `error <reason>`) on stdout, then collects the container's
//! output into the machine's log, waits for it to exit, and records how it ended in
//! `exit.json` before removing the container.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use aloft_api::internal::ExitStatus;

use crate::container::oom_kills;
use crate::driver::{EXIT_FILE, write_exit};
use crate::logs::{LogWriter, pump};

/// Where the container's init pid is recorded (host pid namespace).
pub const PID_FILE: &str = "container.pid";

struct ShimArgs {
    machine_dir: PathBuf,
    runtime: PathBuf,
    runtime_root: PathBuf,
    container_id: String,
}

fn parse_args(args: &[String]) -> Result<ShimArgs, String> {
    match args {
        [dir, runtime, root, id] => Ok(ShimArgs {
            machine_dir: PathBuf::from(dir),
            runtime: PathBuf::from(runtime),
            runtime_root: PathBuf::from(root),
            container_id: id.clone(),
        }),
        _ => Err("usage: aloft shim MACHINE_DIR RUNTIME RUNTIME_ROOT CONTAINER_ID".into()),
    }
}

/// Entry point of `aloft shim ...`; returns the shim's own exit code.
pub fn main(args: &[String]) -> i32 {
    let args = match parse_args(args) {
        Ok(args) => args,
        Err(message) => {
            eprintln!("{message}");
            return 2;
        }
    };
    // Its own session, so signals aimed at the agent's process group miss it. Done here
    // rather than between fork and exec so the agent can spawn us without forking.
    unsafe { libc::setsid() };
    // Become a subreaper: the container's first process is re-parented to us when the
    // runtime's `create` exits, so we can wait for it.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let mut report = unsafe { File::from_raw_fd(1) };
    match launch(&args) {
        Ok(launched) => {
            let runtime_ms = RUNTIME_MILLIS.load(std::sync::atomic::Ordering::Relaxed);
            let _ = writeln!(report, "started {} runtime_ms={runtime_ms}", launched.pid);
            let _ = report.flush();
            drop(report);
            redirect_stdout_to_null();
            // What launching needed is not needed again: give the heap back.
            unsafe { libc::malloc_trim(0) };
            supervise(&args, launched)
        }
        Err(reason) => {
            let _ = writeln!(report, "error {}", reason.replace('\n', " "));
            1
        }
    }
}

struct Launched {
    pid: i32,
    stdout: File,
    stderr: File,
}

fn pipe() -> Result<(File, File), String> {
    let mut fds = [0; 2];
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(format!("pipe: {}", std::io::Error::last_os_error()));
    }
    Ok(unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) })
}

fn runtime_command(args: &ShimArgs) -> Command {
    let mut command = Command::new(&args.runtime);
    command.arg("--root").arg(&args.runtime_root);
    command
}

fn launch(args: &ShimArgs) -> Result<Launched, String> {
    let mut init_config = Vec::new();
    std::io::stdin()
        .read_to_end(&mut init_config)
        .map_err(|e| format!("reading init config: {e}"))?;
    let (config_read, mut config_write) = pipe()?;
    let (stdout_read, stdout_write) = pipe()?;
    let (stderr_read, stderr_write) = pipe()?;
    let bundle = args.machine_dir.join("bundle");
    let pid_file = args.machine_dir.join(PID_FILE);
    let _ = std::fs::remove_file(&pid_file);
    let _ = std::fs::remove_file(args.machine_dir.join(EXIT_FILE));
    // A container of the same name left by an earlier run would make `run` fail.
    if args.runtime_root.join(&args.container_id).exists() {
        let _ = runtime_command(args)
            .args(["delete", "--force", &args.container_id])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }

    let config_fd = config_read.as_raw_fd();
    // `run --detach` creates and starts in one runtime invocation; the container's
    // first process is re-parented to us (a subreaper) when it returns.
    let mut create = runtime_command(args);
    create
        .arg("run")
        .arg("--detach")
        .arg("--bundle")
        .arg(&bundle)
        .arg("--pid-file")
        .arg(&pid_file)
        .arg("--preserve-fds")
        .arg("1")
        .arg(&args.container_id)
        .stdin(Stdio::null())
        .stdout(Stdio::from(
            stdout_write.try_clone().map_err(|e| e.to_string())?,
        ))
        .stderr(Stdio::from(
            stderr_write.try_clone().map_err(|e| e.to_string())?,
        ));
    unsafe {
        create.pre_exec(move || {
            // dup2 onto itself would keep close-on-exec set, so clear it explicitly then.
            let ok = if config_fd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0) >= 0
            } else {
                libc::dup2(config_fd, 3) >= 0
            };
            if ok {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    let began = std::time::Instant::now();
    let status = create
        .status()
        .map_err(|e| format!("running {}: {e}", args.runtime.display()))?;
    RUNTIME_MILLIS.store(
        began.elapsed().as_millis() as u64,
        std::sync::atomic::Ordering::Relaxed,
    );
    drop(config_read);
    drop(stdout_write);
    drop(stderr_write);
    if !status.success() {
        let reason = drain(stderr_read);
        let _ = runtime_command(args)
            .args(["delete", "--force", &args.container_id])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        return Err(format!("{} run failed: {reason}", args.runtime.display()));
    }
    let pid = read_pid(&pid_file)?;
    // init reads its config only once started; the pipe is written after that so a
    // config larger than the pipe buffer cannot block us.
    std::thread::spawn(move || {
        let _ = config_write.write_all(&init_config);
    });
    Ok(Launched {
        pid,
        stdout: stdout_read,
        stderr: stderr_read,
    })
}

fn drain(mut pipe: File) -> String {
    unsafe {
        let flags = libc::fcntl(pipe.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(pipe.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
    }
    let mut text = String::new();
    let _ = pipe.read_to_string(&mut text);
    let text = text.trim();
    if text.is_empty() {
        "no output".into()
    } else {
        text.lines().last().unwrap_or(text).to_string()
    }
}

fn read_pid(path: &Path) -> Result<i32, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    text.trim()
        .parse()
        .map_err(|_| format!("{} holds no pid", path.display()))
}

fn redirect_stdout_to_null() {
    if let Ok(null) = OpenOptions::new().write(true).open("/dev/null") {
        unsafe { libc::dup2(null.as_raw_fd(), 1) };
    }
}

fn supervise(args: &ShimArgs, launched: Launched) -> i32 {
    let log = std::sync::Arc::new(std::sync::Mutex::new(LogWriter::open(&args.machine_dir)));
    let out = pump("stdout", launched.stdout, log.clone());
    let err = pump("stderr", launched.stderr, log.clone());
    let mut status = ExitStatus {
        exit_code: -1,
        ..Default::default()
    };
    loop {
        let mut raw = 0;
        let pid = unsafe { libc::waitpid(-1, &mut raw, 0) };
        if pid < 0 {
            break;
        }
        if pid == launched.pid {
            if libc::WIFEXITED(raw) {
                status.exit_code = libc::WEXITSTATUS(raw);
            } else if libc::WIFSIGNALED(raw) {
                let signal = libc::WTERMSIG(raw);
                status.signal = Some(signal);
                status.exit_code = 128 + signal;
            }
            break;
        }
    }
    status.oom_killed = oom_kills(&args.container_id) > 0;
    status.exited_at =
        Some(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
    if status.signal.is_none() && status.exit_code > 128 {
        status.signal = Some(status.exit_code - 128);
    }
    let _ = runtime_command(args)
        .args(["delete", "--force", &args.container_id])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let _ = out.join();
    let _ = err.join();
    write_exit(&args.machine_dir, &status);
    0
}

/// Whether `pid` is this machine's shim (guards against pid reuse after a restart).
pub fn is_shim_of(pid: i32, machine_dir: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    args.len() >= 3
        && (args[1] == b"shim" || args[1] == crate::microvm::shim::SHIM_COMMAND.as_bytes())
        && args[2] == machine_dir.as_os_str().as_encoded_bytes()
}

/// An owned pidfd for `pid`, to learn when it exits without being its parent.
pub fn pidfd(pid: i32) -> std::io::Result<OwnedFd> {
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Registers a pidfd with the runtime so its exit can be awaited.
pub fn exit_watch(pid: i32) -> std::io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    let fd = pidfd(pid)?;
    // SAFETY: the AsyncFd owns the OwnedFd, so the descriptor stays open while registered.
    unsafe { tokio::io::unix::AsyncFd::register(fd) }
        .map_err(|e| std::io::Error::other(e.to_string()))
}

/// How long the runtime's `run` took, for the start report.
static RUNTIME_MILLIS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
