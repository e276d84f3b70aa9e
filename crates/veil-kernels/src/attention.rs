//! Causal attention, one query at a time, in one fixed order.
//!
//! candle's matmul and softmax sum in orders that depend on how many queries and keys a call
//! holds (a whole prompt, a chunk, one decoded token), and 8-bit activations turn those last-bit
//! differences into different answers: a prompt run in chunks, or drafts checked in one pass,
//! would not answer like the prompt run at once. Here each query's scores, softmax and
//! weighted sum of values are computed the same way whatever else is in the call, so every way
//! of grouping positions gives the same bits.

use std::sync::{Mutex, PoisonError};

use crate::error::KernelError;
use crate::Isa;

/// The sizes of one attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads; each serves `heads / kv_heads` query heads next to each other.
    pub kv_heads: usize,
    /// Values per head.
    pub head_dim: usize,
    /// Queries in this call, at positions `start..start + tokens`.
    pub tokens: usize,
    /// Position of the first query.
    pub start: usize,
    /// Positions between one key/value head and the next in the key and value storage.
    pub key_capacity: usize,
    /// A sliding window: query at position `p` sees only keys `p + 1 - window ..= p` (Gemma's
    /// local layers); `None` sees every earlier key.
    pub window: Option<usize>,
}

impl AttentionShape {
    fn check(&self, q: usize, keys: usize, values: usize, out: usize) -> Result<(), KernelError> {
        let bad = |why: String| Err(KernelError::Shape(why));
        if self.heads == 0
            || self.kv_heads == 0
            || self.head_dim == 0
            || self.tokens == 0
            || self.window == Some(0)
        {
            return bad(format!("empty attention: {self:?}"));
        }
        if !self.heads.is_multiple_of(self.kv_heads) {
            return bad(format!(
                "{} query heads do not split over {} key/value heads",
                self.heads, self.kv_heads
            ));
        }
        if self.start + self.tokens > self.key_capacity {
            return bad(format!(
                "queries reach position {} but the cache holds {}",
                self.start + self.tokens,
                self.key_capacity
            ));
        }
        let per_call = self.heads * self.tokens * self.head_dim;
        let cache = self.kv_heads * self.key_capacity * self.head_dim;
        if q != per_call || out != per_call || keys != cache || values != cache {
            return bad(format!(
                "queries {q} and output {out} must hold {per_call} values, keys {keys} and values {values} must hold {cache}"
            ));
        }
        Ok(())
    }
}

/// Causal attention: query `t` (position `start + t`) attends to keys `0..=start + t`, or to
/// the last `window` of them.
///
/// `q` is `(heads, tokens, head_dim)`, `keys` and `values` `(kv_heads, key_capacity,
/// head_dim)`, and `out` receives `(tokens, heads, head_dim)`, the layout the output
/// projection takes.
pub fn causal_attention(
    shape: &AttentionShape,
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    out: &mut [f32],
) -> Result<(), KernelError> {
    shape.check(q.len(), keys.len(), values.len(), out.len())?;
    let AttentionShape {
        heads,
        kv_heads,
        head_dim: dim,
        tokens,
        start,
        key_capacity,
        window,
    } = *shape;
    let group = heads / kv_heads;
    let scale = 1.0 / (dim as f32).sqrt();
    let avx2 = Isa::best() != Isa::Scalar;
    let row = |r: usize, out: &mut [f32], scores: &mut Vec<f32>| {
        let (t, h) = (r / heads, r % heads);
        let head = h / group * key_capacity * dim;
        let seen = start + t + 1;
        let first = window.map_or(0, |w| seen.saturating_sub(w));
        let query = &q[(h * tokens + t) * dim..][..dim];
        let span = head + first * dim..head + seen * dim;
        let (keys, values) = (&keys[span.clone()], &values[span]);
        #[cfg(target_arch = "x86_64")]
        if avx2 {
            // SAFETY: `Isa::best` found AVX2 on this CPU.
            unsafe { one_query_avx2(query, keys, values, scale, scores, out) };
            return;
        }
        let _ = avx2;
        one_query(query, keys, values, scale, scores, out);
    };
    // Later queries see more keys, so rows are dealt out in turn rather than in halves.
    let pool = candle_core::utils::barrier_pool();
    let parts = crate::threads::parts(pool.n_workers() + 1);
    let work = heads * tokens * (start + tokens) * dim / 16;
    if parts == 1 || work < SERIAL_WORK {
        let mut scores = Vec::with_capacity(start + tokens);
        for (r, out) in out.chunks_exact_mut(dim).enumerate() {
            row(r, out, &mut scores);
        }
        return Ok(());
    }
    let mut dealt: Vec<Vec<OutputRow<'_>>> = (0..parts).map(|_| Vec::new()).collect();
    for (r, out) in out.chunks_exact_mut(dim).enumerate() {
        dealt[r % parts].push((r, out));
    }
    // Each part takes its own rows; the locks only hand the disjoint rows across threads.
    let dealt: Vec<Mutex<Vec<OutputRow<'_>>>> = dealt.into_iter().map(Mutex::new).collect();
    pool.execute(|part| {
        if let Some(rows) = dealt.get(part) {
            let mut rows = rows.lock().unwrap_or_else(PoisonError::into_inner);
            let mut scores = Vec::with_capacity(start + tokens);
            for (r, out) in rows.iter_mut() {
                row(*r, out, &mut scores);
            }
        }
    });
    Ok(())
}

