//! Calls to host agents: one lazily-connected channel per address (a bounded
//! cache), a deadline on every call, one retry for idempotent calls, a
//! per-host circuit breaker, and errors that name the host. The breaker's one
//! probe is an [`Admission`] that releases the probe however the call ends,
//! even when its future is dropped (a client gone, a deadline).

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentplane::proto::v1::host_agent_client::HostAgentClient;
use agentplane::registry::HostRecord;
use agentplane::server::tls::{self, Transport};
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;
use tracing::Instrument;

use crate::error::ApiError;
pub use crate::metrics::HostMethod;
use crate::metrics::Metrics;

/// Most cached channels; past it the cache is emptied and refilled on demand.
const MAX_CHANNELS: usize = 1024;
/// Consecutive transport failures that open a host's circuit.
const OPEN_AFTER: u32 = 3;
/// How long an open circuit fails fast before one probe is let through.
const OPEN_FOR: Duration = Duration::from_secs(2);
/// HTTP/2 flow-control window per stream on host connections: what one log
/// stream whose client stalls may hold in this process. The largest that
/// the assert below allows: a follower of a flooding agent moved 10% more
/// with 256 KiB than with 128 KiB (fewer waits for the window to reopen).
const HOST_STREAM_WINDOW: u32 = 256 * 1024;
/// HTTP/2 window per host connection. It is credit, not memory: what is held
/// is at most the stalled streams' windows. The receiver re-opens the window
/// only once half of it was read, so stalled streams must never hold half of
/// it, or every call to the host would wait (with hyper's 5 MiB default, three
/// stalled `logs -f` did that). Host agents cap their streams below that.
/// The largest window HTTP/2 allows.
const HOST_CONNECTION_WINDOW: u32 = (1 << 31) - 1;
const _: () = assert!(
    (2 * HOST_STREAM_WINDOW as u64 * agentplane::validate::MAX_LOG_STREAMS_PER_HOST as u64)
        < (HOST_CONNECTION_WINDOW as u64),
    "stalled log streams could fill a host connection's window"
);
/// Pause before the one retry of an idempotent call.
const RETRY_AFTER: Duration = Duration::from_millis(100);

/// Per-address breaker state.
#[derive(Debug, Default, Clone, Copy)]
struct Breaker {
    failures: u32,
    open_until: Option<Instant>,
    /// The probe in flight while open, by its number.
    probing: Option<u64>,
}

/// Leave for one call to a host. If it is the open circuit's probe, the probe
/// is released when this is dropped without [`Admission::record`] (the call's
/// future was cancelled), so the next call may probe: a cancelled probe
/// proves nothing either way.
struct Admission<'a> {
    clients: &'a HostClients,
    address: &'a str,
    probe: Option<u64>,
}

impl Admission<'_> {
    /// Records the call's outcome (which also ends the probe).
    fn record(mut self, transport_ok: bool) {
        self.probe = None;
        self.clients.record(self.address, transport_ok);
    }
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        let Some(id) = self.probe else { return };
        let mut map = lock(&self.clients.breakers);
        if let Some(b) = map.get_mut(self.address) {
            if b.probing == Some(id) {
                b.probing = None;
            }
        }
    }
}

