//! `aloft ssh console`: a shell (or `--command`) inside a machine's namespaces, with a
//! terminal when stdin is one. Also the session code `aloft machine exec` uses: an HTTP
//! upgrade to `/v1/apps/{app}/machines/{id}/console` carrying console frames.

use std::io::{IsTerminal, Read, Write};
use std::os::fd::AsFd;

use aloft_api::Machine;
use aloft_api::internal::console_frame as frame;
use anyhow::{Context, bail};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::settings::ApiArgs;

#[derive(clap::Subcommand, Debug)]
pub enum SshCommand {
    /// Open a shell (or run --command) in one of the app's machines.
    Console(ConsoleArgs),
}

#[derive(clap::Args, Debug)]
pub struct ConsoleArgs {
    #[arg(short = 'a', long = "app")]
    pub app: Option<String>,
    #[arg(short = 'c', long = "config")]
    pub config: Option<std::path::PathBuf>,
    /// Pick the machine from a list.
    #[arg(short = 's', long)]
    pub select: bool,
    /// The machine to connect to (default: the first started one).
    #[arg(long)]
    pub machine: Option<String>,
    /// Run this command instead of a shell.
    #[arg(short = 'C', long)]
    pub command: Option<String>,
    /// Allocate a terminal (default: when stdin is one and no command is given).
    #[arg(long)]
    pub pty: bool,
}

/// What to run in the machine, and how.
pub struct Session<'a> {
    pub app: &'a str,
    pub machine: &'a str,
    /// `None` runs the machine's default shell.
    pub command: Option<Vec<String>>,
    pub tty: bool,
    /// Forward our stdin (else the command's stdin is closed at once).
    pub stdin: bool,
}

async fn open(
    api: &ApiArgs,
    session: &Session<'_>,
    size: Option<(u16, u16)>,
) -> anyhow::Result<hyper::upgrade::Upgraded> {
    let base = api.api_url()?;
    let token = api.token()?;
    let authority = base
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    if authority.starts_with("https://") {
        bail!("interactive sessions need a plain-HTTP API URL for now (got {base})");
    }
    let mut query = vec![format!("tty={}", session.tty)];
    if let Some((cols, rows)) = size {
        query.push(format!("cols={cols}&rows={rows}"));
    }
    if let Some(command) = &session.command {
        query.push(format!(
            "command={}",
            aloft_client::encode_component(&serde_json::to_string(command)?)
        ));
    }
    let path = format!(
        "{}/machines/{}/console?{}",
        super::status::app_path(session.app),
        aloft_client::encode_component(session.machine),
        query.join("&")
    );
    let stream = tokio::net::TcpStream::connect(&authority)
        .await
        .with_context(|| format!("cannot reach the Aloft API at {base}"))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = connection.with_upgrades().await;
    });
    let request = http::Request::builder()
        .uri(path)
        .header(http::header::HOST, &authority)
        .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
        .header(http::header::CONNECTION, "Upgrade")
        .header(http::header::UPGRADE, frame::PROTOCOL)
        .body(http_body_util::Empty::<bytes::Bytes>::new())?;
    let response = sender.send_request(request).await?;
    if response.status() != http::StatusCode::SWITCHING_PROTOCOLS {
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        return Err(aloft_client::api_error(status, &body).into());
    }
    Ok(hyper::upgrade::on(response).await?)
}

fn terminal_size() -> Option<(u16, u16)> {
    let mut size = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let ok = unsafe { libc::ioctl(libc::STDIN_FILENO, libc::TIOCGWINSZ, &mut size) } == 0;
    (ok && size.ws_col > 0).then_some((size.ws_col, size.ws_row))
}

/// Puts our terminal in raw mode until dropped.
struct RawMode(Option<nix::sys::termios::Termios>);

impl RawMode {
    fn enter() -> Self {
        let stdin = std::io::stdin();
        let Ok(saved) = nix::sys::termios::tcgetattr(stdin.as_fd()) else {
            return Self(None);
        };
        let mut raw = saved.clone();
        nix::sys::termios::cfmakeraw(&mut raw);
        let _ =
            nix::sys::termios::tcsetattr(stdin.as_fd(), nix::sys::termios::SetArg::TCSANOW, &raw);
        Self(Some(saved))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            let _ = nix::sys::termios::tcsetattr(
                std::io::stdin().as_fd(),
                nix::sys::termios::SetArg::TCSANOW,
                saved,
            );
        }
    }
}

