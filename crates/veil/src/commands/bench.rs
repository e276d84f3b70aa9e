//! `veil bench`: prefill and decode speed and peak memory of the model on this machine.

use std::time::Instant;

use anyhow::{ensure, Result};
use serde::Serialize;
use veil_model::ChatMessage;

use crate::commands::bench_args::BenchArgs;
use crate::commands::measure::{measure, median, peak_memory};

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
