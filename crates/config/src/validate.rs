//! The rules of `fly config validate` (spec/flytoml.md §6.2), plus the checks the platform
//! would otherwise only reject at deploy time (ports, handlers, VM sizes, regions).

use std::collections::{BTreeMap, BTreeSet};

use aloft_api::{Duration, regions};

use crate::diagnostic::{ConfigError, Diagnostic, DiagnosticCode, Severity};
use crate::machine::{MachineConfigOptions, restart_policy, shell_split};
use crate::model::*;
use crate::suggest::did_you_mean;
use crate::units::{
    CPU_KINDS, GPU_KINDS, VM_SIZES, cpu_limits, parse_memory_mb, parse_volume_size_gb, preset,
};

pub const HANDLERS: &[&str] = &["http", "tls", "proxy_proto", "pg_tls"];
pub const PROTOCOLS: &[&str] = &["tcp", "udp"];
pub const STRATEGIES: &[&str] = &["canary", "rolling", "immediate", "bluegreen"];
pub const RESTART_POLICIES: &[&str] = &["always", "never", "on-failure"];
pub const CONCURRENCY_TYPES: &[&str] = &["connections", "requests"];
pub const CHECK_TYPES: &[&str] = &["http", "tcp"];
pub const CHECK_PROTOCOLS: &[&str] = &["http", "https"];
pub const KILL_SIGNALS: &[&str] = &[
    "SIGINT", "SIGTERM", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGKILL", "SIGSTOP",
];
pub const PERSIST_ROOTFS: &[&str] = &["never", "restart", "always"];
pub const COMPRESSIONS: &[&str] = &["gzip", "zstd"];
pub const PROXY_PROTO_VERSIONS: &[&str] = &["v1", "v2"];

fn one_of(values: &[&str]) -> String {
    format!("one of {}", values.join(", "))
}

struct Validator<'a> {
    config: &'a AppConfig,
    groups: BTreeSet<String>,
    /// "one of <groups>", built once.
    groups_expected: String,
    /// Suggestions among many groups are costly; absurd files get only the first ones.
    group_suggestions_left: usize,
    out: Vec<Diagnostic>,
}

/// Per-group conversion is checked for at most this many groups (each check is linear in
/// the config, so this bounds validation time on absurd inputs).
const MAX_GROUPS_CONVERTED: usize = 100;

/// "one of a, b, c", shortened when the list is long.
fn one_of_names<'a>(names: impl IntoIterator<Item = &'a String>) -> String {
    const SHOWN: usize = 20;
    let names: Vec<&String> = names.into_iter().collect();
    let mut text = names
        .iter()
        .take(SHOWN)
        .map(|n| n.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        text.push_str(&format!(", … ({} in all)", names.len()));
    }
    format!("one of {text}")
}

impl Validator<'_> {
    fn position(&self, path: &str) -> Option<(usize, usize)> {
        let positions = &self.config.source.positions;
        let mut current = path;
        loop {
            if let Some(p) = positions.get(current) {
                return Some(*p);
            }
            let cut = current.rfind(['.', '['])?;
            current = &current[..cut];
        }
    }

    fn push(&mut self, mut diagnostic: Diagnostic) {
        let fallback = self.config.source.from_text;
        if let Some((line, column)) = self
            .position(&diagnostic.path)
            .or(fallback.then_some((1, 1)))
        {
            diagnostic.line = Some(line);
            diagnostic.column = Some(column);
        }
        diagnostic.file = self.config.source.origin.clone();
        self.out.push(diagnostic);
    }

    fn error(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.push(Diagnostic::error(DiagnosticCode::Invalid, path, message));
    }

    fn warning(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.push(Diagnostic::warning(DiagnosticCode::Invalid, path, message));
    }

    /// Reports `value` when it is not one of `allowed`.
    fn enumerated(&mut self, path: &str, what: &str, value: &str, allowed: &[&str]) -> bool {
        if allowed.contains(&value) {
            return true;
        }
        self.push(
            Diagnostic::error(
                DiagnosticCode::Invalid,
                path,
                format!("unknown {what} `{value}`"),
            )
            .with_expected(one_of(allowed))
            .with_suggestion(did_you_mean(value, allowed.iter().copied())),
        );
        false
    }

    /// Reports groups in `processes` that `[processes]` does not define. flyctl's Validate
    /// refuses them only for services and restart policies; elsewhere it silently applies the
    /// section to no machine, so callers pass `Severity::Warning` there.
    fn groups_exist(
        &mut self,
        path: &str,
        processes: &[String],
        section: &str,
        severity: Severity,
    ) {
        for (i, group) in processes.iter().enumerate() {
            if self.groups.contains(group) {
                continue;
            }
            let message = if self.config.processes.is_empty() {
                format!(
                    "{section} specifies '{group}' as one of its processes, but no processes are defined; \
                     without [processes] the only group is 'app'"
                )
            } else {
                format!(
                    "{section} specifies '{group}' as one of its processes, but no processes are defined with that name"
                )
            };
            let suggestion = if self.group_suggestions_left > 0 && self.groups.len() <= 200 {
                self.group_suggestions_left -= 1;
                did_you_mean(group, self.groups.iter().map(String::as_str))
            } else {
                None
            };
            let message = match severity {
                Severity::Error => message,
                Severity::Warning => {
                    format!("{message}; flyctl accepts this, and the section applies to no machine")
                }
            };
            let suggestion = suggestion.or_else(|| {
                (section == "VM section" && matches!(group.as_str(), "release_command" | "release")).then(|| {
                    "the release command machine takes its size from `deploy.release_command_vm`"
                        .to_string()
                })
            });
            let expected = self.groups_expected.clone();
            let mut diagnostic = Diagnostic::error(
                DiagnosticCode::Invalid,
                format!("{path}.processes[{i}]"),
                message,
            )
            .with_expected(expected)
            .with_suggestion(suggestion);
            diagnostic.severity = severity;
            self.push(diagnostic);
        }
    }

    fn shell_command(&mut self, path: &str, command: &str, message: impl FnOnce(&str) -> String) {
        if let Err(err) = shell_split(command) {
            self.error(path, format!("{}: {err}", message(command)));
        }
    }
}

