//! The HTTP/1.1 fast path of the `http` handler.
//!
//! A client connection is served by a small loop instead of hyper: the request head is
//! parsed in place (httparse, zero-copy), rewritten straight into the bytes sent to the
//! app over a pooled raw connection, and the app's response head is rewritten straight
//! into the bytes sent back; bodies are passed through as they come (chunked ones as is).
//! No header map, no per-request task or channel, and no buffer is held by a connection
//! while it waits for its next request: buffers come from a per-thread pool when bytes
//! arrive and go back when the request is done.
//!
//! Whatever the fast path does not do itself goes the general way, on the same
//! connection: requests it does not route directly (errors, waiting for a machine,
//! autostart, routing headers, redirects, h2c backends, custom response headers) through
//! [`Proxy::handle_request`]; responses that need more than header rewriting (fly-replay,
//! compression) through [`Proxy::deliver`]; both written back by [`write_response`].
//! Requests hyper is better at (upgrades, chunked request bodies, `Expect`, bodies over
//! 1 MB, absolute-form targets) hand the whole connection over to hyper, bytes read so far
//! included.
//!
//! The general path itself (HTTP/2 clients, redeliveries) sends requests whose body it has
//! buffered to HTTP/1.1 apps through [`send_buffered`]: the same pooled raw connections and
//! response-head parsing, with the body streamed back as a [`RawBody`].

use std::cell::RefCell;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::Body;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::Proxy;
use crate::backend::{Backend, BackendError};
use crate::body::{Attached, ReqBody, RespBody};
use crate::http::{ConnInfo, Finish, REPLAY_BODY_LIMIT, Route, error_response, host_range};
use crate::lb::{Chosen, Constraints};
use crate::raw::{Chunked, Framing, RawBody};

/// Most header fields parsed in one head (the configured limit is capped to this).
const MAX_HEADERS: usize = 128;
/// Largest response head accepted from an app.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Initial sizes of the pooled buffers.
const CLIENT_BUF: usize = 8 * 1024;
const OUT_BUF: usize = 4 * 1024;
const RESP_BUF: usize = 16 * 1024;
/// Buffers that grew past this go back to the allocator instead of the pool.
const POOLED_MAX: usize = 64 * 1024;
/// Pooled buffer sets kept per thread.
const POOL_MAX: usize = 256;
/// Body bytes that ride in the same write as the head.
const COALESCE: usize = 16 * 1024;

/// Bytes in `data[start..end]`; room to read into after `end`.
struct Buf {
    data: Vec<u8>,
    start: usize,
    end: usize,
}

impl Buf {
    fn with_capacity(n: usize) -> Buf {
        Buf {
            data: vec![0; n],
            start: 0,
            end: 0,
        }
    }

    fn filled(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }

    fn len(&self) -> usize {
        self.end - self.start
    }

    fn is_empty(&self) -> bool {
        self.start == self.end
    }

    fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
    }

    fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
        if self.start == self.end {
            self.clear();
        }
    }

    /// Room for at least `min` more bytes (moving the filled part to the front, or growing).
    fn spare(&mut self, min: usize) -> &mut [u8] {
        if self.data.len() - self.end < min {
            if self.start > 0 {
                self.data.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            if self.data.len() - self.end < min {
                self.data.resize(self.end + min, 0);
            }
        }
        &mut self.data[self.end..]
    }

    /// Room for `total` bytes from the start of the filled part, allocated exactly: a
    /// request body is read whole, and growing by doubling could take twice its size.
    fn make_room_for(&mut self, total: usize) {
        if self.start > 0 {
            self.data.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.data.len() < total {
            self.data.reserve_exact(total - self.data.len());
            self.data.resize(total, 0);
        }
    }

    fn advance(&mut self, n: usize) {
        self.end += n;
    }
}

/// Where a header sits in a buffer: name and value ranges.
#[derive(Clone, Copy, Default)]
struct Field {
    name: (u32, u32),
    value: (u32, u32),
}

impl Field {
    fn name<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        &buf[self.name.0 as usize..self.name.1 as usize]
    }
    fn value<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        &buf[self.value.0 as usize..self.value.1 as usize]
    }
}

/// The buffers of one request in flight.
struct Bufs {
    /// From the client: the request (head and body), then whatever it pipelined after.
    client: Buf,
    /// The request as sent to the app, then the response head as sent to the client.
    out: Vec<u8>,
    /// From the app.
    resp: Buf,
    req_fields: Vec<Field>,
    resp_fields: Vec<Field>,
}

impl Bufs {
    fn new() -> Box<Bufs> {
        Box::new(Bufs {
            client: Buf::with_capacity(CLIENT_BUF),
            out: Vec::with_capacity(OUT_BUF),
            resp: Buf::with_capacity(RESP_BUF),
            req_fields: Vec::with_capacity(32),
            resp_fields: Vec::with_capacity(32),
        })
    }
}

thread_local! {
    // Boxed: a connection holds (and futures move) a pointer, not the buffers' headers.
    #[allow(clippy::vec_box)]
    static POOL: RefCell<Vec<Box<Bufs>>> = const { RefCell::new(Vec::new()) };
}

fn take_bufs() -> Box<Bufs> {
    POOL.with(|pool| pool.borrow_mut().pop())
        .unwrap_or_else(Bufs::new)
}

fn put_bufs(mut bufs: Box<Bufs>) {
    if bufs.client.data.len() > POOLED_MAX
        || bufs.out.capacity() > POOLED_MAX
        || bufs.resp.data.len() > POOLED_MAX
    {
        return;
    }
    bufs.client.clear();
    bufs.resp.clear();
    bufs.out.clear();
    POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        if pool.len() < POOL_MAX {
            pool.push(bufs);
        }
    });
}

/// Buffers holding the unread bytes of `bufs`, pooled-size ones when `bufs` grew for a
/// request body: a connection keeps no large buffer (outside the body budget) between
/// requests.
fn small_bufs_with(bufs: Box<Bufs>) -> Box<Bufs> {
    if bufs.client.data.len() <= POOLED_MAX {
        return bufs;
    }
    let mut small = take_bufs();
    let unread = bufs.client.filled();
    small.client.spare(unread.len())[..unread.len()].copy_from_slice(unread);
    small.client.advance(unread.len());
    small
}

/// What a connection does after a request.
enum Next {
    KeepAlive,
    Close,
    /// Hand the connection (with the unconsumed bytes in the client buffer) to hyper.
    Hyper,
}

