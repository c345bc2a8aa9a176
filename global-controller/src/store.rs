//! The global store: what the controller keeps, behind a trait so the
//! embedded SQLite store can be replaced by one on PostgreSQL for large
//! networks. Every operation is one transaction.

pub use crate::acl::{AuditFilter, AuditRecord, Right, Subject};
use std::collections::{BTreeMap, BTreeSet};

use snaps_proto::{decode_rows, v1};
use snaps_schema::identity::IdentitySpec;
use snaps_schema::summary::SummarySpec;
use snaps_schema::{Catalog, KeyRange, RelationMode, SiteNo, Value};

use crate::error::{Error, Result};
use crate::query::{FetchQuery, Shape};

/// The site a request comes from (taken from its credential).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteId {
    /// Its code, e.g. `CPH`.
    pub code: String,
    /// Its number: its bit in sent-to bitmaps.
    pub number: SiteNo,
}

/// A batch of a site's initial export, checked against the catalog.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadBatch {
    /// How the local relation lies in the global snapshot.
    pub shape: Shape,
    /// The site's stable number of each local tuple.
    pub origins: Vec<u64>,
    /// Per part, per tuple, the values of the part's columns.
    pub parts: Vec<Vec<Vec<Value>>>,
}

impl LoadBatch {
    /// Decodes a batch and checks every value against its attribute's type.
    pub fn decode(b: &v1::LoadBatch, catalog: &Catalog) -> Result<LoadBatch> {
        let shape = b
            .shape
            .as_ref()
            .ok_or_else(|| Error::InvalidArgument("a load batch has no shape".into()))?;
        let (shape, _) = Shape::decode(shape, catalog)?;
        if b.values.len() != shape.parts.len() {
            return Err(Error::InvalidArgument(format!(
                "a load batch has values for {} parts of {}",
                b.values.len(),
                shape.parts.len()
            )));
        }
        let mut parts = Vec::new();
        for (p, rows) in shape.parts.iter().zip(&b.values) {
            let rel = catalog.relation(&p.relation).ok_or_else(|| {
                Error::InvalidArgument(format!("unknown global relation {}", p.relation))
            })?;
            let rows = decode_rows(p.columns.len(), rows)?;
            if rows.len() != b.origins.len() {
                return Err(Error::InvalidArgument(format!(
                    "{} rows of {} for {} origins",
                    rows.len(),
                    p.relation,
                    b.origins.len()
                )));
            }
            let mut checked = Vec::with_capacity(rows.len());
            for (row, origin) in rows.into_iter().zip(&b.origins) {
                let row = row
                    .into_iter()
                    .zip(&p.columns)
                    .map(|(v, c)| {
                        let a = rel.attribute(c).ok_or_else(|| {
                            Error::InvalidArgument(format!("{} has no attribute {c}", rel.name))
                        })?;
                        a.ty.check(v, &format!("{}.{c}", rel.name))
                            .map_err(|e| Error::InvalidArgument(format!("tuple {origin}: {e}")))
                    })
                    .collect::<Result<Vec<_>>>()?;
                checked.push(row);
            }
            parts.push(checked);
        }
        if b.origins.contains(&0) {
            return Err(Error::InvalidArgument(
                "origin 0 is not a tuple number".into(),
            ));
        }
        Ok(LoadBatch {
            shape,
            origins: b.origins.clone(),
            parts,
        })
    }
}

/// A tuple that was not loaded because its key is taken.
#[derive(Debug, Clone, PartialEq)]
pub struct ConflictRecord {
    /// The global relation whose key clashed.
    pub relation: String,
    /// The site's number of the refused tuple.
    pub origin: u64,
    /// The key values.
    pub key: Vec<Value>,
    /// The site holding the key already.
    pub holder: String,
}

