//! The backhaul between hosts' proxies: how an edge reaches a machine on another host.
//!
//! The edge handles the client (TLS, HTTP, Fly headers, load balancing) exactly as for a
//! local machine; only the last hop differs. Instead of `private_ipv4:internal_port` it
//! opens TCP to the worker host's proxy at `[fdaa:0:0:<host>::1]:4290`, which the WireGuard
//! mesh carries, and names the machine and port in a short preamble. The worker checks
//! that the machine runs on it and serves that port, connects to it locally, answers one
//! status byte, and from then on copies bytes both ways. What flows after the status is
//! whatever the edge would have sent the machine directly (HTTP/1.1, h2c, a PROXY header,
//! raw TCP), so every handler works unchanged across hosts.
//!
//! Who may speak to a worker: only another host, through the mesh. The peer's address must
//! be another host's backhaul address: the mesh accepts packets from that address only
//! with that host's key, no machine may send from it (the hosts' packet filter checks
//! machines' source addresses), a process on the worker itself connects from the worker's
//! own address, and a socket there bound to another host's address never completes a
//! connection (the answer is routed into the mesh). The listener is bound to the mesh's
//! device besides.
//!
//! The backhaul also carries load: every 250 ms each edge tells each worker how many
//! requests it has in flight to that worker's machines, and hears back how many everyone
//! else has, so every proxy balances on the whole platform's load (see `load_share`).
//!
//! ```text
//! connect, edge → worker:  "ALOFTBH1" | 0 | u8 len | app | u8 len | machine id | u16 port
//!          worker → edge:  u8 status (0: connected; see `Refusal` for the rest)
//! load,    edge → worker:  "ALOFTBH1" | 1, then repeatedly a load list:
//!          edge → worker:  u16 count | count × (u8 len | machine id | u16 port | u32 load)
//!          worker → edge:  a load list of the same entries: everyone else's load
//! ```
//! (Integers are big endian.)

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use aloft_api::sixpn;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub(crate) const MAGIC: &[u8; 8] = b"ALOFTBH1";
pub(crate) const CONNECTED: u8 = 0;
pub(crate) const KIND_CONNECT: u8 = 0;
pub(crate) const KIND_LOAD: u8 = 1;
/// Most entries in one load list.
pub(crate) const MAX_LOAD_ENTRIES: usize = 4096;

/// Requests in flight to one backend (a machine's internal port).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadEntry {
    pub machine_id: String,
    pub port: u16,
    pub load: u32,
}

fn too_long() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        "app name or machine id longer than 255 bytes",
    )
}

fn put_name(out: &mut Vec<u8>, name: &str) -> io::Result<()> {
    out.push(u8::try_from(name.len()).map_err(|_| too_long())?);
    out.extend_from_slice(name.as_bytes());
    Ok(())
}

pub(crate) async fn read_name<R: AsyncRead + Unpin>(stream: &mut R) -> io::Result<String> {
    let len = stream.read_u8().await?;
    let mut name = vec![0; usize::from(len)];
    stream.read_exact(&mut name).await?;
    String::from_utf8(name).map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "not UTF-8"))
}

/// A load list on the wire.
pub(crate) fn encode_loads(entries: &[LoadEntry]) -> io::Result<Vec<u8>> {
    let count = u16::try_from(entries.len())
        .ok()
        .filter(|count| usize::from(*count) <= MAX_LOAD_ENTRIES)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "too many load entries"))?;
    let mut out = Vec::with_capacity(2 + entries.len() * 24);
    out.extend_from_slice(&count.to_be_bytes());
    for entry in entries {
        put_name(&mut out, &entry.machine_id)?;
        out.extend_from_slice(&entry.port.to_be_bytes());
        out.extend_from_slice(&entry.load.to_be_bytes());
    }
    Ok(out)
}

/// Reads one load list.
pub(crate) async fn read_loads<R: AsyncRead + Unpin>(stream: &mut R) -> io::Result<Vec<LoadEntry>> {
    let count = usize::from(stream.read_u16().await?);
    if count > MAX_LOAD_ENTRIES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "too many load entries",
        ));
    }
    let mut entries = Vec::with_capacity(count);
    for _ in 0..count {
        let machine_id = read_name(stream).await?;
        let port = stream.read_u16().await?;
        let load = stream.read_u32().await?;
        entries.push(LoadEntry {
            machine_id,
            port,
            load,
        });
    }
    Ok(entries)
}

