//! Veil's request-response protocols, one per concern, each with its own name, messages,
//! limits and node-side handler, composed side by side in the behaviour
//! ([`crate::behaviour::VeilBehaviour`]) as rust-libp2p composes its protocols:
//!
//! - [`infer`]: sessions on a shard, the steps a chain of nodes runs;
//! - [`verify`]: verified sessions and split-chain hops, signed answers, and judging them;
//! - [`prove`]: what a node holds and where it runs: weight openings, TEE evidence, proofs of a
//!   private model's answers;
//! - [`handoff`]: a key holder hands a node the shard of its model re-encrypted under a new
//!   key, so the key rotates on the swarm.
//!
//! A quota or a new request lives in the slice it belongs to. The protocol names carry the
//! version, so a peer speaking another one is told so when the stream is negotiated.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use libp2p::request_response::{self, cbor, ProtocolSupport};
use libp2p::StreamProtocol;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

pub mod handoff;
pub mod infer;
pub mod prove;
pub mod verify;

/// What a protocol lets a peer send and hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProtocolSpec {
    /// The name negotiated on each stream.
    pub name: &'static str,
    /// Largest request a node reads.
    pub max_request_bytes: u64,
    /// Largest response a client reads.
    pub max_response_bytes: u64,
    /// Requests one connection may have in flight at once on this protocol (libp2p's stream
    /// budget, inbound and outbound together). With
    /// [`crate::behaviour::MAX_CONNECTIONS_PER_PEER`] it bounds what one peer can make a node
    /// hold: libp2p's default of 100 per connection let one peer park 400 requests; the four
    /// protocols together let it park 2 × (16 + 4 + 4 + 2) = 52, at most 1.27 GiB of messages
    /// for up to the request timeout.
    pub max_streams: usize,
}

impl ProtocolSpec {
    /// The libp2p behaviour speaking this protocol: CBOR, bounded messages, `timeout` for an
    /// answer.
    pub(crate) fn behaviour<Req, Resp>(&self, timeout: Duration) -> cbor::Behaviour<Req, Resp>
    where
        Req: Send + Clone + Serialize + DeserializeOwned + 'static,
        Resp: Send + Clone + Serialize + DeserializeOwned + 'static,
    {
        let codec = cbor::codec::Codec::default()
            .set_request_size_maximum(self.max_request_bytes)
            .set_response_size_maximum(self.max_response_bytes);
        request_response::Behaviour::with_codec(
            codec,
            [(StreamProtocol::new(self.name), ProtocolSupport::Full)],
            request_response::Config::default()
                .with_request_timeout(timeout)
                .with_max_concurrent_streams(self.max_streams),
        )
    }
}

/// Why a node refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    /// The request was malformed or does not fit the node.
    BadRequest,
    /// The session (or sealed verdict) does not exist for this peer: never opened, closed,
    /// expired, or another peer's.
    UnknownSession,
    /// A limit was reached (sessions, tokens, work in flight): try later.
    Busy,
    /// The node failed while computing.
    Internal,
}

/// A refused request: what kind of failure, for the client to act on, and why, for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// What kind of failure.
    pub kind: ErrorKind,
    /// Why.
    pub message: String,
}

impl Refusal {
    /// A refusal of `kind`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

/// A protocol's answers: each is either an answer or a [`Refusal`], which the client turns
/// into [`crate::NetError::Refused`].
pub trait Answer: Sized {
    /// The answer that refuses with `refusal`.
    fn refused(refusal: Refusal) -> Self;
    /// The refusal, if this answer is one.
    fn refusal(self) -> Result<Self, Refusal>;
}

/// The answer, in any protocol, that refuses a request for `message`.
pub(crate) fn refuse<A: Answer>(kind: ErrorKind, message: impl Into<String>) -> A {
    A::refused(Refusal::new(kind, message))
}

/// A place among the expensive requests of one kind running at once, given back when dropped.
pub(crate) struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    /// A place, if fewer than `max` are taken.
    pub(crate) fn take(count: &Arc<AtomicUsize>, max: usize) -> Option<Self> {
        count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Self(Arc::clone(count)))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}
