//! The keeper (issue P7, in progress): a small per-host process that will
//! be the parent of every agent, so agents outlive a host agent's restart.
//! So far only its transport exists ([`wire`]: messages with descriptors
//! over a seqpacket Unix socket); nothing starts a keeper yet.

pub mod wire;
