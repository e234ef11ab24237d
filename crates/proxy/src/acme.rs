//! Certificates for every app hostname: fetched from the control plane, or issued by an
//! ACME CA (TLS-ALPN-01 preferred, HTTP-01 too) and stored back in the control plane;
//! renewed before expiry; dropped when the hostname goes away; failures back off.
//!
//! Control-plane endpoints used (bearer token of the proxy):
//! - `GET /v1/proxy/certificates/{hostname}` → `200 {"hostname", "certificate" (PEM chain),
//!   "private_key" (PEM)}` or `404` when the control plane holds none;
//! - `PUT /v1/proxy/certificates/{hostname}` with the same document, to store one this
//!   proxy obtained;
//! - `PUT /v1/proxy/certificates/{hostname}/status` with `{"state": "issuing"|"failed",
//!   "error"}`, so `aloft certs show` tells where an order stands.
//!
//! A stored certificate whose `source` is `custom` (imported by the user) is served as it
//! is and never replaced by an ACME order.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use instant_acme::{
    Account, AuthorizationStatus, ChallengeType, Identifier, NewAccount, NewOrder, OrderStatus,
    RetryPolicy,
};
use serde::{Deserialize, Serialize};

use crate::Proxy;
use crate::tls::{certified_key_from_pem, validity};

/// How the proxy talks to an ACME CA.
#[derive(Clone, Debug)]
pub struct AcmeConfig {
    /// The CA's directory URL (Let's Encrypt, or Pebble in tests).
    pub directory_url: String,
    /// `mailto:` contacts of the account.
    pub contact: Vec<String>,
    /// A PEM root that signs the CA's own HTTPS certificate (Pebble's); `None`: system roots.
    pub ca_root_pem: Option<PathBuf>,
    /// Renew when a certificate has less than this left (or a third of its lifetime).
    pub renew_before: Duration,
    /// Use HTTP-01 instead of TLS-ALPN-01.
    pub prefer_http01: bool,
    /// First retry delay after a failure (doubles up to an hour).
    pub retry_after: Duration,
}

