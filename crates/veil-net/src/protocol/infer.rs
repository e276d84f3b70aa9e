//! The inference protocol: a client opens a session on a shard, steps it with token ids or
//! hidden states, and closes it. What a chain of nodes runs; verified and hop sessions
//! ([`super::verify`]) are stepped here too.
//!
//! Limits: sessions, positions and their per-peer shares are the node's
//! [`crate::SessionLimits`]; a step carries at most [`crate::wire::MAX_STEP_TOKENS`] positions
//! and runs on a blocking thread with its session taken out of the table, so a long prefill
//! stalls neither the network nor other sessions.

use std::sync::Arc;
use std::time::Instant;

use libp2p::request_response::ResponseChannel;
use libp2p::PeerId;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tracing::{info, warn};
use veil_model::ShardModel;

use super::{refuse, Answer, ErrorKind, ProtocolSpec, Refusal};
use crate::error::NetError;
use crate::history::SessionUsage;
use crate::node_models::NodeModels;
use crate::node_session::{run_decode_batch, run_step, NodeSession, StepError};
use crate::sessions::{SessionRefusal, SessionTable};
use crate::wire::{SessionId, ShardInfo, StepInput, WireTensor};

/// The protocol: messages up to 32 MiB (a 4096-token prefill of hidden states of width 2048 in
/// f32), 16 requests in flight per connection. An honest client needs far fewer: a node gives
/// it 4 sessions, one step in flight each.
pub const PROTOCOL: ProtocolSpec = ProtocolSpec {
    name: "/veil/infer/3",
    max_request_bytes: 32 << 20,
    max_response_bytes: 32 << 20,
    max_streams: 16,
};

/// A request to a shard node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// What do you serve (of model `model`, if named: a node may hold a second model while
    /// an encrypted model's key rotates, [`super::handoff`])?
    Info {
        /// The model asked about; `None`: the one new sessions get.
        #[serde(default)]
        model: Option<String>,
    },
    /// Open a session with an empty cache, on model `model` if named: the session runs on it
    /// to the end, whatever the node serves meanwhile.
    Open {
        /// The model the session runs; `None`: the one new sessions get.
        #[serde(default)]
        model: Option<String>,
    },
    /// Run new positions of a session; returns hidden states, or logits at the last position
    /// for a shard with the head.
    Step {
        /// The session.
        session: SessionId,
        /// The new positions.
        input: StepInput,
    },
    /// Free a session.
    Close {
        /// The session.
        session: SessionId,
    },
}

/// A shard node's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Response {
    /// What the node serves.
    Info(ShardInfo),
    /// A session was opened.
    Opened {
        /// Its handle.
        session: SessionId,
    },
    /// A step's output.
    Output(WireTensor),
    /// The session is gone.
    Closed,
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

/// The answer to a request on a session that is unknown (to this peer) or over its limits.
pub(crate) fn session_refused(e: SessionRefusal) -> Refusal {
    let kind = match e {
        SessionRefusal::Unknown(_) => ErrorKind::UnknownSession,
        _ => ErrorKind::Busy,
    };
    Refusal::new(kind, e.to_string())
}

/// What the node does with a request.
pub(crate) enum Handled {
    /// Answer at once.
    Now(Response),
    /// Run a step on a blocking thread ([`spawn_step`]).
    Step {
        session: SessionId,
        cache: NodeSession,
        input: StepInput,
    },
    /// A session was closed: answer, and keep its run record.
    Closed(NodeSession),
}

