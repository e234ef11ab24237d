//! A control plane takes up only the unfinished deploys nobody else holds: one whose
//! lease another control plane holds and renews is left to it; one whose holder's lease
//! ran out is taken over (once, however often it looks), and goes on from its record.

mod common;

use std::time::{Duration, Instant};

use aloft_api::internal::DeployEvent;
use aloft_control::deploy;
use aloft_control::store::{AppRow, DeployRow, now_millis, now_rfc3339};

fn deploy_row(id: &str, app_id: &str, owner: &str, expires_at: i64) -> DeployRow {
    DeployRow {
        id: id.into(),
        app_id: app_id.into(),
        status: "running".into(),
        request: r#"{"config": {"app": "leased"}, "image": "img"}"#.into(),
        user: "admin".into(),
        // No release yet: resuming it ends at once, with the reason.
        release_id: String::new(),
        progress: "{}".into(),
        created_at: now_rfc3339(),
        updated_at: now_rfc3339(),
        lease_owner: owner.into(),
        lease_expires_at: expires_at,
    }
}

fn events(h: &common::Harness, id: &str) -> Vec<DeployEvent> {
    h.plane
        .store
        .deploy_events(id)
        .unwrap()
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_deploys_whose_lease_ran_out_are_taken_over_and_only_once() {
    let h = common::start().await;
    let store = &h.plane.store;
    let org = store.org_by_slug("personal").unwrap().unwrap();
    store
        .create_app(&AppRow {
            id: "app-leased".into(),
            name: "leased".into(),
            org_id: org.id.clone(),
            org_slug: org.slug.clone(),
            network: "default".into(),
            status: "deployed".into(),
            created_at: now_rfc3339(),
        })
        .unwrap();
    let now = now_millis();
    // Held by a live control plane elsewhere, and abandoned by a dead one.
    store
        .insert_deploy(&deploy_row("held", "app-leased", "cp-alive", now + 60_000))
        .unwrap();
    store
        .insert_deploy(&deploy_row("abandoned", "app-leased", "cp-dead", now - 1))
        .unwrap();

    // Looked at several times at once (the server's own takeover loop runs as well).
    for _ in 0..3 {
        deploy::resume_unfinished(&h.plane);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while store.deploy("abandoned").unwrap().unwrap().status == "running" {
        assert!(Instant::now() < deadline, "the abandoned deploy never ran");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    deploy::resume_unfinished(&h.plane);
    tokio::time::sleep(Duration::from_millis(300)).await;

    let taken = store.deploy("abandoned").unwrap().unwrap();
    assert_eq!(taken.status, "failed");
    assert_eq!(taken.lease_owner, h.plane.node_id, "{taken:?}");
    let log = events(&h, "abandoned");
    let takeovers = log
        .iter()
        .filter(|e| {
            matches!(e, DeployEvent::Progress { message }
                if message.starts_with("The control plane running it stopped; deploy abandoned goes on"))
        })
        .count();
    assert_eq!(takeovers, 1, "taken over exactly once: {log:?}");
    assert!(
        matches!(log.last(), Some(DeployEvent::Error { message, .. })
            if message.contains("stopped before this deploy made its release")),
        "{log:?}"
    );

    let held = store.deploy("held").unwrap().unwrap();
    assert_eq!(held.status, "running", "{held:?}");
    assert_eq!(held.lease_owner, "cp-alive");
    assert!(events(&h, "held").is_empty(), "left alone");
}
