//! The soak's invariants: what it checks after each round, on /proc and
//! the API (see the parent module's list).

use std::collections::{HashMap, HashSet};

use agentplane::proto::v1::{Agent, AgentState, ListAgentsRequest};

use super::Tracked;
use crate::{procfs, TestCluster};

pub(super) async fn list_all(cluster: &TestCluster) -> Option<Vec<Agent>> {
    for i in 0..cluster.control_planes.len() {
        let mut c = cluster.client_of(i);
        let mut out = Vec::new();
        let mut token = String::new();
        let ok = loop {
            let Ok(page) = c
                .list_agents(ListAgentsRequest {
                    page_token: token.clone(),
                    ..Default::default()
                })
                .await
            else {
                break false;
            };
            let page = page.into_inner();
            out.extend(page.agents);
            if page.next_page_token.is_empty() {
                break true;
            }
            token = page.next_page_token;
        };
        if ok {
            return Some(out);
        }
    }
    None
}

/// What does not hold now (empty: converged).
pub(super) async fn check(cluster: &TestCluster, known: &HashMap<String, Tracked>) -> Vec<String> {
    let Some(records) = list_all(cluster).await else {
        return vec!["the API did not answer ListAgents".into()];
    };
    let mut problems = Vec::new();
    // Only this cluster's agents: its hosts run in network namespaces of
    // their own, which every agent process (orphans too) stays in. Other
    // tests on the machine have agents of their own.
    let ours: HashSet<String> = cluster
        .hosts
        .iter()
        .filter_map(|h| procfs::net_namespace(h.proc.pid()))
        .collect();
    let mut procs: HashMap<String, Vec<procfs::ProcInfo>> = HashMap::new();
    for (id, p) in procfs::agent_processes_by_id() {
        if procfs::net_namespace(p.pid).is_some_and(|ns| ours.contains(&ns)) {
            procs.entry(id).or_default().push(p);
        }
    }
    let mut by_request: HashMap<&str, usize> = HashMap::new();
    for a in &records {
        let mine = procs.get(&a.id).map_or(&[][..], Vec::as_slice);
        let st = a.state();
        match st {
            AgentState::Running | AgentState::Paused => {
                if a.pid <= 0 || !procfs::is_alive(a.pid) {
                    problems.push(format!(
                        "(a) {} is {st:?} with pid {} not alive",
                        a.id, a.pid
                    ));
                } else if let Some(p) = mine.iter().find(|p| p.pgrp != a.pid) {
                    problems.push(format!(
                        "(a) {} has a process {} outside its group {}",
                        a.id, p.pid, a.pid
                    ));
                } else if st == AgentState::Paused && mine.iter().any(|p| !p.paused()) {
                    problems.push(format!("(a) {} is PAUSED with a process not stopped", a.id));
                }
            }
            AgentState::Pending | AgentState::Stopping => {
                problems.push(format!("{} still {st:?}", a.id));
            }
            _ => {
                if !mine.is_empty() {
                    problems.push(format!("(d) {} is {st:?} but has processes {mine:?}", a.id));
                }
            }
        }
        if let Some(t) = known.get(&a.id) {
            if t.restartable
                && !t.stopped
                && !matches!(st, AgentState::Running | AgentState::Paused)
            {
                problems.push(format!(
                    "(c) restartable {} is {st:?} ({:?})",
                    a.id,
                    a.exit.as_ref().map(|e| e.reason())
                ));
            }
        }
        if let Some(code) = known.get(&a.id).and_then(|t| t.exits_with) {
            if let Some(p) = exit_problem(a, code) {
                problems.push(format!("(e) {}: {p}", a.id));
            }
        }
        if let Some(r) = a.spec.as_ref().and_then(|s| s.labels.get("req")) {
            *by_request.entry(r.as_str()).or_default() += 1;
        }
    }
    for (r, n) in by_request {
        if n > 1 {
            problems.push(format!("(f) request {r} made {n} agents"));
        }
    }
    for (id, p) in &procs {
        if !records.iter().any(|a| &a.id == id) {
            problems.push(format!(
                "(d) processes {p:?} of agent {id}, which has no record"
            ));
        }
    }
    // A host whose heartbeat is about to lapse (a partition just healed,
    // its connection still retrying) has not settled: the next fault must
    // not start from a host that the reconciler is about to find lost.
    let mut conn = cluster.redis_conn().await;
    let half = i64::try_from(cluster.heartbeat_ttl().as_millis() / 2).unwrap_or(i64::MAX);
    for h in &cluster.hosts {
        let left: redis::RedisResult<i64> = redis::cmd("PTTL")
            .arg(cluster.keys().host(&h.host_id))
            .query_async(&mut conn)
            .await;
        match left {
            Ok(ms) if ms > half => {}
            other => problems.push(format!(
                "host {}'s heartbeat is not fresh (PTTL {other:?})",
                h.host_id
            )),
        }
    }
    for h in &cluster.hosts {
        let keeper = cluster.keeper_pid(&h.host_id);
        for parent in std::iter::once(h.proc.pid()).chain(keeper) {
            let z = procfs::zombie_children(parent);
            if !z.is_empty() {
                problems.push(format!(
                    "(g) zombies under host {} (pid {parent}): {z:?}",
                    h.host_id
                ));
            }
        }
    }
    problems
}

