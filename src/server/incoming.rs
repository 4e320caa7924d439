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

/// `listener`'s connections, at most `max` open at once.
pub fn capped(
    listener: TcpListener,
    max: usize,
) -> impl Stream<Item = std::io::Result<Counted>> + Send + 'static {
    let permits = Arc::new(Semaphore::new(max));
    let last_warned = Arc::new(AtomicI64::new(0));
    TcpListenerStream::new(listener).filter_map(move |accepted| {
        let permits = permits.clone();
        let last_warned = last_warned.clone();
        async move {
            let io = match accepted {
                Ok(io) => io,
                Err(e) => return Some(Err(e)),
            };
            match permits.try_acquire_owned() {
                Ok(permit) => {
                    let _ = io.set_nodelay(true);
                    Some(Ok(Counted {
                        io,
                        _permit: permit,
                    }))
                }
                Err(_) => {
                    let now = crate::time::now_ms();
                    let last = last_warned.load(Ordering::Relaxed);
                    if now - last >= 1000
                        && last_warned
                            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                            .is_ok()
                    {
                        tracing::warn!(
                            max,
                            peer = ?io.peer_addr().ok(),
                            "connection refused: --max-connections reached"
                        );
                    }
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
