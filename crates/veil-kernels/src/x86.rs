//! x86-64 kernels: the same block sums as [`crate::scalar`], eight lanes of 32-bit integer
//! sums per block from one 256-bit dot product.
//!
//! Written with `core::arch` intrinsics because no maintained crate offers ggml's block formats
//! with run-time dispatch; the two families differ only in the integer dot product (AVX2's
//! `vpmaddubsw` + `vpmaddwd`, or VNNI's single `vpdpbusd`), so one macro writes both.

use std::arch::x86_64::*;

use crate::activation::ActivationBlock;

/// Eight i32 sums of four u8 × i8 products each, with AVX2.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn dot_avx2(unsigned: __m256i, signed: __m256i) -> __m256i {
    _mm256_madd_epi16(
        _mm256_maddubs_epi16(unsigned, signed),
        _mm256_set1_epi16(1),
    )
}

/// Eight i32 sums of four u8 × i8 products each, with VNNI.
#[inline]
#[target_feature(enable = "avx2,avx512vnni,avx512vl")]
unsafe fn dot_vnni(unsigned: __m256i, signed: __m256i) -> __m256i {
    _mm256_dpbusd_epi32(_mm256_setzero_si256(), unsigned, signed)
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
unsafe fn f16_pair(bytes: [u8; 4]) -> (f32, f32) {
    let v = _mm_cvtph_ps(_mm_cvtsi32_si128(i32::from_le_bytes(bytes)));
    (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_movehdup_ps(v)))
}

macro_rules! block_kernels {
    ($features:literal, $dot:ident, $q4_1:ident, $q8_0:ident) => {
        /// Q4_1 weight row times `R` activation rows.
        ///
        /// # Safety
        /// The CPU must have the features named above; `w` holds whole 20-byte blocks and every
        /// activation row at least as many blocks.
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn $q4_1<const R: usize>(
            w: &[u8],
            a: [&[ActivationBlock]; R],
        ) -> [f32; R] {
            let low = _mm_set1_epi8(0x0F);
            let mut acc = [_mm256_setzero_ps(); R];
            let mut offsets = [0f32; R];
            for (b, block) in w.chunks_exact(20).enumerate() {
                let (d, m) = f16_pair([block[0], block[1], block[2], block[3]]);
                let q = _mm_loadu_si128(block.as_ptr().add(4).cast());
                // Low nibbles are values 0..16, high nibbles values 16..32.
                let q = _mm256_set_m128i(
                    _mm_and_si128(_mm_srli_epi16(q, 4), low),
                    _mm_and_si128(q, low),
                );
                for r in 0..R {
                    let x = &a[r][b];
                    let y = _mm256_loadu_si256(x.qs.as_ptr().cast());
                    let sums = _mm256_cvtepi32_ps($dot(q, y));
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
        /// The CPU must have the features named above; `w` holds whole 34-byte blocks and every
        /// activation row at least as many blocks.
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn $q8_0<const R: usize>(
            w: &[u8],
            a: [&[ActivationBlock]; R],
        ) -> [f32; R] {
            let mut acc = [_mm256_setzero_ps(); R];
            for (b, block) in w.chunks_exact(34).enumerate() {
                let (d, _) = f16_pair([block[0], block[1], 0, 0]);
                let q = _mm256_loadu_si256(block.as_ptr().add(2).cast());
                // The dot products take one unsigned operand: move the weights' signs onto
                // the activations (|q| of -128 reads as 128 unsigned, as it should).
                let magnitude = _mm256_sign_epi8(q, q);
                for r in 0..R {
                    let x = &a[r][b];
                    let y = _mm256_loadu_si256(x.qs.as_ptr().cast());
                    let sums = _mm256_cvtepi32_ps($dot(magnitude, _mm256_sign_epi8(y, q)));
                    acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * x.d), sums, acc[r]);
                }
            }
            let mut out = [0f32; R];
            for r in 0..R {
                out[r] = horizontal_sum(acc[r]);
            }
            out
        }
    };
}

block_kernels!("avx2,fma,f16c", dot_avx2, dot_q4_1_avx2, dot_q8_0_avx2);
block_kernels!(
    "avx2,fma,f16c,avx512vnni,avx512vl",
    dot_vnni,
    dot_q4_1_vnni,
    dot_q8_0_vnni
);
