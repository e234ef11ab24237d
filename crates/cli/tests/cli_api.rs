//! The CLI over the Machines API against a real platform: `aloft orgs`, `aloft tokens`
//! (org, deploy and read-only tokens, offline attenuation, expiry, revocation, and what
//! each token may see and do), and `aloft machine run|list|status|stop|start|restart|
//! update|clone|cordon|uncordon|leases|destroy` driving a real machine.

mod common;

use common::{Platform, Run};
use serde_json::Value;

fn json(run: &Run) -> Value {
    assert!(run.ok(), "{run}");
    serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {run}"))
}

/// The CLI with the token in `FLY_API_TOKEN` (as flyctl reads it).
fn aloft_with_env_token(platform: &Platform, token: &str, args: &[&str]) -> Run {
    aloft_with_env(platform, "FLY_API_TOKEN", token, args)
}

fn aloft_with_env(platform: &Platform, variable: &str, token: &str, args: &[&str]) -> Run {
    let mut command = platform.in_netns(&common::aloft_binary());
    command.env(variable, token).args(args);
    Run::from(command.output().expect("running aloft"))
}

/// The CLI with the token given by `--access-token`.
fn aloft_as(platform: &Platform, token: &str, args: &[&str]) -> Run {
    let mut all = vec!["--access-token", token];
    all.extend_from_slice(args);
    platform.aloft(&all)
}

/// An API request with a bearer token: (status code, body).
fn api(
    platform: &Platform,
    token: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> (u16, String) {
    let url = format!("http://127.0.0.1:4280{path}");
    let auth = format!("Authorization: Bearer {token}");
    let mut args = vec![
        "-X",
        method,
        "-H",
        auth.as_str(),
        "-w",
        "\n%{http_code}",
        url.as_str(),
    ];
    if let Some(body) = body {
        args.extend(["-H", "Content-Type: application/json", "-d", body]);
    }
    let run = platform.curl(&args);
    assert!(run.ok(), "{run}");
    let (body, code) = run
        .stdout
        .rsplit_once('\n')
        .unwrap_or_else(|| panic!("no status line: {run}"));
    (
        code.trim()
            .parse()
            .unwrap_or_else(|_| panic!("status: {run}")),
        body.to_string(),
    )
}

fn error_of(body: &str) -> String {
    serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_string))
        .unwrap_or_else(|| panic!("no {{\"error\": ...}} body: {body}"))
}

/// `aloft tokens create ... --json` → (token, id).
fn create_token(platform: &Platform, as_token: Option<&str>, args: &[&str]) -> (String, String) {
    let mut all = vec!["tokens", "create"];
    all.extend_from_slice(args);
    all.push("--json");
    let run = match as_token {
        Some(token) => aloft_as(platform, token, &all),
        None => platform.aloft(&all),
    };
    let created = json(&run);
    let token = created["token"].as_str().unwrap_or_default().to_string();
    let id = created["id"].as_str().unwrap_or_default().to_string();
    assert!(token.starts_with("fm1_") && !id.is_empty(), "{run}");
    (token, id)
}

fn app_names(platform: &Platform, token: &str) -> Vec<String> {
    let apps = json(&aloft_as(platform, token, &["apps", "list", "--json"]));
    let mut names: Vec<String> = apps
        .as_array()
        .unwrap_or_else(|| panic!("a list of apps: {apps}"))
        .iter()
        .map(|a| a["name"].as_str().unwrap_or_default().to_string())
        .collect();
    names.sort();
    names
}

