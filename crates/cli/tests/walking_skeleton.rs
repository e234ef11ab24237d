//! The whole path on one host: `aloft server` in a test network namespace, `aloft deploy`
//! of examples/hello (buildah, registry, agent, runc, init), and requests through the proxy.

mod common;

use common::Platform;
use serde_json::Value;

fn header_block(response: &str) -> String {
    response
        .split("\r\n\r\n")
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase()
}

#[test]
fn deploys_the_example_and_serves_it_through_the_proxy() {
    require_platform!();
    let platform = Platform::start();

    let token = platform.aloft(&["auth", "token"]);
    assert!(
        token.ok() && token.stdout.trim().starts_with("fm1_"),
        "{token}"
    );

    let created = platform.aloft(&["apps", "create", "hello"]);
    assert!(created.ok(), "{created}");
    assert!(
        created.stdout.contains("New app created: hello"),
        "{created}"
    );
    let listed = platform.aloft(&["apps", "list"]);
    assert!(
        listed
            .stdout
            .lines()
            .any(|l| l.starts_with("hello") && l.contains("personal")),
        "{listed}"
    );

    let dir = platform.hello_app_dir("hello");
    let deploy = platform.aloft_in(Some(&dir), &["deploy"]);
    assert!(deploy.ok(), "{deploy}\n{}", platform.server_log());
    assert!(
        deploy.stdout.contains("STEP 2/3: COPY hello /hello"),
        "build output streams to the CLI: {deploy}"
    );
    let warnings: Vec<&str> = deploy
        .stderr
        .lines()
        .filter(|l| l.starts_with("WARN region iad"))
        .collect();
    assert_eq!(
        warnings.len(),
        1,
        "one warning naming the region asked for and the one used: {deploy}"
    );
    assert!(warnings[0].contains("will run in local"), "{deploy}");
    assert!(
        deploy.stdout.contains("http://hello.localhost:8080/"),
        "{deploy}"
    );

    let response = platform.curl(&[
        "-i",
        "-H",
        "Host: hello.localhost",
        "http://127.0.0.1:8080/",
    ]);
    assert!(response.ok(), "{response}\n{}", platform.server_log());
    let head = header_block(&response.stdout);
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("\nvia: "), "Via on the response: {head}");
    let request_id = head
        .lines()
        .find_map(|l| l.strip_prefix("fly-request-id: "))
        .unwrap_or_default()
        .trim()
        .to_string();
    assert!(
        request_id.ends_with("-local") && request_id.len() > 8,
        "Fly-Request-Id <id>-<region>: {head}"
    );

    let body = response.stdout.split("\r\n\r\n").nth(1).unwrap_or_default();
    let document: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    let env = &document["env"];
    let machine_id = env["FLY_MACHINE_ID"].as_str().unwrap_or_default();
    assert_eq!(machine_id.len(), 14, "{env}");
    assert!(machine_id.bytes().all(|b| b.is_ascii_hexdigit()), "{env}");
    assert_eq!(env["FLY_ALLOC_ID"], machine_id);
    assert_eq!(env["FLY_APP_NAME"], "hello");
    assert_eq!(env["FLY_REGION"], "local");
    assert_eq!(
        env["PRIMARY_REGION"], "local",
        "PRIMARY_REGION is where the primary machines actually run"
    );
    assert_eq!(env["FLY_PROCESS_GROUP"], "app");
    assert_eq!(env["FLY_VM_MEMORY_MB"], "256");
    assert!(
        env["FLY_IMAGE_REF"]
            .as_str()
            .unwrap_or_default()
            .contains("/hello:deployment-"),
        "{env}"
    );
    assert!(
        !env["FLY_MACHINE_VERSION"]
            .as_str()
            .unwrap_or_default()
            .is_empty(),
        "{env}"
    );
    assert_eq!(env["GREETING"], "hello from aloft", "[env] from fly.toml");
    let headers = &document["headers"];
    assert_eq!(headers["fly-client-ip"][0], "127.0.0.1");
    assert_eq!(headers["fly-forwarded-port"][0], "8080");
    assert_eq!(headers["fly-region"][0], "local");
    assert_eq!(headers["x-forwarded-for"][0], "127.0.0.1");
    assert_eq!(headers["x-forwarded-proto"][0], "http");
    assert_eq!(headers["x-forwarded-port"][0], "8080");
    assert_eq!(headers["x-forwarded-ssl"][0], "off");
    assert!(
        headers["via"][0]
            .as_str()
            .unwrap_or_default()
            .contains("aloft"),
        "{headers}"
    );

    let status = platform.aloft_in(Some(&dir), &["status"]);
    assert!(status.ok(), "{status}");
    assert!(
        status.stdout.contains(machine_id) && status.stdout.contains("started"),
        "{status}"
    );
    let machines = platform.aloft(&["machine", "list", "-a", "hello"]);
    assert!(
        machines.ok() && machines.stdout.contains(machine_id),
        "{machines}"
    );

    let unknown = platform.curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-H",
        "Host: nope.localhost",
        "http://127.0.0.1:8080/",
    ]);
    assert_eq!(unknown.stdout, "404", "{unknown}");

    // First deploy: two machines for the group with services (Fly's HA default).
    let before = machine_ids_and_versions(&platform);
    assert_eq!(before.len(), 2, "{before:?}");
    assert!(before.iter().any(|(id, _)| id == machine_id), "{before:?}");

    // A second deploy updates the same machines to a new version, still served.
    let again = platform.aloft_in(Some(&dir), &["deploy"]);
    assert!(again.ok(), "{again}");
    assert!(again.stdout.contains("Release v2"), "{again}");
    let after = machine_ids_and_versions(&platform);
    let ids = |list: &[(String, String)]| list.iter().map(|(id, _)| id.clone()).collect::<Vec<_>>();
    assert_eq!(
        ids(&after),
        ids(&before),
        "the group's machines are updated in place"
    );
    assert!(after.iter().all(|(_, release)| release == "2"), "{after:?}");
    let response = platform.curl(&["-H", "Host: hello.localhost", "http://127.0.0.1:8080/"]);
    let document: Value =
        serde_json::from_str(&response.stdout).unwrap_or_else(|e| panic!("{e}: {response}"));
    assert!(
        ids(&after)
            .iter()
            .any(|id| document["env"]["FLY_MACHINE_ID"] == id.as_str()),
        "{document}"
    );
    assert_ne!(
        document["env"]["FLY_MACHINE_VERSION"],
        env["FLY_MACHINE_VERSION"]
    );
}

