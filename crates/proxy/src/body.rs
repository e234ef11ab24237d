//! Body types of the proxy: what goes to a backend ([`ReqBody`]) and what goes back to the
//! client ([`RespBody`]). Enums rather than boxed trait objects, so the hot path does not
//! allocate a box per request.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::time::Sleep;

use crate::backend::{LoadGuard, PooledH1};
use crate::raw::RawBody;

/// Why a response body stopped early.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// A request body on its way to a backend.
pub enum ReqBody {
    Empty,
    /// Buffered (replayable) body.
    Full(Option<Bytes>),
    /// From the client, not read yet.
    Stream(Incoming),
    /// Streamed from the client to an app; fails when the client sends nothing for `idle`
    /// while the app waits for more.
    Watched {
        inner: Incoming,
        idle: Duration,
        waiting: bool,
        timer: Pin<Box<Sleep>>,
    },
}

/// A streamed request body whose client went silent.
#[derive(Debug, thiserror::Error)]
#[error("the client sent no request body bytes for {0:?}")]
pub struct IdleBody(Duration);

impl ReqBody {
    /// A body streamed to an app, failing after `idle` without a byte from the client.
    pub fn streamed(inner: Incoming, idle: Duration) -> ReqBody {
        ReqBody::Watched {
            inner,
            idle,
            waiting: false,
            timer: Box::pin(tokio::time::sleep(idle)),
        }
    }

    /// The bytes of a buffered body; `None` when the body is streamed.
    pub fn buffered(&self) -> Option<&[u8]> {
        match self {
            ReqBody::Empty | ReqBody::Full(None) => Some(&[]),
            ReqBody::Full(Some(bytes)) => Some(bytes),
            ReqBody::Stream(_) | ReqBody::Watched { .. } => None,
        }
    }

    /// A copy of a buffered body, for a replay; `None` when the body was streamed.
    pub fn try_clone(&self) -> Option<ReqBody> {
        match self {
            ReqBody::Empty => Some(ReqBody::Empty),
            ReqBody::Full(bytes) => Some(ReqBody::Full(bytes.clone())),
            ReqBody::Stream(_) | ReqBody::Watched { .. } => None,
        }
    }
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            ReqBody::Empty => Poll::Ready(None),
            ReqBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            ReqBody::Stream(inner) => Pin::new(inner).poll_frame(cx).map_err(Into::into),
            ReqBody::Watched {
                inner,
                idle,
                waiting,
                timer,
            } => match Pin::new(inner).poll_frame(cx) {
                Poll::Pending => {
                    // The silence counts from when the app started waiting for more.
                    if !*waiting {
                        *waiting = true;
                        timer.as_mut().reset(tokio::time::Instant::now() + *idle);
                    }
                    match timer.as_mut().poll(cx) {
                        Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(IdleBody(*idle))))),
                        Poll::Pending => Poll::Pending,
                    }
                }
                ready => {
                    *waiting = false;
                    ready.map_err(Into::into)
                }
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReqBody::Empty => true,
            ReqBody::Full(bytes) => bytes.is_none(),
            ReqBody::Stream(inner) | ReqBody::Watched { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReqBody::Empty => SizeHint::with_exact(0),
            ReqBody::Full(Some(bytes)) => SizeHint::with_exact(bytes.len() as u64),
            ReqBody::Full(None) => SizeHint::with_exact(0),
            ReqBody::Stream(inner) | ReqBody::Watched { inner, .. } => inner.size_hint(),
        }
    }
}

/// What stays attached to a response body streamed from a backend until it ends: the
/// pooled connection (returned to the pool only once the body is complete), the load
/// count of the machine and the request's metrics.
#[derive(Default)]
pub struct Attached {
    pub pooled: Option<PooledH1>,
    pub load: Option<LoadGuard>,
    pub done: Option<crate::metrics::RequestDone>,
}

impl Attached {
    fn finish(&mut self, complete: bool) {
        if let Some(pooled) = self.pooled.take() {
            pooled.release(complete);
        }
        self.load.take();
        if let Some(done) = self.done.take() {
            done.finish();
        }
    }
}

