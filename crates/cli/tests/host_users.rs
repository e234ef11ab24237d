//! Other users on the host get nothing of the platform: its data dir is closed to them
//! (only the machines' root, a host id of their user namespace, may traverse it to their
//! root filesystems), its databases and keys are readable by root alone, and a tenant's
//! setuid binary unpacked into the layer cache can't be reached, let alone run, by a
//! host user.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::Platform;

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

fn walk(dir: &Path, found: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        found.push(path.clone());
        if kind.is_dir() {
            walk(&path, found);
        }
    }
}

/// Files that hold the platform's state or keys, by name (not the tenants' own files).
fn is_state_or_key(path: &Path) -> bool {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    [".db", ".db-wal", ".db-shm", ".key", ".token", ".sqlite"]
        .iter()
        .any(|suffix| name.ends_with(suffix))
}

/// Runs `program args` as the host user `nobody`; true when it succeeded.
fn as_nobody(program: &str, args: &[&str]) -> bool {
    Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(program)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn host_users_cannot_read_state_keys_or_tenant_binaries() {
    require_platform!();
    let platform = Platform::start();
    // The test's temp dir stands in for /var/lib: other users may traverse it, so only the
    // data dir's own mode keeps them out, as on a real host.
    std::fs::set_permissions(platform.root.path(), std::fs::Permissions::from_mode(0o755))
        .expect("opening the test root");

    let dir = platform.hello_app_dir("setuid");
    // A tenant's setuid binary, owned by root once unpacked.
    std::fs::copy("/bin/busybox", dir.join("suid-shell")).expect("busybox-static is installed");
    std::fs::set_permissions(
        dir.join("suid-shell"),
        std::fs::Permissions::from_mode(0o4755),
    )
    .expect("setuid bit");
    std::fs::write(
        dir.join("Dockerfile"),
        "FROM scratch\nCOPY hello /hello\nCOPY suid-shell /suid-shell\nCMD [\"/hello\"]\n",
    )
    .expect("Dockerfile");
    assert!(platform.aloft(&["apps", "create", "hello"]).ok());
    let deploy = platform.aloft_in(Some(&dir), &["deploy"]);
    assert!(deploy.ok(), "{deploy}\n{}", platform.server_log());

    let data_dir = platform.data_dir();
    assert_eq!(
        mode(&data_dir),
        0o710,
        "the data dir is closed to other users; the machines' root (its group) only traverses it"
    );
    use std::os::unix::fs::MetadataExt;
    let group = std::fs::metadata(&data_dir).expect("stat data dir").gid();
    assert_eq!(
        group,
        1 << 30,
        "the data dir's group is the machines' root, a host id of their user namespace"
    );

    let mut files = Vec::new();
    walk(&data_dir, &mut files);
    let state: Vec<&PathBuf> = files.iter().filter(|p| is_state_or_key(p)).collect();
    assert!(
        state.iter().any(|p| p.ends_with("host.token")),
        "the walk finds the platform's files: {files:?}"
    );
    for path in &state {
        assert_eq!(
            mode(path) & 0o077,
            0,
            "{} is readable by root alone (mode {:o})",
            path.display(),
            mode(path)
        );
    }

    let unpacked: Vec<&PathBuf> = files
        .iter()
        .filter(|p| p.file_name().is_some_and(|n| n == "suid-shell"))
        .collect();
    assert!(
        !unpacked.is_empty(),
        "the tenant's binary was unpacked: {files:?}"
    );
    // A copy outside the data dir: a host user reads it, so the checks below can fail.
    let control = platform.root.path().join("control-copy");
    std::fs::copy(unpacked[0], &control).expect("control copy");
    std::fs::set_permissions(&control, std::fs::Permissions::from_mode(0o644))
        .expect("control mode");
    let control = control.to_string_lossy().into_owned();
    assert!(
        as_nobody("/bin/busybox", &["cat", &control]),
        "a host user reads a file outside the data dir"
    );
    for path in unpacked {
        let path = path.to_string_lossy().into_owned();
        assert!(
            !as_nobody("/bin/busybox", &["cat", &path]),
            "a host user must not read (nor run) {path}"
        );
    }
    for path in state {
        let path = path.to_string_lossy().into_owned();
        assert!(
            !as_nobody("/bin/busybox", &["cat", &path]),
            "a host user must not read {path}"
        );
    }
}
