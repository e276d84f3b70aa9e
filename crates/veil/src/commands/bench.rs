//! `veil bench`: prefill and decode speed and peak memory of the model on this machine.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use clap::builder::ArgPredicate;
use clap::Args;
use serde::Serialize;
use veil_model::{sampling::argmax, ChatMessage, TokenStep};

use crate::args::ModelArgs;

/// Arguments of `veil bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// How many times to run (default 3; 5 with --llama-cpp); the report gives medians.
    #[arg(
        long,
        default_value_t = 3,
        default_value_if("llama_cpp", ArgPredicate::IsPresent, "5")
    )]
    pub runs: usize,

    /// Tokens to decode in each run (greedy, past any end token).
    #[arg(long, default_value_t = 128)]
    pub tokens: usize,

    /// The prompt, rendered with the chat template.
    #[arg(long, default_value = "What is the capital of France?")]
    pub prompt: String,

    /// Also run this encrypted model (from `veil ee encrypt`) in the same run, alternating with
    /// the plaintext model, and report the speed ratio.
    #[arg(long, value_name = "PATH", requires = "key")]
    pub encrypted: Option<PathBuf>,

    /// The key the encrypted model was made with.
    #[arg(long, value_name = "PATH", requires = "encrypted")]
    pub key: Option<PathBuf>,

    /// Measure against llama.cpp's own `llama-bench` on the same GGUF files (--file, default:
    /// the model as stored and a Q8_0 copy), same prompt length, tokens and threads, each run a
    /// fresh process, Veil and llama.cpp alternating; prints speeds, peak memory and ratios.
    /// llama.cpp's tools come from $VEIL_LLAMA_CPP (a bin dir) or are built once by
    /// shared/tools/build_llamacpp.sh. Ignores --model, --dtype and --layers.
    #[arg(long, conflicts_with = "encrypted")]
    pub llama_cpp: bool,

    /// With --llama-cpp: a GGUF file to measure, a path or a known model's name; repeat for
    /// more.
    #[arg(long = "file", value_name = "NAME|PATH", requires = "llama_cpp")]
    pub files: Vec<String>,

    /// With --llama-cpp: also measure a copy of each file quantized to this type by
    /// `llama-quantize --allow-requantize` (e.g. Q4_K_M, Q8_0), written once under
    /// $VEIL_HOME/bench; repeat for more.
    #[arg(long, value_name = "TYPE", requires = "llama_cpp")]
    pub quantize: Vec<String>,

    /// With --llama-cpp: the Veil side of one run, in its own process (used by the benchmark).
    #[arg(long, hide = true, requires = "llama_cpp")]
    pub veil_worker: bool,

    /// Measure the gateway instead: tokens/s through its HTTP API against generating directly
    /// (alternating, same answer), then time to first token and aggregate tokens/s for 1, 4 and
    /// 16 concurrent streamed requests.
    #[arg(long, conflicts_with_all = ["encrypted", "llama_cpp"])]
    pub gateway: bool,

    /// Measure the gateway against llama.cpp's llama-server instead, side by side: the official
    /// openai client (AsyncOpenAI) sends 1, 4 and 16 concurrent streamed requests to each (same
    /// file, same threads; llama-server with -np 4 and -np 16).
    #[arg(long, conflicts_with_all = ["encrypted", "llama_cpp", "gateway"])]
    pub serving: bool,

    /// With --serving: each concurrent request asks about its own subject, instead of all
    /// asking for the same story (prompts then share only the chat template and first words).
    #[arg(long, requires = "serving")]
    pub distinct_prompts: bool,

    /// With --serving: serve through a swarm instead, a gateway (`--max-concurrent 16`) over a
    /// chain of three `veil node` processes on loopback, one thread each; prints aggregate
    /// tokens/s at 1, 4 and 16 concurrent requests and the ratio of 16 to 1.
    #[arg(long, requires = "serving")]
    pub swarm: bool,

    /// With --gateway or --serving: requests decoding together in the gateway's continuous
    /// batching engine (1: one generation at a time).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub batch: u16,

    /// Measure MetaInf instead: a mixed workload (short and long prompts, shared prefixes,
    /// single and batched requests) with `--accel auto` against the default fixed
    /// configuration, alternating, and print the throughput ratio.
    #[arg(long, conflicts_with_all = ["encrypted", "llama_cpp", "gateway"])]
    pub meta: bool,

    /// Run the soak instead: a gateway and four nodes (real processes on loopback) serve
    /// streamed clients for --soak-minutes, then as long again while a rogue peer and client run
    /// every attack of docs/SECURITY.md; prints honest throughput with and without the rogue,
    /// requests lost, what the rogue got, peak memory and sessions left open.
    #[arg(long, conflicts_with_all = ["encrypted", "llama_cpp", "gateway", "meta"])]
    pub soak: bool,

    /// With --soak: minutes of each half (without, then with the rogue).
    #[arg(long, default_value_t = 10.0, requires = "soak")]
    pub soak_minutes: f64,

    /// With --soak: honest clients streaming at once.
    #[arg(long, default_value_t = 64, requires = "soak")]
    pub soak_clients: usize,

    /// With --soak: milliseconds the rogue waits between rounds of attacks.
    #[arg(long, default_value_t = 250, requires = "soak")]
    pub soak_pause_ms: u64,

    /// Measure a three-hop chain across real NATs instead (network namespaces; root only): decode
    /// tokens/s direct, relayed and hole-punched, alternating; the relay's bytes per generated
    /// token; and a NATed node's time from start to its first served request.
    #[arg(long, conflicts_with_all = ["encrypted", "llama_cpp", "gateway", "meta", "soak", "serving"])]
    pub nat: bool,

    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub model: ModelArgs,
}

