//! The update path (thesis chapter 6, "Updatable Snapshots" and
//! "Concurrency Control for the Updatable Snapshots"; chapter 7,
//! "Requesting Locks from the Global Snapshot Controller").
//!
//! * INSERT (QUEL `append`) into a mapped relation: a local tuple, *new*. A
//!   relation keyed by one integer attribute gets its key from the site's
//!   range when the statement names the attributes but not the key
//!   (`snaps_next_key('patient')` gives one explicitly). While the global
//!   controller answers, a key another site owns there is refused, naming
//!   that site; offline the insert is accepted and the key is checked at the
//!   refresh.
//! * UPDATE (QUEL `replace`): per tuple affected, by its status and the
//!   relation's mode — see [`SiteSession::acquire`]. All the locks a
//!   statement needs are asked for in one request, granted all or none.
//! * DELETE (QUEL `delete`): the site's own tuples only; an exported one is
//!   recorded as deleted (`snaps_deleted`) and leaves the relation at once.
//!
//! Before either, the tuples the statement's condition selects are brought
//! up to date exactly as the `SELECT` with that condition would be (the
//! *performed* check, then a fetch of what is missing, kept as a snapshot):
//! a write touches every tuple a read shows, not only the copies the site
//! happens to hold. Offline it applies to what the site holds, with
//! [`LOCAL_ONLY_WRITE`] as its notice.
//!
//! The rules themselves live in the database as triggers (see `store`), so
//! a program writing to the file directly meets them too; this module asks
//! for the locks the triggers require first, and turns refusals into errors
//! that name the tuple and the site holding the lock or owning the tuple.

use std::collections::BTreeMap;
use std::sync::Mutex;

use rusqlite::functions::FunctionFlags;
use rusqlite::{Connection, OptionalExtension, params};
use snaps_mapping::Language;
use snaps_mapping::ir::{Delete, Expr, Insert, Range, Select, Statement, Target, Update};
use snaps_mapping::mapping::{Conversion, RelationMapping};
use snaps_proto::v1;
use snaps_schema::{Catalog, LocalRights, LocalStatus, TupleType, Value, ValueType, sql_ident};

use crate::engine::Outcome;
use crate::site::{Retrieved, Site, SiteSession};
use crate::store::STATUS_COLUMN;
use crate::value::from_sqlite;
use crate::{Error, Result};

/// The notice of a write the controller could not be asked about.
pub const LOCAL_ONLY_WRITE: &str = "the global snapshot controller could not be asked: this \
     write applies to the tuples this site holds and may miss tuples recorded at other sites";

/// How a local relation's key is found in the global snapshot, for the
/// insert check: the global relation whose key the site's key maps onto.
#[derive(Debug, Clone)]
pub(crate) struct KeyCheck {
    /// The global relation.
    relation: String,
    /// Per key attribute: its local name, global name, global type and the
    /// conversion to it.
    attributes: Vec<(String, String, ValueType, Option<Conversion>)>,
}

impl KeyCheck {
    /// Whether every key attribute reaches the global key unconverted, so
    /// equal local keys are equal global keys and back.
    pub(crate) fn unconverted(&self) -> bool {
        self.attributes.iter().all(|a| a.3.is_none())
    }

    /// The check for `rm`, when its whole key maps onto the key of one
    /// global relation (a relation without a key, or split by a non-unique
    /// one, has nothing to check).
    pub(crate) fn of(rm: &RelationMapping, global: &Catalog) -> Option<KeyCheck> {
        if rm.local.key.is_empty() {
            return None;
        }
        rm.parts.iter().enumerate().find_map(|(pi, part)| {
            let attributes = rm
                .local
                .key
                .iter()
                .map(|k| {
                    rm.targets(k)
                        .into_iter()
                        .find(|(p, _)| *p == pi)
                        .map(|(_, a)| (k.clone(), a.global.clone(), a.global_type, a.to_global))
                })
                .collect::<Option<Vec<_>>>()?;
            let mut mapped: Vec<&str> = attributes.iter().map(|a| a.1.as_str()).collect();
            let mut key: Vec<&str> = global
                .relation(&part.global)?
                .key
                .iter()
                .map(String::as_str)
                .collect();
            mapped.sort_unstable();
            key.sort_unstable();
            (mapped == key).then(|| KeyCheck {
                relation: part.global.clone(),
                attributes,
            })
        })
    }
}

