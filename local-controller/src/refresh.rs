//! The site's part in the refresh epochs (DESIGN.md, "The nightly
//! refresh"; thesis chapter 7, "Algorithm to Refresh Local Snapshots" and
//! "Algorithm to Delete Local Snapshots").
//!
//! The site keeps a Subscribe stream open to the global controller (it
//! never accepts connections) and acts on every notice:
//!
//! * **collect E** — holds its shared data still (`snaps_meta` key
//!   `refreshing`: writes to mapped relations are refused, by the
//!   controller and by triggers), evicts snapshots unused for `max_days`
//!   and releases their copies, then pushes everything not yet committed:
//!   new and changed own tuples, copies changed under lock, deleted own
//!   tuples. A push is tagged with E; pushing again replaces it.
//! * **distribute E** (or **closed E**, for a site that missed it) — asks
//!   for what changed after the last epoch it applied and, in one
//!   transaction, updates the copies in place (pinned copies keep their own
//!   attributes), removes the copies whose tuples are gone, and — when its
//!   push was committed — clears its new/modified flags, rights and
//!   deletes. Then it brings what the epoch's changes add to its snapshot
//!   definitions: it tells the controller which kept groups became
//!   standing and which stopped (the day's new and evicted definitions),
//!   and the controller sends the tuples the site lacks of every
//!   combination a standing group selects with a changed tuple (delta
//!   rules, `Refetch`). A site whose own changes are not in the global
//!   snapshot yet (its push missed the commit) re-runs every definition
//!   instead, its new tuples joining as semi-joins. It drops the copies
//!   nothing selects any more, and acknowledges.
//!
//! Every step is recorded in `snaps_meta` (`refresh_push_sent`, `refresh_pushed`,
//! `refresh_applied`, `refresh_acked`) in the transaction that does it, so a
//! site restarted at any point picks up where it stopped, and every message
//! is harmless to repeat.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use snaps_mapping::ir::Select;
use snaps_mapping::performed::{DefinedGroup, SnapshotDefinition};
use snaps_mapping::rewrite::plan;
use snaps_mapping::{Language, SiteMapping};
use snaps_proto::{decode_rows, encode_rows, shape_of_relation, v1};
use snaps_schema::{SnapshotNo, Value, sql_ident};
use tokio::sync::Notify;

use crate::mapping_admin::{self, MappingRows, differences};
use crate::remote::export_batches;
use crate::site::{Fetched, Retrieval, Site, projections, today};
use crate::store::{CHANGED_BITS, STATUS_COLUMN, read_tuples};
use crate::store::{drop_relation_triggers, relation_triggers};
use crate::value::to_sqlite;
use crate::{Error, Result};

/// A point of the site's refresh at which a test may stop the site, as a
/// crash would.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SitePoint {
    /// Snapshots evicted and released, nothing pushed.
    Evicted,
    /// The push is staged at the controller and recorded here.
    Pushed,
    /// The changes are applied, no definition re-run yet.
    Applied,
    /// New tuples of the snapshot definitions stored, wholly (the
    /// controller's delta) or in part (a re-run's first batch); memberships
    /// not recomputed, nothing acknowledged.
    Refetching,
}

/// Where a halting site stops, and how it says it has.
#[derive(Debug, Clone)]
pub struct Halt {
    /// The point.
    pub at: SitePoint,
    /// Notified when the point is reached.
    pub reached: Arc<Notify>,
}

/// What the site did in one epoch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SiteEpoch {
    /// Snapshots evicted.
    pub evicted: u64,
    /// Copies released.
    pub released: u64,
    /// Tuples pushed.
    pub pushed: u64,
    /// Copies updated in place, and own tuples changed by lock holders.
    pub updated: u64,
    /// Copies removed.
    pub removed: u64,
    /// Tuples the re-run definitions brought.
    pub fetched: u64,
}

const SNAPSHOT: u8 = 0x80;
const NEW: u8 = 0x10;
const MODIFIED: u8 = 0x08;
const RIGHTS: u8 = 0x60;
const READ_WRITE: u8 = 0x20;
const READ_ONLY: u8 = 0x40;
/// The just-copied value the refresh marks tuples with while it rewrites
/// them, so the triggers know the controller is at work.
const REFRESHING_MARK: u8 = 0x01;

const PUSHED: &str = "refresh_pushed";
/// The epoch a push was last sent for, before its reply: a reply lost with
/// a controller that stopped may hide a push it staged and then committed.
const SENT: &str = "refresh_push_sent";
const APPLIED: &str = "refresh_applied";
const ACKED: &str = "refresh_acked";
const REFRESHING: &str = "refreshing";
/// The epoch the site had applied before its last apply: the night's delta
/// covers the changes after it.
const DELTA_FROM: &str = "refresh_delta_from";
/// The last epoch whose new tuples (refetch or re-run) are stored.
const REFETCHED: &str = "refresh_refetched";
/// The epoch a refetch was asked for and its reply not yet stored.
const REFETCH_ASKED: &str = "refresh_refetch_asked";
/// How many names the controller said stand for this site.
const REFETCH_STANDING: &str = "refetch_standing";
/// The access rules' fingerprint at the last refetch.
const REFETCH_ACCESS: &str = "refetch_access";

/// A number kept in `snaps_meta` under `key` (0 when there is none).
pub(crate) fn meta_epoch(conn: &Connection, key: &str) -> Result<u64> {
    let v: Option<String> = conn
        .query_row("SELECT value FROM snaps_meta WHERE key = ?1", [key], |r| {
            r.get(0)
        })
        .optional()?;
    Ok(v.and_then(|v| v.parse().ok()).unwrap_or(0))
}

fn meta_opt(conn: &Connection, key: &str) -> Result<Option<u64>> {
    let v: Option<String> = conn
        .query_row("SELECT value FROM snaps_meta WHERE key = ?1", [key], |r| {
            r.get(0)
        })
        .optional()?;
    Ok(v.and_then(|v| v.parse().ok()))
}

fn set_meta(conn: &Connection, key: &str, value: u64) -> Result<()> {
    conn.execute(
        "INSERT OR REPLACE INTO snaps_meta (key, value) VALUES (?1, ?2)",
        params![key, value.to_string()],
    )?;
    Ok(())
}

/// Snapshot definitions re-run in one fetch request at the refresh: one
/// round trip and one compressed message for many near-identical queries.
pub const RERUN_BATCH: usize = 200;

impl Site {
    /// Makes the site stop its refresh at `halt` (tests of crash safety).
    pub fn halt_at(&self, halt: Halt) {
        *self.halt.lock().unwrap_or_else(|p| p.into_inner()) = Some(halt);
    }

    fn reached(&self, point: SitePoint) -> Result<()> {
        let halt = self.halt.lock().unwrap_or_else(|p| p.into_inner()).clone();
        match halt {
            Some(h) if h.at == point => {
                tracing::warn!(site = %self.code(), ?point, "halting the refresh here, as a crash would");
                h.reached.notify_one();
                Err(Error::Halted(format!("{point:?}")))
            }
            _ => Ok(()),
        }
    }

