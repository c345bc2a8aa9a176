//! Rewriting a decomposed local query onto the global schema (chapter 5,
//! "map query onto global snapshot"; chapter 7, "The Unambiguous / Ambiguous
//! Query Algorithm"), and the semi-join projections that go with a join.
//!
//! The mapped query is structured, never SQL text: the global controller
//! checks it against its catalog and compiles it. Its parts:
//!
//! * one [`GlobalTable`] per mapped range variable: the global relations the
//!   local relation maps onto (a split reassembles them — `FULL JOIN` on the key
//!   for a unique-key split, `LEFT JOIN` from the main relation for a
//!   main-tuple-id split, because other sites may map fewer parts), the global
//!   attributes this site maps, and the variable's mapped selections;
//! * [`JoinGroup`]s: tables connected by mapped join clauses are evaluated
//!   together; unconnected tables are separate groups, each fetched on its
//!   own selections. Evaluating a cross product at the global snapshot would
//!   under-fetch: a table with no match there may have matches at the site.
//!
//! What does not map is dropped and recorded in [`Plan::dropped`]: dropping a
//! conjunct only widens the fetch.

use std::collections::BTreeSet;
use std::fmt;

use serde::Serialize;
use snaps_schema::{Catalog, Value};

use crate::Result;
use crate::decompose::{Decomposition, JoinClause, decompose, resolve};
use crate::ir::{BinOp, ColumnRef, Expr, Select};
use crate::mapping::{RelationMapping, SiteMapping, Split};

/// Functions the global controller evaluates with SQLite's meaning; a
/// selection calling any other function stays at the site.
pub const GLOBAL_FUNCTIONS: &[&str] = &[
    "lower", "upper", "length", "abs", "substr", "trim", "ltrim", "rtrim", "coalesce", "ifnull",
];

/// One global relation taking part in a [`GlobalTable`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GlobalPart {
    /// The range variable naming it in the mapped query.
    pub var: String,
    /// The global relation.
    pub relation: String,
    /// The global attributes this site maps from it, in mapping order: what
    /// the fetch returns.
    pub columns: Vec<String>,
}

/// How a table's parts are joined back into one local tuple.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Reassembly {
    /// A single part.
    Single,
    /// Unique-key split: `FULL JOIN` of the parts on the key attributes,
    /// given per key attribute as the global attribute of each part.
    Key(Vec<Vec<String>>),
    /// Non-unique-key split: `LEFT JOIN` from part `main` (index) to the others
    /// on `main.tuple_id = other.main_tuple_id`.
    MainTupleId(usize),
}

/// A mapped range variable.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GlobalTable {
    /// The local range variable.
    pub local_var: String,
    /// The local relation.
    pub local_relation: String,
    /// The global relations, in mapping order.
    pub parts: Vec<GlobalPart>,
    /// How the parts are reassembled.
    pub reassembly: Reassembly,
    /// Mapped selections, over the parts' variables (conjuncts).
    pub selection: Vec<Expr>,
    /// The same selections as the site wrote them (what a snapshot
    /// definition records).
    pub local_selection: Vec<Expr>,
    /// The null-supplying side of a `LEFT JOIN`: its selections belong in the
    /// join's `ON`, and its partners are returned whether it matches or not.
    pub outer: bool,
}

/// A mapped join clause between two tables of a group.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GlobalJoin {
    /// Left side, over global variables.
    pub left: Expr,
    /// Right side, over global variables.
    pub right: Expr,
    /// The local variable of the null-supplying table for a `LEFT JOIN`.
    pub outer: Option<String>,
    /// The join clause as the site wrote it.
    pub local: JoinClause,
}

/// Tables connected by join clauses, evaluated together.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JoinGroup {
    /// The tables, in the local FROM order.
    pub tables: Vec<GlobalTable>,
    /// The join clauses between them.
    pub joins: Vec<GlobalJoin>,
}

/// A local query mapped onto the global schema: one or more join groups,
/// fetched in one round trip.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GlobalQuery {
    /// The groups.
    pub groups: Vec<JoinGroup>,
}

