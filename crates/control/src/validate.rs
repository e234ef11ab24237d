//! Checks on what clients send, each error naming the field and how to fix it. Nothing is
//! stored until these pass.

use aloft_api::MachineConfig;

use crate::error::{ApiError, ApiResult};

const CPU_COUNTS: [u32; 5] = [1, 2, 4, 8, 16];
const MAX_MEMORY_MB_PER_CPU: u32 = 8192;
/// The largest root filesystem (`rootfs.size_gb`) a machine may ask for, in GB.
pub const MAX_ROOTFS_SIZE_GB: u32 = 500;
const SCHEDULES: [&str; 4] = ["hourly", "daily", "weekly", "monthly"];
/// Fly's named guest sizes (`config.size`).
pub const SIZES: [&str; 11] = [
    "shared-cpu-1x",
    "shared-cpu-2x",
    "shared-cpu-4x",
    "shared-cpu-8x",
    "performance-1x",
    "performance-2x",
    "performance-4x",
    "performance-8x",
    "performance-16x",
    "a100-40gb",
    "l40s",
];

fn invalid(field: &str, message: impl std::fmt::Display) -> ApiError {
    ApiError::bad_request(format!("invalid {field}: {message}"))
}

/// Why `[[statics]]` entry `index` cannot be served, if it can't: Aloft serves statics
/// from the machine's image only, not from a Tigris bucket.
pub fn static_unsupported(index: usize, tigris_bucket: Option<&str>) -> Option<String> {
    tigris_bucket.filter(|b| !b.is_empty()).map(|_| {
        format!(
            "statics[{index}].tigris_bucket: serving statics from a Tigris bucket is not \
             supported by Aloft; remove tigris_bucket to serve guest_path from the app's image"
        )
    })
}

pub fn machine_config(config: &MachineConfig) -> ApiResult<()> {
    for (index, mapping) in config.statics.iter().enumerate() {
        if let Some(problem) = static_unsupported(index, mapping.tigris_bucket.as_deref()) {
            return Err(ApiError::bad_request(format!("invalid config.{problem}")));
        }
    }
    if config.image.trim().is_empty() {
        return Err(invalid("config.image", "an image is required"));
    }
    if config.image.len() > 1024
        || config
            .image
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(invalid(
            "config.image",
            format!("{:?} is not an image reference", config.image),
        ));
    }
    if let Some(size) = config.size.as_deref().filter(|s| !s.is_empty())
        && !SIZES.contains(&size)
    {
        return Err(invalid(
            "config.size",
            format!(
                "{size:?} is not a machine size; use one of {}",
                SIZES.join(", ")
            ),
        ));
    }
    if let Some(guest) = &config.guest {
        if !matches!(guest.cpu_kind.as_str(), "" | "shared" | "performance") {
            return Err(invalid(
                "config.guest.cpu_kind",
                format!("{:?} must be \"shared\" or \"performance\"", guest.cpu_kind),
            ));
        }
        if guest.cpus != 0 && !CPU_COUNTS.contains(&guest.cpus) {
            return Err(invalid(
                "config.guest.cpus",
                format!("{} must be one of 1, 2, 4, 8, 16", guest.cpus),
            ));
        }
        let cpus = guest.cpus.max(1);
        if guest.memory_mb != 0 {
            if guest.memory_mb < 256 || guest.memory_mb % 256 != 0 {
                return Err(invalid(
                    "config.guest.memory_mb",
                    format!(
                        "{} must be a multiple of 256, at least 256",
                        guest.memory_mb
                    ),
                ));
            }
            if guest.memory_mb > cpus * MAX_MEMORY_MB_PER_CPU {
                return Err(invalid(
                    "config.guest.memory_mb",
                    format!(
                        "{} is more than {} MB, the most {cpus} CPU(s) can have",
                        guest.memory_mb,
                        cpus * MAX_MEMORY_MB_PER_CPU
                    ),
                ));
            }
        }
    }
    if let Some(size) = config.rootfs.as_ref().and_then(|r| r.size_gb)
        && !(1..=MAX_ROOTFS_SIZE_GB).contains(&size)
    {
        return Err(invalid(
            "config.rootfs.size_gb",
            format!("{size} must be between 1 and {MAX_ROOTFS_SIZE_GB} (GB)"),
        ));
    }
    for (i, service) in config.services.iter().enumerate() {
        if !matches!(service.protocol.as_str(), "tcp" | "udp") {
            return Err(invalid(
                &format!("config.services[{i}].protocol"),
                format!("{:?} must be \"tcp\" or \"udp\"", service.protocol),
            ));
        }
        if service.internal_port == 0 {
            return Err(invalid(
                &format!("config.services[{i}].internal_port"),
                "a port between 1 and 65535 is required",
            ));
        }
        for (j, port) in service.ports.iter().enumerate() {
            if let (Some(start), Some(end)) = (port.start_port, port.end_port)
                && start > end
            {
                return Err(invalid(
                    &format!("config.services[{i}].ports[{j}]"),
                    format!("start_port {start} is after end_port {end}"),
                ));
            }
        }
    }
    if config.mounts.len() > 1 {
        return Err(invalid(
            "config.mounts",
            "a machine can mount at most one volume",
        ));
    }
    for (i, mount) in config.mounts.iter().enumerate() {
        mount_path(&mount.path).map_err(|why| invalid(&format!("config.mounts[{i}].path"), why))?;
    }
    if let Some(schedule) = config.schedule.as_deref().filter(|s| !s.is_empty())
        && !SCHEDULES.contains(&schedule)
    {
        return Err(invalid(
            "config.schedule",
            format!("{schedule:?} must be one of {}", SCHEDULES.join(", ")),
        ));
    }
    for key in config.metadata.keys() {
        metadata_key(key).map_err(|e| invalid("config.metadata", e.message))?;
    }
    for (i, file) in config.files.iter().enumerate() {
        if !file.guest_path.starts_with('/') {
            return Err(invalid(
                &format!("config.files[{i}].guest_path"),
                format!("{:?} must be an absolute path", file.guest_path),
            ));
        }
    }
    Ok(())
}

