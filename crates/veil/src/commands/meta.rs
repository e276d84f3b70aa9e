//! `veil meta`: measure acceleration methods on this machine, train the selector, evaluate it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use veil_meta::{
    cases, evaluate, method, parse_jsonl, read_jsonl, write_jsonl, Chooser, Features, HeldOut,
    Learner, MetaError, RecordStore, RunRecord, SelectionRules, Selector, METHODS,
};
use veil_model::{LocalModel, ModelStore};

use crate::args::ModelArgs;
use crate::progress;
use veil_serve::accel::{
    build_workload, features_of, format_of, hardware_features, model_features, perplexity,
    run_workload, PromptSize, Workload, HELD_OUT,
};

/// The dataset collected on the development machine and committed with the code: what the
/// selector trains on when no other data is given.
pub const COMMITTED_DATASET: &str = include_str!("../../../../datasets/meta/runs.jsonl");

/// `veil meta` subcommands.
#[derive(Subcommand, Debug)]
pub enum MetaCommand {
    /// List the acceleration methods.
    Methods,
    /// Sweep workloads × methods on this machine, record every run, export the dataset.
    Collect(CollectArgs),
    /// Fit the selector on a dataset and keep the dataset for `--accel auto` (the selector is
    /// refitted from it at start, in milliseconds).
    Train(DataArgs),
    /// Selection accuracy and regret of the selector and the baselines, on held-out workloads
    /// and held-out models.
    Eval(DataArgs),
    /// Show which method the selector picks for a workload, and its predicted costs.
    Choose(ChooseArgs),
    /// Write a history's records (a node's `--state`, or `collect`'s `--history`) as a dataset
    /// that `train` and `eval` read with `--data`.
    Export(ExportArgs),
}

/// Arguments of `veil meta export`.
#[derive(Args, Debug)]
pub struct ExportArgs {
    /// The database holding the records (a stopped node's `--state`, or `meta.redb`).
    #[arg(long)]
    pub history: PathBuf,
    /// Where to write the records (JSON lines).
    #[arg(long)]
    pub out: PathBuf,
}

/// Arguments of `veil meta collect`.
#[derive(Args, Debug)]
pub struct CollectArgs {
    /// Where to write the dataset (JSON lines).
    #[arg(long, default_value = "datasets/meta/runs.jsonl")]
    pub out: PathBuf,
    /// The node's performance history, where every run is also recorded
    /// (default: $VEIL_HOME/meta.redb).
    #[arg(long)]
    pub history: Option<PathBuf>,
    /// What an hour of this machine costs (the cost model's price).
    #[arg(long, default_value_t = 1.0)]
    pub price: f64,
    /// A small sweep (two workloads, three methods, a few tokens): to check the machinery.
    #[arg(long)]
    pub quick: bool,
    /// Times to run each workload with each method (the dataset keeps every run; cases use
    /// the median).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10))]
    pub runs: u32,
    /// Only the grid's workloads of these batch sizes (1, 2, 4 and 16: requests arriving
    /// together; 16 has short and medium prompts only), e.g. `--batches 16` to add them to a
    /// dataset collected before.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,16", value_parser = grid_batch)]
    pub batches: Vec<usize>,
    /// Only these methods (`veil meta methods`); default: every one.
    #[arg(long, value_delimiter = ',')]
    pub methods: Vec<String>,
    #[command(flatten)]
    pub model: ModelArgs,
}

/// A batch size of the collection grid.
fn grid_batch(s: &str) -> Result<usize, String> {
    match s.parse() {
        Ok(n @ (1 | 2 | 4 | 16)) => Ok(n),
        _ => Err(format!("{s:?}: the grid's batch sizes are 1, 2, 4 and 16")),
    }
}

/// Where the data comes from.
#[derive(Args, Debug)]
pub struct DataArgs {
    /// A dataset (JSON lines from `veil meta collect`); default: the committed one.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Where `train` keeps the dataset (default: $VEIL_HOME/meta/dataset.jsonl, which
    /// `--accel auto` then prefers to the committed one).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// `eval`: also list the held-out cases Veil's selector got wrong.
    #[arg(long)]
    pub misses: bool,
}

