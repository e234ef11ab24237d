//! Builders that turn a source directory into an OCI image in a registry: Dockerfile
//! builds with buildah (or a local Docker engine when buildah is missing), the built-in
//! `static` builder, and copies of images from any registry ([`oci::copy_image`]).

pub mod dockerfile;
pub mod oci;
pub mod static_site;

use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("buildah is not installed (apt-get install buildah)")]
    BuildahMissing,
    #[error(
        "no Dockerfile builder here: install buildah (apt-get install buildah) or start a Docker engine, or deploy a prebuilt image with --image"
    )]
    NoBuilder,
    /// The Dockerfile cannot be built as written.
    #[error("{file}:{line}: {message}")]
    Syntax {
        file: String,
        line: usize,
        message: String,
    },
    #[error("{0} not found")]
    MissingFile(String),
    /// The build failed; `step` is the Dockerfile step that failed and `output` what it printed.
    #[error("build failed at {step}: {reason}")]
    Failed {
        step: String,
        reason: String,
        output: Vec<String>,
    },
    #[error("pushing the image to {destination} failed: {reason}")]
    Push { destination: String, reason: String },
    #[error("running buildah: {0}")]
    Io(#[from] std::io::Error),
}

/// A Dockerfile build.
#[derive(Clone, Debug)]
pub struct DockerfileBuild {
    pub context: PathBuf,
    pub dockerfile: PathBuf,
    /// Name the built image gets in the local build storage.
    pub tag: String,
    pub build_args: Vec<(String, String)>,
    pub target: Option<String>,
    pub ignorefile: Option<PathBuf>,
    pub no_cache: bool,
    /// Build secrets (`--build-secret NAME=VALUE`), mounted at `/run/secrets/NAME` by
    /// `RUN --mount=type=secret,id=NAME`.
    pub secrets: Vec<(String, String)>,
}

impl DockerfileBuild {
    /// Reports Dockerfile syntax problems before a builder runs.
    pub fn preflight(&self) -> Result<(), BuildError> {
        let text = std::fs::read_to_string(&self.dockerfile).map_err(|_| {
            BuildError::MissingFile(format!("Dockerfile {}", self.dockerfile.display()))
        })?;
        match dockerfile::check(&text).into_iter().next() {
            Some(problem) => Err(BuildError::Syntax {
                file: self.dockerfile.display().to_string(),
                line: problem.line,
                message: problem.message,
            }),
            None => Ok(()),
        }
    }

    /// Writes each secret to its own file (mode 0600) in `dir`: `(name, path)`.
    fn secret_files(&self, dir: &Path) -> Result<Vec<(String, PathBuf)>, BuildError> {
        use std::os::unix::fs::OpenOptionsExt;
        let mut files = Vec::new();
        for (name, value) in &self.secrets {
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
            {
                return Err(BuildError::Syntax {
                    file: "--build-secret".into(),
                    line: 0,
                    message: format!(
                        "secret name {name:?} must be letters, digits, '_', '-' or '.'"
                    ),
                });
            }
            let path = dir.join(format!("secret-{}", files.len()));
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)?;
            std::io::Write::write_all(&mut file, value.as_bytes())?;
            files.push((name.clone(), path));
        }
        Ok(files)
    }
}

/// How a build reaches the platform's registry: `FROM` images in it (plain HTTP, the
/// token as credentials), and optionally Docker Hub through its pull-through mirror.
#[derive(Clone, Debug, Default)]
pub struct RegistryAccess {
    /// `host:port` of the platform's registry.
    pub host: String,
    pub token: String,
    /// Repository prefix under which the registry proxies Docker Hub (e.g. `dockerhub`).
    pub docker_hub_mirror: Option<String>,
}

impl RegistryAccess {
    /// A registries.conf and an auth file for containers/image tools, in `dir`.
    fn write_config(&self, dir: &Path) -> Result<(PathBuf, PathBuf), BuildError> {
        let mut conf = String::from(
            "unqualified-search-registries = [\"docker.io\"]\nshort-name-mode = \"permissive\"\n\n",
        );
        conf.push_str(&format!(
            "[[registry]]\nlocation = \"{}\"\ninsecure = true\n",
            self.host
        ));
        if let Some(prefix) = &self.docker_hub_mirror {
            conf.push_str(&format!(
                "\n[[registry]]\nprefix = \"docker.io\"\nlocation = \"docker.io\"\n\n[[registry.mirror]]\nlocation = \"{}/{}\"\ninsecure = true\n",
                self.host,
                prefix.trim_matches('/')
            ));
        }
        let conf_path = dir.join("registries.conf");
        std::fs::write(&conf_path, conf)?;
        let auth = format!("x:{}", self.token);
        let encoded = base64_encode(auth.as_bytes());
        let auth_path = dir.join("auth.json");
        std::fs::write(
            &auth_path,
            serde_json::json!({ "auths": { self.host.clone(): { "auth": encoded } } }).to_string(),
        )?;
        Ok((conf_path, auth_path))
    }
}

