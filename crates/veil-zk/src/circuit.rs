//! The halo2 circuit proving `y = f_θ(x)` for a private fixed-point model `θ` committed in
//! public.
//!
//! Public inputs (one instance column): the commitment, the 64 input pixels, the 10 logits.
//! Private: the 8-bit weights and a random salt. The circuit
//! - packs the weights 30 to a field element (a running sum `acc·256 + w + 128` per row, each
//!   weight looked up in the 8-bit table, so packing is one-to-one) and hashes the salt and the
//!   packed elements with Poseidon (`halo2_gadgets`); the hash must equal the commitment;
//! - computes every neuron as a running dot product of copied input and weight cells (bias as
//!   one more term times `2^A_in`), then splits the sum as `q·2^shift + r` with `r` looked up
//!   among `[0, 2^shift)`, and maps `q` through its activation's table (ReLU, sigmoid) or
//!   passes it on (logits).
//!
//! Every layout decision (which rows are which) follows the public shape, so the verifying key
//! depends on the shape and not on the weights.

use halo2_gadgets::poseidon::primitives::{self as poseidon, ConstantLength, P128Pow5T3};
use halo2_gadgets::poseidon::{Hash, Pow5Chip, Pow5Config};
use halo2_proofs::circuit::{AssignedCell, Layouter, SimpleFloorPlanner, Value};
use halo2_proofs::pasta::Fp;
use halo2_proofs::plonk::{
    Advice, Circuit, Column, ConstraintSystem, Error, Expression, Fixed, Instance, Selector,
    TableColumn,
};
use halo2_proofs::poly::Rotation;

use crate::model::{Activation, FixedModel, Trace, ACT_RANGE, INPUTS};

/// Weights packed into one field element (8 bits each: 240 bits, under the field's 254).
pub const WEIGHTS_PER_ELEMENT: usize = 30;
/// Packed elements the commitment hashes (after the salt); unused ones are zero.
pub const PACKED_ELEMENTS: usize = 63;
/// Field elements Poseidon hashes: the salt and the packed weights.
pub const MESSAGE_LEN: usize = PACKED_ELEMENTS + 1;
/// Most weights a committed model may have.
pub const MAX_WEIGHTS: usize = PACKED_ELEMENTS * WEIGHTS_PER_ELEMENT;
/// Largest shift a layer may rescale by.
const MAX_SHIFT: u32 = 8;
/// Rows of the circuit: 2^K.
pub const K: u32 = 13;

/// A signed integer as a field element.
pub fn field(v: i64) -> Fp {
    if v >= 0 {
        Fp::from(v as u64)
    } else {
        -Fp::from(v.unsigned_abs())
    }
}

/// The packed weights: 30 per element, each stored as `w + 128`, the first weight highest.
pub fn pack(weights: &[i64]) -> Vec<Fp> {
    let mut packed: Vec<Fp> = weights
        .chunks(WEIGHTS_PER_ELEMENT)
        .map(|chunk| {
            chunk.iter().fold(Fp::zero(), |acc, w| {
                acc * Fp::from(256) + Fp::from((w + 128) as u64)
            })
        })
        .collect();
    packed.resize(PACKED_ELEMENTS, Fp::zero());
    packed
}

/// The public commitment to `weights` under `salt`: Poseidon over the salt and the packed
/// weights.
pub fn commitment(weights: &[i64], salt: Fp) -> Fp {
    let mut message = [Fp::zero(); MESSAGE_LEN];
    message[0] = salt;
    message[1..].copy_from_slice(&pack(weights));
    poseidon::Hash::<Fp, P128Pow5T3, ConstantLength<MESSAGE_LEN>, 3, 2>::init().hash(message)
}

/// The public inputs, in instance order: commitment, pixels, logits.
pub fn instance(commitment: Fp, pixels: &[u8], logits: &[i64]) -> Vec<Fp> {
    std::iter::once(commitment)
        .chain(pixels.iter().map(|&p| Fp::from(p as u64)))
        .chain(logits.iter().map(|&l| field(l)))
        .collect()
}

/// The circuit's columns, gates and tables.
#[derive(Clone, Debug)]
pub struct InferenceConfig {
    a: Column<Advice>,
    b: Column<Advice>,
    c: Column<Advice>,
    d: Column<Advice>,
    instance: Column<Instance>,
    pow: Column<Fixed>,
    tag: Column<Fixed>,
    s_dot: Selector,
    s_rescale: Selector,
    s_act: Selector,
    s_identity: Selector,
    s_pack: Selector,
    t_int8: TableColumn,
    t_pow: TableColumn,
    t_rem: TableColumn,
    t_tag: TableColumn,
    t_q: TableColumn,
    t_out: TableColumn,
    poseidon: Pow5Config<Fp, 3, 2>,
}

