//! `$PATH` lookup of the entrypoint, as a shell (or Go's `exec.LookPath`) does it.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// `PATH` when the environment has none (Docker's default).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Debug, Error, PartialEq, Eq)]
pub enum LookupError {
    #[error("executable file not found in $PATH: {0}")]
    NotFound(String),
    #[error("empty executable name")]
    Empty,
}

/// Finds `name` in the colon-separated `path` (`DEFAULT_PATH` when `None`).
///
/// A name containing `/` is returned unchanged. Empty or relative `PATH` entries are
/// taken relative to `workdir`, the directory the program will run in.
pub fn lookup_path(name: &str, path: Option<&str>, workdir: &Path) -> Result<PathBuf, LookupError> {
    if name.is_empty() {
        return Err(LookupError::Empty);
    }
    if name.contains('/') {
        return Ok(PathBuf::from(name));
    }
    for dir in path.unwrap_or(DEFAULT_PATH).split(':') {
        let dir = if dir.is_empty() {
            Path::new(".")
        } else {
            Path::new(dir)
        };
        let candidate = dir.join(name);
        if is_executable(&workdir.join(&candidate)) {
            return Ok(candidate);
        }
    }
    Err(LookupError::NotFound(name.to_string()))
}

/// Whether `path` (following symlinks) is a non-directory with an execute bit set.
pub fn is_executable(path: &Path) -> bool {
    match std::fs::metadata(path) {
        Ok(meta) => !meta.is_dir() && meta.permissions().mode() & 0o111 != 0,
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    fn touch(path: &Path, mode: u32) {
        fs::write(path, b"#!/bin/sh\n").unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn finds_first_executable_in_path_order() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b, c) = (
            tmp.path().join("a"),
            tmp.path().join("b"),
            tmp.path().join("c"),
        );
        for d in [&a, &b, &c] {
            fs::create_dir(d).unwrap();
        }
        touch(&a.join("app"), 0o644); // not executable: skipped
        fs::create_dir(b.join("app")).unwrap(); // a directory: skipped
        touch(&c.join("app"), 0o755);
        touch(&b.join("other"), 0o700);
        let path = format!("{}:{}:{}", a.display(), b.display(), c.display());
        assert_eq!(
            lookup_path("app", Some(&path), Path::new("/")),
            Ok(c.join("app"))
        );
        assert_eq!(
            lookup_path("other", Some(&path), Path::new("/")),
            Ok(b.join("other"))
        );
        assert_eq!(
            lookup_path("missing", Some(&path), Path::new("/")),
            Err(LookupError::NotFound("missing".into()))
        );
    }

    #[test]
    fn not_found_message() {
        assert_eq!(
            LookupError::NotFound("foo".into()).to_string(),
            "executable file not found in $PATH: foo"
        );
    }

    #[test]
    fn names_with_slash_are_not_looked_up() {
        assert_eq!(
            lookup_path("./run.sh", Some(""), Path::new("/")),
            Ok(PathBuf::from("./run.sh"))
        );
        assert_eq!(
            lookup_path("/no/such", None, Path::new("/")),
            Ok(PathBuf::from("/no/such"))
        );
        assert_eq!(
            lookup_path("", None, Path::new("/")),
            Err(LookupError::Empty)
        );
    }

    #[test]
    fn relative_entries_resolve_against_workdir() {
        let tmp = tempfile::tempdir().unwrap();
        fs::create_dir(tmp.path().join("bin")).unwrap();
        touch(&tmp.path().join("bin/tool"), 0o755);
        touch(&tmp.path().join("here"), 0o755);
        assert_eq!(
            lookup_path("tool", Some("/nonexistent:bin"), tmp.path()),
            Ok(PathBuf::from("bin/tool"))
        );
        assert_eq!(
            lookup_path("here", Some("/nonexistent::"), tmp.path()),
            Ok(PathBuf::from("./here"))
        );
    }

    #[test]
    fn default_path_is_used() {
        // /bin/sh exists on any host that runs these tests.
        assert!(
            lookup_path("sh", None, Path::new("/"))
                .unwrap()
                .is_absolute()
        );
    }
}
