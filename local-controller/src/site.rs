//! A site at work: the query path of chapter 7 ("Algorithm to Perform a
//! Local Query") behind the [`Engine`] interface the SQL endpoint serves.
//!
//! For a retrieval: parse (SQL or QUEL) → plan (decompose and map) →
//! *performed?* (an earlier snapshot covers every join group: answer
//! locally) → fetch the uncovered groups in one round trip with the
//! semi-join projections of the site's new and modified tuples → store what
//! comes back as a snapshot in one transaction (definition, tuples with
//! status *snapshot*, memberships, copies) → run the statement on the site's
//! database. When the global controller cannot be reached the answer comes
//! from local data with a notice saying so.
//!
//! Everything SNAPS does not manage — relations the mapping does not name,
//! DDL, PRAGMAs, transactions — goes to SQLite unchanged.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rusqlite::fallible_iterator::FallibleIterator;
use rusqlite::{Batch, Connection, OpenFlags, OptionalExtension, params};
use snaps_mapping::ir::{Delete, Insert, Range, Select, Statement, Update};
use snaps_mapping::performed::{Coverage, SnapshotDefinition, key_pinned, performed};
use snaps_mapping::quel::{QuelSession, looks_like_quel};
use snaps_mapping::rewrite::{Plan, plan};
use snaps_mapping::{Language, SiteMapping};
use snaps_proto::{fetch_request, v1};
use snaps_schema::include::IncludeEdge;
use snaps_schema::{Catalog, LocalRights, LocalStatus, SnapshotNo, TupleType, Value};

use crate::covered::{CoveredReads, Definitions, Stamp};
use crate::engine::{Answer, ColumnKind, Engine, EngineError, Outcome, ResultColumn, Session};
use crate::identity::What;
use crate::include::Include;
use crate::remote::{GlobalClient, LocalTuples, export_batches, map_back, semijoin};
use crate::store::{CHANGED_BITS, NEW_BIT, STATUS_COLUMN, read_tuples};
use crate::value::to_sqlite;
use crate::write::{KeyCheck, register_next_key};
use crate::{Error, Result};

/// Appendix-A tuple-type bit: set on snapshot tuples.
const SNAPSHOT_BIT: u8 = 0x80;
/// The notice a local-only answer carries.
pub const LOCAL_ONLY_NOTICE: &str = "the global snapshot controller is unreachable: \
     this answer comes from this site's data only and may miss tuples recorded at other sites";
/// The tables an administrator edits the site's mapping in.
const MAPPING_TABLES: &[&str] = &["snaps_mapping", "snaps_mapping_qualification"];
/// The notice of a mapping edit.
pub const MAPPING_EDIT_NOTICE: &str =
    "the mapping change is recorded: it takes effect at the next refresh epoch";

/// Whether SQL text SNAPS could not parse writes a mapping table.
fn writes_mapping_tables(lower: &str) -> bool {
    lower.contains("snaps_mapping")
        && ["insert", "update", "delete", "replace", "drop", "alter"]
            .iter()
            .any(|w| lower.contains(w))
}

/// The notice of an answer given while a refresh epoch collects.
pub const REFRESHING_NOTICE: &str = "a refresh of the global snapshot is in progress: \
     this answer comes from this site's data only and may miss tuples recorded at other sites";
/// Snapshots unused this many days are evicted unless a site says otherwise.
pub const DEFAULT_MAX_DAYS: u32 = 30;
/// `snaps_meta` key set once the initial export is loaded.
const INITIAL_LOAD_DONE: &str = "initial_load_done";
/// `snaps_meta` key set when a fetch's reply may have been lost.
const UNCERTAIN: &str = "sent_to_uncertain";
/// `snaps_meta` key of the include trees the controller last sent (JSON).
const INCLUDES: &str = "include_edges";

/// The current semi-join projections of a plan: per variable, the join
/// values of the site's new and modified tuples.
pub(crate) type Projections = BTreeMap<String, Vec<Vec<Value>>>;

/// How a site reaches the global controller.
#[derive(Debug, Clone)]
pub struct GlobalLink {
    /// `https://host:port` (`http://` in plain-text mode).
    pub addr: String,
    /// Further controllers of the network (on the same store), tried in
    /// order when `addr` cannot be reached.
    pub fallbacks: Vec<String>,
    /// How the site proves who it is.
    pub auth: crate::remote::Auth,
    /// Whether the connection is compressed (off only to inspect the traffic of
    /// a plain-text development network).
    pub compress: bool,
    /// How long a fetch may take before the answer is given from local data.
    pub fetch_timeout: Duration,
    /// After the controller could not be reached, how long queries answer
    /// from local data at once instead of trying again (a radiologist should
    /// not wait for a connect timeout on every query while the link is down).
    pub retry_after: Duration,
}

/// A site's shared state: its catalog and mapping, the connection snapshots
/// are stored through, the snapshot definitions, the link to the global
/// controller.
pub struct Site {
    path: PathBuf,
    code: String,
    pub(crate) catalog: Catalog,
    mapped: BTreeSet<String>,
    /// The mapping in effect (an administrator's edit of the mapping tables
    /// takes effect at the next refresh epoch).
    active: RwLock<Arc<Active>>,
    /// The global schema.
    pub(crate) global: Catalog,
    global_fingerprint: String,
    writer: Mutex<Connection>,
    pub(crate) definitions: Definitions,
    pub(crate) link: Option<GlobalLink>,
    client: tokio::sync::Mutex<Option<GlobalClient>>,
    /// When connecting last failed.
    unreachable_since: Mutex<Option<std::time::Instant>>,
    /// The `snaps_meta` uncertain flag, read once at open: every fetch
    /// consults it.
    pub(crate) uncertain: std::sync::atomic::AtomicBool,
    pub(crate) runtime: tokio::runtime::Handle,
    /// Snapshots unused for this many days are evicted at the refresh.
    pub(crate) max_days: std::sync::atomic::AtomicU32,
    /// Where a test asked the refresh to stop, as a crash would.
    pub(crate) halt: Mutex<Option<crate::refresh::Halt>>,
    /// Whether the Subscribe stream to the global controller is open.
    pub(crate) subscribed: std::sync::atomic::AtomicBool,
    /// Reads answered on a remembered covered verdict since open.
    repeated_reads: std::sync::atomic::AtomicU64,
    /// Join groups left out of a fetch because the summaries proved them
    /// empty, since open.
    summary_answers: std::sync::atomic::AtomicU64,
    /// Held while the site applies an epoch: the Subscribe stream's
    /// notices and a patient's sync take turns.
    pub(crate) epoch_steps: Mutex<()>,
    /// The network's include trees as the controller last said (kept in
    /// `snaps_meta` for the fetches before the next connect).
    includes: RwLock<Arc<Vec<IncludeEdge>>>,
    /// The network's relation of people, when the site may read it (kept
    /// in `snaps_meta` like the include trees).
    identity: RwLock<Option<Arc<crate::links::Identity>>>,
    /// The names given to fetched join groups' bodies.
    pub(crate) kept: crate::kept::KeptNames,
}

fn open_conn(path: &Path) -> Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(Duration::from_secs(10))?;
    Ok(conn)
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<String> {
    serde_json::to_string(value).map_err(|e| Error::Invalid(e.to_string()))
}

pub(crate) fn today() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64 / 86_400)
}

impl Site {
    /// Opens the site database at `path` (made by [`crate::SiteStore::create`]),
    /// with the global schema `global` its mapping refers to. Must be called
    /// inside a tokio runtime: fetches run on it.
    pub fn open(path: &Path, global: &Catalog, link: Option<GlobalLink>) -> Result<Arc<Site>> {
        let store = crate::SiteStore::open(path)?;
        let code = store.site_code()?;
        let catalog = store.catalog().clone();
        let mapped: BTreeSet<String> = catalog
            .relations()
            .filter(|r| store.is_mapped(&r.name))
            .map(|r| r.name.clone())
            .collect();
        drop(store);
        let writer = open_conn(path)?;
        // Databases made before the index existed get it now.
        for r in &mapped {
            writer.execute_batch(&crate::store::changed_index(r))?;
        }
        let active = crate::mapping_admin::MappingRows::active(&writer)?;
        // Edits of the tables wait for the next epoch: remember what is in
        // effect now.
        active.make_active(&writer)?;
        let mapping = active.mapping(&catalog, global)?;
        crate::store::upgrade_triggers(&writer, &mapping)?;
        let definitions = read_definitions(&writer)?;
        let uncertain: bool = writer.query_row(
            "SELECT EXISTS (SELECT 1 FROM snaps_meta WHERE key = ?1)",
            [UNCERTAIN],
            |r| r.get(0),
        )?;
        let includes: Vec<IncludeEdge> = match writer
            .query_row(
                "SELECT value FROM snaps_meta WHERE key = ?1",
                [INCLUDES],
                |r| r.get::<_, String>(0),
            )
            .optional()?
        {
            Some(json) => serde_json::from_str(&json)
                .map_err(|e| Error::Invalid(format!("snaps_meta {INCLUDES} is unreadable: {e}")))?,
            None => Vec::new(),
        };
        let kept = crate::kept::KeptNames::read(&writer)?;
        let identity = crate::links::Identity::read(&writer)?.map(Arc::new);
        let active = Active::new(mapping, global);
        Ok(Arc::new(Site {
            kept,
            identity: RwLock::new(identity),
            includes: RwLock::new(Arc::new(includes)),
            path: path.to_path_buf(),
            code,
            catalog,
            mapped,
            active: RwLock::new(Arc::new(active)),
            global: global.clone(),
            global_fingerprint: global.fingerprint(),
            writer: Mutex::new(writer),
            definitions: Definitions::new(definitions),
            link,
            client: tokio::sync::Mutex::new(None),
            unreachable_since: Mutex::new(None),
            uncertain: std::sync::atomic::AtomicBool::new(uncertain),
            runtime: tokio::runtime::Handle::current(),
            max_days: std::sync::atomic::AtomicU32::new(DEFAULT_MAX_DAYS),
            halt: Mutex::new(None),
            subscribed: std::sync::atomic::AtomicBool::new(false),
            repeated_reads: std::sync::atomic::AtomicU64::new(0),
            summary_answers: std::sync::atomic::AtomicU64::new(0),
            epoch_steps: Mutex::new(()),
        }))
    }

