/// Errors of the mapping crate, by category. Messages are lower case and name
/// what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The statement could not be parsed.
    #[error("{0}")]
    Parse(String),
    /// Parsed, but SNAPS does not handle this form.
    #[error("{0}")]
    Unsupported(String),
    /// A relation, variable or attribute the statement names does not exist.
    #[error("{0}")]
    Unknown(String),
    /// A mapping or mapping-qualification row is wrong.
    #[error("{0}")]
    Mapping(String),
    /// A value could not be converted between a site and the global snapshot.
    #[error("{0}")]
    Conversion(String),
}

/// Result with the mapping crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
