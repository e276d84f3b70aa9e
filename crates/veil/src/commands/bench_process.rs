//! A `veil` process that benchmarks start on loopback (nodes, gateways), read and stop.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use anyhow::{ensure, Context, Result};

use crate::commands::measure::peak_memory_of;

/// A `veil` process of the run, killed if the run ends early; its stderr lines are kept.
pub(crate) struct Process {
    pub name: String,
    child: Child,
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Process {
    /// Starts `veil ARGS` and returns it with the first line it prints.
    pub fn start(name: &str, args: &[String]) -> Result<(Self, String)> {
        Self::start_in(name, None, args)
    }

    /// [`Process::start`] in a network namespace (`ip netns exec NETNS`), or in this one.
    pub fn start_in(name: &str, netns: Option<&str>, args: &[String]) -> Result<(Self, String)> {
        let exe = std::env::current_exe().context("cannot find the veil executable")?;
        let mut command = match netns {
            Some(netns) => {
                let mut ip = Command::new("ip");
                ip.args(["netns", "exec", netns]).arg(exe);
                ip
            }
            None => Command::new(exe),
        };
        let mut child = command
            .args(["--log", "info"])
            .args(args)
            .env_remove("VEIL_KEY_PASSPHRASE")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let (stderr, sink) = (child.stderr.take(), Arc::clone(&log));
        std::thread::spawn(move || {
            for line in stderr
                .into_iter()
                .flat_map(|e| BufReader::new(e).lines().map_while(Result::ok))
            {
                if let Ok(mut log) = sink.lock() {
                    log.push(line);
                }
            }
        });
        let mut stdout = BufReader::new(child.stdout.take().context("no stdout")?);
        let mut first = String::new();
        stdout.read_line(&mut first)?;
        // Keep reading, so the process never blocks on a full pipe.
        std::thread::spawn(move || for _ in stdout.lines().map_while(Result::ok) {});
        let process = Self {
            name: name.to_string(),
            child,
            log,
        };
        ensure!(
            !first.is_empty(),
            "{name} printed nothing and stopped: {}",
            process.log_tail()
        );
        Ok((process, first.trim().to_string()))
    }

    pub fn log_tail(&self) -> String {
        let log = self.log.lock().map(|l| l.clone()).unwrap_or_default();
        log[log.len().saturating_sub(5)..].join(" | ")
    }

    /// Peak resident memory (VmHWM), in MiB.
    pub fn peak_mib(&self) -> Option<f64> {
        peak_memory_of(&self.child.id().to_string()).map(|bytes| bytes as f64 / f64::from(1 << 20))
    }

    /// Whether it is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Stops it with SIGTERM and waits for it.
    pub fn stop(&mut self) -> Result<()> {
        // SAFETY: kill(2) on a child this process started and has not reaped.
        let sent = unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        ensure!(sent == 0, "cannot signal {}", self.name);
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `veil node` on one thread on loopback for `shard`, with its database `state`,
/// joining through `bootstrap` and taking the `extra` flags; returns it with its address.
pub fn start_node(
    name: &str,
    shard: &Path,
    state: &Path,
    bootstrap: Option<&str>,
    extra: &[&str],
) -> Result<(Process, String)> {
    let mut args: Vec<String> = ["node", "--threads", "1", "--listen", "/ip4/127.0.0.1/tcp/0"]
        .map(String::from)
        .to_vec();
    args.extend(["--shard".into(), path_arg(shard)]);
    args.extend(["--state".into(), path_arg(state)]);
    if let Some(first) = bootstrap {
        args.extend(["--bootstrap".into(), first.to_string()]);
    }
    args.extend(extra.iter().map(|a| a.to_string()));
    let (node, line) = Process::start(name, &args)?;
    let addr = line
        .strip_prefix("listening on ")
        .with_context(|| format!("{name} printed {line:?}"))?
        .to_string();
    Ok((node, addr))
}

/// The host:port in the line `veil serve` prints first.
pub fn gateway_address(line: &str) -> Option<&str> {
    line.split("http://").nth(1)?.split_whitespace().next()
}

/// A path as a command-line argument.
pub fn path_arg(path: &Path) -> String {
    path.display().to_string()
}

/// The model file of a benchmark cut into three shards of about equal blocks (the last with the
/// head), written into a fresh temporary directory: the chain the swarm benchmarks run.
pub fn three_shards(
    args: &crate::commands::bench_args::BenchArgs,
) -> Result<(
    std::path::PathBuf,
    tempfile::TempDir,
    Vec<veil_model::ShardManifest>,
)> {
    let file = args.model.resolve_path()?;
    let config = veil_model::LlamaConfig::from_gguf(&veil_model::GgufFile::open(&file)?)?;
    let blocks = config.block_count;
    ensure!(
        blocks >= 3,
        "the model has {blocks} blocks: too few for three nodes"
    );
    let ranges: Vec<veil_model::LayerRange> = (0..3)
        .map(|i| veil_model::LayerRange(i * blocks / 3..(i + 1) * blocks / 3))
        .collect();
    let shards = crate::commands::swarm::plan_shards(&ranges, 0, blocks)?;
    let dir = tempfile::tempdir()?;
    let manifests = veil_model::write_shard_files(&file, &shards, dir.path(), &mut |_, _| {})?;
    Ok((file, dir, manifests))
}