/// Serves HTTP/1.x on a client connection.
pub(crate) async fn serve<I>(
    proxy: Arc<Proxy>,
    mut io: I,
    conn: Arc<ConnInfo>,
    mut stop: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let idle_limit = proxy.config.header_read_timeout;
    let mut carried: Option<Box<Bufs>> = None;
    let mut last_active = Instant::now();
    // One timer for the connection's life, re-armed only when it fires early.
    let idle_timer = tokio::time::sleep(idle_limit);
    tokio::pin!(idle_timer);
    loop {
        let mut bufs = match carried.take() {
            Some(bufs) => bufs,
            None => loop {
                tokio::select! {
                    biased;
                    first = read_first(&mut io) => match first {
                        Ok(Some(bufs)) => break bufs,
                        _ => return,
                    },
                    _ = &mut idle_timer => {
                        let deadline = last_active + idle_limit;
                        if Instant::now() >= deadline {
                            return;
                        }
                        idle_timer.as_mut().reset(deadline.into());
                    }
                    _ = stopped(&mut stop) => return,
                }
            },
        };
        let next = Box::pin(serve_one(&proxy, &mut io, &conn, &mut bufs, &stop)).await;
        last_active = Instant::now();
        match next {
            Next::KeepAlive if !*stop.borrow() => {
                if bufs.client.is_empty() {
                    put_bufs(bufs);
                } else {
                    carried = Some(small_bufs_with(bufs));
                }
            }
            Next::KeepAlive | Next::Close => {
                put_bufs(bufs);
                let _ = tokio::time::timeout(Duration::from_secs(1), io.shutdown()).await;
                return;
            }
            Next::Hyper => {
                let read = Bytes::copy_from_slice(bufs.client.filled());
                put_bufs(bufs);
                let io = Rewind {
                    prefix: read,
                    inner: io,
                };
                Box::pin(crate::server::serve_http(proxy, io, conn, stop, false)).await;
                return;
            }
        }
    }
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Waits for the first bytes of a request without holding a buffer: one is taken from
/// the pool only when the read can complete.
async fn read_first<I: AsyncRead + Unpin>(io: &mut I) -> io::Result<Option<Box<Bufs>>> {
    std::future::poll_fn(|cx| {
        let mut bufs = take_bufs();
        let spare = bufs.client.spare(1);
        let mut read = ReadBuf::new(spare);
        match Pin::new(&mut *io).poll_read(cx, &mut read) {
            Poll::Pending => {
                put_bufs(bufs);
                Poll::Pending
            }
            Poll::Ready(Ok(())) => {
                let n = read.filled().len();
                if n == 0 {
                    put_bufs(bufs);
                    return Poll::Ready(Ok(None));
                }
                bufs.client.advance(n);
                Poll::Ready(Ok(Some(bufs)))
            }
            Poll::Ready(Err(e)) => {
                put_bufs(bufs);
                Poll::Ready(Err(e))
            }
        }
    })
    .await
}

/// A parsed request head: positions in the client buffer.
struct RequestHead {
    len: usize,
    method: (usize, usize),
    target: (usize, usize),
    minor: u8,
}

enum Parsed<T> {
    Complete(T),
    Partial,
    TooManyHeaders,
    Invalid,
}

fn offset(base: &[u8], part: &[u8]) -> u32 {
    (part.as_ptr() as usize - base.as_ptr() as usize) as u32
}

fn parse_request(buf: &[u8], fields: &mut Vec<Field>, max_headers: usize) -> Parsed<RequestHead> {
    let mut storage = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, &mut storage[..max_headers.min(MAX_HEADERS)])
    {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(httparse::Error::TooManyHeaders) => return Parsed::TooManyHeaders,
        Err(_) => return Parsed::Invalid,
    };
    let (Some(method), Some(path), Some(minor)) = (req.method, req.path, req.version) else {
        return Parsed::Invalid;
    };
    fields.clear();
    for h in req.headers.iter() {
        let name = offset(buf, h.name.as_bytes());
        let value = offset(buf, h.value);
        fields.push(Field {
            name: (name, name + h.name.len() as u32),
            value: (value, value + h.value.len() as u32),
        });
    }
    let method_at = offset(buf, method.as_bytes()) as usize;
    let target_at = offset(buf, path.as_bytes()) as usize;
    Parsed::Complete(RequestHead {
        len,
        method: (method_at, method_at + method.len()),
        target: (target_at, target_at + path.len()),
        minor,
    })
}

/// A parsed response head: positions in the response buffer.
struct ResponseHead {
    len: usize,
    status: u16,
    reason: (usize, usize),
    minor: u8,
}

fn parse_response(buf: &[u8], fields: &mut Vec<Field>) -> Parsed<ResponseHead> {
    let mut storage = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut resp,
        buf,
        &mut storage,
    ) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(httparse::Error::TooManyHeaders) => return Parsed::TooManyHeaders,
        Err(_) => return Parsed::Invalid,
    };
    let (Some(status), Some(minor)) = (resp.code, resp.version) else {
        return Parsed::Invalid;
    };
    fields.clear();
    for h in resp.headers.iter() {
        let name = offset(buf, h.name.as_bytes());
        let value = offset(buf, h.value);
        fields.push(Field {
            name: (name, name + h.name.len() as u32),
            value: (value, value + h.value.len() as u32),
        });
    }
    let reason = resp.reason.unwrap_or("");
    let reason_at = if reason.is_empty() {
        0
    } else {
        offset(buf, reason.as_bytes()) as usize
    };
    Parsed::Complete(ResponseHead {
        len,
        status,
        reason: (reason_at, reason_at + reason.len()),
        minor,
    })
}

/// Header fields the fast path treats specially.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Known {
    Other,
    Host,
    ContentLength,
    TransferEncoding,
    Connection,
    KeepAlive,
    ProxyConnection,
    ProxyAuthorization,
    Te,
    Upgrade,
    Expect,
    Trailer,
    FlyClientIp,
    FlyForwardedPort,
    FlyRegion,
    FlyRequestId,
    FlyReplay,
    XForwardedFor,
    XForwardedProto,
    XForwardedSsl,
    XForwardedPort,
    Via,
    Server,
    Date,
    AcceptEncoding,
    ContentType,
    ContentEncoding,
    ContentRange,
    RoutingHint,
}

fn known(name: &[u8]) -> Known {
    const LONGEST: usize = 22;
    if name.len() < 2 || name.len() > LONGEST {
        return Known::Other;
    }
    let mut lower = [0u8; LONGEST];
    for (dst, src) in lower.iter_mut().zip(name) {
        *dst = src.to_ascii_lowercase();
    }
    match &lower[..name.len()] {
        b"host" => Known::Host,
        b"content-length" => Known::ContentLength,
        b"transfer-encoding" => Known::TransferEncoding,
        b"connection" => Known::Connection,
        b"keep-alive" => Known::KeepAlive,
        b"proxy-connection" => Known::ProxyConnection,
        b"proxy-authorization" => Known::ProxyAuthorization,
        b"te" => Known::Te,
        b"upgrade" => Known::Upgrade,
        b"expect" => Known::Expect,
        b"trailer" => Known::Trailer,
        b"fly-client-ip" => Known::FlyClientIp,
        b"fly-forwarded-port" => Known::FlyForwardedPort,
        b"fly-region" => Known::FlyRegion,
        b"fly-request-id" => Known::FlyRequestId,
        b"fly-replay" => Known::FlyReplay,
        b"x-forwarded-for" => Known::XForwardedFor,
        b"x-forwarded-proto" => Known::XForwardedProto,
        b"x-forwarded-ssl" => Known::XForwardedSsl,
        b"x-forwarded-port" => Known::XForwardedPort,
        b"via" => Known::Via,
        b"server" => Known::Server,
        b"date" => Known::Date,
        b"accept-encoding" => Known::AcceptEncoding,
        b"content-type" => Known::ContentType,
        b"content-encoding" => Known::ContentEncoding,
        b"content-range" => Known::ContentRange,
        b"fly-prefer-region"
        | b"fly-force-region"
        | b"fly-prefer-instance-id"
        | b"fly-force-instance-id" => Known::RoutingHint,
        _ => Known::Other,
    }
}

