//! RMSNorm whose result does not depend on the order of the features.
//!
//! A float sum of squares rounds differently when its terms come in another order, so a model
//! whose residual stream is permuted (equivariant encryption restricted to quantization-exact
//! transforms) would drift from the plaintext model by a rounding at every norm, and greedy
//! tokens would part after a few hundred steps. Here each square (rounded to f32, as ggml
//! rounds it) is scaled by a power of two chosen from the largest square and truncated to an
//! integer, and the integers are added: integer addition does not care about order, so every
//! permutation of a row gives the same bits. The truncation drops only what lies 2^-51 below
//! the largest square, as ggml's own f64 sum would. candle's `rms_norm` adds the f32 squares
//! one after another in f32, so it could not serve, and its rounding differs from ggml's.

/// Bits an integer term may use: the sum of up to `2^(63 - TERM_BITS)` terms fits an i64.
const TERM_BITS: i32 = 52;

/// The sum of `x`'s squares, each rounded to f32 first as ggml does, returned in f64: the same
/// for every order of `x`'s values.
pub fn sum_of_squares(x: &[f32]) -> f64 {
    if x.iter().any(|v| !(v * v).is_finite()) {
        // NaN or infinity: the ordinary sum says which, and it does not depend on order.
        return x.iter().map(|&v| f64::from(v * v)).sum();
    }
    let largest = x.iter().fold(0f32, |m, &v| m.max(v * v));
    if largest == 0.0 {
        return 0.0;
    }
    // Room for `x.len()` terms below 2^63: each term below 2^(62 - log2(len)).
    let headroom = usize::BITS - x.len().leading_zeros();
    let top = (62 - headroom as i32).min(TERM_BITS);
    // The exponent of the largest square, read from its bits so no rounding can put it one
    // off (a subnormal square is scaled as if its exponent were the smallest normal one).
    let exponent = (((largest.to_bits() >> 23) & 0xff) as i32).max(1) - 127;
    let scale = power_of_two(top - 1 - exponent);
    let total: i64 = x.iter().map(|&v| (f64::from(v * v) * scale) as i64).sum();
    total as f64 / scale
}

/// `2^k` as an f64, exact over the range the squares of f32 values need.
fn power_of_two(k: i32) -> f64 {
    f64::from_bits(((1023 + i64::from(k)) as u64) << 52)
}

/// RMSNorm of each row of `x` (rows of `weight.len()` values) into `out`, rounded as ggml's
/// `rms_norm` followed by its `mul` rounds it: `mean = Σx² / n` (f64, then f32),
/// `y = (x * (1 / sqrt(mean + eps))) * weight`. A prompt's rows are split over the pool's
/// threads (each row alone gives the same bits on any thread): on the calling thread alone they
/// were 2.4% of a prompt's time, with the pool's worker waiting.
///
/// # Panics
///
/// If `x` and `out` differ in length or are not whole rows; callers check shapes first.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let n = weight.len();
    assert!(
        n > 0 && x.len() == out.len() && x.len().is_multiple_of(n),
        "rms_norm: {} values are not rows of {n}",
        x.len()
    );
    let rows = x.len() / n;
    let per_part = rows.div_ceil(crate::threads::part_count(x.len())).max(1) * n;
    let parts = x.chunks(per_part).zip(out.chunks_mut(per_part)).collect();
    crate::threads::run_parts(parts, |(x, out)| {
        for (row, out) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
            let mean = (sum_of_squares(row) / n as f64) as f32;
            let scale = 1.0 / (mean + eps).sqrt();
            for ((y, &v), &w) in out.iter_mut().zip(row).zip(weight) {
                *y = (v * scale) * w;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(n: usize, seed: u32) -> Vec<f32> {
        // Values spanning many magnitudes, so float sums in different orders disagree.
        let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                let mantissa = (s % 10_000) as f32 / 1_000.0 - 5.0;
                mantissa * 2f32.powi((s >> 20) as i32 % 24 - 12)
            })
            .collect()
    }

    #[test]
    fn every_order_gives_the_same_bits() {
        let x = sample(576, 7);
        let reference = sum_of_squares(&x);
        let naive = |x: &[f32]| x.iter().map(|v| v * v).sum::<f32>();
        let mut shuffled = x.clone();
        let mut orders_disagreeing_in_f32 = 0;
        for round in 0..50 {
            // A deterministic shuffle: rotate and reverse parts of the row.
            shuffled.rotate_left(round * 7 % 576 + 1);
            shuffled[..(round * 13) % 576].reverse();
            assert_eq!(sum_of_squares(&shuffled).to_bits(), reference.to_bits());
            orders_disagreeing_in_f32 += usize::from(naive(&shuffled) != naive(&x));
        }
        // The test means something only if plain f32 sums do depend on order here.
        assert!(orders_disagreeing_in_f32 > 0);
    }

    #[test]
    fn close_to_the_exact_sum() {
        for seed in 0..20 {
            let x = sample(640, seed);
            // ggml's sum: each square rounded to f32, added in f64.
            let ggml: f64 = x.iter().map(|&v| f64::from(v * v)).sum();
            let ours = sum_of_squares(&x);
            assert!((ours - ggml).abs() <= ggml * 1e-14, "{ours} vs {ggml}");
        }
    }

    #[test]
    fn edge_values() {
        assert_eq!(sum_of_squares(&[]), 0.0);
        assert_eq!(sum_of_squares(&[0.0, -0.0]), 0.0);
        assert_eq!(sum_of_squares(&[3.0, 4.0]), 25.0);
        assert!(sum_of_squares(&[1.0, f32::NAN]).is_nan());
        assert_eq!(sum_of_squares(&[1.0, f32::INFINITY]), f64::INFINITY);
        assert_eq!(sum_of_squares(&[f32::MAX, 1.0]), f64::INFINITY);
        let tiny = f32::from_bits(1); // the smallest subnormal: its square rounds to 0
        assert_eq!(sum_of_squares(&[tiny, tiny]), 0.0);
        let small = [1e-20f32, 2e-20]; // squares are f32 subnormals
        let ggml: f64 = small.iter().map(|&v| f64::from(v * v)).sum();
        assert_eq!(sum_of_squares(&small), ggml);
    }

    #[test]
    fn norm_matches_the_formula_on_any_split() {
        // Enough rows that they are split over the pool, and an odd count so the parts differ.
        let x = sample(64 * 67, 3);
        let w = sample(64, 4);
        let mut out = vec![0f32; x.len()];
        crate::with_thread_limit(1, || rms_norm(&x, &w, 1e-5, &mut out));
        let mut split = vec![f32::NAN; x.len()];
        crate::with_thread_limit(2, || rms_norm(&x, &w, 1e-5, &mut split));
        assert!(out
            .iter()
            .zip(&split)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
        for (row, out) in x.chunks(64).zip(out.chunks(64)) {
            let ms: f64 = row.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / 64.0;
            let m = (ms + 1e-5).sqrt();
            for ((y, &v), &w) in out.iter().zip(row).zip(&w) {
                let expected = f64::from(v) / m * f64::from(w);
                assert!((f64::from(*y) - expected).abs() <= 1e-5 * expected.abs().max(1e-3));
            }
        }
    }
}
