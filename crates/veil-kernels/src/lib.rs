//! Quantized matrix products for the CPU: the hot path of every forward pass.
//!
//! candle's CPU kernels multiply Q4_1 weights with a scalar loop on x86; llama.cpp was 2-6×
//! faster on the same files. This crate holds the few kernels that close the gap, written the
//! way llama.cpp does them: activations are quantized to 8-bit blocks once per product, weight
//! blocks are multiplied with integer SIMD dot products (AVX2, or AVX-512 VNNI where the CPU has
//! it, chosen at run time, with a plain-Rust reference as the fallback), prompts run in tiles of
//! eight tokens, and the rows of the output are split over candle's barrier pool of spinning
//! threads. Causal attention is here too, computed one query at a time in a fixed order, so a
//! prompt gives the same bits however its positions are grouped into passes. RMSNorm is here as well,
//! summed so that the order of the features does not matter. The rest stays in candle.
//!
//! Every family adds each block's exact integer sum into the result in the reference's order,
//! with its roundings, so a model gives the same bits on every CPU: 8-bit activations would
//! otherwise turn summation-order noise into different answers.
//!
//! Weights are read from GGUF's blocks once, at load, into values, scales and offsets held
//! apart (`QuantMatrix::new`). The formats are those of people's GGUF files: Q4_0, Q4_1, Q5_0,
//! Q5_1 and Q8_0 (blocks of 32 values) and the K formats Q4_K, Q5_K and Q6_K (superblocks of
//! 256, multiplied with activations quantized as ggml's Q8_K).

mod activation;
mod attention;
mod error;
mod gated;
mod isa;
mod layout;
mod matrix;
mod norm;
mod pages;
mod scalar;
mod threads;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use activation::{quantize_with, ActivationBlock, ActivationSuperblock, SUPERBLOCK_SUMS};
pub use attention::{causal_attention, AttentionShape};
pub use error::KernelError;
pub use gated::{gated_activation, GateActivation};
pub use isa::Isa;
pub use layout::SCALE_GROUP;
pub use matrix::{QuantFormat, QuantMatrix, QuantMatrixBuilder};
pub use norm::{rms_norm, sum_of_squares};
pub use pages::keep_freed_buffers;
pub use threads::with_thread_limit;

/// Values per quantization block of the 32-value formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0), as
/// in GGUF; activations are quantized in blocks of this size for them.
pub const BLOCK: usize = 32;

/// Values per superblock of the K formats (Q4_K, Q5_K, Q6_K; GGUF's `QK_K`): their rows hold
/// a multiple of this many columns, and activations are quantized in superblocks for them.
pub const SUPERBLOCK: usize = 256;
