//! What can go wrong recording runs and choosing methods.

/// A MetaInf failure.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// The run database.
    #[error("performance history {path}: {reason}")]
    Database {
        /// The database file.
        path: String,
        /// What failed.
        reason: String,
    },
    /// A dataset file could not be read or written.
    #[error("dataset {path}: {reason}")]
    Dataset {
        /// The file.
        path: String,
        /// What failed.
        reason: String,
    },
    /// A record that makes no sense (a peer's, or a hand-edited file's).
    #[error("bad run record: {0}")]
    BadRecord(String),
    /// A method name that is not in the catalogue.
    #[error("unknown acceleration method {0:?}: run `veil meta methods` for the list")]
    UnknownMethod(String),
    /// Too little data to train or evaluate.
    #[error("not enough data: {0}")]
    NotEnoughData(String),
    /// The learner failed.
    #[error("learner: {0}")]
    Learner(String),
}

/// Results in this crate.
pub type Result<T> = std::result::Result<T, MetaError>;
