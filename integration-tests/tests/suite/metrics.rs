//! Prometheus metrics (P9), scraped from the real servers started with
//! `--metrics-listen 127.0.0.1:0`: spawns and starts counted exactly, Redis
//! errors by operation, the registry-up gauge following Redis, hosts lost
//! and agents rescheduled counted once across replicas, every line read by
//! a parser the project did not write, and series that do not grow with
//! the agents that come and go.

use std::time::Duration;

use agentplane::proto::v1::restart_policy::Mode;
use agentplane::proto::v1::{DeleteAgentRequest, GetAgentRequest, SpawnAgentRequest};
use agentplane_integration_tests::metrics::{self, scrape, sum, value};
use agentplane_integration_tests::{eventually, spec, TestCluster};

const LISTEN: &str = "127.0.0.1:0";

/// A cluster whose servers all serve `/metrics`.
fn builder() -> agentplane_integration_tests::Builder {
    // One Redis server: a test stops it.
    TestCluster::builder()
        .single_redis()
        .control_plane_arg("--metrics-listen")
        .control_plane_arg(LISTEN)
        .host_arg("--metrics-listen")
        .host_arg(LISTEN)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawns_and_starts_are_counted_exactly_every_line_parses_and_series_stay_bounded() {
    let cluster = builder().start().await;
    let cp = metrics::addr(&cluster.control_planes[0]).await;
    let host = metrics::addr(&cluster.hosts[0]).await;

    for _ in 0..5 {
        cluster.spawn(&["sleep", "1000"]).await;
    }
    let (c, h) = (scrape(&cp).await, scrape(&host).await);
    assert_eq!(
        value(
            &c,
            "agentplane_spawn_duration_seconds_count{outcome=\"ok\"}"
        ),
        Some(5.0),
        "{c}"
    );
    assert_eq!(
        value(
            &h,
            "agentplane_agent_start_duration_seconds_count{outcome=\"ok\"}"
        ),
        Some(5.0),
        "{h}"
    );
    assert_eq!(
        value(&h, "agentplane_agents{state=\"RUNNING\"}"),
        Some(5.0),
        "{h}"
    );
    assert_eq!(
        value(
            &c,
            "agentplane_host_call_duration_seconds_count{method=\"StartAgent\",outcome=\"ok\"}"
        ),
        Some(5.0),
        "{c}"
    );
    assert!(
        value(
            &h,
            &format!(
                "agentplane_build_info{{version=\"{}\",server=\"host-agent\"}}",
                agentplane::VERSION
            )
        ) == Some(1.0),
        "{h}"
    );

    // A program that is not there: the host's start fails, once.
    let _ = cluster
        .client()
        .await
        .spawn_agent(SpawnAgentRequest {
            spec: Some(spec(&["/nonexistent/agentplane-metrics-test"], None)),
            request_id: String::new(),
        })
        .await;
    let h = scrape(&host).await;
    assert_eq!(
        value(
            &h,
            "agentplane_agent_start_duration_seconds_count{outcome=\"error\"}"
        ),
        Some(1.0),
        "{h}"
    );
    assert_eq!(
        value(
            &h,
            "agentplane_agent_start_duration_seconds_count{outcome=\"ok\"}"
        ),
        Some(5.0),
        "{h}"
    );

    // Agents that come and go add no series once each kind was seen.
    let cycle = || async {
        let a = cluster.spawn(&["sleep", "1000"]).await;
        cluster
            .client()
            .await
            .delete_agent(DeleteAgentRequest {
                id: a.id,
                force: true,
            })
            .await
            .expect("delete");
    };
    cycle().await;
    let (c0, h0) = (scrape(&cp).await, scrape(&host).await);
    for _ in 0..50 {
        cycle().await;
    }
    let (c1, h1) = (scrape(&cp).await, scrape(&host).await);
    assert_eq!(
        metrics::series(&c1),
        metrics::series(&c0),
        "the control plane's series grew:\n{c1}"
    );
    assert_eq!(
        metrics::series(&h1),
        metrics::series(&h0),
        "the host agent's series grew:\n{h1}"
    );
    assert_eq!(
        value(
            &c1,
            "agentplane_spawn_duration_seconds_count{outcome=\"ok\"}"
        ),
        value(
            &c0,
            "agentplane_spawn_duration_seconds_count{outcome=\"ok\"}"
        )
        .map(|n| n + 50.0),
    );

    for text in [&c1, &h1] {
        let parsed = metrics::parse_with_python(text);
        assert_eq!(parsed, metrics::series(text), "{text}");
    }
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_errors_are_counted_by_operation_and_registry_up_follows_redis() {
    let mut cluster = builder().start().await;
    let cp = metrics::addr(&cluster.control_planes[0]).await;
    let agent = cluster.spawn(&["sleep", "1000"]).await;
    let up = |text: &str| value(text, "agentplane_registry_up");
    eventually(Duration::from_secs(10), "registry up = 1", || async {
        (up(&scrape(&cp).await) == Some(1.0)).then_some(())
    })
    .await;
    let reads = "agentplane_redis_errors_total{operation=\"read agent record\"}";

    cluster.redis.stop();
    eventually(Duration::from_secs(10), "registry up = 0", || async {
        (up(&scrape(&cp).await) == Some(0.0)).then_some(())
    })
    .await;
    let before = value(&scrape(&cp).await, reads).unwrap_or(0.0);
    let mut client = cluster.client().await;
    for _ in 0..2 {
        let e = client
            .get_agent(GetAgentRequest {
                id: agent.id.clone(),
            })
            .await
            .expect_err("Redis is down");
        assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");
    }
    let after = scrape(&cp).await;
    assert_eq!(value(&after, reads), Some(before + 2.0), "{after}");
    assert!(
        sum(&after, "agentplane_redis_errors_total") >= 2.0,
        "{after}"
    );

    cluster.redis.restart().await;
    eventually(Duration::from_secs(15), "registry up = 1 again", || async {
        (up(&scrape(&cp).await) == Some(1.0)).then_some(())
    })
    .await;
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_host_and_its_rescheduled_agents_are_counted_once_across_replicas() {
    let mut cluster = builder()
        .control_planes(2)
        .hosts(2)
        .heartbeat_ttl(Duration::from_millis(1500))
        .start()
        .await;
    let cps = [
        metrics::addr(&cluster.control_planes[0]).await,
        metrics::addr(&cluster.control_planes[1]).await,
    ];
    let mut on_h1 = Vec::new();
    while on_h1.len() < 3 {
        let a = cluster
            .spawn_spec(spec(&["sleep", "1000"], Some(Mode::Always)))
            .await;
        if a.host == "h1" {
            on_h1.push(a.id);
        }
    }
    cluster.kill_machine("h1");
    for id in &on_h1 {
        cluster
            .wait_agent(id, "RUNNING on h2", Duration::from_secs(30), |a| {
                a.host == "h2" && a.state() == agentplane::proto::v1::AgentState::Running
            })
            .await;
    }
    let total = |name: &'static str| {
        let cps = cps.clone();
        async move {
            let mut n = 0.0;
            for cp in &cps {
                n += sum(&scrape(cp).await, name);
            }
            n
        }
    };
    // A replica counts a reschedule once its placement call returns, which
    // can be just after the host recorded the agent RUNNING.
    eventually(
        Duration::from_secs(10),
        "3 reschedules counted",
        || async move { (total("agentplane_agents_rescheduled_total").await >= 3.0).then_some(()) },
    )
    .await;
    assert_eq!(total("agentplane_hosts_lost_total").await, 1.0);
    assert_eq!(total("agentplane_agents_rescheduled_total").await, 3.0);
    let lost = total("agentplane_agents_lost_total").await;
    assert_eq!(lost, 3.0, "each agent declared LOST once");
    cluster.finish().await;
}
