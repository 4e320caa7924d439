//! The control plane's metrics, in its own registry: spawns end to end,
//! calls to hosts, reconcile passes, hosts and agents lost and placed again
//! (each counted by the one replica whose registry write won), open
//! breakers, live streams, and Redis as this replica sees it.

use std::sync::Arc;

use agentplane::metrics::{
    self, DurationFamily, MetricRegistry, OutcomeHistogram, ReasonCounter, RedisMetrics,
};
use agentplane::proto::v1::ExitReason;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Unit;

/// A host agent RPC the control plane makes, as a label value (its gRPC
/// method name).
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum HostMethod {
    /// `HostAgent/StartAgent`.
    StartAgent,
    /// `HostAgent/StopAgent`.
    StopAgent,
    /// `HostAgent/PauseAgent`.
    PauseAgent,
    /// `HostAgent/ResumeAgent`.
    ResumeAgent,
    /// `HostAgent/SignalAgent`.
    SignalAgent,
    /// `HostAgent/ForgetAgent`.
    ForgetAgent,
    /// `HostAgent/WriteInput`.
    WriteInput,
    /// `HostAgent/ReadLogs` (a followed or read log, opened by the relay).
    ReadLogs,
    /// `HostAgent/ListAgents` (usage, for ListAgentUsage).
    ListAgents,
}

impl HostMethod {
    /// The full gRPC method (`agentplane.v1.HostAgent/StartAgent`): a host
    /// call's span name, matching the host's own span.
    pub fn rpc(self) -> &'static str {
        match self {
            Self::StartAgent => "agentplane.v1.HostAgent/StartAgent",
            Self::StopAgent => "agentplane.v1.HostAgent/StopAgent",
            Self::PauseAgent => "agentplane.v1.HostAgent/PauseAgent",
            Self::ResumeAgent => "agentplane.v1.HostAgent/ResumeAgent",
            Self::SignalAgent => "agentplane.v1.HostAgent/SignalAgent",
            Self::ForgetAgent => "agentplane.v1.HostAgent/ForgetAgent",
            Self::WriteInput => "agentplane.v1.HostAgent/WriteInput",
            Self::ReadLogs => "agentplane.v1.HostAgent/ReadLogs",
            Self::ListAgents => "agentplane.v1.HostAgent/ListAgents",
        }
    }

    /// The method alone (`StartAgent`): the label value.
    fn name(self) -> &'static str {
        let rpc = self.rpc();
        rpc.rsplit_once('/').map_or(rpc, |(_, m)| m)
    }
}

impl EncodeLabelValue for HostMethod {
    fn encode(&self, e: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(e, self.name())
    }
}

/// `{method, outcome}` of a host call.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HostCallLabels {
    /// The RPC.
    pub method: HostMethod,
    /// How it ended (`error`: unreachable, refused or timed out).
    pub outcome: metrics::Outcome,
}

/// `{address}` of a host whose breaker is open.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AddressLabels {
    address: String,
}

/// `agentplane_host_breaker_open{address}`: 1 for each host address whose
/// calls fail fast now, read from the breakers at each scrape (no series
/// for a closed one, so a host that is gone leaves none behind).
#[derive(Debug)]
pub struct Breakers(pub std::sync::Weak<crate::hosts::HostClients>);

impl prometheus_client::collector::Collector for Breakers {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        let open = self
            .0
            .upgrade()
            .map(|h| h.open_breakers())
            .unwrap_or_default();
        metrics::encode_gauges(
            &mut encoder,
            "host_breaker_open",
            "1 while calls to this host address fail fast (its circuit is open)",
            open.into_iter()
                .map(|address| (AddressLabels { address }, 1)),
        )
    }
}

/// Every metric of one control plane.
#[derive(Debug)]
pub struct Metrics {
    /// SpawnAgent, from request to answer, by outcome.
    pub spawns: OutcomeHistogram,
    /// Calls to host agents (all attempts of one call), by method and outcome.
    pub host_calls: DurationFamily<HostCallLabels>,
    /// Reconcile passes.
    pub reconcile_passes: Histogram,
    /// Reconcile passes that failed.
    pub reconcile_errors: Counter,
    /// Hosts this replica declared lost.
    pub hosts_lost: Counter,
    /// Agents this replica declared LOST, by reason.
    pub agents_lost: ReasonCounter,
    /// LOST agents this replica placed again.
    pub agents_rescheduled: Counter,
    /// Redis as this replica sees it.
    pub redis: Arc<RedisMetrics>,
}

impl Metrics {
    /// The metrics, registered in `r`.
    pub fn register(r: &mut MetricRegistry) -> Arc<Self> {
        let m = Self {
            spawns: OutcomeHistogram::register(
                r,
                "spawn_duration",
                "SpawnAgent calls from request to answer, by outcome",
            ),
            host_calls: metrics::duration_family(
                r,
                "host_call_duration",
                "Calls to host agents (with their retry), by method and outcome",
            ),
            reconcile_passes: metrics::duration_histogram(),
            reconcile_errors: Counter::default(),
            hosts_lost: Counter::default(),
            agents_lost: ReasonCounter::register(
                r,
                "agents_lost",
                "Agents declared LOST (their host lost, their lease expired, not on their host), by reason; counted once across replicas",
                &[
                    ExitReason::HostLost,
                    ExitReason::LeaseExpired,
                    ExitReason::NotOnHost,
                ],
            ),
            agents_rescheduled: Counter::default(),
            redis: RedisMetrics::register(r),
        };
        r.register_with_unit(
            "reconcile_pass_duration",
            "Reconcile passes of this replica",
            Unit::Seconds,
            m.reconcile_passes.clone(),
        );
        r.register(
            "reconcile_errors",
            "Reconcile passes that failed (the registry did not answer)",
            m.reconcile_errors.clone(),
        );
        r.register(
            "hosts_lost",
            "Hosts declared lost (heartbeat expired); counted by the replica whose write won, so the sum over replicas counts each once",
            m.hosts_lost.clone(),
        );
        r.register(
            "agents_rescheduled",
            "LOST agents placed again on another host; counted once across replicas",
            m.agents_rescheduled.clone(),
        );
        Arc::new(m)
    }

    /// Metrics registered nowhere (tests).
    pub fn unregistered() -> Arc<Self> {
        Self::register(&mut MetricRegistry::default())
    }

    /// One call to a host that ended as `r` after `took`.
    pub fn host_call<T, E>(&self, method: HostMethod, r: &Result<T, E>, took: std::time::Duration) {
        self.host_calls
            .get_or_create(&HostCallLabels {
                method,
                outcome: metrics::Outcome::of(r),
            })
            .observe(took.as_secs_f64());
    }
}
