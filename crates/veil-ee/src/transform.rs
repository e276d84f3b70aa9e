//! Applying a key to a model's weights, and moving tokens and logits between the two bases.
//!
//! Every step of the full transform is exact in real arithmetic, so it works on F32 weights:
//! rotating the input dimension of a block-quantized matrix is not exact. Group-local keys,
//! which only move values inside their quantization groups, are applied to the stored blocks
//! instead (`group_local.rs`).
//! Weights are `(out, in)` as candle reads GGUF, so a layer computes `y = W x`.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use veil_model::{LlamaConfig, TokenOrder};

use crate::error::Result;
use crate::key::{inverse, EeKey, LayerKey};

/// Plaintext token ids to the encrypted vocabulary. An id outside the vocabulary becomes
/// `u32::MAX`, which the model rejects with a clear error.
pub fn encrypt_tokens(key: &EeKey, ids: &[u32]) -> Vec<u32> {
    ids.iter()
        .map(|&t| key.vocab.get(t as usize).copied().unwrap_or(u32::MAX))
        .collect()
}

/// Encrypted token ids back to plaintext ids.
pub fn decrypt_tokens(key: &EeKey, ids: &[u32]) -> Vec<u32> {
    let inv = inverse(&key.vocab);
    ids.iter()
        .map(|&t| inv.get(t as usize).copied().unwrap_or(u32::MAX))
        .collect()
}

/// Encrypted logits (indexed by encrypted id) back to plaintext order; ids missing from a
/// short logit vector come back as minus infinity.
pub fn decrypt_logits(key: &EeKey, logits: &[f32]) -> Vec<f32> {
    key.vocab
        .iter()
        .map(|&enc| {
            logits
                .get(enc as usize)
                .copied()
                .unwrap_or(f32::NEG_INFINITY)
        })
        .collect()
}

/// The key's vocabulary permutation as a [`TokenOrder`]: generation over an encrypted model in
/// which the sampler draws in the encrypted order, as the judges of a verified session
/// recompute it. Ids outside the vocabulary become `u32::MAX`, which the model and the
/// tokenizer reject with a clear error.
#[derive(Debug, Clone)]
pub struct EncryptedOrder {
    vocab: Vec<u32>,
    inverse: Vec<u32>,
}

impl EncryptedOrder {
    /// The order `key` puts tokens in.
    pub fn new(key: &EeKey) -> Self {
        Self {
            vocab: key.vocab.clone(),
            inverse: inverse(&key.vocab),
        }
    }
}

impl TokenOrder for EncryptedOrder {
    fn to_model(&self, id: u32) -> u32 {
        self.vocab.get(id as usize).copied().unwrap_or(u32::MAX)
    }

    fn to_plain(&self, id: u32) -> u32 {
        self.inverse.get(id as usize).copied().unwrap_or(u32::MAX)
    }
}

fn ids(p: &[u32]) -> Result<Tensor> {
    Ok(Tensor::new(p, &Device::Cpu)?)
}

/// Rewrites dense F32 weights, keyed by GGUF tensor name, into the key's basis.
pub fn encrypt_weights(
    key: &EeKey,
    config: &LlamaConfig,
    weights: &mut HashMap<String, Tensor>,
) -> Result<()> {
    key.check(config)?;
    let hidden = ids(&key.hidden)?;
    let vocab_rows = ids(&inverse(&key.vocab))?;
    let mut update = |name: &str, f: &dyn Fn(&Tensor) -> Result<Tensor>| -> Result<()> {
        if let Some(t) = weights.get_mut(name) {
            *t = f(t)?;
        }
        Ok(())
    };
    // Embedding and head: rows follow the vocabulary, columns the residual stream.
    for name in ["token_embd.weight", "output.weight"] {
        update(name, &|t| {
            Ok(t.index_select(&vocab_rows, 0)?.index_select(&hidden, 1)?)
        })?;
    }
    update("output_norm.weight", &|t| Ok(t.index_select(&hidden, 0)?))?;

    for (i, layer) in key.layers.iter().enumerate() {
        let name = |n: &str| format!("blk.{i}.{n}.weight");
        let attn = AttentionKey::new(layer, config)?;
        update(&name("attn_q"), &|t| {
            attn.queries(t)?
                .index_select(&hidden, 1)
                .map_err(Into::into)
        })?;
        update(&name("attn_k"), &|t| {
            attn.keys(t)?.index_select(&hidden, 1).map_err(Into::into)
        })?;
        update(&name("attn_v"), &|t| {
            attn.values(t)?.index_select(&hidden, 1).map_err(Into::into)
        })?;
        update(&name("attn_output"), &|t| {
            attn.output(t)?.index_select(&hidden, 0).map_err(Into::into)
        })?;
        let ffn = ids(&layer.ffn)?;
        for n in ["ffn_gate", "ffn_up"] {
            update(&name(n), &|t| {
                Ok(t.index_select(&ffn, 0)?.index_select(&hidden, 1)?)
            })?;
        }
        update(&name("ffn_down"), &|t| {
            Ok(t.index_select(&hidden, 0)?.index_select(&ffn, 1)?)
        })?;
        for n in ["attn_norm", "ffn_norm"] {
            update(&name(n), &|t| Ok(t.index_select(&hidden, 0)?))?;
        }
    }
    Ok(())
}

