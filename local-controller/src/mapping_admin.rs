//! Administrators' edits of a site's mapping tables (`snaps_mapping`,
//! `snaps_mapping_qualification`): written with SQL through the site's
//! endpoint or with `snaps mapping add/remove/check`, validated when written
//! (the same messages as `snaps check` and `snaps explain`), and put into
//! effect at the next refresh epoch.
//!
//! The tables are what the administrator edits; the mapping in effect is
//! kept apart (`snaps_meta` key `active_mapping`, its rows as JSON) until an
//! epoch's collect puts the edit into effect: the site's own tuples of every
//! relation whose attributes changed are pushed again in the new shape
//! (newly mapped attributes reach the global snapshot), attributes no longer
//! mapped are withdrawn from the global snapshot (set NULL in the site's
//! tuples there, and so at every holder), the relation's copies are fetched
//! again in the new shape, its triggers are made for the new mapping, and
//! the snapshot definitions are planned again.
//!
//! An edit may change which attributes of a shared relation are mapped and
//! how; it may not start or stop sharing a relation (that changes the
//! relation's table: rebuild the site database instead), leave a key
//! attribute unmapped, or leave a snapshot definition selecting or joining on an
//! attribute no longer mapped (it would fetch every tuple): the refusal
//! names the definition.

use std::collections::{BTreeMap, BTreeSet};

use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use snaps_mapping::SiteMapping;
use snaps_mapping::ir::Expr;
use snaps_mapping::mapping::{MappingRow, QualificationRow};
use snaps_mapping::performed::SnapshotDefinition;
use snaps_schema::Catalog;

use crate::{Error, Result};

/// `snaps_meta` key of the mapping in effect.
const ACTIVE: &str = "active_mapping";
/// `snaps_meta` key of attributes withdrawn but not yet committed.
pub(crate) const WITHDRAWN: &str = "withdrawn_attributes";

/// The rows of a mapping.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MappingRows {
    /// The mapping table.
    pub rows: Vec<MappingRow>,
    /// The mapping-qualification table.
    pub qualifications: Vec<QualificationRow>,
}

