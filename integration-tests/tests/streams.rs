//! Many and slow output streams: counts return to zero, memory stays bounded,
//! slow readers slow only themselves.

use std::time::{Duration, Instant};

use agentplane::proto::v1::agent_service_client::AgentServiceClient;
use agentplane::proto::v1::host_agent_client::HostAgentClient;
use agentplane::proto::v1::{
    AgentSpec, GetStatusRequest, LogStream, ServerStatus, StreamLogsRequest,
};
use agentplane_integration_tests::{eventually, TestCluster};
use tonic::transport::Channel;

fn follow(id: &str) -> StreamLogsRequest {
    StreamLogsRequest {
        id: id.to_owned(),
        offset: 0,
        tail_lines: None,
        follow: true,
        stream: LogStream::Unspecified as i32,
    }
}

async fn statuses(
    cp: &mut AgentServiceClient<Channel>,
    host: &mut HostAgentClient<Channel>,
) -> (ServerStatus, ServerStatus) {
    let a = cp
        .get_status(GetStatusRequest {})
        .await
        .expect("cp status")
        .into_inner();
    let b = host
        .get_status(GetStatusRequest {})
        .await
        .expect("host status")
        .into_inner();
    (a, b)
}

fn host_client(cluster: &TestCluster) -> HostAgentClient<Channel> {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", cluster.hosts[0].addr))
        .expect("endpoint")
        .connect_lazy();
    HostAgentClient::new(ch)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_dropped_followers_leave_no_stream_and_no_memory_behind() {
    let cluster = TestCluster::builder().start().await;
    let a = cluster
        .spawn(&["sh", "-c", "while :; do echo tick; sleep 0.01; done"])
        .await;
    let mut cp = cluster.client().await;
    let mut host = host_client(&cluster);
    // Warm up both servers' allocators with a few streams first.
    for _ in 0..20 {
        let mut s = cp.stream_logs(follow(&a.id)).await.unwrap().into_inner();
        s.message().await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (cp0, host0) = statuses(&mut cp, &mut host).await;
    assert_eq!((cp0.log_streams, host0.log_streams), (0, 0));

    let mut set = tokio::task::JoinSet::new();
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(100));
    for _ in 0..1000 {
        let mut c = cp.clone();
        let id = a.id.clone();
        let permit = sem.clone().acquire_owned().await.unwrap();
        set.spawn(async move {
            // Like `agentctl logs -f`, a follower retries a stream that broke
            // at the transport level (HTTP/2 resets under this churn); the
            // retries are counted and printed.
            let mut retries = 0;
            loop {
                let opened = c.stream_logs(follow(&id)).await;
                let got = match opened {
                    Ok(s) => {
                        let mut s = s.into_inner();
                        // Mid-stream: some output received, then the client goes away.
                        s.message().await.map(|m| m.is_some())
                    }
                    Err(e) => Err(e),
                };
                match got {
                    Ok(true) => break,
                    Ok(false) => panic!("stream ended before any output"),
                    Err(e) if retries < 3 && e.code() != tonic::Code::NotFound => retries += 1,
                    Err(e) => panic!("follower failed after {retries} retries: {e:?}"),
                }
            }
            drop(permit);
            retries
        });
    }
    let mut retried = 0;
    while let Some(r) = set.join_next().await {
        retried += r.unwrap();
    }
    eprintln!("1000 followers opened and dropped ({retried} transport-level retries)");
    let (cp1, host1) = eventually(
        Duration::from_secs(20),
        "stream counts back to zero",
        || {
            let (mut cp, mut host) = (cp.clone(), host.clone());
            async move {
                let (a, b) = statuses(&mut cp, &mut host).await;
                (a.log_streams == 0 && b.log_streams == 0).then_some((a, b))
            }
        },
    )
    .await;
    let grew = |before: u64, after: u64| after.saturating_sub(before) / (1024 * 1024);
    eprintln!(
        "after 1000 dropped followers: control plane RSS {} -> {} MiB, host agent RSS {} -> {} MiB",
        cp0.rss_bytes >> 20,
        cp1.rss_bytes >> 20,
        host0.rss_bytes >> 20,
        host1.rss_bytes >> 20
    );
    assert!(
        grew(cp0.rss_bytes, cp1.rss_bytes) < 10,
        "control plane RSS within 10 MiB"
    );
    assert!(
        grew(host0.rss_bytes, host1.rss_bytes) < 10,
        "host agent RSS within 10 MiB"
    );
    assert_eq!(cp1.panicked_tasks + host1.panicked_tasks, 0);
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_yes_agents_with_slow_readers_stay_bounded_and_a_fast_follower_keeps_up() {
    let secs: u64 = std::env::var("AGENTPLANE_LOAD_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let cluster = TestCluster::builder().max_agents(100).start().await;
    let cap = 4 * 1024 * 1024u64;
    let mut ids = Vec::new();
    for _ in 0..20 {
        let a = cluster
            .spawn_spec(AgentSpec {
                argv: vec!["yes".into()],
                log_max_bytes: cap,
                ..Default::default()
            })
            .await;
        ids.push(a.id);
    }
    let cp = cluster.client().await;
    let mut host = host_client(&cluster);
    let deadline = Instant::now() + Duration::from_secs(secs);
    // 3 slow readers per agent: about 1 KiB/s each (one chunk, then a long pause).
    let mut slow = tokio::task::JoinSet::new();
    for id in &ids {
        for _ in 0..3 {
            let mut c = cp.clone();
            let id = id.clone();
            slow.spawn(async move {
                let mut s = c.stream_logs(follow(&id)).await.expect("open").into_inner();
                let mut got = 0u64;
                while Instant::now() < deadline {
                    match s.message().await {
                        Ok(Some(chunk)) => got += chunk.data.len() as u64,
                        _ => break,
                    }
                    tokio::time::sleep(Duration::from_millis(64_000 / 64)).await;
                }
                got
            });
        }
    }
    // One fast follower, measured over the last part of the run.
    let mut c = cp.clone();
    let mut fast = c.stream_logs(follow(&ids[0])).await.unwrap().into_inner();
    let mut peak = (0u64, 0u64);
    let mut fast_bytes = 0u64;
    let mut late_bytes = 0u64;
    let late = deadline - Duration::from_secs(secs / 3);
    let mut last_check = Instant::now();
    let mut cpc = cp.clone();
    while Instant::now() < deadline {
        let chunk = fast.message().await.unwrap().expect("fast follower open");
        fast_bytes += chunk.data.len() as u64;
        if Instant::now() >= late {
            late_bytes += chunk.data.len() as u64;
        }
        if last_check.elapsed() > Duration::from_secs(2) {
            last_check = Instant::now();
            let (a, b) = statuses(&mut cpc, &mut host).await;
            peak = (peak.0.max(a.rss_bytes), peak.1.max(b.rss_bytes));
        }
    }
    drop(fast);
    let slow_total: u64 = {
        let mut t = 0;
        while let Some(r) = slow.join_next().await {
            t += r.unwrap();
        }
        t
    };
    let data = cluster.data_dir("h1").join("agents");
    let mut largest = 0u64;
    for dir in std::fs::read_dir(&data).unwrap().flatten() {
        largest = largest.max(agentplane_integration_tests::dir_bytes(&dir.path()));
    }
    eprintln!(
        "{secs}s of 20 yes agents, 60 slow readers ({} KiB/s each on average), one fast follower at {:.3} MB/s; \
         peak RSS control plane {} MiB, host agent {} MiB; largest agent log on disk {} KiB (cap {} KiB)",
        slow_total / 60 / secs.max(1) / 1024,
        fast_bytes as f64 / secs as f64 / 1e6,
        peak.0 >> 20,
        peak.1 >> 20,
        largest >> 10,
        cap >> 10
    );
    assert!(peak.0 < 64 << 20, "control plane RSS under 64 MiB");
    assert!(peak.1 < 64 << 20, "host agent RSS under 64 MiB");
    assert!(largest <= cap + 128 * 1024, "every log within its cap");
    // On 2 cores, 20 flooding agents keep the host agent busy writing to disk
    // (see the issue note): the fast follower must still get data to the end;
    // its rate is reported, not asserted.
    assert!(
        late_bytes > 0,
        "the fast follower still received data in the last third of the run"
    );
    assert!(
        fast_bytes >= secs * 8 * 1024,
        "the fast follower kept receiving: {fast_bytes}"
    );
    cluster.finish().await;
}
