//! Who is calling: bearer tokens (macaroon-style, see `aloft_api::token`) checked against
//! the token table, and what each kind of token may do.

use std::sync::Arc;

use aloft_api::token::{Token, TokenError};
use aloft_registry::{Action, AuthError, Authorizer};

use crate::error::ApiError;
use crate::store::{AppRow, Store, TokenRow};

/// The verified identity behind a request.
#[derive(Clone, Debug)]
pub struct Caller {
    pub token_id: String,
    /// The token's own org (a user token's personal org).
    pub org_id: String,
    /// Every org the caller may act in (one, except for user tokens).
    pub org_ids: Vec<String>,
    pub kind: TokenKind,
    /// Apps this token is limited to; `None` = every app of its orgs.
    pub apps: Option<Vec<String>>,
    pub read_only: bool,
    /// When the token stops working (Unix seconds), from its caveats.
    pub expires_at: Option<i64>,
    /// Who the token says it is, for lease owners and the like.
    pub name: String,
    /// The host a `host` token speaks for; `None` for the platform's own token.
    pub host_id: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenKind {
    /// A person: every org they are a member of; may create orgs.
    User,
    /// Full access to one organisation.
    Org,
    /// Deploy rights on some apps of one organisation.
    Deploy,
    /// Read-only access to one organisation.
    ReadOnly,
    /// A platform component (agent, proxy): every org, internal endpoints.
    Host,
}

impl TokenKind {
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "user" => Some(TokenKind::User),
            "org" => Some(TokenKind::Org),
            "deploy" => Some(TokenKind::Deploy),
            "readonly" => Some(TokenKind::ReadOnly),
            "host" => Some(TokenKind::Host),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            TokenKind::User => "user",
            TokenKind::Org => "org",
            TokenKind::Deploy => "deploy",
            TokenKind::ReadOnly => "readonly",
            TokenKind::Host => "host",
        }
    }
}

/// Token root keys at rest. A token's root key is stored sealed (XChaCha20-Poly1305, the
/// token's id as associated data) under a key the secrets vault keeps sealed under its
/// root key ([`crate::vault::Vault::token_sealing_key`]), so the tokens table alone (a
/// stolen database or backup) can't mint or check tokens, and a root key rotation, which
/// re-seals the vault's keys, leaves tokens as they are.
pub struct TokenKeys {
    sealing_key: Vec<u8>,
}

/// What a sealed root key starts with in the `key` column; a plain one (from before keys
/// were sealed) is 32 random bytes and is sealed at the next start.
const SEALED_PREFIX: &[u8] = b"aloft-sealed-v1:";

#[derive(Debug, thiserror::Error)]
pub enum TokenKeyError {
    #[error("the root key of token {0} is not sealed")]
    NotSealed(String),
    #[error("the root key of token {0} does not open (was the secrets root key replaced?)")]
    DoesNotOpen(String),
    #[error("sealing the root key of token {0} failed")]
    Seal(String),
}

impl TokenKeys {
    /// A new token's row, its root key sealed, and the root key to mint the token with.
    /// An empty or missing `name` becomes `default_name`.
    pub fn new_row(
        &self,
        org_id: String,
        kind: TokenKind,
        name: Option<String>,
        default_name: String,
    ) -> Result<(TokenRow, Vec<u8>), ApiError> {
        let name = name
            .filter(|n| !n.trim().is_empty())
            .unwrap_or(default_name);
        if name.len() > 200 {
            return Err(ApiError::bad_request(
                "invalid name: at most 200 characters",
            ));
        }
        let id = crate::names::random_id(16);
        let root_key = crate::names::random_key();
        let row = TokenRow {
            key: self
                .seal(&id, &root_key)
                .map_err(|e| ApiError::internal(e.to_string()))?,
            id,
            org_id,
            kind: kind.as_str().to_string(),
            name,
            created_at: crate::store::now_rfc3339(),
            revoked: false,
            expires_at: None,
            apps: Vec::new(),
        };
        Ok((row, root_key))
    }

    pub fn new(sealing_key: Vec<u8>) -> Self {
        Self { sealing_key }
    }

    pub fn is_sealed(stored: &[u8]) -> bool {
        stored.starts_with(SEALED_PREFIX)
    }

