//! Which accelerator the microVMs use. KVM only counts where it boots the guest kernel
//! (on a PVM host `/dev/kvm` exists but a stock kernel dies in emulation), so the agent
//! boots the kernel once under KVM and remembers the answer per kernel, QEMU and host.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualisation: machine type `microvm`.
    Kvm,
    /// QEMU's emulator: machine type `q35` (`microvm` under TCG hangs in some boots).
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }

    pub fn machine_type(self) -> &'static str {
        match self {
            Accel::Kvm => "microvm",
            Accel::Tcg => "q35",
        }
    }
}

/// `--vm-accel`: a fixed accelerator or `auto` (probe).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AccelChoice {
    #[default]
    Auto,
    Fixed(Accel),
}

impl std::str::FromStr for AccelChoice {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "auto" => Ok(Self::Auto),
            "kvm" => Ok(Self::Fixed(Accel::Kvm)),
            "tcg" => Ok(Self::Fixed(Accel::Tcg)),
            other => Err(format!(
                "unknown accelerator {other:?}: use kvm, tcg or auto"
            )),
        }
    }
}

/// The outcome of a probe, as cached.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Probe {
    pub kvm_boots: bool,
    pub detail: String,
}

/// How long the guest kernel gets to reach its first userspace step under KVM. A
/// working KVM gets there in well under a second.
const PROBE_TIMEOUT: Duration = Duration::from_secs(6);

fn cache_dir() -> PathBuf {
    if nix::unistd::Uid::effective().is_root() {
        PathBuf::from("/var/cache/aloft")
    } else {
        std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .unwrap_or_else(std::env::temp_dir)
            .join("aloft")
    }
}

/// Whether KVM boots `kernel` here: from the cache, else by booting it once.
pub fn kvm_boots(qemu: &Path, kernel: &Path) -> Probe {
    if !Path::new("/dev/kvm").exists() {
        return Probe {
            kvm_boots: false,
            detail: "/dev/kvm is missing".into(),
        };
    }
    let host = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let key = [qemu, kernel]
        .iter()
        .map(|p| super::assets::file_key(p).unwrap_or_default())
        .collect::<Vec<_>>()
        .join("-");
    let cache = cache_dir().join(format!("vm-accel-{key}-{host}.json"));
    if let Ok(bytes) = std::fs::read(&cache)
        && let Ok(probe) = serde_json::from_slice::<Probe>(&bytes)
    {
        return probe;
    }
    let probe = boot_once(qemu, kernel);
    if std::fs::create_dir_all(cache_dir()).is_ok()
        && let Ok(bytes) = serde_json::to_vec(&probe)
    {
        let _ = std::fs::write(&cache, bytes);
    }
    probe
}

/// Boots the kernel with no root filesystem under KVM: a kernel that runs ends in its
/// "unable to mount root" panic within a moment; one that cannot run shows nothing (or a
/// KVM emulation failure).
fn boot_once(qemu: &Path, kernel: &Path) -> Probe {
    let started = Instant::now();
    let child = Command::new(qemu)
        .args([
            "-M", "microvm", "-accel", "kvm", "-cpu", "host", "-m", "256",
        ])
        .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
        .args(["-serial", "stdio", "-kernel"])
        .arg(kernel)
        .args(["-append", "console=ttyS0 panic=-1 loglevel=1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(e) => {
            return Probe {
                kvm_boots: false,
                detail: format!("running {}: {e}", qemu.display()),
            };
        }
    };
    let mut stdout = child.stdout.take();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(out) = stdout.as_mut() {
            let _ = out.read_to_string(&mut text);
        }
        text
    });
    let finished = loop {
        if let Ok(Some(_)) = child.try_wait() {
            break true;
        }
        if started.elapsed() > PROBE_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            break false;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let console = reader.join().unwrap_or_default();
    let mut stderr = String::new();
    if let Some(mut err) = child.stderr.take() {
        let _ = err.read_to_string(&mut stderr);
    }
    let booted = console.contains("Kernel panic") || console.contains("not syncing");
    let detail = if booted {
        format!(
            "the guest kernel boots under KVM ({} ms to its first userspace step)",
            started.elapsed().as_millis()
        )
    } else if !finished {
        format!(
            "the guest kernel made no progress under KVM within {}s",
            PROBE_TIMEOUT.as_secs()
        )
    } else {
        let why = stderr
            .lines()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("no output");
        format!("the guest kernel does not boot under KVM: {why}")
    };
    Probe {
        kvm_boots: booted,
        detail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_parse() {
        assert_eq!("auto".parse::<AccelChoice>().unwrap(), AccelChoice::Auto);
        assert_eq!(
            "tcg".parse::<AccelChoice>().unwrap(),
            AccelChoice::Fixed(Accel::Tcg)
        );
        assert!(
            "hvf"
                .parse::<AccelChoice>()
                .unwrap_err()
                .contains("kvm, tcg or auto")
        );
        assert_eq!(Accel::Kvm.machine_type(), "microvm");
        assert_eq!(Accel::Tcg.machine_type(), "q35");
    }
}
