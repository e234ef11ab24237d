//! A small JSON-over-HTTP client for Aloft's APIs (plain HTTP over TCP).

use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use http::{HeaderValue, Method, Request, StatusCode, header};
use http_body_util::{BodyExt, BodyStream, Full};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use serde::de::DeserializeOwned;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach {url}: {reason}")]
    Unreachable { url: String, reason: String },
    /// The server answered with an error status; `message` is its `{"error": ...}` text.
    #[error("{message}")]
    Api { status: StatusCode, message: String },
    #[error("invalid response from {url}: {reason}")]
    InvalidResponse { url: String, reason: String },
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("request to {url} timed out after {after:?}")]
    Timeout { url: String, after: Duration },
}

impl ClientError {
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
    pub fn is_not_found(&self) -> bool {
        self.status() == Some(StatusCode::NOT_FOUND)
    }
}

type Body = Full<Bytes>;

/// The lines of a streamed response body.
pub type LineStream =
    std::pin::Pin<Box<dyn Stream<Item = Result<String, ClientError>> + Send + 'static>>;

/// A client for one base URL (`http://127.0.0.1:4280`) with an optional bearer token.
#[derive(Clone)]
pub struct Client {
    base: String,
    token: Option<String>,
    http: HyperClient<HttpConnector, Body>,
    timeout: Duration,
}

impl Client {
    pub fn new(base: &str, token: Option<String>) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        let http = HyperClient::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Self {
            base: base.trim_end_matches('/').to_string(),
            token,
            http,
            timeout: Duration::from_secs(300),
        }
    }

    /// Time limit for one whole request (not for streams).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    fn build(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        extra: &[(&str, &str)],
    ) -> Result<Request<Body>, ClientError> {
        let mut builder = Request::builder().method(method).uri(self.url(path));
        if let Some(token) = &self.token {
            builder = builder.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        for (name, value) in extra {
            builder = builder.header(*name, *value);
        }
        let body = match body {
            Some(bytes) => {
                builder = builder.header(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                Full::new(Bytes::from(bytes))
            }
            None => Full::new(Bytes::new()),
        };
        builder
            .body(body)
            .map_err(|e| ClientError::InvalidRequest(e.to_string()))
    }

    async fn send(
        &self,
        request: Request<Body>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, ClientError> {
        let url = request.uri().to_string();
        self.http
            .request(request)
            .await
            .map_err(|e| ClientError::Unreachable {
                url,
                reason: connect_reason(&e),
            })
    }

    /// Sends a request and returns the raw status and body.
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        headers: &[(&str, &str)],
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let url = self.url(path);
        let request = self.build(method, path, body, headers)?;
        let exchange = async {
            let response = self.send(request).await?;
            let status = response.status();
            let bytes = response
                .into_body()
                .collect()
                .await
                .map_err(|e| ClientError::InvalidResponse {
                    url: url.clone(),
                    reason: e.to_string(),
                })?
                .to_bytes();
            Ok((status, bytes))
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| ClientError::Timeout {
                url: self.url(path),
                after: self.timeout,
            })?
    }

    /// Sends `body` as JSON and decodes a JSON answer; error statuses become `ClientError::Api`.
    pub async fn json<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        let payload = match body {
            Some(b) => Some(
                serde_json::to_vec(b).map_err(|e| ClientError::InvalidRequest(e.to_string()))?,
            ),
            None => None,
        };
        let (status, bytes) = self.raw(method, path, payload, &[]).await?;
        decode(&self.url(path), status, &bytes)
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.json::<(), T>(Method::GET, path, None).await
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        self.json(Method::POST, path, Some(body)).await
    }

    pub async fn put<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        self.json(Method::PUT, path, Some(body)).await
    }

    /// Sends a request whose answer body is ignored (error statuses still fail).
    pub async fn call<B: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<(), ClientError> {
        let payload = match body {
            Some(b) => Some(
                serde_json::to_vec(b).map_err(|e| ClientError::InvalidRequest(e.to_string()))?,
            ),
            None => None,
        };
        let (status, bytes) = self.raw(method, path, payload, &[]).await?;
        if status.is_success() {
            Ok(())
        } else {
            Err(api_error(status, &bytes))
        }
    }

    /// Sends a request and yields the answer's body line by line as it arrives
    /// (NDJSON and server-sent events). An error status fails before any line.
    pub async fn lines<B: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
        headers: &[(&str, &str)],
    ) -> Result<LineStream, ClientError> {
        let payload = match body {
            Some(b) => Some(
                serde_json::to_vec(b).map_err(|e| ClientError::InvalidRequest(e.to_string()))?,
            ),
            None => None,
        };
        let url = self.url(path);
        let request = self.build(method, path, payload, headers)?;
        let response = self.send(request).await?;
        let status = response.status();
        if !status.is_success() {
            let bytes = response
                .into_body()
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            return Err(api_error(status, &bytes));
        }
        let frames = BodyStream::new(response.into_body());
        Ok(Box::pin(split_lines(frames, url)))
    }
}

