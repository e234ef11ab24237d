//! Org boundaries and the platform's own credentials over HTTP: what one org's token can
//! reach of another org or of the operator's admin token, per-org limits, and token root
//! keys at rest.

mod common;

use aloft_api::token::Token;
use aloft_control::{ControlConfig, ControlPlane};
use common::{Harness, create_app, send, start};
use http::{Method, StatusCode};
use serde_json::{Value, json};

fn machine(memory_mb: u32) -> Value {
    json!({ "config": { "image": "nginx", "guest": { "cpus": 1, "memory_mb": memory_mb } }, "region": "iad" })
}

/// A second org (`acme-corp`) with an app, and an org token of the `personal` org.
async fn two_orgs(h: &Harness) -> aloft_client::Client {
    let (status, org) = send(
        &h.admin,
        Method::POST,
        "/v1/orgs",
        Some(json!({ "name": "Acme Corp" })),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{org}");
    let (status, app) = send(
        &h.admin,
        Method::POST,
        "/v1/apps",
        Some(json!({ "app_name": "acme-web", "org_slug": "acme-corp" })),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{app}");
    let (status, token) = send(
        &h.admin,
        Method::POST,
        "/v1/tokens",
        Some(json!({ "type": "org", "org_slug": "personal" })),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{token}");
    h.client(token["token"].as_str().unwrap())
}

fn admin_token_id(h: &Harness) -> String {
    Token::decode(&h.admin_token).unwrap().id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ip_assignment_into_another_org_is_not_found_and_creates_nothing() {
    let h = start().await;
    let personal = two_orgs(&h).await;
    create_app(&h.admin, "mine").await;
    let networks_before = aloft_control::ips::find_network(
        &h.plane.store,
        &h.plane.store.org_by_slug("acme-corp").unwrap().unwrap().id,
        "default",
    )
    .unwrap();

    let mut answers = Vec::new();
    for slug in ["acme-corp", "no-such-org"] {
        let (status, body) = send(
            &personal,
            Method::POST,
            "/v1/apps/mine/ip_assignments",
            Some(json!({ "type": "private_v6", "org_slug": slug })),
        )
        .await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{slug}: {body}");
        answers.push(body["error"].as_str().unwrap().replace(slug, "<slug>"));
    }
    assert_eq!(
        answers[0], answers[1],
        "an org the caller cannot see answers like one that does not exist"
    );
    let (_, ips) = send(&personal, Method::GET, "/v1/apps/mine/ip_assignments", None).await;
    assert_eq!(ips["ips"], json!([]), "nothing was assigned");
    let acme = h.plane.store.org_by_slug("acme-corp").unwrap().unwrap();
    assert_eq!(
        aloft_control::ips::find_network(&h.plane.store, &acme.id, "default").unwrap(),
        networks_before,
        "no network was made in the other org"
    );

    // The operator's user token is a member of both orgs, so it may.
    let (status, body) = send(
        &h.admin,
        Method::POST,
        "/v1/apps/mine/ip_assignments",
        Some(json!({ "type": "private_v6", "org_slug": "acme-corp" })),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn org_tokens_see_and_revoke_only_their_orgs_own_tokens() {
    let h = start().await;
    let personal = two_orgs(&h).await;
    let admin_id = admin_token_id(&h);

    let (status, tokens) = send(&personal, Method::GET, "/v1/tokens", None).await;
    assert_eq!(status, StatusCode::OK, "{tokens}");
    let listed: Vec<&str> = tokens["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap())
        .collect();
    assert!(!listed.is_empty(), "the org token sees its own: {tokens}");
    assert!(
        !listed.contains(&admin_id.as_str()),
        "an org token lists the operator's user token: {tokens}"
    );
    assert!(
        tokens["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["type"] != "user"),
        "{tokens}"
    );

    let (status, body) = send(
        &personal,
        Method::DELETE,
        &format!("/v1/tokens/{admin_id}"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, body) = send(&h.admin, Method::GET, "/v1/apps", None).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the admin token still works: {body}"
    );

    // The operator still sees and may revoke every token of its orgs.
    let (_, tokens) = send(&h.admin, Method::GET, "/v1/tokens", None).await;
    assert!(
        tokens["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["id"] == admin_id.as_str()),
        "{tokens}"
    );
}

fn reopen(h: &Harness) -> (std::sync::Arc<ControlPlane>, aloft_control::Credentials) {
    ControlPlane::open(ControlConfig {
        data_dir: h.dir.path().to_path_buf(),
        listen: "127.0.0.1:0".parse().unwrap(),
        region: "iad".into(),
        base_domain: "localhost".into(),
        proxy_http_port: 8080,
        database_url: None,
        acme: false,
        registry_upstream: None,
        allowed_private_registries: Vec::new(),
    })
    .expect("reopening the control plane")
}

async fn serve(plane: std::sync::Arc<ControlPlane>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(plane.serve(listener, std::future::pending()));
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_admin_token_stays_revoked_after_a_restart() {
    let h = start().await;
    let admin_id = admin_token_id(&h);
    let (status, body) = send(
        &h.admin,
        Method::DELETE,
        &format!("/v1/tokens/{admin_id}"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (plane, credentials) = reopen(&h);
    let url = serve(plane).await;
    for token in [&h.admin_token, &credentials.admin_token] {
        let client = aloft_client::Client::new(&url, Some(token.to_string()));
        let (status, body) = send(&client, Method::GET, "/v1/apps", None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    }

    // The operator's way back: a new admin token, minted from the data dir.
    let minted = aloft_control::mint_admin_token(&aloft_control::DataDirAccess {
        data_dir: h.dir.path().to_path_buf(),
        database_url: None,
    })
    .expect("minting a new admin token");
    let client = aloft_client::Client::new(&url, Some(minted.clone()));
    let (status, orgs) = send(&client, Method::GET, "/v1/orgs", None).await;
    assert_eq!(status, StatusCode::OK, "{orgs}");
    let (status, body) = send(&client, Method::POST, "/v1/secrets/rotate-key", None).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the new token is the operator's: {body}"
    );
    let (plane, credentials) = reopen(&h);
    assert_eq!(credentials.admin_token, minted, "it stays the admin token");
    drop(plane);
}

/// Every 32-byte window of `bytes` that, as an HMAC root key, verifies `token`.
fn windows_that_verify(bytes: &[u8], token: &Token) -> usize {
    bytes
        .windows(32)
        .filter(|key| token.verify(key).is_ok())
        .count()
}

fn database_bytes(dir: &std::path::Path) -> Vec<u8> {
    let mut bytes = Vec::new();
    for name in ["control.db", "control.db-wal"] {
        if let Ok(data) = std::fs::read(dir.join(name)) {
            bytes.extend(data);
        }
    }
    bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_root_keys_are_not_in_the_database_and_survive_restart_and_rotation() {
    let h = start().await;
    let (status, created) = send(
        &h.admin,
        Method::POST,
        "/v1/tokens",
        Some(json!({ "type": "org" })),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let org_token = created["token"].as_str().unwrap().to_string();
    let tokens = [
        Token::decode(&h.admin_token).unwrap(),
        Token::decode(&org_token).unwrap(),
    ];
    let bytes = database_bytes(h.dir.path());
    assert!(bytes.len() > 4096, "the database is there");
    for token in &tokens {
        assert_eq!(
            windows_that_verify(&bytes, token),
            0,
            "the database holds the root key of token {}",
            token.id
        );
    }

    let (status, body) = send(&h.admin, Method::POST, "/v1/secrets/rotate-key", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (plane, _) = reopen(&h);
    let url = serve(plane).await;
    for text in [&h.admin_token, &org_token] {
        let client = aloft_client::Client::new(&url, Some(text.to_string()));
        let (status, body) = send(&client, Method::GET, "/v1/apps", None).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "after a restart and rotate-key: {body}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_token_keys_from_before_are_sealed_on_start_and_keep_working() {
    let dir = tempfile::tempdir().unwrap();
    let key = vec![7u8; 32];
    {
        let store = aloft_control::store::Store::open(&dir.path().join("control.db")).unwrap();
        let org = aloft_control::store::OrgRow {
            id: "org1".into(),
            slug: "personal".into(),
            name: "Personal".into(),
            created_at: aloft_control::store::now_rfc3339(),
        };
        store.create_org(&org).unwrap();
        store
            .insert_token(&aloft_control::store::TokenRow {
                id: "oldtoken".into(),
                org_id: "org1".into(),
                kind: "org".into(),
                name: "old".into(),
                key: key.clone(),
                created_at: aloft_control::store::now_rfc3339(),
                revoked: false,
                expires_at: None,
                apps: Vec::new(),
            })
            .unwrap();
    }
    let old = Token::mint("oldtoken", &key, Vec::new());
    assert!(windows_that_verify(&database_bytes(dir.path()), &old) > 0);
    let (plane, _) = ControlPlane::open(ControlConfig {
        data_dir: dir.path().to_path_buf(),
        listen: "127.0.0.1:0".parse().unwrap(),
        region: "iad".into(),
        base_domain: "localhost".into(),
        proxy_http_port: 8080,
        database_url: None,
        acme: false,
        registry_upstream: None,
        allowed_private_registries: Vec::new(),
    })
    .unwrap();
    let url = serve(plane.clone()).await;
    let client = aloft_client::Client::new(&url, Some(old.encode()));
    let (status, body) = send(&client, Method::GET, "/v1/apps", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let checkpoint = rusqlite::Connection::open(dir.path().join("control.db")).unwrap();
    checkpoint
        .pragma_update(None, "wal_checkpoint", "TRUNCATE")
        .unwrap();
    assert_eq!(
        windows_that_verify(&database_bytes(dir.path()), &old),
        0,
        "the old plain key is sealed"
    );
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn org_limits_refuse_machines_beyond_count_and_memory_creating_nothing() {
    let h = start().await;
    h.plane
        .store
        .set_setting(aloft_control::machines::SETTING_ORG_MAX_MACHINES, "2")
        .unwrap();
    h.plane
        .store
        .set_setting(aloft_control::machines::SETTING_ORG_MAX_MEMORY_MB, "1024")
        .unwrap();
    create_app(&h.admin, "limited").await;
    let count = || async {
        let (_, list) = send(&h.admin, Method::GET, "/v1/apps/limited/machines", None).await;
        list.as_array().map_or(0, Vec::len)
    };

    let (status, body) = send(
        &h.admin,
        Method::POST,
        "/v1/apps/limited/machines",
        Some(machine(2048)),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(
        error.contains("personal") && error.contains("1024 MB"),
        "names the org and the limit: {error}"
    );
    assert_eq!(count().await, 0);

    for _ in 0..2 {
        let (status, body) = send(
            &h.admin,
            Method::POST,
            "/v1/apps/limited/machines",
            Some(machine(256)),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let (status, body) = send(
        &h.admin,
        Method::POST,
        "/v1/apps/limited/machines",
        Some(machine(256)),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(
        error.contains("personal") && error.contains("2 machines"),
        "names the org and the limit: {error}"
    );
    assert_eq!(count().await, 2);

    // Growing a machine past the memory limit is refused too, and changes nothing.
    let (_, list) = send(&h.admin, Method::GET, "/v1/apps/limited/machines", None).await;
    let id = list[0]["id"].as_str().unwrap().to_string();
    let (status, body) = send(
        &h.admin,
        Method::POST,
        &format!("/v1/apps/limited/machines/{id}"),
        Some(json!({ "config": { "image": "nginx", "guest": { "cpus": 1, "memory_mb": 1024 } } })),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let (_, shown) = send(
        &h.admin,
        Method::GET,
        &format!("/v1/apps/limited/machines/{id}"),
        None,
    )
    .await;
    assert_eq!(shown["config"]["guest"]["memory_mb"], 256, "{shown}");
    let (status, body) = send(
        &h.admin,
        Method::POST,
        &format!("/v1/apps/limited/machines/{id}"),
        Some(json!({ "config": { "image": "nginx", "guest": { "cpus": 1, "memory_mb": 512 } } })),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "within the limit: {body}");
}
