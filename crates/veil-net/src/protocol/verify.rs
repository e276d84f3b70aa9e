//! The verification protocol: verified sessions (a whole-model node samples with the client's
//! seed, commits to its activations and signs the answer), hop sessions of verified split
//! chains (a node records a hop's inputs and outputs and signs them), and judging either by
//! recomputation with sealed, signed verdicts.
//!
//! Limits: sessions count against the node's [`crate::SessionLimits`] like plain ones and are
//! stepped through [`super::infer`]; judgements (each a prefill of up to a session's length)
//! run [`MAX_JUDGES_IN_FLIGHT`] at once and one per peer, and each peer has a budget of
//! positions judged per minute ([`JudgeBudget`]); sealed verdicts wait
//! ([`MAX_PENDING_REVEALS`], [`MAX_PENDING_REVEALS_PER_PEER`]) to be opened only for the peer
//! that asked, so a lazy judge cannot copy an honest one's verdict.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use libp2p::request_response::ResponseChannel;
use libp2p::PeerId;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tracing::info;
use veil_model::ShardModel;
use veil_verify::{
    judge_hop, validate, CommitmentMode, HopInput, HopJob, HopTranscript, Job, Keypair,
    Misbehaviour, SamplingSpec, ServingSession, Signed, Tolerances, Verdict, VerdictCommit,
    VerdictReveal,
};

use super::infer::session_refused;
use super::{refuse, Answer, ErrorKind, InFlight, ProtocolSpec, Refusal};
use crate::node_models::{NodeModels, ServedShard};
use crate::node_session::{HopSession, NodeSession, VerifiedSession};
use crate::sessions::SessionTable;
use crate::wire::{SessionId, ShardInfo, StepInput};

/// The protocol: a judgement of a hop carries the hop's inputs (up to a session's hidden
/// states), so messages go up to 32 MiB; 4 requests in flight per connection (a client
/// judging asks each node for one judgement, then its reveal).
pub const PROTOCOL: ProtocolSpec = ProtocolSpec {
    name: "/veil/verify/1",
    max_request_bytes: 32 << 20,
    max_response_bytes: 32 << 20,
    max_streams: 4,
};

/// Judgements run at once; more are refused as busy. One peer may have one running.
pub const MAX_JUDGES_IN_FLIGHT: usize = 2;
/// Verdicts sealed and waiting to be revealed, oldest first.
pub const MAX_PENDING_REVEALS: usize = 256;
/// Sealed verdicts one peer may leave waiting; its oldest make way for new ones.
pub const MAX_PENDING_REVEALS_PER_PEER: usize = 16;
/// Peers whose judging budgets are tracked at once; past it, peers whose budget is full again
/// are forgotten, and if none is, new peers wait.
const MAX_BUDGETED_PEERS: usize = 4096;

/// Positions (prompt and answer, or a hop's inputs) each peer may have this node judge, as a
/// budget that refills evenly over a minute. A judge recomputes what it is sent, and a
/// stranger's junk costs it a prefill of the whole prompt even when the answer fails at its
/// first token; the budget bounds what one peer can make it spend. Many identities get many
/// budgets; [`MAX_JUDGES_IN_FLIGHT`] bounds them all together.
#[derive(Debug)]
pub struct JudgeBudget {
    per_minute: f64,
    peers: HashMap<PeerId, (f64, Instant)>,
}

impl JudgeBudget {
    /// A budget of `per_minute` positions per peer.
    pub fn new(per_minute: usize) -> Self {
        Self {
            per_minute: per_minute as f64,
            peers: HashMap::new(),
        }
    }

    /// Takes `positions` from `peer`'s budget at `now`, or says why not.
    pub fn spend(&mut self, peer: PeerId, positions: usize, now: Instant) -> Result<(), String> {
        let wanted = positions as f64;
        if wanted > self.per_minute {
            return Err(format!(
                "judging {positions} positions is more than this node judges for one peer in a \
                 minute ({})",
                self.per_minute
            ));
        }
        if !self.peers.contains_key(&peer) && self.peers.len() >= MAX_BUDGETED_PEERS {
            let per_minute = self.per_minute;
            self.peers
                .retain(|_, (left, at)| refilled(*left, *at, per_minute, now) < per_minute);
            if self.peers.len() >= MAX_BUDGETED_PEERS {
                return Err("judging for too many peers; try again shortly".into());
            }
        }
        let (left, at) = self.peers.entry(peer).or_insert((self.per_minute, now));
        let available = refilled(*left, *at, self.per_minute, now);
        if available < wanted {
            let wait = (wanted - available) / self.per_minute * 60.0;
            return Err(format!(
                "you have used this node's judging budget ({} positions a minute); try again in \
                 {wait:.0} s",
                self.per_minute
            ));
        }
        (*left, *at) = (available - wanted, now);
        Ok(())
    }
}

