//! `aloft dev cluster`, end to end: `up --hosts 3` in a network namespace the test makes
//! (the control plane on a bridge there, each host a namespace of its own on it); the CLI
//! of the same user talks to it without flags; `status --json` names every host's proxy;
//! a deploy spreads over the hosts and every host's proxy reaches every machine; `down`
//! removes everything `up` made.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{Run, aloft_binary, wait_until};
use serde_json::Value;

struct Cluster {
    netns: String,
    root: tempfile::TempDir,
    up: Option<Child>,
}

impl Cluster {
    fn start(hosts: u8) -> Self {
        let root = tempfile::tempdir().expect("a temp dir");
        let netns = format!("aloft-dct-{}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &netns])
            .stderr(Stdio::null())
            .status();
        assert!(
            Command::new("ip")
                .args(["netns", "add", &netns])
                .status()
                .unwrap()
                .success()
        );
        assert!(
            Command::new("ip")
                .args(["-n", &netns, "link", "set", "lo", "up"])
                .status()
                .unwrap()
                .success()
        );
        let mut cluster = Cluster {
            netns,
            root,
            up: None,
        };
        let log = std::fs::File::create(cluster.root.path().join("up.log")).unwrap();
        let up = cluster
            .command(aloft_binary())
            .args(["dev", "cluster", "up", "--hosts", &hosts.to_string()])
            .arg("--data-dir")
            .arg(cluster.data_dir())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting aloft dev cluster up");
        cluster.up = Some(up);
        cluster
    }

    fn data_dir(&self) -> PathBuf {
        self.root.path().join("data")
    }

    fn up_log(&self) -> String {
        std::fs::read_to_string(self.root.path().join("up.log")).unwrap_or_default()
    }

    /// `program` in the test's namespace, as the cluster's user.
    fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net=/run/netns/{}", self.netns))
            .arg(program)
            .env("HOME", self.root.path())
            .env_remove("ALOFT_API_URL")
            .env_remove("FLY_ACCESS_TOKEN")
            .env_remove("ALOFT_DATABASE_URL")
            .stdin(Stdio::null());
        command
    }

    fn aloft_in(&self, dir: Option<&Path>, args: &[&str]) -> Run {
        let mut command = self.command(aloft_binary());
        command.args(args);
        if let Some(dir) = dir {
            command.current_dir(dir);
        }
        Run::from(command.output().expect("running aloft"))
    }

    fn aloft(&self, args: &[&str]) -> Run {
        self.aloft_in(None, args)
    }

