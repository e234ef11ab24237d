//! Builders: Dockerfile builds with buildah, and pushes to a registry.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("buildah is not installed (apt-get install buildah)")]
    BuildahMissing,
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
    step: String,
    output: Vec<String>,
    error: Option<String>,
}

const KEPT_STEP_LINES: usize = 40;

impl StepTracker {
    fn line(&mut self, line: &str) {
        if line.starts_with("STEP ") {
            self.step = line.trim_end_matches(':').to_string();
            self.output.clear();
            return;
        }
        if let Some(error) = line
            .strip_prefix("Error: ")
            .or_else(|| line.strip_prefix("error: "))
        {
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
        let reason = self
            .error
            .unwrap_or_else(|| format!("buildah exited with {exit}"));
        BuildError::Failed {
            step,
            reason,
            output: self.output,
        }
    }
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
    pub async fn build(
        &self,
        build: &DockerfileBuild,
        mut output: impl FnMut(&str),
    ) -> Result<(), BuildError> {
        if !Self::available() {
            return Err(BuildError::BuildahMissing);
        }
        if !build.dockerfile.is_file() {
            return Err(BuildError::MissingFile(format!(
                "Dockerfile {}",
                build.dockerfile.display()
            )));
        }
        let mut command = self.command();
        command
            .arg("bud")
            .arg("--isolation")
            .arg("chroot")
            .arg("--layers")
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
        command
            .arg(&build.context)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn()?;
        let mut tracker = StepTracker::default();
        let (stdout, stderr) = match (child.stdout.take(), child.stderr.take()) {
            (Some(out), Some(err)) => (out, err),
            _ => {
                return Err(BuildError::Io(std::io::Error::other(
                    "buildah's output is not captured",
                )));
            }
        };
        let mut out_lines = BufReader::new(stdout).lines();
        let mut err_lines = BufReader::new(stderr).lines();
        let (mut out_open, mut err_open) = (true, true);
        while out_open || err_open {
            tokio::select! {
                line = out_lines.next_line(), if out_open => match line? {
                    Some(line) => { tracker.line(&line); output(&line); }
                    None => out_open = false,
                },
                line = err_lines.next_line(), if err_open => match line? {
                    Some(line) => { tracker.line(&line); output(&line); }
                    None => err_open = false,
                },
            }
        }
        let status = child.wait().await?;
        if status.success() {
            Ok(())
        } else {
            Err(tracker.failure(status))
        }
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

    #[tokio::test]
    async fn builds_and_reports_a_failing_step() {
        if !Buildah::available() || !std::path::Path::new("/bin/busybox").exists() {
            eprintln!(
                "skipping: needs buildah and /bin/busybox (apt-get install buildah busybox-static)"
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
        };
        let mut seen = Vec::new();
        let err = buildah
            .build(&build, |line| seen.push(line.to_string()))
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
