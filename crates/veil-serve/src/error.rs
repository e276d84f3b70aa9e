//! What can go wrong while serving, apart from a request's own failure (see
//! [`crate::backend::Failure`]).

/// An error in the serving library: loading, measuring, keeping evidence, reading access rules.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The model failed to load or run.
    #[error(transparent)]
    Model(#[from] veil_model::ModelError),
    /// MetaInf's catalogue or selector refused.
    #[error(transparent)]
    Meta(#[from] veil_meta::MetaError),
    /// A verification record could not be encoded.
    #[error(transparent)]
    Verify(#[from] veil_verify::VerifyError),
    /// Encrypting a model under a new key failed.
    #[error(transparent)]
    Ee(#[from] veil_ee::EeError),
    /// A file could not be read or written.
    #[error("{what}")]
    Io {
        /// What was being done, with the path.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A caller-supplied loader (the binary's way of loading encrypted shards) failed.
    #[error("{what}")]
    Load {
        /// What was being loaded.
        what: String,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Handing a re-encrypted model's shards to the swarm's nodes failed.
    #[error("{what}")]
    Handoff {
        /// What was being done, and with which node.
        what: String,
        /// The cause (boxed: the network's errors are large).
        #[source]
        source: Box<veil_net::NetError>,
    },
    /// An argument or input that cannot be served, with what to do instead.
    #[error("{0}")]
    Invalid(String),
}

impl ServeError {
    /// An I/O error while doing `what`.
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |source| Self::Io { what, source }
    }
}

/// The serving library's results.
pub type Result<T, E = ServeError> = std::result::Result<T, E>;
