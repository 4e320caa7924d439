//! soak: the randomized fault soak for any duration. Prints the seed, rounds,
//! faults by kind, client operations and every violation; exits 1 on any.

use std::time::Duration;

use agentplane_integration_tests::soak::{run, SoakConfig};
use clap::Parser;

/// Run the fault soak.
#[derive(Debug, Parser)]
struct Args {
    /// Seed (default: random, printed).
    #[arg(long)]
    seed: Option<u64>,
    /// How long to run, e.g. 30m.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Agents the clients keep.
    #[arg(long, default_value_t = 60)]
    agents: usize,
    /// The hosts' heartbeat TTL.
    #[arg(long, default_value = "1500ms", value_parser = humantime::parse_duration)]
    ttl: Duration,
    /// Redis behind Sentinel, with "fail over Redis" among the faults.
    #[arg(long)]
    sentinel: bool,
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let seed = a.seed.unwrap_or_else(rand::random::<u64>);
    println!(
        "soak: seed {seed}, {:?}, {} agents, ttl {:?}",
        a.duration, a.agents, a.ttl
    );
    let report = run(&SoakConfig {
        seed,
        duration: a.duration,
        agents: a.agents,
        ttl: a.ttl,
        sentinel: a.sentinel,
    })
    .await;
    println!("rounds: {}", report.rounds);
    for (k, n) in &report.faults {
        println!("fault {k}: {n}");
    }
    for (k, n) in &report.ops {
        println!("op {k}: {n}");
    }
    println!(
        "records dropped with Redis's data: {}",
        report.dropped_with_redis
    );
    println!("violations: {}", report.violations.len());
    for v in &report.violations {
        println!("  {v}");
    }
    anyhow::ensure!(
        report.violations.is_empty(),
        "violations found (seed {seed})"
    );
    Ok(())
}
