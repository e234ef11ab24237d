//! `validate` reports every problem at once, each with path, position, expectation and
//! (where one exists) a suggestion.

use aloft_config::{Diagnostic, DiagnosticCode, Format, Severity, parse_str};

const BROKEN: &str = r#"app = "demo"
primary_region = "amss"
kill_signal = "SIGTREM"

[processes]
web = "bin/web"
worker = "bin/worker"

[deploy]
strategy = "rollin"

[http_service]
internal_port = 8080
processes = ["web"]

[[services]]
intenal_port = 9000
protocol = "tcp"
processes = ["wokrer"]

  [[services.ports]]
  port = 443
  handlers = ["tls", "htp"]

  [[services.ports]]
  port = 5432
  handlers = ["tls"]
  force_https = true

[[services]]
internal_port = 9001
protocol = "tpc"
processes = ["worker"]

[[vm]]
cpu_kind = "sharde"
processes = ["web"]

[[vm]]
cpu_kind = "performance"
cpus = 2
memory = "1gb"
processes = ["worker"]

[[mounts]]
source = "data"
destination = "/data"
processes = ["worker"]

[[mounts]]
source = "more"
destination = "/more"
processes = ["worker", "db"]

[[restart]]
policy = "sometimes"

[checks.health]
type = "htp"
port = 8080
interval = "1s"
processes = ["web"]
"#;

fn find<'a>(diagnostics: &'a [Diagnostic], path: &str, needle: &str) -> &'a Diagnostic {
    diagnostics
        .iter()
        .find(|d| d.path == path && d.to_string().contains(needle))
        .unwrap_or_else(|| {
            panic!(
                "no diagnostic at {path} containing {needle:?}; got:\n{}",
                list(diagnostics)
            )
        })
}

fn list(diagnostics: &[Diagnostic]) -> String {
    diagnostics
        .iter()
        .map(|d| format!("  {:?} {d}\n", d.severity))
        .collect()
}

#[test]
fn every_problem_is_reported_with_position_and_hint() {
    let loaded = parse_str(BROKEN, Format::Toml, "fly.toml").unwrap();
    assert!(
        loaded.config.load_errors().is_empty(),
        "{:?}",
        loaded.config.load_errors()
    );
    let all = loaded.diagnostics(false);
    let at = |d: &Diagnostic| (d.line, d.column);

    let d = find(&all, "services[0].intenal_port", "unknown key");
    assert_eq!(
        (d.severity, d.code),
        (Severity::Warning, DiagnosticCode::UnknownKey)
    );
    assert_eq!(at(d), (Some(17), Some(1)));
    assert_eq!(
        d.suggestion.as_deref(),
        Some("did you mean `internal_port`?")
    );

    let d = find(
        &all,
        "services[0].ports[0].handlers[1]",
        "unknown handler `htp`",
    );
    assert_eq!(
        d.expected.as_deref(),
        Some("one of http, tls, proxy_proto, pg_tls")
    );
    assert_eq!(d.suggestion.as_deref(), Some("did you mean `http`?"));
    assert_eq!(d.line, Some(23));
    assert_eq!(
        d.to_string(),
        "fly.toml:23:3: services[0].ports[0].handlers[1]: unknown handler `htp`; expected one of http, tls, proxy_proto, pg_tls; did you mean `http`?"
    );

    let d = find(&all, "services[1].protocol", "unknown protocol `tpc`");
    assert_eq!(d.suggestion.as_deref(), Some("did you mean `tcp`?"));
    let d = find(&all, "services[0].processes[0]", "'wokrer'");
    assert_eq!(d.suggestion.as_deref(), Some("did you mean `worker`?"));
    let d = find(
        &all,
        "services[0].ports[1].force_https",
        "force_https needs the http handler",
    );
    assert_eq!(d.line, Some(28));
    // flyctl does not compare ports across services: a warning, not an error.
    assert_eq!(
        find(
            &all,
            "services[0].ports[0]",
            "port 443/tcp is already exposed by http_service",
        )
        .severity,
        Severity::Warning
    );

    let d = find(
        &all,
        "deploy.strategy",
        "unsupported deployment strategy 'rollin'",
    );
    assert_eq!(d.suggestion.as_deref(), Some("did you mean `rolling`?"));
    assert_eq!(at(d), (Some(10), Some(1)));
    let d = find(&all, "kill_signal", "unknown kill signal `SIGTREM`");
    assert_eq!(d.suggestion.as_deref(), Some("did you mean `SIGTERM`?"));
    let d = find(&all, "primary_region", "`amss` is not a Fly.io region code");
    assert_eq!(
        (d.severity, d.suggestion.as_deref()),
        (Severity::Warning, Some("did you mean `ams`?"))
    );

    let d = find(&all, "vm[0].cpu_kind", "unknown cpu_kind `sharde`");
    assert_eq!(d.expected.as_deref(), Some("one of shared, performance"));
    assert_eq!(d.suggestion.as_deref(), Some("did you mean `shared`?"));
    let d = find(
        &all,
        "vm[1].memory",
        "1024 MB of memory does not fit 2 performance CPU(s)",
    );
    assert_eq!(
        d.expected.as_deref(),
        Some("between 4096 and 16384 MB for 2 performance CPU(s)")
    );
    // flyctl's Validate accepts any guest size; the Machines API refuses it at deploy.
    assert_eq!(d.severity, Severity::Warning);

    find(
        &all,
        "mounts[1]",
        "group 'worker' has more than one [[mounts]] section defined",
    );
    // flyctl refuses unknown groups only in services and restart policies.
    assert_eq!(
        find(
            &all,
            "mounts[1].processes[1]",
            "Mount specifies 'db' as one of its processes",
        )
        .severity,
        Severity::Warning
    );
    assert_eq!(
        find(&all, "services[0].processes[0]", "'wokrer'").severity,
        Severity::Error
    );
    let d = find(
        &all,
        "restart[0].policy",
        "invalid restart policy: sometimes",
    );
    assert_eq!(
        d.expected.as_deref(),
        Some("one of always, never, on-failure")
    );
    let d = find(&all, "checks.health.type", "Missing or invalid check type");
    assert_eq!(d.suggestion.as_deref(), Some("did you mean `http`?"));
    find(
        &all,
        "checks.health.interval",
        "Check 'health' interval is too short: 1s, minimum is 2 seconds",
    );
    assert_eq!(
        find(&all, "services[1]", "Service must expose at least one port").severity,
        Severity::Warning
    );

    assert!(
        all.iter()
            .all(|d| d.line.is_some() && d.file.as_deref() == Some("fly.toml")),
        "{}",
        list(&all)
    );
    let errors = all.iter().filter(|d| d.is_error()).count();
    assert!(errors >= 11, "{errors} errors:\n{}", list(&all));
}

