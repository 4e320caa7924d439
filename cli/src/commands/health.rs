//! `agentctl health`: the gRPC health check of a server (a probe for
//! containers and scripts), typically against its `--health-listen` port.

use std::process::ExitCode;

use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::access::Access;

/// Asks `endpoint` whether `service` (empty: the server as a whole) is
/// SERVING; prints the answer; exit 0 only when it is.
pub async fn run(endpoint: &str, service: String, access: &Access) -> anyhow::Result<ExitCode> {
    let channel = crate::client::channel(endpoint, access)?;
    let answer = HealthClient::new(channel)
        .check(HealthCheckRequest { service })
        .await
        .map_err(|s| anyhow::anyhow!(crate::client::describe(endpoint, &s)))?
        .into_inner();
    let status = answer.status();
    println!("{}", status.as_str_name());
    Ok(if status == ServingStatus::Serving {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
