//! The one error type of the inference core.
//!
//! Every variant names the thing that went wrong (a file, a metadata key, a layer range) so the
//! binary can print it as is and the user knows what to fix.

use std::path::PathBuf;

/// Everything that can go wrong while fetching, loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be opened, read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// The file does not start with the GGUF magic bytes.
    #[error("{path} is not a GGUF file (it does not start with the bytes \"GGUF\")")]
    NotGguf {
        /// The file that was opened.
        path: PathBuf,
    },
    /// The GGUF header could not be parsed, or the tensor data is cut short.
    #[error("{path} is a truncated or corrupt GGUF file: {reason}")]
    CorruptGguf {
        /// The file that was opened.
        path: PathBuf,
        /// What exactly did not add up.
        reason: String,
    },
    /// A chat prompt was asked of a model without a chat template.
    #[error("this model has no chat template (tokenizer.chat_template): it is a base model, so give it plain text to continue (--raw, or /v1/completions)")]
    NoChatTemplate,
    /// A tensor is stored in a type Veil cannot read.
    #[error("{path} holds tensors of type {found}, which Veil does not run: it runs F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and Q4_K, Q5_K, Q6_K (its own kernels) and Q2_K, Q3_K (candle's); re-quantize with `llama-quantize --allow-requantize FILE OUT Q4_K_M`")]
    UnsupportedTensorType {
        /// The file that was opened.
        path: PathBuf,
        /// The tensor type found.
        found: String,
    },
    /// The model is not of an architecture the forward pass implements.
    #[error("unsupported model architecture {found:?}: Veil runs general.architecture = llama (Llama, Mistral), qwen2, qwen3 and gemma3")]
    UnsupportedArchitecture {
        /// The architecture named in the file's metadata.
        found: String,
    },
    /// A metadata key the model needs is absent.
    #[error("GGUF metadata key {key:?} is missing")]
    MissingMetadata {
        /// The key that was looked up.
        key: String,
    },
    /// A metadata value is present but unusable.
    #[error("GGUF metadata key {key:?} is invalid: {reason}")]
    BadMetadata {
        /// The key that was read.
        key: String,
        /// Why the value cannot be used.
        reason: String,
    },
    /// A tensor the model needs is absent, or has the wrong shape.
    #[error("tensor {name:?}: {reason}")]
    BadTensor {
        /// The GGUF tensor name.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A shard's layer range does not fit the model.
    #[error("invalid shard: {0}")]
    InvalidShard(String),
    /// The input handed to a shard does not match what the shard takes.
    #[error("invalid shard input: {0}")]
    InvalidInput(String),
    /// A shard served by another process failed, and no replacement could take over.
    #[error("remote shard: {0}")]
    Remote(String),
    /// The prompt renders to no tokens.
    #[error("the prompt is empty: give some text to complete")]
    EmptyPrompt,
    /// The tokens do not fit in the model's context window.
    #[error("{needed} tokens do not fit in the model's context of {context} tokens: shorten the prompt or lower --max-tokens")]
    ContextOverflow {
        /// Tokens that would be in the context.
        needed: usize,
        /// The model's context length.
        context: usize,
    },
    /// Sampling settings that make no sense (negative temperature, top-p of 0...).
    #[error("invalid sampling setting: {0}")]
    InvalidSampling(String),
    /// The tokenizer could not be built or failed on some input.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template failed to parse or render.
    #[error("chat template: {0}")]
    ChatTemplate(String),
    /// Fetching the default model failed.
    #[error("fetching the model failed: {0}")]
    Fetch(String),
    /// A batched decode step failed; every sequence in the batch ends with this.
    #[error("a batched decode step failed: {0}")]
    Batch(String),
    /// Whoever asked for the generation stopped waiting for it (a client that disconnected).
    #[error("generation cancelled: the client went away")]
    Cancelled,
    /// A tensor operation failed inside candle.
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

impl ModelError {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}

/// Shorthand used throughout the crate.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;
