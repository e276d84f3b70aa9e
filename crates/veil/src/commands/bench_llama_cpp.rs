//! `veil bench --llama-cpp`: Veil's kernels, candle's kernels and llama.cpp on the same GGUF
//! files, the same prompt and the same threads, runs alternating, medians and ratios printed.
//!
//! llama.cpp runs through `llama-cpp-python`, installed once into `$VEIL_HOME` (it builds
//! llama.cpp from source for this CPU). Q8_0 and F32 copies of the model are written next to
//! it once, so all three engines read identical bytes for every format.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, ensure, Context, Result};
use candle_core::quantized::GgmlDType;
use serde::{Deserialize, Serialize};
use veil_model::{ChatMessage, Kernels, LocalModel, TokenStep, WeightFormat};

use crate::commands::bench::{measure, median, BenchArgs};
use crate::progress;

/// The llama-cpp-python release the benchmark installs (the one the tokenizer fixtures were
/// checked against).
const LLAMA_CPP_PYTHON: &str = "llama-cpp-python==0.3.36";

/// Build flags when `CMAKE_ARGS` is not set: tuned for this CPU, with AMX off (some hosts
/// report AMX but forbid its tiles, and llama.cpp then dies with SIGILL).
const DEFAULT_CMAKE_ARGS: &str =
    "-DGGML_NATIVE=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF";

/// The timing script, run by the venv's Python.
const SCRIPT: &str = include_str!("llama_cpp_bench.py");

/// Medians of one engine on one file.
#[derive(Debug, Serialize)]
struct EngineFigures {
    engine: &'static str,
    prefill_tokens_per_second: f64,
    decode_tokens_per_second: f64,
    /// Prefill speed over llama.cpp's on the same file.
    prefill_ratio: f64,
    /// Decode speed over llama.cpp's on the same file.
    decode_ratio: f64,
    /// How many of the greedy tokens (from the first) equal llama.cpp's.
    greedy_tokens_agreeing: usize,
}

/// One format's row group.
#[derive(Debug, Serialize)]
struct FormatFigures {
    format: String,
    file: String,
    engines: Vec<EngineFigures>,
}

/// One run of the llama.cpp script.
#[derive(Debug, Deserialize)]
struct LlamaRun {
    prefill_tokens_per_second: f64,
    decode_tokens_per_second: f64,
    tokens: Vec<u32>,
}

