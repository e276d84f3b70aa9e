//! `veil bench --serving`: the gateway against llama.cpp's `llama-server`, side by side in one
//! run, as users would drive them: the official `openai` package's AsyncOpenAI client sends 1, 4
//! and 16 concurrent streamed chat requests of 64 greedy tokens to each server in turn (same
//! file, same threads), and the run prints aggregate tokens/s, median time to first token and
//! the ratio for each load. llama-server runs with `-np 4` and with `-np 16` (its best for the
//! heaviest load); Veil with `--batch N`.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

use crate::commands::bench::{median, BenchArgs};
use crate::commands::python_venv::{venv_python, VenvSpec};

/// The load driver, run with the venv's Python.
const LOAD_SCRIPT: &str = include_str!("serving_load.py");

/// Concurrent requests measured.
const CONCURRENCY: [usize; 3] = [1, 4, 16];

/// Tokens each request asks for.
const ANSWER_TOKENS: usize = 64;

/// A server process of the run, killed when the run ends.
struct Server {
    name: String,
    base: String,
    model: String,
    child: Child,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What one load gave one server.
#[derive(Debug, Clone, Copy)]
struct Sample {
    tokens_per_second: f64,
    ttft_median_ms: f64,
}

/// Runs `veil bench --serving`.
pub fn run(args: &BenchArgs) -> Result<()> {
    let threads = args.model.threads.map_or_else(
        || std::thread::available_parallelism().map_or(1, |n| n.get()),
        usize::from,
    );
    let file = args.model.resolve_path()?;
    let bin = crate::commands::bench_llama_cpp::llama_cpp_bin()?;
    let server_bin = bin.join("llama-server");
    ensure!(
        server_bin.is_file(),
        "no llama-server in {}: build llama.cpp's llama-server target too",
        bin.display()
    );
    let home = veil_model::ModelStore::from_env().home().to_path_buf();
    let python = venv_python(
        &home,
        &VenvSpec {
            name: "bench-openai-venv",
            packages: &["openai>=1,<3"],
            imports: "openai",
            env: Vec::new(),
            note: "a few seconds, once",
        },
    )?;
    let dir = tempfile::tempdir()?;
    let script = dir.path().join("serving_load.py");
    std::fs::write(&script, LOAD_SCRIPT)?;

    let mut servers = vec![start_veil(&file, threads, usize::from(args.batch))?];
    for slots in [4, 16] {
        servers.push(start_llama_server(&server_bin, &file, threads, slots)?);
    }
    // One request each first, so every server has loaded and warmed up.
    for server in &servers {
        drive(&python, &script, server, 1)
            .with_context(|| format!("{} answers nothing", server.name))?;
    }
    let runs = args.runs.max(1);
    println!(
        "{ANSWER_TOKENS}-token streamed chat requests through the official openai client \
         (AsyncOpenAI), {threads} threads, {} run(s) alternating (medians), file {}",
        runs,
        file.display()
    );
    println!(
        "{:>3}  {:>30}  {:>30}  {:>30}  {:>8}",
        "N", servers[0].name, servers[1].name, servers[2].name, "ratio"
    );
    for n in CONCURRENCY {
        let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); servers.len()];
        for _ in 0..runs {
            for (server, kept) in servers.iter().zip(&mut samples) {
                kept.push(drive(&python, &script, server, n)?);
            }
        }
        let medians: Vec<Sample> = samples
            .iter_mut()
            .map(|s| Sample {
                tokens_per_second: median(
                    &mut s.iter().map(|x| x.tokens_per_second).collect::<Vec<_>>(),
                ),
                ttft_median_ms: median(&mut s.iter().map(|x| x.ttft_median_ms).collect::<Vec<_>>()),
            })
            .collect();
        let best_llama = medians[1..]
            .iter()
            .map(|s| s.tokens_per_second)
            .fold(0.0, f64::max);
        let cell = |s: &Sample| {
            format!(
                "{:>7.1} tok/s, TTFT {:>6.0} ms",
                s.tokens_per_second, s.ttft_median_ms
            )
        };
        println!(
            "{n:>3}  {:>30}  {:>30}  {:>30}  {:>8.3}",
            cell(&medians[0]),
            cell(&medians[1]),
            cell(&medians[2]),
            medians[0].tokens_per_second / best_llama.max(1e-9)
        );
    }
    println!("ratio: Veil's aggregate tokens/s over llama-server's best of -np 4 and -np 16");
    Ok(())
}

/// Runs the load driver: `n` concurrent streamed requests to `server`.
fn drive(python: &Path, script: &Path, server: &Server, n: usize) -> Result<Sample> {
    let out = Command::new(python)
        .arg(script)
        .arg(&server.base)
        .arg(&server.model)
        .arg(n.to_string())
        .arg(ANSWER_TOKENS.to_string())
        .output()
        .context("cannot run the openai load driver")?;
    if !out.status.success() {
        bail!(
            "the load driver failed against {}: {}",
            server.name,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let result: Value = serde_json::from_slice(&out.stdout).context("the driver's JSON line")?;
    let tokens = result["tokens"].as_f64().context("no token count")?;
    let seconds = result["seconds"].as_f64().context("no wall time")?;
    let mut ttft: Vec<f64> = result["ttft_ms"]
        .as_array()
        .context("no first-token times")?
        .iter()
        .filter_map(Value::as_f64)
        .collect();
    ensure!(
        ttft.len() == n,
        "{} of {n} requests to {} streamed text",
        ttft.len(),
        server.name
    );
    Ok(Sample {
        tokens_per_second: tokens / seconds.max(1e-9),
        ttft_median_ms: median(&mut ttft),
    })
}

/// `veil serve --local` on `file` with continuous batching of `batch`.
fn start_veil(file: &Path, threads: usize, batch: usize) -> Result<Server> {
    let exe = std::env::current_exe().context("cannot find the veil executable")?;
    let mut child = Command::new(exe)
        .args([
            "serve",
            "--local",
            "--listen",
            "127.0.0.1:0",
            "--max-queued",
            "64",
        ])
        .args([
            "--threads",
            &threads.to_string(),
            "--batch",
            &batch.to_string(),
        ])
        .arg("--model")
        .arg(file)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start veil serve")?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("no stdout")?).read_line(&mut line)?;
    let addr = crate::commands::bench_soak::gateway_address(&line)
        .with_context(|| format!("veil serve printed {line:?}"))?;
    let model = line
        .split("(model ")
        .nth(1)
        .and_then(|rest| rest.split([',', ')']).next())
        .unwrap_or("model")
        .to_string();
    Ok(Server {
        name: format!("Veil --batch {batch}"),
        base: format!("http://{addr}"),
        model,
        child,
    })
}

/// `llama-server` on `file` with `slots` parallel sequences, once its health check passes.
fn start_llama_server(bin: &Path, file: &Path, threads: usize, slots: usize) -> Result<Server> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let child = Command::new(bin)
        .arg("-m")
        .arg(file)
        .args(["-t", &threads.to_string(), "-np", &slots.to_string()])
        // Room for every slot's prompt and answer.
        .args(["-c", &(slots * 512).to_string()])
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start llama-server")?;
    let server = Server {
        name: format!("llama-server -np {slots}"),
        base: format!("http://127.0.0.1:{port}"),
        model: "model".into(),
        child,
    };
    let client = reqwest::blocking::Client::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        let healthy = client
            .get(format!("{}/health", server.base))
            .send()
            .is_ok_and(|r| r.status().is_success());
        if healthy {
            return Ok(server);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    bail!("llama-server -np {slots} did not become healthy within 120 s")
}
