//! Accepted connections with a cap: each holds a permit for its lifetime,
//! and a connection beyond `max` is closed as soon as it is accepted (logged
//! at most once a second), so a flood of idle or half-open connections
//! cannot exhaust the server's memory or descriptors.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// A connection that counts against the cap until it is dropped. With
/// TLS it may be evicted (to admit a newer one) until its caller has
/// proven who it is; an evicted connection reads as aborted, so the server
/// closes it.
pub struct Counted {
    io: TcpStream,
    _permit: OwnedSemaphorePermit,
    proof: Option<Unproven>,
    evicted: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
}

impl std::fmt::Debug for Counted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Counted")
            .field("io", &self.io)
            .finish_non_exhaustive()
    }
}

impl Counted {
    /// `io`, holding `permit` (its place under the cap) until dropped.
    pub fn new(io: TcpStream, permit: OwnedSemaphorePermit) -> Self {
        Self {
            io,
            _permit: permit,
            proof: None,
            evicted: None,
        }
    }

    /// Evictable through `evict` until `proof` is proven (or dropped).
    pub fn evictable(mut self, proof: Unproven, evict: CancellationToken) -> Self {
        self.evicted = Some(Box::pin(evict.cancelled_owned()));
        self.proof = Some(proof);
        self
    }
}

/// A connection's standing in the eviction order, until its caller is
/// known (a client certificate, or a request with a valid token): then it
/// leaves the order for good. Travels in the requests' connect info, so
/// the gate can prove it.
#[derive(Debug, Clone)]
pub struct Unproven {
    key: u64,
    proven: Arc<AtomicBool>,
    order: Arc<std::sync::Mutex<BTreeMap<u64, CancellationToken>>>,
}

impl Unproven {
    /// A place in `order` under `key`.
    pub fn new(key: u64, order: Arc<std::sync::Mutex<BTreeMap<u64, CancellationToken>>>) -> Self {
        Self {
            key,
            proven: Arc::new(AtomicBool::new(false)),
            order,
        }
    }

    /// The caller is known: never evict this connection.
    pub fn prove(&self) {
        if !self.proven.swap(true, Ordering::Relaxed) {
            self.forget();
        }
    }

    fn forget(&self) {
        self.order
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&self.key);
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        if let Some(p) = &self.proof {
            p.forget();
        }
    }
}

/// What the server knows of a connection: its addresses, and its standing
/// in the eviction order (TLS only).
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The TCP addresses.
    pub tcp: TcpConnectInfo,
    /// Set while the caller may still be evicted.
    pub proof: Option<Unproven>,
}

/// A warning about refused connections, logged at most once a second
/// (a flood must not become a flood of log lines).
#[derive(Debug, Default, Clone)]
pub struct RefusalLog(Arc<AtomicI64>);

impl RefusalLog {
    /// Logs `what` about `io` unless it was logged less than a second ago.
    pub fn warn(&self, max: usize, io: Option<&TcpStream>, what: &'static str) {
        let now = crate::time::now_ms();
        let last = self.0.load(Ordering::Relaxed);
        if now - last >= 1000
            && self
                .0
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(max, peer = ?io.and_then(|io| io.peer_addr().ok()), "{what}");
        }
    }
}

/// `listener`'s connections, at most `max` open at once (plaintext: there
/// is no handshake to wait for, so a new connection past the cap is closed).
pub fn capped(
    listener: TcpListener,
    max: usize,
) -> impl Stream<Item = std::io::Result<Counted>> + Send + 'static {
    let permits = Arc::new(Semaphore::new(max));
    let refused = RefusalLog::default();
    TcpListenerStream::new(listener).filter_map(move |accepted| {
        let permits = permits.clone();
        let refused = refused.clone();
        async move {
            let io = match accepted {
                Ok(io) => io,
                Err(e) => {
                    // Out of descriptors and the like: tonic would retry at
                    // once and spin; pause instead, and say so.
                    refused.warn(max, None, "accept failed (out of descriptors?)");
                    tracing::debug!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    return None;
                }
            };
            match permits.try_acquire_owned() {
                Ok(permit) => {
                    let _ = io.set_nodelay(true);
                    Some(Ok(Counted::new(io, permit)))
                }
                Err(_) => {
                    refused.warn(
                        max,
                        Some(&io),
                        "connection refused: --max-connections reached",
                    );
                    // Dropped here: closed.
                    None
                }
            }
        }
    })
}

impl Connected for Counted {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        ConnInfo {
            tcp: self.io.connect_info(),
            proof: self.proof.clone(),
        }
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if let Some(evicted) = &mut this.evicted {
            let proven = this
                .proof
                .as_ref()
                .is_some_and(|p| p.proven.load(Ordering::Relaxed));
            if proven {
                this.evicted = None;
            } else if evicted.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionAborted,
                    "evicted: --max-connections reached and this caller had not proven who it is",
                )));
            }
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}