#[test]
fn type_errors_are_all_reported_and_keep_only_app() {
    let text = "app = \"t\"\n[http_service]\ninternal_port = \"8080\"\nauto_stop_machines = \"sometimes\"\nmin_machines_running = -1\n[build.args]\nVERSION = 18\n[deploy]\nstrategy = \"nope\"\n";
    let loaded = parse_str(text, Format::Toml, "fly.toml").unwrap();
    let c = &loaded.config;
    assert_eq!(c.app, "t");
    assert!(c.http_service.is_none() && c.build.is_none());
    let errors: Vec<String> = c.validate().iter().map(ToString::to_string).collect();
    let expected = [
        "fly.toml:3:1: http_service.internal_port: invalid type: a string (\"8080\"); expected an integer",
        "fly.toml:4:1: http_service.auto_stop_machines: invalid autostop string value \"sometimes\"",
        "fly.toml:5:1: http_service.min_machines_running: -1 is out of range",
        "fly.toml:7:1: build.args.VERSION: invalid type: an integer (build args are not converted); expected a string",
        "fly.toml:9:1: deploy.strategy: unsupported deployment strategy 'nope'",
    ];
    for needle in expected {
        assert!(
            errors.iter().any(|e| e.starts_with(needle)),
            "missing {needle:?} in {errors:#?}"
        );
    }
}

#[test]
fn strict_mode_turns_unknown_keys_into_errors() {
    let text = "app = \"s\"\n[unknown_section]\nx = 1\n[build]\nunknown_key = 1\n[checks.health_check]\ntype = \"tcp\"\nport = 80\ninvalid_key = 1\n";
    let loaded = parse_str(text, Format::Toml, "fly.toml").unwrap();
    assert!(loaded.diagnostics(false).iter().all(|d| !d.is_error()));
    let mut strict: Vec<String> = loaded
        .diagnostics(true)
        .iter()
        .filter(|d| d.is_error())
        .map(|d| d.path.clone())
        .collect();
    strict.sort();
    assert_eq!(
        strict,
        [
            "build.unknown_key",
            "checks.health_check.invalid_key",
            "unknown_section"
        ]
    );
}

