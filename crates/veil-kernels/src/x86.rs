//! x86-64 kernels: the block sums of [`crate::scalar`], bit for bit, with SIMD.
//!
//! Written with `core::arch` intrinsics because no maintained crate offers ggml's block formats
//! with run-time dispatch. Each block's 32 products are summed by one 256-bit integer dot
//! product (AVX2's `vpmaddubsw` + `vpmaddwd`, or VNNI's `vpdpbusd`) and reduced to an exact
//! integer sum; the float terms are formed in vectors with the reference's roundings and added
//! block after block, in the reference's order. One or four tokens go eight blocks at a time
//! (one lane per block); a tile of eight tokens goes block by block (one lane per token, see
//! "Prompt tiles" below).

use std::arch::x86_64::*;

use crate::activation::{
    ActivationBlock, ActivationRow, ActivationSuperblock, ActivationTile, SUPERBLOCK_SUMS, TILE,
};
use crate::matrix::{QuantFormat, WeightRow};
use crate::{BLOCK, SUPERBLOCK};

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
    q4_1_expand(_mm_loadu_si128(qs[..16].as_ptr().cast()))
}

/// [`q4_1_values`] of 16 bytes already in a register.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn q4_1_expand(bytes: __m128i) -> __m256i {
    // The 16 bytes in both halves, the upper half shifted by a nibble: no cross-lane shuffle.
    let q = _mm256_broadcastsi128_si256(bytes);
    let shifts = _mm256_set_epi32(4, 4, 4, 4, 0, 0, 0, 0);
    _mm256_and_si256(_mm256_srlv_epi32(q, shifts), _mm256_set1_epi8(0x0F))
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

/// Asks for the values of the row `ahead` rows into `rest` (rows of `row_bytes`), so they are
/// in cache when that row's turn comes. Q8_0's rows (twice the bytes of 4-bit rows for the
/// same work) outran the hardware's own prefetching when a matrix streams from L3: a decode
/// step's large products ran 20-30% faster with it, smaller and 4-bit ones no slower.
#[inline]
#[target_feature(enable = "sse")]
unsafe fn prefetch_row(rest: &[u8], row_bytes: usize, ahead: usize) {
    let skip = row_bytes * (ahead - 1);
    if rest.len() >= skip + row_bytes {
        let row = rest[skip..].as_ptr().cast::<i8>();
        for line in (0..row_bytes).step_by(64) {
            _mm_prefetch::<_MM_HINT_T0>(row.add(line));
        }
    }
}