/// The circuit for one model and (when proving) one input.
#[derive(Clone, Debug)]
pub struct InferenceCircuit {
    /// The model: its shape lays out the circuit; its weights are used only when proving.
    pub model: FixedModel,
    /// The commitment's salt (unknown when making keys or verifying).
    pub salt: Value<Fp>,
    /// The forward pass on the input (unknown when making keys or verifying).
    pub trace: Value<Trace>,
    /// Whether the weights are known (proving) or not.
    pub known: bool,
}

impl InferenceCircuit {
    /// The circuit a verifier (or key generation) builds: shape only.
    pub fn for_shape(model: FixedModel) -> Self {
        Self {
            model,
            salt: Value::unknown(),
            trace: Value::unknown(),
            known: false,
        }
    }

    fn weight(&self, i: usize) -> Value<Fp> {
        if self.known {
            Value::known(field(self.model.weights[i]))
        } else {
            Value::unknown()
        }
    }
}

impl Circuit<Fp> for InferenceCircuit {
    type Config = InferenceConfig;
    type FloorPlanner = SimpleFloorPlanner;

    fn without_witnesses(&self) -> Self {
        Self::for_shape(self.model.clone())
    }

    fn configure(meta: &mut ConstraintSystem<Fp>) -> InferenceConfig {
        let [a, b, c, d] = [(); 4].map(|_| meta.advice_column());
        for col in [a, b, c, d] {
            meta.enable_equality(col);
        }
        let instance = meta.instance_column();
        meta.enable_equality(instance);
        let pow = meta.fixed_column();
        let tag = meta.fixed_column();
        let rc_a = [(); 3].map(|_| meta.fixed_column());
        let rc_b = [(); 3].map(|_| meta.fixed_column());
        meta.enable_constant(rc_b[0]);
        let poseidon = Pow5Chip::configure::<P128Pow5T3>(meta, [a, b, c], d, rc_a, rc_b);

        let s_dot = meta.selector();
        let s_rescale = meta.complex_selector();
        let s_act = meta.complex_selector();
        let s_identity = meta.selector();
        let s_pack = meta.complex_selector();
        let [t_int8, t_pow, t_rem, t_tag, t_q, t_out] = [(); 6].map(|_| meta.lookup_table_column());

        meta.create_gate("dot product step", |meta| {
            let s = meta.query_selector(s_dot);
            let x = meta.query_advice(a, Rotation::cur());
            let w = meta.query_advice(b, Rotation::cur());
            let acc = meta.query_advice(c, Rotation::cur());
            let next = meta.query_advice(c, Rotation::next());
            vec![s * (next - acc - x * w)]
        });
        meta.create_gate("rescale: sum = q·2^shift + r", |meta| {
            let s = meta.query_selector(s_rescale);
            let q = meta.query_advice(a, Rotation::cur());
            let r = meta.query_advice(b, Rotation::cur());
            let sum = meta.query_advice(c, Rotation::cur());
            let pow = meta.query_fixed(pow);
            vec![s * (sum - q * pow - r)]
        });
        meta.create_gate("identity activation", |meta| {
            let s = meta.query_selector(s_identity);
            let q = meta.query_advice(a, Rotation::cur());
            let out = meta.query_advice(d, Rotation::cur());
            vec![s * (out - q)]
        });
        meta.create_gate("pack a weight", |meta| {
            let s = meta.query_selector(s_pack);
            let w = meta.query_advice(a, Rotation::cur());
            let acc = meta.query_advice(c, Rotation::cur());
            let next = meta.query_advice(c, Rotation::next());
            let byte = Expression::Constant(Fp::from(256));
            let offset = Expression::Constant(Fp::from(128));
            vec![s * (next - acc * byte - w - offset)]
        });
        meta.lookup(|meta| {
            let s = meta.query_selector(s_pack);
            vec![(s * meta.query_advice(a, Rotation::cur()), t_int8)]
        });
        meta.lookup(|meta| {
            let s = meta.query_selector(s_rescale);
            let pow = meta.query_fixed(pow);
            vec![
                (s.clone() * pow, t_pow),
                (s * meta.query_advice(b, Rotation::cur()), t_rem),
            ]
        });
        meta.lookup(|meta| {
            let s = meta.query_selector(s_act);
            let tag = meta.query_fixed(tag);
            vec![
                (s.clone() * tag, t_tag),
                (s.clone() * meta.query_advice(a, Rotation::cur()), t_q),
                (s * meta.query_advice(d, Rotation::cur()), t_out),
            ]
        });
        InferenceConfig {
            a,
            b,
            c,
            d,
            instance,
            pow,
            tag,
            s_dot,
            s_rescale,
            s_act,
            s_identity,
            s_pack,
            t_int8,
            t_pow,
            t_rem,
            t_tag,
            t_q,
            t_out,
            poseidon,
        }
    }

