//! `exec` and `ssh console` in a microVM. The agent opens an exec stream on the machine's
//! shim (the request, with the machine's environment, goes over that socket only) and
//! hands the connected socket to `aloft vm-exec` as fd 3: a small process that stands for
//! the command on the host, as `runc exec` does for containers. It relays its stdin,
//! stdout and stderr (or its terminal, in raw mode, with window size changes), passes the
//! signals it gets on, and exits with the command's exit code.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use aloft_init::vm::channel::{self, ExecRequest, Frame};
use nix::sys::signal::{SigSet, Signal};

use super::shim::CONTROL_SOCKET;
use crate::driver::{DriverError, ExecCommand, ExecProcess, io};

pub const EXEC_COMMAND: &str = "vm-exec";
const SOCKET_FD: i32 = 3;

/// Starts `command` in the machine behind `machine_dir`'s shim.
pub fn start(
    aloft_binary: &Path,
    machine_dir: &Path,
    command: &ExecCommand,
) -> Result<ExecProcess, DriverError> {
    if command.argv.is_empty() || command.argv[0].is_empty() {
        return Err(DriverError::Operation("no command given".into()));
    }
    let mut socket = UnixStream::connect(machine_dir.join(CONTROL_SOCKET))
        .map_err(|_| DriverError::NotRunning)?;
    let request = ExecRequest {
        argv: command.argv.clone(),
        env: command.env.clone(),
        tty: command.tty.map(|s| (s.cols, s.rows)),
    };
    channel::write_frame(&mut socket, &Frame::json(0, channel::EXEC, &request))
        .map_err(io("opening an exec stream"))?;
    let socket = OwnedFd::from(socket);
    let socket_fd = socket.as_raw_fd();
    let mut helper = Command::new(aloft_binary);
    helper.arg(EXEC_COMMAND);
    if command.tty.is_some() {
        helper.arg("--tty");
    }
    // SAFETY: dup2/fcntl between fork and exec.
    unsafe {
        helper.pre_exec(move || {
            if socket_fd == SOCKET_FD {
                libc::fcntl(SOCKET_FD, libc::F_SETFD, 0);
            } else if libc::dup2(socket_fd, SOCKET_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let spawned = crate::driver::spawn_host_exec(helper, command.tty, "aloft vm-exec");
    drop(socket);
    spawned
}

fn window_size() -> Option<(u16, u16)> {
    // SAFETY: TIOCGWINSZ into a winsize.
    let mut size: libc::winsize = unsafe { std::mem::zeroed() };
    (unsafe { libc::ioctl(0, libc::TIOCGWINSZ, &mut size) } == 0)
        .then_some((size.ws_col, size.ws_row))
}

/// Entry point of `aloft vm-exec [--tty]`: relays between its stdio and fd 3.
pub fn main(args: &[String]) -> i32 {
    let tty = args.iter().any(|a| a == "--tty");
    let mut signals = SigSet::empty();
    for signal in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGQUIT,
        Signal::SIGWINCH,
    ] {
        signals.add(signal);
    }
    let _ = signals.thread_block();
    // SAFETY: fd 3 is the exec stream the agent handed us.
    let socket = unsafe { UnixStream::from_raw_fd(SOCKET_FD) };
    let Ok(mut writer) = socket.try_clone() else {
        return 1;
    };
    let saved = if tty {
        nix::sys::termios::tcgetattr(std::io::stdin())
            .ok()
            .inspect(|original| {
                let mut raw = original.clone();
                nix::sys::termios::cfmakeraw(&mut raw);
                let _ = nix::sys::termios::tcsetattr(
                    std::io::stdin(),
                    nix::sys::termios::SetArg::TCSANOW,
                    &raw,
                );
            })
    } else {
        None
    };
    let Ok(signal_writer) = socket.try_clone() else {
        return 1;
    };
    std::thread::spawn(move || {
        let mut writer = signal_writer;
        loop {
            let Ok(signal) = signals.wait() else {
                return;
            };
            let frame = if signal == Signal::SIGWINCH {
                match window_size() {
                    Some((cols, rows)) => {
                        let mut payload = cols.to_be_bytes().to_vec();
                        payload.extend(rows.to_be_bytes());
                        Frame::new(0, channel::RESIZE, payload)
                    }
                    None => continue,
                }
            } else {
                Frame::new(0, channel::SIGNAL, (signal as i32).to_be_bytes())
            };
            if channel::write_frame(&mut writer, &frame).is_err() {
                return;
            }
        }
    });
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin();
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match stdin.read(&mut chunk) {
                Ok(0) | Err(_) => {
                    let _ = channel::write_frame(
                        &mut writer,
                        &Frame::new(0, channel::STDIN_EOF, Vec::new()),
                    );
                    return;
                }
                Ok(n) => {
                    if channel::write_frame(
                        &mut writer,
                        &Frame::new(0, channel::STDIN, &chunk[..n]),
                    )
                    .is_err()
                    {
                        return;
                    }
                }
            }
        }
    });
    let mut reader = socket;
    let mut stdout = std::io::stdout();
    let mut stderr = std::io::stderr();
    let code = loop {
        let Ok(frame) = channel::read_frame(&mut reader) else {
            let _ = writeln!(stderr, "the machine went away");
            break 255;
        };
        match frame.kind {
            channel::STDOUT => {
                let _ = stdout.write_all(&frame.payload);
                let _ = stdout.flush();
            }
            channel::STDERR => {
                let _ = stderr.write_all(&frame.payload);
            }
            channel::EXEC_ERROR => {
                let _ = writeln!(stderr, "{}", String::from_utf8_lossy(&frame.payload));
            }
            channel::EXEC_EXIT => break frame.int().unwrap_or(-1),
            _ => {}
        }
    };
    if let Some(original) = saved {
        let _ = nix::sys::termios::tcsetattr(
            std::io::stdin(),
            nix::sys::termios::SetArg::TCSANOW,
            &original,
        );
    }
    code & 0xff
}
