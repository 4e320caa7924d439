//! The live hosts as placement sees them: read from the registry's index of
//! live hosts at most once per [`FRESH_FOR`] however many spawns ask (one
//! read serves every spawn waiting for it), so a burst of spawns does not
//! read every host record once per spawn; and the round-robin position.
//!
//! A cached view may be up to [`FRESH_FOR`] old, on top of the heartbeat's
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

/// How long one read of the live hosts serves placement.
pub const FRESH_FOR: Duration = Duration::from_millis(200);

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
            if !reread && at.elapsed() < FRESH_FOR {
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
