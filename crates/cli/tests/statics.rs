//! `[[statics]]` end to end on a real single-host platform (see tests/common): the proxy
//! serves files of the app's image under `url_prefix`, with validators and conditional
//! requests, and never leaves `guest_path` (no symlinks, no `..`).

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Platform, Run};

const STYLE: &str = "body { color: rebeccapurple; }\n";
const INDEX: &str = "<h1>static index</h1>\n";
const SECRET: &str = "the-secret-outside-guest-path\n";

/// An app whose image holds the example binary, `/secret.txt`, and `/app/public` with
/// `style.css`, `index.html`, `docs/index.html` and two symlinks that point out of it.
fn statics_app(platform: &Platform, app: &str, statics_toml: &str) -> PathBuf {
    let dir = platform.root.path().join(app);
    let public = dir.join("public");
    std::fs::create_dir_all(public.join("docs")).unwrap();
    std::fs::copy(common::hello_binary(), dir.join("hello")).unwrap();
    std::fs::write(dir.join("secret.txt"), SECRET).unwrap();
    std::fs::write(public.join("style.css"), STYLE).unwrap();
    std::fs::write(public.join("index.html"), INDEX).unwrap();
    std::fs::write(public.join("docs/index.html"), "docs\n").unwrap();
    std::os::unix::fs::symlink("/secret.txt", public.join("leak")).unwrap();
    std::os::unix::fs::symlink("../../secret.txt", public.join("up")).unwrap();
    std::os::unix::fs::symlink("/app", public.join("escape")).unwrap();
    std::fs::write(
        dir.join("Dockerfile"),
        "FROM scratch\nCOPY hello /hello\nCOPY secret.txt /secret.txt\nCOPY public /app/public\nCMD [\"/hello\"]\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("fly.toml"),
        format!(
            "app = \"{app}\"\nprimary_region = \"local\"\n\n[env]\n  PORT = \"8080\"\n\n\
             [http_service]\n  internal_port = 8080\n  auto_stop_machines = \"off\"\n  \
             auto_start_machines = false\n  min_machines_running = 0\n\n{statics_toml}"
        ),
    )
    .unwrap();
    dir
}

