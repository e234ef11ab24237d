//! Files and directories for the platform's eyes only: the data dir is 0700 (0710 once the
//! agent lets its machines' root traverse it), and the databases and keys in it are 0600,
//! so other users on the host read nothing of them.

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Creates `dir` (and missing parents) as 0700, and closes an existing one to other users.
/// A group's bare traversal (0010, no reading) is kept: the agent grants it to the user
/// namespace its machines run in, whose root passes through to their root filesystems.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let traversal = std::fs::metadata(dir)?.permissions().mode() & 0o010;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700 | traversal))
}

/// Makes `path` a file only its owner reads (creating it empty if missing), before a
/// database is opened on it: SQLite gives its `-wal` and `-shm` files the database's mode.
pub fn create_private_file(path: &Path) -> std::io::Result<()> {
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    for suffix in ["-wal", "-shm", "-journal"] {
        let mut companion = path.as_os_str().to_owned();
        companion.push(suffix);
        match std::fs::set_permissions(&companion, std::fs::Permissions::from_mode(0o600)) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => return Err(err),
            _ => {}
        }
    }
    Ok(())
}
