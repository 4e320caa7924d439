//! The host agent's end of the keeper: connects to the data dir's keeper
//! (starting one when none runs), receives every process it keeps, starts
//! new ones through it, and hands each run's exit to whoever waits for it.
//! One reader task owns the socket's receiving side; requests are answered
//! through one-shot channels matched by sequence number.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentplane::tasks::Tasks;
use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::process::{socket_path, KEEPER_ARG};
use super::proto::{self, from_keeper, to_keeper, FromKeeper, ToKeeper};
use super::wire::{self, Socket, WireError};

/// How long a start of the keeper may take to open its socket.
const START_LIMIT: Duration = Duration::from_secs(5);

/// Why the keeper could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KeeperError {
    /// Connecting to, or starting, the keeper failed.
    #[error("cannot reach the keeper at {path}: {detail}")]
    Connect {
        /// Its socket.
        path: String,
        /// Why.
        detail: String,
    },
    /// Another host agent is attached to this data dir's keeper.
    #[error("another host agent is attached to the keeper of this data dir (is a second host agent using --data-dir {0}?)")]
    Busy(String),
    /// The keeper speaks another protocol version.
    #[error("the keeper speaks protocol {theirs}, this host agent {ours} (and at least 1): stop the old keeper (its agents stop with it)")]
    Version {
        /// The keeper's.
        theirs: u32,
        /// Ours.
        ours: u32,
    },
    /// The keeper went away (its agents died with it).
    #[error("the keeper process is gone")]
    Gone,
    /// The keeper could not start the program.
    #[error(transparent)]
    Spawn(std::io::Error),
    /// The socket failed.
    #[error(transparent)]
    Wire(#[from] WireError),
}

/// One run the keeper holds.
#[derive(Debug)]
pub struct Run {
    /// Its pid (= its process group).
    pub pid: i32,
    /// When it started, ms since the epoch.
    pub started_at_ms: i64,
    /// stdin, stdout, stderr; or (tty) the terminal's master and its relay
    /// pipe's read and write ends (one descriptor from an older keeper).
    pub fds: Vec<OwnedFd>,
    /// Whether `fds` start with a terminal's master.
    pub tty: bool,
    /// Resolves with its exit; an error means the keeper is gone.
    pub exit: oneshot::Receiver<proto::Exit>,
}

/// A run found at connection, with the tag its start gave.
#[derive(Debug)]
pub struct KeptRun {
    /// The tag given to [`Keeper::spawn`].
    pub tag: String,
    /// The run.
    pub run: Run,
    /// It has ended (its exit waits in `run.exit`).
    pub ended: bool,
}

type Pending = HashMap<u64, oneshot::Sender<Result<Run, KeeperError>>>;

