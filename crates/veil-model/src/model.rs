//! The llama-family forward pass over a shard (a range of blocks).
//!
//! Owned here rather than taken from `candle-transformers` because Veil needs what that model
//! does not offer: running any block range, taking hidden states in and handing them out, KV
//! caches that live outside the weights (one per session, many sessions per loaded shard), and
//! taps on every block's output for verification.

use std::ops::Range;
use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Storage, Tensor};

use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;
use crate::kv::KvStore;
use crate::linear::{Kernels, Linear};
use crate::shard::Shard;
use crate::weights::WeightFormat;

/// KV caches grow in steps of this many positions, so a short chat does not reserve the whole
/// context window up front.
const KV_GROW_STEP: usize = 256;

/// What a shard is fed: token ids (first shard) or the previous shard's hidden states.
#[derive(Debug, Clone)]
pub enum ShardInput<'a> {
    /// Token ids, for a shard that holds the embedding.
    Tokens(&'a [u32]),
    /// Hidden states `(tokens, hidden_size)` from the shard before.
    Hidden(Tensor),
}

/// Which positions a head shard returns logits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsAt {
    /// Only the last position: all that generation needs.
    Last,
    /// Every position.
    All,
    /// The positions of this step from the given index on: what teacher-forced validation
    /// needs (the answer's positions, not the prompt's).
    From(usize),
}

/// The key/value cache of one session on one shard.
#[derive(Debug)]
pub struct ShardCache {
    layers: Vec<KvStore>,
    position: usize,
}

impl ShardCache {
    /// How many positions the cache holds.
    pub fn position(&self) -> usize {
        self.position
    }

    /// Empties the cache for a new sequence.
    pub fn reset(&mut self) {
        self.layers.iter_mut().for_each(KvStore::reset);
        self.position = 0;
    }

    /// Forgets positions from `position` on: drafts a speculative step did not confirm.
    pub fn truncate(&mut self, position: usize) {
        self.layers.iter_mut().for_each(|l| l.truncate(position));
        self.position = self.position.min(position);
    }

    /// An independent cache holding this one's first `positions` positions: a shared prompt
    /// prefix that another session continues from.
    pub fn copy_prefix(&self, positions: usize) -> Result<Self> {
        Ok(Self {
            layers: self
                .layers
                .iter()
                .map(|l| l.copy_prefix(positions))
                .collect::<Result<_>>()?,
            position: self.position.min(positions),
        })
    }

    /// Memory the cached positions take.
    pub fn bytes(&self) -> usize {
        self.layers.iter().map(KvStore::bytes).sum()
    }
}

/// Precomputed RoPE angles for every position of the context.
#[derive(Debug, Clone)]
struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    fn new(config: &LlamaConfig) -> Result<Self> {
        let half = config.head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| {
                1.0 / config
                    .rope_base
                    .powf(2.0 * i as f32 / config.head_dim as f32)
            })
            .collect();
        let inv_freq = Tensor::from_vec(inv_freq, (1, half), &Device::Cpu)?;
        let positions = Tensor::arange(0u32, config.context_length as u32, &Device::Cpu)?
            .to_dtype(DType::F32)?
            .reshape((config.context_length, 1))?;
        let angles = positions.matmul(&inv_freq)?;
        Ok(Self {
            cos: angles.cos()?,
            sin: angles.sin()?,
        })
    }

    /// Rotates `x` `(batch, heads, tokens, head_dim)` for positions `start..start + tokens`.
    /// GGUF llama weights are stored for the interleaved pairing `(2i, 2i+1)`.
    fn apply(&self, x: &Tensor, start: usize) -> Result<Tensor> {
        let tokens = x.dim(2)?;
        let cos = self.cos.narrow(0, start, tokens)?;
        let sin = self.sin.narrow(0, start, tokens)?;
        Ok(candle_nn::rotary_emb::rope_i(&x.contiguous()?, &cos, &sin)?)
    }
}

/// One transformer block's weights.
#[derive(Debug, Clone)]
struct Block {
    attn_norm: Tensor,
    wq: Linear,
    wk: Linear,
    wv: Linear,
    wo: Linear,
    ffn_norm: Tensor,
    w_gate: Linear,
    w_up: Linear,
    w_down: Linear,
}

