//! `[build.compose]`: the compose file next to fly.toml becomes the machine's containers,
//! and a broken compose file is reported with its name, the line and column, and the key.

use std::path::{Path, PathBuf};

use aloft_config::{MachineConfigOptions, Severity, load};

/// A fresh directory holding `fly.toml` and the given files.
fn project(test: &str, fly_toml: &str, files: &[(&str, &str)]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("aloft-compose-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("fly.toml"), fly_toml).unwrap();
    for (name, text) in files {
        std::fs::write(dir.join(name), text).unwrap();
    }
    dir
}

fn convert(dir: &Path) -> Result<aloft_api::MachineConfig, String> {
    let loaded = load(&dir.join("fly.toml")).map_err(|e| e.to_string())?;
    let opts = MachineConfigOptions {
        image: "registry.local/stack:deployment-7".to_string(),
        ..MachineConfigOptions::default()
    };
    loaded
        .config
        .to_machine_config("app", &opts)
        .map_err(|e| e.to_string())
}

const STACK: &str = r#"services:
  app:
    build: .
    command: ["./start.sh", "--port", "8080"]
    environment:
      APP_ENV: production
      WORKERS: 4
    depends_on:
      db:
        condition: service_healthy
      cache:
        condition: service_started
  db:
    image: postgres:16
    environment:
      - POSTGRES_PASSWORD=secret
      - FROM_HOST
    healthcheck:
      test: ["CMD-SHELL", "pg_isready -U postgres"]
      interval: 10s
      timeout: 5s
      start_period: 30s
      retries: 3
    restart: on-failure:2
    volumes:
      - pgdata:/var/lib/postgresql/data
  cache:
    image: redis:7
    entrypoint: redis-server --save ""
    stop_signal: SIGINT
    stop_grace_period: 20s
"#;

#[test]
fn autodetected_compose_file_becomes_the_containers() {
    let dir = project(
        "autodetect",
        "app = \"stack\"\n[build.compose]\n",
        &[("docker-compose.yml", STACK)],
    );
    let machine = convert(&dir).unwrap();
    let names: Vec<&str> = machine.containers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["app", "db", "cache"]);

    let app = &machine.containers[0];
    assert_eq!(app.image, "registry.local/stack:deployment-7");
    assert_eq!(app.cmd, ["./start.sh", "--port", "8080"]);
    assert_eq!(app.env["APP_ENV"], "production");
    assert_eq!(app.env["WORKERS"], "4");
    let deps: Vec<(&str, &str)> = app
        .depends_on
        .iter()
        .map(|d| (d.name.as_str(), d.condition.as_str()))
        .collect();
    assert_eq!(deps, [("db", "healthy"), ("cache", "started")]);

    let db = &machine.containers[1];
    assert_eq!(db.image, "postgres:16");
    assert_eq!(db.env.len(), 1, "{:?}", db.env);
    assert_eq!(db.env["POSTGRES_PASSWORD"], "secret");
    let check = &db.healthchecks[0];
    assert_eq!(
        check.exec.as_ref().unwrap().command,
        ["/bin/sh", "-c", "pg_isready -U postgres"]
    );
    assert_eq!(
        (
            check.interval,
            check.timeout,
            check.grace_period,
            check.failure_threshold
        ),
        (Some(10), Some(5), Some(30), Some(3))
    );
    let restart = db.restart.as_ref().unwrap();
    assert_eq!(
        (restart.policy, restart.max_retries),
        (aloft_api::RestartPolicy::OnFailure, Some(2))
    );

    let cache = &machine.containers[2];
    assert_eq!(cache.entrypoint, ["redis-server", "--save", ""]);
    let stop = cache.stop.as_ref().unwrap();
    assert_eq!(stop.signal.as_deref(), Some("SIGINT"));
    assert_eq!(stop.timeout.map(|t| t.to_string()).as_deref(), Some("20s"));

    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn compose_file_key_names_the_file_relative_to_fly_toml() {
    let dir = project(
        "file-key",
        "app = \"stack\"\n[build]\ncompose.file = \"deploy/stack.yaml\"\n",
        &[],
    );
    std::fs::create_dir_all(dir.join("deploy")).unwrap();
    std::fs::write(
        dir.join("deploy/stack.yaml"),
        "services:\n  web:\n    image: nginx:1.27\n",
    )
    .unwrap();
    let machine = convert(&dir).unwrap();
    assert_eq!(machine.containers.len(), 1);
    assert_eq!(machine.containers[0].image, "nginx:1.27");
    let _ = std::fs::remove_dir_all(dir);
}

fn compose_error(test: &str, compose: &str) -> (String, String) {
    let dir = project(
        test,
        "app = \"stack\"\n[build.compose]\nfile = \"compose.yaml\"\n",
        &[("compose.yaml", compose)],
    );
    let file = dir.join("compose.yaml").display().to_string();
    let error = convert(&dir).unwrap_err();
    let _ = std::fs::remove_dir_all(dir);
    (error, file)
}

#[test]
fn broken_compose_files_name_file_position_and_key() {
    let (error, file) = compose_error(
        "condition",
        "services:\n  app:\n    build: .\n    depends_on:\n      db:\n        condition: service_ready\n  db:\n    image: postgres\n",
    );
    assert_eq!(
        error,
        format!(
            "build.compose: {file}:6:9: services.app.depends_on.db.condition: unknown condition 'service_ready'; expected one of service_started, service_healthy, service_completed_successfully"
        )
    );

    let (error, file) = compose_error("no-image", "services:\n  web:\n    command: serve\n");
    assert_eq!(
        error,
        format!(
            "build.compose: {file}:2:3: services.web: has neither `image` nor `build`; every service needs one"
        )
    );

    let (error, _) = compose_error(
        "two-builds",
        "services:\n  a:\n    build: .\n  b:\n    build: ./b\n",
    );
    assert!(
        error.contains(":5:5: services.b.build: only one service may have `build` (services.a.build already does)"),
        "{error}"
    );

    let (error, _) = compose_error(
        "unknown-dependency",
        "services:\n  web:\n    image: nginx\n    depends_on: [db]\n",
    );
    assert!(
        error.contains("services.web.depends_on[0]: no service named 'db'; services are web"),
        "{error}"
    );

    let (error, _) = compose_error(
        "bad-duration",
        "services:\n  web:\n    image: nginx\n    healthcheck:\n      test: curl -f localhost\n      interval: ten\n",
    );
    assert!(
        error.contains("services.web.healthcheck.interval: time: invalid duration \"ten\""),
        "{error}"
    );

    let (error, file) = compose_error("syntax", "services:\n  web:\n    image: [nginx\n");
    assert!(
        error.starts_with(&format!("build.compose: {file}:")),
        "{error}"
    );
    assert!(error.contains("YAML syntax error"), "{error}");

    let (error, _) = compose_error("no-services", "version: \"3\"\n");
    assert!(
        error.contains("services: missing; a compose file needs at least one service"),
        "{error}"
    );
}

#[test]
fn validate_reports_a_broken_compose_file_and_warns_about_a_missing_one() {
    let dir = project(
        "validate-broken",
        "app = \"stack\"\n[build.compose]\n",
        &[(
            "compose.yaml",
            "services:\n  web:\n    restart: sometimes\n    image: x\n",
        )],
    );
    let loaded = load(&dir.join("fly.toml")).unwrap();
    let report = loaded.diagnostics(false);
    let d = report
        .iter()
        .find(|d| d.path == "build.compose")
        .unwrap_or_else(|| panic!("{report:#?}"));
    assert_eq!(d.severity, Severity::Error);
    assert!(
        d.message
            .contains("services.web.restart: unknown restart policy 'sometimes'"),
        "{d}"
    );
    let _ = std::fs::remove_dir_all(dir);

    let dir = project(
        "validate-missing",
        "app = \"stack\"\n[build.compose]\n",
        &[],
    );
    let loaded = load(&dir.join("fly.toml")).unwrap();
    let report = loaded.diagnostics(false);
    let d = report
        .iter()
        .find(|d| d.path == "build.compose")
        .unwrap_or_else(|| panic!("{report:#?}"));
    assert_eq!(d.severity, Severity::Warning);
    assert!(
        d.message.contains("no compose file next to the config"),
        "{d}"
    );
    let _ = std::fs::remove_dir_all(dir);
}
