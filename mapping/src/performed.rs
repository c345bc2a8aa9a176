//! The *performed* check (chapter 5; chapter 7's `performed` function): has an
//! earlier snapshot already brought every tuple a query needs?
//!
//! A [`SnapshotDefinition`] records what a fetch asked for, in the site's own
//! terms: per join group, the tables (relation, variable, outer or not), the
//! selections that were mapped (those that were dropped did not restrict the
//! fetch), the mapped join clauses, and the semi-join projection rows sent.
//!
//! A query's join group is covered by a recorded group when, under a
//! bijection of their variables:
//! * both have the same relations (and the same outer-join sides);
//! * every recorded join clause is also in the query (fewer joins fetched more);
//! * the query's conjuncts on each variable imply each recorded selection
//!   (`name = 'Jones' AND dob = 19340512` implies `name = 'Jones'`; `age >= 60`
//!   implies `age >= 50`) — over `=`, `<>`, `<`, `<=`, `>`, `>=`, `BETWEEN`,
//!   `IN`, `IS [NOT] NULL`, and any predicate on one attribute when the query
//!   pins that attribute to a finite set of values;
//! * for a join, the site's current semi-join projection rows are among those
//!   sent then: a tuple created or changed here since could join partners the
//!   earlier fetch did not bring.
//!
//! Every rule errs one way: when unsure, not covered.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use snaps_schema::summary::normalise;
use snaps_schema::{Catalog, SnapshotNo, Value, ValueType};

use crate::decompose::JoinClause;
use crate::eval;
use crate::ir::{BinOp, ColumnRef, Expr};
use crate::rewrite::{JoinGroup, Plan};

/// One table of a recorded group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DefinedTable {
    /// Local variable.
    pub var: String,
    /// Local relation.
    pub relation: String,
    /// Null-supplying side of a `LEFT JOIN`.
    pub outer: bool,
    /// The selections the fetch applied (mapped ones only).
    pub selection: Vec<Expr>,
    /// Attributes of the semi-join projection sent for this variable.
    pub sent_attributes: Vec<String>,
    /// The projection rows sent.
    pub sent: Vec<Vec<Value>>,
}

/// One join group of a recorded fetch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DefinedGroup {
    /// Tables.
    pub tables: Vec<DefinedTable>,
    /// Mapped join clauses.
    pub joins: Vec<JoinClause>,
}

/// What one fetch asked the global snapshot for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotDefinition {
    /// The join groups fetched.
    pub groups: Vec<DefinedGroup>,
}

impl SnapshotDefinition {
    /// Records a plan's fetch; `sent` holds, per local variable, the semi-join
    /// projection rows sent with it (over the plan's projection attributes).
    pub fn from_plan(plan: &Plan, sent: &BTreeMap<String, Vec<Vec<Value>>>) -> SnapshotDefinition {
        let groups = plan
            .query
            .iter()
            .flat_map(|q| &q.groups)
            .map(|g| DefinedGroup {
                tables: g
                    .tables
                    .iter()
                    .map(|t| {
                        let proj = plan.semijoins.iter().find(|s| s.local_var == t.local_var);
                        DefinedTable {
                            var: t.local_var.clone(),
                            relation: t.local_relation.clone(),
                            outer: t.outer,
                            selection: t.local_selection.clone(),
                            sent_attributes: proj.map(|p| p.attributes.clone()).unwrap_or_default(),
                            sent: sent.get(&t.local_var).cloned().unwrap_or_default(),
                        }
                    })
                    .collect(),
                joins: g.joins.iter().map(|j| j.local.clone()).collect(),
            })
            .collect();
        SnapshotDefinition { groups }
    }
}

/// The answer of the performed check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Coverage {
    /// For each join group of the query, the snapshot that covers it, if any.
    pub groups: Vec<Option<SnapshotNo>>,
}

impl Coverage {
    /// Every group is covered: no fetch is needed.
    pub fn covered(&self) -> bool {
        self.groups.iter().all(Option::is_some)
    }
}

/// Checks a planned query against the site's snapshot definitions.
/// `current` holds, per variable of the query, the semi-join projection rows
/// the site would send now (over `plan.semijoins` attributes); `local` is the
/// site's catalog, for the attribute types constants are compared in.
pub fn performed(
    plan: &Plan,
    current: &BTreeMap<String, Vec<Vec<Value>>>,
    local: &Catalog,
    definitions: &[(SnapshotNo, SnapshotDefinition)],
) -> Coverage {
    let Some(query) = &plan.query else {
        return Coverage { groups: Vec::new() };
    };
    let d = &plan.decomposition;
    let groups = query
        .groups
        .iter()
        .map(|g| {
            let tables: Vec<Table> = g
                .tables
                .iter()
                .map(|t| Table {
                    var: &t.local_var,
                    relation: &t.local_relation,
                    outer: t.outer,
                    conjuncts: d
                        .selections
                        .get(&t.local_var)
                        .map(Vec::as_slice)
                        .unwrap_or(&[]),
                    projection: plan
                        .semijoins
                        .iter()
                        .find(|s| s.local_var == t.local_var)
                        .map(|s| (s.attributes.as_slice(), current.get(&t.local_var))),
                })
                .collect();
            let joins: Vec<&JoinClause> = g.joins.iter().map(|j| &j.local).collect();
            definitions.iter().find_map(|(no, def)| {
                def.groups
                    .iter()
                    .any(|h| group_covers(h, &tables, &joins, local))
                    .then_some(*no)
            })
        })
        .collect();
    Coverage { groups }
}

