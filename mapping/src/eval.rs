//! A reference evaluator of IR expressions with SQLite's semantics. SNAPS uses
//! it to reason about predicates (does a constant satisfy a snapshot's
//! selection?) and tests use it as an oracle; it is not the site's query
//! engine — SQLite is.

use std::cmp::Ordering;

use snaps_schema::{Value, ValueType};

use crate::ir::{BinOp, ColumnRef, Expr};

/// Why an expression could not be evaluated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EvalError {
    /// An attribute the binding does not provide.
    Unbound(String),
    /// A function the evaluator does not implement (aggregates included).
    Function(String),
}

/// SQLite's truth of a value: NULL is unknown, numbers are true when
/// non-zero, text is read as a number.
pub fn truth(v: &Value) -> Option<bool> {
    match v {
        Value::Null => None,
        Value::Int(i) => Some(*i != 0),
        Value::Float(f) => Some(*f != 0.0),
        Value::Text(s) => Some(numeric_prefix(s) != 0.0),
    }
}

fn numeric_prefix(s: &str) -> f64 {
    let t = s.trim_start();
    let end = t
        .char_indices()
        .take_while(|(i, c)| {
            c.is_ascii_digit() || *c == '.' || (*i == 0 && (*c == '-' || *c == '+'))
        })
        .map(|(i, c)| i + c.len_utf8())
        .last()
        .unwrap_or(0);
    t[..end].parse().unwrap_or(0.0)
}

fn boolean(b: Option<bool>) -> Value {
    b.map_or(Value::Null, |b| Value::Int(b as i64))
}

fn number(v: &Value) -> Option<Value> {
    match v {
        Value::Null => None,
        Value::Int(_) | Value::Float(_) => Some(v.clone()),
        Value::Text(s) => {
            let f = numeric_prefix(s);
            Some(if f.fract() == 0.0 && f.abs() < 9e15 {
                Value::Int(f as i64)
            } else {
                Value::Float(f)
            })
        }
    }
}

fn as_text(v: &Value) -> Option<String> {
    match v {
        Value::Null => None,
        Value::Int(i) => Some(i.to_string()),
        Value::Float(f) => Some(f.to_string()),
        Value::Text(s) => Some(s.clone()),
    }
}

/// SQLite's LIKE: `%` any run, `_` one character, ASCII case-insensitive.
pub fn like(text: &str, pattern: &str) -> bool {
    fn go(t: &[char], p: &[char]) -> bool {
        match p.first() {
            None => t.is_empty(),
            Some('%') => (0..=t.len()).any(|i| go(&t[i..], &p[1..])),
            Some('_') => !t.is_empty() && go(&t[1..], &p[1..]),
            Some(c) => t.first().is_some_and(|x| x.eq_ignore_ascii_case(c)) && go(&t[1..], &p[1..]),
        }
    }
    let t: Vec<char> = text.chars().collect();
    let p: Vec<char> = pattern.chars().collect();
    go(&t, &p)
}

fn arith(op: BinOp, a: &Value, b: &Value) -> Value {
    let (Some(a), Some(b)) = (number(a), number(b)) else {
        return Value::Null;
    };
    match (a, b) {
        (Value::Int(x), Value::Int(y)) => match op {
            BinOp::Plus => x
                .checked_add(y)
                .map_or(Value::Float(x as f64 + y as f64), Value::Int),
            BinOp::Minus => x
                .checked_sub(y)
                .map_or(Value::Float(x as f64 - y as f64), Value::Int),
            BinOp::Multiply => x
                .checked_mul(y)
                .map_or(Value::Float(x as f64 * y as f64), Value::Int),
            BinOp::Divide => x.checked_div(y).map_or(Value::Null, Value::Int),
            _ => x.checked_rem(y).map_or(Value::Null, Value::Int),
        },
        (x, y) => {
            let f = |v: Value| match v {
                Value::Int(i) => i as f64,
                Value::Float(f) => f,
                _ => 0.0,
            };
            let (x, y) = (f(x), f(y));
            match op {
                BinOp::Plus => Value::Float(x + y),
                BinOp::Minus => Value::Float(x - y),
                BinOp::Multiply => Value::Float(x * y),
                BinOp::Divide if y != 0.0 => Value::Float(x / y),
                BinOp::Modulo if y as i64 != 0 => Value::Float((x as i64 % y as i64) as f64),
                _ => Value::Null,
            }
        }
    }
}

