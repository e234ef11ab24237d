//! A real single-host platform for integration tests: `aloft server` in a network
//! namespace the test creates, with its own data dir and HOME, driven by the real CLI
//! and by curl from inside the namespace.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn aloft_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_aloft"))
}

/// The statically linked example app, built next to `aloft` by `cargo build --workspace`.
pub fn hello_binary() -> PathBuf {
    aloft_binary().with_file_name("hello")
}

/// examples/sqlite-writer's static binary, built next to `aloft` by `cargo build --workspace`.
pub fn sqlite_writer_binary() -> PathBuf {
    aloft_binary().with_file_name("sqlite-writer")
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {program}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Why this machine can't run platform tests, if it can't.
pub fn missing_prerequisite() -> Option<String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Some("needs root (network namespaces, runc, overlay mounts)".into());
    }
    for program in ["ip", "nsenter", "runc", "buildah", "curl"] {
        if !have(program) {
            return Some(format!(
                "needs `{program}` (scripts/setup.sh --test installs it)"
            ));
        }
    }
    None
}

/// Skips the calling test with a clear message when prerequisites are missing.
#[macro_export]
macro_rules! require_platform {
    () => {
        if let Some(reason) = common::missing_prerequisite() {
            aloft_testkit::skip(format!("platform test: {reason}"));
            return;
        }
    };
}

pub struct Platform {
    pub netns: String,
    pub root: tempfile::TempDir,
    server: Option<Child>,
    server_args: Vec<String>,
    /// The platform's own PostgreSQL database when ALOFT_TEST_STORE=postgres.
    pub database: Option<TestDatabase>,
}

/// With ALOFT_TEST_STORE=postgres (scripts/test.sh's second pass over the end-to-end
/// suites) every platform keeps its state in a PostgreSQL database of its own; otherwise
/// in SQLite, as `aloft server` does by default.
fn server_database() -> Option<TestDatabase> {
    match std::env::var("ALOFT_TEST_STORE").as_deref() {
        Ok("postgres") => Some(TestDatabase::create().expect(
            "ALOFT_TEST_STORE=postgres needs ALOFT_TEST_POSTGRES_URL (source scripts/postgres-for-tests.sh)",
        )),
        Ok("sqlite") | Ok("") | Err(_) => None,
        Ok(other) => panic!("ALOFT_TEST_STORE must be `postgres` or `sqlite`, not {other:?}"),
    }
}

/// A database of its own on the PostgreSQL server ALOFT_TEST_POSTGRES_URL names (libpq
/// keyword form with a Unix socket directory as `host`: the server runs inside the test's
/// network namespace, where the host's loopback is not reachable but the socket file is).
/// Dropped with the value.
pub struct TestDatabase {
    pub name: String,
    /// `key=value` pairs of ALOFT_TEST_POSTGRES_URL, without `dbname`.
    server: Vec<(String, String)>,
}

