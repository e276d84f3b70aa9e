//! What can go wrong handing data to a kernel.

/// A kernel was given data it cannot multiply.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The matrix's bytes or shape do not fit its format.
    #[error("bad quantized matrix: {0}")]
    BadMatrix(String),
    /// The activations or the output do not fit the matrix.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// The instruction set asked for is not on this CPU.
    #[error("{0} kernels need CPU features this machine lacks")]
    Unsupported(crate::Isa),
}
