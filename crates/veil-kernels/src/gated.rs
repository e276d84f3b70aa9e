//! A gated FFN's activation, `act(gate) · up`, in one pass over both threads.
//!
//! candle ran it as two ops (the non-linearity, then the product), each allocating its output,
//! and its GELU calls `tanhf` per value: with `expm1f` under it, about 8% of Gemma 3's prompt
//! time. Here SiLU is candle's formula, value for value (the same bits as candle's ops), and
//! GELU's `0.5 · v · (1 + tanh(u))` is `v / (1 + exp(-2u))`, within a few units in the last
//! place of candle's and about twice as fast: Gemma 3's prefill ran 12-17% faster. Each value is
//! computed alone, so any split over threads gives the same bits.

use crate::error::KernelError;

/// The non-linearity between a gated FFN's two projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateActivation {
    /// SiLU (SwiGLU): the llama family.
    Silu,
    /// GELU, tanh approximation (GeGLU): Gemma.
    GeluTanh,
}

impl GateActivation {
    /// The non-linearity of one value.
    #[inline]
    fn apply(self, v: f32) -> f32 {
        match self {
            Self::Silu => v / (1.0 + (-v).exp()),
            Self::GeluTanh => {
                const SQRT_TWO_OVER_PI: f32 = 0.797_884_6;
                let u = SQRT_TWO_OVER_PI * v * (1.0 + 0.044715 * v * v);
                // 0.5 · v · (1 + tanh(u)) = v / (1 + exp(-2u)): no cancellation where
                // tanh(u) nears -1.
                v / (1.0 + (-2.0 * u).exp())
            }
        }
    }
}

/// `out[i] = act(gate[i]) · up[i]`, split over candle's barrier pool for long inputs.
pub fn gated_activation(
    act: GateActivation,
    gate: &[f32],
    up: &[f32],
    out: &mut [f32],
) -> Result<(), KernelError> {
    if gate.len() != up.len() || gate.len() != out.len() {
        return Err(KernelError::Shape(format!(
            "gate {}, up {} and output {} must hold as many values",
            gate.len(),
            up.len(),
            out.len()
        )));
    }
    let per_part = out
        .len()
        .div_ceil(crate::threads::part_count(out.len()))
        .max(1);
    let parts = out
        .chunks_mut(per_part)
        .zip(gate.chunks(per_part).zip(up.chunks(per_part)))
        .collect();
    crate::threads::run_parts(parts, |(out, (gate, up))| {
        for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
            *o = act.apply(g) * u;
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_candles_ops_on_any_split() {
        use candle_core::{Device, Tensor};
        let n = 3 * crate::threads::SERIAL_VALUES + 5;
        let gate: Vec<f32> = (0..n)
            .map(|i| ((i * 7919) % 2001) as f32 / 100.0 - 10.0)
            .collect();
        let up: Vec<f32> = (0..n)
            .map(|i| ((i * 104_729) % 997) as f32 / 97.0 - 5.0)
            .collect();
        let (g, u) = (
            Tensor::new(gate.as_slice(), &Device::Cpu).unwrap(),
            Tensor::new(up.as_slice(), &Device::Cpu).unwrap(),
        );
        for (act, theirs) in [
            (GateActivation::Silu, g.silu().unwrap()),
            (GateActivation::GeluTanh, g.gelu().unwrap()),
        ] {
            let expected: Vec<f32> = (theirs * &u).unwrap().to_vec1().unwrap();
            let mut first: Option<Vec<f32>> = None;
            for threads in [1, 2] {
                let mut out = vec![f32::NAN; n];
                crate::with_thread_limit(threads, || {
                    gated_activation(act, &gate, &up, &mut out).unwrap()
                });
                for (i, (&ours, &theirs)) in out.iter().zip(&expected).enumerate() {
                    // SiLU is candle's formula: the same bits. GELU's is computed without
                    // candle's cancellation in `1 + tanh(u)` near -1: as close to the exact
                    // value (f64) as candle's, or closer.
                    let close = match act {
                        GateActivation::Silu => ours.to_bits() == theirs.to_bits(),
                        GateActivation::GeluTanh => {
                            let v = f64::from(gate[i]);
                            let u = 0.797_884_560_802_865_4 * v * (1.0 + 0.044715 * v * v);
                            // 0.5 · v · (1 + tanh(u)), in a form f64 computes without
                            // cancellation.
                            let exact = v / (1.0 + (-2.0 * u).exp()) * f64::from(up[i]);
                            let error = |x: f32| (f64::from(x) - exact).abs();
                            let slack = 4.0 * f64::from(f32::EPSILON) * exact.abs();
                            error(ours) <= error(theirs) + slack
                        }
                    };
                    assert!(
                        close,
                        "{act:?}, value {i}: {ours} against candle's {theirs}"
                    );
                }
                // Any split over threads gives the same bits.
                match &first {
                    None => first = Some(out),
                    Some(first) => assert!(
                        first
                            .iter()
                            .zip(&out)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{act:?}: the split changed the bits"
                    ),
                }
            }
        }
        // GELU's limits: exp overflowing or vanishing gives tanh of ±1, NaN stays NaN.
        let mut edge = [0.0f32; 4];
        let (g, u) = ([100.0, -100.0, f32::NAN, 0.0], [1.0; 4]);
        gated_activation(GateActivation::GeluTanh, &g, &u, &mut edge).unwrap();
        assert_eq!(edge[..2], [100.0, -0.0]);
        assert!(edge[2].is_nan() && edge[3] == 0.0);
        let mut short = vec![0.0; 3];
        assert!(gated_activation(GateActivation::Silu, &gate[..3], &up[..2], &mut short).is_err());
    }
}
