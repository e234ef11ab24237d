//! `aloft certs add|list|show|check|remove|import`: an app's hostnames and their TLS
//! certificates, with flyctl's names, flags and output.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use aloft_api::{App, Certificate, CreateCertificateRequest, ListCertificatesResponse};
use aloft_control::ips::ListIpAssignments;
use anyhow::Context;
use http::Method;

use crate::settings::ApiArgs;

#[derive(clap::Args, Debug, Clone)]
pub struct AppArgs {
    /// Application name.
    #[arg(short = 'a', long = "app")]
    app: Option<String>,
    /// Path to application configuration file.
    #[arg(short = 'c', long = "config")]
    config: Option<PathBuf>,
}

#[derive(clap::Subcommand, Debug)]
pub enum CertsCommand {
    /// List certificates for an app.
    #[command(alias = "ls")]
    List {
        #[command(flatten)]
        app: AppArgs,
        /// JSON output.
        #[arg(short = 'j', long)]
        json: bool,
    },
    /// Add a certificate for an app: the hostname is served by the app, and the platform
    /// gets a certificate for it from its ACME CA once DNS points at it.
    #[command(alias = "create")]
    Add {
        hostname: String,
        #[command(flatten)]
        app: AppArgs,
        /// JSON output.
        #[arg(short = 'j', long)]
        json: bool,
    },
    /// Shows certificate information.
    Show {
        hostname: String,
        #[command(flatten)]
        app: AppArgs,
        /// JSON output.
        #[arg(short = 'j', long)]
        json: bool,
    },
    /// Checks DNS configuration and where the certificate stands (as `show`).
    Check {
        hostname: String,
        #[command(flatten)]
        app: AppArgs,
        /// JSON output.
        #[arg(short = 'j', long)]
        json: bool,
    },
    /// Removes a certificate from an app.
    #[command(alias = "delete")]
    Remove {
        hostname: String,
        #[command(flatten)]
        app: AppArgs,
        /// Accept all confirmations.
        #[arg(short = 'y', long)]
        yes: bool,
    },
    /// Import a certificate of your own for a hostname (served instead of an ACME one).
    Import {
        hostname: String,
        #[command(flatten)]
        app: AppArgs,
        /// PEM file of the certificate chain, your certificate first.
        #[arg(long, value_name = "FILE")]
        fullchain: PathBuf,
        /// PEM file of the certificate's private key.
        #[arg(long, value_name = "FILE")]
        private_key: PathBuf,
        /// JSON output.
        #[arg(short = 'j', long)]
        json: bool,
    },
}

fn certificates_path(app: &str) -> String {
    format!(
        "/v1/apps/{}/certificates",
        aloft_client::encode_component(app)
    )
}

fn certificate_path(app: &str, hostname: &str) -> String {
    format!(
        "{}/{}",
        certificates_path(app),
        aloft_client::encode_component(hostname)
    )
}

/// Like flyctl's "humanize.Time": "5 minutes ago".
fn added(created_at: &str) -> String {
    let Ok(time) = chrono::DateTime::parse_from_rfc3339(created_at) else {
        return created_at.to_string();
    };
    let seconds = chrono::Utc::now()
        .signed_duration_since(time.with_timezone(&chrono::Utc))
        .num_seconds()
        .max(0);
    let (count, unit) = match seconds {
        s if s < 60 => {
            return if s <= 1 {
                "now".into()
            } else {
                format!("{s} seconds ago")
            };
        }
        s if s < 3600 => (s / 60, "minute"),
        s if s < 86_400 => (s / 3600, "hour"),
        s => (s / 86_400, "day"),
    };
    format!("{count} {unit}{} ago", if count == 1 { "" } else { "s" })
}

fn render_list(certificates: &[Certificate]) -> String {
    let mut out = format!("{:<25} {:<20} {}\n", "Host Name", "Added", "Status");
    for cert in certificates {
        out.push_str(&format!(
            "{:<25} {:<20} {}\n",
            cert.hostname,
            added(&cert.created_at),
            cert.client_status
        ));
    }
    out
}

