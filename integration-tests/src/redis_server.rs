//! A real `redis-server` on a free loopback port, with no persistence.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::process::Proc;

/// A running redis-server.
#[derive(Debug)]
pub struct RedisServer {
    proc: Option<Proc>,
    port: u16,
    dir: PathBuf,
    bind: Vec<String>,
    /// The master this one replicates (`--replicaof`), if a replica.
    replica_of: Option<(String, u16)>,
    /// A stand-in that never ran (the cluster uses a Redis Cluster).
    absent: bool,
}

/// The redis-server binary, or a panic that says how to get one.
pub(crate) fn binary() -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("redis-server"))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "redis-server is not on PATH. The integration tests need a real Redis: \
             install it with `apt-get install -y redis-server` (Debian/Ubuntu), \
             or run `scripts/test`, which installs it when missing."
        )
    })
}

/// Waits (10 s at most) until the redis-server at `url` answers PING.
pub(crate) async fn answers_ping(url: &str) {
    crate::eventually(Duration::from_secs(10), "redis-server answers PING", || {
        let url = url.to_owned();
        async move {
            let client = redis::Client::open(url).ok()?;
            let mut c = client.get_multiplexed_async_connection().await.ok()?;
            redis::cmd("PING").query_async::<String>(&mut c).await.ok()
        }
    })
    .await;
}

/// A free TCP port on 127.0.0.1 (bound, read, released).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

impl RedisServer {
    /// Starts one in `dir`, on 127.0.0.1 and the `extra` addresses, and waits
    /// until it answers PING.
    pub async fn start(dir: &Path, extra: &[String]) -> Self {
        Self::start_as(dir, extra, None).await
    }

    /// Starts a replica of the master at `host:port`, in `dir` (its own),
    /// on 127.0.0.1 and the `extra` addresses; returns once it answers PING
    /// (it syncs in the background).
    pub async fn start_replica(dir: &Path, extra: &[String], host: &str, port: u16) -> Self {
        Self::start_as(dir, extra, Some((host.to_owned(), port))).await
    }

    async fn start_as(dir: &Path, extra: &[String], replica_of: Option<(String, u16)>) -> Self {
        let mut bind = vec!["127.0.0.1".to_owned()];
        bind.extend(extra.iter().cloned());
        let mut s = Self {
            proc: None,
            port: free_port(),
            dir: dir.to_owned(),
            bind,
            replica_of,
            absent: false,
        };
        s.restart().await;
        s
    }

    /// A stand-in for a cluster whose servers use a Redis Cluster: any use
    /// panics, so a test of one server cannot pass by acting on nothing.
    pub fn absent(dir: &Path) -> Self {
        Self {
            proc: None,
            port: 0,
            dir: dir.to_owned(),
            bind: Vec::new(),
            replica_of: None,
            absent: true,
        }
    }

    /// Panics on the stand-in ([`RedisServer::absent`]).
    fn used(&self) {
        assert!(
            !self.absent,
            "this test acts on one Redis server, but the suite runs against a Redis \
             Cluster (AGENTPLANE_TEST_REDIS=cluster): read Redis through \
             TestCluster::redis_conn/keys, or build the cluster with .single_redis()"
        );
    }

    /// Starts it again, empty, as a replica of `host:port` (a master that a
    /// failover replaced, come back).
    pub async fn restart_as_replica_of(&mut self, host: &str, port: u16) {
        self.replica_of = Some((host.to_owned(), port));
        self.restart().await;
    }

    /// This one is the master now (a failover promoted it).
    pub fn promoted(&mut self) {
        self.replica_of = None;
    }

