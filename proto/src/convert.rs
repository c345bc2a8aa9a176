//! Conversions between wire messages and the schema and mapping types.

use snaps_mapping::ir::{BinOp, ColumnRef, Expr};
use snaps_mapping::mapping::{RelationMapping, Split as MappingSplit};
use snaps_mapping::rewrite::{GlobalQuery, GlobalTable, Reassembly};
use snaps_schema::Value;

use crate::v1;

/// A message that does not say what it must: a missing field, an unknown
/// enum value, rows of the wrong length.
#[derive(Debug, thiserror::Error)]
#[error("malformed message: {0}")]
pub struct WireError(pub String);

fn malformed(what: impl Into<String>) -> WireError {
    WireError(what.into())
}

/// A value as it travels.
pub fn encode_value(v: &Value) -> v1::Value {
    use v1::value::Kind;
    v1::Value {
        kind: match v {
            Value::Null => None,
            Value::Int(i) => Some(Kind::Int(*i)),
            Value::Float(f) => Some(Kind::Float(*f)),
            Value::Text(s) => Some(Kind::Text(s.clone())),
        },
    }
}

/// A value as received.
pub fn decode_value(v: &v1::Value) -> Value {
    use v1::value::Kind;
    match &v.kind {
        None => Value::Null,
        Some(Kind::Int(i)) => Value::Int(*i),
        Some(Kind::Float(f)) => Value::Float(*f),
        Some(Kind::Text(s)) => Value::Text(s.clone()),
    }
}

/// Encodes rows column by column; every row must have `width` values.
/// Integers and floats in one column travel as floats; text mixed with
/// numbers in one column is refused (global attributes are typed, so this
/// only happens for values that were never type-checked).
pub fn encode_rows(width: usize, rows: &[Vec<Value>]) -> Result<v1::Rows, WireError> {
    let count = u32::try_from(rows.len()).map_err(|_| malformed("too many rows in one batch"))?;
    let mut columns = Vec::with_capacity(width);
    for c in 0..width {
        let mut col = v1::Column::default();
        let (mut ints, mut floats, mut texts) = (false, false, false);
        for row in rows {
            match row.get(c) {
                Some(Value::Int(_)) => ints = true,
                Some(Value::Float(_)) => floats = true,
                Some(Value::Text(_)) => texts = true,
                Some(Value::Null) => {}
                None => return Err(malformed(format!("a row has fewer than {width} values"))),
            }
        }
        if texts && (ints || floats) {
            return Err(malformed(format!("column {c} mixes text and numbers")));
        }
        for (i, row) in rows.iter().enumerate() {
            match &row[c] {
                Value::Null => {
                    if col.nulls.is_empty() {
                        col.nulls = vec![0; rows.len().div_ceil(8)];
                    }
                    col.nulls[i / 8] |= 1 << (i % 8);
                }
                Value::Int(v) if floats => col.floats.push(*v as f64),
                Value::Int(v) => col.ints.push(*v),
                Value::Float(v) => col.floats.push(*v),
                Value::Text(s) => col.texts.push(s.clone()),
            }
        }
        columns.push(col);
    }
    Ok(v1::Rows { count, columns })
}

/// Decodes rows of `width` columns.
pub fn decode_rows(width: usize, rows: &v1::Rows) -> Result<Vec<Vec<Value>>, WireError> {
    if rows.columns.len() != width {
        return Err(malformed(format!(
            "rows have {} columns, expected {width}",
            rows.columns.len()
        )));
    }
    let n = rows.count as usize;
    let mut out: Vec<Vec<Value>> = (0..n).map(|_| Vec::with_capacity(width)).collect();
    for (c, col) in rows.columns.iter().enumerate() {
        let is_null = |i: usize| {
            col.nulls
                .get(i / 8)
                .is_some_and(|b| b & (1 << (i % 8)) != 0)
        };
        let nulls = (0..n).filter(|&i| is_null(i)).count();
        let lists = [
            !col.ints.is_empty(),
            !col.floats.is_empty(),
            !col.texts.is_empty(),
        ];
        if lists.iter().filter(|x| **x).count() > 1 {
            return Err(malformed(format!("column {c} has values of two types")));
        }
        let present = col.ints.len() + col.floats.len() + col.texts.len();
        if present + nulls != n || col.nulls.len() > n.div_ceil(8) {
            return Err(malformed(format!(
                "column {c} has {present} values and {nulls} nulls for {n} rows"
            )));
        }
        let (mut ints, mut floats, mut texts) =
            (col.ints.iter(), col.floats.iter(), col.texts.iter());
        for (i, row) in out.iter_mut().enumerate() {
            let v = if is_null(i) {
                Value::Null
            } else if let Some(v) = ints.next() {
                Value::Int(*v)
            } else if let Some(v) = floats.next() {
                Value::Float(*v)
            } else if let Some(v) = texts.next() {
                Value::Text(v.clone())
            } else {
                return Err(malformed(format!("column {c} ran out of values")));
            };
            row.push(v);
        }
    }
    Ok(out)
}

