//! A PostgreSQL catalogue for tools: the queries psql's `\dt`, `\d`,
//! `\d NAME`, `\dn` and `\l` send (and drivers' `information_schema.tables`
//! and `.columns`) are answered from the site's own schema — its
//! application relations, their columns, types and keys, never SNAPS'
//! status column or `snaps_` bookkeeping.
//!
//! No well-kept crate emulates PostgreSQL's catalogue over SQLite (the
//! projects that do are applications, not libraries), so this is a small
//! one: the catalogue's relations are built in an in-memory SQLite database
//! for each question, the query is brought to SQLite's syntax (schema
//! prefixes, `~` as REGEXP, casts dropped) and run there, with the catalogue
//! functions psql calls defined on that database. A question about
//! something SNAPS never has (row security policies, extended statistics,
//! publications) gets no rows; anything else it cannot answer is an error
//! naming the catalogue, not SQLite's syntax error.

use std::collections::HashMap;
use std::sync::OnceLock;

use regex::Regex;
use rusqlite::fallible_iterator::FallibleIterator;
use rusqlite::functions::FunctionFlags;
use rusqlite::{Connection, params};
use snaps_schema::{Catalog, Value, ValueType};

use crate::engine::{ColumnKind, Outcome, ResultColumn};
use crate::{Error, Result};

/// The oid of the first application relation (PostgreSQL's first user oid).
const FIRST_OID: i64 = 16384;
/// `public`'s oid, as in PostgreSQL.
const PUBLIC: i64 = 2200;

/// Catalogue relations SNAPS never has rows in: a query reading mainly
/// from one of them that SQLite cannot run is answered with no rows.
const ALWAYS_EMPTY: &[&str] = &[
    "pg_policy",
    "pg_statistic_ext",
    "pg_publication",
    "pg_inherits",
    "pg_trigger",
    "pg_rewrite",
    "pg_description",
];

/// Whether `text` asks the PostgreSQL catalogue.
pub(crate) fn asks(text: &str) -> bool {
    let lower = text.to_ascii_lowercase();
    lower.contains("pg_catalog.") || lower.contains("information_schema.")
}

/// Answers a catalogue query from `catalog` (the site's application
/// relations) for database `database`.
pub(crate) fn answer(catalog: &Catalog, database: &str, text: &str) -> Result<Vec<Outcome>> {
    let conn = build(catalog, database)?;
    let sql = to_sqlite(text);
    match run(&conn, &sql) {
        Ok(out) => Ok(out),
        Err(e) => {
            let reads = main_relation(&sql);
            if reads.is_some_and(|r| ALWAYS_EMPTY.contains(&r.as_str())) {
                return Ok(vec![Outcome::Rows {
                    columns: vec![ResultColumn {
                        name: "?column?".into(),
                        kind: ColumnKind::Text,
                    }],
                    rows: Vec::new(),
                }]);
            }
            Err(Error::Invalid(format!(
                "this PostgreSQL catalogue query is not supported by SNAPS' catalogue \
                 (psql's \\d, \\dt, \\dn, \\l and information_schema.tables/columns are): {e}"
            )))
        }
    }
}

fn re(cell: &'static OnceLock<Regex>, pattern: &str) -> &'static Regex {
    cell.get_or_init(|| Regex::new(pattern).expect("a valid pattern"))
}

/// PostgreSQL's catalogue SQL as SQLite runs it on the catalogue database.
fn to_sqlite(text: &str) -> String {
    static OPERATOR: OnceLock<Regex> = OnceLock::new();
    static NOT_MATCH: OnceLock<Regex> = OnceLock::new();
    static MATCH: OnceLock<Regex> = OnceLock::new();
    static COLLATE: OnceLock<Regex> = OnceLock::new();
    static CAST: OnceLock<Regex> = OnceLock::new();
    static ESCAPE: OnceLock<Regex> = OnceLock::new();
    static INFO: OnceLock<Regex> = OnceLock::new();
    let s = re(&OPERATOR, r"OPERATOR\(pg_catalog\.~\)").replace_all(text, " REGEXP ");
    let s = re(&NOT_MATCH, r"!~").replace_all(&s, " NOT REGEXP ");
    let s = re(&MATCH, r"\s~\s").replace_all(&s, " REGEXP ");
    let s = re(&COLLATE, r"(?i)COLLATE\s+pg_catalog\.\w+").replace_all(&s, "");
    let s = re(&CAST, r"::[A-Za-z_][\w.]*(\[\])?").replace_all(&s, "");
    let s = re(&ESCAPE, r"E'\\n'").replace_all(&s, "char(10)");
    let s = re(&INFO, r"(?i)information_schema\.(\w+)").replace_all(&s, "information_schema_$1");
    s.replace("pg_catalog.", "")
}

/// The relation the outermost `FROM` of a query names first, if any.
fn main_relation(sql: &str) -> Option<String> {
    let lower = sql.to_ascii_lowercase();
    let bytes = lower.as_bytes();
    let mut depth = 0i32;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'(' => depth += 1,
            b')' => depth -= 1,
            b'f' if depth == 0
                && lower[i..].starts_with("from")
                && (i == 0 || !bytes[i - 1].is_ascii_alphanumeric()) =>
            {
                let name: String = lower[i + 4..]
                    .trim_start()
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                return (!name.is_empty()).then_some(name);
            }
            _ => {}
        }
        i += 1;
    }
    None
}

