//! Load balancing (§11), routing headers and fly-replay (§14), autostart/autostop (§13).

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aloft_api::internal::CatalogUpdate;
use aloft_api::{AutoStop, CheckStatus, MachineService, MachineState, ServiceConcurrency};
use aloft_proxy::{AppExtras, Proxy};
use bytes::Bytes;
use common::*;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

fn limited(port: u16, soft: u32, hard: u32) -> MachineService {
    let mut s = http_service(port);
    s.concurrency = Some(ServiceConcurrency {
        kind: "requests".into(),
        soft_limit: soft,
        hard_limit: hard,
    });
    s
}

/// A backend that holds every request until the gate opens.
fn gated(name: &'static str, gate: watch::Receiver<bool>) -> Handler {
    handler(move |req: Request<Incoming>| {
        let mut gate = gate.clone();
        async move {
            let _ = gate.wait_for(|open| *open).await;
            drop(req);
            Response::builder()
                .header("x-backend", name)
                .body(Full::new(Bytes::from(name)))
                .unwrap()
        }
    })
}

#[tokio::test]
async fn least_loaded_local_first_cross_region_only_at_hard_limit_then_queue() {
    let (open, gate) = watch::channel(false);
    let ams = backend(gated("ams", gate.clone())).await;
    let fra = backend(gated("fra", gate.clone())).await;
    let proxy = start(config()).await;
    proxy.proxy.catalog().apply(snapshot(
        1,
        vec![app("web")],
        vec![
            machine_with(
                "m-ams",
                "web",
                "ams",
                ams.addr,
                MachineState::Started,
                vec![limited(ams.addr.port(), 1, 2)],
            ),
            machine_with(
                "m-fra",
                "web",
                "fra",
                fra.addr,
                MachineState::Started,
                vec![limited(fra.addr.port(), 1, 2)],
            ),
        ],
    ));
    let addr = proxy.http;
    let spawn_get = || tokio::spawn(async move { get(addr, "web.aloft.test", "/", &[]).await });
    // Two requests: the local machine takes both (over soft, under hard: no spill).
    let r1 = spawn_get();
    eventually("ams holds 1", || async {
        ams.requests.load(std::sync::atomic::Ordering::SeqCst) == 1
    })
    .await;
    let r2 = spawn_get();
    eventually("ams holds 2", || async {
        ams.requests.load(std::sync::atomic::Ordering::SeqCst) == 2
    })
    .await;
    assert_eq!(fra.requests.load(std::sync::atomic::Ordering::SeqCst), 0);
    // The local machine is at its hard limit: the next two go to fra.
    let r3 = spawn_get();
    let r4 = spawn_get();
    eventually("fra holds 2", || async {
        fra.requests.load(std::sync::atomic::Ordering::SeqCst) == 2
    })
    .await;
    // Everything at the hard limit: queued, then 503 after the bounded wait.
    let r5 = get(addr, "web.aloft.test", "/", &[]).await;
    assert_eq!(r5.status, 503);
    assert!(r5.text().contains("hard limit"), "{}", r5.text());
    // A queued request is served once a slot frees up.
    let r6 = spawn_get();
    eventually("the request is queued", || async {
        proxy.proxy.queued_requests() == 1
    })
    .await;
    open.send(true).unwrap();
    for r in [r1, r2, r3, r4, r6] {
        assert_eq!(r.await.unwrap().status, 200);
    }
    proxy.shutdown().await;
}

