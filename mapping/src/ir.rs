//! The query IR both front ends produce. It follows QUEL's model — range
//! variables over relations, a target list, one qualification — because that is
//! the model the thesis' algorithms are written in; SQL's FROM list becomes the
//! range variables (a table without an alias is its own variable, as in QUEL).
//!
//! Semantics are SQLite's: the statement runs at a site on SQLite, so whatever
//! evaluates a part of it elsewhere must agree with SQLite (three-valued logic,
//! `LIKE` case-insensitive for ASCII, numbers below text).

use std::fmt;

use serde::{Deserialize, Serialize};
use snaps_schema::Value;

/// Which language a statement was written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Language {
    /// SQL, as the PostgreSQL wire protocol carries it.
    Sql,
    /// QUEL, as the thesis wrote its queries.
    Quel,
}

/// An attribute reached through a range variable: `p.name`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ColumnRef {
    /// The range variable; `None` until resolution when SQL left it out.
    pub var: Option<String>,
    /// The attribute name, lower case.
    pub attr: String,
}

impl ColumnRef {
    /// A qualified reference `var.attr`.
    pub fn new(var: &str, attr: &str) -> ColumnRef {
        ColumnRef {
            var: Some(var.to_string()),
            attr: attr.to_string(),
        }
    }
}

/// Binary operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum BinOp {
    /// `=`
    Eq,
    /// `<>` (also `!=`)
    NotEq,
    /// `<`
    Lt,
    /// `<=`
    LtEq,
    /// `>`
    Gt,
    /// `>=`
    GtEq,
    /// `AND`
    And,
    /// `OR`
    Or,
    /// `+`
    Plus,
    /// `-`
    Minus,
    /// `*`
    Multiply,
    /// `/`
    Divide,
    /// `%`
    Modulo,
    /// `||`
    Concat,
}

impl BinOp {
    /// True for the six comparisons.
    pub fn is_comparison(self) -> bool {
        matches!(
            self,
            BinOp::Eq | BinOp::NotEq | BinOp::Lt | BinOp::LtEq | BinOp::Gt | BinOp::GtEq
        )
    }

    /// The comparison with its operands swapped (`a < b` is `b > a`).
    pub fn flip(self) -> BinOp {
        match self {
            BinOp::Lt => BinOp::Gt,
            BinOp::LtEq => BinOp::GtEq,
            BinOp::Gt => BinOp::Lt,
            BinOp::GtEq => BinOp::LtEq,
            other => other,
        }
    }

    /// The operator as SQL writes it.
    pub fn symbol(self) -> &'static str {
        match self {
            BinOp::Eq => "=",
            BinOp::NotEq => "<>",
            BinOp::Lt => "<",
            BinOp::LtEq => "<=",
            BinOp::Gt => ">",
            BinOp::GtEq => ">=",
            BinOp::And => "AND",
            BinOp::Or => "OR",
            BinOp::Plus => "+",
            BinOp::Minus => "-",
            BinOp::Multiply => "*",
            BinOp::Divide => "/",
            BinOp::Modulo => "%",
            BinOp::Concat => "||",
        }
    }

    fn precedence(self) -> u8 {
        match self {
            BinOp::Or => 1,
            BinOp::And => 2,
            BinOp::Eq | BinOp::NotEq | BinOp::Lt | BinOp::LtEq | BinOp::Gt | BinOp::GtEq => 4,
            BinOp::Concat => 5,
            BinOp::Plus | BinOp::Minus => 6,
            BinOp::Multiply | BinOp::Divide | BinOp::Modulo => 7,
        }
    }
}

