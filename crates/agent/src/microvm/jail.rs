//! QEMU confined the way Firecracker's jailer confines its VMM: its own mount and pid
//! namespaces, a chroot (a small tmpfs) holding only its binary, libraries, firmware, the
//! machine's disk files and a few devices, an unprivileged uid of its own, and cgroup
//! limits. Everything it talks to (tap, channel, console, QMP, snapshot) is handed over
//! as an open descriptor.

use std::ffi::CString;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};

use nix::sched::CloneFlags;
use nix::unistd::Pid;

/// Where QEMU's files are bound inside the jail.
pub const VM_DIR: &str = "/vm";
pub const QEMU_IN_JAIL: &str = "/usr/bin/qemu-system-x86_64";

enum Step {
    Mkdir(CString),
    Touch(CString),
    Bind {
        source: CString,
        target: CString,
        writable: bool,
    },
    Symlink {
        target: CString,
        link: CString,
    },
    Mount {
        fstype: CString,
        target: CString,
        data: CString,
    },
}

/// Everything the child does between clone and exec, prepared in the parent (the child
/// of a threaded process may not allocate).
pub struct Jail {
    root: CString,
    steps: Vec<Step>,
    uid: u32,
    program: CString,
    argv: Vec<CString>,
    /// Descriptors QEMU keeps, and stdin/stdout/stderr.
    keep: Vec<RawFd>,
    stdio: [RawFd; 3],
}

fn c(path: impl AsRef<Path>) -> CString {
    CString::new(path.as_ref().as_os_str().as_encoded_bytes()).unwrap_or_default()
}

/// What goes into a jail and what runs there.
pub struct JailSpec<'a> {
    /// An empty directory the jail's tmpfs root is mounted on.
    pub root: &'a Path,
    pub qemu: &'a Path,
    /// The machine's disk, kernel and initramfs (bound read-write at [`VM_DIR`]).
    pub vm_dir: &'a Path,
    pub kvm: bool,
    pub uid: u32,
    pub args: &'a [String],
    /// Descriptors QEMU keeps open.
    pub keep: Vec<RawFd>,
    /// QEMU's stdin, stdout and stderr.
    pub stdio: [RawFd; 3],
}

impl Jail {
    pub fn new(spec: JailSpec<'_>) -> Self {
        let JailSpec {
            root,
            qemu,
            vm_dir,
            kvm,
            uid,
            args,
            keep,
            stdio,
        } = spec;
        let inside = |relative: &str| c(root.join(relative.trim_start_matches('/')));
        let mut steps = vec![Step::Mount {
            fstype: c("tmpfs"),
            target: c(root),
            data: c("size=1m,mode=755"),
        }];
        for dir in ["usr", "usr/bin", "usr/share", "dev", "vm", "proc"] {
            steps.push(Step::Mkdir(inside(dir)));
        }
        // Read-only: libraries and firmware; read-write: the machine's own files.
        let mut dirs: Vec<(PathBuf, &str, bool)> = Vec::new();
        for dir in [
            "/usr/lib",
            "/usr/lib64",
            "/usr/share/qemu",
            "/usr/share/seabios",
        ] {
            if Path::new(dir).is_dir() {
                dirs.push((PathBuf::from(dir), dir, false));
            }
        }
        dirs.push((vm_dir.to_path_buf(), VM_DIR, true));
        for (source, target, writable) in dirs {
            steps.push(Step::Mkdir(inside(target)));
            steps.push(Step::Bind {
                source: c(source),
                target: inside(target),
                writable,
            });
        }
        let mut files: Vec<(PathBuf, &str, bool)> = vec![(qemu.to_path_buf(), QEMU_IN_JAIL, false)];
        let mut devices = vec!["/dev/null", "/dev/zero", "/dev/urandom"];
        if kvm {
            devices.push("/dev/kvm");
        }
        for device in devices {
            files.push((PathBuf::from(device), device, true));
        }
        for (source, target, writable) in files {
            steps.push(Step::Touch(inside(target)));
            steps.push(Step::Bind {
                source: c(source),
                target: inside(target),
                writable,
            });
        }
        for (link, target) in [
            ("lib", "usr/lib"),
            ("lib64", "usr/lib64"),
            ("bin", "usr/bin"),
        ] {
            steps.push(Step::Symlink {
                target: c(target),
                link: inside(link),
            });
        }
        steps.push(Step::Mount {
            fstype: c("proc"),
            target: inside("proc"),
            data: c(""),
        });
        let argv = std::iter::once(QEMU_IN_JAIL.to_string())
            .chain(args.iter().cloned())
            .map(|a| CString::new(a).unwrap_or_default())
            .collect();
        Self {
            root: c(root),
            steps,
            uid,
            program: c(QEMU_IN_JAIL),
            argv,
            keep,
            stdio,
        }
    }

    /// Starts QEMU in the jail; returns its pid (in our pid namespace).
    pub fn spawn(&self) -> Result<Pid, String> {
        let mut stack = vec![0u8; 256 * 1024];
        let mut argv: Vec<*const libc::c_char> = self.argv.iter().map(|a| a.as_ptr()).collect();
        argv.push(std::ptr::null());
        let env: [*const libc::c_char; 1] = [std::ptr::null()];
        let child = Box::new(|| -> isize {
            // SAFETY: only syscalls on data prepared before the clone.
            unsafe { self.in_child(&argv, &env) }
        });
        // SAFETY: the callback only makes syscalls and ends in exec or _exit.
        unsafe {
            nix::sched::clone(
                child,
                &mut stack,
                CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWPID,
                Some(libc::SIGCHLD),
            )
        }
        .map_err(|e| format!("starting QEMU in its jail: {e}"))
    }

