//! `[build.compose]`: the services of a Docker Compose file become the containers of a
//! multi-container machine, as flyctl reads them. Problems name the compose file, the
//! line and column, and the key (`services.web.depends_on.db.condition`).

use std::collections::BTreeMap;
use std::path::Path;

use aloft_api as api;

use crate::diagnostic::ConfigError;
use crate::node::{self, Kind, LineIndex, Node};

/// What a compose file contributes to the machine config.
pub(crate) struct ComposeContainers {
    pub containers: Vec<api::ContainerConfig>,
}

/// Placeholder image of the service that has `build`: the image `deploy` builds.
pub(crate) const BUILT_IMAGE: &str = ".";

struct Reader<'a> {
    origin: String,
    index: &'a LineIndex,
    /// Where each key path starts in the file (YAML values carry no position, keys do).
    keys: BTreeMap<String, usize>,
}

/// Records the offset of every key below `node`, by key path.
fn record_keys(node: &Node, path: &str, keys: &mut BTreeMap<String, usize>) {
    match &node.kind {
        Kind::Table(entries) => {
            for entry in entries {
                let entry_path = if path.is_empty() {
                    entry.key.clone()
                } else {
                    format!("{path}.{}", entry.key)
                };
                if let Some(span) = &entry.key_span {
                    keys.insert(entry_path.clone(), span.start);
                }
                record_keys(&entry.value, &entry_path, keys);
            }
        }
        Kind::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                record_keys(item, &format!("{path}[{i}]"), keys);
            }
        }
        _ => {}
    }
}