    fn status(&self) -> Value {
        let data_dir = self.data_dir();
        let run = self.aloft(&[
            "dev",
            "cluster",
            "status",
            "--data-dir",
            &data_dir.to_string_lossy(),
            "--json",
        ]);
        serde_json::from_str(&run.stdout).unwrap_or_default()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let data_dir = self.data_dir();
        let _ = self.aloft(&[
            "dev",
            "cluster",
            "down",
            "--data-dir",
            &data_dir.to_string_lossy(),
        ]);
        if let Some(mut up) = self.up.take() {
            let _ = up.kill();
            let _ = up.wait();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
        common::release_mounts_under(self.root.path());
    }
}

#[test]
fn a_cluster_of_three_hosts_serves_a_deploy_through_every_hosts_proxy_and_goes_away() {
    require_platform!();
    let mut cluster = Cluster::start(3);
    let mut status = Value::Null;
    wait_until("three hosts up", Duration::from_secs(180), || {
        status = cluster.status();
        let listed: Vec<Value> =
            serde_json::from_str(&cluster.aloft(&["hosts", "list", "--json"]).stdout)
                .unwrap_or_default();
        let up = listed.iter().filter(|h| h["status"] == "up").count();
        let ready = status["hosts"].as_array().is_some_and(|h| h.len() == 3)
            && cluster.up_log().contains("Aloft dev cluster is up");
        (up != 3 || !ready).then(|| format!("{status}\n{listed:?}\n{}", cluster.up_log()))
    });
    assert!(
        status["api_url"]
            .as_str()
            .is_some_and(|u| u.starts_with("http://10.213.")),
        "{status}"
    );
    let hosts = status["hosts"].as_array().unwrap().clone();
    for host in &hosts {
        assert_eq!(host["region"], "local", "{host}");
        assert!(
            host["id"].as_str().is_some_and(|id| !id.is_empty()),
            "{host}"
        );
        let netns = host["netns"].as_str().unwrap();
        assert!(Path::new("/run/netns").join(netns).exists(), "{host}");
    }
    // A second `up` on the same data dir is refused while this one runs.
    let data_dir = cluster.data_dir();
    let again = cluster.aloft(&[
        "dev",
        "cluster",
        "up",
        "--data-dir",
        &data_dir.to_string_lossy(),
    ]);
    assert!(
        !again.ok() && again.stderr.contains("already runs"),
        "{again}"
    );

    // A deploy through the CLI (no flags: the cluster's token was saved for this user),
    // three machines, one per host.
    assert!(cluster.aloft(&["apps", "create", "dc-a"]).ok());
    let dir = common::busybox_app_with(
        cluster.root.path(),
        "dc-a",
        "[http_service]\ninternal_port = 8080\nauto_stop_machines = \"off\"\n",
    );
    let deployed = cluster.aloft_in(Some(&dir), &["deploy", "--ha=false"]);
    assert!(deployed.ok(), "{deployed}\n{}", cluster.up_log());
    let scaled = cluster.aloft(&["scale", "count", "3", "-a", "dc-a", "-y"]);
    assert!(scaled.ok(), "{scaled}");
    let mut machines: Vec<String> = Vec::new();
    wait_until("three machines started", Duration::from_secs(120), || {
        let listed: Vec<Value> = serde_json::from_str(
            &cluster
                .aloft(&["machine", "list", "-a", "dc-a", "--json"])
                .stdout,
        )
        .unwrap_or_default();
        machines = listed
            .iter()
            .filter(|m| m["state"] == "started")
            .filter_map(|m| m["id"].as_str().map(String::from))
            .collect();
        (machines.len() != 3).then(|| format!("{listed:?}"))
    });
    for host in &hosts {
        let shown = cluster.aloft(&["hosts", "show", host["id"].as_str().unwrap(), "--json"]);
        let shown: Value = serde_json::from_str(&shown.stdout).unwrap_or_default();
        assert_eq!(
            shown["machine_ids"].as_array().map(Vec::len),
            Some(1),
            "one machine on each host: {shown}"
        );
    }

    // Every host's proxy reaches every machine.
    for host in &hosts {
        let proxy = host["proxy"].as_str().unwrap();
        for machine in &machines {
            let url = format!("http://{proxy}/cgi-bin/id");
            let force = format!("fly-force-instance-id: {machine}");
            let mut last = String::new();
            wait_until(
                &format!("{proxy} reaching {machine}"),
                Duration::from_secs(30),
                || {
                    let run = Run::from(
                        cluster
                            .command("curl")
                            .args(["-s", "--max-time", "20", "-H", "Host: dc-a.localhost"])
                            .args(["-H", &force, &url])
                            .output()
                            .unwrap(),
                    );
                    last = run.to_string();
                    (!run.stdout.contains(&format!("machine={machine}"))).then(|| last.clone())
                },
            );
        }
    }

    // `down` stops it all and removes what `up` made.
    let down = cluster.aloft(&[
        "dev",
        "cluster",
        "down",
        "--data-dir",
        &data_dir.to_string_lossy(),
    ]);
    assert!(down.ok(), "{down}\n{}", cluster.up_log());
    let mut up = cluster.up.take().unwrap();
    let exited = up.wait().unwrap();
    assert!(exited.success(), "{exited}\n{}", cluster.up_log());
    for host in &hosts {
        let netns = host["netns"].as_str().unwrap();
        assert!(!Path::new("/run/netns").join(netns).exists(), "{host}");
    }
    for machine in &machines {
        assert!(
            !Path::new(&format!("/run/netns/aloft-{machine}")).exists(),
            "machine {machine}'s namespace is left"
        );
    }
    let status = cluster.aloft(&[
        "dev",
        "cluster",
        "status",
        "--data-dir",
        &data_dir.to_string_lossy(),
    ]);
    assert!(
        !status.ok() && status.stderr.contains("no cluster"),
        "{status}"
    );
}
