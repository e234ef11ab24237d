//! fly.toml model: parse TOML/JSON/YAML as flyctl does, validate, convert to machine configs.
//!
//! Loading reads the file into a position-keeping tree, applies flyctl's legacy/alias
//! normalisation (spec/flytoml.md §3) and decodes the typed [`AppConfig`]. Unknown keys are
//! kept and reported as warnings; values of the wrong type do not abort loading: as in
//! flyctl, the config then keeps only `app` and carries the errors, which
//! [`AppConfig::validate`] reports and which make machine conversion fail.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

mod compose;
mod decode;
mod diagnostic;
mod machine;
mod model;
mod node;
mod save;
mod suggest;
mod units;
mod validate;

pub use diagnostic::{ConfigError, Diagnostic, DiagnosticCode, LoadError, Severity, is_valid};
pub use machine::MachineConfigOptions;
pub use model::*;
pub use node::MAX_DEPTH;
pub use save::{render, render_preserving, save, to_flyctl_json};
pub use units::{GuestPreset, VM_SIZES, parse_memory_mb, parse_volume_size_gb, preset};

/// Files larger than this are refused before parsing.
pub const MAX_FILE_SIZE: u64 = 10 * 1024 * 1024;

/// The default process group when `[processes]` is empty.
pub const DEFAULT_PROCESS_GROUP: &str = "app";
/// Process groups flyctl uses for its own temporary machines.
pub const RELEASE_COMMAND_GROUP: &str = "fly_app_release_command";
pub const CONSOLE_GROUP: &str = "fly_app_console";
pub const TEST_MACHINE_GROUP: &str = "fly_app_test_machine_command";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Toml,
    Json,
    Yaml,
}