impl Reader<'_> {
    /// The position of `path`'s key, or of the nearest enclosing key that has one.
    fn position(&self, path: &str) -> (usize, usize) {
        let mut current = path;
        loop {
            if let Some(offset) = self.keys.get(current) {
                return self.index.position(*offset);
            }
            match current.rfind(['.', '[']) {
                Some(cut) => current = &current[..cut],
                None => return (1, 1),
            }
        }
    }

    fn error(&self, _node: &Node, path: &str, message: impl std::fmt::Display) -> ConfigError {
        let (line, column) = self.position(path);
        ConfigError::Compose(format!(
            "{}:{line}:{column}: {path}: {message}",
            self.origin
        ))
    }

    fn string(&self, node: &Node, path: &str) -> Result<String, ConfigError> {
        match &node.kind {
            Kind::Str(s) => Ok(s.clone()),
            Kind::Int(i) => Ok(i.to_string()),
            Kind::Float(f) => Ok(f.to_string()),
            Kind::Bool(b) => Ok(b.to_string()),
            _ => Err(self.error(
                node,
                path,
                format!("expected a string, found {}", node.describe()),
            )),
        }
    }

    /// `command`/`entrypoint`: a string (shell-split, as compose does) or a list.
    fn command(&self, node: &Node, path: &str) -> Result<Vec<String>, ConfigError> {
        match &node.kind {
            Kind::Str(s) => crate::machine::shell_split(s)
                .map_err(|e| self.error(node, path, format!("can not split the command: {e}"))),
            Kind::Array(items) => items
                .iter()
                .enumerate()
                .map(|(i, item)| self.string(item, &format!("{path}[{i}]")))
                .collect(),
            Kind::Null => Ok(Vec::new()),
            _ => Err(self.error(
                node,
                path,
                format!(
                    "expected a string or a list of strings, found {}",
                    node.describe()
                ),
            )),
        }
    }

    /// `environment`: a map, or a list of `KEY=VALUE` (a bare `KEY` takes the host's value in
    /// Docker Compose; there is no host here, so it is left out).
    fn environment(
        &self,
        node: &Node,
        path: &str,
    ) -> Result<BTreeMap<String, String>, ConfigError> {
        let mut env = BTreeMap::new();
        match &node.kind {
            Kind::Table(entries) => {
                for entry in entries {
                    if matches!(entry.value.kind, Kind::Null) {
                        continue;
                    }
                    let value = self.string(&entry.value, &format!("{path}.{}", entry.key))?;
                    env.insert(entry.key.clone(), value);
                }
            }
            Kind::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    let text = self.string(item, &format!("{path}[{i}]"))?;
                    if let Some((key, value)) = text.split_once('=') {
                        env.insert(key.to_string(), value.to_string());
                    }
                }
            }
            Kind::Null => {}
            _ => {
                return Err(self.error(
                    node,
                    path,
                    format!(
                        "expected a map or a list of KEY=VALUE, found {}",
                        node.describe()
                    ),
                ));
            }
        }
        Ok(env)
    }

    fn depends_on(
        &self,
        node: &Node,
        path: &str,
        services: &[String],
    ) -> Result<Vec<api::ContainerDependency>, ConfigError> {
        let known = |name: &str, at: &Node, at_path: &str| {
            if services.iter().any(|s| s == name) {
                Ok(())
            } else {
                Err(self.error(
                    at,
                    at_path,
                    format!(
                        "no service named '{name}'; services are {}",
                        services.join(", ")
                    ),
                ))
            }
        };
        let mut out = Vec::new();
        match &node.kind {
            Kind::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    let item_path = format!("{path}[{i}]");
                    let name = self.string(item, &item_path)?;
                    known(&name, item, &item_path)?;
                    out.push(api::ContainerDependency {
                        name,
                        condition: "started".to_string(),
                    });
                }
            }
            Kind::Table(entries) => {
                for entry in entries {
                    let entry_path = format!("{path}.{}", entry.key);
                    known(&entry.key, &entry.value, &entry_path)?;
                    let condition = match entry.value.get("condition") {
                        None => "started",
                        Some(condition) => {
                            let condition_path = format!("{entry_path}.condition");
                            match self.string(condition, &condition_path)?.as_str() {
                                "service_started" => "started",
                                "service_healthy" => "healthy",
                                "service_completed_successfully" => "exited_successfully",
                                other => {
                                    return Err(self.error(
                                        condition,
                                        &condition_path,
                                        format!(
                                            "unknown condition '{other}'; expected one of service_started, service_healthy, service_completed_successfully"
                                        ),
                                    ));
                                }
                            }
                        }
                    };
                    out.push(api::ContainerDependency {
                        name: entry.key.clone(),
                        condition: condition.to_string(),
                    });
                }
            }
            _ => {
                return Err(self.error(
                    node,
                    path,
                    format!(
                        "expected a list of service names or a map, found {}",
                        node.describe()
                    ),
                ));
            }
        }
        Ok(out)
    }

    fn seconds(&self, node: &Node, path: &str) -> Result<i64, ConfigError> {
        let text = self.string(node, path)?;
        let duration = api::Duration::parse(&text).map_err(|e| {
            self.error(
                node,
                path,
                format!("{e} (expected a duration such as \"30s\")"),
            )
        })?;
        Ok(duration.to_std().as_secs() as i64)
    }

    fn healthcheck(
        &self,
        node: &Node,
        path: &str,
    ) -> Result<Option<api::ContainerHealthcheck>, ConfigError> {
        if node.as_table().is_none() {
            return Err(self.error(
                node,
                path,
                format!("expected a map, found {}", node.describe()),
            ));
        }
        if matches!(node.get("disable").map(|n| &n.kind), Some(Kind::Bool(true))) {
            return Ok(None);
        }
        let Some(test) = node.get("test") else {
            return Ok(None);
        };
        let test_path = format!("{path}.test");
        let command = match &test.kind {
            Kind::Str(s) => vec!["/bin/sh".to_string(), "-c".to_string(), s.clone()],
            Kind::Array(_) => {
                let parts = self.command(test, &test_path)?;
                match parts.first().map(String::as_str) {
                    Some("NONE") => return Ok(None),
                    Some("CMD") => parts[1..].to_vec(),
                    Some("CMD-SHELL") => {
                        vec![
                            "/bin/sh".to_string(),
                            "-c".to_string(),
                            parts[1..].join(" "),
                        ]
                    }
                    _ => {
                        return Err(self.error(
                            test,
                            &test_path,
                            "a list must start with CMD, CMD-SHELL or NONE",
                        ));
                    }
                }
            }
            _ => {
                return Err(self.error(
                    test,
                    &test_path,
                    format!("expected a string or a list, found {}", test.describe()),
                ));
            }
        };
        let mut check = api::ContainerHealthcheck {
            name: "healthcheck".to_string(),
            exec: Some(api::ContainerExecCheck { command }),
            ..Default::default()
        };
        for (key, slot) in [
            ("interval", &mut check.interval),
            ("timeout", &mut check.timeout),
            ("start_period", &mut check.grace_period),
        ] {
            if let Some(value) = node.get(key) {
                *slot = Some(self.seconds(value, &format!("{path}.{key}"))?);
            }
        }
        if let Some(retries) = node.get("retries") {
            match retries.kind {
                Kind::Int(n) if (1..=i64::from(i32::MAX)).contains(&n) => {
                    check.failure_threshold = Some(n as i32);
                }
                _ => {
                    return Err(self.error(
                        retries,
                        &format!("{path}.retries"),
                        "expected a positive integer",
                    ));
                }
            }
        }
        Ok(Some(check))
    }

    fn restart(&self, node: &Node, path: &str) -> Result<api::MachineRestart, ConfigError> {
        let text = self.string(node, path)?;
        let (policy, max_retries) = match text.split_once(':') {
            Some(("on-failure", n)) => (
                api::RestartPolicy::OnFailure,
                Some(n.parse::<u32>().map_err(|_| {
                    self.error(node, path, format!("'{n}' is not a number of retries"))
                })?),
            ),
            None if text == "no" => (api::RestartPolicy::No, None),
            None if text == "always" || text == "unless-stopped" => {
                (api::RestartPolicy::Always, None)
            }
            None if text == "on-failure" => (api::RestartPolicy::OnFailure, None),
            _ => {
                return Err(self.error(
                    node,
                    path,
                    format!(
                        "unknown restart policy '{text}'; expected one of no, always, on-failure[:N], unless-stopped"
                    ),
                ));
            }
        };
        Ok(api::MachineRestart {
            policy,
            max_retries,
        })
    }
}