/// The semi-join projection a site sends with a join query: the join
/// attributes of its new or modified tuples of one variable that pass the
/// variable's own selections (chapter 7, "Semi-Joins as part of a Local
/// Query"). Projected whole rows of join attributes, not one attribute at a
/// time, so a tuple joining two partners keeps both values together.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SemiJoinProjection {
    /// The local variable.
    pub local_var: String,
    /// Its local relation.
    pub local_relation: String,
    /// The local join attributes projected.
    pub attributes: Vec<String>,
    /// The variable's selections, evaluated at the site (all of them, mapped or
    /// not: the site can evaluate everything on its own tuples).
    pub selection: Vec<Expr>,
}

impl SemiJoinProjection {
    /// The local SQL that computes the projection; `changed` is the condition
    /// that picks new or modified tuples (it depends on how the site stores
    /// its status attribute).
    pub fn local_sql(&self, changed: &str) -> String {
        let mut conds: Vec<String> = self.selection.iter().map(|e| e.to_string()).collect();
        conds.push(changed.to_string());
        let from = if self.local_var == self.local_relation {
            self.local_relation.clone()
        } else {
            format!("{} AS {}", self.local_relation, self.local_var)
        };
        let attrs: Vec<String> = self
            .attributes
            .iter()
            .map(|a| ColumnRef::new(&self.local_var, a).to_string())
            .collect();
        format!(
            "SELECT DISTINCT {} FROM {from} WHERE {}",
            attrs.join(", "),
            conds.join(" AND ")
        )
    }
}

/// Everything the site needs to fetch for one query.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Plan {
    /// The decomposition of the resolved query.
    pub decomposition: Decomposition,
    /// The mapped query; `None` when no relation of the query is mapped.
    pub query: Option<GlobalQuery>,
    /// Semi-join projections to send with it.
    pub semijoins: Vec<SemiJoinProjection>,
    /// What was left out of the fetch, and why.
    pub dropped: Vec<String>,
}

/// Resolves, decomposes and maps a retrieval for a site.
pub fn plan(select: &Select, local: &Catalog, mapping: &SiteMapping) -> Result<Plan> {
    let resolved = resolve(select, local)?;
    Ok(plan_decomposition(decompose(&resolved), mapping))
}

