//! A site's SQLite database: created once from the site's catalog and mapping,
//! reopened by every later run.
//!
//! What the database holds (DESIGN.md, "Data at a site"):
//!
//! * every relation of the site's local catalog, exactly as the application
//!   defined it — SQL types from the thesis types (`i2` → `SMALLINT`, `i4` →
//!   `INTEGER`, `f4` → `REAL`, `cN` → `CHAR(N)`), `NOT NULL`, `PRIMARY KEY`;
//! * on each relation the site maps onto the global snapshot, one more column,
//!   last: [`STATUS_COLUMN`], the appendix-A status byte, defaulting to *local
//!   tuple, new* so a program that inserts without naming it gets it right;
//! * bookkeeping tables, all prefixed `snaps_`: `snaps_site` (this site's code,
//!   number and name), `snaps_mapping` and `snaps_mapping_qualification` (the
//!   rows the site's mapping was built from), `snaps_snapshot_definition` and
//!   `snaps_snapshot_membership` (empty until the query path stores snapshots)
//!   and `snaps_stats` (traffic counters, starting at zero);
//! * one trigger per mapped relation, `snaps_modified_<relation>`: when a
//!   mapped attribute of a tuple that is not new actually changes, the tuple's
//!   *modified* bit is set, whoever wrote the change. Tuples whose just-copied
//!   bits are set are being stored by the controller itself (appendix A: the
//!   controller marks the tuples of a fetch while it stores them) and are left
//!   alone; updating a non-mapped attribute does not make a tuple modified,
//!   since nothing the global snapshot holds has changed.
//!
//! `PRAGMA user_version` holds [`SCHEMA_VERSION`]; the journal is in WAL mode,
//! so the radiology application can read while the controller writes.
//!
//! Every identifier is written double-quoted, so a relation or attribute whose
//! name is an SQL keyword still works.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::types::Value as SqlValue;
use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, params, params_from_iter};
use snaps_mapping::SiteMapping;
use snaps_mapping::mapping::{MappingRow, QualificationRow};
use snaps_schema::{Catalog, LocalStatus, Relation, SiteConfig, Value};

use crate::value::{from_sqlite, to_sqlite};
use crate::{Error, Result};

/// The version of the site database layout, kept in `PRAGMA user_version`.
pub const SCHEMA_VERSION: i32 = 5;

/// The hidden status column on every mapped relation: the appendix-A byte.
pub const STATUS_COLUMN: &str = "snaps_status";

/// The counters of `snaps_stats`, created at zero.
pub const STAT_COUNTERS: &[&str] = &[
    "global_fetches",
    "tuples_received",
    "bytes_sent",
    "bytes_received",
    "snapshots",
    "snapshot_tuples",
    "local_only_answers",
    "locks_granted",
    "locks_refused",
    "refresh_epochs",
    "refresh_push_bytes",
    "refresh_distribute_bytes",
];

/// Appendix-A bit 4: added at this site since the last refresh.
pub(crate) const NEW_BIT: u8 = 0x10;
/// Appendix-A bit 3: changed at this site since the last refresh.
const MODIFIED_BIT: u8 = 0x08;
/// Appendix-A bits 2..0: non-zero while the controller stores a fetch.
const JUST_COPIED_BITS: u8 = 0x07;
/// Appendix-A bit 7: a snapshot tuple (a copy from the global snapshot).
pub(crate) const SNAPSHOT_BIT: u8 = 0x80;
/// Appendix-A bits 6..5: the access rights; all set is *deleted*.
const RIGHTS_BITS: u8 = 0x60;
/// The rights bits of *read-write*: this site holds the lock (or the tuple
/// is its own new tuple).
const READ_WRITE_RIGHTS: u8 = 0x20;

/// How long a statement waits for another writer (the application, or a
/// program on the file) before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

const BOOKKEEPING: &str = "
CREATE TABLE snaps_site (
    code   TEXT NOT NULL,
    number INTEGER NOT NULL,
    name   TEXT NOT NULL
);
CREATE TABLE snaps_mapping (
    row              INTEGER PRIMARY KEY,
    local_relation   TEXT NOT NULL,
    local_attribute  TEXT NOT NULL,
    global_relation  TEXT NOT NULL,
    global_attribute TEXT NOT NULL,
    to_global        TEXT,
    to_local         TEXT
);
CREATE TABLE snaps_mapping_qualification (
    row            INTEGER PRIMARY KEY,
    local_relation TEXT NOT NULL,
    qualification  TEXT NOT NULL
);
CREATE TABLE snaps_snapshot_definition (
    snapshot_no INTEGER PRIMARY KEY,
    language    TEXT,
    statement   TEXT,
    plan        TEXT,
    created_day INTEGER,
    pinned      INTEGER,
    -- The retrieval as the query IR (JSON): the refresh re-runs it.
    query       TEXT
);
CREATE TABLE snaps_snapshot_membership (
    relation        TEXT,
    tuple_rowid     INTEGER,
    snapshot_no     INTEGER,
    last_access_day INTEGER,
    PRIMARY KEY (relation, tuple_rowid, snapshot_no)
);
-- Eviction goes by snapshot: find a snapshot's tuples without a scan.
CREATE INDEX snaps_snapshot_membership_by_snapshot
    ON snaps_snapshot_membership (snapshot_no);
