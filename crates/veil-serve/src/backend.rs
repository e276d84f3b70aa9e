//! Where a request's tokens are computed. Every way Veil answers a prompt is a [`Backend`]:
//! the gateway picks one per request and `veil generate` one per run, and both read the same
//! [`Answer`] back, so the dispatch exists once.
//!
//! | backend | runs | verified |
//! | --- | --- | --- |
//! | [`LocalBackend`] | the plaintext model in this process (MetaInf's methods, or continuous batching) | no |
//! | [`EncryptedLocal`] | an encrypted model in this process, the key here | no |
//! | [`SwarmChain`] | a chain of nodes (plaintext or encrypted, optionally split with this process) | no |
//! | [`Committee`] | whole-model nodes, one generating and the rest judging | yes |
//! | [`VerifiedChain`] | a split chain, each hop replayed by nodes serving its blocks | yes |

mod committee;
mod encrypted;
mod local;
mod swarm;
mod verified_chain;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use veil_model::{Completion, Drafting, GenerationParams, ModelError, PrefixCache, TokenStep};
use veil_net::NetError;

pub use committee::Committee;
pub use encrypted::EncryptedLocal;
pub use local::{Batching, LocalBackend, AUTO_BATCH_SLOTS};
pub use swarm::{SwarmChain, SwarmConnection};
pub use verified_chain::VerifiedChain;

/// Computes answers. Implementations block: call them from a thread that may wait (the
/// gateway's blocking pool, or `veil generate`'s main thread).
pub trait Backend: Send + Sync {
    /// Answers `request`, handing each piece of text to `on_text` as it is final (a verified
    /// backend hands the whole text over once it is accepted).
    fn generate(
        &self,
        request: &Request<'_>,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Answer, Failure>;

    /// Where this backend runs requests, for a request that failed before it had a route:
    /// "this process, blocks 0-30", "committee of 3", ...
    fn describe(&self) -> String;
}

/// A request, checked and tokenized.
pub struct Request<'a> {
    /// The prompt's token ids (chat template applied, if any).
    pub prompt: &'a [u32],
    /// Sampling, stop strings and the token budget.
    pub params: &'a GenerationParams,
    /// An acceleration method to use (`veil meta methods`); `None` lets the backend choose.
    /// Only [`LocalBackend`] runs methods: the others ignore it (their nodes choose).
    pub method: Option<&'static veil_meta::Method>,
    /// The asker's prefix cache (one per API key), for backends that keep prompts.
    pub prefixes: Option<SharedPrefixCache>,
    /// True once the asker has gone: the generation stops at its next token.
    pub cancelled: &'a (dyn Fn() -> bool + Sync),
}

/// A prefix cache shared by the requests of one API key (and the batching engine).
pub type SharedPrefixCache = Arc<Mutex<PrefixCache>>;

/// An answer and how it was made.
pub struct Answer {
    /// The text and its tokens and timings.
    pub completion: Completion,
    /// Where it ran.
    pub route: Route,
    /// How it was checked (`None`: it was not).
    pub verification: Option<Verification>,
    /// The acceleration method and why it was chosen ("plain" where nodes choose).
    pub accel: String,
    /// Evidence against nodes caught lying on the way, as kept on disk.
    pub evidence: Vec<KeptEvidence>,
}

/// Where an answer ran.
#[derive(Debug, Clone)]
pub enum Route {
    /// This process, the whole model.
    Local {
        /// The model's blocks.
        blocks: usize,
    },
    /// A chain of nodes, in order.
    Chain {
        /// Each hop: its node, its blocks and what it cost.
        hops: Vec<RouteHop>,
        /// Nodes replaced on the way.
        failovers: Vec<veil_net::Failover>,
    },
    /// A committee's accepted answer.
    Committee {
        /// Its size.
        size: usize,
        /// The member whose answer was accepted.
        generator: String,
    },
    /// A verified split chain.
    VerifiedChain {
        /// Its hops.
        hops: usize,
    },
}

/// One hop of a chain.
#[derive(Debug, Clone)]
pub struct RouteHop {
    /// The node.
    pub peer: libp2p::PeerId,
    /// Its blocks, `first..end`.
    pub blocks: (usize, usize),
    /// Whether the node was reached only through a relay.
    pub relayed: bool,
    /// Steps, time spent and bytes sent.
    pub stats: veil_net::HopStats,
}

impl std::fmt::Display for Route {
    /// One line for the dashboard: `blocks 0-10 on 12D3…; blocks 10-30 on 12D3… (relayed)`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Route::Local { blocks } => write!(f, "this process, blocks 0-{blocks}"),
            Route::Chain { hops, .. } => {
                let hops: Vec<String> = hops
                    .iter()
                    .map(|h| {
                        let relayed = if h.relayed { " (relayed)" } else { "" };
                        format!(
                            "blocks {}-{} on {}{relayed}",
                            h.blocks.0, h.blocks.1, h.peer
                        )
                    })
                    .collect();
                f.write_str(&hops.join("; "))
            }
            Route::Committee { size, generator } => {
                write!(f, "committee of {size}, answer by {generator}")
            }
            Route::VerifiedChain { hops } => write!(f, "verified chain of {hops} hops"),
        }
    }
}

