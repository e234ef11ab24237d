//! The built-in `static` builder and the small file server it ships.
//!
//! Choice: the image is `FROM scratch` with two layers: the `aloft` binary itself at
//! `/aloft` (the same bytes for every static app, so the registry and every host store it
//! once) and the site's files under `/public`. Its command is
//! `/aloft static-server /public`, which serves the files on `$PORT` (default 8080). The
//! agent's init bind-mount is not used because init may live outside the image (microVMs).

use std::convert::Infallible;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};

use bytes::Bytes;
use flate2::Compression;
use flate2::write::GzEncoder;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use sha2::{Digest as _, Sha256};

use crate::BuildError;
use crate::oci::{PushClient, sha256_digest, split_reference};

/// Where the files go in the image, and the port the server listens on by default.
pub const SITE_DIR: &str = "/public";
pub const DEFAULT_PORT: u16 = 8080;

const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";

/// Files never copied into a static image.
const SKIPPED: &[&str] = &[
    "fly.toml",
    "fly.json",
    "fly.yaml",
    "fly.yml",
    ".git",
    ".dockerignore",
    "Dockerfile",
];

/// A built, compressed layer on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layer {
    pub path: PathBuf,
    /// Digest of the compressed blob.
    pub digest: String,
    /// Digest of the uncompressed tar (the image config's `diff_ids`).
    pub diff_id: String,
    pub size: u64,
}

struct HashingWriter<W: Write> {
    inner: W,
    hasher: Sha256,
    written: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> BuildError {
    let context = context.into();
    move |e| BuildError::Io(std::io::Error::new(e.kind(), format!("{context}: {e}")))
}

/// Writes a gzip-compressed, reproducible tar (fixed times and owners, sorted entries) to
/// `dest`, built by `fill`.
fn write_layer(
    dest: &Path,
    fill: impl FnOnce(&mut tar::Builder<&mut dyn Write>) -> std::io::Result<()>,
) -> Result<Layer, BuildError> {
    let file = std::fs::File::create(dest).map_err(io(format!("creating {}", dest.display())))?;
    let compressed = HashingWriter {
        inner: std::io::BufWriter::new(file),
        hasher: Sha256::new(),
        written: 0,
    };
    let encoder = GzEncoder::new(compressed, Compression::fast());
    let mut tar_hash = HashingWriter {
        inner: encoder,
        hasher: Sha256::new(),
        written: 0,
    };
    {
        let writer: &mut dyn Write = &mut tar_hash;
        let mut builder = tar::Builder::new(writer);
        builder.mode(tar::HeaderMode::Deterministic);
        fill(&mut builder).map_err(io(format!("writing {}", dest.display())))?;
        builder
            .finish()
            .map_err(io(format!("writing {}", dest.display())))?;
    }
    let diff_id = format!("sha256:{}", hex::encode(tar_hash.hasher.finalize()));
    let mut compressed = tar_hash
        .inner
        .finish()
        .map_err(io(format!("writing {}", dest.display())))?;
    compressed
        .flush()
        .map_err(io(format!("writing {}", dest.display())))?;
    let digest = format!(
        "sha256:{}",
        hex::encode(compressed.hasher.clone().finalize())
    );
    Ok(Layer {
        path: dest.to_path_buf(),
        digest,
        diff_id,
        size: compressed.written,
    })
}

fn file_header(size: u64, mode: u32) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_size(size);
    header.set_mode(mode);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_entry_type(tar::EntryType::Regular);
    header
}

fn dir_header() -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_size(0);
    header.set_mode(0o755);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_entry_type(tar::EntryType::Directory);
    header
}

