//! What Veil's protocols ([`crate::protocol`]) carry: session handles, tensors as raw
//! little-endian bytes with dtype and shape, and what a node announces it serves. Every message
//! is bounded in size by its protocol's codec and checked here before any of it is used.

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use veil_verify::HopInput;

use crate::error::{NetError, Result};

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
    /// The TEE the node runs in, if any; its evidence comes on [`crate::protocol::prove::Request::Attest`].
    #[serde(default)]
    pub tee: Option<veil_tee::TeeKind>,
    /// The commitment to the weights the node holds; openings come on
    /// [`crate::protocol::prove::Request::OpenWeights`].
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
    /// Whether the node serves the whole model (what verified sessions and judging need).
    pub fn is_whole(&self) -> bool {
        self.embedding && self.head && self.first_block == 0 && self.end_block == self.block_count
    }

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
