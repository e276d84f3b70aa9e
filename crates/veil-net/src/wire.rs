//! The inference protocol's messages: versioned, CBOR on the wire (libp2p's request-response
//! codec), tensors as raw little-endian bytes with dtype and shape. Every message is bounded in
//! size by the codec and checked here before any of it is used.

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use veil_verify::{
    CommitmentMode, HopInput, HopJob, Job, SamplingSpec, Signed, VerdictCommit, VerdictReveal,
};

use crate::error::{NetError, Result};

/// The protocol name; the version changes when a message changes shape.
pub const PROTOCOL: &str = "/veil/infer/1";

/// The protocol version inside every request, so a mismatch is an explicit error.
pub const WIRE_VERSION: u16 = 4;

/// Largest request or response a peer accepts: 32 MiB, room for a 4096-token prefill of hidden
/// states of width 2048 in f32.
pub const MAX_MESSAGE_BYTES: u64 = 32 << 20;

/// Largest number of positions one step may carry.
pub const MAX_STEP_TOKENS: usize = 8192;

/// A node's session handle: 128 random bits, so no peer can guess another's, and a node
/// answers for a session only to the peer that opened it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SessionId(pub [u8; 16]);

impl SessionId {
    /// A fresh id from the thread's CSPRNG.
    pub fn random() -> Self {
        Self(rand::random())
    }
}

impl std::fmt::Display for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// Element types a tensor may travel in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WireDType {
    /// 32-bit float: the only type nodes accept today.
    F32,
    /// 16-bit float: named so a peer sending it gets a clear refusal, not a decode error.
    F16,
}

/// A tensor on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireTensor {
    /// Element type.
    pub dtype: WireDType,
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// Elements in little-endian order.
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

impl WireTensor {
    /// Encodes an f32 tensor.
    pub fn from_tensor(t: &Tensor) -> Result<Self> {
        let values: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        Ok(Self {
            dtype: WireDType::F32,
            shape: t.dims().to_vec(),
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        })
    }

    /// Checks the dtype and that the bytes match the shape, without decoding.
    pub fn check(&self) -> Result<()> {
        let elements = self
            .shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| NetError::BadMessage(format!("shape {:?} overflows", self.shape)))?;
        let width = match self.dtype {
            WireDType::F32 => 4,
            WireDType::F16 => {
                return Err(NetError::BadMessage(
                    "f16 tensors are not accepted; send f32".into(),
                ))
            }
        };
        if elements.checked_mul(width) != Some(self.data.len()) {
            return Err(NetError::BadMessage(format!(
                "tensor of shape {:?} needs {} bytes, got {}",
                self.shape,
                elements.saturating_mul(width),
                self.data.len()
            )));
        }
        Ok(())
    }

    /// Decodes, checking that the bytes match the shape and the values are finite.
    pub fn to_tensor(&self) -> Result<Tensor> {
        self.check()?;
        let values: Vec<f32> = self
            .data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        if values.iter().any(|v| !v.is_finite()) {
            return Err(NetError::BadMessage("tensor holds NaN or infinity".into()));
        }
        Ok(Tensor::from_vec(
            values,
            self.shape.as_slice(),
            &Device::Cpu,
        )?)
    }
}

/// What a step feeds the shard.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum StepInput {
    /// Token ids, for a shard with the embedding.
    Tokens(Vec<u32>),
    /// Hidden states `(tokens, hidden_size)` from the shard before.
    Hidden(WireTensor),
}

impl StepInput {
    /// Positions this step adds.
    pub fn len(&self) -> usize {
        match self {
            Self::Tokens(ids) => ids.len(),
            Self::Hidden(t) => t.shape.first().copied().unwrap_or(0),
        }
    }

    /// Whether the step carries no position.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The step as verification records it (hidden states decoded, bits unchanged).
    pub fn to_hop_input(&self) -> Result<HopInput> {
        Ok(match self {
            Self::Tokens(ids) => HopInput::Tokens(ids.clone()),
            Self::Hidden(t) => {
                t.check()?;
                HopInput::Hidden {
                    positions: self.len(),
                    values: t
                        .data
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .collect(),
                }
            }
        })
    }
}

