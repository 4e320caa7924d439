//! The keeper process (`host-agent __agentplane_keeper DATA_DIR GRACE_MS`):
//! the parent and child subreaper of every agent. It starts programs
//! (forking from its own small address space, answering each start once
//! its exec is done while it goes on with the next), keeps their pipes or
//! terminal masters, reaps every child, and keeps each agent's exit until
//! the host agent acknowledges it. One host agent is attached at a time,
//! over `DATA_DIR/keeper.sock`; a new one receives every kept process with
//! its descriptors. With no host agent for `GRACE_MS`, it exits, and its
//! agents die with it: each has the keeper's death as its parent-death
//! signal, and the keeper's guard child kills the rest of their groups
//! (and their marked escapees) when the keeper's end of its pipe closes,
//! which a SIGKILL of the keeper closes too.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::{SigSet, Signal};
use nix::sys::socket::{
    accept4, bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr,
};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use super::fork::{self, Forked};
use super::forker::Forker;
use super::liveness::Liveness;
use super::proto::{self, from_keeper, to_keeper, FromKeeper, ToKeeper};
use super::wire::{self, Socket};
use crate::supervisor::guard::Guard;

/// The argument that starts `host-agent` in keeper mode.
pub const KEEPER_ARG: &str = "__agentplane_keeper";
/// How long a keeper with nothing to keep waits for its first host agent.
const FIRST_CLIENT: Duration = Duration::from_secs(10);

/// The keeper's socket in a data dir.
pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join("keeper.sock")
}

/// One kept process.
struct Held {
    tag: String,
    agent: String,
    started_at_ms: i64,
    tty: bool,
    /// stdin, stdout, stderr; or the terminal's master.
    fds: Vec<OwnedFd>,
    exit: Option<proto::Exit>,
    /// A start whose exec has not reported yet: its request, which is
    /// answered first (the host agent hears of an exit only after its start).
    starting: Option<Starting>,
}

/// The request that started a process still exec'ing.
struct Starting {
    seq: u64,
    /// The connection it came on ([`Conn::id`]).
    conn: u64,
}

/// The attached host agent.
struct Conn {
    sock: Socket,
    /// Which attachment this is: a start requested on an earlier one is not
    /// answered on this one (this one heard of it in its `Kept` list).
    id: u64,
}

/// A start's exec outcome: the pid, and `Ok` once the program runs.
type ExecDone = (i32, std::io::Result<()>);

/// Keeper mode: never returns.
pub fn run_keeper(args: &[String]) -> ! {
    let (Some(dir), Some(grace)) = (
        args.first().map(PathBuf::from),
        args.get(1).and_then(|g| g.parse::<u64>().ok()),
    ) else {
        eprintln!("usage: host-agent {KEEPER_ARG} DATA_DIR ORPHAN_GRACE_MS");
        std::process::exit(agentplane::EXIT_USAGE);
    };
    // A Ctrl-C or hang-up meant for the host agent's terminal, or the
    // SIGTERM systemd sends the whole unit, must not take the agents down
    // with no grace: the host agent decides (the guard does the same).
    // Agents start with an empty mask (spawn.rs).
    let mut blocked = SigSet::empty();
    for sig in [Signal::SIGINT, Signal::SIGHUP, Signal::SIGTERM] {
        blocked.add(sig);
    }
    let _ = blocked.thread_block();
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        eprintln!("keeper: cannot become a child subreaper: {e}");
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let code = match runtime {
        Ok(rt) => match rt.block_on(serve(&dir, Duration::from_millis(grace))) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("keeper: {e}");
                1
            }
        },
        Err(e) => {
            eprintln!("keeper: cannot start: {e}");
            1
        }
    };
    std::process::exit(code)
}

