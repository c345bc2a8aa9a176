//! How a site's query becomes a query on the global snapshot and back.
//!
//! A statement arrives in SQL ([`sql`]) or QUEL ([`quel`]) and becomes the
//! [`ir`]. Decomposition splits its qualification, as chapter 7 of the thesis
//! does, into *selections* (conjuncts on one range variable), *join clauses*
//! (`r.a = s.b`) and conjuncts that only the site can evaluate. A site's mapping
//! (its mapping and mapping-qualification tables) then rewrites the mapped part
//! onto the global schema and maps returned tuples back. The *performed* check
//! decides whether an earlier snapshot already holds everything a query needs.
//!
//! The rule every step keeps: **over-fetch, never under-fetch.** Whatever does
//! not map is dropped from the fetch, which only widens it; the final answer is
//! always computed at the site over its own data plus the fetched copies. And a
//! query is judged *performed* only when that is provably sound.
//!
//! Architecture invariant: this crate does no I/O — no SQLite, no network, no
//! proto types. It turns a statement and a mapping into a plan.

pub mod decompose;
mod error;
pub mod eval;
pub mod ir;
pub mod mapping;
pub mod performed;
pub mod quel;
pub mod rewrite;
pub mod sql;

pub use error::{Error, Result};
pub use ir::{Language, Statement};
pub use mapping::SiteMapping;
pub use rewrite::{GlobalQuery, Plan, plan};

/// Parses a statement, telling SQL from QUEL by its first word (see
/// [`quel::looks_like_quel`]).
pub fn parse(text: &str) -> Result<(Language, Vec<Statement>)> {
    if quel::looks_like_quel(text) {
        Ok((Language::Quel, quel::parse(text)?))
    } else {
        Ok((Language::Sql, sql::parse(text)?))
    }
}
