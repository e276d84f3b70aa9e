//! `veil bench --serving`: the gateway against llama.cpp's `llama-server`, side by side in one
//! run, as users would drive them: the official `openai` package's AsyncOpenAI client sends 1, 4
//! and 16 concurrent streamed chat requests of 64 greedy tokens to each server in turn (same
//! file, same threads), and the run prints aggregate tokens/s, median time to first token and
//! the ratio for each load. llama-server runs with `-np 4` and with `-np 16` (its best for the
//! heaviest load); Veil with `--batch N`. `--distinct-prompts` gives each request its own
//! prompt; `--swarm` measures the gateway over a three-node chain instead ([`run_swarm`]).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use veil_serve::backend::Batching;

use crate::commands::bench_args::BenchArgs;
use crate::commands::bench_process::{
    gateway_address, path_arg, start_node, three_shards, Process,
};
use crate::commands::measure::median;
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

/// The official `openai` client and the load script, ready to run.
struct LoadDriver {
    python: PathBuf,
    script: PathBuf,
    prompts: &'static str,
    _dir: tempfile::TempDir,
}

impl LoadDriver {
    /// Makes (once) the venv with the `openai` package and writes the script out.
    fn new(args: &BenchArgs) -> Result<Self> {
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
        Ok(Self {
            python,
            script,
            prompts: if args.distinct_prompts {
                "distinct"
            } else {
                "same"
            },
            _dir: dir,
        })
    }

    /// What the prompts of a load are, for the table's heading.
    fn prompts_said(&self) -> &'static str {
        match self.prompts {
            "same" => "one prompt for all",
            _ => "a different prompt for each request",
        }
    }
}

/// Runs `veil bench --serving`.
pub fn run(args: &BenchArgs) -> Result<()> {
    let driver = LoadDriver::new(args)?;
    if args.swarm {
        return run_swarm(args, &driver);
    }
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
    let mut servers = Vec::new();
    for batch in &args.batch {
        servers.push(start_veil(&file, threads, *batch)?);
    }
    let veils = servers.len();
    for slots in [4, 16] {
        servers.push(start_llama_server(&server_bin, &file, threads, slots)?);
    }
    // One request each first, so every server has loaded and warmed up.
    for server in &servers {
        drive(&driver, server, 1).with_context(|| format!("{} answers nothing", server.name))?;
    }
    let runs = args.runs.max(1);
    println!(
        "{ANSWER_TOKENS}-token streamed chat requests through the official openai client \
         (AsyncOpenAI), {}, {threads} threads, {} run(s) alternating (medians), file {}",
        driver.prompts_said(),
        runs,
        file.display()
    );
    let mut header = format!("{:>3}", "N");
    for server in &servers {
        header += &format!("  {:>30}", server.name);
    }
    for server in &servers[..veils] {
        header += &format!("  {:>22}", format!("ratio {}", server.name));
    }
    println!("{header}");
    for n in CONCURRENCY {
        let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); servers.len()];
        for _ in 0..runs {
            for (server, kept) in servers.iter().zip(&mut samples) {
                kept.push(drive(&driver, server, n)?);
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
        let best_llama = medians[veils..]
            .iter()
            .map(|s| s.tokens_per_second)
            .fold(0.0, f64::max);
        let cell = |s: &Sample| {
            format!(
                "{:>7.1} tok/s, TTFT {:>6.0} ms",
                s.tokens_per_second, s.ttft_median_ms
            )
        };
        let mut row = format!("{n:>3}");
        for sample in &medians {
            row += &format!("  {:>30}", cell(sample));
        }
        for sample in &medians[..veils] {
            row += &format!(
                "  {:>22.3}",
                sample.tokens_per_second / best_llama.max(1e-9)
            );
        }
        println!("{row}");
    }
    println!("ratio: Veil's aggregate tokens/s over llama-server's best of -np 4 and -np 16");
    Ok(())
}

/// Runs the load driver: `n` concurrent streamed requests to `server`.
fn drive(driver: &LoadDriver, server: &Server, n: usize) -> Result<Sample> {
    let out = Command::new(&driver.python)
        .arg(&driver.script)
        .arg(&server.base)
        .arg(&server.model)
        .arg(n.to_string())
        .arg(ANSWER_TOKENS.to_string())
        .arg(driver.prompts)
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

/// `veil serve --local` on `file` with `--batch batch`.
fn start_veil(file: &Path, threads: usize, batch: Batching) -> Result<Server> {
    let args: Vec<String> = ["serve", "--local", "--max-queued", "64", "--threads"]
        .map(String::from)
        .into_iter()
        .chain([threads.to_string(), "--batch".into(), batch.to_string()])
        .chain(["--model".into(), path_arg(file)])
        .collect();
    start_gateway(&format!("Veil --batch {batch}"), &args)
}

/// `veil ARGS` (a `veil serve` on a free loopback port), once it prints its address.
fn start_gateway(name: &str, args: &[String]) -> Result<Server> {
    let exe = std::env::current_exe().context("cannot find the veil executable")?;
    let mut child = Command::new(exe)
        .args(args)
        .args(["--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {name}"))?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("no stdout")?).read_line(&mut line)?;
    let addr = gateway_address(&line).with_context(|| format!("{name} printed {line:?}"))?;
    let model = line
        .split("(model ")
        .nth(1)
        .and_then(|rest| rest.split([',', ')']).next())
        .unwrap_or("model")
        .to_string();
    Ok(Server {
        name: name.to_string(),
        base: format!("http://{addr}"),
        model,
        child,
    })
}

