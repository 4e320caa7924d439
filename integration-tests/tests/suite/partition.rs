//! A network partition between three hosts in three network namespaces: the
//! cut-off host's agents are LOST and the restartable ones run elsewhere; when
//! the link comes back its stale copies are killed (fencing) and no agent runs
//! twice from then on.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use agentplane::proto::v1::restart_policy::Mode;
use agentplane::proto::v1::{AgentSpec, AgentState, GetAgentRequest, RestartPolicy};
use agentplane_integration_tests::{procfs, TestCluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_link_loses_and_reschedules_and_a_healed_link_fences_the_stale_copies() {
    let ttl = Duration::from_millis(1500);
    let beat = ttl / 3;
    let cluster = TestCluster::builder()
        .hosts(3)
        .heartbeat_ttl(ttl)
        .network_namespaces()
        .start()
        .await;
    let lab = cluster.lab.as_ref().expect("lab");
    for (i, h) in cluster.hosts.iter().enumerate() {
        assert_eq!(
            h.addr.split(':').next(),
            Some(lab.host_ip(i).as_str()),
            "h{} has its own address",
            i + 1
        );
    }
    let mut on_h1 = Vec::new();
    let mut all = Vec::new();
    for i in 0..9 {
        // Round robin over 3 hosts: each host gets two "always" and one "never".
        let mode = if i / 3 == 2 {
            Mode::Never
        } else {
            Mode::Always
        };
        let a = cluster
            .spawn_spec(AgentSpec {
                argv: vec!["sleep".into(), "1000".into()],
                restart: Some(RestartPolicy {
                    mode: mode as i32,
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await;
        if a.host == "h1" {
            on_h1.push((a.id.clone(), mode, a.pid));
        }
        all.push(a.id);
    }
    assert_eq!(on_h1.len(), 3);
    let mut c = cluster.client().await;

    let cut = Instant::now();
    lab.cut(0);
    let mut lost_at: HashMap<String, Duration> = HashMap::new();
    let mut moved_at: HashMap<String, Duration> = HashMap::new();
    let restartable = on_h1.iter().filter(|(_, m, _)| *m == Mode::Always).count();
    assert_eq!(restartable, 2);
    let deadline = cut + ttl * 4;
    while lost_at.len() < on_h1.len() || moved_at.len() < restartable {
        assert!(
            Instant::now() < deadline,
            "not LOST/rescheduled in time: {lost_at:?} {moved_at:?}"
        );
        for (id, mode, _) in &on_h1 {
            let Ok(a) = c.get_agent(GetAgentRequest { id: id.clone() }).await else {
                continue;
            };
            let a = a.into_inner();
            if a.state() == AgentState::Lost || a.generation > 1 {
                lost_at.entry(id.clone()).or_insert_with(|| cut.elapsed());
            }
            if *mode == Mode::Always && a.state() == AgentState::Running && a.host != "h1" {
                moved_at.entry(id.clone()).or_insert_with(|| cut.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let detection = *lost_at.values().max().expect("lost");
    let moved = *moved_at.values().max().expect("moved");
    eprintln!("partition: LOST after {detection:?} (ttl {ttl:?} + beat {beat:?}), running elsewhere after {moved:?}");
    assert!(
        detection <= ttl + beat + Duration::from_millis(400),
        "LOST within TTL + one beat: {detection:?}"
    );
    assert!(
        moved <= detection + Duration::from_secs(1),
        "rescheduled within 1s of LOST: {moved:?}"
    );
    // While cut off, h1 still runs its (now stale) copies: it cannot know.
    for (_, _, pid) in &on_h1 {
        assert!(procfs::is_alive(*pid), "h1 keeps running while partitioned");
    }

    let healed = Instant::now();
    lab.restore(0);
    // When the kernel passes traffic again (bringing a bridge port back up
    // takes a few hundred ms here), measured from a separate probe.
    let (gw, port) = (lab.gateway(), cluster.redis_port());
    // `None` if the link carried nothing within 10 s.
    let probe = {
        let (ns, gw) = (lab.namespace(0), gw.clone());
        std::thread::spawn(move || {
            let t = Instant::now();
            let cmd = format!("exec 3<>/dev/tcp/{gw}/{port}");
            loop {
                let ok = std::process::Command::new("ip")
                    .args(["netns", "exec", &ns, "timeout", "0.2", "bash", "-c", &cmd])
                    .output()
                    .is_ok_and(|o| o.status.success());
                if ok {
                    return Some(t.elapsed());
                }
                if t.elapsed() > Duration::from_secs(10) {
                    return None;
                }
            }
        })
    };
    let deadline = healed + Duration::from_secs(10);
    loop {
        let stale: Vec<_> = on_h1
            .iter()
            .filter(|(_, m, pid)| *m == Mode::Always && procfs::is_alive(*pid))
            .collect();
        if stale.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "stale copies still alive: {stale:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let fenced = healed.elapsed();
    let link_up = probe.join().expect("probe").unwrap_or_else(|| {
        panic!(
            "the probe from h1's namespace {} could not open a TCP connection to Redis at \
             {gw}:{port} within 10 s of the restore, so when the link came up is unknown \
             (stale copies were gone after {fenced:?})",
            lab.namespace(0)
        )
    });
    eprintln!(
        "partition healed: link passes traffic after {link_up:?}; stale copies killed after {fenced:?} \
         ({:?} after the link was usable; beat {beat:?})",
        fenced.saturating_sub(link_up)
    );
    assert!(
        fenced.saturating_sub(link_up) <= beat + Duration::from_millis(300),
        "fenced within one beat of the link carrying traffic: {fenced:?} (link up after {link_up:?})"
    );

    // From now on, no agent has two live processes; the never-agents that kept
    // running on h1 are RUNNING there again (not LOST).
    let until = Instant::now() + ttl * 2;
    while Instant::now() < until {
        for id in &all {
            let n = procfs::agent_processes(id).len();
            assert!(n <= 1, "{id} has {n} live processes");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (id, mode, pid) in &on_h1 {
        let a = c
            .get_agent(GetAgentRequest { id: id.clone() })
            .await
            .unwrap()
            .into_inner();
        let procs = procfs::agent_processes(id);
        assert_eq!(procs.len(), 1, "{id}: {procs:?}");
        if *mode == Mode::Never {
            assert_eq!(
                a.state(),
                AgentState::Running,
                "restored after the partition"
            );
            assert_eq!(a.host, "h1");
            assert_eq!(procs[0].pid, *pid);
        } else {
            assert_ne!(a.host, "h1");
            assert_eq!(procs[0].pid, a.pid);
        }
    }
    cluster.finish().await;
}
