//! A cap on the requests one server has open at once (`--max-streams`),
//! streams included until their last frame. Per connection HTTP/2 already
//! caps streams, but connections × streams per connection is millions: a
//! caller that opens long-lived streams (a health `Watch` needs no token)
//! would otherwise grow the server's memory by ~6.5 KiB a stream (measured
//! with bench-conns) without bound. Past the cap: RESOURCE_EXHAUSTED.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::codegen::http;
use tonic::Status;

/// The server's places for open requests.
#[derive(Debug, Clone)]
pub struct StreamCap {
    permits: Arc<Semaphore>,
    max: usize,
    what: &'static str,
}

/// Places for calls that need no token (health), apart from the rest: a
/// flood of them (a health `Watch` is a stream anyone may hold) cannot
/// take the places of authenticated callers.
pub const PUBLIC_STREAMS: usize = 256;

impl StreamCap {
    /// At most `max` requests open at once.
    pub fn new(max: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max)),
            max,
            what: "requests and streams open, the most --max-streams allows",
        }
    }

    /// At most [`PUBLIC_STREAMS`] calls without a token open at once.
    pub fn public() -> Self {
        Self {
            permits: Arc::new(Semaphore::new(PUBLIC_STREAMS)),
            max: PUBLIC_STREAMS,
            what: "health calls open, the most callers without a token may hold",
        }
    }

    /// A place for one more, or the refusal to send.
    pub fn admit(&self) -> Result<OwnedSemaphorePermit, Status> {
        self.permits.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "this server has {} {}; retry later",
                self.max, self.what
            ))
        })
    }
}

/// A response body that holds its request's place until it ends.
struct Holding {
    inner: tonic::body::Body,
    _place: OwnedSemaphorePermit,
}

impl http_body::Body for Holding {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The inner service's response future; its body then holds the place.
pub struct Placed<F> {
    fut: Pin<Box<F>>,
    place: Option<OwnedSemaphorePermit>,
}

impl<F> Placed<F> {
    /// `fut`'s response will hold `place`, if any.
    pub fn new(fut: F, place: Option<OwnedSemaphorePermit>) -> Self {
        Self {
            fut: Box::pin(fut),
            place,
        }
    }
}

impl<F, E> Future for Placed<F>
where
    F: Future<Output = Result<http::Response<tonic::body::Body>, E>>,
{
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let out = std::task::ready!(self.fut.as_mut().poll(cx));
        let place = self.place.take();
        Poll::Ready(out.map(|resp| match place {
            Some(p) => resp.map(|inner| tonic::body::Body::new(Holding { inner, _place: p })),
            None => resp,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_are_given_back_when_dropped() {
        let cap = StreamCap::new(2);
        let a = cap.admit().expect("first");
        let _b = cap.admit().expect("second");
        let e = cap.admit().expect_err("third");
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(e.message().contains("--max-streams"), "{}", e.message());
        drop(a);
        let _again = cap.admit().expect("a place came back");
    }
}
