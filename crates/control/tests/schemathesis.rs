//! Schemathesis fuzzes every documented operation from `/openapi.json` with the admin
//! token: no answer may be a 5xx, and every answer must match the document (status code,
//! content type, body schema). Skips with a message when schemathesis is not installed
//! (scripts/setup.sh --test installs it with pip).

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{create_app, create_machine, start};
use serde_json::json;

fn schemathesis() -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("schemathesis"))
                .collect()
        })
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(PathBuf::from(home).join(".local/bin/schemathesis"));
    }
    candidates.into_iter().find(|c| {
        c.is_file()
            && Command::new(c)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_errors_and_no_schema_violations() {
    let Some(program) = schemathesis() else {
        aloft_testkit::skip(
            "the schemathesis run: `schemathesis` is not installed (scripts/setup.sh --test installs it with pip)",
        );
        return;
    };
    let h = start().await;
    // Something to find: an app with a machine, so not every answer is a 404.
    create_app(&h.admin, "fuzz").await;
    create_machine(&h.admin, "fuzz", json!({ "config": { "image": "nginx" } })).await;

    let url = h.url.clone();
    let token = h.admin_token.clone();
    let report = std::env::temp_dir().join("aloft-schemathesis.txt");
    let output = tokio::task::spawn_blocking(move || {
        Command::new(program)
            .args(["run", &format!("{url}/openapi.json"), "--url", &url])
            .args(["--header", &format!("Authorization: Bearer {token}")])
            .args(["--checks", "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"])
            // `wait` blocks for as long as it is asked to (up to 60 s a call) by design.
            .args(["--exclude-operation-id", "Machines_wait"])
            .args(["--max-examples", "10", "--seed", "4", "--request-timeout", "20", "--workers", "1"])
            .env("NO_COLOR", "1")
            .env("SCHEMATHESIS_TELEMETRY", "false")
            .output()
    })
    .await
    .expect("joining schemathesis")
    .expect("running schemathesis");
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let _ = std::fs::write(&report, &text);
    let failures = text.find("FAILURES").map(|at| &text[at..]).unwrap_or(&text);
    let tail: String = failures.lines().take(300).collect::<Vec<_>>().join("\n");
    assert!(
        output.status.success(),
        "schemathesis found problems:\n{tail}"
    );
    eprintln!(
        "{}",
        text.lines()
            .rev()
            .take(15)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n")
    );
}