/// Validates a request from `peer` and answers it, or hands a step over.
pub(crate) fn handle(
    sessions: &mut SessionTable<NodeSession>,
    models: &NodeModels,
    peer: PeerId,
    request: Request,
) -> Handled {
    let not_held = |model: &str| refuse(ErrorKind::BadRequest, models.not_held(model));
    Handled::Now(match request {
        Request::Info { model } => match models.find(model.as_deref()) {
            Some(shard) => Response::Info(shard.info.clone()),
            None => not_held(model.as_deref().unwrap_or_default()),
        },
        Request::Open { model } => match models.find(model.as_deref()) {
            None => not_held(model.as_deref().unwrap_or_default()),
            Some(shard) => match sessions.open(
                peer,
                NodeSession::Plain(
                    shard.model.new_cache(),
                    SessionUsage::default(),
                    Arc::clone(&shard.model),
                ),
                Instant::now(),
            ) {
                Ok(session) => {
                    info!("opened session {session} for {peer}");
                    Response::Opened { session }
                }
                Err(e) => refuse(ErrorKind::Busy, e.to_string()),
            },
        },
        Request::Close { session } => match sessions.close(peer, session) {
            Some(closed) => return Handled::Closed(closed),
            None => refuse(
                ErrorKind::UnknownSession,
                format!("unknown session {session}"),
            ),
        },
        Request::Step { session, input } => {
            // Every held shard has the same blocks and shapes (checked at handoff).
            let current = models.current();
            if let Err(e) = current
                .info
                .check_input(&input, current.model.config().vocab_size)
            {
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
                Err(e) => Response::Refused(session_refused(e)),
            }
        }
    })
}

/// A step finished on a blocking thread, on its way back to the event loop.
pub(crate) struct StepDone {
    session: SessionId,
    cache: NodeSession,
    result: Result<WireTensor, StepError>,
    channel: ResponseChannel<Response>,
}

/// Runs a step on a blocking thread, on the model its session was opened on; the outcome comes
/// back on `done`.
pub(crate) fn spawn_step(
    (session, cache, input): (SessionId, NodeSession, StepInput),
    channel: ResponseChannel<Response>,
    done: &mpsc::UnboundedSender<StepDone>,
) {
    let done = done.clone();
    tokio::task::spawn_blocking(move || {
        let _ = done.send(step_alone(session, cache, input, channel));
    });
}

/// Runs one step on this thread. A step that panics still answers, and its session is dropped
/// rather than held as running forever.
fn step_alone(
    session: SessionId,
    mut cache: NodeSession,
    input: StepInput,
    channel: ResponseChannel<Response>,
) -> StepDone {
    let result =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_step(&mut cache, input)))
            .unwrap_or_else(|_| {
                Err(StepError::Failed(NetError::BadMessage(
                    "the step failed inside the model; the session is dropped".into(),
                )))
            });
    StepDone {
        session,
        cache,
        result,
        channel,
    }
}

/// Decode steps queued to run together.
const MAX_DECODE_BATCH: usize = 64;

/// A step waiting for the decode batcher.
struct Queued {
    session: SessionId,
    cache: NodeSession,
    input: StepInput,
    channel: ResponseChannel<Response>,
}

/// Runs the one-position steps of plain sessions on a thread of its own, those that arrive
/// while others run taken together in one pass over the shard (continuous batching on a
/// node: many users' decode steps cost about one). Prompts and verified or hop sessions run
/// on their own threads as before, so a long prompt does not hold up the batch.
pub(crate) struct DecodeBatcher {
    queue: std::sync::mpsc::Sender<Queued>,
    context_length: usize,
    /// The model it runs: sessions opened on another shard step alone.
    model: Arc<ShardModel>,
}

impl DecodeBatcher {
    /// A batcher for `model`, if its kernels give every row the same bits in any batch (else
    /// steps run alone, as before); finished steps come back on `done`.
    pub(crate) fn start(
        model: &Arc<ShardModel>,
        done: &mpsc::UnboundedSender<StepDone>,
    ) -> Option<Self> {
        if !model.bit_reproducible() {
            return None;
        }
        let (queue, rx) = std::sync::mpsc::channel();
        let (batched, done) = (Arc::clone(model), done.clone());
        let context_length = model.config().context_length;
        std::thread::Builder::new()
            .name("veil-decode-batch".into())
            .spawn(move || decode_batches(&batched, &rx, &done))
            .ok()?;
        Some(Self {
            queue,
            context_length,
            model: Arc::clone(model),
        })
    }

    /// Queues a step if it is one position of a plain session with room left; otherwise hands
    /// it back, to run alone.
    pub(crate) fn offer(
        &self,
        (session, cache, input): (SessionId, NodeSession, StepInput),
        channel: ResponseChannel<Response>,
    ) -> Option<(
        (SessionId, NodeSession, StepInput),
        ResponseChannel<Response>,
    )> {
        let fits = input.len() == 1
            && matches!(cache, NodeSession::Plain(..))
            && Arc::ptr_eq(cache.model(), &self.model)
            && cache.position() < self.context_length;
        if !fits {
            return Some(((session, cache, input), channel));
        }
        let queued = Queued {
            session,
            cache,
            input,
            channel,
        };
        match self.queue.send(queued) {
            Ok(()) => None,
            Err(std::sync::mpsc::SendError(q)) => Some(((q.session, q.cache, q.input), q.channel)),
        }
    }
}