/// Runs `veil bench --llama-cpp`.
pub fn run(args: &BenchArgs) -> Result<()> {
    let threads = args.model.threads.map_or_else(
        || std::thread::available_parallelism().map_or(1, |n| n.get()),
        usize::from,
    );
    // Both Veil's and candle's pools size themselves from this when first used.
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    let base = args.model.resolve_path()?;
    let home = veil_model::ModelStore::from_env().home().to_path_buf();
    let python = llama_cpp_python(&home)?;
    let script = home.join("llama-cpp-python").join("veil_bench.py");
    std::fs::write(&script, SCRIPT)
        .with_context(|| format!("cannot write {}", script.display()))?;

    let mut groups = Vec::new();
    for (label, dtype) in [
        ("q4_1", None),
        ("q8_0", Some(GgmlDType::Q8_0)),
        ("f32", Some(GgmlDType::F32)),
    ] {
        let file = match dtype {
            None => base.clone(),
            Some(dtype) => converted(&base, &home, label, dtype)?,
        };
        let load = |kernels| {
            let spinner = progress::spinner(format!("loading {} ({kernels})", file.display()));
            let model = LocalModel::load_with(&file, WeightFormat::AsStored, &[], kernels);
            spinner.finish_and_clear();
            model.with_context(|| format!("cannot load {}", file.display()))
        };
        let veil = load(Kernels::default())?;
        let candle = load(Kernels::Candle)?;
        let prompt = veil.chat_prompt(&[ChatMessage::user(args.prompt.clone())])?;
        ensure!(
            prompt.len() + args.tokens <= veil.config.context_length,
            "prompt and --tokens exceed the context of {} tokens",
            veil.config.context_length
        );
        let request = serde_json::json!({
            "model": file,
            "prompt": prompt,
            "tokens": args.tokens,
            "threads": threads,
            "context": prompt.len() + args.tokens + 1,
        })
        .to_string();

        // One untimed prefill each, so no engine's first timed run pays for cold caches
        // (the llama.cpp script does the same in its process).
        for model in [&veil, &candle] {
            model.session().step(&prompt)?;
        }
        let mut samples: [Vec<(f64, f64)>; 3] = Default::default();
        let mut tokens: [Vec<u32>; 3] = Default::default();
        let bar = progress::bar(
            args.runs as u64,
            &format!("{label}: veil, candle, llama.cpp"),
        );
        for _ in 0..args.runs {
            for (i, model) in [&veil, &candle].into_iter().enumerate() {
                let (p, d, t) = measure(&mut model.session(), &prompt, args.tokens)?;
                samples[i].push((p, d));
                tokens[i] = t;
            }
            let run = run_llama_cpp(&python, &script, &request)?;
            samples[2].push((run.prefill_tokens_per_second, run.decode_tokens_per_second));
            tokens[2] = run.tokens;
            bar.inc(1);
        }
        bar.finish_and_clear();

        let medians: Vec<(f64, f64)> = samples
            .iter()
            .map(|s| {
                let (mut p, mut d): (Vec<f64>, Vec<f64>) = s.iter().copied().unzip();
                (median(&mut p), median(&mut d))
            })
            .collect();
        let (llama_p, llama_d) = medians[2];
        let engines = ["veil", "candle", "llama.cpp"]
            .into_iter()
            .zip(&medians)
            .zip(&tokens)
            .map(|((engine, &(p, d)), t)| EngineFigures {
                engine,
                prefill_tokens_per_second: p,
                decode_tokens_per_second: d,
                prefill_ratio: p / llama_p,
                decode_ratio: d / llama_d,
                greedy_tokens_agreeing: t
                    .iter()
                    .zip(&tokens[2])
                    .take_while(|(a, b)| a == b)
                    .count(),
            })
            .collect();
        groups.push(FormatFigures {
            format: label.to_string(),
            file: file.display().to_string(),
            engines,
        });
    }

    if args.json {
        println!("{}", serde_json::to_string_pretty(&groups)?);
        return Ok(());
    }
    println!(
        "{threads} threads, {} runs alternating (medians), {} greedy tokens after the prompt",
        args.runs, args.tokens
    );
    println!(
        "{:<6} {:<10} {:>14} {:>8} {:>13} {:>8} {:>14}",
        "format", "engine", "prefill tok/s", "vs llama", "decode tok/s", "vs llama", "same tokens"
    );
    for group in &groups {
        for e in &group.engines {
            println!(
                "{:<6} {:<10} {:>14.1} {:>7.2}x {:>13.1} {:>7.2}x {:>10}/{}",
                group.format,
                e.engine,
                e.prefill_tokens_per_second,
                e.prefill_ratio,
                e.decode_tokens_per_second,
                e.decode_ratio,
                e.greedy_tokens_agreeing,
                args.tokens
            );
        }
    }
    Ok(())
}

/// The model converted to `dtype`, written next to the cache once.
fn converted(base: &Path, home: &Path, label: &str, dtype: GgmlDType) -> Result<PathBuf> {
    let stem = base
        .file_stem()
        .map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned());
    let dir = home.join("bench");
    let out = dir.join(format!("{stem}.as-{label}.gguf"));
    if !out.exists() {
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let spinner = progress::spinner(format!("writing a {label} copy to {}", out.display()));
        let written = veil_model::write_converted(base, dtype, &out);
        spinner.finish_and_clear();
        written.with_context(|| format!("cannot write {}", out.display()))?;
    }
    Ok(out)
}

/// The Python of a venv under `home` that imports `llama_cpp`, installing it the first time.
fn llama_cpp_python(home: &Path) -> Result<PathBuf> {
    let cmake_args = std::env::var("CMAKE_ARGS").unwrap_or_else(|_| DEFAULT_CMAKE_ARGS.to_string());
    crate::commands::python_venv::venv_python(
        home,
        &crate::commands::python_venv::VenvSpec {
            name: "llama-cpp-python",
            packages: &[LLAMA_CPP_PYTHON, "numpy"],
            imports: "llama_cpp, numpy",
            env: vec![("CMAKE_ARGS", cmake_args)],
            note: "builds llama.cpp for this CPU: about 25 minutes on 2 cores, once; set CMAKE_ARGS to change the build",
        },
    )
}

/// One timed run of llama.cpp in a fresh process.
fn run_llama_cpp(python: &Path, script: &Path, request: &str) -> Result<LlamaRun> {
    let output = Command::new(python)
        .arg(script)
        .arg(request)
        .stdin(Stdio::null())
        .output()
        .context("cannot run the llama.cpp benchmark script")?;
    if !output.status.success() {
        bail!(
            "the llama.cpp run failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).with_context(|| format!("unexpected llama.cpp output {line:?}"))
}