/// Binds the socket (after taking the data dir's keeper lock: one keeper
/// per data dir) and serves until there is nothing to keep or no host agent
/// came back within the grace.
async fn serve(dir: &Path, grace: Duration) -> std::io::Result<()> {
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("keeper.lock"))?;
    // Held until the keeper exits.
    let Ok(_lock) = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock)
    else {
        // Another keeper serves this data dir: the host agent connects to it.
        return Ok(());
    };
    let path = socket_path(dir);
    let _ = std::fs::remove_file(&path);
    let listener = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    bind(listener.as_raw_fd(), &UnixAddr::new(&path)?)?;
    listen(&listener, Backlog::new(8)?)?;
    #[allow(deprecated)]
    let listener = tokio::io::unix::AsyncFd::new(listener)?;
    let guard = Guard::start();
    let mut sigchld = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())?;
    let mut kept: HashMap<i32, Held> = HashMap::new();
    let mut client: Option<Conn> = None;
    let mut attached = 0u64;
    // The starts whose exec has not reported yet.
    let mut execs: tokio::task::JoinSet<ExecDone> = tokio::task::JoinSet::new();
    let mut forker = Forker::default();
    let mut liveness = Liveness::new(grace);
    // Until the first host agent is attached.
    let mut first = Some(tokio::time::Instant::now() + FIRST_CLIENT.max(grace));
    loop {
        let deadline = match client {
            Some(_) => None,
            None => first.or_else(|| liveness.deadline()),
        };
        let orphaned = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        let message = async {
            match &client {
                Some(c) => wire::recv_msg::<ToKeeper>(&c.sock).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            // Biased. Starts whose exec is done are answered before more
            // requests are read: under a flood of starts, the oldest finish
            // first. Then the connection: a host agent's queued acks and
            // its hang-up are read before the next one is accepted, so a
            // restarted host agent is not refused as a second one.
            biased;
            Some(done) = execs.join_next() => {
                let done = match done {
                    Ok(done) => done,
                    Err(e) => {
                        eprintln!("keeper: a start's watch ended: {e}");
                        continue;
                    }
                };
                if let Err(e) = started(client.as_ref(), done, &mut kept, &guard).await {
                    eprintln!("keeper: host agent connection: {e}");
                    client = None;
                    liveness.left();
                }
            }
            got = message => {
                let Some(c) = client.as_ref() else { continue };
                match got {
                    Ok((msg, _)) => {
                        let r = handle(c, msg, &mut kept, &guard, &mut liveness, &mut execs, &mut forker).await;
                        if let Err(e) = r {
                            eprintln!("keeper: host agent connection: {e}");
                            client = None;
                        }
                    }
                    Err(e) => {
                        if !matches!(e, wire::WireError::Closed) {
                            eprintln!("keeper: host agent connection: {e}");
                        }
                        client = None;
                    }
                }
                if client.is_none() {
                    if kept.is_empty() {
                        return Ok(());
                    }
                    liveness.left();
                }
            }
            ready = listener.readable() => {
                let mut ready = ready?;
                match accept4(listener.get_ref().as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
                    Ok(fd) => {
                        // SAFETY: accept4 just returned this descriptor, owned by nobody else.
                        #[allow(unsafe_code)]
                        let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
                        let sock = Socket::new(fd)?;
                        if client.is_some() {
                            // Its Hello is read first: closing a socket with
                            // unread data resets it, and the refusal is lost.
                            tokio::spawn(async move {
                                let _ = tokio::time::timeout(
                                    Duration::from_secs(1),
                                    wire::recv_msg::<ToKeeper>(&sock),
                                )
                                .await;
                                let busy = FromKeeper { kind: Some(from_keeper::Kind::Busy(0)) };
                                let _ = wire::send_msg(&sock, &busy, &[]).await;
                            });
                        } else {
                            attached += 1;
                            client = Some(Conn { sock, id: attached });
                            first = None;
                            liveness.back();
                        }
                    }
                    Err(nix::errno::Errno::EAGAIN) => ready.clear_ready(),
                    Err(e) => eprintln!("keeper: accept: {e}"),
                }
            }
            _ = sigchld.recv() => {
                for (pid, exit) in reap() {
                    let Some(h) = kept.get_mut(&pid) else { continue };
                    h.exit = Some(exit);
                    let Some(c) = &client else { continue };
                    // Told after its start's answer (`started`).
                    if h.starting.as_ref().is_some_and(|s| s.conn == c.id) {
                        continue;
                    }
                    if send_exit(&c.sock, pid, exit).await.is_err() {
                        client = None;
                        liveness.left();
                    }
                }
            }
            () = liveness.renewed() => {}
            () = orphaned => {
                if !kept.is_empty() {
                    eprintln!("keeper: {}; ending {} agents", liveness.reason(), kept.len());
                }
                // Each live group now; the guard finds the rest once this
                // exits. Not an ended run's: its pid is reaped and may
                // already name someone else's group.
                for (pid, _) in kept.iter().filter(|(_, h)| h.exit.is_none()) {
                    let _ = nix::sys::signal::killpg(Pid::from_raw(*pid), Signal::SIGKILL);
                }
                liveness.end().await;
                return Ok(());
            }
        }
    }
}

