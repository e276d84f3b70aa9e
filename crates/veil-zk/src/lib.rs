//! Commitments to models, and checks against them.
//!
//! Every served model is committed by a Merkle root over its GGUF tensors, cut into chunks, so a
//! node can be asked at random for a few chunks with their Merkle paths and prove it holds the
//! committed weights without sending them all.

pub mod circuit;
pub mod digits;
mod error;
pub mod model;
pub mod proof;
pub mod train;
mod weights;

pub use error::{Result, ZkError};
pub use weights::{
    challenge, check_openings, ModelLeaves, Opening, Openings, WeightsCommitment, CHUNK_BYTES,
    MAX_OPENINGS,
};