    unsafe fn in_child(&self, argv: &[*const libc::c_char], env: &[*const libc::c_char]) -> isize {
        unsafe {
            let fail = |code: i32| -> isize {
                libc::_exit(code);
            };
            let none = std::ptr::null::<libc::c_char>();
            let root_dir = c"/";
            if libc::mount(
                none,
                root_dir.as_ptr(),
                none,
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) != 0
            {
                return fail(120);
            }
            for step in &self.steps {
                let ok = match step {
                    Step::Mkdir(path) => {
                        libc::mkdir(path.as_ptr(), 0o755) == 0
                            || *libc::__errno_location() == libc::EEXIST
                    }
                    Step::Touch(path) => {
                        let fd = libc::open(
                            path.as_ptr(),
                            libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                            0o644,
                        );
                        if fd >= 0 {
                            libc::close(fd);
                        }
                        fd >= 0
                    }
                    Step::Bind {
                        source,
                        target,
                        writable,
                    } => {
                        libc::mount(
                            source.as_ptr(),
                            target.as_ptr(),
                            none,
                            libc::MS_BIND | libc::MS_REC,
                            std::ptr::null(),
                        ) == 0
                            && (*writable
                                || libc::mount(
                                    none,
                                    target.as_ptr(),
                                    none,
                                    libc::MS_BIND
                                        | libc::MS_REMOUNT
                                        | libc::MS_RDONLY
                                        | libc::MS_REC,
                                    std::ptr::null(),
                                ) == 0)
                    }
                    Step::Symlink { target, link } => {
                        libc::symlink(target.as_ptr(), link.as_ptr()) == 0
                    }
                    Step::Mount {
                        fstype,
                        target,
                        data,
                    } => {
                        libc::mount(
                            fstype.as_ptr(),
                            target.as_ptr(),
                            fstype.as_ptr(),
                            libc::MS_NOSUID | libc::MS_NODEV,
                            data.as_ptr().cast(),
                        ) == 0
                    }
                };
                if !ok {
                    return fail(121);
                }
            }
            if libc::chdir(self.root.as_ptr()) != 0
                || libc::chroot(c".".as_ptr()) != 0
                || libc::chdir(root_dir.as_ptr()) != 0
            {
                return fail(122);
            }
            // The jail's own root read-only, now that everything is in place.
            libc::mount(
                none,
                root_dir.as_ptr(),
                none,
                libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
                std::ptr::null(),
            );
            for (target, source) in self.stdio.iter().enumerate() {
                libc::dup2(*source, target as i32);
            }
            for fd in &self.keep {
                libc::fcntl(*fd, libc::F_SETFD, 0);
            }
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setresgid(self.uid, self.uid, self.uid) != 0
                || libc::setresuid(self.uid, self.uid, self.uid) != 0
            {
                return fail(123);
            }
            // Credentials changed, so this must come after: QEMU dies with its supervisor.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
            libc::execve(self.program.as_ptr(), argv.as_ptr(), env.as_ptr());
            fail(124)
        }
    }
}

/// Why the jailed child ended before QEMU ran, from its exit code.
pub fn setup_failure(code: i32) -> Option<&'static str> {
    match code {
        120 => Some("making the jail's mounts private"),
        121 => Some("building the jail (mounts)"),
        122 => Some("entering the jail (chroot)"),
        123 => Some("dropping to the machine's uid"),
        124 => Some("executing QEMU in the jail"),
        _ => None,
    }
}

/// The cgroups of a machine's VMM (memory, CPU, pids).
pub fn cgroup_dirs(machine_id: &str) -> Vec<(String, PathBuf)> {
    ["memory", "cpu", "cpuacct", "pids"]
        .iter()
        .map(|c| {
            (
                c.to_string(),
                Path::new("/sys/fs/cgroup")
                    .join(c)
                    .join("aloft")
                    .join(machine_id),
            )
        })
        .collect()
}

/// Creates the VMM's cgroups with their limits and puts `pid` in them.
pub fn enter_cgroups(machine_id: &str, pid: i32, memory_bytes: u64, cpus: u32) {
    for (controller, dir) in cgroup_dirs(machine_id) {
        if std::fs::create_dir_all(&dir).is_err() {
            continue;
        }
        match controller.as_str() {
            "memory" => {
                let _ = std::fs::write(dir.join("memory.limit_in_bytes"), memory_bytes.to_string());
            }
            "cpu" => {
                let _ = std::fs::write(dir.join("cpu.cfs_period_us"), "100000");
                let _ = std::fs::write(
                    dir.join("cpu.cfs_quota_us"),
                    (u64::from(cpus.max(1)) * 100_000).to_string(),
                );
            }
            "pids" => {
                let _ = std::fs::write(dir.join("pids.max"), "512");
            }
            _ => {}
        }
        let _ = std::fs::write(dir.join("cgroup.procs"), pid.to_string());
    }
}

pub fn remove_cgroups(machine_id: &str) {
    for (_, dir) in cgroup_dirs(machine_id) {
        let _ = std::fs::remove_dir(dir);
    }
}
