//! The multi-host backend: PostgreSQL through the synchronous `postgres` client. Each
//! connection lives on its own thread (the client runs its own small runtime, which must
//! not be nested in the server's), and store calls hand work to a free connection.

use std::collections::HashMap;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use postgres::types::{IsNull, ToSql, Type, to_sql_checked};
use postgres::{Client, NoTls, Statement};

use super::db::{Backend, BackendKind, Conn, DbError, DbResult, Row, Value};

type Job = Box<dyn FnOnce(&mut Worker) + Send>;

pub struct Postgres {
    jobs: Mutex<mpsc::Sender<Job>>,
}

struct Worker {
    client: Client,
    statements: HashMap<String, Statement>,
}

fn db_error(err: postgres::Error) -> DbError {
    if err.code() == Some(&postgres::error::SqlState::UNIQUE_VIOLATION) {
        return DbError::Unique(err.to_string());
    }
    match err.as_db_error() {
        Some(db) => DbError::Backend(format!("{}: {}", db.severity(), db.message())),
        None => DbError::Backend(err.to_string()),
    }
}

impl ToSql for Value {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            Value::Null => Ok(IsNull::Yes),
            Value::Int(i) => match *ty {
                Type::INT2 => i16::try_from(*i)?.to_sql(ty, out),
                Type::INT4 => i32::try_from(*i)?.to_sql(ty, out),
                Type::BOOL => (*i != 0).to_sql(ty, out),
                Type::TEXT | Type::VARCHAR => i.to_string().to_sql(ty, out),
                _ => i.to_sql(ty, out),
            },
            Value::Text(s) => match *ty {
                Type::BYTEA => s.as_bytes().to_sql(ty, out),
                _ => s.as_str().to_sql(ty, out),
            },
            Value::Blob(b) => b.as_slice().to_sql(ty, out),
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

fn read_value(row: &postgres::Row, index: usize) -> DbResult<Value> {
    let ty = row.columns()[index].type_().clone();
    let corrupt = |e: postgres::Error| DbError::Corrupt(format!("column {index}: {e}"));
    Ok(match ty {
        Type::INT8 => row
            .try_get::<_, Option<i64>>(index)
            .map_err(corrupt)?
            .map(Value::Int),
        Type::INT4 => row
            .try_get::<_, Option<i32>>(index)
            .map_err(corrupt)?
            .map(|v| Value::Int(v.into())),
        Type::INT2 => row
            .try_get::<_, Option<i16>>(index)
            .map_err(corrupt)?
            .map(|v| Value::Int(v.into())),
        Type::BOOL => row
            .try_get::<_, Option<bool>>(index)
            .map_err(corrupt)?
            .map(|v| Value::Int(v.into())),
        Type::BYTEA => row
            .try_get::<_, Option<Vec<u8>>>(index)
            .map_err(corrupt)?
            .map(Value::Blob),
        Type::NUMERIC => {
            return Err(DbError::Corrupt(format!(
                "column {index}: NUMERIC is not used by the store"
            )));
        }
        _ => row
            .try_get::<_, Option<String>>(index)
            .map_err(corrupt)?
            .map(Value::Text),
    }
    .unwrap_or(Value::Null))
}

fn params(values: &[Value]) -> Vec<&(dyn ToSql + Sync)> {
    values.iter().map(|v| v as &(dyn ToSql + Sync)).collect()
}

/// A transaction or the bare client, with a per-connection statement cache.
struct PgConn<'a, C: postgres::GenericClient> {
    client: &'a mut C,
    statements: &'a mut HashMap<String, Statement>,
}

impl<C: postgres::GenericClient> PgConn<'_, C> {
    fn statement(&mut self, sql: &str) -> DbResult<Statement> {
        if let Some(statement) = self.statements.get(sql) {
            return Ok(statement.clone());
        }
        let statement = self.client.prepare(sql).map_err(db_error)?;
        self.statements.insert(sql.to_string(), statement.clone());
        Ok(statement)
    }
}

impl<C: postgres::GenericClient> Conn for PgConn<'_, C> {
    fn execute(&mut self, sql: &str, values: &[Value]) -> DbResult<u64> {
        let statement = self.statement(sql)?;
        self.client
            .execute(&statement, &params(values))
            .map_err(db_error)
    }

    fn query(&mut self, sql: &str, values: &[Value]) -> DbResult<Vec<Row>> {
        let statement = self.statement(sql)?;
        let rows = self
            .client
            .query(&statement, &params(values))
            .map_err(db_error)?;
        rows.iter()
            .map(|row| {
                (0..row.len())
                    .map(|i| read_value(row, i))
                    .collect::<DbResult<Vec<_>>>()
                    .map(Row)
            })
            .collect()
    }
}

