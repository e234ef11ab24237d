//! The secrets vault: envelope encryption of app secrets at rest, in its own tables.
//!
//! Keys:
//! - The **root key** (32 bytes) comes from `ALOFT_SECRETS_ROOT_KEY` (base64), else from the
//!   file `ALOFT_SECRETS_ROOT_KEY_FILE` names (base64), else from `<data dir>/secrets-root.key`,
//!   created with mode 0600 on first start. Operators who keep the key in their own KMS
//!   hand it over through one of the variables; it is then never written by Aloft.
//! - From it, by HMAC-SHA256 with distinct labels: the key-encryption key that seals each
//!   app's **data key**, one **host key** per host, and a check value stored in the database
//!   so a start with the wrong root key is refused before anything is sealed under it.
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
//! Digests are HMAC-SHA256 of the value under a key derived from the app's data key, cut
//! to 128 bits: equal values in one app show equal digests, but a digest seen in the API
//! cannot be checked against guesses without the data key, so short secrets cannot be
//! brute-forced from it; and a root key rotation leaves digests as they are.
//!
//! Rotation ([`Vault::rotate_root_key`]) re-seals every app's data key under a new root
//! key in one transaction; values stay sealed as they are under their data keys, so
//! nothing about a running machine changes. The new key is written next to the key file
//! (`<file>.new`) before the transaction, which is synced and checkpointed before the old
//! key is set aside (`<file>.old`) and the new one renamed over the key file. A start after
//! a crash at any step settles on whichever of the three keys the vault is sealed under
//! (the `root_key_check` value says which) and checks that every app's data key opens.

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
    #[error(
        "the secrets root key comes from ${ROOT_KEY_ENV}, which the server cannot replace; to rotate it here, give it as a file with ${ROOT_KEY_FILE_ENV} instead"
    )]
    RootKeyNotReplaceable,
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

impl RootKeySource {
    /// The file that holds the key, which a rotation replaces.
    fn file(&self) -> Option<&Path> {
        match self {
            RootKeySource::Env => None,
            RootKeySource::File(path) | RootKeySource::Created(path) => Some(path),
        }
    }
}

/// A root key and where it came from.
pub struct RootKey {
    key: Vec<u8>,
    pub source: RootKeySource,
}

impl RootKey {
    pub fn new(key: Vec<u8>, source: RootKeySource) -> Self {
        Self { key, source }
    }
}

impl std::fmt::Debug for RootKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RootKey")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

/// Derived keys; the root key itself is not kept.
struct Keys {
    key_encryption: [u8; KEY_LEN],
    host: [u8; KEY_LEN],
    /// Stored in the database: tells whether a root key is the one the data keys are
    /// sealed under.
    check: String,
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
            host: derive(root, b"aloft/secrets/host/v1"),
            check: hex::encode(derive(root, b"aloft/secrets/key-check/v1")),
        }
    }
}

/// The variable that makes a rotation abort the process at one of its steps, as a power
/// cut would: `rotate:after-new-key`, `rotate:after-vault-commit`, `rotate:after-old-kept`
/// or `rotate:after-key-swap`. For the crash tests; unset, it costs one lookup per step.
pub const FAILPOINT_ENV: &str = "ALOFT_FAILPOINT";

fn failpoint(step: &str) {
    if let Ok(wanted) = std::env::var(FAILPOINT_ENV)
        && wanted.strip_prefix("rotate:") == Some(step)
    {
        tracing::error!(step, "{FAILPOINT_ENV}: aborting the root key rotation here");
        std::process::abort();
    }
}

/// Where a rotation puts the new key until the database is re-sealed under it.
fn pending_path(file: &Path) -> PathBuf {
    let mut name = file.as_os_str().to_os_string();
    name.push(".new");
    PathBuf::from(name)
}

/// Where a rotation keeps the old key until the new one is confirmed.
fn old_path(file: &Path) -> PathBuf {
    let mut name = file.as_os_str().to_os_string();
    name.push(".old");
    PathBuf::from(name)
}