/// The agents RUNNING or PAUSED on host `host` that run until stopped.
pub(super) async fn live_on(
    cluster: &TestCluster,
    known: &HashMap<String, Tracked>,
    host: usize,
) -> Vec<Agent> {
    let id = format!("h{}", host + 1);
    list_all(cluster)
        .await
        .unwrap_or_default()
        .into_iter()
        .filter(|a| a.host == id)
        .filter(|a| matches!(a.state(), AgentState::Running | AgentState::Paused))
        .filter(|a| known.get(&a.id).is_some_and(|t| t.exits_with.is_none()))
        .collect()
}

/// (h): each of `before` as it was, after its host agent's restart.
pub(super) async fn restarted_by_the_fault(cluster: &TestCluster, before: &[Agent]) -> Vec<String> {
    if before.is_empty() {
        return Vec::new();
    }
    let Some(now) = list_all(cluster).await else {
        return vec!["(h) cannot list the agents after the restart".into()];
    };
    let mut problems = Vec::new();
    for b in before {
        let after = now.iter().find(|a| a.id == b.id);
        let same = after.is_some_and(|a| {
            (a.state(), a.pid, a.generation, a.restarts)
                == (b.state(), b.pid, b.generation, b.restarts)
        });
        if !same {
            problems.push(format!(
                "(h) the host agent's restart changed agent {}: {:?} pid {} gen {} restarts {} → {:?}",
                b.id,
                b.state(),
                b.pid,
                b.generation,
                b.restarts,
                after.map(|a| (a.state(), a.pid, a.generation, a.restarts))
            ));
        }
    }
    problems
}

/// What is wrong with the end recorded for an agent that exits by itself
/// with `code`. Its end is COMPLETED with that code, or it is one that
/// something else caused first: a stop (STOPPED, KILLED, SIGNALED), its host's
/// death (LOST), a drain's move (it stays live); nothing else.
pub(super) fn exit_problem(a: &Agent, code: i32) -> Option<String> {
    use agentplane::proto::v1::ExitReason as R;
    let exit = a.exit.as_ref();
    match (a.state(), exit.map(|e| e.reason())) {
        (AgentState::Exited, Some(R::Completed)) => {
            let got = exit.and_then(|e| e.code);
            (got != Some(code)).then(|| format!("EXITED COMPLETED with code {got:?}, not {code}"))
        }
        (AgentState::Exited, Some(R::Stopped | R::Killed | R::Signaled))
        | (AgentState::Lost, _)
        | (
            AgentState::Pending | AgentState::Running | AgentState::Paused | AgentState::Stopping,
            _,
        ) => None,
        (st, reason) => Some(format!("ended {st:?} {reason:?}: {exit:?}")),
    }
}