/// What a load batch did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadOutcome {
    /// Tuples appended.
    pub loaded: u64,
    /// Tuples already there from an earlier load (or already recorded as
    /// conflicts).
    pub already_loaded: u64,
    /// Tuples refused because their key is taken.
    pub conflicts: Vec<ConflictRecord>,
}

/// One part of the tuples returned for a table: row *i* of every part
/// belongs to the same local tuple.
#[derive(Debug, Clone, PartialEq)]
pub struct FetchedPart {
    /// Tuple ids; 0 where the part is absent.
    pub tuple_ids: Vec<u64>,
    /// Values of the part's columns; NULLs where absent.
    pub rows: Vec<Vec<Value>>,
}

/// The tuples of one table the site did not hold.
#[derive(Debug, Clone, PartialEq)]
pub struct FetchedTable {
    /// The group of the request.
    pub group: usize,
    /// The table in the group.
    pub table: usize,
    /// Per part of the table's shape.
    pub parts: Vec<FetchedPart>,
    /// The owner of each local tuple.
    pub owners: Vec<SiteNo>,
}

impl FetchedTable {
    /// Number of local tuples returned.
    pub fn len(&self) -> usize {
        self.parts.first().map_or(0, |p| p.tuple_ids.len())
    }

    /// True when nothing is returned.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A global tuple named by a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TupleRef {
    /// The global relation.
    pub relation: String,
    /// How it is named.
    pub id: TupleSel,
}

/// How a request names a tuple.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TupleSel {
    /// By tuple id.
    Id(u64),
    /// By the origin the requesting site exported it with (its own tuples).
    Origin(u64),
}

impl TupleRef {
    /// Decodes a tuple reference.
    pub fn decode(t: &v1::TupleRef) -> Result<TupleRef> {
        let id = match t.id {
            Some(v1::tuple_ref::Id::TupleId(i)) => TupleSel::Id(i),
            Some(v1::tuple_ref::Id::Origin(o)) => TupleSel::Origin(o),
            None => {
                return Err(Error::InvalidArgument(format!(
                    "a tuple of {} is named by neither tuple id nor origin",
                    t.relation
                )));
            }
        };
        Ok(TupleRef {
            relation: t.relation.clone(),
            id,
        })
    }

    /// The wire form.
    pub fn encode(&self) -> v1::TupleRef {
        v1::TupleRef {
            relation: self.relation.clone(),
            id: Some(match self.id {
                TupleSel::Id(i) => v1::tuple_ref::Id::TupleId(i),
                TupleSel::Origin(o) => v1::tuple_ref::Id::Origin(o),
            }),
        }
    }
}

impl std::fmt::Display for TupleRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.id {
            TupleSel::Id(i) => write!(f, "{} tuple {i}", self.relation),
            TupleSel::Origin(o) => write!(f, "{} tuple of origin {o}", self.relation),
        }
    }
}

/// Why a lock was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Another site holds the lock.
    Locked,
    /// The relation is read-only for every site but the owner.
    ReadOnly,
}

/// The answer to a lock request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LockOutcome {
    /// Every tuple is locked by the requesting site.
    Granted,
    /// None is; this one could not be.
    Refused {
        /// The tuple.
        tuple: TupleRef,
        /// Why.
        reason: Refusal,
        /// The site holding the lock, or owning the read-only tuple.
        holder: String,
    },
}

/// Activity of a site not yet written to the store: counted as requests
/// are served and written in batches, so a fetch that finds nothing new
/// writes nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Activity {
    /// Request bytes received from the site.
    pub bytes_received: u64,
    /// Reply bytes sent to it.
    pub bytes_sent: u64,
    /// Unix seconds of its last request.
    pub last_seen: i64,
    /// Fetches served.
    pub fetches: u64,
    /// Tuples sent.
    pub tuples_sent: u64,
    /// Lock requests granted.
    pub locks_granted: u64,
    /// Lock requests refused.
    pub locks_refused: u64,
}

