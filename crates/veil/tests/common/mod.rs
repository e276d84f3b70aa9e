//! Helpers shared by the tests that start real `veil` processes: nodes and shard files.

#![allow(dead_code)] // each test file uses its own part of these

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use veil_model::{ModelStore, SMOLLM2_135M};

pub fn veil_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_veil"))
}

pub fn model_path() -> PathBuf {
    ModelStore::from_env()
        .ensure(&SMOLLM2_135M, &mut |_| {})
        .expect("the default model can be fetched")
}

/// A `veil node` process; killed when dropped. Its stderr lines are collected as they come.
pub struct NodeProcess {
    pub child: Child,
    pub addr: String,
    pub log: Arc<Mutex<Vec<String>>>,
}

impl NodeProcess {
    pub fn start(shard: &Path, state: &Path, bootstrap: Option<&str>) -> Self {
        Self::start_with(shard, state, bootstrap, &[])
    }

    /// A node with more `veil node` flags.
    pub fn start_with(shard: &Path, state: &Path, bootstrap: Option<&str>, extra: &[&str]) -> Self {
        let mut cmd = Command::new(veil_bin());
        cmd.args(["--log", "info", "node", "--threads", "1", "--listen"])
            .arg("/ip4/127.0.0.1/tcp/0")
            .arg("--shard")
            .arg(shard)
            .arg("--state")
            .arg(state)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(b) = bootstrap {
            cmd.args(["--bootstrap", b]);
        }
        let mut child = cmd.spawn().expect("veil node starts");
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout
            .read_line(&mut line)
            .expect("the node prints its address");
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}; log: {:?}", log.lock()))
            .to_string();
        Self { child, addr, log }
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Shards of the default model at 0-10,10-20,20-30 in `dir`.
pub fn shards(dir: &Path) -> Vec<PathBuf> {
    let out = Command::new(veil_bin())
        .args(["shard", "--ranges", "0-10,10-20,20-30", "--model"])
        .arg(model_path())
        .arg("--out")
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ["0-10", "10-20", "20-30"]
        .iter()
        .map(|r| dir.join(format!("SmolLM2-135M-Instruct.Q4_1.{r}.gguf")))
        .collect()
}
