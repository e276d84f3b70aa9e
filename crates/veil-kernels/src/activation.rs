//! Activations quantized to 8-bit blocks, so weight blocks can be multiplied with integer dot
//! products.
//!
//! The rounding follows ggml's `quantize_row_q8_0` / `quantize_row_q8_1` (and candle's copies of
//! them) exactly, scales rounded through f16 included, so a product here sums the same integers
//! with the same scales as candle's reference kernels.

use half::f16;

use crate::threads::{part_count, run_parts};
use crate::{Isa, BLOCK, SUPERBLOCK};

/// Sums kept per [`ActivationSuperblock`]: one per 16 values, as in ggml's Q8_K.
pub const SUPERBLOCK_SUMS: usize = SUPERBLOCK / 16;

/// One block of 32 activations: `x ≈ d * qs`, with `s = d * Σ qs` for formats with an offset.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ActivationBlock {
    /// The scale (an f16 value, held as f32 so the hot loop needs no conversion).
    pub d: f32,
    /// The scale times the sum of the quantized values (an f16 value), for Q4_1's offset term.
    pub s: f32,
    /// The quantized values.
    pub qs: [i8; BLOCK],
}

impl ActivationBlock {
    /// Quantizes 32 values: the reference every instruction set matches bit for bit.
    pub fn quantize(xs: &[f32; BLOCK]) -> Self {
        let amax = xs.iter().fold(0f32, |m, x| m.max(x.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut qs = [0i8; BLOCK];
        for (q, &x) in qs.iter_mut().zip(xs) {
            *q = (x * id).round() as i8;
        }
        Self::with_values(d, qs)
    }

    /// The block for scale `d` (before f16 rounding) and values `qs`.
    pub(crate) fn with_values(d: f32, qs: [i8; BLOCK]) -> Self {
        let sum: i32 = qs.iter().map(|&q| i32::from(q)).sum();
        let d = f16::from_f32(d);
        Self {
            d: d.to_f32(),
            s: (f16::from_f32(sum as f32) * d).to_f32(),
            qs,
        }
    }
}

/// 256 activations quantized for the K formats as ggml's `quantize_row_q8_K` reference does:
/// `x ≈ d * qs`, with the sums of each 16 values kept for the formats' offset terms.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ActivationSuperblock {
    /// The scale: `1 / iscale`, kept in f32 (not rounded through f16 as the 32-value blocks'
    /// are).
    pub d: f32,
    /// The quantized values, in -127..=127.
    pub qs: [i8; SUPERBLOCK],
    /// The sum of each 16 quantized values.
    pub bsums: [i16; SUPERBLOCK_SUMS],
}

impl ActivationSuperblock {
    /// [`ActivationSuperblock::quantize`] on the instructions of `isa` where the CPU has them
    /// (else the scalar function): the same superblock, bit for bit.
    pub fn quantize_with(isa: Isa, xs: &[f32; SUPERBLOCK]) -> Self {
        #[cfg(target_arch = "x86_64")]
        if matches!(isa, Isa::Avx2 | Isa::Avx512) && isa.is_available() {
            // SAFETY: the CPU has AVX2, FMA and F16C (checked just above).
            return unsafe { crate::x86::quantize_superblock_avx2(xs) };
        }
        let _ = isa;
        Self::quantize(xs)
    }

