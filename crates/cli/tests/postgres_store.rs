//! `aloft server --database-url` keeps the control plane's state in PostgreSQL, given as
//! a URL or in libpq's keyword form, and a database it cannot reach is a clear error.
//! Needs ALOFT_TEST_POSTGRES_URL (scripts/test.sh starts PostgreSQL and sets it).

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{Platform, TestDatabase};

#[test]
fn the_server_keeps_its_state_in_postgresql_given_a_url_or_keyword_form() {
    require_platform!();
    let Some(database) = TestDatabase::create() else {
        eprintln!(
            "skipping: ALOFT_TEST_POSTGRES_URL is not set (scripts/test.sh starts PostgreSQL and sets it)"
        );
        return;
    };
    let (conninfo, url) = (database.conninfo(), database.url());
    // Keyword form first (host=… dbname=…).
    let mut platform = Platform::start_with(&["--database-url", &conninfo]);

    let created = platform.aloft(&["apps", "create", "pg-kept", "-o", "personal"]);
    assert!(created.ok(), "apps create: {created}");
    let stored = database.psql("SELECT name FROM apps ORDER BY name");
    assert_eq!(stored, "pg-kept", "the app is a row in PostgreSQL");

    // The URL form reaches the same database; what was written is still there.
    platform.restart_server_with(&["--database-url", &url]);
    let listed = platform.aloft(&["apps", "list"]);
    assert!(
        listed.ok() && listed.stdout.contains("pg-kept"),
        "apps list after a restart on the URL form: {listed}"
    );
    let created = platform.aloft(&["apps", "create", "pg-second", "-o", "personal"]);
    assert!(created.ok(), "apps create: {created}");
    assert_eq!(
        database.psql("SELECT name FROM apps ORDER BY name"),
        "pg-kept\npg-second"
    );
    assert!(
        !platform.server_log().contains("panicked"),
        "the server panicked:\n{}",
        platform.server_log()
    );

    // Back on the keyword form, passed as a flag this time.
    platform.restart_server_with(&["--database-url", &conninfo]);
    let listed = platform.aloft(&["apps", "list"]);
    assert!(
        listed.stdout.contains("pg-kept") && listed.stdout.contains("pg-second"),
        "apps list: {listed}"
    );
    platform.stop();

    // A database that is not there: the server exits at once, naming the flag, no panic.
    let other_dir = platform.root.path().join("other-data");
    let socket_dir = platform.root.path().join("no-postgres-here");
    std::fs::create_dir_all(&socket_dir).expect("socket dir");
    let missing = format!("host={} user=nobody dbname=nothing", socket_dir.display());
    let mut server = platform
        .in_netns(&common::aloft_binary())
        .arg("server")
        .arg("--data-dir")
        .arg(&other_dir)
        .args(["--database-url", &missing])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting aloft server");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = server.try_wait().expect("waiting for the server") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = server.kill();
            panic!("aloft server kept running with an unreachable --database-url");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(server.stderr.as_mut().expect("stderr"), &mut stderr)
        .expect("reading stderr");
    assert!(!status.success(), "exit status: {status}");
    assert!(
        stderr.contains("--database-url") && !stderr.contains("panicked"),
        "stderr: {stderr}"
    );
    assert!(
        stderr.contains("PostgreSQL"),
        "the keyword form must be taken for PostgreSQL, not a SQLite path: {stderr}"
    );
}