/// One relation in a status report.
#[derive(Debug, Clone, PartialEq)]
pub struct RelationReport {
    /// Name.
    pub name: String,
    /// Mode.
    pub mode: RelationMode,
    /// Tuples held.
    pub tuples: u64,
    /// Tuples locked by some site.
    pub locked: u64,
}

/// One site in a status report.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SiteReport {
    /// Code.
    pub code: String,
    /// Number.
    pub number: u32,
    /// Name.
    pub name: String,
    /// Tuples it owns.
    pub owned_tuples: u64,
    /// Unix seconds of its last request (0: never).
    pub last_seen: i64,
    /// Fetches served.
    pub fetches: u64,
    /// Tuples sent to it.
    pub tuples_sent: u64,
    /// Request bytes received from it.
    pub bytes_received: u64,
    /// Reply bytes sent to it.
    pub bytes_sent: u64,
    /// Lock requests granted.
    pub locks_granted: u64,
    /// Lock requests refused.
    pub locks_refused: u64,
}

/// The controller's state in numbers.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StatusReport {
    /// Per relation.
    pub relations: Vec<RelationReport>,
    /// Per site.
    pub sites: Vec<SiteReport>,
    /// Conflicts awaiting an administrator.
    pub conflicts: u64,
}

/// What the controller keeps. Implementations make each call one
/// transaction and serialise the calls that write.
pub trait GlobalStore: Send + Sync {
    /// Appends a batch of a site's export (chapter 7, "Algorithm to Load the
    /// Global Snapshot"): owned by the site; a tuple loaded before is not
    /// loaded again; a taken key becomes a recorded conflict.
    fn load(&self, site: &SiteId, batch: &LoadBatch) -> Result<LoadOutcome>;

    /// The highest origin of the site's export processed for `relation`.
    fn load_progress(&self, site: &SiteId, relation: &str) -> Result<u64>;

    /// Evaluates a fetch over the global snapshot and the request's
    /// temporary tuples; returns the tuples the site neither owns nor holds,
    /// and records that it holds them.
    fn fetch(&self, site: &SiteId, query: &FetchQuery) -> Result<Vec<FetchedTable>>;

    /// Grants the primary-copy locks on all the tuples or on none.
    fn lock(&self, site: &SiteId, tuples: &[TupleRef]) -> Result<LockOutcome>;

    /// [`GlobalStore::lock`], with the audit record `audit` makes of the
    /// outcome appended in the same transaction (one commit).
    fn lock_audited(
        &self,
        site: &SiteId,
        tuples: &[TupleRef],
        audit: &mut dyn FnMut(&LockOutcome) -> AuditRecord,
    ) -> Result<LockOutcome>;

    /// [`GlobalStore::fetch`], with the audit record `audit` makes of what
    /// it returns appended in the same transaction: nothing leaves
    /// unrecorded, and a fetch costs one commit.
    fn fetch_audited(
        &self,
        site: &SiteId,
        query: &FetchQuery,
        audit: &mut dyn FnMut(&[FetchedTable]) -> AuditRecord,
    ) -> Result<Vec<FetchedTable>>;

    /// The owner (site code) of a tuple of `relation` with each of `keys`
    /// (values of `attributes`, the relation's key), `None` where no tuple
    /// has the key.
    fn key_owners(
        &self,
        relation: &str,
        attributes: &[String],
        keys: &[Vec<Value>],
    ) -> Result<Vec<Option<String>>>;

    /// Releases the site's locks on these tuples; returns how many it held.
    fn unlock(&self, site: &SiteId, tuples: &[TupleRef]) -> Result<u64>;

    /// Records that the site no longer holds copies of these tuples; returns
    /// how many it held.
    fn release_copies(&self, site: &SiteId, tuples: &[TupleRef]) -> Result<u64>;

    /// Adds counted activity of sites.
    fn record_activity(&self, activity: &[(SiteNo, Activity)]) -> Result<()>;

    /// Counters and sizes.
    fn status(&self) -> Result<StatusReport>;