-- The global tuples behind each snapshot tuple (one per part of a split):
-- a tuple fetched again is recognised, and locks and refresh name it.
CREATE TABLE snaps_copy (
    global_relation TEXT NOT NULL,
    tuple_id        INTEGER NOT NULL,
    relation        TEXT NOT NULL,
    tuple_rowid     INTEGER NOT NULL,
    owner           TEXT,
    PRIMARY KEY (global_relation, tuple_id)
);
CREATE INDEX snaps_copy_by_tuple ON snaps_copy (relation, tuple_rowid);
-- What the global controller said at the last connect: which local
-- relations other sites may change under lock (read_write = 1), the ranges
-- new keys come from (relation '' is the default range), the network's sites.
CREATE TABLE snaps_relation_mode (
    relation   TEXT PRIMARY KEY,
    read_write INTEGER NOT NULL
);
CREATE TABLE snaps_key_range (
    relation TEXT PRIMARY KEY,
    first    INTEGER NOT NULL,
    last     INTEGER NOT NULL
);
CREATE TABLE snaps_network_site (
    number INTEGER PRIMARY KEY,
    code   TEXT NOT NULL
);
-- Copies whose non-mapped attributes this site changed: permanent here,
-- never evicted; refresh still updates their mapped attributes in place.
CREATE TABLE snaps_pinned (
    relation    TEXT NOT NULL,
    tuple_rowid INTEGER NOT NULL,
    pinned_day  INTEGER NOT NULL,
    PRIMARY KEY (relation, tuple_rowid)
);
-- The site's own exported tuples it deleted, marked deleted (their status
-- with rights 'deleted'), until the refresh removes them globally. `origin`
-- is the number they were exported with (their rowid).
CREATE TABLE snaps_deleted (
    relation    TEXT NOT NULL,
    origin      INTEGER NOT NULL,
    status      INTEGER NOT NULL,
    deleted_day INTEGER NOT NULL,
    PRIMARY KEY (relation, origin)
);
-- Copies evicted here whose release the global controller has not
-- confirmed yet (sent with the next ReleaseCopies).
CREATE TABLE snaps_released (
    global_relation TEXT NOT NULL,
    tuple_id        INTEGER NOT NULL,
    PRIMARY KEY (global_relation, tuple_id)
);
-- Small facts about the site's state (initial load done, ...).
CREATE TABLE snaps_meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE snaps_stats (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
";

/// Layout 4: what the controller told this site of the others' data
/// (`snaps_schema::summary`), as of the last epoch applied. `items` are
/// key values less `first` (key summaries) or fingerprints (lookups).
const SUMMARY_TABLES: &str = "
CREATE TABLE snaps_summary (
    name       TEXT PRIMARY KEY,
    kind       TEXT NOT NULL,
    relation   TEXT NOT NULL,
    attributes TEXT NOT NULL,
    first      INTEGER NOT NULL,
    last       INTEGER NOT NULL
);
CREATE TABLE snaps_summary_item (
    name TEXT NOT NULL,
    item INTEGER NOT NULL,
    PRIMARY KEY (name, item)
) WITHOUT ROWID;
";

/// Layout 5: the links between records of the network's relation of
/// people that users confirmed (`snaps_link`), as of the last epoch
/// applied or the site's own last link: each pair in both directions, so a
/// lookup of either key finds the other. Keys are the global snapshot's.
const LINK_TABLES: &str = "
CREATE TABLE snaps_link (
    key        INTEGER NOT NULL,
    other      INTEGER NOT NULL,
    other_site TEXT NOT NULL,
    PRIMARY KEY (key, other)
) WITHOUT ROWID;
";

/// A site's database, open.
#[derive(Debug)]
pub struct SiteStore {
    conn: Connection,
    /// The application's relations, as the database declares them.
    catalog: Catalog,
    /// The relations that carry the status column.
    mapped: BTreeSet<String>,
}

impl SiteStore {
    /// Creates the site database at `path` for `site`: the relations of
    /// `local`, the status column and modified trigger on every relation
    /// `mapping` maps, and the bookkeeping tables, filled from the mapping and
    /// qualification rows `mapping` was built from. All in one transaction; on
    /// any failure the new file is removed again.
    ///
    /// Refuses when `path` exists (a site database is never overwritten), when
    /// `mapping` was built for a different definition of a relation, when the
    /// rows and `mapping` disagree, or when an application relation or
    /// attribute uses a name SNAPS reserves.
    pub fn create(
        path: &Path,
        site: &SiteConfig,
        local: &Catalog,
        mapping_rows: &[MappingRow],
        qualification_rows: &[QualificationRow],
        mapping: &SiteMapping,
    ) -> Result<SiteStore> {
        check_definition(local, mapping_rows, qualification_rows, mapping)?;
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|source| {
                if source.kind() == ErrorKind::AlreadyExists {
                    Error::Invalid(format!(
                        "{} already exists: a site database is never overwritten \
                         (remove it, or choose another path)",
                        path.display()
                    ))
                } else {
                    Error::Io {
                        path: path.to_path_buf(),
                        source,
                    }
                }
            })?;
        let definition = Definition {
            site,
            local,
            mapping_rows,
            qualification_rows,
            mapping,
        };
        definition.build(path).inspect_err(|_| {
            // The half-made file would only stop the next attempt; nothing in
            // it is worth keeping, and a failure to remove it changes nothing
            // about the error we report.
            for file in [
                path.to_path_buf(),
                with_suffix(path, "-wal"),
                with_suffix(path, "-shm"),
            ] {
                let _ = std::fs::remove_file(file);
            }
        })
    }

    /// Creates a site database for site `code` of `network` at `path` from the
    /// network's files (local schema, mapping, qualification), empty, making
    /// its folder if needed.
    pub fn create_in_network(
        network: &snaps_schema::NetworkConfig,
        code: &str,
        path: &Path,
    ) -> Result<SiteStore> {
        let site = network.site(code)?;
        let local = network.local_catalog(site)?;
        let global = network.global_catalog()?;
        let read = |p: &Path| {
            let path = network.path(p);
            std::fs::read_to_string(&path).map_err(|source| Error::Io { path, source })
        };
        let mapping_text = read(&site.mapping)?;
        let qual_text = match &site.qualification {
            Some(q) => read(q)?,
            None => String::new(),
        };
        let rows = snaps_mapping::mapping::parse_mapping_rows(&mapping_text)?;
        let quals = snaps_mapping::mapping::parse_qualification_rows(&qual_text)?;
        let mapping = SiteMapping::new(&rows, &quals, &local, &global)?;
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|source| Error::Io {
                path: parent.to_path_buf(),
                source,
            })?;
        }
        SiteStore::create(path, site, &local, &rows, &quals, &mapping)
    }

    /// Opens an existing site database. Fails, naming the path, when the file
    /// is missing, is not an SQLite database, lacks the `snaps_site` table or
    /// its one row, or has a layout version this build does not read.
    pub fn open(path: &Path) -> Result<SiteStore> {
        let exists = path.try_exists().map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        if !exists {
            return Err(Error::Invalid(format!(
                "no site database at {}",
                path.display()
            )));
        }
        let not_site = |why: &str| {
            Error::Invalid(format!(
                "{} is not a SNAPS site database: {why}",
                path.display()
            ))
        };
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        let has_site: bool = conn
            .query_row(
                "SELECT count(*) > 0 FROM sqlite_schema WHERE type = 'table' AND name = 'snaps_site'",
                [],
                |r| r.get(0),
            )
            .map_err(|e| not_site(&e.to_string()))?;
        if !has_site {
            return Err(not_site("it has no snaps_site table"));
        }
        let mut version: i32 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        // Layouts 3 and 4 lack only tables: added in place, one step at a
        // time.
        for (from, tables) in [(3, SUMMARY_TABLES), (4, LINK_TABLES)] {
            if version == from {
                let tx = conn.unchecked_transaction()?;
                tx.execute_batch(tables)?;
                tx.pragma_update(None, "user_version", from + 1)?;
                tx.commit()?;
                version = from + 1;
            }
        }
        if version != SCHEMA_VERSION {
            return Err(Error::Invalid(format!(
                "{} is a SNAPS site database of layout version {version}; this build reads version {SCHEMA_VERSION}",
                path.display()
            )));
        }
        let sites: i64 = conn.query_row("SELECT count(*) FROM snaps_site", [], |r| r.get(0))?;
        if sites != 1 {
            return Err(not_site(&format!(
                "snaps_site holds {sites} rows instead of one"
            )));
        }
        conn.busy_timeout(BUSY_TIMEOUT)?;
        let (catalog, mapped) = read_catalog(&conn).map_err(|e| {
            Error::Invalid(format!(
                "{}: cannot read the site's relations: {e}",
                path.display()
            ))
        })?;
        Ok(SiteStore {
            conn,
            catalog,
            mapped,
        })
    }

    /// Inserts `rows` into `relation` as the site's own data (status *local,
    /// new* where the relation is mapped), in one transaction. Every value is
    /// checked against its attribute's type first; an error names the
    /// relation, the attribute and the row number (from 1), and nothing is
    /// inserted when any row is bad. Returns the number of rows inserted.
    pub fn load(&mut self, relation: &str, rows: &[Vec<Value>]) -> Result<usize> {
        let rel = self
            .catalog
            .relation(relation)
            .ok_or_else(|| unknown(relation))?;
        let checked = rows
            .iter()
            .enumerate()
            .map(|(i, row)| check_row(rel, i + 1, row))
            .collect::<Result<Vec<_>>>()?;
        let status = self
            .mapped
            .contains(relation)
            .then(|| LocalStatus::new_local().to_byte())
            .transpose()?;
        let mut columns: Vec<String> = rel.attributes.iter().map(|a| quote(&a.name)).collect();
        if status.is_some() {
            columns.push(quote(STATUS_COLUMN));
        }
        let sql = format!(
            "INSERT INTO {} ({}) VALUES ({})",
            quote(&rel.name),
            columns.join(", "),
            vec!["?"; columns.len()].join(", ")
        );
        let tx = self.conn.transaction()?;
        {
            let mut insert = tx.prepare(&sql)?;
            for (i, row) in checked.iter().enumerate() {
                let values = row
                    .iter()
                    .map(to_sqlite)
                    .chain(status.map(|s| SqlValue::Integer(s.into())));
                insert.execute(params_from_iter(values)).map_err(|e| {
                    match e.sqlite_error_code() {
                        Some(ErrorCode::ConstraintViolation) => {
                            Error::Invalid(format!("load {relation}, row {}: {e}", i + 1))
                        }
                        _ => Error::Storage(e),
                    }
                })?;
            }
        }
        tx.commit()?;
        Ok(checked.len())
    }

    /// The application's relations, as the database declares them.
    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// Whether `relation` is mapped onto the global snapshot (and so carries
    /// the status column).
    pub fn is_mapped(&self, relation: &str) -> bool {
        self.mapped.contains(relation)
    }

    /// The number of tuples in `relation`, snapshot tuples included.
    pub fn count(&self, relation: &str) -> Result<i64> {
        let rel = self
            .catalog
            .relation(relation)
            .ok_or_else(|| unknown(relation))?;
        let sql = format!("SELECT count(*) FROM {}", quote(&rel.name));
        Ok(self.conn.query_row(&sql, [], |r| r.get(0))?)
    }

    /// The tuples of `relation`, application attributes only, in rowid
    /// order (key order for a relation keyed by one integer attribute, whose
    /// key SQLite uses as the rowid).
    pub fn rows(&self, relation: &str) -> Result<Vec<Vec<Value>>> {
        let rel = self
            .catalog
            .relation(relation)
            .ok_or_else(|| unknown(relation))?;
        Ok(read_tuples(&self.conn, rel, "1", 0)?
            .into_iter()
            .map(|(_, t)| t)
            .collect())
    }

    /// This site's code, from `snaps_site`.
    pub fn site_code(&self) -> Result<String> {
        Ok(self
            .conn
            .query_row("SELECT code FROM snaps_site", [], |r| r.get(0))?)
    }

    /// The appendix-A status of the tuple with `rowid` in the mapped
    /// relation `relation`.
    pub fn status_of(&self, relation: &str, rowid: i64) -> Result<LocalStatus> {
        let rel = self
            .catalog
            .relation(relation)
            .ok_or_else(|| unknown(relation))?;
        if !self.is_mapped(relation) {
            return Err(Error::Invalid(format!(
                "{relation} is not mapped onto the global snapshot, so its tuples have no status"
            )));
        }
        let sql = format!(
            "SELECT {} FROM {} WHERE rowid = ?1",
            quote(STATUS_COLUMN),
            quote(&rel.name)
        );
        let byte: i64 = self
            .conn
            .query_row(&sql, [rowid], |r| r.get(0))
            .optional()?
            .ok_or_else(|| Error::Invalid(format!("{relation} has no tuple with rowid {rowid}")))?;
        let byte = u8::try_from(byte).map_err(|_| {
            Error::Invalid(format!(
                "{relation} rowid {rowid} has status {byte}, which is not a byte"
            ))
        })?;
        Ok(LocalStatus::from_byte(byte))
    }

    /// The counters of `snaps_stats`, by name.
    pub fn stats(&self) -> Result<Vec<(String, i64)>> {
        let mut stmt = self
            .conn
            .prepare("SELECT name, value FROM snaps_stats ORDER BY name")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }
}

