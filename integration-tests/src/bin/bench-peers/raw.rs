//! The floor: the same sleepers forked and exec'd straight from this
//! process, stopped with SIGTERM, paused with SIGSTOP/SIGCONT.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::os;
use crate::report::Results;
use crate::Plan;

/// The marker that tells the raw sleepers from the other systems'.
const SLEEP: [&str; 2] = ["sleep", "100000.1"];

fn sleeper() -> Child {
    Command::new(SLEEP[0])
        .arg(SLEEP[1])
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn sleep")
}

/// Waits until `pid`'s state letter is (or is not) `T`.
fn wait_state(pid: i32, stopped: bool) {
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        let s = agentplane_integration_tests::procfs::stat(pid).map(|p| p.state);
        if (s == Some('T')) == stopped {
            return;
        }
        std::hint::spin_loop();
    }
}

/// Runs the workloads that have a floor (no supervisor: no memory, log or
/// restart figures).
pub fn run(plan: &Plan) -> Results {
    let mut r = Results::default();
    let argv: Vec<String> = SLEEP.iter().map(|s| (*s).to_owned()).collect();
    let t0_boot = os::boot_now();
    let t0 = Instant::now();
    let mut children: Vec<Child> = (0..plan.agents).map(|_| sleeper()).collect();
    let pids = os::wait_for_count(&argv, plan.agents, Duration::from_secs(60));
    r.start_wall_s = Some(t0.elapsed().as_secs_f64());
    r.started = Some(pids.len());
    (r.start_p50_ms, r.start_p99_ms) = crate::to_running(&pids, t0_boot);

    let t0 = Instant::now();
    for c in &children {
        let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
    }
    r.stop_left = Some(0);
    for c in &mut children {
        let _ = c.wait();
    }
    r.stop_wall_s = Some(t0.elapsed().as_secs_f64());

    let mut paused: Vec<Child> = (0..plan.pause_agents).map(|_| sleeper()).collect();
    let mut took = Vec::with_capacity(plan.calls);
    for i in 0..plan.calls {
        let pid = paused[(i / 2) % paused.len()].id() as i32;
        let stop = i % 2 == 0;
        let t = Instant::now();
        let sig = if stop {
            Signal::SIGSTOP
        } else {
            Signal::SIGCONT
        };
        let _ = kill(Pid::from_raw(pid), sig);
        wait_state(pid, stop);
        took.push(t.elapsed());
    }
    (r.pause_p50_ms, r.pause_p99_ms) = crate::p50_p99(&mut took);
    for c in &mut paused {
        let _ = c.kill();
        let _ = c.wait();
    }
    r
}
