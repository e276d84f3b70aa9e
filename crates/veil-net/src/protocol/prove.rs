//! The proving protocol: a node shows what it holds and where it runs. It opens chunks of its
//! weights under the Merkle root it announces (the weights check every route and committee
//! seat passes), hands TEE evidence naming its key and a verifier's nonce, and proves answers
//! of a committed private model with a zero-knowledge proof.
//!
//! Limits: requests are small (at most [`PROTOCOL`]'s 64 KiB); openings and TEE quotes are
//! made [`MAX_CHALLENGES_IN_FLIGHT`] at once and proofs [`MAX_PROOFS_IN_FLIGHT`] at once, each
//! on a blocking thread; more are refused as busy.

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use libp2p::request_response::ResponseChannel;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use veil_model::GgufFile;

use super::{refuse, Answer, ErrorKind, InFlight, ProtocolSpec, Refusal};
use crate::node_models::NodeModels;

/// The protocol: requests up to 64 KiB (the most leaves one may ask for is
/// [`veil_zk::MAX_OPENINGS`]); answers up to 16 MiB (that many 64 KiB chunks with their
/// proof); 4 requests in flight per connection.
pub const PROTOCOL: ProtocolSpec = ProtocolSpec {
    name: "/veil/prove/1",
    max_request_bytes: 64 << 10,
    max_response_bytes: 16 << 20,
    max_streams: 4,
};

/// Proofs of the private model made at once (each costs about a second and a half of CPU).
pub const MAX_PROOFS_IN_FLIGHT: usize = 2;
/// TEE quotes and weight openings obtained at once.
pub const MAX_CHALLENGES_IN_FLIGHT: usize = 8;

/// A challenge to a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// Open these leaves of your weights commitment, with their Merkle proof.
    OpenWeights {
        /// Leaf indices, at most [`veil_zk::MAX_OPENINGS`].
        leaves: Vec<u32>,
        /// The model whose weights are opened (`None`: the one new sessions get); a node may
        /// hold two while an encrypted model's key rotates.
        #[serde(default)]
        model: Option<String>,
    },
    /// Prove you run in a TEE: evidence naming your key and this nonce.
    Attest {
        /// The verifier's fresh challenge.
        nonce: [u8; 32],
    },
    /// Run your committed private model on these 64 pixels and prove the answer.
    ProveInference {
        /// Pixels, 0..16.
        input: Vec<u8>,
    },
}

/// A node's answer to a challenge.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Response {
    /// Opened weight chunks answering [`Request::OpenWeights`].
    WeightOpenings(Box<veil_zk::Openings>),
    /// TEE evidence answering [`Request::Attest`].
    Attested(Box<veil_tee::Evidence>),
    /// A private model's answer with its zero-knowledge proof.
    InferenceProof(Box<veil_zk::proof::InferenceProof>),
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

/// An answer made on a blocking thread, on its way back to the event loop.
pub(crate) type Proved = (ResponseChannel<Response>, Response);

/// The node's side of the protocol: what it can show, and the work in flight.
pub(crate) struct ProveService {
    /// Where TEE evidence comes from, and the key it must name.
    tee: Option<(veil_tee::EvidenceSource, Vec<u8>)>,
    zk: Option<Arc<veil_zk::proof::Prover>>,
    proofs: Arc<AtomicUsize>,
    challenges: Arc<AtomicUsize>,
    proved: mpsc::UnboundedSender<Proved>,
}

impl ProveService {
    /// The service of a node in the TEE `tee` (with the public key its evidence names),
    /// proving `zk`'s answers; answers made later come back on the receiver.
    pub(crate) fn new(
        tee: Option<(veil_tee::EvidenceSource, Vec<u8>)>,
        zk: Option<Arc<veil_zk::proof::Prover>>,
    ) -> (Self, mpsc::UnboundedReceiver<Proved>) {
        let (proved, rx) = mpsc::unbounded_channel();
        let service = Self {
            tee,
            zk,
            proofs: Arc::new(AtomicUsize::new(0)),
            challenges: Arc::new(AtomicUsize::new(0)),
            proved,
        };
        (service, rx)
    }

