//! Dockerfile builds with buildah: build args, targets, ignore files and build secrets
//! reach the build; the secret stays out of the image. Skips without buildah.

use aloft_build::{BuildError, Buildah, DockerfileBuild};

fn prerequisites() -> bool {
    if !Buildah::available() || !std::path::Path::new("/bin/busybox").exists() {
        aloft_testkit::skip(
            "needs buildah and /bin/busybox (apt-get install buildah busybox-static)",
        );
        return false;
    }
    true
}

#[tokio::test]
async fn args_targets_ignore_files_and_secrets_reach_the_build() {
    if !prerequisites() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy("/bin/busybox", dir.path().join("busybox")).unwrap();
    std::fs::write(dir.path().join("kept.txt"), "kept").unwrap();
    std::fs::write(dir.path().join("ignored.txt"), "ignored").unwrap();
    std::fs::write(dir.path().join("custom.ignore"), "ignored.txt\n").unwrap();
    std::fs::write(
        dir.path().join("Dockerfile"),
        r#"FROM scratch AS base
COPY busybox /bin/sh
COPY . /ctx
ARG GREETING
RUN test "$GREETING" = hello || { echo "build arg missing: '$GREETING'"; exit 1; }
RUN test -e /ctx/kept.txt && test ! -e /ctx/ignored.txt || { echo "ignore file not applied"; exit 1; }
RUN --mount=type=secret,id=api_token read -r value < /run/secrets/api_token; test "$value" = s3cret || { echo "secret missing"; exit 1; }
RUN test ! -e /run/secrets/api_token || { echo "secret left in the image"; exit 1; }

FROM base AS broken
RUN echo "this stage is past the target"; exit 9
"#,
    )
    .unwrap();
    let storage = tempfile::tempdir().unwrap();
    let buildah = Buildah::new(storage.path());
    let mut build = DockerfileBuild {
        context: dir.path().into(),
        dockerfile: dir.path().join("Dockerfile"),
        tag: "localhost/aloft-build-test:features".into(),
        build_args: vec![("GREETING".into(), "hello".into())],
        target: Some("base".into()),
        ignorefile: Some(dir.path().join("custom.ignore")),
        no_cache: true,
        secrets: vec![("api_token".into(), "s3cret".into())],
    };
    let mut output = Vec::new();
    let result = buildah
        .build(&build, None, |line| output.push(line.to_string()))
        .await;
    assert!(result.is_ok(), "{result:?}\n{}", output.join("\n"));

    // Without the target, the broken stage runs and fails, named with its step.
    build.target = None;
    match buildah.build(&build, None, |_| {}).await {
        Err(BuildError::Failed { step, output, .. }) => {
            assert!(
                step.contains("RUN echo \"this stage is past the target\""),
                "{step}: {output:?}"
            );
            assert!(
                output
                    .iter()
                    .any(|l| l.contains("this stage is past the target")),
                "{output:?}"
            );
        }
        other => panic!("expected the broken stage to fail: {other:?}"),
    }

    // A wrong secret makes the RUN step fail, not the build silently pass.
    build.target = Some("base".into());
    build.secrets = vec![("api_token".into(), "wrong".into())];
    match buildah.build(&build, None, |_| {}).await {
        Err(BuildError::Failed { step, .. }) => {
            assert!(step.contains("--mount=type=secret"), "{step}")
        }
        other => panic!("expected the secret check to fail: {other:?}"),
    }
}
