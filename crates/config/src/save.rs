//! Writing the normalised document back (`aloft config save`). For TOML, an existing file
//! is edited in place with toml_edit: parts whose meaning did not change keep their
//! comments, formatting and key order; only changed or legacy parts are rewritten.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use toml_edit::{Array, ArrayOfTables, DocumentMut, InlineTable, Item, Table, Value};

use crate::node::{self, Kind, LineIndex, Node};
use crate::{AppConfig, Format};

/// The normalised document as a fresh file in `format` (TOML gets flyctl's header comment).
pub fn render(config: &AppConfig, format: Format) -> String {
    match format {
        Format::Json => {
            let mut text = to_flyctl_json(config).unwrap_or_else(|_| "{}".to_string());
            text.push('\n');
            text
        }
        Format::Yaml => serde_yaml::to_string(config).unwrap_or_default(),
        Format::Toml => {
            let header = format!(
                "# fly.toml app configuration file generated for {} on {}\n#\n# See https://fly.io/docs/reference/configuration/ for information about how to use this file.\n#\n\n",
                if config.app.is_empty() {
                    "<app>"
                } else {
                    &config.app
                },
                rfc3339_now()
            );
            header + &normalized_document(config).to_string()
        }
    }
}

/// JSON as flyctl prints it (`fly config show`, `fly.json`): Go's
/// `json.MarshalIndent(cfg, "", "  ")`, i.e. two-space indent, no blank lines, fields in
/// schema order, `<`, `>`, `&`, U+2028 and U+2029 escaped as `\u003c`…, and floats in Go's
/// shortest form (`0.2`, `1e-7`, `1.5e+21`). One deliberate difference: a whole float keeps
/// its `.0` (Go prints `2`), because Go forgets int-vs-float in untyped maps such as
/// `build.settings` and we do not, so `2` would read back as a different value.
pub fn to_flyctl_json<T: serde::Serialize + ?Sized>(value: &T) -> serde_json::Result<String> {
    let mut out = Vec::new();
    let mut serializer = serde_json::Serializer::with_formatter(&mut out, GoFormatter::default());
    value.serialize(&mut serializer)?;
    // The serializer only ever writes UTF-8.
    Ok(String::from_utf8_lossy(&out).into_owned())
}

struct GoFormatter {
    pretty: serde_json::ser::PrettyFormatter<'static>,
}

impl Default for GoFormatter {
    fn default() -> Self {
        Self {
            pretty: serde_json::ser::PrettyFormatter::with_indent(b"  "),
        }
    }
}

/// Go's `strconv.AppendFloat(f, 'f' or 'e', -1, 64)` as encoding/json picks it.
fn go_float(value: f64) -> String {
    let abs = value.abs();
    if abs != 0.0 && !(1e-6..1e21).contains(&abs) {
        let text = format!("{value:e}");
        match text.split_once('e') {
            Some((mantissa, exponent)) if !exponent.starts_with('-') => {
                format!("{mantissa}e+{exponent}")
            }
            _ => text,
        }
    } else if value.fract() == 0.0 && abs < 1e16 {
        format!("{value:.1}")
    } else {
        format!("{value}")
    }
}

impl serde_json::ser::Formatter for GoFormatter {
    fn write_f64<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        value: f64,
    ) -> std::io::Result<()> {
        writer.write_all(go_float(value).as_bytes())
    }

    fn write_f32<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        value: f32,
    ) -> std::io::Result<()> {
        writer.write_all(go_float(f64::from(value)).as_bytes())
    }

    fn write_string_fragment<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> std::io::Result<()> {
        let mut rest = fragment;
        while let Some(at) = rest.find(['<', '>', '&', '\u{2028}', '\u{2029}']) {
            writer.write_all(&rest.as_bytes()[..at])?;
            let c = rest[at..].chars().next().unwrap_or_default();
            write!(writer, "\\u{:04x}", u32::from(c))?;
            rest = &rest[at + c.len_utf8()..];
        }
        writer.write_all(rest.as_bytes())
    }

    fn begin_array<W: ?Sized + std::io::Write>(&mut self, writer: &mut W) -> std::io::Result<()> {
        self.pretty.begin_array(writer)
    }

    fn end_array<W: ?Sized + std::io::Write>(&mut self, writer: &mut W) -> std::io::Result<()> {
        self.pretty.end_array(writer)
    }

    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        self.pretty.begin_array_value(writer, first)
    }

    fn end_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
    ) -> std::io::Result<()> {
        self.pretty.end_array_value(writer)
    }

    fn begin_object<W: ?Sized + std::io::Write>(&mut self, writer: &mut W) -> std::io::Result<()> {
        self.pretty.begin_object(writer)
    }

    fn end_object<W: ?Sized + std::io::Write>(&mut self, writer: &mut W) -> std::io::Result<()> {
        self.pretty.end_object(writer)
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        self.pretty.begin_object_key(writer, first)
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
    ) -> std::io::Result<()> {
        self.pretty.begin_object_value(writer)
    }

    fn end_object_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
    ) -> std::io::Result<()> {
        self.pretty.end_object_value(writer)
    }
}

