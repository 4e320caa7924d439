//! At most one copy: agents whose spec sets `stop_after_disconnect` are
//! stopped by their host once its heartbeat could not renew their leases for
//! that long (the control plane waits that long, plus the grace, after the
//! lease expired before it starts a replacement).

use std::sync::Arc;
use std::time::Duration;

use agentplane::time::duration_from_proto;

use super::agent::Requested;
use super::Supervisor;

impl Supervisor {
    /// Called while heartbeats fail: `unrenewed` is how long ago the last
    /// one succeeded. Each agent past its `stop_after_disconnect` is stopped
    /// once (SIGTERM, its grace, SIGKILL; reason DISCONNECTED), in a task of
    /// its own.
    pub fn stop_disconnected(self: &Arc<Self>, unrenewed: Duration) {
        let due: Vec<String> = self
            .map()
            .values()
            .filter(|slot| {
                let Some(limit) = slot.spec.stop_after_disconnect.as_ref() else {
                    return false;
                };
                if unrenewed < duration_from_proto(limit) || !slot.is_active() {
                    return false;
                }
                let mut st = slot.status();
                if st.requested.is_some_and(Requested::ends_agent) {
                    return false;
                }
                st.requested = Some(Requested::Disconnected);
                true
            })
            .map(|slot| slot.id.clone())
            .collect();
        for id in due {
            tracing::warn!(agent = %id, ?unrenewed, "lease not renewed for its stop_after_disconnect: stopping the agent");
            let sup = self.clone();
            self.tasks.spawn("disconnect stop", async move {
                if let Err(e) = sup.stop_as(&id, None, Requested::Disconnected).await {
                    tracing::warn!(agent = %id, error = %e, "disconnect stop failed");
                }
            });
        }
    }
}
