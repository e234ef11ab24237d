//! `aloft secrets set|unset|import|list|deploy`: app secrets, stored sealed by the control
//! plane and rolled out to every machine as a new release unless `--stage` is given.
//! `aloft secrets rotate-key`: the operator re-seals every app's data key under a new root
//! key.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;

use aloft_api::secrets::{ListSecretsResponse, RotateKeyResponse, SetSecretsRequest};
use aloft_client::ClientError;
use anyhow::{Context, bail};
use clap::{Args, Subcommand};

use super::deploy::Watched;

use crate::output::{table, when};
use crate::settings::ApiArgs;

#[derive(Args, Debug, Clone)]
pub struct AppArgs {
    /// The app (default: `app` in the config file).
    #[arg(short = 'a', long = "app")]
    pub app: Option<String>,
    /// Path to the app's config file, or a directory holding fly.toml.
    #[arg(short = 'c', long = "config")]
    pub config: Option<PathBuf>,
}

#[derive(Args, Debug, Clone)]
pub struct RolloutArgs {
    /// Only store the change; machines get it when next started or updated
    /// (`aloft secrets deploy` rolls it out).
    #[arg(long)]
    pub stage: bool,
    /// Start the rollout and return without following it.
    #[arg(long)]
    pub detach: bool,
}

#[derive(Subcommand, Debug)]
pub enum SecretsCommand {
    /// Set one or more secrets (NAME=VALUE ...) and roll them out.
    Set {
        #[command(flatten)]
        app: AppArgs,
        #[command(flatten)]
        rollout: RolloutArgs,
        /// NAME=VALUE pairs.
        #[arg(required = true, value_name = "NAME=VALUE")]
        pairs: Vec<String>,
    },
    /// Remove one or more secrets and roll the change out.
    Unset {
        #[command(flatten)]
        app: AppArgs,
        #[command(flatten)]
        rollout: RolloutArgs,
        #[arg(required = true, value_name = "NAME")]
        names: Vec<String>,
    },
    /// Set secrets from NAME=VALUE lines on stdin (multi-line values in quotes).
    Import {
        #[command(flatten)]
        app: AppArgs,
        #[command(flatten)]
        rollout: RolloutArgs,
    },
    /// List the app's secrets: names, digests, when set, and whether machines have them.
    #[command(alias = "ls")]
    List {
        #[command(flatten)]
        app: AppArgs,
        #[arg(short = 'j', long)]
        json: bool,
    },
    /// Roll staged secrets out to every machine with the current release.
    Deploy {
        #[command(flatten)]
        app: AppArgs,
        /// Start the rollout and return without following it.
        #[arg(long)]
        detach: bool,
    },
    /// Re-encrypt every app's data key under a new root key (platform operators).
    ///
    /// The old root key is no longer needed afterwards; machines keep running. Needs the
    /// admin token `aloft server` saved.
    RotateKey,
}

fn secrets_path(app: &str) -> String {
    format!("/v1/apps/{}/secrets", aloft_client::encode_component(app))
}

/// Runs a secrets command; `resolve` turns `-a`/`-c` into the app's name.
pub async fn run(
    api: &ApiArgs,
    command: SecretsCommand,
    resolve: impl Fn(&AppArgs) -> anyhow::Result<String>,
) -> anyhow::Result<()> {
    match command {
        SecretsCommand::Set {
            app,
            rollout,
            pairs,
        } => {
            let app = resolve(&app)?;
            let values = parse_pairs(&pairs)?;
            change(api, &app, values, &rollout).await
        }
        SecretsCommand::Unset {
            app,
            rollout,
            names,
        } => {
            let app = resolve(&app)?;
            let values = names.into_iter().map(|name| (name, None)).collect();
            change(api, &app, values, &rollout).await
        }
        SecretsCommand::Import { app, rollout } => {
            let app = resolve(&app)?;
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("reading NAME=VALUE lines from stdin")?;
            let values = parse_import(&text)?;
            if values.is_empty() {
                bail!("stdin held no NAME=VALUE lines: nothing to import");
            }
            change(api, &app, values, &rollout).await
        }
        SecretsCommand::List { app, json } => {
            let app = resolve(&app)?;
            list(api, &app, json).await
        }
        SecretsCommand::Deploy { app, detach } => {
            let app = resolve(&app)?;
            follow_rollout(api, &app, detach).await
        }
        SecretsCommand::RotateKey => rotate_key(api).await,
    }
}

async fn rotate_key(api: &ApiArgs) -> anyhow::Result<()> {
    let rotated: RotateKeyResponse = api
        .client()?
        .post("/v1/secrets/rotate-key", &serde_json::json!({}))
        .await
        .map_err(|err| match err {
            ClientError::Api { message, .. } => {
                anyhow::anyhow!("rotating the secrets root key: {message}")
            }
            other => anyhow::Error::new(other).context("rotating the secrets root key"),
        })?;
    println!(
        "Re-encrypted {} app data key(s) under a new root key, kept by the server in {}. The old root key is no longer needed.",
        rotated.data_keys, rotated.key_file
    );
    Ok(())
}

