//! What the SQL endpoint asks of a site: sessions that execute statement
//! text (SQL or QUEL) and answer with rows, command tags and notices, or an
//! error with a PostgreSQL SQLSTATE. The endpoint (`pgwire`) speaks the
//! PostgreSQL protocol on one side and this interface on the other; the
//! site's query path implements it.

use snaps_schema::Value;

/// How a result column is presented to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnKind {
    /// 64-bit integer (`int8`).
    Int,
    /// Double (`float8`).
    Float,
    /// Text (`text`).
    Text,
    /// A truth value (`bool`), held as the text `t` or `f` (the PostgreSQL
    /// catalogue's flags).
    Bool,
}

/// A result column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResultColumn {
    /// Its name as the client sees it.
    pub name: String,
    /// Its kind.
    pub kind: ColumnKind,
}

/// The result of one statement.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// A statement that returns rows.
    Rows {
        /// The columns.
        columns: Vec<ResultColumn>,
        /// The rows, each with one value per column.
        rows: Vec<Vec<Value>>,
    },
    /// A statement that returns no rows, with its PostgreSQL command tag
    /// (`INSERT 0 1`, `UPDATE 3`, `CREATE TABLE`, `BEGIN`, ...).
    Command {
        /// The tag.
        tag: String,
    },
}

/// The answer to a statement text: one outcome per statement, and notices
/// for the client (e.g. "answered from local data only").
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Answer {
    /// Outcomes, in statement order.
    pub outcomes: Vec<Outcome>,
    /// Notices to send before the results.
    pub notices: Vec<String>,
}

/// An error for the client: a PostgreSQL SQLSTATE and a message naming
/// what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{sqlstate}: {message}")]
pub struct EngineError {
    /// Five-character SQLSTATE, e.g. `42P01` (undefined table).
    pub sqlstate: &'static str,
    /// The message.
    pub message: String,
}

impl EngineError {
    /// An error with a SQLSTATE and message.
    pub fn new(sqlstate: &'static str, message: impl Into<String>) -> EngineError {
        EngineError {
            sqlstate,
            message: message.into(),
        }
    }
}

/// A site as the endpoint sees it.
pub trait Engine: Send + Sync + 'static {
    /// Opens a session for a client connection; `user` comes from the
    /// connection's startup message.
    fn open_session(&self, user: &str) -> Result<Box<dyn Session>, EngineError>;

    /// Opens a session for `user`, authenticated, whose user code is
    /// `code` (by default the same as [`Engine::open_session`]).
    fn open_session_as(&self, user: &str, code: &str) -> Result<Box<dyn Session>, EngineError> {
        let _ = code;
        self.open_session(user)
    }
}

/// One client connection's state (its QUEL range declarations, its
/// transaction). Calls block; the endpoint runs them off the async threads.
pub trait Session: Send {
    /// Executes statement text: one or more SQL or QUEL statements.
    fn execute(&mut self, text: &str) -> Result<Answer, EngineError>;

    /// The result columns a statement would return, without running it
    /// (empty for a statement that returns no rows).
    fn describe(&mut self, text: &str) -> Result<Vec<ResultColumn>, EngineError>;
}
