//! Multi-container machines: `containers` and `volumes` of `machine_config` reach the
//! converted MachineConfig in Fly's JSON shape, and the deployed image goes to the
//! container flyctl would pick.

use aloft_config::{Format, MachineConfigOptions, parse_str};
use serde_json::{Value, json};

fn machine_config_json() -> Value {
    json!({
        "containers": [
            {
                "name": "nginx",
                "image": "nginx:1.27",
                "env": {"UPSTREAM": "localhost:8080"},
                "depends_on": [{"name": "app", "condition": "healthy"}],
                "files": [{"guest_path": "/etc/nginx/conf.d/default.conf", "raw_value": "c2VydmVyIHt9"}],
                "healthchecks": [{
                    "name": "web",
                    "interval": 10,
                    "grace_period": 5,
                    "timeout": 2,
                    "success_threshold": 1,
                    "failure_threshold": 3,
                    "kind": "readiness",
                    "http": {"port": 80, "method": "GET", "path": "/", "scheme": "http"}
                }],
                "mounts": [{"name": "scratch", "path": "/var/cache/nginx"}]
            },
            {
                "name": "app",
                "cmd": ["serve", "--port", "8080"],
                "user": "app",
                "secrets": [{"env_var": "DATABASE_URL", "name": "DATABASE_URL"}],
                "env_from": [{"env_var": "MACHINE_ID", "field_ref": "machine_id"}],
                "restart": {"policy": "on-failure", "max_retries": 3},
                "stop": {"signal": "SIGINT", "timeout": "10s"},
                "healthchecks": [
                    {"name": "port", "tcp": {"port": 8080}},
                    {"name": "alive", "unhealthy": "stop", "exec": {"command": ["cat", "/tmp/healthy"]}}
                ]
            }
        ],
        "volumes": [{"name": "scratch", "temp_dir": {"storage_type": "memory", "size_mb": 64}}]
    })
}

fn fly_toml(extra: &str, machine_config: &Value) -> String {
    format!(
        "app = \"multi\"\nprimary_region = \"ord\"\n{extra}\nmachine_config = '{}'\n",
        serde_json::to_string(machine_config).unwrap()
    )
}

fn convert(text: &str) -> Result<aloft_api::MachineConfig, String> {
    let loaded = parse_str(text, Format::Toml, "fly.toml").map_err(|e| e.to_string())?;
    let opts = MachineConfigOptions {
        image: "registry.local/multi:deployment-1".to_string(),
        ..MachineConfigOptions::default()
    };
    loaded
        .config
        .to_machine_config("app", &opts)
        .map_err(|e| e.to_string())
}

#[test]
fn containers_and_volumes_keep_fly_json_shape() {
    let input = machine_config_json();
    let machine = convert(&fly_toml("", &input)).unwrap();
    assert_eq!(machine.containers.len(), 2);
    assert_eq!(machine.volumes.len(), 1);

    let out = serde_json::to_value(&machine).unwrap();
    let mut expected = input.clone();
    // The container named `app` receives the deployed image.
    expected["containers"][1]["image"] = json!("registry.local/multi:deployment-1");
    assert_eq!(out["containers"], expected["containers"]);
    assert_eq!(out["volumes"], expected["volumes"]);
    assert_eq!(out["image"], json!("registry.local/multi:deployment-1"));
    assert_eq!(out["metadata"]["fly_process_group"], json!("app"));

    // And it reads back unchanged.
    let again: aloft_api::MachineConfig = serde_json::from_value(out).unwrap();
    assert_eq!(again, machine);
}

#[test]
fn container_key_chooses_who_gets_the_image() {
    let mut input = machine_config_json();
    input["containers"][0]["image"] = json!("");
    input["containers"][1]["image"] = json!("my/app:pinned");
    let machine = convert(&fly_toml("container = \"nginx\"", &input)).unwrap();
    assert_eq!(
        machine.containers[0].image,
        "registry.local/multi:deployment-1"
    );
    assert_eq!(machine.containers[1].image, "my/app:pinned");
}

#[test]
fn without_an_app_container_the_first_gets_the_image() {
    let input = json!({"containers": [
        {"name": "web"},
        {"name": "redis", "image": "redis:7"}
    ]});
    let machine = convert(&fly_toml("", &input)).unwrap();
    assert_eq!(
        machine.containers[0].image,
        "registry.local/multi:deployment-1"
    );
    assert_eq!(machine.containers[1].image, "redis:7");

    // Without a deployed image the chosen container keeps flyctl's placeholder.
    let loaded = parse_str(&fly_toml("", &input), Format::Toml, "fly.toml").unwrap();
    let machine = loaded
        .config
        .to_machine_config("app", &MachineConfigOptions::default())
        .unwrap();
    assert_eq!(machine.containers[0].image, ".");
}

#[test]
fn broken_container_choices_are_clear_errors() {
    let input = machine_config_json();
    let err = convert(&fly_toml("container = \"db\"", &input)).unwrap_err();
    assert_eq!(
        err,
        "machine_config: container \"db\" not found (set by `container`); the containers are nginx, app"
    );

    let input = json!({"containers": [{"name": "app"}, {"name": "sidecar"}]});
    let err = convert(&fly_toml("", &input)).unwrap_err();
    assert_eq!(
        err,
        "machine_config: container \"sidecar\" must have an image specified"
    );

    // `fly config validate` reports the same, located at the file.
    let loaded = parse_str(&fly_toml("", &input), Format::Toml, "fly.toml").unwrap();
    let report: Vec<String> = loaded
        .config
        .validate()
        .iter()
        .filter(|d| d.is_error())
        .map(ToString::to_string)
        .collect();
    assert!(
        report
            .iter()
            .any(|d| d.contains("container \"sidecar\" must have an image specified")),
        "{report:#?}"
    );
}
