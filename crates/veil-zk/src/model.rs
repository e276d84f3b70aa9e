//! The small private models Veil proves: a float description (what training writes), its
//! fixed-point version (what the circuit computes), and the fixed-point forward pass in plain
//! integer arithmetic, which the circuit must reproduce exactly.
//!
//! Fixed point: inputs are digit pixels 0..16 (the value pixel/16 at scale 2^4); weights and
//! biases are 8-bit integers at a per-layer scale 2^F; activations are at scale 2^6. A layer
//! sums `w·x` and `b·2^A_in`, divides by 2^(F + A_in − 6) rounding down, and applies its
//! activation by table lookup on the quotient, which must then lie in [−1024, 1024) (the logits
//! need no table and have no such bound).

use serde::{Deserialize, Serialize};

use crate::error::{Result, ZkError};

/// Scale of the input pixels: 2^4 (pixels 0..16 stand for 0..1).
pub const INPUT_SCALE_BITS: u32 = 4;
/// Scale of every activation: 2^6.
pub const ACT_SCALE_BITS: u32 = 6;
/// Activations (quotients before the activation) lie in [−ACT_RANGE, ACT_RANGE).
pub const ACT_RANGE: i64 = 1 << 10;
/// Pixels in an input.
pub const INPUTS: usize = 64;
/// Largest magnitude of an 8-bit weight.
pub const WEIGHT_MAX: i64 = 127;

/// A non-linearity, applied by lookup in the circuit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    /// max(x, 0).
    Relu,
    /// 1 / (1 + e^−x).
    Sigmoid,
    /// x (the logits).
    None,
}

impl Activation {
    /// The activation on a fixed-point value at scale 2^6.
    pub fn apply_fixed(self, q: i64) -> i64 {
        match self {
            Self::Relu => q.max(0),
            Self::Sigmoid => {
                let scale = (1i64 << ACT_SCALE_BITS) as f64;
                let x = q as f64 / scale;
                (scale / (1.0 + (-x).exp())).round() as i64
            }
            Self::None => q,
        }
    }

    /// The activation on a float.
    pub fn apply_float(self, x: f32) -> f32 {
        match self {
            Self::Relu => x.max(0.0),
            Self::Sigmoid => 1.0 / (1.0 + (-x).exp()),
            Self::None => x,
        }
    }

    /// Whether the circuit applies it by table lookup (the identity needs no table: the
    /// rescaling alone fixes the quotient, whatever its size).
    pub fn has_table(self) -> bool {
        self != Self::None
    }

    /// The tag the circuit's activation table uses.
    pub fn tag(self) -> u64 {
        match self {
            Self::Relu => 1,
            Self::Sigmoid => 2,
            Self::None => 3,
        }
    }

    /// The activations with a table, in tag order.
    pub const TABLED: [Activation; 2] = [Self::Relu, Self::Sigmoid];
}

/// One layer of a float model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Layer {
    /// y = W x + b.
    Dense {
        /// Inputs.
        inputs: usize,
        /// Outputs.
        outputs: usize,
        /// `weights[o][i]` multiplies input i for output o.
        weights: Vec<Vec<f32>>,
        /// One per output.
        bias: Vec<f32>,
        /// Applied to each output.
        activation: Activation,
    },
    /// A 3×3 convolution of one 8×8 input channel, stride 1, no padding (8×8 → 6×6 per output
    /// channel), flattened channel-major.
    Conv {
        /// Output channels.
        out_channels: usize,
        /// `weights[c][ky][kx]`.
        weights: Vec<Vec<Vec<f32>>>,
        /// One per output channel.
        bias: Vec<f32>,
        /// Applied to each output.
        activation: Activation,
    },
}

/// Side of the input image.
pub const IMAGE: usize = 8;
/// Side of a convolution kernel.
pub const KERNEL: usize = 3;
/// Side of a convolution's output.
pub const CONV_OUT: usize = IMAGE - KERNEL + 1;

/// A model as training leaves it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FloatModel {
    /// A name for reports.
    pub name: String,
    /// The layers, in order.
    pub layers: Vec<Layer>,
}

/// One dot product the model computes: which inputs (indices into the layer's input vector)
/// meet which weights (indices into the model's weight list), plus the bias weight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Neuron {
    /// (input index, weight index) pairs.
    pub terms: Vec<(usize, usize)>,
    /// The bias's weight index.
    pub bias: usize,
}

