//! The llama block: Llama 2/3, Mistral, Qwen 2 and Qwen 3.
//!
//! `x + attn(norm(x))`, then `x + ffn(norm(x))` with a SiLU-gated FFN. Qwen 2's attention
//! biases and Qwen 3's per-head query/key norms are options of the shared attention, read from
//! the file when its tensors are there; the RoPE layout follows the architecture.

use candle_core::Tensor;

use crate::config::LlamaConfig;
use crate::error::Result;
use crate::kv::KvStore;
use crate::layers::{
    rms_norm, Attention, BlockWeights, FeedForward, GateActivation, Rope, Segment,
};
use crate::linear::Linear;

/// One llama-family block's weights.
#[derive(Debug, Clone)]
pub(crate) struct LlamaBlock {
    attn_norm: Tensor,
    attention: Attention,
    ffn_norm: Tensor,
    ffn: FeedForward,
    eps: f64,
}

impl LlamaBlock {
    pub(crate) fn load(
        weights: &mut BlockWeights<'_>,
        config: &LlamaConfig,
        rope: Rope,
    ) -> Result<Self> {
        let h = config.hidden_size;
        Ok(Self {
            attn_norm: weights.vector("attn_norm.weight", h)?,
            attention: Attention::load(weights, config, rope)?,
            ffn_norm: weights.vector("ffn_norm.weight", h)?,
            ffn: FeedForward::load(weights, config, GateActivation::Silu)?,
            eps: config.rms_eps,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor, kv: &mut KvStore, start: usize) -> Result<Tensor> {
        let h = rms_norm(x, &self.attn_norm, self.eps)?;
        let x = (x + self.attention.forward(&h, kv, start)?)?;
        self.feed_forward(&x)
    }

    pub(crate) fn forward_batch(
        &self,
        x: &Tensor,
        kvs: &mut [&mut KvStore],
        segments: &[Segment],
    ) -> Result<Tensor> {
        let h = rms_norm(x, &self.attn_norm, self.eps)?;
        let x = (x + self.attention.forward_batch(&h, kvs, segments)?)?;
        self.feed_forward(&x)
    }

    fn feed_forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = rms_norm(x, &self.ffn_norm, self.eps)?;
        Ok((x + self.ffn.forward(&h)?)?)
    }

    pub(crate) fn matrices_mut(&mut self) -> Vec<&mut Linear> {
        let mut all: Vec<&mut Linear> = self.attention.matrices_mut().into();
        all.extend(self.ffn.matrices_mut());
        all
    }
}
