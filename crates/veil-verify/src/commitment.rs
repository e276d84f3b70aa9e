//! Activation commitments: a compact fingerprint of the final hidden states behind an answer.
//!
//! Two modes ([`CommitmentMode`]):
//! - **tolerant**, following TOPLOC: the generating node keeps, for each chunk of
//!   [`CHUNK_TOKENS`] generated tokens, the [`TOP_K`] largest-magnitude entries of the chunk's
//!   final hidden states (the positions that produced its tokens), as flat index and
//!   half-precision value: 4 bytes an entry, just under 8 bytes a token with headers. A
//!   validator recomputes those states by teacher forcing and compares within tolerances
//!   ([`crate::Tolerances`]), as floating point differs across machines and engines;
//! - **exact**: where generator and validator both run Veil's kernels on quantized weights
//!   (the same bits on every CPU, kernel family, thread count and prefill grouping), a
//!   [`DIGEST_BYTES`]-byte blake3 digest of each chunk's hidden states, half a byte a token;
//!   any difference at all fails.

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

/// Bytes of an exact-mode chunk digest (a truncated blake3 hash: 128 bits leave a cheater
/// no second preimage to find).
pub const DIGEST_BYTES: usize = 16;

/// How a commitment pins the hidden states down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum CommitmentMode {
    /// The largest entries, checked within tolerances: for engines whose floats differ across
    /// machines (candle's kernels, F32 weights).
    #[default]
    Tolerant,
    /// A digest of every bit: for nodes whose outputs are the same bits everywhere
    /// ([`veil_model::ShardModel::bit_reproducible`]); any difference fails.
    Exact,
}

impl std::fmt::Display for CommitmentMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Tolerant => "tolerant",
            Self::Exact => "exact",
        })
    }
}

impl std::str::FromStr for CommitmentMode {
    type Err = VerifyError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "tolerant" => Ok(Self::Tolerant),
            "exact" => Ok(Self::Exact),
            other => Err(VerifyError::InvalidClaim(format!(
                "unknown commitment mode {other:?}: use exact or tolerant"
            ))),
        }
    }
}

/// An exact-mode commitment: one digest per chunk of [`CHUNK_TOKENS`] tokens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExactCommitment {
    /// Tokens covered.
    pub tokens: u32,
    /// [`chunk_digest`] of each chunk, in generation order.
    pub digests: Vec<[u8; DIGEST_BYTES]>,
}

/// The digest of chunk number `chunk` (its final hidden states, `tokens × hidden_size` values):
/// blake3 in a key derived for this purpose, over the chunk's number, its length and every
/// value's bits.
pub fn chunk_digest(chunk: usize, hidden: &[f32]) -> [u8; DIGEST_BYTES] {
    let mut hasher = blake3::Hasher::new_derive_key("veil 2026-12 exact activation commitment");
    hasher.update(&(chunk as u64).to_le_bytes());
    hasher.update(&(hidden.len() as u64).to_le_bytes());
    let bytes: Vec<u8> = hidden
        .iter()
        .flat_map(|v| v.to_bits().to_le_bytes())
        .collect();
    hasher.update(&bytes);
    let mut digest = [0; DIGEST_BYTES];
    digest.copy_from_slice(&hasher.finalize().as_bytes()[..DIGEST_BYTES]);
    digest
}

/// The commitment for a whole answer: one chunk per [`CHUNK_TOKENS`] generated tokens, as
/// top-k entries (tolerant mode) or digests (exact mode).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActivationCommitment {
    /// Width of the hidden states it was taken from.
    pub hidden_size: u32,
    /// Tolerant mode: the chunks, in generation order (empty in exact mode).
    pub chunks: Vec<ChunkCommitment>,
    /// Exact mode: the chunks' digests.
    #[serde(default)]
    pub exact: Option<ExactCommitment>,
}

impl ActivationCommitment {
    /// The commitment's mode.
    pub fn mode(&self) -> CommitmentMode {
        if self.exact.is_some() {
            CommitmentMode::Exact
        } else {
            CommitmentMode::Tolerant
        }
    }

    /// Tokens covered.
    pub fn tokens(&self) -> usize {
        match &self.exact {
            Some(exact) => exact.tokens as usize,
            None => self.chunks.iter().map(|c| c.tokens as usize).sum(),
        }
    }

