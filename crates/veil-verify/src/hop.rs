//! Verified split chains: what one hop of a chain signs, and how a judge serving the same
//! blocks recomputes it.
//!
//! A chain's client relays every hop's inputs and outputs, so it can hand a judge exactly what
//! a hop was given. Each hop keeps a [`HopTranscript`] of its session (digests of its inputs
//! and of what it handed on: hidden states, or the head's logits, one digest per
//! [`STEPS_PER_DIGEST`] steps) and signs it at the end as a [`HopJob`]. The client keeps the
//! same transcript of what it sent and received, so a hop cannot sign one thing and send
//! another. A judge serving the same blocks replays the inputs with the same step shapes and
//! compares digests. Exact mode only: Veil's kernels give the same bits on every CPU, so any
//! difference means the hop's outputs were not its blocks' outputs.

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use veil_model::{LogitsAt, ShardInput, ShardModel};

use crate::commitment::DIGEST_BYTES;
use crate::consensus::{Judged, SignedKind};
use crate::error::{Result, VerifyError};
use crate::validate::Verdict;

/// Steps per digest: 16 bytes per 32 decode steps, half a byte a token for each of the inputs
/// and the outputs.
pub const STEPS_PER_DIGEST: usize = 32;

/// One step's input to a hop, as the hop received it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HopInput {
    /// Token ids, for the hop with the embedding.
    Tokens(Vec<u32>),
    /// Hidden states `(positions, hidden_size)`, row-major, from the hop before.
    Hidden {
        /// Rows.
        positions: usize,
        /// `positions × hidden_size` values, written as the hex of their little-endian bits
        /// (decimal floats in JSON need not read back to the same bits).
        #[serde(with = "f32_hex")]
        values: Vec<f32>,
    },
}

/// Serde for `f32` values as one hex string of their little-endian bits.
mod f32_hex {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(values: &[f32], s: S) -> Result<S::Ok, S::Error> {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        s.serialize_str(&hex::encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f32>, D::Error> {
        let text = String::deserialize(d)?;
        let bytes = hex::decode(text).map_err(D::Error::custom)?;
        if bytes.len() % 4 != 0 {
            return Err(D::Error::custom("hidden states are whole f32 values"));
        }
        Ok(bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }
}

impl HopInput {
    /// Positions the step adds.
    pub fn positions(&self) -> usize {
        match self {
            Self::Tokens(ids) => ids.len(),
            Self::Hidden { positions, .. } => *positions,
        }
    }

    fn hash_into(&self, hasher: &mut blake3::Hasher) {
        hasher.update(&(self.positions() as u64).to_le_bytes());
        match self {
            Self::Tokens(ids) => {
                hasher.update(b"t");
                for id in ids {
                    hasher.update(&id.to_le_bytes());
                }
            }
            Self::Hidden { values, .. } => {
                hasher.update(b"h");
                hash_values(hasher, values);
            }
        }
    }
}

fn hash_values(hasher: &mut blake3::Hasher, values: &[f32]) {
    hasher.update(&(values.len() as u64).to_le_bytes());
    let bytes: Vec<u8> = values
        .iter()
        .flat_map(|v| v.to_bits().to_le_bytes())
        .collect();
    hasher.update(&bytes);
}

/// What a hop commits to: its step shapes, its inputs and its outputs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HopDigests {
    /// Positions of each step, run-length encoded as (positions, steps in a row): a prefill
    /// and a run of one-position decode steps take two entries.
    pub steps: Vec<(u32, u32)>,
    /// One digest of the inputs per [`STEPS_PER_DIGEST`] steps.
    pub inputs: Vec<[u8; DIGEST_BYTES]>,
    /// One digest of the outputs per [`STEPS_PER_DIGEST`] steps.
    pub outputs: Vec<[u8; DIGEST_BYTES]>,
}

impl HopDigests {
    /// Each step's positions, in order.
    pub fn step_positions(&self) -> impl Iterator<Item = usize> + '_ {
        self.steps
            .iter()
            .flat_map(|&(positions, count)| std::iter::repeat_n(positions as usize, count as usize))
    }

    /// Steps in all.
    pub fn step_count(&self) -> usize {
        self.steps
            .iter()
            .fold(0usize, |n, &(_, count)| n.saturating_add(count as usize))
    }

    /// Bytes the digests take (what the commitment costs on the wire).
    pub fn byte_len(&self) -> usize {
        8 * self.steps.len() + DIGEST_BYTES * (self.inputs.len() + self.outputs.len())
    }
}

/// Builds a hop's [`HopDigests`] step by step, on the hop and on the client alike.
#[derive(Debug, Clone)]
pub struct HopTranscript {
    digests: HopDigests,
    inputs: blake3::Hasher,
    outputs: blake3::Hasher,
    in_group: usize,
}

impl Default for HopTranscript {
    fn default() -> Self {
        Self::new()
    }
}

impl HopTranscript {
    /// An empty transcript.
    pub fn new() -> Self {
        Self {
            digests: HopDigests {
                steps: Vec::new(),
                inputs: Vec::new(),
                outputs: Vec::new(),
            },
            inputs: group_hasher("inputs", 0),
            outputs: group_hasher("outputs", 0),
            in_group: 0,
        }
    }