/// The token embedding: looked up from quantized rows, or from a dense table.
#[derive(Debug, Clone)]
enum Embedding {
    Quantized(Arc<QTensor>),
    Dense(Tensor),
}

impl Embedding {
    fn lookup(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::Quantized(q) => q.embedding(ids)?,
            Self::Dense(t) => t.index_select(ids, 0)?,
        })
    }
}

/// The weights of one shard, loaded and ready to serve any number of sessions.
#[derive(Debug, Clone)]
pub struct ShardModel {
    config: LlamaConfig,
    shard: Shard,
    format: WeightFormat,
    kernels: Kernels,
    embedding: Option<Embedding>,
    blocks: Vec<Block>,
    head: Option<(Tensor, Linear)>,
    rope: Rope,
    /// Blocks (model indices) passed over: only ever set to test that verification catches it.
    skipped: Vec<usize>,
}

impl ShardModel {
    /// Loads the tensors of `shard` from `gguf`, converting matrix weights to `format`.
    pub fn load(gguf: &mut GgufFile, shard: &Shard, format: WeightFormat) -> Result<Self> {
        Self::load_with(gguf, shard, format, Kernels::default())
    }

    /// [`load`](Self::load), choosing whose kernels multiply quantized weights.
    pub fn load_with(
        gguf: &mut GgufFile,
        shard: &Shard,
        format: WeightFormat,
        kernels: Kernels,
    ) -> Result<Self> {
        let config = LlamaConfig::from_gguf(gguf)?;
        shard.check(config.block_count)?;
        let _span = tracing::info_span!("load_shard", %shard, %format).entered();
        let h = config.hidden_size;

        let needs_embd = shard.embedding || (shard.head && !gguf.has_tensor("output.weight"));
        let token_embd = if needs_embd {
            Some(Arc::new(load(
                gguf,
                "token_embd.weight",
                &[config.vocab_size, h],
            )?))
        } else {
            None
        };
        let embedding = match (&token_embd, shard.embedding) {
            (Some(q), true) if q.dtype().block_size() > 1 => Some(Embedding::Quantized(q.clone())),
            (Some(q), true) => Some(Embedding::Dense(q.dequantize(&Device::Cpu)?)),
            _ => None,
        };

        let mut blocks = Vec::with_capacity(shard.layers.len());
        for i in shard.layers.clone() {
            let mut matmul = |name: &str, shape: &[usize]| -> Result<Linear> {
                let q = load(gguf, &format!("blk.{i}.{name}.weight"), shape)?;
                Linear::new(Arc::new(q), format, kernels)
            };
            let (kv, ffn) = (config.kv_size(), config.ffn_size);
            blocks.push(Block {
                wq: matmul("attn_q", &[h, h])?,
                wk: matmul("attn_k", &[kv, h])?,
                wv: matmul("attn_v", &[kv, h])?,
                wo: matmul("attn_output", &[h, h])?,
                w_gate: matmul("ffn_gate", &[ffn, h])?,
                w_up: matmul("ffn_up", &[ffn, h])?,
                w_down: matmul("ffn_down", &[h, ffn])?,
                attn_norm: dense(gguf, &format!("blk.{i}.attn_norm.weight"), h)?,
                ffn_norm: dense(gguf, &format!("blk.{i}.ffn_norm.weight"), h)?,
            });
        }

        let head = if shard.head {
            let norm = dense(gguf, "output_norm.weight", h)?;
            let weight = match token_embd {
                Some(tied) if !gguf.has_tensor("output.weight") => tied,
                _ => Arc::new(load(gguf, "output.weight", &[config.vocab_size, h])?),
            };
            Some((norm, Linear::new(weight, format, kernels)?))
        } else {
            None
        };

        Ok(Self {
            rope: Rope::new(&config)?,
            config,
            shard: shard.clone(),
            format,
            kernels,
            embedding,
            blocks,
            head,
            skipped: Vec::new(),
        })
    }

