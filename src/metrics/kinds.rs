//! The metric shapes both servers use more than once: a duration by outcome
//! (both outcomes present from the start), a counter by exit reason (the
//! reasons given present from the start), and a gauge family counted from
//! another owner's memory at scrape time.

use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

use super::{duration_family, DurationFamily, MetricRegistry, Outcome, OutcomeLabels};
use crate::proto::v1::ExitReason;

/// Durations of one kind of call by `{outcome}`. Both outcomes exist from
/// the start: a rate of errors reads 0, not nothing, before the first.
#[derive(Debug, Clone)]
pub struct OutcomeHistogram(DurationFamily<OutcomeLabels>);

impl OutcomeHistogram {
    /// Registered as `name` (seconds) in `r`.
    pub fn register(r: &mut MetricRegistry, name: &str, help: &str) -> Self {
        let f = duration_family(r, name, help);
        for outcome in [Outcome::Ok, Outcome::Error] {
            drop(f.get_or_create(&OutcomeLabels { outcome }));
        }
        Self(f)
    }

    /// One call that ended as `r` after `took`.
    pub fn observe<T, E>(&self, r: &Result<T, E>, took: std::time::Duration) {
        self.0
            .get_or_create(&OutcomeLabels {
                outcome: Outcome::of(r),
            })
            .observe(took.as_secs_f64());
    }
}

/// `{reason}`: an exit reason's short name (`HOST_LOST`, `COMPLETED`, …).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// The reason.
    pub reason: &'static str,
}

/// A count of events by exit reason.
#[derive(Debug, Clone)]
pub struct ReasonCounter(Family<ReasonLabels, Counter>);

impl ReasonCounter {
    /// Registered as `name` in `r`, with a series for each of `expected`
    /// from the start.
    pub fn register(
        r: &mut MetricRegistry,
        name: &str,
        help: &str,
        expected: &[ExitReason],
    ) -> Self {
        let f: Family<ReasonLabels, Counter> = Family::default();
        r.register(name, help, f.clone());
        let c = Self(f);
        for why in expected {
            drop(c.0.get_or_create(&Self::labels(*why)));
        }
        c
    }

    /// One more for `why`.
    pub fn inc(&self, why: ExitReason) {
        self.0.get_or_create(&Self::labels(why)).inc();
    }

    fn labels(why: ExitReason) -> ReasonLabels {
        ReasonLabels {
            reason: crate::state::reason_name(why),
        }
    }
}

/// Encodes gauge family `name` whose series are `values` (a collector's
/// scrape: the values are read from their owner's memory then).
pub fn encode_gauges<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    values: impl IntoIterator<Item = (L, i64)>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in values {
        ConstGauge::new(v).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}