fn sync_parent(path: &Path) {
    if let Some(dir) = path.parent().and_then(|d| std::fs::File::open(d).ok()) {
        let _ = dir.sync_all();
    }
}

/// Writes a new key file, mode 0600; fails if `path` exists.
fn create_key_file(path: &Path, key: &[u8]) -> std::io::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(encode_key(key).as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()
}

/// Loads the root key: from the environment, a named file, or the data dir (created once).
pub fn load_root_key(data_dir: &Path) -> Result<RootKey, VaultError> {
    if let Ok(text) = std::env::var(ROOT_KEY_ENV) {
        let key = decode_key(&text).map_err(|e| {
            VaultError::RootKey(format!(
                "${ROOT_KEY_ENV} must be the base64 of 32 bytes (e.g. `openssl rand -base64 32`): {e}"
            ))
        })?;
        return Ok(RootKey::new(key, RootKeySource::Env));
    }
    if let Some(path) = std::env::var_os(ROOT_KEY_FILE_ENV) {
        let path = PathBuf::from(path);
        return Ok(RootKey::new(
            read_key_file(&path)?,
            RootKeySource::File(path),
        ));
    }
    let path = data_dir.join(ROOT_KEY_FILE);
    if path.exists() {
        return Ok(RootKey::new(
            read_key_file(&path)?,
            RootKeySource::File(path),
        ));
    }
    let mut key = vec![0u8; KEY_LEN];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut key);
    match create_key_file(&path, &key) {
        Ok(()) => {
            sync_parent(&path);
            Ok(RootKey::new(key, RootKeySource::Created(path)))
        }
        // Another process created it first: use theirs.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(RootKey::new(
            read_key_file(&path)?,
            RootKeySource::File(path),
        )),
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
CREATE TABLE IF NOT EXISTS secret_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"#;

const META_KEY_CHECK: &str = "root_key_check";

/// The app whose secrets a call is about: its id keys the rows, its name is bound into
/// every sealed value.
#[derive(Clone, Copy, Debug)]
pub struct AppRef<'a> {
    pub id: &'a str,
    pub name: &'a str,
}

struct Inner {
    conn: Connection,
    keys: Keys,
}

pub struct Vault {
    inner: Mutex<Inner>,
    /// The root key's file, which a rotation replaces (`None` when it came from the
    /// environment).
    root_file: Option<PathBuf>,
}

/// What a root key rotation did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rotation {
    /// App data keys re-sealed under the new root key.
    pub data_keys: usize,
    /// Where the new root key is.
    pub key_file: PathBuf,
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn key_aad(app_id: &str) -> Vec<u8> {
    format!("aloft/app-data-key/v1\0{app_id}").into_bytes()
}

fn meta(c: &Connection, key: &str) -> Result<Option<String>, VaultError> {
    Ok(
        c.query_row("SELECT value FROM secret_meta WHERE key = ?1", [key], |r| {
            r.get(0)
        })
        .optional()?,
    )
}

fn set_meta(c: &Connection, key: &str, value: &str) -> Result<(), VaultError> {
    c.execute(
        "INSERT INTO secret_meta(key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        params![key, value],
    )?;
    Ok(())
}

fn wrong_root_key(source: &RootKeySource) -> VaultError {
    VaultError::RootKey(format!(
        "the key from {source} is not the one the stored secrets are sealed with; start with the original key (in <data dir>/{ROOT_KEY_FILE}, ${ROOT_KEY_ENV} or the file ${ROOT_KEY_FILE_ENV} names)"
    ))
}