fn split_lines<S, E>(
    frames: S,
    url: String,
) -> impl Stream<Item = Result<String, ClientError>> + Send + 'static
where
    S: Stream<Item = Result<hyper::body::Frame<Bytes>, E>> + Send + 'static,
    E: std::fmt::Display,
{
    let state = (Box::pin(frames), Vec::<u8>::new(), false);
    futures_util::stream::unfold(state, move |(mut frames, mut pending, mut finished)| {
        let url = url.clone();
        async move {
            loop {
                if let Some(pos) = pending.iter().position(|b| *b == b'\n') {
                    let mut line: Vec<u8> = pending.drain(..=pos).collect();
                    line.pop();
                    if line.last() == Some(&b'\r') {
                        line.pop();
                    }
                    let text = String::from_utf8_lossy(&line).into_owned();
                    return Some((Ok(text), (frames, pending, finished)));
                }
                if finished {
                    if pending.is_empty() {
                        return None;
                    }
                    let text = String::from_utf8_lossy(&pending).into_owned();
                    pending.clear();
                    return Some((Ok(text), (frames, pending, true)));
                }
                match frames.next().await {
                    Some(Ok(frame)) => {
                        if let Ok(data) = frame.into_data() {
                            pending.extend_from_slice(&data);
                        }
                    }
                    Some(Err(e)) => {
                        let err = ClientError::InvalidResponse {
                            url: url.clone(),
                            reason: e.to_string(),
                        };
                        return Some((Err(err), (frames, Vec::new(), true)));
                    }
                    None => finished = true,
                }
            }
        }
    })
}

fn connect_reason(error: &hyper_util::client::legacy::Error) -> String {
    use std::error::Error;
    let mut reason = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        reason = inner.to_string();
        source = inner.source();
    }
    reason
}

/// Turns an error status and its body into `ClientError::Api`, reading `{"error": ...}`
/// when the body has it.
pub fn api_error(status: StatusCode, body: &[u8]) -> ClientError {
    let message = serde_json::from_slice::<aloft_api::ErrorResponse>(body)
        .map(|e| e.error)
        .unwrap_or_else(|_| {
            let text = String::from_utf8_lossy(body).trim().to_string();
            if text.is_empty() {
                status.to_string()
            } else {
                text
            }
        });
    ClientError::Api { status, message }
}

fn decode<T: DeserializeOwned>(
    url: &str,
    status: StatusCode,
    body: &[u8],
) -> Result<T, ClientError> {
    if !status.is_success() {
        return Err(api_error(status, body));
    }
    let body = if body.is_empty() {
        b"null".as_slice()
    } else {
        body
    };
    serde_json::from_slice(body).map_err(|e| ClientError::InvalidResponse {
        url: url.to_string(),
        reason: e.to_string(),
    })
}

/// Percent-encodes one path segment or query value.
pub fn encode_component(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_errors_read_the_error_field() {
        let err = api_error(StatusCode::NOT_FOUND, br#"{"error":"app not found"}"#);
        assert_eq!(err.to_string(), "app not found");
        assert!(err.is_not_found());
        let err = api_error(StatusCode::BAD_GATEWAY, b"");
        assert_eq!(err.to_string(), "502 Bad Gateway");
    }

    #[tokio::test]
    async fn lines_are_split_across_frames() {
        let frames = futures_util::stream::iter(vec![
            Ok::<_, std::io::Error>(hyper::body::Frame::data(Bytes::from_static(b"one\ntw"))),
            Ok(hyper::body::Frame::data(Bytes::from_static(b"o\r\nthree"))),
        ]);
        let lines: Vec<String> = split_lines(frames, "u".into())
            .map(|l| l.unwrap())
            .collect()
            .await;
        assert_eq!(lines, vec!["one", "two", "three"]);
    }

    #[test]
    fn components_are_encoded() {
        assert_eq!(encode_component("a b/c"), "a%20b%2Fc");
    }
}