fn base64_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
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

/// Runs a builder process, streaming its lines to `output` and tracking its steps.
async fn run_streaming(
    mut command: Command,
    program: &str,
    mut output: impl FnMut(&str),
) -> Result<(), BuildError> {
    // stdout and stderr share one pipe, so lines arrive in the order they were written
    // (a step's output always after its `STEP` line).
    let (reader, writer) = std::io::pipe()?;
    command
        .stdin(Stdio::null())
        .stdout(Stdio::from(writer.try_clone()?))
        .stderr(Stdio::from(writer));
    let mut child = command.spawn()?;
    // The child has its copies; ours must go, or the pipe never reaches its end.
    drop(command);
    let mut tracker = StepTracker {
        program: program.to_string(),
        ..StepTracker::default()
    };
    let reader =
        tokio::net::unix::pipe::Receiver::from_owned_fd(std::os::fd::OwnedFd::from(reader))?;
    let mut lines = BufReader::new(reader).lines();
    while let Some(line) = lines.next_line().await? {
        tracker.line(&line);
        output(&line);
    }
    let status = child.wait().await?;
    if status.success() {
        Ok(())
    } else {
        Err(tracker.failure(status))
    }
}

/// buildah with its own storage under `storage_dir` (vfs driver, chroot isolation).
#[derive(Clone, Debug)]
pub struct Buildah {
    storage_dir: PathBuf,
}

/// Tracks buildah's `STEP n/m: ...` lines so a failure can name its step and show what
/// that step printed.
#[derive(Default)]
struct StepTracker {
    program: String,
    step: String,
    output: Vec<String>,
    error: Option<String>,
}

const KEPT_STEP_LINES: usize = 40;

impl StepTracker {
    fn line(&mut self, line: &str) {
        // buildah: `STEP 2/3: COPY ...`, in multi-stage builds `[2/2] STEP 1/2: ...`.
        let unstaged = match line
            .strip_prefix('[')
            .and_then(|rest| rest.split_once("] "))
        {
            Some((stage, rest))
                if stage.contains('/') && stage.chars().all(|c| c.is_ascii_digit() || c == '/') =>
            {
                rest
            }
            _ => line,
        };
        if unstaged.starts_with("STEP ") {
            self.step = line.trim_end_matches(':').to_string();
            self.output.clear();
            return;
        }
        // BuildKit's plain progress: `#7 [2/3] COPY hello /hello`.
        if let Some(rest) = line.strip_prefix('#')
            && let Some((_, step)) = rest.split_once(" [")
            && let Some((position, instruction)) = step.split_once("] ")
            && position.contains('/')
            && !position.contains(' ')
        {
            self.step = format!("STEP {position}: {instruction}");
            self.output.clear();
            return;
        }
        if let Some(error) = line
            .strip_prefix("Error: ")
            .or_else(|| line.strip_prefix("error: "))
            .or_else(|| line.strip_prefix("ERROR: "))
        {
            // buildah appends a dump of its internal step structure; it says nothing more.
            let error = error.split(" &imagebuilder.Step{").next().unwrap_or(error);
            self.error = Some(error.to_string());
            return;
        }
        if self.output.len() == KEPT_STEP_LINES {
            self.output.remove(0);
        }
        self.output.push(line.to_string());
    }

    fn failure(self, exit: std::process::ExitStatus) -> BuildError {
        let step = if self.step.is_empty() {
            "the start of the build".to_string()
        } else {
            self.step
        };
        let program = if self.program.is_empty() {
            "buildah"
        } else {
            self.program.as_str()
        };
        let reason = self
            .error
            .map(|e| shorten(&e))
            .unwrap_or_else(|| format!("{program} exited with {exit}"));
        BuildError::Failed {
            step,
            reason,
            output: self.output,
        }
    }
}

