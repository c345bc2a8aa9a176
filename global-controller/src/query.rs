//! Requests decoded from the wire and checked against the global catalog.
//!
//! After decoding, every relation and attribute exists, every function is
//! one the controller evaluates, every constant compared with an attribute
//! has the attribute's kind of type, and every column reference names a part
//! by a controller-made alias (`t<table>p<part>`), so nothing the site chose
//! as a name ever reaches SQL.

use std::collections::BTreeMap;

use snaps_mapping::ir::{ColumnRef, Expr};
use snaps_mapping::rewrite::GLOBAL_FUNCTIONS;
use snaps_proto::{decode_expr, decode_rows, v1};
use snaps_schema::{Catalog, Relation, Value, ValueType};

use crate::error::{Error, Result};

fn invalid(m: impl Into<String>) -> Error {
    Error::InvalidArgument(m.into())
}

/// One global relation of a shape and the attributes the site maps from it.
#[derive(Debug, Clone, PartialEq)]
pub struct PartShape {
    /// The global relation.
    pub relation: String,
    /// Its attributes the site maps, in the order values travel.
    pub columns: Vec<String>,
}

/// How the parts of a shape reassemble one local tuple.
#[derive(Debug, Clone, PartialEq)]
pub enum Split {
    /// One part.
    None,
    /// Unique-key split: per key attribute, its name in each part.
    Key(Vec<Vec<String>>),
    /// Non-unique-key split: the index of the main part; the others point at
    /// it through `main_tuple_id`.
    Main(usize),
}

/// A site's local relation as it lies in the global snapshot.
#[derive(Debug, Clone, PartialEq)]
pub struct Shape {
    /// The parts.
    pub parts: Vec<PartShape>,
    /// How they reassemble.
    pub split: Split,
}

impl Shape {
    /// Decodes and checks a shape; returns it with the site's variable name
    /// of each part.
    pub fn decode(s: &v1::Shape, catalog: &Catalog) -> Result<(Shape, Vec<String>)> {
        if s.parts.is_empty() {
            return Err(invalid("a table has no parts"));
        }
        let mut parts = Vec::new();
        let mut vars = Vec::new();
        for p in &s.parts {
            let rel = relation(catalog, &p.relation)?;
            let columns: Vec<String> = match (p.columns.is_empty(), p.attributes.is_empty()) {
                (_, true) => p.columns.clone(),
                (true, false) => p
                    .attributes
                    .iter()
                    .map(|&i| {
                        rel.attributes
                            .get(i as usize)
                            .map(|a| a.name.clone())
                            .ok_or_else(|| {
                                invalid(format!(
                                    "{} has no attribute at position {i} (it has {})",
                                    rel.name,
                                    rel.attributes.len()
                                ))
                            })
                    })
                    .collect::<Result<_>>()?,
                (false, false) => {
                    return Err(invalid(format!(
                        "a part of {} gives its attributes both by name and by position",
                        rel.name
                    )));
                }
            };
            for (i, c) in columns.iter().enumerate() {
                attribute(rel, c)?;
                if columns[..i].contains(c) {
                    return Err(invalid(format!("{}.{c} is given twice", rel.name)));
                }
            }
            parts.push(PartShape {
                relation: rel.name.clone(),
                columns,
            });
            vars.push(p.var.clone());
        }
        let split = match &s.split {
            None if parts.len() == 1 => Split::None,
            None => {
                return Err(invalid(
                    "a table of several parts does not say how they join",
                ));
            }
            Some(_) if parts.len() == 1 => {
                return Err(invalid("a table of one part cannot be split"));
            }
            Some(v1::shape::Split::MainPart(m)) => {
                let m = *m as usize;
                if m >= parts.len() {
                    return Err(invalid(format!("main part {m} does not exist")));
                }
                Split::Main(m)
            }
            Some(v1::shape::Split::Key(k)) => {
                if k.keys.is_empty() {
                    return Err(invalid("a key split names no key attributes"));
                }
                let mut keys = Vec::new();
                for key in &k.keys {
                    if key.names.len() != parts.len() {
                        return Err(invalid(format!(
                            "a key attribute is named in {} parts of {}",
                            key.names.len(),
                            parts.len()
                        )));
                    }
                    for (p, name) in parts.iter().zip(&key.names) {
                        attribute(relation(catalog, &p.relation)?, name)?;
                    }
                    keys.push(key.names.clone());
                }
                Split::Key(keys)
            }
        };
        Ok((Shape { parts, split }, vars))
    }

