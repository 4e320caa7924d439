//! Starting one program without waiting for its exec: the keeper forks,
//! the child sets itself up (its descriptors, cgroups, session, user,
//! directory, parent-death signal, rlimits) and execs, and the exec's
//! outcome arrives later on a close-on-exec pipe. The keeper, which starts
//! every agent of its host one request at a time, is so held up by a start
//! only for the fork, not for the child's setup and exec (the bulk of a
//! start, and on a loaded machine mostly waiting for a CPU): starts
//! overlap. The agent gets exactly three descriptors, 0, 1 and 2: nothing
//! else the keeper holds (other agents' terminals and pipes) or inherited.

use std::ffi::{CString, NulError};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use nix::fcntl::OFlag;
use nix::sys::resource::{setrlimit, Resource};
use nix::sys::signal::Signal;

use super::proto::{Launch, Limit, LimitKind};

/// A forked child whose exec has not reported yet.
pub struct Forked {
    /// The child's pid.
    pub pid: i32,
    /// What the keeper keeps: stdin's write end, stdout's and stderr's read
    /// ends; or the terminal's master.
    pub fds: Vec<OwnedFd>,
    /// Readable once the child has exec'd (end of file) or failed (its errno).
    pub status: OwnedFd,
}

/// Forks the child that runs `l`. Returns once it is forked; its exec's
/// outcome is [`exec_outcome`] of `status`.
pub fn fork_exec(l: &Launch) -> std::io::Result<Forked> {
    // SAFETY: a plain fork; see `start_child`.
    #[allow(unsafe_code)]
    start_child(l, || unsafe { libc::fork() })
}

/// [`fork_exec`], the child made a child of this process's parent
/// (`CLONE_PARENT`): what the keeper's forker does, so that the keeper is
/// every agent's parent.
pub fn clone_exec(l: &Launch) -> std::io::Result<Forked> {
    // SAFETY: clone without CLONE_VM is a fork (the child gets a copy of
    // the address space and resumes here on its own copy of the stack); its
    // exit signal goes to the keeper, as a child of the keeper's own would.
    #[allow(unsafe_code)]
    start_child(l, || unsafe {
        libc::syscall(
            libc::SYS_clone,
            libc::CLONE_PARENT | libc::SIGCHLD,
            0usize,
            0usize,
            0usize,
            0usize,
        ) as libc::pid_t
    })
}

/// Prepares `l`, forks with `fork` (0 in the child, the pid or -1 here)
/// and runs the child's side there.
fn start_child(l: &Launch, fork: impl FnOnce() -> libc::pid_t) -> std::io::Result<Forked> {
    let p = Prepared::new(l)?;
    let (status, report) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    // The child runs only `child`, which makes async-signal-safe system
    // calls on memory prepared before the fork (no allocation, no lock:
    // another thread of this process may have held one) and ends in an
    // exec or `_exit`.
    match fork() {
        -1 => Err(std::io::Error::last_os_error()),
        0 => child(&p, report.as_raw_fd()),
        pid => {
            // The child's ends close here: the status pipe reads end of file
            // once the child's copy of `report` closes at its exec.
            drop(report);
            Ok(Forked {
                pid,
                fds: p.keep,
                status,
            })
        }
    }
}

/// Waits for a child's exec: `Ok` once the program runs, the error that
/// stopped the child before it otherwise.
pub async fn exec_outcome(status: OwnedFd) -> std::io::Result<()> {
    use tokio::io::AsyncReadExt;
    let mut pipe = tokio::net::unix::pipe::Receiver::from_owned_fd(status)?;
    let mut errno = [0u8; 4];
    match pipe.read_exact(&mut errno).await {
        Ok(_) => Err(std::io::Error::from_raw_os_error(i32::from_ne_bytes(errno))),
        // Closed by the exec with nothing written.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(()),
        Err(e) => Err(e),
    }
}

