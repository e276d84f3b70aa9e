//! Verified generation through a split chain: every hop signs what it was sent and handed on,
//! and a committee of other nodes serving the same blocks replays each hop.
//!
//! The client generates through a chain of exact nodes ([`RemoteChain::open_verified`]),
//! sampling itself as in any chain. When the answer is done, each hop signs its record
//! ([`HopJob`]), which the client holds against what it saw. For every hop, the nodes serving
//! exactly its blocks, ranked by blake3(request id, seed, peer id), judge it by replaying its
//! inputs, with sealed then opened verdicts. A hop a majority fails becomes [`Evidence`] that
//! names it, its reputation drops, and the request runs again on a chain without it.

use std::collections::HashSet;
use std::sync::Arc;

use libp2p::PeerId;
use tokio::runtime::Handle;
use tracing::{info, warn};
use veil_model::{generate, Completion, GenerationParams, GgufTokenizer, ModelError, TokenStep};
use veil_verify::{committee, quorum, Evidence, HopJob, Tally, EVIDENCE_VERSION};

use crate::admission::Admission;
use crate::chain::{FinishedHop, RemoteChain};
use crate::client::SwarmClient;
use crate::committee::{judge_until_decided, CANCELLED};
use crate::error::{NetError, Result};
use crate::node_state::NodeState;
use crate::protocol::verify;
use crate::wire::StepInput;

/// Chains tried before giving up, each without the hops caught lying before it.
const MAX_CHAINS: usize = 3;

/// What a verified chain request asks for.
pub struct VerifiedChainRequest<'a> {
    /// blake3 of the model file.
    pub model_digest: &'a str,
    /// Blocks in the whole model.
    pub block_count: usize,
    /// The prompt's token ids.
    pub prompt: &'a [u32],
    /// Sampling and stopping.
    pub params: &'a GenerationParams,
    /// The model's context window.
    pub context_length: usize,
    /// Judges per hop (at least 1).
    pub judges: usize,
    /// Public seed mixed into each hop's committee.
    pub seed: &'a str,
    /// 64 hex digits, fresh per request.
    pub request_id: String,
    /// Only nodes that pass these checks (weights, allow-list, TEE) may serve or judge.
    pub gate: Option<Arc<Admission>>,
    /// Asked before each step and before judging: `true` once the answer is no longer wanted
    /// (the client left), which ends the request and frees the hops' sessions.
    pub cancelled: &'a (dyn Fn() -> bool + Sync),
}

/// A chain that stops at the next step once its request is cancelled.
struct Cancellable<'a> {
    chain: &'a mut RemoteChain,
    cancelled: &'a (dyn Fn() -> bool + Sync),
}

impl TokenStep for Cancellable<'_> {
    fn step(&mut self, tokens: &[u32]) -> veil_model::Result<Vec<f32>> {
        if (self.cancelled)() {
            return Err(ModelError::Remote(CANCELLED.into()));
        }
        self.chain.step(tokens)
    }
}

/// How one hop of the accepted chain was judged.
#[derive(Debug, Clone)]
pub struct JudgedHop {
    /// The hop's node.
    pub node: String,
    /// Its blocks, `first..end`.
    pub blocks: (usize, usize),
    /// Bytes of its signed digests (steps, inputs, outputs).
    pub commitment_bytes: usize,
    /// Its judges' votes.
    pub tally: Tally,
}

/// An answer whose every hop a quorum accepted.
pub struct VerifiedChainAnswer {
    /// The answer.
    pub completion: Completion,
    /// Each hop, in chain order.
    pub hops: Vec<JudgedHop>,
    /// Evidence against hops caught lying on the way (each names the hop).
    pub evidence: Vec<Evidence<HopJob>>,
    /// Time spent generating the accepted answer.
    pub generate_time: std::time::Duration,
    /// Time spent judging it.
    pub judge_time: std::time::Duration,
}