/// The local relation's key when it is one integer attribute: the keys
/// `snaps_next_key` hands out.
fn integer_key(rel: &snaps_schema::Relation) -> Option<&str> {
    match rel.key.as_slice() {
        [k] if rel.attribute(k).is_some_and(|a| a.ty.is_integer()) => Some(k),
        _ => None,
    }
}

/// Registers `snaps_next_key(relation)` on a session's connection: the next
/// unused key of `relation` in this site's range (the relation's own range
/// where the network gives one, else the site's default range), above every
/// key of the range the relation holds and every key this connection handed
/// out before.
pub(crate) fn register_next_key(conn: &Connection, catalog: &Catalog) -> Result<()> {
    let keys: BTreeMap<String, String> = catalog
        .relations()
        .filter_map(|r| integer_key(r).map(|k| (r.name.clone(), k.to_string())))
        .collect();
    let given: Mutex<BTreeMap<String, i64>> = Mutex::new(BTreeMap::new());
    let fail = |m: String| rusqlite::Error::UserFunctionError(m.into());
    conn.create_scalar_function(
        "snaps_next_key",
        1,
        FunctionFlags::SQLITE_UTF8,
        move |ctx| {
            let relation = ctx.get::<String>(0)?.to_ascii_lowercase();
            let key = keys.get(&relation).ok_or_else(|| {
                fail(format!(
                    "snaps_next_key: {relation} is not a relation of this site keyed by one integer attribute"
                ))
            })?;
            // SAFETY: the handle is used only here, on this thread, during
            // this call, for reads; rusqlite's caveat is about sending it
            // to another thread.
            let db = unsafe { ctx.get_connection()? };
            let range: Option<(i64, i64)> = db
                .query_row(
                    "SELECT first, last FROM snaps_key_range WHERE relation IN (?1, '')
                     ORDER BY relation = '' LIMIT 1",
                    [&relation],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            let (first, last) = range.ok_or_else(|| {
                fail(format!(
                    "snaps_next_key: no key range known for {relation}: the site has not \
                     reached the global controller yet"
                ))
            })?;
            let held: Option<i64> = db.query_row(
                &format!(
                    "SELECT max({k}) FROM {r} WHERE {k} BETWEEN ?1 AND ?2",
                    k = sql_ident(key),
                    r = sql_ident(&relation)
                ),
                [first, last],
                |r| r.get(0),
            )?;
            let mut given = given.lock().unwrap_or_else(|p| p.into_inner());
            let next = held
                .map_or(first, |h| h + 1)
                .max(given.get(&relation).map_or(first, |g| g + 1));
            if next > last {
                return Err(fail(format!(
                    "snaps_next_key: the key range {first}..{last} of {relation} at this site is used up"
                )));
            }
            given.insert(relation, next);
            Ok(next)
        },
    )?;
    Ok(())
}

/// A tuple a statement touches.
struct Touched {
    rowid: i64,
    status: LocalStatus,
}

/// Whether a statement changes what the global snapshot holds of a tuple.
#[derive(Clone, Copy, PartialEq)]
enum Change {
    /// An UPDATE of mapped attributes (or the key).
    Update,
    /// A DELETE.
    Delete,
}

impl Change {
    fn verb(self) -> &'static str {
        match self {
            Change::Update => "changing",
            Change::Delete => "deleting",
        }
    }
}

