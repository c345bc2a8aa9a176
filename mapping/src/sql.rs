//! SQL front end: `sqlparser` parses, this module lowers its AST into the
//! [`ir`](crate::ir). Only what SNAPS can plan is lowered; anything else is an
//! [`Error::Unsupported`] naming the construct, so the caller can pass the
//! statement through to the site's SQLite untouched when no mapped relation is
//! involved, or refuse it clearly when one is.

use snaps_schema::Value;
use sqlparser::ast::{
    self, AssignmentTarget, BinaryOperator, DuplicateTreatment, FromTable, FunctionArg,
    FunctionArgExpr, FunctionArguments, GroupByExpr, JoinConstraint, JoinOperator, LimitClause,
    ObjectName, ObjectNamePart, OrderByKind, OrderBySort, SelectItem,
    SelectItemQualifiedWildcardKind, SetExpr, TableFactor, TableObject, TableWithJoins,
    UnaryOperator,
};
use sqlparser::dialect::GenericDialect;
use sqlparser::parser::Parser;

use crate::ir::{
    BinOp, ColumnRef, Delete, Expr, Insert, OrderItem, Range, Select, Statement, Target, Update,
};
use crate::{Error, Result};

/// Parses one or more SQL statements into the IR.
pub fn parse(text: &str) -> Result<Vec<Statement>> {
    let statements = Parser::parse_sql(&GenericDialect {}, text).map_err(|e| {
        let e = e.to_string();
        Error::Parse(format!(
            "sql: {}",
            e.trim_start_matches("sql parser error: ")
        ))
    })?;
    statements.iter().map(lower_statement).collect()
}

fn unsupported<T>(what: impl std::fmt::Display) -> Result<T> {
    Err(Error::Unsupported(format!("sql: {what} is not supported")))
}

fn lower_statement(s: &ast::Statement) -> Result<Statement> {
    match s {
        ast::Statement::Query(q) => Ok(Statement::Select(lower_query(q)?)),
        ast::Statement::Insert(i) => lower_insert(i),
        ast::Statement::Update(u) => lower_update(u),
        ast::Statement::Delete(d) => lower_delete(d),
        other => {
            let text = other.to_string();
            let head: String = text
                .split_whitespace()
                .take(2)
                .collect::<Vec<_>>()
                .join(" ");
            unsupported(format!("statement {head}"))
        }
    }
}

fn name_of(name: &ObjectName) -> Result<String> {
    match name.0.as_slice() {
        [ObjectNamePart::Identifier(id)] => Ok(id.value.to_lowercase()),
        _ => unsupported(format!("qualified name {name}")),
    }
}

fn lower_query(q: &ast::Query) -> Result<Select> {
    if q.with.is_some() {
        return unsupported("WITH");
    }
    if q.fetch.is_some() || !q.locks.is_empty() {
        return unsupported("FETCH or FOR UPDATE");
    }
    let SetExpr::Select(s) = q.body.as_ref() else {
        return unsupported("a set operation (UNION, INTERSECT, EXCEPT) or VALUES query");
    };
    let mut select = lower_select(s)?;
    if let Some(order_by) = &q.order_by {
        let OrderByKind::Expressions(items) = &order_by.kind else {
            return unsupported("ORDER BY ALL");
        };
        for item in items {
            let desc = match &item.options.sort {
                None | Some(OrderBySort::Asc) => false,
                Some(OrderBySort::Desc) => true,
                Some(OrderBySort::Using(_)) => return unsupported("ORDER BY ... USING"),
            };
            if item.options.nulls_first.is_some() {
                return unsupported("NULLS FIRST/LAST");
            }
            select.order_by.push(OrderItem {
                expr: lower_expr(&item.expr)?,
                desc,
            });
        }
    }
    match &q.limit_clause {
        None => {}
        Some(LimitClause::LimitOffset {
            limit,
            offset,
            limit_by,
        }) => {
            if !limit_by.is_empty() {
                return unsupported("LIMIT BY");
            }
            select.limit = limit.as_ref().map(count).transpose()?;
            select.offset = offset.as_ref().map(|o| count(&o.value)).transpose()?;
        }
        Some(LimitClause::OffsetCommaLimit { offset, limit }) => {
            select.limit = Some(count(limit)?);
            select.offset = Some(count(offset)?);
        }
    }
    Ok(select)
}

