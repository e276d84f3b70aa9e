//! Vocabulary-matching inversion ("Hidden No More", arXiv 2505.18332): an attacker who holds
//! the public weights and sees the hidden states a node is handed (after the client's first
//! K blocks, or a permuted copy of them under EE) reads the prompt back, one position at a time.
//!
//! At position `t`, with the tokens before it already recovered, the attacker runs every
//! candidate token through the same K blocks on top of the recovered prefix and keeps the one
//! whose hidden state matches the observed one. Candidates are tried in the order the public
//! model predicts them, so a natural text is usually read within the first batch. Sorting each
//! hidden state before comparing makes the match blind to a permutation of the residual
//! stream, which is what EE's residual transform is.
//!
//! Written here rather than taken from a crate: it is an attack on Veil's own transforms, run on
//! Veil's own shards.

use veil_model::{LocalModel, ShardInput, ShardModel, TokenStep};

use crate::error::{EeError, Result};

/// How the attacker compares a candidate's hidden state with the observed one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HiddenView {
    /// Coordinate by coordinate: the node sees plaintext hidden states (a client-side split).
    Plain,
    /// As sorted values: the node sees them with the residual stream permuted (EE).
    Permuted,
}

/// The attacker's effort.
#[derive(Debug, Clone, Copy)]
pub struct InversionBudget {
    /// Most candidates run through the blocks in one pass (each holds a copy of the prefix's
    /// cache while it runs).
    pub batch: usize,
    /// Candidates tried at one position before the closest one so far is taken (at most the
    /// whole vocabulary).
    pub max_candidates: usize,
    /// A candidate matches when its L1 distance is at most this share of the observed state's
    /// L1 norm.
    pub tolerance: f32,
}

/// Candidates in a position's first pass: enough for most tokens of natural text.
const FIRST_BATCH: usize = 64;

impl Default for InversionBudget {
    fn default() -> Self {
        Self {
            batch: 256,
            max_candidates: usize::MAX,
            tolerance: 1e-3,
        }
    }
}

/// What the attack read back.
#[derive(Debug, Clone, PartialEq)]
pub struct Inversion {
    /// The recovered token at each position.
    pub tokens: Vec<u32>,
    /// Positions where a candidate matched within the tolerance.
    pub matched: usize,
    /// Candidates run through the blocks, over all positions.
    pub candidates_tried: usize,
}

impl Inversion {
    /// Share of positions recovered right, against the true tokens.
    pub fn recovered(&self, truth: &[u32]) -> f64 {
        let right = self
            .tokens
            .iter()
            .zip(truth)
            .filter(|(a, b)| a == b)
            .count();
        right as f64 / truth.len().max(1) as f64
    }
}

