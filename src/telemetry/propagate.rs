//! W3C trace context across our gRPC hops: [`inject`] writes the current
//! span's context into a request's metadata (`traceparent`, `tracestate`),
//! and [`RpcTrace`] (a layer on both servers) opens each call's server span
//! as a child of the context the caller sent, then logs one debug line per
//! call with the fixed fields `rpc`, `code`, `elapsed_ms` and `trace_id`.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tonic::codegen::http;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Writes into gRPC metadata.
struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(k, v);
        }
    }
}

/// Reads HTTP/2 headers (gRPC metadata on the wire).
struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// Adds the current span's trace context to `metadata`; nothing when no
/// span is being traced (no exporter).
pub fn inject(metadata: &mut tonic::metadata::MetadataMap) {
    let cx = tracing::Span::current().context();
    if cx.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(&cx, &mut MetadataInjector(metadata));
    }
}

/// [`inject`] into a raw request's headers (calls relayed at the HTTP level).
pub fn inject_headers(headers: &mut http::HeaderMap) {
    let cx = tracing::Span::current().context();
    if cx.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(headers));
    }
}

/// Writes into HTTP/2 headers.
struct HeaderInjector<'a>(&'a mut http::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            http::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(k, v);
        }
    }
}

/// The trace id of the current span (32 hex digits), if it is traced.
pub fn current_trace_id() -> Option<String> {
    let cx = tracing::Span::current().context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

/// A layer that traces every call of a server ([`Traced`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct RpcTrace;

impl<S> tower_layer::Layer<S> for RpcTrace {
    type Service = Traced<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Traced { inner }
    }
}

/// One server span per call (named after the method, child of the
/// caller's `traceparent`), and a debug line when the answer is ready.
#[derive(Debug, Clone)]
pub struct Traced<S> {
    inner: S,
}

impl<S, B, R> tower_service::Service<http::Request<B>> for Traced<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let rpc = req.uri().path().trim_start_matches('/').to_owned();
        // `request_id` and `agent` are filled in by handlers that know them
        // (Span::current().record), so every line of the call carries them.
        let span = tracing::info_span!(
            "rpc",
            otel.name = %rpc,
            otel.kind = "server",
            rpc.system = "grpc",
            request_id = tracing::field::Empty,
            agent = tracing::field::Empty,
        );
        let parent = TraceContextPropagator::new().extract(&HeaderExtractor(req.headers()));
        // The caller's trace id, logged even when nothing here is exported.
        let callers_trace = parent
            .span()
            .span_context()
            .is_valid()
            .then(|| parent.span().span_context().trace_id().to_string());
        if callers_trace.is_some() {
            let _ = span.set_parent(parent);
        }
        let started = Instant::now();
        let answer = {
            let _entered = span.enter();
            self.inner.call(req)
        };
        Box::pin(
            async move {
                let r = answer.await;
                // A failed call answers with its status in the headers
                // (trailers only); a successful one sends it after the body.
                let code = match &r {
                    Ok(resp) => resp
                        .headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|c| c.parse::<i32>().ok())
                        .map_or(tonic::Code::Ok, tonic::Code::from_i32),
                    Err(_) => tonic::Code::Internal,
                };
                tracing::debug!(
                    rpc = %rpc,
                    code = ?code,
                    elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
                    trace_id = current_trace_id().or(callers_trace).unwrap_or_default(),
                    "rpc"
                );
                r
            }
            .instrument(span),
        )
    }
}