pub(crate) fn validate(config: &AppConfig) -> Vec<Diagnostic> {
    let groups: BTreeSet<String> = config.process_groups().into_iter().collect();
    let groups_expected = one_of_names(&groups);
    let mut v = Validator {
        config,
        groups,
        groups_expected,
        group_suggestions_left: 100,
        out: Vec::new(),
    };
    top_level(&mut v);
    build(&mut v);
    deploy(&mut v);
    processes(&mut v);
    services(&mut v);
    checks(&mut v);
    mounts(&mut v);
    vms(&mut v);
    restarts(&mut v);
    metrics(&mut v);
    files(&mut v);
    statics(&mut v);
    conversion(&mut v);
    v.out
}

fn top_level(v: &mut Validator) {
    let c = v.config;
    let region = c.primary_region.as_str();
    if !region.is_empty() {
        let well_formed = region
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        let codes = regions::REGIONS.iter().map(|r| r.code);
        match regions::find(region) {
            // flyctl checks no region offline, and real files carry placeholders such as
            // `{REGION}`: a warning, never an error.
            _ if !well_formed => v.push(
                Diagnostic::warning(
                    DiagnosticCode::Invalid,
                    "primary_region",
                    format!("invalid region code `{region}`"),
                )
                .with_expected("a region code such as ams, iad or ord")
                .with_suggestion(did_you_mean(&region.trim().to_ascii_lowercase(), codes)),
            ),
            Some(r) if r.deprecated => v.warning(
                "primary_region",
                format!(
                    "`{region}` ({}) is no longer a Fly.io deployable region",
                    r.name
                ),
            ),
            Some(_) => {}
            None => v.push(
                Diagnostic::warning(
                    DiagnosticCode::Invalid,
                    "primary_region",
                    format!(
                        "`{region}` is not a Fly.io region code (fine if this platform defines it)"
                    ),
                )
                .with_suggestion(did_you_mean(region, codes)),
            ),
        }
    }
    if let Some(signal) = &c.kill_signal {
        v.enumerated("kill_signal", "kill signal", signal, KILL_SIGNALS);
    }
    if let Some(timeout) = c.kill_timeout {
        if timeout < Duration::ZERO {
            v.error(
                "kill_timeout",
                format!("kill_timeout {timeout} is negative"),
            );
        } else if timeout > Duration::from_secs(300) {
            v.warning(
                "kill_timeout",
                format!(
                    "kill_timeout {timeout} is longer than the 5m0s maximum and will be capped"
                ),
            );
        }
    }
    if let Some(command) = &c.console_command {
        v.shell_command("console_command", command, |c| {
            format!("Can't shell split console command: '{c}'")
        });
    }
    for name in c.env.keys() {
        let path = format!("env.{name}");
        if name.is_empty() {
            v.error(path, "environment variable names cannot be empty");
        } else if name.starts_with("FLY_") {
            v.warning(
                path,
                format!("`{name}`: names starting with FLY_ are reserved for the platform"),
            );
        }
    }
}

fn build(v: &mut Validator) {
    let Some(build) = &v.config.build else { return };
    let mut strategies = Vec::new();
    if build.image.is_some() {
        strategies.push("the \"image\" config");
    }
    if build.builder.is_some() || !build.buildpacks.is_empty() {
        strategies.push("the \"builder\" and/or \"buildpacks\" config");
    }
    if build.dockerfile.is_some() || build.build_target.is_some() {
        strategies.push("the \"dockerfile\" and/or \"build-target\" config");
    }
    if build.builtin.is_some() {
        strategies.push("the \"builtin\" config");
    }
    if strategies.len() > 1 {
        v.warning(
            "build",
            format!(
                "more than one build configuration found: [{}]",
                strategies.join(", ")
            ),
        );
    }
    if let Some(compression) = &build.compression
        && !COMPRESSIONS.contains(&compression.as_str())
    {
        v.push(
                Diagnostic::error(
                    DiagnosticCode::Invalid,
                    "build.compression",
                    format!("Invalid value '{compression}' for compression. Valid options are 'gzip', 'zstd', or leave unset."),
                )
                .with_expected(one_of(COMPRESSIONS))
                .with_suggestion(did_you_mean(compression, COMPRESSIONS.iter().copied())),
            );
    }
    if let Some(level) = build.compression_level
        && !(0..=9).contains(&level)
    {
        v.push(
                Diagnostic::error(
                    DiagnosticCode::Invalid,
                    "build.compression_level",
                    format!("Invalid value '{level}' for compression level. Must be an integer between 0 and 9."),
                )
                .with_expected("an integer from 0 to 9"),
            );
    }
}

