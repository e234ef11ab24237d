//! A format-neutral document tree that remembers where each value and key came from, so
//! that problems found after normalisation can still point at a line and column.

use std::ops::Range;

use crate::diagnostic::LoadError;

/// Nesting deeper than this is refused before any recursive processing.
pub const MAX_DEPTH: usize = 64;

#[derive(Clone, Debug, PartialEq)]
pub enum Kind {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    /// A TOML date/time, kept as written.
    Datetime(String),
    Array(Vec<Node>),
    Table(Vec<Entry>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub kind: Kind,
    pub span: Option<Range<usize>>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub key: String,
    pub key_span: Option<Range<usize>>,
    pub value: Node,
}

impl Entry {
    /// Where to point when reporting about this key.
    pub fn position(&self) -> Option<usize> {
        self.key_span
            .as_ref()
            .or(self.value.span.as_ref())
            .map(|s| s.start)
    }
}

impl Node {
    pub fn new(kind: Kind, span: Option<Range<usize>>) -> Self {
        Self { kind, span }
    }

    pub fn table(entries: Vec<Entry>) -> Self {
        Self::new(Kind::Table(entries), None)
    }

    pub fn as_table(&self) -> Option<&[Entry]> {
        match &self.kind {
            Kind::Table(entries) => Some(entries),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match &self.kind {
            Kind::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn get(&self, key: &str) -> Option<&Node> {
        self.as_table()?
            .iter()
            .find(|e| e.key == key)
            .map(|e| &e.value)
    }

    pub fn is_empty_table(&self) -> bool {
        matches!(&self.kind, Kind::Table(entries) if entries.is_empty())
    }

    /// The Go type name flyctl would print for this value (its messages mention them).
    pub fn go_type(&self) -> &'static str {
        match self.kind {
            Kind::Null => "<nil>",
            Kind::Bool(_) => "bool",
            Kind::Int(_) => "int64",
            Kind::Float(_) => "float64",
            Kind::Str(_) => "string",
            Kind::Datetime(_) => "toml.LocalDateTime",
            Kind::Array(_) => "[]interface {}",
            Kind::Table(_) => "map[string]interface {}",
        }
    }

    /// A short human description: "a string", "an integer", ...
    pub fn describe(&self) -> &'static str {
        match self.kind {
            Kind::Null => "null",
            Kind::Bool(_) => "a boolean",
            Kind::Int(_) => "an integer",
            Kind::Float(_) => "a float",
            Kind::Str(_) => "a string",
            Kind::Datetime(_) => "a date-time",
            Kind::Array(_) => "an array",
            Kind::Table(_) => "a table",
        }
    }

    /// The value as JSON (tables keep their key order only as far as serde_json does).
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value;
        match &self.kind {
            Kind::Null => Value::Null,
            Kind::Bool(b) => Value::Bool(*b),
            Kind::Int(i) => Value::from(*i),
            Kind::Float(f) => serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number),
            Kind::Str(s) | Kind::Datetime(s) => Value::String(s.clone()),
            Kind::Array(items) => Value::Array(items.iter().map(Node::to_json).collect()),
            Kind::Table(entries) => Value::Object(
                entries
                    .iter()
                    .map(|e| (e.key.clone(), e.value.to_json()))
                    .collect(),
            ),
        }
    }

    /// Builds a tree from JSON; `depth` must already be known to be within [`MAX_DEPTH`].
    pub fn from_json(value: &serde_json::Value) -> Node {
        use serde_json::Value;
        let kind = match value {
            Value::Null => Kind::Null,
            Value::Bool(b) => Kind::Bool(*b),
            Value::Number(n) => match n.as_i64() {
                Some(i) => Kind::Int(i),
                None => Kind::Float(n.as_f64().unwrap_or(f64::NAN)),
            },
            Value::String(s) => Kind::Str(s.clone()),
            Value::Array(items) => Kind::Array(items.iter().map(Node::from_json).collect()),
            Value::Object(map) => Kind::Table(
                map.iter()
                    .map(|(k, v)| Entry {
                        key: k.clone(),
                        key_span: None,
                        value: Node::from_json(v),
                    })
                    .collect(),
            ),
        };
        Node::new(kind, None)
    }
}