/// Consecutive weight rows times one token through a one-row kernel (`$dot`), in one call per
/// thread's run of rows: a decode step's rows are short, and a call, a dispatch and the slicing
/// per row showed (3-5%).
macro_rules! row_loop_kernel {
    ($features:literal, $rows:ident, $dot:ident, $format:expr) => {
        row_loop_kernel!($features, $rows, $dot, $format, 0);
    };
    ($features:literal, $rows:ident, $dot:ident, $format:expr, $prefetch_rows:expr) => {
        /// Consecutive weight rows (`units` blocks each, `w` spanning them all) times `R`
        /// tokens, `R` outputs per row (row-major), each as the one-row kernel computes it:
        /// one call for a thread's run of rows, so a decode step (or a few) pays no call per
        /// row.
        ///
        /// # Safety
        /// The CPU must have the features named above; each of `a` holds `units` blocks, `w`
        /// `out.len() / R * units`.
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn $rows<const R: usize>(
            w: WeightRow<'_>,
            units: usize,
            a: [ActivationRow<'_>; R],
            out: &mut [f32],
        ) {
            let mut w = w;
            for o in out.chunks_exact_mut(R) {
                let (row, rest) = w.split_first(units, $format);
                if $prefetch_rows > 0 {
                    prefetch_row(rest.qs, row.qs.len(), $prefetch_rows);
                }
                o.copy_from_slice(&$dot(row, a));
                w = rest;
            }
        }
    };
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
            // Whole groups of eight blocks are interleaved (`matrix::interleave_q4_1_row`):
            // with the activations regrouped the same way, lane `i` of the products is block
            // `i`'s exact sum, without a horizontal reduction.
            let groups = blocks / 8 * 8;
            if a.iter().all(|x| x.words.len() >= groups) {
                let low = _mm256_set1_epi8(0x0F);
                while b + 8 <= blocks {
                    let words: [__m256i; 4] =
                        std::array::from_fn(|k| load32(&w.qs[b * 16 + 32 * k..]));
                    let lo = words.map(|v| _mm256_and_si256(v, low));
                    let hi = words.map(|v| _mm256_and_si256(_mm256_srli_epi16(v, 4), low));
                    let (dw, mw) = (load8(&w.d[b..]), load8(&w.m[b..]));
                    for r in 0..R {
                        let x = a[r];
                        let xw = &x.words[b..b + 8];
                        let mut isums = _mm256_setzero_si256();
                        for k in 0..4 {
                            isums = _mm256_add_epi32(isums, $dot(lo[k], load32(&xw[k])));
                            isums = _mm256_add_epi32(isums, $dot(hi[k], load32(&xw[k + 4])));
                        }
                        let isums = _mm256_cvtepi32_ps(isums);
                        let scaled = _mm256_mul_ps(_mm256_mul_ps(isums, dw), load8(&x.d[b..]));
                        terms[r] = _mm256_add_ps(scaled, _mm256_mul_ps(mw, load8(&x.s[b..])));
                    }
                    add_in_order(&mut sums, &terms);
                    b += 8;
                }
            }
            while b + 8 <= blocks {
                for i in 0..8 {
                    q[i] = q4_1_values(&crate::matrix::q4_1_block_bytes(w.qs, blocks, b + i));
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
            // The last (fewer than eight) blocks: their sums reduced together (lanes past the
            // row's end are zero and ignored), the float terms added one by one.
            let rest = blocks - b;
            if rest > 0 {
                let mut isums = [0i32; 8];
                for r in 0..R {
                    let x = a[r];
                    let mut tail = [_mm256_setzero_si256(); 8];
                    for (i, t) in tail.iter_mut().enumerate().take(rest) {
                        *t = $dot(q4_1_values(&w.qs[(b + i) * 16..]), load32(&x.qs[b + i]));
                    }
                    _mm256_storeu_si256(isums.as_mut_ptr().cast(), lane_sums(&tail));
                    for (i, &isum) in isums.iter().enumerate().take(rest) {
                        let b = b + i;
                        sums[r] += isum as f32 * w.d[b] * x.d[b] + w.m[b] * x.s[b];
                    }
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
            // The last (fewer than eight) blocks, as in Q4_1.
            let rest = blocks - b;
            if rest > 0 {
                let mut isums = [0i32; 8];
                for r in 0..R {
                    let x = a[r];
                    let mut tail = [_mm256_setzero_si256(); 8];
                    for (i, t) in tail.iter_mut().enumerate().take(rest) {
                        let q = load32(&w.qs[(b + i) * 32..]);
                        let signed = _mm256_sign_epi8(load32(&x.qs[b + i]), q);
                        *t = $dot(_mm256_sign_epi8(q, q), signed);
                    }
                    _mm256_storeu_si256(isums.as_mut_ptr().cast(), lane_sums(&tail));
                    for (i, &isum) in isums.iter().enumerate().take(rest) {
                        let b = b + i;
                        sums[r] += isum as f32 * w.d[b] * x.d[b];
                    }
                }
            }
            sums
        }
    };
}

block_kernels!("avx2,fma,f16c", dot_avx2, dot_q4_1_avx2, dot_q8_0_avx2);

block_kernels!(
    "avx2,fma,f16c,avx512vnni,avx512vl",
    dot_vnni,
    dot_q4_1_avx512,
    dot_q8_0_avx512
);
row_loop_kernel!(
    "avx2,fma,f16c",
    rows_q4_1_avx2,
    dot_q4_1_avx2,
    QuantFormat::Q4_1
);
row_loop_kernel!(
    "avx2,fma,f16c",
    rows_q8_0_avx2,
    dot_q8_0_avx2,
    QuantFormat::Q8_0,
    4
);
row_loop_kernel!(
    "avx2,fma,f16c,avx512vnni,avx512vl",
    rows_q4_1_avx512,
    dot_q4_1_avx512,
    QuantFormat::Q4_1
);
row_loop_kernel!(
    "avx2,fma,f16c,avx512vnni,avx512vl",
    rows_q8_0_avx512,
    dot_q8_0_avx512,
    QuantFormat::Q8_0,
    4
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

/// [`ActivationSuperblock::quantize`] with AVX2, bit for bit: the largest magnitude by vector
/// maxima, then the same products, roundings (adding and taking back off 1.5 · 2^23) and cap
/// in eight lanes. The scalar loop converted one value at a time (2% of a Q4_K_M prompt).
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn quantize_superblock_avx2(xs: &[f32; SUPERBLOCK]) -> ActivationSuperblock {
    let sign_bit = _mm256_set1_ps(-0.0);
    let mut m = _mm256_setzero_ps();
    for chunk in xs.chunks_exact(8) {
        m = _mm256_max_ps(
            m,
            _mm256_andnot_ps(sign_bit, _mm256_loadu_ps(chunk.as_ptr())),
        );
    }
    let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
    let mut block = ActivationSuperblock {
        d: 0.0,
        qs: [0; SUPERBLOCK],
        bsums: [0; SUPERBLOCK_SUMS],
    };
    if amax == 0.0 {
        return block;
    }
    // The first value of that magnitude gives the sign, as the scalar scan keeps it.
    let max = xs.iter().copied().find(|x| x.abs() == amax).unwrap_or(amax);
    let iscale = -127.0 / max;
    let (scale, magic, cap) = (
        _mm256_set1_ps(iscale),
        _mm256_set1_ps(12_582_912.0),
        _mm256_set1_ps(127.0),
    );
    for (qs, xs) in block.qs.chunks_exact_mut(32).zip(xs.chunks_exact(32)) {
        let ints: [__m256i; 4] = std::array::from_fn(|i| {
            let v = _mm256_mul_ps(_mm256_loadu_ps(xs[8 * i..].as_ptr()), scale);
            let rounded = _mm256_sub_ps(_mm256_add_ps(v, magic), magic);
            _mm256_cvtps_epi32(_mm256_min_ps(rounded, cap))
        });
        let bytes = _mm256_packs_epi16(
            _mm256_packs_epi32(ints[0], ints[1]),
            _mm256_packs_epi32(ints[2], ints[3]),
        );
        let bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(qs.as_mut_ptr().cast(), bytes);
    }
    for (sum, qs) in block.bsums.iter_mut().zip(block.qs.chunks_exact(16)) {
        *sum = qs.iter().map(|&q| i16::from(q)).sum();
    }
    block.d = 1.0 / iscale;
    block
}

// ---------------------------------------------------------------------------------------------
// Q4_0, Q5_0, Q5_1 and the K formats.
//
// The 32-value formats' values are expanded to unsigned bytes (Q5's high bits from their packed
// mask), multiplied with the activations by one u8 × i8 dot product, and Q4_0's and Q5_0's
// fixed offsets taken back off as `offset · Σx` (the activations' exact block sums): the
// integer sum of `(q - offset) · x` without sign tricks. Float terms as in Q4_1 / Q8_0.
//
// The K formats' superblocks are expanded to eight vectors of 32 unsigned values (vector `k`
// holding values `32k..32k + 32`, multiplied with activation entry `k`); `vpmaddubsw` forms the
// pair sums (at most 2 · 63 · 127, no saturation), `vpmaddwd` with the sub-block scales (or
// VNNI's `vpdpwssd`, which also accumulates) the scaled i32 sums. Each superblock's sums are
// reduced to exact integers and added in the reference's float order (see `scalar`).
// ---------------------------------------------------------------------------------------------

/// Block `b`'s 8 bytes of high bits (laid out by `crate::matrix::spread_high_bits`)
/// broadcast to every 64-bit quarter and shifted right by the quarter's index: byte `i` then
/// holds bit 4 of value `i` in its bit 4 (its other bits are other values'). Shifts only, no
/// byte shuffle. (A macro: as a function it was not inlined into the AVX-512 loops, 10% slower.)
macro_rules! q5_high_shifted {
    ($w:expr, $b:expr) => {{
        let qh = &$w.qh[$b * 8..$b * 8 + 8];
        // The slice checks the 8 bytes are there; the read is one broadcast load.
        let spread = i64::from_le(qh.as_ptr().cast::<i64>().read_unaligned());
        _mm256_srlv_epi64(_mm256_set1_epi64x(spread), _mm256_set_epi64x(3, 2, 1, 0))
    }};
}

/// Block `b` of a Q4_0 row as 32 unsigned values (0..16). (Macros rather than functions, so
/// the eight-block loops inline them.)
macro_rules! q4_0_values {
    ($w:expr, $b:expr) => {
        q4_1_values(&$w.qs[$b * 16..])
    };
}

/// `q5_values` with AVX-512VL's three-input logic: the high bits masked and merged into the
/// low ones in one instruction.
macro_rules! q5_values_vl {
    ($w:expr, $b:expr) => {
        // low | (high & 0x10)
        _mm256_ternarylogic_epi32::<0xF8>(
            q4_1_values(&$w.qs[$b * 16..]),
            q5_high_shifted!($w, $b),
            _mm256_set1_epi8(0x10),
        )
    };
}

/// Block `b` of a Q5_0 or Q5_1 row as 32 unsigned values (0..32).
macro_rules! q5_values {
    ($w:expr, $b:expr) => {
        _mm256_or_si256(
            q4_1_values(&$w.qs[$b * 16..]),
            _mm256_and_si256(q5_high_shifted!($w, $b), _mm256_set1_epi8(0x10)),
        )
    };
}

/// Superblock `b` of a Q4_K row as eight vectors of 32 unsigned values (0..16): each 32 bytes
/// hold values `64c..64c + 32` in their low nibbles and the next 32 in their high ones.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn q4_k_values(w: &WeightRow<'_>, b: usize) -> [__m256i; 8] {
    let qs = &w.qs[b * 128..(b + 1) * 128];
    let low = _mm256_set1_epi8(0x0F);
    let mut v = [_mm256_setzero_si256(); 8];
    for c in 0..4 {
        let q = load32(&qs[32 * c..]);
        v[2 * c] = _mm256_and_si256(q, low);
        v[2 * c + 1] = _mm256_and_si256(_mm256_srli_epi16(q, 4), low);
    }
    v
}

/// Superblock `b` of a Q5_K row as eight vectors of 32 unsigned values (0..32): Q4_K's, with
/// bit `k` of each of the 32 high-bit bytes as bit 4 of vector `k`. (Shifts of 16-bit lanes by
/// at most 4 move bit `k` of a byte to its bit 4 without crossing into the next byte.)
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn q5_k_values(w: &WeightRow<'_>, b: usize) -> [__m256i; 8] {
    let mut v = q4_k_values(w, b);
    let h = load32(&w.qh[b * 32..(b + 1) * 32]);
    let bit4 = _mm256_set1_epi8(0x10);
    let high = [
        _mm256_slli_epi16(h, 4),
        _mm256_slli_epi16(h, 3),
        _mm256_slli_epi16(h, 2),
        _mm256_slli_epi16(h, 1),
        h,
        _mm256_srli_epi16(h, 1),
        _mm256_srli_epi16(h, 2),
        _mm256_srli_epi16(h, 3),
    ];
    for k in 0..8 {
        v[k] = _mm256_or_si256(v[k], _mm256_and_si256(high[k], bit4));
    }
    v
}

/// Superblock `b` of a Q6_K row as eight vectors of 32 unsigned values (0..64, before taking
/// 32 off): per half of 128 values, two 32-byte runs of low nibbles and 32 bytes of two-bit
/// pairs (see [`crate::matrix::k_value`]).
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn q6_k_values(w: &WeightRow<'_>, b: usize) -> [__m256i; 8] {
    let (m4, m2) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(0x30));
    let mut v = [_mm256_setzero_si256(); 8];
    for half in 0..2 {
        let ql = &w.qs[b * 128 + 64 * half..b * 128 + 64 * (half + 1)];
        let h = load32(&w.qh[b * 64 + 32 * half..b * 64 + 32 * (half + 1)]);
        let (q0, q1) = (load32(ql), load32(&ql[32..]));
        let high = |bits: __m256i| _mm256_and_si256(bits, m2);
        v[4 * half] = _mm256_or_si256(_mm256_and_si256(q0, m4), high(_mm256_slli_epi16(h, 4)));
        v[4 * half + 1] = _mm256_or_si256(_mm256_and_si256(q1, m4), high(_mm256_slli_epi16(h, 2)));
        v[4 * half + 2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q0, 4), m4), high(h));
        v[4 * half + 3] = _mm256_or_si256(
            _mm256_and_si256(_mm256_srli_epi16(q1, 4), m4),
            high(_mm256_srli_epi16(h, 2)),
        );
    }
    v
}

