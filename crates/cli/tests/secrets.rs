//! Secrets end to end: set/import/list/unset/deploy through the CLI, injection into the
//! example app (which echoes its environment), rollout as new releases, access rules, and
//! a search of everything on the host for a known secret value, which must turn up only
//! inside the machine.

mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use aloft_api::token::{Caveat, Token};
use base64::Engine;
use common::{Platform, Run};
use serde_json::Value;

/// `aloft` inside the platform's namespace with `stdin` fed in and, optionally, a token.
fn aloft_with(platform: &Platform, args: &[&str], stdin: &str, token: Option<&str>) -> Run {
    let mut command = Command::new("nsenter");
    command
        .arg(format!("--net=/run/netns/{}", platform.netns))
        .arg(common::aloft_binary())
        .args(args)
        .env("HOME", platform.home())
        .env_remove("ALOFT_API_URL")
        .env_remove("FLY_API_TOKEN")
        .env_remove("FLY_ACCESS_TOKEN")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(token) = token {
        command.env("FLY_ACCESS_TOKEN", token);
    }
    let mut child = command.spawn().expect("running aloft");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("writing stdin");
    let output = child.wait_with_output().expect("waiting for aloft");
    Run {
        status: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// `machine exec ... -- env` in the app's machine prints `line`.
fn assert_exec_sees(platform: &Platform, machine_id: &str, line: &str) {
    let exec = platform.aloft(&["machine", "exec", machine_id, "-a", "hello", "--", "env"]);
    assert!(exec.ok(), "{exec}\n{}", platform.server_log());
    assert!(
        exec.stdout.lines().any(|printed| printed == line),
        "machine exec has the app's secrets: {exec}"
    );
}

/// `aloft` inside the platform's namespace, left running.
fn aloft_spawn(platform: &Platform, args: &[&str]) -> std::process::Child {
    Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", platform.netns))
        .arg(common::aloft_binary())
        .args(args)
        .env("HOME", platform.home())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running aloft")
}

/// Whether a process of some machine runs `program`.
fn machine_runs(program: &str) -> bool {
    std::fs::read_dir("/proc").is_ok_and(|entries| {
        entries.flatten().any(|entry| {
            let pid = entry.file_name().to_string_lossy().into_owned();
            in_machine_cgroup(&pid)
                && std::fs::read(entry.path().join("cmdline"))
                    .is_ok_and(|line| line.split(|b| *b == 0).next() == Some(program.as_bytes()))
        })
    })
}

/// Puts busybox and the named applets into the app's image, next to the example app.
fn add_busybox(dir: &Path, applets: &[&str]) {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy("/bin/busybox", bin.join("busybox")).expect("busybox-static is installed");
    for applet in applets {
        std::os::unix::fs::symlink("busybox", bin.join(applet)).unwrap();
    }
    std::fs::write(
        dir.join("Dockerfile"),
        "FROM scratch\nCOPY bin /bin\nCOPY hello /hello\nCMD [\"/hello\"]\n",
    )
    .unwrap();
}

fn app_env(platform: &Platform) -> Value {
    let response = platform.curl(&["-H", "Host: hello.localhost", "http://127.0.0.1:8080/"]);
    let document: Value = serde_json::from_str(&response.stdout)
        .unwrap_or_else(|e| panic!("{e}: {response}\n{}", platform.server_log()));
    document["env"].clone()
}

fn api(platform: &Platform, token: &str, method: &str, path: &str, body: Option<&str>) -> Run {
    let mut args = vec![
        "-X".to_string(),
        method.to_string(),
        "-w".to_string(),
        "\n%{http_code}".to_string(),
        "-H".to_string(),
        format!("Authorization: Bearer {token}"),
    ];
    if let Some(body) = body {
        args.extend([
            "-H".into(),
            "Content-Type: application/json".into(),
            "--data-binary".into(),
            body.into(),
        ]);
    }
    args.push(format!("http://127.0.0.1:4280{path}"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    platform.curl(&args)
}

fn status_of(run: &Run) -> &str {
    run.stdout.lines().last().unwrap_or_default()
}

fn random_marker(prefix: &str) -> String {
    let mut bytes = [0u8; 24];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut bytes);
    format!("{prefix}{}", hex::encode(bytes))
}

/// Every file under `root` whose bytes contain `needle`, by `grep -r` (which reads
/// binary files and VM disk images too, and skips sockets, FIFOs and devices).
fn files_containing(root: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let needle = std::str::from_utf8(needle).expect("test needles are text");
    let output = Command::new("grep")
        .args(["-r", "-l", "-s", "-F", "--devices=skip", "-e", needle])
        .arg(root)
        .output()
        .expect("running grep");
    // 0: found, 1: nothing found; 2 (trouble) still lists what it found.
    assert!(
        output.status.code().is_some_and(|c| c <= 2),
        "grep failed: {output:?}"
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(PathBuf::from)
        .collect()
}

/// Each machine of `hello` with its state and version (which any update changes).
fn machine_versions(platform: &Platform, token: &str) -> Vec<(String, String, String)> {
    let run = api(platform, token, "GET", "/v1/apps/hello/machines", None);
    let (body, status) = run.stdout.rsplit_once('\n').unwrap_or_default();
    assert_eq!(status, "200", "{run}");
    let machines: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {run}"));
    let mut versions: Vec<(String, String, String)> = machines
        .as_array()
        .expect("a list of machines")
        .iter()
        .map(|m| {
            let field = |name: &str| m[name].as_str().unwrap_or_default().to_string();
            (field("id"), field("state"), field("instance_id"))
        })
        .collect();
    versions.sort();
    assert!(!versions.is_empty(), "{run}");
    versions
}

/// The sealed values in the control plane's database, as stored.
fn stored_ciphertexts(platform: &Platform) -> Vec<(String, Vec<u8>)> {
    let db =
        rusqlite::Connection::open(platform.data_dir().join("control.db")).expect("control.db");
    let mut stmt = db
        .prepare("SELECT name, ciphertext FROM secret_values ORDER BY name")
        .expect("the vault's table");
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .expect("reading secret_values")
        .collect::<Result<_, _>>()
        .expect("reading secret_values")
}

fn in_machine_cgroup(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup")).is_ok_and(|c| c.contains("/aloft/"))
}

/// Processes whose command line has `needle`, and non-machine processes whose
/// environment has it.
fn processes_containing(needle: &[u8]) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let pid = entry.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let has = |file: &str| {
            std::fs::read(format!("/proc/{pid}/{file}"))
                .is_ok_and(|bytes| bytes.windows(needle.len()).any(|w| w == needle))
        };
        if has("cmdline") {
            found.push(format!("{pid} cmdline"));
        }
        if !in_machine_cgroup(&pid) && has("environ") {
            found.push(format!("{pid} environ"));
        }
    }
    found
}

#[test]
fn secrets_reach_only_the_apps_machines() {
    require_platform!();
    let mut platform = Platform::start();
    let marker = random_marker("SECRETMARK");
    let file_content = random_marker("FILEMARK");
    let file_b64 = base64::engine::general_purpose::STANDARD.encode(&file_content);

    assert!(platform.aloft(&["apps", "create", "hello"]).ok());
    let dir = platform.hello_app_dir("hello");
    add_busybox(&dir, &["env", "sleep"]);
    let mut config = std::fs::read_to_string(dir.join("fly.toml")).unwrap();
    config.push_str(
        "\n[[files]]\n  guest_path = \"/etc/app-secret\"\n  secret_name = \"FILE_SECRET\"\n",
    );
    std::fs::write(dir.join("fly.toml"), config).unwrap();

    // Before the first deploy: nothing to roll out to, the values wait for the deploy.
    let import = aloft_with(
        &platform,
        &["secrets", "import", "-a", "hello"],
        &format!(
            "# the app's secrets\nDATABASE_URL={marker}\nGREETING=\"from a\nsecret\"\nFILE_SECRET={file_b64}\n"
        ),
        None,
    );
    assert!(import.ok(), "{import}\n{}", platform.server_log());
    assert!(import.stdout.contains("has no machines yet"), "{import}");

    let deploy = platform.aloft_in(Some(&dir), &["deploy"]);
    assert!(deploy.ok(), "{deploy}\n{}", platform.server_log());

    let env = app_env(&platform);
    assert_eq!(
        env["DATABASE_URL"],
        marker.as_str(),
        "the secret is in the app's env"
    );
    assert_eq!(
        env["GREETING"], "from a\nsecret",
        "a secret overrides [env] of the same name, multi-line values intact"
    );
    let machine_id = env["FLY_MACHINE_ID"].as_str().unwrap().to_string();
    let machine_dir = platform.data_dir().join("agent/machines").join(&machine_id);
    let written = std::fs::read_to_string(machine_dir.join("rootfs/etc/app-secret"))
        .expect("the [[files]] secret is written in the machine");
    assert_eq!(written, file_content);

    // Commands run in the machine get the secrets as its main process did...
    assert_exec_sees(&platform, &machine_id, &format!("DATABASE_URL={marker}"));
    // ...and while one runs, no host process shows them (the runtime gets the command's
    // environment through a pipe, not its command line).
    let running = aloft_spawn(
        &platform,
        &[
            "machine",
            "exec",
            &machine_id,
            "-a",
            "hello",
            "--",
            "sleep",
            "3",
        ],
    );
    let mut seen_running = false;
    for _ in 0..40 {
        std::thread::sleep(std::time::Duration::from_millis(100));
        if machine_runs("sleep") {
            seen_running = true;
            break;
        }
    }
    let shown = processes_containing(marker.as_bytes());
    let finished = running.wait_with_output().expect("waiting for aloft");
    assert!(finished.status.success(), "{finished:?}");
    assert!(seen_running, "the exec'd sleep was seen running");
    assert!(
        shown.is_empty(),
        "processes show a secret during an exec: {shown:?}"
    );

    // list: names, digests, Deployed; no values.
    let list = platform.aloft(&["secrets", "list", "-a", "hello"]);
    assert!(list.ok(), "{list}");
    let lines: Vec<&str> = list.stdout.lines().collect();
    assert!(
        lines[0].starts_with("NAME") && lines[0].contains("DIGEST"),
        "{list}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("DATABASE_URL") && l.contains("Deployed")),
        "{list}"
    );
    let json = platform.aloft(&["secrets", "list", "-a", "hello", "--json"]);
    let listed: Value =
        serde_json::from_str(&json.stdout).unwrap_or_else(|e| panic!("{e}: {json}"));
    let names: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["DATABASE_URL", "FILE_SECRET", "GREETING"]);
    let digest = listed[0]["digest"].as_str().unwrap();
    assert_eq!(digest.len(), 32, "{json}");

    // set without --stage: a new release, and the machine has the value.
    let version_before = env["FLY_MACHINE_VERSION"].clone();
    let set = platform.aloft(&["secrets", "set", "-a", "hello", "API_KEY=k-123"]);
    assert!(set.ok(), "{set}\n{}", platform.server_log());
    assert!(set.stdout.contains("release v2"), "a new release: {set}");
    let env = app_env(&platform);
    assert_eq!(env["API_KEY"], "k-123");
    assert_ne!(env["FLY_MACHINE_VERSION"], version_before);

    // --stage stores only; `secrets deploy` rolls it out.
    let staged = platform.aloft(&["secrets", "set", "-a", "hello", "--stage", "LATER=soon"]);
    assert!(staged.ok() && staged.stdout.contains("staged"), "{staged}");
    assert!(app_env(&platform).get("LATER").is_none());
    let list = platform.aloft(&["secrets", "list", "-a", "hello"]);
    assert!(
        list.stdout
            .lines()
            .any(|l| l.starts_with("* LATER") && l.contains("Staged")),
        "{list}"
    );
    let deployed = platform.aloft(&["secrets", "deploy", "-a", "hello"]);
    assert!(
        deployed.ok() && deployed.stdout.contains("release v3"),
        "{deployed}"
    );
    assert_eq!(app_env(&platform)["LATER"], "soon");
    let list = platform.aloft(&["secrets", "list", "-a", "hello"]);
    assert!(
        list.stdout
            .lines()
            .any(|l| l.starts_with("LATER") && l.contains("Deployed")),
        "{list}"
    );

    // unset rolls out too.
    let unset = platform.aloft(&["secrets", "unset", "-a", "hello", "LATER"]);
    assert!(unset.ok(), "{unset}");
    assert!(app_env(&platform).get("LATER").is_none());

    // --detach returns at once; the rollout goes on and ends with every machine having it.
    let detached = platform.aloft(&["secrets", "set", "-a", "hello", "--detach", "LATER=again"]);
    assert!(
        detached.ok() && detached.stdout.contains("goes on on the server"),
        "{detached}"
    );
    let mut status = String::new();
    for _ in 0..600 {
        let json = platform.aloft(&["secrets", "list", "-a", "hello", "--json"]);
        let listed: Value = serde_json::from_str(&json.stdout).unwrap_or_default();
        status = listed
            .as_array()
            .and_then(|all| all.iter().find(|s| s["name"] == "LATER"))
            .map(|s| s["status"].as_str().unwrap_or_default().to_string())
            .unwrap_or_default();
        if status == "Deployed" {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert_eq!(status, "Deployed", "{}", platform.server_log());
    assert_eq!(app_env(&platform)["LATER"], "again");

    // A bad entry fails the batch, names itself, and stores nothing of it.
    let bad = platform.aloft(&["secrets", "set", "-a", "hello", "GOOD=1", "FLY_REGION=x"]);
    assert!(!bad.ok() && bad.stderr.contains("FLY_REGION"), "{bad}");
    let bad = platform.aloft(&["secrets", "set", "-a", "hello", "GOOD=1", "9BAD=x"]);
    assert!(!bad.ok() && bad.stderr.contains("9BAD"), "{bad}");
    let json = platform.aloft(&["secrets", "list", "-a", "hello", "--json"]);
    assert!(
        !json.stdout.contains("GOOD"),
        "nothing of a failed batch is stored: {json}"
    );

    // Access: read-only tokens get 403, tokens for other apps 404.
    let admin = platform.aloft(&["auth", "token"]).stdout.trim().to_string();
    let read_only = Token::decode(&admin)
        .unwrap()
        .attenuate(Caveat::ReadOnly)
        .encode();
    let other_app = Token::decode(&admin)
        .unwrap()
        .attenuate(Caveat::Apps(vec!["other".into()]))
        .encode();
    let run = api(&platform, &read_only, "GET", "/v1/apps/hello/secrets", None);
    assert_eq!(status_of(&run), "403", "{run}");
    let run = api(
        &platform,
        &read_only,
        "POST",
        "/v1/apps/hello/secrets",
        Some(r#"{"values":{"X":"1"}}"#),
    );
    assert_eq!(status_of(&run), "403", "{run}");
    let run = api(&platform, &other_app, "GET", "/v1/apps/hello/secrets", None);
    assert_eq!(status_of(&run), "404", "{run}");
    let run = api(
        &platform,
        &other_app,
        "POST",
        "/v1/apps/hello/secrets",
        Some(r#"{"values":{"X":"1"}}"#),
    );
    assert_eq!(status_of(&run), "404", "{run}");
    let refused = aloft_with(
        &platform,
        &["secrets", "list", "-a", "hello"],
        "",
        Some(&read_only),
    );
    assert!(
        !refused.ok() && refused.stderr.contains("deploy rights"),
        "{refused}"
    );
    // Users cannot fetch what agents fetch.
    let run = api(
        &platform,
        &admin,
        "GET",
        &format!("/v1/hosts/x/machines/{machine_id}/secrets"),
        None,
    );
    assert_eq!(status_of(&run), "403", "{run}");

    // Root key rotation: only the operator's admin token may, machines keep running, the
    // stored values stay the same ciphertexts and still open; the old key is gone.
    let key_file = platform.data_dir().join("secrets-root.key");
    let old_key = std::fs::read_to_string(&key_file).expect("the server made a root key");
    assert_eq!(
        std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let ciphertexts_before = stored_ciphertexts(&platform);
    assert_eq!(ciphertexts_before.len(), 5, "{ciphertexts_before:?}");
    for token in [&read_only, &other_app, &platform.host_token()] {
        let run = api(
            &platform,
            token,
            "POST",
            "/v1/secrets/rotate-key",
            Some("{}"),
        );
        assert_eq!(status_of(&run), "403", "{run}");
    }
    assert_eq!(std::fs::read_to_string(&key_file).unwrap(), old_key);
    let versions_before = machine_versions(&platform, &admin);
    let rotate = platform.aloft(&["secrets", "rotate-key"]);
    assert!(rotate.ok(), "{rotate}\n{}", platform.server_log());
    assert!(
        rotate.stdout.contains("Re-encrypted 1 app data key"),
        "{rotate}"
    );
    let new_key = std::fs::read_to_string(&key_file).unwrap();
    assert_ne!(new_key, old_key);
    assert_eq!(
        std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(stored_ciphertexts(&platform), ciphertexts_before);
    assert_eq!(
        machine_versions(&platform, &admin),
        versions_before,
        "rotation leaves running machines alone"
    );
    assert_eq!(app_env(&platform)["DATABASE_URL"], marker.as_str());
    // The agent's cached host key is stale now; the next start fetches it again.
    let set = platform.aloft(&["secrets", "set", "-a", "hello", "API_KEY=k-456"]);
    assert!(set.ok(), "{set}\n{}", platform.server_log());
    let env = app_env(&platform);
    assert_eq!(env["API_KEY"], "k-456");
    assert_eq!(env["DATABASE_URL"], marker.as_str());
    let old_key_files = files_containing(platform.root.path(), old_key.trim().as_bytes());
    assert!(
        old_key_files.is_empty(),
        "the old root key is kept somewhere: {old_key_files:?}"
    );

    // After a server restart (only the new key exists) the machine comes back, with its
    // secrets fetched again.
    let first_log = platform.server_log();
    platform.restart();
    let mut env = Value::Null;
    for _ in 0..100 {
        let response = platform.curl(&["-H", "Host: hello.localhost", "http://127.0.0.1:8080/"]);
        if let Ok(document) = serde_json::from_str::<Value>(&response.stdout) {
            env = document["env"].clone();
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert_eq!(
        env["DATABASE_URL"],
        marker.as_str(),
        "{}",
        platform.server_log()
    );

    // Everything the API shows about the app, as a deployer sees it.
    let mut answers = String::new();
    for path in [
        "/v1/apps/hello",
        "/v1/apps/hello/secrets",
        "/v1/apps/hello/machines",
        &format!("/v1/apps/hello/machines/{machine_id}"),
        &format!("/v1/apps/hello/machines/{machine_id}/events"),
        "/v1/apps/hello/releases",
    ] {
        let run = api(&platform, &admin, "GET", path, None);
        assert_eq!(status_of(&run), "200", "{path}: {run}");
        answers.push_str(&run.stdout);
    }

    // The search: the value is nowhere but inside the machine.
    for needle in [marker.as_str(), file_b64.as_str()] {
        assert!(
            !answers.contains(needle),
            "API answers hold a secret: {answers}"
        );
        assert!(
            !first_log.contains(needle) && !platform.server_log().contains(needle),
            "server log holds a secret"
        );
        let files = files_containing(platform.root.path(), needle.as_bytes());
        assert!(files.is_empty(), "files hold a secret: {files:?}");
        let processes = processes_containing(needle.as_bytes());
        assert!(
            processes.is_empty(),
            "processes show a secret: {processes:?}"
        );
    }
    // The file's decoded content exists only in the machine's own filesystem.
    let files = files_containing(platform.root.path(), file_content.as_bytes());
    assert!(
        !files.is_empty(),
        "the search finds the file the machine has"
    );
    let machines_dir = platform.data_dir().join("agent/machines");
    assert!(
        files.iter().all(|f| {
            let inside = f.strip_prefix(&machines_dir).ok();
            let layer = inside.and_then(|p| p.components().nth(1));
            // The machine's writable layer: its ext4 image, mounted at `layer/`.
            layer.is_some_and(|l| {
                ["upper", "rootfs", "layer", "layer.ext4"]
                    .contains(&l.as_os_str().to_string_lossy().as_ref())
            })
        }),
        "only machines' own filesystems hold the file: {files:?}"
    );
    // ...and the env value is in the machine's process, which proves the search can find it.
    let in_machine = std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
        let pid = e.file_name().to_string_lossy().into_owned();
        in_machine_cgroup(&pid)
            && std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|b| b.windows(marker.len()).any(|w| w == marker.as_bytes()))
    });
    assert!(
        in_machine,
        "the app's process has the secret in its environment"
    );
}

/// The same search for a microVM (QEMU under TCG here): the secrets reach the guest over
/// its agent channel, and no disk image, VM config, kernel command line, log or host
/// process holds them.
#[test]
fn secrets_reach_a_microvm_and_stay_off_the_host() {
    require_platform!();
    if let Some(reason) = common::missing_vm_prerequisite() {
        aloft_testkit::skip(format!("microVM test: {reason}"));
        return;
    }
    let _lock = common::vm_lock();
    let platform = Platform::start_with(&["--driver", "microvm", "--vm-accel", "tcg"]);
    let marker = random_marker("VMSECRETMARK");
    let file_content = random_marker("VMFILEMARK");
    let file_b64 = base64::engine::general_purpose::STANDARD.encode(&file_content);

    assert!(platform.aloft(&["apps", "create", "hello"]).ok());
    let dir = platform.hello_app_dir("hello");
    // busybox's cat and sync next to the app, to read the secret file inside the guest
    // and flush it to the VM's disk; env to see what commands get.
    add_busybox(&dir, &["cat", "sync", "env"]);
    let mut config = std::fs::read_to_string(dir.join("fly.toml")).unwrap();
    config.push_str(
        "\n[[files]]\n  guest_path = \"/etc/app-secret\"\n  secret_name = \"FILE_SECRET\"\n",
    );
    std::fs::write(dir.join("fly.toml"), config).unwrap();
    let import = aloft_with(
        &platform,
        &["secrets", "import", "-a", "hello", "--stage"],
        &format!("DATABASE_URL={marker}\nFILE_SECRET={file_b64}\n"),
        None,
    );
    assert!(import.ok(), "{import}\n{}", platform.server_log());

    let deploy = platform.aloft_in(Some(&dir), &["deploy", "--ha=false"]);
    assert!(deploy.ok(), "{deploy}\n{}", platform.server_log());
    let env = app_env(&platform);
    assert_eq!(env["DATABASE_URL"], marker.as_str(), "{env}");
    assert_eq!(
        env["GREETING"], "hello from aloft",
        "[env] without a secret of its name stays"
    );
    let machine_id = env["FLY_MACHINE_ID"].as_str().unwrap().to_string();
    let cat = platform.aloft(&[
        "machine",
        "exec",
        &machine_id,
        "-a",
        "hello",
        "--",
        "cat",
        "/etc/app-secret",
    ]);
    assert!(cat.ok(), "{cat}");
    assert_eq!(cat.stdout, file_content, "the [[files]] secret, decoded");
    let sync = platform.aloft(&["machine", "exec", &machine_id, "-a", "hello", "--", "sync"]);
    assert!(sync.ok(), "{sync}");
    assert_exec_sees(&platform, &machine_id, &format!("DATABASE_URL={marker}"));

    for needle in [marker.as_str(), file_b64.as_str()] {
        assert!(
            !platform.server_log().contains(needle),
            "server log holds a secret"
        );
        let files = files_containing(platform.root.path(), needle.as_bytes());
        assert!(files.is_empty(), "files hold a secret: {files:?}");
        let processes = processes_containing(needle.as_bytes());
        assert!(
            processes.is_empty(),
            "processes show a secret: {processes:?}"
        );
    }
    // The search reads the VM's disk: the decoded file the guest wrote is found there,
    // and only in the machine's own directory.
    let files = files_containing(platform.root.path(), file_content.as_bytes());
    let machine_dir = platform.data_dir().join("agent/machines").join(&machine_id);
    assert!(
        !files.is_empty() && files.iter().all(|f| f.starts_with(&machine_dir)),
        "{files:?}"
    );
}
