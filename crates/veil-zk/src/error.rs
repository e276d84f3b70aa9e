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
    /// A model file or description did not fit together.
    #[error("bad model: {0}")]
    BadModel(String),
    /// An input the model cannot take.
    #[error("bad input: {0}")]
    BadInput(String),
    /// The training data could not be read.
    #[error("bad data: {0}")]
    BadData(String),
    /// Proving or verifying failed.
    #[error("proof: {0}")]
    Proof(String),
    /// Openings did not match the commitment.
    #[error("openings refused: {0}")]
    BadOpenings(String),
}

/// `veil-zk`'s result.
pub type Result<T> = std::result::Result<T, ZkError>;