    fn synthesize(
        &self,
        config: InferenceConfig,
        mut layouter: impl Layouter<Fp>,
    ) -> Result<(), Error> {
        load_tables(&config, &mut layouter)?;
        let weights = self.assign_weights(&config, &mut layouter)?;

        // Input pixels, from the public instance.
        let mut values: Vec<AssignedCell<Fp, Fp>> = layouter.assign_region(
            || "input",
            |mut region| {
                (0..INPUTS)
                    .map(|i| {
                        region.assign_advice_from_instance(
                            || "pixel",
                            config.instance,
                            1 + i,
                            config.a,
                            i,
                        )
                    })
                    .collect()
            },
        )?;

        for (l, layer) in self.model.layers.iter().enumerate() {
            let shift = layer.shift();
            let traces = self.trace.as_ref().map(|t| t.layers[l].clone());
            let mut outputs = Vec::with_capacity(layer.neurons.len());
            for (n, neuron) in layer.neurons.iter().enumerate() {
                let trace = traces.as_ref().map(|t| t[n]);
                let out = layouter.assign_region(
                    || "neuron",
                    |mut region| {
                        region.assign_advice_from_constant(|| "zero", config.c, 0, Fp::zero())?;
                        let mut sum = Value::known(Fp::zero());
                        let terms = neuron.terms.len() + 1;
                        for row in 0..terms {
                            config.s_dot.enable(&mut region, row)?;
                            let (x, w) = if row < neuron.terms.len() {
                                let (i, w) = neuron.terms[row];
                                let x =
                                    values[i].copy_advice(|| "x", &mut region, config.a, row)?;
                                let w =
                                    weights[w].copy_advice(|| "w", &mut region, config.b, row)?;
                                (x, w)
                            } else {
                                let one = Fp::from(1u64 << layer.input_bits);
                                let x = region.assign_advice_from_constant(
                                    || "bias input",
                                    config.a,
                                    row,
                                    one,
                                )?;
                                let w = weights[neuron.bias].copy_advice(
                                    || "bias",
                                    &mut region,
                                    config.b,
                                    row,
                                )?;
                                (x, w)
                            };
                            sum = sum + x.value().copied() * w.value().copied();
                            region.assign_advice(|| "sum", config.c, row + 1, || sum)?;
                        }
                        let row = terms;
                        config.s_rescale.enable(&mut region, row)?;
                        region.assign_fixed(
                            || "2^shift",
                            config.pow,
                            row,
                            || Value::known(Fp::from(1u64 << shift)),
                        )?;
                        region.assign_advice(
                            || "q",
                            config.a,
                            row,
                            || trace.map(|t| field(t.quotient)),
                        )?;
                        region.assign_advice(
                            || "r",
                            config.b,
                            row,
                            || trace.map(|t| field(t.remainder)),
                        )?;
                        if layer.activation.has_table() {
                            config.s_act.enable(&mut region, row)?;
                            region.assign_fixed(
                                || "tag",
                                config.tag,
                                row,
                                || Value::known(Fp::from(layer.activation.tag())),
                            )?;
                        } else {
                            config.s_identity.enable(&mut region, row)?;
                        }
                        region.assign_advice(
                            || "out",
                            config.d,
                            row,
                            || trace.map(|t| field(t.output)),
                        )
                    },
                )?;
                outputs.push(out);
            }
            values = outputs;
        }
        for (i, cell) in values.iter().enumerate() {
            layouter.constrain_instance(cell.cell(), config.instance, 1 + INPUTS + i)?;
        }
        Ok(())
    }
}

