//! What agentctl prints: stable JSON objects (`-o json`), the same objects
//! as YAML (`-o yaml`), or aligned tables. Data goes to stdout; diagnostics
//! go to stderr.

use std::collections::BTreeMap;

use agentplane::proto::v1::{Agent, Host, LocateAgentResponse};
use agentplane::state;
use agentplane::time::ms_from_timestamp;
use serde::Serialize;

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns for people.
    Table,
    /// One JSON document with stable field names.
    Json,
    /// The JSON document's fields as YAML.
    Yaml,
}

/// RFC 3339 time of a protobuf timestamp.
fn rfc3339(ts: Option<&prost_types::Timestamp>) -> Option<String> {
    let ts = ts?;
    let ms = u64::try_from(ms_from_timestamp(ts)).ok()?;
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    Some(humantime_rfc3339(t))
}

fn humantime_rfc3339(t: std::time::SystemTime) -> String {
    // Whole milliseconds in UTC, e.g. 2026-11-23T22:01:44.123Z.
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, day) = civil_from_days(i64::try_from(days).unwrap_or(0));
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = u32::try_from(doy - (153 * mp + 2) / 5 + 1).unwrap_or(1);
    let m = u32::try_from(if mp < 10 { mp + 3 } else { mp - 9 }).unwrap_or(1);
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// An agent as `-o json` prints it. Field names are a contract.
#[derive(Debug, Serialize)]
pub struct AgentView {
    id: String,
    /// Null when the agent has none (never "").
    name: Option<String>,
    state: &'static str,
    /// Runs started again by the restart policy.
    restarts: u32,
    /// When the last run ended (before a restart, or for good).
    last_exit_at: Option<String>,
    host: String,
    pid: i32,
    generation: u64,
    idle: bool,
    exit_code: Option<i32>,
    exit_signal: Option<i32>,
    exit_reason: Option<String>,
    error: Option<String>,
    labels: BTreeMap<String, String>,
    argv: Vec<String>,
    created_at: Option<String>,
    started_at: Option<String>,
    finished_at: Option<String>,
}

impl From<&Agent> for AgentView {
    fn from(a: &Agent) -> Self {
        let spec = a.spec.clone().unwrap_or_default();
        let exit = a.exit.as_ref();
        Self {
            id: a.id.clone(),
            name: Some(spec.name).filter(|n| !n.is_empty()),
            state: state::name(a.state()),
            restarts: a.restarts,
            last_exit_at: rfc3339(last_end(a)),
            host: a.host.clone(),
            pid: a.pid,
            generation: a.generation,
            idle: a.idle,
            exit_code: exit.and_then(|e| e.code),
            exit_signal: exit.and_then(|e| e.signal),
            exit_reason: exit
                .map(|e| state::reason_name(e.reason()).to_owned())
                .filter(|r| !r.is_empty()),
            error: exit.map(|e| e.error.clone()).filter(|r| !r.is_empty()),
            labels: spec.labels.into_iter().collect(),
            argv: spec.argv,
            created_at: rfc3339(a.created_at.as_ref()),
            started_at: rfc3339(a.started_at.as_ref()),
            finished_at: rfc3339(exit.and_then(|e| e.finished_at.as_ref())),
        }
    }
}

/// A location as `-o json` prints it.
#[derive(Debug, Serialize)]
pub struct LocationView {
    id: String,
    host: String,
    address: String,
    live: bool,
    state: &'static str,
    pid: i32,
    generation: u64,
}

impl From<&LocateAgentResponse> for LocationView {
    fn from(l: &LocateAgentResponse) -> Self {
        Self {
            id: l.id.clone(),
            host: l.host.clone(),
            address: l.address.clone(),
            live: l.live,
            state: state::name(l.state()),
            pid: l.pid,
            generation: l.generation,
        }
    }
}

/// A host as `-o json` prints it.
#[derive(Debug, Serialize)]
pub struct HostView {
    id: String,
    address: String,
    labels: BTreeMap<String, String>,
    capacity: u32,
    running: u32,
    cordoned: bool,
    version: String,
    started_at: Option<String>,
    heartbeat_at: Option<String>,
    /// "ready", "cordoned" or "restarting".
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    restarting_until: Option<String>,
    /// `v1 freeze,memory,pids,cpu`, or `none` (as `hosts ls` shows it).
    cgroups: String,
}

/// A host's status word, as `hosts ls` shows it.
pub fn host_status(h: &Host) -> &'static str {
    if h.restarting_until.is_some() {
        "restarting"
    } else if h.cordoned {
        "cordoned"
    } else {
        "ready"
    }
}

impl From<&Host> for HostView {
    fn from(h: &Host) -> Self {
        Self {
            id: h.id.clone(),
            address: h.address.clone(),
            labels: h.labels.clone().into_iter().collect(),
            capacity: h.capacity,
            running: h.running,
            cordoned: h.cordoned,
            version: h.version.clone(),
            started_at: rfc3339(h.started_at.as_ref()),
            heartbeat_at: rfc3339(h.heartbeat_at.as_ref()),
            status: host_status(h),
            restarting_until: rfc3339(h.restarting_until.as_ref()),
            cgroups: host_cgroups(h),
        }
    }
}