fn encode_op(op: BinOp) -> v1::BinaryOp {
    use v1::BinaryOp as P;
    match op {
        BinOp::Eq => P::Eq,
        BinOp::NotEq => P::NotEq,
        BinOp::Lt => P::Lt,
        BinOp::LtEq => P::LtEq,
        BinOp::Gt => P::Gt,
        BinOp::GtEq => P::GtEq,
        BinOp::And => P::And,
        BinOp::Or => P::Or,
        BinOp::Plus => P::Plus,
        BinOp::Minus => P::Minus,
        BinOp::Multiply => P::Multiply,
        BinOp::Divide => P::Divide,
        BinOp::Modulo => P::Modulo,
        BinOp::Concat => P::Concat,
    }
}

fn decode_op(op: i32) -> Result<BinOp, WireError> {
    use v1::BinaryOp as P;
    Ok(
        match P::try_from(op).map_err(|_| malformed(format!("unknown operator {op}")))? {
            P::Unspecified => return Err(malformed("operator not given")),
            P::Eq => BinOp::Eq,
            P::NotEq => BinOp::NotEq,
            P::Lt => BinOp::Lt,
            P::LtEq => BinOp::LtEq,
            P::Gt => BinOp::Gt,
            P::GtEq => BinOp::GtEq,
            P::And => BinOp::And,
            P::Or => BinOp::Or,
            P::Plus => BinOp::Plus,
            P::Minus => BinOp::Minus,
            P::Multiply => BinOp::Multiply,
            P::Divide => BinOp::Divide,
            P::Modulo => BinOp::Modulo,
            P::Concat => BinOp::Concat,
        },
    )
}

fn boxed(e: &Expr) -> Option<Box<v1::Expr>> {
    Some(Box::new(encode_expr(e)))
}

/// An expression as it travels.
pub fn encode_expr(e: &Expr) -> v1::Expr {
    use v1::expr::Kind;
    let kind = match e {
        Expr::Column(c) => Kind::Column(v1::ColumnRef {
            var: c.var.clone().unwrap_or_default(),
            attr: c.attr.clone(),
        }),
        Expr::Literal(v) => Kind::Literal(encode_value(v)),
        Expr::Binary { op, left, right } => Kind::Binary(Box::new(v1::Binary {
            op: encode_op(*op) as i32,
            left: boxed(left),
            right: boxed(right),
        })),
        Expr::Not(x) => Kind::Not(Box::new(encode_expr(x))),
        Expr::Neg(x) => Kind::Neg(Box::new(encode_expr(x))),
        Expr::IsNull { expr, negated } => Kind::IsNull(Box::new(v1::IsNull {
            expr: boxed(expr),
            negated: *negated,
        })),
        Expr::InList {
            expr,
            list,
            negated,
        } => Kind::InList(Box::new(v1::InList {
            expr: boxed(expr),
            list: list.iter().map(encode_expr).collect(),
            negated: *negated,
        })),
        Expr::Between {
            expr,
            low,
            high,
            negated,
        } => Kind::Between(Box::new(v1::Between {
            expr: boxed(expr),
            low: boxed(low),
            high: boxed(high),
            negated: *negated,
        })),
        Expr::Like {
            expr,
            pattern,
            negated,
        } => Kind::Like(Box::new(v1::Like {
            expr: boxed(expr),
            pattern: boxed(pattern),
            negated: *negated,
        })),
        Expr::Function { name, args, .. } => Kind::Function(v1::Function {
            name: name.clone(),
            args: args.iter().map(encode_expr).collect(),
        }),
    };
    v1::Expr { kind: Some(kind) }
}

fn need(e: &Option<Box<v1::Expr>>, what: &str) -> Result<Box<Expr>, WireError> {
    match e {
        Some(e) => Ok(Box::new(decode_expr(e)?)),
        None => Err(malformed(format!("{what} without an operand"))),
    }
}