/// Runs `veil bench --serving --swarm`: the gateway over a chain of three `veil node`
/// processes, each serving a third of the blocks on one thread (so a single request keeps one
/// core busy at a time, and concurrent ones can keep both busy while the nodes batch their
/// decode steps). Each node lets the gateway hold 16 sessions (`--max-sessions-per-peer 16`):
/// one gateway speaks for many users.
fn run_swarm(args: &BenchArgs, driver: &LoadDriver) -> Result<()> {
    let (file, dir, manifests) = three_shards(args)?;

    let mut nodes = Vec::new();
    let mut first_addr: Option<String> = None;
    for (i, manifest) in manifests.iter().enumerate() {
        let (node, addr) = start_node(
            &format!("node {i}"),
            &dir.path().join(&manifest.file),
            &dir.path().join(format!("node{i}.redb")),
            first_addr.as_deref(),
            &["--max-sessions", "32", "--max-sessions-per-peer", "16"],
        )?;
        eprintln!("node {i} ({}) at {addr}", manifest.shard());
        first_addr.get_or_insert(addr);
        nodes.push(node);
    }
    let gateway_args: Vec<String> = [
        "serve",
        "--max-concurrent",
        "16",
        "--max-queued",
        "64",
        "--bootstrap",
    ]
    .map(String::from)
    .into_iter()
    .chain(first_addr.clone())
    .chain(["--model".into(), path_arg(&file)])
    .chain(["--state".into(), path_arg(&dir.path().join("client.redb"))])
    .chain([
        "--evidence-dir".into(),
        path_arg(&dir.path().join("evidence")),
    ])
    .collect();
    let gateway = start_gateway("Veil over 3 nodes", &gateway_args)?;
    // The gateway finds the chain through the DHT: retry the first request until it answers.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match drive(driver, &gateway, 1) {
            Ok(_) => break,
            Err(e) if Instant::now() < deadline => {
                eprintln!("waiting for the chain to form: {e:#}");
                std::thread::sleep(Duration::from_secs(2));
            }
            Err(e) => {
                let logs: Vec<String> = nodes.iter().map(Process::log_tail).collect();
                return Err(e.context(format!("the swarm never answered; nodes: {logs:?}")));
            }
        }
    }

    let runs = args.runs.max(1);
    println!(
        "{ANSWER_TOKENS}-token streamed chat requests through the official openai client \
         (AsyncOpenAI), {}, a gateway over three nodes of {}/{}/{} blocks on one thread each, \
         {runs} run(s) (medians), file {}",
        driver.prompts_said(),
        manifests[0].end_block - manifests[0].first_block,
        manifests[1].end_block - manifests[1].first_block,
        manifests[2].end_block - manifests[2].first_block,
        file.display()
    );
    println!(
        "{:>3}  {:>16}  {:>16}",
        "N", "aggregate tok/s", "TTFT median ms"
    );
    let mut single = None;
    let mut last = 0.0;
    for n in CONCURRENCY {
        let samples = (0..runs)
            .map(|_| drive(driver, &gateway, n))
            .collect::<Result<Vec<_>>>()?;
        let tps = median(
            &mut samples
                .iter()
                .map(|s| s.tokens_per_second)
                .collect::<Vec<_>>(),
        );
        let ttft = median(&mut samples.iter().map(|s| s.ttft_median_ms).collect::<Vec<_>>());
        println!("{n:>3}  {tps:>16.1}  {ttft:>16.0}");
        single.get_or_insert(tps);
        last = tps;
    }
    let ratio = last / single.unwrap_or(1.0).max(1e-9);
    println!(
        "ratio: {ratio:.2} (aggregate tokens/s at {} concurrent requests over one request's)",
        CONCURRENCY[CONCURRENCY.len() - 1]
    );
    for node in &mut nodes {
        ensure!(node.alive(), "{} stopped: {}", node.name, node.log_tail());
    }
    Ok(())
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