    /// Quantizes 256 values like ggml's reference: `iscale = -127 / max`, `max` the value of
    /// largest magnitude (the first, on ties) with its sign, each value rounded to the nearest
    /// integer with ties to even (ggml's `nearest_int`) and capped at 127, `d = 1 / iscale`;
    /// all zeros give `d = 0`. Every instruction set quantizes with this function: it is
    /// O(cols) per token, next to the O(rows · cols) product.
    pub fn quantize(xs: &[f32; SUPERBLOCK]) -> Self {
        // The largest magnitude first (a fold the compiler vectorizes; the branchy scan that
        // kept the value along was a serial chain, 3% of a Q4_K_M prompt), then the first
        // value with it: the same value the scan kept.
        let amax = xs.iter().fold(0f32, |m, &x| m.max(x.abs()));
        let max = xs.iter().copied().find(|x| x.abs() == amax).unwrap_or(0.0);
        let mut block = Self {
            d: 0.0,
            qs: [0; SUPERBLOCK],
            bsums: [0; SUPERBLOCK_SUMS],
        };
        if amax == 0.0 {
            return block;
        }
        let iscale = -127.0 / max;
        for (q, &x) in block.qs.iter_mut().zip(xs) {
            // |iscale · x| <= 127 up to one rounding, so the cast cannot wrap.
            *q = nearest_even(iscale * x).min(127.0) as i8;
        }
        for (sum, qs) in block.bsums.iter_mut().zip(block.qs.chunks_exact(16)) {
            // 16 values of at most 127 in magnitude: the sum fits an i16.
            *sum = qs.iter().map(|&q| i16::from(q)).sum();
        }
        block.d = 1.0 / iscale;
        block
    }
}

/// `v` rounded to the nearest integer, ties to even, for `|v| < 2^22`: adding and taking back
/// off 1.5 · 2^23 leaves no fraction bits, so the addition rounds in the FPU's default mode,
/// as ggml's `nearest_int` does. `f32::round_ties_even` gives the same value but compiles to a
/// call of libc's `rintf` on baseline x86-64, which cost 4% of a prompt's time.
#[inline]
fn nearest_even(v: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (v + MAGIC) - MAGIC
}

/// Tokens per [`ActivationTile`].
pub(crate) const TILE: usize = 8;

/// Rows of quantized activations, each field in its own array so the kernels load eight
/// scales at once. A row is a run of units: 32-value blocks (as [`ActivationBlock`]) for the
/// 32-value formats, or 256-value superblocks (as [`ActivationSuperblock`]) for the K formats,
/// whose values are held as eight consecutive 32-value entries of `qs`.
#[derive(Debug, Default)]
pub(crate) struct Activations {
    /// Each unit's scale.
    pub d: Vec<f32>,
    /// Each block's `s` term (blocks only).
    pub s: Vec<f32>,
    /// Each block's exact sum of quantized values (blocks only): formats whose values are
    /// stored unsigned with a fixed offset take `offset · Σx` back off the unsigned product.
    pub sums: Vec<i32>,
    /// The quantized values, 32 per entry.
    pub qs: Vec<[i8; BLOCK]>,
    /// Each superblock's sums of 16 values (superblocks only).
    pub bsums: Vec<[i16; SUPERBLOCK_SUMS]>,
    /// Each token's whole groups of [`GROUP`] blocks regrouped for one-token products with one
    /// lane per block: entry `k` of a group holds, in its 32-bit lane `i`, values
    /// `4k..4k + 4` of the group's block `i` (see [`Activations::prepare_words`]).
    words: Vec<[i8; BLOCK]>,
    /// Entries of `qs` per unit: 1 for blocks, 8 for superblocks.
    per_unit: usize,
    /// The first token of each tile of [`TILE`] tokens.
    tile_starts: Vec<usize>,
    /// For each tile, unit by unit, the tokens' scales side by side.
    tiled_d: Vec<[f32; TILE]>,
    /// The same for the `s` terms.
    tiled_s: Vec<[f32; TILE]>,
    /// The same for the exact sums.
    tiled_sums: Vec<[i32; TILE]>,
    /// For each tile, 32-value block by block, the tokens' values regrouped: entry `g` holds,
    /// in its 32-bit lane `t`, values `4g..4g + 4` of token `t` (see [`ActivationTile`]).
    tiled_groups: Vec<TileBlock>,
    /// For each tile, superblock by superblock, the tokens' sums of 16 side by side (16 per
    /// superblock; superblocks only).
    tiled_bsums: Vec<[i32; TILE]>,
}

/// One 32-value block of a tile's eight tokens, regrouped for dot products with one lane per
/// token: entry `g` holds values `4g..4g + 4` of token `t` in bytes `4t..4t + 4`, so a weight
/// block's four values `4g..4g + 4`, broadcast to every lane, multiply all eight tokens in one
/// instruction and the eight entries accumulate each token's sum in its own lane, without the
/// horizontal reductions that cost more than the products.
pub(crate) type TileBlock = [[i8; BLOCK]; 8];

/// [`TILE`] tokens' activations, laid out for kernels that compute eight tokens at once with
/// one lane per token.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ActivationTile<'a> {
    /// The tile's first token.
    pub start: usize,
    pub rows: [ActivationRow<'a>; TILE],
    /// Each 32-value block, regrouped ([`TileBlock`]).
    pub groups: &'a [TileBlock],
    /// Each superblock's 16 sums of 16, tokens side by side (superblocks only).
    pub bsums: &'a [[i32; TILE]],
    pub d: &'a [[f32; TILE]],
    pub s: &'a [[f32; TILE]],
    pub sums: &'a [[i32; TILE]],
}

/// Blocks regrouped together for one-token products with one lane per block (Q4_1's weights
/// are laid out the same way, `crate::matrix::interleave_q4_1_row`).
pub(crate) const GROUP: usize = 8;

/// One row of [`Activations`]: its units' fields (empty where the unit kind has none).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ActivationRow<'a> {
    pub d: &'a [f32],
    pub s: &'a [f32],
    pub sums: &'a [i32],
    pub qs: &'a [[i8; BLOCK]],
    pub bsums: &'a [[i16; SUPERBLOCK_SUMS]],
    /// The row's whole groups of [`GROUP`] blocks, regrouped ([`Activations::prepare_words`];
    /// empty if they were not prepared).
    pub words: &'a [[i8; BLOCK]],
}

