//! Helpers shared by the tests that start real `veil` processes: nodes and shard files.

#![allow(dead_code)] // each test file uses its own part of these

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use veil_model::{ModelStore, SMOLLM2_135M};

pub fn veil_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_veil"))
}

pub fn model_path() -> PathBuf {
    ModelStore::from_env()
        .ensure(&SMOLLM2_135M, &mut |_| {})
        .expect("the default model can be fetched")
}

/// The peer id at the end of a node's address.
pub fn peer_id(addr: &str) -> String {
    addr.rsplit('/').next().unwrap().to_string()
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
        Self::spawn(cmd)
    }

    /// A node from a `veil` command line of the caller's own, once it prints its address.
    pub fn spawn(mut cmd: Command) -> Self {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
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
        // Later addresses (a relayed one, say) go to the log too.
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Self { child, addr, log }
    }

    /// The first log line holding `needle`, waiting up to a minute for it.
    pub fn wait_for_log(&self, needle: &str) -> String {
        self.wait_for_log_count(needle, 1)
    }

    /// The `count`th log line holding `needle`, waiting up to a minute for it.
    pub fn wait_for_log_count(&self, needle: &str, count: usize) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let found = self
                .log
                .lock()
                .unwrap()
                .iter()
                .filter(|l| l.contains(needle))
                .nth(count - 1)
                .cloned();
            if let Some(line) = found {
                return line;
            }
            assert!(
                Instant::now() < deadline,
                "fewer than {count} {needle:?} in the log: {:?}",
                self.log.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
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

/// A published sample from `veil-tee`'s fixtures (see its README there).
pub fn tee_fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../veil-tee/tests/fixtures")
        .join(name)
}

/// A directory laid out like the kernel's configfs-tsm report directory, with a thread
/// playing the kernel: once an entry's `inblob` holds 64 bytes, it writes `provider`,
/// `generation` and then `outblob` (a fixed, published quote), and keeps the inblobs it saw.
/// No real enclave runs on the test machines; this is the interface, not the hardware.
pub struct FakeTsm {
    pub dir: tempfile::TempDir,
    pub inblobs: Arc<Mutex<Vec<Vec<u8>>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeTsm {
    pub fn start(provider: &'static str, outblob: Vec<u8>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let inblobs = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (seen, stopped) = (Arc::clone(&inblobs), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                for entry in std::fs::read_dir(&root).into_iter().flatten().flatten() {
                    let entry = entry.path();
                    let Ok(inblob) = std::fs::read(entry.join("inblob")) else {
                        continue;
                    };
                    if inblob.len() != 64 || entry.join("outblob").exists() {
                        continue;
                    }
                    let _ = std::fs::write(entry.join("provider"), format!("{provider}\n"));
                    let _ = std::fs::write(entry.join("generation"), "1\n");
                    let _ = std::fs::write(entry.join("outblob.tmp"), &outblob);
                    let _ = std::fs::rename(entry.join("outblob.tmp"), entry.join("outblob"));
                    seen.lock().unwrap().push(inblob);
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        });
        Self {
            dir,
            inblobs,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for FakeTsm {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
