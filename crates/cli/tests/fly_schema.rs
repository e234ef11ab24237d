//! Every implemented Machines API endpoint answers in the shapes of Fly's own published
//! schema (tests/data/fly-machines-openapi-3.0.1.json, Fly's openapi-3.0.1 document), not
//! only our generated one: real answers of `aloft server` (a deployed app, a machine from
//! its image on runc, a real stop, a real volume) are checked field by field against Fly's
//! component schemas. Every field we return that Fly's schema defines must have Fly's type
//! (and enum value); the fields Fly's clients (flyctl, fly-go) rely on must be there.
//! Fly's document marks nothing required, so the relied-on fields are listed here, per
//! schema.

mod common;

use std::time::{Duration, Instant};

use common::Platform;
use serde_json::{Value, json};

const FLY_SCHEMA: &str = include_str!("data/fly-machines-openapi-3.0.1.json");

/// Fields flyctl and fly-go read from each schema without checking for their absence.
const RELIED_ON: &[(&str, &[&str])] = &[
    ("ListAppsResponse", &["apps", "total_apps"]),
    ("ListApp", &["id", "name", "machine_count", "network"]),
    ("App", &["id", "name", "organization", "status"]),
    ("Organization", &["name", "slug"]),
    (
        "Machine",
        &[
            "id",
            "name",
            "state",
            "region",
            "instance_id",
            "private_ip",
            "config",
            "image_ref",
            "created_at",
            "updated_at",
        ],
    ),
    (
        "MachineEvent",
        &["id", "type", "status", "source", "timestamp"],
    ),
    ("MachineVersion", &["version", "user_config"]),
    ("Lease", &["nonce", "expires_at", "owner", "version"]),
    (
        "Volume",
        &[
            "id",
            "name",
            "state",
            "size_gb",
            "region",
            "zone",
            "encrypted",
            "created_at",
            "fstype",
        ],
    ),
    ("ExtendVolumeResponse", &["volume", "needs_restart"]),
];

/// Where we answer differently from the letter of Fly's schema on purpose (listed in
/// crates/api/README.md too): (schema, field).
const DELIBERATE: &[(&str, &str)] = &[
    // Fly's document says `object` for Go's `interface{}`; flaps answers the network's
    // name, a string, and flyctl reads it as one.
    ("ListApp", "network"),
];

struct Fly {
    schemas: Value,
}

impl Fly {
    fn load() -> Fly {
        let document: Value = serde_json::from_str(FLY_SCHEMA).expect("Fly's schema is JSON");
        Fly {
            schemas: document["components"]["schemas"].clone(),
        }
    }

    fn named(&self, name: &str) -> &Value {
        let schema = &self.schemas[name];
        assert!(schema.is_object(), "Fly's schema has no {name}");
        schema
    }

    /// Checks `value` against schema `name`; problems are pushed with their JSON path.
    fn check(&self, name: &str, value: &Value, at: &str, problems: &mut Vec<String>) {
        self.check_schema(self.named(name), Some(name), value, at, problems);
    }

    fn check_schema(
        &self,
        schema: &Value,
        name: Option<&str>,
        value: &Value,
        at: &str,
        problems: &mut Vec<String>,
    ) {
        if let Some(reference) = schema["$ref"].as_str() {
            let target = reference.trim_start_matches("#/components/schemas/");
            return self.check_schema(self.named(target), Some(target), value, at, problems);
        }
        let kind = schema["type"].as_str().unwrap_or("");
        // Go encodes nil slices and maps as null.
        if value.is_null() && matches!(kind, "object" | "array") {
            return;
        }
        let fits = match kind {
            "object" => value.is_object(),
            "array" => value.is_array(),
            "string" => value.is_string(),
            "integer" => value.is_i64() || value.is_u64(),
            "number" => value.is_number(),
            "boolean" => value.is_boolean(),
            _ => true,
        };
        if !fits {
            problems.push(format!("{at}: Fly's type is {kind}, we return {value}"));
            return;
        }
        if let (Some(allowed), Some(text)) = (schema["enum"].as_array(), value.as_str())
            && !allowed.iter().any(|a| a == text)
        {
            problems.push(format!(
                "{at}: {text:?} is not one of Fly's values {allowed:?}"
            ));
        }
        match value {
            Value::Object(fields) => {
                if let Some(name) = name
                    && let Some((_, relied_on)) = RELIED_ON.iter().find(|(n, _)| *n == name)
                {
                    for field in *relied_on {
                        if !fields.contains_key(*field) {
                            problems.push(format!("{at}: no `{field}` ({name} needs it)"));
                        }
                    }
                }
                for (field, inner) in fields {
                    if name.is_some_and(|n| DELIBERATE.contains(&(n, field.as_str()))) {
                        continue;
                    }
                    let path = format!("{at}.{field}");
                    if let Some(property) = schema["properties"].get(field) {
                        self.check_schema(property, None, inner, &path, problems);
                    } else if schema["additionalProperties"].is_object() {
                        self.check_schema(
                            &schema["additionalProperties"],
                            None,
                            inner,
                            &path,
                            problems,
                        );
                    }
                }
            }
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    self.check_schema(
                        &schema["items"],
                        None,
                        item,
                        &format!("{at}[{i}]"),
                        problems,
                    );
                }
            }
            _ => {}
        }
    }

    fn check_list(&self, name: &str, value: &Value, at: &str, problems: &mut Vec<String>) {
        match value.as_array() {
            Some(items) => {
                for (i, item) in items.iter().enumerate() {
                    self.check(name, item, &format!("{at}[{i}]"), problems);
                }
            }
            None => problems.push(format!(
                "{at}: Fly answers a list of {name}, we return {value}"
            )),
        }
    }
}

