//! App secrets for the machines this agent starts.
//!
//! At every start (restarts too, and after an agent restart) the agent fetches the
//! machine's secrets from the control plane with its host token: the values sealed as
//! stored, and the app's data key sealed for this host. It opens them in memory with the
//! host's key (also fetched, also only in memory) and puts them into the [`InitConfig`],
//! which goes to init over a pipe and nowhere else: not into the agent's database, the
//! spec, the OCI bundle, events or logs. Errors name secrets, never their values.
//!
//! What was last fetched for a machine is kept in memory, still sealed, so a restart by
//! restart policy works while the control plane is briefly unreachable. The host's key
//! is fetched again when a data key does not open with it (the root key was rotated).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use aloft_api::internal::{InitConfig, InitFile, MachineSpec};
use aloft_api::secrets::{
    HostSecretsKey, MachineSecrets, OpenSecretsError, Sealed, decode_key, volume_key_host_aad,
};
use aloft_client::{Client, ClientError};
use base64::Engine;

const ATTEMPTS: u32 = 3;

pub struct SecretsSource {
    client: Client,
    host_id: String,
    host_key: tokio::sync::Mutex<Option<Vec<u8>>>,
    last_fetched: std::sync::Mutex<HashMap<String, MachineSecrets>>,
}

impl SecretsSource {
    pub fn new(control_url: &str, token: &str, host_id: &str) -> Self {
        Self {
            client: Client::new(control_url, Some(token.to_string()))
                .with_timeout(Duration::from_secs(10)),
            host_id: host_id.to_string(),
            host_key: tokio::sync::Mutex::new(None),
            last_fetched: Default::default(),
        }
    }