    /// The stored form of `root_key`, for token `token_id`.
    pub fn seal(&self, token_id: &str, root_key: &[u8]) -> Result<Vec<u8>, TokenKeyError> {
        let (nonce, ciphertext) =
            aloft_api::secrets::seal_raw(&self.sealing_key, token_id.as_bytes(), root_key)
                .map_err(|_| TokenKeyError::Seal(token_id.to_string()))?;
        let mut stored = SEALED_PREFIX.to_vec();
        stored.push(
            u8::try_from(nonce.len()).map_err(|_| TokenKeyError::Seal(token_id.to_string()))?,
        );
        stored.extend(nonce);
        stored.extend(ciphertext);
        Ok(stored)
    }

    /// The root key of token `token_id` from its stored form.
    pub fn open(&self, token_id: &str, stored: &[u8]) -> Result<Vec<u8>, TokenKeyError> {
        let sealed = stored
            .strip_prefix(SEALED_PREFIX)
            .ok_or_else(|| TokenKeyError::NotSealed(token_id.to_string()))?;
        let does_not_open = || TokenKeyError::DoesNotOpen(token_id.to_string());
        let (&nonce_len, rest) = sealed.split_first().ok_or_else(does_not_open)?;
        let (nonce, ciphertext) = rest
            .split_at_checked(usize::from(nonce_len))
            .ok_or_else(does_not_open)?;
        aloft_api::secrets::open_raw(&self.sealing_key, token_id.as_bytes(), nonce, ciphertext)
            .map_err(|_| does_not_open())
    }

    /// Seals every root key still stored plain; returns how many there were.
    pub fn seal_plain_keys(&self, store: &Store) -> anyhow::Result<usize> {
        let mut sealed = 0;
        for (id, stored) in store.token_keys()? {
            if Self::is_sealed(&stored) {
                continue;
            }
            store.set_token_key(&id, &stored, &self.seal(&id, &stored)?)?;
            sealed += 1;
        }
        Ok(sealed)
    }
}

/// Reads the token from an `Authorization` header value.
pub fn authenticate(
    store: &Store,
    keys: &TokenKeys,
    header: Option<&str>,
    now_secs: i64,
) -> Result<Caller, ApiError> {
    let header = header.ok_or_else(|| {
        ApiError::unauthorized("missing Authorization header; pass `Authorization: Bearer <token>`")
    })?;
    let token = Token::decode(header)
        .map_err(|e| ApiError::unauthorized(&format!("invalid token: {e}")))?;
    let row = store
        .token(&token.id)?
        .ok_or_else(|| ApiError::unauthorized("invalid token: unknown token"))?;
    let root_key = keys.open(&row.id, &row.key).map_err(|err| {
        tracing::error!(error = %err, "checking a token");
        ApiError::unauthorized("invalid token: its key does not open on this server")
    })?;
    let mut caller = check(&row, &root_key, &token, now_secs)?;
    if caller.kind == TokenKind::Host {
        caller.host_id = store.token_host(&row.id)?;
    }
    if caller.kind == TokenKind::User {
        caller.org_ids = store.token_org_ids(&row.id)?;
        if !caller.org_ids.contains(&row.org_id) {
            caller.org_ids.push(row.org_id.clone());
        }
    }
    Ok(caller)
}

fn check(
    row: &TokenRow,
    root_key: &[u8],
    token: &Token,
    now_secs: i64,
) -> Result<Caller, ApiError> {
    token
        .verify(root_key)
        .map_err(|e: TokenError| ApiError::unauthorized(&format!("invalid token: {e}")))?;
    if row.revoked {
        return Err(ApiError::unauthorized("token has been revoked"));
    }
    if let Some(expiry) = token.expires_at()
        && now_secs >= expiry
    {
        return Err(ApiError::unauthorized("token has expired"));
    }
    let kind = TokenKind::parse(&row.kind)
        .ok_or_else(|| ApiError::unauthorized("invalid token: unknown kind"))?;
    Ok(Caller {
        token_id: row.id.clone(),
        org_id: row.org_id.clone(),
        org_ids: vec![row.org_id.clone()],
        kind,
        apps: token.allowed_apps(),
        read_only: token.read_only() || kind == TokenKind::ReadOnly,
        expires_at: token.expires_at(),
        name: row.name.clone(),
        host_id: None,
    })
}

