//! `aloft releases` (also `aloft apps releases`): every deploy's release, newest first.

use aloft_api::internal::Release;

use crate::output::{table, when};
use crate::settings::ApiArgs;

pub async fn run(api: &ApiArgs, app: &str, image: bool, json: bool) -> anyhow::Result<()> {
    let client = api.client()?;
    let releases: Vec<Release> = client
        .get(&format!(
            "/v1/apps/{}/releases",
            aloft_client::encode_component(app)
        ))
        .await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&releases)?);
        return Ok(());
    }
    if releases.is_empty() {
        println!("No releases of {app} yet; `aloft deploy` makes one");
        return Ok(());
    }
    let mut headers = vec!["VERSION", "STATUS", "DESCRIPTION", "USER", "DATE"];
    if image {
        headers.push("DOCKER IMAGE");
    }
    let rows = releases
        .iter()
        .map(|r| {
            let mut row = vec![
                format!("v{}", r.version),
                r.status.clone(),
                r.description.clone(),
                r.user.clone(),
                when(&r.created_at),
            ];
            if image {
                row.push(r.image.clone());
            }
            row
        })
        .collect();
    println!("{}", table(&headers, rows));
    Ok(())
}
