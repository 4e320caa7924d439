//! The keeper's forker: a small process (the keeper's own binary, started
//! with [`FORKER_ARG`]) that forks every agent for the keeper with
//! `CLONE_PARENT`, so that the keeper is still each agent's parent and
//! reaper. A fork copies the forking process's descriptor table and marks
//! its memory copy-on-write: from the keeper, which holds three
//! descriptors per agent, each start cost O(agents) (perf: the children
//! closing the keeper's descriptors at their exec, `filp_flush` and
//! `dnotify_flush`, a third of their time; the keeper faulting in copied
//! pages after each fork); the forker holds a handful and touches little.
//!
//! One request at a time over a seqpacket pair (the forker's stdin): a
//! [`Launch`] in, a `Spawned` (the pid; the keeper's ends and the exec's
//! report pipe as descriptors) or a `Failed` out. The keeper waits for the
//! answer before it reaps again, so a child that ends at once is still
//! found in its list. A forker that is gone is started again; one that
//! cannot be started leaves the keeper forking by itself.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::process::{Command, Stdio};

use prost::Message;

use super::fork::{self, Forked};
use super::proto::{self, from_keeper, FromKeeper, Launch};
use super::wire;

/// The argument that starts the keeper's binary as its forker.
pub const FORKER_ARG: &str = "__agentplane_forker";

/// The keeper's end of its forker.
#[derive(Default)]
pub struct Forker {
    sock: Option<OwnedFd>,
}

impl Forker {
    /// Forks the child that runs `l` through the forker (started if it is
    /// not running; started again once if it went away), or in this
    /// process when no forker can be had.
    pub fn fork_exec(&mut self, l: &Launch) -> std::io::Result<Forked> {
        for _ in 0..2 {
            if self.sock.is_none() {
                match start() {
                    Ok(sock) => self.sock = Some(sock),
                    Err(e) => {
                        eprintln!("keeper: cannot start its forker ({e}); forking by itself");
                        break;
                    }
                }
            }
            let Some(sock) = &self.sock else { break };
            match ask(sock.as_fd(), l) {
                Ok(answer) => return answer,
                Err(e) => {
                    eprintln!("keeper: its forker went away ({e}); starting another");
                    self.sock = None;
                }
            }
        }
        fork::fork_exec(l)
    }
}

/// Starts the forker: this executable again, its stdin one end of a pair.
fn start() -> std::io::Result<OwnedFd> {
    use std::os::unix::process::CommandExt;
    let (mine, theirs) = wire::pair().map_err(std::io::Error::other)?;
    // The running executable even if an upgrade replaced or removed its file.
    Command::new("/proc/self/exe")
        .arg0(std::env::current_exe().unwrap_or_else(|_| super::KEEPER_BIN.into()))
        .arg(FORKER_ARG)
        .arg(std::process::id().to_string())
        .stdin(Stdio::from(theirs))
        .spawn()?;
    // Dropping the handle neither waits nor kills: the keeper reaps it
    // with its other children, as no one's.
    Ok(mine)
}

/// One request. `Err`: the forker is gone (nothing was started, or the
/// child it started is this keeper's and is reaped as no one's).
fn ask(sock: BorrowedFd<'_>, l: &Launch) -> Result<std::io::Result<Forked>, wire::WireError> {
    wire::send(sock, &l.encode_to_vec(), &[])?;
    let (bytes, mut fds) = wire::recv(sock)?;
    let reply: FromKeeper = wire::decode(&bytes)?;
    Ok(match reply.kind {
        Some(from_keeper::Kind::Spawned(s)) => match fds.pop() {
            Some(status) => Ok(Forked {
                pid: s.pid,
                fds,
                status,
            }),
            None => Err(std::io::Error::other("the forker sent no report pipe")),
        },
        Some(from_keeper::Kind::Failed(f)) => Err(f.into_io_error()),
        _ => Err(std::io::Error::other("the forker answered out of turn")),
    })
}

/// Forker mode: serves the keeper that started it until it goes away.
pub fn run_forker(args: &[String]) -> ! {
    // With its keeper: a forker outliving it would be nobody's.
    let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL);
    let keeper = args.first().and_then(|p| p.parse::<i32>().ok());
    if keeper != Some(nix::unistd::getppid().as_raw()) {
        // Its keeper died before the line above took effect.
        std::process::exit(0);
    }
    // Like the keeper: a terminal's Ctrl-C or hang-up is not for it.
    let mut blocked = nix::sys::signal::SigSet::empty();
    for sig in [
        nix::sys::signal::Signal::SIGINT,
        nix::sys::signal::Signal::SIGHUP,
        nix::sys::signal::Signal::SIGTERM,
    ] {
        blocked.add(sig);
    }
    let _ = blocked.thread_block();
    let sock = std::io::stdin();
    let sock = sock.as_fd();
    loop {
        let Ok((bytes, _)) = wire::recv(sock) else {
            std::process::exit(0)
        };
        let started = wire::decode::<Launch>(&bytes)
            .map_err(std::io::Error::other)
            .and_then(|l| fork::clone_exec(&l));
        let (kind, held) = match started {
            Ok(f) => {
                let spawned = proto::Spawned {
                    seq: 0,
                    pid: f.pid,
                    started_at_ms: 0,
                };
                let mut held = f.fds;
                held.push(f.status);
                (from_keeper::Kind::Spawned(spawned), held)
            }
            Err(e) => (
                from_keeper::Kind::Failed(proto::Failed::of(0, &e)),
                Vec::new(),
            ),
        };
        let reply = FromKeeper { kind: Some(kind) }.encode_to_vec();
        let fds: Vec<BorrowedFd<'_>> = held.iter().map(AsFd::as_fd).collect();
        if wire::send(sock, &reply, &fds).is_err() {
            std::process::exit(0);
        }
        // `held` closes here: the keeper has its copies.
    }
}
