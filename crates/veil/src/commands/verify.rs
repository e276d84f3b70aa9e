//! `veil verify ...` and `veil verify-evidence`: calibration and detection figures, the
//! verification benchmark, and offline re-checking of evidence.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use veil_model::{
    ChatMessage, GgufFile, LlamaConfig, LocalModel, SamplingParams, Shard, ShardModel, WeightFormat,
};
use veil_verify::trials::{detection_trials, honest_trials, load_whole, TRIAL_PROMPTS};
use veil_verify::{
    serve_fixed_length, validate, CommitmentMode, Evidence, HopJob, Misbehaviour, ServingSession,
    Tolerances, Verdict,
};

use crate::args::ModelArgs;
use crate::commands::measure::median;
use crate::progress;

/// Subcommands of `veil verify`.
#[derive(Subcommand, Debug)]
pub enum VerifyCommand {
    /// Honest runs (false accusations must be 0) and cheating runs of every kind (all must be
    /// caught), with the largest deviations each produced against the tolerances.
    Calibrate {
        #[command(flatten)]
        model: ModelArgs,
        /// Honest validations to run.
        #[arg(long, default_value_t = 200)]
        honest: usize,
        /// Trials per kind of cheat.
        #[arg(long, default_value_t = 50)]
        trials: usize,
        /// Only these kinds of cheat (default: all).
        #[arg(long, value_delimiter = ',')]
        kinds: Vec<Misbehaviour>,
        /// How answers commit to their activations: exact (a digest, any difference fails; the
        /// weights run in the model's stored quantized format on Veil's kernels, families
        /// varied) or tolerant (top-k values within tolerances; in F32 unless --dtype says).
        #[arg(long, default_value = "exact")]
        mode: CommitmentMode,
    },
    /// Commitment bytes per token and validation time as a share of generation time.
    Bench {
        #[command(flatten)]
        model: ModelArgs,
        /// Tokens to generate per run.
        #[arg(long, default_value_t = 128)]
        tokens: usize,
        /// Runs (the median is reported).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Commitment mode, as for `calibrate`.
        #[arg(long, default_value = "exact")]
        mode: CommitmentMode,
    },
}

/// Arguments of `veil verify-evidence`.
#[derive(Args, Debug)]
pub struct EvidenceArgs {
    /// The evidence file a client wrote when a committee failed an answer.
    pub file: PathBuf,
    /// The model the evidence is about, to recompute the answer: a known model's name or a
    /// GGUF path (default: the default model).
    #[arg(long, value_name = "NAME|PATH")]
    pub model: Option<String>,
}

/// Runs `veil verify ...`.
pub fn run(command: VerifyCommand) -> Result<()> {
    let (VerifyCommand::Calibrate { model, .. } | VerifyCommand::Bench { model, .. }) = &command;
    anyhow::ensure!(
        model.kernels == veil_model::Kernels::default(),
        "veil verify runs the kernels nodes serve with; drop --kernels"
    );
    match command {
        VerifyCommand::Calibrate {
            model,
            honest,
            trials,
            kinds,
            mode,
        } => calibrate(&model, honest, trials, &kinds, mode),
        VerifyCommand::Bench {
            model,
            tokens,
            runs,
            mode,
        } => bench(&model, tokens, runs, mode),
    }
}

/// The format a calibration claims: as asked. Tolerant mode's default is F32, the engine it
/// was first calibrated for (candle's F32 products); exact mode runs the stored quantized
/// weights, which is what makes it exact.
fn claimed_format(model: &ModelArgs, mode: CommitmentMode) -> WeightFormat {
    match (model.dtype, mode) {
        (WeightFormat::AsStored, CommitmentMode::Tolerant) => WeightFormat::F32,
        (f, _) => f,
    }
}

/// Loads the claimed model and checks an exact calibration can run on it.
fn check_mode(path: &std::path::Path, format: WeightFormat, mode: CommitmentMode) -> Result<()> {
    if mode == CommitmentMode::Exact && !load_whole(path, format, None)?.bit_reproducible() {
        bail!(
            "{format} weights do not run on Veil's bit-reproducible kernels here, so answers \
             cannot commit exactly: use a quantized --dtype (or the stored format of a \
             quantized file), or --mode tolerant"
        );
    }
    Ok(())
}

