//! `[[statics]]`: requests under a machine config's `url_prefix` are answered by the
//! proxy from the files under `guest_path` in the machine's image, without the app.
//!
//! The proxy never opens image files itself: it asks an [`ImageFiles`] (in `aloft
//! server`, the agent on the same host, which resolves paths in the union of the image's
//! unpacked layers, read-only and never through a symlink). Here the URL path is turned
//! into plain components (percent-decoded; `.`, `..`, NUL and encoded slashes refused),
//! and the answer gets `ETag`, `Last-Modified`, conditional requests and a type from the
//! file's extension. A path under a prefix that names no file is a 404 from the static
//! server; the app never sees requests under a prefix.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use aloft_api::Static;
use bytes::Bytes;
use http::{HeaderValue, Method, Response, StatusCode, header};

use crate::body::RespBody;

/// What a path names in a machine's image.
#[derive(Debug)]
pub enum ImageEntry {
    /// A regular file, opened read-only.
    File {
        file: std::fs::File,
        len: u64,
        modified: SystemTime,
    },
    Directory,
    Missing,
}

/// Read-only access to the files of machines' images.
pub trait ImageFiles: Send + Sync {
    /// What `components` (plain names from the image's root) name in the image of
    /// machine `machine_id`. Errors are the reason, for the log.
    fn lookup(&self, machine_id: &str, components: &[&str]) -> Result<ImageEntry, String>;
}

/// The mapping whose `url_prefix` covers `path` (the longest), and the rest of the path
/// after it. Mappings served from a Tigris bucket are not served here.
pub fn matching<'a>(statics: &'a [Static], path: &'a str) -> Option<(&'a Static, &'a str)> {
    statics
        .iter()
        .filter(|s| s.tigris_bucket.is_none() && !s.url_prefix.is_empty())
        .filter_map(|s| {
            let prefix = s.url_prefix.trim_end_matches('/');
            let rest = path.strip_prefix(prefix)?;
            (rest.is_empty() || rest.starts_with('/')).then_some((s, rest))
        })
        .max_by_key(|(s, _)| s.url_prefix.trim_end_matches('/').len())
}

/// Why a URL path cannot name a file.
#[derive(Debug, PartialEq, Eq)]
pub struct BadPath;

fn hex_value(byte: u8) -> Option<u8> {
    match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'a'..=b'f' => Some(byte - b'a' + 10),
        b'A'..=b'F' => Some(byte - b'A' + 10),
        _ => None,
    }
}

fn percent_decode(segment: &str) -> Result<String, BadPath> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let high = bytes
                .get(i + 1)
                .copied()
                .and_then(hex_value)
                .ok_or(BadPath)?;
            let low = bytes
                .get(i + 2)
                .copied()
                .and_then(hex_value)
                .ok_or(BadPath)?;
            out.push(high << 4 | low);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| BadPath)
}

/// The plain components of the rest of a URL path (empty segments dropped). `.`, `..`,
/// and anything that decodes to a `/`, `\` or NUL is refused, never resolved.
pub fn components(rest: &str) -> Result<Vec<String>, BadPath> {
    let mut out = Vec::new();
    for segment in rest.split('/').filter(|s| !s.is_empty()) {
        let name = percent_decode(segment)?;
        if name == "." || name == ".." || name.contains(['/', '\\', '\0']) {
            return Err(BadPath);
        }
        out.push(name);
    }
    Ok(out)
}

/// The `Content-Type` for a file name, by extension.
pub fn content_type(name: &str) -> &'static str {
    let extension = name
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())
        .unwrap_or_default();
    match extension.as_str() {
        "html" | "htm" => "text/html; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "json" | "map" => "application/json",
        "txt" => "text/plain; charset=utf-8",
        "csv" => "text/csv; charset=utf-8",
        "md" => "text/markdown; charset=utf-8",
        "xml" => "application/xml",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "avif" => "image/avif",
        "ico" => "image/x-icon",
        "wasm" => "application/wasm",
        "woff" => "font/woff",
        "woff2" => "font/woff2",
        "ttf" => "font/ttf",
        "otf" => "font/otf",
        "pdf" => "application/pdf",
        "mp4" => "video/mp4",
        "webm" => "video/webm",
        "mp3" => "audio/mpeg",
        "ogg" => "audio/ogg",
        "zip" => "application/zip",
        "gz" => "application/gzip",
        _ => "application/octet-stream",
    }
}

