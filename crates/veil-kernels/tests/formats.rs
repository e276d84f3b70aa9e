//! Every format (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K) on raw GGUF bytes: dequantized
//! bit for bit as candle does it; the scalar reference against exact (f64) arithmetic on the
//! bytes' values; every kernel family this CPU has against the scalar reference, bit for bit,
//! on random data, odd shapes, token counts around the tiles, and edge values; and each
//! format's product against candle's own quantized matmul on the same bytes.

use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use half::f16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use veil_kernels::{
    ActivationBlock, ActivationSuperblock, Isa, KernelError, QuantFormat, QuantMatrix, BLOCK,
    SCALE_GROUP, SUPERBLOCK,
};

/// Where a block's f16 scale and (for formats with one) offset or `dmin` sit.
fn f16_fields(format: QuantFormat) -> (usize, Option<usize>) {
    match format {
        QuantFormat::Q4_1 | QuantFormat::Q5_1 | QuantFormat::Q4_K | QuantFormat::Q5_K => {
            (0, Some(2))
        }
        QuantFormat::Q6_K => (208, None),
        _ => (0, None),
    }
}

/// How a test fills blocks.
#[derive(Clone, Copy, PartialEq)]
enum Fill {
    /// Random bytes, small positive scales, offsets of either sign.
    Random,
    /// Bytes and scales from a list of extremes: all bits clear or set, nibbles 0 and 15, -128
    /// and 127, zero, negative, tiny and subnormal scales, negative `dmin`.
    Edge,
}