/// A response body on its way to the client.
pub enum RespBody {
    Full(Option<Bytes>),
    Upstream {
        inner: Incoming,
        attached: Attached,
    },
    /// Streamed from a backend over a pooled raw HTTP/1.1 connection (the fast path).
    Raw {
        inner: RawBody,
        attached: Attached,
    },
    /// An already-read prefix followed by the rest of a stream.
    Chained {
        prefix: Option<Bytes>,
        rest: Box<RespBody>,
    },
    /// A file read in chunks by a blocking task as the client takes them (see
    /// [`RespBody::file`]); `remaining` counts the bytes not yet handed on.
    File {
        chunks: tokio::sync::mpsc::Receiver<std::io::Result<Bytes>>,
        remaining: u64,
    },
}

/// Bytes read from a file at once, and chunks read ahead of the client: a streamed file
/// holds at most `FILE_CHUNK * FILE_CHUNKS_AHEAD` bytes in memory, whatever its size.
const FILE_CHUNK: usize = 64 * 1024;
const FILE_CHUNKS_AHEAD: usize = 4;

impl RespBody {
    /// A body streamed from a backend; an already-finished one releases its connection now.
    pub fn upstream(inner: Incoming, mut attached: Attached) -> Self {
        if inner.is_end_stream() {
            attached.finish(true);
        }
        RespBody::Upstream { inner, attached }
    }

    /// A body read from a raw backend connection; an already-finished one returns its
    /// connection to the pool now.
    pub fn raw(inner: RawBody, mut attached: Attached) -> Self {
        if inner.is_end_stream() {
            attached.finish(true);
        }
        RespBody::Raw { inner, attached }
    }

    pub fn empty() -> Self {
        RespBody::Full(None)
    }

    /// The first `len` bytes of `file`, streamed: a blocking task reads a chunk at a time
    /// and waits while the client is behind. A file that turns out shorter than `len`
    /// ends the body with an error (the response's Content-Length would lie otherwise).
    pub fn file(file: std::fs::File, len: u64) -> Self {
        let (sender, chunks) = tokio::sync::mpsc::channel(FILE_CHUNKS_AHEAD);
        tokio::task::spawn_blocking(move || {
            use std::io::Read;
            let mut reader = file.take(len);
            let mut left = len;
            while left > 0 {
                let mut chunk = vec![0; FILE_CHUNK.min(left as usize)];
                let read = match reader.read(&mut chunk) {
                    Ok(0) => Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("the file ended {left} bytes early"),
                    )),
                    Ok(n) => {
                        chunk.truncate(n);
                        left -= n as u64;
                        Ok(Bytes::from(chunk))
                    }
                    Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(err) => Err(err),
                };
                let failed = read.is_err();
                // The client went away: stop reading.
                if sender.blocking_send(read).is_err() || failed {
                    return;
                }
            }
        });
        RespBody::File {
            chunks,
            remaining: len,
        }
    }

    pub fn full(bytes: impl Into<Bytes>) -> Self {
        let bytes = bytes.into();
        if bytes.is_empty() {
            RespBody::Full(None)
        } else {
            RespBody::Full(Some(bytes))
        }
    }

    /// Reads the whole body (up to `limit` bytes); `Err` gives back what could not be
    /// buffered as a still-streaming body, with what was read so far.
    pub async fn collect_limited(mut self, limit: usize) -> Result<Bytes, CollectError> {
        match self {
            RespBody::Full(bytes) => return Ok(bytes.unwrap_or_default()),
            RespBody::Chained { .. } => {
                return Err(CollectError::TooLarge {
                    prefix: Bytes::new(),
                    rest: Box::new(self),
                });
            }
            RespBody::Upstream { .. } | RespBody::Raw { .. } | RespBody::File { .. } => {}
        }
        let mut buf = bytes::BytesMut::new();
        loop {
            match self.frame().await {
                None => break,
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        buf.extend_from_slice(&data);
                        if buf.len() > limit {
                            return Err(CollectError::TooLarge {
                                prefix: buf.freeze(),
                                rest: Box::new(self),
                            });
                        }
                    }
                }
                Some(Err(e)) => return Err(CollectError::Failed(e)),
            }
        }
        Ok(buf.freeze())
    }
}

pub enum CollectError {
    TooLarge { prefix: Bytes, rest: Box<RespBody> },
    Failed(BodyError),
}

impl Drop for Attached {
    fn drop(&mut self) {
        // Dropped before the end of the body: the backend connection is mid-message.
        self.finish(false);
    }
}

