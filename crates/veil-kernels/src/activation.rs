//! Activations quantized to 8-bit blocks, so weight blocks can be multiplied with integer dot
//! products.
//!
//! The rounding follows ggml's `quantize_row_q8_0` / `quantize_row_q8_1` (and candle's copies of
//! them) exactly, scales rounded through f16 included, so a product here sums the same integers
//! with the same scales as candle and llama.cpp; only the order of float additions differs.

use half::f16;

use crate::{Isa, BLOCK};

/// One block of 32 activations: `x ≈ d * qs`, with `s = d * Σ qs` for formats with an offset.
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C)]
pub struct ActivationBlock {
    /// The scale (an f16 value, held as f32 so the hot loop needs no conversion).
    pub d: f32,
    /// The scale times the sum of the quantized values (an f16 value), for Q4_1's offset term.
    pub s: f32,
    /// The quantized values.
    pub qs: [i8; BLOCK],
}

impl ActivationBlock {
    const ZERO: Self = Self {
        d: 0.0,
        s: 0.0,
        qs: [0; BLOCK],
    };

    /// Quantizes 32 values.
    pub fn quantize(xs: &[f32; BLOCK]) -> Self {
        let amax = xs.iter().fold(0f32, |m, x| m.max(x.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut qs = [0i8; BLOCK];
        let mut sum = 0i32;
        for (q, &x) in qs.iter_mut().zip(xs) {
            *q = (x * id).round() as i8;
            sum += *q as i32;
        }
        let d = f16::from_f32(d);
        Self {
            d: d.to_f32(),
            s: (f16::from_f32(sum as f32) * d).to_f32(),
            qs,
        }
    }
}

/// Quantizes `x` (a whole number of blocks) into `out`, reusing its allocation, with the
/// instructions of `isa` (which the caller checked this CPU has).
pub(crate) fn quantize_rows(x: &[f32], out: &mut Vec<ActivationBlock>, isa: Isa) {
    out.clear();
    out.resize(x.len() / BLOCK, ActivationBlock::ZERO);
    for (block, xs) in out.iter_mut().zip(x.chunks_exact(BLOCK)) {
        if let Ok(xs) = xs.try_into() {
            *block = match isa {
                // SAFETY: both SIMD families include the AVX2 quantizer's features.
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 | Isa::Avx512 => unsafe { crate::x86::quantize_avx2(xs) },
                _ => ActivationBlock::quantize(xs),
            };
        }
    }
}

/// [`ActivationBlock::quantize`] on the instructions of `isa`: the same block, bit for bit.
/// Exposed so tests can hold every family to that.
pub fn quantize_with(isa: Isa, xs: &[f32; BLOCK]) -> Option<ActivationBlock> {
    if !isa.is_available() {
        return None;
    }
    let mut out = Vec::with_capacity(1);
    quantize_rows(xs, &mut out, isa);
    out.pop()
}
