//! ListAgentUsage: every live host (or one) asked at once, with a bound on
//! the calls in flight, for its agents' usage sampled now. A host that does
//! not answer within two seconds is named, not fatal: `agentctl top` shows
//! the rest.

use agentplane::proto::v1::{
    AgentUsage, HostListAgentsRequest, ListAgentUsageRequest, ListAgentUsageResponse,
};
use futures::StreamExt;

use super::AgentApi;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::hosts::{request, HostMethod};

/// Hosts asked at once.
const FAN_OUT: usize = 32;
/// How long one host may take to sample its agents; past it, it is named
/// in `unreachable_hosts`. One try: a dashboard refreshing every few seconds
/// must not wait out a hung host twice.
const HOST_DEADLINE: std::time::Duration = std::time::Duration::from_secs(2);

impl AgentApi {
    pub(super) async fn usage(
        &self,
        req: ListAgentUsageRequest,
        caller: &Caller,
    ) -> Result<ListAgentUsageResponse, ApiError> {
        let hosts = self.live_hosts.get(false).await?;
        let asked: Vec<_> = hosts
            .iter()
            .filter(|h| req.host.is_empty() || h.id == req.host)
            .cloned()
            .collect();
        let answers: Vec<(String, Result<Vec<AgentUsage>, ApiError>)> =
            futures::stream::iter(asked)
                .map(|host| async move {
                    let answer = self
                        .hosts
                        .call_within(
                            &host,
                            HostMethod::ListAgents,
                            HOST_DEADLINE,
                            |mut c, d| async move {
                                c.list_agents(request(HostListAgentsRequest { usage: true }, d))
                                    .await
                            },
                        )
                        .await
                        .map(|r| {
                            r.agents
                                .into_iter()
                                .filter_map(|a| a.usage.map(|u| *u))
                                .collect()
                        });
                    (host.id, answer)
                })
                .buffer_unordered(FAN_OUT)
                .collect()
                .await;
        let mut out = ListAgentUsageResponse::default();
        for (host, answer) in answers {
            match answer {
                Ok(usage) => out.usage.extend(usage),
                Err(e) => {
                    tracing::debug!(%host, error = %e, "no usage from a host");
                    out.unreachable_hosts.push(host);
                }
            }
        }
        if caller.restricted() {
            // Only what the caller's selector lets it see, by the records.
            let ids: Vec<String> = out.usage.iter().map(|u| u.id.clone()).collect();
            let seen: std::collections::HashSet<String> = self
                .registry
                .get_agents(&ids)
                .await?
                .into_iter()
                .filter(|a| caller.sees(a))
                .map(|a| a.id)
                .collect();
            out.usage.retain(|u| seen.contains(&u.id));
        }
        out.usage.sort_by(|a, b| a.id.cmp(&b.id));
        out.unreachable_hosts.sort();
        Ok(out)
    }
}
