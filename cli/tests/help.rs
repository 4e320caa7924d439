//! `--help` of every agentctl command against its snapshot in
//! `tests/help/`: a change to the CLI's contract shows in review.
//! `TRYCMD=overwrite cargo test -p agentctl --test help` rewrites them.

#[test]
fn every_commands_help_is_its_snapshot() {
    trycmd::TestCases::new().case("tests/help/*.toml");
}