/// Everything a new site database is made from.
struct Definition<'a> {
    site: &'a SiteConfig,
    local: &'a Catalog,
    mapping_rows: &'a [MappingRow],
    qualification_rows: &'a [QualificationRow],
    mapping: &'a SiteMapping,
}

impl Definition<'_> {
    /// Builds the database in the (new, empty) file at `path`.
    fn build(&self, path: &Path) -> Result<SiteStore> {
        let mut conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        let mode: String =
            conn.pragma_update_and_check(None, "journal_mode", "wal", |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(Error::Invalid(format!(
                "{}: SQLite kept journal mode {mode} instead of WAL",
                path.display()
            )));
        }
        conn.busy_timeout(BUSY_TIMEOUT)?;
        let new_local = LocalStatus::new_local().to_byte()?;
        let mut mapped = BTreeSet::new();
        let tx = conn.transaction()?;
        for relation in self.local.relations() {
            let is_mapped = self.mapping.relation(&relation.name).is_some();
            tx.execute_batch(&create_table(relation, is_mapped.then_some(new_local)))?;
            if is_mapped {
                mapped.insert(relation.name.clone());
            }
        }
        tx.execute_batch(BOOKKEEPING)?;
        tx.execute_batch(SUMMARY_TABLES)?;
        tx.execute_batch(LINK_TABLES)?;
        for rm in self.mapping.relations() {
            tx.execute_batch(&relation_triggers(rm))?;
        }
        tx.execute(
            "INSERT INTO snaps_site (code, number, name) VALUES (?1, ?2, ?3)",
            params![self.site.code.as_str(), self.site.number.0, self.site.name],
        )?;
        {
            let mut insert = tx.prepare(
                "INSERT INTO snaps_mapping (row, local_relation, local_attribute, \
                 global_relation, global_attribute, to_global, to_local) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?;
            for r in self.mapping_rows {
                insert.execute(params![
                    row_number(r.row)?,
                    r.local_relation,
                    r.local_attribute,
                    r.global_relation,
                    r.global_attribute,
                    r.to_global,
                    r.to_local
                ])?;
            }
            let mut insert = tx.prepare(
                "INSERT INTO snaps_mapping_qualification (row, local_relation, qualification) \
                 VALUES (?1, ?2, ?3)",
            )?;
            for q in self.qualification_rows {
                insert.execute(params![
                    row_number(q.row)?,
                    q.local_relation,
                    q.qualification
                ])?;
            }
            let mut insert = tx.prepare("INSERT INTO snaps_stats (name, value) VALUES (?1, 0)")?;
            for name in STAT_COUNTERS {
                insert.execute([name])?;
            }
        }
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        tx.commit()?;
        Ok(SiteStore {
            conn,
            catalog: self.local.clone(),
            mapped,
        })
    }
}

/// The tuples of `rel` that satisfy `filter` (SQL over its columns) and
/// have a rowid above `after`, in rowid order, with their rowids; every value
/// read back as a SNAPS value (an error names the attribute).
pub(crate) fn read_tuples(
    conn: &Connection,
    rel: &Relation,
    filter: &str,
    after: i64,
) -> Result<Vec<(i64, Vec<Value>)>> {
    let columns: Vec<String> = rel.attributes.iter().map(|a| quote(&a.name)).collect();
    let sql = format!(
        "SELECT rowid, {} FROM {} WHERE ({filter}) AND rowid > ?1 ORDER BY rowid",
        columns.join(", "),
        quote(&rel.name)
    );
    let mut stmt = conn.prepare(&sql)?;
    let mut rows = stmt.query([after])?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        let tuple = rel
            .attributes
            .iter()
            .enumerate()
            .map(|(i, a)| from_sqlite(row.get_ref(i + 1)?, &format!("{}.{}", rel.name, a.name)))
            .collect::<Result<Vec<_>>>()?;
        out.push((row.get(0)?, tuple));
    }
    Ok(out)
}