impl Activations {
    /// Quantizes `x` (a whole number of blocks), reusing the allocations, with the
    /// instructions of `isa` (which the caller checked this CPU has). A prompt's blocks are
    /// split over the pool's threads: each block alone gives the same bits anywhere.
    pub fn quantize(&mut self, x: &[f32], isa: Isa) {
        let blocks = x.len() / BLOCK;
        self.d.resize(blocks, 0.0);
        self.s.resize(blocks, 0.0);
        self.sums.resize(blocks, 0);
        self.qs.resize(blocks, [0; BLOCK]);
        self.bsums.clear();
        self.words.clear();
        self.per_unit = 1;
        let per_part = blocks.div_ceil(part_count(x.len())).max(1);
        let parts = x
            .chunks(per_part * BLOCK)
            .zip(self.d.chunks_mut(per_part))
            .zip(self.s.chunks_mut(per_part))
            .zip(self.sums.chunks_mut(per_part))
            .zip(self.qs.chunks_mut(per_part))
            .collect();
        run_parts(parts, |((((x, d), s), sums), qs)| {
            let outputs = d.iter_mut().zip(s).zip(sums).zip(qs);
            for (xs, (((d, s), sum), qs)) in x.chunks_exact(BLOCK).zip(outputs) {
                let Ok(xs) = xs.try_into() else { continue };
                let block = match isa {
                    // SAFETY: both SIMD families include the AVX2 quantizer's features.
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx2 | Isa::Avx512 => unsafe { crate::x86::quantize_avx2(xs) },
                    _ => ActivationBlock::quantize(xs),
                };
                (*d, *s, *qs) = (block.d, block.s, block.qs);
                *sum = block.qs.iter().map(|&q| i32::from(q)).sum();
            }
        });
    }