/// PostgreSQL's name for a type, with its modifier.
fn type_name(ty: ValueType) -> (i64, &'static str, i64) {
    match ty {
        ValueType::Int2 => (21, "smallint", -1),
        ValueType::Int4 => (23, "integer", -1),
        ValueType::Float4 => (700, "real", -1),
        ValueType::Char(n) => (1042, "character", i64::from(n) + 4),
    }
}

/// The catalogue database for `catalog`.
fn build(catalog: &Catalog, database: &str) -> Result<Connection> {
    let conn = Connection::open_in_memory()?;
    conn.execute_batch(
        "CREATE TABLE pg_namespace (oid INTEGER, nspname TEXT, nspowner INTEGER, nspacl TEXT);
         CREATE TABLE pg_class (oid INTEGER, relname TEXT, relnamespace INTEGER, relkind TEXT,
             relowner INTEGER, relam INTEGER, relchecks INTEGER, relhasindex TEXT, relhasrules TEXT,
             relhastriggers TEXT, relrowsecurity TEXT, relforcerowsecurity TEXT,
             relispartition TEXT, reltablespace INTEGER, reloftype INTEGER, relpersistence TEXT,
             relreplident TEXT, reltoastrelid INTEGER, relpartbound TEXT, reltuples REAL, relacl TEXT);
         CREATE TABLE pg_am (oid INTEGER, amname TEXT);
         CREATE TABLE pg_type (oid INTEGER, typname TEXT, typnamespace INTEGER, typcollation INTEGER,
             typlen INTEGER, typtype TEXT);
         CREATE TABLE pg_attribute (attrelid INTEGER, attname TEXT, atttypid INTEGER,
             atttypmod INTEGER, attnum INTEGER, attnotnull TEXT, atthasdef TEXT,
             attisdropped TEXT, attcollation INTEGER, attidentity TEXT, attgenerated TEXT);
         CREATE TABLE pg_attrdef (oid INTEGER, adrelid INTEGER, adnum INTEGER, adbin TEXT);
         CREATE TABLE pg_collation (oid INTEGER, collname TEXT);
         CREATE TABLE pg_index (indexrelid INTEGER, indrelid INTEGER, indisprimary TEXT,
             indisunique TEXT, indisclustered TEXT, indisvalid TEXT, indisreplident TEXT, indkey TEXT);
         CREATE TABLE pg_constraint (oid INTEGER, conname TEXT, conrelid INTEGER, conindid INTEGER,
             contype TEXT, condeferrable TEXT, condeferred TEXT, connamespace INTEGER);
         CREATE TABLE pg_database (oid INTEGER, datname TEXT, datdba INTEGER, encoding INTEGER,
             datcollate TEXT, datctype TEXT, daticulocale TEXT, datlocprovider TEXT, datacl TEXT);
         CREATE TABLE pg_roles (oid INTEGER, rolname TEXT);
         CREATE TABLE pg_policy (polname TEXT, polpermissive TEXT, polroles TEXT, polqual TEXT,
             polwithcheck TEXT, polcmd TEXT, polrelid INTEGER);
         CREATE TABLE pg_statistic_ext (oid INTEGER, stxrelid INTEGER, stxnamespace INTEGER,
             stxname TEXT, stxkind TEXT, stxstattarget INTEGER);
         CREATE TABLE pg_publication (oid INTEGER, pubname TEXT, puballtables TEXT);
         CREATE TABLE pg_publication_namespace (pnpubid INTEGER, pnnspid INTEGER);
         CREATE TABLE pg_publication_rel (prpubid INTEGER, prrelid INTEGER, prqual TEXT, prattrs TEXT);
         CREATE TABLE pg_inherits (inhrelid INTEGER, inhparent INTEGER, inhseqno INTEGER,
             inhdetachpending TEXT);
         CREATE TABLE pg_trigger (tgrelid INTEGER, tgname TEXT);
         CREATE TABLE pg_rewrite (ev_class INTEGER, rulename TEXT);
         CREATE TABLE pg_description (objoid INTEGER, classoid INTEGER, objsubid INTEGER,
             description TEXT);
         CREATE TABLE information_schema_tables (table_catalog TEXT, table_schema TEXT,
             table_name TEXT, table_type TEXT);
         CREATE TABLE information_schema_columns (table_catalog TEXT, table_schema TEXT,
             table_name TEXT, column_name TEXT, ordinal_position INTEGER, column_default TEXT,
             is_nullable TEXT, data_type TEXT, character_maximum_length INTEGER,
             numeric_precision INTEGER);
         INSERT INTO pg_namespace VALUES (11, 'pg_catalog', 10, NULL), (2200, 'public', 10, NULL),
             (13000, 'information_schema', 10, NULL);
         INSERT INTO pg_am VALUES (2, 'heap'), (403, 'btree');
         INSERT INTO pg_roles VALUES (10, 'snaps');
         INSERT INTO pg_type VALUES (21, 'int2', 11, 0, 2, 'b'), (23, 'int4', 11, 0, 4, 'b'),
             (700, 'float4', 11, 0, 4, 'b'), (1042, 'bpchar', 11, 100, -1, 'b'),
             (25, 'text', 11, 100, -1, 'b');",
    )?;
    conn.execute(
        "INSERT INTO pg_database VALUES (1, ?1, 10, 6, 'C', 'C', NULL, 'c', NULL)",
        [database],
    )?;
    let mut formats: HashMap<(i64, i64), String> = HashMap::new();
    let mut indexdefs: HashMap<i64, String> = HashMap::new();
    let mut constraintdefs: HashMap<i64, String> = HashMap::new();
    let mut oid = FIRST_OID;
    for r in catalog.relations() {
        let rel = oid;
        let index = oid + 1;
        oid += 2;
        let keyed = !r.key.is_empty();
        conn.execute(
            "INSERT INTO pg_class VALUES (?1, ?2, ?3, 'r', 10, 2, 0, ?4, 'f', 'f', 'f', 'f', 'f', 0, 0,
                 'p', 'd', 0, NULL, -1, NULL)",
            params![rel, r.name, PUBLIC, if keyed { "t" } else { "f" }],
        )?;
        conn.execute(
            "INSERT INTO information_schema_tables VALUES (?1, 'public', ?2, 'BASE TABLE')",
            params![database, r.name],
        )?;
        for (i, a) in r.attributes.iter().enumerate() {
            let (ty, name, typmod) = type_name(a.ty);
            let not_null = a.not_null || r.key.contains(&a.name);
            formats.insert(
                (ty, typmod),
                match a.ty {
                    ValueType::Char(n) => format!("{name}({n})"),
                    _ => name.to_string(),
                },
            );
            conn.execute(
                "INSERT INTO pg_attribute VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'f', 'f', 0, '', '')",
                params![
                    rel,
                    a.name,
                    ty,
                    typmod,
                    i as i64 + 1,
                    if not_null { "t" } else { "f" }
                ],
            )?;
            let length = match a.ty {
                ValueType::Char(n) => Some(i64::from(n)),
                _ => None,
            };
            conn.execute(
                "INSERT INTO information_schema_columns VALUES (?1, 'public', ?2, ?3, ?4, NULL, ?5, ?6, ?7, NULL)",
                params![
                    database,
                    r.name,
                    a.name,
                    i as i64 + 1,
                    if not_null { "NO" } else { "YES" },
                    name,
                    length
                ],
            )?;
        }
        if keyed {
            let ix = format!("{}_pkey", r.name);
            conn.execute(
                "INSERT INTO pg_class VALUES (?1, ?2, ?3, 'i', 10, 403, 0, 'f', 'f', 'f', 'f', 'f', 'f',
                     0, 0, 'p', 'n', 0, NULL, -1, NULL)",
                params![index, ix, PUBLIC],
            )?;
            conn.execute(
                "INSERT INTO pg_index VALUES (?1, ?2, 't', 't', 'f', 't', 'f', '')",
                params![index, rel],
            )?;
            conn.execute(
                "INSERT INTO pg_constraint VALUES (?1, ?2, ?3, ?4, 'p', 'f', 'f', ?5)",
                params![index, ix, rel, index, PUBLIC],
            )?;
            let cols = r.key.join(", ");
            indexdefs.insert(
                index,
                format!(
                    "CREATE UNIQUE INDEX {ix} ON public.{} USING btree ({cols})",
                    r.name
                ),
            );
            constraintdefs.insert(index, format!("PRIMARY KEY ({cols})"));
        }
    }
    define_functions(&conn, formats, indexdefs, constraintdefs)?;
    Ok(conn)
}

