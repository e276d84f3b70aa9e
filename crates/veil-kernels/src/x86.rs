//! x86-64 kernels: the block sums of [`crate::scalar`], bit for bit, with SIMD.
//!
//! Written with `core::arch` intrinsics because no maintained crate offers ggml's block formats
//! with run-time dispatch. Each block's 32 products are summed by one 256-bit integer dot
//! product (AVX2's `vpmaddubsw` + `vpmaddwd`, or VNNI's `vpdpbusd`) and reduced to an exact
//! integer sum; the float terms are formed in vectors with the reference's roundings and added
//! block after block, in the reference's order. One or four tokens go eight blocks at a time
//! (one lane per block); a tile of eight tokens goes block by block (one lane per token).

use std::arch::x86_64::*;

use crate::activation::{ActivationBlock, ActivationRow, ActivationTile, TILE};
use crate::matrix::WeightRow;
use crate::BLOCK;

/// Eight i32 sums of four u8 × i8 products each, with AVX2.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn dot_avx2(unsigned: __m256i, signed: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(unsigned, signed), _mm256_set1_epi16(1))
}

/// Eight i32 sums of four u8 × i8 products each, with VNNI.
#[inline]
#[target_feature(enable = "avx2,avx512vnni,avx512vl")]
unsafe fn dot_vnni(unsigned: __m256i, signed: __m256i) -> __m256i {
    _mm256_dpbusd_epi32(_mm256_setzero_si256(), unsigned, signed)
}

/// Lane `i` of the result is the sum of the eight lanes of `v[i]` (integer sums: exact).
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn lane_sums(v: &[__m256i; 8]) -> __m256i {
    let h0123 = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
    let h4567 = _mm256_hadd_epi32(_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
    _mm256_add_epi32(
        _mm256_permute2x128_si256(h0123, h4567, 0x20),
        _mm256_permute2x128_si256(h0123, h4567, 0x31),
    )
}

/// The sum of one vector's eight integer lanes.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn lane_total(v: __m256i) -> i32 {
    let mut lanes = [0i32; 8];
    _mm256_storeu_si256(lanes.as_mut_ptr().cast(), v);
    lanes.iter().sum()
}

/// Adds each row's eight block terms (`terms[r]`, one lane per block) to `sums[r]` one block
/// after another: the reference's order.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn add_in_order<const R: usize>(sums: &mut [f32; R], terms: &[__m256; R]) {
    for (sum, &t) in sums.iter_mut().zip(terms) {
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), t);
        for t in lanes {
            *sum += t;
        }
    }
}

/// A Q4_1 block's 16 bytes of nibbles as 32 bytes: low nibbles (values 0..16), then high
/// nibbles (values 16..32).
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn q4_1_values(qs: &[u8]) -> __m256i {
    let low = _mm_set1_epi8(0x0F);
    let q = _mm_loadu_si128(qs[..16].as_ptr().cast());
    _mm256_set_m128i(
        _mm_and_si128(_mm_srli_epi16(q, 4), low),
        _mm_and_si128(q, low),
    )
}

/// 32 bytes from the start of `bytes`.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn load32<T>(bytes: &[T]) -> __m256i {
    debug_assert!(std::mem::size_of_val(bytes) >= 32);
    _mm256_loadu_si256(bytes.as_ptr().cast())
}

/// Eight f32 from the start of `values`.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn load8(values: &[f32]) -> __m256 {
    _mm256_loadu_ps(values[..8].as_ptr())
}

