use std::path::PathBuf;

/// Errors of the schema crate, by category.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A schema file or statement could not be parsed.
    #[error("{0}")]
    Parse(String),
    /// A value does not fit the attribute it is meant for.
    #[error("{0}")]
    Value(String),
    /// Something named does not exist or is defined twice.
    #[error("{0}")]
    Catalog(String),
    /// A status attribute or bitmap could not be packed or unpacked.
    #[error("{0}")]
    Status(String),
    /// A configuration or fixture file could not be read.
    #[error("read {path}: {source}")]
    Io {
        /// The file that could not be read.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
}

/// Result with the schema crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
