//! x86-64 kernels: the same block sums as [`crate::scalar`], computed with SIMD integer dot
//! products.
//!
//! Written with `core::arch` intrinsics because no maintained crate offers ggml's block formats
//! with run-time dispatch. The AVX2 family handles one block (32 values) per 256-bit dot
//! product (`vpmaddubsw` + `vpmaddwd`); the AVX-512 family two blocks per 512-bit VNNI
//! `vpdpbusd`, with the AVX2 code for an odd last block.

use std::arch::x86_64::*;

use crate::activation::ActivationBlock;
use crate::BLOCK;

/// Eight i32 sums of four u8 × i8 products each, with AVX2.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn dot_avx2(unsigned: __m256i, signed: __m256i) -> __m256i {
    _mm256_madd_epi16(
        _mm256_maddubs_epi16(unsigned, signed),
        _mm256_set1_epi16(1),
    )
}

/// The sum of a vector's eight lanes.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn horizontal_sum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}

/// The two f16 values at the start of `bytes` (the second only if `bytes` holds four).
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn f16_pair(bytes: &[u8]) -> (f32, f32) {
    let bits = match bytes {
        [a, b, c, d, ..] => i32::from_le_bytes([*a, *b, *c, *d]),
        [a, b, ..] => i32::from(u16::from_le_bytes([*a, *b])),
        _ => 0,
    };
    let v = _mm_cvtph_ps(_mm_cvtsi32_si128(bits));
    (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_movehdup_ps(v)))
}

/// A Q4_1 block's 16 bytes of nibbles as 32 bytes: low nibbles (values 0..16), then high
/// nibbles (values 16..32).
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn q4_1_values(block: &[u8]) -> __m256i {
    let low = _mm_set1_epi8(0x0F);
    let q = _mm_loadu_si128(block.as_ptr().add(4).cast());
    _mm256_set_m128i(
        _mm_and_si128(_mm_srli_epi16(q, 4), low),
        _mm_and_si128(q, low),
    )
}

/// The 32 quantized values of an activation block.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn activation_values(x: &ActivationBlock) -> __m256i {
    _mm256_loadu_si256(x.qs.as_ptr().cast())
}

/// Q4_1 weight row times `R` activation rows.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; `w` holds whole 20-byte blocks and every activation
/// row at least as many blocks.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_q4_1_avx2<const R: usize>(
    w: &[u8],
    a: [&[ActivationBlock]; R],
) -> [f32; R] {
    let mut acc = [_mm256_setzero_ps(); R];
    let mut offsets = [0f32; R];
    for (b, block) in w.chunks_exact(20).enumerate() {
        let (d, m) = f16_pair(block);
        let q = q4_1_values(block);
        for r in 0..R {
            let x = &a[r][b];
            let sums = _mm256_cvtepi32_ps(dot_avx2(q, activation_values(x)));
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * x.d), sums, acc[r]);
            offsets[r] += m * x.s;
        }
    }
    let mut out = [0f32; R];
    for r in 0..R {
        out[r] = horizontal_sum(acc[r]) + offsets[r];
    }
    out
}

/// Q8_0 weight row times `R` activation rows.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; `w` holds whole 34-byte blocks and every activation
/// row at least as many blocks.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_q8_0_avx2<const R: usize>(
    w: &[u8],
    a: [&[ActivationBlock]; R],
) -> [f32; R] {
    let mut acc = [_mm256_setzero_ps(); R];
    for (b, block) in w.chunks_exact(34).enumerate() {
        let (d, _) = f16_pair(&block[..2]);
        let q = _mm256_loadu_si256(block.as_ptr().add(2).cast());
        // The dot product takes one unsigned operand: move the weights' signs onto the
        // activations (|q| of -128 reads as 128 unsigned, as it should).
        let magnitude = _mm256_sign_epi8(q, q);
        for r in 0..R {
            let x = &a[r][b];
            let signed = _mm256_sign_epi8(activation_values(x), q);
            let sums = _mm256_cvtepi32_ps(dot_avx2(magnitude, signed));
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * x.d), sums, acc[r]);
        }
    }
    let mut out = [0f32; R];
    for r in 0..R {
        out[r] = horizontal_sum(acc[r]);
    }
    out
}

/// Two 256-bit halves as one 512-bit vector.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn join(low: __m256i, high: __m256i) -> __m512i {
    _mm512_inserti64x4(_mm512_castsi256_si512(low), high, 1)
}

/// Sixteen lanes: eight of `low`, then eight of `high`.
#[inline]
#[target_feature(enable = "avx512f,avx512dq")]
unsafe fn scales(low: f32, high: f32) -> __m512 {
    _mm512_insertf32x8(_mm512_set1_ps(low), _mm256_set1_ps(high), 1)
}

/// The activation values of blocks `b` and `b + 1`.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn activation_pair(x: &[ActivationBlock], b: usize) -> __m512i {
    join(activation_values(&x[b]), activation_values(&x[b + 1]))
}

