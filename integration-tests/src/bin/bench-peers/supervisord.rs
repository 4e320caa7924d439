//! The workloads on supervisord (from PyPI): one private daemon per
//! workload, its programs in its config, driven by `supervisorctl` for the
//! bulk commands and by its XML-RPC interface for the per-call figures.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::os;
use crate::report::Results;
use crate::Plan;

/// The marker that tells supervisord's sleepers from the other systems'.
const SLEEP: [&str; 2] = ["sleep", "100000.3"];

/// One private supervisord.
struct Daemon {
    child: Child,
    conf: PathBuf,
    bin: PathBuf,
    port: u16,
    dir: PathBuf,
}

impl Daemon {
    /// Writes a config of `programs` (name, `[program:x]` body) and starts it
    /// in the foreground; returns once it answers.
    fn start(bin: &Path, dir: &Path, programs: &[(String, String)]) -> anyhow::Result<Self> {
        // Up to 5 descriptors per program (3 pipes, 2 log files).
        let fds = (5 * programs.len() + 64).max(1024);
        std::fs::create_dir_all(dir.join("logs"))?;
        let port = agentplane_integration_tests::free_port();
        let mut conf = format!(
            "[supervisord]\nnodaemon=true\nlogfile={d}/supervisord.log\npidfile={d}/supervisord.pid\n\
             childlogdir={d}/logs\nminfds={fds}\nminprocs={procs}\nloglevel=warn\n\n\
             [inet_http_server]\nport=127.0.0.1:{port}\n\n\
             [rpcinterface:supervisor]\n\
             supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n\n\
             [supervisorctl]\nserverurl=http://127.0.0.1:{port}\n\n",
            d = dir.display(),
            procs = programs.len() + 256,
        );
        // One group: on SIGTERM supervisord stops a group per tick, so a
        // program per group makes its exit take up to seconds per program.
        if !programs.is_empty() {
            let names: Vec<&str> = programs.iter().map(|(n, _)| n.as_str()).collect();
            conf.push_str(&format!("[group:g]\nprograms={}\n\n", names.join(",")));
        }
        for (name, body) in programs {
            conf.push_str(&format!("[program:{name}]\n{body}\n"));
        }
        let path = dir.join("supervisord.conf");
        std::fs::write(&path, conf)?;
        let child = Command::new(bin.join("supervisord"))
            .arg("-c")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .context("start supervisord")?;
        let d = Self {
            child,
            conf: path,
            bin: bin.to_owned(),
            port,
            dir: dir.to_owned(),
        };
        let until = Instant::now() + Duration::from_secs(30);
        while d.rpc("supervisor.getState", &[]).is_err() {
            anyhow::ensure!(Instant::now() < until, "supervisord did not answer in 30 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(d)
    }

    fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).unwrap_or(0)
    }

    /// `supervisorctl ARGS`.
    fn ctl(&self, args: &[&str]) -> std::process::Output {
        let out = Command::new(self.bin.join("supervisorctl"))
            .arg("-c")
            .arg(&self.conf)
            .args(args)
            .output()
            .expect("run supervisorctl");
        if !out.status.success() {
            eprintln!(
                "supervisord: supervisorctl {args:?}: {}",
                os::head(&out.stdout, 3)
            );
        }
        out
    }

    /// One XML-RPC call on a kept-alive HTTP/1.1 connection (a fresh one
    /// when `conn` is empty); the response body.
    fn rpc_on(
        &self,
        conn: &mut Option<BufReader<TcpStream>>,
        method: &str,
        params: &[&str],
    ) -> anyhow::Result<String> {
        let mut body =
            format!("<?xml version=\"1.0\"?><methodCall><methodName>{method}</methodName><params>");
        for p in params {
            body.push_str(&format!(
                "<param><value><string>{p}</string></value></param>"
            ));
        }
        body.push_str("</params></methodCall>");
        if conn.is_none() {
            let s = TcpStream::connect(("127.0.0.1", self.port))?;
            s.set_nodelay(true)?;
            *conn = Some(BufReader::new(s));
        }
        let r = conn.as_mut().context("connected")?;
        write!(
            r.get_mut(),
            "POST /RPC2 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/xml\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )?;
        let mut status = String::new();
        r.read_line(&mut status)?;
        anyhow::ensure!(status.contains(" 200 "), "supervisord answered {status:?}");
        let mut length = 0;
        loop {
            let mut line = String::new();
            r.read_line(&mut line)?;
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    length = v.trim().parse()?;
                }
            }
        }
        let mut answer = vec![0; length];
        r.read_exact(&mut answer)?;
        let answer = String::from_utf8_lossy(&answer).into_owned();
        anyhow::ensure!(!answer.contains("<fault>"), "{method}: fault {answer}");
        Ok(answer)
    }

    /// One XML-RPC call on a connection of its own.
    fn rpc(&self, method: &str, params: &[&str]) -> anyhow::Result<String> {
        self.rpc_on(&mut None, method, params)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Its SIGTERM stops every program before it exits.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid()),
            nix::sys::signal::Signal::SIGTERM,
        );
        let until = Instant::now() + Duration::from_secs(60);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn programs(n: usize, prefix: &str, body: &str) -> Vec<(String, String)> {
    (1..=n)
        .map(|i| (format!("{prefix}{i}"), body.to_owned()))
        .collect()
}