/// Everything the child needs, built before the fork.
struct Prepared {
    program: CString,
    /// Owns what `argv_ptrs` points into.
    _argv: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    /// Owns what `envp_ptrs` points into.
    _envp: Vec<CString>,
    envp_ptrs: Vec<*const libc::c_char>,
    /// What becomes the child's 0, 1 and 2 (each numbered 3 or above, so
    /// that no move onto 0..2 overwrites another one).
    stdio: [OwnedFd; 3],
    /// The keeper's ends.
    keep: Vec<OwnedFd>,
    limits: Vec<(Resource, u64, u64)>,
    tty: bool,
    /// Open `cgroup.procs` (v1: `tasks`) files to write `0` (this process) to.
    cgroups: Vec<OwnedFd>,
    uid: Option<u32>,
    gid: Option<u32>,
    /// The directory to start in, entered as the agent's user.
    cwd: Option<CString>,
}

impl Prepared {
    fn new(l: &Launch) -> std::io::Result<Self> {
        let Some(program) = l.argv.first() else {
            return Err(invalid("empty argv"));
        };
        let nul = |_: NulError| invalid("an argument or variable contains a NUL byte");
        let program = CString::new(program.as_bytes()).map_err(nul)?;
        let argv = l
            .argv
            .iter()
            .map(|a| CString::new(a.as_bytes()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(nul)?;
        let envp = l
            .env
            .iter()
            .map(|(k, v)| CString::new(format!("{k}={v}")))
            .collect::<Result<Vec<_>, _>>()
            .map_err(nul)?;
        let pointers = |v: &[CString]| {
            v.iter()
                .map(|c| c.as_ptr())
                .chain(std::iter::once(std::ptr::null()))
                .collect::<Vec<_>>()
        };
        let (argv_ptrs, envp_ptrs) = (pointers(&argv), pointers(&envp));
        let (stdio, keep) = if l.tty {
            let (master, slave) = open_pty()?;
            let slave = above_stdio(slave)?;
            (
                [slave.try_clone()?, slave.try_clone()?, slave],
                vec![master],
            )
        } else {
            let (in_r, in_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
            let (out_r, out_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
            let (err_r, err_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
            (
                [above_stdio(in_r)?, above_stdio(out_w)?, above_stdio(err_w)?],
                vec![in_w, out_r, err_r],
            )
        };
        // Entered after the user switch (below), as that user: a directory
        // it may not enter fails the start.
        let cwd = if l.cwd.is_empty() {
            None
        } else {
            Some(CString::new(l.cwd.as_bytes()).map_err(|_| invalid("cwd contains a NUL byte"))?)
        };
        // Opened here, written by the child: it joins its cgroups itself,
        // before the exec, so that nothing it starts is ever outside them.
        let cgroups = l
            .cgroup_procs
            .iter()
            .map(|f| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(f)
                    .map(OwnedFd::from)
                    .map_err(|e| {
                        std::io::Error::new(e.kind(), format!("cannot join cgroup {f}: {e}"))
                    })
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Self {
            program,
            _argv: argv,
            argv_ptrs,
            _envp: envp,
            envp_ptrs,
            stdio,
            keep,
            limits: rlimits(&l.limits),
            tty: l.tty,
            cgroups,
            uid: l.uid,
            gid: l.gid,
            cwd,
        })
    }
}

fn invalid(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, what)
}

/// `fd`, or a close-on-exec copy of it numbered 3 or above when it is one
/// of 0, 1 and 2 (a keeper started with one of them closed).
fn above_stdio(fd: OwnedFd) -> std::io::Result<OwnedFd> {
    if fd.as_raw_fd() > 2 {
        return Ok(fd);
    }
    let raw = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(3))?;
    // SAFETY: fcntl just returned this new descriptor, owned by nobody else.
    #[allow(unsafe_code)]
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

#[allow(unsafe_code)]
extern "C" {
    /// The process's environment, which `execvp` searches `PATH` in.
    static mut environ: *const *const libc::c_char;
}

/// The forked child: sets itself up and execs, or reports why not on
/// `report` and exits 127.
#[allow(unsafe_code)]
fn child(p: &Prepared, report: RawFd) -> ! {
    let errno = match setup(p) {
        Err(e) => e.raw_os_error().unwrap_or(libc::EINVAL),
        // SAFETY: pointers into CStrings and null-terminated arrays that `p`
        // owns; `environ` is this (single-threaded) child's own, set so that
        // the program is looked up on the PATH of its own environment.
        Ok(()) => unsafe {
            environ = p.envp_ptrs.as_ptr();
            libc::execvp(p.program.as_ptr(), p.argv_ptrs.as_ptr());
            *libc::__errno_location()
        },
    };
    let bytes = errno.to_ne_bytes();
    // SAFETY: write and _exit are async-signal-safe; `bytes` lives on this stack.
    unsafe {
        libc::write(report, bytes.as_ptr().cast(), bytes.len());
        libc::_exit(127)
    }
}

/// The child's setup between the fork and the exec. Only raw system calls
/// (dup2, fcntl, signal, sigprocmask, write, setsid, ioctl, setgroups,
/// setgid, setuid, chdir, prctl, close_range, getrlimit, setrlimit): no
/// allocation, no lock. An `io::Error` made from an errno allocates nothing.
#[allow(unsafe_code)]
fn setup(p: &Prepared) -> std::io::Result<()> {
    let check = |r: libc::c_int| {
        if r == -1 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    // SAFETY: system calls on descriptors and memory this child owns.
    unsafe {
        for (target, fd) in (0..).zip(&p.stdio) {
            // A dup2 onto 0..2 leaves the copy open at the exec.
            check(libc::dup2(fd.as_raw_fd(), target))?;
        }
        // The keeper (a Rust program) ignores SIGPIPE, and an ignored
        // signal stays ignored across an exec: a program writing to a
        // closed pipe must die of it as it would from a shell.
        if libc::signal(libc::SIGPIPE, libc::SIG_DFL) == libc::SIG_ERR {
            return Err(std::io::Error::last_os_error());
        }
        // A program starts with no signal blocked, whatever its starter
        // blocks (the keeper blocks SIGINT, SIGHUP and SIGTERM, and a mask
        // is inherited across fork and exec).
        nix::sys::signal::SigSet::empty()
            .thread_set_mask()
            .map_err(std::io::Error::from)?;
        // Still privileged: a process that switched users could not move
        // itself into root's cgroups.
        for fd in &p.cgroups {
            if libc::write(fd.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
        }
        nix::unistd::setsid().map_err(std::io::Error::from)?;
        // Make the terminal on fd 0 this new session's controlling terminal.
        if p.tty {
            check(libc::ioctl(0, libc::TIOCSCTTY, 0))?;
        }
        // No supplementary groups, the group, the user; after the cgroup joins.
        if (p.uid.is_some() || p.gid.is_some()) && libc::geteuid() == 0 {
            check(libc::setgroups(0, std::ptr::null()))?;
        }
        if let Some(gid) = p.gid {
            check(libc::setgid(gid))?;
        }
        if let Some(uid) = p.uid {
            check(libc::setuid(uid))?;
        }
        if let Some(dir) = &p.cwd {
            check(libc::chdir(dir.as_ptr()))?;
        }
        // After the user switch, which clears it.
        nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)?;
        // Every descriptor from 3 up closes at the exec: the program gets
        // 0, 1 and 2 only. Marked rather than closed: the report pipe must
        // stay open until the exec.
        if libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        ) != 0
        {
            let e = std::io::Error::last_os_error();
            // Kernels before 5.11 lack the flag (EINVAL) or the call (ENOSYS).
            if !matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::EINVAL)) {
                return Err(e);
            }
            let (soft, _) = nix::sys::resource::getrlimit(Resource::RLIMIT_NOFILE)
                .map_err(std::io::Error::from)?;
            let top = libc::c_int::try_from(soft).unwrap_or(libc::c_int::MAX);
            for fd in 3..top {
                // EBADF (not open) is the common answer and harmless.
                libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
            }
        }
        for (resource, soft, hard) in &p.limits {
            setrlimit(*resource, *soft, *hard).map_err(std::io::Error::from)?;
        }
    }
    Ok(())
}

/// A new 80x24 pseudo-terminal: (master, slave), both close-on-exec from the
/// moment they exist (nix's `openpty` leaves them inheritable, so every agent
/// started later held them), the master non-blocking.
fn open_pty() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let master = nix::pty::posix_openpt(
        OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK,
    )?;
    nix::pty::grantpt(&master)?;
    nix::pty::unlockpt(&master)?;
    // std opens every file with O_CLOEXEC.
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(nix::pty::ptsname_r(&master)?)?;
    let master = OwnedFd::from(master);
    let size = rustix::termios::Winsize {
        ws_row: 24,
        ws_col: 80,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    rustix::termios::tcsetwinsize(&master, size)?;
    Ok((master, slave.into()))
}

/// The (resource, soft, hard) triples to set before the exec.
fn rlimits(limits: &[Limit]) -> Vec<(Resource, u64, u64)> {
    limits
        .iter()
        .filter_map(|l| {
            let r = match LimitKind::try_from(l.kind).ok()? {
                LimitKind::AddressSpace => Resource::RLIMIT_AS,
                LimitKind::OpenFiles => Resource::RLIMIT_NOFILE,
                LimitKind::Processes => Resource::RLIMIT_NPROC,
                LimitKind::CpuSeconds => Resource::RLIMIT_CPU,
            };
            Some((r, l.soft, l.hard))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    use std::time::{Duration, Instant};

    use nix::sys::wait::{waitpid, WaitStatus};
    use nix::unistd::Pid;

    use super::*;

    fn launch(argv: &[&str]) -> Launch {
        Launch {
            argv: argv.iter().map(|a| (*a).to_owned()).collect(),
            env: [("PATH".to_owned(), "/usr/bin:/bin".to_owned())].into(),
            ..Default::default()
        }
    }

    /// SIGKILLs the child if the test fails before it is reaped: held before
    /// its exec, it holds a copy of the FIFO's read end and would wait forever.
    struct KillOnDrop(Option<i32>);

    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            if let Some(pid) = self.0 {
                let _ =
                    nix::sys::signal::kill(Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
        }
    }

    fn wchan(pid: i32) -> String {
        std::fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default()
    }

    #[tokio::test]
    async fn the_fork_returns_before_the_exec_and_the_outcome_follows_it() {
        // The child's "cgroup.procs" is a full FIFO: its write of `0`
        // holds it before its exec until the test reads.
        let dir = tempfile::tempdir().expect("tempdir");
        let fifo = dir.path().join("cgroup.procs");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
        let mut reader = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
            .expect("reader");
        let mut filler = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
            .expect("filler");
        while filler.write(b"x").is_ok() {}
        let mut l = launch(&["true"]);
        l.cgroup_procs = vec![fifo.to_string_lossy().into_owned()];

        let forked = fork_exec(&l).expect("fork");
        let pid = forked.pid;
        let mut unreaped = KillOnDrop(Some(pid));
        let outcome = tokio::spawn(exec_outcome(forked.status));
        let deadline = Instant::now() + Duration::from_secs(5);
        while !wchan(pid).ends_with("pipe_write") {
            assert!(
                Instant::now() < deadline,
                "the child never blocked: {}",
                wchan(pid)
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(!outcome.is_finished(), "no outcome before the exec");

        let mut drained = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !outcome.is_finished() {
            assert!(Instant::now() < deadline, "no outcome after the exec");
            let _ = std::io::Read::read_to_end(&mut reader, &mut drained);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // The child's `0` may have gone in after the last read above.
        let _ = std::io::Read::read_to_end(&mut reader, &mut drained);
        outcome.await.expect("join").expect("the program ran");
        assert_eq!(
            waitpid(Pid::from_raw(pid), None).expect("wait"),
            WaitStatus::Exited(Pid::from_raw(pid), 0)
        );
        unreaped.0 = None;
        assert!(drained.ends_with(b"0"), "the child joined before its exec");
    }

    #[tokio::test]
    async fn a_missing_program_is_its_exec_error_and_exit_127() {
        let forked = fork_exec(&launch(&["agentplane-no-such-program"])).expect("fork");
        let e = exec_outcome(forked.status)
            .await
            .expect_err("no such program");
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{e}");
        let pid = Pid::from_raw(forked.pid);
        assert_eq!(
            waitpid(pid, None).expect("wait"),
            WaitStatus::Exited(pid, 127)
        );
    }
}
