//! Stage two in a microVM: the ordinary init (config on fd 3) that also serves the agent
//! channel: it reports when the program runs and how the machine ended, passes signals
//! on, and runs `exec` commands (on pipes or a terminal) with their I/O on the channel.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::supervise::{ChildExit, Supervisor};
use crate::vm::boot::power_off;
use crate::vm::channel::{self, ExecRequest, Frame, GuestExit};
use crate::{InitError, load_config, lookup_path, supervise};

/// Runs stage two with the channel on `fd`; never returns (the machine powers off).
pub fn run(fd: RawFd) -> ! {
    // SAFETY: stage one handed us this descriptor and nothing else owns it.
    let port = unsafe { File::from_raw_fd(fd) };
    // SAFETY: fcntl on our own descriptor.
    unsafe {
        libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
        let flags = libc::fcntl(fd, libc::F_GETFL);
        libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
    }
    let mut guest = Guest {
        port,
        open: true,
        buffer: Vec::new(),
        sessions: HashMap::new(),
    };
    let exit = match start(&mut guest) {
        Ok(exit) => exit,
        Err(error) => {
            eprintln!("init: {error}");
            GuestExit {
                exit_code: error.exit_code(),
                error: Some(error.to_string()),
                ..Default::default()
            }
        }
    };
    guest.send(&Frame::json(0, channel::EXIT, &exit));
    power_off()
}

fn start(guest: &mut Guest) -> Result<GuestExit, InitError> {
    supervise::block_signals()?;
    let config = load_config()?;
    let mut sup = Supervisor::new()?;
    let child = crate::start_main(&mut sup, &config)?;
    guest.send(&Frame::new(0, channel::READY, Vec::new()));
    let exit = guest.supervise(&mut sup, child);
    eprintln!("init: {}", exit.describe());
    sup.shutdown(child);
    Ok(GuestExit {
        exit_code: exit.exit_code(),
        signal: match exit {
            ChildExit::Signaled(signal) => Some(signal),
            ChildExit::Exited(_) => None,
        },
        oom_killed: oom_kills() > 0,
        error: None,
    })
}

/// How many processes the guest kernel's OOM killer has killed since boot.
fn oom_kills() -> u64 {
    std::fs::read_to_string("/proc/vmstat")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

struct Session {
    pid: Pid,
    stdin: Option<File>,
    /// Output descriptors and the frame kind their bytes go out as.
    outputs: Vec<(u8, File)>,
    terminal: Option<OwnedFd>,
    exit: Option<i32>,
}

struct Guest {
    port: File,
    open: bool,
    buffer: Vec<u8>,
    sessions: HashMap<u32, Session>,
}

fn set_nonblocking(fd: RawFd) {
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
    }
}

