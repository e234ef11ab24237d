//! The `http` handler: routes each request by Host to an app, picks a machine, forwards
//! the request with the platform headers over a pooled connection, and post-processes the
//! response (headers, fly-replay, compression).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aloft_api::MachinePort;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::{Body, Incoming};

use crate::Proxy;
use crate::backend::BackendError;
use crate::body::{Attached, BodyReservation, ReqBody, RespBody};
use crate::catalog::AppView;
use crate::headers::{self as h};
use crate::lb::{self, Chosen, Constraints};
use crate::metrics::RequestDone;

/// Request bodies up to this size are buffered, so that fly-replay can re-deliver them.
pub const REPLAY_BODY_LIMIT: u64 = 1024 * 1024;
/// Most replays one request may go through.
const MAX_REPLAYS: usize = 5;

/// What the proxy knows about the client connection a request came on.
pub struct ConnInfo {
    pub client: SocketAddr,
    pub local: SocketAddr,
    /// The port services are matched against (80 for the default HTTP listener).
    pub public_port: u16,
    pub tls: bool,
    /// The app, when the connection already determined it (dedicated IP, SNI).
    pub fixed_app: Option<String>,
    pub client_ip: HeaderValue,
    pub local_port: HeaderValue,
}

impl ConnInfo {
    pub fn new(
        client: SocketAddr,
        local: SocketAddr,
        public_port: u16,
        tls: bool,
        fixed_app: Option<String>,
    ) -> Self {
        let client_ip = h::value_of(&client.ip().to_canonical().to_string());
        let local_port = h::value_of(&local.port().to_string());
        ConnInfo {
            client,
            local,
            public_port,
            tls,
            fixed_app,
            client_ip,
            local_port,
        }
    }
}

