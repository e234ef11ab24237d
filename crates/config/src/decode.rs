//! From the generic tree to the typed config, applying flyctl's normalisation patches
//! (spec/flytoml.md §3) on the way. Every problem becomes a diagnostic with the key path
//! and source position; decoding goes on after a problem so that all are reported at once.

use std::collections::BTreeMap;

use aloft_api::{AutoStop, Duration};

use crate::diagnostic::{Diagnostic, DiagnosticCode};
use crate::model::*;
use crate::node::{Entry, Kind, LineIndex, Node};
use crate::suggest;

pub(crate) struct Cx<'a> {
    pub diagnostics: Vec<Diagnostic>,
    /// Suggestions cost an edit distance per known key; absurd files get them only for
    /// their first unknown keys.
    suggestions_left: usize,
    pub positions: BTreeMap<String, (usize, usize)>,
    index: Option<&'a LineIndex>,
    origin: &'a str,
}

impl<'a> Cx<'a> {
    pub fn new(index: Option<&'a LineIndex>, origin: &'a str) -> Self {
        Self {
            diagnostics: Vec::new(),
            suggestions_left: 1000,
            positions: BTreeMap::new(),
            index,
            origin,
        }
    }

    fn record(&mut self, path: &str, offset: Option<usize>) {
        if let (Some(index), Some(offset)) = (self.index, offset) {
            self.positions
                .entry(path.to_string())
                .or_insert_with(|| index.position(offset));
        }
    }

    /// Nearest recorded position of `path` or one of its ancestors.
    pub fn position_of(&self, path: &str) -> Option<(usize, usize)> {
        let mut current = path;
        loop {
            if let Some(p) = self.positions.get(current) {
                return Some(*p);
            }
            let cut = current.rfind(['.', '['])?;
            current = &current[..cut];
        }
    }

    /// Positions the diagnostic at its key when the key was seen, else at `offset`, else
    /// at the nearest enclosing key (else the start of the file).
    fn push(&mut self, mut diagnostic: Diagnostic, offset: Option<usize>) {
        let position = match (self.positions.get(&diagnostic.path), self.index, offset) {
            (Some(&p), _, _) => Some(p),
            (None, Some(index), Some(offset)) => Some(index.position(offset)),
            (None, Some(_), None) => Some(self.position_of(&diagnostic.path).unwrap_or((1, 1))),
            (None, None, _) => None,
        };
        if let Some((line, column)) = position {
            diagnostic.line = Some(line);
            diagnostic.column = Some(column);
        }
        diagnostic.file = Some(self.origin.to_string());
        self.diagnostics.push(diagnostic);
    }

    fn error(&mut self, path: &str, node: &Node, message: impl Into<String>) {
        let offset = node.span.as_ref().map(|s| s.start);
        self.push(
            Diagnostic::error(DiagnosticCode::Type, path, message),
            offset,
        );
    }

    fn type_error(&mut self, path: &str, node: &Node, expected: &str) {
        let found = match &node.kind {
            Kind::Str(s) => format!("a string ({s:?})"),
            Kind::Int(i) => format!("an integer ({i})"),
            Kind::Float(f) => format!("a float ({f})"),
            Kind::Bool(b) => format!("a boolean ({b})"),
            _ => node.describe().to_string(),
        };
        let offset = node.span.as_ref().map(|s| s.start);
        self.push(
            Diagnostic::error(DiagnosticCode::Type, path, format!("invalid type: {found}"))
                .with_expected(expected),
            offset,
        );
    }
}

pub(crate) fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn index_path(path: &str, i: usize) -> String {
    format!("{path}[{i}]")
}

/// Keys that real files carry and flyctl silently ignores; reported with a gentler note.
const LEGACY_KEYS: &[&str] = &[
    "org",
    "allowed_public_ports",
    "private_network",
    "enable_6pn",
    "max_per_region",
    "sticky_sessions",
    "restart_limit",
    "script_checks",
];

/// Reads the keys of one table, remembering which were used so the rest can be reported.
struct Fields<'n> {
    entries: &'n [Entry],
    used: Vec<bool>,
    path: String,
}

impl<'n> Fields<'n> {
    fn open(cx: &mut Cx, node: &'n Node, path: &str, expected: &str) -> Option<Self> {
        match &node.kind {
            Kind::Table(entries) => Some(Self {
                entries,
                used: vec![false; entries.len()],
                path: path.to_string(),
            }),
            _ => {
                cx.type_error(path, node, expected);
                None
            }
        }
    }

    fn take(&mut self, cx: &mut Cx, key: &str) -> Option<(&'n Node, String)> {
        let i = self.entries.iter().position(|e| e.key == key)?;
        self.used[i] = true;
        let entry = &self.entries[i];
        let path = join(&self.path, key);
        cx.record(&path, entry.position());
        Some((&entry.value, path))
    }

    fn get<T>(
        &mut self,
        cx: &mut Cx,
        key: &str,
        read: impl FnOnce(&mut Cx, &str, &Node) -> Option<T>,
    ) -> Option<T> {
        let (node, path) = self.take(cx, key)?;
        read(cx, &path, node)
    }

    /// Reports the keys nobody asked for and returns them for keeping.
    fn finish(self, cx: &mut Cx, known: &[&str]) -> Extra {
        let mut extra = Extra::new();
        for (entry, used) in self.entries.iter().zip(&self.used) {
            if *used {
                continue;
            }
            let path = join(&self.path, &entry.key);
            cx.record(&path, entry.position());
            let is_section = matches!(entry.value.kind, Kind::Table(_) | Kind::Array(_));
            let what = if self.path.is_empty() && is_section {
                "section"
            } else {
                "key"
            };
            let legacy = LEGACY_KEYS.contains(&entry.key.as_str());
            let message = if legacy {
                format!(
                    "unknown {what} `{}` (a legacy key flyctl ignores)",
                    entry.key
                )
            } else {
                format!("unknown {what} `{}` is ignored", entry.key)
            };
            let suggestion = if legacy || cx.suggestions_left == 0 {
                None
            } else {
                cx.suggestions_left -= 1;
                suggest::did_you_mean(&entry.key, known.iter().copied())
            };
            let diagnostic = Diagnostic::warning(DiagnosticCode::UnknownKey, &path, message)
                .with_suggestion(suggestion);
            cx.push(diagnostic, entry.position());
            extra.insert(entry.key.clone(), entry.value.to_json());
        }
        extra
    }
}

// ---------------------------------------------------------------------------------------
// Scalars

fn string(cx: &mut Cx, path: &str, node: &Node) -> Option<String> {
    match &node.kind {
        Kind::Str(s) => Some(s.clone()),
        _ => {
            cx.type_error(path, node, "a string");
            None
        }
    }
}

