//! Commands run inside machines: one-shot exec (output collected, with a time limit) and
//! interactive sessions (`aloft ssh console`) bridged to an upgraded HTTP connection with
//! the frames of [`aloft_api::internal::console_frame`].

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use aloft_api::internal::console_frame as frame;
use aloft_api::internal::{ExecResponse, MachineExecRequest};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::AgentError;
#[cfg(test)]
use crate::driver::HostProcess;
use crate::driver::{ExecHandle, ExecIo, ExecProcess};

/// Seconds an exec may run when the request sets no timeout.
pub const DEFAULT_EXEC_TIMEOUT_SECS: u64 = 30;
/// Output kept from each of stdout and stderr of a one-shot exec.
const MAX_OUTPUT: usize = 4 * 1024 * 1024;

/// The command of an exec request: `command`, else the deprecated `cmd` split like a shell.
pub fn exec_argv(request: &MachineExecRequest) -> Result<Vec<String>, String> {
    let argv = if !request.command.is_empty() {
        request.command.clone()
    } else if let Some(cmd) = request.cmd.as_deref().filter(|c| !c.trim().is_empty()) {
        shell_words::split(cmd).map_err(|e| format!("invalid cmd {cmd:?}: {e}"))?
    } else {
        return Err(
            "invalid exec request: `command` is required (e.g. {\"command\": [\"ls\", \"-l\"]})"
                .into(),
        );
    };
    if argv[0].is_empty() {
        return Err("invalid exec request: the command's first word is empty".into());
    }
    Ok(argv)
}

fn read_capped(mut pipe: impl Read) -> String {
    let mut kept = Vec::new();
    let mut buffer = [0u8; 8192];
    loop {
        match pipe.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = MAX_OUTPUT.saturating_sub(kept.len());
                kept.extend_from_slice(&buffer[..n.min(room)]);
            }
        }
    }
    String::from_utf8_lossy(&kept).into_owned()
}