/// The layer holding the server binary at `/aloft`, cached by the binary's digest.
pub fn server_layer(binary: &Path, cache_dir: &Path) -> Result<Layer, BuildError> {
    let mut file = std::fs::File::open(binary).map_err(io(format!(
        "reading the server binary {}",
        binary.display()
    )))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buffer)
            .map_err(io(format!("reading {}", binary.display())))?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    let key = hex::encode(hasher.finalize());
    std::fs::create_dir_all(cache_dir).map_err(io(format!("creating {}", cache_dir.display())))?;
    let cached = cache_dir.join(format!("server-{key}.tar.gz"));
    let meta = cache_dir.join(format!("server-{key}.json"));
    if let (Ok(text), true) = (std::fs::read_to_string(&meta), cached.exists())
        && let Ok(value) = serde_json::from_str::<serde_json::Value>(&text)
        && let (Some(digest), Some(diff_id), Some(size)) = (
            value["digest"].as_str(),
            value["diff_id"].as_str(),
            value["size"].as_u64(),
        )
    {
        return Ok(Layer {
            path: cached,
            digest: digest.into(),
            diff_id: diff_id.into(),
            size,
        });
    }
    let staging = cache_dir.join(format!("server-{key}.tar.gz.tmp-{}", std::process::id()));
    let binary_size = std::fs::metadata(binary)
        .map_err(io(format!("reading {}", binary.display())))?
        .len();
    let layer = write_layer(&staging, |builder| {
        let mut source = std::fs::File::open(binary)?;
        builder.append_data(&mut file_header(binary_size, 0o755), "aloft", &mut source)
    })?;
    std::fs::rename(&staging, &cached)
        .map_err(io(format!("moving {} into the cache", staging.display())))?;
    let record =
        serde_json::json!({ "digest": layer.digest, "diff_id": layer.diff_id, "size": layer.size });
    std::fs::write(&meta, record.to_string()).map_err(io(format!("writing {}", meta.display())))?;
    Ok(Layer {
        path: cached,
        ..layer
    })
}

/// Every file under `root` (sorted, relative), skipping fly.toml and friends and anything
/// that is not a regular file or directory.
fn site_entries(root: &Path) -> Result<Vec<(PathBuf, bool)>, BuildError> {
    let mut entries = Vec::new();
    let mut pending = vec![PathBuf::new()];
    while let Some(relative) = pending.pop() {
        let dir = root.join(&relative);
        let mut children: Vec<_> = std::fs::read_dir(&dir)
            .map_err(io(format!("reading {}", dir.display())))?
            .filter_map(Result::ok)
            .map(|e| e.file_name())
            .collect();
        children.sort();
        for name in children {
            if relative.as_os_str().is_empty() && SKIPPED.iter().any(|s| name == *s) {
                continue;
            }
            let child = relative.join(&name);
            let meta = std::fs::metadata(root.join(&child))
                .map_err(io(format!("reading {}", root.join(&child).display())))?;
            if meta.is_dir() {
                entries.push((child.clone(), true));
                pending.push(child);
            } else if meta.is_file() {
                entries.push((child, false));
            }
        }
    }
    entries.sort();
    Ok(entries)
}

/// The layer holding the site's files under `/public`.
pub fn site_layer(root: &Path, dest: &Path) -> Result<(Layer, usize), BuildError> {
    if !root.is_dir() {
        return Err(BuildError::MissingFile(format!(
            "static site directory {}",
            root.display()
        )));
    }
    let entries = site_entries(root)?;
    let files = entries.iter().filter(|(_, dir)| !dir).count();
    let layer = write_layer(dest, |builder| {
        builder.append_data(&mut dir_header(), "public", std::io::empty())?;
        for (relative, is_dir) in &entries {
            let name = Path::new("public").join(relative);
            if *is_dir {
                builder.append_data(&mut dir_header(), &name, std::io::empty())?;
            } else {
                let path = root.join(relative);
                let size = std::fs::metadata(&path)?.len();
                let mut source = std::fs::File::open(&path)?;
                builder.append_data(&mut file_header(size, 0o644), &name, &mut source)?;
            }
        }
        Ok(())
    })?;
    Ok((layer, files))
}

/// A static site build: `root` is served by the `aloft` binary at `server_binary`.
#[derive(Clone, Debug)]
pub struct StaticBuild {
    pub root: PathBuf,
    pub server_binary: PathBuf,
    pub cache_dir: PathBuf,
}

