//! A PostgreSQL catalogue for tools: the queries psql's `\dt`, `\dt+`,
//! `\d`, `\d NAME`, `\d+ NAME`, `\df`, `\di`, `\dn` and `\l` send, drivers' `information_schema.tables`
//! and `.columns`, SQLAlchemy's table names and columns, `version()`,
//! `current_schema()` and the `SHOW` settings drivers read are answered from the site's own schema — its
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
    static FUNCTIONS: OnceLock<Regex> = OnceLock::new();
    let lower = text.to_ascii_lowercase();
    lower.trim_start().starts_with("show ")
        || lower.contains("pg_catalog.")
        || lower.contains("information_schema.")
        || re(
            &FUNCTIONS,
            r"\b(current_schema|current_database|version)\s*\(|\b(from|join)\s+pg_[a-z_]+\b",
        )
        .is_match(&lower)
}

/// Answers a catalogue query from `catalog` (the site's application
/// relations) for database `database`.
pub(crate) fn answer(catalog: &Catalog, database: &str, text: &str) -> Result<Vec<Outcome>> {
    if let Some(name) = text.trim_start().get(5..).filter(|_| {
        text.trim_start()
            .get(..5)
            .is_some_and(|s| s.eq_ignore_ascii_case("show "))
    }) {
        return show(name);
    }
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
                 (psql's \\d, \\d+, \\dt, \\dt+, \\df, \\dn, \\l, information_schema.tables/columns and \
                 SQLAlchemy's table names and columns are): {e}"
            )))
        }
    }
}

