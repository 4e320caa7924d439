//! GetAgent's helpers, LocateAgent and ListAgents (paged over the narrowest
//! index, filtered).

use agentplane::labels::Selector;
use agentplane::proto::v1::{
    Agent, AgentState, ListAgentsRequest, ListAgentsResponse, LocateAgentResponse,
};
use agentplane::registry::AgentIndex;
use agentplane::validate::{self, ValidationError};

use super::AgentApi;
use crate::auth::Caller;
use crate::error::ApiError;

/// Page size when the request gives none.
const DEFAULT_PAGE: u32 = 100;
/// Largest page size honoured.
const MAX_PAGE: u32 = 1000;

/// Where a listing goes on, as its page token says: `a{id}` after that id
/// in an index (id order), `c{cursor}` an `SSCAN` cursor of a host's set.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    /// The first page.
    Start,
    /// After this id (an index listing).
    After(String),
    /// This `SSCAN` cursor (a listing of one host's agents).
    Cursor(u64),
}

impl Token {
    /// The token's text (`""` for the first page: nothing more).
    fn encode(&self) -> String {
        match self {
            Self::Start => String::new(),
            Self::After(id) => format!("a{id}"),
            Self::Cursor(c) => format!("c{c}"),
        }
    }

    /// Decodes a page token; anything this server did not issue is invalid.
    fn parse(token: &str) -> Result<Self, ValidationError> {
        if token.is_empty() {
            return Ok(Self::Start);
        }
        let parsed = if let Some(id) = token.strip_prefix('a') {
            agentplane::ids::is_agent_id(id).then(|| Self::After(id.to_owned()))
        } else if let Some(c) = token.strip_prefix('c') {
            c.parse().ok().filter(|c| *c != 0).map(Self::Cursor)
        } else {
            None
        };
        parsed.ok_or_else(invalid_token)
    }
}

fn invalid_token() -> ValidationError {
    ValidationError::new(
        "page_token",
        "is not a token this server issued: pass next_page_token back unchanged",
    )
}