/// `rows * cols / block_values` blocks of `format` as GGUF bytes.
fn random_bytes(
    format: QuantFormat,
    rows: usize,
    cols: usize,
    fill: Fill,
    rng: &mut ChaCha20Rng,
) -> Vec<u8> {
    const EDGE_BYTES: [u8; 7] = [0x00, 0xFF, 0x0F, 0xF0, 0x80, 0x7F, 0x55];
    const EDGE_SCALES: [f32; 7] = [0.0, 0.5, -0.5, 0.03125, -2.0, 6.1e-5, 6e-8];
    let blocks = rows * cols / format.block_values();
    let (d_at, m_at) = f16_fields(format);
    let mut data = Vec::with_capacity(blocks * format.block_bytes());
    for _ in 0..blocks {
        let start = data.len();
        for _ in 0..format.block_bytes() {
            data.push(match fill {
                Fill::Random => rng.random::<u8>(),
                Fill::Edge => EDGE_BYTES[rng.random_range(0..EDGE_BYTES.len())],
            });
        }
        let (d, m) = match fill {
            Fill::Random => (rng.random_range(0.001..0.05), rng.random_range(-0.05..0.05)),
            Fill::Edge => (
                EDGE_SCALES[rng.random_range(0..EDGE_SCALES.len())],
                EDGE_SCALES[rng.random_range(0..EDGE_SCALES.len())],
            ),
        };
        data[start + d_at..start + d_at + 2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
        if let Some(m_at) = m_at {
            data[start + m_at..start + m_at + 2].copy_from_slice(&f16::from_f32(m).to_le_bytes());
        }
    }
    data
}

fn f16_at(bytes: &[u8], at: usize) -> f64 {
    f64::from(f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32())
}

/// Each weight as `(scaled, offset)` in exact f64 (`w = scaled + offset`), decoded from the
/// bytes by the GGUF layouts, written apart from the crate's own decoding.
fn exact_weights(format: QuantFormat, bytes: &[u8]) -> Vec<(f64, f64)> {
    let mut out = Vec::new();
    for block in bytes.chunks_exact(format.block_bytes()) {
        match format {
            QuantFormat::Q4_0 | QuantFormat::Q4_1 | QuantFormat::Q5_0 | QuantFormat::Q5_1 => {
                let d = f16_at(block, 0);
                let (m, qh, qs) = match format {
                    QuantFormat::Q4_0 => (0.0, 0u32, &block[2..18]),
                    QuantFormat::Q4_1 => (f16_at(block, 2), 0, &block[4..20]),
                    QuantFormat::Q5_0 => {
                        let qh = u32::from_le_bytes(block[2..6].try_into().unwrap());
                        (0.0, qh, &block[6..22])
                    }
                    _ => {
                        let qh = u32::from_le_bytes(block[4..8].try_into().unwrap());
                        (f16_at(block, 2), qh, &block[8..24])
                    }
                };
                let offset = match format {
                    QuantFormat::Q4_0 => 8,
                    QuantFormat::Q5_0 => 16,
                    _ => 0,
                };
                for half in 0..2 {
                    for (j, &q) in qs.iter().enumerate() {
                        let low = if half == 0 { q & 15 } else { q >> 4 };
                        let high = (qh >> (16 * half + j)) & 1;
                        let q = i32::from(low) + 16 * high as i32 - offset;
                        out.push((d * f64::from(q), m));
                    }
                }
            }
            QuantFormat::Q8_0 => {
                let d = f16_at(block, 0);
                out.extend(block[2..].iter().map(|&q| (d * f64::from(q as i8), 0.0)));
            }
            QuantFormat::Q4_K | QuantFormat::Q5_K => {
                let (d, dmin) = (f16_at(block, 0), f16_at(block, 2));
                let sc = &block[4..16];
                let (qh, qs) = if format == QuantFormat::Q5_K {
                    (Some(&block[16..48]), &block[48..176])
                } else {
                    (None, &block[16..144])
                };
                for sub in 0..8 {
                    let (scale, min) = if sub < 4 {
                        (sc[sub] & 63, sc[sub + 4] & 63)
                    } else {
                        (
                            (sc[sub + 4] & 15) | ((sc[sub - 4] >> 6) << 4),
                            (sc[sub + 4] >> 4) | ((sc[sub] >> 6) << 4),
                        )
                    };
                    for l in 0..32 {
                        let byte = qs[32 * (sub / 2) + l];
                        let mut q = if sub % 2 == 0 { byte & 15 } else { byte >> 4 };
                        if let Some(qh) = qh {
                            q += ((qh[l] >> sub) & 1) << 4;
                        }
                        out.push((d * f64::from(scale) * f64::from(q), -dmin * f64::from(min)));
                    }
                }
            }
            QuantFormat::Q6_K => {
                let d = f16_at(block, 208);
                let (ql, qh, sc) = (&block[..128], &block[128..192], &block[192..208]);
                let mut values = [0i32; 256];
                for half in 0..2 {
                    for l in 0..32 {
                        let (a, b) = (ql[64 * half + l], ql[64 * half + 32 + l]);
                        let h = qh[32 * half + l];
                        let v = &mut values[128 * half..];
                        v[l] = i32::from((a & 15) | (h & 3) << 4) - 32;
                        v[l + 32] = i32::from((b & 15) | ((h >> 2) & 3) << 4) - 32;
                        v[l + 64] = i32::from((a >> 4) | ((h >> 4) & 3) << 4) - 32;
                        v[l + 96] = i32::from((b >> 4) | ((h >> 6) & 3) << 4) - 32;
                    }
                }
                for (i, q) in values.into_iter().enumerate() {
                    let scale = f64::from(sc[i / 16] as i8);
                    out.push((d * scale * f64::from(q), 0.0));
                }
            }
        }
    }
    out
}

/// The product in f64 over the exact weights and the dequantized activations. For the
/// 32-value formats with an offset, the offset multiplies the activations' stored `s` (an f16
/// rounding of `d · Σq`), as in ggml and the kernels.
fn reference(
    format: QuantFormat,
    rows: usize,
    cols: usize,
    bytes: &[u8],
    x: &[f32],
) -> (Vec<f64>, Vec<f64>) {
    let w = exact_weights(format, bytes);
    let tokens = x.len() / cols;
    let (mut out, mut magnitude) = (Vec::new(), Vec::new());
    for t in 0..tokens {
        let xt = &x[t * cols..(t + 1) * cols];
        // Dequantized activations, and each block's `s`.
        let (mut xd, mut s) = (Vec::new(), Vec::new());
        if format.is_k() {
            for c in xt.chunks_exact(SUPERBLOCK) {
                let a = ActivationSuperblock::quantize(c.try_into().unwrap());
                xd.extend(a.qs.iter().map(|&q| f64::from(a.d) * f64::from(q)));
            }
        } else {
            for c in xt.chunks_exact(BLOCK) {
                let a = ActivationBlock::quantize(c.try_into().unwrap());
                xd.extend(a.qs.iter().map(|&q| f64::from(a.d) * f64::from(q)));
                s.push(f64::from(a.s));
            }
        }
        for r in 0..rows {
            let (mut sum, mut mag) = (0f64, 0f64);
            let wr = &w[r * cols..(r + 1) * cols];
            for (j, (&(scaled, offset), &xj)) in wr.iter().zip(&xd).enumerate() {
                let term = scaled * xj;
                sum += term;
                mag += term.abs();
                if format.is_k() {
                    sum += offset * xj;
                    mag += (offset * xj).abs();
                } else if j % BLOCK == 0 {
                    let term = offset * s[j / BLOCK];
                    sum += term;
                    mag += term.abs();
                }
            }
            out.push(sum);
            magnitude.push(mag);
        }
    }
    (out, magnitude)
}

fn run(matrix: &QuantMatrix, isa: Isa, x: &[f32]) -> Vec<f32> {
    let mut out = vec![f32::NAN; x.len() / matrix.cols() * matrix.rows()];
    matrix.matmul_with(isa, x, &mut out).expect("product");
    out
}

/// Every output within float rounding of the exact product.
fn assert_close(got: &[f32], expected: &[f64], magnitude: &[f64], what: &str) {
    for (i, ((&g, &e), &m)) in got.iter().zip(expected).zip(magnitude).enumerate() {
        let err = (f64::from(g) - e).abs();
        assert!(
            g.is_finite() && err <= 1e-5 * m + 1e-6,
            "{what}, output {i}: {g} vs {e} (error {err:e}, magnitude {m:e})"
        );
    }
}

/// (rows, cols, tokens) for a format: odd row counts (not multiples of the threads), one
/// block, one row, token counts 1, 2, 5, 8, 9 and 37 (around the tiles of 4 and 8), and enough
/// work to split over threads (a prompt's rows in chunks, an odd one last, and its activations
/// as they are quantized).
fn shapes(format: QuantFormat) -> Vec<(usize, usize, usize)> {
    let unit = format.block_values();
    vec![
        (1, unit, 1),
        (3, unit, 2),
        (5, 2 * unit, 3),
        (9, unit, 4),
        (6, 3 * unit, 6),
        (17, 3 * unit, 1),
        (17, 3 * unit, 5),
        (64, 2 * unit, 8),
        (33, 4 * unit, 9),
        (13, 2 * unit, 37),
        (5, 8 * unit, 37),
        (101, 2 * unit, 37),
        (1, 8 * unit, 9),
        (1000, unit, 1),
        (1000, 4 * unit, 1),
        (301, 2 * unit, 7),
        (67, 640.max(unit), 1),
    ]
    .into_iter()
    .filter(|&(_, cols, _)| cols.is_multiple_of(unit))
    .collect()
}

#[test]
fn dequantize_gives_candles_bits() {
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    for format in QuantFormat::ALL {
        for fill in [Fill::Random, Fill::Edge] {
            // Ten blocks a row: a whole group of eight (Q4_1 interleaves them) and two more.
            let (rows, cols) = (7, 10 * format.block_values());
            let bytes = random_bytes(format, rows, cols, fill, &mut rng);
            let ours = QuantMatrix::new(format, rows, cols, &bytes)
                .expect("matrix")
                .dequantize();

            let theirs =
                qtensor_from_ggml(format.ggml_dtype(), &bytes, vec![rows, cols], &Device::Cpu)
                    .expect("qtensor")
                    .dequantize(&Device::Cpu)
                    .expect("dequantize")
                    .flatten_all()
                    .expect("flat")
                    .to_vec1::<f32>()
                    .expect("vec");
            assert_eq!(ours.len(), theirs.len());
            for (i, (o, t)) in ours.iter().zip(&theirs).enumerate() {
                assert_eq!(o.to_bits(), t.to_bits(), "{format} value {i}: {o} vs {t}");
            }
            // And the exact decoding agrees with both (the f32 roundings aside).
            for (i, ((s, m), o)) in exact_weights(format, &bytes).iter().zip(&ours).enumerate() {
                let e = s + m;
                let tolerance = 1e-6 * (s.abs() + m.abs());
                assert!(
                    (f64::from(*o) - e).abs() <= tolerance,
                    "{format} value {i}: {o} vs {e}"
                );
            }
        }
    }
}

#[test]
fn every_family_returns_the_scalar_bits_and_scalar_is_near_exact() {
    let mut rng = ChaCha20Rng::seed_from_u64(7);
    println!("kernel families on this CPU: {:?}", Isa::available());
    for format in QuantFormat::ALL {
        for (rows, cols, tokens) in shapes(format) {
            for fill in [Fill::Random, Fill::Edge] {
                let bytes = random_bytes(format, rows, cols, fill, &mut rng);
                let matrix = QuantMatrix::new(format, rows, cols, &bytes).expect("matrix");
                let x: Vec<f32> = (0..tokens * cols)
                    .map(|_| rng.random_range(-3.0..3.0))
                    .collect();
                let what = format!("{format} ({rows}, {cols}) × {tokens} tokens");
                let scalar = run(&matrix, Isa::Scalar, &x);
                let (expected, magnitude) = reference(format, rows, cols, &bytes, &x);
                assert_close(&scalar, &expected, &magnitude, &what);
                for isa in Isa::available() {
                    assert_eq!(run(&matrix, isa, &x), scalar, "{isa} {what}");
                }
            }
        }
    }
}

#[test]
fn edge_activations_on_every_family() {
    // All-zero activations (scale 0), huge ones of both signs, a single nonzero value, ties
    // after scaling, and the largest magnitude negative (the K formats' scale takes its sign).
    let mut rng = ChaCha20Rng::seed_from_u64(13);
    for format in QuantFormat::ALL {
        let (rows, cols) = (9, 2 * format.block_values());
        let bytes = random_bytes(format, rows, cols, Fill::Edge, &mut rng);
        let matrix = QuantMatrix::new(format, rows, cols, &bytes).expect("matrix");
        let inputs: [Vec<f32>; 5] = [
            vec![0.0; cols],
            (0..cols)
                .map(|j| if j % 3 == 0 { -1e4 } else { 7e3 })
                .collect(),
            (0..cols)
                .map(|j| if j == 37 { -2.0 } else { 0.0 })
                .collect(),
            (0..cols)
                .map(|j| {
                    if j % 64 == 0 {
                        127.0
                    } else {
                        (j % 64) as f32 - 31.5
                    }
                })
                .collect(),
            (0..cols).map(|j| (j as f32 - 100.5) / 8.0).collect(),
        ];
        for x in inputs {
            let what = format!("{format} edge activations");
            let scalar = run(&matrix, Isa::Scalar, &x);
            let (expected, magnitude) = reference(format, rows, cols, &bytes, &x);
            assert_close(&scalar, &expected, &magnitude, &what);
            for isa in Isa::available() {
                assert_eq!(run(&matrix, isa, &x), scalar, "{isa} {what}");
            }
        }
    }
}

#[test]
fn agrees_with_candles_quantized_matmul_on_the_same_bytes() {
    let mut rng = ChaCha20Rng::seed_from_u64(3);
    for format in QuantFormat::ALL {
        // 576 columns for the 32-value formats: with a multiple of 256, candle multiplies Q8_0
        // by activations quantized in superblocks (Q8_K) on CPUs with VNNI, not ggml's Q8_0.
        let (rows, cols) = (96, if format.is_k() { 1024 } else { 576 });
        for tokens in [1, 5, 9] {
            let dense: Vec<f32> = (0..rows * cols)
                .map(|_| rng.random_range(-0.2..0.2))
                .collect();
            let dense = Tensor::from_vec(dense, (rows, cols), &Device::Cpu).expect("tensor");
            let q = QTensor::quantize(&dense, format.ggml_dtype()).expect("quantize");
            let bytes = q.data().expect("bytes").into_owned();
            let matrix = QuantMatrix::new(format, rows, cols, &bytes).expect("matrix");
            let x: Vec<f32> = (0..tokens * cols)
                .map(|_| rng.random_range(-2.0..2.0))
                .collect();
            let xt = Tensor::from_vec(x.clone(), (tokens, cols), &Device::Cpu).expect("tensor");
            let candle = QMatMul::from_qtensor(q)
                .expect("qmatmul")
                .forward(&xt)
                .expect("forward")
                .flatten_all()
                .expect("flat")
                .to_vec1::<f32>()
                .expect("vec");
            let (_, magnitude) = reference(format, rows, cols, &bytes, &x);
            for isa in Isa::available() {
                let ours = run(&matrix, isa, &x);
                for ((&c, &o), &m) in candle.iter().zip(&ours).zip(&magnitude) {
                    assert!(
                        (f64::from(c) - f64::from(o)).abs() <= 1e-5 * m + 1e-6,
                        "{format} {isa} × {tokens}: candle {c} vs veil {o}"
                    );
                }
            }
        }
    }
}

#[test]
fn superblock_activations_match_ggml_q8_k() {
    // candle's Q8_K quantizer rounds ties away from zero where ggml's rounds them to even;
    // random values have no ties, so the bytes agree.
    let mut rng = ChaCha20Rng::seed_from_u64(17);
    for scale in [1e-6f32, 1e-2, 1.0, 40.0, 3e4] {
        let x: Vec<f32> = (0..4 * SUPERBLOCK)
            .map(|_| rng.random_range(-1.0f32..1.0) * scale)
            .collect();
        let t = Tensor::from_vec(x.clone(), (4, SUPERBLOCK), &Device::Cpu).expect("tensor");
        let q = QTensor::quantize(&t, GgmlDType::Q8K).expect("quantize");
        let bytes = q.data().expect("bytes").into_owned();
        for (c, theirs) in x.chunks_exact(SUPERBLOCK).zip(bytes.chunks_exact(292)) {
            let ours = ActivationSuperblock::quantize(c.try_into().unwrap());
            assert_eq!(ours.d.to_le_bytes(), theirs[..4]);
            let qs: Vec<u8> = ours.qs.iter().map(|&q| q as u8).collect();
            assert_eq!(qs, theirs[4..260]);
            let bsums: Vec<u8> = ours.bsums.iter().flat_map(|s| s.to_le_bytes()).collect();
            assert_eq!(bsums, theirs[260..]);
        }
    }
    // Ties round to even, as ggml's nearest_int does; the largest magnitude sets the sign.
    let mut x = [0f32; SUPERBLOCK];
    x[0] = -127.0;
    x[1] = 2.5;
    x[2] = -3.5;
    x[3] = 127.0;
    let a = ActivationSuperblock::quantize(&x);
    assert_eq!(a.d, 1.0);
    assert_eq!(a.qs[..4], [-127, 2, -4, 127]);
    assert_eq!(a.bsums[0], -2);
    x[0] = 100.0;
    let a = ActivationSuperblock::quantize(&x);
    assert_eq!(a.d, -1.0);
    assert_eq!(a.qs[..4], [-100, -2, 4, -127]);
    assert_eq!(ActivationSuperblock::quantize(&[0.0; SUPERBLOCK]).d, 0.0);
}

#[test]
fn every_family_quantizes_superblocks_like_the_scalar_function() {
    let mut rng = ChaCha20Rng::seed_from_u64(23);
    let mut cases: Vec<[f32; SUPERBLOCK]> = [1e-6f32, 1e-2, 1.0, 40.0, 3e4]
        .iter()
        .map(|scale| std::array::from_fn(|_| rng.random_range(-1.0f32..1.0) * scale))
        .collect();
    // Ties, the largest magnitude twice with both signs (the first sets the sign), zeros.
    let mut ties = [0f32; SUPERBLOCK];
    ties[..5].copy_from_slice(&[2.5, -3.5, 127.0, -127.0, 0.5]);
    let mut both = ties;
    both[2] = -127.0;
    both[3] = 127.0;
    cases.extend([ties, both, [0.0; SUPERBLOCK], [-0.0; SUPERBLOCK]]);
    for xs in &cases {
        let scalar = ActivationSuperblock::quantize(xs);
        for isa in Isa::available() {
            let got = ActivationSuperblock::quantize_with(isa, xs);
            assert_eq!(got.d.to_bits(), scalar.d.to_bits(), "{isa}");
            assert_eq!(got.qs, scalar.qs, "{isa}");
            assert_eq!(got.bsums, scalar.bsums, "{isa}");
        }
    }
}

#[test]
fn k_formats_need_whole_superblocks() {
    for format in [QuantFormat::Q4_K, QuantFormat::Q5_K, QuantFormat::Q6_K] {
        let bytes = vec![0u8; 2 * format.block_bytes()];
        let err = QuantMatrix::new(format, 1, 640, &bytes).expect_err("640 columns");
        let KernelError::BadMatrix(message) = err else {
            panic!("{format}: not a BadMatrix error")
        };
        assert!(
            message.contains(&format.to_string()) && message.contains("256"),
            "{message}"
        );
        assert!(QuantMatrix::new(format, 2, 256, &bytes).is_ok());
        assert!(QuantMatrix::new(format, 2, 256, &bytes[1..]).is_err());
        assert!(QuantMatrix::new(format, 1, 32, &bytes[..format.block_bytes()]).is_err());
    }
    for format in QuantFormat::ALL {
        let unit = format.block_values();
        assert!(QuantMatrix::new(format, usize::MAX / 2, unit * 2, &[0; 64]).is_err());
        assert_eq!(format.to_string(), format.to_string().to_lowercase());
    }
}

/// A permutation of `n` columns that moves each inside its group of [`SCALE_GROUP`], drawn
/// afresh for every group: what a quantization-exact encryption key does to a residual stream.
fn group_local_permutation(n: usize, rng: &mut ChaCha20Rng) -> Vec<usize> {
    use rand::seq::SliceRandom;
    let mut p: Vec<usize> = (0..n).collect();
    for group in p.chunks_mut(SCALE_GROUP) {
        group.shuffle(rng);
    }
    p
}

#[test]
fn columns_moved_inside_scale_groups_give_the_same_bits() {
    // The matrix's columns and the activations permuted alike inside groups of 16: the codes
    // move without quantizing again, and every family returns the plaintext product's bits.
    let mut rng = ChaCha20Rng::seed_from_u64(21);
    for format in QuantFormat::ALL {
        let unit = format.block_values();
        for (rows, cols, tokens) in shapes(format) {
            for fill in [Fill::Random, Fill::Edge] {
                let bytes = random_bytes(format, rows, cols, fill, &mut rng);
                let from = group_local_permutation(cols, &mut rng);
                let mut moved = Vec::with_capacity(bytes.len());
                for (b, block) in bytes.chunks(format.block_bytes()).enumerate() {
                    let column = (b * unit) % cols;
                    let local: Vec<usize> = from[column..column + unit]
                        .iter()
                        .map(|&j| j - column)
                        .collect();
                    moved.extend(format.permute_block(block, &local).expect("local move"));
                }
                let mut x: Vec<f32> = (0..tokens * cols)
                    .map(|_| rng.random_range(-3.0..3.0))
                    .collect();
                // Ties of magnitude with opposite signs: the K formats' activation scale takes
                // the sign of the first largest value, which the permutation may change.
                x[0] = 4.0;
                x[cols - 1] = -4.0;
                let x_moved: Vec<f32> = x
                    .chunks(cols)
                    .flat_map(|token| from.iter().map(move |&j| token[j]))
                    .collect();
                let plain = QuantMatrix::new(format, rows, cols, &bytes).expect("matrix");
                let encrypted = QuantMatrix::new(format, rows, cols, &moved).expect("matrix");
                let expected = run(&plain, Isa::Scalar, &x);
                for isa in Isa::available() {
                    let got = run(&encrypted, isa, &x_moved);
                    let same = got
                        .iter()
                        .zip(&expected)
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{isa} {format} ({rows}, {cols}) × {tokens}");
                }
            }
        }
    }
}

#[test]
fn matrices_sharing_activations_give_the_bits_of_separate_products() {
    // A block's projections through one quantization and one pass over the pool: query, key
    // and value rows of different counts (and formats, as in Q4_K_M files), against each
    // matrix alone, for one token (the shared pass) and several (tiles per matrix).
    let mut rng = ChaCha20Rng::seed_from_u64(11);
    let groups: [&[QuantFormat]; 4] = [
        &[QuantFormat::Q4_1, QuantFormat::Q4_1, QuantFormat::Q4_1],
        &[QuantFormat::Q5_0, QuantFormat::Q5_0, QuantFormat::Q8_0],
        &[QuantFormat::Q8_0, QuantFormat::Q4_0, QuantFormat::Q5_1],
        &[QuantFormat::Q4_K, QuantFormat::Q6_K, QuantFormat::Q5_K],
    ];
    for formats in groups {
        let cols = 2 * SUPERBLOCK;
        for rows in [[576, 192, 192], [1, 7, 3], [1536, 1536, 1]] {
            let matrices: Vec<QuantMatrix> = formats
                .iter()
                .zip(rows)
                .map(|(&format, rows)| {
                    let bytes = random_bytes(format, rows, cols, Fill::Random, &mut rng);
                    QuantMatrix::new(format, rows, cols, &bytes).expect("matrix")
                })
                .collect();
            let refs: Vec<&QuantMatrix> = matrices.iter().collect();
            for tokens in [1, 3, 9] {
                let x: Vec<f32> = (0..tokens * cols)
                    .map(|_| rng.random_range(-3.0..3.0))
                    .collect();
                for isa in Isa::available() {
                    let mut outs: Vec<Vec<f32>> = matrices
                        .iter()
                        .map(|m| vec![f32::NAN; tokens * m.rows()])
                        .collect();
                    let mut slices: Vec<&mut [f32]> =
                        outs.iter_mut().map(Vec::as_mut_slice).collect();
                    QuantMatrix::matmul_shared(isa, &refs, &x, &mut slices).expect("product");
                    for (m, out) in matrices.iter().zip(&outs) {
                        let alone = run(m, isa, &x);
                        let same = out
                            .iter()
                            .zip(&alone)
                            .all(|(a, b)| a.to_bits() == b.to_bits());
                        assert!(
                            same,
                            "{isa} {formats:?} {rows:?} × {tokens}: {}",
                            m.format()
                        );
                    }
                }
            }
        }
    }
    // Matrices that cannot share activations are refused.
    let plain = QuantMatrix::new(
        QuantFormat::Q8_0,
        2,
        SUPERBLOCK,
        &random_bytes(QuantFormat::Q8_0, 2, SUPERBLOCK, Fill::Random, &mut rng),
    )
    .expect("matrix");
    let k = QuantMatrix::new(
        QuantFormat::Q4_K,
        2,
        SUPERBLOCK,
        &random_bytes(QuantFormat::Q4_K, 2, SUPERBLOCK, Fill::Random, &mut rng),
    )
    .expect("matrix");
    let x = vec![1.0; SUPERBLOCK];
    let (mut a, mut b) = (vec![0.0; 2], vec![0.0; 2]);
    let refused = QuantMatrix::matmul_shared(Isa::Scalar, &[&plain, &k], &x, &mut [&mut a, &mut b]);
    assert!(matches!(refused, Err(KernelError::Shape(_))), "{refused:?}");
    let refused = QuantMatrix::matmul_shared(Isa::Scalar, &[&plain], &x, &mut [&mut a[..1]]);
    assert!(matches!(refused, Err(KernelError::Shape(_))), "{refused:?}");
}

#[test]
fn q5_0_held_as_q8_0_gives_the_bits_of_q5_0() {
    let mut rng = ChaCha20Rng::seed_from_u64(12);
    let held = |bytes: &[u8], rows: usize, cols: usize| {
        let mut b = veil_kernels::QuantMatrixBuilder::held_as(
            QuantFormat::Q5_0,
            QuantFormat::Q8_0,
            rows,
            cols,
        )
        .expect("builder");
        b.push_rows(bytes).expect("rows");
        b.finish().expect("matrix")
    };
    for fill in [Fill::Random, Fill::Edge] {
        for (rows, cols, tokens) in shapes(QuantFormat::Q5_0) {
            let bytes = random_bytes(QuantFormat::Q5_0, rows, cols, fill, &mut rng);
            let compact = QuantMatrix::new(QuantFormat::Q5_0, rows, cols, &bytes).expect("q5_0");
            let bytewise = held(&bytes, rows, cols);
            assert_eq!(bytewise.format(), QuantFormat::Q8_0);
            let same =
                |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same(&compact.dequantize(), &bytewise.dequantize()));
            let x: Vec<f32> = (0..tokens * cols)
                .map(|_| rng.random_range(-2.0f32..2.0))
                .collect();
            for isa in Isa::available() {
                let (a, b) = (run(&compact, isa, &x), run(&bytewise, isa, &x));
                assert!(
                    same(&a, &b),
                    "{isa:?} ({rows}, {cols}) x {tokens}: {a:?} vs {b:?}"
                );
            }
        }
    }
    // Only Q5_0 → Q8_0 (or a format as itself) is a layout change that keeps the bits.
    for (from, to) in [
        (QuantFormat::Q5_1, QuantFormat::Q8_0),
        (QuantFormat::Q8_0, QuantFormat::Q5_0),
        (QuantFormat::Q4_0, QuantFormat::Q8_0),
    ] {
        let err = veil_kernels::QuantMatrixBuilder::held_as(from, to, 2, 32).unwrap_err();
        assert!(
            matches!(err, KernelError::BadMatrix(_)),
            "{from} as {to}: {err}"
        );
    }
}
