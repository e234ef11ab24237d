//! The control plane's durable state: one SQLite database (WAL) behind one store layer.
//! Every method is one transaction; a method that returns Ok has been committed.

use std::path::Path;
use std::sync::Mutex;

use aloft_api::{MachineConfig, MachineEvent, MachineState};
use rusqlite::{Connection, OptionalExtension, Row, params};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("{0}")]
    Conflict(String),
    #[error("stored data is unreadable: {0}")]
    Corrupt(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OrgRow {
    pub id: String,
    pub slug: String,
    pub name: String,
    pub created_at: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRow {
    pub id: String,
    pub org_id: String,
    /// `org` (full access to the org), `deploy`, `readonly`, `host` (an agent or proxy).
    pub kind: String,
    pub name: String,
    pub key: Vec<u8>,
    pub created_at: String,
    pub revoked: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppRow {
    pub id: String,
    pub name: String,
    pub org_id: String,
    pub org_slug: String,
    pub network: String,
    pub status: String,
    pub created_at: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct MachineRow {
    pub id: String,
    pub app_id: String,
    pub app_name: String,
    pub name: String,
    pub region: String,
    pub host_id: String,
    pub state: MachineState,
    pub instance_id: String,
    pub config: MachineConfig,
    pub private_ip: Option<String>,
    pub private_ipv4: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

impl MachineRow {
    pub fn process_group(&self) -> Option<&str> {
        self.config.process_group()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReleaseRow {
    pub id: String,
    pub app_id: String,
    pub version: u64,
    pub status: String,
    pub description: String,
    pub image: String,
    pub config: String,
    pub created_at: String,
    /// Who made the release (the name of the token used).
    pub user: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostRow {
    pub id: String,
    pub region: String,
    pub agent_url: String,
    pub last_seen: String,
}

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS orgs (
    id TEXT PRIMARY KEY, slug TEXT NOT NULL UNIQUE, name TEXT NOT NULL, created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY, org_id TEXT NOT NULL, kind TEXT NOT NULL, name TEXT NOT NULL,
    key BLOB NOT NULL, created_at TEXT NOT NULL, revoked INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS apps (
    id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, org_id TEXT NOT NULL REFERENCES orgs(id),
    network TEXT NOT NULL, status TEXT NOT NULL, created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS machines (
    id TEXT PRIMARY KEY, app_id TEXT NOT NULL, name TEXT NOT NULL, region TEXT NOT NULL,
    host_id TEXT NOT NULL, state TEXT NOT NULL, instance_id TEXT NOT NULL, config TEXT NOT NULL,
    private_ip TEXT, private_ipv4 TEXT, created_at TEXT NOT NULL, updated_at TEXT NOT NULL,
    agent_seq INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS machines_by_app ON machines(app_id);
CREATE TABLE IF NOT EXISTS machine_events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL, machine_id TEXT NOT NULL,
    type TEXT NOT NULL, status TEXT NOT NULL, source TEXT NOT NULL, timestamp INTEGER NOT NULL,
    request TEXT
);
CREATE INDEX IF NOT EXISTS machine_events_by_machine ON machine_events(machine_id);
CREATE TABLE IF NOT EXISTS releases (
    id TEXT PRIMARY KEY, app_id TEXT NOT NULL, version INTEGER NOT NULL, status TEXT NOT NULL,
    description TEXT NOT NULL, image TEXT NOT NULL, config TEXT NOT NULL, created_at TEXT NOT NULL,
    UNIQUE(app_id, version)
);
CREATE TABLE IF NOT EXISTS hosts (
    id TEXT PRIMARY KEY, region TEXT NOT NULL, agent_url TEXT NOT NULL, last_seen TEXT NOT NULL,
    last_event_seq INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"#;

pub struct Store {
    conn: Mutex<Connection>,
}

pub fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

pub fn now_millis() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn corrupt(what: &str, err: impl std::fmt::Display) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        0,
        rusqlite::types::Type::Text,
        format!("{what}: {err}").into(),
    )
}

fn parse_state(text: &str) -> rusqlite::Result<MachineState> {
    MachineState::parse(text).ok_or_else(|| corrupt("machine state", text))
}

const MACHINE_COLUMNS: &str = "m.id, m.app_id, a.name, m.name, m.region, m.host_id, m.state, m.instance_id, m.config, m.private_ip, m.private_ipv4, m.created_at, m.updated_at";

fn machine_from_row(row: &Row<'_>) -> rusqlite::Result<MachineRow> {
    let config_text: String = row.get(8)?;
    let config: MachineConfig =
        serde_json::from_str(&config_text).map_err(|e| corrupt("machine config", e))?;
    let state_text: String = row.get(6)?;
    Ok(MachineRow {
        id: row.get(0)?,
        app_id: row.get(1)?,
        app_name: row.get(2)?,
        name: row.get(3)?,
        region: row.get(4)?,
        host_id: row.get(5)?,
        state: parse_state(&state_text)?,
        instance_id: row.get(7)?,
        config,
        private_ip: row.get(9)?,
        private_ipv4: row.get(10)?,
        created_at: row.get(11)?,
        updated_at: row.get(12)?,
    })
}

const APP_COLUMNS: &str = "a.id, a.name, a.org_id, o.slug, a.network, a.status, a.created_at";

fn app_from_row(row: &Row<'_>) -> rusqlite::Result<AppRow> {
    Ok(AppRow {
        id: row.get(0)?,
        name: row.get(1)?,
        org_id: row.get(2)?,
        org_slug: row.get(3)?,
        network: row.get(4)?,
        status: row.get(5)?,
        created_at: row.get(6)?,
    })
}

fn release_from_row(row: &Row<'_>) -> rusqlite::Result<ReleaseRow> {
    Ok(ReleaseRow {
        id: row.get(0)?,
        app_id: row.get(1)?,
        version: row.get::<_, i64>(2)? as u64,
        status: row.get(3)?,
        description: row.get(4)?,
        image: row.get(5)?,
        config: row.get(6)?,
        created_at: row.get(7)?,
        user: row.get(8)?,
    })
}

const RELEASE_COLUMNS: &str =
    "id, app_id, version, status, description, image, config, created_at, created_by";

/// Adds a column that a newer version of the schema has to a database made by an older one.
fn add_column_if_missing(
    conn: &Connection,
    table: &str,
    column: &str,
    definition: &str,
) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare(&format!("PRAGMA table_info({table})"))?;
    let present = stmt
        .query_map([], |r| r.get::<_, String>(1))?
        .collect::<rusqlite::Result<Vec<String>>>()?;
    if !present.iter().any(|c| c == column) {
        conn.execute_batch(&format!(
            "ALTER TABLE {table} ADD COLUMN {column} {definition}"
        ))?;
    }
    Ok(())
}

fn is_unique_violation(err: &rusqlite::Error) -> bool {
    matches!(err, rusqlite::Error::SqliteFailure(e, _) if e.code == rusqlite::ErrorCode::ConstraintViolation)
}

impl Store {
    pub fn open(path: &Path) -> StoreResult<Self> {
        let conn = Connection::open(path)?;
        Self::init(conn)
    }

    pub fn open_in_memory() -> StoreResult<Self> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(conn: Connection) -> StoreResult<Self> {
        // WAL with synchronous=NORMAL: a committed transaction survives the process being
        // killed (it is in the WAL, in the OS page cache); FULL would also survive power loss.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        add_column_if_missing(&conn, "releases", "created_by", "TEXT NOT NULL DEFAULT ''")?;
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    pub(crate) fn with<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>,
    ) -> StoreResult<T> {
        let mut guard = self
            .conn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&mut guard).map_err(|e| match e {
            rusqlite::Error::FromSqlConversionFailure(_, _, inner) => {
                StoreError::Corrupt(inner.to_string())
            }
            other => StoreError::Sqlite(other),
        })
    }

    // ---- settings ----

    pub fn setting(&self, key: &str) -> StoreResult<Option<String>> {
        self.with(|c| {
            c.query_row("SELECT value FROM settings WHERE key = ?1", [key], |r| {
                r.get(0)
            })
            .optional()
        })
    }

    pub fn set_setting(&self, key: &str, value: &str) -> StoreResult<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO settings(key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                params![key, value],
            )
            .map(|_| ())
        })
    }

    // ---- orgs ----

    pub fn create_org(&self, org: &OrgRow) -> StoreResult<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO orgs(id, slug, name, created_at) VALUES (?1, ?2, ?3, ?4)",
                params![org.id, org.slug, org.name, org.created_at],
            )
        })
        .map_err(|e| match e {
            StoreError::Sqlite(ref inner) if is_unique_violation(inner) => {
                StoreError::Conflict(format!("organization {} already exists", org.slug))
            }
            other => other,
        })?;
        Ok(())
    }

    pub fn org_by_slug(&self, slug: &str) -> StoreResult<Option<OrgRow>> {
        self.with(|c| {
            c.query_row(
                "SELECT id, slug, name, created_at FROM orgs WHERE slug = ?1",
                [slug],
                |r| {
                    Ok(OrgRow {
                        id: r.get(0)?,
                        slug: r.get(1)?,
                        name: r.get(2)?,
                        created_at: r.get(3)?,
                    })
                },
            )
            .optional()
        })
    }

    pub fn org_by_id(&self, id: &str) -> StoreResult<Option<OrgRow>> {
        self.with(|c| {
            c.query_row(
                "SELECT id, slug, name, created_at FROM orgs WHERE id = ?1",
                [id],
                |r| {
                    Ok(OrgRow {
                        id: r.get(0)?,
                        slug: r.get(1)?,
                        name: r.get(2)?,
                        created_at: r.get(3)?,
                    })
                },
            )
            .optional()
        })
    }

    pub fn list_orgs(&self) -> StoreResult<Vec<OrgRow>> {
        self.with(|c| {
            let mut stmt =
                c.prepare("SELECT id, slug, name, created_at FROM orgs ORDER BY slug")?;
            let rows = stmt.query_map([], |r| {
                Ok(OrgRow {
                    id: r.get(0)?,
                    slug: r.get(1)?,
                    name: r.get(2)?,
                    created_at: r.get(3)?,
                })
            })?;
            rows.collect()
        })
    }

    // ---- tokens ----

    pub fn insert_token(&self, token: &TokenRow) -> StoreResult<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO tokens(id, org_id, kind, name, key, created_at, revoked) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![token.id, token.org_id, token.kind, token.name, token.key, token.created_at, token.revoked],
            )
            .map(|_| ())
        })
    }

    pub fn token(&self, id: &str) -> StoreResult<Option<TokenRow>> {
        self.with(|c| {
            c.query_row(
                "SELECT id, org_id, kind, name, key, created_at, revoked FROM tokens WHERE id = ?1",
                [id],
                |r| {
                    Ok(TokenRow {
                        id: r.get(0)?,
                        org_id: r.get(1)?,
                        kind: r.get(2)?,
                        name: r.get(3)?,
                        key: r.get(4)?,
                        created_at: r.get(5)?,
                        revoked: r.get(6)?,
                    })
                },
            )
            .optional()
        })
    }

    // ---- apps ----

    pub fn create_app(&self, app: &AppRow) -> StoreResult<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO apps(id, name, org_id, network, status, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![app.id, app.name, app.org_id, app.network, app.status, app.created_at],
            )
        })
        .map_err(|e| match e {
            StoreError::Sqlite(ref inner) if is_unique_violation(inner) => StoreError::Conflict(format!("app {} already exists", app.name)),
            other => other,
        })?;
        Ok(())
    }

    pub fn app(&self, name: &str) -> StoreResult<Option<AppRow>> {
        let sql = format!(
            "SELECT {APP_COLUMNS} FROM apps a JOIN orgs o ON o.id = a.org_id WHERE a.name = ?1"
        );
        self.with(|c| c.query_row(&sql, [name], app_from_row).optional())
    }

    pub fn list_apps(&self, org_id: Option<&str>) -> StoreResult<Vec<AppRow>> {
        let sql = format!(
            "SELECT {APP_COLUMNS} FROM apps a JOIN orgs o ON o.id = a.org_id WHERE (?1 IS NULL OR a.org_id = ?1) ORDER BY a.name"
        );
        self.with(|c| {
            let mut stmt = c.prepare(&sql)?;
            let rows = stmt.query_map([org_id], app_from_row)?;
            rows.collect()
        })
    }

    pub fn set_app_status(&self, app_id: &str, status: &str) -> StoreResult<()> {
        self.with(|c| {
            c.execute(
                "UPDATE apps SET status = ?2 WHERE id = ?1",
                params![app_id, status],
            )
            .map(|_| ())
        })
    }

    pub fn delete_app(&self, app_id: &str) -> StoreResult<()> {
        self.with(|c| {
            let tx = c.transaction()?;
            tx.execute("DELETE FROM machine_events WHERE machine_id IN (SELECT id FROM machines WHERE app_id = ?1)", [app_id])?;
            tx.execute("DELETE FROM machines WHERE app_id = ?1", [app_id])?;
            tx.execute("DELETE FROM releases WHERE app_id = ?1", [app_id])?;
            tx.execute("DELETE FROM apps WHERE id = ?1", [app_id])?;
            tx.commit()
        })
    }

    // ---- machines ----

    pub fn insert_machine(&self, m: &MachineRow) -> StoreResult<()> {
        let config =
            serde_json::to_string(&m.config).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.with(|c| {
            c.execute(
                "INSERT INTO machines(id, app_id, name, region, host_id, state, instance_id, config, private_ip, private_ipv4, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
                params![m.id, m.app_id, m.name, m.region, m.host_id, m.state.as_str(), m.instance_id, config, m.private_ip, m.private_ipv4, m.created_at, m.updated_at],
            )
            .map(|_| ())
        })
    }

    pub fn machine(&self, id: &str) -> StoreResult<Option<MachineRow>> {
        let sql = format!(
            "SELECT {MACHINE_COLUMNS} FROM machines m JOIN apps a ON a.id = m.app_id WHERE m.id = ?1"
        );
        self.with(|c| c.query_row(&sql, [id], machine_from_row).optional())
    }

    pub fn list_machines(
        &self,
        app_id: &str,
        include_destroyed: bool,
    ) -> StoreResult<Vec<MachineRow>> {
        let sql = format!(
            "SELECT {MACHINE_COLUMNS} FROM machines m JOIN apps a ON a.id = m.app_id WHERE m.app_id = ?1 AND (?2 OR m.state != 'destroyed') ORDER BY m.created_at, m.id"
        );
        self.with(|c| {
            let mut stmt = c.prepare(&sql)?;
            let rows = stmt.query_map(params![app_id, include_destroyed], machine_from_row)?;
            rows.collect()
        })
    }

    pub fn all_live_machines(&self) -> StoreResult<Vec<MachineRow>> {
        let sql = format!(
            "SELECT {MACHINE_COLUMNS} FROM machines m JOIN apps a ON a.id = m.app_id WHERE m.state != 'destroyed'"
        );
        self.with(|c| {
            let mut stmt = c.prepare(&sql)?;
            let rows = stmt.query_map([], machine_from_row)?;
            rows.collect()
        })
    }

    pub fn count_machines(&self, app_id: &str) -> StoreResult<u64> {
        self.with(|c| {
            c.query_row(
                "SELECT COUNT(*) FROM machines WHERE app_id = ?1 AND state != 'destroyed'",
                [app_id],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n as u64)
        })
    }

    /// Replaces a machine's config and instance (an update) in one write.
    pub fn update_machine_config(
        &self,
        id: &str,
        instance_id: &str,
        config: &MachineConfig,
    ) -> StoreResult<()> {
        let config =
            serde_json::to_string(config).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.with(|c| {
            c.execute(
                "UPDATE machines SET instance_id = ?2, config = ?3, updated_at = ?4 WHERE id = ?1",
                params![id, instance_id, config, now_rfc3339()],
            )
            .map(|_| ())
        })
    }

    pub fn set_machine_state(&self, id: &str, state: MachineState) -> StoreResult<()> {
        self.with(|c| {
            c.execute(
                "UPDATE machines SET state = ?2, updated_at = ?3 WHERE id = ?1",
                params![id, state.as_str(), now_rfc3339()],
            )
            .map(|_| ())
        })
    }

    /// Applies what a machine's agent reports, unless something newer was already applied.
    pub fn apply_agent_status(
        &self,
        id: &str,
        seq: u64,
        state: MachineState,
        ipv4: Option<&str>,
    ) -> StoreResult<bool> {
        self.with(|c| {
            let changed = c.execute(
                "UPDATE machines SET state = ?3, private_ipv4 = COALESCE(?4, private_ipv4), agent_seq = ?2, updated_at = ?5
                 WHERE id = ?1 AND agent_seq < ?2",
                params![id, seq as i64, state.as_str(), ipv4, now_rfc3339()],
            )?;
            Ok(changed == 1)
        })
    }

    pub fn delete_machine(&self, id: &str) -> StoreResult<()> {
        self.with(|c| {
            c.execute("DELETE FROM machines WHERE id = ?1", [id])
                .map(|_| ())
        })
    }

    pub fn set_machine_ipv4(&self, id: &str, ipv4: Option<&str>) -> StoreResult<()> {
        self.with(|c| {
            c.execute(
                "UPDATE machines SET private_ipv4 = ?2 WHERE id = ?1",
                params![id, ipv4],
            )
            .map(|_| ())
        })
    }

    // ---- machine events ----

    pub fn insert_event(&self, machine_id: &str, event: &MachineEvent) -> StoreResult<()> {
        let request = event.request.as_ref().map(|r| r.to_string());
        self.with(|c| {
            c.execute(
                "INSERT INTO machine_events(id, machine_id, type, status, source, timestamp, request) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![event.id, machine_id, event.kind, event.status, event.source, event.timestamp, request],
            )
            .map(|_| ())
        })
    }

    /// Newest first, as Fly lists them.
    pub fn events(&self, machine_id: &str, limit: usize) -> StoreResult<Vec<MachineEvent>> {
        self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT id, type, status, source, timestamp, request FROM machine_events WHERE machine_id = ?1 ORDER BY seq DESC LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![machine_id, limit as i64], |r| {
                let request: Option<String> = r.get(5)?;
                Ok(MachineEvent {
                    id: r.get(0)?,
                    kind: r.get(1)?,
                    status: r.get(2)?,
                    source: r.get(3)?,
                    timestamp: r.get(4)?,
                    request: request.and_then(|text| serde_json::from_str(&text).ok()),
                })
            })?;
            rows.collect()
        })
    }

    // ---- releases ----

    /// Records a new release with the next version number for the app.
    pub fn create_release(
        &self,
        app_id: &str,
        id: &str,
        image: &str,
        config: &str,
        description: &str,
        user: &str,
    ) -> StoreResult<ReleaseRow> {
        self.with(|c| {
            let tx = c.transaction()?;
            let version: i64 = tx.query_row("SELECT COALESCE(MAX(version), 0) + 1 FROM releases WHERE app_id = ?1", [app_id], |r| r.get(0))?;
            let created_at = now_rfc3339();
            tx.execute(
                "INSERT INTO releases(id, app_id, version, status, description, image, config, created_at, created_by) VALUES (?1, ?2, ?3, 'running', ?4, ?5, ?6, ?7, ?8)",
                params![id, app_id, version, description, image, config, created_at, user],
            )?;
            tx.commit()?;
            Ok(ReleaseRow {
                id: id.to_string(),
                app_id: app_id.to_string(),
                version: version as u64,
                status: "running".into(),
                description: description.to_string(),
                image: image.to_string(),
                config: config.to_string(),
                created_at,
                user: user.to_string(),
            })
        })
    }

    pub fn set_release_status(&self, id: &str, status: &str) -> StoreResult<()> {
        self.with(|c| {
            c.execute(
                "UPDATE releases SET status = ?2 WHERE id = ?1",
                params![id, status],
            )
            .map(|_| ())
        })
    }

    /// Newest first.
    pub fn releases(&self, app_id: &str, limit: usize) -> StoreResult<Vec<ReleaseRow>> {
        self.with(|c| {
            let mut stmt = c.prepare(&format!("SELECT {RELEASE_COLUMNS} FROM releases WHERE app_id = ?1 ORDER BY version DESC LIMIT ?2"))?;
            let rows = stmt.query_map(params![app_id, limit as i64], release_from_row)?;
            rows.collect()
        })
    }

    /// Marks releases whose deploy was cut short (the control plane stopped mid-deploy).
    pub fn interrupt_running_releases(&self) -> StoreResult<usize> {
        self.with(|c| {
            c.execute(
                "UPDATE releases SET status = 'interrupted' WHERE status = 'running'",
                [],
            )
        })
    }

    // ---- hosts ----

    pub fn upsert_host(&self, host: &HostRow) -> StoreResult<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO hosts(id, region, agent_url, last_seen) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(id) DO UPDATE SET region = excluded.region, agent_url = excluded.agent_url, last_seen = excluded.last_seen",
                params![host.id, host.region, host.agent_url, host.last_seen],
            )
            .map(|_| ())
        })
    }

    pub fn hosts(&self) -> StoreResult<Vec<HostRow>> {
        self.with(|c| {
            let mut stmt =
                c.prepare("SELECT id, region, agent_url, last_seen FROM hosts ORDER BY id")?;
            let rows = stmt.query_map([], |r| {
                Ok(HostRow {
                    id: r.get(0)?,
                    region: r.get(1)?,
                    agent_url: r.get(2)?,
                    last_seen: r.get(3)?,
                })
            })?;
            rows.collect()
        })
    }

    /// Advances the host's event cursor; false when `seq` was already seen (a duplicate).
    pub fn advance_host_event_seq(&self, host_id: &str, seq: u64) -> StoreResult<bool> {
        self.with(|c| {
            let changed = c.execute(
                "UPDATE hosts SET last_event_seq = ?2 WHERE id = ?1 AND last_event_seq < ?2",
                params![host_id, seq as i64],
            )?;
            Ok(changed == 1)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seeded() -> (Store, AppRow) {
        let store = Store::open_in_memory().unwrap();
        let org = OrgRow {
            id: "o1".into(),
            slug: "personal".into(),
            name: "Personal".into(),
            created_at: now_rfc3339(),
        };
        store.create_org(&org).unwrap();
        let app = AppRow {
            id: "a1".into(),
            name: "hello".into(),
            org_id: "o1".into(),
            org_slug: "personal".into(),
            network: "default".into(),
            status: "pending".into(),
            created_at: now_rfc3339(),
        };
        store.create_app(&app).unwrap();
        (store, app)
    }

    #[test]
    fn apps_are_unique_by_name() {
        let (store, app) = seeded();
        let err = store
            .create_app(&AppRow {
                id: "a2".into(),
                ..app
            })
            .unwrap_err();
        assert!(
            matches!(err, StoreError::Conflict(ref m) if m == "app hello already exists"),
            "{err}"
        );
        assert_eq!(store.app("hello").unwrap().unwrap().org_slug, "personal");
        assert!(store.app("nope").unwrap().is_none());
    }

    #[test]
    fn machines_round_trip_with_config_and_state() {
        let (store, app) = seeded();
        let mut config = MachineConfig {
            image: "img".into(),
            ..Default::default()
        };
        config
            .metadata
            .insert("fly_process_group".into(), "web".into());
        let row = MachineRow {
            id: "m1".into(),
            app_id: app.id.clone(),
            app_name: app.name.clone(),
            name: "m-one".into(),
            region: "local".into(),
            host_id: "h1".into(),
            state: MachineState::Created,
            instance_id: "i1".into(),
            config,
            private_ip: None,
            private_ipv4: None,
            created_at: now_rfc3339(),
            updated_at: now_rfc3339(),
        };
        store.insert_machine(&row).unwrap();
        store
            .set_machine_state("m1", MachineState::Started)
            .unwrap();
        let loaded = store.machine("m1").unwrap().unwrap();
        assert_eq!(loaded.state, MachineState::Started);
        assert_eq!(loaded.process_group(), Some("web"));
        store
            .set_machine_state("m1", MachineState::Destroyed)
            .unwrap();
        assert!(store.list_machines(&app.id, false).unwrap().is_empty());
        assert_eq!(store.list_machines(&app.id, true).unwrap().len(), 1);
    }

    #[test]
    fn releases_count_up_per_app() {
        let (store, app) = seeded();
        assert_eq!(
            store
                .create_release(&app.id, "r1", "img", "{}", "first", "admin")
                .unwrap()
                .version,
            1
        );
        assert_eq!(
            store
                .create_release(&app.id, "r2", "img", "{}", "second", "admin")
                .unwrap()
                .version,
            2
        );
        let list = store.releases(&app.id, 10).unwrap();
        assert_eq!(
            list.iter().map(|r| r.version).collect::<Vec<_>>(),
            vec![2, 1]
        );
    }

    #[test]
    fn host_event_cursor_drops_duplicates() {
        let (store, _) = seeded();
        store
            .upsert_host(&HostRow {
                id: "h1".into(),
                region: "local".into(),
                agent_url: "http://x".into(),
                last_seen: now_rfc3339(),
            })
            .unwrap();
        assert!(store.advance_host_event_seq("h1", 1).unwrap());
        assert!(!store.advance_host_event_seq("h1", 1).unwrap());
        assert!(store.advance_host_event_seq("h1", 2).unwrap());
    }
}
