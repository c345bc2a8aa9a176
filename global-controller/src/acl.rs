//! Access control and the audit trail (DESIGN.md, "Security and autonomy").
//!
//! A rule says what a site — or one user code at a site — may do with a
//! global relation: nothing, read (fetch) or write (fetch and lock). The
//! most specific rule applies: the user's, then the site's, then the
//! network's default (`[access] default` in global.toml). A denied request
//! is an error naming the relation, never an empty answer.
//!
//! Every fetch, lock, refresh push and rule change is appended to the audit
//! trail with the time, the site, the user code, the relations, the number
//! of tuples and, for a fetch, the keys of the patients returned. The store
//! keeps it append-only (triggers refuse UPDATE and DELETE).

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use snaps_proto::v1;

/// What a rule allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Right {
    /// No fetch, no lock.
    None,
    /// Fetch.
    Read,
    /// Fetch and lock.
    Write,
}

impl Right {
    /// The name stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Right::None => "none",
            Right::Read => "read",
            Right::Write => "write",
        }
    }

    /// Reads a stored name.
    pub fn parse(text: &str) -> Option<Right> {
        match text {
            "none" => Some(Right::None),
            "read" => Some(Right::Read),
            "write" => Some(Right::Write),
            _ => None,
        }
    }

    /// The wire form.
    pub fn to_wire(self) -> v1::Right {
        match self {
            Right::None => v1::Right::None,
            Right::Read => v1::Right::Read,
            Right::Write => v1::Right::Write,
        }
    }

    /// From the wire; `None` for an unspecified right.
    pub fn from_wire(r: i32) -> Option<Right> {
        match v1::Right::try_from(r) {
            Ok(v1::Right::None) => Some(Right::None),
            Ok(v1::Right::Read) => Some(Right::Read),
            Ok(v1::Right::Write) => Some(Right::Write),
            _ => None,
        }
    }
}

impl fmt::Display for Right {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who a rule is about: a relation, a site, and a user code at it (empty:
/// every user of the site).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Subject {
    /// The global relation.
    pub relation: String,
    /// The site code.
    pub site: String,
    /// The user code; empty for the whole site.
    pub user: String,
}

/// The rules in force.
#[derive(Debug, Clone)]
pub struct Acl {
    default: Right,
    rules: BTreeMap<Subject, Right>,
}

impl Acl {
    /// The rules, over a default for what no rule names.
    pub fn new(default: Right, rules: impl IntoIterator<Item = (Subject, Right)>) -> Acl {
        Acl {
            default,
            rules: rules.into_iter().collect(),
        }
    }

    /// The default right.
    pub fn default_right(&self) -> Right {
        self.default
    }

    /// A digest of the default and every rule (FNV-1a, the same in every
    /// process): a site compares it with the one of its last refresh to
    /// learn whether what it may read could have changed since.
    pub fn fingerprint(&self) -> u64 {
        let mut text = format!("default={}", self.default);
        for (s, r) in &self.rules {
            text.push_str(&format!("\n{}\t{}\t{}\t{r}", s.relation, s.site, s.user));
        }
        text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        })
    }

    /// Every rule.
    pub fn rules(&self) -> impl Iterator<Item = (&Subject, Right)> {
        self.rules.iter().map(|(s, r)| (s, *r))
    }

    /// Sets a rule.
    pub fn set(&mut self, subject: Subject, right: Right) {
        self.rules.insert(subject, right);
    }

    /// Removes a rule; whether there was one.
    pub fn remove(&mut self, subject: &Subject) -> bool {
        self.rules.remove(subject).is_some()
    }

    /// What `user` at `site` may do with `relation`.
    pub fn right(&self, relation: &str, site: &str, user: &str) -> Right {
        let key = |user: &str| Subject {
            relation: relation.to_string(),
            site: site.to_string(),
            user: user.to_string(),
        };
        if !user.is_empty()
            && let Some(r) = self.rules.get(&key(user))
        {
            return *r;
        }
        self.rules.get(&key("")).copied().unwrap_or(self.default)
    }

    /// The first of `relations` that `user` at `site` may not use with
    /// `need`, with the right it has.
    pub fn denied<'a>(
        &self,
        relations: impl IntoIterator<Item = &'a str>,
        site: &str,
        user: &str,
        need: Right,
    ) -> Option<(&'a str, Right)> {
        relations
            .into_iter()
            .map(|r| (r, self.right(r, site, user)))
            .find(|(_, has)| *has < need)
    }
}