/// A request to a shard node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    /// [`WIRE_VERSION`] of the sender.
    pub version: u16,
    /// What to do.
    pub body: RequestBody,
}

/// The operations a node serves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RequestBody {
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
    /// Open a verified session (whole-model nodes only): the node samples each token with the
    /// client's seed, commits to its activations, and signs the answer at [`RequestBody::Finish`].
    OpenVerified {
        /// The request's id: 64 hex digits.
        request_id: String,
        /// How the client samples.
        sampling: SamplingSpec,
        /// How the answer commits to its activations: exact only where the node announces
        /// [`ShardInfo::exact`] (the client asks for it when every judge does too).
        #[serde(default)]
        commitment: CommitmentMode,
    },
    /// End a verified session; the answer comes back as a job signed by the node.
    Finish {
        /// The session.
        session: SessionId,
    },
    /// Open a session as one hop of a verified split chain: a plain session whose inputs and
    /// outputs the node records, to sign them at [`RequestBody::FinishHop`]. Exact nodes only.
    OpenHop {
        /// The chain's request id: 64 hex digits.
        request_id: String,
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
    /// Open these leaves of your weights commitment, with their Merkle proof.
    OpenWeights {
        /// Leaf indices, at most [`veil_zk::MAX_OPENINGS`].
        leaves: Vec<u32>,
    },
    /// Run your committed private model on these 64 pixels and prove the answer.
    ProveInference {
        /// Pixels, 0..16.
        input: Vec<u8>,
    },
    /// Prove you run in a TEE: evidence naming your key and this nonce.
    Attest {
        /// The verifier's fresh challenge.
        nonce: [u8; 32],
    },
}

/// A node's answer.
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
    /// A verified session ended: its answer, signed.
    Finished(Box<Signed<Job>>),
    /// A hop session ended: its record, signed.
    HopFinished(Box<Signed<HopJob>>),
    /// A sealed verdict.
    Committed(Signed<VerdictCommit>),
    /// An opened verdict.
    Revealed(Signed<VerdictReveal>),
    /// Opened weight chunks answering [`RequestBody::OpenWeights`].
    WeightOpenings(Box<veil_zk::Openings>),
    /// A private model's answer with its zero-knowledge proof.
    InferenceProof(Box<veil_zk::proof::InferenceProof>),
    /// TEE evidence answering [`RequestBody::Attest`].
    Attested(Box<veil_tee::Evidence>),
    /// The request was refused; the message says why.
    Error {
        /// What kind of failure, for the client to act on.
        kind: ErrorKind,
        /// For people.
        message: String,
    },
}

/// Why a node refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    /// The request was malformed or does not fit the shard.
    BadRequest,
    /// The session does not exist (never opened, closed, or expired).
    UnknownSession,
    /// A limit was reached (sessions, tokens).
    Busy,
    /// The sender speaks another protocol version.
    Version,
    /// The node failed while computing.
    Internal,
}

/// What a node announces about the shard it serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardInfo {
    /// The whole model's id (blake3 of its file).
    pub model_digest: String,
    /// First block served.
    pub first_block: usize,
    /// One past the last block served.
    pub end_block: usize,
    /// Blocks in the whole model.
    pub block_count: usize,
    /// Whether the node takes token ids.
    pub embedding: bool,
    /// Whether the node returns logits.
    pub head: bool,
    /// Width of the hidden states it takes and returns.
    pub hidden_size: usize,
    /// Most positions a session may hold.
    pub max_session_tokens: usize,
    /// The weight format the node runs (and claims in signed answers).
    pub format: String,
    /// The TEE the node runs in, if any; its evidence comes on [`RequestBody::Attest`].
    #[serde(default)]
    pub tee: Option<veil_tee::TeeKind>,
    /// The commitment to the weights the node holds; openings come on
    /// [`RequestBody::OpenWeights`].
    #[serde(default)]
    pub weights: Option<WeightsRoot>,
    /// The commitment of the private model whose answers the node proves, if any.
    #[serde(default)]
    pub zk_commitment: Option<String>,
    /// Whether the node's outputs are the same bits on every CPU (Veil's kernels on quantized
    /// weights), so its verified answers can commit exactly and it can judge exact claims.
    #[serde(default)]
    pub exact: bool,
}

