//! Following the control plane's catalog stream (`GET /v1/catalog/watch`, server-sent
//! events): every update is applied as it arrives; after a disconnect the stream resumes
//! from the last event id, or starts over from a snapshot.

use std::sync::Arc;
use std::time::Duration;

use aloft_api::internal::CatalogUpdate;
use aloft_client::Client;
use futures_util::StreamExt;

use crate::DnsServer;

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// The control plane sends a keepalive every 15 s; silence for longer means a dead stream.
const IDLE_LIMIT: Duration = Duration::from_secs(45);

/// One server-sent event being read.
#[derive(Default)]
pub struct EventReader {
    id: Option<u64>,
    data: String,
}

impl EventReader {
    /// Feeds one line; returns the event's (id, data) when the line ends an event.
    pub fn line(&mut self, line: &str) -> Option<(Option<u64>, String)> {
        if line.is_empty() {
            if self.data.is_empty() {
                return None;
            }
            let data = std::mem::take(&mut self.data);
            return Some((self.id.take(), data));
        }
        if let Some(id) = line.strip_prefix("id:") {
            self.id = id.trim().parse().ok();
        } else if let Some(data) = line.strip_prefix("data:") {
            if !self.data.is_empty() {
                self.data.push('\n');
            }
            self.data.push_str(data.strip_prefix(' ').unwrap_or(data));
        }
        None
    }
}

pub(crate) async fn follow(dns: Arc<DnsServer>, control_url: String, token: String) {
    let client = Client::new(&control_url, Some(token));
    let mut last_seen: Option<u64> = None;
    let mut backoff = BACKOFF_MIN;
    loop {
        let resume = last_seen.map(|seq| seq.to_string());
        let headers: Vec<(&str, &str)> = resume
            .as_deref()
            .map(|seq| vec![("last-event-id", seq)])
            .unwrap_or_default();
        match client
            .lines::<()>(http::Method::GET, "/v1/catalog/watch", None, &headers)
            .await
        {
            Ok(mut lines) => {
                tracing::info!(resume_from = ?last_seen, "DNS following the catalog");
                let mut reader = EventReader::default();
                loop {
                    let line = match tokio::time::timeout(IDLE_LIMIT, lines.next()).await {
                        Ok(Some(Ok(line))) => line,
                        Ok(Some(Err(err))) => {
                            tracing::warn!(error = %err, "catalog stream failed");
                            break;
                        }
                        Ok(None) => break,
                        Err(_) => {
                            tracing::warn!("catalog stream went silent; reconnecting");
                            break;
                        }
                    };
                    let Some((id, data)) = reader.line(&line) else {
                        continue;
                    };
                    backoff = BACKOFF_MIN;
                    match serde_json::from_str::<CatalogUpdate>(&data) {
                        Ok(update) => {
                            let seq = id.unwrap_or_else(|| update_seq(&update));
                            dns.apply(update);
                            last_seen = Some(seq);
                        }
                        Err(err) => {
                            tracing::warn!(error = %err, "ignoring an unreadable catalog event")
                        }
                    }
                }
            }
            Err(err) => tracing::warn!(error = %err, "cannot open the catalog stream"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

fn update_seq(update: &CatalogUpdate) -> u64 {
    match update {
        CatalogUpdate::Snapshot { seq, .. }
        | CatalogUpdate::App { seq, .. }
        | CatalogUpdate::AppRemoved { seq, .. }
        | CatalogUpdate::Machine { seq, .. }
        | CatalogUpdate::MachineRemoved { seq, .. } => *seq,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_end_at_blank_lines() {
        let mut reader = EventReader::default();
        assert_eq!(reader.line(": keepalive"), None);
        assert_eq!(reader.line(""), None);
        assert_eq!(reader.line("id: 7"), None);
        assert_eq!(reader.line("data: {\"a\":1}"), None);
        assert_eq!(reader.line(""), Some((Some(7), "{\"a\":1}".to_string())));
        assert_eq!(reader.line("data:x"), None);
        assert_eq!(reader.line(""), Some((None, "x".to_string())));
    }
}
