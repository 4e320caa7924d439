//! Following the Redis master through Sentinel failovers
//! (`--redis-sentinel`, `--redis-master-name`).
//!
//! The registry's shared connection (`conn::Conn`) is either one Redis's
//! connection manager or a [`Follower`]: it asks the sentinels which server
//! is the master (`SENTINEL get-master-addr-by-name`), keeps a connection
//! manager to it, and asks again at most every [`CHECK_EVERY`] and at once
//! after a call failed in a way that a failover explains (the server is
//! gone, or answers READONLY because it was demoted). Calls during the
//! failover fail (UNAVAILABLE, as for any outage); the first call after the
//! sentinels name the new master goes there.

use std::sync::atomic::Ordering;
use std::sync::RwLock;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::{RedisError, RedisResult};
use tokio::time::Instant;

/// How often the master's address is asked again while calls succeed (a
/// demoted master still answers reads).
pub const CHECK_EVERY: Duration = Duration::from_secs(1);

/// Where Sentinel finds the master.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentinelTarget {
    /// Sentinel addresses, `host:port`.
    pub sentinels: Vec<String>,
    /// The name the sentinels monitor the master under.
    pub master_name: String,
}

/// Builds the client of a master at `host:port` (with the registry's TLS
/// and password settings).
pub(super) type MakeClient = Box<dyn Fn(&str, u16) -> Result<redis::Client, String> + Send + Sync>;

/// The master in use.
struct Current {
    addr: (String, u16),
    client: redis::Client,
    conn: ConnectionManager,
    /// A second connection for fencing writes and their `WAIT` (Redis
    /// blocks the client that waits: on the shared one, every call would).
    fence: ConnectionManager,
    /// When the sentinels last named it (`None`: ask before the next call).
    checked: Option<Instant>,
}

/// The master in use, as handed to a call.
#[derive(Clone)]
pub(super) struct Master {
    /// The shared connection.
    pub(super) conn: ConnectionManager,
    /// The fencing writes' connection.
    pub(super) fence: ConnectionManager,
    /// Its client (for dedicated connections).
    pub(super) client: redis::Client,
}

impl Current {
    fn master(&self) -> Master {
        Master {
            conn: self.conn.clone(),
            fence: self.fence.clone(),
            client: self.client.clone(),
        }
    }
}

/// A connection that follows the master the sentinels name.
pub(super) struct Follower {
    target: SentinelTarget,
    make: MakeClient,
    config: ConnectionManagerConfig,
    current: RwLock<Option<Current>>,
    /// One question to the sentinels at a time (the others use what is
    /// there meanwhile); the connections to the sentinels, kept.
    asking: tokio::sync::Mutex<Vec<Option<MultiplexedConnection>>>,
    /// The master in use answered READONLY (it was demoted) since the
    /// sentinels last named it: a sentinel that still names it is behind,
    /// and the next one is asked.
    refused_writes: std::sync::atomic::AtomicBool,
}