impl Default for AcmeConfig {
    fn default() -> Self {
        AcmeConfig {
            directory_url: "https://acme-v02.api.letsencrypt.org/directory".to_string(),
            contact: Vec::new(),
            ca_root_pem: None,
            renew_before: Duration::from_secs(30 * 24 * 3600),
            prefer_http01: false,
            retry_after: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    #[error("ACME: {0}")]
    Acme(#[from] instant_acme::Error),
    #[error("ACME: {0}")]
    Other(String),
}

/// A certificate as stored in the control plane.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StoredCertificate {
    pub hostname: String,
    pub certificate: String,
    pub private_key: String,
    /// `acme` or `custom` (empty: `acme`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub source: String,
}

#[derive(Default)]
struct HostState {
    /// The app version whose certificates were last looked at.
    seen_version: Option<u64>,
    /// Fetch again from the control plane (the app was republished).
    refetch: bool,
    next_attempt: Option<Instant>,
    backoff: Duration,
    expires: Option<SystemTime>,
    issued: Option<SystemTime>,
}

/// Renew when less than `renew_before` is left, or less than a third of the certificate's
/// lifetime when that is shorter (short-lived certificates).
fn needs_renewal(state: &HostState, renew_before: Duration) -> bool {
    needs_renewal_at(state, renew_before, SystemTime::now())
}

fn needs_renewal_at(state: &HostState, renew_before: Duration, now: SystemTime) -> bool {
    let Some(expires) = state.expires else {
        return true;
    };
    let left = expires.duration_since(now).unwrap_or_default();
    let lifetime = state.issued.and_then(|i| expires.duration_since(i).ok());
    left < renew_before.min(lifetime.map(|l| l / 3).unwrap_or(renew_before))
}

pub(crate) async fn certificate_loop(proxy: Arc<Proxy>) {
    let states: Arc<Mutex<HashMap<String, HostState>>> = Arc::new(Mutex::new(HashMap::new()));
    let in_flight: Arc<Mutex<HashSet<String>>> = Arc::new(Mutex::new(HashSet::new()));
    let account: Arc<tokio::sync::Mutex<Option<Account>>> = Arc::new(tokio::sync::Mutex::new(None));
    let mut changes = proxy.catalog.subscribe();
    loop {
        let hostnames = proxy.catalog.hostnames_with_versions();
        let wanted: HashSet<String> = hostnames.iter().map(|(_, h, _)| h.clone()).collect();
        {
            let mut states = states.lock().unwrap_or_else(|p| p.into_inner());
            let gone: Vec<String> = states
                .keys()
                .filter(|h| !wanted.contains(*h))
                .cloned()
                .collect();
            for host in gone {
                states.remove(&host);
                proxy.catalog.remove_certificate(&host);
                tracing::info!(host, "hostname removed: certificate dropped");
            }
        }
        for (app, host, version) in hostnames {
            let due = {
                let mut states = states.lock().unwrap_or_else(|p| p.into_inner());
                let state = states.entry(host.clone()).or_default();
                // The app was republished (e.g. a certificate was added or replaced in
                // the control plane): look again now.
                if state.seen_version.is_some_and(|seen| seen != version) {
                    state.refetch = true;
                    state.next_attempt = None;
                }
                state.seen_version = Some(version);
                let renew_before = proxy
                    .config
                    .acme
                    .as_ref()
                    .map(|a| a.renew_before)
                    .unwrap_or_default();
                let needed =
                    !proxy.catalog.has_certificate(&host) || needs_renewal(state, renew_before);
                let due = (needed || state.refetch)
                    && state.next_attempt.is_none_or(|t| Instant::now() >= t);
                state.refetch = false;
                due.then_some(needed)
            };
            // `acme_allowed`: only a missing or expiring certificate goes to the CA; a
            // republished app only makes the proxy fetch from the control plane again.
            let Some(acme_allowed) = due else {
                continue;
            };
            if !in_flight
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(host.clone())
            {
                continue;
            }
            let (proxy, states, in_flight, account) = (
                proxy.clone(),
                states.clone(),
                in_flight.clone(),
                account.clone(),
            );
            tokio::spawn(async move {
                let result = obtain(&proxy, &app, &host, &account, acme_allowed).await;
                let mut states = states.lock().unwrap_or_else(|p| p.into_inner());
                let state = states.entry(host.clone()).or_default();
                match result {
                    Ok(Some((expires, issued))) => {
                        state.expires = Some(expires);
                        state.issued = issued;
                        state.backoff = Duration::ZERO;
                        state.next_attempt = None;
                    }
                    Ok(None) => {
                        // Nothing to get (no stored certificate, no ACME): look again later.
                        state.next_attempt = Some(Instant::now() + Duration::from_secs(30));
                    }
                    Err(e) => {
                        let first = proxy
                            .config
                            .acme
                            .as_ref()
                            .map(|a| a.retry_after)
                            .unwrap_or(Duration::from_secs(5));
                        state.backoff = if state.backoff.is_zero() {
                            first
                        } else {
                            (state.backoff * 2).min(Duration::from_secs(3600))
                        };
                        state.next_attempt = Some(Instant::now() + state.backoff);
                        tracing::warn!(host, error = %e, retry_in = ?state.backoff, "certificate not obtained");
                    }
                }
                in_flight
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&host);
            });
        }
        // Within a second of a catalog change (new hostname), and periodically for renewals.
        let _ = tokio::time::timeout(Duration::from_secs(1), changes.changed()).await;
    }
}

/// Gets a current certificate for `host`: the control plane's if it is still good, else a
/// new one from the ACME CA. Returns its expiry (and issue time when known).
async fn obtain(
    proxy: &Arc<Proxy>,
    app: &str,
    host: &str,
    account: &tokio::sync::Mutex<Option<Account>>,
    acme_allowed: bool,
) -> Result<Option<(SystemTime, Option<SystemTime>)>, AcmeError> {
    let renew_before = proxy
        .config
        .acme
        .as_ref()
        .map(|a| a.renew_before)
        .unwrap_or_default();
    if let Some(control) = &proxy.control {
        match control
            .get_json(&format!("/v1/proxy/certificates/{host}"))
            .await
        {
            Ok(value) => {
                if let Ok(stored) = serde_json::from_value::<StoredCertificate>(value) {
                    let installed = install(proxy, host, &stored.certificate, &stored.private_key);
                    if stored.source == "custom" {
                        // The user's own certificate: served as it is, never replaced.
                        return Ok(installed.map(|(issued, expires)| (expires, Some(issued))));
                    }
                    if let Some((issued, expires)) = installed {
                        let state = HostState {
                            expires: Some(expires),
                            issued: Some(issued),
                            ..HostState::default()
                        };
                        if proxy.config.acme.is_none() || !needs_renewal(&state, renew_before) {
                            return Ok(Some((expires, Some(issued))));
                        }
                    }
                }
            }
            Err(e) => tracing::debug!(host, error = %e, "no stored certificate"),
        }
    }
    let Some(config) = proxy.config.acme.as_ref().filter(|_| acme_allowed) else {
        return Ok(None);
    };
    report(proxy, host, "issuing", "").await;
    let issued = match issue(proxy, config, host, account).await {
        Ok((chain, key)) => install(proxy, host, &chain, &key)
            .map(|(_, expires)| (chain, key, expires))
            .ok_or_else(|| AcmeError::Other("the CA issued an unusable certificate".into())),
        Err(err) => Err(err),
    };
    let (chain, key, expires) = match issued {
        Ok(issued) => issued,
        Err(err) => {
            report(proxy, host, "failed", &err.to_string()).await;
            return Err(err);
        }
    };
    tracing::info!(app, host, "certificate issued");
    if let Some(control) = &proxy.control {
        let stored = StoredCertificate {
            hostname: host.to_string(),
            certificate: chain,
            private_key: key,
            source: String::new(),
        };
        let body = serde_json::to_value(&stored).unwrap_or_default();
        if let Err(e) = control
            .send_json(
                http::Method::PUT,
                &format!("/v1/proxy/certificates/{host}"),
                &body,
            )
            .await
        {
            tracing::warn!(host, error = %e, "could not store the certificate in the control plane");
        }
    }
    Ok(Some((expires, Some(SystemTime::now()))))
}

/// Installs a PEM certificate in the catalog; returns its validity (from, until).
fn install(proxy: &Proxy, host: &str, chain: &str, key: &str) -> Option<(SystemTime, SystemTime)> {
    let certified = certified_key_from_pem(chain, key).ok()?;
    let (issued, expires) = certified.cert.first().and_then(|c| validity(c.as_ref()))?;
    if expires <= SystemTime::now() {
        return None;
    }
    proxy.catalog.set_certificate(host, Arc::new(certified));
    Some((issued, expires))
}

/// Tells the control plane where an ACME order for `host` stands (`issuing`, `failed`),
/// for `aloft certs show`; a failure to tell is only logged.
async fn report(proxy: &Proxy, host: &str, state: &str, error: &str) {
    let Some(control) = &proxy.control else {
        return;
    };
    let body = serde_json::json!({ "state": state, "error": error });
    if let Err(e) = control
        .send_json(
            http::Method::PUT,
            &format!("/v1/proxy/certificates/{host}/status"),
            &body,
        )
        .await
    {
        tracing::debug!(host, error = %e, "could not report the certificate's state");
    }
}

async fn account_for(
    config: &AcmeConfig,
    slot: &tokio::sync::Mutex<Option<Account>>,
) -> Result<Account, AcmeError> {
    let mut slot = slot.lock().await;
    if let Some(account) = slot.as_ref() {
        return Ok(account.clone());
    }
    let builder = match &config.ca_root_pem {
        Some(path) => Account::builder_with_root(path)?,
        None => Account::builder()?,
    };
    let contact: Vec<&str> = config.contact.iter().map(String::as_str).collect();
    let (account, _credentials) = builder
        .create(
            &NewAccount {
                contact: &contact,
                terms_of_service_agreed: true,
                only_return_existing: false,
            },
            config.directory_url.clone(),
            None,
        )
        .await?;
    *slot = Some(account.clone());
    Ok(account)
}

/// Runs one ACME order for `host`; returns (PEM chain, PEM private key).
async fn issue(
    proxy: &Arc<Proxy>,
    config: &AcmeConfig,
    host: &str,
    account: &tokio::sync::Mutex<Option<Account>>,
) -> Result<(String, String), AcmeError> {
    let account = account_for(config, account).await?;
    let identifiers = [Identifier::Dns(host.to_string())];
    let mut order = account.new_order(&NewOrder::new(&identifiers)).await?;
    let mut tokens = Vec::new();
    let use_http01 = config.prefer_http01 || proxy.config.https_listen.is_none();
    let result = async {
        let mut authorizations = order.authorizations();
        while let Some(auth) = authorizations.next().await {
            let mut auth = auth?;
            match auth.status {
                AuthorizationStatus::Pending => {}
                AuthorizationStatus::Valid => continue,
                other => return Err(AcmeError::Other(format!("authorization is {other:?}"))),
            }
            let has = |t: &ChallengeType| auth.challenges.iter().any(|c| &c.r#type == t);
            let kind = if !use_http01 && has(&ChallengeType::TlsAlpn01) {
                ChallengeType::TlsAlpn01
            } else if has(&ChallengeType::Http01) {
                ChallengeType::Http01
            } else if has(&ChallengeType::TlsAlpn01) {
                ChallengeType::TlsAlpn01
            } else {
                return Err(AcmeError::Other("no supported challenge offered".into()));
            };
            let mut challenge = auth
                .challenge(kind.clone())
                .ok_or_else(|| AcmeError::Other("challenge vanished".into()))?;
            let key_auth = challenge.key_authorization();
            match kind {
                ChallengeType::TlsAlpn01 => {
                    let mut params = rcgen::CertificateParams::new(vec![host.to_string()])
                        .map_err(|e| AcmeError::Other(e.to_string()))?;
                    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(
                        key_auth.digest().as_ref(),
                    )];
                    let key =
                        rcgen::KeyPair::generate().map_err(|e| AcmeError::Other(e.to_string()))?;
                    let cert = params
                        .self_signed(&key)
                        .map_err(|e| AcmeError::Other(e.to_string()))?;
                    let certified = certified_key_from_pem(&cert.pem(), &key.serialize_pem())
                        .map_err(|e| AcmeError::Other(e.to_string()))?;
                    proxy.certs.set_challenge(host, Arc::new(certified));
                }
                _ => {
                    let token = challenge.token.clone();
                    proxy
                        .http01
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(token.clone(), key_auth.as_str().to_string());
                    tokens.push(token);
                }
            }
            challenge.set_ready().await?;
        }
        let status = order
            .poll_ready(&RetryPolicy::new().timeout(Duration::from_secs(90)))
            .await?;
        if status != OrderStatus::Ready {
            return Err(AcmeError::Other(format!("order is {status:?}")));
        }
        let mut params = rcgen::CertificateParams::new(vec![host.to_string()])
            .map_err(|e| AcmeError::Other(e.to_string()))?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        let key = rcgen::KeyPair::generate().map_err(|e| AcmeError::Other(e.to_string()))?;
        let csr = params
            .serialize_request(&key)
            .map_err(|e| AcmeError::Other(e.to_string()))?;
        order.finalize_csr(csr.der()).await?;
        let chain = order
            .poll_certificate(&RetryPolicy::new().timeout(Duration::from_secs(90)))
            .await?;
        Ok((chain, key.serialize_pem()))
    }
    .await;
    proxy.certs.clear_challenge(host);
    let mut http01 = proxy.http01.lock().unwrap_or_else(|p| p.into_inner());
    for token in tokens {
        http01.remove(&token);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    fn state(issued_days_ago: u64, expires_in_days: u64, now: SystemTime) -> HostState {
        HostState {
            issued: Some(now - DAY * issued_days_ago as u32),
            expires: Some(now + DAY * expires_in_days as u32),
            ..HostState::default()
        }
    }

    #[test]
    fn renews_with_less_than_a_third_of_the_lifetime_or_renew_before_left() {
        let now = SystemTime::now();
        let renew_before = DAY * 30;
        // A 90-day certificate: renewed in its last 30 days.
        assert!(!needs_renewal_at(&state(30, 60, now), renew_before, now));
        assert!(!needs_renewal_at(&state(59, 31, now), renew_before, now));
        assert!(needs_renewal_at(&state(61, 29, now), renew_before, now));
        // A 6-day certificate: renewed in its last 2 days, not as soon as it arrives.
        assert!(!needs_renewal_at(&state(1, 5, now), renew_before, now));
        assert!(!needs_renewal_at(&state(3, 3, now), renew_before, now));
        assert!(needs_renewal_at(&state(5, 1, now), renew_before, now));
        // None yet, or expired: now.
        assert!(needs_renewal_at(&HostState::default(), renew_before, now));
        assert!(needs_renewal_at(
            &HostState {
                issued: Some(now - DAY * 10),
                expires: Some(now - DAY),
                ..HostState::default()
            },
            renew_before,
            now
        ));
    }
}
