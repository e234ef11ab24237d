//! Per-process-group Machines API configs, shaped as flyctl sends them (spec/flytoml.md §5).

use std::collections::BTreeMap;
use std::path::Path;

use aloft_api as api;

use crate::diagnostic::ConfigError;
use crate::model::*;
use crate::units::{parse_memory_mb, parse_volume_size_gb, preset};
use crate::{CONSOLE_GROUP, RELEASE_COMMAND_GROUP, TEST_MACHINE_GROUP};

/// What a deploy adds to the config: the image, the release, and the region really used.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MachineConfigOptions {
    pub image: String,
    pub release_id: Option<String>,
    pub release_version: Option<u64>,
    /// Overrides `PRIMARY_REGION` (the control plane sets the region actually used).
    pub primary_region: Option<String>,
}

pub(crate) fn shell_split(command: &str) -> Result<Vec<String>, String> {
    shell_words::split(command).map_err(|e| e.to_string())
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn volume_gb(path: &str, value: &Option<String>) -> Result<Option<u32>, ConfigError> {
    match value.as_ref().filter(|v| !v.is_empty()) {
        None => Ok(None),
        Some(text) => parse_volume_size_gb(text)
            .map(|gb| Some(u32::try_from(gb).unwrap_or(u32::MAX)))
            .map_err(|message| ConfigError::Invalid {
                path: path.to_string(),
                message,
            }),
    }
}

impl Concurrency {
    fn to_api(&self) -> api::ServiceConcurrency {
        api::ServiceConcurrency {
            kind: self.kind.clone(),
            hard_limit: self.hard_limit.unwrap_or_default(),
            soft_limit: self.soft_limit.unwrap_or_default(),
        }
    }
}

impl TlsOptions {
    fn to_api(&self) -> api::TlsOptions {
        api::TlsOptions {
            alpn: self.alpn.clone(),
            versions: self.versions.clone(),
            default_self_signed: self.default_self_signed,
        }
    }
}

impl HttpOptions {
    fn to_api(&self) -> api::HttpOptions {
        api::HttpOptions {
            compress: self.compress,
            h2_backend: self.h2_backend,
            idle_timeout: self.idle_timeout,
            headers_read_timeout: self.headers_read_timeout,
            response: self.response.as_ref().map(|r| api::HttpResponseOptions {
                pristine: r.pristine,
                headers: r.headers.clone(),
            }),
            replay_cache: self
                .replay_cache
                .iter()
                .map(|r| api::ReplayCache {
                    path_prefix: r.path_prefix.clone(),
                    ttl_seconds: r.ttl_seconds,
                    kind: r.kind.clone(),
                    name: r.name.clone(),
                    allow_bypass: r.allow_bypass,
                })
                .collect(),
        }
    }
}

impl Port {
    fn to_api(&self) -> api::MachinePort {
        api::MachinePort {
            port: self.port,
            start_port: self.start_port,
            end_port: self.end_port,
            handlers: self.handlers.clone(),
            force_https: self.force_https.then_some(true),
            tls_options: self.tls_options.as_ref().map(TlsOptions::to_api),
            http_options: self.http_options.as_ref().map(HttpOptions::to_api),
            proxy_proto_options: self.proxy_proto_options.as_ref().map(|p| {
                api::ProxyProtoOptions {
                    version: p.version.clone(),
                }
            }),
        }
    }
}

/// The documented default of `internal_port` when a file leaves it out.
pub const DEFAULT_INTERNAL_PORT: u16 = 8080;

fn or_default_port(port: u16) -> u16 {
    if port == 0 {
        DEFAULT_INTERNAL_PORT
    } else {
        port
    }
}

fn api_headers(headers: &BTreeMap<String, String>) -> Vec<api::HttpHeader> {
    headers
        .iter()
        .map(|(name, value)| api::HttpHeader {
            name: name.clone(),
            values: vec![value.clone()],
        })
        .collect()
}

impl TcpCheck {
    fn to_api(&self) -> api::MachineCheck {
        api::MachineCheck {
            check_type: "tcp".to_string(),
            interval: self.interval,
            timeout: self.timeout,
            grace_period: self.grace_period,
            ..api::MachineCheck::default()
        }
    }
}

impl HttpCheck {
    fn to_api(&self) -> api::MachineCheck {
        api::MachineCheck {
            check_type: "http".to_string(),
            interval: self.interval,
            timeout: self.timeout,
            grace_period: self.grace_period,
            method: self.method.clone(),
            path: self.path.clone(),
            protocol: self.protocol.clone(),
            tls_skip_verify: self.tls_skip_verify,
            tls_server_name: self.tls_server_name.clone(),
            headers: api_headers(&self.headers),
            ..api::MachineCheck::default()
        }
    }
}

impl HttpService {
    /// The `[http_service]` shorthand: tcp, 80 (http) and 443 (http+tls).
    pub fn to_api(&self) -> api::MachineService {
        let http_options = self.http_options.as_ref().map(HttpOptions::to_api);
        api::MachineService {
            protocol: "tcp".to_string(),
            internal_port: or_default_port(self.internal_port),
            ports: vec![
                api::MachinePort {
                    port: Some(80),
                    handlers: vec!["http".to_string()],
                    force_https: self.force_https.then_some(true),
                    http_options: http_options.clone(),
                    ..api::MachinePort::default()
                },
                api::MachinePort {
                    port: Some(443),
                    handlers: vec!["http".to_string(), "tls".to_string()],
                    http_options,
                    tls_options: self.tls_options.as_ref().map(TlsOptions::to_api),
                    ..api::MachinePort::default()
                },
            ],
            checks: self.checks.iter().map(HttpCheck::to_api).collect(),
            concurrency: self.concurrency.as_ref().map(Concurrency::to_api),
            autostop: self.auto_stop_machines,
            autostart: self.auto_start_machines,
            min_machines_running: self.min_machines_running,
            ..api::MachineService::default()
        }
    }
}

impl Service {
    pub fn to_api(&self) -> api::MachineService {
        api::MachineService {
            protocol: self.protocol.clone(),
            internal_port: or_default_port(self.internal_port),
            ports: self.ports.iter().map(Port::to_api).collect(),
            checks: self
                .tcp_checks
                .iter()
                .map(TcpCheck::to_api)
                .chain(self.http_checks.iter().map(HttpCheck::to_api))
                .collect(),
            concurrency: self.concurrency.as_ref().map(Concurrency::to_api),
            autostop: self.auto_stop_machines,
            autostart: self.auto_start_machines,
            min_machines_running: self.min_machines_running,
            ..api::MachineService::default()
        }
    }
}

impl Vm {
    /// The guest this section describes: preset of `size` (default `shared-cpu-1x`, or
    /// `performance-8x` with a `gpu_kind`), `memory` on top, then every explicit field.
    pub fn to_guest(&self) -> Result<api::MachineGuest, String> {
        let size = match &self.size {
            Some(size) => size.as_str(),
            None if self.gpu_kind.is_some() => "performance-8x",
            None => "shared-cpu-1x",
        };
        let base = preset(size).ok_or_else(|| {
            if size.starts_with("shared") || size.starts_with("performance") {
                format!("'{size}' is an invalid machine size, choose one of: {}", crate::units::VM_SIZES.iter().map(|p| p.name).collect::<Vec<_>>().join(", "))
            } else {
                format!("invalid machine preset requested, '{size}', expected to start with 'shared' or 'performance'")
            }
        })?;
        let mut guest = api::MachineGuest {
            cpu_kind: base.cpu_kind.to_string(),
            cpus: base.cpus,
            memory_mb: base.memory_mb,
            gpus: (base.gpus > 0).then_some(base.gpus),
            gpu_kind: base.gpu_kind.map(str::to_string),
            ..api::MachineGuest::default()
        };
        if let Some(memory) = &self.memory {
            let mb = parse_memory_mb(memory)?;
            if mb == 0 {
                return Err(format!("memory '{memory}' is zero"));
            }
            guest.memory_mb = u32::try_from(mb).unwrap_or(u32::MAX);
        }
        if let Some(kind) = self.cpu_kind.as_ref().filter(|k| !k.is_empty()) {
            guest.cpu_kind = kind.clone();
        }
        if let Some(cpus) = self.cpus.filter(|c| *c > 0) {
            guest.cpus = cpus;
        }
        if let Some(memory_mb) = self.memory_mb.filter(|m| *m > 0) {
            guest.memory_mb = memory_mb;
        }
        if let Some(gpus) = self.gpus.filter(|g| *g > 0) {
            guest.gpus = Some(gpus);
        }
        if let Some(kind) = self.gpu_kind.as_ref().filter(|k| !k.is_empty()) {
            guest.gpu_kind = Some(kind.clone());
        }
        if !self.kernel_args.is_empty() {
            guest.kernel_args = self.kernel_args.clone();
        }
        if let Some(id) = self.host_dedication_id.as_ref().filter(|k| !k.is_empty()) {
            guest.host_dedication_id = Some(id.clone());
        }
        if let Some(persist) = &self.persist_rootfs {
            guest.persist_rootfs = Some(persist.clone());
        }
        Ok(guest)
    }
}

/// Maps fly.toml's restart policy names to the API's.
pub(crate) fn restart_policy(policy: &str) -> Option<api::RestartPolicy> {
    match policy {
        "always" => Some(api::RestartPolicy::Always),
        "never" | "no" => Some(api::RestartPolicy::No),
        "on-failure" | "on_failure" => Some(api::RestartPolicy::OnFailure),
        _ => None,
    }
}

impl AppConfig {
    fn ensure_loadable(&self) -> Result<(), ConfigError> {
        if self.source.load_errors.is_empty() {
            return Ok(());
        }
        let messages: Vec<String> = self
            .source
            .load_errors
            .iter()
            .map(ToString::to_string)
            .collect();
        Err(ConfigError::InvalidConfig(messages.join("; ")))
    }

    fn config_dir(&self) -> Option<&Path> {
        self.config_path().and_then(Path::parent)
    }

    /// `machine_config` (from `[experimental]` first, then top level): inline JSON or a
    /// path to a JSON file relative to the config file.
    fn base_machine_config(&self) -> Result<api::MachineConfig, ConfigError> {
        // As flyctl: a compose file wins over machine_config.
        if self
            .build
            .as_ref()
            .and_then(|b| b.compose.as_ref())
            .is_some()
        {
            let missing = |message: String| ConfigError::File {
                path: "build.compose".to_string(),
                message,
            };
            let path = self.compose_file().ok_or_else(|| {
                missing(format!(
                    "no compose file next to the config; expected one of {}, or set build.compose.file",
                    crate::COMPOSE_FILE_NAMES.join(", ")
                ))
            })?;
            if !path.is_file() {
                return Err(missing(format!(
                    "compose file {} not found",
                    path.display()
                )));
            }
            let compose = crate::compose::read(&path)?;
            return Ok(api::MachineConfig {
                containers: compose.containers,
                ..Default::default()
            });
        }
        let source = self
            .experimental
            .as_ref()
            .and_then(|e| e.machine_config.as_ref())
            .or(self.machine_config.as_ref())
            .filter(|s| !s.trim().is_empty());
        let Some(source) = source else {
            return Ok(api::MachineConfig::default());
        };
        let text = if source.trim_start().starts_with('{') {
            source.clone()
        } else {
            let path = match self.config_dir() {
                Some(dir) => dir.join(source),
                None => Path::new(source).to_path_buf(),
            };
            let metadata = std::fs::metadata(&path)
                .map_err(|e| ConfigError::MachineConfig(format!("{}: {e}", path.display())))?;
            if metadata.len() > crate::MAX_FILE_SIZE {
                return Err(ConfigError::MachineConfig(format!(
                    "{}: file too large",
                    path.display()
                )));
            }
            std::fs::read_to_string(&path)
                .map_err(|e| ConfigError::MachineConfig(format!("{}: {e}", path.display())))?
        };
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| ConfigError::MachineConfig(e.to_string()))?;
        if crate::node::json_depth(&value) > crate::MAX_DEPTH {
            return Err(ConfigError::MachineConfig("nesting too deep".to_string()));
        }
        serde_json::from_value(value).map_err(|e| ConfigError::MachineConfig(e.to_string()))
    }

    /// With `containers` in `machine_config`, the deployed image goes to one of them, as
    /// flyctl picks it: the one `container` names, else the one named `app`, else the first.
    /// Every other container must name its own image. Without a deployed image the chosen
    /// container keeps flyctl's placeholder `.` (the image `fly deploy` builds).
    fn place_image_in_containers(
        &self,
        config: &mut api::MachineConfig,
    ) -> Result<(), ConfigError> {
        if config.containers.is_empty() {
            return Ok(());
        }
        if self
            .build
            .as_ref()
            .and_then(|b| b.compose.as_ref())
            .is_some()
        {
            // Compose names its built service itself (the one with `build`).
            if !config.image.is_empty() {
                for container in &mut config.containers {
                    if container.image == crate::compose::BUILT_IMAGE {
                        container.image = config.image.clone();
                    }
                }
            }
            return Ok(());
        }
        let wanted = self
            .container
            .as_deref()
            .filter(|name| !name.trim().is_empty());
        let chosen = match wanted {
            Some(name) => config
                .containers
                .iter()
                .position(|c| c.name == name)
                .ok_or_else(|| {
                    let names: Vec<&str> =
                        config.containers.iter().map(|c| c.name.as_str()).collect();
                    ConfigError::MachineConfig(format!(
                        "container \"{name}\" not found (set by `container`); the containers are {}",
                        names.join(", ")
                    ))
                })?,
            None => config
                .containers
                .iter()
                .position(|c| c.name == crate::DEFAULT_PROCESS_GROUP)
                .unwrap_or(0),
        };
        let image = if config.image.is_empty() {
            ".".to_string()
        } else {
            config.image.clone()
        };
        for (i, container) in config.containers.iter_mut().enumerate() {
            if i == chosen {
                container.image = image.clone();
            } else if container.image.trim().is_empty() {
                return Err(ConfigError::MachineConfig(format!(
                    "container \"{}\" must have an image specified",
                    container.name
                )));
            }
        }
        Ok(())
    }

    fn machine_env(
        &self,
        group: &str,
        opts: &MachineConfigOptions,
        base: &mut BTreeMap<String, String>,
    ) {
        base.extend(self.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        let region = opts
            .primary_region
            .as_deref()
            .filter(|r| !r.is_empty())
            .unwrap_or(&self.primary_region);
        if !region.is_empty() {
            base.insert("PRIMARY_REGION".to_string(), region.to_string());
        }
        base.insert("FLY_PROCESS_GROUP".to_string(), group.to_string());
    }

    fn machine_metadata(
        &self,
        group: &str,
        opts: &MachineConfigOptions,
        metadata: &mut BTreeMap<String, String>,
    ) {
        metadata.insert(api::METADATA_PLATFORM_VERSION.to_string(), "v2".to_string());
        metadata.insert(api::METADATA_PROCESS_GROUP.to_string(), group.to_string());
        if let Some(id) = &opts.release_id {
            metadata.insert(api::METADATA_RELEASE_ID.to_string(), id.clone());
        }
        if let Some(version) = opts.release_version {
            metadata.insert(
                api::METADATA_RELEASE_VERSION.to_string(),
                version.to_string(),
            );
        }
    }

    fn stop_config(&self) -> Option<api::StopConfig> {
        (self.kill_signal.is_some() || self.kill_timeout.is_some()).then(|| api::StopConfig {
            timeout: self.kill_timeout,
            signal: self.kill_signal.clone(),
        })
    }

    fn image_or(&self, opts: &MachineConfigOptions, base: &str) -> String {
        if !opts.image.is_empty() {
            opts.image.clone()
        } else if let Some(image) = self.build.as_ref().and_then(|b| b.image.clone()) {
            image
        } else {
            base.to_string()
        }
    }

    /// The `[[vm]]` section that sizes `group`: one naming the group wins over unscoped ones.
    pub fn vm_for_group(&self, group: &str) -> Option<&Vm> {
        self.vm
            .iter()
            .rev()
            .find(|vm| vm.processes.iter().any(|p| p == group))
            .or_else(|| self.vm.iter().find(|vm| vm.processes.is_empty()))
    }

    /// The guest of `group`'s machines; `None` when no `[[vm]]` applies (flyctl then
    /// leaves an existing machine's guest alone).
    pub fn guest_for_group(&self, group: &str) -> Result<Option<api::MachineGuest>, ConfigError> {
        let Some(vm) = self.vm_for_group(group) else {
            return Ok(None);
        };
        let index = self
            .vm
            .iter()
            .position(|v| std::ptr::eq(v, vm))
            .unwrap_or(0);
        let mut guest = vm.to_guest().map_err(|message| ConfigError::Invalid {
            path: format!("vm[{index}]"),
            message,
        })?;
        if guest.host_dedication_id.is_none() {
            guest.host_dedication_id = self.host_dedication_id.clone().filter(|h| !h.is_empty());
        }
        Ok(Some(guest))
    }

    fn init_for(&self, cmd: Vec<String>) -> api::MachineInit {
        let experimental = self.experimental.clone().unwrap_or_default();
        api::MachineInit {
            cmd,
            entrypoint: experimental.entrypoint,
            exec: experimental.exec,
            swap_size_mb: self.swap_size_mb,
            ..api::MachineInit::default()
        }
    }

    fn files_for(&self, group: &str) -> Result<Vec<api::File>, ConfigError> {
        let mut files = Vec::new();
        for (i, file) in self.files.iter().enumerate() {
            if !self.applies_to(&file.processes, group) {
                continue;
            }
            let mut out = api::File {
                guest_path: file.guest_path.clone(),
                ..api::File::default()
            };
            if let Some(raw) = &file.raw_value {
                out.raw_value = Some(base64(raw.as_bytes()));
            } else if let Some(secret) = &file.secret_name {
                out.secret_name = Some(secret.clone());
            } else if let Some(local) = &file.local_path {
                let path = match self.config_dir() {
                    Some(dir) => dir.join(local),
                    None => Path::new(local).to_path_buf(),
                };
                let error = |message: String| ConfigError::File {
                    path: format!("files[{i}].local_path"),
                    message,
                };
                let size = std::fs::metadata(&path)
                    .map_err(|e| error(format!("{}: {e}", path.display())))?
                    .len();
                if size > crate::MAX_FILE_SIZE {
                    return Err(error(format!("{}: file too large", path.display())));
                }
                let bytes =
                    std::fs::read(&path).map_err(|e| error(format!("{}: {e}", path.display())))?;
                out.raw_value = Some(base64(&bytes));
            }
            files.push(out);
        }
        Ok(files)
    }

    fn http_service_for(&self, group: &str) -> Option<&HttpService> {
        self.http_service
            .as_ref()
            .filter(|h| self.applies_to(&h.processes, group))
    }

    fn checks_for(&self, group: &str) -> Result<BTreeMap<String, api::MachineCheck>, ConfigError> {
        let mut checks = BTreeMap::new();
        for (name, check) in &self.checks {
            if !self.applies_to(&check.processes, group) {
                continue;
            }
            let port = match check.port {
                Some(port) => port,
                None => match self.http_service_for(group) {
                    Some(http) => or_default_port(http.internal_port),
                    None => {
                        return Err(ConfigError::CheckWithoutPort {
                            check: name.clone(),
                            group: group.to_string(),
                        });
                    }
                },
            };
            checks.insert(
                name.clone(),
                api::MachineCheck {
                    check_type: check.check_type.clone().unwrap_or_default(),
                    port: Some(port),
                    interval: check.interval,
                    timeout: check.timeout,
                    grace_period: check.grace_period,
                    method: check.method.as_ref().map(|m| m.to_uppercase()),
                    path: check.path.clone(),
                    protocol: check.protocol.clone(),
                    tls_skip_verify: check.tls_skip_verify,
                    tls_server_name: check.tls_server_name.clone(),
                    headers: api_headers(&check.headers),
                    kind: None,
                },
            );
        }
        Ok(checks)
    }

    fn mounts_for(&self, group: &str) -> Result<Vec<api::MachineMount>, ConfigError> {
        let Some((i, mount)) = self
            .mounts
            .iter()
            .enumerate()
            .find(|(_, m)| self.applies_to(&m.processes, group))
        else {
            return Ok(Vec::new());
        };
        Ok(vec![api::MachineMount {
            name: mount.source.clone(),
            path: mount.destination.clone(),
            extend_threshold_percent: mount
                .auto_extend_size_threshold
                .filter(|t| *t != 0)
                .and_then(|t| u32::try_from(t).ok()),
            add_size_gb: volume_gb(
                &format!("mounts[{i}].auto_extend_size_increment"),
                &mount.auto_extend_size_increment,
            )?,
            size_gb_limit: volume_gb(
                &format!("mounts[{i}].auto_extend_size_limit"),
                &mount.auto_extend_size_limit,
            )?,
            ..api::MachineMount::default()
        }])
    }

    /// The machine config of process group `group` (spec/flytoml.md §5).
    pub fn to_machine_config(
        &self,
        group: &str,
        opts: &MachineConfigOptions,
    ) -> Result<api::MachineConfig, ConfigError> {
        self.ensure_loadable()?;
        let known = if self.processes.is_empty() {
            group == crate::DEFAULT_PROCESS_GROUP
        } else {
            self.processes.contains_key(group)
        };
        if !known {
            return Err(ConfigError::UnknownGroup {
                group: group.to_string(),
                defined: self.process_groups(),
            });
        }
        let mut config = self.base_machine_config()?;
        config.image = self.image_or(opts, &config.image);
        self.place_image_in_containers(&mut config)?;
        self.machine_env(group, opts, &mut config.env);
        self.machine_metadata(group, opts, &mut config.metadata);

        let command = self
            .processes
            .get(group)
            .map(String::as_str)
            .unwrap_or_default();
        let cmd = if !command.trim().is_empty() {
            shell_split(command).map_err(|message| ConfigError::ProcessCommand {
                group: group.to_string(),
                message,
            })?
        } else {
            self.experimental
                .as_ref()
                .map(|e| e.cmd.clone())
                .unwrap_or_default()
        };
        let base_init = config.init.take().unwrap_or_default();
        let mut init = self.init_for(cmd);
        init.tty = base_init.tty;
        init.kernel_args = base_init.kernel_args;
        config.init = Some(init);

        let mut services: Vec<api::MachineService> = self
            .http_service_for(group)
            .map(HttpService::to_api)
            .into_iter()
            .collect();
        services.extend(
            self.services
                .iter()
                .filter(|s| self.applies_to(&s.processes, group))
                .map(Service::to_api),
        );
        config.services = services;
        config.checks = self.checks_for(group)?;
        config.mounts = self.mounts_for(group)?;
        if let Some(guest) = self.guest_for_group(group)? {
            config.guest = Some(guest);
        }
        config.restart = self
            .restart
            .iter()
            .rfind(|r| self.applies_to(&r.processes, group))
            .map(|r| -> Result<api::MachineRestart, ConfigError> {
                let policy = restart_policy(&r.policy).ok_or_else(|| ConfigError::Invalid {
                    path: "restart".to_string(),
                    message: format!("invalid restart policy: {}", r.policy),
                })?;
                Ok(api::MachineRestart {
                    policy,
                    max_retries: r.retries,
                })
            })
            .transpose()?;
        config.stop_config = self.stop_config();
        config.statics = self
            .statics
            .iter()
            .map(|s| api::Static {
                guest_path: s.guest_path.clone(),
                url_prefix: s.url_prefix.clone(),
                tigris_bucket: s.tigris_bucket.clone(),
                index_document: s.index_document.clone(),
            })
            .collect();
        config.metrics = self
            .metrics
            .iter()
            .find(|m| self.applies_to(&m.processes, group))
            .map(|m| api::MachineMetrics {
                port: m.port.unwrap_or_default(),
                path: m.path.clone().unwrap_or_default(),
                https: m.https,
            });
        let mut files = config.files.clone();
        for file in self.files_for(group)? {
            files.retain(|f| f.guest_path != file.guest_path);
            files.push(file);
        }
        config.files = files;
        Ok(config)
    }

    /// Machine configs of every process group, in group order.
    pub fn machine_configs(
        &self,
        opts: &MachineConfigOptions,
    ) -> Result<Vec<(String, api::MachineConfig)>, ConfigError> {
        self.process_groups()
            .into_iter()
            .map(|group| {
                self.to_machine_config(&group, opts)
                    .map(|config| (group, config))
            })
            .collect()
    }

    /// A throw-away machine for a one-off command (release command, console).
    fn ephemeral_machine(
        &self,
        group: &str,
        opts: &MachineConfigOptions,
    ) -> Result<api::MachineConfig, ConfigError> {
        self.ensure_loadable()?;
        let mut config = self.base_machine_config()?;
        config.image = self.image_or(opts, &config.image);
        self.place_image_in_containers(&mut config)?;
        self.machine_env(group, opts, &mut config.env);
        self.machine_metadata(group, opts, &mut config.metadata);
        config.services.clear();
        config.checks.clear();
        config.mounts.clear();
        config.restart = Some(api::MachineRestart {
            policy: api::RestartPolicy::No,
            max_retries: None,
        });
        config.auto_destroy = true;
        config
            .dns
            .get_or_insert_with(api::DnsConfig::default)
            .skip_registration = true;
        config.stop_config = self.stop_config();
        config.statics.clear();
        config.metrics = None;
        Ok(config)
    }

    /// The machine that runs `deploy.release_command`, or `None` when there is none.
    pub fn release_command_machine_config(
        &self,
        opts: &MachineConfigOptions,
    ) -> Option<Result<api::MachineConfig, ConfigError>> {
        let command = self
            .deploy
            .as_ref()?
            .release_command
            .as_ref()
            .filter(|c| !c.trim().is_empty())?;
        Some((|| {
            let mut config = self.ephemeral_machine(RELEASE_COMMAND_GROUP, opts)?;
            config
                .env
                .insert("RELEASE_COMMAND".to_string(), "1".to_string());
            let cmd =
                shell_split(command).map_err(|_| ConfigError::ReleaseCommand(command.clone()))?;
            let mut init = self.init_for(cmd);
            init.exec.clear();
            config.init = Some(init);
            if let Some(vm) = self
                .deploy
                .as_ref()
                .and_then(|d| d.release_command_vm.as_ref())
            {
                let guest = vm.to_guest().map_err(|message| ConfigError::Invalid {
                    path: "deploy.release_command_vm".to_string(),
                    message,
                })?;
                config.guest = Some(guest);
            }
            Ok(config)
        })())
    }

    /// The machine `fly console` starts: sleeps forever so a shell can be attached.
    pub fn console_machine_config(
        &self,
        opts: &MachineConfigOptions,
    ) -> Result<api::MachineConfig, ConfigError> {
        let mut config = self.ephemeral_machine(CONSOLE_GROUP, opts)?;
        config.init = Some(api::MachineInit {
            exec: vec!["/bin/sleep".to_string(), "inf".to_string()],
            swap_size_mb: self.swap_size_mb,
            ..api::MachineInit::default()
        });
        Ok(config)
    }
}

impl AppConfig {
    /// The throw-away machine that runs a deploy-time `machine_check` against
    /// `tested` (the machine config of the group under test, at `tested_ip`).
    pub fn test_machine_config(
        &self,
        check: &MachineCheckConfig,
        tested: &api::MachineConfig,
        tested_ip: &str,
        opts: &MachineConfigOptions,
    ) -> Result<api::MachineConfig, ConfigError> {
        self.ensure_loadable()?;
        if check.command.is_empty() {
            return Err(ConfigError::Invalid {
                path: "machine_checks".to_string(),
                message: "missing command for test machine".to_string(),
            });
        }
        let image = check.image.clone().filter(|i| !i.is_empty());
        let own_image = image.is_some();
        let image = image.unwrap_or_else(|| self.image_or(opts, &tested.image));
        if image.is_empty() {
            return Err(ConfigError::Invalid {
                path: "machine_checks".to_string(),
                message: "missing image for test machine".to_string(),
            });
        }
        let mut config = api::MachineConfig {
            image,
            ..api::MachineConfig::default()
        };
        if !own_image {
            config.env = tested.env.clone();
        }
        self.machine_env(TEST_MACHINE_GROUP, opts, &mut config.env);
        config
            .env
            .insert("FLY_TEST_COMMAND".to_string(), "1".to_string());
        config
            .env
            .insert("FLY_TEST_MACHINE_IP".to_string(), tested_ip.to_string());
        self.machine_metadata(TEST_MACHINE_GROUP, opts, &mut config.metadata);
        let experimental_entrypoint = self
            .experimental
            .as_ref()
            .map(|e| e.entrypoint.clone())
            .unwrap_or_default();
        let entrypoint = [&check.entrypoint, &experimental_entrypoint]
            .into_iter()
            .find(|e| !e.is_empty())
            .cloned()
            .or_else(|| tested.init.as_ref().map(|i| i.entrypoint.clone()))
            .unwrap_or_default();
        config.init = Some(api::MachineInit {
            cmd: check.command.clone(),
            entrypoint,
            swap_size_mb: self.swap_size_mb,
            ..api::MachineInit::default()
        });
        let (signal, timeout) = if own_image {
            (check.kill_signal.clone(), check.kill_timeout)
        } else {
            (
                check.kill_signal.clone().or(self.kill_signal.clone()),
                check.kill_timeout.or(self.kill_timeout),
            )
        };
        config.stop_config = Some(api::StopConfig { timeout, signal });
        config.restart = Some(api::MachineRestart {
            policy: api::RestartPolicy::No,
            max_retries: None,
        });
        config.auto_destroy = true;
        config.dns = Some(api::DnsConfig {
            skip_registration: true,
            ..api::DnsConfig::default()
        });
        Ok(config)
    }

    /// The machine checks that apply to `group`: those of its `http_service` and
    /// `[[services]]`, then the top-level ones.
    pub fn machine_checks_for(&self, group: &str) -> Vec<&MachineCheckConfig> {
        let mut checks: Vec<&MachineCheckConfig> = self
            .http_service_for(group)
            .map(|h| h.machine_checks.iter().collect())
            .unwrap_or_default();
        for service in self
            .services
            .iter()
            .filter(|s| self.applies_to(&s.processes, group))
        {
            checks.extend(&service.machine_checks);
        }
        checks.extend(&self.machine_checks);
        checks
    }

    /// Makes the config self-contained before it leaves this machine (the control plane
    /// cannot read files next to fly.toml): a `machine_config` path becomes its JSON, and
    /// `[[files]] local_path` entries become `raw_value` (text files only).
    pub fn inline_local_files(&mut self) -> Result<(), ConfigError> {
        let dir = self.config_dir().map(Path::to_path_buf);
        let resolve = |p: &str| match &dir {
            Some(dir) => dir.join(p),
            None => Path::new(p).to_path_buf(),
        };
        let read = |path: &Path, what: &str| -> Result<String, ConfigError> {
            let error = |message: String| ConfigError::File {
                path: what.to_string(),
                message,
            };
            let size = std::fs::metadata(path)
                .map_err(|e| error(format!("{}: {e}", path.display())))?
                .len();
            if size > crate::MAX_FILE_SIZE {
                return Err(error(format!("{}: file too large", path.display())));
            }
            let bytes =
                std::fs::read(path).map_err(|e| error(format!("{}: {e}", path.display())))?;
            String::from_utf8(bytes).map_err(|_| {
                error(format!(
                    "{}: not UTF-8 text; use secret_name for binary content",
                    path.display()
                ))
            })
        };
        for (what, field) in [
            ("machine_config", Some(&mut self.machine_config)),
            (
                "experimental.machine_config",
                self.experimental.as_mut().map(|e| &mut e.machine_config),
            ),
        ] {
            let Some(field) = field else { continue };
            if let Some(source) = field
                .as_ref()
                .filter(|s| !s.trim().is_empty() && !s.trim_start().starts_with('{'))
            {
                let text = read(&resolve(source), what)?;
                *field = Some(text);
            }
        }
        for (i, file) in self.files.iter_mut().enumerate() {
            if file.raw_value.is_some() || file.secret_name.is_some() {
                continue;
            }
            if let Some(local) = file.local_path.take() {
                file.raw_value = Some(read(&resolve(&local), &format!("files[{i}].local_path"))?);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"hello world\n"), "aGVsbG8gd29ybGQK");
    }
}
