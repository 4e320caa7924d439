//! What a child needs from its start, built before its fork: argument and
//! environment arrays, descriptors (pipes or a terminal), the cgroup files
//! it joins and the limits it sets. The child itself only makes system
//! calls on this memory (see [`super::fork`]).

use std::ffi::{CString, NulError};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

use nix::fcntl::OFlag;
use nix::sys::resource::Resource;

use super::proto::{Launch, Limit, LimitKind};

/// Everything the child needs, built before the fork.
pub(super) struct Prepared {
    pub(super) program: CString,
    /// Owns what `argv_ptrs` points into.
    pub(super) _argv: Vec<CString>,
    pub(super) argv_ptrs: Vec<*const libc::c_char>,
    /// Owns what `envp_ptrs` points into.
    pub(super) _envp: Vec<CString>,
    pub(super) envp_ptrs: Vec<*const libc::c_char>,
    /// What becomes the child's 0, 1 and 2 (each numbered 3 or above, so
    /// that no move onto 0..2 overwrites another one).
    pub(super) stdio: [OwnedFd; 3],
    /// The keeper's ends.
    pub(super) keep: Vec<OwnedFd>,
    pub(super) limits: Vec<(Resource, u64, u64)>,
    pub(super) tty: bool,
    /// Open `cgroup.procs` (v1: `tasks`) files to write `0` (this process) to.
    pub(super) cgroups: Vec<OwnedFd>,
    pub(super) uid: Option<u32>,
    pub(super) gid: Option<u32>,
    /// The directory to start in, entered as the agent's user.
    pub(super) cwd: Option<CString>,
}

impl Prepared {
    /// Builds what the child of `l` needs: its argument and environment
    /// arrays, its descriptors, its cgroup files and its limits.
    pub(super) fn new(l: &Launch) -> std::io::Result<Self> {
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
