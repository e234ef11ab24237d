//! Names don't cross orgs, and image imports are not a way into the host's networks,
//! against a real platform (`aloft server` in a network namespace, the real CLI, curl):
//! hostnames under the platform's domain belong to the app they name; a deleted app's
//! images are gone for the next app of that name; `aloft deploy --image` refuses
//! registries at loopback addresses unless the operator allowed them.

mod common;

use std::io::Read;
use std::net::TcpListener;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{Platform, Run};
use serde_json::{Value, json};
use sha2::Digest as _;

fn json_of(run: &Run) -> Value {
    assert!(run.ok(), "{run}");
    serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {run}"))
}

/// A request to the API or registry with a bearer token: (status code, body).
fn request(
    platform: &Platform,
    token: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> (u16, String) {
    let url = format!("http://127.0.0.1:4280{path}");
    let auth = format!("Authorization: Bearer {token}");
    let mut args = vec![
        "-X",
        method,
        "-H",
        auth.as_str(),
        "-w",
        "\n%{http_code}",
        url.as_str(),
    ];
    if let Some(body) = body {
        args.extend(["-H", "Content-Type: application/json", "-d", body]);
    }
    let run = platform.curl(&args);
    assert!(run.ok(), "{run}");
    let (body, code) = run
        .stdout
        .rsplit_once('\n')
        .unwrap_or_else(|| panic!("no status line: {run}"));
    (code.trim().parse().expect("status code"), body.to_string())
}

fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(data)))
}

/// Pushes blobs and a manifest to `repo:tag` with curl; returns the blob digests.
fn push_image(platform: &Platform, token: &str, repo: &str, tag: &str) -> Vec<String> {
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let layer = format!("layer of {repo} pushed by its first owner").into_bytes();
    let mut digests = Vec::new();
    for blob in [&config[..], &layer[..]] {
        let digest = sha256(blob);
        let file = platform.root.path().join(digest.replace(':', "-"));
        std::fs::write(&file, blob).expect("blob file");
        let pushed = platform.curl(&[
            "-X",
            "POST",
            "-H",
            &format!("Authorization: Bearer {token}"),
            "-H",
            "Content-Type: application/octet-stream",
            "--data-binary",
            &format!("@{}", file.display()),
            "-w",
            "%{http_code}",
            &format!("http://127.0.0.1:4280/v2/{repo}/blobs/uploads/?digest={digest}"),
        ]);
        assert!(pushed.stdout.ends_with("201"), "{pushed}");
        digests.push(digest);
    }
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": digests[0], "size": config.len() },
        "layers": [{ "mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digests[1], "size": layer.len() }],
    })
    .to_string();
    let pushed = platform.curl(&[
        "-X",
        "PUT",
        "-H",
        &format!("Authorization: Bearer {token}"),
        "-H",
        "Content-Type: application/vnd.oci.image.manifest.v1+json",
        "--data-binary",
        &manifest,
        "-w",
        "%{http_code}",
        &format!("http://127.0.0.1:4280/v2/{repo}/manifests/{tag}"),
    ]);
    assert!(pushed.stdout.ends_with("201"), "{pushed}");
    digests.push(sha256(manifest.as_bytes()));
    digests
}

fn registry_error(body: &str) -> String {
    serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v["errors"][0]["code"].as_str().map(str::to_string))
        .unwrap_or_else(|| format!("no registry error in {body}"))
}

/// Org `acme-corp` and an org token for it.
fn second_org(platform: &Platform) -> String {
    let created = platform.aloft(&["orgs", "create", "Acme Corp"]);
    assert!(created.ok(), "{created}");
    let token = json_of(&platform.aloft(&["tokens", "create", "org", "-o", "acme-corp", "--json"]));
    token["token"].as_str().expect("token").to_string()
}

#[test]
fn platform_hostnames_belong_to_the_app_they_name() {
    require_platform!();
    let platform = Platform::start();
    let admin = platform.aloft(&["auth", "token"]).stdout.trim().to_string();
    let acme = second_org(&platform);
    assert!(platform.aloft(&["apps", "create", "foo"]).ok());
    let created = platform.aloft(&["apps", "create", "bar", "-o", "acme-corp"]);
    assert!(created.ok(), "{created}");

    // Another org's app claims app foo's name, or a name below it, or every app's.
    for (kind, hostname) in [
        ("acme", "foo.localhost"),
        ("acme", "FOO.localhost."),
        ("acme", "x.foo.localhost"),
        ("custom", "x.foo.localhost"),
        ("acme", "*.foo.localhost"),
        ("acme", "nosuchapp.localhost"),
    ] {
        let mut body = json!({ "hostname": hostname });
        if kind == "custom" {
            body["fullchain"] = "-----BEGIN CERTIFICATE-----".into();
            body["private_key"] = "-----BEGIN PRIVATE KEY-----".into();
        }
        let (status, answer) = request(
            &platform,
            &acme,
            "POST",
            &format!("/v1/apps/bar/certificates/{kind}"),
            Some(&body.to_string()),
        );
        assert_eq!(status, 422, "{hostname}: {answer}");
        assert!(
            answer.contains("only the app it names may use it"),
            "{hostname}: {answer}"
        );
    }
    let (_, listed) = request(&platform, &acme, "GET", "/v1/apps/bar/certificates", None);
    assert_eq!(
        serde_json::from_str::<Value>(&listed).expect("json")["total_count"],
        0,
        "nothing stored: {listed}"
    );

    // App foo may claim names below its own; bar its own and custom domains.
    for (token, app, hostname) in [
        (&admin, "foo", "x.foo.localhost"),
        (&acme, "bar", "www.bar.localhost"),
        (&acme, "bar", "shop.example.com"),
    ] {
        let (status, answer) = request(
            &platform,
            token,
            "POST",
            &format!("/v1/apps/{app}/certificates/acme"),
            Some(&json!({ "hostname": hostname }).to_string()),
        );
        assert_eq!(status, 201, "{app} {hostname}: {answer}");
    }
    // A hostname belongs to one app on the whole platform.
    let (status, answer) = request(
        &platform,
        &admin,
        "POST",
        "/v1/apps/foo/certificates/acme",
        Some(&json!({ "hostname": "shop.example.com" }).to_string()),
    );
    assert_eq!(status, 422, "{answer}");
}

