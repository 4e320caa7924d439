//! Reading the event streams for a watch. One stream in the flat layout;
//! in the Cluster layout one per shard plus the host events', each read by
//! a task of its own on a connection of its own (a blocking `XREAD` holds
//! its connection), all feeding one channel. A watch's token is then the
//! position in every stream (`id,id,…` in [`Keys::event_streams`] order);
//! in the flat layout it is the one stream id, as before.
//!
//! [`Keys::event_streams`]: super::Keys::event_streams

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::events::{decode, parse_id, stream_bounds};
use super::{Connection, Registry, Result};
use crate::proto::v1::Event;

/// Why reading stopped.
#[derive(Debug)]
pub enum ReadError {
    /// Redis failed.
    Redis(redis::RedisError),
    /// Events after the reader's position were trimmed; `before` is where
    /// the stream resumes.
    Trimmed {
        /// The token the reader was at.
        token: String,
        /// The oldest event still there.
        before: String,
    },
}

/// What a stream's task sends: events of stream `usize`, or why it stopped.
type Item = (usize, std::result::Result<Vec<Event>, StreamError>);

#[derive(Debug)]
enum StreamError {
    Redis(redis::RedisError),
    Trimmed(String),
}

/// Reads every event stream from a position (see the module docs).
pub struct EventReader {
    keys: Vec<String>,
    conns: Vec<Option<Connection>>,
    positions: Vec<String>,
    rx: Option<mpsc::Receiver<Item>>,
    tasks: JoinSet<()>,
}

impl Registry {
    /// A reader of the event streams, each on a dedicated connection whose
    /// response timeout is longer than any `BLOCK` it uses.
    pub async fn event_reader(&self) -> Result<EventReader> {
        let keys = self.keys().event_streams();
        // Dialled together: on a Cluster each one learns the slot map.
        let conns = futures::future::try_join_all(
            keys.iter()
                .map(|_| self.dedicated_connection(Duration::from_secs(5))),
        )
        .await?
        .into_iter()
        .map(Some)
        .collect();
        Ok(EventReader {
            positions: vec!["0".to_owned(); keys.len()],
            keys,
            conns,
            rx: None,
            tasks: JoinSet::new(),
        })
    }
}

impl EventReader {
    /// The positions `token` names, one per stream (`0`: every stream's
    /// start); the message says what is wrong with it.
    pub fn positions(&self, token: &str) -> std::result::Result<Vec<String>, String> {
        if token == "0" {
            return Ok(vec!["0".to_owned(); self.keys.len()]);
        }
        let parts: Vec<String> = token.split(',').map(str::to_owned).collect();
        if parts.len() != self.keys.len() || parts.iter().any(|p| parse_id(p).is_none()) {
            return Err(format!(
                "expected {} stream id{} (like 1700000000000-0){}",
                self.keys.len(),
                if self.keys.len() == 1 { "" } else { "s" },
                if self.keys.len() == 1 {
                    ""
                } else {
                    ", comma-separated: this control plane uses a Redis Cluster"
                }
            ));
        }
        Ok(parts)
    }

    fn token_of(positions: &[String]) -> String {
        positions.join(",")
    }

    /// The token of "from now on": every stream's newest id (even if
    /// trimmed since; `0-0` for a stream that does not exist yet).
    pub async fn last_token(&mut self) -> std::result::Result<String, redis::RedisError> {
        let mut last = Vec::with_capacity(self.keys.len());
        for (key, conn) in self.keys.iter().zip(&mut self.conns) {
            let conn = conn.as_mut().ok_or_else(started)?;
            last.push(stream_bounds(conn, key).await?.last_generated);
        }
        Ok(Self::token_of(&last))
    }

    /// Whether events after `token` were trimmed from any stream: `Some`
    /// with the first event still there.
    pub async fn gap_after(
        &mut self,
        token: &str,
    ) -> std::result::Result<Option<String>, redis::RedisError> {
        let Ok(positions) = self.positions(token) else {
            return Ok(None);
        };
        for ((key, conn), pos) in self.keys.iter().zip(&mut self.conns).zip(&positions) {
            let conn = conn.as_mut().ok_or_else(started)?;
            if pos != "0" {
                if let Some(before) = stream_bounds(conn, key).await?.gap_after(pos) {
                    return Ok(Some(before));
                }
            }
        }
        Ok(None)
    }

