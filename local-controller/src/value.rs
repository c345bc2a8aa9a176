//! Values between SNAPS and SQLite.
//!
//! SNAPS values ([`Value`]) have the four shapes SQLite stores: NULL, integer,
//! real and text, so the conversion is one-to-one. SQLite's fifth storage
//! class, the blob, has no SNAPS type: a blob found in a site's relation (put
//! there by a program writing to the file directly) is refused with a message
//! rather than guessed at.

use rusqlite::types::{Value as SqlValue, ValueRef};
use snaps_schema::Value;

use crate::{Error, Result};

/// The SQLite value for a SNAPS value: `Int` → INTEGER, `Float` → REAL,
/// `Text` → TEXT, `Null` → NULL.
pub fn to_sqlite(value: &Value) -> SqlValue {
    match value {
        Value::Null => SqlValue::Null,
        Value::Int(i) => SqlValue::Integer(*i),
        Value::Float(f) => SqlValue::Real(*f),
        Value::Text(s) => SqlValue::Text(s.clone()),
    }
}

/// The SNAPS value for a value read from SQLite. Fails for a blob and for
/// text that is not UTF-8; `what` names the attribute in the message.
pub fn from_sqlite(value: ValueRef<'_>, what: &str) -> Result<Value> {
    match value {
        ValueRef::Null => Ok(Value::Null),
        ValueRef::Integer(i) => Ok(Value::Int(i)),
        ValueRef::Real(f) => Ok(Value::Float(f)),
        ValueRef::Text(bytes) => match std::str::from_utf8(bytes) {
            Ok(s) => Ok(Value::text(s)),
            Err(e) => Err(Error::Invalid(format!(
                "{what} holds text that is not UTF-8: {e}"
            ))),
        },
        ValueRef::Blob(b) => Err(Error::Invalid(format!(
            "{what} holds a blob of {} bytes; SNAPS attributes are i2, i4, f4 or cN",
            b.len()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_snaps_value_round_trips() {
        for v in [
            Value::Null,
            Value::Int(-32768),
            Value::Float(1.5),
            Value::text("O'Brien"),
        ] {
            let sql = to_sqlite(&v);
            let back = from_sqlite(ValueRef::from(&sql), "t.a").unwrap();
            assert_eq!(format!("{back:?}"), format!("{v:?}"));
        }
    }

    #[test]
    fn blobs_and_bad_text_are_refused_naming_the_attribute() {
        let e = from_sqlite(ValueRef::Blob(&[1, 2, 3]), "patient.surname").unwrap_err();
        assert_eq!(
            e.to_string(),
            "patient.surname holds a blob of 3 bytes; SNAPS attributes are i2, i4, f4 or cN"
        );
        let e = from_sqlite(ValueRef::Text(&[0xff]), "patient.surname").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("patient.surname holds text that is not UTF-8"),
            "{e}"
        );
    }
}
