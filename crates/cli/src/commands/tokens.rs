//! `aloft tokens create org|deploy|readonly|host`, `tokens list`, `tokens revoke`, and
//! `tokens attenuate`, which narrows a token offline (no server involved).

use aloft_api::token::{Caveat, Token};
use aloft_api::{CreateTokenRequest, CreateTokenResponse, ListTokensResponse, TokenInfo};
use aloft_client::encode_component;
use anyhow::{Context, bail};
use http::Method;

use crate::output::table;
use crate::settings::ApiArgs;

#[derive(clap::Subcommand, Debug)]
pub enum TokensCommand {
    /// Create a token.
    Create {
        #[command(subcommand)]
        kind: CreateKind,
    },
    /// List the tokens of your organizations.
    #[command(alias = "ls")]
    List {
        #[arg(short = 'j', long)]
        json: bool,
    },
    /// Revoke tokens by ID.
    Revoke {
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Narrow a token offline: limit it to an app, to reading, or to a time.
    Attenuate {
        /// The token to narrow (default: the one in use).
        #[arg(long = "token")]
        token: Option<String>,
        /// Only this app (repeatable).
        #[arg(short = 'a', long = "app")]
        apps: Vec<String>,
        /// No writes.
        #[arg(long)]
        read_only: bool,
        /// Expires after this long (Go duration: 1h, 30m).
        #[arg(short = 'x', long)]
        expiry: Option<String>,
    },
}

#[derive(clap::Args, Debug, Clone)]
pub struct CreateFlags {
    /// The token's name.
    #[arg(short = 'n', long)]
    name: Option<String>,
    /// How long it lasts (Go duration, default 175200h).
    #[arg(short = 'x', long)]
    expiry: Option<String>,
    /// Print the token's details as JSON.
    #[arg(short = 'j', long)]
    json: bool,
}

#[derive(clap::Subcommand, Debug)]
pub enum CreateKind {
    /// Full access to one organization.
    Org {
        #[arg(short = 'o', long)]
        org: Option<String>,
        #[command(flatten)]
        flags: CreateFlags,
    },
    /// Deploy access to one app.
    Deploy {
        #[arg(short = 'a', long = "app")]
        app: Option<String>,
        #[arg(short = 'c', long = "config")]
        config: Option<std::path::PathBuf>,
        #[command(flatten)]
        flags: CreateFlags,
    },
    /// Read-only access to one organization (or one app with -a).
    Readonly {
        #[arg(short = 'o', long)]
        org: Option<String>,
        #[arg(short = 'a', long = "app")]
        app: Option<String>,
        #[command(flatten)]
        flags: CreateFlags,
    },
    /// A host's join token for `aloft agent --token` (the operator's admin token only);
    /// it becomes the token of the first host that joins with it.
    Host {
        /// The token's name.
        #[arg(short = 'n', long)]
        name: Option<String>,
        /// Print the token's details as JSON.
        #[arg(short = 'j', long)]
        json: bool,
    },
}

pub async fn run(api: &ApiArgs, command: TokensCommand) -> anyhow::Result<()> {
    match command {
        TokensCommand::Create { kind } => {
            let (kind, org, app, flags) = match kind {
                CreateKind::Org { org, flags } => ("org", org, None, flags),
                CreateKind::Deploy { app, config, flags } => (
                    "deploy",
                    None,
                    Some(crate::app_name(app, config.as_deref())?),
                    flags,
                ),
                CreateKind::Readonly { org, app, flags } => ("readonly", org, app, flags),
                CreateKind::Host { name, json } => (
                    "host",
                    None,
                    None,
                    CreateFlags {
                        name,
                        expiry: None,
                        json,
                    },
                ),
            };
            let request = CreateTokenRequest {
                kind: kind.into(),
                name: flags.name.clone(),
                org_slug: org,
                app_name: app,
                expiry: flags.expiry.clone(),
            };
            let created: CreateTokenResponse = api
                .client()?
                .post("/v1/tokens", &request)
                .await
                .context("creating the token")?;
            if flags.json {
                println!("{}", serde_json::to_string_pretty(&created)?);
            } else {
                println!("{}", created.token);
            }
        }
        TokensCommand::List { json } => {
            let list: ListTokensResponse = api.client()?.get("/v1/tokens").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list.tokens)?);
                return Ok(());
            }
            let rows = list
                .tokens
                .iter()
                .map(|t: &TokenInfo| {
                    vec![
                        t.id.clone(),
                        t.name.clone(),
                        t.kind.clone(),
                        t.org_slug.clone(),
                        t.apps.join(","),
                        t.created_at.clone(),
                        t.expires_at.clone().unwrap_or_default(),
                        if t.revoked {
                            "revoked".into()
                        } else {
                            String::new()
                        },
                    ]
                })
                .collect();
            println!(
                "{}",
                table(
                    &[
                        "ID",
                        "NAME",
                        "TYPE",
                        "ORG",
                        "APPS",
                        "CREATED AT",
                        "EXPIRES AT",
                        "REVOKED"
                    ],
                    rows
                )
            );
        }
        TokensCommand::Revoke { ids } => {
            let client = api.client()?;
            for id in ids {
                client
                    .call::<()>(
                        Method::DELETE,
                        &format!("/v1/tokens/{}", encode_component(&id)),
                        None,
                    )
                    .await
                    .with_context(|| format!("revoking token {id}"))?;
                println!("Revoked {id}");
            }
        }
        TokensCommand::Attenuate {
            token,
            apps,
            read_only,
            expiry,
        } => {
            let text = match token {
                Some(token) => token,
                None => api.token()?,
            };
            let mut token =
                Token::decode(&text).map_err(|e| anyhow::anyhow!("cannot read the token: {e}"))?;
            if !apps.is_empty() {
                token = token.attenuate(Caveat::Apps(apps));
            }
            if read_only {
                token = token.attenuate(Caveat::ReadOnly);
            }
            if let Some(expiry) = expiry {
                let duration = aloft_api::Duration::parse(&expiry)
                    .map_err(|e| anyhow::anyhow!("invalid --expiry {expiry:?}: {e}"))?;
                if duration.as_secs() <= 0 {
                    bail!("invalid --expiry {expiry:?}: must be at least 1s, such as 30m or 1h");
                }
                token = token.attenuate(Caveat::ExpiresAt(
                    chrono::Utc::now().timestamp() + duration.as_secs(),
                ));
            }
            println!("{}", token.encode());
        }
    }
    Ok(())
}
