//! UDP services (`protocol = "udp"`) on an app's dedicated IPs. Each client address is a
//! flow: its first datagram picks a machine (starting one if autostart allows), the flow
//! gets its own socket connected to `private_ipv4:internal_port`, and the machine's
//! replies go back to the client from the public address. A flow ends after a minute
//! without traffic either way; while it lasts it counts as one connection of the machine.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::Proxy;
use crate::lb::Constraints;

/// A flow without a datagram either way for this long ends.
const FLOW_IDLE: Duration = Duration::from_secs(60);
/// Flows per listener; datagrams of further clients are dropped.
const MAX_FLOWS: usize = 4096;
/// Datagrams queued per flow (while its machine starts, or a burst); more are dropped.
const FLOW_QUEUE: usize = 64;
const MAX_DATAGRAM: usize = 65_535;

/// A UDP socket on a (possibly not yet configured) address.
pub(crate) fn bind(addr: SocketAddr) -> io::Result<UdpSocket> {
    let domain = if addr.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let socket = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    socket.set_reuse_address(true)?;
    let _ = if addr.is_ipv4() {
        socket.set_freebind_v4(true)
    } else {
        socket.set_freebind_v6(true)
    };
    if addr.is_ipv6() {
        let _ = socket.set_only_v6(true);
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

type Flows = Arc<Mutex<HashMap<SocketAddr, mpsc::Sender<Bytes>>>>;

fn lock(flows: &Flows) -> MutexGuard<'_, HashMap<SocketAddr, mpsc::Sender<Bytes>>> {
    flows.lock().unwrap_or_else(|p| p.into_inner())
}

/// Relays the datagrams arriving on `socket` (the app's public port) to its machines.
pub(crate) async fn relay(
    proxy: Arc<Proxy>,
    socket: UdpSocket,
    app: String,
    public_port: u16,
    mut stop: watch::Receiver<bool>,
) {
    let socket = Arc::new(socket);
    let flows: Flows = Arc::default();
    // Flows end with the listener (their sender side goes when this task is dropped).
    let (_listening, listener_alive) = watch::channel(());
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let (n, client) = tokio::select! {
            received = socket.recv_from(&mut buf) => match received {
                Ok(received) => received,
                Err(e) => {
                    tracing::debug!(app, public_port, error = %e, "UDP receive failed");
                    continue;
                }
            },
            _ = stop.wait_for(|s| *s) => return,
        };
        let mut datagram = Bytes::copy_from_slice(&buf[..n]);
        let mut table = lock(&flows);
        if let Some(to_flow) = table.get(&client) {
            match to_flow.try_send(datagram) {
                Ok(()) => continue,
                // A flow that cannot keep up loses datagrams, as a congested link would.
                Err(mpsc::error::TrySendError::Full(_)) => continue,
                Err(mpsc::error::TrySendError::Closed(back)) => {
                    table.remove(&client);
                    datagram = back;
                }
            }
        }
        if table.len() >= MAX_FLOWS {
            tracing::debug!(app, public_port, "UDP flow table full: datagram dropped");
            continue;
        }
        let (to_flow, from_client) = mpsc::channel(FLOW_QUEUE);
        let _ = to_flow.try_send(datagram);
        table.insert(client, to_flow);
        drop(table);
        let flow = Flow {
            proxy: proxy.clone(),
            socket: socket.clone(),
            app: app.clone(),
            public_port,
            client,
            listener_alive: listener_alive.clone(),
        };
        let flows = flows.clone();
        tokio::spawn(async move {
            flow.run(from_client).await;
            let mut table = lock(&flows);
            if table
                .get(&client)
                .is_some_and(|to_flow| to_flow.is_closed())
            {
                table.remove(&client);
            }
        });
    }
}

struct Flow {
    proxy: Arc<Proxy>,
    /// The public socket replies leave from.
    socket: Arc<UdpSocket>,
    app: String,
    public_port: u16,
    client: SocketAddr,
    listener_alive: watch::Receiver<()>,
}

impl Flow {
    async fn run(mut self, mut from_client: mpsc::Receiver<Bytes>) {
        let deadline = std::time::Instant::now() + self.proxy.config.machine_wait;
        let chosen = match self
            .proxy
            .choose(
                &self.app,
                self.public_port,
                &Constraints {
                    local_only: true,
                    ..Constraints::default()
                },
                deadline,
            )
            .await
        {
            Ok(chosen) => chosen,
            Err((_, message)) => {
                tracing::debug!(app = %self.app, message, "no machine for a UDP flow");
                return;
            }
        };
        let target = chosen.guard.backend().addr;
        let local: SocketAddr = if target.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let upstream = match UdpSocket::bind(local).await {
            Ok(upstream) => upstream,
            Err(e) => {
                tracing::warn!(error = %e, "cannot open a UDP socket towards a machine");
                return;
            }
        };
        if let Err(e) = upstream.connect(target).await {
            tracing::debug!(%target, error = %e, "UDP connect failed");
            return;
        }
        // The flow holds one connection slot of the machine while it lasts.
        let backend = chosen.guard.backend().clone();
        let _load = chosen.guard;
        let mut last = Instant::now();
        loop {
            tokio::select! {
                _ = self.listener_alive.changed() => return,
                datagram = from_client.recv() => match datagram {
                    // The machine went away: the client's next datagram opens a new flow.
                    Some(_) if backend.is_retired() => return,
                    Some(datagram) => {
                        let _ = upstream.send(&datagram).await;
                        last = Instant::now();
                    }
                    None => return,
                },
                reply = receive(&upstream) => match reply {
                    Ok(reply) => {
                        let _ = self.socket.send_to(&reply, self.client).await;
                        last = Instant::now();
                    }
                    // Nothing listens on the machine's port (yet): keep the flow.
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused
                        && !backend.is_retired() => {}
                    Err(e) => {
                        tracing::debug!(%target, error = %e, "UDP flow ended");
                        return;
                    }
                },
                _ = tokio::time::sleep_until(last + FLOW_IDLE) => return,
            }
        }
    }
}

/// The next datagram from a connected socket, read through a per-thread buffer so that
/// idle flows hold no 64 KiB buffer each.
async fn receive(socket: &UdpSocket) -> io::Result<Bytes> {
    thread_local! {
        static BUF: RefCell<Vec<u8>> = RefCell::new(vec![0; MAX_DATAGRAM]);
    }
    loop {
        socket.readable().await?;
        let received = BUF.with(|buf| {
            let mut buf = buf.borrow_mut();
            match socket.try_recv(&mut buf[..]) {
                Ok(n) => Ok(Some(Bytes::copy_from_slice(&buf[..n]))),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
                Err(e) => Err(e),
            }
        });
        if let Some(datagram) = received? {
            return Ok(datagram);
        }
    }
}
