//! Confirmed identity links at the site: which records at other sites are
//! the same person as a record the site reads.
//!
//! A user confirms a link with `snaps_link` (`crate::identity`); the global
//! controller keeps it and tells every site that may read the relation of
//! people, in the refresh's Changes reply (changes since the site's
//! version, or every standing link). The site keeps them in `snaps_link`,
//! each pair in both directions, so that a lookup of a linked patient
//! brings the other records along: they are the same person's x-rays, and
//! a radiologist should have them even when the controller goes down
//! afterwards. Links are followed one step, not further.

use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use snaps_mapping::ir::{BinOp, Expr, Range, Select, Target};
use snaps_mapping::performed::pinned_global;
use snaps_mapping::rewrite::Plan;
use snaps_proto::v1;
use snaps_schema::{Catalog, Value, sql_ident};

use crate::site::Active;
use crate::{Error, Result};

/// `snaps_meta` key: the version of the links held.
const LINKS_VERSION: &str = "links_version";
/// `snaps_meta` key: the relation of people as the controller said (JSON).
const IDENTITY: &str = "identity";

/// The network's relation of people and its key, as the controller said at
/// the last connect (only to a site that may read the relation).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Identity {
    /// The global relation.
    pub(crate) relation: String,
    /// Its key attribute (a patient number).
    pub(crate) key: String,
}

impl Identity {
    /// The identity the controller sent at hello, if any.
    pub(crate) fn from_hello(hello: &v1::HelloReply) -> Option<Identity> {
        (!hello.identity_relation.is_empty() && !hello.identity_key.is_empty()).then(|| Identity {
            relation: hello.identity_relation.clone(),
            key: hello.identity_key.clone(),
        })
    }

    /// The identity kept in `conn`, if any.
    pub(crate) fn read(conn: &Connection) -> Result<Option<Identity>> {
        let json: Option<String> = conn
            .query_row(
                "SELECT value FROM snaps_meta WHERE key = ?1",
                [IDENTITY],
                |r| r.get(0),
            )
            .optional()?;
        json.map(|j| {
            serde_json::from_str(&j)
                .map_err(|e| Error::Invalid(format!("snaps_meta {IDENTITY} is unreadable: {e}")))
        })
        .transpose()
    }

    /// Keeps `identity` in the caller's transaction. Without one the site
    /// may not read the relation of people (any more): the links it held go.
    pub(crate) fn store(tx: &Connection, identity: Option<&Identity>) -> Result<()> {
        match identity {
            Some(i) => {
                let json = serde_json::to_string(i)
                    .map_err(|e| Error::Invalid(format!("identity: {e}")))?;
                tx.execute(
                    "INSERT OR REPLACE INTO snaps_meta (key, value) VALUES (?1, ?2)",
                    params![IDENTITY, json],
                )?;
            }
            None => {
                tx.execute(
                    "DELETE FROM snaps_meta WHERE key IN (?1, ?2)",
                    params![IDENTITY, LINKS_VERSION],
                )?;
                tx.execute("DELETE FROM snaps_link", [])?;
            }
        }
        Ok(())
    }

    /// The keys linked with the patients `plan` pins by their key in the
    /// relation of people (`patient.pno = 10000022`, or an `IN` list), that
    /// the plan does not pin itself.
    pub(crate) fn linked_in(
        &self,
        conn: &Connection,
        plan: &Plan,
        global: &Catalog,
    ) -> Result<Vec<i64>> {
        let Some(q) = &plan.query else {
            return Ok(Vec::new());
        };
        let mut asked = Vec::new();
        for g in &q.groups {
            let vars: Vec<&str> = g
                .tables
                .iter()
                .flat_map(|t| &t.parts)
                .filter(|p| p.relation == self.relation)
                .map(|p| p.var.as_str())
                .collect();
            if vars.is_empty() {
                continue;
            }
            for ((var, attr), values) in pinned_global(g, global).unwrap_or_default() {
                if attr == self.key && vars.contains(&var.as_str()) {
                    asked.extend(values.iter().filter_map(|v| match v {
                        Value::Int(k) => Some(*k),
                        _ => None,
                    }));
                }
            }
        }
        let mut out = Vec::new();
        let mut stmt = conn.prepare_cached("SELECT other FROM snaps_link WHERE key = ?1")?;
        for k in &asked {
            for other in stmt.query_map([k], |r| r.get::<_, i64>(0))? {
                let other = other?;
                if !asked.contains(&other) && !out.contains(&other) {
                    out.push(other);
                }
            }
        }
        Ok(out)
    }