/// Nesting depth of a JSON value, counted without recursion.
pub fn json_depth(value: &serde_json::Value) -> usize {
    let mut max = 0;
    let mut stack = vec![(value, 1usize)];
    while let Some((v, depth)) = stack.pop() {
        max = max.max(depth);
        match v {
            serde_json::Value::Array(items) => stack.extend(items.iter().map(|i| (i, depth + 1))),
            serde_json::Value::Object(map) => stack.extend(map.values().map(|i| (i, depth + 1))),
            _ => {}
        }
    }
    max
}

/// Maps byte offsets to 1-based line and column (columns count characters).
#[derive(Clone, Debug, Default)]
pub struct LineIndex {
    starts: Vec<usize>,
    ascii_lines: Vec<bool>,
    text: String,
}

impl LineIndex {
    pub fn new(text: &str) -> Self {
        let mut starts = vec![0];
        starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        let ascii_lines = starts
            .iter()
            .enumerate()
            .map(|(i, &start)| {
                let end = starts.get(i + 1).copied().unwrap_or(text.len());
                text.as_bytes()[start..end].is_ascii()
            })
            .collect();
        Self {
            starts,
            ascii_lines,
            text: text.to_string(),
        }
    }

    pub fn position(&self, offset: usize) -> (usize, usize) {
        // Counting characters is only needed (and only done) on short non-ASCII lines,
        // so that positions in a huge one-line document stay cheap.
        const COUNT_LIMIT: usize = 64 * 1024;
        let offset = offset.min(self.text.len());
        let line = self
            .starts
            .partition_point(|&s| s <= offset)
            .saturating_sub(1);
        let start = self.starts.get(line).copied().unwrap_or(0);
        let bytes = offset - start;
        let ascii = self.ascii_lines.get(line).copied().unwrap_or(true);
        let column = if ascii || bytes > COUNT_LIMIT {
            bytes
        } else {
            self.text
                .get(start..offset)
                .map_or(bytes, |s| s.chars().count())
        };
        (line + 1, column + 1)
    }
}

fn syntax(origin: &str, index: &LineIndex, offset: usize, message: impl Into<String>) -> LoadError {
    let (line, column) = index.position(offset);
    LoadError::Syntax {
        file: origin.to_string(),
        line,
        column,
        message: message.into(),
    }
}

fn too_deep(origin: &str, index: &LineIndex, offset: usize) -> LoadError {
    let (line, column) = index.position(offset);
    LoadError::TooDeep {
        file: origin.to_string(),
        line,
        column,
        limit: MAX_DEPTH,
    }
}

// ---------------------------------------------------------------------------------------
// TOML

/// Refuses TOML whose keys or headers nest deeper than [`MAX_DEPTH`] before the parser
/// builds (and later drops, recursively) such a tree. Counts the dots of each dotted key
/// and table header outside strings and comments; inline arrays and tables are already
/// bounded by the parser itself.
fn check_toml_depth(text: &str, origin: &str, index: &LineIndex) -> Result<(), LoadError> {
    let bytes = text.as_bytes();
    let mut i = 0;
    let mut dots = 0usize;
    let mut at_line_start = true;
    let mut in_key = false;
    let mut bracket_depth = 0usize;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'\n' => {
                dots = 0;
                at_line_start = true;
                in_key = false;
                i += 1;
                continue;
            }
            b'#' => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
                continue;
            }
            b'"' | b'\'' => {
                let triple = bytes.get(i..i + 3) == Some(&[b, b, b][..]);
                let quote_len = if triple { 3 } else { 1 };
                i += quote_len;
                while i < bytes.len() {
                    if b == b'"' && bytes[i] == b'\\' {
                        i += 2;
                        continue;
                    }
                    if !triple && bytes[i] == b'\n' {
                        break;
                    }
                    if bytes[i] == b && (!triple || bytes.get(i..i + 3) == Some(&[b, b, b][..])) {
                        i += quote_len;
                        break;
                    }
                    i += 1;
                }
                at_line_start = false;
                continue;
            }
            b' ' | b'\t' | b'\r' => {}
            b'[' if at_line_start || bracket_depth > 0 => {
                bracket_depth += 1;
                in_key = bracket_depth <= 2;
                at_line_start = false;
            }
            b']' => {
                bracket_depth = bracket_depth.saturating_sub(1);
                in_key = false;
            }
            b'=' => {
                in_key = false;
                dots = 0;
            }
            b'{' | b',' => {
                in_key = true;
                dots = 0;
            }
            b'.' if in_key || at_line_start => {
                dots += 1;
                if dots >= MAX_DEPTH {
                    return Err(too_deep(origin, index, i));
                }
            }
            _ => {
                if at_line_start {
                    in_key = true;
                }
                at_line_start = false;
            }
        }
        i += 1;
    }
    Ok(())
}

