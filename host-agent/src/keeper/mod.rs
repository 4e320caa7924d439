//! The keeper (issue P7, in progress): a small per-host process that is
//! the parent of the agents it starts, so agents can outlive a host agent's
//! restart. [`process`] is the keeper itself, [`client`] the host agent's
//! end, [`proto`] their messages and [`wire`] the transport (messages with
//! descriptors over a seqpacket Unix socket); `liveness` is how the keeper
//! tells Redis that its machine is alive while no host agent is. The
//! supervisor starts every agent through it.

pub mod client;
mod liveness;
pub mod process;
pub mod proto;
pub mod wire;

pub use client::{Keeper, KeeperError, KeptRun, Run};
pub use process::{run_keeper, KEEPER_ARG};
pub use proto::Exit;
