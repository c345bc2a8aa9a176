//! The store's side of the refresh epochs: epochs and their phases,
//! staged pushes, the commit, the change log the distribution reads, and
//! acknowledgements — each call one transaction, so a crash at any point
//! leaves the last recorded phase and nothing half applied.
//!
//! Tables (created with the store):
//! * `snaps_epochs` — one row per epoch: phase, participants, times, the
//!   commit's summary;
//! * `snaps_pushes` — the encoded push of each site for the collecting
//!   epoch (replaced by a second push; dropped at the commit);
//! * `snaps_changes` — per epoch, the tuples changed (by whom) or removed
//!   (with the sent-to bits at removal): what holders must hear of;
//! * `snaps_site_epochs` — per site, the last epoch it applied and the last
//!   epoch whose push from it was committed;
//! * `snaps_gone` — tuples their owner deleted while other sites held
//!   copies: no longer in the relation (never sent again), kept until the
//!   last holder releases its copy;
//! * `snaps_lease` — which controller runs the refresh epochs, until when
//!   (several controllers may share a PostgreSQL store);
//! * `snaps_subscribed` — per site and controller, when the site was last
//!   seen keeping its Subscribe stream open there: an epoch's participants
//!   are the sites subscribed to any controller;
//! * `snaps_sync_asks` — a patient's sync asked at one controller of a site
//!   subscribed to another: the ask (and its audit record) until that
//!   controller takes it, then its answer until the asking one reads it.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use prost::Message;
use snaps_proto::v1;
use snaps_schema::{SentTo, SiteNo, sql_ident};

use super::{SqlStore, default_rights, marks, now};
use crate::db::{Cell, Db, Tx};
use crate::error::{Error, Result};
use crate::store::*;

/// The refresh tables.
pub(super) const TABLES: &str = "
CREATE TABLE IF NOT EXISTS snaps_epochs (
    epoch INTEGER PRIMARY KEY, phase TEXT NOT NULL, participants TEXT NOT NULL,
    opened_at INTEGER NOT NULL, committed_at INTEGER, closed_at INTEGER, summary TEXT);
CREATE TABLE IF NOT EXISTS snaps_pushes (
    epoch INTEGER NOT NULL, site INTEGER NOT NULL, body BLOB NOT NULL, pushed_at INTEGER NOT NULL,
    PRIMARY KEY (epoch, site));
CREATE TABLE IF NOT EXISTS snaps_changes (
    epoch INTEGER NOT NULL, relation TEXT NOT NULL, tuple_id INTEGER NOT NULL,
    changer INTEGER NOT NULL, removed INTEGER NOT NULL, sent_to BLOB,
    PRIMARY KEY (epoch, relation, tuple_id));
