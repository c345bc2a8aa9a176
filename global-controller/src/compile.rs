//! Compiling a checked fetch into parameterised SQL over the global store.
//!
//! A join group becomes one `SELECT DISTINCT` of the tuple id, owner and
//! sent-to bitmap of every part of every table. A table with temporary
//! tuples (a semi-join projection) is evaluated twice: once as the global
//! relation and once as the temporary tuples, so a group with *k* such
//! tables is 2^k plain joins — each of which SQLite plans with the
//! relations' indexes — rather than one join over `UNION ALL` subqueries,
//! which SQLite would have to materialise whole.

use snaps_mapping::ir::{ColumnRef, Expr};
use snaps_schema::{Value, sql_ident};

use crate::db::Dialect;
use crate::query::{Group, SemiJoin, Split, Table, alias};

/// Columns of the global store that are not attributes of the global schema.
pub const STATUS_COLUMNS: &[&str] = &[
    "tuple_id",
    "main_tuple_id",
    "snaps_owner",
    "snaps_origin",
    "snaps_rights",
    "snaps_lock_site",
    "snaps_sent_to",
    "snaps_user",
];

/// The name of the temporary table holding table `t`'s projection.
pub fn temp_table(t: usize) -> String {
    format!("snaps_sj_t{t}")
}

/// One compiled evaluation of a group.
#[derive(Debug)]
pub struct Compiled {
    /// The SQL.
    pub sql: String,
    /// Its parameters, in order.
    pub params: Vec<Value>,
    /// The tables read from the global snapshot, in the order their
    /// `(tuple_id, snaps_owner, snaps_sent_to)` triples appear, with their
    /// number of parts.
    pub tables: Vec<(usize, usize)>,
}

/// Compiles group `g`, reading the tables in `temps` from their temporary
/// tables (with the projection's columns) instead of the global snapshot.
/// With `changed` = `(t, e)`, only combinations whose table `t` has a part
/// tuple the change log records as new or changed after epoch `e`: one
/// term of a delta rule (Δvisit ⋈ patient ∪ visit ⋈ Δpatient). The SQL is
/// in `dialect`, with SQLite's meaning of every operation.
pub fn compile_group(
    g: &Group,
    temps: &[(usize, &SemiJoin)],
    changed: Option<(usize, u64)>,
    dialect: Dialect,
) -> Compiled {
    let temp_of = |t: usize| temps.iter().find(|(x, _)| *x == t).map(|(_, s)| *s);
    let column = |c: &ColumnRef| -> String {
        let var = c.var.as_deref().unwrap_or_default();
        for (ti, t) in g.tables.iter().enumerate() {
            for pi in 0..t.shape.parts.len() {
                if alias(ti, pi) != var {
                    continue;
                }
                return match temp_of(ti) {
                    None => format!("{var}.{}", sql_ident(&c.attr)),
                    Some(sj) => match sj
                        .columns
                        .iter()
                        .position(|(p, a)| *p == pi && *a == c.attr)
                    {
                        Some(n) => format!("t{ti}.c{n}"),
                        None => "NULL".into(),
                    },
                };
            }
        }
        "NULL".into()
    };
    let mut params = Vec::new();
    let mut selects = Vec::new();
    let mut tables = Vec::new();
    for (ti, t) in g.tables.iter().enumerate() {
        if temp_of(ti).is_some() {
            continue;
        }
        for pi in 0..t.shape.parts.len() {
            let a = alias(ti, pi);
            selects.push(format!("{a}.tuple_id, {a}.snaps_owner, {a}.snaps_sent_to"));
        }
        tables.push((ti, t.shape.parts.len()));
    }
    let mut from = String::new();
    let mut wheres: Vec<String> = Vec::new();
    for (ti, t) in g.tables.iter().enumerate() {
        let item = match temp_of(ti) {
            Some(_) => format!("{} AS t{ti}", dialect.temp(&temp_table(ti))),
            None => reassembled(ti, t),
        };
        let selection: Vec<String> = if temp_of(ti).is_some() {
            Vec::new()
        } else {
            t.selection
                .iter()
                .map(|e| sql(e, &mut params, &column, dialect))
                .collect()
        };
        if t.outer && temp_of(ti).is_some() {
            // Temporary tuples of a null-supplying table stand for new tuples
            // whose partner on the preserved side may be the site's own:
            // they reach their other partners whatever they match here.
            from.push_str(&format!(" LEFT JOIN {item} ON TRUE"));
        } else if t.outer {
            let mut on: Vec<String> = g
                .joins
                .iter()
                .filter(|j| j.outer_table == Some(ti))
                .map(|j| {
                    format!(
                        "{} = {}",
                        sql(&j.left, &mut params, &column, dialect),
                        sql(&j.right, &mut params, &column, dialect)
                    )
                })
                .collect();
            on.extend(selection);
            from.push_str(&format!(" LEFT JOIN {item} ON {}", on.join(" AND ")));
        } else {
            if ti > 0 {
                // The join's conditions are in WHERE. SQLite's own CROSS JOIN
                // would fix its join order; PostgreSQL's JOIN needs an ON.
                from.push_str(match dialect {
                    Dialect::Sqlite => " JOIN ",
                    Dialect::Postgres => " CROSS JOIN ",
                });
            }
            from.push_str(&item);
            wheres.extend(selection);
        }
    }
    for j in g.joins.iter().filter(|j| j.outer_table.is_none()) {
        let l = sql(&j.left, &mut params, &column, dialect);
        let r = sql(&j.right, &mut params, &column, dialect);
        wheres.push(format!("{l} = {r}"));
    }
    if let Some((ti, epoch)) = changed {
        let any: Vec<String> = g.tables[ti]
            .shape
            .parts
            .iter()
            .enumerate()
            .map(|(pi, p)| {
                params.push(Value::Text(p.relation.clone()));
                let rel = params.len();
                params.push(Value::Int(epoch as i64));
                format!(
                    "{}.tuple_id IN (SELECT tuple_id FROM snaps_changes \
                     WHERE relation = ?{rel} AND epoch > ?{} AND removed = 0)",
                    alias(ti, pi),
                    params.len()
                )
            })
            .collect();
        wheres.push(format!("({})", any.join(" OR ")));
    }
    let mut text = format!("SELECT DISTINCT {} FROM {from}", selects.join(", "));
    if !wheres.is_empty() {
        text.push_str(" WHERE ");
        text.push_str(&wheres.join(" AND "));
    }
    Compiled {
        sql: text,
        params,
        tables,
    }
}