pub fn parse_toml(text: &str, origin: &str, index: &LineIndex) -> Result<Node, LoadError> {
    check_toml_depth(text, origin, index)?;
    let document = toml_edit::ImDocument::parse(text).map_err(|err| {
        let offset = err.span().map_or(0, |s| s.start);
        let message = err.message().trim().to_string();
        syntax(
            origin,
            index,
            offset,
            format!("TOML syntax error: {message}"),
        )
    })?;
    let root = toml_table(document.as_table(), 0).ok_or_else(|| too_deep(origin, index, 0))?;
    Ok(root)
}

fn toml_table(table: &toml_edit::Table, depth: usize) -> Option<Node> {
    if depth > MAX_DEPTH {
        return None;
    }
    let mut entries = Vec::with_capacity(table.len());
    for (key, item) in table.iter() {
        let key_span = table.key(key).and_then(|k| k.span());
        let value = toml_item(item, depth + 1)?;
        entries.push(Entry {
            key: key.to_string(),
            key_span,
            value,
        });
    }
    Some(Node::new(Kind::Table(entries), table.span()))
}

fn toml_item(item: &toml_edit::Item, depth: usize) -> Option<Node> {
    if depth > MAX_DEPTH {
        return None;
    }
    match item {
        toml_edit::Item::None => Some(Node::new(Kind::Null, None)),
        toml_edit::Item::Value(value) => toml_value(value, depth),
        toml_edit::Item::Table(table) => toml_table(table, depth),
        toml_edit::Item::ArrayOfTables(array) => {
            let items = array
                .iter()
                .map(|t| toml_table(t, depth + 1))
                .collect::<Option<Vec<_>>>()?;
            Some(Node::new(Kind::Array(items), array.span()))
        }
    }
}

fn toml_value(value: &toml_edit::Value, depth: usize) -> Option<Node> {
    if depth > MAX_DEPTH {
        return None;
    }
    use toml_edit::Value;
    let span = value.span();
    let kind = match value {
        Value::String(s) => Kind::Str(s.value().clone()),
        Value::Integer(i) => Kind::Int(*i.value()),
        Value::Float(f) => Kind::Float(*f.value()),
        Value::Boolean(b) => Kind::Bool(*b.value()),
        Value::Datetime(d) => Kind::Datetime(d.value().to_string()),
        Value::Array(array) => Kind::Array(
            array
                .iter()
                .map(|v| toml_value(v, depth + 1))
                .collect::<Option<Vec<_>>>()?,
        ),
        Value::InlineTable(table) => {
            let mut entries = Vec::with_capacity(table.len());
            for (key, item) in table.iter() {
                let key_span = table.key(key).and_then(|k| k.span());
                entries.push(Entry {
                    key: key.to_string(),
                    key_span,
                    value: toml_value(item, depth + 1)?,
                });
            }
            Kind::Table(entries)
        }
    };
    Some(Node::new(kind, span))
}

// ---------------------------------------------------------------------------------------
// JSON: a small parser of our own, so every key keeps its position and depth is bounded.

pub fn parse_json(text: &str, origin: &str, index: &LineIndex) -> Result<Node, LoadError> {
    let mut parser = JsonParser {
        bytes: text.as_bytes(),
        text,
        pos: 0,
        origin,
        index,
    };
    parser.skip_ws();
    if parser.pos >= parser.bytes.len() {
        return Ok(Node::table(Vec::new()));
    }
    let node = parser.value(0)?;
    parser.skip_ws();
    if parser.pos < parser.bytes.len() {
        return Err(parser.error("trailing characters after the JSON document"));
    }
    Ok(node)
}

