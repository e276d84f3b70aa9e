//! Veil's serving library: what both `veil serve` (the OpenAI-compatible gateway) and
//! `veil generate` run a request through.
//!
//! - [`backend`]: one [`Backend`] trait with its four kinds: a model in this process
//!   ([`backend::LocalBackend`], plaintext with MetaInf's methods or continuous batching;
//!   [`backend::EncryptedLocal`]), a chain over the swarm ([`backend::SwarmChain`], plaintext or
//!   encrypted), and verified answers ([`backend::Committee`], [`backend::VerifiedChain`]).
//! - [`accel`]: the bridge between MetaInf's catalogue and the runtime.
//! - [`gateway`]: the HTTP gateway, whose handlers check a request and hand it to a backend.
//! - [`key_rotation`]: replacing the key of an encrypted model, where it runs;
//!   [`key_handoff`]: handing the swarm's nodes the re-encrypted shards.
//! - [`evidence`]: evidence against lying nodes, kept as files.

pub mod accel;
pub mod backend;
pub mod error;
pub mod evidence;
pub mod gateway;
pub mod key_handoff;
pub mod key_rotation;

pub use backend::{Answer, Backend, Failure, Request};
pub use error::{Result, ServeError};
