//! Every write the control plane acknowledged survives `kill -9`: `aloft control` runs
//! under concurrent writes (apps, secrets, org tokens), is killed mid-load, restarts on
//! the same data dir, and every acknowledged write is checked. And a secrets root key
//! rotation cut short at any of its steps loses no secret.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aloft_client::Client;
use http::{Method, StatusCode};
use serde_json::json;

const WRITERS: usize = 8;
const KILL_AFTER_ACKS: usize = 600;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn spawn_control(root: &Path, port: u16) -> Child {
    spawn_control_failing_at(root, port, None)
}

/// `aloft control`, aborting at `failpoint` (an `ALOFT_FAILPOINT` value) when given.
fn spawn_control_failing_at(root: &Path, port: u16, failpoint: Option<&str>) -> Child {
    let log = std::fs::File::create(root.join(format!("control-{port}.log"))).expect("log file");
    let mut command = Command::new(env!("CARGO_BIN_EXE_aloft"));
    match failpoint {
        Some(step) => command.env("ALOFT_FAILPOINT", step),
        None => command.env_remove("ALOFT_FAILPOINT"),
    };
    command
        .args(["control", "--data-dir"])
        .arg(root.join("data"))
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env("HOME", root.join("home"))
        .env_remove("ALOFT_DATABASE_URL")
        .env_remove("XDG_CONFIG_HOME")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("starting aloft control")
}

fn admin_token(root: &Path) -> String {
    let text =
        std::fs::read_to_string(root.join("home/.config/aloft/config.toml")).unwrap_or_default();
    let settings: toml::Value =
        toml::from_str(&text).unwrap_or(toml::Value::Table(Default::default()));
    settings
        .get("access_token")
        .and_then(|t| t.as_str())
        .unwrap_or_default()
        .to_string()
}

