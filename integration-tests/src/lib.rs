//! Test harness of agentplane: [`TestCluster`] starts a real `redis-server` on
//! a free port and the real `control-plane` and `host-agent` binaries on port
//! 0, and tears every process down when dropped, even when a test fails.

pub mod bench;
mod cluster;
pub mod cpu;
pub mod fleet;
pub mod metrics;
pub mod netns;
pub mod output;
pub mod pki;
mod process;
pub mod procfs;
pub mod pty;
pub mod redis_cluster;
mod redis_server;
pub mod sentinel;
pub mod soak;
pub mod sweep_harness;

use std::future::Future;
use std::time::Duration;

pub use cluster::{bin, bin_dir, Builder, Server, TestCluster};
pub use process::Proc;
pub use redis_server::{free_port, parse_command_calls, RedisServer};

/// A spec running `argv` with an optional restart mode (defaults elsewhere).
pub fn spec(
    argv: &[&str],
    restart: Option<agentplane::proto::v1::restart_policy::Mode>,
) -> agentplane::proto::v1::AgentSpec {
    agentplane::proto::v1::AgentSpec {
        argv: argv.iter().map(|s| (*s).to_owned()).collect(),
        restart: restart.map(|m| agentplane::proto::v1::RestartPolicy {
            mode: m as i32,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Bytes of the files under `dir`, recursively (0 if it is missing).
pub fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => dir_bytes(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

/// Polls `f` until it returns `Some`, at most `limit`; panics with `what` then.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
