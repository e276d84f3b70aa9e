//! What a run is measured on: the model, the machine and the workload. The selector sees these
//! numbers and nothing else, so a new model or machine is placed by its sizes, not its name.

use serde::{Deserialize, Serialize};

use crate::error::{MetaError, Result};

/// The model being served.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelFeatures {
    /// A name for grouping records (held-out-model evaluation); the selector does not see it.
    pub name: String,
    /// Parameters, in millions.
    pub parameters_m: f64,
    /// Transformer blocks.
    pub layers: u32,
    /// Hidden size.
    pub hidden: u32,
    /// Bits per weight of the format the file stores.
    pub stored_bits: f64,
}

/// The machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HardwareFeatures {
    /// Cores the node may use.
    pub cores: u32,
    /// Memory, GiB.
    pub memory_gib: f64,
    /// AVX2 present.
    pub avx2: bool,
    /// AVX-512 with VNNI present.
    pub avx512_vnni: bool,
    /// What an hour of this machine costs, in any unit (the cost model's price).
    pub price_per_hour: f64,
}

/// The work: how many requests arrive together and what they look like.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkloadFeatures {
    /// Prompt tokens per request.
    pub prompt_tokens: u32,
    /// Tokens generated per request (the budget).
    pub output_tokens: u32,
    /// Requests in flight together.
    pub batch: u32,
    /// Share of each prompt that earlier requests already sent (a system prompt, earlier
    /// turns), 0 to 1.
    pub shared_prefix: f64,
    /// The answer rewrites text the prompt gives (editing, quoting): what prompt lookup needs.
    pub rewrite: bool,
}

/// Everything a record is measured on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Features {
    /// The model.
    pub model: ModelFeatures,
    /// The machine.
    pub hardware: HardwareFeatures,
    /// The workload.
    pub workload: WorkloadFeatures,
}

impl Features {
    /// Names of [`vector`](Self::vector)'s entries, for reports.
    pub const NAMES: [&'static str; 13] = [
        "parameters_m",
        "layers",
        "hidden",
        "stored_bits",
        "cores",
        "memory_gib",
        "avx2",
        "avx512_vnni",
        "log2_prompt_tokens",
        "log2_output_tokens",
        "batch",
        "shared_prefix",
        "rewrite",
    ];

    /// The numbers the selector learns from (token counts on a log scale: what matters is
    /// their order of magnitude).
    pub fn vector(&self) -> Vec<f64> {
        let (m, h, w) = (&self.model, &self.hardware, &self.workload);
        let flag = |b: bool| if b { 1.0 } else { 0.0 };
        vec![
            m.parameters_m,
            m.layers as f64,
            m.hidden as f64,
            m.stored_bits,
            h.cores as f64,
            h.memory_gib,
            flag(h.avx2),
            flag(h.avx512_vnni),
            (w.prompt_tokens.max(1) as f64).log2(),
            (w.output_tokens.max(1) as f64).log2(),
            w.batch as f64,
            w.shared_prefix,
            flag(w.rewrite),
        ]
    }

    /// Checks the numbers are in range: records come from peers and files.
    pub fn check(&self) -> Result<()> {
        let (m, h, w) = (&self.model, &self.hardware, &self.workload);
        let bad = |why: &str| Err(MetaError::BadRecord(why.to_string()));
        let finite_positive = |x: f64| x.is_finite() && x > 0.0;
        if m.name.is_empty() || m.name.len() > 200 {
            return bad("model name must be 1-200 characters");
        }
        if !finite_positive(m.parameters_m) || m.layers == 0 || m.hidden == 0 {
            return bad("model sizes must be positive");
        }
        if !finite_positive(m.stored_bits) || m.stored_bits > 64.0 {
            return bad("stored bits must be in (0, 64]");
        }
        if h.cores == 0 || !finite_positive(h.memory_gib) || !finite_positive(h.price_per_hour) {
            return bad("cores, memory and price must be positive");
        }
        if w.prompt_tokens == 0 || w.output_tokens == 0 || w.batch == 0 {
            return bad("prompt tokens, output tokens and batch must be positive");
        }
        if !(0.0..=1.0).contains(&w.shared_prefix) {
            return bad("shared prefix must be between 0 and 1");
        }
        Ok(())
    }
}
