//! The `/metrics` endpoint: plain HTTP/1.1 (what Prometheus scrapes), a few
//! connections at a time, each answered from memory.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::prometheus_text;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::MetricRegistry;

/// Most scrapes served at once; more connections are closed at once.
const MAX_CONNECTIONS: usize = 16;
/// A client that has not sent its request head by then is dropped.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the metrics endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// `--metrics-listen` could not be bound.
    #[error("--metrics-listen {addr}: cannot listen: {source}")]
    Listen {
        /// The address asked for.
        addr: SocketAddr,
        /// The OS's error.
        #[source]
        source: std::io::Error,
    },
}

/// Binds `--metrics-listen` when given (before anything else starts, so a
/// taken port fails the start); logs where it listens.
pub async fn bind(addr: Option<SocketAddr>) -> Result<Option<TcpListener>, MetricsError> {
    let Some(addr) = addr else { return Ok(None) };
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Listen { addr, source })?;
    let at = listener.local_addr().unwrap_or(addr);
    tracing::info!(addr = %at, "metrics (plaintext HTTP) serving at /metrics");
    Ok(Some(listener))
}

/// Serves `registry` on `listener` (if bound) as a task of `tasks` until
/// `cancel`; what both servers do once their metrics are registered.
pub fn start(
    listener: Option<TcpListener>,
    registry: MetricRegistry,
    tasks: &crate::tasks::Tasks,
    cancel: &CancellationToken,
) {
    if let Some(l) = listener {
        tasks.spawn("metrics", serve(l, Arc::new(registry), cancel.clone()));
    }
}

/// Answers `GET /metrics` on `listener` with `registry` in Prometheus' text
/// format until `cancel`.
pub async fn serve(
    listener: TcpListener,
    registry: Arc<MetricRegistry>,
    cancel: CancellationToken,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = tokio::select! {
            () = cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors, most likely: wait, do not spin.
                    tracing::warn!(error = %e, "metrics: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let (registry, cancel) = (registry.clone(), cancel.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |req| {
                let answer = answer(&registry, &req);
                async move { Ok::<_, Infallible>(answer) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                () = cancel.cancelled() => {}
            }
        });
    }
}

/// The answer to one request.
fn answer<B>(registry: &MetricRegistry, req: &Request<B>) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, body: String, kind: &'static str| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        if let Ok(v) = kind.parse() {
            r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
        }
        r
    };
    if req.uri().path() != "/metrics" {
        return reply(
            StatusCode::NOT_FOUND,
            "only /metrics is served here\n".into(),
            "text/plain",
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "GET /metrics\n".into(),
            "text/plain",
        );
    }
    let mut body = String::new();
    match prometheus_text::encode(&mut body, registry) {
        Ok(()) => reply(StatusCode::OK, body, prometheus_text::CONTENT_TYPE),
        Err(_) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "cannot encode the metrics\n".into(),
            "text/plain",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_registry_is_encoded_at_metrics_only() {
        let r = super::super::registry("test");
        let get = |path: &str| answer(&r, &Request::builder().uri(path).body(()).expect("request"));
        let ok = get("/metrics");
        assert_eq!(ok.status(), StatusCode::OK);
        assert_eq!(get("/").status(), StatusCode::NOT_FOUND);
        let body = futures::executor::block_on(http_body_util::BodyExt::collect(ok.into_body()))
            .expect("body")
            .to_bytes();
        let text = String::from_utf8_lossy(&body);
        assert!(
            text.contains(&format!(
                "agentplane_build_info{{version=\"{}\",server=\"test\"}} 1",
                crate::VERSION
            )),
            "{text}"
        );
    }
}
