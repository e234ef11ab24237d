//! PID 1 inside every machine.
//!
//! [`run`] reads an [`InitConfig`] (fd 3, else `/.fly/init.json`), prepares the machine
//! (mounts, hostname, `/etc/hosts`, `/etc/resolv.conf`, files), resolves the user and the
//! executable without relying on anything in the image, starts the entrypoint, and then
//! stays as PID 1: forwarding signals, reaping zombies, and exiting with the entrypoint's
//! status after ending every other process.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use aloft_api::internal::InitConfig;
use nix::errno::Errno;
use thiserror::Error;

pub mod config;
pub mod path;
pub mod procfs;
pub mod setup;
pub mod supervise;
pub mod user;
pub mod vm;

pub use config::{CONFIG_FD, CONFIG_FILE, load_config, parse_config};
pub use path::{DEFAULT_PATH, LookupError, lookup_path};
pub use supervise::{ChildExit, ChildStage, FORWARDED_SIGNALS, signal_name};
pub use user::{
    ExecUser, GroupEntry, PasswdEntry, UserError, parse_group, parse_passwd, resolve_user,
};

use supervise::{ChildSpec, Supervisor};

/// Where the runtime puts init in every machine.
pub const INIT_PATH: &str = "/.fly/init";

/// Exit code for anything that goes wrong before the entrypoint runs.
pub const SETUP_FAILURE_EXIT: i32 = 127;

#[derive(Debug, Error)]
pub enum InitError {
    #[error("no config: fd 3 is not open and {path}: {source}")]
    NoConfig { path: String, source: io::Error },
    #[error("reading config from fd 3: {source}")]
    ReadConfig { source: io::Error },
    #[error("invalid config: {0}")]
    ParseConfig(#[from] serde_json::Error),
    #[error("invalid config: {0}")]
    Invalid(String),
    #[error("mount {target}: {source}")]
    Mount { target: String, source: Errno },
    #[error("{path}: {source}")]
    Io { path: String, source: io::Error },
    #[error(transparent)]
    User(#[from] UserError),
    #[error(transparent)]
    Lookup(#[from] LookupError),
    #[error("{what}: {source}")]
    Sys { what: String, source: Errno },
    #[error("starting {path}: {}: {}", stage_name(*.stage), .errno.desc())]
    Child {
        stage: ChildStage,
        path: String,
        errno: Errno,
    },
}

fn stage_name(stage: ChildStage) -> &'static str {
    match stage {
        ChildStage::Setsid => "setsid",
        ChildStage::Setgroups => "setgroups",
        ChildStage::Setgid => "setgid",
        ChildStage::Setuid => "setuid",
        ChildStage::Chdir => "chdir to workdir",
        ChildStage::Exec => "exec",
    }
}

impl InitError {
    /// The code init exits with for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            InitError::Child { stage, errno, .. } => supervise::exit_code_for(*stage, *errno),
            _ => SETUP_FAILURE_EXIT,
        }
    }
}

/// Runs init to completion and exits the process with the main child's exit code (or
/// 128 + signal), or prints `init: <error>` and exits 126/127 when setup fails.
pub fn run() -> ! {
    let code = match run_inner() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("init: {e}");
            e.exit_code()
        }
    };
    std::process::exit(code)
}

fn run_inner() -> Result<i32, InitError> {
    if std::process::id() == 1
        && std::env::args_os()
            .next()
            .is_some_and(|a| a == vm::boot::STAGE_ONE_PATH)
    {
        vm::boot::boot();
    }
    if let Some(fd) = std::env::var(vm::CHANNEL_ENV)
        .ok()
        .and_then(|v| v.parse::<std::os::fd::RawFd>().ok())
    {
        vm::guest::run(fd);
    }
    // Block signals first, so a stop request during setup reaches the child once started;
    // take fd 3 before opening anything that could be given that number.
    supervise::block_signals()?;
    let config = load_config()?;
    let mut sup = Supervisor::new()?;
    run_config(&mut sup, &config)
}

/// Like [`run`] with an already loaded config; returns the exit code instead of exiting.
pub fn run_with_config(config: &InitConfig) -> Result<i32, InitError> {
    let mut sup = Supervisor::new()?;
    run_config(&mut sup, config)
}

fn run_config(sup: &mut Supervisor, config: &InitConfig) -> Result<i32, InitError> {
    let child = start_main(sup, config)?;
    let exit = sup.supervise(child);
    eprintln!("init: {}", exit.describe());
    sup.shutdown(child);
    Ok(exit.exit_code())
}

