//! Per-agent cgroups as the OS shows them: membership finds a process that
//! left the agent's tree and cleared its environment (stop and the guard
//! kill it, pause freezes it with the rest at once), limits land in the
//! agent's cgroup files and the kernel enforces them, and a limit no host
//! can enforce is refused saying why. A host with `--cgroups off` runs the
//! same agents as the control: there the escaped process survives, which
//! shows what these tests would catch.

use std::path::PathBuf;
use std::time::Duration;

use agentplane::proto::v1::{
    restart_policy, AgentSpec, AgentState, ExitReason, PauseAgentRequest, Placement, Resources,
    RestartPolicy, ResumeAgentRequest, SpawnAgentRequest, StartAgentRequest, StopAgentRequest,
};
use agentplane_integration_tests::{eventually, procfs, TestCluster};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tonic::Code;

/// True when this machine lets the tests make v1 cgroups (root, a
/// writable freezer hierarchy); else the test says so and does nothing.
fn v1_cgroups() -> bool {
    let probe = PathBuf::from("/sys/fs/cgroup/freezer/agentplane-test-probe");
    let ok = nix::unistd::geteuid().is_root() && std::fs::create_dir_all(&probe).is_ok();
    let _ = std::fs::remove_dir(&probe);
    if !ok {
        eprintln!("SKIPPED: no writable v1 freezer hierarchy on this machine (needs root)");
    }
    ok
}

/// The unified hierarchy, where this machine has one writable.
fn v2_cgroups() -> bool {
    let me = i32::try_from(std::process::id()).unwrap_or(0);
    procfs::cgroup_dir(me, None).is_some_and(|d| {
        let probe = d.join("agentplane-test-probe");
        let ok = std::fs::create_dir_all(&probe).is_ok() && probe.join("cgroup.freeze").exists();
        let _ = std::fs::remove_dir(&probe);
        ok
    })
}

fn on(host: &str, argv: &[&str]) -> AgentSpec {
    AgentSpec {
        argv: argv.iter().map(|s| (*s).to_owned()).collect(),
        placement: Some(Placement {
            host: host.into(),
            label_selector: String::new(),
        }),
        ..Default::default()
    }
}

/// The pid of the process whose argv is exactly `argv`, once there is one.
async fn process_running(argv: &[&str]) -> i32 {
    let want: Vec<u8> = argv.iter().flat_map(|a| a.bytes().chain([0])).collect();
    eventually(Duration::from_secs(5), "the escaped process", || {
        let want = want.clone();
        async move {
            std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
                let pid: i32 = e.file_name().to_str()?.parse().ok()?;
                let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
                (cmd == want && procfs::is_alive(pid)).then_some(pid)
            })
        }
    })
    .await
}

/// An agent whose child leaves its group and tree (setsid, re-parented to
/// the keeper) with an empty environment; returns (agent id, main pid,
/// escaped pid).
async fn spawn_escaper(cluster: &TestCluster, host: &str, tag: &str) -> (String, i32, i32) {
    let script = format!("(setsid env -i sleep {tag} &) ; exec sleep 100000");
    let a = cluster.spawn_spec(on(host, &["sh", "-c", &script])).await;
    let escaped = process_running(&["sleep", tag]).await;
    let st = procfs::stat(escaped).expect("stat");
    assert_ne!(st.pgrp, a.pid, "the escaped process left the group");
    assert!(
        !procfs::descends_from(escaped, a.pid),
        "and the agent's tree"
    );
    let env = std::fs::read(format!("/proc/{escaped}/environ")).unwrap_or_default();
    assert!(env.is_empty(), "and cleared its environment: {env:?}");
    (a.id, a.pid, escaped)
}