/// What a host's cgroups give agents, in one word or two: `none`, or the
/// mode and what it enforces (`v1 freeze,memory,pids,cpu`).
pub fn host_cgroups(h: &Host) -> String {
    use agentplane::proto::v1::CgroupMode;
    let Some(c) = &h.cgroups else {
        return "-".into();
    };
    let mode = match c.mode() {
        CgroupMode::V1 => "v1",
        CgroupMode::V2 => "v2",
        CgroupMode::None => return "none".into(),
        CgroupMode::Unspecified => return "-".into(),
    };
    let on: Vec<&str> = [
        (c.freeze, "freeze"),
        (c.memory, "memory"),
        (c.pids, "pids"),
        (c.cpu, "cpu"),
    ]
    .into_iter()
    .filter_map(|(on, name)| on.then_some(name))
    .collect();
    if on.is_empty() {
        mode.into()
    } else {
        format!("{mode} {}", on.join(","))
    }
}

/// An event as `watch -o json` prints it (one object per line).
#[derive(Debug, Serialize)]
pub struct EventView {
    token: String,
    #[serde(rename = "type")]
    kind: &'static str,
    agent_id: String,
    /// The agent's name when it has one (null otherwise, and for host
    /// events).
    pub agent_name: Option<String>,
    state: &'static str,
    previous: &'static str,
    host: String,
    generation: u64,
    at: Option<String>,
}

impl From<&agentplane::proto::v1::Event> for EventView {
    fn from(e: &agentplane::proto::v1::Event) -> Self {
        Self {
            token: e.token.clone(),
            kind: agentplane::registry::type_name(e.r#type()),
            agent_id: e.agent_id.clone(),
            agent_name: None,
            state: state::name(e.state()),
            previous: state::name(e.previous()),
            host: e.host.clone(),
            generation: e.generation,
            at: rfc3339(e.at.as_ref()),
        }
    }
}

/// One line of `watch` in table format.
pub fn event_line(e: &agentplane::proto::v1::Event, name: Option<&str>) -> String {
    let at = rfc3339(e.at.as_ref()).unwrap_or_default();
    let kind = agentplane::registry::type_name(e.r#type());
    if e.agent_id.is_empty() {
        format!("{at}  {kind:<13} host {}", e.host)
    } else {
        let who = match name {
            Some(n) => format!("{n} ({})", e.agent_id),
            None => e.agent_id.clone(),
        };
        format!(
            "{at}  {kind:<13} {who}  {} -> {}  host {} gen {}",
            state::name(e.previous()),
            state::name(e.state()),
            e.host,
            e.generation
        )
    }
}

/// A drain progress message as `hosts drain -o json` prints it.
#[derive(Debug, Serialize)]
pub struct DrainView {
    remaining: u32,
    moved: u32,
    stopped: u32,
    message: String,
    done: bool,
}

impl From<&agentplane::proto::v1::DrainProgress> for DrainView {
    fn from(p: &agentplane::proto::v1::DrainProgress) -> Self {
        Self {
            remaining: p.remaining,
            moved: p.moved,
            stopped: p.stopped,
            message: p.message.clone(),
            done: p.done,
        }
    }
}

/// Prints `value` on stdout as pretty JSON, or as YAML for `-o yaml`.
pub fn document<T: Serialize>(fmt: Format, value: &T) -> anyhow::Result<()> {
    match fmt {
        Format::Yaml => print!("{}", serde_norway::to_string(value)?),
        Format::Json | Format::Table => println!("{}", serde_json::to_string_pretty(value)?),
    }
    Ok(())
}

/// Prints one item of a stream (watch events, drain progress) as soon as it
/// comes: a JSON line, or a YAML document that starts with `---`.
pub fn stream_item<T: Serialize>(fmt: Format, value: &T) -> anyhow::Result<()> {
    match fmt {
        Format::Yaml => print!("---\n{}", serde_norway::to_string(value)?),
        Format::Json | Format::Table => println!("{}", serde_json::to_string(value)?),
    }
    Ok(())
}

/// How long ago `t` was, as kubectl prints an age: `45s`, `12m`, `5h`,
/// `3d`; `-` when unknown.
pub fn age(t: Option<&prost_types::Timestamp>) -> String {
    let Some(t) = t else { return "-".into() };
    let ms = agentplane::time::now_ms().saturating_sub(ms_from_timestamp(t));
    let s = ms.max(0) / 1000;
    match s {
        s if s < 120 => format!("{s}s"),
        s if s < 2 * 3600 => format!("{}m", s / 60),
        s if s < 2 * 86400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

/// Prints rows under a header with columns padded to the widest cell.
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    let widths = widths(header, rows);
    print_row(
        &widths,
        &header.iter().map(|h| (*h).to_owned()).collect::<Vec<_>>(),
    );
    for row in rows {
        print_row(&widths, row);
    }
}

/// The width of each column: its widest cell, header included.
pub fn widths(header: &[&str], rows: &[Vec<String>]) -> Vec<usize> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    widths
}

/// Prints one row padded to `widths` (a later row of a table printed
/// earlier, as `ls -w` adds them).
pub fn print_row(widths: &[usize], cells: &[String]) {
    let mut out = String::new();
    for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
        if i + 1 == cells.len() {
            out.push_str(cell);
        } else {
            out.push_str(&format!("{cell:<w$}  "));
        }
    }
    println!("{}", out.trim_end());
}

/// One table row of an agent.
pub fn agent_row(a: &Agent) -> Vec<String> {
    let spec = a.spec.clone().unwrap_or_default();
    let exit = match &a.exit {
        Some(e) => match (e.code, e.signal) {
            (Some(c), _) => format!("{} ({c})", state::reason_name(e.reason())),
            (_, Some(s)) => format!("{} (sig {s})", state::reason_name(e.reason())),
            _ => state::reason_name(e.reason()).to_owned(),
        },
        None => String::new(),
    };
    let mut cmd = spec.argv.join(" ");
    if cmd.chars().count() > 40 {
        cmd = cmd.chars().take(39).collect::<String>() + "…";
    }
    vec![
        a.id.clone(),
        if spec.name.is_empty() {
            "-".into()
        } else {
            spec.name
        },
        if a.idle && a.state() == agentplane::proto::v1::AgentState::Running {
            "IDLE".to_owned()
        } else {
            state::name(a.state()).to_owned()
        },
        restarts_cell(a),
        a.host.clone(),
        if a.pid == 0 {
            "-".into()
        } else {
            a.pid.to_string()
        },
        a.generation.to_string(),
        if exit.is_empty() { "-".into() } else { exit },
        cmd,
    ]
}

/// The header of [`agent_row`].
pub const AGENT_HEADER: &[&str] = &[
    "ID", "NAME", "STATE", "RESTARTS", "HOST", "PID", "GEN", "EXIT", "COMMAND",
];

/// What to call an agent: its name, or its id when it has none.
pub fn name_or_id(a: &Agent) -> String {
    a.spec
        .as_ref()
        .map(|s| s.name.clone())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| a.id.clone())
}