impl SiteSession {
    /// INSERT / QUEL append into a mapped relation.
    pub(crate) fn insert(&mut self, ins: &Insert) -> Result<(Outcome, Option<String>)> {
        let site = self.site.clone();
        site.not_refreshing(&self.conn)?;
        let rel = site
            .catalog
            .relation(&ins.relation)
            .ok_or_else(|| Error::Invalid(format!("no relation {} at this site", ins.relation)))?;
        let mut ins = ins.clone();
        if let Some(k) = integer_key(rel)
            && !ins.columns.is_empty()
            && !ins.columns.iter().any(|c| c == k)
        {
            ins.columns.push(k.to_string());
            for row in &mut ins.rows {
                row.push(Expr::Function {
                    name: "snaps_next_key".into(),
                    args: vec![Expr::lit(Value::text(&rel.name))],
                    distinct: false,
                });
            }
        }
        let mut sql = Statement::Insert(ins).to_string();
        let active = site.mapping();
        let check = active.key_checks.get(&rel.name);
        if let Some(c) = check {
            let cols: Vec<String> = c.attributes.iter().map(|a| sql_ident(&a.0)).collect();
            sql.push_str(&format!(" RETURNING {}", cols.join(", ")));
        }
        self.in_savepoint(|s| {
            let mut keys: Vec<Vec<Value>> = Vec::new();
            {
                let mut stmt = s.conn.prepare(&sql)?;
                let n = stmt.column_count();
                let mut rows = stmt.raw_query();
                while let Some(r) = rows.next()? {
                    keys.push(
                        (0..n)
                            .map(|i| from_sqlite(r.get_ref(i)?, &rel.name))
                            .collect::<Result<Vec<_>>>()?,
                    );
                }
            }
            let inserted = s.conn.changes();
            let notice = match check {
                Some(c) if !keys.is_empty() => s.check_keys(c, &rel.name, &keys)?,
                _ => None,
            };
            Ok((
                Outcome::Command {
                    tag: format!("INSERT 0 {inserted}"),
                },
                notice,
            ))
        })
    }