#[tokio::test]
async fn unhealthy_machines_get_nothing_and_closeness_uses_rtt() {
    let b_ams = backend(echo("ams")).await;
    let b_fra = backend(echo("fra")).await;
    let b_syd = backend(echo("syd")).await;
    let proxy = start(config()).await;
    let c = proxy.proxy.catalog();
    c.apply(snapshot(
        1,
        vec![app("web")],
        vec![
            machine("m-ams", "web", "ams", b_ams.addr, MachineState::Started),
            machine("m-fra", "web", "fra", b_fra.addr, MachineState::Started),
            machine("m-syd", "web", "syd", b_syd.addr, MachineState::Started),
        ],
    ));
    let backend_of = |r: Reply| r.header("x-backend").unwrap_or("").to_string();
    assert_eq!(
        backend_of(get(proxy.http, "web.aloft.test", "/", &[]).await),
        "ams"
    );
    c.set_machine_health("m-ams", false);
    // No healthy local machine: the closest region (by distance: fra).
    for _ in 0..5 {
        assert_eq!(
            backend_of(get(proxy.http, "web.aloft.test", "/", &[]).await),
            "fra"
        );
    }
    // Measured RTT beats distance.
    proxy.proxy.set_rtt("syd", Duration::from_millis(1));
    proxy.proxy.set_rtt("fra", Duration::from_millis(30));
    assert_eq!(
        backend_of(get(proxy.http, "web.aloft.test", "/", &[]).await),
        "syd"
    );
    c.set_machine_health("m-ams", true);
    assert_eq!(
        backend_of(get(proxy.http, "web.aloft.test", "/", &[]).await),
        "ams"
    );

    // Client routing headers.
    let r = get(
        proxy.http,
        "web.aloft.test",
        "/",
        &[("fly-prefer-region", "fra")],
    )
    .await;
    assert_eq!(backend_of(r), "fra");
    let r = get(
        proxy.http,
        "web.aloft.test",
        "/",
        &[("fly-prefer-region", "nrt,syd")],
    )
    .await;
    assert_eq!(backend_of(r), "syd");
    let r = get(
        proxy.http,
        "web.aloft.test",
        "/",
        &[("fly-force-region", "nrt")],
    )
    .await;
    assert_eq!(r.status, 503);
    let r = get(
        proxy.http,
        "web.aloft.test",
        "/",
        &[("fly-force-instance-id", "m-syd")],
    )
    .await;
    assert_eq!(backend_of(r), "syd");
    let r = get(
        proxy.http,
        "web.aloft.test",
        "/",
        &[("fly-prefer-instance-id", "m-fra")],
    )
    .await;
    assert_eq!(backend_of(r), "fra");
    let r = get(
        proxy.http,
        "web.aloft.test",
        "/",
        &[("fly-prefer-instance-id", "gone")],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        echoed(&r.json(), "fly-preferred-instance-unavailable"),
        Some("gone")
    );
    proxy.shutdown().await;
}

fn check(name: &str, status: &str) -> CheckStatus {
    CheckStatus {
        name: name.into(),
        status: status.into(),
        output: String::new(),
        updated_at: None,
    }
}

#[tokio::test]
async fn machines_route_only_once_their_service_checks_pass() {
    let b1 = backend(echo("m1")).await;
    let b2 = backend(echo("m2")).await;
    let proxy = start(config()).await;
    let c = proxy.proxy.catalog();
    let with_checks = |id: &str, addr, checks: Vec<CheckStatus>| {
        let mut m = machine(id, "web", "ams", addr, MachineState::Started);
        m.checks = checks;
        m
    };
    // m1's checks have not run yet ("waiting for status update"); m2's pass.
    c.apply(snapshot(
        1,
        vec![app("web")],
        vec![
            with_checks(
                "m1",
                b1.addr,
                vec![
                    check("servicecheck-00-http-8080", "passing"),
                    check("servicecheck-01-tcp-8080", "warning"),
                ],
            ),
            with_checks(
                "m2",
                b2.addr,
                vec![check("servicecheck-00-http-8080", "passing")],
            ),
        ],
    ));
    let backend_of = |r: Reply| r.header("x-backend").unwrap_or("").to_string();
    for _ in 0..6 {
        assert_eq!(
            backend_of(get(proxy.http, "web.aloft.test", "/", &[]).await),
            "m2"
        );
    }
    // m1 passes, m2 fails; a failing top-level check never matters.
    c.apply(CatalogUpdate::Machine {
        seq: 2,
        machine: with_checks(
            "m1",
            b1.addr,
            vec![
                check("servicecheck-00-http-8080", "passing"),
                check("servicecheck-01-tcp-8080", "passing"),
                check("db", "critical"),
            ],
        ),
    });
    c.apply(CatalogUpdate::Machine {
        seq: 3,
        machine: with_checks(
            "m2",
            b2.addr,
            vec![check("servicecheck-00-http-8080", "critical")],
        ),
    });
    for _ in 0..6 {
        assert_eq!(
            backend_of(get(proxy.http, "web.aloft.test", "/", &[]).await),
            "m1"
        );
    }
    // m2 redeployed without checks: it routes again.
    c.apply(CatalogUpdate::Machine {
        seq: 4,
        machine: with_checks("m2", b2.addr, Vec::new()),
    });
    let mut seen = std::collections::HashSet::new();
    for _ in 0..40 {
        seen.insert(backend_of(
            get(proxy.http, "web.aloft.test", "/", &[]).await,
        ));
    }
    assert!(seen.contains("m2"), "{seen:?}");
    proxy.shutdown().await;
}

