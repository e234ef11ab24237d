//! Network namespaces for tests and benchmarks: made with `ip netns add`, entered with
//! `nsenter --net` (never `ip netns exec`, which hides the cgroups) or `setns` on a thread,
//! and deleted when dropped, however the test ends.

use std::process::Command;

/// A named network namespace, with its loopback up.
pub struct Netns {
    name: String,
}

fn run(args: &[&str]) {
    let status = Command::new(args[0])
        .args(&args[1..])
        .status()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(status.success(), "{args:?}: {status}");
}

impl Netns {
    /// `ip netns add <prefix><pid>`: unique per test process.
    pub fn new(prefix: &str) -> Self {
        let name = format!("{prefix}{}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "delete", &name])
            .stderr(std::process::Stdio::null())
            .status();
        run(&["ip", "netns", "add", &name]);
        let netns = Self { name };
        netns.run(&["ip", "link", "set", "lo", "up"]);
        netns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// Runs a command inside, failing the caller if it fails.
    pub fn run(&self, args: &[&str]) {
        let netns = format!("--net={}", self.path());
        let mut all = vec!["nsenter", netns.as_str()];
        all.extend(args);
        run(&all);
    }

    /// Runs `f` on a new thread inside this namespace; threads it starts stay inside, and
    /// sockets and devices it makes belong to the namespace.
    pub fn on_thread<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = self.path();
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).expect("the namespace's file");
            nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .join()
        .expect("the thread inside the namespace")
    }

    /// A veth pair from this namespace (`local`) to `other` (`remote`), both up.
    pub fn veth_to(&self, local: &str, other: &Netns, remote: &str) {
        // Made under a passing name: both ends may be called the same.
        let passing = "vethpassing";
        self.run(&[
            "ip", "link", "add", local, "type", "veth", "peer", "name", passing,
        ]);
        self.run(&["ip", "link", "set", passing, "netns", &other.path()]);
        other.run(&["ip", "link", "set", passing, "name", remote]);
        self.run(&["ip", "link", "set", local, "up"]);
        other.run(&["ip", "link", "set", remote, "up"]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .status();
    }
}

/// Whether this process may make namespaces (root), and why not.
pub fn missing_root() -> Option<String> {
    (!nix::unistd::geteuid().is_root()).then(|| "needs root (network namespaces)".to_string())
}
