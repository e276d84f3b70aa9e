//! Nodes behind NATs, for real. `scripts/natlab.sh` makes a small internet in network
//! namespaces: two public hosts (relays) and three homes, each behind its own masquerading
//! router that drops whatever comes in unasked. Nodes and clients run there as real processes.
//! Needs root, iproute2 and nftables (`.ci/run` installs nftables when it is missing).

mod common;

use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{peer_id, shards, veil_bin, NodeProcess};

const PROMPT: &str = "Name three colours.";

/// The namespaces of one test; removed when dropped.
struct NatLab {
    prefix: String,
}

impl NatLab {
    fn up() -> Self {
        let lab = Self {
            prefix: format!("n{}", std::process::id() % 10_000_000),
        };
        let out = lab.script("up");
        assert!(
            out.status.success(),
            "cannot make the namespaces (root, iproute2 and nftables are needed): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        lab
    }

    fn script(&self, action: &str) -> Output {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/natlab.sh");
        Command::new("bash")
            .arg(script)
            .args([action, &self.prefix])
            .output()
            .expect("bash runs")
    }

    /// `veil` on one of the lab's hosts.
    fn veil(&self, host: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &format!("{}-{host}", self.prefix)])
            .arg(veil_bin());
        cmd
    }

    /// A node on `host`, listening on `listen`, with more `veil node` flags.
    fn node(
        &self,
        host: &str,
        listen: &str,
        shard: &Path,
        state: PathBuf,
        extra: &[&str],
    ) -> NodeProcess {
        let mut cmd = self.veil(host);
        cmd.args([
            "--log",
            "info",
            "node",
            "--threads",
            "1",
            "--private-network",
        ])
        .args(["--listen", listen])
        .arg("--shard")
        .arg(shard)
        .arg("--state")
        .arg(state)
        .args(extra);
        NodeProcess::spawn(cmd)
    }

    /// `veil generate` from `host` (root's namespace for `None`); its stdout and stderr.
    fn generate(&self, host: Option<&str>, tokens: usize, extra: &[&str]) -> (String, String) {
        let out = self
            .generate_command(host, tokens, extra)
            .output()
            .expect("veil runs");
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        );
        assert!(out.status.success(), "{stderr}");
        (stdout, stderr)
    }

    fn generate_command(&self, host: Option<&str>, tokens: usize, extra: &[&str]) -> Command {
        let mut cmd = match host {
            Some(host) => self.veil(host),
            None => Command::new(veil_bin()),
        };
        cmd.args(["generate", "--threads", "1", "--prompt", PROMPT])
            .args(["--max-tokens", &tokens.to_string()])
            .args(extra);
        cmd
    }
}

impl Drop for NatLab {
    fn drop(&mut self) {
        let _ = self.script("down");
    }
}

#[test]
fn nodes_behind_nats_serve_through_relays_punch_holes_and_outlive_the_relay() {
    let lab = NatLab::up();
    let dir = tempfile::tempdir().unwrap();
    let files = shards(dir.path());
    let state = |name: &str| dir.path().join(format!("{name}.redb"));

    // Two public relays serve the first blocks; each home node serves a range behind its NAT.
    // The first is told to find two relays in the DHT; the second learns by itself (AutoNAT)
    // that nobody can dial it, and then looks for two. The lab's "internet" is a private
    // range, hence --private-network everywhere.
    let relay = lab.node(
        "relay",
        "/ip4/10.77.0.10/tcp/4001",
        &files[0],
        state("relay"),
        &["--relay-server"],
    );
    let boot = relay.addr.clone();
    let public = lab.node(
        "pub",
        "/ip4/10.77.0.11/tcp/4001",
        &files[0],
        state("pub"),
        &["--relay-server", "--bootstrap", &boot],
    );
    let homes: Vec<NodeProcess> = [(1, "h1", &["--find-relays", "2"][..]), (2, "h2", &[])]
        .iter()
        .map(|&(i, host, relays)| {
            let listen = format!("/ip4/192.168.{i}.2/tcp/4001");
            let mut flags = vec!["--bootstrap", boot.as_str()];
            flags.extend(relays);
            lab.node(host, &listen, &files[i], state(host), &flags)
        })
        .collect();
    homes[1].wait_for_log("reachability: private");
    homes[1].wait_for_log("looking for 2 relays in the DHT");
    public.wait_for_log("reachability: public");
    for home in &homes {
        assert!(home.addr.contains("/ip4/192.168."), "{}", home.addr);
        home.wait_for_log_count("reserved a slot on relay", 2);
    }
    // Nothing outside a home can dial it: the client in the third home reaches the home
    // nodes only through a relay, or through a hole punched to it.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !lab
        .generate_command(Some("h3"), 1, &["--bootstrap", &boot])
        .output()
        .unwrap()
        .status
        .success()
    {
        assert!(Instant::now() < deadline, "no route from the third home");
        std::thread::sleep(Duration::from_millis(500));
    }

    let (alone, _) = lab.generate(None, 48, &[]);
    // A client that does not listen cannot be punched to: both home hops stay relayed.
    let (relayed, log) = lab.generate(Some("h3"), 48, &["--bootstrap", &boot]);
    assert_eq!(relayed, alone, "{log}");
    for (blocks, home) in [("10-20", &homes[0]), ("20-30", &homes[1])] {
        let id = peer_id(&home.addr);
        assert!(
            log.contains(&format!("blocks {blocks} on {id} (relayed)")),
            "{log}"
        );
    }

    // The two home nodes found each other through the relay and punched a hole between them.
    homes[0].wait_for_log(&format!(
        "hole punched: a direct connection to {}",
        peer_id(&homes[1].addr)
    ));

    // A client that listens is punched to as well, by both home nodes, and then closes the
    // relayed connections: the route ends direct.
    let (alone, _) = lab.generate(None, 128, &[]);
    let (punched, log) = lab.generate(
        Some("h3"),
        128,
        &["--bootstrap", &boot, "--p2p-listen", "/ip4/0.0.0.0/tcp/0"],
    );
    assert_eq!(punched, alone, "{log}");
    assert!(!log.contains("(relayed)"), "{log}");
    for home in &homes {
        home.wait_for_log_count("hole punched: a direct connection to", 2);
    }

    // A relay killed while a relayed client generates changes nothing in the answer: each
    // hop it carried is reached again through the other relay (or the other public node
    // takes over the first blocks, had the dead relay served them).
    let mut client = lab
        .generate_command(Some("h3"), 128, &["--bootstrap", &boot])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(client.stdout.take().unwrap());
    let mut first_bytes = [0u8; 8];
    stdout.read_exact(&mut first_bytes).unwrap();
    drop(relay);
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    let output = client.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{log}");
    assert!(!rest.is_empty(), "the relay died after the answer: {log}");
    assert_eq!(
        format!("{}{rest}", String::from_utf8_lossy(&first_bytes)),
        alone,
        "{log}"
    );
    drop(public);
}
