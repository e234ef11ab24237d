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

/// Reads the token from an `Authorization` header value.
pub fn authenticate(
    store: &Store,
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
    let mut caller = check(&row, &token, now_secs)?;
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

fn check(row: &TokenRow, token: &Token, now_secs: i64) -> Result<Caller, ApiError> {
    token
        .verify(&row.key)
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

    pub fn require_host(&self) -> Result<(), ApiError> {
        if self.is_host() {
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
    /// Repositories under this prefix are pulled through from an upstream registry
    /// (public base images): any valid token may pull them; only hosts may write.
    pull_through_prefix: Option<String>,
}

impl RegistryAuth {
    pub fn new(store: Arc<Store>) -> Self {
        Self {
            store,
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
        let caller = authenticate(&self.store, Some(token), chrono::Utc::now().timestamp())
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
