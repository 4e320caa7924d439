//! Starting one program: the child sets itself up (its descriptors,
//! cgroups, session, user, directory, parent-death signal, rlimits) and
//! execs, and the exec's outcome arrives on a close-on-exec pipe.
//! [`clone_exec`], what every forker does, shares the forker's memory and
//! returns once the child has exec'd; the keeper overlaps starts by having
//! several forkers. [`fork_exec`], the keeper's own when it has no forker,
//! is a plain fork that returns before the child's setup and exec. The agent
//! gets exactly three descriptors, 0, 1 and 2: nothing else the keeper
//! holds (other agents' terminals and pipes) or inherited.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use nix::fcntl::OFlag;
use nix::sys::resource::{setrlimit, Resource};
use nix::sys::signal::Signal;

use super::prepared::Prepared;
use super::proto::Launch;

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
    start_child(l, |p, report| {
        // SAFETY: a plain fork; the child runs only `child` (see `start_child`).
        #[allow(unsafe_code)]
        match unsafe { libc::fork() } {
            0 => child(p, report),
            pid => pid,
        }
    })
}

/// The stack a [`clone_exec`] child runs on until its exec: allocated once
/// and reused, since the caller is suspended until the child is done with it.
pub struct ChildStack {
    /// 16-byte aligned words; the stack grows down from the end.
    words: Vec<u128>,
}

impl ChildStack {
    /// Room for the child's setup and `execvp` (which builds each candidate
    /// path on its stack).
    const BYTES: usize = 256 * 1024;

    /// A stack for [`clone_exec`].
    pub fn new() -> Self {
        Self {
            words: vec![0; Self::BYTES / 16],
        }
    }
}

impl Default for ChildStack {
    fn default() -> Self {
        Self::new()
    }
}

/// What the clone's child function gets: the prepared start and the write
/// end of its report pipe.
struct CloneArg<'a> {
    p: &'a Prepared,
    report: RawFd,
}

/// The child side of [`clone_exec`], on the [`ChildStack`].
#[allow(unsafe_code)]
extern "C" fn cloned_child(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the `CloneArg` on the suspended caller's stack.
    let arg = unsafe { &*arg.cast::<CloneArg<'_>>() };
    // The memory is the caller's: a handler of the caller's (std's for
    // SIGSEGV and SIGBUS) must not run here. The others are default or
    // ignored in the forker, and an exec resets handled ones anyway.
    // SAFETY: plain signal(2) calls.
    unsafe {
        libc::signal(libc::SIGSEGV, libc::SIG_DFL);
        libc::signal(libc::SIGBUS, libc::SIG_DFL);
    }
    child(arg.p, arg.report)
}

/// [`fork_exec`] as `posix_spawn` does it: the child shares this process's
/// memory (`CLONE_VM`, no page table copied, nothing copied on write, nothing
/// torn down at its exec) and this thread waits until the child has exec'd
/// or exited (`CLONE_VFORK`). The child is made a child of this process's
/// parent (`CLONE_PARENT`): what the keeper's forker does, so that the
/// keeper is every agent's parent. For a single-threaded caller only: the
/// child points `environ` at the agent's environment (restored here).
///
/// perf, 1,000 starts at concurrency 32: copying the forker's page tables
/// at each fork, faulting its pages back in copy-on-write after it, and
/// tearing the child's copy down at its exec were together about 7% of all
/// the machine's CPU time.
pub fn clone_exec(l: &Launch, stack: &mut ChildStack) -> std::io::Result<Forked> {
    start_child(l, |p, report| {
        let mut arg = CloneArg { p, report };
        let top = stack.words.as_mut_ptr_range().end;
        // SAFETY: `environ` is only read and written by this thread (the
        // forker has no other), saved before the child changes it.
        #[allow(unsafe_code)]
        let saved = unsafe { environ };
        // SAFETY: the child runs `cloned_child` on its own stack (the top of
        // `stack`, 16-byte aligned) and only makes system calls on memory
        // prepared before the clone (`p`, `arg`), which stays alive and
        // untouched here because this thread is suspended until the child
        // has exec'd or exited (CLONE_VFORK).
        #[allow(unsafe_code)]
        let pid = unsafe {
            libc::clone(
                cloned_child,
                top.cast(),
                libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_PARENT | libc::SIGCHLD,
                std::ptr::addr_of_mut!(arg).cast(),
            )
        };
        // SAFETY: as above; the child is past its exec or gone. Restored
        // after reading the clone's errno, which nothing here touches.
        #[allow(unsafe_code)]
        unsafe {
            environ = saved;
        }
        pid
    })
}

/// Prepares `l` and starts its child with `spawn` (given what it
/// prepared and the report pipe's write end; the pid or -1 here), whose
/// child runs only [`child`].
fn start_child(
    l: &Launch,
    spawn: impl FnOnce(&Prepared, RawFd) -> libc::pid_t,
) -> std::io::Result<Forked> {
    let p = Prepared::new(l)?;
    let (status, report) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    // The child runs only `child`, which makes async-signal-safe system
    // calls on memory prepared before the fork (no allocation, no lock:
    // another thread of this process may have held one) and ends in an
    // exec or `_exit`.
    match spawn(&p, report.as_raw_fd()) {
        -1 => Err(std::io::Error::last_os_error()),
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
