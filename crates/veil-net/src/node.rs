//! `veil node`: serve one shard to the swarm.
//!
//! The event loop owns the swarm and the session table; each step runs on a blocking thread
//! with its session taken out of the table, so a long prefill does not stall the network or
//! other sessions' requests.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use libp2p::request_response::{self, ResponseChannel};
use libp2p::swarm::SwarmEvent;
use libp2p::{gossipsub, identify, Multiaddr, PeerId, Swarm};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};
use veil_model::{
    GgufFile, LogitsAt, ShardCache, ShardInput, ShardManifest, ShardModel, Tensor, WeightFormat,
};
use veil_verify::{
    judge_hop, load_serving_shard, run_hop_step, validate, HopInput, HopJob, HopTranscript, Job,
    Keypair, Misbehaviour, ServingSession, Signed, Tolerances, VerdictCommit, VerdictReveal,
};

use crate::behaviour::{
    build_swarm, model_key, range_key, zk_key, VeilBehaviour, VeilBehaviourEvent,
};
use crate::error::{NetError, Result};
use veil_zk::WeightsCommitment;

use crate::history::{
    accept_gossiped, AuthorQuota, RunTemplate, SessionUsage, MAX_KEPT_RUNS, RUNS_TOPIC,
};
use crate::node_state::NodeState;
use crate::sessions::{SessionLimits, SessionTable};
use crate::state_writer::{StateWrite, StateWriter};
use crate::wire::{
    ErrorKind, Request, RequestBody, Response, SessionId, ShardInfo, StepInput, WeightsRoot,
    WireTensor, WIRE_VERSION,
};

/// How a node is started.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// The shard file (or a whole model file) to serve.
    pub shard: PathBuf,
    /// Weight format to run in.
    pub format: WeightFormat,
    /// Addresses to listen on.
    pub listen: Vec<Multiaddr>,
    /// Peers to join through, each ending in `/p2p/<peer id>`.
    pub bootstrap: Vec<Multiaddr>,
    /// The node's database (identity, known peers).
    pub state: PathBuf,
    /// Session limits.
    pub limits: SessionLimits,
    /// How long an answer may take before the asker gives up.
    pub request_timeout: Duration,
    /// Take no new connections while this process uses more memory than this (default: 90% of
    /// the machine's memory).
    pub max_memory_bytes: Option<usize>,
    /// Told each address the node listens on (for a node run inside another program).
    pub on_listen: Option<mpsc::UnboundedSender<Multiaddr>>,
    /// Cheat in this way: only for tests and the demo, to show verification catches it.
    pub misbehave: Option<Misbehaviour>,
    /// Record each plain session as a MetaInf run: for a node serving the whole model (a
    /// shard's time is only part of a run).
    pub history: Option<RunTemplate>,
    /// Where this node's TEE evidence comes from, if it runs in one.
    pub tee: Option<veil_tee::EvidenceSource>,
    /// A committed private model whose answers this node proves.
    pub zk: Option<Arc<veil_zk::proof::Prover>>,
}

/// What the node holds for one session.
enum NodeSession {
    /// A plain session: the KV cache, and what it has used so far.
    Plain(ShardCache, SessionUsage),
    /// A verified session on a whole-model node: samples, commits, signs at the end.
    Verified(Box<VerifiedSession>),
    /// One hop of a verified split chain: a plain session that records its inputs and outputs
    /// and signs them at the end.
    Hop(Box<HopSession>),
}

/// A hop session and the request it serves.
struct HopSession {
    request_id: String,
    cache: ShardCache,
    transcript: HopTranscript,
}

/// A verified session and the request it serves.
struct VerifiedSession {
    request_id: String,
    serving: ServingSession,
}

impl NodeSession {
    fn position(&self) -> usize {
        match self {
            Self::Plain(cache, _) => cache.position(),
            Self::Verified(v) => v.serving.position(),
            Self::Hop(h) => h.cache.position(),
        }
    }
}

/// Verdicts sealed and waiting to be revealed, oldest first; bounded so peers cannot fill
/// memory with judge requests.
const MAX_PENDING_REVEALS: usize = 256;
/// Sealed verdicts one peer may leave waiting; its oldest make way for new ones.
const MAX_PENDING_REVEALS_PER_PEER: usize = 16;
/// Judgements run at once (each a prefill of up to a session's length); more are refused as
/// busy. One peer may have one judgement running.
const MAX_JUDGES_IN_FLIGHT: usize = 2;

/// A step finished on a blocking thread, on its way back to the event loop.
struct StepDone {
    session: SessionId,
    cache: NodeSession,
    result: std::result::Result<WireTensor, StepError>,
    channel: ResponseChannel<Response>,
}

/// Why a step failed, which decides whether its session survives.
enum StepError {
    /// The input did not decode; the cache is untouched.
    BadInput(NetError),
    /// The model failed part-way; the cache may be half-updated.
    Failed(NetError),
}

/// Proofs of the private model made at once; more requests are refused as busy (each costs
/// about a second and a half of CPU).
const MAX_PROOFS_IN_FLIGHT: usize = 2;
/// TEE quotes and weight openings obtained at once; more requests are refused as busy.
const MAX_CHALLENGES_IN_FLIGHT: usize = 8;

/// How often provider records are published again, so peers that joined later learn them.
const REANNOUNCE: Duration = Duration::from_secs(15);