fn count(e: &ast::Expr) -> Result<u64> {
    match lower_expr(e)? {
        Expr::Literal(Value::Int(n)) if n >= 0 => Ok(n as u64),
        other => Err(Error::Parse(format!(
            "sql: LIMIT and OFFSET take a non-negative integer, found {other}"
        ))),
    }
}

fn lower_select(s: &ast::Select) -> Result<Select> {
    if s.into.is_some() {
        return unsupported("SELECT INTO");
    }
    if s.top.is_some() || !s.lateral_views.is_empty() || s.qualify.is_some() {
        return unsupported("TOP, LATERAL VIEW or QUALIFY");
    }
    if !s.named_window.is_empty() || s.prewhere.is_some() || !s.connect_by.is_empty() {
        return unsupported("WINDOW, PREWHERE or CONNECT BY");
    }
    let mut select = Select {
        distinct: match &s.distinct {
            None | Some(ast::Distinct::All) => false,
            Some(ast::Distinct::Distinct) => true,
            Some(_) => return unsupported("DISTINCT ON"),
        },
        ..Select::default()
    };
    let mut on_conjuncts = Vec::new();
    for twj in &s.from {
        lower_from(twj, &mut select.ranges, &mut on_conjuncts)?;
    }
    for item in &s.projection {
        select.targets.push(match item {
            SelectItem::UnnamedExpr(e) => Target::Expr {
                expr: lower_expr(e)?,
                alias: None,
            },
            SelectItem::ExprWithAlias { expr, alias } => Target::Expr {
                expr: lower_expr(expr)?,
                alias: Some(alias.value.to_lowercase()),
            },
            SelectItem::Wildcard(_) => Target::All(None),
            SelectItem::QualifiedWildcard(SelectItemQualifiedWildcardKind::ObjectName(n), _) => {
                Target::All(Some(name_of(n)?))
            }
            other => return unsupported(format!("select item {other}")),
        });
    }
    let mut conjuncts = on_conjuncts;
    if let Some(w) = &s.selection {
        conjuncts.push(lower_expr(w)?);
    }
    select.qual = Expr::conjunction(conjuncts);
    match &s.group_by {
        GroupByExpr::Expressions(exprs, modifiers) if modifiers.is_empty() => {
            select.group_by = exprs.iter().map(lower_expr).collect::<Result<_>>()?;
        }
        _ => return unsupported("GROUP BY ALL or grouping modifiers"),
    }
    select.having = s.having.as_ref().map(lower_expr).transpose()?;
    Ok(select)
}

fn table_range(factor: &TableFactor) -> Result<Range> {
    match factor {
        TableFactor::Table {
            name,
            alias,
            args: None,
            ..
        } => {
            let relation = name_of(name)?;
            let var = match alias {
                Some(a) if !a.columns.is_empty() => {
                    return unsupported("column aliases on a table");
                }
                Some(a) => a.name.value.to_lowercase(),
                None => relation.clone(),
            };
            Ok(Range {
                var,
                relation,
                left_join_on: None,
            })
        }
        TableFactor::Derived { .. } => unsupported("a subquery in FROM"),
        TableFactor::NestedJoin { .. } => unsupported("a parenthesised join"),
        other => unsupported(format!("FROM item {other}")),
    }
}

fn lower_from(twj: &TableWithJoins, ranges: &mut Vec<Range>, on: &mut Vec<Expr>) -> Result<()> {
    ranges.push(table_range(&twj.relation)?);
    for join in &twj.joins {
        let mut range = table_range(&join.relation)?;
        match &join.join_operator {
            JoinOperator::Join(c) | JoinOperator::Inner(c) => match c {
                JoinConstraint::On(e) => on.push(lower_expr(e)?),
                JoinConstraint::None => {}
                _ => return unsupported("JOIN ... USING or NATURAL JOIN (write ON)"),
            },
            JoinOperator::CrossJoin(JoinConstraint::None) => {}
            JoinOperator::Left(c) | JoinOperator::LeftOuter(c) => match c {
                JoinConstraint::On(e) => range.left_join_on = Some(lower_expr(e)?),
                _ => return unsupported("LEFT JOIN without ON"),
            },
            JoinOperator::Right(_) | JoinOperator::RightOuter(_) => {
                return unsupported("RIGHT JOIN (write it as a LEFT JOIN)");
            }
            JoinOperator::FullOuter(_) => return unsupported("FULL JOIN"),
            other => return unsupported(format!("join {other:?}")),
        }
        ranges.push(range);
    }
    Ok(())
}