impl InferenceCircuit {
    /// Assigns every weight once, packs them and checks the commitment; returns the weight
    /// cells the neurons copy.
    fn assign_weights(
        &self,
        config: &InferenceConfig,
        layouter: &mut impl Layouter<Fp>,
    ) -> Result<Vec<AssignedCell<Fp, Fp>>, Error> {
        let count = self.model.weights.len();
        let mut cells = Vec::with_capacity(count);
        let mut packed = Vec::with_capacity(PACKED_ELEMENTS);
        for start in (0..count).step_by(WEIGHTS_PER_ELEMENT) {
            let end = (start + WEIGHTS_PER_ELEMENT).min(count);
            let (chunk_cells, element) = layouter.assign_region(
                || "pack weights",
                |mut region| {
                    let mut acc =
                        region.assign_advice_from_constant(|| "zero", config.c, 0, Fp::zero())?;
                    let mut value = Value::known(Fp::zero());
                    let mut chunk = Vec::with_capacity(end - start);
                    for (row, i) in (start..end).enumerate() {
                        config.s_pack.enable(&mut region, row)?;
                        let w = self.weight(i);
                        chunk.push(region.assign_advice(|| "weight", config.a, row, || w)?);
                        value =
                            value * Value::known(Fp::from(256)) + w + Value::known(Fp::from(128));
                        acc = region.assign_advice(|| "packed", config.c, row + 1, || value)?;
                    }
                    Ok((chunk, acc))
                },
            )?;
            cells.extend(chunk_cells);
            packed.push(element);
        }
        let message: Vec<AssignedCell<Fp, Fp>> = layouter.assign_region(
            || "commitment message",
            |mut region| {
                let mut message =
                    vec![region.assign_advice(|| "salt", config.a, 0, || self.salt)?];
                for (j, element) in packed.iter().enumerate() {
                    message.push(element.copy_advice(|| "packed", &mut region, config.a, 1 + j)?);
                }
                for j in packed.len()..PACKED_ELEMENTS {
                    message.push(region.assign_advice_from_constant(
                        || "padding",
                        config.a,
                        1 + j,
                        Fp::zero(),
                    )?);
                }
                Ok(message)
            },
        )?;
        let message: [AssignedCell<Fp, Fp>; MESSAGE_LEN] =
            message.try_into().map_err(|_| Error::Synthesis)?;
        let chip = Pow5Chip::construct(config.poseidon.clone());
        let hasher = Hash::<_, _, P128Pow5T3, ConstantLength<MESSAGE_LEN>, 3, 2>::init(
            chip,
            layouter.namespace(|| "poseidon"),
        )?;
        let digest = hasher.hash(layouter.namespace(|| "commit"), message)?;
        layouter.constrain_instance(digest.cell(), config.instance, 0)?;
        Ok(cells)
    }
}

/// The lookup tables: 8-bit weights, remainders per shift, activations.
fn load_tables(config: &InferenceConfig, layouter: &mut impl Layouter<Fp>) -> Result<(), Error> {
    layouter.assign_table(
        || "8-bit weights",
        |mut table| {
            for (row, w) in (-128i64..128).enumerate() {
                table.assign_cell(|| "w", config.t_int8, row, || Value::known(field(w)))?;
            }
            Ok(())
        },
    )?;
    layouter.assign_table(
        || "remainders",
        |mut table| {
            table.assign_cell(|| "pow", config.t_pow, 0, || Value::known(Fp::zero()))?;
            table.assign_cell(|| "r", config.t_rem, 0, || Value::known(Fp::zero()))?;
            let mut row = 1;
            for shift in 1..=MAX_SHIFT {
                for r in 0..(1u64 << shift) {
                    table.assign_cell(
                        || "pow",
                        config.t_pow,
                        row,
                        || Value::known(Fp::from(1u64 << shift)),
                    )?;
                    table.assign_cell(|| "r", config.t_rem, row, || Value::known(Fp::from(r)))?;
                    row += 1;
                }
            }
            Ok(())
        },
    )?;
    layouter.assign_table(
        || "activations",
        |mut table| {
            let zero = || Value::known(Fp::zero());
            table.assign_cell(|| "tag", config.t_tag, 0, zero)?;
            table.assign_cell(|| "q", config.t_q, 0, zero)?;
            table.assign_cell(|| "out", config.t_out, 0, zero)?;
            let mut row = 1;
            for activation in Activation::TABLED {
                for q in -ACT_RANGE..ACT_RANGE {
                    let tag = Fp::from(activation.tag());
                    table.assign_cell(|| "tag", config.t_tag, row, || Value::known(tag))?;
                    table.assign_cell(|| "q", config.t_q, row, || Value::known(field(q)))?;
                    let out = activation.apply_fixed(q);
                    table.assign_cell(|| "out", config.t_out, row, || Value::known(field(out)))?;
                    row += 1;
                }
            }
            Ok(())
        },
    )?;
    Ok(())
}
