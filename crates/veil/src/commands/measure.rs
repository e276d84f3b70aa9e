//! Measurements the benchmarks and demos share: decode timing, medians, peak memory.

use std::time::{Duration, Instant};

use anyhow::Result;
use veil_model::{sampling::argmax, TokenStep};

/// Times one prefill of `prompt` and `tokens` greedy decode steps; returns tokens/s for each
/// and the tokens decoded.
pub(crate) fn measure(
    session: &mut dyn TokenStep,
    prompt: &[u32],
    tokens: usize,
) -> Result<(f64, f64, Vec<u32>)> {
    let t0 = Instant::now();
    let mut logits = session.step(prompt)?;
    let t1 = Instant::now();
    let mut decoded = Vec::with_capacity(tokens);
    for _ in 0..tokens {
        decoded.push(argmax(&logits));
        logits = session.step(&decoded[decoded.len() - 1..])?;
    }
    let t2 = Instant::now();
    Ok((
        prompt.len() as f64 / secs(t1 - t0),
        tokens as f64 / secs(t2 - t1),
        decoded,
    ))
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64().max(1e-9)
}

/// The median of some measurements (the mean of the middle two for an even count).
pub(crate) fn median(xs: &mut [f64]) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

/// The process's peak resident set size, from `/proc/self/status` (Linux only).
pub(crate) fn peak_memory() -> Option<u64> {
    peak_memory_of("self")
}

/// Process `pid`'s peak resident set size (`self` for this one), from `/proc` (Linux only).
pub(crate) fn peak_memory_of(pid: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
