//! The heartbeat. Before the first beat, the records that name this host but
//! that this start of the host agent does not hold are settled as LOST (see
//! `Supervisor::settle_earlier_records`): a fast restart cannot hide a loss.
//! Then every TTL/3, one pipelined round trip refreshes the host key
//! and the location key of every agent this host runs, and reads back what
//! fencing needs (record heads only where a write may have changed them:
//! `FencingMemory`). Then, per agent: a record that names another host or a newer
//! generation (or was deleted) means this copy is stale and is killed; a record
//! marked LOST while the agent kept running here is restored; and when Redis
//! lost its data (the epoch changed), missing records are written back.

use std::sync::Arc;
use std::time::Duration;

use agentplane::proto::v1::{AgentState, EventType};
use agentplane::registry::{FencingMemory, HeartbeatReport, HostRecord, Registry};
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
    // Bounded by half the beat interval: a dial or beat lost to a partition
    // fails before the next tick, so a healed link is seen at that tick.
    let limit = (ttl / 6).clamp(Duration::from_millis(50), Duration::from_secs(2));
    if !settle(&supervisor, limit, &cancel).await {
        return;
    }
    let mut conn = None;
    let mut fencing = FencingMemory::with_phase(rand::random());
    let mut last_attempt = tokio::time::Instant::now();
    // When the leases were last renewed (a beat succeeded).
    let mut renewed = tokio::time::Instant::now();
    loop {
        // While the registry is unreachable, retry twice per interval: a healed
        // partition is then noticed (and stale copies fenced) sooner.
        let retry_at = last_attempt + limit;
        let wait = async {
            if mem.failing_since.is_some() {
                tokio::time::sleep_until(retry_at).await;
                tick.reset();
            } else {
                tick.tick().await;
            }
        };
        tokio::select! {
            () = cancel.cancelled() => return,
            () = wait => {}
        }
        let running: Vec<(String, u64)> = supervisor
            .active_ids()
            .into_iter()
            .filter_map(|id| {
                let generation = supervisor.generation_of(&id)?;
                Some((id, generation))
            })
            .collect();
        let started = tokio::time::Instant::now();
        last_attempt = started;
        let result = beat(
            &registry,
            &mut conn,
            &mut fencing,
            &host,
            &running,
            ttl,
            limit,
        )
        .await;
        // Published with the next beat: `hosts ls` and the benchmark read it.
        host.heartbeat_micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        let metrics = supervisor.metrics();
        metrics.redis.set_up(result.is_ok());
        match &result {
            Ok(_) => metrics.heartbeats.observe(started.elapsed().as_secs_f64()),
            Err(_) => {
                metrics.heartbeat_failures.inc();
            }
        }
        match result {
            Ok(report) => {
                renewed = started;
                if let Some(since) = mem.failing_since.take() {
                    tracing::info!(down_for = ?since.elapsed(), "registry reachable again; heartbeat restored");
                }
                if let Err(e) =
                    reconcile(&registry, &supervisor, &host, ttl, report, &mut mem).await
                {
                    tracing::warn!(error = %e, "post-heartbeat reconciliation failed; retrying next beat");
                }
                // Redis answers: what it could not take earlier is written now.
                supervisor.flush_unrecorded().await;
            }
            Err(e) => {
                supervisor.stop_disconnected(renewed.elapsed());
                if mem.failing_since.is_none() {
                    tracing::warn!(error = %e, "heartbeat failed; agents keep running, retrying every {:?}", ttl / 3);
                    mem.failing_since = Some(started);
                }
            }
        }
    }
}

/// Settles the records an earlier start left, retrying while Redis does not
/// answer; false when cancelled first.
async fn settle(supervisor: &Supervisor, retry: Duration, cancel: &CancellationToken) -> bool {
    let mut warned = false;
    loop {
        match supervisor.settle_earlier_records().await {
            Ok(n) => {
                if n > 0 {
                    tracing::warn!(
                        agents = n,
                        "records left by an earlier start of this host agent are LOST"
                    );
                }
                return true;
            }
            Err(e) => {
                if !warned {
                    tracing::warn!(error = %e, "cannot settle earlier records yet; no heartbeat until then");
                    warned = true;
                }
                tokio::select! {
                    () = cancel.cancelled() => return false,
                    () = tokio::time::sleep(retry) => {}
                }
            }
        }
    }
}