fn binop(op: &BinaryOperator) -> Result<BinOp> {
    Ok(match op {
        BinaryOperator::Eq => BinOp::Eq,
        BinaryOperator::NotEq => BinOp::NotEq,
        BinaryOperator::Lt => BinOp::Lt,
        BinaryOperator::LtEq => BinOp::LtEq,
        BinaryOperator::Gt => BinOp::Gt,
        BinaryOperator::GtEq => BinOp::GtEq,
        BinaryOperator::And => BinOp::And,
        BinaryOperator::Or => BinOp::Or,
        BinaryOperator::Plus => BinOp::Plus,
        BinaryOperator::Minus => BinOp::Minus,
        BinaryOperator::Multiply => BinOp::Multiply,
        BinaryOperator::Divide => BinOp::Divide,
        BinaryOperator::Modulo => BinOp::Modulo,
        BinaryOperator::StringConcat => BinOp::Concat,
        other => return unsupported(format!("operator {other}")),
    })
}

fn literal(v: &ast::Value) -> Result<Value> {
    Ok(match v {
        ast::Value::Number(n, _) => match n.parse::<i64>() {
            Ok(i) => Value::Int(i),
            Err(_) => match n.parse::<f64>() {
                Ok(f) if f.is_finite() => Value::Float(f),
                _ => return Err(Error::Parse(format!("sql: bad number {n}"))),
            },
        },
        ast::Value::SingleQuotedString(s) | ast::Value::DoubleQuotedString(s) => {
            Value::Text(s.clone())
        }
        ast::Value::Boolean(b) => Value::Int(*b as i64),
        ast::Value::Null => Value::Null,
        ast::Value::Placeholder(p) => {
            return Err(Error::Unsupported(format!(
                "sql: parameter {p} must be bound before the statement is planned"
            )));
        }
        other => return unsupported(format!("literal {other}")),
    })
}

/// Lowers one SQL expression.
fn lower_expr(e: &ast::Expr) -> Result<Expr> {
    let b = |e: &ast::Expr| lower_expr(e).map(Box::new);
    Ok(match e {
        ast::Expr::Identifier(id) => Expr::Column(ColumnRef {
            var: None,
            attr: id.value.to_lowercase(),
        }),
        ast::Expr::CompoundIdentifier(ids) => match ids.as_slice() {
            [v, a] => Expr::col(&v.value.to_lowercase(), &a.value.to_lowercase()),
            _ => return unsupported(format!("name {e}")),
        },
        ast::Expr::Nested(inner) => lower_expr(inner)?,
        ast::Expr::Value(v) => Expr::Literal(literal(&v.value)?),
        ast::Expr::BinaryOp { left, op, right } => Expr::Binary {
            op: binop(op)?,
            left: b(left)?,
            right: b(right)?,
        },
        ast::Expr::UnaryOp { op, expr } => match op {
            UnaryOperator::Not => Expr::Not(b(expr)?),
            UnaryOperator::Plus => lower_expr(expr)?,
            UnaryOperator::Minus => match lower_expr(expr)? {
                Expr::Literal(Value::Int(i)) => Expr::Literal(Value::Int(-i)),
                Expr::Literal(Value::Float(f)) => Expr::Literal(Value::Float(-f)),
                other => Expr::Neg(Box::new(other)),
            },
            other => return unsupported(format!("operator {other}")),
        },
        ast::Expr::IsNull(x) => Expr::IsNull {
            expr: b(x)?,
            negated: false,
        },
        ast::Expr::IsNotNull(x) => Expr::IsNull {
            expr: b(x)?,
            negated: true,
        },
        ast::Expr::InList {
            expr,
            list,
            negated,
        } => Expr::InList {
            expr: b(expr)?,
            list: list.iter().map(lower_expr).collect::<Result<_>>()?,
            negated: *negated,
        },
        ast::Expr::Between {
            expr,
            negated,
            low,
            high,
        } => Expr::Between {
            expr: b(expr)?,
            low: b(low)?,
            high: b(high)?,
            negated: *negated,
        },
        // SQLite's LIKE ignores ASCII case, so ILIKE means the same there.
        ast::Expr::Like {
            negated,
            any: false,
            expr,
            pattern,
            escape_char: None,
        }
        | ast::Expr::ILike {
            negated,
            any: false,
            expr,
            pattern,
            escape_char: None,
        } => Expr::Like {
            expr: b(expr)?,
            pattern: b(pattern)?,
            negated: *negated,
        },
        ast::Expr::Function(f) => lower_function(f)?,
        ast::Expr::Substring {
            expr,
            substring_from: Some(from),
            substring_for,
            ..
        } => {
            let mut args = vec![lower_expr(expr)?, lower_expr(from)?];
            if let Some(n) = substring_for {
                args.push(lower_expr(n)?);
            }
            Expr::Function {
                name: "substr".into(),
                args,
                distinct: false,
            }
        }
        ast::Expr::Trim {
            expr,
            trim_where: None,
            trim_what: None,
            trim_characters: None,
        } => Expr::Function {
            name: "trim".into(),
            args: vec![lower_expr(expr)?],
            distinct: false,
        },
        ast::Expr::Subquery(_) | ast::Expr::InSubquery { .. } | ast::Expr::Exists { .. } => {
            return unsupported("a subquery");
        }
        other => return unsupported(format!("expression {other}")),
    })
}

