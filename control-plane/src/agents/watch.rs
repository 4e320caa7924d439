//! WatchAgents: the event stream, read from Redis on a connection of its own,
//! resumable from any replica with the last token. A token whose following
//! events were trimmed from the bounded stream is refused with OUT_OF_RANGE
//! (when the watch opens, and when a reader that fell behind finds the gap),
//! never resumed silently at the oldest retained event.

use agentplane::proto::v1::{Event, EventType, WatchAgentsRequest};
use agentplane::registry::ReadError;
use agentplane::validate::{self, ValidationError};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use super::AgentApi;
use crate::error::ApiError;
use crate::quota::Held;

/// Most watch streams one replica serves at once.
pub const MAX_WATCHERS: u64 = 1024;
/// Events buffered per watcher before the reader waits for the client.
const BUFFER: usize = 256;
/// Events per stream read. Far below the stream's bound, so a read that
/// crosses a trimmed gap always comes back full (every retained event is
/// after the gap): only full reads need the trim check (the reader's).
const BATCH: usize = 256;

/// The stream type of WatchAgents.
pub type WatchStream = ReceiverStream<Result<Event, Status>>;

/// Checks a resume token's form: a Redis stream id (`ms-seq`), several
/// comma-separated (one per stream, with Redis Cluster), or `0`. Whether
/// the count fits the registry's streams is the reader's to say.
fn token(t: &str) -> Result<(), ValidationError> {
    // A position of `0`: that stream from its oldest retained event (a
    // watch from "0" that has seen nothing of it yet).
    let id = |p: &str| {
        p == "0"
            || p.split_once('-')
                .is_some_and(|(a, b)| a.parse::<u64>().is_ok() && b.parse::<u64>().is_ok())
    };
    let ok = t == "0" || (t.len() <= 4096 && t.split(',').all(id));
    if ok {
        Ok(())
    } else {
        Err(ValidationError::new(
            "resume_token",
            format!(
                "`{}` is not an event token (like 1700000000000-0)",
                validate::quote(t)
            ),
        ))
    }
}

impl AgentApi {
    /// A watch stream; it holds `held` (its token's place) and one of this
    /// replica's places until it ends.
    pub(super) async fn watch(
        &self,
        req: WatchAgentsRequest,
        held: Held,
    ) -> Result<WatchStream, ApiError> {
        if !req.resume_token.is_empty() {
            token(&req.resume_token)?;
        }
        if !req.agent_id.is_empty() {
            validate::agent_id("agent_id", &req.agent_id)?;
        }
        let slot = self
            .watchers
            .try_hold(MAX_WATCHERS)
            .ok_or_else(|| ApiError::NoCapacity {
                detail: format!("this replica already serves {MAX_WATCHERS} watch streams"),
            })?;
        let mut reader = self.registry.event_reader().await?;
        let after = if req.resume_token.is_empty() {
            reader
                .last_token()
                .await
                .map_err(|e| self.registry.event_error(e))?
        } else {
            reader.positions(&req.resume_token).map_err(|reason| {
                ValidationError::new(
                    "resume_token",
                    format!(
                        "`{}` is not an event token: {reason}",
                        validate::quote(&req.resume_token)
                    ),
                )
            })?;
            req.resume_token.clone()
        };
        // "0" asks for the oldest retained events, and "from now" was just
        // read from the streams' ends: no gap can matter to either.
        if !req.resume_token.is_empty() && after != "0" {
            if let Some(before) = reader
                .gap_after(&after)
                .await
                .map_err(|e| self.registry.event_error(e))?
            {
                return Err(ApiError::EventsTrimmed {
                    token: after,
                    before,
                });
            }
        }
        reader.start(&after, BATCH);
        let (tx, rx) = mpsc::channel(BUFFER);
        let bookmark = Event {
            token: after,
            r#type: EventType::Bookmark as i32,
            ..Default::default()
        };
        // Cannot fail: the channel is new and has room.
        let _ = tx.try_send(Ok(bookmark));
        let registry = self.registry.clone();
        let cancel = self.cancel.clone();
        let filter = req.agent_id;
        self.tasks.spawn("watch stream", async move {
            let _places = (slot, held);
            loop {
                let read = tokio::select! {
                    () = tx.closed() => return,
                    () = cancel.cancelled() => {
                        let _ = tx.send(Err(Status::unavailable(
                            "control plane shutting down: reconnect with your last token",
                        ))).await;
                        return;
                    }
                    r = reader.next() => r,
                };
                let read: Result<Vec<Event>, ApiError> = read.map_err(|e| match e {
                    ReadError::Redis(e) => registry.event_error(e).into(),
                    ReadError::Trimmed { token, before } => {
                        ApiError::EventsTrimmed { token, before }
                    }
                });
                match read {
                    Ok(events) => {
                        for ev in events {
                            let host_event = !matches!(
                                ev.r#type(),
                                EventType::AgentCreated
                                    | EventType::AgentState
                                    | EventType::AgentDeleted
                                    | EventType::AgentIdle
                                    | EventType::AgentMoving
                            );
                            if (filter.is_empty() || host_event || ev.agent_id == filter)
                                && tx.send(Ok(ev)).await.is_err()
                            {
                                return;
                            }
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(Status::from(e))).await;
                        return;
                    }
                }
            }
        });
        Ok(ReceiverStream::new(rx))
    }
}

