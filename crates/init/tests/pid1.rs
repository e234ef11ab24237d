//! Runs the real init as PID 1 of a new PID + mount + UTS namespace, chrooted into a
//! busybox root filesystem (and once under runc), and checks what it does.
//!
//! Needs root, `unshare` (util-linux) and a static busybox (`busybox-static`); runc for
//! the runc test. Each test prints why and passes when something is missing.

use std::fs;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const INIT: &str = env!("CARGO_BIN_EXE_aloft-init-test");
const BUSYBOX: &str = "/bin/busybox";
const APPLETS: &[&str] = &[
    "sh", "env", "id", "hostname", "cat", "sleep", "stat", "pwd", "kill", "ls", "echo", "grep",
    "setsid", "true",
];

/// Held while writing a file that will be executed and while forking: a child forked
/// while another test's write descriptor is open would keep it open until its exec, and
/// executing that file meanwhile fails with ETXTBSY.
static FORK_LOCK: Mutex<()> = Mutex::new(());

fn forking<T>(f: impl FnOnce() -> T) -> T {
    let _guard = FORK_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    f()
}

fn output(cmd: &mut Command) -> std::io::Result<Output> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    forking(|| cmd.spawn())?.wait_with_output()
}

fn skip_reason() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("needs root".into());
    }
    if !fs::read(BUSYBOX).is_ok_and(|elf| is_static_elf(&elf)) {
        return Some(format!(
            "needs a static {BUSYBOX} (apt-get install -y busybox-static)"
        ));
    }
    if output(Command::new("unshare").arg("--version")).is_err() {
        return Some("needs unshare (util-linux)".into());
    }
    None
}