/// Comma-separated tokens of a header value, trimmed.
fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|b| *b == b',')
        .map(|t| t.trim_ascii())
        .filter(|t| !t.is_empty())
}

/// Connection options of a message.
#[derive(Default)]
struct ConnectionTokens {
    close: bool,
    keep_alive: bool,
    upgrade: bool,
    /// Other header names are listed (to be dropped as hop-by-hop).
    names_fields: bool,
}

fn connection_tokens(value: &[u8], into: &mut ConnectionTokens) {
    for token in tokens(value) {
        if token.eq_ignore_ascii_case(b"close") {
            into.close = true;
        } else if token.eq_ignore_ascii_case(b"keep-alive") {
            into.keep_alive = true;
        } else if token.eq_ignore_ascii_case(b"upgrade") {
            into.upgrade = true;
        } else {
            into.names_fields = true;
        }
    }
}

/// Whether `name` is listed in any `Connection` field of a message.
fn listed_in_connection(buf: &[u8], fields: &[Field], name: &[u8]) -> bool {
    fields.iter().any(|f| {
        known(f.name(buf)) == Known::Connection
            && tokens(f.value(buf)).any(|t| t.eq_ignore_ascii_case(name))
    })
}

/// What the request head says, as far as the fast path cares.
#[derive(Default)]
struct RequestFacts {
    host: Option<(u32, u32)>,
    content_length: Option<u64>,
    connection: ConnectionTokens,
    has_upgrade: bool,
    accept_encoding: Option<(u32, u32)>,
    x_forwarded_port: bool,
    /// The general path or hyper should serve it.
    general: bool,
    hyper: bool,
    invalid: bool,
}

fn request_facts(buf: &[u8], fields: &[Field]) -> RequestFacts {
    let mut facts = RequestFacts::default();
    for f in fields {
        match known(f.name(buf)) {
            Known::Host => {
                if facts.host.is_some() {
                    facts.invalid = true;
                }
                facts.host = Some(f.value);
            }
            Known::ContentLength => {
                let value = f.value(buf);
                let parsed = (!value.is_empty()
                    && value.len() <= 19
                    && value.iter().all(u8::is_ascii_digit))
                .then(|| value.iter().fold(0u64, |n, d| n * 10 + (d - b'0') as u64));
                match (parsed, facts.content_length) {
                    (None, _) => facts.invalid = true,
                    (Some(n), Some(before)) if n != before => facts.invalid = true,
                    (Some(n), _) => facts.content_length = Some(n),
                }
            }
            Known::TransferEncoding | Known::Expect => facts.hyper = true,
            Known::Connection => connection_tokens(f.value(buf), &mut facts.connection),
            Known::Upgrade => facts.has_upgrade = true,
            Known::AcceptEncoding => facts.accept_encoding = Some(f.value),
            Known::XForwardedPort => facts.x_forwarded_port = true,
            Known::RoutingHint => facts.general = true,
            _ => {}
        }
    }
    if facts.has_upgrade && facts.connection.upgrade {
        facts.hyper = true;
    }
    facts
}

/// Serves one request whose first bytes are in `bufs.client`.
async fn serve_one<I>(
    proxy: &Arc<Proxy>,
    io: &mut I,
    conn: &Arc<ConnInfo>,
    bufs: &mut Bufs,
    stop: &watch::Receiver<bool>,
) -> Next
where
    I: AsyncRead + AsyncWrite + Unpin + Send,
{
    let start = Instant::now();
    let config = &proxy.config;
    let head = loop {
        match parse_request(
            bufs.client.filled(),
            &mut bufs.req_fields,
            config.max_headers,
        ) {
            Parsed::Complete(head) => break head,
            Parsed::Partial => {}
            Parsed::TooManyHeaders => {
                return reject(proxy, io, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE).await;
            }
            Parsed::Invalid => return reject(proxy, io, StatusCode::BAD_REQUEST).await,
        }
        if bufs.client.len() >= config.max_header_bytes {
            return reject(proxy, io, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE).await;
        }
        let deadline = start + config.header_read_timeout;
        let room = bufs.client.spare(4096);
        match tokio::time::timeout_at(deadline.into(), io.read(room)).await {
            Ok(Ok(n)) if n > 0 => bufs.client.advance(n),
            _ => return Next::Close,
        }
    };
    let buf = bufs.client.filled();
    let facts = request_facts(buf, &bufs.req_fields);
    if facts.invalid {
        return reject(proxy, io, StatusCode::BAD_REQUEST).await;
    }
    let method = &buf[head.method.0..head.method.1];
    let target = &buf[head.target.0..head.target.1];
    let body_len = facts.content_length.unwrap_or(0);
    if facts.hyper
        || method == b"CONNECT"
        || !(target.starts_with(b"/") || target == b"*")
        || body_len > REPLAY_BODY_LIMIT
    {
        return Next::Hyper;
    }
    // The body (bounded above) is read whole, so the request can be delivered again; when
    // the proxy already buffers as much as it may, hyper streams it to the app instead.
    let _reservation = match body_len {
        0 => None,
        len => match proxy.body_budget.try_reserve(len as usize) {
            Some(reservation) => Some(reservation),
            None => return Next::Hyper,
        },
    };
    let head_request = method == b"HEAD";
    let mut keep_alive = if head.minor == 0 {
        facts.connection.keep_alive && !facts.connection.close
    } else {
        !facts.connection.close
    };

    let total = head.len + body_len as usize;
    if bufs.client.len() < total {
        bufs.client.make_room_for(total);
        // A deadline for the whole body, and one for each read (a silent client).
        let body_deadline = Instant::now() + config.request_body_timeout;
        while bufs.client.len() < total {
            let want = total - bufs.client.len();
            let room = bufs.client.spare(want.min(256 * 1024));
            let deadline = body_deadline.min(Instant::now() + config.header_read_timeout);
            match tokio::time::timeout_at(deadline.into(), io.read(room)).await {
                Ok(Ok(n)) if n > 0 => bufs.client.advance(n),
                Ok(_) => return Next::Close,
                Err(_) => return reject(proxy, io, StatusCode::REQUEST_TIMEOUT).await,
            }
        }
    }

    let served = match fast_route(proxy, conn, bufs, &head, &facts) {
        Some((route, chosen)) => {
            forward(
                proxy,
                io,
                conn,
                bufs,
                Request {
                    head: &head,
                    facts: &facts,
                    head_request,
                    keep_alive: &mut keep_alive,
                    start,
                    stop,
                },
                route,
                chosen,
            )
            .await
        }
        None => {
            general(
                proxy,
                io,
                conn,
                bufs,
                &head,
                head_request,
                &mut keep_alive,
                stop,
            )
            .await
        }
    };
    bufs.client.consume(total);
    match served {
        Ok(()) if keep_alive => Next::KeepAlive,
        _ => Next::Close,
    }
}

