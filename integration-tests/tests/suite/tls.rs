//! TLS on every link, with a CA the test makes (rcgen): the cluster works
//! end to end over TLS; plaintext is refused by both servers; a host agent
//! runs nothing for a caller without the control plane's certificate; and a
//! forged host address in Redis gets no request.

use std::path::Path;
use std::time::Duration;

use agentplane::proto::v1::agent_service_client::AgentServiceClient;
use agentplane::proto::v1::host_agent_client::HostAgentClient;
use agentplane::proto::v1::{
    AgentSpec, AgentState, HostListAgentsRequest, ListAgentsRequest, Placement, SpawnAgentRequest,
    StartAgentRequest,
};
use agentplane::server::tls::host_name;
use agentplane_integration_tests::pki::{Issued, Pki};
use agentplane_integration_tests::{procfs, TestCluster};
use nix::sys::signal::Signal;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

/// How a refused connection shows in a call: the transport failed (which
/// of these depends on when the server hung up), never an answer.
fn transport_refused(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable | Code::Unknown | Code::Internal | Code::Cancelled
    )
}

/// A spec that leaves a trace if it ever runs: a file, and a process.
fn tracer(marker: &Path) -> AgentSpec {
    AgentSpec {
        argv: vec![
            "sh".into(),
            "-c".into(),
            format!("touch {}; exec sleep 100", marker.display()),
        ],
        ..Default::default()
    }
}