/// Answers one request.
async fn handle(
    conn: &Conn,
    msg: ToKeeper,
    kept: &mut HashMap<i32, Held>,
    guard: &Guard,
    liveness: &mut Liveness,
    execs: &mut tokio::task::JoinSet<ExecDone>,
    forker: &mut Forker,
) -> Result<(), wire::WireError> {
    let c = &conn.sock;
    match msg.kind {
        Some(to_keeper::Kind::Liveness(l)) => {
            liveness.configure(l);
            Ok(())
        }
        Some(to_keeper::Kind::Hello(_version)) => {
            let welcome = proto::Welcome {
                version: proto::VERSION,
                pid: i32::try_from(std::process::id()).unwrap_or(0),
            };
            send(c, from_keeper::Kind::Welcome(welcome), &[]).await?;
            for (pid, h) in kept.iter() {
                let k = proto::Kept {
                    tag: h.tag.clone(),
                    pid: *pid,
                    started_at_ms: h.started_at_ms,
                    tty: h.tty,
                    exit: h.exit,
                };
                let fds: Vec<_> = h.fds.iter().map(AsFd::as_fd).collect();
                send(c, from_keeper::Kind::Kept(k), &fds).await?;
            }
            send(c, from_keeper::Kind::Ready(true), &[]).await
        }
        Some(to_keeper::Kind::Spawn(s)) => {
            let launch = s.launch.unwrap_or_default();
            match start(forker, &launch) {
                Ok(Forked { pid, fds, status }) => {
                    guard.add(pid, &launch.agent, launch.membership_cgroup());
                    // Kept from the fork on, so that the reaper finds it
                    // whenever it ends.
                    kept.insert(
                        pid,
                        Held {
                            tag: s.tag,
                            agent: launch.agent,
                            started_at_ms: agentplane::time::now_ms(),
                            tty: launch.tty,
                            fds,
                            exit: None,
                            starting: Some(Starting {
                                seq: s.seq,
                                conn: conn.id,
                            }),
                        },
                    );
                    execs.spawn(async move { (pid, fork::exec_outcome(status).await) });
                    Ok(())
                }
                Err(e) => {
                    send(
                        c,
                        from_keeper::Kind::Failed(proto::Failed::of(s.seq, &e)),
                        &[],
                    )
                    .await
                }
            }
        }
        Some(to_keeper::Kind::Ack(pid)) => {
            if let Some(h) = kept.get(&pid) {
                if h.exit.is_some() {
                    guard.remove(pid, &h.agent);
                    kept.remove(&pid);
                }
            }
            Ok(())
        }
        None => Ok(()),
    }
}

async fn send(
    c: &Socket,
    kind: from_keeper::Kind,
    fds: &[std::os::fd::BorrowedFd<'_>],
) -> Result<(), wire::WireError> {
    wire::send_msg(c, &FromKeeper { kind: Some(kind) }, fds).await
}

async fn send_exit(c: &Socket, pid: i32, exit: proto::Exit) -> Result<(), wire::WireError> {
    let exited = proto::Exited {
        pid,
        exit: Some(exit),
    };
    send(c, from_keeper::Kind::Exited(exited), &[]).await
}

/// Answers the start of `pid`, whose exec reported `outcome`, on the
/// connection that asked for it; then its exit, if it has ended since. A
/// start asked on an earlier connection is not answered: the current host
/// agent got the process in its `Kept` list and hears of its exit as of any
/// other (a failed exec exits 127).
async fn started(
    client: Option<&Conn>,
    (pid, outcome): ExecDone,
    kept: &mut HashMap<i32, Held>,
    guard: &Guard,
) -> Result<(), wire::WireError> {
    let Some(h) = kept.get_mut(&pid) else {
        return Ok(());
    };
    let Some(starting) = h.starting.take() else {
        return Ok(());
    };
    let Some(c) = client.filter(|c| c.id == starting.conn) else {
        return Ok(());
    };
    match outcome {
        Ok(()) => {
            h.started_at_ms = agentplane::time::now_ms();
            let reply = proto::Spawned {
                seq: starting.seq,
                pid,
                started_at_ms: h.started_at_ms,
            };
            let fds: Vec<_> = h.fds.iter().map(AsFd::as_fd).collect();
            send(&c.sock, from_keeper::Kind::Spawned(reply), &fds).await?;
            match h.exit {
                Some(exit) => send_exit(&c.sock, pid, exit).await,
                None => Ok(()),
            }
        }
        Err(e) => {
            // Never ran: forgotten (its zombie is reaped as a stranger's).
            if let Some(h) = kept.remove(&pid) {
                guard.remove(pid, &h.agent);
            }
            let reply = from_keeper::Kind::Failed(proto::Failed::of(starting.seq, &e));
            send(&c.sock, reply, &[]).await
        }
    }
}

/// Has the forker fork the child that runs `l` (see [`fork`] and
/// [`super::forker`]), with the descriptors the
/// keeper keeps: stdin's write end, stdout's and stderr's read ends; or the
/// terminal's master and a relay pipe's read and write ends.
fn start(forker: &mut Forker, l: &proto::Launch) -> std::io::Result<Forked> {
    // No thaw here: the host agent thaws a reused cgroup when it makes the
    // run's cgroups (`RunCgroup::create`); a new one is never frozen.
    // The relay: the host agent moves the terminal's output through it to
    // disk; held here too, so what is in it outlives a host agent killed
    // between the two moves. Made first: nothing fails after the fork.
    let relay = if l.tty {
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        vec![r, w]
    } else {
        Vec::new()
    };
    let mut forked = forker.fork_exec(l)?;
    forked.fds.extend(relay);
    Ok(forked)
}

/// Reaps every ended child; returns (pid, exit) of each.
fn reap() -> Vec<(i32, proto::Exit)> {
    let mut out = Vec::new();
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => out.push((
                pid.as_raw(),
                proto::Exit {
                    code: Some(code),
                    signal: None,
                },
            )),
            Ok(WaitStatus::Signaled(pid, sig, _)) => out.push((
                pid.as_raw(),
                proto::Exit {
                    code: None,
                    signal: Some(sig as i32),
                },
            )),
            Ok(WaitStatus::StillAlive) | Err(_) => return out,
            Ok(_) => {}
        }
    }
}
