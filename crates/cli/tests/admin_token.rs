//! The operator's way back: a revoked admin token stays revoked across restarts, and
//! `aloft admin token` (root only, reading the data dir) mints a new one.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aloft_client::Client;
use http::{Method, StatusCode};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn aloft(root: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_aloft"));
    command
        .env("HOME", root.join("home"))
        .env_remove("ALOFT_DATABASE_URL")
        .env_remove("ALOFT_DATA_DIR")
        .env_remove("ALOFT_API_URL")
        .env_remove("FLY_ACCESS_TOKEN")
        .env_remove("FLY_API_TOKEN")
        .env_remove("XDG_CONFIG_HOME");
    command
}

fn spawn_control(root: &Path, port: u16) -> Child {
    let log = std::fs::File::create(root.join("control.log")).expect("log file");
    aloft(root)
        .args(["control", "--data-dir"])
        .arg(root.join("data"))
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("starting aloft control")
}

fn saved_token(root: &Path) -> String {
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

async fn status(url: &str, token: &str) -> StatusCode {
    Client::new(url, Some(token.to_string()))
        .raw(Method::GET, "/v1/apps", None, &[])
        .await
        .map(|(status, _)| status)
        .unwrap_or(StatusCode::SERVICE_UNAVAILABLE)
}

/// Waits until the API answers at all (with any status).
async fn wait_until_up(url: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if status(url, "x").await != StatusCode::SERVICE_UNAVAILABLE {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("aloft control did not come up");
}

fn stop(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_admin_token_stays_revoked_and_root_mints_a_new_one() {
    if !nix::unistd::Uid::effective().is_root() {
        aloft_testkit::skip("needs root (aloft admin token is root-only)");
        return;
    }
    let root = tempfile::tempdir().expect("temp dir");
    std::fs::create_dir_all(root.path().join("home")).expect("home");
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let control = spawn_control(root.path(), port);
    wait_until_up(&url).await;
    let old = saved_token(root.path());
    assert_eq!(status(&url, &old).await, StatusCode::OK);
    let old_id = aloft_api::token::Token::decode(&old).unwrap().id;
    let revoke = aloft(root.path())
        .args(["--api-url", &url, "tokens", "revoke", &old_id])
        .output()
        .expect("aloft tokens revoke");
    assert!(revoke.status.success(), "{revoke:?}");
    assert_eq!(status(&url, &old).await, StatusCode::UNAUTHORIZED);

    stop(control);
    let control = spawn_control(root.path(), port);
    wait_until_up(&url).await;
    assert_eq!(
        status(&url, &old).await,
        StatusCode::UNAUTHORIZED,
        "still revoked"
    );
    assert_eq!(
        status(&url, &saved_token(root.path())).await,
        StatusCode::UNAUTHORIZED,
        "the token the restart saved is the revoked one"
    );

    let refused = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_aloft"))
        .args(["admin", "token", "--data-dir"])
        .arg(root.path().join("data"))
        .env("HOME", "/nonexistent")
        .output()
        .expect("setpriv");
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("must run as root"), "{stderr}");

    let minted = aloft(root.path())
        .args(["admin", "token", "--data-dir"])
        .arg(root.path().join("data"))
        .output()
        .expect("aloft admin token");
    assert!(minted.status.success(), "{minted:?}");
    let new = String::from_utf8_lossy(&minted.stdout).trim().to_string();
    assert_eq!(saved_token(root.path()), new, "saved to the CLI settings");
    assert_eq!(status(&url, &new).await, StatusCode::OK);
    let listed = aloft(root.path())
        .args(["--api-url", &url, "apps", "list"])
        .output()
        .expect("aloft apps list");
    assert!(listed.status.success(), "{listed:?}");

    stop(control);
    let control = spawn_control(root.path(), port);
    wait_until_up(&url).await;
    assert_eq!(status(&url, &new).await, StatusCode::OK, "after a restart");
    assert_eq!(status(&url, &old).await, StatusCode::UNAUTHORIZED);
    stop(control);
}
