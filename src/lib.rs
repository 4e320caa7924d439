//! agentplane shared library: the generated gRPC API, ids and validation, the
//! Redis registry (the whole schema in one place), and config, shutdown and
//! telemetry helpers shared by the control plane, the host agent and `agentctl`.

pub mod auth;
pub mod cgroups;
pub mod config;
pub mod ids;
pub mod labels;
pub mod metrics;
#[cfg(feature = "pki")]
pub mod pki;
pub mod process;
pub mod registry;
pub mod server;
pub mod shutdown;
pub mod state;
pub mod tasks;
pub mod telemetry;
pub mod time;
pub mod validate;

pub mod proto {
    //! Code generated from `proto/agentplane/v1/*.proto`.
    #![allow(missing_docs, clippy::all)]
    pub mod v1 {
        //! The `agentplane.v1` package.
        tonic::include_proto!("agentplane.v1");
    }
    /// The encoded file descriptor set, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/agentplane_descriptor.bin"));
}

/// The version every binary reports (host records, `--version`).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Exit code for bad configuration or usage (BSD `EX_USAGE`).
pub const EXIT_USAGE: i32 = 64;

/// The largest HTTP/2 frame a client of ours accepts (HTTP/2's default is
/// 16 KiB): a followed log's chunks (64 KiB) then arrive in one frame each
/// instead of four, fewer hand-offs on the busiest stream there is.
pub const CLIENT_MAX_FRAME_SIZE: u32 = 256 * 1024;
