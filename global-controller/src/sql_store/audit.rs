//! The SQLite store's access rules and audit trail.
//!
//! * `snaps_acl` — one row per rule (relation, site, user code or '');
//! * `snaps_audit` — the trail; triggers refuse UPDATE and DELETE, so a
//!   program holding the file cannot rewrite history through SQL either.
//!   Patients are kept as `,key,key,` so one is found with `instr`.
//! * `snaps_audit_chain` — the hash chain over the trail: record after
//!   record, the SHA-256 of the previous link and the record
//!   ([`AuditRecord::chained_hash`]), append-only too. A record is chained
//!   by the controllers' watch each second rather than in the transaction
//!   that appends it, so fetches from many clients and controllers do not
//!   all wait on the chain's head. Someone who edits or removes a chained
//!   record behind the controller's back without recomputing every later
//!   link is found by `snaps audit --verify`.

use super::SqlStore;
use crate::acl::{AuditFilter, AuditRecord, Right, Subject};
use crate::db::{Db, Dialect, Row, Tx};
use crate::error::{Error, Result};
use crate::store::{AuditVerification, BrokenRecord};

/// The access-rule and audit tables. `user` and `right` are quoted: both
/// are keywords of PostgreSQL.
pub(super) const TABLES: &str = "
CREATE TABLE IF NOT EXISTS snaps_acl (
    relation TEXT NOT NULL, site TEXT NOT NULL, \"user\" TEXT NOT NULL, \"right\" TEXT NOT NULL,
    set_at INTEGER NOT NULL, PRIMARY KEY (relation, site, \"user\"));
CREATE TABLE IF NOT EXISTS snaps_audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at INTEGER NOT NULL, site TEXT NOT NULL,
    \"user\" TEXT NOT NULL, action TEXT NOT NULL, relations TEXT NOT NULL,
    tuples INTEGER NOT NULL, patients TEXT NOT NULL, detail TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS snaps_audit_site ON snaps_audit (site, at);
CREATE TABLE IF NOT EXISTS snaps_audit_chain (
    seq INTEGER PRIMARY KEY, audit_id INTEGER NOT NULL UNIQUE, hash TEXT NOT NULL);
";

/// Records appended below the highest chained one are still looked for
/// this far back: on PostgreSQL a record may commit after one with a higher
/// number (its transaction began first), never this much later.
const LATE: i64 = 1000;

/// Triggers that refuse any change of an audit record: the trail is only
/// ever appended to, whoever holds the database's credentials.
pub(super) fn append_only(d: Dialect) -> &'static str {
    match d {
        Dialect::Sqlite => {
            "CREATE TRIGGER IF NOT EXISTS snaps_audit_no_update BEFORE UPDATE ON snaps_audit
                BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
             CREATE TRIGGER IF NOT EXISTS snaps_audit_no_delete BEFORE DELETE ON snaps_audit
                BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
             CREATE TRIGGER IF NOT EXISTS snaps_audit_chain_no_update BEFORE UPDATE ON snaps_audit_chain
                BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
             CREATE TRIGGER IF NOT EXISTS snaps_audit_chain_no_delete BEFORE DELETE ON snaps_audit_chain
                BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;"
        }
        Dialect::Postgres => {
            "CREATE OR REPLACE FUNCTION snaps_audit_append_only() RETURNS trigger
                LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'the audit trail is append-only'; END $$;
             CREATE OR REPLACE TRIGGER snaps_audit_no_change BEFORE UPDATE OR DELETE OR TRUNCATE
                ON snaps_audit FOR EACH STATEMENT EXECUTE FUNCTION snaps_audit_append_only();
             CREATE OR REPLACE TRIGGER snaps_audit_chain_no_change BEFORE UPDATE OR DELETE OR TRUNCATE
                ON snaps_audit_chain FOR EACH STATEMENT EXECUTE FUNCTION snaps_audit_append_only();"
        }
    }
}

pub(super) fn insert(tx: &mut dyn Tx, r: &AuditRecord) -> Result<()> {
    let patients = if r.patients.is_empty() {
        String::new()
    } else {
        format!(",{},", r.patients.join(","))
    };
    tx.execute(
        "INSERT INTO snaps_audit (at, site, \"user\", action, relations, tuples, patients, detail)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        &[
            r.at.into(),
            (&r.site).into(),
            (&r.user).into(),
            (&r.action).into(),
            r.relations.join(",").into(),
            r.tuples.into(),
            patients.into(),
            (&r.detail).into(),
        ],
    )?;
    Ok(())
}

/// The columns [`record`] reads, in its order.
const COLUMNS: &str =
    "a.id, a.at, a.site, a.\"user\", a.action, a.relations, a.tuples, a.patients, a.detail";

/// A record from a row of [`COLUMNS`].
fn record(r: &Row) -> Result<AuditRecord> {
    Ok(AuditRecord {
        id: r.int(0)? as u64,
        at: r.int(1)?,
        site: r.text(2)?,
        user: r.text(3)?,
        action: r.text(4)?,
        relations: split(&r.text(5)?),
        tuples: r.int(6)? as u64,
        patients: split(&r.text(7)?),
        detail: r.text(8)?,
    })
}

