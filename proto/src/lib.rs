//! The gRPC contract between SNAPS sites and the global snapshot controller.
//!
//! Empty so far on purpose: the `.proto` files (site registration, initial
//! load, fetch of a mapped query with its semi-join projections, locks,
//! release of copies, status) arrive with the global controller, compiled in
//! pure Rust by `protox` (no `protoc`), see `ARCHITECTURE.md`. Mapped queries
//! will travel as structured messages built from `snaps_mapping::GlobalQuery`,
//! never as SQL text.
