//! Generation through a chain of remote shards, surviving node loss.
//!
//! Each hop keeps every input it sent, step by step. When a node dies (or forgets the session),
//! the chain opens a session on another node serving the same range and replays those inputs
//! with the same step shapes, so the rebuilt cache is the one the dead node held (a batched
//! prefill and one-token steps round differently, so replaying the steps as one batch would
//! not be), then carries on: the text does not change.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use tokio::runtime::Handle;
use tracing::{info, warn};
use veil_model::{LogitsAt, ModelError, ShardCache, ShardInput, ShardModel, TokenStep};

use crate::admission::Admission;
use crate::client::{Candidate, SwarmClient};
use crate::error::{NetError, Result};
use crate::protocol::{infer, verify};
use crate::route::plan_route;
use crate::wire::{SessionId, StepInput, WireTensor};
use veil_verify::{HopJob, HopTranscript, Signed};

/// How many replacements one step may go through before giving up.
const MAX_FAILOVERS_PER_STEP: usize = 3;

/// One remote hop and what it has been sent.
struct Hop {
    node: Candidate,
    session: SessionId,
    history: Vec<StepInput>,
    stats: HopStats,
    /// In a verified chain: what this hop was sent and handed back, to hold its signed record
    /// against.
    transcript: HopTranscript,
}

/// One hop of a verified chain once its session ended: its signed record and every input it
/// was sent, what a judge needs to replay it.
#[derive(Debug, Clone)]
pub struct FinishedHop {
    /// The record, signed by the hop's node and checked against what the client saw.
    pub job: Signed<HopJob>,
    /// Each step's input, in order.
    pub inputs: Vec<StepInput>,
}

/// What one hop cost, for the route report and the benchmark.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HopStats {
    /// Time spent waiting for this hop's answers (network and compute).
    pub busy: Duration,
    /// Requests answered.
    pub steps: usize,
    /// Tensor and token bytes sent to the hop.
    pub bytes_sent: u64,
    /// Steps of one position (decoding), and the bytes sent for them.
    pub decode_steps: usize,
    /// Bytes sent in one-position steps.
    pub decode_bytes_sent: u64,
    /// Bytes received for one-position steps.
    pub decode_bytes_received: u64,
}

/// What happened when a node was replaced.
#[derive(Debug, Clone, PartialEq)]
pub struct Failover {
    /// Blocks of the hop.
    pub blocks: (usize, usize),
    /// The node that failed.
    pub from: PeerId,
    /// Its replacement.
    pub to: PeerId,
    /// Why.
    pub reason: String,
    /// Steps replayed to rebuild the replacement's cache.
    pub replayed_steps: usize,
}

/// Layers the client runs itself, so nodes see only hidden states (never ids or logits).
pub struct ClientSplit {
    /// Embedding and the first blocks.
    pub front: Arc<ShardModel>,
    /// Final norm and head.
    pub head: Arc<ShardModel>,
}

/// A generation session spread over remote nodes (and, with a client split, this process).
pub struct RemoteChain {
    client: SwarmClient,
    runtime: Handle,
    model_digest: String,
    hops: Vec<Hop>,
    split: Option<(ClientSplit, ShardCache, ShardCache)>,
    failed: HashSet<PeerId>,
    /// Nodes whose connection broke once (a relay that went away, say): they may still be
    /// reachable another way (a punched hole, another relay), so they stay candidates, after
    /// every other node, until they fail again.
    lost_once: HashSet<PeerId>,
    failovers: Vec<Failover>,
    /// Only nodes that pass these checks may serve, replacements included.
    gate: Option<Arc<Admission>>,
    /// A verified chain's request id: its hops record their sessions and sign them.
    request_id: Option<String>,
}