impl AgentApi {
    /// `stream` with only the events of agents `caller` may see (and host
    /// events): each agent's record is read once, on its first event; an
    /// agent without a record is not shown.
    pub(super) fn filter_watch(
        &self,
        stream: WatchStream,
        caller: crate::auth::Caller,
    ) -> WatchStream {
        use tokio_stream::StreamExt;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let registry = self.registry.clone();
        let cancel = self.cancel.clone();
        self.tasks.spawn("watch filter", async move {
            let mut stream = stream;
            let mut seen: std::collections::HashMap<String, bool> =
                std::collections::HashMap::new();
            loop {
                let item = tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tx.closed() => return,
                    item = stream.next() => item,
                };
                let Some(item) = item else { return };
                if let Ok(ev) = &item {
                    if !ev.agent_id.is_empty() {
                        let show = match seen.get(&ev.agent_id) {
                            Some(s) => *s,
                            None => match registry.get_agent(&ev.agent_id).await {
                                Ok(found) => {
                                    let s = found.is_some_and(|a| caller.sees(&a));
                                    if seen.len() >= 100_000 {
                                        seen.clear();
                                    }
                                    seen.insert(ev.agent_id.clone(), s);
                                    s
                                }
                                // Unknown for now: not shown, asked again next time.
                                Err(_) => false,
                            },
                        };
                        if !show {
                            continue;
                        }
                    }
                }
                if tx.send(item).await.is_err() {
                    return;
                }
            }
        });
        ReceiverStream::new(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens() {
        assert!(token("0").is_ok());
        assert!(token("1700000000000-3").is_ok());
        assert_eq!(token("abc").unwrap_err().field, "resume_token");
        assert!(token("1-x").is_err());
        assert!(token("1-0,0,2-3").is_ok());
        assert!(token("1-0,,2-3").is_err());
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn any_resume_token_is_accepted_or_names_resume_token(
                t in prop_oneof![any::<String>(), "[0-9+-]{0,25}", "[0-9]{1,22}-[0-9a-z]{0,22}"],
            ) {
                if let Err(e) = token(&t) {
                    prop_assert_eq!(e.field, "resume_token");
                    prop_assert!(e.reason.len() <= 200, "{} bytes of reason", e.reason.len());
                }
            }

            #[test]
            fn every_stream_id_is_a_resume_token(ms in any::<u64>(), seq in any::<u64>()) {
                prop_assert_eq!(token(&format!("{ms}-{seq}")), Ok(()));
            }

            #[test]
            fn a_long_token_is_not_echoed_whole(n in 100usize..100_000) {
                let e = token(&"9".repeat(n)).unwrap_err();
                prop_assert!(e.reason.len() < 200, "{} bytes of reason", e.reason.len());
            }
        }
    }
}