/// A string where flyctl casts numbers to strings first (`initial_size = 200`, `memory = 512`).
fn string_or_number(cx: &mut Cx, path: &str, node: &Node) -> Option<String> {
    match &node.kind {
        Kind::Str(s) => Some(s.clone()),
        Kind::Int(i) => Some(i.to_string()),
        Kind::Float(f) => Some(go_float(*f)),
        _ => {
            cx.type_error(path, node, "a string or a number");
            None
        }
    }
}

fn boolean(cx: &mut Cx, path: &str, node: &Node) -> Option<bool> {
    match node.kind {
        Kind::Bool(b) => Some(b),
        _ => {
            cx.type_error(path, node, "a boolean (true or false)");
            None
        }
    }
}

fn integer<T: TryFrom<i64>>(cx: &mut Cx, path: &str, node: &Node, min: i64, max: i64) -> Option<T> {
    match node.kind {
        Kind::Int(i) if (min..=max).contains(&i) => T::try_from(i).ok(),
        Kind::Int(i) => {
            cx.push(
                Diagnostic::error(DiagnosticCode::Type, path, format!("{i} is out of range"))
                    .with_expected(format!("an integer from {min} to {max}")),
                node.span.as_ref().map(|s| s.start),
            );
            None
        }
        _ => {
            cx.type_error(path, node, "an integer");
            None
        }
    }
}

fn u16_strict(cx: &mut Cx, path: &str, node: &Node) -> Option<u16> {
    integer(cx, path, node, 0, 65535)
}

fn u32_any(cx: &mut Cx, path: &str, node: &Node) -> Option<u32> {
    integer(cx, path, node, 0, i64::from(u32::MAX))
}

fn i64_any(cx: &mut Cx, path: &str, node: &Node) -> Option<i64> {
    integer(cx, path, node, i64::MIN, i64::MAX)
}

/// `[[services]]` ports: ints, floats and digit strings are all accepted.
fn port_lenient(cx: &mut Cx, path: &str, node: &Node) -> Option<u16> {
    let value = match &node.kind {
        Kind::Int(i) => *i,
        Kind::Float(f) if f.fract() == 0.0 && f.abs() < 1e9 => *f as i64,
        Kind::Str(s) => match s.trim().parse::<i64>() {
            Ok(i) => i,
            Err(err) => {
                cx.push(
                    Diagnostic::error(
                        DiagnosticCode::Type,
                        path,
                        format!("Can not convert '{s}' to integer: {err}"),
                    )
                    .with_expected("a port number from 0 to 65535"),
                    node.span.as_ref().map(|s| s.start),
                );
                return None;
            }
        },
        _ => {
            cx.push(
                Diagnostic::error(
                    DiagnosticCode::Type,
                    path,
                    format!("Unknown type for cast: {}", node.go_type()),
                )
                .with_expected("a port number from 0 to 65535"),
                node.span.as_ref().map(|s| s.start),
            );
            return None;
        }
    };
    integer(
        cx,
        path,
        &Node::new(Kind::Int(value), node.span.clone()),
        0,
        65535,
    )
}

fn float(cx: &mut Cx, path: &str, node: &Node) -> Option<f64> {
    match node.kind {
        Kind::Float(f) => Some(f),
        Kind::Int(i) => Some(i as f64),
        _ => {
            cx.type_error(path, node, "a number");
            None
        }
    }
}

fn string_list(cx: &mut Cx, path: &str, node: &Node) -> Option<Vec<String>> {
    match &node.kind {
        Kind::Array(items) => {
            let mut out = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                out.push(string(cx, &index_path(path, i), item)?);
            }
            Some(out)
        }
        _ => {
            cx.type_error(path, node, "an array of strings");
            None
        }
    }
}

/// `experimental.cmd = "x"` means `["x"]` (not shell-split).
fn string_or_list(cx: &mut Cx, path: &str, node: &Node) -> Option<Vec<String>> {
    match &node.kind {
        Kind::Str(s) => Some(vec![s.clone()]),
        _ => string_list(cx, path, node),
    }
}

/// Go's `%v` for a float64, as flyctl stringifies `[env]` values.
pub(crate) fn go_float(f: f64) -> String {
    if f.fract() == 0.0 && f.abs() < 1e21 {
        format!("{}", f as i128)
    } else {
        format!("{f}")
    }
}

#[derive(Clone, Copy)]
enum IntUnit {
    Nanos,
    Millis,
    Seconds,
}

fn duration(cx: &mut Cx, path: &str, node: &Node, unit: IntUnit) -> Option<Duration> {
    match &node.kind {
        Kind::Str(s) if s.is_empty() => None,
        Kind::Str(s) => match Duration::parse(s) {
            Ok(d) => Some(d),
            Err(err) => {
                cx.push(
                    Diagnostic::error(DiagnosticCode::Type, path, err.to_string())
                        .with_expected("a duration such as \"10s\", \"1m30s\" or \"500ms\""),
                    node.span.as_ref().map(|s| s.start),
                );
                None
            }
        },
        Kind::Int(i) => Some(match unit {
            IntUnit::Nanos => {
                if *i != 0 && i.unsigned_abs() < 1_000_000 {
                    cx.push(
                        Diagnostic::warning(
                            DiagnosticCode::Type,
                            path,
                            format!("the integer {i} is read as {i} nanoseconds here (flyctl does not convert it)"),
                        )
                        .with_suggestion(Some(format!("write a duration string such as \"{i}s\""))),
                        node.span.as_ref().map(|s| s.start),
                    );
                }
                Duration::from_nanos(*i)
            }
            IntUnit::Millis => Duration::from_millis(*i),
            IntUnit::Seconds => Duration::from_secs(*i),
        }),
        Kind::Float(f) => Some(match unit {
            IntUnit::Nanos => Duration::from_nanos(*f as i64),
            IntUnit::Millis => Duration::from_millis(*f as i64),
            IntUnit::Seconds => Duration::from_secs(*f as i64),
        }),
        _ => {
            cx.error(
                path,
                node,
                format!("unknown duration type: {}", node.go_type()),
            );
            None
        }
    }
}

pub(crate) const AUTOSTOP_VALUES: &str = "one of true, false, \"off\", \"stop\", \"suspend\"";

