//! `veil bench --soak`: a gateway and four nodes, real processes on loopback, serve concurrent
//! streamed requests for a while without an attacker, then as long again while a rogue peer and
//! client run every attack of `docs/SECURITY.md` in a loop ([`super::soak_rogue`]). It reports
//! honest throughput in both halves and their ratio, every honest request lost, what the rogue
//! got, each process's peak memory, and the sessions each node still held when it stopped.

use std::io::{BufRead, BufReader, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};

use crate::commands::bench_args::BenchArgs;
use crate::commands::bench_process::{gateway_address, path_arg, start_node, Process};
use crate::commands::soak_rogue::{self, RogueTally, Targets};

/// The key honest clients (and the rogue, where it pretends to be one) send the gateway.
pub const API_KEY: &str = "soak-honest-client";

/// Tokens each honest request asks for.
const ANSWER_TOKENS: u64 = 32;

/// Seconds a node keeps an unused session: short, so the end of the run sees them freed.
const IDLE_TIMEOUT_SECS: u64 = 20;

/// What honest clients got in one half of the run.
#[derive(Debug, Default)]
struct Load {
    requests: usize,
    tokens: u64,
    seconds: f64,
    failures: Vec<String>,
}

impl Load {
    fn throughput(&self) -> f64 {
        self.tokens as f64 / self.seconds.max(1e-9)
    }
}

/// Runs `veil bench --soak`.
pub fn run(args: &BenchArgs) -> Result<()> {
    ensure!(args.soak_minutes > 0.0, "--soak-minutes must be positive");
    ensure!(args.soak_clients >= 1, "--soak-clients must be at least 1");
    let model = args.model.resolve_path()?;
    let dir = tempfile::tempdir()?;
    let keys = dir.path().join("api-keys");
    std::fs::write(&keys, format!("{API_KEY}\n"))?;

    let mut nodes = Vec::new();
    let mut addrs: Vec<String> = Vec::new();
    let idle_timeout = IDLE_TIMEOUT_SECS.to_string();
    for i in 0..4 {
        let (node, addr) = start_node(
            &format!("node {i}"),
            &model,
            &dir.path().join(format!("node{i}.redb")),
            addrs.first().map(String::as_str),
            &["--idle-timeout", &idle_timeout],
        )?;
        eprintln!("node {i} at {addr}");
        addrs.push(addr);
        nodes.push(node);
    }
    let gateway_args: Vec<String> = vec![
        "serve".into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--bootstrap".into(),
        addrs[0].clone(),
        "--max-queued".into(),
        args.soak_clients.to_string(),
        "--api-key-file".into(),
        path_arg(&keys),
        "--state".into(),
        path_arg(&dir.path().join("client.redb")),
        "--evidence-dir".into(),
        path_arg(&dir.path().join("evidence")),
    ];
    let (mut gateway, line) = Process::start("the gateway", &gateway_args)?;
    let base = gateway_address(&line)
        .with_context(|| format!("the gateway printed {line:?}"))?
        .to_string();
    let gateway_addr: std::net::SocketAddr = base.parse().context("the gateway's address")?;
    let base = format!("http://{base}");
    eprintln!("gateway at {base}");
    let client = reqwest::blocking::Client::builder()
        .timeout(None)
        .build()
        .context("cannot make an HTTP client")?;
    let models: Value = client
        .get(format!("{base}/v1/models"))
        .bearer_auth(API_KEY)
        .send()?
        .error_for_status()?
        .json()?;
    let model = models["data"][0]["id"]
        .as_str()
        .context("the gateway names no model")?
        .to_string();
    // A first request, so both halves start with the route formed and the model warm.
    stream_one(&client, &base, &model).context("the gateway answers no request")?;

    let half = Duration::from_secs_f64(args.soak_minutes * 60.0);
    eprintln!(
        "{} clients for {:.1} min without the rogue, then as long with it",
        args.soak_clients, args.soak_minutes
    );
    let calm = load(&client, (&base, &model), args.soak_clients, half);
    eprintln!(
        "without the rogue: {:.1} tok/s, {} requests, {} lost",
        calm.throughput(),
        calm.requests,
        calm.failures.len()
    );

    let stop = Arc::new(AtomicBool::new(false));
    let targets = Targets {
        nodes: addrs
            .iter()
            .map(|a| a.parse())
            .collect::<std::result::Result<_, _>>()
            .context("a node's address")?,
        gateway: base.clone(),
        gateway_addr,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let rogue = runtime.spawn(soak_rogue::run(
        targets,
        Arc::clone(&stop),
        Duration::from_millis(args.soak_pause_ms),
    ));
    let attacked = load(&client, (&base, &model), args.soak_clients, half);
    stop.store(true, Ordering::Relaxed);
    let tally: RogueTally = runtime.block_on(rogue).context("the rogue's task failed")?;
    eprintln!(
        "with the rogue: {:.1} tok/s, {} requests, {} lost",
        attacked.throughput(),
        attacked.requests,
        attacked.failures.len()
    );

    // Everything the rogue left open expires; then each process must still be running, and each
    // node must stop with no session open.
    std::thread::sleep(Duration::from_secs(IDLE_TIMEOUT_SECS + 5));
    let mut crashed = Vec::new();
    let mut peaks = Vec::new();
    for p in nodes.iter_mut().chain(std::iter::once(&mut gateway)) {
        if !p.alive() {
            crashed.push(format!("{} ({})", p.name, p.log_tail()));
        }
        peaks.push((p.name.clone(), p.peak_mib()));
    }
    let mut open = Vec::new();
    for node in &mut nodes {
        node.stop()?;
        let log = node.log.lock().map(|l| l.clone()).unwrap_or_default();
        let held = log
            .iter()
            .rev()
            .find_map(|l| l.split("shutting down with ").nth(1))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse::<usize>().ok());
        open.push((node.name.clone(), held));
    }

    report(args, &calm, &attacked, &tally, &peaks, &open, &crashed);
    if !crashed.is_empty()
        || !tally.breaches.is_empty()
        || !attacked.failures.is_empty()
        || !calm.failures.is_empty()
        || open.iter().any(|(_, n)| *n != Some(0))
    {
        bail!("the soak run failed: see above");
    }
    Ok(())
}