/// Runs every workload with the `supervisord` and `supervisorctl` in `bin`.
pub fn run(plan: &Plan, bin: &Path) -> anyhow::Result<Results> {
    let mut r = Results::default();
    let argv: Vec<String> = SLEEP.iter().map(|s| (*s).to_owned()).collect();
    let root = plan.work.join("supervisord");

    // Idle: the same daemon with no programs.
    let idle = {
        let d = Daemon::start(bin, &root.join("idle"), &[])?;
        std::thread::sleep(Duration::from_secs(1));
        os::rss_kib(&[d.pid()])
    };

    // Start all, memory, stop all. startsecs=0: a program counts as started
    // once forked, as agentplane's spawn answers once the process runs.
    let sleeper = format!(
        "command={} {}\nautostart=false\nstartsecs=0\n",
        SLEEP[0], SLEEP[1]
    );
    let d = Daemon::start(
        bin,
        &root.join("sleep"),
        &programs(plan.agents, "s", &sleeper),
    )?;
    crate::start_stop(
        &mut r,
        plan,
        &argv,
        idle,
        &|| vec![d.pid()],
        &mut || drop(d.ctl(&["start", "all"])),
        &mut || drop(d.ctl(&["stop", "all"])),
    );
    drop(d);

    // `yes` with its log capped: one backup, so a program keeps at most
    // twice maxbytes; half the cap each.
    let yes = format!(
        "command=yes\nautostart=true\nstartsecs=0\nstdout_logfile_maxbytes={}\nstdout_logfile_backups=1\n",
        plan.log_cap_bytes / 2
    );
    let d = Daemon::start(
        bin,
        &root.join("yes"),
        &programs(plan.yes_agents, "y", &yes),
    )?;
    crate::yes_figures(&mut r, plan, &[d.pid()], &d.dir.join("logs"), 0);
    drop(d);

    // A crash loop: supervisord's backoff (1 s more before each retry) needs
    // startsecs > the run, and retries forever only with a huge startretries.
    let file = plan.work.join("supervisord-crashes");
    let crash = format!(
        "command=sh -c 'echo x >> {}; exit 1'\nautostart=true\nautorestart=true\nstartsecs=1\nstartretries=1000000000\n",
        file.display()
    );
    let d = Daemon::start(
        bin,
        &root.join("crash"),
        &programs(plan.crash_agents, "c", &crash),
    )?;
    crate::crash_figures(&mut r, plan, &[d.pid()], &file);
    drop(d);

    // Pause/resume: signalProcess STOP / CONT over XML-RPC.
    let paused = format!(
        "command={} {}\nautostart=true\nstartsecs=0\n",
        SLEEP[0], SLEEP[1]
    );
    let d = Daemon::start(
        bin,
        &root.join("pause"),
        &programs(plan.pause_agents, "p", &paused),
    )?;
    os::wait_for_count(&argv, plan.pause_agents, Duration::from_secs(30));
    let mut took = Vec::with_capacity(plan.calls);
    let mut conn = None;
    for i in 0..plan.calls {
        let name = format!("g:p{}", (i / 2) % plan.pause_agents + 1);
        let sig = if i % 2 == 0 { "STOP" } else { "CONT" };
        let t = Instant::now();
        if let Err(e) = d.rpc_on(&mut conn, "supervisor.signalProcess", &[&name, sig]) {
            eprintln!("supervisord: call {i}: {e}");
        }
        took.push(t.elapsed());
    }
    (r.pause_p50_ms, r.pause_p99_ms) = crate::p50_p99(&mut took);
    drop(d);
    Ok(r)
}
