//! Getting the `InitConfig`: from fd 3 (a pipe from the runtime), else `/.fly/init.json`.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{FromRawFd, RawFd};

use aloft_api::internal::InitConfig;

use crate::InitError;

/// The descriptor the runtime hands the config on (`runc run --preserve-fds 1`).
pub const CONFIG_FD: RawFd = 3;
/// Where the config is read from when fd 3 is not open (removed after reading).
pub const CONFIG_FILE: &str = "/.fly/init.json";

/// Reads the config from fd 3 until EOF, or from `CONFIG_FILE`, which is then removed.
/// fd 3 is closed either way, so the main child never inherits it.
pub fn load_config() -> Result<InitConfig, InitError> {
    if let Some(bytes) = read_config_fd()? {
        return parse_config(&bytes);
    }
    let bytes = std::fs::read(CONFIG_FILE).map_err(|source| InitError::NoConfig {
        path: CONFIG_FILE.to_string(),
        source,
    })?;
    if let Err(e) = std::fs::remove_file(CONFIG_FILE) {
        eprintln!("init: warning: could not remove {CONFIG_FILE}: {e}");
    }
    parse_config(&bytes)
}

/// The config bytes on fd 3, or `None` if fd 3 is not open or is not a pipe, socket or
/// regular file (something leaked from the runtime rather than a config).
fn read_config_fd() -> Result<Option<Vec<u8>>, InitError> {
    // SAFETY: F_GETFD only queries the descriptor table.
    if unsafe { libc::fcntl(CONFIG_FD, libc::F_GETFD) } < 0 {
        return Ok(None);
    }
    // SAFETY: fd 3 is open (checked above) and nothing else in init owns it; the File
    // takes ownership and closes it when dropped.
    let mut file = unsafe { File::from_raw_fd(CONFIG_FD) };
    let kind = file.metadata().map(|m| m.file_type());
    let readable = kind.as_ref().is_ok_and(|t| {
        use std::os::unix::fs::FileTypeExt;
        t.is_fifo() || t.is_socket() || t.is_file()
    });
    if !readable {
        return Ok(None);
    }
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)
        .map_err(|source| InitError::ReadConfig { source })?;
    if bytes.is_empty() {
        return Err(InitError::ReadConfig {
            source: io::Error::new(io::ErrorKind::UnexpectedEof, "fd 3 gave no config"),
        });
    }
    Ok(Some(bytes))
}

/// Parses and checks a config.
pub fn parse_config(bytes: &[u8]) -> Result<InitConfig, InitError> {
    let config: InitConfig = serde_json::from_slice(bytes)?;
    match config.argv.first() {
        None => return Err(InitError::Invalid("argv is empty: nothing to run".into())),
        Some(a) if a.is_empty() => return Err(InitError::Invalid("argv[0] is empty".into())),
        Some(_) => {}
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_minimal_config() {
        let c =
            parse_config(br#"{"argv":["/bin/app","-x"],"env":{"A":"1"},"hostname":"h"}"#).unwrap();
        assert_eq!(c.argv, vec!["/bin/app", "-x"]);
        assert_eq!(c.env.get("A").map(String::as_str), Some("1"));
        assert!(c.user.is_empty() && c.files.is_empty() && !c.mount_standard_filesystems);
    }

    #[test]
    fn rejects_bad_configs() {
        let err = |b: &[u8]| parse_config(b).unwrap_err().to_string();
        assert!(err(b"not json").starts_with("invalid config: "));
        assert!(err(br#"{"argv":[],"env":{},"hostname":"h"}"#).contains("argv is empty"));
        assert!(err(br#"{"argv":[""],"env":{},"hostname":"h"}"#).contains("argv[0] is empty"));
        assert!(err(br#"{"env":{},"hostname":"h"}"#).contains("missing field `argv`"));
    }
}
