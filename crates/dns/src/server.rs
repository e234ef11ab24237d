//! The hickory-server request handler and the sockets it serves on.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Edns, Metadata, ResponseCode};
use hickory_proto::rr::rdata::{AAAA, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use hickory_server::net::runtime::Time;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;

use crate::Shared;
use crate::zone::{Answer, QueryKind, TTL};

/// Answers for one listener: `network` is fixed for a network's own DNS address
/// (`fdaa:<network>::3`); on `fdaa::3` it is read from the client's 6PN address.
pub(crate) struct Handler {
    pub(crate) shared: Arc<Shared>,
    pub(crate) network: Option<u32>,
}

/// The 6PN network a client's address is in (network 0 is the platform's, not a client's).
pub fn client_network(source: IpAddr) -> Option<u32> {
    let v6 = match source {
        IpAddr::V6(v6) => v6,
        IpAddr::V4(_) => return None,
    };
    aloft_api::sixpn::network_of(&v6).filter(|n| *n != 0)
}

const MAX_TXT_CHUNK: usize = 255;

/// TXT character-strings hold at most 255 bytes: longer text is split (clients join them).
fn txt_chunks(text: &str) -> Vec<String> {
    if text.is_empty() {
        return vec![String::new()];
    }
    let mut chunks = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let mut end = rest.len().min(MAX_TXT_CHUNK);
        while !rest.is_char_boundary(end) {
            end -= 1;
        }
        chunks.push(rest[..end].to_string());
        rest = &rest[end..];
    }
    chunks
}

fn response_edns(request: &Request) -> Option<Edns> {
    request.edns.as_ref().map(|theirs| {
        let mut ours = Edns::new();
        ours.set_max_payload(theirs.max_payload().clamp(512, 4096));
        ours
    })
}

async fn send<R: ResponseHandler>(
    request: &Request,
    mut response_handle: R,
    metadata: Metadata,
    answers: &[Record],
    authorities: &[Record],
    additionals: &[Record],
) -> ResponseInfo {
    let edns = response_edns(request);
    let mut builder = MessageResponseBuilder::from_message_request(request);
    if let Some(edns) = &edns {
        builder.edns(edns);
    }
    let response = builder.build(
        metadata,
        answers.iter(),
        authorities.iter(),
        std::iter::empty(),
        additionals.iter(),
    );
    match response_handle.send_response(response).await {
        Ok(info) => info,
        Err(error) => {
            tracing::debug!(%error, "sending a DNS answer failed");
            let mut metadata = Metadata::response_from_request(&request.metadata);
            metadata.response_code = ResponseCode::ServFail;
            ResponseInfo::from(hickory_proto::op::Header {
                metadata,
                counts: Default::default(),
            })
        }
    }
}

async fn error<R: ResponseHandler>(
    request: &Request,
    response_handle: R,
    code: ResponseCode,
) -> ResponseInfo {
    let mut metadata = Metadata::response_from_request(&request.metadata);
    metadata.response_code = code;
    metadata.recursion_available = true;
    send(request, response_handle, metadata, &[], &[], &[]).await
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        response_handle: R,
    ) -> ResponseInfo {
        let queries = request.queries.queries();
        let Some(query) = queries.first().filter(|_| queries.len() == 1) else {
            return error(request, response_handle, ResponseCode::FormErr).await;
        };
        if request.metadata.op_code != hickory_proto::op::OpCode::Query {
            return error(request, response_handle, ResponseCode::NotImp).await;
        }
        let network = self.network.or_else(|| client_network(request.src().ip()));
        let kind = match query.query_type() {
            RecordType::AAAA => QueryKind::Aaaa,
            RecordType::TXT => QueryKind::Txt,
            _ => QueryKind::Other,
        };
        let name: Name = query.name().into();
        let text = name.to_ascii();
        let zone = self.shared.zone.load();
        let answer = zone.resolve(network, &text, kind);
        drop(zone);
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.recursion_available = true;
        let records: Vec<Record> = match answer {
            Answer::Forward => {
                return self
                    .forward(request, response_handle, query.original())
                    .await;
            }
            Answer::Refused => return error(request, response_handle, ResponseCode::Refused).await,
            Answer::NxDomain => {
                metadata.authoritative = true;
                metadata.response_code = ResponseCode::NXDomain;
                Vec::new()
            }
            Answer::NoData => {
                metadata.authoritative = true;
                Vec::new()
            }
            Answer::Aaaa(addresses) => {
                metadata.authoritative = true;
                addresses
                    .into_iter()
                    .map(|a| Record::from_rdata(name.clone(), TTL, RData::AAAA(AAAA(a))))
                    .collect()
            }
            Answer::Txt(text) => {
                metadata.authoritative = true;
                vec![Record::from_rdata(
                    name.clone(),
                    TTL,
                    RData::TXT(TXT::new(txt_chunks(&text))),
                )]
            }
        };
        send(request, response_handle, metadata, &records, &[], &[]).await
    }
}

