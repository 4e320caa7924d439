//! [`Builder`]: what a [`TestCluster`] runs, and starting it.

use std::time::Duration;

use super::TestCluster;
use crate::pki::ClusterPki;
use crate::redis_server::RedisServer;

/// Builds a [`TestCluster`].
#[derive(Debug, Clone)]
pub struct Builder {
    pub(super) hosts: usize,
    pub(super) control_planes: usize,
    pub(super) max_agents: u32,
    pub(super) heartbeat_ttl: Duration,
    pub(super) reconcile_interval: Duration,
    pub(super) host_labels: Vec<(usize, String)>,
    pub(super) host_args: Vec<String>,
    pub(super) host_args_at: Vec<(usize, String)>,
    pub(super) control_plane_args: Vec<String>,
    pub(super) envs: Vec<(String, String)>,
    pub(super) netns: bool,
    pub(super) tls: bool,
    pub(super) root_agents: bool,
    pub(super) sentinel: bool,
    pub(super) redis_cluster: bool,
}

impl Builder {
    /// Number of host agents (`h1`, `h2`, …); default 1.
    pub fn hosts(mut self, n: usize) -> Self {
        self.hosts = n;
        self
    }

    /// Number of control-plane replicas; default 1.
    pub fn control_planes(mut self, n: usize) -> Self {
        self.control_planes = n;
        self
    }

    /// `--max-agents` of every host.
    pub fn max_agents(mut self, n: u32) -> Self {
        self.max_agents = n;
        self
    }

    /// `--heartbeat-ttl` of every host; default 3s.
    pub fn heartbeat_ttl(mut self, ttl: Duration) -> Self {
        self.heartbeat_ttl = ttl;
        self
    }

    /// `--reconcile-interval` of every control plane; default 200ms.
    pub fn reconcile_interval(mut self, d: Duration) -> Self {
        self.reconcile_interval = d;
        self
    }

    /// Runs every host agent in its own network namespace with its own address
    /// (see [`crate::netns::NetLab`]); Redis and the control planes listen on
    /// the lab's bridge. Needs root.
    pub fn network_namespaces(mut self) -> Self {
        self.netns = true;
        self
    }

    /// Runs every server with TLS from a CA the cluster makes ([`ClusterPki`]),
    /// instead of `--insecure`; the cluster's clients use it too.
    pub fn tls(mut self) -> Self {
        self.tls = true;
        self
    }

    /// Redis with a replica and three sentinels; every server finds the
    /// master through them (`--redis-sentinel`), and
    /// [`TestCluster::fail_over_redis`] kills it.
    pub fn sentinel(mut self) -> Self {
        self.sentinel = true;
        self.redis_cluster = false;
        self
    }

    /// A local 3-master Redis Cluster whatever `AGENTPLANE_TEST_REDIS`
    /// says (the servers get `--redis-cluster`).
    pub fn redis_cluster(mut self) -> Self {
        self.redis_cluster = true;
        self.sentinel = false;
        self
    }

    /// One Redis server even when the suite runs against a Redis Cluster
    /// (`AGENTPLANE_TEST_REDIS=cluster`): for tests of one server's faults
    /// (stopped, frozen, restarted empty) or of its command counts.
    pub fn single_redis(mut self) -> Self {
        self.redis_cluster = false;
        self
    }

    /// Host agents refuse root agents (by default the cluster passes
    /// `--allow-root-agents` when the tests run as root, as they do here).
    pub fn forbid_root_agents(mut self) -> Self {
        self.root_agents = false;
        self
    }

    /// Adds a flag (and its value, as a separate item) to every host agent.
    pub fn host_arg(mut self, arg: &str) -> Self {
        self.host_args.push(arg.to_owned());
        self
    }

    /// Adds a flag (and its value, as a separate item) to every control plane.
    pub fn control_plane_arg(mut self, arg: &str) -> Self {
        self.control_plane_args.push(arg.to_owned());
        self
    }

    /// Adds a flag (or its value) to host number `index` (0-based) only.
    pub fn host_arg_at(mut self, index: usize, arg: &str) -> Self {
        self.host_args_at.push((index, arg.to_owned()));
        self
    }

    /// Sets an environment variable of every server.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.envs.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Adds `--label k=v` to host number `index` (0-based).
    pub fn host_label(mut self, index: usize, label: &str) -> Self {
        self.host_labels.push((index, label.to_owned()));
        self
    }

    /// Starts Redis, the control planes and the hosts; returns once every host
    /// is registered.
    pub async fn start(self) -> TestCluster {
        let dir = tempfile::Builder::new()
            .prefix("agentplane-test-")
            .tempdir()
            .expect("tempdir");
        let lab = self.netns.then(|| crate::netns::NetLab::new(self.hosts));
        let extra: Vec<String> = lab.iter().map(|l| l.gateway()).collect();
        let redis = if self.redis_cluster {
            RedisServer::absent(dir.path())
        } else {
            RedisServer::start(dir.path(), &extra).await
        };
        let redis_ip = extra.first().cloned().unwrap_or_else(|| "127.0.0.1".into());
        let (replica, sentinels) = if self.sentinel {
            let replica_dir = dir.path().join("replica");
            std::fs::create_dir_all(&replica_dir).expect("replica dir");
            let replica =
                RedisServer::start_replica(&replica_dir, &extra, &redis_ip, redis.port()).await;
            super::redis::wait_replica_online(&redis).await;
            let sentinels =
                crate::sentinel::Sentinels::start(dir.path(), &redis_ip, redis.port()).await;
            (Some(replica), Some(sentinels))
        } else {
            (None, None)
        };
        let redis_cluster = if self.redis_cluster {
            Some(
                crate::redis_cluster::RedisCluster::start_on(
                    dir.path(),
                    extra.first().map(String::as_str),
                )
                .await,
            )
        } else {
            None
        };
        let mut ips = vec!["127.0.0.1".to_owned()];
        ips.extend(extra.iter().cloned());
        let pki = self.tls.then(|| ClusterPki::create(dir.path(), &ips));
        let mut cluster = TestCluster {
            pki,
            lab,
            redis,
            control_planes: Vec::new(),
            hosts: Vec::new(),
            config: self.clone(),
            dir,
            host_binary: None,
            replica,
            sentinels,
            redis_ip,
            redis_cluster,
        };
        for i in 0..self.control_planes {
            let s = cluster.spawn_control_plane(i);
            cluster.control_planes.push(s);
        }
        for i in 0..self.hosts {
            let s = cluster.spawn_host(i, &format!("host-h{}.log", i + 1));
            cluster.hosts.push(s);
        }
        cluster.wait_for_hosts(self.hosts).await;
        cluster
    }
}

impl Default for Builder {
    /// One host and one control plane.
    fn default() -> Self {
        Self {
            hosts: 1,
            control_planes: 1,
            max_agents: 1000,
            heartbeat_ttl: Duration::from_secs(3),
            reconcile_interval: Duration::from_millis(200),
            host_labels: Vec::new(),
            host_args: Vec::new(),
            host_args_at: Vec::new(),
            control_plane_args: Vec::new(),
            envs: Vec::new(),
            netns: false,
            tls: false,
            root_agents: true,
            sentinel: false,
            redis_cluster: super::redis_cluster_requested(),
        }
    }
}
