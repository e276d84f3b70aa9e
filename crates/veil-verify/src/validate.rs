//! Validation by recomputation: one teacher-forced prefill over prompt and claimed answer.
//!
//! The validator feeds `prompt + output[..n-1]` through its own copy of the model in one pass,
//! then checks, token by token, (a) the commitment against its own final hidden states and (b)
//! the sampling: the claimed token must be the one the shared seed picks from the validator's
//! logits (for greedy, within δ of the best logit), allowing for near-ties. The verdict names the
//! first token that fails and why.

use half::f16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use serde::{Deserialize, Serialize};
use veil_model::sampling::{argmax, candidates, pick};
use veil_model::{forward_chain_final_hidden, LogitsAt, SamplingParams, ShardModel};

use crate::commitment::{
    chunk_digest, top_k_indices, ActivationCommitment, CommitmentMode, CHUNK_TOKENS, TOP_K,
};
use crate::error::{Result, VerifyError};

/// Answer positions whose logits a validator holds at once.
const LOGIT_CHUNK: usize = 256;

/// How far an honest recomputation may stray. Calibrated on the real model (see the README's
/// verification section and `veil verify calibrate`): honest runs across thread counts, prefill
/// batch sizes and generator/validator pairs stay more than 10× inside every bound, and every
/// misbehaviour exceeds one.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Tolerances {
    /// Mean absolute error of the committed values, over the chunk's mean committed magnitude.
    pub hidden_mean: f32,
    /// Largest absolute error of one committed value, over the chunk's mean committed magnitude.
    pub hidden_max: f32,
    /// How far below the validator's k-th largest magnitude a committed entry may fall
    /// (as a share of it): the committed positions must really be the top ones.
    pub rank_slack: f32,
    /// δ: how far below the validator's best logit a claimed token's logit may be, for greedy
    /// decoding and at near-ties of seeded sampling.
    pub logit_delta: f32,
    /// How close the seed's uniform draw may fall to the claimed token's interval of the
    /// validator's distribution and still count.
    pub probability_slack: f64,
}

impl Default for Tolerances {
    fn default() -> Self {
        Self {
            hidden_mean: 0.002,
            hidden_max: 0.02,
            rank_slack: 0.05,
            logit_delta: 0.05,
            probability_slack: 0.001,
        }
    }
}

/// How an answer was sampled, in a form that travels (the verifier replays it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingSpec {
    /// Softmax temperature; 0 is greedy.
    pub temperature: f32,
    /// Top-k filter.
    pub top_k: Option<u32>,
    /// Top-p filter.
    pub top_p: Option<f32>,
    /// The shared seed of the random stream.
    pub seed: u64,
}

impl From<&SamplingParams> for SamplingSpec {
    fn from(p: &SamplingParams) -> Self {
        Self {
            temperature: p.temperature,
            top_k: p.top_k.map(|k| k as u32),
            top_p: p.top_p,
            seed: p.seed,
        }
    }
}

impl SamplingSpec {
    /// The sampler settings, checked.
    pub fn params(&self) -> Result<SamplingParams> {
        let p = SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k.map(|k| k as usize),
            top_p: self.top_p,
            seed: self.seed,
        };
        p.check()?;
        Ok(p)
    }
}

/// What a generating node says it did: this prompt gave this answer, with these activations.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Claim {
    /// The prompt's token ids.
    pub prompt: Vec<u32>,
    /// The generated token ids.
    pub output: Vec<u32>,
    /// How tokens were picked.
    pub sampling: SamplingSpec,
    /// The final hidden states behind `output`.
    pub commitment: ActivationCommitment,
}

/// Pass, or the first token that fails and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    /// Every check held.
    Pass,
    /// A check failed.
    Fail {
        /// Index into the answer of the first failing token (a chunk's first token for a
        /// commitment failure).
        token: usize,
        /// For people.
        reason: String,
    },
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Verdict::Pass => f.write_str("pass"),
            Verdict::Fail { token, reason } => write!(f, "fail at token {token}: {reason}"),
        }
    }
}

