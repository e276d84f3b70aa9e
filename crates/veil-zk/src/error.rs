//! What can go wrong committing to a model or checking openings.

/// Errors of `veil-zk`.
#[derive(Debug, thiserror::Error)]
pub enum ZkError {
    /// The model file could not be read.
    #[error(transparent)]
    Model(#[from] veil_model::ModelError),
    /// A request for openings was malformed.
    #[error("bad challenge: {0}")]
    BadChallenge(String),
    /// Openings did not match the commitment.
    #[error("openings refused: {0}")]
    BadOpenings(String),
}

/// `veil-zk`'s result.
pub type Result<T> = std::result::Result<T, ZkError>;
