//! Pieces the benchmarks share: a registry filled with other agents'
//! records, and a follower's throughput against a plain pipe's.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use agentplane::proto::v1::agent_service_client::AgentServiceClient;
use agentplane::proto::v1::{
    AgentSpec, LogChunk, SpawnAgentRequest, StopAgentRequest, StreamLogsRequest,
};
use prost::Message;

use crate::TestCluster;

mod client;
mod figures;
mod floor;
mod ping;
pub use client::{latencies, Latencies};
pub use figures::{info_field, pass_buckets, percentile, print_table, Row};
pub use floor::{follow_floor_rate, relay_floor_rate};
pub use ping::{ping_stalls, PingStalls};

/// Writes `n` records of ended agents (EXITED, on a host that is gone) under
/// `prefix`, with their index entries: a fleet's history that no pass acts
/// on but every walk of the records meets.
pub async fn fill_other_records(
    conn: &mut redis::aio::MultiplexedConnection,
    prefix: &str,
    n: usize,
) -> redis::RedisResult<()> {
    let spec = AgentSpec {
        argv: vec!["sleep".into(), "1000".into()],
        ..Default::default()
    }
    .encode_to_vec();
    for chunk in 0..n.div_ceil(1000) {
        let mut pipe = redis::pipe();
        for i in chunk * 1000..((chunk + 1) * 1000).min(n) {
            let id = format!("{i:026}");
            let fields: [(&str, Vec<u8>); 7] = [
                ("id", id.clone().into_bytes()),
                ("spec", spec.clone()),
                ("state", b"EXITED".to_vec()),
                ("host", b"gone".to_vec()),
                ("pid", b"0".to_vec()),
                ("generation", b"1".to_vec()),
                ("created_at", b"1700000000000".to_vec()),
            ];
            pipe.hset_multiple(format!("{prefix}:agent:{id}"), &fields)
                .ignore()
                .zadd(format!("{prefix}:agents"), &id, 0)
                .ignore()
                .zadd(format!("{prefix}:state:EXITED"), &id, 0)
                .ignore();
        }
        pipe.query_async::<()>(conn).await?;
    }
    Ok(())
}

