//! The randomized fault soak (P5): a seeded, reproducible run of real
//! processes (3 host agents, 2 control planes, Redis) with clients spawning,
//! pausing, stopping and deleting at random, and one random fault per round.
//! After each round it waits (with a deadline) until the records and /proc
//! agree, and reports what never converged as a violation naming the seed,
//! the round and the fault.
//!
//! Checked after each round, on /proc and the API:
//! (a) every RUNNING or PAUSED record has exactly one process group on this
//!     machine, led by its pid (all stopped when PAUSED);
//! (b) no agent has processes in two groups (all hosts share this machine's
//!     /proc, so (a) covers it);
//! (c) every restartable agent not stopped by a user, whose record exists,
//!     is RUNNING or PAUSED;
//! (d) no process carries the marker of a terminal or absent record;
//! (e) every agent that exits by itself (a quarter of the spawns run
//!     `sh -c 'sleep N; exit C'`, never restarted) and has ended is EXITED
//!     COMPLETED with its code C, unless something else ended it first (a
//!     stop, its host's death): an exit observed during an outage included;
//! (f) no two records came from one spawn request id;
//! (g) no zombie children under a host agent or its keeper;
//! (h) a restart of a host agent (SIGTERM, then started again at once; or
//!     SIGKILL, then started again after 0-2 TTL) restarts none of its
//!     agents: each RUNNING or PAUSED before it has the same
//!     state, pid, generation and restarts after it.
//!
//! Faults: SIGKILL of a host agent (its host restarting meanwhile; started
//! again after 0-2 TTL), SIGKILL of a host agent and its keeper (a dead
//! machine; started again after 0-2 TTL), SIGKILL of a
//! control plane, SIGSTOP of Redis for 0-2 TTL, Redis restarted empty (with
//! Sentinel instead of those two: SIGKILL of the Redis master, a replica
//! promoted, the old master back as its replica), a
//! host's link cut for 0-3 TTL (hosts run in network namespaces: root), a
//! drain of a host (then uncordoned), a restart of a host agent (SIGTERM,
//! started again at once: its agents are adopted).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use agentplane::proto::v1::restart_policy::Mode;
use agentplane::proto::v1::{
    AgentSpec, CordonHostRequest, DeleteAgentRequest, DrainHostRequest, PauseAgentRequest,
    RestartPolicy, ResumeAgentRequest, SpawnAgentRequest, StopAgentRequest,
};
use nix::sys::signal::Signal;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::TestCluster;

mod invariants;
use invariants::{check, list_all, live_on, restarted_by_the_fault};

/// How a soak runs.
#[derive(Debug, Clone)]
pub struct SoakConfig {
    /// The seed of every random choice.
    pub seed: u64,
    /// Stop starting rounds after this long.
    pub duration: Duration,
    /// Agents the clients keep around.
    pub agents: usize,
    /// The hosts' heartbeat TTL.
    pub ttl: Duration,
    /// Redis with a replica and sentinels, and "fail over Redis" (SIGKILL of
    /// the master) as a fault in place of freezing Redis and restarting it
    /// empty (a freeze past the sentinels' patience would fail over behind
    /// the soak's back).
    pub sentinel: bool,
}

/// What a soak saw.
#[derive(Debug, Default)]
pub struct SoakReport {
    /// Rounds run.
    pub rounds: u32,
    /// Faults injected, by kind.
    pub faults: BTreeMap<&'static str, u32>,
    /// Client operations made, by kind.
    pub ops: BTreeMap<&'static str, u32>,
    /// Invariants that did not hold by the round's deadline.
    pub violations: Vec<String>,
    /// Agents whose record Redis lost with its data (restart empty) while no
    /// host held them: not a violation, reported.
    pub dropped_with_redis: usize,
}

#[derive(Debug, Clone)]
struct Tracked {
    restartable: bool,
    /// A user stopped it, or a stop's answer was lost: no longer expected to run.
    stopped: bool,
    /// The code it exits with by itself, for an agent that does.
    exits_with: Option<i32>,
}

/// One fault.
#[derive(Debug, Clone, Copy)]
enum Fault {
    KillHost { host: usize, down: Duration },
    KillMachine { host: usize, down: Duration },
    KillControlPlane { index: usize },
    FreezeRedis { for_: Duration },
    RestartRedisEmpty,
    Partition { host: usize, for_: Duration },
    Drain { host: usize },
    RestartHost { host: usize },
    FailOverRedis,
}

