//! Linear layers: a weight matrix in its format, multiplied by Veil's CPU kernels where they
//! cover the format (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K) and by candle's otherwise
//! (F32, F16, other block formats). Each tensor runs in its own type, so the mixes of a
//! Q4_K_M file need nothing special.
//!
//! The kernels run behind candle's custom-op interface, so the rest of the forward pass keeps
//! handling plain tensors.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{CpuStorage, DType, Device, Module, Storage, Tensor};
use veil_kernels::{Isa, QuantFormat, QuantMatrix, QuantMatrixBuilder};

use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;
use crate::weights::WeightFormat;

/// Whose kernels multiply quantized weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kernels {
    /// Veil's (`veil-kernels`) on one instruction set: the fastest this CPU has by default,
    /// the scalar reference or another family to compare.
    Veil(Isa),
    /// candle's, as it comes: kept to measure against.
    Candle,
}

impl Default for Kernels {
    fn default() -> Self {
        Kernels::Veil(Isa::best())
    }
}

impl fmt::Display for Kernels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Kernels::Veil(isa) => write!(f, "veil ({isa})"),
            Kernels::Candle => f.write_str("candle"),
        }
    }
}

impl FromStr for Kernels {
    type Err = ModelError;

    /// `veil` (the fastest family here), `candle`, or a family: `scalar`, `avx2`, `avx512`.
    fn from_str(s: &str) -> Result<Self> {
        let s = s.to_ascii_lowercase();
        if s == "veil" {
            return Ok(Kernels::default());
        }
        if s == "candle" {
            return Ok(Kernels::Candle);
        }
        match Isa::ALL.into_iter().find(|isa| isa.to_string() == s) {
            Some(isa) if isa.is_available() => Ok(Kernels::Veil(isa)),
            Some(isa) => Err(ModelError::InvalidInput(format!(
                "this CPU cannot run the {isa} kernels; it has {:?}",
                Isa::available()
            ))),
            None => Err(ModelError::InvalidInput(format!(
                "unknown kernels {s:?}: use veil, candle, scalar, avx2 or avx512"
            ))),
        }
    }
}

/// One weight matrix, stored `(out, in)`, ready to multiply activations `(.., in)`.
#[derive(Debug, Clone)]
pub(crate) enum Linear {
    /// Multiplied by candle.
    Candle(QMatMul),
    /// Multiplied by Veil's kernels.
    Veil(VeilProduct),
}

impl Linear {
    /// Prepares `weight` in `format` for `kernels`.
    pub(crate) fn new(
        weight: Arc<QTensor>,
        format: WeightFormat,
        kernels: Kernels,
    ) -> Result<Self> {
        Self::from_qmatmul(format.matmul(weight)?, kernels)
    }

    /// Reads matrix `name`, checking it has `shape` `(out, in)`, and prepares it in `format`
    /// for `kernels`. A matrix Veil's kernels run as stored is unpacked from the file a run
    /// of rows at a time, never held twice while it loads (peak memory stays near the model's
    /// size).
    pub(crate) fn load(
        gguf: &mut GgufFile,
        name: &str,
        shape: &[usize],
        format: WeightFormat,
        kernels: Kernels,
    ) -> Result<Self> {
        let info = gguf
            .content()
            .tensor_infos
            .get(name)
            .map(|i| (i.ggml_dtype, i.shape.clone()));
        let streamed = match (info, format, kernels) {
            (Some((dtype, stored)), WeightFormat::AsStored, Kernels::Veil(isa)) => {
                QuantFormat::from_ggml(dtype).map(|f| (f, stored, isa))
            }
            _ => None,
        };
        let Some((quant, stored, isa)) = streamed else {
            let q = crate::layers::load(gguf, name, shape)?;
            return Self::new(Arc::new(q), format, kernels);
        };
        if stored.dims() != shape {
            return Err(ModelError::BadTensor {
                name: name.to_string(),
                reason: format!("shape {:?}, expected {shape:?}", stored.dims()),
            });
        }
        let bad = |e: veil_kernels::KernelError| ModelError::BadTensor {
            name: name.to_string(),
            reason: e.to_string(),
        };
        let held = held_format(gguf, quant);
        let mut builder =
            QuantMatrixBuilder::held_as(quant, held, shape[0], shape[1]).map_err(bad)?;
        let row = builder.row_bytes();
        let rows_per_read = (READ_CHUNK / row).max(1);
        let mut start = 0u64;
        while builder.rows_left() > 0 {
            let rows = rows_per_read.min(builder.rows_left());
            let bytes = gguf.tensor_range(name, start, rows * row)?;
            builder.push_rows(&bytes).map_err(bad)?;
            start += bytes.len() as u64;
        }
        Ok(Self::Veil(VeilProduct {
            matrix: Arc::new(builder.finish().map_err(bad)?),
            isa,
        }))
    }

