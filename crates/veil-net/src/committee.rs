//! Verified generation over the swarm: a committee chosen by hash, one member generating, the
//! others judging by recomputation with sealed, signed verdicts.
//!
//! The committee is the `size` whole-model nodes ranked by blake3(request id, public seed,
//! peer id). Its first member generates in a verified session (it samples with the client's
//! seed, commits to its activations and signs the answer); every other member judges, first
//! sending a sealed verdict, then opening it once all are in. A strict majority of passes
//! accepts the answer; a strict majority of failures turns the signed messages into
//! [`Evidence`], and the next member generates. A tie is broken by the next-ranked node beyond
//! the committee, judging too, so one dissenting judge cannot stall a committee of three.

use std::collections::HashSet;
use std::time::Instant;

use libp2p::PeerId;
use tokio::runtime::Handle;
use tracing::{info, warn};
use veil_model::{
    generate_in_order, Completion, GenerationParams, GgufTokenizer, ModelError, TokenOrder,
    TokenStep,
};
use veil_verify::{
    committee, quorum, tally, CommitmentMode, Evidence, Job, SamplingSpec, Signed, Tally,
    VerdictCommit, VerdictReveal, EVIDENCE_VERSION,
};

use crate::client::SwarmClient;
use crate::error::{NetError, Result};
use crate::node_state::NodeState;
use crate::protocol::{infer, verify};
use crate::wire::{SessionId, StepInput};

/// What a verified request asks for.
pub struct VerifiedRequest<'a> {
    /// blake3 of the model file.
    pub model_digest: &'a str,
    /// The prompt's token ids, in the tokenizer's order.
    pub prompt: &'a [u32],
    /// The order of ids the nodes' model works in: [`veil_model::PlainOrder`], or an encrypted
    /// model's (`veil_ee::EncryptedOrder`), in which the nodes generate, commit and judge.
    pub order: &'a (dyn TokenOrder + Sync),
    /// Sampling and stopping.
    pub params: &'a GenerationParams,
    /// The model's context window.
    pub context_length: usize,
    /// Committee members: one generates, the rest judge (at least 2).
    pub size: usize,
    /// Public seed mixed into the committee choice.
    pub seed: &'a str,
    /// 64 hex digits, fresh per request.
    pub request_id: String,
    /// Only nodes that pass these checks (weights, allow-list, TEE) may sit on the committee.
    pub gate: Option<&'a crate::Admission>,
    /// Asked before each step: `true` once the answer is no longer wanted (the client left),
    /// which ends the request and frees the generator's session.
    pub cancelled: &'a (dyn Fn() -> bool + Sync),
    /// Recomputes an answer the judges reject, here, before anyone is punished: `Ok(true)` if
    /// it passes. Judges that failed an answer that passes here lied (a majority of Sybils
    /// framing an honest generator): the answer stands and they are avoided from then on.
    pub recheck: Option<&'a Recheck<'a>>,
}

/// A client's own validation of a signed answer (see [`VerifiedRequest::recheck`]).
pub type Recheck<'a> = dyn Fn(&Job) -> std::result::Result<bool, String> + Sync + 'a;

/// Most judges one answer may have, the committee's and those that broke its ties.
pub const MAX_JUDGES: usize = 16;

/// What a verified request says when its client stopped waiting.
pub const CANCELLED: &str = "the request was cancelled";

/// An answer a quorum accepted, and what it took.
pub struct VerifiedAnswer {
    /// The accepted answer.
    pub completion: Completion,
    /// The committee, in rank order.
    pub committee: Vec<String>,
    /// The member whose answer was accepted.
    pub generator: String,
    /// How the judges voted on it.
    pub tally: Tally,
    /// How the answer committed to its activations (exact when every member could).
    pub mode: CommitmentMode,
    /// Evidence against members whose answers a majority failed first.
    pub evidence: Vec<Evidence>,
    /// Time spent generating the accepted answer.
    pub generate_time: std::time::Duration,
    /// Time from the signed answer to the last reveal.
    pub judge_time: std::time::Duration,
    /// Judges that failed the accepted answer although it recomputes here (see
    /// [`VerifiedRequest::recheck`]): empty unless the client overruled its committee.
    pub overruled: Vec<String>,
}