    /// How many reads since open were answered on a verdict remembered from
    /// an earlier *performed* check of the same text (nothing it was drawn
    /// from having changed), without parsing or planning them again.
    pub fn repeated_reads(&self) -> u64 {
        self.repeated_reads
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// How many join groups since open needed no fetch because the
    /// summaries proved that no other site holds anything they select.
    pub fn summary_answers(&self) -> u64 {
        self.summary_answers
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The mapping in effect.
    pub(crate) fn mapping(&self) -> Arc<Active> {
        self.active
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Puts a new mapping into effect (at a refresh epoch).
    pub(crate) fn set_mapping(&self, mapping: SiteMapping, global: &Catalog) {
        *self.active.write().unwrap_or_else(|p| p.into_inner()) =
            Arc::new(Active::new(mapping, global));
    }

    /// The site's code.
    pub fn code(&self) -> &str {
        &self.code
    }

    /// Evicts snapshots unused for `days` days at each refresh (default
    /// [`DEFAULT_MAX_DAYS`]).
    pub fn set_max_days(&self, days: u32) {
        self.max_days
            .store(days, std::sync::atomic::Ordering::Relaxed);
    }

    /// Bytes sent and received on the current connection to the global
    /// controller, at the socket (0 when not connected).
    pub fn wire_bytes(&self) -> u64 {
        self.runtime.block_on(async {
            self.client
                .lock()
                .await
                .as_ref()
                .map_or(0, |c| c.counters().sent() + c.counters().received())
        })
    }

    /// The site's database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A `snaps_stats` counter (read on a connection of its own, so it
    /// never waits for the site's writer).
    pub fn counter(&self, name: &str) -> Result<i64> {
        crate::store::counter(&open_conn(&self.path)?, name)
    }

    /// Refuses a change to a shared relation while a refresh epoch holds
    /// the site's data still.
    pub(crate) fn not_refreshing(&self, conn: &Connection) -> Result<()> {
        let epoch: Option<String> = conn
            .query_row(
                "SELECT value FROM snaps_meta WHERE key = 'refreshing'",
                [],
                |r| r.get(0),
            )
            .optional()?;
        match epoch {
            None => Ok(()),
            Some(e) => Err(Error::Busy(format!(
                "refresh epoch {e} is under way: changes to shared relations wait until it is done; \
                 try again in a moment"
            ))),
        }
    }

    pub(crate) fn writer(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The connected client, connecting (and saying hello) if needed.
    pub(crate) async fn client(&self) -> Result<GlobalClient> {
        let link = self.link.as_ref().ok_or_else(|| {
            Error::Unreachable("this site has no global controller configured".into())
        })?;
        let mut slot = self.client.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let failed = *self
            .unreachable_since
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(at) = failed
            && at.elapsed() < link.retry_after
        {
            return Err(Error::Unreachable(format!(
                "{} did not answer {} s ago; trying again after {} s",
                link.addr,
                at.elapsed().as_secs(),
                link.retry_after.as_secs()
            )));
        }
        // The first controller first, then the others in order: a site goes
        // back to its own controller as soon as it answers again.
        let mut connected = Err(Error::Unreachable(
            "no global controller is configured".into(),
        ));
        for (i, addr) in std::iter::once(&link.addr)
            .chain(&link.fallbacks)
            .enumerate()
        {
            connected = async {
                let c =
                    GlobalClient::connect_with(addr, &link.auth, Some(&self.code), link.compress)
                        .await?;
                let hello = c.hello(&self.global_fingerprint).await?;
                Ok::<_, Error>((c, hello))
            }
            .await;
            match &connected {
                Ok(_) if i > 0 => {
                    tracing::warn!(controller = %addr, "connected to a fallback global controller");
                    break;
                }
                Ok(_) => break,
                Err(e) if i < link.fallbacks.len() => {
                    tracing::warn!(controller = %addr, error = %e, "global controller unreachable; trying the next");
                }
                Err(_) => {}
            }
        }
        *self
            .unreachable_since
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = connected.is_err().then(std::time::Instant::now);
        let (c, hello) = connected?;
        if hello.site_code != self.code {
            return Err(Error::Invalid(format!(
                "the credential belongs to site {}, this database to site {}",
                hello.site_code, self.code
            )));
        }
        self.record_hello(&hello)?;
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Keeps what the controller says at every connect — which relations
    /// other sites may change under lock, the site's key ranges, the
    /// network's sites — so the update rules hold offline and for programs
    /// writing to the file directly (the triggers read these tables).
    fn record_hello(&self, hello: &snaps_proto::v1::HelloReply) -> Result<()> {
        use snaps_proto::v1::RelationMode;
        let mut conn = self.writer();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        tx.execute_batch(
            "DELETE FROM snaps_relation_mode; DELETE FROM snaps_key_range; DELETE FROM snaps_network_site;",
        )?;
        for rm in self.mapping().relations() {
            let read_write = rm.parts.iter().any(|p| {
                hello.modes.get(&p.global).copied() == Some(RelationMode::ReadWrite as i32)
            });
            tx.execute(
                "INSERT INTO snaps_relation_mode (relation, read_write) VALUES (?1, ?2)",
                params![rm.local.name, read_write],
            )?;
        }
        let ranges = hello
            .keys
            .iter()
            .map(|r| ("", r))
            .chain(hello.key_ranges.iter().map(|(k, r)| (k.as_str(), r)));
        for (relation, r) in ranges {
            tx.execute(
                "INSERT INTO snaps_key_range (relation, first, last) VALUES (?1, ?2, ?3)",
                params![relation, r.first, r.last],
            )?;
        }
        for site in &hello.sites {
            tx.execute(
                "INSERT INTO snaps_network_site (number, code) VALUES (?1, ?2)",
                params![site.number, site.code],
            )?;
        }
        let includes: Vec<IncludeEdge> = hello
            .includes
            .iter()
            .map(|e| IncludeEdge {
                parent: e.parent.clone(),
                parent_attribute: e.parent_attribute.clone(),
                child: e.child.clone(),
                child_attribute: e.child_attribute.clone(),
            })
            .collect();
        tx.execute(
            "INSERT OR REPLACE INTO snaps_meta (key, value) VALUES (?1, ?2)",
            params![INCLUDES, to_json(&includes)?],
        )?;
        let identity = crate::links::Identity::from_hello(hello);
        crate::links::Identity::store(&tx, identity.as_ref())?;
        tx.commit()?;
        *self.includes.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(includes);
        *self.identity.write().unwrap_or_else(|p| p.into_inner()) = identity.map(Arc::new);
        Ok(())
    }

    /// The network's relation of people, if the site may read it.
    pub(crate) fn identity(&self) -> Option<Arc<crate::links::Identity>> {
        self.identity
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(crate) async fn forget_client(&self) {
        *self.client.lock().await = None;
    }

    /// Runs one request on the global controller within the fetch timeout.
    /// A connection that failed or timed out is dropped (the next request
    /// connects again); an error is `Unreachable` unless the controller
    /// answered with one.
    pub(crate) fn remote<T, F, Fut>(&self, request: F) -> Result<T>
    where
        F: FnOnce(GlobalClient) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let timeout = self
            .link
            .as_ref()
            .map_or(Duration::from_secs(10), |l| l.fetch_timeout);
        self.remote_within(timeout, request)
    }

    /// [`Site::remote`] with its own timeout.
    pub(crate) fn remote_within<T, F, Fut>(&self, timeout: Duration, request: F) -> Result<T>
    where
        F: FnOnce(GlobalClient) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        self.runtime.block_on(async {
            let client = self.client().await?;
            match tokio::time::timeout(timeout, request(client)).await {
                Ok(Ok(r)) => Ok(r),
                Ok(Err(e @ Error::Remote(_))) if is_request_error(&e) => Err(e),
                Ok(Err(e)) => {
                    self.forget_client().await;
                    Err(e)
                }
                Err(_) => {
                    self.forget_client().await;
                    Err(Error::Unreachable(format!("no reply within {timeout:?}")))
                }
            }
        })
    }

    /// Whether other sites may change `relation`'s tuples under lock, as
    /// the global controller said at the last connect.
    pub(crate) fn read_write(&self, conn: &Connection, relation: &str) -> Result<bool> {
        let rw: Option<bool> = conn
            .query_row(
                "SELECT read_write FROM snaps_relation_mode WHERE relation = ?1",
                [relation],
                |r| r.get(0),
            )
            .optional()?;
        rw.ok_or_else(|| {
            Error::Unreachable(format!(
                "this site has not reached the global controller yet, so it does not know                  whether other sites may change {relation}"
            ))
        })
    }

    /// Registers with the global controller and loads the site's export,
    /// once: a load broken off is resumed where the controller says it got
    /// to. Returns the number of tuples loaded now.
    pub async fn initial_load(&self) -> Result<u64> {
        if self.meta(INITIAL_LOAD_DONE)?.is_some() {
            return Ok(0);
        }
        let client = self.client().await?;
        let mut loaded = 0;
        // Per relation, the last rowid exported: those tuples are no longer
        // new once the load is done.
        let mut exported: Vec<(&str, i64)> = Vec::new();
        let mapping = self.mapping();
        for rm in mapping.relations() {
            let main = match rm.split {
                snaps_mapping::mapping::Split::MainTupleId(m) => m,
                _ => 0,
            };
            let from = client.load_progress(&rm.parts[main].global).await?;
            let tuples = self.own_tuples(&rm.local.name, from)?;
            let last = tuples.last().map_or(from as i64, |(o, _)| *o as i64);
            exported.push((rm.local.name.as_str(), last));
            for chunk in tuples.chunks(20_000) {
                let reply = client.load(export_batches(rm, chunk, 5_000)?).await?;
                loaded += reply.loaded;
                for c in &reply.conflicts {
                    tracing::warn!(site = %self.code, relation = %c.relation, origin = c.origin,
                        holder = %c.holder_site, "not loaded: the key belongs to another site");
                }
            }
        }
        // The global snapshot holds them now: own tuples, rights unknown
        // (a relation other sites may change needs the lock from here on).
        let settled = LocalStatus {
            tuple_type: TupleType::Local,
            rights: LocalRights::Unknown,
            new: false,
            modified: false,
            just_copied: 0,
        }
        .to_byte()?;
        let mut conn = self.writer();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        for (relation, last) in exported {
            tx.execute(
                &format!(
                    "UPDATE {} SET {STATUS_COLUMN} = ?1 WHERE rowid <= ?2 AND ({STATUS_COLUMN} & {SNAPSHOT_BIT}) = 0",
                    snaps_schema::sql_ident(relation)
                ),
                params![settled, last],
            )?;
        }
        tx.execute(
            "INSERT OR REPLACE INTO snaps_meta (key, value) VALUES (?1, '1')",
            [INITIAL_LOAD_DONE],
        )?;
        tx.commit()?;
        tracing::info!(site = %self.code, loaded, "initial load done");
        Ok(loaded)
    }

    /// The site's own tuples of a relation after rowid `from`, numbered by
    /// rowid (their origin at the global controller).
    fn own_tuples(&self, relation: &str, from: u64) -> Result<Vec<(u64, Vec<Value>)>> {
        let rel = self
            .catalog
            .relation(relation)
            .ok_or_else(|| Error::Invalid(format!("no relation {relation}")))?;
        let own = format!("({STATUS_COLUMN} & {SNAPSHOT_BIT}) = 0");
        Ok(read_tuples(&self.writer(), rel, &own, from as i64)?
            .into_iter()
            .map(|(rowid, t)| (rowid as u64, t))
            .collect())
    }

    fn meta(&self, key: &str) -> Result<Option<String>> {
        Ok(self
            .writer()
            .query_row("SELECT value FROM snaps_meta WHERE key = ?1", [key], |r| {
                r.get(0)
            })
            .optional()?)
    }

    pub(crate) fn bump(conn: &Connection, counters: &[(&str, i64)]) -> Result<()> {
        for (name, by) in counters {
            conn.execute(
                "UPDATE snaps_stats SET value = value + ?1 WHERE name = ?2",
                params![by, name],
            )?;
        }
        Ok(())
    }

    /// Fetches the plan's groups and stores the reply as a snapshot (a new
    /// one, or more tuples of `retrieval.into`). Returns `LocalOnly` when
    /// the global controller could not be asked (the caller answers from
    /// local data).
    pub(crate) fn fetch(
        &self,
        conn: &Connection,
        plan: &Plan,
        current: &Projections,
        retrieval: &Retrieval<'_>,
    ) -> Result<Fetched> {
        let Some(req) = self.request_for(conn, plan, current, retrieval.user)? else {
            return Ok(Fetched::Nothing);
        };
        match self.send_fetch(req)? {
            Ok((reply, sent, received)) => {
                self.store_reply(conn, plan, current, retrieval, &reply, sent, received)
            }
            Err(notice) => Ok(Fetched::LocalOnly(notice)),
        }
    }

    /// Fetches several plans in one request — their join groups one after
    /// another, the reply split back by group — and stores each reply as
    /// its plan's snapshot: the refresh re-runs every definition this way,
    /// so a night costs one round trip and one compressed message per batch
    /// instead of one per definition.
    pub(crate) fn fetch_together(
        &self,
        conn: &Connection,
        items: &[(&Plan, &Projections, &Retrieval<'_>)],
    ) -> Result<Vec<Fetched>> {
        let requests = items
            .iter()
            .map(|(plan, current, retrieval)| self.request_for(conn, plan, current, retrieval.user))
            .collect::<Result<Vec<_>>>()?;
        let (parts, sent, received) = match self.send_together(conn, requests, true)? {
            Together::Replies(parts, sent, received) => (parts, sent, received),
            Together::Nothing => return Ok(items.iter().map(|_| Fetched::Nothing).collect()),
            Together::LocalOnly(notice) => {
                return Ok(items.iter().map(|_| Fetched::LocalOnly(notice)).collect());
            }
        };
        // The counters count the batch once; each snapshot gets its share.
        let asked = parts.iter().flatten().count().max(1) as u64;
        let mut out = Vec::with_capacity(items.len());
        for ((plan, current, retrieval), part) in items.iter().zip(&parts) {
            let Some(part) = part else {
                out.push(Fetched::Nothing);
                continue;
            };
            out.push(self.store_reply(
                conn,
                plan,
                current,
                retrieval,
                part,
                sent / asked,
                received / asked,
            )?);
        }
        Ok(out)
    }

    /// Sends several requests as one — their join groups one after
    /// another — and splits the reply back by request (`None` where a
    /// request was `None`), with the wire bytes of the whole exchange.
    /// `by_name`: the groups go by name alone (what the refresh re-runs was
    /// fetched before, and the controller kept it), with their bodies only
    /// if the controller no longer has one.
    fn send_together(
        &self,
        conn: &Connection,
        requests: Vec<Option<v1::FetchRequest>>,
        by_name: bool,
    ) -> Result<Together> {
        let mut combined = v1::FetchRequest::default();
        let mut ranges = Vec::with_capacity(requests.len());
        for req in requests {
            let Some(req) = req else {
                ranges.push(None);
                continue;
            };
            let offset = combined.groups.len() as u32;
            ranges.push(Some((offset, req.groups.len() as u32)));
            combined.groups.extend(req.groups);
            combined
                .semijoins
                .extend(req.semijoins.into_iter().map(|mut sj| {
                    sj.group += offset;
                    sj
                }));
            combined.include_held |= req.include_held;
            combined.user = req.user;
        }
        if combined.groups.is_empty() {
            return Ok(Together::Nothing);
        }
        // By name: a first try naming every confirmed body alone, and if
        // the controller lost some, a second sending those whole.
        let first = if by_name {
            self.kept.by_name(&combined, &[])
        } else {
            combined.clone()
        };
        let (mut reply, mut sent, mut received) = match self.send_fetch(first.clone())? {
            Ok(x) => x,
            Err(notice) => return Ok(Together::LocalOnly(notice)),
        };
        let mut answered = first;
        if by_name && !reply.unknown_groups.is_empty() {
            tracing::info!(site = %self.code, groups = reply.unknown_groups.len(),
                "the controller keeps no body for some groups: sending those whole");
            let again = self.kept.by_name(&combined, &reply.unknown_groups);
            (reply, sent, received) = match self.send_fetch(again.clone())? {
                Ok((reply, s, r)) => (reply, sent + s, received + r),
                Err(notice) => return Ok(Together::LocalOnly(notice)),
            };
            answered = again;
        }
        if !reply.unknown_groups.is_empty() {
            return Err(Error::Invalid(
                "the controller does not know groups sent with their bodies".into(),
            ));
        }
        self.kept.confirm(conn, &answered)?;
        let mut parts: Vec<Option<v1::FetchReply>> = ranges
            .iter()
            .map(|r| r.map(|_| v1::FetchReply::default()))
            .collect();
        for mut t in reply.tables {
            let owner = ranges.iter().position(|r| {
                r.is_some_and(|(offset, n)| t.group >= offset && t.group < offset + n)
            });
            let (Some(i), Some((offset, _))) = (owner, owner.and_then(|i| ranges[i])) else {
                return Err(Error::Invalid(format!(
                    "reply names group {}, not asked for",
                    t.group
                )));
            };
            t.group -= offset;
            if let Some(part) = parts[i].as_mut() {
                part.tables.push(t);
            }
        }
        Ok(Together::Replies(parts, sent, received))
    }

    /// The include trees in effect.
    pub(crate) fn include_edges(&self) -> Arc<Vec<IncludeEdge>> {
        self.includes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Fetches `plan` with what its include tree brings along, in one
    /// request; stores the plan's reply as its snapshot and what came along
    /// as another, whose definition claims it by key. Returns both (the
    /// second `None` when nothing came along to claim).
    fn fetch_including(
        &self,
        conn: &Connection,
        plan: &Plan,
        current: &Projections,
        retrieval: &Retrieval<'_>,
        include: &Include,
    ) -> Result<(Fetched, Option<(SnapshotNo, SnapshotDefinition)>)> {
        let extra_current = projections(conn, &include.plan)?;
        let requests = vec![
            self.request_for(conn, plan, current, retrieval.user)?,
            self.request_for(conn, &include.plan, &extra_current, retrieval.user)?,
        ];
        let (parts, sent, received) = match self.send_together(conn, requests, false) {
            // The user may not read what the tree brings: fetch what was
            // asked.
            Err(Error::Remote(s)) if s.code() == tonic::Code::PermissionDenied => {
                return Ok((self.fetch(conn, plan, current, retrieval)?, None));
            }
            Err(e) => return Err(e),
            Ok(Together::Replies(parts, sent, received)) => (parts, sent, received),
            Ok(Together::Nothing) => return Ok((Fetched::Nothing, None)),
            Ok(Together::LocalOnly(notice)) => return Ok((Fetched::LocalOnly(notice), None)),
        };
        let mut parts = parts.into_iter();
        let (main, extra) = (parts.next().flatten(), parts.next().flatten());
        let fetched = match main {
            Some(reply) => {
                self.store_reply(conn, plan, current, retrieval, &reply, sent, received)?
            }
            None => Fetched::Nothing,
        };
        let Some(extra) = extra else {
            return Ok((fetched, None));
        };
        match self.store_include(conn, include, &extra, retrieval.user) {
            Ok(claimed) => Ok((fetched, claimed)),
            Err(e) => {
                // The query's own tuples are stored; what came along is not,
                // though the controller believes it is here.
                tracing::warn!(site = %self.code, error = %e, "tuples fetched along not stored");
                self.mark_uncertain()?;
                Ok((fetched, None))
            }
        }
    }

    /// Stores what an include tree brought as a snapshot whose definition
    /// names the parents by key ([`Include::claim`]).
    fn store_include(
        &self,
        conn: &Connection,
        include: &Include,
        reply: &v1::FetchReply,
        user: &str,
    ) -> Result<Option<(SnapshotNo, SnapshotDefinition)>> {
        let mapping = self.mapping();
        let Some(q) = &include.plan.query else {
            return Ok(None);
        };
        let tuples = map_back(reply, q, &mapping)?;
        let any = tuples.iter().any(|t| !t.tuples.is_empty());
        let claim = include.claim(conn, &mapping, &self.catalog, tuples)?;
        let Some(claim) = claim.filter(|c| c.plan.query.is_some()) else {
            if any {
                self.mark_uncertain()?;
            }
            return Ok(None);
        };
        if !claim.complete {
            self.mark_uncertain()?;
        }
        let Some(cq) = &claim.plan.query else {
            return Ok(None);
        };
        let definition =
            SnapshotDefinition::from_plan(&claim.plan, &projections(conn, &claim.plan)?);
        let retrieval = Retrieval {
            select: &claim.select,
            lang: Language::Sql,
            text: &claim.text,
            into: None,
            user,
        };
        let incoming = Incoming {
            definition: &definition,
            tuples: &claim.tuples,
            query: cq,
            retrieval: &retrieval,
            sent: 0,
            received: 0,
            fetches: 0,
            claim_held: true,
        };
        let no = self.store_snapshot(conn, &incoming)?;
        Ok(Some((no, definition)))
    }

    /// The fetch request of a plan with its semi-join projections; `None`
    /// when the plan maps nothing.
    pub(crate) fn request_for(
        &self,
        conn: &Connection,
        plan: &Plan,
        current: &Projections,
        user: &str,
    ) -> Result<Option<v1::FetchRequest>> {
        let Some(q) = &plan.query else {
            return Ok(None);
        };
        let mapping = self.mapping();
        let mut req = fetch_request(q);
        req.include_held = self.uncertain.load(std::sync::atomic::Ordering::Relaxed);
        req.user = user.to_string();
        for sj in &plan.semijoins {
            let Some(rows) = current.get(&sj.local_var).filter(|r| !r.is_empty()) else {
                continue;
            };
            let Some((gi, ti)) = q.groups.iter().enumerate().find_map(|(gi, g)| {
                g.tables
                    .iter()
                    .position(|t| t.local_var == sj.local_var)
                    .map(|ti| (gi, ti))
            }) else {
                continue;
            };
            let rm = mapping
                .relation(&sj.local_relation)
                .ok_or_else(|| Error::Invalid(format!("{} is not mapped", sj.local_relation)))?;
            req.semijoins.push(semijoin(
                gi,
                ti,
                &q.groups[gi].tables[ti],
                rm,
                &sj.attributes,
                rows,
            )?);
        }
        snaps_proto::compact_shapes(&mut req, &self.global);
        // The controller keeps each body under its name, so the refresh
        // can re-run the definition by name.
        self.kept.name(conn, &mut req)?;
        Ok(Some(req))
    }

    /// Sends a fetch: its reply and the bytes sent and received, or — when
    /// the controller could not be asked — the notice of a local-only
    /// answer. A request the controller refused is an error.
    fn send_fetch(
        &self,
        req: v1::FetchRequest,
    ) -> Result<std::result::Result<(v1::FetchReply, u64, u64), &'static str>> {
        let timeout = self
            .link
            .as_ref()
            .map_or(Duration::from_secs(10), |l| l.fetch_timeout);
        let outcome = self.runtime.block_on(async {
            let client = match self.client().await {
                Ok(c) => c,
                Err(e) => return Err((e, false)),
            };
            let (sent0, recv0) = (client.counters().sent(), client.counters().received());
            match tokio::time::timeout(timeout, client.fetch(req)).await {
                Ok(Ok(reply)) => Ok((
                    reply,
                    client.counters().sent() - sent0,
                    client.counters().received() - recv0,
                )),
                Ok(Err(e @ Error::Remote(_))) if is_request_error(&e) || is_refreshing(&e) => {
                    Err((e, false))
                }
                Ok(Err(e)) => {
                    self.forget_client().await;
                    Err((e, true))
                }
                Err(_) => {
                    self.forget_client().await;
                    Err((
                        Error::Unreachable(format!("no reply within {timeout:?}")),
                        true,
                    ))
                }
            }
        });
        match outcome {
            Ok(x) => Ok(Ok(x)),
            Err((e, maybe_recorded)) => {
                if maybe_recorded {
                    self.mark_uncertain()?;
                }
                if matches!(e, Error::Remote(_)) && is_request_error(&e) {
                    return Err(e);
                }
                tracing::warn!(site = %self.code, error = %e, "fetch failed: answering from local data");
                let conn = self.writer();
                Site::bump(&conn, &[("local_only_answers", 1)])?;
                Ok(Err(if is_refreshing(&e) {
                    REFRESHING_NOTICE
                } else {
                    LOCAL_ONLY_NOTICE
                }))
            }
        }
    }

    /// Stores a fetch's reply as the plan's snapshot.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn store_reply(
        &self,
        conn: &Connection,
        plan: &Plan,
        current: &Projections,
        retrieval: &Retrieval<'_>,
        reply: &v1::FetchReply,
        sent: u64,
        received: u64,
    ) -> Result<Fetched> {
        let Some(q) = &plan.query else {
            return Ok(Fetched::Nothing);
        };
        let mapping = self.mapping();
        let definition = SnapshotDefinition::from_plan(plan, current);
        let stored = map_back(reply, q, &mapping).and_then(|tuples| {
            let incoming = Incoming {
                definition: &definition,
                tuples: &tuples,
                query: q,
                retrieval,
                sent,
                received,
                fetches: 1,
                claim_held: false,
            };
            self.store_snapshot(conn, &incoming)
        });
        match stored {
            Ok(no) => Ok(Fetched::Stored(no, definition)),
            Err(e) => {
                // The controller recorded copies this site did not store.
                self.mark_uncertain()?;
                Err(e)
            }
        }
    }

    /// Whether fetches ask for held tuples too, until the next refresh: a
    /// reply may have been lost, so the controller's sent-to bits may name
    /// tuples this site does not have.
    pub fn uncertain(&self) -> bool {
        self.uncertain.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The controller's bits agree with what this site holds again.
    pub(crate) fn clear_uncertain(&self, conn: &Connection) -> Result<()> {
        conn.execute("DELETE FROM snaps_meta WHERE key = ?1", [UNCERTAIN])?;
        self.uncertain
            .store(false, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    pub(crate) fn mark_uncertain(&self) -> Result<()> {
        self.uncertain
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.writer().execute(
            "INSERT OR REPLACE INTO snaps_meta (key, value) VALUES (?1, ?2)",
            params![UNCERTAIN, today().to_string()],
        )?;
        Ok(())
    }

    /// Stores fetched tuples as one snapshot through the session's own
    /// connection, so the session sees them even inside a transaction of its
    /// client: in a transaction of its own (`BEGIN IMMEDIATE`), or inside the
    /// client's as a savepoint. All of it or nothing.
    fn store_snapshot(&self, conn: &Connection, incoming: &Incoming<'_>) -> Result<SnapshotNo> {
        let own = conn.is_autocommit();
        conn.execute_batch(if own {
            "BEGIN IMMEDIATE"
        } else {
            "SAVEPOINT snaps_store"
        })?;
        let stored = self.store_tuples(conn, incoming);
        let end = match (&stored, own) {
            (Ok(_), true) => "COMMIT",
            (Ok(_), false) => "RELEASE snaps_store",
            (Err(_), true) => "ROLLBACK",
            (Err(_), false) => "ROLLBACK TO snaps_store; RELEASE snaps_store",
        };
        conn.execute_batch(end)?;
        let no = stored?;
        if own && incoming.retrieval.into.is_none() {
            self.definitions
                .write()
                .push((no, incoming.definition.clone()));
        }
        Ok(no)
    }

    fn store_tuples(&self, tx: &Connection, incoming: &Incoming<'_>) -> Result<SnapshotNo> {
        let Incoming {
            definition,
            tuples,
            query: q,
            retrieval,
            sent,
            received,
            ..
        } = *incoming;
        let status = LocalStatus {
            tuple_type: TupleType::Snapshot,
            rights: LocalRights::Unknown,
            new: false,
            modified: false,
            just_copied: 0,
        }
        .to_byte()?;
        let day = today();
        let no = match retrieval.into {
            Some(no) => i64::from(no.0),
            None => {
                tx.execute(
                    "INSERT INTO snaps_snapshot_definition (language, statement, plan, created_day, pinned, query)
                     VALUES (?1, ?2, ?3, ?4, 0, ?5)",
                    params![
                        if retrieval.lang == Language::Quel {
                            "quel"
                        } else {
                            "sql"
                        },
                        retrieval.text,
                        to_json(definition)?,
                        day,
                        to_json(retrieval.select)?,
                    ],
                )?;
                tx.last_insert_rowid()
            }
        };
        let mut stored = 0i64;
        let mapping = self.mapping();
        for lt in tuples {
            let rel = self
                .catalog
                .relation(&lt.local_relation)
                .ok_or_else(|| Error::Invalid(format!("no relation {}", lt.local_relation)))?;
            let table = q
                .groups
                .iter()
                .flat_map(|g| &g.tables)
                .find(|t| t.local_var == lt.local_var)
                .ok_or_else(|| {
                    Error::Invalid(format!("reply for unknown variable {}", lt.local_var))
                })?;
            let mut cols: Vec<String> = rel
                .attributes
                .iter()
                .map(|a| snaps_schema::sql_ident(&a.name))
                .collect();
            cols.push(STATUS_COLUMN.to_string());
            let insert = format!(
                "INSERT INTO {} ({}) VALUES ({})",
                snaps_schema::sql_ident(&rel.name),
                cols.join(", "),
                vec!["?"; cols.len()].join(", ")
            );
            // A copy already here takes the fetched values of its mapped
            // attributes (they are the current ones; after a mapping edit,
            // in the new shape) unless this site changed it under a lock
            // not yet committed; its own attributes stay.
            let rm = mapping
                .relation(&rel.name)
                .ok_or_else(|| Error::Invalid(format!("{} is not mapped", rel.name)))?;
            let mapped: Vec<usize> = (0..rel.attributes.len())
                .filter(|&i| rm.maps(&rel.attributes[i].name))
                .collect();
            let refresh = format!(
                "UPDATE {t} SET {sets} WHERE rowid = ?1 AND ({s} & {pending}) <> {pending}",
                t = snaps_schema::sql_ident(&rel.name),
                sets = mapped
                    .iter()
                    .enumerate()
                    .map(|(k, &i)| format!(
                        "{} = ?{}",
                        snaps_schema::sql_ident(&rel.attributes[i].name),
                        k + 2
                    ))
                    .collect::<Vec<_>>()
                    .join(", "),
                s = STATUS_COLUMN,
                pending = 0x28,
            );
            let mark = format!(
                "UPDATE {} SET {STATUS_COLUMN} = {STATUS_COLUMN} | 1 WHERE rowid = ?1",
                snaps_schema::sql_ident(&rel.name)
            );
            for ((ids, values), owner) in lt.tuples.iter().zip(&lt.owners) {
                // A tuple already here (fetched before) joins this snapshot.
                let mut rowid: Option<i64> = None;
                for (p, id) in ids.iter().enumerate() {
                    if *id == 0 {
                        continue;
                    }
                    rowid = tx
                        .prepare_cached(
                            "SELECT tuple_rowid FROM snaps_copy WHERE global_relation = ?1 AND tuple_id = ?2",
                        )?
                        .query_row(params![table.parts[p].relation, *id as i64], |r| r.get(0))
                        .optional()?;
                    if rowid.is_some() {
                        break;
                    }
                }
                let rowid = match rowid {
                    Some(r) => {
                        tx.prepare_cached(&mark)?.execute([r])?;
                        let args = std::iter::once(rusqlite::types::Value::Integer(r))
                            .chain(mapped.iter().map(|&i| to_sqlite(&values[i])));
                        tx.prepare_cached(&refresh)?
                            .execute(rusqlite::params_from_iter(args))?;
                        tx.execute(
                            &format!(
                                "UPDATE {} SET {STATUS_COLUMN} = {STATUS_COLUMN} & ~7 WHERE rowid = ?1",
                                snaps_schema::sql_ident(&rel.name)
                            ),
                            [r],
                        )?;
                        r
                    }
                    None => {
                        let params = values.iter().map(to_sqlite).chain(std::iter::once(
                            rusqlite::types::Value::Integer(status.into()),
                        ));
                        match tx
                            .prepare_cached(&insert)?
                            .execute(rusqlite::params_from_iter(params))
                        {
                            Ok(_) => {}
                            Err(e)
                                if e.sqlite_error_code()
                                    == Some(rusqlite::ErrorCode::ConstraintViolation) =>
                            {
                                // The site has a tuple with this key of its own:
                                // its own data wins.
                                tracing::warn!(site = %self.code, relation = %rel.name, error = %e,
                                    "fetched tuple not stored: key taken locally");
                                continue;
                            }
                            Err(e) => return Err(e.into()),
                        }
                        stored += 1;
                        tx.last_insert_rowid()
                    }
                };
                for (p, id) in ids.iter().enumerate() {
                    if *id != 0 {
                        tx.prepare_cached(
                            "INSERT OR REPLACE INTO snaps_copy (global_relation, tuple_id, relation, tuple_rowid, owner)
                             VALUES (?1, ?2, ?3, ?4, (SELECT code FROM snaps_network_site WHERE number = ?5))",
                        )?
                        .execute(params![table.parts[p].relation, *id as i64, rel.name, rowid, owner])?;
                    }
                }
                tx.prepare_cached(
                    "INSERT OR IGNORE INTO snaps_snapshot_membership (relation, tuple_rowid, snapshot_no, last_access_day)
                     VALUES (?1, ?2, ?3, ?4)",
                )?
                .execute(params![rel.name, rowid, no, day])?;
            }
        }
        if incoming.claim_held {
            // Copies held already that the definition selects are its too,
            // so evicting another snapshot keeps what this one claims.
            for group in &definition.groups {
                let mut stmt = tx.prepare(&crate::refresh::group_sql(group))?;
                let mut rows = stmt.query([])?;
                while let Some(r) = rows.next()? {
                    for (i, t) in group.tables.iter().enumerate() {
                        let Some(rowid) = r.get::<_, Option<i64>>(i)? else {
                            continue;
                        };
                        tx.prepare_cached(&format!(
                            "INSERT OR IGNORE INTO snaps_snapshot_membership (relation, tuple_rowid, snapshot_no, last_access_day)
                             SELECT ?1, rowid, ?3, ?4 FROM {} WHERE rowid = ?2 AND ({STATUS_COLUMN} & {SNAPSHOT_BIT}) <> 0",
                            snaps_schema::sql_ident(&t.relation)
                        ))?
                        .execute(params![t.relation, rowid, no, day])?;
                    }
                }
            }
        }
        Site::bump(
            tx,
            &[
                ("global_fetches", incoming.fetches),
                (
                    "tuples_received",
                    tuples.iter().map(|t| t.tuples.len() as i64).sum(),
                ),
                ("bytes_sent", sent as i64),
                ("bytes_received", received as i64),
                ("snapshots", i64::from(retrieval.into.is_none())),
                ("snapshot_tuples", stored),
            ],
        )?;
        Ok(SnapshotNo(no as u32))
    }

    /// Records that snapshots were used today (at most one write per
    /// snapshot and day).
    fn touch(&self, snapshots: &[SnapshotNo]) -> Result<()> {
        let day = today();
        let conn = self.writer();
        for s in snapshots {
            conn.prepare_cached(
                "UPDATE snaps_snapshot_membership SET last_access_day = ?1
                 WHERE snapshot_no = ?2 AND last_access_day < ?1",
            )?
            .execute(params![day, s.0])?;
        }
        Ok(())
    }
}

/// The current semi-join projections of a plan, per variable: the join
/// values of the site's new and modified tuples.
pub(crate) fn projections(conn: &Connection, plan: &Plan) -> Result<Projections> {
    let mut out = BTreeMap::new();
    for sj in &plan.semijoins {
        let changed = format!(
            "({}.{STATUS_COLUMN} & {CHANGED_BITS}) <> 0",
            snaps_schema::sql_ident(&sj.local_var)
        );
        let sql = sj.local_sql(&changed);
        let mut stmt = conn.prepare(&sql)?;
        let n = sj.attributes.len();
        // Mapped attributes hold i2, i4, f4 or cN values (the schema
        // checks them), so nothing is lost reading them as result values.
        let rows = stmt
            .query_map([], |r| {
                (0..n)
                    .map(|i| Ok(result_value(r.get_ref(i)?)))
                    .collect::<rusqlite::Result<Vec<_>>>()
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        out.insert(sj.local_var.clone(), rows);
    }
    Ok(out)
}

/// An error about the request itself (the controller refused it): the
/// client should see it rather than a local-only answer.
/// The controller is collecting a refresh epoch: nothing was recorded, and
/// it will answer again after the commit.
pub(crate) fn is_refreshing(e: &Error) -> bool {
    matches!(e, Error::Remote(s) if s.code() == tonic::Code::Unavailable
        && s.metadata().contains_key("snaps-refreshing-epoch"))
}

pub(crate) fn is_request_error(e: &Error) -> bool {
    matches!(e, Error::Remote(s) if matches!(s.code(),
        tonic::Code::InvalidArgument | tonic::Code::NotFound | tonic::Code::PermissionDenied
            | tonic::Code::FailedPrecondition | tonic::Code::Unauthenticated))
}

pub(crate) fn read_definitions(conn: &Connection) -> Result<Vec<(SnapshotNo, SnapshotDefinition)>> {
    let mut stmt = conn
        .prepare("SELECT snapshot_no, plan FROM snaps_snapshot_definition ORDER BY snapshot_no")?;
    let rows = stmt
        .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    rows.into_iter()
        .map(|(no, plan)| {
            let def: SnapshotDefinition = serde_json::from_str(&plan).map_err(|e| {
                Error::Invalid(format!("snapshot definition {no} is unreadable: {e}"))
            })?;
            Ok((SnapshotNo(no as u32), def))
        })
        .collect()
}

/// A site's mapping in effect, and what is derived from it.
pub(crate) struct Active {
    /// The mapping.
    pub mapping: SiteMapping,
    /// Per local relation whose key maps onto a global key: how an
    /// insert's keys are checked at the global controller.
    pub key_checks: BTreeMap<String, KeyCheck>,
}

impl Active {
    fn new(mapping: SiteMapping, global: &Catalog) -> Active {
        let key_checks = mapping
            .relations()
            .filter_map(|rm| KeyCheck::of(rm, global).map(|c| (rm.local.name.clone(), c)))
            .collect();
        Active {
            mapping,
            key_checks,
        }
    }
}

impl std::ops::Deref for Active {
    type Target = SiteMapping;
    fn deref(&self) -> &SiteMapping {
        &self.mapping
    }
}

/// The retrieval a fetch is for.
pub(crate) struct Retrieval<'a> {
    /// The query.
    pub select: &'a Select,
    /// The language it was written in.
    pub lang: Language,
    /// The statement, as the snapshot definition records it.
    pub text: &'a str,
    /// The snapshot the tuples join (the refresh re-running a definition);
    /// `None` makes a new one.
    pub into: Option<SnapshotNo>,
    /// The user code of the person asking (empty: the site's own work).
    pub user: &'a str,
}

/// What [`Site::send_together`] brought back.
enum Together {
    /// Per request, its share of the reply; and the wire bytes sent and
    /// received for all of them.
    Replies(Vec<Option<v1::FetchReply>>, u64, u64),
    /// No request mapped anything: nothing was sent.
    Nothing,
    /// The controller could not be asked.
    LocalOnly(&'static str),
}

/// A fetch's reply, mapped back, on its way into the site's database.
#[derive(Clone, Copy)]
struct Incoming<'a> {
    definition: &'a SnapshotDefinition,
    tuples: &'a [LocalTuples],
    query: &'a snaps_mapping::GlobalQuery,
    retrieval: &'a Retrieval<'a>,
    /// Wire bytes of the fetch, both ways.
    sent: u64,
    received: u64,
    /// Round trips to count (0 for what came along with another's fetch).
    fetches: i64,
    /// Whether the snapshot also takes in the copies held already that its
    /// definition selects (an include tree's, which claims them).
    claim_held: bool,
}

/// How a retrieval's data came to be at the site.
pub(crate) enum Retrieved {
    /// Snapshots held already cover it (none if nothing of it is mapped).
    Covered(Vec<SnapshotNo>),
    /// What was missing was fetched now.
    Fetched,
    /// The global controller could not be asked: the answer is from local
    /// data, with this notice.
    LocalOnly(String),
}

/// What a fetch did.
pub(crate) enum Fetched {
    /// Nothing of the query is mapped.
    Nothing,
    /// The global controller could not be asked: answer from local data,
    /// with this notice.
    LocalOnly(&'static str),
    /// Stored as this snapshot.
    Stored(SnapshotNo, SnapshotDefinition),
}

/// The endpoint's view of a site.
pub struct SiteEngine(pub Arc<Site>);

impl SiteEngine {
    /// A session of the user `user` whose user code is `code`.
    pub fn session(&self, user: &str, code: &str) -> std::result::Result<SiteSession, EngineError> {
        let conn = open_conn(&self.0.path).map_err(|e| EngineError::new("58000", e.to_string()))?;
        register_next_key(&conn, &self.0.catalog)
            .map_err(|e| EngineError::new("58000", e.to_string()))?;
        conn.set_prepared_statement_cache_capacity(crate::covered::CAPACITY);
        Ok(SiteSession {
            site: self.0.clone(),
            conn,
            quel: QuelSession::new(),
            user: user.to_string(),
            user_code: code.to_string(),
            pending: Vec::new(),
            reads: CoveredReads::default(),
        })
    }
}

impl Engine for SiteEngine {
    /// Without a users file the login name is the user code too.
    fn open_session(&self, user: &str) -> std::result::Result<Box<dyn Session>, EngineError> {
        Ok(Box::new(self.session(user, user)?))
    }

    fn open_session_as(
        &self,
        user: &str,
        code: &str,
    ) -> std::result::Result<Box<dyn Session>, EngineError> {
        Ok(Box::new(self.session(user, code)?))
    }
}

/// One client connection.
pub struct SiteSession {
    pub(crate) site: Arc<Site>,
    pub(crate) conn: Connection,
    quel: QuelSession,
    user: String,
    /// The user code the global controller sees with this session's
    /// fetches and locks.
    pub(crate) user_code: String,
    /// Snapshots stored inside the client's open transaction: they count
    /// for this session now, for everyone once it commits, and for nobody
    /// if it rolls back.
    pending: Vec<(SnapshotNo, SnapshotDefinition)>,
    /// Statements found covered, answered again without the check while
    /// nothing they were judged on changed.
    reads: CoveredReads,
}

impl Drop for SiteSession {
    fn drop(&mut self) {
        // A client leaving inside its transaction rolls it back, snapshots
        // included.
        if !self.pending.is_empty()
            && !self.conn.is_autocommit()
            && let Err(e) = self.site.mark_uncertain()
        {
            tracing::warn!(error = %e, "cannot record a rolled-back snapshot");
        }
    }
}

fn sqlstate_of(e: &Error) -> &'static str {
    match e {
        Error::Mapping(snaps_mapping::Error::Unsupported(_)) | Error::Unsupported(_) => "0A000",
        Error::Mapping(snaps_mapping::Error::Unknown(m)) if m.contains("relation") => "42P01",
        Error::Mapping(snaps_mapping::Error::Unknown(_)) => "42703",
        Error::Mapping(snaps_mapping::Error::Conversion(_)) => "22000",
        Error::Mapping(_) => "42601",
        Error::Storage(e) => sqlite_state(e),
        Error::Locked(_) => "55P03",
        Error::ReadOnly(_) => "42501",
        Error::DuplicateKey(_) => "23505",
        Error::Busy(_) => "55006",
        Error::Halted(_) => "57P01",
        // The global controller's access rules refused the site or user.
        Error::Remote(s) if s.code() == tonic::Code::PermissionDenied => "42501",
        Error::Remote(_) | Error::Unreachable(_) => "08006",
        Error::Schema(_) => "22000",
        Error::Invalid(_) => "22023",
        Error::Io { .. } => "58030",
    }
}

fn sqlite_state(e: &rusqlite::Error) -> &'static str {
    let msg = e.to_string();
    if let rusqlite::Error::SqliteFailure(f, _) = e
        && f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_TRIGGER
    {
        // A SNAPS trigger refused the write (no lock, a copy, a key change).
        return "42501";
    }
    if matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    ) {
        // Another session wrote since this transaction began: PostgreSQL
        // clients retry on serialization_failure.
        "40001"
    } else if msg.contains("no such table") {
        "42P01"
    } else if msg.contains("no such column") {
        "42703"
    } else if msg.contains("syntax error") || msg.contains("incomplete input") {
        "42601"
    } else if msg.contains("UNIQUE constraint") || msg.contains("PRIMARY KEY") {
        "23505"
    } else if msg.contains("NOT NULL constraint") {
        "23502"
    } else if msg.contains("constraint") {
        "23000"
    } else if msg.contains("already exists") {
        "42P07"
    } else {
        "XX000"
    }
}

fn engine_error(e: Error) -> EngineError {
    EngineError::new(sqlstate_of(&e), e.to_string())
}

/// The kind of a result column SQLite declares no type for (an
/// expression), from its name alone: describing a statement and running it
/// must agree, or a driver decodes binary values wrongly.
fn kind_of_expression(name: &str) -> ColumnKind {
    let n = name.trim_start().to_ascii_lowercase();
    let int = [
        "count(",
        "length(",
        "instr(",
        "changes(",
        "total_changes(",
        "unicode(",
    ];
    let float = ["avg(", "total("];
    if int.iter().any(|f| n.starts_with(f)) {
        ColumnKind::Int
    } else if float.iter().any(|f| n.starts_with(f)) {
        ColumnKind::Float
    } else {
        ColumnKind::Text
    }
}

fn kind_of_decl(decl: Option<&str>) -> Option<ColumnKind> {
    let d = decl?.to_ascii_uppercase();
    Some(if d.contains("INT") {
        ColumnKind::Int
    } else if d.contains("REAL") || d.contains("FLOA") || d.contains("DOUB") {
        ColumnKind::Float
    } else {
        ColumnKind::Text
    })
}

/// A value of a result row as the client sees it. Whatever SQLite holds
/// comes through: text that is not UTF-8 with replacement characters, a blob
/// (an application's own table may hold images) as PostgreSQL writes `bytea`
/// in text, `\x` and hex digits.
pub(crate) fn result_value(v: rusqlite::types::ValueRef<'_>) -> Value {
    use rusqlite::types::ValueRef;
    match v {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(i) => Value::Int(i),
        ValueRef::Real(f) => Value::Float(f),
        ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
        ValueRef::Blob(b) => {
            let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
            Value::Text(format!("\\x{hex}"))
        }
    }
}

/// The PostgreSQL command tag of a statement that returned no rows.
fn command_tag(sql: &str, changes: u64) -> String {
    let words: Vec<String> = sql
        .split_whitespace()
        .take(2)
        .map(|w| w.trim_end_matches(';').to_ascii_uppercase())
        .collect();
    match words.first().map(String::as_str) {
        Some("INSERT" | "REPLACE") => format!("INSERT 0 {changes}"),
        Some("UPDATE") => format!("UPDATE {changes}"),
        Some("DELETE") => format!("DELETE {changes}"),
        Some("BEGIN") => "BEGIN".into(),
        Some("COMMIT" | "END") => "COMMIT".into(),
        Some("ROLLBACK") => "ROLLBACK".into(),
        Some(first @ ("CREATE" | "DROP" | "ALTER")) => {
            format!("{first} {}", words.get(1).map_or("", String::as_str))
                .trim()
                .to_string()
        }
        Some(first) => first.to_string(),
        None => String::new(),
    }
}

impl SiteSession {
    /// Runs a statement that calls the identity functions: each link made
    /// (and kept here at once), each match asked of the global controller
    /// and read as a table, then the statement. A link brings the other
    /// record along, as a lookup of a linked patient does.
    fn run_identity(
        &mut self,
        text: &str,
        calls: &[crate::identity::Call],
    ) -> Result<Vec<Outcome>> {
        // What each link and sync call did, as the statement reads it.
        let mut said = vec![String::new(); calls.len()];
        let mut bring = Vec::new();
        for (n, c) in calls.iter().enumerate() {
            let l = match &c.what {
                What::Link(l) => l,
                What::Sync => {
                    let synced = self
                        .site
                        .sync_patient(c.key, &self.user_code)
                        .map_err(|e| crate::identity::refused(e, c.name()))?;
                    said[n] = synced.text();
                    continue;
                }
                What::Match => continue,
            };
            let user = self.user_code.clone();
            let reply = self
                .site
                .remote(|client| async move {
                    let other = Value::Int(l.other);
                    client
                        .link(&Value::Int(c.key), (&l.site, &other), &user, l.unlink)
                        .await
                })
                .map_err(|e| crate::identity::refused(e, c.name()))?;
            if let Some(link) = &reply.link
                && self.site.identity().is_some()
            {
                crate::links::apply_one(&self.conn, link)?;
            }
            said[n] = crate::identity::said(l, reply.changed).to_string();
            if !l.unlink {
                bring.push(l.other);
            }
        }
        let said: Vec<&str> = said.iter().map(String::as_str).collect();
        let run = |this: &Self| -> Result<Vec<Outcome>> {
            let sql = crate::identity::prepare(&this.conn, text, calls, &said)?;
            for (n, c) in calls.iter().enumerate() {
                if c.what != What::Match {
                    continue;
                }
                let user = this.user_code.clone();
                let reply = this
                    .site
                    .remote(|client| async move {
                        client.match_patient(&Value::Int(c.key), &user).await
                    })
                    .map_err(|e| crate::identity::refused(e, c.name()))?;
                crate::identity::fill(&this.conn, n, &reply)?;
            }
            this.run_local(&sql)
        };
        let out = run(self);
        crate::identity::clean(&self.conn, calls);
        if out.is_ok() && !bring.is_empty() {
            self.bring_linked(&bring);
        }
        out
    }

    /// Runs SQL text on the site's database exactly as SQLite would, one
    /// statement after another; the status column never reaches the client.
    pub(crate) fn run_local(&self, text: &str) -> Result<Vec<Outcome>> {
        let mut out = Vec::new();
        let mut batch = Batch::new(&self.conn, text);
        while let Some(mut stmt) = batch.next()? {
            out.push(self.outcome(&mut stmt)?);
        }
        Ok(out)
    }

    /// Runs one prepared statement; the status column never reaches the
    /// client.
    fn outcome(&self, stmt: &mut rusqlite::Statement<'_>) -> Result<Outcome> {
        if stmt.column_count() == 0 {
            let sql = stmt.expanded_sql().unwrap_or_default();
            stmt.raw_execute()?;
            return Ok(Outcome::Command {
                tag: command_tag(&sql, self.conn.changes()),
            });
        }
        let keep: Vec<usize> = (0..stmt.column_count())
            .filter(|&i| stmt.column_name(i).is_ok_and(|n| n != STATUS_COLUMN))
            .collect();
        let decls: Vec<Option<ColumnKind>> = stmt
            .columns()
            .map(|c| kind_of_decl(c.decl_type()))
            .collect();
        let names: Vec<String> = keep
            .iter()
            .map(|&i| stmt.column_name(i).map(str::to_string))
            .collect::<rusqlite::Result<_>>()?;
        let mut rows = Vec::new();
        let mut q = stmt.raw_query();
        while let Some(r) = q.next()? {
            let row = keep
                .iter()
                .map(|&i| Ok(result_value(r.get_ref(i)?)))
                .collect::<Result<Vec<_>>>()?;
            rows.push(row);
        }
        // An expression's type is what its rows hold when they agree (as
        // `describe` finds it from the first), else the name's guess.
        let columns = keep
            .iter()
            .enumerate()
            .zip(names)
            .map(|((k, &i), name)| {
                let mut kinds = rows.iter().filter_map(|r| match &r[k] {
                    Value::Float(_) => Some(Some(ColumnKind::Float)),
                    Value::Int(_) => Some(Some(ColumnKind::Int)),
                    Value::Text(_) => Some(None),
                    Value::Null => None,
                });
                let first = kinds.next().flatten();
                let held = first.filter(|f| kinds.all(|k| k == Some(*f)));
                let kind = decls[i]
                    .or(held)
                    .unwrap_or_else(|| kind_of_expression(&name));
                ResultColumn { name, kind }
            })
            .collect();
        Ok(Outcome::Rows { columns, rows })
    }

    /// The current semi-join projections of a plan, per variable.
    fn projections(&self, plan: &Plan) -> Result<Projections> {
        projections(&self.conn, plan)
    }

    /// Makes sure the site holds what `select` needs (steps 2–5), and the
    /// records confirmed linked with the patients it looks up by key.
    pub(crate) fn prepare_retrieval(
        &mut self,
        select: &Select,
        lang: Language,
        text: &str,
    ) -> Result<Retrieved> {
        let planned = plan(select, &self.site.catalog, &self.site.mapping())?;
        let linked = match self.site.identity() {
            Some(identity) => identity.linked_in(&self.conn, &planned, &self.site.global)?,
            None => Vec::new(),
        };
        let retrieved = self.retrieve(planned, select, lang, text)?;
        if !linked.is_empty() && !matches!(retrieved, Retrieved::LocalOnly(_)) {
            self.bring_linked(&linked);
        }
        Ok(retrieved)
    }

    /// Brings the records linked with the patients a query looked up (they
    /// are the same person's): each looked up as the site's own query
    /// would, its include tree along. One step: their own links are not
    /// followed. A failure costs the query nothing and is logged.
    fn bring_linked(&mut self, keys: &[i64]) {
        let Some(identity) = self.site.identity() else {
            return;
        };
        for &key in keys {
            let Some((select, text)) = identity.lookup(&self.site.mapping(), key) else {
                return;
            };
            let brought = plan(&select, &self.site.catalog, &self.site.mapping())
                .map_err(Error::from)
                .and_then(|p| self.retrieve(p, &select, Language::Sql, &text));
            if let Err(e) = brought {
                tracing::warn!(site = %self.site.code, key, error = %e,
                    "a linked record was not brought");
            }
        }
    }

    /// Steps 2–5 for a planned query.
    fn retrieve(
        &mut self,
        mut plan: Plan,
        select: &Select,
        lang: Language,
        text: &str,
    ) -> Result<Retrieved> {
        let site = &self.site;
        if plan.query.is_none() {
            return Ok(Retrieved::Covered(Vec::new()));
        }
        let current = self.projections(&plan)?;
        let coverage = self.coverage(&plan, &current);
        let (missing, holding) = self.missing_groups(&plan, &coverage)?;
        let mut used: Vec<SnapshotNo> = coverage.groups.iter().flatten().copied().collect();
        used.extend(holding);
        site.touch(&used)?;
        if !missing.contains(&true) {
            return Ok(Retrieved::Covered(used));
        }
        // Fetch only the groups neither a snapshot nor a held key covers.
        let Some(query) = plan.query.as_mut() else {
            return Ok(Retrieved::Fetched);
        };
        let mut keep = missing.into_iter();
        query.groups.retain(|_| keep.next().unwrap_or(true));
        let vars: BTreeSet<String> = query
            .groups
            .iter()
            .flat_map(|g| g.tables.iter().map(|t| t.local_var.clone()))
            .collect();
        plan.semijoins.retain(|s| vars.contains(&s.local_var));
        let retrieval = Retrieval {
            select,
            lang,
            text,
            into: None,
            user: &self.user_code,
        };
        let edges = site.include_edges();
        let include =
            match crate::include::include_for(&site.mapping(), &site.catalog, &edges, &plan) {
                Some(i) if i.for_others(&self.conn)? => Some(i),
                _ => None,
            };
        let (fetched, along) = match &include {
            Some(include) => {
                site.fetch_including(&self.conn, &plan, &current, &retrieval, include)?
            }
            None => (site.fetch(&self.conn, &plan, &current, &retrieval)?, None),
        };
        if let Some(along) = along
            && !self.conn.is_autocommit()
        {
            self.pending.push(along);
        }
        match fetched {
            Fetched::Nothing => Ok(Retrieved::Fetched),
            Fetched::LocalOnly(notice) => Ok(Retrieved::LocalOnly(notice.to_string())),
            Fetched::Stored(no, def) => {
                if !self.conn.is_autocommit() {
                    self.pending.push((no, def));
                }
                Ok(Retrieved::Fetched)
            }
        }
    }

    /// Per join group of `plan`: whether it must be fetched (neither a
    /// snapshot covers it, nor does the site hold the tuple it pins, nor do
    /// the summaries prove it would bring nothing); and the
    /// snapshots holding the pinned tuples that answer, which count as used.
    fn missing_groups(
        &self,
        plan: &Plan,
        coverage: &Coverage,
    ) -> Result<(Vec<bool>, Vec<SnapshotNo>)> {
        let mut missing = Vec::with_capacity(coverage.groups.len());
        let mut holding = Vec::new();
        for (i, covered) in coverage.groups.iter().enumerate() {
            if covered.is_some() {
                missing.push(false);
                continue;
            }
            match self.held_pinned_tuple(plan, i)? {
                Some(snapshots) => {
                    holding.extend(snapshots);
                    missing.push(false);
                }
                None => {
                    let empty = match plan.query.as_ref().and_then(|q| q.groups.get(i)) {
                        Some(g) => crate::summary::proves_empty(&self.conn, &self.site.global, g)?,
                        None => false,
                    };
                    if empty {
                        self.site
                            .summary_answers
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    missing.push(!empty);
                }
            }
        }
        Ok((missing, holding))
    }

    /// The snapshots holding the one tuple join group `group` of `plan` can
    /// fetch, so the group needs no fetch: the group pins its table's whole
    /// key to constants ([`key_pinned`]); the table maps onto one global
    /// relation whose key the local key reaches unconverted (keys are unique
    /// in the global snapshot); and a tuple with that key is here and not
    /// new (a new one is not in the global snapshot yet, and another site's
    /// tuple may clash with it there). Changes others make to the tuple
    /// reach the site at the refresh, as they do a copy's. None: not held
    /// (or not a group this applies to); an own tuple is in no snapshot.
    fn held_pinned_tuple(&self, plan: &Plan, group: usize) -> Result<Option<Vec<SnapshotNo>>> {
        let Some(table) = plan
            .query
            .as_ref()
            .and_then(|q| q.groups.get(group))
            .and_then(|g| g.tables.first())
        else {
            return Ok(None);
        };
        let active = self.site.mapping();
        let (Some(check), Some(rm)) = (
            active.key_checks.get(&table.local_relation),
            active.relation(&table.local_relation),
        ) else {
            return Ok(None);
        };
        if rm.parts.len() != 1 || !check.unconverted() {
            return Ok(None);
        }
        let Some(values) = key_pinned(plan, group, &rm.local.key) else {
            return Ok(None);
        };
        let wheres: Vec<String> = rm
            .local
            .key
            .iter()
            .enumerate()
            .map(|(i, k)| format!("{} = ?{}", snaps_schema::sql_ident(k), i + 1))
            .collect();
        let sql = format!(
            "SELECT rowid FROM {} WHERE {} AND ({STATUS_COLUMN} & {NEW_BIT}) = 0",
            snaps_schema::sql_ident(&table.local_relation),
            wheres.join(" AND ")
        );
        let args: Vec<rusqlite::types::Value> = values.iter().map(to_sqlite).collect();
        let Some(rowid) = self
            .conn
            .prepare_cached(&sql)?
            .query_row(rusqlite::params_from_iter(args), |r| r.get::<_, i64>(0))
            .optional()?
        else {
            return Ok(None);
        };
        let snapshots = self
            .conn
            .prepare_cached(
                "SELECT snapshot_no FROM snaps_snapshot_membership
                 WHERE relation = ?1 AND tuple_rowid = ?2",
            )?
            .query_map(params![table.local_relation, rowid], |r| {
                Ok(SnapshotNo(r.get::<_, u32>(0)?))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(Some(snapshots))
    }

    /// The performed check against the site's snapshots and this session's
    /// uncommitted ones.
    fn coverage(&self, plan: &Plan, current: &Projections) -> snaps_mapping::performed::Coverage {
        let shared = self.site.definitions.read();
        if self.pending.is_empty() {
            return performed(plan, current, &self.site.catalog, &shared);
        }
        let mut all = shared.clone();
        all.extend(self.pending.iter().cloned());
        performed(plan, current, &self.site.catalog, &all)
    }

    /// After the client's transaction ended: its snapshots become everyone's
    /// if it committed; if it rolled back they are gone, and the controller
    /// believes this site holds their tuples.
    fn settle(&mut self) -> Result<()> {
        if self.pending.is_empty() || !self.conn.is_autocommit() {
            return Ok(());
        }
        let pending = std::mem::take(&mut self.pending);
        let (first, _) = &pending[0];
        let committed: bool = self.conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM snaps_snapshot_definition WHERE snapshot_no = ?1)",
            [first.0],
            |r| r.get(0),
        )?;
        if committed {
            self.site.definitions.write().extend(pending);
        } else {
            self.site.mark_uncertain()?;
        }
        Ok(())
    }

    /// A write to the mapping tables, kept only if the tables still make a
    /// valid mapping the site can put into effect.
    fn edit_mapping(&mut self, sql: &str) -> Result<Outcome> {
        self.conn.execute_batch("SAVEPOINT snaps_mapping_edit")?;
        let done = self.run_local(sql).and_then(|mut out| {
            let edited = crate::mapping_admin::MappingRows::read(&self.conn)?;
            crate::mapping_admin::validate(
                &self.conn,
                &edited,
                &self.site.catalog,
                &self.site.global,
            )?;
            out.pop()
                .ok_or_else(|| Error::Invalid("the statement did nothing".into()))
        });
        self.conn.execute_batch(if done.is_ok() {
            "RELEASE snaps_mapping_edit"
        } else {
            "ROLLBACK TO snaps_mapping_edit; RELEASE snaps_mapping_edit"
        })?;
        done
    }

    fn explain(&self, text: &str) -> Result<Outcome> {
        let site = &self.site;
        let mut quel = self.quel.clone();
        let stmts = if looks_like_quel(text) {
            quel.parse(text)?
        } else {
            snaps_mapping::sql::parse(text)?
        };
        let mut lines = Vec::new();
        for s in stmts {
            let select = match s {
                Statement::Select(s) => s,
                Statement::DefineSnapshot { query, .. } => query,
                Statement::Insert(Insert { relation, .. })
                | Statement::Update(Update {
                    target: Range { relation, .. },
                    ..
                })
                | Statement::Delete(Delete {
                    target: Range { relation, .. },
                    ..
                }) if site.mapped.contains(relation.as_str()) => {
                    lines.push(format!(
                        "a change of {relation}, which this site shares: runs at this site; \
                         new keys are checked at the global controller, and tuples other sites \
                         may hold need the primary-copy lock first"
                    ));
                    continue;
                }
                _ => {
                    lines.push("not a retrieval: runs at this site only".to_string());
                    continue;
                }
            };
            let plan = plan(&select, &site.catalog, &site.mapping())?;
            let current = self.projections(&plan)?;
            let coverage = self.coverage(&plan, &current);
            let (missing, _) = self.missing_groups(&plan, &coverage)?;
            lines.push(match (&plan.query, missing.contains(&true)) {
                (None, _) => {
                    "covered: nothing to fetch (no relation of the query is mapped)".into()
                }
                (Some(_), false) => {
                    let nos: BTreeSet<String> = coverage
                        .groups
                        .iter()
                        .flatten()
                        .map(|n| n.0.to_string())
                        .collect();
                    let held = coverage.groups.iter().any(Option::is_none);
                    match (nos.is_empty(), held) {
                        (false, false) => format!(
                            "covered: yes, by snapshot {}",
                            nos.into_iter().collect::<Vec<_>>().join(", ")
                        ),
                        (false, true) => format!(
                            "covered: yes, by snapshot {} and the tuple this site holds with the \
                             key asked for",
                            nos.into_iter().collect::<Vec<_>>().join(", ")
                        ),
                        (true, _) => {
                            "covered: yes, this site holds the tuple with the key asked for \
                             (keys are unique in the global snapshot)"
                                .to_string()
                        }
                    }
                }
                (Some(_), true) => "covered: no, the global snapshot will be asked".into(),
            });
            lines.extend(plan.to_string().lines().map(str::to_string));
        }
        Ok(Outcome::Rows {
            columns: vec![ResultColumn {
                name: "plan".into(),
                kind: ColumnKind::Text,
            }],
            rows: lines.into_iter().map(|l| vec![Value::Text(l)]).collect(),
        })
    }

    /// Answers `text` at once if it is a read found covered earlier and
    /// nothing it was judged on has changed since.
    fn repeat_covered(&mut self, text: &str) -> Result<Option<Answer>> {
        if !self.pending.is_empty() {
            return Ok(None);
        }
        // The stamp is read only for a text with a verdict.
        let Some(verdict) = self.reads.get(text, || {
            Stamp::now(&self.conn, self.site.mapping(), &self.site.definitions)
        })?
        else {
            return Ok(None);
        };
        let day = today();
        if verdict.touched != day {
            verdict.touched = day;
            let used = verdict.used.clone();
            self.site.touch(&used)?;
        }
        self.site
            .repeated_reads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // The statement stays compiled for its next repetition.
        let mut stmt = self.conn.prepare_cached(text)?;
        Ok(Some(Answer {
            outcomes: vec![self.outcome(&mut stmt)?],
            notices: Vec::new(),
        }))
    }

    fn stamp(&self) -> Result<Stamp> {
        Stamp::now(&self.conn, self.site.mapping(), &self.site.definitions)
    }

    fn execute_text(&mut self, text: &str) -> Result<Answer> {
        if let Some(answer) = self.repeat_covered(text)? {
            return Ok(answer);
        }
        let trimmed = text.trim_start();
        let mut answer = Answer::default();
        if trimmed.trim().trim_end_matches(';').trim().is_empty() {
            return Ok(answer);
        }
        let lower = trimmed.to_ascii_lowercase();
        if let Some(rest) = lower.strip_prefix("explain snaps") {
            let stmt = &trimmed[trimmed.len() - rest.len()..];
            answer.outcomes.push(self.explain(stmt)?);
            return Ok(answer);
        }
        if crate::catalogue::asks(text) {
            answer.outcomes =
                crate::catalogue::answer(&self.site.catalog, self.site.code.as_str(), text)?;
            return Ok(answer);
        }
        let matches = crate::identity::calls(text)?;
        if !matches.is_empty() {
            self.reads.clear();
            answer.outcomes = self.run_identity(text, &matches)?;
            return Ok(answer);
        }
        let (lang, parsed) = if looks_like_quel(text) {
            (Language::Quel, self.quel.parse(text).map_err(Error::from))
        } else {
            (
                Language::Sql,
                snaps_mapping::sql::parse(text).map_err(Error::from),
            )
        };
        let stmts = match parsed {
            Ok(s) => s,
            // Statements SNAPS does not model (DDL, PRAGMA, transactions,
            // SQLite's own syntax) go to SQLite as they are.
            Err(_) if lang == Language::Sql => {
                self.reads.clear();
                if writes_mapping_tables(&lower) {
                    return Err(Error::Invalid(
                        "the mapping tables are written with plain INSERT, UPDATE and DELETE \
                         statements, so that every change is checked"
                            .into(),
                    ));
                }
                answer.outcomes = self.run_local(text)?;
                return Ok(answer);
            }
            Err(e) => return Err(e),
        };
        let single = stmts.len() == 1;
        // A verdict is remembered only for one SQL read run as written;
        // anything else may change what the verdicts were drawn from.
        let repeatable =
            single && lang == Language::Sql && matches!(stmts[0], Statement::Select(_));
        if !repeatable {
            self.reads.clear();
        }
        for stmt in stmts {
            // SQL runs as the client wrote it; QUEL as its SQL translation.
            let local_sql = if single && lang == Language::Sql {
                text.to_string()
            } else {
                stmt.to_string()
            };
            match &stmt {
                Statement::Select(s) => {
                    let stamp = if repeatable && self.pending.is_empty() {
                        Some(self.stamp()?)
                    } else {
                        None
                    };
                    match self.prepare_retrieval(s, lang, text)? {
                        Retrieved::Covered(used) => {
                            if let Some(stamp) = stamp {
                                self.reads.remember(text, stamp, used, today());
                            }
                        }
                        Retrieved::Fetched => {}
                        Retrieved::LocalOnly(n) => {
                            if !answer.notices.contains(&n) {
                                answer.notices.push(n);
                            }
                        }
                    }
                    answer.outcomes.extend(self.run_local(&local_sql)?);
                }
                Statement::DefineSnapshot { query, .. } => {
                    if let Retrieved::LocalOnly(n) = self.prepare_retrieval(query, lang, text)? {
                        answer.notices.push(n);
                    }
                    answer.outcomes.push(Outcome::Command {
                        tag: "DEFINE SNAPSHOT".into(),
                    });
                }
                Statement::Insert(Insert { relation, .. })
                | Statement::Update(Update {
                    target: Range { relation, .. },
                    ..
                })
                | Statement::Delete(Delete {
                    target: Range { relation, .. },
                    ..
                }) if MAPPING_TABLES.contains(&relation.as_str()) => {
                    answer.outcomes.push(self.edit_mapping(&local_sql)?);
                    let n = MAPPING_EDIT_NOTICE.to_string();
                    if !answer.notices.contains(&n) {
                        answer.notices.push(n);
                    }
                }
                Statement::Insert(i) if self.site.mapped.contains(&i.relation) => {
                    let (outcome, notice) = self.insert(i)?;
                    if let Some(n) = notice
                        && !answer.notices.contains(&n)
                    {
                        answer.notices.push(n);
                    }
                    answer.outcomes.push(outcome);
                }
                Statement::Update(u) if self.site.mapped.contains(&u.target.relation) => {
                    let (outcome, notice) = self.update(u, &local_sql)?;
                    if let Some(n) = notice
                        && !answer.notices.contains(&n)
                    {
                        answer.notices.push(n);
                    }
                    answer.outcomes.push(outcome);
                }
                Statement::Delete(d) if self.site.mapped.contains(&d.target.relation) => {
                    let (outcome, notice) = self.delete(d, &local_sql)?;
                    if let Some(n) = notice
                        && !answer.notices.contains(&n)
                    {
                        answer.notices.push(n);
                    }
                    answer.outcomes.push(outcome);
                }
                _ => answer.outcomes.extend(self.run_local(&local_sql)?),
            }
        }
        Ok(answer)
    }
}

impl Session for SiteSession {
    fn execute(&mut self, text: &str) -> std::result::Result<Answer, EngineError> {
        tracing::debug!(site = %self.site.code, user = %self.user, text, "execute");
        let answer = self.execute_text(text);
        self.settle().map_err(engine_error)?;
        answer.map_err(engine_error)
    }

    fn describe(&mut self, text: &str) -> std::result::Result<Vec<ResultColumn>, EngineError> {
        let lower = text.trim_start().to_ascii_lowercase();
        if lower.starts_with("explain snaps") {
            return Ok(vec![ResultColumn {
                name: "plan".into(),
                kind: ColumnKind::Text,
            }]);
        }
        if crate::catalogue::asks(text) {
            let outcomes =
                crate::catalogue::answer(&self.site.catalog, self.site.code.as_str(), text)
                    .map_err(engine_error)?;
            return Ok(match outcomes.into_iter().next() {
                Some(Outcome::Rows { columns, .. }) => columns,
                _ => Vec::new(),
            });
        }
        let matches = crate::identity::calls(text).map_err(engine_error)?;
        if !matches.is_empty() {
            // The tables the match calls stand for, empty, tell the
            // columns; what a link did is text.
            let sql = crate::identity::prepare(&self.conn, text, &matches, &[]);
            let described = sql.and_then(|sql| self.describe_local(&sql));
            crate::identity::clean(&self.conn, &matches);
            return described.map_err(engine_error);
        }
        let sql = if looks_like_quel(text) {
            let mut quel = self.quel.clone();
            let stmts = quel.parse(text).map_err(|e| engine_error(e.into()))?;
            match stmts.first() {
                Some(s) => s.to_string(),
                None => return Ok(Vec::new()),
            }
        } else {
            text.to_string()
        };
        self.describe_local(&sql).map_err(engine_error)
    }
}

impl SiteSession {
    /// The result columns of SQL that SQLite runs as it is.
    fn describe_local(&self, sql: &str) -> Result<Vec<ResultColumn>> {
        let mut stmt = self.conn.prepare(sql)?;
        let decls: Vec<(usize, String, Option<ColumnKind>)> = stmt
            .columns()
            .enumerate()
            .filter(|(_, c)| c.name() != STATUS_COLUMN)
            .map(|(i, c)| (i, c.name().to_string(), kind_of_decl(c.decl_type())))
            .collect();
        // An expression has no declared type: a read-only statement's first
        // row says what SQLite makes of it (`SELECT 3.0` is a REAL, so
        // float8), before the name's guess.
        let mut seen: BTreeMap<usize, ColumnKind> = BTreeMap::new();
        if decls.iter().any(|d| d.2.is_none())
            && stmt.readonly()
            && let Ok(mut rows) = stmt.query([])
            && let Ok(Some(r)) = rows.next()
        {
            for (i, _, d) in &decls {
                let kind = match (d, r.get_ref(*i)) {
                    (None, Ok(rusqlite::types::ValueRef::Real(_))) => ColumnKind::Float,
                    (None, Ok(rusqlite::types::ValueRef::Integer(_))) => ColumnKind::Int,
                    _ => continue,
                };
                seen.insert(*i, kind);
            }
        }
        Ok(decls
            .into_iter()
            .map(|(i, name, decl)| ResultColumn {
                kind: decl
                    .or_else(|| seen.get(&i).copied())
                    .unwrap_or_else(|| kind_of_expression(&name)),
                name,
            })
            .collect())
    }
}