/// Evaluates `e`, reading attributes through `row`.
pub fn eval(e: &Expr, row: &dyn Fn(&ColumnRef) -> Option<Value>) -> Result<Value, EvalError> {
    let ev = |x: &Expr| eval(x, row);
    Ok(match e {
        Expr::Column(c) => row(c).ok_or_else(|| EvalError::Unbound(c.to_string()))?,
        Expr::Literal(v) => v.clone(),
        Expr::Binary {
            op: BinOp::And,
            left,
            right,
        } => {
            let (l, r) = (truth(&ev(left)?), truth(&ev(right)?));
            boolean(match (l, r) {
                (Some(false), _) | (_, Some(false)) => Some(false),
                (Some(true), Some(true)) => Some(true),
                _ => None,
            })
        }
        Expr::Binary {
            op: BinOp::Or,
            left,
            right,
        } => {
            let (l, r) = (truth(&ev(left)?), truth(&ev(right)?));
            boolean(match (l, r) {
                (Some(true), _) | (_, Some(true)) => Some(true),
                (Some(false), Some(false)) => Some(false),
                _ => None,
            })
        }
        Expr::Binary { op, left, right } if op.is_comparison() => {
            let ord = ev(left)?.sql_cmp(&ev(right)?);
            boolean(ord.map(|o| match op {
                BinOp::Eq => o == Ordering::Equal,
                BinOp::NotEq => o != Ordering::Equal,
                BinOp::Lt => o == Ordering::Less,
                BinOp::LtEq => o != Ordering::Greater,
                BinOp::Gt => o == Ordering::Greater,
                _ => o != Ordering::Less,
            }))
        }
        Expr::Binary {
            op: BinOp::Concat,
            left,
            right,
        } => match (as_text(&ev(left)?), as_text(&ev(right)?)) {
            (Some(a), Some(b)) => Value::Text(a + &b),
            _ => Value::Null,
        },
        Expr::Binary { op, left, right } => arith(*op, &ev(left)?, &ev(right)?),
        Expr::Not(x) => boolean(truth(&ev(x)?).map(|b| !b)),
        Expr::Neg(x) => arith(BinOp::Minus, &Value::Int(0), &ev(x)?),
        Expr::IsNull { expr, negated } => boolean(Some(ev(expr)?.is_null() != *negated)),
        Expr::InList {
            expr,
            list,
            negated,
        } => {
            let v = ev(expr)?;
            if v.is_null() {
                return Ok(Value::Null);
            }
            let mut saw_null = false;
            let mut found = false;
            for x in list {
                match v.sql_cmp(&ev(x)?) {
                    None => saw_null = true,
                    Some(Ordering::Equal) => found = true,
                    Some(_) => {}
                }
            }
            let r = if found {
                Some(true)
            } else if saw_null {
                None
            } else {
                Some(false)
            };
            boolean(r.map(|b| b != *negated))
        }
        Expr::Between {
            expr,
            low,
            high,
            negated,
        } => {
            let v = ev(expr)?;
            let lo = v.sql_cmp(&ev(low)?).map(|o| o != Ordering::Less);
            let hi = v.sql_cmp(&ev(high)?).map(|o| o != Ordering::Greater);
            let r = match (lo, hi) {
                (Some(false), _) | (_, Some(false)) => Some(false),
                (Some(true), Some(true)) => Some(true),
                _ => None,
            };
            boolean(r.map(|b| b != *negated))
        }
        Expr::Like {
            expr,
            pattern,
            negated,
        } => match (as_text(&ev(expr)?), as_text(&ev(pattern)?)) {
            (Some(t), Some(p)) => boolean(Some(like(&t, &p) != *negated)),
            _ => Value::Null,
        },
        Expr::Function { name, args, .. } => {
            let vals = args.iter().map(ev).collect::<Result<Vec<_>, _>>()?;
            function(name, &vals)?
        }
    })
}