/// The values join group `group` of `plan` pins its table's whole key to,
/// in the order of `key`: the group is one table (not the null-supplying
/// side of a `LEFT JOIN`) and the query has a conjunct `var.k = constant`
/// (or `constant = var.k`) for every attribute `k` of `key`. As keys are
/// unique in the global snapshot, such a group can fetch at most one tuple,
/// the one with that key; whether the site already holds it is the site's
/// to say.
pub fn key_pinned(plan: &Plan, group: usize, key: &[String]) -> Option<Vec<Value>> {
    let g = plan.query.as_ref()?.groups.get(group)?;
    let [t] = g.tables.as_slice() else {
        return None;
    };
    if t.outer || !g.joins.is_empty() || key.is_empty() {
        return None;
    }
    let conjuncts = plan.decomposition.selections.get(&t.local_var)?;
    let pinned = |attr: &str| {
        conjuncts.iter().find_map(|c| {
            let Expr::Binary {
                op: BinOp::Eq,
                left,
                right,
            } = c
            else {
                return None;
            };
            let (col, value) = match (left.as_ref(), right.as_ref()) {
                (Expr::Column(col), Expr::Literal(v)) | (Expr::Literal(v), Expr::Column(col)) => {
                    (col, v)
                }
                _ => return None,
            };
            (col.attr == attr
                && col.var.as_deref() == Some(t.local_var.as_str())
                && *value != Value::Null)
                .then(|| value.clone())
        })
    };
    key.iter().map(|k| pinned(k)).collect()
}

/// The values a join group of the mapped query restricts each global
/// attribute to, where it restricts it to a finite set: `(global variable,
/// attribute)` → the values, normalised to the attribute's type
/// ([`snaps_schema::summary::normalise`]). From `attr = constant` and
/// `attr IN (constants)` conjuncts of the tables' mapped selections, carried
/// along the group's inner equi-joins (`v.pno = p.pno AND p.pno = 7` pins
/// `v.pno` to 7 too). Every tuple a fetch of the group could return has, in
/// each pinned attribute, one of the values given. `None` for a group with
/// an outer join, where a row's partner may be missing.
pub fn pinned_global(
    group: &JoinGroup,
    global: &Catalog,
) -> Option<BTreeMap<(String, String), Vec<Value>>> {
    if group.tables.iter().any(|t| t.outer) || group.joins.iter().any(|j| j.outer.is_some()) {
        return None;
    }
    let relation_of: BTreeMap<&str, &str> = group
        .tables
        .iter()
        .flat_map(|t| &t.parts)
        .map(|p| (p.var.as_str(), p.relation.as_str()))
        .collect();
    let ty = |c: &ColumnRef| -> Option<ValueType> {
        let r = relation_of.get(c.var.as_deref()?)?;
        Some(global.relation(r)?.attribute(&c.attr)?.ty)
    };
    let key = |c: &ColumnRef| (c.var.clone().unwrap_or_default(), c.attr.clone());
    // Values per attribute from the selections (intersected when several
    // conjuncts pin the same attribute).
    let mut pins: BTreeMap<(String, String), Vec<Value>> = BTreeMap::new();
    for conjunct in group.tables.iter().flat_map(|t| &t.selection) {
        let (col, list): (&ColumnRef, Vec<&Value>) = match conjunct {
            Expr::Binary {
                op: BinOp::Eq,
                left,
                right,
            } => match (left.as_ref(), right.as_ref()) {
                (Expr::Column(c), Expr::Literal(v)) | (Expr::Literal(v), Expr::Column(c)) => {
                    (c, vec![v])
                }
                _ => continue,
            },
            Expr::InList {
                expr,
                list,
                negated: false,
            } => {
                let Expr::Column(c) = expr.as_ref() else {
                    continue;
                };
                let Some(values) = list
                    .iter()
                    .map(|e| match e {
                        Expr::Literal(v) => Some(v),
                        _ => None,
                    })
                    .collect::<Option<Vec<_>>>()
                else {
                    continue;
                };
                // A NULL in the list matches nothing.
                (c, values.into_iter().filter(|v| !v.is_null()).collect())
            }
            _ => continue,
        };
        let Some(t) = ty(col) else { continue };
        let Some(mut values) = list
            .into_iter()
            .map(|v| normalise(t, v))
            .collect::<Option<Vec<Value>>>()
        else {
            continue;
        };
        values.sort();
        values.dedup();
        match pins.entry(key(col)) {
            std::collections::btree_map::Entry::Vacant(e) => {
                e.insert(values);
            }
            std::collections::btree_map::Entry::Occupied(mut e) => {
                e.get_mut().retain(|v| values.contains(v));
            }
        }
    }
    // Equi-join classes: every member of a class holds the same value.
    let mut classes: Vec<Vec<ColumnRef>> = Vec::new();
    for j in &group.joins {
        let (Expr::Column(a), Expr::Column(b)) = (&j.left, &j.right) else {
            continue;
        };
        let ia = classes.iter().position(|c| c.contains(a));
        let ib = classes.iter().position(|c| c.contains(b));
        match (ia, ib) {
            (Some(x), Some(y)) if x == y => {}
            (Some(x), Some(y)) => {
                let moved = classes.remove(x.max(y));
                classes[x.min(y)].extend(moved);
            }
            (Some(x), None) => classes[x].push(b.clone()),
            (None, Some(y)) => classes[y].push(a.clone()),
            (None, None) => classes.push(vec![a.clone(), b.clone()]),
        }
    }
    for class in &classes {
        // The values every pinned member allows, in each member's type.
        let mut allowed: Option<Vec<Value>> = None;
        for c in class {
            let (Some(values), Some(t)) = (pins.get(&key(c)), ty(c)) else {
                continue;
            };
            allowed = Some(match allowed {
                None => values.clone(),
                Some(prev) => prev
                    .into_iter()
                    .filter(|v| normalise(t, v).is_some_and(|n| values.contains(&n)))
                    .collect(),
            });
        }
        let Some(allowed) = allowed else { continue };
        for c in class {
            let Some(t) = ty(c) else { continue };
            if let Some(mut values) = allowed
                .iter()
                .map(|v| normalise(t, v))
                .collect::<Option<Vec<Value>>>()
            {
                values.sort();
                values.dedup();
                pins.insert(key(c), values);
            }
        }
    }
    Some(pins)
}

