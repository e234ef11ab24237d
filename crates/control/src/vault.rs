//! The secrets vault: envelope encryption of app secrets at rest, in its own tables.
//!
//! Keys:
//! - The **root key** (32 bytes) comes from `ALOFT_SECRETS_ROOT_KEY` (base64), else from the
//!   file `ALOFT_SECRETS_ROOT_KEY_FILE` names (base64), else from `<data dir>/secrets-root.key`,
//!   created with mode 0600 on first start. Operators who keep the key in their own KMS
//!   hand it over through one of the variables; it is then never written by Aloft.
//! - From it, by HMAC-SHA256 with distinct labels: the key-encryption key that seals each
//!   app's **data key**, the key of the value digests, and one **host key** per host.
//! - Each app has a random data key, stored sealed under the key-encryption key with the
//!   app's id as associated data. Values are sealed under the data key with the app's and
//!   the secret's names as associated data ([`aloft_api::secrets::secret_aad`]), so a
//!   ciphertext copied to another app or name does not open.
//!
//! Where plaintext exists: a value arrives in a set request and is sealed at once; the
//! control plane never opens a value (no code here does). To start a machine, its host's
//! agent fetches the sealed values together with the app's data key re-sealed under that
//! host's key ([`Vault::machine_secrets`]), and opens them in memory only, for the machine
//! it starts (crates/agent/src/secrets.rs). The host key is fetched by the agent with its
//! host token and also kept in memory only. A host is handed an app's data key only for a
//! live machine placed on it.
//!
//! Digests are HMAC-SHA256 of the value under a key derived from the root key (and the
//! app's id), cut to 128 bits: equal values in one app show equal digests, but a digest
//! seen in the API cannot be checked against guesses without the root key, so short
//! secrets cannot be brute-forced from it.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use aloft_api::secrets::{
    KEY_LEN, MachineSecrets, Sealed, SealedSecret, decode_key, encode_key, host_wrap_aad, open_raw,
    seal_raw, secret_aad,
};
use hmac::{Hmac, Mac};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use sha2::Sha256;

pub const ROOT_KEY_ENV: &str = "ALOFT_SECRETS_ROOT_KEY";
pub const ROOT_KEY_FILE_ENV: &str = "ALOFT_SECRETS_ROOT_KEY_FILE";
pub const ROOT_KEY_FILE: &str = "secrets-root.key";
/// Poly1305's tag, which every ciphertext carries after the sealed bytes.
const TAG_LEN: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error("secrets root key: {0}")]
    RootKey(String),
    #[error("secrets database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("stored secrets of app {app} do not open with the root key: {what}")]
    Corrupt { app: String, what: String },
    #[error("sealing a secret failed")]
    Seal,
}

/// Where the root key came from, for the startup log (never the key itself).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RootKeySource {
    Env,
    File(PathBuf),
    Created(PathBuf),
}

impl std::fmt::Display for RootKeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RootKeySource::Env => write!(f, "${ROOT_KEY_ENV}"),
            RootKeySource::File(path) => write!(f, "{}", path.display()),
            RootKeySource::Created(path) => write!(f, "{} (created)", path.display()),
        }
    }
}

/// Derived keys; the root key itself is not kept.
struct Keys {
    key_encryption: [u8; KEY_LEN],
    digest: [u8; KEY_LEN],
    host: [u8; KEY_LEN],
}

fn derive(root: &[u8], label: &[u8]) -> [u8; KEY_LEN] {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(root).expect("HMAC takes any key length");
    mac.update(label);
    mac.finalize().into_bytes().into()
}

impl Keys {
    fn from_root(root: &[u8]) -> Self {
        Self {
            key_encryption: derive(root, b"aloft/secrets/key-encryption/v1"),
            digest: derive(root, b"aloft/secrets/digest/v1"),
            host: derive(root, b"aloft/secrets/host/v1"),
        }
    }
}

