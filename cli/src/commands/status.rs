//! `agentctl status`: each endpoint's health and `GetStatus` counters, as a
//! table (or `-o json|yaml`); exits 1 when an endpoint does not answer or is
//! not SERVING.

use std::process::ExitCode;

use agentplane::proto::v1::GetStatusRequest;
use serde::Serialize;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::access::Access;
use crate::output::{self, Format};

/// One endpoint as `status` shows it.
#[derive(Debug, Serialize)]
struct EndpointView {
    endpoint: String,
    /// SERVING, NOT_SERVING, … or `unreachable`.
    health: String,
    /// Why it could not be asked, if it could not.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    rss_bytes: Option<u64>,
    tasks: Option<u64>,
    panicked_tasks: Option<u64>,
    log_streams: Option<u64>,
    watch_streams: Option<u64>,
}

/// Asks every endpoint, one after another, and prints what each said.
pub async fn run(endpoints: &[String], fmt: Format, access: &Access) -> anyhow::Result<ExitCode> {
    let mut views = Vec::with_capacity(endpoints.len());
    for e in endpoints {
        views.push(ask(e, access).await);
    }
    let healthy = views.iter().all(|v| v.health == "SERVING");
    match fmt {
        Format::Json | Format::Yaml => output::document(fmt, &views)?,
        Format::Table => {
            let n = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), |v| v.to_string());
            let rows: Vec<Vec<String>> = views
                .iter()
                .map(|v| {
                    vec![
                        v.endpoint.clone(),
                        v.health.clone(),
                        v.rss_bytes.map_or_else(
                            || "-".to_owned(),
                            |b| format!("{:.1}MiB", b as f64 / f64::from(1 << 20)),
                        ),
                        n(v.tasks),
                        n(v.panicked_tasks),
                        n(v.log_streams),
                        n(v.watch_streams),
                        v.error.clone().unwrap_or_default(),
                    ]
                })
                .collect();
            output::table(
                &[
                    "ENDPOINT", "HEALTH", "RSS", "TASKS", "PANICKED", "LOGS", "WATCHES", "ERROR",
                ],
                &rows,
            );
        }
    }
    Ok(if healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn ask(endpoint: &str, access: &Access) -> EndpointView {
    let mut view = EndpointView {
        endpoint: endpoint.to_owned(),
        health: "unreachable".to_owned(),
        error: None,
        rss_bytes: None,
        tasks: None,
        panicked_tasks: None,
        log_streams: None,
        watch_streams: None,
    };
    let channel = match crate::client::channel(endpoint, access) {
        Ok(c) => c,
        Err(e) => {
            view.error = Some(e.to_string());
            return view;
        }
    };
    match HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
    {
        Ok(r) => view.health = r.into_inner().status().as_str_name().to_owned(),
        Err(s) => {
            view.error = Some(crate::client::describe(endpoint, &s));
            return view;
        }
    }
    let mut c = match crate::client::connect(endpoint, access) {
        Ok(c) => c,
        Err(e) => {
            view.error = Some(e.to_string());
            return view;
        }
    };
    match c.agents.get_status(GetStatusRequest {}).await {
        Ok(r) => {
            let s = r.into_inner();
            view.rss_bytes = Some(s.rss_bytes);
            view.tasks = Some(s.tasks);
            view.panicked_tasks = Some(s.panicked_tasks);
            view.log_streams = Some(s.log_streams);
            view.watch_streams = Some(s.watch_streams);
        }
        Err(s) => view.error = Some(crate::client::describe(endpoint, &s)),
    }
    view
}
