//! What a node holds for one session, whichever protocol opened it, and how a step runs on
//! it. Plain sessions are opened by [`crate::protocol::infer`], verified and hop sessions by
//! [`crate::protocol::verify`]; all are stepped through `infer`. A session runs on the model it
//! was opened on to its end, whatever the node serves meanwhile (a shard handed over by
//! [`crate::protocol::handoff`] replaces the model new sessions get).

use std::sync::Arc;
use std::time::Instant;

use veil_model::{LogitsAt, ShardCache, ShardInput, ShardModel, Tensor};
use veil_verify::{run_hop_step, HopTranscript, ServingSession};

use crate::error::NetError;
use crate::history::SessionUsage;
use crate::wire::{StepInput, WireTensor};

/// What the node holds for one session.
pub(crate) enum NodeSession {
    /// A plain session: the KV cache, what it has used so far, and the model it runs on.
    Plain(ShardCache, SessionUsage, Arc<ShardModel>),
    /// A verified session on a whole-model node: samples, commits, signs at the end.
    Verified(Box<VerifiedSession>),
    /// One hop of a verified split chain: a plain session that records its inputs and outputs
    /// and signs them at the end.
    Hop(Box<HopSession>),
}

/// A hop session and the request it serves.
pub(crate) struct HopSession {
    pub(crate) request_id: String,
    pub(crate) cache: ShardCache,
    pub(crate) transcript: HopTranscript,
    pub(crate) model: Arc<ShardModel>,
    /// The digest of the model it runs, which the signed record names.
    pub(crate) model_digest: String,
}

/// A verified session and the request it serves.
pub(crate) struct VerifiedSession {
    pub(crate) request_id: String,
    pub(crate) serving: ServingSession,
    pub(crate) model: Arc<ShardModel>,
    /// The digest of the model it runs, which the signed answer names.
    pub(crate) model_digest: String,
}

impl NodeSession {
    /// Positions the session holds.
    pub(crate) fn position(&self) -> usize {
        match self {
            Self::Plain(cache, ..) => cache.position(),
            Self::Verified(v) => v.serving.position(),
            Self::Hop(h) => h.cache.position(),
        }
    }

    /// The model the session was opened on, which all its steps run.
    pub(crate) fn model(&self) -> &Arc<ShardModel> {
        match self {
            Self::Plain(_, _, model) => model,
            Self::Verified(v) => &v.model,
            Self::Hop(h) => &h.model,
        }
    }
}

/// Why a step failed, which decides whether its session survives.
pub(crate) enum StepError {
    /// The input did not decode; the cache is untouched.
    BadInput(NetError),
    /// The model failed part-way; the cache may be half-updated.
    Failed(NetError),
}

/// Runs one step of a session: hidden states out, or last-position logits for a head shard.
pub(crate) fn run_step(
    session: &mut NodeSession,
    input: StepInput,
) -> Result<WireTensor, StepError> {
    let failed = |e: String| StepError::Failed(NetError::BadMessage(e));
    let (cache, usage, model) = match session {
        NodeSession::Plain(cache, usage, model) => (cache, usage, &**model),
        NodeSession::Verified(v) => {
            let StepInput::Tokens(ids) = &input else {
                return Err(StepError::BadInput(NetError::BadMessage(
                    "a verified session takes token ids".into(),
                )));
            };
            let logits = v
                .serving
                .step(std::slice::from_ref(&*v.model), ids)
                .map_err(|e| StepError::BadInput(NetError::BadMessage(e.to_string())))?;
            let n = logits.len();
            let t = Tensor::from_vec(logits, (1, n), &candle_core::Device::Cpu)
                .map_err(|e| failed(e.to_string()))?;
            return WireTensor::from_tensor(&t).map_err(StepError::Failed);
        }
        NodeSession::Hop(h) => {
            let recorded = input.to_hop_input().map_err(StepError::BadInput)?;
            let output = run_hop_step(&h.model, &mut h.cache, &recorded)
                .map_err(|e| failed(e.to_string()))?;
            h.transcript.push(&recorded, &output);
            // Hidden states for every position, or the head's logits at the last one.
            let rows = if h.model.shard().head {
                1
            } else {
                recorded.positions()
            };
            let width = output.len() / rows.max(1);
            let t = Tensor::from_vec(output, (rows, width), &candle_core::Device::Cpu)
                .map_err(|e| failed(e.to_string()))?;
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

/// Runs one-position steps of several plain sessions in one pass over the shard (continuous
/// batching on a node), each answer exactly what its step alone gives (Veil's kernels sum every
/// row in one order however many rows there are). `steps[i]` is session `sessions[i]`'s input.
///
/// An input that does not decode is an error before the shard is touched (`Ok(Err)`: run the
/// steps one by one instead); a failure in the shard is `Err`, and the caches may be half
/// updated.
pub(crate) fn run_decode_batch(
    model: &ShardModel,
    sessions: &mut [&mut NodeSession],
    steps: &[StepInput],
) -> Result<Result<Vec<WireTensor>, NetError>, NetError> {
    let ids: Vec<u32>;
    let input = match steps.first() {
        Some(StepInput::Tokens(_)) => {
            let decoded: Option<Vec<u32>> = steps
                .iter()
                .map(|s| match s {
                    StepInput::Tokens(ids) if ids.len() == 1 => Some(ids[0]),
                    _ => None,
                })
                .collect();
            let Some(decoded) = decoded else {
                return Ok(Err(NetError::BadMessage(
                    "a batch holds one token per session".into(),
                )));
            };
            ids = decoded;
            ShardInput::Tokens(&ids)
        }
        _ => {
            let rows: Result<Vec<Tensor>, NetError> = steps
                .iter()
                .map(|s| match s {
                    StepInput::Hidden(t) if s.len() == 1 => t.to_tensor(),
                    _ => Err(NetError::BadMessage(
                        "a batch holds one position per session".into(),
                    )),
                })
                .collect();
            match rows.and_then(|rows| Ok(Tensor::cat(&rows, 0)?)) {
                Ok(hidden) => ShardInput::Hidden(hidden),
                Err(e) => return Ok(Err(e)),
            }
        }
    };
    let mut caches = Vec::with_capacity(sessions.len());
    let mut usages = Vec::with_capacity(sessions.len());
    for session in sessions.iter_mut() {
        let NodeSession::Plain(cache, usage, _) = &mut **session else {
            return Ok(Err(NetError::BadMessage(
                "only plain sessions decode in a batch".into(),
            )));
        };
        caches.push(cache);
        usages.push(usage);
    }
    let started = Instant::now();
    let output = model.forward_batch(input, &mut caches, &vec![1; steps.len()])?;
    let share = started.elapsed() / steps.len().max(1) as u32;
    for usage in usages {
        usage.add_step(1, share);
    }
    Ok((0..steps.len())
        .map(|i| WireTensor::from_tensor(&output.narrow(0, i, 1)?))
        .collect())
}
