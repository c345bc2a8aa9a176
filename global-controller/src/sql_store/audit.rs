//! The SQLite store's access rules and audit trail.
//!
//! * `snaps_acl` — one row per rule (relation, site, user code or '');
//! * `snaps_audit` — the trail; triggers refuse UPDATE and DELETE, so a
//!   program holding the file cannot rewrite history through SQL either.
//!   Patients are kept as `,key,key,` so one is found with `instr`.

use super::SqlStore;
use crate::acl::{AuditFilter, AuditRecord, Right, Subject};
use crate::db::{Db, Dialect, Tx};
use crate::error::{Error, Result};

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
";

/// Triggers that refuse any change of an audit record: the trail is only
/// ever appended to, whoever holds the database's credentials.
pub(super) fn append_only(d: Dialect) -> &'static str {
    match d {
        Dialect::Sqlite => {
            "CREATE TRIGGER IF NOT EXISTS snaps_audit_no_update BEFORE UPDATE ON snaps_audit
                BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
             CREATE TRIGGER IF NOT EXISTS snaps_audit_no_delete BEFORE DELETE ON snaps_audit
                BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;"
        }
        Dialect::Postgres => {
            "CREATE OR REPLACE FUNCTION snaps_audit_append_only() RETURNS trigger
                LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'the audit trail is append-only'; END $$;
             CREATE OR REPLACE TRIGGER snaps_audit_no_change BEFORE UPDATE OR DELETE OR TRUNCATE
                ON snaps_audit FOR EACH STATEMENT EXECUTE FUNCTION snaps_audit_append_only();"
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
            "SELECT id, at, site, \"user\", action, relations, tuples, patients, detail
             FROM snaps_audit
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
            .map(|r| {
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
            })
            .collect::<Result<Vec<_>>>()
        })?;
        rows.reverse();
        Ok(rows)
    }
}
