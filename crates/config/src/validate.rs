//! The rules of `fly config validate` (spec/flytoml.md §6.2) and a few more.

use crate::diagnostic::Diagnostic;
use crate::model::AppConfig;

pub(crate) fn validate(_config: &AppConfig) -> Vec<Diagnostic> {
    Vec::new()
}