fn deploy(v: &mut Validator) {
    let Some(deploy) = &v.config.deploy else {
        return;
    };
    if let Some(command) = &deploy.release_command {
        v.shell_command("deploy.release_command", command, |c| {
            format!("Can't shell split release command: '{c}'")
        });
    }
    if let Some(strategy) = &deploy.strategy {
        if !STRATEGIES.contains(&strategy.as_str()) {
            v.push(
                Diagnostic::error(
                    DiagnosticCode::Invalid,
                    "deploy.strategy",
                    format!(
                        "unsupported deployment strategy '{strategy}'; Apps v2 supports the following strategies: {}",
                        STRATEGIES.join(", ")
                    ),
                )
                .with_expected(one_of(STRATEGIES))
                .with_suggestion(did_you_mean(strategy, STRATEGIES.iter().copied())),
            );
        }
        if strategy == "canary" && !v.config.mounts.is_empty() {
            v.error(
                "deploy.strategy",
                "error canary deployment strategy is not supported when using mounted volumes",
            );
        }
        if strategy == "bluegreen" && !has_any_checks(v.config) {
            v.warning("deploy.strategy", "bluegreen deployments need health checks to decide when to cut over; none are defined");
        }
    }
    if let Some(max) = deploy.max_unavailable
        && (max.is_nan() || max <= 0.0)
    {
        v.push(
            Diagnostic::error(
                DiagnosticCode::Invalid,
                "deploy.max_unavailable",
                format!("max_unavailable {max} must be positive"),
            )
            .with_expected("a fraction below 1 (e.g. 0.33) or a machine count of 1 or more"),
        );
    }
    for (key, value) in [
        ("wait_timeout", deploy.wait_timeout),
        ("release_command_timeout", deploy.release_command_timeout),
    ] {
        if value.is_some_and(|d| d < Duration::ZERO) {
            v.error(format!("deploy.{key}"), format!("{key} is negative"));
        }
    }
    if let Some(vm) = &deploy.release_command_vm {
        vm_section(v, "deploy.release_command_vm", vm);
    }
}

fn has_any_checks(config: &AppConfig) -> bool {
    !config.checks.is_empty()
        || config
            .http_service
            .as_ref()
            .is_some_and(|h| !h.checks.is_empty())
        || config
            .services
            .iter()
            .any(|s| !s.tcp_checks.is_empty() || !s.http_checks.is_empty())
}

fn processes(v: &mut Validator) {
    for (group, command) in &v.config.processes {
        if group.is_empty() {
            v.error("processes", "process group names cannot be empty");
        }
        let path = format!("processes.{group}");
        v.shell_command(&path, command, |_| {
            format!(
                "Could not parse command for '{group}' process group; check [processes] section"
            )
        });
    }
}

/// One exposed port range of a service entry, for the duplicate check.
struct Exposed {
    protocol: String,
    start: u16,
    end: u16,
    path: String,
    owner: String,
}

