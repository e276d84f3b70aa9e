//! Quantized matrix products for the CPU: the hot path of every forward pass.
//!
//! candle's CPU kernels multiply Q4_1 weights with a scalar loop on x86 and spread work over
//! threads that wake per call; llama.cpp is 2-6× faster on the same files. This crate holds the
//! few kernels that close the gap, written the way llama.cpp does them: activations are
//! quantized to 8-bit blocks once per product, weight blocks are multiplied with integer SIMD
//! dot products (AVX2, or AVX-512 VNNI where the CPU has it, chosen at run time), and the rows of
//! the output are split over candle's barrier pool of spinning threads. Everything else (attention, norms) stays in candle.
//!
//! The weights keep GGUF's block layout byte for byte, so a loaded file needs no repacking and
//! the same bytes can be handed back to candle.

mod activation;
mod error;
mod isa;
mod matrix;
mod scalar;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use activation::{quantize_with, ActivationBlock};
pub use error::KernelError;
pub use isa::Isa;
pub use matrix::{QuantFormat, QuantMatrix};

/// Values per quantization block, for every format here (as in GGUF).
pub const BLOCK: usize = 32;
