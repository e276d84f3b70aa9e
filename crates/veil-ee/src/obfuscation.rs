//! The obfuscated mode, for public models (issue 22): noise the attacker cannot subtract, under
//! secret invertible maps.
//!
//! An exact transform of public weights can be matched against them (`attack.rs`), so against a
//! node that holds the public model it hides nothing. Following AloePri ("covariant
//! obfuscation", arXiv 2603.01499), the obfuscated model adds Gaussian noise to the embedding
//! and the head (a multiple `noise` of each matrix's own spread), which changes the model a
//! little, and hides the rest under maps that are exact in real arithmetic:
//!
//! - the norms' weights folded into the matrices that read them, and a dense random orthogonal
//!   map on the residual stream (RMSNorm keeps its value under it), in place of a permutation;
//! - a secret scale per RoPE pair, on queries and undone on keys;
//! - a secret scale per value coordinate, undone in the output projection;
//! - a secret scale per FFN unit on the up projection, undone in the down projection.
//!
//! The key's own transforms (vocabulary, FFN and KV-head permutations, value maps, RoPE-pair
//! rotations) go on top. The maps and the noise are drawn once and thrown away: the key holder
//! needs only the vocabulary permutation to talk to the model. The weights come out in F32
//! (or quantized again: the model is no longer the plaintext one, so nothing is lost).
//!
//! Written here rather than taken from a crate: these are transforms of Veil's own model files.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use rand::Rng;
use rand_distr::{Distribution, StandardNormal};
use veil_model::LlamaConfig;

use crate::error::{EeError, Result};
use crate::key::{orthogonal, refuse_inexact, KeyKind};

/// Metadata key of an obfuscated model: the noise it was made with. Its output differs from the
/// plaintext model's by design, so requests for identical output are refused on it.
pub const NOISE_KEY: &str = "veil.ee.obfuscation_noise";

/// The most noise `--obfuscate` takes, as a multiple of a matrix's own spread: far past the
/// point where the model is useless.
pub const MAX_NOISE: f32 = 8.0;

/// Secret scales are drawn log-uniformly from `[1 / SCALE_SPREAD, SCALE_SPREAD]`.
const SCALE_SPREAD: f64 = 2.0;

/// Turns the plaintext model's dense weights (GGUF names, `(out, in)`) into an obfuscated model
/// with `noise` times each of the embedding's and head's spread added to them. Exact but for the
/// noise: with `noise` 0, the model computes the plaintext function (up to F32 rounding).
pub fn obfuscate_weights(
    noise: f32,
    config: &LlamaConfig,
    weights: &mut HashMap<String, Tensor>,
    rng: &mut impl Rng,
) -> Result<()> {
    refuse_inexact(config, KeyKind::Full)?;
    if !noise.is_finite() || !(0.0..=MAX_NOISE).contains(&noise) {
        return Err(EeError::Invalid(format!(
            "obfuscation noise {noise} is out of range: give 0 to {MAX_NOISE} (times each matrix's spread; 0.5-1 is AloePri's range)"
        )));
    }
    let n = config.hidden_size;
    // The head gets its own noise, so a tied head becomes a matrix of its own.
    if !weights.contains_key("output.weight") {
        let embedding = get(weights, "token_embd.weight")?.clone();
        weights.insert("output.weight".into(), embedding);
    }

    fold_norm(weights, "output_norm.weight", &["output.weight"])?;
    for i in 0..config.block_count {
        let name = |n: &str| format!("blk.{i}.{n}.weight");
        fold_norm(
            weights,
            &name("attn_norm"),
            &[&name("attn_q"), &name("attn_k"), &name("attn_v")],
        )?;
        fold_norm(
            weights,
            &name("ffn_norm"),
            &[&name("ffn_gate"), &name("ffn_up")],
        )?;
    }

    for name in ["token_embd.weight", "output.weight"] {
        add_noise(weights, name, noise, rng)?;
    }

    // The residual stream's map: matrices reading it take Qᵀ on the right, those writing it Q
    // on the left.
    let q = Tensor::from_vec(orthogonal(n, rng), (n, n), &Device::Cpu)?;
    let qt = q.t()?.contiguous()?;
    let mut reading = vec!["token_embd.weight".to_string(), "output.weight".to_string()];
    let mut writing = Vec::new();
    for i in 0..config.block_count {
        for n in ["attn_q", "attn_k", "attn_v", "ffn_gate", "ffn_up"] {
            reading.push(format!("blk.{i}.{n}.weight"));
        }
        for n in ["attn_output", "ffn_down"] {
            writing.push(format!("blk.{i}.{n}.weight"));
        }
    }
    for name in &reading {
        let w = get(weights, name)?;
        let rotated = w.matmul(&qt)?;
        weights.insert(name.clone(), rotated);
    }
    for name in &writing {
        let w = get(weights, name)?;
        let rotated = q.matmul(w)?;
        weights.insert(name.clone(), rotated);
    }

    let (kv, d) = (config.kv_head_count, config.head_dim);
    let group = config.head_count / kv;
    for i in 0..config.block_count {
        let name = |n: &str| format!("blk.{i}.{n}.weight");
        // One scale per RoPE pair of each KV head, shared by its query group: q·k keeps its
        // value, and RoPE turns each pair as a whole, so it commutes.
        let pair: Vec<f64> = (0..kv * d / 2).map(|_| log_uniform(rng)).collect();
        let query_rows: Vec<f64> = (0..kv * group * d)
            .map(|r| pair[(r / (group * d)) * d / 2 + (r % d) / 2])
            .collect();
        let key_rows: Vec<f64> = (0..kv * d).map(|r| 1.0 / pair[r / 2]).collect();
        scale_rows(weights, &name("attn_q"), &query_rows)?;
        scale_rows(weights, &name("attn_k"), &key_rows)?;
        // One scale per value coordinate, undone in the output projection's columns.
        let value: Vec<f64> = (0..kv * d).map(|_| log_uniform(rng)).collect();
        let undo: Vec<f64> = (0..kv * group * d)
            .map(|c| 1.0 / value[(c / (group * d)) * d + c % d])
            .collect();
        scale_rows(weights, &name("attn_v"), &value)?;
        scale_columns(weights, &name("attn_output"), &undo)?;
        // One scale per FFN unit: up's rows, undone in down's columns.
        let unit: Vec<f64> = (0..config.ffn_size).map(|_| log_uniform(rng)).collect();
        let undo: Vec<f64> = unit.iter().map(|s| 1.0 / s).collect();
        scale_rows(weights, &name("ffn_up"), &unit)?;
        scale_columns(weights, &name("ffn_down"), &undo)?;
    }
    Ok(())
}