/// Loads the root key: from the environment, a named file, or the data dir (created once).
pub fn load_root_key(data_dir: &Path) -> Result<(Vec<u8>, RootKeySource), VaultError> {
    if let Ok(text) = std::env::var(ROOT_KEY_ENV) {
        let key = decode_key(&text).map_err(|e| {
            VaultError::RootKey(format!(
                "${ROOT_KEY_ENV} must be the base64 of 32 bytes (e.g. `openssl rand -base64 32`): {e}"
            ))
        })?;
        return Ok((key, RootKeySource::Env));
    }
    if let Some(path) = std::env::var_os(ROOT_KEY_FILE_ENV) {
        let path = PathBuf::from(path);
        return Ok((read_key_file(&path)?, RootKeySource::File(path)));
    }
    let path = data_dir.join(ROOT_KEY_FILE);
    if path.exists() {
        return Ok((read_key_file(&path)?, RootKeySource::File(path)));
    }
    let mut key = vec![0u8; KEY_LEN];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut key);
    let created = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .and_then(|mut file| {
            file.write_all(encode_key(&key).as_bytes())?;
            file.write_all(b"\n")?;
            file.sync_all()
        });
    match created {
        Ok(()) => {
            if let Some(dir) = path.parent().and_then(|d| std::fs::File::open(d).ok()) {
                let _ = dir.sync_all();
            }
            Ok((key, RootKeySource::Created(path)))
        }
        // Another process created it first: use theirs.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            Ok((read_key_file(&path)?, RootKeySource::File(path)))
        }
        Err(e) => Err(VaultError::RootKey(format!(
            "creating {}: {e}",
            path.display()
        ))),
    }
}

fn read_key_file(path: &Path) -> Result<Vec<u8>, VaultError> {
    let metadata = std::fs::metadata(path)
        .map_err(|e| VaultError::RootKey(format!("reading {}: {e}", path.display())))?;
    let mode = metadata.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(VaultError::RootKey(format!(
            "{} is readable by others (mode {mode:03o}); run `chmod 600 {}`",
            path.display(),
            path.display()
        )));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| VaultError::RootKey(format!("reading {}: {e}", path.display())))?;
    decode_key(&text).map_err(|e| {
        VaultError::RootKey(format!(
            "{} must hold the base64 of 32 bytes: {e}",
            path.display()
        ))
    })
}

/// One stored secret, without its value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretInfo {
    pub name: String,
    pub digest: String,
    /// The app's secrets version in which this value was set.
    pub version: u64,
    /// Bytes of the value (the ciphertext's length tells as much anyway).
    pub size: usize,
    pub created_at: String,
    pub updated_at: String,
}

