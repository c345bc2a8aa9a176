//! The SQL database a global store runs on, reduced to what the store
//! needs: transactions of parameterised statements returning rows of plain
//! values. The store's logic (`crate::sqlite`, named for the store it first
//! was) is written once over [`Tx`]; [`sqlite`] and [`postgres`] carry it to
//! an embedded SQLite file or a PostgreSQL server.
//!
//! Statements are written in the SQL both databases take, with parameters
//! numbered `?1`, `?2`, …; where the two differ (types in DDL, a few
//! functions, the temporary schema) the store asks [`Dialect`].

use snaps_schema::{Value, ValueType};

use crate::error::{Error, Result};

pub mod postgres;
pub mod sqlite;

/// A value as the store reads and writes it: the schema's values and the
/// byte strings of its status columns (sent-to bitmaps, staged pushes).
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    /// SQL NULL.
    Null,
    /// An integer.
    Int(i64),
    /// A float.
    Float(f64),
    /// Text.
    Text(String),
    /// Bytes.
    Bytes(Vec<u8>),
}

impl From<i64> for Cell {
    fn from(v: i64) -> Cell {
        Cell::Int(v)
    }
}

impl From<u64> for Cell {
    fn from(v: u64) -> Cell {
        Cell::Int(v as i64)
    }
}

impl From<u32> for Cell {
    fn from(v: u32) -> Cell {
        Cell::Int(i64::from(v))
    }
}

impl From<u8> for Cell {
    fn from(v: u8) -> Cell {
        Cell::Int(i64::from(v))
    }
}

impl From<bool> for Cell {
    fn from(v: bool) -> Cell {
        Cell::Int(i64::from(v))
    }
}

impl From<&str> for Cell {
    fn from(v: &str) -> Cell {
        Cell::Text(v.to_string())
    }
}

impl From<String> for Cell {
    fn from(v: String) -> Cell {
        Cell::Text(v)
    }
}

impl From<&String> for Cell {
    fn from(v: &String) -> Cell {
        Cell::Text(v.clone())
    }
}

impl From<&[u8]> for Cell {
    fn from(v: &[u8]) -> Cell {
        Cell::Bytes(v.to_vec())
    }
}

impl From<Vec<u8>> for Cell {
    fn from(v: Vec<u8>) -> Cell {
        Cell::Bytes(v)
    }
}

impl From<&Vec<u8>> for Cell {
    fn from(v: &Vec<u8>) -> Cell {
        Cell::Bytes(v.clone())
    }
}

impl From<&Value> for Cell {
    fn from(v: &Value) -> Cell {
        match v {
            Value::Null => Cell::Null,
            Value::Int(i) => Cell::Int(*i),
            Value::Float(f) => Cell::Float(*f),
            Value::Text(s) => Cell::Text(s.clone()),
        }
    }
}

impl<T: Into<Cell>> From<Option<T>> for Cell {
    fn from(v: Option<T>) -> Cell {
        v.map_or(Cell::Null, Into::into)
    }
}

/// One row of a result.
#[derive(Debug, Clone)]
pub struct Row(pub Vec<Cell>);

impl Row {
    fn cell(&self, i: usize) -> Result<&Cell> {
        self.0
            .get(i)
            .ok_or_else(|| Error::Internal(format!("a row of the store has no column {i}")))
    }

    fn wrong(&self, i: usize, want: &str) -> Error {
        Error::Internal(format!(
            "column {i} of a row of the store holds {:?}, not {want}",
            self.0.get(i)
        ))
    }

    /// An integer column (a boolean reads as 0 or 1).
    pub fn int(&self, i: usize) -> Result<i64> {
        self.opt_int(i)?.ok_or_else(|| self.wrong(i, "an integer"))
    }

    /// An integer column that may be NULL.
    pub fn opt_int(&self, i: usize) -> Result<Option<i64>> {
        match self.cell(i)? {
            Cell::Null => Ok(None),
            Cell::Int(v) => Ok(Some(*v)),
            Cell::Float(f) if f.fract() == 0.0 => Ok(Some(*f as i64)),
            _ => Err(self.wrong(i, "an integer")),
        }
    }

    /// A true/false column.
    pub fn flag(&self, i: usize) -> Result<bool> {
        Ok(self.int(i)? != 0)
    }

    /// A text column.
    pub fn text(&self, i: usize) -> Result<String> {
        self.opt_text(i)?.ok_or_else(|| self.wrong(i, "text"))
    }

    /// A text column that may be NULL.
    pub fn opt_text(&self, i: usize) -> Result<Option<String>> {
        match self.cell(i)? {
            Cell::Null => Ok(None),
            Cell::Text(s) => Ok(Some(s.clone())),
            Cell::Bytes(b) => Ok(Some(String::from_utf8_lossy(b).into_owned())),
            _ => Err(self.wrong(i, "text")),
        }
    }

    /// A byte-string column; NULL reads as no bytes.
    pub fn bytes(&self, i: usize) -> Result<Vec<u8>> {
        match self.cell(i)? {
            Cell::Null => Ok(Vec::new()),
            Cell::Bytes(b) => Ok(b.clone()),
            Cell::Text(s) => Ok(s.as_bytes().to_vec()),
            _ => Err(self.wrong(i, "bytes")),
        }
    }

    /// A column holding a value of the global schema.
    pub fn value(&self, i: usize) -> Result<Value> {
        Ok(match self.cell(i)? {
            Cell::Null => Value::Null,
            Cell::Int(v) => Value::Int(*v),
            Cell::Float(f) => Value::Float(*f),
            Cell::Text(s) => Value::Text(s.clone()),
            Cell::Bytes(b) => Value::Text(String::from_utf8_lossy(b).into_owned()),
        })
    }
}