/// Maps an already decomposed query.
pub fn plan_decomposition(d: Decomposition, mapping: &SiteMapping) -> Plan {
    let mut dropped = Vec::new();
    let mut tables: Vec<GlobalTable> = Vec::new();
    let mut taken: BTreeSet<String> = BTreeSet::new();
    for r in &d.ranges {
        let Some(rm) = mapping.relation(&r.relation) else {
            dropped.push(format!("{}: relation {} is not mapped", r.var, r.relation));
            continue;
        };
        let parts: Vec<GlobalPart> = rm
            .parts
            .iter()
            .map(|p| {
                // Unaliased: name parts after their global relations, as the
                // thesis does; aliased: keep the alias visible.
                let base = if r.var == r.relation {
                    p.global.clone()
                } else if rm.parts.len() == 1 {
                    r.var.clone()
                } else {
                    format!("{}_{}", r.var, p.global)
                };
                let mut var = base.clone();
                let mut n = 2;
                while !taken.insert(var.clone()) {
                    var = format!("{base}_{n}");
                    n += 1;
                }
                GlobalPart {
                    var,
                    relation: p.global.clone(),
                    columns: p.attrs.iter().map(|a| a.global.clone()).collect(),
                }
            })
            .collect();
        let reassembly = match &rm.split {
            Split::None => Reassembly::Single,
            Split::MainTupleId(m) => Reassembly::MainTupleId(*m),
            Split::Key(keys) => Reassembly::Key(
                keys.iter()
                    .map(|k| {
                        rm.targets(k)
                            .iter()
                            .map(|(_, a)| a.global.clone())
                            .collect()
                    })
                    .collect(),
            ),
        };
        let mut table = GlobalTable {
            local_var: r.var.clone(),
            local_relation: r.relation.clone(),
            parts,
            reassembly,
            selection: Vec::new(),
            local_selection: Vec::new(),
            outer: r.left_join_on.is_some(),
        };
        for s in d.selections.get(&r.var).into_iter().flatten() {
            match map_expr(s, &[(&table, rm)]) {
                Ok(e) => {
                    table.selection.push(e);
                    table.local_selection.push(s.clone());
                }
                Err(why) => dropped.push(format!("selection {s} dropped: {why}")),
            }
        }
        tables.push(table);
    }
    let mut joins: Vec<(GlobalJoin, String, String)> = Vec::new();
    let mut semijoin_attrs: Vec<(String, Vec<String>)> = Vec::new();
    for j in &d.joins {
        match map_join(j, &d, &tables, mapping) {
            Ok(g) => {
                let (lv, rv) = (var_of(&j.left), var_of(&j.right));
                // The preserved side of a LEFT JOIN is fetched on its own
                // selections whatever it joins, so the null-supplying side's
                // new tuples need not be projected for it.
                let sides = [&j.left, &j.right];
                let projected = sides
                    .into_iter()
                    .filter(|c| j.outer.as_deref() != c.var.as_deref());
                for c in projected {
                    let v = var_of(c);
                    match semijoin_attrs.iter_mut().find(|(x, _)| *x == v) {
                        Some((_, attrs)) if !attrs.contains(&c.attr) => attrs.push(c.attr.clone()),
                        Some(_) => {}
                        None => semijoin_attrs.push((v, vec![c.attr.clone()])),
                    }
                }
                joins.push((g, lv, rv));
            }
            Err(why) => dropped.push(format!("join {} = {} dropped: {why}", j.left, j.right)),
        }
    }
    // A null-supplying table whose outer join clause did not map is fetched
    // on its own selections, as a table of its own.
    for t in &mut tables {
        if t.outer
            && !joins
                .iter()
                .any(|(j, _, _)| j.outer.as_deref() == Some(t.local_var.as_str()))
        {
            t.outer = false;
        }
    }
    let semijoins = d
        .ranges
        .iter()
        .filter_map(|r| {
            let (_, attrs) = semijoin_attrs.iter().find(|(v, _)| *v == r.var)?;
            Some(SemiJoinProjection {
                local_var: r.var.clone(),
                local_relation: r.relation.clone(),
                attributes: attrs.clone(),
                selection: d.selections.get(&r.var).cloned().unwrap_or_default(),
            })
        })
        .collect();
    let query = (!tables.is_empty()).then(|| GlobalQuery {
        groups: group(tables, joins),
    });
    Plan {
        decomposition: d,
        query,
        semijoins,
        dropped,
    }
}

fn var_of(c: &ColumnRef) -> String {
    c.var.clone().unwrap_or_default()
}

/// Splits tables into connected components of the join graph.
fn group(tables: Vec<GlobalTable>, joins: Vec<(GlobalJoin, String, String)>) -> Vec<JoinGroup> {
    let n = tables.len();
    let mut comp: Vec<usize> = (0..n).collect();
    let find = |comp: &Vec<usize>, mut i: usize| {
        while comp[i] != i {
            i = comp[i];
        }
        i
    };
    let idx = |v: &str| tables.iter().position(|t| t.local_var == v);
    for (_, l, r) in &joins {
        if let (Some(a), Some(b)) = (idx(l), idx(r)) {
            let (ra, rb) = (find(&comp, a), find(&comp, b));
            comp[ra.max(rb)] = ra.min(rb);
        }
    }
    let roots: Vec<usize> = (0..n).map(|i| find(&comp, i)).collect();
    let mut groups: Vec<(usize, JoinGroup)> = Vec::new();
    for (i, t) in tables.into_iter().enumerate() {
        match groups.iter_mut().find(|(root, _)| *root == roots[i]) {
            Some((_, g)) => g.tables.push(t),
            None => groups.push((
                roots[i],
                JoinGroup {
                    tables: vec![t],
                    joins: Vec::new(),
                },
            )),
        }
    }
    for (j, l, _) in joins {
        if let Some((_, g)) = groups
            .iter_mut()
            .find(|(_, g)| g.tables.iter().any(|t| t.local_var == l))
        {
            g.joins.push(j);
        }
    }
    groups.into_iter().map(|(_, g)| g).collect()
}