struct JsonParser<'a> {
    bytes: &'a [u8],
    text: &'a str,
    pos: usize,
    origin: &'a str,
    index: &'a LineIndex,
}

impl JsonParser<'_> {
    fn error(&self, message: &str) -> LoadError {
        syntax(
            self.origin,
            self.index,
            self.pos,
            format!("JSON syntax error: {message}"),
        )
    }

    fn skip_ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.bytes.get(self.pos) {
            self.pos += 1;
        }
    }

    fn expect(&mut self, byte: u8) -> Result<(), LoadError> {
        if self.bytes.get(self.pos) == Some(&byte) {
            self.pos += 1;
            Ok(())
        } else {
            Err(self.error(&format!("expected `{}`", byte as char)))
        }
    }

    fn value(&mut self, depth: usize) -> Result<Node, LoadError> {
        if depth > MAX_DEPTH {
            return Err(too_deep(self.origin, self.index, self.pos));
        }
        self.skip_ws();
        let start = self.pos;
        let kind = match self.bytes.get(self.pos) {
            None => return Err(self.error("unexpected end of input")),
            Some(b'{') => {
                self.pos += 1;
                let mut entries: Vec<Entry> = Vec::new();
                let mut seen: std::collections::HashMap<String, usize> =
                    std::collections::HashMap::new();
                self.skip_ws();
                if self.bytes.get(self.pos) == Some(&b'}') {
                    self.pos += 1;
                } else {
                    loop {
                        self.skip_ws();
                        let key_start = self.pos;
                        let key = self.string()?;
                        let key_span = Some(key_start..self.pos);
                        self.skip_ws();
                        self.expect(b':')?;
                        let value = self.value(depth + 1)?;
                        match seen.get(&key) {
                            Some(&i) => {
                                entries[i] = Entry {
                                    key,
                                    key_span,
                                    value,
                                }
                            }
                            None => {
                                seen.insert(key.clone(), entries.len());
                                entries.push(Entry {
                                    key,
                                    key_span,
                                    value,
                                });
                            }
                        }
                        self.skip_ws();
                        match self.bytes.get(self.pos) {
                            Some(b',') => self.pos += 1,
                            Some(b'}') => {
                                self.pos += 1;
                                break;
                            }
                            _ => return Err(self.error("expected `,` or `}`")),
                        }
                    }
                }
                Kind::Table(entries)
            }
            Some(b'[') => {
                self.pos += 1;
                let mut items = Vec::new();
                self.skip_ws();
                if self.bytes.get(self.pos) == Some(&b']') {
                    self.pos += 1;
                } else {
                    loop {
                        items.push(self.value(depth + 1)?);
                        self.skip_ws();
                        match self.bytes.get(self.pos) {
                            Some(b',') => self.pos += 1,
                            Some(b']') => {
                                self.pos += 1;
                                break;
                            }
                            _ => return Err(self.error("expected `,` or `]`")),
                        }
                    }
                }
                Kind::Array(items)
            }
            Some(b'"') => Kind::Str(self.string()?),
            Some(b't') => self.literal("true", Kind::Bool(true))?,
            Some(b'f') => self.literal("false", Kind::Bool(false))?,
            Some(b'n') => self.literal("null", Kind::Null)?,
            Some(b'-' | b'0'..=b'9') => self.number()?,
            Some(_) => return Err(self.error("unexpected character")),
        };
        Ok(Node::new(kind, Some(start..self.pos)))
    }

    fn literal(&mut self, word: &str, kind: Kind) -> Result<Kind, LoadError> {
        if self.bytes[self.pos..].starts_with(word.as_bytes()) {
            self.pos += word.len();
            Ok(kind)
        } else {
            Err(self.error("unexpected word"))
        }
    }

    fn number(&mut self) -> Result<Kind, LoadError> {
        let start = self.pos;
        while let Some(b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9') = self.bytes.get(self.pos) {
            self.pos += 1;
        }
        let text = &self.text[start..self.pos];
        if let Ok(i) = text.parse::<i64>() {
            return Ok(Kind::Int(i));
        }
        match text.parse::<f64>() {
            Ok(f) if f.is_finite() => Ok(Kind::Float(f)),
            _ => {
                self.pos = start;
                Err(self.error("invalid number"))
            }
        }
    }

    fn string(&mut self) -> Result<String, LoadError> {
        self.expect(b'"')?;
        let mut out = String::new();
        loop {
            let run_start = self.pos;
            while let Some(&b) = self.bytes.get(self.pos) {
                if b == b'"' || b == b'\\' || b < 0x20 {
                    break;
                }
                self.pos += 1;
            }
            out.push_str(&self.text[run_start..self.pos]);
            match self.bytes.get(self.pos) {
                Some(b'"') => {
                    self.pos += 1;
                    return Ok(out);
                }
                Some(b'\\') => {
                    self.pos += 1;
                    let escape = self.bytes.get(self.pos).copied();
                    self.pos += 1;
                    match escape {
                        Some(b'"') => out.push('"'),
                        Some(b'\\') => out.push('\\'),
                        Some(b'/') => out.push('/'),
                        Some(b'b') => out.push('\u{8}'),
                        Some(b'f') => out.push('\u{c}'),
                        Some(b'n') => out.push('\n'),
                        Some(b'r') => out.push('\r'),
                        Some(b't') => out.push('\t'),
                        Some(b'u') => {
                            let high = self.hex4()?;
                            let code = if (0xD800..0xDC00).contains(&high) {
                                if self.bytes.get(self.pos..self.pos + 2) != Some(b"\\u") {
                                    return Err(self.error("unpaired surrogate in \\u escape"));
                                }
                                self.pos += 2;
                                let low = self.hex4()?;
                                if !(0xDC00..0xE000).contains(&low) {
                                    return Err(self.error("invalid surrogate pair in \\u escape"));
                                }
                                0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00)
                            } else {
                                high
                            };
                            out.push(
                                char::from_u32(code)
                                    .ok_or_else(|| self.error("invalid \\u escape"))?,
                            );
                        }
                        _ => return Err(self.error("invalid escape")),
                    }
                }
                Some(_) => return Err(self.error("control character in string")),
                None => return Err(self.error("unterminated string")),
            }
        }
    }

    fn hex4(&mut self) -> Result<u32, LoadError> {
        let digits = self
            .text
            .get(self.pos..self.pos + 4)
            .filter(|d| d.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or_else(|| self.error("invalid \\u escape"))?;
        self.pos += 4;
        u32::from_str_radix(digits, 16).map_err(|_| self.error("invalid \\u escape"))
    }
}

