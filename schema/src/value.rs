//! Attribute types of the thesis (`i2`, `i4`, `f4`, `cN`) and the values tuples
//! carry. Comparison follows SQLite, the engine at every site: NULL is below
//! everything, numbers compare by value whatever their storage class, and every
//! number sorts below every text; text compares byte-wise (SQLite's BINARY).

use std::cmp::Ordering;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The type of an attribute, with its width.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ValueType {
    /// `i2`: a 16-bit integer (`SMALLINT`).
    Int2,
    /// `i4`: a 32-bit integer (`INTEGER`).
    Int4,
    /// `f4`: a 32-bit float (`REAL`).
    Float4,
    /// `cN`: text of at most N characters (`CHAR(N)`).
    Char(u16),
}

impl ValueType {
    /// Reads a thesis type name: `i2`, `i4`, `f4`, `c22`.
    pub fn from_thesis(name: &str) -> Option<ValueType> {
        match name {
            "i2" => Some(ValueType::Int2),
            "i4" => Some(ValueType::Int4),
            "f4" => Some(ValueType::Float4),
            _ => {
                let n = name.strip_prefix('c')?.parse::<u16>().ok()?;
                (n > 0).then_some(ValueType::Char(n))
            }
        }
    }

    /// True for `i2` and `i4`.
    pub fn is_integer(self) -> bool {
        matches!(self, ValueType::Int2 | ValueType::Int4)
    }

    /// True for the numeric types.
    pub fn is_numeric(self) -> bool {
        !matches!(self, ValueType::Char(_))
    }

    /// The SQL type written in DDL for this attribute type.
    pub fn sql_name(self) -> String {
        match self {
            ValueType::Int2 => "SMALLINT".into(),
            ValueType::Int4 => "INTEGER".into(),
            ValueType::Float4 => "REAL".into(),
            ValueType::Char(n) => format!("CHAR({n})"),
        }
    }

    /// Checks that `value` fits this type; `what` names the attribute in the
    /// error. Integers given as whole floats are accepted and made integers.
    pub fn check(self, value: Value, what: &str) -> Result<Value> {
        let bad = |v: &Value| Error::Value(format!("value {v} does not fit {what} ({self})"));
        match (self, value) {
            (_, Value::Null) => Ok(Value::Null),
            (ValueType::Int2, Value::Int(i)) if i16::try_from(i).is_ok() => Ok(Value::Int(i)),
            (ValueType::Int4, Value::Int(i)) if i32::try_from(i).is_ok() => Ok(Value::Int(i)),
            (t, Value::Float(f)) if t.is_integer() && f.fract() == 0.0 && f.abs() < 1e10 => {
                t.check(Value::Int(f as i64), what)
            }
            (ValueType::Float4, Value::Int(i)) if i.abs() < (1 << 24) => Ok(Value::Float(i as f64)),
            (ValueType::Float4, Value::Float(f)) if f.is_finite() && f.abs() <= f32::MAX as f64 => {
                Ok(Value::Float(f))
            }
            (ValueType::Char(n), Value::Text(s)) if s.chars().count() <= n as usize => {
                Ok(Value::Text(s))
            }
            (_, v) => Err(bad(&v)),
        }
    }

    /// Converts a constant the way SQLite's column affinity would before
    /// comparing it with a column of this type: numeric text becomes a number for
    /// a numeric column, a number becomes text for a text column. Returns `None`
    /// when SQLite would compare across storage classes (for example
    /// `pno = 'abc'`), which callers treat as "cannot reason about this".
    pub fn coerce_constant(self, value: &Value) -> Option<Value> {
        match (self.is_numeric(), value) {
            (_, Value::Null) => Some(Value::Null),
            (true, Value::Int(_) | Value::Float(_)) => Some(value.clone()),
            (true, Value::Text(s)) => {
                let t = s.trim();
                if let Ok(i) = t.parse::<i64>() {
                    Some(Value::Int(i))
                } else {
                    t.parse::<f64>()
                        .ok()
                        .filter(|f| f.is_finite())
                        .map(Value::Float)
                }
            }
            (false, Value::Text(_)) => Some(value.clone()),
            (false, Value::Int(i)) => Some(Value::Text(i.to_string())),
            (false, Value::Float(_)) => None,
        }
    }
}

impl fmt::Display for ValueType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ValueType::Int2 => f.write_str("i2"),
            ValueType::Int4 => f.write_str("i4"),
            ValueType::Float4 => f.write_str("f4"),
            ValueType::Char(n) => write!(f, "c{n}"),
        }
    }
}

/// A value in a tuple or a constant in a query.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Value {
    /// SQL NULL.
    Null,
    /// An integer of any SNAPS integer type.
    Int(i64),
    /// A floating point number.
    Float(f64),
    /// Text.
    Text(String),
}

impl Value {
    /// Shorthand for a text value.
    pub fn text(s: &str) -> Value {
        Value::Text(s.to_string())
    }