fn autostop(cx: &mut Cx, path: &str, node: &Node) -> Option<AutoStop> {
    match &node.kind {
        Kind::Bool(true) => Some(AutoStop::Stop),
        Kind::Bool(false) => Some(AutoStop::Off),
        Kind::Str(s) => match AutoStop::parse(s) {
            Some(v) => Some(v),
            None => {
                cx.push(
                    Diagnostic::error(
                        DiagnosticCode::Type,
                        path,
                        format!("invalid autostop string value {s:?}"),
                    )
                    .with_expected(AUTOSTOP_VALUES)
                    .with_suggestion(suggest::did_you_mean(
                        s,
                        ["off", "stop", "suspend", "true", "false"],
                    )),
                    node.span.as_ref().map(|s| s.start),
                );
                None
            }
        },
        _ => {
            cx.type_error(path, node, AUTOSTOP_VALUES);
            None
        }
    }
}

/// Scalars stringified Go-style (`[env]`, check headers).
fn stringify(cx: &mut Cx, path: &str, node: &Node) -> Option<String> {
    match &node.kind {
        Kind::Str(s) | Kind::Datetime(s) => Some(s.clone()),
        Kind::Int(i) => Some(i.to_string()),
        Kind::Float(f) => Some(go_float(*f)),
        Kind::Bool(b) => Some(b.to_string()),
        _ => {
            cx.type_error(path, node, "a string, number or boolean");
            None
        }
    }
}

fn stringified_map(cx: &mut Cx, path: &str, node: &Node, into: &mut BTreeMap<String, String>) {
    if let Some(entries) = node.as_table() {
        for entry in entries {
            let key_path = join(path, &entry.key);
            cx.record(&key_path, entry.position());
            if let Some(value) = stringify(cx, &key_path, &entry.value) {
                into.insert(entry.key.clone(), value);
            }
        }
    }
}

fn json_map(cx: &mut Cx, path: &str, node: &Node) -> Option<BTreeMap<String, serde_json::Value>> {
    let entries = match node.as_table() {
        Some(entries) => entries,
        None => {
            cx.type_error(path, node, "a table");
            return None;
        }
    };
    let mut out = BTreeMap::new();
    for entry in entries {
        cx.record(&join(path, &entry.key), entry.position());
        out.insert(entry.key.clone(), entry.value.to_json());
    }
    Some(out)
}

/// Items of a list section that may also be written as one table.
fn table_items<'n>(cx: &mut Cx, path: &str, node: &'n Node, section: &str) -> Vec<&'n Node> {
    match &node.kind {
        Kind::Array(items) => items.iter().collect(),
        Kind::Table(_) => vec![node],
        _ => {
            cx.error(
                path,
                node,
                format!(
                    "Error processing {section}: unknown type {}",
                    node.go_type()
                ),
            );
            Vec::new()
        }
    }
}