/// An expression.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Expr {
    /// An attribute.
    Column(ColumnRef),
    /// A constant.
    Literal(Value),
    /// `left op right`.
    Binary {
        /// Operator.
        op: BinOp,
        /// Left operand.
        left: Box<Expr>,
        /// Right operand.
        right: Box<Expr>,
    },
    /// `NOT e`.
    Not(Box<Expr>),
    /// `-e`.
    Neg(Box<Expr>),
    /// `e IS [NOT] NULL`.
    IsNull {
        /// Operand.
        expr: Box<Expr>,
        /// `IS NOT NULL`.
        negated: bool,
    },
    /// `e [NOT] IN (list)`.
    InList {
        /// Operand.
        expr: Box<Expr>,
        /// The list.
        list: Vec<Expr>,
        /// `NOT IN`.
        negated: bool,
    },
    /// `e [NOT] BETWEEN low AND high`.
    Between {
        /// Operand.
        expr: Box<Expr>,
        /// Lower bound, inclusive.
        low: Box<Expr>,
        /// Upper bound, inclusive.
        high: Box<Expr>,
        /// `NOT BETWEEN`.
        negated: bool,
    },
    /// `e [NOT] LIKE pattern` (SQLite: case-insensitive for ASCII).
    Like {
        /// Operand.
        expr: Box<Expr>,
        /// Pattern with `%` and `_`.
        pattern: Box<Expr>,
        /// `NOT LIKE`.
        negated: bool,
    },
    /// A function or aggregate call; `count()` with no arguments is `count(*)`.
    Function {
        /// Lower-case name.
        name: String,
        /// Arguments.
        args: Vec<Expr>,
        /// `DISTINCT` inside an aggregate.
        distinct: bool,
    },
}

/// Aggregate function names; a query using one is answered locally only.
pub const AGGREGATES: &[&str] = &["count", "sum", "avg", "min", "max", "total", "group_concat"];

impl Expr {
    /// `var.attr` as an expression.
    pub fn col(var: &str, attr: &str) -> Expr {
        Expr::Column(ColumnRef::new(var, attr))
    }

    /// A constant.
    pub fn lit(v: Value) -> Expr {
        Expr::Literal(v)
    }

    /// `left op right`.
    pub fn binary(op: BinOp, left: Expr, right: Expr) -> Expr {
        Expr::Binary {
            op,
            left: Box::new(left),
            right: Box::new(right),
        }
    }

    /// Conjunction of `parts` (`None` for none).
    pub fn conjunction(parts: impl IntoIterator<Item = Expr>) -> Option<Expr> {
        parts
            .into_iter()
            .reduce(|a, b| Expr::binary(BinOp::And, a, b))
    }

    /// The top-level conjuncts of this expression.
    pub fn conjuncts(&self) -> Vec<&Expr> {
        match self {
            Expr::Binary {
                op: BinOp::And,
                left,
                right,
            } => {
                let mut v = left.conjuncts();
                v.extend(right.conjuncts());
                v
            }
            e => vec![e],
        }
    }

    /// The direct sub-expressions, in order.
    pub fn children(&self) -> Vec<&Expr> {
        match self {
            Expr::Column(_) | Expr::Literal(_) => Vec::new(),
            Expr::Binary { left, right, .. } => vec![left, right],
            Expr::Not(e) | Expr::Neg(e) | Expr::IsNull { expr: e, .. } => vec![e],
            Expr::InList { expr, list, .. } => std::iter::once(expr.as_ref()).chain(list).collect(),
            Expr::Between {
                expr, low, high, ..
            } => vec![expr, low, high],
            Expr::Like { expr, pattern, .. } => vec![expr, pattern],
            Expr::Function { args, .. } => args.iter().collect(),
        }
    }

    /// Calls `f` on this expression and every sub-expression, depth first.
    pub fn walk<'a>(&'a self, f: &mut impl FnMut(&'a Expr)) {
        f(self);
        for c in self.children() {
            c.walk(f);
        }
    }

    /// Calls `f` on every column reference, in order.
    pub fn visit_columns<'a>(&'a self, f: &mut impl FnMut(&'a ColumnRef)) {
        self.walk(&mut |e| {
            if let Expr::Column(c) = e {
                f(c);
            }
        });
    }