impl AgentApi {
    pub(super) async fn locate(&self, id: &str) -> Result<LocateAgentResponse, ApiError> {
        validate::agent_id("id", id)?;
        let Some(found) = self.registry.locate(id).await? else {
            return Err(ApiError::AgentNotFound { id: id.to_owned() });
        };
        let live = found.live();
        let agent = found.agent;
        Ok(LocateAgentResponse {
            id: agent.id.clone(),
            address: found.address.unwrap_or_default(),
            live,
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
        let token = Token::parse(&req.page_token)?;
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
        let (agents, next) = if req.host.is_empty() {
            let after = match token {
                Token::Start => String::new(),
                Token::After(id) => id,
                Token::Cursor(_) => return Err(invalid_token().into()),
            };
            let index = self.narrowest_index(state, &selector).await?;
            self.page_of_index(&index, after, page_size, keep).await?
        } else {
            let cursor = match token {
                Token::Start => 0,
                Token::Cursor(c) => c,
                Token::After(_) => return Err(invalid_token().into()),
            };
            self.page_of_host(&req.host, cursor, page_size, keep)
                .await?
        };
        Ok(ListAgentsResponse {
            agents,
            next_page_token: next.encode(),
        })
    }

    /// The index that holds the fewest ids among those every match is in:
    /// the state's and each selector term's (every agent's when neither).
    async fn narrowest_index(
        &self,
        state: AgentState,
        selector: &Selector,
    ) -> Result<AgentIndex, ApiError> {
        let mut candidates: Vec<AgentIndex> = selector
            .terms()
            .iter()
            .map(|(k, v)| AgentIndex::Label(k.clone(), v.clone()))
            .collect();
        if state != AgentState::Unspecified {
            candidates.push(AgentIndex::State(state));
        }
        if candidates.len() <= 1 {
            return Ok(candidates.pop().unwrap_or(AgentIndex::All));
        }
        let sizes = self.registry.index_sizes(&candidates).await?;
        Ok(candidates
            .into_iter()
            .zip(sizes)
            .min_by_key(|(_, n)| *n)
            .map_or(AgentIndex::All, |(i, _)| i))
    }

    /// Up to `page_size` agents that `keep` takes, in id order, from
    /// `index` after `after`; and where the next page starts. Entries
    /// whose record is gone (or, in a state index, moved on) are dropped
    /// from the index on the way.
    async fn page_of_index(
        &self,
        index: &AgentIndex,
        mut after: String,
        page_size: usize,
        keep: impl Fn(&Agent) -> bool,
    ) -> Result<(Vec<Agent>, Token), ApiError> {
        let mut agents = Vec::new();
        loop {
            let ids = self
                .registry
                .page_agent_ids(index, &after, page_size)
                .await?;
            let more = ids.len() == page_size;
            let read = self.registry.get_agents(&ids).await?;
            let stale: Vec<String> = {
                let found: std::collections::HashMap<&str, &Agent> =
                    read.iter().map(|a| (a.id.as_str(), a)).collect();
                ids.iter()
                    .filter(|id| match (found.get(id.as_str()), index) {
                        (None, _) => true,
                        (Some(a), AgentIndex::State(s)) => a.state() != *s,
                        _ => false,
                    })
                    .cloned()
                    .collect()
            };
            self.registry.drop_stale(index, &stale).await?;
            for a in read {
                after.clone_from(&a.id);
                if keep(&a) {
                    agents.push(a);
                    if agents.len() == page_size {
                        return Ok((agents, Token::After(after)));
                    }
                }
            }
            if !more {
                return Ok((agents, Token::Start));
            }
            after = ids.last().cloned().unwrap_or_default();
        }
    }

    /// Up to about `page_size` agents of `host` that `keep` takes, from an
    /// `SSCAN` of its set (unordered; each page sorted by id).
    async fn page_of_host(
        &self,
        host: &str,
        mut cursor: u64,
        page_size: usize,
        keep: impl Fn(&Agent) -> bool,
    ) -> Result<(Vec<Agent>, Token), ApiError> {
        let mut agents = Vec::new();
        loop {
            let (next, ids) = self
                .registry
                .scan_host_agent_ids(host, cursor, page_size)
                .await?;
            agents.extend(
                self.registry
                    .get_agents(&ids)
                    .await?
                    .into_iter()
                    .filter(|a| keep(a)),
            );
            cursor = next;
            if cursor == 0 || agents.len() >= page_size {
                break;
            }
        }
        agents.sort_by(|a, b| a.id.cmp(&b.id));
        let next = if cursor == 0 {
            Token::Start
        } else {
            Token::Cursor(cursor)
        };
        Ok((agents, next))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_garbage_is_invalid() {
        for t in [
            Token::Start,
            Token::Cursor(42),
            Token::After("01jd0000000000000000000000".into()),
        ] {
            assert_eq!(Token::parse(&t.encode()).unwrap(), t);
        }
        assert_eq!(Token::parse("zzz").unwrap_err().field, "page_token");
        assert!(Token::parse("c0").is_err());
        assert!(Token::parse("anot-an-id").is_err());
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn any_page_token_decodes_or_names_page_token(
                t in prop_oneof![any::<String>(), "[ac]?[+-]?[0-9a-z]{0,28}", "c[0-9a-z ]{0,6}"],
            ) {
                match Token::parse(&t) {
                    Ok(tok) => prop_assert!(t.is_empty() == (tok == Token::Start)),
                    Err(e) => prop_assert_eq!(e.field, "page_token"),
                }
            }

            #[test]
            fn every_token_round_trips(c in 1..u64::MAX, id in "[0-9a-hjkmnp-tv-z]{26}") {
                prop_assert_eq!(Token::parse(&Token::Cursor(c).encode()).unwrap(), Token::Cursor(c));
                let after = Token::After(id);
                prop_assert_eq!(Token::parse(&after.encode()).unwrap(), after);
            }
        }
    }
}