/// A request the fast path refuses to parse: a short error (with its request id, like
/// every response), then the connection closes.
async fn reject<I: AsyncWrite + Unpin>(proxy: &Proxy, io: &mut I, status: StatusCode) -> Next {
    let reason = status.canonical_reason().unwrap_or("");
    let mut head =
        format!("HTTP/1.1 {} {reason}\r\nfly-request-id: ", status.as_u16()).into_bytes();
    proxy.request_ids.write_to(&mut head);
    head.extend_from_slice(b"\r\nserver: ");
    head.extend_from_slice(proxy.server_value.as_bytes());
    head.extend_from_slice(b"\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
    let _ = io.write_all(&head).await;
    Next::Close
}

/// The app and machine for a request the fast path serves itself; `None` sends it the
/// general way.
fn fast_route(
    proxy: &Arc<Proxy>,
    conn: &ConnInfo,
    bufs: &Bufs,
    head: &RequestHead,
    facts: &RequestFacts,
) -> Option<(Route, Chosen)> {
    if facts.general {
        return None;
    }
    let buf = bufs.client.filled();
    let snapshot = proxy.catalog.load();
    let app = match &conn.fixed_app {
        Some(name) => snapshot.apps.get(name.as_str())?,
        None => {
            let (start, end) = facts.host?;
            let raw = std::str::from_utf8(&buf[start as usize..end as usize]).ok()?;
            let (start, end) = host_range(raw);
            let host = &raw[start..end];
            if host.bytes().any(|b| b.is_ascii_uppercase()) {
                return None;
            }
            snapshot.app_for_host(host, &proxy.config.base_domain)?
        }
    };
    if !conn.tls && buf[head.target.0..head.target.1].starts_with(b"/.well-known/acme-challenge/") {
        return None;
    }
    if std::str::from_utf8(&buf[head.target.0..head.target.1])
        .is_ok_and(|target| app.serves_static(target.split('?').next().unwrap_or(target)))
    {
        return None;
    }
    let at = app.port_location(conn.public_port)?;
    let route = Route {
        app: app.clone(),
        at,
    };
    let port = route.port();
    let http = port.handlers.iter().any(|h| h == "http");
    let tls = port.handlers.iter().any(|h| h == "tls");
    let custom_headers = port
        .http_options
        .as_ref()
        .and_then(|o| o.response.as_ref())
        .is_some_and(|r| !r.headers.is_empty());
    if !http
        || (tls && !conn.tls)
        || (port.force_https == Some(true) && !conn.tls)
        || route.h2_backend()
        || custom_headers
    {
        return None;
    }
    let chosen = proxy.try_choose_now(&route.app, conn.public_port, &Constraints::default())?;
    Some((route, chosen))
}

/// The request being served, as `forward` needs it.
struct Request<'a> {
    head: &'a RequestHead,
    facts: &'a RequestFacts,
    head_request: bool,
    keep_alive: &'a mut bool,
    start: Instant,
    stop: &'a watch::Receiver<bool>,
}

