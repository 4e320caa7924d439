//! OpenTelemetry traces (P9): both servers export over OTLP/gRPC to an
//! in-test collector (the `opentelemetry-proto` crate's TraceService on
//! port 0). One SpawnAgent sent with a fixed `traceparent` is one trace:
//! the control plane's span is a child of the caller's, and the host
//! agent's StartAgent span (and its fork/exec) lead back to it. The batch
//! delay is ten minutes, so every span arrives only because SIGTERM
//! flushes it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentplane::proto::v1::{ListAgentsRequest, SpawnAgentRequest, StreamLogsRequest};
use agentplane_integration_tests::{eventually, spec, TestCluster};
use nix::sys::signal::Signal;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;

/// One span as the collector received it.
#[derive(Debug, Clone)]
struct Got {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent: String,
}

#[derive(Debug, Clone, Default)]
struct Collector(Arc<Mutex<Vec<Got>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        let mut got = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for rs in req.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    Value::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                got.push(Got {
                    service: service.clone(),
                    name: span.name,
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent: hex(&span.parent_span_id),
                });
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// The one agent's id.
async fn agent_id(cluster: &TestCluster) -> String {
    let agents = cluster
        .client()
        .await
        .list_agents(ListAgentsRequest::default())
        .await
        .expect("list")
        .into_inner()
        .agents;
    agents.into_iter().next().expect("an agent").id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_spawn_is_one_trace_from_the_caller_to_the_fork_and_spans_are_flushed_on_sigterm() {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let mut cluster = TestCluster::builder()
        .control_plane_arg("--otlp-endpoint")
        .control_plane_arg(&endpoint)
        .host_arg("--otlp-endpoint")
        .host_arg(&endpoint)
        // Nothing leaves before the shutdown does.
        .env("OTEL_BSP_SCHEDULE_DELAY", "600000")
        .start()
        .await;

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let mut req = tonic::Request::new(SpawnAgentRequest {
        spec: Some(spec(&["sleep", "1000"], None)),
        request_id: String::new(),
    });
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{caller_span}-01")
            .parse()
            .expect("metadata"),
    );
    cluster
        .client()
        .await
        .spawn_agent(req)
        .await
        .expect("spawn");
    // A log read, relayed at the HTTP level, carries its trace on too.
    let logs_trace = "0af7651916cd43dd8448eb211c80319c";
    let mut req = tonic::Request::new(StreamLogsRequest {
        id: agent_id(&cluster).await,
        ..Default::default()
    });
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{logs_trace}-b7ad6b7169203331-01")
            .parse()
            .expect("metadata"),
    );
    let mut logs = cluster
        .client()
        .await
        .stream_logs(req)
        .await
        .expect("logs")
        .into_inner();
    while logs.message().await.expect("a chunk").is_some() {}
    assert!(
        collector.0.lock().expect("lock").is_empty(),
        "spans left before the shutdown: the batch delay did not hold them"
    );

    for (name, server) in [
        ("control plane", &mut cluster.control_planes[0]),
        ("host agent", &mut cluster.hosts[0]),
    ] {
        server.proc.signal(Signal::SIGTERM);
        assert!(
            server.proc.wait_exit(Duration::from_secs(15)).await,
            "{name} did not exit on SIGTERM"
        );
    }

    let spans = eventually(Duration::from_secs(10), "the flushed spans", || async {
        let got = collector.0.lock().expect("lock").clone();
        let services: std::collections::HashSet<_> =
            got.iter().map(|g| g.service.clone()).collect();
        (services.contains("agentplane-control-plane")
            && services.contains("agentplane-host-agent"))
        .then_some(got)
    })
    .await;
    let in_trace: Vec<&Got> = spans.iter().filter(|s| s.trace_id == trace_id).collect();
    let find = |service: &str, name: &str| {
        in_trace
            .iter()
            .find(|s| s.service == service && s.name == name)
            .copied()
            .unwrap_or_else(|| panic!("no {service} span {name} in the trace; got {spans:#?}"))
    };
    assert!(
        spans.iter().any(|s| s.trace_id == logs_trace
            && s.service == "agentplane-host-agent"
            && s.name == "agentplane.v1.HostAgent/ReadLogs"),
        "the host's ReadLogs span is in the log read's trace: {spans:#?}"
    );
    let spawn = find(
        "agentplane-control-plane",
        "agentplane.v1.AgentService/SpawnAgent",
    );
    assert_eq!(
        spawn.parent, caller_span,
        "SpawnAgent's parent is the caller's span"
    );
    let start = find(
        "agentplane-host-agent",
        "agentplane.v1.HostAgent/StartAgent",
    );
    let fork = find("agentplane-host-agent", "fork/exec");

    // Each span's chain of parents, within the trace, reaches SpawnAgent.
    let by_id: HashMap<&str, &Got> = in_trace.iter().map(|s| (s.span_id.as_str(), *s)).collect();
    for leaf in [start, fork] {
        let mut at = leaf;
        let mut hops = 0;
        while at.span_id != spawn.span_id {
            at = by_id.get(at.parent.as_str()).unwrap_or_else(|| {
                panic!(
                    "{}'s parent chain breaks at {at:?}; trace: {in_trace:#?}",
                    leaf.name
                )
            });
            hops += 1;
            assert!(hops < 10, "a parent cycle: {in_trace:#?}");
        }
    }
    server.abort();
}

