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
use crate::node_session::{run_step, NodeSession, StepError};
use crate::sessions::{SessionRefusal, SessionTable};
use crate::wire::{SessionId, ShardInfo, StepInput, WireTensor};

/// The protocol: messages up to 32 MiB (a 4096-token prefill of hidden states of width 2048 in
/// f32), 16 requests in flight per connection. An honest client needs far fewer: a node gives
/// it 4 sessions, one step in flight each.
pub const PROTOCOL: ProtocolSpec = ProtocolSpec {
    name: "/veil/infer/2",
    max_request_bytes: 32 << 20,
    max_response_bytes: 32 << 20,
    max_streams: 16,
};

/// A request to a shard node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// What do you serve?
    Info,
    /// Open a session with an empty cache.
    Open,
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
    model: &ShardModel,
    info: &ShardInfo,
    peer: PeerId,
    request: Request,
) -> Handled {
    Handled::Now(match request {
        Request::Info => Response::Info(info.clone()),
        Request::Open => match sessions.open(
            peer,
            NodeSession::Plain(model.new_cache(), SessionUsage::default()),
            Instant::now(),
        ) {
            Ok(session) => {
                info!("opened session {session} for {peer}");
                Response::Opened { session }
            }
            Err(e) => refuse(ErrorKind::Busy, e.to_string()),
        },
        Request::Close { session } => match sessions.close(peer, session) {
            Some(closed) => return Handled::Closed(closed),
            None => refuse(
                ErrorKind::UnknownSession,
                format!("unknown session {session}"),
            ),
        },
        Request::Step { session, input } => {
            if let Err(e) = info.check_input(&input, model.config().vocab_size) {
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

/// Runs a step on a blocking thread; the outcome comes back on `done`.
pub(crate) fn spawn_step(
    model: &Arc<ShardModel>,
    (session, mut cache, input): (SessionId, NodeSession, StepInput),
    channel: ResponseChannel<Response>,
    done: &mpsc::UnboundedSender<StepDone>,
) {
    let (model, done) = (Arc::clone(model), done.clone());
    tokio::task::spawn_blocking(move || {
        // A step that panics still answers, and its session is dropped rather than held as
        // running forever.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_step(&model, &mut cache, input)
        }))
        .unwrap_or_else(|_| {
            Err(StepError::Failed(NetError::BadMessage(
                "the step failed inside the model; the session is dropped".into(),
            )))
        });
        let _ = done.send(StepDone {
            session,
            cache,
            result,
            channel,
        });
    });
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
