//! The pieces of the `snaps` command that tests, benchmarks and the demo
//! share: running a network of SNAPS processes on this machine.

pub mod admin;
pub mod bench;
pub mod demo;
pub mod localnet;
pub mod refresh_bench;
