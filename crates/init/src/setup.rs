//! Preparing the machine before the entrypoint starts: standard mounts, hostname,
//! `/etc/hosts`, `/etc/resolv.conf` and the config's files.

use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use aloft_api::internal::InitFile;
use base64::Engine;
use nix::mount::{MsFlags, mount};

use crate::InitError;

struct StandardMount {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
}

const NOSUID_NODEV_NOEXEC: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);

const STANDARD_MOUNTS: &[StandardMount] = &[
    StandardMount {
        source: "proc",
        target: "/proc",
        fstype: "proc",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    StandardMount {
        source: "sysfs",
        target: "/sys",
        fstype: "sysfs",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    StandardMount {
        source: "devtmpfs",
        target: "/dev",
        fstype: "devtmpfs",
        flags: MsFlags::MS_NOSUID,
        data: Some("mode=0755"),
    },
    StandardMount {
        source: "devpts",
        target: "/dev/pts",
        fstype: "devpts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        data: Some("mode=0620,gid=5,ptmxmode=0666"),
    },
    StandardMount {
        source: "shm",
        target: "/dev/shm",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=1777"),
    },
    StandardMount {
        source: "tmpfs",
        target: "/run",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=0755"),
    },
];

/// Symlinks that devtmpfs lacks but programs expect.
const DEV_LINKS: &[(&str, &str)] = &[
    ("/proc/self/fd", "/dev/fd"),
    ("/proc/self/fd/0", "/dev/stdin"),
    ("/proc/self/fd/1", "/dev/stdout"),
    ("/proc/self/fd/2", "/dev/stderr"),
];

fn io_err(path: impl AsRef<Path>) -> impl FnOnce(io::Error) -> InitError {
    let path = path.as_ref().display().to_string();
    move |source| InitError::Io { path, source }
}

fn mkdir_p(path: &Path) -> Result<(), InitError> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(path)
        .map_err(io_err(path))
}

/// Mount points listed in `/proc/self/mountinfo` content (octal escapes decoded).
pub fn parse_mount_points(mountinfo: &str) -> Vec<String> {
    mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(unescape_mount_path)
        .collect()
}

fn unescape_mount_path(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                let value =
                    (d[0] - b'0') as u32 * 64 + (d[1] - b'0') as u32 * 8 + (d[2] - b'0') as u32;
                out.push(value as u8);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Mounts /proc, /sys, /dev, /dev/pts, /dev/shm and /run, skipping those already mounted.
pub fn mount_standard_filesystems() -> Result<(), InitError> {
    for m in STANDARD_MOUNTS {
        let mounted = if m.target == "/proc" {
            Path::new("/proc/self/mountinfo").exists()
        } else {
            let info = fs::read_to_string("/proc/self/mountinfo")
                .map_err(io_err("/proc/self/mountinfo"))?;
            parse_mount_points(&info).iter().any(|p| p == m.target)
        };
        if mounted {
            continue;
        }
        mkdir_p(Path::new(m.target))?;
        mount(Some(m.source), m.target, Some(m.fstype), m.flags, m.data).map_err(|source| {
            InitError::Mount {
                target: m.target.to_string(),
                source,
            }
        })?;
    }
    for (target, link) in DEV_LINKS {
        match std::os::unix::fs::symlink(target, link) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err(link)(e)),
        }
    }
    Ok(())
}

/// Sets the hostname unless it already is `hostname`. Failure is only a warning: a
/// container without CAP_SYS_ADMIN still runs, with the hostname its runtime gave it.
pub fn set_hostname(hostname: &str) {
    if hostname.is_empty() {
        return;
    }
    if nix::unistd::gethostname().is_ok_and(|h| h == hostname) {
        return;
    }
    if let Err(e) = nix::unistd::sethostname(hostname) {
        eprintln!("init: warning: sethostname {hostname:?}: {e}");
    }
}

