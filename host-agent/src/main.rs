//! `host-agent` binary: parses and validates the configuration (exit 64 when it
//! is bad), binds the listener, and runs until SIGINT/SIGTERM.

use agentplane_host_agent::supervisor::{run_guard, GUARD_ARG};
use agentplane_host_agent::{run, Config};

fn main() -> anyhow::Result<()> {
    // The guard is this binary re-executed; it must not start a runtime.
    if std::env::args().nth(1).as_deref() == Some(GUARD_ARG) {
        run_guard();
    }
    // So is the keeper, which starts a small runtime of its own.
    if std::env::args().nth(1).as_deref() == Some(agentplane_host_agent::keeper::FORKER_ARG) {
        let args: Vec<String> = std::env::args().skip(2).collect();
        agentplane_host_agent::keeper::run_forker(&args);
    }
    if std::env::args().nth(1).as_deref() == Some(agentplane_host_agent::keeper::KEEPER_ARG) {
        let args: Vec<String> = std::env::args().skip(2).collect();
        agentplane_host_agent::keeper::run_keeper(&args);
    }
    let config: Config = agentplane::server::config_or_exit("host-agent");
    agentplane::server::runtime_builder(&config.serve)
        // The blocking work here is short file-system work (a start's
        // files and cgroups, log reads): a few threads keep up with a flood
        // of starts, where tokio's default bound (512) let 1,000 starts at
        // 32 in flight grow the pool to about 70 threads, each with its
        // stack and malloc arena (about 2 KiB more RSS per agent).
        .max_blocking_threads(16)
        .build()?
        .block_on(serve(config))
}

/// Everything after the configuration, on the runtime.
async fn serve(config: Config) -> anyhow::Result<()> {
    let telemetry = match agentplane::telemetry::init(
        config.log_json,
        agentplane::telemetry::Service {
            name: "agentplane-host-agent",
            instance: config.host_id.clone(),
        },
        config.serve.otlp_endpoint.as_deref(),
    ) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("host-agent: {e}");
            std::process::exit(agentplane::EXIT_USAGE);
        }
    };
    let listener = match tokio::net::TcpListener::bind(config.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("host-agent: cannot listen on {}: {e}", config.listen);
            std::process::exit(agentplane::EXIT_USAGE);
        }
    };
    // One line on stdout with the bound address (useful with `--listen …:0`);
    // every other diagnostic goes to stderr.
    if let Ok(addr) = listener.local_addr() {
        println!("listening on {addr}");
    }
    let shutdown = async {
        agentplane::shutdown::shutdown_signal().await;
        // A second SIGINT/SIGTERM during the graceful stop forces the exit;
        // the keeper then ends whatever agents are left.
        tokio::spawn(async {
            agentplane::shutdown::shutdown_signal().await;
            eprintln!("host-agent: second signal, exiting now");
            std::process::exit(130);
        });
    };
    let served = run(listener, config, shutdown).await;
    // The last spans leave before the process does, whatever the outcome.
    telemetry.shutdown().await;
    served?;
    Ok(())
}