/// How a verified answer was checked: what the swarm's verified flows report, beside the
/// answer itself.
pub enum Verification {
    /// A committee of whole-model nodes.
    Committee(Box<veil_net::VerifiedAnswer>),
    /// A split chain whose hops were replayed.
    Chain(Box<veil_net::VerifiedChainAnswer>),
}

impl Verification {
    /// One sentence for the API's `veil.verification` and the dashboard.
    pub fn summary(&self) -> String {
        match self {
            Verification::Committee(answer) => format!(
                "accepted by {} of {} judges ({} caught lying; {} commitments)",
                answer.tally.passed.len(),
                answer.tally.passed.len() + answer.tally.failed.len(),
                answer.evidence.len(),
                answer.mode
            ),
            Verification::Chain(answer) => {
                let hops: Vec<String> = answer
                    .hops
                    .iter()
                    .map(|h| {
                        format!(
                            "blocks {}-{} by {} passed by {} of {}",
                            h.blocks.0,
                            h.blocks.1,
                            h.node,
                            h.tally.passed.len(),
                            h.tally.passed.len() + h.tally.failed.len()
                        )
                    })
                    .collect();
                format!(
                    "every hop accepted ({} caught lying): {}",
                    answer.evidence.len(),
                    hops.join("; ")
                )
            }
        }
    }
}

/// Evidence against a node caught lying, and where it was written.
#[derive(Debug)]
pub struct KeptEvidence {
    /// Who lied: `<peer>`, or `hop <peer> (blocks a-b)` for a chain hop.
    pub against: String,
    /// The file, or why it could not be written (the request goes on either way).
    pub file: Result<PathBuf, crate::ServeError>,
}

/// Why a request has no answer.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// No chain, committee or judges could be formed.
    #[error(transparent)]
    NoRoute(NetError),
    /// A committee or a hop's judges accepted no answer.
    #[error("{0}")]
    Verification(String),
    /// Generation failed on the way (a cancelled request fails with
    /// [`ModelError::Cancelled`]).
    #[error(transparent)]
    Model(#[from] ModelError),
}

impl Failure {
    /// A failure of the swarm's verified flows: a verdict (or the client's leaving) is a
    /// verification failure, anything else means no committee or chain could be formed.
    fn of_verified(e: NetError) -> Self {
        match e {
            NetError::Verification(why) => Failure::Verification(why),
            e => Failure::NoRoute(e),
        }
    }
}

/// What decides who sits on a committee (and judges each hop of a verified chain): a public
/// seed mixed into the choice, and the request id, random per request unless fixed.
#[derive(Debug, Clone)]
pub struct Seating {
    /// The public seed.
    pub seed: String,
    /// A fixed request id (64 hex digits); `None`: a fresh one per request.
    pub request_id: Option<String>,
}

impl Default for Seating {
    fn default() -> Self {
        Self {
            seed: "veil".into(),
            request_id: None,
        }
    }
}

impl Seating {
    /// The id of the next request: the fixed one, or a fresh random one.
    fn request_id(&self) -> String {
        self.request_id
            .clone()
            .unwrap_or_else(veil_verify::random_request_id)
    }
}

/// Writes evidence to `dir` at once (before the answer is reported and before reputations
/// move), keeping the file or the error.
fn keep_evidence<J: veil_verify::Judged>(
    dir: &std::path::Path,
    against: String,
    evidence: &veil_verify::Evidence<J>,
    kept: &mut Vec<KeptEvidence>,
) {
    let file = crate::evidence::write_evidence(dir, evidence);
    if let Err(e) = &file {
        tracing::warn!("cannot keep evidence against {against}: {e}");
    }
    kept.push(KeptEvidence { against, file });
}

/// The speed of a decode: tokens after the first over the time they took. Shared by every
/// report of an answer's speed.
pub fn decode_speed(completion: &Completion) -> f64 {
    let decoded = completion.tokens.len().saturating_sub(1) as f64;
    decoded / completion.decode_time.as_secs_f64().max(1e-9)
}

/// A model session that fails its next step once its asker has gone.
struct Cancellable<'a, S> {
    inner: S,
    cancelled: &'a (dyn Fn() -> bool + Sync),
}

impl<S> Cancellable<'_, S> {
    /// An error once the asker has gone.
    fn check(&self) -> veil_model::Result<()> {
        if (self.cancelled)() {
            return Err(ModelError::Cancelled);
        }
        Ok(())
    }
}

impl<S: TokenStep> TokenStep for Cancellable<'_, S> {
    fn step(&mut self, tokens: &[u32]) -> veil_model::Result<Vec<f32>> {
        self.check()?;
        self.inner.step(tokens)
    }
}

impl<S: Drafting> Drafting for Cancellable<'_, S> {
    fn step_each(&mut self, tokens: &[u32]) -> veil_model::Result<Vec<Vec<f32>>> {
        self.check()?;
        self.inner.step_each(tokens)
    }

    fn rewind(&mut self, positions: usize) -> veil_model::Result<()> {
        self.inner.rewind(positions)
    }

    fn position(&self) -> usize {
        self.inner.position()
    }
}