fn check_line_value(what: &str, value: &str) -> Result<(), InitError> {
    if value.trim().is_empty() || value.contains(['\n', '\r', '\0']) {
        return Err(InitError::Invalid(format!("{what} {value:?}")));
    }
    Ok(())
}

/// The content of `/etc/hosts`.
pub fn render_etc_hosts(entries: &[(String, String)]) -> Result<String, InitError> {
    let mut out = String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    for (address, names) in entries {
        check_line_value("etc_hosts address", address)?;
        check_line_value("etc_hosts name", names)?;
        if address.contains(char::is_whitespace) {
            return Err(InitError::Invalid(format!("etc_hosts address {address:?}")));
        }
        out.push_str(&format!("{address}\t{}\n", names.trim()));
    }
    Ok(out)
}

/// The content of `/etc/resolv.conf`; `None` leaves the file alone.
pub fn render_resolv_conf(nameservers: &[String]) -> Result<Option<String>, InitError> {
    if nameservers.is_empty() {
        return Ok(None);
    }
    let mut out = String::new();
    for ns in nameservers {
        check_line_value("nameserver", ns)?;
        if ns.contains(char::is_whitespace) {
            return Err(InitError::Invalid(format!("nameserver {ns:?}")));
        }
        out.push_str(&format!("nameserver {ns}\n"));
    }
    Ok(Some(out))
}

/// Writes `content` to `path` with exactly `mode`, creating parent directories.
fn write_file(path: &Path, content: &[u8], mode: u32) -> Result<(), InitError> {
    if let Some(parent) = path.parent() {
        mkdir_p(parent)?;
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(io_err(path))?;
    file.write_all(content).map_err(io_err(path))?;
    // The file may have existed with another mode, and `open` applies the umask.
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io_err(path))
}

/// Writes /etc/hosts and /etc/resolv.conf (the latter only when there are nameservers).
pub fn write_etc(
    root: &Path,
    etc_hosts: &[(String, String)],
    nameservers: &[String],
) -> Result<(), InitError> {
    let hosts = render_etc_hosts(etc_hosts)?;
    let resolv = render_resolv_conf(nameservers)?;
    let etc = root.join("etc");
    mkdir_p(&etc)?;
    write_file(&etc.join("hosts"), hosts.as_bytes(), 0o644)?;
    if let Some(resolv) = resolv {
        write_file(&etc.join("resolv.conf"), resolv.as_bytes(), 0o644)?;
    }
    Ok(())
}