/// Q4_K's / Q5_K's scales of superblock `b` as i16 vectors: vector `k` holds scale `k` in every
/// lane (its 32 values are one sub-block); and the minimums, each twice, to pair with the
/// activations' sums of 16.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn k4_scales(w: &WeightRow<'_>, b: usize) -> ([__m256i; 8], __m256i) {
    let bytes = _mm_loadu_si128(w.scales[b * 16..(b + 1) * 16].as_ptr().cast());
    let scales = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(bytes));
    let mut s = [_mm256_setzero_si256(); 8];
    for (k, s) in s.iter_mut().enumerate() {
        let word = (2 * k) as i8;
        *s = _mm256_shuffle_epi8(
            scales,
            _mm256_set1_epi16(i16::from_le_bytes([word as u8, word as u8 + 1])),
        );
    }
    let mins = _mm_srli_si128(bytes, 8);
    let mins = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(mins, mins));
    (s, mins)
}

/// Q6_K's signed scales of superblock `b` as i16 vectors: vector `k` holds scale `2k` in its
/// low eight lanes and `2k + 1` in its high eight (a vector's 32 values are two sub-blocks of
/// 16); and all sixteen scales, to pair with the activations' sums of 16.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn k6_scales(w: &WeightRow<'_>, b: usize) -> ([__m256i; 8], __m256i) {
    let bytes = _mm_loadu_si128(w.scales[b * 16..(b + 1) * 16].as_ptr().cast());
    let mut s = [_mm256_setzero_si256(); 8];
    for (k, s) in s.iter_mut().enumerate() {
        let (lo, hi) = (
            (2 * k) as i64 * 0x0101_0101_0101_0101,
            (2 * k + 1) as i64 * 0x0101_0101_0101_0101,
        );
        *s = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(bytes, _mm_set_epi64x(hi, lo)));
    }
    (s, _mm256_cvtepi8_epi16(bytes))
}

/// `acc + Σ pairs of (i16 products × i16 scales)`, with AVX2.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn madd_acc_avx2(acc: __m256i, products: __m256i, scales: __m256i) -> __m256i {
    _mm256_add_epi32(acc, _mm256_madd_epi16(products, scales))
}

/// `acc + Σ pairs of (i16 products × i16 scales)`, with VNNI's fused `vpdpwssd`.
#[inline]
#[target_feature(enable = "avx2,avx512vnni,avx512vl")]
unsafe fn madd_acc_vnni(acc: __m256i, products: __m256i, scales: __m256i) -> __m256i {
    _mm256_dpwssd_epi32(acc, products, scales)
}

