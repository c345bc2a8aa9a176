//! Repeated covered reads without parsing, planning or the *performed*
//! check.
//!
//! A radiology application asks the same few statements over and over (a
//! patient by number, a visit's reports). Once a statement was found
//! covered by the site's snapshots, the same verdict holds for the same text
//! until one of the things the verdict was drawn from changes: the mapping
//! in effect, the snapshot definitions held, or the site's tuples (whose new
//! and modified ones make the semi-join projections). A [`Stamp`] records
//! those, read before the check; a later statement with the same text and
//! the same stamp runs on SQLite at once. The stamp is conservative: any
//! commit by another connection (a stored snapshot, a refresh, another
//! client's write) moves SQLite's `data_version`, and the session clears its
//! verdicts itself before it runs any statement that is not a read.

use std::collections::HashMap;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use rusqlite::Connection;
use snaps_mapping::performed::SnapshotDefinition;
use snaps_schema::SnapshotNo;

use crate::Result;
use crate::site::Active;

/// How many statement texts a session keeps verdicts (and compiled
/// statements) for; past that it starts again. An application's distinct
/// statements are far fewer, and a compiled statement costs a few kB.
pub(crate) const CAPACITY: usize = 256;

/// The snapshot definitions a site holds, with a generation that moves on
/// after every change to them.
pub(crate) struct Definitions {
    list: RwLock<Vec<(SnapshotNo, SnapshotDefinition)>>,
    generation: AtomicU64,
}

impl Definitions {
    /// The definitions read from the site's database at open.
    pub(crate) fn new(list: Vec<(SnapshotNo, SnapshotDefinition)>) -> Definitions {
        Definitions {
            list: RwLock::new(list),
            generation: AtomicU64::new(0),
        }
    }

    /// The definitions, for reading.
    pub(crate) fn read(&self) -> RwLockReadGuard<'_, Vec<(SnapshotNo, SnapshotDefinition)>> {
        self.list.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The definitions, for changing; the generation moves on when the
    /// guard is dropped, before the lock is released, so a reader that read
    /// the old generation cannot have seen the new list under it.
    pub(crate) fn write(&self) -> DefinitionsMut<'_> {
        DefinitionsMut {
            guard: self.list.write().unwrap_or_else(|p| p.into_inner()),
            generation: &self.generation,
        }
    }

    /// The current generation.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }
}

/// Write access to [`Definitions`].
pub(crate) struct DefinitionsMut<'a> {
    guard: RwLockWriteGuard<'a, Vec<(SnapshotNo, SnapshotDefinition)>>,
    generation: &'a AtomicU64,
}

impl Deref for DefinitionsMut<'_> {
    type Target = Vec<(SnapshotNo, SnapshotDefinition)>;
    fn deref(&self) -> &Self::Target {
        &self.guard
    }
}

impl DerefMut for DefinitionsMut<'_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.guard
    }
}

impl Drop for DefinitionsMut<'_> {
    fn drop(&mut self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }
}

/// What a covered verdict was drawn from.
pub(crate) struct Stamp {
    mapping: Arc<Active>,
    definitions: u64,
    /// SQLite's `data_version` on the session's connection: it changes
    /// whenever another connection commits.
    data_version: i64,
}

impl Stamp {
    /// The state now, as `conn` sees it. Read before the check whose
    /// verdict it will stamp.
    pub(crate) fn now(
        conn: &Connection,
        mapping: Arc<Active>,
        definitions: &Definitions,
    ) -> Result<Stamp> {
        let definitions = definitions.generation();
        let data_version = conn
            .prepare_cached("PRAGMA data_version")?
            .query_row([], |r| r.get(0))?;
        Ok(Stamp {
            mapping,
            definitions,
            data_version,
        })
    }

    fn same(&self, other: &Stamp) -> bool {
        Arc::ptr_eq(&self.mapping, &other.mapping)
            && self.definitions == other.definitions
            && self.data_version == other.data_version
    }
}

/// A statement found covered.
pub(crate) struct Verdict {
    stamp: Stamp,
    /// The snapshots that cover it, marked used on `touched`.
    pub(crate) used: Vec<SnapshotNo>,
    pub(crate) touched: i64,
}

/// One session's covered verdicts, by statement text.
#[derive(Default)]
pub(crate) struct CoveredReads {
    verdicts: HashMap<String, Verdict>,
}

impl CoveredReads {
    /// The verdict for `text` if it still holds in the state `now` reads
    /// (called only when there is a verdict to check).
    pub(crate) fn get(
        &mut self,
        text: &str,
        now: impl FnOnce() -> Result<Stamp>,
    ) -> Result<Option<&mut Verdict>> {
        let Some(v) = self.verdicts.get_mut(text) else {
            return Ok(None);
        };
        let now = now()?;
        Ok(v.stamp.same(&now).then_some(v))
    }

    /// Records that `text` was found covered by `used` in the state
    /// `stamp`, and that those snapshots were marked used on `day`.
    pub(crate) fn remember(&mut self, text: &str, stamp: Stamp, used: Vec<SnapshotNo>, day: i64) {
        if self.verdicts.len() >= CAPACITY && !self.verdicts.contains_key(text) {
            self.verdicts.clear();
        }
        self.verdicts.insert(
            text.to_string(),
            Verdict {
                stamp,
                used,
                touched: day,
            },
        );
    }

    /// Forgets every verdict (before the session changes anything itself).
    pub(crate) fn clear(&mut self) {
        self.verdicts.clear();
    }
}
