//! The architecture numbers of a llama-family model, read from GGUF metadata.
//!
//! Nothing here is hard-coded for one model: every size comes from the file, and sizes that
//! contradict each other are rejected before any weight is read.

use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;

/// The architectures whose forward pass this crate implements.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["llama"];

/// Sizes and constants of a llama-family transformer.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// Number of transformer blocks.
    pub block_count: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Inner width of the feed-forward network.
    pub ffn_size: usize,
    /// Query heads per block.
    pub head_count: usize,
    /// Key/value heads per block (fewer than query heads under grouped-query attention).
    pub kv_head_count: usize,
    /// Width of one attention head.
    pub head_dim: usize,
    /// RoPE frequency base.
    pub rope_base: f32,
    /// Epsilon of every RMSNorm.
    pub rms_eps: f64,
    /// The longest sequence the model was trained for.
    pub context_length: usize,
    /// Number of tokens in the vocabulary.
    pub vocab_size: usize,
}

impl LlamaConfig {
    /// Reads and checks the configuration of a GGUF model.
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self> {
        let arch = gguf.string("general.architecture")?.to_string();
        if !SUPPORTED_ARCHITECTURES.contains(&arch.as_str()) {
            return Err(ModelError::UnsupportedArchitecture { found: arch });
        }
        let key = |k: &str| format!("{arch}.{k}");
        let hidden_size = gguf.usize(&key("embedding_length"))?;
        let head_count = gguf.usize(&key("attention.head_count"))?;
        let kv_head_count = match gguf.usize(&key("attention.head_count_kv")) {
            Err(ModelError::MissingMetadata { .. }) => head_count,
            other => other?,
        };
        let rope_base = match gguf.f64(&key("rope.freq_base")) {
            Err(ModelError::MissingMetadata { .. }) => 10_000.0,
            other => other?,
        } as f32;
        let vocab_size = match gguf.usize(&key("vocab_size")) {
            Err(ModelError::MissingMetadata { .. }) => gguf.array("tokenizer.ggml.tokens")?.len(),
            other => other?,
        };
        let config = Self {
            block_count: gguf.usize(&key("block_count"))?,
            hidden_size,
            ffn_size: gguf.usize(&key("feed_forward_length"))?,
            head_count,
            kv_head_count,
            head_dim: hidden_size.checked_div(head_count).unwrap_or(0),
            rope_base,
            rms_eps: gguf.f64(&key("attention.layer_norm_rms_epsilon"))?,
            context_length: gguf.usize(&key("context_length"))?,
            vocab_size,
        };
        config.check(&arch)?;
        Ok(config)
    }

    /// Rejects sizes the forward pass cannot run with.
    fn check(&self, arch: &str) -> Result<()> {
        let bad = |k: &str, reason: String| ModelError::BadMetadata {
            key: format!("{arch}.{k}"),
            reason,
        };
        if self.block_count == 0 {
            return Err(bad("block_count", "the model has no blocks".into()));
        }
        if self.head_count == 0 || !self.hidden_size.is_multiple_of(self.head_count) {
            return Err(bad(
                "attention.head_count",
                format!(
                    "{} heads do not divide the hidden size {}",
                    self.head_count, self.hidden_size
                ),
            ));
        }
        if self.kv_head_count == 0 || !self.head_count.is_multiple_of(self.kv_head_count) {
            return Err(bad(
                "attention.head_count_kv",
                format!(
                    "{} key/value heads do not divide {} query heads",
                    self.kv_head_count, self.head_count
                ),
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(bad(
                "embedding_length",
                format!("head size {} is odd: RoPE needs pairs", self.head_dim),
            ));
        }
        if self.context_length == 0 || self.vocab_size == 0 || self.ffn_size == 0 {
            return Err(bad(
                "context_length",
                "context, vocabulary and FFN sizes must be positive".into(),
            ));
        }
        if self.rms_eps.is_nan()
            || self.rms_eps <= 0.0
            || self.rope_base.is_nan()
            || self.rope_base <= 0.0
        {
            return Err(bad(
                "attention.layer_norm_rms_epsilon",
                "epsilon and RoPE base must be positive".into(),
            ));
        }
        Ok(())
    }

    /// Width of the key (and value) projection: all KV heads side by side.
    pub fn kv_size(&self) -> usize {
        self.kv_head_count * self.head_dim
    }
}
