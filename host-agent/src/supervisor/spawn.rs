//! Building and starting an agent's process: argv exec'd directly (no shell),
//! a minimal inherited environment plus the spec's, its own session and
//! process group, a parent-death signal, rlimits and an optional uid/gid, and
//! exactly three descriptors: 0, 1 and 2 (nothing else the keeper holds,
//! such as other agents' terminals and pipes, or inherited).

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::process::Stdio;

use agentplane::proto::v1::{AgentSpec, ResourceLimits};

use crate::keeper::proto::{Launch, Limit, LimitKind};
use nix::sys::resource::{setrlimit, Resource};
use nix::sys::signal::Signal;

use super::tree::MARKER;

/// Variables passed through from the host agent's own environment.
const INHERITED_ENV: &[&str] = &["PATH", "HOME", "LANG", "LC_ALL", "TZ", "USER", "LOGNAME"];

/// What starting agent `id` with `spec` means, resolved here once: the
/// whole environment (the inherited variables, the spec's, then the marker,
/// set last so the spec cannot remove it), the terminal's `TERM`, the rlimits.
pub fn launch_of(id: &str, spec: &AgentSpec) -> Launch {
    let mut env: HashMap<String, String> = INHERITED_ENV
        .iter()
        .filter_map(|k| std::env::var(k).ok().map(|v| ((*k).to_owned(), v)))
        .collect();
    env.extend(spec.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    if spec.tty && !spec.env.contains_key("TERM") {
        env.insert("TERM".into(), "xterm-256color".into());
    }
    env.insert(MARKER.into(), id.to_owned());
    Launch {
        argv: spec.argv.clone(),
        env,
        cwd: spec.cwd.clone(),
        uid: spec.uid,
        gid: spec.gid,
        tty: spec.tty,
        limits: limits_of(spec.limits.as_ref()),
        agent: id.to_owned(),
        cgroup_procs: Vec::new(),
    }
}

/// The command that starts `l` (not started yet), and the master side of
/// its terminal when it has one. The keeper starts every agent with it.
pub fn command(l: &Launch) -> std::io::Result<(std::process::Command, Option<OwnedFd>)> {
    let Some(program) = l.argv.first() else {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "empty argv",
        ));
    };
    let mut cmd = std::process::Command::new(program);
    cmd.args(&l.argv[1..]).env_clear().envs(&l.env);
    let mut pty = None;
    if l.tty {
        let (master, slave) = open_pty()?;
        cmd.stdin(Stdio::from(slave.try_clone()?))
            .stdout(Stdio::from(slave.try_clone()?))
            .stderr(Stdio::from(slave));
        pty = Some(master);
    } else {
        // Captured by the supervisor (see output.rs); stdin for SendInput.
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
    }
    // Entered after the user switch (below), as that user: a directory it
    // may not enter fails the start, as it would with std's own order.
    let cwd = if l.cwd.is_empty() {
        None
    } else {
        Some(std::ffi::CString::new(l.cwd.as_bytes()).map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "cwd contains a NUL byte")
        })?)
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
                .map_err(|e| std::io::Error::new(e.kind(), format!("cannot join cgroup {f}: {e}")))
        })
        .collect::<std::io::Result<Vec<_>>>()?;
    let pre = PreExec {
        limits: rlimits(&l.limits),
        tty: l.tty,
        cgroups,
        uid: l.uid,
        gid: l.gid,
        cwd,
    };
    before_exec(&mut cmd, pre);
    Ok((cmd, pty))
}