    /// Rewrites every column reference with `f`, bottom-up.
    pub fn map_columns(&self, f: &mut impl FnMut(&ColumnRef) -> Expr) -> Expr {
        let mut m = |e: &Expr| Box::new(e.map_columns(f));
        match self {
            Expr::Column(c) => f(c),
            Expr::Literal(v) => Expr::Literal(v.clone()),
            Expr::Binary { op, left, right } => Expr::Binary {
                op: *op,
                left: m(left),
                right: m(right),
            },
            Expr::Not(e) => Expr::Not(m(e)),
            Expr::Neg(e) => Expr::Neg(m(e)),
            Expr::IsNull { expr, negated } => Expr::IsNull {
                expr: m(expr),
                negated: *negated,
            },
            Expr::InList {
                expr,
                list,
                negated,
            } => Expr::InList {
                expr: m(expr),
                list: list.iter().map(|e| e.map_columns(f)).collect(),
                negated: *negated,
            },
            Expr::Between {
                expr,
                low,
                high,
                negated,
            } => Expr::Between {
                expr: m(expr),
                low: m(low),
                high: m(high),
                negated: *negated,
            },
            Expr::Like {
                expr,
                pattern,
                negated,
            } => Expr::Like {
                expr: m(expr),
                pattern: m(pattern),
                negated: *negated,
            },
            Expr::Function {
                name,
                args,
                distinct,
            } => Expr::Function {
                name: name.clone(),
                args: args.iter().map(|e| e.map_columns(f)).collect(),
                distinct: *distinct,
            },
        }
    }

    /// The distinct range variables this expression references (unresolved
    /// references count as `None`).
    pub fn vars(&self) -> Vec<Option<String>> {
        let mut out: Vec<Option<String>> = Vec::new();
        self.visit_columns(&mut |c| {
            if !out.contains(&c.var) {
                out.push(c.var.clone());
            }
        });
        out
    }

    /// True if an aggregate function appears anywhere in the expression.
    pub fn has_aggregate(&self) -> bool {
        let mut found = false;
        self.walk(&mut |e| {
            found |=
                matches!(e, Expr::Function { name, .. } if AGGREGATES.contains(&name.as_str()));
        });
        found
    }

    fn precedence(&self) -> u8 {
        match self {
            Expr::Binary { op, .. } => op.precedence(),
            Expr::Not(_) => 3,
            Expr::IsNull { .. }
            | Expr::InList { .. }
            | Expr::Between { .. }
            | Expr::Like { .. } => 4,
            _ => 9,
        }
    }

    fn fmt_child(&self, f: &mut fmt::Formatter<'_>, parent: u8, right: bool) -> fmt::Result {
        let p = self.precedence();
        if p < parent || (right && p == parent && p != 1 && p != 2) {
            write!(f, "({self})")
        } else {
            write!(f, "{self}")
        }
    }
}

/// An identifier as SQL text, double-quoted when it is a keyword.
pub use snaps_schema::sql_ident as ident;

impl fmt::Display for ColumnRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.var {
            Some(v) => write!(f, "{}.{}", ident(v), ident(&self.attr)),
            None => f.write_str(&ident(&self.attr)),
        }
    }
}

impl fmt::Display for Expr {
    /// SQL text; parenthesised only where precedence needs it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let not = |n: bool| if n { "NOT " } else { "" };
        match self {
            Expr::Column(c) => write!(f, "{c}"),
            Expr::Literal(v) => write!(f, "{v}"),
            Expr::Binary { op, left, right } => {
                left.fmt_child(f, op.precedence(), false)?;
                write!(f, " {} ", op.symbol())?;
                right.fmt_child(f, op.precedence(), true)
            }
            Expr::Not(e) => {
                f.write_str("NOT ")?;
                e.fmt_child(f, 4, false)
            }
            // `--x` would start an SQL comment: parenthesise all but a column.
            Expr::Neg(e) => match e.as_ref() {
                Expr::Column(c) => write!(f, "-{c}"),
                other => write!(f, "-({other})"),
            },
            Expr::IsNull { expr, negated } => {
                expr.fmt_child(f, 5, false)?;
                write!(f, " IS {}NULL", not(*negated))
            }
            Expr::InList {
                expr,
                list,
                negated,
            } => {
                expr.fmt_child(f, 5, false)?;
                write!(f, " {}IN (", not(*negated))?;
                for (i, e) in list.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{e}")?;
                }
                f.write_str(")")
            }
            Expr::Between {
                expr,
                low,
                high,
                negated,
            } => {
                expr.fmt_child(f, 5, false)?;
                write!(f, " {}BETWEEN ", not(*negated))?;
                low.fmt_child(f, 5, false)?;
                f.write_str(" AND ")?;
                high.fmt_child(f, 5, false)
            }
            Expr::Like {
                expr,
                pattern,
                negated,
            } => {
                expr.fmt_child(f, 5, false)?;
                write!(f, " {}LIKE ", not(*negated))?;
                pattern.fmt_child(f, 5, false)
            }
            Expr::Function {
                name,
                args,
                distinct,
            } => {
                if args.is_empty() && name == "count" {
                    return f.write_str("count(*)");
                }
                write!(f, "{name}({}", if *distinct { "DISTINCT " } else { "" })?;
                for (i, e) in args.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{e}")?;
                }
                f.write_str(")")
            }
        }
    }
}