/// A budget left at `left` when last spent at `at`, refilled until `now`.
fn refilled(left: f64, at: Instant, per_minute: f64, now: Instant) -> f64 {
    let seconds = now.saturating_duration_since(at).as_secs_f64();
    (left + seconds * per_minute / Duration::from_secs(60).as_secs_f64()).min(per_minute)
}

/// A request to take part in verification.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// Open a verified session (whole-model nodes only): the node samples each token with the
    /// client's seed, commits to its activations, and signs the answer at [`Request::Finish`].
    OpenVerified {
        /// The request's id: 64 hex digits.
        request_id: String,
        /// How the client samples.
        sampling: SamplingSpec,
        /// How the answer commits to its activations: exact only where the node announces
        /// [`ShardInfo::exact`] (the client asks for it when every judge does too).
        #[serde(default)]
        commitment: CommitmentMode,
        /// The model the session runs (`None`: the one new sessions get); a node may hold two
        /// while an encrypted model's key rotates.
        #[serde(default)]
        model: Option<String>,
    },
    /// End a verified session; the answer comes back as a job signed by the node.
    Finish {
        /// The session.
        session: SessionId,
    },
    /// Open a session as one hop of a verified split chain: a plain session whose inputs and
    /// outputs the node records, to sign them at [`Request::FinishHop`]. Exact nodes only.
    OpenHop {
        /// The chain's request id: 64 hex digits.
        request_id: String,
        /// The model the hop runs, as in [`Request::OpenVerified`].
        #[serde(default)]
        model: Option<String>,
    },
    /// End a hop session; its record comes back signed by the node.
    FinishHop {
        /// The session.
        session: SessionId,
    },
    /// Judge another node's hop of a split chain by replaying `inputs` (what the client sent
    /// it) on the same blocks; the answer is a sealed verdict.
    JudgeHop {
        /// The hop's record, signed by its node.
        job: Box<Signed<HopJob>>,
        /// Every step's input, in order.
        inputs: Vec<StepInput>,
    },
    /// Judge another node's signed job by recomputing it; the answer is a sealed verdict.
    Judge {
        /// The job, signed by its generator.
        job: Box<Signed<Job>>,
    },
    /// Open the sealed verdict on a job judged earlier.
    Reveal {
        /// The job's digest.
        job: String,
    },
}

/// A node's answer on verification.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Response {
    /// A verified or hop session was opened; step it through [`super::infer`].
    Opened {
        /// Its handle.
        session: SessionId,
    },
    /// A verified session ended: its answer, signed.
    Finished(Box<Signed<Job>>),
    /// A hop session ended: its record, signed.
    HopFinished(Box<Signed<HopJob>>),
    /// A sealed verdict.
    Committed(Signed<VerdictCommit>),
    /// An opened verdict.
    Revealed(Signed<VerdictReveal>),
    /// The request was refused.
    Refused(Refusal),
}

impl Answer for Response {
    fn refused(refusal: Refusal) -> Self {
        Self::Refused(refusal)
    }

    fn refusal(self) -> Result<Self, Refusal> {
        match self {
            Self::Refused(r) => Err(r),
            other => Ok(other),
        }
    }
}

/// A judgement made on a blocking thread, on its way back to the event loop.
pub(crate) struct Judged {
    channel: ResponseChannel<Response>,
    response: Response,
    /// The sealed verdict's reveal, kept for the peer that asked.
    reveal: Option<Signed<VerdictReveal>>,
    /// The peer that asked.
    asker: PeerId,
}

/// The node's side of the protocol: its signing key and claims, the judgements running, and
/// the sealed verdicts waiting.
pub(crate) struct VerifyService {
    judge: Arc<Judge>,
    reveals: VecDeque<(PeerId, Signed<VerdictReveal>)>,
    judging: HashSet<PeerId>,
    budget: JudgeBudget,
    in_flight: Arc<AtomicUsize>,
    judged: mpsc::UnboundedSender<Judged>,
}

