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

/// What the adaptive attack on an obfuscated model recovered.
#[derive(Debug, Clone, PartialEq)]
pub struct ObfuscatedMatch {
    /// For each encrypted id asked about, the plaintext id the attacker reads it as.
    pub guesses: Vec<(u32, u32)>,
    /// Gate rows whose norms paired them with a public row unambiguously (over
    /// [`GATES_READ`] blocks).
    pub rows_paired: usize,
}

impl ObfuscatedMatch {
    /// Share of the guesses that are right under `key`.
    pub fn score(&self, key: &EeKey) -> f64 {
        let inv_vocab = crate::key::inverse(&key.vocab);
        let right = self
            .guesses
            .iter()
            .filter(|(enc, guess)| inv_vocab.get(*enc as usize) == Some(guess))
            .count();
        right as f64 / self.guesses.len().max(1) as f64
    }
}

/// The weights the attack on an obfuscated model reads, from a public or an obfuscated file.
#[derive(Debug)]
pub struct ResidualView {
    /// The embedding, `(vocab, hidden)`.
    pub embedding: Tensor,
    /// The head with the final norm folded in, `(vocab, hidden)`.
    pub head: Tensor,
    /// The first blocks' FFN gates (up to [`GATES_READ`]) with their norms folded in, each
    /// `(ffn, hidden)`: every one sees the same residual map.
    pub gates: Vec<Tensor>,
}

/// Blocks whose gates the attack pairs rows from: one usually pairs enough rows by norm, more
/// make the least squares sturdier.
pub const GATES_READ: usize = 4;

impl ResidualView {
    /// Reads the three matrices from a GGUF (a tied head is the embedding).
    pub fn read(gguf: &mut veil_model::GgufFile) -> Result<Self> {
        let blocks = veil_model::LlamaConfig::from_gguf(gguf)?.block_count;
        let mut dense =
            |name: &str| -> Result<Tensor> { Ok(gguf.tensor(name)?.dequantize(&Device::Cpu)?) };
        let embedding = dense("token_embd.weight")?;
        let head = match dense("output.weight") {
            Ok(head) => head,
            Err(_) => embedding.clone(),
        };
        let fold =
            |w: Tensor, g: Tensor| -> Result<Tensor> { Ok(w.broadcast_mul(&g.unsqueeze(0)?)?) };
        let head = fold(head, dense("output_norm.weight")?)?;
        let gates = (0..blocks.min(GATES_READ))
            .map(|i| {
                fold(
                    dense(&format!("blk.{i}.ffn_gate.weight"))?,
                    dense(&format!("blk.{i}.ffn_norm.weight"))?,
                )
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            embedding,
            head,
            gates,
        })
    }
}

