//! The pieces of the `snaps` command that tests, benchmarks and the demo
//! share: running a network of SNAPS processes on this machine.

pub mod admin;
pub mod bench;
pub mod demo;
mod demo_processes;
pub mod fixtures;
pub mod h2_layers;
pub mod localnet;
pub mod match_bench;
pub mod network_bench;
pub mod network_report;
pub mod pg_server;
pub mod refresh_bench;
pub mod store_bench;
pub mod wire_proxy;