CREATE TABLE IF NOT EXISTS snaps_site_epochs (
    site INTEGER PRIMARY KEY, acked INTEGER NOT NULL DEFAULT 0,
    committed_push INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS snaps_gone (
    relation TEXT NOT NULL, tuple_id INTEGER NOT NULL, sent_to BLOB NOT NULL,
    PRIMARY KEY (relation, tuple_id));
CREATE TABLE IF NOT EXISTS snaps_lease (
    name TEXT PRIMARY KEY, holder TEXT NOT NULL, expires_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS snaps_subscribed (
    site INTEGER NOT NULL, controller TEXT NOT NULL, seen_at INTEGER NOT NULL,
    PRIMARY KEY (site, controller));
CREATE TABLE IF NOT EXISTS snaps_sync_asks (
    request INTEGER PRIMARY KEY, site INTEGER NOT NULL, ask BLOB NOT NULL, audit TEXT NOT NULL,
    asked_at INTEGER NOT NULL, taken INTEGER NOT NULL DEFAULT 0, answer TEXT);
";

fn sites_json(sites: &[SiteNo]) -> String {
    serde_json::to_string(&sites.iter().map(|s| s.0).collect::<Vec<_>>()).unwrap_or_default()
}

fn sites_of(json: &str) -> Result<Vec<SiteNo>> {
    let n: Vec<u32> = serde_json::from_str(json)
        .map_err(|e| Error::Internal(format!("epoch participants {json:?}: {e}")))?;
    Ok(n.into_iter().map(SiteNo).collect())
}

impl<D: Db> SqlStore<D> {
    pub(super) fn latest_epoch(tx: &mut dyn Tx) -> Result<Option<EpochState>> {
        let Some(row) = tx.one(
            "SELECT epoch, phase, participants, opened_at FROM snaps_epochs
             ORDER BY epoch DESC LIMIT 1",
            &[],
        )?
        else {
            return Ok(None);
        };
        let epoch = row.int(0)?;
        let numbers = |tx: &mut dyn Tx, sql: &str| -> Result<Vec<SiteNo>> {
            tx.query(sql, &[epoch.into()])?
                .iter()
                .map(|r| Ok(SiteNo(r.int(0)? as u32)))
                .collect()
        };
        let phase = Phase::from_name(&row.text(1)?)?;
        let pushed = if phase == Phase::Collect {
            numbers(
                tx,
                "SELECT site FROM snaps_pushes WHERE epoch = ?1 ORDER BY site",
            )?
        } else {
            numbers(
                tx,
                "SELECT site FROM snaps_site_epochs WHERE committed_push = ?1 ORDER BY site",
            )?
        };
        Ok(Some(EpochState {
            epoch: epoch as u64,
            phase,
            participants: sites_of(&row.text(2)?)?,
            pushed,
            acked: numbers(
                tx,
                "SELECT site FROM snaps_site_epochs WHERE acked >= ?1 ORDER BY site",
            )?,
            opened_at: row.int(3)?,
        }))
    }

    pub(super) fn open_next_epoch(&self, participants: &[SiteNo]) -> Result<EpochState> {
        self.tx(|tx| {
            let latest = Self::latest_epoch(tx)?;
            if let Some(e) = &latest
                && e.phase != Phase::Closed
            {
                return Err(Error::FailedPrecondition(format!(
                    "epoch {} is still in its {} phase",
                    e.epoch,
                    e.phase.name()
                )));
            }
            let epoch = latest.map_or(1, |e| e.epoch + 1);
            tx.execute(
                "INSERT INTO snaps_epochs (epoch, phase, participants, opened_at) VALUES (?1, 'collect', ?2, ?3)",
                &[epoch.into(), sites_json(participants).into(), now().into()],
            )?;
            Self::latest_epoch(tx)?
                .ok_or_else(|| Error::Internal("the epoch just opened is not there".into()))
        })
    }

    pub(super) fn stage(
        &self,
        site: &SiteId,
        epoch: u64,
        body: &[u8],
        audit: &AuditRecord,
    ) -> Result<()> {
        self.tx(|tx| {
            match Self::latest_epoch(tx)? {
                Some(e) if e.epoch == epoch && e.phase == Phase::Collect => {}
                Some(e) if e.epoch >= epoch => {
                    return Err(Error::FailedPrecondition(format!(
                        "epoch {epoch} is no longer collecting (epoch {} is {}): \
                         the changes wait for the next epoch",
                        e.epoch,
                        e.phase.name()
                    )));
                }
                _ => {
                    return Err(Error::FailedPrecondition(format!(
                        "epoch {epoch} is not collecting"
                    )));
                }
            }
            tx.execute(
                "INSERT INTO snaps_pushes (epoch, site, body, pushed_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (epoch, site) DO UPDATE SET body = excluded.body, pushed_at = excluded.pushed_at",
                &[epoch.into(), site.number.0.into(), body.into(), now().into()],
            )?;
            super::audit::insert(tx, audit)
        })
    }

    pub(super) fn commit(&self, epoch: u64) -> Result<CommitSummary> {
        let out = self.tx(|tx| {
            let row = tx
                .one(
                    "SELECT phase, summary FROM snaps_epochs WHERE epoch = ?1",
                    &[epoch.into()],
                )?
                .ok_or_else(|| Error::NotFound(format!("there is no epoch {epoch}")))?;
            if Phase::from_name(&row.text(0)?)? != Phase::Collect {
                return serde_json::from_str(row.opt_text(1)?.as_deref().unwrap_or("{}"))
                    .map_err(|e| Error::Internal(format!("summary of epoch {epoch}: {e}")));
            }
            let pushes = tx.query(
                "SELECT site, body FROM snaps_pushes WHERE epoch = ?1 ORDER BY site",
                &[epoch.into()],
            )?;
            let mut out = CommitSummary::default();
            let mut pushers = Vec::new();
            for r in pushes {
                let number = r.int(0)? as u32;
                let site = SiteId {
                    code: self.code(i64::from(number)),
                    number: SiteNo(number),
                };
                let wire = v1::PushRequest::decode(r.bytes(1)?.as_slice())
                    .map_err(|e| Error::Internal(format!("staged push of {}: {e}", site.code)))?;
                let push = Push::decode(&wire, &self.catalog)?;
                out.tuples_pushed += push.len() as u64;
                self.apply_push(tx, epoch, &site, &push, &mut out)?;
                tx.execute(
                    "INSERT INTO snaps_site_epochs (site, committed_push) VALUES (?1, ?2)
                     ON CONFLICT (site) DO UPDATE SET committed_push = excluded.committed_push",
                    &[number.into(), epoch.into()],
                )?;
                out.pushed_by.push(site.code.clone());
                pushers.push(i64::from(number));
            }
            // The pushing sites' locks end here: their changes are committed.
            if !pushers.is_empty() {
                let list = pushers
                    .iter()
                    .map(i64::to_string)
                    .collect::<Vec<_>>()
                    .join(", ");
                for r in self.catalog.relations() {
                    tx.execute(
                        &format!(
                            "UPDATE {} SET snaps_lock_site = NULL, snaps_rights = ?1 WHERE snaps_lock_site IN ({list})",
                            sql_ident(&r.name)
                        ),
                        &[default_rights(self.mode(&r.name)).code().into()],
                    )?;
                }
            }
            tx.execute("DELETE FROM snaps_pushes WHERE epoch = ?1", &[epoch.into()])?;
            tx.execute(
                "UPDATE snaps_epochs SET phase = 'distribute', committed_at = ?2, summary = ?3 WHERE epoch = ?1",
                &[
                    epoch.into(),
                    now().into(),
                    serde_json::to_string(&out)
                        .map_err(|e| Error::Internal(e.to_string()))?
                        .into(),
                ],
            )?;
            Ok(out)
        })?;
        tracing::info!(epoch, ?out, "epoch committed");
        Ok(out)
    }

    pub(super) fn commit_sync(
        &self,
        site: &SiteId,
        push: &Push,
        audit: &AuditRecord,
    ) -> Result<(u64, CommitSummary)> {
        if !push.copies.is_empty() || !push.deleted.is_empty() || !push.withdrawn.is_empty() {
            return Err(Error::InvalidArgument(
                "a patient's sync carries new and changed own tuples only: copies, deletes \
                 and withdrawn attributes wait for the night"
                    .into(),
            ));
        }
        let out = self.tx(|tx| {
            let latest = Self::latest_epoch(tx)?;
            if let Some(e) = &latest
                && e.phase != Phase::Closed
            {
                return Err(Error::FailedPrecondition(format!(
                    "the network is refreshing (epoch {} is in its {} phase): the patient's \
                     changes come with it",
                    e.epoch,
                    e.phase.name()
                )));
            }
            let epoch = latest.map_or(1, |e| e.epoch + 1);
            let mut out = CommitSummary {
                pushed_by: vec![site.code.clone()],
                tuples_pushed: push.len() as u64,
                ..CommitSummary::default()
            };
            self.apply_push(tx, epoch, site, push, &mut out)?;
            let mut audit = audit.clone();
            if out.inserted + out.updated + out.conflicts == 0 {
                // All of it is in the global snapshot already (synced
                // before): no epoch for nothing.
                audit.detail = format!("{}: nothing changed since the last sync", audit.detail);
                super::audit::insert(tx, &audit)?;
                return Ok((0, out));
            }
            let at = now();
            tx.execute(
                "INSERT INTO snaps_epochs (epoch, phase, participants, opened_at, committed_at, closed_at, summary)
                 VALUES (?1, 'closed', ?2, ?3, ?3, ?3, ?4)",
                &[
                    epoch.into(),
                    sites_json(&[site.number]).into(),
                    at.into(),
                    serde_json::to_string(&out)
                        .map_err(|e| Error::Internal(e.to_string()))?
                        .into(),
                ],
            )?;
            audit.detail = format!("{} (epoch {epoch})", audit.detail);
            super::audit::insert(tx, &audit)?;
            Ok((epoch, out))
        })?;
        tracing::info!(epoch = out.0, site = %site.code, summary = ?out.1, "patient sync committed");
        Ok(out)
    }

    pub(super) fn log_change(
        tx: &mut dyn Tx,
        epoch: u64,
        relation: &str,
        tuple_id: i64,
        changer: i64,
        removed: Option<&[u8]>,
    ) -> Result<()> {
        tx.execute(
            "INSERT INTO snaps_changes (epoch, relation, tuple_id, changer, removed, sent_to)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (epoch, relation, tuple_id) DO UPDATE SET changer = excluded.changer,
                 removed = excluded.removed, sent_to = excluded.sent_to",
            &[
                epoch.into(),
                relation.into(),
                tuple_id.into(),
                changer.into(),
                removed.is_some().into(),
                removed.into(),
            ],
        )?;
        Ok(())
    }

    /// Logs new tuples of `relation` as changed by `changer` in `epoch`.
    pub(super) fn log_changes(
        tx: &mut dyn Tx,
        epoch: u64,
        relation: &str,
        ids: &[i64],
        changer: i64,
    ) -> Result<()> {
        for chunk in ids.chunks(super::CHUNK) {
            let mut args: Vec<Cell> = vec![epoch.into(), relation.into(), changer.into()];
            let values: Vec<String> = chunk
                .iter()
                .map(|id| {
                    args.push((*id).into());
                    format!("(?1, ?2, ?{}, ?3, 0, NULL)", args.len())
                })
                .collect();
            tx.execute(
                &format!(
                    "INSERT INTO snaps_changes (epoch, relation, tuple_id, changer, removed, sent_to)
                     VALUES {}
                     ON CONFLICT (epoch, relation, tuple_id) DO UPDATE SET changer = excluded.changer,
                         removed = excluded.removed, sent_to = excluded.sent_to",
                    values.join(", ")
                ),
                &args,
            )?;
        }
        Ok(())
    }

    fn apply_push(
        &self,
        tx: &mut dyn Tx,
        epoch: u64,
        site: &SiteId,
        push: &Push,
        out: &mut CommitSummary,
    ) -> Result<()> {
        let me = i64::from(site.number.0);
        for (relation, columns) in &push.withdrawn {
            let sets: Vec<String> = columns
                .iter()
                .map(|c| format!("{} = NULL", sql_ident(c)))
                .collect();
            if sets.is_empty() {
                continue;
            }
            let ids = tx.query(
                &format!(
                    "UPDATE {} SET {} WHERE snaps_owner = ?1 RETURNING tuple_id",
                    sql_ident(relation),
                    sets.join(", ")
                ),
                &[me.into()],
            )?;
            for r in ids {
                Self::log_change(tx, epoch, relation, r.int(0)?, me, None)?;
                out.withdrawn += 1;
            }
            tracing::info!(site = %site.code, relation, ?columns, "attributes withdrawn");
        }
        // Deletes first: a key deleted and registered again is a new tuple
        // under the same origin.
        for d in &push.deleted {
            for &origin in &d.origins {
                let mut any = false;
                for relation in &d.relations {
                    let Some(row) = tx.one(
                        &format!(
                            "DELETE FROM {} WHERE snaps_owner = ?1 AND snaps_origin = ?2
                             RETURNING tuple_id, snaps_sent_to",
                            sql_ident(relation)
                        ),
                        &[me.into(), origin.into()],
                    )?
                    else {
                        continue;
                    };
                    let (id, sent) = (row.int(0)?, row.bytes(1)?);
                    any = true;
                    let held = !SentTo::from_bytes(&sent).is_empty();
                    if self.propagate_deletes.contains(relation) {
                        Self::log_change(tx, epoch, relation, id, me, Some(&sent))?;
                        if held {
                            out.removed += 1;
                        }
                    } else if held {
                        tx.execute(
                            "INSERT INTO snaps_gone (relation, tuple_id, sent_to) VALUES (?1, ?2, ?3)
                             ON CONFLICT (relation, tuple_id) DO UPDATE SET sent_to = excluded.sent_to",
                            &[relation.into(), id.into(), sent.into()],
                        )?;
                    }
                }
                if any {
                    out.deleted += 1;
                }
            }
        }
        // A new tuple already in the global snapshot came with a patient's
        // sync (or a push whose reply was lost): it is applied as changed,
        // so what the site changed since is not lost.
        let mut again = Vec::new();
        for batch in &push.inserted {
            let (fresh, present) = self.split_present(tx, site, batch)?;
            let o = self.load_in(tx, site, &fresh, Some(epoch))?;
            out.inserted += o.loaded;
            out.conflicts += o.conflicts.len() as u64;
            again.extend(present);
        }
        for batch in push.updated.iter().chain(&again) {
            for (row, &origin) in batch.origins.iter().enumerate() {
                let mut found = false;
                for (pi, p) in batch.shape.parts.iter().enumerate() {
                    let sets: Vec<String> = p
                        .columns
                        .iter()
                        .enumerate()
                        .map(|(i, c)| format!("{} = ?{}", sql_ident(c), i + 3))
                        .collect();
                    if sets.is_empty() {
                        continue;
                    }
                    // A tuple pushed unchanged (again, after a sync) is
                    // not a change: holders hear nothing of it.
                    let same: Vec<String> = p
                        .columns
                        .iter()
                        .enumerate()
                        .map(|(i, c)| format!("{} IS NOT DISTINCT FROM ?{}", sql_ident(c), i + 3))
                        .collect();
                    let sql = format!(
                        "UPDATE {} SET {} WHERE snaps_owner = ?1 AND snaps_origin = ?2 AND NOT ({})
                         RETURNING tuple_id",
                        sql_ident(&p.relation),
                        sets.join(", "),
                        same.join(" AND ")
                    );
                    let mut args: Vec<Cell> = vec![me.into(), origin.into()];
                    args.extend(batch.parts[pi][row].iter().map(Cell::from));
                    if let Some(r) = tx.one(&sql, &args)? {
                        found = true;
                        Self::log_change(tx, epoch, &p.relation, r.int(0)?, me, None)?;
                    }
                }
                if found {
                    out.updated += 1;
                } else {
                    // Never in the global snapshot (its key clashed at its
                    // first push): it goes through the new-tuple path again.
                    let single = LoadBatch {
                        shape: batch.shape.clone(),
                        origins: vec![origin],
                        parts: batch.parts.iter().map(|p| vec![p[row].clone()]).collect(),
                    };
                    let o = self.load_in(tx, site, &single, Some(epoch))?;
                    out.inserted += o.loaded;
                    out.conflicts += o.conflicts.len() as u64;
                }
            }
        }
        for c in &push.copies {
            let sets: Vec<String> = c
                .columns
                .iter()
                .enumerate()
                .map(|(i, col)| format!("{} = ?{}", sql_ident(col), i + 3))
                .collect();
            if sets.is_empty() {
                continue;
            }
            let sql = format!(
                "UPDATE {} SET {} WHERE tuple_id = ?1 AND snaps_lock_site = ?2 RETURNING tuple_id",
                sql_ident(&c.relation),
                sets.join(", ")
            );
            for (id, row) in c.tuple_ids.iter().zip(&c.rows) {
                let mut args: Vec<Cell> = vec![(*id).into(), me.into()];
                args.extend(row.iter().map(Cell::from));
                match tx.one(&sql, &args)? {
                    Some(r) => {
                        out.updated += 1;
                        Self::log_change(tx, epoch, &c.relation, r.int(0)?, me, None)?;
                    }
                    None => {
                        out.refused += 1;
                        tracing::warn!(site = %site.code, relation = %c.relation, tuple_id = id,
                            "change of a copy not applied: the site does not hold its lock");
                    }
                }
            }
        }
        Ok(())
    }

    /// `batch` split into its tuples whose origin no tuple of the site
    /// has yet, and those it has (`None` when there are none).
    fn split_present(
        &self,
        tx: &mut dyn Tx,
        site: &SiteId,
        batch: &LoadBatch,
    ) -> Result<(LoadBatch, Option<LoadBatch>)> {
        let main = &batch.shape.parts[batch.shape.main()].relation;
        let mut present: BTreeSet<u64> = BTreeSet::new();
        for chunk in batch.origins.chunks(super::CHUNK) {
            let mut args: Vec<Cell> = vec![i64::from(site.number.0).into()];
            args.extend(chunk.iter().map(|o| Cell::from(*o)));
            let sql = format!(
                "SELECT snaps_origin FROM {} WHERE snaps_owner = ?1 AND snaps_origin IN ({})",
                sql_ident(main),
                marks(2, chunk.len())
            );
            for r in tx.query(&sql, &args)? {
                present.insert(r.int(0)? as u64);
            }
        }
        if present.is_empty() {
            return Ok((batch.clone(), None));
        }
        let pick = |want: bool| LoadBatch {
            shape: batch.shape.clone(),
            origins: batch
                .origins
                .iter()
                .filter(|o| present.contains(o) == want)
                .copied()
                .collect(),
            parts: batch
                .parts
                .iter()
                .map(|rows| {
                    rows.iter()
                        .zip(&batch.origins)
                        .filter(|(_, o)| present.contains(o) == want)
                        .map(|(r, _)| r.clone())
                        .collect()
                })
                .collect(),
        };
        Ok((pick(false), Some(pick(true))))
    }

    pub(super) fn changes_for(
        &self,
        site: &SiteId,
        since: u64,
        parts: &[(String, Vec<String>)],
        summaries: &SummaryRequest,
    ) -> Result<Changes> {
        let me = i64::from(site.number.0);
        for (relation, columns) in parts {
            let rel = self.catalog.relation(relation).ok_or_else(|| {
                Error::InvalidArgument(format!("unknown global relation {relation:?}"))
            })?;
            for c in columns {
                if rel.attribute(c).is_none() {
                    return Err(Error::InvalidArgument(format!(
                        "{relation} has no attribute {c}"
                    )));
                }
            }
        }
        // One transaction: no commit comes between the changes and the
        // summaries, so they describe the same epoch.
        self.tx(|tx| {
            let epoch = tx
                .one(
                    "SELECT coalesce(max(epoch), 0) FROM snaps_epochs WHERE phase <> 'collect'",
                    &[],
                )?
                .map(|r| r.int(0))
                .transpose()?
                .unwrap_or(0);
            let committed_push = tx
                .one(
                    "SELECT committed_push FROM snaps_site_epochs WHERE site = ?1",
                    &[me.into()],
                )?
                .map(|r| r.int(0))
                .transpose()?
                .unwrap_or(0);
            let mut changed: BTreeMap<String, BTreeSet<i64>> = BTreeMap::new();
            let mut removed: BTreeMap<String, BTreeSet<i64>> = BTreeMap::new();
            for r in tx.query(
                "SELECT relation, tuple_id, changer, removed, sent_to FROM snaps_changes
                 WHERE epoch > ?1 AND epoch <= ?2",
                &[since.into(), epoch.into()],
            )? {
                let relation = r.text(0)?;
                let id = r.int(1)?;
                if r.flag(3)? {
                    if SentTo::from_bytes(&r.bytes(4)?).contains(site.number) {
                        removed.entry(relation).or_default().insert(id);
                    }
                } else if r.int(2)? != me {
                    changed.entry(relation).or_default().insert(id);
                }
            }
            let mut out = Changes {
                epoch: epoch as u64,
                committed_push: committed_push as u64,
                changed: Vec::new(),
                removed: removed
                    .into_iter()
                    .map(|(r, ids)| (r, ids.into_iter().map(|i| i as u64).collect()))
                    .collect(),
                ..Changes::default()
            };
            for (relation, columns) in parts {
                let Some(ids) = changed.get(relation) else {
                    continue;
                };
                let ids: Vec<i64> = ids.iter().copied().collect();
                let cols: Vec<String> = columns.iter().map(|c| sql_ident(c)).collect();
                let mut part = ChangedPart {
                    relation: relation.clone(),
                    columns: columns.clone(),
                    tuple_ids: Vec::new(),
                    origins: Vec::new(),
                    rows: Vec::new(),
                };
                for chunk in ids.chunks(500) {
                    let sql = format!(
                        "SELECT tuple_id, snaps_owner, snaps_origin, snaps_sent_to{}{} FROM {} WHERE tuple_id IN ({})",
                        if cols.is_empty() { "" } else { ", " },
                        cols.join(", "),
                        sql_ident(relation),
                        marks(1, chunk.len())
                    );
                    let args: Vec<Cell> = chunk.iter().map(|i| Cell::Int(*i)).collect();
                    for r in tx.query(&sql, &args)? {
                        let owner = r.int(1)?;
                        let origin = if owner == me {
                            r.int(2)? as u64
                        } else if SentTo::from_bytes(&r.bytes(3)?).contains(site.number) {
                            0
                        } else {
                            continue;
                        };
                        part.tuple_ids.push(r.int(0)? as u64);
                        part.origins.push(origin);
                        part.rows.push(
                            (0..cols.len())
                                .map(|i| r.value(4 + i))
                                .collect::<Result<Vec<_>>>()?,
                        );
                    }
                }
                if !part.tuple_ids.is_empty() {
                    out.changed.push(part);
                }
            }
            let sent = super::summary::update(tx, &self.catalog, site, summaries)?;
            out.summary_version = sent.version;
            out.summaries_whole = sent.whole;
            out.summaries = sent.deltas;
            Ok(out)
        })
    }

    pub(super) fn ack(&self, site: &SiteId, epoch: u64) -> Result<()> {
        let greatest = self.dialect().greatest();
        self.tx(|tx| {
            tx.execute(
                &format!(
                    "INSERT INTO snaps_site_epochs (site, acked) VALUES (?1, ?2)
                     ON CONFLICT (site) DO UPDATE SET acked = {greatest}(snaps_site_epochs.acked, excluded.acked)"
                ),
                &[site.number.0.into(), epoch.into()],
            )?;
            Ok(())
        })
    }

    pub(super) fn close(&self, epoch: u64) -> Result<()> {
        self.tx(|tx| {
            let n = tx.execute(
                "UPDATE snaps_epochs SET phase = 'closed', closed_at = ?2 WHERE epoch = ?1 AND phase = 'distribute'",
                &[epoch.into(), now().into()],
            )?;
            if n == 0 {
                let state = Self::latest_epoch(tx)?;
                if !matches!(&state, Some(e) if e.epoch == epoch && e.phase == Phase::Closed) {
                    return Err(Error::FailedPrecondition(format!(
                        "epoch {epoch} is not distributing"
                    )));
                }
            }
            // Changes every site of the network has applied are heard of
            // no more.
            let mut oldest = u64::MAX;
            for number in self.sites.keys() {
                let acked = tx
                    .one(
                        "SELECT acked FROM snaps_site_epochs WHERE site = ?1",
                        &[(*number).into()],
                    )?
                    .map(|r| r.int(0))
                    .transpose()?;
                oldest = oldest.min(acked.unwrap_or(0) as u64);
            }
            if oldest != u64::MAX {
                tx.execute(
                    "DELETE FROM snaps_changes WHERE epoch <= ?1",
                    &[oldest.into()],
                )?;
            }
            Ok(())
        })
    }

    pub(super) fn resync_held(
        &self,
        site: &SiteId,
        held: &BTreeMap<String, BTreeSet<u64>>,
    ) -> Result<(u64, u64)> {
        for r in held.keys() {
            if self.catalog.relation(r).is_none() {
                return Err(Error::InvalidArgument(format!(
                    "unknown global relation {r:?}"
                )));
            }
        }
        self.tx(|tx| {
            let (mut added, mut removed) = (0, 0);
            let none = BTreeSet::new();
            for rel in self.catalog.relations() {
                let mine = held.get(&rel.name).unwrap_or(&none);
                let rows = tx.query(
                    &format!(
                        "SELECT tuple_id, snaps_sent_to FROM {}",
                        sql_ident(&rel.name)
                    ),
                    &[],
                )?;
                for r in rows {
                    let id = r.int(0)?;
                    let mut sent = SentTo::from_bytes(&r.bytes(1)?);
                    let has = sent.contains(site.number);
                    let should = mine.contains(&(id as u64));
                    if has == should {
                        continue;
                    }
                    if should {
                        sent.insert(site.number);
                        added += 1;
                    } else {
                        sent.remove(site.number);
                        removed += 1;
                    }
                    tx.execute(
                        &format!(
                            "UPDATE {} SET snaps_sent_to = ?1 WHERE tuple_id = ?2",
                            sql_ident(&rel.name)
                        ),
                        &[sent.to_bytes().into(), id.into()],
                    )?;
                }
            }
            Ok((added, removed))
        })
    }

    /// Clears the site's sent-to bits of tuples their owner deleted,
    /// forgetting those nobody holds any more; returns how many it held.
    pub(super) fn release_gone(
        tx: &mut dyn Tx,
        site: &SiteId,
        gone: &HashMap<String, Vec<i64>>,
    ) -> Result<u64> {
        let mut released = 0;
        for (relation, ids) in gone {
            for id in ids {
                let key: [Cell; 2] = [relation.into(), (*id).into()];
                let Some(r) = tx.one(
                    "SELECT sent_to FROM snaps_gone WHERE relation = ?1 AND tuple_id = ?2",
                    &key,
                )?
                else {
                    continue;
                };
                let mut sent = SentTo::from_bytes(&r.bytes(0)?);
                if !sent.contains(site.number) {
                    continue;
                }
                sent.remove(site.number);
                released += 1;
                if sent.is_empty() {
                    tx.execute(
                        "DELETE FROM snaps_gone WHERE relation = ?1 AND tuple_id = ?2",
                        &key,
                    )?;
                } else {
                    tx.execute(
                        "UPDATE snaps_gone SET sent_to = ?3 WHERE relation = ?1 AND tuple_id = ?2",
                        &[key[0].clone(), key[1].clone(), sent.to_bytes().into()],
                    )?;
                }
            }
        }
        Ok(released)
    }

    pub(super) fn conflict_list(&self) -> Result<Vec<ConflictEntry>> {
        self.tx(|tx| {
            tx.query(
                "SELECT id, site, relation, origin, key, holder, recorded_at, tuple FROM snaps_conflicts ORDER BY id",
                &[],
            )?
            .iter()
            .map(|r| {
                let id = r.int(0)?;
                Ok(ConflictEntry {
                    id: id as u64,
                    site: self.code(r.int(1)?),
                    relation: r.text(2)?,
                    origin: r.int(3)? as u64,
                    key: serde_json::from_str(&r.text(4)?)
                        .map_err(|e| Error::Internal(format!("conflict {id}: {e}")))?,
                    holder: self.code(r.int(5)?),
                    recorded_at: r.int(6)?,
                    tuple: r.text(7)?,
                })
            })
            .collect()
        })
    }

    pub(super) fn post_ask(&self, ask: &StoredAsk) -> Result<()> {
        let audit =
            serde_json::to_string(&ask.audit).map_err(|e| Error::Internal(e.to_string()))?;
        self.tx(|tx| {
            // Asks nobody took or read within ten minutes are gone.
            tx.execute(
                "DELETE FROM snaps_sync_asks WHERE asked_at < ?1",
                &[(now() - 600).into()],
            )?;
            tx.execute(
                "INSERT INTO snaps_sync_asks (request, site, ask, audit, asked_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                &[
                    (ask.request as i64).into(),
                    ask.site.0.into(),
                    ask.ask.as_slice().into(),
                    audit.as_str().into(),
                    now().into(),
                ],
            )?;
            Ok(())
        })
    }

    pub(super) fn take_asks(&self, sites: &[SiteNo]) -> Result<Vec<StoredAsk>> {
        if sites.is_empty() {
            return Ok(Vec::new());
        }
        self.tx(|tx| {
            let list = sites
                .iter()
                .map(|s| s.0.to_string())
                .collect::<Vec<_>>()
                .join(", ");
            let rows = tx.query(
                &format!(
                    "UPDATE snaps_sync_asks SET taken = 1 WHERE taken = 0 AND site IN ({list})
                     RETURNING request, site, ask, audit"
                ),
                &[],
            )?;
            rows.iter()
                .map(|r| {
                    Ok(StoredAsk {
                        request: r.int(0)? as u64,
                        site: SiteNo(r.int(1)? as u32),
                        ask: r.bytes(2)?,
                        audit: serde_json::from_str(&r.text(3)?)
                            .map_err(|e| Error::Internal(format!("a stored sync ask: {e}")))?,
                    })
                })
                .collect()
        })
    }

    pub(super) fn answer_ask(&self, request: u64, answer: &str) -> Result<()> {
        self.tx(|tx| {
            tx.execute(
                "UPDATE snaps_sync_asks SET answer = ?2 WHERE request = ?1",
                &[(request as i64).into(), answer.into()],
            )?;
            Ok(())
        })
    }

    pub(super) fn ask_answer(&self, request: u64) -> Result<Option<String>> {
        self.tx(|tx| {
            let answer = tx
                .one(
                    "SELECT answer FROM snaps_sync_asks WHERE request = ?1 AND answer IS NOT NULL",
                    &[(request as i64).into()],
                )?
                .map(|r| r.text(0))
                .transpose()?;
            if answer.is_some() {
                tx.execute(
                    "DELETE FROM snaps_sync_asks WHERE request = ?1",
                    &[(request as i64).into()],
                )?;
            }
            Ok(answer)
        })
    }

    pub(super) fn lease(&self, controller: &str, now: i64, ttl: i64) -> Result<Option<String>> {
        self.tx(|tx| {
            if let Some(r) = tx.one(
                "SELECT holder, expires_at FROM snaps_lease WHERE name = 'refresh'",
                &[],
            )? {
                let holder = r.text(0)?;
                if holder != controller && r.int(1)? > now {
                    return Ok(Some(holder));
                }
            }
            tx.execute(
                "INSERT INTO snaps_lease (name, holder, expires_at) VALUES ('refresh', ?1, ?2)
                 ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at",
                &[controller.into(), (now + ttl).into()],
            )?;
            Ok(None)
        })
    }

    pub(super) fn unlease(&self, controller: &str) -> Result<()> {
        self.tx(|tx| {
            tx.execute(
                "DELETE FROM snaps_lease WHERE name = 'refresh' AND holder = ?1",
                &[controller.into()],
            )?;
            Ok(())
        })
    }

    pub(super) fn subscribed_now(
        &self,
        controller: &str,
        sites: &[SiteNo],
        now: i64,
    ) -> Result<()> {
        self.tx(|tx| {
            tx.execute(
                "DELETE FROM snaps_subscribed WHERE controller = ?1",
                &[controller.into()],
            )?;
            for s in sites {
                tx.execute(
                    "INSERT INTO snaps_subscribed (site, controller, seen_at) VALUES (?1, ?2, ?3)",
                    &[s.0.into(), controller.into(), now.into()],
                )?;
            }
            Ok(())
        })
    }

    pub(super) fn subscribed_since(&self, since: i64) -> Result<Vec<SiteNo>> {
        self.tx(|tx| {
            tx.query(
                "SELECT DISTINCT site FROM snaps_subscribed WHERE seen_at >= ?1 ORDER BY site",
                &[since.into()],
            )?
            .iter()
            .map(|r| Ok(SiteNo(r.int(0)? as u32)))
            .collect()
        })
    }
}