async fn wait_until_up(root: &Path, port: u16) -> Client {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let token = admin_token(root);
        if !token.is_empty() {
            let client = Client::new(&format!("http://127.0.0.1:{port}"), Some(token))
                .with_timeout(Duration::from_secs(5));
            if client.get::<serde_json::Value>("/v1/apps").await.is_ok() {
                return client;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "aloft control did not come up; log:\n{}",
        std::fs::read_to_string(root.join(format!("control-{port}.log"))).unwrap_or_default()
    );
}

#[derive(Default)]
struct Acknowledged {
    apps: Vec<String>,
    secrets: Vec<(String, String)>,
    tokens: Vec<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kill_9() {
    let root = tempfile::tempdir().expect("temp dir");
    std::fs::create_dir_all(root.path().join("home")).expect("home");
    let port = free_port();
    let mut server = spawn_control(root.path(), port);
    let client = wait_until_up(root.path(), port).await;

    let acked = Arc::new(Mutex::new(Acknowledged::default()));
    let mut writers = Vec::new();
    for writer in 0..WRITERS {
        let client = client.clone();
        let acked = acked.clone();
        writers.push(tokio::spawn(async move {
            for i in 0..2000 {
                let name = format!("dur-{writer}-{i}");
                let Ok((status, _)) = client
                    .raw(
                        Method::POST,
                        "/v1/apps",
                        Some(
                            json!({ "app_name": name, "org_slug": "personal" })
                                .to_string()
                                .into_bytes(),
                        ),
                        &[],
                    )
                    .await
                else {
                    return;
                };
                if status != StatusCode::CREATED {
                    return;
                }
                acked.lock().unwrap().apps.push(name.clone());
                let secret = format!("value-{writer}-{i}");
                let body = json!({ "values": { "SECRET": secret } })
                    .to_string()
                    .into_bytes();
                let Ok((status, answer)) = client
                    .raw(
                        Method::POST,
                        &format!("/v1/apps/{name}/secrets"),
                        Some(body),
                        &[],
                    )
                    .await
                else {
                    return;
                };
                if status != StatusCode::OK {
                    return;
                }
                // The digest is keyed by the app's own data key: what the acknowledgement
                // said is what must be listed after the restart.
                let answer: serde_json::Value =
                    serde_json::from_slice(&answer).expect("secrets answer is JSON");
                let digest = answer["secrets"][0]["digest"]
                    .as_str()
                    .expect("the acknowledgement lists the secret's digest")
                    .to_string();
                assert!(!digest.is_empty() && !digest.contains(&secret));
                acked.lock().unwrap().secrets.push((name.clone(), digest));
                if i % 10 == 0 {
                    let body = json!({ "type": "readonly", "name": name })
                        .to_string()
                        .into_bytes();
                    let Ok((status, answer)) = client
                        .raw(Method::POST, "/v1/tokens", Some(body), &[])
                        .await
                    else {
                        return;
                    };
                    if status != StatusCode::CREATED {
                        return;
                    }
                    let answer: serde_json::Value =
                        serde_json::from_slice(&answer).unwrap_or_default();
                    acked
                        .lock()
                        .unwrap()
                        .tokens
                        .push(answer["token"].as_str().unwrap_or_default().to_string());
                }
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.lock().unwrap().apps.len() < KILL_AFTER_ACKS && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // SIGKILL while the writers are still sending.
    server.kill().expect("kill -9");
    server.wait().expect("reaping the server");
    for writer in writers {
        let _ = writer.await;
    }
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    assert!(
        acked.apps.len() >= KILL_AFTER_ACKS,
        "the load ran: {} apps acknowledged",
        acked.apps.len()
    );

    let port = free_port();
    let mut restarted = spawn_control(root.path(), port);
    let client = wait_until_up(root.path(), port).await;
    let list: serde_json::Value = client.get("/v1/apps").await.expect("listing apps");
    let stored: std::collections::HashSet<&str> = list["apps"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a["name"].as_str())
        .collect();
    let missing: Vec<&String> = acked
        .apps
        .iter()
        .filter(|a| !stored.contains(a.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged apps lost: {:?}",
        missing.len(),
        acked.apps.len(),
        &missing[..missing.len().min(10)]
    );
    for (app, acknowledged_digest) in &acked.secrets {
        let secrets: serde_json::Value = client
            .get(&format!("/v1/apps/{app}/secrets"))
            .await
            .expect("listing secrets");
        assert_eq!(
            secrets["secrets"][0]["digest"],
            json!(acknowledged_digest),
            "secret of {app}"
        );
    }
    for token in &acked.tokens {
        let reader = Client::new(&format!("http://127.0.0.1:{port}"), Some(token.clone()));
        reader
            .get::<serde_json::Value>("/v1/apps")
            .await
            .expect("an acknowledged token still works");
    }
    eprintln!(
        "{} apps, {} secrets, {} tokens acknowledged before kill -9; all present after restart",
        acked.apps.len(),
        acked.secrets.len(),
        acked.tokens.len()
    );
    let _ = restarted.kill();
    let _ = restarted.wait();
}

async fn call(
    client: &Client,
    method: Method,
    path: &str,
    body: serde_json::Value,
) -> serde_json::Value {
    let (status, bytes) = client
        .raw(method, path, Some(body.to_string().into_bytes()), &[])
        .await
        .unwrap_or_else(|e| panic!("{path}: {e}"));
    assert!(
        status.is_success(),
        "{path}: {status} {}",
        String::from_utf8_lossy(&bytes)
    );
    serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null)
}

/// `secrets rotate-key` aborted at each of its steps (`ALOFT_FAILPOINT`, as a crash there
/// would) leaves a control plane that starts with every secret of every app readable:
/// setting each secret to the value it has changes nothing, which takes its app's data key
/// opening and the value's digest matching. No key file is left beside the key, and the
/// next rotation works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_key_rotation_cut_short_at_any_step_loses_no_secret() {
    for step in [
        "rotate:after-new-key",
        "rotate:after-vault-commit",
        "rotate:after-old-kept",
        "rotate:after-key-swap",
    ] {
        let root = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let mut control = spawn_control_failing_at(root.path(), port, Some(step));
        let admin = wait_until_up(root.path(), port).await;
        let mut before = Vec::new();
        for app in ["alpha", "beta"] {
            call(
                &admin,
                Method::POST,
                "/v1/apps",
                json!({ "app_name": app, "org_slug": "personal" }),
            )
            .await;
            let values =
                json!({ "DATABASE_URL": format!("postgres://{app}"), "TOKEN": format!("t-{app}") });
            let listing = call(
                &admin,
                Method::POST,
                &format!("/v1/apps/{app}/secrets"),
                json!({ "values": values.clone() }),
            )
            .await;
            before.push((app, values, listing));
        }
        let rotation = admin
            .raw(
                Method::POST,
                "/v1/secrets/rotate-key",
                Some(b"{}".to_vec()),
                &[],
            )
            .await;
        assert!(
            !rotation
                .as_ref()
                .is_ok_and(|(status, _)| status.is_success()),
            "{step} aborts the rotation: {rotation:?}"
        );
        let exit = control.wait().expect("waiting for aloft control");
        assert!(!exit.success(), "{step}: {exit}");

        let port = free_port();
        let mut control = spawn_control(root.path(), port);
        let admin = wait_until_up(root.path(), port).await;
        for (app, values, listing) in &before {
            let again = call(
                &admin,
                Method::POST,
                &format!("/v1/apps/{app}/secrets"),
                json!({ "values": values }),
            )
            .await;
            assert_eq!(
                &again, listing,
                "{step}: the secrets of {app} after the restart"
            );
        }
        let data = root.path().join("data");
        for leftover in ["secrets-root.key.new", "secrets-root.key.old"] {
            assert!(!data.join(leftover).exists(), "{step}: {leftover} is left");
        }
        let rotated = call(&admin, Method::POST, "/v1/secrets/rotate-key", json!({})).await;
        assert_eq!(rotated["data_keys"], 2, "{step}: {rotated}");
        let _ = control.kill();
        let _ = control.wait();
    }
}