/// The JSON log lines of `log` (one object per line; others skipped).
fn json_lines(log: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_name_the_call_its_code_time_trace_request_agent_and_host() {
    let cluster = TestCluster::builder()
        .control_plane_arg("--log-json")
        .host_arg("--log-json")
        .start()
        .await;
    let trace_id = "5bf92f3577b34da6a3ce929d0e0e4731";
    let mut req = tonic::Request::new(SpawnAgentRequest {
        spec: Some(spec(&["sleep", "1000"], None)),
        request_id: "json-logs-1".into(),
    });
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-00f067aa0ba902b7-01")
            .parse()
            .expect("metadata"),
    );
    let agent = cluster
        .client()
        .await
        .spawn_agent(req)
        .await
        .expect("spawn")
        .into_inner()
        .agent
        .expect("agent");

    let log = cluster.control_planes[0].proc.log.clone();
    let lines = eventually(Duration::from_secs(10), "the SpawnAgent rpc line", || {
        let lines = json_lines(&log);
        async move {
            lines
                .iter()
                .any(|l| l["fields"]["rpc"] == "agentplane.v1.AgentService/SpawnAgent")
                .then_some(lines)
        }
    })
    .await;
    let rpc = lines
        .iter()
        .find(|l| l["fields"]["rpc"] == "agentplane.v1.AgentService/SpawnAgent")
        .expect("found");
    assert_eq!(rpc["level"], "DEBUG", "{rpc}");
    assert_eq!(rpc["fields"]["code"], "Ok", "{rpc}");
    assert!(
        rpc["fields"]["elapsed_ms"]
            .as_f64()
            .is_some_and(|ms| ms > 0.0),
        "{rpc}"
    );
    assert_eq!(rpc["fields"]["trace_id"], trace_id, "{rpc}");
    assert_eq!(
        lines
            .iter()
            .filter(|l| l["fields"]["rpc"] == "agentplane.v1.AgentService/SpawnAgent")
            .count(),
        1,
        "one line per call"
    );
    let placed = lines
        .iter()
        .find(|l| l["fields"]["message"] == "agent placed")
        .unwrap_or_else(|| panic!("no `agent placed` line: {lines:#?}"));
    assert_eq!(placed["fields"]["agent"], agent.id.as_str(), "{placed}");
    assert_eq!(placed["fields"]["host"], "h1", "{placed}");
    assert_eq!(placed["fields"]["generation"], 1, "{placed}");
    assert_eq!(placed["span"]["request_id"], "json-logs-1", "{placed}");

    let host_log = cluster.hosts[0].proc.log.clone();
    let started = eventually(
        Duration::from_secs(10),
        "the host's StartAgent line",
        || {
            let lines = json_lines(&host_log);
            async move {
                lines
                    .into_iter()
                    .find(|l| l["fields"]["rpc"] == "agentplane.v1.HostAgent/StartAgent")
            }
        },
    )
    .await;
    assert_eq!(started["fields"]["code"], "Ok", "{started}");
    cluster.finish().await;
}