/// Checks `root` against the database and returns the key to use. A rotation cut short
/// may have left the key the vault is sealed under beside the key file: its new key
/// (`<file>.new`, when the re-sealing committed but the file was not replaced yet), or the
/// old one (`<file>.old`, kept until the new one is confirmed). Whichever of the three
/// opens the vault becomes the key file's content and the others are removed. Every app's
/// data key must then open.
fn settle_root_key(c: &Connection, root: RootKey) -> Result<RootKey, VaultError> {
    let Some(stored) = meta(c, META_KEY_CHECK)? else {
        // The vault's first start with key checks: stored data keys must open.
        if let Err(err) = every_data_key_opens(c, &Keys::from_root(&root.key)) {
            if let RootKeySource::Created(path) = &root.source {
                let _ = std::fs::remove_file(path);
            }
            tracing::error!(error = %err, "a stored data key does not open");
            return Err(wrong_root_key(&root.source));
        }
        set_meta(c, META_KEY_CHECK, &Keys::from_root(&root.key).check)?;
        return Ok(root);
    };
    let opens = |key: &[u8]| Keys::from_root(key).check == stored;
    let file = root.source.file().map(Path::to_path_buf);
    let beside = |path: &dyn Fn(&Path) -> PathBuf| {
        file.as_deref()
            .map(path)
            .filter(|p| p.exists())
            .and_then(|p| read_key_file(&p).ok().map(|key| (p, key)))
    };
    let pending = beside(&pending_path);
    let old = beside(&old_path);
    let chosen = if opens(&root.key) {
        root
    } else if let (Some(file), Some((path, key))) = (&file, pending.filter(|(_, k)| opens(k))) {
        move_key(&path, file)?;
        tracing::warn!(file = %file.display(), "finished a root key rotation that was cut short");
        RootKey::new(key, RootKeySource::File(file.clone()))
    } else if let (Some(file), Some((path, key))) = (&file, old.filter(|(_, k)| opens(k))) {
        move_key(&path, file)?;
        tracing::warn!(file = %file.display(), "undid a root key rotation whose re-sealed data keys are not in the database");
        RootKey::new(key, RootKeySource::File(file.clone()))
    } else {
        if let RootKeySource::Created(path) = &root.source {
            // Made just now for a database that already has secrets: it is of no use,
            // and must not be mistaken for the real key next time.
            let _ = std::fs::remove_file(path);
        }
        return Err(wrong_root_key(&root.source));
    };
    every_data_key_opens(c, &Keys::from_root(&chosen.key))?;
    if let Some(file) = &file {
        // The key file opens the vault: a new key that never sealed anything, or an old
        // one kept for a rotation, is of no further use.
        for leftover in [pending_path(file), old_path(file)] {
            if leftover.exists() {
                tracing::warn!(file = %leftover.display(), "removing the leftover key of a root key rotation");
                let _ = std::fs::remove_file(&leftover);
            }
        }
        sync_parent(file);
    }
    Ok(chosen)
}

/// Renames a key file over another and makes the rename durable.
fn move_key(from: &Path, to: &Path) -> Result<(), VaultError> {
    std::fs::rename(from, to).map_err(|e| {
        VaultError::RootKey(format!(
            "settling a root key rotation: moving {} to {}: {e}",
            from.display(),
            to.display()
        ))
    })?;
    sync_parent(to);
    Ok(())
}

/// Fails, naming the app, unless every stored data key opens under `keys`.
fn every_data_key_opens(c: &Connection, keys: &Keys) -> Result<(), VaultError> {
    let mut stmt = c.prepare("SELECT app_id, nonce, wrapped FROM secret_keys")?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, Vec<u8>>(1)?,
            r.get::<_, Vec<u8>>(2)?,
        ))
    })?;
    for row in rows {
        let (app_id, nonce, wrapped) = row?;
        if open_raw(&keys.key_encryption, &key_aad(&app_id), &nonce, &wrapped).is_err() {
            return Err(VaultError::Corrupt {
                app: app_id,
                what: "its data key, though the root key's check value matches".into(),
            });
        }
    }
    Ok(())
}

/// The digest the API shows for `value`, keyed by the app's data key.
fn digest(data_key: &[u8], value: &str) -> String {
    let key = derive(data_key, b"aloft/secrets/digest/v1");
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&key).expect("HMAC takes any key length");
    mac.update(value.as_bytes());
    hex::encode(&mac.finalize().into_bytes()[..16])
}