fn list_of<T>(
    cx: &mut Cx,
    path: &str,
    node: &Node,
    section: &str,
    mut decode: impl FnMut(&mut Cx, &str, &Node) -> Option<T>,
) -> Vec<T> {
    let mut out = Vec::new();
    for (i, item) in table_items(cx, path, node, section).into_iter().enumerate() {
        let item_path = index_path(path, i);
        cx.record(&item_path, item.span.as_ref().map(|s| s.start));
        if let Some(value) = decode(cx, &item_path, item) {
            out.push(value);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// The document

const TOP_LEVEL_KEYS: &[&str] = &[
    "app",
    "primary_region",
    "kill_signal",
    "kill_timeout",
    "swap_size_mb",
    "console_command",
    "host_dedication_id",
    "machine_config",
    "container",
    "experimental",
    "build",
    "deploy",
    "env",
    "processes",
    "mounts",
    "mount",
    "http_service",
    "services",
    "checks",
    "machine_checks",
    "files",
    "restart",
    "vm",
    "compute",
    "computes",
    "statics",
    "metrics",
    "metric",
];

/// flyctl serialises the patched document to JSON before its typed decode, and Go's JSON
/// encoder refuses NaN and infinities, so a TOML `nan`/`inf` anywhere is a load error.
fn non_finite_floats(cx: &mut Cx, path: &str, node: &Node) {
    match &node.kind {
        Kind::Float(f) if !f.is_finite() => {
            let value = if f.is_nan() {
                "NaN"
            } else if *f > 0.0 {
                "+Inf"
            } else {
                "-Inf"
            };
            cx.error(path, node, format!("json: unsupported value: {value}"));
        }
        Kind::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                non_finite_floats(cx, &index_path(path, i), item);
            }
        }
        Kind::Table(entries) => {
            for entry in entries {
                non_finite_floats(cx, &join(path, &entry.key), &entry.value);
            }
        }
        _ => {}
    }
}

pub(crate) fn decode_document(cx: &mut Cx, root: &Node) -> AppConfig {
    let mut config = AppConfig::default();
    non_finite_floats(cx, "", root);
    let Some(mut t) = Fields::open(cx, root, "", "a table of fly.toml sections") else {
        return config;
    };
    config.app = t.get(cx, "app", string).unwrap_or_default();
    config.primary_region = t.get(cx, "primary_region", string).unwrap_or_default();
    config.kill_signal = t.get(cx, "kill_signal", string);
    config.kill_timeout = t.get(cx, "kill_timeout", |cx, p, n| {
        duration(cx, p, n, IntUnit::Seconds)
    });
    config.swap_size_mb = t.get(cx, "swap_size_mb", |cx, p, n| {
        integer(cx, p, n, 0, i64::MAX)
    });
    config.console_command = t.get(cx, "console_command", string);
    config.host_dedication_id = t.get(cx, "host_dedication_id", string);
    config.machine_config = t.get(cx, "machine_config", string);
    config.container = t.get(cx, "container", string);

    if let Some((node, path)) = t.take(cx, "env") {
        decode_env(cx, &path, node, &mut config.env);
    }
    if let Some((node, path)) = t.take(cx, "processes") {
        decode_processes(cx, &path, node, &mut config.processes);
    }
    let mut promoted_metrics = None;
    if let Some((node, path)) = t.take(cx, "experimental") {
        let (experimental, kill_timeout, metrics) = decode_experimental(cx, &path, node);
        if config.kill_timeout.is_none() {
            config.kill_timeout = kill_timeout;
        }
        promoted_metrics = metrics;
        config.experimental = experimental.filter(|e| !e.is_empty());
    }
    if let Some((node, path)) = t.take(cx, "checks") {
        decode_checks(cx, &path, node, &mut config.checks);
    }
    for key in ["compute", "computes", "vm"] {
        if let Some((node, _)) = t.take(cx, key) {
            let offset = config.vm.len();
            let items = table_items(cx, key, node, "compute");
            for (i, item) in items.into_iter().enumerate() {
                let path = index_path("vm", offset + i);
                cx.record(&path, item.span.as_ref().map(|s| s.start));
                if let Some(vm) = decode_vm(cx, &path, item) {
                    config.vm.push(vm);
                }
            }
        }
    }
    for key in ["mount", "mounts"] {
        if let Some((node, _)) = t.take(cx, key) {
            let offset = config.mounts.len();
            let items = table_items(cx, key, node, "mounts");
            for (i, item) in items.into_iter().enumerate() {
                let path = index_path("mounts", offset + i);
                cx.record(&path, item.span.as_ref().map(|s| s.start));
                if let Some(mount) = decode_mount(cx, &path, item) {
                    config.mounts.push(mount);
                }
            }
        }
    }
    for key in ["metric", "metrics"] {
        if let Some((node, _)) = t.take(cx, key) {
            let offset = config.metrics.len();
            let items = table_items(cx, key, node, "metrics");
            for (i, item) in items.into_iter().enumerate() {
                let path = index_path("metrics", offset + i);
                cx.record(&path, item.span.as_ref().map(|s| s.start));
                if let Some(metrics) = decode_metrics(cx, &path, item) {
                    config.metrics.push(metrics);
                }
            }
        }
    }
    if config.metrics.is_empty()
        && let Some(metrics) = promoted_metrics
    {
        config.metrics.push(metrics);
    }
    if let Some((node, path)) = t.take(cx, "services") {
        let mut index = 0;
        for item in table_items(cx, &path, node, "services") {
            if item.is_empty_table() {
                continue;
            }
            let item_path = index_path(&path, index);
            index += 1;
            cx.record(&item_path, item.span.as_ref().map(|s| s.start));
            if let Some(service) = decode_service(cx, &item_path, item) {
                config.services.push(service);
            }
        }
    }
    config.build = t.get(cx, "build", decode_build);
    config.deploy = t.get(cx, "deploy", decode_deploy);
    config.http_service = t.get(cx, "http_service", decode_http_service);
    if let Some((node, path)) = t.take(cx, "machine_checks") {
        config.machine_checks = list_of(cx, &path, node, "machine_checks", decode_machine_check);
    }
    if let Some((node, path)) = t.take(cx, "files") {
        config.files = list_of(cx, &path, node, "files", decode_file);
    }
    if let Some((node, path)) = t.take(cx, "restart") {
        config.restart = list_of(cx, &path, node, "restart", decode_restart);
    }
    if let Some((node, path)) = t.take(cx, "statics") {
        config.statics = list_of(cx, &path, node, "statics", decode_static);
    }
    config.extra = t.finish(cx, TOP_LEVEL_KEYS);
    config
}

fn decode_env(cx: &mut Cx, path: &str, node: &Node, env: &mut BTreeMap<String, String>) {
    match &node.kind {
        Kind::Table(_) => stringified_map(cx, path, node, env),
        Kind::Array(items) if items.iter().all(|i| i.as_table().is_some()) => {
            for item in items {
                stringified_map(cx, path, item, env);
            }
        }
        _ => cx.error(
            path,
            node,
            format!(
                "Do not know how to process 'env' section of type: {}",
                node.go_type()
            ),
        ),
    }
}

fn decode_processes(
    cx: &mut Cx,
    path: &str,
    node: &Node,
    processes: &mut BTreeMap<String, String>,
) {
    match &node.kind {
        Kind::Table(entries) => {
            for entry in entries {
                let key_path = join(path, &entry.key);
                cx.record(&key_path, entry.position());
                match &entry.value.kind {
                    Kind::Str(command) => {
                        processes.insert(entry.key.clone(), command.clone());
                    }
                    _ => cx.error(
                        &key_path,
                        &entry.value,
                        format!(
                            "could not cast {} of type {} to string on processes",
                            entry.value.to_json(),
                            entry.value.go_type()
                        ),
                    ),
                }
            }
        }
        Kind::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let item_path = index_path(path, i);
                if item.is_empty_table() {
                    continue;
                }
                let Some(mut t) =
                    Fields::open(cx, item, &item_path, "a table with `name` and `command`")
                else {
                    continue;
                };
                let name = t.get(cx, "name", string);
                let command = t.get(cx, "command", string).unwrap_or_default();
                t.finish(cx, &["name", "command"]);
                match name {
                    Some(name) => {
                        processes.insert(name, command);
                    }
                    None => cx.error(&item_path, item, "process item name not a string"),
                }
            }
        }
        _ => cx.error(
            path,
            node,
            format!("Unknown processes type: {}", node.go_type()),
        ),
    }
}

const EXPERIMENTAL_KEYS: &[&str] = &[
    "cmd",
    "entrypoint",
    "exec",
    "auto_rollback",
    "enable_consul",
    "enable_etcd",
    "lazy_load_images",
    "machine_config",
    "attached",
    "kill_timeout",
    "metrics_port",
    "metrics_path",
];

fn decode_experimental(
    cx: &mut Cx,
    path: &str,
    node: &Node,
) -> (Option<Experimental>, Option<Duration>, Option<Metrics>) {
    if node.as_table().is_none() {
        cx.error(
            path,
            node,
            format!("Experimental section of unknown type: {}", node.go_type()),
        );
        return (None, None, None);
    }
    let Some(mut t) = Fields::open(cx, node, path, "a table") else {
        return (None, None, None);
    };
    let mut experimental = Experimental {
        cmd: t.get(cx, "cmd", string_or_list).unwrap_or_default(),
        entrypoint: t.get(cx, "entrypoint", string_or_list).unwrap_or_default(),
        exec: t.get(cx, "exec", string_or_list).unwrap_or_default(),
        auto_rollback: t.get(cx, "auto_rollback", boolean),
        enable_consul: t.get(cx, "enable_consul", boolean),
        enable_etcd: t.get(cx, "enable_etcd", boolean),
        lazy_load_images: t.get(cx, "lazy_load_images", boolean),
        machine_config: t.get(cx, "machine_config", string),
        attached: t.get(cx, "attached", |_, _, n| Some(n.to_json())),
        extra: Extra::new(),
    };
    let kill_timeout = t.get(cx, "kill_timeout", |cx, p, n| {
        duration(cx, p, n, IntUnit::Seconds)
    });
    let metrics_port = t.get(cx, "metrics_port", port_lenient);
    let metrics_path = t.get(cx, "metrics_path", string);
    let metrics = (metrics_port.is_some() || metrics_path.is_some()).then(|| Metrics {
        port: metrics_port,
        path: metrics_path,
        ..Metrics::default()
    });
    experimental.extra = t.finish(cx, EXPERIMENTAL_KEYS);
    (Some(experimental), kill_timeout, metrics)
}

