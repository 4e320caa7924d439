//! The workloads on pm2 (from npm): a private daemon (`PM2_HOME`) per
//! workload, the apps in an ecosystem file, `pm2 start/stop` for the bulk
//! commands and its node API (`sendSignalToProcessName`) for the calls.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;

use crate::os;
use crate::report::Results;
use crate::Plan;

/// The marker that tells pm2's sleepers from the other systems'.
const SLEEP: [&str; 2] = ["sleep", "100000.4"];

/// One private pm2 daemon.
struct Daemon {
    pm2: PathBuf,
    home: PathBuf,
}

impl Daemon {
    /// Starts the daemon (`pm2 ping`) with no apps.
    fn start(pm2: &Path, home: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(home)?;
        let d = Self {
            pm2: pm2.to_owned(),
            home: home.to_owned(),
        };
        anyhow::ensure!(d.cmd(&["ping"]).status.success(), "pm2 ping failed");
        Ok(d)
    }

    fn cmd(&self, args: &[&str]) -> std::process::Output {
        let out = Command::new(&self.pm2)
            .args(args)
            .env("PM2_HOME", &self.home)
            // The fan-out of its bulk commands (default 2), as agentctl's 32.
            .env("PM2_CONCURRENT_ACTIONS", "32")
            .output()
            .expect("run pm2");
        if !out.status.success() {
            eprintln!("pm2 {args:?}: {}", os::head(&out.stderr, 3));
        }
        out
    }