/// `NAME=VALUE` arguments; the first `=` splits. Values never appear in errors.
pub fn parse_pairs(pairs: &[String]) -> anyhow::Result<BTreeMap<String, Option<String>>> {
    let mut values = BTreeMap::new();
    for pair in pairs {
        let Some((name, value)) = pair.split_once('=') else {
            bail!("{pair:?} is not NAME=VALUE: secrets are given as NAME=VALUE pairs");
        };
        if name.is_empty() {
            bail!("a NAME=VALUE pair has no name: secrets are given as NAME=VALUE pairs");
        }
        values.insert(name.to_string(), Some(value.to_string()));
    }
    Ok(values)
}

/// `secrets import` input: `NAME=VALUE` lines; blank lines and `#` comments are skipped,
/// `export ` before a name is allowed. A value in `"""` ... `"""` spans lines verbatim; one
/// in `"` ... `"` may span lines and knows `\n`, `\"` and `\\`; one in `'` ... `'` is
/// verbatim. Errors give line numbers and names, never values.
pub fn parse_import(text: &str) -> anyhow::Result<BTreeMap<String, Option<String>>> {
    let mut values = BTreeMap::new();
    let mut lines = text.split('\n').enumerate().peekable();
    while let Some((index, raw)) = lines.next() {
        let number = index + 1;
        let line = raw.strip_suffix('\r').unwrap_or(raw);
        let trimmed = line.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let entry = trimmed.strip_prefix("export ").unwrap_or(trimmed);
        let Some((name, rest)) = entry.split_once('=') else {
            bail!("stdin line {number}: expected NAME=VALUE");
        };
        let name = name.trim();
        if name.is_empty() {
            bail!("stdin line {number}: expected NAME=VALUE, but the name is empty");
        }
        let value = if let Some(start) = rest.strip_prefix("\"\"\"") {
            let mut value = String::new();
            let mut current = start.to_string();
            loop {
                if let Some(end) = current.find("\"\"\"") {
                    value.push_str(&current[..end]);
                    break;
                }
                value.push_str(&current);
                match lines.next() {
                    Some((_, next)) => {
                        value.push('\n');
                        current = next.strip_suffix('\r').unwrap_or(next).to_string();
                    }
                    None => bail!(
                        "stdin line {number}: the \"\"\"-quoted value of {name} is not closed"
                    ),
                }
            }
            value
        } else if let Some(start) = rest.strip_prefix('"') {
            let mut value = String::new();
            let mut current = start.to_string();
            'value: loop {
                let mut chars = current.chars();
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break 'value,
                        '\\' => match chars.next() {
                            Some('n') => value.push('\n'),
                            Some('r') => value.push('\r'),
                            Some('t') => value.push('\t'),
                            Some(other) => value.push(other),
                            None => value.push('\\'),
                        },
                        other => value.push(other),
                    }
                }
                match lines.next() {
                    Some((_, next)) => {
                        value.push('\n');
                        current = next.strip_suffix('\r').unwrap_or(next).to_string();
                    }
                    None => bail!("stdin line {number}: the quoted value of {name} is not closed"),
                }
            }
            value
        } else if let Some(start) = rest.strip_prefix('\'') {
            let mut value = String::new();
            let mut current = start.to_string();
            loop {
                if let Some(end) = current.find('\'') {
                    value.push_str(&current[..end]);
                    break;
                }
                value.push_str(&current);
                match lines.next() {
                    Some((_, next)) => {
                        value.push('\n');
                        current = next.strip_suffix('\r').unwrap_or(next).to_string();
                    }
                    None => bail!("stdin line {number}: the quoted value of {name} is not closed"),
                }
            }
            value
        } else {
            rest.to_string()
        };
        values.insert(name.to_string(), Some(value));
    }
    Ok(values)
}

fn explain(err: ClientError, api: &ApiArgs, app: &str) -> anyhow::Error {
    match err {
        ClientError::Api { status, message } if status == http::StatusCode::FORBIDDEN => {
            anyhow::anyhow!(
                "not allowed to change or list the secrets of {app}: {message} (a token with deploy rights on the app is needed)"
            )
        }
        // A 404 about a secret, not about the app.
        ClientError::Api { status, message }
            if status == http::StatusCode::NOT_FOUND && message.starts_with("secret ") =>
        {
            anyhow::anyhow!("{message}")
        }
        other => super::deploy::explain(other, &api.api_url().unwrap_or_default(), app),
    }
}

