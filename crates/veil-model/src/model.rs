//! The forward pass over a shard (a range of blocks), for every supported architecture: the
//! blocks themselves live in one file per family (`llama.rs`, `gemma3.rs`), built from the
//! shared parts in `layers.rs`; this file holds what they share: embedding, head, caches and
//! the shard's loop.
//!
//! Owned here rather than taken from `candle-transformers` because Veil needs what those models
//! do not offer: running any block range, taking hidden states in and handing them out, KV
//! caches that live outside the weights (one per session, many sessions per loaded shard), and
//! taps on every block's output for verification.

use std::ops::Range;
use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Tensor};

use crate::config::{Architecture, LlamaConfig};
use crate::error::{ModelError, Result};
use crate::gemma3::{self, Gemma3Block};
use crate::gguf::GgufFile;
use crate::kv::KvStore;
use crate::layers::{dense, load, rms_norm, BlockWeights, Rope, Segment};
use crate::linear::{Kernels, Linear};
use crate::llama::LlamaBlock;
use crate::shard::Shard;
use crate::weights::WeightFormat;
use veil_kernels::QuantMatrix;

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

    /// [`copy_prefix`](Self::copy_prefix) for a short-lived copy that takes a few positions
    /// more: it grows `grow_step` positions at a time rather than the session's step, so a
    /// thousand copies that each take one token (an inversion attack's candidates) stay small.
    pub fn copy_prefix_growing(&self, positions: usize, grow_step: usize) -> Result<Self> {
        Ok(Self {
            layers: self
                .layers
                .iter()
                .map(|l| l.copy_prefix_growing(positions, grow_step))
                .collect::<Result<_>>()?,
            position: self.position.min(positions),
        })
    }

    /// Memory the cached positions take.
    pub fn bytes(&self) -> usize {
        self.layers.iter().map(KvStore::bytes).sum()
    }
}

/// One transformer block, of its architecture's family.
#[derive(Debug, Clone)]
enum Block {
    Llama(LlamaBlock),
    Gemma3(Gemma3Block),
}

impl Block {
    /// Reads block `weights.block` of a model of `config`'s architecture; `freq_factors` are
    /// Llama 3's RoPE frequency factors when the file has them.
    fn load(
        weights: &mut BlockWeights<'_>,
        config: &LlamaConfig,
        freq_factors: Option<&[f32]>,
    ) -> Result<Self> {
        Ok(match config.architecture {
            Architecture::Llama | Architecture::Qwen2 | Architecture::Qwen3 => {
                let rope = Rope::new(config, config.rope_base, config.rope_scale, freq_factors)?;
                Self::Llama(LlamaBlock::load(weights, config, rope)?)
            }
            Architecture::Gemma3 => {
                // Local layers have a base of their own and never scale positions.
                let (base, scale) = match config.window(weights.block) {
                    Some(_) => (config.rope_base_local, 1.0),
                    None => (config.rope_base, config.rope_scale),
                };
                let rope = Rope::new(config, base, scale, freq_factors)?;
                Self::Gemma3(Gemma3Block::load(weights, config, rope)?)
            }
        })
    }

    fn forward(&self, x: &Tensor, kv: &mut KvStore, start: usize) -> Result<Tensor> {
        match self {
            Self::Llama(b) => b.forward(x, kv, start),
            Self::Gemma3(b) => b.forward(x, kv, start),
        }
    }

    fn forward_batch(
        &self,
        x: &Tensor,
        kvs: &mut [&mut KvStore],
        segments: &[Segment],
    ) -> Result<Tensor> {
        match self {
            Self::Llama(b) => b.forward_batch(x, kvs, segments),
            Self::Gemma3(b) => b.forward_batch(x, kvs, segments),
        }
    }

    fn matrices_mut(&mut self) -> Vec<&mut Linear> {
        match self {
            Self::Llama(b) => b.matrices_mut(),
            Self::Gemma3(b) => b.matrices_mut(),
        }
    }
}

/// The token embedding: looked up from quantized rows, from a dense table, or from the rows
/// of a tied head's matrix (one copy of the table for both).
#[derive(Debug, Clone)]
enum Embedding {
    Quantized(Arc<QTensor>),
    Dense(Tensor),
    HeadRows(Arc<QuantMatrix>),
}