    /// Takes part in every refresh epoch until the site halts (tests) or
    /// the task is dropped: keeps the Subscribe stream open, reconnecting
    /// after a failure, and acts on each notice.
    pub async fn participate(self: Arc<Self>) {
        let retry = self
            .link
            .as_ref()
            .map_or(Duration::from_secs(10), |l| l.retry_after)
            .max(Duration::from_millis(200));
        loop {
            match self.clone().follow().await {
                Err(Error::Halted(at)) => {
                    tracing::warn!(site = %self.code(), at, "refresh participation halted");
                    return;
                }
                Err(e) => tracing::debug!(site = %self.code(), error = %e, "refresh stream lost"),
                Ok(()) => {}
            }
            tokio::time::sleep(retry).await;
        }
    }

    /// Whether the site keeps its Subscribe stream open now.
    pub fn subscribed(&self) -> bool {
        self.subscribed.load(std::sync::atomic::Ordering::Relaxed)
    }

    async fn follow(self: Arc<Self>) -> Result<()> {
        let client = self.client().await?;
        let notices = client.subscribe().await;
        let mut notices = match notices {
            Ok(n) => n,
            Err(e) => {
                // A controller that went away: connect afresh next time.
                self.forget_client().await;
                return Err(e);
            }
        };
        // Cleared however following ends, an aborted task included.
        struct Subscribed<'a>(&'a std::sync::atomic::AtomicBool);
        impl Drop for Subscribed<'_> {
            fn drop(&mut self) {
                self.0.store(false, std::sync::atomic::Ordering::Relaxed);
            }
        }
        self.subscribed
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let _subscribed = Subscribed(&self.subscribed);
        let followed = self.follow_notices(&mut notices).await;
        if followed.is_err() {
            self.forget_client().await;
        }
        followed
    }

    async fn follow_notices(
        self: &Arc<Self>,
        notices: &mut tonic::Streaming<v1::EpochNotice>,
    ) -> Result<()> {
        while let Some(notice) = notices.message().await? {
            let site = self.clone();
            if let Some(ask) = notice.sync {
                // Answered aside: a sync may wait for this site's own
                // notices (a catch-up), and the stream goes on meanwhile.
                tokio::task::spawn_blocking(move || site.on_sync(&ask));
                continue;
            }
            let done = tokio::task::spawn_blocking(move || site.on_notice(&notice))
                .await
                .map_err(|e| Error::Invalid(format!("refresh task: {e}")))?;
            match done {
                Ok(_) => {}
                Err(e @ Error::Halted(_)) => return Err(e),
                Err(e) => tracing::warn!(site = %self.code(), error = %e, "refresh step failed"),
            }
        }
        Ok(())
    }

    /// Acts on one notice; blocking (runs requests on the site's runtime).
    pub fn on_notice(&self, notice: &v1::EpochNotice) -> Result<SiteEpoch> {
        let _turn = self.epoch_steps.lock().unwrap_or_else(|p| p.into_inner());
        let mut did = SiteEpoch::default();
        let epoch = notice.epoch;
        if epoch == 0 {
            return Ok(did);
        }
        let mut conn = self.open_refresh_conn()?;
        let wire = self.wire_bytes();
        if notice.phase == v1::EpochPhase::Collect as i32 {
            if meta_epoch(&conn, PUSHED)? < epoch {
                let done = self.collect(&mut conn, epoch, &mut did);
                let bytes = self.wire_bytes().saturating_sub(wire) as i64;
                Site::bump(&conn, &[("refresh_push_bytes", bytes)])?;
                done?;
            }
            return Ok(did);
        }
        let mut counted = wire;
        let done = self.distribute(&mut conn, epoch, &mut did, &mut counted);
        let bytes = self.wire_bytes().saturating_sub(counted) as i64;
        Site::bump(&conn, &[("refresh_distribute_bytes", bytes)])?;
        done.map(|()| did)
    }

    /// Distribute (or catch up): apply, re-run, drop what nothing selects,
    /// acknowledge — each step only if not done before. The bytes the
    /// distribution cost are counted before the acknowledgement (from
    /// `counted`, which moves on), so whoever sees the epoch closed sees
    /// them too.
    fn distribute(
        &self,
        conn: &mut Connection,
        epoch: u64,
        did: &mut SiteEpoch,
        counted: &mut u64,
    ) -> Result<()> {
        if meta_epoch(conn, APPLIED)? < epoch {
            self.apply(conn, did)?;
        }
        let applied = meta_epoch(conn, APPLIED)?;
        if meta_epoch(conn, ACKED)? < applied {
            if self.uncertain() {
                self.resync(conn)?;
            }
            if meta_epoch(conn, REFETCHED)? < applied {
                self.refetch_or_rerun(conn, applied, did)?;
            }
            *self.definitions.write() = crate::site::read_definitions(conn)?;
            self.drop_unmatched(conn, did)?;
            self.release(conn, did)?;
            let now = self.wire_bytes();
            Site::bump(
                conn,
                &[(
                    "refresh_distribute_bytes",
                    now.saturating_sub(*counted) as i64,
                )],
            )?;
            *counted = now;
            self.remote(|c| async move { c.acknowledge(applied).await })?;
            set_meta(conn, ACKED, applied)?;
            Site::bump(conn, &[("refresh_epochs", 1)])?;
        }
        Ok(())
    }

    pub(crate) fn open_refresh_conn(&self) -> Result<Connection> {
        let conn = Connection::open(self.path())?;
        conn.busy_timeout(Duration::from_secs(10))?;
        Ok(conn)
    }

    /// Collect: put a mapping edit into effect, hold still, evict, push.
    fn collect(&self, conn: &mut Connection, epoch: u64, did: &mut SiteEpoch) -> Result<()> {
        self.apply_mapping_edit(conn)?;
        set_meta(conn, REFRESHING, epoch)?;
        self.evict(conn, did)?;
        // A release the controller refuses must not hold up the push: the
        // copies stay listed for the next time.
        if let Err(e) = self.release(conn, did) {
            tracing::warn!(site = %self.code(), error = %e, "releasing evicted copies failed");
        }
        self.reached(SitePoint::Evicted)?;
        let push = self.build_push(conn, epoch)?;
        let sent_before = meta_epoch(conn, SENT)? == epoch;
        set_meta(conn, SENT, epoch)?;
        match self.remote(|c| async move { c.push(push).await }) {
            Ok(n) => {
                did.pushed = n;
                set_meta(conn, PUSHED, epoch)?;
                tracing::info!(site = %self.code(), epoch, tuples = n, "pushed");
                self.reached(SitePoint::Pushed)
            }
            Err(Error::Remote(s)) if s.code() == tonic::Code::FailedPrecondition && sent_before => {
                // An earlier send of this same push (the data has held
                // still since) may have been staged and committed before
                // its reply was lost: keep holding still; the distribution
                // tells (see `apply`).
                tracing::warn!(site = %self.code(), epoch, reason = s.message(), "push refused after an unanswered one: the distribution tells whether that one was committed");
                Ok(())
            }
            Err(Error::Remote(s)) if s.code() == tonic::Code::FailedPrecondition => {
                // Too late for this epoch: the changes wait for the next.
                conn.execute("DELETE FROM snaps_meta WHERE key = ?1", [REFRESHING])?;
                tracing::warn!(site = %self.code(), epoch, reason = s.message(), "push refused");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Puts an administrator's edit of the mapping tables into effect (see
    /// `mapping_admin`): per relation whose attributes changed, its own
    /// exported tuples are marked to be pushed in the new shape, the global
    /// attributes no longer mapped are kept to be withdrawn with the push,
    /// its copies are released at the controller (the re-run sends them
    /// again in the new shape, and they are updated in place), its triggers
    /// are made again; then the new mapping is in effect and the
    /// definitions are planned with it. An edit that no longer validates
    /// (the tables were written behind the controller's back) stays
    /// pending, logged; so does one while this site holds changes of such
    /// a relation's copies under a lock, until they are committed.
    fn apply_mapping_edit(&self, conn: &mut Connection) -> Result<()> {
        let active = MappingRows::active(conn)?;
        let edited = MappingRows::read(conn)?;
        if differences(&active, &edited).is_empty() {
            return Ok(());
        }
        let new = match mapping_admin::validate(conn, &edited, &self.catalog, &self.global) {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(site = %self.code(), error = %e, "the edited mapping is not valid: it stays pending");
                return Ok(());
            }
        };
        let old = self.mapping();
        let reshaped: Vec<&snaps_mapping::mapping::RelationMapping> = new
            .relations()
            .filter(|rm| {
                old.relation(&rm.local.name).is_some_and(|before| {
                    shape_of_relation(before) != shape_of_relation(rm)
                        || before
                            .parts
                            .iter()
                            .zip(&rm.parts)
                            .any(|(a, b)| a.attrs != b.attrs)
                })
            })
            .collect();
        // A copy changed under a lock not yet committed is pushed in the
        // shape it was changed in: the edit waits for that epoch to pass.
        for rm in &reshaped {
            let locked: i64 = conn.query_row(
                &format!(
                    "SELECT count(*) FROM {} WHERE ({STATUS_COLUMN} & {SNAPSHOT}) <> 0
                       AND ({STATUS_COLUMN} & {RIGHTS}) = {READ_WRITE}",
                    sql_ident(&rm.local.name)
                ),
                [],
                |r| r.get(0),
            )?;
            if locked > 0 {
                tracing::warn!(site = %self.code(), relation = %rm.local.name, locked,
                    "the mapping edit waits until this site's changes under lock are committed");
                return Ok(());
            }
        }
        let mut withdrawn: BTreeMap<String, BTreeSet<String>> = pending_withdrawals(conn)?;
        let mut changed: BTreeSet<String> = BTreeSet::new();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        for rm in reshaped {
            let name = &rm.local.name;
            let Some(before) = old.relation(name) else {
                continue;
            };
            changed.insert(name.clone());
            for part in &before.parts {
                let now: BTreeSet<&str> = rm
                    .parts
                    .iter()
                    .filter(|p| p.global == part.global)
                    .flat_map(|p| p.attrs.iter().map(|a| a.global.as_str()))
                    .collect();
                for a in &part.attrs {
                    if !now.contains(a.global.as_str()) {
                        withdrawn
                            .entry(part.global.clone())
                            .or_default()
                            .insert(a.global.clone());
                    }
                }
            }
            let rel = sql_ident(name);
            tx.execute(
                &format!(
                    "UPDATE {rel} SET {STATUS_COLUMN} = {STATUS_COLUMN} | {MODIFIED}
                     WHERE ({STATUS_COLUMN} & {}) = 0",
                    SNAPSHOT | NEW
                ),
                [],
            )?;
            // The copies stay (pinned ones keep their own attributes); the
            // controller forgets this site holds them, so the re-run sends
            // them again in the new shape and they are updated in place.
            tx.execute(
                "INSERT OR IGNORE INTO snaps_released (global_relation, tuple_id)
                 SELECT global_relation, tuple_id FROM snaps_copy WHERE relation = ?1",
                [name],
            )?;
            drop_relation_triggers(&tx, name)?;
            tx.execute_batch(&relation_triggers(rm))?;
        }
        let json = serde_json::to_string(&withdrawn).map_err(|e| Error::Invalid(e.to_string()))?;
        tx.execute(
            "INSERT OR REPLACE INTO snaps_meta (key, value) VALUES (?1, ?2)",
            params![mapping_admin::WITHDRAWN, json],
        )?;
        edited.make_active(&tx)?;
        // The definitions, planned with the new mapping.
        let defs: Vec<(i64, Option<String>)> = {
            let mut stmt =
                tx.prepare("SELECT snapshot_no, query FROM snaps_snapshot_definition")?;
            stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<rusqlite::Result<Vec<_>>>()?
        };
        for (no, query) in defs {
            let Some(query) = query else { continue };
            let select: Select = serde_json::from_str(&query).map_err(|e| {
                Error::Invalid(format!("snapshot definition {no} is unreadable: {e}"))
            })?;
            let planned = plan(&select, &self.catalog, &new)?;
            let def = SnapshotDefinition::from_plan(&planned, &BTreeMap::new());
            tx.execute(
                "UPDATE snaps_snapshot_definition SET plan = ?2 WHERE snapshot_no = ?1",
                params![
                    no,
                    serde_json::to_string(&def).map_err(|e| Error::Invalid(e.to_string()))?
                ],
            )?;
        }
        tx.commit()?;
        self.set_mapping(new, &self.global);
        // Until the re-run brings their copies again, definitions over the
        // changed relations cover nothing.
        self.definitions.write().retain(|(_, d)| {
            !d.groups
                .iter()
                .any(|g| g.tables.iter().any(|t| changed.contains(&t.relation)))
        });
        tracing::info!(site = %self.code(), relations = ?changed, withdrawn = ?withdrawn,
            "the edited mapping is in effect");
        Ok(())
    }

    /// Evicts the snapshots unused for `max_days` (never pinned ones) and
    /// the copies no live snapshot holds, keeping pinned copies and those
    /// changed under a lock not yet committed. Released copies are kept in
    /// `snaps_released` until the controller has heard of them.
    fn evict(&self, conn: &mut Connection, did: &mut SiteEpoch) -> Result<()> {
        let max_days = i64::from(self.max_days.load(std::sync::atomic::Ordering::Relaxed));
        let cutoff = today() - max_days;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let old: Vec<i64> = {
            let mut stmt = tx.prepare(
                "SELECT d.snapshot_no FROM snaps_snapshot_definition d
                 WHERE coalesce(d.pinned, 0) = 0
                   AND coalesce((SELECT max(m.last_access_day) FROM snaps_snapshot_membership m
                                 WHERE m.snapshot_no = d.snapshot_no), d.created_day) < ?1",
            )?;
            stmt.query_map([cutoff], |r| r.get(0))?
                .collect::<rusqlite::Result<Vec<_>>>()?
        };
        for no in &old {
            tx.execute(
                "DELETE FROM snaps_snapshot_membership WHERE snapshot_no = ?1",
                [no],
            )?;
            tx.execute(
                "DELETE FROM snaps_snapshot_definition WHERE snapshot_no = ?1",
                [no],
            )?;
        }
        for rm in self.mapping().relations() {
            let rel = sql_ident(&rm.local.name);
            let orphans: Vec<i64> = {
                let mut stmt = tx.prepare(&format!(
                    "SELECT rowid FROM {rel} WHERE ({STATUS_COLUMN} & {SNAPSHOT}) <> 0
                       AND ({STATUS_COLUMN} & {RIGHTS}) <> {READ_WRITE}
                       AND rowid NOT IN (SELECT tuple_rowid FROM snaps_snapshot_membership WHERE relation = ?1)
                       AND rowid NOT IN (SELECT tuple_rowid FROM snaps_pinned WHERE relation = ?1)"
                ))?;
                stmt.query_map([&rm.local.name], |r| r.get(0))?
                    .collect::<rusqlite::Result<Vec<_>>>()?
            };
            for rowid in orphans {
                release_copy(&tx, &rm.local.name, rowid)?;
            }
        }
        tx.commit()?;
        if !old.is_empty() {
            self.definitions
                .write()
                .retain(|(no, _)| !old.contains(&i64::from(no.0)));
            tracing::info!(site = %self.code(), evicted = old.len(), "snapshots evicted");
        }
        did.evicted += old.len() as u64;
        Ok(())
    }

    /// Tells the controller of the copies evicted here.
    fn release(&self, conn: &Connection, did: &mut SiteEpoch) -> Result<()> {
        let refs: Vec<(String, i64)> = {
            let mut stmt = conn.prepare("SELECT global_relation, tuple_id FROM snaps_released")?;
            stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<rusqlite::Result<Vec<_>>>()?
        };
        if refs.is_empty() {
            return Ok(());
        }
        for chunk in refs.chunks(10_000) {
            let wire: Vec<v1::TupleRef> = chunk
                .iter()
                .map(|(r, id)| v1::TupleRef {
                    relation: r.clone(),
                    id: Some(v1::tuple_ref::Id::TupleId(*id as u64)),
                })
                .collect();
            did.released += self.remote(|c| async move { c.release_copies(wire).await })?;
            let mut del = conn.prepare_cached(
                "DELETE FROM snaps_released WHERE global_relation = ?1 AND tuple_id = ?2",
            )?;
            for (r, id) in chunk {
                del.execute(params![r, id])?;
            }
        }
        Ok(())
    }

    /// Everything not yet committed, tagged with the epoch.
    fn build_push(&self, conn: &Connection, epoch: u64) -> Result<v1::PushRequest> {
        let mut push = v1::PushRequest {
            epoch,
            withdrawn: pending_withdrawals(conn)?
                .into_iter()
                .map(|(relation, columns)| v1::Withdrawn {
                    relation,
                    columns: columns.into_iter().collect(),
                })
                .collect(),
            ..Default::default()
        };
        for rm in self.mapping().relations() {
            let rel = &rm.local;
            let status = |mask: u8, want: u8| format!("({STATUS_COLUMN} & {mask}) = {want}");
            let (new, changed) = own_changes(conn, rm, "1")?;
            push.inserted.extend(new);
            push.updated.extend(changed);
            let copies = read_tuples(
                conn,
                rel,
                &status(SNAPSHOT | MODIFIED, SNAPSHOT | MODIFIED),
                0,
            )?;
            let mut by_part: Vec<(Vec<u64>, Vec<Vec<Value>>)> =
                vec![Default::default(); rm.parts.len()];
            for (rowid, values) in copies {
                let parts = rm.export(&values)?;
                for (pi, part) in rm.parts.iter().enumerate() {
                    let id: Option<i64> = conn
                        .prepare_cached(
                            "SELECT tuple_id FROM snaps_copy WHERE relation = ?1 AND tuple_rowid = ?2 AND global_relation = ?3",
                        )?
                        .query_row(params![rel.name, rowid, part.global], |r| r.get(0))
                        .optional()?;
                    if let Some(id) = id {
                        by_part[pi].0.push(id as u64);
                        by_part[pi].1.push(parts[pi].clone());
                    }
                }
            }
            for ((ids, rows), part) in by_part.into_iter().zip(&rm.parts) {
                if ids.is_empty() {
                    continue;
                }
                push.copies.push(v1::CopyUpdate {
                    relation: part.global.clone(),
                    columns: part.attrs.iter().map(|a| a.global.clone()).collect(),
                    tuple_ids: ids,
                    values: Some(
                        encode_rows(part.attrs.len(), &rows)
                            .map_err(|e| Error::Invalid(e.to_string()))?,
                    ),
                });
            }
            let deleted: Vec<u64> = {
                let mut stmt = conn.prepare(
                    "SELECT origin FROM snaps_deleted WHERE relation = ?1 ORDER BY origin",
                )?;
                stmt.query_map([&rel.name], |r| r.get::<_, i64>(0))?
                    .map(|o| o.map(|o| o as u64))
                    .collect::<rusqlite::Result<Vec<_>>>()?
            };
            if !deleted.is_empty() {
                push.deleted.push(v1::OwnDeletes {
                    relations: rm.parts.iter().map(|p| p.global.clone()).collect(),
                    origins: deleted,
                });
            }
        }
        Ok(push)
    }

    /// Distribute: new versions and removals in place, and — when this
    /// site's push was committed — its flags cleared; all in one
    /// transaction with the epoch it brings the site to.
    fn apply(&self, conn: &mut Connection, did: &mut SiteEpoch) -> Result<()> {
        let since = meta_epoch(conn, APPLIED)?;
        let mut pushed = meta_epoch(conn, PUSHED)?;
        // A push sent whose reply never came (the controller stopped) may
        // have been staged and committed all the same; the site has held
        // still since, so `committed_push` decides for it as for an
        // answered one.
        let sent = meta_epoch(conn, SENT)?;
        if sent > pushed && meta_epoch(conn, REFRESHING)? == sent {
            pushed = sent;
        }
        let mapping = self.mapping();
        let parts: Vec<v1::Part> = mapping
            .relations()
            .flat_map(|rm| shape_of_relation(rm).parts)
            .collect();
        let summaries = crate::summary::version(conn)?;
        let links = match self.identity() {
            Some(_) => Some(crate::links::version(conn)?),
            None => None,
        };
        let reply =
            self.remote(|c| async move { c.changes(since, parts, summaries, links).await })?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let (added, removed) = crate::summary::apply(&tx, &reply)?;
        if added + removed > 0 {
            tracing::info!(site = %self.code(), added, removed, version = reply.summary_version,
                "summaries applied");
        }
        if links.is_some() {
            let n = crate::links::apply(&tx, &reply)?;
            if n > 0 {
                tracing::info!(site = %self.code(), links = n, version = reply.links_version,
                    "identity links applied");
            }
        }
        // Writes are allowed again from here (in this transaction too).
        tx.execute("DELETE FROM snaps_meta WHERE key = ?1", [REFRESHING])?;
        for part in &reply.changed {
            did.updated += apply_part(&tx, &self.mapping(), part)?;
        }
        for r in &reply.removed {
            for id in &r.tuple_ids {
                let held: Option<(String, i64)> = tx
                    .query_row(
                        "SELECT relation, tuple_rowid FROM snaps_copy WHERE global_relation = ?1 AND tuple_id = ?2",
                        params![r.relation, *id as i64],
                        |row| Ok((row.get(0)?, row.get(1)?)),
                    )
                    .optional()?;
                if let Some((relation, rowid)) = held {
                    remove_copy(&tx, &relation, rowid)?;
                    did.removed += 1;
                }
            }
        }
        let committed = pushed > since && reply.committed_push >= pushed;
        for rm in self.mapping().relations() {
            let rel = sql_ident(&rm.local.name);
            if committed {
                // The global snapshot has it all now; the locks are gone.
                tx.execute(
                    &format!(
                        "UPDATE {rel} SET {STATUS_COLUMN} = {STATUS_COLUMN} & {SNAPSHOT}
                         WHERE ({STATUS_COLUMN} & {}) <> 0",
                        NEW | MODIFIED | RIGHTS
                    ),
                    [],
                )?;
            } else {
                // Other sites' locks ended with their pushes; ours stay.
                tx.execute(
                    &format!(
                        "UPDATE {rel} SET {STATUS_COLUMN} = {STATUS_COLUMN} & ~{RIGHTS}
                         WHERE ({STATUS_COLUMN} & {RIGHTS}) = {READ_ONLY}"
                    ),
                    [],
                )?;
            }
        }
        if committed {
            tx.execute("DELETE FROM snaps_deleted", [])?;
            tx.execute(
                "DELETE FROM snaps_meta WHERE key = ?1",
                [mapping_admin::WITHDRAWN],
            )?;
        }
        // The night's delta starts where this site was.
        set_meta(&tx, DELTA_FROM, since)?;
        set_meta(&tx, APPLIED, reply.epoch)?;
        tx.commit()?;
        tracing::info!(site = %self.code(), epoch = reply.epoch, committed, updated = did.updated,
            removed = did.removed, "epoch applied");
        self.reached(SitePoint::Applied)
    }

    /// After a fetch reply this site may have lost, the controller's sent-to
    /// bits may name tuples it does not hold: it is told every tuple the
    /// site holds, and fetches stop asking for held tuples.
    fn resync(&self, conn: &Connection) -> Result<()> {
        let mut held: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        {
            let mut stmt = conn.prepare("SELECT global_relation, tuple_id FROM snaps_copy")?;
            let mut rows = stmt.query([])?;
            while let Some(r) = rows.next()? {
                held.entry(r.get(0)?)
                    .or_default()
                    .push(r.get::<_, i64>(1)? as u64);
            }
        }
        let held: Vec<v1::HeldTuples> = held
            .into_iter()
            .map(|(relation, tuple_ids)| v1::HeldTuples {
                relation,
                tuple_ids,
            })
            .collect();
        let (added, removed) = self.remote(|c| async move { c.resync(held).await })?;
        tracing::info!(site = %self.code(), added, removed, "held tuples re-synchronised");
        self.clear_uncertain(conn)
    }

    /// Every snapshot definition that has a query, planned against the
    /// site's mapping now.
    fn plan_definitions(&self, conn: &Connection) -> Result<Vec<Planned>> {
        let defs: Vec<(i64, String, String, Option<String>)> = {
            let mut stmt = conn.prepare(
                "SELECT snapshot_no, language, statement, query FROM snaps_snapshot_definition ORDER BY snapshot_no",
            )?;
            stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
                .collect::<rusqlite::Result<Vec<_>>>()?
        };
        let mut planned = Vec::new();
        for (no, lang, text, query) in defs {
            let Some(query) = query else { continue };
            let select: Select = serde_json::from_str(&query).map_err(|e| {
                Error::Invalid(format!("snapshot definition {no} is unreadable: {e}"))
            })?;
            let plan = plan(&select, &self.catalog, &self.mapping())?;
            let current = projections(conn, &plan)?;
            let lang = if lang == "quel" {
                Language::Quel
            } else {
                Language::Sql
            };
            planned.push(Planned {
                no,
                lang,
                text,
                select,
                plan,
                current,
            });
        }
        Ok(planned)
    }

    /// Brings the tuples the epoch's changes add to the snapshot
    /// definitions: by the controller's delta of the standing groups when
    /// the global snapshot has all this site's changes, else by re-running
    /// every definition (the site's uncommitted tuples join as semi-joins,
    /// which only the site can send).
    fn refetch_or_rerun(
        &self,
        conn: &mut Connection,
        applied: u64,
        did: &mut SiteEpoch,
    ) -> Result<()> {
        let from = meta_opt(conn, DELTA_FROM)?;
        match from {
            Some(from) if !self.has_uncommitted(conn)? => self.refetch(conn, from, applied, did)?,
            _ => self.rerun(conn, did, None)?,
        }
        set_meta(conn, REFETCHED, applied)
    }

    /// Whether any tuple of a mapped relation is new or changed here and
    /// not yet in the global snapshot.
    fn has_uncommitted(&self, conn: &Connection) -> Result<bool> {
        for rm in self.mapping().relations() {
            let any: bool = conn.query_row(
                &format!(
                    "SELECT EXISTS (SELECT 1 FROM {} WHERE ({STATUS_COLUMN} & {CHANGED_BITS}) <> 0)",
                    sql_ident(&rm.local.name),
                ),
                [],
                |r| r.get(0),
            )?;
            if any {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Tells the controller which kept groups became standing and which
    /// stopped, and stores what it sends: the tuples this site does not
    /// hold of every combination a standing group selects with a tuple
    /// changed after epoch `from`. A definition whose group the controller
    /// keeps no body for is re-run, sending the body.
    fn refetch(
        &self,
        conn: &mut Connection,
        from: u64,
        applied: u64,
        did: &mut SiteEpoch,
    ) -> Result<()> {
        let planned = self.plan_definitions(conn)?;
        // name → the (definition, group) pairs it is.
        let mut by_name: BTreeMap<u32, Vec<(usize, u32)>> = BTreeMap::new();
        let mut body_of: BTreeMap<u32, v1::Group> = BTreeMap::new();
        for (i, p) in planned.iter().enumerate() {
            if let Some(req) = self.request_for(conn, &p.plan, &p.current, "")? {
                for (gi, g) in req.groups.into_iter().enumerate() {
                    by_name.entry(g.kept).or_default().push((i, gi as u32));
                    body_of.entry(g.kept).or_insert(g);
                }
            }
        }
        let want: BTreeSet<u32> = by_name.keys().copied().collect();
        let told = crate::kept::standing(conn)?;
        // A record that disagrees with the controller's count (a restored
        // file, a new store) is replaced whole.
        let whole = meta_opt(conn, REFETCH_STANDING)? != Some(told.len() as u64);
        let (added, removed): (BTreeSet<u32>, BTreeSet<u32>) = if whole {
            (want.clone(), BTreeSet::new())
        } else {
            (
                want.difference(&told).copied().collect(),
                told.difference(&want).copied().collect(),
            )
        };
        let sorted = |names: &BTreeSet<u32>| {
            snaps_schema::summary::encode_sorted(
                &names.iter().map(|&n| u64::from(n)).collect::<Vec<_>>(),
            )
        };
        // Asked before for this epoch: that reply may have been lost after
        // the controller recorded its tuples as sent.
        let include_held = meta_epoch(conn, REFETCH_ASKED)? == applied || self.uncertain();
        set_meta(conn, REFETCH_ASKED, applied)?;
        // Bodies the controller has not confirmed keeping go along.
        let bodies: Vec<v1::Group> = added
            .iter()
            .filter(|&&n| !self.kept.confirmed(n))
            .filter_map(|n| body_of.remove(n))
            .collect();
        let sent_bodies = v1::FetchRequest {
            groups: bodies.clone(),
            ..Default::default()
        };
        let req = v1::RefetchRequest {
            since: from,
            added: sorted(&added),
            removed: sorted(&removed),
            whole,
            include_held,
            access: meta_epoch(conn, REFETCH_ACCESS)?,
            bodies,
        };
        let reply = self.remote(|c| async move { c.refetch(req).await })?;
        self.kept.confirm(conn, &sent_bodies)?;
        let unknown: BTreeSet<u32> = reply.unknown_groups.iter().copied().collect();
        let mut replies: BTreeMap<usize, v1::FetchReply> = BTreeMap::new();
        for t in &reply.tables {
            let targets = by_name.get(&t.group).ok_or_else(|| {
                Error::Invalid(format!(
                    "the refetch reply names group {}, not asked for",
                    t.group
                ))
            })?;
            did.fetched += u64::from(t.count);
            for &(i, gi) in targets {
                let mut t = t.clone();
                t.group = gi;
                replies.entry(i).or_default().tables.push(t);
            }
        }
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        for (i, r) in &replies {
            let p = &planned[*i];
            self.store_reply(&tx, &p.plan, &p.current, &p.retrieval(), r, 0, 0)?;
        }
        let now: BTreeSet<u32> = added.difference(&unknown).copied().collect();
        crate::kept::set_standing(&tx, &now, true, whole)?;
        crate::kept::set_standing(&tx, &removed, false, false)?;
        let expected = if whole {
            now.len()
        } else {
            told.difference(&removed).count() + now.len()
        };
        // The controller stands for other names than this site recorded
        // (it lost some): the set goes whole, at once.
        let agreed = reply.standing == expected as u64;
        if agreed {
            set_meta(&tx, REFETCH_STANDING, reply.standing)?;
        } else {
            tx.execute("DELETE FROM snaps_meta WHERE key = ?1", [REFETCH_STANDING])?;
        }
        set_meta(&tx, REFETCH_ACCESS, reply.access)?;
        tx.execute("DELETE FROM snaps_meta WHERE key = ?1", [REFETCH_ASKED])?;
        tx.commit()?;
        tracing::info!(site = %self.code(), fetched = did.fetched, added = added.len(),
            removed = removed.len(), whole, evaluated_whole = reply.whole, "standing groups refetched");
        if !agreed && !whole {
            tracing::warn!(site = %self.code(), standing = reply.standing, expected,
                "the controller's standing groups differ from this site's record: sending them whole");
            return self.refetch(conn, from, applied, did);
        }
        self.reached(SitePoint::Refetching)?;
        if !unknown.is_empty() {
            let only: BTreeSet<i64> = by_name
                .iter()
                .filter(|(name, _)| unknown.contains(name))
                .flat_map(|(_, targets)| targets.iter().map(|&(i, _)| planned[i].no))
                .collect();
            tracing::info!(site = %self.code(), definitions = only.len(),
                "the controller keeps no body for some standing groups: re-running their definitions");
            self.rerun(conn, did, Some(&only))?;
        }
        Ok(())
    }

    /// Re-runs every snapshot definition (or those numbered in `only`),
    /// [`RERUN_BATCH`] to a request: the controller sends only the tuples
    /// this site does not hold yet.
    fn rerun(
        &self,
        conn: &Connection,
        did: &mut SiteEpoch,
        only: Option<&BTreeSet<i64>>,
    ) -> Result<()> {
        let mut planned = self.plan_definitions(conn)?;
        if let Some(only) = only {
            planned.retain(|p| only.contains(&p.no));
        }
        // Fetched a batch per request. The first goes alone, so a crash
        // test can stop the site between re-runs.
        let received = |conn: &Connection| crate::store::counter(conn, "tuples_received");
        let mut start = 0;
        while start < planned.len() {
            let end = if start == 0 {
                1
            } else {
                (start + RERUN_BATCH).min(planned.len())
            };
            let batch = &planned[start..end];
            let retrievals: Vec<Retrieval<'_>> = batch.iter().map(Planned::retrieval).collect();
            let items: Vec<_> = batch
                .iter()
                .zip(&retrievals)
                .map(|(p, r)| (&p.plan, &p.current, r))
                .collect();
            let before = received(conn)?;
            let fetched = match self.fetch_together(conn, &items) {
                // An administrator took a right away: re-run the batch one
                // by one, skipping what is denied (its copies stay as they
                // are and no new tuples come); the epoch goes on.
                Err(Error::Remote(s)) if s.code() == tonic::Code::PermissionDenied => {
                    let mut one_by_one = Vec::new();
                    for (p, (plan, current, r)) in batch.iter().zip(&items) {
                        match self.fetch(conn, plan, current, r) {
                            Err(Error::Remote(s)) if s.code() == tonic::Code::PermissionDenied => {
                                tracing::warn!(site = %self.code(), snapshot = p.no, reason = s.message(), "snapshot definition not re-run: access denied");
                            }
                            other => one_by_one.push(other?),
                        }
                    }
                    one_by_one
                }
                other => other?,
            };
            if fetched.iter().any(|f| matches!(f, Fetched::LocalOnly(_))) {
                return Err(Error::Unreachable(
                    "the global controller did not answer the snapshot definitions' re-run".into(),
                ));
            }
            did.fetched += (received(conn)? - before) as u64;
            if start == 0 {
                self.reached(SitePoint::Refetching)?;
            }
            start = end;
        }
        Ok(())
    }
}

/// A snapshot definition planned for a night's refetch or re-run.
struct Planned {
    no: i64,
    lang: Language,
    text: String,
    select: Select,
    plan: snaps_mapping::rewrite::Plan,
    current: crate::site::Projections,
}

impl Planned {
    /// The retrieval its new tuples are stored for: more of its own
    /// snapshot, the site's own work.
    fn retrieval(&self) -> Retrieval<'_> {
        Retrieval {
            select: &self.select,
            lang: self.lang,
            text: &self.text,
            into: Some(SnapshotNo(self.no as u32)),
            user: "",
        }
    }
}

impl Site {
    /// After the re-run: every copy is kept only while a snapshot
    /// definition still selects it (evaluated here, over the site's own
    /// tuples and copies, with the definition's mapped selections and
    /// joins); memberships are set to what selects each tuple now. A copy
    /// changed elsewhere so that nothing here asks for it any more goes, as
    /// a recomputation from scratch would not bring it. Pinned copies and
    /// copies changed under a lock not yet committed stay.
    fn drop_unmatched(&self, conn: &mut Connection, did: &mut SiteEpoch) -> Result<()> {
        let defs: Vec<(i64, String)> = {
            let mut stmt =
                conn.prepare("SELECT snapshot_no, plan FROM snaps_snapshot_definition")?;
            stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<rusqlite::Result<Vec<_>>>()?
        };
        // (relation, rowid) → the snapshots selecting it now.
        let mut selected: BTreeMap<(String, i64), Vec<i64>> = BTreeMap::new();
        for (no, plan) in &defs {
            let def: SnapshotDefinition = serde_json::from_str(plan).map_err(|e| {
                Error::Invalid(format!("snapshot definition {no} is unreadable: {e}"))
            })?;
            for group in &def.groups {
                let sql = group_sql(group);
                let mut stmt = conn.prepare(&sql)?;
                let mut rows = stmt.query([])?;
                while let Some(r) = rows.next()? {
                    for (i, t) in group.tables.iter().enumerate() {
                        if let Some(rowid) = r.get::<_, Option<i64>>(i)? {
                            selected
                                .entry((t.relation.clone(), rowid))
                                .or_default()
                                .push(*no);
                        }
                    }
                }
            }
        }
        // What each copy belongs to now, and each snapshot's newest access
        // day (a membership added keeps its snapshot's age).
        let mut members: BTreeMap<(String, i64), BTreeSet<i64>> = BTreeMap::new();
        let mut newest: BTreeMap<i64, i64> = BTreeMap::new();
        {
            let mut stmt = conn.prepare(
                "SELECT relation, tuple_rowid, snapshot_no, last_access_day FROM snaps_snapshot_membership",
            )?;
            let mut rows = stmt.query([])?;
            while let Some(r) = rows.next()? {
                let no: i64 = r.get(2)?;
                members
                    .entry((r.get(0)?, r.get(1)?))
                    .or_default()
                    .insert(no);
                let day: i64 = r.get(3)?;
                let e = newest.entry(no).or_insert(day);
                *e = (*e).max(day);
            }
        }
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        for rm in self.mapping().relations() {
            let name = &rm.local.name;
            let rel = sql_ident(name);
            let copies: Vec<i64> = {
                let mut stmt = tx.prepare(&format!(
                    "SELECT rowid FROM {rel} WHERE ({STATUS_COLUMN} & {SNAPSHOT}) <> 0
                       AND ({STATUS_COLUMN} & {RIGHTS}) <> {READ_WRITE}
                       AND rowid NOT IN (SELECT tuple_rowid FROM snaps_pinned WHERE relation = ?1)"
                ))?;
                stmt.query_map([name], |r| r.get(0))?
                    .collect::<rusqlite::Result<Vec<_>>>()?
            };
            for rowid in copies {
                let key = (name.clone(), rowid);
                let Some(now) = selected.get(&key) else {
                    release_copy(&tx, name, rowid)?;
                    did.removed += 1;
                    continue;
                };
                let now: BTreeSet<i64> = now.iter().copied().collect();
                let before = members.remove(&key).unwrap_or_default();
                for no in before.difference(&now) {
                    tx.prepare_cached(
                        "DELETE FROM snaps_snapshot_membership
                         WHERE relation = ?1 AND tuple_rowid = ?2 AND snapshot_no = ?3",
                    )?
                    .execute(params![name, rowid, no])?;
                }
                for no in now.difference(&before) {
                    tx.prepare_cached(
                        "INSERT OR IGNORE INTO snaps_snapshot_membership
                           (relation, tuple_rowid, snapshot_no, last_access_day) VALUES (?1, ?2, ?3, ?4)",
                    )?
                    .execute(params![name, rowid, no, newest.get(no).copied().unwrap_or_else(today)])?;
                }
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Throws away every copy but the pinned ones and fetches every
    /// snapshot definition again from scratch (asking for tuples the
    /// controller believes this site holds too): the delete-and-re-execute
    /// refresh the differential one is measured and checked against, and a
    /// way to rebuild a site's copies. Returns the tuples fetched.
    pub fn rebuild_snapshots(&self) -> Result<u64> {
        let mut conn = self.open_refresh_conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        for rm in self.mapping().relations() {
            let name = &rm.local.name;
            let copies: Vec<i64> = {
                let mut stmt = tx.prepare(&format!(
                    "SELECT rowid FROM {} WHERE ({STATUS_COLUMN} & {SNAPSHOT}) <> 0
                       AND rowid NOT IN (SELECT tuple_rowid FROM snaps_pinned WHERE relation = ?1)",
                    sql_ident(name)
                ))?;
                stmt.query_map([name], |r| r.get(0))?
                    .collect::<rusqlite::Result<Vec<_>>>()?
            };
            for rowid in copies {
                remove_copy(&tx, name, rowid)?;
            }
        }
        tx.execute("DELETE FROM snaps_snapshot_membership", [])?;
        tx.commit()?;
        self.mark_uncertain()?;
        let mut did = SiteEpoch::default();
        self.rerun(&conn, &mut did, None)?;
        Ok(did.fetched)
    }
}

/// A recorded group as a query over the site's own relations: the rowid of
/// every table's tuple in each combination the group's mapped selections
/// and joins select (NULL for an unmatched null-supplying side).
/// The own tuples of `rm` that are new, and those changed, since they
/// were last pushed, among those `only` (an SQL condition) picks: as the
/// push's inserted and updated batches.
pub(crate) fn own_changes(
    conn: &Connection,
    rm: &snaps_mapping::mapping::RelationMapping,
    only: &str,
) -> Result<(Vec<v1::LoadBatch>, Vec<v1::LoadBatch>)> {
    let status = |mask: u8, want: u8| format!("({STATUS_COLUMN} & {mask}) = {want} AND ({only})");
    let read = |filter: String| -> Result<Vec<(u64, Vec<Value>)>> {
        Ok(read_tuples(conn, &rm.local, &filter, 0)?
            .into_iter()
            .map(|(o, v)| (o as u64, v))
            .collect())
    };
    let new = read(status(SNAPSHOT | NEW, NEW))?;
    let changed = read(status(SNAPSHOT | NEW | MODIFIED, MODIFIED))?;
    Ok((
        export_batches(rm, &new, 5_000)?,
        export_batches(rm, &changed, 5_000)?,
    ))
}

pub(crate) fn group_sql(group: &DefinedGroup) -> String {
    let mut from = String::new();
    let mut conds: Vec<String> = Vec::new();
    for t in group.tables.iter().filter(|t| !t.outer) {
        if !from.is_empty() {
            from.push_str(", ");
        }
        from.push_str(&format!(
            "{} AS {}",
            sql_ident(&t.relation),
            sql_ident(&t.var)
        ));
        conds.extend(t.selection.iter().map(|e| format!("({e})")));
    }
    for j in group.joins.iter().filter(|j| j.outer.is_none()) {
        conds.push(format!("{} = {}", j.left, j.right));
    }
    for t in group.tables.iter().filter(|t| t.outer) {
        let mut on: Vec<String> = group
            .joins
            .iter()
            .filter(|j| j.outer.as_deref() == Some(t.var.as_str()))
            .map(|j| format!("{} = {}", j.left, j.right))
            .collect();
        on.extend(t.selection.iter().map(|e| format!("({e})")));
        if on.is_empty() {
            on.push("1".into());
        }
        from.push_str(&format!(
            " LEFT JOIN {} AS {} ON {}",
            sql_ident(&t.relation),
            sql_ident(&t.var),
            on.join(" AND ")
        ));
    }
    let cols: Vec<String> = group
        .tables
        .iter()
        .map(|t| format!("{}.rowid", sql_ident(&t.var)))
        .collect();
    format!(
        "SELECT DISTINCT {} FROM {from}{}",
        cols.join(", "),
        if conds.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", conds.join(" AND "))
        }
    )
}

/// Attributes withdrawn by a mapping edit and not yet committed: global
/// relation → attributes.
fn pending_withdrawals(conn: &Connection) -> Result<BTreeMap<String, BTreeSet<String>>> {
    let json: Option<String> = conn
        .query_row(
            "SELECT value FROM snaps_meta WHERE key = ?1",
            [mapping_admin::WITHDRAWN],
            |r| r.get(0),
        )
        .optional()?;
    match json {
        None => Ok(BTreeMap::new()),
        Some(j) => serde_json::from_str(&j)
            .map_err(|e| Error::Invalid(format!("withdrawn attributes unreadable: {e}"))),
    }
}

/// Removes a copy this site lets go of, keeping the global tuples behind it
/// in `snaps_released` until the controller has heard of the release.
fn release_copy(tx: &Connection, relation: &str, rowid: i64) -> Result<()> {
    tx.execute(
        "INSERT OR IGNORE INTO snaps_released (global_relation, tuple_id)
         SELECT global_relation, tuple_id FROM snaps_copy WHERE relation = ?1 AND tuple_rowid = ?2",
        params![relation, rowid],
    )?;
    remove_copy(tx, relation, rowid)
}

/// Removes a copy: the tuple (marked as the controller's work, so the
/// triggers let it go), the global tuples behind it, its memberships, its
/// pin.
fn remove_copy(tx: &Connection, relation: &str, rowid: i64) -> Result<()> {
    let rel = sql_ident(relation);
    tx.execute(
        &format!("UPDATE {rel} SET {STATUS_COLUMN} = {STATUS_COLUMN} | {REFRESHING_MARK} WHERE rowid = ?1"),
        [rowid],
    )?;
    tx.execute(&format!("DELETE FROM {rel} WHERE rowid = ?1"), [rowid])?;
    for table in ["snaps_copy", "snaps_snapshot_membership", "snaps_pinned"] {
        tx.execute(
            &format!("DELETE FROM {table} WHERE relation = ?1 AND tuple_rowid = ?2"),
            params![relation, rowid],
        )?;
    }
    Ok(())
}

/// Applies new versions of one part's tuples in place: the mapped
/// attributes that part carries, converted to the site's types; the site's
/// own attributes (of a pinned copy, say) stay. Returns how many tuples
/// changed.
fn apply_part(tx: &Connection, mapping: &SiteMapping, part: &v1::ChangedPart) -> Result<u64> {
    let rows = decode_rows(part.columns.len(), &part.values.clone().unwrap_or_default())
        .map_err(|e| Error::Invalid(e.to_string()))?;
    if rows.len() != part.tuple_ids.len() || part.origins.len() != part.tuple_ids.len() {
        return Err(Error::Invalid(format!(
            "changes of {}: rows, tuple ids and origins disagree",
            part.relation
        )));
    }
    let mut changed = 0;
    for ((id, origin), row) in part.tuple_ids.iter().zip(&part.origins).zip(&rows) {
        // Which local tuple: a copy by its global id, an own tuple by origin.
        let target: Option<(String, i64)> = if *origin == 0 {
            tx.query_row(
                "SELECT relation, tuple_rowid FROM snaps_copy WHERE global_relation = ?1 AND tuple_id = ?2",
                params![part.relation, *id as i64],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?
        } else {
            mapping
                .relations()
                .find(|rm| rm.parts.iter().any(|p| p.global == part.relation))
                .map(|rm| (rm.local.name.clone(), *origin as i64))
        };
        let Some((relation, rowid)) = target else {
            continue;
        };
        let Some(rm) = mapping.relation(&relation) else {
            continue;
        };
        let Some(p) = rm.parts.iter().find(|p| p.global == part.relation) else {
            continue;
        };
        let by_global: BTreeMap<&str, &Value> =
            part.columns.iter().map(String::as_str).zip(row).collect();
        let mut sets = Vec::new();
        let mut values = Vec::new();
        for a in &p.attrs {
            let Some(v) = by_global.get(a.global.as_str()) else {
                continue;
            };
            let v = match a.to_local {
                Some(c) => c.apply(v, a.local_type, &format!("{relation}.{}", a.local))?,
                None => (*v).clone(),
            };
            sets.push(format!("{} = ?{}", sql_ident(&a.local), sets.len() + 2));
            values.push(to_sqlite(&v));
        }
        if sets.is_empty() {
            continue;
        }
        let rel = sql_ident(&relation);
        tx.execute(
            &format!("UPDATE {rel} SET {STATUS_COLUMN} = {STATUS_COLUMN} | {REFRESHING_MARK} WHERE rowid = ?1"),
            [rowid],
        )?;
        let mut args = vec![rusqlite::types::Value::Integer(rowid)];
        args.extend(values);
        let n = tx.execute(
            &format!("UPDATE {rel} SET {} WHERE rowid = ?1", sets.join(", ")),
            rusqlite::params_from_iter(args),
        )?;
        tx.execute(
            &format!("UPDATE {rel} SET {STATUS_COLUMN} = {STATUS_COLUMN} & ~7 WHERE rowid = ?1"),
            [rowid],
        )?;
        changed += n as u64;
    }
    Ok(changed)
}
