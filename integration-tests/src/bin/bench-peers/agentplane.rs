//! The workloads on agentplane: Redis, a control plane and one host agent
//! (release binaries), driven through `agentctl` and the gRPC API.

use std::process::Output;
use std::time::{Duration, Instant};

use agentplane::proto::v1::{AgentSpec, PauseAgentRequest, ResumeAgentRequest, SpawnAgentRequest};
use agentplane_integration_tests::TestCluster;

use crate::os;
use crate::report::Results;
use crate::Plan;

/// The marker that tells agentplane's sleepers from the other systems'.
const SLEEP: [&str; 2] = ["sleep", "100000.2"];

async fn cluster(plan: &Plan) -> TestCluster {
    TestCluster::builder()
        .max_agents(u32::try_from(plan.agents + 64).unwrap_or(u32::MAX))
        // The control plane's default; the harness passes 200 ms.
        .reconcile_interval(Duration::from_secs(1))
        .host_arg("--stop-agents-on-exit")
        .start()
        .await
}

/// The processes that supervise: what a user of agentplane runs beside the
/// agents (the CPU figures count all of them).
fn stack(c: &TestCluster) -> Vec<i32> {
    let mut pids = vec![c.hosts[0].proc.pid(), c.control_planes[0].proc.pid()];
    pids.extend(c.keeper_pid("h1"));
    pids.extend(c.redis.pid());
    pids
}

/// The host side alone (host agent and keeper), whose memory grows per agent.
fn host_side(c: &TestCluster) -> Vec<i32> {
    let mut pids = vec![c.hosts[0].proc.pid()];
    pids.extend(c.keeper_pid("h1"));
    pids
}

fn ok(out: &Output, what: &str) {
    if !out.status.success() {
        eprintln!("agentplane: {what} failed: {}", os::head(&out.stderr, 5));
    }
}

/// Runs every workload and fills in the results.
pub async fn run(plan: &Plan) -> Results {
    let mut r = Results::default();
    let argv: Vec<String> = SLEEP.iter().map(|s| (*s).to_owned()).collect();

    // Start, memory, stop.
    let c = cluster(plan).await;
    // Settled: the first heartbeat, the keeper attached.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = os::rss_kib(&host_side(&c));
    let count = plan.agents.to_string();
    crate::start_stop(
        &mut r,
        plan,
        &argv,
        idle,
        &|| host_side(&c),
        &mut || {
            let out = c.agentctl(&["spawn", "--count", &count, "--", SLEEP[0], SLEEP[1]]);
            ok(&out, "spawn --count");
        },
        &mut || ok(&c.agentctl(&["stop", "--all"]), "stop --all"),
    );
    drop(c);

    // `yes` agents with a log cap.
    let c = cluster(plan).await;
    let data = c.data_dir("h1");
    let disk_before = os::disk_bytes(&data);
    let cap = plan.log_cap_bytes.to_string();
    let n = plan.yes_agents.to_string();
    let out = c.agentctl(&["spawn", "--count", &n, "--log-max-bytes", &cap, "--", "yes"]);
    ok(&out, "spawn yes");
    tokio::task::block_in_place(|| {
        crate::yes_figures(&mut r, plan, &stack(&c), &data, disk_before);
    });
    ok(&c.agentctl(&["stop", "--all"]), "stop yes");
    drop(c);

    // A crash loop: restart always, the default backoff (1 s, doubling).
    let c = cluster(plan).await;
    let file = plan.work.join("agentplane-crashes");
    let script = format!("echo x >> {}; exit 1", file.display());
    let n = plan.crash_agents.to_string();
    let out = c.agentctl(&[
        "spawn",
        "--count",
        &n,
        "--restart",
        "always",
        "--",
        "sh",
        "-c",
        &script,
    ]);
    ok(&out, "spawn crash loop");
    tokio::task::block_in_place(|| crate::crash_figures(&mut r, plan, &stack(&c), &file));
    ok(&c.agentctl(&["stop", "--all"]), "stop crash loop");
    drop(c);

    // Pause/resume calls through the API, one at a time.
    let c = cluster(plan).await;
    let mut client = c.client().await;
    let mut ids = Vec::new();
    for _ in 0..plan.pause_agents {
        let a = client
            .spawn_agent(SpawnAgentRequest {
                spec: Some(AgentSpec {
                    argv: argv.clone(),
                    ..Default::default()
                }),
                request_id: String::new(),
            })
            .await
            .expect("spawn for pause")
            .into_inner();
        ids.push(a.agent.unwrap_or_default().id);
    }
    let mut took = Vec::with_capacity(plan.calls);
    for i in 0..plan.calls {
        let id = ids[(i / 2) % ids.len()].clone();
        let t = Instant::now();
        let done = if i % 2 == 0 {
            client.pause_agent(PauseAgentRequest { id }).await.map(drop)
        } else {
            client
                .resume_agent(ResumeAgentRequest { id })
                .await
                .map(drop)
        };
        took.push(t.elapsed());
        if let Err(s) = done {
            eprintln!("agentplane: call {i}: {s}");
        }
    }
    (r.pause_p50_ms, r.pause_p99_ms) = crate::p50_p99(&mut took);
    ok(&c.agentctl(&["stop", "--all"]), "stop paused");
    r
}