/// Writes the request head as the app gets it: hop-by-hop fields dropped, the platform
/// headers of §9.4 set.
fn write_request_head(proxy: &Proxy, conn: &ConnInfo, bufs: &mut Bufs, head: &RequestHead) {
    let buf = bufs.client.filled();
    let fields = &bufs.req_fields;
    let out = &mut bufs.out;
    out.clear();
    out.extend_from_slice(&buf[head.method.0..head.method.1]);
    out.push(b' ');
    out.extend_from_slice(&buf[head.target.0..head.target.1]);
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut forwarded_for: Option<Vec<u8>> = None;
    let mut via: Option<Vec<u8>> = None;
    let mut named = ConnectionTokens::default();
    for f in fields {
        if known(f.name(buf)) == Known::Connection {
            connection_tokens(f.value(buf), &mut named);
        }
    }
    for f in fields {
        let name = f.name(buf);
        let value = f.value(buf);
        match known(name) {
            Known::Connection
            | Known::KeepAlive
            | Known::ProxyConnection
            | Known::ProxyAuthorization
            | Known::Upgrade
            | Known::TransferEncoding
            | Known::FlyClientIp
            | Known::FlyForwardedPort
            | Known::FlyRegion
            | Known::XForwardedProto
            | Known::XForwardedSsl => continue,
            Known::Te if !value.trim_ascii().eq_ignore_ascii_case(b"trailers") => continue,
            Known::XForwardedFor => {
                join_into(&mut forwarded_for, value);
                continue;
            }
            Known::Via => {
                join_into(&mut via, value);
                continue;
            }
            _ => {}
        }
        if named.names_fields && listed_in_connection(buf, fields, name) {
            continue;
        }
        push_field(out, name, value);
    }
    let client_ip = conn.client_ip.as_bytes();
    let local_port = conn.local_port.as_bytes();
    push_field(out, b"fly-client-ip", client_ip);
    push_field(out, b"fly-forwarded-port", local_port);
    push_field(out, b"fly-region", proxy.region_value.as_bytes());
    out.extend_from_slice(b"x-forwarded-for: ");
    if let Some(before) = &forwarded_for {
        out.extend_from_slice(before);
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(client_ip);
    out.extend_from_slice(b"\r\n");
    if conn.tls {
        out.extend_from_slice(b"x-forwarded-proto: https\r\nx-forwarded-ssl: on\r\n");
    } else {
        out.extend_from_slice(b"x-forwarded-proto: http\r\nx-forwarded-ssl: off\r\n");
    }
    if !bufs
        .req_fields
        .iter()
        .any(|f| known(f.name(buf)) == Known::XForwardedPort)
    {
        push_field(out, b"x-forwarded-port", local_port);
    }
    out.extend_from_slice(b"via: ");
    if let Some(before) = &via {
        out.extend_from_slice(before);
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(proxy.via_h1.as_bytes());
    out.extend_from_slice(b"\r\n\r\n");
}

fn push_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

fn join_into(joined: &mut Option<Vec<u8>>, value: &[u8]) {
    let list = joined.get_or_insert_with(Vec::new);
    if !list.is_empty() {
        list.extend_from_slice(b", ");
    }
    list.extend_from_slice(value);
}

/// Why no response head came back from an app.
enum ExchangeError {
    Connect(BackendError),
    /// The connection failed or closed before any response byte.
    NoResponse(io::Error),
    /// What came back is not an HTTP/1.1 response.
    BadResponse,
}

/// Sends the request head in `out` and then `body` to `backend`, reading the response
/// head into `resp`. A pooled connection the app closed meanwhile is replaced by another
/// one when the request cannot have reached the app, or when it is idempotent.
async fn exchange(
    backend: &Arc<Backend>,
    out: &mut Vec<u8>,
    body: &[u8],
    resp: &mut Buf,
    resp_fields: &mut Vec<Field>,
    idempotent: bool,
) -> Result<(TcpStream, ResponseHead), ExchangeError> {
    let mut reuses = 0;
    loop {
        let pooled = if reuses < 3 { backend.pop_raw() } else { None };
        let reused = pooled.is_some();
        let mut stream = match pooled {
            Some(stream) => {
                reuses += 1;
                stream
            }
            None => Box::pin(backend.connect_raw())
                .await
                .map_err(ExchangeError::Connect)?,
        };
        resp.clear();
        let written = if body.len() <= COALESCE {
            let mark = out.len();
            out.extend_from_slice(body);
            let written = stream.write_all(out).await;
            out.truncate(mark);
            written
        } else {
            match stream.write_all(out).await {
                Ok(()) => stream.write_all(body).await,
                Err(e) => Err(e),
            }
        };
        if let Err(e) = written {
            if reused {
                continue;
            }
            return Err(ExchangeError::NoResponse(e));
        }
        match read_response_head(&mut stream, resp, resp_fields).await {
            Ok(head) => return Ok((stream, head)),
            Err(HeadError::Closed(e)) if reused && idempotent => {
                tracing::debug!(addr = %backend.addr, error = %e, "pooled connection closed by the app; retrying");
                continue;
            }
            Err(HeadError::Closed(e)) => return Err(ExchangeError::NoResponse(e)),
            Err(HeadError::Invalid) => return Err(ExchangeError::BadResponse),
        }
    }
}

enum HeadError {
    Closed(io::Error),
    Invalid,
}

async fn read_response_head(
    stream: &mut TcpStream,
    resp: &mut Buf,
    resp_fields: &mut Vec<Field>,
) -> Result<ResponseHead, HeadError> {
    loop {
        if !resp.is_empty() {
            match parse_response(resp.filled(), resp_fields) {
                Parsed::Complete(head)
                    if (100..200).contains(&head.status) && head.status != 101 =>
                {
                    // Interim responses (100 Continue, 103 Early Hints) are not passed on.
                    resp.consume(head.len);
                    continue;
                }
                Parsed::Complete(head) => return Ok(head),
                Parsed::Partial if resp.len() < MAX_RESPONSE_HEAD => {}
                _ => return Err(HeadError::Invalid),
            }
        }
        let any = !resp.is_empty();
        match stream.read(resp.spare(4096)).await {
            Ok(0) if any => return Err(HeadError::Invalid),
            Ok(0) => {
                return Err(HeadError::Closed(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed before responding",
                )));
            }
            Ok(n) => resp.advance(n),
            Err(_) if any => return Err(HeadError::Invalid),
            Err(e) => return Err(HeadError::Closed(e)),
        }
    }
}

/// What the response head says, as far as the fast path cares.
#[derive(Default)]
struct ResponseFacts {
    content_length: Option<u64>,
    chunked: bool,
    other_coding: bool,
    connection: ConnectionTokens,
    date: bool,
    replay: bool,
    content_type: Option<(u32, u32)>,
    content_encoding: bool,
    content_range: bool,
    invalid: bool,
}

fn response_facts(buf: &[u8], fields: &[Field]) -> ResponseFacts {
    let mut facts = ResponseFacts::default();
    for f in fields {
        match known(f.name(buf)) {
            Known::ContentLength => {
                let value = f.value(buf).trim_ascii();
                let parsed = (!value.is_empty()
                    && value.len() <= 19
                    && value.iter().all(u8::is_ascii_digit))
                .then(|| value.iter().fold(0u64, |n, d| n * 10 + (d - b'0') as u64));
                match (parsed, facts.content_length) {
                    (None, _) => facts.invalid = true,
                    (Some(n), Some(before)) if n != before => facts.invalid = true,
                    (Some(n), _) => facts.content_length = Some(n),
                }
            }
            Known::TransferEncoding => {
                let last = tokens(f.value(buf)).last();
                if last.is_some_and(|t| t.eq_ignore_ascii_case(b"chunked")) {
                    facts.chunked = true;
                    facts.other_coding = false;
                } else {
                    facts.other_coding = true;
                }
            }
            Known::Connection => connection_tokens(f.value(buf), &mut facts.connection),
            Known::Date => facts.date = true,
            Known::FlyReplay => facts.replay = true,
            Known::ContentType => {
                if f.value(buf).starts_with(b"application/vnd.fly.replay") {
                    facts.replay = true;
                }
                facts.content_type = Some(f.value);
            }
            Known::ContentEncoding => facts.content_encoding = true,
            Known::ContentRange => facts.content_range = true,
            _ => {}
        }
    }
    facts
}

/// How the end of the response body is found (RFC 9112 §6.3).
fn response_framing(head_request: bool, head: &ResponseHead, facts: &ResponseFacts) -> Framing {
    if head_request || head.status == 204 || head.status == 304 {
        Framing::Empty
    } else if facts.chunked {
        Framing::Chunked(Chunked::default())
    } else if facts.other_coding {
        Framing::Close
    } else if let Some(n) = facts.content_length {
        Framing::Length(n)
    } else {
        Framing::Close
    }
}

/// Whether the app's connection can carry another request after this response.
fn app_keeps_open(head: &ResponseHead, facts: &ResponseFacts, framing: &Framing) -> bool {
    head.minor == 1 && !facts.connection.close && *framing != Framing::Close
}

/// Sends a request of the general path whose body is already buffered (requests from
/// HTTP/2 clients, redeliveries) over a pooled raw HTTP/1.1 connection, as the fast path
/// does, rather than through hyper's client: no dispatch task, channel or header-map
/// round trip per request. The response body streams from the connection, which goes
/// back to the pool once the body has been read to its end.
pub(crate) async fn send_buffered(
    backend: &Arc<Backend>,
    parts: &http::request::Parts,
    body: &[u8],
) -> Result<Response<RespBody>, BackendError> {
    let mut bufs = take_bufs();
    let sent = send_buffered_with(backend, parts, body, &mut bufs).await;
    put_bufs(bufs);
    sent
}

async fn send_buffered_with(
    backend: &Arc<Backend>,
    parts: &http::request::Parts,
    body: &[u8],
    bufs: &mut Bufs,
) -> Result<Response<RespBody>, BackendError> {
    let addr = backend.addr;
    write_parts_head(&mut bufs.out, parts, body.len());
    let idempotent = crate::http::is_idempotent(&parts.method);
    let Bufs {
        out,
        resp,
        resp_fields,
        ..
    } = bufs;
    let (stream, head) = exchange(backend, out, body, resp, resp_fields, idempotent)
        .await
        .map_err(|error| match error {
            ExchangeError::Connect(e) => e,
            ExchangeError::NoResponse(source) => BackendError::NoResponse { addr, source },
            ExchangeError::BadResponse => BackendError::InvalidResponse(addr),
        })?;
    let facts = response_facts(resp.filled(), resp_fields);
    if facts.invalid || head.status == 101 {
        return Err(BackendError::InvalidResponse(addr));
    }
    let status =
        StatusCode::from_u16(head.status).map_err(|_| BackendError::InvalidResponse(addr))?;
    let framing = response_framing(parts.method == http::Method::HEAD, &head, &facts);
    let keeps_open = app_keeps_open(&head, &facts, &framing);
    Ok(raw_response(
        status,
        resp,
        resp_fields,
        &head,
        stream,
        backend.clone(),
        (framing, keeps_open),
    ))
}

/// The app's response as `http` parts, its body still to be read from `stream` (which
/// goes back to `backend`'s pool after a complete body when the app keeps it open).
fn raw_response(
    status: StatusCode,
    resp: &Buf,
    resp_fields: &[Field],
    head: &ResponseHead,
    stream: TcpStream,
    backend: Arc<Backend>,
    (framing, keeps_open): (Framing, bool),
) -> Response<RespBody> {
    let rbuf = resp.filled();
    let raw = RawBody::new(stream, backend, &rbuf[head.len..], framing, keeps_open);
    let mut response = Response::new(RespBody::raw(raw, Attached::default()));
    *response.status_mut() = status;
    *response.headers_mut() = header_map(rbuf, resp_fields);
    response
}

/// Writes the head of a request given as `http` parts (platform headers already in
/// place), framed for a body of `body_len` bytes.
fn write_parts_head(out: &mut Vec<u8>, parts: &http::request::Parts, body_len: usize) {
    use http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
    out.clear();
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in &parts.headers {
        if name == CONTENT_LENGTH || name == TRANSFER_ENCODING {
            continue;
        }
        push_field(out, name.as_str().as_bytes(), value.as_bytes());
    }
    let announces_body = parts.headers.contains_key(CONTENT_LENGTH)
        || matches!(
            parts.method,
            http::Method::POST | http::Method::PUT | http::Method::PATCH
        );
    if body_len > 0 || announces_body {
        out.extend_from_slice(b"content-length: ");
        push_decimal(out, body_len as u64);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

fn push_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// Forwards a routed request over a raw pooled connection and passes the response on.
async fn forward<I>(
    proxy: &Arc<Proxy>,
    io: &mut I,
    conn: &Arc<ConnInfo>,
    bufs: &mut Bufs,
    req: Request<'_>,
    route: Route,
    chosen: Chosen,
) -> io::Result<()>
where
    I: AsyncRead + AsyncWrite + Unpin + Send,
{
    let head = req.head;
    write_request_head(proxy, conn, bufs, head);
    let body = (
        head.len,
        head.len + req.facts.content_length.unwrap_or(0) as usize,
    );
    let method = &bufs.client.filled()[head.method.0..head.method.1];
    let idempotent = matches!(
        method,
        b"GET" | b"HEAD" | b"OPTIONS" | b"TRACE" | b"PUT" | b"DELETE"
    );
    let deadline = req.start + proxy.config.machine_wait;

    let mut chosen = chosen;
    let mut retried = false;
    let (stream, resp_head) = loop {
        let backend = chosen.guard.backend().clone();
        let Bufs {
            client,
            out,
            resp,
            resp_fields,
            ..
        } = &mut *bufs;
        let body = &client.filled()[body.0..body.1];
        let error = match exchange(&backend, out, body, resp, resp_fields, idempotent).await {
            Ok(done) => break done,
            Err(error) => error,
        };
        let (nothing_sent, detail) = match &error {
            ExchangeError::Connect(e) => (true, e.to_string()),
            ExchangeError::NoResponse(e) => (false, e.to_string()),
            ExchangeError::BadResponse => (false, "invalid response".to_string()),
        };
        if nothing_sent && proxy.recently_started(&chosen.machine.id) && Instant::now() < deadline {
            // A machine this proxy just started may still be booting.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        let retry = !retried
            && (nothing_sent || (idempotent && matches!(error, ExchangeError::NoResponse(_))));
        if retry {
            retried = true;
            let others = Constraints {
                exclude: vec![chosen.machine.id.clone()],
                ..Constraints::default()
            };
            if let Some(other) = proxy.try_choose_now(&route.app, conn.public_port, &others) {
                tracing::debug!(app = %route.app.name, failed = %chosen.machine.id, error = %detail, retry = %other.machine.id, "retrying on another machine");
                chosen = other;
                continue;
            }
        }
        tracing::debug!(app = %route.app.name, machine = %chosen.machine.id, error = %detail, "backend request failed");
        let resp = proxy.finish_response(
            crate::http::Outcome::Error(StatusCode::BAD_GATEWAY, "the app did not answer"),
            finish(proxy, &route, req.start, head.minor),
        );
        return write_response(io, resp, req.head_request, req.keep_alive, head.minor, bufs).await;
    };

    let rbuf = bufs.resp.filled();
    let facts = response_facts(rbuf, &bufs.resp_fields);
    if facts.invalid || resp_head.status == 101 {
        let resp = proxy.finish_response(
            crate::http::Outcome::Error(
                StatusCode::BAD_GATEWAY,
                "the app sent an invalid response",
            ),
            finish(proxy, &route, req.start, head.minor),
        );
        return write_response(io, resp, req.head_request, req.keep_alive, head.minor, bufs).await;
    }
    let framing = response_framing(req.head_request, &resp_head, &facts);
    let app_keeps_open = app_keeps_open(&resp_head, &facts, &framing);
    let compress = route.compress()
        && match (req.facts.accept_encoding, facts.content_type) {
            (Some(accept), Some(ct)) => {
                let client = bufs.client.filled();
                match (
                    std::str::from_utf8(&client[accept.0 as usize..accept.1 as usize]),
                    std::str::from_utf8(&rbuf[ct.0 as usize..ct.1 as usize]),
                ) {
                    (Ok(accept), Ok(ct)) => crate::compress::worth_compressing(
                        accept,
                        &crate::compress::ResponseTraits {
                            status: resp_head.status,
                            content_type: Some(ct),
                            content_encoding: facts.content_encoding,
                            content_range: facts.content_range,
                            content_length: facts.content_length,
                        },
                    ),
                    _ => false,
                }
            }
            _ => false,
        };
    let chunked_to_old_client = matches!(framing, Framing::Chunked(_)) && head.minor == 0;
    if facts.replay || compress || facts.connection.names_fields || chunked_to_old_client {
        return Box::pin(escape(
            proxy,
            io,
            conn,
            bufs,
            req,
            route,
            chosen,
            stream,
            resp_head,
            framing,
            app_keeps_open,
        ))
        .await;
    }

    // The common case: rewrite the head, pass the body through.
    if framing == Framing::Close || *req.stop.borrow() {
        *req.keep_alive = false;
    }
    let pristine = route.pristine();
    write_response_head(
        proxy,
        bufs,
        &resp_head,
        &facts,
        pristine,
        *req.keep_alive,
        head.minor,
    );
    let status = resp_head.status;
    let result = relay_body(
        io,
        stream,
        bufs,
        resp_head.len,
        framing,
        app_keeps_open,
        &chosen,
    )
    .await;
    let seconds = req.start.elapsed().as_secs_f64();
    proxy.metrics.edge.record(status, seconds);
    route.app.stats.record(status, seconds);
    drop(chosen);
    result
}

/// Response headers and metrics context for the general path.
fn finish<'a>(proxy: &Proxy, route: &'a Route, start: Instant, minor: u8) -> Finish<'a> {
    Finish {
        start,
        request_id: proxy.request_ids.next(),
        client_version: if minor == 0 {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        },
        stats: Some(route.app.stats.clone()),
        pristine: route.pristine(),
        port: Some(route.port()),
    }
}

/// Writes the response head as the client gets it into `bufs.out`: hop-by-hop fields
/// dropped, the headers of §9.5 set.
fn write_response_head(
    proxy: &Proxy,
    bufs: &mut Bufs,
    head: &ResponseHead,
    facts: &ResponseFacts,
    pristine: bool,
    keep_alive: bool,
    client_minor: u8,
) {
    let buf = bufs.resp.filled();
    let out = &mut bufs.out;
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    push_status(out, head.status);
    out.push(b' ');
    if head.reason.1 > head.reason.0 {
        out.extend_from_slice(&buf[head.reason.0..head.reason.1]);
    } else if let Some(reason) = StatusCode::from_u16(head.status)
        .ok()
        .and_then(|s| s.canonical_reason())
    {
        out.extend_from_slice(reason.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    let mut via: Option<Vec<u8>> = None;
    for f in &bufs.resp_fields {
        let name = f.name(buf);
        let value = f.value(buf);
        match known(name) {
            Known::Connection
            | Known::KeepAlive
            | Known::ProxyConnection
            | Known::Upgrade
            | Known::Te => continue,
            Known::ContentLength if facts.chunked => continue,
            Known::Server | Known::FlyRequestId if !pristine => continue,
            Known::Via if !pristine => {
                join_into(&mut via, value);
                continue;
            }
            _ => {}
        }
        push_field(out, name, value);
    }
    if !pristine {
        out.extend_from_slice(b"via: ");
        if let Some(before) = &via {
            out.extend_from_slice(before);
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(proxy.via_h1.as_bytes());
        out.extend_from_slice(b"\r\nfly-request-id: ");
        proxy.request_ids.write_to(out);
        out.extend_from_slice(b"\r\nserver: ");
        out.extend_from_slice(proxy.server_value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !facts.date {
        out.extend_from_slice(b"date: ");
        push_date(out);
        out.extend_from_slice(b"\r\n");
    }
    if !keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    } else if client_minor == 0 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

fn push_status(out: &mut Vec<u8>, status: u16) {
    let status = status.min(999);
    out.extend_from_slice(&[
        b'0' + (status / 100) as u8,
        b'0' + (status / 10 % 10) as u8,
        b'0' + (status % 10) as u8,
    ]);
}

/// Sends the head in `bufs.out` and the body as it arrives, then pools the app's
/// connection when the body ended cleanly.
async fn relay_body<I>(
    io: &mut I,
    mut stream: TcpStream,
    bufs: &mut Bufs,
    head_len: usize,
    mut framing: Framing,
    app_keeps_open: bool,
    chosen: &Chosen,
) -> io::Result<()>
where
    I: AsyncWrite + Unpin,
{
    bufs.resp.consume(head_len);
    // How much of what was read belongs to the body, and whether the body is complete.
    let mut clean = app_keeps_open;
    let step = |framing: &mut Framing, available: &[u8]| -> Result<(usize, bool), ()> {
        match framing {
            Framing::Empty => Ok((0, true)),
            Framing::Length(remaining) => {
                let take = (*remaining).min(available.len() as u64);
                *remaining -= take;
                Ok((take as usize, *remaining == 0))
            }
            Framing::Chunked(decoder) => {
                let used = decoder.feed(available, |_| {}).map_err(|_| ())?;
                Ok((used, decoder.is_done()))
            }
            Framing::Close => Ok((available.len(), false)),
        }
    };
    let Ok((used, mut complete)) = step(&mut framing, bufs.resp.filled()) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "malformed chunked body",
        ));
    };
    if complete && used < bufs.resp.len() {
        clean = false;
    }
    let first = &bufs.resp.filled()[..used];
    if first.len() <= COALESCE {
        bufs.out.extend_from_slice(first);
        io.write_all(&bufs.out).await?;
    } else {
        io.write_all(&bufs.out).await?;
        io.write_all(first).await?;
    }
    while !complete {
        bufs.resp.clear();
        let n = match stream.read(bufs.resp.spare(RESP_BUF)).await {
            Ok(n) => n,
            Err(e) => return Err(e),
        };
        if n == 0 {
            if framing == Framing::Close {
                break;
            }
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the app closed the connection mid-body",
            ));
        }
        bufs.resp.advance(n);
        let Ok((used, done)) = step(&mut framing, bufs.resp.filled()) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "malformed chunked body",
            ));
        };
        complete = done;
        if done && used < n {
            clean = false;
        }
        io.write_all(&bufs.resp.filled()[..used]).await?;
    }
    bufs.resp.clear();
    if clean && framing != Framing::Close {
        chosen.guard.backend().push_raw(stream);
    }
    Ok(())
}

