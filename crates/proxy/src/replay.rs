//! fly-replay (spec §14): an app answers with a `fly-replay` header (or a
//! `application/vnd.fly.replay+json` body) and the proxy re-delivers the original request
//! where it says, instead of passing the response on.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http::header::{self, HeaderValue};
use http::{Response, Uri};
use serde::Deserialize;

use crate::body::RespBody;
use crate::catalog::MachineView;
use crate::headers as h;
use crate::lb::Constraints;

pub const JSON_CONTENT_TYPE: &str = "application/vnd.fly.replay+json";

/// A fly-replay instruction that cannot be understood.
#[derive(Debug, thiserror::Error)]
#[error("invalid fly-replay")]
pub struct InvalidReplay;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fallback {
    ForceSelf,
    PreferSelf,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct SetHeader {
    pub name: String,
    pub value: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct Transform {
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub delete_headers: Vec<String>,
    #[serde(default)]
    pub set_headers: Vec<SetHeader>,
}

/// One replay instruction.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Replay {
    pub regions: Vec<String>,
    pub instance: Option<String>,
    pub prefer_instance: Option<String>,
    pub app: Option<String>,
    pub state: Option<String>,
    pub elsewhere: bool,
    pub timeout: Option<Duration>,
    pub fallback: Option<Fallback>,
    pub transform: Transform,
}

#[derive(Deserialize)]
struct JsonReplay {
    #[serde(default)]
    region: Option<String>,
    #[serde(default)]
    instance: Option<String>,
    #[serde(default)]
    prefer_instance: Option<String>,
    #[serde(default)]
    app: Option<String>,
    #[serde(default)]
    state: Option<String>,
    #[serde(default)]
    elsewhere: Option<bool>,
    #[serde(default)]
    timeout: Option<String>,
    #[serde(default)]
    fallback: Option<String>,
    #[serde(default)]
    transform: Option<Transform>,
}

fn parse_fallback(text: &str) -> Result<Option<Fallback>, InvalidReplay> {
    match text {
        "" => Ok(None),
        "force_self" => Ok(Some(Fallback::ForceSelf)),
        "prefer_self" => Ok(Some(Fallback::PreferSelf)),
        _ => Err(InvalidReplay),
    }
}

fn parse_timeout(text: &str) -> Result<Duration, InvalidReplay> {
    aloft_api::Duration::parse(text)
        .map(|d| d.to_std())
        .map_err(|_| InvalidReplay)
}

fn split_list(text: &str) -> Vec<String> {
    text.split(',')
        .map(|r| r.trim().to_ascii_lowercase())
        .filter(|r| !r.is_empty())
        .collect()
}

/// Parses the header form: `field=value;field="a,b";...`.
pub fn parse_header(value: &str) -> Result<Replay, InvalidReplay> {
    let mut replay = Replay::default();
    let mut any = false;
    for field in value.split(';') {
        let field = field.trim();
        if field.is_empty() {
            continue;
        }
        let (key, raw) = field.split_once('=').ok_or(InvalidReplay)?;
        let key = key.trim().to_ascii_lowercase();
        let raw = raw.trim();
        let val = raw
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(raw);
        any = true;
        match key.as_str() {
            "region" => replay.regions = split_list(val),
            "instance" => replay.instance = Some(val.to_string()),
            "prefer_instance" => replay.prefer_instance = Some(val.to_string()),
            "app" => replay.app = Some(val.to_string()),
            "state" => replay.state = Some(val.to_string()),
            "elsewhere" => replay.elsewhere = val.eq_ignore_ascii_case("true"),
            "timeout" => replay.timeout = Some(parse_timeout(val)?),
            "fallback" => replay.fallback = parse_fallback(val)?,
            // Cache hints are an optimisation only; accepted and ignored.
            _ => {}
        }
    }
    if !any {
        return Err(InvalidReplay);
    }
    Ok(replay)
}

/// Parses the JSON form.
pub fn parse_json(body: &[u8]) -> Result<Replay, InvalidReplay> {
    let json: JsonReplay = serde_json::from_slice(body).map_err(|_| InvalidReplay)?;
    Ok(Replay {
        regions: json.region.as_deref().map(split_list).unwrap_or_default(),
        instance: json.instance,
        prefer_instance: json.prefer_instance,
        app: json.app,
        state: json.state,
        elsewhere: json.elsewhere.unwrap_or(false),
        timeout: json.timeout.as_deref().map(parse_timeout).transpose()?,
        fallback: parse_fallback(json.fallback.as_deref().unwrap_or(""))?,
        transform: json.transform.unwrap_or_default(),
    })
}

/// Cheap check: does the response carry a `fly-replay` header or the JSON content type?
pub fn may_replay(resp: &Response<RespBody>) -> bool {
    resp.headers().contains_key(&h::FLY_REPLAY)
        || resp
            .headers()
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/vnd.fly.replay"))
}

/// Whether a backend response asks for a replay: `None` when not, `Some(None)` when it
/// does but cannot be understood, `Some(Some(replay))` otherwise.
pub async fn parse_response(resp: &mut Response<RespBody>) -> Option<Option<Replay>> {
    if let Some(value) = resp.headers().get(&h::FLY_REPLAY) {
        return Some(value.to_str().ok().and_then(|v| parse_header(v).ok()));
    }
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            ct.split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case(JSON_CONTENT_TYPE))
        });
    if !is_json {
        return None;
    }
    let body = std::mem::replace(resp.body_mut(), RespBody::empty());
    match body.collect_limited(64 * 1024).await {
        Ok(bytes) => Some(parse_json(&bytes).ok()),
        Err(_) => Some(None),
    }
}

