//! Automatic TLS through `aloft server` and `aloft certs`: Pebble (the ACME CA) and
//! pebble-challtestsrv (its DNS, every name → 127.0.0.1) run inside the test's network
//! namespace; `aloft server --acme-directory` gets certificates for an added hostname and
//! the app's own name; a real TLS client checks chain, SNI and ALPN. A certificate imported
//! with `aloft certs import` is served for its name. Private keys never reach the data dir
//! in plain text.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Platform, Run};
use serde_json::Value;

const HTTPS: &str = "127.0.0.1:8443";
const BASE_DOMAIN: &str = "aloft.test";
const PEBBLE_MANAGEMENT: &str = "127.0.0.1:15000";

fn have(program: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {program}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Kills the process when dropped.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn eventually(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check() {
            return;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    panic!("timed out waiting for {what}");
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

/// A throwaway CA: (its PEM, an issuer for leaves).
fn ca(name: &str) -> (String, rcgen::Issuer<'static, rcgen::KeyPair>) {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), rcgen::Issuer::new(params, key))
}

/// (certificate PEM, key PEM) for `names`, signed by `issuer`.
fn leaf(issuer: &rcgen::Issuer<'static, rcgen::KeyPair>, names: &[&str]) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert =
        rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap()
            .signed_by(&key, issuer)
            .unwrap();
    (cert.pem(), key.serialize_pem())
}

struct Pebble {
    _pebble: Guard,
    _dns: Guard,
    /// The root of Pebble's own HTTPS certificate (for `--acme-ca-root`).
    https_ca: PathBuf,
}

/// Pebble validating on the proxy's ports (8080, 8443) with challtestsrv as its DNS, both
/// inside the platform's namespace.
fn start_pebble(platform: &Platform, dir: &Path) -> Pebble {
    let (ca_pem, issuer) = ca("pebble https test CA");
    let (cert, key) = leaf(&issuer, &["127.0.0.1", "localhost"]);
    let https_ca = dir.join("pebble-https-ca.pem");
    std::fs::write(&https_ca, ca_pem).unwrap();
    std::fs::write(dir.join("pebble-cert.pem"), cert).unwrap();
    std::fs::write(dir.join("pebble-key.pem"), key).unwrap();
    let config = serde_json::json!({"pebble": {
        "listenAddress": "127.0.0.1:14000",
        "managementListenAddress": PEBBLE_MANAGEMENT,
        "certificate": dir.join("pebble-cert.pem"),
        "privateKey": dir.join("pebble-key.pem"),
        "httpPort": 8080,
        "tlsPort": 8443,
        "ocspResponderURL": "",
        "externalAccountBindingRequired": false
    }});
    std::fs::write(dir.join("pebble.json"), config.to_string()).unwrap();
    let dns = platform
        .in_netns(Path::new("pebble-challtestsrv"))
        .args(["-dns01", "127.0.0.1:8053", "-http01", "", "-https01", ""])
        .args(["-tlsalpn01", ""])
        .args(["-management", "127.0.0.1:8055"])
        .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("pebble-challtestsrv");
    let pebble = platform
        .in_netns(Path::new("pebble"))
        .arg("-config")
        .arg(dir.join("pebble.json"))
        .args(["-dnsserver", "127.0.0.1:8053"])
        .env("PEBBLE_VA_NOSLEEP", "1")
        .env("PEBBLE_WFE_NONCEREJECT", "0")
        .env("PEBBLE_AUTHZREUSE", "0")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("pebble");
    let pebble = Pebble {
        _pebble: Guard(pebble),
        _dns: Guard(dns),
        https_ca,
    };
    eventually("pebble's directory", Duration::from_secs(20), || {
        platform
            .curl(&[
                "--cacert",
                pebble.https_ca.to_str().unwrap(),
                "https://127.0.0.1:14000/dir",
            ])
            .ok()
    });
    pebble
}

/// The root and intermediate that sign what Pebble issues, as PEM.
fn pebble_issuers(platform: &Platform) -> (String, String) {
    let get = |path: &str| {
        let run = platform.curl(&["-k", &format!("https://{PEBBLE_MANAGEMENT}{path}")]);
        assert!(
            run.ok() && run.stdout.contains("BEGIN CERTIFICATE"),
            "{run}"
        );
        run.stdout
    };
    (get("/roots/0"), get("/intermediates/0"))
}

/// `openssl s_client` inside the namespace: SNI `host`, ALPN `alpn`, chain checked
/// against `ca_file`.
fn s_client(platform: &Platform, host: &str, alpn: &str, ca_file: &Path) -> String {
    let run = Run::from(
        platform
            .in_netns(Path::new("openssl"))
            .args(["s_client", "-connect", HTTPS, "-servername", host])
            .args(["-verify_hostname", host, "-alpn", alpn, "-showcerts"])
            .arg("-CAfile")
            .arg(ca_file)
            .stdin(Stdio::null())
            .output()
            .expect("openssl"),
    );
    run.stdout
}

/// Every file under `root` containing `needle` (grep -r reads binary files too).
fn files_containing(root: &Path, needle: &str) -> Vec<String> {
    let output = Command::new("grep")
        .args(["-r", "-l", "-s", "-F", "--devices=skip", "-e", needle])
        .arg(root)
        .output()
        .expect("grep");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// The base64 body of a PEM document, its longest line: what would show in a file that
/// held the key.
fn pem_body_line(pem: &str) -> String {
    pem.lines()
        .filter(|l| !l.starts_with("-----"))
        .max_by_key(|l| l.len())
        .unwrap()
        .to_string()
}

/// A platform serving HTTPS on 8443 for `*.aloft.test`, with the example app deployed.
fn platform_with_hello(extra: &[&str]) -> Platform {
    let mut args = vec!["--base-domain", BASE_DOMAIN, "--proxy-https-listen", HTTPS];
    args.extend_from_slice(extra);
    let platform = Platform::start_with(&args);
    deploy_hello(&platform);
    platform
}

fn deploy_hello(platform: &Platform) {
    let created = platform.aloft(&["apps", "create", "hello"]);
    assert!(created.ok(), "{created}");
    let dir = platform.hello_app_dir("hello");
    let deploy = platform.aloft_in(Some(&dir), &["deploy"]);
    assert!(deploy.ok(), "{deploy}\n{}", platform.server_log());
}

/// A platform whose server gets certificates from Pebble (`--acme-directory`), with Pebble
/// and the directory of its files; `None` (after a skip) when a tool is missing.
fn platform_with_acme() -> Option<(Platform, tempfile::TempDir, Pebble)> {
    for program in ["pebble", "pebble-challtestsrv", "openssl"] {
        if !have(program) {
            aloft_testkit::skip(format!(
                "needs `{program}` (apt-get install pebble openssl)"
            ));
            return None;
        }
    }
    let mut platform =
        Platform::start_with(&["--base-domain", BASE_DOMAIN, "--proxy-https-listen", HTTPS]);
    let files = tempfile::tempdir().unwrap();
    let pebble = start_pebble(&platform, files.path());
    let ca_root = pebble.https_ca.to_str().unwrap().to_string();
    platform.restart_server_with(&[
        "--base-domain",
        BASE_DOMAIN,
        "--proxy-https-listen",
        HTTPS,
        "--acme-directory",
        "https://127.0.0.1:14000/dir",
        "--acme-email",
        "ops@aloft.test",
        "--acme-ca-root",
        &ca_root,
    ]);
    Some((platform, files, pebble))
}

fn https_get(platform: &Platform, host: &str, ca_file: &Path) -> Run {
    platform.curl(&[
        "--cacert",
        ca_file.to_str().unwrap(),
        "--resolve",
        &format!("{host}:8443:127.0.0.1"),
        &format!("https://{host}:8443/"),
    ])
}

#[test]
fn acme_certificates_for_added_hostnames_and_the_apps_own_name() {
    require_platform!();
    let Some((mut platform, files, _pebble)) = platform_with_acme() else {
        return;
    };
    deploy_hello(&platform);

    let added = platform.aloft(&["certs", "add", "www.example.com", "-a", "hello"]);
    assert!(added.ok(), "{added}");
    assert!(
        added
            .stdout
            .contains("You are creating a certificate for www.example.com"),
        "{added}"
    );
    assert!(added.stdout.contains("Choose your DNS setup:"), "{added}");
    assert!(
        added.stdout.contains("CNAME www → hello.aloft.test"),
        "{added}"
    );
    // (The proxy may have started its order already.)
    assert!(
        added.stdout.contains("Status is Awaiting configuration")
            || added.stdout.contains("Status is Awaiting certificates"),
        "{added}"
    );

    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let shown = platform.aloft(&["certs", "show", "www.example.com", "-a", "hello"]);
        if shown.stdout.contains("has been issued") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not issued: {shown}\n{}",
            tail(&platform.server_log())
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let shown = platform.aloft(&["certs", "show", "www.example.com", "-a", "hello"]);
    assert!(shown.ok(), "{shown}");
    assert!(
        shown.stdout.contains("Status                    = Ready"),
        "{shown}"
    );
    assert!(shown.stdout.contains("Pebble Intermediate CA"), "{shown}");
    assert!(
        shown.stdout.contains("Source                    = acme"),
        "{shown}"
    );
    let checked = platform.aloft(&["certs", "check", "www.example.com", "-a", "hello", "--json"]);
    let checked: Value =
        serde_json::from_str(&checked.stdout).unwrap_or_else(|e| panic!("{e}: {checked}"));
    assert_eq!(checked["client_status"], "Ready");
    assert_eq!(checked["configured"], true);
    let listed = platform.aloft(&["certs", "list", "-a", "hello"]);
    assert!(listed.stdout.starts_with("Host Name"), "{listed}");
    assert!(
        listed
            .stdout
            .lines()
            .any(|l| l.starts_with("www.example.com") && l.ends_with("Ready")),
        "{listed}"
    );

    // A real TLS client: the ACME chain (Pebble's intermediate, up to its root) for the
    // SNI asked, with h2 and http/1.1.
    let (root, intermediate) = pebble_issuers(&platform);
    let root_file = files.path().join("pebble-root.pem");
    std::fs::write(&root_file, &root).unwrap();
    let h2 = s_client(&platform, "www.example.com", "h2", &root_file);
    assert!(h2.contains("Verify return code: 0 (ok)"), "{h2}");
    assert!(h2.contains("ALPN protocol: h2"), "{h2}");
    assert!(h2.contains("Pebble Intermediate CA"), "{h2}");
    assert!(
        h2.contains(pem_body_line(&intermediate).as_str()),
        "the chain carries Pebble's intermediate: {h2}"
    );
    let h1 = s_client(&platform, "www.example.com", "http/1.1", &root_file);
    assert!(h1.contains("Verify return code: 0 (ok)"), "{h1}");
    assert!(h1.contains("ALPN protocol: http/1.1"), "{h1}");
    // The app answers through HTTPS, by the added name and by its own name.
    let response = https_get(&platform, "www.example.com", &root_file);
    assert!(response.ok(), "{response}\n{}", platform.server_log());
    assert!(response.stdout.contains("\"FLY_APP_NAME\""), "{response}");
    eventually(
        "hello.aloft.test's own certificate",
        Duration::from_secs(60),
        || https_get(&platform, "hello.aloft.test", &root_file).ok(),
    );

    // A hostname whose challenge cannot succeed (DNS points elsewhere): the error shows.
    let dns_answer = platform.curl(&[
        "-X",
        "POST",
        "-d",
        r#"{"host":"broken.example.com","addresses":["127.0.0.2"]}"#,
        "http://127.0.0.1:8055/add-a",
    ]);
    assert!(dns_answer.ok(), "{dns_answer}");
    let added = platform.aloft(&["certs", "add", "broken.example.com", "-a", "hello"]);
    assert!(added.ok(), "{added}");
    eventually("the failure shown", Duration::from_secs(120), || {
        let shown = platform.aloft(&["certs", "show", "broken.example.com", "-a", "hello"]);
        shown.stdout.contains("Error ")
    });
    let shown = platform.aloft(&["certs", "show", "broken.example.com", "-a", "hello"]);
    assert!(shown.stdout.contains("has not been issued yet"), "{shown}");
    assert!(shown.stdout.contains("Awaiting configuration"), "{shown}");

    // The issued private keys are nowhere in the data dir in plain text.
    assert!(
        files_containing(&platform.data_dir(), "PRIVATE KEY").is_empty(),
        "a PEM private key in the data dir"
    );

    // Removing the hostname: gone from the list.
    let removed = platform.aloft(&["certs", "remove", "www.example.com", "-a", "hello", "--yes"]);
    assert!(removed.ok(), "{removed}");
    assert!(
        removed
            .stdout
            .contains("Certificate www.example.com deleted from app hello"),
        "{removed}"
    );
    let listed = platform.aloft(&["certs", "list", "-a", "hello"]);
    assert!(!listed.stdout.contains("www.example.com"), "{listed}");
    platform.stop();
}

#[test]
fn an_imported_certificate_is_stored_sealed_and_served() {
    require_platform!();
    if !have("openssl") {
        aloft_testkit::skip("needs `openssl` (apt-get install openssl)");
        return;
    }
    let platform = platform_with_hello(&[]);

    // This server has no --acme-directory: adding a hostname says that no certificate
    // will be issued for it, and how to get one served, instead of "being issued".
    let added = platform.aloft(&["certs", "add", "noacme.example.com", "-a", "hello"]);
    assert!(added.ok(), "{added}");
    let shown = platform.aloft(&["certs", "show", "noacme.example.com", "-a", "hello"]);
    assert!(shown.ok(), "{shown}");
    for run in [&added, &shown] {
        assert!(
            run.stdout
                .contains("No ACME certificate authority is configured on this server")
                && run.stdout.contains("aloft certs import")
                && run.stdout.contains("--acme-directory")
                && !run.stdout.contains("being issued")
                && !run.stdout.contains("We are using the platform's ACME"),
            "{run}"
        );
    }
    let json = platform.aloft(&[
        "certs",
        "show",
        "noacme.example.com",
        "-a",
        "hello",
        "--json",
    ]);
    let json: Value = serde_json::from_str(&json.stdout).unwrap_or_else(|e| panic!("{e}: {json}"));
    assert_eq!(json["status"], "pending", "{json}");
    assert!(
        json["error"]
            .as_str()
            .is_some_and(|e| e.contains("no ACME certificate authority")),
        "{json}"
    );

    let files = tempfile::tempdir().unwrap();
    let (ca_pem, issuer) = ca("Imported Test CA");
    let (cert, key) = leaf(&issuer, &["shop.example.com"]);
    let write = |name: &str, text: &str| {
        let path = files.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_string()
    };
    let (ca_file, chain_file, key_file) = (
        write("ca.pem", &ca_pem),
        write("chain.pem", &format!("{cert}{ca_pem}")),
        write("key.pem", &key),
    );

    // Checked before it is stored: the key must be the certificate's, and the certificate
    // must name the hostname.
    let (_, other_key) = leaf(&issuer, &["shop.example.com"]);
    let other_key_file = write("other-key.pem", &other_key);
    let refused = platform.aloft(&[
        "certs",
        "import",
        "shop.example.com",
        "-a",
        "hello",
        "--fullchain",
        &chain_file,
        "--private-key",
        &other_key_file,
    ]);
    assert!(!refused.ok(), "{refused}");
    assert!(refused.stderr.contains("invalid private_key"), "{refused}");
    let refused = platform.aloft(&[
        "certs",
        "import",
        "other.example.com",
        "-a",
        "hello",
        "--fullchain",
        &chain_file,
        "--private-key",
        &key_file,
    ]);
    assert!(!refused.ok(), "{refused}");
    assert!(
        refused.stderr.contains("does not cover other.example.com"),
        "{refused}"
    );

    let imported = platform.aloft(&[
        "certs",
        "import",
        "shop.example.com",
        "-a",
        "hello",
        "--fullchain",
        &chain_file,
        "--private-key",
        &key_file,
    ]);
    assert!(imported.ok(), "{imported}");
    assert!(imported.stdout.contains("has been issued"), "{imported}");
    let shown = platform.aloft(&["certs", "show", "shop.example.com", "-a", "hello", "--json"]);
    let shown: Value =
        serde_json::from_str(&shown.stdout).unwrap_or_else(|e| panic!("{e}: {shown}"));
    assert_eq!(shown["source"], "custom");
    assert_eq!(shown["client_status"], "Ready");
    assert_eq!(shown["certificate_authority"], "Imported Test CA");

    let ca_path = PathBuf::from(&ca_file);
    eventually(
        "the imported certificate served",
        Duration::from_secs(30),
        || {
            s_client(&platform, "shop.example.com", "h2", &ca_path)
                .contains("Verify return code: 0 (ok)")
        },
    );
    let served = s_client(&platform, "shop.example.com", "http/1.1", &ca_path);
    assert!(served.contains("ALPN protocol: http/1.1"), "{served}");
    let response = https_get(&platform, "shop.example.com", &ca_path);
    assert!(response.ok(), "{response}\n{}", platform.server_log());
    assert!(response.stdout.contains("\"FLY_APP_NAME\""), "{response}");

    // The private key is sealed: its bytes are in no file of the data dir.
    let found = files_containing(&platform.data_dir(), &pem_body_line(&key));
    assert!(found.is_empty(), "the private key in plain text: {found:?}");
}

/// A stored ACME certificate with two days left (as after a long outage) is renewed from
/// the CA when the server starts, served, and stored back; `aloft certs show` follows.
#[test]
fn an_acme_certificate_close_to_expiry_is_renewed_from_the_ca() {
    require_platform!();
    const HOST: &str = "renew.example.com";
    let Some((mut platform, files, _pebble)) = platform_with_acme() else {
        return;
    };
    deploy_hello(&platform);
    let (root, _) = pebble_issuers(&platform);
    let root_file = files.path().join("pebble-root.pem");
    std::fs::write(&root_file, &root).unwrap();
    let added = platform.aloft(&["certs", "add", HOST, "-a", "hello"]);
    assert!(added.ok(), "{added}");
    eventually(
        "the added hostname's certificate from Pebble",
        Duration::from_secs(120),
        || https_get(&platform, HOST, &root_file).ok(),
    );

    // What the proxy would store for a certificate it got 58 days ago from another CA.
    let (_, issuer) = ca("an old test CA");
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec![HOST.to_string()]).unwrap();
    let day = |date: chrono::NaiveDate| {
        use chrono::Datelike;
        rcgen::date_time_ymd(date.year(), date.month() as u8, date.day() as u8)
    };
    let now = chrono::Utc::now();
    params.not_before = day(now.date_naive() - chrono::Days::new(58));
    params.not_after = day(now.date_naive() + chrono::Days::new(2));
    let near_expiry = params.signed_by(&key, &issuer).unwrap();
    let body = serde_json::json!({
        "hostname": HOST,
        "certificate": near_expiry.pem(),
        "private_key": key.serialize_pem(),
        "source": "acme",
    });
    let stored = platform.curl(&[
        "-X",
        "PUT",
        "-H",
        &format!("Authorization: Bearer {}", platform.host_token()),
        "-H",
        "Content-Type: application/json",
        "-d",
        &body.to_string(),
        "-w",
        "\n%{http_code}",
        &format!("http://127.0.0.1:4280/v1/proxy/certificates/{HOST}"),
    ]);
    assert!(stored.stdout.ends_with("200"), "{stored}");
    let show = |platform: &Platform| -> Value {
        let shown = platform.aloft(&["certs", "show", HOST, "-a", "hello", "--json"]);
        serde_json::from_str(&shown.stdout).unwrap_or_else(|e| panic!("{e}: {shown}"))
    };
    let before = show(&platform);
    assert_eq!(
        before["certificate_authority"], "an old test CA",
        "{before}"
    );

    // A restart: the proxy loads the stored certificate, finds it close to expiry, and
    // gets a new one from Pebble.
    platform.kill_server();
    platform.restart_server();
    eventually(
        "the renewed certificate stored",
        Duration::from_secs(120),
        || {
            show(&platform)["certificate_authority"]
                .as_str()
                .is_some_and(|ca| ca.starts_with("Pebble Intermediate CA"))
        },
    );
    let after = show(&platform);
    assert_eq!(after["client_status"], "Ready", "{after}");
    let expires = after["expires_at"].as_str().unwrap_or_default();
    let expires =
        chrono::DateTime::parse_from_rfc3339(expires).unwrap_or_else(|e| panic!("{e}: {after}"));
    assert!(
        expires > now + chrono::Days::new(30),
        "renewed well before expiry: {after}"
    );
    let served = https_get(&platform, HOST, &root_file);
    assert!(served.ok(), "the renewed certificate is served: {served}");
    platform.stop();
}
