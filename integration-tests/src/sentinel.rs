//! Three real Redis Sentinels (quorum 2) watching a test cluster's Redis,
//! so that a test can kill the master and see a replica promoted.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::process::Proc;
use crate::redis_server::{binary, free_port};

/// The name the sentinels monitor the master under.
pub const MASTER_NAME: &str = "ap-test";

/// How long the sentinels wait before they call an unanswering master down.
pub const DOWN_AFTER: Duration = Duration::from_millis(1000);

/// Running sentinels.
#[derive(Debug)]
pub struct Sentinels {
    /// Held so that they end with this value (a `Proc` kills on drop).
    _procs: Vec<Proc>,
    addrs: Vec<String>,
}

impl Sentinels {
    /// Starts three sentinels on `ip` (and 127.0.0.1) watching the master at
    /// `ip:master_port`; returns once each names it.
    pub async fn start(dir: &Path, ip: &str, master_port: u16) -> Self {
        let mut procs = Vec::new();
        let mut addrs = Vec::new();
        for i in 0..3 {
            let port = free_port();
            let conf = dir.join(format!("sentinel-{i}.conf"));
            let log = dir.join(format!("sentinel-{i}.log"));
            let bind = if ip == "127.0.0.1" {
                ip.to_owned()
            } else {
                format!("{ip} 127.0.0.1")
            };
            let text = format!(
                "port {port}\nbind {bind}\nprotected-mode no\ndir {dir}\nlogfile {log}\n\
                 sentinel announce-ip {ip}\n\
                 sentinel monitor {MASTER_NAME} {ip} {master_port} 2\n\
                 sentinel down-after-milliseconds {MASTER_NAME} {down}\n\
                 sentinel failover-timeout {MASTER_NAME} 4000\n\
                 sentinel parallel-syncs {MASTER_NAME} 1\n",
                dir = dir.display(),
                log = log.display(),
                down = DOWN_AFTER.as_millis(),
            );
            std::fs::write(&conf, text).expect("write sentinel.conf");
            let mut cmd = Command::new(binary());
            cmd.arg(&conf).arg("--sentinel").stdout(Stdio::null());
            procs.push(Proc::spawn(cmd, &log).expect("start redis sentinel"));
            addrs.push(format!("{ip}:{port}"));
        }
        let s = Self {
            _procs: procs,
            addrs,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        for addr in &s.addrs {
            while Self::ask(addr).await.is_none() {
                assert!(
                    Instant::now() < deadline,
                    "sentinel {addr} never named the master"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        s
    }

    /// `--redis-sentinel`'s value.
    pub fn arg(&self) -> String {
        self.addrs.join(",")
    }

    /// The master the first answering sentinel names.
    pub async fn master(&self) -> Option<(String, u16)> {
        for addr in &self.addrs {
            if let Some(m) = Self::ask(addr).await {
                return Some(m);
            }
        }
        None
    }

    async fn ask(addr: &str) -> Option<(String, u16)> {
        let client = redis::Client::open(format!("redis://{addr}")).ok()?;
        let mut c = client.get_multiplexed_async_connection().await.ok()?;
        redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg(MASTER_NAME)
            .query_async::<Option<(String, u16)>>(&mut c)
            .await
            .ok()
            .flatten()
    }
}