    /// Refuses keys another site owns in the global snapshot. Returns a
    /// notice when the controller cannot be asked (the refresh checks them).
    fn check_keys(
        &self,
        c: &KeyCheck,
        relation: &str,
        keys: &[Vec<Value>],
    ) -> Result<Option<String>> {
        let global: Vec<Vec<Value>> = keys
            .iter()
            .map(|k| {
                k.iter()
                    .zip(&c.attributes)
                    .map(|(v, (local, _, ty, conv))| match conv {
                        Some(conv) => Ok(conv.apply(v, *ty, &format!("{relation}.{local}"))?),
                        None => Ok(v.clone()),
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<_>>()?;
        let attributes: Vec<String> = c.attributes.iter().map(|a| a.1.clone()).collect();
        let asked = self.site.remote(|client| {
            let attributes = attributes.clone();
            let global = &global;
            async move { client.key_owners(&c.relation, attributes, global).await }
        });
        let owners = match asked {
            Ok(o) => o,
            Err(e @ Error::Remote(_)) if crate::site::is_request_error(&e) => return Err(e),
            Err(e) => {
                tracing::warn!(site = %self.site.code(), error = %e, "keys not checked: the refresh will");
                return Ok(Some(format!(
                    "the global snapshot controller is unreachable: the keys of the new {relation} \
                     tuples are checked at the next refresh"
                )));
            }
        };
        for (key, owner) in keys.iter().zip(owners) {
            if let Some(owner) = owner.filter(|o| o != self.site.code()) {
                let names: Vec<&str> = c.attributes.iter().map(|a| a.0.as_str()).collect();
                return Err(Error::DuplicateKey(format!(
                    "{relation} {} already exists in the global snapshot, owned by site {owner}: \
                     nothing was inserted (snaps_next_key('{relation}') gives a key from this site's range)",
                    describe_key(&names, key)
                )));
            }
        }
        Ok(None)
    }

    /// UPDATE / QUEL replace of a mapped relation; `sql` is the statement
    /// as SQLite runs it. Returns the notice of a write applied to local
    /// data only (the controller could not be asked).
    pub(crate) fn update(&mut self, u: &Update, sql: &str) -> Result<(Outcome, Option<String>)> {
        let site = self.site.clone();
        site.not_refreshing(&self.conn)?;
        let notice = self.bring_selected(&u.target, &u.others, u.qual.as_ref())?;
        let active = site.mapping();
        let rm = active
            .relation(&u.target.relation)
            .ok_or_else(|| Error::Invalid(format!("{} is not mapped", u.target.relation)))?;
        let shared = u
            .assignments
            .iter()
            .any(|(a, _)| rm.maps(a) || rm.local.key.contains(a));
        if shared {
            let touched = self.touched(&u.target, &u.others, u.qual.as_ref())?;
            self.acquire(rm, &touched, Change::Update)?;
        }
        Ok((self.run_write(sql)?, notice))
    }

    /// DELETE / QUEL delete from a mapped relation.
    pub(crate) fn delete(&mut self, d: &Delete, sql: &str) -> Result<(Outcome, Option<String>)> {
        let site = self.site.clone();
        site.not_refreshing(&self.conn)?;
        let notice = self.bring_selected(&d.target, &d.others, d.qual.as_ref())?;
        let active = site.mapping();
        let rm = active
            .relation(&d.target.relation)
            .ok_or_else(|| Error::Invalid(format!("{} is not mapped", d.target.relation)))?;
        let touched = self.touched(&d.target, &d.others, d.qual.as_ref())?;
        self.acquire(rm, &touched, Change::Delete)?;
        Ok((self.run_write(sql)?, notice))
    }

    /// Brings the tuples of the network a write's qualification selects,
    /// exactly as the `SELECT` with the same condition would (the
    /// *performed* check, then a fetch of what is missing, kept as a
    /// snapshot), so the write touches every tuple that `SELECT` shows and
    /// not only the copies the site happened to hold. Returns the notice
    /// when the controller could not be asked (the write then applies to
    /// what the site holds, as a read answers from it).
    fn bring_selected(
        &mut self,
        target: &Range,
        others: &[Range],
        qual: Option<&Expr>,
    ) -> Result<Option<String>> {
        let select = Select {
            distinct: false,
            targets: vec![Target::All(Some(target.var.clone()))],
            ranges: std::iter::once(target).chain(others).cloned().collect(),
            qual: qual.cloned(),
            group_by: Vec::new(),
            having: None,
            order_by: Vec::new(),
            limit: None,
            offset: None,
        };
        let text = select.to_string();
        Ok(
            match self.prepare_retrieval(&select, Language::Sql, &text)? {
                Retrieved::LocalOnly(_) => Some(LOCAL_ONLY_WRITE.to_string()),
                Retrieved::Covered(_) | Retrieved::Fetched => None,
            },
        )
    }

    /// The tuples of `target` a statement's qualification selects.
    fn touched(
        &self,
        target: &Range,
        others: &[Range],
        qual: Option<&Expr>,
    ) -> Result<Vec<Touched>> {
        let v = sql_ident(&target.var);
        let mut sql = format!("SELECT DISTINCT {v}.rowid, {v}.{STATUS_COLUMN} FROM {target}");
        for o in others {
            sql.push_str(&format!(", {o}"));
        }
        if let Some(q) = qual {
            sql.push_str(&format!(" WHERE {q}"));
        }
        let mut stmt = self.conn.prepare(&sql)?;
        let rows = stmt
            .query_map([], |r| {
                Ok(Touched {
                    rowid: r.get(0)?,
                    status: LocalStatus::from_byte(r.get::<_, i64>(1)? as u8),
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    /// Makes sure the site may make `change` to every tuple of `touched`,
    /// asking the global controller for the locks it needs, all in one
    /// request:
    ///
    /// * the site's own new tuple: nothing to ask (nobody else has it);
    /// * an own exported tuple: free in a relation read-only for other
    ///   sites; in a read-write one it needs the lock;
    /// * a copy: an update needs the lock, and is refused in a read-only
    ///   relation, naming the owner; a delete is refused, naming the owner;
    /// * rights *read-write* already: the site holds the lock (until the
    ///   next refresh) and asks nothing.
    ///
    /// Granted locks set rights *read-write* on the tuples; a refusal sets
    /// *read-only* on the refused tuple and fails, naming the holder. No
    /// lock can be had while the controller is unreachable.
    fn acquire(&self, rm: &RelationMapping, touched: &[Touched], change: Change) -> Result<()> {
        let relation = rm.local.name.as_str();
        let read_write = self.site.read_write(&self.conn, relation)?;
        let mut need: Vec<(i64, Vec<v1::TupleRef>)> = Vec::new();
        for t in touched {
            let st = t.status;
            match st.tuple_type {
                TupleType::Snapshot if change == Change::Delete || !read_write => {
                    let owner = self.owner(relation, t.rowid)?;
                    let which = self.describe(rm, t.rowid)?;
                    return Err(Error::ReadOnly(if change == Change::Delete {
                        format!(
                            "{which} is a copy of a tuple owned by site {owner}: only {owner} can delete it \
                             (copies leave this site when they are no longer used); nothing was deleted"
                        )
                    } else {
                        format!(
                            "{which} is a copy of a tuple owned by site {owner}, and {relation} is \
                             read-only for every site but its owner: change it at {owner}; nothing was changed"
                        )
                    }));
                }
                _ if st.rights == LocalRights::ReadWrite => {}
                TupleType::Snapshot => need.push((t.rowid, self.copy_refs(relation, t.rowid)?)),
                TupleType::Local if st.new || !read_write => {}
                TupleType::Local => need.push((
                    t.rowid,
                    rm.parts
                        .iter()
                        .map(|p| v1::TupleRef {
                            relation: p.global.clone(),
                            id: Some(v1::tuple_ref::Id::Origin(t.rowid as u64)),
                        })
                        .collect(),
                )),
            }
        }
        if need.is_empty() {
            return Ok(());
        }
        let refs: Vec<v1::TupleRef> = need.iter().flat_map(|(_, r)| r.clone()).collect();
        let reply = self
            .site
            .remote(|client| {
                let refs = refs.clone();
                let user = self.user_code.clone();
                async move { client.lock(refs, &user).await }
            })
            .map_err(|e| match e {
                e @ Error::Remote(_) if crate::site::is_request_error(&e) => e,
                e if crate::site::is_refreshing(&e) => Error::Busy(format!(
                    "a refresh of the global snapshot is collecting the sites' changes: \
                     {} {relation} waits until it is done; try again in a moment",
                    change.verb()
                )),
                e => Error::Unreachable(format!(
                    "{} {relation} needs the primary-copy lock on {} tuple(s), and no lock can be had \
                     while the global snapshot controller is unreachable ({e}); nothing was changed — \
                     try again when the link is back",
                    change.verb(),
                    need.len()
                )),
            })?;
        if reply.granted {
            let rowids: Vec<i64> = need.iter().map(|(r, _)| *r).collect();
            self.set_rights(relation, &rowids, LocalRights::ReadWrite)?;
            Site::bump(&self.conn, &[("locks_granted", 1)])?;
            return Ok(());
        }
        Site::bump(&self.conn, &[("locks_refused", 1)])?;
        let refused = reply.refused.unwrap_or_default();
        let rowid = need
            .iter()
            .find(|(_, refs)| refs.contains(&refused))
            .map(|(r, _)| *r);
        let which = match rowid {
            Some(r) => {
                self.set_rights(relation, &[r], LocalRights::ReadOnly)?;
                self.describe(rm, r)?
            }
            None => format!("a tuple of {relation}"),
        };
        let holder = reply.holder_site;
        Err(if reply.reason == v1::RefusalReason::ReadOnly as i32 {
            Error::ReadOnly(format!(
                "{which} belongs to site {holder}, and {relation} is read-only for every site but \
                     its owner: change it at {holder}; nothing was changed"
            ))
        } else {
            Error::Locked(format!(
                "{which} is locked by site {holder} until the next refresh: {} it is refused \
                     and nothing was changed",
                change.verb()
            ))
        })
    }

    /// The global tuples behind a copy.
    fn copy_refs(&self, relation: &str, rowid: i64) -> Result<Vec<v1::TupleRef>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT global_relation, tuple_id FROM snaps_copy WHERE relation = ?1 AND tuple_rowid = ?2",
        )?;
        let refs = stmt
            .query_map(params![relation, rowid], |r| {
                Ok(v1::TupleRef {
                    relation: r.get(0)?,
                    id: Some(v1::tuple_ref::Id::TupleId(r.get::<_, i64>(1)? as u64)),
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        if refs.is_empty() {
            return Err(Error::Invalid(format!(
                "{relation} rowid {rowid} is a copy with no record of the global tuple behind it"
            )));
        }
        Ok(refs)
    }

    /// The owner of a copy, as the fetch named it.
    fn owner(&self, relation: &str, rowid: i64) -> Result<String> {
        let owner: Option<Option<String>> = self
            .conn
            .query_row(
                "SELECT owner FROM snaps_copy WHERE relation = ?1 AND tuple_rowid = ?2 LIMIT 1",
                params![relation, rowid],
                |r| r.get(0),
            )
            .optional()?;
        Ok(owner.flatten().unwrap_or_else(|| "another site".into()))
    }

    /// `patient pno=1000007`: a tuple as a user names it.
    fn describe(&self, rm: &RelationMapping, rowid: i64) -> Result<String> {
        let rel = &rm.local;
        if rel.key.is_empty() {
            return Ok(format!("{} rowid {rowid}", rel.name));
        }
        let cols: Vec<String> = rel.key.iter().map(|k| sql_ident(k)).collect();
        let values: Vec<Value> = self.conn.query_row(
            &format!(
                "SELECT {} FROM {} WHERE rowid = ?1",
                cols.join(", "),
                sql_ident(&rel.name)
            ),
            [rowid],
            |r| {
                (0..cols.len())
                    .map(|i| Ok(crate::site::result_value(r.get_ref(i)?)))
                    .collect::<rusqlite::Result<Vec<_>>>()
            },
        )?;
        let names: Vec<&str> = rel.key.iter().map(String::as_str).collect();
        Ok(format!("{} {}", rel.name, describe_key(&names, &values)))
    }

    fn set_rights(&self, relation: &str, rowids: &[i64], rights: LocalRights) -> Result<()> {
        let bits = i64::from(
            LocalStatus {
                tuple_type: TupleType::Local,
                rights,
                new: false,
                modified: false,
                just_copied: 0,
            }
            .to_byte()?,
        );
        let mut stmt = self.conn.prepare_cached(&format!(
            "UPDATE {} SET {STATUS_COLUMN} = ({STATUS_COLUMN} & ~96) | ?1 WHERE rowid = ?2",
            sql_ident(relation)
        ))?;
        for r in rowids {
            stmt.execute(params![bits, r])?;
        }
        Ok(())
    }

    /// Runs a write as one unit: all of it or, on any error, nothing.
    fn run_write(&mut self, sql: &str) -> Result<Outcome> {
        self.in_savepoint(|s| {
            let mut out = s.run_local(sql)?;
            out.pop()
                .ok_or_else(|| Error::Invalid("the statement did nothing".into()))
        })
    }

    /// Runs `f` inside a savepoint (a transaction of its own in autocommit
    /// mode, nested in the client's otherwise): released when `f` succeeds,
    /// rolled back when it fails.
    fn in_savepoint<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        self.conn.execute_batch("SAVEPOINT snaps_write")?;
        let r = f(self);
        let end = if r.is_ok() {
            "RELEASE snaps_write"
        } else {
            "ROLLBACK TO snaps_write; RELEASE snaps_write"
        };
        self.conn.execute_batch(end)?;
        r
    }
}

/// `pno=1000007` or `(vno, line_no)=(5, 1)`.
fn describe_key(names: &[&str], values: &[Value]) -> String {
    let show = |v: &Value| match v {
        Value::Text(t) => format!("'{t}'"),
        Value::Null => "NULL".into(),
        Value::Int(i) => i.to_string(),
        Value::Float(f) => f.to_string(),
    };
    match (names, values) {
        ([n], [v]) => format!("{n}={}", show(v)),
        _ => format!(
            "({})=({})",
            names.join(", "),
            values.iter().map(show).collect::<Vec<_>>().join(", ")
        ),
    }
}
