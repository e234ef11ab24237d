//! The agent's own durable record (SQLite, WAL): each machine's spec, state and network
//! slot, and the outbox of events not yet delivered to the control plane. Written before
//! anything is acted on, so a restarted agent knows everything it did.

use std::path::Path;
use std::sync::Mutex;

use aloft_api::MachineState;
use aloft_api::internal::{AgentEvent, ExitStatus, MachineSpec};
use rusqlite::{Connection, OptionalExtension, params};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("agent database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("agent database holds unreadable data: {0}")]
    Corrupt(String),
    #[error("closing the agent database to other users: {0}")]
    Permissions(#[from] std::io::Error),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// What the agent wants a machine to be, independent of what it currently is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Desired {
    Started,
    Stopped,
}

impl Desired {
    fn as_str(self) -> &'static str {
        match self {
            Desired::Started => "started",
            Desired::Stopped => "stopped",
        }
    }
    fn parse(text: &str) -> Self {
        if text == "started" {
            Desired::Started
        } else {
            Desired::Stopped
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct MachineRecord {
    pub spec: MachineSpec,
    pub state: MachineState,
    pub desired: Desired,
    pub seq: u64,
    pub slot: u32,
    pub shim_pid: Option<i32>,
    pub restarts: u32,
    /// Every restart the policy made, for metrics.
    pub restart_total: u64,
    pub last_exit: Option<ExitStatus>,
}

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS machines (
    id TEXT PRIMARY KEY, spec TEXT NOT NULL, state TEXT NOT NULL, desired TEXT NOT NULL,
    seq INTEGER NOT NULL, slot INTEGER NOT NULL UNIQUE, shim_pid INTEGER, restarts INTEGER NOT NULL DEFAULT 0,
    last_exit TEXT
);
CREATE TABLE IF NOT EXISTS outbox (seq INTEGER PRIMARY KEY, event TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"#;

pub struct Store {
    conn: Mutex<Connection>,
}

fn corrupt(err: impl std::fmt::Display) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        0,
        rusqlite::types::Type::Text,
        err.to_string().into(),
    )
}

fn record_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<MachineRecord> {
    let spec: String = row.get(0)?;
    let state: String = row.get(1)?;
    let desired: String = row.get(2)?;
    let last_exit: Option<String> = row.get(7)?;
    Ok(MachineRecord {
        spec: serde_json::from_str(&spec).map_err(corrupt)?,
        state: MachineState::parse(&state)
            .ok_or_else(|| corrupt(format!("unknown state {state}")))?,
        desired: Desired::parse(&desired),
        seq: row.get::<_, i64>(3)? as u64,
        slot: row.get(4)?,
        shim_pid: row.get(5)?,
        restarts: row.get(6)?,
        restart_total: row.get::<_, i64>(8)? as u64,
        last_exit: match last_exit {
            Some(text) => Some(serde_json::from_str(&text).map_err(corrupt)?),
            None => None,
        },
    })
}

const COLUMNS: &str =
    "spec, state, desired, seq, slot, shim_pid, restarts, last_exit, restart_total";

/// The smallest slot number not in `sorted_slots`.
fn lowest_free_slot(sorted_slots: &[u32]) -> u32 {
    let mut candidate = 0;
    for &slot in sorted_slots {
        if slot != candidate {
            break;
        }
        candidate += 1;
    }
    candidate
}

impl Store {
    pub fn open(path: &Path) -> StoreResult<Self> {
        create_private_file(path)?;
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        let has_restart_total: bool = conn
            .prepare("SELECT 1 FROM pragma_table_info('machines') WHERE name = 'restart_total'")?
            .exists([])?;
        if !has_restart_total {
            conn.execute_batch(
                "ALTER TABLE machines ADD COLUMN restart_total INTEGER NOT NULL DEFAULT 0",
            )?;
        }
        let has_run_started: bool = conn
            .prepare("SELECT 1 FROM pragma_table_info('machines') WHERE name = 'run_started_at'")?
            .exists([])?;
        if !has_run_started {
            conn.execute_batch("ALTER TABLE machines ADD COLUMN run_started_at INTEGER")?;
        }
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    fn with<T>(&self, f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>) -> StoreResult<T> {
        let mut guard = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard).map_err(|e| match e {
            rusqlite::Error::FromSqlConversionFailure(_, _, inner) => {
                StoreError::Corrupt(inner.to_string())
            }
            other => StoreError::Sqlite(other),
        })
    }

    pub fn machine(&self, id: &str) -> StoreResult<Option<MachineRecord>> {
        let sql = format!("SELECT {COLUMNS} FROM machines WHERE id = ?1");
        self.with(|c| c.query_row(&sql, [id], record_from_row).optional())
    }

    pub fn machines(&self) -> StoreResult<Vec<MachineRecord>> {
        let sql = format!("SELECT {COLUMNS} FROM machines ORDER BY id");
        self.with(|c| {
            let mut stmt = c.prepare(&sql)?;
            let rows = stmt.query_map([], record_from_row)?;
            rows.collect()
        })
    }

    /// Stores a new spec: a new machine gets the lowest free network slot; an existing
    /// one keeps its slot and state.
    pub fn put_spec(&self, spec: &MachineSpec) -> StoreResult<MachineRecord> {
        let text = serde_json::to_string(spec).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.with(|c| {
            let tx = c.transaction()?;
            let updated = tx.execute("UPDATE machines SET spec = ?2 WHERE id = ?1", params![spec.id, text])?;
            if updated == 0 {
                let mut taken = tx.prepare("SELECT slot FROM machines ORDER BY slot")?;
                let slots: Vec<u32> = taken.query_map([], |r| r.get(0))?.collect::<rusqlite::Result<_>>()?;
                drop(taken);
                let slot = lowest_free_slot(&slots);
                tx.execute(
                    "INSERT INTO machines(id, spec, state, desired, seq, slot, restarts) VALUES (?1, ?2, 'created', 'stopped', 0, ?3, 0)",
                    params![spec.id, text, slot],
                )?;
            }
            let sql = format!("SELECT {COLUMNS} FROM machines WHERE id = ?1");
            let record = tx.query_row(&sql, [&spec.id], record_from_row)?;
            tx.commit()?;
            Ok(record)
        })
    }

    pub fn set_desired(&self, id: &str, desired: Desired) -> StoreResult<()> {
        self.with(|c| {
            c.execute(
                "UPDATE machines SET desired = ?2 WHERE id = ?1",
                params![id, desired.as_str()],
            )
            .map(|_| ())
        })
    }

    pub fn set_shim(&self, id: &str, pid: Option<i32>) -> StoreResult<()> {
        self.with(|c| {
            c.execute(
                "UPDATE machines SET shim_pid = ?2 WHERE id = ?1",
                params![id, pid],
            )
            .map(|_| ())
        })
    }

    /// Counts one restart made by the restart policy.
    pub fn count_restart(&self, id: &str) -> StoreResult<()> {
        self.with(|c| {
            c.execute(
                "UPDATE machines SET restart_total = restart_total + 1 WHERE id = ?1",
                [id],
            )
            .map(|_| ())
        })
    }

    /// Records when the machine's current run began (Unix milliseconds), or that none runs.
    /// The restart policy's window is measured from it, across agent restarts.
    pub fn set_run_started(&self, id: &str, at_millis: Option<i64>) -> StoreResult<()> {
        self.with(|c| {
            c.execute(
                "UPDATE machines SET run_started_at = ?2 WHERE id = ?1",
                params![id, at_millis],
            )
            .map(|_| ())
        })
    }

    /// When the machine's current run began (Unix milliseconds), if recorded.
    pub fn run_started(&self, id: &str) -> StoreResult<Option<i64>> {
        self.with(|c| {
            c.query_row(
                "SELECT run_started_at FROM machines WHERE id = ?1",
                [id],
                |row| row.get(0),
            )
            .optional()
            .map(Option::flatten)
        })
    }

    pub fn set_restarts(&self, id: &str, restarts: u32) -> StoreResult<()> {
        self.with(|c| {
            c.execute(
                "UPDATE machines SET restarts = ?2 WHERE id = ?1",
                params![id, restarts],
            )
            .map(|_| ())
        })
    }

    /// Records a state change and its event in one transaction: the state and the event
    /// that announces it can never disagree after a crash.
    pub fn transition(
        &self,
        event: &mut AgentEvent,
        last_exit: Option<&ExitStatus>,
    ) -> StoreResult<u64> {
        self.with(|c| {
            let tx = c.transaction()?;
            let seq: i64 = tx
                .query_row("SELECT value FROM meta WHERE key = 'seq'", [], |r| r.get(0))
                .optional()?
                .unwrap_or(0)
                + 1;
            tx.execute("INSERT INTO meta(key, value) VALUES ('seq', ?1) ON CONFLICT(key) DO UPDATE SET value = excluded.value", [seq])?;
            event.seq = seq as u64;
            let exit_text = last_exit.map(|e| serde_json::to_string(e).unwrap_or_default());
            tx.execute(
                "UPDATE machines SET state = ?2, seq = ?3, last_exit = COALESCE(?4, last_exit) WHERE id = ?1",
                params![event.machine_id, event.state.as_str(), seq, exit_text],
            )?;
            let text = serde_json::to_string(&*event).map_err(corrupt)?;
            tx.execute("INSERT INTO outbox(seq, event) VALUES (?1, ?2)", params![seq, text])?;
            tx.commit()?;
            Ok(seq as u64)
        })
    }

    pub fn remove_machine(&self, id: &str) -> StoreResult<()> {
        self.with(|c| {
            c.execute("DELETE FROM machines WHERE id = ?1", [id])
                .map(|_| ())
        })
    }

    pub fn pending_events(&self, limit: usize) -> StoreResult<Vec<AgentEvent>> {
        self.with(|c| {
            let mut stmt = c.prepare("SELECT event FROM outbox ORDER BY seq LIMIT ?1")?;
            let rows = stmt.query_map([limit as i64], |r| {
                let text: String = r.get(0)?;
                serde_json::from_str::<AgentEvent>(&text).map_err(corrupt)
            })?;
            rows.collect()
        })
    }

    pub fn delivered(&self, up_to_seq: u64) -> StoreResult<()> {
        self.with(|c| {
            c.execute("DELETE FROM outbox WHERE seq <= ?1", [up_to_seq as i64])
                .map(|_| ())
        })
    }
}

/// Creates the database file readable by root alone before SQLite opens it (SQLite gives
/// its `-wal` and `-shm` files the database's mode), and closes an existing one.
fn create_private_file(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)?;
    for suffix in ["", "-wal", "-shm"] {
        let mut file = path.as_os_str().to_owned();
        file.push(suffix);
        match std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => return Err(err),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(id: &str) -> MachineSpec {
        MachineSpec {
            id: id.into(),
            ..Default::default()
        }
    }

    #[test]
    fn slots_fill_the_lowest_gap() {
        assert_eq!(lowest_free_slot(&[]), 0);
        assert_eq!(lowest_free_slot(&[0, 1, 3]), 2);
        assert_eq!(lowest_free_slot(&[1, 2]), 0);
    }

    #[test]
    fn the_restart_count_and_run_start_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.db");
        {
            let store = Store::open(&path).unwrap();
            store.put_spec(&spec("a")).unwrap();
            assert_eq!(store.run_started("a").unwrap(), None);
            store.set_run_started("a", Some(1_700_000_000_123)).unwrap();
            store.set_restarts("a", 3).unwrap();
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(store.run_started("a").unwrap(), Some(1_700_000_000_123));
        assert_eq!(store.machine("a").unwrap().unwrap().restarts, 3);
        store.set_run_started("a", None).unwrap();
        assert_eq!(store.run_started("a").unwrap(), None);
        assert_eq!(store.run_started("missing").unwrap(), None);
    }

    #[test]
    fn transitions_are_numbered_and_queued() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("agent.db")).unwrap();
        assert_eq!(store.put_spec(&spec("a")).unwrap().slot, 0);
        assert_eq!(store.put_spec(&spec("b")).unwrap().slot, 1);
        store.remove_machine("a").unwrap();
        assert_eq!(store.put_spec(&spec("c")).unwrap().slot, 0);
        let mut event = AgentEvent {
            seq: 0,
            machine_id: "b".into(),
            instance_id: "i".into(),
            kind: "start".into(),
            state: MachineState::Started,
            timestamp: 1,
            exit: None,
            private_ipv4: None,
            message: None,
            restart_count: None,
        };
        assert_eq!(store.transition(&mut event, None).unwrap(), 1);
        assert_eq!(store.transition(&mut event, None).unwrap(), 2);
        let record = store.machine("b").unwrap().unwrap();
        assert_eq!((record.state, record.seq), (MachineState::Started, 2));
        assert_eq!(store.pending_events(10).unwrap().len(), 2);
        store.delivered(1).unwrap();
        assert_eq!(store.pending_events(10).unwrap()[0].seq, 2);
    }
}