fn lower_function(f: &ast::Function) -> Result<Expr> {
    if f.over.is_some() || f.filter.is_some() || !f.within_group.is_empty() {
        return unsupported(format!("window or filtered aggregate {f}"));
    }
    let name = name_of(&f.name)?;
    let (args, distinct) = match &f.args {
        FunctionArguments::None => (Vec::new(), false),
        FunctionArguments::Subquery(_) => return unsupported("a subquery"),
        FunctionArguments::List(list) => {
            if !list.clauses.is_empty() {
                return unsupported(format!("clauses in {f}"));
            }
            let distinct = matches!(list.duplicate_treatment, Some(DuplicateTreatment::Distinct));
            let mut args = Vec::new();
            for a in &list.args {
                match a {
                    FunctionArg::Unnamed(FunctionArgExpr::Expr(e)) => args.push(lower_expr(e)?),
                    FunctionArg::Unnamed(FunctionArgExpr::Wildcard) if name == "count" => {}
                    other => return unsupported(format!("function argument {other}")),
                }
            }
            (args, distinct)
        }
    };
    Ok(Expr::Function {
        name,
        args,
        distinct,
    })
}

fn lower_insert(i: &ast::Insert) -> Result<Statement> {
    let TableObject::TableName(name) = &i.table else {
        return unsupported("INSERT into a table function");
    };
    if i.on.is_some() || i.returning.is_some() || i.or.is_some() || !i.assignments.is_empty() {
        return unsupported("INSERT with ON CONFLICT, OR, SET or RETURNING");
    }
    let Some(source) = &i.source else {
        return unsupported("INSERT without VALUES");
    };
    let SetExpr::Values(values) = source.body.as_ref() else {
        return unsupported("INSERT ... SELECT");
    };
    let rows = values
        .rows
        .iter()
        .map(|row| {
            row.content
                .iter()
                .map(lower_expr)
                .collect::<Result<Vec<_>>>()
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Statement::Insert(Insert {
        relation: name_of(name)?,
        columns: i.columns.iter().map(name_of).collect::<Result<_>>()?,
        rows,
    }))
}

fn single_target(twj: &TableWithJoins) -> Result<Range> {
    if !twj.joins.is_empty() {
        return unsupported("UPDATE or DELETE with JOIN");
    }
    table_range(&twj.relation)
}

fn lower_update(u: &ast::Update) -> Result<Statement> {
    if u.from.is_some() || u.returning.is_some() || u.or.is_some() || u.limit.is_some() {
        return unsupported("UPDATE with FROM, OR, RETURNING or LIMIT");
    }
    let mut assignments = Vec::new();
    for a in &u.assignments {
        let AssignmentTarget::ColumnName(col) = &a.target else {
            return unsupported("tuple assignment");
        };
        let attr = match col.0.last() {
            Some(ObjectNamePart::Identifier(id)) => id.value.to_lowercase(),
            _ => return unsupported(format!("assignment to {col}")),
        };
        assignments.push((attr, lower_expr(&a.value)?));
    }
    Ok(Statement::Update(Update {
        target: single_target(&u.table)?,
        others: Vec::new(),
        assignments,
        qual: u.selection.as_ref().map(lower_expr).transpose()?,
    }))
}

fn lower_delete(d: &ast::Delete) -> Result<Statement> {
    if d.using.is_some() || d.returning.is_some() || d.limit.is_some() || !d.tables.is_empty() {
        return unsupported("DELETE with USING, RETURNING, LIMIT or several tables");
    }
    let (FromTable::WithFromKeyword(from) | FromTable::WithoutKeyword(from)) = &d.from;
    let [table] = from.as_slice() else {
        return unsupported("DELETE from several tables");
    };
    Ok(Statement::Delete(Delete {
        target: single_target(table)?,
        others: Vec::new(),
        qual: d.selection.as_ref().map(lower_expr).transpose()?,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(sql: &str) -> Statement {
        let mut v = parse(sql).unwrap();
        assert_eq!(v.len(), 1);
        v.remove(0)
    }

    /// Parse, print, and expect `expected` (the IR's SQL form).
    fn round(sql: &str, expected: &str) {
        let printed = one(sql).to_string();
        assert_eq!(printed, expected);
        // What we print parses back to the same IR.
        assert_eq!(one(&printed), one(sql), "{printed}");
    }

    #[test]
    fn selections_joins_and_clauses_lower() {
        round(
            "select p.pno, name from patient p where p.surname = 'Jones' and dob = 19340512",
            "SELECT p.pno, name FROM patient AS p WHERE p.surname = 'Jones' AND dob = 19340512",
        );
        round(
            "SELECT v.* FROM patient JOIN visit v ON patient.pno = v.pno WHERE patient.name = 'Smith'",
            "SELECT v.* FROM patient, visit AS v WHERE patient.pno = v.pno AND patient.name = 'Smith'",
        );
        round(
            "SELECT * FROM patient LEFT JOIN visit ON patient.pno = visit.pno AND visit.date > 19870101",
            "SELECT * FROM patient LEFT JOIN visit ON patient.pno = visit.pno AND visit.date > 19870101",
        );
        round(
            "SELECT DISTINCT surname, count(*) AS n FROM patient WHERE (sex = 'F' OR sex IS NULL) AND NOT vip = 'Y' \
             AND pno IN (1, 2) AND dob BETWEEN 19300101 AND 19401231 AND surname LIKE 'Mac%' \
             GROUP BY surname HAVING count(*) > 1 ORDER BY n DESC, surname LIMIT 10 OFFSET 5",
            "SELECT DISTINCT surname, count(*) AS n FROM patient WHERE (sex = 'F' OR sex IS NULL) AND NOT vip = 'Y' \
             AND pno IN (1, 2) AND dob BETWEEN 19300101 AND 19401231 AND surname LIKE 'Mac%' \
             GROUP BY surname HAVING count(*) > 1 ORDER BY n DESC, surname LIMIT 10 OFFSET 5",
        );
        round(
            "SELECT a - (b - 1), -x, count(DISTINCT y) FROM t",
            "SELECT a - (b - 1), -x, count(DISTINCT y) FROM t",
        );
    }

    #[test]
    fn dml_lowers() {
        round(
            "INSERT INTO patient (pno, surname) VALUES (7, 'O''Brien'), (8, NULL)",
            "INSERT INTO patient (pno, surname) VALUES (7, 'O''Brien'), (8, NULL)",
        );
        round(
            "UPDATE patient SET add1 = '12 Hereford St', gp = 1004 WHERE pno = 7",
            "UPDATE patient SET add1 = '12 Hereford St', gp = 1004 WHERE pno = 7",
        );
        round(
            "DELETE FROM visit_rep WHERE vno = 3",
            "DELETE FROM visit_rep WHERE vno = 3",
        );
    }

    #[test]
    fn what_cannot_be_planned_is_named() {
        let err = |sql: &str| parse(sql).unwrap_err().to_string();
        assert_eq!(
            err("SELECT * FROM a RIGHT JOIN b ON a.x = b.x"),
            "sql: RIGHT JOIN (write it as a LEFT JOIN) is not supported"
        );
        assert_eq!(
            err("SELECT * FROM a WHERE x IN (SELECT y FROM b)"),
            "sql: a subquery is not supported"
        );
        assert_eq!(
            err("SELECT x FROM a UNION SELECT y FROM b"),
            "sql: a set operation (UNION, INTERSECT, EXCEPT) or VALUES query is not supported"
        );
        assert_eq!(
            err("CREATE TABLE t (a INT)"),
            "sql: statement CREATE TABLE is not supported"
        );
        assert_eq!(
            err("SELECT * FROM t WHERE a = $1"),
            "sql: parameter $1 must be bound before the statement is planned"
        );
        assert!(err("SELEC * FROM t").starts_with("sql: "));
        assert!(matches!(
            parse("SELECT * FROM t WHERE"),
            Err(Error::Parse(_))
        ));
    }
}
