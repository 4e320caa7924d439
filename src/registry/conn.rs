//! The registry's connections: the shared one ([`Conn`]: one Redis, the
//! master Sentinel names, or a Redis Cluster), the dedicated ones callers
//! own ([`Connection`]), and [`Spread`], a batch of independent commands
//! sent as one pipeline where the layout allows and one per hash slot on a
//! Cluster (which refuses a pipeline that spans slots).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, MultiplexedConnection};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, RedisFuture, RedisResult, Value};

use super::keys::hash_tag;
use super::sentinel::{master_may_have_moved, Follower};

/// A Redis Cluster client whose connection is made by the first call (and
/// retried by the next call after a failure), so a server starts while the
/// cluster is down.
pub(super) struct Cluster {
    client: ClusterClient,
    conn: tokio::sync::OnceCell<ClusterConnection>,
}

impl Cluster {
    pub(super) fn new(client: ClusterClient) -> Self {
        Self {
            client,
            conn: tokio::sync::OnceCell::new(),
        }
    }

    /// The shared cluster connection (it follows slot moves and node
    /// failovers by itself).
    async fn conn(&self) -> RedisResult<ClusterConnection> {
        self.conn
            .get_or_try_init(|| self.client.get_async_connection())
            .await
            .cloned()
    }

    /// A connection of the caller's own whose commands time out after
    /// `timeout`.
    pub(super) async fn dedicated(&self, timeout: Duration) -> RedisResult<ClusterConnection> {
        let config = redis::cluster::ClusterConfig::new()
            .set_connection_timeout(timeout)
            .set_response_timeout(timeout);
        self.client.get_async_connection_with_config(config).await
    }
}

/// The registry's shared connection.
#[derive(Clone)]
pub(super) enum Conn {
    /// One Redis, reconnected by the manager.
    Direct(ConnectionManager),
    /// Whichever Redis the sentinels name master.
    Followed(Arc<Follower>),
    /// One connection to the master as it was when taken (a fencing write
    /// and its `WAIT` must go over the same one), still telling the
    /// follower when a call fails as a failover would.
    Pinned(ConnectionManager, Arc<Follower>),
    /// A Redis Cluster.
    Cluster(Arc<Cluster>),
}

impl Conn {
    /// For a fencing write and its `WAIT`: the master's fencing
    /// connection, pinned; `None` without Sentinel.
    pub(super) async fn pinned_for_fencing(&self) -> RedisResult<Option<Self>> {
        match self {
            Self::Followed(f) => Ok(Some(Self::Pinned(f.master().await?.fence, f.clone()))),
            _ => Ok(None),
        }
    }
}

/// Tells `f` that a call failed, when the failure may mean a failover.
fn noted<T>(f: &Follower, r: RedisResult<T>) -> RedisResult<T> {
    if let Err(e) = &r {
        if master_may_have_moved(e) {
            f.failed(e);
        }
    }
    r
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Direct(c) => c.req_packed_command(cmd),
            Self::Followed(f) => Box::pin(async move {
                let mut c = f.master().await?.conn;
                noted(f, c.req_packed_command(cmd).await)
            }),
            Self::Pinned(c, f) => {
                Box::pin(async move { noted(f, c.req_packed_command(cmd).await) })
            }
            Self::Cluster(cl) => Box::pin(async move {
                let mut c = cl.conn().await?;
                c.req_packed_command(cmd).await
            }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Direct(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Followed(f) => Box::pin(async move {
                let mut c = f.master().await?.conn;
                noted(f, c.req_packed_commands(pipeline, offset, count).await)
            }),
            Self::Pinned(c, f) => {
                Box::pin(
                    async move { noted(f, c.req_packed_commands(pipeline, offset, count).await) },
                )
            }
            Self::Cluster(cl) => Box::pin(async move {
                let mut c = cl.conn().await?;
                c.req_packed_commands(pipeline, offset, count).await
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Direct(c) | Self::Pinned(c, _) => c.get_db(),
            Self::Followed(_) | Self::Cluster(_) => 0,
        }
    }
}

/// A connection of a caller's own (heartbeats, stream readers): to one
/// Redis or to a Redis Cluster.
#[derive(Clone)]
pub enum Connection {
    /// One Redis (or the master Sentinel named when it was dialled).
    Plain(MultiplexedConnection),
    /// A Redis Cluster.
    Cluster(ClusterConnection),
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Plain(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Plain(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Plain(c) => c.get_db(),
            Self::Cluster(_) => 0,
        }
    }
}

/// Command `name` on `key`, with room for `extra` more arguments of `more`
/// bytes in all: its buffers are sized once. On the hot paths (a beat's
/// leases and heads, a sweep slice, a listing, a spawn's index writes) a
/// command per record grew them argument by argument, and was often
/// copied out of its builder besides.
pub(super) fn keyed(name: &str, key: &str, extra: usize, more: usize) -> Cmd {
    let mut cmd = Cmd::with_capacity(2 + extra, name.len() + key.len() + more);
    cmd.arg(name).arg(key);
    cmd
}

/// Independent commands (no MULTI), each with the key it touches: one
/// pipeline on one Redis; on a Cluster one pipeline per hash tag, sent
/// concurrently. Replies come back in the order the commands were added.
#[derive(Default)]
pub(super) struct Spread {
    cmds: Vec<(String, Cmd)>,
}

impl Spread {
    /// Adds `cmd`, which touches `key`.
    pub(super) fn add(&mut self, key: String, cmd: Cmd) -> &mut Self {
        self.cmds.push((key, cmd));
        self
    }

    /// Runs the commands on `conn`, split by hash tag when `sharded`.
    pub(super) async fn query<C>(self, conn: &C, sharded: bool) -> RedisResult<Vec<Value>>
    where
        C: ConnectionLike + Clone + Send,
    {
        if !sharded {
            let mut pipe = redis::pipe();
            for (_, cmd) in self.cmds {
                pipe.add_command(cmd);
            }
            return pipe.query_async(&mut conn.clone()).await;
        }
        let n = self.cmds.len();
        let mut groups: BTreeMap<String, (redis::Pipeline, Vec<usize>)> = BTreeMap::new();
        for (i, (key, cmd)) in self.cmds.into_iter().enumerate() {
            let g = groups
                .entry(hash_tag(&key).to_owned())
                .or_insert_with(|| (redis::pipe(), Vec::new()));
            g.0.add_command(cmd);
            g.1.push(i);
        }
        let replies = futures::future::try_join_all(groups.into_values().map(|(pipe, at)| {
            let mut c = conn.clone();
            async move {
                let values: Vec<Value> = pipe.query_async(&mut c).await?;
                Ok::<_, redis::RedisError>((at, values))
            }
        }))
        .await?;
        let mut out = vec![Value::Nil; n];
        for (at, values) in replies {
            for (i, v) in at.into_iter().zip(values) {
                out[i] = v;
            }
        }
        Ok(out)
    }
}
