//! Who may be the same person at several sites: the `[identity]` section of
//! `network.toml`.
//!
//! The same person registered at two sites has two patient numbers, one per
//! site. `snaps_match` compares a patient's record in the global snapshot
//! with the other sites' records and grades the likely matches; this section
//! says which global relation holds people, and which of its attributes
//! carry the surname, the first names, the date of birth (`YYYYMMDD` as an
//! integer), the sex and the address. Only those attributes are compared,
//! and only as the sites map them.

use serde::{Deserialize, Serialize};

use crate::{Catalog, Error, Result, ValueType};

/// `[identity]` of `network.toml`, as written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// The global relation of people (`patient`).
    pub relation: String,
    /// Its surname attribute.
    pub surname: String,
    /// Its first-names attribute (given names, space-separated).
    pub first_names: String,
    /// Its date-of-birth attribute, an integer `YYYYMMDD`.
    pub dob: String,
    /// Its sex attribute, if it has one.
    #[serde(default)]
    pub sex: Option<String>,
    /// Its address attributes, first line first.
    #[serde(default)]
    pub address: Vec<String>,
}

/// `[identity]` checked against the global schema.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentitySpec {
    /// The global relation of people.
    pub relation: String,
    /// Its key attribute (one attribute: a patient number).
    pub key: String,
    /// The surname attribute.
    pub surname: String,
    /// The first-names attribute.
    pub first_names: String,
    /// The date-of-birth attribute.
    pub dob: String,
    /// The sex attribute.
    pub sex: Option<String>,
    /// The address attributes.
    pub address: Vec<String>,
}

impl IdentitySpec {
    /// The compared attributes in a fixed order: surname, first names, date
    /// of birth, then sex (if any) and the address lines.
    pub fn attributes(&self) -> Vec<&str> {
        let mut out = vec![
            self.surname.as_str(),
            self.first_names.as_str(),
            self.dob.as_str(),
        ];
        out.extend(self.sex.as_deref());
        out.extend(self.address.iter().map(String::as_str));
        out
    }
}

impl IdentityConfig {
    /// Checks the section against the global schema: the relation exists and
    /// has a one-attribute integer key, every named attribute exists, the names and
    /// address are text and the date of birth an integer.
    pub fn spec(&self, global: &Catalog) -> Result<IdentitySpec> {
        let fail = |m: String| Error::Catalog(format!("identity: {m}"));
        let rel = global
            .relation(&self.relation)
            .ok_or_else(|| fail(format!("{} is not a global relation", self.relation)))?;
        let [key] = rel.key.as_slice() else {
            return Err(fail(format!(
                "{} must have a key of one attribute (a patient number), not ({})",
                self.relation,
                rel.key.join(", ")
            )));
        };
        let typed = |attr: &str, text: bool| -> Result<()> {
            let a = rel
                .attribute(attr)
                .ok_or_else(|| fail(format!("{} has no attribute {attr}", self.relation)))?;
            let is_text = matches!(a.ty, ValueType::Char(_));
            let is_int = matches!(a.ty, ValueType::Int2 | ValueType::Int4);
            match (text, is_text, is_int) {
                (true, true, _) | (false, _, true) => Ok(()),
                (true, ..) => Err(fail(format!("{}.{attr} must be text", self.relation))),
                (false, ..) => Err(fail(format!(
                    "{}.{attr} must be an integer YYYYMMDD",
                    self.relation
                ))),
            }
        };
        // Links between records keep the keys as integers.
        if !rel
            .attribute(key)
            .is_some_and(|a| matches!(a.ty, ValueType::Int2 | ValueType::Int4))
        {
            return Err(fail(format!(
                "{}.{key}, the key, must be an integer (a patient number)",
                self.relation
            )));
        }
        typed(&self.surname, true)?;
        typed(&self.first_names, true)?;
        typed(&self.dob, false)?;
        if let Some(s) = &self.sex {
            typed(s, true)?;
        }
        for a in &self.address {
            typed(a, true)?;
        }
        Ok(IdentitySpec {
            relation: self.relation.clone(),
            key: key.clone(),
            surname: self.surname.clone(),
            first_names: self.first_names.clone(),
            dob: self.dob.clone(),
            sex: self.sex.clone(),
            address: self.address.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalog() -> Catalog {
        Catalog::from_ddl(
            "CREATE TABLE patient (pno i4, surname c22, first_names c24, dob i4, sex c1, \
             add1 c20, PRIMARY KEY (pno));
             CREATE TABLE pair (a i4, b i4, PRIMARY KEY (a, b));
             CREATE TABLE person (code c8, surname c22, first_names c24, dob i4, sex c1, \
             add1 c20, PRIMARY KEY (code));",
        )
        .unwrap()
    }

    fn config() -> IdentityConfig {
        IdentityConfig {
            relation: "patient".into(),
            surname: "surname".into(),
            first_names: "first_names".into(),
            dob: "dob".into(),
            sex: Some("sex".into()),
            address: vec!["add1".into()],
        }
    }

    #[test]
    fn a_checked_section_names_the_key() {
        let spec = config().spec(&catalog()).unwrap();
        assert_eq!(spec.key, "pno");
        assert_eq!(
            spec.attributes(),
            ["surname", "first_names", "dob", "sex", "add1"]
        );
    }

    #[test]
    fn wrong_sections_are_refused_naming_what_is_wrong() {
        type Change = Box<dyn Fn(&mut IdentityConfig)>;
        let cases: Vec<(Change, &str)> = vec![
            (
                Box::new(|c| c.relation = "people".into()),
                "people is not a global relation",
            ),
            (
                Box::new(|c| c.relation = "pair".into()),
                "key of one attribute",
            ),
            (
                Box::new(|c| c.relation = "person".into()),
                "person.code, the key, must be an integer",
            ),
            (
                Box::new(|c| c.surname = "name".into()),
                "has no attribute name",
            ),
            (
                Box::new(|c| c.dob = "surname".into()),
                "surname must be an integer",
            ),
            (
                Box::new(|c| c.first_names = "dob".into()),
                "dob must be text",
            ),
        ];
        for (change, expected) in cases {
            let mut c = config();
            change(&mut c);
            let e = c.spec(&catalog()).unwrap_err().to_string();
            assert!(e.contains(expected), "{e}");
        }
    }
}
