//! The proxy's client of the control plane: the catalog watch stream (server-sent events)
//! and the Machines API calls of autostart/autostop.

use std::time::Duration;

use aloft_api::internal::CatalogUpdate;
use bytes::{Bytes, BytesMut};
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control URL {0:?} is not http://host:port")]
    BadUrl(String),
    #[error("connect to the control plane: {0}")]
    Connect(#[from] std::io::Error),
    #[error("control plane HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("control plane answered {status}: {body}")]
    Status { status: StatusCode, body: String },
    #[error("control plane request timed out")]
    Timeout,
    #[error("catalog stream: {0}")]
    Stream(String),
}

/// Base URL and token of the control plane.
#[derive(Clone, Debug)]
pub struct ControlClient {
    authority: String,
    base_path: String,
    token: String,
}

impl ControlClient {
    pub fn new(url: &str, token: &str) -> Result<Self, ControlError> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| ControlError::BadUrl(url.to_string()))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        if authority.is_empty() {
            return Err(ControlError::BadUrl(url.to_string()));
        }
        Ok(ControlClient {
            authority: authority.to_string(),
            base_path: path.to_string(),
            token: token.to_string(),
        })
    }

    async fn connect(&self) -> Result<http1::SendRequest<Full<Bytes>>, ControlError> {
        let stream =
            tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(&self.authority))
                .await
                .map_err(|_| ControlError::Timeout)??;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    fn request(&self, method: Method, path: &str, body: Bytes) -> Request<Full<Bytes>> {
        let mut builder = Request::builder()
            .method(method)
            .uri(format!("{}{}", self.base_path, path))
            .header(header::HOST, &self.authority)
            .header(header::USER_AGENT, "aloft-proxy");
        if !self.token.is_empty() {
            builder = builder.header(header::AUTHORIZATION, format!("Bearer {}", self.token));
        }
        if !body.is_empty() {
            builder = builder.header(header::CONTENT_TYPE, "application/json");
        }
        builder
            .body(Full::new(body))
            .unwrap_or_else(|_| Request::new(Full::new(Bytes::new())))
    }

    /// `POST /v1/apps/{app}/machines/{id}/{action}` (start, stop, suspend).
    pub async fn machine_action(
        &self,
        app: &str,
        id: &str,
        action: &str,
    ) -> Result<(), ControlError> {
        let path = format!("/v1/apps/{app}/machines/{id}/{action}");
        let call = async {
            let mut sender = self.connect().await?;
            let resp = sender
                .send_request(self.request(Method::POST, &path, Bytes::from_static(b"{}")))
                .await?;
            let status = resp.status();
            let body = resp.into_body().collect().await?.to_bytes();
            if status.is_success() {
                Ok(())
            } else {
                Err(ControlError::Status {
                    status,
                    body: String::from_utf8_lossy(&body).chars().take(200).collect(),
                })
            }
        };
        tokio::time::timeout(Duration::from_secs(60), call)
            .await
            .map_err(|_| ControlError::Timeout)?
    }

    /// `GET` of a JSON document.
    pub async fn get_json(&self, path: &str) -> Result<serde_json::Value, ControlError> {
        let call = async {
            let mut sender = self.connect().await?;
            let resp = sender
                .send_request(self.request(Method::GET, path, Bytes::new()))
                .await?;
            let status = resp.status();
            let body = resp.into_body().collect().await?.to_bytes();
            if !status.is_success() {
                return Err(ControlError::Status {
                    status,
                    body: String::from_utf8_lossy(&body).chars().take(200).collect(),
                });
            }
            serde_json::from_slice(&body).map_err(|e| ControlError::Stream(e.to_string()))
        };
        tokio::time::timeout(Duration::from_secs(30), call)
            .await
            .map_err(|_| ControlError::Timeout)?
    }

    /// `PUT`/`POST`/`DELETE` with a JSON body.
    pub async fn send_json(
        &self,
        method: Method,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<(), ControlError> {
        let call = async {
            let mut sender = self.connect().await?;
            let bytes = Bytes::from(serde_json::to_vec(body).unwrap_or_default());
            let resp = sender
                .send_request(self.request(method, path, bytes))
                .await?;
            let status = resp.status();
            let body = resp.into_body().collect().await?.to_bytes();
            if status.is_success() {
                Ok(())
            } else {
                Err(ControlError::Status {
                    status,
                    body: String::from_utf8_lossy(&body).chars().take(200).collect(),
                })
            }
        };
        tokio::time::timeout(Duration::from_secs(30), call)
            .await
            .map_err(|_| ControlError::Timeout)?
    }

    /// Opens `GET /v1/catalog/watch` (resuming after `last_seq`) and returns the event stream.
    pub async fn watch(&self, last_seq: Option<u64>) -> Result<SseStream, ControlError> {
        let mut sender = self.connect().await?;
        let mut req = self.request(Method::GET, "/v1/catalog/watch", Bytes::new());
        req.headers_mut().insert(
            header::ACCEPT,
            http::HeaderValue::from_static("text/event-stream"),
        );
        if let Some(seq) = last_seq
            && let Ok(value) = http::HeaderValue::from_str(&seq.to_string())
        {
            req.headers_mut().insert("last-event-id", value);
        }
        let resp = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
            .await
            .map_err(|_| ControlError::Timeout)??;
        let status = resp.status();
        if !status.is_success() {
            let body = resp
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            return Err(ControlError::Status {
                status,
                body: String::from_utf8_lossy(&body).chars().take(200).collect(),
            });
        }
        Ok(SseStream {
            body: resp.into_body(),
            buf: BytesMut::new(),
            _sender: sender,
        })
    }
}