/// One heartbeat on the loop's own connection (dialled when missing, dropped
/// after any failure, so the next beat dials afresh).
async fn beat(
    registry: &Registry,
    conn: &mut Option<agentplane::registry::Connection>,
    fencing: &mut FencingMemory,
    host: &HostRecord,
    running: &[(String, u64)],
    ttl: Duration,
    limit: Duration,
) -> Result<HeartbeatReport, agentplane::registry::RegistryError> {
    let mut c = match conn.take() {
        Some(c) => c,
        None => registry.dedicated_connection(limit).await?,
    };
    let report = registry
        .heartbeat(&mut c, host, running, ttl, fencing)
        .await?;
    *conn = Some(c);
    Ok(report)
}

async fn reconcile(
    registry: &Registry,
    supervisor: &Supervisor,
    host: &HostRecord,
    ttl: Duration,
    report: HeartbeatReport,
    mem: &mut Memory,
) -> Result<(), agentplane::registry::RegistryError> {
    // A missing or different epoch means Redis lost (or never had) its data.
    let reset = report.epoch.is_none() || (mem.epoch.is_some() && mem.epoch != report.epoch);
    // Fencing first, and without a Redis call: a stale copy dies now, not
    // after whatever the writes below wait for.
    let mut rewrite = Vec::new();
    let mut restore = Vec::new();
    let mut missing = Vec::new();
    // Only the agents whose record does not name this run come back.
    for (id, head) in &report.differing {
        let Some(local_gen) = supervisor.generation_of(id) else {
            continue;
        };
        match head {
            // Missing: deleted (its tombstone says so), or lost with Redis's
            // data or a failover's write; the tombstone is asked even after
            // a reset, since on a Redis Cluster one master can lose the
            // epoch while the tombstones on the others live.
            None => missing.push(id),
            // Only a data loss or a rollback makes a record older than a
            // copy that runs: this newer copy is the truth, written back
            // (the newest generation wins; an older copy elsewhere is then
            // fenced by its own heartbeat).
            Some(h) if h.generation < local_gen => {
                tracing::warn!(agent = %id, record_host = %h.host, record_generation = h.generation, local_gen, "the record is older than the copy running here; writing it back");
                rewrite.push(id);
            }
            Some(h) if h.host != host.id || h.generation != local_gen => supervisor.fence(
                id,
                &format!(
                    "its record names host {} generation {} (this copy: {} generation {local_gen})",
                    h.host, h.generation, host.id
                ),
            ),
            Some(h) if h.state == Some(AgentState::Lost) => restore.push(id),
            Some(_) => {}
        }
    }
    let deleted = registry.were_deleted(&missing).await?;
    for (id, deleted) in missing.into_iter().zip(deleted) {
        if deleted {
            supervisor.fence(id, "its record was deleted");
        } else {
            if !reset {
                tracing::warn!(agent = %id, "the record is missing but was never deleted (a write lost in a Redis failover); writing it back");
            }
            rewrite.push(id);
        }
    }
    if reset {
        let epoch = registry.ensure_epoch().await?;
        if mem.epoch.is_some() {
            tracing::warn!(%epoch, "the registry lost its data; writing back what this host runs");
        }
        mem.epoch = Some(epoch);
    } else {
        mem.epoch = report.epoch.clone();
    }
    for id in rewrite {
        if let Some(record) = supervisor.record_of(id) {
            if !registry.rewrite_agent(&record, ttl).await? {
                tracing::info!(agent = %id, generation = record.generation, "not written back: a record of this generation or newer is there");
            }
        }
    }
    for id in restore {
        supervisor.restore_lost(id).await;
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
    Ok(())
}