/// The catalogue functions psql and drivers call, on the catalogue
/// database.
fn define_functions(
    conn: &Connection,
    formats: HashMap<(i64, i64), String>,
    indexdefs: HashMap<i64, String>,
    constraintdefs: HashMap<i64, String>,
) -> Result<()> {
    let flags = FunctionFlags::SQLITE_UTF8 | FunctionFlags::SQLITE_DETERMINISTIC;
    conn.create_scalar_function("regexp", 2, flags, |ctx| {
        let pattern: String = ctx.get(0)?;
        let text: Option<String> = ctx.get(1)?;
        let re =
            Regex::new(&pattern).map_err(|e| rusqlite::Error::UserFunctionError(Box::new(e)))?;
        Ok(text.is_some_and(|t| re.is_match(&t)))
    })?;
    conn.create_scalar_function("format_type", 2, flags, move |ctx| {
        let ty: i64 = ctx.get(0)?;
        let typmod: i64 = ctx.get(1)?;
        Ok(formats.get(&(ty, typmod)).cloned())
    })?;
    conn.create_scalar_function("pg_get_indexdef", 3, flags, move |ctx| {
        Ok(indexdefs.get(&ctx.get::<i64>(0)?).cloned())
    })?;
    conn.create_scalar_function("pg_get_constraintdef", 2, flags, move |ctx| {
        Ok(constraintdefs.get(&ctx.get::<i64>(0)?).cloned())
    })?;
    conn.create_scalar_function("pg_get_userbyid", 1, flags, |_| Ok("snaps"))?;
    conn.create_scalar_function("pg_table_is_visible", 1, flags, |_| Ok(true))?;
    conn.create_scalar_function("pg_encoding_to_char", 1, flags, |_| Ok("UTF8"))?;
    conn.create_scalar_function("pg_relation_is_publishable", 1, flags, |_| Ok(false))?;
    conn.create_scalar_function("current_schema", 0, flags, |_| Ok("public"))?;
    for n in 2..=3 {
        conn.create_scalar_function("pg_get_expr", n, flags, |_| Ok(None::<String>))?;
    }
    conn.create_scalar_function("array_to_string", 2, flags, |ctx| {
        ctx.get::<Option<String>>(0)
    })?;
    conn.create_scalar_function("obj_description", 2, flags, |_| Ok(None::<String>))?;
    conn.create_scalar_function("col_description", 2, flags, |_| Ok(None::<String>))?;
    Ok(())
}

