//! Finding an agent's processes that left its process group: descendants by
//! `/proc` ancestry, and processes that carry the agent's environment marker
//! (`AGENTPLANE_AGENT_ID`), which survives re-parenting and `setsid`. Without a
//! writable cgroup v2 this is how escaped grandchildren are found; a process
//! that clears its whole environment after escaping its ancestry is not.

use std::collections::{HashMap, HashSet};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The environment variable every agent process starts with.
pub const MARKER: &str = "AGENTPLANE_AGENT_ID";

/// (pid, ppid, pgrp) of every process.
fn table() -> Vec<(i32, i32, i32)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let mut f = stat.rsplit_once(')')?.1.split_whitespace();
            let state = f.next()?;
            if state == "Z" || state == "X" {
                return None;
            }
            let ppid = f.next()?.parse().ok()?;
            let pgrp = f.next()?.parse().ok()?;
            Some((pid, ppid, pgrp))
        })
        .collect()
}

fn has_marker(pid: i32, id: &str) -> bool {
    let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
        return false;
    };
    let want = format!("{MARKER}={id}");
    env.split(|b| *b == 0).any(|kv| kv == want.as_bytes())
}

/// Where to look for marked processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Only orphans re-parented to this process (we are a child subreaper, so
    /// an escapee whose ancestry broke lands here): cheap.
    Orphans,
    /// Every process on the machine (the guard, after the host agent died).
    All,
}

/// Live processes of agent `id` outside its process group `pgid` (which a
/// group signal reaches anyway): descendants of `root` by ancestry, and the
/// processes in `scope` with the agent's marker, with their descendants.
pub fn escaped(id: &str, root: i32, pgid: i32, scope: Scope) -> Vec<i32> {
    let procs = table();
    let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
    for (pid, ppid, _) in &procs {
        children.entry(*ppid).or_default().push(*pid);
    }
    let me = i32::try_from(std::process::id()).unwrap_or(0);
    let mut found: HashSet<i32> = HashSet::new();
    let mut stack: Vec<i32> = Vec::new();
    if root > 1 {
        stack.push(root);
    }
    stack.extend(
        procs
            .iter()
            .filter(|(pid, ppid, _)| {
                *pid != me
                    && *pid != root
                    && (scope == Scope::All || *ppid == me)
                    && has_marker(*pid, id)
            })
            .map(|(pid, _, _)| *pid),
    );
    while let Some(p) = stack.pop() {
        if found.insert(p) {
            stack.extend(children.get(&p).into_iter().flatten());
        }
    }
    let pgrp: HashMap<i32, i32> = procs.iter().map(|(pid, _, g)| (*pid, *g)).collect();
    found
        .into_iter()
        .filter(|p| *p != me && *p > 1 && pgrp.get(p) != Some(&pgid))
        .collect()
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
            let e = escaped(&id, root, -1, Scope::All);
            if e.len() >= 2 || std::time::Instant::now() > deadline {
                break e;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        assert!(found.contains(&root), "{found:?}");
        assert_eq!(found.len(), 2, "sh and its setsid sleep: {found:?}");
        signal_each(&found, Signal::SIGKILL);
        let _ = child.wait();
    }
}
