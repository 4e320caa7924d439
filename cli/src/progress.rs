//! Spinners and progress bars on stderr for the commands that wait
//! (`spawn --wait`, bulk `stop`/`pause`/`resume`/`rm`, `spawn --count`,
//! `hosts drain`): drawn only when stderr is a terminal and the output is a
//! table, so pipes, scripts and `-o json|yaml` never see them.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use crate::output::Format;

/// Whether to draw at all.
fn drawn(fmt: Format) -> bool {
    matches!(fmt, Format::Table) && std::io::stderr().is_terminal()
}

/// A spinner with `msg`, ticking on its own; hidden when not drawn.
pub fn spinner(fmt: Format, msg: String) -> ProgressBar {
    if !drawn(fmt) {
        return ProgressBar::hidden();
    }
    let p = ProgressBar::new_spinner().with_message(msg);
    // The prefix is what changes while it spins (an agent's state).
    if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} {prefix}") {
        p.set_style(style);
    }
    p.enable_steady_tick(Duration::from_millis(120));
    p
}

/// A bar of `len` steps named `msg`; hidden when not drawn or for one step.
pub fn bar(fmt: Format, len: u64, msg: &'static str) -> ProgressBar {
    if !drawn(fmt) || len < 2 {
        return ProgressBar::hidden();
    }
    let p = ProgressBar::new(len).with_message(msg);
    if let Ok(style) = ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {elapsed}") {
        p.set_style(style.progress_chars("=> "));
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_drawn_for_json_or_a_single_step() {
        assert!(spinner(Format::Json, "x".into()).is_hidden());
        assert!(bar(Format::Yaml, 10, "x").is_hidden());
        assert!(bar(Format::Table, 1, "x").is_hidden());
    }
}