impl Guest {
    /// Writes a frame whole; a host that went away closes the channel (the machine goes on).
    fn send(&mut self, frame: &Frame) {
        if !self.open {
            return;
        }
        let bytes = frame.encode();
        let mut written = 0;
        while written < bytes.len() {
            match self.port.write(&bytes[written..]) {
                Ok(0) => break,
                Ok(n) => written += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    let mut pfd = libc::pollfd {
                        fd: self.port.as_raw_fd(),
                        events: libc::POLLOUT,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd.
                    if unsafe { libc::poll(&mut pfd, 1, 10_000) } <= 0 {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    }

    fn supervise(&mut self, sup: &mut Supervisor, child: Pid) -> ChildExit {
        loop {
            for (pid, exit) in sup.reap_exited() {
                if pid == child {
                    return exit;
                }
                if let Some(session) = self.sessions.values_mut().find(|s| s.pid == pid) {
                    session.exit = Some(exit.exit_code());
                }
            }
            self.finish_sessions();
            let mut fds = vec![libc::pollfd {
                fd: sup.signal_fd(),
                events: libc::POLLIN,
                revents: 0,
            }];
            if self.open {
                fds.push(libc::pollfd {
                    fd: self.port.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
            }
            let mut owners = Vec::new();
            for (stream, session) in &self.sessions {
                for (index, (_, output)) in session.outputs.iter().enumerate() {
                    fds.push(libc::pollfd {
                        fd: output.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    });
                    owners.push((*stream, index));
                }
            }
            // A host that is away (between a snapshot and its restore) is tried again.
            let timeout = if self.open { -1 } else { 500 };
            // SAFETY: `fds` is a valid array of pollfds.
            unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
            for signal in sup.pending_signals() {
                if signal != libc::SIGCHLD {
                    supervise::forward(child, signal);
                }
            }
            let port_events = if self.open { fds[1].revents } else { 0 };
            if !self.open || port_events & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                self.read_port(child);
            }
            let first_output = if self.open { 2 } else { 1 };
            let mut closed = Vec::new();
            for (pfd, (stream, index)) in fds[first_output..].iter().zip(owners) {
                if pfd.revents == 0 {
                    continue;
                }
                if !self.pump_output(stream, index) {
                    closed.push((stream, index));
                }
            }
            // Remove from the back so earlier indices stay valid.
            closed.sort_unstable_by_key(|c| std::cmp::Reverse(c.1));
            for (stream, index) in closed {
                if let Some(session) = self.sessions.get_mut(&stream) {
                    session.outputs.remove(index);
                }
            }
        }
    }

    fn read_port(&mut self, child: Pid) {
        let mut chunk = [0u8; 64 * 1024];
        loop {
            match self.port.read(&mut chunk) {
                Ok(0) => {
                    // The host end is not connected; look again later.
                    self.open = false;
                    return;
                }
                Ok(n) => {
                    self.open = true;
                    self.buffer.extend_from_slice(&chunk[..n]);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    self.open = true;
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.open = false;
                    return;
                }
            }
        }
        loop {
            match channel::decode(&mut self.buffer) {
                Ok(Some(frame)) => self.handle(frame, child),
                Ok(None) => break,
                Err(error) => {
                    eprintln!("init: agent channel: {error}; dropping what was buffered");
                    self.buffer.clear();
                    break;
                }
            }
        }
    }

    fn handle(&mut self, frame: Frame, child: Pid) {
        match (frame.stream, frame.kind) {
            (0, channel::SIGNAL) => {
                if let Some(signal) = frame.int() {
                    supervise::forward(child, signal);
                }
            }
            (0, _) => {}
            (stream, channel::EXEC) => {
                let started = serde_json::from_slice::<ExecRequest>(&frame.payload)
                    .map_err(|e| format!("invalid exec request: {e}"))
                    .and_then(|request| spawn_exec(&request));
                match started {
                    Ok(session) => {
                        self.sessions.insert(stream, session);
                    }
                    Err(message) => {
                        self.send(&Frame::new(stream, channel::EXEC_ERROR, message));
                        self.send(&Frame::new(
                            stream,
                            channel::EXEC_EXIT,
                            127i32.to_be_bytes(),
                        ));
                    }
                }
            }
            (stream, channel::PS) => {
                let processes = crate::procfs::all_processes();
                self.send(&Frame::json(stream, channel::PROCESSES, &processes));
                self.send(&Frame::new(stream, channel::EXEC_EXIT, 0i32.to_be_bytes()));
            }
            (stream, kind) => {
                let Some(session) = self.sessions.get_mut(&stream) else {
                    return;
                };
                match kind {
                    channel::STDIN => {
                        if let Some(stdin) = session.stdin.as_mut() {
                            let _ = stdin.write_all(&frame.payload);
                        }
                    }
                    // A terminal has no end of input (the session ends with the command).
                    channel::STDIN_EOF if session.terminal.is_none() => {
                        session.stdin = None;
                    }
                    channel::RESIZE if frame.payload.len() == 4 => {
                        if let Some(terminal) = &session.terminal {
                            let size = libc::winsize {
                                ws_col: u16::from_be_bytes([frame.payload[0], frame.payload[1]]),
                                ws_row: u16::from_be_bytes([frame.payload[2], frame.payload[3]]),
                                ws_xpixel: 0,
                                ws_ypixel: 0,
                            };
                            // SAFETY: TIOCSWINSZ with a winsize.
                            unsafe { libc::ioctl(terminal.as_raw_fd(), libc::TIOCSWINSZ, &size) };
                        }
                    }
                    channel::SIGNAL => {
                        if let Some(signal) = frame.int().and_then(|s| Signal::try_from(s).ok()) {
                            let _ = kill(Pid::from_raw(-session.pid.as_raw()), signal);
                            let _ = kill(session.pid, signal);
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    /// Moves what an exec'd command wrote to the channel; `false` once that output ended.
    fn pump_output(&mut self, stream: u32, index: usize) -> bool {
        let mut chunk = vec![0u8; 32 * 1024];
        let (kind, result) = {
            let Some(session) = self.sessions.get_mut(&stream) else {
                return false;
            };
            let Some((kind, output)) = session.outputs.get_mut(index) else {
                return false;
            };
            (*kind, output.read(&mut chunk))
        };
        match result {
            Ok(0) => false,
            Ok(n) => {
                self.send(&Frame::new(stream, kind, &chunk[..n]));
                true
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => true,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => true,
            // A terminal reads EIO once nothing holds its other side.
            Err(_) => false,
        }
    }

    /// Sends the exit of commands that ended, after what they wrote.
    fn finish_sessions(&mut self) {
        let done: Vec<u32> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.exit.is_some())
            .map(|(stream, _)| *stream)
            .collect();
        for stream in done {
            // The command is gone, so what it wrote is buffered already: drain it.
            while let Some(last) = self
                .sessions
                .get(&stream)
                .and_then(|s| s.outputs.len().checked_sub(1))
            {
                while self
                    .sessions
                    .get(&stream)
                    .is_some_and(|s| s.outputs.get(last).is_some_and(|(_, f)| !would_block(f)))
                    && self.pump_output(stream, last)
                {}
                if let Some(session) = self.sessions.get_mut(&stream) {
                    session.outputs.truncate(last);
                }
            }
            if let Some(session) = self.sessions.remove(&stream) {
                let code = session.exit.unwrap_or(-1);
                self.send(&Frame::new(stream, channel::EXEC_EXIT, code.to_be_bytes()));
            }
        }
    }
}

/// Whether reading `file` now would block (nothing buffered).
fn would_block(file: &File) -> bool {
    let mut pfd = libc::pollfd {
        fd: file.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no waiting.
    unsafe { libc::poll(&mut pfd, 1, 0) == 0 }
}

fn spawn_exec(request: &ExecRequest) -> Result<Session, String> {
    let name = request
        .argv
        .first()
        .filter(|a| !a.is_empty())
        .ok_or("no command given")?;
    let program = lookup_path(
        name,
        request.env.get("PATH").map(String::as_str),
        std::path::Path::new("/"),
    )
    .map_err(|e| e.to_string())?;
    let mut command = Command::new(&program);
    command
        .arg0(name)
        .args(&request.argv[1..])
        .env_clear()
        .envs(&request.env)
        .current_dir("/");
    let tty = request.tty;
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        command.pre_exec(move || {
            libc::setsid();
            if tty.is_some() {
                libc::ioctl(0, libc::TIOCSCTTY, 0);
            }
            for sig in 1..libc::SIGRTMAX() {
                if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                    libc::signal(sig, libc::SIG_DFL);
                }
            }
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            Ok(())
        });
    }
    let describe = |e: std::io::Error| format!("starting {}: {e}", program.display());
    match tty {
        Some((cols, rows)) => {
            let size = nix::pty::Winsize {
                ws_row: rows,
                ws_col: cols,
                ws_xpixel: 0,
                ws_ypixel: 0,
            };
            let pty = nix::pty::openpty(Some(&size), None)
                .map_err(|e| format!("allocating a terminal: {e}"))?;
            let slave = pty.slave;
            let clone = |fd: &OwnedFd| fd.try_clone().map_err(|e| format!("terminal: {e}"));
            command
                .stdin(Stdio::from(clone(&slave)?))
                .stdout(Stdio::from(clone(&slave)?))
                .stderr(Stdio::from(slave));
            if !request.env.contains_key("TERM") {
                command.env("TERM", "xterm");
            }
            let child = command.spawn().map_err(describe)?;
            drop(command);
            let master = pty.master;
            set_nonblocking(master.as_raw_fd());
            let output = File::from(clone(&master)?);
            let input = File::from(clone(&master)?);
            Ok(Session {
                pid: Pid::from_raw(child.id() as i32),
                stdin: Some(input),
                outputs: vec![(channel::STDOUT, output)],
                terminal: Some(master),
                exit: None,
            })
        }
        None => {
            command
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            let mut child = command.spawn().map_err(describe)?;
            let stdin = child.stdin.take().map(|s| File::from(OwnedFd::from(s)));
            let mut outputs = Vec::new();
            if let Some(out) = child.stdout.take() {
                let file = File::from(OwnedFd::from(out));
                set_nonblocking(file.as_raw_fd());
                outputs.push((channel::STDOUT, file));
            }
            if let Some(err) = child.stderr.take() {
                let file = File::from(OwnedFd::from(err));
                set_nonblocking(file.as_raw_fd());
                outputs.push((channel::STDERR, file));
            }
            Ok(Session {
                pid: Pid::from_raw(child.id() as i32),
                stdin,
                outputs,
                terminal: None,
                exit: None,
            })
        }
    }
}