#[test]
fn a_deleted_apps_images_are_gone_for_the_next_app_of_that_name() {
    require_platform!();
    let platform = Platform::start();
    let admin = platform.aloft(&["auth", "token"]).stdout.trim().to_string();
    let acme = second_org(&platform);
    assert!(platform.aloft(&["apps", "create", "x"]).ok());
    let digests = push_image(&platform, &admin, "x", "v1");
    let (status, _) = request(&platform, &admin, "GET", "/v2/x/manifests/v1", None);
    assert_eq!(status, 200);

    let destroyed = platform.aloft(&["apps", "destroy", "x", "--yes"]);
    assert!(destroyed.ok(), "{destroyed}");
    let created = platform.aloft(&["apps", "create", "x", "-o", "acme-corp"]);
    assert!(created.ok(), "{created}");

    let (status, body) = request(&platform, &acme, "GET", "/v2/x/manifests/v1", None);
    assert_eq!(
        (status, registry_error(&body).as_str()),
        (404, "MANIFEST_UNKNOWN"),
        "{body}"
    );
    let (status, body) = request(&platform, &acme, "GET", "/v2/x/tags/list", None);
    assert!(
        status == 404 || !body.contains("v1"),
        "no old tags: {status} {body}"
    );
    for digest in &digests[..2] {
        let (status, body) = request(
            &platform,
            &acme,
            "GET",
            &format!("/v2/x/blobs/{digest}"),
            None,
        );
        assert_eq!(
            (status, registry_error(&body).as_str()),
            (404, "BLOB_UNKNOWN"),
            "{digest}: {body}"
        );
    }
    let (status, body) = request(
        &platform,
        &acme,
        "GET",
        &format!("/v2/x/manifests/{}", digests[2]),
        None,
    );
    assert_eq!(status, 404, "the old manifest by digest: {body}");
}

/// A TCP listener inside the platform's namespace that counts connections.
fn counting_listener(platform: &Platform, port: u16) -> Arc<AtomicUsize> {
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    let netns = format!("/run/netns/{}", platform.netns);
    let (ready, is_ready) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let file = std::fs::File::open(&netns).expect("netns");
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind");
        let _ = ready.send(());
        for stream in listener.incoming().flatten() {
            seen.fetch_add(1, Ordering::SeqCst);
            let mut stream = stream;
            let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
            let _ = stream.read(&mut [0u8; 1024]);
        }
    });
    is_ready
        .recv_timeout(Duration::from_secs(10))
        .expect("listener started");
    count
}

#[test]
fn image_imports_refuse_loopback_registries_the_operator_did_not_allow() {
    require_platform!();
    let platform = Platform::start();
    let connections = counting_listener(&platform, 5000);
    assert!(platform.aloft(&["apps", "create", "imp"]).ok());
    let dir = platform.hello_app_dir("imp");
    let toml = std::fs::read_to_string(dir.join("fly.toml")).expect("fly.toml");
    std::fs::write(
        dir.join("fly.toml"),
        toml.replacen("app = \"hello\"", "app = \"imp\"", 1),
    )
    .expect("fly.toml");
    for image in [
        "127.0.0.1:5000/elsewhere/hello:v1",
        "localhost:5000/elsewhere/hello:v1",
    ] {
        let run = platform.aloft_in(Some(&dir), &["deploy", "--image", image]);
        let output = format!("{}{}", run.stdout, run.stderr);
        assert!(!run.ok(), "{run}");
        assert!(
            output.contains("refusing to connect to") && output.contains("127.0.0.1"),
            "{image}: {run}"
        );
    }
    assert_eq!(
        connections.load(Ordering::SeqCst),
        0,
        "nothing connected to the loopback registry"
    );

    // The operator allows it by name: now the import does connect (and fails there, as
    // the listener is no registry).
    let mut platform = platform;
    platform.restart_server_with(&["--allow-private-registry", "127.0.0.1:5000"]);
    let run = platform.aloft_in(
        Some(&dir),
        &["deploy", "--image", "127.0.0.1:5000/elsewhere/hello:v1"],
    );
    assert!(!run.ok(), "{run}");
    assert!(
        !format!("{}{}", run.stdout, run.stderr).contains("refusing to connect"),
        "{run}"
    );
    assert!(
        connections.load(Ordering::SeqCst) > 0,
        "an allowed registry is reached: {run}"
    );
}