/// An expression as received (structure only; the global controller checks
/// names and types against its catalog).
pub fn decode_expr(e: &v1::Expr) -> Result<Expr, WireError> {
    use v1::expr::Kind;
    Ok(
        match e
            .kind
            .as_ref()
            .ok_or_else(|| malformed("empty expression"))?
        {
            Kind::Column(c) => Expr::Column(ColumnRef::new(&c.var, &c.attr)),
            Kind::Literal(v) => Expr::Literal(decode_value(v)),
            Kind::Binary(b) => Expr::Binary {
                op: decode_op(b.op)?,
                left: need(&b.left, "operator")?,
                right: need(&b.right, "operator")?,
            },
            Kind::Not(x) => Expr::Not(Box::new(decode_expr(x)?)),
            Kind::Neg(x) => Expr::Neg(Box::new(decode_expr(x)?)),
            Kind::IsNull(x) => Expr::IsNull {
                expr: need(&x.expr, "IS NULL")?,
                negated: x.negated,
            },
            Kind::InList(x) => Expr::InList {
                expr: need(&x.expr, "IN")?,
                list: x.list.iter().map(decode_expr).collect::<Result<_, _>>()?,
                negated: x.negated,
            },
            Kind::Between(x) => Expr::Between {
                expr: need(&x.expr, "BETWEEN")?,
                low: need(&x.low, "BETWEEN")?,
                high: need(&x.high, "BETWEEN")?,
                negated: x.negated,
            },
            Kind::Like(x) => Expr::Like {
                expr: need(&x.expr, "LIKE")?,
                pattern: need(&x.pattern, "LIKE")?,
                negated: x.negated,
            },
            Kind::Function(f) => Expr::Function {
                name: f.name.to_ascii_lowercase(),
                args: f.args.iter().map(decode_expr).collect::<Result<_, _>>()?,
                distinct: false,
            },
        },
    )
}

