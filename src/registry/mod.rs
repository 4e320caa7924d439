//! The Redis registry: the whole schema of DESIGN.md ("Redis schema") in one
//! module. Hosts register with a TTL heartbeat, agents have a hash record and a
//! TTL'd location key, lists and passes read maintained indexes (no keyspace
//! walk, never `KEYS`), and every write that can race is a Lua
//! compare-and-set on the record's generation.
//!
//! A Redis failure is always an error ([`RegistryError::Redis`], gRPC
//! UNAVAILABLE naming the registry), never an empty answer.

mod agents;
mod claims;
mod codec;
mod conn;
mod event_reader;
mod events;
mod heads;
mod heartbeat;
mod hosts;
mod index;
mod keys;
mod lease;
mod locate;
mod options;
mod restarting;
mod rewrite;
mod scripts;
mod sentinel;

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

pub use agents::{AgentUpdate, Expect, UpdateOutcome};
pub use event_reader::{EventReader, ReadError};
pub use events::{type_name, StreamBounds, EVENTS_MAXLEN};
pub use heartbeat::{FencingMemory, HeartbeatReport, RecordHead, FULL_READ_EVERY};
pub use hosts::{Draining, HostRecord, HOSTS_PER_READ};
pub use index::AgentIndex;
pub use keys::{Keys, Shard, SHARDS};
pub use lease::{lease_ttl, Location, LEASE_RENEW_EVERY};
pub use locate::Located;
pub use options::{RedisOptions, RedisTlsArgs};
pub use restarting::Restarting;
pub use sentinel::SentinelTarget;

pub use conn::Connection;

/// Default key prefix (`--redis-prefix`).
pub const DEFAULT_PREFIX: &str = "ap";

/// How long an idempotency key is kept.
pub const IDEMPOTENCY_TTL: Duration = Duration::from_secs(24 * 3600);

/// A registry failure.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// Redis could not be reached or answered with an error during `step`.
    #[error("registry unavailable (redis at {url}): {step} failed: {source}")]
    Redis {
        /// What the registry was doing (`list hosts`, `heartbeat`, …).
        step: &'static str,
        /// The Redis address, without credentials.
        url: String,
        /// The client's error.
        #[source]
        source: redis::RedisError,
    },
    /// A record in Redis cannot be decoded.
    #[error("registry record `{key}` is corrupt: {detail}")]
    Corrupt {
        /// The Redis key.
        key: String,
        /// What is wrong with it.
        detail: String,
    },
    /// A write asked for a state change that the state machine does not
    /// allow from any state it expected (a bug in the caller: nothing was written).
    #[error("agent {id}: no legal move from {from} to {to} (see agentplane::state::may_move)")]
    IllegalMove {
        /// The agent.
        id: String,
        /// The states the write expected, comma-separated (empty: any).
        from: String,
        /// The state it would have written.
        to: &'static str,
    },
    /// The Redis URL given in the configuration is unusable.
    #[error("invalid redis url `{url}`: {source}")]
    InvalidUrl {
        /// The URL, without credentials.
        url: String,
        /// The client's error.
        #[source]
        source: redis::RedisError,
    },
}

/// Result of a registry call.
pub type Result<T> = std::result::Result<T, RegistryError>;

/// A handle on the registry; cheap to clone, safe to share between tasks.
///
/// The connection is lazy and reconnects by itself, so a server starts while
/// Redis is down and recovers when it comes back without a restart.
#[derive(Clone)]
pub struct Registry {
    client: redis::Client,
    conn: conn::Conn,
    /// With Sentinel: how long a fencing write waits for a replica's
    /// acknowledgement (`WAIT 1`).
    replica_ack: Option<Duration>,
    keys: Keys,
    url: String,
    /// Where failed Redis calls are counted, by step.
    metrics: Option<std::sync::Arc<crate::metrics::RedisMetrics>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("url", &self.url)
            .field("prefix", &self.keys.prefix())
            .finish()
    }
}

/// The URL without `user:password@`, for messages and logs.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}***@{}", &url[..s + 3], &url[at + 1..]),
        _ => url.to_owned(),
    }
}

impl Registry {
    /// A registry on `url` with keys under `prefix`. Does not connect yet: the
    /// first call does, and every call after a failure tries again.
    pub fn new(url: &str, prefix: &str) -> Result<Self> {
        Self::connect(url, prefix, &RedisOptions::default())
    }

    /// Builds the client `url` and `options` describe without connecting or
    /// needing a runtime: what `--check-config` runs.
    pub fn check(url: &str, options: &RedisOptions) -> Result<()> {
        Self::client(url, options).map(|_| ())
    }