impl Postgres {
    /// Connects `connections` clients to `url` (`postgresql://user@host/db` or
    /// `host=... user=...`). Each client is made on its own thread: the synchronous
    /// client runs a small runtime of its own, which panics when started on a thread
    /// that is already driving the server's.
    pub fn connect(url: &str, connections: usize) -> DbResult<Self> {
        let (sender, receiver) = mpsc::channel::<Job>();
        let receiver = Arc::new(Mutex::new(receiver));
        for n in 0..connections.max(1) {
            let (connected, wait_connected) = mpsc::sync_channel::<DbResult<()>>(1);
            let receiver = receiver.clone();
            let url = url.to_string();
            std::thread::Builder::new()
                .name(format!("aloft-pg-{n}"))
                .spawn(move || {
                    let client = match Client::connect(&url, NoTls) {
                        Ok(client) => {
                            let _ = connected.send(Ok(()));
                            client
                        }
                        Err(err) => {
                            let _ = connected.send(Err(DbError::Backend(format!(
                                "connecting to PostgreSQL: {err}"
                            ))));
                            return;
                        }
                    };
                    let mut worker = Worker {
                        client,
                        statements: HashMap::new(),
                    };
                    loop {
                        let job = {
                            let guard = receiver.lock().unwrap_or_else(|p| p.into_inner());
                            guard.recv()
                        };
                        match job {
                            Ok(job) => job(&mut worker),
                            Err(_) => return,
                        }
                    }
                })
                .map_err(|e| DbError::Backend(format!("starting a database thread: {e}")))?;
            // Dropping `sender` on an error below closes the threads already connected.
            wait_until(|| wait_connected.recv())
                .map_err(|_| DbError::Backend("the database connection thread stopped".into()))??;
        }
        Ok(Self {
            jobs: Mutex::new(sender),
        })
    }

    fn run(&self, job: impl FnOnce(&mut Worker) -> DbResult<()> + Send) -> DbResult<()> {
        // The job borrows from the caller, who waits for it to finish before returning;
        // the box only erases the lifetime for the trip to the worker thread.
        let (done, wait) = mpsc::sync_channel::<DbResult<()>>(1);
        let job: Box<dyn FnOnce(&mut Worker) + Send + '_> = Box::new(move |worker: &mut Worker| {
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(worker)))
                .unwrap_or_else(|_| Err(DbError::Backend("database work panicked".into())));
            let _ = done.send(result);
        });
        // SAFETY: `wait.recv()` below does not return until the job has run (it sends
        // before finishing) or has been dropped unrun (the worker is gone and the sender
        // inside it is dropped), so nothing the job borrows outlives this call.
        let job: Job =
            unsafe { std::mem::transmute::<Box<dyn FnOnce(&mut Worker) + Send + '_>, Job>(job) };
        self.jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(job)
            .map_err(|_| DbError::Backend("database connections are closed".into()))?;
        wait_until(|| wait.recv())
            .map_err(|_| DbError::Backend("database connection thread stopped".into()))?
    }
}

/// Waits for a database thread's answer. On a worker of the server's multi-threaded
/// runtime the wait is announced with `block_in_place`, so the worker's other tasks
/// move to another thread instead of stalling behind a slow query; anywhere else (a
/// plain thread, a current-thread runtime, where `block_in_place` would panic) it
/// simply blocks.
fn wait_until<T>(wait: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(wait)
        }
        _ => wait(),
    }
}

impl Backend for Postgres {
    fn transaction(
        &self,
        work: &mut (dyn FnMut(&mut dyn Conn) -> DbResult<()> + Send),
    ) -> DbResult<()> {
        self.run(|worker| {
            let mut tx = worker.client.transaction().map_err(db_error)?;
            work(&mut PgConn {
                client: &mut tx,
                statements: &mut worker.statements,
            })?;
            tx.commit().map_err(db_error)
        })
    }

    fn read(&self, work: &mut (dyn FnMut(&mut dyn Conn) -> DbResult<()> + Send)) -> DbResult<()> {
        self.run(|worker| {
            let mut tx = worker
                .client
                .build_transaction()
                .read_only(true)
                .start()
                .map_err(db_error)?;
            work(&mut PgConn {
                client: &mut tx,
                statements: &mut worker.statements,
            })?;
            tx.commit().map_err(db_error)
        })
    }

    fn kind(&self) -> BackendKind {
        BackendKind::Postgres
    }
}
