//! bench-fleet: how the control plane and Redis hold up as the fleet grows.
//!
//! For each size (`--hosts 100,1000` × `--agents-per-host 100`): a fresh
//! real Redis and a real control plane (the binary next to this one: build
//! with `scripts/build-release`), and simulated hosts in this process
//! (`agentplane_integration_tests::fleet`: they register, heartbeat and
//! write records as host agents do, but fork nothing) on a runtime of
//! their own whose threads run at nice 10 (`--sim-nice`): they stand in
//! for other machines, so they take what CPU the servers leave. The fleet is spawned
//! through the control plane, then measured at rest and under a probe of
//! further spawns. Prints, per size and as the ratio of the last size to
//! the first: spawn rate (the fill and the probe at full size), locate
//! p50/p99, one `ls` page p50/p99, the reconcile pass (mean and largest),
//! a heartbeat per host p50/p99, Redis commands/s at rest and Redis memory
//! per agent; and where the CPU goes: cores busy at rest (control plane,
//! Redis, the simulated hosts) and CPU per spawn beyond that rest load.

use std::sync::Arc;
use std::time::{Duration, Instant};

use agentplane::proto::v1::{AgentSpec, SpawnAgentRequest};
use agentplane::registry::Registry;
use agentplane_integration_tests::bench::{
    info_field, latencies, pass_buckets, percentile, ping_stalls, print_table, PingStalls, Row,
};
use agentplane_integration_tests::fleet::{Beats, SimHost};
use agentplane_integration_tests::{cpu, metrics, TestCluster};
use clap::Parser;
use rand::{Rng, SeedableRng};
use tokio_util::sync::CancellationToken;

/// mimalloc: this one heap holds a thousand simulated hosts' state (a host
/// agent, its own agents'), and on glibc's malloc its CPU per spawn grew
/// with it (1.17-1.28x from 10k to 100k, here 0.84-1.10x).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Benchmark a simulated fleet.
#[derive(Debug, Parser)]
struct Args {
    /// Fleet sizes, as numbers of simulated hosts (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "100,1000")]
    hosts: Vec<usize>,
    /// Agents spawned per host.
    #[arg(long, default_value_t = 100)]
    agents_per_host: usize,
    /// Spawns in flight at once.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Spawns measured once the fleet is full.
    #[arg(long, default_value_t = 10000)]
    probe: usize,
    /// Locate calls and ls pages measured (one at a time).
    #[arg(long, default_value_t = 2000)]
    calls: usize,
    /// The simulated hosts' heartbeat TTL (they beat every third of it).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    ttl: Duration,
    /// The control plane's reconcile interval (its passes list the live
    /// hosts and sweep a slice of the records).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1s")]
    reconcile_interval: Duration,
    /// How long the fleet is watched at rest (commands/s, passes, beats).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    rest: Duration,
    /// Seed of the random ids located (printed; a run can be repeated).
    #[arg(long)]
    seed: Option<u64>,
    /// Nice value of the simulated hosts' threads (0-19). They stand in
    /// for a thousand other machines: at a higher nice value they take the
    /// CPU the servers and the client leave instead of delaying them (the
    /// heartbeats' Redis work still counts in full). 0: share alike.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(i32).range(0..=19))]
    sim_nice: i32,
    /// Run the simulated hosts' threads under SCHED_IDLE (`chrt --idle`)
    /// instead of `--sim-nice`: they run only on a core nothing else
    /// wants, so their CPU never delays Redis, the control plane or the
    /// client (at nice 10 it still did: a PING beside the fleet at rest
    /// waited over 1 ms 1.0 % of the time, against 0.4 % under SCHED_IDLE).
    /// Off by default: under SCHED_IDLE the simulated hosts also answer
    /// StartAgent last, which slows the 10k probe (the baseline) more
    /// than the 100k one.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
    sim_idle: bool,
    /// The control plane's `--worker-threads` (0: one per core). One by
    /// default: on 2 cores shared with Redis, the client and the simulated
    /// hosts, a second worker cost it about a third more CPU per spawn
    /// (wakeups across threads) and lowered both sizes' rates.
    #[arg(long, default_value_t = 1)]
    cp_worker_threads: u16,
    /// Redis connections the simulated hosts' heartbeats share (0: one per
    /// host, as host agents have). Redis serves each connection's queued
    /// commands in a batch, so a few shared connections turn the same
    /// beats into longer bursts that every other call waits behind.
    #[arg(long, default_value_t = 0)]
    beat_connections: usize,
}

