//! bench-sweep: what the control plane's record sweep costs.
//!
//! Starts a real Redis, fills it with N synthetic agent records (RUNNING on
//! one live host, each with its lease), then runs the sweep's passes (one
//! slice each, as the reconciler does once per `--reconcile-interval`) until
//! one whole round is done, and prints the cost of a slice and of a round.
//! Baseline, measured in the same run: a bare `SCAN` round over the same
//! keys (no reads), so the ratio says what reading and judging each record adds.

use std::time::{Duration, Instant};

use agentplane::proto::v1::{AgentSpec, AgentState};
use agentplane::registry::{AgentIndex, Registry};
use agentplane_control_plane::sweep::SLICE;
use agentplane_integration_tests::sweep_harness::bare_host_sweep;
use agentplane_integration_tests::RedisServer;
use clap::Parser;
use prost::Message;
use redis::AsyncCommands;

/// Measure the record sweep.
#[derive(Debug, Parser)]
struct Args {
    /// Synthetic records to fill the registry with.
    #[arg(long, default_value_t = 10_000)]
    records: usize,
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let redis = RedisServer::start(dir.path(), &[]).await;
    let registry = Registry::new(&redis.url(), "ap")?;
    let mut conn = redis.conn().await;
    // Synthetic records on one host; the sweep's live hosts are that host.
    let (live, mut sweep) =
        bare_host_sweep(&registry, &mut conn, "h1", Duration::from_secs(11)).await?;
    let spec = AgentSpec {
        argv: vec!["sleep".into(), "1000".into()],
        ..Default::default()
    }
    .encode_to_vec();
    let filled = Instant::now();
    for chunk in 0..args.records.div_ceil(1000) {
        let mut pipe = redis::pipe();
        for i in chunk * 1000..((chunk + 1) * 1000).min(args.records) {
            let id = format!("{:026}", i);
            let fields: [(&str, Vec<u8>); 7] = [
                ("id", id.clone().into_bytes()),
                ("spec", spec.clone()),
                ("state", b"RUNNING".to_vec()),
                ("host", b"h1".to_vec()),
                ("pid", b"4242".to_vec()),
                ("generation", b"1".to_vec()),
                ("created_at", b"1700000000000".to_vec()),
            ];
            pipe.hset_multiple(format!("ap:agent:{id}"), &fields)
                .ignore()
                .sadd("ap:host-agents:h1", &id)
                .ignore()
                .zadd("ap:agents", &id, 0)
                .ignore()
                .zadd("ap:state:RUNNING", &id, 0)
                .ignore()
                .pset_ex(format!("ap:loc:{id}"), "h1", 3_600_000)
                .ignore();
        }
        pipe.query_async::<()>(&mut conn).await?;
    }
    println!(
        "filled {} records in {:.2?}",
        args.records,
        filled.elapsed()
    );

    // Baseline: one bare round over the agent index, same slice.
    let t = Instant::now();
    let mut after = String::new();
    let mut scanned = 0usize;
    loop {
        let ids = registry
            .page_agent_ids(&AgentIndex::All, &after, SLICE)
            .await?;
        scanned += ids.len();
        match ids.last() {
            Some(last) if ids.len() == SLICE => after.clone_from(last),
            _ => break,
        }
    }
    let scan_round = t.elapsed();
    // Second baseline: the index plus the one pipelined read of each slice.
    let t = Instant::now();
    let mut after = String::new();
    loop {
        let ids = registry
            .page_agent_ids(&AgentIndex::All, &after, SLICE)
            .await?;
        registry.get_agents_with_leases(&ids).await?;
        match ids.last() {
            Some(last) if ids.len() == SLICE => after.clone_from(last),
            _ => break,
        }
    }
    let read_round = t.elapsed();

    let mut slices = Vec::new();
    let mut read = 0usize;
    let mut acted = 0usize;
    let round = Instant::now();
    loop {
        let t = Instant::now();
        let stats = sweep
            .pass(&live, &Default::default(), true, Duration::ZERO)
            .await?;
        slices.push(t.elapsed());
        read += stats.read;
        acted += stats.acted;
        if stats.wrapped {
            break;
        }
    }
    let sweep_round = round.elapsed();
    slices.sort();
    let mean = sweep_round / u32::try_from(slices.len())?;
    let max = slices.last().copied().unwrap_or_default();
    let state: Option<String> = conn
        .hget("ap:agent:00000000000000000000000000", "state")
        .await?;
    println!(
        "records {}: {} slices of up to {SLICE}; slice mean {:.2?}, max {:.2?}; \
         round {:.2?} ({:.1} us/record), {read} read, {acted} changed",
        args.records,
        slices.len(),
        mean,
        max,
        sweep_round,
        sweep_round.as_secs_f64() * 1e6 / args.records.max(1) as f64,
    );
    println!(
        "baselines: bare index round {:.2?} over {scanned} ids; index + record reads {:.2?}; \
         sweep/index = {:.1}, sweep/(index+read) = {:.2}",
        scan_round,
        read_round,
        sweep_round.as_secs_f64() / scan_round.as_secs_f64().max(1e-9),
        sweep_round.as_secs_f64() / read_round.as_secs_f64().max(1e-9)
    );
    // Where the read's time goes: Redis's own share.
    let stats = redis.commandstats().await;
    for line in stats.lines().filter(|l| {
        ["hgetall", "hmget", "exists", "get"]
            .iter()
            .any(|c| l.starts_with(&format!("cmdstat_{c}:")))
    }) {
        println!("redis: {line}");
    }
    // The reconciler gives each pass a quarter of its interval.
    for interval in [Duration::from_millis(200), Duration::from_secs(1)] {
        let per_pass = (interval / 4).as_secs_f64() / mean.as_secs_f64().max(1e-9);
        let passes = (slices.len() as f64 / per_pass.max(1.0)).ceil();
        println!(
            "at --reconcile-interval {interval:?}: ~{:.0} slices per pass, a round in ~{passes:.0} passes = {:.1?}",
            per_pass.max(1.0),
            interval.mul_f64(passes)
        );
    }
    anyhow::ensure!(acted == 0, "healthy records were changed");
    anyhow::ensure!(
        state.as_deref() == Some(agentplane::state::name(AgentState::Running)),
        "a record changed state: {state:?}"
    );
    anyhow::ensure!(
        read >= args.records,
        "read {read} of {} records",
        args.records
    );
    Ok(())
}
