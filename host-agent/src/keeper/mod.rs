//! The keeper: a small per-host process that is
//! the parent of the agents it starts, so agents can outlive a host agent's
//! restart. [`process`] is the keeper itself, [`client`] the host agent's
//! end, [`proto`] their messages and [`wire`] the transport (messages with
//! descriptors over a seqpacket Unix socket); `liveness` is how the keeper
//! tells Redis that its machine is alive while no host agent is. The
//! supervisor starts every agent through it.

pub mod client;
mod fork;
pub mod forker;
mod kept;
mod liveness;
mod prepared;
pub mod process;
pub mod proto;
pub mod wire;

pub use client::{Keeper, KeeperError, KeptRun, Run};
pub use forker::{run_forker, FORKER_ARG};
pub use process::{run_keeper, KEEPER_ARG};
pub use proto::Exit;

/// The keeper's own binary's name, installed beside `host-agent`.
pub const KEEPER_BIN: &str = "agentplane-keeper";

/// The program a new keeper runs: `agentplane-keeper` beside this
/// executable, which maps only the keeper's code (about 2 MiB less RSS than
/// this whole binary in keeper mode), or else this executable itself, which
/// runs the keeper when given [`KEEPER_ARG`] (a copied or upgraded
/// `host-agent` alone, `agentctl dev` installed alone).
pub fn program() -> std::io::Result<std::path::PathBuf> {
    let exe = std::env::current_exe()?;
    let slim = exe.with_file_name(KEEPER_BIN);
    Ok(if slim.is_file() { slim } else { exe })
}
