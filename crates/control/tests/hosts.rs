//! Hosts joining the control plane: join tokens, heartbeats, bad input from hosts, the
//! operator's host commands, and placement across hosts (cordon, down, capacity, spread).

mod common;

use aloft_client::Client;
use common::{Harness, create_app, create_machine, send, start};
use http::{Method, StatusCode};
use serde_json::{Value, json};

/// A join token from `POST /v1/tokens {"type":"host"}` (what `aloft tokens create host` does).
async fn join_token(h: &Harness) -> String {
    let (status, body) = send(
        &h.admin,
        Method::POST,
        "/v1/tokens",
        Some(json!({ "type": "host" })),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["type"], "host", "{body}");
    body["token"].as_str().unwrap().to_string()
}

fn registration(id: &str, cpus: u64, memory_mb: u64, agent_url: &str) -> Value {
    json!({ "id": id, "region": "iad", "agent_url": agent_url, "cpus": cpus, "memory_mb": memory_mb })
}

async fn heartbeat(client: &Client, id: &str, time: &str) -> (StatusCode, Value) {
    send(
        client,
        Method::POST,
        &format!("/v1/hosts/{id}/heartbeat"),
        Some(json!({ "time": time })),
    )
    .await
}

fn now_plus(secs: i64) -> String {
    (chrono::Utc::now() + chrono::Duration::seconds(secs)).to_rfc3339()
}

