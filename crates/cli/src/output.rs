//! Plain tables in flyctl's style: a header row, columns aligned, no borders.

use comfy_table::presets::NOTHING;
use comfy_table::{ContentArrangement, Table};

pub fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut table = Table::new();
    table
        .load_preset(NOTHING)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(headers.to_vec());
    for row in rows {
        table.add_row(row);
    }
    let text = table.to_string();
    text.lines()
        .map(|line| line.trim_end().trim_start_matches(' '))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `2026-11-28T18:25:56Z` as `2026-11-28T18:25:56Z`, or a relative "5m ago" when recent.
pub fn when(timestamp: &str) -> String {
    let Ok(time) = chrono::DateTime::parse_from_rfc3339(timestamp) else {
        return timestamp.to_string();
    };
    let age = chrono::Utc::now().signed_duration_since(time.with_timezone(&chrono::Utc));
    match age.num_seconds() {
        s if s < 0 => timestamp.to_string(),
        s if s < 60 => format!("{s}s ago"),
        s if s < 3600 => format!("{}m ago", s / 60),
        s if s < 86_400 => format!("{}h{}m ago", s / 3600, (s % 3600) / 60),
        _ => timestamp.to_string(),
    }
}
