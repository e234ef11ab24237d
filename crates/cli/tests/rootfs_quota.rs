//! A machine's writable layer has a disk quota (`rootfs.size_gb`, `aloft machine run
//! --rootfs-size`, or the server's default): writing past it fails with "no space" inside
//! the machine, which keeps running, and the host's disk holds no more than the quota.
//! Destroying the machine, even after a `kill -9` of the platform, leaves no loop device
//! or mount behind.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::Platform;

const GIB: u64 = 1024 * 1024 * 1024;

/// An app whose image is busybox, idling.
fn busybox_app(platform: &Platform, name: &str) -> PathBuf {
    let dir = platform.root.path().join(format!("app-{name}"));
    let bin = dir.join("rootfs/bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy("/bin/busybox", bin.join("busybox"))
        .expect("busybox-static is installed (scripts/setup.sh)");
    for applet in ["sh", "dd", "rm", "echo", "sleep", "df", "cat"] {
        std::os::unix::fs::symlink("busybox", bin.join(applet)).unwrap();
    }
    std::fs::write(
        dir.join("Dockerfile"),
        "FROM scratch\nCOPY rootfs/ /\nCMD [\"/bin/sleep\", \"100000\"]\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("fly.toml"),
        format!("app = \"{name}\"\nprimary_region = \"local\"\n"),
    )
    .unwrap();
    dir
}

/// The image the app's first machine runs.
fn deployed_image(platform: &Platform, app: &str) -> String {
    let ids = platform.aloft(&["machine", "list", "-a", app, "-q"]);
    let id = ids
        .stdout
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_string();
    assert_eq!(id.len(), 14, "{ids}");
    let status = platform.aloft(&["machine", "status", &id, "-a", app, "--json"]);
    let machine: serde_json::Value = serde_json::from_str(&status.stdout).unwrap_or_default();
    let image = machine["config"]["image"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(!image.is_empty(), "{status}");
    image
}

/// Bytes the host's own filesystem holds for everything under `dir` (files on other
/// filesystems mounted beneath it not counted: what a machine's layer takes of the host).
fn host_bytes_under(dir: &Path) -> u64 {
    let device = std::fs::metadata(dir).map(|m| m.dev()).unwrap_or(0);
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.path().symlink_metadata() else {
                continue;
            };
            if meta.dev() != device {
                continue;
            }
            total += meta.blocks() * 512;
            if meta.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    total
}

/// Loop devices whose backing file is under `dir`.
fn loop_devices_under(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/sys/block").unwrap().flatten() {
        if let Ok(backing) = std::fs::read_to_string(entry.path().join("loop/backing_file"))
            && Path::new(backing.trim()).starts_with(dir)
        {
            found.push(format!(
                "{}: {}",
                entry.file_name().to_string_lossy(),
                backing.trim()
            ));
        }
    }
    found
}

/// Mount points under `dir`.
fn mounts_under(dir: &Path) -> Vec<String> {
    let prefix = dir.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| p.starts_with(&prefix))
        .map(str::to_string)
        .collect()
}

/// Waits (autoclear detaches a loop device as its last mount goes) until nothing of
/// `dir` is mounted or attached.
fn assert_released(dir: &Path, what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (loops, mounts) = (loop_devices_under(dir), mounts_under(dir));
        if loops.is_empty() && mounts.is_empty() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: loop devices {loops:?}, mounts {mounts:?} are left"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn writes_past_the_rootfs_size_fail_inside_the_machine_and_spare_the_host() {
    require_platform!();
    let mut platform = Platform::start_with(&["--driver", "container"]);
    assert!(platform.aloft(&["apps", "create", "quota"]).ok());
    let dir = busybox_app(&platform, "quota");
    let deploy = platform.aloft_in(Some(&dir), &["deploy", "--ha=false"]);
    assert!(deploy.ok(), "{deploy}\n{}", platform.server_log());
    let image = deployed_image(&platform, "quota");

    // Sizes out of range are refused when the machine is created, naming the field.
    for size in ["0", "100000"] {
        let refused = platform.aloft(&[
            "machine",
            "run",
            &image,
            "-a",
            "quota",
            "--rootfs-size",
            size,
        ]);
        assert!(!refused.ok(), "{refused}");
        assert!(
            refused.stderr.contains("rootfs.size_gb"),
            "the error names the field: {refused}"
        );
    }

    let run = platform.aloft(&[
        "machine",
        "run",
        &image,
        "-a",
        "quota",
        "--rootfs-size",
        "1",
    ]);
    assert!(run.ok(), "{run}\n{}", platform.server_log());
    let id = common::launched_machine_id(&run.stdout);
    assert_eq!(id.len(), 14, "{run}");
    let machine_dir = platform.data_dir().join("agent/machines").join(&id);
    let before = host_bytes_under(&machine_dir);

    let fill = platform.machine_sh(
        "quota",
        &id,
        "dd if=/dev/zero of=/big bs=1M count=2000 2>&1; echo rc=$?",
    );
    assert!(
        fill.stdout.contains("No space left on device") && !fill.stdout.contains("rc=0"),
        "writing 2000 MB into a 1 GB rootfs runs out of space: {fill}"
    );
    let used = host_bytes_under(&machine_dir).saturating_sub(before);
    assert!(
        used <= GIB + GIB / 10,
        "the host's disk holds {used} bytes more for the machine, more than its 1 GB"
    );

    // The machine keeps running, and has its space back once the file is gone.
    let status = platform.aloft(&["machine", "status", &id, "-a", "quota"]);
    assert!(status.stdout.contains("started"), "{status}");
    let again = platform.machine_sh(
        "quota",
        &id,
        "rm /big && dd if=/dev/zero of=/small bs=1M count=10 2>&1; echo rc=$?",
    );
    assert!(again.stdout.contains("rc=0"), "{again}");

    // A restart starts from the image again, with the whole quota free.
    let restart = platform.aloft(&["machine", "restart", &id, "-a", "quota"]);
    assert!(restart.ok(), "{restart}");
    let fresh = platform.machine_sh("quota", &id, "cat /small 2>&1; echo rc=$?");
    assert!(
        !fresh.stdout.contains("rc=0"),
        "the last run's file is gone: {fresh}"
    );

    let destroy = platform.aloft(&["machine", "destroy", &id, "-a", "quota", "--force"]);
    assert!(destroy.ok(), "{destroy}");
    assert_released(&machine_dir, "after destroy");

    // A machine running through a kill -9 of the platform is still cleaned up when it
    // is destroyed by the next one.
    let run = platform.aloft(&[
        "machine",
        "run",
        &image,
        "-a",
        "quota",
        "--rootfs-size",
        "1",
    ]);
    assert!(run.ok(), "{run}\n{}", platform.server_log());
    let second = common::launched_machine_id(&run.stdout);
    let second_dir = platform.data_dir().join("agent/machines").join(&second);
    assert!(
        !loop_devices_under(&second_dir).is_empty(),
        "the layer is a loop device"
    );
    platform.kill_server();
    platform.restart_server();
    let destroy = platform.aloft(&["machine", "destroy", &second, "-a", "quota", "--force"]);
    assert!(destroy.ok(), "{destroy}\n{}", platform.server_log());
    assert_released(&second_dir, "after a kill -9, restart and destroy");

    // Stopping the platform releases the layers of the machines it stops.
    let data_dir = platform.data_dir();
    platform.stop();
    assert_released(&data_dir, "after the platform stopped");
}
