//! Simulated hosts for `bench-fleet`: each registers and heartbeats through
//! the real registry code as a host agent does (the same pipelined beat,
//! its location keys and record reads) and answers StartAgent and StopAgent
//! by writing the record as the host agent's supervisor does, but runs no
//! process: a fleet of 100,000 agents fits on one machine.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentplane::proto::v1::host_agent_server::{HostAgent, HostAgentServer};
use agentplane::proto::v1::{
    AgentState, AttachInput, ExitReason, ExitStatus, GetStatusRequest, HostAgentRef,
    HostForgetAgentResponse, HostListAgentsRequest, HostListAgentsResponse, HostStopAgentRequest,
    LocalAgent, LogChunk, RecordedStart, SendInputRequest, SendInputResponse, ServerStatus,
    SignalAgentRequest, StartAgentRequest, StreamLogsRequest,
};
use agentplane::registry::{AgentUpdate, Expect, HostRecord, Location, Registry, UpdateOutcome};
use agentplane::time::{now_ms, timestamp_from_ms};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

/// One simulated host: its record and the agents it "runs" (id → generation).
#[derive(Debug)]
pub struct SimHost {
    record: HostRecord,
    registry: Registry,
    ttl: Duration,
    running: Mutex<HashMap<String, u64>>,
    next_pid: AtomicI32,
}

/// Durations of heartbeats, shared by every simulated host, and a switch
/// that holds every beat (to measure a call without the fleet's load).
#[derive(Debug, Default)]
pub struct Beats {
    took: Mutex<Vec<Duration>>,
    held: std::sync::atomic::AtomicBool,
}

impl Beats {
    /// Takes the durations recorded so far.
    pub fn take(&self) -> Vec<Duration> {
        std::mem::take(&mut *self.took.lock().expect("beats lock"))
    }

    /// Holds (`true`) or lets go (`false`) every host's beats. Hold for
    /// less than a TTL, or the hosts are declared lost.
    pub fn hold(&self, held: bool) {
        self.held.store(held, Ordering::Relaxed);
    }
}

impl SimHost {
    /// Starts host `id` on a port of its own: its gRPC server and its
    /// heartbeat every `ttl / 3` (on `conn`), until `cancel`. Returns once
    /// the first beat registered it.
    pub async fn start(
        id: String,
        capacity: u32,
        registry: Registry,
        mut conn: agentplane::registry::Connection,
        ttl: Duration,
        beats: Arc<Beats>,
        cancel: CancellationToken,
    ) -> anyhow::Result<Arc<Self>> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?.to_string();
        let host = Arc::new(Self {
            record: HostRecord {
                id,
                address,
                capacity,
                version: "sim".into(),
                started_at_ms: now_ms(),
                incarnation: agentplane::ids::new_agent_id(),
                ..Default::default()
            },
            registry,
            ttl,
            running: Mutex::new(HashMap::new()),
            next_pid: AtomicI32::new(1000),
        });
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let server = tonic::transport::Server::builder()
            .add_service(HostAgentServer::from_arc(host.clone()))
            .serve_with_incoming_shutdown(incoming, cancel.clone().cancelled_owned());
        tokio::spawn(async move {
            if let Err(e) = server.await {
                eprintln!("simulated host server failed: {e}");
            }
        });
        let mut fencing = agentplane::registry::FencingMemory::with_phase(rand::random());
        // As a host agent's first beat does on a Redis without an epoch
        // (a beat that reads none reads every head).
        host.registry.ensure_epoch().await?;
        host.beat(&mut conn, &mut fencing).await?;
        let beating = host.clone();
        tokio::spawn(async move {
            // Hosts start at spread-out phases, as a real fleet's do.
            let period = beating.ttl / 3;
            let phase = period.mul_f64(rand::random::<f64>());
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(phase) => {}
            }
            let mut tick = tokio::time::interval(period);
            loop {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    _ = tick.tick() => {}
                }
                if beats.held.load(Ordering::Relaxed) {
                    continue;
                }
                let t = Instant::now();
                match beating.beat(&mut conn, &mut fencing).await {
                    Ok(()) => beats.took.lock().expect("beats lock").push(t.elapsed()),
                    // A beat cut short by the end of the run is no news.
                    Err(_) if cancel.is_cancelled() => return,
                    Err(e) => eprintln!("heartbeat of {} failed: {e}", beating.record.id),
                }
            }
        });
        Ok(host)
    }

    /// One heartbeat, as the host agent's: the host hash and every lease,
    /// with the records that may differ read back, in one round trip.
    async fn beat(
        &self,
        conn: &mut agentplane::registry::Connection,
        fencing: &mut agentplane::registry::FencingMemory,
    ) -> anyhow::Result<()> {
        let running: Vec<(String, u64)> = self
            .running
            .lock()
            .expect("running lock")
            .iter()
            .map(|(id, generation)| (id.clone(), *generation))
            .collect();
        self.registry
            .heartbeat(conn, &self.record, &running, self.ttl, fencing)
            .await?;
        Ok(())
    }

    fn local(id: &str, generation: u64, state: AgentState, pid: i32) -> LocalAgent {
        LocalAgent {
            id: id.to_owned(),
            generation,
            state: state as i32,
            pid,
            ..Default::default()
        }
    }
}