/// A workload described by its features.
#[derive(Args, Debug)]
pub struct ChooseArgs {
    /// Prompt tokens per request.
    #[arg(long, default_value_t = 64)]
    pub prompt_tokens: u32,
    /// Tokens to generate per request.
    #[arg(long, default_value_t = 64)]
    pub output_tokens: u32,
    /// Requests arriving together.
    #[arg(long, default_value_t = 1)]
    pub batch: u32,
    /// Share of each prompt earlier requests already sent (0-1).
    #[arg(long, default_value_t = 0.0)]
    pub shared_prefix: f64,
    /// The answers rewrite text from the prompt.
    #[arg(long)]
    pub rewrite: bool,
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub model: ModelArgs,
}

/// Runs `veil meta`.
pub fn run(command: MetaCommand) -> Result<()> {
    match command {
        MetaCommand::Methods => {
            println!(
                "{:<15} {:<7} batch  prefix  chunk  lookup",
                "method", "format"
            );
            for m in METHODS {
                let flag = |b: bool| if b { "yes" } else { "-" };
                let n = |x: Option<usize>| x.map_or("-".to_string(), |v| v.to_string());
                println!(
                    "{:<15} {:<7} {:<6} {:<7} {:<6} {}",
                    m.name,
                    m.format,
                    flag(m.batch),
                    flag(m.prefix_cache),
                    n(m.prefill_chunk),
                    n(m.lookup_drafts)
                );
            }
            Ok(())
        }
        MetaCommand::Collect(args) => collect(args),
        MetaCommand::Train(args) => train(args),
        MetaCommand::Eval(args) => eval(args),
        MetaCommand::Choose(args) => choose(args),
        MetaCommand::Export(args) => export(args),
    }
}

/// The records of `--data`, or the committed dataset.
fn load_records(data: &DataArgs) -> Result<Vec<RunRecord>> {
    Ok(match &data.data {
        Some(path) => read_jsonl(path)?,
        None => parse_jsonl(COMMITTED_DATASET.as_bytes()).context("the committed dataset")?,
    })
}

/// Where `veil meta train` keeps the dataset `--accel auto` learns from.
pub fn trained_dataset_path() -> PathBuf {
    ModelStore::from_env()
        .home()
        .join("meta")
        .join("dataset.jsonl")
}

/// The selector `--accel auto` uses, fitted now on the dataset `veil meta train` kept, or on
/// the committed one.
pub fn load_selector() -> Result<Selector> {
    let path = trained_dataset_path();
    let records = if path.exists() {
        read_jsonl(&path)?
    } else {
        parse_jsonl(COMMITTED_DATASET.as_bytes())?
    };
    Ok(Selector::fit(&cases(&records, &SelectionRules::default()))?)
}

fn export(args: ExportArgs) -> Result<()> {
    if !args.history.is_file() {
        bail!("no history at {}", args.history.display());
    }
    let records = RecordStore::open(&args.history)
        .with_context(|| {
            format!(
                "opening {} (is its node still running?)",
                args.history.display()
            )
        })?
        .all()?;
    write_dataset(&args.out, &records)?;
    let nodes: std::collections::BTreeSet<&str> = records.iter().map(|r| r.node.as_str()).collect();
    println!(
        "wrote {} records from {} nodes to {}",
        records.len(),
        nodes.len(),
        args.out.display()
    );
    Ok(())
}

fn train(args: DataArgs) -> Result<()> {
    let records = load_records(&args)?;
    let all = cases(&records, &SelectionRules::default());
    let model = Selector::fit(&all)?;
    let out = args.out.clone().unwrap_or_else(trained_dataset_path);
    write_dataset(&out, &records)?;
    let hits = all
        .iter()
        .filter(|c| model.choose(&c.features) == c.best())
        .count();
    println!(
        "trained on {} records ({} cases); picks the fastest method on {hits} of them (training data)",
        records.len(),
        all.len()
    );
    println!("kept the dataset in {}", out.display());
    Ok(())
}