impl Embedding {
    fn lookup(&self, ids: &[u32]) -> Result<Tensor> {
        let tensor = || Tensor::new(ids, &Device::Cpu);
        Ok(match self {
            Self::Quantized(q) => q.embedding(&tensor()?)?,
            Self::Dense(t) => t.index_select(&tensor()?, 0)?,
            Self::HeadRows(m) => {
                let mut values = Vec::with_capacity(ids.len() * m.cols());
                for &id in ids {
                    let row = m
                        .dequantize_row(id as usize)
                        .map_err(|e| ModelError::InvalidInput(e.to_string()))?;
                    values.extend(row);
                }
                Tensor::from_vec(values, (ids.len(), m.cols()), &Device::Cpu)?
            }
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
    /// Blocks (model indices) passed over: only ever set to test that verification catches it.
    skipped: Vec<usize>,
    /// Whether every matrix runs on Veil's kernels (see [`Self::bit_reproducible`]).
    reproducible: bool,
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

        // The head first: a tied head run as stored shares its rows with the embedding, so
        // the table (Gemma 3's is 262,144 rows) is held once.
        let tied = !gguf.has_tensor("output.weight");
        let table = [config.vocab_size, h];
        let head = if shard.head {
            let norm = dense(gguf, "output_norm.weight", h)?;
            let name = if tied {
                "token_embd.weight"
            } else {
                "output.weight"
            };
            Some((norm, Linear::load(gguf, name, &table, format, kernels)?))
        } else {
            None
        };
        let shared = head
            .as_ref()
            .filter(|_| tied && format == WeightFormat::AsStored)
            .and_then(|(_, linear)| linear.quant_matrix());
        let embedding = match (shard.embedding, shared) {
            (false, _) => None,
            (true, Some(rows)) => Some(Embedding::HeadRows(rows)),
            (true, None) => {
                let q = load(gguf, "token_embd.weight", &table)?;
                Some(if q.dtype().block_size() > 1 {
                    Embedding::Quantized(Arc::new(q))
                } else {
                    Embedding::Dense(q.dequantize(&Device::Cpu)?)
                })
            }
        };

        let freq_factors = if gguf.has_tensor("rope_freqs.weight") {
            let half = config.head_dim / 2;
            Some(dense(gguf, "rope_freqs.weight", half)?.to_vec1::<f32>()?)
        } else {
            None
        };
        let mut blocks = Vec::with_capacity(shard.layers.len());
        for i in shard.layers.clone() {
            let mut weights = BlockWeights {
                gguf,
                block: i,
                format,
                kernels,
            };
            blocks.push(Block::load(&mut weights, &config, freq_factors.as_deref())?);
        }

        let mut model = Self {
            config,
            shard: shard.clone(),
            format,
            kernels,
            embedding,
            blocks,
            head,
            skipped: Vec::new(),
            reproducible: false,
        };
        model.reproducible = model.all_on_veil();
        Ok(model)
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
            for w in block.matrices_mut() {
                *w = perturb(w, relative, &mut rng)?;
            }
        }
        self.reproducible = self.all_on_veil();
        Ok(())
    }

    /// Whether this shard's outputs are the same bits on every CPU, kernel family, thread
    /// count and grouping of positions into passes: every matrix runs on Veil's kernels
    /// (quantized formats), whose products and attention sum in one fixed order. Exact
    /// verification (a hash of the hidden states) needs it; candle's float products do not
    /// promise it.
    pub fn bit_reproducible(&self) -> bool {
        self.reproducible
    }

    fn all_on_veil(&mut self) -> bool {
        let head = self.head.as_ref().is_none_or(|(_, l)| l.runs_on_veil());
        head && self
            .blocks
            .iter_mut()
            .all(|b| b.matrices_mut().iter().all(|m| m.runs_on_veil()))
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
                x = block.forward(&x, kv, start)?;
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
        self.logits(&x, norm, head)
    }

    /// One step for several sessions at once (continuous batching): the rows of `input` are
    /// `lens[0]` new positions of the session whose cache is `caches[0]`, then `lens[1]` of
    /// `caches[1]`'s, and so on (one each when decoding; a piece of a prompt when prefilling).
    ///
    /// Returns every row's hidden states `(rows, hidden_size)`, or for a shard with the head
    /// `(sessions, vocab_size)` logits at each session's last new position. Each row comes out
    /// exactly as a step of its session alone would give it: the kernels sum every row in one
    /// order however many rows there are, and attention runs per session.
    pub fn forward_batch(
        &self,
        input: ShardInput<'_>,
        caches: &mut [&mut ShardCache],
        lens: &[usize],
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
        let rows: usize = lens.iter().sum();
        if lens.len() != caches.len() || lens.contains(&0) || x.dim(1)? != rows {
            return Err(ModelError::InvalidInput(format!(
                "a batched step of {} rows in segments {lens:?} for {} sessions",
                x.dim(1)?,
                caches.len()
            )));
        }
        let segments: Vec<Segment> = caches
            .iter()
            .zip(lens)
            .map(|(c, &len)| Segment {
                start: c.position,
                len,
            })
            .collect();
        if let Some(full) = segments
            .iter()
            .find(|s| s.start + s.len > self.config.context_length)
        {
            return Err(ModelError::ContextOverflow {
                needed: full.start + full.len,
                context: self.config.context_length,
            });
        }
        for (layer, (i, block)) in self.shard.layers.clone().zip(&self.blocks).enumerate() {
            if !self.skipped.contains(&i) {
                let mut kvs: Vec<&mut KvStore> =
                    caches.iter_mut().map(|c| &mut c.layers[layer]).collect();
                x = block.forward_batch(&x, &mut kvs, &segments)?;
            }
        }
        for (cache, len) in caches.iter_mut().zip(lens) {
            cache.position += len;
        }
        let Some((norm, head)) = &self.head else {
            return Ok(x.squeeze(0)?);
        };
        if rows != caches.len() {
            // Logits only where each session's new positions end.
            let last: Vec<u32> = lens
                .iter()
                .scan(0usize, |end, &len| {
                    *end += len;
                    Some((*end - 1) as u32)
                })
                .collect();
            let last = Tensor::from_vec(last, lens.len(), x.device())?;
            x = x.index_select(&last, 1)?;
        }
        self.logits(&x, norm, head)
    }

    /// Logits `(positions, vocab)` of final hidden states `(1, positions, hidden)`.
    fn logits(&self, x: &Tensor, norm: &Tensor, head: &Linear) -> Result<Tensor> {
        let x = rms_norm(x, norm, self.config.rms_eps)?;
        let logits = head.forward(&x)?.squeeze(0)?;
        Ok(match self.config.final_logit_softcap {
            Some(cap) => ((logits / f64::from(cap))?.tanh()? * f64::from(cap))?,
            None => logits,
        })
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
                let x = embedding.lookup(ids)?.unsqueeze(0)?;
                Ok(match self.config.architecture {
                    Architecture::Gemma3 => (x * gemma3::embedding_scale(&self.config))?,
                    _ => x,
                })
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