/// The normalised TOML, keeping everything of `original` whose meaning is unchanged.
pub fn render_preserving(config: &AppConfig, original: &str) -> String {
    let Ok(mut document) = original.parse::<DocumentMut>() else {
        return render(config, Format::Toml);
    };
    let normalized = normalized_document(config);
    merge_table(document.as_table_mut(), normalized.as_table());
    document.to_string()
}

/// Writes `config` to `path` in the format its extension names; an existing TOML file is
/// edited in place (see [`render_preserving`]). A config with load errors is refused.
pub fn save(config: &AppConfig, path: &Path) -> std::io::Result<()> {
    if !config.load_errors().is_empty() {
        return Err(std::io::Error::other(
            "the config has errors and holds only `app`; refusing to overwrite the file",
        ));
    }
    let format = Format::from_path(path);
    let text = match (format, std::fs::read_to_string(path)) {
        (Format::Toml, Ok(original)) => render_preserving(config, &original),
        _ => render(config, format),
    };
    std::fs::write(path, text)
}

/// The config as a TOML document, keys in schema order.
fn normalized_document(config: &AppConfig) -> DocumentMut {
    let json = serde_json::to_string(config).unwrap_or_else(|_| "{}".to_string());
    let root = node::parse_json(&json, "config", &LineIndex::new(&json))
        .unwrap_or_else(|_| Node::table(Vec::new()));
    let mut document = DocumentMut::new();
    if let Kind::Table(entries) = &root.kind {
        fill_table(document.as_table_mut(), entries);
    }
    document
}

fn fill_table(table: &mut Table, entries: &[node::Entry]) {
    let mut has_values = false;
    let mut has_children = false;
    for entry in entries {
        if let Some(item) = to_item(&entry.value) {
            has_values |= item.is_value();
            has_children |= !item.is_value();
            table.insert(&entry.key, item);
        }
    }
    table.set_implicit(!has_values && has_children);
}

fn to_item(node: &Node) -> Option<Item> {
    match &node.kind {
        Kind::Null => None,
        Kind::Table(entries) => {
            let mut table = Table::new();
            fill_table(&mut table, entries);
            Some(Item::Table(table))
        }
        Kind::Array(items)
            if !items.is_empty() && items.iter().all(|i| matches!(i.kind, Kind::Table(_))) =>
        {
            let mut array = ArrayOfTables::new();
            for item in items {
                if let Kind::Table(entries) = &item.kind {
                    let mut table = Table::new();
                    fill_table(&mut table, entries);
                    table.set_implicit(false);
                    array.push(table);
                }
            }
            Some(Item::ArrayOfTables(array))
        }
        _ => to_value(node).map(Item::Value),
    }
}

fn to_value(node: &Node) -> Option<Value> {
    Some(match &node.kind {
        Kind::Null => return None,
        Kind::Bool(b) => Value::from(*b),
        Kind::Int(i) => Value::from(*i),
        Kind::Float(f) => Value::from(*f),
        Kind::Str(s) | Kind::Datetime(s) => Value::from(s.as_str()),
        Kind::Array(items) => Value::Array(items.iter().filter_map(to_value).collect::<Array>()),
        Kind::Table(entries) => {
            let mut table = InlineTable::new();
            for entry in entries {
                if let Some(value) = to_value(&entry.value) {
                    table.insert(&entry.key, value);
                }
            }
            Value::InlineTable(table)
        }
    })
}

/// The meaning of an item, for deciding whether the written form can stay.
fn meaning(item: &Item) -> Option<serde_json::Value> {
    let text = match item {
        Item::None => return None,
        Item::Value(value) => {
            let mut value = value.clone();
            value.decor_mut().clear();
            format!("x = {value}")
        }
        Item::Table(table) => {
            let mut document = DocumentMut::new();
            document.insert("x", Item::Table(table.clone()));
            document.to_string()
        }
        Item::ArrayOfTables(array) => {
            let mut document = DocumentMut::new();
            document.insert("x", Item::ArrayOfTables(array.clone()));
            document.to_string()
        }
    };
    let root = node::parse_toml(&text, "", &LineIndex::new(&text)).ok()?;
    root.get("x").map(Node::to_json)
}