/// A fixed-point layer: its neurons and how to rescale them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FixedLayer {
    /// Inputs the layer reads.
    pub inputs: usize,
    /// One per output.
    pub neurons: Vec<Neuron>,
    /// Scale bits of the layer's weights.
    pub weight_bits: u32,
    /// Scale bits of its input.
    pub input_bits: u32,
    /// Applied after rescaling.
    pub activation: Activation,
}

impl FixedLayer {
    /// Bits the sum is shifted right by.
    pub fn shift(&self) -> u32 {
        self.weight_bits + self.input_bits - ACT_SCALE_BITS
    }
}

/// A model in fixed point: 8-bit weights in one list, and the layers that use them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FixedModel {
    /// The public shape.
    pub shape: ModelShape,
    /// Every weight and bias, as 8-bit integers, in the order the layers list them.
    pub weights: Vec<i64>,
    /// The layers.
    pub layers: Vec<FixedLayer>,
}

/// What the fixed-point model computed on one input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trace {
    /// Per layer: each neuron's sum, quotient, remainder and output.
    pub layers: Vec<Vec<NeuronTrace>>,
    /// The logits, at scale 2^6.
    pub output: Vec<i64>,
}

/// One neuron's computation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NeuronTrace {
    /// Σ w·x + b·2^A_in.
    pub sum: i64,
    /// ⌊sum / 2^shift⌋.
    pub quotient: i64,
    /// sum − quotient·2^shift.
    pub remainder: i64,
    /// The activation of the quotient.
    pub output: i64,
}

impl FloatModel {
    /// Checks shapes: what comes from a file must fit together.
    pub fn check(&self) -> Result<()> {
        let bad = |why: String| Err(ZkError::BadModel(why));
        let mut width = INPUTS;
        if self.layers.is_empty() {
            return bad("the model has no layers".into());
        }
        for (l, layer) in self.layers.iter().enumerate() {
            let finite = |v: &[f32]| v.iter().all(|x| x.is_finite());
            match layer {
                Layer::Dense {
                    inputs,
                    outputs,
                    weights,
                    bias,
                    ..
                } => {
                    if *inputs != width || weights.len() != *outputs || bias.len() != *outputs {
                        return bad(format!("layer {l}: shapes do not fit (input {width})"));
                    }
                    if weights
                        .iter()
                        .any(|row| row.len() != *inputs || !finite(row))
                        || !finite(bias)
                    {
                        return bad(format!(
                            "layer {l}: a weight row has the wrong length or a non-finite value"
                        ));
                    }
                    width = *outputs;
                }
                Layer::Conv {
                    out_channels,
                    weights,
                    bias,
                    ..
                } => {
                    if l != 0 {
                        return bad(format!("layer {l}: a convolution must come first"));
                    }
                    let square = weights.iter().all(|k| {
                        k.len() == KERNEL && k.iter().all(|r| r.len() == KERNEL && finite(r))
                    });
                    if weights.len() != *out_channels
                        || bias.len() != *out_channels
                        || !square
                        || !finite(bias)
                    {
                        return bad(format!(
                            "layer {l}: a convolution needs {out_channels} 3×3 kernels and biases"
                        ));
                    }
                    width = out_channels * CONV_OUT * CONV_OUT;
                }
            }
            if width == 0 || width > 4096 {
                return bad(format!("layer {l}: {width} outputs"));
            }
        }
        if width != 10 {
            return bad(format!("the model ends in {width} outputs, not 10 digits"));
        }
        Ok(())
    }

    /// The float forward pass on pixels 0..16.
    pub fn forward(&self, pixels: &[u8]) -> Vec<f32> {
        let mut x: Vec<f32> = pixels.iter().map(|&p| p as f32 / 16.0).collect();
        for layer in &self.layers {
            x = match layer {
                Layer::Dense {
                    weights,
                    bias,
                    activation,
                    ..
                } => weights
                    .iter()
                    .zip(bias)
                    .map(|(row, b)| {
                        activation
                            .apply_float(row.iter().zip(&x).map(|(w, v)| w * v).sum::<f32>() + b)
                    })
                    .collect(),
                Layer::Conv {
                    weights,
                    bias,
                    activation,
                    ..
                } => {
                    let mut out = Vec::with_capacity(weights.len() * CONV_OUT * CONV_OUT);
                    for (kernel, b) in weights.iter().zip(bias) {
                        for y in 0..CONV_OUT {
                            for xx in 0..CONV_OUT {
                                let mut sum = *b;
                                for (ky, row) in kernel.iter().enumerate() {
                                    for (kx, w) in row.iter().enumerate() {
                                        sum += w * x[(y + ky) * IMAGE + xx + kx];
                                    }
                                }
                                out.push(activation.apply_float(sum));
                            }
                        }
                    }
                    out
                }
            };
        }
        x
    }