impl Handler {
    async fn forward<R: ResponseHandler>(
        &self,
        request: &Request,
        response_handle: R,
        query: &hickory_proto::op::Query,
    ) -> ResponseInfo {
        match self
            .shared
            .forwarder
            .forward(query, request.metadata.checking_disabled)
            .await
        {
            Ok(upstream) => {
                let mut metadata = Metadata::response_from_request(&request.metadata);
                metadata.recursion_available = true;
                metadata.response_code = upstream.metadata.response_code;
                metadata.authentic_data = upstream.metadata.authentic_data;
                send(
                    request,
                    response_handle,
                    metadata,
                    &upstream.answers,
                    &upstream.authorities,
                    &upstream.additionals,
                )
                .await
            }
            Err(err) => {
                tracing::debug!(error = %err, "forwarding a query failed");
                error(request, response_handle, ResponseCode::ServFail).await
            }
        }
    }
}

/// UDP sockets (one per core, SO_REUSEPORT, so the kernel spreads clients) and a TCP
/// listener on `addr`. IP_FREEBIND lets the address be bound before it is configured.
pub(crate) fn bind(
    addr: SocketAddr,
    udp_sockets: usize,
) -> std::io::Result<(Vec<tokio::net::UdpSocket>, tokio::net::TcpListener)> {
    use socket2::{Domain, Protocol, Socket, Type};
    let domain = if addr.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let freebind = |socket: &Socket| {
        let _ = if addr.is_ipv4() {
            socket.set_freebind_v4(true)
        } else {
            socket.set_freebind_v6(true)
        };
        if addr.is_ipv6() {
            let _ = socket.set_only_v6(true);
        }
    };
    let mut udp = Vec::new();
    for _ in 0..udp_sockets.max(1) {
        let socket = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
        socket.set_reuse_port(true)?;
        freebind(&socket);
        socket.set_recv_buffer_size(4 << 20).ok();
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        udp.push(tokio::net::UdpSocket::from_std(socket.into())?);
    }
    let socket = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    freebind(&socket);
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    let tcp = tokio::net::TcpListener::from_std(socket.into())?;
    Ok((udp, tcp))
}

/// How long a TCP client may stay idle between queries.
pub(crate) const TCP_TIMEOUT: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_networks_come_from_6pn_sources_only() {
        assert_eq!(
            client_network("fdaa:0:7:0:1:0:2:2".parse().unwrap()),
            Some(7)
        );
        assert_eq!(client_network("fdaa::3".parse().unwrap()), None);
        assert_eq!(client_network("127.0.0.1".parse().unwrap()), None);
        assert_eq!(client_network("2001:db8::1".parse().unwrap()), None);
    }

    #[test]
    fn long_txt_is_split_into_character_strings() {
        let text = "x".repeat(600);
        let chunks = txt_chunks(&text);
        assert_eq!(
            chunks.iter().map(String::len).collect::<Vec<_>>(),
            vec![255, 255, 90]
        );
        assert_eq!(txt_chunks(""), vec![String::new()]);
    }
}