/// Runs a verified request through split chains; blocks on `runtime` (call it from outside
/// the runtime). `on_evidence` sees each piece of evidence before any reputation moves.
pub fn generate_verified_chain(
    client: &SwarmClient,
    runtime: &Handle,
    tokenizer: &GgufTokenizer,
    request: &VerifiedChainRequest<'_>,
    state: Option<&NodeState>,
    on_evidence: &mut dyn FnMut(&Evidence<HopJob>),
) -> Result<VerifiedChainAnswer> {
    if request.judges == 0 {
        return Err(NetError::Verification(
            "each hop needs at least one judge".into(),
        ));
    }
    let mut avoid: HashSet<PeerId> = match state {
        Some(s) => s.avoided()?.into_iter().collect(),
        None => HashSet::new(),
    };
    let mut evidence = Vec::new();
    for attempt in 0..MAX_CHAINS {
        let started = std::time::Instant::now();
        let mut chain = RemoteChain::open_verified(
            client.clone(),
            runtime.clone(),
            request.model_digest,
            request.block_count,
            &avoid,
            request.gate.clone(),
            request.request_id.clone(),
        )?;
        let mut cancellable = Cancellable {
            chain: &mut chain,
            cancelled: request.cancelled,
        };
        let completion = generate(
            &mut cancellable,
            tokenizer,
            request.prompt,
            request.context_length,
            request.params,
            &mut |_| {},
        );
        // Dropping the chain closes its sessions.
        if (request.cancelled)() {
            return Err(NetError::Verification(CANCELLED.into()));
        }
        let completion = completion?;
        let finished = chain.finish_hops()?;
        let generate_time = started.elapsed();
        let started = std::time::Instant::now();
        let mut hops = Vec::new();
        let mut caught = false;
        for outcome in judge_hops(client, runtime, request, &finished, &avoid)? {
            let Some(record) = outcome.evidence else {
                hops.push(outcome.hop);
                continue;
            };
            on_evidence(&record);
            if let Some(s) = state {
                s.apply_evidence(&record)?;
            }
            let hop = &outcome.hop;
            warn!(
                "hop {} (blocks {}-{}) failed by {} judges: evidence recorded",
                hop.node,
                hop.blocks.0,
                hop.blocks.1,
                hop.tally.failed.len()
            );
            if let Ok(peer) = hop.node.parse() {
                avoid.insert(peer);
            }
            evidence.push(record);
            caught = true;
        }
        if !caught {
            info!("every hop of the chain accepted (attempt {})", attempt + 1);
            return Ok(VerifiedChainAnswer {
                completion,
                hops,
                evidence,
                generate_time,
                judge_time: started.elapsed(),
            });
        }
    }
    Err(NetError::Verification(format!(
        "no chain of {MAX_CHAINS} tried was accepted ({} hops caught lying)",
        evidence.len()
    )))
}

/// How one hop was judged, and the evidence against it if a majority failed it.
pub struct HopOutcome {
    /// The hop and its votes.
    pub hop: JudgedHop,
    /// Evidence naming the hop, if a majority failed it.
    pub evidence: Option<Evidence<HopJob>>,
}

/// Has every hop of a finished chain judged by the other nodes serving its blocks (none in
/// `avoid`), in chain order.
pub fn judge_hops(
    client: &SwarmClient,
    runtime: &Handle,
    request: &VerifiedChainRequest<'_>,
    finished: &[FinishedHop],
    avoid: &HashSet<PeerId>,
) -> Result<Vec<HopOutcome>> {
    finished
        .iter()
        .map(|hop| {
            let (tally, evidence) = judge_hop(client, runtime, request, hop, avoid)?;
            let b = &hop.job.body;
            Ok(HopOutcome {
                hop: JudgedHop {
                    node: b.node.clone(),
                    blocks: (b.first_block, b.end_block),
                    commitment_bytes: b.digests.byte_len(),
                    tally,
                },
                evidence,
            })
        })
        .collect()
}

/// Has `hop` judged by the nodes serving its blocks: its votes, and evidence if a majority
/// failed it. No quorum either way is an error (the answer is not accepted).
fn judge_hop(
    client: &SwarmClient,
    runtime: &Handle,
    request: &VerifiedChainRequest<'_>,
    hop: &FinishedHop,
    avoid: &HashSet<PeerId>,
) -> Result<(Tally, Option<Evidence<HopJob>>)> {
    let b = &hop.job.body;
    let mut found = runtime.block_on(client.discover_range(
        request.model_digest,
        b.first_block,
        b.end_block,
    ))?;
    if let Some(gate) = &request.gate {
        let (allowed, _) = runtime.block_on(gate.admit(client, &found));
        found.retain(|c| allowed.contains(&c.peer));
    }
    let names: Vec<String> = found
        .iter()
        .filter(|c| c.info.exact && c.info.format == b.format && !avoid.contains(&c.peer))
        .filter(|c| (c.info.first_block, c.info.end_block) == (b.first_block, b.end_block))
        .map(|c| c.peer.to_string())
        .filter(|p| *p != b.node)
        .collect();
    let ranked = committee(&request.request_id, request.seed, &names, names.len());
    let (judges, spares) = ranked.split_at(request.judges.min(ranked.len()));
    let mut judges = judges.to_vec();
    if judges.is_empty() {
        return Err(NetError::NoRoute(format!(
            "no other exact node serves blocks {}-{} to judge hop {}",
            b.first_block, b.end_block, b.node
        )));
    }
    let digest = b.digest()?;
    let ask = || verify::Request::JudgeHop {
        job: Box::new(hop.job.clone()),
        inputs: hop.inputs.clone(),
    };
    let (votes, commits, reveals) = runtime.block_on(judge_until_decided(
        client,
        &digest,
        &b.node,
        &mut judges,
        spares,
        ask,
    ))?;
    if votes.accepted(quorum(judges.len())) {
        return Ok((votes, None));
    }
    if !votes.rejected() {
        return Err(NetError::Verification(format!(
            "no quorum on hop {} (blocks {}-{}): {} passed, {} failed, {} judges",
            b.node,
            b.first_block,
            b.end_block,
            votes.passed.len(),
            votes.failed.len(),
            judges.len()
        )));
    }
    // The inputs go into the evidence, so anyone holding the model can replay the hop too.
    let inputs = hop
        .inputs
        .iter()
        .map(StepInput::to_hop_input)
        .collect::<Result<Vec<_>>>()?;
    let record = Evidence {
        version: EVIDENCE_VERSION,
        job: hop.job.clone(),
        commits,
        reveals,
        inputs,
    };
    record.check()?;
    Ok((votes, Some(record)))
}
