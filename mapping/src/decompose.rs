//! Query decomposition (chapter 7, "The Query Decomposition Algorithm"),
//! generalised from the thesis' single join to any number of range variables
//! and to `LEFT JOIN`.
//!
//! Each top-level conjunct of the qualification becomes one of:
//! * a **selection** of one variable — any expression on that variable alone
//!   (the thesis' *unambiguous* clause);
//! * a **join clause** `r.a = s.b` between two variables (*ambiguous*);
//! * a **local-only** conjunct: anything else, evaluated only at the site.
//!
//! Soundness for fetching rests on one fact: every tuple in a row of the answer
//! satisfies every selection of its variable and every join clause with its
//! partners. Outer joins break that fact for the null-supplying side, so for a
//! `LEFT JOIN`ed variable only its `ON` conditions count: a `WHERE` conjunct on it
//! is local-only (with a partner missing, the site would wrongly produce the
//! null-extended row), and an `ON` condition on the preserved side restricts
//! nothing.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use snaps_schema::Catalog;

use crate::ir::{BinOp, ColumnRef, Expr, Range, Select, Target};
use crate::{Error, Result};

/// An equality between attributes of two range variables.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinClause {
    /// Left attribute (qualified).
    pub left: ColumnRef,
    /// Right attribute (qualified).
    pub right: ColumnRef,
    /// For a `LEFT JOIN` condition: the null-supplying variable.
    pub outer: Option<String>,
}

/// A query's qualification, split per chapter 7.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decomposition {
    /// The range variables, in FROM order.
    pub ranges: Vec<Range>,
    /// Selections per variable (every variable has an entry, maybe empty).
    pub selections: BTreeMap<String, Vec<Expr>>,
    /// Join clauses.
    pub joins: Vec<JoinClause>,
    /// Conjuncts only the site evaluates.
    pub local_only: Vec<Expr>,
}

impl Decomposition {
    /// The thesis' *ambiguous* query: one with a join clause.
    pub fn ambiguous(&self) -> bool {
        !self.joins.is_empty()
    }

    /// The range of variable `var`.
    pub fn range(&self, var: &str) -> Option<&Range> {
        self.ranges.iter().find(|r| r.var == var)
    }
}

/// Qualifies every attribute reference of `select` with its range variable,
/// checking names against the site's `catalog`. Relations the catalog does
/// not know (the application's own tables) are left unchecked; a bare name
/// that only such a relation could hold stays unqualified.
pub fn resolve(select: &Select, catalog: &Catalog) -> Result<Select> {
    let mut seen = std::collections::BTreeSet::new();
    for r in &select.ranges {
        if !seen.insert(&r.var) {
            return Err(Error::Unknown(format!(
                "range variable {} is declared twice",
                r.var
            )));
        }
    }
    let fix = |e: &Expr| -> Result<Expr> {
        let mut err = None;
        let out = e.map_columns(&mut |c| match qualify(c, &select.ranges, catalog) {
            Ok(q) => Expr::Column(q),
            Err(e) => {
                err.get_or_insert(e);
                Expr::Column(c.clone())
            }
        });
        err.map_or(Ok(out), Err)
    };
    let mut out = select.clone();
    for r in &mut out.ranges {
        if let Some(on) = &r.left_join_on {
            r.left_join_on = Some(fix(on)?);
        }
    }
    for t in &mut out.targets {
        match t {
            Target::Expr { expr, .. } => *expr = fix(expr)?,
            Target::All(Some(v)) if !select.ranges.iter().any(|r| &r.var == v) => {
                return Err(Error::Unknown(format!(
                    "unknown range variable {v} in {v}.*"
                )));
            }
            Target::All(_) => {}
        }
    }
    let aliases: Vec<&str> = select
        .targets
        .iter()
        .filter_map(|t| match t {
            Target::Expr { alias: Some(a), .. } => Some(a.as_str()),
            _ => None,
        })
        .collect();
    out.qual = out.qual.as_ref().map(&fix).transpose()?;
    out.group_by = out.group_by.iter().map(&fix).collect::<Result<_>>()?;
    out.having = out.having.as_ref().map(&fix).transpose()?;
    for o in &mut out.order_by {
        // ORDER BY may name an output column (`ORDER BY n`).
        let is_alias = matches!(&o.expr, Expr::Column(ColumnRef { var: None, attr }) if aliases.contains(&attr.as_str()));
        if !is_alias {
            o.expr = fix(&o.expr)?;
        }
    }
    Ok(out)
}