/// Clients of host agents.
#[derive(Debug)]
pub struct HostClients {
    channels: Mutex<HashMap<String, Channel>>,
    breakers: Mutex<HashMap<String, Breaker>>,
    probes: AtomicU64,
    timeout: Duration,
    /// TLS to host agents (each must present `<host-id>.host.agentplane`),
    /// or plaintext under `--insecure`.
    transport: Transport,
    metrics: Arc<Metrics>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl HostClients {
    /// Clients whose calls time out after `timeout` (plus any extra per
    /// call), over `transport`; each call is timed in `metrics`.
    pub fn new(timeout: Duration, transport: Transport, metrics: Arc<Metrics>) -> Self {
        Self {
            channels: Mutex::new(HashMap::new()),
            breakers: Mutex::new(HashMap::new()),
            probes: AtomicU64::new(0),
            timeout,
            transport,
            metrics,
        }
    }

    /// Where calls are counted.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The addresses whose calls fail fast now (circuit open, its next
    /// probe not yet due): what `agentplane_host_breaker_open` shows. A host
    /// nobody calls any more drops out once its open period ends.
    pub fn open_breakers(&self) -> Vec<String> {
        let now = Instant::now();
        lock(&self.breakers)
            .iter()
            .filter(|(_, b)| b.open_until.is_some_and(|until| until > now))
            .map(|(a, _)| a.clone())
            .collect()
    }

    pub(crate) fn channel(&self, host: &HostRecord) -> Result<Channel, ApiError> {
        // The host id is part of the key: with TLS the channel checks that
        // the peer at this address is that host.
        let key = format!("{}@{}", host.id, host.address);
        let mut map = lock(&self.channels);
        if let Some(c) = map.get(&key) {
            return Ok(c.clone());
        }
        let bad = |detail: String| ApiError::HostUnreachable {
            host: host.id.clone(),
            address: host.address.clone(),
            detail,
        };
        let endpoint = match &self.transport {
            Transport::Insecure => Endpoint::from_shared(format!("http://{}", host.address))
                .map_err(|e| bad(format!("bad address: {e}")))?,
            Transport::Tls(tls) => Endpoint::from_shared(format!("https://{}", host.address))
                .map_err(|e| bad(format!("bad address: {e}")))?
                .tls_config(tls.client_config(&tls::host_name(&host.id)))
                .map_err(|e| bad(format!("cannot set up TLS: {e}")))?,
        };
        // Every log stream of every client to this host shares this one
        // connection, and every control call too: see HOST_CONNECTION_WINDOW.
        let channel = endpoint
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .initial_stream_window_size(HOST_STREAM_WINDOW)
            .initial_connection_window_size(HOST_CONNECTION_WINDOW)
            .max_frame_size(agentplane::CLIENT_MAX_FRAME_SIZE)
            .connect_lazy();
        if map.len() >= MAX_CHANNELS {
            map.clear();
        }
        map.insert(key, channel.clone());
        Ok(channel)
    }

    /// Leave for a call now, if the circuit is closed, or open and due for
    /// its one probe; `None`: fail fast.
    fn admit<'a>(&'a self, address: &'a str) -> Option<Admission<'a>> {
        let mut map = lock(&self.breakers);
        let b = map.entry(address.to_owned()).or_default();
        let probe = match b.open_until {
            None => None,
            Some(until) if Instant::now() >= until && b.probing.is_none() => {
                let id = self.probes.fetch_add(1, Ordering::Relaxed);
                b.probing = Some(id);
                Some(id)
            }
            Some(_) => return None,
        };
        Some(Admission {
            clients: self,
            address,
            probe,
        })
    }

    fn record(&self, address: &str, transport_ok: bool) {
        let mut map = lock(&self.breakers);
        let b = map.entry(address.to_owned()).or_default();
        if transport_ok {
            *b = Breaker::default();
            return;
        }
        b.failures += 1;
        b.probing = None;
        if b.failures >= OPEN_AFTER {
            if b.open_until.is_none() {
                tracing::warn!(%address, failures = b.failures, "host circuit opened");
            }
            b.open_until = Some(Instant::now() + OPEN_FOR);
        }
        if map.len() > MAX_CHANNELS {
            map.retain(|_, b| b.failures > 0);
        }
    }

    /// Calls `f` (which makes the RPC `method`) on `host` with the default
    /// deadline plus `extra`. An `idempotent` call is retried once after a
    /// transport failure. The whole call is timed in the metrics.
    pub async fn call<T, F, Fut>(
        &self,
        host: &HostRecord,
        method: HostMethod,
        extra: Duration,
        idempotent: bool,
        f: F,
    ) -> Result<T, ApiError>
    where
        F: Fn(HostAgentClient<Channel>, Duration) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.timed(
            host,
            method,
            self.call_with_retry(host, self.timeout + extra, idempotent, f),
        )
        .await
    }