/// A machine whose app accepts connections, reads the request and hangs up unanswered.
async fn hangs_up() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = tokio::io::AsyncReadExt::read(&mut stream, &mut buf).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_request_no_app_answered_goes_once_more_to_another_machine() {
    let ok = backend(echo("fra")).await;
    let proxy = start(config()).await;
    let c = proxy.proxy.catalog();
    // The local machine refuses connections; the remote one works.
    c.apply(snapshot(
        1,
        vec![app("web")],
        vec![
            machine(
                "m-ams",
                "web",
                "ams",
                dead_addr().await,
                MachineState::Started,
            ),
            machine("m-fra", "web", "fra", ok.addr, MachineState::Started),
        ],
    ));
    let get_one = || get(proxy.http, "web.aloft.test", "/", &[]);
    let r = get_one().await;
    assert_eq!((r.status, r.header("x-backend")), (200, Some("fra")));
    // Nothing reached the app: even a POST is sent again (hyper's path too, via Expect).
    let post = |headers: &'static [(&'static str, &'static str)]| {
        send(
            proxy.http,
            "POST",
            "web.aloft.test",
            "/",
            headers,
            Bytes::from_static(b"order=1"),
        )
    };
    let r = post(&[]).await;
    assert_eq!((r.status, r.header("x-backend")), (200, Some("fra")));
    let r = post(&[("expect", "100-continue")]).await;
    assert_eq!((r.status, r.header("x-backend")), (200, Some("fra")));

    // The local app takes the request and hangs up: a GET goes to the other machine, a
    // POST (it may have had effects) does not.
    c.apply(snapshot(
        2,
        vec![app("web")],
        vec![
            machine(
                "m-ams",
                "web",
                "ams",
                hangs_up().await,
                MachineState::Started,
            ),
            machine("m-fra", "web", "fra", ok.addr, MachineState::Started),
        ],
    ));
    let r = get_one().await;
    assert_eq!((r.status, r.header("x-backend")), (200, Some("fra")));
    assert_eq!(post(&[]).await.status, 502);
    assert_eq!(post(&[("expect", "100-continue")]).await.status, 502);
    proxy.shutdown().await;
}

/// A fake control plane: records machine actions, and applies them to the proxy's catalog
/// the way the real one publishes state changes.
struct FakeControl {
    addr: SocketAddr,
    actions: Arc<Mutex<Vec<String>>>,
}

type OnAction = Arc<dyn Fn(&str, &str) -> Result<(), ()> + Send + Sync>;

