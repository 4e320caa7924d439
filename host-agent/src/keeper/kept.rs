//! What the keeper keeps: each process it started (its descriptors and
//! exit), the starts its forkers have not answered yet, and how a start is
//! answered to the host agent that asked: once forked, once exec'd.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};

use super::fork::{self, Forked};
use super::proto::{self, from_keeper, FromKeeper};
use super::wire::{self, Socket};
use crate::supervisor::guard::Guard;

/// One kept process.
pub(super) struct Held {
    pub(super) tag: String,
    pub(super) agent: String,
    pub(super) started_at_ms: i64,
    pub(super) tty: bool,
    /// stdin, stdout, stderr; or the terminal's master.
    pub(super) fds: Vec<OwnedFd>,
    pub(super) exit: Option<proto::Exit>,
    /// A start whose exec has not reported yet: its request, which is
    /// answered first (the host agent hears of an exit only after its start).
    pub(super) starting: Option<Starting>,
}

/// The request that started a process still exec'ing.
pub(super) struct Starting {
    pub(super) seq: u64,
    /// The connection it came on ([`Conn::id`]).
    pub(super) conn: u64,
}

/// A start the forkers have, not yet forked: what keeping its child needs.
pub(super) struct Forking {
    pub(super) tag: String,
    pub(super) agent: String,
    pub(super) tty: bool,
    /// The agent's cgroup, where the guard finds its members.
    pub(super) cgroup: Option<String>,
    /// A terminal's relay pipe: the host agent moves the terminal's output
    /// through it to disk, and the keeper holds it too.
    pub(super) relay: Vec<OwnedFd>,
    pub(super) starting: Starting,
}

/// The starts with the forkers, and the exits reaped meanwhile of children
/// not yet known: a child can end before its forker's answer is read.
#[derive(Default)]
pub(super) struct Forkings {
    pub(super) by_id: HashMap<u64, Forking>,
    pub(super) next_id: u64,
    pub(super) early_exits: HashMap<i32, proto::Exit>,
}

/// The attached host agent.
pub(super) struct Conn {
    pub(super) sock: Socket,
    /// Which attachment this is: a start requested on an earlier one is not
    /// answered on this one (this one heard of it in its `Kept` list).
    pub(super) id: u64,
}

/// A start's exec outcome: the pid, and `Ok` once the program runs.
pub(super) type ExecDone = (i32, std::io::Result<()>);

pub(super) async fn send(
    c: &Socket,
    kind: from_keeper::Kind,
    fds: &[std::os::fd::BorrowedFd<'_>],
) -> Result<(), wire::WireError> {
    wire::send_msg(c, &FromKeeper { kind: Some(kind) }, fds).await
}

pub(super) async fn send_exit(
    c: &Socket,
    pid: i32,
    exit: proto::Exit,
) -> Result<(), wire::WireError> {
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
pub(super) async fn started(
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

/// Keeps the child a forker started for start `id` (see [`super::forker`]),
/// with the descriptors the keeper keeps: stdin's write end, stdout's and
/// stderr's read ends; or the terminal's master and a relay pipe's read and
/// write ends. Its start is answered once its exec has reported (`execs`);
/// a start that failed is answered now, on the connection that asked.
pub(super) async fn forked(
    client: Option<&Conn>,
    id: u64,
    outcome: std::io::Result<Forked>,
    forkings: &mut Forkings,
    kept: &mut HashMap<i32, Held>,
    guard: &Guard,
    execs: &mut tokio::task::JoinSet<ExecDone>,
) -> Result<(), wire::WireError> {
    let Some(f) = forkings.by_id.remove(&id) else {
        return Ok(());
    };
    let done = match outcome {
        Ok(Forked {
            pid,
            mut fds,
            status,
        }) => {
            fds.extend(f.relay);
            guard.add(pid, &f.agent, f.cgroup.as_deref());
            // Kept from the fork on, so that the reaper finds it whenever
            // it ends (or found it already).
            kept.insert(
                pid,
                Held {
                    tag: f.tag,
                    agent: f.agent,
                    started_at_ms: agentplane::time::now_ms(),
                    tty: f.tty,
                    fds,
                    exit: forkings.early_exits.remove(&pid),
                    starting: Some(f.starting),
                },
            );
            execs.spawn(async move { (pid, fork::exec_outcome(status).await) });
            Ok(())
        }
        Err(e) => match client.filter(|c| c.id == f.starting.conn) {
            Some(c) => {
                let failed = from_keeper::Kind::Failed(proto::Failed::of(f.starting.seq, &e));
                send(&c.sock, failed, &[]).await
            }
            None => Ok(()),
        },
    };
    if forkings.by_id.is_empty() {
        // Every child forked is known: the rest were strangers'.
        forkings.early_exits.clear();
    }
    done
}
