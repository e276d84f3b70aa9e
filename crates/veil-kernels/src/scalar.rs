//! The reference kernels: plain loops, one block at a time, the sums in ggml's order.

use half::f16;

use crate::activation::ActivationBlock;

/// Q4_1 weight row times `R` activation rows.
pub(crate) fn dot_q4_1<const R: usize>(w: &[u8], a: [&[ActivationBlock]; R]) -> [f32; R] {
    let mut sums = [0f32; R];
    for (b, block) in w.chunks_exact(20).enumerate() {
        let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
        let m = f16::from_le_bytes([block[2], block[3]]).to_f32();
        let qs = &block[4..20];
        for (sum, a) in sums.iter_mut().zip(a) {
            let a = &a[b];
            let mut isum = 0i32;
            for (j, &q) in qs.iter().enumerate() {
                isum += i32::from(q & 0x0F) * i32::from(a.qs[j])
                    + i32::from(q >> 4) * i32::from(a.qs[j + 16]);
            }
            *sum += isum as f32 * d * a.d + m * a.s;
        }
    }
    sums
}

/// Q8_0 weight row times `R` activation rows.
pub(crate) fn dot_q8_0<const R: usize>(w: &[u8], a: [&[ActivationBlock]; R]) -> [f32; R] {
    let mut sums = [0f32; R];
    for (b, block) in w.chunks_exact(34).enumerate() {
        let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
        let qs = &block[2..34];
        for (sum, a) in sums.iter_mut().zip(a) {
            let isum: i32 = qs
                .iter()
                .zip(&a[b].qs)
                .map(|(&q, &x)| i32::from(q as i8) * i32::from(x))
                .sum();
            *sum += isum as f32 * d * a[b].d;
        }
    }
    sums
}
