//! Compiles `proto/agentplane/v1/*.proto` with protox (pure Rust, so no `protoc`
//! is needed) and generates the tonic clients and servers.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/agentplane/v1/types.proto",
        "proto/agentplane/v1/agent_service.proto",
        "proto/agentplane/v1/host_service.proto",
        "proto/agentplane/v1/host_agent.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    // Kept for gRPC server reflection.
    std::fs::write(
        out.join("agentplane_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        // Output flows host agent -> control plane -> client: as `Bytes`, a
        // chunk is sliced and relayed without copying it at each hop.
        .bytes(".agentplane.v1.LogChunk.data")
        // Set only when asked for (ListAgents with usage): boxed, so every
        // other LocalAgent stays small.
        .boxed(".agentplane.v1.LocalAgent.usage")
        .compile_fds(fds)?;
    Ok(())
}