impl Fault {
    fn kind(self) -> &'static str {
        match self {
            Fault::KillHost { .. } => "sigkill host agent",
            Fault::KillMachine { .. } => "sigkill host agent and keeper",
            Fault::KillControlPlane { .. } => "sigkill control plane",
            Fault::FreezeRedis { .. } => "sigstop redis",
            Fault::RestartRedisEmpty => "restart redis empty",
            Fault::Partition { .. } => "partition a host",
            Fault::Drain { .. } => "drain a host",
            Fault::RestartHost { .. } => "restart host agent",
            Fault::FailOverRedis => "fail over redis",
        }
    }
}

/// What does not hold now between the records and /proc: the checks (a),
/// (b), (d), (f) and (g) above, and (c) for the `restartable` agents (none
/// stopped by a user). For a cluster whose hosts run in network namespaces
/// (so other tests' agents are not counted).
pub async fn violations(cluster: &TestCluster, restartable: &[String]) -> Vec<String> {
    let known: HashMap<String, Tracked> = restartable
        .iter()
        .map(|id| {
            (
                id.clone(),
                Tracked {
                    restartable: true,
                    stopped: false,
                    exits_with: None,
                },
            )
        })
        .collect();
    check(cluster, &known).await
}

/// The dataset's epoch (`ap:epoch`; it changes when Redis loses its data).
async fn redis_epoch(cluster: &TestCluster) -> Option<String> {
    redis::cmd("GET")
        .arg(cluster.keys().epoch())
        .query_async(&mut cluster.redis_conn().await)
        .await
        .ok()
        .flatten()
}