/// Runs a verified request; blocks on `runtime` (call it from outside the runtime).
/// `on_evidence` sees each piece of evidence as soon as it is made (and before the reputations
/// in `state` move), so none is lost if the request fails later.
pub fn generate_verified(
    client: &SwarmClient,
    runtime: &Handle,
    tokenizer: &GgufTokenizer,
    request: &VerifiedRequest<'_>,
    state: Option<&NodeState>,
    on_evidence: &mut dyn FnMut(&Evidence),
) -> Result<VerifiedAnswer> {
    if request.size < 2 {
        return Err(NetError::Verification(
            "a committee needs at least 2 members: one to generate, one to judge".into(),
        ));
    }
    let avoid: HashSet<String> = match state {
        Some(s) => s.avoided()?.iter().map(PeerId::to_string).collect(),
        None => HashSet::new(),
    };
    let mut found: Vec<_> = runtime
        .block_on(client.discover(request.model_digest))?
        .into_iter()
        .filter(|c| c.info.is_whole())
        .filter(|c| !avoid.contains(&c.peer.to_string()))
        .collect();
    let mut refused = 0;
    if let Some(gate) = request.gate {
        let (allowed, out) = runtime.block_on(gate.admit(client, &found));
        found.retain(|c| allowed.contains(&c.peer));
        refused = out.len();
    }
    let whole: Vec<(String, bool)> = found
        .into_iter()
        .map(|c| (c.peer.to_string(), c.info.exact))
        .collect();
    let names: Vec<String> = whole.iter().map(|(p, _)| p.clone()).collect();
    let ranked = committee(&request.request_id, request.seed, &names, names.len());
    let members: Vec<String> = ranked.iter().take(request.size).cloned().collect();
    let is_exact = |m: &String| whole.iter().any(|(p, exact)| p == m && *exact);
    // The strongest commitment every member supports: exact only if all can reproduce bits.
    let mode = if members.iter().all(is_exact) {
        CommitmentMode::Exact
    } else {
        CommitmentMode::Tolerant
    };
    // Nodes beyond the committee, in rank order, that can judge in its mode: a tie among the
    // committee's judges is broken by the next of them.
    let spares: Vec<String> = ranked[members.len()..]
        .iter()
        .filter(|m| mode == CommitmentMode::Tolerant || is_exact(m))
        .cloned()
        .collect();
    if members.len() < 2 {
        return Err(NetError::NoRoute(format!(
            "verification needs at least 2 trusted nodes serving the whole model; found {} ({} avoided for lying, {refused} refused admission)",
            whole.len(),
            avoid.len()
        )));
    }
    let mut evidence = Vec::new();
    let mut caught: HashSet<String> = HashSet::new();
    // Rejections the client's own recheck confirmed.
    let mut confirmed = 0;
    for generator in &members {
        let mut judges: Vec<String> = members
            .iter()
            .filter(|m| *m != generator && !caught.contains(*m))
            .cloned()
            .collect();
        if judges.is_empty() {
            break;
        }
        let started = Instant::now();
        let (completion, job) = match serve(client, runtime, tokenizer, request, generator, mode) {
            Ok(done) => done,
            Err(_) if (request.cancelled)() => {
                return Err(NetError::Verification(CANCELLED.into()));
            }
            Err(e) => {
                warn!("generator {generator} failed: {e}");
                continue;
            }
        };
        let generate_time = started.elapsed();
        let started = Instant::now();
        let digest = job.body.digest()?;
        let ask = || verify::Request::Judge {
            job: Box::new(job.clone()),
        };
        let (votes, commits, reveals) = runtime.block_on(judge_until_decided(
            client,
            &digest,
            generator,
            &mut judges,
            &spares,
            ask,
        ))?;
        let judge_time = started.elapsed();
        // The answer stands if a majority accepts it, or if the judges' rejection fails the
        // client's own recheck (then they are the liars).
        let overruled = if votes.accepted(quorum(judges.len())) {
            info!(
                "answer from {generator} accepted by {} of {}",
                votes.passed.len(),
                judges.len()
            );
            Some(Vec::new())
        } else if !votes.rejected() {
            return Err(NetError::Verification(format!(
                "no quorum on {generator}'s answer: {} passed, {} failed, {} judges",
                votes.passed.len(),
                votes.failed.len(),
                judges.len()
            )));
        } else {
            match request.recheck.map(|recheck| recheck(&job.body)) {
                Some(Ok(true)) => {
                    let liars: Vec<String> = votes
                        .failed
                        .iter()
                        .map(|(judge, _)| judge.clone())
                        .collect();
                    warn!(
                        "judges {} failed {generator}'s answer, but it recomputes here: they lied",
                        liars.join(", ")
                    );
                    Some(liars)
                }
                Some(Ok(false)) => {
                    info!("{generator}'s answer fails here too");
                    confirmed += 1;
                    None
                }
                Some(Err(e)) => {
                    warn!("cannot recheck {generator}'s answer here ({e}): the judges stand");
                    None
                }
                None => None,
            }
        };
        if let Some(overruled) = overruled {
            if let Some(s) = state {
                for judge in &overruled {
                    s.record_overruled(judge)?;
                }
                s.record_accepted(generator)?;
            }
            return Ok(VerifiedAnswer {
                completion,
                committee: members.clone(),
                generator: generator.clone(),
                tally: votes,
                mode,
                evidence,
                generate_time,
                judge_time,
                overruled,
            });
        }
        let record = Evidence {
            version: EVIDENCE_VERSION,
            job,
            commits,
            reveals,
            inputs: Vec::new(),
        };
        record.check()?;
        // The evidence is kept (written and synced by the caller) before any reputation moves,
        // so a crash cannot leave a punished node without the proof of its lie.
        on_evidence(&record);
        if let Some(s) = state {
            s.apply_evidence(&record)?;
        }
        info!(
            "answer from {generator} failed by {} judges: evidence recorded",
            votes.failed.len()
        );
        caught.insert(generator.clone());
        evidence.push(record);
    }
    let rechecked = match request.recheck {
        Some(_) => format!("; {confirmed} of them rechecked here and failing here too"),
        None => String::new(),
    };
    Err(NetError::Verification(format!(
        "no committee member produced an answer a quorum accepts ({} caught lying{rechecked})",
        caught.len()
    )))
}

