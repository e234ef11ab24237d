//! The agent's pull client and pull-through from an upstream registry.

mod common;

use aloft_registry::{OCI_INDEX, OCI_MANIFEST, PullClient, RegistryError, UpstreamConfig};
use common::{Http, TestRegistry, sha256};
use http::StatusCode;
use std::time::Duration;

/// Pushes an amd64 and an arm64 image and an index over them; returns
/// (amd64 manifest digest, amd64 layer digests, index digest).
async fn push_multi_arch(
    h: &Http,
    repo: &str,
    tag: &str,
    token: &str,
) -> (String, Vec<String>, String) {
    let (amd, amd_body, _, amd_layers) = h
        .push_image(
            repo,
            &format!("{tag}-amd64"),
            token,
            &[b"amd64 layer 1", b"amd64 layer 2"],
        )
        .await;
    let (arm, arm_body, _, _) = h
        .push_image(repo, &format!("{tag}-arm64"), token, &[b"arm64 layer"])
        .await;
    let index = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{arm}","size":{},"platform":{{"architecture":"arm64","os":"linux","variant":"v8"}}}},{{"mediaType":"{OCI_MANIFEST}","digest":"{amd}","size":{},"platform":{{"architecture":"amd64","os":"linux"}}}}]}}"#,
        arm_body.len(),
        amd_body.len()
    );
    let idx = h.push_manifest(repo, tag, token, OCI_INDEX, &index).await;
    (amd, amd_layers, idx)
}

