//! Redis over TLS (`rediss://`) and a password from a file, against a real
//! redis-server with TLS that the test starts with its own CA: the registry
//! and a real control plane work with the right CA; with a wrong CA the
//! control plane stays up, reports NOT_SERVING and says why in its log.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use agentplane::registry::{RedisOptions, RedisTlsArgs, Registry};
use agentplane_integration_tests::pki::Pki;
use agentplane_integration_tests::{bin, eventually, free_port};

/// A redis-server serving only TLS on a free port, with `requirepass`.
struct TlsRedis {
    child: std::process::Child,
    port: u16,
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_tls_redis(dir: &std::path::Path, pki: &Pki) -> TlsRedis {
    let server = pki.issue("redis", &["127.0.0.1", "localhost"]);
    let port = free_port();
    let mut cmd = Command::new("redis-server");
    cmd.args([
        "--port",
        "0",
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
    ])
    .arg("--tls-port")
    .arg(port.to_string())
    .arg("--tls-cert-file")
    .arg(&server.cert)
    .arg("--tls-key-file")
    .arg(&server.key)
    .arg("--tls-ca-cert-file")
    .arg(&pki.ca)
    .args(["--tls-auth-clients", "no", "--requirepass", "s3cret"])
    .arg("--dir")
    .arg(dir)
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    agentplane::process::die_with_parent(&mut cmd);
    TlsRedis {
        child: cmd.spawn().expect("start redis-server with TLS"),
        port,
    }
}

fn options(ca: &std::path::Path, password_file: &std::path::Path, url: &str) -> RedisOptions {
    RedisTlsArgs {
        redis_ca: Some(ca.to_owned()),
        redis_password_file: Some(password_file.to_owned()),
        ..Default::default()
    }
    .load(url)
    .expect("options")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_the_right_ca_works_and_a_wrong_ca_is_not_serving_with_a_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::create(dir.path(), "redis");
    let other = Pki::create(dir.path(), "other");
    let redis = start_tls_redis(dir.path(), &pki);
    let url = format!("rediss://127.0.0.1:{}", redis.port);
    let pw = dir.path().join("redis-password");
    std::fs::write(&pw, "s3cret\n").expect("password file");

    // The registry itself: the right CA and the password answer PING.
    let good = Registry::connect(&url, "ap", &options(&pki.ca, &pw, &url)).expect("registry");
    eventually(Duration::from_secs(10), "PING over TLS", || {
        let good = good.clone();
        async move { good.ping().await.ok() }
    })
    .await;
    // Without the password: refused by Redis, and said so.
    let no_pw = Registry::connect(
        &url,
        "ap",
        &RedisTlsArgs {
            redis_ca: Some(pki.ca.clone()),
            ..Default::default()
        }
        .load(&url)
        .expect("options"),
    )
    .expect("registry");
    let e = no_pw.ping().await.expect_err("no password").to_string();
    assert!(e.contains("NOAUTH") || e.contains("uthentication"), "{e}");
    // Another CA: the handshake fails, and the error says why.
    let bad = Registry::connect(&url, "ap", &options(&other.ca, &pw, &url)).expect("registry");
    let e = bad.ping().await.expect_err("wrong CA").to_string();
    assert!(
        e.contains("certificate") || e.contains("UnknownIssuer"),
        "{e}"
    );

    // A real control plane: the right CA is SERVING, a wrong one NOT_SERVING
    // with the reason in its log.
    for (ca, want) in [(&pki.ca, "SERVING"), (&other.ca, "NOT_SERVING")] {
        let log = dir.path().join(format!("cp-{want}.log"));
        let mut cmd = Command::new(bin("control-plane"));
        cmd.args(["--insecure", "--listen", "127.0.0.1:0", "--redis-url", &url])
            .arg("--redis-ca")
            .arg(ca)
            .arg("--redis-password-file")
            .arg(&pw)
            .env("AGENTPLANE_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log"));
        agentplane::process::die_with_parent(&mut cmd);
        let mut child = cmd.spawn().expect("start control-plane");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("listening line");
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .expect("address")
            .to_owned();
        let health = eventually(Duration::from_secs(15), &format!("health {want}"), || {
            let addr = addr.clone();
            async move {
                let out = Command::new(bin("agentctl"))
                    .args(["--endpoint", &format!("http://{addr}"), "health"])
                    .output()
                    .ok()?;
                let said = String::from_utf8_lossy(&out.stdout).trim().to_owned();
                (said == want).then_some(said)
            }
        })
        .await;
        assert_eq!(health, want);
        if want == "NOT_SERVING" {
            let text = std::fs::read_to_string(&log).expect("log");
            assert!(
                text.contains("registry unreachable") && text.contains("certificate"),
                "the log says why: {text}"
            );
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}