/// A short plain-text error response.
pub fn error_response(status: StatusCode, message: &str) -> Response<RespBody> {
    let mut body = String::with_capacity(message.len() + 1);
    body.push_str(message);
    body.push('\n');
    let mut resp = Response::new(RespBody::full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// The host a request names, lower case, without port. Borrowed from the request's
/// `Host` header (a cheap shared clone) unless it had to be lower-cased.
pub struct HostKey {
    value: Option<HeaderValue>,
    range: (usize, usize),
    owned: Option<String>,
}

impl HostKey {
    pub fn as_str(&self) -> &str {
        if let Some(owned) = &self.owned {
            return owned;
        }
        match &self.value {
            Some(v) => v
                .to_str()
                .ok()
                .and_then(|t| t.get(self.range.0..self.range.1))
                .unwrap_or(""),
            None => "",
        }
    }
}

pub fn request_host(headers: &HeaderMap, uri: &Uri) -> HostKey {
    let empty = HostKey {
        value: None,
        range: (0, 0),
        owned: None,
    };
    if let Some(value) = headers.get(header::HOST) {
        let Ok(raw) = value.to_str() else {
            return empty;
        };
        let (start, end) = host_range(raw);
        let host = &raw[start..end];
        if host.bytes().any(|b| b.is_ascii_uppercase()) {
            return HostKey {
                value: None,
                range: (0, 0),
                owned: Some(host.to_ascii_lowercase()),
            };
        }
        return HostKey {
            value: Some(value.clone()),
            range: (start, end),
            owned: None,
        };
    }
    match uri.authority() {
        Some(authority) => HostKey {
            value: None,
            range: (0, 0),
            owned: Some(normalize_host(authority.as_str())),
        },
        None => empty,
    }
}

/// Where the host name sits in a `Host` value: trimmed, without `[...]`, port or final dot.
pub(crate) fn host_range(raw: &str) -> (usize, usize) {
    let lead = raw.len() - raw.trim_start().len();
    let trimmed = raw.trim();
    let (mut start, mut end) = (lead, lead + trimmed.len());
    if let Some(rest) = trimmed.strip_prefix('[') {
        start += 1;
        end = start + rest.find(']').unwrap_or(rest.len());
    } else if let Some(colon) = trimmed.rfind(':')
        && trimmed[colon + 1..].bytes().all(|b| b.is_ascii_digit())
    {
        end = lead + colon;
    }
    if end > start && raw.as_bytes()[end - 1] == b'.' {
        end -= 1;
    }
    (start, end)
}

/// Lower-cases a host and strips its port (`[v6]:port`, `name:port`) and a trailing dot.
pub fn normalize_host(raw: &str) -> String {
    let (start, end) = host_range(raw);
    raw[start..end].to_ascii_lowercase()
}

/// Where a request goes and how its response is treated.
pub(crate) struct Route {
    pub(crate) app: Arc<AppView>,
    /// (machine, service, port) indices of the port's config inside `app`.
    pub(crate) at: (usize, usize, usize),
}

impl Route {
    pub(crate) fn port(&self) -> &MachinePort {
        let (m, s, p) = self.at;
        &self.app.machines[m].services[s].ports[p]
    }
    pub(crate) fn pristine(&self) -> bool {
        self.port()
            .http_options
            .as_ref()
            .and_then(|o| o.response.as_ref())
            .and_then(|r| r.pristine)
            .unwrap_or(false)
    }
    pub(crate) fn h2_backend(&self) -> bool {
        self.port()
            .http_options
            .as_ref()
            .and_then(|o| o.h2_backend)
            .unwrap_or(false)
    }
    /// Whether the port compresses responses (`http_options.compress`, default on).
    pub(crate) fn compress(&self) -> bool {
        self.port()
            .http_options
            .as_ref()
            .and_then(|o| o.compress)
            .unwrap_or(true)
    }
}

// Returned once per request by value; boxing the response would cost an allocation each.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Outcome {
    Response(Response<RespBody>),
    Error(StatusCode, &'static str),
}

/// What the response headers and metrics of a finished request need.
pub(crate) struct Finish<'a> {
    pub(crate) start: Instant,
    pub(crate) request_id: HeaderValue,
    pub(crate) client_version: Version,
    pub(crate) stats: Option<Arc<crate::metrics::AppStats>>,
    pub(crate) pristine: bool,
    pub(crate) port: Option<&'a MachinePort>,
}

/// Methods whose requests may be sent twice (RFC 9110 §9.2.2).
pub(crate) fn is_idempotent(method: &http::Method) -> bool {
    matches!(
        *method,
        http::Method::GET
            | http::Method::HEAD
            | http::Method::OPTIONS
            | http::Method::TRACE
            | http::Method::PUT
            | http::Method::DELETE
    )
}

impl Proxy {
    /// Entry point of the `http` handler for one request that hyper parsed.
    pub(crate) async fn handle_http(
        self: Arc<Self>,
        conn: Arc<ConnInfo>,
        mut req: Request<Incoming>,
    ) -> Result<Response<RespBody>, Infallible> {
        let client_upgrade = if req.version() == Version::HTTP_11 && h::is_upgrade(req.headers()) {
            Some(hyper::upgrade::on(&mut req))
        } else {
            None
        };
        let (parts, body) = req.into_parts();
        let body = if body.is_end_stream() {
            ReqBody::Empty
        } else {
            ReqBody::Stream(body)
        };
        Ok(self
            .handle_request(&conn, parts, body, client_upgrade)
            .await)
    }

    /// One request, whichever parser read it: routing, forwarding, response headers.
    pub(crate) async fn handle_request(
        self: &Arc<Self>,
        conn: &Arc<ConnInfo>,
        parts: http::request::Parts,
        body: ReqBody,
        client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    ) -> Response<RespBody> {
        let start = Instant::now();
        let request_id = self.request_ids.next();
        let client_version = parts.version;
        let (outcome, stats, pristine, route) = self
            .route_and_forward(conn, parts, body, client_upgrade)
            .await;
        self.finish_response(
            outcome,
            Finish {
                start,
                request_id,
                client_version,
                stats,
                pristine,
                port: route.as_ref().map(Route::port),
            },
        )
    }

    /// The proxy's response headers (§9.5) and the request's metrics.
    pub(crate) fn finish_response(
        &self,
        outcome: Outcome,
        finish: Finish<'_>,
    ) -> Response<RespBody> {
        let mut resp = match outcome {
            Outcome::Response(resp) => resp,
            Outcome::Error(status, message) => error_response(status, message),
        };
        if !finish.pristine {
            let via = if finish.client_version == Version::HTTP_2 {
                &self.via_h2
            } else {
                &self.via_h1
            };
            h::append_list(resp.headers_mut(), &header::VIA, via);
            resp.headers_mut()
                .insert(h::FLY_REQUEST_ID.clone(), finish.request_id);
            resp.headers_mut()
                .insert(header::SERVER, self.server_value.clone());
        }
        if let Some(port) = finish.port {
            apply_response_headers(resp.headers_mut(), port);
        }
        let done = RequestDone {
            stats: finish.stats,
            edge: self.metrics.edge.clone(),
            status: resp.status().as_u16(),
            start: finish.start,
        };
        match resp.body_mut() {
            RespBody::Upstream { attached, .. } | RespBody::Raw { attached, .. }
                if attached.done.is_none() =>
            {
                attached.done = Some(done)
            }
            _ => done.finish(),
        }
        resp
    }

    async fn route_and_forward(
        self: &Arc<Self>,
        conn: &Arc<ConnInfo>,
        parts: http::request::Parts,
        body: ReqBody,
        client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    ) -> (
        Outcome,
        Option<Arc<crate::metrics::AppStats>>,
        bool,
        Option<Route>,
    ) {
        let host_key = request_host(&parts.headers, &parts.uri);
        let host = host_key.as_str();
        if !conn.tls
            && let Some(token) = parts
                .uri
                .path()
                .strip_prefix("/.well-known/acme-challenge/")
            && let Some(answer) = self
                .http01
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(token)
                .cloned()
        {
            let mut resp = Response::new(RespBody::full(answer));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            return (Outcome::Response(resp), None, false, None);
        }
        // The app, as a shared handle (no name copies on the hot path).
        let app: Option<Arc<AppView>> = {
            let snapshot = self.catalog.load();
            match &conn.fixed_app {
                Some(name) => snapshot.apps.get(name.as_str()).cloned(),
                None => snapshot
                    .app_for_host(host, &self.config.base_domain)
                    .cloned(),
            }
        };
        let Some(app) = app else {
            return (
                Outcome::Error(StatusCode::NOT_FOUND, "no app is served at this host"),
                None,
                false,
                None,
            );
        };
        let deadline = Instant::now() + self.config.machine_wait;
        // Common case without awaiting (the waiting path is boxed, keeping this future small).
        let route = match app.port_location(conn.public_port) {
            Some(at) => Route {
                app: app.clone(),
                at,
            },
            None => match Box::pin(self.wait_route(&app.name, conn.public_port, deadline)).await {
                Ok(route) => route,
                Err(outcome) => return (outcome, None, false, None),
            },
        };
        let stats = Some(route.app.stats.clone());
        let pristine = route.pristine();
        let handlers = &route.port().handlers;
        if !handlers.iter().any(|h| h == "http")
            || (handlers.iter().any(|h| h == "tls") && !conn.tls)
        {
            return (
                Outcome::Error(StatusCode::NOT_FOUND, "this port does not serve plain HTTP"),
                stats,
                pristine,
                None,
            );
        }
        if route.port().force_https == Some(true) && !conn.tls {
            return (
                Outcome::Response(redirect_https(&parts.uri, host)),
                stats,
                pristine,
                Some(route),
            );
        }
        if let Some(files) = self.image_files.get()
            && route.app.serves_static(parts.uri.path())
            && let Some(resp) =
                Box::pin(self.serve_static(files, &route, conn, &parts, deadline)).await
        {
            return (resp, stats, pristine, Some(route));
        }
        let outcome = self
            .forward(conn, parts, body, client_upgrade, &route, host, deadline)
            .await;
        (outcome, stats, pristine, Some(route))
    }

    /// A `[[statics]]` answer from the image of a machine chosen as for the app itself
    /// (autostart included); `None` when that machine's config maps no prefix for the path.
    async fn serve_static(
        self: &Arc<Self>,
        files: &Arc<dyn crate::statics::ImageFiles>,
        route: &Route,
        conn: &ConnInfo,
        parts: &http::request::Parts,
        deadline: Instant,
    ) -> Option<Outcome> {
        let constraints = constraints_from_headers(&parts.headers);
        let chosen = match self
            .choose(&route.app.name, conn.public_port, &constraints, deadline)
            .await
        {
            Ok(chosen) => chosen,
            Err((status, message)) => return Some(Outcome::Error(status, message)),
        };
        let (mapping, rest) = crate::statics::matching(&chosen.machine.statics, parts.uri.path())?;
        let resp = crate::statics::respond(
            files.clone(),
            &chosen.machine.id,
            mapping,
            rest,
            &parts.method,
            &parts.headers,
        )
        .await;
        Some(Outcome::Response(resp))
    }

    /// Finds the app and the service config of `port`, waiting (bounded) while the app
    /// has no machine at all yet.
    async fn wait_route(
        &self,
        app_name: &str,
        port: u16,
        deadline: Instant,
    ) -> Result<Route, Outcome> {
        let mut changes: Option<tokio::sync::watch::Receiver<u64>> = None;
        loop {
            {
                let snapshot = self.catalog.load();
                let Some(app) = snapshot.apps.get(app_name) else {
                    return Err(Outcome::Error(
                        StatusCode::NOT_FOUND,
                        "no app is served at this host",
                    ));
                };
                if let Some(at) = app.port_location(port) {
                    return Ok(Route {
                        app: app.clone(),
                        at,
                    });
                }
                if !app.machines.is_empty() {
                    return Err(Outcome::Error(
                        StatusCode::NOT_FOUND,
                        "no service of this app listens on this port",
                    ));
                }
            }
            // Subscribed only when waiting: the common path never touches the channel.
            let Some(changes) = changes.as_mut() else {
                changes = Some(self.catalog.subscribe());
                continue;
            };
            tokio::select! {
                changed = changes.changed() => if changed.is_err() {
                    return Err(Outcome::Error(StatusCode::SERVICE_UNAVAILABLE, "no machine is available for this app"));
                },
                _ = tokio::time::sleep_until(deadline.into()) => {
                    return Err(Outcome::Error(StatusCode::SERVICE_UNAVAILABLE, "no machine is available for this app"));
                }
            }
        }
    }

    /// A machine that can take the request right now, without waiting or starting one.
    pub(crate) fn try_choose_now(
        &self,
        app: &AppView,
        port: u16,
        constraints: &Constraints,
    ) -> Option<Chosen> {
        match lb::pick(
            app,
            port,
            &self.rtt,
            &self.config.region,
            constraints,
            &self.released,
        ) {
            lb::Pick::Chosen(chosen) => Some(chosen),
            _ => None,
        }
    }

    /// Chooses a machine, waiting (bounded) for one to start or for capacity to free up.
    pub(crate) async fn choose(
        self: &Arc<Self>,
        app_name: &str,
        port: u16,
        constraints: &Constraints,
        deadline: Instant,
    ) -> Result<Chosen, (StatusCode, &'static str)> {
        let mut changes: Option<tokio::sync::watch::Receiver<u64>> = None;
        loop {
            let pick = {
                let snapshot = self.catalog.load();
                let Some(app) = snapshot.apps.get(app_name) else {
                    return Err((StatusCode::NOT_FOUND, "no app is served at this host"));
                };
                lb::pick(
                    app,
                    port,
                    &self.rtt,
                    &self.config.region,
                    constraints,
                    &self.released,
                )
            };
            let queued = match pick {
                lb::Pick::Chosen(chosen) => return Ok(chosen),
                lb::Pick::OverSoft { chosen, startable } => {
                    // Every running machine is over its soft limit: wake one more for the
                    // requests to come, and serve this one where there is room.
                    self.clone().start_in_background(&startable);
                    return Ok(chosen);
                }
                lb::Pick::Startable(startable) => {
                    self.clone().start_in_background(&startable);
                    false
                }
                lb::Pick::Full => true,
                lb::Pick::None => {
                    if constraints.force_instance.is_some() || constraints.force_regions.is_some() {
                        return Err((
                            StatusCode::SERVICE_UNAVAILABLE,
                            "no machine matches the requested region or instance",
                        ));
                    }
                    false
                }
            };
            // Wait for a catalog change (a machine started) or, when queued at the hard
            // limit, for a slot to free up; 503 at the deadline.
            let Some(changes) = changes.as_mut() else {
                changes = Some(self.catalog.subscribe());
                continue;
            };
            let released = &self.released;
            let notified = released.notify.notified();
            tokio::pin!(notified);
            if queued {
                released
                    .waiters
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                notified.as_mut().enable();
            }
            let poll = tokio::time::sleep(Duration::from_millis(if queued { 50 } else { 100 }));
            let outcome = tokio::select! {
                _ = changes.changed() => None,
                _ = &mut notified, if queued => None,
                _ = poll => None,
                _ = tokio::time::sleep_until(deadline.into()) => Some(()),
            };
            if queued {
                released
                    .waiters
                    .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            }
            if outcome.is_some() {
                return Err(if queued {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "every machine of this app is at its hard limit",
                    )
                } else {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "no machine is available for this app",
                    )
                });
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn forward(
        self: &Arc<Self>,
        conn: &Arc<ConnInfo>,
        mut parts: http::request::Parts,
        body: ReqBody,
        client_upgrade: Option<hyper::upgrade::OnUpgrade>,
        route: &Route,
        host: &str,
        deadline: Instant,
    ) -> Outcome {
        let upgrade = client_upgrade.is_some();
        let client_version = parts.version;
        let constraints = constraints_from_headers(&parts.headers);
        // HTTP/2 clients name the host in :authority (port included): the app gets it as Host.
        let authority = parts.uri.authority().map(|a| a.as_str()).unwrap_or(host);
        self.prepare_request_headers(conn, &mut parts.headers, client_version, upgrade, authority);
        if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
            let pq = parts.uri.path_and_query().cloned();
            let mut uri_parts = http::uri::Parts::default();
            uri_parts.path_and_query =
                pq.or_else(|| Some(http::uri::PathAndQuery::from_static("/")));
            if let Ok(uri) = Uri::from_parts(uri_parts) {
                parts.uri = uri;
            }
        }

        // Bodies up to 1 MB are buffered so a fly-replay can re-deliver them; the
        // reservation of their bytes is held until the delivery is done.
        let (body, _reservation) = match body {
            ReqBody::Stream(incoming) => match Box::pin(self.read_body(incoming)).await {
                Ok(read) => read,
                Err(outcome) => return outcome,
            },
            other => (other, None),
        };
        self.deliver(
            conn,
            parts,
            body,
            route,
            client_upgrade,
            constraints,
            deadline,
            None,
        )
        .await
    }

    /// Delivers a prepared request (platform headers in place) to a machine of the route's
    /// app, following fly-replay answers. `first`: a response some machine already gave to
    /// this request (the fast path hands over the rare responses it does not serve itself).
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn deliver(
        self: &Arc<Self>,
        conn: &Arc<ConnInfo>,
        mut parts: http::request::Parts,
        body: ReqBody,
        route: &Route,
        client_upgrade: Option<hyper::upgrade::OnUpgrade>,
        mut constraints: Constraints,
        deadline: Instant,
        mut first: Option<(Chosen, Response<RespBody>)>,
    ) -> Outcome {
        let upgrade = client_upgrade.is_some();
        let mut body = Some(body);
        // Which app this delivery goes to: the route's, or a fly-replay target.
        let mut target: Arc<AppView> = route.app.clone();
        let mut route_h2 = route.h2_backend();
        let mut replay_src: Option<HeaderValue> = None;
        let mut replay_state = crate::replay::ReplayState::default();

        for hop in 0..=MAX_REPLAYS {
            let (chosen, mut resp, replayable) = match first.take() {
                Some((chosen, resp)) => {
                    let replayable = body.as_ref().and_then(ReqBody::try_clone);
                    (chosen, resp, replayable)
                }
                None => {
                    let wait_until = replay_state.deadline(deadline);
                    let now = match self.try_choose_now(&target, conn.public_port, &constraints) {
                        Some(chosen) => Ok(chosen),
                        None => {
                            Box::pin(self.choose(
                                &target.name,
                                conn.public_port,
                                &constraints,
                                wait_until,
                            ))
                            .await
                        }
                    };
                    let chosen = match now {
                        Ok(chosen) => chosen,
                        Err((status, message)) => {
                            let reason = if Instant::now() >= wait_until {
                                "timeout"
                            } else {
                                "no_candidate"
                            };
                            if let Some(fallback) = replay_state.take_fallback(reason) {
                                parts
                                    .headers
                                    .insert(h::FLY_REPLAY_FAILED.clone(), fallback.failed_header);
                                parts.headers.remove(&h::FLY_REPLAY_SRC);
                                replay_src = None;
                                constraints = fallback.constraints;
                                route_h2 = self.app_h2_backend(&fallback.app, conn.public_port);
                                match self.catalog.load().apps.get(fallback.app.as_str()) {
                                    Some(app) => target = app.clone(),
                                    None => return Outcome::Error(status, message),
                                }
                                continue;
                            }
                            return Outcome::Error(status, message);
                        }
                    };
                    if let Some(id) = &chosen.preferred_unavailable {
                        parts.headers.insert(
                            h::FLY_PREFERRED_INSTANCE_UNAVAILABLE.clone(),
                            h::value_of(id),
                        );
                    }
                    if let Some(src) = &replay_src {
                        parts.headers.insert(h::FLY_REPLAY_SRC.clone(), src.clone());
                    }
                    let Some(this_body) = body.take() else {
                        return Outcome::Error(
                            StatusCode::BAD_GATEWAY,
                            "request body already consumed",
                        );
                    };
                    let replayable = this_body.try_clone();
                    let attempt = Attempt {
                        app: &target,
                        port: conn.public_port,
                        constraints: &constraints,
                        h2: route_h2,
                        upgrade,
                        deadline,
                    };
                    match self
                        .send_with_retry(&attempt, &parts, this_body, replayable.as_ref(), chosen)
                        .await
                    {
                        Ok((chosen, resp)) => (chosen, resp, replayable),
                        Err(outcome) => return outcome,
                    }
                }
            };
            let machine = chosen.machine.clone();

            // fly-replay: the app asks for this request to be delivered elsewhere.
            if hop < MAX_REPLAYS
                && crate::replay::may_replay(&resp)
                && let Some(replay) = Box::pin(crate::replay::parse_response(&mut resp)).await
            {
                let Some(replay) = replay else {
                    return Outcome::Error(
                        StatusCode::BAD_GATEWAY,
                        "invalid fly-replay from the app",
                    );
                };
                let Some(saved) = replayable else {
                    return Outcome::Error(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "request body over 1 MB cannot be replayed (use fly-prefer-region)",
                    );
                };
                if replay_state.is_fallback {
                    // A fallback delivery may not replay again.
                    return Outcome::Error(
                        StatusCode::BAD_GATEWAY,
                        "a fallback request may not replay",
                    );
                }
                self.metrics.replays.inc();
                drop(resp);
                let next = replay_state.begin(&replay, &machine, &self.config.region, &target.name);
                replay_src = Some(next.src_header);
                constraints = next.constraints;
                if let Some(next_app) = next.app {
                    if let Err(message) =
                        self.replay_target_allowed(&target.name, &next_app, conn.public_port)
                    {
                        return Outcome::Error(StatusCode::BAD_GATEWAY, message);
                    }
                    route_h2 = self.app_h2_backend(&next_app, conn.public_port);
                    match self.catalog.load().apps.get(next_app.as_str()) {
                        Some(app) => target = app.clone(),
                        None => {
                            return Outcome::Error(
                                StatusCode::BAD_GATEWAY,
                                "fly-replay names an app that does not exist",
                            );
                        }
                    }
                }
                replay.transform(&mut parts);
                body = Some(saved);
                continue;
            }

            strip_response(&mut resp, upgrade);
            if upgrade && resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                if let Some(client_upgrade) = client_upgrade {
                    splice_upgrade(client_upgrade, &mut resp, chosen.guard);
                }
                return Outcome::Response(resp);
            }
            attach_load(&mut resp, chosen.guard);
            if route.compress() && crate::compress::wants_compression(&parts.headers, &resp) {
                resp = Box::pin(crate::compress::compress_response(resp, &parts.headers)).await;
            }
            return Outcome::Response(resp);
        }
        Outcome::Error(StatusCode::LOOP_DETECTED, "too many fly-replay hops")
    }

    /// Sends a request to the chosen machine. A machine this proxy just started may still
    /// be booting: the request is held (bounded) until it accepts connections. When nothing
    /// reached the app (connection refused or reset before a byte was sent), or an
    /// idempotent request got no answer, it goes once more to another eligible machine.
    async fn send_with_retry(
        &self,
        attempt: &Attempt<'_>,
        parts: &http::request::Parts,
        body: ReqBody,
        replayable: Option<&ReqBody>,
        mut chosen: Chosen,
    ) -> Result<(Chosen, Response<RespBody>), Outcome> {
        let mut sent = self
            .send(&chosen, parts, body, attempt.h2, attempt.upgrade)
            .await;
        while let Err(e) = &sent
            && e.is_connect()
            && self.recently_started(&chosen.machine.id)
            && Instant::now() < attempt.deadline
            && let Some(body) = replayable.and_then(ReqBody::try_clone)
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
            sent = self
                .send(&chosen, parts, body, attempt.h2, attempt.upgrade)
                .await;
        }
        if let Err(e) = &sent
            && e.may_retry(is_idempotent(&parts.method))
            && let Some(body) = replayable.and_then(ReqBody::try_clone)
        {
            let mut others = attempt.constraints.clone();
            others.exclude.push(chosen.machine.id.clone());
            if let Some(other) = self.try_choose_now(attempt.app, attempt.port, &others) {
                tracing::debug!(app = %attempt.app.name, failed = %chosen.machine.id, error = %e, retry = %other.machine.id, "retrying on another machine");
                chosen = other;
                sent = self
                    .send(&chosen, parts, body, attempt.h2, attempt.upgrade)
                    .await;
            }
        }
        match sent {
            Ok(resp) => Ok((chosen, resp)),
            Err(e) => {
                tracing::debug!(app = %attempt.app.name, machine = %chosen.machine.id, error = %e, "backend request failed");
                Err(Outcome::Error(
                    StatusCode::BAD_GATEWAY,
                    "the app did not answer",
                ))
            }
        }
    }

    fn prepare_request_headers(
        &self,
        conn: &ConnInfo,
        headers: &mut HeaderMap,
        version: Version,
        upgrade: bool,
        host: &str,
    ) {
        h::strip_hop_by_hop(headers, upgrade);
        if !headers.contains_key(header::HOST) && !host.is_empty() {
            headers.insert(header::HOST, h::value_of(host));
        }
        headers.insert(h::FLY_CLIENT_IP.clone(), conn.client_ip.clone());
        headers.insert(h::FLY_FORWARDED_PORT.clone(), conn.local_port.clone());
        headers.insert(h::FLY_REGION.clone(), self.region_value.clone());
        h::append_list(headers, &h::X_FORWARDED_FOR, &conn.client_ip);
        let (proto, ssl) = if conn.tls {
            ("https", "on")
        } else {
            ("http", "off")
        };
        headers.insert(
            h::X_FORWARDED_PROTO.clone(),
            HeaderValue::from_static(proto),
        );
        headers.insert(h::X_FORWARDED_SSL.clone(), HeaderValue::from_static(ssl));
        if !headers.contains_key(&h::X_FORWARDED_PORT) {
            headers.insert(h::X_FORWARDED_PORT.clone(), conn.local_port.clone());
        }
        let via = if version == Version::HTTP_2 {
            &self.via_h2
        } else {
            &self.via_h1
        };
        h::append_list(headers, &header::VIA, via);
    }

    async fn send(
        &self,
        chosen: &Chosen,
        parts: &http::request::Parts,
        body: ReqBody,
        h2: bool,
        upgrade: bool,
    ) -> Result<Response<RespBody>, BackendError> {
        let backend = chosen.guard.backend().clone();
        if !h2
            && !upgrade
            && let Some(bytes) = body.buffered()
        {
            return crate::fast::send_buffered(&backend, parts, bytes).await;
        }
        let mut request = build_request(parts, body);
        if upgrade {
            let resp = Box::pin(backend.send_upgrade(request)).await?;
            return Ok(resp.map(|inner| RespBody::upstream(inner, Attached::default())));
        }
        if h2 {
            *request.version_mut() = Version::HTTP_2;
            let authority = request
                .headers()
                .get(header::HOST)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("localhost")
                .to_string();
            let pq = request
                .uri()
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/")
                .to_string();
            if let Ok(uri) = Uri::builder()
                .scheme("http")
                .authority(authority)
                .path_and_query(pq)
                .build()
            {
                *request.uri_mut() = uri;
            }
            request.headers_mut().remove(header::HOST);
            let resp = Box::pin(backend.send_h2(request)).await?;
            return Ok(resp.map(|inner| RespBody::upstream(inner, Attached::default())));
        }
        *request.version_mut() = Version::HTTP_11;
        let (resp, pooled) = backend.send_h1(request).await?;
        Ok(resp.map(|inner| {
            RespBody::upstream(
                inner,
                Attached {
                    pooled: Some(pooled),
                    load: None,
                    done: None,
                },
            )
        }))
    }

    /// Whether the app's service on `port` speaks h2c to its machines.
    fn app_h2_backend(&self, app: &str, port: u16) -> bool {
        let snapshot = self.catalog.load();
        snapshot
            .apps
            .get(app)
            .and_then(|a| a.port_config(port))
            .and_then(|(_, p)| p.http_options.as_ref().and_then(|o| o.h2_backend))
            .unwrap_or(false)
    }

    /// A replay to another app stays within the same organization and network.
    fn replay_target_allowed(&self, from: &str, to: &str, port: u16) -> Result<(), &'static str> {
        let snapshot = self.catalog.load();
        let (Some(from), Some(to)) = (snapshot.apps.get(from), snapshot.apps.get(to)) else {
            return Err("fly-replay names an app that does not exist");
        };
        if from.org != to.org || from.network != to.network {
            return Err("fly-replay to an app of another organization or network is not allowed");
        }
        if to.port_config(port).is_none() && !to.machines.is_empty() {
            return Err("the fly-replay target app has no service on this port");
        }
        Ok(())
    }
}

