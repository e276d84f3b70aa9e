//! What can go wrong while committing, validating or checking evidence.

/// Errors of the verification crate.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// A commitment that does not decode or does not fit the claim.
    #[error("malformed commitment: {0}")]
    MalformedCommitment(String),
    /// A claim that cannot be validated as given (empty output, tokens outside the vocabulary).
    #[error("invalid claim: {0}")]
    InvalidClaim(String),
    /// A claim this validator cannot recompute the way it was committed (an exact claim on a
    /// model whose kernels are not bit-reproducible): refused, never judged a lie.
    #[error("cannot reproduce this claim: {0}")]
    CannotReproduce(String),
    /// A signature that does not verify, or a key that does not decode.
    #[error("bad signature: {0}")]
    Signature(String),
    /// An evidence record that does not hold together.
    #[error("evidence does not check: {0}")]
    Evidence(String),
    /// The model failed while recomputing.
    #[error(transparent)]
    Model(#[from] veil_model::ModelError),
    /// A tensor operation failed.
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    /// A record did not parse.
    #[error("cannot parse: {0}")]
    Json(#[from] serde_json::Error),
}

/// Results of this crate.
pub type Result<T> = std::result::Result<T, VerifyError>;