fn unix_seconds(time: SystemTime) -> (u64, u32) {
    time.duration_since(UNIX_EPOCH)
        .map(|d| (d.as_secs(), d.subsec_nanos()))
        .unwrap_or((0, 0))
}

/// A validator from what identifies a version of a file in an image: size and mtime.
fn etag(len: u64, modified: SystemTime) -> String {
    let (secs, nanos) = unix_seconds(modified);
    format!("\"{len:x}-{secs:x}.{nanos:x}\"")
}

/// `If-None-Match` names `tag` (or `*`); weak comparison, as RFC 9110 asks for GET.
fn none_match(header: &str, tag: &str) -> bool {
    let tag = tag.trim_start_matches("W/");
    header
        .split(',')
        .map(str::trim)
        .any(|candidate| candidate == "*" || candidate.trim_start_matches("W/") == tag)
}

fn text_response(status: StatusCode, message: &'static str) -> Response<RespBody> {
    let mut resp = Response::new(RespBody::full(Bytes::from_static(message.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// The response to a request under `mapping` for machine `machine_id`: the file, a 304,
/// or an error status. `rest`: the request path after the prefix.
pub async fn respond(
    files: Arc<dyn ImageFiles>,
    machine_id: &str,
    mapping: &Static,
    rest: &str,
    method: &Method,
    headers: &http::HeaderMap,
) -> Response<RespBody> {
    if method != Method::GET && method != Method::HEAD {
        let mut resp = text_response(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        resp.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return resp;
    }
    let Ok(asked) = components(rest) else {
        return text_response(StatusCode::BAD_REQUEST, "bad path\n");
    };
    let mut path: Vec<String> = mapping
        .guest_path
        .split('/')
        .filter(|c| !c.is_empty())
        .map(str::to_string)
        .collect();
    path.extend(asked);
    let index: Vec<String> = mapping
        .index_document
        .as_deref()
        .unwrap_or_default()
        .split('/')
        .filter(|c| !c.is_empty())
        .map(str::to_string)
        .collect();
    let machine = machine_id.to_string();
    let found =
        tokio::task::spawn_blocking(move || -> Result<Option<(String, ImageEntry)>, String> {
            let names: Vec<&str> = path.iter().map(String::as_str).collect();
            match files.lookup(&machine, &names)? {
                ImageEntry::Directory if !index.is_empty() => {
                    let mut names = names;
                    names.extend(index.iter().map(String::as_str));
                    let name = names.last().map(|n| n.to_string()).unwrap_or_default();
                    Ok(Some((name, files.lookup(&machine, &names)?)))
                }
                entry => Ok(Some((
                    names.last().map(|n| n.to_string()).unwrap_or_default(),
                    entry,
                ))),
            }
        })
        .await;
    let (name, entry) = match found {
        Ok(Ok(Some(found))) => found,
        Ok(Ok(None)) => return text_response(StatusCode::NOT_FOUND, "not found\n"),
        Ok(Err(reason)) => {
            tracing::warn!(machine = %machine_id, %reason, "reading a static file");
            return text_response(StatusCode::BAD_GATEWAY, "static file unavailable\n");
        }
        Err(err) => {
            tracing::warn!(error = %err, "reading a static file");
            return text_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "static file unavailable\n",
            );
        }
    };
    let ImageEntry::File {
        file,
        len,
        modified,
    } = entry
    else {
        return text_response(StatusCode::NOT_FOUND, "not found\n");
    };
    let tag = etag(len, modified);
    let last_modified = crate::http_date::format(unix_seconds(modified).0);
    let not_modified = match headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
    {
        Some(candidates) => none_match(candidates, &tag),
        None => headers
            .get(header::IF_MODIFIED_SINCE)
            .and_then(|v| v.to_str().ok())
            .and_then(crate::http_date::parse)
            .is_some_and(|since| unix_seconds(modified).0 <= since),
    };
    let mut resp = if not_modified {
        let mut resp = Response::new(RespBody::empty());
        *resp.status_mut() = StatusCode::NOT_MODIFIED;
        resp
    } else {
        let body = if method == Method::HEAD {
            RespBody::empty()
        } else {
            RespBody::file(file, len)
        };
        let mut resp = Response::new(body);
        let headers = resp.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(content_type(&name)),
        );
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        resp
    };
    let headers = resp.headers_mut();
    if let Ok(value) = HeaderValue::from_str(&tag) {
        headers.insert(header::ETAG, value);
    }
    if let Ok(value) = HeaderValue::from_bytes(&last_modified) {
        headers.insert(header::LAST_MODIFIED, value);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapping(prefix: &str) -> Static {
        Static {
            guest_path: "/app/public".into(),
            url_prefix: prefix.into(),
            ..Static::default()
        }
    }

    /// Files from one directory, standing in for a machine's image.
    struct Directory(std::path::PathBuf);

    impl ImageFiles for Directory {
        fn lookup(&self, _: &str, components: &[&str]) -> Result<ImageEntry, String> {
            let path = components.iter().fold(self.0.clone(), |p, c| p.join(c));
            let file = std::fs::File::open(&path).map_err(|e| e.to_string())?;
            let meta = file.metadata().map_err(|e| e.to_string())?;
            Ok(ImageEntry::File {
                file,
                len: meta.len(),
                modified: meta.modified().map_err(|e| e.to_string())?,
            })
        }
    }

    /// A file far larger than anything worth holding in memory is served whole, in
    /// chunks of at most 64 KiB read as the client takes them (it used to be read whole
    /// into memory, and refused above 64 MiB).
    #[tokio::test]
    async fn large_files_are_streamed_in_bounded_chunks() {
        use http_body_util::BodyExt;
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("app/public")).unwrap();
        let len: u64 = 200 * 1024 * 1024 + 7;
        let file = std::fs::File::create(dir.path().join("app/public/big.bin")).unwrap();
        file.set_len(len).unwrap();
        let files: Arc<dyn ImageFiles> = Arc::new(Directory(dir.path().to_path_buf()));
        let resp = respond(
            files,
            "m1",
            &mapping("/static"),
            "/big.bin",
            &Method::GET,
            &http::HeaderMap::new(),
        )
        .await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(
            resp.headers()[header::CONTENT_LENGTH],
            len.to_string().as_str()
        );
        let mut body = resp.into_body();
        let (mut total, mut largest) = (0u64, 0usize);
        while let Some(frame) = body.frame().await {
            let data = frame.unwrap().into_data().unwrap();
            largest = largest.max(data.len());
            total += data.len() as u64;
        }
        assert_eq!(total, len);
        assert!(largest <= 64 * 1024, "a chunk of {largest} bytes");
    }

    #[tokio::test]
    async fn a_file_shorter_than_announced_ends_the_body_with_an_error() {
        use http_body_util::BodyExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("short");
        std::fs::write(&path, b"0123456789").unwrap();
        let mut body = RespBody::file(std::fs::File::open(&path).unwrap(), 20);
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&first[..], b"0123456789");
        assert!(body.frame().await.unwrap().is_err());
    }

    #[test]
    fn prefixes_match_whole_segments_and_the_longest_wins() {
        let statics = vec![mapping("/static"), mapping("/static/img/"), mapping("/")];
        let (found, rest) = matching(&statics, "/static/a.css").unwrap();
        assert_eq!((found.url_prefix.as_str(), rest), ("/static", "/a.css"));
        let (found, rest) = matching(&statics, "/static/img/x.png").unwrap();
        assert_eq!(
            (found.url_prefix.as_str(), rest),
            ("/static/img/", "/x.png")
        );
        let (found, _) = matching(&statics, "/staticky").unwrap();
        assert_eq!(found.url_prefix, "/");
        assert!(matching(&statics[..1], "/staticky").is_none());
        let bucket = vec![Static {
            tigris_bucket: Some("b".into()),
            ..mapping("/static")
        }];
        assert!(matching(&bucket, "/static/a.css").is_none());
    }

    #[test]
    fn paths_decode_and_dot_segments_are_refused() {
        assert_eq!(
            components("/a%20b//c.css").unwrap(),
            vec!["a b".to_string(), "c.css".to_string()]
        );
        for bad in [
            "/..",
            "/a/../b",
            "/%2e%2e/x",
            "/a%2fb",
            "/a%5cb",
            "/a%00",
            "/.",
            "/%zz",
        ] {
            assert_eq!(components(bad), Err(BadPath), "{bad}");
        }
    }

    #[test]
    fn etags_compare_weakly_and_star_matches() {
        assert!(none_match("\"a\", W/\"b\"", "\"b\""));
        assert!(none_match("*", "\"b\""));
        assert!(!none_match("\"a\"", "\"b\""));
    }
}