/// One server-sent event.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SseEvent {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: String,
}

/// Incremental parser of a `text/event-stream` body.
pub struct SseStream {
    body: Incoming,
    buf: BytesMut,
    _sender: http1::SendRequest<Full<Bytes>>,
}

/// A catalog stream with no bytes for this long is considered dead.
const STREAM_IDLE: Duration = Duration::from_secs(60);

/// Largest single event accepted (a snapshot of a big platform can be large).
const MAX_EVENT: usize = 256 * 1024 * 1024;

impl SseStream {
    /// The next event, `None` at the end of the stream.
    pub async fn next(&mut self) -> Result<Option<SseEvent>, ControlError> {
        loop {
            if let Some(event) = take_event(&mut self.buf) {
                return Ok(Some(event));
            }
            if self.buf.len() > MAX_EVENT {
                return Err(ControlError::Stream("event too large".into()));
            }
            // The control plane sends a keep-alive comment every 15 s: a silent stream is
            // a dead connection (half-open TCP), so give up on it and reconnect.
            let frame = tokio::time::timeout(STREAM_IDLE, self.body.frame())
                .await
                .map_err(|_| ControlError::Stream("no data for 60 s".into()))?;
            match frame {
                None => return Ok(None),
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
            }
        }
    }
}

/// Takes one complete event (terminated by a blank line) from the buffer.
pub fn take_event(buf: &mut BytesMut) -> Option<SseEvent> {
    loop {
        // Find the end of an event: "\n\n" (or "\r\n\r\n").
        let text = &buf[..];
        let mut end = None;
        let mut i = 0;
        while i + 1 < text.len() {
            if text[i] == b'\n' && text[i + 1] == b'\n' {
                end = Some((i, 2));
                break;
            }
            if text[i] == b'\n'
                && text[i + 1] == b'\r'
                && i + 2 < text.len()
                && text[i + 2] == b'\n'
            {
                end = Some((i, 3));
                break;
            }
            i += 1;
        }
        let (at, sep) = end?;
        let raw = buf.split_to(at + sep);
        let raw = String::from_utf8_lossy(&raw[..at]);
        let mut event = SseEvent::default();
        let mut has_data = false;
        for line in raw.lines() {
            let line = line.trim_end_matches('\r');
            if line.is_empty() || line.starts_with(':') {
                continue;
            }
            let (field, value) = match line.split_once(':') {
                Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                None => (line, ""),
            };
            match field {
                "id" => event.id = Some(value.to_string()),
                "event" => event.event = Some(value.to_string()),
                "data" => {
                    if has_data {
                        event.data.push('\n');
                    }
                    event.data.push_str(value);
                    has_data = true;
                }
                _ => {}
            }
        }
        if has_data || event.id.is_some() {
            return Some(event);
        }
        // A comment or keep-alive only: look for the next event.
    }
}

/// The sequence number of a catalog update.
pub fn update_seq(update: &CatalogUpdate) -> u64 {
    match update {
        CatalogUpdate::Snapshot { seq, .. }
        | CatalogUpdate::App { seq, .. }
        | CatalogUpdate::AppRemoved { seq, .. }
        | CatalogUpdate::Machine { seq, .. }
        | CatalogUpdate::MachineRemoved { seq, .. } => *seq,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_events_split_and_join_data_lines() {
        let mut buf = BytesMut::from(&b": keepalive\n\nid: 4\ndata: {\"a\":\ndata: 1}\n\nid: 5\r\ndata: x\r\n\r\nid: 6\ndata: partial"[..]);
        let e = take_event(&mut buf).unwrap();
        assert_eq!(e.id.as_deref(), Some("4"));
        assert_eq!(e.data, "{\"a\":\n1}");
        let e = take_event(&mut buf).unwrap();
        assert_eq!(e.id.as_deref(), Some("5"));
        assert_eq!(e.data, "x");
        assert!(take_event(&mut buf).is_none());
        assert_eq!(&buf[..], b"id: 6\ndata: partial");
    }

    #[test]
    fn control_urls_parse() {
        let c = ControlClient::new("http://127.0.0.1:4280", "t").unwrap();
        assert_eq!(c.authority, "127.0.0.1:4280");
        let c = ControlClient::new("http://api.local:80/base/", "t").unwrap();
        assert_eq!(c.base_path, "/base");
        assert!(ControlClient::new("ftp://x", "t").is_err());
    }
}
