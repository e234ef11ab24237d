//! The control plane's durable state behind one store layer. Two backends run the same
//! queries: SQLite (embedded, WAL; the default) and PostgreSQL (shared by several
//! control planes). Every write method is one transaction; a method that returns Ok has
//! been committed.

pub mod db;
pub mod deploys;
pub mod postgres;
pub mod sqlite;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use aloft_api::{MachineConfig, MachineEvent, MachineState};

pub use db::{Backend, BackendKind, Conn, DbError, Row, Value};
pub use deploys::DeployRow;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(String),
    #[error("{0}")]
    Conflict(String),
    #[error("stored data is unreadable: {0}")]
    Corrupt(String),
}

impl From<DbError> for StoreError {
    fn from(err: DbError) -> Self {
        match err {
            DbError::Unique(m) => StoreError::Conflict(m),
            DbError::Backend(m) => StoreError::Database(m),
            DbError::Corrupt(m) => StoreError::Corrupt(m),
        }
    }
}

pub type StoreResult<T> = Result<T, StoreError>;
type DbResult<T> = db::DbResult<T>;

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
    /// The org the token belongs to (for `user` tokens: their personal org).
    pub org_id: String,
    /// `user` (every org it is a member of), `org` (full access to one org), `deploy`,
    /// `readonly`, `host` (an agent or proxy).
    pub kind: String,
    pub name: String,
    pub key: Vec<u8>,
    pub created_at: String,
    pub revoked: bool,
    /// Unix seconds; the same limit is a caveat inside the token.
    pub expires_at: Option<i64>,
    /// Apps the token was limited to when it was made (also a caveat inside the token).
    pub apps: Vec<String>,
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
    pub cordoned: bool,
    /// The latest events, newest first (the full history is in `events()`).
    pub recent_events: Vec<MachineEvent>,
}

impl MachineRow {
    pub fn process_group(&self) -> Option<&str> {
        self.config.process_group()
    }
}

