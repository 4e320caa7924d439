//! The supervisor: starts agents through the keeper, serializes control
//! operations per agent, runs each agent's run loop (exit observed as an
//! event the keeper sends, never by polling; restarts with backoff; the
//! spec's timeout), adopts the agents an earlier host agent left, and writes
//! what it sees into the registry with compare-and-set on generation and host.

mod admit;
mod adopt;
mod agent;
mod capture;
mod control;
mod disconnect;
pub mod error;
pub mod guard;
mod idle;
mod io;
mod launch;
pub mod output;
mod persist;
mod record;
mod restart;
mod run;
pub mod signal;
pub mod spawn;
mod tree;
mod usage;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentplane::proto::v1::{AgentSpec, AgentState, ExitStatus, LocalAgent};
use agentplane::registry::Registry;
use agentplane::tasks::Tasks;
use agentplane::time::{duration_from_proto, now_ms, timestamp_from_ms};
use agentplane::validate::{self, ValidationError};
use nix::sys::signal::Signal;
use tokio_util::sync::CancellationToken;

use self::admit::Admission;
use self::agent::{AgentSlot, Requested};
pub use self::error::SupervisorError;
pub use self::guard::{run_guard, GUARD_ARG};
pub use self::io::LogItem;
use crate::keeper::Keeper;

type Result<T> = std::result::Result<T, SupervisorError>;

/// How long to wait for the group to die after SIGKILL before giving up.
const KILL_WAIT: Duration = Duration::from_secs(5);
/// How long a pause waits for the group to act on its SIGSTOP.
const PAUSE_WAIT: Duration = Duration::from_secs(1);
/// Default grace when neither the request nor the spec gives one.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(10);
/// Threads writing agents' output to disk: two, so that one throttled by the
/// kernel's dirty-page limits does not hold every agent's output.
const LOG_WRITER_THREADS: usize = 2;

/// Runs and controls the agents of one host.
#[derive(Debug)]
pub struct Supervisor {
    host_id: String,
    /// This start of the host agent (written into the records it starts).
    incarnation: String,
    /// Slots whose last record write Redis did not take (see record.rs).
    unrecorded: Mutex<HashMap<String, Arc<AgentSlot>>>,
    registry: Registry,
    ttl: Duration,
    limits: Limits,
    agents: Mutex<HashMap<String, Arc<AgentSlot>>>,
    tasks: Tasks,
    cancel: CancellationToken,
    /// Cancelled when this host agent leaves its agents to the keeper:
    /// run loops and captures let go without recording anything.
    detach: CancellationToken,
    /// The keeper: the parent of every agent process.
    keeper: Arc<Keeper>,
    /// The main process of every run under way (= its process group).
    mains: Mutex<HashSet<i32>>,
    data_dir: std::path::PathBuf,
    /// Output streams open now.
    log_streams: agentplane::tasks::Gauge,
    /// The threads that write agents' output to disk.
    log_writers: output::LogWriters,
    /// Starts so far: names each start's output directory.
    starts: std::sync::atomic::AtomicU64,
    /// This host's cgroups (each agent gets one when there are).
    cgroups: crate::cgroup::Cgroups,
    metrics: Arc<crate::metrics::Metrics>,
}

/// What one host agent takes on at most.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Agents running at once (`--max-agents`).
    pub max_agents: u32,
    /// Output streams served at once (`--max-log-streams`).
    pub max_log_streams: u32,
    /// Which uids agents may run as.
    pub uids: crate::identity::UidPolicy,
}

