//! Starting the main child and being PID 1: signal forwarding, reaping, shutdown.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{SigSet, SigmaskHow, Signal, kill, sigprocmask};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid, fork, getpid};

use crate::InitError;

/// Signals PID 1 passes on to the main child.
pub const FORWARDED_SIGNALS: &[Signal] = &[
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGWINCH,
    Signal::SIGCONT,
];

/// How long the rest of the processes get between SIGTERM and SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(2);
/// How long to wait for processes to disappear after SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(1);

/// How the main child ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChildExit {
    Exited(i32),
    Signaled(i32),
}

impl ChildExit {
    /// The code init exits with: the child's, or 128 + the signal number.
    pub fn exit_code(self) -> i32 {
        match self {
            ChildExit::Exited(code) => code & 0xff,
            ChildExit::Signaled(sig) => 128 + sig,
        }
    }

    /// Decodes a raw `wait(2)` status; `None` for stopped/continued statuses.
    pub fn from_raw_status(status: i32) -> Option<ChildExit> {
        if libc::WIFEXITED(status) {
            Some(ChildExit::Exited(libc::WEXITSTATUS(status)))
        } else if libc::WIFSIGNALED(status) {
            Some(ChildExit::Signaled(libc::WTERMSIG(status)))
        } else {
            None
        }
    }

    /// The note init prints when the main child is gone.
    pub fn describe(self) -> String {
        match self {
            ChildExit::Exited(code) => format!("main child exited with code {code}"),
            ChildExit::Signaled(sig) => format!("main child killed by signal {}", signal_name(sig)),
        }
    }
}

/// `SIGKILL` for 9, `SIGRTMIN+2` style for real-time signals, `signal N` otherwise.
pub fn signal_name(sig: i32) -> String {
    if let Ok(s) = Signal::try_from(sig) {
        return s.as_str().to_string();
    }
    let (min, max) = (libc::SIGRTMIN(), libc::SIGRTMAX());
    if (min..=max).contains(&sig) {
        return format!("SIGRTMIN+{}", sig - min);
    }
    format!("signal {sig}")
}

/// Everything the child needs, prepared before `fork` so the child does not allocate.
pub struct ChildSpec {
    pub path: CString,
    pub argv: Vec<CString>,
    pub envp: Vec<CString>,
    pub workdir: CString,
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
    pub groups: Vec<libc::gid_t>,
    /// Skip `setgroups`, `setgid`, `setuid` when init already has those ids, so a root
    /// machine runs even where the runtime granted no CAP_SETUID/CAP_SETGID.
    pub keep_groups: bool,
    pub keep_gid: bool,
    pub keep_uid: bool,
}

impl ChildSpec {
    /// Decides which id changes are no-ops for the calling process.
    pub fn skip_unneeded_id_changes(&mut self) {
        let current: Vec<libc::gid_t> = nix::unistd::getgroups()
            .map(|g| g.into_iter().map(|g| g.as_raw()).collect())
            .unwrap_or_else(|_| vec![libc::gid_t::MAX]);
        let (mut want, mut have) = (self.groups.clone(), current);
        want.sort_unstable();
        want.dedup();
        have.sort_unstable();
        have.dedup();
        self.keep_groups = want == have;
        self.keep_gid = nix::unistd::getgid().as_raw() == self.gid
            && nix::unistd::getegid().as_raw() == self.gid;
        self.keep_uid = nix::unistd::getuid().as_raw() == self.uid
            && nix::unistd::geteuid().as_raw() == self.uid;
    }
}

/// The step at which the child failed before (or at) exec.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ChildStage {
    Setsid = 1,
    Setgroups = 2,
    Setgid = 3,
    Setuid = 4,
    Chdir = 5,
    Exec = 6,
}

impl ChildStage {
    fn from_u8(b: u8) -> Option<ChildStage> {
        [
            Self::Setsid,
            Self::Setgroups,
            Self::Setgid,
            Self::Setuid,
            Self::Chdir,
            Self::Exec,
        ]
        .into_iter()
        .find(|s| *s as u8 == b)
    }
}

fn sigset_of(signals: &[Signal]) -> SigSet {
    let mut set = SigSet::empty();
    for s in signals {
        set.add(*s);
    }
    set
}