    /// Loads the shards covering every block of `gguf` at `ranges` (the whole model as one shard
    /// when `ranges` is empty).
    pub fn load_chain(
        gguf: &mut GgufFile,
        ranges: &[Range<usize>],
        format: WeightFormat,
        kernels: Kernels,
    ) -> Result<Vec<Self>> {
        let block_count = LlamaConfig::from_gguf(gguf)?.block_count;
        let plan = if ranges.is_empty() {
            vec![Shard::whole(block_count)]
        } else {
            Shard::tiling(ranges, block_count)?
        };
        plan.iter()
            .map(|shard| Self::load_with(gguf, shard, format, kernels))
            .collect()
    }

    /// The model's architecture numbers.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// Which part of the model this is.
    pub fn shard(&self) -> &Shard {
        &self.shard
    }

    /// The format matrix weights run in.
    pub fn format(&self) -> WeightFormat {
        self.format
    }

    /// Whose kernels multiply the quantized weights.
    pub fn kernels(&self) -> Kernels {
        self.kernels
    }

    /// Makes the shard pass over `blocks` (model indices): a cheat that saves their cost. Only
    /// misbehaving test nodes do this, so that verification can be shown to catch it.
    pub fn skip_blocks(&mut self, blocks: &[usize]) {
        self.skipped = blocks.to_vec();
    }

    /// Multiplies every block weight by `1 + relative * n` with `n` standard normal noise from
    /// `seed`, keeping the weight's format: "another model" that is close to this one. Only
    /// misbehaving test nodes do this.
    pub fn perturb_weights(&mut self, relative: f32, seed: u64) -> Result<()> {
        use rand::SeedableRng;
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(seed);
        for block in &mut self.blocks {
            for w in [
                &mut block.wq,
                &mut block.wk,
                &mut block.wv,
                &mut block.wo,
                &mut block.w_gate,
                &mut block.w_up,
                &mut block.w_down,
            ] {
                *w = perturb(w, relative, &mut rng)?;
            }
        }
        Ok(())
    }

    /// A fresh, empty KV cache for a new session on this shard.
    pub fn new_cache(&self) -> ShardCache {
        ShardCache {
            layers: (0..self.blocks.len())
                .map(|_| KvStore::new(KV_GROW_STEP))
                .collect(),
            position: 0,
        }
    }

    /// Runs the shard on new positions of a session and advances its cache.
    ///
    /// Returns hidden states `(tokens, hidden_size)`, or, for a shard with the head, logits
    /// `(positions, vocab_size)` at the positions `logits_at` asks for.
    pub fn forward(
        &self,
        input: ShardInput<'_>,
        cache: &mut ShardCache,
        logits_at: LogitsAt,
    ) -> Result<Tensor> {
        self.forward_tapped(input, cache, logits_at, &mut |_, _| Ok(()))
    }

    /// [`forward`](Self::forward), calling `tap(block, hidden)` with each block's output
    /// `(tokens, hidden_size)`; `block` is the block's index in the whole model.
    pub fn forward_tapped(
        &self,
        input: ShardInput<'_>,
        cache: &mut ShardCache,
        logits_at: LogitsAt,
        tap: &mut dyn FnMut(usize, &Tensor) -> Result<()>,
    ) -> Result<Tensor> {
        if cache.layers.len() != self.blocks.len() {
            return Err(ModelError::InvalidInput(format!(
                "cache has {} layers but shard {} has {}",
                cache.layers.len(),
                self.shard,
                self.blocks.len()
            )));
        }
        let mut x = self.embed(input)?;
        let tokens = x.dim(1)?;
        let start = cache.position;
        let needed = start + tokens;
        if needed > self.config.context_length {
            return Err(ModelError::ContextOverflow {
                needed,
                context: self.config.context_length,
            });
        }
        for ((i, block), kv) in self
            .shard
            .layers
            .clone()
            .zip(&self.blocks)
            .zip(&mut cache.layers)
        {
            if !self.skipped.contains(&i) {
                x = block.forward(&x, kv, &self.rope, &self.config, start)?;
            }
            tap(i, &x.squeeze(0)?)?;
        }
        cache.position = needed;

        let Some((norm, head)) = &self.head else {
            return Ok(x.squeeze(0)?);
        };
        match logits_at {
            LogitsAt::Last => x = x.narrow(1, tokens - 1, 1)?,
            LogitsAt::From(first) if first < tokens => x = x.narrow(1, first, tokens - first)?,
            LogitsAt::From(first) => {
                return Err(ModelError::InvalidInput(format!(
                    "logits asked from position {first} of a step of {tokens}"
                )))
            }
            LogitsAt::All => {}
        }
        let x = candle_nn::ops::rms_norm(&x.contiguous()?, norm, self.config.rms_eps as f32)?;
        Ok(head.forward(&x)?.squeeze(0)?)
    }