const UPPER: &str = "'ABCDEFGHIJKLMNOPQRSTUVWXYZ'";
const LOWER: &str = "'abcdefghijklmnopqrstuvwxyz'";

/// Where the SQL of the two databases differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// SQLite 3.35 or newer (RETURNING, UPSERT).
    Sqlite,
    /// PostgreSQL 13 or newer.
    Postgres,
}

impl Dialect {
    /// Rewrites DDL written for SQLite in this dialect: 64-bit integers,
    /// identity keys, byte strings, double floats, binary-ordered text.
    pub fn ddl(self, sql: &str) -> String {
        match self {
            Dialect::Sqlite => sql.to_string(),
            Dialect::Postgres => sql
                .replace(
                    "INTEGER PRIMARY KEY AUTOINCREMENT",
                    "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
                )
                .replace("INTEGER", "BIGINT")
                .replace("BLOB", "BYTEA")
                .replace("DEFAULT x''", "DEFAULT ''::bytea")
                .replace(" TEXT", " TEXT COLLATE \"C\"")
                .replace(") WITHOUT ROWID", ")"),
        }
    }

    /// The column type holding values of `ty`. PostgreSQL keeps SQLite's
    /// 64-bit integers and doubles, and text in byte order, so that the
    /// global snapshot compares values as the sites' SQLite does.
    pub fn column_type(self, ty: ValueType) -> String {
        match self {
            Dialect::Sqlite => ty.sql_name(),
            Dialect::Postgres => match ty {
                ValueType::Int2 | ValueType::Int4 => "BIGINT".into(),
                ValueType::Float4 => "DOUBLE PRECISION".into(),
                ValueType::Char(_) => "TEXT COLLATE \"C\"".into(),
            },
        }
    }

    /// A temporary table by name.
    pub fn temp(self, name: &str) -> String {
        match self {
            Dialect::Sqlite => format!("temp.{name}"),
            Dialect::Postgres => format!("pg_temp.{name}"),
        }
    }

    /// The larger of two values (a scalar, not the aggregate).
    pub fn greatest(self) -> &'static str {
        match self {
            Dialect::Sqlite => "max",
            Dialect::Postgres => "GREATEST",
        }
    }

    /// The position of a substring (`f(haystack, needle)`, 0 if absent).
    pub fn instr(self) -> &'static str {
        match self {
            Dialect::Sqlite => "instr",
            Dialect::Postgres => "strpos",
        }
    }

    /// A call of one of the functions the controller evaluates
    /// (`snaps_mapping::rewrite::GLOBAL_FUNCTIONS`), with SQLite's meaning:
    /// its `lower` and `upper` fold ASCII letters only, its `length` and
    /// `substr` take numbers as their text.
    pub fn function(self, name: &str, args: &[String]) -> String {
        let all = args.join(", ");
        if self == Dialect::Sqlite {
            return format!("{name}({all})");
        }
        let text = |i: usize| format!("({})::text", args.get(i).map_or("NULL", String::as_str));
        let rest = args
            .iter()
            .skip(1)
            .map(|a| format!(", {a}"))
            .collect::<String>();
        match name {
            "lower" => format!("translate({}, {UPPER}, {LOWER})", text(0)),
            "upper" => format!("translate({}, {LOWER}, {UPPER})", text(0)),
            "length" => format!("length({})", text(0)),
            "substr" => format!("substr({}{rest})", text(0)),
            "trim" => format!("btrim({}{rest})", text(0)),
            "ltrim" | "rtrim" => format!("{name}({}{rest})", text(0)),
            "ifnull" => format!("coalesce({all})"),
            _ => format!("{name}({all})"),
        }
    }

    /// `x LIKE p` with SQLite's meaning: ASCII letters match either case,
    /// no escape character.
    pub fn like(self, x: &str, p: &str, negated: bool) -> String {
        let not = if negated { "NOT " } else { "" };
        match self {
            Dialect::Sqlite => format!("({x} {not}LIKE {p})"),
            Dialect::Postgres => format!(
                "(translate(({x})::text, {UPPER}, {LOWER}) {not}LIKE translate(({p})::text, {UPPER}, {LOWER}) ESCAPE '')"
            ),
        }
    }

    /// `l op r` for `/` and `%`, which SQLite makes NULL on a zero divisor
    /// where PostgreSQL fails.
    pub fn divide(self, l: &str, op: &str, r: &str) -> String {
        match self {
            Dialect::Sqlite => format!("({l} {op} {r})"),
            Dialect::Postgres => format!("({l} {op} NULLIF({r}, 0))"),
        }
    }
}

/// A transaction of the store's database.
pub trait Tx {
    /// Which SQL it speaks.
    fn dialect(&self) -> Dialect;

    /// Runs a statement returning rows.
    fn query(&mut self, sql: &str, params: &[Cell]) -> Result<Vec<Row>>;

    /// Runs a statement; returns the rows it changed.
    fn execute(&mut self, sql: &str, params: &[Cell]) -> Result<u64>;

    /// Runs statements without parameters, separated by `;`.
    fn batch(&mut self, sql: &str) -> Result<()>;

    /// The first row of a statement's result, if any.
    fn one(&mut self, sql: &str, params: &[Cell]) -> Result<Option<Row>> {
        Ok(self.query(sql, params)?.into_iter().next())
    }
}

/// A database a store runs on.
pub trait Db: Send + Sync + 'static {
    /// Which SQL it speaks.
    fn dialect(&self) -> Dialect;

    /// Runs `f` in one transaction, committed if `f` returns `Ok`. Where the
    /// database may refuse a transaction for a conflict with a concurrent
    /// one, `f` is run again, whole, a bounded number of times.
    fn transaction<T>(&self, f: &mut dyn FnMut(&mut dyn Tx) -> Result<T>) -> Result<T>;
}