/// Moves the load slot of the chosen machine onto the response body, so the machine
/// counts as busy until the response is fully sent.
fn attach_load(resp: &mut Response<RespBody>, guard: crate::backend::LoadGuard) {
    if let RespBody::Upstream { attached, .. } | RespBody::Raw { attached, .. } = resp.body_mut() {
        attached.load = Some(guard);
    }
}

/// Where and how one request is sent.
struct Attempt<'a> {
    app: &'a AppView,
    port: u16,
    constraints: &'a Constraints,
    h2: bool,
    upgrade: bool,
    deadline: Instant,
}

fn build_request(parts: &http::request::Parts, body: ReqBody) -> Request<ReqBody> {
    let mut req = Request::new(body);
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = parts.uri.clone();
    *req.headers_mut() = parts.headers.clone();
    req
}

impl Proxy {
    /// Buffers a request body of a known length up to [`REPLAY_BODY_LIMIT`], within the
    /// budget of buffered bytes and the whole-body deadline; streams any other.
    async fn read_body(
        &self,
        mut body: Incoming,
    ) -> Result<(ReqBody, Option<BodyReservation>), Outcome> {
        if body.is_end_stream() {
            return Ok((ReqBody::Empty, None));
        }
        let Some(len) = body
            .size_hint()
            .exact()
            .filter(|len| *len <= REPLAY_BODY_LIMIT)
        else {
            return Ok((
                ReqBody::streamed(body, self.config.header_read_timeout),
                None,
            ));
        };
        let len = len as usize;
        let Some(reservation) = self.body_budget.try_reserve(len) else {
            return Ok((
                ReqBody::streamed(body, self.config.header_read_timeout),
                None,
            ));
        };
        let read_whole = async {
            let mut buf = bytes::BytesMut::with_capacity(len);
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame?.into_data() {
                    buf.extend_from_slice(&data);
                }
            }
            Ok::<_, hyper::Error>(buf.freeze())
        };
        match tokio::time::timeout(self.config.request_body_timeout, read_whole).await {
            Ok(Ok(bytes)) => Ok((ReqBody::Full(Some(bytes)), Some(reservation))),
            Ok(Err(_)) => Err(Outcome::Error(
                StatusCode::BAD_REQUEST,
                "could not read the request body",
            )),
            Err(_) => Err(Outcome::Error(
                StatusCode::REQUEST_TIMEOUT,
                "the request body did not arrive in time",
            )),
        }
    }
}

