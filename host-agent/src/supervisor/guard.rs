//! The guard: a small child process (`host-agent` re-executed in guard mode)
//! that outlives a host agent killed with SIGKILL just long enough to kill every
//! agent it was running. The host agent tells it, over the guard's stdin,
//! which process groups belong to which agents; when that pipe reaches EOF (the
//! kernel closes it whatever way the host agent died) the guard SIGKILLs every
//! registered group, every process carrying a registered agent's marker, and
//! every member of a registered run's cgroup.
//!
//! Protocol, one line each: `+ PGID AGENT_ID [CGROUP_DIR]` (started) and
//! `- PGID AGENT_ID` (ended and swept).

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Mutex;

use nix::sys::signal::{killpg, SigSet, Signal};
use nix::unistd::Pid;

use super::tree;

/// The argument that starts `host-agent` in guard mode.
pub const GUARD_ARG: &str = "__agentplane_guard";

/// The host agent's end of the guard.
#[derive(Debug)]
pub struct Guard {
    inner: Mutex<Option<(Child, ChildStdin)>>,
    /// Registered groups (agent id and cgroup line part), to re-register
    /// with a restarted guard.
    groups: Mutex<HashMap<i32, String>>,
}

impl Guard {
    /// Starts the guard process.
    pub fn start() -> Self {
        let g = Self {
            inner: Mutex::new(None),
            groups: Mutex::new(HashMap::new()),
        };
        g.respawn();
        g
    }

    fn respawn(&self) {
        let spawned = std::env::current_exe().and_then(|exe| {
            Command::new(exe)
                .arg(GUARD_ARG)
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .spawn()
        });
        let mut inner = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match spawned {
            Ok(mut child) => {
                let stdin = child.stdin.take();
                *inner = stdin.map(|s| (child, s));
                drop(inner);
                let groups: Vec<(i32, String)> = self
                    .groups
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .iter()
                    .map(|(p, i)| (*p, i.clone()))
                    .collect();
                for (pgid, id) in groups {
                    self.send(&format!("+ {pgid} {id}\n"), false);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot start the guard process: agents would outlive a SIGKILLed host agent");
                *inner = None;
            }
        }
    }

    fn send(&self, line: &str, retry: bool) {
        let failed = {
            let mut inner = self
                .inner
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match inner.as_mut() {
                Some((_, stdin)) => stdin
                    .write_all(line.as_bytes())
                    .and_then(|()| stdin.flush())
                    .is_err(),
                None => true,
            }
        };
        if failed && retry {
            tracing::warn!("guard process gone; starting a new one");
            self.respawn();
        }
    }

    /// Registers a started agent's process group, and its run's cgroup
    /// directory if it has one.
    pub fn add(&self, pgid: i32, id: &str, cgroup: Option<&str>) {
        let entry = match cgroup {
            Some(dir) => format!("{id} {dir}"),
            None => id.to_owned(),
        };
        let line = format!("+ {pgid} {entry}\n");
        // Kept first: a guard restarted by the send below gets it too.
        self.groups
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(pgid, entry);
        self.send(&line, true);
    }

    /// Unregisters an agent's group once it is swept.
    pub fn remove(&self, pgid: i32, id: &str) {
        self.groups
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&pgid);
        self.send(&format!("- {pgid} {id}\n"), true);
    }
}

/// Guard mode: never returns. Ignores SIGINT/SIGTERM/SIGHUP (it ends when its
/// parent does), kills what is registered at EOF, exits 0.
pub fn run_guard() -> ! {
    // Blocked, these stay pending forever: a Ctrl-C to the terminal's process
    // group must not take the guard down before the host agent.
    let mut blocked = SigSet::empty();
    for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        blocked.add(sig);
    }
    let _ = blocked.thread_block();
    // pgid → (agent id, cgroup directory).
    let mut groups: HashMap<i32, (String, Option<String>)> = HashMap::new();
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let mut f = line.splitn(4, ' ');
        match (
            f.next(),
            f.next().and_then(|p| p.parse::<i32>().ok()),
            f.next(),
        ) {
            (Some("+"), Some(pgid), Some(id)) => {
                groups.insert(pgid, (id.to_owned(), f.next().map(str::to_owned)));
            }
            (Some("-"), Some(pgid), Some(_)) => {
                groups.remove(&pgid);
            }
            _ => {}
        }
    }
    for pgid in groups.keys() {
        if *pgid > 1 {
            let _ = killpg(Pid::from_raw(*pgid), Signal::SIGKILL);
        }
    }
    // Membership finds what ancestry and markers cannot (a process that
    // left the tree and cleared its environment).
    for dir in groups.values().filter_map(|(_, d)| d.as_deref()) {
        crate::cgroup::kill_members(std::path::Path::new(dir));
    }
    // One pass over every process for all agents' markers: a walk per agent
    // read every process's environment once per agent (a million reads
    // with a thousand agents).
    let ids: std::collections::HashSet<&str> = groups.values().map(|(id, _)| id.as_str()).collect();
    if !ids.is_empty() {
        tree::signal_each(&tree::marked_by_any(&ids), Signal::SIGKILL);
    }
    std::process::exit(0)
}
