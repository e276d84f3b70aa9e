//! What can go wrong in the swarm.

use thiserror::Error;

/// Errors of nodes and clients.
#[derive(Debug, Error)]
pub enum NetError {
    /// A peer sent something that does not fit the protocol.
    #[error("bad message: {0}")]
    BadMessage(String),
    /// A peer refused a request.
    #[error("peer {peer} refused: {message}")]
    Refused {
        /// The peer.
        peer: String,
        /// Its reason.
        message: String,
    },
    /// A peer could not be reached or did not answer in time.
    #[error("peer {peer} failed: {reason}")]
    PeerFailed {
        /// The peer.
        peer: String,
        /// What happened.
        reason: String,
    },
    /// No node in the swarm serves a range the chain needs.
    #[error("no route: {0}")]
    NoRoute(String),
    /// The node's database.
    #[error("node database {path}: {reason}")]
    Database {
        /// The database file.
        path: String,
        /// What failed.
        reason: String,
    },
    /// libp2p setup (transport, listen address, dialing).
    #[error("network: {0}")]
    Network(String),
    /// The model runtime.
    #[error(transparent)]
    Model(#[from] veil_model::ModelError),
    /// Tensor operations.
    #[error("tensor: {0}")]
    Tensor(#[from] candle_core::Error),
    /// Verification: a bad claim, signature or evidence.
    #[error(transparent)]
    Verify(#[from] veil_verify::VerifyError),
    /// A committee could not settle a verified request.
    #[error("verification failed: {0}")]
    Verification(String),
}

/// Results of this crate.
pub type Result<T> = std::result::Result<T, NetError>;
