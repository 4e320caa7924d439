//! bench-conns: both servers (TLS, as deployed) under a flood of streams and
//! of half-open connections on loopback.
//!
//! For the control plane and then a host agent it measures, in one run:
//! a baseline (RSS; probes on fresh TLS connections and on an established
//! one: `ListAgents` with a viewer's token on the control plane, a health
//! check on the host agent), then with `--streams` long-lived streams open
//! (gRPC health `Watch`, which needs no token: what anyone who can connect
//! may hold; the control plane holds 256 of them, its places for calls
//! without a token), then with `--half-open` TCP connections that never
//! send a TLS ClientHello. It prints how many streams and connections the server held
//! or refused, its RSS, the probes' p50/p99 as ratios to the baseline, and
//! how long the server took to close the half-open connections. The whole
//! flood runs twice. Exits 1 if a probe failed (a server that stopped
//! answering new or existing clients), if the server still held the
//! half-open connections at three times its handshake timeout, or if the
//! second flood left RSS more than 16 MiB above the first (memory that is
//! not reused grows without bound; what the allocator keeps after the
//! first is reported, not judged).

use std::time::{Duration, Instant};

use agentplane_integration_tests::pki::{ClusterPki, Issued};
use agentplane_integration_tests::procfs::rss_kib;
use agentplane_integration_tests::TestCluster;
use clap::Parser;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// Flood both servers with streams and half-open connections.
#[derive(Debug, Parser)]
struct Args {
    /// Streams to hold open at once against each server.
    #[arg(long, default_value_t = 10_000)]
    streams: usize,
    /// Streams per connection (each server allows at most 1024).
    #[arg(long, default_value_t = 1000)]
    per_connection: usize,
    /// Half-open connections (TCP only, no TLS handshake) against each server.
    #[arg(long, default_value_t = 10_000)]
    half_open: usize,
    /// Floods per server; the RSS after the second and after the last are
    /// compared (the first warms the allocator up).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(2..))]
    rounds: u32,
    /// Probes per phase.
    #[arg(long, default_value_t = 30)]
    probes: usize,
    /// The servers' --tls-handshake-timeout.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    handshake_timeout: Duration,
}

/// One server under test.
struct Target {
    name: &'static str,
    pid: i32,
    url: String,
    tls_name: String,
    identity: Option<Issued>,
    /// The bearer token of the probes (the control plane's API); `None`:
    /// they are health checks.
    token: Option<&'static str>,
}

impl Target {
    /// One probe call on `ch`: what a real client of this server does.
    async fn call(&self, ch: Channel) -> bool {
        match self.token {
            Some(token) => {
                agentplane::proto::v1::agent_service_client::AgentServiceClient::with_interceptor(
                    ch,
                    agentplane_integration_tests::pki::Token::bearer(token),
                )
                .list_agents(agentplane::proto::v1::ListAgentsRequest::default())
                .await
                .is_ok()
            }
            None => HealthClient::new(ch)
                .check(HealthCheckRequest::default())
                .await
                .is_ok(),
        }
    }

    fn endpoint(&self, pki: &ClusterPki) -> Endpoint {
        Endpoint::from_shared(self.url.clone())
            .expect("endpoint")
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(5))
            .tls_config(pki.client_tls(&self.tls_name, self.identity.as_ref()))
            .expect("client TLS")
    }
}

/// Latencies of `n` health checks, each on a fresh connection (TLS
/// handshake included) or all on `established`; the number that failed.
async fn probe(
    t: &Target,
    pki: &ClusterPki,
    established: &Channel,
    n: usize,
) -> (Vec<Duration>, Vec<Duration>, usize) {
    let (mut fresh, mut kept, mut failed) = (Vec::new(), Vec::new(), 0);
    for _ in 0..n {
        let start = Instant::now();
        let ok = async {
            let ch = t.endpoint(pki).connect().await.ok()?;
            t.call(ch).await.then_some(())
        }
        .await;
        match ok {
            Some(_) => fresh.push(start.elapsed()),
            None => failed += 1,
        }
        let start = Instant::now();
        match t.call(established.clone()).await {
            true => kept.push(start.elapsed()),
            false => failed += 1,
        }
    }
    (fresh, kept, failed)
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.sort_unstable();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64().max(1e-6)
}

/// The probes of one phase, as a line of ratios to the baseline's.
struct Probes {
    fresh: (Duration, Duration),
    kept: (Duration, Duration),
    failed: usize,
}

impl Probes {
    async fn run(t: &Target, pki: &ClusterPki, established: &Channel, n: usize) -> Self {
        let (mut f, mut k, failed) = probe(t, pki, established, n).await;
        Self {
            fresh: (pct(&mut f, 0.5), pct(&mut f, 0.99)),
            kept: (pct(&mut k, 0.5), pct(&mut k, 0.99)),
            failed,
        }
    }