fn render_certificate(cert: &Certificate) -> String {
    let mut out = if cert.client_status == "Ready" {
        format!("The certificate for {} has been issued.\n\n", cert.hostname)
    } else {
        format!(
            "The certificate for {} has not been issued yet.\n\n",
            cert.hostname
        )
    };
    let mut field = |label: &str, value: &str| {
        out.push_str(&format!("{label:<25} = {value}\n"));
    };
    field("Hostname", &cert.hostname);
    field("Status", &cert.client_status);
    field(
        "Certificate Authority",
        cert.certificate_authority.as_deref().unwrap_or_default(),
    );
    field("Expires", cert.expires_at.as_deref().unwrap_or_default());
    field("Added to App", &added(&cert.created_at));
    field("Source", &cert.source);
    if let Some(error) = &cert.error {
        field("Error", error);
    }
    out
}

/// The DNS record name of `hostname` in its zone: "@" for an apex (two labels), else the
/// labels before the last two.
fn record_name(hostname: &str) -> String {
    let labels: Vec<&str> = hostname.split('.').collect();
    if labels.len() <= 2 {
        "@".to_string()
    } else {
        labels[..labels.len() - 2].join(".")
    }
}

/// flyctl's next steps: how to point DNS at the app (its addresses, or a CNAME to its own
/// name), or that issuing is under way.
async fn next_steps(api: &ApiArgs, app: &str, cert: &Certificate) -> anyhow::Result<String> {
    let client = api.client()?;
    let mut out = String::from("\n");
    if cert.client_status == "Ready" {
        return Ok(out);
    }
    let ips: ListIpAssignments = client
        .get(&format!(
            "/v1/apps/{}/ip_assignments",
            aloft_client::encode_component(app)
        ))
        .await?;
    let info: App = client
        .get(&format!("/v1/apps/{}", aloft_client::encode_component(app)))
        .await?;
    let v4 = ips
        .ips
        .iter()
        .find(|ip| matches!(ip.kind.as_str(), "v4" | "shared_v4"));
    let v6 = ips.ips.iter().find(|ip| ip.kind == "v6");
    let name = record_name(&cert.hostname);
    out.push_str(&format!(
        "You are creating a certificate for {}\n",
        cert.hostname
    ));
    if !no_acme(cert) {
        out.push_str(
            "We are using the platform's ACME certificate authority for this certificate.\n\n",
        );
    }
    out.push_str(
        "You can direct traffic to your application by adding records to your DNS provider.\n\n",
    );
    out.push_str("Choose your DNS setup:\n\n");
    out.push_str("1. A and AAAA records (recommended for direct connections)\n\n");
    match v4 {
        Some(ip) => out.push_str(&format!("   A    {name} → {}\n", ip.ip)),
        None => out.push_str(
            "   No IPv4 addresses are allocated for your application.\n   Run: aloft ips allocate-v4 --shared to allocate a shared IPv4 address\n",
        ),
    }
    match v6 {
        Some(ip) => out.push_str(&format!("   AAAA {name} → {}\n", ip.ip)),
        None => out.push_str(
            "\n   No IPv6 addresses are allocated for your application.\n   Run: aloft ips allocate-v6 to allocate a dedicated IPv6 address\n",
        ),
    }
    out.push('\n');
    if name != "@"
        && let Some(target) = info.hostname.filter(|h| !h.is_empty())
    {
        out.push_str("2. CNAME record\n\n");
        out.push_str(&format!("   CNAME {name} → {target}\n\n"));
    }
    out.push_str(&issuing_status(cert));
    Ok(out)
}

/// Whether the server said it has no ACME CA to issue this hostname's certificate: an
/// ACME hostname on which nothing was tried, with a reason.
fn no_acme(cert: &Certificate) -> bool {
    cert.source == "acme" && cert.status == "pending" && cert.error.is_some()
}

/// The last line of the next steps: where issuing the certificate stands.
fn issuing_status(cert: &Certificate) -> String {
    match &cert.error {
        Some(reason) if no_acme(cert) => format!("{}\n", upper_first(reason)),
        Some(error) => format!("The last attempt to issue it failed: {error}\n"),
        None => format!(
            "Your certificate for {} is being issued. Status is {}.\n",
            cert.hostname, cert.client_status
        ),
    }
}

fn upper_first(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

fn read_pem(path: &Path, flag: &str) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {flag} {}", path.display()))
}

async fn show(api: &ApiArgs, app: &str, cert: Certificate, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(&cert)?);
        return Ok(());
    }
    print!("{}", render_certificate(&cert));
    if cert.client_status != "Ready" {
        print!("{}", next_steps(api, app, &cert).await?);
    }
    Ok(())
}