const BUILD_KEYS: &[&str] = &[
    "builder",
    "buildpacks",
    "image",
    "dockerfile",
    "ignorefile",
    "build-target",
    "build_target",
    "args",
    "settings",
    "builtin",
    "compose",
    "compression",
    "compression_level",
];

fn decode_build(cx: &mut Cx, path: &str, node: &Node) -> Option<Build> {
    if node.as_table().is_none() {
        cx.error(
            path,
            node,
            format!("Build section of unknown type: {}", node.go_type()),
        );
        return None;
    }
    let mut t = Fields::open(cx, node, path, "a table")?;
    let mut build = Build {
        builder: t.get(cx, "builder", string),
        buildpacks: t.get(cx, "buildpacks", string_list).unwrap_or_default(),
        image: t.get(cx, "image", string),
        dockerfile: t.get(cx, "dockerfile", string),
        ignorefile: t.get(cx, "ignorefile", string),
        build_target: t.get(cx, "build-target", string),
        args: BTreeMap::new(),
        settings: t.get(cx, "settings", json_map).unwrap_or_default(),
        builtin: t.get(cx, "builtin", string),
        compose: None,
        compression: t.get(cx, "compression", string),
        compression_level: t.get(cx, "compression_level", i64_any),
        extra: Extra::new(),
    };
    if let Some(target) = t.get(cx, "build_target", string) {
        build.build_target.get_or_insert(target);
    }
    if let Some((args, args_path)) = t.take(cx, "args") {
        if let Some(entries) = args.as_table() {
            for entry in entries {
                let key_path = join(&args_path, &entry.key);
                cx.record(&key_path, entry.position());
                match &entry.value.kind {
                    Kind::Str(s) => {
                        build.args.insert(entry.key.clone(), s.clone());
                    }
                    _ => cx.push(
                        Diagnostic::error(
                            DiagnosticCode::Type,
                            &key_path,
                            format!(
                                "invalid type: {} (build args are not converted)",
                                entry.value.describe()
                            ),
                        )
                        .with_expected("a string"),
                        entry.value.span.as_ref().map(|s| s.start),
                    ),
                }
            }
        } else {
            cx.type_error(&args_path, args, "a table of strings");
        }
    }
    build.compose = t.get(cx, "compose", |cx, p, n| {
        let mut c = Fields::open(
            cx,
            n,
            p,
            "a table such as { file = \"docker-compose.yml\" }",
        )?;
        let file = c.get(cx, "file", string);
        let extra = c.finish(cx, &["file"]);
        Some(Compose { file, extra })
    });
    build.extra = t.finish(cx, BUILD_KEYS);
    Some(build)
}

const DEPLOY_KEYS: &[&str] = &[
    "strategy",
    "max_unavailable",
    "wait_timeout",
    "release_command",
    "release_command_timeout",
    "release_command_vm",
    "seed_command",
];

fn decode_deploy(cx: &mut Cx, path: &str, node: &Node) -> Option<Deploy> {
    let mut t = Fields::open(cx, node, path, "a table")?;
    let mut deploy = Deploy {
        strategy: t.get(cx, "strategy", string),
        max_unavailable: t.get(cx, "max_unavailable", float),
        wait_timeout: t.get(cx, "wait_timeout", |cx, p, n| {
            duration(cx, p, n, IntUnit::Nanos)
        }),
        release_command: t.get(cx, "release_command", string),
        release_command_timeout: t.get(cx, "release_command_timeout", |cx, p, n| {
            duration(cx, p, n, IntUnit::Nanos)
        }),
        release_command_vm: t.get(cx, "release_command_vm", decode_vm),
        seed_command: t.get(cx, "seed_command", string),
        extra: Extra::new(),
    };
    deploy.extra = t.finish(cx, DEPLOY_KEYS);
    Some(deploy)
}

const VM_KEYS: &[&str] = &[
    "size",
    "memory",
    "cpu_kind",
    "cpus",
    "memory_mb",
    "gpus",
    "gpu_kind",
    "kernel_args",
    "host_dedication_id",
    "persist_rootfs",
    "processes",
];

fn decode_vm(cx: &mut Cx, path: &str, node: &Node) -> Option<Vm> {
    let mut t = Fields::open(cx, node, path, "a table")?;
    let mut vm = Vm {
        size: t.get(cx, "size", string),
        memory: t.get(cx, "memory", string_or_number),
        cpu_kind: t.get(cx, "cpu_kind", string),
        cpus: t.get(cx, "cpus", u32_any),
        memory_mb: t.get(cx, "memory_mb", u32_any),
        gpus: t.get(cx, "gpus", u32_any),
        gpu_kind: t.get(cx, "gpu_kind", string),
        kernel_args: t.get(cx, "kernel_args", string_list).unwrap_or_default(),
        host_dedication_id: t.get(cx, "host_dedication_id", string),
        persist_rootfs: t.get(cx, "persist_rootfs", string),
        processes: t.get(cx, "processes", string_list).unwrap_or_default(),
        extra: Extra::new(),
    };
    vm.extra = t.finish(cx, VM_KEYS);
    Some(vm)
}

const MOUNT_KEYS: &[&str] = &[
    "source",
    "destination",
    "initial_size",
    "snapshot_retention",
    "scheduled_snapshots",
    "auto_extend_size_threshold",
    "auto_extend_size_increment",
    "auto_extend_size_limit",
    "processes",
];

fn decode_mount(cx: &mut Cx, path: &str, node: &Node) -> Option<Mount> {
    let mut t = Fields::open(cx, node, path, "a table")?;
    let mut mount = Mount {
        source: t.get(cx, "source", string).unwrap_or_default(),
        destination: t.get(cx, "destination", string).unwrap_or_default(),
        initial_size: t.get(cx, "initial_size", string_or_number),
        snapshot_retention: t.get(cx, "snapshot_retention", i64_any),
        scheduled_snapshots: t.get(cx, "scheduled_snapshots", boolean),
        auto_extend_size_threshold: t.get(cx, "auto_extend_size_threshold", i64_any),
        auto_extend_size_increment: t.get(cx, "auto_extend_size_increment", string_or_number),
        auto_extend_size_limit: t.get(cx, "auto_extend_size_limit", string_or_number),
        processes: t.get(cx, "processes", string_list).unwrap_or_default(),
        extra: Extra::new(),
    };
    mount.extra = t.finish(cx, MOUNT_KEYS);
    Some(mount)
}

const METRICS_KEYS: &[&str] = &["port", "path", "https", "processes"];

