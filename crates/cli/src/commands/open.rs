//! `aloft open [PATH]`: prints the app's URL and opens it in a browser when this session
//! has one (a graphical display and `xdg-open`), as `fly open` does.

use aloft_api::App;
use anyhow::Context;

use crate::settings::ApiArgs;

#[derive(clap::Args, Debug)]
pub struct OpenArgs {
    /// The path to open, e.g. /admin.
    pub path: Option<String>,
    #[arg(short = 'a', long = "app")]
    pub app: Option<String>,
    #[arg(short = 'c', long = "config")]
    pub config: Option<std::path::PathBuf>,
}

/// The app's URL with `path` appended.
fn url_with_path(base: &str, path: Option<&str>) -> String {
    let path = path.unwrap_or("").trim_start_matches('/');
    format!("{}/{path}", base.trim_end_matches('/'))
}

/// Whether a browser can be started here: a display, and `xdg-open` on the PATH.
fn can_open_browser() -> bool {
    let display = std::env::var_os("DISPLAY").is_some_and(|d| !d.is_empty())
        || std::env::var_os("WAYLAND_DISPLAY").is_some_and(|d| !d.is_empty());
    display
        && std::env::var_os("PATH").is_some_and(|paths| {
            std::env::split_paths(&paths).any(|dir| dir.join("xdg-open").is_file())
        })
}

pub async fn run(api: &ApiArgs, app: &str, args: &OpenArgs) -> anyhow::Result<()> {
    let client = api.client()?;
    let found: App = client
        .get(&format!("/v1/apps/{}", aloft_client::encode_component(app)))
        .await?;
    let base = found
        .app_url
        .clone()
        .or_else(|| found.hostname.as_ref().map(|h| format!("http://{h}/")))
        .with_context(|| format!("the API gave no URL for app {app}"))?;
    let url = url_with_path(&base, args.path.as_deref());
    println!("opening {url} ...");
    if can_open_browser() {
        std::process::Command::new("xdg-open")
            .arg(&url)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("starting xdg-open")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_join_the_url() {
        assert_eq!(
            url_with_path("http://a.localhost:8080/", Some("/admin")),
            "http://a.localhost:8080/admin"
        );
        assert_eq!(
            url_with_path("http://a.localhost:8080/", None),
            "http://a.localhost:8080/"
        );
    }
}