macro_rules! block_kernels {
    ($features:literal, $dot:ident, $q4_1:ident, $q8_0:ident) => {
        /// Q4_1 weight row times `R` activation rows.
        ///
        /// # Safety
        /// The CPU must have the features named above; every activation row holds as many
        /// blocks as the weight row.
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn $q4_1<const R: usize>(
            w: WeightRow<'_>,
            a: [ActivationRow<'_>; R],
        ) -> [f32; R] {
            let blocks = w.d.len();
            let mut sums = [0f32; R];
            let mut q = [_mm256_setzero_si256(); 8];
            let mut products = [_mm256_setzero_si256(); 8];
            let mut terms = [_mm256_setzero_ps(); R];
            let mut b = 0;
            while b + 8 <= blocks {
                for i in 0..8 {
                    q[i] = q4_1_values(&w.qs[(b + i) * 16..]);
                }
                let (dw, mw) = (load8(&w.d[b..]), load8(&w.m[b..]));
                for r in 0..R {
                    let x = a[r];
                    let xq = &x.qs[b..b + 8];
                    for i in 0..8 {
                        products[i] = $dot(q[i], load32(&xq[i]));
                    }
                    let isums = _mm256_cvtepi32_ps(lane_sums(&products));
                    let scaled = _mm256_mul_ps(_mm256_mul_ps(isums, dw), load8(&x.d[b..]));
                    terms[r] = _mm256_add_ps(scaled, _mm256_mul_ps(mw, load8(&x.s[b..])));
                }
                add_in_order(&mut sums, &terms);
                b += 8;
            }
            for b in b..blocks {
                let q = q4_1_values(&w.qs[b * 16..]);
                for r in 0..R {
                    let x = a[r];
                    let isum = lane_total($dot(q, load32(&x.qs[b])));
                    sums[r] += isum as f32 * w.d[b] * x.d[b] + w.m[b] * x.s[b];
                }
            }
            sums
        }

        /// Q8_0 weight row times `R` activation rows.
        ///
        /// # Safety
        /// The CPU must have the features named above; every activation row holds as many
        /// blocks as the weight row.
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn $q8_0<const R: usize>(
            w: WeightRow<'_>,
            a: [ActivationRow<'_>; R],
        ) -> [f32; R] {
            let blocks = w.d.len();
            let mut sums = [0f32; R];
            let mut q = [_mm256_setzero_si256(); 8];
            let mut magnitude = [_mm256_setzero_si256(); 8];
            let mut products = [_mm256_setzero_si256(); 8];
            let mut terms = [_mm256_setzero_ps(); R];
            let mut b = 0;
            // The dot products take one unsigned operand: |q| (-128 reads as 128 unsigned, as
            // it should), with the weights' signs moved onto the activations.
            while b + 8 <= blocks {
                for i in 0..8 {
                    q[i] = load32(&w.qs[(b + i) * 32..]);
                    magnitude[i] = _mm256_sign_epi8(q[i], q[i]);
                }
                let dw = load8(&w.d[b..]);
                for r in 0..R {
                    let x = a[r];
                    let xq = &x.qs[b..b + 8];
                    for i in 0..8 {
                        let signed = _mm256_sign_epi8(load32(&xq[i]), q[i]);
                        products[i] = $dot(magnitude[i], signed);
                    }
                    let isums = _mm256_cvtepi32_ps(lane_sums(&products));
                    terms[r] = _mm256_mul_ps(_mm256_mul_ps(isums, dw), load8(&x.d[b..]));
                }
                add_in_order(&mut sums, &terms);
                b += 8;
            }
            for b in b..blocks {
                let q = load32(&w.qs[b * 32..]);
                for r in 0..R {
                    let x = a[r];
                    let signed = _mm256_sign_epi8(load32(&x.qs[b]), q);
                    let isum = lane_total($dot(_mm256_sign_epi8(q, q), signed));
                    sums[r] += isum as f32 * w.d[b] * x.d[b];
                }
            }
            sums
        }
    };
}

block_kernels!("avx2,fma,f16c", dot_avx2, dot_q4_1_avx2, dot_q8_0_avx2);

/// Kernels for a tile of eight tokens, block by block with one lane per token: each block's
/// eight dot products are reduced to the eight tokens' exact sums, scaled in one vector, and
/// added to the eight running sums, block after block: the reference's order without a
/// transpose.
macro_rules! tile_kernels {
    ($features:literal, $q4_1:ident, $q8_0:ident, $product:ident) => {
        /// Q4_1 weight row times a tile of eight tokens.
        ///
        /// # Safety
        /// The CPU must have the features named above; the tile holds as many blocks as the
        /// weight row.
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn $q4_1(w: WeightRow<'_>, x: &ActivationTile<'_>) -> [f32; TILE] {
            let mut acc = _mm256_setzero_ps();
            let mut products = [_mm256_setzero_si256(); TILE];
            for b in 0..w.d.len() {
                let q = q4_1_values(&w.qs[b * 16..]);
                for t in 0..TILE {
                    products[t] = dot_avx2_or_vnni!($product, q, load32(&x.rows[t].qs[b]));
                }
                let isums = _mm256_cvtepi32_ps(lane_sums(&products));
                let scaled =
                    _mm256_mul_ps(_mm256_mul_ps(isums, _mm256_set1_ps(w.d[b])), load8(&x.d[b]));
                let offsets = _mm256_mul_ps(_mm256_set1_ps(w.m[b]), load8(&x.s[b]));
                acc = _mm256_add_ps(acc, _mm256_add_ps(scaled, offsets));
            }
            let mut out = [0f32; TILE];
            _mm256_storeu_ps(out.as_mut_ptr(), acc);
            out
        }

        /// Q8_0 weight row times a tile of eight tokens.
        ///
        /// # Safety
        /// The CPU must have the features named above; the tile holds as many blocks as the
        /// weight row.
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn $q8_0(w: WeightRow<'_>, x: &ActivationTile<'_>) -> [f32; TILE] {
            let mut acc = _mm256_setzero_ps();
            let mut products = [_mm256_setzero_si256(); TILE];
            for b in 0..w.d.len() {
                let q = load32(&w.qs[b * 32..]);
                let isums = q8_0_tile_sums!($product, q, x, b, w.sums[b], products);
                let isums = _mm256_cvtepi32_ps(isums);
                let scaled =
                    _mm256_mul_ps(_mm256_mul_ps(isums, _mm256_set1_ps(w.d[b])), load8(&x.d[b]));
                acc = _mm256_add_ps(acc, scaled);
            }
            let mut out = [0f32; TILE];
            _mm256_storeu_ps(out.as_mut_ptr(), acc);
            out
        }
    };
}

/// One block's u8 × i8 dot product on either family.
macro_rules! dot_avx2_or_vnni {
    (avx2, $u:expr, $s:expr) => {
        dot_avx2($u, $s)
    };
    (vnni, $u:expr, $s:expr) => {
        dot_vnni($u, $s)
    };
}

/// Eight tokens' exact integer sums for Q8_0 block `b` with weights `q`.
macro_rules! q8_0_tile_sums {
    // AVX2: |q| unsigned, the weights' signs moved onto the activations.
    (avx2, $q:expr, $x:expr, $b:expr, $sum:expr, $products:expr) => {{
        let magnitude = _mm256_sign_epi8($q, $q);
        for t in 0..TILE {
            $products[t] = dot_avx2(magnitude, _mm256_sign_epi8(load32(&$x.rows[t].qs[$b]), $q));
        }
        lane_sums(&$products)
    }};
    // VNNI: (x + 128) unsigned times q, then 128 · Σq taken back off.
    (vnni, $q:expr, $x:expr, $b:expr, $sum:expr, $products:expr) => {{
        for t in 0..TILE {
            $products[t] = dot_vnni(load32(&$x.shifted[t][$b]), $q);
        }
        _mm256_sub_epi32(lane_sums(&$products), _mm256_set1_epi32(128 * $sum))
    }};
}

tile_kernels!("avx2,fma,f16c", tile_q4_1_avx2, tile_q8_0_avx2, avx2);
tile_kernels!(
    "avx2,fma,f16c,avx512vnni,avx512vl",
    tile_q4_1_avx512,
    tile_q8_0_vnni,
    vnni
);
block_kernels!(
    "avx2,fma,f16c,avx512vnni,avx512vl",
    dot_vnni,
    dot_q4_1_avx512,
    dot_q8_0_avx512
);

/// [`ActivationBlock::quantize`] with AVX2: the same scale, and the same values (rounded half
/// away from zero, as `f32::round` does), bit for bit.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn quantize_avx2(xs: &[f32; BLOCK]) -> ActivationBlock {
    let sign_bit = _mm256_set1_ps(-0.0);
    let mut v = [_mm256_setzero_ps(); 4];
    let mut m = _mm256_setzero_ps();
    for i in 0..4 {
        v[i] = _mm256_loadu_ps(xs[8 * i..].as_ptr());
        m = _mm256_max_ps(m, _mm256_andnot_ps(sign_bit, v[i]));
    }
    let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
    let d = amax / 127.0;
    let id = _mm256_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
    let (half, one) = (_mm256_set1_ps(0.5), _mm256_set1_ps(1.0));
    let mut ints = [_mm256_setzero_si256(); 4];
    for i in 0..4 {
        let x = _mm256_mul_ps(v[i], id);
        // Round half away from zero: truncate, then step away from zero when the dropped
        // fraction is at least one half (exact at these magnitudes).
        let t = _mm256_round_ps(x, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
        let fraction = _mm256_andnot_ps(sign_bit, _mm256_sub_ps(x, t));
        let step = _mm256_and_ps(_mm256_cmp_ps(fraction, half, _CMP_GE_OQ), one);
        let r = _mm256_add_ps(t, _mm256_or_ps(step, _mm256_and_ps(x, sign_bit)));
        ints[i] = _mm256_cvtps_epi32(r);
    }
    // Pack to bytes; the packs interleave 128-bit lanes, the permute puts them back in order.
    let bytes = _mm256_packs_epi16(
        _mm256_packs_epi32(ints[0], ints[1]),
        _mm256_packs_epi32(ints[2], ints[3]),
    );
    let bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    let mut qs = [0i8; BLOCK];
    _mm256_storeu_si256(qs.as_mut_ptr().cast(), bytes);
    ActivationBlock::with_values(d, qs)
}