    fn line(&self, base: &Probes) -> String {
        format!(
            "fresh conn p50 {:?} ({:.1}x) p99 {:?} ({:.1}x); established p50 {:?} ({:.1}x) p99 {:?} ({:.1}x); failed {}",
            self.fresh.0,
            ratio(self.fresh.0, base.fresh.0),
            self.fresh.1,
            ratio(self.fresh.1, base.fresh.1),
            self.kept.0,
            ratio(self.kept.0, base.kept.0),
            self.kept.1,
            ratio(self.kept.1, base.kept.1),
            self.failed
        )
    }
}

/// Opens `n` health Watch streams over connections of `per` streams each;
/// returns the held streams and how many were refused, by reason.
async fn open_streams(
    t: &Target,
    pki: &ClusterPki,
    n: usize,
    per: usize,
) -> (
    Vec<tonic::Streaming<tonic_health::pb::HealthCheckResponse>>,
    Vec<String>,
) {
    let mut held = Vec::with_capacity(n);
    let mut refused = Vec::new();
    let mut left = n;
    while left > 0 {
        let batch = left.min(per);
        left -= batch;
        let ch = match t.endpoint(pki).connect().await {
            Ok(c) => c,
            Err(e) => {
                refused.extend((0..batch).map(|_| format!("connect: {e}")));
                continue;
            }
        };
        let opened = futures::future::join_all((0..batch).map(|_| {
            let mut c = HealthClient::new(ch.clone());
            async move {
                let mut s = c.watch(HealthCheckRequest::default()).await?.into_inner();
                // Held once the first status arrived.
                s.message().await?;
                Ok::<_, tonic::Status>(s)
            }
        }))
        .await;
        for o in opened {
            match o {
                Ok(s) => held.push(s),
                Err(e) => refused.push(format!("{:?}", e.code())),
            }
        }
    }
    (held, refused)
}

/// Opens `n` TCP connections that send nothing, at most 256 connects in
/// flight; returns them (a refused connect is counted, not kept).
async fn open_half(addr: &str, n: usize) -> (Vec<tokio::net::TcpStream>, usize) {
    use futures::StreamExt;
    let results: Vec<_> = futures::stream::iter(0..n)
        .map(|_| tokio::net::TcpStream::connect(addr.to_owned()))
        .buffer_unordered(256)
        .collect()
        .await;
    let mut ok = Vec::new();
    let mut failed = 0;
    for r in results {
        match r {
            Ok(s) => ok.push(s),
            Err(_) => failed += 1,
        }
    }
    (ok, failed)
}

/// How many of `conns` the server has closed (a read sees EOF or a reset).
fn closed_by_server(conns: &[tokio::net::TcpStream]) -> usize {
    let mut buf = [0u8; 1];
    conns
        .iter()
        .filter(|c| match c.try_read(&mut buf) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
        })
        .count()
}

/// Sockets the process holds (what the OS sees it keep open).
fn sockets(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    std::fs::read_link(e.path())
                        .is_ok_and(|l| l.to_string_lossy().starts_with("socket:"))
                })
                .count()
        })
        .unwrap_or(0)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

async fn settle_rss(pid: i32) -> u64 {
    // Freed memory goes back to the allocator, not always to the OS at once.
    tokio::time::sleep(Duration::from_secs(2)).await;
    rss_kib(pid)
}