/// A range variable: `range of p is patient` in QUEL, `patient AS p` in SQL.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Range {
    /// Variable name.
    pub var: String,
    /// Relation name, lower case.
    pub relation: String,
    /// Set when this variable is the null-supplying side of a `LEFT JOIN`:
    /// the `ON` condition (the ranges before it are the preserved side).
    pub left_join_on: Option<Expr>,
}

impl Range {
    /// An inner range `relation AS var`.
    pub fn new(var: &str, relation: &str) -> Range {
        Range {
            var: var.to_string(),
            relation: relation.to_string(),
            left_join_on: None,
        }
    }
}

/// One entry of a target list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Target {
    /// `*` (var `None`), `p.*` or QUEL's `p.all`.
    All(Option<String>),
    /// An expression with an optional name (`AS name`, QUEL's `name = expr`).
    Expr {
        /// The value.
        expr: Expr,
        /// Output name.
        alias: Option<String>,
    },
}

/// `ORDER BY` / QUEL `sort by` item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrderItem {
    /// Sort key.
    pub expr: Expr,
    /// Descending.
    pub desc: bool,
}

/// A retrieval: SQL `SELECT`, QUEL `retrieve`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Select {
    /// `DISTINCT` / QUEL `unique`.
    pub distinct: bool,
    /// The target list.
    pub targets: Vec<Target>,
    /// Range variables, in FROM order.
    pub ranges: Vec<Range>,
    /// The qualification (`WHERE`, and the `ON` of inner joins).
    pub qual: Option<Expr>,
    /// `GROUP BY`.
    pub group_by: Vec<Expr>,
    /// `HAVING`.
    pub having: Option<Expr>,
    /// `ORDER BY` / `sort by`.
    pub order_by: Vec<OrderItem>,
    /// `LIMIT`.
    pub limit: Option<u64>,
    /// `OFFSET`.
    pub offset: Option<u64>,
}

/// SQL `INSERT`, QUEL `append to`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Insert {
    /// Target relation.
    pub relation: String,
    /// Named attributes (empty: all, in declaration order).
    pub columns: Vec<String>,
    /// Rows of values.
    pub rows: Vec<Vec<Expr>>,
}

/// SQL `UPDATE`, QUEL `replace`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Update {
    /// The variable whose tuples change.
    pub target: Range,
    /// Other variables the qualification uses (QUEL allows them).
    pub others: Vec<Range>,
    /// `attr = value` pairs.
    pub assignments: Vec<(String, Expr)>,
    /// Which tuples.
    pub qual: Option<Expr>,
}

/// SQL `DELETE`, QUEL `delete`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Delete {
    /// The variable whose tuples go.
    pub target: Range,
    /// Other variables the qualification uses.
    pub others: Vec<Range>,
    /// Which tuples.
    pub qual: Option<Expr>,
}

/// A statement in either language.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Statement {
    /// Retrieval.
    Select(Select),
    /// Insertion.
    Insert(Insert),
    /// Update.
    Update(Update),
    /// Deletion.
    Delete(Delete),
    /// QUEL `define snapshot name (attrs) as retrieve ...`: fetch now and keep.
    DefineSnapshot {
        /// Snapshot name.
        name: String,
        /// Attribute names given for the target list (may be empty).
        columns: Vec<String>,
        /// The retrieval.
        query: Select,
    },
}