/// The exit event's `request` as fly-go's MachineRequest decodes it.
fn check_exit_request(request: &Value, problems: &mut Vec<String>) {
    let exit = &request["exit_event"];
    if !exit.is_object() {
        problems.push(format!("exit event: no request.exit_event in {request}"));
        return;
    }
    for (field, integer) in [
        ("exit_code", true),
        ("guest_exit_code", true),
        ("guest_signal", true),
        ("signal", true),
        ("oom_killed", false),
        ("requested_stop", false),
        ("restarting", false),
    ] {
        let value = &exit[field];
        let fits = if integer {
            value.is_i64()
        } else {
            value.is_boolean()
        };
        if !value.is_null() && !fits {
            problems.push(format!("request.exit_event.{field}: wrong type in {exit}"));
        }
    }
    if !exit["exited_at"].is_string() {
        problems.push(format!("request.exit_event.exited_at: missing in {exit}"));
    }
    if !request["restart_count"].is_i64() {
        problems.push(format!("request.restart_count: missing in {request}"));
    }
}

#[test]
fn every_answer_of_the_server_has_the_shape_of_flys_published_schema() {
    require_platform!();
    let fly = Fly::load();
    let platform = Platform::start();
    let token = platform.aloft(&["auth", "token"]).stdout.trim().to_string();
    let mut problems = Vec::new();
    let call = |method: &str, path: &str, body: Option<Value>| -> Value {
        let (status, text) = platform.api(&token, method, path, body.as_ref());
        assert!(
            (200..300).contains(&status),
            "{method} {path}: {status} {text}\n{}",
            platform.server_log()
        );
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{method} {path}: {e}: {text}"))
    };

    let created = platform.aloft(&["apps", "create", "hello"]);
    assert!(created.ok(), "{created}");
    let deployed = platform.aloft_in(Some(&platform.hello_app_dir("hello")), &["deploy"]);
    assert!(deployed.ok(), "{deployed}\n{}", platform.server_log());

    let apps = call("GET", "/v1/apps?org_slug=personal", None);
    fly.check("ListAppsResponse", &apps, "GET /apps", &mut problems);
    let app = call("GET", "/v1/apps/hello", None);
    fly.check("App", &app, "GET /apps/{app}", &mut problems);

    let listed = call("GET", "/v1/apps/hello/machines", None);
    fly.check_list("Machine", &listed, "GET /machines", &mut problems);
    let deployed_machine = &listed[0];
    let image = deployed_machine["config"]["image"].clone();
    let region = deployed_machine["region"].clone();
    let machine = call(
        "POST",
        "/v1/apps/hello/machines",
        Some(json!({ "region": region, "config": {
            "image": image,
            "env": { "PORT": "8080" },
            "guest": { "cpus": 1, "memory_mb": 256, "cpu_kind": "shared" },
        } })),
    );
    fly.check("Machine", &machine, "POST /machines", &mut problems);
    let id = machine["id"].as_str().expect("a machine id").to_string();
    let base = format!("/v1/apps/hello/machines/{id}");
    call(
        "GET",
        &format!("{base}/wait?state=started&timeout=60"),
        None,
    );
    let got = call("GET", &base, None);
    fly.check("Machine", &got, "GET /machines/{id}", &mut problems);
    let updated = call(
        "POST",
        &base,
        Some(json!({ "config": { "image": image, "env": { "PORT": "8080", "A": "1" } } })),
    );
    fly.check("Machine", &updated, "POST /machines/{id}", &mut problems);
    let versions = call("GET", &format!("{base}/versions"), None);
    fly.check_list("MachineVersion", &versions, "GET /versions", &mut problems);
    let lease = call(
        "POST",
        &format!("{base}/lease"),
        Some(json!({ "ttl": 30, "description": "shape check" })),
    );
    let lease = if lease["data"].is_object() {
        lease["data"].clone()
    } else {
        lease
    };
    fly.check("Lease", &lease, "POST /lease", &mut problems);
    let shown = call("GET", &format!("{base}/lease"), None);
    let shown = if shown["data"].is_object() {
        &shown["data"]
    } else {
        &shown
    };
    fly.check("Lease", shown, "GET /lease", &mut problems);
    let nonce = lease["nonce"].as_str().unwrap_or_default().to_string();
    let released = platform.curl(&[
        "-X",
        "DELETE",
        "-H",
        &format!("Authorization: Bearer {token}"),
        "-H",
        &format!("fly-machine-lease-nonce: {nonce}"),
        "-w",
        "%{http_code}",
        "-o",
        "/dev/null",
        &format!("http://127.0.0.1:4280{base}/lease"),
    ]);
    assert!(
        released.stdout.starts_with('2'),
        "releasing the lease: {released}"
    );
    let metadata = call("GET", &format!("{base}/metadata"), None);
    if !metadata
        .as_object()
        .is_some_and(|m| m.values().all(Value::is_string))
    {
        problems.push(format!(
            "GET /metadata: Fly answers a map of strings, we return {metadata}"
        ));
    }
    call(
        "GET",
        &format!("{base}/wait?state=started&timeout=60"),
        None,
    );
    let ps = call("GET", &format!("{base}/ps"), None);
    fly.check_list("ProcessStat", &ps, "GET /ps", &mut problems);

    // A real exit: the machine stopped, its agent reports how its process ended.
    call("POST", &format!("{base}/stop"), Some(json!({})));
    call(
        "GET",
        &format!("{base}/wait?state=stopped&timeout=60"),
        None,
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let exit = loop {
        let events = call("GET", &format!("{base}/events"), None);
        if let Some(exit) = events
            .as_array()
            .and_then(|all| all.iter().find(|e| e["type"] == "exit"))
        {
            fly.check_list("MachineEvent", &events, "GET /events", &mut problems);
            break exit.clone();
        }
        assert!(Instant::now() < deadline, "no exit event: {events}");
        std::thread::sleep(Duration::from_millis(250));
    };
    check_exit_request(&exit["request"], &mut problems);
    assert_eq!(
        exit["request"]["exit_event"]["requested_stop"], true,
        "{exit}"
    );

    let volume = call(
        "POST",
        "/v1/apps/hello/volumes",
        Some(json!({ "name": "data", "region": region, "size_gb": 1 })),
    );
    fly.check("Volume", &volume, "POST /volumes", &mut problems);
    let vol = volume["id"].as_str().expect("a volume id").to_string();
    let volumes = call("GET", "/v1/apps/hello/volumes", None);
    fly.check_list("Volume", &volumes, "GET /volumes", &mut problems);
    let one = call("GET", &format!("/v1/apps/hello/volumes/{vol}"), None);
    fly.check("Volume", &one, "GET /volumes/{id}", &mut problems);
    let extended = call(
        "PUT",
        &format!("/v1/apps/hello/volumes/{vol}/extend"),
        Some(json!({ "size_gb": 2 })),
    );
    fly.check(
        "ExtendVolumeResponse",
        &extended,
        "PUT /extend",
        &mut problems,
    );
    let snapshots = call(
        "GET",
        &format!("/v1/apps/hello/volumes/{vol}/snapshots"),
        None,
    );
    fly.check_list(
        "VolumeSnapshot",
        &snapshots,
        "GET /snapshots",
        &mut problems,
    );
    let deleted = call("DELETE", &format!("/v1/apps/hello/volumes/{vol}"), None);
    fly.check("Volume", &deleted, "DELETE /volumes/{id}", &mut problems);

    assert!(
        problems.is_empty(),
        "answers that differ from Fly's schema:\n{}",
        problems.join("\n")
    );
    let (status, _) = platform.api(&token, "GET", "/v1/apps/nope", None);
    assert_eq!(status, 404);
}

#[test]
fn the_checker_notices_wrong_types_enums_and_missing_fields() {
    let fly = Fly::load();
    let mut problems = Vec::new();
    fly.check(
        "Machine",
        &json!({ "id": 5, "host_status": "fine", "config": { "guest": { "cpus": "2" } } }),
        "m",
        &mut problems,
    );
    let text = problems.join("\n");
    assert!(text.contains("m.id: Fly's type is string"), "{text}");
    assert!(text.contains("m.host_status"), "{text}");
    assert!(
        text.contains("m.config.guest.cpus: Fly's type is integer"),
        "{text}"
    );
    assert!(text.contains("no `instance_id`"), "{text}");
    let mut problems = Vec::new();
    check_exit_request(
        &json!({ "exit_event": { "exit_code": 1, "exited_at": "x" } }),
        &mut problems,
    );
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].contains("restart_count"));
}
