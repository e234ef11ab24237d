//! A hostile image pushed to the platform's registry cannot touch the host when a machine
//! is created from it.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::Platform;
use serde_json::Value;
use sha2::{Digest, Sha256};

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

fn run(command: &mut Command) -> std::process::Output {
    let output = command.output().expect("running a helper program");
    assert!(
        output.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// A gzip layer: `escape -> host`, then `escape/.wh.victim`, `escape/.wh..wh..opq` and
/// `escape/planted` (GNU tar's --transform puts them beneath the symlink's name).
fn hostile_layer(work: &Path, host: &Path) -> Vec<u8> {
    let staging = work.join("staging");
    std::fs::create_dir_all(staging.join("escapex")).unwrap();
    std::os::unix::fs::symlink(host, staging.join("escape")).unwrap();
    for name in [".wh.victim", ".wh..wh..opq", "planted"] {
        std::fs::write(staging.join("escapex").join(name), b"").unwrap();
    }
    std::fs::create_dir_all(staging.join("bin")).unwrap();
    let layer = work.join("layer.tar");
    run(Command::new("tar")
        .arg("-cf")
        .arg(&layer)
        .arg("-C")
        .arg(&staging)
        .args([
            "--no-recursion",
            "--transform",
            "flags=r;s,^escapex,escape,",
        ])
        .args([
            "escape",
            "escapex/.wh.victim",
            "escapex/.wh..wh..opq",
            "escapex/planted",
        ]));
    run(Command::new("gzip").args(["-n", "-f"]).arg(&layer));
    std::fs::read(work.join("layer.tar.gz")).unwrap()
}

/// An OCI image layout holding one image whose only layer is `layer`.
fn oci_layout(dir: &Path, layer: &[u8]) {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |bytes: &[u8]| {
        let digest = sha256(bytes);
        std::fs::write(blobs.join(digest.trim_start_matches("sha256:")), bytes).unwrap();
        (digest, bytes.len())
    };
    let diff_id = sha256(&{
        let mut tar = Vec::new();
        use std::io::Read;
        let mut gunzip = Command::new("gzip")
            .args(["-dc"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = gunzip.stdin.take().unwrap();
        let input = layer.to_vec();
        let writer = std::thread::spawn(move || {
            use std::io::Write;
            stdin.write_all(&input).unwrap();
        });
        gunzip.stdout.take().unwrap().read_to_end(&mut tar).unwrap();
        writer.join().unwrap();
        gunzip.wait().unwrap();
        tar
    });
    let (layer_digest, layer_size) = put(layer);
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": { "Cmd": ["/hello"] },
        "rootfs": { "type": "layers", "diff_ids": [diff_id] }
    })
    .to_string();
    let (config_digest, config_size) = put(config.as_bytes());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_size },
        "layers": [{ "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_digest, "size": layer_size }]
    })
    .to_string();
    let (manifest_digest, manifest_size) = put(manifest.as_bytes());
    std::fs::write(
        dir.join("index.json"),
        serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_digest,
                "size": manifest_size,
                "annotations": { "org.opencontainers.image.ref.name": "latest" }
            }]
        })
        .to_string(),
    )
    .unwrap();
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
}

fn snapshot(dir: &Path) -> Vec<(String, String, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let meta = std::fs::symlink_metadata(entry.path()).unwrap();
        let content = if meta.is_file() {
            std::fs::read(entry.path()).unwrap()
        } else {
            Vec::new()
        };
        out.push((
            entry.file_name().to_string_lossy().into_owned(),
            format!("{:?}", meta.file_type()),
            content,
        ));
    }
    let xattrs = Command::new("python3")
        .args([
            "-c",
            "import os,sys; print(sorted(os.listxattr(sys.argv[1], follow_symlinks=False)))",
        ])
        .arg(dir)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    out.push((".xattrs".into(), xattrs, Vec::new()));
    out.sort();
    out
}

#[test]
fn a_layer_with_whiteouts_beneath_a_symlink_leaves_the_host_alone() {
    if let Some(reason) = common::missing_prerequisite() {
        aloft_testkit::skip(format!("platform test: {reason}"));
        return;
    }
    if Command::new("skopeo").arg("--version").output().is_err() {
        aloft_testkit::skip("platform test: needs skopeo (apt-get install skopeo)");
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let host = work.path().join("host");
    std::fs::create_dir_all(host.join("dir")).unwrap();
    std::fs::write(host.join("victim"), b"the control database").unwrap();
    let before = snapshot(&host);
    let layout = work.path().join("layout");
    oci_layout(&layout, &hostile_layer(work.path(), &host));

    let platform = Platform::start_with(&["--driver", "container"]);
    assert!(platform.aloft(&["apps", "create", "evil"]).ok());
    let token = platform.aloft(&["auth", "token"]).stdout.trim().to_string();
    let mut push = platform.in_netns(Path::new("skopeo"));
    push.args(["copy", "--dest-tls-verify=false", "--dest-creds"])
        .arg(format!("x:{token}"))
        .arg(format!("oci:{}:latest", layout.display()))
        .arg("docker://127.0.0.1:4280/evil:latest");
    run(&mut push);

    let body = serde_json::json!({
        "config": { "image": "127.0.0.1:4280/evil:latest", "restart": { "policy": "no" } },
        "region": "local"
    })
    .to_string();
    let create = platform.curl(&[
        "--max-time",
        "120",
        "-X",
        "POST",
        "-H",
        &format!("Authorization: Bearer {token}"),
        "-H",
        "Content-Type: application/json",
        "-d",
        &body,
        "http://127.0.0.1:4280/v1/apps/evil/machines",
    ]);
    let id = serde_json::from_str::<Value>(&create.stdout)
        .ok()
        .and_then(|v| v["id"].as_str().map(str::to_string));
    assert_eq!(
        snapshot(&host),
        before,
        "the host directory changed: {create}"
    );
    assert!(!host.join("planted").exists());
    // The create fails, or the machine does: either way it says why.
    let reason = "symlink";
    match id {
        None => assert!(create.stdout.contains(reason), "{create}"),
        Some(id) => {
            let deadline = Instant::now() + Duration::from_secs(90);
            loop {
                let status = platform.aloft(&["machine", "status", &id, "-a", "evil"]);
                if status.stdout.contains(reason) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "the machine never said why it failed: {status}\n{}",
                    platform.server_log()
                );
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }
}
