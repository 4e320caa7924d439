//! TLS accepts done here rather than in tonic, so that a flood of half-open
//! or idle connections cannot lock new clients out. Every connection counts
//! against `--max-connections` from accept to close; when the cap is full,
//! the oldest connection whose caller has not yet proven who it is (still
//! in its handshake, or past it without a client certificate or a request
//! with a valid token) is closed to make room, instead of the new one being
//! refused. A client finishes its
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

use super::incoming::{Counted, RefusalLog, Unproven};

/// How long a new connection waits for the place an eviction frees.
const EVICTION_WAIT: Duration = Duration::from_millis(100);

/// Connections whose caller is not known yet, oldest first (keys only
/// grow); each value evicts its connection.
type Order = Arc<Mutex<BTreeMap<u64, CancellationToken>>>;

/// How a TLS listener admits connections.
#[derive(Clone)]
pub struct Admission {
    /// Most connections open at once.
    pub max: usize,
    /// The TLS side.
    pub acceptor: TlsAcceptor,
    /// The handshake bound.
    pub timeout: Duration,
    /// A verified client certificate proves the caller (the host agent,
    /// which requires one); else a request the gate admits with a token
    /// does.
    pub proven_by_certificate: bool,
}

/// `listener`'s connections after their TLS handshake, until `cancel`.
pub fn tls_incoming(
    listener: TcpListener,
    admission: Admission,
    cancel: CancellationToken,
) -> ReceiverStream<std::io::Result<TlsStream<Counted>>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(accept_loop(listener, admission, cancel, tx));
    ReceiverStream::new(rx)
}

async fn accept_loop(
    listener: TcpListener,
    admission: Admission,
    cancel: CancellationToken,
    tx: mpsc::Sender<std::io::Result<TlsStream<Counted>>>,
) {
    let max = admission.max;
    let permits = Arc::new(Semaphore::new(max));
    let order: Order = Arc::default();
    let mut next_key = 0u64;
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
                let oldest = order
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
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
                    "--max-connections reached: closed the oldest connection whose caller had not proven who it is (in or just past its TLS handshake) to admit a new one",
                );
                match tokio::time::timeout(EVICTION_WAIT, permits.clone().acquire_owned()).await {
                    Ok(Ok(p)) => p,
                    _ => continue,
                }
            }
        };
        let _ = io.set_nodelay(true);
        let key = next_key;
        next_key += 1;
        let evict = CancellationToken::new();
        order
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key, evict.clone());
        let proof = Unproven::new(key, order.clone());
        let conn = Counted::new(io, permit).evictable(proof.clone(), evict);
        let (admission, tx) = (admission.clone(), tx.clone());
        tokio::spawn(async move {
            // An eviction reads as an aborted connection: the accept fails.
            match tokio::time::timeout(admission.timeout, admission.acceptor.accept(conn)).await {
                Ok(Ok(tls)) => {
                    if admission.proven_by_certificate {
                        proof.prove();
                    }
                    let _ = tx.send(Ok(tls)).await;
                }
                Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(timeout = ?admission.timeout, "TLS handshake timed out"),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_unproven_goes_first_and_a_proven_one_never() {
        let order: Order = Arc::default();
        let add = |k: u64| {
            let t = CancellationToken::new();
            order.lock().expect("lock").insert(k, t.clone());
            (Unproven::new(k, order.clone()), t)
        };
        let (a, _ta) = add(0);
        let (_b, _tb) = add(1);
        let (_c, _tc) = add(2);
        a.prove();
        let first = order.lock().expect("lock").pop_first().map(|(k, _)| k);
        assert_eq!(first, Some(1), "a proven connection leaves the order");
        a.prove();
        assert_eq!(order.lock().expect("lock").len(), 1);
    }
}