#[test]
fn json_and_yaml_describe_the_same_document() {
    let toml = "app = \"same\"\nkill_timeout = 5\n[[services]]\ninternal_port = \"8080\"\nconcurrency = \"20,25\"\n[[services.ports]]\nport = \"443\"\nhandlers = [\"tls\", \"http\"]\n[mounts]\nsource = \"d\"\ndestination = \"/d\"\n";
    let json = r#"{"app": "same", "kill_timeout": 5, "services": [{"internal_port": "8080", "concurrency": "20,25",
        "ports": [{"port": "443", "handlers": ["tls", "http"]}]}], "mounts": {"source": "d", "destination": "/d"}}"#;
    let yaml = "app: same\nkill_timeout: 5\nservices:\n  - internal_port: \"8080\"\n    concurrency: \"20,25\"\n    ports:\n      - port: \"443\"\n        handlers: [tls, http]\nmounts:\n  source: d\n  destination: /d\n";
    let a = parse_str(toml, Format::Toml, "fly.toml").unwrap().config;
    let b = parse_str(json, Format::Json, "fly.json").unwrap().config;
    let c = parse_str(yaml, Format::Yaml, "fly.yaml").unwrap().config;
    assert_eq!(a, b);
    assert_eq!(a, c);
    assert_eq!(a.services[0].ports[0].port, Some(443));

    let bad = "{\n  \"app\": \"j\",\n  \"http_service\": {\"internal_port\": \"x\"}\n}";
    let loaded = parse_str(bad, Format::Json, "fly.json").unwrap();
    let error = &loaded.config.load_errors()[0];
    assert_eq!(
        (error.path.as_str(), error.line, error.column),
        ("http_service.internal_port", Some(3), Some(20))
    );
    let bad_yaml = "app: y\nhttp_service:\n  internal_port: x\n";
    let loaded = parse_str(bad_yaml, Format::Yaml, "fly.yaml").unwrap();
    let error = &loaded.config.load_errors()[0];
    assert_eq!(
        (error.path.as_str(), error.line),
        ("http_service.internal_port", Some(3))
    );
}

#[test]
fn locate_follows_flyctl() {
    let dir = std::env::temp_dir().join(format!("aloft-locate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    assert_eq!(aloft_config::locate(None, &dir), dir.join("fly.toml"));
    std::fs::write(dir.join("fly.json"), "{\"app\": \"j\"}").unwrap();
    assert_eq!(aloft_config::locate(None, &dir), dir.join("fly.json"));
    std::fs::write(dir.join("fly.toml"), "app = \"t\"").unwrap();
    assert_eq!(aloft_config::locate(None, &dir), dir.join("fly.toml"));
    assert_eq!(
        aloft_config::locate(Some(std::path::Path::new(".")), &dir),
        dir.join("./fly.toml")
    );
    assert_eq!(
        aloft_config::locate(Some(std::path::Path::new("other.yml")), &dir),
        dir.join("other.yml")
    );
    assert_eq!(
        aloft_config::Format::from_path(std::path::Path::new("fly.yml")),
        Format::Toml
    );
    assert_eq!(aloft_config::load(&dir).unwrap().config.app, "t");
    let json: aloft_config::AppConfig =
        serde_json::from_str("{\"app\": \"j\", \"kill_timeout\": \"3s\"}").unwrap();
    assert_eq!(json.kill_timeout, Some(aloft_api::Duration::from_secs(3)));
    assert!(
        serde_json::from_str::<aloft_config::AppConfig>("{\"swap_size_mb\": \"lots\"}").is_err()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn nan_and_infinity_are_load_errors_as_in_flyctl() {
    // flyctl encodes the patched document as JSON, which refuses NaN and infinities, even
    // under keys it would otherwise ignore.
    let text = "app = \"f\"\n[[mounts]]\nsource = \"data\"\ndestination = \"/data\"\nswap_size_mb = nan\n[deploy]\nmax_unavailable = -inf\n";
    let loaded = parse_str(text, Format::Toml, "fly.toml").unwrap();
    let c = &loaded.config;
    assert_eq!(c.app, "f");
    assert!(c.mounts.is_empty() && c.deploy.is_none());
    let errors: Vec<String> = c.load_errors().iter().map(ToString::to_string).collect();
    for needle in [
        "fly.toml:5:16: mounts[0].swap_size_mb: json: unsupported value: NaN",
        "fly.toml:7:19: deploy.max_unavailable: json: unsupported value: -Inf",
    ] {
        assert!(
            errors.iter().any(|e| e.starts_with(needle)),
            "missing {needle:?} in {errors:#?}"
        );
    }
}