// ---------------------------------------------------------------------------------------
// YAML: serde_yaml has no positions, so keys are found again in the text, in document
// order (best effort).

/// Refuses YAML whose flow collections (`[...]`, `{...}`) nest deeper than [`MAX_DEPTH`]:
/// the YAML parser slows down badly on such input long before its own limit applies.
fn check_yaml_depth(text: &str, origin: &str, index: &LineIndex) -> Result<(), LoadError> {
    let bytes = text.as_bytes();
    let starts_token = |previous: u8| {
        matches!(
            previous,
            b' ' | b'\t' | b'\r' | b'\n' | b',' | b'[' | b'{' | b':'
        )
    };
    let mut depth = 0usize;
    let mut previous = b'\n';
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'#' if previous.is_ascii_whitespace() => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
                continue;
            }
            b'"' | b'\'' if starts_token(previous) => {
                i += 1;
                while i < bytes.len() {
                    if b == b'"' && bytes[i] == b'\\' {
                        i += 2;
                        continue;
                    }
                    if bytes[i] == b {
                        if b == b'\'' && bytes.get(i + 1) == Some(&b'\'') {
                            i += 2;
                            continue;
                        }
                        break;
                    }
                    i += 1;
                }
            }
            b'[' | b'{' if depth > 0 || starts_token(previous) => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(too_deep(origin, index, i));
                }
            }
            b']' | b'}' if depth > 0 => depth -= 1,
            _ => {}
        }
        previous = b;
        i += 1;
    }
    Ok(())
}

