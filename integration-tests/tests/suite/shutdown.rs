//! Graceful host-agent shutdown: the host disappears from the registry at once
//! and its agents are stopped, none left behind.

use std::time::{Duration, Instant};

use agentplane::proto::v1::AgentSpec;
use agentplane::time::duration_to_proto;
use agentplane_integration_tests::{eventually, procfs, TestCluster};
use nix::sys::signal::Signal;
use redis::AsyncCommands;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_stop_agents_on_exit_sigterm_removes_the_host_key_at_once_and_stops_every_agent() {
    // A long TTL: if the key vanished it was deleted, not expired. (The
    // default leaves agents running instead: adoption.rs.)
    let mut cluster = TestCluster::builder()
        .hosts(1)
        .heartbeat_ttl(Duration::from_secs(60))
        .host_arg("--stop-agents-on-exit")
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
    // One agent that ignores SIGTERM (its sleep inherits that) and has a long
    // grace: the host agent's shutdown waits that grace out, then SIGKILLs it.
    // The key must be gone while it waits, not once the host agent has exited.
    let grace = Duration::from_secs(4);
    let slow = cluster
        .spawn_spec(AgentSpec {
            argv: ["sh", "-c", "trap '' TERM; sleep 1000 & wait; wait"]
                .map(str::to_owned)
                .to_vec(),
            stop_grace: Some(duration_to_proto(grace)),
            ..Default::default()
        })
        .await;
    groups.push(slow.pid);
    eventually(
        Duration::from_secs(5),
        "the slow agent's sleep runs",
        || {
            let n = procfs::alive_in_group(slow.pid).len();
            async move { (n == 2).then_some(()) }
        },
    )
    .await;
    let mut redis = cluster.redis_conn().await;
    let h1 = cluster.keys().host("h1");
    assert!(redis.exists::<_, bool>(&h1).await.unwrap());

    let t = Instant::now();
    cluster.hosts[0].proc.signal(Signal::SIGTERM);
    let (host_pid, slow_pid) = (cluster.hosts[0].proc.pid(), slow.pid);
    let removed = eventually(
        grace,
        "the host key removed while the host agent stops its agents",
        || {
            let (mut redis, h1) = (redis.clone(), h1.clone());
            async move {
                let exists = redis.exists::<_, bool>(&h1).await.unwrap();
                // Looked at after the key: a key seen gone was gone while
                // both were still there.
                let host_alive = procfs::is_alive(host_pid);
                let slow_alive = !procfs::alive_in_group(slow_pid).is_empty();
                assert!(
                    host_alive && slow_alive,
                    "{:?} after the SIGTERM the host agent is done stopping its agents (host \
                     agent alive: {host_alive}, slow agent alive: {slow_alive}) and the host \
                     key ap:host:h1 was {} then",
                    t.elapsed(),
                    if exists {
                        "still there"
                    } else {
                        "not seen gone before"
                    }
                );
                (!exists).then(|| t.elapsed())
            }
        },
    )
    .await;
    eprintln!("host key removed {removed:?} after the SIGTERM (slow agent's grace {grace:?})");
    eventually(Duration::from_secs(15), "host agent exits", || {
        let running = cluster.hosts[0].proc.is_running();
        async move { (!running).then_some(()) }
    })
    .await;
    let took = t.elapsed();
    assert!(
        took >= grace,
        "the shutdown waited out the slow agent's grace: {took:?}"
    );
    assert!(took < Duration::from_secs(10), "shutdown took {took:?}");
    assert!(
        !redis.exists::<_, bool>(&h1).await.unwrap(),
        "host key still removed"
    );
    for pgid in groups {
        assert!(
            procfs::alive_in_group(pgid).is_empty(),
            "group {pgid} left running"
        );
    }
    cluster.finish().await;
}

/// An attach session whose client keeps its input open (a terminal left
/// attached) must not hold either server's shutdown: each ends the session
/// and exits cleanly, not at its drain limit with an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_attach_session_holds_neither_servers_shutdown() {
    use futures::StreamExt;
    let mut cluster = TestCluster::builder().hosts(1).start().await;
    let a = cluster.spawn(&["sleep", "1000"]).await;
    let attach = |id: &str| {
        let first = agentplane::proto::v1::AttachInput {
            id: id.to_owned(),
            ..Default::default()
        };
        futures::stream::iter([first]).chain(futures::stream::pending())
    };
    // Exits after SIGTERM, successfully, and without reaching its drain
    // limit (where it would close what is still open and say so).
    async fn exits_cleanly(p: &mut agentplane_integration_tests::Proc, what: &str) {
        p.signal(Signal::SIGTERM);
        let child = &mut p.child;
        let status = eventually(Duration::from_secs(40), what, || {
            let s = child.try_wait().expect("wait");
            async move { s }
        })
        .await;
        assert!(status.success(), "{what}: {status}");
        let log = std::fs::read_to_string(&p.log).expect("log");
        for limit in [
            "in-flight requests did not finish in time",
            "background tasks did not finish within the shutdown bound",
        ] {
            assert!(
                !log.contains(limit),
                "{what} only at its drain limit: {limit}\n{log}"
            );
        }
    }

    let mut client = cluster.client().await;
    let session = client.attach(attach(&a.id)).await.expect("attach");
    exits_cleanly(
        &mut cluster.control_planes[0].proc,
        "the control plane exits",
    )
    .await;
    drop(session);

    cluster.restart_control_plane(0);
    let mut client = cluster.client().await;
    let session = client.attach(attach(&a.id)).await.expect("attach again");
    exits_cleanly(&mut cluster.hosts[0].proc, "the host agent exits").await;
    drop(session);
    // Left running to the keeper (--keep-agents-on-exit, the default).
    assert!(procfs::is_alive(a.pid), "the agent is kept");
}
