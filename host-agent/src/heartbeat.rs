//! The heartbeat: every TTL/3, one pipelined round trip refreshes the host key
//! and the location key of every agent this host runs, and reads back what
//! fencing needs. Then, per agent: a record that names another host or a newer
//! generation (or was deleted) means this copy is stale and is killed; a record
//! marked LOST while the agent kept running here is restored; and when Redis
//! lost its data (the epoch changed), missing records are written back.

use std::sync::Arc;
use std::time::Duration;

use agentplane::proto::v1::{AgentState, EventType};
use agentplane::registry::{HeartbeatReport, HostRecord, Registry};
use tokio_util::sync::CancellationToken;

use crate::supervisor::Supervisor;

/// State the heartbeat keeps between beats.
#[derive(Debug, Default)]
struct Memory {
    epoch: Option<String>,
    cordoned: bool,
    failing_since: Option<tokio::time::Instant>,
}

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
    let mut mem = Memory::default();
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
            Ok(report) => {
                if let Some(since) = mem.failing_since.take() {
                    tracing::info!(down_for = ?since.elapsed(), "registry reachable again; heartbeat restored");
                }
                if let Err(e) =
                    reconcile(&registry, &supervisor, &host, ttl, &ids, report, &mut mem).await
                {
                    tracing::warn!(error = %e, "post-heartbeat reconciliation failed; retrying next beat");
                }
            }
            Err(e) => {
                if mem.failing_since.is_none() {
                    tracing::warn!(error = %e, "heartbeat failed; agents keep running, retrying every {:?}", ttl / 3);
                    mem.failing_since = Some(started);
                }
            }
        }
    }
}

async fn reconcile(
    registry: &Registry,
    supervisor: &Supervisor,
    host: &HostRecord,
    ttl: Duration,
    ids: &[String],
    report: HeartbeatReport,
    mem: &mut Memory,
) -> Result<(), agentplane::registry::RegistryError> {
    // A missing or different epoch means Redis lost (or never had) its data.
    let reset = report.epoch.is_none() || (mem.epoch.is_some() && mem.epoch != report.epoch);
    if reset {
        let epoch = registry.ensure_epoch().await?;
        if mem.epoch.is_some() {
            tracing::warn!(%epoch, "the registry lost its data; writing back what this host runs");
        }
        mem.epoch = Some(epoch);
    } else {
        mem.epoch = report.epoch.clone();
    }
    if !report.existed {
        registry
            .emit_host_event(EventType::HostUp, &host.id)
            .await?;
        if mem.cordoned {
            registry.set_cordoned(&host.id, true).await?;
        }
    } else {
        mem.cordoned = report.cordoned;
    }
    for (id, head) in ids.iter().zip(report.records) {
        let Some(local_gen) = supervisor.generation_of(id) else {
            continue;
        };
        match head {
            None if reset => {
                if let Some(record) = supervisor.record_of(id) {
                    registry.rewrite_agent(&record, ttl).await?;
                }
            }
            None => supervisor.fence(id, "its record was deleted"),
            Some(h) if h.host != host.id || h.generation != local_gen => supervisor.fence(
                id,
                &format!(
                    "its record names host {} generation {} (this copy: {} generation {local_gen})",
                    h.host, h.generation, host.id
                ),
            ),
            Some(h) if h.state == Some(AgentState::Lost) => supervisor.restore_lost(id).await,
            Some(_) => {}
        }
    }
    Ok(())
}