/// A builder's error without the internal structures some of them dump into it.
fn shorten(error: &str) -> String {
    const LIMIT: usize = 400;
    let mut text = error.to_string();
    for marker in [" for copier.request{", " &imagebuilder.Step{"] {
        if let Some(at) = text.find(marker) {
            let rest = text[at..]
                .rsplit_once(": ")
                .map(|(_, last)| format!(": {last}"))
                .unwrap_or_default();
            text = format!("{}{rest}", &text[..at]);
        }
    }
    if text.len() > LIMIT {
        let mut cut = LIMIT;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text = format!("{}...", &text[..cut]);
    }
    text
}

impl Buildah {
    pub fn new(storage_dir: &Path) -> Self {
        Self {
            storage_dir: storage_dir.to_path_buf(),
        }
    }

    fn command(&self) -> Command {
        let mut command = Command::new("buildah");
        command
            .arg("--storage-driver")
            .arg("vfs")
            .arg("--root")
            .arg(self.storage_dir.join("root"))
            .arg("--runroot")
            .arg(self.storage_dir.join("runroot"));
        command
    }

    pub fn available() -> bool {
        std::process::Command::new("buildah")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Builds `build`, calling `output` with each line buildah prints as it prints it.
    /// With `access`, `FROM` images resolve in the platform's registry (and Docker Hub
    /// through its pull-through mirror, when it has one).
    pub async fn build(
        &self,
        build: &DockerfileBuild,
        access: Option<&RegistryAccess>,
        output: impl FnMut(&str),
    ) -> Result<(), BuildError> {
        if !Self::available() {
            return Err(BuildError::BuildahMissing);
        }
        build.preflight()?;
        let scratch = tempfile::tempdir()?;
        let mut command = self.command();
        if let Some(access) = access {
            let (conf, auth) = access.write_config(scratch.path())?;
            command
                .env("CONTAINERS_REGISTRIES_CONF", conf)
                .env("REGISTRY_AUTH_FILE", &auth);
        }
        command
            .arg("bud")
            .arg("--isolation")
            .arg("chroot")
            .arg("--layers")
            .arg("--retry")
            .arg("1")
            .arg("--retry-delay")
            .arg("1s");
        command
            .arg("-f")
            .arg(&build.dockerfile)
            .arg("-t")
            .arg(&build.tag);
        for (name, value) in &build.build_args {
            command.arg("--build-arg").arg(format!("{name}={value}"));
        }
        if let Some(target) = &build.target {
            command.arg("--target").arg(target);
        }
        if let Some(ignorefile) = &build.ignorefile {
            command.arg("--ignorefile").arg(ignorefile);
        }
        if build.no_cache {
            command.arg("--no-cache");
        }
        for (name, path) in build.secret_files(scratch.path())? {
            command
                .arg("--secret")
                .arg(format!("id={name},src={}", path.display()));
        }
        command.arg(&build.context);
        run_streaming(command, "buildah", output).await
    }

    /// Pushes a locally built image to `destination` (`host:port/repo:tag`) over plain
    /// HTTP with `token` as the password, and returns the pushed manifest's digest.
    pub async fn push(
        &self,
        image: &str,
        destination: &str,
        token: &str,
    ) -> Result<String, BuildError> {
        let digest_file = self
            .storage_dir
            .join(format!("push-digest-{}", std::process::id()));
        let output = self
            .command()
            .arg("push")
            .arg("--tls-verify=false")
            .arg("--creds")
            .arg(format!("x:{token}"))
            .arg("--digestfile")
            .arg(&digest_file)
            .arg("--retry")
            .arg("1")
            .arg(image)
            .arg(format!("docker://{destination}"))
            .stdin(Stdio::null())
            .output()
            .await?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let reason = stderr
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("no output")
                .trim()
                .to_string();
            return Err(BuildError::Push {
                destination: destination.to_string(),
                reason,
            });
        }
        let digest = std::fs::read_to_string(&digest_file)
            .unwrap_or_default()
            .trim()
            .to_string();
        let _ = std::fs::remove_file(&digest_file);
        Ok(digest)
    }
}

/// A local Docker engine, used for Dockerfile builds where buildah is not installed.
#[derive(Clone, Debug, Default)]
pub struct DockerEngine;

