//! The reference kernels: plain loops in ggml's order. Each block's integer sum is exact; the
//! float terms are then added block by block, `sum += isum · d_w · d_x (+ m_w · s_x)`, each
//! operation rounded on its own. The SIMD kernels keep exactly this order, so every family
//! returns the same bits.

use crate::activation::ActivationRow;
use crate::matrix::WeightRow;

/// Q4_1 weight row times `R` activation rows.
pub(crate) fn dot_q4_1<const R: usize>(w: WeightRow<'_>, a: [ActivationRow<'_>; R]) -> [f32; R] {
    a.map(|a| {
        let mut sum = 0f32;
        for b in 0..w.d.len() {
            let qs = &w.qs[b * 16..(b + 1) * 16];
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