/// A row of 32-value blocks stored unsigned (`$values`), with `w = d · (q - 2^$shift)` (`$shift`
/// 0: no offset) and, if `$offset`, Q4_1-style `m · s` terms: `R` tokens eight blocks at a
/// time, and a tile of eight tokens block by block.
macro_rules! unsigned_block_kernels {
    ($features:literal, $dot:ident, $name:ident, $rows:ident, $format:expr, $values:ident,
     $shift:literal, $offset:literal) => {
        /// A weight row times `R` activation rows.
        ///
        /// # Safety
        /// The CPU must have the features named above; every activation row holds as many
        /// blocks as the weight row.
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn $name<const R: usize>(
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
                    q[i] = $values!(w, b + i);
                }
                let dw = load8(&w.d[b..]);
                for r in 0..R {
                    let x = a[r];
                    for i in 0..8 {
                        products[i] = $dot(q[i], load32(&x.qs[b + i]));
                    }
                    let mut isums = lane_sums(&products);
                    if $shift > 0 {
                        let xsums = _mm256_loadu_si256(x.sums[b..b + 8].as_ptr().cast());
                        isums = _mm256_sub_epi32(isums, _mm256_slli_epi32(xsums, $shift));
                    }
                    let isums = _mm256_cvtepi32_ps(isums);
                    let scaled = _mm256_mul_ps(_mm256_mul_ps(isums, dw), load8(&x.d[b..]));
                    terms[r] = if $offset {
                        let mw = load8(&w.m[b..]);
                        _mm256_add_ps(scaled, _mm256_mul_ps(mw, load8(&x.s[b..])))
                    } else {
                        scaled
                    };
                }
                add_in_order(&mut sums, &terms);
                b += 8;
            }
            // The last (fewer than eight) blocks: their sums reduced together (lanes past the
            // row's end are zero and ignored), the float terms added one by one.
            let rest = blocks - b;
            if rest > 0 {
                let mut isums = [0i32; 8];
                for r in 0..R {
                    let x = a[r];
                    let mut tail = [_mm256_setzero_si256(); 8];
                    for (i, t) in tail.iter_mut().enumerate().take(rest) {
                        *t = $dot($values!(w, b + i), load32(&x.qs[b + i]));
                    }
                    _mm256_storeu_si256(isums.as_mut_ptr().cast(), lane_sums(&tail));
                    for (i, &isum) in isums.iter().enumerate().take(rest) {
                        let b = b + i;
                        let isum = if $shift > 0 {
                            isum - (x.sums[b] << $shift)
                        } else {
                            isum
                        };
                        sums[r] += if $offset {
                            isum as f32 * w.d[b] * x.d[b] + w.m[b] * x.s[b]
                        } else {
                            isum as f32 * w.d[b] * x.d[b]
                        };
                    }
                }
            }
            sums
        }

        row_loop_kernel!($features, $rows, $name, $format);
    };
}

/// A row of K superblocks (`$values`, `$scales`; `$q6`: Q6_K's signed values and no minimums,
/// else Q4_K's / Q5_K's minimums): `R` tokens and a tile of eight, superblock by superblock.
macro_rules! k_kernels {
    ($features:literal, $madd:ident, $name:ident, $rows:ident, $values:ident,
     $scales:ident, $q6:literal) => {
        /// A weight row times `R` activation rows.
        ///
        /// # Safety
        /// The CPU must have the features named above; every activation row holds as many
        /// superblocks as the weight row.
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn $name<const R: usize>(
            w: WeightRow<'_>,
            a: [ActivationRow<'_>; R],
        ) -> [f32; R] {
            let blocks = w.d.len();
            let mut sums = [0f32; R];
            // Up to eight superblocks' integer sums per token are reduced together (one lane
            // per superblock), then added in order.
            let mut isums = [[_mm256_setzero_si256(); 8]; R];
            let mut msums = [[_mm256_setzero_si256(); 8]; R];
            let mut first = 0;
            while first < blocks {
                let count = (blocks - first).min(8);
                for i in 0..count {
                    let b = first + i;
                    let v = $values(&w, b);
                    let (s, mins) = $scales(&w, b);
                    // Two accumulators per token: shorter dependency chains.
                    let mut acc = [[_mm256_setzero_si256(); 2]; R];
                    for k in 0..8 {
                        for r in 0..R {
                            let x = load32(&a[r].qs[8 * b + k]);
                            let p = _mm256_maddubs_epi16(v[k], x);
                            acc[r][k % 2] = $madd(acc[r][k % 2], p, s[k]);
                        }
                    }
                    for r in 0..R {
                        let bsums = load32(&a[r].bsums[b]);
                        let total = _mm256_add_epi32(acc[r][0], acc[r][1]);
                        if $q6 {
                            // Σ sc_j · 32 · bsum_j: the offset of 32 taken back off.
                            let offsets = _mm256_slli_epi32(_mm256_madd_epi16(mins, bsums), 5);
                            isums[r][i] = _mm256_sub_epi32(total, offsets);
                        } else {
                            isums[r][i] = total;
                            msums[r][i] = _mm256_madd_epi16(bsums, mins);
                        }
                    }
                }
                for r in 0..R {
                    let x = a[r];
                    let mut is = [0i32; 8];
                    _mm256_storeu_si256(is.as_mut_ptr().cast(), lane_sums(&isums[r]));
                    if $q6 {
                        for i in 0..count {
                            let b = first + i;
                            sums[r] += w.d[b] * x.d[b] * is[i] as f32;
                        }
                    } else {
                        let mut ms = [0i32; 8];
                        _mm256_storeu_si256(ms.as_mut_ptr().cast(), lane_sums(&msums[r]));
                        for i in 0..count {
                            let b = first + i;
                            sums[r] +=
                                w.d[b] * x.d[b] * is[i] as f32 - w.m[b] * x.d[b] * ms[i] as f32;
                        }
                    }
                }
                first += count;
            }
            sums
        }

        /// Consecutive weight rows (`units` superblocks each, `w` spanning them all) times one
        /// token, one output per row: the decode path, without a call per (short) row. Each
        /// row's sum starts at zero and adds its superblocks in order, as the reference does;
        /// the integer sums of eight superblocks at a time, across row ends, are reduced
        /// together.
        ///
        /// # Safety
        /// The CPU must have the features named above; `a` holds `units` superblocks, `w`
        /// `out.len() * units`.
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn $rows(
            w: WeightRow<'_>,
            units: usize,
            a: ActivationRow<'_>,
            out: &mut [f32],
        ) {
            let total = w.d.len();
            let mut isums = [_mm256_setzero_si256(); 8];
            let mut msums = [_mm256_setzero_si256(); 8];
            let (mut is, mut ms) = ([0i32; 8], [0i32; 8]);
            let mut sum = 0f32;
            let mut first = 0;
            // The activation superblock of the group's first superblock, and the row it
            // belongs to (counted, not divided: a division per superblock costs more than
            // its dot product).
            let (mut first_b, mut row) = (0, 0);
            while first < total {
                let count = (total - first).min(8);
                let mut b = first_b;
                for i in 0..count {
                    let g = first + i;
                    let v = $values(&w, g);
                    let (s, mins) = $scales(&w, g);
                    let mut acc = [_mm256_setzero_si256(); 2];
                    for k in 0..8 {
                        let p = _mm256_maddubs_epi16(v[k], load32(&a.qs[8 * b + k]));
                        acc[k % 2] = $madd(acc[k % 2], p, s[k]);
                    }
                    let bsums = load32(&a.bsums[b]);
                    let total = _mm256_add_epi32(acc[0], acc[1]);
                    if $q6 {
                        let offsets = _mm256_slli_epi32(_mm256_madd_epi16(mins, bsums), 5);
                        isums[i] = _mm256_sub_epi32(total, offsets);
                    } else {
                        isums[i] = total;
                        msums[i] = _mm256_madd_epi16(bsums, mins);
                    }
                    b = if b + 1 == units { 0 } else { b + 1 };
                }
                _mm256_storeu_si256(is.as_mut_ptr().cast(), lane_sums(&isums));
                if !$q6 {
                    _mm256_storeu_si256(ms.as_mut_ptr().cast(), lane_sums(&msums));
                }
                let mut b = first_b;
                for i in 0..count {
                    let g = first + i;
                    if $q6 {
                        sum += w.d[g] * a.d[b] * is[i] as f32;
                    } else {
                        sum += w.d[g] * a.d[b] * is[i] as f32 - w.m[g] * a.d[b] * ms[i] as f32;
                    }
                    b += 1;
                    if b == units {
                        out[row] = sum;
                        sum = 0.0;
                        row += 1;
                        b = 0;
                    }
                }
                first_b = b;
                first += count;
            }
        }
    };
}

// ---------------------------------------------------------------------------------------------
// Prompt tiles: one weight row times tiles of eight tokens, one lane per token.
//
// The row is first unpacked to unsigned bytes (once for all the prompt's tiles). Each block's
// four values `4g..4g + 4` are then broadcast to every lane and multiplied with the tile's
// regrouped activations ([`crate::activation::TileBlock`]) by one u8 × i8 dot product, so
// eight products leave each token's exact block sum in its lane: no horizontal reductions.
// Offsets, scales and the float terms follow, as the reference forms them.
// ---------------------------------------------------------------------------------------------

/// The four bytes at `p` in every 32-bit lane.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn broadcast4(p: *const u8) -> __m256i {
    _mm256_set1_epi32(std::ptr::read_unaligned(p.cast::<i32>()))
}

