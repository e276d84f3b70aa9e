//! The scalar reference against exact (f64) arithmetic, and every kernel family this CPU has
//! against the scalar reference, bit for bit, on random data, odd shapes, single rows and the
//! edge values of each format; and against candle's own quantized matmul on the same bytes.
//! (Q4_1 and Q8_0 here; every format in `formats.rs`.)

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Module, Tensor};
use half::f16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use veil_kernels::{ActivationBlock, Isa, KernelError, QuantFormat, QuantMatrix, BLOCK};

const FORMATS: [QuantFormat; 2] = [QuantFormat::Q4_1, QuantFormat::Q8_0];

/// (rows, cols, tokens): odd sizes, one block, one row, tokens that are and are not multiples
/// of the four-token tile, odd rows under prompt tiles (Q8_0 runs them two rows at a time on
/// AVX-512), and enough rows to split over threads.
const SHAPES: [(usize, usize, usize); 10] = [
    (1, 32, 1),
    (3, 32, 2),
    (17, 96, 1),
    (17, 96, 5),
    (64, 576, 4),
    (64, 576, 37),
    (17, 96, 9),
    (1, 1536, 9),
    (1000, 64, 1),
    (1000, 64, 7),
];

/// A random matrix: scales and offsets drawn as `scale`, quantized values uniformly (the full
/// byte range, -128 included for Q8_0).
fn random_matrix(
    format: QuantFormat,
    rows: usize,
    cols: usize,
    rng: &mut ChaCha20Rng,
    mut scale: impl FnMut(&mut ChaCha20Rng) -> f32,
) -> (QuantMatrix, Vec<u8>) {
    let mut data = Vec::new();
    for _ in 0..rows * cols / BLOCK {
        data.extend(f16::from_f32(scale(rng)).to_le_bytes());
        if format == QuantFormat::Q4_1 {
            data.extend(f16::from_f32(scale(rng) - scale(rng)).to_le_bytes());
        }
        let values = if format == QuantFormat::Q4_1 { 16 } else { 32 };
        data.extend((0..values).map(|_| rng.random::<u8>()));
    }
    let matrix = QuantMatrix::new(format, rows, cols, &data).expect("valid matrix");
    (matrix, data)
}

/// The product in f64 over the dequantized weights and the dequantized activations, with each
/// block's offset term taken from the activations' stored sum as the kernels do.
fn reference(matrix: &QuantMatrix, bytes: &[u8], x: &[f32]) -> (Vec<f64>, Vec<f64>) {
    let (rows, cols) = (matrix.rows(), matrix.cols());
    let w = matrix.dequantize();
    let blocks: Vec<ActivationBlock> = x
        .chunks_exact(BLOCK)
        .map(|c| ActivationBlock::quantize(c.try_into().expect("block")))
        .collect();
    let tokens = x.len() / cols;
    let (mut out, mut magnitude) = (Vec::new(), Vec::new());
    for t in 0..tokens {
        for r in 0..rows {
            let (mut sum, mut mag) = (0f64, 0f64);
            for b in 0..cols / BLOCK {
                let a = &blocks[t * cols / BLOCK + b];
                let wb = &w[r * cols + b * BLOCK..r * cols + (b + 1) * BLOCK];
                // Q4_1's offset m is the smallest value a block can hold plus 0·d: recover it
                // from the bytes rather than the floats.
                let m = offset(matrix, bytes, r, b);
                for (j, &wj) in wb.iter().enumerate() {
                    let term = f64::from(wj - m) * f64::from(a.d) * f64::from(a.qs[j]);
                    sum += term;
                    mag += term.abs();
                }
                sum += f64::from(m) * f64::from(a.s);
                mag += (f64::from(m) * f64::from(a.s)).abs();
            }
            out.push(sum);
            magnitude.push(mag);
        }
    }
    (out, magnitude)
}