impl RemoteChain {
    /// Finds nodes serving the model `model_digest` of `block_count` blocks, plans the fastest
    /// chain (after the client's own blocks, if `split`), and opens a session on each.
    ///
    /// Call from outside the runtime: the chain blocks on `runtime` for each request.
    pub fn open(
        client: SwarmClient,
        runtime: Handle,
        model_digest: &str,
        block_count: usize,
        split: Option<ClientSplit>,
    ) -> Result<Self> {
        Self::open_avoiding(
            client,
            runtime,
            model_digest,
            block_count,
            split,
            &HashSet::new(),
        )
    }

    /// [`open`](Self::open), leaving out the nodes in `avoid` (those caught lying, say).
    pub fn open_avoiding(
        client: SwarmClient,
        runtime: Handle,
        model_digest: &str,
        block_count: usize,
        split: Option<ClientSplit>,
        avoid: &HashSet<PeerId>,
    ) -> Result<Self> {
        Self::open_gated(
            client,
            runtime,
            model_digest,
            block_count,
            split,
            avoid,
            None,
        )
    }

    /// [`open_avoiding`](Self::open_avoiding), using only nodes that pass the checks of
    /// `gate` (if given), now and on failover.
    pub fn open_gated(
        client: SwarmClient,
        runtime: Handle,
        model_digest: &str,
        block_count: usize,
        split: Option<ClientSplit>,
        avoid: &HashSet<PeerId>,
        gate: Option<Arc<Admission>>,
    ) -> Result<Self> {
        let target = ChainTarget {
            model_digest,
            block_count,
            request_id: None,
        };
        Self::open_with(client, runtime, target, split, avoid, gate)
    }

    /// A verified chain for request `request_id`: only nodes that announce exact outputs, each
    /// recording its session to sign at [`finish_hops`](Self::finish_hops), so judges serving
    /// the same blocks can replay it.
    pub fn open_verified(
        client: SwarmClient,
        runtime: Handle,
        model_digest: &str,
        block_count: usize,
        avoid: &HashSet<PeerId>,
        gate: Option<Arc<Admission>>,
        request_id: String,
    ) -> Result<Self> {
        let target = ChainTarget {
            model_digest,
            block_count,
            request_id: Some(request_id),
        };
        Self::open_with(client, runtime, target, None, avoid, gate)
    }

    fn open_with(
        client: SwarmClient,
        runtime: Handle,
        target: ChainTarget<'_>,
        split: Option<ClientSplit>,
        avoid: &HashSet<PeerId>,
        gate: Option<Arc<Admission>>,
    ) -> Result<Self> {
        let ChainTarget {
            model_digest,
            block_count,
            request_id,
        } = target;
        let mut candidates = runtime.block_on(client.discover(model_digest))?;
        if request_id.is_some() {
            candidates.retain(|c| c.info.exact);
        }
        let start = split.as_ref().map_or(0, |s| s.front.shard().layers.end);
        let mut avoid = avoid.clone();
        let mut refused = Vec::new();
        if let Some(gate) = &gate {
            let (_, out) = runtime.block_on(gate.admit(&client, &candidates));
            avoid.extend(out.iter().map(|(peer, _)| *peer));
            refused = out;
        }
        let route =
            plan_route(&candidates, start, block_count, split.is_none(), &avoid).map_err(|e| {
                match refused.is_empty() {
                    true => e,
                    false => NetError::NoRoute(format!(
                        "{e}; nodes refused admission: {}",
                        refused
                            .iter()
                            .map(|(peer, why)| format!("{peer}: {why}"))
                            .collect::<Vec<_>>()
                            .join(" | ")
                    )),
                }
            })?;
        let mut hops = Vec::new();
        for node in route {
            let session = runtime.block_on(open_session(
                &client,
                node.peer,
                model_digest,
                request_id.as_deref(),
            ))?;
            hops.push(Hop {
                node,
                session,
                history: Vec::new(),
                stats: HopStats::default(),
                transcript: HopTranscript::new(),
            });
        }
        let split = split.map(|s| {
            let (front, head) = (s.front.new_cache(), s.head.new_cache());
            (s, front, head)
        });
        Ok(Self {
            client,
            runtime,
            model_digest: model_digest.to_string(),
            hops,
            split,
            failed: HashSet::new(),
            lost_once: HashSet::new(),
            failovers: Vec::new(),
            gate,
            request_id,
        })
    }