/// What one size measured.
#[derive(Debug, Default, Clone)]
struct Figures {
    agents: usize,
    hosts: usize,
    fill_rate: f64,
    probe_rate: f64,
    held_probe_rate: f64,
    /// The machine's speed just before the probe ([`cpu::speed`],
    /// [`cpu::memory_latency_ns`]).
    speed: (f64, f64),
    locate_p50: Duration,
    locate_p99: Duration,
    quiet_locate_p99: Duration,
    /// Locates over 1 ms, and how many of them had a slow GET beside.
    slow_locates: (usize, usize),
    get_p99: Duration,
    quiet_get_p99: Duration,
    /// Redis answering a PING of its own at rest (see `ping_stalls`).
    pings: PingStalls,
    ls_p50: Duration,
    ls_p99: Duration,
    pass_mean: Duration,
    pass_max_bucket: f64,
    beat_p50: Duration,
    beat_p99: Duration,
    ops_at_rest: f64,
    bytes_per_agent: f64,
    /// CPU cores busy at rest: control plane, Redis, this process (the
    /// simulated hosts and the client).
    rest_cores: [f64; 3],
    /// Cores the whole machine was busy during the probe.
    probe_machine_cores: f64,
    /// CPU ms per probe spawn, net of the rest load: the same three.
    spawn_cpu_ms: [f64; 3],
}

/// Spawns `n` agents, `concurrency` at once; the rate and the ids.
async fn spawn_many(
    cluster: &TestCluster,
    n: usize,
    concurrency: usize,
) -> anyhow::Result<(f64, Vec<String>)> {
    let client = cluster.client().await;
    let t = Instant::now();
    let results =
        agentplane_integration_tests::bench::spawn_concurrently(&client, n, concurrency, |i| {
            SpawnAgentRequest {
                spec: Some(AgentSpec {
                    argv: vec!["sleep".into(), "100000".into()],
                    labels: [("team".to_owned(), format!("t{}", i % 10))].into(),
                    ..Default::default()
                }),
                request_id: String::new(),
            }
        })
        .await;
    let rate = n as f64 / t.elapsed().as_secs_f64();
    let mut ids = Vec::with_capacity(n);
    for r in results {
        ids.push(r?.agent.unwrap_or_default().id);
    }
    Ok((rate, ids))
}

/// Starts `hosts` simulated hosts (on the runtime this runs on, which their
/// servers and heartbeats then use).
async fn start_sims(
    hosts: usize,
    beat_connections: usize,
    capacity: u32,
    registry: Registry,
    ttl: Duration,
    beats: Arc<Beats>,
    cancel: CancellationToken,
) -> anyhow::Result<Vec<Arc<SimHost>>> {
    let mut conns = Vec::new();
    let n = if beat_connections == 0 {
        hosts
    } else {
        beat_connections
    };
    for _ in 0..n {
        conns.push(
            registry
                .dedicated_connection(Duration::from_secs(10))
                .await?,
        );
    }
    let mut sims = Vec::with_capacity(hosts);
    for i in 0..hosts {
        sims.push(
            SimHost::start(
                format!("sim{i:04}"),
                capacity,
                registry.clone(),
                conns[i % conns.len()].clone(),
                ttl,
                beats.clone(),
                cancel.clone(),
            )
            .await?,
        );
    }
    Ok(sims)
}

