//! GetAgent's helpers, LocateAgent and ListAgents (SCAN-paged, filtered).

use agentplane::labels::Selector;
use agentplane::proto::v1::{
    Agent, AgentState, ListAgentsRequest, ListAgentsResponse, LocateAgentResponse,
};
use agentplane::validate::{self, ValidationError};

use super::AgentApi;
use crate::auth::Caller;
use crate::error::ApiError;

/// Page size when the request gives none.
const DEFAULT_PAGE: u32 = 100;
/// Largest page size honoured.
const MAX_PAGE: u32 = 1000;

/// Encodes a SCAN cursor as a page token.
fn token(cursor: u64) -> String {
    if cursor == 0 {
        String::new()
    } else {
        format!("c{cursor}")
    }
}

/// Decodes a page token into a SCAN cursor.
fn cursor(token: &str) -> Result<u64, ValidationError> {
    if token.is_empty() {
        return Ok(0);
    }
    token
        .strip_prefix('c')
        .and_then(|c| c.parse().ok())
        .filter(|c| *c != 0)
        .ok_or_else(|| {
            ValidationError::new(
                "page_token",
                "is not a token this server issued: pass next_page_token back unchanged",
            )
        })
}

impl AgentApi {
    pub(super) async fn locate(&self, id: &str) -> Result<LocateAgentResponse, ApiError> {
        let agent = self.agent(id).await?;
        let (host, loc) = tokio::try_join!(
            self.registry.get_host(&agent.host),
            self.registry.location(id)
        )?;
        Ok(LocateAgentResponse {
            id: agent.id.clone(),
            address: host.map(|h| h.address).unwrap_or_default(),
            live: loc.as_deref() == Some(agent.host.as_str()),
            state: agent.state,
            pid: agent.pid,
            generation: agent.generation,
            host: agent.host,
        })
    }

    /// A page of the agents `caller` may see that match `req`: filtered
    /// while the page fills, so a caller limited to a selector gets full
    /// pages too.
    pub(super) async fn list(
        &self,
        req: ListAgentsRequest,
        caller: &Caller,
    ) -> Result<ListAgentsResponse, ApiError> {
        let page_size = match req.page_size {
            0 => DEFAULT_PAGE,
            n => n.min(MAX_PAGE),
        } as usize;
        let mut cur = cursor(&req.page_token)?;
        if !req.host.is_empty() {
            validate::host_id("host", &req.host)?;
        }
        let selector = Selector::parse("label_selector", &req.label_selector)?;
        let state = req.state();
        let keep = |a: &Agent| {
            caller.sees(a)
                && (state == AgentState::Unspecified || a.state() == state)
                && (selector.is_empty()
                    || selector.matches(
                        &a.spec
                            .as_ref()
                            .map(|s| s.labels.clone())
                            .unwrap_or_default(),
                    ))
        };
        let mut agents = Vec::new();
        loop {
            let (next, ids) = if req.host.is_empty() {
                self.registry.scan_agent_ids(cur, page_size).await?
            } else {
                self.registry
                    .scan_host_agent_ids(&req.host, cur, page_size)
                    .await?
            };
            agents.extend(
                self.registry
                    .get_agents(&ids)
                    .await?
                    .into_iter()
                    .filter(|a| keep(a)),
            );
            cur = next;
            if cur == 0 || agents.len() >= page_size {
                break;
            }
        }
        agents.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(ListAgentsResponse {
            agents,
            next_page_token: token(cur),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_garbage_is_invalid() {
        assert_eq!(cursor(&token(0)).unwrap(), 0);
        assert_eq!(cursor(&token(42)).unwrap(), 42);
        assert_eq!(cursor("zzz").unwrap_err().field, "page_token");
        assert!(cursor("c0").is_err());
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn any_page_token_decodes_or_names_page_token(
                t in prop_oneof![any::<String>(), "c?[+-]?[0-9]{0,22}", "c[0-9a-z ]{0,6}"],
            ) {
                match cursor(&t) {
                    Ok(c) => prop_assert!(t.is_empty() == (c == 0)),
                    Err(e) => prop_assert_eq!(e.field, "page_token"),
                }
            }

            #[test]
            fn every_cursor_round_trips_through_its_token(c in any::<u64>()) {
                prop_assert_eq!(cursor(&token(c)).unwrap(), c);
            }
        }
    }
}