/// `SHOW name`: the settings drivers ask for, as a PostgreSQL 15 server
/// over SQLite has them (SQLite's transactions are serializable).
fn show(name: &str) -> Result<Vec<Outcome>> {
    let name = name
        .trim()
        .trim_end_matches(';')
        .trim()
        .to_ascii_lowercase();
    let (column, value) = match name.as_str() {
        "transaction isolation level" | "transaction_isolation" => {
            ("transaction_isolation", "serializable")
        }
        "default_transaction_isolation" => ("default_transaction_isolation", "serializable"),
        "standard_conforming_strings" => ("standard_conforming_strings", "on"),
        "server_version" => ("server_version", "15.0"),
        "server_version_num" => ("server_version_num", "150000"),
        "server_encoding" => ("server_encoding", "UTF8"),
        "client_encoding" => ("client_encoding", "UTF8"),
        "datestyle" => ("DateStyle", "ISO, MDY"),
        "timezone" => ("TimeZone", "UTC"),
        "search_path" => ("search_path", "public"),
        "integer_datetimes" => ("integer_datetimes", "on"),
        "max_identifier_length" => ("max_identifier_length", "63"),
        other => {
            return Err(Error::Invalid(format!(
                "unrecognized configuration parameter \"{other}\" (SNAPS answers SHOW for the \
                 settings drivers read: transaction isolation level, standard_conforming_strings, \
                 server_version, client_encoding, DateStyle, TimeZone, search_path, ...)"
            )));
        }
    };
    Ok(vec![Outcome::Rows {
        columns: vec![ResultColumn {
            name: column.into(),
            kind: ColumnKind::Text,
        }],
        rows: vec![vec![Value::Text(value.into())]],
    }])
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
    static ANY: OnceLock<Regex> = OnceLock::new();
    static TOAST: OnceLock<Regex> = OnceLock::new();
    // psql's `\d+` appends a TOAST table's options, which SQLite has not.
    let text = re(
        &TOAST,
        r"(?i)\|\|\s*array\(select [^()]*unnest\([^()]*\)[^()]*\)",
    )
    .replace_all(text, "");
    let s = re(&ANY, r"(?i)=\s*ANY\s*\(\s*ARRAY\[([^\]]*)\]\s*\)").replace_all(&text, " IN ($1)");
    let s = re(&OPERATOR, r"OPERATOR\(pg_catalog\.~\)").replace_all(&s, " REGEXP ");
    let s = re(&NOT_MATCH, r"!~").replace_all(&s, " NOT REGEXP ");
    let s = re(&MATCH, r"\s~\s").replace_all(&s, " REGEXP ");
    let s = re(&COLLATE, r"(?i)COLLATE\s+pg_catalog\.\w+").replace_all(&s, "");
    let s = re(&CAST, r"::[A-Za-z_][\w.]*(\[\])?").replace_all(&s, "");
    let s = re(&ESCAPE, r"E'\\n'").replace_all(&s, "char(10)");
    let s = re(&INFO, r"(?i)information_schema\.(\w+)").replace_all(&s, "information_schema_$1");
    s.replace("pg_catalog.", "")
        .replace("json_build_object(", "json_object(")
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
             relowner INTEGER, relam INTEGER, relchecks INTEGER, relhasindex BOOL, relhasrules BOOL,
             relhastriggers BOOL, relrowsecurity BOOL, relforcerowsecurity BOOL,
             relispartition BOOL, reltablespace INTEGER, reloftype INTEGER, relpersistence TEXT,
             relreplident TEXT, reltoastrelid INTEGER, relpartbound TEXT, reltuples REAL, relacl TEXT,
             reloptions TEXT);
         CREATE TABLE pg_am (oid INTEGER, amname TEXT);
         CREATE TABLE pg_type (oid INTEGER, typname TEXT, typnamespace INTEGER, typcollation INTEGER,
             typlen INTEGER, typtype TEXT, typarray INTEGER, typdelim TEXT, typelem INTEGER,
             typbasetype INTEGER, typnotnull BOOL, typtypmod INTEGER, typrelid INTEGER);
         CREATE TABLE pg_attribute (attrelid INTEGER, attname TEXT, atttypid INTEGER,
             atttypmod INTEGER, attnum INTEGER, attnotnull BOOL, atthasdef BOOL,
             attisdropped BOOL, attcollation INTEGER, attidentity TEXT, attgenerated TEXT,
             attstorage TEXT, attcompression TEXT, attstattarget INTEGER);
         CREATE TABLE pg_proc (oid INTEGER, proname TEXT, pronamespace INTEGER, prokind TEXT);
         CREATE TABLE pg_attrdef (oid INTEGER, adrelid INTEGER, adnum INTEGER, adbin TEXT);
         CREATE TABLE pg_collation (oid INTEGER, collname TEXT, collnamespace INTEGER);
         CREATE TABLE pg_index (indexrelid INTEGER, indrelid INTEGER, indisprimary BOOL,
             indisunique BOOL, indisclustered BOOL, indisvalid BOOL, indisreplident BOOL, indkey TEXT);
         CREATE TABLE pg_constraint (oid INTEGER, conname TEXT, conrelid INTEGER, conindid INTEGER,
             contype TEXT, condeferrable BOOL, condeferred BOOL, connamespace INTEGER);
         CREATE TABLE pg_database (oid INTEGER, datname TEXT, datdba INTEGER, encoding INTEGER,
             datcollate TEXT, datctype TEXT, daticulocale TEXT, datlocprovider TEXT, datacl TEXT);
         CREATE TABLE pg_roles (oid INTEGER, rolname TEXT);
         CREATE TABLE pg_policy (polname TEXT, polpermissive BOOL, polroles TEXT, polqual TEXT,
             polwithcheck TEXT, polcmd TEXT, polrelid INTEGER);
         CREATE TABLE pg_statistic_ext (oid INTEGER, stxrelid INTEGER, stxnamespace INTEGER,
             stxname TEXT, stxkind TEXT, stxstattarget INTEGER);
         CREATE TABLE pg_publication (oid INTEGER, pubname TEXT, puballtables BOOL);
         CREATE TABLE pg_publication_namespace (pnpubid INTEGER, pnnspid INTEGER);
         CREATE TABLE pg_publication_rel (prpubid INTEGER, prrelid INTEGER, prqual TEXT, prattrs TEXT);
         CREATE TABLE pg_inherits (inhrelid INTEGER, inhparent INTEGER, inhseqno INTEGER,
             inhdetachpending BOOL);
         CREATE TABLE pg_trigger (tgrelid INTEGER, tgname TEXT);
         CREATE TABLE pg_sequence (seqrelid INTEGER, seqstart INTEGER, seqincrement INTEGER,
             seqmin INTEGER, seqmax INTEGER, seqcache INTEGER, seqcycle BOOL);
         CREATE TABLE pg_depend (classid INTEGER, objid INTEGER, objsubid INTEGER,
             refclassid INTEGER, refobjid INTEGER, refobjsubid INTEGER, deptype TEXT);
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
         INSERT INTO pg_type VALUES
             (21, 'int2', 11, 0, 2, 'b', 1005, ',', 0, 0, 'f', -1, 0),
             (23, 'int4', 11, 0, 4, 'b', 1007, ',', 0, 0, 'f', -1, 0),
             (700, 'float4', 11, 0, 4, 'b', 1021, ',', 0, 0, 'f', -1, 0),
             (1042, 'bpchar', 11, 100, -1, 'b', 1014, ',', 0, 0, 'f', -1, 0),
             (25, 'text', 11, 100, -1, 'b', 1009, ',', 0, 0, 'f', -1, 0);",
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
                 'p', 'd', 0, NULL, -1, NULL, NULL)",
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
                "INSERT INTO pg_attribute VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'f', 'f', 0, '', '', ?7, '', -1)",
                params![
                    rel,
                    a.name,
                    ty,
                    typmod,
                    i as i64 + 1,
                    if not_null { "t" } else { "f" },
                    if matches!(a.ty, ValueType::Char(_)) { "x" } else { "p" }
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
                     0, 0, 'p', 'n', 0, NULL, -1, NULL, NULL)",
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
    define_functions(&conn, database, formats, indexdefs, constraintdefs)?;
    Ok(conn)
}

