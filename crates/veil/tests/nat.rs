//! Nodes behind NATs, for real. `scripts/natlab.sh` makes a small internet in network
//! namespaces: two public hosts (relays) and three homes, each behind its own masquerading
//! router that drops whatever comes in unasked. Nodes and clients run there as real processes.
//! Needs root, iproute2 and nftables (`.ci/run` installs nftables when it is missing).

mod common;

use std::io::{BufRead, BufReader, Read};
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

    /// `curl ARGS` on `host`, its answer read as JSON (null when it is not JSON).
    fn curl(&self, host: &str, args: &[&str]) -> serde_json::Value {
        let out = Command::new("ip")
            .args(["netns", "exec", &format!("{}-{host}", self.prefix)])
            .args(["curl", "-s", "--max-time", "120"])
            .args(args)
            .output()
            .expect("curl runs");
        serde_json::from_slice(&out.stdout).unwrap_or_default()
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

/// A process killed when dropped.
struct Stopped(std::process::Child);

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
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
    let (alone_128, _) = lab.generate(None, 128, &[]);
    let (punched, log) = lab.generate(
        Some("h3"),
        128,
        &["--bootstrap", &boot, "--p2p-listen", "/ip4/0.0.0.0/tcp/0"],
    );
    assert_eq!(punched, alone_128, "{log}");
    assert!(!log.contains("(relayed)"), "{log}");
    for home in &homes {
        home.wait_for_log_count("hole punched: a direct connection to", 2);
    }

    // A verified split chain through the NATs: a second node per range in each home gives
    // every hop a judge, and every hop passes.
    let seconds: Vec<NodeProcess> = [(1, "h1", 2), (2, "h2", 1)]
        .iter()
        .map(|&(i, host, shard)| {
            let listen = format!("/ip4/192.168.{i}.2/tcp/4002");
            let flags = ["--bootstrap", boot.as_str(), "--find-relays", "2"];
            lab.node(
                host,
                &listen,
                &files[shard],
                state(&format!("{host}b")),
                &flags,
            )
        })
        .collect();
    for node in &seconds {
        node.wait_for_log_count("reserved a slot on relay", 2);
    }
    let (alone_24, _) = lab.generate(None, 24, &[]);
    let client_state = dir.path().join("client.redb");
    let verify = [
        "--bootstrap",
        boot.as_str(),
        "--verify",
        "2",
        "--chain",
        "--state",
        client_state.to_str().unwrap(),
    ];
    let deadline = Instant::now() + Duration::from_secs(30);
    let (verified, log) = loop {
        let out = lab
            .generate_command(Some("h3"), 24, &verify)
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&out.stderr).to_string();
        if out.status.success() {
            break (String::from_utf8_lossy(&out.stdout).to_string(), log);
        }
        // Until the second nodes are announced, a hop may lack a judge.
        assert!(Instant::now() < deadline, "{log}");
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(verified, alone_24, "{log}");
    for blocks in ["blocks  0-10", "blocks 10-20", "blocks 20-30"] {
        let line = log.lines().find(|l| l.contains(blocks));
        assert!(
            line.is_some_and(|l| l.contains("passed by 1 of 1 judges")),
            "{log}"
        );
    }

    // The gateway in the third home answers through the NATs as one process does, and its
    // dashboard marks the hops it reaches through a relay.
    let mut cmd = lab.veil("h3");
    cmd.args([
        "serve",
        "--threads",
        "1",
        "--listen",
        "127.0.0.1:0",
        "--bootstrap",
        &boot,
    ])
    .arg("--state")
    .arg(dir.path().join("gateway.redb"))
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    let mut child = cmd.spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let _gateway = Stopped(child);
    let base = line
        .split("http://")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_string();
    let (alone_16, _) = lab.generate(None, 16, &[]);
    let body = serde_json::json!({
        "model": "SmolLM2-135M-Instruct",
        "messages": [{"role": "user", "content": PROMPT}],
        "temperature": 0,
        "max_tokens": 16,
    })
    .to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    let reply = loop {
        let reply = lab.curl(
            "h3",
            &[
                "-X",
                "POST",
                &format!("http://{base}/v1/chat/completions"),
                "-H",
                "content-type: application/json",
                "-d",
                &body,
            ],
        );
        if reply["choices"].is_array() {
            break reply;
        }
        // Until the gateway has found every range, it answers no_route.
        assert!(Instant::now() < deadline, "{reply}");
        std::thread::sleep(Duration::from_millis(500));
    };
    let content = reply["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default();
    assert_eq!(content.trim_end(), alone_16.trim_end(), "{reply}");
    let board = lab.curl("h3", &[&format!("http://{base}/api/dashboard")]);
    let answered = board["requests"].as_array().and_then(|requests| {
        requests
            .iter()
            .find(|r| r["completion_tokens"].as_u64().is_some_and(|n| n > 0))
    });
    let route = answered
        .and_then(|r| r["route"].as_str())
        .unwrap_or_default();
    assert_eq!(route.matches("(relayed)").count(), 2, "{board}");

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
        alone_128,
        "{log}"
    );
    drop(public);
}
