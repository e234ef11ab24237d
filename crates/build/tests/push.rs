//! The push client, image copies and the static builder against real registries served
//! over 127.0.0.1: refused pushes name their step and leave nothing referenced.

use std::sync::Arc;

use aloft_build::oci::{PushClient, PushError, copy_image, sha256_digest};
use aloft_build::static_site::{StaticBuild, build_and_push};
use aloft_registry::{AllowAll, PullClient, Registry, RegistryConfig};
use bytes::Bytes;

struct Served {
    host: String,
    registry: Arc<Registry>,
    _dir: tempfile::TempDir,
}

async fn serve() -> Served {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::open(
        RegistryConfig {
            root: dir.path().join("registry"),
            upstream: None,
        },
        Arc::new(AllowAll),
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let host = listener.local_addr().unwrap().to_string();
    let router = registry.router();
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    Served {
        host,
        registry,
        _dir: dir,
    }
}

fn config_blob() -> Bytes {
    Bytes::from_static(br#"{"architecture":"amd64","os":"linux","config":{"Cmd":["/x"]},"rootfs":{"type":"layers","diff_ids":[]}}"#)
}

fn manifest(config: &Bytes, media_type: &str) -> Bytes {
    Bytes::from(
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": media_type,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha256_digest(config), "size": config.len()},
            "layers": [],
        }))
        .unwrap(),
    )
}

#[tokio::test]
async fn refused_pushes_name_the_step_and_leave_nothing_referenced() {
    let served = serve().await;
    let push = PushClient::new(&served.host, None).unwrap();

    // A blob whose bytes do not match the digest given: refused, nothing stored.
    let claimed = sha256_digest(b"what the client says");
    let err = push
        .push_blob("app", &claimed, Bytes::from_static(b"what it sends"))
        .await
        .unwrap_err();
    match &err {
        PushError::Refused {
            step,
            status,
            message,
        } => {
            assert!(step.contains("the upload of blob"), "{err}");
            assert_eq!(*status, 400, "{err}");
            assert!(message.contains("DIGEST_INVALID"), "{err}");
        }
        other => panic!("expected a refusal, got {other}"),
    }
    assert!(!push.has_blob("app", &claimed).await.unwrap());

    // An artifact that is not a container image cannot be copied in to be deployed.
    let config = config_blob();
    push.push_blob("app", &sha256_digest(&config), config.clone())
        .await
        .unwrap();
    push.push_manifest(
        "app",
        "chart",
        "application/x-unknown",
        manifest(&config, "application/x-unknown"),
    )
    .await
    .unwrap();
    let target = serve().await;
    let pull = PullClient::new(&format!("http://{}", served.host), None);
    let scratch = tempfile::tempdir().unwrap();
    let destination = PushClient::new(&target.host, None).unwrap();
    let err = copy_image(
        &pull,
        "app:chart",
        &destination,
        &format!("{}/app:v1", target.host),
        scratch.path(),
        |_| {},
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("media type \"application/x-unknown\", which is not a container image"),
        "{err}"
    );
    assert_eq!(
        target.registry.resolve_tag("app", "v1").unwrap(),
        None,
        "nothing referenced in the destination"
    );

    // A manifest naming a blob that was never pushed: refused, no tag.
    let missing = Bytes::from_static(b"{\"never\":\"pushed\"}");
    let err = push
        .push_manifest(
            "app",
            "v2",
            "application/vnd.oci.image.manifest.v1+json",
            manifest(&missing, "application/vnd.oci.image.manifest.v1+json"),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, PushError::Refused { message, .. } if message.contains("BLOB_UNKNOWN")),
        "{err}"
    );
    assert_eq!(served.registry.resolve_tag("app", "v2").unwrap(), None);

    // The same manifest with its blob present is accepted.
    let digest = push
        .push_manifest(
            "app",
            "v3",
            "application/vnd.oci.image.manifest.v1+json",
            manifest(&config, "application/vnd.oci.image.manifest.v1+json"),
        )
        .await
        .unwrap();
    assert_eq!(
        served.registry.resolve_tag("app", "v3").unwrap(),
        Some(digest)
    );
}

#[tokio::test]
async fn an_unreachable_registry_is_named() {
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let push = PushClient::new(&closed.to_string(), None).unwrap();
    let err = push
        .has_blob("app", &sha256_digest(b"x"))
        .await
        .unwrap_err();
    assert!(matches!(err, PushError::Unreachable { .. }), "{err}");
    assert!(err.to_string().contains(&closed.to_string()), "{err}");
}

#[tokio::test]
async fn static_images_build_push_and_copy_between_registries() {
    let source = serve().await;
    let target = serve().await;
    let site = tempfile::tempdir().unwrap();
    std::fs::write(site.path().join("index.html"), "<h1>static</h1>").unwrap();
    std::fs::write(site.path().join("fly.toml"), "app = 'x'").unwrap();
    let cache = tempfile::tempdir().unwrap();
    // Any executable stands in for the server binary here; the image is only pulled.
    let build = StaticBuild {
        root: site.path().into(),
        server_binary: "/bin/true".into(),
        cache_dir: cache.path().into(),
    };
    let push = PushClient::new(&source.host, None).unwrap();
    let mut lines = Vec::new();
    let digest = build_and_push(&build, &push, &format!("{}/site:v1", source.host), |l| {
        lines.push(l.to_string())
    })
    .await
    .unwrap();
    assert!(lines.iter().any(|l| l.contains("1 file(s)")), "{lines:?}");
    // A second build of the same files is the same image.
    let again = build_and_push(&build, &push, &format!("{}/site:v2", source.host), |_| {})
        .await
        .unwrap();
    assert_eq!(digest, again);

    let pull = PullClient::new(&format!("http://{}", source.host), None);
    let resolved = pull.manifest("site:v1").await.unwrap();
    assert_eq!(resolved.layers.len(), 2);
    let config: serde_json::Value = serde_json::from_slice(
        &pull
            .blob_bytes("site", &resolved.config.digest)
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        config["config"]["Cmd"],
        serde_json::json!(["/aloft", "static-server", "/public"])
    );

    // Copy into the second registry under another name; every blob verified on the way.
    let destination = PushClient::new(&target.host, None).unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let copied = copy_image(
        &pull,
        "site:v1",
        &destination,
        &format!("{}/other:imported", target.host),
        scratch.path(),
        |_| {},
    )
    .await
    .unwrap();
    assert_eq!(copied.digest, digest);
    assert_eq!(copied.blobs_copied, 3, "config and two layers");
    let copied_again = copy_image(
        &pull,
        "site:v1",
        &destination,
        &format!("{}/other:again", target.host),
        scratch.path(),
        |_| {},
    )
    .await
    .unwrap();
    assert_eq!(
        copied_again.blobs_copied, 0,
        "blobs already there are not sent again"
    );
    assert_eq!(
        target.registry.resolve_tag("other", "imported").unwrap(),
        Some(digest)
    );

    let err = copy_image(
        &pull,
        "site:nope",
        &destination,
        &format!("{}/other:x", target.host),
        scratch.path(),
        |_| {},
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("reading the source image site:nope"),
        "{err}"
    );
}
