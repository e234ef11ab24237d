//! Following the control plane's catalog stream.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use aloft_api::internal::CatalogUpdate;

use crate::Proxy;
use crate::catalog::AppExtras;
use crate::control::update_seq;

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

pub(crate) async fn follow(proxy: Arc<Proxy>) {
    let Some(client) = proxy.control.clone() else {
        tracing::error!(url = %proxy.config.control_url, "cannot follow the catalog: bad control URL");
        return;
    };
    let mut last_seq: Option<u64> = None;
    let mut backoff = BACKOFF_MIN;
    loop {
        match client.watch(last_seq).await {
            Ok(mut stream) => {
                tracing::info!(resume_from = ?last_seq, "following the catalog");
                loop {
                    match stream.next().await {
                        Ok(Some(event)) => {
                            backoff = BACKOFF_MIN;
                            if event.data.is_empty() {
                                continue;
                            }
                            match apply_event(&proxy, &event.data) {
                                Ok(seq) => {
                                    let id_seq = event
                                        .id
                                        .as_deref()
                                        .and_then(|id| id.trim().parse::<u64>().ok());
                                    last_seq = Some(id_seq.unwrap_or(seq));
                                }
                                Err(e) => tracing::warn!(error = %e, "ignoring a catalog event"),
                            }
                        }
                        Ok(None) => {
                            tracing::info!("catalog stream ended");
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "catalog stream failed");
                            break;
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot open the catalog stream"),
        }
        let jitter =
            Duration::from_millis(rand::random::<u64>() % (backoff.as_millis() as u64 / 2 + 1));
        tokio::time::sleep(backoff + jitter).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// Applies one event's data (a `CatalogUpdate` as JSON) and returns its seq. Fields the
/// api types do not (yet) carry are read from the raw JSON: an app's `ips` and
/// `primary_region`, a machine's `checks`.
pub(crate) fn apply_event(proxy: &Proxy, data: &str) -> Result<u64, serde_json::Error> {
    let raw: serde_json::Value = serde_json::from_str(data)?;
    let update: CatalogUpdate = serde_json::from_value(raw.clone())?;
    let seq = update_seq(&update);
    let mut extras = Vec::new();
    let mut health = Vec::new();
    match raw.get("type").and_then(|t| t.as_str()) {
        Some("snapshot") => {
            for app in raw
                .get("apps")
                .and_then(|a| a.as_array())
                .into_iter()
                .flatten()
            {
                extras.push(app_extras(app));
            }
            for machine in raw
                .get("machines")
                .and_then(|a| a.as_array())
                .into_iter()
                .flatten()
            {
                health.push(machine_health(machine));
            }
        }
        Some("app") => {
            if let Some(app) = raw.get("app") {
                extras.push(app_extras(app));
            }
        }
        Some("machine") => {
            if let Some(machine) = raw.get("machine") {
                health.push(machine_health(machine));
            }
        }
        _ => {}
    }
    let extras: Vec<(String, AppExtras)> = extras.into_iter().flatten().collect();
    let health: Vec<(String, bool)> = health.into_iter().flatten().collect();
    proxy.catalog.apply_with(update, extras, health);
    Ok(seq)
}

fn app_extras(app: &serde_json::Value) -> Option<(String, AppExtras)> {
    let name = app.get("name")?.as_str()?.to_string();
    let mut extras = AppExtras::default();
    for ip in app
        .get("ips")
        .and_then(|v| v.as_array())
        .into_iter()
        .flatten()
    {
        let (address, kind) = match ip {
            serde_json::Value::String(s) => (s.as_str(), ""),
            other => (
                other.get("address").and_then(|a| a.as_str()).unwrap_or(""),
                other.get("type").and_then(|a| a.as_str()).unwrap_or(""),
            ),
        };
        let Ok(addr) = address.parse::<IpAddr>() else {
            continue;
        };
        // Flycast (`private_v6`) addresses are routed like dedicated ones: the proxy
        // listens on them for the app's service ports; the host's packet filter keeps
        // them to the network the address is in.
        let shared = kind.contains("shared");
        extras.ips.push((addr, shared));
    }
    extras.primary_region = app
        .get("primary_region")
        .and_then(|v| v.as_str())
        .map(str::to_string);
    Some((name, extras))
}

/// Health from the service-level checks (`servicecheck-*`): any `critical` is unhealthy.
fn machine_health(machine: &serde_json::Value) -> Option<(String, bool)> {
    let id = machine.get("id")?.as_str()?.to_string();
    let checks = machine.get("checks")?.as_array()?;
    let healthy = !checks.iter().any(|c| {
        let name = c.get("name").and_then(|n| n.as_str()).unwrap_or("");
        let status = c.get("status").and_then(|n| n.as_str()).unwrap_or("");
        name.starts_with("servicecheck-") && status == "critical"
    });
    Some((id, healthy))
}
