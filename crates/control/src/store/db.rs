//! The one SQL interface both backends implement. Queries are written once, with
//! PostgreSQL-style `$1` placeholders; the SQLite backend rewrites them to `?1`.

use std::fmt;

/// A value bound to, or read from, a query. Booleans are stored as integers 0/1 and
/// integers as 64-bit on both backends, so one query text serves both.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Null,
    Int(i64),
    Text(String),
    Blob(Vec<u8>),
}

impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Text(v.to_string())
    }
}
impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::Text(v)
    }
}
impl From<&String> for Value {
    fn from(v: &String) -> Self {
        Value::Text(v.clone())
    }
}
impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::Int(v)
    }
}
impl From<u64> for Value {
    fn from(v: u64) -> Self {
        Value::Int(i64::try_from(v).unwrap_or(i64::MAX))
    }
}
impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::Int(v as i64)
    }
}
impl From<&[u8]> for Value {
    fn from(v: &[u8]) -> Self {
        Value::Blob(v.to_vec())
    }
}
impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Self {
        v.map(Into::into).unwrap_or(Value::Null)
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum DbError {
    /// A UNIQUE or PRIMARY KEY constraint refused the write.
    #[error("duplicate key: {0}")]
    Unique(String),
    #[error("{0}")]
    Backend(String),
    #[error("stored data is unreadable: {0}")]
    Corrupt(String),
}

pub type DbResult<T> = Result<T, DbError>;

/// One result row.
#[derive(Clone, Debug, Default)]
pub struct Row(pub Vec<Value>);

impl Row {
    fn get(&self, index: usize) -> DbResult<&Value> {
        self.0
            .get(index)
            .ok_or_else(|| DbError::Corrupt(format!("column {index} missing")))
    }

    pub fn text(&self, index: usize) -> DbResult<String> {
        match self.get(index)? {
            Value::Text(s) => Ok(s.clone()),
            Value::Int(i) => Ok(i.to_string()),
            other => Err(DbError::Corrupt(format!(
                "column {index}: expected text, found {other:?}"
            ))),
        }
    }

    pub fn opt_text(&self, index: usize) -> DbResult<Option<String>> {
        match self.get(index)? {
            Value::Null => Ok(None),
            _ => self.text(index).map(Some),
        }
    }

    pub fn int(&self, index: usize) -> DbResult<i64> {
        match self.get(index)? {
            Value::Int(i) => Ok(*i),
            Value::Null => Ok(0),
            other => Err(DbError::Corrupt(format!(
                "column {index}: expected an integer, found {other:?}"
            ))),
        }
    }

    pub fn opt_int(&self, index: usize) -> DbResult<Option<i64>> {
        match self.get(index)? {
            Value::Null => Ok(None),
            _ => self.int(index).map(Some),
        }
    }

    pub fn bool(&self, index: usize) -> DbResult<bool> {
        Ok(self.int(index)? != 0)
    }

    pub fn blob(&self, index: usize) -> DbResult<Vec<u8>> {
        match self.get(index)? {
            Value::Blob(b) => Ok(b.clone()),
            Value::Text(s) => Ok(s.as_bytes().to_vec()),
            other => Err(DbError::Corrupt(format!(
                "column {index}: expected bytes, found {other:?}"
            ))),
        }
    }
}

/// A connection (or an open transaction) that runs statements.
pub trait Conn {
    /// Runs a statement; returns the number of rows it changed.
    fn execute(&mut self, sql: &str, params: &[Value]) -> DbResult<u64>;
    fn query(&mut self, sql: &str, params: &[Value]) -> DbResult<Vec<Row>>;

    fn query_one(&mut self, sql: &str, params: &[Value]) -> DbResult<Option<Row>> {
        Ok(self.query(sql, params)?.into_iter().next())
    }
}

/// A database: SQLite (embedded) or PostgreSQL (shared by several control planes).
pub trait Backend: Send + Sync {
    /// Runs `work` in one transaction, committed when it returns Ok; when this returns Ok
    /// the transaction is durable.
    fn transaction(
        &self,
        work: &mut (dyn FnMut(&mut dyn Conn) -> DbResult<()> + Send),
    ) -> DbResult<()>;
    /// Runs `work` outside an explicit transaction (single-statement reads).
    fn read(&self, work: &mut (dyn FnMut(&mut dyn Conn) -> DbResult<()> + Send)) -> DbResult<()>;
    fn kind(&self) -> BackendKind;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    Sqlite,
    Postgres,
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::Sqlite => "sqlite",
            BackendKind::Postgres => "postgres",
        })
    }
}

/// The schema, with the few type names that differ between backends as placeholders.
pub fn schema_for(kind: BackendKind, template: &str) -> String {
    let (int, blob, serial) = match kind {
        BackendKind::Sqlite => ("INTEGER", "BLOB", "INTEGER PRIMARY KEY AUTOINCREMENT"),
        BackendKind::Postgres => ("BIGINT", "BYTEA", "BIGSERIAL PRIMARY KEY"),
    };
    template
        .replace("{serial}", serial)
        .replace("{int}", int)
        .replace("{blob}", blob)
}

/// `$1` → `?1`, leaving string literals alone.
pub fn to_sqlite_placeholders(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut in_literal = false;
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\'' {
            in_literal = !in_literal;
        }
        if c == '$' && !in_literal && chars.peek().is_some_and(|n| n.is_ascii_digit()) {
            out.push('?');
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_rewritten_outside_literals() {
        assert_eq!(
            to_sqlite_placeholders("SELECT '$1', a FROM t WHERE b = $12 AND c = $2"),
            "SELECT '$1', a FROM t WHERE b = ?12 AND c = ?2"
        );
    }
}
