//! The results of every system, printed as one table and written as CSV.

use std::fmt::Write as _;
use std::path::Path;

/// One system's figures; `None` where a workload does not apply to it or
/// could not be measured.
#[derive(Debug, Default, Clone)]
pub struct Results {
    /// Start N sleepers: from the command to the last one running, seconds.
    pub start_wall_s: Option<f64>,
    /// Agents running at the end of the start command.
    pub started: Option<usize>,
    /// Each agent's time to running from the start command: median, ms.
    pub start_p50_ms: Option<f64>,
    /// The same, 99th percentile, ms.
    pub start_p99_ms: Option<f64>,
    /// Supervisor RSS per running agent, above the same supervisor idle, KiB.
    pub mem_kib_per_agent: Option<f64>,
    /// Stop all: from the command to the last agent gone, seconds.
    pub stop_wall_s: Option<f64>,
    /// Agents still running when the stop command returned.
    pub stop_left: Option<usize>,
    /// `yes` agents: supervisor RSS at the end, MiB.
    pub yes_rss_mib: Option<f64>,
    /// `yes` agents: supervisor CPU, % of one core.
    pub yes_cpu_pct: Option<f64>,
    /// `yes` agents: their logs' bytes on disk at the end, MiB.
    pub yes_disk_mib: Option<f64>,
    /// `yes` agents: whether the logs stayed within the configured cap.
    pub yes_cap_held: Option<bool>,
    /// Crash loop: supervisor CPU, % of one core.
    pub crash_cpu_pct: Option<f64>,
    /// Crash loop: starts per second over all agents.
    pub crash_starts_per_s: Option<f64>,
    /// Pause/resume calls: median, ms.
    pub pause_p50_ms: Option<f64>,
    /// Pause/resume calls: 99th percentile, ms.
    pub pause_p99_ms: Option<f64>,
}

/// A row of the table: its name and how to read it from [`Results`].
struct Metric {
    name: &'static str,
    get: fn(&Results) -> Option<String>,
}

fn f(v: Option<f64>, digits: usize) -> Option<String> {
    v.map(|v| format!("{v:.digits$}"))
}

const METRICS: &[Metric] = &[
    Metric {
        name: "start: wall (s)",
        get: |r| f(r.start_wall_s, 2),
    },
    Metric {
        name: "start: agents running",
        get: |r| r.started.map(|v| v.to_string()),
    },
    Metric {
        name: "start: rate (agents/s)",
        get: |r| match (r.start_wall_s, r.started) {
            (Some(w), Some(n)) if w > 0.0 => f(Some(n as f64 / w), 0),
            _ => None,
        },
    },
    Metric {
        name: "start: to running p50 (ms)",
        get: |r| f(r.start_p50_ms, 0),
    },
    Metric {
        name: "start: to running p99 (ms)",
        get: |r| f(r.start_p99_ms, 0),
    },
    Metric {
        name: "memory per agent (KiB)",
        get: |r| f(r.mem_kib_per_agent, 1),
    },
    Metric {
        name: "stop all: wall (s)",
        get: |r| f(r.stop_wall_s, 2),
    },
    Metric {
        name: "stop all: left at return",
        get: |r| r.stop_left.map(|v| v.to_string()),
    },
    Metric {
        name: "yes x10: supervisor RSS (MiB)",
        get: |r| f(r.yes_rss_mib, 1),
    },
    Metric {
        name: "yes x10: supervisor CPU (%)",
        get: |r| f(r.yes_cpu_pct, 0),
    },
    Metric {
        name: "yes x10: logs on disk (MiB)",
        get: |r| f(r.yes_disk_mib, 1),
    },
    Metric {
        name: "yes x10: log cap held",
        get: |r| {
            r.yes_cap_held
                .map(|h| if h { "yes" } else { "no" }.to_owned())
        },
    },
    Metric {
        name: "crash loop x100: supervisor CPU (%)",
        get: |r| f(r.crash_cpu_pct, 1),
    },
    Metric {
        name: "crash loop x100: starts/s",
        get: |r| f(r.crash_starts_per_s, 1),
    },
    Metric {
        name: "pause/resume: p50 (ms)",
        get: |r| f(r.pause_p50_ms, 2),
    },
    Metric {
        name: "pause/resume: p99 (ms)",
        get: |r| f(r.pause_p99_ms, 2),
    },
];

/// The table, metrics down and systems across, `-` where not measured.
pub fn table(systems: &[(&str, Results)]) -> String {
    let width = METRICS.iter().map(|m| m.name.len()).max().unwrap_or(0);
    let mut out = format!("{:width$}", "");
    for (name, _) in systems {
        let _ = write!(out, " {name:>12}");
    }
    out.push('\n');
    for m in METRICS {
        let _ = write!(out, "{:width$}", m.name);
        for (_, r) in systems {
            let v = (m.get)(r).unwrap_or_else(|| "-".to_owned());
            let _ = write!(out, " {v:>12}");
        }
        out.push('\n');
    }
    out
}

/// The same as CSV: `metric,SYSTEM…`, empty where not measured.
pub fn write_csv(path: &Path, systems: &[(&str, Results)]) -> std::io::Result<()> {
    let mut out = String::from("metric");
    for (name, _) in systems {
        let _ = write!(out, ",{name}");
    }
    out.push('\n');
    for m in METRICS {
        out.push_str(m.name);
        for (_, r) in systems {
            let _ = write!(out, ",{}", (m.get)(r).unwrap_or_default());
        }
        out.push('\n');
    }
    std::fs::write(path, out)
}