    fn client(url: &str, options: &RedisOptions) -> Result<redis::Client> {
        Self::client_at(url, None, options)
    }

    /// The client of `url`, or of the server at `at` with `url`'s settings
    /// (the master a sentinel named).
    fn client_at(
        url: &str,
        at: Option<(&str, u16)>,
        options: &RedisOptions,
    ) -> Result<redis::Client> {
        let shown = redact_url(url);
        let invalid = |source| RegistryError::InvalidUrl {
            url: shown.clone(),
            source,
        };
        let mut info = redis::IntoConnectionInfo::into_connection_info(url).map_err(invalid)?;
        if let Some((host, port)) = at {
            let addr = match info.addr().clone() {
                redis::ConnectionAddr::TcpTls {
                    insecure,
                    tls_params,
                    ..
                } => redis::ConnectionAddr::TcpTls {
                    host: host.to_owned(),
                    port,
                    insecure,
                    tls_params,
                },
                _ => redis::ConnectionAddr::Tcp(host.to_owned(), port),
            };
            info = info.set_addr(addr);
        }
        if let Some(pw) = &options.password {
            let settings = info.redis_settings().clone().set_password(pw);
            info = info.set_redis_settings(settings);
        }
        if options.ca.is_some() || options.identity.is_some() {
            redis::Client::build_with_tls(
                info,
                redis::TlsCertificates {
                    client_tls: options.identity.clone().map(|(cert, key)| {
                        redis::ClientTlsConfig {
                            client_cert: cert,
                            client_key: key,
                        }
                    }),
                    root_cert: options.ca.clone(),
                },
            )
        } else {
            redis::Client::open(info)
        }
        .map_err(invalid)
    }