/// A response the fast path does not pass through itself (fly-replay, compression, ...):
/// handed to the general delivery, as if it had come from there.
#[allow(clippy::too_many_arguments)]
async fn escape<I>(
    proxy: &Arc<Proxy>,
    io: &mut I,
    conn: &Arc<ConnInfo>,
    bufs: &mut Bufs,
    req: Request<'_>,
    route: Route,
    chosen: Chosen,
    stream: TcpStream,
    resp_head: ResponseHead,
    framing: Framing,
    app_keeps_open: bool,
) -> io::Result<()>
where
    I: AsyncRead + AsyncWrite + Unpin + Send,
{
    let head = req.head;
    let client_minor = head.minor;
    let response = raw_response(
        StatusCode::from_u16(resp_head.status).unwrap_or(StatusCode::BAD_GATEWAY),
        &bufs.resp,
        &bufs.resp_fields,
        &resp_head,
        stream,
        chosen.guard.backend().clone(),
        (framing, app_keeps_open),
    );
    let sent = parse_sent_request(&bufs.out);
    let body_len = req.facts.content_length.unwrap_or(0) as usize;
    let body = if body_len == 0 {
        ReqBody::Empty
    } else {
        ReqBody::Full(Some(Bytes::copy_from_slice(
            &bufs.client.filled()[head.len..head.len + body_len],
        )))
    };
    let outcome = match sent {
        Some(parts) => {
            proxy
                .deliver(
                    conn,
                    parts,
                    body,
                    &route,
                    None,
                    Constraints::default(),
                    req.start + proxy.config.machine_wait,
                    Some((chosen, response)),
                )
                .await
        }
        None => crate::http::Outcome::Error(
            StatusCode::BAD_GATEWAY,
            "the request could not be replayed",
        ),
    };
    if *req.stop.borrow() {
        *req.keep_alive = false;
    }
    let resp = proxy.finish_response(outcome, finish(proxy, &route, req.start, client_minor));
    write_response(
        io,
        resp,
        req.head_request,
        req.keep_alive,
        client_minor,
        bufs,
    )
    .await
}

