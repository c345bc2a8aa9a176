//! Moving a network's store from its SQLite file to a PostgreSQL database:
//! every table copied row for row in one transaction of the target, so the
//! target holds all of it or nothing — tuples with their ids, owners,
//! locks and sent-to bits, the epochs with their change log and staged
//! pushes, the access rules, the audit trail, the kept join groups.

use std::path::Path;

use super::{PgStore, SqliteStore};
use crate::config::GlobalConfig;
use crate::db::{Cell, Db, Dialect, Tx};
use crate::error::{Error, Result};

/// Rows inserted by one statement.
const BATCH: usize = 200;

/// Tables the target makes with rows of its own at creation, replaced by
/// the source's.
const SEEDED: &[&str] = &["snaps_meta", "snaps_sites", "snaps_relations"];

/// One table moved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Moved {
    /// The table.
    pub table: String,
    /// Its rows.
    pub rows: u64,
}

/// Copies the store in the SQLite file `from` (brought to this build's
/// version first) into the empty PostgreSQL database `to`, then checks that
/// every table holds as many rows there as in the file. `progress` hears of
/// each table as it is copied (table, rows). The controller must be stopped
/// while it runs: a write to the file during the copy would be left behind.
pub fn migrate(
    from: &Path,
    to: &str,
    config: &GlobalConfig,
    progress: &mut dyn FnMut(&str, u64),
) -> Result<Vec<Moved>> {
    if !from.is_file() {
        return Err(Error::Config(format!(
            "{} is no store file: nothing to move",
            from.display()
        )));
    }
    let source = SqliteStore::open(from, config)?;
    let target = PgStore::connect(to, config)?;
    source.db.transaction(&mut |src| {
        let tables: Vec<String> = src
            .query(
                "SELECT name FROM sqlite_master WHERE type = 'table'
                 AND name NOT LIKE 'sqlite_%' ORDER BY name",
                &[],
            )?
            .iter()
            .map(|r| r.text(0))
            .collect::<Result<_>>()?;
        target.db.transaction(&mut |dst| {
            let mut moved = Vec::new();
            for t in &tables {
                let rows = copy_table(src, dst, t)?;
                progress(t, rows);
                moved.push(Moved {
                    table: t.clone(),
                    rows,
                });
            }
            for m in &moved {
                let there = count(dst, &m.table)?;
                if there != m.rows {
                    return Err(Error::Internal(format!(
                        "{} holds {there} rows after the copy of {}: nothing is kept",
                        m.table, m.rows
                    )));
                }
            }
            Ok(moved)
        })
    })
}

fn count(tx: &mut dyn Tx, table: &str) -> Result<u64> {
    Ok(tx
        .one(&format!("SELECT count(*) FROM \"{table}\""), &[])?
        .map(|r| r.int(0))
        .transpose()?
        .unwrap_or(0) as u64)
}

fn copy_table(src: &mut dyn Tx, dst: &mut dyn Tx, table: &str) -> Result<u64> {
    debug_assert_eq!(dst.dialect(), Dialect::Postgres);
    let columns: Vec<String> = src
        .query(
            "SELECT name FROM pragma_table_info(?1) ORDER BY cid",
            &[table.into()],
        )?
        .iter()
        .map(|r| r.text(0))
        .collect::<Result<_>>()?;
    let exists = dst
        .one(
            "SELECT count(*) FROM information_schema.tables
             WHERE table_schema = current_schema() AND table_name = ?1",
            &[table.into()],
        )?
        .map(|r| r.int(0))
        .transpose()?
        .unwrap_or(0);
    if exists == 0 {
        return Err(Error::Config(format!(
            "the store file has a table {table} this build does not make: \
             it was written by another SNAPS"
        )));
    }
    if SEEDED.contains(&table) {
        dst.execute(&format!("DELETE FROM \"{table}\""), &[])?;
    } else if count(dst, table)? > 0 {
        return Err(Error::FailedPrecondition(format!(
            "the PostgreSQL store already holds rows of {table}: move into an empty database"
        )));
    }
    let quoted: Vec<String> = columns.iter().map(|c| format!("\"{c}\"")).collect();
    let rows = src.query(
        &format!("SELECT {} FROM \"{table}\"", quoted.join(", ")),
        &[],
    )?;
    let n = columns.len();
    for chunk in rows.chunks(BATCH) {
        let values: Vec<String> = (0..chunk.len())
            .map(|r| {
                let marks: Vec<String> = (1..=n).map(|c| format!("?{}", r * n + c)).collect();
                format!("({})", marks.join(", "))
            })
            .collect();
        let params: Vec<Cell> = chunk.iter().flat_map(|r| r.0.iter().cloned()).collect();
        dst.execute(
            &format!(
                "INSERT INTO \"{table}\" ({}) VALUES {}",
                quoted.join(", "),
                values.join(", ")
            ),
            &params,
        )?;
    }
    // Identity keys go on from the highest ever given (SQLite keeps it in
    // sqlite_sequence, beyond deleted tuples): a tuple id is never reused.
    let given = src
        .one(
            "SELECT seq FROM sqlite_sequence WHERE name = ?1",
            &[table.into()],
        )?
        .map(|r| r.int(0))
        .transpose()?
        .unwrap_or(0);
    for c in ["tuple_id", "id"] {
        if columns.iter().any(|x| x == c) {
            dst.query(
                &format!(
                    "SELECT setval(pg_get_serial_sequence('\"{table}\"', '{c}'),
                                   GREATEST(?1, coalesce((SELECT max(\"{c}\") FROM \"{table}\"), 0)) + 1, false)
                     WHERE pg_get_serial_sequence('\"{table}\"', '{c}') IS NOT NULL"
                ),
                &[given.into()],
            )?;
        }
    }
    Ok(rows.len() as u64)
}
