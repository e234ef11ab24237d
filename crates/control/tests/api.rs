//! The Machines API end to end over HTTP: apps, the machine state machine, leases,
//! metadata, wait, tokens and orgs, bad input, the catalog stream and the OpenAPI document.

mod common;

use common::{create_app, create_machine, send, send_with, start};
use http::{Method, StatusCode};
use serde_json::{Value, json};

fn image() -> Value {
    json!({ "config": { "image": "registry-1.docker.io/library/nginx:latest", "metadata": { "role": "web" } }, "region": "iad" })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apps_are_created_listed_and_deleted() {
    let h = start().await;
    create_app(&h.admin, "alpha").await;
    let (status, body) = send(
        &h.admin,
        Method::POST,
        "/v1/apps",
        Some(json!({ "app_name": "alpha", "org_slug": "personal" })),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(body["error"].as_str().unwrap().contains("already taken"));
    let (status, body) = send(&h.admin, Method::GET, "/v1/apps?org_slug=personal", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["total_apps"], 1);
    assert_eq!(body["apps"][0]["name"], "alpha");
    let (status, body) = send(&h.admin, Method::GET, "/v1/apps/alpha", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["organization"]["slug"], "personal");
    create_machine(&h.admin, "alpha", image()).await;
    let (status, _) = send(&h.admin, Method::DELETE, "/v1/apps/alpha", None).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let (status, body) = send(&h.admin, Method::GET, "/v1/apps/alpha", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(
        h.agent.machine_count(),
        0,
        "deleting the app destroyed its machine on the host"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn machines_follow_the_state_machine() {
    let h = start().await;
    create_app(&h.admin, "web").await;
    let machine = create_machine(&h.admin, "web", image()).await;
    let id = machine["id"].as_str().unwrap().to_string();
    assert_eq!(machine["state"], "started");
    assert_eq!(id.len(), 14);
    let base = format!("/v1/apps/web/machines/{id}");

    let (status, body) = send(&h.admin, Method::POST, &format!("{base}/start"), None).await;
    assert_eq!(status, StatusCode::PRECONDITION_FAILED, "{body}");
    assert_eq!(
        body["error"],
        "unable to start machine from current state: 'started'"
    );

    let (status, body) = send(&h.admin, Method::DELETE, &base, None).await;
    assert_eq!(status, StatusCode::PRECONDITION_FAILED);
    assert!(
        body["error"].as_str().unwrap().contains("force=true"),
        "{body}"
    );

    let (status, body) = send(
        &h.admin,
        Method::POST,
        &format!("{base}/stop"),
        Some(json!({ "signal": "SIGTERM", "timeout": "5s" })),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({ "ok": true }));
    let (_, body) = send(&h.admin, Method::GET, &base, None).await;
    assert_eq!(body["state"], "stopped");

    let (status, body) = send(&h.admin, Method::POST, &format!("{base}/start"), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["previous_state"], "stopped");

    let (status, body) = send(
        &h.admin,
        Method::POST,
        &format!("{base}/restart?timeout=10&signal=SIGINT"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, _) = send(
        &h.admin,
        Method::POST,
        &format!("{base}/signal"),
        Some(json!({ "signal": "SIGUSR1" })),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = send(
        &h.admin,
        Method::POST,
        &format!("{base}/signal"),
        Some(json!({ "signal": "SIGWHAT" })),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .starts_with("invalid signal"),
        "{body}"
    );
    let (status, body) = send(&h.admin, Method::GET, &format!("{base}/ps"), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body[0]["pid"], 1, "{body}");
    let (status, body) = send(&h.admin, Method::POST, &format!("{base}/suspend"), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, body) = send(&h.admin, Method::GET, &base, None).await;
    assert_eq!(body["state"], "suspended");
    let (status, body) = send(&h.admin, Method::POST, &format!("{base}/suspend"), None).await;
    assert!(
        status == StatusCode::OK || status.is_client_error(),
        "suspending a suspended machine: {status} {body}"
    );
    let (status, body) = send(&h.admin, Method::POST, &format!("{base}/start"), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["previous_state"], "suspended");
    let (_, body) = send(&h.admin, Method::GET, &base, None).await;
    assert_eq!(body["state"], "started");

    // Updates: a stale version is refused, the current one makes a new version.
    let old_version = body["instance_id"].as_str().unwrap().to_string();
    let mut update = image();
    update["current_version"] = json!("01STALE");
    let (status, _) = send(&h.admin, Method::POST, &base, Some(update.clone())).await;
    assert_eq!(status, StatusCode::PRECONDITION_FAILED);
    update["current_version"] = json!(old_version);
    update["config"]["image"] = json!("nginx:1.27");
    let (status, body) = send(&h.admin, Method::POST, &base, Some(update)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_ne!(body["instance_id"], json!(old_version));
    assert_eq!(body["state"], "started");
    assert_eq!(body["config"]["image"], "nginx:1.27");
    let (_, versions) = send(&h.admin, Method::GET, &format!("{base}/versions"), None).await;
    assert_eq!(versions.as_array().unwrap().len(), 2);

    let (status, events) = send(&h.admin, Method::GET, &format!("{base}/events"), None).await;
    assert_eq!(status, StatusCode::OK);
    let kinds: Vec<&str> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    for kind in ["launch", "start", "stop", "update"] {
        assert!(kinds.contains(&kind), "{kind} in {kinds:?}");
    }
    assert!(
        events
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["timestamp"].as_i64().unwrap() > 1_600_000_000_000 && e["source"] == "user")
    );

    let (status, _) = send(
        &h.admin,
        Method::DELETE,
        &format!("{base}?force=true"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (_, body) = send(&h.admin, Method::GET, &base, None).await;
    assert_eq!(body["state"], "destroyed");
    let (status, _) = send(&h.admin, Method::POST, &format!("{base}/start"), None).await;
    assert_eq!(status, StatusCode::PRECONDITION_FAILED);
    let (_, list) = send(&h.admin, Method::GET, "/v1/apps/web/machines", None).await;
    assert_eq!(list.as_array().unwrap().len(), 0);
    let (_, list) = send(
        &h.admin,
        Method::GET,
        "/v1/apps/web/machines?include_deleted=true",
        None,
    )
    .await;
    assert_eq!(list.as_array().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_guard_concurrent_changes() {
    let h = start().await;
    create_app(&h.admin, "leased").await;
    let machine = create_machine(&h.admin, "leased", image()).await;
    let base = format!(
        "/v1/apps/leased/machines/{}",
        machine["id"].as_str().unwrap()
    );
    let (status, lease) = send(
        &h.admin,
        Method::POST,
        &format!("{base}/lease"),
        Some(json!({ "ttl": 60, "description": "deploy" })),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{lease}");
    let nonce = lease["nonce"].as_str().unwrap().to_string();
    assert_eq!(
        lease["data"]["nonce"],
        json!(nonce),
        "flaps clients read the lease under data"
    );
    assert!(lease["expires_at"].as_i64().unwrap() > chrono_now() + 50);

    let (status, body) = send(
        &h.admin,
        Method::POST,
        &format!("{base}/lease"),
        Some(json!({ "ttl": 60 })),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "a second taker is refused: {body}"
    );
    let (status, body) = send(&h.admin, Method::POST, &format!("{base}/stop"), None).await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "writes without the nonce are refused: {body}"
    );
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("fly-machine-lease-nonce")
    );
    let (status, _) = send_with(
        &h.admin,
        Method::POST,
        &format!("{base}/stop"),
        None,
        &[("fly-machine-lease-nonce", "wrong")],
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT);
    let (status, body) = send_with(
        &h.admin,
        Method::POST,
        &format!("{base}/stop"),
        None,
        &[("fly-machine-lease-nonce", &nonce)],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let (status, refreshed) = send_with(
        &h.admin,
        Method::POST,
        &format!("{base}/lease?ttl=120"),
        Some(b"{}".to_vec()),
        &[("fly-machine-lease-nonce", &nonce)],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "the holder refreshes: {refreshed}");
    assert_eq!(refreshed["nonce"], json!(nonce));
    let (_, shown) = send(&h.admin, Method::GET, &format!("{base}/lease"), None).await;
    assert_eq!(shown["nonce"], json!(nonce));
    let (status, _) = send_with(
        &h.admin,
        Method::DELETE,
        &format!("{base}/lease"),
        None,
        &[("fly-machine-lease-nonce", "wrong")],
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT);
    let (status, _) = send_with(
        &h.admin,
        Method::DELETE,
        &format!("{base}/lease"),
        None,
        &[("fly-machine-lease-nonce", &nonce)],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = send(&h.admin, Method::GET, &format!("{base}/lease"), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = send(&h.admin, Method::POST, &format!("{base}/start"), None).await;
    assert_eq!(status, StatusCode::OK, "free again once released");

    // A machine created with lease_ttl comes back leased, its nonce in the answer.
    let mut body = image();
    body["lease_ttl"] = json!(30);
    let leased = create_machine(&h.admin, "leased", body).await;
    assert!(
        leased["nonce"].as_str().is_some_and(|n| !n.is_empty()),
        "{leased}"
    );
    let (status, _) = send(
        &h.admin,
        Method::POST,
        &format!(
            "/v1/apps/leased/machines/{}/cordon",
            leased["id"].as_str().unwrap()
        ),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT);
}

fn chrono_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_cordon_filters_and_wait() {
    let h = start().await;
    create_app(&h.admin, "meta").await;
    h.add_host("h2", "fra").await;
    let a = create_machine(&h.admin, "meta", image()).await;
    let mut other = image();
    other["region"] = json!("fra");
    other["config"]["metadata"] = json!({ "role": "worker" });
    create_machine(&h.admin, "meta", other).await;
    let a_id = a["id"].as_str().unwrap();
    let base = format!("/v1/apps/meta/machines/{a_id}");

    let (status, body) = send(
        &h.admin,
        Method::POST,
        &format!("{base}/metadata/tier"),
        Some(json!({ "value": "gold" })),
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let (_, metadata) = send(&h.admin, Method::GET, &format!("{base}/metadata"), None).await;
    assert_eq!(metadata, json!({ "role": "web", "tier": "gold" }));
    let (_, machine) = send(&h.admin, Method::GET, &base, None).await;
    assert_eq!(
        machine["instance_id"], a["instance_id"],
        "metadata changes are not a new version"
    );
    let (_, list) = send(
        &h.admin,
        Method::GET,
        "/v1/apps/meta/machines?metadata.tier=gold",
        None,
    )
    .await;
    assert_eq!(
        list.as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].clone())
            .collect::<Vec<_>>(),
        vec![json!(a_id)]
    );
    let (status, _) = send(
        &h.admin,
        Method::DELETE,
        &format!("{base}/metadata/tier"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (_, list) = send(
        &h.admin,
        Method::GET,
        "/v1/apps/meta/machines?metadata.tier=gold",
        None,
    )
    .await;
    assert!(list.as_array().unwrap().is_empty());
    let (_, list) = send(
        &h.admin,
        Method::GET,
        "/v1/apps/meta/machines?region=fra",
        None,
    )
    .await;
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["region"], "fra");
    let (status, body) = send(
        &h.admin,
        Method::POST,
        &format!("{base}/metadata/bad%20key"),
        Some(json!({ "value": "x" })),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");

    let (status, _) = send(&h.admin, Method::POST, &format!("{base}/cordon"), None).await;
    assert_eq!(status, StatusCode::OK);
    let (_, machine) = send(&h.admin, Method::GET, &base, None).await;
    assert_eq!(machine["cordoned"], true);
    let (status, _) = send(&h.admin, Method::POST, &format!("{base}/uncordon"), None).await;
    assert_eq!(status, StatusCode::OK);

    let (status, _) = send(
        &h.admin,
        Method::GET,
        &format!("{base}/wait?state=started"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = send(
        &h.admin,
        Method::GET,
        &format!("{base}/wait?state=stopped&timeout=1"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::REQUEST_TIMEOUT, "{body}");
    let (status, _) = send(
        &h.admin,
        Method::GET,
        &format!("{base}/wait?state=sideways"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    // A waiter sees the stop that happens while it waits.
    let waiter = {
        let client = h.admin.clone();
        let path = format!("{base}/wait?state=stopped&timeout=30");
        tokio::spawn(async move { send(&client, Method::GET, &path, None).await })
    };
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let (status, _) = send(&h.admin, Method::POST, &format!("{base}/stop"), None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = waiter.await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_scoped_and_orgs_are_isolated() {
    let h = start().await;
    create_app(&h.admin, "mine").await;
    create_app(&h.admin, "other").await;

    // A deploy token for one app: that app only; no app creation.
    let (status, created) = send(
        &h.admin,
        Method::POST,
        "/v1/tokens",
        Some(json!({ "type": "deploy", "app_name": "mine", "expiry": "1h" })),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let deploy = h.client(created["token"].as_str().unwrap());
    let (status, _) = send(&deploy, Method::GET, "/v1/apps/mine", None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = send(&deploy, Method::GET, "/v1/apps/other", None).await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "other apps are invisible, not forbidden"
    );
    create_machine(&deploy, "mine", image()).await;
    let (status, _) = send(
        &deploy,
        Method::POST,
        "/v1/apps",
        Some(json!({ "app_name": "sneaky" })),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (_, list) = send(&deploy, Method::GET, "/v1/apps", None).await;
    assert_eq!(list["total_apps"], 1);

    // Read-only: reads pass, writes do not.
    let (_, created_ro) = send(
        &h.admin,
        Method::POST,
        "/v1/tokens",
        Some(json!({ "type": "readonly" })),
    )
    .await;
    let readonly = h.client(created_ro["token"].as_str().unwrap());
    let (status, _) = send(&readonly, Method::GET, "/v1/apps/other/machines", None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = send(
        &readonly,
        Method::POST,
        "/v1/apps/other/machines",
        Some(image()),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // Offline attenuation: narrow an org token without the server.
    let (_, created_org) = send(
        &h.admin,
        Method::POST,
        "/v1/tokens",
        Some(json!({ "type": "org", "name": "ci" })),
    )
    .await;
    let org_token =
        aloft_api::token::Token::decode(created_org["token"].as_str().unwrap()).unwrap();
    let narrowed = org_token
        .clone()
        .attenuate(aloft_api::token::Caveat::Apps(vec!["other".into()]))
        .attenuate(aloft_api::token::Caveat::ReadOnly);
    let narrowed = h.client(&narrowed.encode());
    let (status, _) = send(&narrowed, Method::GET, "/v1/apps/other", None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = send(&narrowed, Method::GET, "/v1/apps/mine", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = send(&narrowed, Method::DELETE, "/v1/apps/other", None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let expired = org_token
        .clone()
        .attenuate(aloft_api::token::Caveat::ExpiresAt(chrono_now() - 1));
    let (status, body) = send(&h.client(&expired.encode()), Method::GET, "/v1/apps", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"], "token has expired");
    let mut forged = org_token.clone();
    forged.caveats.clear();
    let forged_text = org_token
        .clone()
        .attenuate(aloft_api::token::Caveat::ReadOnly)
        .encode();
    let mut tampered: aloft_api::token::Token =
        aloft_api::token::Token::decode(&forged_text).unwrap();
    tampered.caveats.pop();
    let (status, _) = send(&h.client(&tampered.encode()), Method::GET, "/v1/apps", None).await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "removing a caveat breaks the signature"
    );

    // Listing and revoking.
    let (_, tokens) = send(&h.admin, Method::GET, "/v1/tokens", None).await;
    let listed: Vec<&str> = tokens["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["type"].as_str().unwrap())
        .collect();
    assert!(
        listed.contains(&"deploy") && listed.contains(&"readonly") && listed.contains(&"org"),
        "{tokens}"
    );
    let (status, _) = send(
        &h.admin,
        Method::DELETE,
        &format!("/v1/tokens/{}", created["id"].as_str().unwrap()),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = send(&deploy, Method::GET, "/v1/apps/mine", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"], "token has been revoked");

    // A second org: its apps and the first org's are mutually invisible to org tokens.
    let (status, org) = send(
        &h.admin,
        Method::POST,
        "/v1/orgs",
        Some(json!({ "name": "Acme Corp" })),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{org}");
    assert_eq!(org["slug"], "acme-corp");
    let (status, _) = send(
        &h.admin,
        Method::POST,
        "/v1/apps",
        Some(json!({ "app_name": "acme-web", "org_slug": "acme-corp" })),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let (_, acme_token) = send(
        &h.admin,
        Method::POST,
        "/v1/tokens",
        Some(json!({ "type": "org", "org_slug": "acme-corp" })),
    )
    .await;
    let acme = h.client(acme_token["token"].as_str().unwrap());
    let (_, list) = send(&acme, Method::GET, "/v1/apps", None).await;
    assert_eq!(
        list["apps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["name"].clone())
            .collect::<Vec<_>>(),
        vec![json!("acme-web")]
    );
    let (status, _) = send(&acme, Method::GET, "/v1/apps/mine", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = send(&acme, Method::GET, "/v1/apps?org_slug=personal", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let personal = h.client(created_org["token"].as_str().unwrap());
    let (status, _) = send(&personal, Method::GET, "/v1/apps/acme-web/machines", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = send(
        &acme,
        Method::POST,
        "/v1/orgs",
        Some(json!({ "name": "more" })),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "org tokens cannot create orgs"
    );
    let (_, orgs) = send(&h.admin, Method::GET, "/v1/orgs", None).await;
    assert_eq!(orgs["orgs"].as_array().unwrap().len(), 2);

    let (status, body) = send(&h.anonymous(), Method::GET, "/v1/apps", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body["error"].as_str().unwrap().contains("Authorization"));
}

/// The head of the answer to a 2 MB POST, sent over a plain TCP connection.
async fn oversized_post_answer_head(url: &str, token: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = url.trim_start_matches("http://").trim_end_matches('/');
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut reader, mut writer) = stream.into_split();
    let head = format!(
        "POST /v1/apps/strict/machines HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {token}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        2 * 1024 * 1024
    );
    // The server may answer, and close, before the whole body is in: write and read at once.
    let write = async move {
        let _ = writer.write_all(head.as_bytes()).await;
        let _ = writer.write_all(&vec![b' '; 2 * 1024 * 1024]).await;
        writer
    };
    let read = async move {
        let mut answer = Vec::new();
        let mut chunk = [0u8; 4096];
        while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
            match reader.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&chunk[..n]),
            }
        }
        answer
    };
    let (answer, _writer) = tokio::time::timeout(std::time::Duration::from_secs(20), async {
        let (writer, answer) = tokio::join!(write, read);
        (answer, writer)
    })
    .await
    .expect("the server answers an oversized body");
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_naming_the_field_and_stores_nothing() {
    let h = start().await;
    create_app(&h.admin, "strict").await;
    let cases: Vec<(Method, &str, Vec<u8>, StatusCode, &str)> = vec![
        (Method::POST, "/v1/apps", b"{not json".to_vec(), StatusCode::BAD_REQUEST, "invalid JSON body"),
        (Method::POST, "/v1/apps", br#"{"app_name": "Bad Name"}"#.to_vec(), StatusCode::BAD_REQUEST, "invalid app_name"),
        (Method::POST, "/v1/apps", br#"{"app_name": 7}"#.to_vec(), StatusCode::BAD_REQUEST, "invalid app_name"),
        (Method::POST, "/v1/apps/strict/machines", br#"{"config": {"image": "nginx", "guest": {"cpus": "two"}}}"#.to_vec(), StatusCode::BAD_REQUEST, "invalid config.guest.cpus"),
        (Method::POST, "/v1/apps/strict/machines", br#"{"config": {"image": "nginx", "guest": {"cpus": 3}}}"#.to_vec(), StatusCode::BAD_REQUEST, "invalid config.guest.cpus"),
        (Method::POST, "/v1/apps/strict/machines", br#"{"config": {"image": "nginx", "guest": {"cpus": 1, "memory_mb": 100}}}"#.to_vec(), StatusCode::BAD_REQUEST, "invalid config.guest.memory_mb"),
        (Method::POST, "/v1/apps/strict/machines", br#"{"config": {"image": "nginx", "size": "galactic"}}"#.to_vec(), StatusCode::BAD_REQUEST, "invalid config.size"),
        (Method::POST, "/v1/apps/strict/machines", br#"{"config": {"image": "nginx"}, "region": "atlantis"}"#.to_vec(), StatusCode::BAD_REQUEST, "invalid region"),
        (Method::POST, "/v1/apps/strict/machines", br#"{"config": {"image": "nginx"}, "name": "no spaces please"}"#.to_vec(), StatusCode::BAD_REQUEST, "invalid name"),
        (Method::POST, "/v1/apps/strict/machines", br#"{"config": {}}"#.to_vec(), StatusCode::BAD_REQUEST, "invalid config.image"),
        (Method::POST, "/v1/apps/strict/machines", br#"{"config": {"image": "nginx", "services": [{"protocol": "http", "internal_port": 80}]}}"#.to_vec(), StatusCode::BAD_REQUEST, "invalid config.services[0].protocol"),
        (Method::POST, "/v1/apps/strict/machines", vec![b' '; 2 * 1024 * 1024], StatusCode::PAYLOAD_TOO_LARGE, "larger than"),
        (Method::POST, "/v1/apps/strict/volumes", br#"{"name": "data", "size_gb": 100000}"#.to_vec(), StatusCode::BAD_REQUEST, "invalid size_gb"),
        (Method::GET, "/v1/apps/strict/machines?include_deleted=true&state=dancing", Vec::new(), StatusCode::BAD_REQUEST, "invalid state"),
        (Method::PATCH, "/v1/apps/strict", Vec::new(), StatusCode::METHOD_NOT_ALLOWED, "method not allowed"),
    ];
    for (method, path, body, expected, message) in cases {
        let body = if body.is_empty() { None } else { Some(body) };
        let (status, answer) = send_with(&h.admin, method.clone(), path, body, &[]).await;
        assert_eq!(status, expected, "{method} {path}: {answer}");
        let error = answer["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{method} {path}: no error field in {answer}"));
        assert!(
            error.contains(message),
            "{method} {path}: {error:?} should contain {message:?}"
        );
    }
    let (_, list) = send(
        &h.admin,
        Method::GET,
        "/v1/apps/strict/machines?include_deleted=true",
        None,
    )
    .await;
    assert!(
        list.as_array().unwrap().is_empty(),
        "nothing was stored: {list}"
    );
    let (_, apps) = send(&h.admin, Method::GET, "/v1/apps", None).await;
    assert_eq!(apps["total_apps"], 1);
    assert_eq!(h.agent.machine_count(), 0);

    // A body refused as too large is left unread: its answer closes the connection, so
    // no client sends another request into it.
    let head = oversized_post_answer_head(&h.url, &h.admin_token).await;
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("\r\nconnection: close\r\n"),
        "{head}"
    );

    // Unknown fields are ignored, as Fly's API does.
    let machine = create_machine(
        &h.admin,
        "strict",
        json!({ "config": { "image": "nginx", "flux_capacitor": true }, "warp": 9 }),
    )
    .await;
    assert_eq!(machine["state"], "started");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_secrets_certificates_and_ips() {
    let h = start().await;
    create_app(&h.admin, "extras").await;
    let (status, volume) = send(
        &h.admin,
        Method::POST,
        "/v1/apps/extras/volumes",
        Some(json!({ "name": "data", "region": "iad" })),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{volume}");
    assert_eq!(volume["size_gb"], 3, "the API's default size");
    let vol = volume["id"].as_str().unwrap();
    let (status, extended) = send(
        &h.admin,
        Method::PUT,
        &format!("/v1/apps/extras/volumes/{vol}/extend"),
        Some(json!({ "size_gb": 10 })),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(extended["volume"]["size_gb"], 10);
    let (status, _) = send(
        &h.admin,
        Method::PUT,
        &format!("/v1/apps/extras/volumes/{vol}/extend"),
        Some(json!({ "size_gb": 5 })),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "volumes never shrink");

    let (status, secrets) = send(
        &h.admin,
        Method::POST,
        "/v1/apps/extras/secrets",
        Some(json!({ "values": { "DATABASE_URL": "postgres://x", "TOKEN": "abc" } })),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{secrets}");
    let text = secrets.to_string();
    assert!(
        !text.contains("postgres://x") && !text.contains("\"abc\""),
        "values never come back: {text}"
    );
    assert_eq!(secrets["secrets"].as_array().unwrap().len(), 2);
    assert_eq!(secrets["secrets"][0]["digest"].as_str().unwrap().len(), 32);
    let (status, _) = send(
        &h.admin,
        Method::DELETE,
        "/v1/apps/extras/secrets/TOKEN",
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (_, listed) = send(&h.admin, Method::GET, "/v1/apps/extras/secrets", None).await;
    assert_eq!(listed["secrets"].as_array().unwrap().len(), 1);
    assert!(listed["version"].as_u64().unwrap() >= 2);

    let (status, cert) = send(
        &h.admin,
        Method::POST,
        "/v1/apps/extras/certificates/acme",
        Some(json!({ "hostname": "WWW.Example.com" })),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{cert}");
    assert_eq!(cert["hostname"], "www.example.com");
    let (status, _) = send(
        &h.admin,
        Method::POST,
        "/v1/apps/extras/certificates/acme",
        Some(json!({ "hostname": "not a host" })),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, ip) = send(
        &h.admin,
        Method::POST,
        "/v1/apps/extras/ip_assignments",
        Some(json!({ "type": "v6" })),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{ip}");
    let (_, ips) = send(
        &h.admin,
        Method::GET,
        "/v1/apps/extras/ip_assignments",
        None,
    )
    .await;
    assert_eq!(ips["ips"].as_array().unwrap().len(), 1);

    // The catalog carries both with the app.
    let snapshot = h.plane.catalog.snapshot(0).unwrap();
    let data: Value = serde_json::from_str(&snapshot.data).unwrap();
    let app = data["apps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "extras")
        .unwrap();
    assert!(
        app["hostnames"]
            .as_array()
            .unwrap()
            .contains(&json!("www.example.com")),
        "{app}"
    );
    assert_eq!(app["ips"][0]["address"], ip["ip"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_stream_gives_a_snapshot_then_changes_and_resumes() {
    use futures_util::StreamExt;
    let h = start().await;
    create_app(&h.admin, "cat").await;
    let mut lines = h
        .host
        .lines::<()>(Method::GET, "/v1/catalog/watch", None, &[])
        .await
        .unwrap();
    let mut next_event = async || -> (u64, Value) {
        let mut id = 0;
        loop {
            let line = lines.next().await.expect("stream open").expect("line");
            if let Some(rest) = line.strip_prefix("id: ") {
                id = rest.parse().unwrap();
            } else if let Some(data) = line.strip_prefix("data: ") {
                return (id, serde_json::from_str(data).unwrap());
            }
        }
    };
    let (snapshot_seq, snapshot) = next_event().await;
    assert_eq!(snapshot["type"], "snapshot");
    assert!(
        snapshot["apps"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["name"] == "cat")
    );
    let machine = create_machine(&h.admin, "cat", image()).await;
    let mut seen_started = None;
    while seen_started.is_none() {
        let (seq, event) = next_event().await;
        assert!(seq > snapshot_seq);
        if event["type"] == "machine" && event["machine"]["state"] == "started" {
            assert_eq!(event["machine"]["id"], machine["id"]);
            assert_eq!(event["machine"]["region"], "iad");
            assert_eq!(event["machine"]["host"], "h1");
            assert!(event["machine"]["private_ipv4"].is_string());
            seen_started = Some(seq);
        }
    }
    // Resuming from a sequence number replays only what came after it.
    let resume_from = seen_started.unwrap().to_string();
    let base = format!("/v1/apps/cat/machines/{}", machine["id"].as_str().unwrap());
    send(&h.admin, Method::POST, &format!("{base}/cordon"), None).await;
    let mut resumed = h
        .host
        .lines::<()>(
            Method::GET,
            "/v1/catalog/watch",
            None,
            &[("Last-Event-ID", &resume_from)],
        )
        .await
        .unwrap();
    let mut data = None;
    while data.is_none() {
        let line = resumed.next().await.unwrap().unwrap();
        data = line
            .strip_prefix("data: ")
            .map(|d| serde_json::from_str::<Value>(d).unwrap());
    }
    let event = data.unwrap();
    assert_eq!(
        event["type"], "machine",
        "a replay, not a snapshot: {event}"
    );
    assert_eq!(event["machine"]["cordoned"], true);
    assert_eq!(
        event["machine"]["services"],
        json!([]),
        "a cordoned machine gets no traffic"
    );

    let (status, _) = send(&h.admin, Method::GET, "/v1/catalog/watch", None).await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "the catalog is for platform hosts"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_document_is_served() {
    let h = start().await;
    let (status, doc) = send(&h.anonymous(), Method::GET, "/openapi.json", None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    for path in [
        "/v1/apps",
        "/v1/apps/{app_name}/machines/{machine_id}/lease",
        "/v1/apps/{app_name}/machines/{machine_id}/wait",
        "/v1/tokens",
        "/v1/apps/{app_name}/volumes",
    ] {
        assert!(doc["paths"].get(path).is_some(), "{path} documented");
    }
    assert!(doc["components"]["schemas"].get("Machine").is_some());
}

/// A hostname under the base domain that another app stored before such claims were
/// refused is never published with that app: proxies see `foo.localhost` (and below)
/// only on app `foo`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_publishes_platform_names_only_with_the_app_they_name() {
    let h = start().await;
    create_app(&h.admin, "foo").await;
    create_app(&h.admin, "squatter").await;
    let squatter = h.plane.store.app("squatter").unwrap().unwrap();
    for hostname in ["foo.localhost", "x.foo.localhost", "shop.example.com"] {
        h.plane
            .store
            .insert_certificate(&aloft_control::store::CertificateRow {
                app_id: squatter.id.clone(),
                hostname: hostname.into(),
                source: "acme".into(),
                status: "pending".into(),
                created_at: "2026-01-01T00:00:00Z".into(),
            })
            .unwrap();
    }
    let snapshot = h.plane.catalog.snapshot(0).unwrap();
    let data: Value = serde_json::from_str(&snapshot.data).unwrap();
    let app = data["apps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "squatter")
        .unwrap()
        .clone();
    assert_eq!(
        app["hostnames"],
        json!(["squatter.localhost", "shop.example.com"]),
        "{app}"
    );
    let (mut changes, _, _) = h.plane.catalog.follow(None);
    h.plane.catalog.app_changed(&squatter);
    let published = changes.recv().await.unwrap();
    let data: Value = serde_json::from_str(&published.data).unwrap();
    assert_eq!(
        data["app"]["hostnames"],
        json!(["squatter.localhost", "shop.example.com"]),
        "{data}"
    );
}

/// Each host has its own token, and with it acts as that host only: another host's
/// secrets key, the secrets of machines placed elsewhere, another host's registration,
/// events and checks are refused; the platform's own token acts as no host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_token_speaks_for_its_own_host_only() {
    let h = start().await;
    h.add_host("h2", "fra").await;
    let (h1, h2) = (&h.host, &h.host_client("h2"));
    let platform = h.client(h.plane.host_token());
    create_app(&h.admin, "tenant").await;
    let (status, body) = send(
        &h.admin,
        Method::POST,
        "/v1/apps/tenant/secrets",
        Some(json!({ "values": { "DATABASE_URL": "postgres://secret" } })),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let on_h1 = create_machine(&h.admin, "tenant", image()).await;
    let on_h1 = on_h1["id"].as_str().unwrap().to_string();
    let mut fra = image();
    fra["region"] = json!("fra");
    let on_h2 = create_machine(&h.admin, "tenant", fra).await;
    let on_h2 = on_h2["id"].as_str().unwrap().to_string();
    let host_of = |id: &str| {
        let machine = h.plane.store.machine(id).unwrap().unwrap();
        machine.host_id
    };
    assert_eq!(
        (host_of(&on_h1).as_str(), host_of(&on_h2).as_str()),
        ("h1", "h2")
    );

    // Each host fetches its own key and the secrets of its own machines...
    let (status, key1) = send(h1, Method::GET, "/v1/hosts/h1/secrets-key", None).await;
    assert_eq!(status, StatusCode::OK, "{key1}");
    let (status, key2) = send(h2, Method::GET, "/v1/hosts/h2/secrets-key", None).await;
    assert_eq!(status, StatusCode::OK, "{key2}");
    assert_ne!(key1["key"], key2["key"]);
    let own = format!("/v1/hosts/h2/machines/{on_h2}/secrets");
    let (status, body) = send(h2, Method::GET, &own, None).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // ...and nothing of the other host's, nor does the platform's token, which is no host.
    let theirs = format!("/v1/hosts/h1/machines/{on_h1}/secrets");
    let misplaced = format!("/v1/hosts/h2/machines/{on_h1}/secrets");
    for (client, path) in [
        (h2, "/v1/hosts/h1/secrets-key"),
        (h2, theirs.as_str()),
        (h2, misplaced.as_str()),
        (&platform, "/v1/hosts/h1/secrets-key"),
        (&platform, theirs.as_str()),
    ] {
        let (status, body) = send(client, Method::GET, path, None).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "GET {path}: {body}");
        assert!(!body.to_string().contains("\"key\""), "{body}");
    }

    // Hosts read secrets only as machines placed on them: not an app's list, nor set one.
    for client in [h1, h2, &platform] {
        let (status, body) = send(client, Method::GET, "/v1/apps/tenant/secrets", None).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
        let (status, body) = send(
            client,
            Method::POST,
            "/v1/apps/tenant/secrets",
            Some(json!({ "values": { "DATABASE_URL": "postgres://attacker" } })),
        )
        .await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    }

    // Host h2 cannot move h1's agent (where the control plane sends h1's token) elsewhere.
    let hijack = json!({ "id": "h1", "region": "iad", "agent_url": "http://127.0.0.1:9" });
    for client in [h2, &platform] {
        let (status, body) = send(client, Method::POST, "/v1/hosts", Some(hijack.clone())).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    }
    let agent_url_of_h1 = || {
        let hosts = h.plane.store.hosts().unwrap();
        hosts.into_iter().find(|x| x.id == "h1").unwrap().agent_url
    };
    assert_eq!(agent_url_of_h1(), h.agent_url);
    let (status, body) = send(
        h1,
        Method::POST,
        "/v1/hosts",
        Some(json!({ "id": "h1", "region": "iad", "agent_url": h.agent_url })),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "a host re-registers itself: {body}");

    // Nor report events or checks for h1's machines, under h1's name or its own.
    let state_of = |id: &str| h.plane.store.machine(id).unwrap().unwrap().state;
    let before = state_of(&on_h1);
    let event = json!([{
        "seq": 1_000_000, "machine_id": on_h1, "instance_id": "x", "type": "destroy",
        "state": "destroyed", "timestamp": 1
    }]);
    let (status, body) = send(h2, Method::POST, "/v1/hosts/h1/events", Some(event.clone())).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let (status, body) = send(h2, Method::POST, "/v1/hosts/h2/events", Some(event)).await;
    assert!(
        status.is_success() || status == StatusCode::FORBIDDEN,
        "{status} {body}"
    );
    assert_eq!(
        state_of(&on_h1),
        before,
        "h2's event about h1's machine changed nothing"
    );
    let checks = json!({ "machines": [{ "machine_id": on_h1, "checks": [] }] });
    let (status, body) = send(h2, Method::POST, "/v1/hosts/h1/checks", Some(checks)).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
}