impl Follower {
    /// A follower of `target`'s master; asks nothing yet.
    pub(super) fn new(
        target: SentinelTarget,
        make: MakeClient,
        config: ConnectionManagerConfig,
    ) -> Self {
        let n = target.sentinels.len();
        Self {
            target,
            make,
            config,
            current: RwLock::new(None),
            asking: tokio::sync::Mutex::new(vec![None; n]),
            refused_writes: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn fresh(&self) -> Option<Master> {
        let cur = self
            .current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        cur.as_ref()
            .filter(|c| c.checked.is_some_and(|t| t.elapsed() < CHECK_EVERY))
            .map(Current::master)
    }

    /// The master's connections and client: the ones in use while the
    /// master was checked recently, else whatever the sentinels name now.
    pub(super) async fn master(&self) -> RedisResult<Master> {
        if let Some(c) = self.fresh() {
            return Ok(c);
        }
        let mut conns = self.asking.lock().await;
        if let Some(c) = self.fresh() {
            return Ok(c);
        }
        let demoted = if self.refused_writes.load(Ordering::Relaxed) {
            self.current
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .as_ref()
                .map(|c| c.addr.clone())
        } else {
            None
        };
        let asked = self.ask(&mut conns, demoted.as_ref()).await;
        // Every sentinel insisting on the master that refused writes: take
        // their word next time.
        if asked.is_err() {
            self.refused_writes.store(false, Ordering::Relaxed);
        }
        let mut cur = self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match asked {
            Ok(addr) => {
                if let Some(c) = cur.as_mut().filter(|c| c.addr == addr) {
                    c.checked = Some(Instant::now());
                } else {
                    let client = (self.make)(&addr.0, addr.1).map_err(|detail| {
                        RedisError::from((
                            redis::ErrorKind::InvalidClientConfig,
                            "cannot build the client of the master the sentinels name",
                            detail,
                        ))
                    })?;
                    let conn = ConnectionManager::new_lazy_with_config(
                        client.clone(),
                        self.config.clone(),
                    )?;
                    let fence = ConnectionManager::new_lazy_with_config(
                        client.clone(),
                        self.config.clone(),
                    )?;
                    if let Some(old) = cur.as_ref() {
                        tracing::warn!(
                            master = %self.target.master_name,
                            from = %format!("{}:{}", old.addr.0, old.addr.1),
                            to = %format!("{}:{}", addr.0, addr.1),
                            "redis master changed (sentinel failover): following it"
                        );
                    }
                    *cur = Some(Current {
                        addr,
                        client,
                        conn,
                        fence,
                        checked: Some(Instant::now()),
                    });
                    self.refused_writes.store(false, Ordering::Relaxed);
                }
            }
            // No sentinel answers: go on with the master in use (it may
            // well still be the master) and ask again a check period later,
            // so that calls do not queue behind the sentinels' timeouts.
            Err(e) => match cur.as_mut() {
                Some(c) => {
                    tracing::warn!(error = %e, "no sentinel answered; keeping the redis master in use");
                    c.checked = Some(Instant::now());
                }
                None => return Err(e),
            },
        }
        let c = cur
            .as_ref()
            .ok_or_else(|| RedisError::from((redis::ErrorKind::Io, "no redis master known")))?;
        Ok(c.master())
    }

    /// A call failed with `e`, which a failover may explain: the next call
    /// asks the sentinels (past any that still names a master that refused
    /// a write).
    pub(super) fn failed(&self, e: &RedisError) {
        if refused_write(e) {
            self.refused_writes.store(true, Ordering::Relaxed);
        }
        self.recheck();
    }

    /// Forgets when the master was last checked: the next call asks.
    pub(super) fn recheck(&self) {
        let mut cur = self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(c) = cur.as_mut() {
            c.checked = None;
        }
    }

    /// The master's address, from the first sentinel that names one other
    /// than `demoted` (a master that refused writes since it was named).
    async fn ask(
        &self,
        conns: &mut [Option<MultiplexedConnection>],
        demoted: Option<&(String, u16)>,
    ) -> RedisResult<(String, u16)> {
        let mut last = None;
        for (addr, slot) in self.target.sentinels.iter().zip(conns.iter_mut()) {
            match self.ask_one(addr, slot).await {
                Ok(Some(master)) if Some(&master) == demoted => {
                    last = Some(RedisError::from((
                        redis::ErrorKind::Io,
                        "sentinel names a master that refused writes",
                        format!("{addr} names {}:{}", master.0, master.1),
                    )));
                }
                Ok(Some(master)) => return Ok(master),
                Ok(None) => {
                    last = Some(RedisError::from((
                        redis::ErrorKind::Io,
                        "sentinel does not know the master name",
                        format!("{addr} has no master named {}", self.target.master_name),
                    )));
                }
                Err(e) => {
                    *slot = None;
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| RedisError::from((redis::ErrorKind::Io, "no sentinel given"))))
    }

    async fn ask_one(
        &self,
        addr: &str,
        slot: &mut Option<MultiplexedConnection>,
    ) -> RedisResult<Option<(String, u16)>> {
        if slot.is_none() {
            let client = redis::Client::open(format!("redis://{addr}"))?;
            let config = redis::AsyncConnectionConfig::new()
                .set_connection_timeout(Some(Duration::from_millis(500)))
                .set_response_timeout(Some(Duration::from_millis(500)));
            *slot = Some(
                client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?,
            );
        }
        let conn = slot
            .as_mut()
            .ok_or_else(|| RedisError::from((redis::ErrorKind::Io, "no connection")))?;
        let answer: Option<(String, u16)> = redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg(&self.target.master_name)
            .query_async(conn)
            .await?;
        Ok(answer)
    }
}

/// Whether `e` may mean the master moved: it is gone, or it was demoted.
pub(super) fn master_may_have_moved(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_refusal()
        || e.is_connection_dropped()
        || e.is_timeout()
        || refused_write(e)
}

/// Whether the server refused a write as a replica: READONLY, also inside
/// an aborted MULTI (which reports each command's error in its message).
fn refused_write(e: &RedisError) -> bool {
    e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly)
        || e.to_string().contains("read only replica")
}

/// Logs that a write reached no replica in time, at most every 10 s.
pub(super) fn warn_unacked(wait: Duration) {
    use std::sync::atomic::{AtomicI64, Ordering};
    static LAST_MS: AtomicI64 = AtomicI64::new(0);
    let now = crate::time::now_ms();
    let last = LAST_MS.load(Ordering::Relaxed);
    if now - last >= 10_000
        && LAST_MS
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        tracing::warn!(
            ?wait,
            "a fencing write reached no redis replica in time: a failover now could roll it back"
        );
    }
}