#[test]
fn orgs_and_tokens_limit_what_each_token_sees_and_does() {
    require_platform!();
    let platform = Platform::start();
    let admin = platform.aloft(&["auth", "token"]).stdout.trim().to_string();
    assert!(admin.starts_with("fm1_"), "{admin}");

    // The org `aloft server` made, in a table and as JSON.
    let listed = platform.aloft(&["orgs", "list"]);
    assert!(listed.ok(), "{listed}");
    let mut lines = listed.stdout.lines().filter(|l| !l.trim().is_empty());
    let header = lines.next().unwrap_or_default();
    assert!(
        header.contains("NAME") && header.contains("SLUG") && header.contains("TYPE"),
        "{listed}"
    );
    let rows: Vec<&str> = lines.collect();
    assert_eq!(rows.len(), 1, "{listed}");
    assert!(
        rows[0].contains("personal") && rows[0].contains("PERSONAL"),
        "{listed}"
    );
    let orgs = json(&platform.aloft(&["orgs", "list", "--json"]));
    assert_eq!(orgs.as_array().map(Vec::len), Some(1), "{orgs}");
    assert_eq!(orgs[0]["slug"], "personal", "{orgs}");

    // A second org, then an app in each.
    let created = platform.aloft(&["orgs", "create", "Acme Corp"]);
    assert!(
        created.ok() && created.stdout.contains("Acme Corp (acme-corp) was created"),
        "{created}"
    );
    let again = platform.aloft(&["orgs", "create", "Acme Corp"]);
    assert!(
        !again.ok() && again.stderr.contains("acme-corp is already taken"),
        "{again}"
    );
    let orgs = json(&platform.aloft(&["orgs", "list", "--json"]));
    let mut slugs: Vec<&str> = orgs
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|o| o["slug"].as_str())
        .collect();
    slugs.sort();
    assert_eq!(slugs, ["acme-corp", "personal"], "{orgs}");
    let shown = json(&platform.aloft(&["orgs", "show", "acme-corp", "--json"]));
    assert_eq!(shown["name"], "Acme Corp", "{shown}");

    for (app, org) in [
        ("alpha", "personal"),
        ("gamma", "personal"),
        ("beta", "acme-corp"),
    ] {
        let run = platform.aloft(&["apps", "create", app, "-o", org]);
        assert!(run.ok(), "{run}");
    }

    // Org tokens: each sees its own org's apps and nothing of the other (404, not 403).
    let (personal, personal_id) = create_token(&platform, None, &["org", "-n", "personal ci"]);
    let (acme, _) = create_token(&platform, None, &["org", "-o", "acme-corp"]);
    assert_eq!(app_names(&platform, &personal), ["alpha", "gamma"]);
    assert_eq!(app_names(&platform, &acme), ["beta"]);
    for (token, foreign) in [(&personal, "beta"), (&acme, "alpha")] {
        let (status, body) = api(
            &platform,
            token,
            "GET",
            &format!("/v1/apps/{foreign}"),
            None,
        );
        assert_eq!(status, 404, "{body}");
        assert!(error_of(&body).contains("not found"), "{body}");
        let (status, body) = api(
            &platform,
            token,
            "GET",
            &format!("/v1/apps/{foreign}/machines"),
            None,
        );
        assert_eq!(status, 404, "{body}");
        let listed = aloft_as(&platform, token, &["machine", "list", "-a", foreign]);
        assert!(
            !listed.ok() && listed.stderr.contains("not found"),
            "{listed}"
        );
        let (status, body) = api(
            &platform,
            token,
            "DELETE",
            &format!("/v1/apps/{foreign}"),
            None,
        );
        assert_eq!(status, 404, "{body}");
    }
    let (status, body) = api(&platform, &personal, "GET", "/v1/orgs/acme-corp", None);
    assert_eq!(status, 404, "{body}");
    let shown = aloft_as(&platform, &personal, &["orgs", "show", "acme-corp"]);
    assert!(
        !shown.ok() && shown.stderr.contains("organization not found"),
        "{shown}"
    );
    let orgs = json(&aloft_as(&platform, &acme, &["orgs", "list", "--json"]));
    assert_eq!(orgs.as_array().map(Vec::len), Some(1), "{orgs}");
    assert_eq!(orgs[0]["slug"], "acme-corp", "{orgs}");
    // An org token cannot make apps in the other org either, nor new orgs.
    let (status, body) = api(
        &platform,
        &acme,
        "POST",
        "/v1/apps",
        Some(r#"{"app_name":"sneaky","org_slug":"personal"}"#),
    );
    assert_eq!(status, 404, "{body}");
    let sneaky = aloft_as(&platform, &personal, &["orgs", "create", "Other"]);
    assert!(
        !sneaky.ok() && sneaky.stderr.contains("only a user token"),
        "{sneaky}"
    );
    assert_eq!(app_names(&platform, &admin), ["alpha", "beta", "gamma"]);

    // A deploy token for one app, given through the environment.
    let (deploy, deploy_id) = create_token(
        &platform,
        None,
        &[
            "deploy",
            "-a",
            "alpha",
            "--expiry",
            "1h",
            "-n",
            "alpha deploy",
        ],
    );
    let listed = aloft_with_env_token(&platform, &deploy, &["apps", "list", "--json"]);
    let apps = json(&listed);
    assert_eq!(apps.as_array().map(Vec::len), Some(1), "{listed}");
    assert_eq!(apps[0]["name"], "alpha", "{listed}");
    let listed = aloft_with_env(&platform, "FLY_ACCESS_TOKEN", &deploy, &["apps", "list"]);
    assert!(
        listed.ok() && listed.stdout.contains("alpha") && !listed.stdout.contains("gamma"),
        "{listed}"
    );
    let machines = aloft_with_env_token(&platform, &deploy, &["machine", "list", "-a", "alpha"]);
    assert!(machines.ok(), "{machines}");
    let other = aloft_with_env_token(&platform, &deploy, &["machine", "list", "-a", "gamma"]);
    assert!(!other.ok() && other.stderr.contains("not found"), "{other}");
    let (status, _) = api(&platform, &deploy, "GET", "/v1/apps/gamma", None);
    assert_eq!(status, 404);
    let (status, body) = api(
        &platform,
        &deploy,
        "POST",
        "/v1/apps",
        Some(r#"{"app_name":"delta","org_slug":"personal"}"#),
    );
    assert_eq!(status, 403, "{body}");
    assert!(
        error_of(&body).contains("limited to specific apps"),
        "{body}"
    );
    let minted = aloft_as(&platform, &deploy, &["tokens", "create", "org"]);
    assert!(
        !minted.ok() && minted.stderr.contains("limited to specific apps"),
        "{minted}"
    );

    // A read-only token reads but cannot write.
    let (readonly, readonly_id) = create_token(&platform, None, &["readonly"]);
    assert_eq!(app_names(&platform, &readonly), ["alpha", "gamma"]);
    let refused = aloft_as(&platform, &readonly, &["apps", "create", "delta"]);
    assert!(
        !refused.ok() && refused.stderr.contains("this token is read-only"),
        "{refused}"
    );
    let refused = aloft_as(
        &platform,
        &readonly,
        &[
            "machine",
            "run",
            "registry.invalid/none:latest",
            "-a",
            "alpha",
        ],
    );
    assert!(
        !refused.ok() && refused.stderr.contains("this token is read-only"),
        "{refused}"
    );
    let (status, body) = api(
        &platform,
        &readonly,
        "POST",
        "/v1/apps",
        Some(r#"{"app_name":"delta","org_slug":"personal"}"#),
    );
    assert_eq!(status, 403, "{body}");
    assert_eq!(error_of(&body), "this token is read-only");
    assert!(!app_names(&platform, &admin).contains(&"delta".to_string()));

    // Offline attenuation: narrowed to one app, to reading, to a short life.
    let attenuate = |args: &[&str]| {
        let mut all = vec!["tokens", "attenuate", "--token", personal.as_str()];
        all.extend_from_slice(args);
        let run = platform.aloft(&all);
        assert!(run.ok(), "{run}");
        let token = run.stdout.trim().to_string();
        assert!(token.starts_with("fm1_") && token != personal, "{run}");
        token
    };
    let only_gamma = attenuate(&["-a", "gamma"]);
    assert_eq!(app_names(&platform, &only_gamma), ["gamma"]);
    let (status, _) = api(&platform, &only_gamma, "GET", "/v1/apps/alpha", None);
    assert_eq!(status, 404);
    let reading = attenuate(&["--read-only"]);
    let (status, body) = api(
        &platform,
        &reading,
        "POST",
        "/v1/apps",
        Some(r#"{"app_name":"delta","org_slug":"personal"}"#),
    );
    assert_eq!(
        (status, error_of(&body).as_str()),
        (403, "this token is read-only")
    );
    let negative = platform.aloft(&[
        "tokens",
        "attenuate",
        "--token",
        personal.as_str(),
        "--expiry=-1h",
    ]);
    assert!(
        !negative.ok() && negative.stderr.contains("--expiry"),
        "an expiry in the past is bad input: {negative}"
    );
    let short = attenuate(&["--expiry", "1s"]);
    // Tampering with the caveats breaks the signature: widening the token is impossible.
    let mut tampered = short.clone().into_bytes();
    let last = tampered.len() - 2;
    tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    let (status, body) = api(&platform, &tampered, "GET", "/v1/apps", None);
    assert_eq!(status, 401, "{body}");
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let (status, body) = api(&platform, &short, "GET", "/v1/apps", None);
    assert_eq!(status, 401, "{body}");
    assert_eq!(error_of(&body), "token has expired");
    let expired = aloft_as(&platform, &short, &["apps", "list"]);
    assert!(
        !expired.ok() && expired.stderr.contains("token has expired"),
        "{expired}"
    );

    // `tokens list` shows them, in a table and as JSON.
    let listed = platform.aloft(&["tokens", "list"]);
    assert!(listed.ok(), "{listed}");
    for id in [&personal_id, &deploy_id, &readonly_id] {
        assert!(listed.stdout.contains(id.as_str()), "{id}: {listed}");
    }
    let deploy_row = listed
        .stdout
        .lines()
        .find(|l| l.contains(deploy_id.as_str()))
        .unwrap();
    assert!(
        deploy_row.contains("deploy") && deploy_row.contains("alpha"),
        "{listed}"
    );
    let tokens = json(&platform.aloft(&["tokens", "list", "--json"]));
    let deploy_info = tokens
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == deploy_id.as_str())
        .unwrap_or_else(|| panic!("{tokens}"));
    assert_eq!(deploy_info["type"], "deploy", "{deploy_info}");
    assert_eq!(deploy_info["name"], "alpha deploy", "{deploy_info}");
    assert_eq!(deploy_info["apps"], serde_json::json!(["alpha"]));
    let expires = deploy_info["expires_at"].as_str().unwrap_or_default();
    let expires = chrono::DateTime::parse_from_rfc3339(expires)
        .unwrap_or_else(|e| panic!("{e}: {deploy_info}"));
    let left = expires.timestamp() - chrono::Utc::now().timestamp();
    assert!(
        (3000..=3600).contains(&left),
        "--expiry 1h: {left}s left: {deploy_info}"
    );
    assert!(
        tokens
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["revoked"] == false)
    );
    // The acme org token is listed too (the user token is in both orgs), a deploy token
    // may not list tokens, and an org token lists only its org's.
    let acme_list = json(&aloft_as(&platform, &acme, &["tokens", "list", "--json"]));
    assert!(
        acme_list
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["org_slug"] == "acme-corp"),
        "{acme_list}"
    );

    // Revocation: the token and everything attenuated from it are refused.
    let revoked = platform.aloft(&["tokens", "revoke", &deploy_id]);
    assert!(
        revoked.ok() && revoked.stdout.contains(&format!("Revoked {deploy_id}")),
        "{revoked}"
    );
    let refused = aloft_with_env_token(&platform, &deploy, &["apps", "list"]);
    assert!(
        !refused.ok() && refused.stderr.contains("token has been revoked"),
        "{refused}"
    );
    let (status, _) = api(&platform, &deploy, "GET", "/v1/apps/alpha", None);
    assert_eq!(status, 401);
    let revoked = platform.aloft(&["tokens", "revoke", &personal_id]);
    assert!(revoked.ok(), "{revoked}");
    for token in [&personal, &only_gamma, &reading] {
        let (status, body) = api(&platform, token, "GET", "/v1/apps", None);
        assert_eq!(status, 401, "{body}");
    }
    let tokens = json(&platform.aloft(&["tokens", "list", "--json"]));
    for id in [&deploy_id, &personal_id] {
        let info = tokens
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["id"] == id.as_str())
            .unwrap_or_else(|| panic!("{tokens}"));
        assert_eq!(info["revoked"], true, "{info}");
    }
    let unknown = platform.aloft(&["tokens", "revoke", "nosuchtoken"]);
    assert!(
        !unknown.ok() && unknown.stderr.contains("token not found"),
        "{unknown}"
    );
    // The rest still work.
    assert_eq!(app_names(&platform, &readonly), ["alpha", "gamma"]);
    assert_eq!(app_names(&platform, &acme), ["beta"]);
}