fn map_join(
    j: &JoinClause,
    d: &Decomposition,
    tables: &[GlobalTable],
    mapping: &SiteMapping,
) -> std::result::Result<GlobalJoin, String> {
    let side = |c: &ColumnRef| -> std::result::Result<Expr, String> {
        let v = var_of(c);
        let table = tables.iter().find(|t| t.local_var == v);
        let range = d.range(&v);
        match (table, range.and_then(|r| mapping.relation(&r.relation))) {
            (Some(t), Some(rm)) => column(c, t, rm),
            _ => Err(format!("{v} is not mapped")),
        }
    };
    Ok(GlobalJoin {
        left: side(&j.left)?,
        right: side(&j.right)?,
        outer: j.outer.clone(),
        local: j.clone(),
    })
}

/// The global expression a local attribute reads as: the part's column, or
/// for a key stored in every part of a unique-key split, the first non-null
/// of them (a part may be missing for another site's tuples).
fn column(
    c: &ColumnRef,
    t: &GlobalTable,
    rm: &RelationMapping,
) -> std::result::Result<Expr, String> {
    let targets = rm.targets(&c.attr);
    if targets.is_empty() {
        return Err(format!("{}.{} is not mapped", rm.local.name, c.attr));
    }
    let cols: Vec<Expr> = targets
        .iter()
        .map(|(i, a)| Expr::col(&t.parts[*i].var, &a.global))
        .collect();
    Ok(match (&t.reassembly, cols.len()) {
        (_, 1) => cols
            .into_iter()
            .next()
            .unwrap_or(Expr::Literal(Value::Null)),
        // Main-tuple-id split: the main part is always there.
        (Reassembly::MainTupleId(m), _) => {
            let main = targets.iter().position(|(i, _)| i == m).unwrap_or(0);
            cols.into_iter()
                .nth(main)
                .unwrap_or(Expr::Literal(Value::Null))
        }
        _ => Expr::Function {
            name: "coalesce".into(),
            args: cols,
            distinct: false,
        },
    })
}

/// Maps a selection on one table. Constants compared with an attribute are
/// coerced to its type as SQLite's affinity would and converted through its
/// conversion function; anything that cannot be mapped faithfully is refused
/// (and so dropped from the fetch).
fn map_expr(
    e: &Expr,
    tables: &[(&GlobalTable, &RelationMapping)],
) -> std::result::Result<Expr, String> {
    // Attribute comparisons with constants: coerce and convert the constant.
    if let Some((col, rebuild)) = constant_shape(e) {
        let v = var_of(col);
        let (t, rm) = tables
            .iter()
            .find(|(t, _)| t.local_var == v)
            .ok_or("unknown variable")?;
        let g = column(col, t, rm)?;
        let targets = rm.targets(&col.attr);
        let Some((_, a)) = targets.first() else {
            return Err(format!("{}.{} is not mapped", rm.local.name, col.attr));
        };
        let convert = |lit: &Value| -> std::result::Result<Value, String> {
            let coerced = a.local_type.coerce_constant(lit).ok_or_else(|| {
                format!(
                    "{lit} is not comparable with {}.{} ({})",
                    rm.local.name, col.attr, a.local_type
                )
            })?;
            match a.to_global {
                Some(c) => c
                    .apply(&coerced, a.global_type, &a.global)
                    .map_err(|e| e.to_string()),
                None => Ok(coerced),
            }
        };
        return rebuild(g, &convert);
    }
    // Constants compared with attributes take the attributes' local types
    // first: the global side may read the attribute through an expression
    // (`coalesce` over a split's parts) that has no affinity of its own.
    let local_type = |c: &ColumnRef| {
        let v = var_of(c);
        let (_, rm) = tables.iter().find(|(t, _)| t.local_var == v)?;
        rm.local.attribute(&c.attr).map(|a| a.ty)
    };
    let e = &crate::eval::coerce_constants(e, &local_type)
        .ok_or_else(|| "a constant is not comparable with its attribute's type".to_string())?;
    let mut err: Option<String> = None;
    e.walk(&mut |x| {
        if let Expr::Function { name, .. } = x
            && !GLOBAL_FUNCTIONS.contains(&name.as_str())
        {
            err.get_or_insert(format!("function {name} is evaluated at the site only"));
        }
    });
    let out = e.map_columns(&mut |c| {
        let v = var_of(c);
        let found = tables.iter().find(|(t, _)| t.local_var == v);
        let mapped = found
            .ok_or_else(|| "unknown variable".to_string())
            .and_then(|(t, rm)| {
                if rm
                    .targets(&c.attr)
                    .iter()
                    .any(|(_, a)| a.to_global.is_some())
                {
                    return Err(format!(
                        "{}.{} is converted and appears in an expression",
                        rm.local.name, c.attr
                    ));
                }
                column(c, t, rm)
            });
        mapped.unwrap_or_else(|m| {
            err.get_or_insert(m);
            Expr::Column(c.clone())
        })
    });
    err.map_or(Ok(out), Err)
}