/// Builds the image and pushes it to `destination` (`host:port/repo:tag`). Returns the
/// manifest digest.
pub async fn build_and_push(
    build: &StaticBuild,
    push: &PushClient,
    destination: &str,
    mut output: impl FnMut(&str),
) -> Result<String, BuildError> {
    let (_, repo, tag) = split_reference(destination).map_err(|e| BuildError::Push {
        destination: destination.to_string(),
        reason: e.to_string(),
    })?;
    let scratch =
        tempfile::tempdir_in(std::env::temp_dir()).map_err(io("creating a temporary directory"))?;
    let (binary, cache, root) = (
        build.server_binary.clone(),
        build.cache_dir.clone(),
        build.root.clone(),
    );
    let site_path = scratch.path().join("site.tar.gz");
    let (server, (site, files)) = tokio::task::spawn_blocking(move || -> Result<_, BuildError> {
        Ok((
            server_layer(&binary, &cache)?,
            site_layer(&root, &site_path)?,
        ))
    })
    .await
    .map_err(|e| BuildError::Io(std::io::Error::other(e.to_string())))??;
    output(&format!(
        "--> layer 1/2: the static file server ({} bytes, {})",
        server.size, server.digest
    ));
    output(&format!(
        "--> layer 2/2: {files} file(s) from {} under {SITE_DIR} ({} bytes, {})",
        build.root.display(),
        site.size,
        site.digest
    ));
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": {
            "Cmd": ["/aloft", "static-server", SITE_DIR],
            "Env": [format!("PORT={DEFAULT_PORT}"), "PATH=/"],
            "ExposedPorts": { format!("{DEFAULT_PORT}/tcp"): {} },
            "WorkingDir": SITE_DIR,
        },
        "rootfs": { "type": "layers", "diff_ids": [server.diff_id, site.diff_id] },
        "history": [
            { "created_by": "aloft static builder: the static file server" },
            { "created_by": format!("aloft static builder: COPY {} {SITE_DIR}", build.root.display()) },
        ],
    });
    let config_bytes = Bytes::from(
        serde_json::to_vec(&config).map_err(|e| BuildError::Io(std::io::Error::other(e)))?,
    );
    let config_digest = sha256_digest(&config_bytes);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": { "mediaType": CONFIG_MEDIA_TYPE, "digest": config_digest, "size": config_bytes.len() },
        "layers": [
            { "mediaType": LAYER_MEDIA_TYPE, "digest": server.digest, "size": server.size },
            { "mediaType": LAYER_MEDIA_TYPE, "digest": site.digest, "size": site.size },
        ],
    });
    let manifest_bytes = Bytes::from(
        serde_json::to_vec(&manifest).map_err(|e| BuildError::Io(std::io::Error::other(e)))?,
    );
    let push_error = |e: crate::oci::PushError| BuildError::Push {
        destination: destination.to_string(),
        reason: e.to_string(),
    };
    push.push_blob_file(&repo, &server.digest, &server.path)
        .await
        .map_err(push_error)?;
    push.push_blob_file(&repo, &site.digest, &site.path)
        .await
        .map_err(push_error)?;
    push.push_blob(&repo, &config_digest, config_bytes)
        .await
        .map_err(push_error)?;
    push.push_manifest(&repo, &tag, MANIFEST_MEDIA_TYPE, manifest_bytes)
        .await
        .map_err(push_error)
}

// ---- the server ----

fn content_type(path: &Path) -> &'static str {
    match path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        Some("html" | "htm") => "text/html; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("js" | "mjs") => "text/javascript; charset=utf-8",
        Some("json" | "map") => "application/json",
        Some("txt") => "text/plain; charset=utf-8",
        Some("xml") => "application/xml",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("gif") => "image/gif",
        Some("webp") => "image/webp",
        Some("ico") => "image/x-icon",
        Some("woff") => "font/woff",
        Some("woff2") => "font/woff2",
        Some("wasm") => "application/wasm",
        Some("pdf") => "application/pdf",
        _ => "application/octet-stream",
    }
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The file a request path names under `root`: `None` for paths that leave it.
pub fn resolve(root: &Path, request_path: &str) -> Option<PathBuf> {
    let decoded = percent_decode(request_path.split('?').next().unwrap_or_default())?;
    let mut path = root.to_path_buf();
    for component in Path::new(decoded.trim_start_matches('/')).components() {
        match component {
            Component::Normal(part) => path.push(part),
            Component::CurDir => {}
            _ => return None,
        }
    }
    if path.is_dir() {
        path.push("index.html");
    }
    Some(path)
}