/// The FROM item of a table read from the global snapshot.
fn reassembled(ti: usize, t: &Table) -> String {
    let item = |pi: usize| {
        format!(
            "{} AS {}",
            sql_ident(&t.shape.parts[pi].relation),
            alias(ti, pi)
        )
    };
    match &t.shape.split {
        Split::None => item(0),
        Split::Key(keys) => {
            let mut s = item(0);
            for pi in 1..t.shape.parts.len() {
                let on: Vec<String> = keys
                    .iter()
                    .map(|names| {
                        format!(
                            "{}.{} = {}.{}",
                            alias(ti, 0),
                            sql_ident(&names[0]),
                            alias(ti, pi),
                            sql_ident(&names[pi])
                        )
                    })
                    .collect();
                s.push_str(&format!(" FULL JOIN {} ON {}", item(pi), on.join(" AND ")));
            }
            format!("({s})")
        }
        Split::Main(m) => {
            let mut s = item(*m);
            for pi in (0..t.shape.parts.len()).filter(|p| p != m) {
                s.push_str(&format!(
                    " LEFT JOIN {} ON {}.tuple_id = {}.main_tuple_id",
                    item(pi),
                    alias(ti, *m),
                    alias(ti, pi)
                ));
            }
            format!("({s})")
        }
    }
}

/// An expression as SQL: every constant a parameter, every operation in
/// parentheses.
pub fn sql(
    e: &Expr,
    params: &mut Vec<Value>,
    column: &dyn Fn(&ColumnRef) -> String,
    dialect: Dialect,
) -> String {
    let mut s = |e: &Expr| sql(e, params, column, dialect);
    let not = |negated: bool| if negated { "NOT " } else { "" };
    match e {
        Expr::Column(c) => column(c),
        Expr::Literal(Value::Null) => "NULL".into(),
        Expr::Literal(v) => {
            // Numbered, so the order clauses are compiled in does not matter.
            params.push(v.clone());
            format!("?{}", params.len())
        }
        Expr::Binary { op, left, right } => {
            let (l, r) = (s(left), s(right));
            match op.symbol() {
                sym @ ("/" | "%") => dialect.divide(&l, sym, &r),
                sym => format!("({l} {sym} {r})"),
            }
        }
        Expr::Not(x) => format!("(NOT {})", s(x)),
        Expr::Neg(x) => format!("(- {})", s(x)),
        Expr::IsNull { expr, negated } => format!("({} IS {}NULL)", s(expr), not(*negated)),
        Expr::InList {
            expr,
            list,
            negated,
        } => {
            let x = s(expr);
            let items: Vec<String> = list.iter().map(&mut s).collect();
            format!("({x} {}IN ({}))", not(*negated), items.join(", "))
        }
        Expr::Between {
            expr,
            low,
            high,
            negated,
        } => {
            let (x, lo, hi) = (s(expr), s(low), s(high));
            format!("({x} {}BETWEEN {lo} AND {hi})", not(*negated))
        }
        Expr::Like {
            expr,
            pattern,
            negated,
        } => {
            let (x, p) = (s(expr), s(pattern));
            dialect.like(&x, &p, *negated)
        }
        Expr::Function { name, args, .. } => {
            let args: Vec<String> = args.iter().map(&mut s).collect();
            dialect.function(name, &args)
        }
    }
}
