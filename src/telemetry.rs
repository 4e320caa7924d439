//! Logging and tracing set-up shared by the servers: `tracing` to stderr,
//! filtered by `AGENTPLANE_LOG` (or `RUST_LOG`), default `info`; and, when
//! an OTLP endpoint is given (`--otlp-endpoint` or the standard
//! `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`),
//! spans exported over OTLP/gRPC with W3C trace context carried in gRPC
//! metadata ([`propagate`]). With no endpoint there is no exporter at all.

pub mod propagate;

use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// How long [`Telemetry::shutdown`] waits for the last spans to leave.
const FLUSH_LIMIT: Duration = Duration::from_secs(5);

/// The standard variables that turn the exporter on without the flag.
const OTLP_ENV: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
];

/// Why tracing could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The OTLP exporter could not be built (a malformed endpoint).
    #[error("--otlp-endpoint: cannot build the OTLP exporter: {0}")]
    Exporter(String),
}

/// Who is tracing: the resource attributes of every span.
#[derive(Debug, Clone)]
pub struct Service {
    /// `service.name`: `agentplane-control-plane`, `agentplane-host-agent`.
    pub name: &'static str,
    /// `service.instance.id`: unique per running instance.
    pub instance: String,
}

/// What [`init`] started; [`Telemetry::shutdown`] flushes it.
#[derive(Debug, Default)]
#[must_use = "call shutdown() before exiting, or buffered spans are lost"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports what is still buffered (bounded), then stops the exporter.
    /// The flush blocks: it runs on the blocking pool, not a runtime worker.
    pub async fn shutdown(self) {
        let Some(p) = self.provider else { return };
        let flushed =
            tokio::task::spawn_blocking(move || p.shutdown_with_timeout(FLUSH_LIMIT)).await;
        match flushed {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "could not flush the last spans to the OTLP endpoint");
            }
            Err(e) => tracing::warn!(error = %e, "the span flush did not finish"),
        }
    }
}

/// Installs the global subscriber (JSON lines with `json`) and, when an
/// endpoint is given or set in the environment, the span exporter. Calling
/// it twice (several servers in one process) keeps the first; the second
/// exports nothing. Must run inside a Tokio runtime when exporting: the
/// exporter's gRPC channel lives on it.
pub fn init(
    json: bool,
    service: Service,
    otlp_endpoint: Option<&str>,
) -> Result<Telemetry, TelemetryError> {
    let exporting =
        otlp_endpoint.is_some() || OTLP_ENV.iter().any(|v| std::env::var_os(v).is_some());
    let provider = if exporting {
        Some(provider(service, otlp_endpoint)?)
    } else {
        None
    };
    let installed = install(json, provider.as_ref());
    if installed {
        if let Some(p) = &provider {
            opentelemetry::global::set_tracer_provider(p.clone());
        }
    }
    Ok(Telemetry {
        provider: provider.filter(|_| installed),
    })
}

/// Logs only, whatever the environment says about OTLP (`agentctl dev`,
/// whose two servers share one process).
pub fn init_logs(json: bool) {
    install(json, None);
}

/// The subscriber: logs filtered by `AGENTPLANE_LOG`, and spans to
/// `provider` if any. False when one was installed already.
fn install(json: bool, provider: Option<&SdkTracerProvider>) -> bool {
    let filter = std::env::var("AGENTPLANE_LOG")
        .ok()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| "info".to_owned());
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let fmt = if json {
        fmt.json().boxed()
    } else {
        fmt.boxed()
    };
    // Spans go to the exporter whatever the log filter says; the filter
    // only decides what is printed.
    let otel = provider.map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("agentplane"))
            .with_filter(EnvFilter::new("info"))
    });
    tracing_subscriber::registry()
        .with(fmt.with_filter(EnvFilter::new(filter)))
        .with(otel)
        .try_init()
        .is_ok()
}

fn provider(service: Service, endpoint: Option<&str>) -> Result<SdkTracerProvider, TelemetryError> {
    let mut exporter = opentelemetry_otlp::SpanExporter::builder().with_tonic();
    if let Some(e) = endpoint {
        exporter = exporter.with_endpoint(e);
    }
    let exporter = exporter
        .build()
        .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service.name)
        .with_attributes([
            KeyValue::new("service.version", crate::VERSION),
            KeyValue::new("service.instance.id", service.instance),
        ])
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}