/// A change to one secret: a new value, or removal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Set(String),
    Unset,
}

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS secret_keys (
    app_id TEXT PRIMARY KEY, nonce BLOB NOT NULL, wrapped BLOB NOT NULL,
    version INTEGER NOT NULL DEFAULT 0, created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS secret_values (
    app_id TEXT NOT NULL, name TEXT NOT NULL, nonce BLOB NOT NULL, ciphertext BLOB NOT NULL,
    digest TEXT NOT NULL, version INTEGER NOT NULL, created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL, PRIMARY KEY (app_id, name)
);
CREATE TABLE IF NOT EXISTS secret_deliveries (
    machine_id TEXT PRIMARY KEY, app_id TEXT NOT NULL, version INTEGER NOT NULL,
    delivered_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS secret_deliveries_by_app ON secret_deliveries(app_id);
"#;

/// The app whose secrets a call is about: its id keys the rows, its name is bound into
/// every sealed value.
#[derive(Clone, Copy, Debug)]
pub struct AppRef<'a> {
    pub id: &'a str,
    pub name: &'a str,
}

pub struct Vault {
    conn: Mutex<Connection>,
    keys: Keys,
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn key_aad(app_id: &str) -> Vec<u8> {
    format!("aloft/app-data-key/v1\0{app_id}").into_bytes()
}

impl Vault {
    /// Opens the vault's tables in the database at `db_path` (its own connection).
    pub fn open(db_path: &Path, root_key: &[u8]) -> Result<Self, VaultError> {
        Self::init(Connection::open(db_path)?, root_key)
    }

    pub fn open_in_memory(root_key: &[u8]) -> Result<Self, VaultError> {
        Self::init(Connection::open_in_memory()?, root_key)
    }

    fn init(conn: Connection, root_key: &[u8]) -> Result<Self, VaultError> {
        if root_key.len() != KEY_LEN {
            return Err(VaultError::RootKey(format!(
                "must be 32 bytes, not {}",
                root_key.len()
            )));
        }
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        Ok(Self {
            conn: Mutex::new(conn),
            keys: Keys::from_root(root_key),
        })
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, VaultError>,
    ) -> Result<T, VaultError> {
        let mut guard = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    }

    /// The digest the API shows for `value` of an app.
    pub fn digest(&self, app_id: &str, value: &str) -> String {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.keys.digest)
            .expect("HMAC takes any key length");
        mac.update(app_id.as_bytes());
        mac.update(&[0]);
        mac.update(value.as_bytes());
        hex::encode(&mac.finalize().into_bytes()[..16])
    }

    /// The key this host's agent opens app data keys with.
    pub fn host_key(&self, host_id: &str) -> Vec<u8> {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.keys.host)
            .expect("HMAC takes any key length");
        mac.update(host_id.as_bytes());
        mac.finalize().into_bytes().to_vec()
    }

    /// The app's secrets (no values), by name, and its secrets version.
    pub fn list(&self, app_id: &str) -> Result<(Vec<SecretInfo>, u64), VaultError> {
        self.with(|c| {
            let version = app_version(c, app_id)?;
            let mut stmt = c.prepare(
                "SELECT name, digest, version, created_at, updated_at, length(ciphertext) FROM secret_values WHERE app_id = ?1 ORDER BY name",
            )?;
            let rows = stmt
                .query_map([app_id], |r| {
                    Ok(SecretInfo {
                        name: r.get(0)?,
                        digest: r.get(1)?,
                        version: r.get::<_, i64>(2)? as u64,
                        size: (r.get::<_, i64>(5)? as usize).saturating_sub(TAG_LEN),
                        created_at: r.get(3)?,
                        updated_at: r.get(4)?,
                    })
                })?
                .collect::<Result<Vec<_>, _>>()?;
            Ok((rows, version))
        })
    }

    /// Applies a batch of changes in one transaction; values whose digest is unchanged
    /// keep their row. Returns the app's secrets version after the change. The caller
    /// has validated the batch.
    pub fn change(&self, app: AppRef<'_>, changes: &[(String, Change)]) -> Result<u64, VaultError> {
        self.with(|c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let data_key = data_key(&tx, &self.keys, app, true)?
                .ok_or_else(|| VaultError::RootKey("no data key".into()))?;
            let version = app_version(&tx, app.id)? + 1;
            let now = now_rfc3339();
            let mut changed = false;
            for (name, change) in changes {
                match change {
                    Change::Set(value) => {
                        let digest = self.digest(app.id, value);
                        let current: Option<String> = tx
                            .query_row(
                                "SELECT digest FROM secret_values WHERE app_id = ?1 AND name = ?2",
                                params![app.id, name],
                                |r| r.get(0),
                            )
                            .optional()?;
                        if current.as_deref() == Some(digest.as_str()) {
                            continue;
                        }
                        let (nonce, ciphertext) =
                            seal_raw(&data_key, &secret_aad(app.name, name), value.as_bytes())
                                .map_err(|_| VaultError::Seal)?;
                        tx.execute(
                            "INSERT INTO secret_values(app_id, name, nonce, ciphertext, digest, version, created_at, updated_at)
                             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7)
                             ON CONFLICT(app_id, name) DO UPDATE SET nonce = excluded.nonce, ciphertext = excluded.ciphertext,
                               digest = excluded.digest, version = excluded.version, created_at = excluded.created_at,
                               updated_at = excluded.updated_at",
                            params![app.id, name, nonce, ciphertext, digest, version as i64, now],
                        )?;
                        changed = true;
                    }
                    Change::Unset => {
                        let removed = tx.execute(
                            "DELETE FROM secret_values WHERE app_id = ?1 AND name = ?2",
                            params![app.id, name],
                        )?;
                        changed |= removed > 0;
                    }
                }
            }
            if !changed {
                return Ok(version - 1);
            }
            tx.execute(
                "UPDATE secret_keys SET version = ?2 WHERE app_id = ?1",
                params![app.id, version as i64],
            )?;
            tx.commit()?;
            Ok(version)
        })
    }

    /// What the agent on `host_id` needs to give `machine_id` (of `app`) its secrets:
    /// the sealed values as stored and the app's data key sealed for that host. Records
    /// which secrets version the machine got.
    pub fn machine_secrets(
        &self,
        app: AppRef<'_>,
        host_id: &str,
        machine_id: &str,
    ) -> Result<MachineSecrets, VaultError> {
        self.with(|c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let version = app_version(&tx, app.id)?;
            let mut bundle = MachineSecrets {
                app: app.name.to_string(),
                version,
                data_key: None,
                secrets: Vec::new(),
            };
            if let Some(data_key) = data_key(&tx, &self.keys, app, false)? {
                let host_key = self.host_key(host_id);
                bundle.data_key = Some(
                    Sealed::seal(&host_key, &host_wrap_aad(host_id, app.name), &data_key)
                        .map_err(|_| VaultError::Seal)?,
                );
                let mut stmt = tx.prepare(
                    "SELECT name, nonce, ciphertext FROM secret_values WHERE app_id = ?1 ORDER BY name",
                )?;
                bundle.secrets = stmt
                    .query_map([app.id], |r| {
                        let nonce: Vec<u8> = r.get(1)?;
                        let ciphertext: Vec<u8> = r.get(2)?;
                        Ok(SealedSecret {
                            name: r.get(0)?,
                            value: Sealed::from_raw(&nonce, &ciphertext),
                        })
                    })?
                    .collect::<Result<Vec<_>, _>>()?;
            }
            tx.execute(
                "INSERT INTO secret_deliveries(machine_id, app_id, version, delivered_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(machine_id) DO UPDATE SET app_id = excluded.app_id, version = excluded.version,
                   delivered_at = excluded.delivered_at",
                params![machine_id, app.id, version as i64, now_rfc3339()],
            )?;
            tx.commit()?;
            Ok(bundle)
        })
    }

    /// The secrets version each machine of the app last started with.
    pub fn delivered_versions(
        &self,
        app_id: &str,
    ) -> Result<std::collections::HashMap<String, u64>, VaultError> {
        self.with(|c| {
            let mut stmt =
                c.prepare("SELECT machine_id, version FROM secret_deliveries WHERE app_id = ?1")?;
            let rows = stmt
                .query_map([app_id], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?
                .collect::<Result<_, _>>()?;
            Ok(rows)
        })
    }

    /// Removes everything of an app (it was deleted).
    pub fn forget_app(&self, app_id: &str) -> Result<(), VaultError> {
        self.with(|c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.execute("DELETE FROM secret_values WHERE app_id = ?1", [app_id])?;
            tx.execute("DELETE FROM secret_keys WHERE app_id = ?1", [app_id])?;
            tx.execute("DELETE FROM secret_deliveries WHERE app_id = ?1", [app_id])?;
            tx.commit()?;
            Ok(())
        })
    }
}