    /// The fixed-point model: weights and biases rounded to 8 bits at the finest scale (at
    /// most 2^7) that holds the layer's largest magnitude.
    pub fn quantize(&self) -> Result<FixedModel> {
        self.check()?;
        let mut weights = Vec::new();
        let mut shape = Vec::new();
        for layer in &self.layers {
            let values: Vec<f32> = match layer {
                Layer::Dense { weights, bias, .. } => {
                    weights.iter().flatten().chain(bias).copied().collect()
                }
                Layer::Conv { weights, bias, .. } => weights
                    .iter()
                    .flatten()
                    .flatten()
                    .chain(bias)
                    .copied()
                    .collect(),
            };
            let largest = values.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
            let weight_bits = (WEIGHT_MAX as f32 / largest).log2().floor().clamp(0.0, 7.0) as u32;
            let scale = (1u32 << weight_bits) as f32;
            weights.extend(
                values
                    .iter()
                    .map(|&v| ((v * scale).round() as i64).clamp(-WEIGHT_MAX, WEIGHT_MAX)),
            );
            shape.push(match layer {
                Layer::Dense {
                    inputs,
                    outputs,
                    activation,
                    ..
                } => LayerShape::Dense {
                    inputs: *inputs,
                    outputs: *outputs,
                    weight_bits,
                    activation: *activation,
                },
                Layer::Conv {
                    out_channels,
                    activation,
                    ..
                } => LayerShape::Conv {
                    out_channels: *out_channels,
                    weight_bits,
                    activation: *activation,
                },
            });
        }
        FixedModel::new(ModelShape { layers: shape }, weights)
    }
}

/// A layer's public shape: sizes, scale and activation, no weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum LayerShape {
    /// A dense layer.
    Dense {
        /// Inputs.
        inputs: usize,
        /// Outputs.
        outputs: usize,
        /// Scale bits of its 8-bit weights.
        weight_bits: u32,
        /// Its activation.
        activation: Activation,
    },
    /// A 3×3 convolution of the 8×8 input.
    Conv {
        /// Output channels.
        out_channels: usize,
        /// Scale bits of its 8-bit weights.
        weight_bits: u32,
        /// Its activation.
        activation: Activation,
    },
}

/// What a verifier knows of a private model: its shape, not its weights.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelShape {
    /// The layers, in order.
    pub layers: Vec<LayerShape>,
}

impl ModelShape {
    /// The layers' neurons, checking the shapes fit together.
    pub fn fixed_layers(&self) -> Result<Vec<FixedLayer>> {
        let bad = |why: String| Err(ZkError::BadModel(why));
        if self.layers.is_empty() || self.layers.len() > 8 {
            return bad(format!("{} layers", self.layers.len()));
        }
        let mut layers = Vec::new();
        let mut width = INPUTS;
        let mut input_bits = INPUT_SCALE_BITS;
        let mut base = 0;
        for (l, layer) in self.layers.iter().enumerate() {
            let (neurons, weight_bits, activation, used) = match *layer {
                LayerShape::Dense {
                    inputs,
                    outputs,
                    weight_bits,
                    activation,
                } => {
                    if inputs != width || outputs == 0 || outputs > 1024 {
                        return bad(format!("layer {l}: {inputs} inputs after {width} outputs"));
                    }
                    let neurons = (0..outputs)
                        .map(|o| Neuron {
                            terms: (0..inputs).map(|i| (i, base + o * inputs + i)).collect(),
                            bias: base + outputs * inputs + o,
                        })
                        .collect::<Vec<_>>();
                    (neurons, weight_bits, activation, outputs * inputs + outputs)
                }
                LayerShape::Conv {
                    out_channels,
                    weight_bits,
                    activation,
                } => {
                    if l != 0 || out_channels == 0 || out_channels > 64 {
                        return bad(format!(
                            "layer {l}: a convolution comes first, with 1-64 channels"
                        ));
                    }
                    let kernel_len = KERNEL * KERNEL;
                    let mut neurons = Vec::new();
                    for c in 0..out_channels {
                        for y in 0..CONV_OUT {
                            for x in 0..CONV_OUT {
                                let terms = (0..kernel_len)
                                    .map(|k| {
                                        let (ky, kx) = (k / KERNEL, k % KERNEL);
                                        ((y + ky) * IMAGE + x + kx, base + c * kernel_len + k)
                                    })
                                    .collect();
                                neurons.push(Neuron {
                                    terms,
                                    bias: base + out_channels * kernel_len + c,
                                });
                            }
                        }
                    }
                    (
                        neurons,
                        weight_bits,
                        activation,
                        out_channels * kernel_len + out_channels,
                    )
                }
            };
            if weight_bits > 7 || weight_bits + input_bits < ACT_SCALE_BITS + 1 {
                return bad(format!(
                    "layer {l}: weights at 2^{weight_bits} leave too few bits for fixed point"
                ));
            }
            let outputs = neurons.len();
            layers.push(FixedLayer {
                inputs: width,
                neurons,
                weight_bits,
                input_bits,
                activation,
            });
            width = outputs;
            input_bits = ACT_SCALE_BITS;
            base += used;
        }
        if width != 10 {
            return bad(format!("the model ends in {width} outputs, not 10 digits"));
        }
        Ok(layers)
    }