/// Decodes and writes the config's files under `root`. Paths must be absolute.
pub fn write_files(root: &Path, files: &[InitFile]) -> Result<(), InitError> {
    for f in files {
        let relative = f
            .path
            .strip_prefix('/')
            .filter(|p| !p.is_empty() && !p.contains('\0'))
            .ok_or_else(|| {
                InitError::Invalid(format!("file path {:?} must be absolute", f.path))
            })?;
        let content = base64::engine::general_purpose::STANDARD
            .decode(f.content.trim())
            .map_err(|e| {
                InitError::Invalid(format!("file {}: content is not base64: {e}", f.path))
            })?;
        let mode = f.mode.unwrap_or(0o644);
        if mode > 0o7777 {
            return Err(InitError::Invalid(format!(
                "file {}: mode {mode:#o}",
                f.path
            )));
        }
        write_file(&root.join(relative), &content, mode)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    #[test]
    fn mountinfo_mount_points() {
        let info = "22 27 0:21 / /proc rw,relatime - proc proc rw\n\
                    24 27 0:6 / /dev rw,relatime - devtmpfs devtmpfs rw,mode=755\n\
                    30 27 0:40 / /mnt/with\\040space rw - tmpfs tmpfs rw\n";
        assert_eq!(
            parse_mount_points(info),
            vec!["/proc", "/dev", "/mnt/with space"]
        );
        assert_eq!(unescape_mount_path("a\\134b\\011"), "a\\b\t");
        assert_eq!(unescape_mount_path("trailing\\04"), "trailing\\04");
    }

    #[test]
    fn etc_hosts_content() {
        let hosts = render_etc_hosts(&[
            ("fdaa:0:1::2".into(), "m1.vm.app.internal".into()),
            ("10.0.0.1".into(), "gw gateway".into()),
        ])
        .unwrap();
        assert_eq!(
            hosts,
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n\
             fdaa:0:1::2\tm1.vm.app.internal\n10.0.0.1\tgw gateway\n"
        );
        assert!(render_etc_hosts(&[("1.2.3.4".into(), "a\n5.6.7.8 evil".into())]).is_err());
        assert!(render_etc_hosts(&[("1.2.3.4 x".into(), "a".into())]).is_err());
        assert!(render_etc_hosts(&[("".into(), "a".into())]).is_err());
    }

    #[test]
    fn resolv_conf_content() {
        assert_eq!(render_resolv_conf(&[]).unwrap(), None);
        assert_eq!(
            render_resolv_conf(&["fdaa::3".into(), "8.8.8.8".into()])
                .unwrap()
                .as_deref(),
            Some("nameserver fdaa::3\nnameserver 8.8.8.8\n")
        );
        assert!(render_resolv_conf(&["1.1.1.1\noptions x".into()]).is_err());
    }

    #[test]
    fn writes_etc_and_files_under_root() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        write_etc(root, &[("10.1.1.1".into(), "db".into())], &[]).unwrap();
        assert!(
            fs::read_to_string(root.join("etc/hosts"))
                .unwrap()
                .ends_with("10.1.1.1\tdb\n")
        );
        assert!(!root.join("etc/resolv.conf").exists());
        write_etc(root, &[], &["fdaa::3".into()]).unwrap();
        assert_eq!(
            fs::read_to_string(root.join("etc/resolv.conf")).unwrap(),
            "nameserver fdaa::3\n"
        );

        let files = vec![
            InitFile {
                path: "/a/b/c.txt".into(),
                content: "aGVsbG8=".into(),
                mode: None,
            },
            InitFile {
                path: "/run.sh".into(),
                content: "".into(),
                mode: Some(0o4755),
            },
        ];
        write_files(root, &files).unwrap();
        let meta = fs::metadata(root.join("a/b/c.txt")).unwrap();
        assert_eq!(fs::read(root.join("a/b/c.txt")).unwrap(), b"hello");
        assert_eq!(meta.mode() & 0o7777, 0o644);
        assert_eq!(
            fs::metadata(root.join("a/b")).unwrap().mode() & 0o777,
            0o755
        );
        assert_eq!(
            fs::metadata(root.join("run.sh")).unwrap().mode() & 0o7777,
            0o4755
        );
        // Rewriting an existing file replaces content and mode.
        let again = vec![InitFile {
            path: "/a/b/c.txt".into(),
            content: "eA==".into(),
            mode: Some(0o600),
        }];
        write_files(root, &again).unwrap();
        assert_eq!(fs::read(root.join("a/b/c.txt")).unwrap(), b"x");
        assert_eq!(
            fs::metadata(root.join("a/b/c.txt")).unwrap().mode() & 0o7777,
            0o600
        );
    }

    #[test]
    fn rejects_bad_files() {
        let tmp = tempfile::tempdir().unwrap();
        let bad = |path: &str, content: &str, mode| {
            write_files(
                tmp.path(),
                &[InitFile {
                    path: path.into(),
                    content: content.into(),
                    mode,
                }],
            )
            .unwrap_err()
        };
        assert!(
            bad("relative", "", None)
                .to_string()
                .contains("must be absolute")
        );
        assert!(bad("/", "", None).to_string().contains("must be absolute"));
        assert!(bad("/x", "!!!", None).to_string().contains("not base64"));
        assert!(bad("/x", "", Some(0o17777)).to_string().contains("mode"));
    }
}