fn app_version(c: &Connection, app_id: &str) -> Result<u64, VaultError> {
    Ok(c.query_row(
        "SELECT version FROM secret_keys WHERE app_id = ?1",
        [app_id],
        |r| r.get::<_, i64>(0),
    )
    .optional()?
    .unwrap_or(0) as u64)
}

/// The app's data key, unsealed; created (and stored sealed) when `create` and missing.
fn data_key(
    c: &Connection,
    keys: &Keys,
    app: AppRef<'_>,
    create: bool,
) -> Result<Option<Vec<u8>>, VaultError> {
    let row: Option<(Vec<u8>, Vec<u8>)> = c
        .query_row(
            "SELECT nonce, wrapped FROM secret_keys WHERE app_id = ?1",
            [app.id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    if let Some((nonce, wrapped)) = row {
        return open_raw(&keys.key_encryption, &key_aad(app.id), &nonce, &wrapped)
            .map(Some)
            .map_err(|_| VaultError::Corrupt {
                app: app.name.to_string(),
                what: "the data key (was the root key changed?)".into(),
            });
    }
    if !create {
        return Ok(None);
    }
    let mut key = vec![0u8; KEY_LEN];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut key);
    let (nonce, wrapped) =
        seal_raw(&keys.key_encryption, &key_aad(app.id), &key).map_err(|_| VaultError::Seal)?;
    c.execute(
        "INSERT INTO secret_keys(app_id, nonce, wrapped, version, created_at) VALUES (?1, ?2, ?3, 0, ?4)",
        params![app.id, nonce, wrapped, now_rfc3339()],
    )?;
    Ok(Some(key))
}

#[cfg(test)]
mod tests {
    use super::*;

    const APP: AppRef<'static> = AppRef {
        id: "app1",
        name: "web",
    };

    fn vault() -> Vault {
        Vault::open_in_memory(&[3u8; KEY_LEN]).unwrap()
    }

    fn set(name: &str, value: &str) -> (String, Change) {
        (name.to_string(), Change::Set(value.to_string()))
    }

    #[test]
    fn values_are_sealed_and_reach_only_the_hosts_key() {
        let vault = vault();
        let version = vault
            .change(
                APP,
                &[set("DATABASE_URL", "postgres://u:p@db/x"), set("A", "1")],
            )
            .unwrap();
        assert_eq!(version, 1);
        let stored: Vec<u8> = vault
            .with(|c| {
                Ok(c.query_row(
                    "SELECT ciphertext FROM secret_values WHERE name = 'DATABASE_URL'",
                    [],
                    |r| r.get(0),
                )?)
            })
            .unwrap();
        assert!(!String::from_utf8_lossy(&stored).contains("postgres"));

        let bundle = vault.machine_secrets(APP, "h1", "m1").unwrap();
        assert_eq!(bundle.version, 1);
        let opened = bundle.open(&vault.host_key("h1"), "h1", "web").unwrap();
        assert_eq!(opened["DATABASE_URL"], "postgres://u:p@db/x");
        assert_eq!(opened["A"], "1");
        assert!(bundle.open(&vault.host_key("h2"), "h2", "web").is_err());
        assert_eq!(vault.delivered_versions("app1").unwrap()["m1"], 1);
    }

    #[test]
    fn a_ciphertext_moved_to_another_app_or_name_does_not_open() {
        let vault = vault();
        let other = AppRef {
            id: "app2",
            name: "api",
        };
        vault
            .change(APP, &[set("A", "secret-a"), set("B", "b")])
            .unwrap();
        vault.change(other, &[set("A", "x")]).unwrap();
        // Copy web's A over api's A, and over web's B.
        vault
            .with(|c| {
                c.execute_batch(
                    "UPDATE secret_values SET (nonce, ciphertext) = (SELECT nonce, ciphertext FROM secret_values WHERE app_id = 'app1' AND name = 'A') WHERE app_id = 'app2' AND name = 'A';
                     UPDATE secret_values SET (nonce, ciphertext) = (SELECT nonce, ciphertext FROM secret_values WHERE app_id = 'app1' AND name = 'A') WHERE app_id = 'app1' AND name = 'B';",
                )?;
                Ok(())
            })
            .unwrap();
        let api = vault.machine_secrets(other, "h1", "m2").unwrap();
        assert!(api.open(&vault.host_key("h1"), "h1", "api").is_err());
        let web = vault.machine_secrets(APP, "h1", "m1").unwrap();
        let err = web.open(&vault.host_key("h1"), "h1", "web").unwrap_err();
        assert_eq!(
            err.to_string(),
            "secret B does not open as a secret of this app"
        );
    }

    #[test]
    fn another_root_key_cannot_open_the_data_key() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("control.db");
        Vault::open(&db, &[1u8; KEY_LEN])
            .unwrap()
            .change(APP, &[set("A", "1")])
            .unwrap();
        let wrong = Vault::open(&db, &[2u8; KEY_LEN]).unwrap();
        let err = wrong.machine_secrets(APP, "h1", "m1").unwrap_err();
        assert!(err.to_string().contains("root key changed"), "{err}");
    }

    #[test]
    fn versions_digests_and_unset() {
        let vault = vault();
        assert_eq!(
            vault.change(APP, &[set("A", "1"), set("B", "2")]).unwrap(),
            1
        );
        // The same value again changes nothing.
        assert_eq!(vault.change(APP, &[set("A", "1")]).unwrap(), 1);
        assert_eq!(vault.change(APP, &[set("A", "3")]).unwrap(), 2);
        let (list, version) = vault.list("app1").unwrap();
        assert_eq!(version, 2);
        let versions: Vec<(&str, u64)> =
            list.iter().map(|s| (s.name.as_str(), s.version)).collect();
        assert_eq!(versions, vec![("A", 2), ("B", 1)]);
        assert_eq!(list[0].digest, vault.digest("app1", "3"));
        assert_eq!(list[0].digest.len(), 32);
        assert_ne!(vault.digest("app1", "3"), vault.digest("app2", "3"));
        // Digests are keyed: another root key gives another digest of the same value.
        let other = Vault::open_in_memory(&[4u8; KEY_LEN]).unwrap();
        assert_ne!(other.digest("app1", "3"), vault.digest("app1", "3"));
        assert_eq!(
            vault.change(APP, &[("B".into(), Change::Unset)]).unwrap(),
            3
        );
        assert_eq!(vault.list("app1").unwrap().0.len(), 1);
        vault.forget_app("app1").unwrap();
        assert_eq!(vault.list("app1").unwrap(), (vec![], 0));
    }

    #[test]
    fn root_key_file_is_created_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        // The variables are not set in tests; the data dir file is used.
        if std::env::var_os(ROOT_KEY_ENV).is_some() || std::env::var_os(ROOT_KEY_FILE_ENV).is_some()
        {
            return;
        }
        let (key, source) = load_root_key(dir.path()).unwrap();
        let path = dir.path().join(ROOT_KEY_FILE);
        assert_eq!(source, RootKeySource::Created(path.clone()));
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let (again, source) = load_root_key(dir.path()).unwrap();
        assert_eq!(again, key);
        assert_eq!(source, RootKeySource::File(path.clone()));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = load_root_key(dir.path()).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&path, "short").unwrap();
        let err = load_root_key(dir.path()).unwrap_err().to_string();
        assert!(err.contains("base64 of 32 bytes"), "{err}");
    }
}