    /// True for NULL.
    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }

    fn class(&self) -> u8 {
        match self {
            Value::Null => 0,
            Value::Int(_) | Value::Float(_) => 1,
            Value::Text(_) => 2,
        }
    }

    /// SQL comparison: `None` when either side is NULL (the comparison is
    /// unknown), otherwise SQLite's order.
    pub fn sql_cmp(&self, other: &Value) -> Option<Ordering> {
        if self.is_null() || other.is_null() {
            None
        } else {
            Some(self.total_cmp(other))
        }
    }

    /// A total order for sorting and set membership: SQLite's order with NULL
    /// first.
    pub fn total_cmp(&self, other: &Value) -> Ordering {
        match (self, other) {
            (Value::Int(a), Value::Int(b)) => a.cmp(b),
            (Value::Int(a), Value::Float(b)) => (*a as f64).total_cmp(b),
            (Value::Float(a), Value::Int(b)) => a.total_cmp(&(*b as f64)),
            (Value::Float(a), Value::Float(b)) => a.total_cmp(b),
            (Value::Text(a), Value::Text(b)) => a.as_bytes().cmp(b.as_bytes()),
            _ => self.class().cmp(&other.class()),
        }
    }
}

impl PartialEq for Value {
    fn eq(&self, other: &Value) -> bool {
        self.total_cmp(other) == Ordering::Equal
    }
}

impl Eq for Value {}

impl PartialOrd for Value {
    fn partial_cmp(&self, other: &Value) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Value {
    fn cmp(&self, other: &Value) -> Ordering {
        self.total_cmp(other)
    }
}

impl fmt::Display for Value {
    /// SQL literal syntax: `NULL`, `42`, `1.5`, `'O''Brien'`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Null => f.write_str("NULL"),
            Value::Int(i) => write!(f, "{i}"),
            Value::Float(x) if x.fract() == 0.0 && x.abs() < 1e15 => write!(f, "{x:.1}"),
            Value::Float(x) => write!(f, "{x}"),
            Value::Text(s) => write!(f, "'{}'", s.replace('\'', "''")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widths_are_checked_with_the_attribute_named() {
        assert!(ValueType::Int2.check(Value::Int(32767), "p.gp").is_ok());
        let err = ValueType::Int2
            .check(Value::Int(32768), "patient.gp")
            .unwrap_err();
        assert_eq!(err.to_string(), "value 32768 does not fit patient.gp (i2)");
        assert!(
            ValueType::Int4
                .check(Value::Int(i32::MAX as i64 + 1), "x")
                .is_err()
        );
        assert!(ValueType::Char(2).check(Value::text("Dr"), "t").is_ok());
        assert!(ValueType::Char(2).check(Value::text("Mrs"), "t").is_err());
        assert!(ValueType::Char(4).check(Value::Int(3), "t").is_err());
        assert!(
            ValueType::Float4
                .check(Value::Float(f64::MAX), "t")
                .is_err()
        );
        assert_eq!(
            ValueType::Int4.check(Value::Float(7.0), "t").unwrap(),
            Value::Int(7)
        );
    }

    #[test]
    fn thesis_type_names_round_trip() {
        for name in ["i2", "i4", "f4", "c1", "c80"] {
            assert_eq!(ValueType::from_thesis(name).unwrap().to_string(), name);
        }
        assert_eq!(ValueType::from_thesis("c0"), None);
        assert_eq!(ValueType::from_thesis("i8"), None);
    }

    #[test]
    fn order_is_sqlite_order() {
        let mut v = vec![
            Value::text("b"),
            Value::Float(1.5),
            Value::Null,
            Value::Int(2),
            Value::text("B"),
            Value::Int(1),
        ];
        v.sort();
        assert_eq!(
            v,
            vec![
                Value::Null,
                Value::Int(1),
                Value::Float(1.5),
                Value::Int(2),
                Value::text("B"),
                Value::text("b")
            ]
        );
        assert_eq!(Value::Int(1).sql_cmp(&Value::Null), None);
        assert_eq!(Value::Int(2), Value::Float(2.0));
    }

    #[test]
    fn constants_are_coerced_like_column_affinity() {
        assert_eq!(
            ValueType::Int4.coerce_constant(&Value::text(" 42")),
            Some(Value::Int(42))
        );
        assert_eq!(ValueType::Int4.coerce_constant(&Value::text("Jones")), None);
        assert_eq!(
            ValueType::Char(8).coerce_constant(&Value::Int(19871212)),
            Some(Value::text("19871212"))
        );
    }

    #[test]
    fn literals_print_as_sql() {
        assert_eq!(Value::text("O'Brien").to_string(), "'O''Brien'");
        assert_eq!(Value::Float(2.0).to_string(), "2.0");
        assert_eq!(Value::Null.to_string(), "NULL");
    }
}