/// Refuses a definition the database could not represent faithfully.
fn check_definition(
    local: &Catalog,
    mapping_rows: &[MappingRow],
    qualification_rows: &[QualificationRow],
    mapping: &SiteMapping,
) -> Result<()> {
    for relation in local.relations() {
        if relation.name.starts_with("snaps_") || relation.name.starts_with("sqlite_") {
            return Err(Error::Invalid(format!(
                "relation {} uses a reserved prefix (snaps_ belongs to SNAPS, sqlite_ to SQLite)",
                relation.name
            )));
        }
        if relation.attribute(STATUS_COLUMN).is_some() {
            return Err(Error::Invalid(format!(
                "{}.{STATUS_COLUMN}: the name is reserved for the SNAPS status column",
                relation.name
            )));
        }
    }
    let mut mapped_attributes = 0;
    for rm in mapping.relations() {
        if local.relation(&rm.local.name) != Some(&rm.local) {
            return Err(Error::Invalid(format!(
                "the mapping was built for a different definition of {} than the site's catalog holds",
                rm.local.name
            )));
        }
        mapped_attributes += rm.parts.iter().map(|p| p.attrs.len()).sum::<usize>();
    }
    for r in mapping_rows {
        let in_mapping = mapping
            .relation(&r.local_relation)
            .is_some_and(|rm| rm.maps(&r.local_attribute));
        if !in_mapping {
            return Err(Error::Invalid(format!(
                "mapping row {} ({}.{}) is not part of the site's mapping",
                r.row, r.local_relation, r.local_attribute
            )));
        }
    }
    if mapping_rows.len() != mapped_attributes {
        return Err(Error::Invalid(format!(
            "{} mapping rows were given for a mapping of {mapped_attributes} attribute maps",
            mapping_rows.len()
        )));
    }
    for q in qualification_rows {
        if mapping.relation(&q.local_relation).is_none() {
            return Err(Error::Invalid(format!(
                "qualification row {}: {} is not mapped",
                q.row, q.local_relation
            )));
        }
    }
    Ok(())
}

/// `CREATE TABLE` for an application relation; `status` is the default of
/// the status column, present when the relation is mapped.
fn create_table(relation: &Relation, status: Option<u8>) -> String {
    let mut lines: Vec<String> = relation
        .attributes
        .iter()
        .map(|a| {
            let not_null = if a.not_null { " NOT NULL" } else { "" };
            format!("{} {}{not_null}", quote(&a.name), a.ty.sql_name())
        })
        .collect();
    if let Some(status) = status {
        let column = quote(STATUS_COLUMN);
        lines.push(format!(
            "{column} INTEGER NOT NULL DEFAULT {status} CHECK ({column} BETWEEN 0 AND 255)"
        ));
    }
    if !relation.key.is_empty() {
        let key: Vec<String> = relation.key.iter().map(|k| quote(k)).collect();
        lines.push(format!("PRIMARY KEY ({})", key.join(", ")));
    }
    format!(
        "CREATE TABLE {} (\n    {}\n);",
        quote(&relation.name),
        lines.join(",\n    ")
    )
}

/// The status bits of a tuple created or changed here since the last
/// refresh (*new*, *modified*): the tuples semi-join projections carry.
pub(crate) const CHANGED_BITS: u8 = 0x18;

/// A partial index of a mapped relation's new and modified tuples: every
/// query computes its semi-join projections from them, and there are few,
/// so without it each query would scan the whole relation.
/// The `snaps_stats` counter `name` as `conn` sees it.
pub fn counter(conn: &Connection, name: &str) -> Result<i64> {
    Ok(conn
        .prepare_cached("SELECT value FROM snaps_stats WHERE name = ?1")?
        .query_row([name], |r| r.get(0))?)
}

pub(crate) fn changed_index(relation: &str) -> String {
    format!(
        "CREATE INDEX IF NOT EXISTS {} ON {} ({STATUS_COLUMN}) WHERE ({STATUS_COLUMN} & {CHANGED_BITS}) <> 0;",
        quote(&format!("snaps_changed_{relation}")),
        quote(relation)
    )
}

/// Every trigger (and the index) SNAPS keeps on a mapped relation, for its
/// mapping.
pub(crate) fn relation_triggers(rm: &snaps_mapping::mapping::RelationMapping) -> String {
    let columns: Vec<&str> = rm
        .local
        .attributes
        .iter()
        .map(|a| a.name.as_str())
        .filter(|a| rm.maps(a))
        .collect();
    modified_trigger(&rm.local.name, &columns)
        + "\n"
        + &guard_triggers(rm)
        + "\n"
        + &changed_index(&rm.local.name)
}

/// The form of the triggers this build makes; a file whose `snaps_meta`
/// `trigger_format` differs has them made again at open. Format 2: SQL any
/// SQLite from 3.31 on parses (constant RAISE messages, no `unixepoch()`).
const TRIGGER_FORMAT: &str = "2";

/// Makes the triggers of every mapped relation again when the file has
/// them in an older form, in one transaction.
pub(crate) fn upgrade_triggers(conn: &Connection, mapping: &SiteMapping) -> Result<()> {
    let format: Option<String> = conn
        .query_row(
            "SELECT value FROM snaps_meta WHERE key = 'trigger_format'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    if format.as_deref() == Some(TRIGGER_FORMAT) {
        return Ok(());
    }
    let tx = conn.unchecked_transaction()?;
    for rm in mapping.relations() {
        drop_relation_triggers(&tx, &rm.local.name)?;
        tx.execute_batch(&relation_triggers(rm))?;
    }
    tx.execute(
        "INSERT OR REPLACE INTO snaps_meta (key, value) VALUES ('trigger_format', ?1)",
        [TRIGGER_FORMAT],
    )?;
    tx.commit()?;
    Ok(())
}

/// Drops every trigger SNAPS keeps on `relation` (to make them again for a
/// new mapping).
pub(crate) fn drop_relation_triggers(conn: &Connection, relation: &str) -> Result<()> {
    let names: Vec<String> = {
        let mut stmt = conn.prepare(
            "SELECT name FROM sqlite_schema WHERE type = 'trigger' AND tbl_name = ?1 \
             AND name LIKE 'snaps\\_%' ESCAPE '\\'",
        )?;
        stmt.query_map([relation], |r| r.get(0))?
            .collect::<rusqlite::Result<Vec<_>>>()?
    };
    for n in names {
        conn.execute_batch(&format!("DROP TRIGGER {}", quote(&n)))?;
    }
    Ok(())
}

/// The trigger that sets the modified bit when a mapped attribute of a tuple
/// that is neither new nor being copied in actually changes.
fn modified_trigger(relation: &str, mapped_columns: &[&str]) -> String {
    let status = quote(STATUS_COLUMN);
    let columns: Vec<String> = mapped_columns.iter().map(|c| quote(c)).collect();
    let changed: Vec<String> = columns
        .iter()
        .map(|c| format!("OLD.{c} IS NOT NEW.{c}"))
        .collect();
    format!(
        "CREATE TRIGGER {trigger}\n\
         AFTER UPDATE OF {columns} ON {table}\n\
         FOR EACH ROW\n\
         WHEN (NEW.{status} & {quiet}) = 0\n    AND ({changed})\n\
         BEGIN\n    \
             UPDATE {table} SET {status} = {status} | {modified} WHERE rowid = NEW.rowid;\n\
         END;",
        trigger = quote(&format!("snaps_modified_{relation}")),
        columns = columns.join(", "),
        table = quote(relation),
        quiet = NEW_BIT | MODIFIED_BIT | JUST_COPIED_BITS,
        changed = changed.join("\n        OR "),
        modified = MODIFIED_BIT,
    )
}

/// Today as SQLite computes it in a trigger: days since 1970-01-01 (UTC).
/// (`strftime('%s')`, not `unixepoch()`, which SQLite has only from 3.38.)
const SQL_TODAY: &str = "CAST(strftime('%s', 'now') / 86400 AS INTEGER)";

