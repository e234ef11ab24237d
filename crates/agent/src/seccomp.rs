//! The seccomp profile every container runs under: Docker's default, an allowlist. A
//! system call not listed fails with EPERM; some are allowed only when the container holds
//! the capability that makes them meaningful (mount and namespaces with CAP_SYS_ADMIN,
//! chroot with CAP_SYS_CHROOT, ...), and `clone` may not create namespaces without
//! CAP_SYS_ADMIN. The profile is rendered as the OCI `linux.seccomp` section for x86_64
//! hosts (with the x86 and x32 ABIs). Unlike Docker's profile before 25.0, io_uring's
//! calls are not allowed: its I/O bypasses this filter.

use serde_json::{Value, json};

/// System calls every container may make.
const ALLOWED: &[&str] = &[
    "accept",
    "accept4",
    "access",
    "adjtimex",
    "alarm",
    "bind",
    "brk",
    "capget",
    "capset",
    "chdir",
    "chmod",
    "chown",
    "chown32",
    "clock_adjtime",
    "clock_adjtime64",
    "clock_getres",
    "clock_getres_time64",
    "clock_gettime",
    "clock_gettime64",
    "clock_nanosleep",
    "clock_nanosleep_time64",
    "close",
    "close_range",
    "connect",
    "copy_file_range",
    "creat",
    "dup",
    "dup2",
    "dup3",
    "epoll_create",
    "epoll_create1",
    "epoll_ctl",
    "epoll_ctl_old",
    "epoll_pwait",
    "epoll_pwait2",
    "epoll_wait",
    "epoll_wait_old",
    "eventfd",
    "eventfd2",
    "execve",
    "execveat",
    "exit",
    "exit_group",
    "faccessat",
    "faccessat2",
    "fadvise64",
    "fadvise64_64",
    "fallocate",
    "fanotify_mark",
    "fchdir",
    "fchmod",
    "fchmodat",
    "fchown",
    "fchown32",
    "fchownat",
    "fcntl",
    "fcntl64",
    "fdatasync",
    "fgetxattr",
    "flistxattr",
    "flock",
    "fork",
    "fremovexattr",
    "fsetxattr",
    "fstat",
    "fstat64",
    "fstatat64",
    "fstatfs",
    "fstatfs64",
    "fsync",
    "ftruncate",
    "ftruncate64",
    "futex",
    "futex_time64",
    "futex_waitv",
    "futimesat",
    "getcpu",
    "getcwd",
    "getdents",
    "getdents64",
    "getegid",
    "getegid32",
    "geteuid",
    "geteuid32",
    "getgid",
    "getgid32",
    "getgroups",
    "getgroups32",
    "getitimer",
    "getpeername",
    "getpgid",
    "getpgrp",
    "getpid",
    "getppid",
    "getpriority",
    "getrandom",
    "getresgid",
    "getresgid32",
    "getresuid",
    "getresuid32",
    "getrlimit",
    "get_robust_list",
    "getrusage",
    "getsid",
    "getsockname",
    "getsockopt",
    "get_thread_area",
    "gettid",
    "gettimeofday",
    "getuid",
    "getuid32",
    "getxattr",
    "inotify_add_watch",
    "inotify_init",
    "inotify_init1",
    "inotify_rm_watch",
    "io_cancel",
    "ioctl",
    "io_destroy",
    "io_getevents",
    "io_pgetevents",
    "io_pgetevents_time64",
    "ioprio_get",
    "ioprio_set",
    "io_setup",
    "io_submit",
    "ipc",
    "kill",
    "landlock_add_rule",
    "landlock_create_ruleset",
    "landlock_restrict_self",
    "lchown",
    "lchown32",
    "lgetxattr",
    "link",
    "linkat",
    "listen",
    "listxattr",
    "llistxattr",
    "_llseek",
    "lremovexattr",
    "lseek",
    "lsetxattr",
    "lstat",
    "lstat64",
    "madvise",
    "membarrier",
    "memfd_create",
    "memfd_secret",
    "mincore",
    "mkdir",
    "mkdirat",
    "mknod",
    "mknodat",
    "mlock",
    "mlock2",
    "mlockall",
    "mmap",
    "mmap2",
    "mprotect",
    "mq_getsetattr",
    "mq_notify",
    "mq_open",
    "mq_timedreceive",
    "mq_timedreceive_time64",
    "mq_timedsend",
    "mq_timedsend_time64",
    "mq_unlink",
    "mremap",
    "msgctl",
    "msgget",
    "msgrcv",
    "msgsnd",
    "msync",
    "munlock",
    "munlockall",
    "munmap",
    "name_to_handle_at",
    "nanosleep",
    "newfstatat",
    "_newselect",
    "open",
    "openat",
    "openat2",
    "pause",
    "pidfd_open",
    "pidfd_send_signal",
    "pipe",
    "pipe2",
    "pkey_alloc",
    "pkey_free",
    "pkey_mprotect",
    "poll",
    "ppoll",
    "ppoll_time64",
    "prctl",
    "pread64",
    "preadv",
    "preadv2",
    "prlimit64",
    "process_mrelease",
    "pselect6",
    "pselect6_time64",
    "pwrite64",
    "pwritev",
    "pwritev2",
    "read",
    "readahead",
    "readlink",
    "readlinkat",
    "readv",
    "recv",
    "recvfrom",
    "recvmmsg",
    "recvmmsg_time64",
    "recvmsg",
    "remap_file_pages",
    "removexattr",
    "rename",
    "renameat",
    "renameat2",
    "restart_syscall",
    "rmdir",
    "rseq",
    "rt_sigaction",
    "rt_sigpending",
    "rt_sigprocmask",
    "rt_sigqueueinfo",
    "rt_sigreturn",
    "rt_sigsuspend",
    "rt_sigtimedwait",
    "rt_sigtimedwait_time64",
    "rt_tgsigqueueinfo",
    "sched_getaffinity",
    "sched_getattr",
    "sched_getparam",
    "sched_get_priority_max",
    "sched_get_priority_min",
    "sched_getscheduler",
    "sched_rr_get_interval",
    "sched_rr_get_interval_time64",
    "sched_setaffinity",
    "sched_setattr",
    "sched_setparam",
    "sched_setscheduler",
    "sched_yield",
    "seccomp",
    "select",
    "semctl",
    "semget",
    "semop",
    "semtimedop",
    "semtimedop_time64",
    "send",
    "sendfile",
    "sendfile64",
    "sendmmsg",
    "sendmsg",
    "sendto",
    "setfsgid",
    "setfsgid32",
    "setfsuid",
    "setfsuid32",
    "setgid",
    "setgid32",
    "setgroups",
    "setgroups32",
    "setitimer",
    "setpgid",
    "setpriority",
    "setregid",
    "setregid32",
    "setresgid",
    "setresgid32",
    "setresuid",
    "setresuid32",
    "setreuid",
    "setreuid32",
    "setrlimit",
    "set_robust_list",
    "setsid",
    "setsockopt",
    "set_thread_area",
    "set_tid_address",
    "setuid",
    "setuid32",
    "setxattr",
    "shmat",
    "shmctl",
    "shmdt",
    "shmget",
    "shutdown",
    "sigaltstack",
    "signalfd",
    "signalfd4",
    "sigprocmask",
    "sigreturn",
    "socketcall",
    "socketpair",
    "splice",
    "stat",
    "stat64",
    "statfs",
    "statfs64",
    "statx",
    "symlink",
    "symlinkat",
    "sync",
    "sync_file_range",
    "syncfs",
    "sysinfo",
    "tee",
    "tgkill",
    "time",
    "timer_create",
    "timer_delete",
    "timer_getoverrun",
    "timer_gettime",
    "timer_gettime64",
    "timer_settime",
    "timer_settime64",
    "timerfd_create",
    "timerfd_gettime",
    "timerfd_gettime64",
    "timerfd_settime",
    "timerfd_settime64",
    "times",
    "tkill",
    "truncate",
    "truncate64",
    "ugetrlimit",
    "umask",
    "uname",
    "unlink",
    "unlinkat",
    "utime",
    "utimensat",
    "utimensat_time64",
    "utimes",
    "vfork",
    "vmsplice",
    "wait4",
    "waitid",
    "waitpid",
    "write",
    "writev",
];

