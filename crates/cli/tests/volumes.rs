//! Volumes are real (issue 18): each one an ext4 image on the host (0600, in a
//! directory closed to other users), mounted into the container at the mount's path.
//! Through `aloft server` and the CLI: a first deploy of an app with `[mounts]` makes its
//! volume; data on it survives machine restart, stop and start, a redeploy, a restart and
//! a kill -9 of the platform; its size is enforced; an attached volume can't be
//! destroyed; canary is refused. `aloft volumes` commands show the filesystem's real
//! counts; bad input (unknown volumes, sizes, regions, two machines on one volume, mount
//! paths over system directories) is refused naming the field, creating nothing.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{
    Platform, Run, idle_busybox_app, machine_ids, machine_json, volumes_json, write_fly_toml,
};

const GIB: u64 = 1024 * 1024 * 1024;

/// Runs `script` in the machine once it runs again (after a restart of the platform).
fn in_machine_when_up(platform: &Platform, app: &str, id: &str, script: &str) -> Run {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let run = platform.machine_sh(app, id, script);
        if run.ok() || Instant::now() > deadline {
            return run;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn assert_data(platform: &Platform, app: &str, id: &str, when: &str) {
    let read = in_machine_when_up(platform, app, id, "cat /data/kept");
    assert_eq!(
        read.stdout.trim(),
        "acknowledged",
        "the volume's file after {when}: {read}\n{}",
        platform.server_log()
    );
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

/// Waits until no loop device is backed by a file under `dir` and nothing under it is
/// mounted.
fn assert_released(dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let loops: Vec<String> = std::fs::read_dir("/sys/block")
            .unwrap()
            .flatten()
            .filter_map(|e| std::fs::read_to_string(e.path().join("loop/backing_file")).ok())
            .filter(|b| Path::new(b.trim()).starts_with(dir))
            .collect();
        let mounts: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|p| Path::new(p).starts_with(dir))
            .map(str::to_string)
            .collect();
        if loops.is_empty() && mounts.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "left after the platform stopped: loop devices {loops:?}, mounts {mounts:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_volume_keeps_its_data_and_its_size() {
    require_platform!();
    let mut platform = Platform::start_with(&["--driver", "container"]);
    assert!(platform.aloft(&["apps", "create", "vols"]).ok());
    let dir = idle_busybox_app(
        &platform,
        "vols",
        "\n[mounts]\n  source = \"data\"\n  destination = \"/data\"\n",
    );

    // The first deploy makes one volume per machine, 1 GB by default, as flyctl does.
    let deploy = platform.aloft_in(Some(&dir), &["deploy", "--ha=false"]);
    assert!(deploy.ok(), "{deploy}\n{}", platform.server_log());
    assert!(
        deploy
            .stdout
            .contains("Creating a 1 GB volume named 'data' for process group 'app'"),
        "{deploy}"
    );
    let machines = machine_ids(&platform, "vols");
    assert_eq!(machines.len(), 1, "{machines:?}");
    let id = machines[0].clone();
    let volumes = volumes_json(&platform, "vols", false);
    assert_eq!(volumes.len(), 1, "{volumes:?}");
    let volume = &volumes[0];
    let vol_id = volume["id"].as_str().unwrap_or_default().to_string();
    assert!(vol_id.starts_with("vol_"), "{volume}");
    assert_eq!(volume["attached_machine_id"], id.as_str(), "{volume}");
    assert_eq!(volume["size_gb"], 1);
    assert_eq!(volume["host_status"], "ok");
    assert_eq!(volume["state"], "created");
    let blocks = volume["blocks"].as_u64().unwrap_or(0);
    assert!(
        blocks * volume["block_size"].as_u64().unwrap_or(0) > GIB * 9 / 10,
        "the filesystem's own counts: {volume}"
    );
    assert!(volume["blocks_avail"].as_u64().unwrap_or(0) > blocks * 9 / 10);
    let config = machine_json(&platform, "vols", &id);
    assert_eq!(config["config"]["mounts"][0]["volume"], vol_id.as_str());
    assert_eq!(config["config"]["mounts"][0]["path"], "/data");

    // On the host: an image only root can reach, its blocks reserved on the host's disk.
    let volumes_dir = platform.data_dir().join("agent/volumes");
    let image = volumes_dir.join(format!("{vol_id}.ext4"));
    let meta = std::fs::metadata(&image).expect("the volume's image");
    assert_eq!(meta.len(), GIB);
    assert_eq!(meta.mode() & 0o777, 0o600);
    assert!(meta.blocks() * 512 >= GIB, "preallocated");
    assert_eq!(
        std::fs::metadata(&volumes_dir).unwrap().mode() & 0o777,
        0o700
    );

    let write = platform.machine_sh(
        "vols",
        &id,
        "mkdir -p /data && echo acknowledged > /data/kept && sync && cat /data/kept",
    );
    assert!(
        write.ok() && write.stdout.contains("acknowledged"),
        "{write}"
    );

    let restart = platform.aloft(&["machine", "restart", &id, "-a", "vols"]);
    assert!(restart.ok(), "{restart}");
    assert_data(&platform, "vols", &id, "a machine restart");

    assert!(platform.aloft(&["machine", "stop", &id, "-a", "vols"]).ok());
    assert!(
        platform
            .aloft(&["machine", "start", &id, "-a", "vols"])
            .ok()
    );
    assert_data(&platform, "vols", &id, "stop and start");

    // A redeploy updates the machine in place and keeps its volume.
    let deploy = platform.aloft_in(Some(&dir), &["deploy", "--ha=false"]);
    assert!(deploy.ok(), "{deploy}\n{}", platform.server_log());
    assert_eq!(machine_ids(&platform, "vols"), vec![id.clone()]);
    assert_eq!(volumes_json(&platform, "vols", false).len(), 1);
    assert_data(&platform, "vols", &id, "a redeploy");

    // Canary and bluegreen are refused for apps with volumes.
    for strategy in ["canary", "bluegreen"] {
        let refused = platform.aloft_in(Some(&dir), &["deploy", "--strategy", strategy]);
        assert!(!refused.ok(), "{refused}");
        assert!(
            refused.stderr.contains(&format!(
                "{strategy} deployment strategy is not supported when using mounted volumes"
            )),
            "{refused}"
        );
    }

    // A stopped platform holds no mount or loop device (as after a host reboot); the
    // next start mounts the volume again.
    platform.stop();
    assert_released(&platform.data_dir());
    // Encrypted at rest: the image holds no plaintext of what the machine wrote.
    assert!(
        !file_contains(&image, b"acknowledged"),
        "the volume's image holds the machine's data in plain text"
    );
    platform.restart_server();
    assert_data(&platform, "vols", &id, "a restart of aloft server");
    platform.kill_server();
    platform.restart_server();
    assert_data(&platform, "vols", &id, "a kill -9 of aloft server");

    // The size is enforced inside the machine; the host holds no more than the image.
    let fill = platform.machine_sh(
        "vols",
        &id,
        "dd if=/dev/zero of=/data/big bs=1M count=1500 2>&1; echo rc=$?",
    );
    assert!(
        fill.stdout.contains("No space left on device") && !fill.stdout.contains("rc=0"),
        "writing 1500 MB into a 1 GB volume runs out of space: {fill}"
    );
    let meta = std::fs::metadata(&image).unwrap();
    assert_eq!(meta.len(), GIB, "the image did not grow");
    // Its preallocated blocks, and the host's extent tree for them (a block or so).
    assert!(meta.blocks() * 512 <= GIB + (1 << 20), "{}", meta.blocks());
    let status = platform.aloft(&["machine", "status", &id, "-a", "vols"]);
    assert!(status.stdout.contains("started"), "{status}");
    assert!(platform.machine_sh("vols", &id, "rm /data/big").ok());
    assert_data(&platform, "vols", &id, "filling the volume");
    // ext4 counts a deleted file's blocks free once its journal commits (every 5 s).
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let free = volumes_json(&platform, "vols", false)[0]["blocks_free"]
            .as_u64()
            .unwrap_or(0);
        if free > blocks / 2 {
            break;
        }
        assert!(Instant::now() < deadline, "blocks_free stays at {free}");
        std::thread::sleep(Duration::from_millis(500));
    }

    // Scaling out gives the new machine a volume of its own; scaling in keeps its data.
    let scale = platform.aloft_in(Some(&dir), &["scale", "count", "2", "-y"]);
    assert!(scale.ok(), "{scale}\n{}", platform.server_log());
    let machines = machine_ids(&platform, "vols");
    assert_eq!(machines.len(), 2, "{scale}");
    let volumes = volumes_json(&platform, "vols", false);
    assert_eq!(volumes.len(), 2, "{volumes:?}");
    let attached: Vec<&str> = volumes
        .iter()
        .filter_map(|v| v["attached_machine_id"].as_str())
        .collect();
    assert_eq!(attached.len(), 2, "each machine has its own: {volumes:?}");
    assert!(
        volumes
            .iter()
            .all(|v| v["name"] == "data" && v["size_gb"] == 1)
    );
    let scale = platform.aloft_in(Some(&dir), &["scale", "count", "1", "-y"]);
    assert!(scale.ok(), "{scale}");
    assert_eq!(machine_ids(&platform, "vols"), vec![id.clone()]);
    assert_eq!(
        volumes_json(&platform, "vols", false).len(),
        2,
        "scaling in destroys no volume"
    );
    assert_data(&platform, "vols", &id, "scaling out and in");

    // An attached volume can't be destroyed; once its machine is gone, it can.
    let refused = platform.aloft(&["volumes", "destroy", &vol_id, "-a", "vols", "-y"]);
    assert!(!refused.ok(), "{refused}");
    assert!(refused.stderr.contains("attached to machine"), "{refused}");
    assert!(image.exists());
    let destroy = platform.aloft(&["machine", "destroy", &id, "-a", "vols", "--force"]);
    assert!(destroy.ok(), "{destroy}");
    let volumes = volumes_json(&platform, "vols", false);
    assert!(volumes[0]["attached_machine_id"].is_null(), "{volumes:?}");
    let destroyed = platform.aloft(&["volumes", "destroy", &vol_id, "-a", "vols", "-y"]);
    assert!(destroyed.ok(), "{destroyed}\n{}", platform.server_log());
    assert!(
        destroyed
            .stdout
            .contains(&format!("Destroyed volume ID: {vol_id} name: data")),
        "{destroyed}"
    );
    assert!(!image.exists(), "the disk is gone with the volume");
    assert!(
        volumes_json(&platform, "vols", false)
            .iter()
            .all(|v| v["id"] != vol_id.as_str())
    );
    let all = volumes_json(&platform, "vols", true);
    let gone = all.iter().find(|v| v["id"] == vol_id.as_str());
    assert_eq!(gone.map(|v| v["state"].clone()), Some("destroyed".into()));
}

#[test]
fn volume_commands_and_bad_input() {
    require_platform!();
    let platform = Platform::start_with(&["--driver", "container"]);
    assert!(platform.aloft(&["apps", "create", "volcli"]).ok());
    let dir = idle_busybox_app(&platform, "volcli", "");
    let deploy = platform.aloft_in(Some(&dir), &["deploy", "--ha=false"]);
    assert!(deploy.ok(), "{deploy}\n{}", platform.server_log());
    let first = machine_ids(&platform, "volcli");
    let image = machine_json(&platform, "volcli", &first[0])["config"]["image"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(!image.is_empty());

    let create = platform.aloft(&[
        "volumes", "create", "data", "-a", "volcli", "--size", "1", "-y", "--json",
    ]);
    assert!(create.ok(), "{create}\n{}", platform.server_log());
    let volume: serde_json::Value = serde_json::from_str(&create.stdout).unwrap();
    let vol_id = volume["id"].as_str().unwrap().to_string();
    assert_eq!(volume["region"], "local");
    assert_eq!(volume["encrypted"], true);
    assert!(volume["blocks"].as_u64().unwrap_or(0) > 200_000, "{volume}");

    let plain = platform.aloft(&[
        "volumes",
        "create",
        "plain",
        "-a",
        "volcli",
        "--no-encryption",
        "-y",
        "--json",
    ]);
    assert!(plain.ok(), "{plain}");
    let plain: serde_json::Value = serde_json::from_str(&plain.stdout).unwrap();
    assert_eq!(plain["encrypted"], false);
    let plain_id = plain["id"].as_str().unwrap().to_string();
    assert!(
        platform
            .aloft(&["volumes", "destroy", &plain_id, "-a", "volcli", "-y"])
            .ok()
    );

    // Bad input is refused naming the field, and nothing is created.
    let volumes_dir = platform.data_dir().join("agent/volumes");
    let images = || {
        std::fs::read_dir(&volumes_dir)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".ext4"))
            .count()
    };
    assert_eq!(images(), 1);
    for (args, field) in [
        (vec!["--size", "0"], "size_gb"),
        (vec!["--size", "100000"], "size_gb"),
        (vec!["--region", "nowhere"], "region"),
        (vec!["--snapshot-id", "vs_123"], "snapshot_id"),
    ] {
        let mut command = vec!["volumes", "create", "data", "-a", "volcli", "-y"];
        command.extend(args);
        let refused = platform.aloft(&command);
        assert!(!refused.ok(), "{refused}");
        assert!(refused.stderr.contains(field), "names {field}: {refused}");
    }
    let refused = platform.aloft(&["volumes", "create", "Bad-Name", "-a", "volcli", "-y"]);
    assert!(refused.stderr.contains("invalid name"), "{refused}");
    assert_eq!(images(), 1, "nothing was created half-way");
    assert_eq!(volumes_json(&platform, "volcli", false).len(), 1);

    let list = platform.aloft(&["volumes", "list", "-a", "volcli"]);
    assert!(list.ok(), "{list}");
    assert!(
        list.stdout.starts_with("ID")
            && list.stdout.contains("ATTACHED VM")
            && list.stdout.contains(&vol_id)
            && list.stdout.contains("1GB"),
        "{list}"
    );
    let show = platform.aloft(&["volumes", "show", &vol_id, "-a", "volcli"]);
    assert!(
        show.stdout
            .contains(&format!("                  ID: {vol_id}"))
            && show.stdout.contains("             Size GB: 1"),
        "{show}"
    );

    // Extending a volume no machine runs with grows its filesystem at once.
    let extend = platform.aloft(&["volumes", "extend", &vol_id, "-a", "volcli", "--size", "2"]);
    assert!(extend.ok(), "{extend}\n{}", platform.server_log());
    assert!(
        extend
            .stdout
            .contains("Your Machine got its volume size extended without needing a restart"),
        "{extend}"
    );
    let grown = volumes_json(&platform, "volcli", false);
    assert_eq!(grown[0]["size_gb"], 2);
    assert!(
        grown[0]["blocks"].as_u64().unwrap_or(0) > volume["blocks"].as_u64().unwrap() * 3 / 2,
        "{grown:?}"
    );
    let shrink = platform.aloft(&["volumes", "extend", &vol_id, "-a", "volcli", "--size", "1"]);
    assert!(
        !shrink.ok() && shrink.stderr.contains("size_gb"),
        "{shrink}"
    );

    // Mount paths that shadow / or a system directory.
    for path in ["/", "/proc", "/etc", "/dev/shm", "/a/../etc"] {
        let volume_flag = format!("{vol_id}:{path}");
        let refused =
            platform.aloft(&["machine", "run", &image, "-a", "volcli", "-v", &volume_flag]);
        assert!(!refused.ok(), "{refused}");
        assert!(
            refused.stderr.contains("config.mounts[0].path"),
            "names the field for {path}: {refused}"
        );
    }
    // Unknown volumes, by ID and by name.
    let refused = platform.aloft(&[
        "machine",
        "run",
        &image,
        "-a",
        "volcli",
        "-v",
        "vol_doesnotexist00:/data",
    ]);
    assert!(
        !refused.ok() && refused.stderr.contains("config.mounts[0].volume"),
        "{refused}"
    );
    let refused = platform.aloft(&["machine", "run", &image, "-a", "volcli", "-v", "nope:/data"]);
    assert!(
        !refused.ok() && refused.stderr.contains("nope"),
        "{refused}"
    );
    // A volume in another region than the machine asks for.
    let elsewhere = platform.aloft(&[
        "volumes", "create", "data", "-a", "volcli", "--region", "ams", "-y", "--json",
    ]);
    assert!(elsewhere.ok(), "{elsewhere}");
    let elsewhere: serde_json::Value = serde_json::from_str(&elsewhere.stdout).unwrap();
    let elsewhere_id = elsewhere["id"].as_str().unwrap().to_string();
    let volume_flag = format!("{elsewhere_id}:/data");
    let refused = platform.aloft(&[
        "machine",
        "run",
        &image,
        "-a",
        "volcli",
        "--region",
        "local",
        "-v",
        &volume_flag,
    ]);
    assert!(
        !refused.ok() && refused.stderr.contains("region") && refused.stderr.contains("ams"),
        "{refused}"
    );
    assert_eq!(
        machine_ids(&platform, "volcli").len(),
        1,
        "no machine was created"
    );

    // One machine per volume.
    let volume_flag = format!("{vol_id}:/data");
    let run = platform.aloft(&["machine", "run", &image, "-a", "volcli", "-v", &volume_flag]);
    assert!(run.ok(), "{run}\n{}", platform.server_log());
    let user = common::launched_machine_id(&run.stdout);
    let second = platform.aloft(&["machine", "run", &image, "-a", "volcli", "-v", &volume_flag]);
    assert!(!second.ok(), "{second}");
    assert!(
        second.stderr.contains("already attached to machine") && second.stderr.contains(&user),
        "{second}"
    );
    assert_eq!(machine_ids(&platform, "volcli").len(), 2);
    let df = platform.machine_sh("volcli", &user, "df -k /data | tail -n 1");
    assert!(df.ok(), "{df}");

    // Extending a volume its running machine uses: the size takes effect at its restart.
    let extend = platform.aloft(&["volumes", "extend", &vol_id, "-a", "volcli", "--size", "+1"]);
    assert!(extend.ok(), "{extend}\n{}", platform.server_log());
    assert!(extend.stdout.contains("Size GB: 3"), "{extend}");
    if extend
        .stdout
        .contains("You will need to stop and start your Machine")
    {
        assert!(
            platform
                .aloft(&["machine", "restart", &user, "-a", "volcli"])
                .ok()
        );
    }
    let df = platform.machine_sh("volcli", &user, "df -k /data | tail -n 1");
    let total_kb: u64 = df
        .stdout
        .split_whitespace()
        .nth(1)
        .and_then(|t| t.parse().ok())
        .unwrap_or(0);
    assert!(total_kb > 2 * 1024 * 1024 + 512 * 1024, "3 GB inside: {df}");

    // A snapshot (taken while the machine runs) restores into a new volume with the data.
    let write = platform.machine_sh("volcli", &user, "echo snapped > /data/snap && sync");
    assert!(write.ok(), "{write}");
    let snap = platform.aloft(&["volumes", "snapshots", "create", &vol_id, "-a", "volcli"]);
    assert!(
        snap.ok()
            && snap
                .stdout
                .contains(&format!("Scheduled to snapshot volume {vol_id}")),
        "{snap}\n{}",
        platform.server_log()
    );
    let listed = platform.aloft(&[
        "volumes",
        "snapshots",
        "list",
        &vol_id,
        "-a",
        "volcli",
        "--json",
    ]);
    assert!(listed.ok(), "{listed}");
    let listed: Vec<serde_json::Value> = serde_json::from_str(&listed.stdout).unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    let snapshot_id = listed[0]["id"].as_str().unwrap().to_string();
    assert!(listed[0]["size"].as_u64().unwrap_or(0) > 0);
    assert!(
        listed[0]["digest"]
            .as_str()
            .unwrap_or("")
            .starts_with("sha256:")
    );
    let table = platform.aloft(&["volumes", "snapshots", "list", &vol_id, "-a", "volcli"]);
    assert!(
        table.stdout.contains("STORED SIZE") && table.stdout.contains("Total stored size:"),
        "{table}"
    );
    let restored = platform.aloft(&[
        "volumes",
        "create",
        "restored",
        "-a",
        "volcli",
        "--snapshot-id",
        &snapshot_id,
        "-y",
        "--json",
    ]);
    assert!(restored.ok(), "{restored}\n{}", platform.server_log());
    let restored: serde_json::Value = serde_json::from_str(&restored.stdout).unwrap();
    assert_eq!(restored["encrypted"], true);
    assert_eq!(restored["size_gb"], 3);
    let volume_flag = format!("{}:/data", restored["id"].as_str().unwrap());
    let run = platform.aloft(&["machine", "run", &image, "-a", "volcli", "-v", &volume_flag]);
    assert!(run.ok(), "{run}\n{}", platform.server_log());
    let copy = common::launched_machine_id(&run.stdout);
    let read = platform.machine_sh("volcli", &copy, "cat /data/snap");
    assert_eq!(read.stdout.trim(), "snapped", "{read}");
    assert!(
        platform
            .aloft(&["machine", "destroy", &copy, "-a", "volcli", "--force"])
            .ok()
    );

    // A fork is an independent copy, made while the source is in use.
    let fork = platform.aloft(&[
        "volumes", "fork", &vol_id, "-a", "volcli", "--name", "forked", "--json",
    ]);
    assert!(fork.ok(), "{fork}\n{}", platform.server_log());
    let fork: serde_json::Value = serde_json::from_str(&fork.stdout).unwrap();
    assert_eq!(fork["name"], "forked");
    assert_ne!(fork["id"], vol_id.as_str());
    let volume_flag = format!("{}:/data", fork["id"].as_str().unwrap());
    let run = platform.aloft(&["machine", "run", &image, "-a", "volcli", "-v", &volume_flag]);
    assert!(run.ok(), "{run}\n{}", platform.server_log());
    let forked = common::launched_machine_id(&run.stdout);
    let read = platform.machine_sh(
        "volcli",
        &forked,
        "cat /data/snap && echo changed > /data/snap",
    );
    assert!(read.stdout.contains("snapped"), "{read}");
    let original = platform.machine_sh("volcli", &user, "cat /data/snap");
    assert_eq!(
        original.stdout.trim(),
        "snapped",
        "the source is untouched: {original}"
    );
    assert!(
        platform
            .aloft(&["machine", "destroy", &forked, "-a", "volcli", "--force"])
            .ok()
    );

    // `machine clone` gives the clone a volume of its own, as flyctl does: empty by
    // default, restored from the source volume's latest snapshot with
    // `--from-snapshot last`; the source's volume stays with the source.
    let clone_of = |extra: &[&str]| -> (String, String, Run) {
        let mut args = vec!["machine", "clone", user.as_str(), "-a", "volcli"];
        args.extend(extra);
        let run = platform.aloft(&args);
        assert!(run.ok(), "{run}\n{}", platform.server_log());
        let id = run
            .stdout
            .lines()
            .find_map(|l| l.strip_prefix("Machine has been cloned: "))
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("no clone id in {run}"))
            .to_string();
        let volume = machine_json(&platform, "volcli", &id)["config"]["mounts"][0]["volume"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(!volume.is_empty() && volume != vol_id, "{run}");
        (id, volume, run)
    };
    let (empty_clone, empty_volume, run) = clone_of(&[]);
    assert!(
        run.stdout.contains("Volume 'data' will start empty"),
        "{run}"
    );
    let read = platform.machine_sh("volcli", &empty_clone, "ls /data/snap");
    assert!(!read.ok(), "a new volume starts empty: {read}");
    let (restored_clone, restored_volume, run) = clone_of(&["--from-snapshot", "last"]);
    assert!(
        run.stdout.contains(&format!(
            "Creating new volume from snapshot {snapshot_id} of {vol_id}"
        )),
        "{run}"
    );
    let read = platform.machine_sh("volcli", &restored_clone, "cat /data/snap");
    assert_eq!(read.stdout.trim(), "snapped", "{read}");
    let attach = platform.aloft(&[
        "machine",
        "clone",
        &user,
        "-a",
        "volcli",
        "--attach-volume",
        &vol_id,
    ]);
    assert!(!attach.ok(), "{attach}");
    assert!(
        attach
            .stderr
            .contains(&format!("volume {vol_id} is already attached to a machine")),
        "{attach}"
    );
    for (machine, volume) in [
        (empty_clone, empty_volume),
        (restored_clone, restored_volume),
    ] {
        let destroy = platform.aloft(&["machine", "destroy", &machine, "-a", "volcli", "--force"]);
        assert!(destroy.ok(), "{destroy}");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let gone = platform.aloft(&["volumes", "destroy", &volume, "-a", "volcli", "-y"]);
            if gone.ok() {
                break;
            }
            assert!(Instant::now() < deadline, "{gone}");
            std::thread::sleep(Duration::from_millis(250));
        }
    }
    assert_eq!(machine_ids(&platform, "volcli").len(), 2);

    // Unknown volume names in [mounts] on a later deploy.
    write_fly_toml(
        &dir,
        "volcli",
        "\n[mounts]\n  source = \"missing\"\n  destination = \"/data\"\n",
    );
    let refused = platform.aloft_in(Some(&dir), &["deploy", "--ha=false"]);
    assert!(!refused.ok(), "{refused}");
    assert!(
        refused
            .stderr
            .contains("Process group 'app' needs volumes with name 'missing'"),
        "{refused}"
    );
    assert_eq!(machine_ids(&platform, "volcli").len(), 2);

    // With a volume of that name, the machine without one is replaced by one with it.
    let extra = platform.aloft(&["volumes", "create", "extra", "-a", "volcli", "-y", "--json"]);
    assert!(extra.ok(), "{extra}");
    let extra: serde_json::Value = serde_json::from_str(&extra.stdout).unwrap();
    write_fly_toml(
        &dir,
        "volcli",
        "\n[mounts]\n  source = \"extra\"\n  destination = \"/data\"\n",
    );
    let deploy = platform.aloft_in(Some(&dir), &["deploy", "--ha=false"]);
    assert!(deploy.ok(), "{deploy}\n{}", platform.server_log());
    let machines = machine_ids(&platform, "volcli");
    assert_eq!(machines.len(), 2, "{deploy}");
    assert!(!machines.contains(&first[0]), "{deploy}");
    let mounted: Vec<String> = machines
        .iter()
        .map(|m| {
            machine_json(&platform, "volcli", m)["config"]["mounts"][0]["volume"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    assert!(
        mounted.contains(&extra["id"].as_str().unwrap().to_string()),
        "{mounted:?}"
    );
    assert!(mounted.contains(&vol_id), "{mounted:?}");

    // Destroying the app deletes its volumes' disks.
    let destroy = platform.aloft(&["apps", "destroy", "volcli", "-y"]);
    assert!(destroy.ok(), "{destroy}\n{}", platform.server_log());
    assert_eq!(images(), 0, "no disk is left behind");
}

#[test]
fn daily_snapshots_are_taken_and_expire() {
    require_platform!();
    // A day passes in 10 s.
    let platform =
        Platform::start_with(&["--driver", "container", "--schedule-time-scale", "8640"]);
    assert!(platform.aloft(&["apps", "create", "volsnap"]).ok());
    let create = |name: &str, extra: &[&str]| -> String {
        let mut args = vec!["volumes", "create", name, "-a", "volsnap", "-y", "--json"];
        args.extend(extra);
        let run = platform.aloft(&args);
        assert!(run.ok(), "{run}\n{}", platform.server_log());
        let volume: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
        volume["id"].as_str().unwrap().to_string()
    };
    let daily = create("daily", &["--snapshot-retention", "1"]);
    let manual = create("manual", &["--scheduled-snapshots=false"]);
    let snapshots = |volume: &str| -> Vec<String> {
        let run = platform.aloft(&[
            "volumes",
            "snapshots",
            "list",
            volume,
            "-a",
            "volsnap",
            "--json",
        ]);
        assert!(run.ok(), "{run}");
        let list: Vec<serde_json::Value> = serde_json::from_str(&run.stdout).unwrap();
        list.iter()
            .map(|s| s["id"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(40);
    let first = loop {
        if let Some(first) = snapshots(&daily).first().cloned() {
            break first;
        }
        assert!(
            Instant::now() < deadline,
            "no daily snapshot\n{}",
            platform.server_log()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let file = platform
        .data_dir()
        .join(format!("agent/volumes/snapshots/{first}.ext4.zst"));
    assert!(file.exists(), "{}", file.display());
    // Kept one (scaled) day, then gone, file and all, while newer ones keep coming.
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let now = snapshots(&daily);
        if !now.contains(&first) && !now.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "{first} never expired: {now:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(!file.exists());
    assert!(snapshots(&manual).is_empty(), "scheduled snapshots off");
}

#[test]
fn volumes_extend_themselves_past_their_threshold() {
    require_platform!();
    let platform = Platform::start_with(&["--driver", "container"]);
    assert!(platform.aloft(&["apps", "create", "volgrow"]).ok());
    let dir = idle_busybox_app(
        &platform,
        "volgrow",
        "\n[mounts]\n  source = \"data\"\n  destination = \"/data\"\n  auto_extend_size_threshold = 50\n  auto_extend_size_increment = \"1GB\"\n  auto_extend_size_limit = \"2GB\"\n",
    );
    let deploy = platform.aloft_in(Some(&dir), &["deploy", "--ha=false"]);
    assert!(deploy.ok(), "{deploy}\n{}", platform.server_log());
    let id = machine_ids(&platform, "volgrow")[0].clone();
    assert_eq!(volumes_json(&platform, "volgrow", false)[0]["size_gb"], 1);
    let fill = platform.machine_sh(
        "volgrow",
        &id,
        "dd if=/dev/zero of=/data/fill bs=1M count=600 2>&1 && sync; echo rc=$?",
    );
    assert!(fill.stdout.contains("rc=0"), "{fill}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while volumes_json(&platform, "volgrow", false)[0]["size_gb"] != 2 {
        assert!(
            Instant::now() < deadline,
            "the volume did not grow past 50 % use\n{}",
            platform.server_log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // The filesystem grows online where the host allows it, else at the next start.
    assert!(
        platform
            .aloft(&["machine", "restart", &id, "-a", "volgrow"])
            .ok()
    );
    let df = in_machine_when_up(&platform, "volgrow", &id, "df -k /data | tail -n 1");
    let total_kb: u64 = df
        .stdout
        .split_whitespace()
        .nth(1)
        .and_then(|t| t.parse().ok())
        .unwrap_or(0);
    assert!(total_kb > 1536 * 1024, "2 GB inside: {df}");
    // Never past the limit.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(volumes_json(&platform, "volgrow", false)[0]["size_gb"], 2);
    assert_eq!(
        platform
            .machine_sh("volgrow", &id, "ls /data/fill")
            .stdout
            .trim(),
        "/data/fill"
    );
}