/// A connection to the keeper.
#[derive(Debug)]
pub struct Keeper {
    sock: Arc<Socket>,
    seq: AtomicU64,
    pending: Arc<Mutex<Pending>>,
    /// The keeper's pid.
    pub pid: i32,
    /// The keeper's protocol version (a keeper started by an older host
    /// agent may speak an older one).
    pub version: u32,
    /// Cancelled once the keeper is gone.
    pub gone: CancellationToken,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Keeper {
    /// Connects to `data_dir`'s keeper, starting `exe KEEPER_ARG` when none
    /// answers; returns the connection and every run the keeper holds.
    pub async fn connect(
        exe: &Path,
        data_dir: &Path,
        orphan_grace: Duration,
        tasks: &Tasks,
    ) -> Result<(Arc<Self>, Vec<KeptRun>), KeeperError> {
        let path = socket_path(data_dir);
        let fail = |detail: String| KeeperError::Connect {
            path: path.display().to_string(),
            detail,
        };
        let fd = match dial(&path) {
            Ok(fd) => fd,
            Err(_) => {
                let child = tokio::process::Command::new(exe)
                    .arg(KEEPER_ARG)
                    .arg(data_dir)
                    .arg(orphan_grace.as_millis().to_string())
                    .stdin(std::process::Stdio::null())
                    .stdout(std::process::Stdio::null())
                    .spawn()
                    .map_err(|e| fail(format!("starting {}: {e}", exe.display())))?;
                // Not waited for: the keeper outlives this host agent. Tokio
                // reaps a dropped child when it ends (while this process
                // runs); its death is seen on the socket (`gone`).
                drop(child);
                let deadline = tokio::time::Instant::now() + START_LIMIT;
                loop {
                    match dial(&path) {
                        Ok(fd) => break fd,
                        Err(e) if tokio::time::Instant::now() >= deadline => {
                            return Err(fail(format!("the keeper did not open its socket: {e}")))
                        }
                        // Polling a socket a child is about to bind: no event to wait on.
                        Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                    }
                }
            }
        };
        let sock = Arc::new(Socket::new(fd).map_err(|e| fail(e.to_string()))?);
        let hello = ToKeeper {
            kind: Some(to_keeper::Kind::Hello(proto::VERSION)),
        };
        wire::send_msg(&sock, &hello, &[]).await?;
        let mut pid = 0;
        let mut version = 0;
        let mut kept = Vec::new();
        let mut exits = HashMap::new();
        loop {
            let (msg, fds) = wire::recv_msg::<FromKeeper>(&sock).await?;
            match msg.kind {
                Some(from_keeper::Kind::Welcome(w))
                    if !(proto::MIN_VERSION..=proto::VERSION).contains(&w.version) =>
                {
                    return Err(KeeperError::Version {
                        theirs: w.version,
                        ours: proto::VERSION,
                    })
                }
                Some(from_keeper::Kind::Welcome(w)) => {
                    pid = w.pid;
                    version = w.version;
                }
                Some(from_keeper::Kind::Busy(_)) => {
                    return Err(KeeperError::Busy(data_dir.display().to_string()))
                }
                Some(from_keeper::Kind::Kept(k)) => {
                    let ended = k.exit.is_some();
                    let (tx, rx) = oneshot::channel();
                    match k.exit {
                        Some(e) => {
                            let _ = tx.send(e);
                        }
                        None => {
                            exits.insert(k.pid, tx);
                        }
                    }
                    kept.push(KeptRun {
                        ended,
                        tag: k.tag,
                        run: Run {
                            pid: k.pid,
                            started_at_ms: k.started_at_ms,
                            fds,
                            tty: k.tty,
                            exit: rx,
                        },
                    });
                }
                Some(from_keeper::Kind::Ready(_)) => break,
                _ => {}
            }
        }
        let keeper = Arc::new(Self {
            sock: sock.clone(),
            seq: AtomicU64::new(1),
            pending: Arc::new(Mutex::new(HashMap::new())),
            pid,
            version,
            gone: CancellationToken::new(),
        });
        let (pending, gone) = (keeper.pending.clone(), keeper.gone.clone());
        tasks.spawn("keeper reader", async move {
            read(&sock, &pending, exits).await;
            // Every waiter learns it: senders dropped, exits resolve to errors.
            lock(&pending).clear();
            gone.cancel();
        });
        Ok((keeper, kept))
    }

    /// Starts `launch` in the keeper; `tag` names the run (given back by a
    /// later connection's [`KeptRun`]).
    pub async fn spawn(&self, tag: &str, launch: proto::Launch) -> Result<Run, KeeperError> {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(seq, tx);
        if self.gone.is_cancelled() {
            lock(&self.pending).remove(&seq);
            return Err(KeeperError::Gone);
        }
        let tty = launch.tty;
        let msg = ToKeeper {
            kind: Some(to_keeper::Kind::Spawn(proto::Spawn {
                seq,
                tag: tag.to_owned(),
                launch: Some(launch),
            })),
        };
        if let Err(e) = wire::send_msg(&self.sock, &msg, &[]).await {
            lock(&self.pending).remove(&seq);
            return Err(e.into());
        }
        let run = rx.await.unwrap_or(Err(KeeperError::Gone))?;
        Ok(Run { tty, ..run })
    }

    /// Ends this connection (the keeper then applies its orphan grace, or
    /// ends at once when it keeps nothing), whoever still holds it.
    pub fn close(&self) {
        let _ = nix::sys::socket::shutdown(
            self.sock.fd().as_raw_fd(),
            nix::sys::socket::Shutdown::Both,
        );
    }

    /// Tells the keeper how to say this machine is alive while no host
    /// agent is attached, and how long to hold the agents then.
    pub async fn liveness(&self, l: proto::Liveness) -> Result<(), KeeperError> {
        let msg = ToKeeper {
            kind: Some(to_keeper::Kind::Liveness(l)),
        };
        Ok(wire::send_msg(&self.sock, &msg, &[]).await?)
    }

    /// Tells the keeper that `pid`'s exit is recorded: it forgets the run.
    pub async fn ack(&self, pid: i32) -> Result<(), KeeperError> {
        let msg = ToKeeper {
            kind: Some(to_keeper::Kind::Ack(pid)),
        };
        Ok(wire::send_msg(&self.sock, &msg, &[]).await?)
    }
}

/// The reader: answers spawns, delivers exits, until the socket ends.
async fn read(
    sock: &Socket,
    pending: &Mutex<Pending>,
    mut exits: HashMap<i32, oneshot::Sender<proto::Exit>>,
) {
    loop {
        let (msg, fds) = match wire::recv_msg::<FromKeeper>(sock).await {
            Ok(m) => m,
            Err(e) => {
                if !matches!(e, WireError::Closed) {
                    tracing::error!(error = %e, "keeper connection failed");
                }
                return;
            }
        };
        match msg.kind {
            Some(from_keeper::Kind::Spawned(s)) => {
                let (tx, rx) = oneshot::channel();
                // Registered before anyone can see the run: its exit,
                // which follows on this socket, always has a waiter.
                exits.insert(s.pid, tx);
                let run = Run {
                    pid: s.pid,
                    started_at_ms: s.started_at_ms,
                    fds,
                    // Set by `spawn`, which knows what it asked for.
                    tty: false,
                    exit: rx,
                };
                if let Some(waiter) = lock(pending).remove(&s.seq) {
                    let _ = waiter.send(Ok(run));
                }
            }
            Some(from_keeper::Kind::Failed(f)) => {
                if let Some(waiter) = lock(pending).remove(&f.seq) {
                    let _ = waiter.send(Err(KeeperError::Spawn(f.into_io_error())));
                }
            }
            Some(from_keeper::Kind::Exited(x)) => {
                if let (Some(tx), Some(exit)) = (exits.remove(&x.pid), x.exit) {
                    let _ = tx.send(exit);
                }
            }
            _ => {}
        }
    }
}

/// A connected seqpacket socket to `path`.
fn dial(path: &Path) -> std::io::Result<OwnedFd> {
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    connect(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
    Ok(fd)
}
