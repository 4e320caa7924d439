//! The live hosts as placement sees them: read from the registry's index of
//! live hosts at most once per [`fresh_for`] however many spawns ask (one
//! read serves every spawn waiting for it), so a burst of spawns does not
//! read every host record once per spawn; and the round-robin position.
//!
//! A view serves for [`FRESH_FOR`], or 1 ms per host in it when that is
//! longer (at most [`STALEST`]): a burst of spawns then reads at most
//! ~1,000 host records a second up to 2,000 hosts, instead of a read cost
//! that grows with the fleet (at 1,000 hosts and a read every 200 ms,
//! reading and decoding the view was 3 % of the control plane's samples
//! over a 12 s profile that held a 10,000-spawn burst). The records' own
//! figures (`running`) are up to a heartbeat period (TTL/3) old anyway.
//!
//! A cached view may be up to [`fresh_for`] old, on top of the heartbeat's
//! own age: a host that died meanwhile refuses the start and the next
//! candidate is asked (as for any failed start); a host that registered
//! meanwhile is found by the one forced re-read that a placement which found
//! no host makes; a cordon or drain through this replica forgets the view.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use agentplane::registry::{HostRecord, Registry, RegistryError};
use tokio::sync::Mutex;
use tokio::time::Instant;

/// How long one read of the live hosts serves placement, at the least.
pub const FRESH_FOR: Duration = Duration::from_millis(200);

/// The longest a view serves placement, however many hosts it holds.
pub const STALEST: Duration = Duration::from_secs(2);

/// How long a view of `hosts` live hosts serves placement: [`FRESH_FOR`],
/// or 1 ms per host when that is longer, at most [`STALEST`].
pub fn fresh_for(hosts: usize) -> Duration {
    let per_host = Duration::from_millis(u64::try_from(hosts).unwrap_or(u64::MAX));
    per_host.clamp(FRESH_FOR, STALEST)
}

/// The cached view and the round-robin position of one replica.
#[derive(Debug)]
pub struct LiveHosts {
    registry: Registry,
    /// When the view was read, and the view. Locked across the read, so
    /// that callers arriving meanwhile wait for it instead of reading too.
    view: Mutex<Option<(Instant, Arc<Vec<HostRecord>>)>>,
    /// Replicas start at random places, so that they spread their spawns
    /// without sharing a counter.
    next: AtomicU64,
}

impl LiveHosts {
    /// An empty view over `registry`.
    pub fn new(registry: Registry) -> Self {
        Self {
            registry,
            view: Mutex::new(None),
            next: AtomicU64::new(rand::random()),
        }
    }

    /// The live hosts, read at most [`FRESH_FOR`] ago (`reread`: now).
    pub async fn get(&self, reread: bool) -> Result<Arc<Vec<HostRecord>>, RegistryError> {
        let mut view = self.view.lock().await;
        if let Some((at, hosts)) = view.as_ref() {
            if !reread && at.elapsed() < fresh_for(hosts.len()) {
                return Ok(hosts.clone());
            }
        }
        let hosts = Arc::new(self.registry.list_hosts().await?);
        *view = Some((Instant::now(), hosts.clone()));
        Ok(hosts)
    }

    /// Drops the view: this replica changed a host record (cordon, drain).
    pub async fn forget(&self) {
        *self.view.lock().await = None;
    }

    /// The next round-robin position.
    pub fn next_round_robin(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_view_serves_200_ms_or_1_ms_per_host_up_to_2_s() {
        assert_eq!(fresh_for(0), FRESH_FOR);
        assert_eq!(fresh_for(100), FRESH_FOR);
        assert_eq!(fresh_for(1000), Duration::from_secs(1));
        assert_eq!(fresh_for(5000), STALEST);
    }
}
