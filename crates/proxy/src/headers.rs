//! Header handling: hop-by-hop removal (RFC 9110 §7.6.1) and the headers the `http`
//! handler adds (spec §9.4, §9.5).

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{BufMut, Bytes, BytesMut};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

pub static FLY_CLIENT_IP: HeaderName = HeaderName::from_static("fly-client-ip");
pub static FLY_FORWARDED_PORT: HeaderName = HeaderName::from_static("fly-forwarded-port");
pub static FLY_REGION: HeaderName = HeaderName::from_static("fly-region");
pub static FLY_REQUEST_ID: HeaderName = HeaderName::from_static("fly-request-id");
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_PORT: HeaderName = HeaderName::from_static("x-forwarded-port");
pub static X_FORWARDED_SSL: HeaderName = HeaderName::from_static("x-forwarded-ssl");
pub static FLY_REPLAY: HeaderName = HeaderName::from_static("fly-replay");
pub static FLY_REPLAY_SRC: HeaderName = HeaderName::from_static("fly-replay-src");
pub static FLY_REPLAY_FAILED: HeaderName = HeaderName::from_static("fly-replay-failed");
pub static FLY_PREFERRED_INSTANCE_UNAVAILABLE: HeaderName =
    HeaderName::from_static("fly-preferred-instance-unavailable");
pub static FLY_PREFER_REGION: HeaderName = HeaderName::from_static("fly-prefer-region");
pub static FLY_FORCE_REGION: HeaderName = HeaderName::from_static("fly-force-region");
pub static FLY_PREFER_INSTANCE_ID: HeaderName = HeaderName::from_static("fly-prefer-instance-id");
pub static FLY_FORCE_INSTANCE_ID: HeaderName = HeaderName::from_static("fly-force-instance-id");
pub static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
pub static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// The fixed hop-by-hop fields; `Connection` may name more.
const HOP_BY_HOP: [&HeaderName; 5] = [
    &header::CONNECTION,
    &header::TE,
    &header::TRANSFER_ENCODING,
    &header::UPGRADE,
    &header::PROXY_AUTHORIZATION,
];

/// Removes hop-by-hop header fields: those named by `Connection`, and the fixed set.
/// With `keep_upgrade`, `Connection: upgrade` and `Upgrade` stay (WebSocket handshakes).
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|token| {
                let token = token.trim();
                if token.is_empty() || (keep_upgrade && token.eq_ignore_ascii_case("upgrade")) {
                    None
                } else {
                    HeaderName::from_bytes(token.as_bytes()).ok()
                }
            })
            .collect();
        for name in named {
            headers.remove(&name);
        }
    }
    // `TE: trailers` is end-to-end in effect (gRPC needs it through to h2 backends).
    let te_trailers = headers
        .get(header::TE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("trailers"));
    for name in HOP_BY_HOP {
        if keep_upgrade && (*name == header::CONNECTION || *name == header::UPGRADE) {
            continue;
        }
        if te_trailers && *name == header::TE {
            continue;
        }
        headers.remove(name);
    }
    headers.remove(&KEEP_ALIVE);
    headers.remove(&PROXY_CONNECTION);
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// Whether a request asks for a protocol upgrade (WebSocket).
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// Appends `value` to a comma-separated header (`X-Forwarded-For`, `Via`).
pub fn append_list(headers: &mut HeaderMap, name: &HeaderName, value: &HeaderValue) {
    let existing: Vec<&HeaderValue> = headers.get_all(name).iter().collect();
    if existing.is_empty() {
        headers.insert(name.clone(), value.clone());
        return;
    }
    let mut buf =
        BytesMut::with_capacity(existing.iter().map(|v| v.len() + 2).sum::<usize>() + value.len());
    for v in existing {
        if !buf.is_empty() {
            buf.put_slice(b", ");
        }
        buf.put_slice(v.as_bytes());
    }
    buf.put_slice(b", ");
    buf.put_slice(value.as_bytes());
    if let Ok(joined) = HeaderValue::from_maybe_shared(buf.freeze()) {
        headers.insert(name.clone(), joined);
    }
}

/// Request ids: a random per-process prefix and a counter, `<20 hex>-<region>`.
pub struct RequestIds {
    prefix: u32,
    counter: AtomicU64,
    suffix: String,
}

impl RequestIds {
    pub fn new(region: &str) -> Self {
        RequestIds {
            prefix: rand::random(),
            counter: AtomicU64::new(rand::random::<u32>() as u64),
            suffix: region.to_string(),
        }
    }

    pub fn next(&self) -> HeaderValue {
        let mut buf = Vec::with_capacity(21 + self.suffix.len());
        self.write_to(&mut buf);
        HeaderValue::from_maybe_shared(Bytes::from(buf))
            .unwrap_or_else(|_| HeaderValue::from_static("0-unknown"))
    }

    /// Appends the next id to `out`.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let millis = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        // 12 hex digits of time, 8 of process prefix mixed with the counter's high bits,
        // then the counter's low 32 bits: sortable by time, unique per process.
        let mixed = self.prefix ^ ((n >> 32) as u32);
        let mut id = [0u8; 28];
        for (i, shift) in (0..12).rev().enumerate() {
            id[i] = HEX[((millis >> (shift * 4)) & 0xf) as usize];
        }
        for (i, shift) in (0..8).rev().enumerate() {
            id[12 + i] = HEX[((mixed >> (shift * 4)) & 0xf) as usize];
        }
        for (i, shift) in (0..8).rev().enumerate() {
            id[20 + i] = HEX[((n >> (shift * 4)) & 0xf) as usize];
        }
        out.extend_from_slice(&id);
        out.push(b'-');
        out.extend_from_slice(self.suffix.as_bytes());
    }
}

/// A header value from bytes known to be valid (digits, addresses), or empty.
pub fn value_of(text: &str) -> HeaderValue {
    HeaderValue::from_maybe_shared(Bytes::copy_from_slice(text.as_bytes()))
        .unwrap_or_else(|_| HeaderValue::from_static(""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_fields_and_connection_named_ones_go() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("gzip"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
        let mut h = HeaderMap::new();
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.get(header::TE).unwrap(), "trailers");
    }

    #[test]
    fn upgrade_headers_survive_when_asked() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(is_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.get(header::UPGRADE).unwrap(), "websocket");
        assert_eq!(h.get(header::CONNECTION).unwrap(), "upgrade");
    }

    #[test]
    fn lists_append() {
        let mut h = HeaderMap::new();
        append_list(
            &mut h,
            &X_FORWARDED_FOR,
            &HeaderValue::from_static("1.2.3.4"),
        );
        assert_eq!(h.get(&X_FORWARDED_FOR).unwrap(), "1.2.3.4");
        h.append(&X_FORWARDED_FOR, HeaderValue::from_static("5.6.7.8"));
        append_list(
            &mut h,
            &X_FORWARDED_FOR,
            &HeaderValue::from_static("9.9.9.9"),
        );
        assert_eq!(
            h.get(&X_FORWARDED_FOR).unwrap(),
            "1.2.3.4, 5.6.7.8, 9.9.9.9"
        );
    }

    #[test]
    fn request_ids_are_unique_and_carry_region() {
        let ids = RequestIds::new("ams");
        let a = ids.next();
        let b = ids.next();
        assert_ne!(a, b);
        assert!(a.to_str().unwrap().ends_with("-ams"));
        assert_eq!(a.len(), 28 + 4);
    }
}
