//! The keeper process (`host-agent __agentplane_keeper DATA_DIR GRACE_MS`):
//! the parent and child subreaper of every agent. It starts programs
//! (through its forkers, small processes that fork as its children; each
//! start answered once its exec is done while the next ones go on), keeps
//! their pipes or terminal masters, reaps every child, and keeps each
//! agent's exit until the host agent acknowledges it. One host agent is
//! attached at a time, over `DATA_DIR/keeper.sock`; a new one receives
//! every kept process with its descriptors. With no host agent for
//! `GRACE_MS`, it exits, and its agents die with it: each has the keeper's
//! death as its parent-death signal, and the keeper's guard child kills the
//! rest of their groups (and their marked escapees) when the keeper's end
//! of its pipe closes, which a SIGKILL of the keeper closes too.

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

use super::forker::Forkers;
use super::kept::{
    forked, send, send_exit, started, Conn, ExecDone, Forking, Forkings, Held, Starting,
};
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
    let mut forkers = Forkers::default();
    let mut forkings = Forkings::default();
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
            (id, outcome) = forkers.next() => {
                let r = forked(client.as_ref(), id, outcome, &mut forkings, &mut kept, &guard, &mut execs).await;
                if let Err(e) = r {
                    eprintln!("keeper: host agent connection: {e}");
                    client = None;
                    liveness.left();
                }
            }
            got = message => {
                let Some(c) = client.as_ref() else { continue };
                match got {
                    Ok((msg, _)) => {
                        if matches!(msg.kind, Some(to_keeper::Kind::Hello(_))) {
                            // Every start forked before the list of kept
                            // processes is sent: one forked after it would
                            // be in no host agent's hands.
                            while forkers.in_flight() {
                                let (id, outcome) = forkers.next().await;
                                let _ = forked(None, id, outcome, &mut forkings, &mut kept, &guard, &mut execs).await;
                            }
                        }
                        let r = handle(c, msg, &mut kept, &guard, &mut liveness, &mut forkers, &mut forkings).await;
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
                    if kept.is_empty() && !forkers.in_flight() {
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
                    let Some(h) = kept.get_mut(&pid) else {
                        if !forkings.by_id.is_empty() {
                            // Perhaps a child whose forker has not answered yet.
                            forkings.early_exits.insert(pid, exit);
                        }
                        continue;
                    };
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
    forkers: &mut Forkers,
    forkings: &mut Forkings,
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
            // The relay: the host agent moves the terminal's output through
            // it to disk; held here too, so what is in it outlives a host
            // agent killed between the two moves. Made first: nothing fails
            // after the fork.
            let relay = if launch.tty {
                match nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC) {
                    Ok((r, w)) => vec![r, w],
                    Err(e) => {
                        let e = std::io::Error::from(e);
                        let failed = from_keeper::Kind::Failed(proto::Failed::of(s.seq, &e));
                        return send(c, failed, &[]).await;
                    }
                }
            } else {
                Vec::new()
            };
            forkings.next_id += 1;
            let id = forkings.next_id;
            forkings.by_id.insert(
                id,
                Forking {
                    tag: s.tag,
                    agent: launch.agent.clone(),
                    tty: launch.tty,
                    cgroup: launch.membership_cgroup().map(str::to_owned),
                    relay,
                    starting: Starting {
                        seq: s.seq,
                        conn: conn.id,
                    },
                },
            );
            // No thaw here: the host agent thaws a reused cgroup when it
            // makes the run's cgroups (`RunCgroup::create`); a new one is
            // never frozen.
            forkers.submit(id, launch);
            Ok(())
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