/// The adaptive attack on the obfuscated mode, by an attacker who knows how it is built: every
/// map on the residual stream is orthogonal and the FFN gate's rows are only permuted (SiLU
/// admits no scale), so each gate row keeps its norm. Norms pair the obfuscated gate's rows
/// with the public ones, least squares over the pairs gives the residual map, and with it
/// undone each obfuscated embedding and head row is read as its nearest public token (both
/// distances, each over its matrix's spread). Only the noise stands in the way.
///
/// `encrypted_ids`: the rows to read (for example the ids of a text the node served).
pub fn match_obfuscated(
    public: &ResidualView,
    obfuscated: &ResidualView,
    encrypted_ids: &[u32],
) -> Result<ObfuscatedMatch> {
    // Paired rows, public and obfuscated, over the blocks read.
    let (mut pub_rows, mut obf_rows) = (Vec::new(), Vec::new());
    for (p, o) in public.gates.iter().zip(&obfuscated.gates) {
        let (p, o) = (p.to_vec2::<f32>()?, o.to_vec2::<f32>()?);
        for (i, j) in pair_by_norm(&p, &o) {
            pub_rows.push(p[i].clone());
            obf_rows.push(o[j].clone());
        }
    }
    let (paired, n) = (pub_rows.len(), public.embedding.dim(1)?);
    if paired < n {
        return Err(crate::EeError::Invalid(format!(
            "only {paired} gate rows pair by norm, fewer than the {n} the residual map needs"
        )));
    }
    // obf ≈ pub · M over the pairs: M = (AᵀA)⁻¹ Aᵀ B, in f64.
    let a = nalgebra::DMatrix::<f64>::from_fn(paired, n, |r, c| f64::from(pub_rows[r][c]));
    let b = nalgebra::DMatrix::<f64>::from_fn(paired, n, |r, c| f64::from(obf_rows[r][c]));
    let map = (a.transpose() * &a)
        .cholesky()
        .ok_or_else(|| {
            crate::EeError::Invalid("the paired gate rows do not span the residual stream".into())
        })?
        .solve(&(a.transpose() * b));
    let undo = map
        .try_inverse()
        .ok_or_else(|| crate::EeError::Invalid("the recovered residual map is singular".into()))?;
    let undo: Vec<f32> = (0..n)
        .flat_map(|r| (0..n).map(move |c| (r, c)))
        .map(|(r, c)| undo[(r, c)] as f32)
        .collect();
    let undo = Tensor::from_vec(undo, (n, n), &Device::Cpu)?;

    let ids = Tensor::new(encrypted_ids, &Device::Cpu)?;
    let mut total: Option<Tensor> = None;
    for (pub_m, obf_m) in [
        (&public.embedding, &obfuscated.embedding),
        (&public.head, &obfuscated.head),
    ] {
        let seen = obf_m.index_select(&ids, 0)?.matmul(&undo)?;
        let distances = squared_distances(&seen, pub_m)?;
        let spread = pub_m
            .flatten_all()?
            .var(0)?
            .to_scalar::<f32>()?
            .max(f32::MIN_POSITIVE);
        let scaled = (distances / f64::from(spread))?;
        total = Some(match total {
            Some(t) => (t + scaled)?,
            None => scaled,
        });
    }
    let nearest = total
        .expect("two matrices")
        .argmin_keepdim(1)?
        .flatten_all()?
        .to_vec1::<u32>()?;
    Ok(ObfuscatedMatch {
        guesses: encrypted_ids.iter().copied().zip(nearest).collect(),
        rows_paired: paired,
    })
}

/// `(rows, vocab)`: squared L2 distance from each row of `seen` to each row of `public`.
fn squared_distances(seen: &Tensor, public: &Tensor) -> Result<Tensor> {
    let cross = seen.matmul(&public.t()?)?;
    let seen_sq = seen.sqr()?.sum_keepdim(1)?;
    let public_sq = public.sqr()?.sum_keepdim(1)?.t()?;
    Ok(cross
        .affine(-2.0, 0.0)?
        .broadcast_add(&seen_sq)?
        .broadcast_add(&public_sq)?)
}

/// Pairs public and obfuscated rows of equal norm (rank by rank), keeping only pairs whose norm
/// stands apart from its neighbours' in both lists (1e-4 relative), so a near tie never pairs
/// the wrong rows.
fn pair_by_norm(public: &[Vec<f32>], obfuscated: &[Vec<f32>]) -> Vec<(usize, usize)> {
    let sorted = |rows: &[Vec<f32>]| {
        let mut norms: Vec<(f64, usize)> = rows
            .iter()
            .enumerate()
            .map(|(i, r)| {
                (
                    r.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt(),
                    i,
                )
            })
            .collect();
        norms.sort_by(|a, b| a.0.total_cmp(&b.0));
        norms
    };
    let (p, o) = (sorted(public), sorted(obfuscated));
    if p.len() != o.len() {
        return Vec::new();
    }
    let apart = |v: &[(f64, usize)], i: usize| {
        let gap = |j: usize| (v[i].0 - v[j].0).abs() > 1e-4 * v[i].0;
        (i == 0 || gap(i - 1)) && (i + 1 == v.len() || gap(i + 1))
    };
    (0..p.len())
        .filter(|&i| apart(&p, i) && apart(&o, i) && (p[i].0 - o[i].0).abs() <= 1e-5 * p[i].0)
        .map(|i| (p[i].1, o[i].1))
        .collect()
}
