//! The randomized fault soak, about 90 s of it (`AGENTPLANE_SOAK_SECONDS`,
//! `AGENTPLANE_SOAK_SEED` to repeat a run); the `soak` binary runs any length.

use std::time::Duration;

use agentplane_integration_tests::soak::{run, SoakConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_randomized_fault_soak_finds_no_violation() {
    let seed = std::env::var("AGENTPLANE_SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    let secs = std::env::var("AGENTPLANE_SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(90);
    eprintln!("soak seed {seed} (AGENTPLANE_SOAK_SEED={seed} repeats it), {secs} s");
    let cfg = SoakConfig {
        seed,
        duration: Duration::from_secs(secs),
        agents: 20,
        ttl: Duration::from_millis(1500),
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