/// A 64-bit ELF without a PT_INTERP program header needs no dynamic loader.
fn is_static_elf(elf: &[u8]) -> bool {
    let le_u16 = |at: usize| {
        elf.get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
    };
    let le_u32 = |at: usize| {
        elf.get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let le_u64 = |at: usize| {
        elf.get(at..at + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    if !elf.starts_with(b"\x7fELF\x02\x01") {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (le_u64(0x20), le_u16(0x36), le_u16(0x38))
    else {
        return false;
    };
    (0..phnum).all(|i| le_u32(phoff as usize + i * phentsize).is_some_and(|kind| kind != 3))
}

macro_rules! rootfs_or_skip {
    () => {
        match skip_reason() {
            Some(why) => {
                aloft_testkit::skip(&why);
                return;
            }
            None => Rootfs::new(),
        }
    };
}

struct Rootfs {
    dir: tempfile::TempDir,
    /// Outside the root, so the machine cannot see its own captured output.
    logs: tempfile::TempDir,
    runs: std::cell::Cell<u32>,
}

struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    elapsed: Duration,
}

impl Outcome {
    fn lines(&self) -> Vec<&str> {
        self.stdout.lines().collect()
    }
}

/// How the config reaches init.
enum Deliver {
    Fd3,
    File,
}

impl Rootfs {
    fn new() -> Rootfs {
        forking(Rootfs::build)
    }

    fn build() -> Rootfs {
        let dir = tempfile::Builder::new()
            .prefix("aloft-init-test")
            .tempdir()
            .unwrap();
        let root = dir.path();
        for d in ["bin", "etc", ".fly", "proc", "tmp"] {
            fs::create_dir_all(root.join(d)).unwrap();
        }
        fs::set_permissions(root.join("tmp"), fs::Permissions::from_mode(0o1777)).unwrap();
        // busybox sh reads background jobs' stdin from /dev/null.
        fs::create_dir(root.join("dev")).unwrap();
        let null =
            std::ffi::CString::new(root.join("dev/null").as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mknod on a valid C string.
        let rc = unsafe { libc::mknod(null.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, 3)) };
        assert_eq!(
            rc,
            0,
            "mknod /dev/null: {}",
            std::io::Error::last_os_error()
        );
        fs::copy(BUSYBOX, root.join("bin/busybox")).unwrap();
        for applet in APPLETS {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
        }
        fs::copy(INIT, root.join(".fly/init")).unwrap();
        fs::write(
            root.join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:App:/home/app:/bin/sh\n",
        )
        .unwrap();
        fs::write(
            root.join("etc/group"),
            "root:x:0:\napp:x:1000:\nextra:x:2000:app\nother:x:3000:\n",
        )
        .unwrap();
        let logs = tempfile::Builder::new()
            .prefix("aloft-init-logs")
            .tempdir()
            .unwrap();
        Rootfs {
            dir,
            logs,
            runs: Default::default(),
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn command(&self, mount_proc: bool) -> Command {
        let mut cmd = Command::new("unshare");
        cmd.args(["--pid", "--fork", "--mount", "--uts"]);
        if mount_proc {
            cmd.arg("--mount-proc");
        }
        cmd.arg(format!("--root={}", self.path().display()))
            .arg("/.fly/init");
        cmd
    }

    fn spawn(
        &self,
        mut cmd: Command,
        config: &Value,
        deliver: Deliver,
    ) -> (Child, PathBuf, PathBuf) {
        let run = self.runs.get() + 1;
        self.runs.set(run);
        let out = self.logs.path().join(format!("{run}.out"));
        let err = self.logs.path().join(format!("{run}.err"));
        cmd.stdin(Stdio::null())
            .stdout(fs::File::create(&out).unwrap())
            .stderr(fs::File::create(&err).unwrap());
        let text = serde_json::to_vec(config).unwrap();
        let child = match deliver {
            Deliver::Fd3 => {
                let (rd, wr) = cloexec_pipe();
                fs::File::from(wr).write_all(&text).unwrap();
                let rd_fd = rd.as_raw_fd();
                // SAFETY: only dup2/fcntl between fork and exec.
                unsafe {
                    cmd.pre_exec(move || {
                        if rd_fd == 3 {
                            libc::fcntl(3, libc::F_SETFD, 0);
                        } else if libc::dup2(rd_fd, 3) < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        Ok(())
                    });
                }
                let child = forking(|| cmd.spawn()).unwrap();
                drop(rd);
                child
            }
            Deliver::File => {
                fs::write(self.path().join(".fly/init.json"), &text).unwrap();
                // SAFETY: only close between fork and exec.
                unsafe {
                    cmd.pre_exec(|| {
                        libc::close(3);
                        Ok(())
                    });
                }
                forking(|| cmd.spawn()).unwrap()
            }
        };
        (child, out, err)
    }

    fn run_with(&self, cmd: Command, config: &Value, deliver: Deliver) -> Outcome {
        let start = Instant::now();
        let (child, out, err) = self.spawn(cmd, config, deliver);
        let code = wait_timeout(child, Duration::from_secs(30));
        let outcome = Outcome {
            code,
            stdout: fs::read_to_string(&out).unwrap_or_default(),
            stderr: fs::read_to_string(&err).unwrap_or_default(),
            elapsed: start.elapsed(),
        };
        eprintln!(
            "--- stdout\n{}--- stderr\n{}---",
            outcome.stdout, outcome.stderr
        );
        outcome
    }

    fn run(&self, config: &Value) -> Outcome {
        self.run_with(self.command(true), config, Deliver::Fd3)
    }
}

fn cloexec_pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: fds has room for two descriptors.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: fresh descriptors owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

fn wait_timeout(mut child: Child, timeout: Duration) -> Option<i32> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("init did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn wait_for_file_text(path: &Path, needle: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if fs::read_to_string(path).is_ok_and(|s| s.contains(needle)) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// The pid (in our namespace) of a child of `parent`: init, forked by `unshare --fork`.
fn child_of(parent: u32) -> Option<i32> {
    for entry in fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let after_comm = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
        let ppid = after_comm
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(parent) {
            return Some(pid);
        }
    }
    None
}

fn sh(script: &str) -> Value {
    json!(["sh", "-c", script])
}

fn base_config(argv: Value) -> Value {
    json!({ "argv": argv, "env": { "PATH": "/bin" }, "hostname": "test-machine" })
}

#[test]
fn environment_is_passed_exactly() {
    let rootfs = rootfs_or_skip!();
    let config = json!({
        "argv": ["env"],
        "env": { "PATH": "/bin", "FOO": "bar baz", "EMPTY": "", "HOME": "/custom", "FLY_APP_NAME": "demo" },
        "hostname": "m",
    });
    let out = rootfs.run(&config);
    assert_eq!(out.code, Some(0));
    let mut lines = out.lines();
    lines.sort();
    assert_eq!(
        lines,
        vec![
            "EMPTY=",
            "FLY_APP_NAME=demo",
            "FOO=bar baz",
            "HOME=/custom",
            "PATH=/bin"
        ]
    );

    // Without HOME, the user's home directory from /etc/passwd is added, nothing else.
    let config =
        json!({ "argv": ["/bin/env"], "env": { "A": "1" }, "user": "app", "hostname": "m" });
    let out = rootfs.run(&config);
    assert_eq!(out.code, Some(0));
    let mut lines = out.lines();
    lines.sort();
    assert_eq!(lines, vec!["A=1", "HOME=/home/app"]);
}

#[test]
fn switches_user_from_the_images_passwd() {
    let rootfs = rootfs_or_skip!();
    let id = "echo $(id -u) $(id -g) $(id -G)";
    let run = |user: &str| {
        let mut config = base_config(sh(id));
        config["user"] = json!(user);
        rootfs.run(&config)
    };
    let out = run("app");
    assert_eq!(out.code, Some(0));
    // busybox `id -G` lists the primary group first.
    assert_eq!(out.stdout.trim(), "1000 1000 1000 2000");
    let out = run("app:other");
    assert_eq!(out.stdout.trim(), "1000 3000 3000");
    let out = run("4242:4343");
    assert_eq!(out.stdout.trim(), "4242 4343 4343");
    let out = run("");
    assert_eq!(out.stdout.trim(), "0 0 0");

    let out = run("ghost");
    assert_eq!(out.code, Some(127));
    assert!(
        out.stderr.contains("init: unable to find user ghost"),
        "{}",
        out.stderr
    );
}

#[test]
fn writes_hostname_hosts_resolv_conf_and_files() {
    let rootfs = rootfs_or_skip!();
    let config = json!({
        "argv": ["sh", "-c", "hostname; cat /etc/hosts; echo --; cat /etc/resolv.conf; echo --; \
                 cat /srv/conf/app.toml; stat -c %a /srv/conf/app.toml /srv/run.sh; pwd"],
        "env": { "PATH": "/bin" },
        "hostname": "148e21ea7e5d89",
        "workdir": "/srv/app",
        "etc_hosts": [["fdaa:0:1:a7b:1::2", "148e21ea7e5d89.vm.demo.internal"]],
        "nameservers": ["fdaa::3"],
        "files": [
            { "path": "/srv/conf/app.toml", "content": "a2V5ID0gMQo=" },
            { "path": "/srv/run.sh", "content": "", "mode": 0o750 },
        ],
    });
    let out = rootfs.run(&config);
    assert_eq!(out.code, Some(0));
    assert_eq!(
        out.stdout,
        "148e21ea7e5d89\n\
         127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n\
         fdaa:0:1:a7b:1::2\t148e21ea7e5d89.vm.demo.internal\n--\n\
         nameserver fdaa::3\n--\n\
         key = 1\n644\n750\n/srv/app\n"
    );
    assert!(rootfs.path().join("srv/app").is_dir());
}

#[test]
fn etc_is_created_and_resolv_conf_left_alone_without_nameservers() {
    let rootfs = rootfs_or_skip!();
    fs::remove_dir_all(rootfs.path().join("etc")).unwrap();
    let out = rootfs.run(&base_config(sh("cat /etc/hosts; ls /etc")));
    assert_eq!(out.code, Some(0));
    assert!(out.stdout.starts_with("127.0.0.1\tlocalhost\n"));
    assert!(
        out.stdout.ends_with("hosts\n"),
        "only hosts in /etc: {}",
        out.stdout
    );
}

#[test]
fn exit_codes_propagate() {
    let rootfs = rootfs_or_skip!();
    let out = rootfs.run(&base_config(sh("exit 3")));
    assert_eq!(out.code, Some(3));
    assert!(
        out.stderr.contains("init: main child exited with code 3"),
        "{}",
        out.stderr
    );

    let out = rootfs.run(&base_config(sh("kill -9 $$")));
    assert_eq!(out.code, Some(137));
    assert!(
        out.stderr
            .contains("init: main child killed by signal SIGKILL"),
        "{}",
        out.stderr
    );

    let out = rootfs.run(&base_config(json!(["true"])));
    assert_eq!(out.code, Some(0));
}

#[test]
fn setup_errors_are_reported() {
    let rootfs = rootfs_or_skip!();
    let out = rootfs.run(&base_config(json!(["no-such-program", "x"])));
    assert_eq!(out.code, Some(127));
    assert!(
        out.stderr
            .contains("init: executable file not found in $PATH: no-such-program"),
        "{}",
        out.stderr
    );

    forking(|| fs::write(rootfs.path().join("notexec"), "#!/bin/sh\n")).unwrap();
    let out = rootfs.run(&base_config(json!(["/notexec"])));
    assert_eq!(out.code, Some(126));
    assert!(
        out.stderr
            .contains("init: starting /notexec: exec: Permission denied"),
        "{}",
        out.stderr
    );

    let out = rootfs.run(&json!({ "argv": [], "env": {}, "hostname": "x" }));
    assert_eq!(out.code, Some(127));
    assert!(
        out.stderr.contains("init: invalid config: argv is empty"),
        "{}",
        out.stderr
    );
}

#[test]
fn config_falls_back_to_file_and_removes_it() {
    let rootfs = rootfs_or_skip!();
    let out = rootfs.run_with(
        rootfs.command(true),
        &base_config(sh("ls -a /.fly")),
        Deliver::File,
    );
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_eq!(out.lines(), vec![".", "..", "init"]);
    assert!(!rootfs.path().join(".fly/init.json").exists());

    // Without fd 3 and without the file there is nothing to run.
    let mut cmd = rootfs.command(true);
    // SAFETY: only close between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::close(3);
            Ok(())
        });
    }
    let out = output(&mut cmd).unwrap();
    assert_eq!(out.status.code(), Some(127));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("init: no config: fd 3 is not open and /.fly/init.json"),
        "{stderr}"
    );
}

#[test]
fn child_does_not_inherit_fd3() {
    let rootfs = rootfs_or_skip!();
    let out = rootfs.run(&base_config(sh(
        "[ -e /proc/$$/fd/3 ] && echo leaked || echo closed",
    )));
    assert_eq!(out.code, Some(0));
    assert_eq!(out.stdout, "closed\n");
}

#[test]
fn sigterm_is_forwarded_to_the_child() {
    let rootfs = rootfs_or_skip!();
    let script = "trap 'echo got TERM; exit 42' TERM; echo ready; while :; do sleep 0.05; done";
    let start = Instant::now();
    let (child, out, err) =
        rootfs.spawn(rootfs.command(true), &base_config(sh(script)), Deliver::Fd3);
    assert!(
        wait_for_file_text(&out, "ready", Duration::from_secs(10)),
        "child never got ready"
    );
    let init = child_of(child.id()).expect("init process");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(init),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let code = wait_timeout(child, Duration::from_secs(10));
    let stdout = fs::read_to_string(&out).unwrap();
    let stderr = fs::read_to_string(&err).unwrap();
    eprintln!("{stdout}{stderr}");
    assert_eq!(code, Some(42));
    assert!(stdout.contains("got TERM"));
    assert!(stderr.contains("init: main child exited with code 42"));
    assert!(start.elapsed() < Duration::from_secs(5));
}

#[test]
fn other_signals_are_forwarded() {
    let rootfs = rootfs_or_skip!();
    let script = "trap 'echo got USR1' USR1; trap 'echo got HUP; exit 7' HUP; echo ready; \
                  while :; do sleep 0.05; done";
    let (child, out, _err) =
        rootfs.spawn(rootfs.command(true), &base_config(sh(script)), Deliver::Fd3);
    assert!(wait_for_file_text(&out, "ready", Duration::from_secs(10)));
    let init = nix::unistd::Pid::from_raw(child_of(child.id()).expect("init process"));
    nix::sys::signal::kill(init, nix::sys::signal::Signal::SIGUSR1).unwrap();
    assert!(wait_for_file_text(&out, "got USR1", Duration::from_secs(5)));
    nix::sys::signal::kill(init, nix::sys::signal::Signal::SIGHUP).unwrap();
    assert_eq!(wait_timeout(child, Duration::from_secs(10)), Some(7));
}

#[test]
fn orphans_are_reaped() {
    let rootfs = rootfs_or_skip!();
    // The inner shell exits at once, orphaning `sleep`, which init inherits; once it
    // exits it must not stay a zombie (a zombie keeps its /proc entry). The shell waits
    // for the entry to go with a deadline, not for a fixed time, so a slow machine
    // cannot see the orphan still sleeping (or already gone before the first look).
    let script = "orphan=$(sh -c 'sleep 2 >/dev/null & echo $!'); \
                  [ -e /proc/$orphan ] && echo orphan running; \
                  tries=0; while [ -e /proc/$orphan ] && [ $tries -lt 400 ]; do \
                  sleep 0.05; tries=$((tries+1)); done; \
                  [ -e /proc/$orphan ] && cat /proc/$orphan/stat || echo orphan gone; \
                  for f in /proc/[0-9]*/stat; do read line < $f && echo \"STAT $line\"; done";
    let out = rootfs.run(&base_config(sh(script)));
    assert_eq!(out.code, Some(0));
    assert!(out.stdout.contains("orphan running\n"), "{}", out.stdout);
    assert!(out.stdout.contains("orphan gone\n"), "{}", out.stdout);
    let stats: Vec<&str> = out
        .lines()
        .into_iter()
        .filter(|l| l.starts_with("STAT "))
        .collect();
    assert!(stats.len() >= 2, "saw init and the shell: {stats:?}");
    assert!(
        !stats.iter().any(|l| l.contains(") Z ")),
        "zombies left: {stats:?}"
    );
}

#[test]
fn leftover_processes_are_terminated_then_killed() {
    let rootfs = rootfs_or_skip!();
    // The same run without a leftover process: what starting and stopping init costs on
    // this machine right now, so a slow machine does not look like a wait for the grace.
    let baseline = rootfs.run(&base_config(sh("sleep 0.2; echo running; exit 4")));
    assert_eq!(baseline.code, Some(4));
    let out = rootfs.run(&base_config(sh(
        "sleep 100 & sleep 0.2; [ -e /proc/$! ] && echo running; exit 4",
    )));
    assert_eq!(out.code, Some(4));
    assert_eq!(out.stdout, "running\n");
    // A process that obeys SIGTERM ends at once: well under the 2 s grace period.
    assert!(
        out.elapsed < baseline.elapsed + Duration::from_millis(1500),
        "took {:?} (without a leftover process: {:?})",
        out.elapsed,
        baseline.elapsed
    );

    // A process that ignores SIGTERM is killed after the grace period.
    let script =
        "(trap '' TERM; exec sleep 100) & sleep 0.2; [ -e /proc/$! ] && echo running; exit 0";
    let out = rootfs.run(&base_config(sh(script)));
    assert_eq!(out.code, Some(0));
    assert_eq!(out.stdout, "running\n");
    assert!(
        out.elapsed >= Duration::from_secs(2),
        "took {:?}",
        out.elapsed
    );
    assert!(
        out.elapsed < Duration::from_secs(6),
        "took {:?}",
        out.elapsed
    );
}

#[test]
fn mounts_standard_filesystems() {
    let rootfs = rootfs_or_skip!();
    fs::remove_dir(rootfs.path().join("proc")).unwrap();
    let mut config = base_config(sh(
        "cat /proc/self/mounts; ls -d /dev/null /dev/fd /dev/pts/ptmx",
    ));
    config["mount_standard_filesystems"] = json!(true);
    let out = rootfs.run_with(rootfs.command(false), &config, Deliver::Fd3);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    for (target, fstype) in [
        ("/proc", "proc"),
        ("/sys", "sysfs"),
        ("/dev", "devtmpfs"),
        ("/dev/pts", "devpts"),
        ("/dev/shm", "tmpfs"),
        ("/run", "tmpfs"),
    ] {
        let line = out
            .lines()
            .into_iter()
            .find(|l| l.split(' ').nth(1) == Some(target));
        let line = line.unwrap_or_else(|| panic!("{target} not mounted"));
        assert_eq!(line.split(' ').nth(2), Some(fstype), "{line}");
    }
    assert!(out.stdout.contains("/dev/null\n") && out.stdout.contains("/dev/fd\n"));

    // With /proc already mounted (as a container runtime does), it is not mounted twice.
    let out = rootfs.run_with(rootfs.command(true), &config, Deliver::Fd3);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_eq!(
        out.lines()
            .iter()
            .filter(|l| l.split(' ').nth(1) == Some("/proc"))
            .count(),
        1
    );
}

#[test]
fn child_gets_the_terminal() {
    let rootfs = rootfs_or_skip!();
    if output(Command::new("script").arg("--version")).is_err() {
        aloft_testkit::skip("needs script (util-linux)");
        return;
    }
    // As under `runc run` with a terminal, init starts as a session leader owning the
    // tty; the child's new session must take it over.
    let mut config = base_config(sh("read s < /proc/self/stat; echo \"STAT $s\"; \
                                     ( exec 5</dev/tty ) && echo HAVE_TTY"));
    config["mount_standard_filesystems"] = json!(true);
    fs::write(
        rootfs.path().join(".fly/init.json"),
        serde_json::to_vec(&config).unwrap(),
    )
    .unwrap();
    let inner = format!(
        "unshare --pid --fork --mount --uts --root={} /bin/setsid -c /.fly/init 3<&-",
        rootfs.path().display()
    );
    let out = output(Command::new("script").args(["-qec", &inner, "/dev/null"])).unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}");
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout.contains("HAVE_TTY"), "{stdout}");
    let stat = stdout
        .lines()
        .find_map(|l| l.strip_prefix("STAT "))
        .expect("stat line");
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let pid: i32 = stat.split_whitespace().next().unwrap().parse().unwrap();
    assert_eq!(
        fields[3].parse::<i32>().unwrap(),
        pid,
        "child leads its own session"
    );
    assert_ne!(fields[4], "0", "child has a controlling terminal");
}