async fn host_json(h: &Harness, id: &str) -> Value {
    let (status, body) = send(&h.admin, Method::GET, &format!("/v1/hosts/{id}"), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_token_joins_one_host_which_then_heartbeats() {
    let h = start().await;
    let token = join_token(&h).await;
    let joiner = h.client(&token);

    // Before it joins, the token does nothing else.
    let (status, body) = send(&joiner, Method::GET, "/v1/catalog/watch", None).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("has not joined"),
        "{body}"
    );

    let (status, body) = send(
        &joiner,
        Method::POST,
        "/v1/hosts",
        Some(registration("h2", 4, 8192, &h.agent_url)),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = heartbeat(&joiner, "h2", &now_plus(0)).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");

    let (status, list) = send(&h.admin, Method::GET, "/v1/hosts", None).await;
    assert_eq!(status, StatusCode::OK, "{list}");
    let ids: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["h1", "h2"]);
    let h2 = host_json(&h, "h2").await;
    assert_eq!(h2["status"], "up", "{h2}");
    assert_eq!(h2["cpus"], 4);
    assert_eq!(h2["memory_mb"], 8192);
    assert_eq!(h2["machines"], 0);

    // The token is h2's now: it cannot speak for another host.
    let (status, body) = send(
        &joiner,
        Method::POST,
        "/v1/hosts",
        Some(registration("h3", 4, 8192, &h.agent_url)),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body["error"].as_str().unwrap().contains("h3"), "{body}");
    let (status, _) = heartbeat(&joiner, "h1", &now_plus(0)).await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // Another join token cannot take over a host that has joined.
    let other = h.client(&join_token(&h).await);
    for taken in ["h1", "h2"] {
        let (status, body) = send(
            &other,
            Method::POST,
            "/v1/hosts",
            Some(registration(taken, 1, 1, "http://127.0.0.1:1")),
        )
        .await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .contains(&format!("host {taken} has joined already")),
            "{body}"
        );
    }
    assert_eq!(host_json(&h, "h2").await["agent_url"], h.agent_url.as_str());

    // Bad ids and URLs are named.
    let (status, body) = send(
        &other,
        Method::POST,
        "/v1/hosts",
        Some(registration("../etc", 1, 1, &h.agent_url)),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body["error"].as_str().unwrap().starts_with("invalid id"),
        "{body}"
    );
    let (status, body) = send(
        &other,
        Method::POST,
        "/v1/hosts",
        Some(registration("h4", 1, 1, "file:///etc/passwd")),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .starts_with("invalid agent_url"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_host_tokens_and_skewed_clocks_are_refused_and_nothing_else_changes() {
    let h = start().await;
    let token = join_token(&h).await;
    let joiner = h.client(&token);
    let (status, _) = send(
        &joiner,
        Method::POST,
        "/v1/hosts",
        Some(registration("h2", 4, 8192, &h.agent_url)),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let before = host_json(&h, "h2").await;

    // A wrong token.
    let mut wrong = token.clone();
    wrong.pop();
    wrong.push(if token.ends_with('A') { 'B' } else { 'A' });
    let (status, body) = send(
        &h.client(&wrong),
        Method::POST,
        "/v1/hosts",
        Some(registration("h2", 1, 1, "http://127.0.0.1:1")),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    let (status, _) = heartbeat(&h.client("nonsense"), "h2", &now_plus(0)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // A clock minutes off, either way, or no time at all.
    let (status, body) = heartbeat(&joiner, "h2", &now_plus(300)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let message = body["error"].as_str().unwrap();
    let seconds: i64 = message
        .split("clock is ")
        .nth(1)
        .and_then(|rest| rest.split('s').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{body}"));
    assert!((299..=300).contains(&seconds), "{body}");
    assert!(message.contains("s ahead of the control plane's"), "{body}");
    let (status, body) = heartbeat(&joiner, "h2", &now_plus(-3600)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body["error"].as_str().unwrap().contains("behind"), "{body}");
    let (status, body) = heartbeat(&joiner, "h2", "yesterday").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body["error"].as_str().unwrap().starts_with("invalid time"),
        "{body}"
    );
    // A skewed heartbeat did not count as one.
    h.plane
        .store
        .touch_host("h2", "2020-01-01T00:00:00Z")
        .unwrap();
    let (status, _) = heartbeat(&joiner, "h2", &now_plus(120)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(host_json(&h, "h2").await["status"], "down");
    let (status, _) = heartbeat(&joiner, "h2", &now_plus(1)).await;
    assert_eq!(status, StatusCode::NO_CONTENT);

    // A revoked token.
    let token_id = aloft_api::token::Token::decode(&token).unwrap().id;
    assert!(h.plane.store.revoke_token(&token_id).unwrap());
    let (status, body) = heartbeat(&joiner, "h2", &now_plus(0)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("revoked"),
        "{body}"
    );

    // Nothing else changed: h2 is as it was, h1 still takes machines.
    let after = host_json(&h, "h2").await;
    for field in ["region", "agent_url", "cpus", "memory_mb"] {
        assert_eq!(before[field], after[field], "{field}");
    }
    assert_eq!(host_json(&h, "h1").await["status"], "up");
    create_app(&h.admin, "web").await;
    create_machine(&h.admin, "web", json!({ "config": { "image": "nginx" } })).await;

    // Only the operator's admin token manages hosts.
    let (status, body) = send(&h.host, Method::GET, "/v1/hosts", None).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let (status, body) = send(
        &h.admin,
        Method::POST,
        "/v1/tokens",
        Some(json!({ "type": "org" })),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let org = h.client(body["token"].as_str().unwrap());
    let (status, _) = send(&org, Method::GET, "/v1/hosts", None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = send(
        &org,
        Method::POST,
        "/v1/tokens",
        Some(json!({ "type": "host" })),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

/// The host each machine of `app` is on, by machine id.
fn hosts_of(h: &Harness, app: &str) -> Vec<String> {
    let app = h.plane.store.app(app).unwrap().unwrap();
    h.plane
        .store
        .list_machines(&app.id, false)
        .unwrap()
        .into_iter()
        .map(|m| m.host_id)
        .collect()
}

async fn machine(h: &Harness, app: &str, memory_mb: u32) -> (StatusCode, Value) {
    send(
        &h.admin,
        Method::POST,
        &format!("/v1/apps/{app}/machines"),
        Some(json!({ "config": { "image": "nginx", "guest": { "cpus": 1, "memory_mb": memory_mb } }, "region": "iad" })),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn machines_spread_over_hosts_and_skip_cordoned_down_and_full_ones() {
    let h = start().await;
    let joiner = h.client(&join_token(&h).await);
    let (status, _) = send(
        &joiner,
        Method::POST,
        "/v1/hosts",
        Some(registration("h2", 2, 1024, &h.agent_url)),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    create_app(&h.admin, "web").await;

    // Spread: one on each host.
    for _ in 0..2 {
        let (status, body) = machine(&h, "web", 256).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let mut placed = hosts_of(&h, "web");
    placed.sort();
    assert_eq!(placed, ["h1", "h2"]);
    let h2 = host_json(&h, "h2").await;
    assert_eq!(h2["machines"], 1);
    assert_eq!(
        h2["cpus_reserved"], 0.0625,
        "a shared CPU reserves a sixteenth"
    );
    assert_eq!(h2["memory_reserved_mb"], 256);

    // Cordoned: h2 gets nothing new.
    let (status, body) = send(&h.admin, Method::POST, "/v1/hosts/h2/cordon", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "cordoned");
    for _ in 0..2 {
        let (status, body) = machine(&h, "web", 256).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    assert_eq!(hosts_of(&h, "web").iter().filter(|x| *x == "h2").count(), 1);
    let (status, body) = send(&h.admin, Method::POST, "/v1/hosts/h2/uncordon", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "up");

    // Full: h2 has 1.94 of 2 CPUs and 768 of 1024 MB left; with h1 cordoned, a 1 GB
    // machine fits nowhere, nor does one of 2 performance CPUs, and the error says why.
    let (status, _) = send(&h.admin, Method::POST, "/v1/hosts/h1/cordon", None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = machine(&h, "web", 1024).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let message = body["error"].as_str().unwrap();
    assert!(
        message.contains("insufficient resources")
            && message.contains("h2 has 1.94 of 2 CPUs and 768 of 1024 MB free"),
        "{body}"
    );
    let (status, body) = send(
        &h.admin,
        Method::POST,
        "/v1/apps/web/machines",
        Some(json!({ "config": { "image": "nginx", "guest": { "cpu_kind": "performance", "cpus": 2, "memory_mb": 256 } } })),
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("a machine of 2 CPUs and 256 MB"),
        "{body}"
    );
    let (status, body) = machine(&h, "web", 512).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(hosts_of(&h, "web").iter().filter(|x| *x == "h2").count(), 2);
    let (status, _) = send(&h.admin, Method::POST, "/v1/hosts/h1/uncordon", None).await;
    assert_eq!(status, StatusCode::OK);

    // Down (no heartbeat for longer than the timeout): no new machines, and its machines
    // say their host is unreachable.
    h.plane
        .store
        .touch_host("h2", "2020-01-01T00:00:00Z")
        .unwrap();
    assert_eq!(host_json(&h, "h2").await["status"], "down");
    h.plane.mark_silent_hosts().unwrap();
    let on_h2 = {
        let app = h.plane.store.app("web").unwrap().unwrap();
        h.plane
            .store
            .list_machines(&app.id, false)
            .unwrap()
            .into_iter()
            .find(|m| m.host_id == "h2")
            .unwrap()
            .id
    };
    let (status, body) = send(
        &h.admin,
        Method::GET,
        &format!("/v1/apps/web/machines/{on_h2}"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["host_status"], "unreachable", "{body}");
    let (status, body) = machine(&h, "web", 256).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(hosts_of(&h, "web").iter().filter(|x| *x == "h2").count(), 2);

    // Remove refuses a host with machines, naming them.
    let (status, body) = send(&h.admin, Method::DELETE, "/v1/hosts/h2", None).await;
    assert_eq!(status, StatusCode::PRECONDITION_FAILED, "{body}");
    assert!(body["error"].as_str().unwrap().contains(&on_h2), "{body}");
    let (status, _) = send(&h.admin, Method::DELETE, "/v1/hosts/nope", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_host_is_removed_and_its_token_revoked() {
    let h = start().await;
    let joiner = h.client(&join_token(&h).await);
    let (status, _) = send(
        &joiner,
        Method::POST,
        "/v1/hosts",
        Some(registration("h2", 2, 1024, &h.agent_url)),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = send(&h.admin, Method::DELETE, "/v1/hosts/h2", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, _) = send(&h.admin, Method::GET, "/v1/hosts/h2", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, body) = heartbeat(&joiner, "h2", &now_plus(0)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    // A fresh join token may join the same id again.
    let again = h.client(&join_token(&h).await);
    let (status, body) = send(
        &again,
        Method::POST,
        "/v1/hosts",
        Some(registration("h2", 2, 1024, &h.agent_url)),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_pin_machines_to_their_host_and_new_volumes_skip_cordoned_hosts() {
    let h = start().await;
    let joiner = h.client(&join_token(&h).await);
    let (status, _) = send(
        &joiner,
        Method::POST,
        "/v1/hosts",
        Some(registration("h2", 0, 0, &h.agent_url)),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    common::keep_alive(joiner.clone(), "h2");
    create_app(&h.admin, "db").await;
    let volume = |name: &'static str| {
        let admin = h.admin.clone();
        async move {
            let (status, volume) = send(
                &admin,
                Method::POST,
                "/v1/apps/db/volumes",
                Some(json!({ "name": name, "region": "iad" })),
            )
            .await;
            assert_eq!(status, StatusCode::OK, "{volume}");
            volume["id"].as_str().unwrap().to_string()
        }
    };
    let on_h1 = volume("one").await;
    assert_eq!(host_json(&h, "h1").await["volume_ids"], json!([on_h1]));

    // A plain machine goes to h1; spreading would put the next on h2, but its volume is
    // on h1, so it goes there.
    let (status, body) = machine(&h, "db", 256).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(hosts_of(&h, "db"), ["h1"]);
    let mounted = json!({ "config": { "image": "nginx", "mounts": [{ "volume": on_h1, "path": "/data" }] }, "region": "iad" });
    create_machine(&h.admin, "db", mounted).await;
    assert_eq!(hosts_of(&h, "db"), ["h1", "h1"]);

    // h1 cordoned: a new volume goes to h2, and so does its machine.
    let (status, _) = send(&h.admin, Method::POST, "/v1/hosts/h1/cordon", None).await;
    assert_eq!(status, StatusCode::OK);
    let on_h2 = volume("two").await;
    assert_eq!(host_json(&h, "h2").await["volume_ids"], json!([on_h2]));
    let mounted = json!({ "config": { "image": "nginx", "mounts": [{ "volume": on_h2, "path": "/data" }] }, "region": "iad" });
    create_machine(&h.admin, "db", mounted).await;
    let mut placed = hosts_of(&h, "db");
    placed.sort();
    assert_eq!(placed, ["h1", "h1", "h2"]);

    // Remove names the volume (and machine) still on the host.
    let (status, body) = send(&h.admin, Method::DELETE, "/v1/hosts/h2", None).await;
    assert_eq!(status, StatusCode::PRECONDITION_FAILED, "{body}");
    assert!(body["error"].as_str().unwrap().contains(&on_h2), "{body}");
}

/// A WireGuard public key's text form for tests: base64 of 32 bytes.
fn mesh_key(byte: u8) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode([byte; 32])
}

fn mesh_registration(id: &str, agent_url: &str, key: &str, endpoint: &str) -> Value {
    json!({
        "id": id, "region": "iad", "agent_url": agent_url,
        "mesh_public_key": key, "mesh_endpoint": endpoint,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_register_mesh_keys_and_only_hosts_read_the_peers() {
    let h = start().await;
    let joiner = h.client(&join_token(&h).await);
    let (status, body) = send(
        &joiner,
        Method::POST,
        "/v1/hosts",
        Some(mesh_registration(
            "h2",
            &h.agent_url,
            &mesh_key(2),
            "10.0.0.2:51820",
        )),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let h2_number = body["host_number"].as_u64().expect("the host's number");
    common::keep_alive(joiner.clone(), "h2");
    let (status, body) = send(
        &h.host,
        Method::POST,
        "/v1/hosts",
        Some(mesh_registration(
            "h1",
            &h.agent_url,
            &mesh_key(1),
            "10.0.0.1:51820",
        )),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let h1_number = body["host_number"].as_u64().unwrap();
    assert_ne!(h1_number, h2_number);

    let (status, peers) = send(&joiner, Method::GET, "/v1/hosts/mesh", None).await;
    assert_eq!(status, StatusCode::OK, "{peers}");
    assert_eq!(
        peers,
        json!([
            { "id": "h1", "number": h1_number, "public_key": mesh_key(1), "endpoint": "10.0.0.1:51820" },
            { "id": "h2", "number": h2_number, "public_key": mesh_key(2), "endpoint": "10.0.0.2:51820" },
        ])
    );

    // Bad input names the field and changes nobody's peers.
    for (key, endpoint, status, field) in [
        (
            "bm90IGEga2V5".to_string(),
            "10.0.0.1:51820",
            StatusCode::BAD_REQUEST,
            "mesh_public_key",
        ),
        (
            mesh_key(1),
            "nowhere",
            StatusCode::BAD_REQUEST,
            "mesh_endpoint",
        ),
        (
            mesh_key(1),
            "0.0.0.0:51820",
            StatusCode::BAD_REQUEST,
            "mesh_endpoint",
        ),
        (
            mesh_key(2),
            "10.0.0.1:51820",
            StatusCode::CONFLICT,
            "mesh_public_key",
        ),
    ] {
        let (got, body) = send(
            &h.host,
            Method::POST,
            "/v1/hosts",
            Some(mesh_registration("h1", &h.agent_url, &key, endpoint)),
        )
        .await;
        assert_eq!(got, status, "{key} {endpoint}: {body}");
        assert!(body["error"].as_str().unwrap().contains(field), "{body}");
    }
    let (_, again) = send(&joiner, Method::GET, "/v1/hosts/mesh", None).await;
    assert_eq!(again, peers);
    // A key without an endpoint (or the other way round) is refused too.
    let (status, body) = send(
        &h.host,
        Method::POST,
        "/v1/hosts",
        Some(json!({ "id": "h1", "region": "iad", "agent_url": h.agent_url, "mesh_public_key": mesh_key(9) })),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");

    // A new key (the agent restarted) replaces the old one; registering without one leaves
    // the mesh.
    let (status, _) = send(
        &joiner,
        Method::POST,
        "/v1/hosts",
        Some(mesh_registration(
            "h2",
            &h.agent_url,
            &mesh_key(3),
            "10.0.0.2:51820",
        )),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (_, peers) = send(&joiner, Method::GET, "/v1/hosts/mesh", None).await;
    assert_eq!(peers[1]["public_key"], mesh_key(3), "{peers}");
    let (status, _) = send(
        &h.host,
        Method::POST,
        "/v1/hosts",
        Some(registration("h1", 0, 0, &h.agent_url)),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (_, peers) = send(&joiner, Method::GET, "/v1/hosts/mesh", None).await;
    assert_eq!(peers.as_array().unwrap().len(), 1, "{peers}");
    assert_eq!(peers[0]["id"], "h2");
    // The old key is free again for whoever registers it.
    let (status, body) = send(
        &h.host,
        Method::POST,
        "/v1/hosts",
        Some(mesh_registration(
            "h1",
            &h.agent_url,
            &mesh_key(2),
            "10.0.0.1:51820",
        )),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // The peer list is the hosts': not the operator's admin token, not an unused join token.
    let (status, _) = send(&h.admin, Method::GET, "/v1/hosts/mesh", None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let unused = h.client(&join_token(&h).await);
    let (status, _) = send(&unused, Method::GET, "/v1/hosts/mesh", None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}