/// (machine id, release version) of the app's machines, sorted by id.
fn machine_ids_and_versions(platform: &Platform) -> Vec<(String, String)> {
    let listed = platform.aloft(&["machine", "list", "-a", "hello", "--json"]);
    assert!(listed.ok(), "{listed}");
    let machines: Value =
        serde_json::from_str(&listed.stdout).unwrap_or_else(|e| panic!("{e}: {listed}"));
    let mut list: Vec<(String, String)> = machines
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            let id = m["id"].as_str().unwrap_or_default().to_string();
            let release = m["config"]["metadata"]["fly_release_version"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            (id, release)
        })
        .collect();
    list.sort();
    list
}

fn assert_one_line_error(run: &common::Run, expected: &str) {
    assert_ne!(run.status, 0, "{run}");
    let last = run.stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("Error: "),
        "the last line is the error: {run}"
    );
    assert!(
        last.contains(expected),
        "expected {expected:?} in the error line: {run}"
    );
}

#[test]
fn bad_deploys_fail_clearly_and_the_server_keeps_serving() {
    require_platform!();
    let platform = Platform::start();
    assert!(platform.aloft(&["apps", "create", "hello"]).ok());
    let good = platform.hello_app_dir("good");
    assert!(platform.aloft_in(Some(&good), &["deploy"]).ok());

    let empty = platform.root.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    assert_one_line_error(
        &platform.aloft_in(Some(&empty), &["deploy"]),
        "no app config found",
    );

    let malformed = platform.hello_app_dir("malformed");
    std::fs::write(
        malformed.join("fly.toml"),
        "app = \"hello\"\n[http_service\ninternal_port = 8080\n",
    )
    .unwrap();
    let run = platform.aloft_in(Some(&malformed), &["deploy"]);
    assert_one_line_error(&run, "fly.toml");
    assert!(
        run.stderr.lines().last().unwrap_or_default().contains(":2"),
        "the error names the line: {run}"
    );

    let broken_build = platform.hello_app_dir("broken-build");
    std::fs::write(
        broken_build.join("Dockerfile"),
        "FROM scratch\nCOPY missing-file /missing-file\n",
    )
    .unwrap();
    let run = platform.aloft_in(Some(&broken_build), &["deploy"]);
    assert_one_line_error(
        &run,
        "image build failed at STEP 2/2: COPY missing-file /missing-file",
    );
    assert!(run.stderr.contains("Output of the failing step"), "{run}");

    let ghost = platform.hello_app_dir("ghost");
    let text = std::fs::read_to_string(ghost.join("fly.toml"))
        .unwrap()
        .replace("app = \"hello\"", "app = \"ghost\"");
    std::fs::write(ghost.join("fly.toml"), text).unwrap();
    assert_one_line_error(
        &platform.aloft_in(Some(&ghost), &["deploy"]),
        "app ghost not found",
    );

    let run = platform.aloft_in(Some(&good), &["--api-url", "http://127.0.0.1:9", "deploy"]);
    assert_one_line_error(&run, "cannot reach the Aloft API at http://127.0.0.1:9");

    let response = platform.curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-H",
        "Host: hello.localhost",
        "http://127.0.0.1:8080/",
    ]);
    assert_eq!(
        response.stdout, "200",
        "the app deployed before is still served: {response}"
    );
}