/// The batcher's loop: waits for a step, takes every step queued behind it, runs them in one
/// pass, and answers each.
fn decode_batches(
    model: &ShardModel,
    queue: &std::sync::mpsc::Receiver<Queued>,
    done: &mpsc::UnboundedSender<StepDone>,
) {
    while let Ok(first) = queue.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_DECODE_BATCH {
            match queue.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        // Embedding shards take ids, the others hidden states: a batch takes one kind.
        let tokens = |q: &Queued| matches!(q.input, StepInput::Tokens(_));
        let kind = tokens(&batch[0]);
        let (same, other): (Vec<Queued>, Vec<Queued>) =
            batch.into_iter().partition(|q| tokens(q) == kind);
        for q in other {
            let _ = done.send(step_alone(q.session, q.cache, q.input, q.channel));
        }
        if same.len() == 1 {
            for q in same {
                let _ = done.send(step_alone(q.session, q.cache, q.input, q.channel));
            }
            continue;
        }
        let mut caches: Vec<NodeSession> = Vec::with_capacity(same.len());
        let mut rest = Vec::with_capacity(same.len());
        let mut inputs = Vec::with_capacity(same.len());
        for q in same {
            caches.push(q.cache);
            inputs.push(q.input);
            rest.push((q.session, q.channel));
        }
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut refs: Vec<&mut NodeSession> = caches.iter_mut().collect();
            run_decode_batch(model, &mut refs, &inputs)
        }));
        match ran {
            Ok(Ok(Ok(outputs))) => {
                for ((cache, (session, channel)), output) in
                    caches.into_iter().zip(rest).zip(outputs)
                {
                    let _ = done.send(StepDone {
                        session,
                        cache,
                        result: Ok(output),
                        channel,
                    });
                }
            }
            // An input that does not decode: nothing ran; each step alone says whose it is.
            Ok(Ok(Err(_))) => {
                for ((cache, (session, channel)), input) in caches.into_iter().zip(rest).zip(inputs)
                {
                    let _ = done.send(step_alone(session, cache, input, channel));
                }
            }
            // The shard failed part-way: every cache in the pass may be half updated.
            Ok(Err(e)) => fail_all(caches, rest, &e.to_string(), done),
            Err(_) => fail_all(
                caches,
                rest,
                "the batched step failed inside the model",
                done,
            ),
        }
    }
}

/// Answers every step of a failed pass with the failure; their sessions are dropped.
fn fail_all(
    caches: Vec<NodeSession>,
    rest: Vec<(SessionId, ResponseChannel<Response>)>,
    why: &str,
    done: &mpsc::UnboundedSender<StepDone>,
) {
    for (cache, (session, channel)) in caches.into_iter().zip(rest) {
        let _ = done.send(StepDone {
            session,
            cache,
            result: Err(StepError::Failed(NetError::BadMessage(why.to_string()))),
            channel,
        });
    }
}

/// Puts a finished step's session back (or drops it, if the model failed part-way) and says
/// what to answer.
pub(crate) fn settle(
    sessions: &mut SessionTable<NodeSession>,
    done: StepDone,
) -> (ResponseChannel<Response>, Response) {
    let held = done.cache.position();
    let response = match done.result {
        Ok(tensor) => {
            sessions.put_back(done.session, done.cache, held, Instant::now());
            Response::Output(tensor)
        }
        Err(StepError::BadInput(e)) => {
            sessions.put_back(done.session, done.cache, held, Instant::now());
            refuse(ErrorKind::BadRequest, e.to_string())
        }
        Err(StepError::Failed(e)) => {
            sessions.discard(done.session);
            warn!("session {} failed and was dropped: {e}", done.session);
            refuse(ErrorKind::Internal, e.to_string())
        }
    };
    (done.channel, response)
}
