//! The real flyctl (built by scripts/flyctl-for-tests.sh, path in ALOFT_TEST_FLYCTL) against
//! `aloft server` in the test's network namespace, with the environment `aloft flyctl-env`
//! prints and HOME in a temp dir. The namespace has no route out, so nothing reaches Fly.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{Platform, Run};

fn flyctl_binary() -> Option<PathBuf> {
    let path = PathBuf::from(std::env::var_os("ALOFT_TEST_FLYCTL")?);
    path.exists().then_some(path)
}

/// The flyctl binary, when the platform can run here and flyctl is built; else the test
/// skips (which fails under ALOFT_REQUIRE_ALL_TESTS).
fn flyctl_or_skip() -> Option<PathBuf> {
    if let Some(reason) = common::missing_prerequisite() {
        aloft_testkit::skip(&reason);
        return None;
    }
    let binary = flyctl_binary();
    if binary.is_none() {
        aloft_testkit::skip("flyctl is not built: source scripts/flyctl-for-tests.sh");
    }
    binary
}

/// Every GraphQL query `client` sent was one Aloft's schema answers.
fn assert_every_query_answered(platform: &Platform, client: &str) {
    let log = platform.server_log();
    assert!(
        !log.contains("GraphQL query Aloft cannot answer"),
        "{client} sent GraphQL Aloft does not understand:\n{log}"
    );
}

/// `aloft flyctl-env`'s `export NAME='VALUE'` lines as pairs.
fn flyctl_env(platform: &Platform) -> Vec<(String, String)> {
    let run = platform.aloft(&["flyctl-env"]);
    assert!(run.ok(), "aloft flyctl-env: {run}");
    run.stdout
        .lines()
        .map(|line| {
            let assignment = line
                .strip_prefix("export ")
                .unwrap_or_else(|| panic!("not an export line: {line}"));
            let (name, value) = assignment.split_once('=').expect("NAME=VALUE");
            let value = shell_words::split(value)
                .expect("shell-quoted value")
                .join(" ");
            (name.to_string(), value)
        })
        .collect()
}

fn flyctl(platform: &Platform, flyctl: &Path, env: &[(String, String)], args: &[&str]) -> Run {
    flyctl_in(platform, flyctl, env, None, args)
}

/// flyctl run in `dir` (where it reads fly.toml), or in the test's own directory.
fn flyctl_in(
    platform: &Platform,
    flyctl: &Path,
    env: &[(String, String)],
    dir: Option<&Path>,
    args: &[&str],
) -> Run {
    let home = platform.home().join("flyctl-home");
    std::fs::create_dir_all(&home).expect("flyctl home");
    let mut command = platform.in_netns(flyctl);
    if let Some(dir) = dir {
        command.current_dir(dir);
    }
    command
        .args(args)
        .env_clear()
        .env("HOME", &home)
        .env("PATH", "/usr/bin:/bin");
    for (name, value) in env {
        command.env(name, value);
    }
    Run::from(command.output().expect("running flyctl"))
}

#[test]
fn flyctl_env_points_the_real_flyctl_at_aloft() {
    let Some(flyctl_path) = flyctl_or_skip() else {
        return;
    };
    let platform = Platform::start();
    let env = flyctl_env(&platform);
    let get = |name: &str| {
        env.iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("{name} missing from aloft flyctl-env"))
    };
    let token = platform.aloft(&["auth", "token"]);
    assert_eq!(get("FLY_ACCESS_TOKEN"), token.stdout.trim());
    assert_eq!(get("FLY_SEND_METRICS"), "0");
    assert_eq!(get("FLY_NO_UPDATE_CHECK"), "1");
    assert_eq!(get("FLY_NO_INCIDENTS_CHECK"), "1");
    assert!(get("FLY_TRACE_COLLECTOR_URL").starts_with("127.0.0.1:"));
    assert!(get("FLY_API_BASE_URL").starts_with("http://"));

    let created = platform.aloft(&["apps", "create", "flyctl-app"]);
    assert!(created.ok(), "{created}");
    // The Machines API is Aloft's own, reached through FLY_FLAPS_BASE_URL with the token
    // sent as `Bearer`.
    let listed = flyctl(
        &platform,
        &flyctl_path,
        &env,
        &["machine", "list", "-a", "flyctl-app", "--json"],
    );
    assert!(listed.ok(), "flyctl machine list: {listed}");
    let machines: serde_json::Value =
        serde_json::from_str(listed.stdout.trim()).expect("flyctl machine list --json is JSON");
    assert_eq!(machines, serde_json::json!([]));

    let secrets = flyctl(
        &platform,
        &flyctl_path,
        &env,
        &["secrets", "list", "-a", "flyctl-app"],
    );
    assert!(secrets.ok(), "flyctl secrets list: {secrets}");
}