/// Runs the soak; returns what it saw (violations included, never panics on one).
pub async fn run(cfg: &SoakConfig) -> SoakReport {
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let mut builder = TestCluster::builder()
        .hosts(3)
        .control_planes(2)
        .heartbeat_ttl(cfg.ttl)
        .network_namespaces();
    if cfg.sentinel {
        builder = builder.sentinel();
    }
    let mut cluster = builder.start().await;
    let mut report = SoakReport::default();
    let mut known: HashMap<String, Tracked> = HashMap::new();
    let mut requests = 0u64;
    let started = Instant::now();
    while started.elapsed() < cfg.duration {
        report.rounds += 1;
        let round = report.rounds;
        for _ in 0..4 {
            let op = client_op(&cluster, &mut rng, &mut known, &mut requests, cfg).await;
            *report.ops.entry(op).or_default() += 1;
        }
        let fault = match pick_fault(&mut rng, cfg.ttl) {
            Fault::FreezeRedis { .. } | Fault::RestartRedisEmpty if cfg.sentinel => {
                Fault::FailOverRedis
            }
            f => f,
        };
        *report.faults.entry(fault.kind()).or_default() += 1;
        let before = match fault {
            // A SIGKILLed host agent's host is restarting until the next
            // one adopts its agents: nothing may change either.
            Fault::RestartHost { host } | Fault::KillHost { host, .. } => {
                live_on(&cluster, &known, host).await
            }
            _ => Vec::new(),
        };
        eprintln!(
            "soak round {round} at {:.1} s: {fault:?}",
            started.elapsed().as_secs_f64()
        );
        let epoch = redis_epoch(&cluster).await;
        inject(&mut cluster, fault).await;
        let deadline = Instant::now() + 4 * cfg.ttl + Duration::from_secs(10);
        loop {
            let problems = check(&cluster, &known).await;
            if problems.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                for p in problems {
                    report.violations.push(format!(
                        "seed {} round {round} fault {fault:?}: {p}",
                        cfg.seed
                    ));
                }
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for p in restarted_by_the_fault(&cluster, &before).await {
            report.violations.push(format!(
                "seed {} round {round} fault {fault:?}: {p}",
                cfg.seed
            ));
        }
        // Records go only with a delete (whose answer may have been lost:
        // then the agent is marked stopped) or with Redis's data (restart
        // empty, or a failover onto a replica that had not synced yet, which
        // sentinels flapping on a loaded machine can do: for agents no host
        // held). Those are dropped from the model, so the clients spawn
        // others; any other vanished record is a violation.
        if let Some(records) = list_all(&cluster).await {
            let present: HashSet<&str> = records.iter().map(|a| a.id.as_str()).collect();
            let emptied =
                matches!(fault, Fault::RestartRedisEmpty) || redis_epoch(&cluster).await != epoch;
            let gone: Vec<(String, bool)> = known
                .iter()
                .filter(|(id, _)| !present.contains(id.as_str()))
                .map(|(id, t)| (id.clone(), t.stopped))
                .collect();
            for (id, stopped) in gone {
                known.remove(&id);
                if emptied {
                    report.dropped_with_redis += 1;
                } else if !stopped {
                    report.violations.push(format!(
                        "seed {} round {round} fault {fault:?}: the record of {id} vanished",
                        cfg.seed
                    ));
                }
            }
        }
        if !report.violations.is_empty() {
            let kept =
                std::env::temp_dir().join(format!("agentplane-soak-{}-round-{round}", cfg.seed));
            match cluster.keep_logs(&kept) {
                Ok(()) => eprintln!(
                    "soak: violations in round {round}; every server log kept in {}",
                    kept.display()
                ),
                Err(e) => eprintln!(
                    "soak: violations in round {round}; cannot keep the logs ({e}):\n{}",
                    cluster.logs()
                ),
            }
            break;
        }
    }
    cluster.finish().await;
    report
}

fn pick_fault(rng: &mut StdRng, ttl: Duration) -> Fault {
    let up_to = |rng: &mut StdRng, max: Duration| max.mul_f64(rng.random_range(0.0..1.0));
    match rng.random_range(0..14) {
        0..=1 => Fault::KillHost {
            host: rng.random_range(0..3),
            down: up_to(rng, 2 * ttl),
        },
        2 => Fault::KillMachine {
            host: rng.random_range(0..3),
            down: up_to(rng, 2 * ttl),
        },
        3..=4 => Fault::KillControlPlane {
            index: rng.random_range(0..2),
        },
        5..=6 => Fault::FreezeRedis {
            for_: up_to(rng, 2 * ttl),
        },
        7 => Fault::RestartRedisEmpty,
        8..=9 => Fault::Partition {
            host: rng.random_range(0..3),
            for_: up_to(rng, 3 * ttl),
        },
        10..=11 => Fault::Drain {
            host: rng.random_range(0..3),
        },
        _ => Fault::RestartHost {
            host: rng.random_range(0..3),
        },
    }
}

async fn inject(cluster: &mut TestCluster, fault: Fault) {
    match fault {
        Fault::KillHost { host, down } => {
            let id = format!("h{}", host + 1);
            cluster.host(&id).proc.signal(Signal::SIGKILL);
            tokio::time::sleep(down).await;
            cluster.restart_host(&id);
        }
        Fault::KillMachine { host, down } => {
            let id = format!("h{}", host + 1);
            cluster.kill_machine(&id);
            tokio::time::sleep(down).await;
            cluster.restart_host(&id);
        }
        Fault::RestartHost { host } => {
            let id = format!("h{}", host + 1);
            cluster.host(&id).proc.signal(Signal::SIGTERM);
            cluster
                .host(&id)
                .proc
                .wait_exit(Duration::from_secs(15))
                .await;
            cluster.restart_host(&id);
        }
        Fault::KillControlPlane { index } => {
            cluster.control_planes[index].proc.signal(Signal::SIGKILL);
            cluster.restart_control_plane(index);
        }
        // On a Redis Cluster: every node frozen; its data flushed.
        Fault::FreezeRedis { for_ } => match &cluster.redis_cluster {
            Some(nodes) => {
                nodes.freeze();
                tokio::time::sleep(for_).await;
                nodes.thaw();
            }
            None => {
                cluster.redis.freeze();
                tokio::time::sleep(for_).await;
                cluster.redis.thaw();
            }
        },
        Fault::RestartRedisEmpty if cluster.on_redis_cluster() => {
            // What a restart loses: the data and the scripts.
            let mut conn = cluster.redis_conn().await;
            redis::cmd("FLUSHALL")
                .query_async::<()>(&mut conn)
                .await
                .expect("FLUSHALL the cluster");
            redis::cmd("SCRIPT")
                .arg("FLUSH")
                .query_async::<()>(&mut conn)
                .await
                .expect("SCRIPT FLUSH the cluster");
        }
        Fault::RestartRedisEmpty => {
            cluster.redis.stop();
            cluster.redis.restart().await;
        }
        Fault::FailOverRedis => {
            cluster.fail_over_redis().await;
        }
        Fault::Partition { host, for_ } => {
            let lab = cluster
                .lab
                .as_ref()
                .expect("the soak runs hosts in namespaces");
            lab.cut(host);
            tokio::time::sleep(for_).await;
            lab.restore(host);
        }
        Fault::Drain { host } => {
            let id = format!("h{}", host + 1);
            let mut hs = cluster.host_client().await;
            // Agents that cannot move keep it from finishing: a bounded try.
            if let Ok(stream) = hs
                .drain_host(DrainHostRequest {
                    id: id.clone(),
                    force: false,
                    timeout: Some(prost_types::Duration {
                        seconds: 3,
                        nanos: 0,
                    }),
                })
                .await
            {
                let mut stream = stream.into_inner();
                while let Ok(Some(_)) = stream.message().await {}
            }
            let _ = hs
                .cordon_host(CordonHostRequest {
                    id,
                    cordoned: false,
                })
                .await;
        }
    }
}

/// One random client operation through a random replica; its answer does
/// not matter (the invariants are the judge), only what it tells the model.
async fn client_op(
    cluster: &TestCluster,
    rng: &mut StdRng,
    known: &mut HashMap<String, Tracked>,
    requests: &mut u64,
    cfg: &SoakConfig,
) -> &'static str {
    let mut c = cluster.client_of(rng.random_range(0..cluster.control_planes.len()));
    let ids: Vec<String> = {
        let mut v: Vec<String> = known.keys().cloned().collect();
        v.sort();
        v
    };
    let pick = |rng: &mut StdRng| ids.get(rng.random_range(0..ids.len().max(1))).cloned();
    let choice = if known.len() < cfg.agents {
        0
    } else {
        rng.random_range(1..5)
    };
    match choice {
        0 => {
            *requests += 1;
            let request_id = format!("soak-{}-{requests}", cfg.seed);
            // A quarter exit by themselves within a few rounds, with a code
            // of their own (0 included): (e) checks it is recorded.
            let exits_with = rng.random_bool(0.25).then(|| rng.random_range(0..=120));
            let (mode, argv) = match exits_with {
                Some(code) => {
                    let after = rng.random_range(1..=30);
                    (
                        Mode::Never,
                        vec![
                            "sh".into(),
                            "-c".into(),
                            format!("sleep {after}; exit {code}"),
                        ],
                    )
                }
                None => (
                    [Mode::Never, Mode::OnFailure, Mode::Always][rng.random_range(0..3)],
                    vec!["sleep".into(), "100000".into()],
                ),
            };
            let spec = AgentSpec {
                argv,
                labels: [("req".to_owned(), request_id.clone())].into(),
                restart: Some(RestartPolicy {
                    mode: mode as i32,
                    ..Default::default()
                }),
                stop_grace: Some(prost_types::Duration {
                    seconds: 1,
                    nanos: 0,
                }),
                ..Default::default()
            };
            // A client retries a failed spawn with the same request id.
            for _ in 0..3 {
                let r = c
                    .spawn_agent(SpawnAgentRequest {
                        spec: Some(spec.clone()),
                        request_id: request_id.clone(),
                    })
                    .await;
                if let Ok(r) = r {
                    if let Some(a) = r.into_inner().agent {
                        known.insert(
                            a.id,
                            Tracked {
                                restartable: mode != Mode::Never,
                                stopped: false,
                                exits_with,
                            },
                        );
                    }
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            "spawn"
        }
        1 => {
            if let Some(id) = pick(rng) {
                let _ = c.pause_agent(PauseAgentRequest { id }).await;
            }
            "pause"
        }
        2 => {
            if let Some(id) = pick(rng) {
                let _ = c.resume_agent(ResumeAgentRequest { id }).await;
            }
            "resume"
        }
        3 => {
            if let Some(id) = pick(rng) {
                // Expected ended whatever the answer: a lost answer may hide a done stop.
                if let Some(t) = known.get_mut(&id) {
                    t.stopped = true;
                }
                let _ = c.stop_agent(StopAgentRequest { id, grace: None }).await;
            }
            "stop"
        }
        _ => {
            if let Some(id) = pick(rng) {
                let r = c
                    .delete_agent(DeleteAgentRequest {
                        id: id.clone(),
                        force: true,
                    })
                    .await;
                if r.is_ok() {
                    known.remove(&id);
                } else if let Some(t) = known.get_mut(&id) {
                    t.stopped = true;
                }
            }
            "delete"
        }
    }
}
