//! Names for the join groups a site fetches, so the nightly refresh re-runs
//! its snapshot definitions by name.
//!
//! Every group a fetch sends carries a name (`Group.kept`): a small number
//! the site gives each distinct group body (told apart by
//! [`snaps_proto::group_digest`]), sequential so a night's list of names
//! compresses well. The controller keeps the body under the name for this
//! site. Once a request carrying the body was answered, the name is
//! *confirmed* and the refresh sends the name alone.
//!
//! Why a name never stands for the wrong body: a name is given once, to one
//! body, and the row recording it (`snaps_kept_group`) is never deleted; the
//! controller's body for a name is always the last one the site sent with
//! it. A name given but not recorded (a rolled-back transaction, a restore
//! from an older file) may be given again to another body, but only an
//! unconfirmed one, which goes with its body, replacing what the controller
//! kept. A name the controller lost comes back as unknown, and the body is
//! sent again.
//!
//! A name is *standing* (`snaps_kept_group.standing`) once the controller
//! has confirmed, at a night's refetch, that it evaluates the body for this
//! site at every epoch; the site tells it only which names became standing
//! and which stopped, so a night's request follows the day's new and
//! evicted definitions, not all that are held.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

use rusqlite::{Connection, params};
use snaps_proto::v1;

use crate::Result;

/// The table, created at open in files made before it existed.
pub(crate) const TABLE: &str = "CREATE TABLE IF NOT EXISTS snaps_kept_group (
    digest    INTEGER PRIMARY KEY,
    name      INTEGER NOT NULL UNIQUE,
    confirmed INTEGER NOT NULL DEFAULT 0,
    standing  INTEGER NOT NULL DEFAULT 0
);";

/// Brings a table made before standing names up to date.
fn migrate(conn: &Connection) -> Result<()> {
    let has: bool = conn.query_row(
        "SELECT count(*) FROM pragma_table_info('snaps_kept_group') WHERE name = 'standing'",
        [],
        |r| r.get(0),
    )?;
    if !has {
        conn.execute_batch(
            "ALTER TABLE snaps_kept_group ADD COLUMN standing INTEGER NOT NULL DEFAULT 0",
        )?;
    }
    Ok(())
}

/// The names the controller confirmed standing.
pub(crate) fn standing(conn: &Connection) -> Result<BTreeSet<u32>> {
    let mut stmt = conn.prepare("SELECT name FROM snaps_kept_group WHERE standing = 1")?;
    let names = stmt
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<BTreeSet<u32>>>()?;
    Ok(names)
}

/// Records what the controller confirmed: `names` standing or not (with
/// `whole`, exactly `names` standing).
pub(crate) fn set_standing(
    conn: &Connection,
    names: &BTreeSet<u32>,
    standing: bool,
    whole: bool,
) -> Result<()> {
    if whole {
        conn.execute("UPDATE snaps_kept_group SET standing = 0", [])?;
    }
    let mut set =
        conn.prepare_cached("UPDATE snaps_kept_group SET standing = ?2 WHERE name = ?1")?;
    for name in names {
        set.execute(params![name, standing])?;
    }
    Ok(())
}

/// The names a site gave, by body digest.
pub(crate) struct KeptNames {
    inner: Mutex<Names>,
}

struct Names {
    /// digest → (name, confirmed).
    by_digest: HashMap<u64, (u32, bool)>,
    /// The next name to give.
    next: u32,
}

impl KeptNames {
    /// The names recorded in the site's file.
    pub(crate) fn read(conn: &Connection) -> Result<KeptNames> {
        conn.execute_batch(TABLE)?;
        migrate(conn)?;
        let mut by_digest = HashMap::new();
        let mut next = 1;
        let mut stmt = conn.prepare("SELECT digest, name, confirmed FROM snaps_kept_group")?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let (digest, name, confirmed): (i64, u32, bool) = (r.get(0)?, r.get(1)?, r.get(2)?);
            by_digest.insert(digest as u64, (name, confirmed));
            next = next.max(name.saturating_add(1));
        }
        Ok(KeptNames {
            inner: Mutex::new(Names { by_digest, next }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Names> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Names every group of `req`, giving (and recording through `conn`)
    /// names to bodies not named before.
    pub(crate) fn name(&self, conn: &Connection, req: &mut v1::FetchRequest) -> Result<()> {
        let mut names = self.lock();
        for g in &mut req.groups {
            let digest = snaps_proto::group_digest(g);
            let name = match names.by_digest.get(&digest) {
                Some((name, _)) => *name,
                None => {
                    let name = names.next;
                    names.next = names.next.saturating_add(1);
                    conn.prepare_cached(
                        "INSERT OR REPLACE INTO snaps_kept_group (digest, name, confirmed) VALUES (?1, ?2, 0)",
                    )?
                    .execute(params![digest as i64, name])?;
                    names.by_digest.insert(digest, (name, false));
                    name
                }
            };
            g.kept = name;
        }
        Ok(())
    }

    /// The request with every group whose name is confirmed sent by name
    /// alone, but for the groups at `whole`.
    pub(crate) fn by_name(&self, req: &v1::FetchRequest, whole: &[u32]) -> v1::FetchRequest {
        let names = self.lock();
        let confirmed: std::collections::HashSet<u32> = names
            .by_digest
            .values()
            .filter(|(_, c)| *c)
            .map(|(n, _)| *n)
            .collect();
        let mut out = req.clone();
        for (i, g) in out.groups.iter_mut().enumerate() {
            if g.kept != 0 && confirmed.contains(&g.kept) && !whole.contains(&(i as u32)) {
                g.tables.clear();
                g.joins.clear();
            }
        }
        out
    }

    /// Whether the controller confirmed keeping the body named `name`.
    pub(crate) fn confirmed(&self, name: u32) -> bool {
        self.lock()
            .by_digest
            .values()
            .any(|&(n, confirmed)| n == name && confirmed)
    }

    /// The bodies `sent` carried reached the controller (its reply came).
    pub(crate) fn confirm(&self, conn: &Connection, sent: &v1::FetchRequest) -> Result<()> {
        let mut names = self.lock();
        for g in sent
            .groups
            .iter()
            .filter(|g| g.kept != 0 && !g.tables.is_empty())
        {
            let digest = snaps_proto::group_digest(g);
            if let Some(entry) = names.by_digest.get_mut(&digest)
                && entry.0 == g.kept
                && !entry.1
            {
                conn.prepare_cached("UPDATE snaps_kept_group SET confirmed = 1 WHERE digest = ?1")?
                    .execute([digest as i64])?;
                entry.1 = true;
            }
        }
        Ok(())
    }
}