async fn fake_control(on_action: OnAction) -> FakeControl {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let actions = Arc::new(Mutex::new(Vec::new()));
    let recorded = actions.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (recorded, on_action) = (recorded.clone(), on_action.clone());
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let (recorded, on_action) = (recorded.clone(), on_action.clone());
                    async move {
                        let path = req.uri().path().to_string();
                        let auth = req
                            .headers()
                            .get("authorization")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_string();
                        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
                        let status = match parts.as_slice() {
                            ["v1", "apps", _app, "machines", id, action]
                                if auth == "Bearer proxy-token" =>
                            {
                                recorded.lock().unwrap().push(format!("{action} {id}"));
                                if on_action(id, action).is_ok() {
                                    200
                                } else {
                                    400
                                }
                            }
                            _ => 404,
                        };
                        Ok::<_, Infallible>(
                            Response::builder()
                                .status(status)
                                .body(Full::new(Bytes::from("{}")))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    FakeControl { addr, actions }
}

fn autoscaled(port: u16, autostop: AutoStop, min: u32) -> MachineService {
    let mut s = http_service(port);
    s.autostart = Some(true);
    s.autostop = Some(autostop);
    s.min_machines_running = Some(min);
    s
}

#[tokio::test]
async fn autostart_holds_the_request_until_the_machine_accepts_connections() {
    // The machine's address is known, but nothing listens until the "boot" finishes.
    let port = dead_addr().await;
    let proxy_slot: Arc<Mutex<Option<Arc<Proxy>>>> = Arc::new(Mutex::new(None));
    let booted: Arc<Mutex<Option<Backend>>> = Arc::new(Mutex::new(None));
    let (slot, boot) = (proxy_slot.clone(), booted.clone());
    let control = fake_control(Arc::new(move |id: &str, action: &str| {
        if action != "start" {
            return Err(());
        }
        let proxy = slot.lock().unwrap().clone().unwrap();
        let mut started = machine_with(
            id,
            "web",
            "ams",
            port,
            MachineState::Started,
            vec![autoscaled(port.port(), AutoStop::Stop, 0)],
        );
        // Its checks have not run yet: the request that woke it goes to it all the same.
        started.checks = vec![check("servicecheck-00-tcp-8080", "warning")];
        proxy.catalog().apply(CatalogUpdate::Machine {
            seq: 2,
            machine: started,
        });
        let boot = boot.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            *boot.lock().unwrap() = Some(backend_on(port, echo("booted")).await);
        });
        Ok(())
    }))
    .await;
    let mut cfg = config();
    cfg.control_url = format!("http://{}", control.addr);
    cfg.machine_wait = Duration::from_secs(20);
    let proxy = start(cfg).await;
    *proxy_slot.lock().unwrap() = Some(proxy.proxy.clone());
    proxy.proxy.catalog().apply(snapshot(
        1,
        vec![app("web")],
        vec![machine_with(
            "m1",
            "web",
            "ams",
            port,
            MachineState::Stopped,
            vec![autoscaled(port.port(), AutoStop::Stop, 0)],
        )],
    ));
    let r = get(proxy.http, "web.aloft.test", "/", &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-backend"), Some("booted"));
    assert_eq!(
        control.actions.lock().unwrap().clone(),
        vec!["start m1".to_string()]
    );
    let metrics = proxy.proxy.render_metrics();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("aloft_proxy_machine_starts_total{") && l.ends_with(" 1")),
        "{metrics}"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn autostop_stops_excess_one_per_region_per_pass_and_keeps_min_in_primary() {
    let b1 = backend(echo("1")).await;
    let b2 = backend(echo("2")).await;
    let b3 = backend(echo("3")).await;
    let proxy_slot: Arc<Mutex<Option<Arc<Proxy>>>> = Arc::new(Mutex::new(None));
    let slot = proxy_slot.clone();
    let seq = Arc::new(std::sync::atomic::AtomicU64::new(10));
    let control = fake_control(Arc::new(move |id: &str, action: &str| {
        if action == "suspend" {
            return Err(()); // this driver cannot suspend
        }
        let proxy = slot.lock().unwrap().clone().unwrap();
        let snapshot = proxy.catalog().snapshot();
        let m = snapshot.apps["web"]
            .machines
            .iter()
            .find(|m| m.id == id)
            .unwrap();
        let mut stopped = machine_with(
            id,
            "web",
            &m.region,
            m.backends[0].as_ref().unwrap().addr,
            MachineState::Stopped,
            m.services.clone(),
        );
        stopped.state = MachineState::Stopped;
        let s = seq.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        proxy.catalog().apply(CatalogUpdate::Machine {
            seq: s,
            machine: stopped,
        });
        Ok(())
    }))
    .await;
    let mut cfg = config();
    cfg.control_url = format!("http://{}", control.addr);
    let proxy = start(cfg).await;
    *proxy_slot.lock().unwrap() = Some(proxy.proxy.clone());
    let c = proxy.proxy.catalog();
    c.apply(snapshot(
        1,
        vec![app("web")],
        vec![
            machine_with(
                "m1",
                "web",
                "ams",
                b1.addr,
                MachineState::Started,
                vec![autoscaled(b1.addr.port(), AutoStop::Suspend, 1)],
            ),
            machine_with(
                "m2",
                "web",
                "ams",
                b2.addr,
                MachineState::Started,
                vec![autoscaled(b2.addr.port(), AutoStop::Suspend, 1)],
            ),
            machine_with(
                "m3",
                "web",
                "ams",
                b3.addr,
                MachineState::Started,
                vec![autoscaled(b3.addr.port(), AutoStop::Suspend, 1)],
            ),
        ],
    ));
    c.set_app_extras(
        "web",
        AppExtras {
            ips: vec![],
            primary_region: Some("ams".into()),
        },
    );

    // 3 idle machines: excess = 3 - (0 + 1) = 2, but one per region per pass.
    let stopped = proxy.proxy.autostop_pass().await;
    assert_eq!(stopped.len(), 1);
    let stopped = proxy.proxy.autostop_pass().await;
    assert_eq!(stopped.len(), 1);
    // One left in the primary region with min_machines_running = 1: kept.
    assert!(proxy.proxy.autostop_pass().await.is_empty());
    let actions = control.actions.lock().unwrap().clone();
    // suspend was tried first and fell back to stop.
    assert_eq!(
        actions.iter().filter(|a| a.starts_with("suspend")).count(),
        2,
        "{actions:?}"
    );
    assert_eq!(
        actions.iter().filter(|a| a.starts_with("stop")).count(),
        2,
        "{actions:?}"
    );

    // Outside the primary region the last idle machine is stopped too.
    c.set_app_extras(
        "web",
        AppExtras {
            ips: vec![],
            primary_region: Some("iad".into()),
        },
    );
    assert_eq!(proxy.proxy.autostop_pass().await.len(), 1);
    proxy.shutdown().await;
}

#[tokio::test]
async fn autostop_keeps_machines_that_carry_load() {
    let (open, gate) = watch::channel(false);
    let b1 = backend(gated("1", gate.clone())).await;
    let b2 = backend(gated("2", gate.clone())).await;
    let control = fake_control(Arc::new(|_: &str, _: &str| Ok(()))).await;
    let mut cfg = config();
    cfg.control_url = format!("http://{}", control.addr);
    let proxy = start(cfg).await;
    let mut s1 = autoscaled(b1.addr.port(), AutoStop::Stop, 0);
    s1.concurrency = Some(ServiceConcurrency {
        kind: "requests".into(),
        soft_limit: 1,
        hard_limit: 10,
    });
    let mut s2 = autoscaled(b2.addr.port(), AutoStop::Stop, 0);
    s2.concurrency = s1.concurrency.clone();
    proxy.proxy.catalog().apply(snapshot(
        1,
        vec![app("web")],
        vec![
            machine_with("m1", "web", "ams", b1.addr, MachineState::Started, vec![s1]),
            machine_with("m2", "web", "ams", b2.addr, MachineState::Started, vec![s2]),
        ],
    ));
    // Both machines at their soft limit: excess = 2 - (2 + 1) < 1, nothing stops.
    let addr = proxy.http;
    let r1 = tokio::spawn(async move { get(addr, "web.aloft.test", "/", &[]).await });
    let r2 = tokio::spawn(async move { get(addr, "web.aloft.test", "/", &[]).await });
    eventually("both busy", || async {
        b1.requests.load(std::sync::atomic::Ordering::SeqCst) == 1
            && b2.requests.load(std::sync::atomic::Ordering::SeqCst) == 1
    })
    .await;
    assert!(proxy.proxy.autostop_pass().await.is_empty());
    open.send(true).unwrap();
    assert_eq!(r1.await.unwrap().status, 200);
    assert_eq!(r2.await.unwrap().status, 200);
    proxy.shutdown().await;
}

#[tokio::test]
async fn catalog_changes_apply_at_once_without_dropping_in_flight_requests() {
    let (open, gate) = watch::channel(false);
    let old = backend(gated("old", gate)).await;
    let new = backend(echo("new")).await;
    let proxy = start(config()).await;
    let c = proxy.proxy.catalog();
    c.apply(snapshot(
        1,
        vec![app("web")],
        vec![machine(
            "m-old",
            "web",
            "ams",
            old.addr,
            MachineState::Started,
        )],
    ));
    let addr = proxy.http;
    let inflight = tokio::spawn(async move { get(addr, "web.aloft.test", "/", &[]).await });
    eventually("request at the old machine", || async {
        old.requests.load(std::sync::atomic::Ordering::SeqCst) == 1
    })
    .await;
    // The old machine is destroyed and a new one started: the next request goes to it.
    c.apply_all([
        CatalogUpdate::MachineRemoved {
            seq: 2,
            id: "m-old".into(),
        },
        CatalogUpdate::Machine {
            seq: 3,
            machine: machine("m-new", "web", "ams", new.addr, MachineState::Started),
        },
    ]);
    let r = get(addr, "web.aloft.test", "/", &[]).await;
    assert_eq!(r.header("x-backend"), Some("new"));
    // The request in flight on the old machine still completes.
    open.send(true).unwrap();
    let r = inflight.await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-backend"), Some("old"));
    proxy.shutdown().await;
}