fn function(name: &str, args: &[Value]) -> Result<Value, EvalError> {
    let text = |i: usize| args.get(i).and_then(as_text);
    Ok(match (name, args.len()) {
        ("lower", 1) => text(0).map_or(Value::Null, |s| Value::Text(s.to_ascii_lowercase())),
        ("upper", 1) => text(0).map_or(Value::Null, |s| Value::Text(s.to_ascii_uppercase())),
        ("length", 1) => text(0).map_or(Value::Null, |s| Value::Int(s.chars().count() as i64)),
        ("trim", 1) => text(0).map_or(Value::Null, |s| {
            Value::Text(s.trim_matches(' ').to_string())
        }),
        ("ltrim", 1) => text(0).map_or(Value::Null, |s| {
            Value::Text(s.trim_start_matches(' ').to_string())
        }),
        ("rtrim", 1) => text(0).map_or(Value::Null, |s| {
            Value::Text(s.trim_end_matches(' ').to_string())
        }),
        ("abs", 1) => match number(&args[0]) {
            Some(Value::Int(i)) => i.checked_abs().map_or(Value::Null, Value::Int),
            Some(Value::Float(f)) => Value::Float(f.abs()),
            _ => Value::Null,
        },
        ("coalesce" | "ifnull", n) if n >= 1 => args
            .iter()
            .find(|v| !v.is_null())
            .cloned()
            .unwrap_or(Value::Null),
        ("substr", 2 | 3) => {
            let (Some(s), Some(Value::Int(start))) = (text(0), number(&args[1])) else {
                return Ok(Value::Null);
            };
            let chars: Vec<char> = s.chars().collect();
            let len = match args.get(2).and_then(number) {
                Some(Value::Int(l)) => l.max(0) as usize,
                Some(_) => return Ok(Value::Null),
                None if args.len() == 3 => return Ok(Value::Null),
                None => chars.len(),
            };
            let from = if start > 0 { (start - 1) as usize } else { 0 };
            Value::Text(chars.iter().skip(from).take(len).collect())
        }
        _ => return Err(EvalError::Function(name.to_string())),
    })
}