/// Semi-join attributes and the rows the site would send now, if known.
type Projection<'a> = (&'a [String], Option<&'a Vec<Vec<Value>>>);

struct Table<'a> {
    var: &'a str,
    relation: &'a str,
    outer: bool,
    conjuncts: &'a [Expr],
    /// Projection attributes and the rows the site would send now.
    projection: Option<Projection<'a>>,
}

fn group_covers(h: &DefinedGroup, q: &[Table], q_joins: &[&JoinClause], local: &Catalog) -> bool {
    if h.tables.len() != q.len() {
        return false;
    }
    // Try every bijection between recorded and query variables of the same
    // relation; groups are small.
    let mut assignment: Vec<usize> = Vec::new();
    let mut used = vec![false; q.len()];
    search(h, q, q_joins, local, &mut assignment, &mut used)
}

fn search(
    h: &DefinedGroup,
    q: &[Table],
    q_joins: &[&JoinClause],
    local: &Catalog,
    assignment: &mut Vec<usize>,
    used: &mut [bool],
) -> bool {
    let i = assignment.len();
    if i == h.tables.len() {
        return bijection_covers(h, q, q_joins, local, assignment);
    }
    let t = &h.tables[i];
    for (j, qt) in q.iter().enumerate() {
        if !used[j] && qt.relation == t.relation && qt.outer == t.outer {
            used[j] = true;
            assignment.push(j);
            if search(h, q, q_joins, local, assignment, used) {
                return true;
            }
            assignment.pop();
            used[j] = false;
        }
    }
    false
}

fn bijection_covers(
    h: &DefinedGroup,
    q: &[Table],
    q_joins: &[&JoinClause],
    local: &Catalog,
    assignment: &[usize],
) -> bool {
    let rename = |v: &Option<String>| -> Option<String> {
        let i = h.tables.iter().position(|t| Some(&t.var) == v.as_ref())?;
        Some(q[assignment[i]].var.to_string())
    };
    let renamed = |c: &ColumnRef| ColumnRef {
        var: rename(&c.var),
        attr: c.attr.clone(),
    };
    for j in &h.joins {
        let (l, r) = (renamed(&j.left), renamed(&j.right));
        let outer = j.outer.as_ref().and_then(|o| rename(&Some(o.clone())));
        let found = q_joins.iter().any(|qj| {
            qj.outer == outer
                && ((qj.left == l && qj.right == r) || (qj.left == r && qj.right == l))
        });
        if !found {
            return false;
        }
    }
    for (i, t) in h.tables.iter().enumerate() {
        let qt = &q[assignment[i]];
        let Some(relation) = local.relation(qt.relation) else {
            return false;
        };
        let ty = |attr: &str| relation.attribute(attr).map(|a| a.ty);
        let constraints = Constraints::from_conjuncts(qt.var, qt.conjuncts, &ty);
        for s in &t.selection {
            let s = s.map_columns(&mut |c| Expr::Column(renamed(c)));
            if !implied(&s, qt.var, qt.conjuncts, &constraints, &ty) {
                return false;
            }
        }
        if !t.sent_attributes.is_empty() && !projection_contained(t, qt) {
            return false;
        }
    }
    true
}