/// A digest of a join group's body (its tables and joins, not its name
/// [`v1::Group::kept`]): FNV-1a, 64 bits, of the body's encoding. A site
/// tells the bodies it named apart by it.
pub fn group_digest(g: &v1::Group) -> u64 {
    use prost::Message;
    let body = v1::Group {
        tables: g.tables.clone(),
        joins: g.joins.clone(),
        kept: 0,
    };
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in body.encode_to_vec() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Sends a fetch request's attributes by position instead of by name
/// (`Part.attributes`): the names of a wide relation are most of a small
/// fetch's bytes. A part naming an attribute `global` does not have keeps
/// its names, so the controller reports the mistake as before.
pub fn compact_shapes(req: &mut v1::FetchRequest, global: &snaps_schema::Catalog) {
    for part in req
        .groups
        .iter_mut()
        .flat_map(|g| g.tables.iter_mut())
        .filter_map(|t| t.shape.as_mut())
        .flat_map(|s| s.parts.iter_mut())
    {
        let Some(rel) = global.relation(&part.relation) else {
            continue;
        };
        let positions: Option<Vec<u32>> = part
            .columns
            .iter()
            .map(|c| {
                rel.attributes
                    .iter()
                    .position(|a| a.name == *c)
                    .map(|i| i as u32)
            })
            .collect();
        if let Some(positions) = positions {
            part.attributes = positions;
            part.columns.clear();
        }
    }
}

/// The shape of a mapped table: its parts and how they reassemble.
pub fn shape_of(t: &GlobalTable) -> v1::Shape {
    use v1::shape::Split;
    v1::Shape {
        parts: t
            .parts
            .iter()
            .map(|p| v1::Part {
                var: p.var.clone(),
                relation: p.relation.clone(),
                columns: p.columns.clone(),
                attributes: Vec::new(),
            })
            .collect(),
        split: match &t.reassembly {
            Reassembly::Single => None,
            Reassembly::Key(keys) => Some(Split::Key(v1::KeySplit {
                keys: keys
                    .iter()
                    .map(|names| v1::KeyAttribute {
                        names: names.clone(),
                    })
                    .collect(),
            })),
            Reassembly::MainTupleId(m) => Some(Split::MainPart(*m as u32)),
        },
    }
}

/// The shape of a local relation as its mapping lays it out (what an export
/// batch carries); each part's variable is its global relation's name.
pub fn shape_of_relation(rm: &RelationMapping) -> v1::Shape {
    use v1::shape::Split;
    v1::Shape {
        parts: rm
            .parts
            .iter()
            .map(|p| v1::Part {
                var: p.global.clone(),
                relation: p.global.clone(),
                columns: p.attrs.iter().map(|a| a.global.clone()).collect(),
                attributes: Vec::new(),
            })
            .collect(),
        split: match &rm.split {
            MappingSplit::None => None,
            MappingSplit::Key(keys) => Some(Split::Key(v1::KeySplit {
                keys: keys
                    .iter()
                    .map(|k| v1::KeyAttribute {
                        names: rm
                            .targets(k)
                            .iter()
                            .map(|(_, a)| a.global.clone())
                            .collect(),
                    })
                    .collect(),
            })),
            MappingSplit::MainTupleId(m) => Some(Split::MainPart(*m as u32)),
        },
    }
}

/// The fetch request for a mapped query, without semi-join projections (the
/// site adds those from its own tuples).
pub fn fetch_request(q: &GlobalQuery) -> v1::FetchRequest {
    v1::FetchRequest {
        groups: q
            .groups
            .iter()
            .map(|g| v1::Group {
                tables: g
                    .tables
                    .iter()
                    .map(|t| v1::Table {
                        shape: Some(shape_of(t)),
                        selection: t.selection.iter().map(encode_expr).collect(),
                        outer: t.outer,
                    })
                    .collect(),
                joins: g
                    .joins
                    .iter()
                    .map(|j| v1::Join {
                        left: Some(encode_expr(&j.left)),
                        right: Some(encode_expr(&j.right)),
                        outer_table: j.outer.as_ref().and_then(|v| {
                            g.tables
                                .iter()
                                .position(|t| &t.local_var == v)
                                .map(|i| i as u32)
                        }),
                    })
                    .collect(),
                kept: 0,
            })
            .collect(),
        semijoins: Vec::new(),
        include_held: false,
        user: String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn value() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<i64>().prop_map(Value::Int),
            "[a-z ']{0,12}".prop_map(Value::Text),
        ]
    }

    proptest! {
        #[test]
        fn rows_round_trip(rows in proptest::collection::vec(
            (value(), value(), prop_oneof![Just(Value::Null), (-1e6f64..1e6).prop_map(Value::Float)]),
            0..40)) {
            let rows: Vec<Vec<Value>> = rows
                .into_iter()
                .map(|(a, b, c)| vec![a, b, c])
                .collect();
            // Text mixed with numbers in one column is the only refusal.
            let by_column = |c: usize| rows.iter().any(|r| matches!(r[c], Value::Text(_)))
                && rows.iter().any(|r| matches!(r[c], Value::Int(_)));
            match encode_rows(3, &rows) {
                Ok(wire) => prop_assert_eq!(decode_rows(3, &wire).unwrap(), rows),
                Err(_) => prop_assert!(by_column(0) || by_column(1)),
            }
        }
    }

    #[test]
    fn nulls_cost_a_bit_each() {
        let rows: Vec<Vec<Value>> = (0..16)
            .map(|i| {
                vec![if i % 2 == 0 {
                    Value::Int(i)
                } else {
                    Value::Null
                }]
            })
            .collect();
        let wire = encode_rows(1, &rows).unwrap();
        assert_eq!(wire.columns[0].nulls.len(), 2);
        assert_eq!(wire.columns[0].ints.len(), 8);
        assert_eq!(decode_rows(1, &wire).unwrap(), rows);
    }

    #[test]
    fn inconsistent_rows_are_refused() {
        let mut wire = encode_rows(1, &[vec![Value::Int(1)], vec![Value::Int(2)]]).unwrap();
        wire.count = 3;
        let err = decode_rows(1, &wire).unwrap_err().to_string();
        assert!(err.contains("2 values and 0 nulls for 3 rows"), "{err}");
        assert!(decode_rows(2, &wire).is_err());
    }

    #[test]
    fn expressions_round_trip() {
        let sql = "SELECT p.pno FROM patient p WHERE (p.surname LIKE 'S%' OR NOT p.dob BETWEEN 1 AND 2) \
                   AND p.pno IN (1, 2) AND p.add1 IS NOT NULL AND lower(p.title) = 'mr' AND -p.gp < 3 + 4";
        let (_, stmts) = snaps_mapping::parse(sql).unwrap();
        let snaps_mapping::ir::Statement::Select(s) = &stmts[0] else {
            panic!("not a select")
        };
        let q = s.qual.clone().unwrap();
        assert_eq!(decode_expr(&encode_expr(&q)).unwrap(), q);
    }

    #[test]
    fn an_empty_expression_is_malformed() {
        let err = decode_expr(&v1::Expr { kind: None }).unwrap_err();
        assert_eq!(err.to_string(), "malformed message: empty expression");
    }
}