    /// Ends a verified chain's sessions: each hop's signed record, checked against what this
    /// client sent it and received from it (a hop that signs other outputs than it handed on
    /// is refused here), with the inputs a judge needs.
    pub fn finish_hops(&mut self) -> Result<Vec<FinishedHop>> {
        let Some(request_id) = self.request_id.clone() else {
            return Err(NetError::Verification(
                "this chain was not opened as a verified chain".into(),
            ));
        };
        let mut finished = Vec::new();
        let mut hops = std::mem::take(&mut self.hops).into_iter();
        while let Some(hop) = hops.next() {
            match self.finish_hop(&request_id, hop) {
                Ok(done) => finished.push(done),
                Err(e) => {
                    // The hops not yet finished stay, so dropping the chain closes them.
                    self.hops = hops.collect();
                    return Err(e);
                }
            }
        }
        Ok(finished)
    }

    /// Ends one hop's session and checks its signed record.
    fn finish_hop(&self, request_id: &str, hop: Hop) -> Result<FinishedHop> {
        let peer = hop.node.peer;
        let body = verify::Request::FinishHop {
            session: hop.session,
        };
        let job = match self.runtime.block_on(self.client.verify(peer, body))? {
            verify::Response::HopFinished(job) => *job,
            other => {
                return Err(NetError::BadMessage(format!(
                    "{peer} answered FinishHop with {other:?}"
                )))
            }
        };
        let signer = job.verify()?;
        let info = &hop.node.info;
        let b = &job.body;
        let mismatch = if signer != peer || b.node != peer.to_string() {
            Some("is not signed by the hop's node")
        } else if b.request_id != request_id || b.model_digest != self.model_digest {
            Some("names another request or model")
        } else if (b.first_block, b.end_block) != (info.first_block, info.end_block) {
            Some("names other blocks than the node announced")
        } else if b.format != info.format {
            Some("claims another weight format than the node announced")
        } else if b.digests != hop.transcript.clone().finish() {
            Some("records other inputs or outputs than it was sent and handed on")
        } else {
            None
        };
        if let Some(why) = mismatch {
            return Err(NetError::Verification(format!(
                "the signed record of {peer} (blocks {}-{}) {why}",
                info.first_block, info.end_block
            )));
        }
        Ok(FinishedHop {
            job,
            inputs: hop.history,
        })
    }

    /// Whether the client reaches `peer` only through a relay.
    pub fn is_relayed(&self, peer: &PeerId) -> bool {
        self.client.is_relayed(peer)
    }

    /// The nodes in use, in order, with their blocks and costs.
    pub fn route(&self) -> Vec<(Candidate, HopStats)> {
        self.hops
            .iter()
            .map(|h| (h.node.clone(), h.stats.clone()))
            .collect()
    }

    /// The replacements made so far.
    pub fn failovers(&self) -> &[Failover] {
        &self.failovers
    }

    /// Frees the sessions on every node.
    pub fn close(&mut self) {
        for hop in self.hops.drain(..) {
            let body = infer::Request::Close {
                session: hop.session,
            };
            let _ = self
                .runtime
                .block_on(self.client.infer(hop.node.peer, body));
        }
    }

    fn run(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        let mut input = match &mut self.split {
            Some((split, cache, _)) => {
                let hidden =
                    split
                        .front
                        .forward(ShardInput::Tokens(tokens), cache, LogitsAt::Last)?;
                StepInput::Hidden(WireTensor::from_tensor(&hidden)?)
            }
            None => StepInput::Tokens(tokens.to_vec()),
        };
        for i in 0..self.hops.len() {
            let output = self.run_hop(i, input)?;
            input = StepInput::Hidden(output);
        }
        let StepInput::Hidden(last) = input else {
            return Err(NetError::NoRoute("the chain has no hops".into()));
        };
        let logits = match &mut self.split {
            Some((split, _, head_cache)) => split.head.forward(
                ShardInput::Hidden(last.to_tensor()?),
                head_cache,
                LogitsAt::Last,
            )?,
            None => last.to_tensor()?,
        };
        Ok(logits.squeeze(0)?.to_vec1()?)
    }

