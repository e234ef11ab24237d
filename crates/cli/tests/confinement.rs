//! What a machine's process may not do, end to end (`aloft server`, a busybox machine):
//! io_uring's calls fail (seccomp), the host's RAPL energy counters are masked, and root
//! in a machine is not root on the host (a user namespace).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::Platform;

/// A static program that calls io_uring_setup and says how it went.
const URING_PROBE: &str = r#"
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>
int main(void) {
    unsigned char params[120] = {0};
    long fd = syscall(__NR_io_uring_setup, 1, params);
    if (fd < 0) { printf("io_uring_setup: %s\n", strerror(errno)); return 1; }
    printf("io_uring_setup: allowed\n");
    return 0;
}
"#;

/// Builds [`URING_PROBE`] into `out`, or says why it can't.
fn build_probe(out: &Path) -> Result<(), String> {
    let source = out.with_extension("c");
    std::fs::write(&source, URING_PROBE).map_err(|e| e.to_string())?;
    let built = Command::new("cc")
        .args(["-static", "-O1", "-o"])
        .arg(out)
        .arg(&source)
        .output()
        .map_err(|e| format!("running cc: {e}"))?;
    if built.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&built.stderr).into_owned())
    }
}

fn lab_app(platform: &Platform) -> Option<PathBuf> {
    let dir = platform.root.path().join("app-confined");
    let bin = dir.join("rootfs/bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(dir.join("rootfs/www")).unwrap();
    if let Err(why) = build_probe(&bin.join("uring-probe")) {
        aloft_testkit::skip(format!(
            "cannot build a static C program (gcc, libc6-dev): {why}"
        ));
        return None;
    }
    std::fs::copy("/bin/busybox", bin.join("busybox"))
        .expect("busybox-static is installed (scripts/setup.sh)");
    for applet in ["sh", "httpd", "ls", "cat", "echo"] {
        std::os::unix::fs::symlink("busybox", bin.join(applet)).unwrap();
    }
    std::fs::write(dir.join("rootfs/www/index.html"), "hello\n").unwrap();
    std::fs::write(
        dir.join("Dockerfile"),
        "FROM scratch\nCOPY rootfs/ /\nCMD [\"/bin/httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("fly.toml"),
        "app = \"confined\"\nprimary_region = \"local\"\n\n[http_service]\n  internal_port = 8080\n  auto_stop_machines = \"off\"\n  min_machines_running = 0\n",
    )
    .unwrap();
    Some(dir)
}

#[test]
fn io_uring_is_denied_and_powercap_masked_in_machines() {
    require_platform!();
    let platform = Platform::start_with(&["--driver", "container"]);
    let Some(dir) = lab_app(&platform) else {
        return;
    };
    assert!(platform.aloft(&["apps", "create", "confined"]).ok());
    let deployed = platform.aloft_in(Some(&dir), &["deploy", "--ha=false"]);
    assert!(deployed.ok(), "{deployed}\n{}", platform.server_log());
    let ids = platform.aloft(&["machine", "list", "-a", "confined", "-q"]);
    let id = ids
        .stdout
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_string();
    assert_eq!(id.len(), 14, "{ids}");
    let exec = |argv: &[&str]| {
        let mut args = vec!["machine", "exec", id.as_str(), "-a", "confined", "--"];
        args.extend_from_slice(argv);
        platform.aloft(&args)
    };

    let probe = exec(&["/bin/uring-probe"]);
    assert!(
        probe
            .stdout
            .contains("io_uring_setup: Operation not permitted"),
        "{probe}"
    );

    // Masked where the host has it (runc masks only paths that exist).
    let listed = exec(&[
        "sh",
        "-c",
        "ls -A /sys/devices/virtual/powercap 2>/dev/null; echo end",
    ]);
    assert_eq!(listed.stdout.trim(), "end", "{listed}");
}

/// An idle busybox machine of app `name`; returns its id.
fn busybox_machine(platform: &Platform, name: &str) -> String {
    let dir = common::idle_busybox_app(platform, name, "");
    assert!(platform.aloft(&["apps", "create", name]).ok());
    let deployed = platform.aloft_in(Some(&dir), &["deploy", "--ha=false"]);
    assert!(deployed.ok(), "{deployed}\n{}", platform.server_log());
    let ids = common::machine_ids(platform, name);
    assert_eq!(ids.len(), 1, "{ids:?}");
    ids[0].clone()
}

#[test]
fn root_in_a_machine_is_not_root_on_the_host() {
    require_platform!();
    let platform = Platform::start_with(&["--driver", "container"]);
    let id = busybox_machine(&platform, "userns");
    let exec = |argv: &[&str]| {
        let mut args = vec!["machine", "exec", id.as_str(), "-a", "userns", "--"];
        args.extend_from_slice(argv);
        platform.aloft(&args)
    };

    // `0 0 4294967295` is the host's own (no user namespace).
    let map = exec(&["cat", "/proc/self/uid_map"]);
    assert!(map.ok(), "{map}");
    let fields: Vec<u64> = map
        .stdout
        .split_whitespace()
        .map(|f| f.parse().expect("uid_map holds numbers"))
        .collect();
    assert_eq!(fields.len(), 3, "one range: {map}");
    let (inside, host, count) = (fields[0], fields[1], fields[2]);
    assert_eq!(inside, 0, "{map}");
    assert_ne!(host, 0, "root in the machine is root on the host: {map}");
    assert!(
        count < 4_294_967_295,
        "the machine's ids are a range, not all of the host's: {map}"
    );
    let gid_map = exec(&["cat", "/proc/self/gid_map"]);
    assert!(
        gid_map.stdout.split_whitespace().nth(1) != Some("0"),
        "group 0 in the machine is the host's group 0: {gid_map}"
    );

    let whoami = exec(&["sh", "-c", "echo $(stat -c %u /proc/self/status)"]);
    assert_eq!(
        whoami.stdout.trim(),
        "0",
        "the machine runs as its root: {whoami}"
    );
    let wrote = exec(&["sh", "-c", "echo mine > /made-by-root"]);
    assert!(wrote.ok(), "{wrote}");
    let made = platform
        .data_dir()
        .join(format!("agent/machines/{id}/layer/upper/made-by-root"));
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(&made).unwrap_or_else(|e| {
        panic!(
            "the machine's file in its writable layer {}: {e}",
            made.display()
        )
    });
    assert_eq!(
        u64::from(meta.uid()),
        host,
        "a file root made in the machine belongs to the mapped host id"
    );
    assert_ne!(
        meta.uid(),
        0,
        "a file root made in the machine is root's on the host"
    );
}