impl Format {
    /// As flyctl chooses: `.json` → JSON, `.yaml` → YAML (not `.yml`), anything else → TOML.
    pub fn from_path(path: &Path) -> Format {
        match path.extension().and_then(|e| e.to_str()) {
            Some("json") => Format::Json,
            Some("yaml") => Format::Yaml,
            _ => Format::Toml,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Loaded {
    pub config: AppConfig,
    pub path: PathBuf,
    /// Non-fatal findings while reading (unknown keys, ...).
    pub warnings: Vec<Diagnostic>,
}

impl Loaded {
    /// Everything `aloft config validate` reports: reading warnings (errors under
    /// `strict` when they are unknown keys) followed by [`AppConfig::validate`].
    pub fn diagnostics(&self, strict: bool) -> Vec<Diagnostic> {
        let mut out: Vec<Diagnostic> = self
            .warnings
            .iter()
            .cloned()
            .map(|mut d| {
                if strict && d.code == DiagnosticCode::UnknownKey {
                    d.severity = Severity::Error;
                }
                d
            })
            .collect();
        out.extend(self.config.validate());
        out
    }
}

/// What `-c PATH` (or its absence) resolves to: a directory means `DIR/fly.toml`; without
/// `-c`, `fly.toml` in `cwd`, or `fly.json`/`fly.yaml` when only those exist.
pub fn locate(explicit: Option<&Path>, cwd: &Path) -> PathBuf {
    let dir = match explicit {
        Some(path) => {
            let path = cwd.join(path);
            if !path.is_dir() {
                return path;
            }
            path
        }
        None => cwd.to_path_buf(),
    };
    ["fly.toml", "fly.json", "fly.yaml"]
        .iter()
        .map(|name| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| dir.join("fly.toml"))
}

/// Loads a config file (`path` may be a directory, meaning `DIR/fly.toml`).
pub fn load(path: &Path) -> Result<Loaded, LoadError> {
    let path = if path.is_dir() {
        locate(None, path)
    } else {
        path.to_path_buf()
    };
    let io = |source| LoadError::Io {
        path: path.clone(),
        source,
    };
    let origin = path.display().to_string();
    let file = std::fs::File::open(&path).map_err(io)?;
    let size = file.metadata().map_err(io)?.len();
    if size > MAX_FILE_SIZE {
        return Err(LoadError::TooLarge {
            file: origin,
            size,
            limit: MAX_FILE_SIZE,
        });
    }
    let mut bytes = Vec::new();
    file.take(MAX_FILE_SIZE + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    let mut loaded = parse_bytes(&bytes, Format::from_path(&path), &origin)?;
    loaded.config.source.path = Some(path.clone());
    loaded.path = path;
    Ok(loaded)
}

/// Parses raw bytes (checked for size and UTF-8 first).
pub fn parse_bytes(bytes: &[u8], format: Format, origin: &str) -> Result<Loaded, LoadError> {
    if bytes.len() as u64 > MAX_FILE_SIZE {
        return Err(LoadError::TooLarge {
            file: origin.to_string(),
            size: bytes.len() as u64,
            limit: MAX_FILE_SIZE,
        });
    }
    let text = std::str::from_utf8(bytes).map_err(|err| {
        let valid = &bytes[..err.valid_up_to()];
        let line = valid.iter().filter(|&&b| b == b'\n').count() + 1;
        let line_start = valid.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        let column = String::from_utf8_lossy(&valid[line_start..])
            .chars()
            .count()
            + 1;
        LoadError::InvalidUtf8 {
            file: origin.to_string(),
            line,
            column,
        }
    })?;
    parse_str(text, format, origin)
}

/// Parses config text; `origin` names the source in messages.
pub fn parse_str(text: &str, format: Format, origin: &str) -> Result<Loaded, LoadError> {
    if text.len() as u64 > MAX_FILE_SIZE {
        return Err(LoadError::TooLarge {
            file: origin.to_string(),
            size: text.len() as u64,
            limit: MAX_FILE_SIZE,
        });
    }
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let index = node::LineIndex::new(text);
    let root = match format {
        Format::Toml => node::parse_toml(text, origin, &index)?,
        Format::Json => node::parse_json(text, origin, &index)?,
        Format::Yaml => node::parse_yaml(text, origin, &index)?,
    };
    let mut cx = decode::Cx::new(Some(&index), origin);
    let config = decode::decode_document(&mut cx, &root);
    let (config, warnings) = finish_decode(config, cx, origin, &root, true);
    Ok(Loaded {
        config,
        path: PathBuf::from(origin),
        warnings,
    })
}

/// Splits decode findings into load errors (kept in the config) and warnings.
fn finish_decode(
    mut config: AppConfig,
    cx: decode::Cx,
    origin: &str,
    root: &node::Node,
    from_text: bool,
) -> (AppConfig, Vec<Diagnostic>) {
    let (errors, warnings): (Vec<Diagnostic>, Vec<Diagnostic>) =
        cx.diagnostics.into_iter().partition(Diagnostic::is_error);
    config.source.origin = Some(origin.to_string());
    config.source.from_text = from_text;
    config.source.positions = Arc::new(cx.positions);
    if errors.is_empty() {
        return (config, warnings);
    }
    // flyctl keeps only `app` from a config that fails its typed decode; report the
    // remaining rule violations too, except where they only echo a type error.
    let mut load_errors = errors;
    for diagnostic in config.validate() {
        let echoes = load_errors
            .iter()
            .any(|e| e.path.starts_with(&diagnostic.path) || diagnostic.path.starts_with(&e.path));
        if diagnostic.is_error() && !echoes {
            load_errors.push(diagnostic);
        }
    }
    let app = root
        .get("app")
        .and_then(node::Node::as_str)
        .unwrap_or_default()
        .to_string();
    let source = SourceInfo {
        load_errors,
        ..config.source
    };
    (
        AppConfig {
            app,
            source,
            ..AppConfig::default()
        },
        warnings,
    )
}

impl AppConfig {
    /// Reads a config sent as JSON (normalised or not). Type errors are returned as
    /// [`LoadError::Invalid`]; unknown keys are kept.
    pub fn from_json_value(value: serde_json::Value) -> Result<AppConfig, LoadError> {
        let origin = "config";
        if node::json_depth(&value) > MAX_DEPTH + 1 {
            return Err(LoadError::TooDeep {
                file: origin.to_string(),
                line: 1,
                column: 1,
                limit: MAX_DEPTH,
            });
        }
        let root = node::Node::from_json(&value);
        let mut cx = decode::Cx::new(None, origin);
        let config = decode::decode_document(&mut cx, &root);
        let errors: Vec<Diagnostic> = cx
            .diagnostics
            .iter()
            .filter(|d| d.is_error())
            .cloned()
            .collect();
        if !errors.is_empty() {
            return Err(LoadError::Invalid {
                file: origin.to_string(),
                diagnostics: errors,
            });
        }
        let (config, _) = finish_decode(config, cx, origin, &root, false);
        Ok(config)
    }

    /// The normalised document as JSON.
    pub fn to_json_value(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }

    /// The file this config was loaded from, when it came from a file.
    pub fn config_path(&self) -> Option<&Path> {
        self.source.path.as_deref()
    }

    /// Errors found while reading (wrong types, unparseable values): a config that has
    /// them holds only `app`, like flyctl's.
    pub fn load_errors(&self) -> &[Diagnostic] {
        &self.source.load_errors
    }

    /// Every problem of the config: load errors, then rule violations (spec/flytoml.md §6).
    /// Warnings are included with [`Severity::Warning`]; the config is valid when no
    /// diagnostic is an error (see [`is_valid`]).
    pub fn validate(&self) -> Vec<Diagnostic> {
        let mut out = self.source.load_errors.clone();
        out.extend(validate::validate(self));
        out
    }

    /// Process group names, sorted; `["app"]` when `[processes]` is empty.
    pub fn process_groups(&self) -> Vec<String> {
        if self.processes.is_empty() {
            vec![DEFAULT_PROCESS_GROUP.to_string()]
        } else {
            self.processes.keys().cloned().collect()
        }
    }

    /// `app` when there are no processes or `app` is one of them, else the first name.
    pub fn default_process_group(&self) -> String {
        if self.processes.is_empty() || self.processes.contains_key(DEFAULT_PROCESS_GROUP) {
            DEFAULT_PROCESS_GROUP.to_string()
        } else {
            self.processes
                .keys()
                .next()
                .cloned()
                .unwrap_or_else(|| DEFAULT_PROCESS_GROUP.to_string())
        }
    }

    /// Whether an entry scoped by `processes` applies to `group` (unscoped entries apply
    /// to the default group only, as flyctl flattens them).
    pub fn applies_to(&self, processes: &[String], group: &str) -> bool {
        if processes.is_empty() {
            group == self.default_process_group()
        } else {
            processes.iter().any(|p| p == group)
        }
    }

    /// The compose file `[build.compose]` designates: its `file`, or the first of
    /// compose.yaml, compose.yml, docker-compose.yaml, docker-compose.yml that exists
    /// next to the config file.
    pub fn compose_file(&self) -> Option<PathBuf> {
        let compose = self.build.as_ref()?.compose.as_ref()?;
        let dir = self
            .config_path()
            .and_then(Path::parent)
            .unwrap_or(Path::new("."));
        match &compose.file {
            Some(file) => Some(dir.join(file)),
            None => COMPOSE_FILE_NAMES
                .iter()
                .map(|n| dir.join(n))
                .find(|p| p.is_file()),
        }
    }
}