/// Builds examples/hello into the platform's registry (no deploy) and returns the image.
fn hello_image(platform: &Platform, app: &str) -> String {
    let dir = platform.hello_app_dir(app);
    let built = platform.aloft_in(Some(&dir), &["deploy", "--build-only", "-a", app]);
    assert!(built.ok(), "{built}\n{}", platform.server_log());
    built
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("Image: "))
        .unwrap_or_else(|| panic!("no image in the build output: {built}"))
        .trim()
        .to_string()
}

fn machine_json(platform: &Platform, app: &str, id: &str) -> Value {
    json(&platform.aloft(&["machine", "status", id, "-a", app, "--json"]))
}

fn machines(platform: &Platform, app: &str) -> Vec<Value> {
    let listed = json(&platform.aloft(&["machine", "list", "-a", app, "--json"]));
    listed
        .as_array()
        .unwrap_or_else(|| panic!("a list of machines: {listed}"))
        .clone()
}

#[test]
fn machine_commands_drive_a_real_machine() {
    require_platform!();
    let platform = Platform::start();
    let admin = platform.aloft(&["auth", "token"]).stdout.trim().to_string();
    let created = platform.aloft(&["apps", "create", "web"]);
    assert!(created.ok(), "{created}");
    let image = hello_image(&platform, "web");

    let empty = platform.aloft(&["machine", "list", "-a", "web"]);
    assert!(
        empty.ok() && empty.stdout.contains("No machines are available"),
        "{empty}"
    );
    assert_eq!(machines(&platform, "web").len(), 0);

    // run
    let run = platform.aloft(&[
        "machine",
        "run",
        &image,
        "-a",
        "web",
        "-n",
        "first",
        "-e",
        "GREETING=one",
        "-e",
        "PORT=8080",
        "-m",
        "role=test",
    ]);
    assert!(run.ok(), "{run}\n{}", platform.server_log());
    let id = run
        .stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("Machine ID: "))
        .unwrap_or_else(|| panic!("no machine ID: {run}"))
        .trim()
        .to_string();
    assert!(run.stdout.contains("Machine started"), "{run}");

    // list (table and JSON) and status (text and JSON)
    let listed = machines(&platform, "web");
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["id"], id.as_str());
    assert_eq!(listed[0]["name"], "first");
    assert_eq!(listed[0]["state"], "started");
    assert_eq!(listed[0]["config"]["env"]["GREETING"], "one");
    assert_eq!(listed[0]["config"]["metadata"]["role"], "test");
    let table = platform.aloft(&["machine", "list", "-a", "web"]);
    assert!(table.ok(), "{table}");
    let row = table
        .stdout
        .lines()
        .find(|l| l.contains(id.as_str()))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(row.contains("first") && row.contains("started"), "{table}");
    let quiet = platform.aloft(&["machine", "list", "-a", "web", "-q"]);
    assert_eq!(quiet.stdout.trim(), id, "{quiet}");
    let status = platform.aloft(&["machine", "status", &id, "-a", "web"]);
    assert!(
        status.ok()
            && status.stdout.contains(&format!("Machine ID: {id}"))
            && status.stdout.contains("State: started")
            && status.stdout.contains("Event Logs"),
        "{status}"
    );
    assert!(
        status
            .stdout
            .lines()
            .any(|l| l.trim_start().starts_with("Process Group") && l.trim_end().ends_with("= app")),
        "the same process group as `machine list` shows: {status}"
    );
    let first_version = machine_json(&platform, "web", &id)["instance_id"]
        .as_str()
        .unwrap()
        .to_string();

    // Another org's token can neither see the machine nor run the image of an app it
    // cannot see (hosts pull with their own token, so the API checks), and the answer is
    // the same for a repository that does not exist.
    assert!(platform.aloft(&["orgs", "create", "Acme Corp"]).ok());
    assert!(
        platform
            .aloft(&["apps", "create", "other", "-o", "acme-corp"])
            .ok()
    );
    let acme = json(&platform.aloft(&["tokens", "create", "org", "-o", "acme-corp", "--json"]));
    let acme = acme["token"].as_str().unwrap().to_string();
    let hidden = aloft_as(&platform, &acme, &["machine", "status", &id, "-a", "web"]);
    assert!(
        !hidden.ok() && hidden.stderr.contains("not found"),
        "{hidden}"
    );
    let registry = image.split('/').next().unwrap();
    for (foreign, repository) in [
        (image.clone(), "web"),
        (format!("{registry}/nosuch:latest"), "nosuch"),
    ] {
        let refused = aloft_as(
            &platform,
            &acme,
            &["machine", "run", &foreign, "-a", "other"],
        );
        assert!(
            !refused.ok()
                && refused.stderr.contains(&format!(
                    "is in repository {repository}, which this token may not pull from"
                )),
            "{refused}"
        );
        let (status_code, body) = api(
            &platform,
            &acme,
            "POST",
            "/v1/apps/other/machines",
            Some(&serde_json::json!({ "config": { "image": foreign } }).to_string()),
        );
        assert_eq!(status_code, 400, "{body}");
    }
    assert_eq!(machines(&platform, "other").len(), 0);

    // A read-only token cannot stop it.
    let readonly = json(&platform.aloft(&["tokens", "create", "readonly", "--json"]));
    let readonly = readonly["token"].as_str().unwrap().to_string();
    let refused = aloft_as(&platform, &readonly, &["machine", "stop", &id, "-a", "web"]);
    assert!(
        !refused.ok() && refused.stderr.contains("this token is read-only"),
        "{refused}"
    );
    let (status_code, body) = api(
        &platform,
        &readonly,
        "POST",
        &format!("/v1/apps/web/machines/{id}/stop"),
        Some("{}"),
    );
    assert_eq!(status_code, 403, "{body}");
    assert_eq!(machine_json(&platform, "web", &id)["state"], "started");

    // stop, start, restart
    let stopped = platform.aloft(&["machine", "stop", &id, "-a", "web"]);
    assert!(
        stopped.ok() && stopped.stdout.contains("has been successfully stopped"),
        "{stopped}"
    );
    assert_eq!(machine_json(&platform, "web", &id)["state"], "stopped");
    let again = platform.aloft(&["machine", "stop", &id, "-a", "web"]);
    assert!(again.ok(), "stopping a stopped machine is fine: {again}");
    let started = platform.aloft(&["machine", "start", &id, "-a", "web"]);
    assert!(
        started.ok() && started.stdout.contains(&format!("{id} has been started")),
        "{started}"
    );
    let wait = platform.curl(&[
        "-H",
        &format!("Authorization: Bearer {admin}"),
        &format!("http://127.0.0.1:4280/v1/apps/web/machines/{id}/wait?state=started&timeout=30"),
    ]);
    assert!(wait.ok() && wait.stdout.contains("ok"), "{wait}");
    let restarted = platform.aloft(&["machine", "restart", &id, "-a", "web"]);
    assert!(
        restarted.ok() && restarted.stdout.contains("restarted successfully"),
        "{restarted}"
    );
    assert_eq!(machine_json(&platform, "web", &id)["state"], "started");

    // update: a new env is a new version, started
    let updated = platform.aloft(&[
        "machine",
        "update",
        &id,
        "-a",
        "web",
        "-e",
        "GREETING=two",
        "-y",
    ]);
    assert!(
        updated.ok() && updated.stdout.contains("updated successfully"),
        "{updated}\n{}",
        platform.server_log()
    );
    let machine = machine_json(&platform, "web", &id);
    assert_eq!(machine["config"]["env"]["GREETING"], "two", "{machine}");
    assert_eq!(machine["config"]["env"]["PORT"], "8080", "{machine}");
    assert_eq!(machine["state"], "started", "{machine}");
    assert_ne!(machine["instance_id"], first_version.as_str(), "{machine}");
    let events = json(&platform.curl(&[
        "-H",
        &format!("Authorization: Bearer {admin}"),
        &format!("http://127.0.0.1:4280/v1/apps/web/machines/{id}/events"),
    ]));
    let kinds: Vec<&str> = events
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["type"].as_str())
        .collect();
    for kind in ["launch", "start", "stop", "update"] {
        assert!(kinds.contains(&kind), "{kind} in {kinds:?}");
    }

    // clone
    let cloned = platform.aloft(&["machine", "clone", &id, "-a", "web", "-n", "second"]);
    assert!(
        cloned.ok() && cloned.stdout.contains("Machine has been cloned"),
        "{cloned}\n{}",
        platform.server_log()
    );
    let listed = machines(&platform, "web");
    assert_eq!(listed.len(), 2, "{listed:?}");
    let clone = listed
        .iter()
        .find(|m| m["id"] != id.as_str())
        .unwrap()
        .clone();
    let clone_id = clone["id"].as_str().unwrap().to_string();
    assert_eq!(clone["name"], "second", "{clone}");
    assert_eq!(clone["state"], "started", "{clone}");
    assert_eq!(clone["config"]["env"]["GREETING"], "two", "{clone}");
    assert_ne!(clone["private_ip"], machine["private_ip"], "{clone}");

    // cordon, uncordon
    let cordoned = platform.aloft(&["machine", "cordon", &id, "-a", "web"]);
    assert!(cordoned.ok(), "{cordoned}");
    assert_eq!(machine_json(&platform, "web", &id)["cordoned"], true);
    let status = platform.aloft(&["machine", "status", &id, "-a", "web"]);
    assert!(
        status
            .stdout
            .lines()
            .any(|l| l.contains("Cordoned") && l.contains("true")),
        "{status}"
    );
    assert_ne!(machine_json(&platform, "web", &clone_id)["cordoned"], true);
    let uncordoned = platform.aloft(&["machine", "uncordon", &id, "-a", "web"]);
    assert!(uncordoned.ok(), "{uncordoned}");
    assert_ne!(machine_json(&platform, "web", &id)["cordoned"], true);

    // leases: one held through the API blocks the CLI's writes until cleared
    let none = platform.aloft(&["machine", "leases", "view", "-a", "web"]);
    assert!(
        none.ok() && none.stdout.contains("No machine leases are held"),
        "{none}"
    );
    let (status_code, body) = api(
        &platform,
        &admin,
        "POST",
        &format!("/v1/apps/web/machines/{id}/lease"),
        Some(r#"{"ttl": 300, "description": "held by the test"}"#),
    );
    assert_eq!(status_code, 200, "{body}");
    let lease: Value = serde_json::from_str(&body).unwrap();
    let nonce = lease["data"]["nonce"].as_str().unwrap().to_string();
    let shown = platform.aloft(&["machine", "leases", "view", "-a", "web"]);
    assert!(shown.ok(), "{shown}");
    let row = shown
        .stdout
        .lines()
        .find(|l| l.contains(id.as_str()))
        .unwrap_or_else(|| panic!("{shown}"));
    assert!(
        row.contains(&nonce) && row.contains("held by the test"),
        "{shown}"
    );
    assert!(!shown.stdout.contains(&clone_id), "{shown}");
    let leases = json(&platform.aloft(&["machine", "leases", "view", &id, "-a", "web", "--json"]));
    assert_eq!(leases[&id]["nonce"], nonce.as_str(), "{leases}");
    let blocked = platform.aloft(&["machine", "cordon", &id, "-a", "web"]);
    assert!(
        !blocked.ok() && blocked.stderr.to_lowercase().contains("lease"),
        "{blocked}"
    );
    let blocked = platform.aloft(&[
        "machine",
        "update",
        &id,
        "-a",
        "web",
        "-e",
        "GREETING=three",
        "-y",
    ]);
    assert!(
        !blocked.ok() && blocked.stderr.to_lowercase().contains("lease"),
        "{blocked}"
    );
    assert_eq!(
        machine_json(&platform, "web", &id)["config"]["env"]["GREETING"],
        "two"
    );
    let cleared = platform.aloft(&["machine", "leases", "clear", &id, "-a", "web"]);
    assert!(cleared.ok() && cleared.stdout.contains("done"), "{cleared}");
    let none = platform.aloft(&["machine", "leases", "view", "-a", "web"]);
    assert!(
        none.ok() && none.stdout.contains("No machine leases are held"),
        "{none}"
    );
    let leases = json(&platform.aloft(&["machine", "leases", "view", "-a", "web", "--json"]));
    assert_eq!(leases, serde_json::json!({}));
    let cordoned = platform.aloft(&["machine", "cordon", &id, "-a", "web"]);
    assert!(
        cordoned.ok(),
        "writes work again once the lease is gone: {cordoned}"
    );

    // destroy: a running machine needs --force
    let refused = platform.aloft(&["machine", "destroy", &id, "-a", "web"]);
    assert!(
        !refused.ok() && refused.stderr.contains("--force"),
        "{refused}"
    );
    assert_eq!(machine_json(&platform, "web", &id)["state"], "started");
    let destroyed = platform.aloft(&["machine", "destroy", &id, "-a", "web", "--force"]);
    assert!(
        destroyed.ok()
            && destroyed
                .stdout
                .contains(&format!("{id} has been destroyed")),
        "{destroyed}"
    );
    let listed = machines(&platform, "web");
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["id"], clone_id.as_str());
    let gone = platform.aloft(&["machine", "status", &id, "-a", "web"]);
    assert!(!gone.ok() || gone.stdout.contains("destroyed"), "{gone}");
    let missing = platform.aloft(&["machine", "stop", "0123456789abcd", "-a", "web"]);
    assert!(
        !missing.ok()
            && missing
                .stderr
                .contains("machine 0123456789abcd not found in app web"),
        "{missing}"
    );
    let destroyed = platform.aloft(&["machine", "destroy", &clone_id, "-a", "web", "--force"]);
    assert!(destroyed.ok(), "{destroyed}");
    assert_eq!(machines(&platform, "web").len(), 0);
}
