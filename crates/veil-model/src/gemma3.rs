//! The Gemma 3 block.
//!
//! Gemma differs from llama in where its norms sit and what its FFN computes: the embedding is
//! scaled by `sqrt(hidden)`, each half of the block normalizes its input and its output
//! (`x + post_norm(attn(norm(x)))`), queries and keys are normalized per head, the FFN is
//! GELU-gated, and five of every six layers attend only to a sliding window with their own
//! RoPE base (`LlamaConfig::window`). GGUF norm weights already include Gemma's `1 +`.

use candle_core::Tensor;

use crate::config::LlamaConfig;
use crate::error::Result;
use crate::kv::KvStore;
use crate::layers::{
    rms_norm, Attention, BlockWeights, FeedForward, GateActivation, Rope, Segment,
};
use crate::linear::Linear;

/// The factor token embeddings are multiplied by, as llama.cpp computes it (`sqrtf(n_embd)`).
pub(crate) fn embedding_scale(config: &LlamaConfig) -> f64 {
    f64::from((config.hidden_size as f32).sqrt())
}

/// One Gemma 3 block's weights.
#[derive(Debug, Clone)]
pub(crate) struct Gemma3Block {
    attn_norm: Tensor,
    attention: Attention,
    post_attn_norm: Tensor,
    ffn_norm: Tensor,
    ffn: FeedForward,
    post_ffn_norm: Tensor,
    eps: f64,
}

impl Gemma3Block {
    pub(crate) fn load(
        weights: &mut BlockWeights<'_>,
        config: &LlamaConfig,
        rope: Rope,
    ) -> Result<Self> {
        let h = config.hidden_size;
        Ok(Self {
            attn_norm: weights.vector("attn_norm.weight", h)?,
            attention: Attention::load(weights, config, rope)?,
            post_attn_norm: weights.vector("post_attention_norm.weight", h)?,
            ffn_norm: weights.vector("ffn_norm.weight", h)?,
            ffn: FeedForward::load(weights, config, GateActivation::GeluTanh)?,
            post_ffn_norm: weights.vector("post_ffw_norm.weight", h)?,
            eps: config.rms_eps,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor, kv: &mut KvStore, start: usize) -> Result<Tensor> {
        let h = rms_norm(x, &self.attn_norm, self.eps)?;
        let attended = self.attention.forward(&h, kv, start)?;
        self.finish(x, &attended)
    }

    pub(crate) fn forward_batch(
        &self,
        x: &Tensor,
        kvs: &mut [&mut KvStore],
        segments: &[Segment],
    ) -> Result<Tensor> {
        let h = rms_norm(x, &self.attn_norm, self.eps)?;
        let attended = self.attention.forward_batch(&h, kvs, segments)?;
        self.finish(x, &attended)
    }

    /// The attention's post-norm and residual, then the feed-forward half.
    fn finish(&self, x: &Tensor, attended: &Tensor) -> Result<Tensor> {
        let x = (x + rms_norm(attended, &self.post_attn_norm, self.eps)?)?;
        let h = rms_norm(&x, &self.ffn_norm, self.eps)?;
        let y = rms_norm(&self.ffn.forward(&h)?, &self.post_ffn_norm, self.eps)?;
        Ok((x + y)?)
    }

    pub(crate) fn matrices_mut(&mut self) -> Vec<&mut Linear> {
        let mut all: Vec<&mut Linear> = self.attention.matrices_mut().into();
        all.extend(self.ffn.matrices_mut());
        all
    }
}