    /// Regroups each token's whole groups of [`GROUP`] blocks (`per_token` blocks a token)
    /// into [`ActivationRow::words`]: entry `k` of a group holds values `4k..4k + 4` of block
    /// `i` in lane `i`, so that a weight group laid out the same way multiplies eight blocks
    /// with one lane each, and each lane ends as its block's exact sum without a horizontal
    /// reduction.
    pub fn prepare_words(&mut self, per_token: usize) {
        self.words.clear();
        if per_token == 0 || self.s.is_empty() {
            return;
        }
        for token in self.qs.chunks_exact(per_token) {
            for group in token.chunks_exact(GROUP) {
                for k in 0..BLOCK / 4 {
                    let mut entry = [0i8; BLOCK];
                    for (i, block) in group.iter().enumerate() {
                        entry[4 * i..4 * i + 4].copy_from_slice(&block[4 * k..4 * k + 4]);
                    }
                    self.words.push(entry);
                }
            }
        }
    }

    /// Quantizes `x` (a whole number of superblocks) for the K formats on the instructions of
    /// `isa` (the same bits on each), reusing the allocations, split over the pool's threads
    /// as [`quantize`](Self::quantize) is.
    pub fn quantize_superblocks(&mut self, x: &[f32], isa: Isa) {
        let units = x.len() / SUPERBLOCK;
        let per_unit = SUPERBLOCK / BLOCK;
        self.d.resize(units, 0.0);
        self.bsums.resize(units, [0; SUPERBLOCK_SUMS]);
        self.qs.resize(units * per_unit, [0; BLOCK]);
        self.s.clear();
        self.sums.clear();
        self.per_unit = per_unit;
        let per_part = units.div_ceil(part_count(x.len())).max(1);
        let parts = x
            .chunks(per_part * SUPERBLOCK)
            .zip(self.d.chunks_mut(per_part))
            .zip(self.bsums.chunks_mut(per_part))
            .zip(self.qs.chunks_mut(per_part * per_unit))
            .collect();
        run_parts(parts, |(((x, d), bsums), qs)| {
            let outputs = d.iter_mut().zip(bsums).zip(qs.chunks_exact_mut(per_unit));
            for (xs, ((d, bsums), qs)) in x.chunks_exact(SUPERBLOCK).zip(outputs) {
                let Ok(xs) = xs.try_into() else { continue };
                let block = ActivationSuperblock::quantize_with(isa, xs);
                (*d, *bsums) = (block.d, block.bsums);
                for (q, values) in qs.iter_mut().zip(block.qs.chunks_exact(BLOCK)) {
                    q.copy_from_slice(values);
                }
            }
        });
    }

    /// Lays out tiles of [`TILE`] tokens (`per_token` units each) for [`tile`](Self::tile):
    /// every whole tile, and when tokens are left over, one more ending at the last token
    /// (overlapping the one before: a token's result does not depend on its tile, so the
    /// overlap is computed twice to the same bits, cheaper than the leftovers one by one).
    /// `shifted` lays the regrouped values out `+ 128`, as unsigned bytes in the same storage:
    /// the unsigned operand of VNNI's Q8_0 tile kernel, whose weights are signed.
    pub fn prepare_tiles(&mut self, per_token: usize, shifted: bool) {
        let tokens = self.d.len() / per_token;
        self.tile_starts.clear();
        self.tile_starts
            .extend((0..tokens / TILE).map(|i| i * TILE));
        if tokens > TILE && !tokens.is_multiple_of(TILE) {
            self.tile_starts.push(tokens - TILE);
        }
        self.tiled_d.clear();
        self.tiled_s.clear();
        self.tiled_sums.clear();
        self.tiled_groups.clear();
        self.tiled_bsums.clear();
        let blocks = !self.s.is_empty();
        let per_block = per_token * self.per_unit;
        for &first in &self.tile_starts {
            for b in 0..per_token {
                let at = |t: usize| (first + t) * per_token + b;
                self.tiled_d.push(std::array::from_fn(|t| self.d[at(t)]));
                if blocks {
                    self.tiled_s.push(std::array::from_fn(|t| self.s[at(t)]));
                    self.tiled_sums
                        .push(std::array::from_fn(|t| self.sums[at(t)]));
                } else {
                    for j in 0..SUPERBLOCK_SUMS {
                        self.tiled_bsums
                            .push(std::array::from_fn(|t| i32::from(self.bsums[at(t)][j])));
                    }
                }
            }
            for block in 0..per_block {
                let mut grouped: TileBlock = [[0; BLOCK]; 8];
                for (t, token) in (first..first + TILE).enumerate() {
                    let values = &self.qs[token * per_block + block];
                    for (g, group) in grouped.iter_mut().enumerate() {
                        group[4 * t..4 * t + 4].copy_from_slice(&values[4 * g..4 * g + 4]);
                    }
                }
                if shifted {
                    for group in &mut grouped {
                        for v in group.iter_mut() {
                            *v ^= i8::MIN;
                        }
                    }
                }
                self.tiled_groups.push(grouped);
            }
        }
    }