/// Runs a session to its end; returns the command's exit code.
pub async fn run_session(api: &ApiArgs, session: Session<'_>) -> anyhow::Result<i32> {
    let size = if session.tty {
        terminal_size().or(Some((80, 24)))
    } else {
        None
    };
    let upgraded = open(api, &session, size).await?;
    let (mut reader, mut writer) = tokio::io::split(TokioIo::new(upgraded));
    let _raw = (session.tty && std::io::stdin().is_terminal()).then(RawMode::enter);

    let (input_tx, mut input_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(64);
    if session.stdin {
        let input = input_tx.clone();
        std::thread::spawn(move || {
            let mut stdin = std::io::stdin();
            let mut buffer = [0u8; 8192];
            loop {
                match stdin.read(&mut buffer) {
                    Ok(0) | Err(_) => {
                        let _ = input.blocking_send(frame::encode(frame::STDIN_EOF, &[]));
                        break;
                    }
                    Ok(n) => {
                        if input
                            .blocking_send(frame::encode(frame::STDIN, &buffer[..n]))
                            .is_err()
                        {
                            break;
                        }
                    }
                }
            }
        });
    } else {
        let _ = input_tx.send(frame::encode(frame::STDIN_EOF, &[])).await;
    }
    if session.tty {
        let resize = input_tx.clone();
        tokio::spawn(async move {
            let Ok(mut changes) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())
            else {
                return;
            };
            while changes.recv().await.is_some() {
                if let Some((cols, rows)) = terminal_size() {
                    let mut payload = cols.to_be_bytes().to_vec();
                    payload.extend_from_slice(&rows.to_be_bytes());
                    if resize
                        .send(frame::encode(frame::RESIZE, &payload))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        });
    }
    drop(input_tx);
    let forward = tokio::spawn(async move {
        while let Some(bytes) = input_rx.recv().await {
            if writer.write_all(&bytes).await.is_err() {
                return;
            }
        }
    });
    let mut pending = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    let mut exit_code = None;
    let mut stdout = std::io::stdout();
    let mut stderr = std::io::stderr();
    'session: loop {
        let read = reader
            .read(&mut chunk)
            .await
            .context("reading from the machine")?;
        if read == 0 {
            break;
        }
        pending.extend_from_slice(&chunk[..read]);
        while let Some((kind, payload)) = frame::decode(&mut pending) {
            match kind {
                frame::STDOUT => {
                    stdout.write_all(&payload)?;
                    stdout.flush()?;
                }
                frame::STDERR => {
                    stderr.write_all(&payload)?;
                    stderr.flush()?;
                }
                frame::EXIT if payload.len() == 4 => {
                    exit_code = Some(i32::from_be_bytes([
                        payload[0], payload[1], payload[2], payload[3],
                    ]));
                    break 'session;
                }
                _ => {}
            }
        }
    }
    forward.abort();
    exit_code.ok_or_else(|| {
        anyhow::anyhow!("the session ended before the command did (connection lost)")
    })
}

/// The machine a console goes to: the one named, one picked from a list, or the first
/// started one.
async fn pick_machine(api: &ApiArgs, app: &str, args: &ConsoleArgs) -> anyhow::Result<String> {
    if let Some(machine) = args.machine.as_deref().filter(|m| !m.is_empty()) {
        return Ok(machine.to_string());
    }
    let machines: Vec<Machine> = api
        .client()?
        .get(&format!("{}/machines", super::status::app_path(app)))
        .await?;
    let started: Vec<&Machine> = machines
        .iter()
        .filter(|m| m.state == aloft_api::MachineState::Started)
        .collect();
    if started.is_empty() {
        bail!("app {app} has no started machines to connect to");
    }
    if !args.select {
        return Ok(started[0].id.clone());
    }
    eprintln!("Select a machine:");
    for (index, machine) in started.iter().enumerate() {
        eprintln!(
            "  {}) {} {} ({})",
            index + 1,
            machine.id,
            machine.region,
            machine.name
        );
    }
    eprint!("? ");
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer)?;
    let choice: usize = answer
        .trim()
        .parse()
        .with_context(|| format!("{:?} is not a number from the list", answer.trim()))?;
    started
        .get(choice.wrapping_sub(1))
        .map(|m| m.id.clone())
        .ok_or_else(|| anyhow::anyhow!("{choice} is not in the list (1 to {})", started.len()))
}

pub async fn console(api: &ApiArgs, app: &str, args: &ConsoleArgs) -> anyhow::Result<i32> {
    let machine = pick_machine(api, app, args).await?;
    let command = match args.command.as_deref() {
        Some(text) => {
            Some(shell_words::split(text).with_context(|| format!("invalid --command {text:?}"))?)
        }
        None => None,
    };
    let tty = args.pty || (command.is_none() && std::io::stdin().is_terminal());
    if tty {
        eprintln!("Connecting to {machine}... complete");
    }
    run_session(
        api,
        Session {
            app,
            machine: &machine,
            command,
            tty,
            stdin: true,
        },
    )
    .await
}
