//! HTTP/1.1 to machines without hyper, for the fast path: pooled plain TCP connections
//! (no task, channel or buffer per connection), message framing, and a chunked-coding
//! decoder that either tracks the end of a body passed through as is or decodes it.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use hyper::body::Frame;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::TcpStream;

use crate::backend::Backend;

/// A pooled connection to a backend, idle since `since`.
pub(crate) struct IdleStream {
    pub(crate) stream: TcpStream,
    pub(crate) since: Instant,
}

impl Backend {
    /// The warmest idle raw connection that still looks open.
    pub(crate) fn pop_raw(&self) -> Option<TcpStream> {
        let timeout = self.settings().idle_timeout;
        loop {
            let entry = self.lock_raw().pop()?;
            if entry.since.elapsed() < timeout && idle_stream_is_open(&entry.stream) {
                return Some(entry.stream);
            }
        }
    }

    /// Returns a connection whose last response was read to its end.
    pub(crate) fn push_raw(&self, stream: TcpStream) {
        if self.is_retired() {
            return;
        }
        let max_idle = self.settings().max_idle;
        let mut idle = self.lock_raw();
        if idle.len() >= max_idle {
            idle.remove(0);
        }
        idle.push(IdleStream {
            stream,
            since: Instant::now(),
        });
    }
}

/// Whether an idle connection can carry a request: nothing (no data, no EOF, no reset)
/// arrived on it since its last response was read. Reading a response short of the
/// buffer's size clears the socket's readiness, so this usually costs no system call.
fn idle_stream_is_open(stream: &TcpStream) -> bool {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    match stream.poll_read_ready(&mut cx) {
        Poll::Pending => true,
        Poll::Ready(Err(_)) => false,
        Poll::Ready(Ok(())) => {
            let mut probe = [0u8; 1];
            matches!(stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
        }
    }
}

/// How the end of a message body is found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Framing {
    /// No body (HEAD, 204, 304).
    Empty,
    Length(u64),
    Chunked(Chunked),
    /// Until the connection closes.
    Close,
}

/// A malformed chunked body.
#[derive(Debug, thiserror::Error)]
#[error("malformed chunked body")]
pub(crate) struct ChunkError;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ChunkState {
    Size,
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    TrailerStart,
    Trailer,
    TrailerLf,
    EndLf,
    Done,
}

/// Largest trailer section kept when a chunked body is decoded.
const MAX_TRAILERS: usize = 16 * 1024;

/// Incremental chunked transfer-coding reader.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Chunked {
    state: ChunkState,
    remaining: u64,
    digits: u8,
    /// The trailer section's field lines, when they are kept (a decoded body passes them
    /// on as a trailers frame; a body relayed as is carries them along itself).
    trailers: Option<Vec<u8>>,
}

impl Default for Chunked {
    fn default() -> Self {
        Chunked {
            state: ChunkState::Size,
            remaining: 0,
            digits: 0,
            trailers: None,
        }
    }
}

impl Chunked {
    pub(crate) fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    fn keep_trailers(&mut self) {
        self.trailers.get_or_insert_with(Vec::new);
    }

    /// The trailer fields read, once the body is done (none when not kept or absent).
    fn take_trailers(&mut self) -> Option<http::HeaderMap> {
        let mut block = self.trailers.take().filter(|b| !b.is_empty())?;
        block.extend_from_slice(b"\r\n");
        let mut fields = [httparse::EMPTY_HEADER; 128];
        let httparse::Status::Complete((_, parsed)) =
            httparse::parse_headers(&block, &mut fields).ok()?
        else {
            return None;
        };
        let mut map = http::HeaderMap::with_capacity(parsed.len());
        for field in parsed {
            if let (Ok(name), Ok(value)) = (
                http::HeaderName::from_bytes(field.name.as_bytes()),
                http::HeaderValue::from_bytes(field.value),
            ) {
                map.append(name, value);
            }
        }
        (!map.is_empty()).then_some(map)
    }

