//! The guard: a small child process (`host-agent` re-executed in guard mode)
//! that outlives a host agent killed with SIGKILL just long enough to kill every
//! agent it was running. The host agent tells it, over the guard's stdin,
//! which process groups belong to which agents; when that pipe reaches EOF (the
//! kernel closes it whatever way the host agent died) the guard SIGKILLs every
//! registered group and every process carrying a registered agent's marker.
//!
//! Protocol, one line each: `+ PGID AGENT_ID` (started) and `- PGID AGENT_ID`
//! (ended and swept).

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
    /// Registered groups, to re-register with a restarted guard.
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

    /// Registers a started agent's process group.
    pub fn add(&self, pgid: i32, id: &str) {
        self.groups
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(pgid, id.to_owned());
        self.send(&format!("+ {pgid} {id}\n"), true);
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
    let mut groups: HashMap<i32, String> = HashMap::new();
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let mut f = line.split_whitespace();
        match (
            f.next(),
            f.next().and_then(|p| p.parse::<i32>().ok()),
            f.next(),
        ) {
            (Some("+"), Some(pgid), Some(id)) => {
                groups.insert(pgid, id.to_owned());
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
    // One pass over every process for all agents' markers: a walk per agent
    // read every process's environment once per agent (a million reads
    // with a thousand agents).
    let ids: std::collections::HashSet<&str> = groups.values().map(String::as_str).collect();
    if !ids.is_empty() {
        tree::signal_each(&tree::marked_by_any(&ids), Signal::SIGKILL);
    }
    std::process::exit(0)
}
