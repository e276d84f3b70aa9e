//! Errors of equivariant encryption, each saying what to do.

/// Everything that can go wrong with keys and transforms.
#[derive(Debug, thiserror::Error)]
pub enum EeError {
    /// The passphrase does not open the key file.
    #[error("wrong passphrase for this key file")]
    WrongPassphrase,
    /// The key file is damaged or is not a Veil key.
    #[error("the key file is corrupt or not a Veil key: {0}")]
    CorruptKey(String),
    /// The key was written by another format version.
    #[error("key format version {0} is not supported (this build reads version {ver})", ver = crate::key::KEY_VERSION)]
    KeyVersion(u32),
    /// The key does not fit the model.
    #[error("the key does not fit this model: {0}")]
    KeyMismatch(String),
    /// The transform is not exact for this architecture, so it is refused rather than run.
    #[error("equivariant encryption is exact only for the llama block; {arch} models are refused: {reason}")]
    UnsupportedArchitecture {
        /// The model's architecture.
        arch: veil_model::Architecture,
        /// Which symmetry does not hold.
        reason: &'static str,
    },
    /// The key belongs to another model.
    #[error("the key belongs to the model with digest {key}, but this model's digest is {model}")]
    WrongModel {
        /// Digest recorded in the key.
        key: String,
        /// Digest of the model given.
        model: String,
    },
    /// A setting or input is out of range; the message says which and what is accepted.
    #[error("{0}")]
    Invalid(String),
    /// Reading or running the model failed.
    #[error(transparent)]
    Model(#[from] veil_model::ModelError),
    /// A tensor operation failed.
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

/// Shorthand for this crate's results.
pub type Result<T, E = EeError> = std::result::Result<T, E>;