    /// Weights and biases the shape holds.
    pub fn weight_count(&self) -> usize {
        self.layers
            .iter()
            .map(|l| match *l {
                LayerShape::Dense {
                    inputs, outputs, ..
                } => outputs * inputs + outputs,
                LayerShape::Conv { out_channels, .. } => out_channels * (KERNEL * KERNEL + 1),
            })
            .sum()
    }
}

impl FixedModel {
    /// A model of `shape` with `weights`, checked.
    pub fn new(shape: ModelShape, weights: Vec<i64>) -> Result<Self> {
        let layers = shape.fixed_layers()?;
        if weights.len() != shape.weight_count() {
            return Err(ZkError::BadModel(format!(
                "{} weights for a shape that holds {}",
                weights.len(),
                shape.weight_count()
            )));
        }
        if weights.iter().any(|w| w.abs() > WEIGHT_MAX) {
            return Err(ZkError::BadModel("a weight does not fit 8 bits".into()));
        }
        Ok(Self {
            shape,
            weights,
            layers,
        })
    }

    /// A model of `shape` whose weights are unknown (zeros): what a verifier builds the
    /// circuit from.
    pub fn of_shape(shape: ModelShape) -> Result<Self> {
        let weights = vec![0; shape.weight_count()];
        Self::new(shape, weights)
    }

    /// The fixed-point forward pass on pixels 0..16, with every intermediate value; an error
    /// if a quotient leaves the circuit's table range.
    pub fn trace(&self, pixels: &[u8]) -> Result<Trace> {
        if pixels.len() != INPUTS || pixels.iter().any(|&p| p > 16) {
            return Err(ZkError::BadInput(format!(
                "an input is {INPUTS} pixels of 0..16, got {} values (largest {})",
                pixels.len(),
                pixels.iter().max().copied().unwrap_or(0)
            )));
        }
        let mut x: Vec<i64> = pixels.iter().map(|&p| p as i64).collect();
        let mut layers = Vec::new();
        for (l, layer) in self.layers.iter().enumerate() {
            let shift = layer.shift();
            let mut traces = Vec::with_capacity(layer.neurons.len());
            for neuron in &layer.neurons {
                let sum: i64 = neuron
                    .terms
                    .iter()
                    .map(|&(i, w)| x[i] * self.weights[w])
                    .sum::<i64>()
                    + self.weights[neuron.bias] * (1i64 << layer.input_bits);
                let quotient = sum.div_euclid(1i64 << shift);
                let remainder = sum.rem_euclid(1i64 << shift);
                if layer.activation.has_table() && !(-ACT_RANGE..ACT_RANGE).contains(&quotient) {
                    return Err(ZkError::BadInput(format!(
                        "layer {l}: a value of {} leaves the circuit's range of ±{}",
                        quotient as f64 / (1 << ACT_SCALE_BITS) as f64,
                        ACT_RANGE / (1 << ACT_SCALE_BITS)
                    )));
                }
                traces.push(NeuronTrace {
                    sum,
                    quotient,
                    remainder,
                    output: layer.activation.apply_fixed(quotient),
                });
            }
            x = traces.iter().map(|t| t.output).collect();
            layers.push(traces);
        }
        Ok(Trace { layers, output: x })
    }
}

/// The index of the largest value: the predicted digit.
pub fn argmax<T: PartialOrd + Copy>(values: &[T]) -> usize {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best
}