async fn change(
    api: &ApiArgs,
    app: &str,
    values: BTreeMap<String, Option<String>>,
    rollout: &RolloutArgs,
) -> anyhow::Result<()> {
    let client = api.client()?;
    let _: ListSecretsResponse = client
        .post(&secrets_path(app), &SetSecretsRequest { values })
        .await
        .map_err(|e| explain(e, api, app))?;
    if rollout.stage {
        println!(
            "Secrets are staged for the next deployment; roll them out with `aloft secrets deploy -a {app}`"
        );
        return Ok(());
    }
    follow_rollout(api, app, rollout.detach).await
}

/// Starts the rollout of the app's secrets and, unless detached, follows it to the end.
async fn follow_rollout(api: &ApiArgs, app: &str, detach: bool) -> anyhow::Result<()> {
    let client = api.client()?;
    let path = format!("{}:deploy", secrets_path(app));
    let lines = client
        .lines(http::Method::POST, &path, None::<&()>, &[])
        .await
        .map_err(|e| explain(e, api, app))?;
    match super::deploy::watch(lines, app, detach).await? {
        Watched::Done {
            release_version, ..
        } if release_version > 0 => {
            println!("Secrets are deployed: release v{release_version} of {app}")
        }
        Watched::Done { .. } => println!("Secrets are deployed"),
        Watched::Detached { release, .. } => println!(
            "The rollout{} goes on on the server; follow it with `aloft deploy --resume -a {app}` or check it with `aloft secrets list -a {app}`",
            release
                .map(|v| format!(" of release v{v}"))
                .unwrap_or_default()
        ),
    }
    Ok(())
}

async fn list(api: &ApiArgs, app: &str, json: bool) -> anyhow::Result<()> {
    let listing: ListSecretsResponse = api
        .client()?
        .get(&secrets_path(app))
        .await
        .map_err(|e| explain(e, api, app))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&listing.secrets)?);
        return Ok(());
    }
    let rows = listing
        .secrets
        .iter()
        .map(|s| {
            let marker = match s.status.as_str() {
                aloft_api::secrets::STATUS_STAGED => "* ",
                aloft_api::secrets::STATUS_PARTIAL => "! ",
                _ => "",
            };
            vec![
                format!("{marker}{}", s.name),
                s.digest.clone(),
                when(&s.created_at),
                s.status.clone(),
            ]
        })
        .collect();
    println!(
        "{}",
        table(&["NAME", "DIGEST", "CREATED AT", "STATUS"], rows)
    );
    if listing
        .secrets
        .iter()
        .any(|s| s.status != aloft_api::secrets::STATUS_DEPLOYED)
    {
        println!();
        println!(
            "* staged: on no machine yet; ! partial: on some machines. Roll them out with `aloft secrets deploy`."
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(pairs: &[(&str, &str)]) -> BTreeMap<String, Option<String>> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), Some(v.to_string())))
            .collect()
    }

    #[test]
    fn pairs_split_at_the_first_equals() {
        let parsed = parse_pairs(&["A=1".into(), "URL=pg://x?a=b".into(), "E=".into()]).unwrap();
        assert_eq!(parsed, set(&[("A", "1"), ("URL", "pg://x?a=b"), ("E", "")]));
        let err = parse_pairs(&["NOVALUE".into()]).unwrap_err().to_string();
        assert!(err.contains("\"NOVALUE\" is not NAME=VALUE"), "{err}");
        let err = parse_pairs(&["=hidden".into()]).unwrap_err().to_string();
        assert!(!err.contains("hidden"), "values stay out of errors: {err}");
    }

    #[test]
    fn import_reads_lines_comments_and_quoted_multiline_values() {
        let text = "# comment\n\nA=1\nexport B=two words\r\nC=\"line1\nline2\\n\\\"q\\\"\"\nD='a b # c'\nE=\"\"\"-----BEGIN-----\nabc\n-----END-----\"\"\"\nF=x=y\n";
        let parsed = parse_import(text).unwrap();
        assert_eq!(
            parsed,
            set(&[
                ("A", "1"),
                ("B", "two words"),
                ("C", "line1\nline2\n\"q\""),
                ("D", "a b # c"),
                ("E", "-----BEGIN-----\nabc\n-----END-----"),
                ("F", "x=y"),
            ])
        );
    }

    #[test]
    fn import_errors_give_lines_not_values() {
        let err = parse_import("A=1\nsecretvalue\n").unwrap_err().to_string();
        assert_eq!(err, "stdin line 2: expected NAME=VALUE");
        let err = parse_import("A=\"open\nstill open\n")
            .unwrap_err()
            .to_string();
        assert_eq!(err, "stdin line 1: the quoted value of A is not closed");
        let err = parse_import("K=\"\"\"x\n").unwrap_err().to_string();
        assert!(err.contains("value of K is not closed"), "{err}");
    }
}