    fn keep_trailer_byte(&mut self, byte: u8) -> Result<(), ChunkError> {
        if let Some(trailers) = &mut self.trailers {
            if trailers.len() >= MAX_TRAILERS {
                return Err(ChunkError);
            }
            trailers.push(byte);
        }
        Ok(())
    }

    /// Reads `input` up to the end of the body; calls `data` with the ranges of `input`
    /// that are chunk data. Returns how many bytes belong to the body.
    pub(crate) fn feed(
        &mut self,
        input: &[u8],
        mut data: impl FnMut(std::ops::Range<usize>),
    ) -> Result<usize, ChunkError> {
        let mut i = 0;
        while i < input.len() {
            let byte = input[i];
            match self.state {
                ChunkState::Size => {
                    let digit = match byte {
                        b'0'..=b'9' => Some(byte - b'0'),
                        b'a'..=b'f' => Some(byte - b'a' + 10),
                        b'A'..=b'F' => Some(byte - b'A' + 10),
                        _ => None,
                    };
                    match (digit, byte) {
                        (Some(d), _) => {
                            // 15 hex digits is far beyond any real chunk; more is hostile.
                            if self.digits >= 15 {
                                return Err(ChunkError);
                            }
                            self.digits += 1;
                            self.remaining = self.remaining * 16 + d as u64;
                        }
                        (None, b';' | b' ' | b'\t') if self.digits > 0 => {
                            self.state = ChunkState::Extension
                        }
                        (None, b'\r') if self.digits > 0 => self.state = ChunkState::SizeLf,
                        _ => return Err(ChunkError),
                    }
                    i += 1;
                }
                ChunkState::Extension => {
                    if byte == b'\r' {
                        self.state = ChunkState::SizeLf;
                    } else if byte == b'\n' {
                        return Err(ChunkError);
                    }
                    i += 1;
                }
                ChunkState::SizeLf => {
                    if byte != b'\n' {
                        return Err(ChunkError);
                    }
                    self.state = if self.remaining == 0 {
                        ChunkState::TrailerStart
                    } else {
                        ChunkState::Data
                    };
                    i += 1;
                }
                ChunkState::Data => {
                    let take =
                        (input.len() - i).min(self.remaining.min(usize::MAX as u64) as usize);
                    data(i..i + take);
                    i += take;
                    self.remaining -= take as u64;
                    if self.remaining == 0 {
                        self.state = ChunkState::DataCr;
                    }
                }
                ChunkState::DataCr => {
                    if byte != b'\r' {
                        return Err(ChunkError);
                    }
                    self.state = ChunkState::DataLf;
                    i += 1;
                }
                ChunkState::DataLf => {
                    if byte != b'\n' {
                        return Err(ChunkError);
                    }
                    self.state = ChunkState::Size;
                    self.digits = 0;
                    i += 1;
                }
                ChunkState::TrailerStart => {
                    self.state = if byte == b'\r' {
                        ChunkState::EndLf
                    } else {
                        self.keep_trailer_byte(byte)?;
                        ChunkState::Trailer
                    };
                    i += 1;
                }
                ChunkState::Trailer => {
                    self.keep_trailer_byte(byte)?;
                    if byte == b'\r' {
                        self.state = ChunkState::TrailerLf;
                    }
                    i += 1;
                }
                ChunkState::TrailerLf => {
                    if byte != b'\n' {
                        return Err(ChunkError);
                    }
                    self.keep_trailer_byte(byte)?;
                    self.state = ChunkState::TrailerStart;
                    i += 1;
                }
                ChunkState::EndLf => {
                    if byte != b'\n' {
                        return Err(ChunkError);
                    }
                    self.state = ChunkState::Done;
                    return Ok(i + 1);
                }
                ChunkState::Done => return Ok(i),
            }
        }
        Ok(i)
    }
}