fn calibrate(
    model: &ModelArgs,
    honest: usize,
    trials: usize,
    kinds: &[Misbehaviour],
    mode: CommitmentMode,
) -> Result<()> {
    let path = model.resolve_path()?;
    let format = claimed_format(model, mode);
    check_mode(&path, format, mode)?;
    let tol = Tolerances::default();
    match mode {
        CommitmentMode::Exact => {
            println!("mode: exact (any difference in the hidden states or logits fails)")
        }
        CommitmentMode::Tolerant => println!("mode: tolerant, tolerances: {tol:?}"),
    }
    println!("claimed format: {format}");
    if honest > 0 {
        let bar = progress::bar(honest as u64, "honest runs");
        let report = honest_trials(&path, format, mode, honest, &tol, &mut |done, _| {
            bar.set_position(done as u64)
        })?;
        bar.finish_and_clear();
        if mode == CommitmentMode::Exact {
            println!(
                "honest: {} runs, {} failed; chunks whose digest differed: {}, largest logit gap {:.2e} (exact: both must be 0)",
                report.runs,
                report.failures.len(),
                report.worst.digest_mismatches,
                report.worst.logit_gap
            );
        } else {
            println!(
                "honest: {} runs, {} failed; closest call {:.2}x a tolerance; largest deviations: hidden mean {:.2e}, hidden max {:.2e}, rank {:.2e}, logit gap {:.2e}",
                report.runs,
                report.failures.len(),
                report.closest,
                report.worst.hidden_mean,
                report.worst.hidden_max,
                report.worst.rank,
                report.worst.logit_gap
            );
        }
        for (what, verdict) in &report.failures {
            println!("  false accusation: {what}: {verdict}");
        }
    }
    let kinds = if kinds.is_empty() {
        Misbehaviour::ALL.to_vec()
    } else {
        kinds.to_vec()
    };
    for kind in kinds {
        let bar = progress::bar(trials as u64, &kind.to_string());
        let report = detection_trials(&path, format, mode, kind, trials, &tol, &mut |done, _| {
            bar.set_position(done as u64)
        })?;
        bar.finish_and_clear();
        if mode == CommitmentMode::Exact {
            println!(
                "{kind}: caught {}/{}; most chunks with a wrong digest in one answer: {}, largest logit gap {:.2e}",
                report.caught, report.trials, report.worst.digest_mismatches, report.worst.logit_gap
            );
        } else {
            println!(
                "{kind}: caught {}/{}; least damning trial {:.1}x a tolerance; largest deviations: hidden mean {:.2e}, hidden max {:.2e}, rank {:.2e}, logit gap {:.2e}",
                report.caught,
                report.trials,
                report.closest,
                report.worst.hidden_mean,
                report.worst.hidden_max,
                report.worst.rank,
                report.worst.logit_gap
            );
        }
        if let Some(Verdict::Fail { token, reason }) = &report.example {
            println!("  e.g. token {token}: {reason}");
        }
    }
    Ok(())
}

fn bench(model: &ModelArgs, tokens: usize, runs: usize, mode: CommitmentMode) -> Result<()> {
    if tokens == 0 || runs == 0 {
        bail!("--tokens and --runs must be at least 1");
    }
    let path = model.resolve_path()?;
    let format = claimed_format(model, mode);
    check_mode(&path, format, mode)?;
    let text = LocalModel::open_text(&path)?;
    let shards = [load_whole(&path, format, None)?];
    let prompt = text.chat_prompt(&[ChatMessage::user(TRIAL_PROMPTS[11])])?;
    let tol = Tolerances::default();
    let (mut gen_s, mut val_s, mut bytes) = (Vec::new(), Vec::new(), 0);
    for run in 0..runs {
        let started = Instant::now();
        let session = ServingSession::new(&shards, SamplingParams::greedy(), None, 0)?
            .with_commitment(&shards, mode)?;
        let answer = serve_fixed_length(&shards, session, &prompt, tokens)?;
        gen_s.push(started.elapsed().as_secs_f64());
        let started = Instant::now();
        let v = validate(&shards, &answer, &tol)?;
        val_s.push(started.elapsed().as_secs_f64());
        if !v.verdict.passed() {
            bail!(
                "run {run}: an honest answer failed validation: {:?}",
                v.verdict
            );
        }
        bytes = answer.commitment.byte_len();
    }
    let (g, v) = (median(&mut gen_s), median(&mut val_s));
    let target = match mode {
        CommitmentMode::Exact => 1,
        CommitmentMode::Tolerant => 8,
    };
    println!(
        "format {format}, mode {mode}, prompt {} tokens, {tokens} generated tokens, median of {runs} runs",
        prompt.len()
    );
    println!(
        "commitment: {bytes} bytes = {:.2} bytes/token (target <= {target})",
        bytes as f64 / tokens as f64
    );
    println!(
        "generation {g:.2} s, validation {v:.2} s: validation = {:.1}% of generation (target <= 5%)",
        100.0 * v / g
    );
    Ok(())
}

