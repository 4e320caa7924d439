//! What `agentctl top` shows, kept apart from drawing and I/O: hosts,
//! agent records updated by watch events, and usage samples turned into
//! rates (CPU %, output bytes/s) from two samples of the same agent.

use std::collections::{BTreeMap, HashMap};

use agentplane::proto::v1::{Agent, AgentState, AgentUsage, Event, EventType, Host};
use agentplane::time::ms_from_timestamp;

/// One agent's last sample and the rates since the one before.
#[derive(Debug, Clone)]
struct Sample {
    last: AgentUsage,
    cpu_percent: Option<f64>,
    out_per_sec: Option<f64>,
}

/// One row of the agents table.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentRow {
    /// Its name, or its id when it has none.
    pub name: String,
    /// Its state's short name.
    pub state: &'static str,
    /// Where it runs.
    pub host: String,
    /// Restarts so far.
    pub restarts: u32,
    /// CPU use over the last interval, percent of one core.
    pub cpu_percent: Option<f64>,
    /// Resident memory at the last sample.
    pub rss_bytes: Option<u64>,
    /// Output written per second over the last interval.
    pub out_per_sec: Option<f64>,
}

/// Everything on screen.
#[derive(Debug, Default)]
pub struct Model {
    /// Live hosts, sorted by id.
    pub hosts: Vec<Host>,
    agents: BTreeMap<String, Agent>,
    usage: HashMap<String, Sample>,
    /// Hosts that did not answer the last usage call.
    pub unreachable: Vec<String>,
    /// The last problem worth showing (a failed call, a watch reconnecting).
    pub note: Option<String>,
    /// An event arrived that the records do not reflect yet: list again.
    pub dirty: bool,
}

impl Model {
    /// Replaces the hosts.
    pub fn set_hosts(&mut self, mut hosts: Vec<Host>) {
        hosts.sort_by(|a, b| a.id.cmp(&b.id));
        self.hosts = hosts;
    }

    /// Replaces the agents (a full list).
    pub fn set_agents(&mut self, agents: Vec<Agent>) {
        self.agents = agents.into_iter().map(|a| (a.id.clone(), a)).collect();
        self.usage.retain(|id, _| self.agents.contains_key(id));
        self.dirty = false;
    }

    /// Applies a watch event at once (state, host); marks the records dirty
    /// so the next refresh reads what the event does not carry (restarts).
    pub fn apply_event(&mut self, e: &Event) {
        match e.r#type() {
            EventType::AgentDeleted => {
                self.agents.remove(&e.agent_id);
                self.usage.remove(&e.agent_id);
            }
            EventType::AgentCreated | EventType::AgentState | EventType::AgentIdle => {
                match self.agents.get_mut(&e.agent_id) {
                    Some(a) => {
                        a.state = e.state;
                        if !e.host.is_empty() {
                            a.host.clone_from(&e.host);
                        }
                    }
                    None => {
                        self.agents.insert(
                            e.agent_id.clone(),
                            Agent {
                                id: e.agent_id.clone(),
                                state: e.state,
                                host: e.host.clone(),
                                generation: e.generation,
                                ..Default::default()
                            },
                        );
                    }
                }
                self.dirty = true;
            }
            _ => self.dirty = true,
        }
    }

    /// Takes new samples: each agent's rates come from its previous one.
    pub fn apply_usage(&mut self, samples: Vec<AgentUsage>, unreachable: Vec<String>) {
        self.unreachable = unreachable;
        for u in samples {
            let (cpu_percent, out_per_sec) = match self.usage.get(&u.id) {
                Some(prev) => rates(&prev.last, &u),
                None => (None, None),
            };
            self.usage.insert(
                u.id.clone(),
                Sample {
                    last: u,
                    cpu_percent,
                    out_per_sec,
                },
            );
        }
    }

    /// How many agents, and how many of them run.
    pub fn counts(&self) -> (usize, usize) {
        let running = self
            .agents
            .values()
            .filter(|a| a.state() == AgentState::Running)
            .count();
        (self.agents.len(), running)
    }

    /// The agents' rows: the busiest first (CPU, then output), then by name.
    pub fn rows(&self) -> Vec<AgentRow> {
        let mut rows: Vec<AgentRow> = self
            .agents
            .values()
            .map(|a| {
                let s = self.usage.get(&a.id);
                AgentRow {
                    name: crate::output::name_or_id(a),
                    state: agentplane::state::name(a.state()),
                    host: a.host.clone(),
                    restarts: a.restarts,
                    cpu_percent: s.and_then(|s| s.cpu_percent),
                    rss_bytes: s.map(|s| s.last.rss_bytes),
                    out_per_sec: s.and_then(|s| s.out_per_sec),
                }
            })
            .collect();
        rows.sort_by(|a, b| {
            let key = |r: &AgentRow| (r.cpu_percent.unwrap_or(0.0), r.out_per_sec.unwrap_or(0.0));
            let (ka, kb) = (key(a), key(b));
            kb.0.total_cmp(&ka.0)
                .then(kb.1.total_cmp(&ka.1))
                .then_with(|| a.name.cmp(&b.name))
        });
        rows
    }
}

