//! `control-plane` binary: parses and validates the configuration (exit 64 when
//! it is bad), binds the listener, and serves until SIGINT/SIGTERM.

use agentplane_control_plane::{run, Config};

fn main() -> anyhow::Result<()> {
    let config: Config = agentplane::server::config_or_exit("control-plane");
    agentplane::server::runtime_builder(&config.serve)
        .build()?
        .block_on(serve(config))
}

/// Everything after the configuration, on the runtime.
async fn serve(config: Config) -> anyhow::Result<()> {
    let telemetry = match agentplane::telemetry::init(
        config.log_json,
        agentplane::telemetry::Service {
            name: "agentplane-control-plane",
            instance: agentplane::ids::new_agent_id(),
        },
        config.serve.otlp_endpoint.as_deref(),
    ) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("control-plane: {e}");
            std::process::exit(agentplane::EXIT_USAGE);
        }
    };
    let listener = match tokio::net::TcpListener::bind(config.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("control-plane: cannot listen on {}: {e}", config.listen);
            std::process::exit(agentplane::EXIT_USAGE);
        }
    };
    // One line on stdout with the bound address (useful with `--listen …:0`);
    // every other diagnostic goes to stderr.
    if let Ok(addr) = listener.local_addr() {
        println!("listening on {addr}");
    }
    let served = run(listener, config, agentplane::shutdown::shutdown_signal()).await;
    // The last spans leave before the process does, whatever the outcome.
    telemetry.shutdown().await;
    served?;
    Ok(())
}