/// `clone` flags that create namespaces.
const NAMESPACE_FLAGS: u64 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWCGROUP) as u64;

/// `personality` domains a program may switch to: Linux, with or without
/// UNAME26 / ADDR_NO_RANDOMIZE, and the query value.
const PERSONALITIES: &[u64] = &[0x0, 0x0008, 0x20000, 0x20008, 0xffff_ffff];

/// A group of system calls and when the profile lets them through.
struct Rule {
    names: &'static [&'static str],
    /// Included only if the container holds all of these capabilities.
    requires: &'static [&'static str],
    /// Left out if the container holds any of these capabilities.
    unless: &'static [&'static str],
    /// Included only on kernels at least this new.
    min_kernel: Option<(u32, u32)>,
    /// Errno to fail with instead of allowing the call.
    errno: Option<i32>,
    /// Argument conditions (OCI `args`), all of which must hold.
    args: fn() -> Vec<Value>,
}

fn no_args() -> Vec<Value> {
    Vec::new()
}

fn clone_without_namespaces() -> Vec<Value> {
    vec![json!({ "index": 0, "value": NAMESPACE_FLAGS, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ" })]
}

fn socket_not_vsock() -> Vec<Value> {
    vec![json!({ "index": 0, "value": libc::AF_VSOCK, "op": "SCMP_CMP_NE" })]
}

const fn allow(names: &'static [&'static str], requires: &'static [&'static str]) -> Rule {
    Rule {
        names,
        requires,
        unless: &[],
        min_kernel: None,
        errno: None,
        args: no_args,
    }
}

const RULES: &[Rule] = &[
    allow(ALLOWED, &[]),
    Rule {
        min_kernel: Some((4, 8)),
        ..allow(&["process_vm_readv", "process_vm_writev", "ptrace"], &[])
    },
    Rule {
        args: socket_not_vsock,
        ..allow(&["socket"], &[])
    },
    allow(&["arch_prctl", "modify_ldt"], &[]),
    allow(&["open_by_handle_at"], &["CAP_DAC_READ_SEARCH"]),
    allow(
        &[
            "bpf",
            "clone",
            "clone3",
            "fanotify_init",
            "fsconfig",
            "fsmount",
            "fsopen",
            "fspick",
            "lookup_dcookie",
            "mount",
            "mount_setattr",
            "move_mount",
            "open_tree",
            "perf_event_open",
            "quotactl",
            "quotactl_fd",
            "setdomainname",
            "sethostname",
            "setns",
            "syslog",
            "umount",
            "umount2",
            "unshare",
        ],
        &["CAP_SYS_ADMIN"],
    ),
    Rule {
        unless: &["CAP_SYS_ADMIN"],
        args: clone_without_namespaces,
        ..allow(&["clone"], &[])
    },
    // glibc falls back to clone when clone3 is missing; clone3's flags live in memory a
    // filter cannot inspect.
    Rule {
        unless: &["CAP_SYS_ADMIN"],
        errno: Some(libc::ENOSYS),
        ..allow(&["clone3"], &[])
    },
    allow(&["reboot"], &["CAP_SYS_BOOT"]),
    allow(&["chroot"], &["CAP_SYS_CHROOT"]),
    allow(
        &["delete_module", "init_module", "finit_module"],
        &["CAP_SYS_MODULE"],
    ),
    allow(&["acct"], &["CAP_SYS_PACCT"]),
    allow(
        &[
            "kcmp",
            "pidfd_getfd",
            "process_madvise",
            "process_vm_readv",
            "process_vm_writev",
            "ptrace",
        ],
        &["CAP_SYS_PTRACE"],
    ),
    allow(&["iopl", "ioperm"], &["CAP_SYS_RAWIO"]),
    allow(
        &["settimeofday", "stime", "clock_settime", "clock_settime64"],
        &["CAP_SYS_TIME"],
    ),
    allow(&["vhangup"], &["CAP_SYS_TTY_CONFIG"]),
    allow(
        &[
            "get_mempolicy",
            "mbind",
            "set_mempolicy",
            "set_mempolicy_home_node",
        ],
        &["CAP_SYS_NICE"],
    ),
    allow(&["syslog"], &["CAP_SYSLOG"]),
    allow(&["bpf"], &["CAP_BPF"]),
    allow(&["perf_event_open"], &["CAP_PERFMON"]),
];

/// The running kernel's (major, minor) version; (0, 0) if unreadable.
pub fn kernel_version() -> (u32, u32) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let mut next = || parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    (next(), next())
}

