//! The worker side of the backhaul (see [`crate::backhaul`]): the listener on this host's
//! backhaul address that connects other hosts' edges to the machines running here.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use aloft_api::sixpn;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::Proxy;
use crate::backhaul::{
    BackhaulConfig, CONNECTED, KIND_CONNECT, KIND_LOAD, MAGIC, Refusal, read_name,
};

/// Binds the backhaul listener (SO_REUSEADDR; on the mesh's device when one is named).
pub(crate) fn bind(config: &BackhaulConfig) -> io::Result<TcpListener> {
    let domain = match config.listen {
        SocketAddr::V4(_) => socket2::Domain::IPV4,
        SocketAddr::V6(_) => socket2::Domain::IPV6,
    };
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if let Some(device) = &config.device {
        socket.bind_device(Some(device.as_bytes()))?;
    }
    if config.listen.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&config.listen.into())?;
    socket.listen(4096)?;
    TcpListener::from_std(socket.into())
}

/// The host whose backhaul address `peer` is, when that is another host (never a
/// machine, never this host).
fn other_host(peer: IpAddr, own_host: u32) -> Option<u32> {
    let IpAddr::V6(peer) = peer else {
        return None;
    };
    let host = sixpn::parts(&peer)?.host;
    (host != 0 && host != own_host && peer == sixpn::host_address(host)).then_some(host)
}

/// Serves the worker side until `stop` turns true.
pub(crate) async fn serve(
    proxy: Arc<Proxy>,
    listener: TcpListener,
    own_host: u32,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            _ = stop.wait_for(|stopped| *stopped) => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "backhaul accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(edge_host) = other_host(peer.ip(), own_host) else {
            tracing::warn!(%peer, "backhaul connection refused: not another host's backhaul address");
            continue;
        };
        let proxy = proxy.clone();
        tokio::spawn(async move {
            if let Err(e) = relay(proxy, stream, own_host, edge_host).await {
                tracing::debug!(%peer, error = %e, "backhaul connection ended");
            }
        });
    }
}

struct Request {
    app: String,
    machine_id: String,
    port: u16,
}

/// What an edge opened a backhaul connection for.
enum Opening {
    Connect(Request),
    Load,
}

async fn read_opening(stream: &mut TcpStream) -> io::Result<Opening> {
    let mut magic = [0u8; MAGIC.len()];
    stream.read_exact(&mut magic).await?;
    if &magic != MAGIC {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a backhaul preamble",
        ));
    }
    match stream.read_u8().await? {
        KIND_CONNECT => {}
        KIND_LOAD => return Ok(Opening::Load),
        kind => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unknown backhaul request kind {kind}"),
            ));
        }
    }
    let app = read_name(stream).await?;
    let machine_id = read_name(stream).await?;
    let port = stream.read_u16().await?;
    Ok(Opening::Connect(Request {
        app,
        machine_id,
        port,
    }))
}

/// The local backend an edge asks for, or why there is none.
fn local_backend(
    proxy: &Proxy,
    request: &Request,
    own_host: u32,
) -> Result<Arc<crate::backend::Backend>, Refusal> {
    let snapshot = proxy.catalog.snapshot();
    let machine = snapshot
        .apps
        .get(&request.app)
        .and_then(|app| app.machines.iter().find(|m| m.id == request.machine_id))
        .ok_or(Refusal::UnknownMachine)?;
    if machine.host_number != Some(own_host) {
        return Err(Refusal::NotHere);
    }
    machine
        .services
        .iter()
        .zip(&machine.backends)
        .find(|(service, _)| service.internal_port == request.port)
        .and_then(|(_, backend)| backend.clone())
        .filter(|backend| backend.is_direct())
        .ok_or(Refusal::NoSuchPort)
}

async fn relay(
    proxy: Arc<Proxy>,
    mut edge: TcpStream,
    own_host: u32,
    edge_host: u32,
) -> io::Result<()> {
    let _ = edge.set_nodelay(true);
    let opening = tokio::time::timeout(proxy.config.handshake_timeout, read_opening(&mut edge));
    let request = match opening.await {
        Ok(Ok(Opening::Connect(request))) => request,
        Ok(Ok(Opening::Load)) => {
            return crate::load_share::answer_edge(&proxy, edge, edge_host).await;
        }
        Ok(Err(e)) => {
            let _ = edge.write_u8(Refusal::Malformed as u8).await;
            return Err(e);
        }
        Err(_) => {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "backhaul preamble timed out",
            ));
        }
    };
    let backend = match local_backend(&proxy, &request, own_host) {
        Ok(backend) => backend,
        Err(refusal) => {
            tracing::debug!(app = %request.app, machine = %request.machine_id, port = request.port, %refusal, "backhaul request refused");
            edge.write_u8(refusal as u8).await?;
            return Ok(());
        }
    };
    let mut machine = match backend.connect_raw().await {
        Ok(machine) => machine,
        Err(e) => {
            tracing::debug!(machine = %request.machine_id, error = %e, "backhaul: machine unreachable");
            edge.write_u8(Refusal::Unreachable as u8).await?;
            return Ok(());
        }
    };
    edge.write_u8(CONNECTED).await?;
    tokio::io::copy_bidirectional(&mut edge, &mut machine).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_other_hosts_backhaul_addresses_may_connect() {
        let own = 1;
        assert_eq!(other_host(sixpn::host_address(2).into(), own), Some(2));
        assert!(other_host(sixpn::host_address(1).into(), own).is_none());
        assert!(other_host(sixpn::host_address(0).into(), own).is_none());
        // A machine of host 2 (any network), the network's DNS, IPv4: never.
        for peer in [
            IpAddr::from(sixpn::machine_address(7, 2, 1)),
            sixpn::network_dns(7).into(),
            "fdaa:0:0:2:0:0:0:2".parse().unwrap(),
            "10.0.0.2".parse().unwrap(),
        ] {
            assert!(other_host(peer, own).is_none(), "{peer}");
        }
    }
}
