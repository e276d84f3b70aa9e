//! Activations quantized to 8-bit blocks, so weight blocks can be multiplied with integer dot
//! products.
//!
//! The rounding follows ggml's `quantize_row_q8_0` / `quantize_row_q8_1` (and candle's copies of
//! them) exactly, scales rounded through f16 included, so a product here sums the same integers
//! with the same scales as candle's reference kernels.

use half::f16;

use crate::{Isa, BLOCK};

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

/// Tokens per [`ActivationTile`].
pub(crate) const TILE: usize = 8;

/// Rows of quantized activations, each field in its own array so the kernels load eight
/// scales at once.
#[derive(Debug, Default)]
pub(crate) struct Activations {
    pub d: Vec<f32>,
    pub s: Vec<f32>,
    pub qs: Vec<[i8; BLOCK]>,
    /// The first token of each tile of [`TILE`] tokens.
    tile_starts: Vec<usize>,
    /// For each tile, block by block, the tokens' scales side by side.
    tiled_d: Vec<[f32; TILE]>,
    /// The same for the `s` terms.
    tiled_s: Vec<[f32; TILE]>,
    /// `qs + 128` as unsigned bytes: the unsigned operand of VNNI's dot product.
    shifted: Vec<[u8; BLOCK]>,
}

/// [`TILE`] tokens' activations, laid out for kernels that compute eight tokens at once with
/// one lane per token.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ActivationTile<'a> {
    /// The tile's first token.
    pub start: usize,
    pub rows: [ActivationRow<'a>; TILE],
    pub shifted: [&'a [[u8; BLOCK]]; TILE],
    pub d: &'a [[f32; TILE]],
    pub s: &'a [[f32; TILE]],
}

/// One row of [`Activations`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct ActivationRow<'a> {
    pub d: &'a [f32],
    pub s: &'a [f32],
    pub qs: &'a [[i8; BLOCK]],
}

impl Activations {
    /// Quantizes `x` (a whole number of blocks), reusing the allocations, with the
    /// instructions of `isa` (which the caller checked this CPU has).
    pub fn quantize(&mut self, x: &[f32], isa: Isa) {
        self.d.clear();
        self.s.clear();
        self.qs.clear();
        for xs in x.chunks_exact(BLOCK) {
            let Ok(xs) = xs.try_into() else { continue };
            let block = match isa {
                // SAFETY: both SIMD families include the AVX2 quantizer's features.
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 | Isa::Avx512 => unsafe { crate::x86::quantize_avx2(xs) },
                _ => ActivationBlock::quantize(xs),
            };
            self.d.push(block.d);
            self.s.push(block.s);
            self.qs.push(block.qs);
        }
    }

    /// Lays out tiles of [`TILE`] tokens (`per_token` blocks each) for [`tile`](Self::tile):
    /// every whole tile, and when tokens are left over, one more ending at the last token
    /// (overlapping the one before: a token's result does not depend on its tile, so the
    /// overlap is computed twice to the same bits, cheaper than the leftovers one by one).
    pub fn prepare_tiles(&mut self, per_token: usize) {
        let tokens = self.d.len() / per_token;
        self.tile_starts.clear();
        self.tile_starts
            .extend((0..tokens / TILE).map(|i| i * TILE));
        if tokens > TILE && !tokens.is_multiple_of(TILE) {
            self.tile_starts.push(tokens - TILE);
        }
        let tiles = self.tile_starts.len();
        self.tiled_d.clear();
        self.tiled_s.clear();
        for &first in &self.tile_starts {
            for b in 0..per_token {
                let at = |t: usize| (first + t) * per_token + b;
                self.tiled_d.push(std::array::from_fn(|t| self.d[at(t)]));
                self.tiled_s.push(std::array::from_fn(|t| self.s[at(t)]));
            }
        }
        self.shifted.clear();
        if tiles > 0 {
            let shift = |qs: &[i8; BLOCK]| qs.map(|q| (q as u8) ^ 0x80);
            self.shifted.extend(self.qs.iter().map(shift));
        }
    }

    /// How many tiles [`prepare_tiles`](Self::prepare_tiles) laid out.
    pub fn tile_count(&self) -> usize {
        self.tile_starts.len()
    }

    /// Tile number `tile`, after [`prepare_tiles`](Self::prepare_tiles).
    pub fn tile(&self, tile: usize, per_token: usize) -> ActivationTile<'_> {
        let first = self.tile_starts[tile];
        ActivationTile {
            start: first,
            rows: std::array::from_fn(|t| self.row((first + t) * per_token, per_token)),
            shifted: std::array::from_fn(|t| {
                let start = (first + t) * per_token;
                &self.shifted[start..start + per_token]
            }),
            d: &self.tiled_d[tile * per_token..(tile + 1) * per_token],
            s: &self.tiled_s[tile * per_token..(tile + 1) * per_token],
        }
    }

    /// Blocks `first..first + len`.
    pub fn row(&self, first: usize, len: usize) -> ActivationRow<'_> {
        ActivationRow {
            d: &self.d[first..first + len],
            s: &self.s[first..first + len],
            qs: &self.qs[first..first + len],
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
