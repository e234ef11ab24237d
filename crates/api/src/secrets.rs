//! App secrets on the wire: what the API shows (names and digests, never values), what an
//! agent fetches to start a machine (sealed values and the app's data key wrapped for its
//! host), and the sealing both ends agree on.
//!
//! Every seal is XChaCha20-Poly1305 with a random 24-byte nonce and associated data that
//! names what the ciphertext is for, so a ciphertext moved to another app, secret name or
//! host fails to open instead of yielding a value in the wrong place.

use std::collections::BTreeMap;

use base64::Engine;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};

/// A secret as the API shows it: its name and a digest of its value, never the value.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AppSecret {
    pub name: String,
    pub digest: String,
    pub created_at: String,
    pub updated_at: String,
    /// `Deployed` (every machine of the app has this value), `Staged` (none has),
    /// `Partial` (some have), `Unknown`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub status: String,
}

/// `GET /v1/apps/{app}/secrets`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ListSecretsResponse {
    pub secrets: Vec<AppSecret>,
    /// Increases with every change to the app's secrets.
    pub version: u64,
}

/// `POST /v1/apps/{app}/secrets`: values to set; a null value unsets the secret. The whole
/// batch is stored, or (on any bad entry) nothing of it. `Debug` shows names only.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SetSecretsRequest {
    pub values: BTreeMap<String, Option<String>>,
}

/// `POST /v1/apps/{app}/secrets/{name}`. `Debug` hides the value.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SetSecretRequest {
    pub value: String,
}

impl std::fmt::Debug for SetSecretsRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<_> = self
            .values
            .iter()
            .map(|(name, value)| match value {
                Some(_) => format!("set {name}"),
                None => format!("unset {name}"),
            })
            .collect();
        f.debug_struct("SetSecretsRequest")
            .field("values", &names)
            .finish()
    }
}

impl std::fmt::Debug for SetSecretRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SetSecretRequest")
            .field("value_bytes", &self.value.len())
            .finish()
    }
}

/// `POST /v1/secrets/rotate-key`: what a root key rotation did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotateKeyResponse {
    /// App data keys re-sealed under the new root key.
    pub data_keys: u64,
    /// Where the server keeps the new root key.
    pub key_file: String,
}

pub const STATUS_DEPLOYED: &str = "Deployed";
pub const STATUS_STAGED: &str = "Staged";
pub const STATUS_PARTIAL: &str = "Partial";
pub const STATUS_UNKNOWN: &str = "Unknown";

/// A sealed blob: nonce and ciphertext (with its tag), both base64.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sealed {
    pub nonce: String,
    pub ciphertext: String,
}

/// `GET /v1/hosts/{host}/secrets-key`: the key the control plane wraps app data keys with
/// for this host (base64 of 32 bytes). Agents hold it in memory only.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostSecretsKey {
    pub key: String,
}

/// One sealed secret value, as stored; opens only with the app's data key and only as
/// `name` of `app`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedSecret {
    pub name: String,
    pub value: Sealed,
}

/// `GET /v1/hosts/{host}/machines/{id}/secrets`: everything an agent needs to give a
/// machine its app's secrets, none of it readable without the host's key.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineSecrets {
    pub app: String,
    /// The app's secrets version these values are.
    pub version: u64,
    /// The app's data key, sealed with the host's key (see [`host_wrap_aad`]). Absent when
    /// the app has no secrets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_key: Option<Sealed>,
    #[serde(default)]
    pub secrets: Vec<SealedSecret>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("a key must be 32 bytes, this one is {0}")]
    KeyLength(usize),
    #[error("sealed data is not valid base64")]
    Encoding,
    #[error("sealed data does not open with this key for this purpose")]
    Open,
    #[error("sealing failed")]
    Seal,
}

pub const KEY_LEN: usize = 32;
const NONCE_LEN: usize = 24;

fn cipher(key: &[u8]) -> Result<XChaCha20Poly1305, SealError> {
    if key.len() != KEY_LEN {
        return Err(SealError::KeyLength(key.len()));
    }
    XChaCha20Poly1305::new_from_slice(key).map_err(|_| SealError::KeyLength(key.len()))
}

