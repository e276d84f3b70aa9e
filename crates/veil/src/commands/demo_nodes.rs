//! The demo's `veil node` processes, and waiting for them to be found.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};

/// A `veil node` child process, stopped when dropped.
pub(crate) struct NodeChild {
    child: Child,
    pub(crate) addr: String,
    pub(crate) blocks: String,
}

impl NodeChild {
    pub(crate) fn start(
        shard: &Path,
        blocks: &str,
        state: &Path,
        bootstrap: Option<&str>,
    ) -> Result<Self> {
        Self::start_with(shard, blocks, state, bootstrap, &[])
    }

    /// A node with more `veil node` flags.
    pub(crate) fn start_with(
        shard: &Path,
        blocks: &str,
        state: &Path,
        bootstrap: Option<&str>,
        extra: &[&str],
    ) -> Result<Self> {
        let exe = std::env::current_exe().context("cannot find the veil binary")?;
        let mut cmd = Command::new(exe);
        // Nodes hold no key: the passphrase stays with the key holder.
        cmd.env_remove("VEIL_KEY_PASSPHRASE")
            .args(["node", "--listen", "/ip4/127.0.0.1/tcp/0", "--shard"])
            .arg(shard)
            .arg("--state")
            .arg(state)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        if let Some(b) = bootstrap {
            cmd.args(["--bootstrap", b]);
        }
        let mut child = cmd.spawn().context("cannot start a node process")?;
        let mut line = String::new();
        let stdout = child.stdout.take().context("node stdout")?;
        BufReader::new(stdout).read_line(&mut line)?;
        let Some(addr) = line.trim().strip_prefix("listening on ") else {
            let _ = child.kill();
            bail!("node for blocks {blocks} did not start (it printed {line:?})");
        };
        Ok(Self {
            addr: addr.to_string(),
            child,
            blocks: blocks.to_string(),
        })
    }
}

impl Drop for NodeChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Retries `f` for up to 20 s: right after start, nodes have not all announced themselves.
pub(crate) fn retry<T>(mut f: impl FnMut() -> Result<T>) -> Result<T> {
    let deadline = Instant::now() + std::time::Duration::from_secs(20);
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() < deadline => {
                tracing::debug!("not yet: {e:#}");
                std::thread::sleep(std::time::Duration::from_millis(300));
            }
            Err(e) => return Err(e),
        }
    }
}