async fn measure(
    args: &Args,
    sim_runtime: &tokio::runtime::Handle,
    hosts: usize,
    rng: &mut rand::rngs::StdRng,
) -> anyhow::Result<Figures> {
    let agents = hosts * args.agents_per_host;
    let mut builder = TestCluster::builder()
        .hosts(0)
        .reconcile_interval(args.reconcile_interval)
        .control_plane_arg("--metrics-listen=127.0.0.1:0");
    if args.cp_worker_threads > 0 {
        let workers = format!("--worker-threads={}", args.cp_worker_threads);
        builder = builder.control_plane_arg(&workers);
    }
    let cluster = builder.start().await;
    let metrics_addr = metrics::addr(&cluster.control_planes[0]).await;
    let registry = Registry::new(&cluster.redis.url(), "ap")?;
    let mut conn = cluster.redis.conn().await;
    let cancel = CancellationToken::new();
    let beats = Arc::new(Beats::default());
    let capacity = u32::try_from(args.agents_per_host * 2 + args.probe)?;
    let sims = sim_runtime
        .spawn(start_sims(
            hosts,
            args.beat_connections,
            capacity,
            registry.clone(),
            args.ttl,
            beats.clone(),
            cancel.clone(),
        ))
        .await??;
    cluster.wait_for_hosts(hosts).await;
    let memory_before = info_field(&mut conn, "memory", "used_memory").await;

    let (fill_rate, ids) = spawn_many(&cluster, agents, args.concurrency).await?;
    eprintln!("{hosts} hosts: filled {agents} agents at {fill_rate:.0}/s");
    // One beat of every host with its full set before memory is read.
    tokio::time::sleep(args.ttl / 3 + Duration::from_millis(500)).await;
    let memory_after = info_field(&mut conn, "memory", "used_memory").await;

    // At rest: Redis commands, reconcile passes, heartbeats.
    let scrape = |addr: String| async move { metrics::scrape(&addr).await };
    let before = scrape(metrics_addr.clone()).await;
    let pids = [
        ("control plane", cluster.control_planes[0].proc.pid()),
        ("redis", cluster.redis.pid().unwrap_or(0)),
        ("simulator", i32::try_from(std::process::id())?),
    ];
    let cpu = cpu::Split::start(&pids);
    let cmds0 = info_field(&mut conn, "stats", "total_commands_processed").await;
    let calls0 = cluster.redis.command_calls().await;
    beats.take();
    let t = Instant::now();
    // Redis's own tail at rest, from a thread and socket of its own.
    let (port, window) = (cluster.redis.port(), args.rest);
    let pings = std::thread::spawn(move || ping_stalls(port, window));
    tokio::time::sleep(args.rest).await;
    let pings = pings
        .join()
        .map_err(|_| anyhow::anyhow!("the PING thread panicked"))??;
    let cmds1 = info_field(&mut conn, "stats", "total_commands_processed").await;
    let rest = t.elapsed();
    let rest_ms = cpu.end().per_unit_ms(1, &[]);
    let calls1 = cluster.redis.command_calls().await;
    let mut busiest: Vec<(String, u64)> = calls1
        .iter()
        .map(|(c, n)| (c.clone(), n - calls0.get(c).copied().unwrap_or(0)))
        .collect();
    busiest.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
    let busiest: Vec<String> = busiest
        .iter()
        .take(6)
        .map(|(c, n)| format!("{c} {:.0}/s", *n as f64 / rest.as_secs_f64()))
        .collect();
    eprintln!("{hosts} hosts at rest: {}", busiest.join(", "));
    let after = scrape(metrics_addr.clone()).await;
    let mut beat_times = beats.take();
    beat_times.sort();
    let pass = |text: &str, s: &str| {
        metrics::value(
            text,
            &format!("agentplane_reconcile_pass_duration_seconds_{s}"),
        )
        .unwrap_or(0.0)
    };
    let passes = pass(&after, "count") - pass(&before, "count");
    let pass_mean =
        Duration::from_secs_f64((pass(&after, "sum") - pass(&before, "sum")) / passes.max(1.0));
    // The smallest bucket bound that holds every pass of the window.
    let pass_max_bucket = pass_buckets(&after)
        .into_iter()
        .zip(pass_buckets(&before))
        .find(|((_, now), (_, was))| now - was >= passes)
        .map_or(f64::NAN, |((le, _), _)| le);

    // Locate random agents and read ls pages, one at a time, from a thread
    // and runtime of their own: the simulated hosts' work on this process's
    // runtime must not delay the client's polling.
    let picks: Vec<String> = (0..args.calls)
        .map(|_| ids[rng.random_range(0..ids.len())].clone())
        .collect();
    let busy = latencies(
        cluster.endpoint(0),
        cluster.redis.url(),
        picks.clone(),
        args.calls.min(agents / 100),
    )?;
    // Again with every heartbeat held (under a third of the TTL): what the
    // fleet's steady load adds to the tail.
    beats.hold(true);
    let held = Instant::now();
    let quiet = latencies(
        cluster.endpoint(0),
        cluster.redis.url(),
        picks[..picks.len().min(1000)].to_vec(),
        0,
    )?;
    beats.hold(false);
    anyhow::ensure!(held.elapsed() < args.ttl / 3, "beats held too long");

    // Spawns once the fleet is full, and their CPU beyond the rest load
    // (the line marks the start for a profiler).
    let speed = tokio::task::block_in_place(|| (cpu::speed(), cpu::memory_latency_ns()));
    eprintln!("{hosts} hosts: probe of {} spawns", args.probe);
    let cpu = cpu::Split::start(&pids);
    let t = Instant::now();
    let (probe_rate, _) = spawn_many(&cluster, args.probe, args.concurrency).await?;
    let probe_secs = t.elapsed().as_secs_f64();
    let probe_ms = cpu.end().per_unit_ms(1, &[]);
    let probe_machine_cores = probe_ms
        .iter()
        .find(|(n, _)| n == "machine")
        .map_or(0.0, |(_, ms)| ms / 1e3 / probe_secs);
    let rest_cores: [f64; 3] = std::array::from_fn(|i| rest_ms[i].1 / 1e3 / rest.as_secs_f64());
    let spawn_cpu_ms: [f64; 3] = std::array::from_fn(|i| {
        (probe_ms[i].1 - rest_cores[i] * probe_secs * 1e3) / args.probe as f64
    });
    // Spawns with every heartbeat held (a few thousand, well under a third
    // of the TTL): the spawn path alone at this fleet size.
    beats.hold(true);
    let held = Instant::now();
    let (held_probe_rate, _) = spawn_many(&cluster, args.probe.min(3000), args.concurrency).await?;
    beats.hold(false);
    anyhow::ensure!(held.elapsed() < args.ttl / 3, "beats held too long");
    cancel.cancel();
    drop(sims);
    // Beats in flight finish before Redis goes with the cluster.
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(Figures {
        agents,
        hosts,
        fill_rate,
        probe_rate,
        held_probe_rate,
        speed,
        locate_p50: percentile(&busy.locates, 0.5),
        locate_p99: percentile(&busy.locates, 0.99),
        quiet_locate_p99: percentile(&quiet.locates, 0.99),
        slow_locates: busy.slow_locates,
        get_p99: percentile(&busy.gets, 0.99),
        quiet_get_p99: percentile(&quiet.gets, 0.99),
        pings,
        ls_p50: percentile(&busy.pages, 0.5),
        ls_p99: percentile(&busy.pages, 0.99),
        pass_mean,
        pass_max_bucket,
        beat_p50: percentile(&beat_times, 0.5),
        beat_p99: percentile(&beat_times, 0.99),
        ops_at_rest: (cmds1 - cmds0) / rest.as_secs_f64(),
        bytes_per_agent: (memory_after - memory_before) / agents as f64,
        rest_cores,
        probe_machine_cores,
        spawn_cpu_ms,
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let seed = args.seed.unwrap_or_else(rand::random);
    println!("bench-fleet seed {seed} (repeat with --seed {seed})");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut all = Vec::new();
    // The simulated hosts' own runtime, its threads under SCHED_IDLE or
    // at `--sim-nice`.
    let (nice, idle) = (args.sim_nice, args.sim_idle);
    let sim_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("sim-host")
        .on_thread_start(move || {
            // Per thread on Linux (NPTL): only the simulator's threads.
            if idle {
                if let Err(e) = cpu::sched_idle() {
                    eprintln!("cannot run the simulated hosts under SCHED_IDLE: {e}");
                }
            } else if let Err(e) = rustix::process::setpriority_process(None, nice) {
                eprintln!("cannot set the simulated hosts' nice value: {e}");
            }
        })
        .enable_all()
        .build()?;
    for &hosts in &args.hosts {
        all.push(measure(&args, sim_runtime.handle(), hosts, &mut rng).await?);
    }
    sim_runtime.shutdown_background();
    let rows: Vec<Row<Figures>> = vec![
        ("hosts", |f| f.hosts as f64),
        ("agents", |f| f.agents as f64),
        ("spawn rate, fill (/s)", |f| f.fill_rate),
        ("spawn rate, probe at full (/s)", |f| f.probe_rate),
        ("spawn rate, probe, beats held (/s)", |f| f.held_probe_rate),
        ("locate p50 (ms)", |f| ms(f.locate_p50)),
        ("locate p99 (ms)", |f| ms(f.locate_p99)),
        ("locate p99, beats held (ms)", |f| ms(f.quiet_locate_p99)),
        ("locates over 1 ms (count)", |f| f.slow_locates.0 as f64),
        ("  of them with the GET before > 0.5 ms", |f| {
            f.slow_locates.1 as f64
        }),
        ("redis GET p99, same client (ms)", |f| ms(f.get_p99)),
        ("redis GET p99, beats held (ms)", |f| ms(f.quiet_get_p99)),
        ("redis PING > 0.5 ms at rest (%)", |f| f.pings.over_half_ms),
        ("redis PING > 1 ms at rest (%)", |f| f.pings.over_1ms),
        ("redis PING slowest at rest (ms)", |f| ms(f.pings.max)),
        ("ls page of 100 p50 (ms)", |f| ms(f.ls_p50)),
        ("ls page of 100 p99 (ms)", |f| ms(f.ls_p99)),
        ("reconcile pass mean (ms)", |f| ms(f.pass_mean)),
        ("reconcile pass max, bucket (s)", |f| f.pass_max_bucket),
        ("heartbeat per host p50 (ms)", |f| ms(f.beat_p50)),
        ("heartbeat per host p99 (ms)", |f| ms(f.beat_p99)),
        ("redis commands/s at rest", |f| f.ops_at_rest),
        ("redis bytes per agent", |f| f.bytes_per_agent),
        ("cores at rest: control plane", |f| f.rest_cores[0]),
        ("cores at rest: redis", |f| f.rest_cores[1]),
        ("cores at rest: simulated hosts", |f| f.rest_cores[2]),
        ("machine cores busy in the probe", |f| f.probe_machine_cores),
        ("cpu ms per spawn: control plane", |f| f.spawn_cpu_ms[0]),
        ("cpu ms per spawn: redis", |f| f.spawn_cpu_ms[1]),
        ("cpu ms per spawn: sim + client", |f| f.spawn_cpu_ms[2]),
        // The probe's rate per core the rest load left it: on one machine
        // the rest load (a thousand simulated hosts' beats among it) takes
        // cores a real fleet's control plane would not share.
        ("spawns/s per core free of rest load", |f| {
            f.probe_rate / (f.probe_machine_cores - f.rest_cores.iter().sum::<f64>())
        }),
        // A fixed loop's rate on this thread's own CPU time: the VM's
        // speed at each size, beside the ratios above.
        ("machine speed before the probe (M/s)", |f| f.speed.0),
        ("memory latency before the probe (ns)", |f| f.speed.1),
    ];
    print_table(&all, |f| format!("{}k", f.agents / 1000), &rows);
    Ok(())
}