    /// [`Registry::new`] with TLS material and a password from `options`.
    pub fn connect(url: &str, prefix: &str, options: &RedisOptions) -> Result<Self> {
        let shown = redact_url(url);
        let client = Self::client(url, options)?;
        // Short timeouts and one quick retry: a caller waits at most a few
        // seconds for an answer, and a dead Redis is reported, not hidden.
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(500));
        let conn = match &options.sentinel {
            None if !options.cluster.is_empty() => {
                conn::Conn::Cluster(std::sync::Arc::new(Self::cluster(url, options)?))
            }
            None => conn::Conn::Direct(
                ConnectionManager::new_lazy_with_config(client.clone(), config).map_err(
                    |source| RegistryError::InvalidUrl {
                        url: shown.clone(),
                        source,
                    },
                )?,
            ),
            Some(target) => {
                let (url, options) = (url.to_owned(), options.clone());
                let make: sentinel::MakeClient = Box::new(move |host, port| {
                    Self::client_at(&url, Some((host, port)), &options).map_err(|e| e.to_string())
                });
                conn::Conn::Followed(std::sync::Arc::new(sentinel::Follower::new(
                    target.clone(),
                    make,
                    config,
                )))
            }
        };
        Ok(Self {
            client,
            conn,
            replica_ack: options
                .sentinel
                .as_ref()
                .map(|_| options.replica_ack)
                .filter(|d| !d.is_zero()),
            keys: if options.cluster.is_empty() {
                Keys::new(prefix)
            } else {
                Keys::sharded(prefix)
            },
            url: shown,
            metrics: None,
        })
    }

    /// The Redis Cluster client of `options.cluster`'s nodes, with `url`'s
    /// scheme and password and `options`' TLS material.
    fn cluster(url: &str, options: &RedisOptions) -> Result<conn::Cluster> {
        let invalid = |source| RegistryError::InvalidUrl {
            url: redact_url(url),
            source,
        };
        let mut nodes = Vec::with_capacity(options.cluster.len());
        for addr in &options.cluster {
            let (host, port) = addr.rsplit_once(':').unwrap_or((addr, "6379"));
            let port = port.parse().unwrap_or(6379);
            nodes.push(
                Self::client_at(url, Some((host, port)), options)?
                    .get_connection_info()
                    .clone(),
            );
        }
        let mut builder = redis::cluster::ClusterClientBuilder::new(nodes)
            .connection_timeout(Duration::from_secs(1))
            .response_timeout(Duration::from_secs(2))
            .retries(2);
        if let Some(pw) = &options.password {
            builder = builder.password(pw.clone());
        }
        if options.ca.is_some() || options.identity.is_some() {
            builder = builder.certs(redis::TlsCertificates {
                client_tls: options
                    .identity
                    .clone()
                    .map(|(cert, key)| redis::ClientTlsConfig {
                        client_cert: cert,
                        client_key: key,
                    }),
                root_cert: options.ca.clone(),
            });
        }
        Ok(conn::Cluster::new(builder.build().map_err(invalid)?))
    }

    /// This registry, counting every failed Redis call in `metrics`.
    pub fn with_metrics(mut self, metrics: std::sync::Arc<crate::metrics::RedisMetrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// The key names in use.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// A connection handle for one call (clones share one multiplexed socket).
    fn conn(&self) -> conn::Conn {
        self.conn.clone()
    }

    /// The connection for a write that fencing depends on: with Sentinel,
    /// the master's fencing connection, pinned, so that the write and its
    /// [`Registry::replica_acked`] go over the same one; else the shared one.
    async fn fencing_conn(&self) -> Result<conn::Conn> {
        if self.replica_ack.is_some() {
            if let Some(c) = self
                .conn
                .pinned_for_fencing()
                .await
                .map_err(self.err("connect"))?
            {
                return Ok(c);
            }
        }
        Ok(self.conn())
    }

    /// With Sentinel, after a write that fencing depends on (made on `conn`,
    /// from [`Registry::fencing_conn`]): waits up to `--redis-replica-ack`
    /// for one replica to have it, so that a failover right after does not
    /// roll it back. The write is made whatever this finds: a write no
    /// replica took in time (or a failed wait) is logged, and a loss is
    /// caught by the host agents' record checks.
    async fn replica_acked(&self, conn: &mut conn::Conn) {
        let Some(wait) = self.replica_ack else {
            return;
        };
        let acked: redis::RedisResult<i64> = redis::cmd("WAIT")
            .arg(1)
            .arg(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1))
            .query_async(conn)
            .await;
        if !matches!(acked, Ok(n) if n >= 1) {
            sentinel::warn_unacked(wait);
        }
    }

    /// Wraps a Redis error with the step that failed.
    fn err(&self, step: &'static str) -> impl FnOnce(redis::RedisError) -> RegistryError + '_ {
        move |source| {
            if let Some(m) = &self.metrics {
                m.error(step);
            }
            RegistryError::Redis {
                step,
                url: self.url.clone(),
                source,
            }
        }
    }

    /// A new connection of the caller's own, dialled within `timeout`, whose
    /// commands time out after `timeout` too (heartbeats and stream readers).
    pub async fn dedicated_connection(&self, timeout: Duration) -> Result<Connection> {
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout));
        let client = match &self.conn {
            conn::Conn::Followed(f) | conn::Conn::Pinned(_, f) => {
                f.master().await.map_err(self.err("connect"))?.client
            }
            conn::Conn::Direct(_) => self.client.clone(),
            conn::Conn::Cluster(c) => {
                return c
                    .dedicated(timeout)
                    .await
                    .map(Connection::Cluster)
                    .map_err(self.err("connect"));
            }
        };
        client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map(Connection::Plain)
            .map_err(self.err("connect"))
    }

    /// Runs `batch` (independent commands) in as few round trips as the
    /// layout allows (see [`conn::Spread`]).
    async fn spread(&self, step: &'static str, batch: conn::Spread) -> Result<Vec<redis::Value>> {
        batch
            .query(&self.conn(), self.keys.is_sharded())
            .await
            .map_err(self.err(step))
    }

    /// One reply of a [`Registry::spread`] batch as `T`; a reply of the
    /// wrong shape is a corrupt answer to `step`.
    fn reply<T: redis::FromRedisValue>(step: &'static str, v: redis::Value) -> Result<T> {
        redis::from_redis_value(v).map_err(|e| RegistryError::Corrupt {
            key: step.to_owned(),
            detail: e.to_string(),
        })
    }

    /// `PING`: used by health checks.
    pub async fn ping(&self) -> Result<()> {
        redis::cmd("PING")
            .query_async::<()>(&mut self.conn())
            .await
            .map_err(self.err("ping"))
    }

    /// Runs `SCAN` from `cursor` over keys matching `pattern`; returns the next
    /// cursor (0 when done) and the keys of this batch.
    async fn scan(
        &self,
        step: &'static str,
        cursor: u64,
        pattern: &str,
        count: usize,
    ) -> Result<(u64, Vec<String>)> {
        redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(count)
            .query_async(&mut self.conn())
            .await
            .map_err(self.err(step))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_credentials() {
        assert_eq!(
            redact_url("redis://user:secret@host:6379/0"),
            "redis://***@host:6379/0"
        );
        assert_eq!(redact_url("redis://host:6379"), "redis://host:6379");
    }
}
