//! The reference kernels: plain loops in ggml's order, which every SIMD family matches bit for
//! bit.
//!
//! 32-value formats: each block's integer sum is exact; the float terms are then added block by
//! block, `sum += isum · d_w · d_x (+ m_w · s_x)`, each operation rounded on its own.
//!
//! K formats (superblocks of 256 values times ggml's Q8_K activations), superblock after
//! superblock:
//! - `isum = Σ_j sc_j · Σ_{i in sub-block j} q_i · x_i`, exact in i32 (with Q6_K's signed
//!   values `q - 32`);
//! - Q4_K / Q5_K: `msum = Σ_j m_j · (bsum_{2j} + bsum_{2j+1})`, exact in i32 (the sums of the
//!   activations of sub-block `j`), then
//!   `sum += ((d_w · d_x) · isum) - ((dmin_w · d_x) · msum)`;
//! - Q6_K: `sum += (d_w · d_x) · isum`;
//!
//! every product and sum rounded to f32 on its own, in that order.

use crate::activation::ActivationRow;
use crate::matrix::{block_value, k_value, QuantFormat, WeightRow};
use crate::{BLOCK, SUPERBLOCK};

/// Q4_0 weight row times `R` activation rows.
pub(crate) fn dot_q4_0<const R: usize>(w: WeightRow<'_>, a: [ActivationRow<'_>; R]) -> [f32; R] {
    signed_blocks(w, a, 0, 8)
}

/// Q5_0 weight row times `R` activation rows.
pub(crate) fn dot_q5_0<const R: usize>(w: WeightRow<'_>, a: [ActivationRow<'_>; R]) -> [f32; R] {
    signed_blocks(w, a, QuantFormat::Q5_0.high_bytes(), 16)
}

/// Blocks of `w = d * (q - offset)`, with `high` bytes of high bits per block.
fn signed_blocks<const R: usize>(
    w: WeightRow<'_>,
    a: [ActivationRow<'_>; R],
    high: usize,
    offset: i32,
) -> [f32; R] {
    a.map(|a| {
        let mut sum = 0f32;
        for b in 0..w.d.len() {
            let (qs, qh) = (&w.qs[b * 16..(b + 1) * 16], &w.qh[b * high..(b + 1) * high]);
            let isum: i32 = (0..BLOCK)
                .map(|i| (block_value(qs, qh, i) - offset) * i32::from(a.qs[b][i]))
                .sum();
            sum += isum as f32 * w.d[b] * a.d[b];
        }
        sum
    })
}

/// Q4_1 weight row times `R` activation rows.
pub(crate) fn dot_q4_1<const R: usize>(w: WeightRow<'_>, a: [ActivationRow<'_>; R]) -> [f32; R] {
    a.map(|a| {
        let mut sum = 0f32;
        for b in 0..w.d.len() {
            let qs = crate::matrix::q4_1_block_bytes(w.qs, w.d.len(), b);
            let mut isum = 0i32;
            for (j, &q) in qs.iter().enumerate() {
                isum += i32::from(q & 0x0F) * i32::from(a.qs[b][j])
                    + i32::from(q >> 4) * i32::from(a.qs[b][j + 16]);
            }
            sum += isum as f32 * w.d[b] * a.d[b] + w.m[b] * a.s[b];
        }
        sum
    })
}

/// Q5_1 weight row times `R` activation rows.
pub(crate) fn dot_q5_1<const R: usize>(w: WeightRow<'_>, a: [ActivationRow<'_>; R]) -> [f32; R] {
    a.map(|a| {
        let mut sum = 0f32;
        for b in 0..w.d.len() {
            let high = QuantFormat::Q5_1.high_bytes();
            let (qs, qh) = (&w.qs[b * 16..(b + 1) * 16], &w.qh[b * high..(b + 1) * high]);
            let isum: i32 = (0..BLOCK)
                .map(|i| block_value(qs, qh, i) * i32::from(a.qs[b][i]))
                .sum();
            sum += isum as f32 * w.d[b] * a.d[b] + w.m[b] * a.s[b];
        }
        sum
    })
}

/// Q8_0 weight row times `R` activation rows.
pub(crate) fn dot_q8_0<const R: usize>(w: WeightRow<'_>, a: [ActivationRow<'_>; R]) -> [f32; R] {
    a.map(|a| {
        let mut sum = 0f32;
        for b in 0..w.d.len() {
            let isum: i32 = w.qs[b * 32..(b + 1) * 32]
                .iter()
                .zip(&a.qs[b])
                .map(|(&q, &x)| i32::from(q as i8) * i32::from(x))
                .sum();
            sum += isum as f32 * w.d[b] * a.d[b];
        }
        sum
    })
}

/// The values of K superblock `b` of `w` and of activation row `a`.
fn superblock<'a>(
    w: &WeightRow<'a>,
    a: &ActivationRow<'a>,
    b: usize,
    format: QuantFormat,
) -> (&'a [u8], &'a [u8], &'a [u8], &'a [i8]) {
    let high = format.high_bytes();
    (
        &w.qs[b * 128..(b + 1) * 128],
        &w.qh[b * high..(b + 1) * high],
        &w.scales[b * 16..(b + 1) * 16],
        a.qs[b * 8..(b + 1) * 8].as_flattened(),
    )
}

/// Q4_K or Q5_K weight row times `R` activation rows.
pub(crate) fn dot_q45_k<const R: usize>(
    w: WeightRow<'_>,
    a: [ActivationRow<'_>; R],
    format: QuantFormat,
) -> [f32; R] {
    a.map(|a| {
        let mut sum = 0f32;
        for b in 0..w.d.len() {
            let (qs, qh, scales, x) = superblock(&w, &a, b, format);
            let isum: i32 = (0..SUPERBLOCK)
                .map(|i| i32::from(scales[i / 32]) * k_value(format, qs, qh, i) * i32::from(x[i]))
                .sum();
            let msum: i32 = (0..8)
                .map(|j| {
                    let pair = i32::from(a.bsums[b][2 * j]) + i32::from(a.bsums[b][2 * j + 1]);
                    i32::from(scales[8 + j]) * pair
                })
                .sum();
            sum += w.d[b] * a.d[b] * isum as f32 - w.m[b] * a.d[b] * msum as f32;
        }
        sum
    })
}

/// Q6_K weight row times `R` activation rows.
pub(crate) fn dot_q6_k<const R: usize>(w: WeightRow<'_>, a: [ActivationRow<'_>; R]) -> [f32; R] {
    a.map(|a| {
        let mut sum = 0f32;
        for b in 0..w.d.len() {
            let (qs, qh, scales, x) = superblock(&w, &a, b, QuantFormat::Q6_K);
            let isum: i32 = (0..SUPERBLOCK)
                .map(|i| {
                    let q = k_value(QuantFormat::Q6_K, qs, qh, i) - 32;
                    i32::from(scales[i / 16] as i8) * q * i32::from(x[i])
                })
                .sum();
            sum += w.d[b] * a.d[b] * isum as f32;
        }
        sum
    })
}
