//! Names that are not ours go to the host's upstream resolvers: over UDP, again over TCP
//! when the answer was truncated, the next upstream when one does not answer.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("no upstream resolvers are configured")]
    NoUpstreams,
    #[error("upstream {upstream}: {reason}")]
    Upstream {
        upstream: SocketAddr,
        reason: String,
    },
}

#[derive(Clone, Debug)]
pub struct Forwarder {
    upstreams: Vec<SocketAddr>,
    timeout: Duration,
}

/// The `nameserver` lines of a resolv.conf, on port 53, without the addresses in `skip`
/// (the resolver itself).
pub fn upstreams_from_resolv_conf(path: &Path, skip: &[IpAddr]) -> Vec<SocketAddr> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    parse_resolv_conf(&text, skip)
}

fn parse_resolv_conf(text: &str, skip: &[IpAddr]) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some("nameserver"))
                .then(|| words.next())
                .flatten()
        })
        .filter_map(|address| {
            address
                .split('%')
                .next()
                .and_then(|a| a.parse::<IpAddr>().ok())
        })
        .filter(|ip| !skip.contains(ip))
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

const MAX_UDP_ANSWER: u16 = 4096;

impl Forwarder {
    pub fn new(upstreams: Vec<SocketAddr>, timeout: Duration) -> Self {
        Self { upstreams, timeout }
    }

    pub fn upstreams(&self) -> &[SocketAddr] {
        &self.upstreams
    }

    /// Asks the upstreams `query` (recursion desired) and returns the first answer.
    pub async fn forward(
        &self,
        query: &Query,
        checking_disabled: bool,
    ) -> Result<Message, ForwardError> {
        if self.upstreams.is_empty() {
            return Err(ForwardError::NoUpstreams);
        }
        let id: u16 = rand::random();
        let mut message = Message::new(id, MessageType::Query, OpCode::Query);
        message.metadata.recursion_desired = true;
        message.metadata.checking_disabled = checking_disabled;
        message.add_query(query.clone());
        let mut edns = Edns::new();
        edns.set_max_payload(MAX_UDP_ANSWER);
        message.edns = Some(edns);
        let bytes = message.to_vec().map_err(|e| ForwardError::Upstream {
            upstream: self.upstreams[0],
            reason: e.to_string(),
        })?;
        let mut last = None;
        for upstream in &self.upstreams {
            match self.ask(*upstream, id, &bytes).await {
                Ok(answer) => return Ok(answer),
                Err(reason) => {
                    tracing::debug!(%upstream, %reason, "upstream resolver failed");
                    last = Some(ForwardError::Upstream {
                        upstream: *upstream,
                        reason,
                    });
                }
            }
        }
        Err(last.unwrap_or(ForwardError::NoUpstreams))
    }

    async fn ask(&self, upstream: SocketAddr, id: u16, query: &[u8]) -> Result<Message, String> {
        let answer = tokio::time::timeout(self.timeout, udp_exchange(upstream, id, query))
            .await
            .map_err(|_| "timed out".to_string())??;
        if !answer.metadata.truncation {
            return Ok(answer);
        }
        tokio::time::timeout(self.timeout, tcp_exchange(upstream, id, query))
            .await
            .map_err(|_| "timed out over TCP".to_string())?
    }
}

async fn udp_exchange(upstream: SocketAddr, id: u16, query: &[u8]) -> Result<Message, String> {
    let local: SocketAddr = match upstream.ip() {
        IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local).await.map_err(|e| e.to_string())?;
    socket.connect(upstream).await.map_err(|e| e.to_string())?;
    socket.send(query).await.map_err(|e| e.to_string())?;
    let mut buffer = vec![0u8; usize::from(MAX_UDP_ANSWER)];
    loop {
        let n = socket.recv(&mut buffer).await.map_err(|e| e.to_string())?;
        match Message::from_vec(&buffer[..n]) {
            Ok(answer)
                if answer.metadata.id == id
                    && answer.metadata.message_type == MessageType::Response =>
            {
                return Ok(answer);
            }
            _ => continue,
        }
    }
}

async fn tcp_exchange(upstream: SocketAddr, id: u16, query: &[u8]) -> Result<Message, String> {
    let mut stream = TcpStream::connect(upstream)
        .await
        .map_err(|e| e.to_string())?;
    let length = u16::try_from(query.len()).map_err(|_| "query too long".to_string())?;
    let mut framed = length.to_be_bytes().to_vec();
    framed.extend_from_slice(query);
    stream.write_all(&framed).await.map_err(|e| e.to_string())?;
    let length = stream.read_u16().await.map_err(|e| e.to_string())?;
    let mut buffer = vec![0u8; usize::from(length)];
    stream
        .read_exact(&mut buffer)
        .await
        .map_err(|e| e.to_string())?;
    let answer = Message::from_vec(&buffer).map_err(|e| e.to_string())?;
    if answer.metadata.id != id {
        return Err("answer does not match the query".into());
    }
    Ok(answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_nameservers_without_ourselves() {
        let text = "# comment\nsearch example.com\nnameserver 10.0.0.2\nnameserver fdaa::3\nnameserver fe80::1%eth0\noptions ndots:1\nnameserver bogus\n";
        let found = parse_resolv_conf(text, &["fdaa::3".parse().unwrap()]);
        assert_eq!(
            found,
            vec![
                "10.0.0.2:53".parse().unwrap(),
                "[fe80::1]:53".parse().unwrap()
            ]
        );
    }
}
