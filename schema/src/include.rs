//! Include trees: what a fetch of a tuple brings along.
//!
//! A radiology encounter asks for a patient, then his visits, then the last
//! visit's report lines. Over a thin line each question is a round trip, so
//! the network may declare, per global relation, which children a fetch of
//! its tuples brings with it: `"patient.pno" = ["visit.pno"]` says that a
//! fetch of patients brings every visit whose `pno` is a fetched patient's,
//! and `"visit.vno" = ["visit_rep.vno"]` that visits bring their report
//! lines. The edges follow keys: the parent side is an attribute of the
//! parent relation's key, so the site can tell afterwards, by those values,
//! which parents' children it now holds all of.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::{Catalog, Error, Result};

/// `[includes]` of `network.toml`: `"parent.key" = ["child.attribute", ...]`.
pub type IncludeConfig = BTreeMap<String, Vec<String>>;

/// One edge of an include tree: a fetch of `parent` tuples brings the
/// `child` tuples whose `child_attribute` equals a fetched parent's
/// `parent_attribute` (the parent's key).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct IncludeEdge {
    /// The global relation fetched.
    pub parent: String,
    /// Its key attribute.
    pub parent_attribute: String,
    /// The global relation brought along.
    pub child: String,
    /// The child's attribute holding the parent's key.
    pub child_attribute: String,
}

/// The edges `config` declares, checked against the global schema: the
/// relations and attributes exist, each parent attribute is one of its
/// relation's key attributes, both sides have the same type, and no relation includes
/// itself through any path (a cycle would fetch without end).
pub fn include_edges(config: &IncludeConfig, global: &Catalog) -> Result<Vec<IncludeEdge>> {
    let split = |qualified: &str| -> Result<(String, String)> {
        let (r, a) = qualified.split_once('.').ok_or_else(|| {
            Error::Catalog(format!("includes: {qualified:?} is not relation.attribute"))
        })?;
        let rel = global
            .relation(r)
            .ok_or_else(|| Error::Catalog(format!("includes: {r} is not a global relation")))?;
        if rel.attribute(a).is_none() {
            return Err(Error::Catalog(format!(
                "includes: {r} has no attribute {a}"
            )));
        }
        Ok((r.to_string(), a.to_string()))
    };
    let mut edges = Vec::new();
    for (parent, children) in config {
        let (pr, pa) = split(parent)?;
        let key = &global
            .relation(&pr)
            .map(|r| r.key.clone())
            .unwrap_or_default();
        if !key.contains(&pa) {
            return Err(Error::Catalog(format!(
                "includes: {parent} is not part of {pr}'s key (its key is {})",
                if key.is_empty() {
                    "not declared".to_string()
                } else {
                    key.join(", ")
                }
            )));
        }
        for child in children {
            let (cr, ca) = split(child)?;
            let ty = |r: &str, a: &str| {
                global
                    .relation(r)
                    .and_then(|r| r.attribute(a))
                    .map(|a| a.ty)
            };
            if ty(&pr, &pa).map(|t| t.is_integer()) != ty(&cr, &ca).map(|t| t.is_integer()) {
                return Err(Error::Catalog(format!(
                    "includes: {parent} and {child} do not hold the same kind of value"
                )));
            }
            let edge = IncludeEdge {
                parent: pr.clone(),
                parent_attribute: pa.clone(),
                child: cr,
                child_attribute: ca,
            };
            if edges.contains(&edge) {
                return Err(Error::Catalog(format!(
                    "includes: {parent} lists {child} twice"
                )));
            }
            edges.push(edge);
        }
    }
    // No relation may reach itself.
    for start in edges
        .iter()
        .map(|e| e.parent.as_str())
        .collect::<BTreeSet<_>>()
    {
        let mut seen = BTreeSet::new();
        let mut todo = vec![start];
        while let Some(r) = todo.pop() {
            for e in edges.iter().filter(|e| e.parent == r) {
                if e.child == start {
                    return Err(Error::Catalog(format!(
                        "includes: {start} includes itself (through {}.{})",
                        e.parent, e.parent_attribute
                    )));
                }
                if seen.insert(e.child.as_str()) {
                    todo.push(&e.child);
                }
            }
        }
    }
    Ok(edges)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn global() -> Catalog {
        Catalog::from_ddl(
            "CREATE TABLE patient (pno INTEGER PRIMARY KEY, surname CHAR(20));
             CREATE TABLE visit (vno INTEGER, pno INTEGER, date INTEGER, PRIMARY KEY (vno, pno));
             CREATE TABLE visit_rep (vno INTEGER, line_no SMALLINT, line CHAR(60), PRIMARY KEY (vno, line_no));",
        )
        .unwrap()
    }

    fn config(pairs: &[(&str, &[&str])]) -> IncludeConfig {
        pairs
            .iter()
            .map(|(p, c)| (p.to_string(), c.iter().map(|s| s.to_string()).collect()))
            .collect()
    }

    #[test]
    fn the_radiology_tree_is_read() {
        let edges = include_edges(
            &config(&[
                ("patient.pno", &["visit.pno"]),
                ("visit.vno", &["visit_rep.vno"]),
            ]),
            &global(),
        )
        .unwrap();
        assert_eq!(edges.len(), 2);
        assert_eq!(edges[0].parent, "patient");
        assert_eq!(edges[0].child, "visit");
        assert_eq!(edges[1].child_attribute, "vno");
    }

    #[test]
    fn bad_trees_are_refused_by_name() {
        let err = |pairs: &[(&str, &[&str])]| {
            include_edges(&config(pairs), &global())
                .unwrap_err()
                .to_string()
        };
        assert!(
            err(&[("patient", &["visit.pno"])]).contains("\"patient\" is not relation.attribute")
        );
        assert!(err(&[("ward.no", &["visit.pno"])]).contains("ward is not a global relation"));
        assert!(err(&[("patient.pno", &["visit.pnum"])]).contains("visit has no attribute pnum"));
        assert!(err(&[("patient.surname", &["visit.pno"])]).contains("not part of patient's key"));
        assert!(err(&[("visit.date", &["visit_rep.vno"])]).contains("not part of visit's key"));
        assert!(err(&[("patient.pno", &["visit.pno", "visit.pno"])]).contains("twice"));
        assert!(
            err(&[
                ("patient.pno", &["visit.pno"]),
                ("visit.vno", &["patient.pno"])
            ])
            .contains("includes itself")
        );
    }
}
