//! What the controller tells this site of the other sites' data
//! (`snaps_schema::summary`): stored with the epoch it describes, and used
//! by the query path to leave out of a fetch a join group the summaries
//! prove would bring nothing.

use rusqlite::{Connection, OptionalExtension, params};
use snaps_mapping::performed::pinned_global;
use snaps_mapping::rewrite::{JoinGroup, Reassembly};
use snaps_proto::v1;
use snaps_schema::summary::{decode_sorted, fingerprint};
use snaps_schema::{Catalog, Value};

use crate::{Error, Result};

/// `snaps_meta` key: the version of the summaries held.
pub(crate) const SUMMARY_VERSION: &str = "summary_version";

/// How many value combinations of a lookup one query may ask about before
/// the check gives up and fetches.
const MAX_COMBINATIONS: usize = 64;

/// The version of the summaries in `conn` (0: none).
pub(crate) fn version(conn: &Connection) -> Result<u64> {
    crate::refresh::meta_epoch(conn, SUMMARY_VERSION)
}

/// Applies the summaries of a Changes reply, in the caller's transaction
/// (the one that applies the epoch's changes). Returns the items added
/// and removed.
pub(crate) fn apply(tx: &Connection, reply: &v1::ChangesReply) -> Result<(u64, u64)> {
    if reply.summaries_whole || reply.summary_version == 0 {
        tx.execute("DELETE FROM snaps_summary_item", [])?;
        tx.execute("DELETE FROM snaps_summary", [])?;
    }
    let (mut added, mut removed) = (0, 0);
    for s in &reply.summaries {
        let kind = match v1::SummaryKind::try_from(s.kind) {
            Ok(v1::SummaryKind::Keys) => "keys",
            Ok(v1::SummaryKind::Lookup) => "lookup",
            _ => {
                return Err(Error::Invalid(format!(
                    "the controller sent a summary of {} of unknown kind {}",
                    s.relation, s.kind
                )));
            }
        };
        let name = if kind == "keys" {
            format!("{}.{}", s.relation, s.attributes.join(","))
        } else {
            format!("{}({})", s.relation, s.attributes.join(","))
        };
        let bad = |e: snaps_schema::Error| Error::Invalid(format!("summary {name}: {e}"));
        tx.execute(
            "INSERT INTO snaps_summary (name, kind, relation, attributes, first, last)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (name) DO UPDATE SET kind = excluded.kind, relation = excluded.relation,
                 attributes = excluded.attributes, first = excluded.first, last = excluded.last",
            params![
                name,
                kind,
                s.relation,
                s.attributes.join(","),
                s.first,
                s.last
            ],
        )?;
        let mut del =
            tx.prepare_cached("DELETE FROM snaps_summary_item WHERE name = ?1 AND item = ?2")?;
        for i in decode_sorted(&s.removed).map_err(bad)? {
            removed += del.execute(params![name, i as i64])? as u64;
        }
        let mut add = tx.prepare_cached(
            "INSERT OR IGNORE INTO snaps_summary_item (name, item) VALUES (?1, ?2)",
        )?;
        for i in decode_sorted(&s.added).map_err(bad)? {
            added += add.execute(params![name, i as i64])? as u64;
        }
    }
    tx.execute(
        "INSERT INTO snaps_meta (key, value) VALUES (?1, ?2)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        params![SUMMARY_VERSION, reply.summary_version.to_string()],
    )?;
    Ok((added, removed))
}

/// Whether the summaries prove a fetch of `group` would bring nothing: no
/// table is split over several global relations, no join is outer, and for
/// every table some summary shows that no other site's tuple has the values
/// the group pins it to (a key summary of the site's range, or a lookup
/// summary whose attributes are all pinned). A tuple the fetch could return
/// belongs to another site and has those values; the summaries hold every
/// such tuple's values as of the last epoch applied.
pub(crate) fn proves_empty(conn: &Connection, global: &Catalog, group: &JoinGroup) -> Result<bool> {
    if group
        .tables
        .iter()
        .any(|t| t.parts.len() != 1 || t.reassembly != Reassembly::Single)
    {
        return Ok(false);
    }
    let Some(pins) = pinned_global(group, global) else {
        return Ok(false);
    };
    for part in group.tables.iter().flat_map(|t| &t.parts) {
        let pinned = |attr: &str| pins.get(&(part.var.clone(), attr.to_string()));
        if !key_summary_closes(conn, &part.relation, &pinned)?
            && !lookup_summary_closes(conn, &part.relation, &pinned)?
        {
            return Ok(false);
        }
    }
    Ok(true)
}

fn has_item(conn: &Connection, name: &str, item: i64) -> Result<bool> {
    Ok(conn
        .prepare_cached("SELECT 1 FROM snaps_summary_item WHERE name = ?1 AND item = ?2")?
        .query_row(params![name, item], |_| Ok(()))
        .optional()?
        .is_some())
}

/// A key summary of `relation` on an attribute pinned to values of the
/// site's range, none of which the summary lists.
fn key_summary_closes<'a>(
    conn: &Connection,
    relation: &str,
    pinned: &dyn Fn(&str) -> Option<&'a Vec<Value>>,
) -> Result<bool> {
    let summaries: Vec<(String, String, i64, i64)> = conn
        .prepare_cached(
            "SELECT name, attributes, first, last FROM snaps_summary
             WHERE relation = ?1 AND kind = 'keys'",
        )?
        .query_map([relation], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })?
        .collect::<rusqlite::Result<_>>()?;
    'summary: for (name, attribute, first, last) in summaries {
        let Some(values) = pinned(&attribute) else {
            continue;
        };
        for v in values {
            let Value::Int(k) = v else { continue 'summary };
            if !(first..=last).contains(k) || has_item(conn, &name, k - first)? {
                continue 'summary;
            }
        }
        return Ok(true);
    }
    Ok(false)
}

/// A lookup summary of `relation` whose attributes are all pinned, and no
/// combination of the pinned values has its fingerprint in it.
fn lookup_summary_closes<'a>(
    conn: &Connection,
    relation: &str,
    pinned: &dyn Fn(&str) -> Option<&'a Vec<Value>>,
) -> Result<bool> {
    let summaries: Vec<(String, String)> = conn
        .prepare_cached(
            "SELECT name, attributes FROM snaps_summary WHERE relation = ?1 AND kind = 'lookup'",
        )?
        .query_map([relation], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    'summary: for (name, attributes) in summaries {
        let mut combinations: Vec<Vec<Value>> = vec![Vec::new()];
        for a in attributes.split(',') {
            let Some(values) = pinned(a) else {
                continue 'summary;
            };
            combinations = combinations
                .into_iter()
                .flat_map(|c| {
                    values.iter().map(move |v| {
                        let mut c = c.clone();
                        c.push(v.clone());
                        c
                    })
                })
                .collect();
            if combinations.len() > MAX_COMBINATIONS {
                continue 'summary;
            }
        }
        for c in &combinations {
            if has_item(conn, &name, i64::from(fingerprint(c)))? {
                continue 'summary;
            }
        }
        return Ok(true);
    }
    Ok(false)
}