/// Where a proxy takes part in the backhaul.
#[derive(Clone, Debug)]
pub struct BackhaulConfig {
    /// This host's backhaul address and port (`sixpn::host_address`, `sixpn::BACKHAUL_PORT`).
    pub listen: SocketAddr,
    /// The mesh's network device: the listener takes connections that arrive on it only.
    pub device: Option<String>,
}

/// Why a worker did not connect an edge to a machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the worker host does not know the machine")]
    UnknownMachine = 1,
    #[error("the machine does not run on the worker host")]
    NotHere = 2,
    #[error("no service of the machine has that internal port")]
    NoSuchPort = 3,
    #[error("the worker host could not connect to the machine")]
    Unreachable = 4,
    #[error("the worker host did not understand the request")]
    Malformed = 5,
}

impl Refusal {
    pub(crate) fn from_byte(byte: u8) -> Refusal {
        match byte {
            1 => Refusal::UnknownMachine,
            2 => Refusal::NotHere,
            3 => Refusal::NoSuchPort,
            4 => Refusal::Unreachable,
            _ => Refusal::Malformed,
        }
    }
}

/// The worker's backhaul address for machines whose 6PN address names host `host`.
pub fn worker_address(host: u32) -> SocketAddr {
    SocketAddr::new(sixpn::host_address(host).into(), sixpn::BACKHAUL_PORT)
}

pub(crate) fn preamble(app: &str, machine_id: &str, port: u16) -> io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(MAGIC.len() + 5 + app.len() + machine_id.len());
    out.extend_from_slice(MAGIC);
    out.push(KIND_CONNECT);
    put_name(&mut out, app)?;
    put_name(&mut out, machine_id)?;
    out.extend_from_slice(&port.to_be_bytes());
    Ok(out)
}

/// Opens a stream to `port` of machine `machine_id` (of `app`) through the worker at
/// `worker`: once this returns, the stream is as good as a connection to the machine.
pub async fn dial(
    worker: SocketAddr,
    app: &str,
    machine_id: &str,
    port: u16,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let request = preamble(app, machine_id, port)?;
    let handshake = async {
        let mut stream = TcpStream::connect(worker).await?;
        let _ = stream.set_nodelay(true);
        stream.write_all(&request).await?;
        let status = stream.read_u8().await?;
        if status != CONNECTED {
            let refusal = Refusal::from_byte(status);
            return Err(io::Error::new(io::ErrorKind::ConnectionRefused, refusal));
        }
        Ok(stream)
    };
    tokio::time::timeout(timeout, handshake)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "backhaul handshake timed out"))?
}

/// Opens a load-sharing session with the worker at `worker`.
pub async fn dial_load(worker: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let opening = async {
        let mut stream = TcpStream::connect(worker).await?;
        let _ = stream.set_nodelay(true);
        let mut hello = MAGIC.to_vec();
        hello.push(KIND_LOAD);
        stream.write_all(&hello).await?;
        Ok(stream)
    };
    tokio::time::timeout(timeout, opening)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "backhaul connect timed out"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_preamble_refuses_names_that_do_not_fit() {
        let long = "x".repeat(256);
        assert!(preamble(&long, "m", 80).is_err());
        assert!(preamble("app", &long, 80).is_err());
        let ok = preamble("app", "m1", 8080).unwrap();
        assert_eq!(&ok[..8], MAGIC);
        assert_eq!(ok[8], KIND_CONNECT);
        assert_eq!(&ok[ok.len() - 2..], &8080u16.to_be_bytes());
    }

    #[tokio::test]
    async fn load_lists_read_back_as_written_and_bad_ones_are_refused() {
        let entries = vec![
            LoadEntry {
                machine_id: "m1".into(),
                port: 8080,
                load: 3,
            },
            LoadEntry {
                machine_id: "m2".into(),
                port: 80,
                load: 0,
            },
        ];
        let wire = encode_loads(&entries).unwrap();
        assert_eq!(read_loads(&mut wire.as_slice()).await.unwrap(), entries);
        // A count past the limit, and a list cut short.
        let huge = u16::try_from(MAX_LOAD_ENTRIES + 1).unwrap().to_be_bytes();
        assert!(read_loads(&mut huge.as_slice()).await.is_err());
        assert!(read_loads(&mut &wire[..wire.len() - 1]).await.is_err());
    }
}
