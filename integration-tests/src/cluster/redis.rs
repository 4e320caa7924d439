//! The Redis a [`TestCluster`] runs on: one server (the default), one with
//! a replica and three sentinels ([`Builder::sentinel`]), or a local
//! 3-master Redis Cluster when the suite runs with
//! `AGENTPLANE_TEST_REDIS=cluster` (`scripts/test --redis-cluster`), except
//! for tests that stage one server's faults ([`Builder::single_redis`]).
//! Tests read Redis through [`TestCluster::redis_conn`] and
//! [`TestCluster::keys`], which follow the mode.
//!
//! [`Builder::sentinel`]: super::Builder::sentinel
//! [`Builder::single_redis`]: super::Builder::single_redis

use std::time::Duration;

use agentplane::registry::{Connection, Keys};

use super::TestCluster;
use crate::redis_server::RedisServer;

/// Whether the suite runs against a Redis Cluster
/// (`AGENTPLANE_TEST_REDIS=cluster`).
pub fn redis_cluster_requested() -> bool {
    std::env::var("AGENTPLANE_TEST_REDIS").is_ok_and(|v| v == "cluster")
}

/// Whether `master` has its replica online (fully synced, streaming).
async fn replica_online(master: &RedisServer) -> bool {
    let Ok(info) = redis::cmd("INFO")
        .arg("replication")
        .query_async::<String>(&mut master.conn().await)
        .await
    else {
        return false;
    };
    info.lines()
        .any(|l| l.starts_with("slave0:") && l.contains("state=online"))
}

/// Waits until `master` has its replica online.
pub(crate) async fn wait_replica_online(master: &RedisServer) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !replica_online(master).await {
        assert!(
            std::time::Instant::now() < deadline,
            "the replica never came online"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl TestCluster {
    /// The Redis flags of a server; `gateway`: the address it reaches
    /// Redis at from a network namespace.
    pub(super) fn redis_args(&self, gateway: Option<&str>) -> Vec<String> {
        if let Some(nodes) = &self.redis_cluster {
            return vec![
                "--redis-url".into(),
                format!("redis://{}", nodes.addrs()[0]),
                "--redis-cluster".into(),
                nodes.addrs().join(","),
            ];
        }
        let url = match gateway {
            Some(g) => self.redis.url_at(g),
            None => self.redis.url(),
        };
        let mut args = vec!["--redis-url".into(), url];
        if let Some(s) = &self.sentinels {
            args.extend([
                "--redis-sentinel".into(),
                s.arg(),
                "--redis-master-name".into(),
                crate::sentinel::MASTER_NAME.into(),
            ]);
        }
        args
    }

    /// Whether the servers use a Redis Cluster.
    pub fn on_redis_cluster(&self) -> bool {
        self.redis_cluster.is_some()
    }

    /// The key names the servers use (the Cluster layout on a Cluster).
    pub fn keys(&self) -> Keys {
        if self.on_redis_cluster() {
            Keys::sharded("ap")
        } else {
            Keys::new("ap")
        }
    }

    /// A connection to the Redis the servers use (a cluster connection on a
    /// Cluster, which routes each key to its node).
    pub async fn redis_conn(&self) -> Connection {
        match &self.redis_cluster {
            Some(nodes) => Connection::Cluster(nodes.conn().await),
            None => Connection::Plain(self.redis.conn().await),
        }
    }

    /// Calls so far of each command, summed over every Redis the servers
    /// use (see [`crate::parse_command_calls`]).
    pub async fn command_calls(&self) -> std::collections::BTreeMap<String, u64> {
        crate::parse_command_calls(&self.all_commandstats().await)
    }

    /// A port of a Redis the servers use (a probe's target).
    pub fn redis_port(&self) -> u16 {
        match &self.redis_cluster {
            Some(nodes) => nodes.ports()[0],
            None => self.redis.port(),
        }
    }

    /// `INFO commandstats` of every Redis the servers use.
    pub(super) async fn all_commandstats(&self) -> String {
        match &self.redis_cluster {
            Some(nodes) => nodes.commandstats().await,
            None => self.redis.commandstats().await,
        }
    }

    /// Kills the Redis master (SIGKILL) and waits until the sentinels name
    /// the replica master; the old master comes back empty as the new one's
    /// replica, so a later failover can go back. `self.redis` is the master
    /// after (the one the sentinels name: on a loaded machine they may fail
    /// over again meanwhile). How long until the sentinels named the new
    /// master.
    pub async fn fail_over_redis(&mut self) -> Duration {
        let old = self.redis.port();
        let t = std::time::Instant::now();
        self.redis.stop();
        let new = loop {
            if let Some(port) = self.sentinel_master().await.filter(|p| *p != old) {
                break port;
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "the sentinels never promoted the replica"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let elapsed = t.elapsed();
        let mut replica = self.replica.take().expect("a replica");
        assert_eq!(
            replica.port(),
            new,
            "the sentinels promoted an unknown server"
        );
        replica.promoted();
        let mut was = std::mem::replace(&mut self.redis, replica);
        was.restart_as_replica_of(&self.redis_ip, new).await;
        self.replica = Some(was);
        self.settle_redis().await;
        elapsed
    }

    /// The master's port as the sentinels name it.
    async fn sentinel_master(&self) -> Option<u16> {
        self.sentinels
            .as_ref()
            .expect("a cluster built with .sentinel()")
            .master()
            .await
            .map(|(_, port)| port)
    }

    /// Waits until the sentinels name a master that has its replica online,
    /// and makes `self.redis` that master.
    async fn settle_redis(&mut self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let named = self.sentinel_master().await;
            let replica = self.replica.as_mut().expect("a replica");
            if named == Some(replica.port()) {
                std::mem::swap(&mut self.redis, replica);
                self.redis.promoted();
                let (ip, port) = (self.redis_ip.clone(), self.redis.port());
                self.replica
                    .as_mut()
                    .expect("a replica")
                    .demoted_to(&ip, port);
            }
            if named == Some(self.redis.port()) && replica_online(&self.redis).await {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "Redis never settled after the failover (master named: {named:?})"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl TestCluster {
    /// Every event of every stream, oldest first (merged by stream id),
    /// each as its fields plus `id`.
    pub async fn events(&self) -> Vec<std::collections::HashMap<String, String>> {
        let mut conn = self.redis_conn().await;
        let mut all = Vec::new();
        for stream in self.keys().event_streams() {
            let reply: redis::streams::StreamRangeReply =
                redis::AsyncCommands::xrange_all(&mut conn, &stream)
                    .await
                    .expect("read an event stream");
            for e in reply.ids {
                let mut fields: std::collections::HashMap<String, String> = e
                    .map
                    .iter()
                    .filter_map(|(k, v)| {
                        Some((k.clone(), redis::from_redis_value(v.clone()).ok()?))
                    })
                    .collect();
                let (ms, seq) = e.id.split_once('-').unwrap_or((&e.id, "0"));
                let order = (
                    ms.parse::<u64>().unwrap_or(0),
                    seq.parse::<u64>().unwrap_or(0),
                );
                fields.insert("id".into(), e.id.clone());
                all.push((order, fields));
            }
        }
        all.sort_by_key(|(order, _)| *order);
        all.into_iter().map(|(_, f)| f).collect()
    }
}