    /// Whether Veil's kernels multiply this matrix: the same bits on every CPU and split.
    pub(crate) fn runs_on_veil(&self) -> bool {
        matches!(self, Self::Veil(_))
    }

    /// The quantized matrix Veil's kernels multiply, if they do.
    pub(crate) fn quant_matrix(&self) -> Option<Arc<QuantMatrix>> {
        match self {
            Self::Veil(op) => Some(op.matrix.clone()),
            Self::Candle(_) => None,
        }
    }

    fn from_qmatmul(product: QMatMul, kernels: Kernels) -> Result<Self> {
        if let (Kernels::Veil(isa), QMatMul::QTensor(q)) = (kernels, &product) {
            if let Some(op) = VeilProduct::from_qtensor(q, isa)? {
                return Ok(Self::Veil(op));
            }
        }
        Ok(Self::Candle(product))
    }

    /// `x · weightᵀ`.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::Candle(m) => m.forward(x)?,
            Self::Veil(op) => {
                let x = x.contiguous()?;
                let dims = x.dims().to_vec();
                let mut out = Self::veil_shared(&[op], &x, &dims)?;
                out.pop().ok_or_else(|| {
                    ModelError::InvalidInput("a product returned no output".into())
                })?
            }
        })
    }

    /// `x · weightᵀ` for several layers that take the same input (a block's query, key and
    /// value projections; an FFN's gate and up). On Veil's kernels the input is quantized once
    /// and, for one token, all their rows go through the thread pool in one pass: a decode
    /// step hands work to the pool about half as often. The outputs are the bits of
    /// [`forward`](Self::forward) on each; layers the kernels cannot group run one by one.
    pub(crate) fn forward_shared<const N: usize>(
        layers: [&Linear; N],
        x: &Tensor,
    ) -> Result<[Tensor; N]> {
        let products: Option<Vec<&VeilProduct>> = layers
            .iter()
            .map(|l| match l {
                Self::Veil(op) => Some(op),
                Self::Candle(_) => None,
            })
            .collect();
        let groupable = products.filter(|ops| {
            let first = ops[0].matrix.format().is_k();
            ops.iter()
                .all(|op| op.isa == ops[0].isa && op.matrix.format().is_k() == first)
        });
        let x = x.contiguous()?;
        let dims = x.dims().to_vec();
        let tensors = match groupable {
            Some(ops) if dims.last() == Some(&ops[0].matrix.cols()) => {
                Self::veil_shared(&ops, &x, &dims)?
            }
            _ => layers
                .iter()
                .map(|l| l.forward(&x))
                .collect::<Result<Vec<_>>>()?,
        };
        tensors
            .try_into()
            .map_err(|_| ModelError::InvalidInput("a shared product lost an output".into()))
    }

    /// [`forward_shared`](Self::forward_shared) on Veil's kernels, for contiguous `x` of shape
    /// `dims`, whose last dimension must be the matrices' width.
    fn veil_shared(ops: &[&VeilProduct], x: &Tensor, dims: &[usize]) -> Result<Vec<Tensor>> {
        let cols = ops.first().map_or(0, |op| op.matrix.cols());
        if dims.last() != Some(&cols) {
            return Err(ModelError::InvalidInput(format!(
                "activations {dims:?} do not end in the weights' {cols} features"
            )));
        }
        // The input's values in place (it is contiguous), not copied out.
        let (storage, layout) = x.storage_and_layout();
        let (Storage::Cpu(CpuStorage::F32(data)), Some((start, end))) =
            (&*storage, layout.contiguous_offsets())
        else {
            return Err(ModelError::InvalidInput(
                "a shared product takes contiguous f32 activations in CPU memory".into(),
            ));
        };
        let values = &data[start..end];
        let tokens = values.len() / cols;
        let mut outs: Vec<Vec<f32>> = ops
            .iter()
            .map(|op| vec![0f32; tokens * op.matrix.rows()])
            .collect();
        let matrices: Vec<&QuantMatrix> = ops.iter().map(|op| op.matrix.as_ref()).collect();
        let mut slices: Vec<&mut [f32]> = outs.iter_mut().map(Vec::as_mut_slice).collect();
        QuantMatrix::matmul_shared(ops[0].isa, &matrices, values, &mut slices)
            .map_err(|e| ModelError::InvalidInput(format!("product: {e}")))?;
        ops.iter()
            .zip(outs)
            .map(|(op, out)| {
                let mut shape = dims.to_vec();
                if let Some(last) = shape.last_mut() {
                    *last = op.matrix.rows();
                }
                Ok(Tensor::from_vec(out, shape, &Device::Cpu)?)
            })
            .collect()
    }

    /// The weight as dense f32 `(out, in)`.
    pub(crate) fn dense(&self) -> Result<Tensor> {
        Ok(match self {
            Self::Candle(QMatMul::QTensor(q)) => q.dequantize(&Device::Cpu)?,
            Self::Candle(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => t.to_dtype(DType::F32)?,
            Self::Veil(op) => op.dense()?,
        })
    }

    /// A layer of the same format and kernels holding `dense` instead.
    pub(crate) fn with_weight(&self, dense: Tensor) -> Result<Self> {
        Ok(match self {
            Self::Candle(QMatMul::QTensor(q)) => Self::Candle(QMatMul::from_qtensor(
                QTensor::quantize(&dense, q.dtype())?,
            )?),
            Self::Candle(QMatMul::Tensor(_)) => Self::Candle(QMatMul::Tensor(dense)),
            Self::Candle(QMatMul::TensorF16(_)) => {
                Self::Candle(QMatMul::TensorF16(dense.to_dtype(DType::F16)?))
            }
            Self::Veil(op) => {
                let q = QTensor::quantize(&dense, op.matrix.format().ggml_dtype())?;
                Self::from_qmatmul(QMatMul::from_qtensor(q)?, Kernels::Veil(op.isa))?
            }
        })
    }
}