fn eval(args: DataArgs) -> Result<()> {
    let records = load_records(&args)?;
    let all = cases(&records, &SelectionRules::default());
    println!(
        "{} records, {} cases (workload × model × machine, every method measured)",
        records.len(),
        all.len()
    );
    let mut wins: BTreeMap<&str, usize> = BTreeMap::new();
    for c in &all {
        *wins.entry(c.best()).or_default() += 1;
    }
    println!("fastest method per case: {wins:?}");
    let rules = SelectionRules::default();
    println!(
        "fastest = the simplest method within {:.0}% of the cheapest (strict: the cheapest); quality budget: perplexity at most {:.2}× the model as stored",
        rules.tie_margin * 100.0,
        rules.max_perplexity_ratio
    );
    for held_out in [HeldOut::Workloads, HeldOut::Models] {
        println!();
        match evaluate(&all, held_out) {
            Ok(scores) => {
                println!("held-out {held_out:?} (leave one group out):");
                println!(
                    "  {:<32} {:>9} {:>7} {:>12}",
                    "selector", "accuracy", "strict", "mean regret"
                );
                for s in &scores {
                    println!(
                        "  {:<32} {:>9.3} {:>7.3} {:>11.1}%",
                        s.name,
                        s.accuracy,
                        s.strict_accuracy,
                        s.mean_regret * 100.0
                    );
                }
                let veil = scores.iter().find(|s| s.name == Learner::Vote.name());
                for miss in veil.filter(|_| args.misses).map_or(&[][..], |s| &s.misses) {
                    let w = &miss.workload;
                    println!(
                        "  missed: prompt {:>4}, output {:>3}, batch {}, shared {:.2}{}: fastest {}, picked {} (+{:.1}%)",
                        w.prompt_tokens,
                        w.output_tokens,
                        w.batch,
                        w.shared_prefix,
                        if w.rewrite { ", rewrite" } else { "" },
                        miss.best,
                        miss.pick,
                        miss.regret * 100.0
                    );
                }
            }
            Err(MetaError::NotEnoughData(why)) => {
                println!("held-out {held_out:?}: not measurable here ({why})");
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn choose(args: ChooseArgs) -> Result<()> {
    let selector = match &args.data.data {
        Some(_) => Selector::fit(&cases(
            &load_records(&args.data)?,
            &SelectionRules::default(),
        ))?,
        None => load_selector()?,
    };
    let path = args.model.resolve_path()?;
    let model = LocalModel::open_text(&path)?;
    let features = Features {
        model: model_features(&model, &path),
        hardware: hardware_features(1.0),
        workload: veil_meta::WorkloadFeatures {
            prompt_tokens: args.prompt_tokens.max(1),
            output_tokens: args.output_tokens.max(1),
            batch: args.batch.max(1),
            shared_prefix: args.shared_prefix.clamp(0.0, 1.0),
            rewrite: args.rewrite,
        },
    };
    features.check()?;
    let mut predicted = selector.predict(&features);
    predicted.sort_by(|a, b| a.1.total_cmp(&b.1));
    println!("choice: {}", selector.choose(&features));
    println!("the cost model's predictions:");
    for (m, cost) in predicted {
        println!("  {m:<15} {cost:.2}× plain's cost");
    }
    Ok(())
}

/// The sweep: every workload of the grid (or the quick one) with every method, for requests
/// arriving `batches` at a time.
fn workloads(model: &LocalModel, quick: bool, batches: &[usize]) -> Result<Vec<Workload>> {
    if quick {
        return Ok(vec![
            build_workload(model, PromptSize::Short, 4, 1, false, false)?,
            build_workload(model, PromptSize::Medium, 4, 2, true, true)?,
        ]);
    }
    let mut out = Vec::new();
    for size in [PromptSize::Short, PromptSize::Medium, PromptSize::Long] {
        for output in [16, 64] {
            for &batch in batches {
                for shared in [false, true] {
                    for rewrite in [false, true] {
                        // Sixteen at once: short and medium prompts, questions only (sixteen
                        // long prompts take a minute a method).
                        let many = batch >= 16;
                        if many && (size == PromptSize::Long || rewrite) {
                            continue;
                        }
                        // Fewer at once: a bare question has no text to share (sixteen share
                        // it: the same question from every user).
                        if size == PromptSize::Short && shared && !many {
                            continue;
                        }
                        out.push(build_workload(model, size, output, batch, shared, rewrite)?);
                    }
                }
            }
        }
    }
    Ok(out)
}

/// Each pass repeats a workload with a method until it has run this long...
const MIN_SECONDS: f64 = 1.0;
/// ...or this many times.
const MAX_REPEATS: usize = 6;

fn collect(args: CollectArgs) -> Result<()> {
    if !(args.price.is_finite() && args.price > 0.0) {
        bail!("--price must be a positive number");
    }
    let path = args.model.resolve_path()?;
    let history_path = args
        .history
        .clone()
        .unwrap_or_else(|| ModelStore::from_env().home().join("meta.redb"));
    let history = RecordStore::open(&history_path)?;
    let methods: Vec<_> = if !args.methods.is_empty() {
        args.methods
            .iter()
            .map(|m| method(m))
            .collect::<veil_meta::Result<_>>()?
    } else if args.quick {
        ["plain", "batch", "prefix+lookup"]
            .iter()
            .map(|m| method(m))
            .collect::<veil_meta::Result<_>>()?
    } else {
        METHODS.iter().collect()
    };
    // One model per weight format the methods use, loaded once, with its perplexity.
    let mut models: BTreeMap<&str, (LocalModel, f64)> = BTreeMap::new();
    for m in &methods {
        if models.contains_key(m.format) {
            continue;
        }
        let spinner = progress::spinner(format!("loading the model as {}", m.format));
        let model = LocalModel::load_with(&path, format_of(m)?, &[], args.model.kernels)
            .with_context(|| format!("cannot load {}", path.display()))?;
        let ppl = perplexity(&model, HELD_OUT)?;
        spinner.finish_and_clear();
        println!("{:<7} perplexity on held-out text {ppl:.3}", m.format);
        models.insert(m.format, (model, ppl));
    }
    let (reference, _) = &models[methods[0].format];
    let model_f = model_features(reference, &path);
    let hardware = hardware_features(args.price);
    let grid = workloads(reference, args.quick, &args.batches)?;
    println!(
        "{} workloads × up to {} methods × {} run(s) on {} ({:.0}M parameters), {} cores",
        grid.len(),
        methods.len(),
        args.runs,
        model_f.name,
        model_f.parameters_m,
        hardware.cores
    );
    // A method with an idle mechanism on a workload is the simpler method there: not run
    // twice.
    let runs_per_pass: usize = grid
        .iter()
        .map(|w| {
            let f = w.features();
            methods.iter().filter(|m| m.applies_to(&f)).count()
        })
        .sum();
    let bar = progress::bar(runs_per_pass as u64 * args.runs as u64, "measuring");
    let node = format!("{}-cores", hardware.cores);
    let mut collected = Vec::new();
    for workload in &grid {
        let features = features_of(&model_f, &hardware, workload.features());
        let applicable: Vec<_> = methods
            .iter()
            .copied()
            .filter(|m| m.applies_to(&features.workload))
            .collect();
        let mut records = Vec::new();
        for run in 0..args.runs {
            // Alternate the order so drift in the machine's speed spreads over methods.
            let ordered: Vec<_> = if run % 2 == 0 {
                applicable.clone()
            } else {
                applicable.iter().rev().copied().collect()
            };
            for m in ordered {
                bar.set_message(format!("{} — {}", workload.name, m.name));
                let (model, ppl) = &models[m.format];
                // A short workload is repeated until it has run for a while: one hiccup of the
                // machine would otherwise decide its median.
                let mut spent = 0.0;
                let mut samples = 0;
                while samples == 0 || (spent < MIN_SECONDS && samples < MAX_REPEATS) {
                    let measured = run_workload(model, m, workload)
                        .with_context(|| format!("{} with {}", workload.name, m.name))?;
                    spent += measured.seconds;
                    samples += 1;
                    records.push(RunRecord {
                        features: features.clone(),
                        method: m.name.to_string(),
                        seconds: measured.seconds,
                        tokens: measured.tokens.max(1),
                        latency_ms: measured.latency_ms.max(1e-3),
                        perplexity: *ppl,
                        node: node.clone(),
                        at_unix: SystemTime::now()
                            .duration_since(UNIX_EPOCH)
                            .map_or(0, |d| d.as_secs()),
                    });
                }
                bar.inc(1);
            }
        }
        // Recorded workload by workload, so an interrupted sweep keeps what it measured.
        history.append(&records)?;
        collected.extend(records);
    }
    bar.finish_and_clear();
    write_dataset(&args.out, &collected)?;
    let all = cases(&collected, &SelectionRules::default());
    println!(
        "{} runs recorded in {} and written to {}",
        collected.len(),
        history_path.display(),
        args.out.display()
    );
    for c in &all {
        println!(
            "  fastest: {:<15} prompt {:>4}, output {:>3}, batch {}, shared {:.2}{}",
            c.best(),
            c.features.workload.prompt_tokens,
            c.features.workload.output_tokens,
            c.features.workload.batch,
            c.features.workload.shared_prefix,
            if c.features.workload.rewrite {
                ", rewrite"
            } else {
                ""
            }
        );
    }
    Ok(())
}

fn write_dataset(path: &Path, records: &[RunRecord]) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    write_jsonl(path, records)?;
    Ok(())
}
