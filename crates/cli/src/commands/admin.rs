//! `aloft admin token`: the operator's way back when the admin token is lost or revoked.
//! It reads the data dir directly (no API), so it is for root on the host only.

use std::path::PathBuf;

use anyhow::Context;

use crate::settings::Settings;

#[derive(clap::Subcommand, Debug)]
pub enum AdminCommand {
    /// Mint a new admin token from the data dir and revoke the previous one. Root only: it
    /// reads the control database and the secrets root key directly, with or without a
    /// server running. The token is printed and saved to this user's CLI settings.
    Token {
        /// The server's data dir.
        #[arg(long, env = "ALOFT_DATA_DIR")]
        data_dir: Option<PathBuf>,
        /// The server's PostgreSQL database, if it keeps its state there.
        #[arg(long, env = "ALOFT_DATABASE_URL", hide_env_values = true)]
        database_url: Option<String>,
    },
}

pub fn run(command: AdminCommand) -> anyhow::Result<()> {
    match command {
        AdminCommand::Token {
            data_dir,
            database_url,
        } => {
            if !nix::unistd::Uid::effective().is_root() {
                anyhow::bail!(
                    "`aloft admin token` must run as root: it reads the server's data dir (mode 0700) directly; run it with sudo on the host"
                );
            }
            let data_dir = data_dir.unwrap_or_else(super::server::default_data_dir);
            if !data_dir.join("control.db").exists() {
                anyhow::bail!(
                    "{} holds no Aloft state (no control.db); pass the server's --data-dir",
                    data_dir.display()
                );
            }
            let token = aloft_control::mint_admin_token(&aloft_control::DataDirAccess {
                data_dir,
                database_url,
            })
            .context("minting an admin token")?;
            let mut settings = Settings::load().unwrap_or_default();
            settings.access_token = Some(token.clone());
            let path = settings.save().context("saving the CLI settings")?;
            eprintln!(
                "A new admin token; the previous one is revoked. Saved to {}.",
                path.display()
            );
            println!("{token}");
            Ok(())
        }
    }
}