fn services(v: &mut Validator) {
    let config = v.config;
    let defined = config.processes.len();
    let mut exposed: Vec<Exposed> = Vec::new();
    let service_groups = |v: &mut Validator, path: &str, processes: &[String]| {
        if processes.is_empty() && defined > 0 {
            v.push(
                Diagnostic::error(
                    DiagnosticCode::Invalid,
                    path,
                    format!(
                        "Service has no processes set but app has {defined} processes defined; \
                         update fly.toml to set processes for each service"
                    ),
                )
                .with_suggestion(Some(format!(
                    "add `processes = [\"{}\"]`",
                    config.default_process_group()
                ))),
            );
        }
        v.groups_exist(path, processes, "Service", Severity::Error);
    };
    if let Some(http) = &config.http_service {
        let path = "http_service";
        service_groups(v, path, &http.processes);
        if http.internal_port == 0 {
            v.warning(
                format!("{path}.internal_port"),
                "internal_port is not set; the app must listen on 8080",
            );
        }
        if let Some(c) = &http.concurrency {
            concurrency(v, &format!("{path}.concurrency"), c);
        }
        for (i, check) in http.checks.iter().enumerate() {
            service_check_timing(
                v,
                &format!("{path}.checks[{i}]"),
                check.interval,
                check.timeout,
                check.grace_period,
            );
            http_check_fields(v, &format!("{path}.checks[{i}]"), check);
        }
        machine_checks(v, &format!("{path}.machine_checks"), &http.machine_checks);
        for (port, handlers) in [(80u16, "http"), (443, "http, tls")] {
            exposed.push(Exposed {
                protocol: "tcp".into(),
                start: port,
                end: port,
                path: path.to_string(),
                owner: format!("http_service ({handlers})"),
            });
        }
    }
    for (i, service) in config.services.iter().enumerate() {
        let path = format!("services[{i}]");
        service_groups(v, &path, &service.processes);
        if service.internal_port == 0 {
            v.warning(
                format!("{path}.internal_port"),
                "internal_port is not set; the app must listen on 8080",
            );
        }
        let protocol = if service.protocol.is_empty() {
            "tcp"
        } else {
            service.protocol.as_str()
        };
        if !service.protocol.is_empty() {
            v.enumerated(
                &format!("{path}.protocol"),
                "protocol",
                &service.protocol,
                PROTOCOLS,
            );
        }
        if service.ports.is_empty() {
            v.warning(
                path.clone(),
                "WARNING: Service must expose at least one port. Add a [[services.ports]] section to fly.toml; \
                 Check docs at https://fly.io/docs/reference/configuration/#services-ports",
            );
        }
        if let Some(c) = &service.concurrency {
            concurrency(v, &format!("{path}.concurrency"), c);
        }
        for (j, port) in service.ports.iter().enumerate() {
            let port_path = format!("{path}.ports[{j}]");
            if let Some((start, end)) = port_entry(v, &port_path, port, protocol) {
                exposed.push(Exposed {
                    protocol: protocol.to_string(),
                    start,
                    end,
                    path: port_path,
                    owner: path.clone(),
                });
            }
        }
        for (j, check) in service.tcp_checks.iter().enumerate() {
            service_check_timing(
                v,
                &format!("{path}.tcp_checks[{j}]"),
                check.interval,
                check.timeout,
                check.grace_period,
            );
        }
        for (j, check) in service.http_checks.iter().enumerate() {
            let check_path = format!("{path}.http_checks[{j}]");
            service_check_timing(
                v,
                &check_path,
                check.interval,
                check.timeout,
                check.grace_period,
            );
            http_check_fields(v, &check_path, check);
        }
        machine_checks(
            v,
            &format!("{path}.machine_checks"),
            &service.machine_checks,
        );
    }
    // Sorted sweep: each entry is compared with the widest range seen so far.
    let mut order: Vec<usize> = (0..exposed.len()).collect();
    order.sort_by(|&a, &b| {
        (&exposed[a].protocol, exposed[a].start, a).cmp(&(
            &exposed[b].protocol,
            exposed[b].start,
            b,
        ))
    });
    let mut widest: Option<usize> = None;
    for &i in &order {
        let later = &exposed[i];
        if let Some(w) = widest {
            let earlier = &exposed[w];
            if earlier.protocol == later.protocol && later.start <= earlier.end {
                let port = later.start;
                // flyctl's Validate does not compare ports across services, so this warns.
                v.push(
                    Diagnostic::warning(
                        DiagnosticCode::Invalid,
                        later.path.clone(),
                        format!(
                            "port {port}/{} is already exposed by {} (the proxy routes each external port to one service)",
                            later.protocol, earlier.owner
                        ),
                    )
                    .with_suggestion(Some(format!("pick another external port than {port}"))),
                );
            }
        }
        let replace = widest
            .is_none_or(|w| exposed[w].protocol != later.protocol || later.end > exposed[w].end);
        if replace {
            widest = Some(i);
        }
    }
}