impl TestDatabase {
    /// None when ALOFT_TEST_POSTGRES_URL is unset (the platform then uses SQLite).
    pub fn create() -> Option<Self> {
        let admin = std::env::var("ALOFT_TEST_POSTGRES_URL")
            .ok()
            .filter(|u| !u.trim().is_empty())?;
        let server: Vec<(String, String)> = admin
            .split_whitespace()
            .map(|pair| match pair.split_once('=') {
                Some((key, value)) => (key.to_string(), value.to_string()),
                None => panic!(
                    "ALOFT_TEST_POSTGRES_URL must be libpq's keyword form \
                     (host=/var/run/postgresql user=NAME dbname=postgres), got {admin:?}"
                ),
            })
            .filter(|(key, _)| key != "dbname")
            .collect();
        let host = server
            .iter()
            .find(|(key, _)| key == "host")
            .map(|(_, value)| value.as_str());
        assert!(
            host.is_some_and(|h| h.starts_with('/')),
            "ALOFT_TEST_POSTGRES_URL's host must be a Unix socket directory (the server runs \
             in a network namespace that cannot reach the host's loopback), got {admin:?}"
        );
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let name = format!(
            "aloft_test_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let database = Self { name, server };
        database.psql_on("postgres", &format!("CREATE DATABASE {}", database.name));
        Some(database)
    }

    fn conninfo_for(&self, dbname: &str) -> String {
        let mut pairs: Vec<String> = self
            .server
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        pairs.push(format!("dbname={dbname}"));
        pairs.join(" ")
    }

    /// libpq keyword form: `host=/var/run/postgresql user=… dbname=…`.
    pub fn conninfo(&self) -> String {
        self.conninfo_for(&self.name)
    }

    /// URL form: `postgresql:///NAME?host=/var/run/postgresql&user=…`.
    pub fn url(&self) -> String {
        let query: Vec<String> = self
            .server
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        format!("postgresql:///{}?{}", self.name, query.join("&"))
    }

    fn psql_on(&self, dbname: &str, sql: &str) -> String {
        let output = Command::new("psql")
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d"])
            .arg(self.conninfo_for(dbname))
            .args(["-c", sql])
            .output()
            .expect("running psql");
        assert!(
            output.status.success(),
            "psql {sql:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    }

    /// Runs `sql` in this database; its unaligned output.
    pub fn psql(&self, sql: &str) -> String {
        self.psql_on(&self.name, sql)
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let _ = Command::new("psql")
            .args(["-X", "-q", "-d"])
            .arg(self.conninfo_for("postgres"))
            .args([
                "-c",
                &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Why this machine can't run microVM tests, if it can't (beyond the platform's needs).
pub fn missing_vm_prerequisite() -> Option<String> {
    for program in ["qemu-system-x86_64", "qemu-img", "mkfs.ext4", "lz4"] {
        if !have(program) {
            return Some(format!(
                "needs `{program}` (scripts/setup.sh --test installs qemu-system-x86, qemu-utils, e2fsprogs, lz4)"
            ));
        }
    }
    let kernel = std::fs::read_dir("/boot").ok().is_some_and(|entries| {
        entries
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("vmlinuz-"))
    });
    if !kernel {
        return Some("needs a guest kernel in /boot (linux-image-cloud-amd64)".into());
    }
    None
}

/// Holds a host-wide lock while alive: microVM tests under TCG crawl when they run in
/// parallel on two cores, so they take turns.
pub struct VmLock(std::fs::File);

pub fn vm_lock() -> VmLock {
    use std::os::fd::AsRawFd;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(std::env::temp_dir().join("aloft-vm-tests.lock"))
        .expect("the VM test lock file");
    // SAFETY: flock on our own descriptor.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
    VmLock(file)
}

pub struct Run {
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn from(output: Output) -> Self {
        Self {
            status: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }
    pub fn ok(&self) -> bool {
        self.status == 0
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout\n{}\n--- stderr\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

impl Platform {
    /// Starts `aloft server` in a fresh network namespace and waits until its API answers.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Like [`Platform::start`], with extra `aloft server` arguments.
    pub fn start_with(server_args: &[&str]) -> Self {
        Self::start_in(Self::new_root(), server_args)
    }

    /// Like [`Platform::start_with`], with the data dir on an ext4 filesystem of its own of
    /// `size_mb` MB (an image file in the test's directory, loop-mounted; unmounted and
    /// removed with the platform), so a test can fill the host's disk.
    pub fn start_on_small_disk(size_mb: u64, server_args: &[&str]) -> Self {
        let root = Self::new_root();
        let image = root.path().join("host-disk.ext4");
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(size_mb * 1024 * 1024))
            .expect("the small disk's image");
        let mkfs = Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(&image)
            .output()
            .expect("running mkfs.ext4");
        assert!(mkfs.status.success(), "mkfs.ext4: {}", Run::from(mkfs));
        let data = root.path().join("data");
        std::fs::create_dir_all(&data).expect("the data dir");
        let mount = Command::new("mount")
            .args(["-o", "loop"])
            .arg(&image)
            .arg(&data)
            .output()
            .expect("running mount");
        assert!(mount.status.success(), "mount: {}", Run::from(mount));
        Self::start_in(root, server_args)
    }

    /// The test's directory: HOME and the data dir live in it.
    pub fn new_root() -> tempfile::TempDir {
        let root = tempfile::tempdir().expect("temp dir");
        // Traversable, as /var/lib is: machines' roots (host ids of a user namespace) pass
        // through it to their root filesystems.
        std::fs::set_permissions(
            root.path(),
            <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o711),
        )
        .expect("opening the temp dir to traversal");
        std::fs::create_dir_all(root.path().join("home")).expect("home dir");
        root
    }

    /// Like [`Platform::start_with`], running `prepare` with the namespace's name after the
    /// namespace exists and before the server starts (to give it links and addresses).
    pub fn start_prepared(server_args: &[&str], prepare: impl FnOnce(&str)) -> Self {
        Self::start_in_prepared(Self::new_root(), server_args, prepare)
    }

    fn start_in(root: tempfile::TempDir, server_args: &[&str]) -> Self {
        Self::start_in_prepared(root, server_args, |_| {})
    }

    fn start_in_prepared(
        root: tempfile::TempDir,
        server_args: &[&str],
        prepare: impl FnOnce(&str),
    ) -> Self {
        assert!(
            hello_binary().exists(),
            "{} is missing: run `cargo build --workspace` first",
            hello_binary().display()
        );
        let netns = format!(
            "aloft-t{}",
            std::process::id() % 100_000 * 100 + rand_suffix()
        );
        let status = Command::new("ip")
            .args(["netns", "add", &netns])
            .status()
            .expect("ip netns add");
        assert!(status.success(), "creating network namespace {netns}");
        Command::new("ip")
            .args(["-n", &netns, "link", "set", "lo", "up"])
            .status()
            .expect("ip link set lo up");
        prepare(&netns);
        let mut platform = Self {
            netns,
            root,
            server: None,
            server_args: server_args.iter().map(|a| a.to_string()).collect(),
            database: server_database(),
        };
        platform.spawn_server();
        platform
    }

    pub fn home(&self) -> PathBuf {
        self.root.path().join("home")
    }

    pub fn data_dir(&self) -> PathBuf {
        self.root.path().join("data")
    }

    pub fn in_netns(&self, program: &Path) -> Command {
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net=/run/netns/{}", self.netns))
            .arg(program);
        command
            .env("HOME", self.home())
            .env_remove("ALOFT_API_URL")
            .env_remove("FLY_ACCESS_TOKEN")
            .env_remove("FLY_API_TOKEN");
        command
    }

    fn spawn_server(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.path().join("server.log"))
            .expect("server log");
        let mut command = self.in_netns(&aloft_binary());
        command
            .arg("server")
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(&self.server_args)
            .env_remove("ALOFT_DATABASE_URL");
        if let Some(database) = &self.database {
            // An explicit --database-url in server_args takes precedence over the variable.
            command.env("ALOFT_DATABASE_URL", database.conninfo());
        }
        command.stdout(log.try_clone().expect("log")).stderr(log);
        self.server = Some(command.spawn().expect("starting aloft server"));
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.aloft(&["apps", "list"]).ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("aloft server did not come up:\n{}", self.server_log());
    }

    /// Kills the server with SIGKILL, as a crash would (machines keep running).
    pub fn kill_server(&mut self) {
        if let Some(mut server) = self.server.take() {
            let _ = server.kill();
            let _ = server.wait();
        }
    }

    /// Starts the server again on the same data dir and waits until its API answers.
    pub fn restart_server(&mut self) {
        self.spawn_server();
    }

    /// Stops the server and starts it again with other `aloft server` arguments.
    pub fn restart_server_with(&mut self, server_args: &[&str]) {
        self.stop();
        self.server_args = server_args.iter().map(|a| a.to_string()).collect();
        self.spawn_server();
    }

    /// The host token the server saved (what agents and the control plane share).
    pub fn host_token(&self) -> String {
        std::fs::read_to_string(self.data_dir().join("host.token"))
            .expect("the server saves host.token in its data dir")
            .trim()
            .to_string()
    }

    /// A request to this host's agent API (127.0.0.1:4281) with the host token; the
    /// status code is the last line of stdout.
    pub fn agent(&self, method: &str, path: &str, body: Option<&str>) -> Run {
        let url = format!("http://127.0.0.1:4281{path}");
        let auth = format!("Authorization: Bearer {}", self.host_token());
        let mut args = vec![
            "-X",
            method,
            "-H",
            auth.as_str(),
            "-w",
            "\n%{http_code}",
            url.as_str(),
        ];
        if let Some(body) = body {
            args.extend(["-H", "Content-Type: application/json", "-d", body]);
        }
        self.curl(&args)
    }

    pub fn server_log(&self) -> String {
        std::fs::read_to_string(self.root.path().join("server.log")).unwrap_or_default()
    }

    /// Runs the CLI inside the namespace, in `dir` when given.
    pub fn aloft_in(&self, dir: Option<&Path>, args: &[&str]) -> Run {
        let mut command = self.in_netns(&aloft_binary());
        command.args(args);
        if let Some(dir) = dir {
            command.current_dir(dir);
        }
        Run::from(command.output().expect("running aloft"))
    }

    /// Starts the CLI inside the namespace without waiting, its stdout going to `stdout`.
    pub fn spawn_aloft(&self, args: &[&str], stdout: &Path) -> Child {
        let file = std::fs::File::create(stdout).expect("output file");
        let mut command = self.in_netns(&aloft_binary());
        command.args(args).stdout(file).stderr(Stdio::null());
        command.spawn().expect("starting aloft")
    }

    pub fn aloft(&self, args: &[&str]) -> Run {
        self.aloft_in(None, args)
    }

    /// A Machines API request with a bearer token, from inside the namespace:
    /// (status code, body).
    pub fn api(
        &self,
        token: &str,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> (u16, String) {
        let url = format!("http://127.0.0.1:4280{path}");
        let auth = format!("Authorization: Bearer {token}");
        let body = body.map(|b| b.to_string());
        let mut args = vec!["-X", method, "-H", &auth, "-w", "\n%{http_code}", &url];
        if let Some(body) = &body {
            args.extend(["-H", "Content-Type: application/json", "-d", body]);
        }
        let run = self.curl(&args);
        assert!(run.ok(), "{run}");
        let (body, code) = run
            .stdout
            .rsplit_once('\n')
            .unwrap_or_else(|| panic!("no status line: {run}"));
        let code = code
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("status: {run}"));
        (code, body.to_string())
    }

    /// `sh -c SCRIPT` in a machine of `app`, through `aloft machine exec`.
    pub fn machine_sh(&self, app: &str, id: &str, script: &str) -> Run {
        self.aloft(&["machine", "exec", id, "-a", app, "--", "sh", "-c", script])
    }

    /// curl inside the namespace; `-s` and a time limit are always added.
    pub fn curl(&self, args: &[&str]) -> Run {
        let mut command = self.in_netns(Path::new("curl"));
        command.args(["-s", "--max-time", "20"]).args(args);
        Run::from(command.output().expect("running curl"))
    }

    /// A copy of examples/hello with the built binary, ready for `aloft deploy`.
    pub fn hello_app_dir(&self, name: &str) -> PathBuf {
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/hello");
        let dir = self.root.path().join(name);
        std::fs::create_dir_all(&dir).expect("app dir");
        for file in ["Dockerfile", "fly.toml", ".dockerignore"] {
            std::fs::copy(example.join(file), dir.join(file)).expect("copying the example");
        }
        std::fs::copy(hello_binary(), dir.join("hello")).expect("copying the hello binary");
        dir
    }

    pub fn stop(&mut self) {
        if let Some(mut server) = self.server.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(server.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = server.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = server.kill();
            let _ = server.wait();
        }
    }
}

impl Platform {
    /// Stops `aloft server` and starts it again on the same data dir.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn_server();
    }
}

/// Distinct for each platform a test process starts (the pid tells processes apart), so
/// tests running in parallel never pick the same namespace name.
fn rand_suffix() -> u32 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 100
}

impl Drop for Platform {
    fn drop(&mut self) {
        self.stop();
        // Machines keep their network namespaces across stops (for the next start);
        // a finished test has no next start, so remove them with the platform's own.
        if let Ok(machines) = std::fs::read_dir(self.data_dir().join("agent/machines")) {
            for machine in machines.flatten() {
                let netns = format!("aloft-{}", machine.file_name().to_string_lossy());
                let _ = Command::new("ip")
                    .args(["netns", "del", &netns])
                    .stderr(Stdio::null())
                    .status();
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
        release_mounts_under(self.root.path());
    }
}

/// Unmounts what a test's machines left mounted under `root` (machines still running
/// after a killed server) and detaches loop devices backed by files there, so removing
/// the test's directory removes everything.
pub fn release_mounts_under(root: &Path) {
    aloft_agent::block_image::release_everything_under(root);
}

/// The loop devices (`/dev/loopN`) backed by files under `dir`.
pub fn loop_devices_under(dir: &Path) -> Vec<PathBuf> {
    aloft_agent::block_image::loop_devices_under(dir)
        .into_iter()
        .map(|device| device.device)
        .collect()
}

/// Polls `check` until it answers `None` (done), for at most `timeout`; `Some(seen)` says
/// what it saw meanwhile, shown if time runs out. Returns the last thing seen before done.
pub fn wait_until(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Option<String>,
) -> String {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    while Instant::now() < deadline {
        match check() {
            None => return last,
            Some(seen) => last = seen,
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("timed out waiting for {what}; last seen:\n{last}");
}

/// The machine id in `aloft machine run`'s output ("Machine ID: ...").
pub fn launched_machine_id(stdout: &str) -> String {
    stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("Machine ID: "))
        .unwrap_or_else(|| panic!("no machine id in:\n{stdout}"))
        .trim()
        .to_string()
}

/// The ids of `app`'s machines (`aloft machine list -q`).
pub fn machine_ids(platform: &Platform, app: &str) -> Vec<String> {
    platform
        .aloft(&["machine", "list", "-a", app, "-q"])
        .stdout
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| l.len() == 14)
        .collect()
}

/// `aloft volumes list -a APP --json` (with `--all`, destroyed ones too).
pub fn volumes_json(platform: &Platform, app: &str, all: bool) -> Vec<serde_json::Value> {
    let mut args = vec!["volumes", "list", "-a", app, "--json"];
    if all {
        args.push("--all");
    }
    let list = platform.aloft(&args);
    assert!(list.ok(), "{list}");
    serde_json::from_str(&list.stdout).unwrap_or_else(|e| panic!("{e}: {list}"))
}

/// An app whose image is busybox (with sh, dd, sync, cat...), idling; `extra` is appended
/// to its fly.toml.
pub fn idle_busybox_app(platform: &Platform, name: &str, extra: &str) -> PathBuf {
    let dir = platform.root.path().join(format!("app-{name}"));
    let bin = dir.join("rootfs/bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy("/bin/busybox", bin.join("busybox"))
        .expect("busybox-static is installed (scripts/setup.sh)");
    for applet in [
        "sh", "dd", "rm", "echo", "sleep", "df", "cat", "sync", "ls", "mkdir", "md5sum", "stat",
    ] {
        std::os::unix::fs::symlink("busybox", bin.join(applet)).unwrap();
    }
    std::fs::write(
        dir.join("Dockerfile"),
        "FROM scratch\nCOPY rootfs/ /\nCMD [\"/bin/sleep\", \"100000\"]\n",
    )
    .unwrap();
    write_fly_toml(&dir, name, extra);
    dir
}

/// fly.toml of `name` in region `local`, with `extra` appended.
/// An app dir under `root` whose image is busybox serving `/www` on port 8080, with CGI
/// scripts `id` (names the machine and echoes the Fly headers it got) and `slow` (the
/// same after 5 s), and `fly_toml` added to its fly.toml.
pub fn busybox_app_with(root: &Path, name: &str, fly_toml: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let dir = root.join(format!("app-{name}"));
    let bin = dir.join("rootfs/bin");
    let cgi = dir.join("rootfs/www/cgi-bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(&cgi).unwrap();
    std::fs::copy("/bin/busybox", bin.join("busybox"))
        .expect("busybox-static is installed (scripts/setup.sh)");
    for applet in [
        "sh", "httpd", "wget", "nc", "nslookup", "echo", "timeout", "sleep",
    ] {
        std::os::unix::fs::symlink("busybox", bin.join(applet)).unwrap();
    }
    let id = cgi.join("id");
    std::fs::write(
        &id,
        concat!(
            "#!/bin/sh\necho \"Content-Type: text/plain\"\necho\necho \"machine=$FLY_MACHINE_ID\"\n",
            "echo \"fly-region=$HTTP_FLY_REGION\"\necho \"fly-client-ip=$HTTP_FLY_CLIENT_IP\"\n",
            "echo \"fly-forwarded-port=$HTTP_FLY_FORWARDED_PORT\"\necho \"via=$HTTP_VIA\"\n",
        ),
    )
    .unwrap();
    std::fs::set_permissions(&id, std::fs::Permissions::from_mode(0o755)).unwrap();
    let slow = cgi.join("slow");
    std::fs::write(
        &slow,
        "#!/bin/sh\nsleep 5\necho \"Content-Type: text/plain\"\necho\necho \"machine=$FLY_MACHINE_ID\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&slow, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(
        dir.join("Dockerfile"),
        "FROM scratch\nCOPY rootfs/ /\nCMD [\"/bin/httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\n",
    )
    .unwrap();
    write_fly_toml(&dir, name, fly_toml);
    dir
}

pub fn write_fly_toml(dir: &Path, name: &str, extra: &str) {
    std::fs::write(
        dir.join("fly.toml"),
        format!("app = \"{name}\"\nprimary_region = \"local\"\n{extra}"),
    )
    .unwrap();
}

/// `aloft machine status ID --json` (null when it fails).
pub fn machine_json(platform: &Platform, app: &str, id: &str) -> serde_json::Value {
    let status = platform.aloft(&["machine", "status", id, "-a", app, "--json"]);
    serde_json::from_str(&status.stdout).unwrap_or_default()
}

/// A second host for a platform: a network namespace of its own, linked to the platform's
/// by a veth pair (the platform at [`JoinedHost::CONTROL_IP`], this host at
/// [`JoinedHost::IP`]), where `aloft agent` (or `aloft server --join`) runs with a data
/// dir of its own. Dropping it stops that process (its machines with it) and removes what
/// it made.
pub struct JoinedHost {
    pub netns: String,
    pub root: tempfile::TempDir,
    agent: Option<Child>,
}

impl JoinedHost {
    /// The platform's end of the link: give `aloft server --api-listen` this address.
    pub const CONTROL_IP: &'static str = "10.77.0.1";
    /// This host's end.
    pub const IP: &'static str = "10.77.0.2";

    pub fn new() -> Self {
        let netns = format!(
            "aloft-b{}",
            std::process::id() % 100_000 * 100 + rand_suffix()
        );
        let status = Command::new("ip")
            .args(["netns", "add", &netns])
            .status()
            .expect("ip netns add");
        assert!(status.success(), "creating network namespace {netns}");
        Self::ip(&["-n", &netns, "link", "set", "lo", "up"]);
        Self {
            netns,
            root: Platform::new_root(),
            agent: None,
        }
    }

    fn ip(args: &[&str]) {
        let run = Run::from(Command::new("ip").args(args).output().expect("running ip"));
        assert!(run.ok(), "ip {args:?}: {run}");
    }

    /// Links this host's namespace to `platform_netns` (call it from
    /// [`Platform::start_prepared`], before the server binds its API to [`Self::CONTROL_IP`]).
    pub fn link_to(&self, platform_netns: &str) {
        Self::ip(&[
            "-n",
            platform_netns,
            "link",
            "add",
            "backbone0",
            "type",
            "veth",
            "peer",
            "name",
            "backbone0",
            "netns",
            &self.netns,
        ]);
        for (netns, ip) in [(platform_netns, Self::CONTROL_IP), (&self.netns, Self::IP)] {
            Self::ip(&[
                "-n",
                netns,
                "addr",
                "add",
                &format!("{ip}/30"),
                "dev",
                "backbone0",
            ]);
            Self::ip(&["-n", netns, "link", "set", "backbone0", "up"]);
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.root.path().join("data")
    }

    pub fn agent_log(&self) -> String {
        std::fs::read_to_string(self.root.path().join("agent.log")).unwrap_or_default()
    }

    /// `aloft agent ARGS` in this host's namespace, run to its end.
    pub fn run_agent(&self, args: &[&str]) -> Run {
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net=/run/netns/{}", self.netns))
            .arg(aloft_binary())
            .arg("agent")
            .args(args)
            .env("HOME", self.root.path())
            .env_remove("ALOFT_HOST_TOKEN");
        Run::from(command.output().expect("running aloft agent"))
    }

    /// Starts `aloft agent` joined to the control plane at `control` with `token`, in
    /// `region`, listening at [`Self::IP`]:4281.
    pub fn start_agent(&mut self, control: &str, token: &str, region: &str) {
        self.start_agent_with(control, token, region, &[]);
    }

    /// Like [`Self::start_agent`], with `extra` arguments (e.g. `--mesh-listen`).
    pub fn start_agent_with(&mut self, control: &str, token: &str, region: &str, extra: &[&str]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.path().join("agent.log"))
            .expect("agent log");
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net=/run/netns/{}", self.netns))
            .arg(aloft_binary())
            .arg("agent")
            .args(["--control", control, "--token", token, "--region", region])
            .arg("--data-dir")
            .arg(self.data_dir())
            .args([
                "--listen",
                &format!("{}:4281", Self::IP),
                "--driver",
                "container",
            ])
            .args(extra)
            .env("HOME", self.root.path())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        self.agent = Some(command.spawn().expect("starting aloft agent"));
    }

    /// Where this host's mesh listens when it runs one ([`Self::start_joined_server`]).
    pub const MESH_LISTEN: &'static str = "10.77.0.2:51820";

    /// Starts `aloft server --join control --token token` (agent, proxy, private DNS and
    /// mesh, no control plane of its own), its agent at [`Self::IP`]:4281 and its mesh at
    /// [`Self::MESH_LISTEN`], with `extra` arguments.
    pub fn start_joined_server(&mut self, control: &str, token: &str, extra: &[&str]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.path().join("agent.log"))
            .expect("agent log");
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net=/run/netns/{}", self.netns))
            .arg(aloft_binary())
            .arg("server")
            .args(["--join", control, "--token", token])
            .arg("--data-dir")
            .arg(self.data_dir())
            .args([
                "--agent-listen",
                &format!("{}:4281", Self::IP),
                "--mesh-listen",
                Self::MESH_LISTEN,
                "--driver",
                "container",
            ])
            .args(extra)
            .env("HOME", self.root.path())
            .env_remove("ALOFT_DATABASE_URL")
            .env_remove("ALOFT_HOST_TOKEN")
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        self.agent = Some(command.spawn().expect("starting aloft server --join"));
    }

    /// Whether the process started last (agent or joined server) still runs.
    pub fn running(&mut self) -> bool {
        self.agent
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// Kills the agent with SIGKILL, as a crash or a lost host would (machines stay).
    pub fn kill_agent(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            let _ = agent.kill();
            let _ = agent.wait();
        }
    }

    /// Stops the agent with SIGTERM (it stops its machines) and waits for it.
    pub fn stop_agent(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(agent.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = agent.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = agent.kill();
            let _ = agent.wait();
        }
    }
}

impl Drop for JoinedHost {
    fn drop(&mut self) {
        self.stop_agent();
        if let Ok(machines) = std::fs::read_dir(self.data_dir().join("agent/machines")) {
            for machine in machines.flatten() {
                let netns = format!("aloft-{}", machine.file_name().to_string_lossy());
                // Machines of an agent that was killed and never came back still run.
                if let Ok(out) = Command::new("ip").args(["netns", "pids", &netns]).output() {
                    for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                        if let Ok(pid) = pid.parse::<i32>() {
                            let _ = nix::sys::signal::kill(
                                nix::unistd::Pid::from_raw(pid),
                                nix::sys::signal::Signal::SIGKILL,
                            );
                        }
                    }
                }
                let _ = Command::new("ip")
                    .args(["netns", "del", &netns])
                    .stderr(Stdio::null())
                    .status();
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
        release_mounts_under(self.root.path());
    }
}
