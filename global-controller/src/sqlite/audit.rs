//! The SQLite store's access rules and audit trail.
//!
//! * `snaps_acl` — one row per rule (relation, site, user code or '');
//! * `snaps_audit` — the trail; triggers refuse UPDATE and DELETE, so a
//!   program holding the file cannot rewrite history through SQL either.
//!   Patients are kept as `,key,key,` so one is found with `instr`.

use rusqlite::{TransactionBehavior, params};

use super::SqliteStore;
use crate::acl::{AuditFilter, AuditRecord, Right, Subject};
use crate::error::{Error, Result};

/// The tables and triggers.
pub(super) const TABLES: &str = "
CREATE TABLE IF NOT EXISTS snaps_acl (
    relation TEXT NOT NULL, site TEXT NOT NULL, user TEXT NOT NULL, right TEXT NOT NULL,
    set_at INTEGER NOT NULL, PRIMARY KEY (relation, site, user));
CREATE TABLE IF NOT EXISTS snaps_audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at INTEGER NOT NULL, site TEXT NOT NULL,
    user TEXT NOT NULL, action TEXT NOT NULL, relations TEXT NOT NULL,
    tuples INTEGER NOT NULL, patients TEXT NOT NULL, detail TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS snaps_audit_site ON snaps_audit (site, at);
CREATE TRIGGER IF NOT EXISTS snaps_audit_no_update BEFORE UPDATE ON snaps_audit
    BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
CREATE TRIGGER IF NOT EXISTS snaps_audit_no_delete BEFORE DELETE ON snaps_audit
    BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
";

pub(super) fn insert(tx: &rusqlite::Transaction<'_>, r: &AuditRecord) -> Result<()> {
    let patients = if r.patients.is_empty() {
        String::new()
    } else {
        format!(",{},", r.patients.join(","))
    };
    tx.execute(
        "INSERT INTO snaps_audit (at, site, user, action, relations, tuples, patients, detail)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![
            r.at,
            r.site,
            r.user,
            r.action,
            r.relations.join(","),
            r.tuples as i64,
            patients,
            r.detail
        ],
    )?;
    Ok(())
}

fn split(text: &str) -> Vec<String> {
    text.split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

impl SqliteStore {
    pub(super) fn acl_rules_stored(&self) -> Result<Vec<(Subject, Right)>> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare("SELECT relation, site, user, right FROM snaps_acl ORDER BY 1, 2, 3")?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    Subject {
                        relation: r.get(0)?,
                        site: r.get(1)?,
                        user: r.get(2)?,
                    },
                    r.get::<_, String>(3)?,
                ))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        rows.into_iter()
            .map(|(s, right)| {
                let r = Right::parse(&right).ok_or_else(|| {
                    Error::Internal(format!("snaps_acl holds an unknown right {right:?}"))
                })?;
                Ok((s, r))
            })
            .collect()
    }

    pub(super) fn store_acl(
        &self,
        subject: &Subject,
        right: Option<Right>,
        audit: &AuditRecord,
    ) -> Result<bool> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let existed = tx.execute(
            "DELETE FROM snaps_acl WHERE relation = ?1 AND site = ?2 AND user = ?3",
            params![subject.relation, subject.site, subject.user],
        )? > 0;
        if let Some(r) = right {
            tx.execute(
                "INSERT INTO snaps_acl (relation, site, user, right, set_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    subject.relation,
                    subject.site,
                    subject.user,
                    r.as_str(),
                    audit.at
                ],
            )?;
        }
        insert(&tx, audit)?;
        tx.commit()?;
        Ok(existed)
    }

    pub(super) fn append_audit_records(&self, records: &[AuditRecord]) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        for r in records {
            insert(&tx, r)?;
        }
        tx.commit()?;
        Ok(())
    }

    pub(super) fn audit_records(&self, f: &AuditFilter) -> Result<Vec<AuditRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, at, site, user, action, relations, tuples, patients, detail
             FROM snaps_audit
             WHERE (?1 IS NULL OR site = ?1)
               AND (?2 IS NULL OR instr(patients, ',' || ?2 || ',') > 0)
               AND (?3 IS NULL OR at >= ?3)
             ORDER BY id DESC LIMIT ?4",
        )?;
        let limit = f.limit.map_or(-1, i64::from);
        let mut rows = stmt
            .query_map(params![f.site, f.patient, f.since, limit], |r| {
                Ok(AuditRecord {
                    id: r.get::<_, i64>(0)? as u64,
                    at: r.get(1)?,
                    site: r.get(2)?,
                    user: r.get(3)?,
                    action: r.get(4)?,
                    relations: split(&r.get::<_, String>(5)?),
                    tuples: r.get::<_, i64>(6)? as u64,
                    patients: split(&r.get::<_, String>(7)?),
                    detail: r.get(8)?,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        rows.reverse();
        Ok(rows)
    }
}
