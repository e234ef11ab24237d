//! The control plane: the Machines REST API, tokens, orgs/apps/machines/releases, placement,
//! server-side deploys, and the catalog stream. Drives host agents over their HTTP API.

pub mod api;
pub mod auth;
pub mod catalog;
pub mod certs;
pub mod checks;
pub mod deploy;
pub mod error;
pub mod flyctl;
pub mod host_api;
pub mod hosts;
pub mod ips;
pub mod logs;
pub mod machines;
pub mod names;
pub mod openapi;
pub mod orgs;
pub mod private;
pub mod releases;
pub mod reschedule;
pub mod rollout;
pub mod runtime;
pub mod scale;
pub mod secrets;
pub mod states;
pub mod store;
pub mod timers;
pub mod validate;
pub mod vault;
pub mod volumes;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use aloft_api::token::Token;
use anyhow::Context;

use crate::auth::TokenKind;
use crate::catalog::Catalog;
use crate::hosts::AgentClient;
use crate::store::{OrgRow, Store, TokenRow, now_rfc3339};

#[derive(Clone, Debug)]
pub struct ControlConfig {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    /// Region of this host; where machines go when nothing says otherwise.
    pub region: String,
    /// Apps are served at `<app>.<base_domain>`.
    pub base_domain: String,
    /// The port the proxy serves plain HTTP on, for the URLs the CLI prints.
    pub proxy_http_port: u16,
    /// Pull-through from an upstream registry (off when `None`).
    pub registry_upstream: Option<aloft_registry::UpstreamConfig>,
    /// Registries (`host:port`) that image imports may reach at loopback, private or
    /// link-local addresses (`aloft server --allow-private-registry`). The upstream of
    /// `registry_upstream` always may; every other registry must be at a public address.
    pub allowed_private_registries: Vec<String>,
    /// `postgresql://…` to keep state in PostgreSQL (several control planes may share
    /// it); otherwise state is in SQLite at `<data_dir>/control.db`.
    pub database_url: Option<String>,
    /// Whether this server's proxy gets certificates from an ACME CA (`aloft server
    /// --acme-directory`); without it, only imported certificates are served.
    pub acme: bool,
}

/// What the first start created, and what a local agent and proxy need.
pub struct Credentials {
    pub org_slug: String,
    pub admin_token: String,
    /// The platform's own token: a host token bound to no host, which acts as none (for
    /// proxies and the control plane itself; agents get [`ControlPlane::host_token_for`]).
    pub host_token: String,
}

type Locks = Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>;

pub struct ControlPlane {
    pub config: ControlConfig,
    pub store: Arc<Store>,
    pub registry: Arc<aloft_registry::Registry>,
    pub catalog: Catalog,
    pub deploys: deploy::Deploys,
    /// App secrets, sealed at rest; see [`vault`].
    pub secrets: Arc<vault::Vault>,
    /// Opens the token root keys the store keeps sealed.
    pub token_keys: Arc<auth::TokenKeys>,
    host_token: String,
    agents: Mutex<HashMap<String, AgentClient>>,
    app_locks: Locks,
    machine_locks: Locks,
    /// Machines as the API shows them, by id, with the store revision they were made from.
    views: Mutex<HashMap<String, machines::CachedView>>,
    /// Whether each host's agent answered its latest probe (`host_status`).
    pub host_probes: timers::HostProbes,
    /// This control plane's identity, kept in its data dir: what it holds deploy leases
    /// as, so control planes sharing one database never run the same deploy, and this one
    /// takes its own deploys up again at once when it restarts.
    pub node_id: String,
}

pub const DEFAULT_ORG: &str = "personal";
pub(crate) const SETTING_ADMIN_TOKEN_ID: &str = "admin_token_id";
const SETTING_HOST_TOKEN_ID: &str = "host_token_id";

