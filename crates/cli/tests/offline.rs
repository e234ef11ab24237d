//! Commands that need no platform: `aloft config validate` as flyctl judges a file,
//! `aloft --version`, and `aloft doctor`.

mod common;

use std::process::Command;

use common::Run;

fn aloft(args: &[&str]) -> Run {
    Run::from(
        Command::new(common::aloft_binary())
            .args(args)
            .output()
            .expect("running aloft"),
    )
}

/// flyctl checks neither region codes nor app names offline, and real files carry
/// placeholders: the file is valid, with a warning naming `primary_region`.
#[test]
fn config_validate_takes_a_placeholder_region_as_a_warning() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("fly.toml");
    std::fs::write(
        &path,
        "app = \"{APP_NAME}\"\nprimary_region = \"{REGION}\"\n\n[http_service]\n  internal_port = 8080\n",
    )
    .expect("writing fly.toml");
    let run = aloft(&["config", "validate", "-c", &path.to_string_lossy()]);
    assert!(run.ok(), "{run}");
    assert!(run.stdout.contains("✓ Configuration is valid"), "{run}");
    let warning = run
        .stdout
        .lines()
        .find(|line| line.starts_with("WARNING") && line.contains("primary_region"))
        .unwrap_or_else(|| panic!("no warning about primary_region: {run}"));
    assert!(warning.contains("{REGION}"), "{warning}");
    assert!(!run.stdout.contains('✘'), "{run}");
}

/// `aloft --version`: the version and the commit it was built from (`unknown` outside git).
#[test]
fn version_names_the_release_and_the_commit() {
    let run = aloft(&["--version"]);
    assert!(run.ok(), "{run}");
    let line = run.stdout.trim_end();
    let expected_prefix = format!("aloft {} (commit ", env!("CARGO_PKG_VERSION"));
    let commit = line
        .strip_prefix(&expected_prefix)
        .and_then(|rest| rest.strip_suffix(')'))
        .unwrap_or_else(|| panic!("`{line}` is not `aloft VERSION (commit COMMIT)`"));
    let head = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    match head {
        Some(head) if std::env::var_os("ALOFT_COMMIT").is_none() => assert_eq!(commit, head),
        _ => assert!(
            commit == "unknown"
                || (commit.len() >= 7 && commit.bytes().all(|b| b.is_ascii_hexdigit())),
            "{commit}"
        ),
    }
}

/// On this host (where the platform tests run) every check passes.
#[test]
fn doctor_finds_what_the_server_needs_here() {
    require_platform!();
    let data = tempfile::tempdir().expect("temp dir");
    let run = aloft(&["doctor", "--data-dir", &data.path().to_string_lossy()]);
    assert!(run.ok(), "{run}");
    for check in ["OCI runtime", "buildah", "nft", "cgroups", "free disk"] {
        assert!(
            run.stdout
                .lines()
                .any(|l| l.starts_with('✓') && l.contains(check)),
            "`{check}` is not reported OK: {run}"
        );
    }
    assert!(
        run.stdout.lines().any(|l| l.contains("KVM")),
        "KVM is reported: {run}"
    );
    assert!(
        run.stdout.contains("This host can run `aloft server`."),
        "{run}"
    );
}

/// A tool that is missing is named with the Debian package that brings it, and the exit
/// code says something required is missing.
#[test]
fn doctor_names_a_missing_tool_and_its_package() {
    let bin = tempfile::tempdir().expect("temp dir");
    // Everything doctor looks for except buildah.
    for tool in ["runc", "crun", "nft", "ip", "nsenter"] {
        let found = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
            .map(|dir| dir.join(tool))
            .find(|p| p.is_file());
        if let Some(path) = found {
            std::os::unix::fs::symlink(path, bin.path().join(tool)).expect("linking a tool");
        }
    }
    let data = tempfile::tempdir().expect("temp dir");
    let run = Run::from(
        Command::new(common::aloft_binary())
            .args(["doctor", "--data-dir", &data.path().to_string_lossy()])
            .env("PATH", bin.path())
            .output()
            .expect("running aloft doctor"),
    );
    assert_eq!(run.status, 1, "{run}");
    let line = run
        .stdout
        .lines()
        .find(|l| l.contains("buildah"))
        .unwrap_or_else(|| panic!("no line about buildah: {run}"));
    assert!(line.starts_with('✘'), "{line}");
    assert!(line.contains("apt-get install buildah"), "{line}");
    assert!(run.stderr.contains("buildah"), "{run}");
}

/// `ip netns exec` mounts a fresh /sys, which hides cgroups: the server says so and
/// exits at once instead of failing at the first machine start.
#[test]
fn the_server_refuses_to_start_where_cgroups_are_not_visible() {
    require_platform!();
    let netns = format!("aloft-cg{}", std::process::id());
    let added = Command::new("ip")
        .args(["netns", "add", &netns])
        .status()
        .expect("ip netns add");
    assert!(added.success(), "creating {netns}");
    let root = tempfile::tempdir().expect("temp dir");
    let mut server = Command::new("ip")
        .args(["netns", "exec", &netns])
        .arg(common::aloft_binary())
        .arg("server")
        .arg("--data-dir")
        .arg(root.path().join("data"))
        .env("HOME", root.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starting aloft server");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let exited = loop {
        if let Ok(Some(_)) = server.try_wait() {
            break true;
        }
        if std::time::Instant::now() > deadline {
            let _ = server.kill();
            break false;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let run = Run::from(server.wait_with_output().expect("server output"));
    let _ = Command::new("ip").args(["netns", "del", &netns]).status();
    assert!(exited, "the server kept running without cgroups: {run}");
    assert_ne!(run.status, 0, "{run}");
    assert!(run.stderr.contains("cgroups are not visible"), "{run}");
    assert!(
        run.stderr.contains("nsenter --net="),
        "the fix is named: {run}"
    );
}
