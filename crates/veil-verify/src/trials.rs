//! Calibration and detection trials on a real model: honest answers that vary what honest nodes
//! vary (threads, prefill batch, which copy generates and which validates), and answers from
//! each kind of cheat. `veil verify calibrate` prints the figures; the tests assert on them.

use std::path::Path;

use veil_model::{
    with_thread_limit, ChatMessage, GgufFile, Isa, Kernels, LocalModel, SamplingParams, Shard,
    ShardModel, WeightFormat,
};

use crate::commitment::CommitmentMode;
use crate::error::{Result, VerifyError};
use crate::serving::{
    load_serving_shard_with, serve_fixed_length, serve_until, Misbehaviour, ServingSession,
};
use crate::validate::{validate, Deviations, Tolerances, Validation, Verdict};

/// Varied questions for trials: facts, code, lists, stories, arithmetic, other languages.
pub const TRIAL_PROMPTS: [&str; 25] = veil_model::prompts::SAMPLE_PROMPTS;

/// The answer length of honest trials: two chunks, a full one and one token.
pub const TRIAL_TOKENS: usize = 33;

/// The answer length of cheating trials. The altered-token cheat changes one token at a random
/// place in each hundred, so its trials run until it has acted (at most 100 tokens).
pub const CHEAT_TOKENS: usize = 9;

/// Runs `f` on a pool of `threads` threads, so candle's kernels split work that many ways, and
/// with Veil's kernels splitting theirs over at most that many.
pub fn with_threads<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> Result<R> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| VerifyError::InvalidClaim(format!("cannot start {threads} threads: {e}")))?;
    Ok(pool.install(|| with_thread_limit(threads, f)))
}

/// The kernel families trials vary in exact mode: every family of Veil's this CPU runs
/// (they give the same bits); in tolerant mode, the default kernels only.
fn trial_kernels(mode: CommitmentMode) -> Vec<Kernels> {
    match mode {
        CommitmentMode::Exact => Isa::available().into_iter().map(Kernels::Veil).collect(),
        CommitmentMode::Tolerant => vec![Kernels::default()],
    }
}

/// The sampling of the `n`th trial: greedy for even `n`, seeded sampling (temperature 0.8,
/// top-p 0.95, seed `n`) for odd.
pub fn trial_sampling(n: usize) -> SamplingParams {
    if n.is_multiple_of(2) {
        SamplingParams::greedy()
    } else {
        SamplingParams {
            temperature: 0.8,
            top_k: None,
            top_p: Some(0.95),
            seed: n as u64,
        }
    }
}

/// Honest runs and their verdicts.
#[derive(Debug, Clone, Default)]
pub struct HonestReport {
    /// Validations run.
    pub runs: usize,
    /// Those that failed (each one a false accusation).
    pub failures: Vec<(String, Verdict)>,
    /// The largest deviations seen.
    pub worst: Deviations,
    /// The closest an honest run came to failing, as a multiple of the tolerance (below 1).
    pub closest: f32,
}