fn constraints_from_headers(headers: &HeaderMap) -> Constraints {
    let list = |name: &http::HeaderName| -> Option<Vec<String>> {
        let value = headers.get(name)?.to_str().ok()?;
        let items: Vec<String> = value
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        (!items.is_empty()).then_some(items)
    };
    let one = |name: &http::HeaderName| -> Option<String> {
        let value = headers.get(name)?.to_str().ok()?.trim();
        (!value.is_empty()).then(|| value.to_string())
    };
    if headers.is_empty() {
        return Constraints::default();
    }
    Constraints {
        force_regions: list(&h::FLY_FORCE_REGION),
        prefer_regions: list(&h::FLY_PREFER_REGION),
        force_instance: one(&h::FLY_FORCE_INSTANCE_ID),
        prefer_instance: one(&h::FLY_PREFER_INSTANCE_ID),
        exclude: Vec::new(),
        local_only: false,
    }
}

fn redirect_https(uri: &Uri, host: &str) -> Response<RespBody> {
    let pq = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let location = format!("https://{host}{pq}");
    let mut resp = error_response(StatusCode::MOVED_PERMANENTLY, "moved to https");
    if let Ok(value) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, value);
    }
    resp
}

fn strip_response(resp: &mut Response<RespBody>, upgrade: bool) {
    let keep_upgrade = upgrade && resp.status() == StatusCode::SWITCHING_PROTOCOLS;
    let headers = resp.headers_mut();
    if headers.contains_key(header::CONNECTION)
        || headers.contains_key(header::TRANSFER_ENCODING)
        || headers.contains_key(&h::KEEP_ALIVE)
        || headers.contains_key(header::UPGRADE)
        || headers.contains_key(header::TE)
    {
        h::strip_hop_by_hop(headers, keep_upgrade);
    }
}