    /// One decode step for several sessions at once (continuous batching): row `i` of `input`
    /// is the next position of the session whose cache is `caches[i]`.
    ///
    /// Returns `(sessions, hidden_size)` hidden states, or for a shard with the head
    /// `(sessions, vocab_size)` logits. Each row comes out exactly as a step of its session
    /// alone would give it: the kernels sum every row in one order however many rows there are.
    pub fn forward_batch(
        &self,
        input: ShardInput<'_>,
        caches: &mut [&mut ShardCache],
    ) -> Result<Tensor> {
        if let Some(bad) = caches.iter().find(|c| c.layers.len() != self.blocks.len()) {
            return Err(ModelError::InvalidInput(format!(
                "cache has {} layers but shard {} has {}",
                bad.layers.len(),
                self.shard,
                self.blocks.len()
            )));
        }
        let mut x = self.embed(input)?;
        if x.dim(1)? != caches.len() {
            return Err(ModelError::InvalidInput(format!(
                "a batched step takes one position per session: {} rows for {} sessions",
                x.dim(1)?,
                caches.len()
            )));
        }
        let starts: Vec<usize> = caches.iter().map(|c| c.position).collect();
        if let Some(&full) = starts.iter().find(|&&p| p >= self.config.context_length) {
            return Err(ModelError::ContextOverflow {
                needed: full + 1,
                context: self.config.context_length,
            });
        }
        for (layer, (i, block)) in self.shard.layers.clone().zip(&self.blocks).enumerate() {
            if !self.skipped.contains(&i) {
                let mut kvs: Vec<&mut KvStore> =
                    caches.iter_mut().map(|c| &mut c.layers[layer]).collect();
                x = block.forward_batch(&x, &mut kvs, &self.rope, &self.config, &starts)?;
            }
        }
        for cache in caches.iter_mut() {
            cache.position += 1;
        }
        let Some((norm, head)) = &self.head else {
            return Ok(x.squeeze(0)?);
        };
        let x = candle_nn::ops::rms_norm(&x.contiguous()?, norm, self.config.rms_eps as f32)?;
        Ok(head.forward(&x)?.squeeze(0)?)
    }

    /// Turns the input into `(1, tokens, hidden_size)` hidden states, checking it fits the shard.
    fn embed(&self, input: ShardInput<'_>) -> Result<Tensor> {
        match (input, &self.embedding) {
            (ShardInput::Tokens(ids), Some(embedding)) => {
                if ids.is_empty() {
                    return Err(ModelError::InvalidInput("no tokens to run".into()));
                }
                if let Some(bad) = ids
                    .iter()
                    .find(|&&id| id as usize >= self.config.vocab_size)
                {
                    return Err(ModelError::InvalidInput(format!(
                        "token id {bad} is outside the vocabulary of {} tokens",
                        self.config.vocab_size
                    )));
                }
                let ids = Tensor::new(ids, &Device::Cpu)?;
                Ok(embedding.lookup(&ids)?.unsqueeze(0)?)
            }
            (ShardInput::Hidden(h), None) => {
                let (tokens, width) = h.dims2().map_err(|_| {
                    ModelError::InvalidInput(format!(
                        "hidden states must be (tokens, hidden), got {:?}",
                        h.dims()
                    ))
                })?;
                if tokens == 0 || width != self.config.hidden_size || h.dtype() != DType::F32 {
                    return Err(ModelError::InvalidInput(format!(
                        "hidden states must be f32 (tokens > 0, {}), got {:?} {:?}",
                        self.config.hidden_size,
                        h.dtype(),
                        h.dims()
                    )));
                }
                Ok(h.unsqueeze(0)?)
            }
            (ShardInput::Tokens(_), None) => Err(ModelError::InvalidInput(format!(
                "shard {} takes hidden states, not token ids",
                self.shard
            ))),
            (ShardInput::Hidden(_), Some(_)) => Err(ModelError::InvalidInput(format!(
                "shard {} takes token ids, not hidden states",
                self.shard
            ))),
        }
    }
}