    /// The site's lookup of the patient keyed `key`, in its own terms
    /// (`SELECT * FROM patient AS snaps_linked WHERE snaps_linked.pno = K`),
    /// and its text: `None` when no local relation holds the relation of
    /// people alone with its key unconverted.
    pub(crate) fn lookup(&self, mapping: &Active, key: i64) -> Option<(Select, String)> {
        let mut holders = mapping.relations().filter_map(|rm| {
            let [part] = rm.parts.as_slice() else {
                return None;
            };
            if part.global != self.relation {
                return None;
            }
            part.attrs
                .iter()
                .find(|a| a.global == self.key && a.to_global.is_none() && a.to_local.is_none())
                .map(|a| (rm.local.name.clone(), a.local.clone()))
        });
        let (Some((relation, attr)), None) = (holders.next(), holders.next()) else {
            return None;
        };
        const VAR: &str = "snaps_linked";
        let select = Select {
            targets: vec![Target::All(None)],
            ranges: vec![Range::new(VAR, &relation)],
            qual: Some(Expr::binary(
                BinOp::Eq,
                Expr::col(VAR, &attr),
                Expr::Literal(Value::Int(key)),
            )),
            ..Select::default()
        };
        let text = format!(
            "SELECT * FROM {} AS {VAR} WHERE {VAR}.{} = {key}",
            sql_ident(&relation),
            sql_ident(&attr)
        );
        Some((select, text))
    }
}

/// The version of the links in `conn` (0: none).
pub(crate) fn version(conn: &Connection) -> Result<u64> {
    crate::refresh::meta_epoch(conn, LINKS_VERSION)
}

/// Applies the links of a Changes reply in the caller's transaction (the
/// one that applies the epoch). Returns how many links were applied.
pub(crate) fn apply(tx: &Connection, reply: &v1::ChangesReply) -> Result<usize> {
    if reply.links_whole || reply.links_version == 0 {
        tx.execute("DELETE FROM snaps_link", [])?;
    }
    for l in &reply.links {
        apply_one(tx, l)?;
    }
    tx.execute(
        "INSERT OR REPLACE INTO snaps_meta (key, value) VALUES (?1, ?2)",
        params![LINKS_VERSION, reply.links_version.to_string()],
    )?;
    Ok(reply.links.len())
}

/// Makes or removes one link, both directions. The version stays: the next
/// refresh brings the link again, which changes nothing.
pub(crate) fn apply_one(conn: &Connection, link: &v1::IdentityLink) -> Result<()> {
    let key = |v: Option<&v1::Value>| match v.map(snaps_proto::decode_value) {
        Some(Value::Int(k)) => Ok(k),
        other => Err(Error::Invalid(format!(
            "the controller sent a link with key {other:?}, not a patient number"
        ))),
    };
    let (a, b) = (key(link.key.as_ref())?, key(link.other_key.as_ref())?);
    if link.removed {
        conn.prepare_cached(
            "DELETE FROM snaps_link WHERE (key = ?1 AND other = ?2) OR (key = ?2 AND other = ?1)",
        )?
        .execute(params![a, b])?;
    } else {
        let mut insert = conn.prepare_cached(
            "INSERT OR REPLACE INTO snaps_link (key, other, other_site) VALUES (?1, ?2, ?3)",
        )?;
        insert.execute(params![a, b, link.other_site])?;
        insert.execute(params![b, a, link.site])?;
    }
    Ok(())
}