/// Applies SQLite's column affinity to every constant compared with an
/// attribute (`=`, `<>`, `<`, ..., `IN`, `BETWEEN`), wherever it sits in the
/// expression: `pno = '17'` on an integer attribute becomes `pno = 17`.
/// Returns `None` when a constant cannot take the attribute's type (SQLite
/// would then compare across storage classes) or an attribute's type is
/// unknown to `ty`.
pub fn coerce_constants(e: &Expr, ty: &dyn Fn(&ColumnRef) -> Option<ValueType>) -> Option<Expr> {
    let co = |c: &ColumnRef, x: &Expr| -> Option<Expr> {
        match x {
            Expr::Literal(v) => ty(c)?.coerce_constant(v).map(Expr::Literal),
            other => coerce_constants(other, ty),
        }
    };
    let rec = |x: &Expr| coerce_constants(x, ty).map(Box::new);
    Some(match e {
        Expr::Binary { op, left, right } if op.is_comparison() => {
            match (left.as_ref(), right.as_ref()) {
                (Expr::Column(c), other) => {
                    Expr::binary(*op, Expr::Column(c.clone()), co(c, other)?)
                }
                (other, Expr::Column(c)) => {
                    Expr::binary(*op, co(c, other)?, Expr::Column(c.clone()))
                }
                _ => Expr::Binary {
                    op: *op,
                    left: rec(left)?,
                    right: rec(right)?,
                },
            }
        }
        Expr::Binary { op, left, right } => Expr::Binary {
            op: *op,
            left: rec(left)?,
            right: rec(right)?,
        },
        Expr::InList {
            expr,
            list,
            negated,
        } => match expr.as_ref() {
            Expr::Column(c) => Expr::InList {
                expr: expr.clone(),
                list: list.iter().map(|x| co(c, x)).collect::<Option<_>>()?,
                negated: *negated,
            },
            _ => Expr::InList {
                expr: rec(expr)?,
                list: list
                    .iter()
                    .map(|x| coerce_constants(x, ty))
                    .collect::<Option<_>>()?,
                negated: *negated,
            },
        },
        Expr::Between {
            expr,
            low,
            high,
            negated,
        } => match expr.as_ref() {
            Expr::Column(c) => Expr::Between {
                expr: expr.clone(),
                low: Box::new(co(c, low)?),
                high: Box::new(co(c, high)?),
                negated: *negated,
            },
            _ => Expr::Between {
                expr: rec(expr)?,
                low: rec(low)?,
                high: rec(high)?,
                negated: *negated,
            },
        },
        Expr::Not(x) => Expr::Not(rec(x)?),
        Expr::Neg(x) => Expr::Neg(rec(x)?),
        Expr::IsNull { expr, negated } => Expr::IsNull {
            expr: rec(expr)?,
            negated: *negated,
        },
        Expr::Like {
            expr,
            pattern,
            negated,
        } => Expr::Like {
            expr: rec(expr)?,
            pattern: rec(pattern)?,
            negated: *negated,
        },
        Expr::Function {
            name,
            args,
            distinct,
        } => Expr::Function {
            name: name.clone(),
            args: args
                .iter()
                .map(|x| coerce_constants(x, ty))
                .collect::<Option<_>>()?,
            distinct: *distinct,
        },
        Expr::Column(_) | Expr::Literal(_) => e.clone(),
    })
}

/// Evaluates a predicate as a filter: true only when SQLite would keep the row.
pub fn holds(e: &Expr, row: &dyn Fn(&ColumnRef) -> Option<Value>) -> Result<bool, EvalError> {
    Ok(truth(&eval(e, row)?) == Some(true))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::Statement;

    fn check(pred: &str, binding: &[(&str, Value)]) -> Option<bool> {
        let Statement::Select(s) = crate::sql::parse(&format!("SELECT 1 FROM t WHERE {pred}"))
            .unwrap()
            .remove(0)
        else {
            panic!()
        };
        let q = s.qual.unwrap();
        let row = |c: &ColumnRef| {
            binding
                .iter()
                .find(|(n, _)| *n == c.attr)
                .map(|(_, v)| v.clone())
        };
        truth(&eval(&q, &row).unwrap())
    }

    #[test]
    fn three_valued_logic_like_sqlite() {
        let n = [
            ("a", Value::Null),
            ("b", Value::Int(2)),
            ("s", Value::text("MacIntosh")),
        ];
        assert_eq!(check("a = 1", &n), None);
        assert_eq!(check("a = 1 OR b = 2", &n), Some(true));
        assert_eq!(check("a = 1 AND b = 3", &n), Some(false));
        assert_eq!(check("NOT a = 1", &n), None);
        assert_eq!(check("b IN (1, NULL)", &n), None);
        assert_eq!(check("b NOT IN (1, 3)", &n), Some(true));
        assert_eq!(check("b BETWEEN 1 AND 2", &n), Some(true));
        assert_eq!(check("s LIKE 'mac%'", &n), Some(true));
        assert_eq!(check("s LIKE 'M_c%h'", &n), Some(true));
        assert_eq!(check("lower(s) = 'macintosh'", &n), Some(true));
        assert_eq!(check("b / 0 IS NULL", &n), Some(true));
        assert_eq!(check("s > 5", &n), Some(true), "text sorts above numbers");
        assert_eq!(
            check("substr(s, 1, 3) = 'Mac' AND length(s) = 9", &n),
            Some(true)
        );
    }
}
