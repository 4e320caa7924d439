//! The heartbeat: every TTL/3, one pipelined round trip refreshes the host key
//! and the location key of every agent this host runs.

use std::sync::Arc;
use std::time::Duration;

use agentplane::registry::{HostRecord, Registry};
use tokio_util::sync::CancellationToken;

use crate::supervisor::Supervisor;

/// Beats until `cancel`. Failures are logged once per outage, not per beat.
pub async fn run(
    registry: Registry,
    supervisor: Arc<Supervisor>,
    mut host: HostRecord,
    ttl: Duration,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(ttl / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing_since: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let ids = supervisor.active_ids();
        let started = tokio::time::Instant::now();
        let result = registry.heartbeat(&host, &ids, ttl).await;
        // Published with the next beat: `hosts ls` and the benchmark read it.
        host.heartbeat_micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        match result {
            Ok(()) => {
                if let Some(since) = failing_since.take() {
                    tracing::info!(down_for = ?since.elapsed(), "registry reachable again; heartbeat restored");
                }
                tracing::trace!(agents = ids.len(), took = ?started.elapsed(), "heartbeat");
            }
            Err(e) => {
                if failing_since.is_none() {
                    tracing::warn!(error = %e, "heartbeat failed; agents keep running, retrying every {:?}", ttl / 3);
                    failing_since = Some(started);
                }
            }
        }
    }
}
