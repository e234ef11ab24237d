//! Volumes for microVMs (issue 18, points 2, 3 and 8 for `aloft server --driver microvm`):
//! the volume is a virtio-blk disk that init mounts at the mount's path (ext4, its root
//! owned by root). Encrypted by default with QEMU's LUKS driver over the image file (the
//! key from the vault, handed to QEMU through a pipe), so the image holds no plaintext of
//! what the machine wrote; `--no-encryption` gives a plain ext4 image, which does. The
//! data survives stop and start, and the API reports the filesystem's own counts.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{Platform, Run, idle_busybox_app, machine_ids, volumes_json, wait_until};

const GIB: u64 = 1024 * 1024 * 1024;

/// Runs `script` in the machine once it answers (a microVM under TCG boots slowly).
fn in_machine_when_up(platform: &Platform, app: &str, id: &str, script: &str) -> Run {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let run = platform.machine_sh(app, id, script);
        if run.ok() || Instant::now() > deadline {
            return run;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Whether `needle` appears anywhere in the file at `path`.
fn file_contains(path: &Path, needle: &[u8]) -> bool {
    use std::io::Read;
    let mut file = std::fs::File::open(path).unwrap();
    let mut buffer = vec![0u8; 1 << 20];
    let mut carry: Vec<u8> = Vec::new();
    loop {
        let n = file.read(&mut buffer).unwrap();
        if n == 0 {
            return false;
        }
        let mut window = std::mem::take(&mut carry);
        window.extend_from_slice(&buffer[..n]);
        if window.windows(needle.len()).any(|w| w == needle) {
            return true;
        }
        carry = window[window.len().saturating_sub(needle.len())..].to_vec();
    }
}

fn head(path: &Path, n: usize) -> Vec<u8> {
    use std::io::Read;
    let mut bytes = vec![0u8; n];
    std::fs::File::open(path)
        .unwrap()
        .read_exact(&mut bytes)
        .unwrap();
    bytes
}

/// Deploys `app` with a volume at /data, writes `marker` into it, stops and starts the
/// machine, reads it back; returns the volume's image with the machine stopped.
fn write_stop_start_read(platform: &Platform, app: &str, marker: &str) -> std::path::PathBuf {
    let dir = idle_busybox_app(
        platform,
        app,
        "\n[mounts]\n  source = \"data\"\n  destination = \"/data\"\n",
    );
    let deploy = platform.aloft_in(Some(&dir), &["deploy", "--ha=false"]);
    assert!(deploy.ok(), "{deploy}\n{}", platform.server_log());
    let machines = machine_ids(platform, app);
    assert_eq!(machines.len(), 1, "{machines:?}");
    let id = machines[0].clone();
    let volumes = volumes_json(platform, app, false);
    assert_eq!(volumes.len(), 1, "{volumes:?}");
    let volume = &volumes[0];
    let vol_id = volume["id"].as_str().unwrap_or_default().to_string();
    assert_eq!(volume["attached_machine_id"], id.as_str(), "{volume}");
    assert_eq!(volume["size_gb"], 1, "{volume}");
    let blocks = volume["blocks"].as_u64().unwrap_or(0);
    assert!(
        blocks * volume["block_size"].as_u64().unwrap_or(0) > GIB * 9 / 10,
        "the filesystem's own counts: {volume}"
    );
    assert!(
        volume["blocks_avail"].as_u64().unwrap_or(0) > blocks * 9 / 10,
        "{volume}"
    );

    // In the guest: an ext4 disk mounted at /data, its root owned by root.
    let mounts = in_machine_when_up(platform, app, &id, "cat /proc/mounts; stat -c %u:%g /data");
    assert!(mounts.ok(), "{mounts}\n{}", platform.server_log());
    assert!(
        mounts
            .stdout
            .lines()
            .any(|l| l.starts_with("/dev/vd") && l.contains(" /data ext4 ")),
        "{mounts}"
    );
    assert!(mounts.stdout.contains("\n0:0"), "{mounts}");
    // QEMU opens the image it is handed; an encrypted one's key comes through a pipe,
    // not its command line (which every user can read).
    let pid = std::fs::read_to_string(
        platform
            .data_dir()
            .join(format!("agent/machines/{id}/qemu.pid")),
    )
    .expect("QEMU's pid");
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", pid.trim()))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default();
    assert!(cmdline.contains("serial=fly-vol-0"), "{cmdline}");
    assert!(!cmdline.contains("data="), "{cmdline}");
    assert!(
        !cmdline.contains(&vol_id),
        "the image is handed over open: {cmdline}"
    );
    let write = platform.machine_sh(
        app,
        &id,
        &format!("echo {marker} > /data/kept && sync && cat /data/kept"),
    );
    assert!(write.ok() && write.stdout.contains(marker), "{write}");

    assert!(platform.aloft(&["machine", "stop", &id, "-a", app]).ok());
    let start = platform.aloft(&["machine", "start", &id, "-a", app]);
    assert!(start.ok(), "{start}\n{}", platform.server_log());
    let read = in_machine_when_up(platform, app, &id, "cat /data/kept");
    assert_eq!(
        read.stdout.trim(),
        marker,
        "the volume's file after stop and start: {read}\n{}",
        platform.server_log()
    );
    let stop = platform.aloft(&["machine", "stop", &id, "-a", app]);
    assert!(stop.ok(), "{stop}");
    // The same volume the API reports: its counts, read with the machine stopped.
    let volumes = volumes_json(platform, app, false);
    assert_eq!(volumes[0]["id"], vol_id.as_str());
    assert!(
        volumes[0]["blocks_free"].as_u64().unwrap_or(0) < blocks,
        "{volumes:?}"
    );
    let image = platform
        .data_dir()
        .join(format!("agent/volumes/{vol_id}.ext4"));
    let meta = std::fs::metadata(&image).expect("the volume's image");
    assert_eq!(meta.mode() & 0o777, 0o600);
    assert!(
        meta.blocks() * 512 >= GIB,
        "the volume's blocks are reserved"
    );
    image
}

#[test]
fn a_microvm_volume_is_an_encrypted_disk_that_keeps_its_data() {
    require_platform!();
    if let Some(reason) = common::missing_vm_prerequisite() {
        aloft_testkit::skip(format!("microVM test: {reason}"));
        return;
    }
    let _lock = common::vm_lock();
    let platform = Platform::start_with(&["--driver", "microvm", "--vm-accel", "tcg"]);

    // Encrypted by default: a LUKS image, no plaintext in it.
    assert!(platform.aloft(&["apps", "create", "vmvol"]).ok());
    let marker = format!("vmvol-marker-{}", std::process::id());
    let image = write_stop_start_read(&platform, "vmvol", &marker);
    assert_eq!(&head(&image, 6), b"LUKS\xba\xbe", "a LUKS image");
    assert!(
        !file_contains(&image, marker.as_bytes()),
        "the encrypted volume's image holds the machine's data in plain text"
    );

    // Extend: the image (the LUKS payload) grows now, the filesystem when the machine
    // next starts (init grows it online to its disk), with the data kept.
    let id = machine_ids(&platform, "vmvol")[0].clone();
    let vol_id = volumes_json(&platform, "vmvol", false)[0]["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let extend = platform.aloft(&["volumes", "extend", &vol_id, "-a", "vmvol", "--size", "2"]);
    assert!(extend.ok(), "{extend}\n{}", platform.server_log());
    assert!(extend.stdout.contains("Size GB: 2"), "{extend}");
    assert!(
        extend
            .stdout
            .contains("You will need to stop and start your Machine"),
        "the filesystem grows at the next start: {extend}"
    );
    let start = platform.aloft(&["machine", "start", &id, "-a", "vmvol"]);
    assert!(start.ok(), "{start}\n{}", platform.server_log());
    let df = in_machine_when_up(&platform, "vmvol", &id, "df -k /data; cat /data/kept");
    let total_kib: u64 = df
        .stdout
        .lines()
        .find(|l| l.contains("/data"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(total_kib > 1900 * 1024, "the filesystem fills 2 GB: {df}");
    assert!(df.stdout.contains(&marker), "{df}");
    let grown = volumes_json(&platform, "vmvol", false);
    assert_eq!(grown[0]["size_gb"], 2, "{grown:?}");
    assert!(
        grown[0]["blocks"].as_u64().unwrap_or(0) * grown[0]["block_size"].as_u64().unwrap_or(0)
            > GIB * 19 / 10,
        "the API reports the grown filesystem: {grown:?}"
    );

    // A snapshot of a running VM's volume holds the VM paused (its disks flushed) while
    // the image is read; the VM goes on afterwards, and the snapshot restores into a
    // volume another machine mounts with the data.
    let snap = platform.aloft(&["volumes", "snapshots", "create", &vol_id, "-a", "vmvol"]);
    assert!(snap.ok(), "{snap}\n{}", platform.server_log());
    // The supervisor continues the VM once the agent has read the image, which may be just
    // after the API answered.
    let machine_log = platform
        .data_dir()
        .join(format!("agent/machines/{id}/machine.log"));
    wait_until(
        "the VM paused for the snapshot and continued",
        Duration::from_secs(30),
        || {
            let log = std::fs::read_to_string(&machine_log).unwrap_or_default();
            (!(log.contains("paused while a snapshot of its volumes is taken")
                && log.contains("continued after the snapshot")))
            .then_some(log)
        },
    );
    let after = platform.machine_sh("vmvol", &id, "cat /data/kept");
    assert_eq!(after.stdout.trim(), marker, "the VM runs on: {after}");
    let listed = platform.aloft(&[
        "volumes",
        "snapshots",
        "list",
        &vol_id,
        "-a",
        "vmvol",
        "--json",
    ]);
    let listed: Vec<serde_json::Value> = serde_json::from_str(&listed.stdout).unwrap_or_default();
    let snapshot_id = listed
        .first()
        .and_then(|s| s["id"].as_str())
        .unwrap_or_default()
        .to_string();
    let restored = platform.aloft(&[
        "volumes",
        "create",
        "restored",
        "-a",
        "vmvol",
        "--snapshot-id",
        &snapshot_id,
        "-y",
        "--json",
    ]);
    assert!(restored.ok(), "{restored}\n{}", platform.server_log());
    let restored: serde_json::Value = serde_json::from_str(&restored.stdout).unwrap_or_default();
    let restored_id = restored["id"].as_str().unwrap_or_default().to_string();
    let image_ref = common::machine_json(&platform, "vmvol", &id)["config"]["image"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let volume_flag = format!("{restored_id}:/data");
    let run = platform.aloft(&[
        "machine",
        "run",
        &image_ref,
        "-a",
        "vmvol",
        "--region",
        "local",
        "-v",
        &volume_flag,
    ]);
    assert!(run.ok(), "{run}\n{}", platform.server_log());
    let second = machine_ids(&platform, "vmvol")
        .into_iter()
        .find(|m| *m != id)
        .expect("the machine with the restored volume");
    let copy = in_machine_when_up(&platform, "vmvol", &second, "cat /data/kept");
    assert_eq!(copy.stdout.trim(), marker, "the restored volume: {copy}");
    assert!(
        platform
            .aloft(&["machine", "destroy", &second, "-a", "vmvol", "--force"])
            .ok()
    );
    assert!(
        platform
            .aloft(&["machine", "stop", &id, "-a", "vmvol"])
            .ok()
    );

    // --no-encryption: a plain ext4 image, where the data is readable.
    assert!(platform.aloft(&["apps", "create", "vmplain"]).ok());
    let create = platform.aloft(&[
        "volumes",
        "create",
        "data",
        "--size",
        "1",
        "--no-encryption",
        "-a",
        "vmplain",
        "-y",
    ]);
    assert!(create.ok(), "{create}\n{}", platform.server_log());
    let plain_marker = format!("vmplain-marker-{}", std::process::id());
    let image = write_stop_start_read(&platform, "vmplain", &plain_marker);
    assert_eq!(
        &head(&image, 1082)[1080..],
        &[0x53, 0xef],
        "a plain ext4 image"
    );
    assert!(
        file_contains(&image, plain_marker.as_bytes()),
        "the probe finds plaintext in an unencrypted volume"
    );
}

/// Parses guest-io's line: write MB/s, read MB/s, fsync p50 and p99 (us).
fn guest_figures(run: &Run) -> Option<[f64; 4]> {
    let words: Vec<f64> = run
        .stdout
        .split_whitespace()
        .take(4)
        .filter_map(|w| w.parse().ok())
        .collect();
    words.try_into().ok()
}

/// The microVM figures of bench/volumes (run by bench/volumes/run.sh, not by `cargo
/// test`): bench/volumes/guest-io.rs, built static and put into a busybox image, measures
/// inside one microVM (QEMU, TCG here) its own root disk (a qcow2 overlay, `cache=unsafe`)
/// and its volume (encrypted: LUKS in QEMU), and inside a second one a `--no-encryption`
/// volume. `ALOFT_BENCH_GUEST_IO` names the binary; `SIZE_MB`, `FSYNCS`, `ROUNDS` as for
/// the host figures (best of the rounds, interleaved).
#[test]
#[ignore = "a benchmark: bench/volumes/run.sh runs it"]
fn bench_microvm_volume_io() {
    require_platform!();
    if let Some(reason) = common::missing_vm_prerequisite() {
        aloft_testkit::skip(format!("microVM bench: {reason}"));
        return;
    }
    let guest_io = std::env::var("ALOFT_BENCH_GUEST_IO").expect("ALOFT_BENCH_GUEST_IO");
    let env = |name: &str, default: usize| -> usize {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let size_mb = env("SIZE_MB", 128).min(512).to_string();
    let fsyncs = env("FSYNCS", 300).to_string();
    let rounds = env("ROUNDS", 2);
    let _lock = common::vm_lock();
    let platform = Platform::start_with(&["--driver", "microvm", "--vm-accel", "tcg"]);
    let mut machines = Vec::new();
    for (app, encrypted) in [("vmbench", true), ("vmbenchplain", false)] {
        assert!(platform.aloft(&["apps", "create", app]).ok());
        if !encrypted {
            let create = platform.aloft(&[
                "volumes",
                "create",
                "data",
                "--size",
                "1",
                "--no-encryption",
                "-a",
                app,
                "-y",
            ]);
            assert!(create.ok(), "{create}");
        }
        let dir = idle_busybox_app(
            &platform,
            app,
            "\n[mounts]\n  source = \"data\"\n  destination = \"/data\"\n\n[[vm]]\n  memory = \"512mb\"\n",
        );
        std::fs::copy(&guest_io, dir.join("rootfs/bin/guest-io")).expect("guest-io");
        let deploy = platform.aloft_in(Some(&dir), &["deploy", "--ha=false"]);
        assert!(deploy.ok(), "{deploy}\n{}", platform.server_log());
        let id = machine_ids(&platform, app)[0].clone();
        assert!(in_machine_when_up(&platform, app, &id, "mkdir -p /bench").ok());
        machines.push((app, id));
    }
    let targets = [
        ("microVM root disk", 0, "/bench"),
        ("microVM vol, encr.", 0, "/data"),
        ("microVM vol, plain", 1, "/data"),
    ];
    let mut best: Vec<Option<[f64; 4]>> = vec![None; targets.len()];
    for _ in 0..rounds {
        for (i, (_, machine, path)) in targets.iter().enumerate() {
            let (app, id) = &machines[*machine];
            let run = platform.aloft(&[
                "machine",
                "exec",
                id,
                "-a",
                app,
                "--",
                "/bin/guest-io",
                path,
                &size_mb,
                &fsyncs,
            ]);
            let f = guest_figures(&run).unwrap_or_else(|| panic!("guest-io: {run}"));
            best[i] = Some(match best[i] {
                None => f,
                Some(b) => [
                    b[0].max(f[0]),
                    b[1].max(f[1]),
                    b[2].min(f[2]),
                    b[3].min(f[3]),
                ],
            });
        }
    }
    println!(
        "microVM (QEMU TCG, q35, virtio-blk): {size_mb} MB sequential, {fsyncs} x 4 KiB fdatasync, best of {rounds}; x = vs the microVM's root disk"
    );
    let base = best[0].unwrap_or([1.0; 4]);
    for ((name, _, _), figures) in targets.iter().zip(&best) {
        let Some(f) = figures else { continue };
        println!(
            "{:<20} {:>10.0} {:>10.0} {:>9.0}us {:>9.0}us {:>8.2} {:>8.2} {:>9.2}",
            name,
            f[0],
            f[1],
            f[2],
            f[3],
            f[0] / base[0],
            f[1] / base[1],
            f[3] / base[3],
        );
    }
}