/// The site's current projection rows, cut down to the recorded attributes,
/// must all have been sent with the recorded fetch.
fn projection_contained(t: &DefinedTable, qt: &Table) -> bool {
    let Some((attrs, Some(rows))) = qt.projection else {
        return false;
    };
    let Some(positions) = t
        .sent_attributes
        .iter()
        .map(|a| attrs.iter().position(|x| x == a))
        .collect::<Option<Vec<usize>>>()
    else {
        return false;
    };
    let sent: BTreeSet<&Vec<Value>> = t.sent.iter().collect();
    rows.iter().all(|row| {
        let cut: Option<Vec<Value>> = positions.iter().map(|p| row.get(*p).cloned()).collect();
        cut.is_some_and(|c| sent.contains(&c))
    })
}

/// What a query's conjuncts say about one attribute.
#[derive(Debug, Clone, Default)]
struct Range {
    /// The attribute is one of these values (`=`, `IN`).
    values: Option<BTreeSet<Value>>,
    /// Lower bound and whether it is inclusive.
    lo: Option<(Value, bool)>,
    /// Upper bound and whether it is inclusive.
    hi: Option<(Value, bool)>,
    /// Values excluded (`<>`, `NOT IN`).
    excluded: BTreeSet<Value>,
    not_null: bool,
    is_null: bool,
}

impl Range {
    fn tighten_lo(&mut self, v: Value, incl: bool) {
        let tighter = match &self.lo {
            None => true,
            Some((cur, ci)) => v > *cur || (v == *cur && *ci && !incl),
        };
        if tighter {
            self.lo = Some((v, incl));
        }
        self.not_null = true;
    }

    fn tighten_hi(&mut self, v: Value, incl: bool) {
        let tighter = match &self.hi {
            None => true,
            Some((cur, ci)) => v < *cur || (v == *cur && *ci && !incl),
        };
        if tighter {
            self.hi = Some((v, incl));
        }
        self.not_null = true;
    }

    fn restrict(&mut self, set: BTreeSet<Value>) {
        let set: BTreeSet<Value> = set.into_iter().filter(|v| !v.is_null()).collect();
        self.values = Some(match self.values.take() {
            None => set,
            Some(cur) => cur.intersection(&set).cloned().collect(),
        });
        self.not_null = true;
    }

    fn admits(&self, v: &Value) -> bool {
        let lo_ok = self
            .lo
            .as_ref()
            .is_none_or(|(l, incl)| v > l || (*incl && v == l));
        let hi_ok = self
            .hi
            .as_ref()
            .is_none_or(|(h, incl)| v < h || (*incl && v == h));
        lo_ok && hi_ok && !self.excluded.contains(v)
    }

    /// No value can satisfy the conjuncts.
    fn empty(&self) -> bool {
        if self.is_null && self.not_null {
            return true;
        }
        if let Some(vals) = &self.values {
            return !vals.iter().any(|v| self.admits(v));
        }
        match (&self.lo, &self.hi) {
            (Some((l, li)), Some((h, hi))) => l > h || (l == h && !(*li && *hi)),
            _ => false,
        }
    }

    /// The finite set of values the attribute can take, if known.
    fn finite(&self) -> Option<Vec<&Value>> {
        self.values
            .as_ref()
            .map(|vals| vals.iter().filter(|v| self.admits(v)).collect())
    }
}

struct Constraints {
    attrs: BTreeMap<String, Range>,
}

/// An atom `attr op constant`, constants coerced to the attribute's type as
/// SQLite's affinity would; `None` for anything else.
enum Atom {
    Cmp(String, BinOp, Value),
    In(String, Vec<Value>, bool),
    Between(String, Value, Value, bool),
    Null(String, bool),
}

fn atom(e: &Expr, var: &str, ty: &dyn Fn(&str) -> Option<ValueType>) -> Option<Atom> {
    let col = |x: &Expr| match x {
        Expr::Column(c) if c.var.as_deref() == Some(var) => Some(c.attr.clone()),
        _ => None,
    };
    let konst = |attr: &str, x: &Expr| match x {
        Expr::Literal(v) => ty(attr)?.coerce_constant(v),
        _ => None,
    };
    match e {
        Expr::Binary { op, left, right } if op.is_comparison() => {
            if let Some(a) = col(left) {
                let v = konst(&a, right)?;
                Some(Atom::Cmp(a, *op, v))
            } else {
                let a = col(right)?;
                let v = konst(&a, left)?;
                Some(Atom::Cmp(a, op.flip(), v))
            }
        }
        Expr::InList {
            expr,
            list,
            negated,
        } => {
            let a = col(expr)?;
            let vals = list
                .iter()
                .map(|x| konst(&a, x))
                .collect::<Option<Vec<_>>>()?;
            Some(Atom::In(a, vals, *negated))
        }
        Expr::Between {
            expr,
            low,
            high,
            negated,
        } => {
            let a = col(expr)?;
            Some(Atom::Between(
                a.clone(),
                konst(&a, low)?,
                konst(&a, high)?,
                *negated,
            ))
        }
        Expr::IsNull { expr, negated } => Some(Atom::Null(col(expr)?, *negated)),
        _ => None,
    }
}