/// Checks one `[[services.ports]]` entry; returns the range it exposes.
fn port_entry(v: &mut Validator, path: &str, port: &Port, protocol: &str) -> Option<(u16, u16)> {
    let range = match (port.port, port.start_port, port.end_port) {
        (Some(p), None, None) => Some((p, p)),
        (Some(p), _, _) => {
            v.warning(
                format!("{path}.port"),
                "both `port` and `start_port`/`end_port` are set; the range is ignored",
            );
            Some((p, p))
        }
        (None, Some(start), Some(end)) => {
            if start > end {
                v.push(
                    Diagnostic::error(
                        DiagnosticCode::Invalid,
                        format!("{path}.start_port"),
                        format!("start_port {start} is greater than end_port {end}"),
                    )
                    .with_expected("start_port <= end_port"),
                );
                None
            } else {
                Some((start, end))
            }
        }
        (None, _, _) => {
            v.push(
                Diagnostic::error(
                    DiagnosticCode::Invalid,
                    path,
                    "the port entry exposes no port",
                )
                .with_expected("`port`, or both `start_port` and `end_port`"),
            );
            None
        }
    };
    let mut ok_range = range;
    for (key, value) in [
        ("port", port.port),
        ("start_port", port.start_port),
        ("end_port", port.end_port),
    ] {
        if value == Some(0) {
            v.push(
                Diagnostic::error(
                    DiagnosticCode::Invalid,
                    format!("{path}.{key}"),
                    "port 0 is not a valid port",
                )
                .with_expected("a port from 1 to 65535"),
            );
            ok_range = None;
        }
    }
    let handlers_path = format!("{path}.handlers");
    let mut known = true;
    for (i, handler) in port.handlers.iter().enumerate() {
        known &= v.enumerated(
            &format!("{handlers_path}[{i}]"),
            "handler",
            handler,
            HANDLERS,
        );
    }
    let has = |h: &str| port.handlers.iter().any(|x| x == h);
    if known {
        if has("pg_tls") && (has("http") || has("tls")) {
            v.push(
                Diagnostic::error(
                    DiagnosticCode::Invalid,
                    handlers_path.clone(),
                    format!(
                        "handler pg_tls cannot be combined with http or tls (handlers = {:?})",
                        port.handlers
                    ),
                )
                .with_expected("[\"pg_tls\"] alone"),
            );
        }
        if protocol == "udp" && !port.handlers.is_empty() {
            v.push(
                Diagnostic::error(
                    DiagnosticCode::Invalid,
                    handlers_path.clone(),
                    "UDP ports cannot have handlers",
                )
                .with_suggestion(Some("remove `handlers` from UDP services".to_string())),
            );
        }
    }
    if port.force_https && !has("http") {
        v.push(
            Diagnostic::error(
                DiagnosticCode::Invalid,
                format!("{path}.force_https"),
                "force_https needs the http handler on this port",
            )
            .with_suggestion(Some(
                "add \"http\" to `handlers`, or remove force_https".to_string(),
            )),
        );
    }
    if port.http_options.is_some() && !has("http") {
        v.warning(
            format!("{path}.http_options"),
            "http_options has no effect without the http handler",
        );
    }
    if port.tls_options.is_some() && !has("tls") {
        v.warning(
            format!("{path}.tls_options"),
            "tls_options has no effect without the tls handler",
        );
    }
    if let Some(options) = &port.proxy_proto_options {
        if !has("proxy_proto") {
            v.warning(
                format!("{path}.proxy_proto_options"),
                "proxy_proto_options has no effect without the proxy_proto handler",
            );
        }
        if !options.version.is_empty() {
            v.enumerated(
                &format!("{path}.proxy_proto_options.version"),
                "PROXY protocol version",
                &options.version,
                PROXY_PROTO_VERSIONS,
            );
        }
    }
    ok_range
}

fn concurrency(v: &mut Validator, path: &str, c: &Concurrency) {
    if !c.kind.is_empty() {
        v.enumerated(
            &format!("{path}.type"),
            "concurrency type",
            &c.kind,
            CONCURRENCY_TYPES,
        );
    }
    if let (Some(soft), Some(hard)) = (c.soft_limit, c.hard_limit)
        && soft > hard
    {
        v.warning(
            format!("{path}.soft_limit"),
            format!("soft_limit {soft} is above hard_limit {hard}"),
        );
    }
}

fn service_check_timing(
    v: &mut Validator,
    path: &str,
    interval: Option<Duration>,
    timeout: Option<Duration>,
    grace: Option<Duration>,
) {
    let second = Duration::from_secs(1);
    let minute = Duration::from_secs(60);
    for (key, value) in [("interval", interval), ("timeout", timeout)] {
        match value {
            Some(d) if d < second => v.warning(
                format!("{path}.{key}"),
                format!("{key} {d} is less than 1s and will be raised to 1s"),
            ),
            Some(d) if d > minute => v.warning(
                format!("{path}.{key}"),
                format!("{key} {d} is more than 1m0s and will be lowered to 1m0s"),
            ),
            _ => {}
        }
    }
    if let Some(d) = grace.filter(|d| !d.is_zero() && *d < second) {
        v.warning(
            format!("{path}.grace_period"),
            format!("grace_period {d} is less than 1s and will be raised to 1s"),
        );
    }
}

fn http_check_fields(v: &mut Validator, path: &str, check: &HttpCheck) {
    if let Some(protocol) = &check.protocol {
        v.enumerated(
            &format!("{path}.protocol"),
            "check protocol",
            protocol,
            CHECK_PROTOCOLS,
        );
    }
    if let Some(p) = check.path.as_ref().filter(|p| !p.starts_with('/')) {
        v.warning(
            format!("{path}.path"),
            format!("check path `{p}` does not start with /"),
        );
    }
}

fn machine_checks(v: &mut Validator, path: &str, checks: &[MachineCheckConfig]) {
    for (i, check) in checks.iter().enumerate() {
        if check.command.is_empty() {
            v.error(
                format!("{path}[{i}].command"),
                "missing command for test machine",
            );
        }
    }
}