impl Replay {
    /// Applies `transform` (JSON form) to the request about to be replayed.
    pub fn transform(&self, parts: &mut http::request::Parts) {
        if let Some(path) = &self.transform.path
            && let Ok(uri) = path.parse::<Uri>()
        {
            parts.uri = uri;
        }
        for name in &self.transform.delete_headers {
            if let Ok(name) = http::HeaderName::from_bytes(name.as_bytes()) {
                parts.headers.remove(name);
            }
        }
        for set in &self.transform.set_headers {
            if let (Ok(name), Ok(value)) = (
                http::HeaderName::from_bytes(set.name.as_bytes()),
                HeaderValue::from_str(&set.value),
            ) {
                parts.headers.insert(name, value);
            }
        }
    }
}

/// Where the next delivery of a replayed request goes.
pub struct Next {
    pub src_header: HeaderValue,
    pub constraints: Constraints,
    pub app: Option<String>,
}

/// What to do instead when a replay target cannot be found.
pub struct FallbackDelivery {
    pub constraints: Constraints,
    pub app: String,
    pub failed_header: HeaderValue,
}

/// The replay history of one request.
#[derive(Default)]
pub struct ReplayState {
    /// The machine that issued the first replay, and its app.
    source: Option<(Arc<MachineView>, String)>,
    current: Option<Replay>,
    started: Option<Instant>,
    pub is_fallback: bool,
}

