//! The global store on an embedded SQLite database.
//!
//! Each global relation is a table with the schema's attributes and the
//! status columns of appendix B, kept as columns rather than one packed word
//! so they can be indexed and the sent-to bitmap can grow past 32 sites:
//! `tuple_id` (never reused), `main_tuple_id` (pieces of a split by
//! non-unique key), `snaps_owner`, `snaps_origin` (the owner's own number of
//! the tuple: loading twice does not duplicate), `snaps_rights` (appendix-B
//! code), `snaps_lock_site`, `snaps_sent_to` (bitmap, any length),
//! `snaps_user`.
//!
//! Calls are serialised by one connection behind a mutex: SQLite has one
//! writer anyway, and a fetch writes (it records the copies it sends).
//! Temporary tuples live in `temp` tables of that connection inside the
//! request's transaction, so no other request sees them and a failed request
//! rolls them back with everything else; a crash loses them with the
//! connection, so nothing is left to clean on start.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::Mutex;

use rusqlite::types::{ToSqlOutput, Value as SqlValue, ValueRef};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params_from_iter};
use snaps_schema::{Catalog, GlobalRights, RelationMode, SentTo, SiteNo, Value, sql_ident};

use crate::compile::{STATUS_COLUMNS, compile_group, temp_table};
use crate::config::GlobalConfig;
use crate::error::{Error, Result};
use crate::query::{FetchQuery, Split};
use crate::store::*;

mod audit;
mod groups;
mod refresh;
mod summary;

/// The SQLite global store.
pub struct SqliteStore {
    conn: Mutex<Connection>,
    catalog: Catalog,
    modes: BTreeMap<String, RelationMode>,
    /// Site number → code.
    sites: BTreeMap<u32, String>,
    /// Relations whose owners' deletes remove the copies at other sites.
    propagate_deletes: BTreeSet<String>,
}

fn to_sql(v: &Value) -> ToSqlOutput<'_> {
    match v {
        Value::Null => ToSqlOutput::Owned(SqlValue::Null),
        Value::Int(i) => ToSqlOutput::Owned(SqlValue::Integer(*i)),
        Value::Float(f) => ToSqlOutput::Owned(SqlValue::Real(*f)),
        Value::Text(s) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
    }
}