/// Which machines a listing returns.
#[derive(Clone, Debug, Default)]
pub struct MachineFilter {
    pub include_destroyed: bool,
    pub region: Option<String>,
    /// `metadata.<key>=<value>` pairs; all must match.
    pub metadata: Vec<(String, String)>,
    /// Only machines in one of these states (empty: any).
    pub states: Vec<MachineState>,
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

/// What `host_tokens` binds a join token (`aloft tokens create host`) to until a host
/// registers with it.
pub const JOIN_TOKEN_HOST: &str = "";

/// A host's place in the WireGuard mesh (what its agent registered this run).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshHostRow {
    pub id: String,
    /// Its host number in 6PN addresses.
    pub number: u32,
    pub public_key: String,
    pub endpoint: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostRow {
    pub id: String,
    pub region: String,
    pub agent_url: String,
    /// When the host last registered or heartbeated (RFC 3339, the control plane's clock).
    pub last_seen: String,
    /// The CPUs the host declared (0: not declared, no limit).
    pub cpus: u64,
    /// The memory (MB) the host declared (0: not declared, no limit).
    pub memory_mb: u64,
    /// An operator cordoned it: it gets no new machines.
    pub cordoned: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseRow {
    pub machine_id: String,
    pub nonce: String,
    pub owner: String,
    pub description: String,
    /// Unix seconds.
    pub expires_at: i64,
    pub version: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct VersionRow {
    pub version: String,
    pub config: MachineConfig,
    pub created_at: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeRow {
    pub id: String,
    pub app_id: String,
    pub name: String,
    pub region: String,
    pub zone: String,
    pub size_gb: i64,
    pub state: String,
    pub encrypted: bool,
    pub fstype: String,
    pub snapshot_retention: i64,
    pub auto_backup_enabled: bool,
    pub attached_machine_id: Option<String>,
    pub created_at: String,
    /// The host whose disk holds the volume.
    pub host_id: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotRow {
    pub id: String,
    pub volume_id: String,
    pub size: i64,
    pub digest: String,
    pub status: String,
    pub retention_days: i64,
    pub created_at: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertificateRow {
    pub app_id: String,
    pub hostname: String,
    /// `acme` or `custom`.
    pub source: String,
    pub status: String,
    pub created_at: String,
}

/// A hostname's certificate itself (what the proxy serves), with its private key sealed
/// (`certs::KeySealer`), or where getting one stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsCertificateRow {
    pub hostname: String,
    pub app_id: String,
    /// `acme` (issued by the proxy's CA) or `custom` (imported).
    pub source: String,
    /// PEM chain, leaf first; empty while none was issued.
    pub certificate: String,
    /// The private key, sealed; empty while none was issued.
    pub sealed_key: Vec<u8>,
    /// The issuer's common name (organization where it has none).
    pub issuer: String,
    /// RFC 3339; empty while none was issued.
    pub not_after: String,
    /// `issuing`, `failed` or `issued`.
    pub state: String,
    /// Why the last attempt failed (`failed`).
    pub error: String,
    pub updated_at: String,
}

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS orgs (
    id TEXT PRIMARY KEY, slug TEXT NOT NULL UNIQUE, name TEXT NOT NULL, created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY, org_id TEXT NOT NULL, kind TEXT NOT NULL, name TEXT NOT NULL,
    key {blob} NOT NULL, created_at TEXT NOT NULL, revoked {int} NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS token_orgs (
    token_id TEXT NOT NULL, org_id TEXT NOT NULL, PRIMARY KEY (token_id, org_id)
);
CREATE TABLE IF NOT EXISTS apps (
    id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, org_id TEXT NOT NULL REFERENCES orgs(id),
    network TEXT NOT NULL, status TEXT NOT NULL, created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS machines (
    id TEXT PRIMARY KEY, app_id TEXT NOT NULL, name TEXT NOT NULL, region TEXT NOT NULL,
    host_id TEXT NOT NULL, state TEXT NOT NULL, instance_id TEXT NOT NULL, config TEXT NOT NULL,
    private_ip TEXT, private_ipv4 TEXT, created_at TEXT NOT NULL, updated_at TEXT NOT NULL,
    agent_seq {int} NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS machine_versions (
    machine_id TEXT NOT NULL, version TEXT NOT NULL, config TEXT NOT NULL, created_at TEXT NOT NULL,
    PRIMARY KEY (machine_id, version)
);
CREATE TABLE IF NOT EXISTS machine_events (
    seq {serial}, id TEXT NOT NULL, machine_id TEXT NOT NULL,
    type TEXT NOT NULL, status TEXT NOT NULL, source TEXT NOT NULL, timestamp {int} NOT NULL,
    request TEXT
);
CREATE INDEX IF NOT EXISTS machine_events_by_machine ON machine_events(machine_id);
CREATE TABLE IF NOT EXISTS machine_leases (
    machine_id TEXT PRIMARY KEY, nonce TEXT NOT NULL, owner TEXT NOT NULL, description TEXT NOT NULL,
    expires_at {int} NOT NULL, version TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS releases (
    id TEXT PRIMARY KEY, app_id TEXT NOT NULL, version {int} NOT NULL, status TEXT NOT NULL,
    description TEXT NOT NULL, image TEXT NOT NULL, config TEXT NOT NULL, created_at TEXT NOT NULL,
    UNIQUE(app_id, version)
);
CREATE TABLE IF NOT EXISTS hosts (
    id TEXT PRIMARY KEY, region TEXT NOT NULL, agent_url TEXT NOT NULL, last_seen TEXT NOT NULL,
    last_event_seq {int} NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS host_tokens (token_id TEXT PRIMARY KEY, host_id TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS volumes (
    id TEXT PRIMARY KEY, app_id TEXT NOT NULL, name TEXT NOT NULL, region TEXT NOT NULL, zone TEXT NOT NULL,
    size_gb {int} NOT NULL, state TEXT NOT NULL, encrypted {int} NOT NULL, fstype TEXT NOT NULL,
    snapshot_retention {int} NOT NULL, auto_backup_enabled {int} NOT NULL, attached_machine_id TEXT,
    created_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS volumes_by_app ON volumes(app_id);
CREATE TABLE IF NOT EXISTS volume_snapshots (
    id TEXT PRIMARY KEY, volume_id TEXT NOT NULL, size {int} NOT NULL, digest TEXT NOT NULL,
    status TEXT NOT NULL, retention_days {int} NOT NULL, created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS app_certificates (
    hostname TEXT PRIMARY KEY, app_id TEXT NOT NULL, source TEXT NOT NULL, status TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS tls_certificates (
    hostname TEXT PRIMARY KEY, app_id TEXT NOT NULL, source TEXT NOT NULL,
    certificate TEXT NOT NULL, sealed_key {blob} NOT NULL, issuer TEXT NOT NULL,
    not_after TEXT NOT NULL, state TEXT NOT NULL, error TEXT NOT NULL, updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS networks (
    id {serial}, org_id TEXT NOT NULL, name TEXT NOT NULL, created_at TEXT NOT NULL,
    UNIQUE(org_id, name)
);
CREATE TABLE IF NOT EXISTS host_numbers (host_id TEXT PRIMARY KEY, number {int} NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS address_counters (name TEXT PRIMARY KEY, value {int} NOT NULL);
CREATE TABLE IF NOT EXISTS ip_assignments (
    address TEXT NOT NULL, app_id TEXT NOT NULL, type TEXT NOT NULL, region TEXT NOT NULL,
    network_id {int}, service_name TEXT NOT NULL DEFAULT '', created_at TEXT NOT NULL,
    PRIMARY KEY (address, app_id)
);
CREATE INDEX IF NOT EXISTS ip_assignments_by_app ON ip_assignments(app_id);
CREATE TABLE IF NOT EXISTS deploy_operations (
    id TEXT PRIMARY KEY, app_id TEXT NOT NULL, status TEXT NOT NULL, request TEXT NOT NULL,
    created_by TEXT NOT NULL, release_id TEXT NOT NULL, progress TEXT NOT NULL,
    created_at TEXT NOT NULL, updated_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS deploy_operations_by_app ON deploy_operations(app_id, created_at);
CREATE TABLE IF NOT EXISTS deploy_events (
    deploy_id TEXT NOT NULL, seq {int} NOT NULL, event TEXT NOT NULL, PRIMARY KEY (deploy_id, seq)
)
"#;

/// Columns added after the first release of a table: (table, column, type).
const ADDED_COLUMNS: &[(&str, &str, &str)] = &[
    ("tokens", "expires_at", "{int}"),
    ("tokens", "apps", "TEXT"),
    ("machines", "cordoned", "{int} NOT NULL DEFAULT 0"),
    ("machines", "recent_events", "TEXT"),
    ("releases", "created_by", "TEXT NOT NULL DEFAULT ''"),
    ("machines", "rev", "{int} NOT NULL DEFAULT 0"),
    ("volumes", "host_id", "TEXT NOT NULL DEFAULT ''"),
    ("hosts", "cpus", "{int} NOT NULL DEFAULT 0"),
    ("hosts", "memory_mb", "{int} NOT NULL DEFAULT 0"),
    ("hosts", "cordoned", "{int} NOT NULL DEFAULT 0"),
    ("hosts", "mesh_public_key", "TEXT NOT NULL DEFAULT ''"),
    ("hosts", "mesh_endpoint", "TEXT NOT NULL DEFAULT ''"),
    ("volumes", "sealed_key", "TEXT NOT NULL DEFAULT ''"),
    (
        "deploy_operations",
        "lease_owner",
        "TEXT NOT NULL DEFAULT ''",
    ),
    (
        "deploy_operations",
        "lease_expires_at",
        "{int} NOT NULL DEFAULT 0",
    ),
];

/// Indexes over added columns (made once those exist). Listings read `(id, rev)` in
/// listing order straight from `machines_listing`, with no sort and no row reads; it
/// covers what `machines_by_app` did.
const INDEXES_AFTER_COLUMNS: &[&str] = &[
    "CREATE INDEX IF NOT EXISTS machines_listing ON machines(app_id, created_at, id, rev, state, region)",
    "DROP INDEX IF EXISTS machines_by_app",
    "CREATE UNIQUE INDEX IF NOT EXISTS hosts_by_mesh_key ON hosts(mesh_public_key) WHERE mesh_public_key <> ''",
];

const EVENTS_KEPT_ON_MACHINE: usize = 10;

pub fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

pub fn now_millis() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

pub fn now_secs() -> i64 {
    chrono::Utc::now().timestamp()
}

fn corrupt(what: &str, err: impl std::fmt::Display) -> DbError {
    DbError::Corrupt(format!("{what}: {err}"))
}

fn json<T: serde::Serialize>(value: &T) -> DbResult<String> {
    serde_json::to_string(value).map_err(|e| corrupt("encoding", e))
}

const MACHINE_COLUMNS: &str = "m.id, m.app_id, a.name, m.name, m.region, m.host_id, m.state, m.instance_id, m.config, m.private_ip, m.private_ipv4, m.created_at, m.updated_at, m.cordoned, m.recent_events";

fn machine_from_row(row: &Row) -> DbResult<MachineRow> {
    let config: MachineConfig =
        serde_json::from_str(&row.text(8)?).map_err(|e| corrupt("machine config", e))?;
    let state_text = row.text(6)?;
    let state =
        MachineState::parse(&state_text).ok_or_else(|| corrupt("machine state", &state_text))?;
    let recent_events = match row.opt_text(14)? {
        Some(text) => serde_json::from_str(&text).map_err(|e| corrupt("machine events", e))?,
        None => Vec::new(),
    };
    Ok(MachineRow {
        id: row.text(0)?,
        app_id: row.text(1)?,
        app_name: row.text(2)?,
        name: row.text(3)?,
        region: row.text(4)?,
        host_id: row.text(5)?,
        state,
        instance_id: row.text(7)?,
        config,
        private_ip: row.opt_text(9)?,
        private_ipv4: row.opt_text(10)?,
        created_at: row.text(11)?,
        updated_at: row.text(12)?,
        cordoned: row.bool(13)?,
        recent_events,
    })
}

const APP_COLUMNS: &str = "a.id, a.name, a.org_id, o.slug, a.network, a.status, a.created_at";

fn app_from_row(row: &Row) -> DbResult<AppRow> {
    Ok(AppRow {
        id: row.text(0)?,
        name: row.text(1)?,
        org_id: row.text(2)?,
        org_slug: row.text(3)?,
        network: row.text(4)?,
        status: row.text(5)?,
        created_at: row.text(6)?,
    })
}

fn org_from_row(row: &Row) -> DbResult<OrgRow> {
    Ok(OrgRow {
        id: row.text(0)?,
        slug: row.text(1)?,
        name: row.text(2)?,
        created_at: row.text(3)?,
    })
}

const TOKEN_COLUMNS: &str = "id, org_id, kind, name, key, created_at, revoked, expires_at, apps";

fn token_from_row(row: &Row) -> DbResult<TokenRow> {
    Ok(TokenRow {
        id: row.text(0)?,
        org_id: row.text(1)?,
        kind: row.text(2)?,
        name: row.text(3)?,
        key: row.blob(4)?,
        created_at: row.text(5)?,
        revoked: row.bool(6)?,
        expires_at: row.opt_int(7)?,
        apps: row
            .opt_text(8)?
            .map(|s| {
                s.split(',')
                    .filter(|a| !a.is_empty())
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default(),
    })
}

fn release_from_row(row: &Row) -> DbResult<ReleaseRow> {
    Ok(ReleaseRow {
        id: row.text(0)?,
        app_id: row.text(1)?,
        version: row.int(2)? as u64,
        status: row.text(3)?,
        description: row.text(4)?,
        image: row.text(5)?,
        config: row.text(6)?,
        created_at: row.text(7)?,
        user: row.text(8)?,
    })
}

const RELEASE_COLUMNS: &str =
    "id, app_id, version, status, description, image, config, created_at, created_by";

const VOLUME_COLUMNS: &str = "id, app_id, name, region, zone, size_gb, state, encrypted, fstype, snapshot_retention, auto_backup_enabled, attached_machine_id, created_at, host_id";

fn volume_from_row(row: &Row) -> DbResult<VolumeRow> {
    Ok(VolumeRow {
        id: row.text(0)?,
        app_id: row.text(1)?,
        name: row.text(2)?,
        region: row.text(3)?,
        zone: row.text(4)?,
        size_gb: row.int(5)?,
        state: row.text(6)?,
        encrypted: row.bool(7)?,
        fstype: row.text(8)?,
        snapshot_retention: row.int(9)?,
        auto_backup_enabled: row.bool(10)?,
        attached_machine_id: row.opt_text(11)?,
        created_at: row.text(12)?,
        host_id: row.text(13)?,
    })
}

fn event_from_row(row: &Row) -> DbResult<MachineEvent> {
    Ok(MachineEvent {
        id: row.text(0)?,
        kind: row.text(1)?,
        status: row.text(2)?,
        source: row.text(3)?,
        timestamp: row.int(4)?,
        request: row
            .opt_text(5)?
            .and_then(|text| serde_json::from_str(&text).ok()),
    })
}

/// What a `--database-url` names.
#[derive(Debug, PartialEq, Eq)]
pub enum DatabaseLocation<'a> {
    Postgres(&'a str),
    Sqlite(&'a Path),
}

/// The connection parameters libpq knows; a keyword string starts with one of them.
const LIBPQ_KEYWORDS: &[&str] = &[
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "passfile",
    "channel_binding",
    "connect_timeout",
    "client_encoding",
    "options",
    "application_name",
    "fallback_application_name",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "tcp_user_timeout",
    "replication",
    "gssencmode",
    "sslmode",
    "requiressl",
    "sslcompression",
    "sslcert",
    "sslkey",
    "sslpassword",
    "sslrootcert",
    "sslcrl",
    "sslcrldir",
    "sslsni",
    "requirepeer",
    "ssl_min_protocol_version",
    "ssl_max_protocol_version",
    "krbsrvname",
    "gsslib",
    "service",
    "target_session_attrs",
    "load_balance_hosts",
];

/// `postgres://…`/`postgresql://…` URLs and libpq keyword strings (`host=/run/postgresql
/// dbname=aloft`: the first word is a libpq keyword followed by `=`) are PostgreSQL;
/// anything else is a SQLite file path, even one with `=` in it (`/data/a=b/control.db`).
pub fn database_location(url: &str) -> DatabaseLocation<'_> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return DatabaseLocation::Postgres(url);
    }
    let text = url.trim_start();
    let key_end = text
        .find(|c: char| c == '=' || c.is_whitespace())
        .unwrap_or(text.len());
    let (key, rest) = text.split_at(key_end);
    if LIBPQ_KEYWORDS.contains(&key) && rest.trim_start().starts_with('=') {
        DatabaseLocation::Postgres(url)
    } else {
        DatabaseLocation::Sqlite(Path::new(url))
    }
}

/// The store: one handle, shared by every request.
pub struct Store {
    db: Arc<dyn Backend>,
}

impl Store {
    /// The embedded database at `path` (created if missing).
    pub fn open(path: &Path) -> StoreResult<Self> {
        Self::with_backend(Arc::new(sqlite::Sqlite::open(path)?))
    }

    pub fn open_in_memory() -> StoreResult<Self> {
        Self::with_backend(Arc::new(sqlite::Sqlite::in_memory()?))
    }

    /// A PostgreSQL database (`postgresql://user@host:port/db` or libpq's
    /// `host=… user=… dbname=…`).
    pub fn open_postgres(url: &str) -> StoreResult<Self> {
        Self::with_backend(Arc::new(postgres::Postgres::connect(url, 4)?))
    }

    /// PostgreSQL for a URL or libpq keyword string (see [`database_location`]); anything
    /// else is a SQLite path.
    pub fn open_url(url: &str) -> StoreResult<Self> {
        match database_location(url) {
            DatabaseLocation::Postgres(url) => Self::open_postgres(url),
            DatabaseLocation::Sqlite(path) => Self::open(path),
        }
    }

    pub fn with_backend(db: Arc<dyn Backend>) -> StoreResult<Self> {
        let store = Self { db };
        store.migrate()?;
        Ok(store)
    }

    pub fn backend(&self) -> BackendKind {
        self.db.kind()
    }

    fn migrate(&self) -> StoreResult<()> {
        let kind = self.db.kind();
        let schema = db::schema_for(kind, SCHEMA);
        self.tx(|c| {
            for statement in schema.split(';').map(str::trim).filter(|s| !s.is_empty()) {
                c.execute(statement, &[])?;
            }
            Ok(())
        })?;
        for (table, column, kind_of) in ADDED_COLUMNS {
            let probe = format!("SELECT {column} FROM {table} WHERE 1 = 0");
            if self.tx(|c| c.query(&probe, &[]).map(|_| ())).is_err() {
                let add = db::schema_for(
                    kind,
                    &format!("ALTER TABLE {table} ADD COLUMN {column} {kind_of}"),
                );
                self.tx(|c| c.execute(&add, &[]).map(|_| ()))?;
            }
        }
        self.tx(|c| {
            for statement in INDEXES_AFTER_COLUMNS {
                c.execute(statement, &[])?;
            }
            Ok(())
        })?;
        Ok(())
    }

    /// Runs `work` in one transaction (modules with tables of their own, such as `ips`,
    /// write their queries against the same interface).
    pub(crate) fn tx<T: Send>(
        &self,
        mut work: impl FnMut(&mut dyn Conn) -> DbResult<T> + Send,
    ) -> StoreResult<T> {
        let mut out = None;
        self.db.transaction(&mut |c| {
            out = Some(work(c)?);
            Ok(())
        })?;
        out.ok_or_else(|| StoreError::Database("transaction produced no result".into()))
    }

    /// One statement in a transaction of its own.
    fn execute(&self, sql: &str, params: &[Value]) -> StoreResult<()> {
        self.tx(|c| c.execute(sql, params).map(|_| ()))
    }

    /// Runs `work` on a consistent snapshot, without a write lock.
    pub(crate) fn read<T: Send>(
        &self,
        mut work: impl FnMut(&mut dyn Conn) -> DbResult<T> + Send,
    ) -> StoreResult<T> {
        let mut out = None;
        self.db.read(&mut |c| {
            out = Some(work(c)?);
            Ok(())
        })?;
        out.ok_or_else(|| StoreError::Database("read produced no result".into()))
    }

    // ---- settings ----

    pub fn setting(&self, key: &str) -> StoreResult<Option<String>> {
        self.read(|c| {
            c.query_one("SELECT value FROM settings WHERE key = $1", &[key.into()])?
                .map(|r| r.text(0))
                .transpose()
        })
    }

    pub fn set_setting(&self, key: &str, value: &str) -> StoreResult<()> {
        self.execute(
                "INSERT INTO settings(key, value) VALUES ($1, $2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                &[key.into(), value.into()],
        )
    }

    // ---- orgs ----

    pub fn create_org(&self, org: &OrgRow) -> StoreResult<()> {
        self.tx(|c| {
            c.execute(
                "INSERT INTO orgs(id, slug, name, created_at) VALUES ($1, $2, $3, $4)",
                &[
                    (&org.id).into(),
                    (&org.slug).into(),
                    (&org.name).into(),
                    (&org.created_at).into(),
                ],
            )
        })
        .map_err(|e| match e {
            StoreError::Conflict(_) => {
                StoreError::Conflict(format!("organization {} already exists", org.slug))
            }
            other => other,
        })?;
        Ok(())
    }

    pub fn org_by_slug(&self, slug: &str) -> StoreResult<Option<OrgRow>> {
        self.read(|c| {
            c.query_one(
                "SELECT id, slug, name, created_at FROM orgs WHERE slug = $1",
                &[slug.into()],
            )?
            .map(|r| org_from_row(&r))
            .transpose()
        })
    }

    pub fn org_by_id(&self, id: &str) -> StoreResult<Option<OrgRow>> {
        self.read(|c| {
            c.query_one(
                "SELECT id, slug, name, created_at FROM orgs WHERE id = $1",
                &[id.into()],
            )?
            .map(|r| org_from_row(&r))
            .transpose()
        })
    }

    pub fn list_orgs(&self) -> StoreResult<Vec<OrgRow>> {
        self.read(|c| {
            c.query(
                "SELECT id, slug, name, created_at FROM orgs ORDER BY slug",
                &[],
            )?
            .iter()
            .map(org_from_row)
            .collect()
        })
    }

    // ---- tokens ----

    pub fn insert_token(&self, token: &TokenRow) -> StoreResult<()> {
        self.tx(|c| {
            c.execute(
                "INSERT INTO tokens(id, org_id, kind, name, key, created_at, revoked, expires_at, apps) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                &[
                    (&token.id).into(),
                    (&token.org_id).into(),
                    (&token.kind).into(),
                    (&token.name).into(),
                    token.key.as_slice().into(),
                    (&token.created_at).into(),
                    token.revoked.into(),
                    token.expires_at.into(),
                    token.apps.join(",").into(),
                ],
            )?;
            if token.kind == "user" {
                c.execute("INSERT INTO token_orgs(token_id, org_id) VALUES ($1, $2)", &[(&token.id).into(), (&token.org_id).into()])?;
            }
            Ok(())
        })
    }

    pub fn token(&self, id: &str) -> StoreResult<Option<TokenRow>> {
        let sql = format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE id = $1");
        self.read(|c| {
            c.query_one(&sql, &[id.into()])?
                .map(|r| token_from_row(&r))
                .transpose()
        })
    }

    /// Tokens of an org, oldest first (host tokens have no org and never show here).
    pub fn list_tokens(&self, org_id: &str) -> StoreResult<Vec<TokenRow>> {
        let sql = format!(
            "SELECT {TOKEN_COLUMNS} FROM tokens WHERE org_id = $1 AND kind != 'host' ORDER BY created_at, id"
        );
        self.read(|c| {
            c.query(&sql, &[org_id.into()])?
                .iter()
                .map(token_from_row)
                .collect()
        })
    }

    /// Every token's id and stored root key.
    pub fn token_keys(&self) -> StoreResult<Vec<(String, Vec<u8>)>> {
        self.read(|c| {
            c.query("SELECT id, key FROM tokens ORDER BY id", &[])?
                .iter()
                .map(|r| Ok((r.text(0)?, r.blob(1)?)))
                .collect()
        })
    }

    /// Replaces a token's stored root key if it is still `old` (another control plane on
    /// the same database may have sealed it first).
    pub fn set_token_key(&self, id: &str, old: &[u8], new: &[u8]) -> StoreResult<bool> {
        self.tx(|c| {
            Ok(c.execute(
                "UPDATE tokens SET key = $3 WHERE id = $1 AND key = $2",
                &[id.into(), old.into(), new.into()],
            )? == 1)
        })
    }

    pub fn revoke_token(&self, id: &str) -> StoreResult<bool> {
        self.tx(|c| {
            Ok(c.execute("UPDATE tokens SET revoked = 1 WHERE id = $1", &[id.into()])? == 1)
        })
    }

    pub fn set_token_kind(&self, id: &str, kind: &str) -> StoreResult<()> {
        self.tx(|c| {
            c.execute("UPDATE tokens SET kind = $2 WHERE id = $1", &[id.into(), kind.into()])?;
            if kind == "user" {
                c.execute(
                    "INSERT INTO token_orgs(token_id, org_id) SELECT id, org_id FROM tokens WHERE id = $1 ON CONFLICT DO NOTHING",
                    &[id.into()],
                )?;
            }
            Ok(())
        })
    }

    /// Makes a `user` token a member of an org.
    pub fn add_token_org(&self, token_id: &str, org_id: &str) -> StoreResult<()> {
        self.tx(|c| {
            c.execute(
                "INSERT INTO token_orgs(token_id, org_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                &[token_id.into(), org_id.into()],
            )
            .map(|_| ())
        })
    }

    /// The orgs a `user` token is a member of.
    pub fn token_org_ids(&self, token_id: &str) -> StoreResult<Vec<String>> {
        self.read(|c| {
            c.query(
                "SELECT org_id FROM token_orgs WHERE token_id = $1 ORDER BY org_id",
                &[token_id.into()],
            )?
            .iter()
            .map(|r| r.text(0))
            .collect()
        })
    }

    /// Creates an org and makes `member` (a user token) a member, in one transaction.
    pub fn create_org_for(&self, org: &OrgRow, member: Option<&str>) -> StoreResult<()> {
        self.tx(|c| {
            c.execute(
                "INSERT INTO orgs(id, slug, name, created_at) VALUES ($1, $2, $3, $4)",
                &[
                    (&org.id).into(),
                    (&org.slug).into(),
                    (&org.name).into(),
                    (&org.created_at).into(),
                ],
            )?;
            if let Some(token_id) = member {
                c.execute(
                    "INSERT INTO token_orgs(token_id, org_id) VALUES ($1, $2)",
                    &[token_id.into(), (&org.id).into()],
                )?;
            }
            Ok(())
        })
        .map_err(|e| match e {
            StoreError::Conflict(_) => {
                StoreError::Conflict(format!("organization {} already exists", org.slug))
            }
            other => other,
        })
    }

    // ---- apps ----

    pub fn create_app(&self, app: &AppRow) -> StoreResult<()> {
        self.tx(|c| {
            c.execute(
                "INSERT INTO apps(id, name, org_id, network, status, created_at) VALUES ($1, $2, $3, $4, $5, $6)",
                &[(&app.id).into(), (&app.name).into(), (&app.org_id).into(), (&app.network).into(), (&app.status).into(), (&app.created_at).into()],
            )
        })
        .map_err(|e| match e {
            StoreError::Conflict(_) => StoreError::Conflict(format!("app {} already exists", app.name)),
            other => other,
        })?;
        Ok(())
    }

    pub fn app(&self, name: &str) -> StoreResult<Option<AppRow>> {
        let sql = format!(
            "SELECT {APP_COLUMNS} FROM apps a JOIN orgs o ON o.id = a.org_id WHERE a.name = $1"
        );
        self.read(|c| {
            c.query_one(&sql, &[name.into()])?
                .map(|r| app_from_row(&r))
                .transpose()
        })
    }

    pub fn app_by_id(&self, id: &str) -> StoreResult<Option<AppRow>> {
        let sql = format!(
            "SELECT {APP_COLUMNS} FROM apps a JOIN orgs o ON o.id = a.org_id WHERE a.id = $1"
        );
        self.read(|c| {
            c.query_one(&sql, &[id.into()])?
                .map(|r| app_from_row(&r))
                .transpose()
        })
    }

    pub fn list_apps(&self, org_id: Option<&str>) -> StoreResult<Vec<AppRow>> {
        match org_id {
            Some(org) => {
                let sql = format!(
                    "SELECT {APP_COLUMNS} FROM apps a JOIN orgs o ON o.id = a.org_id WHERE a.org_id = $1 ORDER BY a.name"
                );
                self.read(|c| {
                    c.query(&sql, &[org.into()])?
                        .iter()
                        .map(app_from_row)
                        .collect()
                })
            }
            None => {
                let sql = format!(
                    "SELECT {APP_COLUMNS} FROM apps a JOIN orgs o ON o.id = a.org_id ORDER BY a.name"
                );
                self.read(|c| c.query(&sql, &[])?.iter().map(app_from_row).collect())
            }
        }
    }

    /// Live machines per app id.
    pub fn machine_counts(&self) -> StoreResult<BTreeMap<String, u64>> {
        self.read(|c| {
            c.query(
                "SELECT app_id, COUNT(*) FROM machines WHERE state != 'destroyed' GROUP BY app_id",
                &[],
            )?
            .iter()
            .map(|r| Ok((r.text(0)?, r.int(1)? as u64)))
            .collect()
        })
    }

    pub fn set_app_status(&self, app_id: &str, status: &str) -> StoreResult<()> {
        self.execute(
            "UPDATE apps SET status = $2 WHERE id = $1",
            &[app_id.into(), status.into()],
        )
    }

    pub fn delete_app(&self, app_id: &str) -> StoreResult<()> {
        self.tx(|c| {
            let id: Value = app_id.into();
            let machines = "SELECT id FROM machines WHERE app_id = $1";
            c.execute(&format!("DELETE FROM machine_events WHERE machine_id IN ({machines})"), std::slice::from_ref(&id))?;
            c.execute(&format!("DELETE FROM machine_versions WHERE machine_id IN ({machines})"), std::slice::from_ref(&id))?;
            c.execute(&format!("DELETE FROM machine_leases WHERE machine_id IN ({machines})"), std::slice::from_ref(&id))?;
            c.execute("DELETE FROM volume_snapshots WHERE volume_id IN (SELECT id FROM volumes WHERE app_id = $1)", std::slice::from_ref(&id))?;
            c.execute("DELETE FROM deploy_events WHERE deploy_id IN (SELECT id FROM deploy_operations WHERE app_id = $1)", std::slice::from_ref(&id))?;
            for table in ["machines", "releases", "deploy_operations", "volumes", "app_certificates", "tls_certificates", "ip_assignments"] {
                c.execute(&format!("DELETE FROM {table} WHERE app_id = $1"), std::slice::from_ref(&id))?;
            }
            c.execute("DELETE FROM apps WHERE id = $1", &[id])?;
            Ok(())
        })
    }

    // ---- machines ----

    /// Stores a new machine, its first version and its first event.
    pub fn insert_machine(&self, m: &MachineRow) -> StoreResult<()> {
        let config =
            serde_json::to_string(&m.config).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let events = json(&m.recent_events)?;
        self.tx(|c| insert_machine_in(c, m, m.private_ip.as_deref(), &config, &events))
    }

    /// Stores a new machine like `insert_machine`, with the 6PN address `allocate` gives
    /// it in the same transaction (one commit per create); returns that address.
    pub fn insert_machine_allocating(
        &self,
        m: &MachineRow,
        mut allocate: impl FnMut(&mut dyn Conn) -> DbResult<String> + Send,
    ) -> StoreResult<String> {
        let config =
            serde_json::to_string(&m.config).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let events = json(&m.recent_events)?;
        self.tx(|c| {
            let ip = allocate(c)?;
            insert_machine_in(c, m, Some(&ip), &config, &events)?;
            Ok(ip)
        })
    }

    pub fn machine(&self, id: &str) -> StoreResult<Option<MachineRow>> {
        let sql = format!(
            "SELECT {MACHINE_COLUMNS} FROM machines m JOIN apps a ON a.id = m.app_id WHERE m.id = $1"
        );
        self.read(|c| {
            c.query_one(&sql, &[id.into()])?
                .map(|r| machine_from_row(&r))
                .transpose()
        })
    }

    pub fn list_machines(
        &self,
        app_id: &str,
        include_destroyed: bool,
    ) -> StoreResult<Vec<MachineRow>> {
        self.list_machines_filtered(
            app_id,
            &MachineFilter {
                include_destroyed,
                ..MachineFilter::default()
            },
        )
    }

    pub fn list_machines_filtered(
        &self,
        app_id: &str,
        filter: &MachineFilter,
    ) -> StoreResult<Vec<MachineRow>> {
        let mut sql = format!(
            "SELECT {MACHINE_COLUMNS} FROM machines m JOIN apps a ON a.id = m.app_id WHERE m.app_id = $1"
        );
        let mut params: Vec<Value> = vec![app_id.into()];
        if !filter.include_destroyed {
            sql.push_str(" AND m.state != 'destroyed'");
        }
        if let Some(region) = filter.region.as_deref().filter(|r| !r.is_empty()) {
            params.push(region.into());
            sql.push_str(&format!(" AND m.region = ${}", params.len()));
        }
        sql.push_str(" ORDER BY m.created_at, m.id");
        let rows = self.read(|c| c.query(&sql, &params))?;
        let mut machines = Vec::with_capacity(rows.len());
        for row in &rows {
            let machine = machine_from_row(row)?;
            if !filter.states.is_empty() && !filter.states.contains(&machine.state) {
                continue;
            }
            if filter
                .metadata
                .iter()
                .all(|(k, v)| machine.config.metadata.get(k) == Some(v))
            {
                machines.push(machine);
            }
        }
        Ok(machines)
    }

    /// Machine ids with their revision (bumped by every change of the row), in listing
    /// order: what a cache needs to tell which of its copies are current.
    pub fn machine_revisions(
        &self,
        app_id: &str,
        include_destroyed: bool,
        region: Option<&str>,
    ) -> StoreResult<Vec<(String, i64)>> {
        let mut sql = "SELECT id, rev FROM machines WHERE app_id = $1".to_string();
        let mut params: Vec<Value> = vec![app_id.into()];
        if !include_destroyed {
            sql.push_str(" AND state != 'destroyed'");
        }
        if let Some(region) = region.filter(|r| !r.is_empty()) {
            params.push(region.into());
            sql.push_str(&format!(" AND region = ${}", params.len()));
        }
        sql.push_str(" ORDER BY created_at, id");
        self.read(|c| {
            c.query(&sql, &params)?
                .iter()
                .map(|r| Ok((r.text(0)?, r.int(1)?)))
                .collect()
        })
    }

    /// A machine with its revision.
    pub fn machine_with_revision(&self, id: &str) -> StoreResult<Option<(MachineRow, i64)>> {
        let sql = format!(
            "SELECT {MACHINE_COLUMNS}, m.rev FROM machines m JOIN apps a ON a.id = m.app_id WHERE m.id = $1"
        );
        self.read(|c| {
            c.query_one(&sql, &[id.into()])?
                .map(|r| Ok((machine_from_row(&r)?, r.int(15)?)))
                .transpose()
        })
    }

    /// Every machine of an app with its revision (to fill a cache in one go).
    pub fn machines_with_revisions(&self, app_id: &str) -> StoreResult<Vec<(MachineRow, i64)>> {
        let sql = format!(
            "SELECT {MACHINE_COLUMNS}, m.rev FROM machines m JOIN apps a ON a.id = m.app_id WHERE m.app_id = $1"
        );
        self.read(|c| {
            c.query(&sql, &[app_id.into()])?
                .iter()
                .map(|r| Ok((machine_from_row(r)?, r.int(15)?)))
                .collect()
        })
    }

    pub fn all_live_machines(&self) -> StoreResult<Vec<MachineRow>> {
        let sql = format!(
            "SELECT {MACHINE_COLUMNS} FROM machines m JOIN apps a ON a.id = m.app_id WHERE m.state != 'destroyed'"
        );
        self.read(|c| c.query(&sql, &[])?.iter().map(machine_from_row).collect())
    }

    pub fn count_machines(&self, app_id: &str) -> StoreResult<u64> {
        self.read(|c| {
            Ok(c.query_one(
                "SELECT COUNT(*) FROM machines WHERE app_id = $1 AND state != 'destroyed'",
                &[app_id.into()],
            )?
            .map(|r| r.int(0))
            .transpose()?
            .unwrap_or(0) as u64)
        })
    }

    /// Moves a machine from one of `from` to `to`, recording `event`, in one transaction.
    /// Returns the machine as it was before when the move happened, or None (with the
    /// state unchanged) when the machine is no longer in one of `from`.
    pub fn transition(
        &self,
        id: &str,
        from: &[MachineState],
        to: MachineState,
        event: Option<&MachineEvent>,
    ) -> StoreResult<Option<MachineRow>> {
        Ok(self
            .enter_state(id, from, to, event)?
            .map(|(before, _)| before))
    }

    /// `transition`, returning the machine before and after the move (the row as it now
    /// stands, so callers need not read it back).
    pub fn enter_state(
        &self,
        id: &str,
        from: &[MachineState],
        to: MachineState,
        event: Option<&MachineEvent>,
    ) -> StoreResult<Option<(MachineRow, MachineRow)>> {
        let sql = format!(
            "SELECT {MACHINE_COLUMNS} FROM machines m JOIN apps a ON a.id = m.app_id WHERE m.id = $1"
        );
        self.tx(|c| {
            let Some(row) = c.query_one(&sql, &[id.into()])? else {
                return Ok(None);
            };
            let before = machine_from_row(&row)?;
            if !from.contains(&before.state) {
                return Ok(None);
            }
            let mut after = before.clone();
            after.state = to;
            after.updated_at = now_rfc3339();
            if let Some(event) = event {
                insert_event_row(c, id, event)?;
                after.recent_events.insert(0, event.clone());
                after.recent_events.truncate(EVENTS_KEPT_ON_MACHINE);
            }
            c.execute(
                "UPDATE machines SET rev = rev + 1, state = $2, updated_at = $3, recent_events = $5 WHERE id = $1 AND state = $4",
                &[
                    id.into(),
                    to.as_str().into(),
                    (&after.updated_at).into(),
                    before.state.as_str().into(),
                    json(&after.recent_events)?.into(),
                ],
            )?;
            Ok(Some((before, after)))
        })
    }

    /// Replaces a machine's config with a new version (an update), recording `event`.
    pub fn update_machine_config(
        &self,
        id: &str,
        instance_id: &str,
        config: &MachineConfig,
        state: MachineState,
        event: Option<&MachineEvent>,
    ) -> StoreResult<()> {
        let config =
            serde_json::to_string(config).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let now = now_rfc3339();
        self.tx(|c| {
            c.execute(
                "UPDATE machines SET rev = rev + 1, instance_id = $2, config = $3, updated_at = $4, state = $5 WHERE id = $1",
                &[id.into(), instance_id.into(), (&config).into(), (&now).into(), state.as_str().into()],
            )?;
            c.execute(
                "INSERT INTO machine_versions(machine_id, version, config, created_at) VALUES ($1, $2, $3, $4)",
                &[id.into(), instance_id.into(), (&config).into(), (&now).into()],
            )?;
            if let Some(event) = event {
                record_event(c, id, event)?;
            }
            Ok(())
        })
    }

    /// Changes a machine's metadata (not a new version, as on Fly).
    pub fn set_machine_metadata(
        &self,
        id: &str,
        key: &str,
        value: Option<&str>,
    ) -> StoreResult<bool> {
        self.tx(|c| {
            let Some(row) =
                c.query_one("SELECT config FROM machines WHERE id = $1", &[id.into()])?
            else {
                return Ok(false);
            };
            let mut config: MachineConfig =
                serde_json::from_str(&row.text(0)?).map_err(|e| corrupt("machine config", e))?;
            match value {
                Some(value) => {
                    config.metadata.insert(key.to_string(), value.to_string());
                }
                None => {
                    config.metadata.remove(key);
                }
            }
            c.execute(
                "UPDATE machines SET rev = rev + 1, config = $2, updated_at = $3 WHERE id = $1",
                &[id.into(), json(&config)?.into(), now_rfc3339().into()],
            )?;
            Ok(true)
        })
    }

    pub fn set_machine_state(&self, id: &str, state: MachineState) -> StoreResult<()> {
        self.execute(
            "UPDATE machines SET rev = rev + 1, state = $2, updated_at = $3 WHERE id = $1",
            &[id.into(), state.as_str().into(), now_rfc3339().into()],
        )
    }

    /// Cordons or uncordons a machine; false when it already was.
    pub fn set_machine_cordoned(&self, id: &str, cordoned: bool) -> StoreResult<bool> {
        self.tx(|c| {
            Ok(c.execute(
                "UPDATE machines SET rev = rev + 1, cordoned = $2, updated_at = $3 WHERE id = $1 AND cordoned != $2",
                &[id.into(), cordoned.into(), now_rfc3339().into()],
            )? == 1)
        })
    }

    /// Applies what a machine's agent reports, unless something newer was already applied;
    /// returns the machine as it then stands (read in the same transaction), or None when
    /// the report was older than what the store holds.
    pub fn apply_agent_status(
        &self,
        id: &str,
        seq: u64,
        state: MachineState,
        ipv4: Option<&str>,
        event: Option<&MachineEvent>,
    ) -> StoreResult<Option<MachineRow>> {
        let sql = format!(
            "SELECT {MACHINE_COLUMNS} FROM machines m JOIN apps a ON a.id = m.app_id WHERE m.id = $1"
        );
        self.tx(|c| {
            if !apply_agent_status_in(c, id, seq, state, ipv4, event)? {
                return Ok(None);
            }
            c.query_one(&sql, &[id.into()])?
                .map(|r| machine_from_row(&r))
                .transpose()
        })
    }

    pub fn delete_machine(&self, id: &str) -> StoreResult<()> {
        self.tx(|c| {
            for table in ["machine_events", "machine_versions", "machine_leases"] {
                c.execute(
                    &format!("DELETE FROM {table} WHERE machine_id = $1"),
                    &[id.into()],
                )?;
            }
            c.execute("DELETE FROM machines WHERE id = $1", &[id.into()])
                .map(|_| ())
        })
    }

    pub fn set_machine_ipv4(&self, id: &str, ipv4: Option<&str>) -> StoreResult<()> {
        self.execute(
            "UPDATE machines SET rev = rev + 1, private_ipv4 = $2 WHERE id = $1",
            &[id.into(), ipv4.into()],
        )
    }

    pub fn machine_versions(&self, id: &str) -> StoreResult<Vec<VersionRow>> {
        self.read(|c| {
            c.query("SELECT version, config, created_at FROM machine_versions WHERE machine_id = $1 ORDER BY created_at DESC, version DESC", &[id.into()])?
                .iter()
                .map(|r| {
                    Ok(VersionRow {
                        version: r.text(0)?,
                        config: serde_json::from_str(&r.text(1)?).map_err(|e| corrupt("machine version config", e))?,
                        created_at: r.text(2)?,
                    })
                })
                .collect()
        })
    }

    // ---- machine events ----

    pub fn insert_event(&self, machine_id: &str, event: &MachineEvent) -> StoreResult<()> {
        self.tx(|c| record_event(c, machine_id, event))
    }

    /// Newest first, as Fly lists them.
    pub fn events(&self, machine_id: &str, limit: usize) -> StoreResult<Vec<MachineEvent>> {
        self.read(|c| {
            c.query(
                "SELECT id, type, status, source, timestamp, request FROM machine_events WHERE machine_id = $1 ORDER BY seq DESC LIMIT $2",
                &[machine_id.into(), (limit as i64).into()],
            )?
            .iter()
            .map(event_from_row)
            .collect()
        })
    }

    // ---- leases ----

    pub fn lease(&self, machine_id: &str) -> StoreResult<Option<LeaseRow>> {
        self.read(|c| c.query_one("SELECT machine_id, nonce, owner, description, expires_at, version FROM machine_leases WHERE machine_id = $1", &[machine_id.into()])?.map(|r| lease_from_row(&r)).transpose())
    }

    /// Takes the lease when it is free or expired, or refreshes it when `nonce` is the
    /// holder's. Err(Conflict) names the current holder otherwise.
    pub fn acquire_lease(
        &self,
        wanted: &LeaseRow,
        nonce: Option<&str>,
        now: i64,
    ) -> StoreResult<LeaseRow> {
        self.tx(|c| {
            let current = c
                .query_one("SELECT machine_id, nonce, owner, description, expires_at, version FROM machine_leases WHERE machine_id = $1", &[(&wanted.machine_id).into()])?
                .map(|r| lease_from_row(&r))
                .transpose()?;
            match current {
                None => {
                    insert_lease(c, wanted)?;
                    Ok(Ok(wanted.clone()))
                }
                Some(held) if held.expires_at > now && !holds(nonce, &held) => Ok(Err(held)),
                Some(held) => {
                    // Refresh keeps the holder's nonce; a taken-over expired lease gets a new one.
                    let next = if holds(nonce, &held) { LeaseRow { nonce: held.nonce.clone(), ..wanted.clone() } } else { wanted.clone() };
                    let changed = c.execute(
                        "UPDATE machine_leases SET nonce = $3, owner = $4, description = $5, expires_at = $6, version = $7 WHERE machine_id = $1 AND nonce = $2",
                        &[(&next.machine_id).into(), (&held.nonce).into(), (&next.nonce).into(), (&next.owner).into(), (&next.description).into(), next.expires_at.into(), (&next.version).into()],
                    )?;
                    if changed == 1 { Ok(Ok(next)) } else { Ok(Err(held)) }
                }
            }
        })?
        .map_err(|held| StoreError::Conflict(lease_conflict(&held)))
    }

    /// Releases the lease held with `nonce`; Ok(false) when there is none.
    pub fn release_lease(&self, machine_id: &str, nonce: &str, now: i64) -> StoreResult<bool> {
        self.tx(|c| {
            let Some(held) = c
                .query_one("SELECT machine_id, nonce, owner, description, expires_at, version FROM machine_leases WHERE machine_id = $1", &[machine_id.into()])?
                .map(|r| lease_from_row(&r))
                .transpose()?
            else {
                return Ok(Ok(false));
            };
            if !holds(Some(nonce), &held) && held.expires_at > now {
                return Ok(Err(held));
            }
            c.execute("DELETE FROM machine_leases WHERE machine_id = $1", &[machine_id.into()])?;
            Ok(Ok(true))
        })?
        .map_err(|held| StoreError::Conflict(lease_conflict(&held)))
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
        let created_at = now_rfc3339();
        self.tx(|c| {
            let version = c.query_one("SELECT COALESCE(MAX(version), 0) + 1 FROM releases WHERE app_id = $1", &[app_id.into()])?.map(|r| r.int(0)).transpose()?.unwrap_or(1);
            c.execute(
                "INSERT INTO releases(id, app_id, version, status, description, image, config, created_at, created_by) VALUES ($1, $2, $3, 'running', $4, $5, $6, $7, $8)",
                &[id.into(), app_id.into(), version.into(), description.into(), image.into(), config.into(), (&created_at).into(), user.into()],
            )?;
            Ok(ReleaseRow {
                id: id.to_string(),
                app_id: app_id.to_string(),
                version: version as u64,
                status: "running".into(),
                description: description.to_string(),
                image: image.to_string(),
                config: config.to_string(),
                created_at: created_at.clone(),
                user: user.to_string(),
            })
        })
    }

    pub fn set_release_status(&self, id: &str, status: &str) -> StoreResult<()> {
        self.execute(
            "UPDATE releases SET status = $2 WHERE id = $1",
            &[id.into(), status.into()],
        )
    }

    /// Newest first.
    pub fn releases(&self, app_id: &str, limit: usize) -> StoreResult<Vec<ReleaseRow>> {
        self.read(|c| {
            c.query(&format!("SELECT {RELEASE_COLUMNS} FROM releases WHERE app_id = $1 ORDER BY version DESC LIMIT $2"), &[app_id.into(), (limit as i64).into()])?
            .iter()
            .map(release_from_row)
            .collect()
        })
    }

    /// Marks releases whose deploy was cut short (the control plane stopped mid-deploy),
    /// leaving alone those whose deploy another control plane (not `owner`) holds a live
    /// lease on at `now` (Unix ms): that one is still rolling them out.
    pub fn interrupt_running_releases(&self, owner: &str, now: i64) -> StoreResult<usize> {
        self.tx(|c| {
            Ok(c.execute(
                "UPDATE releases SET status = 'interrupted' WHERE status = 'running' \
                 AND id NOT IN (SELECT release_id FROM deploy_operations \
                 WHERE status = 'running' AND lease_owner != '' AND lease_owner != $1 \
                 AND lease_expires_at >= $2)",
                &[owner.into(), now.into()],
            )? as usize)
        })
    }

    /// The latest release time of every app that has one.
    pub fn latest_release_times(&self) -> StoreResult<BTreeMap<String, String>> {
        self.read(|c| {
            c.query(
                "SELECT app_id, MAX(created_at) FROM releases GROUP BY app_id",
                &[],
            )?
            .iter()
            .map(|r| Ok((r.text(0)?, r.text(1)?)))
            .collect()
        })
    }

    // ---- hosts ----

    /// Adds a host or updates where it is and what it has (its cordon stays as it was).
    pub fn upsert_host(&self, host: &HostRow) -> StoreResult<()> {
        self.execute(
                "INSERT INTO hosts(id, region, agent_url, last_seen, cpus, memory_mb) VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT(id) DO UPDATE SET region = excluded.region, agent_url = excluded.agent_url, last_seen = excluded.last_seen, cpus = excluded.cpus, memory_mb = excluded.memory_mb",
                &[(&host.id).into(), (&host.region).into(), (&host.agent_url).into(), (&host.last_seen).into(), host.cpus.into(), host.memory_mb.into()],
        )
    }

    pub fn hosts(&self) -> StoreResult<Vec<HostRow>> {
        self.read(|c| {
            c.query(
                "SELECT id, region, agent_url, last_seen, cpus, memory_mb, cordoned FROM hosts ORDER BY id",
                &[],
            )?
            .iter()
            .map(|r| {
                Ok(HostRow {
                    id: r.text(0)?,
                    region: r.text(1)?,
                    agent_url: r.text(2)?,
                    last_seen: r.text(3)?,
                    cpus: u64::try_from(r.int(4)?).unwrap_or(0),
                    memory_mb: u64::try_from(r.int(5)?).unwrap_or(0),
                    cordoned: r.bool(6)?,
                })
            })
            .collect()
        })
    }

    pub fn host(&self, id: &str) -> StoreResult<Option<HostRow>> {
        Ok(self.hosts()?.into_iter().find(|h| h.id == id))
    }

    /// Records a heartbeat; false when the host is not registered.
    pub fn touch_host(&self, id: &str, last_seen: &str) -> StoreResult<bool> {
        self.tx(|c| {
            Ok(c.execute(
                "UPDATE hosts SET last_seen = $2 WHERE id = $1",
                &[id.into(), last_seen.into()],
            )? == 1)
        })
    }

    /// Sets (or, with empty strings, clears) the host's mesh key and endpoint for this run
    /// of its agent; false when there is no such host.
    pub fn set_host_mesh(&self, id: &str, public_key: &str, endpoint: &str) -> StoreResult<bool> {
        self.tx(|c| {
            Ok(c.execute(
                "UPDATE hosts SET mesh_public_key = $2, mesh_endpoint = $3 WHERE id = $1",
                &[id.into(), public_key.into(), endpoint.into()],
            )? == 1)
        })
    }

    /// The host that registered mesh key `public_key`, if any.
    pub fn host_with_mesh_key(&self, public_key: &str) -> StoreResult<Option<String>> {
        self.read(|c| {
            c.query(
                "SELECT id FROM hosts WHERE mesh_public_key = $1",
                &[public_key.into()],
            )?
            .iter()
            .map(|r| r.text(0))
            .next()
            .transpose()
        })
    }

    /// Hosts with a mesh key, with their host numbers.
    pub fn mesh_hosts(&self) -> StoreResult<Vec<MeshHostRow>> {
        self.read(|c| {
            c.query(
                "SELECT h.id, n.number, h.mesh_public_key, h.mesh_endpoint FROM hosts h
                 JOIN host_numbers n ON n.host_id = h.id
                 WHERE h.mesh_public_key <> '' ORDER BY n.number",
                &[],
            )?
            .iter()
            .map(|r| {
                Ok(MeshHostRow {
                    id: r.text(0)?,
                    number: u32::try_from(r.int(1)?)
                        .map_err(|e| corrupt("host_numbers.number", e))?,
                    public_key: r.text(2)?,
                    endpoint: r.text(3)?,
                })
            })
            .collect()
        })
    }

    /// Cordons or uncordons a host; false when there is no such host.
    pub fn set_host_cordoned(&self, id: &str, cordoned: bool) -> StoreResult<bool> {
        self.tx(|c| {
            Ok(c.execute(
                "UPDATE hosts SET cordoned = $2 WHERE id = $1",
                &[id.into(), cordoned.into()],
            )? == 1)
        })
    }

    /// Removes a host and revokes its tokens; false when there is no such host.
    pub fn delete_host(&self, id: &str) -> StoreResult<bool> {
        self.tx(|c| {
            c.execute(
                "UPDATE tokens SET revoked = 1 WHERE id IN (SELECT token_id FROM host_tokens WHERE host_id = $1)",
                &[id.into()],
            )?;
            Ok(c.execute("DELETE FROM hosts WHERE id = $1", &[id.into()])? == 1)
        })
    }

    /// Binds a join token (bound to no host yet, see [`JOIN_TOKEN_HOST`]) to the host that
    /// first registers with it; false when it was bound already.
    pub fn claim_join_token(&self, token_id: &str, host_id: &str) -> StoreResult<bool> {
        self.tx(|c| {
            Ok(c.execute(
                "UPDATE host_tokens SET host_id = $2 WHERE token_id = $1 AND host_id = $3",
                &[token_id.into(), host_id.into(), JOIN_TOKEN_HOST.into()],
            )? == 1)
        })
    }

    /// Every volume not destroyed whose disk is on `host_id`.
    pub fn volumes_on_host(&self, host_id: &str) -> StoreResult<Vec<VolumeRow>> {
        let sql = format!(
            "SELECT {VOLUME_COLUMNS} FROM volumes WHERE host_id = $1 AND state != 'destroyed' ORDER BY created_at, id"
        );
        self.read(|c| {
            c.query(&sql, &[host_id.into()])?
                .iter()
                .map(volume_from_row)
                .collect()
        })
    }

    /// Binds a `host` token to the one host it speaks for.
    pub fn bind_host_token(&self, token_id: &str, host_id: &str) -> StoreResult<()> {
        self.execute(
            "INSERT INTO host_tokens(token_id, host_id) VALUES ($1, $2)",
            &[token_id.into(), host_id.into()],
        )
    }

    /// The host a `host` token is bound to (`None`: the platform's own token).
    pub fn token_host(&self, token_id: &str) -> StoreResult<Option<String>> {
        self.read(|c| {
            c.query_one(
                "SELECT host_id FROM host_tokens WHERE token_id = $1",
                &[token_id.into()],
            )?
            .map(|r| r.text(0))
            .transpose()
        })
    }

    /// The host's token that is not revoked, if it has one.
    pub fn host_token(&self, host_id: &str) -> StoreResult<Option<TokenRow>> {
        let sql = format!(
            "SELECT {TOKEN_COLUMNS} FROM tokens WHERE revoked = 0 AND id IN (SELECT token_id FROM host_tokens WHERE host_id = $1) ORDER BY created_at, id"
        );
        self.read(|c| {
            c.query(&sql, &[host_id.into()])?
                .iter()
                .map(token_from_row)
                .next()
                .transpose()
        })
    }

    /// Advances the host's event cursor; false when `seq` was already seen (a duplicate).
    pub fn advance_host_event_seq(&self, host_id: &str, seq: u64) -> StoreResult<bool> {
        self.tx(|c| {
            Ok(c.execute(
                "UPDATE hosts SET last_event_seq = $2 WHERE id = $1 AND last_event_seq < $2",
                &[host_id.into(), seq.into()],
            )? == 1)
        })
    }

    // ---- volumes ----

    pub fn insert_volume(&self, v: &VolumeRow) -> StoreResult<()> {
        self.execute(
                &format!("INSERT INTO volumes({VOLUME_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)"),
                &[
                    (&v.id).into(),
                    (&v.app_id).into(),
                    (&v.name).into(),
                    (&v.region).into(),
                    (&v.zone).into(),
                    v.size_gb.into(),
                    (&v.state).into(),
                    v.encrypted.into(),
                    (&v.fstype).into(),
                    v.snapshot_retention.into(),
                    v.auto_backup_enabled.into(),
                    v.attached_machine_id.clone().into(),
                    (&v.created_at).into(),
                    (&v.host_id).into(),
                ],
        )
    }

    pub fn volume(&self, id: &str) -> StoreResult<Option<VolumeRow>> {
        let sql = format!("SELECT {VOLUME_COLUMNS} FROM volumes WHERE id = $1");
        self.read(|c| {
            c.query_one(&sql, &[id.into()])?
                .map(|r| volume_from_row(&r))
                .transpose()
        })
    }

    pub fn list_volumes(
        &self,
        app_id: &str,
        include_destroyed: bool,
    ) -> StoreResult<Vec<VolumeRow>> {
        let sql = format!(
            "SELECT {VOLUME_COLUMNS} FROM volumes WHERE app_id = $1 AND ($2 = 1 OR state != 'destroyed') ORDER BY created_at, id"
        );
        self.read(|c| {
            c.query(&sql, &[app_id.into(), include_destroyed.into()])?
                .iter()
                .map(volume_from_row)
                .collect()
        })
    }

    pub fn update_volume(&self, v: &VolumeRow) -> StoreResult<()> {
        self.execute(
                "UPDATE volumes SET size_gb = $2, state = $3, snapshot_retention = $4, auto_backup_enabled = $5, attached_machine_id = $6 WHERE id = $1",
                &[(&v.id).into(), v.size_gb.into(), (&v.state).into(), v.snapshot_retention.into(), v.auto_backup_enabled.into(), v.attached_machine_id.clone().into()],
        )
    }

    /// Attaches a volume to a machine unless it is attached already (to another machine
    /// that still exists); `true` when it now is `machine`'s.
    pub fn attach_volume(&self, volume_id: &str, machine_id: &str) -> StoreResult<bool> {
        self.tx(|c| {
            Ok(c.execute(
                "UPDATE volumes SET attached_machine_id = $2 WHERE id = $1 AND state != 'destroyed' AND (attached_machine_id IS NULL OR attached_machine_id = $2 OR attached_machine_id NOT IN (SELECT id FROM machines WHERE state != 'destroyed'))",
                &[volume_id.into(), machine_id.into()],
            )? == 1)
        })
    }

    /// Stores a volume's encryption key, sealed (see `volumes`).
    pub fn set_volume_key(&self, volume_id: &str, sealed: &str) -> StoreResult<()> {
        self.execute(
            "UPDATE volumes SET sealed_key = $2 WHERE id = $1",
            &[volume_id.into(), sealed.into()],
        )
    }

    /// A volume's sealed encryption key ("" for an unencrypted volume).
    pub fn volume_key(&self, volume_id: &str) -> StoreResult<Option<String>> {
        self.read(|c| {
            c.query_one(
                "SELECT sealed_key FROM volumes WHERE id = $1",
                &[volume_id.into()],
            )?
            .map(|r| r.text(0))
            .transpose()
        })
    }

    /// Detaches whatever volumes `machine_id` has.
    pub fn detach_volumes_of(&self, machine_id: &str) -> StoreResult<()> {
        self.execute(
            "UPDATE volumes SET attached_machine_id = NULL WHERE attached_machine_id = $1",
            &[machine_id.into()],
        )
    }

    pub fn insert_snapshot(&self, s: &SnapshotRow) -> StoreResult<()> {
        self.execute(
                "INSERT INTO volume_snapshots(id, volume_id, size, digest, status, retention_days, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                &[(&s.id).into(), (&s.volume_id).into(), s.size.into(), (&s.digest).into(), (&s.status).into(), s.retention_days.into(), (&s.created_at).into()],
        )
    }

    /// Every volume not destroyed, of every app.
    pub fn all_live_volumes(&self) -> StoreResult<Vec<VolumeRow>> {
        let sql = format!(
            "SELECT {VOLUME_COLUMNS} FROM volumes WHERE state != 'destroyed' ORDER BY created_at, id"
        );
        self.read(|c| c.query(&sql, &[])?.iter().map(volume_from_row).collect())
    }

    pub fn delete_snapshot(&self, id: &str) -> StoreResult<()> {
        self.execute("DELETE FROM volume_snapshots WHERE id = $1", &[id.into()])
    }

    /// One snapshot by its id.
    pub fn snapshot(&self, id: &str) -> StoreResult<Option<SnapshotRow>> {
        self.read(|c| {
            c.query_one("SELECT id, volume_id, size, digest, status, retention_days, created_at FROM volume_snapshots WHERE id = $1", &[id.into()])?
                .map(|r| {
                    Ok(SnapshotRow {
                        id: r.text(0)?,
                        volume_id: r.text(1)?,
                        size: r.int(2)?,
                        digest: r.text(3)?,
                        status: r.text(4)?,
                        retention_days: r.int(5)?,
                        created_at: r.text(6)?,
                    })
                })
                .transpose()
        })
    }

    pub fn snapshots(&self, volume_id: &str) -> StoreResult<Vec<SnapshotRow>> {
        self.read(|c| {
            c.query("SELECT id, volume_id, size, digest, status, retention_days, created_at FROM volume_snapshots WHERE volume_id = $1 ORDER BY created_at, id", &[volume_id.into()])?
                .iter()
                .map(|r| {
                    Ok(SnapshotRow {
                        id: r.text(0)?,
                        volume_id: r.text(1)?,
                        size: r.int(2)?,
                        digest: r.text(3)?,
                        status: r.text(4)?,
                        retention_days: r.int(5)?,
                        created_at: r.text(6)?,
                    })
                })
                .collect()
        })
    }

    // ---- certificates ----

    pub fn insert_certificate(&self, cert: &CertificateRow) -> StoreResult<()> {
        self.execute(
                "INSERT INTO app_certificates(hostname, app_id, source, status, created_at) VALUES ($1, $2, $3, $4, $5)",
                &[(&cert.hostname).into(), (&cert.app_id).into(), (&cert.source).into(), (&cert.status).into(), (&cert.created_at).into()],
        )
        .map_err(|e| match e {
            StoreError::Conflict(_) => StoreError::Conflict(format!("hostname {} already has a certificate", cert.hostname)),
            other => other,
        })
    }

    pub fn certificates(&self, app_id: Option<&str>) -> StoreResult<Vec<CertificateRow>> {
        let read = |r: &Row| {
            Ok(CertificateRow {
                hostname: r.text(0)?,
                app_id: r.text(1)?,
                source: r.text(2)?,
                status: r.text(3)?,
                created_at: r.text(4)?,
            })
        };
        match app_id {
            Some(app) => self.read(|c| c.query("SELECT hostname, app_id, source, status, created_at FROM app_certificates WHERE app_id = $1 ORDER BY hostname", &[app.into()])?.iter().map(read).collect()),
            None => self.read(|c| c.query("SELECT hostname, app_id, source, status, created_at FROM app_certificates ORDER BY hostname", &[])?.iter().map(read).collect()),
        }
    }

    /// Removes a hostname from an app, with its certificate.
    pub fn delete_certificate(&self, app_id: &str, hostname: &str) -> StoreResult<bool> {
        self.tx(|c| {
            c.execute(
                "DELETE FROM tls_certificates WHERE app_id = $1 AND hostname = $2",
                &[app_id.into(), hostname.into()],
            )?;
            Ok(c.execute(
                "DELETE FROM app_certificates WHERE app_id = $1 AND hostname = $2",
                &[app_id.into(), hostname.into()],
            )? == 1)
        })
    }

    /// Sets where an app's hostname stands: `acme` or `custom`.
    pub fn set_certificate_source(
        &self,
        app_id: &str,
        hostname: &str,
        source: &str,
    ) -> StoreResult<()> {
        self.execute(
            "UPDATE app_certificates SET source = $3 WHERE app_id = $1 AND hostname = $2",
            &[app_id.into(), hostname.into(), source.into()],
        )
    }

    pub fn tls_certificate(&self, hostname: &str) -> StoreResult<Option<TlsCertificateRow>> {
        self.read(|c| {
            c.query_one(
                "SELECT hostname, app_id, source, certificate, sealed_key, issuer, not_after, state, error, updated_at FROM tls_certificates WHERE hostname = $1",
                &[hostname.into()],
            )?
            .map(|r| {
                Ok(TlsCertificateRow {
                    hostname: r.text(0)?,
                    app_id: r.text(1)?,
                    source: r.text(2)?,
                    certificate: r.text(3)?,
                    sealed_key: r.blob(4)?,
                    issuer: r.text(5)?,
                    not_after: r.text(6)?,
                    state: r.text(7)?,
                    error: r.text(8)?,
                    updated_at: r.text(9)?,
                })
            })
            .transpose()
        })
    }

    /// Stores (or replaces) a hostname's certificate or the state of getting one.
    pub fn put_tls_certificate(&self, row: &TlsCertificateRow) -> StoreResult<()> {
        self.execute(
            "INSERT INTO tls_certificates(hostname, app_id, source, certificate, sealed_key, issuer, not_after, state, error, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT(hostname) DO UPDATE SET \
             app_id = excluded.app_id, source = excluded.source, certificate = excluded.certificate, \
             sealed_key = excluded.sealed_key, issuer = excluded.issuer, not_after = excluded.not_after, \
             state = excluded.state, error = excluded.error, updated_at = excluded.updated_at",
            &[
                (&row.hostname).into(),
                (&row.app_id).into(),
                (&row.source).into(),
                (&row.certificate).into(),
                row.sealed_key.as_slice().into(),
                (&row.issuer).into(),
                (&row.not_after).into(),
                (&row.state).into(),
                (&row.error).into(),
                (&row.updated_at).into(),
            ],
        )
    }
}

fn lease_from_row(r: &Row) -> DbResult<LeaseRow> {
    Ok(LeaseRow {
        machine_id: r.text(0)?,
        nonce: r.text(1)?,
        owner: r.text(2)?,
        description: r.text(3)?,
        expires_at: r.int(4)?,
        version: r.text(5)?,
    })
}

fn insert_lease(c: &mut dyn Conn, lease: &LeaseRow) -> DbResult<()> {
    c.execute(
        "INSERT INTO machine_leases(machine_id, nonce, owner, description, expires_at, version) VALUES ($1, $2, $3, $4, $5, $6)",
        &[(&lease.machine_id).into(), (&lease.nonce).into(), (&lease.owner).into(), (&lease.description).into(), lease.expires_at.into(), (&lease.version).into()],
    )
    .map(|_| ())
}

pub fn lease_conflict(held: &LeaseRow) -> String {
    let until = chrono::DateTime::from_timestamp(held.expires_at, 0)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default();
    let owner = if held.owner.is_empty() {
        String::new()
    } else {
        format!(" by {}", held.owner)
    };
    format!(
        "machine {} is leased{owner} until {until}; pass the lease nonce in the fly-machine-lease-nonce header, or wait for the lease to expire",
        held.machine_id
    )
}

fn apply_agent_status_in(
    c: &mut dyn Conn,
    id: &str,
    seq: u64,
    state: MachineState,
    ipv4: Option<&str>,
    event: Option<&MachineEvent>,
) -> DbResult<bool> {
    let changed = c.execute(
        "UPDATE machines SET rev = rev + 1, state = $3, private_ipv4 = COALESCE($4, private_ipv4), agent_seq = $2, updated_at = $5
         WHERE id = $1 AND agent_seq < $2 AND state != 'destroyed'",
        &[id.into(), seq.into(), state.as_str().into(), ipv4.into(), now_rfc3339().into()],
    )?;
    if let Some(event) = event {
        record_event(c, id, event)?;
    }
    Ok(changed == 1)
}

fn insert_machine_in(
    c: &mut dyn Conn,
    m: &MachineRow,
    private_ip: Option<&str>,
    config: &str,
    recent_events: &str,
) -> DbResult<()> {
    c.execute(
        "INSERT INTO machines(id, app_id, name, region, host_id, state, instance_id, config, private_ip, private_ipv4, created_at, updated_at, cordoned, recent_events)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
        &[
            (&m.id).into(),
            (&m.app_id).into(),
            (&m.name).into(),
            (&m.region).into(),
            (&m.host_id).into(),
            m.state.as_str().into(),
            (&m.instance_id).into(),
            config.into(),
            private_ip.into(),
            m.private_ipv4.clone().into(),
            (&m.created_at).into(),
            (&m.updated_at).into(),
            m.cordoned.into(),
            recent_events.into(),
        ],
    )?;
    c.execute(
        "INSERT INTO machine_versions(machine_id, version, config, created_at) VALUES ($1, $2, $3, $4)",
        &[(&m.id).into(), (&m.instance_id).into(), config.into(), (&m.created_at).into()],
    )?;
    for event in m.recent_events.iter().rev() {
        insert_event_row(c, &m.id, event)?;
    }
    Ok(())
}

fn insert_event_row(c: &mut dyn Conn, machine_id: &str, event: &MachineEvent) -> DbResult<()> {
    let request = event.request.as_ref().map(|r| r.to_string());
    c.execute(
        "INSERT INTO machine_events(id, machine_id, type, status, source, timestamp, request) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        &[(&event.id).into(), machine_id.into(), (&event.kind).into(), (&event.status).into(), (&event.source).into(), event.timestamp.into(), request.into()],
    )
    .map(|_| ())
}

/// Appends an event to the history and to the machine's recent events.
fn record_event(c: &mut dyn Conn, machine_id: &str, event: &MachineEvent) -> DbResult<()> {
    insert_event_row(c, machine_id, event)?;
    let Some(row) = c.query_one(
        "SELECT recent_events FROM machines WHERE id = $1",
        &[machine_id.into()],
    )?
    else {
        return Ok(());
    };
    let mut recent: Vec<MachineEvent> = match row.opt_text(0)? {
        Some(text) => serde_json::from_str(&text).map_err(|e| corrupt("machine events", e))?,
        None => Vec::new(),
    };
    recent.insert(0, event.clone());
    recent.truncate(EVENTS_KEPT_ON_MACHINE);
    c.execute(
        "UPDATE machines SET rev = rev + 1, recent_events = $2 WHERE id = $1",
        &[machine_id.into(), json(&recent)?.into()],
    )
    .map(|_| ())
}

/// Whether a request with `nonce` is the lease's holder (compared in constant time: the
/// nonce is the holder's secret).
fn holds(nonce: Option<&str>, lease: &LeaseRow) -> bool {
    nonce.is_some_and(|n| aloft_api::token::constant_time_eq(n.as_bytes(), lease.nonce.as_bytes()))
}

#[cfg(test)]
pub mod tests;