/// Generates on `generator` in a verified session and checks its signed answer against what
/// it sent.
fn serve(
    client: &SwarmClient,
    runtime: &Handle,
    tokenizer: &GgufTokenizer,
    request: &VerifiedRequest<'_>,
    generator: &str,
    mode: CommitmentMode,
) -> Result<(Completion, Signed<Job>)> {
    let peer: PeerId = generator
        .parse()
        .map_err(|_| NetError::BadMessage(format!("{generator} is not a peer id")))?;
    let opened = runtime.block_on(client.verify(
        peer,
        verify::Request::OpenVerified {
            request_id: request.request_id.clone(),
            sampling: SamplingSpec::from(&request.params.sampling),
            commitment: mode,
            model: Some(request.model_digest.to_string()),
        },
    ))?;
    let session = match opened {
        verify::Response::Opened { session } => session,
        other => return Err(unexpected(peer, &other)),
    };
    let mut remote = VerifiedStep {
        client,
        runtime,
        peer,
        session,
        cancelled: request.cancelled,
    };
    let completion = generate_in_order(
        &mut remote,
        request.order,
        tokenizer,
        request.prompt,
        request.context_length,
        request.params,
        &mut |_| {},
    );
    let finished = runtime.block_on(client.verify(peer, verify::Request::Finish { session }))?;
    let completion = completion?;
    let job = match finished {
        verify::Response::Finished(job) => *job,
        other => return Err(unexpected(peer, &other)),
    };
    let signer = job.verify()?;
    let body = &job.body;
    let in_model_order =
        |ids: &[u32]| -> Vec<u32> { ids.iter().map(|&t| request.order.to_model(t)).collect() };
    let mismatch = if signer != peer || body.generator != generator {
        Some("is not signed by the generator")
    } else if body.request_id != request.request_id || body.model_digest != request.model_digest {
        Some("names another request or model")
    } else if body.claim.prompt != in_model_order(request.prompt) {
        Some("claims another prompt")
    } else if body.claim.output != in_model_order(&completion.tokens) {
        Some("claims other tokens than it sent")
    } else if body.claim.commitment.mode() != mode {
        Some("commits in another mode than asked")
    } else {
        None
    };
    if let Some(why) = mismatch {
        return Err(NetError::Verification(format!(
            "{generator}'s signed answer {why}"
        )));
    }
    Ok((completion, job))
}

