//! The architecture numbers of a model, read from GGUF metadata.
//!
//! Nothing here is hard-coded for one model: every size comes from the file, and sizes that
//! contradict each other are rejected before any weight is read.

use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;

/// The architectures whose forward pass this crate implements (`general.architecture`).
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["llama", "qwen2", "qwen3", "gemma3"];

/// A family of transformer blocks. The llama family (Llama 2/3, Mistral, Qwen 2/3) shares one
/// block, with attention biases and QK-norm taken from the file when it has them; Gemma 3 has
/// a block of its own (`crate::gemma3`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Architecture {
    /// Llama 2/3 and Mistral: RoPE on interleaved pairs, SiLU-gated FFN.
    Llama,
    /// Qwen 2: the llama block with biases on the query, key and value projections, RoPE on
    /// split halves.
    Qwen2,
    /// Qwen 3: the llama block with RMSNorm on each query and key head, RoPE on split halves.
    Qwen3,
    /// Gemma 3: scaled embedding, norms before and after attention and FFN, QK-norm, GeGLU,
    /// sliding-window layers between global ones, two RoPE bases.
    Gemma3,
}

impl Architecture {
    /// The name GGUF metadata uses.
    pub fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
            Self::Gemma3 => "gemma3",
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        [Self::Llama, Self::Qwen2, Self::Qwen3, Self::Gemma3]
            .into_iter()
            .find(|a| a.name() == name)
    }

    /// Whether RoPE rotates interleaved pairs `(2i, 2i+1)` (llama.cpp's "norm" mode, for which
    /// its converter permutes llama's query and key rows) rather than the halves `(i, i + d/2)`
    /// ("neox" mode, as Qwen and Gemma are stored).
    pub fn rope_interleaved(self) -> bool {
        self == Self::Llama
    }
}