fn runc_spec(bundle: &Path, rootfs: &Path, hostname: &str) {
    let out = output(Command::new("runc").arg("spec").current_dir(bundle)).unwrap();
    assert!(
        out.status.success(),
        "runc spec: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = bundle.join("config.json");
    let mut spec: Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    spec["process"]["terminal"] = json!(false);
    spec["process"]["args"] = json!(["/.fly/init"]);
    // Docker's default capability set: enough to switch users, not to set the hostname.
    let caps = json!([
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FSETID",
        "CAP_FOWNER",
        "CAP_MKNOD",
        "CAP_NET_RAW",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_SETFCAP",
        "CAP_SETPCAP",
        "CAP_NET_BIND_SERVICE",
        "CAP_SYS_CHROOT",
        "CAP_KILL",
        "CAP_AUDIT_WRITE"
    ]);
    for set in ["bounding", "effective", "permitted"] {
        spec["process"]["capabilities"][set] = caps.clone();
    }
    spec["root"] = json!({ "path": rootfs, "readonly": false });
    spec["hostname"] = json!(hostname);
    spec["mounts"]
        .as_array_mut()
        .unwrap()
        .push(json!({ "destination": "/.fly/init", "type": "bind", "source": INIT, "options": ["bind", "ro"] }));
    fs::write(path, serde_json::to_vec_pretty(&spec).unwrap()).unwrap();
}

#[test]
fn runs_under_runc_with_config_on_fd3() {
    let rootfs = rootfs_or_skip!();
    if output(Command::new("runc").arg("--version")).is_err() {
        aloft_testkit::skip("needs runc");
        return;
    }
    let bundle = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    fs::remove_file(rootfs.path().join(".fly/init")).unwrap();
    fs::write(rootfs.path().join(".fly/init"), "").unwrap();
    runc_spec(bundle.path(), rootfs.path(), "runc-machine");

    let config = json!({
        "argv": ["sh", "-c", "echo $(id -u):$(id -G) $(hostname) $FLY_MACHINE_ID; cat /etc/resolv.conf; \
                 [ -e /proc/$$/fd/3 ] && echo fd3-leaked; exit 9"],
        "env": { "PATH": "/bin", "FLY_MACHINE_ID": "148e21ea7e5d89" },
        "user": "app",
        "hostname": "runc-machine",
        "nameservers": ["fdaa::3"],
    });
    let id = format!("aloft-init-test-{}", std::process::id());
    let mut cmd = Command::new("runc");
    cmd.arg("--root")
        .arg(state.path())
        .args(["run", "--preserve-fds", "1", &id])
        .current_dir(bundle.path());
    let out = rootfs.run_with(cmd, &config, Deliver::Fd3);
    let _ = output(
        Command::new("runc")
            .arg("--root")
            .arg(state.path())
            .args(["delete", "-f", &id]),
    );
    assert_eq!(out.code, Some(9), "{}", out.stderr);
    assert_eq!(
        out.stdout,
        "1000:1000 2000 runc-machine 148e21ea7e5d89\nnameserver fdaa::3\n"
    );
    assert!(out.stderr.contains("init: main child exited with code 9"));
    assert!(
        !out.stderr.contains("warning"),
        "hostname already set by runc: {}",
        out.stderr
    );
}