    /// Runs `input` on hop `i`, replacing its node if it fails.
    fn run_hop(&mut self, i: usize, input: StepInput) -> Result<WireTensor> {
        let mut attempts = 0;
        loop {
            let hop = &self.hops[i];
            let started = Instant::now();
            let body = infer::Request::Step {
                session: hop.session,
                input: input.clone(),
            };
            let answer = self
                .runtime
                .block_on(self.client.infer(hop.node.peer, body));
            let answer = answer.and_then(|r| self.check_output(i, &input, r));
            match answer {
                Ok(output) => {
                    if self.request_id.is_some() {
                        let recorded = (input.to_hop_input()?, decode_values(&output));
                        self.hops[i].transcript.push(&recorded.0, &recorded.1);
                    }
                    let hop = &mut self.hops[i];
                    hop.stats.busy += started.elapsed();
                    hop.stats.steps += 1;
                    hop.stats.bytes_sent += payload_bytes(&input);
                    if input.len() == 1 {
                        hop.stats.decode_steps += 1;
                        hop.stats.decode_bytes_sent += payload_bytes(&input);
                        hop.stats.decode_bytes_received += output.data.len() as u64;
                    }
                    hop.history.push(input);
                    return Ok(output);
                }
                Err(e) if attempts < MAX_FAILOVERS_PER_STEP => {
                    attempts += 1;
                    self.fail_over(i, &e)?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Checks a node's answer has the shape the next stage expects.
    fn check_output(
        &self,
        i: usize,
        input: &StepInput,
        response: infer::Response,
    ) -> Result<WireTensor> {
        let hop = &self.hops[i];
        let infer::Response::Output(t) = response else {
            return Err(NetError::BadMessage(format!(
                "{} answered a step with {response:?}",
                hop.node.peer
            )));
        };
        let want = if hop.node.info.head {
            None
        } else {
            Some(vec![input.len(), hop.node.info.hidden_size])
        };
        if let Some(want) = want {
            if t.shape != want {
                return Err(NetError::BadMessage(format!(
                    "{} returned shape {:?}, expected {want:?}",
                    hop.node.peer, t.shape
                )));
            }
        } else if t.shape.len() != 2 || t.shape[0] != 1 {
            return Err(NetError::BadMessage(format!(
                "{} returned logits of shape {:?}",
                hop.node.peer, t.shape
            )));
        }
        // Dtype and length only: the values are decoded once, by the next node or by `run`.
        t.check()?;
        Ok(t)
    }

    /// Replaces hop `i`'s node with another serving the same range and replays its history.
    /// A node that only dropped off the network once may replace itself, reached anew, when no
    /// other node serves the range.
    fn fail_over(&mut self, i: usize, error: &NetError) -> Result<()> {
        let (first, end) = (
            self.hops[i].node.info.first_block,
            self.hops[i].node.info.end_block,
        );
        let dead = self.hops[i].node.peer;
        let reason = error.to_string();
        warn!("node {dead} for blocks {first}-{end} failed: {reason}");
        let lost = matches!(error, NetError::PeerFailed { .. });
        if !(lost && self.lost_once.insert(dead)) {
            self.failed.insert(dead);
        }
        let found =
            self.runtime
                .block_on(self.client.discover_range(&self.model_digest, first, end))?;
        let mut replacements: Vec<Candidate> = found
            .into_iter()
            .filter(|c| !self.failed.contains(&c.peer) && c.info == self.hops[i].node.info)
            .collect();
        if let Some(gate) = &self.gate {
            let (allowed, _) = self
                .runtime
                .block_on(gate.admit(&self.client, &replacements));
            replacements.retain(|c| allowed.contains(&c.peer));
        }
        replacements.sort_by_key(|c| (c.peer == dead, c.latency));
        let Some(next) = replacements.into_iter().next() else {
            return Err(NetError::NoRoute(format!(
                "node {dead} for blocks {first}-{end} failed ({reason}) and no other node serves that range"
            )));
        };
        let session = self.runtime.block_on(open_session(
            &self.client,
            next.peer,
            &self.model_digest,
            self.request_id.as_deref(),
        ))?;
        let history = self.hops[i].history.clone();
        // The replacement's record covers the replayed steps too.
        let mut transcript = HopTranscript::new();
        for step in &history {
            let body = infer::Request::Step {
                session,
                input: step.clone(),
            };
            match self.runtime.block_on(self.client.infer(next.peer, body))? {
                infer::Response::Output(output) => {
                    if self.request_id.is_some() {
                        output.check()?;
                        transcript.push(&step.to_hop_input()?, &decode_values(&output));
                    }
                }
                other => {
                    return Err(NetError::BadMessage(format!(
                        "{} answered a replayed step with {other:?}",
                        next.peer
                    )))
                }
            }
        }
        if next.peer == dead {
            info!(
                "reached {dead} again for blocks {first}-{end}, replayed {} steps",
                history.len()
            );
            // Its old session, if the node still holds it, is of no more use.
            let (client, body) = (
                self.client.clone(),
                infer::Request::Close {
                    session: self.hops[i].session,
                },
            );
            self.runtime.spawn(async move {
                let _ = client.infer(dead, body).await;
            });
        } else {
            info!(
                "switched blocks {first}-{end} from {dead} to {}, replayed {} steps",
                next.peer,
                history.len()
            );
        }
        self.failovers.push(Failover {
            blocks: (first, end),
            from: dead,
            to: next.peer,
            reason,
            replayed_steps: history.len(),
        });
        let hop = &mut self.hops[i];
        hop.node = next;
        hop.session = session;
        hop.transcript = transcript;
        Ok(())
    }
}

impl TokenStep for RemoteChain {
    fn step(&mut self, tokens: &[u32]) -> veil_model::Result<Vec<f32>> {
        self.run(tokens).map_err(|e| match e {
            NetError::Model(m) => m,
            other => ModelError::Remote(other.to_string()),
        })
    }
}

impl Drop for RemoteChain {
    fn drop(&mut self) {
        // Best effort, without blocking (the drop may run inside the runtime).
        for hop in self.hops.drain(..) {
            let client = self.client.clone();
            let body = infer::Request::Close {
                session: hop.session,
            };
            self.runtime.spawn(async move {
                let _ = client.infer(hop.node.peer, body).await;
            });
        }
    }
}

/// What a chain is opened for.
struct ChainTarget<'a> {
    model_digest: &'a str,
    block_count: usize,
    /// Set for a verified chain.
    request_id: Option<String>,
}

/// Opens a session on `peer`: a hop session recording itself when `request_id` is given.
async fn open_session(
    client: &SwarmClient,
    peer: PeerId,
    model_digest: &str,
    request_id: Option<&str>,
) -> Result<SessionId> {
    let model = Some(model_digest.to_string());
    let opened = match request_id {
        Some(id) => {
            let request_id = id.to_string();
            match client
                .verify(peer, verify::Request::OpenHop { request_id, model })
                .await?
            {
                verify::Response::Opened { session } => Some(session),
                _ => None,
            }
        }
        None => match client.infer(peer, infer::Request::Open { model }).await? {
            infer::Response::Opened { session } => Some(session),
            _ => None,
        },
    };
    opened.ok_or_else(|| NetError::BadMessage(format!("{peer} answered Open with no session")))
}

/// A checked tensor's values (its bytes are whole little-endian f32s).
fn decode_values(t: &WireTensor) -> Vec<f32> {
    t.data
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn payload_bytes(input: &StepInput) -> u64 {
    match input {
        StepInput::Tokens(ids) => 4 * ids.len() as u64,
        StepInput::Hidden(t) => t.data.len() as u64,
    }
}
