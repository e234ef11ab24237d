//! Who is calling: bearer tokens checked against the token table.

use aloft_api::token::{Token, TokenError};

use crate::error::ApiError;
use std::sync::Arc;

use aloft_registry::{Action, AuthError, Authorizer};

use crate::store::{AppRow, Store, TokenRow};

/// The verified identity behind a request.
#[derive(Clone, Debug)]
pub struct Caller {
    pub token_id: String,
    pub org_id: String,
    pub kind: TokenKind,
    /// Apps this token is limited to; `None` = every app of the org.
    pub apps: Option<Vec<String>>,
    pub read_only: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenKind {
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
            "org" => Some(TokenKind::Org),
            "deploy" => Some(TokenKind::Deploy),
            "readonly" => Some(TokenKind::ReadOnly),
            "host" => Some(TokenKind::Host),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
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
    check(&row, &token, now_secs)
}

fn check(row: &TokenRow, token: &Token, now_secs: i64) -> Result<Caller, ApiError> {
    token
        .verify(&row.key)
        .map_err(|e: TokenError| ApiError::unauthorized(&format!("invalid token: {e}")))?;
    if row.revoked {
        return Err(ApiError::unauthorized("token has been revoked"));
    }
    if let Some(expiry) = token.expires_at() {
        if now_secs >= expiry {
            return Err(ApiError::unauthorized("token has expired"));
        }
    }
    let kind = TokenKind::parse(&row.kind)
        .ok_or_else(|| ApiError::unauthorized("invalid token: unknown kind"))?;
    Ok(Caller {
        token_id: row.id.clone(),
        org_id: row.org_id.clone(),
        kind,
        apps: token.allowed_apps(),
        read_only: token.read_only() || kind == TokenKind::ReadOnly,
    })
}

impl Caller {
    pub fn is_host(&self) -> bool {
        self.kind == TokenKind::Host
    }

    /// Whether the caller can see the app at all. Apps it cannot see answer 404, so a
    /// token never learns that another org's app exists.
    pub fn sees_app(&self, app: &AppRow) -> bool {
        if self.is_host() {
            return true;
        }
        if app.org_id != self.org_id {
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

    pub fn require_write(&self) -> Result<(), ApiError> {
        if self.read_only {
            Err(ApiError::forbidden("this token is read-only"))
        } else {
            Ok(())
        }
    }

    /// Creating apps and other org-wide writes need an org token without app caveats.
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