fn from_sql(v: ValueRef<'_>) -> Value {
    match v {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(i) => Value::Int(i),
        ValueRef::Real(f) => Value::Float(f),
        ValueRef::Text(t) | ValueRef::Blob(t) => {
            Value::Text(String::from_utf8_lossy(t).into_owned())
        }
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn default_rights(mode: RelationMode) -> GlobalRights {
    match mode {
        RelationMode::ReadWrite => GlobalRights::ReadWrite,
        RelationMode::ReadOnly => GlobalRights::ReadOnly,
    }
}

fn mode_name(mode: RelationMode) -> &'static str {
    match mode {
        RelationMode::ReadWrite => "read-write",
        RelationMode::ReadOnly => "read-only",
    }
}

impl SqliteStore {
    /// Opens (creating on first start) the store of a network.
    pub fn open(path: &Path, config: &GlobalConfig) -> Result<SqliteStore> {
        let conn = Connection::open(path)?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;",
        )?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        let store = SqliteStore {
            conn: Mutex::new(conn),
            catalog: config.catalog.clone(),
            modes: config.modes.clone(),
            sites: config
                .network
                .sites
                .iter()
                .map(|s| (s.number.0, s.code.to_string()))
                .collect(),
            propagate_deletes: config.refresh.propagate_deletes.iter().cloned().collect(),
        };
        store.create(config)?;
        Ok(store)
    }

    /// Appends a batch of a site's own tuples inside `tx` (the initial load
    /// and the refresh's new tuples): a tuple whose origin is known is not
    /// appended again; a taken key becomes a recorded conflict.
    /// Appends a batch of `site`'s tuples; within a refresh epoch (`epoch`)
    /// each new tuple goes into the change log too, so the delta of the
    /// sites' standing groups finds it.
    pub(crate) fn load_in(
        &self,
        tx: &rusqlite::Transaction<'_>,
        site: &SiteId,
        batch: &LoadBatch,
        epoch: Option<u64>,
    ) -> Result<LoadOutcome> {
        let me = i64::from(site.number.0);
        let shape = &batch.shape;
        let main = shape.main();
        let main_rel = &shape.parts[main].relation;
        // Where each part's key attributes are among its columns.
        let mut keys: Vec<Vec<usize>> = Vec::new();
        for p in &shape.parts {
            let rel = self.catalog.relation(&p.relation).ok_or_else(|| {
                Error::InvalidArgument(format!("unknown global relation {}", p.relation))
            })?;
            let pos = rel
                .key
                .iter()
                .map(|k| {
                    p.columns.iter().position(|c| c == k).ok_or_else(|| {
                        Error::InvalidArgument(format!(
                            "the export of {} leaves out its key attribute {k}",
                            p.relation
                        ))
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            keys.push(pos);
        }
        let mut out = LoadOutcome::default();
        for (row, &origin) in batch.origins.iter().enumerate() {
            let seen: bool = tx
                .prepare_cached(&format!(
                    "SELECT EXISTS (SELECT 1 FROM {} WHERE snaps_owner = ?1 AND snaps_origin = ?2)
                     OR EXISTS (SELECT 1 FROM snaps_conflicts WHERE site = ?1 AND relation = ?3 AND origin = ?2)",
                    sql_ident(main_rel)
                ))?
                .query_row(rusqlite::params![me, origin as i64, main_rel], |r| r.get(0))?;
            if seen {
                out.already_loaded += 1;
                continue;
            }
            let mut conflict = None;
            for (pi, p) in shape.parts.iter().enumerate() {
                if keys[pi].is_empty() {
                    continue;
                }
                let values: Vec<&Value> =
                    keys[pi].iter().map(|&k| &batch.parts[pi][row][k]).collect();
                if let Some(k) = keys[pi].iter().zip(&values).find(|(_, v)| v.is_null()) {
                    return Err(Error::InvalidArgument(format!(
                        "tuple {origin}: key attribute {}.{} is NULL",
                        p.relation, p.columns[*k.0]
                    )));
                }
                let cond: Vec<String> = keys[pi]
                    .iter()
                    .enumerate()
                    .map(|(i, &k)| format!("{} = ?{}", sql_ident(&p.columns[k]), i + 1))
                    .collect();
                let holder: Option<i64> = tx
                    .prepare_cached(&format!(
                        "SELECT snaps_owner FROM {} WHERE {} LIMIT 1",
                        sql_ident(&p.relation),
                        cond.join(" AND ")
                    ))?
                    .query_row(params_from_iter(values.iter().map(|v| to_sql(v))), |r| {
                        r.get(0)
                    })
                    .optional()?;
                if let Some(h) = holder {
                    conflict = Some(ConflictRecord {
                        relation: p.relation.clone(),
                        origin,
                        key: values.into_iter().cloned().collect(),
                        holder: self.code(h),
                    });
                    break;
                }
            }
            if let Some(c) = conflict {
                let tuple: BTreeMap<&str, BTreeMap<&str, &Value>> = shape
                    .parts
                    .iter()
                    .enumerate()
                    .map(|(pi, p)| {
                        let vals = p
                            .columns
                            .iter()
                            .map(String::as_str)
                            .zip(&batch.parts[pi][row])
                            .collect();
                        (p.relation.as_str(), vals)
                    })
                    .collect();
                let holder = self
                    .sites
                    .iter()
                    .find(|(_, code)| **code == c.holder)
                    .map_or(0, |(n, _)| i64::from(*n));
                tx.execute(
                    "INSERT INTO snaps_conflicts (site, relation, origin, key, tuple, holder, recorded_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    rusqlite::params![
                        me,
                        main_rel,
                        origin as i64,
                        serde_json::to_string(&c.key).unwrap_or_default(),
                        serde_json::to_string(&tuple).unwrap_or_default(),
                        holder,
                        now()
                    ],
                )?;
                tracing::warn!(site = %site.code, relation = %c.relation, origin, holder = %c.holder, "key conflict recorded");
                out.conflicts.push(c);
                continue;
            }
            let mut main_id: Option<i64> = None;
            let order = std::iter::once(main).chain((0..shape.parts.len()).filter(|p| *p != main));
            for pi in order {
                let p = &shape.parts[pi];
                let rights = default_rights(self.mode(&p.relation)).code();
                let cols: Vec<String> = p.columns.iter().map(|c| sql_ident(c)).collect();
                let n = p.columns.len();
                let marks: Vec<String> = (1..=n + 4).map(|i| format!("?{i}")).collect();
                let sql = format!(
                    "INSERT INTO {} ({}{}main_tuple_id, snaps_owner, snaps_origin, snaps_rights) VALUES ({})",
                    sql_ident(&p.relation),
                    cols.join(", "),
                    if n > 0 { ", " } else { "" },
                    marks.join(", ")
                );
                let link = match shape.split {
                    Split::Main(_) if pi != main => main_id,
                    _ => None,
                };
                let mut params: Vec<ToSqlOutput> =
                    batch.parts[pi][row].iter().map(to_sql).collect();
                params.push(ToSqlOutput::Owned(
                    link.map_or(SqlValue::Null, SqlValue::Integer),
                ));
                params.push(ToSqlOutput::Owned(SqlValue::Integer(me)));
                params.push(ToSqlOutput::Owned(SqlValue::Integer(origin as i64)));
                params.push(ToSqlOutput::Owned(SqlValue::Integer(i64::from(rights))));
                tx.prepare_cached(&sql)?.execute(params_from_iter(params))?;
                let id = tx.last_insert_rowid();
                if pi == main {
                    main_id = Some(id);
                }
                if let Some(epoch) = epoch {
                    Self::log_change(tx, epoch, &p.relation, id, me, None)?;
                }
            }
            out.loaded += 1;
        }
        tx.execute(
            "UPDATE snaps_sites SET tuples_loaded = tuples_loaded + ?1 WHERE number = ?2",
            rusqlite::params![out.loaded as i64, me],
        )?;
        Ok(out)
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves no half transaction behind
        // (it rolls back on drop), so the connection is still good.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn code(&self, number: i64) -> String {
        self.sites
            .get(&(number as u32))
            .cloned()
            .unwrap_or_else(|| format!("site {number}"))
    }

    fn mode(&self, relation: &str) -> RelationMode {
        self.modes
            .get(relation)
            .copied()
            .unwrap_or(RelationMode::ReadOnly)
    }

    fn create(&self, config: &GlobalConfig) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute_batch(
            "CREATE TABLE IF NOT EXISTS snaps_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS snaps_sites (
                 number INTEGER PRIMARY KEY, code TEXT NOT NULL UNIQUE, name TEXT NOT NULL,
                 last_seen INTEGER NOT NULL DEFAULT 0, fetches INTEGER NOT NULL DEFAULT 0,
                 tuples_sent INTEGER NOT NULL DEFAULT 0, tuples_loaded INTEGER NOT NULL DEFAULT 0,
                 bytes_received INTEGER NOT NULL DEFAULT 0, bytes_sent INTEGER NOT NULL DEFAULT 0,
                 locks_granted INTEGER NOT NULL DEFAULT 0, locks_refused INTEGER NOT NULL DEFAULT 0);
             CREATE TABLE IF NOT EXISTS snaps_relations (name TEXT PRIMARY KEY, mode TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS snaps_conflicts (
                 id INTEGER PRIMARY KEY, site INTEGER NOT NULL, relation TEXT NOT NULL,
                 origin INTEGER NOT NULL, key TEXT NOT NULL, tuple TEXT NOT NULL,
                 holder INTEGER NOT NULL, recorded_at INTEGER NOT NULL,
                 UNIQUE (site, relation, origin));",
        )?;
        tx.execute_batch(refresh::TABLES)?;
        tx.execute_batch(summary::TABLES)?;
        tx.execute_batch(audit::TABLES)?;
        tx.execute_batch(groups::TABLES)?;
        groups::migrate(&tx)?;
        let fingerprint = self.catalog.fingerprint();
        let stored: Option<String> = tx
            .query_row(
                "SELECT value FROM snaps_meta WHERE key = 'schema'",
                [],
                |r| r.get(0),
            )
            .optional()?;
        match stored {
            Some(f) if f != fingerprint => {
                return Err(Error::Config(format!(
                    "the store was made for global schema {f}, the network's is {fingerprint}; \
                     start with a new store file or restore the schema"
                )));
            }
            Some(_) => {}
            None => {
                tx.execute(
                    "INSERT INTO snaps_meta (key, value) VALUES ('schema', ?1)",
                    [&fingerprint],
                )?;
            }
        }
        for s in &config.network.sites {
            tx.execute(
                "INSERT INTO snaps_sites (number, code, name) VALUES (?1, ?2, ?3)
                 ON CONFLICT (number) DO UPDATE SET code = excluded.code, name = excluded.name",
                rusqlite::params![s.number.0, s.code.as_str(), s.name],
            )?;
        }
        for r in self.catalog.relations() {
            for a in &r.attributes {
                if STATUS_COLUMNS.contains(&a.name.as_str()) || a.name.starts_with("snaps_") {
                    return Err(Error::Config(format!(
                        "global attribute {}.{} clashes with a status column of the global store",
                        r.name, a.name
                    )));
                }
            }
            let mode = self.mode(&r.name);
            tx.execute(
                "INSERT INTO snaps_relations (name, mode) VALUES (?1, ?2)
                 ON CONFLICT (name) DO UPDATE SET mode = excluded.mode",
                [&r.name, mode_name(mode)],
            )?;
            let name = sql_ident(&r.name);
            let cols: Vec<String> = r
                .attributes
                .iter()
                .map(|a| format!("{} {}", sql_ident(&a.name), a.ty.sql_name()))
                .collect();
            tx.execute_batch(&format!(
                "CREATE TABLE IF NOT EXISTS {name} (
                     tuple_id INTEGER PRIMARY KEY AUTOINCREMENT, {},
                     main_tuple_id INTEGER, snaps_owner INTEGER NOT NULL,
                     snaps_origin INTEGER NOT NULL, snaps_rights INTEGER NOT NULL,
                     snaps_lock_site INTEGER, snaps_sent_to BLOB NOT NULL DEFAULT x'',
                     snaps_user INTEGER);
                 CREATE UNIQUE INDEX IF NOT EXISTS {} ON {name} (snaps_owner, snaps_origin);
                 CREATE INDEX IF NOT EXISTS {} ON {name} (main_tuple_id) WHERE main_tuple_id IS NOT NULL;
                 CREATE INDEX IF NOT EXISTS {} ON {name} (snaps_lock_site) WHERE snaps_lock_site IS NOT NULL;",
                cols.join(", "),
                sql_ident(&format!("{}__origin", r.name)),
                sql_ident(&format!("{}__main", r.name)),
                sql_ident(&format!("{}__locks", r.name)),
            ))?;
            let mut indexes: Vec<Vec<String>> = Vec::new();
            if !r.key.is_empty() {
                indexes.push(r.key.clone());
            }
            indexes.extend(config.indexes.get(&r.name).cloned().unwrap_or_default());
            for attrs in indexes {
                let ix = sql_ident(&format!("{}__{}", r.name, attrs.join("_")));
                let cols: Vec<String> = attrs.iter().map(|a| sql_ident(a)).collect();
                tx.execute_batch(&format!(
                    "CREATE INDEX IF NOT EXISTS {ix} ON {name} ({})",
                    cols.join(", ")
                ))?;
            }
        }
        tx.commit()?;
        Ok(())
    }
}

/// A part tuple read for a fetch reply: owner, sent-to bitmap, values.
type PartTuple = (i64, Vec<u8>, Vec<Value>);

/// A tuple's status as read for a lock or release.
struct Status {
    tuple_id: i64,
    owner: i64,
    rights: GlobalRights,
    lock_site: Option<i64>,
    sent_to: Vec<u8>,
}

fn read_status(
    tx: &rusqlite::Transaction<'_>,
    catalog: &Catalog,
    site: &SiteId,
    t: &TupleRef,
) -> Result<Status> {
    let rel = catalog.relation(&t.relation).ok_or_else(|| {
        Error::InvalidArgument(format!("unknown global relation {:?}", t.relation))
    })?;
    let (cond, a, b) = match t.id {
        TupleSel::Id(i) => ("tuple_id = ?1 AND ?2 = ?2", i as i64, 0),
        TupleSel::Origin(o) => (
            "snaps_origin = ?1 AND snaps_owner = ?2",
            o as i64,
            i64::from(site.number.0),
        ),
    };
    let sql = format!(
        "SELECT tuple_id, snaps_owner, snaps_rights, snaps_lock_site, snaps_sent_to FROM {} WHERE {cond}",
        sql_ident(&rel.name)
    );
    tx.prepare_cached(&sql)?
        .query_row([a, b], |r| {
            Ok(Status {
                tuple_id: r.get(0)?,
                owner: r.get(1)?,
                rights: GlobalRights::from_code(r.get::<_, u8>(2)?),
                lock_site: r.get(3)?,
                sent_to: r.get(4)?,
            })
        })
        .optional()?
        .ok_or_else(|| Error::NotFound(format!("{t} does not exist")))
}

impl GlobalStore for SqliteStore {
    fn load(&self, site: &SiteId, batch: &LoadBatch) -> Result<LoadOutcome> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let out = self.load_in(&tx, site, batch, None)?;
        tx.commit()?;
        Ok(out)
    }

    fn load_progress(&self, site: &SiteId, relation: &str) -> Result<u64> {
        let rel = self.catalog.relation(relation).ok_or_else(|| {
            Error::InvalidArgument(format!("unknown global relation {relation:?}"))
        })?;
        let conn = self.conn();
        let max: i64 = conn.query_row(
            &format!(
                "SELECT max(coalesce((SELECT max(snaps_origin) FROM {} WHERE snaps_owner = ?1), 0),
                            coalesce((SELECT max(origin) FROM snaps_conflicts WHERE site = ?1 AND relation = ?2), 0))",
                sql_ident(&rel.name)
            ),
            rusqlite::params![i64::from(site.number.0), rel.name],
            |r| r.get(0),
        )?;
        Ok(max as u64)
    }

    fn fetch(&self, site: &SiteId, q: &FetchQuery) -> Result<Vec<FetchedTable>> {
        let me = i64::from(site.number.0);
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut out = Vec::new();
        // (relation, tuple id) → its new sent-to bitmap where it changes,
        // for every tuple returned.
        let mut returned: HashMap<(&str, i64), Option<SentTo>> = HashMap::new();
        for (gi, g) in q.groups.iter().enumerate() {
            let sjs: Vec<&crate::query::SemiJoin> =
                q.semijoins.iter().filter(|s| s.group == gi).collect();
            if sjs.len() > 8 {
                return Err(Error::InvalidArgument(format!(
                    "{} semi-join projections in one join group; at most 8",
                    sjs.len()
                )));
            }
            for sj in &sjs {
                let cols: Vec<String> = (0..sj.columns.len()).map(|n| format!("c{n}")).collect();
                let name = temp_table(sj.table);
                tx.execute_batch(&format!(
                    "DROP TABLE IF EXISTS temp.{name}; CREATE TEMP TABLE {name} ({})",
                    if cols.is_empty() {
                        "c0".into()
                    } else {
                        cols.join(", ")
                    }
                ))?;
                let marks: Vec<String> = (1..=sj.columns.len()).map(|i| format!("?{i}")).collect();
                let mut ins = tx.prepare(&format!(
                    "INSERT INTO temp.{name} ({}) VALUES ({})",
                    cols.join(", "),
                    marks.join(", ")
                ))?;
                for row in &sj.rows {
                    ins.execute(params_from_iter(row.iter().map(to_sql)))?;
                }
            }
            // Per table: the reassembled tuples wanted, as their parts' ids.
            let mut wanted: BTreeMap<usize, BTreeSet<Vec<Option<i64>>>> = BTreeMap::new();
            for mask in 0u32..(1 << sjs.len()) {
                let temps: Vec<(usize, &crate::query::SemiJoin)> = sjs
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| mask & (1 << i) != 0)
                    .map(|(_, s)| (s.table, *s))
                    .collect();
                if temps.len() == g.tables.len() || temps.iter().any(|(_, s)| s.rows.is_empty()) {
                    continue;
                }
                // A delta: one evaluation per table read from the snapshot,
                // that table's changed tuples against the others whole.
                let terms: Vec<Option<(usize, u64)>> = match q.changed_after {
                    None => vec![None],
                    Some(e) => (0..g.tables.len())
                        .filter(|t| temps.iter().all(|(x, _)| x != t))
                        .map(|t| Some((t, e)))
                        .collect(),
                };
                for term in terms {
                    let c = compile_group(g, &temps, term);
                    tracing::debug!(sql = %c.sql, "fetch");
                    let mut stmt = tx.prepare_cached(&c.sql)?;
                    let mut rows = stmt.query(params_from_iter(c.params.iter().map(to_sql)))?;
                    while let Some(r) = rows.next()? {
                        let mut col = 0;
                        for &(ti, nparts) in &c.tables {
                            let mut ids = Vec::with_capacity(nparts);
                            let mut want = false;
                            for _ in 0..nparts {
                                let id: Option<i64> = r.get(col)?;
                                let owner: Option<i64> = r.get(col + 1)?;
                                let sent: Option<Vec<u8>> = r.get(col + 2)?;
                                col += 3;
                                if let (Some(_), Some(owner)) = (id, owner) {
                                    let held = SentTo::from_bytes(&sent.unwrap_or_default())
                                        .contains(site.number);
                                    want |= owner != me && (q.include_held || !held);
                                }
                                ids.push(id);
                            }
                            if want {
                                wanted.entry(ti).or_default().insert(ids);
                            }
                        }
                    }
                }
            }
            for sj in &sjs {
                tx.execute_batch(&format!("DROP TABLE temp.{}", temp_table(sj.table)))?;
            }
            for (ti, rows) in wanted {
                let shape = &g.tables[ti].shape;
                // Values of every part tuple needed, by id.
                let mut values: Vec<HashMap<i64, PartTuple>> = Vec::new();
                for (pi, p) in shape.parts.iter().enumerate() {
                    let ids: BTreeSet<i64> = rows.iter().filter_map(|r| r[pi]).collect();
                    let ids: Vec<i64> = ids.into_iter().collect();
                    let mut found = HashMap::new();
                    let cols: Vec<String> = p.columns.iter().map(|c| sql_ident(c)).collect();
                    for chunk in ids.chunks(500) {
                        let marks: Vec<String> =
                            (1..=chunk.len()).map(|i| format!("?{i}")).collect();
                        let sql = format!(
                            "SELECT tuple_id, snaps_owner, snaps_sent_to{}{} FROM {} WHERE tuple_id IN ({})",
                            if cols.is_empty() { "" } else { ", " },
                            cols.join(", "),
                            sql_ident(&p.relation),
                            marks.join(", ")
                        );
                        let mut stmt = tx.prepare_cached(&sql)?;
                        let mut rs = stmt.query(params_from_iter(chunk))?;
                        while let Some(r) = rs.next()? {
                            let vals = (0..cols.len())
                                .map(|i| r.get_ref(3 + i).map(from_sql))
                                .collect::<rusqlite::Result<Vec<_>>>()?;
                            found.insert(r.get(0)?, (r.get(1)?, r.get(2)?, vals));
                        }
                    }
                    values.push(found);
                }
                let mut table = FetchedTable {
                    group: gi,
                    table: ti,
                    parts: shape
                        .parts
                        .iter()
                        .map(|_| FetchedPart {
                            tuple_ids: Vec::new(),
                            rows: Vec::new(),
                        })
                        .collect(),
                    owners: Vec::new(),
                };
                for ids in rows {
                    let fresh = ids.iter().enumerate().any(|(pi, id)| {
                        id.is_some_and(|id| {
                            !returned.contains_key(&(shape.parts[pi].relation.as_str(), id))
                        })
                    });
                    if !fresh {
                        continue;
                    }
                    // Every part of a tuple has the same owner.
                    let owner = ids
                        .iter()
                        .enumerate()
                        .find_map(|(pi, id)| id.and_then(|id| values[pi].get(&id)).map(|v| v.0));
                    table.owners.push(SiteNo(owner.unwrap_or(0) as u32));
                    for (pi, id) in ids.iter().enumerate() {
                        let p = &shape.parts[pi];
                        let part = &mut table.parts[pi];
                        match id.and_then(|id| values[pi].get(&id).map(|v| (id, v))) {
                            Some((id, (owner, sent, vals))) => {
                                part.tuple_ids.push(id as u64);
                                part.rows.push(vals.clone());
                                let mut sent = SentTo::from_bytes(sent);
                                let changed = *owner != me && !sent.contains(site.number);
                                sent.insert(site.number);
                                returned.insert((p.relation.as_str(), id), changed.then_some(sent));
                            }
                            None => {
                                part.tuple_ids.push(0);
                                part.rows.push(vec![Value::Null; p.columns.len()]);
                            }
                        }
                    }
                }
                if !table.is_empty() {
                    out.push(table);
                }
            }
        }
        for ((relation, id), sent) in &returned {
            let Some(sent) = sent else { continue };
            let mut stmt = tx.prepare_cached(&format!(
                "UPDATE {} SET snaps_sent_to = ?1 WHERE tuple_id = ?2",
                sql_ident(relation)
            ))?;
            stmt.execute(rusqlite::params![sent.to_bytes(), id])?;
        }
        tx.commit()?;
        Ok(out)
    }

    fn lock(&self, site: &SiteId, tuples: &[TupleRef]) -> Result<LockOutcome> {
        if tuples.is_empty() {
            return Err(Error::InvalidArgument(
                "a lock request names no tuples".into(),
            ));
        }
        let me = i64::from(site.number.0);
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut to_lock = Vec::new();
        let mut refusal = None;
        for t in tuples {
            let s = read_status(&tx, &self.catalog, site, t)?;
            if self.mode(&t.relation) == RelationMode::ReadOnly {
                if s.owner != me {
                    refusal = Some((t.clone(), Refusal::ReadOnly, self.code(s.owner)));
                    break;
                }
                // The owner changes its own tuples of a read-only relation
                // without a lock: nothing to record.
                continue;
            }
            match (s.rights, s.lock_site) {
                (GlobalRights::Locked, Some(holder)) if holder != me => {
                    refusal = Some((t.clone(), Refusal::Locked, self.code(holder)));
                    break;
                }
                _ => to_lock.push((t.relation.clone(), s.tuple_id)),
            }
        }
        let outcome =
            match refusal {
                Some((tuple, reason, holder)) => LockOutcome::Refused {
                    tuple,
                    reason,
                    holder,
                },
                None => {
                    for (relation, id) in &to_lock {
                        tx.prepare_cached(&format!(
                        "UPDATE {} SET snaps_rights = ?1, snaps_lock_site = ?2 WHERE tuple_id = ?3",
                        sql_ident(relation)
                    ))?
                    .execute(rusqlite::params![GlobalRights::Locked.code(), me, id])?;
                    }
                    LockOutcome::Granted
                }
            };
        tx.commit()?;
        Ok(outcome)
    }

    fn key_owners(
        &self,
        relation: &str,
        attributes: &[String],
        keys: &[Vec<Value>],
    ) -> Result<Vec<Option<String>>> {
        let conn = self.conn();
        let cond: Vec<String> = attributes
            .iter()
            .enumerate()
            .map(|(i, a)| format!("{} = ?{}", sql_ident(a), i + 1))
            .collect();
        let sql = format!(
            "SELECT snaps_owner FROM {} WHERE {} LIMIT 1",
            sql_ident(relation),
            cond.join(" AND ")
        );
        let mut stmt = conn.prepare_cached(&sql)?;
        keys.iter()
            .map(|k| {
                let owner: Option<i64> = stmt
                    .query_row(params_from_iter(k.iter().map(to_sql)), |r| r.get(0))
                    .optional()?;
                Ok(owner.map(|o| self.code(o)))
            })
            .collect()
    }

    fn unlock(&self, site: &SiteId, tuples: &[TupleRef]) -> Result<u64> {
        let me = i64::from(site.number.0);
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut released = 0;
        for t in tuples {
            let s = read_status(&tx, &self.catalog, site, t)?;
            if s.rights == GlobalRights::Locked && s.lock_site == Some(me) {
                let rights = default_rights(self.mode(&t.relation)).code();
                tx.prepare_cached(&format!(
                    "UPDATE {} SET snaps_rights = ?1, snaps_lock_site = NULL WHERE tuple_id = ?2",
                    sql_ident(&t.relation)
                ))?
                .execute(rusqlite::params![rights, s.tuple_id])?;
                released += 1;
            }
        }
        tx.commit()?;
        Ok(released)
    }

    fn release_copies(&self, site: &SiteId, tuples: &[TupleRef]) -> Result<u64> {
        let me = i64::from(site.number.0);
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut released = 0;
        // Tuples their owner deleted are no longer in their relation.
        let mut gone: HashMap<String, Vec<i64>> = HashMap::new();
        for t in tuples {
            let s = match read_status(&tx, &self.catalog, site, t) {
                Ok(s) => s,
                Err(Error::NotFound(_)) if matches!(t.id, TupleSel::Id(_)) => {
                    if let TupleSel::Id(id) = t.id {
                        gone.entry(t.relation.clone()).or_default().push(id as i64);
                    }
                    continue;
                }
                Err(e) => return Err(e),
            };
            if s.lock_site == Some(me) {
                return Err(Error::FailedPrecondition(format!(
                    "{t} is locked by {}: its change must reach the global snapshot at refresh before the copy goes",
                    site.code
                )));
            }
            let mut sent = SentTo::from_bytes(&s.sent_to);
            if sent.contains(site.number) {
                sent.remove(site.number);
                tx.prepare_cached(&format!(
                    "UPDATE {} SET snaps_sent_to = ?1 WHERE tuple_id = ?2",
                    sql_ident(&t.relation)
                ))?
                .execute(rusqlite::params![sent.to_bytes(), s.tuple_id])?;
                released += 1;
            }
        }
        released += Self::release_gone(&tx, site, &gone)?;
        tx.commit()?;
        Ok(released)
    }

    fn record_activity(&self, activity: &[(SiteNo, Activity)]) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        for (site, a) in activity {
            tx.execute(
                "UPDATE snaps_sites SET bytes_received = bytes_received + ?1,
                     bytes_sent = bytes_sent + ?2, last_seen = max(last_seen, ?3),
                     fetches = fetches + ?4, tuples_sent = tuples_sent + ?5,
                     locks_granted = locks_granted + ?6, locks_refused = locks_refused + ?7
                 WHERE number = ?8",
                rusqlite::params![
                    a.bytes_received as i64,
                    a.bytes_sent as i64,
                    a.last_seen,
                    a.fetches as i64,
                    a.tuples_sent as i64,
                    a.locks_granted as i64,
                    a.locks_refused as i64,
                    site.0
                ],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    fn epoch(&self) -> Result<Option<EpochState>> {
        self.epoch_state()
    }

    fn open_epoch(&self, participants: &[SiteNo]) -> Result<EpochState> {
        self.open_next_epoch(participants)
    }

    fn stage_push(
        &self,
        site: &SiteId,
        epoch: u64,
        body: &[u8],
        audit: &AuditRecord,
    ) -> Result<()> {
        self.stage(site, epoch, body, audit)
    }

    fn commit_epoch(&self, epoch: u64) -> Result<CommitSummary> {
        self.commit(epoch)
    }

    fn changes(
        &self,
        site: &SiteId,
        since: u64,
        parts: &[(String, Vec<String>)],
        summaries: &SummaryRequest,
    ) -> Result<Changes> {
        self.changes_for(site, since, parts, summaries)
    }

    fn acknowledge(&self, site: &SiteId, epoch: u64) -> Result<()> {
        self.ack(site, epoch)
    }

    fn close_epoch(&self, epoch: u64) -> Result<()> {
        self.close(epoch)
    }

    fn resync(&self, site: &SiteId, held: &BTreeMap<String, BTreeSet<u64>>) -> Result<(u64, u64)> {
        self.resync_held(site, held)
    }

    fn conflicts(&self) -> Result<Vec<ConflictEntry>> {
        self.conflict_list()
    }

    fn acl_rules(&self) -> Result<Vec<(Subject, Right)>> {
        self.acl_rules_stored()
    }

    fn set_acl(
        &self,
        subject: &Subject,
        right: Option<Right>,
        audit: &AuditRecord,
    ) -> Result<bool> {
        self.store_acl(subject, right, audit)
    }

    fn append_audit(&self, records: &[AuditRecord]) -> Result<()> {
        self.append_audit_records(records)
    }

    fn remember_groups(&self, site: &SiteId, groups: &[(u64, Vec<u8>)]) -> Result<()> {
        self.remember_group_bodies(site, groups)
    }

    fn recall_groups(&self, site: &SiteId, names: &[u64]) -> Result<HashMap<u64, Vec<u8>>> {
        self.recall_group_bodies(site, names)
    }

    fn change_standing(
        &self,
        site: &SiteId,
        added: &[u64],
        removed: &[u64],
        whole: bool,
    ) -> Result<(Vec<u64>, u64)> {
        self.change_standing_bodies(site, added, removed, whole)
    }

    fn standing_groups(&self, site: &SiteId) -> Result<Vec<(u64, Vec<u8>)>> {
        self.standing_bodies(site)
    }

    fn audit(&self, filter: &AuditFilter) -> Result<Vec<AuditRecord>> {
        self.audit_records(filter)
    }

    fn status(&self) -> Result<StatusReport> {
        let conn = self.conn();
        let mut report = StatusReport::default();
        let mut owned: BTreeMap<i64, u64> = BTreeMap::new();
        for r in self.catalog.relations() {
            let name = sql_ident(&r.name);
            let (tuples, locked): (i64, i64) = conn.query_row(
                &format!("SELECT count(*), count(snaps_lock_site) FROM {name}"),
                [],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )?;
            let mut stmt = conn.prepare(&format!(
                "SELECT snaps_owner, count(*) FROM {name} GROUP BY snaps_owner"
            ))?;
            for row in
                stmt.query_map([], |row| Ok((row.get::<_, i64>(0)?, row.get::<_, i64>(1)?)))?
            {
                let (o, n) = row?;
                *owned.entry(o).or_default() += n as u64;
            }
            report.relations.push(RelationReport {
                name: r.name.clone(),
                mode: self.mode(&r.name),
                tuples: tuples as u64,
                locked: locked as u64,
            });
        }
        let mut stmt = conn.prepare(
            "SELECT number, code, name, last_seen, fetches, tuples_sent, bytes_received, bytes_sent,
                    locks_granted, locks_refused FROM snaps_sites ORDER BY number",
        )?;
        for row in stmt.query_map([], |r| {
            Ok(SiteReport {
                number: r.get(0)?,
                code: r.get(1)?,
                name: r.get(2)?,
                last_seen: r.get(3)?,
                fetches: r.get::<_, i64>(4)? as u64,
                tuples_sent: r.get::<_, i64>(5)? as u64,
                bytes_received: r.get::<_, i64>(6)? as u64,
                bytes_sent: r.get::<_, i64>(7)? as u64,
                locks_granted: r.get::<_, i64>(8)? as u64,
                locks_refused: r.get::<_, i64>(9)? as u64,
                owned_tuples: 0,
            })
        })? {
            let mut s = row?;
            s.owned_tuples = owned.get(&i64::from(s.number)).copied().unwrap_or(0);
            report.sites.push(s);
        }
        report.conflicts = conn.query_row("SELECT count(*) FROM snaps_conflicts", [], |r| {
            r.get::<_, i64>(0)
        })? as u64;
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn config(network: &str, store: &Path) -> GlobalConfig {
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../fixtures")
            .join(network);
        let network = snaps_schema::NetworkConfig::load(&dir).unwrap();
        GlobalConfig::new(
            "127.0.0.1:0".parse().unwrap(),
            store.to_path_buf(),
            network,
            BTreeMap::new(),
            BTreeMap::new(),
            BTreeMap::new(),
        )
        .unwrap()
    }

    #[test]
    fn a_store_refuses_another_global_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.db");
        SqliteStore::open(&path, &config("radiology", &path)).unwrap();
        // Reopening with the same schema is fine.
        SqliteStore::open(&path, &config("radiology", &path)).unwrap();
        let err = SqliteStore::open(&path, &config("figures", &path))
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("the store was made for global schema"),
            "{err}"
        );
    }

    #[test]
    fn every_relation_has_its_status_columns_and_key_index() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.db");
        SqliteStore::open(&path, &config("radiology", &path)).unwrap();
        let conn = Connection::open(&path).unwrap();
        let cols: Vec<String> = conn
            .prepare("SELECT name FROM pragma_table_info('patient')")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        for c in STATUS_COLUMNS {
            assert!(cols.iter().any(|x| x == c), "patient lacks {c}: {cols:?}");
        }
        let indexes: Vec<String> = conn
            .prepare("SELECT name FROM pragma_index_list('visit')")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert!(indexes.iter().any(|i| i == "visit__vno_pno"), "{indexes:?}");
        assert!(indexes.iter().any(|i| i == "visit__origin"), "{indexes:?}");
    }
}
