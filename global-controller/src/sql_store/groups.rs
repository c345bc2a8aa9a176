//! The store's kept join groups: the bodies of the groups each site
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

use super::SqlStore;
use crate::db::{Db, Tx};
use crate::error::Result;
use crate::store::SiteId;

/// The kept join-group bodies, per site and name.
pub(super) const TABLES: &str = "
CREATE TABLE IF NOT EXISTS snaps_site_group (
    site INTEGER NOT NULL, name INTEGER NOT NULL, body BLOB NOT NULL,
    used_day INTEGER NOT NULL, standing INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (site, name)) WITHOUT ROWID;
";

/// Adds the `standing` column to an SQLite store from before it.
pub(super) fn add_standing(tx: &mut dyn Tx) -> Result<()> {
    let has = tx
        .one(
            "SELECT count(*) FROM pragma_table_info('snaps_site_group') WHERE name = 'standing'",
            &[],
        )?
        .map(|r| r.flag(0))
        .transpose()?
        .unwrap_or(false);
    if !has {
        tx.batch("ALTER TABLE snaps_site_group ADD COLUMN standing INTEGER NOT NULL DEFAULT 0")?;
    }
    Ok(())
}

/// Days a body no site named is kept.
pub(crate) const KEEP_DAYS: i64 = 90;

fn today() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64 / 86_400)
}

impl<D: Db> SqlStore<D> {
    pub(super) fn remember_group_bodies(
        &self,
        site: &SiteId,
        groups: &[(u64, Vec<u8>)],
    ) -> Result<()> {
        if groups.is_empty() {
            return Ok(());
        }
        let day = today();
        self.tx(|tx| {
            for (name, body) in groups {
                tx.execute(
                    "INSERT INTO snaps_site_group (site, name, body, used_day) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (site, name) DO UPDATE SET body = excluded.body, used_day = excluded.used_day",
                    &[site.number.0.into(), (*name).into(), body.into(), day.into()],
                )?;
            }
            Ok(())
        })
    }

    pub(super) fn recall_group_bodies(
        &self,
        site: &SiteId,
        names: &[u64],
    ) -> Result<HashMap<u64, Vec<u8>>> {
        if names.is_empty() {
            return Ok(HashMap::new());
        }
        let day = today();
        self.tx(|tx| {
            let mut out = HashMap::new();
            for d in names {
                let Some(r) = tx.one(
                    "SELECT body FROM snaps_site_group WHERE site = ?1 AND name = ?2",
                    &[site.number.0.into(), (*d).into()],
                )?
                else {
                    continue;
                };
                tx.execute(
                    "UPDATE snaps_site_group SET used_day = ?3 WHERE site = ?1 AND name = ?2 AND used_day < ?3",
                    &[site.number.0.into(), (*d).into(), day.into()],
                )?;
                out.insert(*d, r.bytes(0)?);
            }
            tx.execute(
                "DELETE FROM snaps_site_group WHERE used_day < ?1 AND standing = 0",
                &[(day - KEEP_DAYS).into()],
            )?;
            Ok(out)
        })
    }

    pub(super) fn change_standing_bodies(
        &self,
        site: &SiteId,
        added: &[u64],
        removed: &[u64],
        whole: bool,
    ) -> Result<(Vec<u64>, u64)> {
        let me = i64::from(site.number.0);
        self.tx(|tx| {
            if whole {
                tx.execute(
                    "UPDATE snaps_site_group SET standing = 0 WHERE site = ?1",
                    &[me.into()],
                )?;
            }
            let set = "UPDATE snaps_site_group SET standing = ?3 WHERE site = ?1 AND name = ?2";
            let mut unknown = Vec::new();
            for name in added {
                if tx.execute(set, &[me.into(), (*name).into(), 1i64.into()])? == 0 {
                    unknown.push(*name);
                }
            }
            for name in removed {
                tx.execute(set, &[me.into(), (*name).into(), 0i64.into()])?;
            }
            let standing = tx
                .one(
                    "SELECT count(*) FROM snaps_site_group WHERE site = ?1 AND standing = 1",
                    &[me.into()],
                )?
                .map(|r| r.int(0))
                .transpose()?
                .unwrap_or(0);
            Ok((unknown, standing as u64))
        })
    }

    pub(super) fn standing_bodies(&self, site: &SiteId) -> Result<Vec<(u64, Vec<u8>)>> {
        self.tx(|tx| {
            tx.query(
                "SELECT name, body FROM snaps_site_group WHERE site = ?1 AND standing = 1 ORDER BY name",
                &[site.number.0.into()],
            )?
            .iter()
            .map(|r| Ok((r.int(0)? as u64, r.bytes(1)?)))
            .collect()
        })
    }
}
