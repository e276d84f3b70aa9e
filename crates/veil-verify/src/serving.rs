//! The generating side: a session that serves an answer and commits to its activations, and
//! the ways a node can lie about it (for tests and the demo).

use std::fmt;
use std::str::FromStr;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use veil_model::sampling::argmax;
use veil_model::{
    forward_chain_final_hidden, GgufFile, Kernels, LogitsAt, Sampler, SamplingParams, Shard,
    ShardCache, ShardModel, WeightFormat,
};

use crate::commitment::{CommitmentBuilder, CommitmentMode};
use crate::error::{Result, VerifyError};
use crate::validate::{Claim, SamplingSpec};

/// How a node cheats. Every kind saves the cheater work or changes the answer, and every kind
/// must be caught by validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Misbehaviour {
    /// Serve the default model with every block weight perturbed by 1%: another model.
    OtherModel,
    /// Serve a cheaper, less precise weight format than the one claimed (Q4_0 for Q8_0).
    LowerPrecision,
    /// Drop one prompt token before running it.
    AlteredPrompt,
    /// Change one generated token in every hundred.
    AlteredToken,
    /// Pass over one block.
    SkippedLayers,
    /// Answer with random logits and activations, computing nothing.
    RandomOutput,
}

impl Misbehaviour {
    /// Every kind, in the order tests and figures list them.
    pub const ALL: [Self; 6] = [
        Self::OtherModel,
        Self::LowerPrecision,
        Self::AlteredPrompt,
        Self::AlteredToken,
        Self::SkippedLayers,
        Self::RandomOutput,
    ];

    /// Whether the cheat lives in the weights (applied at load) rather than in each session.
    pub fn in_weights(self) -> bool {
        matches!(
            self,
            Self::OtherModel | Self::LowerPrecision | Self::SkippedLayers
        )
    }
}

impl fmt::Display for Misbehaviour {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::OtherModel => "other-model",
            Self::LowerPrecision => "lower-precision",
            Self::AlteredPrompt => "altered-prompt",
            Self::AlteredToken => "altered-token",
            Self::SkippedLayers => "skipped-layers",
            Self::RandomOutput => "random-output",
        })
    }
}

impl FromStr for Misbehaviour {
    type Err = VerifyError;

    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|m| m.to_string() == s)
            .ok_or_else(|| {
                let names: Vec<String> = Self::ALL.iter().map(ToString::to_string).collect();
                VerifyError::InvalidClaim(format!(
                    "unknown misbehaviour {s:?}: use one of {}",
                    names.join(", ")
                ))
            })
    }
}

/// The format a lower-precision cheat serves instead of `claimed`.
pub fn cheaper_format(claimed: WeightFormat) -> Result<WeightFormat> {
    match claimed {
        WeightFormat::F32 | WeightFormat::F16 => Ok(WeightFormat::Q8_0),
        WeightFormat::Q8_0 | WeightFormat::AsStored => Ok(WeightFormat::Q4_0),
        WeightFormat::Q4_0 => Err(VerifyError::InvalidClaim(
            "no format is cheaper than q4_0 to cheat with".into(),
        )),
    }
}

/// Relative weight noise of the other-model cheat.
const OTHER_MODEL_NOISE: f32 = 0.01;

/// Loads `shard` as a node claiming `claimed` serves it, with the weight cheat of `fault`.
pub fn load_serving_shard(
    gguf: &mut GgufFile,
    shard: &Shard,
    claimed: WeightFormat,
    fault: Option<Misbehaviour>,
) -> Result<ShardModel> {
    load_serving_shard_with(gguf, shard, claimed, Kernels::default(), fault)
}

