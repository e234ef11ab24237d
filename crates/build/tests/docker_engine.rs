//! The Docker engine builder's command lines, against a stand-in `docker` on PATH that
//! records what it is asked (this machine has no Docker engine). Its own test binary,
//! because it changes PATH for the process.

use std::os::unix::fs::PermissionsExt;

use aloft_build::{BuildError, DockerEngine, DockerfileBuild};

const FAKE_DOCKER: &str = r##"#!/bin/sh
echo "$@" >> "$FAKE_DOCKER_LOG"
case "$1" in
  version) echo 28.2.2 ;;
  build)
    for arg in "$@"; do
      case "$arg" in
        id=*,src=*) src=${arg#*src=}; echo "secret file holds: $(cat "$src")" >> "$FAKE_DOCKER_LOG" ;;
      esac
    done
    echo "#5 [1/2] FROM docker.io/library/alpine"
    echo "#6 [2/2] RUN make"
    if [ -n "$FAKE_DOCKER_FAIL" ]; then echo "#6 0.1 make: no rule"; echo "ERROR: process \"/bin/sh -c make\" did not complete successfully: exit code: 2" >&2; exit 1; fi
    ;;
  push)
    cat "$DOCKER_CONFIG/config.json" >> "$FAKE_DOCKER_LOG"
    echo "deployment-1: digest: sha256:0123abcd size: 528"
    ;;
esac
"##;

#[tokio::test]
async fn builds_and_pushes_through_the_docker_cli() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let docker = bin.join("docker");
    std::fs::write(&docker, FAKE_DOCKER).unwrap();
    std::fs::set_permissions(&docker, std::fs::Permissions::from_mode(0o755)).unwrap();
    let log = dir.path().join("calls.log");
    // SAFETY: this test binary has this one test; nothing else reads the environment.
    unsafe {
        std::env::set_var(
            "PATH",
            format!(
                "{}:{}",
                bin.display(),
                std::env::var("PATH").unwrap_or_default()
            ),
        );
        std::env::set_var("FAKE_DOCKER_LOG", &log);
    }
    assert!(DockerEngine::answers().await);

    std::fs::write(dir.path().join("Dockerfile"), "FROM alpine\nRUN make\n").unwrap();
    let build = DockerfileBuild {
        context: dir.path().into(),
        dockerfile: dir.path().join("Dockerfile"),
        tag: "127.0.0.1:4280/app:deployment-1".into(),
        build_args: vec![("MODE".into(), "release".into())],
        target: Some("final".into()),
        ignorefile: None,
        no_cache: true,
        secrets: vec![("npm_token".into(), "t0ken".into())],
    };
    let mut lines = Vec::new();
    DockerEngine
        .build(&build, |l| lines.push(l.to_string()))
        .await
        .unwrap();
    assert_eq!(
        lines,
        vec![
            "#5 [1/2] FROM docker.io/library/alpine",
            "#6 [2/2] RUN make"
        ]
    );
    let digest = DockerEngine
        .push(&build.tag, "platform-token")
        .await
        .unwrap();
    assert_eq!(digest, "sha256:0123abcd");

    let calls = std::fs::read_to_string(&log).unwrap();
    let build_call = calls
        .lines()
        .find(|l| l.starts_with("build "))
        .unwrap_or_default();
    for expected in [
        "--progress=plain",
        "-t 127.0.0.1:4280/app:deployment-1",
        "--build-arg MODE=release",
        "--target final",
        "--no-cache",
        "--secret id=npm_token,src=",
    ] {
        assert!(
            build_call.contains(expected),
            "{expected:?} missing from: {build_call}"
        );
    }
    assert!(calls.contains("secret file holds: t0ken"), "{calls}");
    assert!(
        calls.contains("push 127.0.0.1:4280/app:deployment-1"),
        "{calls}"
    );
    // The push authenticates with the token as the password ("x:platform-token").
    assert!(
        calls.contains(r#""127.0.0.1:4280":{"auth":"eDpwbGF0Zm9ybS10b2tlbg=="}"#),
        "{calls}"
    );

    unsafe { std::env::set_var("FAKE_DOCKER_FAIL", "1") };
    match DockerEngine.build(&build, |_| {}).await {
        Err(BuildError::Failed {
            step,
            reason,
            output,
        }) => {
            assert_eq!(step, "STEP 2/2: RUN make");
            assert!(reason.contains("did not complete successfully"), "{reason}");
            assert_eq!(output, vec!["#6 0.1 make: no rule"]);
        }
        other => panic!("expected a failed step: {other:?}"),
    }
}