impl ReplayState {
    /// Records a replay issued by `machine` (of `app`) and says where to deliver next.
    pub fn begin(
        &mut self,
        replay: &Replay,
        machine: &Arc<MachineView>,
        region: &str,
        app: &str,
    ) -> Next {
        if self.source.is_none() {
            self.source = Some((machine.clone(), app.to_string()));
        }
        self.started = Some(Instant::now());
        self.current = Some(replay.clone());
        let micros = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros())
            .unwrap_or(0);
        let mut src = format!("instance={};region={};t={}", machine.id, region, micros);
        if let Some(state) = &replay.state {
            src.push_str(";state=");
            src.push_str(state);
        }
        let constraints = Constraints {
            force_regions: (!replay.regions.is_empty()).then(|| replay.regions.clone()),
            prefer_regions: None,
            force_instance: replay.instance.clone(),
            prefer_instance: replay.prefer_instance.clone(),
            exclude: replay
                .elsewhere
                .then(|| machine.id.clone())
                .into_iter()
                .collect(),
            local_only: false,
        };
        Next {
            src_header: HeaderValue::from_str(&src)
                .unwrap_or_else(|_| HeaderValue::from_static("")),
            constraints,
            app: replay.app.clone(),
        }
    }

    /// The deadline to find a replay target (the replay's `timeout`), if one is running.
    pub fn deadline(&self, default: Instant) -> Instant {
        match (&self.current, self.started) {
            (
                Some(Replay {
                    timeout: Some(t), ..
                }),
                Some(started),
            ) if !self.is_fallback => (started + *t).min(default),
            _ => default,
        }
    }

    /// The fallback delivery when the replay target could not be reached (once).
    pub fn take_fallback(&mut self, reason: &str) -> Option<FallbackDelivery> {
        if self.is_fallback {
            return None;
        }
        let replay = self.current.as_ref()?;
        let fallback = replay.fallback?;
        let (source, source_app) = self.source.clone()?;
        let elapsed = self.started.map(|s| s.elapsed().as_millis()).unwrap_or(0);
        let mut failed = String::new();
        if let Some(instance) = &replay.instance {
            failed.push_str(&format!("instance={instance};"));
        }
        if let Some(app) = &replay.app {
            failed.push_str(&format!("app={app};"));
        }
        if !replay.regions.is_empty() {
            failed.push_str(&format!("region={};", replay.regions.join(",")));
        }
        failed.push_str(&format!(
            "replay_source={};reason={reason};elapsed_ms={elapsed}",
            source.id
        ));
        self.is_fallback = true;
        let constraints = match fallback {
            Fallback::ForceSelf => Constraints {
                force_instance: Some(source.id.clone()),
                ..Constraints::default()
            },
            Fallback::PreferSelf => Constraints {
                prefer_instance: Some(source.id.clone()),
                ..Constraints::default()
            },
        };
        Some(FallbackDelivery {
            constraints,
            app: source_app,
            failed_header: HeaderValue::from_str(&failed)
                .unwrap_or_else(|_| HeaderValue::from_static("")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_form_parses_every_field() {
        let r = parse_header(r#"region="sjc,any";app=target-app;state=abc;elsewhere=true;timeout=800ms;fallback=prefer_self"#)
            .unwrap();
        assert_eq!(r.regions, vec!["sjc", "any"]);
        assert_eq!(r.app.as_deref(), Some("target-app"));
        assert_eq!(r.state.as_deref(), Some("abc"));
        assert!(r.elsewhere);
        assert_eq!(r.timeout, Some(Duration::from_millis(800)));
        assert_eq!(r.fallback, Some(Fallback::PreferSelf));
        let r = parse_header("instance=00bb33ff").unwrap();
        assert_eq!(r.instance.as_deref(), Some("00bb33ff"));
        assert!(parse_header("fallback=sometimes").is_err());
        assert!(parse_header("").is_err());
    }

    #[test]
    fn json_form_parses_transform() {
        let r = parse_json(
            br#"{"app":"target-app","region":"iad,us","timeout":"10s","fallback":"prefer_self",
                "transform":{"path":"/new?x=1","delete_headers":["cookie"],"set_headers":[{"name":"x-a","value":"b"}]}}"#,
        )
        .unwrap();
        assert_eq!(r.regions, vec!["iad", "us"]);
        assert_eq!(r.timeout, Some(Duration::from_secs(10)));
        assert_eq!(r.transform.path.as_deref(), Some("/new?x=1"));
        let mut parts = http::Request::builder()
            .uri("/old")
            .header("cookie", "c")
            .body(())
            .unwrap()
            .into_parts()
            .0;
        r.transform(&mut parts);
        assert_eq!(parts.uri, "/new?x=1");
        assert!(parts.headers.get("cookie").is_none());
        assert_eq!(parts.headers.get("x-a").unwrap(), "b");
    }
}