fn merge_table(original: &mut Table, normalized: &Table) {
    let keys: Vec<String> = original.iter().map(|(k, _)| k.to_string()).collect();
    for key in keys {
        match normalized.get(&key) {
            None => {
                original.remove(&key);
            }
            Some(new) => {
                let Some(old) = original.get_mut(&key) else {
                    continue;
                };
                let was_value = old.is_value();
                merge_item(old, new);
                if was_value && !old.is_value() {
                    // The key's comments belonged to a `key = value` line; a table header
                    // cannot carry them in the same place.
                    if let Some(mut key) = original.key_mut(&key) {
                        key.leaf_decor_mut().clear();
                        key.dotted_decor_mut().clear();
                    }
                }
            }
        }
    }
    for (key, item) in normalized.iter() {
        if !original.contains_key(key) {
            original.insert(key, item.clone());
        }
    }
}

fn merge_item(old: &mut Item, new: &Item) {
    match (&mut *old, new) {
        (Item::Table(old_table), Item::Table(new_table)) => {
            merge_table(old_table, new_table);
            if old_table.is_empty() {
                keep_empty_table_visible(old);
            }
        }
        (Item::ArrayOfTables(old_array), Item::ArrayOfTables(new_array))
            if old_array.len() == new_array.len() =>
        {
            for (old_table, new_table) in old_array.iter_mut().zip(new_array.iter()) {
                merge_table(old_table, new_table);
            }
        }
        _ => {
            if meaning(old) == meaning(new) {
                return;
            }
            let position = match &*old {
                Item::Table(t) => t.position(),
                Item::ArrayOfTables(a) => a.iter().next().and_then(Table::position),
                _ => None,
            };
            let decor = old.as_value().map(|v| v.decor().clone());
            let mut replacement = new.clone();
            match (&mut replacement, decor) {
                (Item::Value(value), Some(decor)) => *value.decor_mut() = decor,
                (Item::Table(table), _) => set_position(table, position),
                (Item::ArrayOfTables(array), _) => {
                    for table in array.iter_mut() {
                        set_position(table, position);
                    }
                }
                _ => {}
            }
            *old = replacement;
        }
    }
}

/// A table left with no entries still means something (`response = {}` is not a missing
/// `response`), but toml_edit writes nothing for an empty implicit table (one only named
/// on the way to a sub-table, as `response` in `[http_options.response.headers]`) or an
/// empty dotted one: the first gets its own header, the second becomes `key = {}`.
fn keep_empty_table_visible(item: &mut Item) {
    let Item::Table(table) = item else {
        return;
    };
    if table.is_dotted() {
        let mut inline = InlineTable::new();
        *inline.decor_mut() = table.decor().clone();
        *item = Item::Value(Value::InlineTable(inline));
    } else {
        table.set_implicit(false);
    }
}

fn set_position(table: &mut Table, position: Option<usize>) {
    if let Some(position) = position {
        table.set_position(position);
    }
}

fn rfc3339_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (proleptic Gregorian).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Format, parse_str};

    #[test]
    fn rewrites_only_what_changed() {
        let original = "# my app\napp = \"x\"  # the name\nkill_timeout = 5\n\n[build]\n  # which file\n  dockerfile = 'Dockerfile'\n  build_target = \"prod\"\n\n[mounts]\n  source = \"data\"\n  destination = \"/data\"\n";
        let config = parse_str(original, Format::Toml, "fly.toml")
            .unwrap()
            .config;
        let saved = render_preserving(&config, original);
        assert!(
            saved.starts_with("# my app\napp = \"x\"  # the name\nkill_timeout = \"5s\""),
            "{saved}"
        );
        assert!(
            saved.contains("  # which file\n  dockerfile = 'Dockerfile'\n"),
            "{saved}"
        );
        assert!(saved.contains("build-target = \"prod\""), "{saved}");
        assert!(!saved.contains("build_target"), "{saved}");
        assert!(saved.contains("[[mounts]]"), "{saved}");
        let again = parse_str(&saved, Format::Toml, "fly.toml").unwrap().config;
        assert_eq!(again, config);
    }

    #[test]
    fn fresh_toml_has_flyctl_header_and_sections() {
        let config = parse_str(
            "app = \"x\"\n[http_service]\ninternal_port = 8080\n[http_service.concurrency]\ntype = \"requests\"\n[[vm]]\nmemory = \"1gb\"\n",
            Format::Toml,
            "fly.toml",
        )
        .unwrap()
        .config;
        let text = render(&config, Format::Toml);
        assert!(
            text.starts_with("# fly.toml app configuration file generated for x on 20"),
            "{text}"
        );
        assert!(text.contains("\n[http_service]\n"), "{text}");
        assert!(text.contains("[http_service.concurrency]"), "{text}");
        assert!(text.contains("[[vm]]"), "{text}");
        assert_eq!(
            parse_str(&text, Format::Toml, "fly.toml").unwrap().config,
            config
        );
    }
}
