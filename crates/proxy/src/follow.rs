//! Following the control plane's catalog stream.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use aloft_api::internal::{CatalogApp, CatalogUpdate};

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

/// Applies one event's data (a `CatalogUpdate` as JSON) and returns its seq.
pub(crate) fn apply_event(proxy: &Proxy, data: &str) -> Result<u64, serde_json::Error> {
    let update: CatalogUpdate = serde_json::from_str(data)?;
    let seq = update_seq(&update);
    let extras = match &update {
        CatalogUpdate::Snapshot { apps, .. } => apps.iter().map(app_extras).collect(),
        CatalogUpdate::App { app, .. } => vec![app_extras(app)],
        _ => Vec::new(),
    };
    proxy.catalog.apply_with(update, extras);
    Ok(seq)
}

/// The app's public addresses and primary region.
fn app_extras(app: &CatalogApp) -> (String, AppExtras) {
    let ips = app
        .ips
        .iter()
        .filter_map(|ip| {
            let addr = ip.address.parse::<IpAddr>().ok()?;
            // Flycast (`private_v6`) addresses are routed like dedicated ones: the proxy
            // listens on them for the app's service ports; the host's packet filter keeps
            // them to the network the address is in.
            Some((addr, ip.kind.contains("shared")))
        })
        .collect();
    let extras = AppExtras {
        ips,
        primary_region: app.primary_region.clone().filter(|r| !r.is_empty()),
    };
    (app.name.clone(), extras)
}
