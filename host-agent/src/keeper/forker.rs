//! The keeper's forkers: small processes (the keeper's own binary, started
//! with [`FORKER_ARG`]) that fork every agent for the keeper with
//! `CLONE_PARENT`, so that the keeper is still each agent's parent and
//! reaper. A fork copies the forking process's descriptor table and marks
//! its memory copy-on-write: from the keeper, which holds three
//! descriptors per agent, each start cost O(agents) (perf: the children
//! closing the keeper's descriptors at their exec, `filp_flush` and
//! `dnotify_flush`, a third of their time; the keeper faulting in copied
//! pages after each fork); a forker holds a handful and touches little.
//!
//! A forker starts its child as `posix_spawn` does, sharing its memory and
//! waiting until the child has exec'd (`fork::clone_exec`), so each
//! forker starts one agent at a time, from its request to the child's
//! exec. The keeper has [`FORKERS`] of them, each serving one request at a
//! time over a seqpacket pair (the forker's stdin): a [`Launch`] in, a
//! `Spawned` (the pid; the keeper's ends and the exec's report pipe as
//! descriptors) or a `Failed` out. A forker that is gone is started again;
//! one that cannot be started leaves the keeper forking by itself.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, BorrowedFd};
use std::process::{Command, Stdio};

use prost::Message;

use super::fork::{self, Forked};
use super::proto::{self, from_keeper, FromKeeper, Launch};
use super::wire;

/// The argument that starts the keeper's binary as its forker.
pub const FORKER_ARG: &str = "__agentplane_forker";

/// How many forkers a keeper has: starts that overlap (one waiting for a
/// CPU between its fork and its exec, another forking). Each forker
/// process is started when a start first finds the others busy.
pub const FORKERS: usize = 4;
/// A forker held this long by one child (which hangs before its exec: a
/// working directory on a dead network mount, say) while starts queue
/// gets another forker beside it, up to [`MAX_FORKERS`].
const STUCK: std::time::Duration = std::time::Duration::from_millis(250);
/// The most forkers a keeper has when some are stuck.
pub const MAX_FORKERS: usize = 32;

/// One start for the forkers: the keeper's number for it and what to run.
type Job = (u64, Launch);

/// The keeper's forkers: starts queued, handed to an idle forker, and
/// their outcomes as they come.
pub struct Forkers {
    idle: Vec<Forker>,
    queue: VecDeque<Job>,
    busy: tokio::task::JoinSet<(Forker, u64, std::io::Result<Forked>)>,
    /// The start each busy task runs, and since when, by task: what a
    /// panicked one lost, and which one is stuck.
    jobs: HashMap<tokio::task::Id, (u64, tokio::time::Instant)>,
    /// Forkers, idle and busy.
    count: usize,
}

impl Default for Forkers {
    fn default() -> Self {
        Self {
            idle: (0..FORKERS).map(|_| Forker::default()).collect(),
            queue: VecDeque::new(),
            busy: tokio::task::JoinSet::new(),
            jobs: HashMap::new(),
            count: FORKERS,
        }
    }
}

impl Forkers {
    /// Starts `launch` (the keeper's start number `id`) once a forker is
    /// free; its outcome comes from [`Forkers::next`].
    pub fn submit(&mut self, id: u64, launch: Launch) {
        self.queue.push_back((id, launch));
        self.dispatch();
    }

    /// Whether a start is queued or under way.
    pub fn in_flight(&self) -> bool {
        !self.queue.is_empty() || !self.busy.is_empty()
    }

    /// The next start done: its number and the forked child (or why not).
    /// Pending forever while none is in flight. Cancel-safe: an outcome
    /// is taken only when it is returned.
    pub async fn next(&mut self) -> (u64, std::io::Result<Forked>) {
        loop {
            let stuck = (!self.queue.is_empty() && self.count < MAX_FORKERS)
                .then(|| self.jobs.values().map(|(_, since)| *since).min())
                .flatten();
            let joined = tokio::select! {
                joined = self.busy.join_next_with_id() => joined,
                () = async {
                    match stuck {
                        Some(since) => tokio::time::sleep_until(since + STUCK).await,
                        None => std::future::pending().await,
                    }
                } => {
                    self.count += 1;
                    self.idle.push(Forker::default());
                    self.dispatch();
                    continue;
                }
            };
            let (task, done) = match joined {
                None => std::future::pending().await,
                Some(Ok((task, (forker, id, outcome)))) => {
                    self.idle.push(forker);
                    (task, (id, outcome))
                }
                // A panicked forker task: its start failed, and the forker
                // (its socket) went with it; another takes its place.
                Some(Err(e)) => {
                    self.idle.push(Forker::default());
                    let id = self.jobs.get(&e.id()).map_or(0, |(id, _)| *id);
                    let failed =
                        std::io::Error::other(format!("the keeper's forker task failed: {e}"));
                    (e.id(), (id, Err(failed)))
                }
            };
            self.jobs.remove(&task);
            self.dispatch();
            return done;
        }
    }

    fn dispatch(&mut self) {
        while !self.queue.is_empty() {
            let Some(mut forker) = self.idle.pop() else {
                return;
            };
            let Some((id, launch)) = self.queue.pop_front() else {
                self.idle.push(forker);
                return;
            };
            let task = self.busy.spawn(async move {
                let outcome = forker.fork_exec(&launch).await;
                (forker, id, outcome)
            });
            self.jobs
                .insert(task.id(), (id, tokio::time::Instant::now()));
        }
    }
}

/// The keeper's end of one forker.
#[derive(Default)]
pub struct Forker {
    sock: Option<wire::Socket>,
}

impl Forker {
    /// Forks the child that runs `l` through the forker (started if it is
    /// not running; started again once if it went away), or in this
    /// process when no forker can be had.
    pub async fn fork_exec(&mut self, l: &Launch) -> std::io::Result<Forked> {
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
            match ask(sock, l).await {
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

/// Starts a forker: this executable again, its stdin one end of a pair.
fn start() -> std::io::Result<wire::Socket> {
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
    wire::Socket::new(mine)
}

/// One request. `Err`: the forker is gone (nothing was started, or the
/// child it started is this keeper's and is reaped as no one's).
async fn ask(sock: &wire::Socket, l: &Launch) -> Result<std::io::Result<Forked>, wire::WireError> {
    sock.send(&l.encode_to_vec(), &[]).await?;
    let (bytes, mut fds) = sock.recv().await?;
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
    let mut stack = fork::ChildStack::new();
    loop {
        let Ok((bytes, _)) = wire::recv(sock) else {
            std::process::exit(0)
        };
        let started = wire::decode::<Launch>(&bytes)
            .map_err(std::io::Error::other)
            .and_then(|l| fork::clone_exec(&l, &mut stack));
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