/// One entry of the audit trail.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct AuditRecord {
    /// Its number (assigned by the store).
    pub id: u64,
    /// Unix seconds.
    pub at: i64,
    /// The site, or the administrator for a rule change.
    pub site: String,
    /// The user code at the site (empty for the site's own work).
    pub user: String,
    /// fetch, fetch-denied, lock, lock-refused, lock-denied, push, grant,
    /// revoke.
    pub action: String,
    /// The global relations concerned.
    pub relations: Vec<String>,
    /// Tuples returned, locked or pushed.
    pub tuples: u64,
    /// Keys of the patients returned.
    pub patients: Vec<String>,
    /// A refusal's reason, a rule.
    pub detail: String,
}

impl AuditRecord {
    /// The chain's hash through this record: SHA-256 of the previous
    /// record's hash (hex; empty before the first) and of every field of
    /// this one with its place in the chain, each field length-prefixed so
    /// no two records read alike. Hex.
    pub fn chained_hash(&self, seq: u64, previous: &str) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        let mut field = |bytes: &[u8]| {
            h.update((bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        };
        field(previous.as_bytes());
        field(&seq.to_le_bytes());
        field(&self.id.to_le_bytes());
        field(&self.at.to_le_bytes());
        field(self.site.as_bytes());
        field(self.user.as_bytes());
        field(self.action.as_bytes());
        field(self.relations.join(",").as_bytes());
        field(&self.tuples.to_le_bytes());
        field(self.patients.join(",").as_bytes());
        field(self.detail.as_bytes());
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// A record of `action` by `user` at `site`, now.
    pub fn new(site: &str, user: &str, action: &str) -> AuditRecord {
        AuditRecord {
            at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64),
            site: site.to_string(),
            user: user.to_string(),
            action: action.to_string(),
            ..AuditRecord::default()
        }
    }

    /// The wire form.
    pub fn to_wire(&self) -> v1::AuditEntry {
        v1::AuditEntry {
            id: self.id,
            at: self.at,
            site: self.site.clone(),
            user: self.user.clone(),
            action: self.action.clone(),
            relations: self.relations.clone(),
            tuples: self.tuples,
            patients: self.patients.clone(),
            detail: self.detail.clone(),
        }
    }
}

/// Which audit entries to read.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    /// Only this site's.
    pub site: Option<String>,
    /// Only those that returned this patient.
    pub patient: Option<String>,
    /// Only those at or after this time.
    pub since: Option<i64>,
    /// At most this many (the newest).
    pub limit: Option<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subject(relation: &str, site: &str, user: &str) -> Subject {
        Subject {
            relation: relation.into(),
            site: site.into(),
            user: user.into(),
        }
    }

    #[test]
    fn the_most_specific_rule_applies() {
        let mut acl = Acl::new(Right::Write, []);
        assert_eq!(acl.right("patient", "GRC", "RAD1"), Right::Write);
        acl.set(subject("patient", "GRC", ""), Right::Read);
        assert_eq!(acl.right("patient", "GRC", "RAD1"), Right::Read);
        assert_eq!(acl.right("patient", "STG", "RAD1"), Right::Write);
        acl.set(subject("patient", "GRC", "CLERK"), Right::None);
        assert_eq!(acl.right("patient", "GRC", "CLERK"), Right::None);
        assert_eq!(acl.right("patient", "GRC", "RAD1"), Right::Read);
        assert_eq!(
            acl.denied(["visit", "patient"], "GRC", "RAD1", Right::Write),
            Some(("patient", Right::Read))
        );
        assert_eq!(
            acl.denied(["visit", "patient"], "GRC", "RAD1", Right::Read),
            None
        );
        assert!(acl.remove(&subject("patient", "GRC", "")));
        assert_eq!(acl.right("patient", "GRC", "RAD1"), Right::Write);
        assert!(!acl.remove(&subject("patient", "GRC", "")));
    }
}