fn respond(root: &Path, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    let simple = |status: StatusCode, text: &str| {
        Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .body(Full::new(Bytes::from(format!("{text}\n"))))
            .unwrap_or_default()
    };
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return simple(StatusCode::METHOD_NOT_ALLOWED, "405 method not allowed");
    }
    let Some(path) = resolve(root, request.uri().path()) else {
        return simple(StatusCode::BAD_REQUEST, "400 bad path");
    };
    match std::fs::read(&path) {
        Ok(bytes) => {
            let length = bytes.len();
            let body = if request.method() == Method::HEAD {
                Bytes::new()
            } else {
                Bytes::from(bytes)
            };
            Response::builder()
                .header(header::CONTENT_TYPE, content_type(&path))
                .header(header::CONTENT_LENGTH, length)
                .body(Full::new(body))
                .unwrap_or_default()
        }
        Err(_) => simple(StatusCode::NOT_FOUND, "404 not found"),
    }
}

/// Serves `root` on `addr` until the process ends; one line per request on stdout.
pub async fn serve(root: PathBuf, addr: SocketAddr) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("static-server: serving {} on http://{addr}", root.display());
    let root = std::sync::Arc::new(root);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                eprintln!("static-server: accepting a connection: {err}");
                continue;
            }
        };
        let root = root.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let response = respond(&root, &request);
                println!(
                    "{} {} {}",
                    request.method(),
                    request.uri().path(),
                    response.status().as_u16()
                );
                async move { Ok::<_, Infallible>(response) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_paths_stay_inside_the_root() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("docs")).unwrap();
        assert_eq!(
            resolve(dir.path(), "/"),
            Some(dir.path().join("index.html"))
        );
        assert_eq!(
            resolve(dir.path(), "/docs"),
            Some(dir.path().join("docs/index.html"))
        );
        assert_eq!(
            resolve(dir.path(), "/a%20b.txt?x=1"),
            Some(dir.path().join("a b.txt"))
        );
        assert_eq!(resolve(dir.path(), "/../etc/passwd"), None);
        assert_eq!(resolve(dir.path(), "/%2e%2e/etc/passwd"), None);
    }

    #[test]
    fn layers_are_reproducible_and_skip_the_app_config() {
        let dir = tempfile::tempdir().unwrap();
        let site = dir.path().join("site");
        std::fs::create_dir_all(site.join("css")).unwrap();
        std::fs::write(site.join("index.html"), "<h1>hi</h1>").unwrap();
        std::fs::write(site.join("css/a.css"), "h1{}").unwrap();
        std::fs::write(site.join("fly.toml"), "app='x'").unwrap();
        let (first, files) = site_layer(&site, &dir.path().join("one.tar.gz")).unwrap();
        let (second, _) = site_layer(&site, &dir.path().join("two.tar.gz")).unwrap();
        assert_eq!(files, 2);
        assert_eq!(first.digest, second.digest);
        assert_eq!(first.diff_id, second.diff_id);
        let bytes = std::fs::read(&first.path).unwrap();
        assert_eq!(sha256_digest(&bytes), first.digest);
        let mut names = Vec::new();
        let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(&bytes[..]));
        for entry in archive.entries().unwrap() {
            names.push(entry.unwrap().path().unwrap().display().to_string());
        }
        assert!(
            names.contains(&"public/index.html".to_string()),
            "{names:?}"
        );
        assert!(names.contains(&"public/css/a.css".to_string()), "{names:?}");
        assert!(!names.iter().any(|n| n.contains("fly.toml")), "{names:?}");
        // Unpacks as the agent unpacks layers (owners and modes kept).
        let dest = dir.path().join("unpacked");
        let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(&bytes[..]));
        archive.set_preserve_permissions(true);
        archive.set_preserve_ownerships(true);
        archive.set_preserve_mtime(true);
        archive.unpack(&dest).unwrap();
        assert_eq!(
            std::fs::read_to_string(dest.join("public/css/a.css")).unwrap(),
            "h1{}"
        );
    }
}