impl ControlPlane {
    /// Opens (or creates) the state under `data_dir`. On first start this creates the
    /// `personal` org, an admin (user) token for it, and a host token for platform
    /// components.
    pub fn open(config: ControlConfig) -> anyhow::Result<(Arc<Self>, Credentials)> {
        let State {
            store,
            secrets,
            token_keys,
        } = State::open(&config.data_dir, config.database_url.as_deref())?;
        let org = personal_org(&store)?;
        let admin_token = ensure_token(
            &store,
            &token_keys,
            SETTING_ADMIN_TOKEN_ID,
            &org.id,
            TokenKind::User,
            "admin",
        )?;
        let host_token = ensure_token(
            &store,
            &token_keys,
            SETTING_HOST_TOKEN_ID,
            "",
            TokenKind::Host,
            "local host",
        )?;
        let node_id = control_plane_id(&config.data_dir)?;
        let interrupted = store.interrupt_running_releases(&node_id, crate::store::now_millis())?;
        if interrupted > 0 {
            tracing::warn!(
                interrupted,
                "releases whose deploy was cut short by a restart are marked interrupted"
            );
        }
        let catalog = Catalog::new(&config.base_domain, store.clone());
        let registry = aloft_registry::Registry::open(
            aloft_registry::RegistryConfig {
                root: config.data_dir.join("registry"),
                upstream: config.registry_upstream.clone(),
            },
            Arc::new(
                auth::RegistryAuth::new(store.clone(), token_keys.clone())
                    .with_pull_through_prefix(
                        config.registry_upstream.as_ref().map(|u| u.prefix.clone()),
                    ),
            ),
        )
        .context("opening the image registry")?;
        let plane = Arc::new(Self {
            config,
            store,
            registry,
            catalog,
            deploys: deploy::Deploys::default(),
            secrets,
            token_keys,
            host_token: host_token.clone(),
            agents: Mutex::new(HashMap::new()),
            app_locks: Mutex::new(HashMap::new()),
            machine_locks: Mutex::new(HashMap::new()),
            views: Mutex::new(HashMap::new()),
            host_probes: timers::HostProbes::default(),
            node_id,
        });
        Ok((
            plane,
            Credentials {
                org_slug: org.slug,
                admin_token,
                host_token,
            },
        ))
    }

    /// The platform's own token (a host token bound to no host), for the control plane's
    /// calls to its own API and registry. It cannot act as any host: registering, events
    /// and secrets need the host's own token ([`Self::host_token_for`]).
    pub fn host_token(&self) -> &str {
        &self.host_token
    }

    /// The credential of host `host_id`, made on first use. With it the host's agent
    /// registers as that host, reports its machines and fetches its own secrets key and the
    /// secrets of machines placed on it, nothing of other hosts; the control plane calls
    /// that agent with it.
    pub fn host_token_for(&self, host_id: &str) -> Result<String, store::StoreError> {
        let unreadable = |err: auth::TokenKeyError| store::StoreError::Corrupt(err.to_string());
        if let Some(row) = self.store.host_token(host_id)? {
            let root_key = self
                .token_keys
                .open(&row.id, &row.key)
                .map_err(unreadable)?;
            return Ok(Token::mint(&row.id, &root_key, Vec::new()).encode());
        }
        let id = names::random_id(16);
        let root_key = names::random_key();
        let row = TokenRow {
            key: self.token_keys.seal(&id, &root_key).map_err(unreadable)?,
            id,
            org_id: String::new(),
            kind: TokenKind::Host.as_str().to_string(),
            name: format!("host {host_id}"),
            created_at: now_rfc3339(),
            revoked: false,
            expires_at: None,
            apps: Vec::new(),
        };
        self.store.insert_token(&row)?;
        self.store.bind_host_token(&row.id, host_id)?;
        Ok(Token::mint(&row.id, &root_key, Vec::new()).encode())
    }

    pub fn registry_host(&self) -> String {
        self.config.listen.to_string()
    }

    pub fn app_url(&self, app: &str) -> String {
        let port = match self.config.proxy_http_port {
            80 => String::new(),
            other => format!(":{other}"),
        };
        format!("http://{app}.{}{port}/", self.config.base_domain)
    }

    /// The client of a host's agent (made once per host, re-made when it registers again).
    pub fn agent(&self, host_id: &str) -> Result<AgentClient, error::ApiError> {
        if let Some(agent) = self
            .agents
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(host_id)
        {
            return Ok(agent.clone());
        }
        let host = self
            .store
            .hosts()?
            .into_iter()
            .find(|h| h.id == host_id)
            .ok_or_else(|| {
                error::ApiError::unavailable(format!("host {host_id} is not registered"))
            })?;
        let client = AgentClient::new(&host.agent_url, &self.host_token_for(host_id)?);
        self.agents
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(host_id.to_string(), client.clone());
        Ok(client)
    }

    fn forget_agent(&self, host_id: &str) {
        self.agents
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(host_id);
    }

    /// One deploy (or other app-wide change) at a time per app.
    pub fn app_lock(&self, app: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.app_locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(app.to_string())
            .or_default()
            .clone()
    }