impl Verdict {
    /// Whether the answer passed.
    pub fn passed(&self) -> bool {
        matches!(self, Self::Pass)
    }
}

/// The largest deviations a validation saw, in the units of [`Tolerances`]: what calibration
/// reads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Deviations {
    /// Largest chunk mean error.
    pub hidden_mean: f32,
    /// Largest single-value error.
    pub hidden_max: f32,
    /// Largest shortfall of a committed entry below the validator's k-th magnitude.
    pub rank: f32,
    /// Largest gap between the best logit and a claimed token's (greedy), or between the
    /// seed's pick and the claimed token at a mismatch (sampled).
    pub logit_gap: f32,
    /// Exact mode: chunks whose digest differs from the validator's.
    #[serde(default)]
    pub digest_mismatches: u32,
}

impl Deviations {
    /// The largest figure as a multiple of its tolerance: below 1 passes every check.
    pub fn over(&self, tol: &Tolerances) -> f32 {
        if self.digest_mismatches > 0 {
            return f32::INFINITY;
        }
        [
            self.hidden_mean / tol.hidden_mean,
            self.hidden_max / tol.hidden_max,
            self.rank / tol.rank_slack,
            self.logit_gap / tol.logit_delta,
        ]
        .into_iter()
        .fold(0.0, f32::max)
    }

    /// The larger of each figure.
    pub fn max(self, other: Self) -> Self {
        Self {
            hidden_mean: self.hidden_mean.max(other.hidden_mean),
            hidden_max: self.hidden_max.max(other.hidden_max),
            rank: self.rank.max(other.rank),
            logit_gap: self.logit_gap.max(other.logit_gap),
            digest_mismatches: self.digest_mismatches.max(other.digest_mismatches),
        }
    }
}

/// A validation's outcome.
#[derive(Debug, Clone, PartialEq)]
pub struct Validation {
    /// Pass or fail.
    pub verdict: Verdict,
    /// What it measured, for calibration.
    pub deviations: Deviations,
    /// Answer tokens recomputed: all of them for an answer that passes, up to the chunk where
    /// it went wrong for one that fails.
    pub recomputed: usize,
}