    /// The latest epoch, if the network has had one.
    fn epoch(&self) -> Result<Option<EpochState>>;

    /// Opens the next epoch, waiting for `participants`; refused while the
    /// latest is not closed.
    fn open_epoch(&self, participants: &[SiteNo]) -> Result<EpochState>;

    /// Stages a site's push (the encoded `PushRequest`) for the collecting
    /// epoch, replacing an earlier push of the site for it, and appends its
    /// audit record in the same transaction.
    fn stage_push(&self, site: &SiteId, epoch: u64, body: &[u8], audit: &AuditRecord)
    -> Result<()>;

    /// Commits the staged pushes of a collecting epoch in one transaction:
    /// new tuples appended (key clashes recorded as conflicts), changes of
    /// owners and lock holders applied and logged for the holders, deletes
    /// done, the pushing sites' locks released. Committing an epoch that
    /// is committed already returns its summary.
    fn commit_epoch(&self, epoch: u64) -> Result<CommitSummary>;

    /// Commits one site's push of a single patient (`snaps_sync_patient`)
    /// as an epoch of its own, opened, committed and closed in one
    /// transaction with its audit record: new and changed own tuples only
    /// (`push` carries nothing else), logged for the holders like any
    /// epoch's changes. Unlike a night's commit it releases no lock and
    /// records no committed push: the site pushes the same tuples again at
    /// night, and that push stays the one that clears its flags. Refused
    /// while an epoch is under way. Returns the new epoch, or 0 when the
    /// push changes nothing (no epoch is opened; the audit record is
    /// written all the same).
    fn sync_epoch(
        &self,
        site: &SiteId,
        push: &Push,
        audit: &AuditRecord,
    ) -> Result<(u64, CommitSummary)>;

    /// Leaves a patient's sync ask for a site subscribed to another
    /// controller on the store, which takes it (`take_sync_asks`) and
    /// answers (`answer_sync_ask`); asks older than ten minutes are
    /// dropped.
    fn post_sync_ask(&self, ask: &StoredAsk) -> Result<()>;

    /// The asks left for any of `sites` and not taken yet, now taken.
    fn take_sync_asks(&self, sites: &[SiteNo]) -> Result<Vec<StoredAsk>>;

    /// Records the answer (JSON) to ask `request`.
    fn answer_sync_ask(&self, request: u64, answer: &str) -> Result<()>;

    /// The answer to ask `request` once there (the ask is then dropped).
    fn sync_answer(&self, request: u64) -> Result<Option<String>>;

    /// What changed after epoch `since` for the site, in the given parts
    /// (global relation, columns).
    /// With them, the summaries' changes since `summaries.version`, in the
    /// same view of the global snapshot.
    fn changes(
        &self,
        site: &SiteId,
        since: u64,
        parts: &[(String, Vec<String>)],
        summaries: &SummaryRequest,
    ) -> Result<Changes>;

    /// Records that the site applied the epoch.
    fn acknowledge(&self, site: &SiteId, epoch: u64) -> Result<()>;

    /// Sets the site's sent-to bits to exactly the tuples it holds
    /// (relation → tuple ids); returns the bits added and removed.
    fn resync(&self, site: &SiteId, held: &BTreeMap<String, BTreeSet<u64>>) -> Result<(u64, u64)>;

    /// Closes a distributing epoch.
    fn close_epoch(&self, epoch: u64) -> Result<()>;

    /// The key conflicts awaiting an administrator.
    fn conflicts(&self) -> Result<Vec<ConflictEntry>>;

    /// The access rules.
    fn acl_rules(&self) -> Result<Vec<(Subject, Right)>>;

    /// Sets (or with `None` removes) a rule and appends `audit`, in one
    /// transaction; returns whether the subject had a rule before.
    fn set_acl(&self, subject: &Subject, right: Option<Right>, audit: &AuditRecord)
    -> Result<bool>;