/// `http_options.response.headers`: a string sets, a list sets several values, `false` removes.
fn apply_response_headers(headers: &mut HeaderMap, port: &MachinePort) {
    let Some(custom) = port
        .http_options
        .as_ref()
        .and_then(|o| o.response.as_ref())
        .map(|r| &r.headers)
    else {
        return;
    };
    for (name, value) in custom {
        let Ok(name) = http::HeaderName::from_bytes(name.as_bytes()) else {
            continue;
        };
        match value {
            serde_json::Value::Bool(false) | serde_json::Value::Null => {
                headers.remove(&name);
            }
            serde_json::Value::Array(values) => {
                headers.remove(&name);
                for v in values {
                    if let Some(v) = json_header_value(v) {
                        headers.append(name.clone(), v);
                    }
                }
            }
            other => {
                if let Some(v) = json_header_value(other) {
                    headers.insert(name, v);
                }
            }
        }
    }
}

fn json_header_value(value: &serde_json::Value) -> Option<HeaderValue> {
    let text = match value {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Number(n) => n.to_string(),
        serde_json::Value::Bool(true) => "true".to_string(),
        _ => return None,
    };
    HeaderValue::from_str(&text).ok()
}

/// Splices an upgraded client connection with the upgraded backend connection.
fn splice_upgrade(
    client: hyper::upgrade::OnUpgrade,
    resp: &mut Response<RespBody>,
    guard: crate::backend::LoadGuard,
) {
    let backend = hyper::upgrade::on(&mut *resp);
    tokio::spawn(async move {
        let _guard = guard;
        let (client, backend) = match tokio::try_join!(client, backend) {
            Ok(pair) => pair,
            Err(e) => {
                tracing::debug!(error = %e, "upgrade failed");
                return;
            }
        };
        let mut client = hyper_util::rt::TokioIo::new(client);
        let mut backend = hyper_util::rt::TokioIo::new(backend);
        let _ = tokio::io::copy_bidirectional(&mut client, &mut backend).await;
    });
}

#[cfg(test)]
mod host_tests {
    use super::*;

    #[test]
    fn hosts_normalize() {
        for (raw, want) in [
            ("web.aloft.test", "web.aloft.test"),
            ("web.aloft.test:8080", "web.aloft.test"),
            (" Web.Aloft.Test. ", "web.aloft.test"),
            ("[::1]:443", "::1"),
            ("127.0.0.1:80", "127.0.0.1"),
            ("", ""),
        ] {
            assert_eq!(normalize_host(raw), want, "{raw:?}");
            let req = Request::builder().header("host", raw).body(()).unwrap();
            assert_eq!(
                request_host(req.headers(), req.uri()).as_str(),
                want,
                "{raw:?}"
            );
        }
    }
}
