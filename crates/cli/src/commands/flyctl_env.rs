//! `aloft flyctl-env`: the environment that points the real flyctl at this Aloft
//! (`eval "$(aloft flyctl-env)"`), and keeps it from calling Fly's own services.

use crate::commands::deploy::registry_host;
use crate::settings::ApiArgs;

/// Nothing listens on port 9 (discard) of the loopback address: flyctl's traces go nowhere.
const NO_TRACE_COLLECTOR: &str = "127.0.0.1:9";

/// The `NAME=VALUE` pairs, in the order printed.
pub fn variables(api_url: &str, token: &str) -> Vec<(&'static str, String)> {
    vec![
        // GraphQL at /graphql and logs at /api/v1/apps/{app}/logs.
        ("FLY_API_BASE_URL", api_url.to_string()),
        // The Machines API, which Aloft serves at /v1.
        ("FLY_FLAPS_BASE_URL", api_url.to_string()),
        // Organizations and releases REST under /api/v1.
        ("FLY_UIEX_BASE_URL", api_url.to_string()),
        ("FLY_REGISTRY_HOST", registry_host(api_url)),
        // fly-go sends a token whose prefix is not fm1r/fm1a/fm2 as `Bearer`, which Aloft
        // accepts as it is sent (Aloft's tokens start with fm1_).
        ("FLY_ACCESS_TOKEN", token.to_string()),
        ("FLY_API_TOKEN", token.to_string()),
        ("FLY_TRACE_COLLECTOR_URL", NO_TRACE_COLLECTOR.to_string()),
        ("FLY_SEND_METRICS", "0".to_string()),
        ("FLY_NO_UPDATE_CHECK", "1".to_string()),
        ("FLY_NO_INCIDENTS_CHECK", "1".to_string()),
    ]
}

pub fn run(api: &ApiArgs) -> anyhow::Result<()> {
    let api_url = api.api_url()?;
    let token = api.token()?;
    for (name, value) in variables(&api_url, &token) {
        println!("export {name}={}", shell_words::quote(&value));
    }
    Ok(())
}
