//! The integration suite as one test binary (one link instead of fifty, and
//! ~1.4 GB less in target/): each module was a file under tests/ and keeps
//! its name, so `cargo nextest run -E 'test(/^truth::/)'` runs what
//! `--test truth` did.

mod adoption;
mod agentctl_dev;
mod auth;
mod bulk;
mod cgroups;
mod cli;
mod completion;
mod contexts;
mod deploy;
mod dev_script;
mod disconnect;
mod drain;
mod failure;
mod heartbeat_leases;
mod idempotency;
mod identity;
mod indexes;
mod keeper;
mod keyspace;
mod lifecycle;
mod logs;
mod metrics;
mod monitoring;
mod names;
mod partition;
mod placement;
mod quotas;
mod redis_cluster;
mod redis_outage;
mod redis_tls;
mod registry;
mod replicas;
mod restarting;
mod restarts;
mod rollback;
mod sentinel;
mod sentinel_follow;
mod server_flags;
mod shutdown;
mod soak;
mod spawn_path;
mod status;
mod streams;
mod supervision;
mod sweep_leases;
mod tls;
mod top;
mod traces;
mod truth;
mod typescript;
mod waiting;
mod watch;