impl MappingRows {
    /// Reads the mapping tables.
    pub fn read(conn: &Connection) -> Result<MappingRows> {
        let mut stmt = conn.prepare(
            "SELECT row, local_relation, local_attribute, global_relation, global_attribute, to_global, to_local
             FROM snaps_mapping ORDER BY row",
        )?;
        let rows = stmt
            .query_map([], |r| {
                Ok(MappingRow {
                    row: r.get::<_, i64>(0)? as usize,
                    local_relation: r.get(1)?,
                    local_attribute: r.get(2)?,
                    global_relation: r.get(3)?,
                    global_attribute: r.get(4)?,
                    to_global: r.get(5)?,
                    to_local: r.get(6)?,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        let mut stmt = conn.prepare(
            "SELECT row, local_relation, qualification FROM snaps_mapping_qualification ORDER BY row",
        )?;
        let qualifications = stmt
            .query_map([], |r| {
                Ok(QualificationRow {
                    row: r.get::<_, i64>(0)? as usize,
                    local_relation: r.get(1)?,
                    qualification: r.get(2)?,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(MappingRows {
            rows,
            qualifications,
        })
    }

    /// The mapping in effect: the one recorded when an edit last took
    /// effect, or the tables' when there was none.
    pub fn active(conn: &Connection) -> Result<MappingRows> {
        let json: Option<String> = conn
            .query_row(
                "SELECT value FROM snaps_meta WHERE key = ?1",
                [ACTIVE],
                |r| r.get(0),
            )
            .optional()?;
        match json {
            Some(j) => serde_json::from_str(&j)
                .map_err(|e| Error::Invalid(format!("the mapping in effect is unreadable: {e}"))),
            None => MappingRows::read(conn),
        }
    }

    /// Records these rows as the mapping in effect.
    pub(crate) fn make_active(&self, conn: &Connection) -> Result<()> {
        let json = serde_json::to_string(self).map_err(|e| Error::Invalid(e.to_string()))?;
        conn.execute(
            "INSERT OR REPLACE INTO snaps_meta (key, value) VALUES (?1, ?2)",
            params![ACTIVE, json],
        )?;
        Ok(())
    }

    /// The mapping these rows make.
    pub fn mapping(&self, local: &Catalog, global: &Catalog) -> Result<SiteMapping> {
        Ok(SiteMapping::new(
            &self.rows,
            &self.qualifications,
            local,
            global,
        )?)
    }

    /// The mapped attributes, as `relation.attribute → global.attribute`.
    fn described(&self) -> BTreeSet<String> {
        self.rows
            .iter()
            .map(|r| {
                format!(
                    "{}.{} → {}.{}",
                    r.local_relation, r.local_attribute, r.global_relation, r.global_attribute
                )
            })
            .collect()
    }
}

/// What an edit changes against the mapping in effect, in words.
pub fn differences(active: &MappingRows, edited: &MappingRows) -> Vec<String> {
    let (a, e) = (active.described(), edited.described());
    let mut out: Vec<String> = e.difference(&a).map(|d| format!("+ {d}")).collect();
    out.extend(a.difference(&e).map(|d| format!("- {d}")));
    if active.qualifications != edited.qualifications {
        out.push("~ mapping qualifications".into());
    }
    out
}

/// Checks edited mapping rows against the site: a valid mapping of the
/// site's catalogs (which maps every key attribute), sharing the same
/// relations as the mapping in effect, and every snapshot definition still
/// selecting and joining on mapped attributes only. Returns the edited
/// mapping.
pub fn validate(
    conn: &Connection,
    edited: &MappingRows,
    local: &Catalog,
    global: &Catalog,
) -> Result<SiteMapping> {
    let mapping = edited.mapping(local, global)?;
    let active = MappingRows::active(conn)?.mapping(local, global)?;
    let names = |m: &SiteMapping| -> BTreeSet<String> {
        m.relations().map(|r| r.local.name.clone()).collect()
    };
    let (now, then) = (names(&mapping), names(&active));
    if let Some(r) = now.symmetric_difference(&then).next() {
        let what = if now.contains(r) { "start" } else { "stop" };
        return Err(Error::Invalid(format!(
            "the mapping would {what} sharing {r}: an edit may change how a shared relation is mapped, \
             not which relations are shared (that changes {r}'s table: build the site database again)"
        )));
    }
    let mut stmt = conn.prepare(
        "SELECT snapshot_no, statement, plan FROM snaps_snapshot_definition ORDER BY snapshot_no",
    )?;
    let defs = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
            ))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    for (no, statement, plan) in defs {
        let def: SnapshotDefinition = serde_json::from_str(&plan)
            .map_err(|e| Error::Invalid(format!("snapshot definition {no} is unreadable: {e}")))?;
        for (relation, attribute) in used_attributes(&def) {
            let mapped = mapping
                .relation(&relation)
                .is_some_and(|rm| rm.maps(&attribute));
            if !mapped {
                return Err(Error::Invalid(format!(
                    "snapshot definition {no} ({}) selects or joins on {relation}.{attribute}, which \
                     would no longer be mapped: it would fetch every {relation} tuple. Remove the \
                     definition first (DELETE FROM snaps_snapshot_definition WHERE snapshot_no = {no}; \
                     its copies go at the next refresh)",
                    statement.trim()
                )));
            }
        }
    }
    Ok(mapping)
}

/// The (relation, attribute) pairs a definition's fetch selects or joins on.
fn used_attributes(def: &SnapshotDefinition) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for g in &def.groups {
        let relation_of: BTreeMap<&str, &str> = g
            .tables
            .iter()
            .map(|t| (t.var.as_str(), t.relation.as_str()))
            .collect();
        let mut add = |var: Option<&str>, attr: &str| {
            if let Some(r) = var.and_then(|v| relation_of.get(v)) {
                out.insert((r.to_string(), attr.to_string()));
            }
        };
        for t in &g.tables {
            for e in &t.selection {
                e.walk(&mut |x| {
                    if let Expr::Column(c) = x {
                        add(c.var.as_deref().or(Some(t.var.as_str())), &c.attr);
                    }
                });
            }
        }
        for j in &g.joins {
            add(j.left.var.as_deref(), &j.left.attr);
            add(j.right.var.as_deref(), &j.right.attr);
        }
    }
    out
}

/// What an administrator's command did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EditReport {
    /// The edit against the mapping in effect (empty: none pending).
    pub pending: Vec<String>,
}

impl std::fmt::Display for EditReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.pending.is_empty() {
            return f.write_str("the mapping tables are valid; they are the mapping in effect");
        }
        writeln!(
            f,
            "the mapping tables are valid; at the next refresh epoch they take effect:"
        )?;
        for p in &self.pending {
            writeln!(f, "  {p}")?;
        }
        Ok(())
    }
}

/// Runs `edit` on the mapping tables of the site database at `path` in one
/// transaction and keeps it only if the result validates.
fn edit_file(
    path: &std::path::Path,
    global: &Catalog,
    edit: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<()>,
) -> Result<EditReport> {
    let store = crate::SiteStore::open(path)?;
    let local = store.catalog().clone();
    drop(store);
    let mut conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    let tx = conn.transaction()?;
    // What the tables hold before the first edit is the mapping in effect.
    MappingRows::active(&tx)?.make_active(&tx)?;
    edit(&tx)?;
    let edited = MappingRows::read(&tx)?;
    validate(&tx, &edited, &local, global)?;
    let pending = differences(&MappingRows::active(&tx)?, &edited);
    tx.commit()?;
    Ok(EditReport { pending })
}

/// `snaps mapping add`: one more mapping row.
pub fn add_row(path: &std::path::Path, global: &Catalog, row: &MappingRow) -> Result<EditReport> {
    edit_file(path, global, |tx| {
        tx.execute(
            "INSERT INTO snaps_mapping (row, local_relation, local_attribute, global_relation, global_attribute, to_global, to_local)
             VALUES ((SELECT coalesce(max(row), 0) + 1 FROM snaps_mapping), ?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                row.local_relation,
                row.local_attribute,
                row.global_relation,
                row.global_attribute,
                row.to_global,
                row.to_local
            ],
        )?;
        Ok(())
    })
}

/// `snaps mapping remove`: the rows mapping a local attribute (onto one
/// global relation, if given).
pub fn remove_rows(
    path: &std::path::Path,
    global: &Catalog,
    relation: &str,
    attribute: &str,
    global_relation: Option<&str>,
) -> Result<EditReport> {
    edit_file(path, global, |tx| {
        let n = tx.execute(
            "DELETE FROM snaps_mapping WHERE local_relation = ?1 AND local_attribute = ?2
               AND (?3 IS NULL OR global_relation = ?3)",
            params![relation, attribute, global_relation],
        )?;
        if n == 0 {
            return Err(Error::Invalid(format!(
                "no mapping row maps {relation}.{attribute}"
            )));
        }
        Ok(())
    })
}

/// `snaps mapping check`: validates the tables and says what takes effect
/// at the next epoch.
pub fn check(path: &std::path::Path, global: &Catalog) -> Result<EditReport> {
    edit_file(path, global, |_| Ok(()))
}
