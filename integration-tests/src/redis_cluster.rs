//! A local Redis Cluster that a test makes: three masters
//! (`redis-server --cluster-enabled yes`, no replicas) joined by
//! `redis-cli --cluster create`, on free loopback ports.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::process::Proc;
use crate::redis_server::{answers_ping, binary, free_port};

/// Running cluster nodes.
#[derive(Debug)]
pub struct RedisCluster {
    procs: Vec<Proc>,
    ports: Vec<u16>,
    /// The address the nodes announce (and clients dial).
    ip: String,
}

/// A free loopback port a cluster node can take: its cluster bus listens
/// 10,000 above it, so the port must be at most 55535 (redis-server refuses
/// to start otherwise: about a fifth of the kernel's free ports here) and
/// the bus port must be free too.
fn free_node_port() -> u16 {
    loop {
        let port = free_port();
        if port <= 55535 && std::net::TcpListener::bind(("127.0.0.1", port + 10000)).is_ok() {
            return port;
        }
    }
}

impl RedisCluster {
    /// Starts three masters in `dir` and joins them; returns once every node
    /// says `cluster_state:ok`.
    pub async fn start(dir: &Path) -> Self {
        Self::start_on(dir, None).await
    }

    /// [`RedisCluster::start`], the nodes also listening on `ip` and
    /// announcing it (so that hosts in network namespaces reach them).
    pub async fn start_on(dir: &Path, ip: Option<&str>) -> Self {
        let mut procs = Vec::new();
        let mut ports = Vec::new();
        for _ in 0..3 {
            let port = free_node_port();
            let node_dir = dir.join(format!("node-{port}"));
            std::fs::create_dir_all(&node_dir).expect("node dir");
            let mut cmd = Command::new(binary());
            cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"]);
            if let Some(ip) = ip {
                cmd.arg(ip).args(["--cluster-announce-ip", ip]);
            }
            cmd.args(["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"])
                .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
                .arg("--dir")
                .arg(&node_dir)
                .stdout(Stdio::null());
            let log = dir.join(format!("redis-cluster-{port}.log"));
            procs.push(Proc::spawn(cmd, &log).expect("start a cluster node"));
            ports.push(port);
        }
        let cluster = Self {
            procs,
            ports,
            ip: ip.unwrap_or("127.0.0.1").to_owned(),
        };
        for url in cluster.urls() {
            answers_ping(&url).await;
        }
        let cli = binary().with_file_name("redis-cli");
        let out = Command::new(if cli.is_file() {
            cli
        } else {
            "redis-cli".into()
        })
        .arg("--cluster")
        .arg("create")
        .args(cluster.addrs())
        .arg("--cluster-yes")
        .output()
        .expect("run redis-cli --cluster create");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        for url in cluster.urls() {
            loop {
                let client = redis::Client::open(url.clone()).expect("url");
                let ok = match client.get_multiplexed_async_connection().await {
                    Ok(mut c) => redis::cmd("CLUSTER")
                        .arg("INFO")
                        .query_async::<String>(&mut c)
                        .await
                        .is_ok_and(|i| i.contains("cluster_state:ok")),
                    Err(_) => false,
                };
                if ok {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{url} never said cluster_state:ok"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        cluster
    }

    /// `redis://127.0.0.1:PORT` of every node.
    pub fn urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect()
    }

    /// The nodes' ports.
    pub fn ports(&self) -> &[u16] {
        &self.ports
    }

    /// `IP:PORT` of every node, at the announced address.
    pub fn addrs(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("{}:{p}", self.ip))
            .collect()
    }

    /// A registry on this cluster (`--redis-cluster` with every node).
    pub fn registry(&self) -> agentplane::registry::Registry {
        let options = agentplane::registry::RedisOptions {
            cluster: self.addrs(),
            ..Default::default()
        };
        agentplane::registry::Registry::connect(&self.urls()[0], "ap", &options)
            .expect("a registry on the cluster")
    }

    /// A cluster connection (each key goes to its node).
    pub async fn conn(&self) -> redis::cluster_async::ClusterConnection {
        redis::cluster::ClusterClient::new(self.urls())
            .expect("cluster client")
            .get_async_connection()
            .await
            .expect("connect to the redis cluster")
    }

    /// `INFO commandstats` of every node, one after the other.
    pub async fn commandstats(&self) -> String {
        let mut out = String::new();
        for url in self.urls() {
            let client = redis::Client::open(url).expect("url");
            let mut c = client
                .get_multiplexed_async_connection()
                .await
                .expect("connect to a cluster node");
            let stats: String = redis::cmd("INFO")
                .arg("commandstats")
                .query_async(&mut c)
                .await
                .expect("INFO commandstats");
            out.push_str(&stats);
        }
        out
    }

    /// SIGSTOP to every node (a frozen cluster; TTLs run on).
    pub fn freeze(&self) {
        for p in &self.procs {
            p.signal(nix::sys::signal::Signal::SIGSTOP);
        }
    }

    /// SIGCONT after [`RedisCluster::freeze`].
    pub fn thaw(&self) {
        for p in &self.procs {
            p.signal(nix::sys::signal::Signal::SIGCONT);
        }
    }

    /// How many node processes run.
    pub fn running(&mut self) -> usize {
        self.procs
            .iter_mut()
            .map(Proc::is_running)
            .filter(|r| *r)
            .count()
    }
}
