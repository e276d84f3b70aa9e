//! What can go wrong reading evidence, policies and the configfs-tsm interface. A verification
//! that runs but rejects is not an error: it is a [`crate::Verdict`] with its reasons.

/// Errors of `veil-tee`.
#[derive(Debug, thiserror::Error)]
pub enum TeeError {
    /// The evidence could not be read.
    #[error("bad evidence: {0}")]
    BadEvidence(String),
    /// The policy could not be read.
    #[error("bad policy: {0}")]
    BadPolicy(String),
    /// The configfs-tsm interface failed.
    #[error("configfs-tsm at {path}: {reason}")]
    Tsm {
        /// The report directory.
        path: String,
        /// What failed.
        reason: String,
    },
}

/// `veil-tee`'s result.
pub type Result<T> = std::result::Result<T, TeeError>;
