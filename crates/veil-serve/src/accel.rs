//! Running requests with an acceleration method: the bridge between MetaInf's catalogue
//! (`veil-meta`, pure) and the runtime (`veil-model`). Used by `veil meta collect` to measure
//! methods, by `--accel` to serve with one, and by `veil bench --meta` to compare.

use std::num::NonZeroUsize;
use std::path::Path;
use std::time::Instant;

use crate::error::{Result, ServeError};
use veil_meta::{Features, HardwareFeatures, Method, ModelFeatures, WorkloadFeatures};
use veil_model::{
    generate_accelerated, generate_batch, Accel, BatchRequest, ChatMessage, Completion,
    GenerationParams, LocalModel, LogitsAt, PrefixCache, WeightFormat,
};

/// The most keys and values a prefix cache keeps.
const PREFIX_CACHE_BYTES: usize = 512 << 20;

/// The weight format a method's format name stands for.
pub fn format_of(method: &Method) -> Result<WeightFormat> {
    method
        .format
        .parse()
        .map_err(|e| ServeError::Invalid(format!("method {}: {e}", method.name)))
}

/// The runtime knobs of a method, for one request.
pub fn accel_of(method: &Method) -> Accel {
    Accel {
        prefill_chunk: method.prefill_chunk.and_then(NonZeroUsize::new),
        lookup_drafts: method.lookup_drafts.and_then(NonZeroUsize::new),
    }
}

/// Requests that arrive together.
#[derive(Debug, Clone)]
pub struct Workload {
    /// A short name for progress lines.
    pub name: String,
    /// Prompt token ids, in arrival order.
    pub prompts: Vec<Vec<u32>>,
    /// What to generate for each (greedy, so every exact method gives the same tokens).
    pub params: GenerationParams,
    /// Whether the answers rewrite text from their prompts.
    pub rewrite: bool,
}

impl Workload {
    /// The workload's features as the selector sees them; the shared prefix is measured from
    /// the prompts themselves (what a gateway's prefix cache would find).
    pub fn features(&self) -> WorkloadFeatures {
        let prompts: Vec<&[u32]> = self.prompts.iter().map(Vec::as_slice).collect();
        workload_features(&prompts, self.params.max_tokens, self.rewrite)
    }
}

/// The features of `prompts` arriving together, each generating up to `output_tokens`: the
/// shared prefix is each prompt's longest common prefix with an earlier one, as a share of
/// the prompt, averaged over all (the first shares nothing). The gateway measures its live
/// traffic (the requests in flight) this way, as `veil meta collect` measured its workloads.
pub fn workload_features(
    prompts: &[&[u32]],
    output_tokens: usize,
    rewrite: bool,
) -> WorkloadFeatures {
    let n = prompts.len().max(1);
    let prompt_tokens = prompts.iter().map(|p| p.len()).sum::<usize>() / n;
    let mut shared = 0.0;
    for (i, p) in prompts.iter().enumerate().skip(1) {
        let longest = prompts[..i]
            .iter()
            .map(|q| q.iter().zip(p.iter()).take_while(|(a, b)| a == b).count())
            .max()
            .unwrap_or(0);
        shared += longest as f64 / p.len().max(1) as f64;
    }
    WorkloadFeatures {
        prompt_tokens: prompt_tokens.max(1) as u32,
        output_tokens: output_tokens.max(1) as u32,
        batch: prompts.len().max(1) as u32,
        shared_prefix: (shared / n as f64).clamp(0.0, 1.0),
        rewrite,
    }
}

/// What running a workload took.
#[derive(Debug, Clone)]
pub struct Measured {
    /// Wall time for every request, seconds.
    pub seconds: f64,
    /// Tokens generated.
    pub tokens: u64,
    /// Mean time from arrival (the workload's start) to a request's last token, ms.
    pub latency_ms: f64,
    /// The answers, in arrival order.
    pub completions: Vec<Completion>,
}