/// Loads the shard, joins the swarm and serves until `shutdown` resolves.
pub async fn run_node(
    config: NodeConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let state = NodeState::open(&config.state)?;
    let key = state.identity()?;
    let local_id = key.public().to_peer_id();

    let path = config.shard.clone();
    let format = config.format;
    let misbehave = config.misbehave;
    let (model, manifest, weights) = tokio::task::spawn_blocking(move || -> Result<_> {
        let mut gguf = GgufFile::open(&path)?;
        let manifest = ShardManifest::of(&gguf)?;
        let shard = manifest.shard();
        let whole = shard.embedding && shard.head && shard.layers.len() == manifest.block_count;
        if let Some(kind) = misbehave.filter(|k| !k.in_weights() && !whole) {
            return Err(NetError::BadMessage(format!(
                "--misbehave {kind} needs a node serving the whole model"
            )));
        }
        let model = load_serving_shard(&mut gguf, &shard, format, misbehave)?;
        let weights = WeightsCommitment::of_shard(&mut gguf, &shard)
            .map_err(|e| NetError::BadMessage(format!("cannot commit to the weights: {e}")))?;
        Ok((model, manifest, weights))
    })
    .await
    .map_err(|e| NetError::Network(format!("loading task failed: {e}")))??;
    let model = Arc::new(model);
    let weights = Arc::new(weights);
    let runs = state.runs()?;
    let public_key = key.public().encode_protobuf();
    let tee_kind = match config.tee.clone() {
        None => None,
        Some(source) => {
            let key = public_key.clone();
            let evidence = tokio::task::spawn_blocking(move || {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                source.evidence(&key, veil_tee::Freshness::Time(now))
            })
            .await
            .map_err(|e| NetError::Network(format!("TEE task failed: {e}")))?
            .map_err(|e| NetError::BadMessage(format!("cannot obtain TEE evidence: {e}")))?;
            info!(
                "running in a TEE: {} ({} bytes of evidence)",
                evidence.kind,
                evidence.quote.len()
            );
            Some(evidence.kind)
        }
    };
    let shard_info = ShardInfo {
        model_digest: manifest.model_digest.clone(),
        first_block: manifest.first_block,
        end_block: manifest.end_block,
        block_count: manifest.block_count,
        embedding: manifest.embedding,
        head: manifest.head,
        hidden_size: model.config().hidden_size,
        max_session_tokens: config.limits.max_tokens.min(model.config().context_length),
        format: format.to_string(),
        tee: tee_kind,
        weights: Some(WeightsRoot {
            root: weights.root_hex(),
            leaves: weights.leaf_count() as u64,
        }),
        zk_commitment: config.zk.as_ref().map(|p| p.commitment().to_string()),
        // A cheat (test-only) announces what an honest node of its claimed format would: its
        // own weights may have been swapped for ones that are not.
        exact: match misbehave {
            None => model.bit_reproducible(),
            Some(_) => !matches!(format, WeightFormat::F32 | WeightFormat::F16),
        },
    };
    let whole = shard_info.embedding
        && shard_info.head
        && shard_info.first_block == 0
        && shard_info.end_block == shard_info.block_count;
    let judge = Arc::new(Judge {
        key: key.clone(),
        digest: shard_info.model_digest.clone(),
        format: shard_info.format.clone(),
        whole,
        misbehave,
    });
    if let Some(kind) = misbehave {
        warn!("this node cheats ({kind}): for testing verification only");
    }
    let vocab_size = model.config().vocab_size;
    info!(
        "serving {} of model {} as {local_id}",
        model.shard(),
        &shard_info.model_digest[..12.min(shard_info.model_digest.len())]
    );

    let history = config.history.clone().filter(|_| whole);
    let mut swarm = build_swarm(key, config.request_timeout, config.max_memory_bytes)?;
    let runs_topic = gossipsub::IdentTopic::new(RUNS_TOPIC);
    swarm
        .behaviour_mut()
        .gossipsub
        .subscribe(&runs_topic)
        .map_err(|e| NetError::Network(format!("cannot subscribe to run records: {e}")))?;
    for addr in &config.listen {
        swarm
            .listen_on(addr.clone())
            .map_err(|e| NetError::Network(format!("cannot listen on {addr}: {e}")))?;
    }
    // Join only once every listener has its address: identify tells peers our listen addresses
    // when a connection opens, and a peer told none cannot route anyone to this node.
    let mut listening = 0;
    while listening < config.listen.len() {
        let event = tokio::time::timeout(Duration::from_secs(30), swarm.select_next_some())
            .await
            .map_err(|_| NetError::Network("no listen address within 30 s".into()))?;
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                report_listening(&address, local_id, config.on_listen.as_ref());
                listening += 1;
            }
            SwarmEvent::ListenerError { error, .. } => {
                return Err(NetError::Network(format!("listener failed: {error}")));
            }
            other => debug!("{other:?}"),
        }
    }
    let mut bootstrap = config.bootstrap.clone();
    bootstrap.extend(state.peers()?.into_iter().map(|(_, a)| a));
    // From here on the database is written on its own thread.
    let mut writer = StateWriter::start(state, runs)
        .map_err(|e| NetError::Network(format!("cannot start the database writer: {e}")))?;
    join(&mut swarm, &bootstrap)?;
    announce(&mut swarm, &shard_info);

    let mut sessions: SessionTable<NodeSession> = SessionTable::new(SessionLimits {
        max_tokens: shard_info.max_session_tokens,
        ..config.limits
    });
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<StepDone>();
    let (answered_tx, mut answered_rx) = mpsc::unbounded_channel::<Answered>();
    let mut reveals: Reveals = Default::default();
    let mut judging: std::collections::HashSet<PeerId> = Default::default();
    let mut gossip_quota = AuthorQuota::default();
    let judges_in_flight = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let proofs_in_flight = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let challenges_in_flight = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut sweep = tokio::time::interval(Duration::from_secs(1));
    let mut reannounce = tokio::time::interval(REANNOUNCE);
    tokio::pin!(shutdown);

    loop {
        tokio::select! {
            _ = &mut shutdown => {
                info!("shutting down with {} sessions open", sessions.len());
                return Ok(());
            }
            _ = sweep.tick() => {
                let expired = sessions.expire(Instant::now());
                if !expired.is_empty() {
                    info!("freed {} idle sessions", expired.len());
                }
                for session in expired {
                    keep_run(&mut swarm, &mut writer, history.as_ref(), session);
                }
            }
            _ = reannounce.tick() => announce(&mut swarm, &shard_info),
            Some(done) = done_rx.recv() => {
                let response = match done.result {
                    Ok(tensor) => {
                        let held = done.cache.position();
                        sessions.put_back(done.session, done.cache, held, Instant::now());
                        Response::Output(tensor)
                    }
                    Err(StepError::BadInput(e)) => {
                        let held = done.cache.position();
                        sessions.put_back(done.session, done.cache, held, Instant::now());
                        refuse(ErrorKind::BadRequest, e.to_string())
                    }
                    Err(StepError::Failed(e)) => {
                        sessions.discard(done.session);
                        warn!("session {} failed and was dropped: {e}", done.session);
                        refuse(ErrorKind::Internal, e.to_string())
                    }
                };
                let _ = swarm.behaviour_mut().infer.send_response(done.channel, response);
            }
            Some(answered) = answered_rx.recv() => {
                if let Some(asker) = answered.judged_for {
                    judging.remove(&asker);
                    if let Some(reveal) = answered.reveal {
                        keep_reveal(&mut reveals, asker, reveal);
                    }
                }
                let _ = swarm.behaviour_mut().infer.send_response(answered.channel, answered.response);
            }
            event = swarm.select_next_some() => match event {
                SwarmEvent::NewListenAddr { address, .. } => {
                    report_listening(&address, local_id, config.on_listen.as_ref());
                }
                SwarmEvent::Behaviour(VeilBehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. })) => {
                    for addr in info.listen_addrs {
                        if is_routable(&addr) {
                            swarm.behaviour_mut().kad.add_address(&peer_id, addr.clone());
                            writer.send(StateWrite::Peer { peer: peer_id.to_string(), addr: addr.with_p2p(peer_id).unwrap_or_else(|a| a) });
                        }
                    }
                }
                SwarmEvent::Behaviour(VeilBehaviourEvent::Infer(request_response::Event::Message {
                    peer,
                    message: request_response::Message::Request { request, channel, .. },
                    ..
                })) => {
                    let answer = handle(&mut sessions, &model, &shard_info, &judge, &reveals, vocab_size, peer, request);
                    match answer {
                        Handled::Now(response) => {
                            let _ = swarm.behaviour_mut().infer.send_response(channel, response);
                        }
                        Handled::Attest(nonce) => {
                            let Some(slot) = InFlight::take(&challenges_in_flight, MAX_CHALLENGES_IN_FLIGHT) else {
                                let _ = swarm.behaviour_mut().infer.send_response(channel, refuse(ErrorKind::Busy, "answering other challenges; try again shortly"));
                                continue;
                            };
                            let (source, key, tx) = (config.tee.clone(), public_key.clone(), answered_tx.clone());
                            tokio::task::spawn_blocking(move || {
                                let _slot = slot;
                                let response = match source.map(|s| s.evidence(&key, veil_tee::Freshness::Nonce(nonce))) {
                                    Some(Ok(evidence)) => Response::Attested(Box::new(evidence)),
                                    Some(Err(e)) => refuse(ErrorKind::Internal, format!("cannot obtain TEE evidence: {e}")),
                                    None => refuse(ErrorKind::BadRequest, "this node runs in no TEE"),
                                };
                                let _ = tx.send(Answered { channel, response, reveal: None, judged_for: None });
                            });
                        }
                        Handled::ProveInference(input) => {
                            let Some(slot) = InFlight::take(&proofs_in_flight, MAX_PROOFS_IN_FLIGHT) else {
                                let _ = swarm.behaviour_mut().infer.send_response(channel, refuse(ErrorKind::Busy, "proving other answers; try again shortly"));
                                continue;
                            };
                            let (prover, tx) = (config.zk.clone(), answered_tx.clone());
                            tokio::task::spawn_blocking(move || {
                                let _slot = slot;
                                let response = match prover.map(|p| p.prove(&input)) {
                                    Some(Ok(proof)) => Response::InferenceProof(Box::new(proof)),
                                    Some(Err(e)) => refuse(ErrorKind::BadRequest, e.to_string()),
                                    None => refuse(ErrorKind::BadRequest, "this node proves no private model"),
                                };
                                let _ = tx.send(Answered { channel, response, reveal: None, judged_for: None });
                            });
                        }
                        Handled::OpenWeights(leaves) => {
                            let Some(slot) = InFlight::take(&challenges_in_flight, MAX_CHALLENGES_IN_FLIGHT) else {
                                let _ = swarm.behaviour_mut().infer.send_response(channel, refuse(ErrorKind::Busy, "answering other challenges; try again shortly"));
                                continue;
                            };
                            let (weights, path, tx) = (Arc::clone(&weights), config.shard.clone(), answered_tx.clone());
                            tokio::task::spawn_blocking(move || {
                                let _slot = slot;
                                let opened = GgufFile::open(&path)
                                    .map_err(veil_zk::ZkError::from)
                                    .and_then(|mut file| weights.open(&mut file, &leaves));
                                let response = match opened {
                                    Ok(openings) => Response::WeightOpenings(Box::new(openings)),
                                    Err(e @ veil_zk::ZkError::BadChallenge(_)) => refuse(ErrorKind::BadRequest, e.to_string()),
                                    Err(e) => refuse(ErrorKind::Internal, e.to_string()),
                                };
                                let _ = tx.send(Answered { channel, response, reveal: None, judged_for: None });
                            });
                        }
                        Handled::Closed(session) => {
                            let _ = swarm.behaviour_mut().infer.send_response(channel, Response::Closed);
                            keep_run(&mut swarm, &mut writer, history.as_ref(), session);
                        }
                        Handled::Judge(work) => {
                            if judging.contains(&peer) {
                                let _ = swarm.behaviour_mut().infer.send_response(channel, refuse(ErrorKind::Busy, "judging your last job; ask again once it is answered"));
                                continue;
                            }
                            let Some(slot) = InFlight::take(&judges_in_flight, MAX_JUDGES_IN_FLIGHT) else {
                                let _ = swarm.behaviour_mut().infer.send_response(channel, refuse(ErrorKind::Busy, "judging other jobs; try again shortly"));
                                continue;
                            };
                            judging.insert(peer);
                            let (model, judge, tx) = (Arc::clone(&model), Arc::clone(&judge), answered_tx.clone());
                            tokio::task::spawn_blocking(move || {
                                let _slot = slot;
                                let (response, reveal) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| judge.judge(&model, &work)))
                                    .unwrap_or_else(|_| (refuse(ErrorKind::Internal, "the judgement failed inside the model"), None));
                                let _ = tx.send(Answered { channel, response, reveal, judged_for: Some(peer) });
                            });
                        }
                        Handled::Step { session, cache, input } => {
                            let model = Arc::clone(&model);
                            let tx = done_tx.clone();
                            tokio::task::spawn_blocking(move || {
                                let mut cache = cache;
                                // A step that panics still answers, and its session is dropped
                                // rather than held as running forever.
                                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_step(&model, &mut cache, input)))
                                    .unwrap_or_else(|_| Err(StepError::Failed(NetError::BadMessage("the step failed inside the model; the session is dropped".into()))));
                                let _ = tx.send(StepDone { session, cache, result, channel });
                            });
                        }
                    }
                }
                SwarmEvent::Behaviour(VeilBehaviourEvent::Gossipsub(gossipsub::Event::Message { message, message_id, propagation_source })) => {
                    let verdict = keep_peer_run(&mut writer, &mut gossip_quota, &message);
                    // Rejected records cost their sender score and are not relayed.
                    swarm.behaviour_mut().gossipsub.report_message_validation_result(&message_id, &propagation_source, verdict);
                }
                SwarmEvent::Behaviour(VeilBehaviourEvent::Infer(request_response::Event::InboundFailure { peer, error, .. })) => {
                    // Garbage, oversized or truncated requests end here; the node carries on.
                    warn!("request from {peer} failed: {error}");
                }
                SwarmEvent::ConnectionClosed { peer_id, cause: Some(cause), .. } => {
                    debug!("connection to {peer_id} closed: {cause}");
                }
                other => debug!("{other:?}"),
            }
        }
    }
}