/// One query's output: its row index (token × heads + head) and its values.
type OutputRow<'a> = (usize, &'a mut [f32]);

/// Below this much work (in 16-value multiply-adds) attention runs on the calling thread.
const SERIAL_WORK: usize = 4096;

/// [`one_query`] compiled for AVX2: the same operations in the same order, in wider registers,
/// so the bits do not change.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn one_query_avx2(
    query: &[f32],
    keys: &[f32],
    values: &[f32],
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    one_query(query, keys, values, scale, scores, out)
}

/// Values of the output kept in registers while the weighted values are added up.
const OUT_CHUNK: usize = 16;

/// One query against `keys.len() / query.len()` keys. Each score is a [`dot`]; each output
/// value adds the weighted values key after key. Rust never fuses or reorders float
/// operations, so this order is the same on every CPU and every instruction set.
#[inline(always)]
fn one_query(
    query: &[f32],
    keys: &[f32],
    values: &[f32],
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let dim = query.len();
    scores.clear();
    let mut max = f32::NEG_INFINITY;
    for key in keys.chunks_exact(dim) {
        let s = dot(query, key) * scale;
        max = max.max(s);
        scores.push(s);
    }
    let mut sum = 0.0f32;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    let inv = 1.0 / sum;
    for (c, out) in out.chunks_mut(OUT_CHUNK).enumerate() {
        let offset = c * OUT_CHUNK;
        if out.len() == OUT_CHUNK {
            let mut acc = [0.0f32; OUT_CHUNK];
            for (p, value) in scores.iter().zip(values.chunks_exact(dim)) {
                let value = &value[offset..offset + OUT_CHUNK];
                for i in 0..OUT_CHUNK {
                    acc[i] += p * value[i];
                }
            }
            for (o, a) in out.iter_mut().zip(acc) {
                *o = a * inv;
            }
        } else {
            out.fill(0.0);
            for (p, value) in scores.iter().zip(values.chunks_exact(dim)) {
                for (o, v) in out.iter_mut().zip(&value[offset..]) {
                    *o += p * v;
                }
            }
            out.iter_mut().for_each(|o| *o *= inv);
        }
    }
}

