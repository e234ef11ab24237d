//! The embedded backend: SQLite in WAL mode. One writer connection; reads use a small
//! pool of reader connections so they never wait behind a write.

use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{Connection, ToSql};

use super::db::{
    Backend, BackendKind, Conn, DbError, DbResult, Row, Value, to_sqlite_placeholders,
};

const READERS: usize = 3;

pub struct Sqlite {
    writer: Mutex<Connection>,
    readers: Vec<Mutex<Connection>>,
    next_reader: AtomicUsize,
}

fn db_error(err: rusqlite::Error) -> DbError {
    match &err {
        rusqlite::Error::SqliteFailure(e, message)
            if e.code == rusqlite::ErrorCode::ConstraintViolation =>
        {
            let unique = matches!(
                e.extended_code,
                rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
                    | rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY
            );
            let text = message.clone().unwrap_or_else(|| e.to_string());
            if unique {
                DbError::Unique(text)
            } else {
                DbError::Backend(text)
            }
        }
        _ => DbError::Backend(err.to_string()),
    }
}

impl ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self {
            Value::Null => ToSqlOutput::Borrowed(ValueRef::Null),
            Value::Int(i) => ToSqlOutput::Borrowed(ValueRef::Integer(*i)),
            Value::Text(s) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
            Value::Blob(b) => ToSqlOutput::Borrowed(ValueRef::Blob(b)),
        })
    }
}

fn configure(conn: &Connection) -> rusqlite::Result<()> {
    // WAL with synchronous=NORMAL: a committed transaction is in the WAL file (in the OS
    // page cache) before the call returns, so it survives the process being killed;
    // FULL would also survive power loss, at a cost per commit.
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    conn.set_prepared_statement_cache_capacity(128);
    Ok(())
}

impl Sqlite {
    pub fn open(path: &Path) -> DbResult<Self> {
        let writer = Connection::open(path).map_err(db_error)?;
        configure(&writer).map_err(db_error)?;
        let mut readers = Vec::new();
        for _ in 0..READERS {
            let reader = Connection::open(path).map_err(db_error)?;
            configure(&reader).map_err(db_error)?;
            readers.push(Mutex::new(reader));
        }
        Ok(Self {
            writer: Mutex::new(writer),
            readers,
            next_reader: AtomicUsize::new(0),
        })
    }

    /// A private in-memory database (tests); reads share the one connection.
    pub fn in_memory() -> DbResult<Self> {
        let conn = Connection::open_in_memory().map_err(db_error)?;
        configure(&conn).map_err(db_error)?;
        Ok(Self {
            writer: Mutex::new(conn),
            readers: Vec::new(),
            next_reader: AtomicUsize::new(0),
        })
    }
}

struct SqliteConn<'a>(&'a Connection);

impl Conn for SqliteConn<'_> {
    fn execute(&mut self, sql: &str, params: &[Value]) -> DbResult<u64> {
        let sql = to_sqlite_placeholders(sql);
        let mut statement = self.0.prepare_cached(&sql).map_err(db_error)?;
        let changed = statement
            .execute(rusqlite::params_from_iter(params.iter()))
            .map_err(db_error)?;
        Ok(changed as u64)
    }

    fn query(&mut self, sql: &str, params: &[Value]) -> DbResult<Vec<Row>> {
        let sql = to_sqlite_placeholders(sql);
        let mut statement = self.0.prepare_cached(&sql).map_err(db_error)?;
        let columns = statement.column_count();
        let mut rows = statement
            .query(rusqlite::params_from_iter(params.iter()))
            .map_err(db_error)?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(db_error)? {
            let mut values = Vec::with_capacity(columns);
            for i in 0..columns {
                values.push(match row.get_ref(i).map_err(db_error)? {
                    ValueRef::Null => Value::Null,
                    ValueRef::Integer(n) => Value::Int(n),
                    ValueRef::Real(f) => Value::Int(f as i64),
                    ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
                    ValueRef::Blob(b) => Value::Blob(b.to_vec()),
                });
            }
            out.push(Row(values));
        }
        Ok(out)
    }
}

/// Several statements see one consistent snapshot.
fn read_snapshot(
    conn: &Connection,
    work: &mut (dyn FnMut(&mut dyn Conn) -> DbResult<()> + Send),
) -> DbResult<()> {
    let tx = conn.unchecked_transaction().map_err(db_error)?;
    work(&mut SqliteConn(&tx))?;
    tx.finish().map_err(db_error)
}

impl Backend for Sqlite {
    fn transaction(
        &self,
        work: &mut (dyn FnMut(&mut dyn Conn) -> DbResult<()> + Send),
    ) -> DbResult<()> {
        let mut guard = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let tx = guard
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(db_error)?;
        work(&mut SqliteConn(&tx))?;
        tx.commit().map_err(db_error)
    }

    fn read(&self, work: &mut (dyn FnMut(&mut dyn Conn) -> DbResult<()> + Send)) -> DbResult<()> {
        if self.readers.is_empty() {
            let guard = self.writer.lock().unwrap_or_else(|p| p.into_inner());
            return work(&mut SqliteConn(&guard));
        }
        // Take a free reader if there is one, else wait for the next in turn.
        for reader in &self.readers {
            if let Ok(guard) = reader.try_lock() {
                return read_snapshot(&guard, work);
            }
        }
        let index = self.next_reader.fetch_add(1, Ordering::Relaxed) % self.readers.len();
        let guard = self.readers[index]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        read_snapshot(&guard, work)
    }

    fn kind(&self) -> BackendKind {
        BackendKind::Sqlite
    }
}