fn checks(v: &mut Validator) {
    let config = v.config;
    for (name, check) in &config.checks {
        let path = format!("checks.{name}");
        match check.check_type.as_deref() {
            Some("http" | "tcp") => {}
            other => v.push(
                Diagnostic::error(
                    DiagnosticCode::Invalid,
                    format!("{path}.type"),
                    format!("Can't process top level check '{name}': Missing or invalid check type, must be 'http' or 'tcp'"),
                )
                .with_expected(one_of(CHECK_TYPES))
                .with_suggestion(other.and_then(|t| did_you_mean(t, CHECK_TYPES.iter().copied()))),
            ),
        }
        if let Some(interval) = check.interval.filter(|d| *d < Duration::from_secs(2)) {
            v.push(
                Diagnostic::error(
                    DiagnosticCode::Invalid,
                    format!("{path}.interval"),
                    format!(
                        "Check '{name}' interval is too short: {interval}, minimum is 2 seconds"
                    ),
                )
                .with_expected("at least 2s"),
            );
        }
        if let Some(timeout) = check.timeout.filter(|d| *d > Duration::from_secs(60)) {
            v.push(
                Diagnostic::error(
                    DiagnosticCode::Invalid,
                    format!("{path}.timeout"),
                    format!("Check '{name}' timeout is too long: {timeout}, maximum is 60 seconds"),
                )
                .with_expected("at most 60s"),
            );
        }
        if check.port == Some(0) {
            v.error(format!("{path}.port"), "port 0 is not a valid port");
        }
        if let Some(protocol) = &check.protocol {
            v.enumerated(
                &format!("{path}.protocol"),
                "check protocol",
                protocol,
                CHECK_PROTOCOLS,
            );
        }
        v.groups_exist(&path, &check.processes, "Check", Severity::Warning);
    }
}

fn size_gb(v: &mut Validator, path: &str, source: &str, key: &str, value: &str) -> Option<u64> {
    match parse_volume_size_gb(value) {
        Ok(gb) => Some(gb),
        Err(err) => {
            v.push(
                Diagnostic::error(
                    DiagnosticCode::Invalid,
                    path,
                    format!("mount '{source}' with {key} '{value}' will fail because of: {err}"),
                )
                .with_expected("a size such as \"10gb\" or a number of GB"),
            );
            None
        }
    }
}

fn mounts(v: &mut Validator) {
    let config = v.config;
    for (i, mount) in config.mounts.iter().enumerate() {
        let path = format!("mounts[{i}]");
        let source = mount.source.as_str();
        if source.is_empty() {
            v.error(
                format!("{path}.source"),
                "mount has no source (volume name)",
            );
        } else if !source
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            v.warning(
                format!("{path}.source"),
                format!(
                    "volume name '{source}' should contain only letters, digits and underscores"
                ),
            );
        }
        if mount.destination.is_empty() {
            v.error(
                format!("{path}.destination"),
                "mount has no destination path",
            );
        } else if mount.destination == "/" {
            v.error(
                format!("{path}.destination"),
                "a volume cannot be mounted at /",
            );
        }
        if let Some(size) = &mount.initial_size {
            let key_path = format!("{path}.initial_size");
            if size_gb(v, &key_path, source, "initial_size", size) == Some(0) {
                v.push(
                    Diagnostic::error(
                        DiagnosticCode::Invalid,
                        key_path,
                        format!("mount '{source}' has an initial_size '{size}' value which is smaller than 1GB"),
                    )
                    .with_expected("at least 1GB"),
                );
            }
        }
        if let Some(days) = mount.snapshot_retention
            && !(1..=60).contains(&days)
        {
            v.push(
                    Diagnostic::error(
                        DiagnosticCode::Invalid,
                        format!("{path}.snapshot_retention"),
                        format!("mount '{source}' has a snapshot_retention value which is not between 1 and 60 days inclusive"),
                    )
                    .with_expected("1 to 60"),
                );
        }
        // flyctl reads these as Go zero values: 0 and "" mean unset.
        let threshold = mount.auto_extend_size_threshold.filter(|t| *t != 0);
        let increment = mount
            .auto_extend_size_increment
            .clone()
            .filter(|s| !s.is_empty());
        let limit = mount
            .auto_extend_size_limit
            .clone()
            .filter(|s| !s.is_empty());
        let extend = [threshold.is_some(), increment.is_some(), limit.is_some()];
        if extend.iter().any(|x| *x) && !extend.iter().all(|x| *x) {
            v.error(
                format!("{path}.auto_extend_size_threshold"),
                format!(
                    "mount '{source}': auto_extend_size_threshold, auto_extend_size_increment and \
                     auto_extend_size_limit must be all defined or none"
                ),
            );
        }
        if let Some(threshold) = threshold.filter(|t| !(50..=99).contains(t)) {
            v.push(
                Diagnostic::error(
                    DiagnosticCode::Invalid,
                    format!("{path}.auto_extend_size_threshold"),
                    format!("mount '{source}' has auto_extend_size_threshold {threshold} which is not between 50 and 99"),
                )
                .with_expected("a percentage from 50 to 99"),
            );
        }
        for (key, value, max) in [
            ("auto_extend_size_increment", &increment, 100),
            ("auto_extend_size_limit", &limit, 500),
        ] {
            if let Some(value) = value {
                let key_path = format!("{path}.{key}");
                if let Some(gb) = size_gb(v, &key_path, source, key, value)
                    && !(1..=max).contains(&gb)
                {
                    v.push(
                            Diagnostic::error(
                                DiagnosticCode::Invalid,
                                key_path,
                                format!("mount '{source}' has {key} '{value}' which is not between 1GB and {max}GB"),
                            )
                            .with_expected(format!("1GB to {max}GB")),
                        );
                }
            }
        }
        v.groups_exist(&path, &mount.processes, "Mount", Severity::Warning);
    }
    let default_group = config.default_process_group();
    let mut first_mount: BTreeMap<&str, usize> = BTreeMap::new();
    let mut reported: BTreeSet<&str> = BTreeSet::new();
    for (i, mount) in config.mounts.iter().enumerate() {
        let groups: Vec<&str> = if mount.processes.is_empty() {
            vec![default_group.as_str()]
        } else {
            mount
                .processes
                .iter()
                .map(String::as_str)
                .filter(|g| v.groups.contains(*g))
                .collect()
        };
        for group in groups {
            if first_mount.insert(group, i).is_some() && reported.insert(group) {
                v.error(
                    format!("mounts[{i}]"),
                    format!("group '{group}' has more than one [[mounts]] section defined"),
                );
            }
        }
    }
}