type Convert<'a> = &'a dyn Fn(&Value) -> std::result::Result<Value, String>;
type Rebuild<'a> = Box<dyn Fn(Expr, Convert) -> std::result::Result<Expr, String> + 'a>;

/// Recognises `attr op const`, `const op attr`, `attr [NOT] IN (consts)` and
/// `attr [NOT] BETWEEN const AND const`, returning the attribute and a function
/// that rebuilds the predicate around a mapped attribute and converted
/// constants.
fn constant_shape(e: &Expr) -> Option<(&ColumnRef, Rebuild<'_>)> {
    let lit = |e: &Expr| match e {
        Expr::Literal(v) => Some(v.clone()),
        _ => None,
    };
    match e {
        Expr::Binary { op, left, right } if op.is_comparison() => {
            match (left.as_ref(), right.as_ref()) {
                (Expr::Column(c), Expr::Literal(v)) | (Expr::Literal(v), Expr::Column(c)) => {
                    let op = if matches!(left.as_ref(), Expr::Literal(_)) {
                        op.flip()
                    } else {
                        *op
                    };
                    let v = v.clone();
                    Some((
                        c,
                        Box::new(move |g, conv| Ok(Expr::binary(op, g, Expr::Literal(conv(&v)?)))),
                    ))
                }
                _ => None,
            }
        }
        Expr::InList {
            expr,
            list,
            negated,
        } => match expr.as_ref() {
            Expr::Column(c) => {
                let values: Option<Vec<Value>> = list.iter().map(lit).collect();
                let values = values?;
                let negated = *negated;
                Some((
                    c,
                    Box::new(move |g, conv| {
                        let list = values
                            .iter()
                            .map(|v| conv(v).map(Expr::Literal))
                            .collect::<std::result::Result<_, _>>()?;
                        Ok(Expr::InList {
                            expr: Box::new(g),
                            list,
                            negated,
                        })
                    }),
                ))
            }
            _ => None,
        },
        Expr::Between {
            expr,
            low,
            high,
            negated,
        } => match (expr.as_ref(), lit(low), lit(high)) {
            (Expr::Column(c), Some(lo), Some(hi)) => {
                let negated = *negated;
                Some((
                    c,
                    Box::new(move |g, conv| {
                        Ok(Expr::Between {
                            expr: Box::new(g),
                            low: Box::new(Expr::Literal(conv(&lo)?)),
                            high: Box::new(Expr::Literal(conv(&hi)?)),
                            negated,
                        })
                    }),
                ))
            }
            _ => None,
        },
        _ => None,
    }
}

impl GlobalTable {
    /// The FROM item reassembling this table.
    fn reassembled(&self) -> String {
        let item = |p: &GlobalPart| {
            if p.var == p.relation {
                p.relation.clone()
            } else {
                format!("{} AS {}", p.relation, p.var)
            }
        };
        match &self.reassembly {
            Reassembly::Single => item(&self.parts[0]),
            Reassembly::Key(keys) => {
                let mut s = item(&self.parts[0]);
                for (i, p) in self.parts.iter().enumerate().skip(1) {
                    let on: Vec<String> = keys
                        .iter()
                        .map(|k| {
                            let first = Expr::col(&self.parts[0].var, &k[0]);
                            let this = Expr::col(&p.var, k.get(i).unwrap_or(&k[0]));
                            Expr::binary(BinOp::Eq, first, this).to_string()
                        })
                        .collect();
                    s = format!("{s} FULL JOIN {} ON {}", item(p), on.join(" AND "));
                }
                format!("({s})")
            }
            Reassembly::MainTupleId(m) => {
                let main = &self.parts[*m];
                let mut s = item(main);
                for (i, p) in self.parts.iter().enumerate() {
                    if i != *m {
                        s = format!(
                            "{s} LEFT JOIN {} ON {}.tuple_id = {}.main_tuple_id",
                            item(p),
                            main.var,
                            p.var
                        );
                    }
                }
                format!("({s})")
            }
        }
    }
}