fn decode_metrics(cx: &mut Cx, path: &str, node: &Node) -> Option<Metrics> {
    let mut t = Fields::open(cx, node, path, "a table")?;
    let mut metrics = Metrics {
        port: t.get(cx, "port", u16_strict),
        path: t.get(cx, "path", string),
        https: t.get(cx, "https", boolean),
        processes: t.get(cx, "processes", string_list).unwrap_or_default(),
        extra: Extra::new(),
    };
    metrics.extra = t.finish(cx, METRICS_KEYS);
    Some(metrics)
}

const CONCURRENCY_KEYS: &[&str] = &["type", "hard_limit", "soft_limit"];

fn decode_concurrency_table(cx: &mut Cx, path: &str, node: &Node) -> Option<Concurrency> {
    let mut t = Fields::open(cx, node, path, "a table { type, soft_limit, hard_limit }")?;
    let mut concurrency = Concurrency {
        kind: t.get(cx, "type", string).unwrap_or_default(),
        hard_limit: t.get(cx, "hard_limit", u32_any),
        soft_limit: t.get(cx, "soft_limit", u32_any),
        extra: Extra::new(),
    };
    concurrency.extra = t.finish(cx, CONCURRENCY_KEYS);
    Some(concurrency)
}

/// `[[services]]` concurrency: a table, or the legacy `"soft,hard"` string.
fn decode_service_concurrency(cx: &mut Cx, path: &str, node: &Node) -> Option<Concurrency> {
    match &node.kind {
        Kind::Table(_) => decode_concurrency_table(cx, path, node),
        Kind::Str(s) => {
            let limits: Vec<Option<u32>> =
                s.split(',').map(|p| p.trim().parse::<u32>().ok()).collect();
            match limits.as_slice() {
                [Some(soft), Some(hard)] => Some(Concurrency {
                    kind: "requests".to_string(),
                    soft_limit: Some(*soft),
                    hard_limit: Some(*hard),
                    extra: Extra::new(),
                }),
                _ => {
                    cx.push(
                        Diagnostic::error(
                            DiagnosticCode::Type,
                            path,
                            format!("Unknown value '{s}' for concurrency limits"),
                        )
                        .with_expected("\"soft,hard\" (e.g. \"20,25\") or a table { type, soft_limit, hard_limit }"),
                        node.span.as_ref().map(|s| s.start),
                    );
                    None
                }
            }
        }
        _ => {
            cx.push(
                Diagnostic::error(
                    DiagnosticCode::Type,
                    path,
                    format!("Unknown type for service concurrency: {}", node.go_type()),
                )
                .with_expected("a table { type, soft_limit, hard_limit }"),
                node.span.as_ref().map(|s| s.start),
            );
            None
        }
    }
}

fn decode_tls_options(cx: &mut Cx, path: &str, node: &Node) -> Option<TlsOptions> {
    let mut t = Fields::open(cx, node, path, "a table")?;
    let mut options = TlsOptions {
        alpn: t.get(cx, "alpn", string_list).unwrap_or_default(),
        versions: t.get(cx, "versions", string_list).unwrap_or_default(),
        default_self_signed: t.get(cx, "default_self_signed", boolean),
        extra: Extra::new(),
    };
    options.extra = t.finish(cx, &["alpn", "versions", "default_self_signed"]);
    Some(options)
}

const HTTP_OPTIONS_KEYS: &[&str] = &[
    "compress",
    "h2_backend",
    "idle_timeout",
    "headers_read_timeout",
    "response",
    "replay_cache",
];

fn decode_http_options(cx: &mut Cx, path: &str, node: &Node) -> Option<HttpOptions> {
    let mut t = Fields::open(cx, node, path, "a table")?;
    let mut options = HttpOptions {
        compress: t.get(cx, "compress", boolean),
        h2_backend: t.get(cx, "h2_backend", boolean),
        idle_timeout: t.get(cx, "idle_timeout", u32_any),
        headers_read_timeout: t.get(cx, "headers_read_timeout", u32_any),
        response: t.get(cx, "response", |cx, p, n| {
            let mut r = Fields::open(cx, n, p, "a table")?;
            let pristine = r.get(cx, "pristine", boolean);
            let headers = r.get(cx, "headers", |cx, p, n| {
                let map = json_map(cx, p, n)?;
                for (name, value) in &map {
                    let ok = match value {
                        serde_json::Value::String(_) | serde_json::Value::Bool(false) => true,
                        serde_json::Value::Array(items) => {
                            items.iter().all(serde_json::Value::is_string)
                        }
                        _ => false,
                    };
                    if !ok {
                        let header_path = join(p, name);
                        let offset = None;
                        cx.push(
                            Diagnostic::error(
                                DiagnosticCode::Type,
                                &header_path,
                                format!("invalid header value {value}"),
                            )
                            .with_expected("a string, an array of strings, or false"),
                            offset,
                        );
                    }
                }
                Some(map)
            });
            let extra = r.finish(cx, &["pristine", "headers"]);
            Some(HttpResponseOptions {
                pristine,
                headers: headers.unwrap_or_default(),
                extra,
            })
        }),
        replay_cache: Vec::new(),
        extra: Extra::new(),
    };
    if let Some((node, path)) = t.take(cx, "replay_cache") {
        options.replay_cache = list_of(cx, &path, node, "replay_cache", |cx, p, n| {
            let mut r = Fields::open(cx, n, p, "a table")?;
            let mut rule = ReplayCache {
                path_prefix: r.get(cx, "path_prefix", string).unwrap_or_default(),
                ttl_seconds: r
                    .get(cx, "ttl_seconds", |cx, p, n| integer(cx, p, n, 0, i64::MAX))
                    .unwrap_or_default(),
                kind: r.get(cx, "type", string).unwrap_or_default(),
                name: r.get(cx, "name", string).unwrap_or_default(),
                allow_bypass: r.get(cx, "allow_bypass", boolean).unwrap_or_default(),
                extra: Extra::new(),
            };
            rule.extra = r.finish(
                cx,
                &["path_prefix", "ttl_seconds", "type", "name", "allow_bypass"],
            );
            Some(rule)
        });
    }
    options.extra = t.finish(cx, HTTP_OPTIONS_KEYS);
    Some(options)
}

const PORT_KEYS: &[&str] = &[
    "port",
    "start_port",
    "end_port",
    "handlers",
    "force_https",
    "tls_options",
    "http_options",
    "proxy_proto_options",
];