impl Caller {
    pub fn is_host(&self) -> bool {
        self.kind == TokenKind::Host
    }

    pub fn in_org(&self, org_id: &str) -> bool {
        self.is_host() || self.org_ids.iter().any(|o| o == org_id)
    }

    /// Whether the caller can see the app at all. Apps it cannot see answer 404, so a
    /// token never learns that another org's app exists.
    pub fn sees_app(&self, app: &AppRow) -> bool {
        if self.is_host() {
            return true;
        }
        if !self.in_org(&app.org_id) {
            return false;
        }
        match &self.apps {
            Some(apps) => apps.iter().any(|a| a == &app.name),
            None => true,
        }
    }

    /// A join token (`aloft tokens create host`) no host has registered with yet: it may
    /// register a host and nothing else.
    pub fn is_joining(&self) -> bool {
        self.is_host() && self.host_id.as_deref() == Some(crate::store::JOIN_TOKEN_HOST)
    }

    pub fn require_host(&self) -> Result<(), ApiError> {
        if self.is_joining() {
            Err(ApiError::forbidden(
                "this join token has not joined a host yet; `aloft agent --token` registers with it first",
            ))
        } else if self.is_host() {
            Ok(())
        } else {
            Err(ApiError::forbidden(
                "this endpoint is for platform hosts only",
            ))
        }
    }

    /// Host-only endpoints about one host answer only that host's own token: another
    /// host's token, or the platform's (bound to no host), gets 403.
    pub fn require_host_itself(&self, host_id: &str) -> Result<(), ApiError> {
        self.require_host()?;
        if self.host_id.as_deref() == Some(host_id) {
            Ok(())
        } else {
            Err(ApiError::forbidden(&format!(
                "this endpoint needs host {host_id}'s own token"
            )))
        }
    }

    pub fn require_write(&self) -> Result<(), ApiError> {
        if self.read_only {
            Err(ApiError::forbidden("this token is read-only"))
        } else {
            Ok(())
        }
    }

    /// Creating apps, tokens and other org-wide writes need a token for the whole org.
    pub fn require_org_write(&self) -> Result<(), ApiError> {
        self.require_write()?;
        if self.apps.is_some() || self.kind == TokenKind::Deploy {
            return Err(ApiError::forbidden(
                "this token is limited to specific apps",
            ));
        }
        Ok(())
    }
}

/// Registry access with the platform's tokens: a repository is named after its app, so a
/// token may pull an app's images if it sees the app, and push if it may also write.
pub struct RegistryAuth {
    store: Arc<Store>,
    keys: Arc<TokenKeys>,
    /// Repositories under this prefix are pulled through from an upstream registry
    /// (public base images): any valid token may pull them; only hosts may write.
    pull_through_prefix: Option<String>,
}

impl RegistryAuth {
    pub fn new(store: Arc<Store>, keys: Arc<TokenKeys>) -> Self {
        Self {
            store,
            keys,
            pull_through_prefix: None,
        }
    }

    pub fn with_pull_through_prefix(mut self, prefix: Option<String>) -> Self {
        self.pull_through_prefix = prefix
            .map(|p| p.trim_matches('/').to_string())
            .filter(|p| !p.is_empty());
        self
    }
}

impl Authorizer for RegistryAuth {
    fn authorize(
        &self,
        token: Option<&str>,
        repository: &str,
        action: Action,
    ) -> Result<(), AuthError> {
        let token = token.ok_or(AuthError::Unauthenticated)?;
        let caller = authenticate(
            &self.store,
            &self.keys,
            Some(token),
            chrono::Utc::now().timestamp(),
        )
        .map_err(|_| AuthError::Unauthenticated)?;
        if repository.is_empty() || caller.is_host() {
            return Ok(());
        }
        if let Some(prefix) = &self.pull_through_prefix
            && repository
                .strip_prefix(prefix.as_str())
                .is_some_and(|rest| rest.starts_with('/'))
        {
            return if action == Action::Pull {
                Ok(())
            } else {
                Err(AuthError::Denied)
            };
        }
        let app = self
            .store
            .app(repository)
            .ok()
            .flatten()
            .ok_or(AuthError::Denied)?;
        if !caller.sees_app(&app) || (action != Action::Pull && caller.read_only) {
            return Err(AuthError::Denied);
        }
        Ok(())
    }
}