/// A request the fast path does not route itself, served the general way.
#[allow(clippy::too_many_arguments)]
async fn general<I>(
    proxy: &Arc<Proxy>,
    io: &mut I,
    conn: &Arc<ConnInfo>,
    bufs: &mut Bufs,
    head: &RequestHead,
    head_request: bool,
    keep_alive: &mut bool,
    stop: &watch::Receiver<bool>,
) -> io::Result<()>
where
    I: AsyncRead + AsyncWrite + Unpin + Send,
{
    let buf = bufs.client.filled();
    let Some(parts) = request_parts(buf, head, &bufs.req_fields) else {
        let resp = error_response(StatusCode::BAD_REQUEST, "malformed request");
        *keep_alive = false;
        return write_response(io, resp, head_request, keep_alive, head.minor, bufs).await;
    };
    let content_length = parts
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    let body = if content_length == 0 {
        ReqBody::Empty
    } else {
        ReqBody::Full(Some(Bytes::copy_from_slice(
            &buf[head.len..head.len + content_length],
        )))
    };
    let resp = Box::pin(proxy.handle_request(conn, parts, body, None)).await;
    if *stop.borrow() {
        *keep_alive = false;
    }
    write_response(io, resp, head_request, keep_alive, head.minor, bufs).await
}

fn header_map(buf: &[u8], fields: &[Field]) -> HeaderMap {
    let mut map = HeaderMap::with_capacity(fields.len());
    for f in fields {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(f.name(buf)),
            HeaderValue::from_bytes(f.value(buf)),
        ) {
            map.append(name, value);
        }
    }
    map
}