/// Blocks the forwarded signals and SIGCHLD (they are read from a signalfd instead);
/// returns the blocked set.
pub fn block_signals() -> Result<SigSet, InitError> {
    let mut set = sigset_of(FORWARDED_SIGNALS);
    set.add(Signal::SIGCHLD);
    sigprocmask(SigmaskHow::SIG_BLOCK, Some(&set), None).map_err(|source| InitError::Sys {
        what: "sigprocmask".into(),
        source,
    })?;
    Ok(set)
}

/// PID 1's state: the signalfd over the blocked signals, and signals seen before the
/// child existed.
pub struct Supervisor {
    sfd: SignalFd,
    early: Vec<i32>,
}

impl Supervisor {
    /// Blocks the forwarded signals and SIGCHLD and opens a signalfd for them.
    pub fn new() -> Result<Supervisor, InitError> {
        let set = block_signals()?;
        let sfd = SignalFd::with_flags(&set, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
            .map_err(|source| InitError::Sys {
                what: "signalfd".into(),
                source,
            })?;
        // With our own child reparenting orphans to us, reaping works even when we are
        // not PID 1 (e.g. started under another supervisor); harmless when we are.
        // SAFETY: prctl with integer arguments only.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        Ok(Supervisor {
            sfd,
            early: Vec::new(),
        })
    }

    /// Gives up init's controlling terminal so the child's new session can take it.
    /// Giving it up sends SIGHUP and SIGCONT to our own process group; they are dropped.
    pub fn release_terminal(&mut self) {
        // SAFETY: plain syscalls on fd 0 and our own ids.
        let owns_tty = unsafe {
            libc::isatty(0) == 1
                && libc::getsid(0) == libc::getpid()
                && libc::tcgetsid(0) == libc::getpid()
        };
        if !owns_tty {
            return;
        }
        // SAFETY: TIOCNOTTY takes no argument.
        if unsafe { libc::ioctl(0, libc::TIOCNOTTY) } != 0 {
            return;
        }
        while let Ok(Some(info)) = self.sfd.read_signal() {
            let sig = info.ssi_signo as i32;
            if sig != libc::SIGHUP && sig != libc::SIGCONT {
                self.early.push(sig);
            }
        }
    }

    /// Forks and execs the main child. Returns its pid once exec succeeded; a failure in
    /// the child before or at exec is returned as an error (the child is reaped).
    pub fn spawn(&mut self, spec: &ChildSpec) -> Result<Pid, InitError> {
        let mut fds = [0; 2];
        // SAFETY: fds has room for the two descriptors pipe2 writes.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(InitError::Sys {
                what: "pipe2".into(),
                source: Errno::last(),
            });
        }
        // SAFETY: pipe2 just returned these two fresh descriptors, owned by nobody else.
        let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };

        let mut argv: Vec<*const libc::c_char> = spec.argv.iter().map(|a| a.as_ptr()).collect();
        argv.push(std::ptr::null());
        let mut envp: Vec<*const libc::c_char> = spec.envp.iter().map(|e| e.as_ptr()).collect();
        envp.push(std::ptr::null());

        // SAFETY: the child only makes async-signal-safe syscalls on data prepared above.
        match unsafe { fork() } {
            Err(source) => Err(InitError::Sys {
                what: "fork".into(),
                source,
            }),
            Ok(ForkResult::Child) => unsafe {
                child_after_fork(spec, &argv, &envp, wr.as_raw_fd())
            },
            Ok(ForkResult::Parent { child }) => {
                drop(wr);
                let mut report = [0u8; 5];
                let n = read_full(rd.as_raw_fd(), &mut report);
                if n == 0 {
                    return Ok(child);
                }
                // The child has exited (or is about to); reap it so it is no zombie.
                let _ = waitpid(child, None);
                let stage = ChildStage::from_u8(report[0]).unwrap_or(ChildStage::Exec);
                let errno = if n == report.len() {
                    Errno::from_raw(i32::from_ne_bytes([
                        report[1], report[2], report[3], report[4],
                    ]))
                } else {
                    Errno::UnknownErrno
                };
                Err(InitError::Child {
                    stage,
                    path: spec.path.to_string_lossy().into_owned(),
                    errno,
                })
            }
        }
    }

    /// Waits for the main child, forwarding signals and reaping every other process.
    pub fn supervise(&mut self, child: Pid) -> ChildExit {
        for sig in std::mem::take(&mut self.early) {
            forward(child, sig);
        }
        loop {
            if let (Some(exit), _) = self.reap(Some(child)) {
                return exit;
            }
            match self.next_signal(None) {
                Some(sig) if sig == libc::SIGCHLD => {}
                Some(sig) => forward(child, sig),
                None => {}
            }
        }
    }

    /// The signalfd over the blocked signals (to poll it with other descriptors).
    pub fn signal_fd(&self) -> std::os::fd::RawFd {
        self.sfd.as_raw_fd()
    }

    /// Signals delivered since the last call, without waiting (SIGCHLD included).
    pub fn pending_signals(&mut self) -> Vec<i32> {
        let mut signals = std::mem::take(&mut self.early);
        while let Ok(Some(info)) = self.sfd.read_signal() {
            signals.push(info.ssi_signo as i32);
        }
        signals
    }

    /// Reaps every exited child without blocking; returns each with how it ended.
    pub fn reap_exited(&mut self) -> Vec<(Pid, ChildExit)> {
        let mut reaped = Vec::new();
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => reaped.push((pid, ChildExit::Exited(code))),
                Ok(WaitStatus::Signaled(pid, sig, _)) => {
                    reaped.push((pid, ChildExit::Signaled(sig as i32)))
                }
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
                Ok(_) | Err(Errno::EINTR) => {}
                Err(_) => break,
            }
        }
        reaped
    }

    /// Ends every remaining process: SIGTERM, up to two seconds, then SIGKILL.
    pub fn shutdown(&mut self, main: Pid) {
        let target = if getpid().as_raw() == 1 {
            Pid::from_raw(-1)
        } else {
            // Not PID 1: kill(-1) would reach processes outside this machine.
            Pid::from_raw(-main.as_raw())
        };
        let _ = kill(target, Signal::SIGTERM);
        let _ = kill(target, Signal::SIGCONT);
        if self.wait_all(TERM_GRACE) {
            return;
        }
        let _ = kill(target, Signal::SIGKILL);
        self.wait_all(KILL_GRACE);
    }

    /// Reaps until there are no children left (`true`) or `timeout` passes (`false`).
    fn wait_all(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.reap(None).1 {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            // Signals other than SIGCHLD are no longer forwarded: the main child is gone.
            let _ = self.next_signal(Some(left));
        }
    }

    /// Reaps every exited child without blocking. Returns how `main` ended if it was
    /// among them, and whether no children are left at all.
    fn reap(&mut self, main: Option<Pid>) -> (Option<ChildExit>, bool) {
        let mut found = None;
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) if Some(pid) == main => {
                    found = Some(ChildExit::Exited(code))
                }
                Ok(WaitStatus::Signaled(pid, sig, _)) if Some(pid) == main => {
                    found = Some(ChildExit::Signaled(sig as i32))
                }
                Ok(WaitStatus::StillAlive) => break,
                Ok(_) => {}
                Err(Errno::EINTR) => {}
                Err(Errno::ECHILD) => return (found, true),
                Err(e) => {
                    eprintln!("init: waitpid: {e}");
                    break;
                }
            }
        }
        (found, false)
    }

    /// The next signal from the signalfd, waiting at most `timeout` (forever if `None`).
    fn next_signal(&mut self, timeout: Option<Duration>) -> Option<i32> {
        if let Ok(Some(info)) = self.sfd.read_signal() {
            return Some(info.ssi_signo as i32);
        }
        let ms = timeout.map_or(-1, |t| t.as_millis().clamp(1, i32::MAX as u128) as i32);
        let mut pfd = libc::pollfd {
            fd: self.sfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let _ = unsafe { libc::poll(&mut pfd, 1, ms) };
        match self.sfd.read_signal() {
            Ok(Some(info)) => Some(info.ssi_signo as i32),
            _ => None,
        }
    }
}

