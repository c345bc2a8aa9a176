//! The SQLite store's kept join groups: the bodies of the groups each site
//! fetched, under the names the site gave them, so the site's
//! refresh re-runs its snapshot definitions by name.
//!
//! * `snaps_site_group` — per site and name, the group's encoded body, the
//!   day it was last named, and whether it is *standing*: one of the site's
//!   snapshot definitions fetches it, so each night the controller sends
//!   the site what the epoch's changes add to it. Bodies neither standing
//!   nor named for [`KEEP_DAYS`] days go (a site evicts its snapshots
//!   unused for 30 days by default; a site naming a body gone sends it
//!   again).

use std::collections::HashMap;

use rusqlite::{TransactionBehavior, params};

use super::SqliteStore;
use crate::error::Result;
use crate::store::SiteId;

/// The table.
pub(super) const TABLES: &str = "
CREATE TABLE IF NOT EXISTS snaps_site_group (
    site INTEGER NOT NULL, name INTEGER NOT NULL, body BLOB NOT NULL,
    used_day INTEGER NOT NULL, standing INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (site, name)) WITHOUT ROWID;
";

/// Brings a table made before standing groups up to date.
pub(super) fn migrate(conn: &rusqlite::Connection) -> Result<()> {
    let has: bool = conn.query_row(
        "SELECT count(*) FROM pragma_table_info('snaps_site_group') WHERE name = 'standing'",
        [],
        |r| r.get(0),
    )?;
    if !has {
        conn.execute_batch(
            "ALTER TABLE snaps_site_group ADD COLUMN standing INTEGER NOT NULL DEFAULT 0",
        )?;
    }
    Ok(())
}

/// Days a body is kept after it was last named.
pub(crate) const KEEP_DAYS: i64 = 90;

fn today() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64 / 86_400)
}

impl SqliteStore {
    pub(super) fn remember_group_bodies(
        &self,
        site: &SiteId,
        groups: &[(u64, Vec<u8>)],
    ) -> Result<()> {
        if groups.is_empty() {
            return Ok(());
        }
        let day = today();
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            let mut put = tx.prepare_cached(
                "INSERT INTO snaps_site_group (site, name, body, used_day) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (site, name) DO UPDATE SET body = excluded.body, used_day = excluded.used_day",
            )?;
            for (name, body) in groups {
                put.execute(params![i64::from(site.number.0), *name as i64, body, day])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    pub(super) fn recall_group_bodies(
        &self,
        site: &SiteId,
        names: &[u64],
    ) -> Result<HashMap<u64, Vec<u8>>> {
        let mut out = HashMap::new();
        if names.is_empty() {
            return Ok(out);
        }
        let day = today();
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            let mut get = tx.prepare_cached(
                "SELECT body FROM snaps_site_group WHERE site = ?1 AND name = ?2",
            )?;
            let mut used = tx.prepare_cached(
                "UPDATE snaps_site_group SET used_day = ?3 WHERE site = ?1 AND name = ?2 AND used_day < ?3",
            )?;
            for d in names {
                let key = params![i64::from(site.number.0), *d as i64];
                let body: Option<Vec<u8>> =
                    get.query_row(key, |r| r.get(0))
                        .map(Some)
                        .or_else(|e| match e {
                            rusqlite::Error::QueryReturnedNoRows => Ok(None),
                            e => Err(e),
                        })?;
                if let Some(body) = body {
                    used.execute(params![i64::from(site.number.0), *d as i64, day])?;
                    out.insert(*d, body);
                }
            }
            tx.execute(
                "DELETE FROM snaps_site_group WHERE used_day < ?1 AND standing = 0",
                [day - KEEP_DAYS],
            )?;
        }
        tx.commit()?;
        Ok(out)
    }
}

impl SqliteStore {
    /// Makes `added` standing for `site` (all of its standing names, with
    /// `whole`) and `removed` not; returns the added names that have no
    /// body (not made standing) and how many are standing now.
    pub(super) fn change_standing_bodies(
        &self,
        site: &SiteId,
        added: &[u64],
        removed: &[u64],
        whole: bool,
    ) -> Result<(Vec<u64>, u64)> {
        let me = i64::from(site.number.0);
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        if whole {
            tx.execute(
                "UPDATE snaps_site_group SET standing = 0 WHERE site = ?1",
                [me],
            )?;
        }
        let mut unknown = Vec::new();
        {
            let mut set = tx.prepare_cached(
                "UPDATE snaps_site_group SET standing = ?3 WHERE site = ?1 AND name = ?2",
            )?;
            for name in added {
                if set.execute(params![me, *name as i64, 1])? == 0 {
                    unknown.push(*name);
                }
            }
            for name in removed {
                set.execute(params![me, *name as i64, 0])?;
            }
        }
        let standing: i64 = tx.query_row(
            "SELECT count(*) FROM snaps_site_group WHERE site = ?1 AND standing = 1",
            [me],
            |r| r.get(0),
        )?;
        tx.commit()?;
        Ok((unknown, standing as u64))
    }

    /// The bodies standing for `site`, by name.
    pub(super) fn standing_bodies(&self, site: &SiteId) -> Result<Vec<(u64, Vec<u8>)>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT name, body FROM snaps_site_group WHERE site = ?1 AND standing = 1 ORDER BY name",
        )?;
        let rows = stmt
            .query_map([i64::from(site.number.0)], |r| {
                Ok((r.get::<_, i64>(0)? as u64, r.get(1)?))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }
}