    /// Records one step: what the hop was given and what it handed on.
    pub fn push(&mut self, input: &HopInput, output: &[f32]) {
        let positions = input.positions() as u32;
        match self.digests.steps.last_mut() {
            Some((p, count)) if *p == positions => *count += 1,
            _ => self.digests.steps.push((positions, 1)),
        }
        input.hash_into(&mut self.inputs);
        hash_values(&mut self.outputs, output);
        self.in_group += 1;
        if self.in_group == STEPS_PER_DIGEST {
            self.close_group();
        }
    }

    fn close_group(&mut self) {
        let group = self.digests.inputs.len() + 1;
        let inputs = std::mem::replace(&mut self.inputs, group_hasher("inputs", group));
        let outputs = std::mem::replace(&mut self.outputs, group_hasher("outputs", group));
        self.digests.inputs.push(truncate(&inputs));
        self.digests.outputs.push(truncate(&outputs));
        self.in_group = 0;
    }

    /// The digests of every step so far.
    pub fn finish(mut self) -> HopDigests {
        if self.in_group > 0 {
            self.close_group();
        }
        self.digests
    }
}

fn group_hasher(what: &str, group: usize) -> blake3::Hasher {
    let mut hasher = blake3::Hasher::new_derive_key("veil 2026-12 split chain hop transcript");
    hasher.update(what.as_bytes());
    hasher.update(&(group as u64).to_le_bytes());
    hasher
}

fn truncate(hasher: &blake3::Hasher) -> [u8; DIGEST_BYTES] {
    let mut digest = [0; DIGEST_BYTES];
    digest.copy_from_slice(&hasher.finalize().as_bytes()[..DIGEST_BYTES]);
    digest
}

/// What one hop of a verified split chain signs when its session ends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HopJob {
    /// The chain's request: 64 hex digits chosen by the client.
    pub request_id: String,
    /// blake3 of the whole model's file.
    pub model_digest: String,
    /// The weight format the hop claims to run.
    pub format: String,
    /// The hop's peer id.
    pub node: String,
    /// First block the hop ran.
    pub first_block: usize,
    /// One past the last block it ran.
    pub end_block: usize,
    /// Its step shapes, inputs and outputs.
    pub digests: HopDigests,
}

impl SignedKind for HopJob {
    const DOMAIN: &'static str = "veil-verify/1/hop-job";
}

impl Judged for HopJob {
    fn judged_node(&self) -> &str {
        &self.node
    }

    /// Evidence written before hops' inputs were kept has none; any it has must be the ones
    /// the hop signed for.
    fn check_inputs(&self, inputs: &[HopInput]) -> Result<()> {
        if inputs.is_empty() {
            return Ok(());
        }
        check_signed_inputs(self, inputs)
    }
}

/// Checks `inputs` are, step for step, the ones `job` signed for (counted before anything is
/// hashed: the record comes from a stranger).
fn check_signed_inputs(job: &HopJob, inputs: &[HopInput]) -> Result<()> {
    if job.digests.step_count() != inputs.len() {
        return Err(VerifyError::InvalidClaim(format!(
            "the hop signed for {} steps, the judge was given {}",
            job.digests.step_count(),
            inputs.len()
        )));
    }
    let mut sent = HopTranscript::new();
    for input in inputs {
        sent.push(input, &[]);
    }
    if sent.finish().inputs != job.digests.inputs {
        return Err(VerifyError::InvalidClaim(
            "these inputs are not the ones the hop signed for".into(),
        ));
    }
    Ok(())
}

impl HopJob {
    /// The job's hash in hex: what commits and reveals refer to.
    pub fn digest(&self) -> Result<String> {
        crate::consensus::job_digest(self)
    }
}