impl Supervisor {
    /// A supervisor for `host_id` whose agents `keeper` starts and holds.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        host_id: String,
        incarnation: String,
        registry: Registry,
        ttl: Duration,
        limits: Limits,
        tasks: Tasks,
        cancel: CancellationToken,
        data_dir: std::path::PathBuf,
        keeper: Arc<Keeper>,
        cgroups: crate::cgroup::Cgroups,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            host_id,
            incarnation,
            unrecorded: Mutex::new(HashMap::new()),
            registry,
            ttl,
            limits,
            agents: Mutex::new(HashMap::new()),
            tasks,
            cancel,
            detach: CancellationToken::new(),
            keeper,
            mains: Mutex::new(HashSet::new()),
            data_dir,
            log_streams: agentplane::tasks::Gauge::default(),
            log_writers: output::LogWriters::start(LOG_WRITER_THREADS),
            starts: std::sync::atomic::AtomicU64::new(0),
            cgroups,
            metrics,
        })
    }

    /// Where starts, exits and heartbeats are counted.
    pub fn metrics(&self) -> &Arc<crate::metrics::Metrics> {
        &self.metrics
    }

    /// The log writers' byte counters.
    pub fn log_bytes(&self) -> output::LogBytes {
        self.log_writers.bytes().clone()
    }

    /// The count of output streams open now, as a metric.
    pub fn log_stream_gauge(&self) -> prometheus_client::metrics::gauge::Gauge {
        self.log_streams.metric()
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<AgentSlot>>> {
        self.agents
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn get(&self, id: &str) -> Result<Arc<AgentSlot>> {
        self.map()
            .get(id)
            .cloned()
            .ok_or_else(|| SupervisorError::NotFound { id: id.to_owned() })
    }

    /// Ids of the agents not ended for good (their locations are refreshed by
    /// the heartbeat).
    pub fn active_ids(&self) -> Vec<String> {
        self.map()
            .values()
            .filter(|s| s.is_active())
            .map(|s| s.id.clone())
            .collect()
    }

    /// [`Supervisor::start`] in a task of its own, so a caller that goes
    /// away (its replica died, its deadline passed) cannot cancel a start
    /// half-way: between the fork and the run loop, that left a process
    /// nobody supervised and a record PENDING for good.
    pub async fn start_detached(
        self: &Arc<Self>,
        id: String,
        generation: u64,
        spec: AgentSpec,
    ) -> Result<LocalAgent> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let sup = self.clone();
        // In the caller's span: the fork/exec is part of its trace.
        let span = tracing::Span::current();
        self.tasks.spawn(
            "agent start",
            tracing::Instrument::instrument(
                async move {
                    let _ = tx.send(sup.start(id, generation, spec).await);
                },
                span,
            ),
        );
        // A start that panicked is reported like a host going away.
        rx.await.unwrap_or(Err(SupervisorError::ShuttingDown))
    }

    /// Starts agent `id` at `generation`. A repeated call for the same
    /// generation answers with the agent as it is (idempotent).
    pub async fn start(
        self: &Arc<Self>,
        id: String,
        generation: u64,
        spec: AgentSpec,
    ) -> Result<LocalAgent> {
        validate::agent_id("id", &id)?;
        validate::spec(&spec)?;
        if let Some(reason) = self.limits.uids.refusal(spec.uid) {
            return Err(SupervisorError::IdentityRefused {
                id,
                host: self.host_id.clone(),
                reason,
            });
        }
        if generation == 0 {
            return Err(ValidationError::new("generation", "must be at least 1").into());
        }
        let resources = agentplane::cgroups::Resources::from_proto(spec.resources.as_ref())?;
        if let Some(reason) = self.cgroups.caps().refusal(&resources) {
            return Err(SupervisorError::ResourcesRefused {
                id,
                host: self.host_id.clone(),
                reason,
            });
        }
        // A directory of this start's own: a repeated start of the same
        // generation (answered with the agent already here) must not touch
        // the running agent's files.
        let start = self
            .starts
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // With the incarnation: unique across host-agent restarts, whose
        // adopted runs keep their directories.
        let tag = format!("{id}.{generation}.{}.{start}", self.incarnation);
        let dir = self.data_dir.join("agents").join(&tag);
        let (cap, _) = log_sizes(&spec);
        let cgroup = self.cgroups.run(&tag, &resources);
        let taken_at_ms = agentplane::time::now_ms();
        // All of the start's file-system work in one trip to the blocking
        // pool (each trip is two thread hand-offs): its output log, its
        // state file (for a later host agent's adoption) and its cgroups.
        // Undone below when the start is not admitted.
        let files = launch::StartFiles {
            id: id.clone(),
            dir,
            cap,
            writers: self.log_writers.clone(),
            cgroup: cgroup.clone(),
            persisted: persist::Persisted {
                id: id.clone(),
                generation,
                spec: Some(spec.clone()),
                created_at_ms: taken_at_ms,
                ..Default::default()
            },
        };
        let (log, made_cgroup) =
            launch::off_runtime(move || files.make())
                .await
                .map_err(|source| SupervisorError::Output {
                    id: id.clone(),
                    source,
                })?;
        let slot = Arc::new(
            AgentSlot::new(id.clone(), generation, spec, tag, log)
                .taken_at(taken_at_ms)
                .in_cgroup(cgroup),
        );
        // Owned before anyone else can see the slot: operations on it wait for the start.
        let _ops = slot.ops.try_lock().expect("a new slot's lock is free");
        let mut admitted = self.admit(&slot, None);
        if let Ok(Admission::EndedHere(ended)) = &admitted {
            // This generation ran here and ended, but its record may still
            // want it to run here (its end was fenced, and a data loss
            // rolled the record back): start afresh only then, so a
            // repeated start of an agent that simply ended never runs it again.
            let ended = ended.clone();
            admitted = if self.record_wants_run(&slot).await {
                tracing::info!(agent = %id, generation, "starting again a generation that ended here: its record is PENDING here");
                self.admit(&slot, Some(&ended))
            } else {
                Ok(Admission::Here(ended.to_proto()))
            };
        }
        if !matches!(admitted, Ok(Admission::New)) {
            // Answered without this slot: the files it made are nobody's.
            slot.output.remove();
            if let Some(cg) = slot.cgroup.clone() {
                self.tasks.spawn("cgroup removal", async move {
                    let _ = cg.remove(std::time::Duration::ZERO).await;
                });
            }
        }
        match admitted? {
            Admission::New => {}
            Admission::Here(here) => return Ok(here),
            Admission::EndedHere(ended) => return Ok(ended.to_proto()),
        }
        if let Err(e) = made_cgroup {
            return Ok(self.fail_to_start(&slot, &e).await);
        }
        if let Some(pause) = pause_before_spawn() {
            // Test builds only: widens the window in which a heartbeat can
            // fence the admitted slot before its fork (see the test).
            tokio::time::sleep(pause).await;
        }

        let (pid, exit) = match self.spawn_run(&slot, false).await {
            Ok(Some(c)) => c,
            Ok(None) => {
                // A heartbeat fenced the slot between admission and the fork
                // (its record names another host or generation): nothing ran.
                slot.mark_ended(AgentState::Exited, record::fenced_before_start());
                return Err(SupervisorError::Fenced {
                    id,
                    detail: "its record moved on before the start".into(),
                });
            }
            Err(e) => return Ok(self.fail_to_start(&slot, &e).await),
        };
        tracing::info!(agent = %id, pid, generation, argv = ?slot.spec.argv, "agent started");
        let outcome = self.record_running(&slot, pid, None).await;
        // The run loop starts only after the RUNNING write, so an agent that
        // exits at once can never have its exit overwritten by RUNNING.
        self.watch_idle(&slot);
        self.watch_sessions(&slot);
        let sup = self.clone();
        let looped = slot.clone();
        self.tasks.spawn("agent run loop", async move {
            sup.run_loop(looped, exit, pid, None).await;
        });
        match outcome {
            // What it wrote: the caller need not read the record back.
            Ok(recorded) => Ok(LocalAgent {
                recorded: Some(recorded),
                ..slot.to_proto()
            }),
            Err(err) => {
                // Nobody could find or control it: it must not run.
                tracing::warn!(agent = %id, error = %err, "killing an agent that could not be recorded");
                slot.disown();
                slot.status().requested = Some(Requested::Stop);
                let _ = signal::to_group(pid, Signal::SIGKILL);
                Err(err)
            }
        }
    }

    /// Whether the record asks for `slot`'s run here: PENDING at its
    /// generation on this host. Unreadable: no (a later retry asks again).
    async fn record_wants_run(&self, slot: &AgentSlot) -> bool {
        match self.registry.get_agent(&slot.id).await {
            Ok(Some(a)) => {
                a.state() == AgentState::Pending
                    && a.generation == slot.generation
                    && a.host == self.host_id
            }
            Ok(None) => false,
            Err(e) => {
                tracing::warn!(agent = %slot.id, error = %e, "cannot read the record of a repeated start");
                false
            }
        }
    }

    /// One agent as this host sees it.
    pub fn inspect(&self, id: &str) -> Result<LocalAgent> {
        Ok(self.get(id)?.to_proto())
    }

    /// This host agent's counters.
    pub fn status(&self) -> agentplane::proto::v1::ServerStatus {
        // One lock, read once: the struct literal would keep a first guard
        // alive while taking a second.
        let (agents, log_buffered_bytes) = {
            let map = self.map();
            let buffered = map.values().map(|s| s.output.waiting_bytes()).sum();
            (map.len() as u64, buffered)
        };
        agentplane::proto::v1::ServerStatus {
            log_streams: self.log_streams.get(),
            watch_streams: 0,
            tasks: self.tasks.running() as u64,
            panicked_tasks: self.tasks.panicked(),
            rss_bytes: agentplane::tasks::rss_bytes(),
            agents,
            log_buffered_bytes,
        }
    }

    /// Forgets an ended agent.
    pub fn forget(&self, id: &str) -> Result<()> {
        let mut map = self.map();
        match map.get(id) {
            None => Ok(()),
            Some(s) if s.is_active() => Err(SupervisorError::IllegalTransition {
                id: id.to_owned(),
                detail: "it is still running".into(),
            }),
            Some(_) => {
                if let Some(slot) = map.remove(id) {
                    slot.output.remove();
                }
                Ok(())
            }
        }
    }

    /// Fencing: kills the local copy of an agent whose record no longer names
    /// this host and generation (rescheduled elsewhere, or deleted). Nothing is
    /// written: the record belongs to someone else now.
    pub fn fence(&self, id: &str, why: &str) {
        let Ok(slot) = self.get(id) else { return };
        let pid = {
            let mut st = slot.status();
            if st.state == AgentState::Stopping && st.requested == Some(Requested::Stop) {
                // A stop is under way (a drain moved the agent and stops this
                // copy with its grace): its escalation ends it, bounded.
                return;
            }
            st.requested = Some(Requested::Stop);
            st.pid
        };
        slot.wake.notify_one();
        tracing::warn!(agent = %id, pid, reason = why, "fencing: killing a stale copy");
        self.kill_all(&slot, pid, pid);
    }

    /// The generation this host runs `id` at.
    pub fn generation_of(&self, id: &str) -> Option<u64> {
        self.get(id).ok().map(|s| s.generation)
    }

    /// Stops every agent (each with its own grace, capped at `limit`), in
    /// parallel; used at shutdown.
    pub async fn stop_all(self: &Arc<Self>, limit: Duration) {
        let ids = self.active_ids();
        if ids.is_empty() {
            return;
        }
        tracing::info!(agents = ids.len(), "stopping every agent");
        let mut set = tokio::task::JoinSet::new();
        for id in ids {
            let sup = self.clone();
            set.spawn(async move {
                let grace = sup
                    .get(&id)
                    .ok()
                    .and_then(|s| s.spec.stop_grace.as_ref().map(duration_from_proto));
                let grace = grace.unwrap_or(DEFAULT_GRACE).min(limit);
                if let Err(e) = sup.stop(&id, Some(grace)).await {
                    tracing::debug!(agent = %id, error = %e, "stop at shutdown");
                }
            });
        }
        let all = async { while set.join_next().await.is_some() {} };
        let _ = tokio::time::timeout(limit + KILL_WAIT, all).await;
    }
}