/// Has `judges` judge the job whose digest is `digest` (each sent `request()`), then, while
/// neither side holds a strict majority (a tie, or judges that did not answer), one more from
/// `spares` at a time, up to [`MAX_JUDGES`]: the votes, and every commit and reveal for
/// evidence. The judges asked are left in `judges`.
pub(crate) async fn judge_until_decided(
    client: &SwarmClient,
    digest: &str,
    generator: &str,
    judges: &mut Vec<String>,
    spares: &[String],
    request: impl Fn() -> verify::Request,
) -> Result<(
    Tally,
    Vec<Signed<VerdictCommit>>,
    Vec<Signed<VerdictReveal>>,
)> {
    let (mut commits, mut reveals) = seal_and_open(client, digest, judges, &request).await?;
    let mut votes = tally(digest, generator, &commits, &reveals)?;
    let mut spare = spares.iter().filter(|s| s.as_str() != generator);
    while !votes.accepted(quorum(judges.len())) && !votes.rejected() {
        let Some(next) = spare.next().filter(|_| judges.len() < MAX_JUDGES) else {
            break;
        };
        info!("no majority on {generator}'s answer yet: {next} judges too");
        let (c, r) = seal_and_open(client, digest, std::slice::from_ref(next), &request).await?;
        commits.extend(c);
        reveals.extend(r);
        judges.push(next.clone());
        votes = tally(digest, generator, &commits, &reveals)?;
    }
    Ok((votes, commits, reveals))
}

/// Sends each judge `request()` (a judgement of the job whose digest is `digest`), then, with
/// every verdict sealed, asks each to open its own; judges that fail to answer are left out.
pub(crate) async fn seal_and_open(
    client: &SwarmClient,
    digest: &str,
    judges: &[String],
    request: impl Fn() -> verify::Request,
) -> Result<(Vec<Signed<VerdictCommit>>, Vec<Signed<VerdictReveal>>)> {
    let digest = digest.to_string();
    let peers: Vec<PeerId> = judges.iter().filter_map(|j| j.parse().ok()).collect();
    let sealed =
        futures::future::join_all(peers.iter().map(|&peer| client.verify(peer, request()))).await;
    let mut commits = Vec::new();
    for (peer, answer) in peers.iter().zip(sealed) {
        match answer {
            Ok(verify::Response::Committed(c))
                if c.signer == peer.to_string() && c.body.job == digest =>
            {
                commits.push(c)
            }
            Ok(other) => warn!("judge {peer} answered {other:?}"),
            Err(e) => warn!("judge {peer} failed: {e}"),
        }
    }
    // Only now, with every verdict sealed, are they opened.
    let opened = futures::future::join_all(commits.iter().map(|c| {
        let peer: Option<PeerId> = c.signer.parse().ok();
        let digest = digest.clone();
        async move {
            match peer {
                Some(peer) => {
                    client
                        .verify(peer, verify::Request::Reveal { job: digest })
                        .await
                }
                None => Err(NetError::BadMessage("bad signer".into())),
            }
        }
    }))
    .await;
    let mut kept_commits = Vec::new();
    let mut reveals = Vec::new();
    for (commit, answer) in commits.into_iter().zip(opened) {
        match answer {
            Ok(verify::Response::Revealed(r)) if r.signer == commit.signer => {
                kept_commits.push(commit);
                reveals.push(r);
            }
            Ok(other) => warn!("judge {} revealed {other:?}", commit.signer),
            Err(e) => warn!("judge {} failed to reveal: {e}", commit.signer),
        }
    }
    Ok((kept_commits, reveals))
}

/// A node answered with something other than what the request asks for.
fn unexpected(peer: PeerId, answer: &impl std::fmt::Debug) -> NetError {
    NetError::BadMessage(format!("{peer} answered {answer:?}"))
}

/// One remote verified session as a [`TokenStep`].
struct VerifiedStep<'a> {
    client: &'a SwarmClient,
    runtime: &'a Handle,
    peer: PeerId,
    session: SessionId,
    cancelled: &'a (dyn Fn() -> bool + Sync),
}

impl TokenStep for VerifiedStep<'_> {
    fn step(&mut self, tokens: &[u32]) -> veil_model::Result<Vec<f32>> {
        if (self.cancelled)() {
            return Err(ModelError::Remote(CANCELLED.into()));
        }
        let answer = self
            .runtime
            .block_on(self.client.infer(
                self.peer,
                infer::Request::Step {
                    session: self.session,
                    input: StepInput::Tokens(tokens.to_vec()),
                },
            ))
            .map_err(|e| ModelError::Remote(e.to_string()))?;
        match answer {
            infer::Response::Output(t) => {
                let logits = t
                    .to_tensor()
                    .and_then(|t| Ok(t.flatten_all()?.to_vec1::<f32>()?))
                    .map_err(|e| ModelError::Remote(e.to_string()))?;
                Ok(logits)
            }
            other => Err(ModelError::Remote(
                unexpected(self.peer, &other).to_string(),
            )),
        }
    }
}