/// Sends the `n` spawns `request(i)` makes, `concurrency` at once; their
/// answers in the order they came.
pub async fn spawn_concurrently(
    client: &AgentServiceClient<crate::pki::Authed>,
    n: usize,
    concurrency: usize,
    request: impl Fn(usize) -> SpawnAgentRequest,
) -> Vec<Result<agentplane::proto::v1::SpawnAgentResponse, tonic::Status>> {
    use futures::StreamExt;
    futures::stream::iter((0..n).map(request))
        .map(|req| {
            let mut client = client.clone();
            async move {
                client
                    .spawn_agent(req)
                    .await
                    .map(tonic::Response::into_inner)
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await
}

/// Where one `yes` agent's output goes how fast, in bytes per second, each
/// measured over the same span: the follower's path taken apart.
#[derive(Debug, Clone, Copy)]
pub struct FollowRates {
    /// Written to its log with nobody reading: the capture alone.
    pub captured: f64,
    /// Followed from the host agent itself (ReadLogs): capture and one hop.
    pub direct: f64,
    /// Followed through the control plane (StreamLogs, from the first byte):
    /// capture and two hops.
    pub via_control_plane: f64,
}

/// [`FollowRates`] of one `yes` agent, each over `d`.
pub async fn follower_rate(cluster: &TestCluster, d: Duration) -> anyhow::Result<FollowRates> {
    let mut client = cluster.client().await;
    let agent = client
        .spawn_agent(SpawnAgentRequest {
            spec: Some(AgentSpec {
                argv: vec!["yes".into()],
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await?
        .into_inner()
        .agent
        .unwrap_or_default();
    let before = log_end(&mut client, &agent.id).await?;
    let t = Instant::now();
    tokio::time::sleep(d).await;
    let captured =
        (log_end(&mut client, &agent.id).await? - before) as f64 / t.elapsed().as_secs_f64();
    let req = StreamLogsRequest {
        id: agent.id.clone(),
        follow: true,
        ..Default::default()
    };
    let direct = rate_of(
        cluster
            .host_agent(0)
            .read_logs(req.clone())
            .await?
            .into_inner(),
        d,
    )
    .await?;
    let via_control_plane = rate_of(client.stream_logs(req).await?.into_inner(), d).await?;
    client
        .stop_agent(StopAgentRequest {
            id: agent.id,
            grace: None,
        })
        .await?;
    Ok(FollowRates {
        captured,
        direct,
        via_control_plane,
    })
}

/// Where agent `id`'s output ends now.
async fn log_end(
    client: &mut AgentServiceClient<crate::pki::Authed>,
    id: &str,
) -> anyhow::Result<u64> {
    let mut tail = client
        .stream_logs(StreamLogsRequest {
            id: id.to_owned(),
            tail_lines: Some(1),
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut end = 0;
    while let Some(c) = tail.message().await? {
        end = end.max(c.offset + c.data.len() as u64);
    }
    Ok(end)
}

/// Bytes per second `stream` delivers over `d` (it is dropped after).
async fn rate_of(mut stream: tonic::Streaming<LogChunk>, d: Duration) -> anyhow::Result<f64> {
    let t = Instant::now();
    let mut bytes = 0u64;
    while t.elapsed() < d {
        match tokio::time::timeout(d.saturating_sub(t.elapsed()), stream.message()).await {
            Ok(Ok(Some(chunk))) => bytes += chunk.data.len() as u64,
            Ok(Ok(None)) => break,
            Ok(Err(s)) => anyhow::bail!("follow: {s}"),
            Err(_) => break,
        }
    }
    Ok(bytes as f64 / t.elapsed().as_secs_f64())
}

/// Bytes per second this process reads from `yes` through a plain pipe over
/// `d` (64 KiB reads): the follower's baseline.
pub fn pipe_rate(d: Duration) -> std::io::Result<f64> {
    yes_into(d, |_| Ok(()))
}

/// Bytes per second this process moves from `yes` through a plain pipe
/// into a file in `dir` over `d` (64 KiB reads and writes; the file starts
/// again from empty at 32 MiB, as a capped log drops its older half): what
/// this machine can write to a file at all, which every captured byte is
/// (`the path` of [`FollowRates`]).
pub fn pipe_to_file_rate(d: Duration, dir: &std::path::Path) -> std::io::Result<f64> {
    use std::io::{Seek, Write};
    let path = dir.join("bench-pipe-to-file");
    let mut file = std::fs::File::create(&path)?;
    let mut written = 0u64;
    let rate = yes_into(d, |chunk| {
        if written >= 32 << 20 {
            file.set_len(0)?;
            file.rewind()?;
            written = 0;
        }
        file.write_all(chunk)?;
        written += chunk.len() as u64;
        Ok(())
    });
    std::fs::remove_file(&path)?;
    rate
}

/// Bytes per second read from `yes` over `d`, each read handed to `sink`.
fn yes_into(
    d: Duration,
    mut sink: impl FnMut(&[u8]) -> std::io::Result<()>,
) -> std::io::Result<f64> {
    let mut child = Command::new("yes").stdout(Stdio::piped()).spawn()?;
    let mut out = child.stdout.take().expect("piped");
    let mut buf = vec![0u8; 64 * 1024];
    let t = Instant::now();
    let mut bytes = 0u64;
    let mut sunk = Ok(());
    while t.elapsed() < d && sunk.is_ok() {
        let n = out.read(&mut buf)?;
        sunk = sink(&buf[..n]);
        bytes += n as u64;
    }
    let rate = bytes as f64 / t.elapsed().as_secs_f64();
    child.kill()?;
    child.wait()?;
    sunk.map(|()| rate)
}