    async fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let mut backoff = Duration::from_millis(250);
        let mut attempt = 1;
        loop {
            match self.client.get(path).await {
                Ok(value) => return Ok(value),
                // The control plane refused: asking again will not change its mind.
                Err(err @ ClientError::Api { status, .. }) if !status.is_server_error() => {
                    return Err(err);
                }
                Err(err) if attempt >= ATTEMPTS => return Err(err),
                Err(_) => {
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                    attempt += 1;
                }
            }
        }
    }

    async fn host_key(&self) -> Result<Vec<u8>, String> {
        let mut cached = self.host_key.lock().await;
        if let Some(key) = cached.as_ref() {
            return Ok(key.clone());
        }
        let answer: HostSecretsKey = self
            .get(&format!(
                "/v1/hosts/{}/secrets-key",
                aloft_client::encode_component(&self.host_id)
            ))
            .await
            .map_err(|e| format!("fetching this host's secrets key from the control plane: {e}"))?;
        let key = decode_key(&answer.key)
            .map_err(|e| format!("the control plane sent an unusable host secrets key: {e}"))?;
        *cached = Some(key.clone());
        Ok(key)
    }

    /// Opens a volume's encryption key sealed for this host (in memory only).
    pub async fn open_volume_key(&self, volume: &str, sealed: &Sealed) -> Result<Vec<u8>, String> {
        let aad = volume_key_host_aad(&self.host_id, volume);
        for attempt in 0..2 {
            let key = self.host_key().await?;
            if let Ok(raw) = sealed.open(&key, &aad) {
                return Ok(raw);
            }
            if attempt == 0 {
                // The root key was rotated since the host key was fetched.
                *self.host_key.lock().await = None;
            }
        }
        Err(format!(
            "the key of volume {volume} does not open with this host's key"
        ))
    }

    /// A volume's encryption key, fetched from the control plane sealed for this host.
    pub async fn volume_key(&self, volume: &str) -> Result<Vec<u8>, String> {
        let path = format!(
            "/v1/hosts/{}/volumes/{}/key",
            aloft_client::encode_component(&self.host_id),
            aloft_client::encode_component(volume)
        );
        let sealed: Sealed = self
            .get(&path)
            .await
            .map_err(|e| format!("fetching the key of volume {volume}: {e}"))?;
        self.open_volume_key(volume, &sealed).await
    }

    /// The machine's secrets, opened: name → value.
    pub async fn for_machine(
        &self,
        spec: &MachineSpec,
    ) -> Result<BTreeMap<String, String>, String> {
        let path = format!(
            "/v1/hosts/{}/machines/{}/secrets",
            aloft_client::encode_component(&self.host_id),
            aloft_client::encode_component(&spec.id)
        );
        let bundle = match self.get::<MachineSecrets>(&path).await {
            Ok(bundle) => {
                self.remember(&spec.id, bundle.clone());
                bundle
            }
            Err(err @ ClientError::Api { .. }) => {
                return Err(format!(
                    "the control plane refused this machine's secrets: {err}"
                ));
            }
            Err(err) => match self.remembered(&spec.id) {
                Some(bundle) => {
                    tracing::warn!(machine = %spec.id, error = %err, "control plane unreachable; starting with the secrets fetched last time");
                    bundle
                }
                None => {
                    return Err(format!(
                        "cannot fetch the app's secrets from the control plane: {err}"
                    ));
                }
            },
        };
        self.open(&bundle, spec).await
    }

    /// The secrets last delivered to the machine, opened again without a new fetch (so
    /// the control plane's record of deliveries stays true): for commands run in the
    /// machine (`machine exec`, `ssh console`), which get what its main process got.
    /// `None` when this agent has delivered none to it since it started.
    pub async fn last_delivered(
        &self,
        spec: &MachineSpec,
    ) -> Option<Result<BTreeMap<String, String>, String>> {
        let bundle = self.remembered(&spec.id)?;
        Some(self.open(&bundle, spec).await)
    }

    async fn open(
        &self,
        bundle: &MachineSecrets,
        spec: &MachineSpec,
    ) -> Result<BTreeMap<String, String>, String> {
        let host_key = self.host_key().await?;
        let opened = match bundle.open(&host_key, &self.host_id, &spec.app) {
            // The root key was rotated since this host's key was fetched, which changes
            // the host's key: fetch it again.
            Err(OpenSecretsError::DataKey) => {
                *self.host_key.lock().await = None;
                let host_key = self.host_key().await?;
                bundle.open(&host_key, &self.host_id, &spec.app)
            }
            other => other,
        };
        opened.map_err(|e| format!("opening the app's secrets: {e}"))
    }

    fn remember(&self, machine: &str, bundle: MachineSecrets) {
        self.last_fetched
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(machine.to_string(), bundle);
    }

    fn remembered(&self, machine: &str) -> Option<MachineSecrets> {
        self.last_fetched
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(machine)
            .cloned()
    }

    /// Drops what was kept for a machine (it was destroyed).
    pub fn forget(&self, machine: &str) {
        self.last_fetched
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(machine);
    }
}