/// Runs `veil verify-evidence FILE`: checks every signature, then recomputes the answer (or
/// replays the chain hop) and confirms it fails.
pub fn verify_evidence(args: EvidenceArgs) -> Result<()> {
    let bytes = std::fs::read(&args.file)
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    let model = ModelArgs {
        model: args.model,
        dtype: WeightFormat::AsStored,
        layers: Vec::new(),
        threads: None,
        kernels: veil_model::Kernels::default(),
    };
    let path = model.resolve_path()?;
    // A hop's record names its blocks and digests; an answer's, its generator and claim.
    let is_hop = serde_json::from_slice::<serde_json::Value>(&bytes)
        .is_ok_and(|v| v["job"]["body"].get("digests").is_some());
    if is_hop {
        return verify_hop_evidence(&args.file, &bytes, &path);
    }
    let evidence = <Evidence>::from_bytes(&bytes)
        .with_context(|| format!("{} is not valid evidence", args.file.display()))?;
    let proven = evidence
        .check()
        .with_context(|| format!("{} does not check", args.file.display()))?;
    let job = &evidence.job.body;
    check_served_file(&path, &job.model_digest)?;
    let format = evidence_format(&job.format)?;
    let shards = [load_whole(&path, format, None)?];
    let v = validate(&shards, &job.claim, &Tolerances::default())
        .context("the claimed answer cannot be recomputed")?;
    match v.verdict {
        Verdict::Pass => bail!(
            "the signatures hold, but recomputing the answer here passes it: the evidence does not show {} lied",
            proven.generator
        ),
        Verdict::Fail { token, reason } => {
            println!("evidence holds: {} signed an answer that fails validation", proven.generator);
            println!("  recomputed here: token {token}: {reason}");
            print_votes(&proven);
            Ok(())
        }
    }
}

/// `veil verify-evidence` on a chain hop: replays the inputs the hop was sent through the same
/// blocks of the model and confirms its signed outputs differ.
fn verify_hop_evidence(file: &std::path::Path, bytes: &[u8], path: &std::path::Path) -> Result<()> {
    let evidence = Evidence::<HopJob>::from_bytes(bytes)
        .with_context(|| format!("{} is not valid evidence", file.display()))?;
    let proven = evidence
        .check()
        .with_context(|| format!("{} does not check", file.display()))?;
    let job = &evidence.job.body;
    if evidence.inputs.is_empty() {
        bail!(
            "the signatures in {} hold, but it carries none of the inputs hop {} was sent \
             (evidence written before Veil kept them), so its work cannot be replayed here",
            file.display(),
            proven.generator
        );
    }
    check_served_file(path, &job.model_digest)?;
    let format = evidence_format(&job.format)?;
    let mut gguf = GgufFile::open(path)?;
    let blocks = LlamaConfig::from_gguf(&gguf)?.block_count;
    let shard = Shard::span(job.first_block..job.end_block, blocks)
        .context("the evidence names blocks this model does not have")?;
    let model = ShardModel::load(&mut gguf, &shard, format)?;
    match veil_verify::judge_hop(&model, job, &evidence.inputs)
        .context("the hop cannot be replayed")?
    {
        Verdict::Pass => bail!(
            "the signatures hold, but replaying the hop here passes it: the evidence does not show {} lied",
            proven.generator
        ),
        Verdict::Fail { reason, .. } => {
            println!(
                "evidence holds: {} (blocks {}-{}) signed for outputs its blocks do not compute",
                proven.generator, job.first_block, job.end_block
            );
            println!("  replayed here: {reason}");
            print_votes(&proven);
            Ok(())
        }
    }
}

/// Checks `path` is the file whose digest the evidence names.
fn check_served_file(path: &std::path::Path, claimed: &str) -> Result<()> {
    let digest = veil_ee::model_digest(path)?;
    if digest != claimed {
        bail!(
            "the evidence is about the model file with digest {claimed}, but {} has digest {digest}: \
             pass that file with --model (for an encrypted model, the encrypted GGUF the nodes \
             served, from `veil ee encrypt`: the plaintext model and the key do not reproduce it)",
            path.display()
        );
    }
    Ok(())
}

fn evidence_format(format: &str) -> Result<WeightFormat> {
    format
        .parse()
        .with_context(|| format!("the evidence names an unknown format {format:?}"))
}

fn print_votes(proven: &veil_verify::Proven) {
    for (peer, verdict) in &proven.failed {
        println!("  failed by {peer}: {verdict}");
    }
    for peer in &proven.passed {
        println!("  passed by {peer}");
    }
}
