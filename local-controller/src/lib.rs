//! The SNAPS local controller: one per site, in front of the site's own SQLite
//! database.
//!
//! A radiology site keeps running its own application on its own relations
//! (appendix H of the thesis). SNAPS does not move that data anywhere else: the
//! local controller *owns* the site's database and adds to it only what SNAPS
//! needs to share it. On every relation the site maps onto the global snapshot
//! it adds one hidden status column, the appendix-A byte (tuple type, access
//! rights, new, modified, just-copied); and beside the application's relations
//! it keeps bookkeeping tables, all prefixed `snaps_`: the site's identity, its
//! mapping and mapping-qualification tables, the snapshot definitions and
//! memberships, and the traffic counters an administrator reads with
//! `SELECT name, value FROM snaps_stats`.
//!
//! The database is the contract, not the controller process: programs at the
//! site may still open the SQLite file directly, so the rules that must hold
//! whoever writes live in the file as triggers: a direct update of a mapped
//! attribute of a tuple that is not new sets its *modified* bit, so the
//! nightly refresh pushes the change; a copy changes only under the
//! primary-copy lock; an exported tuple's key never changes; copies are
//! deleted only by their owner; deleted own tuples wait for the refresh.
//!
//! Modules: [`store`] creates a site's database from its catalog and mapping
//! ([`SiteStore::create`]), reopens it ([`SiteStore::open`]) and loads the
//! site's own data ([`SiteStore::load`]); [`site`] is the query path
//! (performed check, fetch from the global snapshot controller, storing
//! snapshot tuples) and, with `write`, the update path with primary-copy
//! locks; [`remote`] the client of the global controller; [`endpoint`] the
//! PostgreSQL-wire SQL endpoint that hides the status column from the
//! application; [`serve`] `snaps site serve`.

mod catalogue;
mod covered;
pub mod endpoint;
pub mod engine;
mod identity;
mod include;
mod kept;
mod links;
pub mod mapping_admin;
pub mod refresh;
pub mod remote;
pub mod serve;
pub mod site;
pub mod store;
mod summary;
pub mod sync;
pub mod users;
pub mod value;
mod write;

use std::path::PathBuf;

pub use store::SiteStore;

/// Errors of the local controller, by category.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The site's SQLite database failed.
    #[error("sqlite: {0}")]
    Storage(#[from] rusqlite::Error),
    /// A catalog, value or status from the schema crate was wrong.
    #[error(transparent)]
    Schema(#[from] snaps_schema::Error),
    /// The site's mapping was wrong.
    #[error(transparent)]
    Mapping(#[from] snaps_mapping::Error),
    /// A file outside SQLite's reach (the database file itself) could not be
    /// created or inspected.
    #[error("{path}: {source}")]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// The global snapshot controller answered with an error.
    #[error("global controller: {}", remote_text(.0))]
    Remote(tonic::Status),
    /// The global snapshot controller could not be reached.
    #[error("global controller unreachable: {0}")]
    Unreachable(String),
    /// Another site holds the primary-copy lock on a tuple the statement
    /// would change.
    #[error("{0}")]
    Locked(String),
    /// The tuple belongs to another site and this site may not change it.
    #[error("{0}")]
    ReadOnly(String),
    /// An inserted key already exists in the global snapshot under another
    /// owner.
    #[error("{0}")]
    DuplicateKey(String),
    /// A refresh epoch is under way: changes to shared relations wait.
    #[error("{0}")]
    Busy(String),
    /// A test asked the site to stop here, as a crash would.
    #[error("halted at {0}")]
    Halted(String),
    /// A statement SNAPS does not support (yet).
    #[error("{0}")]
    Unsupported(String),
    /// A request the store refuses: bad data, an unknown relation, a file that
    /// is not a site database, a database that already exists.
    #[error("{0}")]
    Invalid(String),
}

/// A refusal of the access rules speaks for itself; other answers say
/// what kind they are.
fn remote_text(s: &tonic::Status) -> String {
    match s.code() {
        tonic::Code::PermissionDenied => s.message().to_string(),
        code => format!("{code}: {}", s.message()),
    }
}

impl From<tonic::Status> for Error {
    /// A transport failure says only "transport error"; its causes (a
    /// refused certificate, a reset connection) are what an administrator
    /// needs, so they join the message.
    fn from(status: tonic::Status) -> Error {
        let full = error_chain(&status);
        let Some(causes) = full
            .strip_prefix(&status.to_string())
            .filter(|c| !c.is_empty())
        else {
            return Error::Remote(status);
        };
        let message = format!("{}{causes}", status.message());
        Error::Remote(tonic::Status::with_metadata(
            status.code(),
            message,
            status.metadata().clone(),
        ))
    }
}

/// An error and its causes on one line, each cause once: transport errors
/// hide the reason (a refused certificate, say) in their sources.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let t = c.to_string();
        if !text.contains(&t) {
            text.push_str(": ");
            text.push_str(&t);
        }
        cause = c.source();
    }
    text
}

/// Result with the local controller's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
