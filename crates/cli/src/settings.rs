//! Where the CLI finds the API and its token: flags, environment, then
//! `~/.config/aloft/config.toml` (written by `aloft server` on start).

use std::path::PathBuf;

use aloft_client::Client;
use anyhow::Context;
use serde::{Deserialize, Serialize};

pub const DEFAULT_API_URL: &str = "http://127.0.0.1:4280";

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Settings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_token: Option<String>,
}

pub fn config_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("XDG_CONFIG_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir).join("aloft"));
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .context("HOME is not set; cannot find ~/.config/aloft")?;
    Ok(PathBuf::from(home).join(".config").join("aloft"))
}

pub fn cache_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir).join("aloft"));
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .context("HOME is not set; cannot find ~/.cache/aloft")?;
    Ok(PathBuf::from(home).join(".cache").join("aloft"))
}

fn settings_path() -> anyhow::Result<PathBuf> {
    Ok(config_dir()?.join("config.toml"))
}

impl Settings {
    pub fn load() -> anyhow::Result<Self> {
        let path = settings_path()?;
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                toml::from_str(&text).with_context(|| format!("reading {}", path.display()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Writes the settings with mode 0600 (the file holds a token).
    pub fn save(&self) -> anyhow::Result<PathBuf> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = settings_path()?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let text = toml::to_string(self).context("encoding settings")?;
        let temp = path.with_extension("toml.tmp");
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&temp)
            .with_context(|| format!("writing {}", temp.display()))?;
        file.write_all(text.as_bytes())
            .with_context(|| format!("writing {}", temp.display()))?;
        std::fs::rename(&temp, &path).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }
}

/// Global connection options shared by every client command.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct ApiArgs {
    /// Base URL of the Aloft API.
    #[arg(long, global = true, env = "ALOFT_API_URL")]
    pub api_url: Option<String>,
    /// Access token (default: the one `aloft server` saved in ~/.config/aloft).
    #[arg(
        short = 't',
        long,
        global = true,
        env = "FLY_ACCESS_TOKEN",
        hide_env_values = true
    )]
    pub access_token: Option<String>,
}

impl ApiArgs {
    pub fn api_url(&self) -> anyhow::Result<String> {
        if let Some(url) = &self.api_url {
            return Ok(url.trim_end_matches('/').to_string());
        }
        Ok(Settings::load()?
            .api_url
            .unwrap_or_else(|| DEFAULT_API_URL.to_string()))
    }

    pub fn token(&self) -> anyhow::Result<String> {
        if let Some(token) = self
            .access_token
            .clone()
            .or_else(|| std::env::var("FLY_API_TOKEN").ok())
            .filter(|t| !t.is_empty())
        {
            return Ok(token);
        }
        Settings::load()?
            .access_token
            .context("no access token: start `aloft server` (it saves one to ~/.config/aloft/config.toml) or pass --access-token")
    }

    pub fn client(&self) -> anyhow::Result<Client> {
        Ok(Client::new(&self.api_url()?, Some(self.token()?)))
    }
}
