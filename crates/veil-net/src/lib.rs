//! Veil's swarm: nodes serving model shards over libp2p, and the client that finds them, chains
//! them into a whole model and survives losing one.

pub mod admission;
pub mod behaviour;
pub mod chain;
pub mod client;
mod client_paths;
pub mod committee;
pub mod critical;
pub mod error;
pub mod history;
pub mod node;
mod node_models;
mod node_relays;
mod node_session;
pub mod node_state;
mod peer_addresses;
pub mod protocol;
pub mod route;
pub mod sessions;
pub mod state_writer;
pub mod tee_gate;
pub mod verified_chain;
pub mod weights_check;
pub mod wire;

pub use admission::{Admission, WeightsGate, DEFAULT_OPENINGS};
pub use chain::{ClientSplit, Failover, FinishedHop, HopStats, RemoteChain};
pub use client::{Candidate, SwarmClient};
pub use committee::{generate_verified, Recheck, VerifiedAnswer, VerifiedRequest, CANCELLED};
pub use error::{NetError, Result};
pub use history::{RunTemplate, SessionUsage};
pub use node::{peer_of, run_node, NodeConfig};
pub use node_state::NodeState;
pub use route::plan_route;
pub use sessions::{SessionLimits, SessionTable};
pub use tee_gate::{public_key_of, TeeGate};
pub use verified_chain::{
    generate_verified_chain, judge_hops, HopOutcome, JudgedHop, VerifiedChainAnswer,
    VerifiedChainRequest,
};
pub use weights_check::challenge_weights;
pub use wire::ShardInfo;