fn qualify(c: &ColumnRef, ranges: &[Range], catalog: &Catalog) -> Result<ColumnRef> {
    match &c.var {
        Some(v) => {
            let range = ranges
                .iter()
                .find(|r| &r.var == v)
                .ok_or_else(|| Error::Unknown(format!("unknown range variable {v} in {c}")))?;
            if let Some(rel) = catalog.relation(&range.relation)
                && rel.attribute(&c.attr).is_none()
            {
                let via = if range.var == range.relation {
                    String::new()
                } else {
                    format!(" in {c}")
                };
                return Err(Error::Unknown(format!(
                    "unknown attribute {}.{}{via}",
                    range.relation, c.attr
                )));
            }
            Ok(c.clone())
        }
        None => {
            let holders: Vec<&Range> = ranges
                .iter()
                .filter(|r| {
                    catalog
                        .relation(&r.relation)
                        .is_some_and(|rel| rel.attribute(&c.attr).is_some())
                })
                .collect();
            let unknown = ranges
                .iter()
                .filter(|r| catalog.relation(&r.relation).is_none())
                .count();
            match (holders.as_slice(), unknown) {
                ([one], 0) => Ok(ColumnRef::new(&one.var, &c.attr)),
                ([], 0) => Err(Error::Unknown(format!("unknown attribute {}", c.attr))),
                ([], 1) => {
                    let r = ranges
                        .iter()
                        .find(|r| catalog.relation(&r.relation).is_none());
                    Ok(r.map_or_else(|| c.clone(), |r| ColumnRef::new(&r.var, &c.attr)))
                }
                (many, 0) => Err(Error::Unknown(format!(
                    "attribute {} is ambiguous: it could be {}",
                    c.attr,
                    many.iter()
                        .map(|r| format!("{}.{}", r.var, c.attr))
                        .collect::<Vec<_>>()
                        .join(" or ")
                ))),
                // A relation SNAPS does not know may hold it too: leave it to SQLite.
                _ => Ok(c.clone()),
            }
        }
    }
}

/// Splits a resolved retrieval's qualification into selections, join clauses
/// and local-only conjuncts.
pub fn decompose(select: &Select) -> Decomposition {
    let mut d = Decomposition {
        ranges: select.ranges.clone(),
        selections: select
            .ranges
            .iter()
            .map(|r| (r.var.clone(), Vec::new()))
            .collect(),
        joins: Vec::new(),
        local_only: Vec::new(),
    };
    let nullable: Vec<&str> = select
        .ranges
        .iter()
        .filter(|r| r.left_join_on.is_some())
        .map(|r| r.var.as_str())
        .collect();
    for r in &select.ranges {
        if let Some(on) = &r.left_join_on {
            for c in on.conjuncts() {
                classify_on(c, &r.var, &mut d);
            }
        }
    }
    if let Some(q) = &select.qual {
        for c in q.conjuncts() {
            let vars = c.vars();
            let touches_nullable = vars
                .iter()
                .any(|v| v.as_deref().is_some_and(|v| nullable.contains(&v)));
            if touches_nullable {
                d.local_only.push(c.clone());
            } else {
                classify(c, &vars, None, &mut d);
            }
        }
    }
    d
}

fn classify_on(c: &Expr, nullable: &str, d: &mut Decomposition) {
    let vars = c.vars();
    if vars.iter().any(|v| v.as_deref() == Some(nullable)) {
        classify(c, &vars, Some(nullable), d);
    } else {
        // An ON condition on the preserved side alone filters nothing.
        d.local_only.push(c.clone());
    }
}

