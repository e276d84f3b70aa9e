//! Training the two private models on the digits with candle: a multilayer perceptron
//! (64 → 16 ReLU → 10) and a small CNN (3×3 convolution to 4 channels, sigmoid, dense to 10).
//! Weights are kept within ±1 so 8-bit fixed point loses little.

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use rand::{Rng, SeedableRng};

use crate::digits::Digit;
use crate::error::{Result, ZkError};
use crate::model::{Activation, FloatModel, Layer, CONV_OUT, INPUTS, KERNEL};

/// Which model to train.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// 64 → 16 (ReLU) → 10.
    Mlp,
    /// conv 3×3 → 4 channels (sigmoid) → 144 → 10.
    Cnn,
}

const HIDDEN: usize = 16;
const CHANNELS: usize = 4;
const EPOCHS: usize = 400;

fn err(e: candle_core::Error) -> ZkError {
    ZkError::BadData(format!("training failed: {e}"))
}

/// A variable with small uniform random values.
fn init(rng: &mut rand_chacha::ChaCha8Rng, shape: &[usize], fan_in: usize) -> Result<Var> {
    let bound = (1.0 / fan_in as f32).sqrt();
    let n: usize = shape.iter().product();
    let values: Vec<f32> = (0..n).map(|_| rng.random_range(-bound..bound)).collect();
    Var::from_vec(values, shape, &Device::Cpu).map_err(err)
}

/// Trains `arch` on `train` (full batch, AdamW, seeded) and returns the float model.
pub fn train(arch: Architecture, train: &[Digit], seed: u64) -> Result<FloatModel> {
    let device = Device::Cpu;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let pixels: Vec<f32> = train
        .iter()
        .flat_map(|d| d.pixels.iter().map(|&p| p as f32 / 16.0))
        .collect();
    let x = Tensor::from_vec(pixels, (train.len(), INPUTS), &device).map_err(err)?;
    let labels: Vec<u32> = train.iter().map(|d| d.label as u32).collect();
    let y = Tensor::from_vec(labels, train.len(), &device).map_err(err)?;
    let vars: Vec<Var> = match arch {
        Architecture::Mlp => vec![
            init(&mut rng, &[HIDDEN, INPUTS], INPUTS)?,
            init(&mut rng, &[HIDDEN], INPUTS)?,
            init(&mut rng, &[10, HIDDEN], HIDDEN)?,
            init(&mut rng, &[10], HIDDEN)?,
        ],
        Architecture::Cnn => vec![
            init(&mut rng, &[CHANNELS, 1, KERNEL, KERNEL], KERNEL * KERNEL)?,
            init(&mut rng, &[CHANNELS], KERNEL * KERNEL)?,
            init(
                &mut rng,
                &[10, CHANNELS * CONV_OUT * CONV_OUT],
                CHANNELS * CONV_OUT * CONV_OUT,
            )?,
            init(&mut rng, &[10], CHANNELS * CONV_OUT * CONV_OUT)?,
        ],
    };
    let forward = |x: &Tensor| -> candle_core::Result<Tensor> {
        match arch {
            Architecture::Mlp => {
                let h = x.matmul(&vars[0].t()?)?.broadcast_add(&vars[1])?.relu()?;
                h.matmul(&vars[2].t()?)?.broadcast_add(&vars[3])
            }
            Architecture::Cnn => {
                let n = x.dim(0)?;
                let image = x.reshape((n, 1, 8, 8))?;
                let conv = image.conv2d(&vars[0], 0, 1, 1, 1)?;
                let bias = vars[1].reshape((1, CHANNELS, 1, 1))?;
                let h = candle_nn::ops::sigmoid(&conv.broadcast_add(&bias)?)?.flatten_from(1)?;
                h.matmul(&vars[2].t()?)?.broadcast_add(&vars[3])
            }
        }
    };
    let params = ParamsAdamW {
        lr: 0.02,
        weight_decay: 1e-4,
        ..Default::default()
    };
    let mut optimizer = AdamW::new(vars.clone(), params).map_err(err)?;
    for _ in 0..EPOCHS {
        let loss = candle_nn::loss::cross_entropy(&forward(&x).map_err(err)?, &y).map_err(err)?;
        optimizer.backward_step(&loss).map_err(err)?;
        for v in &vars {
            v.set(&v.as_tensor().clamp(-1f32, 1f32).map_err(err)?)
                .map_err(err)?;
        }
    }
    let _ = forward(&x).and_then(|l| l.argmax(D::Minus1)).map_err(err)?;
    let rows = |v: &Var| -> Result<Vec<Vec<f32>>> {
        v.as_tensor()
            .to_dtype(DType::F32)
            .and_then(|t| t.to_vec2())
            .map_err(err)
    };
    let flat = |v: &Var| -> Result<Vec<f32>> { v.as_tensor().to_vec1().map_err(err) };
    let dense = Layer::Dense {
        inputs: if arch == Architecture::Mlp {
            HIDDEN
        } else {
            CHANNELS * CONV_OUT * CONV_OUT
        },
        outputs: 10,
        weights: rows(&vars[2])?,
        bias: flat(&vars[3])?,
        activation: Activation::None,
    };
    let (name, first) = match arch {
        Architecture::Mlp => (
            "mlp",
            Layer::Dense {
                inputs: INPUTS,
                outputs: HIDDEN,
                weights: rows(&vars[0])?,
                bias: flat(&vars[1])?,
                activation: Activation::Relu,
            },
        ),
        Architecture::Cnn => {
            let kernels: Vec<Vec<Vec<f32>>> = vars[0]
                .as_tensor()
                .reshape((CHANNELS, KERNEL, KERNEL))
                .and_then(|t| t.to_vec3())
                .map_err(err)?;
            (
                "cnn",
                Layer::Conv {
                    out_channels: CHANNELS,
                    weights: kernels,
                    bias: flat(&vars[1])?,
                    activation: Activation::Sigmoid,
                },
            )
        }
    };
    let model = FloatModel {
        name: name.into(),
        layers: vec![first, dense],
    };
    model.check()?;
    Ok(model)
}

/// Share of `digits` the float model labels right.
pub fn float_accuracy(model: &FloatModel, digits: &[Digit]) -> f64 {
    let right = digits
        .iter()
        .filter(|d| crate::model::argmax(&model.forward(&d.pixels)) == d.label as usize)
        .count();
    right as f64 / digits.len() as f64
}

/// Share of `digits` the fixed-point model labels right (an input out of range counts wrong).
pub fn fixed_accuracy(model: &crate::model::FixedModel, digits: &[Digit]) -> f64 {
    let right = digits
        .iter()
        .filter(|d| {
            model
                .trace(&d.pixels)
                .is_ok_and(|t| crate::model::argmax(&t.output) == d.label as usize)
        })
        .count();
    right as f64 / digits.len() as f64
}