impl std::fmt::Display for Architecture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Gemma 3 makes every sixth layer global unless the file says otherwise (llama.cpp's default).
const GEMMA3_SWA_PATTERN: usize = 6;

/// Which of `blocks` layers are local, from `key`: one flag per layer, or a period `n` (layer
/// `i` is local unless `i % n == n - 1`, llama.cpp's reading), by default Gemma 3's 6.
fn local_layers(gguf: &GgufFile, key: &str, blocks: usize) -> Result<Vec<bool>> {
    use candle_core::quantized::gguf_file::Value;
    let bad = |reason: String| ModelError::BadMetadata {
        key: key.to_string(),
        reason,
    };
    let period = match gguf.value(key) {
        Err(ModelError::MissingMetadata { .. }) => GEMMA3_SWA_PATTERN,
        Err(e) => return Err(e),
        Ok(Value::Array(flags)) => {
            if flags.len() != blocks {
                return Err(bad(format!("{} flags for {blocks} blocks", flags.len())));
            }
            return flags
                .iter()
                .map(|f| match f {
                    Value::Bool(b) => Ok(*b),
                    other => Err(bad(format!("expected booleans, found {other:?}"))),
                })
                .collect();
        }
        Ok(_) => gguf.usize(key)?,
    };
    Ok((0..blocks)
        .map(|i| period == 0 || i % period < period - 1)
        .collect())
}
/// Gemma 3's local (sliding-window) layers use this RoPE base (llama.cpp's default).
const GEMMA3_LOCAL_ROPE_BASE: f32 = 10_000.0;

/// Sizes and constants of a transformer of one of the [`SUPPORTED_ARCHITECTURES`].
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// Which block the model stacks.
    pub architecture: Architecture,
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
    /// Width of one attention head (`attention.key_length`, else hidden size / heads).
    pub head_dim: usize,
    /// RoPE frequency base (of the global layers, where a model has local ones too).
    pub rope_base: f32,
    /// Linear RoPE scaling: positions are multiplied by this (1 for none).
    pub rope_scale: f32,
    /// The sliding window of local attention layers, for models that have them.
    pub sliding_window: Option<usize>,
    /// Which blocks are local (attend through the sliding window); the others are global.
    pub local_layers: Vec<bool>,
    /// RoPE base of the local layers (which never scale positions).
    pub rope_base_local: f32,
    /// Logits pass through `cap * tanh(logits / cap)` when set.
    pub final_logit_softcap: Option<f32>,
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
        let name = gguf.string("general.architecture")?.to_string();
        let Some(architecture) = Architecture::from_name(&name) else {
            return Err(ModelError::UnsupportedArchitecture { found: name });
        };
        let key = |k: &str| format!("{name}.{k}");
        let optional_usize = |k: &str| match gguf.usize(&key(k)) {
            Err(ModelError::MissingMetadata { .. }) => Ok(None),
            other => other.map(Some),
        };
        let optional_f64 = |k: &str| match gguf.f64(&key(k)) {
            Err(ModelError::MissingMetadata { .. }) => Ok(None),
            other => other.map(Some),
        };
        let hidden_size = gguf.usize(&key("embedding_length"))?;
        let head_count = gguf.usize(&key("attention.head_count"))?;
        let kv_head_count = optional_usize("attention.head_count_kv")?.unwrap_or(head_count);
        let head_dim = match optional_usize("attention.key_length")? {
            Some(dim) => dim,
            // Heads that do not divide the hidden size leave 0, which `check` refuses.
            None if head_count > 0 && hidden_size.is_multiple_of(head_count) => {
                hidden_size / head_count
            }
            None => 0,
        };
        if let Some(value_dim) = optional_usize("attention.value_length")? {
            if value_dim != head_dim {
                return Err(ModelError::BadMetadata {
                    key: key("attention.value_length"),
                    reason: format!(
                        "value heads of {value_dim} differ from key heads of {head_dim}: not supported"
                    ),
                });
            }
        }
        let rope_base = optional_f64("rope.freq_base")?.unwrap_or(10_000.0) as f32;
        let rope_scale = match gguf.string(&key("rope.scaling.type")) {
            Ok("linear") => 1.0 / optional_f64("rope.scaling.factor")?.unwrap_or(1.0) as f32,
            Ok("none") | Err(ModelError::MissingMetadata { .. }) => 1.0,
            Ok(other) => {
                return Err(ModelError::BadMetadata {
                    key: key("rope.scaling.type"),
                    reason: format!("RoPE scaling {other:?} is not supported (linear is)"),
                })
            }
            Err(e) => return Err(e),
        };
        let vocab_size = match optional_usize("vocab_size")? {
            Some(n) => n,
            None => gguf.token_count()?,
        };
        let block_count = gguf.usize(&key("block_count"))?;
        let sliding_window = match architecture {
            Architecture::Gemma3 => optional_usize("attention.sliding_window")?.filter(|&w| w > 0),
            _ => None,
        };
        let local_layers = match sliding_window {
            Some(_) => local_layers(gguf, &key("attention.sliding_window_pattern"), block_count)?,
            None => Vec::new(),
        };
        let config = Self {
            architecture,
            block_count,
            hidden_size,
            ffn_size: gguf.usize(&key("feed_forward_length"))?,
            head_count,
            kv_head_count,
            head_dim,
            rope_base,
            rope_scale,
            sliding_window,
            local_layers,
            rope_base_local: optional_f64("rope.freq_base_swa")?
                .map_or(GEMMA3_LOCAL_ROPE_BASE, |b| b as f32),
            final_logit_softcap: optional_f64("final_logit_softcapping")?
                .filter(|&c| c > 0.0)
                .map(|c| c as f32),
            rms_eps: gguf.f64(&key("attention.layer_norm_rms_epsilon"))?,
            context_length: gguf.usize(&key("context_length"))?,
            vocab_size,
        };
        config.check(&name)?;
        Ok(config)
    }

    /// The plain llama configuration with these sizes: what tests of other crates build
    /// tiny models from.
    pub fn llama(
        block_count: usize,
        hidden_size: usize,
        ffn_size: usize,
        head_count: usize,
        kv_head_count: usize,
        context_length: usize,
        vocab_size: usize,
    ) -> Self {
        Self {
            architecture: Architecture::Llama,
            block_count,
            hidden_size,
            ffn_size,
            head_count,
            kv_head_count,
            head_dim: hidden_size.checked_div(head_count).unwrap_or(0),
            rope_base: 10_000.0,
            rope_scale: 1.0,
            sliding_window: None,
            local_layers: Vec::new(),
            rope_base_local: GEMMA3_LOCAL_ROPE_BASE,
            final_logit_softcap: None,
            rms_eps: 1e-5,
            context_length,
            vocab_size,
        }
    }

    /// The sliding window of block `layer`, or `None` for a global block.
    pub fn window(&self, layer: usize) -> Option<usize> {
        let local = self.local_layers.get(layer).copied().unwrap_or(false);
        self.sliding_window.filter(|_| local)
    }

    /// Width of the query projection: all query heads side by side.
    pub fn q_size(&self) -> usize {
        self.head_count * self.head_dim
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
        if self.head_count == 0 || self.head_dim == 0 || self.hidden_size == 0 {
            return Err(bad(
                "attention.head_count",
                format!(
                    "{} heads of {} values over a hidden size of {}: all must be positive, and \
                     without attention.key_length the heads must divide the hidden size",
                    self.head_count, self.head_dim, self.hidden_size
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
            || !(self.rope_scale > 0.0 && self.rope_scale.is_finite())
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