/// A place among the expensive requests running at once, given back when dropped.
struct InFlight(Arc<std::sync::atomic::AtomicUsize>);

impl InFlight {
    /// A place, if fewer than `max` are taken.
    fn take(count: &Arc<std::sync::atomic::AtomicUsize>, max: usize) -> Option<Self> {
        use std::sync::atomic::Ordering;
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
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// What the event loop does with a request.
enum Handled {
    /// Answer at once.
    Now(Response),
    /// Run a step on a blocking thread.
    Step {
        session: SessionId,
        cache: NodeSession,
        input: StepInput,
    },
    /// Recompute a job on a blocking thread.
    Judge(JudgeWork),
    /// A session was closed: answer, and keep its run record.
    Closed(NodeSession),
    /// Obtain TEE evidence for this nonce on a blocking thread.
    Attest([u8; 32]),
    /// Open these leaves of the weights commitment on a blocking thread.
    OpenWeights(Vec<u32>),
    /// Prove the private model's answer on a blocking thread.
    ProveInference(Vec<u8>),
}

/// What a judge recomputes.
enum JudgeWork {
    /// A whole-model node's answer.
    Answer(Box<Signed<Job>>),
    /// One hop of a split chain, with the inputs it was sent (checked, decoded off the event
    /// loop).
    Hop(Box<Signed<HopJob>>, Vec<StepInput>),
}

/// An answer made on a blocking thread (a judgement, TEE evidence, weight openings, a proof).
struct Answered {
    channel: ResponseChannel<Response>,
    response: Response,
    /// A judgement's sealed verdict, kept for the peer that asked.
    reveal: Option<Signed<VerdictReveal>>,
    /// For a judgement: the peer that asked for it.
    judged_for: Option<PeerId>,
}

/// Sealed verdicts waiting to be revealed, each with the peer that asked for the judgement.
type Reveals = std::collections::VecDeque<(PeerId, Signed<VerdictReveal>)>;

/// Keeps `reveal` for `asker`, within the per-peer and global bounds (oldest out first).
fn keep_reveal(reveals: &mut Reveals, asker: PeerId, reveal: Signed<VerdictReveal>) {
    reveals.retain(|(p, r)| !(*p == asker && r.body.job == reveal.body.job));
    let held = reveals.iter().filter(|(p, _)| *p == asker).count();
    if held >= MAX_PENDING_REVEALS_PER_PEER {
        if let Some(oldest) = reveals.iter().position(|(p, _)| *p == asker) {
            reveals.remove(oldest);
        }
    }
    if reveals.len() >= MAX_PENDING_REVEALS {
        reveals.pop_front();
    }
    reveals.push_back((asker, reveal));
}

/// What a node needs to take part in verification.
struct Judge {
    key: Keypair,
    digest: String,
    format: String,
    whole: bool,
    misbehave: Option<Misbehaviour>,
}

impl Judge {
    /// Recomputes a job or a hop and seals the verdict; the reveal is kept for later.
    fn judge(
        &self,
        model: &ShardModel,
        work: &JudgeWork,
    ) -> (Response, Option<Signed<VerdictReveal>>) {
        match work {
            JudgeWork::Answer(job) => self.judge_answer(model, job),
            JudgeWork::Hop(job, inputs) => self.judge_hop(model, job, inputs),
        }
    }

    /// Replays a chain hop's inputs on this node's blocks and seals the verdict.
    fn judge_hop(
        &self,
        model: &ShardModel,
        job: &Signed<HopJob>,
        inputs: &[StepInput],
    ) -> (Response, Option<Signed<VerdictReveal>>) {
        let body = &job.body;
        let inputs: Vec<HopInput> = match inputs.iter().map(StepInput::to_hop_input).collect() {
            Ok(inputs) => inputs,
            Err(e) => return (refuse(ErrorKind::BadRequest, e.to_string()), None),
        };
        match job.verify() {
            Ok(peer) if peer.to_string() == body.node => {}
            Ok(_) => {
                return (
                    refuse(ErrorKind::BadRequest, "the hop is not signed by its node"),
                    None,
                )
            }
            Err(e) => return (refuse(ErrorKind::BadRequest, e.to_string()), None),
        }
        if body.model_digest != self.digest || body.format != self.format {
            return (
                refuse(
                    ErrorKind::BadRequest,
                    format!(
                        "this node runs model {} in {}, the hop claims {} in {}",
                        self.digest, self.format, body.model_digest, body.format
                    ),
                ),
                None,
            );
        }
        let outcome = judge_hop(model, body, &inputs)
            .map_err(|e| e.to_string())
            .and_then(|verdict| {
                let digest = body.digest().map_err(|e| e.to_string())?;
                self.seal(digest, verdict)
            });
        match outcome {
            Ok((commit, reveal)) => (Response::Committed(commit), Some(reveal)),
            Err(e) => (refuse(ErrorKind::BadRequest, e), None),
        }
    }

    /// A verdict on job `digest`, sealed and opened, both signed.
    fn seal(
        &self,
        digest: String,
        verdict: veil_verify::Verdict,
    ) -> std::result::Result<(Signed<VerdictCommit>, Signed<VerdictReveal>), String> {
        let reveal = VerdictReveal::new(digest, verdict);
        let commit = reveal
            .commit(&self.key.public().to_peer_id())
            .map_err(|e| e.to_string())?;
        let sign = |e: veil_verify::VerifyError| e.to_string();
        Ok((
            Signed::sign(commit, &self.key).map_err(sign)?,
            Signed::sign(reveal, &self.key).map_err(sign)?,
        ))
    }

    /// Recomputes a whole-model node's signed answer and seals the verdict.
    fn judge_answer(
        &self,
        model: &ShardModel,
        job: &Signed<Job>,
    ) -> (Response, Option<Signed<VerdictReveal>>) {
        let body = &job.body;
        match job.verify() {
            Ok(peer) if peer.to_string() == body.generator => {}
            Ok(_) => {
                return (
                    refuse(
                        ErrorKind::BadRequest,
                        "the job is not signed by its generator",
                    ),
                    None,
                )
            }
            Err(e) => return (refuse(ErrorKind::BadRequest, e.to_string()), None),
        }
        if body.model_digest != self.digest || body.format != self.format {
            return (
                refuse(
                    ErrorKind::BadRequest,
                    format!(
                        "this node runs model {} in {}, the job claims {} in {}",
                        self.digest, self.format, body.model_digest, body.format
                    ),
                ),
                None,
            );
        }
        let outcome = validate(
            std::slice::from_ref(model),
            &body.claim,
            &Tolerances::default(),
        )
        .map_err(|e| e.to_string())
        .and_then(|v| {
            let digest = body.digest().map_err(|e| e.to_string())?;
            self.seal(digest, v.verdict)
        });
        match outcome {
            Ok((commit, reveal)) => (Response::Committed(commit), Some(reveal)),
            Err(e) => (refuse(ErrorKind::BadRequest, e), None),
        }
    }
}

/// The answer to a request on a session that is unknown (to this peer) or over its limits.
fn session_refused(e: crate::sessions::SessionRefusal) -> Response {
    let kind = match e {
        crate::sessions::SessionRefusal::Unknown(_) => ErrorKind::UnknownSession,
        _ => ErrorKind::Busy,
    };
    refuse(kind, e.to_string())
}

fn refuse(kind: ErrorKind, message: impl Into<String>) -> Response {
    Response::Error {
        kind,
        message: message.into(),
    }
}

/// Validates a request and answers it, or hands a step to a worker.
#[allow(clippy::too_many_arguments)]
fn handle(
    sessions: &mut SessionTable<NodeSession>,
    model: &ShardModel,
    info: &ShardInfo,
    judge: &Judge,
    reveals: &Reveals,
    vocab_size: usize,
    peer: PeerId,
    request: Request,
) -> Handled {
    if request.version != WIRE_VERSION {
        return Handled::Now(refuse(
            ErrorKind::Version,
            format!(
                "protocol version {} is not spoken here (this node speaks {WIRE_VERSION})",
                request.version
            ),
        ));
    }
    let now = Instant::now();
    Handled::Now(match request.body {
        RequestBody::Info => Response::Info(info.clone()),
        RequestBody::Open => match sessions.open(
            peer,
            NodeSession::Plain(model.new_cache(), SessionUsage::default()),
            now,
        ) {
            Ok(session) => {
                info!("opened session {session} for {peer}");
                Response::Opened { session }
            }
            Err(e) => refuse(ErrorKind::Busy, e.to_string()),
        },
        RequestBody::OpenVerified {
            request_id,
            sampling,
            commitment,
        } => {
            if !judge.whole {
                return Handled::Now(refuse(
                    ErrorKind::BadRequest,
                    "verified sessions need a node serving the whole model",
                ));
            }
            if !veil_verify::is_request_id(&request_id) {
                return Handled::Now(refuse(
                    ErrorKind::BadRequest,
                    "a request id is 64 hex digits",
                ));
            }
            let fault_seed = rand::random();
            let shards = std::slice::from_ref(model);
            let serving = sampling.params().map_err(|e| e.to_string()).and_then(|p| {
                ServingSession::new(shards, p, judge.misbehave, fault_seed)
                    .and_then(|s| s.with_commitment(shards, commitment))
                    .map_err(|e| e.to_string())
            });
            let serving = match serving {
                Ok(s) => s,
                Err(e) => return Handled::Now(refuse(ErrorKind::BadRequest, e)),
            };
            let state = NodeSession::Verified(Box::new(VerifiedSession {
                request_id,
                serving,
            }));
            match sessions.open(peer, state, now) {
                Ok(session) => {
                    info!("opened verified session {session} for {peer}");
                    Response::Opened { session }
                }
                Err(e) => refuse(ErrorKind::Busy, e.to_string()),
            }
        }
        RequestBody::Finish { session } => match sessions.take(peer, session, 0) {
            Ok((NodeSession::Verified(v), _)) => {
                sessions.discard(session);
                let job = Job {
                    request_id: v.request_id,
                    model_digest: info.model_digest.clone(),
                    format: info.format.clone(),
                    generator: judge.key.public().to_peer_id().to_string(),
                    claim: v.serving.finish(),
                };
                match Signed::sign(job, &judge.key) {
                    Ok(signed) => Response::Finished(Box::new(signed)),
                    Err(e) => refuse(ErrorKind::Internal, e.to_string()),
                }
            }
            Ok((plain, held)) => {
                sessions.put_back(session, plain, held, now);
                refuse(
                    ErrorKind::BadRequest,
                    format!("session {session} is not verified"),
                )
            }
            Err(e) => session_refused(e),
        },
        RequestBody::OpenHop { request_id } => {
            if !info.exact {
                return Handled::Now(refuse(
                    ErrorKind::BadRequest,
                    "hops of verified chains are checked bit for bit, and this node's kernels \
                     are not bit-reproducible",
                ));
            }
            if !veil_verify::is_request_id(&request_id) {
                return Handled::Now(refuse(
                    ErrorKind::BadRequest,
                    "a request id is 64 hex digits",
                ));
            }
            let state = NodeSession::Hop(Box::new(HopSession {
                request_id,
                cache: model.new_cache(),
                transcript: HopTranscript::new(),
            }));
            match sessions.open(peer, state, now) {
                Ok(session) => {
                    info!("opened hop session {session} for {peer}");
                    Response::Opened { session }
                }
                Err(e) => refuse(ErrorKind::Busy, e.to_string()),
            }
        }
        RequestBody::FinishHop { session } => match sessions.take(peer, session, 0) {
            Ok((NodeSession::Hop(h), _)) => {
                sessions.discard(session);
                let job = HopJob {
                    request_id: h.request_id,
                    model_digest: info.model_digest.clone(),
                    format: info.format.clone(),
                    node: judge.key.public().to_peer_id().to_string(),
                    first_block: info.first_block,
                    end_block: info.end_block,
                    digests: h.transcript.finish(),
                };
                match Signed::sign(job, &judge.key) {
                    Ok(signed) => Response::HopFinished(Box::new(signed)),
                    Err(e) => refuse(ErrorKind::Internal, e.to_string()),
                }
            }
            Ok((other, held)) => {
                sessions.put_back(session, other, held, now);
                refuse(
                    ErrorKind::BadRequest,
                    format!("session {session} is not a hop session"),
                )
            }
            Err(e) => session_refused(e),
        },
        RequestBody::JudgeHop { job, inputs } => {
            let body = &job.body;
            if (body.first_block, body.end_block) != (info.first_block, info.end_block) {
                return Handled::Now(refuse(
                    ErrorKind::BadRequest,
                    format!(
                        "the hop ran blocks {}-{}; this node serves {}-{}",
                        body.first_block, body.end_block, info.first_block, info.end_block
                    ),
                ));
            }
            let positions: usize = inputs.iter().map(StepInput::len).sum();
            if positions > info.max_session_tokens {
                return Handled::Now(refuse(
                    ErrorKind::BadRequest,
                    format!(
                        "the hop holds {positions} positions; this node judges at most {}",
                        info.max_session_tokens
                    ),
                ));
            }
            if let Err(e) = inputs
                .iter()
                .try_for_each(|input| info.check_input(input, vocab_size))
            {
                return Handled::Now(refuse(ErrorKind::BadRequest, e.to_string()));
            }
            return Handled::Judge(JudgeWork::Hop(job, inputs));
        }
        RequestBody::Judge { job } => {
            if !judge.whole {
                return Handled::Now(refuse(
                    ErrorKind::BadRequest,
                    "judging needs a node serving the whole model",
                ));
            }
            let positions = job.body.claim.prompt.len() + job.body.claim.output.len();
            if positions > info.max_session_tokens {
                return Handled::Now(refuse(
                    ErrorKind::BadRequest,
                    format!(
                        "the job holds {positions} positions; this node judges at most {}",
                        info.max_session_tokens
                    ),
                ));
            }
            return Handled::Judge(JudgeWork::Answer(job));
        }
        RequestBody::ProveInference { input } => {
            if info.zk_commitment.is_none() {
                return Handled::Now(refuse(
                    ErrorKind::BadRequest,
                    "this node proves no private model",
                ));
            }
            if input.len() != veil_zk::model::INPUTS || input.iter().any(|&p| p > 16) {
                return Handled::Now(refuse(
                    ErrorKind::BadRequest,
                    "an input is 64 pixels of 0..16",
                ));
            }
            return Handled::ProveInference(input);
        }
        RequestBody::OpenWeights { leaves } => {
            if leaves.is_empty() || leaves.len() > veil_zk::MAX_OPENINGS {
                return Handled::Now(refuse(
                    ErrorKind::BadRequest,
                    format!("ask for 1 to {} leaves", veil_zk::MAX_OPENINGS),
                ));
            }
            return Handled::OpenWeights(leaves);
        }
        RequestBody::Attest { nonce } => {
            if info.tee.is_none() {
                return Handled::Now(refuse(ErrorKind::BadRequest, "this node runs in no TEE"));
            }
            return Handled::Attest(nonce);
        }
        // Only to the peer that asked for the judgement: another judge must not copy it.
        RequestBody::Reveal { job } => match reveals
            .iter()
            .find(|(asker, r)| *asker == peer && r.body.job == job)
        {
            Some((_, reveal)) => Response::Revealed(reveal.clone()),
            None => refuse(
                ErrorKind::UnknownSession,
                format!("no sealed verdict on job {job} here"),
            ),
        },
        RequestBody::Close { session } => match sessions.close(peer, session) {
            Some(closed) => return Handled::Closed(closed),
            None => refuse(
                ErrorKind::UnknownSession,
                format!("unknown session {session}"),
            ),
        },
        RequestBody::Step { session, input } => {
            if let Err(e) = info.check_input(&input, vocab_size) {
                return Handled::Now(refuse(ErrorKind::BadRequest, e.to_string()));
            }
            match sessions.take(peer, session, input.len()) {
                Ok((cache, _)) => {
                    return Handled::Step {
                        session,
                        cache,
                        input,
                    }
                }
                Err(e) => session_refused(e),
            }
        }
    })
}

/// Runs one step of a session: hidden states out, or last-position logits for a head shard.
fn run_step(
    model: &ShardModel,
    session: &mut NodeSession,
    input: StepInput,
) -> std::result::Result<WireTensor, StepError> {
    let (cache, usage) = match session {
        NodeSession::Plain(cache, usage) => (cache, usage),
        NodeSession::Verified(v) => {
            let StepInput::Tokens(ids) = &input else {
                return Err(StepError::BadInput(NetError::BadMessage(
                    "a verified session takes token ids".into(),
                )));
            };
            let logits = v
                .serving
                .step(std::slice::from_ref(model), ids)
                .map_err(|e| StepError::BadInput(NetError::BadMessage(e.to_string())))?;
            let n = logits.len();
            let t = Tensor::from_vec(logits, (1, n), &candle_core::Device::Cpu)
                .map_err(|e| StepError::Failed(NetError::BadMessage(e.to_string())))?;
            return WireTensor::from_tensor(&t).map_err(StepError::Failed);
        }
        NodeSession::Hop(h) => {
            let recorded = input.to_hop_input().map_err(StepError::BadInput)?;
            let output = run_hop_step(model, &mut h.cache, &recorded)
                .map_err(|e| StepError::Failed(NetError::BadMessage(e.to_string())))?;
            h.transcript.push(&recorded, &output);
            // Hidden states for every position, or the head's logits at the last one.
            let rows = if model.shard().head {
                1
            } else {
                recorded.positions()
            };
            let width = output.len() / rows.max(1);
            let t = Tensor::from_vec(output, (rows, width), &candle_core::Device::Cpu)
                .map_err(|e| StepError::Failed(NetError::BadMessage(e.to_string())))?;
            return WireTensor::from_tensor(&t).map_err(StepError::Failed);
        }
    };
    let input = match &input {
        StepInput::Tokens(ids) => ShardInput::Tokens(ids),
        StepInput::Hidden(t) => ShardInput::Hidden(t.to_tensor().map_err(StepError::BadInput)?),
    };
    let started = Instant::now();
    let positions = cache.position();
    let output = model
        .forward(input, cache, LogitsAt::Last)
        .map_err(|e| StepError::Failed(e.into()))?;
    usage.add_step(cache.position() - positions, started.elapsed());
    WireTensor::from_tensor(&output).map_err(StepError::Failed)
}

/// Keeps the run record of a finished plain session and shares it with peers.
fn keep_run(
    swarm: &mut Swarm<VeilBehaviour>,
    writer: &mut StateWriter,
    history: Option<&RunTemplate>,
    session: NodeSession,
) {
    let (Some(template), NodeSession::Plain(_, usage)) = (history, session) else {
        return;
    };
    let at_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let Some(record) = template.record(&usage, swarm.local_peer_id(), at_unix) else {
        return;
    };
    let (throughput, shared) = (record.throughput(), serde_json::to_vec(&record));
    if !writer.send(StateWrite::Run(Box::new(record))) {
        return;
    }
    info!(
        "kept run record: {} prompt tokens, {} generated, {throughput:.1} tok/s",
        usage.prompt_tokens, usage.steps,
    );
    if !template.share {
        return;
    }
    let topic = gossipsub::IdentTopic::new(RUNS_TOPIC);
    match shared {
        Ok(bytes) => {
            if let Err(e) = swarm.behaviour_mut().gossipsub.publish(topic, bytes) {
                debug!("run record not shared: {e}");
            }
        }
        Err(e) => warn!("cannot encode a run record: {e}"),
    }
}

/// Keeps a run record a peer shared, once it passes the checks and while there is room; says
/// whether gossipsub should relay it (accepted), drop it quietly (ignored: no room), or count
/// it against whoever sent it (rejected: it fails the checks).
fn keep_peer_run(
    writer: &mut StateWriter,
    quota: &mut AuthorQuota,
    message: &gossipsub::Message,
) -> gossipsub::MessageAcceptance {
    use gossipsub::MessageAcceptance::{Accept, Ignore, Reject};
    let record = match accept_gossiped(&message.data, message.source) {
        Ok(r) => r,
        Err(e) => {
            warn!("refused a run record from {:?}: {e}", message.source);
            return Reject;
        }
    };
    if !quota.admit(&record.node) {
        debug!("run record from {} dropped: its share is full", record.node);
        return Ignore;
    }
    if writer.runs() >= MAX_KEPT_RUNS {
        debug!("run record from {} dropped: history full", record.node);
        return Ignore;
    }
    let node = record.node.clone();
    if !writer.send(StateWrite::Run(Box::new(record))) {
        return Ignore;
    }
    info!("kept run record from peer {node}");
    Accept
}

/// Dials the bootstrap peers and adds them to the routing table.
/// Prints a listen address (parents, the demo and tests, read this line to find the node) and
/// hands it to whoever asked.
fn report_listening(
    address: &Multiaddr,
    local_id: PeerId,
    on_listen: Option<&mpsc::UnboundedSender<Multiaddr>>,
) {
    println!("listening on {address}/p2p/{local_id}");
    let _ = std::io::stdout().flush();
    if let Some(tx) = on_listen {
        let _ = tx.send(address.clone().with_p2p(local_id).unwrap_or_else(|a| a));
    }
}

pub(crate) fn join(swarm: &mut Swarm<VeilBehaviour>, bootstrap: &[Multiaddr]) -> Result<()> {
    for addr in bootstrap {
        let Some(peer) = peer_of(addr) else {
            return Err(NetError::Network(format!(
                "bootstrap address {addr} must end in /p2p/<peer id> (as printed by the node)"
            )));
        };
        if peer == *swarm.local_peer_id() {
            continue;
        }
        swarm.behaviour_mut().kad.add_address(&peer, addr.clone());
        if let Err(e) = swarm.dial(addr.clone()) {
            warn!("cannot dial {addr}: {e}");
        }
    }
    if !bootstrap.is_empty() {
        let _ = swarm.behaviour_mut().kad.bootstrap();
    }
    Ok(())
}

fn announce(swarm: &mut Swarm<VeilBehaviour>, info: &ShardInfo) {
    let kad = &mut swarm.behaviour_mut().kad;
    let private = info.zk_commitment.as_deref().map(zk_key);
    for key in [
        model_key(&info.model_digest),
        range_key(&info.model_digest, info.first_block, info.end_block),
    ]
    .into_iter()
    .chain(private)
    {
        if let Err(e) = kad.start_providing(key) {
            warn!("cannot announce: {e}");
        }
    }
}

/// The peer id at the end of an address, if any.
pub fn peer_of(addr: &Multiaddr) -> Option<PeerId> {
    addr.iter().find_map(|p| match p {
        libp2p::multiaddr::Protocol::P2p(id) => Some(id),
        _ => None,
    })
}

/// Whether an address is worth keeping in the routing table (not unspecified).
fn is_routable(addr: &Multiaddr) -> bool {
    !addr.iter().any(|p| {
        matches!(p, libp2p::multiaddr::Protocol::Ip4(ip) if ip.is_unspecified())
            || matches!(p, libp2p::multiaddr::Protocol::Ip6(ip) if ip.is_unspecified())
    })
}
