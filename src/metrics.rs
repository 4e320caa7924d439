//! Prometheus metrics: what both servers share (build info, Redis errors by
//! step, whether the registry answers), the label types, and the `/metrics`
//! endpoint ([`serve`]). Each server builds its own [`MetricRegistry`]
//! (`agentctl dev` runs two servers in one process) and registers its
//! metrics once at start; a scrape encodes what is in memory and never
//! touches Redis.

mod http;
mod kinds;

use std::sync::Arc;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Unit;

pub use http::{bind, serve, start, MetricsError};
pub use kinds::{encode_gauges, OutcomeHistogram, ReasonCounter, ReasonLabels};
pub use prometheus_client::registry::Registry as MetricRegistry;

/// The one prefix of every metric name.
pub const PREFIX: &str = "agentplane";

/// A histogram family keyed by `L`, each with [`duration_histogram`]'s buckets.
pub type DurationFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// An empty registry whose metric names start with [`PREFIX`], holding
/// `agentplane_build_info{version, server}`.
pub fn registry(server: &'static str) -> MetricRegistry {
    let mut r = MetricRegistry::with_prefix(PREFIX);
    r.register(
        "build",
        "The running build: its version and which server this is",
        Info::new([("version", crate::VERSION), ("server", server)]),
    );
    r
}

/// Buckets for durations in seconds: 0.5 ms to about 16 s, doubling.
pub fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// A [`DurationFamily`] registered as `name` (seconds) in `r`.
pub fn duration_family<L>(r: &mut MetricRegistry, name: &str, help: &str) -> DurationFamily<L>
where
    L: EncodeLabelSet + Clone + std::hash::Hash + Eq + std::fmt::Debug + Send + Sync + 'static,
{
    let f: DurationFamily<L> = Family::new_with_constructor(duration_histogram);
    r.register_with_unit(name, help, Unit::Seconds, f.clone());
    f
}

/// How a call ended, as a label value.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum Outcome {
    /// It did what was asked.
    Ok,
    /// It failed.
    Error,
}

impl Outcome {
    /// `Ok` for `Ok(_)`, `Error` for `Err(_)`.
    pub fn of<T, E>(r: &Result<T, E>) -> Self {
        if r.is_ok() {
            Self::Ok
        } else {
            Self::Error
        }
    }
}

impl EncodeLabelValue for Outcome {
    fn encode(&self, e: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        e.write_str(match self {
            Self::Ok => "ok",
            Self::Error => "error",
        })
    }
}

/// `{outcome}`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// How it ended.
    pub outcome: Outcome,
}

/// `{operation}`: a registry step (`get agent`, `heartbeat`, …), from a
/// fixed set in the code.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabels {
    /// The step.
    pub operation: &'static str,
}

/// Redis as one server sees it: failed commands by step, and whether its
/// last check reached Redis.
#[derive(Debug, Default)]
pub struct RedisMetrics {
    errors: Family<OperationLabels, Counter>,
    up: Gauge,
}

impl RedisMetrics {
    /// Registers `agentplane_redis_errors_total{operation}` and
    /// `agentplane_registry_up` in `r`.
    pub fn register(r: &mut MetricRegistry) -> Arc<Self> {
        let m = Arc::new(Self::default());
        r.register(
            "redis_errors",
            "Registry operations that failed because Redis could not be reached or answered an error",
            m.errors.clone(),
        );
        r.register(
            "registry_up",
            "1 if this server's last registry check reached Redis, else 0",
            m.up.clone(),
        );
        m
    }

    /// One failed `operation`.
    pub fn error(&self, operation: &'static str) {
        self.errors
            .get_or_create(&OperationLabels { operation })
            .inc();
    }

    /// The last check's answer.
    pub fn set_up(&self, up: bool) {
        self.up.set(i64::from(up));
    }
}
