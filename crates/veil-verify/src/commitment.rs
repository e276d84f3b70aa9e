//! Activation commitments: a compact fingerprint of the final hidden states behind an answer.
//!
//! Following TOPLOC, the generating node keeps, for each chunk of [`CHUNK_TOKENS`] generated
//! tokens, the [`TOP_K`] largest-magnitude entries of the final hidden states of that chunk (the
//! positions that produced the chunk's tokens), as flat index and half-precision value: 4 bytes
//! an entry, just under 8 bytes a token with headers. A validator recomputes those states by teacher forcing and
//! compares. Floating point differs across machines, so the comparison uses tolerances
//! ([`crate::Tolerances`]) rather than equality.

use half::f16;
use serde::{Deserialize, Serialize};

use crate::error::{Result, VerifyError};

/// Generated tokens per chunk.
pub const CHUNK_TOKENS: usize = 32;
/// Entries kept per full chunk: 4 bytes each plus a 2-byte chunk header, under 8 bytes a token.
pub const TOP_K: usize = 62;

/// The commitment for one chunk of generated tokens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkCommitment {
    /// Tokens in the chunk: [`CHUNK_TOKENS`], or fewer for the last chunk.
    pub tokens: u16,
    /// Flat indices `token * hidden_size + dim` into the chunk's hidden states, ascending.
    pub indices: Vec<u16>,
    /// The values at those indices, as IEEE half-precision bits.
    pub values: Vec<u16>,
}

/// The commitment for a whole answer: one chunk per [`CHUNK_TOKENS`] generated tokens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActivationCommitment {
    /// Width of the hidden states it was taken from.
    pub hidden_size: u32,
    /// The chunks, in generation order.
    pub chunks: Vec<ChunkCommitment>,
}

impl ActivationCommitment {
    /// Tokens covered.
    pub fn tokens(&self) -> usize {
        self.chunks.iter().map(|c| c.tokens as usize).sum()
    }

    /// Size on the wire, without framing: 4 bytes per entry and 2 per chunk header.
    pub fn byte_len(&self) -> usize {
        4 + self
            .chunks
            .iter()
            .map(|c| 2 + 2 * c.indices.len() + 2 * c.values.len())
            .sum::<usize>()
    }

    /// Checks the shape of a commitment from a peer against the claim it comes with.
    pub fn check(&self, hidden_size: usize, tokens: usize) -> Result<()> {
        let bad = |why: String| Err(VerifyError::MalformedCommitment(why));
        if self.hidden_size as usize != hidden_size {
            return bad(format!(
                "hidden size {} but the model's is {hidden_size}",
                self.hidden_size
            ));
        }
        if self.tokens() != tokens {
            return bad(format!(
                "covers {} tokens but the answer has {tokens}",
                self.tokens()
            ));
        }
        let last = self.chunks.len().saturating_sub(1);
        for (n, chunk) in self.chunks.iter().enumerate() {
            let t = chunk.tokens as usize;
            if t == 0 || t > CHUNK_TOKENS || (n < last && t != CHUNK_TOKENS) {
                return bad(format!(
                    "chunk {n} has {t} tokens; every chunk but the last must have {CHUNK_TOKENS}"
                ));
            }
            let want = TOP_K.min(t * hidden_size);
            if chunk.indices.len() != want || chunk.values.len() != want {
                return bad(format!(
                    "chunk {n} has {} indices and {} values, expected {want}",
                    chunk.indices.len(),
                    chunk.values.len()
                ));
            }
            if chunk.indices.windows(2).any(|w| w[0] >= w[1]) {
                return bad(format!("chunk {n}: indices are not strictly ascending"));
            }
            if let Some(&i) = chunk.indices.last() {
                if i as usize >= t * hidden_size {
                    return bad(format!("chunk {n}: index {i} is outside the chunk"));
                }
            }
            if chunk.values.iter().any(|&v| !f16::from_bits(v).is_finite()) {
                return bad(format!("chunk {n}: a value is not a finite number"));
            }
        }
        Ok(())
    }
}

/// Builds a commitment one generated position at a time, as the node produces them.
#[derive(Debug, Clone)]
pub struct CommitmentBuilder {
    hidden_size: usize,
    pending: Vec<f32>,
    chunks: Vec<ChunkCommitment>,
}

impl CommitmentBuilder {
    /// A builder for hidden states of width `hidden_size`.
    ///
    /// Flat indices must fit 16 bits, so `CHUNK_TOKENS * hidden_size` must be below 65,536.
    pub fn new(hidden_size: usize) -> Result<Self> {
        if hidden_size == 0 || CHUNK_TOKENS * hidden_size > usize::from(u16::MAX) + 1 {
            return Err(VerifyError::MalformedCommitment(format!(
                "hidden size {hidden_size} does not fit 16-bit chunk indices"
            )));
        }
        Ok(Self {
            hidden_size,
            pending: Vec::with_capacity(CHUNK_TOKENS * hidden_size),
            chunks: Vec::new(),
        })
    }