    /// Size on the wire, without framing: 4 bytes of width, then 4 bytes per entry and 2 per
    /// chunk header (tolerant), or 4 bytes of length and the digests (exact).
    pub fn byte_len(&self) -> usize {
        match &self.exact {
            Some(exact) => 8 + DIGEST_BYTES * exact.digests.len(),
            None => {
                4 + self
                    .chunks
                    .iter()
                    .map(|c| 2 + 2 * c.indices.len() + 2 * c.values.len())
                    .sum::<usize>()
            }
        }
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
        if let Some(exact) = &self.exact {
            if !self.chunks.is_empty() {
                return bad("an exact commitment carries digests, not top-k chunks".into());
            }
            if exact.tokens as usize != tokens {
                return bad(format!(
                    "covers {} tokens but the answer has {tokens}",
                    exact.tokens
                ));
            }
            if exact.digests.len() != tokens.div_ceil(CHUNK_TOKENS) {
                return bad(format!(
                    "{} digests for {tokens} tokens; one per {CHUNK_TOKENS} are due",
                    exact.digests.len()
                ));
            }
            return Ok(());
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
    mode: CommitmentMode,
    pending: Vec<f32>,
    chunks: Vec<ChunkCommitment>,
    digests: Vec<[u8; DIGEST_BYTES]>,
    tokens: usize,
}

impl CommitmentBuilder {
    /// A builder for hidden states of width `hidden_size`, in `mode`.
    ///
    /// Tolerant flat indices must fit 16 bits, so `CHUNK_TOKENS * hidden_size` must be below
    /// 65,536 there.
    pub fn new(hidden_size: usize, mode: CommitmentMode) -> Result<Self> {
        let fits = CHUNK_TOKENS * hidden_size <= usize::from(u16::MAX) + 1;
        if hidden_size == 0 || (mode == CommitmentMode::Tolerant && !fits) {
            return Err(VerifyError::MalformedCommitment(format!(
                "hidden size {hidden_size} does not fit 16-bit chunk indices"
            )));
        }
        Ok(Self {
            hidden_size,
            mode,
            pending: Vec::with_capacity(CHUNK_TOKENS * hidden_size),
            chunks: Vec::new(),
            digests: Vec::new(),
            tokens: 0,
        })
    }

    /// The mode it commits in.
    pub fn mode(&self) -> CommitmentMode {
        self.mode
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
        self.tokens += 1;
        if self.pending.len() == CHUNK_TOKENS * self.hidden_size {
            self.seal();
        }
        Ok(())
    }

    /// Positions committed so far.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// The commitment for every position pushed.
    pub fn finish(mut self) -> ActivationCommitment {
        if !self.pending.is_empty() {
            self.seal();
        }
        let exact = (self.mode == CommitmentMode::Exact).then_some(ExactCommitment {
            tokens: self.tokens as u32,
            digests: self.digests,
        });
        ActivationCommitment {
            hidden_size: self.hidden_size as u32,
            chunks: self.chunks,
            exact,
        }
    }

    fn seal(&mut self) {
        if self.mode == CommitmentMode::Exact {
            self.digests
                .push(chunk_digest(self.digests.len(), &self.pending));
            self.pending.clear();
            return;
        }
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
        let mut b = CommitmentBuilder::new(width, CommitmentMode::Tolerant).unwrap();
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
        let mut b = CommitmentBuilder::new(4, CommitmentMode::Tolerant).unwrap();
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
        let mut b = CommitmentBuilder::new(width, CommitmentMode::Tolerant).unwrap();
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
        assert!(CommitmentBuilder::new(4096, CommitmentMode::Tolerant).is_err());
        assert!(CommitmentBuilder::new(4096, CommitmentMode::Exact).is_ok());
        let mut b = CommitmentBuilder::new(width, CommitmentMode::Tolerant).unwrap();
        assert!(b.push(&[1.0; 3]).is_err());
    }

    #[test]
    fn exact_commitments_take_half_a_byte_a_token_and_pin_every_bit() {
        let width = 576;
        let build = |rows: &[Vec<f32>]| {
            let mut b = CommitmentBuilder::new(width, CommitmentMode::Exact).unwrap();
            for row in rows {
                b.push(row).unwrap();
            }
            b.finish()
        };
        let rows = rows(128, width);
        let c = build(&rows);
        assert_eq!(c.mode(), CommitmentMode::Exact);
        assert_eq!(c.tokens(), 128);
        c.check(width, 128).unwrap();
        assert!(c.byte_len() as f64 / 128.0 <= 1.0, "{} bytes", c.byte_len());
        // The same states give the same digests; one bit anywhere changes its chunk's.
        assert_eq!(build(&rows), c);
        let mut flipped = rows.clone();
        flipped[70][3] = f32::from_bits(flipped[70][3].to_bits() ^ 1);
        let d = build(&flipped);
        let (ours, theirs) = (c.exact.as_ref().unwrap(), d.exact.as_ref().unwrap());
        assert_eq!(ours.digests[..2], theirs.digests[..2]);
        assert_ne!(ours.digests[2], theirs.digests[2]);
        // Shapes that do not fit the claim are refused.
        assert!(c.check(width, 127).is_err());
        let mut short = c.clone();
        short.exact.as_mut().unwrap().digests.pop();
        assert!(short.check(width, 128).is_err());
        let mut mixed = c.clone();
        mixed.chunks = build_tolerant(&rows[..1], width).chunks;
        assert!(mixed.check(width, 128).is_err());
        assert_eq!(
            "exact".parse::<CommitmentMode>().unwrap(),
            CommitmentMode::Exact
        );
        assert!("loose".parse::<CommitmentMode>().is_err());
    }

    fn build_tolerant(rows: &[Vec<f32>], width: usize) -> ActivationCommitment {
        let mut b = CommitmentBuilder::new(width, CommitmentMode::Tolerant).unwrap();
        for row in rows {
            b.push(row).unwrap();
        }
        b.finish()
    }
}
