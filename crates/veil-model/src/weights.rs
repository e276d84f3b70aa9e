//! The number format matrix weights run in.
//!
//! The GGUF file is run as stored by default (quantized matmuls). Dequantizing to F32/F16 or
//! re-quantizing to Q8_0 at load time trades memory and speed for precision, and gives the
//! encryption transforms full-precision weights to work on.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::Device;

use crate::error::{ModelError, Result};

/// How matrix weights are held in memory and multiplied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum WeightFormat {
    /// Whatever the file stores (Q4_1 for the default model): quantized matmuls.
    #[default]
    AsStored,
    /// Dequantized to 32-bit floats.
    F32,
    /// Dequantized to 16-bit floats.
    F16,
    /// Re-quantized to 8-bit blocks (from the dequantized values).
    Q8_0,
    /// Re-quantized to symmetric 4-bit blocks: cheaper and less precise than Q8_0. Offered so
    /// that verification can be tested against a node that serves it while claiming Q8_0.
    Q4_0,
}

impl WeightFormat {
    /// Every format, in the order the CLI lists them.
    pub const ALL: [WeightFormat; 5] =
        [Self::AsStored, Self::F32, Self::F16, Self::Q8_0, Self::Q4_0];

    /// Prepares one matrix weight (stored `(out, in)`) for multiplication.
    pub(crate) fn matmul(self, weight: Arc<QTensor>) -> Result<QMatMul> {
        Ok(match self {
            Self::AsStored => QMatMul::from_arc(weight)?,
            Self::F32 => QMatMul::Tensor(weight.dequantize(&Device::Cpu)?),
            Self::F16 => QMatMul::TensorF16(weight.dequantize_f16(&Device::Cpu)?),
            Self::Q8_0 if weight.dtype() == GgmlDType::Q8_0 => QMatMul::from_arc(weight)?,
            Self::Q8_0 => requantize(&weight, GgmlDType::Q8_0)?,
            Self::Q4_0 if weight.dtype() == GgmlDType::Q4_0 => QMatMul::from_arc(weight)?,
            Self::Q4_0 => requantize(&weight, GgmlDType::Q4_0)?,
        })
    }
}

impl fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::AsStored => "stored",
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Q8_0 => "q8_0",
            Self::Q4_0 => "q4_0",
        })
    }
}

impl FromStr for WeightFormat {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "stored" | "as-stored" => Ok(Self::AsStored),
            "f32" => Ok(Self::F32),
            "f16" => Ok(Self::F16),
            "q8_0" | "q8" => Ok(Self::Q8_0),
            "q4_0" | "q4" => Ok(Self::Q4_0),
            _ => Err(ModelError::InvalidInput(format!(
                "unknown weight format {s:?}: use stored, f32, f16, q8_0 or q4_0"
            ))),
        }
    }
}

fn requantize(weight: &QTensor, dtype: GgmlDType) -> Result<QMatMul> {
    let dense = weight.dequantize(&Device::Cpu)?;
    Ok(QMatMul::from_qtensor(QTensor::quantize(&dense, dtype)?)?)
}
