//! Problems found while loading or validating a config, and the errors of this crate.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Error,
    Warning,
}

/// What kind of problem a diagnostic reports; `--strict` turns `UnknownKey` warnings into errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiagnosticCode {
    /// A key the schema does not know (flyctl ignores it).
    UnknownKey,
    /// A value of the wrong type or shape, found while reading the file.
    Type,
    /// A value that reads fine but breaks a rule of `fly config validate`.
    Invalid,
    /// The config cannot be turned into machine configs.
    Conversion,
}

/// One problem, located by key path and (when known) line and column in the source file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Diagnostic {
    pub severity: Severity,
    pub code: DiagnosticCode,
    /// Key path in the normalised document, e.g. `services[1].ports[0].handlers`.
    pub path: String,
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub message: String,
    pub expected: Option<String>,
    /// A complete hint such as "did you mean `internal_port`?".
    pub suggestion: Option<String>,
    pub file: Option<String>,
}

impl Diagnostic {
    pub fn error(
        code: DiagnosticCode,
        path: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            severity: Severity::Error,
            code,
            path: path.into(),
            line: None,
            column: None,
            message: message.into(),
            expected: None,
            suggestion: None,
            file: None,
        }
    }

    pub fn warning(
        code: DiagnosticCode,
        path: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            severity: Severity::Warning,
            ..Self::error(code, path, message)
        }
    }

    pub fn with_expected(mut self, expected: impl Into<String>) -> Self {
        self.expected = Some(expected.into());
        self
    }

    pub fn with_suggestion(mut self, suggestion: Option<String>) -> Self {
        self.suggestion = suggestion;
        self
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(file) = &self.file {
            write!(f, "{file}:")?;
            if let Some(line) = self.line {
                write!(f, "{line}:")?;
                if let Some(column) = self.column {
                    write!(f, "{column}:")?;
                }
            }
            f.write_str(" ")?;
        } else if let Some(line) = self.line {
            write!(f, "line {line}")?;
            if let Some(column) = self.column {
                write!(f, ", column {column}")?;
            }
            f.write_str(": ")?;
        }
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)?;
        if let Some(expected) = &self.expected {
            write!(f, "; expected {expected}")?;
        }
        if let Some(suggestion) = &self.suggestion {
            write!(f, "; {suggestion}")?;
        }
        Ok(())
    }
}

/// True when none of `diagnostics` is an error.
pub fn is_valid(diagnostics: &[Diagnostic]) -> bool {
    !diagnostics.iter().any(Diagnostic::is_error)
}

/// A file that cannot be read as a config at all. Type and validation problems are not
/// load errors: they are kept with the config (see [`crate::AppConfig::validate`]).
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: the file is {size} bytes; config files larger than {limit} bytes are refused")]
    TooLarge { file: String, size: u64, limit: u64 },
    #[error("{file}:{line}:{column}: the file is not valid UTF-8")]
    InvalidUtf8 {
        file: String,
        line: usize,
        column: usize,
    },
    #[error("{file}:{line}:{column}: {message}")]
    Syntax {
        file: String,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{file}:{line}:{column}: nesting deeper than {limit} levels")]
    TooDeep {
        file: String,
        line: usize,
        column: usize,
        limit: usize,
    },
    #[error("{file}: the config is not valid:\n{}", list(diagnostics))]
    Invalid {
        file: String,
        diagnostics: Vec<Diagnostic>,
    },
}

impl LoadError {
    /// Line of the problem in the file, when there is one.
    pub fn line(&self) -> Option<usize> {
        match self {
            LoadError::InvalidUtf8 { line, .. }
            | LoadError::Syntax { line, .. }
            | LoadError::TooDeep { line, .. } => Some(*line),
            LoadError::Invalid { diagnostics, .. } => diagnostics.iter().find_map(|d| d.line),
            LoadError::Io { .. } | LoadError::TooLarge { .. } => None,
        }
    }
}

fn list(diagnostics: &[Diagnostic]) -> String {
    diagnostics
        .iter()
        .map(|d| format!("  {d}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Why a config cannot be turned into a machine config.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    #[error("can not flatten an invalid v2 application config: {0}")]
    InvalidConfig(String),
    #[error("process group '{group}' is not defined in [processes]; defined groups: {}", defined.join(", "))]
    UnknownGroup { group: String, defined: Vec<String> },
    #[error(
        "Could not parse command for '{group}' process group; check [processes] section: {message}"
    )]
    ProcessCommand { group: String, message: String },
    #[error("Can't shell split release command: '{0}'")]
    ReleaseCommand(String),
    #[error(
        "check '{check}' for process group '{group}' has no port set and the group has no http_service to take it from"
    )]
    CheckWithoutPort { check: String, group: String },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
    #[error("machine_config: {0}")]
    MachineConfig(String),
    /// A broken `[build.compose]` file; the message names the file, position and key.
    #[error("build.compose: {0}")]
    Compose(String),
    #[error("{path}: {message}")]
    File { path: String, message: String },
}
