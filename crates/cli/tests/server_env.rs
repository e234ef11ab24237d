//! `aloft server` takes `ALOFT_SECRETS_ROOT_KEY` out of its environment before it starts
//! anything, so no process it starts (shims, runtimes, machines) inherits the key.

mod common;

use common::Platform;

/// Every process (but this one) whose environment holds `needle`, with its command line.
fn processes_with(needle: &str) -> Vec<String> {
    let me = std::process::id().to_string();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let pid = entry.file_name().to_string_lossy().into_owned();
        if pid == me || !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        if environ.split(|b| *b == 0).any(|v| v == needle.as_bytes()) {
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            found.push(format!(
                "{pid}: {}",
                String::from_utf8_lossy(&cmdline).replace('\0', " ")
            ));
        }
    }
    found
}

#[test]
fn the_secrets_root_key_is_not_in_the_environment_of_what_the_server_starts() {
    if let Some(reason) = common::missing_prerequisite() {
        aloft_testkit::skip(format!("platform test: {reason}"));
        return;
    }
    let value = "c2VjcmV0cy1yb290LWtleS1mb3ItYS10ZXN0LTAxMjM=";
    // SAFETY: the only test in this binary, and nothing else reads the environment yet.
    unsafe { std::env::set_var("ALOFT_SECRETS_ROOT_KEY", value) };
    let platform = Platform::start_with(&["--driver", "container"]);
    // SAFETY: as above; the server (and the deploy below) started with it, and took it out.
    unsafe { std::env::remove_var("ALOFT_SECRETS_ROOT_KEY") };
    assert!(platform.aloft(&["apps", "create", "hello"]).ok());
    let dir = platform.hello_app_dir("hello");
    let deploy = platform.aloft_in(Some(&dir), &["deploy", "--ha=false"]);
    assert!(deploy.ok(), "{deploy}\n{}", platform.server_log());
    let needle = format!("ALOFT_SECRETS_ROOT_KEY={value}");
    // The server's own /proc environ shows the environment it was started with; what
    // matters is that nothing it started has the key.
    let holders: Vec<String> = processes_with(&needle)
        .into_iter()
        .filter(|p| !p.contains(" server --data-dir") && !p.contains("nsenter"))
        .collect();
    assert!(holders.is_empty(), "processes with the key: {holders:#?}");
    let machines = platform.aloft(&["machine", "list", "-a", "hello", "-q"]);
    assert!(
        !machines.stdout.trim().is_empty(),
        "a machine runs: {machines}"
    );
}