/// A Merkle root over a node's tensors (see `veil_zk::WeightsCommitment`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WeightsRoot {
    /// The root, hex.
    pub root: String,
    /// Leaves under it.
    pub leaves: u64,
}

impl ShardInfo {
    /// Checks that a step's input fits this shard before it reaches the model.
    pub fn check_input(&self, input: &StepInput, vocab_size: usize) -> Result<()> {
        if input.is_empty() {
            return Err(NetError::BadMessage(
                "a step needs at least one position".into(),
            ));
        }
        if input.len() > MAX_STEP_TOKENS {
            return Err(NetError::BadMessage(format!(
                "a step carries at most {MAX_STEP_TOKENS} positions, got {}",
                input.len()
            )));
        }
        match input {
            StepInput::Tokens(_) if !self.embedding => Err(NetError::BadMessage(
                "this shard takes hidden states, not token ids".into(),
            )),
            StepInput::Tokens(ids) => match ids.iter().find(|&&t| t as usize >= vocab_size) {
                Some(t) => Err(NetError::BadMessage(format!(
                    "token id {t} is outside the vocabulary of {vocab_size}"
                ))),
                None => Ok(()),
            },
            StepInput::Hidden(_) if self.embedding => Err(NetError::BadMessage(
                "this shard takes token ids, not hidden states".into(),
            )),
            StepInput::Hidden(t) => {
                if t.shape.len() != 2 || t.shape[1] != self.hidden_size {
                    return Err(NetError::BadMessage(format!(
                        "hidden states must have shape (tokens, {}), got {:?}",
                        self.hidden_size, t.shape
                    )));
                }
                t.check()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> ShardInfo {
        ShardInfo {
            model_digest: "m".into(),
            first_block: 10,
            end_block: 20,
            block_count: 30,
            embedding: false,
            head: false,
            hidden_size: 4,
            max_session_tokens: 100,
            format: "f32".into(),
            tee: None,
            weights: None,
            zk_commitment: None,
            exact: false,
        }
    }

    #[test]
    fn tensors_round_trip_and_bad_bytes_are_refused() {
        let t =
            Tensor::from_vec(vec![1f32, -2.5, 3.0, 0.0, 5.0, 6.0], (3, 2), &Device::Cpu).unwrap();
        let wire = WireTensor::from_tensor(&t).unwrap();
        let back = wire.to_tensor().unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), t.to_vec2::<f32>().unwrap());

        let mut short = wire.clone();
        short.data.pop();
        assert!(short.to_tensor().is_err());
        let mut huge = wire.clone();
        huge.shape = vec![usize::MAX, 2];
        assert!(huge.to_tensor().is_err());
        let mut nan = wire;
        nan.data[..4].copy_from_slice(&f32::NAN.to_le_bytes());
        assert!(nan.to_tensor().is_err());
    }

    #[test]
    fn inputs_must_fit_the_shard() {
        let hidden = |shape: Vec<usize>| {
            let n: usize = shape.iter().product();
            StepInput::Hidden(WireTensor {
                dtype: WireDType::F32,
                shape,
                data: vec![0; n * 4],
            })
        };
        let info = info();
        assert!(info.check_input(&hidden(vec![3, 4]), 50).is_ok());
        assert!(info.check_input(&hidden(vec![3, 5]), 50).is_err());
        assert!(info.check_input(&hidden(vec![12]), 50).is_err());
        assert!(info.check_input(&hidden(vec![0, 4]), 50).is_err());
        assert!(info
            .check_input(&hidden(vec![MAX_STEP_TOKENS + 1, 4]), 50)
            .is_err());
        assert!(info.check_input(&StepInput::Tokens(vec![1]), 50).is_err());
        let first = ShardInfo {
            embedding: true,
            ..info
        };
        assert!(first
            .check_input(&StepInput::Tokens(vec![1, 49]), 50)
            .is_ok());
        assert!(first.check_input(&StepInput::Tokens(vec![50]), 50).is_err());
        assert!(first.check_input(&hidden(vec![1, 4]), 50).is_err());
    }
}
