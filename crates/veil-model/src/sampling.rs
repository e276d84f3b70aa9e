//! Picking the next token from logits.
//!
//! Written here rather than taken from `candle-transformers`' `LogitsProcessor` because the
//! verification protocol must replay a sampling step exactly from its seed: each step draws one
//! uniform number from a ChaCha stream and inverts the CDF of the filtered distribution, in an
//! order (descending logit, then ascending id) that a validator can reproduce from its own logits.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

use crate::error::{ModelError, Result};

/// How to pick tokens. A temperature of 0 means greedy decoding.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature; 0 picks the most likely token.
    pub temperature: f32,
    /// Keep only the `k` most likely tokens.
    pub top_k: Option<usize>,
    /// Keep the smallest set of likeliest tokens whose probability reaches `p`.
    pub top_p: Option<f32>,
    /// Seed of the random stream: the same seed gives the same tokens.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self::greedy()
    }
}

impl SamplingParams {
    /// Always the most likely token.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: 0,
        }
    }

    /// Rejects settings that make no sense.
    pub fn check(&self) -> Result<()> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(ModelError::InvalidSampling(format!(
                "temperature must be 0 or more, got {}",
                self.temperature
            )));
        }
        if self.top_k == Some(0) {
            return Err(ModelError::InvalidSampling(
                "top-k must be at least 1".into(),
            ));
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(ModelError::InvalidSampling(format!(
                    "top-p must be in (0, 1], got {p}"
                )));
            }
        }
        Ok(())
    }

    /// Whether this is greedy decoding.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }
}

/// A seeded sampler: one per generated sequence.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha20Rng,
}

impl Sampler {
    /// A sampler whose random stream starts at `params.seed`.
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.check()?;
        let rng = ChaCha20Rng::seed_from_u64(params.seed);
        Ok(Self { params, rng })
    }

    /// Whether this sampler takes the most likely token (and draws nothing at random).
    pub fn is_greedy(&self) -> bool {
        self.params.is_greedy()
    }

    /// Picks the next token from one position's logits.
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32> {
        if logits.is_empty() {
            return Err(ModelError::InvalidInput("no logits to sample from".into()));
        }
        if self.params.is_greedy() {
            return Ok(argmax(logits));
        }
        let u: f64 = self.rng.random();
        Ok(pick(&candidates(logits, &self.params), u))
    }
}

/// The most likely token; the lowest id wins a tie.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// The tokens left after top-k and top-p, likeliest first, with their normalized probabilities.
pub fn candidates(logits: &[f32], params: &SamplingParams) -> Vec<(u32, f64)> {
    let mut order: Vec<u32> = (0..logits.len() as u32).collect();
    let by_logit = |a: &u32, b: &u32| {
        logits[*b as usize]
            .total_cmp(&logits[*a as usize])
            .then(a.cmp(b))
    };
    if let Some(k) = params.top_k.filter(|&k| k < order.len()) {
        order.select_nth_unstable_by(k - 1, by_logit);
        order.truncate(k);
    }
    order.sort_unstable_by(by_logit);

    let t = f64::from(params.temperature.max(f32::MIN_POSITIVE));
    let max = f64::from(logits[order[0] as usize]);
    let mut weighted: Vec<(u32, f64)> = order
        .into_iter()
        .map(|id| (id, ((f64::from(logits[id as usize]) - max) / t).exp()))
        .collect();
    let total: f64 = weighted.iter().map(|(_, w)| w).sum();
    weighted.iter_mut().for_each(|(_, w)| *w /= total);

    if let Some(p) = params.top_p {
        let mut cumulative = 0.0;
        let keep = weighted
            .iter()
            .position(|(_, w)| {
                cumulative += w;
                cumulative >= f64::from(p)
            })
            .map_or(weighted.len(), |i| i + 1);
        weighted.truncate(keep);
        let total: f64 = weighted.iter().map(|(_, w)| w).sum();
        weighted.iter_mut().for_each(|(_, w)| *w /= total);
    }
    weighted
}

/// Inverts the CDF of `candidates` at `u` in `[0, 1)`.
pub fn pick(candidates: &[(u32, f64)], u: f64) -> u32 {
    let mut cumulative = 0.0;
    for &(id, w) in candidates {
        cumulative += w;
        if u < cumulative {
            return id;
        }
    }
    candidates.last().map_or(0, |&(id, _)| id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(
        temperature: f32,
        top_k: Option<usize>,
        top_p: Option<f32>,
        seed: u64,
    ) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p,
            seed,
        }
    }

    #[test]
    fn greedy_takes_the_max_and_the_lowest_id_on_ties() {
        let mut s = Sampler::new(SamplingParams::greedy()).unwrap();
        assert_eq!(s.sample(&[0.1, 3.0, -1.0, 3.0]).unwrap(), 1);
    }

    #[test]
    fn top_k_one_is_greedy_whatever_the_seed() {
        let logits = [0.5, 0.2, 2.0, 1.9];
        for seed in 0..20 {
            let mut s = Sampler::new(params(1.5, Some(1), None, seed)).unwrap();
            assert_eq!(s.sample(&logits).unwrap(), 2);
        }
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_p() {
        let logits = [0.0, 10.0, 9.0, -5.0];
        let c = candidates(&logits, &params(1.0, None, Some(0.5), 0));
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].0, 1);
        let c = candidates(&logits, &params(1.0, None, Some(0.99), 0));
        assert_eq!(c.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 2]);
        assert!((c.iter().map(|x| x.1).sum::<f64>() - 1.0).abs() < 1e-12);
    }

    #[test]
    fn same_seed_same_tokens_and_sampling_follows_the_distribution() {
        let logits = [1.0, 1.0, 1.0, 1.0];
        let run = |seed| {
            let mut s = Sampler::new(params(1.0, None, None, seed)).unwrap();
            (0..400)
                .map(|_| s.sample(&logits).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
        let draws = run(7);
        for id in 0..4 {
            let n = draws.iter().filter(|&&x| x == id).count();
            assert!((50..150).contains(&n), "token {id} drawn {n} times of 400");
        }
    }

    #[test]
    fn nonsense_settings_are_rejected() {
        assert!(Sampler::new(params(-1.0, None, None, 0)).is_err());
        assert!(Sampler::new(params(f32::NAN, None, None, 0)).is_err());
        assert!(Sampler::new(params(1.0, Some(0), None, 0)).is_err());
        assert!(Sampler::new(params(1.0, None, Some(0.0), 0)).is_err());
        assert!(Sampler::new(params(1.0, None, Some(1.5), 0)).is_err());
    }
}
