//! Bearer tokens with roles on the control plane (a TLS cluster; tokens in
//! `integration-tests/src/pki.rs`): no token or a wrong one is
//! UNAUTHENTICATED with one message; a viewer reads (env redacted) but may
//! not spawn or read logs; an operator limited to `team=a` may not spawn
//! outside it and does not see other agents in get, ls, watch or attach; only an
//! admin sets a uid; the token file reloads on SIGHUP and a bad one keeps
//! the old tokens.

use std::time::Duration;

use agentplane::proto::v1::{
    AgentSpec, AgentState, EventType, GetAgentRequest, ListAgentsRequest, SpawnAgentRequest,
    StreamLogsRequest, WatchAgentsRequest,
};
use agentplane_integration_tests::TestCluster;
use futures::StreamExt;
use nix::sys::signal::Signal;
use tonic::Code;

fn spec(team: &str) -> AgentSpec {
    AgentSpec {
        argv: vec!["sleep".into(), "100".into()],
        labels: [("team".to_owned(), team.to_owned())].into(),
        env: [("API_KEY".to_owned(), "hunter2".to_owned())].into(),
        ..Default::default()
    }
}

fn spawn_req(spec: AgentSpec) -> SpawnAgentRequest {
    SpawnAgentRequest {
        spec: Some(spec),
        request_id: String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_gate_every_call_by_role_and_selector() {
    let cluster = TestCluster::builder().hosts(1).tls().start().await;
    let a = cluster.spawn_spec(spec("a")).await;
    let b = cluster.spawn_spec(spec("b")).await;
    for id in [&a.id, &b.id] {
        cluster
            .wait_state(id, AgentState::Running, Duration::from_secs(10))
            .await;
    }

    // No token and a wrong one: the same UNAUTHENTICATED.
    let mut messages = Vec::new();
    for token in [None, Some("not-a-token")] {
        let e = cluster
            .client_with_token(token)
            .list_agents(ListAgentsRequest::default())
            .await
            .expect_err("refused");
        assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
        messages.push(e.message().to_owned());
    }
    assert_eq!(messages[0], messages[1], "one message for both");

    // A viewer reads, with env values hidden, and may not act.
    let mut viewer = cluster.client_with_token(Some("viewer-token"));
    let listed = viewer
        .list_agents(ListAgentsRequest::default())
        .await
        .expect("viewer ls")
        .into_inner()
        .agents;
    assert_eq!(listed.len(), 2);
    let got = viewer
        .get_agent(GetAgentRequest { id: a.id.clone() })
        .await
        .expect("viewer get")
        .into_inner();
    let env = got.spec.expect("spec").env;
    assert_eq!(env.get("API_KEY").map(String::as_str), Some("<redacted>"));
    let e = viewer
        .spawn_agent(spawn_req(spec("a")))
        .await
        .expect_err("viewer spawn");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(
        e.message().contains("viewer") && e.message().contains("operator"),
        "{e:?}"
    );
    let e = viewer
        .stream_logs(StreamLogsRequest {
            id: a.id.clone(),
            ..Default::default()
        })
        .await
        .expect_err("viewer logs");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    // An operator of team=a: only team=a agents exist for it.
    let mut team_a = cluster.client_with_token(Some("team-a-token"));
    let e = team_a
        .spawn_agent(spawn_req(spec("b")))
        .await
        .expect_err("spawn b");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("team=a"), "{e:?}");
    let mut with_uid = spec("a");
    with_uid.uid = Some(65534);
    let e = team_a
        .spawn_agent(spawn_req(with_uid.clone()))
        .await
        .expect_err("uid");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("admin"), "{e:?}");
    let e = team_a
        .get_agent(GetAgentRequest { id: b.id.clone() })
        .await
        .expect_err("b is not there");
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let mine = team_a
        .get_agent(GetAgentRequest { id: a.id.clone() })
        .await
        .expect("a is")
        .into_inner();
    assert_eq!(
        mine.spec
            .expect("spec")
            .env
            .get("API_KEY")
            .map(String::as_str),
        Some("hunter2"),
        "an operator sees env"
    );
    let listed: Vec<String> = team_a
        .list_agents(ListAgentsRequest::default())
        .await
        .expect("ls")
        .into_inner()
        .agents
        .into_iter()
        .map(|x| x.id)
        .collect();
    assert_eq!(listed, vec![a.id.clone()]);
    // Another team's request id and name: taken, without saying by whom.
    let mut named_b = spec("b");
    named_b.name = "b-name".into();
    let b_named = cluster
        .client()
        .await
        .spawn_agent(SpawnAgentRequest {
            spec: Some(named_b),
            request_id: "rid-b".into(),
        })
        .await
        .expect("admin spawns a named b")
        .into_inner()
        .agent
        .expect("agent");
    let e = team_a
        .spawn_agent(SpawnAgentRequest {
            spec: Some(spec("a")),
            request_id: "rid-b".into(),
        })
        .await
        .expect_err("b's request id");
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    assert!(!e.message().contains(&b_named.id), "{e:?}");
    let mut named_a = spec("a");
    named_a.name = "b-name".into();
    let e = team_a
        .spawn_agent(spawn_req(named_a))
        .await
        .expect_err("b's name");
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    assert!(!e.message().contains(&b_named.id), "{e:?}");
    // Another team's agent by name: NOT_FOUND under the name it asked
    // for, as a name that nobody holds, so its id does not show.
    for asked in ["b-name", "no-such-name"] {
        let e = team_a
            .get_agent(GetAgentRequest { id: asked.into() })
            .await
            .expect_err("not team a's");
        assert_eq!(e.code(), Code::NotFound, "{e:?}");
        assert!(e.message().contains(asked), "{e:?}");
        assert!(!e.message().contains(&b_named.id), "{e:?}");
    }
    // Pages are filled with what it may see: with many team=b agents and
    // pages of one, every page but the last holds its agent.
    for _ in 0..10 {
        cluster.spawn_spec(spec("b")).await;
    }
    let (mut pages, mut empty, mut seen, mut token) = (0, 0, Vec::new(), String::new());
    loop {
        let page = team_a
            .list_agents(ListAgentsRequest {
                page_size: 1,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .expect("a page")
            .into_inner();
        pages += 1;
        if page.agents.is_empty() {
            empty += 1;
        }
        seen.extend(page.agents.into_iter().map(|x| x.id));
        token = page.next_page_token;
        if token.is_empty() || pages > 100 {
            break;
        }
    }
    assert_eq!(seen, vec![a.id.clone()]);
    assert!(empty <= 1, "{empty} empty pages of {pages}");
    // Attach names its agent in the stream: b does not exist there either,
    // and a does (the session stays open until the input ends).
    let attach = |id: &str| {
        let first = agentplane::proto::v1::AttachInput {
            id: id.to_owned(),
            ..Default::default()
        };
        futures::stream::iter([first]).chain(futures::stream::pending())
    };
    let e = team_a.attach(attach(&b.id)).await.expect_err("attach to b");
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let session = team_a.attach(attach(&a.id)).await.expect("attach to a");
    drop(session);
    let mut events = team_a
        .watch_agents(WatchAgentsRequest {
            resume_token: "0".into(),
            agent_id: String::new(),
        })
        .await
        .expect("watch")
        .into_inner();
    // Every agent event up to now, then one more of each agent to be sure
    // the filter is reached: b's must never show.
    cluster
        .client()
        .await
        .spawn_agent(spawn_req(spec("b")))
        .await
        .expect("admin spawns b");
    let c = cluster.spawn_spec(spec("a")).await;
    let mut saw = Vec::new();
    while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_secs(5), events.message())
        .await
        .map(|r| r.expect("event"))
    {
        if ev.r#type() != EventType::HostUp {
            saw.push(ev.agent_id.clone());
        }
        if ev.agent_id == c.id {
            break;
        }
    }
    assert!(saw.contains(&a.id) && saw.contains(&c.id), "{saw:?}");
    assert!(!saw.contains(&b.id), "b's events reached team=a: {saw:?}");
    // An admin may set a uid.
    cluster
        .client()
        .await
        .spawn_agent(spawn_req(with_uid))
        .await
        .expect("admin sets a uid");

    // Reload on SIGHUP: a new token works after it; a broken file keeps the
    // tokens in force.
    let file = cluster
        .token_file()
        .expect("a TLS cluster has a token file");
    let mut text = std::fs::read_to_string(&file).expect("token file");
    text.push_str(&format!(
        "[[token]]\nname = \"new\"\nsha256 = \"{}\"\nrole = \"viewer\"\n",
        agentplane::auth::digest_hex("new-token")
    ));
    std::fs::write(&file, &text).expect("rewrite");
    let e = cluster
        .client_with_token(Some("new-token"))
        .list_agents(ListAgentsRequest::default())
        .await
        .expect_err("not before the reload");
    assert_eq!(e.code(), Code::Unauthenticated);
    cluster.control_planes[0].proc.signal(Signal::SIGHUP);
    agentplane_integration_tests::eventually(
        Duration::from_secs(10),
        "the new token works",
        || {
            let mut c = cluster.client_with_token(Some("new-token"));
            async move { c.list_agents(ListAgentsRequest::default()).await.ok() }
        },
    )
    .await;
    std::fs::write(&file, "this is not toml [[").expect("break it");
    cluster.control_planes[0].proc.signal(Signal::SIGHUP);
    agentplane_integration_tests::eventually(Duration::from_secs(10), "the reload refused", || {
        let logs = cluster.logs();
        async move { logs.contains("token file not reloaded").then_some(()) }
    })
    .await;
    cluster
        .client_with_token(Some("new-token"))
        .list_agents(ListAgentsRequest::default())
        .await
        .expect("the tokens in force stay");
    cluster.finish().await;
}