impl Body for RespBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            RespBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            RespBody::Upstream { inner, attached } => match Pin::new(&mut *inner).poll_frame(cx) {
                Poll::Ready(None) => {
                    attached.finish(true);
                    Poll::Ready(None)
                }
                Poll::Ready(Some(Ok(frame))) => {
                    // Servers stop polling once the body says it has ended.
                    if inner.is_end_stream() {
                        attached.finish(true);
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                Poll::Ready(Some(Err(e))) => {
                    attached.finish(false);
                    Poll::Ready(Some(Err(e.into())))
                }
                Poll::Pending => Poll::Pending,
            },
            RespBody::Raw { inner, attached } => match inner.poll_frame(cx) {
                Poll::Ready(None) => {
                    attached.finish(true);
                    Poll::Ready(None)
                }
                Poll::Ready(Some(Ok(frame))) => {
                    if inner.is_end_stream() {
                        attached.finish(true);
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                Poll::Ready(Some(Err(e))) => {
                    attached.finish(false);
                    Poll::Ready(Some(Err(e.into())))
                }
                Poll::Pending => Poll::Pending,
            },
            RespBody::Chained { prefix, rest } => {
                if let Some(prefix) = prefix.take() {
                    return Poll::Ready(Some(Ok(Frame::data(prefix))));
                }
                Pin::new(rest.as_mut()).poll_frame(cx)
            }
            RespBody::File { chunks, remaining } => {
                if *remaining == 0 {
                    return Poll::Ready(None);
                }
                match chunks.poll_recv(cx) {
                    Poll::Ready(Some(Ok(chunk))) => {
                        *remaining = remaining.saturating_sub(chunk.len() as u64);
                        Poll::Ready(Some(Ok(Frame::data(chunk))))
                    }
                    Poll::Ready(Some(Err(err))) => Poll::Ready(Some(Err(err.into()))),
                    Poll::Ready(None) => Poll::Ready(Some(Err(
                        "the static file's reader stopped before its end".into(),
                    ))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RespBody::Full(bytes) => bytes.is_none(),
            RespBody::Upstream { inner, .. } => inner.is_end_stream(),
            RespBody::Raw { inner, .. } => inner.is_end_stream(),
            RespBody::Chained { prefix, rest } => prefix.is_none() && rest.is_end_stream(),
            RespBody::File { remaining, .. } => *remaining == 0,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RespBody::Full(Some(bytes)) => SizeHint::with_exact(bytes.len() as u64),
            RespBody::Full(None) => SizeHint::with_exact(0),
            RespBody::Upstream { inner, .. } => inner.size_hint(),
            RespBody::Raw { inner, .. } => inner.size_hint(),
            RespBody::Chained { .. } => SizeHint::default(),
            RespBody::File { remaining, .. } => SizeHint::with_exact(*remaining),
        }
    }
}

/// The request-body bytes the proxy may buffer at once, across all connections.
pub struct BodyBudget {
    used: AtomicUsize,
    limit: usize,
}

impl BodyBudget {
    pub fn new(limit: usize) -> Arc<BodyBudget> {
        Arc::new(BodyBudget {
            used: AtomicUsize::new(0),
            limit,
        })
    }

    /// Room for `bytes` more, held until the reservation drops; `None` when the budget
    /// has no room left.
    pub fn try_reserve(self: &Arc<Self>, bytes: usize) -> Option<BodyReservation> {
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            let next = used.checked_add(bytes).filter(|next| *next <= self.limit)?;
            match self
                .used
                .compare_exchange_weak(used, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => {
                    return Some(BodyReservation {
                        budget: self.clone(),
                        bytes,
                    });
                }
                Err(now) => used = now,
            }
        }
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }
}

/// Bytes of a [`BodyBudget`] held by one buffered request body.
pub struct BodyReservation {
    budget: Arc<BodyBudget>,
    bytes: usize,
}

impl Drop for BodyReservation {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_refuses_past_its_limit_and_frees_on_drop() {
        let budget = BodyBudget::new(100);
        let a = budget.try_reserve(60).expect("room for 60");
        assert!(budget.try_reserve(41).is_none());
        let b = budget.try_reserve(40).expect("room for 40 more");
        assert_eq!(budget.used(), 100);
        drop(a);
        assert_eq!(budget.used(), 40);
        assert!(budget.try_reserve(usize::MAX).is_none());
        drop(b);
        assert_eq!(budget.used(), 0);
    }
}