/// Recomputes hop `job` on `model` (a shard of exactly its blocks) from `inputs` (what the
/// client sent the hop) and checks its outputs bit for bit. Inputs that are not the ones the
/// hop signed for, or a model that is not bit-reproducible, are refused (an error), never
/// judged a lie.
pub fn judge_hop(model: &ShardModel, job: &HopJob, inputs: &[HopInput]) -> Result<Verdict> {
    let layers = &model.shard().layers;
    if (layers.start, layers.end) != (job.first_block, job.end_block) {
        return Err(VerifyError::CannotReproduce(format!(
            "the hop ran blocks {}-{}, this judge serves {}-{}",
            job.first_block, job.end_block, layers.start, layers.end
        )));
    }
    if !model.bit_reproducible() {
        return Err(VerifyError::CannotReproduce(format!(
            "hops are judged bit for bit, and this judge runs {} through kernels that are not \
             bit-reproducible",
            model.format()
        )));
    }
    // Counted before anything is expanded: the record comes from a stranger.
    if job.digests.step_count() != inputs.len() {
        return Err(VerifyError::InvalidClaim(format!(
            "the hop signed for {} steps, the judge was given {}",
            job.digests.step_count(),
            inputs.len()
        )));
    }
    let shapes: Vec<usize> = job.digests.step_positions().collect();
    let config = model.config();
    let total: usize = shapes.iter().sum();
    if total > config.context_length {
        return Err(VerifyError::InvalidClaim(format!(
            "{total} positions do not fit the model's context of {}",
            config.context_length
        )));
    }
    let groups = inputs.len().div_ceil(STEPS_PER_DIGEST);
    if job.digests.inputs.len() != groups || job.digests.outputs.len() != groups {
        return Err(VerifyError::InvalidClaim(format!(
            "{} steps need {groups} digests each of inputs and outputs",
            inputs.len()
        )));
    }
    let embedding = model.shard().embedding;
    for (input, &positions) in inputs.iter().zip(&shapes) {
        if input.positions() != positions || positions == 0 {
            return Err(VerifyError::InvalidClaim(
                "an input's positions differ from the step the hop signed for".into(),
            ));
        }
        match input {
            HopInput::Tokens(ids) if embedding => {
                if let Some(bad) = ids.iter().find(|&&t| t as usize >= config.vocab_size) {
                    return Err(VerifyError::InvalidClaim(format!(
                        "token {bad} is outside the vocabulary of {}",
                        config.vocab_size
                    )));
                }
            }
            HopInput::Hidden { positions, values } if !embedding => {
                if values.len() != positions * config.hidden_size
                    || values.iter().any(|v| !v.is_finite())
                {
                    return Err(VerifyError::InvalidClaim(format!(
                        "hidden states must be {positions} × {} finite values",
                        config.hidden_size
                    )));
                }
            }
            _ => {
                return Err(VerifyError::InvalidClaim(
                    "the first hop takes token ids, the others hidden states".into(),
                ))
            }
        }
    }
    // The inputs first (cheap): a client may not frame a hop with inputs it never sent.
    check_signed_inputs(job, inputs)?;
    let mut replayed = HopTranscript::new();
    let mut cache = model.new_cache();
    let mut group_start = 0;
    for (step, input) in inputs.iter().enumerate() {
        let output = run_hop_step(model, &mut cache, input)?;
        replayed.push(input, &output);
        if (step + 1) % STEPS_PER_DIGEST == 0 || step + 1 == inputs.len() {
            let group = step / STEPS_PER_DIGEST;
            let ours = replayed.clone().finish();
            if ours.outputs[group] != job.digests.outputs[group] {
                let first = group * STEPS_PER_DIGEST;
                return Ok(Verdict::Fail {
                    token: group_start,
                    reason: format!(
                        "hop {} (blocks {}-{}) handed on outputs in steps {first}..{} that its \
                         blocks do not compute from its inputs",
                        job.node,
                        job.first_block,
                        job.end_block,
                        step + 1
                    ),
                });
            }
            group_start = shapes[..=step].iter().sum();
        }
    }
    Ok(Verdict::Pass)
}

/// One step of a hop as nodes run it: hidden states out, or the last position's logits for a
/// shard with the head.
pub fn run_hop_step(
    model: &ShardModel,
    cache: &mut veil_model::ShardCache,
    input: &HopInput,
) -> Result<Vec<f32>> {
    let output = match input {
        HopInput::Tokens(ids) => model.forward(ShardInput::Tokens(ids), cache, LogitsAt::Last)?,
        HopInput::Hidden { positions, values } => {
            let hidden = Tensor::from_slice(
                values,
                (*positions, model.config().hidden_size),
                &Device::Cpu,
            )?;
            model.forward(ShardInput::Hidden(hidden), cache, LogitsAt::Last)?
        }
    };
    Ok(output.flatten_all()?.to_vec1()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hidden(positions: usize, seed: f32) -> HopInput {
        HopInput::Hidden {
            positions,
            values: (0..positions * 4).map(|i| i as f32 * seed).collect(),
        }
    }

    #[test]
    fn transcripts_group_steps_and_see_every_bit() {
        let steps: Vec<HopInput> = std::iter::once(hidden(7, 0.5))
            .chain((0..40).map(|i| hidden(1, i as f32)))
            .collect();
        let build = |flip: Option<usize>| {
            let mut t = HopTranscript::new();
            for (i, s) in steps.iter().enumerate() {
                let mut out = vec![i as f32; 3];
                if flip == Some(i) {
                    out[1] = f32::from_bits(out[1].to_bits() ^ 1);
                }
                t.push(s, &out);
            }
            t.finish()
        };
        let honest = build(None);
        assert_eq!(honest.steps, vec![(7, 1), (1, 40)]);
        assert_eq!(honest.step_count(), 41);
        assert_eq!(honest.inputs.len(), 2);
        assert_eq!(honest.outputs.len(), 2);
        let lied = build(Some(35));
        assert_eq!(lied.inputs, honest.inputs);
        assert_eq!(lied.outputs[0], honest.outputs[0]);
        assert_ne!(lied.outputs[1], honest.outputs[1], "one bit in step 35");
        // Inputs and outputs hash apart: the same values as input or output differ.
        assert_ne!(honest.inputs, honest.outputs);
    }
}