    /// This one replicates `host:port` now (the sentinels made it so).
    pub fn demoted_to(&mut self, host: &str, port: u16) {
        self.replica_of = Some((host.to_owned(), port));
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        self.used();
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The server's pid while it runs.
    pub fn pid(&self) -> Option<i32> {
        self.used();
        self.proc.as_ref().map(Proc::pid)
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.used();
        self.port
    }

    /// `redis://ADDR:PORT` for another address it listens on.
    pub fn url_at(&self, addr: &str) -> String {
        self.used();
        format!("redis://{addr}:{}", self.port)
    }

    /// A client connection for assertions.
    pub async fn conn(&self) -> redis::aio::MultiplexedConnection {
        self.used();
        redis::Client::open(self.url())
            .expect("redis url")
            .get_multiplexed_async_connection()
            .await
            .expect("connect to test redis")
    }

    /// Kills it (SIGKILL): all data is lost, as with a crash without persistence.
    pub fn stop(&mut self) {
        self.used();
        self.proc = None;
    }

    /// Starts it again on the same port, empty.
    pub async fn restart(&mut self) {
        self.used();
        let _ = std::fs::remove_file(self.dir.join("dump.rdb"));
        self.start_again().await;
    }

    /// `SHUTDOWN SAVE`: Redis writes its data to disk and exits, as in a
    /// clean restart; returns once the process is gone.
    pub async fn shutdown_saving(&mut self) {
        self.used();
        let _ = redis::cmd("SHUTDOWN")
            .arg("SAVE")
            .query_async::<()>(&mut self.conn().await)
            .await;
        if let Some(p) = self.proc.as_mut() {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while p.is_running() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "redis did not shut down"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        self.proc = None;
    }

    /// Starts it again on the same port with the data a
    /// [`RedisServer::shutdown_saving`] wrote.
    pub async fn restart_with_data(&mut self) {
        assert!(self.dir.join("dump.rdb").is_file(), "no saved data to load");
        self.start_again().await;
    }

    async fn start_again(&mut self) {
        self.proc = None;
        let mut cmd = Command::new(binary());
        cmd.args(["--port", &self.port.to_string()])
            .arg("--bind")
            .args(&self.bind)
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .args(self.replica_of.iter().flat_map(|(h, p)| {
                [
                    "--replicaof".to_owned(),
                    h.clone(),
                    p.to_string(),
                    "--replica-announce-ip".to_owned(),
                    h.clone(),
                ]
            }))
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null());
        let log = self.dir.join(format!("redis-{}.log", self.port));
        cmd.arg("--logfile").arg(&log);
        self.proc = Some(Proc::spawn(cmd, &log).expect("start redis-server"));
        answers_ping(&self.url()).await;
    }

    /// SIGSTOP: Redis freezes (its clock, and so its TTLs, run on).
    pub fn freeze(&self) {
        self.used();
        if let Some(p) = &self.proc {
            p.signal(nix::sys::signal::Signal::SIGSTOP);
        }
    }

    /// SIGCONT after [`RedisServer::freeze`].
    pub fn thaw(&self) {
        self.used();
        if let Some(p) = &self.proc {
            p.signal(nix::sys::signal::Signal::SIGCONT);
        }
    }

    /// `INFO commandstats`, raw.
    pub async fn commandstats(&self) -> String {
        self.used();
        redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut self.conn().await)
            .await
            .expect("INFO commandstats")
    }

    /// Calls so far of each command (`INFO commandstats`, parsed), by
    /// lowercase name (`evalsha`, `scan`, `client|setname`).
    pub async fn command_calls(&self) -> std::collections::BTreeMap<String, u64> {
        parse_command_calls(&self.commandstats().await)
    }
}

/// `cmdstat_scan:calls=3,usec=…` lines to `{"scan": 3}`.
pub fn parse_command_calls(stats: &str) -> std::collections::BTreeMap<String, u64> {
    let mut calls = std::collections::BTreeMap::new();
    for (cmd, n) in parse_lines(stats) {
        *calls.entry(cmd).or_insert(0) += n;
    }
    calls
}

/// The `(command, calls)` of each `cmdstat_` line (several servers' stats
/// may be one after the other).
fn parse_lines(stats: &str) -> Vec<(String, u64)> {
    stats
        .lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest.split(',').find_map(|f| f.strip_prefix("calls="))?;
            Some((name.to_owned(), calls.parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn commandstats_parse_to_calls_by_command() {
        let stats = "# Commandstats\r\ncmdstat_scan:calls=3,usec=30,usec_per_call=10.00\r\ncmdstat_client|setname:calls=1,usec=1\r\n";
        let calls = super::parse_command_calls(stats);
        assert_eq!(calls.get("scan"), Some(&3));
        assert_eq!(calls.get("client|setname"), Some(&1));
        assert_eq!(calls.len(), 2);
    }
}