    /// The index of the part that must be there for every tuple (the main
    /// part of a main-tuple-id split; the first otherwise).
    pub fn main(&self) -> usize {
        match self.split {
            Split::Main(m) => m,
            _ => 0,
        }
    }
}

/// A mapped range variable of a fetch.
#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    /// Its parts.
    pub shape: Shape,
    /// Conjuncts over the table's aliases.
    pub selection: Vec<Expr>,
    /// The null-supplying side of a `LEFT JOIN`.
    pub outer: bool,
}

/// `left = right` between two tables of a group.
#[derive(Debug, Clone, PartialEq)]
pub struct Join {
    /// Left side.
    pub left: Expr,
    /// Right side.
    pub right: Expr,
    /// For a `LEFT JOIN`, the null-supplying table.
    pub outer_table: Option<usize>,
}

/// Tables evaluated together.
#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    /// The tables.
    pub tables: Vec<Table>,
    /// Join clauses between them.
    pub joins: Vec<Join>,
}

/// Temporary tuples of one table: the site's new or modified tuples' join
/// attributes.
#[derive(Debug, Clone, PartialEq)]
pub struct SemiJoin {
    /// The group.
    pub group: usize,
    /// The table in the group.
    pub table: usize,
    /// Per column: the part and the global attribute it gives.
    pub columns: Vec<(usize, String)>,
    /// The rows.
    pub rows: Vec<Vec<Value>>,
}

/// A checked fetch.
#[derive(Debug, Clone, PartialEq)]
pub struct FetchQuery {
    /// The join groups.
    pub groups: Vec<Group>,
    /// The semi-join projections.
    pub semijoins: Vec<SemiJoin>,
    /// Return tuples the site holds too.
    pub include_held: bool,
    /// Only combinations with a tuple the change log records as new or
    /// changed after this epoch (the nightly delta of standing groups): a
    /// combination of tuples none of which changed was selected, and so
    /// sent, before.
    pub changed_after: Option<u64>,
}

/// The alias of part `p` of table `t` in compiled SQL.
pub fn alias(t: usize, p: usize) -> String {
    format!("t{t}p{p}")
}

fn relation<'a>(catalog: &'a Catalog, name: &str) -> Result<&'a Relation> {
    catalog
        .relation(name)
        .ok_or_else(|| invalid(format!("unknown global relation {name:?}")))
}

fn attribute<'a>(rel: &'a Relation, name: &str) -> Result<&'a snaps_schema::Attribute> {
    rel.attribute(name).ok_or_else(|| {
        invalid(format!(
            "global relation {} has no attribute {name:?}",
            rel.name
        ))
    })
}

/// Where the site's variables point: var → (alias, relation).
type Scope<'a> = BTreeMap<String, (String, &'a Relation)>;

