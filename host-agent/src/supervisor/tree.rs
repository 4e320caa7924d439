//! Finding an agent's processes that left its process group: descendants by
//! `/proc` ancestry, and processes that carry the agent's environment marker
//! (`AGENTPLANE_AGENT_ID`), which survives re-parenting and `setsid`. Without a
//! writable cgroup v2 this is how escaped grandchildren are found; a process
//! that clears its whole environment after escaping its ancestry is not.
//!
//! Cost matters at a thousand agents: the walk reads only the agent's own
//! subtree (`/proc/PID/task/*/children`) and the few orphans re-parented to
//! the keeper, never every process on the machine (except in the guard,
//! in one pass for all agents, after the host agent or the keeper died).

use std::collections::HashSet;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The environment variable every agent process starts with.
pub const MARKER: &str = "AGENTPLANE_AGENT_ID";

/// Where to look for marked processes besides the agent's own subtree.
#[derive(Debug, Clone, Copy)]
pub enum Scope<'a> {
    /// The children of `reaper` (the keeper, a child subreaper, which
    /// orphans of agents are re-parented to) that are not agent main
    /// processes (`mains`). (Every process on the machine is
    /// [`marked_by_any`]'s, for all agents at once.)
    Orphans {
        /// The subreaper's pid.
        reaper: i32,
        /// Every agent's main process.
        mains: &'a HashSet<i32>,
    },
}

/// Direct children of `pid` (all its threads').
fn children_of(pid: i32) -> Vec<i32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|c| {
            c.split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// (state, pgrp) of a process; `None` if gone.
fn state_and_group(pid: i32) -> Option<(char, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut f = stat.rsplit_once(')')?.1.split_whitespace();
    let state = f.next()?.chars().next()?;
    let pgrp = f.nth(1)?.parse().ok()?;
    Some((state, pgrp))
}

/// True when `pid` is stopped (`T`: a SIGSTOP, as a pause sends).
pub fn is_stopped(pid: i32) -> bool {
    state_and_group(pid).is_some_and(|(state, _)| state == 'T')
}

fn has_marker(pid: i32, id: &str) -> bool {
    let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
        return false;
    };
    let want = format!("{MARKER}={id}");
    env.split(|b| *b == 0).any(|kv| kv == want.as_bytes())
}

