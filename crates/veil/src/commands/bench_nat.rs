//! `veil bench --nat`: a three-hop chain across real NATs, in the network namespaces of
//! `scripts/natlab.sh` (root only). The same chain decodes direct (middle and last hops on
//! public hosts), relayed (on hosts behind NATs, reached through a relay) and hole-punched
//! (the same NATed hosts, with a client that listens so DCUtR can open a direct path),
//! alternating; the relay's own network counters give its bytes per generated token; and a
//! NATed node is timed from its start to the first request it serves.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;

use crate::commands::bench_args::BenchArgs;
use crate::commands::bench_process::{path_arg, three_shards, Process};
use crate::commands::measure::median;

/// The lab's script, carried in the binary so the benchmark runs from anywhere.
const NATLAB: &str = include_str!("../../../../scripts/natlab.sh");

/// The lab's namespaces; removed when dropped.
struct NatLab {
    prefix: String,
}

impl NatLab {
    fn up() -> Result<Self> {
        let lab = Self {
            prefix: format!("b{}", std::process::id() % 10_000_000),
        };
        lab.script("up")?;
        Ok(lab)
    }

    fn script(&self, action: &str) -> Result<()> {
        let out = std::process::Command::new("bash")
            .args(["-c", NATLAB, "natlab", action, &self.prefix])
            .output()
            .context("cannot run bash")?;
        ensure!(
            out.status.success(),
            "cannot {action} the NAT lab (it needs root, iproute2 and nftables): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
    }

    fn netns(&self, host: &str) -> String {
        format!("{}-{host}", self.prefix)
    }

    /// Bytes in and out of `host`'s internet interface so far.
    fn wire_bytes(&self, host: &str) -> Result<u64> {
        let out = std::process::Command::new("ip")
            .args(["-n", &self.netns(host), "-s", "-j", "link", "show", "wan0"])
            .output()
            .context("cannot run ip")?;
        let links: serde_json::Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("ip -s -j link printed no JSON for {host}"))?;
        let stats = &links[0]["stats64"];
        let (rx, tx) = (stats["rx"]["bytes"].as_u64(), stats["tx"]["bytes"].as_u64());
        rx.zip(tx)
            .map(|(rx, tx)| rx + tx)
            .with_context(|| format!("no byte counters for {host}'s wan0"))
    }
}

impl Drop for NatLab {
    fn drop(&mut self) {
        let _ = self.script("down");
    }
}

/// One way through the lab.
#[derive(Clone, Copy)]
enum Path {
    Direct,
    Relayed,
    Punched,
}

impl Path {
    const ALL: [Path; 3] = [Path::Direct, Path::Relayed, Path::Punched];

    fn name(self) -> &'static str {
        match self {
            Path::Direct => "direct",
            Path::Relayed => "relayed",
            Path::Punched => "hole-punched",
        }
    }
}

/// What one path measured.
#[derive(Debug, Serialize)]
struct PathFigures {
    path: &'static str,
    decode_tok_s: f64,
    ratio_to_direct: f64,
    relay_bytes_per_token: f64,
    /// Runs whose route still had a relayed hop at the end.
    runs_ending_relayed: usize,
}

#[derive(Debug, Serialize)]
struct NatReport {
    tokens: usize,
    runs: usize,
    paths: Vec<PathFigures>,
    /// From a NATed node's start to its relay slot, and to the first session it opened.
    reserved_after_s: f64,
    first_served_after_s: f64,
    /// Relay bytes of one new client's weights check of the two NATed hops.
    weights_check_relay_bytes: u64,
    /// From the start of a NATed node named no relay to AutoNAT's verdict and to its slot.
    autonat_private_after_s: f64,
    autonat_reserved_after_s: f64,
}

