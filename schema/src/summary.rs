//! Summaries: what a site may know of the other sites' data without asking.
//!
//! The global snapshot changes only at an epoch's commit, so at every
//! distribution the controller can tell each site, as of that epoch:
//!
//! * **key summaries** — for an integer attribute whose values are drawn from
//!   a relation's key ranges (`visit.pno` holds patient numbers), the exact set
//!   of values *in the site's own range* that tuples owned by other sites hold.
//!   A value of the site's range outside the set is held by no other site's
//!   tuple: a fetch selecting `visit.pno = 1000042` of a site whose range holds
//!   1000042 brings nothing unless the summary lists it.
//! * **lookup summaries** — for a set of attributes an administrator declares
//!   (`patient(surname, first_names)`), a [`fingerprint`] of every combination
//!   of values held by other sites' tuples. Fingerprints of different values
//!   may collide (a wrong "maybe", one extra fetch), but a combination held
//!   elsewhere always has its fingerprint in the set: "absent" is never wrong.
//!
//! Both are declared in `network.toml`'s `[summaries]` and can be switched off
//! there; with them off every answer is the same, only fetched.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{Catalog, Error, Result, Value, ValueType};

/// `[summaries]` of `network.toml`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SummaryConfig {
    /// Send the key summaries (default on when any is declared).
    #[serde(default = "yes")]
    pub keys_enabled: bool,
    /// Send the lookup summaries (default on when any is declared).
    #[serde(default = "yes")]
    pub lookups_enabled: bool,
    /// `"relation.attribute" = "relation whose key ranges its values come
    /// from"`, e.g. `"visit.pno" = "patient"`.
    #[serde(default)]
    pub keys: BTreeMap<String, String>,
    /// Per global relation, the attribute sets looked up together, e.g.
    /// `patient = [["surname", "first_names"], ["dob"]]`.
    #[serde(default)]
    pub lookup: BTreeMap<String, Vec<Vec<String>>>,
}

fn yes() -> bool {
    true
}

/// One summary the controller maintains for each site.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SummarySpec {
    /// Key or lookup.
    pub kind: SummaryKind,
    /// Global relation.
    pub relation: String,
    /// Global attributes (one for a key summary).
    pub attributes: Vec<String>,
    /// For a key summary: the relation whose key ranges the values come from.
    pub range_of: Option<String>,
}

/// The two kinds of summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum SummaryKind {
    /// Exact: own key values other sites' tuples hold.
    Keys,
    /// Fingerprints of value combinations other sites' tuples hold.
    Lookup,
}

impl SummarySpec {
    /// The summary's name, as sites store and the audit trail records it:
    /// `visit.pno` or `patient(surname,first_names)`.
    pub fn name(&self) -> String {
        match self.kind {
            SummaryKind::Keys => format!("{}.{}", self.relation, self.attributes.join(",")),
            SummaryKind::Lookup => format!("{}({})", self.relation, self.attributes.join(",")),
        }
    }
}

impl SummaryConfig {
    /// The summaries in effect (the enabled kinds), checked against the
    /// global schema: relations and attributes exist, key-summary attributes
    /// are integers.
    pub fn specs(&self, global: &Catalog) -> Result<Vec<SummarySpec>> {
        let mut out = Vec::new();
        for (qualified, range_of) in &self.keys {
            let Some((relation, attribute)) = qualified.split_once('.') else {
                return Err(Error::Catalog(format!(
                    "summaries.keys: {qualified:?} is not relation.attribute"
                )));
            };
            let ty = attribute_type(global, relation, attribute, "summaries.keys")?;
            if !ty.is_integer() {
                return Err(Error::Catalog(format!(
                    "summaries.keys: {qualified} is {ty}, not an integer: key ranges hold integers"
                )));
            }
            if global.relation(range_of).is_none() {
                return Err(Error::Catalog(format!(
                    "summaries.keys: {qualified} takes its values from {range_of}, which is not a global relation"
                )));
            }
            if self.keys_enabled {
                out.push(SummarySpec {
                    kind: SummaryKind::Keys,
                    relation: relation.to_string(),
                    attributes: vec![attribute.to_string()],
                    range_of: Some(range_of.clone()),
                });
            }
        }
        for (relation, sets) in &self.lookup {
            for attributes in sets {
                if attributes.is_empty() {
                    return Err(Error::Catalog(format!(
                        "summaries.lookup.{relation}: an empty attribute list"
                    )));
                }
                for a in attributes {
                    attribute_type(global, relation, a, "summaries.lookup")?;
                }
                let mut sorted = attributes.clone();
                sorted.sort();
                sorted.dedup();
                if sorted.len() != attributes.len() {
                    return Err(Error::Catalog(format!(
                        "summaries.lookup.{relation}: {} names an attribute twice",
                        attributes.join(", ")
                    )));
                }
                if self.lookups_enabled {
                    out.push(SummarySpec {
                        kind: SummaryKind::Lookup,
                        relation: relation.clone(),
                        attributes: attributes.clone(),
                        range_of: None,
                    });
                }
            }
        }
        Ok(out)
    }
}