/// `acc + ` the sums of four u8 × i8 products per lane, with AVX2 (pairs of at most
/// 2 · 255 · 128 in magnitude would saturate `vpmaddubsw`: callers keep the unsigned operand
/// below 128, or at 128 with the signed one above -128).
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn dpbusd_avx2(acc: __m256i, unsigned: __m256i, signed: __m256i) -> __m256i {
    _mm256_add_epi32(acc, dot_avx2(unsigned, signed))
}

/// `acc + ` the sums of four u8 × i8 products per lane, with VNNI.
#[inline]
#[target_feature(enable = "avx2,avx512vnni,avx512vl")]
unsafe fn dpbusd_vnni(acc: __m256i, unsigned: __m256i, signed: __m256i) -> __m256i {
    _mm256_dpbusd_epi32(acc, unsigned, signed)
}

/// Each token's exact sum over groups `$groups` (a range within 0..8) of one block: unsigned
/// weight bytes at `$w` (the block's first), the tile's regrouped activations `$x`.
macro_rules! group_sums {
    ($dpbusd:ident, $w:expr, $x:expr, $groups:expr) => {{
        let (mut even, mut odd) = (_mm256_setzero_si256(), _mm256_setzero_si256());
        for g in $groups.step_by(2) {
            even = $dpbusd(even, broadcast4($w.add(4 * g)), load32(&$x[g]));
            odd = $dpbusd(odd, broadcast4($w.add(4 * g + 4)), load32(&$x[g + 1]));
        }
        _mm256_add_epi32(even, odd)
    }};
}

/// The 8 × 8 transpose of 32-bit words: lane `i` of result `j` is lane `j` of `rows[i]`.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn transpose_words(rows: &[__m256i; 8]) -> [__m256i; 8] {
    let t: [__m256i; 8] = std::array::from_fn(|k| {
        let (a, b) = (rows[k / 2 * 2], rows[k / 2 * 2 + 1]);
        if k % 2 == 0 {
            _mm256_unpacklo_epi32(a, b)
        } else {
            _mm256_unpackhi_epi32(a, b)
        }
    });
    // u[0..4] from rows 0-3, u[4..8] from rows 4-7: words (0,1,2,3) of rows 4h.. in order.
    let u: [__m256i; 8] = std::array::from_fn(|k| {
        let base = k / 4 * 4;
        let (lo, hi) = (t[base + (k % 4) / 2], t[base + 2 + (k % 4) / 2]);
        if k % 2 == 0 {
            _mm256_unpacklo_epi64(lo, hi)
        } else {
            _mm256_unpackhi_epi64(lo, hi)
        }
    });
    std::array::from_fn(|j| {
        let (a, b) = (u[j % 4], u[4 + j % 4]);
        if j < 4 {
            _mm256_permute2x128_si256(a, b, 0x20)
        } else {
            _mm256_permute2x128_si256(a, b, 0x31)
        }
    })
}

