//! Calls to host agents: one lazily-connected channel per address (a bounded
//! cache), a deadline on every call, one retry for idempotent calls, a
//! per-host circuit breaker, and errors that name the host.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use agentplane::proto::v1::host_agent_client::HostAgentClient;
use agentplane::registry::HostRecord;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

use crate::error::ApiError;

/// Most cached channels; past it the cache is emptied and refilled on demand.
const MAX_CHANNELS: usize = 1024;
/// Consecutive transport failures that open a host's circuit.
const OPEN_AFTER: u32 = 3;
/// How long an open circuit fails fast before one probe is let through.
const OPEN_FOR: Duration = Duration::from_secs(2);
/// HTTP/2 flow-control window per stream on host connections: what one log
/// stream whose client stalls may hold in this process.
const HOST_STREAM_WINDOW: u32 = 128 * 1024;
/// HTTP/2 window per host connection. It is credit, not memory: what is held
/// is at most the stalled streams' windows. The receiver re-opens the window
/// only once half of it was read, so stalled streams must never hold half of
/// it, or every call to the host would wait (with hyper's 5 MiB default, three
/// stalled `logs -f` did that). Host agents cap their streams below that.
const HOST_CONNECTION_WINDOW: u32 = 1 << 30;
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
    probing: bool,
}

/// Clients of host agents.
#[derive(Debug)]
pub struct HostClients {
    channels: Mutex<HashMap<String, Channel>>,
    breakers: Mutex<HashMap<String, Breaker>>,
    timeout: Duration,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl HostClients {
    /// Clients whose calls time out after `timeout` (plus any extra per call).
    pub fn new(timeout: Duration) -> Self {
        Self {
            channels: Mutex::new(HashMap::new()),
            breakers: Mutex::new(HashMap::new()),
            timeout,
        }
    }

    pub(crate) fn channel(&self, host: &HostRecord) -> Result<Channel, ApiError> {
        let mut map = lock(&self.channels);
        if let Some(c) = map.get(&host.address) {
            return Ok(c.clone());
        }
        let endpoint = Endpoint::from_shared(format!("http://{}", host.address)).map_err(|e| {
            ApiError::HostUnreachable {
                host: host.id.clone(),
                address: host.address.clone(),
                detail: format!("bad address: {e}"),
            }
        })?;
        // Every log stream of every client to this host shares this one
        // connection, and every control call too: see HOST_CONNECTION_WINDOW.
        let channel = endpoint
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .initial_stream_window_size(HOST_STREAM_WINDOW)
            .initial_connection_window_size(HOST_CONNECTION_WINDOW)
            .connect_lazy();
        if map.len() >= MAX_CHANNELS {
            map.clear();
        }
        map.insert(host.address.clone(), channel.clone());
        Ok(channel)
    }

    /// Whether a call may go out now: closed, or open and due for its one probe.
    fn admit(&self, address: &str) -> bool {
        let mut map = lock(&self.breakers);
        let b = map.entry(address.to_owned()).or_default();
        match b.open_until {
            None => true,
            Some(until) if Instant::now() >= until && !b.probing => {
                b.probing = true;
                true
            }
            Some(_) => false,
        }
    }

    fn record(&self, address: &str, transport_ok: bool) {
        let mut map = lock(&self.breakers);
        let b = map.entry(address.to_owned()).or_default();
        if transport_ok {
            *b = Breaker::default();
            return;
        }
        b.failures += 1;
        b.probing = false;
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

    /// Calls `f` on `host` with the default deadline plus `extra`. An
    /// `idempotent` call is retried once after a transport failure.
    pub async fn call<T, F, Fut>(
        &self,
        host: &HostRecord,
        extra: Duration,
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
            match self.call_once(host, extra, &f).await {
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
        extra: Duration,
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
        if !self.admit(&host.address) {
            return Err(unreachable(format!(
                "circuit open after {OPEN_AFTER} failed calls; retrying within {OPEN_FOR:?}"
            )));
        }
        let client = HostAgentClient::new(self.channel(host)?);
        let deadline = self.timeout + extra;
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
        self.record(
            &host.address,
            !matches!(result, Err(ApiError::HostUnreachable { .. })),
        );
        result
    }
}

/// A request with a gRPC deadline header, so the host also knows when to give up.
pub fn request<T>(msg: T, deadline: Duration) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(deadline);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_circuit_opens_after_repeated_failures_and_lets_one_probe_through() {
        let c = HostClients::new(Duration::from_secs(1));
        for _ in 0..OPEN_AFTER {
            assert!(c.admit("h:1"));
            c.record("h:1", false);
        }
        assert!(!c.admit("h:1"), "open: fail fast");
        tokio::time::pause();
        tokio::time::advance(OPEN_FOR + Duration::from_millis(1)).await;
        assert!(c.admit("h:1"), "half-open: one probe");
        assert!(!c.admit("h:1"), "only one probe at a time");
        c.record("h:1", true);
        assert!(c.admit("h:1"), "closed again after a success");
        assert!(c.admit("other:1"), "breakers are per host");
    }
}