impl Constraints {
    fn from_conjuncts(
        var: &str,
        conjuncts: &[Expr],
        ty: &dyn Fn(&str) -> Option<ValueType>,
    ) -> Constraints {
        let mut attrs: BTreeMap<String, Range> = BTreeMap::new();
        for c in conjuncts {
            let Some(a) = atom(c, var, ty) else { continue };
            match a {
                Atom::Cmp(attr, op, v) => {
                    let r = attrs.entry(attr).or_default();
                    if v.is_null() {
                        // A comparison with NULL is never true.
                        r.restrict(BTreeSet::new());
                        continue;
                    }
                    match op {
                        BinOp::Eq => r.restrict([v].into()),
                        BinOp::NotEq => {
                            r.excluded.insert(v);
                            r.not_null = true;
                        }
                        BinOp::Lt => r.tighten_hi(v, false),
                        BinOp::LtEq => r.tighten_hi(v, true),
                        BinOp::Gt => r.tighten_lo(v, false),
                        _ => r.tighten_lo(v, true),
                    }
                }
                Atom::In(attr, vals, false) => attrs
                    .entry(attr)
                    .or_default()
                    .restrict(vals.into_iter().collect()),
                // NOT IN with a NULL in the list is never true; otherwise it
                // excludes the values.
                Atom::In(attr, vals, true) => {
                    let r = attrs.entry(attr).or_default();
                    if vals.iter().any(Value::is_null) {
                        r.restrict(BTreeSet::new());
                    } else {
                        r.excluded.extend(vals);
                        r.not_null = true;
                    }
                }
                Atom::Between(attr, lo, hi, false) => {
                    let r = attrs.entry(attr).or_default();
                    r.tighten_lo(lo, true);
                    r.tighten_hi(hi, true);
                }
                Atom::Between(..) => {}
                Atom::Null(attr, false) => attrs.entry(attr).or_default().is_null = true,
                Atom::Null(attr, true) => attrs.entry(attr).or_default().not_null = true,
            }
        }
        Constraints { attrs }
    }
}