/// Tile kernels for the 32-value formats stored unsigned: `$values` unpacks a block, `w =
/// d · (q - 2^$shift)` (`$shift` 0: no offset), `$offset`: Q4_1-style `m · s` terms.
macro_rules! block_tile_kernel {
    ($features:literal, $dpbusd:ident, $name:ident, $values:expr, $shift:literal,
     $offset:literal) => {
        block_tile_kernel!($features, $dpbusd, $name, $values, $shift, $offset, false);
    };
    // `$interleaved`: whole groups of eight blocks laid out as `interleave_q4_1_row` does
    // (Q4_1), unpacked a group at a time.
    ($features:literal, $dpbusd:ident, $name:ident, $values:expr, $shift:literal,
     $offset:literal, $interleaved:literal) => {
        /// One weight row times every tile, each tile's eight outputs into `out` at its
        /// tokens; `unpacked` holds at least a byte per column.
        ///
        /// # Safety
        /// The CPU must have the features named above; every tile holds as many blocks as
        /// the row.
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn $name(
            w: WeightRow<'_>,
            tiles: &[ActivationTile<'_>],
            unpacked: &mut [u8],
            out: &mut [f32],
        ) {
            let blocks = w.d.len();
            assert!(unpacked.len() >= 32 * blocks, "unpacked row buffer");
            let groups = if $interleaved { blocks / 8 * 8 } else { 0 };
            let low = _mm256_set1_epi8(0x0F);
            for b in (0..groups).step_by(8) {
                // Word `k` of the group's eight blocks, low nibbles (values 4k..) then high
                // ones (values 16 + 4k..), transposed back to one block per vector.
                let mut words = [_mm256_setzero_si256(); 8];
                for k in 0..4 {
                    let v = load32(&w.qs[16 * b + 32 * k..]);
                    words[k] = _mm256_and_si256(v, low);
                    words[k + 4] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
                }
                for (i, block) in transpose_words(&words).iter().enumerate() {
                    _mm256_storeu_si256(unpacked[32 * (b + i)..].as_mut_ptr().cast(), *block);
                }
            }
            for b in groups..blocks {
                _mm256_storeu_si256(unpacked[32 * b..].as_mut_ptr().cast(), $values(&w, b));
            }
            let values = unpacked.as_ptr();
            for tile in tiles {
                let mut acc = _mm256_setzero_ps();
                for b in 0..blocks {
                    let mut isums = group_sums!($dpbusd, values.add(32 * b), tile.groups[b], 0..8);
                    if $shift > 0 {
                        let xsums = _mm256_loadu_si256(tile.sums[b].as_ptr().cast());
                        isums = _mm256_sub_epi32(isums, _mm256_slli_epi32(xsums, $shift));
                    }
                    let isums = _mm256_cvtepi32_ps(isums);
                    let scaled = _mm256_mul_ps(
                        _mm256_mul_ps(isums, _mm256_set1_ps(w.d[b])),
                        load8(&tile.d[b]),
                    );
                    let term = if $offset {
                        let offsets = _mm256_mul_ps(_mm256_set1_ps(w.m[b]), load8(&tile.s[b]));
                        _mm256_add_ps(scaled, offsets)
                    } else {
                        scaled
                    };
                    acc = _mm256_add_ps(acc, term);
                }
                _mm256_storeu_ps(out[tile.start..tile.start + TILE].as_mut_ptr(), acc);
            }
        }
    };
}

/// Tile kernels for the K formats: `$values` unpacks a superblock (eight vectors of 32), `$q6`:
/// Q6_K's signed scales over sub-blocks of 16 and its offset of 32, else Q4_K's / Q5_K's scales
/// and minimums over sub-blocks of 32.
macro_rules! k_tile_kernel {
    ($features:literal, $dpbusd:ident, $name:ident, $values:ident, $q6:literal) => {
        /// One weight row times every tile, each tile's eight outputs into `out` at its
        /// tokens; `unpacked` holds at least a byte per column.
        ///
        /// # Safety
        /// The CPU must have the features named above; every tile holds as many superblocks
        /// as the row.
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn $name(
            w: WeightRow<'_>,
            tiles: &[ActivationTile<'_>],
            unpacked: &mut [u8],
            out: &mut [f32],
        ) {
            let superblocks = w.d.len();
            assert!(unpacked.len() >= 256 * superblocks, "unpacked row buffer");
            for b in 0..superblocks {
                for (k, v) in $values(&w, b).iter().enumerate() {
                    _mm256_storeu_si256(unpacked[256 * b + 32 * k..].as_mut_ptr().cast(), *v);
                }
            }
            let values = unpacked.as_ptr();
            for tile in tiles {
                let mut total = _mm256_setzero_ps();
                for b in 0..superblocks {
                    let scales = &w.scales[16 * b..16 * b + 16];
                    let bsums = &tile.bsums[16 * b..16 * b + 16];
                    let scale_of = |j: usize| {
                        if $q6 {
                            i32::from(scales[j] as i8)
                        } else {
                            i32::from(scales[j])
                        }
                    };
                    let mut isums = _mm256_setzero_si256();
                    for k in 0..8 {
                        let block = values.add(256 * b + 32 * k);
                        let x = &tile.groups[8 * b + k];
                        if $q6 {
                            // Two sub-blocks of 16 (groups 0..4 and 4..8), each its scale.
                            let low = group_sums!($dpbusd, block, x, 0..4);
                            let high = group_sums!($dpbusd, block, x, 4..8);
                            let low = _mm256_mullo_epi32(low, _mm256_set1_epi32(scale_of(2 * k)));
                            let high =
                                _mm256_mullo_epi32(high, _mm256_set1_epi32(scale_of(2 * k + 1)));
                            isums = _mm256_add_epi32(isums, _mm256_add_epi32(low, high));
                        } else {
                            let sums = group_sums!($dpbusd, block, x, 0..8);
                            let scaled = _mm256_mullo_epi32(sums, _mm256_set1_epi32(scale_of(k)));
                            isums = _mm256_add_epi32(isums, scaled);
                        }
                    }
                    let mut offsets = _mm256_setzero_si256();
                    if $q6 {
                        // Σ sc_j · bsum_j, times 32 below: the stored offset taken back off.
                        for (j, bsum) in bsums.iter().enumerate() {
                            let bsum = _mm256_loadu_si256(bsum.as_ptr().cast());
                            offsets = _mm256_add_epi32(
                                offsets,
                                _mm256_mullo_epi32(bsum, _mm256_set1_epi32(scale_of(j))),
                            );
                        }
                    } else {
                        // Σ m_j · (bsum_2j + bsum_2j+1): the minimums' terms.
                        for j in 0..8 {
                            let pair = _mm256_add_epi32(
                                _mm256_loadu_si256(bsums[2 * j].as_ptr().cast()),
                                _mm256_loadu_si256(bsums[2 * j + 1].as_ptr().cast()),
                            );
                            let min = _mm256_set1_epi32(i32::from(scales[8 + j]));
                            offsets = _mm256_add_epi32(offsets, _mm256_mullo_epi32(pair, min));
                        }
                    }
                    let dx = load8(&tile.d[b]);
                    let scale = _mm256_mul_ps(_mm256_set1_ps(w.d[b]), dx);
                    let term = if $q6 {
                        let isums = _mm256_sub_epi32(isums, _mm256_slli_epi32(offsets, 5));
                        _mm256_mul_ps(scale, _mm256_cvtepi32_ps(isums))
                    } else {
                        let isums = _mm256_cvtepi32_ps(isums);
                        let msums = _mm256_cvtepi32_ps(offsets);
                        let dmin = _mm256_mul_ps(_mm256_set1_ps(w.m[b]), dx);
                        _mm256_sub_ps(_mm256_mul_ps(scale, isums), _mm256_mul_ps(dmin, msums))
                    };
                    total = _mm256_add_ps(total, term);
                }
                _mm256_storeu_ps(out[tile.start..tile.start + TILE].as_mut_ptr(), total);
            }
        }
    };
}

/// Q8_0's tile kernel: the weights are signed, so their magnitudes are the unsigned operand
/// (at most 128) and their signs move onto the activations (at least -127).
macro_rules! q8_0_tile_kernel {
    ($features:literal, $dpbusd:ident, $name:ident) => {
        /// One weight row times every tile, each tile's eight outputs into `out` at its
        /// tokens; `unpacked` holds at least two bytes per column.
        ///
        /// # Safety
        /// The CPU must have the features named above; every tile holds as many blocks as
        /// the row.
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn $name(
            w: WeightRow<'_>,
            tiles: &[ActivationTile<'_>],
            unpacked: &mut [u8],
            out: &mut [f32],
        ) {
            let blocks = w.d.len();
            assert!(unpacked.len() >= 64 * blocks, "unpacked row buffer");
            let (magnitudes, signs) = unpacked.split_at_mut(32 * blocks);
            for b in 0..blocks {
                let q = load32(&w.qs[32 * b..]);
                _mm256_storeu_si256(
                    magnitudes[32 * b..].as_mut_ptr().cast(),
                    _mm256_sign_epi8(q, q),
                );
                _mm256_storeu_si256(signs[32 * b..].as_mut_ptr().cast(), q);
            }
            let (magnitudes, signs) = (magnitudes.as_ptr(), signs.as_ptr());
            for tile in tiles {
                let mut acc = _mm256_setzero_ps();
                for b in 0..blocks {
                    let x = &tile.groups[b];
                    let (mut even, mut odd) = (_mm256_setzero_si256(), _mm256_setzero_si256());
                    for g in (0..8).step_by(2) {
                        for (sum, g) in [(&mut even, g), (&mut odd, g + 1)] {
                            let at = 32 * b + 4 * g;
                            let signed = _mm256_sign_epi8(load32(&x[g]), broadcast4(signs.add(at)));
                            *sum = $dpbusd(*sum, broadcast4(magnitudes.add(at)), signed);
                        }
                    }
                    let isums = _mm256_cvtepi32_ps(_mm256_add_epi32(even, odd));
                    let scaled = _mm256_mul_ps(
                        _mm256_mul_ps(isums, _mm256_set1_ps(w.d[b])),
                        load8(&tile.d[b]),
                    );
                    acc = _mm256_add_ps(acc, scaled);
                }
                _mm256_storeu_ps(out[tile.start..tile.start + TILE].as_mut_ptr(), acc);
            }
        }
    };
}

/// Q8_0's tile kernel with VNNI: the tile's activations were laid out `+ 128` (unsigned, see
/// `Activations::prepare_tiles`), the weights broadcast signed, and `128 · Σq` per block taken
/// back off (summed once per row as it is unpacked).
macro_rules! q8_0_shifted_tile_kernel {
    ($features:literal, $dpbusd:ident, $name:ident) => {
        /// One weight row times every tile (laid out shifted), each tile's eight outputs into
        /// `out` at its tokens; `unpacked` holds at least two bytes per column.
        ///
        /// # Safety
        /// The CPU must have the features named above; every tile holds as many blocks as
        /// the row.
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn $name(
            w: WeightRow<'_>,
            tiles: &[ActivationTile<'_>],
            unpacked: &mut [u8],
            out: &mut [f32],
        ) {
            let blocks = w.d.len();
            assert!(unpacked.len() >= 36 * blocks, "unpacked row buffer");
            // 128 · Σq of each block, as i32 bytes after the blocks' room.
            let (_, offsets) = unpacked.split_at_mut(32 * blocks);
            for b in 0..blocks {
                offsets[4 * b..4 * b + 4].copy_from_slice(&q8_0_offset(&w, b).to_le_bytes());
            }
            let offsets = &unpacked[32 * blocks..36 * blocks];
            let weights = w.qs.as_ptr();
            for tile in tiles {
                let mut acc = _mm256_setzero_ps();
                for b in 0..blocks {
                    let x = &tile.groups[b];
                    let (mut even, mut odd) = (_mm256_setzero_si256(), _mm256_setzero_si256());
                    for g in (0..8).step_by(2) {
                        let at = weights.add(32 * b + 4 * g);
                        even = $dpbusd(even, load32(&x[g]), broadcast4(at));
                        odd = $dpbusd(odd, load32(&x[g + 1]), broadcast4(at.add(4)));
                    }
                    let offset = i32::from_le_bytes([
                        offsets[4 * b],
                        offsets[4 * b + 1],
                        offsets[4 * b + 2],
                        offsets[4 * b + 3],
                    ]);
                    let isums =
                        _mm256_sub_epi32(_mm256_add_epi32(even, odd), _mm256_set1_epi32(offset));
                    let isums = _mm256_cvtepi32_ps(isums);
                    let scaled = _mm256_mul_ps(
                        _mm256_mul_ps(isums, _mm256_set1_ps(w.d[b])),
                        load8(&tile.d[b]),
                    );
                    acc = _mm256_add_ps(acc, scaled);
                }
                _mm256_storeu_ps(out[tile.start..tile.start + TILE].as_mut_ptr(), acc);
            }
        }
    };
}

/// `128 · Σq` of block `b` of a Q8_0 row: what the shifted tiles' `(x + 128) · q` adds.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn q8_0_offset(w: &WeightRow<'_>, b: usize) -> i32 {
    let q = load32(&w.qs[32 * b..]);
    // Σ (q + 128) by absolute differences from zero, then 32 · 128 off.
    let biased = _mm256_sad_epu8(
        _mm256_xor_si256(q, _mm256_set1_epi8(-128)),
        _mm256_setzero_si256(),
    );
    let mut lanes = [0i64; 4];
    _mm256_storeu_si256(lanes.as_mut_ptr().cast(), biased);
    128 * (lanes.iter().sum::<i64>() as i32 - 32 * 128)
}

/// Two Q8_0 weight rows times every tile (laid out shifted), with VNNI: [`vnni::tiles_q8_0`]
/// for each row, the same operations in the same order (so the same bits), but each tile's
/// activation vector is loaded once for both rows. One row at a time, a product issued two
/// loads (the activations and the broadcast weights) per multiply-add, which the load ports,
/// not the multipliers, bounded.
///
/// # Safety
/// The CPU must have AVX-512 VNNI and VL; both rows and every tile hold the same number of
/// blocks.
#[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl,avx512bw")]
pub(crate) unsafe fn tiles_q8_0_pair_vnni(
    w: [WeightRow<'_>; 2],
    tiles: &[ActivationTile<'_>],
    offsets: &mut [i32],
    out: [&mut [f32]; 2],
) {
    let blocks = w[0].d.len();
    assert!(
        w[1].d.len() == blocks && offsets.len() >= 2 * blocks,
        "pair of rows"
    );
    for b in 0..blocks {
        offsets[b] = q8_0_offset(&w[0], b);
        offsets[blocks + b] = q8_0_offset(&w[1], b);
    }
    let (o0, o1) = (&offsets[..blocks], &offsets[blocks..2 * blocks]);
    let (w0, w1) = (w[0].qs.as_ptr(), w[1].qs.as_ptr());
    let [out0, out1] = out;
    for tile in tiles {
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for b in 0..blocks {
            let x = &tile.groups[b];
            let (mut even0, mut odd0) = (_mm256_setzero_si256(), _mm256_setzero_si256());
            let (mut even1, mut odd1) = (_mm256_setzero_si256(), _mm256_setzero_si256());
            for g in (0..8).step_by(2) {
                let (xe, xo) = (load32(&x[g]), load32(&x[g + 1]));
                let (at0, at1) = (w0.add(32 * b + 4 * g), w1.add(32 * b + 4 * g));
                even0 = _mm256_dpbusd_epi32(even0, xe, broadcast4(at0));
                odd0 = _mm256_dpbusd_epi32(odd0, xo, broadcast4(at0.add(4)));
                even1 = _mm256_dpbusd_epi32(even1, xe, broadcast4(at1));
                odd1 = _mm256_dpbusd_epi32(odd1, xo, broadcast4(at1.add(4)));
            }
            let dx = load8(&tile.d[b]);
            let isums0 = _mm256_sub_epi32(_mm256_add_epi32(even0, odd0), _mm256_set1_epi32(o0[b]));
            let isums1 = _mm256_sub_epi32(_mm256_add_epi32(even1, odd1), _mm256_set1_epi32(o1[b]));
            let scaled0 = _mm256_mul_ps(
                _mm256_mul_ps(_mm256_cvtepi32_ps(isums0), _mm256_set1_ps(w[0].d[b])),
                dx,
            );
            let scaled1 = _mm256_mul_ps(
                _mm256_mul_ps(_mm256_cvtepi32_ps(isums1), _mm256_set1_ps(w[1].d[b])),
                dx,
            );
            acc0 = _mm256_add_ps(acc0, scaled0);
            acc1 = _mm256_add_ps(acc1, scaled1);
        }
        _mm256_storeu_ps(out0[tile.start..tile.start + TILE].as_mut_ptr(), acc0);
        _mm256_storeu_ps(out1[tile.start..tile.start + TILE].as_mut_ptr(), acc1);
    }
}

/// Block `b` of a Q4_1 row as 32 unsigned values (0..16).
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn q4_1_block(w: &WeightRow<'_>, b: usize) -> __m256i {
    let blocks = w.d.len();
    if b >= blocks / 8 * 8 {
        return q4_1_values(&w.qs[b * 16..]);
    }
    // Its four words, one from each of its group's 32-byte rows (`interleave_q4_1_row`).
    let at = b / 8 * 128 + 4 * (b % 8);
    let word = |k: usize| {
        let bytes = &w.qs[at + 32 * k..at + 32 * k + 4];
        i32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
    };
    q4_1_expand(_mm_set_epi32(word(3), word(2), word(1), word(0)))
}

/// Block `b` of a Q4_0 row as 32 unsigned values (0..16).
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn q4_0_block(w: &WeightRow<'_>, b: usize) -> __m256i {
    q4_0_values!(w, b)
}

/// Block `b` of a Q5_0 or Q5_1 row as 32 unsigned values (0..32).
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn q5_block(w: &WeightRow<'_>, b: usize) -> __m256i {
    q5_values!(w, b)
}

/// Every new format's kernels for one family, in a module named after it.
macro_rules! family {
    ($module:ident, $features:literal, $dot:ident, $dpbusd:ident, $madd:ident, $q5:ident,
     $q8_tile:ident) => {
        /// The kernels of one instruction-set family for Q4_0, Q5_0, Q5_1 and the K formats.
        pub(crate) mod $module {
            use super::*;

            unsigned_block_kernels!(
                $features,
                $dot,
                dot_q4_0,
                rows_q4_0,
                QuantFormat::Q4_0,
                q4_0_values,
                3,
                false
            );
            unsigned_block_kernels!(
                $features,
                $dot,
                dot_q5_0,
                rows_q5_0,
                QuantFormat::Q5_0,
                $q5,
                4,
                false
            );
            unsigned_block_kernels!(
                $features,
                $dot,
                dot_q5_1,
                rows_q5_1,
                QuantFormat::Q5_1,
                $q5,
                0,
                true
            );
            block_tile_kernel!($features, $dpbusd, tiles_q4_0, q4_0_block, 3, false);
            block_tile_kernel!($features, $dpbusd, tiles_q4_1, q4_1_block, 0, true, true);
            block_tile_kernel!($features, $dpbusd, tiles_q5_0, q5_block, 4, false);
            block_tile_kernel!($features, $dpbusd, tiles_q5_1, q5_block, 0, true);
            $q8_tile!($features, $dpbusd, tiles_q8_0);
            k_tile_kernel!($features, $dpbusd, tiles_q4_k, q4_k_values, false);
            k_tile_kernel!($features, $dpbusd, tiles_q5_k, q5_k_values, false);
            k_tile_kernel!($features, $dpbusd, tiles_q6_k, q6_k_values, true);
            k_kernels!(
                $features,
                $madd,
                dot_q4_k,
                rows_q4_k,
                q4_k_values,
                k4_scales,
                false
            );
            k_kernels!(
                $features,
                $madd,
                dot_q5_k,
                rows_q5_k,
                q5_k_values,
                k4_scales,
                false
            );
            k_kernels!(
                $features,
                $madd,
                dot_q6_k,
                rows_q6_k,
                q6_k_values,
                k6_scales,
                true
            );
        }
    };
}

family!(
    avx2,
    "avx2,fma,f16c",
    dot_avx2,
    dpbusd_avx2,
    madd_acc_avx2,
    q5_values,
    q8_0_tile_kernel
);
family!(
    vnni,
    "avx2,fma,f16c,avx512vnni,avx512vl,avx512bw",
    dot_vnni,
    dpbusd_vnni,
    madd_acc_vnni,
    q5_values_vl,
    q8_0_shifted_tile_kernel
);