/// [`load_serving_shard`] on the given kernels (a family of Veil's, or candle's).
pub fn load_serving_shard_with(
    gguf: &mut GgufFile,
    shard: &Shard,
    claimed: WeightFormat,
    kernels: Kernels,
    fault: Option<Misbehaviour>,
) -> Result<ShardModel> {
    let format = match fault {
        Some(Misbehaviour::LowerPrecision) => cheaper_format(claimed)?,
        _ => claimed,
    };
    let mut model = ShardModel::load_with(gguf, shard, format, kernels)?;
    match fault {
        Some(Misbehaviour::OtherModel) => model.perturb_weights(OTHER_MODEL_NOISE, 0x5eed)?,
        Some(Misbehaviour::SkippedLayers) => {
            let layers = &shard.layers;
            model.skip_blocks(&[layers.start + layers.len() / 2]);
        }
        _ => {}
    }
    Ok(model)
}

/// One sequence served with commitments: the node side of a verified session.
///
/// The node samples each token itself with the client's seed, exactly as the client will from
/// the logits it returns, so it can sign the whole answer at the end.
#[derive(Debug)]
pub struct ServingSession {
    caches: Vec<ShardCache>,
    hidden_size: usize,
    vocab_size: usize,
    fault: Option<Misbehaviour>,
    rng: ChaCha20Rng,
    sampling: SamplingParams,
    sampler: Sampler,
    builder: CommitmentBuilder,
    prompt: Vec<u32>,
    output: Vec<u32>,
    prefill_chunk: Option<usize>,
    altered_at: usize,
    cheated: bool,
}

impl ServingSession {
    /// A new session over `shards` (a chain covering the whole model).
    pub fn new(
        shards: &[ShardModel],
        sampling: SamplingParams,
        fault: Option<Misbehaviour>,
        fault_seed: u64,
    ) -> Result<Self> {
        let config = shards
            .first()
            .ok_or_else(|| VerifyError::InvalidClaim("no model to serve".into()))?
            .config();
        Ok(Self {
            caches: shards.iter().map(ShardModel::new_cache).collect(),
            hidden_size: config.hidden_size,
            vocab_size: config.vocab_size,
            fault,
            rng: ChaCha20Rng::seed_from_u64(fault_seed),
            sampler: Sampler::new(sampling.clone())?,
            sampling,
            builder: CommitmentBuilder::new(config.hidden_size, CommitmentMode::Tolerant)?,
            prompt: Vec::new(),
            output: Vec::new(),
            prefill_chunk: None,
            altered_at: 0,
            cheated: false,
        })
    }

    /// Runs the prompt in pieces of `tokens` positions (batch size of the prefill), as some
    /// engines do: an honest change of summation shapes that validation must tolerate.
    pub fn with_prefill_chunk(mut self, tokens: usize) -> Self {
        self.prefill_chunk = Some(tokens.max(1));
        self
    }

    /// Commits in `mode` (tolerant by default). Exact mode needs `shards` that are
    /// bit-reproducible: an honest node refuses it otherwise (a cheating one does not check).
    pub fn with_commitment(mut self, shards: &[ShardModel], mode: CommitmentMode) -> Result<Self> {
        let reproducible = shards.iter().all(ShardModel::bit_reproducible);
        if mode == CommitmentMode::Exact && !reproducible && self.fault.is_none() {
            return Err(VerifyError::CannotReproduce(format!(
                "exact commitments need Veil's kernels on quantized weights; this node runs {}",
                shards.first().map_or(WeightFormat::F32, ShardModel::format)
            )));
        }
        if self.builder.tokens() > 0 {
            return Err(VerifyError::InvalidClaim(
                "the commitment mode is chosen before the first token".into(),
            ));
        }
        self.builder = CommitmentBuilder::new(self.hidden_size, mode)?;
        Ok(self)
    }

    /// The mode the session commits in.
    pub fn commitment_mode(&self) -> CommitmentMode {
        self.builder.mode()
    }

    /// Whether a per-session cheat (an altered token) has acted yet.
    pub fn cheated(&self) -> bool {
        self.cheated
    }

    /// Tokens sampled so far.
    pub fn output_len(&self) -> usize {
        self.output.len()
    }

    /// Positions the session holds.
    pub fn position(&self) -> usize {
        self.caches.first().map_or(0, ShardCache::position)
    }