pub async fn run(api: &ApiArgs, command: CertsCommand) -> anyhow::Result<()> {
    let client = api.client()?;
    let name = |app: &AppArgs| crate::app_name(app.app.clone(), app.config.as_deref());
    match command {
        CertsCommand::List { app, json } => {
            let app = name(&app)?;
            let list: ListCertificatesResponse = client.get(&certificates_path(&app)).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list.certificates)?);
            } else {
                print!("{}", render_list(&list.certificates));
            }
        }
        CertsCommand::Add {
            hostname,
            app,
            json,
        } => {
            let app = name(&app)?;
            let request = CreateCertificateRequest {
                hostname,
                ..CreateCertificateRequest::default()
            };
            let cert: Certificate = client
                .post(&format!("{}/acme", certificates_path(&app)), &request)
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&cert)?);
            } else {
                print!("{}", next_steps(api, &app, &cert).await?);
            }
        }
        CertsCommand::Show {
            hostname,
            app,
            json,
        } => {
            let app = name(&app)?;
            let cert: Certificate = client.get(&certificate_path(&app, &hostname)).await?;
            show(api, &app, cert, json).await?;
        }
        CertsCommand::Check {
            hostname,
            app,
            json,
        } => {
            let app = name(&app)?;
            let cert: Certificate = client
                .post(
                    &format!("{}/check", certificate_path(&app, &hostname)),
                    &serde_json::json!({}),
                )
                .await?;
            show(api, &app, cert, json).await?;
        }
        CertsCommand::Remove { hostname, app, yes } => {
            let app = name(&app)?;
            if !yes {
                if !std::io::stdin().is_terminal() {
                    anyhow::bail!(
                        "removing the certificate for {hostname} needs confirmation; pass --yes"
                    );
                }
                print!("? Remove certificate {hostname} from app {app}? (y/N) ");
                std::io::stdout().flush()?;
                let mut answer = String::new();
                std::io::stdin().read_line(&mut answer)?;
                if !matches!(answer.trim(), "y" | "Y" | "yes") {
                    return Ok(());
                }
            }
            client
                .call::<()>(Method::DELETE, &certificate_path(&app, &hostname), None)
                .await?;
            println!("Certificate {hostname} deleted from app {app}");
        }
        CertsCommand::Import {
            hostname,
            app,
            fullchain,
            private_key,
            json,
        } => {
            let app = name(&app)?;
            let request = CreateCertificateRequest {
                hostname,
                fullchain: Some(read_pem(&fullchain, "--fullchain")?),
                private_key: Some(read_pem(&private_key, "--private-key")?),
            };
            let cert: Certificate = client
                .post(&format!("{}/custom", certificates_path(&app)), &request)
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&cert)?);
            } else {
                println!("Certificate imported for {}\n", cert.hostname);
                print!("{}", render_certificate(&cert));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_acme_the_next_steps_say_so_instead_of_being_issued() {
        let pending = Certificate {
            hostname: "www.example.com".into(),
            source: "acme".into(),
            status: "pending".into(),
            client_status: "Awaiting configuration".into(),
            ..Certificate::default()
        };
        let issuing = issuing_status(&pending);
        assert!(issuing.contains("is being issued"), "{issuing}");
        let no_acme = Certificate {
            error: Some(aloft_control::certs::no_acme_reason("www.example.com")),
            ..pending.clone()
        };
        let text = issuing_status(&no_acme);
        assert!(!text.contains("being issued"), "{text}");
        assert!(
            text.starts_with("No ACME certificate authority is configured on this server")
                && text.contains("aloft certs import")
                && text.contains("--acme-directory"),
            "{text}"
        );
        let failed = Certificate {
            status: "failed".into(),
            error: Some("DNS points elsewhere".into()),
            ..pending
        };
        assert_eq!(
            issuing_status(&failed),
            "The last attempt to issue it failed: DNS points elsewhere\n"
        );
    }

    #[test]
    fn record_names_are_relative_to_the_zone() {
        assert_eq!(record_name("example.com"), "@");
        assert_eq!(record_name("www.example.com"), "www");
        assert_eq!(record_name("a.b.example.com"), "a.b");
    }

    #[test]
    fn the_list_has_flyctls_columns() {
        let list = render_list(&[Certificate {
            hostname: "www.example.com".into(),
            client_status: "Awaiting configuration".into(),
            created_at: "not a time".into(),
            ..Certificate::default()
        }]);
        let mut lines = list.lines();
        assert_eq!(
            lines.next(),
            Some("Host Name                 Added                Status")
        );
        assert_eq!(
            lines.next(),
            Some("www.example.com           not a time           Awaiting configuration")
        );
    }
}