fn get<'a>(weights: &'a HashMap<String, Tensor>, name: &str) -> Result<&'a Tensor> {
    weights.get(name).ok_or_else(|| {
        EeError::Invalid(format!(
            "the model has no tensor {name}, which obfuscation transforms"
        ))
    })
}

fn log_uniform(rng: &mut impl Rng) -> f64 {
    rng.random_range(-SCALE_SPREAD.ln()..SCALE_SPREAD.ln())
        .exp()
}

fn vector(values: &[f64]) -> Result<Tensor> {
    let values: Vec<f32> = values.iter().map(|&v| v as f32).collect();
    Ok(Tensor::new(values, &Device::Cpu)?)
}

/// Multiplies the columns of each of `readers` by the norm's weights and sets them to one.
fn fold_norm(weights: &mut HashMap<String, Tensor>, norm: &str, readers: &[&str]) -> Result<()> {
    let g = get(weights, norm)?.to_dtype(DType::F32)?;
    for name in readers {
        let w = get(weights, name)?;
        let folded = w.broadcast_mul(&g.unsqueeze(0)?)?;
        weights.insert(name.to_string(), folded);
    }
    weights.insert(norm.to_string(), g.ones_like()?);
    Ok(())
}

fn add_noise(
    weights: &mut HashMap<String, Tensor>,
    name: &str,
    noise: f32,
    rng: &mut impl Rng,
) -> Result<()> {
    let w = get(weights, name)?;
    let values = w.flatten_all()?.to_vec1::<f32>()?;
    let count = values.len().max(1) as f64;
    let mean = values.iter().map(|&v| f64::from(v)).sum::<f64>() / count;
    let spread = (values
        .iter()
        .map(|&v| (f64::from(v) - mean).powi(2))
        .sum::<f64>()
        / count)
        .sqrt();
    let sigma = f64::from(noise) * spread;
    let noisy: Vec<f32> = values
        .iter()
        .map(|&v| {
            let z: f64 = StandardNormal.sample(rng);
            (f64::from(v) + sigma * z) as f32
        })
        .collect();
    let noisy = Tensor::from_vec(noisy, w.shape(), &Device::Cpu)?;
    weights.insert(name.to_string(), noisy);
    Ok(())
}

fn scale_rows(weights: &mut HashMap<String, Tensor>, name: &str, scales: &[f64]) -> Result<()> {
    let w = get(weights, name)?;
    let scaled = w.broadcast_mul(&vector(scales)?.unsqueeze(1)?)?;
    weights.insert(name.to_string(), scaled);
    Ok(())
}

fn scale_columns(weights: &mut HashMap<String, Tensor>, name: &str, scales: &[f64]) -> Result<()> {
    let w = get(weights, name)?;
    let scaled = w.broadcast_mul(&vector(scales)?.unsqueeze(0)?)?;
    weights.insert(name.to_string(), scaled);
    Ok(())
}