/// The triggers that keep the update rules for whoever writes to the file
/// (DESIGN.md, "Updates"): a copy's mapped attributes change only under the
/// primary-copy lock (rights *read-write*); an exported own tuple of a
/// relation other sites may change needs the lock too; the key of a tuple
/// the global snapshot holds never changes; a copy is deleted only by its
/// owner (at the owner's site); a change to a copy's non-mapped attribute
/// pins it; an own exported tuple deleted is kept in `snaps_deleted` until
/// the refresh. Tuples with just-copied bits set are the controller's own
/// work (storing or refreshing copies) and pass.
fn guard_triggers(rm: &snaps_mapping::mapping::RelationMapping) -> String {
    let relation = rm.local.name.as_str();
    let table = quote(relation);
    let name = sql_literal(relation);
    let s = quote(STATUS_COLUMN);
    let quiet = format!("(OLD.{s} & {JUST_COPIED_BITS}) = 0");
    let snapshot = format!("(OLD.{s} & {SNAPSHOT_BIT}) <> 0");
    let own_exported = format!("(OLD.{s} & {}) = 0", SNAPSHOT_BIT | NEW_BIT);
    let unlocked = format!("(OLD.{s} & {RIGHTS_BITS}) <> {READ_WRITE_RIGHTS}");
    let read_write = format!(
        "EXISTS (SELECT 1 FROM snaps_relation_mode WHERE relation = {name} AND read_write = 1)"
    );
    // Constant messages: SQLite before 3.47 parses only a string literal in
    // RAISE, and the file must open in the SQLite of any platform from 3.31
    // on. Through SNAPS a write is checked before it reaches the triggers,
    // with the tuple and its owner named; these speak to programs writing
    // to the file directly.
    let says = |what: &str| sql_literal(&format!("{relation}: {what}"));
    let changed = |cols: &[&str]| {
        cols.iter()
            .map(|c| format!("OLD.{0} IS NOT NEW.{0}", quote(c)))
            .collect::<Vec<_>>()
            .join(" OR ")
    };
    let attrs: Vec<&str> = rm
        .local
        .attributes
        .iter()
        .map(|a| a.name.as_str())
        .collect();
    let unmapped: Vec<&str> = attrs.iter().copied().filter(|a| !rm.maps(a)).collect();
    let key: Vec<&str> = rm.local.key.iter().map(String::as_str).collect();
    let watched: Vec<&str> = attrs
        .iter()
        .copied()
        .filter(|a| rm.maps(a) || key.contains(a))
        .collect();
    let of = |cols: &[&str]| cols.iter().map(|c| quote(c)).collect::<Vec<_>>().join(", ");
    let mut sql = String::new();
    if !key.is_empty() {
        sql.push_str(&format!(
            "CREATE TRIGGER {trigger} BEFORE UPDATE OF {cols} ON {table} FOR EACH ROW\n\
             WHEN {quiet} AND (OLD.{s} & {NEW_BIT}) = 0 AND ({key_changed})\n\
             BEGIN\n    SELECT RAISE(ABORT, {message});\nEND;\n",
            trigger = quote(&format!("snaps_key_{relation}")),
            cols = of(&key),
            key_changed = changed(&key),
            message = says(
                "the key of a tuple the global snapshot holds cannot change; delete the tuple and \
                 insert a new one"
            ),
        ));
    }
    if !watched.is_empty() {
        sql.push_str(&format!(
            "CREATE TRIGGER {trigger} BEFORE UPDATE OF {cols} ON {table} FOR EACH ROW\n\
             WHEN {quiet} AND {unlocked} AND ({mapped_changed})\n\
             BEGIN\n    \
             SELECT RAISE(ABORT, {copy}) WHERE {snapshot};\n    \
             SELECT RAISE(ABORT, {shared}) WHERE {own_exported} AND {read_write};\n\
             END;\n",
            trigger = quote(&format!("snaps_lock_{relation}")),
            cols = of(&watched),
            mapped_changed = changed(&watched),
            copy = says(
                "this tuple is a copy of a tuple another site owns (snaps_copy names it), and this \
                 site holds no primary-copy lock on it"
            ),
            shared = says(
                "this tuple is shared read-write: changing it needs the primary-copy lock, which \
                 this site does not hold"
            ),
        ));
    }
    if !unmapped.is_empty() {
        sql.push_str(&format!(
            "CREATE TRIGGER {trigger} AFTER UPDATE OF {cols} ON {table} FOR EACH ROW\n\
             WHEN {quiet} AND {snapshot} AND ({unmapped_changed})\n\
             BEGIN\n    INSERT OR IGNORE INTO snaps_pinned (relation, tuple_rowid, pinned_day) \
             VALUES ({name}, NEW.rowid, {SQL_TODAY});\nEND;\n",
            trigger = quote(&format!("snaps_pin_{relation}")),
            cols = of(&unmapped),
            unmapped_changed = changed(&unmapped),
        ));
    }
    // While a refresh epoch collects and distributes, the site's own data
    // holds still: what was pushed is what the commit acknowledges.
    let refreshing = "EXISTS (SELECT 1 FROM snaps_meta WHERE key = 'refreshing')";
    let wait = "a refresh of the global snapshot is in progress: changes to shared relations \
                wait until it is done; try again in a moment";
    sql.push_str(&format!(
        "CREATE TRIGGER {insert} BEFORE INSERT ON {table} FOR EACH ROW\n\
         WHEN (NEW.{s} & {SNAPSHOT_BIT}) = 0 AND {refreshing}\n\
         BEGIN\n    SELECT RAISE(ABORT, '{wait}');\nEND;\n\
         CREATE TRIGGER {update} BEFORE UPDATE ON {table} FOR EACH ROW\n\
         WHEN (OLD.{s} & {JUST_COPIED_BITS}) = 0 AND (NEW.{s} & {JUST_COPIED_BITS}) = 0 AND {refreshing}\n\
         BEGIN\n    SELECT RAISE(ABORT, '{wait}');\nEND;\n\
         CREATE TRIGGER {delete} BEFORE DELETE ON {table} FOR EACH ROW\n\
         WHEN {quiet} AND {refreshing}\n\
         BEGIN\n    SELECT RAISE(ABORT, '{wait}');\nEND;\n",
        insert = quote(&format!("snaps_refresh_insert_{relation}")),
        update = quote(&format!("snaps_refresh_update_{relation}")),
        delete = quote(&format!("snaps_refresh_delete_{relation}")),
    ));
    sql.push_str(&format!(
        "CREATE TRIGGER {guard} BEFORE DELETE ON {table} FOR EACH ROW WHEN {quiet}\n\
         BEGIN\n    \
         SELECT RAISE(ABORT, {copy}) WHERE {snapshot};\n    \
         SELECT RAISE(ABORT, {shared}) WHERE {own_exported} AND {unlocked} AND {read_write};\n\
         END;\n\
         CREATE TRIGGER {record} AFTER DELETE ON {table} FOR EACH ROW \
         WHEN {quiet} AND {own_exported}\n\
         BEGIN\n    INSERT OR REPLACE INTO snaps_deleted (relation, origin, status, deleted_day) \
         VALUES ({name}, OLD.rowid, OLD.{s} | {RIGHTS_BITS}, {SQL_TODAY});\nEND;\n",
        guard = quote(&format!("snaps_delete_{relation}")),
        record = quote(&format!("snaps_deleted_{relation}")),
        copy = says(
            "this tuple is a copy of a tuple another site owns: only its owner deletes it (copies \
             leave this site when they are no longer used)"
        ),
        shared = says(
            "this tuple is shared read-write: deleting it needs the primary-copy lock, which this \
             site does not hold"
        ),
    ));
    sql
}