fn comma<T: fmt::Display>(f: &mut fmt::Formatter<'_>, items: &[T]) -> fmt::Result {
    for (i, x) in items.iter().enumerate() {
        if i > 0 {
            f.write_str(", ")?;
        }
        write!(f, "{x}")?;
    }
    Ok(())
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::All(None) => f.write_str("*"),
            Target::All(Some(v)) => write!(f, "{v}.*"),
            Target::Expr { expr, alias: None } => write!(f, "{expr}"),
            Target::Expr {
                expr,
                alias: Some(a),
            } => write!(f, "{expr} AS {a}"),
        }
    }
}

impl fmt::Display for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.var == self.relation {
            f.write_str(&ident(&self.relation))
        } else {
            write!(f, "{} AS {}", ident(&self.relation), ident(&self.var))
        }
    }
}

impl fmt::Display for Select {
    /// SQLite-compatible SQL for the retrieval.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SELECT ")?;
        if self.distinct {
            f.write_str("DISTINCT ")?;
        }
        comma(f, &self.targets)?;
        if !self.ranges.is_empty() {
            f.write_str(" FROM ")?;
            for (i, r) in self.ranges.iter().enumerate() {
                match (&r.left_join_on, i) {
                    (Some(on), _) => write!(f, " LEFT JOIN {r} ON {on}")?,
                    (None, 0) => write!(f, "{r}")?,
                    (None, _) => write!(f, ", {r}")?,
                }
            }
        }
        if let Some(q) = &self.qual {
            write!(f, " WHERE {q}")?;
        }
        if !self.group_by.is_empty() {
            f.write_str(" GROUP BY ")?;
            comma(f, &self.group_by)?;
        }
        if let Some(h) = &self.having {
            write!(f, " HAVING {h}")?;
        }
        if !self.order_by.is_empty() {
            f.write_str(" ORDER BY ")?;
            for (i, o) in self.order_by.iter().enumerate() {
                if i > 0 {
                    f.write_str(", ")?;
                }
                write!(f, "{}{}", o.expr, if o.desc { " DESC" } else { "" })?;
            }
        }
        if let Some(l) = self.limit {
            write!(f, " LIMIT {l}")?;
        }
        if let Some(o) = self.offset {
            write!(f, " OFFSET {o}")?;
        }
        Ok(())
    }
}

impl fmt::Display for Statement {
    /// SQLite-compatible SQL; a QUEL statement prints as its SQL equivalent.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Statement::Select(s) => write!(f, "{s}"),
            Statement::Insert(i) => {
                write!(f, "INSERT INTO {}", i.relation)?;
                if !i.columns.is_empty() {
                    f.write_str(" (")?;
                    comma(f, &i.columns)?;
                    f.write_str(")")?;
                }
                f.write_str(" VALUES ")?;
                for (n, row) in i.rows.iter().enumerate() {
                    if n > 0 {
                        f.write_str(", ")?;
                    }
                    f.write_str("(")?;
                    comma(f, row)?;
                    f.write_str(")")?;
                }
                Ok(())
            }
            Statement::Update(u) => {
                write!(f, "UPDATE {} SET ", u.target)?;
                for (n, (a, e)) in u.assignments.iter().enumerate() {
                    if n > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{a} = {e}")?;
                }
                if !u.others.is_empty() {
                    // QUEL's extra range variables: SQLite's UPDATE ... FROM.
                    f.write_str(" FROM ")?;
                    comma(f, &u.others)?;
                }
                if let Some(q) = &u.qual {
                    write!(f, " WHERE {q}")?;
                }
                Ok(())
            }
            Statement::Delete(d) => {
                write!(f, "DELETE FROM {}", d.target)?;
                if !d.others.is_empty() {
                    // SQLite has no DELETE ... USING; the other variables go in
                    // an EXISTS so the statement keeps QUEL's meaning.
                    f.write_str(" WHERE EXISTS (SELECT 1 FROM ")?;
                    comma(f, &d.others)?;
                    if let Some(q) = &d.qual {
                        write!(f, " WHERE {q}")?;
                    }
                    return f.write_str(")");
                }
                if let Some(q) = &d.qual {
                    write!(f, " WHERE {q}")?;
                }
                Ok(())
            }
            Statement::DefineSnapshot { query, .. } => write!(f, "{query}"),
        }
    }
}