/// Q4_1 weight row times `R` activation rows, two blocks per step.
///
/// # Safety
/// The CPU must have AVX2, FMA, F16C and AVX-512 F, BW, DQ and VNNI; `w` holds whole 20-byte
/// blocks and every activation row at least as many blocks.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vnni")]
pub(crate) unsafe fn dot_q4_1_avx512<const R: usize>(
    w: &[u8],
    a: [&[ActivationBlock]; R],
) -> [f32; R] {
    let blocks = w.len() / 20;
    let mut acc = [_mm512_setzero_ps(); R];
    let mut offsets = [0f32; R];
    let mut b = 0;
    while b + 2 <= blocks {
        let (b0, b1) = (&w[b * 20..], &w[(b + 1) * 20..]);
        let (d0, m0) = f16_pair(b0);
        let (d1, m1) = f16_pair(b1);
        let q = join(q4_1_values(b0), q4_1_values(b1));
        for r in 0..R {
            let (x0, x1) = (&a[r][b], &a[r][b + 1]);
            let sums = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q, activation_pair(a[r], b));
            let sums = _mm512_cvtepi32_ps(sums);
            acc[r] = _mm512_fmadd_ps(scales(d0 * x0.d, d1 * x1.d), sums, acc[r]);
            offsets[r] += m0 * x0.s + m1 * x1.s;
        }
        b += 2;
    }
    let mut out = [0f32; R];
    for r in 0..R {
        out[r] = _mm512_reduce_add_ps(acc[r]) + offsets[r];
    }
    if b < blocks {
        let rest: [&[ActivationBlock]; R] = std::array::from_fn(|r| &a[r][b..]);
        let tail = dot_q4_1_avx2(&w[b * 20..], rest);
        for r in 0..R {
            out[r] += tail[r];
        }
    }
    out
}

/// Q8_0 weight row times `R` activation rows, two blocks per step.
///
/// # Safety
/// The CPU must have AVX2, FMA, F16C and AVX-512 F, BW, DQ and VNNI; `w` holds whole 34-byte
/// blocks and every activation row at least as many blocks.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vnni")]
pub(crate) unsafe fn dot_q8_0_avx512<const R: usize>(
    w: &[u8],
    a: [&[ActivationBlock]; R],
) -> [f32; R] {
    let blocks = w.len() / 34;
    let mut acc = [_mm512_setzero_ps(); R];
    let mut b = 0;
    while b + 2 <= blocks {
        let (b0, b1) = (&w[b * 34..], &w[(b + 1) * 34..]);
        let (d0, _) = f16_pair(&b0[..2]);
        let (d1, _) = f16_pair(&b1[..2]);
        let q = join(
            _mm256_loadu_si256(b0.as_ptr().add(2).cast()),
            _mm256_loadu_si256(b1.as_ptr().add(2).cast()),
        );
        // As in the AVX2 kernel: |q| unsigned, the weights' signs moved onto the activations.
        let magnitude = _mm512_abs_epi8(q);
        let negative = _mm512_movepi8_mask(q);
        for r in 0..R {
            let (x0, x1) = (&a[r][b], &a[r][b + 1]);
            let y = activation_pair(a[r], b);
            let signed = _mm512_mask_sub_epi8(y, negative, _mm512_setzero_si512(), y);
            let sums = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), magnitude, signed));
            acc[r] = _mm512_fmadd_ps(scales(d0 * x0.d, d1 * x1.d), sums, acc[r]);
        }
        b += 2;
    }
    let mut out = [0f32; R];
    for r in 0..R {
        out[r] = _mm512_reduce_add_ps(acc[r]);
    }
    if b < blocks {
        let rest: [&[ActivationBlock]; R] = std::array::from_fn(|r| &a[r][b..]);
        let tail = dot_q8_0_avx2(&w[b * 34..], rest);
        for r in 0..R {
            out[r] += tail[r];
        }
    }
    out
}

/// [`ActivationBlock::quantize`] with AVX2: the same scale, and the same values (rounded half
/// away from zero, as `f32::round` does), bit for bit.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn quantize_avx2(xs: &[f32; BLOCK]) -> ActivationBlock {
    let v: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(xs.as_ptr().add(8 * i)));
    let sign_bit = _mm256_set1_ps(-0.0);
    let abs = |x: __m256| _mm256_andnot_ps(sign_bit, x);
    let m = _mm256_max_ps(
        _mm256_max_ps(abs(v[0]), abs(v[1])),
        _mm256_max_ps(abs(v[2]), abs(v[3])),
    );
    let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
    let d = amax / 127.0;
    let id = _mm256_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
    let half = _mm256_set1_ps(0.5);
    let one = _mm256_set1_ps(1.0);
    let ints: [__m256i; 4] = std::array::from_fn(|i| {
        let x = _mm256_mul_ps(v[i], id);
        // Round half away from zero: truncate, then step away from zero when the dropped
        // fraction is at least one half (exact for these magnitudes).
        let t = _mm256_round_ps(x, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
        let up = _mm256_and_ps(_mm256_cmp_ps(abs(_mm256_sub_ps(x, t)), half, _CMP_GE_OQ), one);
        let r = _mm256_add_ps(t, _mm256_or_ps(up, _mm256_and_ps(x, sign_bit)));
        _mm256_cvtps_epi32(r)
    });
    // Pack to bytes; the packs interleave 128-bit lanes, the permute puts them back in order.
    let words = (
        _mm256_packs_epi32(ints[0], ints[1]),
        _mm256_packs_epi32(ints[2], ints[3]),
    );
    let bytes = _mm256_packs_epi16(words.0, words.1);
    let bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    let mut block = ActivationBlock {
        d: 0.0,
        s: 0.0,
        qs: [0; BLOCK],
    };
    _mm256_storeu_si256(block.qs.as_mut_ptr().cast(), bytes);
    let sum: i32 = block.qs.iter().map(|&q| i32::from(q)).sum();
    let d = half::f16::from_f32(d);
    block.d = d.to_f32();
    block.s = (half::f16::from_f32(sum as f32) * d).to_f32();
    block
}