/// An SQL string literal.
fn sql_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// Reads the application's relations back from the database: every table
/// outside the `snaps_` and `sqlite_` prefixes, with the status column set
/// apart.
fn read_catalog(conn: &Connection) -> Result<(Catalog, BTreeSet<String>)> {
    let mut tables = conn.prepare(
        "SELECT name FROM sqlite_schema WHERE type = 'table' \
         AND name NOT LIKE 'snaps\\_%' ESCAPE '\\' AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' \
         ORDER BY name",
    )?;
    let names = tables
        .query_map([], |r| r.get::<_, String>(0))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let mut info = conn.prepare("SELECT name, type, \"notnull\", pk FROM pragma_table_info(?1)")?;
    let mut ddl = String::new();
    let mut mapped = BTreeSet::new();
    for name in names {
        let mut lines = Vec::new();
        let mut key: Vec<(i64, String)> = Vec::new();
        let mut rows = info.query([&name])?;
        while let Some(row) = rows.next()? {
            let column: String = row.get(0)?;
            let ty: String = row.get(1)?;
            let not_null: bool = row.get(2)?;
            let pk: i64 = row.get(3)?;
            if column == STATUS_COLUMN {
                mapped.insert(name.clone());
                continue;
            }
            lines.push(format!(
                "{} {ty}{}",
                quote(&column),
                if not_null { " NOT NULL" } else { "" }
            ));
            if pk > 0 {
                key.push((pk, column));
            }
        }
        if !key.is_empty() {
            key.sort();
            let key: Vec<String> = key.iter().map(|(_, k)| quote(k)).collect();
            lines.push(format!("PRIMARY KEY ({})", key.join(", ")));
        }
        // The catalog keeps a relation's name as the DDL wrote it (quotes
        // included, were there any), so it goes back unquoted.
        ddl.push_str(&format!("CREATE TABLE {name} ({});\n", lines.join(", ")));
    }
    Ok((Catalog::from_ddl(&ddl)?, mapped))
}

/// Checks one row against its relation: as many values as attributes, each
/// fitting its type, no NULL where the attribute is NOT NULL. Returns the
/// values as the types normalise them (a whole float for an integer becomes
/// an integer).
fn check_row(relation: &Relation, n: usize, row: &[Value]) -> Result<Vec<Value>> {
    let refuse = |why: String| Error::Invalid(format!("load {}, row {n}: {why}", relation.name));
    if row.len() != relation.attributes.len() {
        return Err(refuse(format!(
            "{} values for the {} attributes of {}",
            row.len(),
            relation.attributes.len(),
            relation.name
        )));
    }
    relation
        .attributes
        .iter()
        .zip(row)
        .map(|(a, v)| {
            let what = format!("{}.{}", relation.name, a.name);
            let v =
                a.ty.check(v.clone(), &what)
                    .map_err(|e| refuse(e.to_string()))?;
            if v.is_null() && a.not_null {
                return Err(refuse(format!("{what} may not be NULL")));
            }
            Ok(v)
        })
        .collect()
}

/// A row number of a mapping file, as SQLite stores it.
fn row_number(row: usize) -> Result<i64> {
    i64::try_from(row).map_err(|_| Error::Invalid(format!("row number {row} is too large")))
}

fn unknown(relation: &str) -> Error {
    Error::Invalid(format!("no relation {relation} at this site"))
}