    /// How many tiles [`prepare_tiles`](Self::prepare_tiles) laid out.
    pub fn tile_count(&self) -> usize {
        self.tile_starts.len()
    }

    /// Tile number `tile`, after [`prepare_tiles`](Self::prepare_tiles).
    pub fn tile(&self, tile: usize, per_token: usize) -> ActivationTile<'_> {
        let first = self.tile_starts[tile];
        let per_block = per_token * self.per_unit;
        ActivationTile {
            start: first,
            rows: std::array::from_fn(|t| self.row((first + t) * per_token, per_token)),
            groups: &self.tiled_groups[tile * per_block..(tile + 1) * per_block],
            bsums: self
                .tiled_bsums
                .get(tile * per_token * SUPERBLOCK_SUMS..(tile + 1) * per_token * SUPERBLOCK_SUMS)
                .unwrap_or_default(),
            d: &self.tiled_d[tile * per_token..(tile + 1) * per_token],
            s: self
                .tiled_s
                .get(tile * per_token..(tile + 1) * per_token)
                .unwrap_or_default(),
            sums: self
                .tiled_sums
                .get(tile * per_token..(tile + 1) * per_token)
                .unwrap_or_default(),
        }
    }

    /// Units `first..first + len` (a token's whole row, for the regrouped words).
    pub fn row(&self, first: usize, len: usize) -> ActivationRow<'_> {
        let range = first..first + len;
        let per_token = len / GROUP * (BLOCK / 4);
        let token = first.checked_div(len).unwrap_or(0);
        let words = self
            .words
            .get(token * per_token..(token + 1) * per_token)
            .unwrap_or_default();
        ActivationRow {
            words,
            d: &self.d[range.clone()],
            s: self.s.get(range.clone()).unwrap_or_default(),
            sums: self.sums.get(range.clone()).unwrap_or_default(),
            qs: &self.qs[first * self.per_unit..(first + len) * self.per_unit],
            bsums: self.bsums.get(range).unwrap_or_default(),
        }
    }
}

/// [`ActivationBlock::quantize`] on the instructions of `isa`: the same block, bit for bit.
/// Exposed so tests can hold every family to that.
pub fn quantize_with(isa: Isa, xs: &[f32; BLOCK]) -> Option<ActivationBlock> {
    if !isa.is_available() {
        return None;
    }
    let mut out = Activations::default();
    out.quantize(xs, isa);
    Some(ActivationBlock {
        d: *out.d.first()?,
        s: *out.s.first()?,
        qs: *out.qs.first()?,
    })
}

#[cfg(test)]
mod tests {
    use super::nearest_even;

    #[test]
    fn nearest_even_rounds_as_round_ties_even() {
        // Every half step in the quantizer's range (ties included) and values near them.
        for i in -600..=600 {
            let half = i as f32 * 0.5;
            for v in [
                half,
                half + 1e-3,
                half - 1e-3,
                f32::from_bits(half.to_bits() + 1),
            ] {
                // Equal as values: the sign of a zero differs, and casts drop it.
                assert_eq!(nearest_even(v), v.round_ties_even(), "{v}");
            }
        }
    }
}
