//! Body types of the proxy: what goes to a backend ([`ReqBody`]) and what goes back to the
//! client ([`RespBody`]). Enums rather than boxed trait objects, so the hot path does not
//! allocate a box per request.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use crate::backend::{LoadGuard, PooledH1};
use crate::raw::RawBody;

/// Why a response body stopped early.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// A request body on its way to a backend.
pub enum ReqBody {
    Empty,
    /// Buffered (replayable) body.
    Full(Option<Bytes>),
    /// Streamed from the client.
    Stream(Incoming),
}

impl ReqBody {
    /// The bytes of a buffered body; `None` when the body is streamed.
    pub fn buffered(&self) -> Option<&[u8]> {
        match self {
            ReqBody::Empty | ReqBody::Full(None) => Some(&[]),
            ReqBody::Full(Some(bytes)) => Some(bytes),
            ReqBody::Stream(_) => None,
        }
    }

    /// A copy of a buffered body, for a replay; `None` when the body was streamed.
    pub fn try_clone(&self) -> Option<ReqBody> {
        match self {
            ReqBody::Empty => Some(ReqBody::Empty),
            ReqBody::Full(bytes) => Some(ReqBody::Full(bytes.clone())),
            ReqBody::Stream(_) => None,
        }
    }
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ReqBody::Empty => Poll::Ready(None),
            ReqBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            ReqBody::Stream(inner) => Pin::new(inner).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReqBody::Empty => true,
            ReqBody::Full(bytes) => bytes.is_none(),
            ReqBody::Stream(inner) => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReqBody::Empty => SizeHint::with_exact(0),
            ReqBody::Full(Some(bytes)) => SizeHint::with_exact(bytes.len() as u64),
            ReqBody::Full(None) => SizeHint::with_exact(0),
            ReqBody::Stream(inner) => inner.size_hint(),
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
}

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
            RespBody::Upstream { .. } | RespBody::Raw { .. } => {}
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
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RespBody::Full(bytes) => bytes.is_none(),
            RespBody::Upstream { inner, .. } => inner.is_end_stream(),
            RespBody::Raw { inner, .. } => inner.is_end_stream(),
            RespBody::Chained { prefix, rest } => prefix.is_none() && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RespBody::Full(Some(bytes)) => SizeHint::with_exact(bytes.len() as u64),
            RespBody::Full(None) => SizeHint::with_exact(0),
            RespBody::Upstream { inner, .. } => inner.size_hint(),
            RespBody::Raw { inner, .. } => inner.size_hint(),
            RespBody::Chained { .. } => SizeHint::default(),
        }
    }
}