/// An SQL identifier, double-quoted.
fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `path` with `suffix` appended to its file name (SQLite's `-wal`, `-shm`).
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = OsString::from(path.as_os_str());
    name.push(suffix);
    PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use std::fs;

    use snaps_mapping::mapping::{parse_mapping_rows, parse_qualification_rows};
    use snaps_schema::datagen::{Scale, SiteData, generate};
    use snaps_schema::{LocalRights, NetworkConfig, TupleType};
    use tempfile::TempDir;

    use super::*;

    const RADIOLOGY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures/radiology");
    const APPENDIX_H: [&str; 7] = [
        "doctor",
        "out_go_r",
        "patient",
        "rsb_codes",
        "sites",
        "visit",
        "visit_rep",
    ];

    /// One site of the radiology network, read as the demo reads it.
    struct Fixture {
        config: NetworkConfig,
        site: SiteConfig,
        local: Catalog,
        rows: Vec<MappingRow>,
        quals: Vec<QualificationRow>,
        mapping: SiteMapping,
    }

    fn fixture(code: &str) -> Fixture {
        let config = NetworkConfig::load(Path::new(RADIOLOGY)).unwrap();
        let site = config.site(code).unwrap().clone();
        let local = config.local_catalog(&site).unwrap();
        let global = config.global_catalog().unwrap();
        let mapping_text = fs::read_to_string(config.path(&site.mapping)).unwrap();
        let qual_text = match &site.qualification {
            Some(q) => fs::read_to_string(config.path(q)).unwrap(),
            None => String::new(),
        };
        let mapping = SiteMapping::from_text(&mapping_text, &qual_text, &local, &global).unwrap();
        let rows = parse_mapping_rows(&mapping_text).unwrap();
        let quals = parse_qualification_rows(&qual_text).unwrap();
        Fixture {
            config,
            site,
            local,
            rows,
            quals,
            mapping,
        }
    }

    impl Fixture {
        fn create(&self, path: &Path) -> Result<SiteStore> {
            SiteStore::create(
                path,
                &self.site,
                &self.local,
                &self.rows,
                &self.quals,
                &self.mapping,
            )
        }

        fn data(&self, patients: usize) -> SiteData {
            let mut all = generate(&self.config, &Scale::new(patients), 7).unwrap();
            all.remove(&self.site.code).unwrap()
        }
    }

    fn new_local() -> u8 {
        LocalStatus::new_local().to_byte().unwrap()
    }

    /// (name, declared type, not null, position in the primary key).
    fn columns(conn: &Connection, table: &str) -> Vec<(String, String, bool, i64)> {
        let mut stmt = conn
            .prepare("SELECT name, type, \"notnull\", pk FROM pragma_table_info(?1)")
            .unwrap();
        stmt.query_map([table], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap()
    }

    fn names(conn: &Connection, kind: &str) -> Vec<String> {
        let mut stmt = conn
            .prepare("SELECT name FROM sqlite_schema WHERE type = ?1 ORDER BY name")
            .unwrap();
        stmt.query_map([kind], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap()
    }

    #[test]
    fn status_bits_agree_with_appendix_a() {
        let zero = LocalStatus::from_byte(0);
        assert_eq!(
            LocalStatus { new: true, ..zero }.to_byte().unwrap(),
            NEW_BIT
        );
        assert_eq!(
            LocalStatus {
                modified: true,
                ..zero
            }
            .to_byte()
            .unwrap(),
            MODIFIED_BIT
        );
        assert_eq!(
            LocalStatus {
                just_copied: 7,
                ..zero
            }
            .to_byte()
            .unwrap(),
            JUST_COPIED_BITS
        );
    }

    #[test]
    fn creates_every_relation_as_the_application_defined_it() {
        let dir = TempDir::new().unwrap();
        for (code, unmapped) in [
            ("CPH", &["rsb_codes"][..]),
            ("STG", &["out_go_r", "rsb_codes", "sites"][..]),
            ("GRC", &["out_go_r", "rsb_codes", "sites"][..]),
        ] {
            let f = fixture(code);
            let store = f.create(&dir.path().join(format!("{code}.db"))).unwrap();
            let tables = names(&store.conn, "table");
            for name in APPENDIX_H {
                assert!(tables.iter().any(|t| t == name), "{code} lacks {name}");
                let relation = f.local.relation(name).unwrap();
                let mapped = !unmapped.contains(&name);
                assert_eq!(store.is_mapped(name), mapped, "{code} {name}");
                let mut expected: Vec<(String, String, bool, i64)> = relation
                    .attributes
                    .iter()
                    .map(|a| {
                        let pk = relation
                            .key
                            .iter()
                            .position(|k| *k == a.name)
                            .map_or(0, |i| i as i64 + 1);
                        (a.name.clone(), a.ty.sql_name(), a.not_null, pk)
                    })
                    .collect();
                if mapped {
                    expected.push((STATUS_COLUMN.into(), "INTEGER".into(), true, 0));
                }
                assert_eq!(columns(&store.conn, name), expected, "{code} {name}");
            }
            // The triggers guard exactly the mapped relations; a pin trigger
            // exists where the site keeps attributes of its own.
            let mapping = &f.mapping;
            let mut triggers: Vec<String> = APPENDIX_H
                .iter()
                .filter(|r| !unmapped.contains(r))
                .flat_map(|r| {
                    let rm = mapping.relation(r).unwrap();
                    let own = rm.local.attributes.iter().any(|a| !rm.maps(&a.name));
                    [
                        "modified",
                        "key",
                        "lock",
                        "delete",
                        "deleted",
                        "refresh_insert",
                        "refresh_update",
                        "refresh_delete",
                    ]
                    .into_iter()
                    .chain(own.then_some("pin"))
                    .map(move |t| format!("snaps_{t}_{r}"))
                })
                .collect();
            triggers.sort();
            assert_eq!(names(&store.conn, "trigger"), triggers, "{code}");
            // Bookkeeping.
            for t in [
                "snaps_site",
                "snaps_mapping",
                "snaps_mapping_qualification",
                "snaps_snapshot_definition",
                "snaps_snapshot_membership",
                "snaps_stats",
            ] {
                assert!(tables.iter().any(|x| x == t), "{code} lacks {t}");
            }
            assert_eq!(store.site_code().unwrap(), code);
            let (number, name): (u32, String) = store
                .conn
                .query_row("SELECT number, name FROM snaps_site", [], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })
                .unwrap();
            assert_eq!(
                (number, name.as_str()),
                (f.site.number.0, f.site.name.as_str())
            );
            let mapped_rows: i64 = store
                .conn
                .query_row("SELECT count(*) FROM snaps_mapping", [], |r| r.get(0))
                .unwrap();
            assert_eq!(mapped_rows as usize, f.rows.len());
            let stats = store.stats().unwrap();
            assert_eq!(stats.len(), STAT_COUNTERS.len());
            assert!(
                stats
                    .iter()
                    .all(|(n, v)| STAT_COUNTERS.contains(&n.as_str()) && *v == 0)
            );
            let version: i32 = store
                .conn
                .pragma_query_value(None, "user_version", |r| r.get(0))
                .unwrap();
            assert_eq!(version, SCHEMA_VERSION);
            let mode: String = store
                .conn
                .pragma_query_value(None, "journal_mode", |r| r.get(0))
                .unwrap();
            assert_eq!(mode, "wal");
        }
        // The conversion functions are kept with their rows.
        let store = SiteStore::open(&dir.path().join("CPH.db")).unwrap();
        let gp: (String, String) = store
            .conn
            .query_row(
                "SELECT to_global, to_local FROM snaps_mapping \
                 WHERE local_relation = 'patient' AND local_attribute = 'gp'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!(gp, ("int_widen".to_string(), "int_narrow".to_string()));
    }

    #[test]
    fn select_star_ends_with_the_status_column() {
        let dir = TempDir::new().unwrap();
        let f = fixture("CPH");
        let store = f.create(&dir.path().join("CPH.db")).unwrap();
        let stmt = store.conn.prepare("SELECT * FROM patient").unwrap();
        let got: Vec<&str> = stmt.column_names().collect();
        let mut expected: Vec<&str> = f
            .local
            .relation("patient")
            .unwrap()
            .attributes
            .iter()
            .map(|a| a.name.as_str())
            .collect();
        expected.push(STATUS_COLUMN);
        assert_eq!(got, expected);
        let stmt = store.conn.prepare("SELECT * FROM rsb_codes").unwrap();
        assert!(!stmt.column_names().any(|c| c == STATUS_COLUMN));
    }

    #[test]
    fn loads_generated_rows_as_new_local_data() {
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("CPH.db");
        let f = fixture("CPH");
        let data = f.data(40);
        let mut store = f.create(&path).unwrap();
        for (relation, rows) in &data.rows {
            assert_eq!(
                store.load(relation, rows).unwrap(),
                rows.len(),
                "{relation}"
            );
        }
        assert_eq!(store.count("patient").unwrap(), 40);
        for (relation, rows) in &data.rows {
            assert_eq!(
                store.count(relation).unwrap(),
                rows.len() as i64,
                "{relation}"
            );
            assert_eq!(
                &store.rows(relation).unwrap(),
                rows,
                "{relation} reads back as loaded"
            );
        }
        let pno = data.rows["patient"][0][0].clone();
        let Value::Int(pno) = pno else {
            panic!("pno {pno:?}")
        };
        let status = store.status_of("patient", pno).unwrap();
        assert_eq!(status, LocalStatus::new_local());
        assert_eq!(status.tuple_type, TupleType::Local);
        assert!(status.new && !status.modified);
        for relation in [
            "doctor",
            "out_go_r",
            "patient",
            "sites",
            "visit",
            "visit_rep",
        ] {
            let sql = format!("SELECT count(*) FROM {relation} WHERE snaps_status <> ?1");
            let other: i64 = store
                .conn
                .query_row(&sql, [new_local()], |r| r.get(0))
                .unwrap();
            assert_eq!(other, 0, "{relation}: every loaded tuple is new local data");
        }
        assert!(
            store
                .status_of("rsb_codes", 1)
                .unwrap_err()
                .to_string()
                .contains("not mapped")
        );
        assert!(
            store
                .status_of("patient", -1)
                .unwrap_err()
                .to_string()
                .contains("no tuple")
        );
        assert_eq!(
            store.count("accounts").unwrap_err().to_string(),
            "no relation accounts at this site"
        );
        drop(store);

        let store = SiteStore::open(&path).unwrap();
        assert_eq!(
            store.catalog(),
            &f.local,
            "the catalog reads back from the database"
        );
        assert_eq!(store.site_code().unwrap(), "CPH");
        assert!(store.is_mapped("patient") && !store.is_mapped("rsb_codes"));
        assert_eq!(
            store.count("visit").unwrap(),
            data.rows["visit"].len() as i64
        );
    }

    #[test]
    fn a_bad_row_is_refused_and_nothing_is_inserted() {
        let dir = TempDir::new().unwrap();
        let f = fixture("CPH");
        let data = f.data(10);
        let mut store = f.create(&dir.path().join("CPH.db")).unwrap();
        let patient = f.local.relation("patient").unwrap();
        let surname = patient.position("surname").unwrap();
        let good = &data.rows["patient"];

        let mut rows = good.clone();
        rows[2][surname] = Value::text("Featherstonehaugh-Smyt");
        assert_eq!(
            store.load("patient", &rows[..3]).unwrap(),
            3,
            "22 characters fit c22"
        );
        assert_eq!(store.count("patient").unwrap(), 3);

        let dir = TempDir::new().unwrap();
        let mut store = f.create(&dir.path().join("CPH.db")).unwrap();
        rows[2][surname] = Value::text("Featherstonehaugh-Smyth");
        let e = store.load("patient", &rows).unwrap_err();
        assert_eq!(
            e.to_string(),
            "load patient, row 3: value 'Featherstonehaugh-Smyth' does not fit patient.surname (c22)"
        );
        assert_eq!(store.count("patient").unwrap(), 0);

        let mut rows = good.clone();
        rows[4][0] = Value::Null;
        let e = store.load("patient", &rows).unwrap_err();
        assert_eq!(
            e.to_string(),
            "load patient, row 5: patient.pno may not be NULL"
        );
        let mut rows = good.clone();
        rows[1].pop();
        let e = store.load("patient", &rows).unwrap_err();
        assert_eq!(
            e.to_string(),
            "load patient, row 2: 23 values for the 24 attributes of patient"
        );
        // A duplicate key fails in SQLite, after rows before it were inserted
        // in the transaction: they are rolled back.
        let mut rows = good.clone();
        rows.push(good[0].clone());
        let e = store.load("patient", &rows).unwrap_err().to_string();
        assert!(
            e.starts_with("load patient, row 11: UNIQUE constraint failed: patient.pno"),
            "{e}"
        );
        assert_eq!(store.count("patient").unwrap(), 0);
        assert_eq!(store.load("patient", good).unwrap(), 10);
    }

    #[test]
    fn direct_updates_of_mapped_attributes_set_the_modified_bit() {
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("CPH.db");
        let f = fixture("CPH");
        let data = f.data(10);
        let mut store = f.create(&path).unwrap();
        store.load("patient", &data.rows["patient"]).unwrap();
        let pnos: Vec<i64> = data.rows["patient"]
            .iter()
            .map(|r| match r[0] {
                Value::Int(p) => p,
                ref v => panic!("pno {v:?}"),
            })
            .collect();

        // Another program on the same file, as the radiology application
        // would be. The refresh has run: nothing is new any more.
        let app = Connection::open(&path).unwrap();
        app.execute("UPDATE patient SET snaps_status = snaps_status & ~16", [])
            .unwrap();
        let settled = store.status_of("patient", pnos[0]).unwrap();
        assert!(!settled.new && !settled.modified);
        assert_eq!(settled.tuple_type, TupleType::Local);
        assert_eq!(settled.rights, LocalRights::ReadWrite);

        // A mapped attribute changes: modified.
        app.execute(
            "UPDATE patient SET surname = 'Kenworthy' WHERE pno = ?1",
            [pnos[0]],
        )
        .unwrap();
        let s = store.status_of("patient", pnos[0]).unwrap();
        assert!(s.modified && !s.new);
        assert_eq!(
            LocalStatus {
                modified: false,
                ..s
            },
            settled,
            "only the modified bit changes"
        );
        // A second change leaves it set.
        app.execute(
            "UPDATE patient SET dob = 19340512 WHERE pno = ?1",
            [pnos[0]],
        )
        .unwrap();
        assert!(store.status_of("patient", pnos[0]).unwrap().modified);

        // CPH does not map vip: nothing the global snapshot holds changed.
        app.execute("UPDATE patient SET vip = 'Y' WHERE pno = ?1", [pnos[1]])
            .unwrap();
        assert!(!store.status_of("patient", pnos[1]).unwrap().modified);
        // Writing the value a tuple already has changes nothing either.
        app.execute(
            "UPDATE patient SET surname = surname WHERE pno = ?1",
            [pnos[1]],
        )
        .unwrap();
        assert!(!store.status_of("patient", pnos[1]).unwrap().modified);

        // A new tuple stays new, not modified: the refresh pushes it whole.
        store
            .load("patient", &f.data(11).rows["patient"][10..])
            .unwrap();
        let fresh = store.rows("patient").unwrap().last().unwrap()[0].clone();
        let Value::Int(fresh) = fresh else {
            panic!("pno {fresh:?}")
        };
        app.execute(
            "UPDATE patient SET surname = 'Tripp' WHERE pno = ?1",
            [fresh],
        )
        .unwrap();
        assert_eq!(
            store.status_of("patient", fresh).unwrap(),
            LocalStatus::new_local()
        );

        // A tuple the controller is copying in (just-copied set) is left alone.
        let copying = LocalStatus {
            tuple_type: TupleType::Snapshot,
            rights: LocalRights::Unknown,
            new: false,
            modified: false,
            just_copied: 3,
        };
        app.execute(
            "UPDATE patient SET snaps_status = ?1 WHERE pno = ?2",
            [i64::from(copying.to_byte().unwrap()), pnos[2]],
        )
        .unwrap();
        app.execute(
            "UPDATE patient SET surname = 'Jones' WHERE pno = ?1",
            [pnos[2]],
        )
        .unwrap();
        assert_eq!(store.status_of("patient", pnos[2]).unwrap(), copying);
    }

    #[test]
    fn create_refuses_an_existing_file() {
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("CPH.db");
        let f = fixture("CPH");
        let mut store = f.create(&path).unwrap();
        store.load("patient", &f.data(5).rows["patient"]).unwrap();
        drop(store);
        let e = f.create(&path).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "{} already exists: a site database is never overwritten (remove it, or choose another path)",
                path.display()
            )
        );
        assert_eq!(
            SiteStore::open(&path).unwrap().count("patient").unwrap(),
            5,
            "left intact"
        );

        let other = dir.path().join("notes.txt");
        fs::write(&other, "not a database").unwrap();
        assert!(
            f.create(&other)
                .unwrap_err()
                .to_string()
                .contains("already exists")
        );
        assert_eq!(fs::read_to_string(&other).unwrap(), "not a database");
    }

    #[test]
    fn create_refuses_inconsistent_definitions_and_leaves_no_file() {
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("CPH.db");
        let f = fixture("CPH");
        let stg = fixture("STG");
        let e = SiteStore::create(&path, &f.site, &f.local, &stg.rows, &f.quals, &f.mapping)
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "27 mapping rows were given for a mapping of 50 attribute maps"
        );
        assert!(!path.exists());
        let e = SiteStore::create(&path, &f.site, &f.local, &f.rows, &f.quals, &stg.mapping)
            .unwrap_err();
        assert!(
            e.to_string().contains("is not part of the site's mapping"),
            "{e}"
        );
        assert!(!path.exists());

        // Rows that pass the checks but break a bookkeeping key fail inside
        // the transaction; the half-made file is removed.
        let twice = QualificationRow {
            row: 1,
            local_relation: "patient".into(),
            qualification: "x".into(),
        };
        let quals = [twice.clone(), twice];
        let e =
            SiteStore::create(&path, &f.site, &f.local, &f.rows, &quals, &f.mapping).unwrap_err();
        assert!(e.to_string().contains("UNIQUE constraint failed"), "{e}");
        assert!(!path.exists());
        f.create(&path).unwrap();
    }

    #[test]
    fn open_refuses_what_is_not_a_site_database() {
        let dir = TempDir::new().unwrap();
        let missing = dir.path().join("missing.db");
        let e = SiteStore::open(&missing).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("no site database at {}", missing.display())
        );

        let plain = dir.path().join("plain.db");
        Connection::open(&plain)
            .unwrap()
            .execute_batch("CREATE TABLE patient (pno INTEGER)")
            .unwrap();
        let e = SiteStore::open(&plain).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "{} is not a SNAPS site database: it has no snaps_site table",
                plain.display()
            )
        );

        let text = dir.path().join("text.db");
        fs::write(&text, "x".repeat(4096)).unwrap();
        let e = SiteStore::open(&text).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!(
                "{} is not a SNAPS site database: ",
                text.display()
            )),
            "{e}"
        );

        let future = dir.path().join("future.db");
        fixture("GRC").create(&future).unwrap();
        Connection::open(&future)
            .unwrap()
            .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        let e = SiteStore::open(&future).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "{} is a SNAPS site database of layout version {}; this build reads version {SCHEMA_VERSION}",
                future.display(),
                SCHEMA_VERSION + 1
            )
        );
    }

    #[test]
    fn an_older_layout_gains_the_tables_it_lacks_in_place() {
        let dir = TempDir::new().unwrap();
        let old = dir.path().join("layout3.db");
        fixture("GRC").create(&old).unwrap();
        let conn = Connection::open(&old).unwrap();
        conn.execute_batch(
            "DROP TABLE snaps_link; DROP TABLE snaps_summary_item; DROP TABLE snaps_summary;
             PRAGMA user_version = 3;",
        )
        .unwrap();
        drop(conn);
        let store = SiteStore::open(&old).unwrap();
        let version: i32 = store
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        for table in ["snaps_summary", "snaps_summary_item", "snaps_link"] {
            let n: i64 = store
                .conn
                .query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
                .unwrap();
            assert_eq!(n, 0, "{table} is there and empty");
        }
    }
}