/// A dot product in eight lanes, added up in one fixed order.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (a8.remainder(), b8.remainder());
    for (x, y) in a8.zip(b8) {
        for i in 0..8 {
            lanes[i] += x[i] * y[i];
        }
    }
    let mut tail = 0.0f32;
    for (x, y) in ra.iter().zip(rb) {
        tail += x * y;
    }
    ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5]))
        + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]))
        + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plain f64 attention for one query, as a reference.
    fn reference(query: &[f32], keys: &[&[f32]], values: &[&[f32]]) -> Vec<f64> {
        let scale = 1.0 / (query.len() as f64).sqrt();
        let scores: Vec<f64> = keys
            .iter()
            .map(|k| {
                query
                    .iter()
                    .zip(*k)
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum::<f64>()
                    * scale
            })
            .collect();
        let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
        let sum: f64 = e.iter().sum();
        (0..query.len())
            .map(|d| {
                e.iter()
                    .zip(values)
                    .map(|(p, v)| p * v[d] as f64)
                    .sum::<f64>()
                    / sum
            })
            .collect()
    }

    fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let x = (i as u32)
                    .wrapping_mul(2654435761)
                    .wrapping_add(seed.wrapping_mul(97));
                (x % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    fn run(shape: &AttentionShape, q: &[f32], k: &[f32], v: &[f32]) -> Vec<f32> {
        let mut out = vec![0.0; q.len()];
        causal_attention(shape, q, k, v, &mut out).unwrap();
        out
    }

    #[test]
    fn matches_f64_attention_and_any_grouping_of_queries_gives_the_same_bits() {
        let (heads, kv_heads, dim, positions, capacity) = (6, 2, 20, 13, 16);
        let keys = data(kv_heads * capacity * dim, 1);
        let values = data(kv_heads * capacity * dim, 2);
        // Queries for every position, (positions, heads, dim) for easy slicing.
        let all_q = data(positions * heads * dim, 3);
        let call = |start: usize, tokens: usize| {
            let mut q = vec![0.0; heads * tokens * dim];
            for t in 0..tokens {
                for h in 0..heads {
                    q[(h * tokens + t) * dim..][..dim]
                        .copy_from_slice(&all_q[((start + t) * heads + h) * dim..][..dim]);
                }
            }
            let shape = AttentionShape {
                heads,
                kv_heads,
                head_dim: dim,
                tokens,
                start,
                key_capacity: capacity,
                window: None,
            };
            run(&shape, &q, &keys, &values)
        };
        let whole = call(0, positions);
        let mut pieces = Vec::new();
        for (start, tokens) in [(0, 4), (4, 1), (5, 7), (12, 1)] {
            pieces.extend(call(start, tokens));
        }
        assert_eq!(whole, pieces, "grouping queries changed the bits");
        for t in 0..positions {
            for h in 0..heads {
                let kv = h / (heads / kv_heads);
                let at = |j: usize| (kv * capacity + j) * dim;
                let ks: Vec<&[f32]> = (0..=t).map(|j| &keys[at(j)..][..dim]).collect();
                let vs: Vec<&[f32]> = (0..=t).map(|j| &values[at(j)..][..dim]).collect();
                let want = reference(&all_q[(t * heads + h) * dim..][..dim], &ks, &vs);
                let got = &whole[(t * heads + h) * dim..][..dim];
                for (g, w) in got.iter().zip(want) {
                    assert!((*g as f64 - w).abs() < 1e-5, "{g} vs {w}");
                }
            }
        }
    }

    #[test]
    fn a_sliding_window_sees_only_the_last_keys() {
        let (heads, kv_heads, dim, tokens, capacity, window) = (2, 1, 8, 9, 9, 3);
        let keys = data(kv_heads * capacity * dim, 7);
        let values = data(kv_heads * capacity * dim, 8);
        let q = data(heads * tokens * dim, 9);
        let shape = AttentionShape {
            heads,
            kv_heads,
            head_dim: dim,
            tokens,
            start: 0,
            key_capacity: capacity,
            window: Some(window),
        };
        let got = run(&shape, &q, &keys, &values);
        for t in 0..tokens {
            for h in 0..heads {
                let first = (t + 1).saturating_sub(window);
                let ks: Vec<&[f32]> = (first..=t).map(|j| &keys[j * dim..][..dim]).collect();
                let vs: Vec<&[f32]> = (first..=t).map(|j| &values[j * dim..][..dim]).collect();
                let want = reference(&q[(h * tokens + t) * dim..][..dim], &ks, &vs);
                let out = &got[(t * heads + h) * dim..][..dim];
                for (g, w) in out.iter().zip(want) {
                    assert!((*g as f64 - w).abs() < 1e-5, "{g} vs {w} at {t}");
                }
            }
        }
        let zero = AttentionShape {
            window: Some(0),
            ..shape
        };
        let mut out = vec![0.0; q.len()];
        assert!(causal_attention(&zero, &q, &keys, &values, &mut out).is_err());
    }

    #[test]
    fn the_plain_and_avx2_builds_give_the_same_bits() {
        let dim = 40; // not a multiple of the output chunk: both output loops run
        let (q, k, v) = (data(dim, 4), data(dim * 37, 5), data(dim * 37, 6));
        let mut scores = Vec::new();
        let mut plain = vec![0.0; dim];
        one_query(&q, &k, &v, 0.3, &mut scores, &mut plain);
        #[cfg(target_arch = "x86_64")]
        if Isa::best() != Isa::Scalar {
            let mut wide = vec![0.0; dim];
            // SAFETY: checked that the CPU has AVX2.
            unsafe { one_query_avx2(&q, &k, &v, 0.3, &mut scores, &mut wide) };
            assert_eq!(plain, wide);
        }
        assert!(plain.iter().all(|x| x.is_finite()));
    }

    #[test]
    fn bad_shapes_are_errors() {
        let shape = AttentionShape {
            heads: 4,
            kv_heads: 3,
            head_dim: 8,
            tokens: 1,
            start: 0,
            key_capacity: 2,
            window: None,
        };
        let mut out = vec![0.0; 32];
        let q = vec![0.0; 32];
        let kv = vec![0.0; 48];
        assert!(causal_attention(&shape, &q, &kv, &kv, &mut out).is_err());
        let shape = AttentionShape {
            kv_heads: 2,
            start: 2,
            ..shape
        };
        let kv = vec![0.0; 32];
        assert!(causal_attention(&shape, &q, &kv, &kv, &mut out).is_err());
    }
}