/// The app's machines through the Machines API: (id, state) pairs.
fn machines(platform: &Platform, token: &str, app: &str) -> Vec<(String, String)> {
    let (code, body) = platform.api(token, "GET", &format!("/v1/apps/{app}/machines"), None);
    assert_eq!(code, 200, "{body}");
    let listed: serde_json::Value = serde_json::from_str(&body).expect("machines JSON");
    listed
        .as_array()
        .expect("a list")
        .iter()
        .map(|m| {
            (
                m["id"].as_str().unwrap_or_default().to_string(),
                m["state"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

fn secret_names(platform: &Platform, app: &str) -> Vec<String> {
    let run = platform.aloft(&["secrets", "list", "-a", app, "--json"]);
    assert!(run.ok(), "{run}");
    let listed: serde_json::Value = serde_json::from_str(&run.stdout).expect("secrets JSON");
    listed
        .as_array()
        .expect("a list")
        .iter()
        .map(|s| s["name"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// The app commands of issue 22, run by the real flyctl against Aloft (FLY_API_BASE_URL's
/// GraphQL and logs, FLY_UIEX_BASE_URL's releases, the Machines API): each exits 0 and
/// the platform's state afterwards is what it asked for, checked with Aloft's own CLI
/// and API.
#[test]
fn flyctl_app_commands_work_against_aloft() {
    let Some(fly) = flyctl_or_skip() else {
        return;
    };
    let platform = Platform::start();
    let env = flyctl_env(&platform);
    let token = platform.aloft(&["auth", "token"]).stdout.trim().to_string();
    let app = "flyapp";
    let run = |args: &[&str]| {
        let run = flyctl(&platform, &fly, &env, args);
        eprintln!("flyctl {}: {run}", args.join(" "));
        assert!(
            run.ok(),
            "flyctl {}: {run}\n--- server log\n{}",
            args.join(" "),
            platform.server_log()
        );
        run
    };

    // apps create: the only org is the personal one, picked without asking.
    let created = run(&["apps", "create", app]);
    assert!(
        created.stdout.contains(&format!("New app created: {app}")),
        "{created}"
    );
    let listed = platform.aloft(&["apps", "list", "--json"]);
    let apps: serde_json::Value = serde_json::from_str(&listed.stdout).expect("apps JSON");
    assert!(
        apps.as_array()
            .expect("a list")
            .iter()
            .any(|a| a["name"] == app && a["organization"]["slug"] == "personal"),
        "{listed}"
    );

    // apps list: the app, its org and status.
    let listed = run(&["apps", "list"]);
    let row = listed
        .stdout
        .lines()
        .find(|l| l.split_whitespace().next() == Some(app))
        .unwrap_or_else(|| panic!("{app} missing from flyctl apps list: {listed}"));
    assert!(row.contains("personal") && row.contains("pending"), "{row}");

    // secrets set before the first deploy: staged, and stored.
    let staged = run(&["secrets", "set", "FROM_FLYCTL=yes", "-a", app]);
    assert!(
        staged.stdout.contains("staged for the first deployment"),
        "{staged}"
    );
    assert_eq!(secret_names(&platform, app), vec!["FROM_FLYCTL"]);

    // A deploy by Aloft's CLI gives the app a release, a machine and logs.
    let dir = platform.hello_app_dir(app);
    let toml = std::fs::read_to_string(dir.join("fly.toml")).expect("fly.toml");
    std::fs::write(
        dir.join("fly.toml"),
        toml.replace("app = \"hello\"", &format!("app = \"{app}\"")),
    )
    .expect("fly.toml");
    let deployed = platform.aloft_in(Some(&dir), &["deploy", "--ha=false"]);
    assert!(deployed.ok(), "{deployed}\n{}", platform.server_log());
    let first = machines(&platform, &token, app);
    assert_eq!(first.len(), 1, "{first:?}");
    let machine_id = first[0].0.clone();

    // status: the app and its machine.
    let status = run(&["status", "-a", app]);
    assert!(
        status.stdout.contains(app) && status.stdout.contains(&machine_id),
        "{status}"
    );

    // releases: the deploy's release, complete.
    let releases = run(&["releases", "-a", app]);
    let v1 = releases
        .stdout
        .lines()
        .find(|l| l.trim_start().starts_with("v1"))
        .unwrap_or_else(|| panic!("no v1 in flyctl releases: {releases}"));
    assert!(v1.contains("complete"), "{releases}");

    // config show: the deployed fly.toml, as JSON.
    let shown = run(&["config", "show", "-a", app]);
    let config: serde_json::Value =
        serde_json::from_str(&shown.stdout).unwrap_or_else(|e| panic!("{e}: {shown}"));
    assert_eq!(config["app"], app, "{config}");
    assert_eq!(config["http_service"]["internal_port"], 8080, "{config}");
    assert_eq!(config["env"]["GREETING"], "hello from aloft", "{config}");

    // ips list: the addresses Aloft gave the app.
    let allocated = platform.aloft(&["ips", "allocate-v6", "-a", app]);
    assert!(allocated.ok(), "{allocated}");
    let aloft_ips = platform.aloft(&["ips", "list", "-a", app, "--json"]);
    let addresses: serde_json::Value = serde_json::from_str(&aloft_ips.stdout).expect("ips JSON");
    let v6 = addresses
        .as_array()
        .expect("a list")
        .iter()
        .find(|ip| ip["type"] == "v6")
        .and_then(|ip| ip["ip"].as_str())
        .unwrap_or_else(|| panic!("no v6 address: {aloft_ips}"))
        .to_string();
    let ips = run(&["ips", "list", "-a", app]);
    assert!(
        ips.stdout
            .lines()
            .any(|l| l.contains(&v6) && l.contains("v6")),
        "{ips}"
    );

    // volumes list: a volume made with Aloft's CLI.
    let volume = platform.aloft(&[
        "volumes", "create", "data", "-a", app, "--size", "1", "-y", "--json",
    ]);
    assert!(volume.ok(), "{volume}\n{}", platform.server_log());
    let volume: serde_json::Value = serde_json::from_str(&volume.stdout).expect("volume JSON");
    let volume_id = volume["id"].as_str().expect("volume id").to_string();
    let volumes = run(&["volumes", "list", "-a", app]);
    assert!(
        volumes
            .stdout
            .lines()
            .any(|l| l.contains(&volume_id) && l.contains("data")),
        "{volumes}"
    );

    // logs --no-tail: the machine's own output. (flyctl polls until a page has lines, so
    // wait for the machine to have written one first.)
    common::wait_until(
        "the machine's first log line",
        Duration::from_secs(60),
        || {
            let logs = platform.aloft(&["logs", "-a", app, "--no-tail"]);
            (!logs.stdout.contains("hello: listening")).then(|| logs.to_string())
        },
    );
    let logs = run(&["logs", "--no-tail", "-a", app]);
    assert!(
        logs.stdout
            .lines()
            .any(|l| l.contains("hello: listening") && l.contains(&machine_id)),
        "{logs}"
    );

    // scale count: a second machine, made by flyctl through the Machines API.
    run(&["scale", "count", "2", "-a", app, "--yes"]);
    let scaled = machines(&platform, &token, app);
    assert_eq!(scaled.len(), 2, "{scaled:?}");
    assert!(scaled.iter().any(|(id, _)| id == &machine_id), "{scaled:?}");

    // secrets set and unset on a deployed app: flyctl restarts the machines itself, with a
    // release it records through FLY_UIEX_BASE_URL. (Its DNS check after a restart looks
    // up <app>.fly.dev at a public resolver: skipped.)
    run(&[
        "secrets",
        "set",
        "SECOND=2",
        "-a",
        app,
        "--dns-checks=false",
    ]);
    assert_eq!(secret_names(&platform, app), vec!["FROM_FLYCTL", "SECOND"]);
    run(&[
        "secrets",
        "unset",
        "FROM_FLYCTL",
        "-a",
        app,
        "--dns-checks=false",
    ]);
    assert_eq!(secret_names(&platform, app), vec!["SECOND"]);
    let listed = run(&["secrets", "list", "-a", app]);
    assert!(
        listed.stdout.contains("SECOND") && !listed.stdout.contains("FROM_FLYCTL"),
        "{listed}"
    );
    // Each of those restarts is a release flyctl recorded, complete, after the deploy's v1.
    let (code, body) = platform.api(&token, "GET", &format!("/v1/apps/{app}/releases"), None);
    assert_eq!(code, 200, "{body}");
    let releases: serde_json::Value = serde_json::from_str(&body).expect("releases JSON");
    let statuses: Vec<(u64, &str)> = releases
        .as_array()
        .expect("a list")
        .iter()
        .map(|r| {
            (
                r["version"].as_u64().unwrap_or_default(),
                r["status"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        statuses,
        vec![(3, "complete"), (2, "complete"), (1, "complete")],
        "{body}"
    );

    // Every query these commands sent was one Aloft's schema answers.
    assert_every_query_answered(&platform, "flyctl");
}

/// Point 6: a query for something Aloft's schema lacks is a standard GraphQL error naming
/// it, with status 200, and the server log says which operation sent it; a missing app is
/// Fly's "Could not find App".
#[test]
fn graphql_errors_name_what_aloft_lacks() {
    if let Some(reason) = common::missing_prerequisite() {
        aloft_testkit::skip(&reason);
        return;
    }
    let platform = Platform::start();
    let token = platform.aloft(&["auth", "token"]).stdout.trim().to_string();
    let created = platform.aloft(&["apps", "create", "gql-app"]);
    assert!(created.ok(), "{created}");
    let graphql = |body: serde_json::Value| {
        let auth = format!("Authorization: Bearer {token}");
        let body = body.to_string();
        let run = platform.curl(&[
            "-X",
            "POST",
            "-H",
            &auth,
            "-H",
            "Content-Type: application/json",
            "-d",
            &body,
            "-w",
            "\n%{http_code}",
            "http://127.0.0.1:4280/graphql",
        ]);
        let (body, code) = run.stdout.rsplit_once('\n').expect("status line");
        let body: serde_json::Value =
            serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {run}"));
        (code.trim().to_string(), body)
    };

    let (code, body) = graphql(serde_json::json!({
        "query": "query FlyctlMadeThisUp($n: String!) { app(name: $n) { id machineBuildQuota } }",
        "operationName": "FlyctlMadeThisUp",
        "variables": {"n": "gql-app"},
    }));
    assert_eq!(code, "200", "{body}");
    let message = body["errors"][0]["message"].as_str().unwrap_or_default();
    assert!(message.contains("machineBuildQuota"), "{body}");
    let log = platform.server_log();
    assert!(
        log.lines()
            .any(|l| l.contains("FlyctlMadeThisUp") && l.contains("machineBuildQuota")),
        "the server log does not name the operation:\n{log}"
    );

    // fly-go's own queries are anonymous: the log shows the query instead.
    let (code, body) = graphql(serde_json::json!({
        "query": "query ($n: String!) { appcompact: app(name: $n) { id noSuchField } }",
        "variables": {"n": "gql-app"},
    }));
    assert_eq!(code, "200", "{body}");
    assert!(
        body["errors"][0]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("noSuchField"),
        "{body}"
    );
    let log = platform.server_log();
    assert!(
        log.lines()
            .any(|l| l.contains("(anonymous)") && l.contains("appcompact: app(name: $n)")),
        "{log}"
    );

    // What flyctl reacts to: "Could not find App", code NOT_FOUND; aliases are answered.
    let (code, body) = graphql(serde_json::json!({
        "query": "query ($n: String!) { appbasic: app(name: $n) { id name organization { slug } } }",
        "variables": {"n": "no-such-app"},
    }));
    assert_eq!(code, "200", "{body}");
    assert_eq!(body["errors"][0]["message"], "Could not find App", "{body}");
    assert_eq!(
        body["errors"][0]["extensions"]["code"], "NOT_FOUND",
        "{body}"
    );
    let (_, body) = graphql(serde_json::json!({
        "query": "query ($n: String!) { appbasic: app(name: $n) { id name organization { slug type } } }",
        "variables": {"n": "gql-app"},
    }));
    assert!(body.get("errors").is_none(), "{body}");
    assert_eq!(body["data"]["appbasic"]["name"], "gql-app", "{body}");
    assert_eq!(body["data"]["appbasic"]["organization"]["slug"], "personal");
    assert_eq!(body["data"]["appbasic"]["organization"]["type"], "PERSONAL");

    // An image reference in Aloft's registry that it does not have is null (flyctl then
    // says it could not find the image); one elsewhere is passed through unresolved.
    let (_, body) = graphql(serde_json::json!({
        "query": "query ($n: String!, $r: String!) { app(name: $n) { id image(ref: $r) { id digest ref } } }",
        "variables": {"n": "gql-app", "r": "127.0.0.1:4280/gql-app:no-such-tag"},
    }));
    assert!(body.get("errors").is_none(), "{body}");
    assert!(body["data"]["app"]["image"].is_null(), "{body}");
    let (_, body) = graphql(serde_json::json!({
        "query": "query ($n: String!, $r: String!) { app(name: $n) { id image(ref: $r) { digest ref } } }",
        "variables": {"n": "gql-app", "r": "docker.io/library/busybox:1"},
    }));
    assert_eq!(
        body["data"]["app"]["image"],
        serde_json::json!({"digest": "", "ref": "docker.io/library/busybox:1"}),
        "{body}"
    );

    // The registry is named by the host the client reached the API at.
    let query = serde_json::json!({
        "query": "query ($n: String!, $r: String!) { app(name: $n) { id image(ref: $r) { ref } } }",
        "variables": {"n": "gql-app", "r": "aloft.test:4280/gql-app:no-such-tag"},
    })
    .to_string();
    let auth = format!("Authorization: Bearer {token}");
    let by_name = |host: &str| {
        let host = format!("Host: {host}");
        let run = platform.curl(&[
            "-X",
            "POST",
            "-H",
            &auth,
            "-H",
            &host,
            "-H",
            "Content-Type: application/json",
            "-d",
            &query,
            "http://127.0.0.1:4280/graphql",
        ]);
        serde_json::from_str::<serde_json::Value>(&run.stdout)
            .unwrap_or_else(|e| panic!("{e}: {run}"))
    };
    let body = by_name("aloft.test:4280");
    assert!(body["data"]["app"]["image"].is_null(), "{body}");
    let body = by_name("elsewhere.test:4280");
    assert_eq!(
        body["data"]["app"]["image"]["ref"], "aloft.test:4280/gql-app:no-such-tag",
        "{body}"
    );

    // The platform's regions: those with hosts, and the one answering.
    let (_, body) = graphql(serde_json::json!({
        "query": "{ platform { requestRegion regions { code name gatewayAvailable } } }",
    }));
    assert_eq!(body["data"]["platform"]["requestRegion"], "local", "{body}");
    let codes: Vec<&str> = body["data"]["platform"]["regions"]
        .as_array()
        .expect("regions")
        .iter()
        .filter_map(|r| r["code"].as_str())
        .collect();
    assert_eq!(codes, vec!["local"], "{body}");

    // uiex's organizations: the token's own, and a 404 for any other slug.
    let (code, body) = platform.api(&token, "GET", "/api/v1/organizations/personal", None);
    assert_eq!(code, 200, "{body}");
    let org: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(org["organization"]["slug"], "personal", "{body}");
    assert_eq!(org["organization"]["personal"], true, "{body}");
    let (code, body) = platform.api(&token, "GET", "/api/v1/organizations", None);
    assert_eq!(code, 200, "{body}");
    let orgs: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(orgs["organizations"][0]["slug"], "personal", "{body}");
    let (code, body) = platform.api(&token, "GET", "/api/v1/organizations/someone-else", None);
    assert_eq!(code, 404, "{body}");

    // Without a valid token nothing is read.
    let run = platform.curl(&[
        "-X",
        "POST",
        "-H",
        "Content-Type: application/json",
        "-d",
        r#"{"query":"{ app(name: \"gql-app\") { id } }"}"#,
        "http://127.0.0.1:4280/graphql",
    ]);
    let body: serde_json::Value = serde_json::from_str(&run.stdout).expect("JSON");
    assert_eq!(
        body["errors"][0]["extensions"]["code"], "UNAUTHORIZED",
        "{body}"
    );
    assert!(
        body["data"].is_null() || body["data"]["app"].is_null(),
        "{body}"
    );
}

/// A platform with an app whose busybox image is in Aloft's registry (deployed once by
/// Aloft's CLI), and that image's reference.
fn app_with_busybox_image(platform: &Platform, app: &str) -> String {
    let dir = common::idle_busybox_app(platform, app, "");
    let created = platform.aloft(&["apps", "create", app]);
    assert!(created.ok(), "{created}");
    let deployed = platform.aloft_in(Some(&dir), &["deploy", "--ha=false"]);
    assert!(deployed.ok(), "{deployed}\n{}", platform.server_log());
    let ids = common::machine_ids(platform, app);
    assert_eq!(ids.len(), 1, "{ids:?}");
    let machine = common::machine_json(platform, app, &ids[0]);
    let image = machine["config"]["image"].as_str().unwrap_or_default();
    assert!(!image.is_empty(), "{machine}");
    image.to_string()
}

/// Point 1: `fly machine run IMAGE`, `list`, `stop`, `start`, `destroy --force`, each
/// checked against the Machines API's state.
#[test]
fn flyctl_machine_commands_work_against_aloft() {
    let Some(fly) = flyctl_or_skip() else {
        return;
    };
    let platform = Platform::start();
    let env = flyctl_env(&platform);
    let token = platform.aloft(&["auth", "token"]).stdout.trim().to_string();
    let app = "flymachines";
    let image = app_with_busybox_image(&platform, app);
    let before = machines(&platform, &token, app);
    let run = |args: &[&str]| {
        let run = flyctl(&platform, &fly, &env, args);
        eprintln!("flyctl {}: {run}", args.join(" "));
        assert!(
            run.ok(),
            "flyctl {}: {run}\n--- server log\n{}",
            args.join(" "),
            platform.server_log()
        );
        run
    };

    // machine run: a new machine of the image, started.
    let launched = run(&[
        "machine",
        "run",
        &image,
        "-a",
        app,
        "--",
        "/bin/sleep",
        "100000",
    ]);
    let after = machines(&platform, &token, app);
    assert_eq!(after.len(), before.len() + 1, "{after:?}");
    let (id, _) = after
        .iter()
        .find(|(id, _)| !before.iter().any(|(b, _)| b == id))
        .cloned()
        .expect("the new machine");
    assert!(launched.stdout.contains(&id), "{launched}");
    common::wait_until("the machine to start", Duration::from_secs(60), || {
        let state = common::machine_json(&platform, app, &id)["state"].clone();
        (state != "started").then(|| state.to_string())
    });
    let machine = common::machine_json(&platform, app, &id);
    // No --region: a machine in the platform's own region.
    assert_eq!(machine["region"], "local", "{machine}");
    // flyctl resolved the tag to its digest in Aloft's registry, and pinned it.
    let digest = machine["image_ref"]["digest"].as_str().unwrap_or_default();
    assert!(digest.starts_with("sha256:"), "{machine}");
    assert_eq!(
        machine["config"]["image"],
        format!("{image}@{digest}"),
        "{machine}"
    );
    assert_eq!(
        machine["config"]["init"]["cmd"],
        serde_json::json!(["/bin/sleep", "100000"]),
        "{machine}"
    );

    // machine list: every machine of the app, as JSON and as a table.
    let listed = run(&["machine", "list", "-a", app, "--json"]);
    let listed: serde_json::Value = serde_json::from_str(listed.stdout.trim()).expect("JSON");
    let mut ids: Vec<&str> = listed
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    ids.sort_unstable();
    let mut want: Vec<&str> = after.iter().map(|(id, _)| id.as_str()).collect();
    want.sort_unstable();
    assert_eq!(ids, want);
    let table = run(&["machine", "list", "-a", app]);
    assert!(
        table
            .stdout
            .lines()
            .any(|l| l.contains(&id) && l.contains("started")),
        "{table}"
    );

    // machine stop / start.
    run(&["machine", "stop", &id, "-a", app]);
    assert_eq!(
        common::machine_json(&platform, app, &id)["state"],
        "stopped"
    );
    run(&["machine", "start", &id, "-a", app]);
    common::wait_until(
        "the machine to start again",
        Duration::from_secs(60),
        || {
            let state = common::machine_json(&platform, app, &id)["state"].clone();
            (state != "started").then(|| state.to_string())
        },
    );

    // machine destroy --force: gone, the others untouched.
    run(&["machine", "destroy", &id, "-a", app, "--force"]);
    let left = machines(&platform, &token, app);
    assert_eq!(
        left.iter().map(|(id, _)| id).collect::<Vec<_>>(),
        before.iter().map(|(id, _)| id).collect::<Vec<_>>(),
        "{left:?}"
    );
    assert_every_query_answered(&platform, "flyctl");
}

/// Point 2: `fly deploy --image REF` of an app with a fly.toml, the image in Aloft's
/// registry: flyctl creates the machine itself through the Machines API and records the
/// release; and point 3: `fly volumes create` makes a volume `fly volumes list` shows.
#[test]
fn flyctl_deploys_an_image_and_creates_volumes() {
    let Some(fly) = flyctl_or_skip() else {
        return;
    };
    let platform = Platform::start();
    let env = flyctl_env(&platform);
    let token = platform.aloft(&["auth", "token"]).stdout.trim().to_string();
    let image = app_with_busybox_image(&platform, "flysource");
    let run_in = |dir: Option<&Path>, args: &[&str]| {
        let run = flyctl_in(&platform, &fly, &env, dir, args);
        eprintln!("flyctl {}: {run}", args.join(" "));
        assert!(
            run.ok(),
            "flyctl {}: {run}\n--- server log\n{}",
            args.join(" "),
            platform.server_log()
        );
        run
    };

    let app = "flydeploy";
    run_in(None, &["apps", "create", app]);
    let dir = platform.home().join("flydeploy-src");
    std::fs::create_dir_all(&dir).expect("app dir");
    common::write_fly_toml(
        &dir,
        app,
        "\n[env]\n  FROM_FLY_TOML = \"yes\"\n\n[processes]\n  app = \"/bin/sleep 100000\"\n",
    );

    // deploy --image: one machine of that image, with the fly.toml's env and command.
    run_in(
        Some(&dir),
        &["deploy", "--image", &image, "--ha=false", "--yes"],
    );
    let deployed = machines(&platform, &token, app);
    assert_eq!(deployed.len(), 1, "{deployed:?}");
    let machine = common::machine_json(&platform, app, &deployed[0].0);
    assert_eq!(machine["state"], "started", "{machine}");
    assert_eq!(machine["config"]["image"], image.as_str(), "{machine}");
    assert_eq!(
        machine["config"]["env"]["FROM_FLY_TOML"], "yes",
        "{machine}"
    );
    assert_eq!(
        machine["config"]["init"]["cmd"],
        serde_json::json!(["/bin/sleep", "100000"]),
        "{machine}"
    );
    // The release flyctl recorded, complete, with the image.
    let (code, body) = platform.api(&token, "GET", &format!("/v1/apps/{app}/releases"), None);
    assert_eq!(code, 200, "{body}");
    let releases: serde_json::Value = serde_json::from_str(&body).expect("releases JSON");
    assert_eq!(releases[0]["version"], 1, "{body}");
    assert_eq!(releases[0]["status"], "complete", "{body}");
    let listed = run_in(None, &["releases", "-a", app]);
    assert!(
        listed
            .stdout
            .lines()
            .any(|l| l.trim_start().starts_with("v1") && l.contains("complete")),
        "{listed}"
    );

    // volumes create: a volume of that name, size and region, which list shows.
    let created = run_in(
        None,
        &[
            "volumes", "create", "flydata", "--size", "1", "--region", "local", "--yes", "-a", app,
        ],
    );
    let volumes = common::volumes_json(&platform, app, false);
    assert_eq!(volumes.len(), 1, "{volumes:?}");
    let volume = &volumes[0];
    assert_eq!(volume["name"], "flydata", "{volume}");
    assert_eq!(volume["size_gb"], 1, "{volume}");
    assert_eq!(volume["region"], "local", "{volume}");
    let volume_id = volume["id"].as_str().expect("volume id");
    assert!(created.stdout.contains(volume_id), "{created}");
    let listed = run_in(None, &["volumes", "list", "-a", app]);
    assert!(
        listed
            .stdout
            .lines()
            .any(|l| l.contains(volume_id) && l.contains("flydata")),
        "{listed}"
    );

    assert_every_query_answered(&platform, "flyctl");
}

fn flygo_binary() -> Option<PathBuf> {
    let path = PathBuf::from(std::env::var_os("ALOFT_TEST_FLYGO")?);
    path.exists().then_some(path)
}

/// Point 5: the same scenario with fly-go as a library client (crates/cli/tests/flygo,
/// built by scripts/flygo-for-tests.sh): each call succeeds and the platform's state
/// afterwards is what it asked for, checked with Aloft's own CLI and API.
#[test]
fn fly_go_client_works_against_aloft() {
    if let Some(reason) = common::missing_prerequisite() {
        aloft_testkit::skip(&reason);
        return;
    }
    let Some(flygo) = flygo_binary() else {
        aloft_testkit::skip("the fly-go client is not built: source scripts/flygo-for-tests.sh");
        return;
    };
    let platform = Platform::start();
    let env = flyctl_env(&platform);
    let token = platform.aloft(&["auth", "token"]).stdout.trim().to_string();
    let image = app_with_busybox_image(&platform, "gosource");
    let call = |args: &[&str]| -> serde_json::Value {
        let run = flyctl(&platform, &flygo, &env, args);
        eprintln!("flygo-client {}: {run}", args.join(" "));
        assert!(
            run.ok(),
            "flygo-client {}: {run}\n--- server log\n{}",
            args.join(" "),
            platform.server_log()
        );
        serde_json::from_str(run.stdout.trim()).unwrap_or_else(|e| panic!("{e}: {run}"))
    };
    let app = "flygoapp";

    // Organizations (GraphQL): the personal one.
    let orgs = call(&["orgs"]);
    assert!(
        orgs.as_array()
            .expect("a list")
            .iter()
            .any(|o| o["Slug"] == "personal" && o["Type"] == "PERSONAL"),
        "{orgs}"
    );

    // apps create (Machines API), then the app through GraphQL.
    let created = call(&["app-create", app, "personal"]);
    assert_eq!(created["name"], app, "{created}");
    let listed = platform.aloft(&["apps", "list", "--json"]);
    let apps: serde_json::Value = serde_json::from_str(&listed.stdout).expect("apps JSON");
    assert!(
        apps.as_array()
            .expect("a list")
            .iter()
            .any(|a| a["name"] == app && a["organization"]["slug"] == "personal"),
        "{listed}"
    );
    let shown = call(&["app", app]);
    assert_eq!(shown["Name"], app, "{shown}");
    assert_eq!(shown["Organization"]["Slug"], "personal", "{shown}");

    // secrets set / list / unset.
    call(&["secrets-set", app, "FROM_FLYGO", "yes"]);
    call(&["secrets-set", app, "OTHER", "1"]);
    assert_eq!(secret_names(&platform, app), vec!["FROM_FLYGO", "OTHER"]);
    let secrets = call(&["secrets-list", app]);
    let mut names: Vec<&str> = secrets
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    names.sort_unstable();
    assert_eq!(names, vec!["FROM_FLYGO", "OTHER"], "{secrets}");
    call(&["secrets-unset", app, "OTHER"]);
    assert_eq!(secret_names(&platform, app), vec!["FROM_FLYGO"]);

    // machine run / list / stop / start / destroy.
    let launched = call(&["machine-run", app, &image, "local", "/bin/sleep", "100000"]);
    let id = launched["id"].as_str().expect("machine id").to_string();
    assert_eq!(launched["state"], "started", "{launched}");
    assert_eq!(
        machines(&platform, &token, app),
        vec![(id.clone(), "started".to_string())]
    );
    let machine = common::machine_json(&platform, app, &id);
    assert_eq!(machine["config"]["image"], image.as_str(), "{machine}");
    assert_eq!(
        machine["config"]["init"]["cmd"],
        serde_json::json!(["/bin/sleep", "100000"]),
        "{machine}"
    );
    let listed = call(&["machine-list", app]);
    let ids: Vec<&str> = listed
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert_eq!(ids, vec![id.as_str()], "{listed}");
    call(&["machine-stop", app, &id]);
    assert_eq!(
        machines(&platform, &token, app),
        vec![(id.clone(), "stopped".to_string())]
    );
    call(&["machine-start", app, &id]);
    assert_eq!(
        machines(&platform, &token, app),
        vec![(id.clone(), "started".to_string())]
    );
    call(&["machine-destroy", app, &id]);
    assert_eq!(machines(&platform, &token, app), vec![]);

    // volumes create / list.
    let volume = call(&["volume-create", app, "godata", "1", "local"]);
    let volume_id = volume["id"].as_str().expect("volume id").to_string();
    assert_eq!(volume["name"], "godata", "{volume}");
    let volumes = common::volumes_json(&platform, app, false);
    assert_eq!(volumes.len(), 1, "{volumes:?}");
    assert_eq!(volumes[0]["id"], volume_id.as_str());
    assert_eq!(volumes[0]["size_gb"], 1);
    assert_eq!(volumes[0]["region"], "local");
    let listed = call(&["volume-list", app]);
    assert_eq!(listed[0]["id"], volume_id.as_str(), "{listed}");

    // releases (GraphQL): the deployed app's v1, complete; none for the new app.
    let releases = call(&["releases", "gosource"]);
    assert_eq!(releases[0]["Version"], 1, "{releases}");
    assert_eq!(releases[0]["Status"], "complete", "{releases}");
    assert_eq!(call(&["releases", app]), serde_json::json!([]));

    assert_every_query_answered(&platform, "fly-go");
}

/// podman's Docker-compatible API service, run in the test's namespace with its storage
/// under the test's directory (vfs: no mounts left behind) and Aloft's registry allowed
/// over plain HTTP; stopped on drop.
struct PodmanService {
    child: std::process::Child,
    socket: PathBuf,
}

impl PodmanService {
    fn start(platform: &Platform) -> Self {
        let dir = platform.home().join("podman");
        std::fs::create_dir_all(&dir).expect("podman dir");
        let registries = dir.join("registries.conf");
        std::fs::write(
            &registries,
            "[[registry]]\nlocation = \"127.0.0.1:4280\"\ninsecure = true\n",
        )
        .expect("registries.conf");
        let socket = dir.join("podman.sock");
        let log = std::fs::File::create(dir.join("service.log")).expect("podman log");
        let mut command = platform.in_netns(Path::new("podman"));
        command
            .arg("--root")
            .arg(dir.join("storage"))
            .arg("--runroot")
            .arg(dir.join("run"))
            .args([
                "--storage-driver",
                "vfs",
                "--cgroup-manager",
                "cgroupfs",
                "--events-backend",
                "file",
                "system",
                "service",
                "--time=0",
            ])
            .arg(format!("unix://{}", socket.display()))
            .env("CONTAINERS_REGISTRIES_CONF", &registries)
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        let child = command.spawn().expect("starting podman system service");
        let service = Self { child, socket };
        common::wait_until("podman's API socket", Duration::from_secs(30), || {
            (!service.socket.exists())
                .then(|| std::fs::read_to_string(dir.join("service.log")).unwrap_or_default())
        });
        service
    }

    fn docker_host(&self) -> String {
        format!("unix://{}", self.socket.display())
    }
}

impl Drop for PodmanService {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn podman_installed() -> bool {
    std::process::Command::new("podman")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Point 4: `fly deploy --local-only` builds the Dockerfile through a Docker-API engine
/// (podman's API service, DOCKER_HOST), pushes the image to Aloft's registry
/// (FLY_REGISTRY_HOST, user `x` and the token) and deploys it.
#[test]
fn flyctl_deploy_local_only_builds_through_a_docker_api() {
    let Some(fly) = flyctl_or_skip() else {
        return;
    };
    if !podman_installed() {
        aloft_testkit::skip("podman is not installed (scripts/setup.sh --test)");
        return;
    }
    let platform = Platform::start();
    let podman = PodmanService::start(&platform);
    let mut env = flyctl_env(&platform);
    env.push(("DOCKER_HOST".into(), podman.docker_host()));
    let token = platform.aloft(&["auth", "token"]).stdout.trim().to_string();
    let run_in = |dir: Option<&Path>, args: &[&str]| {
        let run = flyctl_in(&platform, &fly, &env, dir, args);
        eprintln!("flyctl {}: {run}", args.join(" "));
        assert!(
            run.ok(),
            "flyctl {}: {run}\n--- server log\n{}",
            args.join(" "),
            platform.server_log()
        );
        run
    };

    let app = "flylocal";
    let dir = common::idle_busybox_app(&platform, app, "");
    run_in(None, &["apps", "create", app]);
    run_in(
        Some(&dir),
        &["deploy", "--local-only", "--ha=false", "--yes"],
    );

    // The image flyctl built and pushed is in Aloft's registry, and the machine runs it.
    let deployed = machines(&platform, &token, app);
    assert_eq!(deployed.len(), 1, "{deployed:?}");
    let machine = common::machine_json(&platform, app, &deployed[0].0);
    assert_eq!(machine["state"], "started", "{machine}");
    let image = machine["config"]["image"].as_str().unwrap_or_default();
    let tag = image
        .strip_prefix(&format!("127.0.0.1:4280/{app}:"))
        .unwrap_or_else(|| panic!("not an image of Aloft's registry: {machine}"));
    let tags = platform.curl(&[
        "-u",
        &format!("x:{token}"),
        &format!("http://127.0.0.1:4280/v2/{app}/tags/list"),
    ]);
    let tags: serde_json::Value =
        serde_json::from_str(&tags.stdout).unwrap_or_else(|e| panic!("{e}: {tags}"));
    assert!(
        tags["tags"]
            .as_array()
            .is_some_and(|t| t.iter().any(|t| t == tag)),
        "{tags}"
    );
    let ran = platform.machine_sh(app, &deployed[0].0, "ls /bin/busybox");
    assert!(ran.ok(), "{ran}");

    let (code, body) = platform.api(&token, "GET", &format!("/v1/apps/{app}/releases"), None);
    assert_eq!(code, 200, "{body}");
    let releases: serde_json::Value = serde_json::from_str(&body).expect("releases JSON");
    assert_eq!(releases[0]["version"], 1, "{body}");
    assert_eq!(releases[0]["status"], "complete", "{body}");
}