    /// Validates a request and answers it (`Some`), or starts the work on a blocking thread;
    /// weights are opened from the held shard the request names.
    pub(crate) fn handle(
        &self,
        models: &NodeModels,
        request: Request,
        channel: ResponseChannel<Response>,
    ) -> Option<Proved> {
        match request {
            Request::OpenWeights { leaves, model } => {
                if leaves.is_empty() || leaves.len() > veil_zk::MAX_OPENINGS {
                    let ask = format!("ask for 1 to {} leaves", veil_zk::MAX_OPENINGS);
                    return Some((channel, refuse(ErrorKind::BadRequest, ask)));
                }
                let Some(shard) = models.find(model.as_deref()) else {
                    let why = models.not_held(model.as_deref().unwrap_or_default());
                    return Some((channel, refuse(ErrorKind::BadRequest, why)));
                };
                let (weights, path) = (Arc::clone(&shard.weights), shard.file.clone());
                self.spawn(
                    &self.challenges,
                    MAX_CHALLENGES_IN_FLIGHT,
                    channel,
                    move || {
                        let opened = GgufFile::open(&path)
                            .map_err(veil_zk::ZkError::from)
                            .and_then(|mut file| weights.open(&mut file, &leaves));
                        match opened {
                            Ok(openings) => Response::WeightOpenings(Box::new(openings)),
                            Err(e @ veil_zk::ZkError::BadChallenge(_)) => {
                                refuse(ErrorKind::BadRequest, e.to_string())
                            }
                            Err(e) => refuse(ErrorKind::Internal, e.to_string()),
                        }
                    },
                )
            }
            Request::Attest { nonce } => {
                let Some((source, key)) = self.tee.clone() else {
                    return Some((
                        channel,
                        refuse(ErrorKind::BadRequest, "this node runs in no TEE"),
                    ));
                };
                self.spawn(
                    &self.challenges,
                    MAX_CHALLENGES_IN_FLIGHT,
                    channel,
                    move || match source.evidence(&key, veil_tee::Freshness::Nonce(nonce)) {
                        Ok(evidence) => Response::Attested(Box::new(evidence)),
                        Err(e) => refuse(
                            ErrorKind::Internal,
                            format!("cannot obtain TEE evidence: {e}"),
                        ),
                    },
                )
            }
            Request::ProveInference { input } => {
                let Some(prover) = self.zk.clone() else {
                    let none = "this node proves no private model";
                    return Some((channel, refuse(ErrorKind::BadRequest, none)));
                };
                if input.len() != veil_zk::model::INPUTS || input.iter().any(|&p| p > 16) {
                    let shape = "an input is 64 pixels of 0..16";
                    return Some((channel, refuse(ErrorKind::BadRequest, shape)));
                }
                self.spawn(
                    &self.proofs,
                    MAX_PROOFS_IN_FLIGHT,
                    channel,
                    move || match prover.prove(&input) {
                        Ok(proof) => Response::InferenceProof(Box::new(proof)),
                        Err(e) => refuse(ErrorKind::BadRequest, e.to_string()),
                    },
                )
            }
        }
    }

    /// Runs `work` on a blocking thread if fewer than `max` of its kind are running, else
    /// answers busy.
    fn spawn(
        &self,
        count: &Arc<AtomicUsize>,
        max: usize,
        channel: ResponseChannel<Response>,
        work: impl FnOnce() -> Response + Send + 'static,
    ) -> Option<Proved> {
        let Some(slot) = InFlight::take(count, max) else {
            let busy = "answering other challenges; try again shortly";
            return Some((channel, refuse(ErrorKind::Busy, busy)));
        };
        let proved = self.proved.clone();
        tokio::task::spawn_blocking(move || {
            let _slot = slot;
            let response = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work))
                .unwrap_or_else(|_| refuse(ErrorKind::Internal, "the work failed inside the node"));
            let _ = proved.send((channel, response));
        });
        None
    }
}