/// The client's request as `http` parts (the general path).
fn request_parts(buf: &[u8], head: &RequestHead, fields: &[Field]) -> Option<http::request::Parts> {
    let method = http::Method::from_bytes(&buf[head.method.0..head.method.1]).ok()?;
    let uri =
        http::Uri::from_maybe_shared(Bytes::copy_from_slice(&buf[head.target.0..head.target.1]))
            .ok()?;
    let mut parts = http::Request::new(()).into_parts().0;
    parts.method = method;
    parts.uri = uri;
    parts.version = if head.minor == 0 {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    for f in fields {
        let name = HeaderName::from_bytes(f.name(buf)).ok()?;
        let value = HeaderValue::from_bytes(f.value(buf)).ok()?;
        parts.headers.append(name, value);
    }
    Some(parts)
}

/// The request as it was sent to the app (platform headers included), for a redelivery.
fn parse_sent_request(sent: &[u8]) -> Option<http::request::Parts> {
    let mut fields = Vec::new();
    match parse_request(sent, &mut fields, MAX_HEADERS + 16) {
        Parsed::Complete(head) => request_parts(sent, &head, &fields),
        _ => None,
    }
}

/// Writes a response of the general path to the client. Returns an error when the
/// connection cannot carry another request.
async fn write_response<I>(
    io: &mut I,
    resp: Response<RespBody>,
    head_request: bool,
    keep_alive: &mut bool,
    client_minor: u8,
    bufs: &mut Bufs,
) -> io::Result<()>
where
    I: AsyncWrite + Unpin,
{
    let (parts, mut body) = resp.into_parts();
    let status = parts.status;
    let no_body = head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let out = &mut bufs.out;
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    push_status(out, status.as_u16());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut date = false;
    for (name, value) in &parts.headers {
        if name == http::header::CONNECTION
            || name == http::header::TRANSFER_ENCODING
            || name == http::header::UPGRADE
            || name == crate::headers::KEEP_ALIVE
            || (name == http::header::CONTENT_LENGTH && !no_body)
        {
            continue;
        }
        date |= name == http::header::DATE;
        push_field(out, name.as_str().as_bytes(), value.as_bytes());
    }
    if !date {
        out.extend_from_slice(b"date: ");
        push_date(out);
        out.extend_from_slice(b"\r\n");
    }
    let exact = body.size_hint().exact();
    let chunked = !no_body && exact.is_none() && client_minor == 1;
    if !no_body {
        match exact {
            Some(n) => {
                out.extend_from_slice(b"content-length: ");
                push_decimal(out, n);
                out.extend_from_slice(b"\r\n");
            }
            None if chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
            None => *keep_alive = false,
        }
    }
    if !*keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    } else if client_minor == 0 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if no_body {
        return io.write_all(out).await;
    }
    let mut head_sent = false;
    loop {
        let frame = match body.frame().await {
            None => break,
            Some(Ok(frame)) => frame,
            Some(Err(e)) => {
                if !head_sent {
                    io.write_all(out).await?;
                }
                return Err(io::Error::other(e));
            }
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if data.is_empty() {
            continue;
        }
        if chunked {
            out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
        }
        if data.len() <= COALESCE {
            out.extend_from_slice(&data);
            if chunked {
                out.extend_from_slice(b"\r\n");
            }
            io.write_all(out).await?;
        } else {
            io.write_all(out).await?;
            io.write_all(&data).await?;
            if chunked {
                io.write_all(b"\r\n").await?;
            }
        }
        out.clear();
        head_sent = true;
    }
    if chunked {
        out.extend_from_slice(b"0\r\n\r\n");
    }
    if !out.is_empty() {
        io.write_all(out).await?;
    }
    Ok(())
}

/// The current time as an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), cached per second.
fn push_date(out: &mut Vec<u8>) {
    thread_local! {
        static CACHE: RefCell<(u64, [u8; 29])> = const { RefCell::new((u64::MAX, [0; 29])) };
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    CACHE.with(|cache| {
        let mut cache = cache.borrow_mut();
        if cache.0 != now {
            *cache = (now, crate::http_date::format(now));
        }
        out.extend_from_slice(&cache.1);
    });
}

/// A connection handed to hyper with the bytes the fast path already read in front.
struct Rewind<I> {
    prefix: Bytes,
    inner: I,
}

impl<I: AsyncRead + Unpin> AsyncRead for Rewind<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let chunk = self.prefix.split_to(n);
            buf.put_slice(&chunk);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Rewind<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_heads_parse_in_place() {
        let raw = b"GET /a?b HTTP/1.1\r\nHost: x.test\r\nContent-Length: 3\r\nConnection: keep-alive, x-secret\r\n\r\nabcNEXT";
        let mut fields = Vec::new();
        let Parsed::Complete(head) = parse_request(raw, &mut fields, 100) else {
            panic!("not parsed");
        };
        assert_eq!(&raw[head.target.0..head.target.1], b"/a?b");
        assert_eq!(head.minor, 1);
        let facts = request_facts(raw, &fields);
        assert_eq!(facts.content_length, Some(3));
        assert!(facts.connection.keep_alive && facts.connection.names_fields);
        assert!(listed_in_connection(raw, &fields, b"X-Secret"));
        assert_eq!(&raw[head.len + 3..], b"NEXT");
        assert!(matches!(
            parse_request(b"GET / HTTP/1.1\r\nHost: x", &mut fields, 100),
            Parsed::Partial
        ));
        assert!(matches!(
            parse_request(b"GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\n\r\n", &mut fields, 1),
            Parsed::TooManyHeaders
        ));
        let conflicting = b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n";
        let Parsed::Complete(_) = parse_request(conflicting, &mut fields, 100) else {
            panic!("not parsed");
        };
        assert!(request_facts(conflicting, &fields).invalid);
    }
}
