//! Options shared by every command that runs the model.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use veil_model::{
    known_model, GenerationParams, Kernels, LayerRange, LocalModel, ModelStore, SamplingParams,
    WeightFormat, KNOWN_MODELS, SMOLLM2_135M,
};

use crate::progress;

/// Which model to run and how.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// A GGUF file (llama, Mistral, Qwen 2/3, Gemma 3), or the name of a model Veil fetches
    /// into $VEIL_HOME (`veil models list`); default: smollm2-135m-instruct.
    #[arg(long, value_name = "NAME|PATH")]
    pub model: Option<String>,

    /// Weight format for matrix weights: stored (as in the file), f32, f16, q8_0 or q4_0.
    #[arg(long, default_value = "stored", value_parser = parse_format)]
    pub dtype: WeightFormat,

    /// Run the model as local shards with these layer ranges, e.g. 0-10,10-20,20-30.
    #[arg(long, value_delimiter = ',', value_name = "RANGES")]
    pub layers: Vec<LayerRange>,

    /// Worker threads for the tensor kernels (default: all cores).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub threads: Option<u16>,

    /// Whose kernels multiply quantized weights: veil (the fastest SIMD this CPU has), one of
    /// its families (scalar, avx2, avx512), or candle (as it comes, kept for comparison).
    #[arg(long, default_value = "veil", value_parser = parse_kernels)]
    pub kernels: Kernels,
}

fn parse_kernels(s: &str) -> Result<Kernels, String> {
    s.parse().map_err(|e: veil_model::ModelError| e.to_string())
}

fn parse_format(s: &str) -> Result<WeightFormat, String> {
    s.parse().map_err(|e: veil_model::ModelError| e.to_string())
}

impl ModelArgs {
    /// The model file to use: the one given, or the default model, fetched if needed.
    pub fn resolve_path(&self) -> Result<PathBuf> {
        resolve_model(self.model.as_deref())
    }

    /// The `--layers` ranges (empty: the whole model as one shard).
    pub fn ranges(&self) -> Vec<std::ops::Range<usize>> {
        self.layers.iter().map(|r| r.0.clone()).collect()
    }

    /// Applies `--threads` and loads the model, with a spinner.
    pub fn load(&self) -> Result<LocalModel> {
        if let Some(threads) = self.threads {
            // candle sizes its thread pools from this variable when it first needs them.
            std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
        }
        let path = self.resolve_path()?;
        let ranges = self.ranges();
        let spinner = progress::spinner(format!("loading {} ({})", path.display(), self.dtype));
        let model = LocalModel::load_with(&path, self.dtype, &ranges, self.kernels)
            .with_context(|| format!("cannot load {}", path.display()));
        spinner.finish_and_clear();
        model
    }
}

/// A `--model` value: a known model's name (fetched if needed), a path, or the default model.
pub fn resolve_model(model: Option<&str>) -> Result<PathBuf> {
    let store = ModelStore::from_env();
    let Some(model) = model else {
        return progress::ensure_model(&store, &SMOLLM2_135M);
    };
    if let Some(known) = known_model(model) {
        return progress::ensure_model(&store, known);
    }
    let path = PathBuf::from(model);
    if !path.exists() {
        let names: Vec<&str> = KNOWN_MODELS.iter().map(|m| m.name).collect();
        anyhow::bail!(
            "--model {model}: No such file, and not the name of a model Veil fetches (known: {})",
            names.join(", ")
        );
    }
    Ok(path)
}

/// How to sample and when to stop.
#[derive(Args, Debug, Clone)]
pub struct SamplingArgs {
    /// Sampling temperature; 0 is greedy decoding.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,

    /// Sample only from the k likeliest tokens.
    #[arg(long)]
    pub top_k: Option<usize>,

    /// Sample only from the likeliest tokens whose probability adds up to p.
    #[arg(long)]
    pub top_p: Option<f32>,

    /// Random seed: the same seed gives the same text.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// The most tokens to generate.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,

    /// Stop when this text appears (may be given several times).
    #[arg(long)]
    pub stop: Vec<String>,
}

impl SamplingArgs {
    /// The generation settings these flags describe, checked.
    pub fn params(&self) -> Result<GenerationParams> {
        let sampling = SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            seed: self.seed,
        };
        sampling.check()?;
        Ok(GenerationParams {
            max_tokens: self.max_tokens,
            sampling,
            stop: self.stop.clone(),
        })
    }
}

/// Reads a file a user named, refusing one over `limit` bytes (keys, proofs, policies and
/// evidence are small; a huge file is a mistake, not something to load into memory).
pub fn read_limited(path: &std::path::Path, what: &str, limit: u64) -> anyhow::Result<Vec<u8>> {
    use anyhow::Context;
    let size = std::fs::metadata(path)
        .with_context(|| format!("cannot read the {what} {}", path.display()))?
        .len();
    if size > limit {
        anyhow::bail!(
            "the {what} {} is {size} bytes, over the {limit}-byte limit",
            path.display()
        );
    }
    std::fs::read(path).with_context(|| format!("cannot read the {what} {}", path.display()))
}