/// `clients` threads each send streamed requests back to back for `duration`; each request
/// that ends in anything but a full answer is a failure.
fn load(
    client: &reqwest::blocking::Client,
    (base, model): (&str, &str),
    clients: usize,
    duration: Duration,
) -> Load {
    let started = Instant::now();
    let deadline = started + duration;
    let results: Vec<Load> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..clients)
            .map(|_| {
                scope.spawn(move || {
                    let mut mine = Load::default();
                    while Instant::now() < deadline {
                        mine.requests += 1;
                        match stream_one(client, base, model) {
                            Ok(tokens) => mine.tokens += tokens,
                            Err(e) => mine.failures.push(format!("{e:#}")),
                        }
                    }
                    mine
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect()
    });
    let seconds = started.elapsed().as_secs_f64();
    results.into_iter().fold(
        Load {
            seconds,
            ..Load::default()
        },
        |mut all, one| {
            all.requests += one.requests;
            all.tokens += one.tokens;
            all.failures.extend(one.failures);
            all
        },
    )
}

/// One streamed chat request: the tokens it got, or why it did not end in a full answer.
fn stream_one(client: &reqwest::blocking::Client, base: &str, model: &str) -> Result<u64> {
    let response = client
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(API_KEY)
        .json(&json!({
            "model": model,
            "messages": [{"role": "user", "content": "Tell me about the sea."}],
            "temperature": 0,
            "max_tokens": ANSWER_TOKENS,
            "stream": true,
        }))
        .send()?
        .error_for_status()?;
    let mut tokens = None;
    let mut done = false;
    for line in BufReader::new(response).lines() {
        let line = line?;
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            done = true;
            break;
        }
        let chunk: Value = serde_json::from_str(data)?;
        if let Some(error) = chunk.get("error") {
            bail!("the stream ended in an error: {error}");
        }
        if let Some(n) = chunk["usage"]["completion_tokens"].as_u64() {
            tokens = Some(n);
        }
    }
    ensure!(done, "the stream ended without [DONE]");
    tokens.context("the stream reported no usage")
}

fn report(
    args: &BenchArgs,
    calm: &Load,
    attacked: &Load,
    tally: &RogueTally,
    peaks: &[(String, Option<f64>)],
    open: &[(String, Option<usize>)],
    crashed: &[String],
) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "soak: a gateway and 4 nodes, {} streamed clients ({ANSWER_TOKENS} tokens each), {:.1} min without and {:.1} min with the rogue",
        args.soak_clients, args.soak_minutes, args.soak_minutes
    );
    for (name, load) in [("without the rogue", calm), ("with the rogue", attacked)] {
        let _ = writeln!(
            out,
            "{name:<18} {:>7.1} tok/s  {:>5} requests  {:>3} lost",
            load.throughput(),
            load.requests,
            load.failures.len()
        );
        for failure in load.failures.iter().take(5) {
            let _ = writeln!(out, "    lost: {failure}");
        }
    }
    let _ = writeln!(
        out,
        "ratio              {:>7.3}  (honest throughput with / without the rogue)",
        attacked.throughput() / calm.throughput().max(1e-9)
    );
    let _ = writeln!(
        out,
        "rogue              {} rounds, {} attempts: {} refused or cut off, {} served within its share, {} breaches",
        tally.rounds,
        tally.attempts,
        tally.refused,
        tally.within_share,
        tally.breaches.len()
    );
    for breach in &tally.breaches {
        let _ = writeln!(out, "    breach: {breach}");
    }
    for (name, peak) in peaks {
        let peak = peak.map_or("unknown".into(), |p| format!("{p:.0} MiB"));
        let _ = writeln!(out, "peak memory        {name:<12} {peak}");
    }
    for (name, held) in open {
        let held = held.map_or("unknown (no shutdown line)".into(), |n| n.to_string());
        let _ = writeln!(out, "sessions at stop   {name:<12} {held}");
    }
    let _ = writeln!(
        out,
        "crashed            {}",
        if crashed.is_empty() {
            "none".into()
        } else {
            crashed.join("; ")
        }
    );
}