/// Q4_1's per-block offset (0 for Q8_0).
fn offset(matrix: &QuantMatrix, bytes: &[u8], row: usize, block: usize) -> f32 {
    if matrix.format() != QuantFormat::Q4_1 {
        return 0.0;
    }
    let at = (row * matrix.cols() / BLOCK + block) * 20;
    f16::from_le_bytes([bytes[at + 2], bytes[at + 3]]).to_f32()
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

#[test]
fn every_family_returns_the_references_bits_on_random_data() {
    let mut rng = ChaCha20Rng::seed_from_u64(7);
    println!("kernel families on this CPU: {:?}", Isa::available());
    for format in FORMATS {
        for (rows, cols, tokens) in SHAPES {
            let (matrix, bytes) = random_matrix(format, rows, cols, &mut rng, |r| {
                r.random_range(0.001..0.05)
            });
            let x: Vec<f32> = (0..tokens * cols)
                .map(|_| rng.random_range(-3.0..3.0))
                .collect();
            let what = format!("{format} ({rows}, {cols}) × {tokens} tokens");
            let scalar = run(&matrix, Isa::Scalar, &x);
            let (expected, magnitude) = reference(&matrix, &bytes, &x);
            assert_close(&scalar, &expected, &magnitude, &what);
            for isa in Isa::available() {
                assert_eq!(run(&matrix, isa, &x), scalar, "{isa} {what}");
            }
        }
    }
}

#[test]
fn families_are_bit_exact_where_float_sums_are_exact() {
    // Power-of-two scales and offsets, activations that quantize to themselves (one 127 per
    // block sets the scale to exactly 1): every partial sum is an integer multiple of a power of
    // two far below 2^24, so any summation order gives the same float.
    let mut rng = ChaCha20Rng::seed_from_u64(11);
    let pow2 = |r: &mut ChaCha20Rng| [0.25f32, 0.5, 1.0, 2.0][r.random_range(0..4)];
    for format in FORMATS {
        for (rows, cols, tokens) in SHAPES {
            let (matrix, bytes) = random_matrix(format, rows, cols, &mut rng, pow2);
            let x: Vec<f32> = (0..tokens * cols)
                .map(|i| {
                    if i % BLOCK == 5 {
                        127.0
                    } else {
                        rng.random_range(-40i32..=40) as f32
                    }
                })
                .collect();
            let scalar = run(&matrix, Isa::Scalar, &x);
            let (expected, _) = reference(&matrix, &bytes, &x);
            for (&s, &e) in scalar.iter().zip(&expected) {
                assert_eq!(
                    f64::from(s),
                    e,
                    "{format} scalar ({rows}, {cols}) × {tokens}"
                );
            }
            for isa in Isa::available() {
                assert_eq!(
                    run(&matrix, isa, &x),
                    scalar,
                    "{format} {isa} ({rows}, {cols}) × {tokens}"
                );
            }
        }
    }
}

#[test]
fn edge_values_of_each_format() {
    // Q8_0 weights at -128 and 127, Q4_1 nibbles at 0 and 15, zero scales, all-zero
    // activations (scale 0), and large activations.
    for format in FORMATS {
        let cols = 64;
        let mut data = Vec::new();
        for b in 0..4 * cols / BLOCK {
            let d = if b == 3 { 0.0 } else { 0.5 };
            data.extend(f16::from_f32(d).to_le_bytes());
            match format {
                QuantFormat::Q4_1 => {
                    data.extend(f16::from_f32(-1.0).to_le_bytes());
                    data.extend(std::iter::repeat_n(
                        if b % 2 == 0 { 0xF0 } else { 0x0F },
                        16,
                    ));
                }
                _ => {
                    data.extend((0..32).map(|j| if j % 2 == 0 { 0x80u8 } else { 0x7F }));
                }
            }
        }
        let matrix = QuantMatrix::new(format, 4, cols, &data).expect("matrix");
        let inputs: [Vec<f32>; 3] = [
            vec![0.0; cols],
            (0..cols)
                .map(|j| if j % 3 == 0 { -1e4 } else { 7e3 })
                .collect(),
            (0..cols).map(|j| (j as f32 - 31.5) / 8.0).collect(),
        ];
        for x in inputs {
            let (expected, magnitude) = reference(&matrix, &data, &x);
            let scalar = run(&matrix, Isa::Scalar, &x);
            assert_close(
                &scalar,
                &expected,
                &magnitude,
                &format!("{format} edge values"),
            );
            for isa in Isa::available() {
                assert_eq!(run(&matrix, isa, &x), scalar, "{format} {isa} edge values");
            }
        }
    }
}

#[test]
fn agrees_with_candles_quantized_matmul_on_the_same_bytes() {
    let mut rng = ChaCha20Rng::seed_from_u64(3);
    for (format, dtype) in [
        (QuantFormat::Q4_1, GgmlDType::Q4_1),
        (QuantFormat::Q8_0, GgmlDType::Q8_0),
    ] {
        let (rows, cols, tokens) = (96, 576, 5);
        let dense: Vec<f32> = (0..rows * cols)
            .map(|_| rng.random_range(-0.2..0.2))
            .collect();
        let dense = Tensor::from_vec(dense, (rows, cols), &Device::Cpu).expect("tensor");
        let q = QTensor::quantize(&dense, dtype).expect("quantize");
        let bytes = q.data().expect("bytes").into_owned();
        let matrix = QuantMatrix::new(format, rows, cols, &bytes).expect("matrix");
        let x: Vec<f32> = (0..tokens * cols)
            .map(|_| rng.random_range(-2.0..2.0))
            .collect();
        let xt = Tensor::from_vec(x.clone(), (tokens, cols), &Device::Cpu).expect("tensor");
        let candle = candle_core::quantized::QMatMul::from_qtensor(q)
            .expect("qmatmul")
            .forward(&xt)
            .expect("forward")
            .flatten_all()
            .expect("flat")
            .to_vec1::<f32>()
            .expect("vec");
        let ours = run(&matrix, Isa::best(), &x);
        let (_, magnitude) = reference(&matrix, &bytes, &x);
        for ((&c, &o), &m) in candle.iter().zip(&ours).zip(&magnitude) {
            assert!(
                (f64::from(c) - f64::from(o)).abs() <= 1e-5 * m + 1e-6,
                "{format}: candle {c} vs veil {o}"
            );
        }
    }
}

#[test]
fn bad_shapes_are_errors_not_panics() {
    let ok = vec![0u8; 2 * 20];
    let bad = |format, rows, cols, data: &[u8]| {
        matches!(
            QuantMatrix::new(format, rows, cols, data),
            Err(KernelError::BadMatrix(_))
        )
    };
    assert!(bad(QuantFormat::Q4_1, 2, 33, &ok));
    assert!(bad(QuantFormat::Q4_1, 0, 32, &[]));
    assert!(bad(QuantFormat::Q4_1, 2, 32, &[0; 39]));
    assert!(bad(QuantFormat::Q8_0, 2, 32, &ok));
    assert!(bad(QuantFormat::Q4_1, usize::MAX / 2, 64, &ok));
    let matrix = QuantMatrix::new(QuantFormat::Q4_1, 2, 32, &ok).expect("matrix");
    let mut out = vec![0f32; 2];
    assert!(matches!(
        matrix.matmul(&[0.0; 31], &mut out),
        Err(KernelError::Shape(_))
    ));
    assert!(matches!(
        matrix.matmul(&[0.0; 64], &mut out),
        Err(KernelError::Shape(_))
    ));
    assert!(matrix.matmul(&[1.0; 32], &mut out).is_ok());
    assert!(matrix.matmul(&[], &mut []).is_ok());
}

#[test]
fn every_family_quantizes_activations_bit_for_bit_like_the_reference() {
    let mut rng = ChaCha20Rng::seed_from_u64(5);
    let mut blocks: Vec<[f32; BLOCK]> = (0..2000)
        .map(|i| {
            let scale = [1e-6f32, 1e-2, 1.0, 40.0, 3e4][i % 5];
            std::array::from_fn(|_| rng.random_range(-1.0f32..1.0) * scale)
        })
        .collect();
    // Exact halves after scaling (127 sets the scale to 1): ties round away from zero.
    blocks.push(std::array::from_fn(|j| {
        if j == 0 {
            127.0
        } else {
            j as f32 - 15.5
        }
    }));
    blocks.push(std::array::from_fn(|j| {
        if j == 0 {
            -127.0
        } else {
            0.5 - j as f32
        }
    }));
    blocks.push([0.0; BLOCK]);
    blocks.push(std::array::from_fn(|j| if j == 7 { -2.0 } else { 0.0 }));
    for xs in &blocks {
        let reference = ActivationBlock::quantize(xs);
        for isa in Isa::available() {
            let got = veil_kernels::quantize_with(isa, xs).expect("available");
            assert_eq!(got, reference, "{isa} on {xs:?}");
        }
    }
    let tie = ActivationBlock::quantize(&blocks[2000]);
    assert_eq!(tie.qs[1..5], [-15, -14, -13, -12]);
    assert_eq!(tie.qs[16..20], [1, 2, 3, 4]);
}