pub fn parse_yaml(text: &str, origin: &str, index: &LineIndex) -> Result<Node, LoadError> {
    if text.trim().is_empty() {
        return Ok(Node::table(Vec::new()));
    }
    check_yaml_depth(text, origin, index)?;
    let value: serde_yaml::Value = serde_yaml::from_str(text).map_err(|err| {
        let offset = err.location().map_or(0, |l| l.index());
        syntax(origin, index, offset, format!("YAML syntax error: {err}"))
    })?;
    let mut cursor = 0;
    yaml_node(&value, text, &mut cursor, 0).ok_or_else(|| too_deep(origin, index, 0))
}

fn yaml_node(
    value: &serde_yaml::Value,
    text: &str,
    cursor: &mut usize,
    depth: usize,
) -> Option<Node> {
    use serde_yaml::Value;
    if depth > MAX_DEPTH {
        return None;
    }
    let kind = match value {
        Value::Null => Kind::Null,
        Value::Bool(b) => Kind::Bool(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Kind::Int(i),
            None => Kind::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => Kind::Str(s.clone()),
        Value::Sequence(items) => Kind::Array(
            items
                .iter()
                .map(|i| yaml_node(i, text, cursor, depth + 1))
                .collect::<Option<Vec<_>>>()?,
        ),
        Value::Mapping(map) => {
            let mut entries = Vec::with_capacity(map.len());
            for (k, v) in map {
                let key = match k {
                    Value::String(s) => s.clone(),
                    Value::Bool(b) => b.to_string(),
                    Value::Number(n) => n.to_string(),
                    Value::Null => "null".to_string(),
                    _ => format!("{k:?}"),
                };
                let key_span = find_yaml_key(text, &key, cursor);
                let value = yaml_node(v, text, cursor, depth + 1)?;
                entries.push(Entry {
                    key,
                    key_span,
                    value,
                });
            }
            Kind::Table(entries)
        }
        Value::Tagged(tagged) => return yaml_node(&tagged.value, text, cursor, depth + 1),
    };
    Some(Node::new(kind, None))
}

fn find_yaml_key(text: &str, key: &str, cursor: &mut usize) -> Option<Range<usize>> {
    // A bounded look-ahead keeps this linear when keys are written in unexpected ways.
    const WINDOW: usize = 4096;
    let mut end = (*cursor + WINDOW + key.len()).min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let rest = text.get(*cursor..end)?;
    let candidates = [
        format!("{key}:"),
        format!("\"{key}\":"),
        format!("'{key}':"),
    ];
    let found = candidates
        .iter()
        .filter_map(|c| rest.find(c.as_str()))
        .min()?;
    let start = *cursor + found;
    *cursor = start + key.len();
    Some(start..start + key.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_index_counts_lines_and_characters() {
        let index = LineIndex::new("a = 1\nbé = 2\n");
        assert_eq!(index.position(0), (1, 1));
        assert_eq!(index.position(6), (2, 1));
        assert_eq!(index.position(10), (2, 4));
    }

    #[test]
    fn json_keeps_key_positions() {
        let text = "{\n  \"app\": \"x\",\n  \"services\": [{\"internal_port\": 8080}]\n}";
        let index = LineIndex::new(text);
        let node = parse_json(text, "fly.json", &index).unwrap();
        let entries = node.as_table().unwrap();
        assert_eq!(index.position(entries[1].position().unwrap()), (3, 3));
        assert_eq!(node.get("app").and_then(Node::as_str), Some("x"));
    }

    #[test]
    fn json_errors_have_positions() {
        let text = "{\n  \"app\": tru\n}";
        let err = parse_json(text, "fly.json", &LineIndex::new(text)).unwrap_err();
        assert_eq!(err.line(), Some(2));
    }

    #[test]
    fn deep_toml_keys_are_refused() {
        let text = format!("{} = 1", vec!["a"; 500].join("."));
        let err = parse_toml(&text, "fly.toml", &LineIndex::new(&text)).unwrap_err();
        assert!(matches!(err, LoadError::TooDeep { .. }), "{err}");
        let text = format!("[{}]\n", vec!["a"; 500].join("."));
        assert!(parse_toml(&text, "fly.toml", &LineIndex::new(&text)).is_err());
        let ok = "[a.b.c]\nx.y = \"a.b.c.d.e\"\n";
        assert!(parse_toml(ok, "fly.toml", &LineIndex::new(ok)).is_ok());
    }
}