    /// Appends to the audit trail.
    fn append_audit(&self, records: &[AuditRecord]) -> Result<()>;

    /// Reads the audit trail, oldest first.
    fn audit(&self, filter: &AuditFilter) -> Result<Vec<AuditRecord>>;

    /// Adds up to `limit` records not chained yet to the trail's hash
    /// chain, oldest first; how many.
    fn seal_audit(&self, limit: usize) -> Result<u64>;

    /// Walks the trail's hash chain from its first link.
    fn verify_audit(&self) -> Result<AuditVerification>;

    /// Keeps the encoded bodies of join groups under the names `site` gave
    /// them (replacing a body kept under the same name).
    fn remember_groups(&self, site: &SiteId, groups: &[(u64, Vec<u8>)]) -> Result<()>;

    /// The bodies kept for `site` under `names` (those it has), marking
    /// them used; forgets bodies no site named for a long time.
    fn recall_groups(
        &self,
        site: &SiteId,
        names: &[u64],
    ) -> Result<std::collections::HashMap<u64, Vec<u8>>>;

    /// Makes the kept bodies named `added` standing for `site` (its
    /// snapshot definitions fetch them; with `whole`, these and no others)
    /// and `removed` not. Returns the added names no body is kept for
    /// (they stay not standing) and the number standing now.
    fn change_standing(
        &self,
        site: &SiteId,
        added: &[u64],
        removed: &[u64],
        whole: bool,
    ) -> Result<(Vec<u64>, u64)>;

    /// The bodies standing for `site`, by name: what the nightly delta
    /// evaluates for it.
    fn standing_groups(&self, site: &SiteId) -> Result<Vec<(u64, Vec<u8>)>>;

    /// Takes or renews the lease of the refresh coordinator for
    /// `controller` until `now_ms + ttl_ms` (Unix milliseconds). Returns the
    /// other controller holding an unexpired lease, if one does (then
    /// nothing changes).
    fn take_lease(&self, controller: &str, now_ms: i64, ttl_ms: i64) -> Result<Option<String>>;

    /// Gives up the lease if `controller` holds it.
    fn release_lease(&self, controller: &str) -> Result<()>;

    /// Records that `sites` keep a Subscribe stream open to `controller`
    /// at `now_ms`, and none other does.
    fn record_subscribed(&self, controller: &str, sites: &[SiteNo], now_ms: i64) -> Result<()>;

    /// The sites some controller recorded as subscribed at or after
    /// `since_ms`.
    fn subscribed(&self, since_ms: i64) -> Result<Vec<SiteNo>>;

    /// The record of `spec.relation` keyed `key`, and the records of other
    /// sites than its owner's that share a blocking key with it
    /// ([`crate::matching::blocking_keys`]); `None` when no tuple has the
    /// key.
    fn identity_candidates(
        &self,
        spec: &IdentitySpec,
        key: &Value,
    ) -> Result<Option<(IdentityRecord, Vec<IdentityRecord>)>>;

    /// Records that the records of `spec.relation` keyed `key` and `other`
    /// (owned by the site `other` names) are the same person (or, with
    /// `unlink`, that they are not linked any more), confirmed by `user` at
    /// `site`. Returns the link as it stands and whether the call changed
    /// it; a change is on the audit trail (`audit`'s record of it) in the
    /// same transaction. Either record missing is
    /// [`crate::Error::NotFound`]; a record with itself, or another
    /// site's, is [`crate::Error::InvalidArgument`].
    fn link(
        &self,
        spec: &IdentitySpec,
        key: i64,
        other: (i64, &SiteId),
        by: (&SiteId, &str),
        unlink: bool,
        audit: &mut dyn FnMut(&IdentityLink) -> AuditRecord,
    ) -> Result<(IdentityLink, bool)>;

    /// The links made or removed since version `since` (all standing ones,
    /// `whole`, when the store no longer knows that version).
    fn links_since(&self, since: u64) -> Result<LinkChanges>;
}