/// Does the conjunction `conjuncts` (with `constraints` derived from it)
/// imply `d`, for every tuple of variable `var`?
fn implied(
    d: &Expr,
    var: &str,
    conjuncts: &[Expr],
    constraints: &Constraints,
    ty: &dyn Fn(&str) -> Option<ValueType>,
) -> bool {
    if conjuncts.contains(d) || constraints.attrs.values().any(Range::empty) {
        return true;
    }
    if let Expr::Binary {
        op: BinOp::Or,
        left,
        right,
    } = d
    {
        return implied(left, var, conjuncts, constraints, ty)
            || implied(right, var, conjuncts, constraints, ty);
    }
    if let Expr::Binary {
        op: BinOp::And,
        left,
        right,
    } = d
    {
        return implied(left, var, conjuncts, constraints, ty)
            && implied(right, var, conjuncts, constraints, ty);
    }
    // A predicate on one attribute the query pins to finitely many values:
    // evaluate it on each.
    let cols = d.vars();
    let mut attrs: Vec<&str> = Vec::new();
    d.visit_columns(&mut |c| {
        if !attrs.contains(&c.attr.as_str()) {
            attrs.push(&c.attr);
        }
    });
    if let ([Some(v)], [attr]) = (cols.as_slice(), attrs.as_slice())
        && v == var
        && let Some(vals) = constraints.attrs.get(*attr).and_then(Range::finite)
    {
        // Constants in `d` take the attribute's type, as SQLite does.
        let Some(d) = eval::coerce_constants(d, &|c: &ColumnRef| ty(&c.attr)) else {
            return false;
        };
        return vals.iter().all(|value| {
            let row = |_: &ColumnRef| Some((*value).clone());
            eval::holds(&d, &row).unwrap_or(false)
        });
    }
    let Some(a) = atom(d, var, ty) else {
        return false;
    };
    let range_of = |attr: &str| constraints.attrs.get(attr);
    match a {
        Atom::Null(attr, negated) => range_of(&attr).is_some_and(|r| if negated { r.not_null } else { r.is_null }),
        Atom::Cmp(attr, op, v) => {
            let Some(r) = range_of(&attr) else { return false };
            if v.is_null() {
                return false;
            }
            match op {
                BinOp::Gt => r.lo.as_ref().is_some_and(|(l, incl)| *l > v || (*l == v && !*incl)),
                BinOp::GtEq => r.lo.as_ref().is_some_and(|(l, _)| *l >= v),
                BinOp::Lt => r.hi.as_ref().is_some_and(|(h, incl)| *h < v || (*h == v && !*incl)),
                BinOp::LtEq => r.hi.as_ref().is_some_and(|(h, _)| *h <= v),
                BinOp::NotEq => r.excluded.contains(&v) || (r.not_null && !r.admits(&v)),
                _ => matches!((&r.lo, &r.hi), (Some((l, true)), Some((h, true))) if *l == v && *h == v),
            }
        }
        Atom::Between(attr, lo, hi, false) => range_of(&attr).is_some_and(|r| {
            r.lo.as_ref().is_some_and(|(l, _)| *l >= lo) && r.hi.as_ref().is_some_and(|(h, _)| *h <= hi)
        }),
        Atom::In(attr, vals, true) => range_of(&attr).is_some_and(|r| {
            r.not_null && !vals.iter().any(Value::is_null) && vals.iter().all(|v| r.excluded.contains(v) || !r.admits(v))
        }),
        Atom::In(attr, vals, false) => range_of(&attr).is_some_and(|r| {
            matches!((&r.lo, &r.hi), (Some((l, true)), Some((h, true))) if l == h && vals.contains(l))
        }),
        Atom::Between(..) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::Statement;
    use crate::mapping::SiteMapping;
    use crate::rewrite::plan;

    fn site() -> (Catalog, SiteMapping) {
        let local = Catalog::from_ddl(
            "CREATE TABLE patient (pno i4 PRIMARY KEY, name c20, dob i4, age i2, race c4);
             CREATE TABLE visit (vno i4 PRIMARY KEY, pno i4, date c8);",
        )
        .unwrap();
        let global = Catalog::from_ddl(
            "CREATE TABLE patient (pno i4 PRIMARY KEY, name c20, dob i4, age i2);
             CREATE TABLE visit (vno i4 PRIMARY KEY, pno i4, date c8);",
        )
        .unwrap();
        let m = SiteMapping::from_text(
            "patient pno patient pno\npatient name patient name\npatient dob patient dob\npatient age patient age\n\
             visit vno visit vno\nvisit pno visit pno\nvisit date visit date",
            "",
            &local,
            &global,
        )
        .unwrap();
        (local, m)
    }

    fn planned(sql: &str) -> Plan {
        let (local, m) = site();
        let Statement::Select(s) = crate::parse(sql).unwrap().1.remove(0) else {
            panic!()
        };
        plan(&s, &local, &m).unwrap()
    }

    fn definition(sql: &str) -> SnapshotDefinition {
        SnapshotDefinition::from_plan(&planned(sql), &BTreeMap::new())
    }

    #[test]
    fn a_group_pins_its_key_only_by_equality_with_a_constant_on_one_table() {
        let key = ["pno".to_string()];
        let pinned = |sql: &str, group: usize| key_pinned(&planned(sql), group, &key);
        assert_eq!(
            pinned("SELECT name FROM patient WHERE pno = 7", 0),
            Some(vec![Value::Int(7)])
        );
        assert_eq!(
            pinned(
                "SELECT name FROM patient p WHERE 7 = p.pno AND p.name = 'Jones'",
                0
            ),
            Some(vec![Value::Int(7)])
        );
        for sql in [
            "SELECT name FROM patient WHERE name = 'Jones'",
            "SELECT name FROM patient WHERE pno = 7 OR pno = 8",
            "SELECT name FROM patient WHERE pno >= 7",
            "SELECT name FROM patient WHERE pno = dob",
            "SELECT name FROM patient WHERE pno = NULL",
            // A join group may fetch partners of the key's tuple.
            "SELECT p.name, v.date FROM patient p, visit v WHERE p.pno = v.pno AND p.pno = 7",
        ] {
            assert_eq!(pinned(sql, 0), None, "{sql}");
        }
        // Each group on its own: the unjoined patient group is pinned, the
        // visit group (keyed by vno) is not.
        let sql = "SELECT p.name, v.date FROM patient p, visit v WHERE p.pno = 7 AND v.pno = 7";
        let q = planned(sql);
        let groups = &q.query.as_ref().unwrap().groups;
        assert_eq!(groups.len(), 2);
        for (i, g) in groups.iter().enumerate() {
            let (relation_key, expected) = match g.tables[0].local_relation.as_str() {
                "patient" => ("pno", Some(vec![Value::Int(7)])),
                _ => ("vno", None),
            };
            assert_eq!(key_pinned(&q, i, &[relation_key.to_string()]), expected);
        }
    }

    /// Coverage with nothing new or modified at the site.
    fn covered_by(query: &str, snapshot: &str) -> bool {
        let (local, _) = site();
        let defs = [(SnapshotNo(1), definition(snapshot))];
        let q = planned(query);
        let nothing_changed = q
            .semijoins
            .iter()
            .map(|s| (s.local_var.clone(), Vec::new()))
            .collect();
        performed(&q, &nothing_changed, &local, &defs).covered()
    }

    #[test]
    fn the_thesis_examples() {
        let p = "SELECT * FROM patient WHERE";
        assert!(covered_by(
            &format!("{p} name = 'Jones' AND dob = 19340512"),
            &format!("{p} name = 'Jones'")
        ));
        assert!(!covered_by(
            &format!("{p} name = 'Jones'"),
            &format!("{p} name = 'Jones' AND dob = 19340512")
        ));
        assert!(covered_by(
            &format!("{p} age >= 60"),
            &format!("{p} age >= 50")
        ));
        assert!(!covered_by(
            &format!("{p} age >= 50"),
            &format!("{p} age >= 60")
        ));
        assert!(covered_by(
            "retrieve (patient.pno) where patient.name = \"Jones\"",
            "SELECT * FROM patient WHERE name = 'Jones'"
        ));
    }

    #[test]
    fn implication_over_each_operator() {
        let p = "SELECT * FROM patient WHERE";
        let yes = [
            ("age > 61", "age >= 60"),
            ("age BETWEEN 61 AND 70", "age > 60 AND age <= 70"),
            ("age IN (61, 65)", "age BETWEEN 60 AND 70"),
            ("age = 65", "age IN (1, 65)"),
            ("name = 'MacIntosh'", "name LIKE 'mac%'"),
            ("age >= 61 AND age <= 61", "age = 61"),
            ("age > 3", "age IS NOT NULL"),
            ("age IS NULL", "age IS NULL"),
            ("age > 70", "age <> 65"),
            ("age = 1 AND age = 2", "name = 'anything'"),
            ("age = '65'", "age > 64"),
            ("name = 'Jones'", "name = 'Jones' OR age = 3"),
            ("name = 'Jones' AND race = 'x'", "name = 'Jones'"),
        ];
        for (q, s) in yes {
            assert!(
                covered_by(&format!("{p} {q}"), &format!("{p} {s}")),
                "{q} should imply {s}"
            );
        }
        let no = [
            ("age >= 60", "age > 60"),
            ("age = '2'", "age > 3"),
            ("age <> 65", "age > 70"),
            ("name LIKE 'mac%'", "name = 'MacIntosh'"),
            ("age IN (61, NULL)", "age IS NULL"),
            ("age > 3 OR age < 1", "age > 3"),
            ("upper(name) = 'X'", "name = 'X'"),
            // Regression: constants in the snapshot take the attribute's type.
            ("pno = 1000042", "NOT pno = '1000042'"),
            ("name = '5'", "name <> 5"),
        ];
        for (q, s) in no {
            assert!(
                !covered_by(&format!("{p} {q}"), &format!("{p} {s}")),
                "{q} must not imply {s}"
            );
        }
    }

    #[test]
    fn dropped_selections_do_not_restrict_the_recorded_fetch() {
        // race is not mapped: the snapshot fetched every Jones.
        assert!(covered_by(
            "SELECT * FROM patient WHERE name = 'Jones'",
            "SELECT * FROM patient WHERE name = 'Jones' AND race = 'x'"
        ));
    }

    #[test]
    fn joins_need_the_same_relations_and_recorded_joins() {
        let snap = "SELECT v.* FROM patient p, visit v WHERE p.pno = v.pno AND p.name = 'Smith'";
        assert!(covered_by(
            "SELECT visit.* FROM visit, patient WHERE patient.name = 'Smith' AND visit.pno = patient.pno AND visit.date = 'x'",
            snap
        ));
        assert!(!covered_by(
            "SELECT * FROM patient WHERE name = 'Smith'",
            snap
        ));
        assert!(!covered_by(
            "SELECT * FROM patient p, visit v WHERE p.name = 'Smith' AND p.pno = v.vno",
            snap
        ));
        // Separate groups are covered separately.
        assert!(covered_by(
            "SELECT * FROM patient, visit WHERE patient.name = 'Smith' AND visit.date = 'x'",
            "SELECT * FROM patient p, visit v WHERE p.name = 'Smith' AND v.date = 'x'"
        ));
    }

    #[test]
    fn a_local_change_since_the_snapshot_uncovers_a_join() {
        let (local, _) = site();
        let snap_sql = "SELECT * FROM patient p, visit v WHERE p.pno = v.pno AND p.name = 'Smith'";
        let sent: BTreeMap<String, Vec<Vec<Value>>> = [
            ("p".to_string(), vec![vec![Value::Int(5)]]),
            ("v".to_string(), vec![]),
        ]
        .into();
        let defs = [(
            SnapshotNo(3),
            SnapshotDefinition::from_plan(&planned(snap_sql), &sent),
        )];
        let q = planned(snap_sql);
        let now_same = sent.clone();
        assert_eq!(
            performed(&q, &now_same, &local, &defs).groups,
            vec![Some(SnapshotNo(3))]
        );
        // A visit for patient 9 was added here since: its patient may be elsewhere.
        let mut now = sent.clone();
        now.insert("v".into(), vec![vec![Value::Int(9)]]);
        assert!(!performed(&q, &now, &local, &defs).covered());
        // Unknown current projections are never assumed empty.
        assert!(!performed(&q, &BTreeMap::new(), &local, &defs).covered());
    }

    mod soundness {
        use super::*;
        use proptest::prelude::*;

        /// A random atom over patient's `age` (i2), `dob` (i4) and `name` (c20)
        /// with constants from small domains, so implications are often true.
        fn atom() -> impl Strategy<Value = String> {
            let num = || -3i64..6;
            let attr = prop_oneof![Just("age"), Just("dob")];
            let name = prop_oneof![Just("'a'"), Just("'b'"), Just("'ab'"), Just("'B'")];
            prop_oneof![
                (
                    attr.clone(),
                    prop_oneof![
                        Just("="),
                        Just("<>"),
                        Just("<"),
                        Just("<="),
                        Just(">"),
                        Just(">=")
                    ],
                    num()
                )
                    .prop_map(|(a, op, v)| format!("{a} {op} {v}")),
                (attr.clone(), num(), num())
                    .prop_map(|(a, l, h)| format!("{a} BETWEEN {l} AND {h}")),
                (
                    attr.clone(),
                    proptest::collection::vec(num(), 1..4),
                    any::<bool>()
                )
                    .prop_map(|(a, vs, neg)| {
                        let list: Vec<String> = vs.iter().map(|v| v.to_string()).collect();
                        format!(
                            "{a} {}IN ({})",
                            if neg { "NOT " } else { "" },
                            list.join(", ")
                        )
                    }),
                (attr.clone(), any::<bool>())
                    .prop_map(|(a, n)| format!("{a} IS {}NULL", if n { "NOT " } else { "" })),
                (prop_oneof![Just("="), Just("<"), Just(">=")], name.clone())
                    .prop_map(|(op, v)| format!("name {op} {v}")),
                name.clone().prop_map(|v| format!("name LIKE {v}")),
                (num(), attr.clone()).prop_map(|(v, a)| format!("{v} < {a}")),
                (atom_pair()).prop_map(|(x, y)| format!("({x} OR {y})")),
            ]
        }

        fn atom_pair() -> impl Strategy<Value = (String, String)> {
            let simple = (prop_oneof![Just("age"), Just("dob")], -3i64..6)
                .prop_map(|(a, v)| format!("{a} = {v}"));
            (simple.clone(), simple)
        }

        fn value(domain: &[Value]) -> impl Strategy<Value = Value> + use<> {
            proptest::sample::select(domain.to_vec())
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]
            /// Whenever a query is judged covered by a snapshot, every tuple
            /// satisfying the query satisfies the snapshot's selection.
            #[test]
            fn subsumption_is_sound(
                q in proptest::collection::vec(atom(), 1..4),
                d in proptest::collection::vec(atom(), 1..3),
                tuples in proptest::collection::vec(
                    (value(&[Value::Null, Value::Int(-3), Value::Int(0), Value::Int(1), Value::Int(2), Value::Int(3), Value::Int(5), Value::Int(6)]),
                     value(&[Value::Null, Value::Int(-1), Value::Int(1), Value::Int(4), Value::Int(5)]),
                     value(&[Value::Null, Value::text("a"), Value::text("ab"), Value::text("B"), Value::text("b")])),
                    64),
            ) {
                let query = format!("SELECT * FROM patient WHERE {}", q.join(" AND "));
                let snapshot = format!("SELECT * FROM patient WHERE {}", d.join(" AND "));
                if covered_by(&query, &snapshot) {
                    let qp = planned(&query);
                    let dp = planned(&snapshot);
                    let qsel = Expr::conjunction(qp.decomposition.selections["patient"].clone()).unwrap();
                    let dsel = Expr::conjunction(dp.decomposition.selections["patient"].clone()).unwrap();
                    for (age, dob, name) in &tuples {
                        let row = |c: &ColumnRef| Some(match c.attr.as_str() {
                            "age" => age.clone(),
                            "dob" => dob.clone(),
                            "name" => name.clone(),
                            _ => Value::Null,
                        });
                        if eval::holds(&qsel, &row).unwrap() {
                            prop_assert!(eval::holds(&dsel, &row).unwrap(),
                                "{query} judged covered by {snapshot}, but ({age}, {dob}, {name}) breaks it");
                        }
                    }
                }
            }
        }
    }
}
