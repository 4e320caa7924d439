//! Agent leases: the location key (`ap:loc:{id}`) naming the host whose
//! heartbeat keeps it alive, how long it lives and how often it is renewed.

use std::time::Duration;

use redis::AsyncCommands;

use super::{Registry, Result};

/// An agent's location: the host whose heartbeat keeps it alive.
#[derive(Debug, Clone)]
pub struct Location {
    /// The host running it.
    pub host: String,
    /// The host's heartbeat TTL: the lease lives [`lease_ttl`] of it
    /// unless the host's heartbeat renews it.
    pub host_ttl: Duration,
}

impl Registry {
    /// Removes the agent's location if it still names `host` (after a
    /// reschedule it names the new host, which must keep it).
    pub async fn clear_location(&self, id: &str, host: &str) -> Result<()> {
        self.release("clear agent location", &self.keys().loc(id), host)
            .await
    }

    /// The host whose heartbeat keeps the agent's location alive, if any.
    pub async fn location(&self, id: &str) -> Result<Option<String>> {
        self.conn()
            .get(self.keys().loc(id))
            .await
            .map_err(self.err("read agent location"))
    }
}

/// Every how many heartbeats a host extends an agent's lease: each beat
/// extends the leases of a third of its agents (by the sum of the id's
/// bytes), so Redis serves a third of the renewals it would at every beat.
/// At 100k agents the extends were 30k commands a second at every beat
/// (43 % of Redis's rest samples were their key lookups), 15k at every
/// other, and were still its costliest command (2.4 µs each, 0.036 cores).
/// The lease lives as many host TTLs (see [`lease_ttl`]), so it still
/// outlives two missed renewals, as it did when every beat renewed a lease
/// that lived one TTL; a host that stops renewing one lease is found out a
/// TTL later than with two (the lease lapses three TTLs after its last
/// renewal).
pub const LEASE_RENEW_EVERY: u32 = 3;

/// How long an agent's lease (`ap:loc:{id}`) lives unless renewed, for a
/// host whose heartbeat TTL is `host_ttl` (the host beats every third of
/// it). Liveness stays bounded by the host's TTL: LocateAgent's `live`
/// also needs the host key, and the failover releases the leases of a lost
/// host's agents (`mark_lost`) instead of waiting for them to lapse.
pub fn lease_ttl(host_ttl: Duration) -> Duration {
    host_ttl.saturating_mul(LEASE_RENEW_EVERY)
}

/// A TTL in whole milliseconds, at least 1.
pub(super) fn ttl_ms(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
}
