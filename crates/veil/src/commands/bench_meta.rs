//! `veil bench --meta`: a mixed workload (short and long prompts, shared prefixes, single and
//! batched requests) served with `--accel auto` against the default fixed configuration
//! (`plain`), alternating, in one run; prints the end-to-end throughput ratio.

use anyhow::{ensure, Result};
use serde::Serialize;
use veil_meta::default_method;

use crate::commands::bench_args::BenchArgs;
use crate::commands::measure::median;
use veil_serve::accel::{
    build_workload, features_of, hardware_features, model_features, pick_method, run_workload,
    PromptSize, Workload,
};

/// The mix: (prompt size, output tokens, requests at once, shared text, rewrite).
const MIX: [(PromptSize, usize, usize, bool, bool); 8] = [
    (PromptSize::Short, 64, 1, false, false),
    (PromptSize::Long, 48, 1, false, false),
    (PromptSize::Medium, 48, 4, false, false),
    (PromptSize::Long, 16, 4, true, false),
    (PromptSize::Medium, 48, 1, true, true),
    (PromptSize::Short, 32, 4, false, true),
    (PromptSize::Long, 48, 2, true, true),
    (PromptSize::Medium, 16, 1, false, false),
];

#[derive(Debug, Serialize)]
struct Row {
    workload: String,
    method: String,
    plain_seconds: f64,
    auto_seconds: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    runs: usize,
    rows: Vec<Row>,
    plain_tokens_per_second: f64,
    auto_tokens_per_second: f64,
    ratio: f64,
}

/// Runs the mixed-workload comparison.
pub fn run(args: &BenchArgs) -> Result<()> {
    let path = args.model.resolve_path()?;
    let model = args.model.load()?;
    let selector = crate::commands::meta::load_selector()?;
    let model_f = model_features(&model, &path);
    let hardware = hardware_features(1.0);
    let format = args.model.dtype.to_string();
    let mix: Vec<Workload> = MIX
        .iter()
        .map(|&(size, output, batch, shared, rewrite)| {
            build_workload(&model, size, output, batch, shared, rewrite)
        })
        .collect::<Result<_, _>>()?;
    let picks = mix
        .iter()
        .map(|w| {
            let features = features_of(&model_f, &hardware, w.features());
            pick_method("auto", Some(&selector), &features, Some(&format))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let plain = default_method();
    // Seconds per workload per run, and tokens (the same for both: the methods are exact).
    let mut plain_s = vec![Vec::new(); mix.len()];
    let mut auto_s = vec![Vec::new(); mix.len()];
    let mut tokens = vec![0u64; mix.len()];
    for run in 0..args.runs {
        for (i, (workload, pick)) in mix.iter().zip(&picks).enumerate() {
            // Alternate which goes first, so drift in the machine's speed is shared.
            let order = if (run + i) % 2 == 0 {
                [plain, pick.method]
            } else {
                [pick.method, plain]
            };
            let mut answers = Vec::new();
            for method in order {
                let measured = run_workload(&model, method, workload)?;
                let seconds = measured.seconds;
                if method.name == plain.name {
                    plain_s[i].push(seconds);
                }
                if method.name == pick.method.name {
                    auto_s[i].push(seconds);
                }
                tokens[i] = measured.tokens;
                answers.push(
                    measured
                        .completions
                        .into_iter()
                        .map(|c| c.tokens)
                        .collect::<Vec<_>>(),
                );
            }
            ensure!(
                answers[0] == answers[1],
                "{}: {} and plain gave different tokens",
                workload.name,
                pick.method.name
            );
        }
    }
    let total_tokens: u64 = tokens.iter().sum();
    let plain_total: f64 = plain_s.iter_mut().map(|s| median(s)).sum();
    let auto_total: f64 = auto_s.iter_mut().map(|s| median(s)).sum();
    let rows: Vec<Row> = mix
        .iter()
        .zip(&picks)
        .enumerate()
        .map(|(i, (w, p))| Row {
            workload: w.name.clone(),
            method: p.method.name.to_string(),
            plain_seconds: median(&mut plain_s[i]),
            auto_seconds: median(&mut auto_s[i]),
        })
        .collect();
    let report = Report {
        runs: args.runs,
        rows,
        plain_tokens_per_second: total_tokens as f64 / plain_total,
        auto_tokens_per_second: total_tokens as f64 / auto_total,
        ratio: plain_total / auto_total,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "{:<52} {:<14} {:>8} {:>8} {:>6}",
        "workload", "auto picks", "plain s", "auto s", "×"
    );
    for r in &report.rows {
        println!(
            "{:<52} {:<14} {:>8.2} {:>8.2} {:>6.2}",
            r.workload,
            r.method,
            r.plain_seconds,
            r.auto_seconds,
            r.plain_seconds / r.auto_seconds
        );
    }
    println!(
        "throughput: plain {:.1} tok/s, auto {:.1} tok/s (medians of {} runs, same tokens)",
        report.plain_tokens_per_second, report.auto_tokens_per_second, report.runs
    );
    println!("ratio {:.2}", report.ratio);
    Ok(())
}