/// A confirmed link between two records of the relation of people
/// (`[identity]` of network.toml): `key` is the lesser key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityLink {
    /// One record's key.
    pub key: i64,
    /// The site that owns it.
    pub owner: SiteNo,
    /// The other record's key.
    pub other_key: i64,
    /// The site that owns the other record.
    pub other_owner: SiteNo,
    /// The link was removed.
    pub removed: bool,
}

/// The links' changes for a site.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LinkChanges {
    /// The version after these changes (0: no link was ever made).
    pub version: u64,
    /// Every standing link, not changes: the site drops what it held.
    pub whole: bool,
    /// The links (removed ones too, unless whole).
    pub links: Vec<IdentityLink>,
}

/// What a walk of the audit trail's hash chain found.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AuditVerification {
    /// Records whose link follows from the one before, up to the first
    /// break.
    pub chained: u64,
    /// Records not chained yet (appended since the last seal).
    pub unchained: u64,
    /// The first break.
    pub broken: Option<BrokenRecord>,
}

/// Where the audit trail's hash chain breaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokenRecord {
    /// The link's place in the chain (from 1).
    pub seq: u64,
    /// The record's number.
    pub id: u64,
    /// What is wrong.
    pub reason: String,
}

/// One record of the relation of people, for matching.
#[derive(Debug, Clone, PartialEq)]
pub struct IdentityRecord {
    /// The site that owns it.
    pub owner: SiteNo,
    /// Its key.
    pub key: Value,
    /// Its identifying details.
    pub person: crate::matching::Person,
    /// A user linked it with the record asked about.
    pub linked: bool,
}

/// A phase of a refresh epoch (DESIGN.md, "The nightly refresh").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Sites evict, then push their changes.
    Collect,
    /// The pushes are committed; sites apply what changed and re-run their
    /// snapshot definitions.
    Distribute,
    /// Done.
    Closed,
}

impl Phase {
    /// The name kept in the store.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Collect => "collect",
            Phase::Distribute => "distribute",
            Phase::Closed => "closed",
        }
    }

    /// The phase a stored name stands for.
    pub fn from_name(name: &str) -> Result<Phase> {
        match name {
            "collect" => Ok(Phase::Collect),
            "distribute" => Ok(Phase::Distribute),
            "closed" => Ok(Phase::Closed),
            other => Err(Error::Internal(format!("unknown epoch phase {other:?}"))),
        }
    }
}

/// Where an epoch stands, as the store records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpochState {
    /// The epoch's number (from 1).
    pub epoch: u64,
    /// Its phase.
    pub phase: Phase,
    /// The sites connected when it opened: the ones it waits for.
    pub participants: Vec<SiteNo>,
    /// Sites whose push for it is staged (or was committed).
    pub pushed: Vec<SiteNo>,
    /// Sites that acknowledged it.
    pub acked: Vec<SiteNo>,
    /// Unix seconds it opened at.
    pub opened_at: i64,
}

/// Copies a site changed under the lock, in one global relation.
#[derive(Debug, Clone, PartialEq)]
pub struct CopyUpdate {
    /// The global relation.
    pub relation: String,
    /// The columns given.
    pub columns: Vec<String>,
    /// The tuples, by id.
    pub tuple_ids: Vec<u64>,
    /// Per tuple, the new values of `columns`.
    pub rows: Vec<Vec<Value>>,
}

/// A site's own exported tuples it deleted.
#[derive(Debug, Clone, PartialEq)]
pub struct OwnDeletes {
    /// The global relations of the tuples' parts.
    pub relations: Vec<String>,
    /// The tuples' origins.
    pub origins: Vec<u64>,
}