    /// Calls `f` (the RPC `method`) on `host` once, giving up after
    /// `deadline` (for callers that must answer sooner than the default
    /// deadline allows, such as ListAgentUsage). Timed in the metrics.
    pub async fn call_within<T, F, Fut>(
        &self,
        host: &HostRecord,
        method: HostMethod,
        deadline: Duration,
        f: F,
    ) -> Result<T, ApiError>
    where
        F: Fn(HostAgentClient<Channel>, Duration) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.timed(host, method, self.call_once(host, deadline, &f))
            .await
    }

    /// `call` in a client span named after `method`, timed in the metrics.
    async fn timed<T>(
        &self,
        host: &HostRecord,
        method: HostMethod,
        call: impl Future<Output = Result<T, ApiError>>,
    ) -> Result<T, ApiError> {
        let span = tracing::info_span!(
            "host call",
            otel.name = method.rpc(),
            otel.kind = "client",
            host = %host.id,
        );
        let t = Instant::now();
        let r = call.instrument(span).await;
        self.metrics.host_call(method, &r, t.elapsed());
        r
    }

    async fn call_with_retry<T, F, Fut>(
        &self,
        host: &HostRecord,
        deadline: Duration,
        idempotent: bool,
        f: F,
    ) -> Result<T, ApiError>
    where
        F: Fn(HostAgentClient<Channel>, Duration) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let attempts = if idempotent { 2 } else { 1 };
        let mut last = None;
        for attempt in 0..attempts {
            if attempt > 0 {
                tokio::time::sleep(RETRY_AFTER).await;
            }
            match self.call_once(host, deadline, &f).await {
                Err(e @ ApiError::HostUnreachable { .. }) => last = Some(e),
                other => return other,
            }
        }
        Err(last.unwrap_or_else(|| ApiError::HostUnreachable {
            host: host.id.clone(),
            address: host.address.clone(),
            detail: "no attempt made".into(),
        }))
    }

    async fn call_once<T, F, Fut>(
        &self,
        host: &HostRecord,
        deadline: Duration,
        f: &F,
    ) -> Result<T, ApiError>
    where
        F: Fn(HostAgentClient<Channel>, Duration) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let unreachable = |detail: String| ApiError::HostUnreachable {
            host: host.id.clone(),
            address: host.address.clone(),
            detail,
        };
        let Some(admission) = self.admit(&host.address) else {
            return Err(unreachable(format!(
                "circuit open after {OPEN_AFTER} failed calls; retrying within {OPEN_FOR:?}"
            )));
        };
        let client = HostAgentClient::new(self.channel(host)?);
        let result = match tokio::time::timeout(deadline, f(client, deadline)).await {
            Err(_) => Err(unreachable(format!("no answer within {deadline:?}"))),
            Ok(Ok(r)) => Ok(r.into_inner()),
            // Transport failures (refused, reset, shutting down) come back as
            // UNAVAILABLE, UNKNOWN or CANCELLED: the host cannot act now.
            Ok(Err(s))
                if matches!(
                    s.code(),
                    Code::Unavailable | Code::Unknown | Code::Cancelled
                ) =>
            {
                Err(unreachable(s.message().to_owned()))
            }
            Ok(Err(s)) => Err(ApiError::HostRefused {
                host: host.id.clone(),
                status: s,
            }),
        };
        admission.record(!matches!(result, Err(ApiError::HostUnreachable { .. })));
        result
    }
}

/// A request with a gRPC deadline header, so the host also knows when to give up.
/// It carries the trace context of the host call's span too.
pub fn request<T>(msg: T, deadline: Duration) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(deadline);
    agentplane::telemetry::propagate::inject(r.metadata_mut());
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_circuit_opens_after_repeated_failures_and_lets_one_probe_through() {
        let c = HostClients::new(
            Duration::from_secs(1),
            Transport::Insecure,
            Metrics::unregistered(),
        );
        for _ in 0..OPEN_AFTER {
            c.admit("h:1").expect("closed").record(false);
        }
        assert!(c.admit("h:1").is_none(), "open: fail fast");
        tokio::time::pause();
        tokio::time::advance(OPEN_FOR + Duration::from_millis(1)).await;
        let probe = c.admit("h:1").expect("half-open: one probe");
        assert!(c.admit("h:1").is_none(), "only one probe at a time");
        probe.record(true);
        assert!(c.admit("h:1").is_some(), "closed again after a success");
        assert!(c.admit("other:1").is_some(), "breakers are per host");
    }

    #[tokio::test]
    async fn a_cancelled_probe_does_not_keep_the_circuit_open() {
        tokio::time::pause();
        let c = HostClients::new(
            Duration::from_secs(1),
            Transport::Insecure,
            Metrics::unregistered(),
        );
        let host = HostRecord {
            id: "h1".into(),
            address: "127.0.0.1:9".into(),
            ..Default::default()
        };
        for _ in 0..OPEN_AFTER {
            c.admit(&host.address).expect("closed").record(false);
        }
        tokio::time::advance(OPEN_FOR + Duration::from_millis(1)).await;
        // The probe's call never answers, and its caller goes away first (a
        // client's Ctrl-C, the caller's own deadline): its future is dropped.
        let hang = |_client, _deadline| std::future::pending::<Result<tonic::Response<()>, _>>();
        let cancelled = tokio::time::timeout(
            Duration::from_millis(10),
            c.call(&host, HostMethod::StopAgent, Duration::ZERO, false, hang),
        )
        .await;
        assert!(
            cancelled.is_err(),
            "the probe was still in flight when dropped"
        );
        tokio::time::advance(OPEN_FOR).await;
        let probe = c
            .admit(&host.address)
            .expect("another probe once the cancelled one is gone");
        assert!(
            c.admit(&host.address).is_none(),
            "still one probe at a time"
        );
        drop(probe);
        assert!(
            c.admit(&host.address).is_some(),
            "a dropped leave frees the probe"
        );
    }
}