    /// The daemon's pid, from its pid file.
    fn pid(&self) -> i32 {
        std::fs::read_to_string(self.home.join("pm2.pid"))
            .ok()
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Writes an ecosystem file of `apps` and starts them.
    fn start_apps(&self, apps: &[serde_json::Value]) -> anyhow::Result<()> {
        let file = self.home.join("ecosystem.json");
        std::fs::write(&file, serde_json::to_vec(&json!({ "apps": apps }))?)?;
        let out = self.cmd(&["start", file.to_str().context("utf-8 path")?]);
        anyhow::ensure!(out.status.success(), "pm2 start failed");
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let pid = self.pid();
        self.cmd(&["kill"]);
        // `pm2 kill` returns before the daemon has gone.
        let until = Instant::now() + Duration::from_secs(30);
        while pid > 0
            && agentplane_integration_tests::procfs::is_alive(pid)
            && Instant::now() < until
        {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// `program`'s absolute path: pm2 looks for a bare name in the working
/// directory first.
fn which(program: &str) -> String {
    std::env::var_os("PATH")
        .and_then(|path| {
            std::env::split_paths(&path)
                .map(|d| d.join(program))
                .find(|p| p.is_file())
        })
        .map_or_else(|| program.to_owned(), |p| p.display().to_string())
}

fn app(name: String, script: &str, args: &str, extra: serde_json::Value) -> serde_json::Value {
    let mut a = json!({
        "name": name,
        "script": which(script),
        "args": args,
        "interpreter": "none",
        "exec_mode": "fork",
    });
    if let (Some(a), Some(e)) = (a.as_object_mut(), extra.as_object()) {
        a.extend(e.clone());
    }
    a
}

/// The node script behind the pause/resume figures: STOP then CONT, one
/// call at a time through pm2's API (by id), each call's time in µs on a line.
const SIGNALS_JS: &str = r"
const pm2 = require(process.argv[2]);
const [names, calls] = [process.argv[3].split(','), Number(process.argv[4])];
const call = (f, ...args) => new Promise((ok, no) => f.call(pm2, ...args, (e, v) => (e ? no(e) : ok(v))));
pm2.connect(async (err) => {
  if (err) { console.error(err); process.exit(1); }
  // By id: by name pm2 sleeps 200 ms per call.
  const ids = [];
  for (const n of names) ids.push((await call(pm2.describe, n))[0].pm_id);
  for (let i = 0; i < calls; i++) {
    const id = ids[Math.floor(i / 2) % ids.length];
    const t = process.hrtime.bigint();
    await call(pm2.sendSignalToProcessId, i % 2 === 0 ? 'SIGSTOP' : 'SIGCONT', id);
    console.log(Number((process.hrtime.bigint() - t) / 1000n));
  }
  pm2.disconnect();
});
";

/// Runs every workload with the `pm2` executable given.
pub fn run(plan: &Plan, pm2: &Path) -> anyhow::Result<Results> {
    let mut r = Results::default();
    let argv: Vec<String> = SLEEP.iter().map(|s| (*s).to_owned()).collect();
    let root = plan.work.join("pm2");
    let sleep_args = SLEEP[1];

    // Start, memory, stop.
    let d = Daemon::start(pm2, &root.join("sleep"))?;
    std::thread::sleep(Duration::from_secs(1));
    let idle = os::rss_kib(&[d.pid()]);
    let apps: Vec<_> = (1..=plan.agents)
        .map(|i| app(format!("s{i}"), SLEEP[0], sleep_args, json!({})))
        .collect();
    crate::start_stop(
        &mut r,
        plan,
        &argv,
        idle,
        &|| vec![d.pid()],
        &mut || {
            if let Err(e) = d.start_apps(&apps) {
                eprintln!("pm2: start: {e}");
            }
        },
        &mut || drop(d.cmd(&["stop", "all"])),
    );
    drop(d);

    // `yes`: pm2 has no log cap of its own (pm2-logrotate is a module).
    let d = Daemon::start(pm2, &root.join("yes"))?;
    let apps: Vec<_> = (1..=plan.yes_agents)
        .map(|i| app(format!("y{i}"), "yes", "", json!({})))
        .collect();
    d.start_apps(&apps)?;
    crate::yes_figures(&mut r, plan, &[d.pid()], &d.home.join("logs"), 0);
    d.cmd(&["delete", "all"]);
    drop(d);

    // A crash loop with pm2's exponential backoff from 1 s.
    let d = Daemon::start(pm2, &root.join("crash"))?;
    let file = plan.work.join("pm2-crashes");
    let script = format!("echo x >> {}; exit 1", file.display());
    let apps: Vec<_> = (1..=plan.crash_agents)
        .map(|i| {
            json!({
                "name": format!("c{i}"),
                "script": which("sh"),
                "args": ["-c", script],
                "interpreter": "none",
                "exec_mode": "fork",
                "exp_backoff_restart_delay": 1000,
                // Its default (16 unstable restarts, then "errored") would
                // end the loop.
                "max_restarts": 1_000_000_000,
            })
        })
        .collect();
    d.start_apps(&apps)?;
    crate::crash_figures(&mut r, plan, &[d.pid()], &file);
    d.cmd(&["delete", "all"]);
    drop(d);

    // Pause/resume through pm2's API.
    let d = Daemon::start(pm2, &root.join("pause"))?;
    let apps: Vec<_> = (1..=plan.pause_agents)
        .map(|i| app(format!("p{i}"), SLEEP[0], sleep_args, json!({})))
        .collect();
    d.start_apps(&apps)?;
    os::wait_for_count(&argv, plan.pause_agents, Duration::from_secs(30));
    let module = pm2
        .canonicalize()?
        .ancestors()
        .find(|p| p.join("package.json").is_file() && p.ends_with("pm2"))
        .map(Path::to_owned)
        .context("pm2's package directory")?;
    let js = root.join("signals.js");
    std::fs::write(&js, SIGNALS_JS)?;
    let names: Vec<String> = (1..=plan.pause_agents).map(|i| format!("p{i}")).collect();
    let out = Command::new("node")
        .arg(&js)
        .arg(&module)
        .arg(names.join(","))
        .arg(plan.calls.to_string())
        .env("PM2_HOME", &d.home)
        .env("PM2_SILENT", "true")
        .output()
        .context("run node")?;
    let mut took: Vec<Duration> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .map(Duration::from_micros)
        .collect();
    if took.len() != plan.calls {
        eprintln!(
            "pm2: {} of {} calls answered: {}",
            took.len(),
            plan.calls,
            os::head(&out.stderr, 3)
        );
    }
    (r.pause_p50_ms, r.pause_p99_ms) = crate::p50_p99(&mut took);
    d.cmd(&["delete", "all"]);
    drop(d);
    Ok(r)
}