fn all_pids() -> Vec<i32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Live processes of agent `id` outside its process group `pgid` (which a
/// group signal reaches anyway): the subtree of `root`, and the processes of
/// `scope` that carry the agent's marker, with their subtrees.
pub fn escaped(id: &str, root: i32, pgid: i32, scope: Scope<'_>) -> Vec<i32> {
    let me = i32::try_from(std::process::id()).unwrap_or(0);
    let mut stack: Vec<i32> = Vec::new();
    if root > 1 {
        stack.push(root);
    }
    let Scope::Orphans { reaper, mains } = scope;
    let candidates: Vec<i32> = children_of(reaper)
        .into_iter()
        .filter(|p| !mains.contains(p))
        .collect();
    stack.extend(
        candidates
            .into_iter()
            .filter(|p| *p != me && *p != root && has_marker(*p, id)),
    );
    let mut found: HashSet<i32> = HashSet::new();
    while let Some(p) = stack.pop() {
        if found.insert(p) {
            stack.extend(children_of(p));
        }
    }
    found
        .into_iter()
        .filter(|p| *p != me && *p > 1)
        .filter(|p| state_and_group(*p).is_some_and(|(state, group)| state != 'Z' && group != pgid))
        .collect()
}

/// Of `pids`, the live ones (not zombies) outside process group `pgid`,
/// other than this process.
pub fn outside_group(pids: Vec<i32>, pgid: i32) -> Vec<i32> {
    let me = i32::try_from(std::process::id()).unwrap_or(0);
    pids.into_iter()
        .filter(|p| *p != me && *p > 1)
        .filter(|p| state_and_group(*p).is_some_and(|(state, group)| state != 'Z' && group != pgid))
        .collect()
}

/// Every live process on the machine that carries the marker of one of
/// `ids`, with its subtree: one pass over `/proc` whatever the number of
/// agents (the guard, after the host agent or keeper died with a thousand).
pub fn marked_by_any(ids: &HashSet<&str>) -> Vec<i32> {
    let me = i32::try_from(std::process::id()).unwrap_or(0);
    let prefix = format!("{MARKER}=");
    let mut stack: Vec<i32> = all_pids()
        .into_iter()
        .filter(|p| *p != me && *p > 1)
        .filter(|p| {
            let Ok(env) = std::fs::read(format!("/proc/{p}/environ")) else {
                return false;
            };
            env.split(|b| *b == 0).any(|kv| {
                kv.strip_prefix(prefix.as_bytes())
                    .and_then(|v| std::str::from_utf8(v).ok())
                    .is_some_and(|v| ids.contains(v))
            })
        })
        .collect();
    let mut found: HashSet<i32> = HashSet::new();
    while let Some(p) = stack.pop() {
        if found.insert(p) {
            stack.extend(children_of(p));
        }
    }
    found
        .into_iter()
        .filter(|p| *p != me && *p > 1)
        .filter(|p| state_and_group(*p).is_some_and(|(state, _)| state != 'Z'))
        .collect()
}

/// How many of `root`'s subtree and of `others` are neither stopped (`T`)
/// nor dead: what a SIGSTOP still waits on, since each process stops only
/// when the kernel next runs it.
pub fn not_stopped(root: i32, others: &[i32]) -> usize {
    let mut stack = vec![root];
    stack.extend_from_slice(others);
    let mut seen: HashSet<i32> = HashSet::new();
    let mut running = 0;
    while let Some(p) = stack.pop() {
        if p <= 1 || !seen.insert(p) {
            continue;
        }
        if let Some((state, _)) = state_and_group(p) {
            if !matches!(state, 'T' | 't' | 'Z' | 'X') {
                running += 1;
            }
        }
        stack.extend(children_of(p));
    }
    running
}

/// Sends `sig` to each pid; gone processes are fine.
pub fn signal_each(pids: &[i32], sig: Signal) {
    for pid in pids {
        let _ = kill(Pid::from_raw(*pid), sig);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> i32 {
        i32::try_from(std::process::id()).unwrap()
    }

    #[test]
    fn finds_a_setsid_grandchild_by_ancestry_and_marker() {
        let id = format!("tree-test-{}", std::process::id());
        let mut child = std::process::Command::new("sh")
            .args(["-c", "setsid sleep 30 & wait"])
            .env(MARKER, &id)
            .spawn()
            .unwrap();
        let root = i32::try_from(child.id()).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let found = loop {
            let e = marked_by_any(&HashSet::from([id.as_str()]));
            if e.len() >= 2 || std::time::Instant::now() > deadline {
                break e;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        assert!(found.contains(&root), "{found:?}");
        assert_eq!(found.len(), 2, "sh and its setsid sleep: {found:?}");
        assert!(marked_by_any(&HashSet::from(["another"])).is_empty());
        let by_ancestry = escaped(
            &id,
            root,
            -1,
            Scope::Orphans {
                reaper: me(),
                mains: &HashSet::new(),
            },
        );
        assert_eq!(
            by_ancestry.len(),
            2,
            "the subtree walk finds both: {by_ancestry:?}"
        );
        signal_each(&found, Signal::SIGKILL);
        let _ = child.wait();
    }

    #[test]
    fn counts_the_processes_a_sigstop_has_not_stopped_yet() {
        let mut child = std::process::Command::new("sh")
            .args(["-c", "sleep 30 & sleep 30 & wait"])
            .spawn()
            .unwrap();
        let root = i32::try_from(child.id()).unwrap();
        let mut other = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let others = [i32::try_from(other.id()).unwrap()];
        let until = |want: usize| {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            loop {
                let n = not_stopped(root, &others);
                if n == want || std::time::Instant::now() > deadline {
                    return n;
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        };
        assert_eq!(until(4), 4, "sh, two sleeps and the other run");
        let mut all = escaped(
            "none",
            root,
            -1,
            Scope::Orphans {
                reaper: me(),
                mains: &HashSet::new(),
            },
        );
        assert_eq!(all.len(), 3, "{all:?}");
        all.extend_from_slice(&others);
        signal_each(&all[..3], Signal::SIGSTOP);
        assert_eq!(until(1), 1, "only the other runs");
        signal_each(&others, Signal::SIGSTOP);
        assert_eq!(until(0), 0, "all stopped");
        signal_each(&all, Signal::SIGCONT);
        assert_eq!(until(4), 4, "running again");
        signal_each(&all, Signal::SIGKILL);
        let _ = child.wait();
        let _ = other.wait();
    }
}