/// Runs every request of `workload` on `model` with `method` (whose format `model` must
/// already be loaded in).
pub fn run_workload(model: &LocalModel, method: &Method, workload: &Workload) -> Result<Measured> {
    let started = Instant::now();
    let mut prefixes = method
        .prefix_cache
        .then(|| PrefixCache::new(PREFIX_CACHE_BYTES));
    let accel = accel_of(method);
    let mut completions = Vec::with_capacity(workload.prompts.len());
    let mut finished_ms = Vec::with_capacity(workload.prompts.len());
    if method.batch && workload.prompts.len() > 1 {
        let requests: Vec<BatchRequest> = workload
            .prompts
            .iter()
            .map(|p| BatchRequest {
                prompt: p.clone(),
                params: workload.params.clone(),
            })
            .collect();
        let width = NonZeroUsize::new(requests.len())
            .ok_or_else(|| ServeError::Invalid("an empty workload".into()))?;
        for answer in generate_batch(
            model,
            &requests,
            width,
            accel.prefill_chunk,
            prefixes.as_mut(),
        ) {
            let c = answer?;
            // Every request arrived at the start; its clock started then.
            finished_ms.push((c.prefill_time + c.decode_time).as_secs_f64() * 1e3);
            completions.push(c);
        }
    } else {
        let context = model.config.context_length;
        for prompt in &workload.prompts {
            let mut session = match prefixes.as_mut() {
                Some(cache) => model.session_from(cache, prompt)?,
                None => model.session(),
            };
            let (c, _) = generate_accelerated(
                &mut session,
                &model.tokenizer,
                prompt,
                context,
                &workload.params,
                &accel,
                &mut |_| {},
            )?;
            if let Some(cache) = prefixes.as_mut() {
                cache.keep(prompt, session)?;
            }
            finished_ms.push(started.elapsed().as_secs_f64() * 1e3);
            completions.push(c);
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let tokens = completions.iter().map(|c| c.tokens.len() as u64).sum();
    Ok(Measured {
        seconds,
        tokens,
        latency_ms: finished_ms.iter().sum::<f64>() / finished_ms.len().max(1) as f64,
        completions,
    })
}

/// The model's features: sizes from its configuration, bits per weight from the file.
pub fn model_features(model: &LocalModel, path: &Path) -> ModelFeatures {
    let c = &model.config;
    let kv = c.kv_head_count * c.head_dim;
    let per_block =
        2 * c.hidden_size * c.hidden_size + 2 * c.hidden_size * kv + 3 * c.hidden_size * c.ffn_size;
    let parameters = c.vocab_size * c.hidden_size + c.block_count * per_block;
    let bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    ModelFeatures {
        name,
        parameters_m: parameters as f64 / 1e6,
        layers: c.block_count as u32,
        hidden: c.hidden_size as u32,
        stored_bits: (bytes as f64 * 8.0 / parameters.max(1) as f64).max(0.1),
    }
}

/// This machine's features.
pub fn hardware_features(price_per_hour: f64) -> HardwareFeatures {
    let memory_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(1.0, |kib| kib / 1024.0 / 1024.0);
    #[cfg(target_arch = "x86_64")]
    let (avx2, avx512_vnni) = (
        std::arch::is_x86_feature_detected!("avx2"),
        std::arch::is_x86_feature_detected!("avx512vnni"),
    );
    #[cfg(not(target_arch = "x86_64"))]
    let (avx2, avx512_vnni) = (false, false);
    HardwareFeatures {
        cores: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
        memory_gib,
        avx2,
        avx512_vnni,
        price_per_hour,
    }
}

/// Everything the selector needs for `workload` on this model and machine.
pub fn features_of(
    model: &ModelFeatures,
    hardware: &HardwareFeatures,
    workload: WorkloadFeatures,
) -> Features {
    Features {
        model: model.clone(),
        hardware: hardware.clone(),
        workload,
    }
}

/// What `veil node`'s run records say of it: a whole model in a format one of the methods runs
/// plainly (stored, q8_0, f32), with the served weights' perplexity measured now. `None` for a
/// shard (its time is only part of a run), a format no method stands for, or an encrypted
/// model (it has no tokenizer to measure perplexity with, and its node cannot read text).
pub fn node_run_template(
    path: &Path,
    format: WeightFormat,
    price_per_hour: f64,
    share: bool,
) -> Result<Option<veil_net::RunTemplate>> {
    let gguf = veil_model::GgufFile::open(path)?;
    if !gguf.content().metadata.contains_key("tokenizer.ggml.model") {
        return Ok(None);
    }
    let manifest = veil_model::ShardManifest::of(&gguf)?;
    let whole = manifest.embedding
        && manifest.head
        && manifest.first_block == 0
        && manifest.end_block == manifest.block_count;
    let plain = veil_meta::METHODS
        .iter()
        .find(|m| m.is_format_only() && format_of(m).ok() == Some(format));
    let (true, Some(method)) = (whole, plain) else {
        return Ok(None);
    };
    let model = LocalModel::load(path, format, &[])?;
    Ok(Some(veil_net::RunTemplate {
        model: model_features(&model, path),
        hardware: hardware_features(price_per_hour),
        method: method.name.to_string(),
        perplexity: perplexity(&model, HELD_OUT)?,
        share,
    }))
}

/// Perplexity of `model` on `text` (teacher-forced, every position): the quality cost of a
/// weight format.
pub fn perplexity(model: &LocalModel, text: &str) -> Result<f64> {
    let tokens = model.raw_prompt(text)?;
    if tokens.len() < 2 {
        return Err(ServeError::Invalid("held-out text too short".into()));
    }
    let logits = model
        .session()
        .forward(&tokens[..tokens.len() - 1], LogitsAt::All)?
        .to_vec2::<f32>()
        .map_err(veil_model::ModelError::from)?;
    Ok(perplexity_of(&logits, &tokens[1..]))
}

/// `exp` of the mean negative log-likelihood of `targets` under `logits` (one row each): for
/// logits a caller computed itself, such as an encrypted model's in its own vocabulary order.
pub fn perplexity_of(logits: &[Vec<f32>], targets: &[u32]) -> f64 {
    let mut nll = 0.0;
    for (row, &next) in logits.iter().zip(targets) {
        let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
        nll -= row[next as usize] as f64 - max - sum.ln();
    }
    (nll / logits.len().max(1) as f64).exp()
}

/// Original prose (written for Veil) that the workloads quote and rewrite.
pub const PASSAGES: [&str; 6] = [
    "The harbour town woke before the sun. Fishing boats slid out past the lighthouse while the bakers on the quay pulled the first loaves from their ovens. By seven the market square was full of crates of mackerel, baskets of apples from the hill farms and the loud bargaining of people who had known each other all their lives.",
    "A river that floods every spring shapes the life of the valley. Farmers plant late, after the water has gone down and left a layer of dark silt behind. The soil is rich, and the harvest is good, but every few years the flood comes higher than anyone remembers and carries away fences, bridges and sometimes whole barns.",
    "The library kept its oldest maps in a cool room under the stairs. Each map lay flat in a wide drawer, wrapped in paper that was changed every ten years. Visitors had to wear cotton gloves and were allowed to look at only three maps in one afternoon, which most of them thought was more than enough.",
    "Building a bridge across the strait took eleven years. The engineers sank the towers into the sea bed, spun the cables strand by strand and hung the deck in sections from barges. When the last section was lifted into place, the workers who had started the job as young men were already grandfathers.",
    "Bees find their way home by the sun, even on cloudy days, because they can see the pattern of polarised light in the sky. A forager that finds a good patch of flowers returns to the hive and dances, and the angle of the dance tells the other bees which way to fly and how far to go.",
    "The night train left the capital at ten and reached the mountains at dawn. Passengers slept in narrow bunks while the carriages rocked over the points, and in the morning the attendant brought tea in glasses with metal holders, just as he had done on the same line for thirty years.",
];

/// Held-out text for perplexity (not used by any workload).
pub const HELD_OUT: &str = "The old clockmaker repaired watches in a shop no wider than a corridor. He worked under a green lamp with tweezers, tiny screwdrivers and a loupe screwed into one eye, and he never hurried. Customers left their watches with him for a week and came back to find them cleaned, oiled and ticking more quietly than when they were new. When he retired, the street held a small party, and for the first time in forty years the shop's shutters stayed down on a Monday morning.";

/// How long the prompts of a workload are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptSize {
    /// A question alone.
    Short,
    /// A question about one passage.
    Medium,
    /// A question about every passage.
    Long,
}

/// Builds a workload on `model`: `batch` requests of `size`, sharing most of their text or
/// not, asking questions or rewrites, each generating up to `output` tokens.
pub fn build_workload(
    model: &LocalModel,
    size: PromptSize,
    output: usize,
    batch: usize,
    shared: bool,
    rewrite: bool,
) -> Result<Workload> {
    let passages = |first: usize, count: usize| -> String {
        (0..count)
            .map(|i| PASSAGES[(first + i) % PASSAGES.len()])
            .collect::<Vec<_>>()
            .join("\n\n")
    };
    let count = match size {
        PromptSize::Short => 0,
        PromptSize::Medium => 1,
        PromptSize::Long => PASSAGES.len(),
    };
    let questions = [
        "What happens first?",
        "Who are the people in it?",
        "What is the most surprising detail?",
        "Give it a title.",
    ];
    let mut prompts = Vec::with_capacity(batch);
    for i in 0..batch {
        // Shared: every request carries the same document; otherwise each its own.
        let document = if count == 0 {
            String::new()
        } else if shared {
            passages(0, count)
        } else {
            passages(i, count)
        };
        let task = match (rewrite, count) {
            (true, 0) => format!(
                "Rewrite this sentence exactly, fixing any spelling: {}",
                PASSAGES[i % PASSAGES.len()]
                    .split(". ")
                    .next()
                    .unwrap_or_default()
            ),
            (true, _) => format!(
                "Copy paragraph {} of the text exactly, fixing any spelling.",
                1 + i % count
            ),
            // Shared: every user asks the same question.
            (false, 0) if shared => veil_model::prompts::SAMPLE_PROMPTS[0].to_string(),
            (false, 0) => veil_model::prompts::SAMPLE_PROMPTS[i % 25].to_string(),
            (false, _) => questions[i % questions.len()].to_string(),
        };
        let messages = if document.is_empty() {
            vec![ChatMessage::user(task)]
        } else if shared {
            // The document goes first (in the system prompt), so requests share it.
            vec![
                ChatMessage::system(format!("Answer about this text.\n\n{document}")),
                ChatMessage::user(task),
            ]
        } else {
            vec![ChatMessage::user(format!("{document}\n\n{task}"))]
        };
        prompts.push(model.prompt(&messages)?);
    }
    let name = format!(
        "{size:?} prompt, {output} tokens, {batch} at once{}{}",
        if shared { ", shared text" } else { "" },
        if rewrite { ", rewrite" } else { "" }
    )
    .to_lowercase();
    Ok(Workload {
        name,
        prompts,
        params: GenerationParams {
            max_tokens: output,
            ..GenerationParams::default()
        },
        rewrite,
    })
}

/// How a request's method was picked, for the log and the stats line.
#[derive(Debug, Clone)]
pub struct Pick {
    /// The method.
    pub method: &'static Method,
    /// Why: forced, or the selector's predicted cost.
    pub why: String,
}

/// The method for a request with `features`: `auto` asks the selector (among methods in
/// `format`, if the weight format is already fixed), a name forces that method.
pub fn pick_method(
    accel: &str,
    selector: Option<&veil_meta::Selector>,
    features: &Features,
    format: Option<&str>,
) -> Result<Pick> {
    if accel != "auto" {
        let method = veil_meta::method(accel)?;
        if let Some(f) = format.filter(|f| *f != method.format) {
            return Err(ServeError::Invalid(format!(
                "--accel {accel} runs {} weights but the model is loaded as {f}",
                method.format
            )));
        }
        return Ok(Pick {
            method,
            why: "forced".into(),
        });
    }
    let Some(selector) = selector else {
        return Ok(Pick {
            method: veil_meta::default_method(),
            why: "auto: no selector".into(),
        });
    };
    if matches!(format, Some("f32" | "f16")) {
        // Float weights go through candle's gemm, whose sums depend on how many rows a call
        // has: only the plain method is sure to give the plain answer there.
        return Ok(Pick {
            method: veil_meta::default_method(),
            why: "auto: float weights run plain".into(),
        });
    }
    let predicted = selector.predict(features);
    for (rank, name) in selector.rank(features).into_iter().enumerate() {
        let method = veil_meta::method(name)?;
        if format.is_none_or(|f| f == method.format) {
            let cost = predicted
                .iter()
                .find(|(m, _)| *m == name)
                .map_or(String::new(), |(_, c)| {
                    format!(", predicted {c:.2}× plain's cost")
                });
            let how = if rank == 0 { "auto" } else { "auto, next best" };
            return Ok(Pick {
                method,
                why: format!("{how}{cost}"),
            });
        }
    }
    Ok(Pick {
        method: veil_meta::default_method(),
        why: "auto: no method for this format".into(),
    })
}