fn host_key(keys: &Keys, host_id: &str) -> Vec<u8> {
    let mut mac =
        <Hmac<Sha256> as Mac>::new_from_slice(&keys.host).expect("HMAC takes any key length");
    mac.update(host_id.as_bytes());
    mac.finalize().into_bytes().to_vec()
}

impl Vault {
    /// Opens the vault's tables in the database at `db_path` (its own connection). Refuses
    /// a root key other than the one the stored secrets are sealed with.
    pub fn open(db_path: &Path, root: RootKey) -> Result<Self, VaultError> {
        Self::init(Connection::open(db_path)?, root)
    }

    pub fn open_in_memory(root_key: &[u8]) -> Result<Self, VaultError> {
        Self::init(
            Connection::open_in_memory()?,
            RootKey::new(root_key.to_vec(), RootKeySource::Env),
        )
    }

    fn init(conn: Connection, root: RootKey) -> Result<Self, VaultError> {
        if root.key.len() != KEY_LEN {
            return Err(VaultError::RootKey(format!(
                "must be 32 bytes, not {}",
                root.key.len()
            )));
        }
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        let root = settle_root_key(&conn, root)?;
        Ok(Self {
            inner: Mutex::new(Inner {
                conn,
                keys: Keys::from_root(&root.key),
            }),
            root_file: root.source.file().map(Path::to_path_buf),
        })
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&mut Connection, &Keys) -> Result<T, VaultError>,
    ) -> Result<T, VaultError> {
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let inner = &mut *guard;
        f(&mut inner.conn, &inner.keys)
    }

    /// The key this host's agent opens app data keys with. It changes with the root key.
    pub fn host_key(&self, host_id: &str) -> Vec<u8> {
        let guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        host_key(&guard.keys, host_id)
    }

    /// Re-seals every app's data key under a new random root key, which replaces the key
    /// file; stored values are untouched, so they open as before and machines go on
    /// running. Afterwards the old root key opens nothing.
    ///
    /// A power cut at any step leaves a vault that opens at the next start: the new key
    /// is written and synced to `<file>.new` first; the re-sealing commits with its log
    /// synced and checkpointed into the database; the old key is kept as `<file>.old`
    /// while the new one is renamed over the key file (directory synced); only then, once
    /// the key file reads back as the key the vault is sealed under, is the old one
    /// removed. A start finds whichever of the three the vault is sealed under
    /// ([`settle_root_key`]).
    pub fn rotate_root_key(&self) -> Result<Rotation, VaultError> {
        let file = self
            .root_file
            .clone()
            .ok_or(VaultError::RootKeyNotReplaceable)?;
        let mut new_root = vec![0u8; KEY_LEN];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut new_root);
        let new_keys = Keys::from_root(&new_root);
        let pending = pending_path(&file);
        let old = old_path(&file);
        // Held throughout: one rotation at a time, and nothing is sealed under the old
        // key once the data keys are re-sealed.
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        for leftover in [&pending, &old] {
            match std::fs::remove_file(leftover) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(VaultError::RootKey(format!(
                        "removing {}: {e}",
                        leftover.display()
                    )));
                }
            }
        }
        create_key_file(&pending, &new_root).map_err(|e| {
            VaultError::RootKey(format!("writing the new key to {}: {e}", pending.display()))
        })?;
        sync_parent(&pending);
        failpoint("after-new-key");
        let inner = &mut *guard;
        let resealed = reseal_data_keys(&mut inner.conn, &inner.keys, &new_keys);
        let data_keys = match resealed {
            Ok(count) => count,
            Err(err) => {
                let _ = std::fs::remove_file(&pending);
                return Err(err);
            }
        };
        failpoint("after-vault-commit");
        let check = new_keys.check.clone();
        inner.keys = new_keys;
        drop(guard);
        // A hard link: the old key stays, under another name, until the new one is in place.
        std::fs::hard_link(&file, &old).map_err(|e| {
            VaultError::RootKey(format!(
                "the secrets are sealed under the new root key in {}, but keeping the old key as {} failed: {e} (the next start finishes the rotation)",
                pending.display(),
                old.display()
            ))
        })?;
        sync_parent(&old);
        failpoint("after-old-kept");
        std::fs::rename(&pending, &file).map_err(|e| {
            VaultError::RootKey(format!(
                "the secrets are sealed under the new root key in {}, but moving it to {} failed: {e} (the next start moves it)",
                pending.display(),
                file.display()
            ))
        })?;
        sync_parent(&file);
        failpoint("after-key-swap");
        match read_key_file(&file) {
            Ok(key) if Keys::from_root(&key).check == check => {
                std::fs::remove_file(&old).map_err(|e| {
                    VaultError::RootKey(format!(
                        "the rotation is done, but removing the old key {} failed: {e} (the next start removes it)",
                        old.display()
                    ))
                })?;
                sync_parent(&old);
            }
            // Left for the next start, which settles on whichever key opens the vault.
            Ok(_) => {
                tracing::error!(file = %file.display(), "the key file does not read back as the new root key; the old key is kept beside it")
            }
            Err(err) => tracing::error!(error = %err, "reading the new root key back"),
        }
        Ok(Rotation {
            data_keys,
            key_file: file,
        })
    }

    /// The app's secrets (no values), by name, and its secrets version.
    pub fn list(&self, app_id: &str) -> Result<(Vec<SecretInfo>, u64), VaultError> {
        self.with(|c, _| {
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
        self.with(|c, keys| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let data_key = data_key(&tx, keys, app, true)?
                .ok_or_else(|| VaultError::RootKey("no data key".into()))?;
            let version = app_version(&tx, app.id)? + 1;
            let now = now_rfc3339();
            let mut changed = false;
            for (name, change) in changes {
                match change {
                    Change::Set(value) => {
                        let digest = digest(&data_key, value);
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
        self.with(|c, keys| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let version = app_version(&tx, app.id)?;
            let mut bundle = MachineSecrets {
                app: app.name.to_string(),
                version,
                data_key: None,
                secrets: Vec::new(),
            };
            if let Some(data_key) = data_key(&tx, keys, app, false)? {
                let host_key = host_key(keys, host_id);
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
        self.with(|c, _| {
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
        self.with(|c, _| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.execute("DELETE FROM secret_values WHERE app_id = ?1", [app_id])?;
            tx.execute("DELETE FROM secret_keys WHERE app_id = ?1", [app_id])?;
            tx.execute("DELETE FROM secret_deliveries WHERE app_id = ?1", [app_id])?;
            tx.commit()?;
            Ok(())
        })
    }
}

/// Re-seals every data key from `old` to `new` and records `new`'s check value, in one
/// transaction. Returns how many data keys there are.
fn reseal_data_keys(c: &mut Connection, old: &Keys, new: &Keys) -> Result<usize, VaultError> {
    // The key file is replaced once this returns, so the commit must survive a power cut:
    // its log is synced at commit (FULL), and checkpointed into the database file.
    c.pragma_update(None, "synchronous", "FULL")?;
    let resealed = reseal_in_transaction(c, old, new);
    if resealed.is_ok() {
        let busy: i64 = c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))?;
        if busy != 0 {
            tracing::warn!(
                "a reader kept the rotation's checkpoint from completing; its commit is durable in the synced write-ahead log"
            );
        }
    }
    c.pragma_update(None, "synchronous", "NORMAL")?;
    resealed
}

fn reseal_in_transaction(c: &mut Connection, old: &Keys, new: &Keys) -> Result<usize, VaultError> {
    let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let rows: Vec<(String, Vec<u8>, Vec<u8>)> = tx
        .prepare("SELECT app_id, nonce, wrapped FROM secret_keys")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<_, _>>()?;
    for (app_id, nonce, wrapped) in &rows {
        let aad = key_aad(app_id);
        let key = open_raw(&old.key_encryption, &aad, nonce, wrapped).map_err(|_| {
            VaultError::Corrupt {
                app: app_id.clone(),
                what: "the data key".into(),
            }
        })?;
        let (nonce, wrapped) =
            seal_raw(&new.key_encryption, &aad, &key).map_err(|_| VaultError::Seal)?;
        tx.execute(
            "UPDATE secret_keys SET nonce = ?2, wrapped = ?3 WHERE app_id = ?1",
            params![app_id, nonce, wrapped],
        )?;
    }
    set_meta(&tx, META_KEY_CHECK, &new.check)?;
    tx.commit()?;
    Ok(rows.len())
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

/// Where the key that seals access tokens' root keys is kept: among the apps' data keys
/// (app ids are alphanumeric, never this), so a root key rotation re-seals it with them.
const TOKEN_SEALING_KEY_ID: &str = "!tokens";

impl Vault {
    /// The key the control store's token root keys are sealed under (see
    /// `auth::TokenKeys`); made on first use and kept sealed under the root key.
    pub fn token_sealing_key(&self) -> Result<Vec<u8>, VaultError> {
        self.with(|c, keys| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let tokens = AppRef {
                id: TOKEN_SEALING_KEY_ID,
                name: "access tokens",
            };
            let key = data_key(&tx, keys, tokens, true)?.ok_or(VaultError::Seal)?;
            tx.commit()?;
            Ok(key)
        })
    }

    /// The key TLS certificates' private keys are sealed under (see `certs::KeySealer`);
    /// made on first use and kept, like the token key, among the data keys.
    pub fn certificate_sealing_key(&self) -> Result<Vec<u8>, VaultError> {
        self.with(|c, keys| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let certificates = AppRef {
                id: CERTIFICATE_SEALING_KEY_ID,
                name: "TLS certificates",
            };
            let key = data_key(&tx, keys, certificates, true)?.ok_or(VaultError::Seal)?;
            tx.commit()?;
            Ok(key)
        })
    }
}

impl Vault {
    /// The key volumes' encryption keys are sealed under (see `volumes`); made on first
    /// use and kept, like the token key, among the data keys.
    pub fn volume_sealing_key(&self) -> Result<Vec<u8>, VaultError> {
        self.with(|c, keys| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let volumes = AppRef {
                id: VOLUME_SEALING_KEY_ID,
                name: "volume keys",
            };
            let key = data_key(&tx, keys, volumes, true)?.ok_or(VaultError::Seal)?;
            tx.commit()?;
            Ok(key)
        })
    }
}

/// Where the key that seals volumes' keys is kept (see [`TOKEN_SEALING_KEY_ID`]).
const VOLUME_SEALING_KEY_ID: &str = "!volumes";

/// Where the key that seals TLS private keys is kept (see [`TOKEN_SEALING_KEY_ID`]).
const CERTIFICATE_SEALING_KEY_ID: &str = "!certificates";

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
            .with(|c, _| {
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
            .with(|c, _| {
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

    fn env_key(byte: u8) -> RootKey {
        RootKey::new(vec![byte; KEY_LEN], RootKeySource::Env)
    }

    #[test]
    fn another_root_key_is_refused_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("control.db");
        Vault::open(&db, env_key(1))
            .unwrap()
            .change(APP, &[set("A", "1")])
            .unwrap();
        let err = Vault::open(&db, env_key(2)).err().expect("a wrong key");
        assert!(
            err.to_string().contains("not the one the stored secrets"),
            "{err}"
        );
        // A key file made just now for a database with secrets is removed again.
        let created = dir.path().join(ROOT_KEY_FILE);
        std::fs::write(&created, "x").unwrap();
        let err = Vault::open(
            &db,
            RootKey::new(vec![2; KEY_LEN], RootKeySource::Created(created.clone())),
        )
        .err()
        .expect("a wrong key");
        assert!(err.to_string().contains("(created)"), "{err}");
        assert!(!created.exists());
        assert!(Vault::open(&db, env_key(1)).is_ok());
    }

    /// A vault whose root key lives in `<dir>/secrets-root.key`, as on a default server.
    fn file_vault(dir: &Path) -> Vault {
        let root = load_root_key(dir).unwrap();
        Vault::open(&dir.join("control.db"), root).unwrap()
    }

    fn stored_values(vault: &Vault) -> Vec<(String, Vec<u8>, Vec<u8>)> {
        vault
            .with(|c, _| {
                let mut stmt = c.prepare(
                    "SELECT name, nonce, ciphertext FROM secret_values ORDER BY app_id, name",
                )?;
                let rows = stmt
                    .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                    .collect::<Result<_, _>>()?;
                Ok(rows)
            })
            .unwrap()
    }

    #[test]
    fn rotation_reseals_data_keys_and_retires_the_old_root_key() {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join(ROOT_KEY_FILE);
        let other = AppRef {
            id: "app2",
            name: "api",
        };
        let vault = file_vault(dir.path());
        vault
            .change(APP, &[set("DATABASE_URL", "pg://a"), set("B", "b")])
            .unwrap();
        vault.change(other, &[set("TOKEN", "t")]).unwrap();
        let digests_before = vault.list("app1").unwrap().0;
        let values_before = stored_values(&vault);
        let old_key = std::fs::read_to_string(&key_file).unwrap();

        let rotation = vault.rotate_root_key().unwrap();
        assert_eq!(
            rotation,
            Rotation {
                data_keys: 2,
                key_file: key_file.clone()
            }
        );
        let new_key = std::fs::read_to_string(&key_file).unwrap();
        assert_ne!(new_key, old_key);
        assert_eq!(
            std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(!pending_path(&key_file).exists());
        // The values are the very same ciphertexts, and they open, in this process...
        assert_eq!(stored_values(&vault), values_before);
        assert_eq!(vault.list("app1").unwrap().0, digests_before);
        let opened = vault
            .machine_secrets(APP, "h1", "m1")
            .unwrap()
            .open(&vault.host_key("h1"), "h1", "web")
            .unwrap();
        assert_eq!(opened["DATABASE_URL"], "pg://a");
        drop(vault);
        // ...and after a restart with only the new key file.
        let vault = file_vault(dir.path());
        let opened = vault
            .machine_secrets(other, "h1", "m2")
            .unwrap()
            .open(&vault.host_key("h1"), "h1", "api")
            .unwrap();
        assert_eq!(opened["TOKEN"], "t");
        // New values seal under the same data keys: digests of equal values stay equal.
        vault.change(APP, &[set("C", "b")]).unwrap();
        let listed = vault.list("app1").unwrap().0;
        assert_eq!(
            (listed[0].name.as_str(), listed[1].name.as_str()),
            ("B", "C")
        );
        assert_eq!(listed[0].digest, listed[1].digest);
        drop(vault);
        // The old key opens nothing any more.
        let old = RootKey::new(decode_key(&old_key).unwrap(), RootKeySource::Env);
        let err = Vault::open(&dir.path().join("control.db"), old)
            .err()
            .expect("the old key is refused");
        assert!(
            err.to_string().contains("not the one the stored secrets"),
            "{err}"
        );
    }

    #[test]
    fn a_rotation_cut_short_is_finished_or_undone_at_the_next_start() {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join(ROOT_KEY_FILE);
        let pending = pending_path(&key_file);
        let vault = file_vault(dir.path());
        vault.change(APP, &[set("A", "1")]).unwrap();
        let old_key = std::fs::read(&key_file).unwrap();
        vault.rotate_root_key().unwrap();
        drop(vault);
        let new_key = std::fs::read(&key_file).unwrap();

        // Committed, but the new key was not moved over the old one yet.
        std::fs::rename(&key_file, &pending).unwrap();
        std::fs::write(&key_file, &old_key).unwrap();
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let vault = file_vault(dir.path());
        assert_eq!(std::fs::read(&key_file).unwrap(), new_key);
        assert!(!pending.exists());
        let bundle = vault.machine_secrets(APP, "h1", "m1").unwrap();
        assert_eq!(
            bundle.open(&vault.host_key("h1"), "h1", "web").unwrap()["A"],
            "1"
        );
        drop(vault);

        // Not committed: the new key was written, the database still has the current one.
        create_key_file(&pending, &[9u8; KEY_LEN]).unwrap();
        let vault = file_vault(dir.path());
        assert!(!pending.exists());
        assert_eq!(std::fs::read(&key_file).unwrap(), new_key);
        assert!(vault.machine_secrets(APP, "h1", "m1").is_ok());
        drop(vault);

        // The key file was replaced but the re-sealing did not reach the disk: the old key,
        // kept beside it, is the one the vault is sealed under, and is put back.
        let old = old_path(&key_file);
        std::fs::rename(&key_file, &old).unwrap();
        create_key_file(&key_file, &[7u8; KEY_LEN]).unwrap();
        let vault = file_vault(dir.path());
        assert_eq!(std::fs::read(&key_file).unwrap(), new_key);
        assert!(!old.exists());
        let bundle = vault.machine_secrets(APP, "h1", "m1").unwrap();
        assert_eq!(
            bundle.open(&vault.host_key("h1"), "h1", "web").unwrap()["A"],
            "1"
        );
    }

    /// A power cut keeps what reached the disk and nothing else: copy, right after a
    /// rotation, the database's main file (not its write-ahead log, which is synced only
    /// at checkpoints) and the key files, as a start after the cut would find them.
    #[test]
    fn a_power_cut_after_a_rotation_loses_no_secret() {
        let dir = tempfile::tempdir().unwrap();
        let vault = file_vault(dir.path());
        vault.change(APP, &[set("A", "1")]).unwrap();
        // What was set before the rotation is on disk.
        vault
            .with(|c, _| {
                c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
                Ok(())
            })
            .unwrap();
        vault.rotate_root_key().unwrap();
        let after_cut = tempfile::tempdir().unwrap();
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if !name.ends_with("-wal") && !name.ends_with("-shm") {
                std::fs::copy(&path, after_cut.path().join(&name)).unwrap();
            }
        }
        // No clean close (which would checkpoint): the process is gone.
        std::mem::forget(vault);
        let root = load_root_key(after_cut.path()).unwrap();
        let vault = Vault::open(&after_cut.path().join("control.db"), root)
            .expect("the vault opens after the power cut");
        let bundle = vault.machine_secrets(APP, "h1", "m1").unwrap();
        assert_eq!(
            bundle.open(&vault.host_key("h1"), "h1", "web").unwrap()["A"],
            "1"
        );
    }

    #[test]
    fn a_key_from_the_environment_is_not_rotated_here() {
        let vault = vault();
        vault.change(APP, &[set("A", "1")]).unwrap();
        let err = vault.rotate_root_key().unwrap_err();
        assert!(matches!(err, VaultError::RootKeyNotReplaceable), "{err}");
        assert!(err.to_string().contains(ROOT_KEY_FILE_ENV), "{err}");
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
        assert_eq!(list[0].digest.len(), 32);
        assert_ne!(list[0].digest, list[1].digest);
        // Digests are keyed by the app's data key: the same value elsewhere digests
        // differently, and the same value in the same app alike.
        let other = AppRef {
            id: "app2",
            name: "api",
        };
        vault.change(other, &[set("A", "3")]).unwrap();
        assert_ne!(vault.list("app2").unwrap().0[0].digest, list[0].digest);
        vault.change(APP, &[set("C", "3")]).unwrap();
        let again = vault.list("app1").unwrap().0;
        assert_eq!(again[2].digest, list[0].digest);
        vault.change(APP, &[("C".into(), Change::Unset)]).unwrap();
        assert_eq!(
            vault.change(APP, &[("B".into(), Change::Unset)]).unwrap(),
            5
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
            aloft_testkit::skip("a secrets root key is set in the environment");
            return;
        }
        let RootKey { key, source } = load_root_key(dir.path()).unwrap();
        let path = dir.path().join(ROOT_KEY_FILE);
        assert_eq!(source, RootKeySource::Created(path.clone()));
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let RootKey { key: again, source } = load_root_key(dir.path()).unwrap();
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