    /// Adds the final hidden state of the position that produced the next generated token.
    pub fn push(&mut self, hidden: &[f32]) -> Result<()> {
        if hidden.len() != self.hidden_size {
            return Err(VerifyError::MalformedCommitment(format!(
                "hidden state of width {}, expected {}",
                hidden.len(),
                self.hidden_size
            )));
        }
        self.pending.extend_from_slice(hidden);
        if self.pending.len() == CHUNK_TOKENS * self.hidden_size {
            self.seal();
        }
        Ok(())
    }

    /// Positions committed so far.
    pub fn tokens(&self) -> usize {
        self.chunks.len() * CHUNK_TOKENS + self.pending.len() / self.hidden_size
    }

    /// The commitment for every position pushed.
    pub fn finish(mut self) -> ActivationCommitment {
        if !self.pending.is_empty() {
            self.seal();
        }
        ActivationCommitment {
            hidden_size: self.hidden_size as u32,
            chunks: self.chunks,
        }
    }

    fn seal(&mut self) {
        let tokens = self.pending.len() / self.hidden_size;
        let indices = top_k_indices(&self.pending, TOP_K);
        let values = indices
            .iter()
            .map(|&i| f16::from_f32(self.pending[i]).to_bits())
            .collect();
        self.chunks.push(ChunkCommitment {
            tokens: tokens as u16,
            indices: indices.into_iter().map(|i| i as u16).collect(),
            values,
        });
        self.pending.clear();
    }
}

/// The indices of the `k` largest-magnitude values (the lower index first at equal
/// magnitude), in ascending index order.
pub fn top_k_indices(values: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    let by_magnitude =
        |a: &usize, b: &usize| values[*b].abs().total_cmp(&values[*a].abs()).then(a.cmp(b));
    if k < order.len() {
        order.select_nth_unstable_by(k, by_magnitude);
        order.truncate(k);
    }
    order.sort_unstable();
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(n: usize, width: usize) -> Vec<Vec<f32>> {
        (0..n)
            .map(|t| {
                (0..width)
                    .map(|d| ((t * 31 + d * 17) % 97) as f32 - 48.0)
                    .collect()
            })
            .collect()
    }

    #[test]
    fn eight_bytes_a_token_on_full_chunks() {
        let width = 576;
        let mut b = CommitmentBuilder::new(width).unwrap();
        for row in rows(64, width) {
            b.push(&row).unwrap();
        }
        let c = b.finish();
        assert_eq!(c.chunks.len(), 2);
        assert_eq!(c.tokens(), 64);
        c.check(width, 64).unwrap();
        let per_token = c.byte_len() as f64 / 64.0;
        assert!(per_token <= 8.0, "{per_token} bytes a token");
    }

    #[test]
    fn keeps_the_largest_magnitudes_in_index_order() {
        let mut b = CommitmentBuilder::new(4).unwrap();
        b.push(&[1.0, -9.0, 3.0, 0.5]).unwrap();
        let c = b.finish();
        // 4 values, TOP_K > 4: everything is kept.
        assert_eq!(c.chunks[0].indices, vec![0, 1, 2, 3]);
        assert_eq!(top_k_indices(&[1.0, -9.0, 3.0, 0.5, 9.0], 2), vec![1, 4]);
        assert_eq!(f16::from_bits(c.chunks[0].values[1]).to_f32(), -9.0);
    }

    #[test]
    fn malformed_commitments_are_refused() {
        let width = 8;
        let mut b = CommitmentBuilder::new(width).unwrap();
        for row in rows(40, width) {
            b.push(&row).unwrap();
        }
        let good = b.finish();
        good.check(width, 40).unwrap();
        assert!(good.check(width + 1, 40).is_err());
        assert!(good.check(width, 41).is_err());

        let mut c = good.clone();
        c.chunks[0].indices.swap(0, 1);
        assert!(c.check(width, 40).is_err());
        let mut c = good.clone();
        *c.chunks[1].indices.last_mut().unwrap() = 60_000;
        assert!(c.check(width, 40).is_err());
        let mut c = good.clone();
        c.chunks[0].values[3] = f16::NAN.to_bits();
        assert!(c.check(width, 40).is_err());
        let mut c = good.clone();
        c.chunks[0].values.pop();
        assert!(c.check(width, 40).is_err());
        let mut c = good.clone();
        c.chunks.swap(0, 1);
        assert!(c.check(width, 40).is_err());
        assert!(CommitmentBuilder::new(4096).is_err());
        let mut b = CommitmentBuilder::new(width).unwrap();
        assert!(b.push(&[1.0; 3]).is_err());
    }
}