fn attribute_type(
    global: &Catalog,
    relation: &str,
    attribute: &str,
    what: &str,
) -> Result<ValueType> {
    let rel = global
        .relation(relation)
        .ok_or_else(|| Error::Catalog(format!("{what}: {relation} is not a global relation")))?;
    rel.attribute(attribute)
        .map(|a| a.ty)
        .ok_or_else(|| Error::Catalog(format!("{what}: {relation} has no attribute {attribute}")))
}

/// A value as a summary compares it: the constant coerced to the
/// attribute's type as SQLite's affinity would, integral reals as integers.
/// `None` when no tuple's value could equal it in a way the summary can
/// vouch for (NULL, or a constant that does not coerce).
pub fn normalise(ty: ValueType, value: &Value) -> Option<Value> {
    match ty.coerce_constant(value)? {
        Value::Null => None,
        Value::Float(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Some(Value::Int(f as i64)),
        // A non-integral real never equals an integer attribute's value; the
        // summary does not speak for real-typed attributes at all.
        Value::Float(_) => None,
        v => Some(v),
    }
}

/// The 32-bit fingerprint of a combination of (normalised) values: the low
/// half of XXH3-64 over a self-delimiting encoding, stable across machines
/// and versions (the controller and every site must agree on it).
pub fn fingerprint(values: &[Value]) -> u32 {
    let mut bytes = Vec::with_capacity(32);
    for v in values {
        match v {
            Value::Null => bytes.push(0),
            Value::Int(i) => {
                bytes.push(1);
                bytes.extend_from_slice(&i.to_le_bytes());
            }
            Value::Float(f) => {
                bytes.push(2);
                bytes.extend_from_slice(&f.to_bits().to_le_bytes());
            }
            Value::Text(s) => {
                bytes.push(3);
                bytes.extend_from_slice(&(s.len() as u64).to_le_bytes());
                bytes.extend_from_slice(s.as_bytes());
            }
        }
    }
    xxhash_rust::xxh3::xxh3_64(&bytes) as u32
}

/// Encodes a sorted set of non-negative numbers as the gaps between them in
/// LEB128 varints: a dense set of keys costs about a byte a value.
pub fn encode_sorted(values: &[u64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * 2);
    let mut last = 0u64;
    for (i, &v) in values.iter().enumerate() {
        let mut gap = if i == 0 { v } else { v - last };
        last = v;
        loop {
            let byte = (gap & 0x7f) as u8;
            gap >>= 7;
            if gap == 0 {
                out.push(byte);
                break;
            }
            out.push(byte | 0x80);
        }
    }
    out
}

/// Decodes [`encode_sorted`]; an error for a truncated or overlong varint or
/// a set that is not strictly increasing.
pub fn decode_sorted(bytes: &[u8]) -> Result<Vec<u64>> {
    let mut out = Vec::new();
    let mut i = 0;
    let mut last: Option<u64> = None;
    while i < bytes.len() {
        let mut gap = 0u64;
        let mut shift = 0;
        loop {
            let Some(&b) = bytes.get(i) else {
                return Err(Error::Parse("summary set: a truncated number".into()));
            };
            i += 1;
            if shift > 63 {
                return Err(Error::Parse(
                    "summary set: a number of more than 64 bits".into(),
                ));
            }
            gap |= u64::from(b & 0x7f) << shift;
            shift += 7;
            if b & 0x80 == 0 {
                break;
            }
        }
        let v = match last {
            None => gap,
            Some(l) if gap > 0 => l
                .checked_add(gap)
                .ok_or_else(|| Error::Parse("summary set: a number of more than 64 bits".into()))?,
            Some(_) => return Err(Error::Parse("summary set: a value repeated".into())),
        };
        out.push(v);
        last = Some(v);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn sorted_sets_round_trip(mut v in proptest::collection::vec(any::<u64>(), 0..200)) {
            v.sort();
            v.dedup();
            prop_assert_eq!(decode_sorted(&encode_sorted(&v)).unwrap(), v);
        }
    }

    #[test]
    fn dense_keys_cost_a_byte_each() {
        let keys: Vec<u64> = (1_000_000..1_001_000).step_by(3).collect();
        assert_eq!(encode_sorted(&keys).len(), keys.len() + 2);
    }

    #[test]
    fn bad_sets_are_refused() {
        assert!(decode_sorted(&[0x80]).is_err());
        assert!(decode_sorted(&[5, 0]).is_err());
        assert!(decode_sorted(&[0xff; 11]).is_err());
    }

    #[test]
    fn fingerprints_follow_values_not_spelling() {
        let a = fingerprint(&[Value::text("Smith"), Value::text("John")]);
        assert_eq!(a, fingerprint(&[Value::text("Smith"), Value::text("John")]));
        assert_ne!(a, fingerprint(&[Value::text("SmithJ"), Value::text("ohn")]));
        // Fixed for good: sites and controllers of any version agree.
        assert_eq!(fingerprint(&[Value::Int(19340512)]), 3_439_168_647);
        let ty = ValueType::Int4;
        assert_eq!(
            normalise(ty, &Value::text("19340512")),
            Some(Value::Int(19340512))
        );
        assert_eq!(normalise(ty, &Value::Float(7.0)), Some(Value::Int(7)));
        assert_eq!(normalise(ty, &Value::Float(7.5)), None);
        assert_eq!(normalise(ty, &Value::Null), None);
        assert_eq!(
            normalise(ValueType::Char(4), &Value::Int(12)),
            Some(Value::text("12"))
        );
    }
}