/// Reads the tokens behind `observed` (one hidden state per position, each `hidden_size` wide)
/// with the public model: `blocks` is its embedding and first K blocks (no head), `public` the
/// whole model, which orders the candidates. Position 0 has no prefix to predict from; its
/// candidates go in id order, where a byte-pair vocabulary keeps its most frequent pieces first.
pub fn invert_hidden_states(
    blocks: &ShardModel,
    public: &LocalModel,
    observed: &[Vec<f32>],
    view: HiddenView,
    budget: InversionBudget,
) -> Result<Inversion> {
    let vocab = public.config.vocab_size;
    if budget.batch == 0 || budget.max_candidates == 0 {
        return Err(EeError::Model(veil_model::ModelError::InvalidInput(
            "the attack needs a batch and a candidate budget of at least 1".into(),
        )));
    }
    let width = public.config.hidden_size;
    if let Some(bad) = observed.iter().find(|row| row.len() != width) {
        return Err(EeError::Model(veil_model::ModelError::InvalidInput(
            format!(
                "an observed hidden state of {} values, but the model's are {width} wide",
                bad.len()
            ),
        )));
    }
    let mut prefix = blocks.new_cache();
    let mut predictor = public.session();
    let mut next_logits: Option<Vec<f32>> = None;
    let mut result = Inversion {
        tokens: Vec::with_capacity(observed.len()),
        matched: 0,
        candidates_tried: 0,
    };
    for (position, target) in observed.iter().enumerate() {
        let target = view.canonical(target);
        let norm: f32 = target.iter().map(|x| x.abs()).sum();
        let order = candidate_order(next_logits.as_deref(), vocab);
        let mut best = (f32::INFINITY, order[0]);
        let mut found = false;
        // Batches grow fourfold up to the budget's: most positions are read in the first.
        let candidates = &order[..budget.max_candidates.min(vocab)];
        let (mut start, mut size) = (0, budget.batch.min(FIRST_BATCH));
        while start < candidates.len() {
            let batch = &candidates[start..(start + size).min(candidates.len())];
            start += batch.len();
            size = (size * 4).min(budget.batch);
            let mut caches = batch
                .iter()
                .map(|_| prefix.copy_prefix_growing(prefix.position(), 1))
                .collect::<veil_model::Result<Vec<_>>>()?;
            let mut refs: Vec<_> = caches.iter_mut().collect();
            let hidden = blocks
                .forward_batch(ShardInput::Tokens(batch), &mut refs, &vec![1; batch.len()])?
                .to_vec2::<f32>()?;
            result.candidates_tried += batch.len();
            for (row, &token) in hidden.iter().zip(batch) {
                let distance: f32 = view
                    .canonical(row)
                    .iter()
                    .zip(&target)
                    .map(|(a, b)| (a - b).abs())
                    .sum();
                if distance < best.0 {
                    best = (distance, token);
                }
            }
            if best.0 <= budget.tolerance * norm {
                found = true;
                break;
            }
        }
        let token = best.1;
        result.matched += usize::from(found);
        result.tokens.push(token);
        blocks.forward(
            ShardInput::Tokens(&[token]),
            &mut prefix,
            veil_model::LogitsAt::Last,
        )?;
        // The next position's candidates, if there is one.
        if position + 1 < observed.len() {
            next_logits = Some(predictor.step(&[token])?);
        }
    }
    Ok(result)
}

/// The hidden states a node is handed for a prompt: `ids` (plaintext ids for `blocks` of the
/// public model, or encrypted ids for the encrypted model's) run through `blocks` in one pass.
pub fn hidden_states_seen(blocks: &ShardModel, ids: &[u32]) -> Result<Vec<Vec<f32>>> {
    let mut cache = blocks.new_cache();
    Ok(blocks
        .forward(
            ShardInput::Tokens(ids),
            &mut cache,
            veil_model::LogitsAt::All,
        )?
        .to_vec2::<f32>()?)
}

impl HiddenView {
    /// The form compared: as is, or sorted.
    fn canonical(self, hidden: &[f32]) -> Vec<f32> {
        let mut v = hidden.to_vec();
        if self == HiddenView::Permuted {
            v.sort_by(f32::total_cmp);
        }
        v
    }
}

/// Token ids, most likely first under `logits` (id order without them).
fn candidate_order(logits: Option<&[f32]>, vocab: usize) -> Vec<u32> {
    let mut order: Vec<u32> = (0..vocab as u32).collect();
    if let Some(logits) = logits {
        order.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sorting_makes_the_comparison_blind_to_a_permutation() {
        let state = [0.5f32, -2.0, 3.0, 0.25];
        let permuted = [3.0f32, 0.25, 0.5, -2.0];
        assert_eq!(
            HiddenView::Permuted.canonical(&state),
            HiddenView::Permuted.canonical(&permuted)
        );
        assert_ne!(
            HiddenView::Plain.canonical(&state),
            HiddenView::Plain.canonical(&permuted)
        );
    }

    #[test]
    fn candidates_go_most_likely_first() {
        assert_eq!(
            candidate_order(Some(&[0.1, 2.0, -1.0, 0.5]), 4),
            [1, 3, 0, 2]
        );
        assert_eq!(candidate_order(None, 3), [0, 1, 2]);
    }
}