    /// Starts reading after `token` (checked by [`EventReader::positions`]),
    /// at most `batch` events per stream read.
    pub fn start(&mut self, token: &str, batch: usize) {
        let Ok(positions) = self.positions(token) else {
            return;
        };
        self.positions.clone_from(&positions);
        let (tx, rx) = mpsc::channel(self.keys.len().max(2));
        for (i, (key, pos)) in self.keys.iter().zip(positions).enumerate() {
            let Some(conn) = self.conns[i].take() else {
                continue;
            };
            self.tasks
                .spawn(read_stream(i, key.clone(), conn, pos, batch, tx.clone()));
        }
        self.rx = Some(rx);
    }

    /// The next events of any stream, each carrying the token right after
    /// it; waits until there are some. Only after [`EventReader::start`].
    pub async fn next(&mut self) -> std::result::Result<Vec<Event>, ReadError> {
        let rx = self
            .rx
            .as_mut()
            .ok_or_else(|| ReadError::Redis(started()))?;
        let Some((i, read)) = rx.recv().await else {
            return Err(ReadError::Redis(started()));
        };
        match read {
            Ok(mut events) => {
                for ev in &mut events {
                    self.positions[i].clone_from(&ev.token);
                    ev.token = Self::token_of(&self.positions);
                }
                Ok(events)
            }
            Err(StreamError::Redis(e)) => Err(ReadError::Redis(e)),
            Err(StreamError::Trimmed(before)) => Err(ReadError::Trimmed {
                token: Self::token_of(&self.positions),
                before,
            }),
        }
    }
}

/// The error of a reader used out of order (a bug in the caller).
fn started() -> redis::RedisError {
    redis::RedisError::from((
        redis::ErrorKind::Client,
        "event reader used before start or after its streams stopped",
    ))
}

/// Reads stream `key` from `pos` on `conn` until the receiver goes, sending
/// each batch as stream `i`'s. A full batch may have jumped a trimmed gap
/// (every event still there is after it): then the bounds are checked and
/// a gap reported instead.
async fn read_stream(
    i: usize,
    key: String,
    mut conn: Connection,
    mut pos: String,
    batch: usize,
    tx: mpsc::Sender<Item>,
) {
    loop {
        let read = read_once(&mut conn, &key, &pos, batch).await;
        let item = match read {
            Ok(events) if events.len() >= batch && pos != "0" => {
                match stream_bounds(&mut conn, &key).await {
                    Ok(b) => match b.gap_after(&pos) {
                        Some(before) => Err(StreamError::Trimmed(before)),
                        None => Ok(events),
                    },
                    Err(e) => Err(StreamError::Redis(e)),
                }
            }
            Ok(events) => Ok(events),
            Err(e) => Err(StreamError::Redis(e)),
        };
        let stop = item.is_err();
        match &item {
            Ok(events) if events.is_empty() => continue,
            Ok(events) => {
                if let Some(last) = events.last() {
                    pos.clone_from(&last.token);
                }
            }
            Err(_) => {}
        }
        if tx.send((i, item)).await.is_err() || stop {
            return;
        }
    }
}

/// One `XREAD` of up to `count` events after `after`, waiting up to 1 s.
async fn read_once(
    conn: &mut Connection,
    key: &str,
    after: &str,
    count: usize,
) -> std::result::Result<Vec<Event>, redis::RedisError> {
    let reply: Option<redis::streams::StreamReadReply> = redis::cmd("XREAD")
        .arg("COUNT")
        .arg(count)
        .arg("BLOCK")
        .arg(1000)
        .arg("STREAMS")
        .arg(key)
        .arg(after)
        .query_async(conn)
        .await?;
    let mut out = Vec::new();
    for key in reply.map(|r| r.keys).unwrap_or_default() {
        for entry in key.ids {
            let fields: HashMap<String, String> = entry
                .map
                .iter()
                .filter_map(|(k, v)| {
                    Some((
                        k.clone(),
                        redis::from_redis_value::<String>(v.clone()).ok()?,
                    ))
                })
                .collect();
            out.push(decode(entry.id, &fields));
        }
    }
    Ok(out)
}
