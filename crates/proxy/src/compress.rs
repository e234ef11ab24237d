//! Response compression (spec §9.6): when the app set no `Content-Encoding`, negotiate
//! from `Accept-Encoding` with the preference zstd > br > gzip > deflate. The proxy buffers
//! the body before compressing it (as Fly does); a body larger than the buffer limit is
//! passed on uncompressed. `Content-Encoding: none` from the app disables compression.

use std::io::Write;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};

use crate::body::{CollectError, RespBody};

/// Bodies larger than this are streamed uncompressed.
const BUFFER_LIMIT: usize = 8 * 1024 * 1024;
/// Bodies smaller than this are not worth compressing.
const MIN_SIZE: u64 = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    Zstd,
    Brotli,
    Gzip,
    Deflate,
}

impl Encoding {
    pub fn token(self) -> &'static str {
        match self {
            Encoding::Zstd => "zstd",
            Encoding::Brotli => "br",
            Encoding::Gzip => "gzip",
            Encoding::Deflate => "deflate",
        }
    }
}

/// The best encoding the client accepts, by the proxy's preference order.
pub fn negotiate(accept: &str) -> Option<Encoding> {
    let mut accepted = [false; 4];
    let mut wildcard = false;
    for item in accept.split(',') {
        let mut pieces = item.split(';');
        let token = pieces.next().unwrap_or("").trim().to_ascii_lowercase();
        let q = pieces
            .filter_map(|p| {
                p.trim()
                    .strip_prefix("q=")
                    .and_then(|q| q.trim().parse::<f32>().ok())
            })
            .next()
            .unwrap_or(1.0);
        let ok = q > 0.0;
        match token.as_str() {
            "zstd" => accepted[0] = ok,
            "br" => accepted[1] = ok,
            "gzip" | "x-gzip" => accepted[2] = ok,
            "deflate" => accepted[3] = ok,
            "*" => wildcard = ok,
            _ => {}
        }
    }
    let order = [
        Encoding::Zstd,
        Encoding::Brotli,
        Encoding::Gzip,
        Encoding::Deflate,
    ];
    if let Some(i) = accepted.iter().position(|a| *a) {
        return Some(order[i]);
    }
    wildcard.then_some(Encoding::Gzip)
}

fn compressible_type(content_type: &str) -> bool {
    let ct = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    ct.starts_with("text/")
        || ct.ends_with("+json")
        || ct.ends_with("+xml")
        || matches!(
            ct.as_str(),
            "application/json"
                | "application/javascript"
                | "application/x-javascript"
                | "application/xml"
                | "application/wasm"
                | "image/svg+xml"
                | "application/graphql-response+json"
        )
}

/// Whether the response should be compressed for this request.
pub fn wants_compression(req_headers: &HeaderMap, resp: &Response<RespBody>) -> bool {
    let Some(accept) = req_headers
        .get(header::ACCEPT_ENCODING)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let headers = resp.headers();
    let content_length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    worth_compressing(
        accept,
        &ResponseTraits {
            status: resp.status().as_u16(),
            content_type: headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok()),
            content_encoding: headers.contains_key(header::CONTENT_ENCODING),
            content_range: headers.contains_key(header::CONTENT_RANGE),
            content_length,
        },
    )
}

/// What decides whether a response is compressed.
pub struct ResponseTraits<'a> {
    pub status: u16,
    pub content_type: Option<&'a str>,
    pub content_encoding: bool,
    pub content_range: bool,
    pub content_length: Option<u64>,
}

/// Whether a response with these traits should be compressed for a client that sent
/// `accept` as its `Accept-Encoding`.
pub fn worth_compressing(accept: &str, resp: &ResponseTraits<'_>) -> bool {
    if resp.status != 200 || resp.content_encoding || resp.content_range {
        return false;
    }
    let Some(ct) = resp.content_type else {
        return false;
    };
    if !compressible_type(ct) {
        return false;
    }
    if resp.content_length.is_some_and(|len| len < MIN_SIZE) {
        return false;
    }
    negotiate(accept).is_some()
}