/// A channel to host agent `addr` that trusts `cluster`'s CA, expects the
/// host's name and presents `identity` (none: no client certificate).
fn to_host(cluster: &TestCluster, i: usize, identity: Option<&Issued>) -> HostAgentClient<Channel> {
    let pki = cluster.pki.as_ref().expect("a TLS cluster");
    let h = &cluster.hosts[i];
    let channel = Endpoint::from_shared(format!("https://{}", h.addr))
        .expect("endpoint")
        .tls_config(pki.client_tls(&host_name(&h.host_id), identity))
        .expect("client TLS")
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5))
        .connect_lazy();
    HostAgentClient::new(channel)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_cluster_runs_agents_and_refuses_plaintext() {
    let cluster = TestCluster::builder().hosts(1).tls().start().await;
    let agent = cluster.spawn(&["sleep", "100"]).await;
    let agent = cluster
        .wait_agent(
            &agent.id,
            "RUNNING over TLS",
            Duration::from_secs(10),
            |a| a.state() == AgentState::Running,
        )
        .await;
    assert!(procfs::is_alive(agent.pid), "its process runs");

    // Plaintext to either server is refused: the port speaks only TLS.
    let plain = Endpoint::from_shared(format!("http://{}", cluster.control_planes[0].addr))
        .expect("endpoint")
        .timeout(Duration::from_secs(5))
        .connect_lazy();
    let err = AgentServiceClient::new(plain)
        .list_agents(ListAgentsRequest::default())
        .await
        .expect_err("plaintext to the control plane must fail");
    assert!(transport_refused(err.code()), "{err:?}");
    let plain = Endpoint::from_shared(format!("http://{}", cluster.hosts[0].addr))
        .expect("endpoint")
        .timeout(Duration::from_secs(5))
        .connect_lazy();
    let err = HostAgentClient::new(plain)
        .list_agents(HostListAgentsRequest::default())
        .await
        .expect_err("plaintext to a host agent must fail");
    assert!(transport_refused(err.code()), "{err:?}");
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_agent_runs_nothing_for_a_caller_that_is_not_the_control_plane() {
    let cluster = TestCluster::builder().hosts(1).tls().start().await;
    let pki = cluster.pki.as_ref().expect("TLS");
    let scratch = tempfile::tempdir().expect("tempdir");
    let other = Pki::create(scratch.path(), "other");
    let cases: Vec<(&str, Option<Issued>, Vec<Code>)> = vec![
        // The handshake itself fails: no certificate, or one from another CA.
        (
            "no client certificate",
            None,
            vec![
                Code::Unavailable,
                Code::Unknown,
                Code::Internal,
                Code::Cancelled,
            ],
        ),
        (
            "the control plane's name signed by another CA",
            Some(other.issue(
                "forged-control-plane",
                &[agentplane::server::tls::CONTROL_PLANE_NAME],
            )),
            vec![
                Code::Unavailable,
                Code::Unknown,
                Code::Internal,
                Code::Cancelled,
            ],
        ),
        // The right CA, but a host's name: the handshake passes, the call
        // is refused before any handler runs.
        (
            "a host agent's own certificate",
            Some(pki.host("h2", "127.0.0.1")),
            vec![Code::PermissionDenied],
        ),
    ];
    for (i, (what, identity, codes)) in cases.into_iter().enumerate() {
        let marker = scratch.path().join(format!("ran-{i}"));
        let id = format!("01tlsrefused{i:014}");
        let err = to_host(&cluster, 0, identity.as_ref())
            .start_agent(StartAgentRequest {
                id: id.clone(),
                generation: 1,
                spec: Some(tracer(&marker)),
            })
            .await
            .expect_err(what);
        assert!(codes.contains(&err.code()), "{what}: {err:?}");
        if err.code() == Code::PermissionDenied {
            assert!(
                err.message()
                    .contains(agentplane::server::tls::CONTROL_PLANE_NAME),
                "{what}: says who may call: {}",
                err.message()
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!marker.exists(), "{what}: the program ran");
        assert!(
            procfs::agent_processes_by_id()
                .iter()
                .all(|(agent, _)| agent != &id),
            "{what}: a process of {id} exists"
        );
    }
    // The control plane's certificate is admitted: the same call works.
    let marker = scratch.path().join("ran-admitted");
    to_host(&cluster, 0, Some(&pki.control_plane))
        .list_agents(HostListAgentsRequest::default())
        .await
        .expect("the control plane's certificate is admitted");
    assert!(!marker.exists());
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_host_address_fails_the_handshake_and_that_server_gets_nothing() {
    let cluster = TestCluster::builder()
        .hosts(2)
        .heartbeat_ttl(Duration::from_secs(30))
        .tls()
        .start()
        .await;
    // h2 stops heartbeating (its key lives on for the TTL) and its record is
    // pointed at h1's address: a forged or stale entry in Redis.
    cluster.hosts[1].proc.signal(Signal::SIGSTOP);
    let mut conn = cluster.redis_conn().await;
    let _: i64 = redis::cmd("HSET")
        .arg(cluster.keys().host("h2"))
        .arg("address")
        .arg(&cluster.hosts[0].addr)
        .query_async(&mut conn)
        .await
        .expect("HSET");
    let scratch = tempfile::tempdir().expect("tempdir");
    let marker = scratch.path().join("ran");
    let mut spec = tracer(&marker);
    spec.placement = Some(Placement {
        host: "h2".into(),
        label_selector: String::new(),
    });
    let result = cluster
        .client()
        .await
        .spawn_agent(SpawnAgentRequest {
            spec: Some(spec),
            request_id: String::new(),
        })
        .await;
    let said = match &result {
        Err(s) => s.message().to_owned(),
        Ok(r) => format!("{:?}", r.get_ref().agent),
    };
    eprintln!("spawn on the forged host: {said}");
    assert!(
        result.is_err(),
        "the spawn on a forged host must fail: {said}"
    );
    assert!(
        said.contains("host h2")
            && said.contains("h2.host.agentplane")
            && said.contains("certificate"),
        "a clear error naming the host and the name it failed: {said}"
    );
    // h1 (the server at that address) received no start.
    let on_h1 = cluster
        .host_agent(0)
        .list_agents(HostListAgentsRequest::default())
        .await
        .expect("h1 answers the control plane")
        .into_inner()
        .agents;
    assert!(on_h1.is_empty(), "h1 got {on_h1:?}");
    assert!(!marker.exists(), "the program ran");
    cluster.hosts[1].proc.signal(Signal::SIGCONT);
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plaintext_health_port_serves_health_and_nothing_else() {
    let port = agentplane_integration_tests::free_port();
    let health = format!("127.0.0.1:{port}");
    let cluster = TestCluster::builder()
        .hosts(1)
        .host_arg("--health-listen")
        .host_arg(&health)
        .tls()
        .start()
        .await;
    let out = std::process::Command::new(agentplane_integration_tests::bin("agentctl"))
        .args([
            "--endpoint",
            &format!("http://{health}"),
            "health",
            "--service",
        ])
        .arg("agentplane.v1.HostAgent")
        .output()
        .expect("agentctl health");
    assert!(
        out.status.success(),
        "health: {} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "SERVING");
    // Only health there: the host agent's API is not served in plaintext.
    let plain = Endpoint::from_shared(format!("http://{health}"))
        .expect("endpoint")
        .timeout(Duration::from_secs(5))
        .connect_lazy();
    let err = HostAgentClient::new(plain)
        .list_agents(HostListAgentsRequest::default())
        .await
        .expect_err("the API is not on the health port");
    assert_eq!(err.code(), Code::Unimplemented, "{err:?}");
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agentctl_speaks_tls_with_a_ca_and_says_what_to_pass_without_one() {
    let cluster = TestCluster::builder().hosts(1).tls().start().await;
    // With the cluster's CA (AGENTPLANE_CA) a plain `ls` works.
    let spawned = cluster.agentctl(&["-o", "json", "spawn", "--", "sleep", "100"]);
    assert!(
        spawned.status.success(),
        "{}",
        String::from_utf8_lossy(&spawned.stderr)
    );
    let ls = cluster.agentctl(&["ls"]);
    assert!(
        ls.status.success(),
        "{}",
        String::from_utf8_lossy(&ls.stderr)
    );
    assert!(String::from_utf8_lossy(&ls.stdout).contains("sleep"));
    let stderr = |args: &[&str], env: &[(&str, String)]| {
        let out = std::process::Command::new(agentplane_integration_tests::bin("agentctl"))
            .args(args)
            .env_remove("AGENTPLANE_CA")
            .envs(env.iter().map(|(k, v)| (*k, v.clone())))
            .output()
            .expect("agentctl");
        assert!(!out.status.success(), "{args:?} must fail");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let https = cluster.endpoint(0);
    let plain = https.replace("https://", "http://");
    // https without a CA: says to pass --ca.
    let e = stderr(&["--endpoint", &https, "ls"], &[]);
    assert!(e.contains("--ca"), "{e}");
    // Another CA: says the certificate is not signed by it.
    let scratch = tempfile::tempdir().expect("tempdir");
    let other = Pki::create(scratch.path(), "other");
    let e = stderr(
        &["--endpoint", &https, "ls"],
        &[("AGENTPLANE_CA", other.ca.display().to_string())],
    );
    assert!(e.contains("not signed by --ca"), "{e}");
    // Plaintext to a TLS server: says to use https.
    let e = stderr(&["--endpoint", &plain, "ls"], &[]);
    assert!(e.contains("https://"), "{e}");
    // A token is never sent in plaintext beyond loopback.
    let e = stderr(
        &[
            "--endpoint",
            "http://192.0.2.1:7700",
            "--token",
            "s3cret",
            "ls",
        ],
        &[],
    );
    assert!(e.contains("refusing to send the token in plaintext"), "{e}");
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_max_connections_are_closed_and_the_rest_keep_working() {
    use tokio::io::AsyncReadExt;
    let cluster = TestCluster::builder()
        .hosts(1)
        .host_arg("--max-connections")
        .host_arg("2")
        .start()
        .await;
    // The control plane's connection to the host is the first.
    let first = cluster.spawn(&["sleep", "100"]).await;
    cluster
        .wait_state(&first.id, AgentState::Running, Duration::from_secs(10))
        .await;
    let addr = cluster.hosts[0].addr.clone();
    let mut second = tokio::net::TcpStream::connect(&addr).await.expect("second");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut third = tokio::net::TcpStream::connect(&addr).await.expect("third");
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(5), third.read(&mut buf))
        .await
        .expect("the third connection is closed, not left hanging");
    assert!(matches!(closed, Ok(0) | Err(_)), "closed: {closed:?}");
    // Open: the server greets it (its HTTP/2 settings) or waits, never closes.
    let open = tokio::time::timeout(Duration::from_millis(500), second.read(&mut buf)).await;
    assert!(
        matches!(open, Err(_) | Ok(Ok(1..))),
        "the second connection stays open: {open:?}"
    );
    // The control plane's own connection still works.
    let again = cluster.spawn(&["sleep", "100"]).await;
    cluster
        .wait_state(&again.id, AgentState::Running, Duration::from_secs(10))
        .await;
    assert!(
        cluster.logs().contains("--max-connections reached"),
        "the host says why"
    );
    // An idle raw connection would hold the host's graceful drain.
    drop((second, third));
    cluster.finish().await;
}

/// Half-open connections (TCP, no ClientHello) past `--max-connections`
/// must not lock new clients out: the server closes the oldest connection
/// still in its handshake to admit a new one, so a real client (whose
/// handshake takes a round trip) gets in while the flood goes on, on both
/// servers; connections that finished their handshake are never closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_connections_past_the_cap_do_not_lock_new_clients_out() {
    let cluster = TestCluster::builder()
        .hosts(1)
        .tls()
        .control_plane_arg("--max-connections")
        .control_plane_arg("20")
        .host_arg("--max-connections")
        .host_arg("20")
        .start()
        .await;
    let mut established = cluster.client().await;
    established
        .list_agents(ListAgentsRequest::default())
        .await
        .expect("before the flood");
    let mut flood = Vec::new();
    for addr in [&cluster.control_planes[0].addr, &cluster.hosts[0].addr] {
        for _ in 0..60 {
            flood.push(tokio::net::TcpStream::connect(addr).await.expect("connect"));
        }
    }
    // New clients, while 60 idle connections press on each cap of 20: each
    // connects, handshakes and is answered.
    for _ in 0..3 {
        cluster
            .client_with_token(Some("viewer-token"))
            .list_agents(ListAgentsRequest::default())
            .await
            .expect("a new client of the control plane gets in");
        cluster
            .host_agent(0)
            .get_status(agentplane::proto::v1::GetStatusRequest {})
            .await
            .expect("a new caller of the host agent gets in");
    }
    // Idle connections that finish TLS (no client certificate needed on
    // the control plane) but never send a request with a token stay
    // evictable: 60 of them against the cap of 20 do not lock a new
    // client out either.
    let mut idle = Vec::new();
    for _ in 0..60 {
        idle.extend(cluster.connect(0).await.ok());
    }
    cluster
        .client_with_token(Some("viewer-token"))
        .list_agents(ListAgentsRequest::default())
        .await
        .expect("a new client gets in past idle TLS connections");
    // The connection made before the flood was not the one closed: its
    // caller proved itself with a token.
    established
        .list_agents(ListAgentsRequest::default())
        .await
        .expect("the established connection is kept");
    let a = cluster.spawn(&["sleep", "100"]).await;
    cluster
        .wait_state(&a.id, AgentState::Running, Duration::from_secs(10))
        .await;
    for server in [&cluster.control_planes[0], &cluster.hosts[0]] {
        let log = std::fs::read_to_string(&server.proc.log).expect("log");
        assert!(
            log.contains("closed the oldest connection whose caller had not proven who it is"),
            "{} says what it did",
            server.proc.log.display()
        );
    }
    drop((flood, idle));
    cluster.finish().await;
}