    /// One lifecycle operation at a time per machine.
    pub fn machine_lock(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.machine_locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id.to_string())
            .or_default()
            .clone()
    }

    fn forget_machine_lock(&self, id: &str) {
        self.machine_locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }

    /// Serves the API on `listener` until `shutdown` resolves.
    pub async fn serve(
        self: Arc<Self>,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        use axum::serve::ListenerExt;
        let router = api::router(self.clone()).merge(self.registry.router());
        let timers = tokio::spawn(self.clone().run_timers());
        deploy::resume_unfinished(&self);
        let takeover = tokio::spawn(deploy::take_over_abandoned(self.clone()));
        // Small JSON answers go out at once rather than waiting on Nagle's algorithm.
        let listener = listener.tap_io(|tcp| {
            if let Err(err) = tcp.set_nodelay(true) {
                tracing::debug!(error = %err, "setting TCP_NODELAY");
            }
        });
        let served = axum::serve(listener, router)
            .with_graceful_shutdown(shutdown)
            .await
            .context("serving the API");
        timers.abort();
        takeover.abort();
        served
    }
}

const CONTROL_PLANE_ID_FILE: &str = "control-plane-id";

/// The identity of the control plane whose data dir this is, made on first start.
fn control_plane_id(data_dir: &Path) -> anyhow::Result<String> {
    let path = data_dir.join(CONTROL_PLANE_ID_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) if !text.trim().is_empty() => return Ok(text.trim().to_string()),
        Ok(_) => {}
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => return Err(err).with_context(|| format!("reading {}", path.display())),
    }
    let id = format!("cp-{}", ulid::Ulid::new().to_string().to_lowercase());
    std::fs::write(&path, format!("{id}\n"))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(id)
}

/// The root key `ALOFT_SECRETS_ROOT_KEY` held, once [`take_root_key_from_env`] took it.
static ROOT_KEY_FROM_ENV: Mutex<Option<String>> = Mutex::new(None);

/// Moves `ALOFT_SECRETS_ROOT_KEY` from the process environment into memory, so processes
/// the server starts (runtimes, shims, machines) don't inherit it. Call it at the top of
/// `main`, before any thread starts: changing the environment is only sound then.
pub fn take_root_key_from_env() {
    let Some(value) = std::env::var_os(vault::ROOT_KEY_ENV) else {
        return;
    };
    // SAFETY: called from main before the async runtime or any other thread exists, so
    // nothing reads the environment concurrently.
    unsafe { std::env::remove_var(vault::ROOT_KEY_ENV) };
    *ROOT_KEY_FROM_ENV.lock().unwrap_or_else(|p| p.into_inner()) =
        Some(value.to_string_lossy().into_owned());
}

/// The secrets root key: the one taken from the environment at start, else as
/// [`vault::load_root_key`] finds it.
fn root_key(data_dir: &Path) -> anyhow::Result<vault::RootKey> {
    let taken = ROOT_KEY_FROM_ENV
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    match taken {
        Some(text) => {
            let key = aloft_api::secrets::decode_key(text.trim()).map_err(|_| {
                anyhow::anyhow!(
                    "{} is not a base64 32-byte key (make one with `openssl rand -base64 32`)",
                    vault::ROOT_KEY_ENV
                )
            })?;
            Ok(vault::RootKey::new(key, vault::RootKeySource::Env))
        }
        None => Ok(vault::load_root_key(data_dir)?),
    }
}

/// The stores a control plane works on, opened from its data dir.
struct State {
    store: Arc<Store>,
    secrets: Arc<vault::Vault>,
    token_keys: Arc<auth::TokenKeys>,
}

impl State {
    fn open(data_dir: &Path, database_url: Option<&str>) -> anyhow::Result<Self> {
        private::create_private_dir(data_dir)
            .with_context(|| format!("creating data dir {}", data_dir.display()))?;
        let db_path = data_dir.join("control.db");
        private::create_private_file(&db_path)
            .with_context(|| format!("creating {}", db_path.display()))?;
        let store = match database_url.filter(|u| !u.is_empty()) {
            Some(url) => Store::open_url(url).context("opening the database (--database-url)")?,
            None => {
                Store::open(&db_path).with_context(|| format!("opening {}", db_path.display()))?
            }
        };
        let root_key = root_key(data_dir)?;
        tracing::info!(root_key = %root_key.source, "secrets vault ready");
        let secrets = vault::Vault::open(&db_path, root_key)
            .with_context(|| format!("opening the secrets vault in {}", db_path.display()))?;
        let token_keys = auth::TokenKeys::new(
            secrets
                .token_sealing_key()
                .context("reading the key that seals token root keys")?,
        );
        let sealed = token_keys
            .seal_plain_keys(&store)
            .context("sealing token root keys stored in plain text")?;
        if sealed > 0 {
            tracing::info!(
                sealed,
                "token root keys stored in plain text are sealed now"
            );
        }
        Ok(Self {
            store: Arc::new(store),
            secrets: Arc::new(secrets),
            token_keys: Arc::new(token_keys),
        })
    }
}