/// Puts the secrets into init's config: every app secret as an environment variable
/// (over `[env]` of the same name, unless the machine's process says
/// `ignore_app_secrets`), the process's own `secrets` mappings, and each `[[files]]` entry
/// with `secret_name` as a file (the value is base64 of its content).
pub fn apply(
    init: &mut InitConfig,
    spec: &MachineSpec,
    secrets: &BTreeMap<String, String>,
) -> Result<(), String> {
    let missing = |what: String, name: &str| {
        format!(
            "{what} needs secret {name}, which app {} does not have; set it with `aloft secrets set {name}=...`",
            spec.app
        )
    };
    let process = spec.config.processes.first();
    if !process.is_some_and(|p| p.ignore_app_secrets) {
        for (name, value) in secrets {
            // The platform's own variables win; the API refuses such names anyway.
            if !name.starts_with("FLY_") {
                init.env.insert(name.clone(), value.clone());
            }
        }
    }
    for mapping in process.map(|p| p.secrets.as_slice()).unwrap_or_default() {
        let name = mapping
            .name
            .as_deref()
            .filter(|n| !n.is_empty())
            .unwrap_or(&mapping.env_var);
        let value = secrets
            .get(name)
            .ok_or_else(|| missing(format!("environment variable {}", mapping.env_var), name))?;
        init.env.insert(mapping.env_var.clone(), value.clone());
    }
    for file in &spec.config.files {
        let Some(name) = file.secret_name.as_deref().filter(|n| !n.is_empty()) else {
            continue;
        };
        let value = secrets
            .get(name)
            .ok_or_else(|| missing(format!("file {}", file.guest_path), name))?;
        let content = value.trim();
        if base64::engine::general_purpose::STANDARD
            .decode(content)
            .is_err()
        {
            return Err(format!(
                "file {}: secret {name} is not base64; set it to the base64 of the file's content",
                file.guest_path
            ));
        }
        init.files.push(InitFile {
            path: file.guest_path.clone(),
            content: content.to_string(),
            mode: file.mode,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use aloft_api::{File, MachineProcess, MachineSecret};

    fn spec() -> MachineSpec {
        let mut spec = MachineSpec {
            id: "m1".into(),
            app: "web".into(),
            ..Default::default()
        };
        spec.config.env.insert("DB".into(), "from-env".into());
        spec
    }

    fn init_for(spec: &MachineSpec) -> InitConfig {
        InitConfig {
            env: spec.config.env.clone().into_iter().collect(),
            ..Default::default()
        }
    }

    fn values(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn secrets_override_env_and_become_files() {
        let mut spec = spec();
        spec.config.files.push(File {
            guest_path: "/etc/cert.pem".into(),
            secret_name: Some("CERT".into()),
            mode: Some(0o600),
            ..Default::default()
        });
        let mut init = init_for(&spec);
        init.env.insert("FLY_APP_NAME".into(), "web".into());
        let secrets = values(&[
            ("DB", "postgres://x"),
            ("CERT", "aGVsbG8=\n"),
            ("FLY_APP_NAME", "evil"),
        ]);
        apply(&mut init, &spec, &secrets).unwrap();
        assert_eq!(init.env["DB"], "postgres://x");
        assert_eq!(init.env["CERT"], "aGVsbG8=\n");
        assert_eq!(init.env["FLY_APP_NAME"], "web");
        assert_eq!(
            init.files,
            vec![InitFile {
                path: "/etc/cert.pem".into(),
                content: "aGVsbG8=".into(),
                mode: Some(0o600)
            }]
        );
    }

    #[test]
    fn file_secrets_must_exist_and_be_base64() {
        let mut spec = spec();
        spec.config.files.push(File {
            guest_path: "/k".into(),
            secret_name: Some("KEY".into()),
            ..Default::default()
        });
        let err = apply(&mut init_for(&spec), &spec, &values(&[])).unwrap_err();
        assert!(err.contains("file /k needs secret KEY"), "{err}");
        let err = apply(
            &mut init_for(&spec),
            &spec,
            &values(&[("KEY", "not base64!")]),
        )
        .unwrap_err();
        assert_eq!(
            err,
            "file /k: secret KEY is not base64; set it to the base64 of the file's content"
        );
        assert!(
            !err.contains("not base64!"),
            "the value stays out of errors"
        );
    }

    #[test]
    fn process_mappings_and_ignore_app_secrets() {
        let mut spec = spec();
        spec.config.processes.push(MachineProcess {
            secrets: vec![MachineSecret {
                env_var: "DATABASE_URL".into(),
                name: Some("PRIMARY_DB".into()),
            }],
            ignore_app_secrets: true,
            ..Default::default()
        });
        let mut init = init_for(&spec);
        apply(
            &mut init,
            &spec,
            &values(&[("PRIMARY_DB", "pg://p"), ("OTHER", "o")]),
        )
        .unwrap();
        assert_eq!(init.env["DATABASE_URL"], "pg://p");
        assert!(!init.env.contains_key("OTHER"));
        assert!(!init.env.contains_key("PRIMARY_DB"));
        assert_eq!(init.env["DB"], "from-env");
    }
}