/// When the agent's last run ended: the run before a restart (`last_exit`)
/// or its final end.
fn last_end(a: &Agent) -> Option<&prost_types::Timestamp> {
    a.last_exit
        .as_ref()
        .or(a.exit.as_ref())
        .and_then(|e| e.finished_at.as_ref())
}

/// kubectl's RESTARTS cell: the count, and how long ago the last run ended
/// when the agent restarted at least once (`3 (12s ago)`).
fn restarts_cell(a: &Agent) -> String {
    let last = last_end(a);
    match (a.restarts, last) {
        (0, _) | (_, None) => a.restarts.to_string(),
        (n, Some(t)) => format!("{n} ({} ago)", age(Some(t))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_utc() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_795_471_304_123);
        assert_eq!(humantime_rfc3339(t), "2026-11-23T22:01:44.123Z");
        assert_eq!(
            humantime_rfc3339(std::time::UNIX_EPOCH),
            "1970-01-01T00:00:00.000Z"
        );
    }

    /// The whole `-o json` object of an agent, key for key: the schema
    /// README's "JSON objects" section documents. A change here is a change
    /// of contract.
    #[test]
    fn an_agents_json_is_this_exact_object() {
        let a = Agent {
            id: "01jxagent".into(),
            state: agentplane::proto::v1::AgentState::Running as i32,
            host: "h1".into(),
            pid: 42,
            generation: 3,
            restarts: 2,
            spec: Some(agentplane::proto::v1::AgentSpec {
                argv: vec!["sleep".into(), "1".into()],
                labels: [("team".to_owned(), "a".to_owned())].into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let v = serde_json::to_value(AgentView::from(&a)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "id": "01jxagent",
                "name": null,
                "state": "RUNNING",
                "restarts": 2,
                "last_exit_at": null,
                "host": "h1",
                "pid": 42,
                "generation": 3,
                "idle": false,
                "exit_code": null,
                "exit_signal": null,
                "exit_reason": null,
                "error": null,
                "labels": {"team": "a"},
                "argv": ["sleep", "1"],
                "created_at": null,
                "started_at": null,
                "finished_at": null,
            })
        );
    }

    #[test]
    fn restarts_show_how_long_ago_the_last_run_ended() {
        let mut a = Agent {
            restarts: 3,
            ..Default::default()
        };
        assert_eq!(restarts_cell(&a), "3");
        a.last_exit = Some(agentplane::proto::v1::ExitStatus {
            finished_at: Some(agentplane::time::timestamp_from_ms(
                agentplane::time::now_ms() - 12_000,
            )),
            ..Default::default()
        });
        assert_eq!(restarts_cell(&a), "3 (12s ago)");
        a.restarts = 0;
        assert_eq!(restarts_cell(&a), "0");
    }
}