fn vm_section(v: &mut Validator, path: &str, vm: &Vm) {
    if let Some(size) = &vm.size
        && preset(size).is_none()
    {
        let names: Vec<&str> = VM_SIZES.iter().map(|p| p.name).collect();
        v.push(
            Diagnostic::error(
                DiagnosticCode::Invalid,
                format!("{path}.size"),
                format!("'{size}' is an invalid machine size"),
            )
            .with_expected(one_of(&names))
            .with_suggestion(did_you_mean(size, names.iter().copied())),
        );
        return;
    }
    if let Some(kind) = &vm.cpu_kind
        && !v.enumerated(&format!("{path}.cpu_kind"), "cpu_kind", kind, CPU_KINDS)
    {
        return;
    }
    if let Some(kind) = &vm.gpu_kind
        && !v.enumerated(&format!("{path}.gpu_kind"), "gpu_kind", kind, GPU_KINDS)
    {
        return;
    }
    if let Some(persist) = &vm.persist_rootfs {
        v.enumerated(
            &format!("{path}.persist_rootfs"),
            "persist_rootfs value",
            persist,
            PERSIST_ROOTFS,
        );
    }
    if let Some(memory) = &vm.memory {
        match parse_memory_mb(memory) {
            Ok(0) => {
                v.error(
                    format!("{path}.memory"),
                    format!("memory '{memory}' is zero"),
                );
                return;
            }
            Err(err) => {
                v.push(
                    Diagnostic::error(DiagnosticCode::Invalid, format!("{path}.memory"), err)
                        .with_expected("a size such as \"512mb\" or \"2gb\", or a number of MB"),
                );
                return;
            }
            Ok(_) => {}
        }
    }
    if vm.memory_mb == Some(0) {
        v.error(format!("{path}.memory_mb"), "memory_mb is zero");
    }
    let Ok(guest) = vm.to_guest() else { return };
    if guest.gpu_kind.is_some() {
        return;
    }
    let Some((cpu_counts, min_per_cpu, max_per_cpu)) = cpu_limits(&guest.cpu_kind) else {
        return;
    };
    // flyctl's Validate accepts any cpus/memory combination (the Machines API refuses a
    // size it does not offer at deploy), so these are warnings.
    let kind = guest.cpu_kind.as_str();
    if !cpu_counts.contains(&guest.cpus) {
        let counts: Vec<String> = cpu_counts.iter().map(u32::to_string).collect();
        v.push(
            Diagnostic::warning(
                DiagnosticCode::Invalid,
                format!("{path}.cpus"),
                format!(
                    "{} {kind} CPUs is not an available machine size; the Machines API refuses it at deploy",
                    guest.cpus
                ),
            )
            .with_expected(format!("one of {} for cpu_kind {kind}", counts.join(", "))),
        );
        return;
    }
    let (min, max) = (min_per_cpu * guest.cpus, max_per_cpu * guest.cpus);
    let memory_path = if vm.memory_mb.is_some() {
        format!("{path}.memory_mb")
    } else {
        format!("{path}.memory")
    };
    if guest.memory_mb < min || guest.memory_mb > max {
        let fitting = VM_SIZES
            .iter()
            .filter(|p| p.cpu_kind == kind && p.gpus == 0)
            .filter(|p| (min_per_cpu * p.cpus..=max_per_cpu * p.cpus).contains(&guest.memory_mb))
            .map(|p| p.name)
            .next();
        v.push(
            Diagnostic::warning(
                DiagnosticCode::Invalid,
                memory_path,
                format!(
                    "{} MB of memory does not fit {} {kind} CPU(s); the Machines API refuses it at deploy",
                    guest.memory_mb, guest.cpus
                ),
            )
            .with_expected(format!(
                "between {min} and {max} MB for {} {kind} CPU(s)",
                guest.cpus
            ))
            .with_suggestion(fitting.map(|name| format!("did you mean size `{name}`?"))),
        );
    } else if guest.memory_mb % 256 != 0 {
        v.push(
            Diagnostic::warning(
                DiagnosticCode::Invalid,
                memory_path,
                format!(
                    "{} MB of memory is not a multiple of 256 MB; the Machines API refuses it at deploy",
                    guest.memory_mb
                ),
            )
            .with_expected("a multiple of 256 MB"),
        );
    }
}