fn decode_port(cx: &mut Cx, path: &str, node: &Node) -> Option<Port> {
    let mut t = Fields::open(cx, node, path, "a table")?;
    let mut port = Port {
        port: t.get(cx, "port", port_lenient),
        start_port: t.get(cx, "start_port", u16_strict),
        end_port: t.get(cx, "end_port", u16_strict),
        handlers: t.get(cx, "handlers", string_list).unwrap_or_default(),
        force_https: t.get(cx, "force_https", boolean).unwrap_or_default(),
        tls_options: t.get(cx, "tls_options", decode_tls_options),
        http_options: t.get(cx, "http_options", decode_http_options),
        proxy_proto_options: t.get(cx, "proxy_proto_options", |cx, p, n| {
            let mut o = Fields::open(cx, n, p, "a table { version = \"v1\" | \"v2\" }")?;
            let version = o.get(cx, "version", string).unwrap_or_default();
            let extra = o.finish(cx, &["version"]);
            Some(ProxyProtoOptions { version, extra })
        }),
        extra: Extra::new(),
    };
    port.extra = t.finish(cx, PORT_KEYS);
    Some(port)
}

const TCP_CHECK_KEYS: &[&str] = &["interval", "timeout", "grace_period"];
const HTTP_CHECK_KEYS: &[&str] = &[
    "interval",
    "timeout",
    "grace_period",
    "method",
    "path",
    "protocol",
    "tls_skip_verify",
    "tls_server_name",
    "headers",
];

fn decode_tcp_check(cx: &mut Cx, path: &str, node: &Node) -> Option<TcpCheck> {
    let mut t = Fields::open(cx, node, path, "a table")?;
    let mut check = TcpCheck {
        interval: t.get(cx, "interval", |cx, p, n| {
            duration(cx, p, n, IntUnit::Millis)
        }),
        timeout: t.get(cx, "timeout", |cx, p, n| {
            duration(cx, p, n, IntUnit::Millis)
        }),
        grace_period: t.get(cx, "grace_period", |cx, p, n| {
            duration(cx, p, n, IntUnit::Millis)
        }),
        extra: Extra::new(),
    };
    check.extra = t.finish(cx, TCP_CHECK_KEYS);
    Some(check)
}

/// Check headers: a table, or (where flyctl patches them) a list of `{name, value}`.
fn decode_headers(cx: &mut Cx, path: &str, node: &Node, legacy: bool) -> BTreeMap<String, String> {
    let mut headers = BTreeMap::new();
    match &node.kind {
        Kind::Table(_) => stringified_map(cx, path, node, &mut headers),
        Kind::Array(items) if legacy => {
            for (i, item) in items.iter().enumerate() {
                let item_path = index_path(path, i);
                let Some(mut t) = Fields::open(cx, item, &item_path, "a table { name, value }")
                else {
                    continue;
                };
                let name = t.get(cx, "name", stringify);
                let value = t.get(cx, "value", stringify);
                t.finish(cx, &["name", "value"]);
                match (name, value) {
                    (Some(name), Some(value)) => {
                        headers.insert(name, value);
                    }
                    _ => cx.error(
                        &item_path,
                        item,
                        "Unsupported headers format: expected { name, value }",
                    ),
                }
            }
        }
        _ => cx.type_error(path, node, "a table of header names to values"),
    }
    headers
}

fn decode_http_check(
    cx: &mut Cx,
    path: &str,
    node: &Node,
    unit: IntUnit,
    legacy_headers: bool,
) -> Option<HttpCheck> {
    let mut t = Fields::open(cx, node, path, "a table")?;
    let mut check = HttpCheck {
        interval: t.get(cx, "interval", |cx, p, n| duration(cx, p, n, unit)),
        timeout: t.get(cx, "timeout", |cx, p, n| duration(cx, p, n, unit)),
        grace_period: t.get(cx, "grace_period", |cx, p, n| duration(cx, p, n, unit)),
        method: t.get(cx, "method", string),
        path: t.get(cx, "path", string),
        protocol: t.get(cx, "protocol", string),
        tls_skip_verify: t.get(cx, "tls_skip_verify", boolean),
        tls_server_name: t.get(cx, "tls_server_name", string),
        headers: t
            .get(cx, "headers", |cx, p, n| {
                Some(decode_headers(cx, p, n, legacy_headers))
            })
            .unwrap_or_default(),
        extra: Extra::new(),
    };
    check.extra = t.finish(cx, HTTP_CHECK_KEYS);
    Some(check)
}

const MACHINE_CHECK_KEYS: &[&str] = &[
    "command",
    "image",
    "entrypoint",
    "kill_signal",
    "kill_timeout",
];

fn decode_machine_check(cx: &mut Cx, path: &str, node: &Node) -> Option<MachineCheckConfig> {
    let mut t = Fields::open(cx, node, path, "a table")?;
    let mut check = MachineCheckConfig {
        command: t.get(cx, "command", string_list).unwrap_or_default(),
        image: t.get(cx, "image", string),
        entrypoint: t.get(cx, "entrypoint", string_list).unwrap_or_default(),
        kill_signal: t.get(cx, "kill_signal", string),
        kill_timeout: t.get(cx, "kill_timeout", |cx, p, n| {
            duration(cx, p, n, IntUnit::Nanos)
        }),
        extra: Extra::new(),
    };
    check.extra = t.finish(cx, MACHINE_CHECK_KEYS);
    Some(check)
}

const HTTP_SERVICE_KEYS: &[&str] = &[
    "internal_port",
    "force_https",
    "auto_stop_machines",
    "auto_start_machines",
    "min_machines_running",
    "processes",
    "concurrency",
    "tls_options",
    "http_options",
    "checks",
    "machine_checks",
];

fn decode_http_service(cx: &mut Cx, path: &str, node: &Node) -> Option<HttpService> {
    let mut t = Fields::open(cx, node, path, "a table")?;
    let mut service = HttpService {
        internal_port: t.get(cx, "internal_port", u16_strict).unwrap_or_default(),
        force_https: t.get(cx, "force_https", boolean).unwrap_or_default(),
        auto_stop_machines: t.get(cx, "auto_stop_machines", autostop),
        auto_start_machines: t.get(cx, "auto_start_machines", boolean),
        min_machines_running: t.get(cx, "min_machines_running", u32_any),
        processes: t.get(cx, "processes", string_list).unwrap_or_default(),
        concurrency: t.get(cx, "concurrency", decode_concurrency_table),
        tls_options: t.get(cx, "tls_options", decode_tls_options),
        http_options: t.get(cx, "http_options", decode_http_options),
        checks: Vec::new(),
        machine_checks: Vec::new(),
        extra: Extra::new(),
    };
    if let Some((node, p)) = t.take(cx, "checks") {
        service.checks = list_of(cx, &p, node, "checks", |cx, p, n| {
            decode_http_check(cx, p, n, IntUnit::Nanos, false)
        });
    }
    if let Some((node, p)) = t.take(cx, "machine_checks") {
        service.machine_checks = list_of(cx, &p, node, "machine_checks", decode_machine_check);
    }
    service.extra = t.finish(cx, HTTP_SERVICE_KEYS);
    Some(service)
}

