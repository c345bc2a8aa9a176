//! Errors of the global controller, and the gRPC status each becomes.

/// What went wrong, in words a site's administrator can act on.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request names something that does not exist or does not fit
    /// (unknown relation or attribute, wrong-typed constant, malformed rows).
    #[error("{0}")]
    InvalidArgument(String),
    /// A tuple the request names does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The request cannot be done in the current state (a schema that does
    /// not match, releasing a copy the site holds a lock on).
    #[error("{0}")]
    FailedPrecondition(String),
    /// The configuration is wrong.
    #[error("configuration: {0}")]
    Config(String),
    /// The store failed.
    #[error("global store: {0}")]
    Storage(#[from] rusqlite::Error),
    /// The PostgreSQL store failed.
    #[error("global store (PostgreSQL): {}", pg_message(.0))]
    Postgres(#[from] tokio_postgres::Error),
    /// The store cannot be reached (or keeps refusing for conflicts): the
    /// call may succeed later.
    #[error("{0}")]
    Unavailable(String),
    /// The schema crate refused something (a value that does not fit).
    #[error(transparent)]
    Schema(#[from] snaps_schema::Error),
    /// The store holds something this build cannot read.
    #[error("global store: {0}")]
    Internal(String),
    /// Reading a file or a socket failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// A PostgreSQL error with the server's message and detail, where
/// tokio-postgres' own text says only "db error".
fn pg_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => match db.detail() {
            Some(d) => format!("{} ({}; SQLSTATE {})", db.message(), d, db.code().code()),
            None => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        },
        None => e.to_string(),
    }
}

impl From<snaps_proto::WireError> for Error {
    fn from(e: snaps_proto::WireError) -> Error {
        Error::InvalidArgument(e.to_string())
    }
}

/// Result of global-controller operations.
pub type Result<T> = std::result::Result<T, Error>;

impl From<Error> for tonic::Status {
    fn from(e: Error) -> tonic::Status {
        match e {
            Error::InvalidArgument(m) => tonic::Status::invalid_argument(m),
            Error::Schema(e) => tonic::Status::invalid_argument(e.to_string()),
            Error::NotFound(m) => tonic::Status::not_found(m),
            Error::FailedPrecondition(m) => tonic::Status::failed_precondition(m),
            Error::Unavailable(m) => tonic::Status::unavailable(m),
            e @ (Error::Storage(_)
            | Error::Postgres(_)
            | Error::Io(_)
            | Error::Config(_)
            | Error::Internal(_)) => {
                tracing::error!(error = %e, "internal error");
                tonic::Status::internal(e.to_string())
            }
        }
    }
}