fn hosts_ls(cluster: &TestCluster) -> String {
    let out = cluster.agentctl(&["hosts", "ls"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn row<'a>(table: &'a str, host: &str) -> &'a str {
    table
        .lines()
        .find(|l| l.starts_with(&format!("{host} ")))
        .unwrap_or_else(|| panic!("no row for {host} in\n{table}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_escaped_process_that_cleared_its_environment_is_frozen_and_stopped_with_its_agent() {
    if !v1_cgroups() {
        return;
    }
    let v2 = v2_cgroups();
    let mut b = TestCluster::builder()
        .hosts(if v2 { 3 } else { 2 })
        .host_arg_at(1, "--cgroups=off");
    if v2 {
        b = b.host_arg_at(2, "--cgroups=v2");
    }
    let cluster = b.start().await;
    let table = hosts_ls(&cluster);
    assert!(
        table.lines().next().unwrap_or_default().contains("CGROUPS"),
        "{table}"
    );
    assert!(
        row(&table, "h1").contains("v1 freeze,memory,pids,cpu"),
        "{table}"
    );
    assert!(row(&table, "h2").contains(" none "), "{table}");
    if v2 {
        // This machine's v2 hierarchy has no controllers (all bound to v1):
        // it freezes and kills, and enforces no limit.
        assert!(row(&table, "h3").contains("v2 freeze"), "{table}");
    } else {
        eprintln!("no writable cgroup v2 here: the v2 case is not run");
    }
    let mut c = cluster.client().await;
    let mut cases = vec![("h1", "7771", true), ("h2", "7772", false)];
    if v2 {
        cases.push(("h3", "7773", true));
    }
    for (host, tag, cgroups) in cases {
        let (id, pid, escaped) = spawn_escaper(&cluster, host, tag).await;
        if cgroups && host == "h1" {
            assert_eq!(
                procfs::cgroup_dir(escaped, Some("freezer")),
                procfs::cgroup_dir(pid, Some("freezer")),
                "{host}: the escaped process is still in the agent's cgroup"
            );
        }
        let paused = c
            .pause_agent(PauseAgentRequest { id: id.clone() })
            .await
            .expect("pause")
            .into_inner();
        assert_eq!(paused.state(), AgentState::Paused);
        // At the answer, and all at once: the kernel froze the whole cgroup.
        let main = procfs::stat(pid).expect("main");
        let esc = procfs::stat(escaped).expect("escaped");
        assert!(
            main.paused(),
            "{host}: the main process is paused: {main:?}"
        );
        assert_eq!(
            esc.paused(),
            cgroups,
            "{host}: the escaped process is paused exactly when the host has cgroups: {esc:?}"
        );
        c.resume_agent(ResumeAgentRequest { id: id.clone() })
            .await
            .expect("resume");
        assert!(
            !procfs::stat(pid).expect("main").paused(),
            "{host}: resumed"
        );
        assert!(
            !procfs::stat(escaped).expect("escaped").paused(),
            "{host}: resumed"
        );
        c.stop_agent(StopAgentRequest {
            id: id.clone(),
            grace: None,
        })
        .await
        .expect("stop");
        if cgroups {
            eventually(
                Duration::from_secs(3),
                "the escaped process killed by stop",
                || async { (!procfs::is_alive(escaped)).then_some(()) },
            )
            .await;
        } else {
            // The fallback cannot find it: it outlives its agent.
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert!(
                procfs::is_alive(escaped),
                "{host}: without cgroups the escaped process is not found (the control)"
            );
            let _ = kill(Pid::from_raw(escaped), Signal::SIGKILL);
        }
    }
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_outlives_a_host_agent_restart_and_the_guard_kills_what_escaped() {
    if !v1_cgroups() {
        return;
    }
    let mut cluster = TestCluster::builder().hosts(1).start().await;
    let (id, pid, escaped) = spawn_escaper(&cluster, "h1", "7781").await;
    let mut c = cluster.client().await;
    c.pause_agent(PauseAgentRequest { id: id.clone() })
        .await
        .expect("pause");
    cluster.end_host_agent("h1", Signal::SIGKILL).await;
    cluster.restart_host("h1");
    // Adopted frozen: still PAUSED, same pid, every process still frozen.
    let a = cluster
        .wait_state(&id, AgentState::Paused, Duration::from_secs(10))
        .await;
    assert_eq!(a.pid, pid);
    eventually(
        Duration::from_secs(10),
        "the adopted agent's record rewritten",
        || async {
            let out = cluster.agentctl(&["resume", &id]);
            out.status.success().then_some(())
        },
    )
    .await;
    assert!(!procfs::stat(escaped).expect("escaped").paused());
    // The keeper and the host agent die: the guard finds the escaped
    // process by its cgroup (it has neither the group nor the marker).
    cluster.kill_machine("h1");
    eventually(
        Duration::from_secs(5),
        "every process of the agent gone",
        || async { (!procfs::is_alive(escaped) && !procfs::is_alive(pid)).then_some(()) },
    )
    .await;
    cluster.restart_host("h1");
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_land_in_the_agents_cgroup_and_the_kernel_enforces_them() {
    if !v1_cgroups() {
        return;
    }
    let cluster = TestCluster::builder().hosts(1).start().await;
    let limited = |argv: &[&str], r: Resources| AgentSpec {
        resources: Some(r),
        ..on("h1", argv)
    };
    // The files, as the kernel holds them.
    let a = cluster
        .spawn_spec(limited(
            &["sleep", "100000"],
            Resources {
                memory_bytes: Some(32 << 20),
                pids: Some(16),
                cpu_millis: Some(500),
            },
        ))
        .await;
    let read = |ctrl: &str, file: &str| -> String {
        let d = procfs::cgroup_dir(a.pid, Some(ctrl)).expect("cgroup");
        assert!(
            d.to_string_lossy().contains(&cluster.cgroup_parent()),
            "{ctrl}: {d:?} under the cluster's --cgroup-parent"
        );
        std::fs::read_to_string(d.join(file))
            .unwrap_or_else(|e| panic!("{ctrl}/{file}: {e}"))
            .trim()
            .to_owned()
    };
    assert_eq!(
        read("memory", "memory.limit_in_bytes"),
        (32u64 << 20).to_string()
    );
    assert_eq!(read("pids", "pids.max"), "16");
    assert_eq!(read("cpu", "cpu.cfs_quota_us"), "50000");
    assert_eq!(read("cpu", "cpu.cfs_period_us"), "100000");
    let mut c = cluster.client().await;
    c.stop_agent(StopAgentRequest {
        id: a.id.clone(),
        grace: None,
    })
    .await
    .expect("stop");
    // Removed once it ended.
    let dir = procfs::cgroup_dir(std::process::id().try_into().unwrap_or(0), Some("memory"))
        .expect("own cgroup")
        .join(cluster.cgroup_parent())
        .join("h1");
    eventually(
        Duration::from_secs(5),
        "the ended agent's cgroups removed",
        || async {
            let left: Vec<_> = std::fs::read_dir(&dir)
                .ok()?
                .flatten()
                .filter(|e| e.path().is_dir())
                .collect();
            left.is_empty().then_some(())
        },
    )
    .await;

    // pids: forks past the limit fail, and the cgroup never holds more.
    let forks = cluster
        .spawn_spec(limited(
            &[
                "sh",
                "-c",
                // A shell whose fork fails exits: the forks are made by a
                // subshell, and the agent's main process lives on.
                "(for i in $(seq 40); do sleep 1000 & done); exec sleep 1000",
            ],
            Resources {
                pids: Some(8),
                ..Default::default()
            },
        ))
        .await;
    let pids_dir = procfs::cgroup_dir(forks.pid, Some("pids")).expect("pids cgroup");
    eventually(
        Duration::from_secs(10),
        "forks refused at pids.max",
        || async {
            let events = std::fs::read_to_string(pids_dir.join("pids.events")).ok()?;
            let refused: u64 = events
                .lines()
                .find_map(|l| l.strip_prefix("max "))?
                .trim()
                .parse()
                .ok()?;
            (refused > 0).then_some(())
        },
    )
    .await;
    let current: u64 = std::fs::read_to_string(pids_dir.join("pids.current"))
        .expect("pids.current")
        .trim()
        .parse()
        .expect("a number");
    assert!(current <= 8, "{current} processes in a cgroup of at most 8");

    // memory: past the limit the kernel kills it, and the record says so.
    let hog = cluster
        .spawn_spec(limited(
            &[
                "sh",
                "-c",
                "x=$(head -c 200000000 /dev/zero | tr '\\000' x); echo ${#x}",
            ],
            Resources {
                memory_bytes: Some(16 << 20),
                ..Default::default()
            },
        ))
        .await;
    let ended = cluster
        .wait_state(&hog.id, AgentState::Exited, Duration::from_secs(30))
        .await;
    let exit = ended.exit.expect("exit");
    assert_eq!(exit.reason(), ExitReason::OomKilled, "{exit:?}");
    assert_eq!(exit.signal, Some(9));
    assert!(exit.error.contains("OOM killer"), "{}", exit.error);
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limit_no_host_can_enforce_is_refused_saying_which_host_and_why() {
    let cluster = TestCluster::builder()
        .hosts(1)
        .host_arg("--cgroups=off")
        .start()
        .await;
    let mut c = cluster.client().await;
    let spec = AgentSpec {
        resources: Some(Resources {
            memory_bytes: Some(64 << 20),
            ..Default::default()
        }),
        ..on("", &["sleep", "1"])
    };
    let err = c
        .spawn_agent(SpawnAgentRequest {
            spec: Some(spec.clone()),
            request_id: String::new(),
        })
        .await
        .expect_err("no host can enforce it");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert_eq!(
        err.message(),
        "no host can enforce the agent's resources: h1 cannot enforce a memory limit (cgroups none: --cgroups off)"
    );
    // agentctl says the same, and exits non-zero.
    let out = cluster.agentctl(&[
        "spawn", "--memory", "64MiB", "--pids", "10", "--", "sleep", "1",
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("h1 cannot enforce a memory, pids limit (cgroups none: --cgroups off)"),
        "{stderr}"
    );
    // The host agent refuses it too (a host record read before a restart
    // with other --cgroups may say otherwise).
    let mut host = cluster.host_agent(0);
    let err = host
        .start_agent(StartAgentRequest {
            id: agentplane::ids::new_agent_id(),
            generation: 1,
            spec: Some(spec),
        })
        .await
        .expect_err("the host refuses it");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("cannot enforce a memory limit"),
        "{}",
        err.message()
    );
    // Nothing was left behind.
    let out = cluster.agentctl(&["ls"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).lines().count(),
        1,
        "only the header"
    );
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_into_a_cgroup_left_frozen_runs_and_the_host_keeps_answering() {
    if !v1_cgroups() {
        return;
    }
    let cluster = TestCluster::builder().hosts(1).start().await;
    let a = cluster
        .spawn_spec(AgentSpec {
            restart: Some(RestartPolicy {
                mode: restart_policy::Mode::Always as i32,
                max_restarts: None,
                initial_backoff: Some(prost_types::Duration {
                    seconds: 1,
                    nanos: 0,
                }),
                ..Default::default()
            }),
            ..on("h1", &["sleep", "100000"])
        })
        .await;
    let dir = procfs::cgroup_dir(a.pid, Some("freezer")).expect("a freezer cgroup");
    kill(Pid::from_raw(a.pid), Signal::SIGKILL).expect("kill the agent");
    // Its end is handled (PENDING, waiting out its backoff); then its
    // empty cgroup is left frozen, as a pause racing that end could.
    cluster
        .wait_state(&a.id, AgentState::Pending, Duration::from_secs(5))
        .await;
    std::fs::write(dir.join("freezer.state"), "FROZEN").expect("freeze");
    // A process joining a frozen cgroup stops before its exec: the keeper,
    // waiting for that exec, would serve nobody again.
    let b = cluster
        .wait_agent(
            &a.id,
            "restarted and running",
            Duration::from_secs(10),
            |r| r.state() == AgentState::Running && r.restarts == 1 && r.pid > 0,
        )
        .await;
    assert!(!procfs::stat(b.pid).expect("stat").paused(), "it runs");
    assert_eq!(
        procfs::cgroup_dir(b.pid, Some("freezer")),
        Some(dir),
        "in the same cgroup"
    );
    let c = cluster.spawn_spec(on("h1", &["sleep", "100000"])).await;
    assert!(procfs::is_alive(c.pid), "the host still starts agents");
    cluster.finish().await;
}
