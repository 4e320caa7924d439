//! The host agent's metrics, in its own registry: agents by state (counted
//! from the supervisor's memory at each scrape), fork/exec through the
//! keeper, exits by reason and restarts, heartbeats, log bytes, live log
//! streams, and Redis as this host sees it.

use std::sync::{Arc, Weak};

use agentplane::metrics::{self, MetricRegistry, OutcomeHistogram, ReasonCounter, RedisMetrics};
use agentplane::proto::v1::ExitReason;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Unit;

use crate::supervisor::Supervisor;

/// How a run's process can end, as the host agent sees it (what `exits`
/// counts).
const RUN_ENDS: [ExitReason; 8] = [
    ExitReason::Completed,
    ExitReason::Stopped,
    ExitReason::Killed,
    ExitReason::Signaled,
    ExitReason::Timeout,
    ExitReason::Idle,
    ExitReason::Disconnected,
    ExitReason::OomKilled,
];

/// `{state}` of an agent (`RUNNING`, …).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

/// Every metric of one host agent but those read from other owners at
/// scrape time ([`Metrics::register_supervisor`]).
#[derive(Debug)]
pub struct Metrics {
    /// Starts of a run through the keeper (fork, setup, exec), by outcome.
    pub starts: OutcomeHistogram,
    /// Runs that ended, by reason.
    pub exits: ReasonCounter,
    /// Runs started again by the restart policy.
    pub restarts: Counter,
    /// Heartbeats that reached Redis.
    pub heartbeats: Histogram,
    /// Heartbeats that failed.
    pub heartbeat_failures: Counter,
    /// Redis as this host sees it.
    pub redis: Arc<RedisMetrics>,
}

impl Metrics {
    /// The metrics, registered in `r`.
    pub fn register(r: &mut MetricRegistry) -> Arc<Self> {
        let m = Self {
            starts: OutcomeHistogram::register(
                r,
                "agent_start_duration",
                "Starts of an agent's run through the keeper (fork, setup, exec), by outcome",
            ),
            exits: ReasonCounter::register(
                r,
                "agent_exits",
                "Agent runs that ended, by reason",
                &RUN_ENDS,
            ),
            restarts: Counter::default(),
            heartbeats: metrics::duration_histogram(),
            heartbeat_failures: Counter::default(),
            redis: RedisMetrics::register(r),
        };
        r.register(
            "agent_restarts",
            "Agent runs started again by their restart policy",
            m.restarts.clone(),
        );
        r.register_with_unit(
            "heartbeat_duration",
            "Heartbeats that reached Redis (host key, agents' leases)",
            Unit::Seconds,
            m.heartbeats.clone(),
        );
        r.register(
            "heartbeat_failures",
            "Heartbeats that failed (Redis unreachable or erroring)",
            m.heartbeat_failures.clone(),
        );
        Arc::new(m)
    }

    /// Metrics registered nowhere (tests).
    pub fn unregistered() -> Arc<Self> {
        Self::register(&mut MetricRegistry::default())
    }

    /// Registers in `r` what `supervisor` owns: agents by state, log bytes
    /// and live log streams.
    pub fn register_supervisor(r: &mut MetricRegistry, supervisor: &Arc<Supervisor>) {
        let bytes = supervisor.log_bytes();
        r.register(
            "log_written_bytes",
            "Agents' output bytes written into their log files",
            bytes.written.clone(),
        );
        r.register(
            "log_dropped_bytes",
            "Agents' output bytes read and not written (the disk refused them, or the log was deleted): readers see a gap",
            bytes.dropped.clone(),
        );
        r.register(
            "log_streams",
            "Output streams (ReadLogs, Attach) open now",
            supervisor.log_stream_gauge(),
        );
        r.register_collector(Box::new(AgentStates(Arc::downgrade(supervisor))));
    }
}

/// `agentplane_agents{state}`, counted at each scrape from the supervisor's
/// map; every state is present (0 when none), so the series never change.
#[derive(Debug)]
struct AgentStates(Weak<Supervisor>);

impl Collector for AgentStates {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let counts = self
            .0
            .upgrade()
            .map_or_else(Supervisor::no_agents, |s| s.count_by_state());
        metrics::encode_gauges(
            &mut encoder,
            "agents",
            "Agents this host agent holds, by state",
            counts.into_iter().map(|(state, n)| {
                let labels = StateLabels {
                    state: agentplane::state::name(state),
                };
                (labels, i64::try_from(n).unwrap_or(i64::MAX))
            }),
        )
    }
}