fn vms(v: &mut Validator) {
    let config = v.config;
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for (i, vm) in config.vm.iter().enumerate() {
        let path = format!("vm[{i}]");
        vm_section(v, &path, vm);
        v.groups_exist(&path, &vm.processes, "VM section", Severity::Warning);
        let keys: Vec<String> = if vm.processes.is_empty() {
            vec![String::new()]
        } else {
            vm.processes.clone()
        };
        for key in keys {
            if let Some(previous) = seen.insert(key.clone(), i) {
                let whom = if key.is_empty() {
                    "every group".to_string()
                } else {
                    format!("group '{key}'")
                };
                v.warning(
                    path.clone(),
                    format!("vm[{previous}] already sizes {whom}; this section takes precedence"),
                );
            }
        }
    }
}

fn restarts(v: &mut Validator) {
    for (i, restart) in v.config.restart.iter().enumerate() {
        let path = format!("restart[{i}]");
        if restart_policy(&restart.policy).is_none() {
            v.push(
                Diagnostic::error(
                    DiagnosticCode::Invalid,
                    format!("{path}.policy"),
                    format!("invalid restart policy: {}", restart.policy),
                )
                .with_expected(one_of(RESTART_POLICIES))
                .with_suggestion(did_you_mean(
                    &restart.policy,
                    RESTART_POLICIES.iter().copied(),
                )),
            );
        }
        v.groups_exist(&path, &restart.processes, "Restart policy", Severity::Error);
    }
}

fn metrics(v: &mut Validator) {
    for (i, metrics) in v.config.metrics.iter().enumerate() {
        let path = format!("metrics[{i}]");
        match metrics.port {
            None => v.push(
                Diagnostic::error(
                    DiagnosticCode::Invalid,
                    format!("{path}.port"),
                    "metrics has no port",
                )
                .with_expected("the port of the Prometheus endpoint"),
            ),
            Some(0) => v.error(format!("{path}.port"), "port 0 is not a valid port"),
            Some(_) => {}
        }
        if let Some(p) = metrics.path.as_ref().filter(|p| !p.starts_with('/')) {
            v.warning(
                format!("{path}.path"),
                format!("metrics path `{p}` does not start with /"),
            );
        }
        v.groups_exist(&path, &metrics.processes, "Metrics", Severity::Warning);
    }
}

fn files(v: &mut Validator) {
    for (i, file) in v.config.files.iter().enumerate() {
        let path = format!("files[{i}]");
        if file.guest_path.is_empty() {
            v.error(format!("{path}.guest_path"), "file has no guest_path");
        } else if !file.guest_path.starts_with('/') {
            v.error(
                format!("{path}.guest_path"),
                format!("guest_path '{}' must be absolute", file.guest_path),
            );
        }
        let sources = [
            file.local_path.is_some(),
            file.raw_value.is_some(),
            file.secret_name.is_some(),
        ];
        if sources.iter().filter(|x| **x).count() != 1 {
            v.push(
                Diagnostic::error(
                    DiagnosticCode::Invalid,
                    path.clone(),
                    "a file needs exactly one source",
                )
                .with_expected("one of local_path, raw_value, secret_name"),
            );
        }
        v.groups_exist(&path, &file.processes, "File", Severity::Warning);
    }
}

fn statics(v: &mut Validator) {
    let mut prefixes: Vec<&str> = Vec::new();
    for (i, s) in v.config.statics.iter().enumerate() {
        let path = format!("statics[{i}]");
        if s.guest_path.is_empty() {
            v.error(
                format!("{path}.guest_path"),
                "statics entry has no guest_path",
            );
        }
        if s.url_prefix.is_empty() {
            v.error(
                format!("{path}.url_prefix"),
                "statics entry has no url_prefix",
            );
        } else if prefixes.contains(&s.url_prefix.as_str()) {
            v.error(
                format!("{path}.url_prefix"),
                format!("url_prefix '{}' is mapped twice", s.url_prefix),
            );
        }
        prefixes.push(&s.url_prefix);
    }
    if v.config.statics.len() > 10 {
        v.warning(
            "statics",
            format!(
                "{} statics mappings; the platform honours at most 10",
                v.config.statics.len()
            ),
        );
    }
}

/// Every group's machine config must be computable; rule violations already reported
/// above are not repeated.
fn conversion(v: &mut Validator) {
    let config = v.config;
    let opts = MachineConfigOptions::default();
    for group in config
        .process_groups()
        .into_iter()
        .take(MAX_GROUPS_CONVERTED)
    {
        let error = match config.to_machine_config(&group, &opts) {
            Ok(_) => continue,
            Err(error) => error,
        };
        let path = match &error {
            ConfigError::CheckWithoutPort { check, .. } => format!("checks.{check}.port"),
            ConfigError::MachineConfig(_) => "machine_config".to_string(),
            ConfigError::Compose(_) => "build.compose".to_string(),
            ConfigError::File { path, message } => {
                v.push(Diagnostic::warning(
                    DiagnosticCode::Conversion,
                    path.clone(),
                    format!("{message}; deploy will fail"),
                ));
                continue;
            }
            _ => continue,
        };
        v.push(Diagnostic::error(
            DiagnosticCode::Conversion,
            path,
            error.to_string(),
        ));
    }
}