/// Runs `veil bench --nat`.
pub fn run(args: &BenchArgs) -> Result<()> {
    if unsafe { libc::geteuid() } != 0 {
        bail!("veil bench --nat makes network namespaces: run it as root");
    }
    let (_, dir, manifests) = three_shards(args)?;
    let shard = |i: usize| path_arg(&dir.path().join(&manifests[i].file));
    let lab = NatLab::up()?;

    let node = |name: &str, host: &str, listen: &str, i: usize, extra: &[&str]| {
        let mut node_args: Vec<String> = ["node", "--threads", "1", "--private-network"]
            .into_iter()
            .chain(["--listen", listen, "--shard"])
            .map(String::from)
            .collect();
        node_args.push(shard(i));
        node_args.push("--state".into());
        node_args.push(path_arg(&dir.path().join(format!("{name}.redb"))));
        node_args.extend(extra.iter().map(|a| a.to_string()));
        let (process, line) = Process::start_in(name, Some(&lab.netns(host)), &node_args)?;
        let addr = line
            .strip_prefix("listening on ")
            .with_context(|| format!("{name} printed {line:?}"))?
            .to_string();
        anyhow::Ok((process, addr))
    };
    // The first hop and the relay on one public host; the other two hops both on public
    // hosts and behind NATs, so each path's route is picked with --allow-nodes.
    let (_relay, relay_addr) = node(
        "relay",
        "relay",
        "/ip4/10.77.0.10/tcp/4001",
        0,
        &["--relay-server"],
    )?;
    let join = ["--bootstrap", relay_addr.as_str()];
    let (_pub1, pub1_addr) = node("pub1", "pub", "/ip4/10.77.0.11/tcp/4001", 1, &join)?;
    let (_pub2, pub2_addr) = node("pub2", "pub2", "/ip4/10.77.0.12/tcp/4001", 2, &join)?;
    let natted = [
        "--bootstrap",
        relay_addr.as_str(),
        "--relay",
        relay_addr.as_str(),
    ];
    let started = Instant::now();
    let (home1, home1_addr) = node("home1", "h1", "/ip4/192.168.1.2/tcp/4001", 1, &natted)?;
    let (_home2, home2_addr) = node("home2", "h2", "/ip4/192.168.2.2/tcp/4001", 2, &natted)?;
    let reserved_after = wait_for(&home1, "reserved a slot on relay", started)?;

    let allow = |addrs: [&str; 3], name: &str| -> Result<String> {
        let ids: Vec<&str> = addrs.iter().filter_map(|a| a.rsplit('/').next()).collect();
        let path = dir.path().join(name);
        std::fs::write(&path, ids.join("\n"))?;
        Ok(path_arg(&path))
    };
    let direct = allow([&relay_addr, &pub1_addr, &pub2_addr], "direct.allow")?;
    let natted_route = allow([&relay_addr, &home1_addr, &home2_addr], "natted.allow")?;
    let client_netns = lab.netns("h3");
    // The speed runs skip the client's weights check (its bytes are counted once, below), so
    // the relay's bytes per token are the generation's own.
    let generate = |path: Path, tokens: usize, openings: &str| -> Result<(String, Duration)> {
        let allowed = match path {
            Path::Direct => &direct,
            Path::Relayed | Path::Punched => &natted_route,
        };
        let exe = std::env::current_exe()?;
        let mut command = std::process::Command::new("ip");
        command
            .args(["netns", "exec", &client_netns])
            .arg(exe)
            .args(["generate", "--threads", "1", "--prompt", &args.prompt])
            .args(["--max-tokens", &tokens.to_string()])
            .args(["--bootstrap", &relay_addr, "--allow-nodes", allowed])
            .args(["--weights-openings", openings]);
        if matches!(path, Path::Punched) {
            command.args(["--p2p-listen", "/ip4/0.0.0.0/tcp/0"]);
        }
        let began = Instant::now();
        let out = command.output().context("cannot run veil generate")?;
        let log = String::from_utf8_lossy(&out.stderr).to_string();
        ensure!(
            out.status.success(),
            "{} generation failed: {log}",
            path.name()
        );
        Ok((log, began.elapsed()))
    };

    // The first request the NATed node serves, from a client retrying until it is routed.
    let first_served_after = loop {
        if generate(Path::Relayed, 1, "0").is_ok() {
            break wait_for(&home1, "opened session", started)?;
        }
        ensure!(
            started.elapsed() < Duration::from_secs(120),
            "the NATed node served nothing within 2 minutes: {}",
            home1.log_tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    };

    // A NATed node given no relay: AutoNAT must find it unreachable first.
    let started_alone = Instant::now();
    let (home3, _) = node("home3", "h3", "/ip4/192.168.3.2/tcp/4001", 1, &join)?;
    let private_after = wait_for(&home3, "reachability: private", started_alone)?;
    let autonat_reserved_after = wait_for(&home3, "reserved a slot on relay", started_alone)?;
    drop(home3);

    // What a new client's weights check of the two NATed hops costs the relay.
    let openings = veil_net::DEFAULT_OPENINGS.to_string();
    let mut check_bytes = 0;
    for (i, openings) in [openings.as_str(), "0"].into_iter().enumerate() {
        let before = lab.wire_bytes("relay")?;
        generate(Path::Relayed, 1, openings)?;
        let bytes = lab.wire_bytes("relay")? - before;
        check_bytes = if i == 0 {
            bytes
        } else {
            check_bytes.saturating_sub(bytes)
        };
    }

    let mut speeds = [Vec::new(), Vec::new(), Vec::new()];
    let mut relay_bytes = [Vec::new(), Vec::new(), Vec::new()];
    let mut ending_relayed = [0; 3];
    for run in 0..args.runs {
        // Alternate the order, so no path always runs first.
        for k in 0..3 {
            let i = (k + run) % 3;
            let path = Path::ALL[i];
            let before = lab.wire_bytes("relay")?;
            let (log, _) = generate(path, args.tokens, "0")?;
            let after = lab.wire_bytes("relay")?;
            speeds[i]
                .push(decode_speed(&log).with_context(|| format!("no decode speed in: {log}"))?);
            relay_bytes[i].push((after - before) as f64 / args.tokens as f64);
            if log
                .lines()
                .any(|l| l.starts_with("route:") && l.contains("(relayed)"))
            {
                ending_relayed[i] += 1;
            }
            eprintln!(
                "run {}: {} {:.1} tok/s",
                run + 1,
                path.name(),
                speeds[i].last().unwrap_or(&0.0)
            );
        }
    }
    let med = |xs: &[f64]| median(&mut xs.to_vec());
    let direct_speed = med(&speeds[0]);
    let direct_bytes = med(&relay_bytes[0]);
    let paths: Vec<PathFigures> = Path::ALL
        .iter()
        .enumerate()
        .map(|(i, path)| PathFigures {
            path: path.name(),
            decode_tok_s: med(&speeds[i]),
            ratio_to_direct: med(&speeds[i]) / direct_speed,
            // The direct path's relay traffic is the first hop's, served on the relay host.
            relay_bytes_per_token: (med(&relay_bytes[i]) - direct_bytes).max(0.0),
            runs_ending_relayed: ending_relayed[i],
        })
        .collect();
    let report = NatReport {
        tokens: args.tokens,
        runs: args.runs,
        paths,
        reserved_after_s: reserved_after.as_secs_f64(),
        first_served_after_s: first_served_after.as_secs_f64(),
        weights_check_relay_bytes: check_bytes,
        autonat_private_after_s: private_after.as_secs_f64(),
        autonat_reserved_after_s: autonat_reserved_after.as_secs_f64(),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "three-hop chain through NATs ({} tokens, median of {} alternating runs; the client behind a NAT too)",
        report.tokens, report.runs
    );
    println!(
        "{:<14} {:>12} {:>10} {:>20}",
        "path", "decode tok/s", "vs direct", "relay bytes/token"
    );
    for p in &report.paths {
        let note = match p.runs_ending_relayed {
            0 => String::new(),
            n => format!("  ({n} of {} runs ended with a relayed hop)", report.runs),
        };
        println!(
            "{:<14} {:>12.1} {:>10.3} {:>20.0}{note}",
            p.path, p.decode_tok_s, p.ratio_to_direct, p.relay_bytes_per_token
        );
    }
    println!(
        "a NATed node named a relay (--relay): relay slot {:.2} s and first request served {:.2} s after its start",
        report.reserved_after_s, report.first_served_after_s
    );
    println!(
        "a NATed node named none: AutoNAT says private {:.1} s and a relay slot is held {:.1} s after its start",
        report.autonat_private_after_s, report.autonat_reserved_after_s
    );
    println!(
        "a new client's weights check ({} openings per node) of the two relayed hops: {:.1} MB through the relay",
        veil_net::DEFAULT_OPENINGS,
        report.weights_check_relay_bytes as f64 / 1e6
    );
    Ok(())
}

/// Time from `started` until `process` logs a line holding `needle` (polled every 10 ms).
fn wait_for(process: &Process, needle: &str, started: Instant) -> Result<Duration> {
    loop {
        let seen = process
            .log
            .lock()
            .map(|log| log.iter().any(|l| l.contains(needle)))
            .unwrap_or(false);
        if seen {
            return Ok(started.elapsed());
        }
        ensure!(
            started.elapsed() < Duration::from_secs(120),
            "{} logged no {needle:?} within 2 minutes: {}",
            process.name,
            process.log_tail()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The decode speed `veil generate` reports: "N generated at X tok/s".
fn decode_speed(log: &str) -> Option<f64> {
    let after = log.split(" generated at ").nth(1)?;
    after.split_whitespace().next()?.parse().ok()
}
