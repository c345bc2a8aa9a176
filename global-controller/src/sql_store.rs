//! The global store on an SQL database: an embedded SQLite file (the
//! default, for the demo and small networks) or a PostgreSQL server (large
//! networks, several controllers), through [`crate::db`]. One body of logic
//! serves both; the few places their SQL differs ask the dialect.
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
//! Every call is one transaction, which the database may run again whole
//! after a conflict (PostgreSQL at SERIALIZABLE): so a call keeps no state
//! between its statements but what it reads in the same transaction.
//! Temporary tuples live in temporary tables of the transaction's
//! connection, dropped before it ends, so no other request sees them and a
//! failed request rolls them back with everything else; a crash loses them
//! with the connection, so nothing is left to clean on start.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::Path;

use snaps_schema::identity::IdentitySpec;
use snaps_schema::{Catalog, GlobalRights, RelationMode, SentTo, SiteNo, Value, sql_ident};

use crate::compile::{STATUS_COLUMNS, compile_group, temp_table};
use crate::config::GlobalConfig;
use crate::db::postgres::{PgDb, is_unique_violation};
use crate::db::sqlite::SqliteDb;
use crate::db::{Cell, Db, Dialect, Tx};
use crate::error::{Error, Result};
use crate::query::{FetchQuery, Split};
use crate::store::*;

mod audit;
mod groups;
mod identity;
pub mod migrate;
mod refresh;
mod summary;

/// The version of the store's own tables this build writes. A store of a
/// newer version is refused: its tables may mean what this build does not
/// know. Version 1 is the SQLite store before standing join groups; 2 has
/// no hash chain over the audit trail (its records are chained on start);
/// 3 has no identity links (`snaps_link` is created on start).
pub const STORE_VERSION: i64 = 4;

/// Tuples a statement of a load reads or writes at most: a multi-row
/// statement per chunk spares the round trips to a PostgreSQL server, and
/// keeps within SQLite's 32,766 parameters.
const CHUNK: usize = 200;

/// The global store over database `D`.
pub struct SqlStore<D: Db> {
    db: D,
    catalog: Catalog,
    modes: BTreeMap<String, RelationMode>,
    /// Site number → code.
    sites: BTreeMap<u32, String>,
    /// Relations whose owners' deletes remove the copies at other sites.
    propagate_deletes: BTreeSet<String>,
}

/// The global store in an SQLite file.
pub type SqliteStore = SqlStore<SqliteDb>;

/// The global store on a PostgreSQL server.
pub type PgStore = SqlStore<PgDb>;

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