impl VerifyService {
    /// A service signing with `key` for a node serving `info`, judging `budget` positions a
    /// minute per peer; judgements come back on the receiver, for [`VerifyService::settle`].
    pub(crate) fn new(
        key: Keypair,
        info: &ShardInfo,
        misbehave: Option<Misbehaviour>,
        budget: usize,
    ) -> (Self, mpsc::UnboundedReceiver<Judged>) {
        let judge = Judge {
            key,
            digest: info.model_digest.clone(),
            format: info.format.clone(),
            whole: info.is_whole(),
            misbehave,
        };
        let (judged, rx) = mpsc::unbounded_channel();
        let service = Self {
            judge: Arc::new(judge),
            reveals: VecDeque::new(),
            judging: HashSet::new(),
            budget: JudgeBudget::new(budget),
            in_flight: Arc::new(AtomicUsize::new(0)),
            judged,
        };
        (service, rx)
    }

    /// Sessions open on the shard they name, and jobs are judged on the shard of the model
    /// they claim (a node may hold two while an encrypted model's key rotates).
    pub(crate) fn handle(
        &mut self,
        sessions: &mut SessionTable<NodeSession>,
        models: &NodeModels,
        peer: PeerId,
        request: Request,
        channel: ResponseChannel<Response>,
    ) -> Option<(ResponseChannel<Response>, Response)> {
        let now = Instant::now();
        let judge = &self.judge;
        let (model, info) = (&models.current().model, &models.current().info);
        let not_held = |model: &Option<String>| {
            let why = models.not_held(model.as_deref().unwrap_or_default());
            refuse(ErrorKind::BadRequest, why)
        };
        let response = match request {
            Request::OpenVerified {
                request_id,
                sampling,
                commitment,
                model,
            } => match models.find(model.as_deref()) {
                Some(shard) => open_verified(
                    sessions, shard, judge, peer, request_id, sampling, commitment,
                ),
                None => not_held(&model),
            },
            Request::Finish { session } => match sessions.take(peer, session, 0) {
                Ok((NodeSession::Verified(v), _)) => {
                    sessions.discard(session);
                    let job = Job {
                        request_id: v.request_id,
                        model_digest: v.model_digest,
                        format: info.format.clone(),
                        generator: judge.key.public().to_peer_id().to_string(),
                        claim: v.serving.finish(),
                    };
                    match Signed::sign(job, &judge.key) {
                        Ok(signed) => Response::Finished(Box::new(signed)),
                        Err(e) => refuse(ErrorKind::Internal, e.to_string()),
                    }
                }
                Ok((other, held)) => {
                    sessions.put_back(session, other, held, now);
                    refuse(
                        ErrorKind::BadRequest,
                        format!("session {session} is not verified"),
                    )
                }
                Err(e) => Response::Refused(session_refused(e)),
            },
            Request::OpenHop { request_id, model } => match models.find(model.as_deref()) {
                Some(shard) => open_hop(sessions, shard, peer, request_id),
                None => not_held(&model),
            },
            Request::FinishHop { session } => match sessions.take(peer, session, 0) {
                Ok((NodeSession::Hop(h), _)) => {
                    sessions.discard(session);
                    let job = HopJob {
                        request_id: h.request_id,
                        model_digest: h.model_digest,
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
                Err(e) => Response::Refused(session_refused(e)),
            },
            Request::JudgeHop { job, inputs } => {
                // A model not held: judged against the current one, whose claims refuse it.
                let shard = models
                    .find(Some(&job.body.model_digest))
                    .unwrap_or(models.current());
                match check_hop(&shard.info, model.config().vocab_size, &job, &inputs) {
                    Ok(()) => {
                        let positions = inputs.iter().map(StepInput::len).sum();
                        let work = JudgeWork::Hop(job, inputs);
                        return self.start(shard, peer, work, positions, channel);
                    }
                    Err(refusal) => Response::Refused(refusal),
                }
            }
            Request::Judge { job } => {
                let shard = models
                    .find(Some(&job.body.model_digest))
                    .unwrap_or(models.current());
                match check_job(judge, &shard.info, &job) {
                    Ok(()) => {
                        let positions = job.body.claim.prompt.len() + job.body.claim.output.len();
                        let work = JudgeWork::Answer(job);
                        return self.start(shard, peer, work, positions, channel);
                    }
                    Err(refusal) => Response::Refused(refusal),
                }
            }
            // Only to the peer that asked for the judgement: another judge must not copy it.
            Request::Reveal { job } => match self
                .reveals
                .iter()
                .find(|(asker, r)| *asker == peer && r.body.job == job)
            {
                Some((_, reveal)) => Response::Revealed(reveal.clone()),
                None => refuse(
                    ErrorKind::UnknownSession,
                    format!("no sealed verdict on job {job} here"),
                ),
            },
        };
        Some((channel, response))
    }

    /// Starts a judgement of `positions` on a blocking thread, within the node's and `peer`'s
    /// share.
    fn start(
        &mut self,
        shard: &ServedShard,
        peer: PeerId,
        work: JudgeWork,
        positions: usize,
        channel: ResponseChannel<Response>,
    ) -> Option<(ResponseChannel<Response>, Response)> {
        if self.judging.contains(&peer) {
            let busy = "judging your last job; ask again once it is answered";
            return Some((channel, refuse(ErrorKind::Busy, busy)));
        }
        let Some(slot) = InFlight::take(&self.in_flight, MAX_JUDGES_IN_FLIGHT) else {
            let busy = "judging other jobs; try again shortly";
            return Some((channel, refuse(ErrorKind::Busy, busy)));
        };
        if let Err(spent) = self.budget.spend(peer, positions, Instant::now()) {
            return Some((channel, refuse(ErrorKind::Busy, spent)));
        }
        self.judging.insert(peer);
        let (model, judge, tx) = (
            Arc::clone(&shard.model),
            Arc::new(self.judge.of_model(&shard.info.model_digest)),
            self.judged.clone(),
        );
        tokio::task::spawn_blocking(move || {
            let _slot = slot;
            let (response, reveal) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                judge.judge(&model, &work)
            }))
            .unwrap_or_else(|_| {
                let failed = "the judgement failed inside the model";
                (refuse(ErrorKind::Internal, failed), None)
            });
            let _ = tx.send(Judged {
                channel,
                response,
                reveal,
                asker: peer,
            });
        });
        None
    }

    /// Keeps a finished judgement's reveal for the peer that asked, and says what to answer.
    pub(crate) fn settle(&mut self, judged: Judged) -> (ResponseChannel<Response>, Response) {
        self.judging.remove(&judged.asker);
        if let Some(reveal) = judged.reveal {
            self.keep_reveal(judged.asker, reveal);
        }
        (judged.channel, judged.response)
    }

    /// Keeps `reveal` for `asker`, within the per-peer and global bounds (oldest out first).
    fn keep_reveal(&mut self, asker: PeerId, reveal: Signed<VerdictReveal>) {
        let reveals = &mut self.reveals;
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
}

