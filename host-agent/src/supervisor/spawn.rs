//! Building and starting an agent's process: argv exec'd directly (no shell),
//! a minimal inherited environment plus the spec's, its own session and
//! process group, a parent-death signal, rlimits and an optional uid/gid, and
//! exactly three descriptors: 0, 1 and 2 (nothing else the host agent holds,
//! such as other agents' terminals and pipes, or inherited).

use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::process::Stdio;

use agentplane::proto::v1::{AgentSpec, ResourceLimits};
use nix::sys::resource::{setrlimit, Resource};
use nix::sys::signal::Signal;
use tokio::process::{Child, Command};

use super::tree::MARKER;

/// Variables passed through from the host agent's own environment.
const INHERITED_ENV: &[&str] = &["PATH", "HOME", "LANG", "LC_ALL", "TZ", "USER", "LOGNAME"];

/// A started run: the child, and the master side of its terminal (tty agents).
pub struct Spawned {
    /// The process.
    pub child: Child,
    /// The pseudo-terminal's master end, when the spec asked for a tty.
    pub pty: Option<OwnedFd>,
}

/// Starts the spec's program. The child leads a new session and process group
/// (`setsid`), so its pid is its process group id, and it gets SIGKILL if the
/// host agent dies (the guard process covers the rest of its group). With
/// `tty`, its stdio is the slave side of a new pseudo-terminal, which becomes
/// its controlling terminal.
pub fn spawn(id: &str, spec: &AgentSpec) -> std::io::Result<Spawned> {
    let mut cmd = Command::new(&spec.argv[0]);
    cmd.args(&spec.argv[1..])
        .env_clear()
        .envs(
            INHERITED_ENV
                .iter()
                .filter_map(|k| std::env::var_os(k).map(|v| (k, v))),
        )
        .envs(&spec.env)
        // Set last: the spec cannot remove the marker that finds escaped processes.
        .env(MARKER, id)
        // The supervisor decides when the agent dies, not a dropped handle.
        .kill_on_drop(false);
    let mut pty = None;
    if spec.tty {
        let (master, slave) = open_pty()?;
        cmd.stdin(Stdio::from(slave.try_clone()?))
            .stdout(Stdio::from(slave.try_clone()?))
            .stderr(Stdio::from(slave));
        if !spec.env.contains_key("TERM") {
            cmd.env("TERM", "xterm-256color");
        }
        pty = Some(master);
    } else {
        // Captured by the supervisor (see output.rs); stdin for SendInput.
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
    }
    if !spec.cwd.is_empty() {
        cmd.current_dir(&spec.cwd);
    }
    if let Some(gid) = spec.gid {
        cmd.gid(gid);
    }
    if let Some(uid) = spec.uid {
        cmd.uid(uid);
    }
    let limits = rlimits(spec.limits.as_ref());
    before_exec(&mut cmd, limits, spec.tty);
    let child = cmd.spawn()?;
    Ok(Spawned { child, pty })
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

/// The (resource, soft, hard) triples of a spec.
fn rlimits(l: Option<&ResourceLimits>) -> Vec<(Resource, u64, u64)> {
    let Some(l) = l else { return Vec::new() };
    let mut out = Vec::new();
    if let Some(v) = l.address_space_bytes {
        out.push((Resource::RLIMIT_AS, v, v));
    }
    if let Some(v) = l.open_files {
        out.push((Resource::RLIMIT_NOFILE, v, v));
    }
    if let Some(v) = l.processes {
        out.push((Resource::RLIMIT_NPROC, v, v));
    }
    if let Some(v) = l.cpu_seconds {
        // SIGXCPU at the soft limit, SIGKILL a little later at the hard one.
        out.push((Resource::RLIMIT_CPU, v, v.saturating_add(5)));
    }
    out
}

#[allow(unsafe_code)]
fn before_exec(cmd: &mut Command, limits: Vec<(Resource, u64, u64)>, tty: bool) {
    // SAFETY: the closure runs in the forked child before exec, after std has
    // set up its stdio. It only makes raw system calls (setsid, ioctl, prctl,
    // close_range or fcntl, getrlimit, setrlimit), which are async-signal-safe;
    // it allocates nothing (the limits were built before the fork) and takes
    // no lock. The descriptors it marks are the child's own copies.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            // Make the terminal on fd 0 this new session's controlling terminal.
            if tty && libc::ioctl(0, libc::TIOCSCTTY, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
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
            for (resource, soft, hard) in &limits {
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
