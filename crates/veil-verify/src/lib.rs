//! Veil's verification: catch a lying node without accusing an honest one.
//!
//! The node that generates commits to its final hidden states ([`commitment`]); validators
//! recompute the answer in one teacher-forced pass and check the commitment and the sampling,
//! bit for bit where both sides run Veil's kernels (exact mode) or within calibrated
//! tolerances ([`validate`]); a committee chosen by hash commits to its
//! verdicts and reveals them, all signed, and a failed answer leaves [`Evidence`] anyone can
//! re-check ([`consensus`]). [`serving`] is the generating side, with the ways a node can cheat.

pub mod commitment;
pub mod consensus;
pub mod error;
pub mod hop;
pub mod recheck;
pub mod serving;
pub mod trials;
pub mod validate;

pub use commitment::{
    chunk_digest, ActivationCommitment, ChunkCommitment, CommitmentBuilder, CommitmentMode,
    ExactCommitment, CHUNK_TOKENS, DIGEST_BYTES, TOP_K,
};
pub use consensus::{
    committee, is_request_id, job_digest, quorum, random_request_id, tally, Evidence, Job, Judged,
    Proven, Signed, Tally, VerdictCommit, VerdictReveal, EVIDENCE_VERSION,
};
pub use error::{Result, VerifyError};
pub use hop::{
    judge_hop, run_hop_step, HopDigests, HopInput, HopJob, HopTranscript, STEPS_PER_DIGEST,
};
pub use libp2p_identity::{Keypair, PeerId};
pub use recheck::LocalRecheck;
pub use serving::{
    cheaper_format, load_serving_shard, load_serving_shard_with, serve_fixed_length, serve_until,
    Misbehaviour, ServingSession,
};
pub use validate::{validate, Claim, Deviations, SamplingSpec, Tolerances, Validation, Verdict};
