//! The deploy files under `deploy/` against the real binaries, with no
//! container engine or cluster: every command line and environment they give
//! a server passes its `--check-config`, stop timeouts leave room for the
//! servers' own shutdown, and the pieces refer to each other correctly.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use agentplane_integration_tests::bin;
use serde_json::Value;

/// The servers' default `--shutdown-timeout`.
const DEFAULT_SHUTDOWN: Duration = Duration::from_secs(30);

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .join("deploy")
}

fn read(rel: &str) -> String {
    let p = deploy_dir().join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

fn yaml_docs(rel: &str) -> Vec<Value> {
    read(rel)
        .split("\n---\n")
        .map(|d| serde_norway::from_str::<Value>(d).unwrap_or_else(|e| panic!("{rel}: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

/// Where every deploy file expects its secrets: `tls/` (`ca.crt`,
/// `tls.crt`, `tls.key`: a Kubernetes Secret's mount, a compose volume, or
/// installed by hand next to the systemd units) and the token file
/// (`tokens.toml`, or `tokens/tokens.toml` as a Secret's mount).
const SECRETS_DIR: &str = "/etc/agentplane/";

/// A directory holding real secrets in that layout (a generated CA and
/// certificate, a token file) that stands in for [`SECRETS_DIR`] (made once
/// per test process).
fn secrets_stand_in() -> &'static str {
    static DIR: std::sync::OnceLock<(tempfile::TempDir, String)> = std::sync::OnceLock::new();
    &DIR.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let tls = dir.path().join("tls");
        std::fs::create_dir(&tls).expect("tls dir");
        let pki = agentplane_integration_tests::pki::Pki::create(&tls, "deploy");
        std::fs::rename(&pki.ca, tls.join("ca.crt")).expect("ca.crt");
        pki.issue("tls", &["control-plane.agentplane", "h1.host.agentplane"]);
        let tokens = agentplane_integration_tests::pki::ClusterPki::write_tokens(dir.path());
        let nested = dir.path().join("tokens");
        std::fs::create_dir(&nested).expect("tokens dir");
        std::fs::copy(&tokens, nested.join("tokens.toml")).expect("tokens copy");
        let path = format!("{}/", dir.path().display());
        (dir, path)
    })
    .1
}

/// `s` with [`SECRETS_DIR`] pointing at the stand-in.
fn with_tls_files(s: &str) -> String {
    s.replace(SECRETS_DIR, secrets_stand_in())
}

/// Runs `argv[0] --check-config argv[1..]` with exactly `env` as its
/// AGENTPLANE_* settings (TLS files from the stand-in); panics with what it
/// said unless it exits 0.
fn check_config(place: &str, argv: &[String], env: &BTreeMap<String, String>) {
    let argv: Vec<String> = argv.iter().map(|a| with_tls_files(a)).collect();
    let env: BTreeMap<String, String> = env
        .iter()
        .map(|(k, v)| (k.clone(), with_tls_files(v)))
        .collect();
    let (name, args) = argv.split_first().expect("a command");
    assert!(
        !args.iter().any(|a| a == "--insecure") && !env.contains_key("AGENTPLANE_INSECURE"),
        "{place}: a deploy file must not serve plaintext"
    );
    assert!(
        name == "control-plane" || name == "host-agent",
        "{place}: unknown binary {name}"
    );
    let mut cmd = Command::new(bin(name));
    for (k, _) in std::env::vars() {
        if k.starts_with("AGENTPLANE_") {
            cmd.env_remove(k);
        }
    }
    let out = cmd
        .arg("--check-config")
        .args(args)
        .envs(&env)
        .output()
        .expect("run the server");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{place}: {name} {args:?} with {env:?} is refused: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The shutdown timeout a server gets from its flags or environment.
fn shutdown_timeout(argv: &[String], env: &BTreeMap<String, String>) -> Duration {
    let flag = argv
        .windows(2)
        .find(|w| w[0] == "--shutdown-timeout")
        .map(|w| w[1].clone());
    flag.or_else(|| env.get("AGENTPLANE_SHUTDOWN_TIMEOUT").cloned())
        .map_or(DEFAULT_SHUTDOWN, |s| {
            humantime::parse_duration(&s).expect("a duration")
        })
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|s| s.as_str().expect("a string").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn check_config_validates_without_binding_or_connecting() {
    // The listen port is taken and no Redis is there: a check needs neither.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let ok = |name: &str, extra: &[&str]| {
        let mut argv = vec![name.to_owned(), "--listen".to_owned(), addr.clone()];
        argv.extend(extra.iter().map(|s| (*s).to_owned()));
        check_config("--check-config", &argv, &BTreeMap::new());
    };
    let tls = [
        "--tls-cert",
        "/etc/agentplane/tls/tls.crt",
        "--tls-key",
        "/etc/agentplane/tls/tls.key",
        "--tls-client-ca",
        "/etc/agentplane/tls/ca.crt",
    ];
    let with = |extra: &[&'static str]| -> Vec<&'static str> {
        tls.iter().chain(extra).copied().collect()
    };
    ok(
        "control-plane",
        &with(&[
            "--redis-url",
            "redis://127.0.0.1:1",
            "--token-file",
            "/etc/agentplane/tokens.toml",
        ]),
    );
    ok(
        "host-agent",
        &with(&["--host-id", "h1", "--redis-url", "redis://127.0.0.1:1"]),
    );
    let bad = Command::new(bin("host-agent"))
        .args(["--check-config", "--insecure", "--host-id", "bad id"])
        .env_remove("AGENTPLANE_HOST_ID")
        .output()
        .expect("run host-agent");
    assert_eq!(bad.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--host-id"));
}

#[test]
fn compose_services_pass_check_config_and_get_time_to_stop_their_agents() {
    let compose = yaml_docs("compose.yaml").remove(0);
    let services = compose["services"].as_object().expect("services");
    let mut host_ids = Vec::new();
    let mut servers = 0;
    for (name, svc) in services {
        for dep in svc["depends_on"].as_object().into_iter().flatten() {
            assert!(services.contains_key(dep.0), "{name} depends on {}", dep.0);
        }
        let argv = strings(&svc["command"]);
        if !matches!(
            argv.first().map(String::as_str),
            Some("control-plane" | "host-agent")
        ) {
            continue;
        }
        servers += 1;
        let env: BTreeMap<String, String> = svc["environment"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.as_str().expect("string").to_owned()))
            .collect();
        check_config(&format!("compose {name}"), &argv, &env);
        let grace = humantime::parse_duration(svc["stop_grace_period"].as_str().unwrap_or("10s"))
            .expect("stop_grace_period");
        assert!(
            grace > shutdown_timeout(&argv, &env),
            "compose {name}: stop_grace_period {grace:?} leaves no room for the shutdown"
        );
        if argv[0] == "host-agent" {
            let id = argv
                .windows(2)
                .find(|w| w[0] == "--host-id")
                .expect("--host-id")[1]
                .clone();
            host_ids.push(id);
            let advertised = argv
                .windows(2)
                .find(|w| w[0] == "--advertise-addr")
                .expect("--advertise-addr")[1]
                .clone();
            let hostname = svc["hostname"].as_str().unwrap_or(name);
            assert!(
                advertised.starts_with(&format!("{hostname}:")),
                "compose {name}: the control plane dials {advertised}, the container is {hostname}"
            );
        }
    }
    assert_eq!(servers, 3, "a control plane and two host agents");
    let mut unique = host_ids.clone();
    unique.dedup();
    assert_eq!(unique, host_ids, "host ids are unique");
}

/// What Kubernetes would put in a variable: literal values, and stand-ins for
/// the downward API.
fn k8s_env(container: &Value) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for e in container["env"].as_array().into_iter().flatten() {
        let name = e["name"].as_str().expect("env name").to_owned();
        let value = match (
            e["value"].as_str(),
            e["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
        ) {
            (Some(v), _) => v.to_owned(),
            (None, Some("status.podIP")) => "10.1.2.3".to_owned(),
            (None, Some("spec.nodeName")) => "node-1.example.internal".to_owned(),
            other => panic!("env {name}: unexpected source {other:?}"),
        };
        env.insert(name, value);
    }
    env
}

/// `$(VAR)` as Kubernetes expands it in args.
fn expand(arg: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = arg.to_owned();
    for (k, v) in env {
        out = out.replace(&format!("$({k})"), v);
    }
    assert!(!out.contains("$("), "unexpanded variable in {arg}");
    out
}

#[test]
fn kubernetes_workloads_pass_check_config_and_services_select_them() {
    let mut docs = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(deploy_dir().join("kubernetes"))
        .expect("deploy/kubernetes")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    files.sort();
    // `kubectl apply -f deploy/kubernetes/` goes in name order: the namespace
    // must exist before anything is created in it.
    let first = yaml_docs(&format!("kubernetes/{}", files[0]));
    assert_eq!(
        first[0]["kind"], "Namespace",
        "{} is applied first",
        files[0]
    );
    for f in &files {
        docs.extend(yaml_docs(&format!("kubernetes/{f}")));
    }
    let mut pod_labels: HashMap<String, Vec<BTreeMap<String, String>>> = HashMap::new();
    let mut servers = Vec::new();
    for d in &docs {
        let kind = d["kind"].as_str().expect("kind");
        let name = d["metadata"]["name"].as_str().expect("metadata.name");
        assert!(d["apiVersion"].is_string(), "{kind}/{name}: apiVersion");
        if kind == "Namespace" {
            continue;
        }
        let ns = d["metadata"]["namespace"]
            .as_str()
            .expect("namespaced")
            .to_owned();
        assert_eq!(ns, "agentplane", "{kind}/{name}");
        if !matches!(kind, "Deployment" | "DaemonSet") {
            continue;
        }
        let template = &d["spec"]["template"];
        let labels: BTreeMap<String, String> =
            serde_json::from_value(template["metadata"]["labels"].clone()).expect("labels");
        let selector: BTreeMap<String, String> =
            serde_json::from_value(d["spec"]["selector"]["matchLabels"].clone()).expect("selector");
        assert!(
            selector.iter().all(|(k, v)| labels.get(k) == Some(v)),
            "{kind}/{name}: its selector matches its pods"
        );
        pod_labels.entry(ns).or_default().push(labels);
        let grace = template["spec"]["terminationGracePeriodSeconds"]
            .as_u64()
            .unwrap_or(30);
        for c in template["spec"]["containers"]
            .as_array()
            .expect("containers")
        {
            let ports: Vec<&str> = c["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|p| p["name"].as_str())
                .collect();
            for probe in ["readinessProbe", "livenessProbe"] {
                if let Some(port) = c[probe]["tcpSocket"]["port"].as_str() {
                    assert!(ports.contains(&port), "{kind}/{name}: {probe} port {port}");
                }
            }
            let env = k8s_env(c);
            let argv: Vec<String> = strings(&c["args"])
                .iter()
                .map(|a| expand(a, &env))
                .collect();
            if !matches!(
                argv.first().map(String::as_str),
                Some("control-plane" | "host-agent")
            ) {
                continue;
            }
            check_config(&format!("{kind}/{name}"), &argv, &env);
            let shutdown = shutdown_timeout(&argv, &env);
            assert!(
                Duration::from_secs(grace) > shutdown,
                "{kind}/{name}: terminationGracePeriodSeconds {grace} leaves no room for {shutdown:?}"
            );
            servers.push(argv[0].clone());
        }
    }
    servers.sort();
    assert_eq!(servers, ["control-plane", "host-agent"]);
    for d in docs.iter().filter(|d| d["kind"] == "NetworkPolicy") {
        let ns = d["metadata"]["namespace"].as_str().expect("namespace");
        let mut selectors = vec![d["spec"]["podSelector"]["matchLabels"].clone()];
        for rule in d["spec"]["ingress"].as_array().into_iter().flatten() {
            // Peers chosen by namespace (a scraper's) lie outside these
            // manifests; a pod selector alone names pods of this namespace.
            for from in rule["from"].as_array().into_iter().flatten() {
                if from["namespaceSelector"].is_null() {
                    selectors.push(from["podSelector"]["matchLabels"].clone());
                }
            }
        }
        for sel in selectors {
            let sel: BTreeMap<String, String> = serde_json::from_value(sel).expect("matchLabels");
            let found = pod_labels
                .get(ns)
                .into_iter()
                .flatten()
                .any(|labels| sel.iter().all(|(k, v)| labels.get(k) == Some(v)));
            assert!(
                found,
                "NetworkPolicy {}: {sel:?} selects no pods",
                d["metadata"]["name"]
            );
        }
    }
    for d in docs.iter().filter(|d| d["kind"] == "Service") {
        let ns = d["metadata"]["namespace"].as_str().expect("namespace");
        let selector: BTreeMap<String, String> =
            serde_json::from_value(d["spec"]["selector"].clone()).expect("selector");
        let found = pod_labels
            .get(ns)
            .into_iter()
            .flatten()
            .any(|labels| selector.iter().all(|(k, v)| labels.get(k) == Some(v)));
        assert!(found, "Service {}: selects no pods", d["metadata"]["name"]);
    }
}

/// `KEY=VALUE` lines of a unit or an environment file, comments skipped.
fn key_values(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

#[test]
fn systemd_units_pass_check_config_with_their_environment_files() {
    for (unit, binary) in [
        ("agentplane-control-plane.service", "control-plane"),
        ("agentplane-host-agent.service", "host-agent"),
    ] {
        let keys: HashMap<String, String> = key_values(&read(&format!("systemd/{unit}")))
            .into_iter()
            .collect();
        let exec: Vec<String> = keys["ExecStart"]
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        assert_eq!(exec[0], format!("/usr/local/bin/{binary}"), "{unit}");
        // An ExecStartPre that fails is restarted in a loop
        // (RestartPreventExitStatus looks at the main process only).
        assert!(!keys.contains_key("ExecStartPre"), "{unit}");
        let env_file = Path::new(&keys["EnvironmentFile"])
            .file_name()
            .expect("file name")
            .to_string_lossy()
            .into_owned();
        let mut env: BTreeMap<String, String> = key_values(&read(&format!("systemd/{env_file}")))
            .into_iter()
            .collect();
        assert!(
            env.keys().all(|k| k.starts_with("AGENTPLANE_")),
            "{env_file}: only AGENTPLANE_* settings"
        );
        // Settings in the unit itself, with the credentials directory (%d)
        // standing in where systemd would copy each LoadCredential= file.
        let lines = key_values(&read(&format!("systemd/{unit}")));
        let credentials: HashMap<&str, &str> = lines
            .iter()
            .filter(|(k, _)| k == "LoadCredential")
            .filter_map(|(_, v)| v.split_once(':'))
            .collect();
        for (_, v) in lines.iter().filter(|(k, _)| k == "Environment") {
            let (k, v) = v.split_once('=').expect("Environment=KEY=VALUE");
            let v = match v.strip_prefix("%d/") {
                Some(name) => credentials
                    .get(name)
                    .unwrap_or_else(|| panic!("{unit}: {k} reads credential {name}, never loaded"))
                    .to_string(),
                None => v.to_owned(),
            };
            assert!(
                env.insert(k.to_owned(), v).is_none(),
                "{unit}: {k} is set in both the unit and {env_file} (the file would win)"
            );
        }
        let mut argv = vec![binary.to_owned()];
        argv.extend(exec[1..].iter().cloned());
        check_config(unit, &argv, &env);
        let stop = humantime::parse_duration(&keys["TimeoutStopSec"]).expect("TimeoutStopSec");
        assert!(
            stop > shutdown_timeout(&argv, &env),
            "{unit}: TimeoutStopSec {stop:?} leaves no room for the shutdown"
        );
        assert_eq!(keys["RestartPreventExitStatus"], "64", "{unit}");
        if binary == "host-agent" {
            // SIGTERM to the host agent only, and nothing else in its cgroup.
            assert_eq!(
                keys["KillMode"], "process",
                "{unit}: the keeper and agents outlive a restart"
            );
        }
    }
}

#[test]
fn the_image_carries_every_binary() {
    let dockerfile = read("Dockerfile");
    let install = dockerfile
        .lines()
        .find(|l| l.contains("install -D"))
        .expect("an install line");
    for name in [
        "control-plane",
        "host-agent",
        "agentplane-keeper",
        "agentctl",
    ] {
        assert!(bin(name).is_file(), "{name} is a workspace binary");
        assert!(
            install.contains(&format!("target/release/{name}")),
            "the image installs {name}: {install}"
        );
    }
    assert!(
        dockerfile
            .lines()
            .any(|l| l.starts_with("RUN bash scripts/build-release")),
        "builds with scripts/build-release"
    );
    let script = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/build-release"),
    )
    .expect("scripts/build-release");
    let build = script
        .lines()
        .find(|l| l.starts_with("cargo build"))
        .expect("a cargo build line");
    // At the root, without --workspace, cargo builds only the library.
    assert!(
        build.contains("--workspace") && build.contains("--bins") && build.contains("--locked"),
        "builds every binary from Cargo.lock: {build}"
    );
}