/// The format Veil's kernels hold a matrix stored as `quant` in. Q5_0 is held as Q8_0 (the
/// same bits, with no high bits to merge per block: SmolLM2 Q4_K_M decoded 15-20% faster)
/// where Q5_0 holds most of the file's matrix bytes, so that its kernel sets the decode speed.
/// Elsewhere (Gemma 3, whose Q8_0 embedding dominates) the gain is small, and 8 bytes more per
/// 32 values took the peak memory past llama.cpp's + 20%.
fn held_format(gguf: &GgufFile, quant: QuantFormat) -> QuantFormat {
    if quant != QuantFormat::Q5_0 {
        return quant;
    }
    let (mut q5_0, mut all) = (0u64, 0u64);
    for info in gguf.content().tensor_infos.values() {
        if info.shape.rank() != 2 {
            continue;
        }
        let dtype = info.ggml_dtype;
        let bytes = (info.shape.elem_count() / dtype.block_size() * dtype.type_size()) as u64;
        all += bytes;
        if dtype == candle_core::quantized::GgmlDType::Q5_0 {
            q5_0 += bytes;
        }
    }
    if 2 * q5_0 > all {
        QuantFormat::Q8_0
    } else {
        quant
    }
}

/// Bytes read from the file at a time while a matrix is unpacked.
const READ_CHUNK: usize = 1 << 20;

/// A quantized product run by `veil-kernels`.
#[derive(Debug, Clone)]
pub(crate) struct VeilProduct {
    matrix: Arc<QuantMatrix>,
    isa: Isa,
}

impl VeilProduct {
    /// The op for `q`'s bytes, or `None` when the kernels do not cover its format.
    fn from_qtensor(q: &QTensor, isa: Isa) -> Result<Option<Self>> {
        let Some(format) = QuantFormat::from_ggml(q.dtype()) else {
            return Ok(None);
        };
        let (rows, cols) = q.shape().dims2()?;
        let matrix = QuantMatrix::new(format, rows, cols, &q.data()?)
            .map_err(|e| ModelError::InvalidShard(e.to_string()))?;
        Ok(Some(Self {
            matrix: Arc::new(matrix),
            isa,
        }))
    }

    fn dense(&self) -> Result<Tensor> {
        let m = &self.matrix;
        Ok(Tensor::from_vec(
            m.dequantize(),
            (m.rows(), m.cols()),
            &Device::Cpu,
        )?)
    }
}
