//! `veil bench --gateway`: what the gateway costs. The same greedy answer is generated directly
//! and through the gateway's HTTP API on loopback, alternating, in one run; then 1, 4 and 16
//! concurrent streamed requests of `--tokens` tokens report time to first token and aggregate
//! tokens/s.

use std::io::{BufRead, BufReader};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use veil_model::{generate, ChatMessage, GenerationParams};

use crate::commands::bench_args::BenchArgs;
use crate::commands::measure::median;
use veil_serve::backend::Batching;
use veil_serve::gateway::openai::VeilInfo;
use veil_serve::gateway::{Gateway, Limits, Serving};

/// The prompt of every measured request: one that makes the model write at length.
const PROMPT: &str = "Write a long story about a lighthouse keeper and the sea.";

/// Concurrency levels measured.
const CONCURRENCY: [usize; 3] = [1, 4, 16];

/// Runs `veil bench --gateway`.
pub fn run(args: &BenchArgs) -> Result<()> {
    let direct = args.model.load()?;
    let served = args.model.load()?;
    let batch = args.batch.first().copied().unwrap_or(Batching::Off);
    // No selector unless MetaInf chooses the batching: the gateway runs the plain method, as
    // the direct path does, so the ratio is the gateway's overhead alone.
    let selector = match batch {
        Batching::Auto(_) => {
            let path = args.model.resolve_path()?;
            let selector = crate::commands::meta::load_selector()?;
            Some((selector, veil_serve::accel::model_features(&served, &path)))
        }
        _ => None,
    };
    let model_id = "bench".to_string();
    let info = VeilInfo {
        mode: "local",
        format: args.model.dtype.to_string(),
        kernels: args.model.kernels.to_string(),
        tokens_per_second: 0.0,
        verification: "none".into(),
        accel: "plain".into(),
        privacy: "plain",
    };
    let limits = Limits {
        max_concurrent: 1,
        max_queued: 64,
        max_body_bytes: 1 << 20,
        max_tokens: args.tokens.max(64),
        batch,
    };
    let gateway = Arc::new(Gateway::new(
        Arc::new(served),
        Serving::Local { selector },
        model_id.clone(),
        info,
        limits,
    ));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let base = format!("http://{}", listener.local_addr()?);
    runtime.spawn(async move {
        axum::serve(
            listener,
            gateway.router(Arc::new(veil_serve::gateway::access::Access::default())),
        )
        .await
    });
    let client = reqwest::blocking::Client::builder()
        .timeout(None)
        .build()
        .context("cannot make an HTTP client")?;

    let prompt = direct.chat_prompt(&[ChatMessage::user(PROMPT)])?;
    let params = GenerationParams {
        max_tokens: args.tokens,
        ..GenerationParams::default()
    };
    let request = json!({
        "model": model_id,
        "messages": [{"role": "user", "content": PROMPT}],
        "temperature": 0,
        "max_tokens": args.tokens,
    });
    let (mut direct_speed, mut gateway_speed) = (Vec::new(), Vec::new());
    for _ in 0..args.runs {
        let started = Instant::now();
        let c = generate(
            &mut direct.session(),
            &direct.tokenizer,
            &prompt,
            direct.config.context_length,
            &params,
            &mut |_| {},
        )?;
        direct_speed.push(c.tokens.len() as f64 / started.elapsed().as_secs_f64());

        let started = Instant::now();
        let reply: Value = client
            .post(format!("{base}/v1/chat/completions"))
            .json(&request)
            .send()?
            .error_for_status()?
            .json()?;
        let tokens = reply["usage"]["completion_tokens"].as_u64().unwrap_or(0);
        ensure!(
            tokens == c.tokens.len() as u64,
            "the gateway generated {tokens} tokens, the direct run {}",
            c.tokens.len()
        );
        gateway_speed.push(tokens as f64 / started.elapsed().as_secs_f64());
    }
    let (d, g) = (median(&mut direct_speed), median(&mut gateway_speed));
    println!(
        "{} greedy tokens, prompt of {} tokens, {} runs alternating (medians)",
        args.tokens,
        prompt.len(),
        args.runs
    );
    println!("direct     {d:>7.1} tok/s (request to last token)");
    println!("gateway    {g:>7.1} tok/s (HTTP on loopback, non-streamed)");
    println!("ratio      {:>7.3}", g / d);

    let tokens = args.tokens;
    match batch {
        Batching::Off => println!(
            "concurrent streamed requests ({tokens} tokens each, one generation at a time, the rest queued):"
        ),
        Batching::Always(n) => println!(
            "concurrent streamed requests ({tokens} tokens each, continuous batching of {n}, the rest queued):"
        ),
        Batching::Auto(n) => println!(
            "concurrent streamed requests ({tokens} tokens each, MetaInf choosing per request between a batch of {n} and one at a time):"
        ),
    }
    println!(
        "{:>3} {:>16} {:>16} {:>18}",
        "N", "TTFT median ms", "TTFT max ms", "aggregate tok/s"
    );
    for n in CONCURRENCY {
        let started = Instant::now();
        let results: Vec<Result<(Duration, usize)>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..n)
                .map(|_| scope.spawn(|| stream_one(&client, &base, &model_id, tokens)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| bail!("a client thread panicked"))
                })
                .collect()
        });
        let wall = started.elapsed().as_secs_f64();
        let results = results.into_iter().collect::<Result<Vec<_>>>()?;
        let mut ttft: Vec<f64> = results
            .iter()
            .map(|(t, _)| t.as_secs_f64() * 1000.0)
            .collect();
        let tokens: usize = results.iter().map(|(_, n)| n).sum();
        let max = ttft.iter().copied().fold(0.0, f64::max);
        println!(
            "{n:>3} {:>16.0} {max:>16.0} {:>18.1}",
            median(&mut ttft),
            tokens as f64 / wall
        );
    }
    Ok(())
}

/// One streamed request of `max_tokens` tokens: time to its first text, and the tokens it got.
fn stream_one(
    client: &reqwest::blocking::Client,
    base: &str,
    model: &str,
    max_tokens: usize,
) -> Result<(Duration, usize)> {
    let started = Instant::now();
    let response = client
        .post(format!("{base}/v1/chat/completions"))
        .json(&json!({
            "model": model,
            "messages": [{"role": "user", "content": PROMPT}],
            "temperature": 0,
            "max_tokens": max_tokens,
            "stream": true,
        }))
        .send()?
        .error_for_status()?;
    let mut first = None;
    let mut tokens = 0;
    for line in BufReader::new(response).lines() {
        let line = line?;
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let chunk: Value = serde_json::from_str(data)?;
        let text = chunk["choices"][0]["delta"]["content"]
            .as_str()
            .unwrap_or("");
        if first.is_none() && !text.is_empty() {
            first = Some(started.elapsed());
        }
        if let Some(n) = chunk["usage"]["completion_tokens"].as_u64() {
            tokens = n as usize;
        }
    }
    Ok((first.context("the stream held no text")?, tokens))
}
