//! `aloft logs`: an app's machine logs in flyctl's line format
//! (`<time> app[<machine id>] <region> [info] <line>`), or as JSON lines with `--json`;
//! streamed until Ctrl-C unless `--no-tail`.

use aloft_api::internal::LogLine;
use futures_util::StreamExt;

use crate::settings::ApiArgs;

#[derive(clap::Args, Debug)]
pub struct LogsArgs {
    #[arg(short = 'a', long = "app")]
    pub app: Option<String>,
    #[arg(short = 'c', long = "config")]
    pub config: Option<std::path::PathBuf>,
    /// Only this machine's logs.
    #[arg(short = 'i', long = "machine", alias = "instance")]
    pub machine: Option<String>,
    /// Only machines in this region.
    #[arg(short = 'r', long)]
    pub region: Option<String>,
    /// Print the recent lines and exit instead of following.
    #[arg(short = 'n', long)]
    pub no_tail: bool,
    /// One JSON object per line.
    #[arg(short = 'j', long)]
    pub json: bool,
}

/// One line as flyctl prints it.
pub fn format_line(line: &LogLine) -> String {
    let time = chrono::DateTime::parse_from_rfc3339(&line.timestamp)
        .map(|t| {
            t.with_timezone(&chrono::Utc)
                .format("%Y-%m-%dT%H:%M:%SZ")
                .to_string()
        })
        .unwrap_or_else(|_| line.timestamp.clone());
    let level = if line.level.is_empty() {
        "info"
    } else {
        line.level.as_str()
    };
    format!(
        "{time} app[{}] {} [{level}] {}",
        line.machine_id, line.region, line.message
    )
}

pub async fn run(api: &ApiArgs, app: &str, args: &LogsArgs) -> anyhow::Result<()> {
    let client = api.client()?;
    let mut query = vec![format!("follow={}", !args.no_tail)];
    if let Some(machine) = args.machine.as_deref().filter(|m| !m.is_empty()) {
        query.push(format!(
            "machine={}",
            aloft_client::encode_component(machine)
        ));
    }
    if let Some(region) = args.region.as_deref().filter(|r| !r.is_empty()) {
        query.push(format!("region={}", aloft_client::encode_component(region)));
    }
    let path = format!("{}/logs?{}", super::status::app_path(app), query.join("&"));
    let mut lines = client
        .lines::<()>(http::Method::GET, &path, None, &[])
        .await?;
    while let Some(line) = lines.next().await {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let Ok(entry) = serde_json::from_str::<LogLine>(&line) else {
            continue;
        };
        if args.json {
            println!("{}", serde_json::to_string(&entry)?);
        } else {
            println!("{}", format_line(&entry));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_look_like_flyctl() {
        let line = LogLine {
            timestamp: "2026-11-28T19:04:49.123456789Z".into(),
            app: "hello".into(),
            machine_id: "148ed193b95d89".into(),
            region: "iad".into(),
            stream: "stdout".into(),
            level: "info".into(),
            message: "hello: listening on 0.0.0.0:8080".into(),
        };
        assert_eq!(
            format_line(&line),
            "2026-11-28T19:04:49Z app[148ed193b95d89] iad [info] hello: listening on 0.0.0.0:8080"
        );
    }
}
