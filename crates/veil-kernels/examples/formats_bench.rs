//! Throughput of every format's product, Veil's kernels next to candle's on the same bytes:
//! one token (decode) and a 64-token prompt, on a (2048, 1024) matrix (weights quantized from
//! random values). Prints tokens per second per matrix; threads are candle's barrier pool
//! (set its size with the usual environment, e.g. `RAYON_NUM_THREADS`/`CANDLE_NUM_THREADS`).
//!
//! `cargo run --release -p veil-kernels --example formats_bench [q4_k q6_k ...]`

use std::time::{Duration, Instant};

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use veil_kernels::{Isa, QuantFormat, QuantMatrix};

/// Calls per second of `f`: the best of twelve windows of 25 ms after a warm-up (the best, so
/// other work on the machine disturbs the figure less).
fn rate(mut f: impl FnMut()) -> f64 {
    for _ in 0..3 {
        f();
    }
    let mut best = 0f64;
    for _ in 0..12 {
        let start = Instant::now();
        let mut calls = 0u32;
        while start.elapsed() < Duration::from_millis(25) {
            f();
            calls += 1;
        }
        best = best.max(f64::from(calls) / start.elapsed().as_secs_f64());
    }
    best
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // `VEIL_SHAPE=rows,cols` picks the matrix.
    let (rows, cols) = std::env::var("VEIL_SHAPE")
        .ok()
        .and_then(|s| {
            let (r, c) = s.split_once(',')?;
            Some((r.parse().ok()?, c.parse().ok()?))
        })
        .unwrap_or((2048, 1024));
    // `VEIL_ISA=avx2` (or scalar, avx512) picks the family; the fastest by default.
    let isa = std::env::var("VEIL_ISA")
        .ok()
        .and_then(|name| Isa::available().into_iter().find(|i| i.to_string() == name))
        .unwrap_or_else(Isa::best);
    let dense: Vec<f32> = (0..rows * cols)
        .map(|i| ((i * 7919 % 1000) as f32 / 1000.0 - 0.5) * 0.2)
        .collect();
    let dense = Tensor::from_vec(dense, (rows, cols), &Device::Cpu)?;
    println!(
        "({rows}, {cols}) matrix, kernels {:?}, running {isa}; tokens/s for this one matrix",
        Isa::available(),
    );
    println!(
        "{:<6} {:>14} {:>14} {:>16} {:>16}",
        "format", "veil 1 tok", "candle 1 tok", "veil 64-tok", "candle 64-tok"
    );
    // Formats named on the command line (`q4_k q6_k`), or all.
    let wanted: Vec<String> = std::env::args().skip(1).collect();
    for format in QuantFormat::ALL {
        if !wanted.is_empty() && !wanted.contains(&format.to_string()) {
            continue;
        }
        let q = QTensor::quantize(&dense, format.ggml_dtype())?;
        let bytes = q.data()?.into_owned();
        let matrix = QuantMatrix::new(format, rows, cols, &bytes)?;
        let candle = QMatMul::from_qtensor(q)?;
        let mut line = format!("{format:<6}");
        for tokens in [1usize, 64] {
            let x: Vec<f32> = (0..tokens * cols)
                .map(|i| ((i * 31 % 97) as f32 - 48.0) / 24.0)
                .collect();
            let mut out = vec![0f32; tokens * rows];
            let veil = rate(|| {
                if let Err(e) = matrix.matmul_with(isa, &x, &mut out) {
                    eprintln!("{e}");
                }
            }) * tokens as f64;
            let xt = Tensor::from_vec(x.clone(), (tokens, cols), &Device::Cpu)?;
            // `VEIL_ONLY=1` skips candle (for profiling Veil's kernels alone).
            let theirs = if std::env::var_os("VEIL_ONLY").is_some() {
                0.0
            } else {
                rate(|| {
                    if let Err(e) = candle.forward(&xt) {
                        eprintln!("{e}");
                    }
                }) * tokens as f64
            };
            line += &format!(" {veil:>14.0} {theirs:>14.0}");
        }
        println!("{line}");
    }
    Ok(())
}
