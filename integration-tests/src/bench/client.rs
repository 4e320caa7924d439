//! The client side of bench-fleet: LocateAgent and ListAgents latencies,
//! one call at a time from a thread and runtime of their own, beside a
//! plain Redis GET of each located agent's lease.

use std::time::{Duration, Instant};

use agentplane::proto::v1::agent_service_client::AgentServiceClient;
use agentplane::proto::v1::{ListAgentsRequest, LocateAgentRequest};
use agentplane::registry::Keys;

/// Sorted latencies measured by [`latencies`].
#[derive(Debug)]
pub struct Latencies {
    /// LocateAgent calls.
    pub locates: Vec<Duration>,
    /// A plain Redis GET of each located agent's lease, beside its locate.
    pub gets: Vec<Duration>,
    /// ListAgents pages of 100.
    pub pages: Vec<Duration>,
    /// Of the locates over 1 ms, how many had their GET (just before,
    /// same client) over 0.5 ms too: a tail that Redis or the machine
    /// shares, rather than the control plane's own.
    pub slow_locates: (usize, usize),
}

/// Sorted latencies of a LocateAgent of each of `ids`, then of `pages`
/// ListAgents pages of 100 walking the fleet, one call at a time, on a
/// thread and runtime of their own.
pub fn latencies(
    endpoint: String,
    redis_url: String,
    ids: Vec<String>,
    pages: usize,
) -> anyhow::Result<Latencies> {
    let worker = std::thread::spawn(move || -> anyhow::Result<Latencies> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let mut client = AgentServiceClient::connect(endpoint).await?;
            let mut redis = redis::Client::open(redis_url)?
                .get_multiplexed_async_connection()
                .await?;
            let keys = Keys::new("ap");
            let mut locates = Vec::with_capacity(ids.len());
            let mut gets = Vec::with_capacity(ids.len());
            for id in ids {
                // The same agent's lease straight from Redis: Redis's own
                // share of the locate's time, seen by the same client.
                let t = Instant::now();
                let _: Option<String> = redis::cmd("GET")
                    .arg(keys.loc(&id))
                    .query_async(&mut redis)
                    .await?;
                gets.push(t.elapsed());
                let t = Instant::now();
                client.locate_agent(LocateAgentRequest { id }).await?;
                locates.push(t.elapsed());
            }
            let slow = locates
                .iter()
                .zip(&gets)
                .filter(|(l, _)| **l > Duration::from_millis(1));
            let slow_locates = slow.clone().fold((0, 0), |(n, shared), (_, g)| {
                (n + 1, shared + usize::from(*g > Duration::from_micros(500)))
            });
            locates.sort();
            gets.sort();
            let mut took = Vec::with_capacity(pages);
            let mut token = String::new();
            for _ in 0..pages {
                let t = Instant::now();
                let page = client
                    .list_agents(ListAgentsRequest {
                        page_size: 100,
                        page_token: token.clone(),
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                took.push(t.elapsed());
                anyhow::ensure!(page.agents.len() == 100, "a short page inside the fleet");
                token = page.next_page_token;
            }
            took.sort();
            Ok(Latencies {
                locates,
                gets,
                pages: took,
                slow_locates,
            })
        })
    });
    worker
        .join()
        .map_err(|_| anyhow::anyhow!("the latency thread panicked"))?
}