    /// Feeds the prompt (first call) or the last sampled token, and returns the next logits.
    pub fn step(&mut self, shards: &[ShardModel], tokens: &[u32]) -> Result<Vec<f32>> {
        if tokens.is_empty() {
            return Err(VerifyError::InvalidClaim("no tokens to run".into()));
        }
        if self.prompt.is_empty() {
            self.prompt = tokens.to_vec();
        } else if tokens != [*self.output.last().unwrap_or(&u32::MAX)] {
            return Err(VerifyError::InvalidClaim(format!(
                "a verified session takes back the token it sampled ({:?}), got {tokens:?}",
                self.output.last()
            )));
        }
        let first = self.output.is_empty();
        let (mut logits, hidden) = if self.fault == Some(Misbehaviour::RandomOutput) {
            let logits = (0..self.vocab_size)
                .map(|_| self.rng.random_range(-10.0..10.0))
                .collect();
            let hidden = (0..self.hidden_size)
                .map(|_| self.rng.random_range(-5.0..5.0))
                .collect();
            (logits, hidden)
        } else {
            let mut run: Vec<u32> = tokens.to_vec();
            if first && self.fault == Some(Misbehaviour::AlteredPrompt) && run.len() >= 3 {
                let at = self.rng.random_range(1..run.len() - 1);
                run.remove(at);
            }
            self.forward(shards, &run, first)?
        };
        if self.fault == Some(Misbehaviour::AlteredToken) {
            let i = self.output.len();
            if i.is_multiple_of(100) {
                self.altered_at = i + self.rng.random_range(0..100);
            }
            if i == self.altered_at {
                let best = argmax(&logits) as usize;
                let other = (best + self.rng.random_range(1..self.vocab_size)) % self.vocab_size;
                logits[other] = logits[best] + 50.0;
                self.cheated = true;
            }
        }
        self.builder.push(&hidden)?;
        self.output.push(self.sampler.sample(&logits)?);
        Ok(logits)
    }

    /// The answer so far as a claim: the prompt as sent (whatever was run), the sampled tokens
    /// and the commitment.
    pub fn finish(self) -> Claim {
        Claim {
            prompt: self.prompt,
            output: self.output,
            sampling: SamplingSpec::from(&self.sampling),
            commitment: self.builder.finish(),
        }
    }

    /// Runs `tokens`, in pieces for a chunked prefill; returns the last position's logits and
    /// final hidden state.
    fn forward(
        &mut self,
        shards: &[ShardModel],
        tokens: &[u32],
        prefill: bool,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let piece = match self.prefill_chunk {
            Some(n) if prefill => n,
            _ => tokens.len(),
        };
        let mut last = None;
        for part in tokens.chunks(piece) {
            last = Some(forward_chain_final_hidden(
                shards,
                &mut self.caches,
                part,
                LogitsAt::Last,
            )?);
        }
        let (logits, hidden) =
            last.ok_or_else(|| VerifyError::InvalidClaim("no tokens to run".into()))?;
        let rows = hidden.dim(0)?;
        Ok((
            logits.squeeze(0)?.to_vec1()?,
            hidden.narrow(0, rows - 1, 1)?.squeeze(0)?.to_vec1()?,
        ))
    }
}

/// Serves exactly `tokens` answer tokens for `prompt` (end-of-sequence does not stop it):
/// how tests and benchmarks produce answers of a known length.
pub fn serve_fixed_length(
    shards: &[ShardModel],
    session: ServingSession,
    prompt: &[u32],
    tokens: usize,
) -> Result<Claim> {
    serve_until(shards, session, prompt, &mut |s| s.output_len() >= tokens)
}

/// Serves answer tokens for `prompt` until `done` says so (checked after each token).
pub fn serve_until(
    shards: &[ShardModel],
    mut session: ServingSession,
    prompt: &[u32],
    done: &mut dyn FnMut(&ServingSession) -> bool,
) -> Result<Claim> {
    session.step(shards, prompt)?;
    while !done(&session) {
        let last = session.output[session.output.len() - 1];
        session.step(shards, &[last])?;
    }
    Ok(session.finish())
}