fn must(run: Run, what: &str, platform: &Platform) -> Run {
    assert!(
        run.ok(),
        "{what} failed: {run}\n--- server log (tail)\n{}",
        tail(&platform.server_log(), 60)
    );
    run
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A response through the proxy: status, lower-case headers and body.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One request through the proxy with curl (`--path-as-is`: the path goes out as written).
fn request(platform: &Platform, host: &str, path: &str, extra: &[&str]) -> Answer {
    let header_file = platform.root.path().join("headers.txt");
    let mut args = vec!["--path-as-is", "-D", header_file.to_str().unwrap(), "-H"];
    let host_header = format!("Host: {host}");
    args.push(&host_header);
    args.extend_from_slice(extra);
    let url = format!("http://127.0.0.1:8080{path}");
    args.push(&url);
    let run = platform.curl(&args);
    let head = std::fs::read_to_string(&header_file).unwrap_or_default();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Answer {
        status,
        headers,
        body: run.stdout,
    }
}

fn wait_for(what: &str, limit: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if condition() {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("timed out waiting for {what}");
}

fn deploy(platform: &Platform, app: &str, dir: &Path) -> Run {
    must(
        platform.aloft(&["apps", "create", app]),
        "apps create",
        platform,
    );
    platform.aloft_in(Some(dir), &["deploy"])
}

#[test]
fn statics_are_served_from_the_image_with_validators_and_never_leave_guest_path() {
    require_platform!();
    let platform = Platform::start();
    let dir = statics_app(
        &platform,
        "assets",
        "[[statics]]\n  guest_path = \"/app/public\"\n  url_prefix = \"/static\"\n  index_document = \"index.html\"\n",
    );
    must(deploy(&platform, "assets", &dir), "deploy", &platform);
    let host = "assets.localhost";
    wait_for("the app to answer", Duration::from_secs(30), || {
        request(&platform, host, "/", &[]).status == 200
    });

    // A file of the image, with validators and a type from its extension.
    let style = request(&platform, host, "/static/style.css", &[]);
    assert_eq!(
        (style.status, style.body.as_str()),
        (200, STYLE),
        "{}",
        tail(&platform.server_log(), 40)
    );
    assert_eq!(
        style.header("content-type"),
        Some("text/css; charset=utf-8")
    );
    assert_eq!(
        style.header("content-length"),
        Some(STYLE.len().to_string().as_str())
    );
    let etag = style.header("etag").expect("an ETag").to_string();
    assert!(etag.starts_with('"') && etag.ends_with('"'), "{etag}");
    let modified = style
        .header("last-modified")
        .expect("a Last-Modified")
        .to_string();
    assert!(modified.ends_with(" GMT"), "{modified}");

    // Conditional requests.
    let cached = request(
        &platform,
        host,
        "/static/style.css",
        &["-H", &format!("If-None-Match: {etag}")],
    );
    assert_eq!((cached.status, cached.body.as_str()), (304, ""));
    assert_eq!(cached.header("etag"), Some(etag.as_str()));
    let other_tag = request(
        &platform,
        host,
        "/static/style.css",
        &["-H", "If-None-Match: \"something-else\""],
    );
    assert_eq!(other_tag.status, 200);
    let since = request(
        &platform,
        host,
        "/static/style.css",
        &["-H", &format!("If-Modified-Since: {modified}")],
    );
    assert_eq!(since.status, 304);
    let long_ago = request(
        &platform,
        host,
        "/static/style.css",
        &["-H", "If-Modified-Since: Thu, 01 Jan 1970 00:00:01 GMT"],
    );
    assert_eq!(long_ago.status, 200);

    // HEAD: the same head, no body.
    let head = request(&platform, host, "/static/style.css", &["-I"]);
    assert_eq!(head.status, 200);
    assert_eq!(head.header("etag"), Some(etag.as_str()));
    assert_eq!(
        head.header("content-length"),
        Some(STYLE.len().to_string().as_str())
    );

    // Directories answer with their index document.
    let index = request(&platform, host, "/static/", &[]);
    assert_eq!((index.status, index.body.as_str()), (200, INDEX));
    assert_eq!(
        index.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    let docs = request(&platform, host, "/static/docs/", &[]);
    assert_eq!((docs.status, docs.body.as_str()), (200, "docs\n"));

    // Symlinks are not followed, wherever they point.
    for path in [
        "/static/leak",
        "/static/up",
        "/static/escape/public/style.css",
    ] {
        let answer = request(&platform, host, path, &[]);
        assert_eq!(answer.status, 404, "{path}: {}", answer.body);
        assert!(!answer.body.contains("the-secret"), "{path} leaked");
    }
    // `..` (plain or encoded) is refused, never resolved.
    for path in [
        "/static/../secret.txt",
        "/static/%2e%2e/%2e%2e/secret.txt",
        "/static/docs/..%2f..%2f..%2fsecret.txt",
        "/static/style.css%00",
    ] {
        let answer = request(&platform, host, path, &[]);
        assert!(
            answer.status == 400 || answer.status == 404,
            "{path}: {} {}",
            answer.status,
            answer.body
        );
        assert!(!answer.body.contains("the-secret"), "{path} leaked");
    }
    // A missing file under the prefix is the static server's 404, not the app's answer.
    let missing = request(&platform, host, "/static/nope.css", &[]);
    assert_eq!(missing.status, 404);
    // Outside the prefix, the app answers (the example app echoes its env as JSON).
    let app = request(&platform, host, "/staticky", &[]);
    assert_eq!(app.status, 200);
    assert!(app.body.contains("\"env\""), "{}", app.body);
}

#[test]
fn statics_from_a_tigris_bucket_are_refused_at_deploy_naming_the_key() {
    require_platform!();
    let platform = Platform::start();
    let dir = statics_app(
        &platform,
        "bucketed",
        "[[statics]]\n  guest_path = \"/app/public\"\n  url_prefix = \"/static\"\n  tigris_bucket = \"my-bucket\"\n",
    );
    let run = deploy(&platform, "bucketed", &dir);
    assert!(!run.ok(), "a deploy with tigris_bucket succeeded: {run}");
    let said = format!("{}{}", run.stdout, run.stderr);
    assert!(
        said.contains("statics[0].tigris_bucket") && said.contains("not supported"),
        "{run}"
    );
}