/// `?1, ?2, …` from `first` on, `n` of them.
fn marks(first: usize, n: usize) -> String {
    (first..first + n)
        .map(|i| format!("?{i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl SqliteStore {
    /// Opens (creating on first start) the store of a network in an SQLite
    /// file.
    pub fn open(path: &Path, config: &GlobalConfig) -> Result<SqliteStore> {
        SqlStore::on(SqliteDb::open(path)?, config)
    }
}

impl PgStore {
    /// Opens (creating its tables on first start) the store of a network on
    /// a PostgreSQL server.
    pub fn connect(url: &str, config: &GlobalConfig) -> Result<PgStore> {
        SqlStore::on(PgDb::connect_with(url, config.store_ca.as_deref())?, config)
    }
}

impl<D: Db> SqlStore<D> {
    /// The store of `config`'s network on `db`, its tables created or
    /// brought to this build's version.
    pub fn on(db: D, config: &GlobalConfig) -> Result<SqlStore<D>> {
        let store = SqlStore {
            db,
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
        // Controllers starting together on one PostgreSQL store may meet
        // creating the same table: the one that loses tries again and finds
        // it made.
        let mut tries = 0;
        loop {
            match store.create(config) {
                Err(e) if is_unique_violation(&e) && tries < 3 => tries += 1,
                other => break other?,
            }
        }
        Ok(store)
    }

    /// Runs `f` as one transaction of the store.
    fn tx<T>(&self, mut f: impl FnMut(&mut dyn Tx) -> Result<T>) -> Result<T> {
        self.db.transaction(&mut f)
    }

    fn dialect(&self) -> Dialect {
        self.db.dialect()
    }

    /// Appends a batch of `site`'s tuples inside `tx` (the initial load
    /// and the refresh's new tuples): a tuple whose origin is known is not
    /// appended again; a taken key becomes a recorded conflict. Within a
    /// refresh epoch (`epoch`) each new tuple goes into the change log too,
    /// so the delta of the sites' standing groups finds it.
    pub(crate) fn load_in(
        &self,
        tx: &mut dyn Tx,
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
        let n = batch.origins.len();
        let mut out = LoadOutcome::default();
        // Origins loaded (or refused) before: not loaded again.
        let mut seen: HashSet<u64> = HashSet::new();
        for chunk in batch.origins.chunks(CHUNK) {
            let marks = marks(3, chunk.len());
            let mut args: Vec<Cell> = vec![me.into(), main_rel.into()];
            args.extend(chunk.iter().map(|o| Cell::from(*o)));
            let sql = format!(
                "SELECT snaps_origin FROM {} WHERE snaps_owner = ?1 AND snaps_origin IN ({marks})
                 UNION SELECT origin FROM snaps_conflicts WHERE site = ?1 AND relation = ?2 AND origin IN ({marks})",
                sql_ident(main_rel)
            );
            for r in tx.query(&sql, &args)? {
                seen.insert(r.int(0)? as u64);
            }
        }
        // Per part, the owner of every key the batch names that is taken.
        let mut holders: Vec<HashMap<String, i64>> = vec![HashMap::new(); shape.parts.len()];
        let key_of = |pi: usize, row: usize| -> String {
            format!(
                "{:?}",
                keys[pi]
                    .iter()
                    .map(|&k| &batch.parts[pi][row][k])
                    .collect::<Vec<_>>()
            )
        };
        for (pi, p) in shape.parts.iter().enumerate() {
            if keys[pi].is_empty() {
                continue;
            }
            for row in 0..n {
                if let Some(&k) = keys[pi]
                    .iter()
                    .find(|&&k| batch.parts[pi][row][k].is_null())
                {
                    return Err(Error::InvalidArgument(format!(
                        "tuple {}: key attribute {}.{} is NULL",
                        batch.origins[row], p.relation, p.columns[k]
                    )));
                }
            }
            let key_cols: Vec<String> =
                keys[pi].iter().map(|&k| sql_ident(&p.columns[k])).collect();
            let rows: Vec<usize> = (0..n)
                .filter(|r| !seen.contains(&batch.origins[*r]))
                .collect();
            for chunk in rows.chunks(CHUNK) {
                let mut args: Vec<Cell> = Vec::new();
                let terms: Vec<String> = chunk
                    .iter()
                    .map(|&row| {
                        let eqs: Vec<String> = keys[pi]
                            .iter()
                            .zip(&key_cols)
                            .map(|(&k, c)| {
                                args.push(Cell::from(&batch.parts[pi][row][k]));
                                format!("{c} = ?{}", args.len())
                            })
                            .collect();
                        format!("({})", eqs.join(" AND "))
                    })
                    .collect();
                let sql = format!(
                    "SELECT {}, snaps_owner FROM {} WHERE {}",
                    key_cols.join(", "),
                    sql_ident(&p.relation),
                    terms.join(" OR ")
                );
                for r in tx.query(&sql, &args)? {
                    let values = (0..key_cols.len())
                        .map(|i| r.value(i))
                        .collect::<Result<Vec<_>>>()?;
                    holders[pi].insert(
                        format!("{:?}", values.iter().collect::<Vec<_>>()),
                        r.int(key_cols.len())?,
                    );
                }
            }
        }
        // The tuples to insert, in order; a key taken (before, or by an
        // earlier tuple of the batch) is a recorded conflict instead.
        let mut fresh: Vec<usize> = Vec::new();
        for (row, &origin) in batch.origins.iter().enumerate() {
            if !seen.insert(origin) {
                out.already_loaded += 1;
                continue;
            }
            let taken = (0..shape.parts.len())
                .filter(|&pi| !keys[pi].is_empty())
                .find_map(|pi| holders[pi].get(&key_of(pi, row)).map(|h| (pi, *h)));
            let Some((pi, h)) = taken else {
                for pi in (0..shape.parts.len()).filter(|&pi| !keys[pi].is_empty()) {
                    holders[pi].insert(key_of(pi, row), me);
                }
                fresh.push(row);
                continue;
            };
            let p = &shape.parts[pi];
            let c = ConflictRecord {
                relation: p.relation.clone(),
                origin,
                key: keys[pi]
                    .iter()
                    .map(|&k| batch.parts[pi][row][k].clone())
                    .collect(),
                holder: self.code(h),
            };
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
            tx.execute(
                "INSERT INTO snaps_conflicts (site, relation, origin, key, tuple, holder, recorded_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                &[
                    me.into(),
                    main_rel.into(),
                    origin.into(),
                    serde_json::to_string(&c.key).unwrap_or_default().into(),
                    serde_json::to_string(&tuple).unwrap_or_default().into(),
                    h.into(),
                    now().into(),
                ],
            )?;
            tracing::warn!(site = %site.code, relation = %c.relation, origin, holder = %c.holder, "key conflict recorded");
            out.conflicts.push(c);
        }
        // Main parts first: the other parts of a split link to their ids.
        let mut main_ids: HashMap<u64, i64> = HashMap::new();
        let order = std::iter::once(main).chain((0..shape.parts.len()).filter(|p| *p != main));
        for pi in order {
            let p = &shape.parts[pi];
            let rights = default_rights(self.mode(&p.relation)).code();
            let cols: Vec<String> = p.columns.iter().map(|c| sql_ident(c)).collect();
            let width = p.columns.len() + 4;
            let link = matches!(shape.split, Split::Main(_)) && pi != main;
            for chunk in fresh.chunks(CHUNK) {
                let mut args: Vec<Cell> = Vec::with_capacity(chunk.len() * width);
                let values: Vec<String> = chunk
                    .iter()
                    .enumerate()
                    .map(|(i, &row)| {
                        let origin = batch.origins[row];
                        args.extend(batch.parts[pi][row].iter().map(Cell::from));
                        args.push(if link {
                            main_ids.get(&origin).copied().into()
                        } else {
                            Cell::Null
                        });
                        args.push(me.into());
                        args.push(origin.into());
                        args.push(rights.into());
                        format!("({})", marks(i * width + 1, width))
                    })
                    .collect();
                let sql = format!(
                    "INSERT INTO {} ({}{}main_tuple_id, snaps_owner, snaps_origin, snaps_rights) VALUES {}
                     RETURNING tuple_id, snaps_origin",
                    sql_ident(&p.relation),
                    cols.join(", "),
                    if cols.is_empty() { "" } else { ", " },
                    values.join(", ")
                );
                let ids = tx.query(&sql, &args)?;
                let mut logged: Vec<i64> = Vec::with_capacity(ids.len());
                for r in ids {
                    let (id, origin) = (r.int(0)?, r.int(1)? as u64);
                    if pi == main {
                        main_ids.insert(origin, id);
                    }
                    logged.push(id);
                }
                if let Some(epoch) = epoch {
                    Self::log_changes(tx, epoch, &p.relation, &logged, me)?;
                }
            }
        }
        out.loaded = fresh.len() as u64;
        tx.execute(
            "UPDATE snaps_sites SET tuples_loaded = tuples_loaded + ?1 WHERE number = ?2",
            &[out.loaded.into(), me.into()],
        )?;
        Ok(out)
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
        let d = self.dialect();
        self.tx(|tx| {
            tx.batch(&d.ddl(
                "CREATE TABLE IF NOT EXISTS snaps_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);",
            ))?;
            let version = tx
                .one("SELECT value FROM snaps_meta WHERE key = 'store_version'", &[])?
                .map(|r| r.text(0))
                .transpose()?;
            let version: Option<i64> = version
                .map(|v| {
                    v.parse().map_err(|_| {
                        Error::Internal(format!("snaps_meta holds store version {v:?}"))
                    })
                })
                .transpose()?;
            if let Some(v) = version
                && v > STORE_VERSION
            {
                return Err(Error::Config(format!(
                    "the global store was written by a newer SNAPS (store version {v}; this \
                     build knows versions up to {STORE_VERSION}): run the newer snaps, or \
                     restore the store from before its upgrade"
                )));
            }
            tx.batch(&d.ddl(
                "CREATE TABLE IF NOT EXISTS snaps_sites (
                 number INTEGER PRIMARY KEY, code TEXT NOT NULL UNIQUE, name TEXT NOT NULL,
                 last_seen INTEGER NOT NULL DEFAULT 0, fetches INTEGER NOT NULL DEFAULT 0,
                 tuples_sent INTEGER NOT NULL DEFAULT 0, tuples_loaded INTEGER NOT NULL DEFAULT 0,
                 bytes_received INTEGER NOT NULL DEFAULT 0, bytes_sent INTEGER NOT NULL DEFAULT 0,
                 locks_granted INTEGER NOT NULL DEFAULT 0, locks_refused INTEGER NOT NULL DEFAULT 0);
             CREATE TABLE IF NOT EXISTS snaps_relations (name TEXT PRIMARY KEY, mode TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS snaps_conflicts (
                 id INTEGER PRIMARY KEY AUTOINCREMENT, site INTEGER NOT NULL, relation TEXT NOT NULL,
                 origin INTEGER NOT NULL, key TEXT NOT NULL, tuple TEXT NOT NULL,
                 holder INTEGER NOT NULL, recorded_at INTEGER NOT NULL,
                 UNIQUE (site, relation, origin));",
            ))?;
            tx.batch(&d.ddl(refresh::TABLES))?;
            tx.batch(&d.ddl(summary::TABLES))?;
            tx.batch(&d.ddl(audit::TABLES))?;
            tx.batch(audit::append_only(d))?;
            tx.batch(&d.ddl(groups::TABLES))?;
            tx.batch(&d.ddl(identity::TABLES))?;
            if version.is_none() && d == Dialect::Sqlite {
                // A store from before versions were recorded.
                groups::add_standing(tx)?;
            }
            tx.execute(
                "INSERT INTO snaps_meta (key, value) VALUES ('store_version', ?1)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                &[STORE_VERSION.to_string().into()],
            )?;
            let fingerprint = self.catalog.fingerprint();
            let stored = tx
                .one("SELECT value FROM snaps_meta WHERE key = 'schema'", &[])?
                .map(|r| r.text(0))
                .transpose()?;
            match stored {
                Some(f) if f != fingerprint => {
                    return Err(Error::Config(format!(
                        "the store was made for global schema {f}, the network's is {fingerprint}; \
                         start with a new store or restore the schema"
                    )));
                }
                Some(_) => {}
                None => {
                    tx.execute(
                        "INSERT INTO snaps_meta (key, value) VALUES ('schema', ?1)",
                        &[(&fingerprint).into()],
                    )?;
                }
            }
            for s in &config.network.sites {
                tx.execute(
                    "INSERT INTO snaps_sites (number, code, name) VALUES (?1, ?2, ?3)
                     ON CONFLICT (number) DO UPDATE SET code = excluded.code, name = excluded.name",
                    &[s.number.0.into(), s.code.as_str().into(), (&s.name).into()],
                )?;
            }
            for r in self.catalog.relations() {
                self.create_relation(tx, config, r)?;
            }
            Ok(())
        })
    }

    fn create_relation(
        &self,
        tx: &mut dyn Tx,
        config: &GlobalConfig,
        r: &snaps_schema::Relation,
    ) -> Result<()> {
        let d = self.dialect();
        for a in &r.attributes {
            if STATUS_COLUMNS.contains(&a.name.as_str()) || a.name.starts_with("snaps_") {
                return Err(Error::Config(format!(
                    "global attribute {}.{} clashes with a status column of the global store",
                    r.name, a.name
                )));
            }
        }
        tx.execute(
            "INSERT INTO snaps_relations (name, mode) VALUES (?1, ?2)
             ON CONFLICT (name) DO UPDATE SET mode = excluded.mode",
            &[(&r.name).into(), mode_name(self.mode(&r.name)).into()],
        )?;
        let name = sql_ident(&r.name);
        let cols: Vec<String> = r
            .attributes
            .iter()
            .map(|a| format!("{} {}", sql_ident(&a.name), d.column_type(a.ty)))
            .collect();
        tx.batch(&format!(
            "CREATE TABLE IF NOT EXISTS {name} (
                 {}, {},
                 {});
             CREATE UNIQUE INDEX IF NOT EXISTS {} ON {name} (snaps_owner, snaps_origin);
             CREATE INDEX IF NOT EXISTS {} ON {name} (main_tuple_id) WHERE main_tuple_id IS NOT NULL;
             CREATE INDEX IF NOT EXISTS {} ON {name} (snaps_lock_site) WHERE snaps_lock_site IS NOT NULL;",
            d.ddl("tuple_id INTEGER PRIMARY KEY AUTOINCREMENT"),
            cols.join(", "),
            d.ddl(
                "main_tuple_id INTEGER, snaps_owner INTEGER NOT NULL,
                 snaps_origin INTEGER NOT NULL, snaps_rights INTEGER NOT NULL,
                 snaps_lock_site INTEGER, snaps_sent_to BLOB NOT NULL DEFAULT x'',
                 snaps_user INTEGER"
            ),
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
            tx.batch(&format!(
                "CREATE INDEX IF NOT EXISTS {ix} ON {name} ({})",
                cols.join(", ")
            ))?;
        }
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

fn read_status(tx: &mut dyn Tx, catalog: &Catalog, site: &SiteId, t: &TupleRef) -> Result<Status> {
    let rel = catalog.relation(&t.relation).ok_or_else(|| {
        Error::InvalidArgument(format!("unknown global relation {:?}", t.relation))
    })?;
    let (cond, args): (&str, Vec<Cell>) = match t.id {
        TupleSel::Id(i) => ("tuple_id = ?1", vec![i.into()]),
        TupleSel::Origin(o) => (
            "snaps_origin = ?1 AND snaps_owner = ?2",
            vec![o.into(), site.number.0.into()],
        ),
    };
    let sql = format!(
        "SELECT tuple_id, snaps_owner, snaps_rights, snaps_lock_site, snaps_sent_to FROM {} WHERE {cond}",
        sql_ident(&rel.name)
    );
    let r = tx
        .one(&sql, &args)?
        .ok_or_else(|| Error::NotFound(format!("{t} does not exist")))?;
    Ok(Status {
        tuple_id: r.int(0)?,
        owner: r.int(1)?,
        rights: GlobalRights::from_code(r.int(2)? as u8),
        lock_site: r.opt_int(3)?,
        sent_to: r.bytes(4)?,
    })
}

impl<D: Db> SqlStore<D> {
    /// A lock request in `tx`: every tuple checked before any is locked.
    fn lock_in(&self, tx: &mut dyn Tx, site: &SiteId, tuples: &[TupleRef]) -> Result<LockOutcome> {
        if tuples.is_empty() {
            return Err(Error::InvalidArgument(
                "a lock request names no tuples".into(),
            ));
        }
        let me = i64::from(site.number.0);
        // One tuple of a relation others may change: one conditional
        // UPDATE grants it, sparing the read a round trip. Only a refusal
        // (or a tuple that does not exist) reads on, to say why.
        if let [t] = tuples
            && self.mode(&t.relation) == RelationMode::ReadWrite
            && self.catalog.relation(&t.relation).is_some()
        {
            let (cond, mut args): (&str, Vec<Cell>) = match t.id {
                TupleSel::Id(i) => ("tuple_id = ?3", vec![i.into()]),
                TupleSel::Origin(o) => (
                    "snaps_origin = ?3 AND snaps_owner = ?4",
                    vec![o.into(), site.number.0.into()],
                ),
            };
            let locked = GlobalRights::Locked.code();
            args.splice(0..0, [Cell::from(locked), Cell::from(me)]);
            let granted = tx.execute(
                &format!(
                    "UPDATE {} SET snaps_rights = ?1, snaps_lock_site = ?2 WHERE {cond}
                     AND (snaps_rights <> ?1 OR snaps_lock_site IS NULL OR snaps_lock_site = ?2)",
                    sql_ident(&t.relation)
                ),
                &args,
            )?;
            if granted == 1 {
                return Ok(LockOutcome::Granted);
            }
        }
        let mut to_lock = Vec::new();
        for t in tuples {
            let s = read_status(tx, &self.catalog, site, t)?;
            if self.mode(&t.relation) == RelationMode::ReadOnly {
                if s.owner != me {
                    return Ok(LockOutcome::Refused {
                        tuple: t.clone(),
                        reason: Refusal::ReadOnly,
                        holder: self.code(s.owner),
                    });
                }
                // The owner changes its own tuples of a read-only
                // relation without a lock: nothing to record.
                continue;
            }
            match (s.rights, s.lock_site) {
                (GlobalRights::Locked, Some(holder)) if holder != me => {
                    return Ok(LockOutcome::Refused {
                        tuple: t.clone(),
                        reason: Refusal::Locked,
                        holder: self.code(holder),
                    });
                }
                _ => to_lock.push((t.relation.clone(), s.tuple_id)),
            }
        }
        for (relation, id) in &to_lock {
            tx.execute(
                &format!(
                    "UPDATE {} SET snaps_rights = ?1, snaps_lock_site = ?2 WHERE tuple_id = ?3",
                    sql_ident(relation)
                ),
                &[GlobalRights::Locked.code().into(), me.into(), (*id).into()],
            )?;
        }
        Ok(LockOutcome::Granted)
    }

    /// Fills the temporary table of a semi-join projection.
    fn fill_temp(
        &self,
        tx: &mut dyn Tx,
        g: &crate::query::Group,
        sj: &crate::query::SemiJoin,
    ) -> Result<()> {
        let d = self.dialect();
        let name = temp_table(sj.table);
        let shape = &g.tables[sj.table].shape;
        let cols: Vec<String> = sj
            .columns
            .iter()
            .enumerate()
            .map(|(n, (p, a))| {
                let ty = self
                    .catalog
                    .relation(&shape.parts[*p].relation)
                    .and_then(|r| r.attribute(a))
                    .map(|a| d.column_type(a.ty));
                match (d, ty) {
                    (Dialect::Postgres, Some(ty)) => format!("c{n} {ty}"),
                    _ => format!("c{n}"),
                }
            })
            .collect();
        // On PostgreSQL the table goes with the transaction whichever way
        // it ends, so the pool hands the connection on clean.
        tx.batch(&format!(
            "DROP TABLE IF EXISTS {}; CREATE TEMP TABLE {name} ({}){}",
            d.temp(&name),
            if cols.is_empty() {
                "c0".into()
            } else {
                cols.join(", ")
            },
            if d == Dialect::Postgres {
                " ON COMMIT DROP"
            } else {
                ""
            }
        ))?;
        let names: Vec<String> = (0..sj.columns.len()).map(|n| format!("c{n}")).collect();
        let ins = format!(
            "INSERT INTO {} ({}) VALUES ({})",
            d.temp(&name),
            names.join(", "),
            marks(1, sj.columns.len())
        );
        for row in &sj.rows {
            let args: Vec<Cell> = row.iter().map(Cell::from).collect();
            tx.execute(&ins, &args)?;
        }
        Ok(())
    }

    fn fetch_in(
        &self,
        tx: &mut dyn Tx,
        site: &SiteId,
        q: &FetchQuery,
    ) -> Result<Vec<FetchedTable>> {
        let me = i64::from(site.number.0);
        let d = self.dialect();
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
                self.fill_temp(tx, g, sj)?;
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
                    let c = compile_group(g, &temps, term, d);
                    tracing::debug!(sql = %c.sql, "fetch");
                    let args: Vec<Cell> = c.params.iter().map(Cell::from).collect();
                    for r in tx.query(&c.sql, &args)? {
                        let mut col = 0;
                        for &(ti, nparts) in &c.tables {
                            let mut ids = Vec::with_capacity(nparts);
                            let mut want = false;
                            for _ in 0..nparts {
                                let id = r.opt_int(col)?;
                                let owner = r.opt_int(col + 1)?;
                                let sent = r.bytes(col + 2)?;
                                col += 3;
                                if let (Some(_), Some(owner)) = (id, owner) {
                                    let held = SentTo::from_bytes(&sent).contains(site.number);
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
                tx.batch(&format!("DROP TABLE {}", d.temp(&temp_table(sj.table))))?;
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
                        let sql = format!(
                            "SELECT tuple_id, snaps_owner, snaps_sent_to{}{} FROM {} WHERE tuple_id IN ({})",
                            if cols.is_empty() { "" } else { ", " },
                            cols.join(", "),
                            sql_ident(&p.relation),
                            marks(1, chunk.len())
                        );
                        let args: Vec<Cell> = chunk.iter().map(|i| Cell::Int(*i)).collect();
                        for r in tx.query(&sql, &args)? {
                            let vals = (0..cols.len())
                                .map(|i| r.value(3 + i))
                                .collect::<Result<Vec<_>>>()?;
                            found.insert(r.int(0)?, (r.int(1)?, r.bytes(2)?, vals));
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
            tx.execute(
                &format!(
                    "UPDATE {} SET snaps_sent_to = ?1 WHERE tuple_id = ?2",
                    sql_ident(relation)
                ),
                &[sent.to_bytes().into(), (*id).into()],
            )?;
        }
        Ok(out)
    }
}

impl<D: Db> GlobalStore for SqlStore<D> {
    fn load(&self, site: &SiteId, batch: &LoadBatch) -> Result<LoadOutcome> {
        self.tx(|tx| self.load_in(tx, site, batch, None))
    }

    fn load_progress(&self, site: &SiteId, relation: &str) -> Result<u64> {
        let rel = self.catalog.relation(relation).ok_or_else(|| {
            Error::InvalidArgument(format!("unknown global relation {relation:?}"))
        })?;
        let sql = format!(
            "SELECT coalesce((SELECT max(snaps_origin) FROM {} WHERE snaps_owner = ?1), 0),
                    coalesce((SELECT max(origin) FROM snaps_conflicts WHERE site = ?1 AND relation = ?2), 0)",
            sql_ident(&rel.name)
        );
        self.tx(|tx| {
            let r = tx
                .one(&sql, &[site.number.0.into(), (&rel.name).into()])?
                .ok_or_else(|| Error::Internal("load progress read no row".into()))?;
            Ok(r.int(0)?.max(r.int(1)?) as u64)
        })
    }

    fn fetch(&self, site: &SiteId, q: &FetchQuery) -> Result<Vec<FetchedTable>> {
        self.tx(|tx| self.fetch_in(tx, site, q))
    }

    fn lock(&self, site: &SiteId, tuples: &[TupleRef]) -> Result<LockOutcome> {
        self.tx(|tx| self.lock_in(tx, site, tuples))
    }

    fn lock_audited(
        &self,
        site: &SiteId,
        tuples: &[TupleRef],
        audit: &mut dyn FnMut(&LockOutcome) -> AuditRecord,
    ) -> Result<LockOutcome> {
        self.tx(|tx| {
            let outcome = self.lock_in(tx, site, tuples)?;
            audit::insert(tx, &audit(&outcome))?;
            Ok(outcome)
        })
    }

    fn fetch_audited(
        &self,
        site: &SiteId,
        q: &FetchQuery,
        audit: &mut dyn FnMut(&[FetchedTable]) -> AuditRecord,
    ) -> Result<Vec<FetchedTable>> {
        self.tx(|tx| {
            let tables = self.fetch_in(tx, site, q)?;
            audit::insert(tx, &audit(&tables))?;
            Ok(tables)
        })
    }

    fn key_owners(
        &self,
        relation: &str,
        attributes: &[String],
        keys: &[Vec<Value>],
    ) -> Result<Vec<Option<String>>> {
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
        self.tx(|tx| {
            keys.iter()
                .map(|k| {
                    let args: Vec<Cell> = k.iter().map(Cell::from).collect();
                    let owner = tx.one(&sql, &args)?.map(|r| r.int(0)).transpose()?;
                    Ok(owner.map(|o| self.code(o)))
                })
                .collect()
        })
    }

    fn unlock(&self, site: &SiteId, tuples: &[TupleRef]) -> Result<u64> {
        let me = i64::from(site.number.0);
        self.tx(|tx| {
            let mut released = 0;
            for t in tuples {
                let s = read_status(tx, &self.catalog, site, t)?;
                if s.rights == GlobalRights::Locked && s.lock_site == Some(me) {
                    let rights = default_rights(self.mode(&t.relation)).code();
                    tx.execute(
                        &format!(
                            "UPDATE {} SET snaps_rights = ?1, snaps_lock_site = NULL WHERE tuple_id = ?2",
                            sql_ident(&t.relation)
                        ),
                        &[rights.into(), s.tuple_id.into()],
                    )?;
                    released += 1;
                }
            }
            Ok(released)
        })
    }

    fn release_copies(&self, site: &SiteId, tuples: &[TupleRef]) -> Result<u64> {
        let me = i64::from(site.number.0);
        self.tx(|tx| {
            let mut released = 0;
            // Tuples their owner deleted are no longer in their relation.
            let mut gone: HashMap<String, Vec<i64>> = HashMap::new();
            for t in tuples {
                let s = match read_status(tx, &self.catalog, site, t) {
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
                    tx.execute(
                        &format!(
                            "UPDATE {} SET snaps_sent_to = ?1 WHERE tuple_id = ?2",
                            sql_ident(&t.relation)
                        ),
                        &[sent.to_bytes().into(), s.tuple_id.into()],
                    )?;
                    released += 1;
                }
            }
            released += Self::release_gone(tx, site, &gone)?;
            Ok(released)
        })
    }

    fn record_activity(&self, activity: &[(SiteNo, Activity)]) -> Result<()> {
        let greatest = self.dialect().greatest();
        let sql = format!(
            "UPDATE snaps_sites SET bytes_received = bytes_received + ?1,
                 bytes_sent = bytes_sent + ?2, last_seen = {greatest}(last_seen, ?3),
                 fetches = fetches + ?4, tuples_sent = tuples_sent + ?5,
                 locks_granted = locks_granted + ?6, locks_refused = locks_refused + ?7
             WHERE number = ?8"
        );
        self.tx(|tx| {
            for (site, a) in activity {
                tx.execute(
                    &sql,
                    &[
                        a.bytes_received.into(),
                        a.bytes_sent.into(),
                        a.last_seen.into(),
                        a.fetches.into(),
                        a.tuples_sent.into(),
                        a.locks_granted.into(),
                        a.locks_refused.into(),
                        site.0.into(),
                    ],
                )?;
            }
            Ok(())
        })
    }

    fn epoch(&self) -> Result<Option<EpochState>> {
        self.tx(|tx| Self::latest_epoch(tx))
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

    fn sync_epoch(
        &self,
        site: &SiteId,
        push: &Push,
        audit: &AuditRecord,
    ) -> Result<(u64, CommitSummary)> {
        self.commit_sync(site, push, audit)
    }

    fn post_sync_ask(&self, ask: &StoredAsk) -> Result<()> {
        self.post_ask(ask)
    }

    fn take_sync_asks(&self, sites: &[SiteNo]) -> Result<Vec<StoredAsk>> {
        self.take_asks(sites)
    }

    fn answer_sync_ask(&self, request: u64, answer: &str) -> Result<()> {
        self.answer_ask(request, answer)
    }

    fn sync_answer(&self, request: u64) -> Result<Option<String>> {
        self.ask_answer(request)
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

    fn take_lease(&self, controller: &str, now_ms: i64, ttl_ms: i64) -> Result<Option<String>> {
        self.lease(controller, now_ms, ttl_ms)
    }

    fn release_lease(&self, controller: &str) -> Result<()> {
        self.unlease(controller)
    }

    fn record_subscribed(&self, controller: &str, sites: &[SiteNo], now_ms: i64) -> Result<()> {
        self.subscribed_now(controller, sites, now_ms)
    }

    fn subscribed(&self, since_ms: i64) -> Result<Vec<SiteNo>> {
        self.subscribed_since(since_ms)
    }

    fn identity_candidates(
        &self,
        spec: &IdentitySpec,
        key: &Value,
    ) -> Result<Option<(IdentityRecord, Vec<IdentityRecord>)>> {
        self.tx(|tx| identity::candidates(tx, spec, key))
    }

    fn link(
        &self,
        spec: &IdentitySpec,
        key: i64,
        other: (i64, &SiteId),
        by: (&SiteId, &str),
        unlink: bool,
        audit: &mut dyn FnMut(&IdentityLink) -> AuditRecord,
    ) -> Result<(IdentityLink, bool)> {
        let at = now();
        self.tx(|tx| {
            let (link, changed) = identity::link(tx, spec, key, other, by, unlink, at)?;
            if changed {
                audit::insert(tx, &audit(&link))?;
            }
            Ok((link, changed))
        })
    }

    fn links_since(&self, since: u64) -> Result<LinkChanges> {
        self.tx(|tx| identity::since(tx, since))
    }

    fn audit(&self, filter: &AuditFilter) -> Result<Vec<AuditRecord>> {
        self.audit_records(filter)
    }

    fn seal_audit(&self, limit: usize) -> Result<u64> {
        self.tx(|tx| audit::seal(tx, limit))
    }

    fn verify_audit(&self) -> Result<AuditVerification> {
        self.tx(audit::verify)
    }

    fn status(&self) -> Result<StatusReport> {
        self.tx(|tx| {
            let mut report = StatusReport::default();
            let mut owned: BTreeMap<i64, u64> = BTreeMap::new();
            for r in self.catalog.relations() {
                let name = sql_ident(&r.name);
                let row = tx
                    .one(&format!("SELECT count(*), count(snaps_lock_site) FROM {name}"), &[])?
                    .ok_or_else(|| Error::Internal("count read no row".into()))?;
                for row in tx.query(
                    &format!("SELECT snaps_owner, count(*) FROM {name} GROUP BY snaps_owner"),
                    &[],
                )? {
                    *owned.entry(row.int(0)?).or_default() += row.int(1)? as u64;
                }
                report.relations.push(RelationReport {
                    name: r.name.clone(),
                    mode: self.mode(&r.name),
                    tuples: row.int(0)? as u64,
                    locked: row.int(1)? as u64,
                });
            }
            for r in tx.query(
                "SELECT number, code, name, last_seen, fetches, tuples_sent, bytes_received, bytes_sent,
                        locks_granted, locks_refused FROM snaps_sites ORDER BY number",
                &[],
            )? {
                let number = r.int(0)?;
                report.sites.push(SiteReport {
                    number: number as u32,
                    code: r.text(1)?,
                    name: r.text(2)?,
                    last_seen: r.int(3)?,
                    fetches: r.int(4)? as u64,
                    tuples_sent: r.int(5)? as u64,
                    bytes_received: r.int(6)? as u64,
                    bytes_sent: r.int(7)? as u64,
                    locks_granted: r.int(8)? as u64,
                    locks_refused: r.int(9)? as u64,
                    owned_tuples: owned.get(&number).copied().unwrap_or(0),
                });
            }
            report.conflicts = tx
                .one("SELECT count(*) FROM snaps_conflicts", &[])?
                .map(|r| r.int(0))
                .transpose()?
                .unwrap_or(0) as u64;
            Ok(report)
        })
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
        let conn = rusqlite::Connection::open(&path).unwrap();
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