impl FetchQuery {
    /// Decodes and checks a fetch request.
    pub fn decode(req: &v1::FetchRequest, catalog: &Catalog) -> Result<FetchQuery> {
        let mut groups = Vec::new();
        for g in &req.groups {
            if g.tables.is_empty() {
                return Err(invalid("a join group has no tables"));
            }
            let mut scope: Scope = BTreeMap::new();
            let mut table_of: BTreeMap<String, usize> = BTreeMap::new();
            let mut tables = Vec::new();
            for (ti, t) in g.tables.iter().enumerate() {
                let shape = t
                    .shape
                    .as_ref()
                    .ok_or_else(|| invalid("a table has no shape"))?;
                let (shape, vars) = Shape::decode(shape, catalog)?;
                for (pi, v) in vars.iter().enumerate() {
                    let rel = relation(catalog, &shape.parts[pi].relation)?;
                    if scope.insert(v.clone(), (alias(ti, pi), rel)).is_some() {
                        return Err(invalid(format!("variable {v:?} is used twice")));
                    }
                    table_of.insert(v.clone(), ti);
                }
                let own: Scope = vars
                    .iter()
                    .filter_map(|v| scope.get(v).map(|x| (v.clone(), x.clone())))
                    .collect();
                let selection = t
                    .selection
                    .iter()
                    .map(|e| check_expr(&decode_expr(e)?, &own))
                    .collect::<Result<Vec<_>>>()?;
                tables.push(Table {
                    shape,
                    selection,
                    outer: t.outer,
                });
            }
            let mut joins = Vec::new();
            for j in &g.joins {
                let side = |e: &Option<v1::Expr>| -> Result<(Expr, usize)> {
                    let e = decode_expr(e.as_ref().ok_or_else(|| invalid("a join has no side"))?)?;
                    let mut seen = Vec::new();
                    e.visit_columns(&mut |c| {
                        if let Some(t) = c.var.as_ref().and_then(|v| table_of.get(v)) {
                            seen.push(*t);
                        }
                    });
                    let t = *seen
                        .first()
                        .ok_or_else(|| invalid("a join side names no attribute"))?;
                    if seen.iter().any(|x| *x != t) {
                        return Err(invalid("a join side spans two tables"));
                    }
                    Ok((check_expr(&e, &scope)?, t))
                };
                let (left, lt) = side(&j.left)?;
                let (right, rt) = side(&j.right)?;
                if lt == rt {
                    return Err(invalid("a join clause joins a table with itself"));
                }
                let outer_table = match j.outer_table {
                    Some(o) if o as usize == lt || o as usize == rt => Some(o as usize),
                    Some(o) => {
                        return Err(invalid(format!(
                            "outer table {o} is not a side of its join"
                        )));
                    }
                    None => None,
                };
                joins.push(Join {
                    left,
                    right,
                    outer_table,
                });
            }
            if tables[0].outer {
                return Err(invalid(
                    "the first table of a group cannot be the null-supplying side of a LEFT JOIN",
                ));
            }
            for (ti, t) in tables.iter().enumerate() {
                let has_on = joins.iter().any(|j| j.outer_table == Some(ti));
                if t.outer && !has_on {
                    return Err(invalid(format!("outer table {ti} has no join clause")));
                }
            }
            groups.push(Group { tables, joins });
        }
        let mut semijoins: Vec<SemiJoin> = Vec::new();
        for s in &req.semijoins {
            let (gi, ti) = (s.group as usize, s.table as usize);
            let table = groups
                .get(gi)
                .and_then(|g| g.tables.get(ti))
                .ok_or_else(|| {
                    invalid(format!(
                        "semi-join for table {ti} of group {gi}, which does not exist"
                    ))
                })?;
            if semijoins.iter().any(|x| x.group == gi && x.table == ti) {
                return Err(invalid(format!(
                    "two semi-joins for table {ti} of group {gi}"
                )));
            }
            let vars: Vec<&String> = req.groups[gi].tables[ti]
                .shape
                .iter()
                .flat_map(|s| s.parts.iter().map(|p| &p.var))
                .collect();
            let mut columns = Vec::new();
            let mut types = Vec::new();
            for c in &s.columns {
                let p = vars.iter().position(|v| **v == c.var).ok_or_else(|| {
                    invalid(format!("semi-join column of unknown variable {:?}", c.var))
                })?;
                let rel = relation(catalog, &table.shape.parts[p].relation)?;
                let a = attribute(rel, &c.attr)?;
                types.push((a.ty, format!("{}.{}", rel.name, a.name)));
                columns.push((p, c.attr.clone()));
            }
            if columns.is_empty() {
                return Err(invalid(format!(
                    "the semi-join for table {ti} of group {gi} gives no columns"
                )));
            }
            let rows = s
                .rows
                .as_ref()
                .map_or(Ok(Vec::new()), |r| decode_rows(columns.len(), r))?;
            let rows = rows
                .into_iter()
                .map(|row| {
                    row.into_iter()
                        .zip(&types)
                        .map(|(v, (ty, what))| ty.check(v, what).map_err(Error::from))
                        .collect::<Result<Vec<_>>>()
                })
                .collect::<Result<Vec<_>>>()?;
            semijoins.push(SemiJoin {
                group: gi,
                table: ti,
                columns,
                rows,
            });
        }
        Ok(FetchQuery {
            groups,
            semijoins,
            include_held: req.include_held,
            changed_after: None,
        })
    }
}