/// Runs the rewritten text on the catalogue database.
fn run(conn: &Connection, sql: &str) -> Result<Vec<Outcome>> {
    let mut out = Vec::new();
    let mut batch = rusqlite::Batch::new(conn, sql);
    while let Some(mut stmt) = batch.next()? {
        let columns: Vec<ResultColumn> = (0..stmt.column_count())
            .map(|i| ResultColumn {
                name: stmt.column_name(i).unwrap_or("?column?").to_string(),
                kind: ColumnKind::Text,
            })
            .collect();
        let width = columns.len();
        let mut rows = Vec::new();
        let mut q = stmt.raw_query();
        while let Some(r) = q.next()? {
            let mut row = Vec::with_capacity(width);
            for i in 0..width {
                row.push(match r.get_ref(i)? {
                    rusqlite::types::ValueRef::Null => Value::Null,
                    rusqlite::types::ValueRef::Integer(n) => Value::Text(n.to_string()),
                    rusqlite::types::ValueRef::Real(f) => Value::Text(f.to_string()),
                    rusqlite::types::ValueRef::Text(t) | rusqlite::types::ValueRef::Blob(t) => {
                        Value::Text(String::from_utf8_lossy(t).into_owned())
                    }
                });
            }
            rows.push(row);
        }
        out.push(Outcome::Rows { columns, rows });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psql_syntax_becomes_sqlite() {
        let sql = to_sqlite(
            "SELECT c.oid::pg_catalog.regclass FROM pg_catalog.pg_class c \
             WHERE c.relname OPERATOR(pg_catalog.~) '^(patient)$' COLLATE pg_catalog.default \
             AND n.nspname !~ '^pg_toast'",
        );
        assert_eq!(
            sql,
            "SELECT c.oid FROM pg_class c WHERE c.relname  REGEXP  '^(patient)$'  \
             AND n.nspname  NOT REGEXP  '^pg_toast'"
        );
        assert_eq!(
            to_sqlite("SELECT * FROM information_schema.columns"),
            "SELECT * FROM information_schema_columns"
        );
        assert_eq!(
            main_relation("SELECT array(select x from pg_roles) FROM pg_policy p").as_deref(),
            Some("pg_policy")
        );
    }
}