/// Recomputes `claim` on `shards` (a chain covering the whole model, in the claimed weight
/// format) and checks it: bit for bit for an exact commitment (which needs shards that are
/// [`ShardModel::bit_reproducible`]; others refuse it), within `tol` for a tolerant one.
pub fn validate(shards: &[ShardModel], claim: &Claim, tol: &Tolerances) -> Result<Validation> {
    let config = shards
        .first()
        .ok_or_else(|| VerifyError::InvalidClaim("no model to validate with".into()))?
        .config();
    let (p, n) = (claim.prompt.len(), claim.output.len());
    if p == 0 || n == 0 {
        return Err(VerifyError::InvalidClaim(
            "the prompt and the answer must each hold at least one token".into(),
        ));
    }
    if p + n - 1 > config.context_length {
        return Err(VerifyError::InvalidClaim(format!(
            "{} tokens do not fit the model's context of {}",
            p + n - 1,
            config.context_length
        )));
    }
    if let Some(bad) = claim
        .prompt
        .iter()
        .chain(&claim.output)
        .find(|&&t| t as usize >= config.vocab_size)
    {
        return Err(VerifyError::InvalidClaim(format!(
            "token {bad} is outside the vocabulary of {}",
            config.vocab_size
        )));
    }
    let sampling = claim.sampling.params()?;
    let h = config.hidden_size;
    claim.commitment.check(h, n)?;
    let exact = claim.commitment.mode() == CommitmentMode::Exact;
    if exact && !shards.iter().all(ShardModel::bit_reproducible) {
        return Err(VerifyError::CannotReproduce(format!(
            "the claim commits exactly, but this validator runs {} through kernels that are \
             not bit-reproducible (exact mode needs Veil's kernels on quantized weights)",
            shards[0].format()
        )));
    }
    // Exact mode recomputes the generator's logits bit for bit: no slack in the sampling.
    let (logit_delta, probability_slack) = if exact {
        (0.0, 0.0)
    } else {
        (tol.logit_delta, tol.probability_slack)
    };

    let input: Vec<u32> = claim
        .prompt
        .iter()
        .chain(&claim.output[..n - 1])
        .copied()
        .collect();
    let mut deviations = Deviations::default();
    let mut first_fail: Option<(usize, String)> = None;

    // Logits for at most LOGIT_CHUNK answer positions at a time: a long answer costs its
    // hidden states (n × hidden), not n × vocabulary floats of logits. The prefill runs in the
    // same pieces, which Veil's batch-invariant kernels and attention allow.
    let mut caches: Vec<_> = shards.iter().map(ShardModel::new_cache).collect();
    let mut hidden: Vec<f32> = Vec::with_capacity(n * h);
    let mut rng = ChaCha20Rng::seed_from_u64(sampling.seed);
    let (mut fed, mut checked) = (0, 0);
    let chunks_total = n.div_ceil(CHUNK_TOKENS);
    let mut next_chunk = 0;
    while checked < n {
        let k = (n - checked).min(LOGIT_CHUNK);
        let end = p - 1 + checked + k;
        let first_logit = p - 1 + checked - fed;
        let (logits, states) = forward_chain_final_hidden(
            shards,
            &mut caches,
            &input[fed..end],
            LogitsAt::From(first_logit),
        )?;
        hidden.extend(
            states
                .narrow(0, first_logit, k)?
                .flatten_all()?
                .to_vec1::<f32>()?,
        );
        let logits = logits.to_vec2::<f32>()?;
        let tokens = &claim.output[checked..checked + k];
        for (j, (row, &token)) in logits.iter().zip(tokens).enumerate() {
            let i = checked + j;
            let best = argmax(row);
            let gap = row[best as usize] - row[token as usize];
            if sampling.is_greedy() {
                deviations.logit_gap = deviations.logit_gap.max(gap);
                if gap > logit_delta {
                    fail(&mut first_fail, i, format!("greedy token {token} has logit {:.3}, {gap:.3} below the best (token {best}); δ is {}", row[token as usize], logit_delta));
                }
                continue;
            }
            let u: f64 = rng.random();
            let cands = candidates(row, &sampling);
            let picked = pick(&cands, u);
            if picked == token {
                continue;
            }
            let near_tie = (row[picked as usize] - row[token as usize]).abs();
            deviations.logit_gap = deviations.logit_gap.max(near_tie);
            let near_edge = interval(&cands, token)
                .is_some_and(|(lo, hi)| u >= lo - probability_slack && u < hi + probability_slack);
            if !near_edge && near_tie > logit_delta {
                fail(&mut first_fail, i, format!("the seed picks token {picked} from the validator's distribution, not the claimed {token} (logits {:.3} vs {:.3})", row[picked as usize], row[token as usize]));
            }
        }
        fed = end;
        checked += k;
        // The commitment's chunks whose tokens are all in, checked now: once anything fails,
        // nothing later can fail earlier, so a bad answer costs its judge no more than the
        // chunk where it goes wrong (a stranger's 8,191-token junk costs one chunk).
        let covered = if checked == n {
            chunks_total
        } else {
            checked / CHUNK_TOKENS
        };
        while next_chunk < covered {
            check_commitment_chunk(
                claim,
                next_chunk,
                &hidden,
                h,
                n,
                tol,
                &mut deviations,
                &mut first_fail,
            );
            next_chunk += 1;
        }
        if first_fail.is_some() {
            break;
        }
    }

    Ok(Validation {
        verdict: match first_fail {
            None => Verdict::Pass,
            Some((token, reason)) => Verdict::Fail { token, reason },
        },
        deviations,
        recomputed: checked,
    })
}