/// Whether a constant can be compared with an attribute of type `ty`
/// without SQLite silently comparing across storage classes.
fn fits(ty: ValueType, v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Int(_) | Value::Float(_) => ty.is_numeric(),
        Value::Text(_) => !ty.is_numeric(),
    }
}

/// Checks names, functions and constants of an expression and renames its
/// variables to the controller's aliases.
fn check_expr(e: &Expr, scope: &Scope) -> Result<Expr> {
    let mut err: Option<Error> = None;
    e.walk(&mut |x| {
        if err.is_some() {
            return;
        }
        match x {
            Expr::Function { name, .. } if !GLOBAL_FUNCTIONS.contains(&name.as_str()) => {
                err = Some(invalid(format!(
                    "function {name} is not evaluated by the global controller"
                )));
            }
            Expr::Binary { op, left, right } if op.is_comparison() => {
                if let (Expr::Column(c), Expr::Literal(v)) | (Expr::Literal(v), Expr::Column(c)) =
                    (left.as_ref(), right.as_ref())
                {
                    err = literal_fits(c, v, scope).err();
                }
            }
            Expr::InList { expr, list, .. } => {
                if let Expr::Column(c) = expr.as_ref() {
                    for v in list {
                        if let Expr::Literal(v) = v {
                            err = err.take().or(literal_fits(c, v, scope).err());
                        }
                    }
                }
            }
            Expr::Between {
                expr, low, high, ..
            } => {
                if let Expr::Column(c) = expr.as_ref() {
                    for v in [low, high] {
                        if let Expr::Literal(v) = v.as_ref() {
                            err = err.take().or(literal_fits(c, v, scope).err());
                        }
                    }
                }
            }
            _ => {}
        }
    });
    if let Some(e) = err {
        return Err(e);
    }
    let out = e.map_columns(&mut |c| match resolve(c, scope) {
        Ok((alias, _)) => Expr::Column(ColumnRef::new(&alias, &c.attr)),
        Err(e) => {
            err.get_or_insert(e);
            Expr::Column(c.clone())
        }
    });
    err.map_or(Ok(out), Err)
}

fn resolve<'a>(c: &ColumnRef, scope: &'a Scope) -> Result<(String, &'a Relation)> {
    let var = c.var.as_deref().unwrap_or_default();
    let (alias, rel) = scope
        .get(var)
        .ok_or_else(|| invalid(format!("unknown variable {var:?}")))?;
    attribute(rel, &c.attr)?;
    Ok((alias.clone(), rel))
}

fn literal_fits(c: &ColumnRef, v: &Value, scope: &Scope) -> Result<()> {
    let (_, rel) = resolve(c, scope)?;
    let a = attribute(rel, &c.attr)?;
    if fits(a.ty, v) {
        Ok(())
    } else {
        Err(invalid(format!(
            "constant {v} does not fit {}.{} ({})",
            rel.name, a.name, a.ty
        )))
    }
}
