//! What an agent uses of its host now, for `ListAgentUsage` (`agentctl
//! top`): CPU time and resident memory summed over its processes (its
//! cgroup's members when it has one, else its main process, whose CPU time
//! includes the children it waited for) read from `/proc`, and its output
//! so far. Sampled on request, never in the background.

use std::sync::Arc;

use agentplane::proto::v1::{AgentState, AgentUsage, LocalAgent};

use super::agent::AgentSlot;
use super::Supervisor;

impl Supervisor {
    /// Every agent this host knows; with `usage`, each sampled now
    /// ([`sample`]).
    pub fn list(&self, usage: bool) -> Vec<LocalAgent> {
        let slots: Vec<Arc<AgentSlot>> = self.map().values().cloned().collect();
        slots
            .iter()
            .map(|s| LocalAgent {
                usage: usage.then(|| Box::new(sample(s, &self.host_id))),
                ..s.to_proto()
            })
            .collect()
    }

    /// How many agents this host holds in each state, every state listed
    /// (`agentplane::state::ALL`'s order).
    pub fn count_by_state(&self) -> [(AgentState, u64); 7] {
        let mut counts = Self::no_agents();
        for slot in self.map().values() {
            let state = slot.snapshot().state;
            if let Some((_, n)) = counts.iter_mut().find(|(s, _)| *s == state) {
                *n += 1;
            }
        }
        counts
    }

    /// Every state with no agent in it.
    pub fn no_agents() -> [(AgentState, u64); 7] {
        agentplane::state::ALL.map(|s| (s, 0))
    }
}

/// A sample of `slot` on host `host`, now.
fn sample(slot: &AgentSlot, host: &str) -> AgentUsage {
    let s = slot.snapshot();
    let live = s.pid > 0 && !agentplane::state::is_terminal(s.state);
    let pids = match (&slot.cgroup, live) {
        (_, false) => Vec::new(),
        (Some(cg), true) => cg.members(),
        (None, true) => vec![s.pid],
    };
    let (mut ticks, mut pages) = (0u64, 0u64);
    for pid in pids {
        if let Some((t, p)) = of_process(pid) {
            ticks += t;
            pages += p;
        }
    }
    let per_second = rustix::param::clock_ticks_per_second().max(1);
    AgentUsage {
        id: slot.id.clone(),
        host: host.to_owned(),
        cpu_seconds: ticks as f64 / per_second as f64,
        rss_bytes: pages * rustix::param::page_size() as u64,
        output_bytes: slot.output.end(),
        sampled_at: Some(agentplane::time::timestamp_from_ms(
            agentplane::time::now_ms(),
        )),
    }
}

/// Clock ticks of CPU (its own and its waited-for children's) and resident
/// pages of process `pid`; `None` once it is gone.
fn of_process(pid: i32) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    Some((
        cpu_ticks(&stat)?,
        statm.split_whitespace().nth(1)?.parse().ok()?,
    ))
}

/// utime + stime + cutime + cstime from a `/proc/PID/stat` line (the
/// fields after the command, which may itself hold spaces and parentheses).
fn cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Field 3 (state) is f[0]; utime is field 14.
    (11..15).map(|i| f.get(i)?.parse::<u64>().ok()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_add_the_four_times_after_an_odd_command_name() {
        let line = "42 (a b) c)) S 1 42 42 0 -1 4194560 100 0 0 0 7 3 2 1 20 0 1 0 5 1000 50";
        assert_eq!(cpu_ticks(line), Some(7 + 3 + 2 + 1));
        assert_eq!(cpu_ticks("42 (x) S 1"), None);
    }

    #[test]
    fn this_process_is_sampled() {
        let (ticks, pages) = of_process(std::process::id() as i32).expect("own /proc entry");
        assert!(pages > 0);
        let _ = ticks;
    }
}