/// CPU percent of one core and output bytes per second between two samples
/// of one agent; `None` when no time passed or a counter went back (a new
/// run).
fn rates(prev: &AgentUsage, now: &AgentUsage) -> (Option<f64>, Option<f64>) {
    let at = |u: &AgentUsage| u.sampled_at.as_ref().map(ms_from_timestamp);
    let (Some(t0), Some(t1)) = (at(prev), at(now)) else {
        return (None, None);
    };
    let secs = (t1 - t0) as f64 / 1000.0;
    if secs <= 0.0 {
        return (None, None);
    }
    let cpu = (now.cpu_seconds >= prev.cpu_seconds)
        .then(|| 100.0 * (now.cpu_seconds - prev.cpu_seconds) / secs);
    let out = now
        .output_bytes
        .checked_sub(prev.output_bytes)
        .map(|b| b as f64 / secs);
    (cpu, out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentplane::time::timestamp_from_ms;

    fn sample(id: &str, ms: i64, cpu: f64, out: u64) -> AgentUsage {
        AgentUsage {
            id: id.into(),
            host: "h1".into(),
            cpu_seconds: cpu,
            rss_bytes: 1 << 20,
            output_bytes: out,
            sampled_at: Some(timestamp_from_ms(ms)),
        }
    }

    #[test]
    fn rates_come_from_two_samples_and_a_new_run_shows_none() {
        let mut m = Model::default();
        m.set_agents(vec![Agent {
            id: "a".into(),
            state: AgentState::Running as i32,
            ..Default::default()
        }]);
        m.apply_usage(vec![sample("a", 1_000, 1.0, 100)], Vec::new());
        assert_eq!(m.rows()[0].cpu_percent, None, "one sample gives no rate");
        m.apply_usage(vec![sample("a", 3_000, 2.0, 4_100)], Vec::new());
        let r = &m.rows()[0];
        assert_eq!(r.cpu_percent, Some(50.0));
        assert_eq!(r.out_per_sec, Some(2_000.0));
        m.apply_usage(vec![sample("a", 5_000, 0.1, 10)], Vec::new());
        assert_eq!(
            m.rows()[0].cpu_percent,
            None,
            "counters went back: a new run"
        );
    }

    #[test]
    fn events_move_states_at_once_and_mark_the_records_dirty() {
        let mut m = Model::default();
        m.set_agents(Vec::new());
        m.apply_event(&Event {
            r#type: EventType::AgentCreated as i32,
            agent_id: "b".into(),
            state: AgentState::Pending as i32,
            host: "h2".into(),
            ..Default::default()
        });
        assert!(m.dirty);
        assert_eq!(m.rows()[0].state, "PENDING");
        m.apply_event(&Event {
            r#type: EventType::AgentState as i32,
            agent_id: "b".into(),
            state: AgentState::Running as i32,
            ..Default::default()
        });
        assert_eq!(m.rows()[0].state, "RUNNING");
        assert_eq!(m.rows()[0].host, "h2");
        m.apply_event(&Event {
            r#type: EventType::AgentDeleted as i32,
            agent_id: "b".into(),
            ..Default::default()
        });
        assert!(m.rows().is_empty());
    }
}