/// Keeps the earliest failure.
fn fail(first_fail: &mut Option<(usize, String)>, token: usize, reason: String) {
    if first_fail.as_ref().is_none_or(|(t, _)| token < *t) {
        *first_fail = Some((token, reason));
    }
}

/// Checks chunk `c` of the claim's commitment (exact digest, or tolerant sampled activations)
/// against the validator's final hidden states `hidden` (`h` wide, at least up to the chunk's
/// end).
#[allow(clippy::too_many_arguments)]
fn check_commitment_chunk(
    claim: &Claim,
    c: usize,
    hidden: &[f32],
    h: usize,
    n: usize,
    tol: &Tolerances,
    deviations: &mut Deviations,
    first_fail: &mut Option<(usize, String)>,
) {
    let start = c * CHUNK_TOKENS;
    if let Some(digest) = claim
        .commitment
        .exact
        .as_ref()
        .and_then(|e| e.digests.get(c))
    {
        let end = (start + CHUNK_TOKENS).min(n);
        if chunk_digest(c, &hidden[start * h..end * h]) != *digest {
            deviations.digest_mismatches += 1;
            fail(
                first_fail,
                start,
                format!(
                    "tokens {start}..{end}: the final hidden states differ from the committed \
                     ones (exact mode: any difference fails)"
                ),
            );
        }
    }
    let Some(chunk) = claim.commitment.chunks.get(c) else {
        return;
    };
    let end = start + chunk.tokens as usize;
    let d = compare_chunk(&hidden[start * h..end * h], &chunk.indices, &chunk.values);
    *deviations = deviations.max(d);
    if d.hidden_mean > tol.hidden_mean {
        fail(first_fail, start, format!("tokens {start}..{end}: committed activations are off by {:.4} on average (tolerance {})", d.hidden_mean, tol.hidden_mean));
    } else if d.hidden_max > tol.hidden_max {
        fail(
            first_fail,
            start,
            format!(
                "tokens {start}..{end}: a committed activation is off by {:.4} (tolerance {})",
                d.hidden_max, tol.hidden_max
            ),
        );
    } else if d.rank > tol.rank_slack {
        fail(first_fail, start, format!("tokens {start}..{end}: committed positions are not the largest activations (short by {:.3}, tolerance {})", d.rank, tol.rank_slack));
    }
}

/// The claimed entries of one chunk against the validator's hidden states for it.
fn compare_chunk(ours: &[f32], indices: &[u16], values: &[u16]) -> Deviations {
    let mut sum_err = 0.0f32;
    let mut max_err = 0.0f32;
    let mut sum_mag = 0.0f32;
    let mut smallest = f32::INFINITY;
    for (&i, &v) in indices.iter().zip(values) {
        let theirs = f16::from_bits(v).to_f32();
        let mine = ours[i as usize];
        let err = (theirs - mine).abs();
        sum_err += err;
        max_err = max_err.max(err);
        sum_mag += mine.abs();
        smallest = smallest.min(mine.abs());
    }
    let k = indices.len().max(1) as f32;
    let scale = (sum_mag / k).max(f32::MIN_POSITIVE);
    let kth = top_k_indices(ours, TOP_K)
        .into_iter()
        .map(|i| ours[i].abs())
        .fold(f32::INFINITY, f32::min);
    Deviations {
        hidden_mean: sum_err / k / scale,
        hidden_max: max_err / scale,
        rank: if kth > 0.0 {
            (1.0 - smallest / kth).max(0.0)
        } else {
            0.0
        },
        logit_gap: 0.0,
        digest_mismatches: 0,
    }
}

/// Where `token`'s probability mass sits in the CDF the sampler inverts.
fn interval(cands: &[(u32, f64)], token: u32) -> Option<(f64, f64)> {
    let mut lo = 0.0;
    for &(id, p) in cands {
        if id == token {
            return Some((lo, lo + p));
        }
        lo += p;
    }
    None
}