fn classify(c: &Expr, vars: &[Option<String>], outer: Option<&str>, d: &mut Decomposition) {
    match vars {
        [Some(v)] if !c.has_aggregate() => {
            if let Some(sel) = d.selections.get_mut(v) {
                sel.push(c.clone());
                return;
            }
            d.local_only.push(c.clone());
        }
        [Some(_), Some(_)] => match c {
            Expr::Binary {
                op: BinOp::Eq,
                left,
                right,
            } => match (left.as_ref(), right.as_ref()) {
                (Expr::Column(l), Expr::Column(r)) => d.joins.push(JoinClause {
                    left: l.clone(),
                    right: r.clone(),
                    outer: outer.map(str::to_string),
                }),
                _ => d.local_only.push(c.clone()),
            },
            _ => d.local_only.push(c.clone()),
        },
        _ => d.local_only.push(c.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::Statement;

    fn catalog() -> Catalog {
        Catalog::from_ddl(
            "CREATE TABLE patient (pno i4 PRIMARY KEY, name c20, dob i4);
             CREATE TABLE visit (vno i4 PRIMARY KEY, pno i4, date c8);",
        )
        .unwrap()
    }

    fn dec(sql: &str) -> Result<Decomposition> {
        let Statement::Select(s) = crate::sql::parse(sql).unwrap().remove(0) else {
            panic!()
        };
        Ok(decompose(&resolve(&s, &catalog())?))
    }

    fn strings(v: &[Expr]) -> Vec<String> {
        v.iter().map(|e| e.to_string()).collect()
    }

    #[test]
    fn selections_joins_and_local_conjuncts() {
        let d = dec(
            "SELECT visit.* FROM patient, visit, invoice i WHERE patient.name = 'Smith' \
                     AND patient.pno = visit.pno AND visit.date = '12/12/87' AND i.pno = visit.pno \
                     AND (patient.dob < 1 OR visit.vno > 2) AND 1 = 1 AND i.amount > 5 AND dob = 2",
        )
        .unwrap();
        assert_eq!(
            strings(&d.selections["patient"]),
            ["patient.name = 'Smith'"]
        );
        assert_eq!(strings(&d.selections["visit"]), ["visit.date = '12/12/87'"]);
        assert_eq!(strings(&d.selections["i"]), ["i.amount > 5"]);
        assert_eq!(d.joins.len(), 2);
        assert_eq!(d.joins[0].left, ColumnRef::new("patient", "pno"));
        // `dob` could be an attribute of the application's own `invoice`, which
        // SNAPS does not know, so it stays unqualified and local.
        assert_eq!(
            strings(&d.local_only),
            ["patient.dob < 1 OR visit.vno > 2", "1 = 1", "dob = 2"]
        );
        assert!(d.ambiguous());
        let d = dec("SELECT * FROM patient WHERE name = 'Jones'").unwrap();
        assert_eq!(
            strings(&d.selections["patient"]),
            ["patient.name = 'Jones'"]
        );
        assert!(!d.ambiguous());
    }

    #[test]
    fn left_join_keeps_where_on_the_nullable_side_local() {
        let d = dec(
            "SELECT * FROM patient p LEFT JOIN visit v ON p.pno = v.pno AND v.date = 'x' \
                     AND p.dob = 3 WHERE p.name = 'Smith' AND v.vno IS NULL",
        )
        .unwrap();
        assert_eq!(strings(&d.selections["p"]), ["p.name = 'Smith'"]);
        assert_eq!(strings(&d.selections["v"]), ["v.date = 'x'"]);
        assert_eq!(d.joins[0].outer.as_deref(), Some("v"));
        assert_eq!(strings(&d.local_only), ["p.dob = 3", "v.vno IS NULL"]);
    }

    #[test]
    fn names_are_checked() {
        assert_eq!(
            dec("SELECT x FROM patient").unwrap_err().to_string(),
            "unknown attribute x"
        );
        assert_eq!(
            dec("SELECT p.surnme FROM patient p")
                .unwrap_err()
                .to_string(),
            "unknown attribute patient.surnme in p.surnme"
        );
        assert_eq!(
            dec("SELECT q.name FROM patient p").unwrap_err().to_string(),
            "unknown range variable q in q.name"
        );
        assert_eq!(
            dec("SELECT pno FROM patient, visit")
                .unwrap_err()
                .to_string(),
            "attribute pno is ambiguous: it could be patient.pno or visit.pno"
        );
        assert!(dec("SELECT * FROM patient p, visit p").is_err());
    }
}
