//! `agentplane-keeper`: the keeper alone (see `keeper::process`), a binary
//! of its own so that the process holding every agent maps only the code it
//! runs: none of the gRPC server, the supervisor or the CLI parsing. Started
//! by the host agent as `agentplane-keeper __agentplane_keeper DATA_DIR
//! GRACE_MS`; its guard and its forker are this binary re-executed.

use agentplane_host_agent::keeper::{run_forker, run_keeper, FORKER_ARG, KEEPER_ARG};
use agentplane_host_agent::supervisor::{run_guard, GUARD_ARG};

fn main() {
    let mut args = std::env::args().skip(1);
    match args.next().as_deref() {
        Some(GUARD_ARG) => run_guard(),
        Some(FORKER_ARG) => {
            let rest: Vec<String> = args.collect();
            run_forker(&rest)
        }
        Some(KEEPER_ARG) => {
            let rest: Vec<String> = args.collect();
            run_keeper(&rest)
        }
        _ => {
            eprintln!("usage: agentplane-keeper {KEEPER_ARG} DATA_DIR ORPHAN_GRACE_MS (started by host-agent)");
            std::process::exit(agentplane::EXIT_USAGE);
        }
    }
}