/// A debug-build failpoint: `AGENTPLANE_FAILPOINT_PAUSE_BEFORE_SPAWN=MS`
/// pauses every start between admission and fork. Release builds ignore it.
fn pause_before_spawn() -> Option<Duration> {
    static PAUSE: std::sync::OnceLock<Option<Duration>> = std::sync::OnceLock::new();
    *PAUSE.get_or_init(|| {
        if !cfg!(debug_assertions) {
            return None;
        }
        std::env::var("AGENTPLANE_FAILPOINT_PAUSE_BEFORE_SPAWN")
            .ok()?
            .parse()
            .ok()
            .map(Duration::from_millis)
    })
}

/// The spec's output cap on disk and output pipe capacity, defaults resolved.
fn log_sizes(spec: &AgentSpec) -> (u64, u64) {
    let cap = match spec.log_max_bytes {
        0 => output::DEFAULT_CAP,
        n => n,
    };
    let buffer = match spec.log_buffer_bytes {
        0 => output::DEFAULT_BUFFER,
        n => n,
    };
    (cap, buffer)
}

/// The exit of a start that failed.
fn spawn_failure(spec: &AgentSpec, e: &std::io::Error) -> ExitStatus {
    ExitStatus {
        reason: agentplane::proto::v1::ExitReason::SpawnFailed as i32,
        error: spawn::describe_spawn_error(spec, e),
        finished_at: Some(timestamp_from_ms(now_ms())),
        ..Default::default()
    }
}
