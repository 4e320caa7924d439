//! The keeper process (`host-agent __agentplane_keeper DATA_DIR GRACE_MS`):
//! the parent and child subreaper of every agent. It starts programs
//! (forking from its own small address space), keeps their pipes or
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

use super::liveness::Liveness;
use super::proto::{self, from_keeper, to_keeper, FromKeeper, ToKeeper};
use super::wire::{self, Socket};
use crate::supervisor::guard::Guard;
use crate::supervisor::spawn;

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
    let mut client: Option<Socket> = None;
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
                Some(c) => wire::recv_msg::<ToKeeper>(c).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            // Biased, the connection first: a host agent's queued acks and
            // its hang-up are read before the next one is accepted, so a
            // restarted host agent is not refused as a second one.
            biased;
            got = message => {
                let Some(c) = client.as_ref() else { continue };
                match got {
                    Ok((msg, _)) => {
                        if let Err(e) = handle(c, msg, &mut kept, &guard, &mut liveness).await {
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
                            client = Some(sock);
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
                    if let Some(c) = &client {
                        let m = FromKeeper {
                            kind: Some(from_keeper::Kind::Exited(proto::Exited { pid, exit: Some(exit) })),
                        };
                        if wire::send_msg(c, &m, &[]).await.is_err() {
                            client = None;
                            liveness.left();
                        }
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
    c: &Socket,
    msg: ToKeeper,
    kept: &mut HashMap<i32, Held>,
    guard: &Guard,
    liveness: &mut Liveness,
) -> Result<(), wire::WireError> {
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
            match start(&launch) {
                Ok((pid, fds)) => {
                    guard.add(pid, &launch.agent, launch.membership_cgroup());
                    let started_at_ms = agentplane::time::now_ms();
                    let reply = proto::Spawned {
                        seq: s.seq,
                        pid,
                        started_at_ms,
                    };
                    let borrowed: Vec<_> = fds.iter().map(AsFd::as_fd).collect();
                    let sent = send(c, from_keeper::Kind::Spawned(reply), &borrowed).await;
                    kept.insert(
                        pid,
                        Held {
                            tag: s.tag,
                            agent: launch.agent,
                            started_at_ms,
                            tty: launch.tty,
                            fds,
                            exit: None,
                        },
                    );
                    sent
                }
                Err(e) => {
                    let failed = proto::Failed {
                        seq: s.seq,
                        errno: e.raw_os_error(),
                        message: e.to_string(),
                    };
                    send(c, from_keeper::Kind::Failed(failed), &[]).await
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

/// Starts `l`: its pid and the descriptors the keeper keeps (stdin's write
/// end, stdout's and stderr's read ends; or the terminal's master and a
/// relay pipe's read and write ends).
fn start(l: &proto::Launch) -> std::io::Result<(i32, Vec<OwnedFd>)> {
    // A child that joins a frozen cgroup stops before its exec, and the
    // spawn below waits for that exec: this whole process would hang.
    if let Some(dir) = l.membership_cgroup() {
        crate::cgroup::thaw(Path::new(dir));
    }
    let (mut cmd, pty) = spawn::command(l)?;
    let mut child = cmd.spawn()?;
    // The command holds the terminal's slave side: closed now, so the
    // master reads EIO once the agent's processes let go of it.
    drop(cmd);
    let pid = i32::try_from(child.id()).unwrap_or(0);
    let fds = match pty {
        Some(master) => {
            // The relay: the host agent moves the terminal's output through
            // it to disk; held here too, so what is in it outlives a host
            // agent killed between the two moves.
            let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
            vec![master, r, w]
        }
        None => {
            let (Some(i), Some(o), Some(e)) =
                (child.stdin.take(), child.stdout.take(), child.stderr.take())
            else {
                return Err(std::io::Error::other("the child's pipes are missing"));
            };
            vec![i.into(), o.into(), e.into()]
        }
    };
    // Dropping a std Child neither waits for nor kills it: the reaper below does.
    drop(child);
    Ok((pid, fds))
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