/// The catalogue functions psql and drivers call, on the catalogue
/// database.
fn define_functions(
    conn: &Connection,
    database: &str,
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
    // Types by name: the few the catalogue has, else NULL (as for a type
    // PostgreSQL does not know).
    conn.create_scalar_function("to_regtype", 1, flags, |ctx| {
        let name: Option<String> = ctx.get(0)?;
        Ok(match name.as_deref() {
            Some("int2" | "smallint") => Some(21),
            Some("int4" | "integer") => Some(23),
            Some("float4" | "real") => Some(700),
            Some("bpchar" | "character") => Some(1042),
            Some("text") => Some(25),
            _ => None::<i64>,
        })
    })?;
    for f in [
        "pg_table_is_visible",
        "pg_type_is_visible",
        "pg_collation_is_visible",
        "pg_function_is_visible",
    ] {
        conn.create_scalar_function(f, 1, flags, |_| Ok(true))?;
    }
    conn.create_scalar_function("pg_encoding_to_char", 1, flags, |_| Ok("UTF8"))?;
    conn.create_scalar_function("pg_relation_is_publishable", 1, flags, |_| Ok(false))?;
    conn.create_scalar_function("current_schema", 0, flags, |_| Ok("public"))?;
    let name = database.to_string();
    conn.create_scalar_function("current_database", 0, flags, move |_| Ok(name.clone()))?;
    conn.create_scalar_function("version", 0, flags, |_| {
        Ok(format!(
            "PostgreSQL 15.0 (SNAPS {} site endpoint over SQLite {})",
            env!("CARGO_PKG_VERSION"),
            rusqlite::version()
        ))
    })?;
    for n in 2..=3 {
        conn.create_scalar_function("pg_get_expr", n, flags, |_| Ok(None::<String>))?;
    }
    conn.create_scalar_function("array_to_string", 2, flags, |ctx| {
        ctx.get::<Option<String>>(0)
    })?;
    conn.create_scalar_function("obj_description", 2, flags, |_| Ok(None::<String>))?;
    // Sizes and function signatures SNAPS does not keep: unknown (NULL).
    for (f, n) in [
        ("pg_table_size", 1),
        ("pg_relation_size", 1),
        ("pg_total_relation_size", 1),
        ("pg_indexes_size", 1),
        ("pg_size_pretty", 1),
        ("pg_get_function_result", 1),
        ("pg_get_function_arguments", 1),
    ] {
        conn.create_scalar_function(f, n, flags, |_| Ok(None::<String>))?;
    }
    // SNAPS' relations have no sequences: keys come from the site's range.
    conn.create_scalar_function("pg_get_serial_sequence", 2, flags, |_| Ok(None::<String>))?;
    conn.create_scalar_function("col_description", 2, flags, |_| Ok(None::<String>))?;
    Ok(())
}

/// Runs the rewritten text on the catalogue database.
fn run(conn: &Connection, sql: &str) -> Result<Vec<Outcome>> {
    let mut out = Vec::new();
    let mut batch = rusqlite::Batch::new(conn, sql);
    while let Some(mut stmt) = batch.next()? {
        // The catalogue's flags are declared BOOL and hold `t`/`f`: typed
        // bool, so a driver reads `f` as false (a text `f` is a true string
        // to Python).
        let columns: Vec<ResultColumn> = stmt
            .columns()
            .map(|c| ResultColumn {
                name: c.name().to_string(),
                kind: if c.decl_type() == Some("BOOL") {
                    ColumnKind::Bool
                } else {
                    ColumnKind::Text
                },
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