impl DockerEngine {
    /// Whether a Docker engine answers (the client alone is not enough).
    pub async fn answers() -> bool {
        let probe = Command::new("docker")
            .args(["version", "--format", "{{.Server.Version}}"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        matches!(tokio::time::timeout(std::time::Duration::from_secs(5), probe).await, Ok(Ok(status)) if status.success())
    }

    /// `docker build` with BuildKit's plain progress (so steps can be named on failure).
    pub async fn build(
        &self,
        build: &DockerfileBuild,
        mut output: impl FnMut(&str),
    ) -> Result<(), BuildError> {
        build.preflight()?;
        let scratch = tempfile::tempdir()?;
        let mut command = Command::new("docker");
        command
            .env("DOCKER_BUILDKIT", "1")
            .arg("build")
            .arg("--progress=plain")
            .arg("-f")
            .arg(&build.dockerfile)
            .arg("-t")
            .arg(&build.tag);
        for (name, value) in &build.build_args {
            command.arg("--build-arg").arg(format!("{name}={value}"));
        }
        if let Some(target) = &build.target {
            command.arg("--target").arg(target);
        }
        if build.ignorefile.is_some() {
            output(
                "WARN the Docker engine reads .dockerignore from the build context; [build] ignorefile is not applied",
            );
        }
        if build.no_cache {
            command.arg("--no-cache");
        }
        for (name, path) in build.secret_files(scratch.path())? {
            command
                .arg("--secret")
                .arg(format!("id={name},src={}", path.display()));
        }
        command.arg(&build.context);
        run_streaming(command, "docker build", output).await
    }

    /// `docker push` with the token as credentials (in a throwaway client config), and
    /// the pushed digest.
    pub async fn push(&self, image: &str, token: &str) -> Result<String, BuildError> {
        let host = image.split('/').next().unwrap_or_default().to_string();
        let config = tempfile::tempdir()?;
        let auth = base64_encode(format!("x:{token}").as_bytes());
        std::fs::write(
            config.path().join("config.json"),
            serde_json::json!({ "auths": { host: { "auth": auth } } }).to_string(),
        )?;
        let result = Command::new("docker")
            .env("DOCKER_CONFIG", config.path())
            .arg("push")
            .arg(image)
            .stdin(Stdio::null())
            .output()
            .await?;
        let stdout = String::from_utf8_lossy(&result.stdout);
        if !result.status.success() {
            let stderr = String::from_utf8_lossy(&result.stderr);
            let reason = stderr
                .lines()
                .chain(stdout.lines())
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("no output")
                .trim()
                .to_string();
            return Err(BuildError::Push {
                destination: image.to_string(),
                reason,
            });
        }
        let digest = stdout
            .split_whitespace()
            .skip_while(|w| *w != "digest:")
            .nth(1)
            .unwrap_or_default()
            .to_string();
        Ok(digest)
    }
}

/// The Dockerfile builder this machine has: buildah when present, else a Docker engine
/// that answers.
#[derive(Clone, Debug)]
pub enum DockerfileBuilder {
    Buildah(Buildah),
    Docker(DockerEngine),
}

impl DockerfileBuilder {
    pub async fn detect(buildah_storage: &Path) -> Result<Self, BuildError> {
        if Buildah::available() {
            return Ok(Self::Buildah(Buildah::new(buildah_storage)));
        }
        if DockerEngine::answers().await {
            return Ok(Self::Docker(DockerEngine));
        }
        Err(BuildError::NoBuilder)
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::Buildah(_) => "buildah",
            Self::Docker(_) => "the local Docker engine",
        }
    }

    pub async fn build(
        &self,
        build: &DockerfileBuild,
        access: Option<&RegistryAccess>,
        output: impl FnMut(&str),
    ) -> Result<(), BuildError> {
        match self {
            Self::Buildah(buildah) => buildah.build(build, access, output).await,
            Self::Docker(docker) => docker.build(build, output).await,
        }
    }

    /// Pushes the built `image` (already named `host:port/repo:tag`) to its registry.
    pub async fn push(&self, image: &str, token: &str) -> Result<String, BuildError> {
        match self {
            Self::Buildah(buildah) => buildah.push(image, image, token).await,
            Self::Docker(docker) => docker.push(image, token).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_name_the_step_and_keep_its_output() {
        let mut tracker = StepTracker::default();
        for line in [
            "STEP 1/3: FROM scratch",
            "STEP 2/3: RUN false",
            "sh: oops",
            "Error: building at STEP \"RUN false\": exit status 1",
        ] {
            tracker.line(line);
        }
        let status = std::process::Command::new("false").status().unwrap();
        match tracker.failure(status) {
            BuildError::Failed {
                step,
                reason,
                output,
            } => {
                assert_eq!(step, "STEP 2/3: RUN false");
                assert_eq!(reason, "building at STEP \"RUN false\": exit status 1");
                assert_eq!(output, vec!["sh: oops"]);
            }
            other => panic!("{other}"),
        }
    }

    #[test]
    fn buildkit_steps_and_errors_are_tracked_too() {
        let mut tracker = StepTracker {
            program: "docker build".into(),
            ..StepTracker::default()
        };
        for line in [
            "#5 [1/2] FROM docker.io/library/alpine",
            "#6 [2/2] RUN false",
            "#6 0.2 oops",
            "ERROR: process \"/bin/sh -c false\" did not complete successfully",
        ] {
            tracker.line(line);
        }
        let status = std::process::Command::new("false").status().unwrap();
        match tracker.failure(status) {
            BuildError::Failed { step, reason, .. } => {
                assert_eq!(step, "STEP 2/2: RUN false");
                assert!(reason.starts_with("process"), "{reason}");
            }
            other => panic!("{other}"),
        }
        let mut tracker = StepTracker::default();
        tracker.line("Error: building at STEP \"COPYY \": Build error: Unknown instruction: \"COPYY\" &imagebuilder.Step{Env:[]string{}}");
        assert_eq!(
            tracker.error.as_deref(),
            Some("building at STEP \"COPYY \": Build error: Unknown instruction: \"COPYY\"")
        );
        assert_eq!(base64_encode(b"x:token"), "eDp0b2tlbg==");
        assert_eq!(base64_encode(b"ab"), "YWI=");
    }

    #[test]
    fn builder_dumps_are_cut_from_errors() {
        let error = "building at STEP \"COPY . /ctx\": reading \"/tmp/x\": error during bulk transfer for copier.request{Request:\"GET\", Root:\"/\"}: copier: get: \"/\": lstat /a/b: file name too long";
        assert_eq!(
            shorten(error),
            "building at STEP \"COPY . /ctx\": reading \"/tmp/x\": error during bulk transfer: file name too long"
        );
        let long = "x".repeat(1000);
        assert_eq!(shorten(&long).len(), 403);
    }

    #[test]
    fn secrets_are_private_files_and_names_are_checked() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let mut build = DockerfileBuild {
            context: dir.path().into(),
            dockerfile: dir.path().join("Dockerfile"),
            tag: "t".into(),
            build_args: vec![],
            target: None,
            ignorefile: None,
            no_cache: false,
            secrets: vec![("API_KEY".into(), "s3cret".into())],
        };
        let files = build.secret_files(dir.path()).unwrap();
        assert_eq!(files[0].0, "API_KEY");
        assert_eq!(std::fs::read_to_string(&files[0].1).unwrap(), "s3cret");
        assert_eq!(
            std::fs::metadata(&files[0].1).unwrap().permissions().mode() & 0o777,
            0o600
        );
        build.secrets = vec![("bad name".into(), "x".into())];
        assert!(build.secret_files(&dir.path().join("x")).is_err());
        std::fs::write(dir.path().join("Dockerfile"), "FROM scratch\nCOPYY a /a\n").unwrap();
        let err = build.preflight().unwrap_err().to_string();
        assert!(
            err.ends_with("Dockerfile:2: unknown instruction: COPYY"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn builds_and_reports_a_failing_step() {
        if !Buildah::available() || !std::path::Path::new("/bin/busybox").exists() {
            aloft_testkit::skip(
                "needs buildah and /bin/busybox (apt-get install buildah busybox-static)",
            );
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy("/bin/busybox", dir.path().join("busybox")).unwrap();
        std::fs::write(dir.path().join("Dockerfile"), "FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"sh\", \"-c\", \"echo step-output; exit 3\"]\n").unwrap();
        let buildah = Buildah::new(&dir.path().join("storage"));
        let build = DockerfileBuild {
            context: dir.path().to_path_buf(),
            dockerfile: dir.path().join("Dockerfile"),
            tag: "aloft-build-test:fail".into(),
            build_args: vec![],
            target: None,
            ignorefile: None,
            no_cache: true,
            secrets: vec![],
        };
        let mut seen = Vec::new();
        let err = buildah
            .build(&build, None, |line| seen.push(line.to_string()))
            .await
            .unwrap_err();
        match err {
            BuildError::Failed { step, output, .. } => {
                assert!(step.starts_with("STEP 3/3: RUN"), "{step}");
                assert!(
                    output.iter().any(|l| l.contains("step-output")),
                    "{output:?}"
                );
            }
            other => panic!("unexpected error: {other}"),
        }
        assert!(seen.iter().any(|l| l.starts_with("STEP 1/3")), "{seen:?}");
    }
}
