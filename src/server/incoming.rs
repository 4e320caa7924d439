//! Accepted connections with a cap: each holds a permit for its lifetime,
//! and a connection beyond `max` is closed as soon as it is accepted (logged
//! at most once a second), so a flood of idle or half-open connections
//! cannot exhaust the server's memory or descriptors.

use std::pin::Pin;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// A connection that counts against the cap until it is dropped.
#[derive(Debug)]
pub struct Counted {
    io: TcpStream,
    _permit: OwnedSemaphorePermit,
}

impl Counted {
    /// `io`, holding `permit` (its place under the cap) until dropped.
    pub fn new(io: TcpStream, permit: OwnedSemaphorePermit) -> Self {
        Self {
            io,
            _permit: permit,
        }
    }
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
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
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
