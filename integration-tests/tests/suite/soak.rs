//! The randomized fault soak, about 90 s of it and 60 s more with Redis behind
//! Sentinel (`AGENTPLANE_SOAK_SECONDS`,
//! `AGENTPLANE_SOAK_SEED` to repeat a run); the `soak` binary runs any length.

use std::time::Duration;

use agentplane_integration_tests::soak::{run, SoakConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_randomized_fault_soak_finds_no_violation() {
    soak(false, 90).await;
}

/// The same with Redis behind Sentinel: its master is SIGKILLed as a fault.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_randomized_fault_soak_with_redis_failovers_finds_no_violation() {
    soak(true, 60).await;
}

async fn soak(sentinel: bool, default_secs: u64) {
    let seed = std::env::var("AGENTPLANE_SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    let secs = std::env::var("AGENTPLANE_SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default_secs);
    eprintln!(
        "soak seed {seed} (AGENTPLANE_SOAK_SEED={seed} repeats it), {secs} s, sentinel {sentinel}"
    );
    let cfg = SoakConfig {
        seed,
        duration: Duration::from_secs(secs),
        agents: 20,
        ttl: Duration::from_millis(1500),
        sentinel,
    };
    let report = run(&cfg).await;
    eprintln!(
        "soak seed {seed}: {} rounds, faults {:?}, ops {:?}, {} records dropped with Redis's data, {} violations",
        report.rounds,
        report.faults,
        report.ops,
        report.dropped_with_redis,
        report.violations.len()
    );
    assert!(report.violations.is_empty(), "{:#?}", report.violations);
}