/// What `veil bench` measured.
#[derive(Debug, Serialize)]
struct BenchReport {
    model: String,
    format: String,
    threads: usize,
    runs: usize,
    prompt_tokens: usize,
    decode_tokens: usize,
    load_seconds: f64,
    prefill_tokens_per_second: f64,
    decode_tokens_per_second: f64,
    peak_memory_bytes: Option<u64>,
    /// Present with `--encrypted`: the encrypted model's medians, measured alternately.
    encrypted: Option<EncryptedReport>,
}

/// The encrypted model beside the plaintext one.
#[derive(Debug, Serialize)]
struct EncryptedReport {
    prefill_tokens_per_second: f64,
    decode_tokens_per_second: f64,
    /// Encrypted decode speed over plaintext decode speed.
    decode_ratio: f64,
}

/// Times one prefill of `prompt` and `tokens` greedy decode steps; returns tokens/s for each
/// and the tokens decoded.
pub(crate) fn measure(
    session: &mut dyn TokenStep,
    prompt: &[u32],
    tokens: usize,
) -> Result<(f64, f64, Vec<u32>)> {
    let t0 = Instant::now();
    let mut logits = session.step(prompt)?;
    let t1 = Instant::now();
    let mut decoded = Vec::with_capacity(tokens);
    for _ in 0..tokens {
        decoded.push(argmax(&logits));
        logits = session.step(&decoded[decoded.len() - 1..])?;
    }
    let t2 = Instant::now();
    Ok((
        prompt.len() as f64 / secs(t1 - t0),
        tokens as f64 / secs(t2 - t1),
        decoded,
    ))
}