/// Opens a verified session for `peer`, if this node serves the whole model.
fn open_verified(
    sessions: &mut SessionTable<NodeSession>,
    shard: &ServedShard,
    judge: &Judge,
    peer: PeerId,
    request_id: String,
    sampling: SamplingSpec,
    commitment: CommitmentMode,
) -> Response {
    if !judge.whole {
        return refuse(
            ErrorKind::BadRequest,
            "verified sessions need a node serving the whole model",
        );
    }
    if !veil_verify::is_request_id(&request_id) {
        return refuse(ErrorKind::BadRequest, "a request id is 64 hex digits");
    }
    let fault_seed = rand::random();
    let shards = std::slice::from_ref(&*shard.model);
    let serving = sampling.params().map_err(|e| e.to_string()).and_then(|p| {
        ServingSession::new(shards, p, judge.misbehave, fault_seed)
            .and_then(|s| s.with_commitment(shards, commitment))
            .map_err(|e| e.to_string())
    });
    let serving = match serving {
        Ok(s) => s,
        Err(e) => return refuse(ErrorKind::BadRequest, e),
    };
    let state = NodeSession::Verified(Box::new(VerifiedSession {
        request_id,
        serving,
        model: Arc::clone(&shard.model),
        model_digest: shard.info.model_digest.clone(),
    }));
    match sessions.open(peer, state, Instant::now()) {
        Ok(session) => {
            info!("opened verified session {session} for {peer}");
            Response::Opened { session }
        }
        Err(e) => refuse(ErrorKind::Busy, e.to_string()),
    }
}

