//! The catalog publishes each app's primary region from its latest release, so proxies
//! keep `min_machines_running` machines in that region.

use std::sync::Arc;

use aloft_control::catalog::Catalog;
use aloft_control::store::{AppRow, HostRow, OrgRow, Store};

fn app_with_host(host_region: &str) -> (Arc<Store>, AppRow) {
    let store = Arc::new(Store::open_in_memory().expect("in-memory store"));
    let org = OrgRow {
        id: "o1".into(),
        slug: "personal".into(),
        name: "Personal".into(),
        created_at: "2026-01-01T00:00:00Z".into(),
    };
    store.create_org(&org).expect("org");
    let app = AppRow {
        id: "a1".into(),
        name: "web".into(),
        org_id: org.id.clone(),
        org_slug: org.slug.clone(),
        network: "default".into(),
        status: "deployed".into(),
        created_at: "2026-01-01T00:00:00Z".into(),
    };
    store.create_app(&app).expect("app");
    store
        .upsert_host(&HostRow {
            id: "h1".into(),
            region: host_region.into(),
            agent_url: "http://127.0.0.1:1".into(),
            last_seen: "2026-01-01T00:00:00Z".into(),
            cpus: 0,
            memory_mb: 0,
            cordoned: false,
        })
        .expect("host");
    (store, app)
}

#[test]
fn primary_region_comes_from_the_latest_release() {
    let (store, app) = app_with_host("ams");
    let catalog = Catalog::new("aloft.test", store.clone());
    assert_eq!(
        catalog.app_entry(&app, &[]).primary_region,
        None,
        "no release yet"
    );

    store
        .create_release(
            &app.id,
            "r1",
            "img",
            r#"{"app":"web","primary_region":"ams"}"#,
            "deploy",
            "admin",
        )
        .expect("release");
    assert_eq!(
        catalog.app_entry(&app, &[]).primary_region.as_deref(),
        Some("ams")
    );

    store
        .create_release(&app.id, "r2", "img", r#"{"app":"web"}"#, "deploy", "admin")
        .expect("release");
    assert_eq!(
        catalog.app_entry(&app, &[]).primary_region,
        None,
        "a release without primary_region names none"
    );
}

#[test]
fn primary_region_without_hosts_is_the_nearest_region_that_has_some() {
    let (store, app) = app_with_host("ams");
    let catalog = Catalog::new("aloft.test", store.clone());
    store
        .create_release(
            &app.id,
            "r1",
            "img",
            r#"{"app":"web","primary_region":"fra"}"#,
            "deploy",
            "admin",
        )
        .expect("release");
    assert_eq!(
        catalog.app_entry(&app, &[]).primary_region.as_deref(),
        Some("ams")
    );
}
