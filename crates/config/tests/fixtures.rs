//! flyctl's fixtures: each loads (or fails) as tests/data/flytoml/fixtures/EXPECTED.md says, and
//! the facts recorded there hold.

use std::collections::BTreeMap;
use std::path::PathBuf;

use aloft_api::{AutoStop, Duration, MachineConfig, RestartPolicy};
use aloft_config::{AppConfig, Loaded, MachineConfigOptions, Severity, is_valid, load};

fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/flytoml/fixtures")
}

fn fixture(name: &str) -> Loaded {
    let path = fixtures_dir().join(name);
    load(&path).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn config(name: &str) -> AppConfig {
    let loaded = fixture(name);
    assert!(
        loaded.config.load_errors().is_empty(),
        "{name}: {:?}",
        loaded.config.load_errors()
    );
    loaded.config
}

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn secs(s: i64) -> Option<Duration> {
    Some(Duration::from_secs(s))
}

fn machine(config: &AppConfig, group: &str) -> MachineConfig {
    config
        .to_machine_config(group, &MachineConfigOptions::default())
        .unwrap_or_else(|e| panic!("{group}: {e}"))
}

fn errors(config: &AppConfig) -> Vec<String> {
    config
        .validate()
        .into_iter()
        .filter(|d| d.severity == Severity::Error)
        .map(|d| d.to_string())
        .collect()
}

#[test]
fn every_fixture_is_covered_and_loads() {
    let mut names: Vec<String> = std::fs::read_dir(fixtures_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".toml"))
        .collect();
    names.sort();
    assert_eq!(names.len(), 45);
    for name in names {
        let loaded = fixture(&name);
        let expect_load_error = name == "appconfig__always-invalid-v2.toml";
        assert_eq!(
            !loaded.config.load_errors().is_empty(),
            expect_load_error,
            "{name}"
        );
    }
}

// ---- serde_test.go ----------------------------------------------------------------------

#[test]
fn simple_sections() {
    assert_eq!(config("appconfig__app-name.toml").app, "test-app");
    assert_eq!(
        config("appconfig__build.toml")
            .build
            .unwrap()
            .builder
            .as_deref(),
        Some("builder/name")
    );
    assert_eq!(
        config("appconfig__image.toml")
            .build
            .unwrap()
            .image
            .as_deref(),
        Some("image/name")
    );
    assert_eq!(
        config("appconfig__docker.toml")
            .build
            .unwrap()
            .dockerfile
            .as_deref(),
        Some("./Dockerfile")
    );
    assert_eq!(
        config("appconfig__build-with-args.toml")
            .build
            .unwrap()
            .args,
        map(&[("A", "B"), ("C", "D")])
    );
    assert!(
        config("appconfig__services-emptysection.toml")
            .services
            .is_empty()
    );
    assert_eq!(config("appconfig__mounts-array.toml").mounts.len(), 1);
    let mount = &config("appconfig__mounts-array.toml").mounts[0];
    assert_eq!(
        (mount.source.as_str(), mount.destination.as_str()),
        ("pg_data", "/data")
    );
}