fn personal_org(store: &Store) -> anyhow::Result<OrgRow> {
    if let Some(org) = store.org_by_slug(DEFAULT_ORG)? {
        return Ok(org);
    }
    let org = OrgRow {
        id: names::random_id(12),
        slug: DEFAULT_ORG.into(),
        name: "Personal".into(),
        created_at: now_rfc3339(),
    };
    match store.create_org(&org) {
        Ok(()) => Ok(org),
        // Another control plane on the same database got there first.
        Err(store::StoreError::Conflict(_)) => store
            .org_by_slug(DEFAULT_ORG)?
            .context("the personal org vanished"),
        Err(other) => Err(other.into()),
    }
}

/// Where `aloft admin token` finds a control plane's state.
#[derive(Clone, Debug)]
pub struct DataDirAccess {
    pub data_dir: PathBuf,
    pub database_url: Option<String>,
}

/// The operator's way back: a new admin token (a user token of the `personal` org with
/// the previous admin token's memberships), made from the data dir directly; the previous
/// admin token is revoked. For whoever can read the data dir (root), with or without a
/// server running.
pub fn mint_admin_token(access: &DataDirAccess) -> anyhow::Result<String> {
    let State {
        store, token_keys, ..
    } = State::open(&access.data_dir, access.database_url.as_deref())?;
    let org = personal_org(&store)?;
    let previous = match store.setting(SETTING_ADMIN_TOKEN_ID)? {
        Some(id) => store.token(&id)?,
        None => None,
    };
    let id = names::random_id(16);
    let root_key = names::random_key();
    let row = TokenRow {
        key: token_keys.seal(&id, &root_key)?,
        id,
        org_id: previous
            .as_ref()
            .map_or(org.id.clone(), |p| p.org_id.clone()),
        kind: TokenKind::User.as_str().to_string(),
        name: "admin".to_string(),
        created_at: now_rfc3339(),
        revoked: false,
        expires_at: None,
        apps: Vec::new(),
    };
    store.insert_token(&row)?;
    if let Some(previous) = &previous {
        for org_id in store.token_org_ids(&previous.id)? {
            store.add_token_org(&row.id, &org_id)?;
        }
    }
    store.set_setting(SETTING_ADMIN_TOKEN_ID, &row.id)?;
    if let Some(previous) = previous {
        store.revoke_token(&previous.id)?;
    }
    Ok(Token::mint(&row.id, &root_key, Vec::new()).encode())
}

/// Re-mints the token recorded under `setting`, creating it on first use. Tokens are
/// deterministic from (id, key), so the same token comes back on every start (revoked, if
/// it was: `aloft admin token` makes a new one). An admin token from before user tokens
/// existed becomes one.
fn ensure_token(
    store: &Store,
    token_keys: &auth::TokenKeys,
    setting: &str,
    org_id: &str,
    kind: TokenKind,
    name: &str,
) -> anyhow::Result<String> {
    if let Some(id) = store.setting(setting)?
        && let Some(row) = store.token(&id)?
    {
        if kind == TokenKind::User && row.kind == TokenKind::Org.as_str() {
            store.set_token_kind(&row.id, TokenKind::User.as_str())?;
        }
        let root_key = token_keys.open(&row.id, &row.key)?;
        if row.revoked && kind == TokenKind::User {
            tracing::warn!(
                token = %row.id,
                "the {name} token is revoked; `aloft admin token` makes a new admin token"
            );
        }
        return Ok(Token::mint(&row.id, &root_key, Vec::new()).encode());
    }
    let id = names::random_id(16);
    let root_key = names::random_key();
    let row = TokenRow {
        key: token_keys.seal(&id, &root_key)?,
        id,
        org_id: org_id.to_string(),
        kind: kind.as_str().to_string(),
        name: name.to_string(),
        created_at: now_rfc3339(),
        revoked: false,
        expires_at: None,
        apps: Vec::new(),
    };
    store.insert_token(&row)?;
    store.set_setting(setting, &row.id)?;
    Ok(Token::mint(&row.id, &root_key, Vec::new()).encode())
}