/// Feeds `stdin`, collects the output and waits, killing the command after `timeout`.
pub fn collect(
    process: ExecProcess,
    stdin: &[u8],
    timeout: Duration,
) -> Result<ExecResponse, AgentError> {
    let ExecProcess { mut handle, io } = process;
    let ExecIo::Pipes {
        stdin: input,
        stdout,
        stderr,
    } = io
    else {
        handle.kill();
        return Err(AgentError::Failed(
            "a one-shot exec runs without a terminal".into(),
        ));
    };
    if let Some(mut input) = input {
        let data = stdin.to_vec();
        std::thread::spawn(move || {
            let _ = input.write_all(&data);
        });
    }
    let out = std::thread::spawn(move || read_capped(stdout));
    let err = std::thread::spawn(move || read_capped(stderr));
    let deadline = Instant::now() + timeout;
    let exit_code = loop {
        match handle.try_wait() {
            Ok(Some(code)) => break code,
            Ok(None) if Instant::now() >= deadline => {
                end(handle.as_mut());
                return Err(AgentError::Timeout(format!(
                    "deadline exceeded: the command ran longer than {}s and was killed",
                    timeout.as_secs()
                )));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(AgentError::Failed(format!("waiting for the command: {e}"))),
        }
    };
    // The runtime reports a command killed by a signal as 128 + the signal.
    let exit_signal = if (129..=192).contains(&exit_code) {
        exit_code - 128
    } else {
        0
    };
    Ok(ExecResponse {
        exit_code,
        exit_signal,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

/// Ends an exec'd command: asked first, killed a second later.
fn end(handle: &mut dyn ExecHandle) {
    handle.terminate();
    for _ in 0..100 {
        if let Ok(Some(_)) = handle.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    handle.kill();
}

fn set_window(fd: &OwnedFd, cols: u16, rows: u16) {
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &size) };
}

/// Output chunks of the command, read on blocking threads.
fn spawn_reader(kind: u8, mut source: impl Read + Send + 'static, sink: mpsc::Sender<Vec<u8>>) {
    std::thread::spawn(move || {
        let mut buffer = vec![0u8; 16 * 1024];
        loop {
            match source.read(&mut buffer) {
                // A terminal reads EIO once the command (and every holder of it) is gone.
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if sink
                        .blocking_send(frame::encode(kind, &buffer[..n]))
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
    });
}

/// Runs an interactive session over `connection` until the command exits (then sends its
/// exit code) or the client goes away (then the command is ended).
pub async fn bridge<C: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    process: ExecProcess,
    connection: C,
) {
    let ExecProcess { handle, io } = process;
    let (output_tx, mut output_rx) = mpsc::channel::<Vec<u8>>(64);
    let (mut reader, mut writer) = tokio::io::split(connection);
    let (stdin_sink, terminal): (Option<Box<dyn Write + Send>>, Option<OwnedFd>) = match io {
        ExecIo::Terminal(master) => {
            let (Ok(read_side), Ok(write_side)) = (master.try_clone(), master.try_clone()) else {
                return;
            };
            spawn_reader(
                frame::STDOUT,
                std::fs::File::from(read_side),
                output_tx.clone(),
            );
            (
                Some(Box::new(std::fs::File::from(write_side))),
                Some(master),
            )
        }
        ExecIo::Pipes {
            stdin,
            stdout,
            stderr,
        } => {
            spawn_reader(frame::STDOUT, stdout, output_tx.clone());
            spawn_reader(frame::STDERR, stderr, output_tx.clone());
            (stdin, None)
        }
    };
    drop(output_tx);
    let (exit_tx, mut exit_rx) = tokio::sync::oneshot::channel::<i32>();
    // The waiter polls so the session can still end the command when the client leaves.
    let handle = std::sync::Arc::new(std::sync::Mutex::new(handle));
    let waited = handle.clone();
    std::thread::spawn(move || {
        let code = loop {
            let status = waited.lock().unwrap_or_else(|p| p.into_inner()).try_wait();
            match status {
                Ok(Some(code)) => break code,
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(_) => break -1,
            }
        };
        let _ = exit_tx.send(code);
    });
    // Input is written on a blocking thread so a full pipe cannot stall the session.
    let (input_tx, input_rx) = std::sync::mpsc::channel::<Option<Vec<u8>>>();
    if let Some(mut sink) = stdin_sink {
        std::thread::spawn(move || {
            while let Ok(Some(bytes)) = input_rx.recv() {
                if sink.write_all(&bytes).is_err() {
                    break;
                }
            }
        });
    }
    let mut pending = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    let mut output_open = true;
    let mut client_open = true;
    let exit_code = loop {
        tokio::select! {
            code = &mut exit_rx => break code.unwrap_or(-1),
            out = output_rx.recv(), if output_open => match out {
                Some(bytes) => {
                    if writer.write_all(&bytes).await.is_err() {
                        client_open = false;
                        break -1;
                    }
                }
                None => output_open = false,
            },
            read = reader.read(&mut chunk), if client_open => match read {
                Ok(0) | Err(_) => {
                    client_open = false;
                    break -1;
                }
                Ok(n) => {
                    pending.extend_from_slice(&chunk[..n]);
                    while let Some((kind, payload)) = frame::decode(&mut pending) {
                        match kind {
                            frame::STDIN => {
                                let _ = input_tx.send(Some(payload));
                            }
                            frame::STDIN_EOF => {
                                let _ = input_tx.send(None);
                            }
                            frame::RESIZE if payload.len() == 4 => {
                                if let Some(fd) = &terminal {
                                    set_window(fd, u16::from_be_bytes([payload[0], payload[1]]), u16::from_be_bytes([payload[2], payload[3]]));
                                }
                            }
                            _ => {}
                        }
                    }
                    if pending.len() > frame::MAX_PAYLOAD + 5 {
                        client_open = false;
                        break -1;
                    }
                }
            },
        }
    };
    if !client_open {
        // The client went away: end the command (the runtime passes SIGHUP/SIGTERM on).
        handle.lock().unwrap_or_else(|p| p.into_inner()).terminate();
        return;
    }
    // Flush what the command printed before it exited.
    drop(terminal);
    let drain_until = tokio::time::Instant::now() + Duration::from_millis(500);
    while let Ok(Some(bytes)) = tokio::time::timeout_at(drain_until, output_rx.recv()).await {
        if writer.write_all(&bytes).await.is_err() {
            return;
        }
    }
    let _ = writer
        .write_all(&frame::encode(frame::EXIT, &exit_code.to_be_bytes()))
        .await;
    let _ = writer.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_requests_take_command_or_split_cmd() {
        let request = MachineExecRequest {
            command: vec!["ls".into(), "-l".into()],
            ..Default::default()
        };
        assert_eq!(exec_argv(&request).unwrap(), ["ls", "-l"]);
        let request = MachineExecRequest {
            cmd: Some("sh -c 'echo hi there'".into()),
            ..Default::default()
        };
        assert_eq!(exec_argv(&request).unwrap(), ["sh", "-c", "echo hi there"]);
        assert!(
            exec_argv(&MachineExecRequest::default())
                .unwrap_err()
                .contains("`command` is required")
        );
    }

    fn local(argv: &[&str]) -> ExecProcess {
        let mut child = std::process::Command::new(argv[0])
            .args(&argv[1..])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let io = ExecIo::Pipes {
            stdin: child
                .stdin
                .take()
                .map(|s| Box::new(s) as Box<dyn Write + Send>),
            stdout: Box::new(child.stdout.take().unwrap()),
            stderr: Box::new(child.stderr.take().unwrap()),
        };
        ExecProcess {
            handle: Box::new(HostProcess(child)),
            io,
        }
    }

    #[test]
    fn collect_returns_output_and_exit_code() {
        let response = collect(
            local(&["sh", "-c", "read x; echo out:$x; echo err >&2; exit 3"]),
            b"given\n",
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(response.stdout, "out:given\n");
        assert_eq!(response.stderr, "err\n");
        assert_eq!(response.exit_code, 3);
    }

    #[test]
    fn collect_kills_commands_that_overrun() {
        let err = collect(local(&["sleep", "30"]), b"", Duration::from_millis(200)).unwrap_err();
        assert!(err.to_string().contains("deadline exceeded"), "{err}");
    }

    #[tokio::test]
    async fn bridge_carries_input_output_and_the_exit_code() {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let session = tokio::spawn(bridge(
            local(&["sh", "-c", "read x; echo got:$x; exit 7"]),
            server,
        ));
        let (mut read, mut write) = tokio::io::split(client);
        write
            .write_all(&frame::encode(frame::STDIN, b"hello\n"))
            .await
            .unwrap();
        let mut received = Vec::new();
        read.read_to_end(&mut received).await.unwrap();
        session.await.unwrap();
        let mut output = Vec::new();
        let mut code = None;
        while let Some((kind, payload)) = frame::decode(&mut received) {
            match kind {
                frame::STDOUT => output.extend(payload),
                frame::EXIT => {
                    code = Some(i32::from_be_bytes([
                        payload[0], payload[1], payload[2], payload[3],
                    ]))
                }
                _ => {}
            }
        }
        assert_eq!(String::from_utf8_lossy(&output), "got:hello\n");
        assert_eq!(code, Some(7));
    }
}