/// Seals `plaintext` under `key`, bound to `aad`, with a fresh random nonce.
pub fn seal_raw(key: &[u8], aad: &[u8], plaintext: &[u8]) -> Result<(Vec<u8>, Vec<u8>), SealError> {
    let cipher = cipher(key)?;
    let mut nonce = [0u8; NONCE_LEN];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut nonce);
    let ciphertext = cipher
        .encrypt(
            XNonce::from_slice(&nonce),
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .map_err(|_| SealError::Seal)?;
    Ok((nonce.to_vec(), ciphertext))
}

/// Opens what [`seal_raw`] sealed, if `key` and `aad` are the ones it was sealed with.
pub fn open_raw(
    key: &[u8],
    aad: &[u8],
    nonce: &[u8],
    ciphertext: &[u8],
) -> Result<Vec<u8>, SealError> {
    if nonce.len() != NONCE_LEN {
        return Err(SealError::Open);
    }
    cipher(key)?
        .decrypt(
            XNonce::from_slice(nonce),
            Payload {
                msg: ciphertext,
                aad,
            },
        )
        .map_err(|_| SealError::Open)
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

impl Sealed {
    pub fn seal(key: &[u8], aad: &[u8], plaintext: &[u8]) -> Result<Self, SealError> {
        let (nonce, ciphertext) = seal_raw(key, aad, plaintext)?;
        Ok(Self::from_raw(&nonce, &ciphertext))
    }

    pub fn from_raw(nonce: &[u8], ciphertext: &[u8]) -> Self {
        Self {
            nonce: b64().encode(nonce),
            ciphertext: b64().encode(ciphertext),
        }
    }

    pub fn open(&self, key: &[u8], aad: &[u8]) -> Result<Vec<u8>, SealError> {
        let nonce = b64().decode(&self.nonce).map_err(|_| SealError::Encoding)?;
        let ciphertext = b64()
            .decode(&self.ciphertext)
            .map_err(|_| SealError::Encoding)?;
        open_raw(key, aad, &nonce, &ciphertext)
    }
}

/// Associated data of a secret value: the app's name and the secret's name.
pub fn secret_aad(app: &str, name: &str) -> Vec<u8> {
    format!("aloft/secret/v1\0{app}\0{name}").into_bytes()
}

/// Associated data of an app's data key sealed for a host.
pub fn host_wrap_aad(host: &str, app: &str) -> Vec<u8> {
    format!("aloft/host-wrap/v1\0{host}\0{app}").into_bytes()
}

/// Associated data of a volume's encryption key sealed for the host that holds it.
pub fn volume_key_host_aad(host: &str, volume: &str) -> Vec<u8> {
    format!("aloft/volume-key-host/v1\0{host}\0{volume}").into_bytes()
}

/// Associated data of a volume's encryption key as the control plane stores it.
pub fn volume_key_aad(volume: &str) -> Vec<u8> {
    format!("aloft/volume-key/v1\0{volume}").into_bytes()
}

/// Decodes a base64 key of [`KEY_LEN`] bytes.
pub fn decode_key(text: &str) -> Result<Vec<u8>, SealError> {
    let key = b64().decode(text.trim()).map_err(|_| SealError::Encoding)?;
    if key.len() != KEY_LEN {
        return Err(SealError::KeyLength(key.len()));
    }
    Ok(key)
}

pub fn encode_key(key: &[u8]) -> String {
    b64().encode(key)
}

impl MachineSecrets {
    /// Opens every value with the host's key: name → plaintext. Fails as a whole if any
    /// value does not open as a secret of `app` (the app the machine belongs to).
    pub fn open(
        &self,
        host_key: &[u8],
        host: &str,
        app: &str,
    ) -> Result<BTreeMap<String, String>, OpenSecretsError> {
        if self.app != app {
            return Err(OpenSecretsError::WrongApp {
                wanted: app.to_string(),
                got: self.app.clone(),
            });
        }
        let mut values = BTreeMap::new();
        let Some(wrapped) = &self.data_key else {
            if let Some(first) = self.secrets.first() {
                return Err(OpenSecretsError::Value(first.name.clone()));
            }
            return Ok(values);
        };
        let data_key = wrapped
            .open(host_key, &host_wrap_aad(host, app))
            .map_err(|_| OpenSecretsError::DataKey)?;
        for secret in &self.secrets {
            let bytes = secret
                .value
                .open(&data_key, &secret_aad(app, &secret.name))
                .map_err(|_| OpenSecretsError::Value(secret.name.clone()))?;
            let text = String::from_utf8(bytes)
                .map_err(|_| OpenSecretsError::Value(secret.name.clone()))?;
            values.insert(secret.name.clone(), text);
        }
        Ok(values)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenSecretsError {
    #[error("secrets for app {got} were handed to a machine of app {wanted}")]
    WrongApp { wanted: String, got: String },
    #[error("the app's data key does not open with this host's key")]
    DataKey,
    #[error("secret {0} does not open as a secret of this app")]
    Value(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> Vec<u8> {
        vec![byte; KEY_LEN]
    }

    #[test]
    fn seals_open_only_with_the_same_key_and_purpose() {
        let sealed = Sealed::seal(&key(1), &secret_aad("a", "DB"), b"postgres://x").unwrap();
        assert_eq!(
            sealed.open(&key(1), &secret_aad("a", "DB")).unwrap(),
            b"postgres://x"
        );
        assert_eq!(
            sealed.open(&key(2), &secret_aad("a", "DB")),
            Err(SealError::Open)
        );
        assert_eq!(
            sealed.open(&key(1), &secret_aad("b", "DB")),
            Err(SealError::Open)
        );
        assert_eq!(
            sealed.open(&key(1), &secret_aad("a", "DB2")),
            Err(SealError::Open)
        );
        // Nonces are fresh: the same value seals differently each time.
        let again = Sealed::seal(&key(1), &secret_aad("a", "DB"), b"postgres://x").unwrap();
        assert_ne!(sealed, again);
        assert_eq!(
            Sealed::seal(&[0; 16], b"", b"x").unwrap_err(),
            SealError::KeyLength(16)
        );
    }

    #[test]
    fn init_config_debug_shows_names_not_values() {
        use crate::internal::{InitConfig, InitFile};
        let mut init = InitConfig::default();
        init.env
            .insert("DATABASE_URL".into(), "postgres://hunter2".into());
        init.files.push(InitFile {
            path: "/etc/key".into(),
            content: "aHVudGVyMg==".into(),
            mode: None,
        });
        let request = SetSecretsRequest {
            values: BTreeMap::from([("DATABASE_URL".into(), Some("postgres://hunter2".into()))]),
        };
        let shown = format!("{init:?} {request:?}");
        assert!(
            shown.contains("DATABASE_URL") && shown.contains("/etc/key"),
            "{shown}"
        );
        assert!(
            !shown.contains("hunter2") && !shown.contains("aHVudGVyMg"),
            "{shown}"
        );
    }

    #[test]
    fn machine_secrets_open_only_for_their_host_and_app() {
        let host_key = key(7);
        let data_key = key(9);
        let bundle = MachineSecrets {
            app: "web".into(),
            version: 3,
            data_key: Some(
                Sealed::seal(&host_key, &host_wrap_aad("h1", "web"), &data_key).unwrap(),
            ),
            secrets: vec![SealedSecret {
                name: "TOKEN".into(),
                value: Sealed::seal(&data_key, &secret_aad("web", "TOKEN"), b"t0k").unwrap(),
            }],
        };
        let opened = bundle.open(&host_key, "h1", "web").unwrap();
        assert_eq!(opened["TOKEN"], "t0k");
        assert_eq!(
            bundle.open(&host_key, "h2", "web"),
            Err(OpenSecretsError::DataKey)
        );
        assert!(matches!(
            bundle.open(&host_key, "h1", "other"),
            Err(OpenSecretsError::WrongApp { .. })
        ));
        // A value renamed in transit does not open.
        let mut renamed = bundle.clone();
        renamed.secrets[0].name = "OTHER".into();
        assert_eq!(
            renamed.open(&host_key, "h1", "web"),
            Err(OpenSecretsError::Value("OTHER".into()))
        );
    }
}