/// A site's push for an epoch, checked against the catalog.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Push {
    /// New own tuples.
    pub inserted: Vec<LoadBatch>,
    /// Changed own tuples, by origin.
    pub updated: Vec<LoadBatch>,
    /// Changed copies, by tuple id.
    pub copies: Vec<CopyUpdate>,
    /// Deleted own tuples.
    pub deleted: Vec<OwnDeletes>,
    /// Attributes no longer mapped by the site: (relation, columns).
    pub withdrawn: Vec<(String, Vec<String>)>,
}

impl Push {
    /// Decodes a push and checks every relation, attribute and value.
    pub fn decode(p: &v1::PushRequest, catalog: &Catalog) -> Result<Push> {
        let batches = |bs: &[v1::LoadBatch]| {
            bs.iter()
                .map(|b| LoadBatch::decode(b, catalog))
                .collect::<Result<Vec<_>>>()
        };
        let mut copies = Vec::new();
        for c in &p.copies {
            let rel = catalog.relation(&c.relation).ok_or_else(|| {
                Error::InvalidArgument(format!("unknown global relation {:?}", c.relation))
            })?;
            let rows = decode_rows(c.columns.len(), &c.values.clone().unwrap_or_default())?;
            if rows.len() != c.tuple_ids.len() {
                return Err(Error::InvalidArgument(format!(
                    "{} rows of {} for {} tuple ids",
                    rows.len(),
                    rel.name,
                    c.tuple_ids.len()
                )));
            }
            let mut checked = Vec::with_capacity(rows.len());
            for row in rows {
                checked.push(
                    row.into_iter()
                        .zip(&c.columns)
                        .map(|(v, col)| {
                            let a = rel.attribute(col).ok_or_else(|| {
                                Error::InvalidArgument(format!(
                                    "{} has no attribute {col}",
                                    rel.name
                                ))
                            })?;
                            a.ty.check(v, &format!("{}.{col}", rel.name))
                                .map_err(|e| Error::InvalidArgument(e.to_string()))
                        })
                        .collect::<Result<Vec<_>>>()?,
                );
            }
            copies.push(CopyUpdate {
                relation: rel.name.clone(),
                columns: c.columns.clone(),
                tuple_ids: c.tuple_ids.clone(),
                rows: checked,
            });
        }
        let mut deleted = Vec::new();
        for d in &p.deleted {
            for r in &d.relations {
                if catalog.relation(r).is_none() {
                    return Err(Error::InvalidArgument(format!(
                        "unknown global relation {r:?}"
                    )));
                }
            }
            deleted.push(OwnDeletes {
                relations: d.relations.clone(),
                origins: d.origins.clone(),
            });
        }
        let mut withdrawn = Vec::new();
        for w in &p.withdrawn {
            let rel = catalog.relation(&w.relation).ok_or_else(|| {
                Error::InvalidArgument(format!("unknown global relation {:?}", w.relation))
            })?;
            for c in &w.columns {
                if rel.attribute(c).is_none() {
                    return Err(Error::InvalidArgument(format!(
                        "{} has no attribute {c}",
                        rel.name
                    )));
                }
                if rel.key.contains(c) {
                    return Err(Error::InvalidArgument(format!(
                        "{}.{c} is a key attribute: it cannot be withdrawn",
                        rel.name
                    )));
                }
            }
            withdrawn.push((rel.name.clone(), w.columns.clone()));
        }
        Ok(Push {
            withdrawn,
            inserted: batches(&p.inserted)?,
            updated: batches(&p.updated)?,
            copies,
            deleted,
        })
    }

    /// The number of tuples pushed.
    pub fn len(&self) -> usize {
        let origins = |bs: &[LoadBatch]| bs.iter().map(|b| b.origins.len()).sum::<usize>();
        origins(&self.inserted)
            + origins(&self.updated)
            + self.copies.iter().map(|c| c.tuple_ids.len()).sum::<usize>()
            + self.deleted.iter().map(|d| d.origins.len()).sum::<usize>()
    }