/// Machine names: letters, digits, `-` and `_`, at most 63 characters.
pub fn machine_name(name: &str) -> ApiResult<()> {
    if name.len() > 63
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(invalid(
            "name",
            format!("{name:?} may have only letters, digits, '-' and '_', at most 63 characters"),
        ));
    }
    Ok(())
}

pub fn metadata_key(key: &str) -> ApiResult<()> {
    if key.is_empty()
        || key.len() > 256
        || !key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/'))
    {
        return Err(invalid(
            "metadata key",
            format!(
                "{key:?} may have only letters, digits, '-', '_', '.' and '/', 1 to 256 characters"
            ),
        ));
    }
    Ok(())
}

pub fn metadata_value(value: &str) -> ApiResult<()> {
    if value.len() > 4096 {
        return Err(invalid("value", "metadata values are at most 4096 bytes"));
    }
    Ok(())
}

/// Org slugs follow app-name rules.
pub fn org_slug(slug: &str) -> ApiResult<()> {
    crate::names::validate_app_name(slug)
        .map_err(|e| invalid("slug", e.replace("app name", "organization slug")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use aloft_api::{MachineGuest, MachineService};

    fn config() -> MachineConfig {
        MachineConfig {
            image: "nginx".into(),
            ..Default::default()
        }
    }

    #[test]
    fn rootfs_sizes_out_of_range_name_the_field() {
        for (size, ok) in [
            (1, true),
            (MAX_ROOTFS_SIZE_GB, true),
            (0, false),
            (501, false),
        ] {
            let mut c = config();
            c.rootfs = Some(aloft_api::RootfsConfig {
                size_gb: Some(size),
                ..Default::default()
            });
            match machine_config(&c) {
                Ok(()) => assert!(ok, "{size} accepted"),
                Err(err) => {
                    assert!(!ok, "{size} refused: {}", err.message);
                    assert!(
                        err.message.contains("config.rootfs.size_gb"),
                        "{}",
                        err.message
                    );
                }
            }
        }
    }

    #[test]
    fn errors_name_the_field() {
        assert!(machine_config(&config()).is_ok());
        let cases: Vec<(MachineConfig, &str)> = vec![
            (MachineConfig::default(), "config.image"),
            (
                MachineConfig {
                    guest: Some(MachineGuest {
                        cpus: 3,
                        ..Default::default()
                    }),
                    ..config()
                },
                "config.guest.cpus",
            ),
            (
                MachineConfig {
                    guest: Some(MachineGuest {
                        cpus: 1,
                        memory_mb: 300,
                        ..Default::default()
                    }),
                    ..config()
                },
                "config.guest.memory_mb",
            ),
            (
                MachineConfig {
                    guest: Some(MachineGuest {
                        cpu_kind: "gpu".into(),
                        ..Default::default()
                    }),
                    ..config()
                },
                "config.guest.cpu_kind",
            ),
            (
                MachineConfig {
                    size: Some("huge".into()),
                    ..config()
                },
                "config.size",
            ),
            (
                MachineConfig {
                    services: vec![MachineService {
                        protocol: "http".into(),
                        internal_port: 80,
                        ..Default::default()
                    }],
                    ..config()
                },
                "config.services[0].protocol",
            ),
            (
                MachineConfig {
                    schedule: Some("yearly".into()),
                    ..config()
                },
                "config.schedule",
            ),
        ];
        for (config, field) in cases {
            let err = machine_config(&config).unwrap_err();
            assert!(
                err.message.starts_with(&format!("invalid {field}:")),
                "{field}: {}",
                err.message
            );
            assert_eq!(err.status, http::StatusCode::BAD_REQUEST);
        }
        assert!(machine_name("web_1-a").is_ok());
        assert!(machine_name("no spaces").is_err());
        assert!(metadata_key("fly_process_group").is_ok());
        assert!(metadata_key("").is_err());
    }
}

/// Directories a volume may not be mounted over (or, for the first four, under): the
/// machine's system would be hidden or the platform's mounts shadowed.
const SYSTEM_PATHS: &[&str] = &[
    "/proc", "/sys", "/dev", "/.fly", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64",
    "/libx32", "/usr", "/boot", "/run", "/var", "/root",
];
const SYSTEM_TREES: &[&str] = &["/proc", "/sys", "/dev", "/.fly"];

/// A volume's mount path: absolute, plain (no `.`, `..` or empty components), not `/`
/// and not a system directory.
pub fn mount_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err(format!("{path:?} must be an absolute path, such as /data"));
    }
    let trimmed = path.trim_end_matches('/');
    if trimmed.is_empty() {
        return Err(format!(
            "{path:?} would hide the machine's whole root filesystem: mount the volume at a directory such as /data"
        ));
    }
    if trimmed[1..]
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(format!(
            "{path:?} must be a plain path without '.', '..' or '//', such as /data"
        ));
    }
    if path.contains('\0') || path.len() > 4096 {
        return Err(format!("{path:?} is not a usable path"));
    }
    if SYSTEM_PATHS.contains(&trimmed)
        || SYSTEM_TREES
            .iter()
            .any(|tree| trimmed.starts_with(&format!("{tree}/")))
    {
        return Err(format!(
            "{path:?} would shadow a system directory of the machine: mount the volume at a directory of its own, such as /data"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod mount_path_tests {
    use super::mount_path;

    #[test]
    fn mount_paths_must_not_shadow_the_system() {
        for good in [
            "/data",
            "/var/lib/postgresql/data",
            "/app/uploads/",
            "/root/data",
        ] {
            assert!(mount_path(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "data",
            "/",
            "//",
            "/proc",
            "/proc/x",
            "/sys",
            "/dev/shm",
            "/etc",
            "/usr/",
            "/.fly",
            "/var",
            "/a/../etc",
            "/a/./b",
            "/a//b",
        ] {
            assert!(mount_path(bad).is_err(), "{bad}");
        }
    }
}