/// Opens a hop session for `peer`, if this node's kernels are bit-reproducible.
fn open_hop(
    sessions: &mut SessionTable<NodeSession>,
    shard: &ServedShard,
    peer: PeerId,
    request_id: String,
) -> Response {
    if !shard.info.exact {
        return refuse(
            ErrorKind::BadRequest,
            "hops of verified chains are checked bit for bit, and this node's kernels are not \
             bit-reproducible",
        );
    }
    if !veil_verify::is_request_id(&request_id) {
        return refuse(ErrorKind::BadRequest, "a request id is 64 hex digits");
    }
    let state = NodeSession::Hop(Box::new(HopSession {
        request_id,
        cache: shard.model.new_cache(),
        transcript: HopTranscript::new(),
        model: Arc::clone(&shard.model),
        model_digest: shard.info.model_digest.clone(),
    }));
    match sessions.open(peer, state, Instant::now()) {
        Ok(session) => {
            info!("opened hop session {session} for {peer}");
            Response::Opened { session }
        }
        Err(e) => refuse(ErrorKind::Busy, e.to_string()),
    }
}

/// What can be checked of a hop to judge before any work: it ran this node's blocks, holds no
/// more than a session may, and every input fits the shard. The inputs are decoded later, off
/// the event loop.
fn check_hop(
    info: &ShardInfo,
    vocab_size: usize,
    job: &Signed<HopJob>,
    inputs: &[StepInput],
) -> Result<(), Refusal> {
    let body = &job.body;
    if (body.first_block, body.end_block) != (info.first_block, info.end_block) {
        return Err(Refusal::new(
            ErrorKind::BadRequest,
            format!(
                "the hop ran blocks {}-{}; this node serves {}-{}",
                body.first_block, body.end_block, info.first_block, info.end_block
            ),
        ));
    }
    let positions: usize = inputs.iter().map(StepInput::len).sum();
    if positions > info.max_session_tokens {
        return Err(Refusal::new(
            ErrorKind::BadRequest,
            format!(
                "the hop holds {positions} positions; this node judges at most {}",
                info.max_session_tokens
            ),
        ));
    }
    inputs
        .iter()
        .try_for_each(|input| info.check_input(input, vocab_size))
        .map_err(|e| Refusal::new(ErrorKind::BadRequest, e.to_string()))
}

/// What can be checked of a job to judge before any work: this node holds the whole model,
/// and the job is no longer than a session may be.
fn check_job(judge: &Judge, info: &ShardInfo, job: &Signed<Job>) -> Result<(), Refusal> {
    if !judge.whole {
        return Err(Refusal::new(
            ErrorKind::BadRequest,
            "judging needs a node serving the whole model",
        ));
    }
    let positions = job.body.claim.prompt.len() + job.body.claim.output.len();
    if positions > info.max_session_tokens {
        return Err(Refusal::new(
            ErrorKind::BadRequest,
            format!(
                "the job holds {positions} positions; this node judges at most {}",
                info.max_session_tokens
            ),
        ));
    }
    Ok(())
}

/// What a judge recomputes.
enum JudgeWork {
    /// A whole-model node's answer.
    Answer(Box<Signed<Job>>),
    /// One hop of a split chain, with the inputs it was sent (checked, decoded off the event
    /// loop).
    Hop(Box<Signed<HopJob>>, Vec<StepInput>),
}

/// What a node needs to take part in verification.
#[derive(Clone)]
struct Judge {
    key: Keypair,
    digest: String,
    format: String,
    whole: bool,
    misbehave: Option<Misbehaviour>,
}

impl Judge {
    /// This judge for the held shard of model `digest`.
    fn of_model(&self, digest: &str) -> Self {
        Self {
            digest: digest.to_string(),
            ..self.clone()
        }
    }

    /// Recomputes a job or a hop and seals the verdict; the reveal is kept for later.
    fn judge(
        &self,
        model: &ShardModel,
        work: &JudgeWork,
    ) -> (Response, Option<Signed<VerdictReveal>>) {
        let outcome = match work {
            JudgeWork::Answer(job) => self.judge_answer(model, job),
            JudgeWork::Hop(job, inputs) => self.judge_hop(model, job, inputs),
        };
        match outcome {
            Ok((commit, reveal)) => (Response::Committed(commit), Some(reveal)),
            Err(e) => (refuse(ErrorKind::BadRequest, e), None),
        }
    }