/// A new 80x24 pseudo-terminal: (master, slave), both close-on-exec from the
/// moment they exist (nix's `openpty` leaves them inheritable, so every agent
/// started later held them), the master non-blocking.
fn open_pty() -> std::io::Result<(OwnedFd, OwnedFd)> {
    use nix::fcntl::OFlag;
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

/// A spec's rlimits.
fn limits_of(l: Option<&ResourceLimits>) -> Vec<Limit> {
    let Some(l) = l else { return Vec::new() };
    let mut out = Vec::new();
    let mut push = |kind: LimitKind, soft: u64, hard: u64| {
        out.push(Limit {
            kind: kind as i32,
            soft,
            hard,
        });
    };
    if let Some(v) = l.address_space_bytes {
        push(LimitKind::AddressSpace, v, v);
    }
    if let Some(v) = l.open_files {
        push(LimitKind::OpenFiles, v, v);
    }
    if let Some(v) = l.processes {
        push(LimitKind::Processes, v, v);
    }
    if let Some(v) = l.cpu_seconds {
        // SIGXCPU at the soft limit, SIGKILL a little later at the hard one.
        push(LimitKind::CpuSeconds, v, v.saturating_add(5));
    }
    out
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

/// What the child does between the fork and the exec, built before the fork.
struct PreExec {
    limits: Vec<(Resource, u64, u64)>,
    tty: bool,
    /// Open `cgroup.procs` files to write `0` (this process) to.
    cgroups: Vec<OwnedFd>,
    uid: Option<u32>,
    gid: Option<u32>,
    /// The directory to start in, entered as the agent's user.
    cwd: Option<std::ffi::CString>,
}

#[allow(unsafe_code)]
fn before_exec(cmd: &mut std::process::Command, pre: PreExec) {
    // SAFETY: the closure runs in the forked child before exec, after std has
    // set up its stdio. It only makes raw system calls (sigprocmask, write,
    // setsid, ioctl, setgroups, setgid, setuid, chdir, prctl, close_range or fcntl,
    // getrlimit, setrlimit), which are async-signal-safe; it allocates
    // nothing (everything was built before the fork) and takes no lock. The
    // descriptors it writes to and marks are the child's own copies.
    unsafe {
        cmd.pre_exec(move || {
            // A program starts with no signal blocked, whatever its starter
            // blocks (the keeper blocks SIGINT and SIGHUP, and a mask is
            // inherited across fork and exec).
            nix::sys::signal::SigSet::empty()
                .thread_set_mask()
                .map_err(std::io::Error::from)?;
            // Still privileged: a process that switched users could not
            // move itself into root's cgroups.
            for fd in &pre.cgroups {
                if libc::write(fd.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            // Make the terminal on fd 0 this new session's controlling terminal.
            if pre.tty && libc::ioctl(0, libc::TIOCSCTTY, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // What std's Command::uid/gid do, here so that it comes after
            // the cgroup joins: no supplementary groups, the group, the user.
            if (pre.uid.is_some() || pre.gid.is_some())
                && libc::geteuid() == 0
                && libc::setgroups(0, std::ptr::null()) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(gid) = pre.gid {
                if libc::setgid(gid) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if let Some(uid) = pre.uid {
                if libc::setuid(uid) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if let Some(dir) = &pre.cwd {
                if libc::chdir(dir.as_ptr()) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // After the user switch, which clears it.
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)?;
            // Every descriptor from 3 up closes at the exec: the program gets
            // 0, 1 and 2 only. Marked rather than closed, because std reports
            // a failed exec to the parent over a close-on-exec pipe of its own
            // that must stay open until the exec.
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
            for (resource, soft, hard) in &pre.limits {
                setrlimit(*resource, *soft, *hard).map_err(std::io::Error::from)?;
            }
            Ok(())
        });
    }
}

/// The error message a user sees for a failed start: names the program.
pub fn describe_spawn_error(spec: &AgentSpec, e: &std::io::Error) -> String {
    let program = &spec.argv[0];
    match e.kind() {
        std::io::ErrorKind::NotFound
            if !spec.cwd.is_empty() && !std::path::Path::new(&spec.cwd).is_dir() =>
        {
            format!(
                "cannot start `{program}`: working directory `{}` does not exist ({e})",
                spec.cwd
            )
        }
        std::io::ErrorKind::NotFound => {
            format!("cannot start `{program}`: no such executable on the host's PATH ({e})")
        }
        std::io::ErrorKind::PermissionDenied => {
            format!("cannot start `{program}`: permission denied ({e})")
        }
        _ => format!("cannot start `{program}`: {e}"),
    }
}