#[tokio::test]
async fn pull_client_resolves_index_and_verifies_blobs() {
    let r = TestRegistry::start().await;
    let h = Http::new(&r.url());
    let (amd, layers, idx) = push_multi_arch(&h, "app-a", "v1", "tok-a").await;

    let c = PullClient::new(&r.url(), Some("reader-a".into()));
    let m = c
        .manifest(&format!("{}/app-a:v1", r.addr))
        .await
        .expect("resolve");
    assert_eq!(m.digest, amd);
    assert_eq!(m.index_digest.as_deref(), Some(idx.as_str()));
    assert_eq!(m.media_type, OCI_MANIFEST);
    assert_eq!(m.repository, "app-a");
    assert_eq!(
        m.layers
            .iter()
            .map(|l| l.digest.clone())
            .collect::<Vec<_>>(),
        layers
    );
    assert_eq!(sha256(&m.raw), amd);

    // By digest, directly.
    let m2 = c
        .manifest(&format!("app-a@{amd}"))
        .await
        .expect("by digest");
    assert_eq!(m2.digest, amd);
    assert!(m2.index_digest.is_none());

    // Blobs.
    let dir = tempfile::tempdir().expect("tempdir");
    let dest = dir.path().join("layers").join("l0");
    c.blob_to_file("app-a", &layers[0], &dest)
        .await
        .expect("download");
    assert_eq!(std::fs::read(&dest).expect("read"), b"amd64 layer 1");
    let bytes = c
        .blob_bytes("app-a", &m.config.digest)
        .await
        .expect("config");
    assert_eq!(sha256(&bytes), m.config.digest);
    assert_eq!(
        std::fs::read_dir(dest.parent().expect("parent"))
            .expect("ls")
            .count(),
        1,
        "no temporary files left"
    );

    // Unknown things and denied access.
    let err = c.manifest("app-a:nope").await.expect_err("unknown tag");
    assert!(matches!(err, RegistryError::ManifestUnknown(_)), "{err:?}");
    let err = c
        .blob_bytes("app-a", &sha256(b"nothing"))
        .await
        .expect_err("unknown blob");
    assert!(matches!(err, RegistryError::BlobUnknown(_)), "{err:?}");
    let err = c.manifest("org/app-b:v1").await.expect_err("denied");
    assert!(matches!(err, RegistryError::Denied), "{err:?}");
    let anon = PullClient::new(&r.url(), None);
    let err = anon.manifest("app-a:v1").await.expect_err("anonymous");
    assert!(matches!(err, RegistryError::Unauthorized), "{err:?}");
    let basic = PullClient::with_basic_auth(&r.url(), "agent", "reader-a");
    basic.manifest("app-a:v1").await.expect("basic auth");

    // Corrupt the stored layer on disk: the client refuses it and leaves no file.
    let hex = &layers[1][7..];
    let path = r.root().join("blobs/sha256").join(&hex[..2]).join(hex);
    std::fs::write(&path, b"amd64 layer X").expect("tamper");
    let bad_dest = dir.path().join("layers").join("l1");
    let err = c
        .blob_to_file("app-a", &layers[1], &bad_dest)
        .await
        .expect_err("digest mismatch");
    assert!(
        matches!(err, RegistryError::DigestMismatch { .. }),
        "{err:?}"
    );
    assert!(!bad_dest.exists());
    assert_eq!(
        std::fs::read_dir(dir.path().join("layers"))
            .expect("ls")
            .count(),
        1
    );
    let err = c
        .blob_bytes("app-a", &layers[1])
        .await
        .expect_err("digest mismatch");
    assert!(
        matches!(err, RegistryError::DigestMismatch { .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn index_without_amd64_is_an_error() {
    let r = TestRegistry::start().await;
    let h = Http::new(&r.url());
    let (arm, arm_body, _, _) = h.push_image("app-a", "arm", "tok-a", &[b"arm"]).await;
    let index = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{arm}","size":{},"platform":{{"architecture":"arm64","os":"linux"}}}}]}}"#,
        arm_body.len()
    );
    h.push_manifest("app-a", "armonly", "tok-a", OCI_INDEX, &index)
        .await;
    let c = PullClient::new(&r.url(), Some("tok-a".into()));
    let err = c.manifest("app-a:armonly").await.expect_err("no amd64");
    assert!(err.to_string().contains("linux/amd64"), "{err}");
}

#[tokio::test]
async fn pull_through_from_upstream() {
    let upstream = TestRegistry::start().await;
    let uh = Http::new(&upstream.url());
    let (amd, layers, idx) = push_multi_arch(&uh, "library/busy", "1.0", "admin").await;

    let mut cfg = UpstreamConfig::new(upstream.url(), "hub");
    cfg.password = Some("admin".into());
    cfg.tag_ttl = Duration::from_secs(3600);
    let local = TestRegistry::start_with(Some(cfg)).await;
    let lh = Http::new(&local.url());

    // Nothing local yet; the pull resolves through the upstream.
    let c = PullClient::new(&local.url(), Some("admin".into()));
    let m = c
        .manifest("hub/library/busy:1.0")
        .await
        .expect("pull-through");
    assert_eq!(m.digest, amd);
    assert_eq!(m.index_digest.as_deref(), Some(idx.as_str()));
    let dir = tempfile::tempdir().expect("tempdir");
    for (i, l) in m.layers.iter().enumerate() {
        c.blob_to_file(
            "hub/library/busy",
            &l.digest,
            &dir.path().join(format!("l{i}")),
        )
        .await
        .expect("blob through upstream");
    }
    assert_eq!(m.layers[0].digest, layers[0]);
    // Served from the local store, verified, as if pushed.
    let head = lh
        .head(
            &format!("/v2/hub/library/busy/blobs/{}", layers[1]),
            Some("admin"),
        )
        .await;
    assert_eq!(head.status, StatusCode::OK);
    assert_eq!(
        head.header("docker-content-digest"),
        Some(layers[1].as_str())
    );
    // Not proxied outside the prefix.
    let resp = lh
        .get("/v2/library/busy/manifests/1.0", Some("admin"))
        .await;
    assert_eq!(resp.status, StatusCode::NOT_FOUND);
    // Unknown upstream tag: 404 MANIFEST_UNKNOWN.
    let resp = lh
        .get("/v2/hub/library/busy/manifests/9.9", Some("admin"))
        .await;
    assert_eq!(resp.status, StatusCode::NOT_FOUND);
    assert_eq!(resp.error_code(), "MANIFEST_UNKNOWN");
    // Access to proxied repositories is still authorized locally.
    let resp = lh
        .get("/v2/hub/library/busy/manifests/1.0", Some("tok-a"))
        .await;
    assert_eq!(resp.status, StatusCode::FORBIDDEN);

    // The upstream goes away: everything fetched is still served.
    upstream.stop();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let again = c.manifest("hub/library/busy:1.0").await.expect("cached");
    assert_eq!(again.digest, amd);
    let bytes = c
        .blob_bytes("hub/library/busy", &layers[0])
        .await
        .expect("cached blob");
    assert_eq!(&bytes[..], b"amd64 layer 1");
    // Something never fetched is not.
    let resp = lh
        .get("/v2/hub/library/busy/manifests/1.0-arm64", Some("admin"))
        .await;
    assert!(resp.status.is_server_error() || resp.status == StatusCode::NOT_FOUND);
    assert_eq!(
        local
            .registry
            .list_tags("hub/library/busy")
            .expect("tags")
            .len(),
        1
    );
}

#[tokio::test]
async fn pull_through_refreshes_tags_after_ttl() {
    let upstream = TestRegistry::start().await;
    let uh = Http::new(&upstream.url());
    let (m1, _, _, _) = uh
        .push_image("library/app", "latest", "admin", &[b"one"])
        .await;
    let mut cfg = UpstreamConfig::new(upstream.url(), "");
    cfg.password = Some("admin".into());
    cfg.tag_ttl = Duration::ZERO;
    let local = TestRegistry::start_with(Some(cfg)).await;
    let c = PullClient::new(&local.url(), Some("admin".into()));
    assert_eq!(
        c.manifest("library/app:latest")
            .await
            .expect("first")
            .digest,
        m1
    );
    let (m2, _, _, _) = uh
        .push_image("library/app", "latest", "admin", &[b"two"])
        .await;
    assert_ne!(m1, m2);
    assert_eq!(
        c.manifest("library/app:latest")
            .await
            .expect("second")
            .digest,
        m2
    );
    // Stale tag is served when the upstream is down.
    upstream.stop();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        c.manifest("library/app:latest")
            .await
            .expect("stale")
            .digest,
        m2
    );
}

#[test]
fn non_http_upstream_is_rejected_clearly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let err = aloft_registry::Registry::open(
        aloft_registry::RegistryConfig {
            root: dir.path().to_path_buf(),
            upstream: Some(UpstreamConfig::new("ftp://example", "hub")),
        },
        std::sync::Arc::new(aloft_registry::AllowAll),
    )
    .err()
    .expect("rejected");
    assert!(matches!(err, RegistryError::Config(_)), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_pulls_fetch_each_blob_from_upstream_once() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tower::ServiceExt;

    let upstream = TestRegistry::start().await;
    let uh = Http::new(&upstream.url());
    let big = vec![7u8; 4 * 1024 * 1024];
    let (_, _, _, layers) = uh.push_image("library/big", "1", "admin", &[&big]).await;

    // A counting front for the upstream.
    let blob_gets = Arc::new(AtomicUsize::new(0));
    let backend = upstream.registry.router();
    let counter = blob_gets.clone();
    let front =
        axum::Router::new().fallback(axum::routing::any(move |req: axum::extract::Request| {
            let (backend, counter) = (backend.clone(), counter.clone());
            async move {
                if req.method() == http::Method::GET && req.uri().path().contains("/blobs/") {
                    counter.fetch_add(1, Ordering::SeqCst);
                }
                backend.oneshot(req).await.unwrap_or_else(|e| match e {})
            }
        }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let front_addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, front).await;
    });

    let mut cfg = UpstreamConfig::new(format!("http://{front_addr}"), "hub");
    cfg.password = Some("admin".into());
    let local = TestRegistry::start_with(Some(cfg)).await;
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let url = local.url();
        let digest = layers[0].clone();
        tasks.push(tokio::spawn(async move {
            let c = PullClient::new(&url, Some("admin".into()));
            c.blob_bytes("hub/library/big", &digest)
                .await
                .map(|b| b.len())
        }));
    }
    for t in tasks {
        assert_eq!(t.await.expect("join").expect("pull"), big.len());
    }
    assert_eq!(blob_gets.load(Ordering::SeqCst), 1, "one upstream download");
}