    /// Replays a chain hop's inputs on this node's blocks and seals the verdict.
    fn judge_hop(
        &self,
        model: &ShardModel,
        job: &Signed<HopJob>,
        inputs: &[StepInput],
    ) -> Result<(Signed<VerdictCommit>, Signed<VerdictReveal>), String> {
        let body = &job.body;
        let inputs: Vec<HopInput> = inputs
            .iter()
            .map(StepInput::to_hop_input)
            .collect::<Result<_, _>>()
            .map_err(|e| e.to_string())?;
        match job.verify() {
            Ok(peer) if peer.to_string() == body.node => {}
            Ok(_) => return Err("the hop is not signed by its node".into()),
            Err(e) => return Err(e.to_string()),
        }
        self.check_claims("hop", &body.model_digest, &body.format)?;
        let verdict = judge_hop(model, body, &inputs).map_err(|e| e.to_string())?;
        self.seal(body.digest().map_err(|e| e.to_string())?, verdict)
    }

    /// Recomputes a whole-model node's signed answer and seals the verdict.
    fn judge_answer(
        &self,
        model: &ShardModel,
        job: &Signed<Job>,
    ) -> Result<(Signed<VerdictCommit>, Signed<VerdictReveal>), String> {
        let body = &job.body;
        match job.verify() {
            Ok(peer) if peer.to_string() == body.generator => {}
            Ok(_) => return Err("the job is not signed by its generator".into()),
            Err(e) => return Err(e.to_string()),
        }
        self.check_claims("job", &body.model_digest, &body.format)?;
        let validated = validate(
            std::slice::from_ref(model),
            &body.claim,
            &Tolerances::default(),
        )
        .map_err(|e| e.to_string())?;
        self.seal(body.digest().map_err(|e| e.to_string())?, validated.verdict)
    }

    /// Whether the work claims the model and format this node runs.
    fn check_claims(&self, what: &str, digest: &str, format: &str) -> Result<(), String> {
        if digest == self.digest && format == self.format {
            return Ok(());
        }
        Err(format!(
            "this node runs model {} in {}, the {what} claims {digest} in {format}",
            self.digest, self.format
        ))
    }

    /// A verdict on job `digest`, sealed and opened, both signed.
    fn seal(
        &self,
        digest: String,
        verdict: Verdict,
    ) -> Result<(Signed<VerdictCommit>, Signed<VerdictReveal>), String> {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_judges_at_most_its_budget_a_minute_and_others_keep_theirs() {
        let mut budget = JudgeBudget::new(1000);
        let (rogue, other) = (PeerId::random(), PeerId::random());
        let t0 = Instant::now();
        assert!(budget.spend(rogue, 600, t0).is_ok());
        assert!(budget.spend(rogue, 400, t0).is_ok());
        let refused = budget.spend(rogue, 1, t0).unwrap_err();
        assert!(refused.contains("judging budget"), "{refused}");
        assert!(budget.spend(other, 1000, t0).is_ok());
        // Half a minute refills half the budget.
        let later = t0 + Duration::from_secs(30);
        assert!(budget.spend(rogue, 501, later).is_err());
        assert!(budget.spend(rogue, 499, later).is_ok());
        // More than a minute's budget is never judged.
        let refused = budget.spend(PeerId::random(), 1001, t0).unwrap_err();
        assert!(refused.contains("in a minute"), "{refused}");
    }

    #[test]
    fn the_budgets_tracked_are_bounded() {
        let mut budget = JudgeBudget::new(10);
        let t0 = Instant::now();
        for _ in 0..MAX_BUDGETED_PEERS {
            budget.spend(PeerId::random(), 10, t0).unwrap();
        }
        assert!(budget.spend(PeerId::random(), 1, t0).is_err());
        // Once the others' budgets are full again, they are forgotten to make room.
        let later = t0 + Duration::from_secs(60);
        assert!(budget.spend(PeerId::random(), 1, later).is_ok());
        assert_eq!(budget.peers.len(), 1);
    }
}