/// One flood of streams, then of half-open connections; whether every
/// probe passed, and the RSS after it (KiB).
async fn bench(t: &Target, pki: &ClusterPki, args: &Args, round: usize) -> (bool, u64) {
    let mut ok = true;
    let established = t.endpoint(pki).connect().await.expect("connect");
    let rss0 = settle_rss(t.pid).await;
    let sockets0 = sockets(t.pid);
    let base = Probes::run(t, pki, &established, args.probes).await;
    println!("== {} (pid {}), round {round}", t.name, t.pid);
    println!(
        "baseline: rss {:.1} MiB; fresh conn p50 {:?} p99 {:?}; established p50 {:?} p99 {:?}",
        mib(rss0),
        base.fresh.0,
        base.fresh.1,
        base.kept.0,
        base.kept.1
    );

    // Streams.
    let start = Instant::now();
    let (held, refused) = open_streams(t, pki, args.streams, args.per_connection).await;
    let opened_in = start.elapsed();
    let rss1 = rss_kib(t.pid);
    let during = Probes::run(t, pki, &established, args.probes).await;
    let mut reasons: std::collections::BTreeMap<&str, usize> = Default::default();
    for r in &refused {
        *reasons.entry(r.as_str()).or_default() += 1;
    }
    println!(
        "{} streams: {} held, refused {:?} (in {:?}); rss {:.1} MiB (+{:.1} KiB per held stream)",
        args.streams,
        held.len(),
        reasons,
        opened_in,
        mib(rss1),
        rss1.saturating_sub(rss0) as f64 / held.len().max(1) as f64
    );
    println!("  probes: {}", during.line(&base));
    ok &= during.failed == 0;
    drop(held);
    let rss1_after = settle_rss(t.pid).await;
    println!("  after closing them: rss {:.1} MiB", mib(rss1_after));

    // Half-open connections.
    let addr = t.url.trim_start_matches("https://").to_owned();
    let start = Instant::now();
    let (half, connect_failed) = open_half(&addr, args.half_open).await;
    let opened_in = start.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let closed_at_once = closed_by_server(&half);
    let rss2 = rss_kib(t.pid);
    let held_by_server = sockets(t.pid).saturating_sub(sockets0);
    let during = Probes::run(t, pki, &established, args.probes).await;
    println!(
        "{} half-open: {} connected ({} connects failed, in {:?}), {} seen closed at once, {} sockets held by the server; rss {:.1} MiB",
        args.half_open,
        half.len(),
        connect_failed,
        opened_in,
        closed_at_once,
        held_by_server,
        mib(rss2)
    );
    println!("  probes: {}", during.line(&base));
    ok &= during.failed == 0;
    // The server closes the rest at its handshake timeout: its sockets go
    // back to what it held before (connections the kernel completed but
    // never handed over, its accept queue being full, are not the
    // server's: they look open only from this side).
    let deadline = start + args.handshake_timeout * 3;
    let all_closed = loop {
        let left = sockets(t.pid).saturating_sub(sockets0);
        if left == 0 {
            break Some(start.elapsed());
        }
        if Instant::now() > deadline {
            println!("  sockets still held after {:?}: {left}", start.elapsed());
            break None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    match all_closed {
        Some(d) => println!(
            "  the server holds none of them {:?} after they connected ({:.2}x the handshake timeout); {} look open from this side",
            d,
            ratio(d, args.handshake_timeout),
            half.len() - closed_by_server(&half)
        ),
        None => ok = false,
    }
    drop(half);
    let rss3 = settle_rss(t.pid).await;
    println!(
        "  after: rss {:.1} MiB (after the streams closed: {:.1} MiB)",
        mib(rss3),
        mib(rss1_after)
    );
    (ok, rss3)
}

/// Raises this process's descriptor limit (the servers inherit it) so the
/// flood is limited by the servers, not by `ulimit -n`.
fn raise_nofile(want: u64) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let hard = hard.max(want);
        let _ = setrlimit(Resource::RLIMIT_NOFILE, soft.max(want), hard)
            .or_else(|_| setrlimit(Resource::RLIMIT_NOFILE, hard.min(want), hard));
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    raise_nofile(u64::try_from(2 * (args.streams + args.half_open) + 4096)?);
    let timeout = humantime::format_duration(args.handshake_timeout).to_string();
    let cluster = TestCluster::builder()
        .hosts(1)
        .tls()
        .control_plane_arg("--tls-handshake-timeout")
        .control_plane_arg(&timeout)
        .host_arg("--tls-handshake-timeout")
        .host_arg(&timeout)
        .start()
        .await;
    let pki = cluster.pki.as_ref().expect("a TLS cluster");
    let targets = [
        Target {
            name: "control plane",
            pid: cluster.control_planes[0].proc.pid(),
            url: cluster.endpoint(0),
            tls_name: agentplane::server::tls::CONTROL_PLANE_NAME.to_owned(),
            identity: None,
            token: Some(agentplane_integration_tests::pki::TOKENS[1].0),
        },
        Target {
            name: "host agent",
            pid: cluster.hosts[0].proc.pid(),
            url: format!("https://{}", cluster.hosts[0].addr),
            tls_name: agentplane::server::tls::host_name(&cluster.hosts[0].host_id),
            identity: Some(pki.control_plane.clone()),
            token: None,
        },
    ];
    let mut ok = true;
    for t in &targets {
        let mut after = Vec::new();
        for round in 1..=args.rounds as usize {
            let (passed, rss) = bench(t, pki, &args, round).await;
            ok &= passed;
            after.push(rss);
        }
        let (second, last) = (after[1], after[after.len() - 1]);
        let reused = last <= second + 16 * 1024;
        println!(
            "{}: rss after each round {:?} MiB ({})",
            t.name,
            after
                .iter()
                .map(|k| (mib(*k) * 10.0).round() / 10.0)
                .collect::<Vec<_>>(),
            if reused {
                "reused after the second"
            } else {
                "GREW after the second: not reused"
            }
        );
        ok &= reused;
    }
    println!("{}", if ok { "PASS" } else { "FAIL" });
    if !ok {
        std::process::exit(1);
    }
    Ok(())
}