/// Chains up to `limit` records not chained yet, oldest first; how many.
pub(super) fn seal(tx: &mut dyn Tx, limit: usize) -> Result<u64> {
    let head = tx.one(
        "SELECT seq, audit_id, hash FROM snaps_audit_chain ORDER BY seq DESC LIMIT 1",
        &[],
    )?;
    let (mut seq, high, mut hash) = match head {
        Some(r) => (r.int(0)? as u64, r.int(1)?, r.text(2)?),
        None => (0, 0, String::new()),
    };
    let rows = tx.query(
        &format!(
            "SELECT {COLUMNS} FROM snaps_audit a
             LEFT JOIN snaps_audit_chain c ON c.audit_id = a.id
             WHERE c.audit_id IS NULL AND a.id > ?1
             ORDER BY a.id LIMIT ?2"
        ),
        &[(high - LATE).into(), (limit as i64).into()],
    )?;
    for r in &rows {
        let rec = record(r)?;
        seq += 1;
        hash = rec.chained_hash(seq, &hash);
        tx.execute(
            "INSERT INTO snaps_audit_chain (seq, audit_id, hash) VALUES (?1, ?2, ?3)",
            &[
                (seq as i64).into(),
                (rec.id as i64).into(),
                hash.as_str().into(),
            ],
        )?;
    }
    Ok(rows.len() as u64)
}

/// Walks the chain from its first link: the first record whose hash does
/// not follow (changed, or its link edited), the first link whose record is
/// gone, or a link missing from the sequence; and how many records are not
/// chained yet.
pub(super) fn verify(tx: &mut dyn Tx) -> Result<AuditVerification> {
    let links = tx.query(
        &format!(
            "SELECT c.seq, c.audit_id, c.hash, {COLUMNS} FROM snaps_audit_chain c
             LEFT JOIN snaps_audit a ON a.id = c.audit_id ORDER BY c.seq"
        ),
        &[],
    )?;
    let mut out = AuditVerification::default();
    let mut previous = String::new();
    for (n, link) in links.iter().enumerate() {
        let seq = link.int(0)? as u64;
        let id = link.int(1)? as u64;
        let broken = |reason: String| BrokenRecord { seq, id, reason };
        if seq != n as u64 + 1 {
            out.broken = Some(broken(format!(
                "link {} of the chain is missing (the next is {seq})",
                n + 1
            )));
            break;
        }
        if link.opt_int(3)?.is_none() {
            out.broken = Some(broken(format!("record {id} was removed from the trail")));
            break;
        }
        let rec = record(&Row(link.0[3..].to_vec()))?;
        let expected = rec.chained_hash(seq, &previous);
        let stored = link.text(2)?;
        if stored != expected {
            out.broken = Some(broken(format!(
                "record {id} is not what was chained: it, or its link, was changed"
            )));
            break;
        }
        previous = stored;
        out.chained += 1;
    }
    out.unchained = tx
        .one(
            "SELECT count(*) FROM snaps_audit a
             LEFT JOIN snaps_audit_chain c ON c.audit_id = a.id WHERE c.audit_id IS NULL",
            &[],
        )?
        .map(|r| r.int(0))
        .transpose()?
        .unwrap_or(0) as u64;
    Ok(out)
}

fn split(text: &str) -> Vec<String> {
    text.split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

impl<D: Db> SqlStore<D> {
    pub(super) fn acl_rules_stored(&self) -> Result<Vec<(Subject, Right)>> {
        self.tx(|tx| {
            tx.query(
                "SELECT relation, site, \"user\", \"right\" FROM snaps_acl ORDER BY 1, 2, 3",
                &[],
            )?
            .iter()
            .map(|r| {
                let right = r.text(3)?;
                let parsed = Right::parse(&right).ok_or_else(|| {
                    Error::Internal(format!("snaps_acl holds an unknown right {right:?}"))
                })?;
                Ok((
                    Subject {
                        relation: r.text(0)?,
                        site: r.text(1)?,
                        user: r.text(2)?,
                    },
                    parsed,
                ))
            })
            .collect()
        })
    }

    pub(super) fn store_acl(
        &self,
        subject: &Subject,
        right: Option<Right>,
        audit: &AuditRecord,
    ) -> Result<bool> {
        self.tx(|tx| {
            let existed = tx.execute(
                "DELETE FROM snaps_acl WHERE relation = ?1 AND site = ?2 AND \"user\" = ?3",
                &[
                    (&subject.relation).into(),
                    (&subject.site).into(),
                    (&subject.user).into(),
                ],
            )? > 0;
            if let Some(r) = right {
                tx.execute(
                    "INSERT INTO snaps_acl (relation, site, \"user\", \"right\", set_at)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                    &[
                        (&subject.relation).into(),
                        (&subject.site).into(),
                        (&subject.user).into(),
                        r.as_str().into(),
                        audit.at.into(),
                    ],
                )?;
            }
            insert(tx, audit)?;
            Ok(existed)
        })
    }

    pub(super) fn append_audit_records(&self, records: &[AuditRecord]) -> Result<()> {
        self.tx(|tx| {
            for r in records {
                insert(tx, r)?;
            }
            Ok(())
        })
    }

    pub(super) fn audit_records(&self, f: &AuditFilter) -> Result<Vec<AuditRecord>> {
        let sql = format!(
            "SELECT {COLUMNS}
             FROM snaps_audit a
             WHERE (CAST(?1 AS TEXT) IS NULL OR site = CAST(?1 AS TEXT))
               AND (CAST(?2 AS TEXT) IS NULL OR {}(patients, ',' || CAST(?2 AS TEXT) || ',') > 0)
               AND (CAST(?3 AS BIGINT) IS NULL OR at >= CAST(?3 AS BIGINT))
             ORDER BY id DESC LIMIT ?4",
            self.dialect().instr()
        );
        let limit = f.limit.map_or(i64::MAX, i64::from);
        let mut rows = self.tx(|tx| {
            tx.query(
                &sql,
                &[
                    f.site.as_ref().into(),
                    f.patient.as_ref().into(),
                    f.since.into(),
                    limit.into(),
                ],
            )?
            .iter()
            .map(record)
            .collect::<Result<Vec<_>>>()
        })?;
        rows.reverse();
        Ok(rows)
    }
}
