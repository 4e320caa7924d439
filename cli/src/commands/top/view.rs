//! Drawing `agentctl top` from a [`Model`]: a title, the hosts (load,
//! heartbeat, age), the agents (state, restarts, CPU, memory, output rate)
//! and a status line, laid out to fit an 80×24 terminal.

use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Paragraph, Row, Table};
use ratatui::Frame;

use super::model::Model;
use crate::output;

/// Most host rows shown (the agents get the rest of the screen).
const MAX_HOST_ROWS: usize = 6;

/// Draws the whole screen.
pub fn draw(frame: &mut Frame<'_>, m: &Model) {
    let host_rows = m.hosts.len().clamp(1, MAX_HOST_ROWS);
    let [title, hosts, agents, status] = Layout::vertical([
        Constraint::Length(1),
        // Borders and the header take three lines.
        Constraint::Length(u16::try_from(host_rows + 3).unwrap_or(u16::MAX)),
        Constraint::Min(4),
        Constraint::Length(1),
    ])
    .areas(frame.area());

    let (n, running) = m.counts();
    frame.render_widget(
        Paragraph::new(Line::from(format!(
            "agentplane top  {} hosts  {n} agents ({running} running)  q quits",
            m.hosts.len()
        )))
        .style(Style::default().add_modifier(Modifier::BOLD)),
        title,
    );

    let header = |cells: &[&'static str]| {
        Row::new(cells.to_vec()).style(Style::default().add_modifier(Modifier::BOLD))
    };
    let host_table = Table::new(
        m.hosts.iter().take(MAX_HOST_ROWS).map(|h| {
            Row::new(vec![
                h.id.clone(),
                format!("{}/{}", h.running, h.capacity),
                output::host_status(h).to_owned(),
                format!("{:.1}ms", h.heartbeat_micros as f64 / 1000.0),
                output::age(h.started_at.as_ref()),
                h.address.clone(),
            ])
        }),
        [
            Constraint::Length(14),
            Constraint::Length(10),
            Constraint::Length(10),
            Constraint::Length(8),
            Constraint::Length(5),
            Constraint::Fill(1),
        ],
    )
    .header(header(&[
        "HOST", "LOAD", "STATUS", "BEAT", "AGE", "ADDRESS",
    ]))
    .block(Block::bordered().title(if m.hosts.len() > MAX_HOST_ROWS {
        format!(" hosts (first {MAX_HOST_ROWS} of {}) ", m.hosts.len())
    } else {
        " hosts ".to_owned()
    }));
    frame.render_widget(host_table, hosts);

    let rows = m.rows();
    let agent_table = Table::new(
        rows.iter().map(|r| {
            Row::new(vec![
                r.name.clone(),
                r.state.to_owned(),
                r.host.clone(),
                r.restarts.to_string(),
                r.cpu_percent
                    .map_or_else(|| "-".to_owned(), |c| format!("{c:.0}")),
                r.rss_bytes.map_or_else(|| "-".to_owned(), human),
                r.out_per_sec
                    .map_or_else(|| "-".to_owned(), |b| format!("{}/s", human(b as u64))),
            ])
        }),
        [
            Constraint::Fill(1),
            Constraint::Length(9),
            Constraint::Length(10),
            Constraint::Length(8),
            Constraint::Length(5),
            Constraint::Length(7),
            Constraint::Length(9),
        ],
    )
    .header(header(&[
        "NAME", "STATE", "HOST", "RESTARTS", "CPU%", "RSS", "OUT",
    ]))
    .block(Block::bordered().title(" agents (busiest first) "));
    frame.render_widget(agent_table, agents);

    let note = match (&m.note, m.unreachable.is_empty()) {
        (Some(n), _) => n.clone(),
        (None, false) => format!("no usage from: {}", m.unreachable.join(", ")),
        (None, true) => String::new(),
    };
    frame.render_widget(Paragraph::new(Line::from(note)), status);
}

/// Bytes as `512B`, `12.3K`, `4.5M`, `1.2G`.
fn human(b: u64) -> String {
    let units = ["B", "K", "M", "G", "T"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < units.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b}B")
    } else {
        format!("{v:.1}{}", units[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentplane::proto::v1::{Agent, AgentSpec, AgentState, AgentUsage, Host};
    use ratatui::backend::TestBackend;
    use ratatui::Terminal;

    fn screen(m: &Model, w: u16, h: u16) -> String {
        let mut t = Terminal::new(TestBackend::new(w, h)).expect("terminal");
        t.draw(|f| draw(f, m)).expect("draw");
        let buf = t.backend().buffer().clone();
        (0..h)
            .map(|y| {
                (0..w)
                    .map(|x| buf[(x, y)].symbol().to_owned())
                    .collect::<String>()
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn model(hosts: usize, agents: usize) -> Model {
        let mut m = Model::default();
        m.set_hosts(
            (0..hosts)
                .map(|i| Host {
                    id: format!("h{i}"),
                    address: format!("10.0.0.{i}:7701"),
                    running: 3,
                    capacity: 100,
                    ..Default::default()
                })
                .collect(),
        );
        m.set_agents(
            (0..agents)
                .map(|i| Agent {
                    id: format!("01agent{i:019}"),
                    state: AgentState::Running as i32,
                    host: format!("h{}", i % hosts.max(1)),
                    restarts: 2,
                    spec: Some(AgentSpec {
                        name: format!("worker-{i}"),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .collect(),
        );
        m.apply_usage(
            vec![AgentUsage {
                id: format!("01agent{:019}", 0),
                rss_bytes: 3 << 20,
                ..Default::default()
            }],
            vec!["h9".into()],
        );
        m
    }

    #[test]
    fn an_80_by_24_screen_shows_hosts_agents_and_what_did_not_answer() {
        let s = screen(&model(3, 40), 80, 24);
        for needle in [
            "3 hosts  40 agents (40 running)",
            "HOST",
            "LOAD",
            "3/100",
            "NAME",
            "RESTARTS",
            "worker-0",
            "RUNNING",
            "3.0M",
            "no usage from: h9",
        ] {
            assert!(s.contains(needle), "{needle:?} missing from:\n{s}");
        }
        assert!(
            s.lines().all(|l| l.chars().count() == 80),
            "every line fits:\n{s}"
        );
    }

    #[test]
    fn many_hosts_are_cut_and_tiny_screens_do_not_panic() {
        let s = screen(&model(20, 5), 80, 24);
        assert!(s.contains("first 6 of 20"), "{s}");
        screen(&model(2, 2), 10, 3);
        screen(&Model::default(), 80, 24);
    }

    #[test]
    fn bytes_read_as_people_write_them() {
        assert_eq!(human(512), "512B");
        assert_eq!(human(1536), "1.5K");
        assert_eq!(human(3 << 20), "3.0M");
    }
}