    /// True when the push carries a withdrawal of attributes.
    pub fn withdraws(&self) -> bool {
        !self.withdrawn.is_empty()
    }

    /// True when the site had nothing to push.
    pub fn is_empty(&self) -> bool {
        self.len() == 0 && !self.withdraws()
    }
}

/// What committing an epoch did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CommitSummary {
    /// Sites whose pushes were committed.
    pub pushed_by: Vec<String>,
    /// Tuples in those pushes.
    pub tuples_pushed: u64,
    /// New tuples appended.
    pub inserted: u64,
    /// Tuples changed (by owners and lock holders).
    pub updated: u64,
    /// Own tuples deleted by their owners.
    pub deleted: u64,
    /// New tuples refused because their key belongs to another site.
    pub conflicts: u64,
    /// Tuples removed from the sites holding them (propagated deletes).
    pub removed: u64,
    /// Changes of copies refused because the pushing site did not hold
    /// the lock (logged).
    pub refused: u64,
    /// Tuples whose withdrawn attributes were set NULL.
    pub withdrawn: u64,
}

/// A patient's sync ask left in the store for another controller.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredAsk {
    /// Its number, unique across the store's controllers.
    pub request: u64,
    /// The site asked.
    pub site: SiteNo,
    /// The encoded `SyncAsk`.
    pub ask: Vec<u8>,
    /// The audit record its commit writes.
    pub audit: AuditRecord,
}

/// New versions of one part's tuples for a site.
#[derive(Debug, Clone, PartialEq)]
pub struct ChangedPart {
    /// The global relation.
    pub relation: String,
    /// The columns asked for.
    pub columns: Vec<String>,
    /// The tuples.
    pub tuple_ids: Vec<u64>,
    /// The site's own number of a tuple it owns, else 0.
    pub origins: Vec<u64>,
    /// Per tuple, the values of `columns`.
    pub rows: Vec<Vec<Value>>,
}

/// What changed for a site since the epoch it last applied.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Changes {
    /// The last committed epoch.
    pub epoch: u64,
    /// The last epoch whose push from the site was committed.
    pub committed_push: u64,
    /// New versions.
    pub changed: Vec<ChangedPart>,
    /// Removed tuples the site held: global relation → tuple ids.
    pub removed: Vec<(String, Vec<u64>)>,
    /// The summaries' version after this reply (0: none are sent).
    pub summary_version: u64,
    /// The summaries are sent whole (the site forgets what it held).
    pub summaries_whole: bool,
    /// The summaries that changed (all of them when whole).
    pub summaries: Vec<SummaryDelta>,
}

/// The summaries a site may be told of, with `changes`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SummaryRequest {
    /// The version the site holds (0: none).
    pub version: u64,
    /// The summaries it may receive (the access rules let it read their
    /// relations), each key summary with the site's range for it.
    pub specs: Vec<(SummarySpec, Option<KeyRange>)>,
}

/// One summary's change for a site.
#[derive(Debug, Clone, PartialEq)]
pub struct SummaryDelta {
    /// Which summary.
    pub spec: SummarySpec,
    /// The site's range, for a key summary.
    pub range: Option<KeyRange>,
    /// Items now in the set (key summaries: value − range start;
    /// lookups: fingerprints), sorted.
    pub added: Vec<u64>,
    /// Items no longer in it, sorted.
    pub removed: Vec<u64>,
}

/// A recorded key conflict.
#[derive(Debug, Clone, PartialEq)]
pub struct ConflictEntry {
    /// Its number.
    pub id: u64,
    /// The site whose tuple was refused.
    pub site: String,
    /// The global relation.
    pub relation: String,
    /// The tuple's origin at that site.
    pub origin: u64,
    /// The key values.
    pub key: Vec<Value>,
    /// The site owning the key.
    pub holder: String,
    /// Unix seconds.
    pub recorded_at: i64,
    /// The refused tuple as JSON.
    pub tuple: String,
}