/// One block's attention transforms as tensors.
struct AttentionKey {
    kv_heads: Tensor,
    /// `(kv_heads, d, d)`: orthogonal maps on value vectors.
    value_maps: Tensor,
    /// `(kv_heads, d, d)`: block-diagonal 2×2 rotations of the RoPE pairs.
    rope: Tensor,
    kv: usize,
    group: usize,
    d: usize,
}

impl AttentionKey {
    fn new(layer: &LayerKey, c: &LlamaConfig) -> Result<Self> {
        let (kv, d) = (c.kv_head_count, c.head_dim);
        let maps: Vec<f32> = layer.value_maps.concat();
        let mut rope = vec![0f32; kv * d * d];
        for (h, angles) in layer.rope_angles.iter().enumerate() {
            for (p, &a) in angles.iter().enumerate() {
                let (s, co) = a.sin_cos();
                let at = |r: usize, c: usize| h * d * d + r * d + c;
                let (r0, r1) = (2 * p, 2 * p + 1);
                rope[at(r0, r0)] = co;
                rope[at(r0, r1)] = -s;
                rope[at(r1, r0)] = s;
                rope[at(r1, r1)] = co;
            }
        }
        Ok(Self {
            kv_heads: ids(&layer.kv_heads)?,
            value_maps: Tensor::from_vec(maps, (kv, d, d), &Device::Cpu)?,
            rope: Tensor::from_vec(rope, (kv, d, d), &Device::Cpu)?,
            kv,
            group: c.head_count / kv,
            d,
        })
    }

    /// `(heads·d, hidden)`: query groups follow their KV head, each head's pairs rotated.
    fn queries(&self, w: &Tensor) -> Result<Tensor> {
        let cols = w.dim(1)?;
        let w = w
            .reshape((self.kv, self.group, self.d, cols))?
            .index_select(&self.kv_heads, 0)?;
        let rope = self.rope.unsqueeze(1)?;
        Ok(rope
            .broadcast_matmul(&w)?
            .reshape((self.kv * self.group * self.d, cols))?)
    }

    /// `(kv·d, hidden)`: KV heads permuted, each head's pairs rotated like its queries.
    fn keys(&self, w: &Tensor) -> Result<Tensor> {
        let cols = w.dim(1)?;
        let w = w
            .reshape((self.kv, self.d, cols))?
            .index_select(&self.kv_heads, 0)?;
        Ok(self.rope.matmul(&w)?.reshape((self.kv * self.d, cols))?)
    }

    /// `(kv·d, hidden)`: KV heads permuted, each head's values mapped.
    fn values(&self, w: &Tensor) -> Result<Tensor> {
        let cols = w.dim(1)?;
        let w = w
            .reshape((self.kv, self.d, cols))?
            .index_select(&self.kv_heads, 0)?;
        Ok(self
            .value_maps
            .matmul(&w)?
            .reshape((self.kv * self.d, cols))?)
    }

    /// `(hidden, heads·d)`: columns follow the query groups; each head's value map undone
    /// (the maps are orthogonal, so the inverse is the transpose).
    fn output(&self, w: &Tensor) -> Result<Tensor> {
        let rows = w.dim(0)?;
        let w = w
            .reshape((rows, self.kv, self.group, self.d))?
            .index_select(&self.kv_heads, 1)?
            .permute((1, 2, 0, 3))? // (kv, group, rows, d)
            .contiguous()?
            .reshape((self.kv, self.group * rows, self.d))?;
        let undone = w.matmul(&self.value_maps.transpose(1, 2)?.contiguous()?)?;
        Ok(undone
            .reshape((self.kv, self.group, rows, self.d))?
            .permute((2, 0, 1, 3))?
            .contiguous()?
            .reshape((rows, self.kv * self.group * self.d))?)
    }
}