impl Block {
    fn forward(
        &self,
        x: &Tensor,
        kv: &mut KvStore,
        rope: &Rope,
        config: &LlamaConfig,
        start: usize,
    ) -> Result<Tensor> {
        let h = candle_nn::ops::rms_norm(x, &self.attn_norm, config.rms_eps as f32)?;
        let (q, k, v) = self.project(&h)?;
        let y = attend(q, k, v, kv, rope, config, start)?;
        self.finish(x, &y, config)
    }

    /// One decode step for several sessions: row `i` of `x` `(1, sessions, hidden)` is the
    /// next position of the session whose cache is `kvs[i]`, at position `starts[i]`. The
    /// matrix products run once over every row; attention runs per session.
    fn forward_batch(
        &self,
        x: &Tensor,
        kvs: &mut [&mut KvStore],
        rope: &Rope,
        config: &LlamaConfig,
        starts: &[usize],
    ) -> Result<Tensor> {
        let h = candle_nn::ops::rms_norm(x, &self.attn_norm, config.rms_eps as f32)?;
        let (q, k, v) = self.project(&h)?;
        let rows = kvs
            .iter_mut()
            .zip(starts)
            .enumerate()
            .map(|(i, (kv, &start))| {
                let row = |t: &Tensor| t.narrow(1, i, 1);
                attend(row(&q)?, row(&k)?, row(&v)?, kv, rope, config, start)
            })
            .collect::<Result<Vec<_>>>()?;
        self.finish(x, &Tensor::cat(&rows, 1)?, config)
    }

    /// Queries, keys and values `(1, tokens, heads * head_dim)` of normed hidden states.
    fn project(&self, h: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        Ok((
            self.wq.forward(h)?,
            self.wk.forward(h)?,
            self.wv.forward(h)?,
        ))
    }

    /// The attention output's projection and residual, then the feed-forward half.
    fn finish(&self, x: &Tensor, attended: &Tensor, config: &LlamaConfig) -> Result<Tensor> {
        let x = (x + self.wo.forward(attended)?)?;
        let h = candle_nn::ops::rms_norm(&x, &self.ffn_norm, config.rms_eps as f32)?;
        let ffn = (self.w_gate.forward(&h)?.silu()? * self.w_up.forward(&h)?)?;
        Ok((x + self.w_down.forward(&ffn)?)?)
    }
}

/// Causal attention of projected queries, keys and values `(1, tokens, n * head_dim)` at
/// positions `start..` over a session's cache, with Veil's kernel: each query is computed the
/// same way however many share the call, so chunked prompts, checked drafts and batched
/// sessions give the bits of one plain pass.
fn attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv: &mut KvStore,
    rope: &Rope,
    config: &LlamaConfig,
    start: usize,
) -> Result<Tensor> {
    let (batch, tokens, _) = q.dims3()?;
    let (heads, kv_heads, dim) = (config.head_count, config.kv_head_count, config.head_dim);
    let split = |t: Tensor, n: usize| t.reshape((batch, tokens, n, dim))?.transpose(1, 2);
    let q = rope.apply(&split(q, heads)?, start)?;
    let k = rope.apply(&split(k, kv_heads)?, start)?;
    let v = split(v, kv_heads)?.contiguous()?;
    let (keys, values) = kv.append(&k, &v)?;
    let shape = veil_kernels::AttentionShape {
        heads,
        kv_heads,
        head_dim: dim,
        tokens,
        start,
        key_capacity: keys.dim(2)?,
    };
    let queries = q.flatten_all()?.to_vec1::<f32>()?;
    let mut out = vec![0.0f32; queries.len()];
    let (key_storage, key_layout) = keys.storage_and_layout();
    let (value_storage, value_layout) = values.storage_and_layout();
    let (Storage::Cpu(key_data), Storage::Cpu(value_data)) = (&*key_storage, &*value_storage)
    else {
        return Err(ModelError::InvalidInput(
            "the KV cache is not in CPU memory".into(),
        ));
    };
    let key_slice = &key_data.as_slice::<f32>()?[key_layout.start_offset()..][..keys.elem_count()];
    let value_slice =
        &value_data.as_slice::<f32>()?[value_layout.start_offset()..][..values.elem_count()];
    veil_kernels::causal_attention(&shape, &queries, key_slice, value_slice, &mut out)
        .map_err(|e| ModelError::InvalidInput(format!("attention: {e}")))?;
    Ok(Tensor::from_vec(
        out,
        (batch, tokens, heads * dim),
        &Device::Cpu,
    )?)
}