/// Prepares the machine as the config says and starts the main child.
pub(crate) fn start_main(
    sup: &mut Supervisor,
    config: &InitConfig,
) -> Result<nix::unistd::Pid, InitError> {
    let root = Path::new("/");
    if config.mount_standard_filesystems {
        setup::mount_standard_filesystems()?;
    }
    setup::set_hostname(&config.hostname);
    setup::write_etc(root, &config.etc_hosts, &config.nameservers)?;
    setup::write_files(root, &config.files)?;

    let passwd = read_optional("/etc/passwd")?;
    let group = read_optional("/etc/group")?;
    let user = resolve_user(&config.user, passwd.as_deref(), group.as_deref())?;

    let workdir = root.join(if config.workdir.is_empty() {
        "/"
    } else {
        config.workdir.as_str()
    });
    if !workdir.is_dir() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .create(&workdir)
            .map_err(|source| InitError::Io {
                path: workdir.display().to_string(),
                source,
            })?;
    }
    let env = child_env(&config.env, &user);
    let program = lookup_path(
        &config.argv[0],
        env.get("PATH").map(String::as_str),
        &workdir,
    )?;
    let spec = child_spec(&program, &config.argv, &env, &workdir, &user)?;

    sup.release_terminal();
    sup.spawn(&spec)
}

fn read_optional(path: &str) -> Result<Option<String>, InitError> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(String::from_utf8_lossy(&bytes).into_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(InitError::Io {
            path: path.to_string(),
            source,
        }),
    }
}

/// The child's environment: exactly `env`, plus `HOME` from the user when it has none.
pub fn child_env(env: &BTreeMap<String, String>, user: &ExecUser) -> BTreeMap<String, String> {
    let mut env = env.clone();
    env.entry("HOME".to_string())
        .or_insert_with(|| user.home.clone());
    env
}

fn cstring(what: &str, bytes: impl Into<Vec<u8>>) -> Result<CString, InitError> {
    CString::new(bytes).map_err(|_| InitError::Invalid(format!("{what} contains a NUL byte")))
}

fn child_spec(
    program: &Path,
    argv: &[String],
    env: &BTreeMap<String, String>,
    workdir: &Path,
    user: &ExecUser,
) -> Result<ChildSpec, InitError> {
    let mut envp = Vec::with_capacity(env.len());
    for (k, v) in env {
        if k.is_empty() || k.contains('=') {
            return Err(InitError::Invalid(format!(
                "environment variable name {k:?}"
            )));
        }
        envp.push(cstring("environment", format!("{k}={v}"))?);
    }
    let mut spec = ChildSpec {
        path: cstring("argv[0]", program.as_os_str().as_bytes())?,
        argv: argv
            .iter()
            .map(|a| cstring("argv", a.as_bytes()))
            .collect::<Result<_, _>>()?,
        envp,
        workdir: cstring("workdir", workdir.as_os_str().as_bytes())?,
        uid: user.uid,
        gid: user.gid,
        groups: user.groups.clone(),
        keep_groups: false,
        keep_gid: false,
        keep_uid: false,
    };
    spec.skip_unneeded_id_changes();
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn root_user() -> ExecUser {
        ExecUser {
            uid: 0,
            gid: 0,
            groups: vec![],
            home: "/root".into(),
        }
    }

    #[test]
    fn home_is_added_only_when_missing() {
        let mut env = BTreeMap::from([("A".to_string(), "1".to_string())]);
        assert_eq!(
            child_env(&env, &root_user())
                .get("HOME")
                .map(String::as_str),
            Some("/root")
        );
        env.insert("HOME".into(), "/custom".into());
        let out = child_env(&env, &root_user());
        assert_eq!(out, env);
    }

    #[test]
    fn spec_rejects_bad_env_and_args() {
        let wd = PathBuf::from("/");
        let argv = vec!["x".to_string()];
        let bad_name = BTreeMap::from([("A=B".to_string(), "1".to_string())]);
        assert!(child_spec(Path::new("/x"), &argv, &bad_name, &wd, &root_user()).is_err());
        let nul = BTreeMap::from([("A".to_string(), "a\0b".to_string())]);
        assert!(child_spec(Path::new("/x"), &argv, &nul, &wd, &root_user()).is_err());
        let ok = BTreeMap::from([("A".to_string(), "".to_string())]);
        let spec = child_spec(Path::new("/x"), &argv, &ok, &wd, &root_user()).unwrap();
        assert_eq!(spec.envp, vec![CString::new("A=").unwrap()]);
    }

    #[test]
    fn error_messages_and_codes() {
        let e = InitError::Child {
            stage: ChildStage::Exec,
            path: "/app".into(),
            errno: Errno::EACCES,
        };
        assert_eq!(e.to_string(), "starting /app: exec: Permission denied");
        assert_eq!(e.exit_code(), 126);
        let e = InitError::from(LookupError::NotFound("app".into()));
        assert_eq!(e.to_string(), "executable file not found in $PATH: app");
        assert_eq!(e.exit_code(), 127);
    }
}