impl fmt::Display for JoinGroup {
    /// The group as one SQL retrieval over the global schema.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cols: Vec<String> = self
            .tables
            .iter()
            .flat_map(|t| t.parts.iter())
            .flat_map(|p| {
                p.columns
                    .iter()
                    .map(move |c| ColumnRef::new(&p.var, c).to_string())
            })
            .collect();
        write!(f, "SELECT {} FROM ", cols.join(", "))?;
        let mut wheres: Vec<String> = Vec::new();
        for (i, t) in self.tables.iter().enumerate() {
            if t.outer {
                let mut on: Vec<String> = self
                    .joins
                    .iter()
                    .filter(|j| j.outer.as_deref() == Some(t.local_var.as_str()))
                    .map(|j| Expr::binary(BinOp::Eq, j.left.clone(), j.right.clone()).to_string())
                    .collect();
                on.extend(t.selection.iter().map(|e| e.to_string()));
                if on.is_empty() {
                    on.push("1 = 1".into());
                }
                write!(f, " LEFT JOIN {} ON {}", t.reassembled(), on.join(" AND "))?;
            } else {
                // With a LEFT JOIN in the group, CROSS JOIN keeps every earlier
                // table in scope of its ON (a comma would not, in PostgreSQL).
                if i > 0 {
                    let has_outer = self.tables.iter().any(|t| t.outer);
                    f.write_str(if has_outer { " CROSS JOIN " } else { ", " })?;
                }
                f.write_str(&t.reassembled())?;
                wheres.extend(t.selection.iter().map(|e| e.to_string()));
            }
        }
        wheres.extend(
            self.joins
                .iter()
                .filter(|j| j.outer.is_none())
                .map(|j| Expr::binary(BinOp::Eq, j.left.clone(), j.right.clone()).to_string()),
        );
        if !wheres.is_empty() {
            write!(f, " WHERE {}", wheres.join(" AND "))?;
        }
        Ok(())
    }
}

impl fmt::Display for GlobalQuery {
    /// One SQL retrieval per join group, separated by `;`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, g) in self.groups.iter().enumerate() {
            if i > 0 {
                f.write_str(";\n")?;
            }
            write!(f, "{g}")?;
        }
        Ok(())
    }
}

/// The condition the explain output shows for "new or modified at this site".
pub const CHANGED_HERE: &str = "<new or modified here>";

impl fmt::Display for Plan {
    /// The explain text administrators read (`snaps explain`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = &self.decomposition;
        let kind = if d.ambiguous() {
            "ambiguous"
        } else {
            "unambiguous"
        };
        writeln!(f, "decomposition ({kind}):")?;
        for r in &d.ranges {
            let outer = if r.left_join_on.is_some() {
                " (left join)"
            } else {
                ""
            };
            writeln!(f, "  range {} is {}{outer}", r.var, r.relation)?;
        }
        for (var, sel) in &d.selections {
            for s in sel {
                writeln!(f, "  selection {var}: {s}")?;
            }
        }
        for j in &d.joins {
            let outer = j
                .outer
                .as_ref()
                .map(|v| format!(" (left join, {v} may be null)"))
                .unwrap_or_default();
            writeln!(f, "  join: {} = {}{outer}", j.left, j.right)?;
        }
        for e in &d.local_only {
            writeln!(f, "  local only: {e}")?;
        }
        if !self.dropped.is_empty() {
            writeln!(f, "not fetched on:")?;
            for x in &self.dropped {
                writeln!(f, "  {x}")?;
            }
        }
        if !self.semijoins.is_empty() {
            writeln!(f, "semi-join projections:")?;
            for s in &self.semijoins {
                writeln!(f, "  {}: {}", s.local_var, s.local_sql(CHANGED_HERE))?;
            }
        }
        match &self.query {
            None => writeln!(f, "mapped query: none (no relation of the query is mapped)"),
            Some(q) => {
                writeln!(f, "mapped query:")?;
                for g in &q.groups {
                    writeln!(f, "  {g}")?;
                }
                Ok(())
            }
        }
    }
}