/// Runs `runs` honest validations committed in `mode`: answers generated with 1 or 2 threads
/// and prefill batches of 1 or 4 tokens (and, in exact mode, on each kernel family in turn),
/// each checked by validators on 1 and 2 threads (in exact mode, one on the next family), with
/// greedy and seeded sampling alternating.
pub fn honest_trials(
    model: &Path,
    format: WeightFormat,
    mode: CommitmentMode,
    runs: usize,
    tol: &Tolerances,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<HonestReport> {
    let text = LocalModel::open_text(model)?;
    let kernels = trial_kernels(mode);
    // One generator and one validator copy per family (the validator's loaded on its own).
    let generators = kernels
        .iter()
        .map(|&k| load_whole_with(model, format, k, None))
        .collect::<Result<Vec<_>>>()?;
    let validators = kernels
        .iter()
        .map(|&k| load_whole_with(model, format, k, None))
        .collect::<Result<Vec<_>>>()?;
    let families = kernels.len();
    let mut report = HonestReport::default();
    let mut n = 0;
    while report.runs < runs {
        let prompt =
            text.chat_prompt(&[ChatMessage::user(TRIAL_PROMPTS[n % TRIAL_PROMPTS.len()])])?;
        // Every generator setting, then greedy and seeded in turn, over every prompt.
        let (gen_threads, batch) = [(1, 1), (2, 4), (2, 1), (1, 4)][n % 4];
        let sampling = trial_sampling(n / 4);
        let family = n % families;
        let generator = &generators[family];
        let answer = with_threads(gen_threads, || {
            let session = ServingSession::new(std::slice::from_ref(generator), sampling, None, 0)?
                .with_prefill_chunk(batch)
                .with_commitment(std::slice::from_ref(generator), mode)?;
            serve_fixed_length(
                std::slice::from_ref(generator),
                session,
                &prompt,
                TRIAL_TOKENS,
            )
        })??;
        for (val_threads, val_family) in [(1, (family + 1) % families), (2, family)] {
            if report.runs == runs {
                break;
            }
            let validator = &validators[val_family];
            let v = with_threads(val_threads, || {
                validate(std::slice::from_ref(validator), &answer, tol)
            })??;
            report.worst = report.worst.max(v.deviations);
            report.closest = report.closest.max(v.deviations.over(tol));
            if !v.verdict.passed() {
                report.failures.push((
                    format!(
                        "prompt {n}, generator {} on {gen_threads} threads batch {batch}, validator {} on {val_threads} threads",
                        kernels[family], kernels[val_family]
                    ),
                    v.verdict,
                ));
            }
            report.runs += 1;
            progress(report.runs, runs);
        }
        n += 1;
    }
    Ok(report)
}

/// A cheat's trials and how many were caught.
#[derive(Debug, Clone)]
pub struct DetectionReport {
    /// The cheat.
    pub kind: Misbehaviour,
    /// Trials run.
    pub trials: usize,
    /// Trials whose verdict was a failure.
    pub caught: usize,
    /// The largest deviations seen.
    pub worst: Deviations,
    /// The least damning trial's largest deviation, as a multiple of its tolerance (above 1
    /// when every trial is caught).
    pub closest: f32,
    /// One failing verdict, as an example of the reason given.
    pub example: Option<Verdict>,
}

/// Runs `trials` answers from a node cheating with `kind`, each checked by an honest validator.
pub fn detection_trials(
    model: &Path,
    format: WeightFormat,
    mode: CommitmentMode,
    kind: Misbehaviour,
    trials: usize,
    tol: &Tolerances,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<DetectionReport> {
    let text = LocalModel::open_text(model)?;
    let cheat = load_whole(model, format, Some(kind))?;
    let validator = load_whole(model, format, None)?;
    let mut report = DetectionReport {
        kind,
        trials,
        caught: 0,
        worst: Deviations::default(),
        closest: f32::INFINITY,
        example: None,
    };
    for n in 0..trials {
        let prompt =
            text.chat_prompt(&[ChatMessage::user(TRIAL_PROMPTS[n % TRIAL_PROMPTS.len()])])?;
        let session = ServingSession::new(
            std::slice::from_ref(&cheat),
            trial_sampling(n),
            Some(kind),
            n as u64,
        )?
        .with_commitment(std::slice::from_ref(&cheat), mode)?;
        let mut claim = serve_until(std::slice::from_ref(&cheat), session, &prompt, &mut |s| {
            if kind == Misbehaviour::AlteredToken {
                s.cheated() || s.output_len() >= 100
            } else {
                s.output_len() >= CHEAT_TOKENS
            }
        })?;
        // The cheat claims the prompt it was sent, which is what the client knows.
        claim.prompt = prompt;
        let Validation {
            verdict,
            deviations,
            ..
        } = validate(std::slice::from_ref(&validator), &claim, tol)?;
        report.worst = report.worst.max(deviations);
        report.closest = report.closest.min(deviations.over(tol));
        if !verdict.passed() {
            report.caught += 1;
            report.example.get_or_insert(verdict);
        }
        progress(n + 1, trials);
    }
    Ok(report)
}

/// Loads the whole model as a (possibly cheating) node serving `format` would.
pub fn load_whole(
    model: &Path,
    format: WeightFormat,
    fault: Option<Misbehaviour>,
) -> Result<ShardModel> {
    load_whole_with(model, format, Kernels::default(), fault)
}

/// [`load_whole`] on the given kernels.
pub fn load_whole_with(
    model: &Path,
    format: WeightFormat,
    kernels: Kernels,
    fault: Option<Misbehaviour>,
) -> Result<ShardModel> {
    let mut gguf = GgufFile::open(model)?;
    let blocks = veil_model::LlamaConfig::from_gguf(&gguf)?.block_count;
    load_serving_shard_with(&mut gguf, &Shard::whole(blocks), format, kernels, fault)
}
