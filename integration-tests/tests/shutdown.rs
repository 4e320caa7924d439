//! Graceful host-agent shutdown: the host disappears from the registry at once
//! and its agents are stopped, none left behind.

use std::time::{Duration, Instant};

use agentplane_integration_tests::{eventually, procfs, TestCluster};
use nix::sys::signal::Signal;
use redis::AsyncCommands;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_removes_the_host_key_at_once_and_stops_every_agent() {
    // A long TTL: if the key vanished it was deleted, not expired.
    let mut cluster = TestCluster::builder()
        .hosts(1)
        .heartbeat_ttl(Duration::from_secs(60))
        .start()
        .await;
    let mut groups = Vec::new();
    for _ in 0..3 {
        groups.push(
            cluster
                .spawn(&["sh", "-c", "sleep 1000 & sleep 1000; wait"])
                .await
                .pid,
        );
    }
    let mut redis = cluster.redis.conn().await;
    assert!(redis.exists::<_, bool>("ap:host:h1").await.unwrap());

    let t = Instant::now();
    cluster.hosts[0].proc.signal(Signal::SIGTERM);
    eventually(Duration::from_secs(15), "host agent exits", || {
        let running = cluster.hosts[0].proc.is_running();
        async move { (!running).then_some(()) }
    })
    .await;
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "shutdown took {:?}",
        t.elapsed()
    );
    assert!(
        !redis.exists::<_, bool>("ap:host:h1").await.unwrap(),
        "host key removed"
    );
    for pgid in groups {
        assert!(
            procfs::alive_in_group(pgid).is_empty(),
            "group {pgid} left running"
        );
    }
    cluster.finish().await;
}