fn compress(encoding: Encoding, data: &[u8]) -> std::io::Result<Vec<u8>> {
    match encoding {
        Encoding::Zstd => zstd::stream::encode_all(data, 3),
        Encoding::Brotli => {
            let mut out = Vec::with_capacity(data.len() / 3);
            {
                let mut writer = brotli::CompressorWriter::new(&mut out, 4096, 5, 22);
                writer.write_all(data)?;
                writer.flush()?;
            }
            Ok(out)
        }
        Encoding::Gzip => {
            let mut enc = flate2::write::GzEncoder::new(
                Vec::with_capacity(data.len() / 3),
                flate2::Compression::new(5),
            );
            enc.write_all(data)?;
            enc.finish()
        }
        Encoding::Deflate => {
            let mut enc = flate2::write::ZlibEncoder::new(
                Vec::with_capacity(data.len() / 3),
                flate2::Compression::new(5),
            );
            enc.write_all(data)?;
            enc.finish()
        }
    }
}

/// Buffers and compresses the response body; gives it back untouched when that is not
/// possible (too large, read error before any byte).
pub async fn compress_response(
    resp: Response<RespBody>,
    req_headers: &HeaderMap,
) -> Response<RespBody> {
    let Some(encoding) = req_headers
        .get(header::ACCEPT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .and_then(negotiate)
    else {
        return resp;
    };
    let (mut parts, body) = resp.into_parts();
    let data = match body.collect_limited(BUFFER_LIMIT).await {
        Ok(data) => data,
        Err(CollectError::TooLarge { prefix, rest }) => {
            return Response::from_parts(
                parts,
                RespBody::Chained {
                    prefix: Some(prefix),
                    rest,
                },
            );
        }
        Err(CollectError::Failed(e)) => {
            tracing::debug!(error = %e, "reading a response to compress");
            parts.status = StatusCode::BAD_GATEWAY;
            parts.headers.clear();
            return Response::from_parts(parts, RespBody::full("the app's response ended early\n"));
        }
    };
    if (data.len() as u64) < MIN_SIZE {
        return Response::from_parts(parts, RespBody::full(data));
    }
    let compressed = if data.len() > 64 * 1024 {
        let input = data.clone();
        tokio::task::spawn_blocking(move || compress(encoding, &input))
            .await
            .ok()
            .and_then(Result::ok)
    } else {
        compress(encoding, &data).ok()
    };
    let Some(compressed) = compressed else {
        return Response::from_parts(parts, RespBody::full(data));
    };
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_ENCODING,
        HeaderValue::from_static(encoding.token()),
    );
    parts
        .headers
        .append(header::VARY, HeaderValue::from_static("Accept-Encoding"));
    if let Some(etag) = parts
        .headers
        .get(header::ETAG)
        .and_then(|v| v.to_str().ok())
        && !etag.starts_with("W/")
        && let Ok(weak) = HeaderValue::from_str(&format!("W/{etag}"))
    {
        parts.headers.insert(header::ETAG, weak);
    }
    Response::from_parts(parts, RespBody::full(Bytes::from(compressed)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation_follows_preference_and_q_values() {
        assert_eq!(negotiate("gzip, deflate, br, zstd"), Some(Encoding::Zstd));
        assert_eq!(negotiate("gzip, br"), Some(Encoding::Brotli));
        assert_eq!(negotiate("deflate, gzip;q=0.5"), Some(Encoding::Gzip));
        assert_eq!(negotiate("zstd;q=0, deflate"), Some(Encoding::Deflate));
        assert_eq!(negotiate("identity"), None);
        assert_eq!(negotiate("*"), Some(Encoding::Gzip));
    }

    #[test]
    fn every_encoding_round_trips() {
        let data = "hello world ".repeat(100);
        for enc in [
            Encoding::Zstd,
            Encoding::Brotli,
            Encoding::Gzip,
            Encoding::Deflate,
        ] {
            let out = compress(enc, data.as_bytes()).unwrap();
            assert!(out.len() < data.len(), "{enc:?}");
            let back = match enc {
                Encoding::Zstd => zstd::stream::decode_all(&out[..]).unwrap(),
                Encoding::Brotli => {
                    let mut v = Vec::new();
                    brotli::BrotliDecompress(&mut &out[..], &mut v).unwrap();
                    v
                }
                Encoding::Gzip => {
                    let mut v = Vec::new();
                    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&out[..]), &mut v)
                        .unwrap();
                    v
                }
                Encoding::Deflate => {
                    let mut v = Vec::new();
                    std::io::Read::read_to_end(
                        &mut flate2::read::ZlibDecoder::new(&out[..]),
                        &mut v,
                    )
                    .unwrap();
                    v
                }
            };
            assert_eq!(back, data.as_bytes());
        }
    }
}