/// Reads the compose file at `path` into containers. The one service with `build` gets the
/// placeholder image [`BUILT_IMAGE`].
pub(crate) fn read(path: &Path) -> Result<ComposeContainers, ConfigError> {
    let origin = path.display().to_string();
    let io = |e: std::io::Error| ConfigError::Compose(format!("{origin}: {e}"));
    let size = std::fs::metadata(path).map_err(io)?.len();
    if size > crate::MAX_FILE_SIZE {
        return Err(ConfigError::Compose(format!(
            "{origin}: the file is {size} bytes; compose files larger than {} bytes are refused",
            crate::MAX_FILE_SIZE
        )));
    }
    let text = std::fs::read_to_string(path).map_err(io)?;
    parse(&text, &origin)
}

pub(crate) fn parse(text: &str, origin: &str) -> Result<ComposeContainers, ConfigError> {
    let index = LineIndex::new(text);
    let root =
        node::parse_yaml(text, origin, &index).map_err(|e| ConfigError::Compose(e.to_string()))?;
    let mut keys = BTreeMap::new();
    record_keys(&root, "", &mut keys);
    let reader = Reader {
        origin: origin.to_string(),
        index: &index,
        keys,
    };
    if root.as_table().is_none() {
        return Err(reader.error(&root, "(top level)", "expected a map with a `services` key"));
    }
    let Some(services) = root.get("services") else {
        return Err(reader.error(
            &root,
            "services",
            "missing; a compose file needs at least one service",
        ));
    };
    let Some(entries) = services.as_table().filter(|e| !e.is_empty()) else {
        return Err(reader.error(
            services,
            "services",
            format!("expected a map of services, found {}", services.describe()),
        ));
    };
    let names: Vec<String> = entries.iter().map(|e| e.key.clone()).collect();
    let mut containers = Vec::new();
    let mut builder: Option<String> = None;
    for entry in entries {
        let name = &entry.key;
        let service = &entry.value;
        let path = format!("services.{name}");
        let Some(keys) = service.as_table() else {
            return Err(reader.error(
                service,
                &path,
                format!("expected a map, found {}", service.describe()),
            ));
        };
        let mut container = api::ContainerConfig {
            name: name.clone(),
            ..Default::default()
        };
        for key in keys {
            let value = &key.value;
            let key_path = format!("{path}.{}", key.key);
            match key.key.as_str() {
                "image" => container.image = reader.string(value, &key_path)?,
                "build" => {
                    if let Some(first) = &builder {
                        return Err(reader.error(
                            value,
                            &key_path,
                            format!(
                                "only one service may have `build` (services.{first}.build already does)"
                            ),
                        ));
                    }
                    builder = Some(name.clone());
                }
                "environment" => container.env = reader.environment(value, &key_path)?,
                "command" => container.cmd = reader.command(value, &key_path)?,
                "entrypoint" => container.entrypoint = reader.command(value, &key_path)?,
                "user" => container.user = reader.string(value, &key_path)?,
                "depends_on" => {
                    container.depends_on = reader.depends_on(value, &key_path, &names)?;
                }
                "healthcheck" => {
                    container.healthchecks =
                        reader.healthcheck(value, &key_path)?.into_iter().collect();
                }
                "restart" => container.restart = Some(reader.restart(value, &key_path)?),
                "stop_signal" => {
                    container.stop.get_or_insert_with(Default::default).signal =
                        Some(reader.string(value, &key_path)?);
                }
                "stop_grace_period" => {
                    let text = reader.string(value, &key_path)?;
                    let timeout = api::Duration::parse(&text).map_err(|e| {
                        reader.error(
                            value,
                            &key_path,
                            format!("{e} (expected a duration such as \"10s\")"),
                        )
                    })?;
                    container.stop.get_or_insert_with(Default::default).timeout = Some(timeout);
                }
                // Ports, networks and volumes have no meaning inside one machine (flyctl
                // ignores them too); anything else compose knows is left alone.
                _ => {}
            }
        }
        if builder.as_deref() == Some(name.as_str()) {
            container.image = BUILT_IMAGE.to_string();
        } else if container.image.trim().is_empty() {
            return Err(reader.error(
                service,
                &path,
                "has neither `image` nor `build`; every service needs one",
            ));
        }
        containers.push(container);
    }
    Ok(ComposeContainers { containers })
}
