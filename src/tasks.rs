//! Background tasks that never vanish: each is tracked (so shutdown can await
//! it within a bound), named, and logged with its name if it panics.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::task::TaskTracker;

/// A tracker of named background tasks and a count of those that panicked.
#[derive(Debug, Clone, Default)]
pub struct Tasks {
    tracker: TaskTracker,
    panicked: Arc<AtomicU64>,
}

impl Tasks {
    /// An empty set of tasks.
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs `fut` in the background under `name`. A panic is caught at the task
    /// boundary, logged with the name and counted; it never takes the process down.
    pub fn spawn<F>(&self, name: &'static str, fut: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let inner = tokio::spawn(fut);
        let panicked = self.panicked.clone();
        self.tracker.spawn(async move {
            if let Err(e) = inner.await {
                if e.is_panic() {
                    panicked.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(task = name, error = %e, "background task panicked");
                } else {
                    tracing::debug!(task = name, "background task cancelled");
                }
            }
        });
    }

    /// How many tasks panicked so far.
    pub fn panicked(&self) -> u64 {
        self.panicked.load(Ordering::Relaxed)
    }

    /// How many tasks are still running.
    pub fn running(&self) -> usize {
        self.tracker.len()
    }

    /// Stops accepting the idea of new tasks and waits for the running ones, at
    /// most `limit`; returns false if some were still running then.
    pub async fn drain(&self, limit: Duration) -> bool {
        self.tracker.close();
        let ok = tokio::time::timeout(limit, self.tracker.wait())
            .await
            .is_ok();
        if !ok {
            tracing::warn!(
                still_running = self.tracker.len(),
                ?limit,
                "background tasks did not finish within the shutdown bound"
            );
        }
        ok
    }
}

/// A count of things open now (streams), decremented when a [`GaugeGuard`]
/// drops, however the holder ends. It is also a Prometheus gauge
/// ([`Gauge::metric`]), so a scrape reads the same count.
#[derive(Debug, Clone, Default)]
pub struct Gauge(prometheus_client::metrics::gauge::Gauge);

impl Gauge {
    /// One more; it is one less when the guard drops.
    pub fn hold(&self) -> GaugeGuard {
        self.0.inc();
        GaugeGuard(self.0.clone())
    }

    /// One more unless `max` are held already.
    pub fn try_hold(&self, max: u64) -> Option<GaugeGuard> {
        let max = i64::try_from(max).unwrap_or(i64::MAX);
        self.0
            .inner()
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| GaugeGuard(self.0.clone()))
    }

    /// How many are held now.
    pub fn get(&self) -> u64 {
        u64::try_from(self.0.get()).unwrap_or(0)
    }

    /// The same count as a metric, to register.
    pub fn metric(&self) -> prometheus_client::metrics::gauge::Gauge {
        self.0.clone()
    }
}

/// Holds one unit of a [`Gauge`].
#[derive(Debug)]
pub struct GaugeGuard(prometheus_client::metrics::gauge::Gauge);

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Resident memory of this process, bytes (from `/proc/self/status`).
pub fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gauge_holds_up_to_its_limit() {
        let g = Gauge::default();
        let a = g.try_hold(2).unwrap();
        let _b = g.try_hold(2).unwrap();
        assert!(g.try_hold(2).is_none());
        drop(a);
        assert!(g.try_hold(2).is_some());
        assert_eq!(g.get(), 1);
    }

    #[tokio::test]
    async fn a_panicking_task_is_counted_and_drained() {
        let tasks = Tasks::new();
        tasks.spawn("boom", async { panic!("on purpose") });
        tasks.spawn("fine", async {});
        assert!(tasks.drain(Duration::from_secs(5)).await);
        assert_eq!(tasks.panicked(), 1);
    }

    #[test]
    fn gauges_count_guards() {
        let g = Gauge::default();
        let a = g.hold();
        let b = g.hold();
        assert_eq!(g.get(), 2);
        drop(a);
        drop(b);
        assert_eq!(g.get(), 0);
        assert!(rss_bytes() > 0);
    }

    #[tokio::test]
    async fn drain_is_bounded() {
        let tasks = Tasks::new();
        tasks.spawn("forever", std::future::pending());
        assert!(!tasks.drain(Duration::from_millis(50)).await);
    }
}