/// Why a raw response body ended early.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RawBodyError {
    #[error("the app closed the connection before the end of the response body")]
    Incomplete,
    #[error(transparent)]
    Chunked(#[from] ChunkError),
    #[error("reading the response body: {0}")]
    Io(#[from] io::Error),
}

/// A response body still arriving on a raw backend connection. The connection goes back
/// to its backend's pool once the body has been read to its end.
pub struct RawBody {
    stream: Option<TcpStream>,
    backend: Arc<Backend>,
    /// Body bytes read but not handed out yet.
    buf: BytesMut,
    framing: Framing,
    /// The app keeps the connection open after this response.
    reusable: bool,
    done: bool,
    /// Trailer fields of a chunked body, handed out after its last data.
    trailers: Option<http::HeaderMap>,
}

const READ_CHUNK: usize = 16 * 1024;

impl RawBody {
    pub(crate) fn new(
        stream: TcpStream,
        backend: Arc<Backend>,
        already_read: &[u8],
        mut framing: Framing,
        reusable: bool,
    ) -> RawBody {
        if let Framing::Chunked(decoder) = &mut framing {
            decoder.keep_trailers();
        }
        let mut body = RawBody {
            stream: Some(stream),
            backend,
            buf: BytesMut::from(already_read),
            framing,
            reusable,
            done: false,
            trailers: None,
        };
        if matches!(body.framing, Framing::Empty | Framing::Length(0)) {
            body.complete();
        }
        body
    }

    pub(crate) fn is_end_stream(&self) -> bool {
        self.done && self.trailers.is_none()
    }

    pub(crate) fn size_hint(&self) -> hyper::body::SizeHint {
        match &self.framing {
            Framing::Empty => hyper::body::SizeHint::with_exact(0),
            Framing::Length(n) => hyper::body::SizeHint::with_exact(*n),
            _ => hyper::body::SizeHint::default(),
        }
    }

    fn complete(&mut self) {
        self.done = true;
        if let Some(stream) = self.stream.take()
            && self.reusable
            && self.buf.is_empty()
        {
            self.backend.push_raw(stream);
        }
    }

    fn fail(&mut self, error: RawBodyError) -> Poll<Option<Result<Bytes, RawBodyError>>> {
        self.done = true;
        self.stream = None;
        Poll::Ready(Some(Err(error)))
    }

    /// The next piece of the body, then its trailers if it had any.
    pub(crate) fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, RawBodyError>>> {
        match self.poll_data(cx) {
            Poll::Ready(None) => Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t)))),
            Poll::Ready(Some(data)) => Poll::Ready(Some(data.map(Frame::data))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, RawBodyError>>> {
        loop {
            if self.done {
                return Poll::Ready(None);
            }
            if !self.buf.is_empty() {
                match &mut self.framing {
                    Framing::Empty => {
                        self.complete();
                        return Poll::Ready(None);
                    }
                    Framing::Length(remaining) => {
                        let take = (*remaining).min(self.buf.len() as u64) as usize;
                        let data = self.buf.split_to(take).freeze();
                        *remaining -= take as u64;
                        if *remaining == 0 {
                            self.complete();
                        }
                        return Poll::Ready(Some(Ok(data)));
                    }
                    Framing::Chunked(decoder) => {
                        let mut out = BytesMut::new();
                        let input = &self.buf[..];
                        let used = match decoder
                            .feed(input, |range| out.extend_from_slice(&input[range]))
                        {
                            Ok(used) => used,
                            Err(e) => return self.fail(e.into()),
                        };
                        let finished = decoder.is_done();
                        let _ = self.buf.split_to(used);
                        if finished {
                            self.trailers = decoder.take_trailers();
                            self.complete();
                        }
                        if !out.is_empty() {
                            return Poll::Ready(Some(Ok(out.freeze())));
                        }
                        if finished {
                            return Poll::Ready(None);
                        }
                    }
                    Framing::Close => {
                        let data = self.buf.split().freeze();
                        return Poll::Ready(Some(Ok(data)));
                    }
                }
                continue;
            }
            let Some(stream) = self.stream.as_mut() else {
                return self.fail(RawBodyError::Incomplete);
            };
            let start = self.buf.len();
            self.buf.resize(start + READ_CHUNK, 0);
            let mut read = ReadBuf::new(&mut self.buf[start..]);
            let polled = Pin::new(stream).poll_read(cx, &mut read);
            let n = read.filled().len();
            self.buf.truncate(start + n);
            match polled {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return self.fail(e.into()),
                Poll::Ready(Ok(())) => {
                    if n == 0 {
                        if self.framing == Framing::Close {
                            self.reusable = false;
                            self.complete();
                            return Poll::Ready(None);
                        }
                        return self.fail(RawBodyError::Incomplete);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(parts: &[&[u8]]) -> Result<(Vec<u8>, usize, bool), ChunkError> {
        let mut decoder = Chunked::default();
        let mut out = Vec::new();
        let mut used = 0;
        for part in parts {
            let n = decoder.feed(part, |r| out.extend_from_slice(&part[r]))?;
            used += n;
            if decoder.is_done() {
                break;
            }
        }
        Ok((out, used, decoder.is_done()))
    }

    #[test]
    fn chunked_bodies_decode_across_any_split() {
        let body: &[u8] = b"5;ext=1\r\nhello\r\nA\r\n0123456789\r\n0\r\nx-trailer: 1\r\n\r\nNEXT";
        let (out, used, done) = decode(&[body]).unwrap();
        assert_eq!(out, b"hello0123456789");
        assert!(done);
        assert_eq!(&body[used..], b"NEXT");
        for split in 1..body.len() {
            let (a, b) = body.split_at(split);
            let (out, used, done) = decode(&[a, b]).unwrap();
            assert_eq!(out, b"hello0123456789", "split at {split}");
            assert!(done);
            assert_eq!(used, body.len() - 4);
        }
    }

    #[test]
    fn kept_trailers_are_parsed_and_bounded() {
        let body: &[u8] = b"3\r\nabc\r\n0\r\nx-sum: 1\r\nx-other:  two \r\n\r\n";
        for split in 1..body.len() {
            let mut decoder = Chunked::default();
            decoder.keep_trailers();
            let (a, b) = body.split_at(split);
            let mut out = Vec::new();
            decoder.feed(a, |r| out.extend_from_slice(&a[r])).unwrap();
            decoder.feed(b, |r| out.extend_from_slice(&b[r])).unwrap();
            assert!(decoder.is_done());
            assert_eq!(out, b"abc");
            let trailers = decoder.take_trailers().expect("trailers");
            assert_eq!(trailers.get("x-sum").unwrap(), "1", "split at {split}");
            assert_eq!(trailers.get("x-other").unwrap(), "two");
        }
        let mut plain = Chunked::default();
        plain.feed(body, |_| {}).unwrap();
        assert!(plain.take_trailers().is_none(), "not kept unless asked");

        let mut flood = b"0\r\n".to_vec();
        for i in 0..2000 {
            flood.extend_from_slice(format!("x-f{i}: {i}\r\n").as_bytes());
        }
        flood.extend_from_slice(b"\r\n");
        let mut decoder = Chunked::default();
        decoder.keep_trailers();
        assert!(
            decoder.feed(&flood, |_| {}).is_err(),
            "trailers are bounded"
        );
    }

    #[test]
    fn malformed_chunked_bodies_are_errors() {
        for bad in [
            &b"zz\r\n"[..],
            b"5\r\nhelloX\r\n",
            b"\r\n",
            b"5\nhello",
            b"ffffffffffffffffff\r\n",
        ] {
            assert!(
                decode(&[bad]).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