/// Docker's default profile for a container holding `capabilities`, on a kernel of
/// version `kernel`, as the OCI `linux.seccomp` section.
pub fn default_profile(capabilities: &[&str], kernel: (u32, u32)) -> Value {
    let holds = |cap: &&str| capabilities.contains(cap);
    let syscalls: Vec<Value> = RULES
        .iter()
        .filter(|rule| rule.requires.iter().all(holds) && !rule.unless.iter().any(holds))
        .filter(|rule| rule.min_kernel.is_none_or(|min| kernel >= min))
        .map(|rule| {
            let mut entry = json!({ "names": rule.names });
            match rule.errno {
                Some(errno) => {
                    entry["action"] = json!("SCMP_ACT_ERRNO");
                    entry["errnoRet"] = json!(errno);
                }
                None => entry["action"] = json!("SCMP_ACT_ALLOW"),
            }
            let args = (rule.args)();
            if !args.is_empty() {
                entry["args"] = json!(args);
            }
            entry
        })
        .collect();
    // One entry per value: the entries' conditions are alternatives.
    let syscalls: Vec<Value> = syscalls
        .into_iter()
        .chain(PERSONALITIES.iter().map(|value| {
            json!({
                "names": ["personality"],
                "action": "SCMP_ACT_ALLOW",
                "args": [{ "index": 0, "value": value, "op": "SCMP_CMP_EQ" }],
            })
        }))
        .collect();
    json!({
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": libc::EPERM,
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": syscalls,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules_for<'a>(profile: &'a Value, name: &str) -> Vec<&'a Value> {
        profile["syscalls"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|rule| rule["names"].as_array().unwrap().iter().any(|n| n == name))
            .collect()
    }

    #[test]
    fn an_allowlist_that_fails_other_calls_with_eperm() {
        let profile = default_profile(&["CAP_CHOWN", "CAP_SYS_CHROOT"], (6, 1));
        assert_eq!(profile["defaultAction"], "SCMP_ACT_ERRNO");
        assert_eq!(profile["defaultErrnoRet"], libc::EPERM);
        assert_eq!(profile["architectures"][0], "SCMP_ARCH_X86_64");
        for name in [
            "read",
            "execve",
            "socket",
            "ptrace",
            "chroot",
            "arch_prctl",
            "personality",
        ] {
            assert!(
                rules_for(&profile, name)
                    .iter()
                    .any(|r| r["action"] == "SCMP_ACT_ALLOW"),
                "{name} is allowed"
            );
        }
        for name in [
            "mount",
            "unshare",
            "setns",
            "keyctl",
            "add_key",
            "reboot",
            "kexec_load",
        ] {
            assert!(rules_for(&profile, name).is_empty(), "{name} is not listed");
        }
    }

    /// io_uring runs I/O outside the filter's sight and has been a steady source of kernel
    /// privilege escalations; Docker denies it since 25.0.
    #[test]
    fn io_uring_is_denied_whatever_the_capabilities() {
        for capabilities in [&[][..], &["CAP_SYS_ADMIN"][..]] {
            let profile = default_profile(capabilities, (6, 1));
            for name in ["io_uring_setup", "io_uring_enter", "io_uring_register"] {
                assert!(
                    rules_for(&profile, name).is_empty(),
                    "{name} falls to the default action (EPERM)"
                );
            }
        }
    }

    #[test]
    fn capabilities_and_the_kernel_decide_the_conditional_rules() {
        let plain = default_profile(&[], (6, 1));
        let clone = rules_for(&plain, "clone");
        assert_eq!(clone.len(), 1);
        assert_eq!(clone[0]["args"][0]["op"], "SCMP_CMP_MASKED_EQ");
        assert_eq!(clone[0]["args"][0]["value"], 0x7e02_0000_u64);
        assert_eq!(rules_for(&plain, "clone3")[0]["errnoRet"], libc::ENOSYS);
        assert!(rules_for(&plain, "chroot").is_empty());

        let admin = default_profile(&["CAP_SYS_ADMIN"], (6, 1));
        let clone = rules_for(&admin, "clone");
        assert!(clone.len() == 1 && clone[0].get("args").is_none());
        assert!(rules_for(&admin, "clone3")[0]["action"] == "SCMP_ACT_ALLOW");
        assert!(!rules_for(&admin, "mount").is_empty());

        assert!(rules_for(&default_profile(&[], (4, 4)), "ptrace").is_empty());
        assert!(kernel_version() >= (3, 0));
    }
}
