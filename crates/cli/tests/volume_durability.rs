//! Nothing on a volume is lost (issue 18 point 7), through `aloft server` and the CLI:
//! an app committing SQLite rows on its volume (examples/sqlite-writer, WAL,
//! synchronous=FULL) is killed with SIGKILL at random moments, its platform is killed
//! with kill -9, and the host's restart is simulated (platform stopped, its loop devices
//! detached); each time the database passes `PRAGMA integrity_check` and holds every row
//! the app acknowledged. A full host disk gives a clear error to `volumes create`, leaves
//! nothing half-made, and corrupts no volume.

mod common;

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::Duration;

use common::{Platform, machine_ids, machine_json, wait_until};
use rand::{Rng, SeedableRng};

/// An app whose image is examples/sqlite-writer alone, writing to its volume at /data.
fn writer_app(platform: &Platform, name: &str) -> PathBuf {
    let binary = common::sqlite_writer_binary();
    assert!(
        binary.exists(),
        "{} is missing: run `cargo build --workspace` first",
        binary.display()
    );
    let dir = platform.root.path().join(format!("app-{name}"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(&binary, dir.join("sqlite-writer")).expect("copying sqlite-writer");
    std::fs::write(
        dir.join("Dockerfile"),
        "FROM scratch\nCOPY sqlite-writer /sqlite-writer\nCMD [\"/sqlite-writer\"]\n",
    )
    .unwrap();
    common::write_fly_toml(
        &dir,
        name,
        "\n[mounts]\n  source = \"data\"\n  destination = \"/data\"\n",
    );
    dir
}

/// What `aloft logs -a APP` (following) printed, one file per follower: the platform's
/// kill -9 ends a follower, and a new one starts with the server.
struct Logs {
    app: String,
    dir: PathBuf,
    files: Vec<PathBuf>,
    follower: Option<Child>,
}

impl Logs {
    fn follow(platform: &Platform, app: &str) -> Self {
        let mut logs = Self {
            app: app.to_string(),
            dir: platform.root.path().to_path_buf(),
            files: Vec::new(),
            follower: None,
        };
        logs.restart(platform);
        logs
    }

    fn restart(&mut self, platform: &Platform) {
        self.stop();
        let file = self
            .dir
            .join(format!("logs-{}-{}.txt", self.app, self.files.len()));
        self.follower = Some(platform.spawn_aloft(&["logs", "-a", &self.app], &file));
        self.files.push(file);
    }

    fn stop(&mut self) {
        if let Some(mut follower) = self.follower.take() {
            let _ = follower.kill();
            let _ = follower.wait();
        }
    }

    /// The app's messages so far, in order, from every follower (repeats included: a new
    /// follower starts with the recent lines).
    fn messages(&self) -> Vec<String> {
        self.files
            .iter()
            .flat_map(|file| {
                std::fs::read_to_string(file)
                    .unwrap_or_default()
                    .lines()
                    .filter_map(|line| line.split_once(" [info] ").map(|(_, m)| m.to_string()))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// The writer's start lines (`writer up: integrity …, last id …`) seen so far.
    fn starts(&self) -> Vec<String> {
        let mut starts: Vec<String> = Vec::new();
        for message in self.messages() {
            if message.starts_with("writer up:") && !starts.contains(&message) {
                starts.push(message);
            }
        }
        starts
    }

    /// Every row id the writer acknowledged, in a sorted set.
    fn acknowledged(&self) -> std::collections::BTreeSet<i64> {
        self.messages()
            .iter()
            .filter_map(|m| m.strip_prefix("ack ")?.trim().parse().ok())
            .collect()
    }
}

impl Drop for Logs {
    fn drop(&mut self) {
        self.stop();
    }
}

fn state(platform: &Platform, app: &str, id: &str) -> String {
    machine_json(platform, app, id)["state"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Waits until the writer has started more than `before` times (its restart policy
/// brings it back; a machine that stays stopped is started).
fn wait_for_writer_start(platform: &Platform, logs: &Logs, app: &str, id: &str, before: usize) {
    wait_until("the writer to start again", Duration::from_secs(90), || {
        let starts = logs.starts();
        if starts.len() > before {
            return None;
        }
        let state = state(platform, app, id);
        if state == "stopped" {
            let _ = platform.aloft(&["machine", "start", id, "-a", app]);
        }
        Some(format!(
            "machine {state}; writer starts: {starts:?}\n{}",
            platform.server_log()
        ))
    });
}

/// `sqlite-writer check` in the machine: (integrity_check, id ranges, bad rows).
fn check_database(platform: &Platform, app: &str, id: &str) -> (String, Vec<(i64, i64)>, u64) {
    let mut last = None;
    for _ in 0..120 {
        let run = platform.aloft(&[
            "machine",
            "exec",
            id,
            "-a",
            app,
            "--",
            "/sqlite-writer",
            "check",
        ]);
        if run.ok() && run.stdout.contains("\nbad ") {
            let field = |name: &str| {
                run.stdout
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .unwrap_or_default()
                    .trim()
                    .to_string()
            };
            let ranges = field("ids ")
                .split(',')
                .filter(|r| !r.is_empty())
                .map(|r| {
                    let (a, b) = r.split_once('-').unwrap_or_else(|| panic!("{run}"));
                    (a.parse().unwrap(), b.parse().unwrap())
                })
                .collect();
            return (
                field("integrity "),
                ranges,
                field("bad ").parse().unwrap_or(u64::MAX),
            );
        }
        last = Some(run);
        std::thread::sleep(Duration::from_millis(500));
    }
    panic!(
        "sqlite-writer check never answered: {}\n{}",
        last.map(|r| r.to_string()).unwrap_or_default(),
        platform.server_log()
    );
}

/// Checks the database in the machine: intact, and holding every acknowledged row.
fn assert_nothing_lost(platform: &Platform, logs: &Logs, app: &str, id: &str, after: &str) {
    // The acknowledgements are read first: every row they name was committed before the
    // check's read begins.
    let acknowledged = logs.acknowledged();
    assert!(!acknowledged.is_empty(), "no row acknowledged {after}");
    let (integrity, ranges, bad) = check_database(platform, app, id);
    assert_eq!(integrity, "ok", "PRAGMA integrity_check {after}");
    assert_eq!(bad, 0, "rows whose payload changed {after}");
    let missing: Vec<i64> = acknowledged
        .iter()
        .copied()
        .filter(|row| !ranges.iter().any(|(a, b)| a <= row && row <= b))
        .collect();
    assert!(
        missing.is_empty(),
        "acknowledged rows missing {after}: {missing:?} (held: {ranges:?})"
    );
    println!(
        "{after}: integrity ok, {} acknowledged rows all held ({ranges:?})",
        acknowledged.len()
    );
}

#[test]
fn sqlite_on_a_volume_loses_no_acknowledged_row() {
    require_platform!();
    let seed: u64 = std::env::var("ALOFT_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("seed {seed} (ALOFT_TEST_SEED={seed} repeats this run's kill moments)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

    let mut platform = Platform::start_with(&["--driver", "container"]);
    let app = "sqlite";
    assert!(platform.aloft(&["apps", "create", app]).ok());
    let dir = writer_app(&platform, app);
    let deploy = platform.aloft_in(Some(&dir), &["deploy", "--ha=false"]);
    assert!(deploy.ok(), "{deploy}\n{}", platform.server_log());
    let machines = machine_ids(&platform, app);
    assert_eq!(machines.len(), 1, "{machines:?}");
    let id = machines[0].clone();
    let mut logs = Logs::follow(&platform, app);
    wait_for_writer_start(&platform, &logs, app, &id, 0);

    // SIGKILL of the machine at random moments: while it commits, or while it opens the
    // database and checks it after the previous kill.
    for round in 1..=6 {
        let before = logs.starts().len();
        let pause = rng.gen_range(0..2_000);
        std::thread::sleep(Duration::from_millis(pause));
        let kill = platform.aloft(&["machine", "kill", &id, "-a", app]);
        assert!(kill.ok(), "{kill}\n{}", platform.server_log());
        println!(
            "round {round}: killed the machine {pause} ms in, after ack {:?}",
            logs.acknowledged().last()
        );
        wait_for_writer_start(&platform, &logs, app, &id, before);
        let start = logs.starts().last().cloned().unwrap_or_default();
        assert!(
            start.starts_with("writer up: integrity ok,"),
            "after kill {round}: {start}"
        );
    }
    assert_nothing_lost(&platform, &logs, app, &id, "after SIGKILLs of the machine");

    // kill -9 of `aloft server` while the machine writes; it comes back with the server.
    let pause = rng.gen_range(0..2_000);
    std::thread::sleep(Duration::from_millis(pause));
    platform.kill_server();
    logs.stop();
    platform.restart_server();
    logs.restart(&platform);
    // And the machine killed once more, under the restarted server.
    let before = logs.starts().len();
    let kill = platform.aloft(&["machine", "kill", &id, "-a", app]);
    assert!(kill.ok(), "{kill}\n{}", platform.server_log());
    wait_for_writer_start(&platform, &logs, app, &id, before);
    assert_nothing_lost(
        &platform,
        &logs,
        app,
        &id,
        "after a kill -9 of aloft server",
    );

    // A host restart, simulated: the platform stops while the machine writes, every loop
    // device of its data dir is detached, and the platform starts again.
    let before = logs.starts().len();
    logs.stop();
    platform.stop();
    for device in common::loop_devices_under(&platform.data_dir()) {
        let detach = std::process::Command::new("losetup")
            .arg("-d")
            .arg(&device)
            .status()
            .expect("losetup");
        assert!(detach.success(), "losetup -d {}", device.display());
    }
    assert!(common::loop_devices_under(&platform.data_dir()).is_empty());
    platform.restart_server();
    logs.restart(&platform);
    wait_for_writer_start(&platform, &logs, app, &id, before);
    assert_nothing_lost(&platform, &logs, app, &id, "after a simulated host restart");
}

/// Bytes free on the filesystem holding `path`, root's reserve included.
fn free_bytes(path: &Path) -> u64 {
    let stat = nix::sys::statvfs::statvfs(path).expect("statvfs");
    stat.blocks_free() * stat.fragment_size()
}

/// Writes zeros to `path` until the filesystem has no block left; returns how many bytes
/// it took.
fn fill_filesystem(path: &Path) -> u64 {
    use std::io::Write;
    let mut file = std::fs::File::create(path).expect("the filler file");
    let mut written = 0u64;
    for chunk in [1 << 20, 4096, 512] {
        let zeros = vec![0u8; chunk];
        loop {
            match file.write_all(&zeros).and_then(|()| file.sync_data()) {
                Ok(()) => written += chunk as u64,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling {}: {e}", path.display()),
            }
        }
    }
    written
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("the volumes dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn a_full_host_disk_gives_clear_errors_and_corrupts_no_volume() {
    require_platform!();
    // The data dir on a disk of 1.5 GB: room for the platform, an image and a 1 GB volume.
    let mut platform = Platform::start_on_small_disk(1536, &["--driver", "container"]);
    let app = "full";
    assert!(platform.aloft(&["apps", "create", app]).ok());
    let dir = common::idle_busybox_app(
        &platform,
        app,
        "\n[mounts]\n  source = \"data\"\n  destination = \"/data\"\n",
    );
    let deploy = platform.aloft_in(Some(&dir), &["deploy", "--ha=false"]);
    assert!(deploy.ok(), "{deploy}\n{}", platform.server_log());
    let id = machine_ids(&platform, app)[0].clone();
    let volumes = common::volumes_json(&platform, app, false);
    assert_eq!(volumes.len(), 1, "{volumes:?}");
    let vol_id = volumes[0]["id"].as_str().unwrap_or_default().to_string();
    let volumes_dir = platform.data_dir().join("agent/volumes");
    let image = volumes_dir.join(format!("{vol_id}.ext4"));
    assert!(image.exists(), "{}", image.display());

    // Data written before the disk fills.
    let before = platform.machine_sh(
        app,
        &id,
        "echo kept > /data/kept && dd if=/dev/urandom of=/data/before bs=1M count=20 2>/dev/null \
         && sync && md5sum /data/before",
    );
    assert!(before.ok(), "{before}");
    let checksum = before.stdout.split_whitespace().next().unwrap().to_string();

    // The host's disk fills up (root's reserve included).
    let filler = platform.data_dir().join("filler");
    let filled = fill_filesystem(&filler);
    println!(
        "filled the host disk with {filled} bytes; {} left",
        free_bytes(&platform.data_dir())
    );

    // A new volume is refused with a clear message, and nothing of it is left.
    let files_before = files_in(&volumes_dir);
    let create = platform.aloft(&["volumes", "create", "more", "-a", app, "--size", "1", "-y"]);
    println!("volumes create on a full disk: {create}");
    assert!(!create.ok(), "{create}");
    assert!(
        !create.stderr.contains("panicked") && !platform.server_log().contains("panicked"),
        "{create}\n{}",
        platform.server_log()
    );
    assert!(
        create
            .stderr
            .contains("not enough space on this host for a 1 GB volume"),
        "the error says the host is out of space: {create}"
    );
    assert_eq!(common::volumes_json(&platform, app, true).len(), 1);
    assert_eq!(files_in(&volumes_dir), files_before, "no half-made volume");

    // Growing the volume is refused the same way; it keeps its size.
    let extend = platform.aloft(&["volumes", "extend", &vol_id, "-a", app, "-s", "2", "-y"]);
    println!("volumes extend on a full disk: {extend}");
    assert!(!extend.ok(), "{extend}");
    assert!(
        extend.stderr.contains(&format!(
            "not enough space on this host for volume {vol_id} to grow to 2 GB"
        )),
        "{extend}"
    );
    let volumes = common::volumes_json(&platform, app, false);
    assert_eq!(volumes[0]["size_gb"], 1, "{volumes:?}");
    assert_eq!(std::fs::metadata(&image).unwrap().len(), 1 << 30);

    // The machine writes to its volume: every byte lands (fsync says so), or it hears
    // ENOSPC; never an I/O error, never a write reported done and then lost.
    let write = platform.machine_sh(
        app,
        &id,
        "dd if=/dev/urandom of=/data/after bs=1M count=200 conv=fsync 2>&1; echo dd=$?; \
         md5sum /data/after",
    );
    println!("writing 200 MB to the volume on a full host: {write}");
    assert!(write.ok(), "{write}");
    let written = write.stdout.contains("dd=0\n");
    assert!(
        written || write.stdout.contains("No space left on device"),
        "the write either succeeds or fails with ENOSPC: {write}"
    );
    // The volume is still a working filesystem with room of its own (not remounted
    // read-only after the host refused its writes).
    let small = platform.machine_sh(
        app,
        &id,
        "echo still-writable > /data/small && sync && cat /data/small",
    );
    assert!(
        small.ok() && small.stdout.contains("still-writable"),
        "a small write to the volume after the host filled up: {small}"
    );
    let after = write
        .stdout
        .lines()
        .find(|l| l.ends_with("/data/after"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_default()
        .to_string();

    // Stopped, the volume's filesystem is clean.
    platform.stop();
    let fsck = std::process::Command::new("e2fsck")
        .args(["-f", "-n"])
        .arg(&image)
        .output()
        .expect("running e2fsck");
    let fsck = common::Run::from(fsck);
    assert!(fsck.ok(), "e2fsck -f -n of the volume: {fsck}");

    // With room again, the machine comes back with its earlier data intact.
    std::fs::remove_file(&filler).unwrap();
    platform.restart_server();
    let read = wait_for_sh(&platform, app, &id, "cat /data/kept && md5sum /data/before");
    assert!(
        read.stdout.contains("kept") && read.stdout.contains(&checksum),
        "earlier data after the disk was full: {read}\n(expected {checksum})"
    );
    if written {
        let read = platform.machine_sh(app, &id, "md5sum /data/after");
        assert!(
            read.stdout.contains(&after),
            "what dd wrote and fsync confirmed on a full host: {read}\n(expected {after})"
        );
    }
}

/// Runs `script` in the machine once it runs (after the platform's restart).
fn wait_for_sh(platform: &Platform, app: &str, id: &str, script: &str) -> common::Run {
    let mut run = platform.machine_sh(app, id, script);
    for _ in 0..120 {
        if run.ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
        run = platform.machine_sh(app, id, script);
    }
    run
}
