//! Attacks shipped with the scheme, so its leakage is measured rather than assumed.
//!
//! Weight matching: any exact transform of public weights can be matched against them. A
//! permutation of the residual stream leaves each embedding row's multiset of values unchanged,
//! so sorting every row gives a fingerprint that finds the row's plaintext token (the vocabulary
//! permutation); with rows paired, each column's sorted values find its plaintext coordinate (the
//! residual permutation).

use std::collections::HashMap;

use candle_core::{Device, Tensor};

use crate::error::Result;
use crate::key::EeKey;

/// What the weight-matching attack recovered.
#[derive(Debug, Clone, PartialEq)]
pub struct WeightMatch {
    /// Recovered guess: encrypted token id to plaintext token id (`None` where ambiguous).
    pub vocab_guess: Vec<Option<u32>>,
    /// Recovered guess: encrypted coordinate to plaintext coordinate.
    pub hidden_guess: Vec<Option<u32>>,
}

impl WeightMatch {
    /// Share of vocabulary entries and residual coordinates the guess gets right under `key`.
    pub fn score(&self, key: &EeKey) -> (f64, f64) {
        let inv_vocab = crate::key::inverse(&key.vocab);
        let vocab = share(&self.vocab_guess, |enc| inv_vocab.get(enc).copied());
        let hidden = share(&self.hidden_guess, |enc| key.hidden.get(enc).copied());
        (vocab, hidden)
    }
}

fn share(guess: &[Option<u32>], truth: impl Fn(usize) -> Option<u32>) -> f64 {
    let right = guess
        .iter()
        .enumerate()
        .filter(|(i, g)| g.is_some() && **g == truth(*i))
        .count();
    right as f64 / guess.len().max(1) as f64
}

/// Matches an encrypted embedding `(vocab, hidden)` against the public one.
pub fn match_embeddings(public: &Tensor, encrypted: &Tensor) -> Result<WeightMatch> {
    let public = public.to_device(&Device::Cpu)?.to_vec2::<f32>()?;
    let encrypted = encrypted.to_device(&Device::Cpu)?.to_vec2::<f32>()?;
    let vocab_guess = match_sorted(&public, &encrypted);

    // Columns, restricted to rows whose plaintext partner is known.
    let pairs: Vec<(usize, usize)> = vocab_guess
        .iter()
        .enumerate()
        .filter_map(|(enc, g)| g.map(|p| (enc, p as usize)))
        .collect();
    let width = public.first().map_or(0, Vec::len);
    let column = |rows: &[Vec<f32>], c: usize, pick: fn(&(usize, usize)) -> usize| -> Vec<f32> {
        pairs.iter().map(|pair| rows[pick(pair)][c]).collect()
    };
    let public_cols: Vec<Vec<f32>> = (0..width).map(|c| column(&public, c, |p| p.1)).collect();
    let enc_cols: Vec<Vec<f32>> = (0..width).map(|c| column(&encrypted, c, |p| p.0)).collect();
    // With rows aligned, a column matches exactly, not just as a multiset.
    let hidden_guess = match_exact(&public_cols, &enc_cols);
    Ok(WeightMatch {
        vocab_guess,
        hidden_guess,
    })
}

/// For each encrypted vector, the public vector with the same sorted values, if unique.
fn match_sorted(public: &[Vec<f32>], encrypted: &[Vec<f32>]) -> Vec<Option<u32>> {
    let key = |v: &[f32]| {
        let mut s: Vec<u32> = v.iter().map(|x| x.to_bits()).collect();
        s.sort_unstable();
        s
    };
    index_and_look_up(public, encrypted, key)
}

fn match_exact(public: &[Vec<f32>], encrypted: &[Vec<f32>]) -> Vec<Option<u32>> {
    index_and_look_up(public, encrypted, |v| {
        v.iter().map(|x| x.to_bits()).collect()
    })
}

fn index_and_look_up(
    public: &[Vec<f32>],
    encrypted: &[Vec<f32>],
    key: impl Fn(&[f32]) -> Vec<u32>,
) -> Vec<Option<u32>> {
    let mut index: HashMap<Vec<u32>, Option<u32>> = HashMap::new();
    for (i, v) in public.iter().enumerate() {
        index
            .entry(key(v))
            .and_modify(|slot| *slot = None) // duplicates are ambiguous
            .or_insert(Some(i as u32));
    }
    encrypted
        .iter()
        .map(|v| index.get(&key(v)).copied().flatten())
        .collect()
}