/// Runs `veil bench`.
pub fn run(args: BenchArgs) -> Result<()> {
    ensure!(args.runs >= 1, "--runs must be at least 1");
    ensure!(args.tokens >= 1, "--tokens must be at least 1");
    if args.llama_cpp {
        return crate::commands::bench_llama_cpp::run(&args);
    }
    if args.gateway {
        return crate::commands::bench_gateway::run(&args);
    }
    if args.meta {
        return crate::commands::bench_meta::run(&args);
    }
    if args.soak {
        return crate::commands::bench_soak::run(&args);
    }
    if args.serving {
        return crate::commands::bench_serving::run(&args);
    }
    if args.nat {
        return crate::commands::bench_nat::run(&args);
    }
    let path = args.model.resolve_path()?;
    let started = Instant::now();
    let model = args.model.load()?;
    let load_seconds = started.elapsed().as_secs_f64();
    let prompt = model.prompt(&[ChatMessage::user(args.prompt.clone())])?;
    ensure!(
        prompt.len() + args.tokens <= model.config.context_length,
        "prompt and --tokens exceed the context of {} tokens",
        model.config.context_length
    );

    let encrypted = match (&args.encrypted, &args.key) {
        (Some(path), Some(key)) => {
            let key = crate::commands::ee::read_key(key)?;
            let shards = crate::commands::ee::load_encrypted(path, &key, &args.model)?;
            Some((key, shards))
        }
        _ => None,
    };
    let (mut prefill, mut decode) = (Vec::new(), Vec::new());
    let (mut enc_prefill, mut enc_decode) = (Vec::new(), Vec::new());
    for run in 0..args.runs {
        let (p, d, _) = measure(&mut model.session(), &prompt, args.tokens)?;
        prefill.push(p);
        decode.push(d);
        tracing::info!(run, prefill = p, decode = d, "bench run");
        if let Some((key, shards)) = &encrypted {
            let (p, d, _) = measure(
                &mut veil_ee::EncryptedSession::new(key, shards),
                &prompt,
                args.tokens,
            )?;
            enc_prefill.push(p);
            enc_decode.push(d);
            tracing::info!(run, prefill = p, decode = d, "bench run, encrypted");
        }
    }
    let decode_median = median(&mut decode);
    let encrypted = encrypted.map(|_| {
        let enc_decode_median = median(&mut enc_decode);
        EncryptedReport {
            prefill_tokens_per_second: median(&mut enc_prefill),
            decode_tokens_per_second: enc_decode_median,
            decode_ratio: enc_decode_median / decode_median,
        }
    });

    let report = BenchReport {
        model: path.display().to_string(),
        format: args.model.dtype.to_string(),
        threads: candle_core::utils::get_num_threads(),
        runs: args.runs,
        prompt_tokens: prompt.len(),
        decode_tokens: args.tokens,
        load_seconds,
        prefill_tokens_per_second: median(&mut prefill),
        decode_tokens_per_second: decode_median,
        peak_memory_bytes: peak_memory(),
        encrypted,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("model      {} ({})", report.model, report.format);
        println!("threads    {}", report.threads);
        println!("load       {:.2} s", report.load_seconds);
        println!(
            "prefill    {:.1} tok/s  ({} tokens, median of {})",
            report.prefill_tokens_per_second, report.prompt_tokens, report.runs
        );
        println!(
            "decode     {:.1} tok/s  ({} tokens, median of {})",
            report.decode_tokens_per_second, report.decode_tokens, report.runs
        );
        if let Some(enc) = &report.encrypted {
            println!(
                "encrypted  prefill {:.1} tok/s, decode {:.1} tok/s: {:.3}x plaintext decode",
                enc.prefill_tokens_per_second, enc.decode_tokens_per_second, enc.decode_ratio
            );
        }
        match report.peak_memory_bytes {
            Some(b) => println!("peak RSS   {:.0} MiB", b as f64 / (1024.0 * 1024.0)),
            None => println!("peak RSS   unknown on this platform"),
        }
    }
    Ok(())
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64().max(1e-9)
}

/// The median of some measurements (the mean of the middle two for an even count).
pub(crate) fn median(xs: &mut [f64]) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

/// The process's peak resident set size, from `/proc/self/status` (Linux only).
pub(crate) fn peak_memory() -> Option<u64> {
    peak_memory_of("self")
}

/// Process `pid`'s peak resident set size (`self` for this one), from `/proc` (Linux only).
pub(crate) fn peak_memory_of(pid: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
