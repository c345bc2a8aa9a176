//! The vocabulary every SNAPS crate shares: relations and their attributes, the
//! values tuples carry, and the status attributes that SNAPS adds to a site's
//! relations (appendix A of the thesis) and to the global snapshot (appendix B).
//!
//! The thesis typed attributes as `i2`, `i4`, `f4` and `cN`; those widths are
//! part of the contract between a site and the global snapshot (a site with an
//! `i2` column cannot hold an `i4` value), so every value entering SNAPS is
//! checked against its attribute's type here, once, with a message naming the
//! attribute. Schemas are written as SQL DDL (`CREATE TABLE`) and read with
//! `sqlparser`, so the fixtures read like the databases they describe.
//!
//! The key decision: the global status splits the thesis' 46-bit word. Rights,
//! lock site and user code keep their exact appendix-B packing, while the
//! *sent-to* set is a bitmap of any length ([`SentTo`]), because a network is not
//! limited to 31 sites.

pub mod calendar;
mod catalog;
pub mod datagen;
mod error;
pub mod identity;
mod ids;
pub mod include;
mod network;
mod status;
pub mod summary;
mod value;

pub use catalog::{Attribute, Catalog, Relation, sql_ident};
pub use error::{Error, Result};
pub use ids::{Epoch, SiteCode, SiteNo, SnapshotNo, TupleId, UserCode};
pub use network::{KeyRange, NetworkConfig, RelationMode, SiteConfig};
pub use status::{GlobalRights, GlobalStatus, LocalRights, LocalStatus, SentTo, TupleType};
pub use value::{Value, ValueType};