const SERVICE_KEYS: &[&str] = &[
    "protocol",
    "internal_port",
    "auto_stop_machines",
    "auto_start_machines",
    "min_machines_running",
    "processes",
    "concurrency",
    "ports",
    "tcp_checks",
    "http_checks",
    "machine_checks",
];

fn decode_service(cx: &mut Cx, path: &str, node: &Node) -> Option<Service> {
    let mut t = Fields::open(cx, node, path, "a table")?;
    let mut service = Service {
        protocol: t.get(cx, "protocol", string).unwrap_or_default(),
        internal_port: t.get(cx, "internal_port", port_lenient).unwrap_or_default(),
        auto_stop_machines: t.get(cx, "auto_stop_machines", autostop),
        auto_start_machines: t.get(cx, "auto_start_machines", boolean),
        min_machines_running: t.get(cx, "min_machines_running", u32_any),
        processes: t.get(cx, "processes", string_list).unwrap_or_default(),
        concurrency: t.get(cx, "concurrency", decode_service_concurrency),
        ..Service::default()
    };
    if let Some((node, p)) = t.take(cx, "ports") {
        service.ports = list_of(cx, &p, node, "ports", decode_port);
    }
    if let Some((node, p)) = t.take(cx, "tcp_checks") {
        service.tcp_checks = list_of(cx, &p, node, "tcp_checks", decode_tcp_check);
    }
    if let Some((node, p)) = t.take(cx, "http_checks") {
        service.http_checks = list_of(cx, &p, node, "http_checks", |cx, p, n| {
            decode_http_check(cx, p, n, IntUnit::Millis, true)
        });
    }
    if let Some((node, p)) = t.take(cx, "machine_checks") {
        service.machine_checks = list_of(cx, &p, node, "machine_checks", decode_machine_check);
    }
    service.extra = t.finish(cx, SERVICE_KEYS);
    Some(service)
}

const CHECK_KEYS: &[&str] = &[
    "type",
    "port",
    "interval",
    "timeout",
    "grace_period",
    "method",
    "path",
    "protocol",
    "tls_skip_verify",
    "tls_server_name",
    "headers",
    "processes",
];

fn decode_checks(
    cx: &mut Cx,
    path: &str,
    node: &Node,
    checks: &mut BTreeMap<String, TopLevelCheck>,
) {
    match &node.kind {
        Kind::Table(entries) => {
            for entry in entries {
                let check_path = join(path, &entry.key);
                cx.record(&check_path, entry.position());
                if let Some(check) = decode_check(cx, &check_path, &entry.value, false) {
                    checks.insert(entry.key.clone(), check);
                }
            }
        }
        Kind::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let name = item.get("name").and_then(Node::as_str).map(str::to_string);
                let Some(name) = name else {
                    cx.error(&index_path(path, i), item, "check item name not a string");
                    continue;
                };
                let check_path = join(path, &name);
                cx.record(&check_path, item.span.as_ref().map(|s| s.start));
                if let Some(check) = decode_check(cx, &check_path, item, true) {
                    checks.insert(name, check);
                }
            }
        }
        _ => cx.error(
            path,
            node,
            format!("'checks' section of unknown type: {}", node.go_type()),
        ),
    }
}

fn decode_check(cx: &mut Cx, path: &str, node: &Node, named: bool) -> Option<TopLevelCheck> {
    let mut t = Fields::open(cx, node, path, "a table")?;
    if named {
        t.take(cx, "name");
    }
    let mut check = TopLevelCheck {
        check_type: t.get(cx, "type", string),
        port: t.get(cx, "port", u16_strict),
        interval: t.get(cx, "interval", |cx, p, n| {
            duration(cx, p, n, IntUnit::Millis)
        }),
        timeout: t.get(cx, "timeout", |cx, p, n| {
            duration(cx, p, n, IntUnit::Millis)
        }),
        grace_period: t.get(cx, "grace_period", |cx, p, n| {
            duration(cx, p, n, IntUnit::Millis)
        }),
        method: t.get(cx, "method", string),
        path: t.get(cx, "path", string),
        protocol: t.get(cx, "protocol", string),
        tls_skip_verify: t.get(cx, "tls_skip_verify", boolean),
        tls_server_name: t.get(cx, "tls_server_name", string),
        headers: t
            .get(cx, "headers", |cx, p, n| {
                Some(decode_headers(cx, p, n, true))
            })
            .unwrap_or_default(),
        processes: t.get(cx, "processes", string_list).unwrap_or_default(),
        extra: Extra::new(),
    };
    check.extra = t.finish(cx, CHECK_KEYS);
    Some(check)
}

fn decode_file(cx: &mut Cx, path: &str, node: &Node) -> Option<FileConfig> {
    let mut t = Fields::open(cx, node, path, "a table")?;
    let mut file = FileConfig {
        guest_path: t.get(cx, "guest_path", string).unwrap_or_default(),
        local_path: t.get(cx, "local_path", string),
        raw_value: t.get(cx, "raw_value", string),
        secret_name: t.get(cx, "secret_name", string),
        processes: t.get(cx, "processes", string_list).unwrap_or_default(),
        extra: Extra::new(),
    };
    file.extra = t.finish(
        cx,
        &[
            "guest_path",
            "local_path",
            "raw_value",
            "secret_name",
            "processes",
        ],
    );
    Some(file)
}

fn decode_restart(cx: &mut Cx, path: &str, node: &Node) -> Option<Restart> {
    let mut t = Fields::open(cx, node, path, "a table")?;
    let mut restart = Restart {
        policy: t.get(cx, "policy", string).unwrap_or_default(),
        retries: t.get(cx, "retries", u32_any),
        processes: t.get(cx, "processes", string_list).unwrap_or_default(),
        extra: Extra::new(),
    };
    restart.extra = t.finish(cx, &["policy", "retries", "processes"]);
    Some(restart)
}

fn decode_static(cx: &mut Cx, path: &str, node: &Node) -> Option<StaticConfig> {
    let mut t = Fields::open(cx, node, path, "a table")?;
    let mut statics = StaticConfig {
        guest_path: t.get(cx, "guest_path", string).unwrap_or_default(),
        url_prefix: t.get(cx, "url_prefix", string).unwrap_or_default(),
        tigris_bucket: t.get(cx, "tigris_bucket", string),
        index_document: t.get(cx, "index_document", string),
        extra: Extra::new(),
    };
    statics.extra = t.finish(
        cx,
        &[
            "guest_path",
            "url_prefix",
            "tigris_bucket",
            "index_document",
        ],
    );
    Some(statics)
}
