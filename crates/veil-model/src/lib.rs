//! Veil's inference core.
//!
//! Runs a GGUF model (llama, Mistral, Qwen 2/3, Gemma 3) on the CPU with candle, whole or as a [`Shard`] (a range of
//! blocks that takes token ids or hidden states and returns hidden states or logits), with a KV
//! cache per session, a tokenizer and chat template read from the file itself, seeded sampling,
//! and a cache that fetches the default model.

pub mod accel;
pub mod batch;
pub mod chat;
pub mod config;
pub mod error;
mod gemma3;
pub mod generate;
pub mod gguf;
mod kv;
mod layers;
mod linear;
mod llama;
pub mod local;
pub mod model;
pub mod prompts;
pub mod sampling;
pub mod shard;
pub mod shard_file;
pub mod store;
pub mod tokenizer;
pub mod weights;

pub use accel::{generate_accelerated, prompt_lookup, Accel, DraftStats, Drafting};
pub use batch::{generate_batch, serve_batched, BatchConfig, BatchRequest, LiveRequest};
pub use candle_core::Tensor;
pub use chat::{ChatMessage, ChatTemplate};
pub use config::{Architecture, LlamaConfig, SUPPORTED_ARCHITECTURES};
pub use error::{ModelError, Result};
pub use generate::{
    generate, generate_in_order, Completion, FinishReason, GenerationParams, PlainOrder,
    TextStream, TokenOrder, TokenStep,
};
pub use gguf::GgufFile;
pub use linear::Kernels;
pub use local::{LocalModel, LocalSession, PrefixCache};
pub use model::{
    forward_chain, forward_chain_final_hidden, LogitsAt, ShardCache, ShardInput, ShardModel,
};
pub use sampling::{Sampler, SamplingParams};
pub use shard::{LayerRange, Shard};
pub use shard_file::{shard_tensor_names, write_converted, write_shard_files, ShardManifest};
pub use store::{
    known_model, FetchEvent, KnownModel, ModelPart, ModelStore, GEMMA3_270M, KNOWN_MODELS,
    SMOLLM2_135M,
};
pub use tokenizer::GgufTokenizer;
pub use veil_kernels::{with_thread_limit, Isa, QuantFormat, SCALE_GROUP};
pub use weights::WeightFormat;
