//! TLS accepts done here rather than in tonic, so that a flood of half-open
//! connections cannot lock new clients out. Every connection counts
//! against `--max-connections` from accept to close; when the cap is full,
//! the connection that has waited longest in its handshake is closed to
//! make room, instead of the new one being refused. A client finishes its
//! handshake in a round trip or two; a connection that sends nothing would
//! otherwise hold its place for the whole handshake timeout, and a few
//! thousand of them would leave every new client refused (measured with
//! bench-conns: with 6,000 half-open connections against a cap of 4,096,
//! every fresh connection failed until the timeout). Established
//! connections are never evicted.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use super::incoming::{Counted, RefusalLog};

/// How long a new connection waits for the place an eviction frees.
const EVICTION_WAIT: Duration = Duration::from_millis(100);

/// Connections in their handshake, oldest first (keys only grow).
#[derive(Debug, Default)]
struct Pending {
    next: u64,
    by_age: BTreeMap<u64, CancellationToken>,
}

impl Pending {
    fn add(&mut self) -> (u64, CancellationToken) {
        let key = self.next;
        self.next += 1;
        let token = CancellationToken::new();
        self.by_age.insert(key, token.clone());
        (key, token)
    }
}

/// `listener`'s connections after their TLS handshake (bounded by
/// `timeout`), at most `max` open at once, until `cancel`.
pub fn tls_incoming(
    listener: TcpListener,
    max: usize,
    acceptor: TlsAcceptor,
    timeout: Duration,
    cancel: CancellationToken,
) -> ReceiverStream<std::io::Result<TlsStream<Counted>>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(accept_loop(listener, max, acceptor, timeout, cancel, tx));
    ReceiverStream::new(rx)
}

async fn accept_loop(
    listener: TcpListener,
    max: usize,
    acceptor: TlsAcceptor,
    timeout: Duration,
    cancel: CancellationToken,
    tx: mpsc::Sender<std::io::Result<TlsStream<Counted>>>,
) {
    let permits = Arc::new(Semaphore::new(max));
    let pending = Arc::new(Mutex::new(Pending::default()));
    let refused = RefusalLog::default();
    let evicted = RefusalLog::default();
    loop {
        let accepted = tokio::select! {
            () = cancel.cancelled() => return,
            () = tx.closed() => return,
            a = listener.accept() => a,
        };
        let io = match accepted {
            Ok((io, _)) => io,
            Err(e) => {
                // Out of descriptors and the like: say so, pause, go on.
                refused.warn(max, None, "accept failed (out of descriptors?)");
                tracing::debug!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let permit = match permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                let oldest = pending
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .by_age
                    .pop_first();
                let Some((_, victim)) = oldest else {
                    refused.warn(
                        max,
                        Some(&io),
                        "connection refused: --max-connections reached",
                    );
                    continue;
                };
                victim.cancel();
                evicted.warn(
                    max,
                    Some(&io),
                    "--max-connections reached: closed the oldest connection still in its TLS handshake to admit a new one",
                );
                match tokio::time::timeout(EVICTION_WAIT, permits.clone().acquire_owned()).await {
                    Ok(Ok(p)) => p,
                    _ => continue,
                }
            }
        };
        let _ = io.set_nodelay(true);
        let conn = Counted::new(io, permit);
        let (key, evict) = pending.lock().unwrap_or_else(PoisonError::into_inner).add();
        let (acceptor, pending, tx) = (acceptor.clone(), pending.clone(), tx.clone());
        tokio::spawn(async move {
            let done = tokio::select! {
                () = evict.cancelled() => None,
                r = tokio::time::timeout(timeout, acceptor.accept(conn)) => Some(r),
            };
            pending
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .by_age
                .remove(&key);
            match done {
                Some(Ok(Ok(tls))) => {
                    let _ = tx.send(Ok(tls)).await;
                }
                Some(Ok(Err(e))) => tracing::debug!(error = %e, "TLS handshake failed"),
                Some(Err(_)) => tracing::debug!(?timeout, "TLS handshake timed out"),
                None => {}
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_pending_handshake_goes_first() {
        let mut p = Pending::default();
        let (a, ta) = p.add();
        let (b, _tb) = p.add();
        let (c, _tc) = p.add();
        assert!(a < b && b < c);
        p.by_age.remove(&b);
        let (first, t) = p.by_age.pop_first().expect("one");
        assert_eq!(first, a);
        t.cancel();
        assert!(ta.is_cancelled());
        assert_eq!(p.by_age.pop_first().map(|(k, _)| k), Some(c));
    }
}
