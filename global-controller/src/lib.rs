//! The global snapshot controller: the one process every site talks to. It
//! will hold the global snapshot (the union of what the sites export, with
//! appendix-B status per tuple), answer mapped queries, grant primary-copy
//! locks and run the nightly refresh.
//!
//! Empty so far on purpose: it is built on the mapping engine
//! (`snaps_mapping::GlobalQuery` is what it will evaluate) in the next piece
//! of work; see `ARCHITECTURE.md` for what it will own.