#[test]
fn compose_file_and_autodetection() {
    let c = config("appconfig__compose.toml");
    assert_eq!(
        c.build
            .as_ref()
            .unwrap()
            .compose
            .as_ref()
            .unwrap()
            .file
            .as_deref(),
        Some("docker-compose.yml")
    );
    assert_eq!(
        c.compose_file().unwrap().file_name().unwrap(),
        "docker-compose.yml"
    );

    let c = config("appconfig__compose-autodetect.toml");
    assert_eq!(
        c.build.as_ref().unwrap().compose.as_ref().unwrap().file,
        None
    );
    let dir = std::env::temp_dir().join(format!("aloft-compose-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        fixtures_dir().join("appconfig__compose-autodetect.toml"),
        dir.join("fly.toml"),
    )
    .unwrap();
    std::fs::write(dir.join("docker-compose.yml"), "services: {}\n").unwrap();
    std::fs::write(dir.join("compose.yml"), "services: {}\n").unwrap();
    let c = load(&dir).unwrap().config;
    assert_eq!(c.compose_file().unwrap(), dir.join("compose.yml"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn services_ports_options() {
    let c = config("appconfig__services-ports.toml");
    assert_eq!(c.services.len(), 1);
    let s = &c.services[0];
    assert_eq!((s.protocol.as_str(), s.internal_port), ("tcp", 8080));
    let p0 = &s.ports[0];
    assert_eq!(p0.port, Some(80));
    assert!(p0.handlers.is_empty());
    let tls = p0.tls_options.as_ref().unwrap();
    assert_eq!(tls.alpn, strings(&["h2", "http/1.1"]));
    assert_eq!(tls.versions, strings(&["TLSv1.2", "TLSv1.3"]));
    let http = p0.http_options.as_ref().unwrap();
    assert_eq!(http.compress, Some(true));
    let headers = &http.response.as_ref().unwrap().headers;
    assert_eq!(headers["fly-request-id"], serde_json::json!(false));
    assert_eq!(headers["fly-wasnt-here"], serde_json::json!("yes, it was"));
    assert_eq!(
        headers["multi-valued"],
        serde_json::json!(["value1", "value2"])
    );
    let p1 = &s.ports[1];
    assert_eq!(p1.port, Some(82));
    assert_eq!(p1.handlers, strings(&["proxy_proto"]));
    assert_eq!(p1.proxy_proto_options.as_ref().unwrap().version, "v2");
}

#[test]
fn services_multi() {
    let c = config("appconfig__services-multi.toml");
    let summary: Vec<_> = c
        .services
        .iter()
        .map(|s| {
            let cc = s.concurrency.as_ref().unwrap();
            (
                s.protocol.as_str(),
                s.internal_port,
                cc.kind.as_str(),
                cc.soft_limit,
                cc.hard_limit,
                s.ports.len(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            ("tcp", 8081, "requests", Some(13), Some(22), 0),
            ("tcp", 9999, "connections", Some(8), Some(10), 0)
        ]
    );
}

#[test]
fn always_invalid_keeps_only_app_and_the_error() {
    let loaded = fixture("appconfig__always-invalid-v2.toml");
    let c = &loaded.config;
    assert_eq!(c.app, "unsupported-format");
    assert!(c.build.is_none());
    assert!(c.services.is_empty());
    let first = &c.load_errors()[0];
    assert!(
        first
            .message
            .contains("Unknown type for service concurrency: int64"),
        "{first}"
    );
    assert_eq!(first.path, "services[0].concurrency");
    assert_eq!((first.line, first.column), (Some(24), Some(3)));
    assert!(!is_valid(&c.validate()));
    let err = c
        .to_machine_config("app", &MachineConfigOptions::default())
        .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("can not flatten an invalid v2 application config: "),
        "{err}"
    );
}

#[test]
fn experimental_alternative_forms() {
    let c = config("appconfig__experimental-alt.toml");
    let e = c.experimental.as_ref().unwrap();
    assert_eq!(e.cmd, strings(&["cmd"]));
    assert_eq!(e.exec, strings(&["exec"]));
    assert_eq!(e.entrypoint, strings(&["entrypoint"]));
    assert_eq!(c.kill_timeout, secs(3));
    assert_eq!(c.metrics.len(), 1);
    assert_eq!(
        (c.metrics[0].port, c.metrics[0].path.as_deref()),
        (Some(9000), Some("/foo"))
    );
    let json = serde_json::to_value(e).unwrap();
    let keys: Vec<&String> = json.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["cmd", "entrypoint", "exec"]);
}

#[test]
fn format_quirks() {
    let c = config("appconfig__format-quirks.toml");
    assert_eq!(c.vm.len(), 1);
    assert_eq!(c.vm[0].memory.as_deref(), Some("512"));
    let m = &c.mounts[0];
    assert_eq!(
        (m.source.as_str(), m.destination.as_str()),
        ("data", "/data")
    );
    assert_eq!(m.initial_size.as_deref(), Some("200"));
    assert_eq!(m.snapshot_retention, Some(10));
}

#[test]
fn env_list_is_merged_and_stringified() {
    assert_eq!(
        config("appconfig__env-list.toml").env,
        map(&[("FOO", "BAR"), ("TWO", "2"), ("TRUE", "true")])
    );
}

#[test]
fn old_format() {
    let c = config("appconfig__old-format.toml");
    assert_eq!(c.app, "foo");
    assert_eq!(
        c.build.as_ref().unwrap().build_target.as_deref(),
        Some("thalayer")
    );
    assert_eq!(c.env, map(&[("FOO", "STRING"), ("BAR", "123")]));
    assert_eq!(c.mounts.len(), 1);
    assert_eq!(
        (
            c.mounts[0].source.as_str(),
            c.mounts[0].destination.as_str()
        ),
        ("data", "/data")
    );
    assert_eq!(c.metrics.len(), 1);
    assert_eq!(
        (c.metrics[0].port, c.metrics[0].path.as_deref()),
        (Some(9999), Some("/metrics"))
    );
    assert!(c.experimental.is_none());
    assert!(c.processes.is_empty());
    assert_eq!(c.services.len(), 1);
    let s = &c.services[0];
    assert_eq!(s.internal_port, 8080);
    assert_eq!(s.protocol, "");
    assert_eq!(s.auto_stop_machines, Some(AutoStop::Off));
    assert_eq!(s.ports.len(), 1);
    assert_eq!(
        (s.ports[0].port, s.ports[0].handlers.clone()),
        (Some(80), strings(&["http"]))
    );
    let cc = s.concurrency.as_ref().unwrap();
    assert_eq!(
        (cc.kind.as_str(), cc.hard_limit, cc.soft_limit),
        ("requests", Some(23), Some(12))
    );
    let tcp: Vec<_> = s
        .tcp_checks
        .iter()
        .map(|c| (c.interval, c.timeout))
        .collect();
    assert_eq!(tcp, vec![(secs(10), secs(2)), (secs(20), secs(3))]);
    let http: Vec<_> = s
        .http_checks
        .iter()
        .map(|c| (c.interval, c.timeout, c.grace_period))
        .collect();
    assert_eq!(
        http,
        vec![(secs(30), secs(4), None), (secs(20), secs(3), None)]
    );
    assert_eq!(
        s.http_checks[0].headers,
        map(&[("origin", "http://localhost:8000")])
    );
    assert_eq!(
        s.http_checks[1].headers,
        map(&[
            ("fly-healthcheck", "1"),
            ("metoo", "true"),
            ("astring", "string")
        ])
    );
}

#[test]
fn old_processes_and_pg_checks() {
    let c = config("appconfig__old-processes.toml");
    assert_eq!(
        c.processes,
        map(&[("web", "./web"), ("worker", "./worker")])
    );
    assert_eq!(c.app, "");

    let c = config("appconfig__old-pg-checks.toml");
    assert_eq!(c.checks.len(), 1);
    let pg = &c.checks["pg"];
    assert_eq!(
        (pg.port, pg.check_type.as_deref(), pg.path.as_deref()),
        (Some(5500), Some("http"), Some("/flycheck/pg"))
    );
    assert!(pg.headers.is_empty());
}

#[test]
fn full_reference() {
    let c = config("appconfig__full-reference.toml");
    assert_eq!(c.kill_signal.as_deref(), Some("SIGTERM"));
    assert_eq!(c.kill_timeout, secs(3));
    assert_eq!(c.swap_size_mb, Some(512));
    assert_eq!(c.primary_region, "sea");
    assert_eq!(c.console_command.as_deref(), Some("/bin/bash"));
    assert_eq!(c.host_dedication_id.as_deref(), Some("06031957"));

    let vm = &c.vm[0];
    assert_eq!(vm.size.as_deref(), Some("shared-cpu-1x"));
    assert_eq!(vm.memory.as_deref(), Some("8gb"));
    assert_eq!(vm.cpu_kind.as_deref(), Some("performance"));
    assert_eq!(
        (vm.cpus, vm.memory_mb, vm.gpus),
        (Some(8), Some(8192), Some(2))
    );
    assert_eq!(vm.gpu_kind.as_deref(), Some("a100-pcie-40gb"));
    assert_eq!(vm.host_dedication_id.as_deref(), Some("isolated-xxx"));
    assert_eq!(vm.kernel_args, strings(&["quiet"]));
    assert_eq!(vm.processes, strings(&["app"]));
    assert_eq!(
        serde_json::to_value(&c.vm[1]).unwrap(),
        serde_json::json!({"memory_mb": 4096})
    );

    let e = c.experimental.as_ref().unwrap();
    assert_eq!(
        (e.cmd.clone(), e.entrypoint.clone(), e.exec.clone()),
        (
            strings(&["cmd"]),
            strings(&["entrypoint"]),
            strings(&["exec"])
        )
    );
    assert_eq!(
        (e.auto_rollback, e.enable_consul, e.enable_etcd),
        (Some(true), Some(true), Some(true))
    );

    assert_eq!(c.restart.len(), 1);
    assert_eq!(
        (c.restart[0].policy.as_str(), c.restart[0].retries),
        ("always", Some(3))
    );
    assert_eq!(c.restart[0].processes, strings(&["web"]));

    let b = c.build.as_ref().unwrap();
    assert_eq!(b.builder.as_deref(), Some("dockerfile"));
    assert_eq!(b.image.as_deref(), Some("foo/fighter"));
    assert_eq!(b.builtin.as_deref(), Some("whatisthis"));
    assert_eq!(b.dockerfile.as_deref(), Some("Dockerfile"));
    assert_eq!(b.ignorefile.as_deref(), Some(".gitignore"));
    assert_eq!(b.build_target.as_deref(), Some("target"));
    assert_eq!(b.buildpacks, strings(&["packme", "well"]));
    assert_eq!(b.settings["foo"], serde_json::json!("bar"));
    assert_eq!(b.settings["other"], serde_json::json!(2.0));
    assert_eq!(b.args, map(&[("param1", "value1"), ("param2", "value2")]));

    let d = c.deploy.as_ref().unwrap();
    assert_eq!(d.strategy.as_deref(), Some("rolling-eyes"));
    assert_eq!(d.max_unavailable, Some(0.2));
    assert_eq!(d.release_command.as_deref(), Some("release command"));
    assert_eq!(d.release_command_timeout, secs(180));
    let rvm = d.release_command_vm.as_ref().unwrap();
    assert_eq!(
        (rvm.size.as_deref(), rvm.memory.as_deref()),
        (Some("performance-2x"), Some("8g"))
    );

    assert_eq!(c.env, map(&[("FOO", "BAR")]));
    let metrics: Vec<_> = c
        .metrics
        .iter()
        .map(|m| (m.port, m.path.clone(), m.processes.clone()))
        .collect();
    assert_eq!(
        metrics,
        vec![
            (Some(9999), Some("/metrics".into()), vec![]),
            (Some(9998), Some("/metrics".into()), strings(&["web"]))
        ]
    );

    let h = c.http_service.as_ref().unwrap();
    assert_eq!(h.internal_port, 8080);
    assert!(h.force_https);
    assert_eq!(h.auto_start_machines, Some(false));
    assert_eq!(h.auto_stop_machines, Some(AutoStop::Off));
    assert_eq!(h.min_machines_running, Some(0));
    let cc = h.concurrency.as_ref().unwrap();
    assert_eq!(
        (cc.kind.as_str(), cc.hard_limit, cc.soft_limit),
        ("donuts", Some(10), Some(4))
    );
    assert_eq!(
        h.tls_options.as_ref().unwrap().default_self_signed,
        Some(false)
    );
    let ho = h.http_options.as_ref().unwrap();
    assert_eq!((ho.compress, ho.idle_timeout), (Some(true), Some(600)));
    assert_eq!(ho.response.as_ref().unwrap().headers.len(), 3);
    let check = &h.checks[0];
    assert_eq!(
        (check.interval, check.timeout, check.grace_period),
        (secs(81), secs(7), secs(2))
    );
    assert_eq!(
        (
            check.method.as_deref(),
            check.path.as_deref(),
            check.protocol.as_deref()
        ),
        (Some("GET"), Some("/"), Some("https"))
    );
    assert_eq!(
        (check.tls_skip_verify, check.tls_server_name.as_deref()),
        (Some(true), Some("sni2.com"))
    );
    assert_eq!(check.headers, map(&[("My-Custom-Header", "whatever")]));
    let mc = &h.machine_checks[0];
    assert_eq!(mc.command, strings(&["curl", "https://fly.io"]));
    assert_eq!(mc.image.as_deref(), Some("curlimages/curl"));
    assert_eq!(mc.entrypoint, strings(&["/bin/sh"]));
    assert_eq!(
        (mc.kill_signal.as_deref(), mc.kill_timeout),
        (Some("SIGKILL"), secs(5))
    );
    assert_eq!(c.machine_checks, h.machine_checks);

    let st = &c.statics[0];
    assert_eq!(
        (
            st.guest_path.as_str(),
            st.url_prefix.as_str(),
            st.tigris_bucket.as_deref(),
            st.index_document.as_deref()
        ),
        (
            "/path/to/statics",
            "/static-assets",
            Some("example-bucket"),
            Some("index.html")
        )
    );
    assert_eq!(c.files.len(), 3);
    assert_eq!(c.files[0].raw_value.as_deref(), Some("aGVsbG8gd29ybGQK"));
    assert_eq!(c.files[1].secret_name.as_deref(), Some("SUPER_SECRET"));
    assert_eq!(
        c.files[2].local_path.as_deref(),
        Some("/local/path/config.yaml")
    );
    assert_eq!(c.files[2].processes, strings(&["web"]));

    let m = &c.mounts[0];
    assert_eq!(
        (
            m.source.as_str(),
            m.destination.as_str(),
            m.initial_size.as_deref()
        ),
        ("data", "/data", Some("30gb"))
    );
    assert_eq!(
        (m.snapshot_retention, m.scheduled_snapshots),
        (Some(17), Some(true))
    );
    assert_eq!(
        c.processes,
        map(&[("web", "run web"), ("task", "task all day")])
    );

    let status = &c.checks["status"];
    assert_eq!(
        (status.port, status.check_type.as_deref()),
        (Some(2020), Some("http"))
    );
    assert_eq!(
        (status.interval, status.timeout, status.grace_period),
        (secs(10), secs(2), secs(27))
    );
    assert_eq!(
        (status.method.as_deref(), status.path.as_deref()),
        (Some("GET"), Some("/status"))
    );
    assert_eq!(status.tls_server_name.as_deref(), Some("sni3.com"));
    assert_eq!(status.headers.len(), 2);

    assert_eq!(c.services.len(), 1);
    let s = &c.services[0];
    assert_eq!(
        (s.internal_port, s.protocol.as_str(), s.processes.clone()),
        (8081, "tcp", strings(&["app"]))
    );
    assert_eq!(
        (
            s.auto_start_machines,
            s.auto_stop_machines,
            s.min_machines_running
        ),
        (Some(false), Some(AutoStop::Off), Some(1))
    );
    let cc = s.concurrency.as_ref().unwrap();
    assert_eq!(
        (cc.kind.as_str(), cc.hard_limit, cc.soft_limit),
        ("requests", Some(22), Some(13))
    );
    let p = &s.ports[0];
    assert_eq!(
        (p.port, p.start_port, p.end_port, p.force_https),
        (Some(80), Some(100), Some(200), true)
    );
    assert_eq!(p.handlers, strings(&["https"]));
    assert_eq!(p.http_options.as_ref().unwrap().idle_timeout, Some(600));
    assert_eq!(
        (
            s.tcp_checks[0].interval,
            s.tcp_checks[0].timeout,
            s.tcp_checks[0].grace_period
        ),
        (secs(21), secs(4), secs(1))
    );
    assert_eq!(s.http_checks.len(), 2);
    assert_eq!(s.http_checks[0].tls_server_name.as_deref(), Some("sni.com"));
    let c2 = &s.http_checks[1];
    assert_eq!(
        (
            c2.interval,
            c2.timeout,
            c2.method.as_deref(),
            c2.path.as_deref()
        ),
        (secs(33), secs(10), Some("POST"), Some("/check2"))
    );
    assert_eq!(s.machine_checks.len(), 1);

    // Accepted at load, rejected by Validate.
    assert!(
        errors(&c)
            .iter()
            .any(|e| e.contains("unsupported deployment strategy 'rolling-eyes'")),
        "{:?}",
        errors(&c)
    );
}

#[test]
fn full_reference_definition_shape() {
    let c = config("appconfig__full-reference.toml");
    let json = serde_json::to_value(&c).unwrap();
    assert_eq!(json["kill_timeout"], "3s");
    assert_eq!(json["deploy"]["release_command_timeout"], "3m0s");
    assert_eq!(json["http_service"]["checks"][0]["interval"], "1m21s");
    assert_eq!(json["http_service"]["auto_stop_machines"], "off");
    assert_eq!(json["build"]["build-target"], "target");
    assert!(json["build"].get("build_target").is_none());
    assert_eq!(json["swap_size_mb"], 512);
    assert_eq!(json["vm"][1]["memory_mb"], 4096);
    let text = serde_json::to_string_pretty(&c).unwrap();
    assert!(text.starts_with("{\n  \"app\": \"foo\","), "{text}");
}

// ---- processgroups_test.go -------------------------------------------------------------

#[test]
fn process_groups() {
    let cases: &[(&str, &str, &[&str])] = &[
        ("appconfig__app-name.toml", "app", &["app"]),
        ("appconfig__processes-one.toml", "web", &["web"]),
        (
            "appconfig__processes-multi.toml",
            "bar",
            &["bar", "foo", "zzz"],
        ),
        (
            "appconfig__processes-multiwithapp.toml",
            "app",
            &["aaa", "abc", "app", "ass", "bbb"],
        ),
        ("appconfig__processes-none.toml", "app", &["app"]),
    ];
    for (name, default, groups) in cases {
        let c = config(name);
        assert_eq!(c.default_process_group(), *default, "{name}");
        assert_eq!(c.process_groups(), strings(groups), "{name}");
    }
}

// ---- setters_test.go starting points ----------------------------------------------------

#[test]
fn setter_fixtures() {
    let c = config("appconfig__setters-service.toml");
    assert_eq!(c.services.len(), 1);
    let c = config("appconfig__setters-httpservice.toml");
    assert_eq!(c.http_service.as_ref().unwrap().internal_port, 9999);
    assert!(c.services.is_empty());
    let c = config("appconfig__setters-deploy.toml");
    assert_eq!(
        c.deploy.as_ref().unwrap().strategy.as_deref(),
        Some("immediate")
    );
    let c = config("appconfig__setters-experimental.toml");
    assert_eq!(c.experimental.as_ref().unwrap().exec, strings(&["/exec"]));
    let c = config("appconfig__setters-processes.toml");
    assert_eq!(c.processes.get("foo").map(String::as_str), Some("bar"));
}

// ---- machines_test.go --------------------------------------------------------------------

#[test]
fn tomachine() {
    let c = config("appconfig__tomachine.toml");
    let m = machine(&c, "app");
    assert_eq!(
        m.env,
        map(&[
            ("FOO", "BAR"),
            ("PRIMARY_REGION", "mia"),
            ("FLY_PROCESS_GROUP", "app")
        ])
    );
    assert_eq!(m.services.len(), 1);
    let s = &m.services[0];
    assert_eq!((s.protocol.as_str(), s.internal_port), ("tcp", 8080));
    assert_eq!(
        (
            s.ports[0].port,
            s.ports[0].handlers.clone(),
            s.ports[0].force_https
        ),
        (Some(80), strings(&["http"]), Some(true))
    );
    assert_eq!(
        (
            s.ports[1].port,
            s.ports[1].handlers.clone(),
            s.ports[1].force_https
        ),
        (Some(443), strings(&["http", "tls"]), None)
    );
    assert_eq!(m.metadata["fly_platform_version"], "v2");
    assert_eq!(m.metadata["fly_process_group"], "app");
    assert_eq!(
        m.metrics.as_ref().map(|x| (x.port, x.path.as_str())),
        Some((9999, "/metrics"))
    );
    assert_eq!(m.statics.len(), 1);
    assert_eq!(
        m.statics[0].tigris_bucket.as_deref(),
        Some("example-bucket")
    );
    assert_eq!(m.mounts.len(), 1);
    assert_eq!(
        (m.mounts[0].name.as_str(), m.mounts[0].path.as_str()),
        ("data", "/data")
    );
    assert_eq!(m.checks.len(), 2);
    assert_eq!(
        (
            m.checks["listening"].port,
            m.checks["listening"].check_type.as_str()
        ),
        (Some(8080), "tcp")
    );
    let status = &m.checks["status"];
    assert_eq!(
        (
            status.port,
            status.check_type.as_str(),
            status.interval,
            status.timeout
        ),
        (Some(8080), "http", secs(10), secs(1))
    );
    assert_eq!(status.path.as_deref(), Some("/status"));
    let stop = m.stop_config.as_ref().unwrap();
    assert_eq!(
        (stop.timeout, stop.signal.as_deref()),
        (secs(10), Some("SIGTERM"))
    );
    assert_eq!(m.init.as_ref().unwrap().swap_size_mb, Some(512));
    assert_eq!(m.restart.as_ref().unwrap().policy, RestartPolicy::Always);
    assert_eq!(m.dns.as_ref().unwrap().nameservers, strings(&["1.2.3.4"]));
    assert!(m.guest.is_none());
    let json = serde_json::to_value(&m).unwrap();
    assert!(json.get("machine_checks").is_none());
    assert!(json["services"][0].get("machine_checks").is_none());

    let opts = MachineConfigOptions {
        image: "registry.local/foo:deployment-1".into(),
        release_id: Some("rel_1".into()),
        release_version: Some(7),
        primary_region: Some("ams".into()),
    };
    let m = c.to_machine_config("app", &opts).unwrap();
    assert_eq!(m.image, "registry.local/foo:deployment-1");
    assert_eq!(m.env["PRIMARY_REGION"], "ams");
    assert_eq!(m.metadata["fly_release_id"], "rel_1");
    assert_eq!(m.metadata["fly_release_version"], "7");
}

#[test]
fn tomachine_release_command_and_console() {
    let c = config("appconfig__tomachine.toml");
    let m = c
        .release_command_machine_config(&MachineConfigOptions::default())
        .unwrap()
        .unwrap();
    let init = m.init.as_ref().unwrap();
    assert_eq!(
        (init.cmd.clone(), init.swap_size_mb),
        (strings(&["migrate-db"]), Some(512))
    );
    assert_eq!(
        m.env,
        map(&[
            ("FOO", "BAR"),
            ("PRIMARY_REGION", "mia"),
            ("RELEASE_COMMAND", "1"),
            ("FLY_PROCESS_GROUP", "fly_app_release_command")
        ])
    );
    assert_eq!(m.metadata["fly_process_group"], "fly_app_release_command");
    assert!(m.auto_destroy);
    assert_eq!(m.restart.as_ref().unwrap().policy, RestartPolicy::No);
    assert!(m.dns.as_ref().unwrap().skip_registration);
    assert_eq!(
        m.stop_config.as_ref().unwrap().signal.as_deref(),
        Some("SIGTERM")
    );
    let guest = m.guest.as_ref().unwrap();
    assert_eq!(
        (guest.cpu_kind.as_str(), guest.cpus, guest.memory_mb),
        ("performance", 2, 4096)
    );
    assert!(m.services.is_empty() && m.mounts.is_empty());

    let m = c
        .console_machine_config(&MachineConfigOptions::default())
        .unwrap();
    assert_eq!(
        m.init.as_ref().unwrap().exec,
        strings(&["/bin/sleep", "inf"])
    );
    assert_eq!(
        m.env,
        map(&[
            ("FOO", "BAR"),
            ("PRIMARY_REGION", "mia"),
            ("FLY_PROCESS_GROUP", "fly_app_console")
        ])
    );
    assert!(m.auto_destroy);
    assert_eq!(m.restart.as_ref().unwrap().policy, RestartPolicy::No);
    assert!(m.dns.as_ref().unwrap().skip_registration);

    assert!(
        config("appconfig__app-name.toml")
            .release_command_machine_config(&MachineConfigOptions::default())
            .is_none()
    );
}

#[test]
fn tomachine_experimental() {
    let mut c = config("appconfig__tomachine-experimental.toml");
    let init = machine(&c, "app").init.unwrap();
    assert_eq!(init.cmd, strings(&["/call", "me"]));
    assert_eq!(init.entrypoint, strings(&["/IgoFirst"]));
    assert_eq!(init.exec, strings(&["ignore", "others"]));
    c.processes
        .insert("app".into(), "/override experimental".into());
    assert_eq!(
        machine(&c, "app").init.unwrap().cmd,
        strings(&["/override", "experimental"])
    );
}

#[test]
fn tomachine_process_groups() {
    let c = config("appconfig__tomachine-processgroups.toml");
    let ports = |m: &MachineConfig| {
        m.services
            .iter()
            .map(|s| (s.protocol.clone(), s.internal_port))
            .collect::<Vec<_>>()
    };

    let app = machine(&c, "app");
    assert_eq!(app.init.as_ref().unwrap().cmd, strings(&["run-nginx"]));
    assert_eq!(
        ports(&app),
        vec![("tcp".into(), 8080), ("tcp".into(), 1111)]
    );
    assert_eq!(
        app.services[0]
            .ports
            .iter()
            .map(|p| p.port)
            .collect::<Vec<_>>(),
        vec![Some(80), Some(443)]
    );
    assert_eq!(app.checks.keys().collect::<Vec<_>>(), ["listening"]);

    let vpn = machine(&c, "vpn");
    assert_eq!(vpn.init.as_ref().unwrap().cmd, strings(&["run-tailscale"]));
    assert_eq!(
        ports(&vpn),
        vec![("udp".into(), 9999), ("tcp".into(), 1111)]
    );
    assert!(vpn.checks.is_empty());

    let foo = machine(&c, "foo");
    assert_eq!(
        foo.init.as_ref().unwrap().cmd,
        strings(&["keep", "me", "alive"])
    );
    assert_eq!(ports(&foo), vec![("tcp".into(), 1111)]);
    assert_eq!(foo.checks.keys().collect::<Vec<_>>(), ["listening"]);
    for group in ["app", "vpn", "foo"] {
        assert_eq!(machine(&c, group).metadata["fly_process_group"], group);
    }
}

#[test]
fn tomachine_default_for_new_apps() {
    let mut c = config("appconfig__tomachine-default-for-new-apps.toml");
    let m = machine(&c, "app");
    assert_eq!(
        m.env,
        map(&[("PRIMARY_REGION", "ord"), ("FLY_PROCESS_GROUP", "app")])
    );
    assert_eq!(m.services.len(), 1);
    let alive = &m.checks["alive"];
    assert_eq!((alive.port, alive.check_type.as_str()), (Some(8080), "tcp"));
    assert_eq!(
        (alive.interval, alive.timeout, alive.grace_period),
        (secs(15), secs(2), secs(5))
    );

    c.http_service = None;
    let err = c
        .to_machine_config("app", &MachineConfigOptions::default())
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("has no port set and the group has no http_service to take it from"),
        "{err}"
    );
    assert!(
        errors(&c).iter().any(|e| e.contains("checks.alive.port")),
        "{:?}",
        errors(&c)
    );
}

#[test]
fn tomachine_mounts() {
    let c = config("appconfig__tomachine-mounts.toml");
    let mounts = |g: &str| {
        machine(&c, g)
            .mounts
            .iter()
            .map(|m| (m.name.clone(), m.path.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(mounts("app"), vec![("data".into(), "/data".into())]);
    assert_eq!(mounts("back"), vec![("trash".into(), "/trash".into())]);
    assert!(mounts("hola").is_empty());
}

#[test]
fn tomachine_services_autostop_autostart() {
    let c = config("appconfig__tomachine-services.toml");
    let m = machine(&c, "app");
    let got: Vec<_> = m
        .services
        .iter()
        .map(|s| (s.internal_port, s.autostart, s.autostop))
        .collect();
    assert_eq!(
        got,
        vec![
            (8080, Some(true), Some(AutoStop::Stop)),
            (1000, Some(true), Some(AutoStop::Stop)),
            (1001, Some(false), Some(AutoStop::Off)),
            (1002, Some(false), None),
            (1003, None, Some(AutoStop::Stop)),
            (1004, None, None),
        ]
    );
    let json = serde_json::to_value(&m.services[5]).unwrap();
    assert!(json.get("autostop").is_none() && json.get("autostart").is_none());
    assert_eq!(
        serde_json::to_value(&m.services[2]).unwrap()["autostop"],
        false
    );
}

#[test]
fn tomachine_compute() {
    let c = config("appconfig__tomachine-compute.toml");
    let guest = |g: &str| machine(&c, g).guest.unwrap();
    for group in ["app", "worker"] {
        let g = guest(group);
        assert_eq!(
            (g.cpu_kind.as_str(), g.cpus, g.memory_mb),
            ("shared", 2, 512),
            "{group}"
        );
    }
    let g = guest("whisper");
    assert_eq!(
        (g.cpu_kind.as_str(), g.cpus, g.memory_mb),
        ("performance", 8, 65536)
    );
    assert_eq!(
        (g.gpu_kind.as_deref(), g.gpus.unwrap_or(0)),
        (Some("a100-pcie-40gb"), 0)
    );
    let g = guest("isolated");
    assert_eq!(
        (g.cpu_kind.as_str(), g.cpus, g.memory_mb),
        ("shared", 1, 256)
    );
    assert_eq!(g.host_dedication_id.as_deref(), Some("lookma-iamsolo"));
}

#[test]
fn tomachine_compute_without_default() {
    let c = config("appconfig__tomachine-compute-nodefault.toml");
    assert!(machine(&c, "app").guest.is_none());
    assert!(machine(&c, "woo").guest.is_none());
    let g = machine(&c, "bar").guest.unwrap();
    assert_eq!(
        (g.cpu_kind.as_str(), g.cpus, g.memory_mb),
        ("performance", 4, 8192)
    );
}

#[test]
fn tomachine_host_dedication_id() {
    let c = config("appconfig__tomachine-hostdedicationid.toml");
    assert_eq!(c.host_dedication_id.as_deref(), Some("toplevel"));
    assert!(machine(&c, "front").guest.is_none());
    let g = machine(&c, "back").guest.unwrap();
    assert_eq!(
        (
            g.cpu_kind.as_str(),
            g.cpus,
            g.memory_mb,
            g.host_dedication_id.as_deref()
        ),
        ("shared", 1, 256, Some("specific"))
    );
    let g = machine(&c, "other").guest.unwrap();
    assert_eq!(
        (
            g.cpu_kind.as_str(),
            g.cpus,
            g.memory_mb,
            g.host_dedication_id.as_deref()
        ),
        ("shared", 4, 1024, Some("toplevel"))
    );
}

#[test]
fn tomachine_machine_checks_are_not_in_machines() {
    let c = config("appconfig__tomachine-machinechecks.toml");
    assert_eq!(c.http_service.as_ref().unwrap().machine_checks.len(), 1);
    for group in ["greeting", "salutation"] {
        let m = machine(&c, group);
        assert_eq!(m.init.as_ref().unwrap().swap_size_mb, Some(512));
        assert_eq!(m.services.len(), 1);
        assert!(!serde_json::to_string(&m).unwrap().contains("curlimages"));
    }
    assert!(machine(&c, "farewell").services.is_empty());
}

// ---- validation_test.go -----------------------------------------------------------------

#[test]
fn validate_groups() {
    let mut c = config("appconfig__validate-groups.toml");
    assert!(errors(&c).is_empty(), "{:?}", errors(&c));
    c.deploy.get_or_insert_with(Default::default).strategy = Some("canary".into());
    let errs = errors(&c);
    assert!(
        errs.iter().any(|e| e.contains(
            "error canary deployment strategy is not supported when using mounted volumes"
        )),
        "{errs:?}"
    );
    let foo = machine(&c, "foo");
    assert!(foo.mounts.is_empty());
    assert_eq!(machine(&c, "app").mounts.len(), 1);
}

#[test]
fn validate_mounts() {
    let c = config("appconfig__validate-mounts.toml");
    let errs = errors(&c);
    assert!(
        errs.iter()
            .any(|e| e.contains("has an initial_size '15Mb' value which is smaller than 1GB")),
        "{errs:?}"
    );
    assert!(
        errs.iter()
            .any(|e| e.contains("with initial_size 'unparseable' will fail because of")),
        "{errs:?}"
    );
    assert!(
        errs.iter()
            .any(|e| e.contains("group 'app' has more than one [[mounts]] section defined")),
        "{errs:?}"
    );
    assert!(
        !errs
            .iter()
            .any(|e| e.contains("group 'vpn'") || e.contains("group 'foo'")),
        "{errs:?}"
    );
}

#[test]
fn validate_services() {
    let c = config("appconfig__validate-services.toml");
    let all = c.validate();
    let errs = errors(&c);
    assert!(
        errs.iter()
            .any(|e| e.contains("Service has no processes set but app has 3 processes defined")),
        "{errs:?}"
    );
    let warning = all
        .iter()
        .find(|d| d.message.contains("Service must expose at least one port"))
        .unwrap();
    assert_eq!(warning.severity, Severity::Warning);
    assert_eq!(warning.path, "services[0]");
    assert_eq!(warning.line, Some(12));
    assert!(!errs.iter().any(|e| e.contains("services[1]")), "{errs:?}");
}

// ---- other fixtures ---------------------------------------------------------------------

#[test]
fn other_fixtures() {
    let c = config("deploy-basic__fly.toml");
    assert_eq!(
        (c.app.as_str(), c.primary_region.as_str()),
        ("test-basic", "ord")
    );

    let c = config("preflight-deploy-node__fly.toml");
    let vm = &c.vm[0];
    assert_eq!(
        (vm.memory.as_deref(), vm.cpu_kind.as_deref(), vm.cpus),
        (Some("1gb"), Some("shared"), Some(1))
    );
    assert!(!c.http_service.as_ref().unwrap().checks.is_empty());

    for name in [
        "preflight-example__fly.toml",
        "preflight-example-buildpack__fly.toml",
    ] {
        let c = config(name);
        let ports: Vec<_> = c.services[0].ports.iter().map(|p| p.port).collect();
        assert!(
            ports.contains(&Some(443)) && ports.contains(&Some(80)),
            "{name}: {ports:?}"
        );
        assert!(
            c.services[0]
                .tcp_checks
                .iter()
                .all(|t| t.interval >= secs(1)),
            "{name}"
        );
    }
    assert_eq!(
        config("preflight-example-buildpack__fly.toml")
            .build
            .unwrap()
            .builder
            .as_deref(),
        Some("heroku/builder:24")
    );
}

#[test]
fn tomachine_machine_check_test_machine() {
    let c = config("appconfig__tomachine-machinechecks.toml");
    let checks = c.machine_checks_for("greeting");
    assert_eq!(checks.len(), 1);
    assert!(c.machine_checks_for("farewell").is_empty());
    let tested = machine(&c, "greeting");
    let m = c
        .test_machine_config(checks[0], &tested, "", &MachineConfigOptions::default())
        .unwrap();
    let init = m.init.as_ref().unwrap();
    assert_eq!(init.cmd, strings(&["curl", "https://fly.io"]));
    assert_eq!(init.entrypoint, strings(&["/bin/sh"]));
    assert_eq!(init.swap_size_mb, Some(512));
    assert_eq!(m.image, "curlimages/curl");
    assert_eq!(
        m.env,
        map(&[
            ("PRIMARY_REGION", "mia"),
            ("FLY_TEST_COMMAND", "1"),
            ("FLY_PROCESS_GROUP", "fly_app_test_machine_command"),
            ("FLY_TEST_MACHINE_IP", ""),
        ])
    );
    assert_eq!(
        m.metadata["fly_process_group"],
        "fly_app_test_machine_command"
    );
    assert!(m.auto_destroy);
    assert_eq!(m.restart.as_ref().unwrap().policy, RestartPolicy::No);
    assert!(m.dns.as_ref().unwrap().skip_registration);
    assert_eq!(
        m.stop_config,
        Some(aloft_api::StopConfig {
            timeout: None,
            signal: None
        })
    );

    // Without its own image the check runs the tested machine's image with its env.
    let mut check = checks[0].clone();
    check.image = None;
    let mut tested = tested;
    tested.image = "registry.local/foo:v1".into();
    let m = c
        .test_machine_config(&check, &tested, "fdaa::3", &MachineConfigOptions::default())
        .unwrap();
    assert_eq!(m.image, "registry.local/foo:v1");
    assert_eq!(m.env["FLY_TEST_MACHINE_IP"], "fdaa::3");
    assert_eq!(m.env["FLY_PROCESS_GROUP"], "fly_app_test_machine_command");
    check.command.clear();
    let err = c
        .test_machine_config(&check, &tested, "", &MachineConfigOptions::default())
        .unwrap_err();
    assert!(
        err.to_string().contains("missing command for test machine"),
        "{err}"
    );
}

#[test]
fn local_files_are_inlined_before_leaving_the_machine() {
    let dir = std::env::temp_dir().join(format!("aloft-inline-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("hello.txt"), "hello world\n").unwrap();
    std::fs::write(
        dir.join("machine.json"),
        "{\"dns\": {\"nameservers\": [\"9.9.9.9\"]}}",
    )
    .unwrap();
    std::fs::write(
        dir.join("fly.toml"),
        "app = \"x\"\nmachine_config = \"machine.json\"\n[[files]]\nguest_path = \"/etc/hello\"\nlocal_path = \"hello.txt\"\n",
    )
    .unwrap();
    let mut c = load(&dir).unwrap().config;
    let from_disk = machine(&c, "app");
    c.inline_local_files().unwrap();
    assert_eq!(c.files[0].raw_value.as_deref(), Some("hello world\n"));
    assert!(c.files[0].local_path.is_none());
    let remote = AppConfig::from_json_value(serde_json::to_value(&c).unwrap()).unwrap();
    let m = machine(&remote, "app");
    assert_eq!(m, from_disk);
    assert_eq!(m.files[0].raw_value.as_deref(), Some("aGVsbG8gd29ybGQK"));
    assert_eq!(m.dns.unwrap().nameservers, strings(&["9.9.9.9"]));
    std::fs::remove_dir_all(&dir).unwrap();
}