type Answer = Result<Response<LocalAgent>, Status>;

fn unimplemented<T>(what: &str) -> Result<Response<T>, Status> {
    Err(Status::unimplemented(format!(
        "{what}: a simulated host runs no process"
    )))
}

#[tonic::async_trait]
impl HostAgent for SimHost {
    async fn start_agent(&self, req: Request<StartAgentRequest>) -> Answer {
        let r = req.into_inner();
        if self.running.lock().expect("running lock").get(&r.id) == Some(&r.generation) {
            return Ok(Response::new(Self::local(
                &r.id,
                r.generation,
                AgentState::Running,
                1,
            )));
        }
        let pid = self.next_pid.fetch_add(1, Ordering::Relaxed);
        let started = now_ms();
        let outcome = self
            .registry
            .update_agent(
                &r.id,
                &Expect {
                    generation: Some(r.generation),
                    host: Some(self.record.id.clone()),
                    states: vec![AgentState::Pending],
                },
                &AgentUpdate {
                    state: Some(AgentState::Running),
                    pid: Some(pid),
                    started_at_ms: Some(started),
                    incarnation: Some(self.record.incarnation.clone()),
                    pending_since_ms: Some(0),
                    location: Some(Location {
                        host: self.record.id.clone(),
                        host_ttl: self.ttl,
                    }),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        if outcome != UpdateOutcome::Applied {
            return Err(Status::failed_precondition(format!("fenced: {outcome:?}")));
        }
        self.running
            .lock()
            .expect("running lock")
            .insert(r.id.clone(), r.generation);
        let mut local = Self::local(&r.id, r.generation, AgentState::Running, pid);
        local.recorded = Some(RecordedStart {
            pid,
            started_at: Some(timestamp_from_ms(started)),
            incarnation: self.record.incarnation.clone(),
        });
        Ok(Response::new(local))
    }

    async fn stop_agent(&self, req: Request<HostStopAgentRequest>) -> Answer {
        let id = req.into_inner().id;
        let Some(generation) = self.running.lock().expect("running lock").remove(&id) else {
            return Err(Status::not_found(format!("agent {id} is not here")));
        };
        let exit = ExitStatus {
            reason: ExitReason::Stopped as i32,
            finished_at: Some(timestamp_from_ms(now_ms())),
            ..Default::default()
        };
        self.registry
            .update_agent(
                &id,
                &Expect {
                    generation: Some(generation),
                    host: Some(self.record.id.clone()),
                    states: agentplane::state::RUNNING.to_vec(),
                },
                &AgentUpdate {
                    state: Some(AgentState::Exited),
                    pid: Some(0),
                    exit: Some(exit.clone()),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        self.registry
            .clear_location(&id, &self.record.id)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let mut local = Self::local(&id, generation, AgentState::Exited, 0);
        local.exit = Some(exit);
        Ok(Response::new(local))
    }

    async fn pause_agent(&self, _req: Request<HostAgentRef>) -> Answer {
        unimplemented("PauseAgent")
    }

    async fn resume_agent(&self, _req: Request<HostAgentRef>) -> Answer {
        unimplemented("ResumeAgent")
    }

    async fn signal_agent(&self, _req: Request<SignalAgentRequest>) -> Answer {
        unimplemented("SignalAgent")
    }

    async fn inspect_agent(&self, _req: Request<HostAgentRef>) -> Answer {
        unimplemented("InspectAgent")
    }

    async fn list_agents(
        &self,
        _req: Request<HostListAgentsRequest>,
    ) -> Result<Response<HostListAgentsResponse>, Status> {
        let agents = self
            .running
            .lock()
            .expect("running lock")
            .iter()
            .map(|(id, g)| Self::local(id, *g, AgentState::Running, 1))
            .collect();
        Ok(Response::new(HostListAgentsResponse { agents }))
    }

    async fn forget_agent(
        &self,
        _req: Request<HostAgentRef>,
    ) -> Result<Response<HostForgetAgentResponse>, Status> {
        Ok(Response::new(HostForgetAgentResponse {}))
    }

    async fn get_status(
        &self,
        _req: Request<GetStatusRequest>,
    ) -> Result<Response<ServerStatus>, Status> {
        Ok(Response::new(ServerStatus::default()))
    }

    type AttachStream = futures::stream::Empty<Result<LogChunk, Status>>;

    async fn attach(
        &self,
        _req: Request<tonic::Streaming<AttachInput>>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        unimplemented("Attach")
    }

    type ReadLogsStream = futures::stream::Empty<Result<LogChunk, Status>>;

    async fn read_logs(
        &self,
        _req: Request<StreamLogsRequest>,
    ) -> Result<Response<Self::ReadLogsStream>, Status> {
        unimplemented("ReadLogs")
    }

    async fn write_input(
        &self,
        _req: Request<SendInputRequest>,
    ) -> Result<Response<SendInputResponse>, Status> {
        unimplemented("WriteInput")
    }
}
