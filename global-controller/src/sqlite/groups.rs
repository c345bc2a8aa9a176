//! The SQLite store's kept join groups: the bodies of the groups each site
//! fetched, under the names the site gave them, so the site's
//! refresh re-runs its snapshot definitions by name.
//!
//! * `snaps_site_group` — per site and name, the group's encoded body and
//!   the day it was last named. Bodies no site named for
//!   [`KEEP_DAYS`] days go (a site evicts its snapshots unused for 30 days
//!   by default; a site naming a body gone sends it again).

use std::collections::HashMap;

use rusqlite::{TransactionBehavior, params};

use super::SqliteStore;
use crate::error::Result;
use crate::store::SiteId;

/// The table.
pub(super) const TABLES: &str = "
CREATE TABLE IF NOT EXISTS snaps_site_group (
    site INTEGER NOT NULL, name INTEGER NOT NULL, body BLOB NOT NULL,
    used_day INTEGER NOT NULL, PRIMARY KEY (site, name)) WITHOUT ROWID;
";

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
                "DELETE FROM snaps_site_group WHERE used_day < ?1",
                [day - KEEP_DAYS],
            )?;
        }
        tx.commit()?;
        Ok(out)
    }
}
