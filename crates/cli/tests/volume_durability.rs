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