pub(crate) fn forward(child: Pid, sig: i32) {
    if let Ok(signal) = Signal::try_from(sig) {
        let _ = kill(child, signal);
    }
}

/// Reads until `buf` is full or EOF; returns the number of bytes read.
fn read_full(fd: libc::c_int, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while n < buf.len() {
        // SAFETY: writes at most buf.len() - n bytes into buf[n..].
        let r = unsafe { libc::read(fd, buf[n..].as_mut_ptr().cast(), buf.len() - n) };
        if r > 0 {
            n += r as usize;
        } else if r == 0 || Errno::last() != Errno::EINTR {
            break;
        }
    }
    n
}

/// The child between fork and exec. Only async-signal-safe calls; never returns.
///
/// # Safety
/// Must be called in the child of a fork, with `argv`/`envp` NULL-terminated arrays of
/// pointers into `spec`.
unsafe fn child_after_fork(
    spec: &ChildSpec,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
    report_fd: libc::c_int,
) -> ! {
    let fail = |stage: ChildStage| -> ! {
        let errno = Errno::last_raw();
        let b = errno.to_ne_bytes();
        let msg = [stage as u8, b[0], b[1], b[2], b[3]];
        let code = exit_code_for(stage, Errno::from_raw(errno));
        // SAFETY: write and _exit are async-signal-safe.
        unsafe {
            libc::write(report_fd, msg.as_ptr().cast(), msg.len());
            libc::_exit(code)
        }
    };
    // SAFETY: plain syscalls on prepared data; see the function's contract.
    unsafe {
        if libc::setsid() < 0 {
            fail(ChildStage::Setsid);
        }
        if libc::isatty(0) == 1 {
            // Best effort: a terminal still owned by another session stays with it.
            libc::ioctl(0, libc::TIOCSCTTY, 0);
        }
        if !spec.keep_groups && libc::setgroups(spec.groups.len(), spec.groups.as_ptr()) != 0 {
            fail(ChildStage::Setgroups);
        }
        if !spec.keep_gid && libc::setgid(spec.gid) != 0 {
            fail(ChildStage::Setgid);
        }
        if libc::chdir(spec.workdir.as_ptr()) != 0 {
            fail(ChildStage::Chdir);
        }
        if !spec.keep_uid && libc::setuid(spec.uid) != 0 {
            fail(ChildStage::Setuid);
        }
        // Ignored dispositions survive exec (Rust ignores SIGPIPE), so reset them all.
        for sig in 1..=libc::SIGRTMAX() {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        libc::execve(spec.path.as_ptr(), argv.as_ptr(), envp.as_ptr());
        fail(ChildStage::Exec)
    }
}

/// Shell conventions: 127 when the program does not exist, 126 when it cannot be run.
pub fn exit_code_for(stage: ChildStage, errno: Errno) -> i32 {
    match (stage, errno) {
        (ChildStage::Exec, Errno::ENOENT | Errno::ENOTDIR) => 127,
        (ChildStage::Exec, _) => 126,
        _ => 127,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes() {
        assert_eq!(ChildExit::Exited(0).exit_code(), 0);
        assert_eq!(ChildExit::Exited(3).exit_code(), 3);
        assert_eq!(ChildExit::Signaled(9).exit_code(), 137);
        assert_eq!(ChildExit::Signaled(15).exit_code(), 143);
    }

    #[test]
    fn raw_statuses() {
        assert_eq!(
            ChildExit::from_raw_status(3 << 8),
            Some(ChildExit::Exited(3))
        );
        assert_eq!(ChildExit::from_raw_status(9), Some(ChildExit::Signaled(9)));
        assert_eq!(
            ChildExit::from_raw_status(0x80 | 11),
            Some(ChildExit::Signaled(11))
        );
        assert_eq!(ChildExit::from_raw_status(0x137f), None); // stopped by SIGSTOP
    }

    #[test]
    fn descriptions() {
        assert_eq!(
            ChildExit::Exited(3).describe(),
            "main child exited with code 3"
        );
        assert_eq!(
            ChildExit::Signaled(9).describe(),
            "main child killed by signal SIGKILL"
        );
        assert_eq!(signal_name(libc::SIGRTMIN() + 2), "SIGRTMIN+2");
        assert_eq!(signal_name(200), "signal 200");
    }

    #[test]
    fn stage_round_trip() {
        for s in [
            ChildStage::Setsid,
            ChildStage::Setgroups,
            ChildStage::Setuid,
            ChildStage::Exec,
        ] {
            assert_eq!(ChildStage::from_u8(s as u8), Some(s));
        }
        assert_eq!(ChildStage::from_u8(0), None);
    }

    #[test]
    fn exec_failure_codes() {
        assert_eq!(exit_code_for(ChildStage::Exec, Errno::ENOENT), 127);
        assert_eq!(exit_code_for(ChildStage::Exec, Errno::EACCES), 126);
        assert_eq!(exit_code_for(ChildStage::Exec, Errno::ENOEXEC), 126);
        assert_eq!(exit_code_for(ChildStage::Setuid, Errno::EPERM), 127);
    }
}
