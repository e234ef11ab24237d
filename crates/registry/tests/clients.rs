//! Real clients against the registry: buildah builds and pushes, skopeo copies in and
//! out (OCI and Docker schema 2, single images and indexes), lists tags and deletes.
//! Each test prints a message and returns if the binary is missing.

mod common;

use std::path::Path;
use std::process::Output;

use aloft_registry::{DOCKER_MANIFEST, OCI_INDEX, PullClient};
use common::{Http, TestRegistry};
use http::StatusCode;

fn b64(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(s)
}

fn have(bin: &str) -> bool {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
        .unwrap_or(false);
    if !found {
        aloft_testkit::skip(format!(
            "`{bin}` is not installed (apt-get install -y {bin})"
        ));
    }
    found
}

async fn run(bin: &str, args: &[&str]) -> Output {
    tokio::process::Command::new(bin)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .unwrap_or_else(|e| panic!("running {bin}: {e}"))
}

async fn run_ok(bin: &str, args: &[&str]) -> String {
    let out = run(bin, args).await;
    assert!(
        out.status.success(),
        "{bin} {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

struct Buildah {
    root: String,
    runroot: String,
    env: Vec<(String, String)>,
}

impl Buildah {
    fn new(dir: &Path) -> Buildah {
        Buildah {
            root: dir.join("root").display().to_string(),
            runroot: dir.join("runroot").display().to_string(),
            env: Vec::new(),
        }
    }

    async fn run(&self, args: &[&str]) -> Output {
        let mut all = vec![
            "--storage-driver",
            "vfs",
            "--root",
            &self.root,
            "--runroot",
            &self.runroot,
        ];
        all.extend_from_slice(args);
        tokio::process::Command::new("buildah")
            .args(&all)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .unwrap_or_else(|e| panic!("running buildah: {e}"))
    }

    async fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args).await;
        assert!(
            out.status.success(),
            "buildah {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `FROM scratch` + busybox.
    async fn build_busybox(&self, ctx: &Path, tag: &str, marker: &str) {
        std::fs::create_dir_all(ctx).expect("ctx");
        std::fs::copy("/bin/busybox", ctx.join("busybox")).expect("copy busybox");
        std::fs::write(ctx.join("marker"), marker).expect("marker");
        std::fs::write(
            ctx.join("Containerfile"),
            "FROM scratch\nCOPY busybox /bin/busybox\nCOPY marker /marker\nCMD [\"/bin/busybox\", \"cat\", \"/marker\"]\n",
        )
        .expect("containerfile");
        let ctx = ctx.display().to_string();
        self.ok(&["bud", "--isolation", "chroot", "-t", tag, &ctx])
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buildah_pushes_and_skopeo_copies_in_and_out() {
    if !have("buildah") || !have("skopeo") || !Path::new("/bin/busybox").is_file() {
        aloft_testkit::skip("buildah/skopeo/busybox missing");
        return;
    }
    let r = TestRegistry::start().await;
    let h = Http::new(&r.url());
    let host = r.addr.to_string();
    let tmp = tempfile::tempdir().expect("tempdir");
    let b = Buildah::new(tmp.path());
    b.build_busybox(&tmp.path().join("ctx"), "localhost/bb:1", "one")
        .await;

    // buildah push (chunked uploads through the real client).
    let dest = format!("docker://{host}/app-a/busybox:v1");
    b.ok(&[
        "push",
        "--tls-verify=false",
        "--creds",
        "x:tok-a",
        "localhost/bb:1",
        &dest,
    ])
    .await;

    // The agent's client resolves it and gets verified layers.
    let c = PullClient::new(&r.url(), Some("tok-a".into()));
    let m = c
        .manifest(&format!("{host}/app-a/busybox:v1"))
        .await
        .expect("resolve pushed image");
    assert!(!m.layers.is_empty());
    let layer = tmp.path().join("layer0");
    c.blob_to_file("app-a/busybox", &m.layers[0].digest, &layer)
        .await
        .expect("layer");
    assert_eq!(
        std::fs::metadata(&layer).expect("layer file").len(),
        m.layers[0].size
    );

    // Auth: tok-a cannot push to app B, with either client.
    let denied = b
        .run(&[
            "push",
            "--tls-verify=false",
            "--creds",
            "x:tok-a",
            "localhost/bb:1",
            &format!("docker://{host}/org/app-b/busybox:v1"),
        ])
        .await;
    assert!(!denied.status.success(), "push to another app must fail");
    let denied = run(
        "skopeo",
        &[
            "copy",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
            "--src-creds",
            "x:tok-a",
            "--dest-creds",
            "x:tok-a",
            &dest,
            &format!("docker://{host}/org/app-b/stolen:v1"),
        ],
    )
    .await;
    assert!(
        !denied.status.success(),
        "skopeo copy to another app must fail"
    );
    assert_eq!(
        h.get("/v2/org/app-b/tags/list", Some("admin")).await.status,
        StatusCode::NOT_FOUND,
        "nothing was stored in app B"
    );

    // skopeo copy out to an OCI layout and back in under another name.
    let oci = format!("oci:{}:v1", tmp.path().join("oci").display());
    run_ok(
        "skopeo",
        &[
            "copy",
            "--src-tls-verify=false",
            "--src-creds",
            "x:reader-a",
            &dest,
            &oci,
        ],
    )
    .await;
    run_ok(
        "skopeo",
        &[
            "copy",
            "--dest-tls-verify=false",
            "--dest-creds",
            "x:tok-a",
            &oci,
            &format!("docker://{host}/app-a/copy:v2"),
        ],
    )
    .await;
    // As Docker schema 2 as well.
    run_ok(
        "skopeo",
        &[
            "copy",
            "--format",
            "v2s2",
            "--dest-tls-verify=false",
            "--dest-creds",
            "x:tok-a",
            &oci,
            &format!("docker://{host}/app-a/docker:v1"),
        ],
    )
    .await;
    let resp = h.get("/v2/app-a/docker/manifests/v1", Some("tok-a")).await;
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(resp.header("content-type"), Some(DOCKER_MANIFEST));
    let dm = c
        .manifest("app-a/docker:v1")
        .await
        .expect("docker manifest");
    assert_eq!(dm.media_type, DOCKER_MANIFEST);

    // skopeo inspect, list-tags, and copy back out from the copy.
    let inspect = run_ok(
        "skopeo",
        &[
            "inspect",
            "--tls-verify=false",
            "--creds",
            "x:tok-a",
            &format!("docker://{host}/app-a/copy:v2"),
        ],
    )
    .await;
    let v: serde_json::Value = serde_json::from_str(&inspect).expect("inspect json");
    assert_eq!(v["Digest"], m.digest, "same manifest after the round trip");
    let tags = run_ok(
        "skopeo",
        &[
            "list-tags",
            "--tls-verify=false",
            "--creds",
            "x:tok-a",
            &format!("docker://{host}/app-a/copy"),
        ],
    )
    .await;
    let v: serde_json::Value = serde_json::from_str(&tags).expect("tags json");
    assert_eq!(v["Tags"], serde_json::json!(["v2"]));
    let back = format!("oci:{}:v2", tmp.path().join("oci2").display());
    run_ok(
        "skopeo",
        &[
            "copy",
            "--src-tls-verify=false",
            "--src-creds",
            "x:tok-a",
            &format!("docker://{host}/app-a/copy:v2"),
            &back,
        ],
    )
    .await;

    // skopeo delete (DELETE of the manifest by digest).
    run_ok(
        "skopeo",
        &[
            "delete",
            "--tls-verify=false",
            "--creds",
            "x:tok-a",
            &format!("docker://{host}/app-a/copy:v2"),
        ],
    )
    .await;
    let resp = h.get("/v2/app-a/copy/manifests/v2", Some("tok-a")).await;
    assert_eq!(resp.status, StatusCode::NOT_FOUND);
    // The original is untouched.
    assert_eq!(
        h.get("/v2/app-a/busybox/manifests/v1", Some("tok-a"))
            .await
            .status,
        StatusCode::OK
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buildah_pushes_a_manifest_list_and_skopeo_copies_all() {
    if !have("buildah") || !have("skopeo") || !Path::new("/bin/busybox").is_file() {
        aloft_testkit::skip("buildah/skopeo/busybox missing");
        return;
    }
    let r = TestRegistry::start().await;
    let host = r.addr.to_string();
    let tmp = tempfile::tempdir().expect("tempdir");
    let b = Buildah::new(tmp.path());
    b.build_busybox(&tmp.path().join("ctx"), "localhost/bb:1", "multi")
        .await;
    b.ok(&["manifest", "create", "localhost/bb-list:1"]).await;
    b.ok(&[
        "manifest",
        "add",
        "localhost/bb-list:1",
        "containers-storage:localhost/bb:1",
    ])
    .await;
    let dest = format!("docker://{host}/app-a/multi:v1");
    b.ok(&[
        "manifest",
        "push",
        "--all",
        "--tls-verify=false",
        "--creds",
        "x:tok-a",
        "localhost/bb-list:1",
        &dest,
    ])
    .await;

    let h = Http::new(&r.url());
    let resp = h.get("/v2/app-a/multi/manifests/v1", Some("tok-a")).await;
    assert_eq!(resp.status, StatusCode::OK);
    let ct = resp.header("content-type").unwrap_or_default().to_string();
    assert!(
        ct == OCI_INDEX || ct == aloft_registry::DOCKER_MANIFEST_LIST,
        "an index: {ct}"
    );
    let c = PullClient::new(&r.url(), Some("tok-a".into()));
    let m = c
        .manifest("app-a/multi:v1")
        .await
        .expect("resolve via index");
    assert!(m.index_digest.is_some());

    // skopeo copies the whole index out and into another repository.
    let oci = format!("oci:{}:v1", tmp.path().join("oci").display());
    run_ok(
        "skopeo",
        &[
            "copy",
            "--all",
            "--src-tls-verify=false",
            "--src-creds",
            "x:tok-a",
            &dest,
            &oci,
        ],
    )
    .await;
    run_ok(
        "skopeo",
        &[
            "copy",
            "--all",
            "--dest-tls-verify=false",
            "--dest-creds",
            "x:tok-a",
            &oci,
            &format!("docker://{host}/app-a/multi-copy:v1"),
        ],
    )
    .await;
    let m2 = c
        .manifest("app-a/multi-copy:v1")
        .await
        .expect("copied index");
    assert_eq!(m2.digest, m.digest);
    assert!(m2.index_digest.is_some());
}

/// Production's pull-through: buildah resolves `FROM debian:bookworm-slim` through a
/// docker.io mirror at `<registry>/dockerhub`, and the registry fetches it from its
/// upstream (here a second registry instance; no internet).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buildah_from_resolves_through_pull_through_mirror() {
    if !have("buildah") || !Path::new("/bin/busybox").is_file() {
        aloft_testkit::skip("buildah/busybox missing");
        return;
    }
    let upstream = TestRegistry::start().await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let b = Buildah::new(&tmp.path().join("b1"));
    b.build_busybox(&tmp.path().join("ctx"), "localhost/fake-debian:1", "debian")
        .await;
    b.ok(&[
        "push",
        "--tls-verify=false",
        "--creds",
        "x:admin",
        "localhost/fake-debian:1",
        &format!("docker://{}/library/debian:bookworm-slim", upstream.addr),
    ])
    .await;

    let mut cfg = aloft_registry::UpstreamConfig::new(upstream.url(), "dockerhub");
    cfg.password = Some("admin".into());
    let local = TestRegistry::start_with(Some(cfg)).await;
    let conf = tmp.path().join("registries.conf");
    std::fs::write(
        &conf,
        format!(
            "unqualified-search-registries = [\"docker.io\"]\nshort-name-mode = \"permissive\"\n\n[[registry]]\nprefix = \"docker.io\"\nlocation = \"docker.io\"\n\n[[registry.mirror]]\nlocation = \"{}/dockerhub\"\ninsecure = true\n",
            local.addr
        ),
    )
    .expect("registries.conf");
    // containers/image sends `--creds` only to the primary registry, never to a mirror:
    // the mirror's credentials come from an auth file, keyed by its host.
    let authfile = tmp.path().join("auth.json");
    std::fs::write(
        &authfile,
        serde_json::json!({"auths": {local.addr.to_string(): {"auth": b64("x:admin")}}})
            .to_string(),
    )
    .expect("auth.json");
    let authfile = authfile.display().to_string();
    let mut b2 = Buildah::new(&tmp.path().join("b2"));
    b2.env.push((
        "CONTAINERS_REGISTRIES_CONF".into(),
        conf.display().to_string(),
    ));
    let ctx = tmp.path().join("app");
    std::fs::create_dir_all(&ctx).expect("ctx");
    std::fs::write(ctx.join("app.txt"), "my app").expect("file");
    std::fs::write(
        ctx.join("Containerfile"),
        "FROM debian:bookworm-slim\nCOPY app.txt /app.txt\n",
    )
    .expect("containerfile");
    let ctx = ctx.display().to_string();
    b2.ok(&[
        "bud",
        "--isolation",
        "chroot",
        "--authfile",
        &authfile,
        "-t",
        "localhost/myapp:1",
        &ctx,
    ])
    .await;
    // The mirror pulled it from upstream and keeps it.
    let tags = local
        .registry
        .list_tags("dockerhub/library/debian")
        .expect("proxied repository");
    assert_eq!(tags.len(), 1);
    assert_eq!(tags[0].name, "bookworm-slim");
    // The built image pushes to the app's repository.
    b2.ok(&[
        "push",
        "--tls-verify=false",
        "--creds",
        "x:tok-a",
        "localhost/myapp:1",
        &format!("docker://{}/app-a/myapp:v1", local.addr),
    ])
    .await;
    let c = PullClient::new(&local.url(), Some("tok-a".into()));
    let m = c.manifest("app-a/myapp:v1").await.expect("built image");
    assert_eq!(m.layers.len(), 2, "base layer + the COPY");
}
