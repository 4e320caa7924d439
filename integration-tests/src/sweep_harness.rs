//! The control plane's record sweep driven by hand (as `bench-sweep` and
//! the sweep tests do), over one host key written bare: no live-hosts
//! index entry and an hour's TTL, read back by id as the sweep's live hosts.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use agentplane::registry::{HostRecord, Registry};
use agentplane_control_plane::hosts::HostClients;
use agentplane_control_plane::sweep::Sweep;

/// Writes host `id`'s key bare (an hour's TTL, a 10 s heartbeat TTL in it)
/// and returns the live hosts as a reconcile pass would hand them to the
/// sweep (that host), and a sweep over `registry` whose rounds start back
/// to back and whose unconfirmed starts are retried after `confirm_within`.
pub async fn bare_host_sweep(
    registry: &Registry,
    conn: &mut redis::aio::MultiplexedConnection,
    id: &str,
    confirm_within: Duration,
) -> anyhow::Result<(HashMap<String, HostRecord>, Sweep)> {
    let key = format!("ap:host:{id}");
    let fields = [
        ("id", id),
        ("address", "127.0.0.1:1"),
        ("capacity", "1000000"),
        ("ttl_ms", "10000"),
        ("incarnation", "bare"),
    ];
    redis::pipe()
        .hset_multiple(&key, &fields)
        .ignore()
        .pexpire(&key, 3_600_000)
        .ignore()
        .query_async::<()>(conn)
        .await?;
    let live: HashMap<_, _> = registry
        .get_host(id)
        .await?
        .into_iter()
        .map(|h| (h.id.clone(), h))
        .collect();
    anyhow::ensure!(live.len() == 1, "host {id} is not read back as live");
    let hosts = Arc::new(HostClients::new(
        Duration::from_secs(5),
        agentplane::server::Transport::Insecure,
        agentplane_control_plane::metrics::Metrics::unregistered(),
    ));
    let sweep = Sweep::new(registry.clone(), hosts, confirm_within).with_min_round(Duration::ZERO);
    Ok((live, sweep))
}