/// Runs `tokens` through a chain of shards (each with its session cache), each shard's hidden
/// states feeding the next; returns the last shard's output.
pub fn forward_chain(
    shards: &[ShardModel],
    caches: &mut [ShardCache],
    tokens: &[u32],
    logits_at: LogitsAt,
) -> Result<Tensor> {
    check_chain(shards, caches)?;
    let mut input = ShardInput::Tokens(tokens);
    let mut out = None;
    for (shard, cache) in shards.iter().zip(caches) {
        let y = shard.forward(input, cache, logits_at)?;
        input = ShardInput::Hidden(y.clone());
        out = Some(y);
    }
    out.ok_or_else(|| ModelError::InvalidShard("the chain has no shards".into()))
}

/// [`forward_chain`], also returning the last block's output `(tokens, hidden_size)`: the
/// final hidden state that verification commits to.
pub fn forward_chain_final_hidden(
    shards: &[ShardModel],
    caches: &mut [ShardCache],
    tokens: &[u32],
    logits_at: LogitsAt,
) -> Result<(Tensor, Tensor)> {
    check_chain(shards, caches)?;
    let mut input = ShardInput::Tokens(tokens);
    let mut out = None;
    let mut hidden = None;
    for (shard, cache) in shards.iter().zip(caches) {
        let y = shard.forward_tapped(input, cache, logits_at, &mut |_, x| {
            hidden = Some(x.clone());
            Ok(())
        })?;
        input = ShardInput::Hidden(y.clone());
        out = Some(y);
    }
    match (out, hidden) {
        (Some(out), Some(hidden)) => Ok((out, hidden)),
        _ => Err(ModelError::InvalidShard("the chain runs no blocks".into())),
    }
}

fn check_chain(shards: &[ShardModel], caches: &[ShardCache]) -> Result<()> {
    if shards.is_empty() || shards.len() != caches.len() {
        return Err(ModelError::InvalidShard(format!(
            "{} shards with {} caches",
            shards.len(),
            caches.len()
        )));
    }
    Ok(())
}

/// One weight with relative normal noise, in its own format.
fn perturb(w: &Linear, relative: f32, rng: &mut rand_chacha::ChaCha20Rng) -> Result<Linear> {
    use rand::Rng;
    let dense = w.dense()?;
    let shape = dense.shape().clone();
    let noisy: Vec<f32> = dense
        .flatten_all()?
        .to_vec1::<f32>()?
        .into_iter()
        .map(|x| {
            let n: f32 = rng.sample(rand_distr::StandardNormal);
            x * (1.0 + relative * n)
        })
        .collect();
    w.with_weight(Tensor::from_vec(noisy, shape, &Device::Cpu)?)
}

/// Reads a tensor and checks its shape (GGUF stores `(out, in)` as candle sees it).
fn load(gguf: &mut GgufFile, name: &str, shape: &[usize]) -> Result<QTensor> {
    let q = gguf.tensor(name)?;
    if q.shape().dims() != shape {
        return Err(ModelError::BadTensor {
            name: name.to_string(),
            reason: format!("shape {:?}, expected {shape:?}", q.shape().dims()),
        });
    }
    Ok(q)
}

/// Reads a norm weight as a dense f32 vector of length `len`.
fn dense(gguf: &mut GgufFile, name: &str, len: usize) -> Result<Tensor> {
    Ok(load(gguf, name, &[len])?.dequantize(&Device::Cpu)?)
}
