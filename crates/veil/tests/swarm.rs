//! The swarm with real `veil node` processes on loopback: a chain gives the single-process
//! answer, and survives losing the node it is using.

use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{model_path, peer_id, shards, veil_bin, NodeProcess};

const PROMPT: &str = "Write a short poem about the sea.";

fn generate(extra: &[&str]) -> (String, String) {
    let out = Command::new(veil_bin())
        // For runs on an encrypted model's key.
        .env("VEIL_KEY_PASSPHRASE", "test passphrase")
        .args([
            "generate",
            "--threads",
            "1",
            "--max-tokens",
            "48",
            "--prompt",
            PROMPT,
        ])
        .args(extra)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{stderr}");
    (stdout, stderr)
}

/// Waits until `bootstrap` knows the providers for every range, by asking the swarm.
fn wait_for_route(bootstrap: &str) {
    wait_for_route_with(bootstrap, &[]);
}

/// [`wait_for_route`] for the model that `extra` flags name (an encrypted one, say).
fn wait_for_route_with(bootstrap: &str, extra: &[&std::ffi::OsStr]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = Command::new(veil_bin())
            .env("VEIL_KEY_PASSPHRASE", "test passphrase")
            .args([
                "generate",
                "--max-tokens",
                "1",
                "--prompt",
                "hi",
                "--bootstrap",
                bootstrap,
            ])
            .args(extra)
            .output()
            .unwrap();
        if out.status.success() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no route: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn a_three_node_chain_answers_like_one_process_and_survives_losing_a_node() {
    let dir = tempfile::tempdir().unwrap();
    let files = shards(dir.path());
    let state = |name: &str| dir.path().join(format!("{name}.redb"));
    let first = NodeProcess::start(&files[0], &state("first"), None);
    let boot = first.addr.clone();
    let middle_a = NodeProcess::start(&files[1], &state("middle-a"), Some(&boot));
    let last = NodeProcess::start(&files[2], &state("last"), Some(&boot));
    wait_for_route(&boot);

    let (alone, _) = generate(&[]);
    let (chained, log) = generate(&["--bootstrap", &boot]);
    assert_eq!(chained, alone, "{log}");
    assert!(log.contains("route: blocks 10-20"), "{log}");

    // A replica for the middle range joins; the client uses one of the two, and that one is
    // killed while it generates.
    let middle_b = NodeProcess::start(&files[1], &state("middle-b"), Some(&boot));
    std::thread::sleep(Duration::from_secs(2));
    let mut client = Command::new(veil_bin())
        .args([
            "generate",
            "--threads",
            "1",
            "--max-tokens",
            "48",
            "--prompt",
            PROMPT,
        ])
        .args(["--bootstrap", &boot])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut middles = [Some(middle_a), Some(middle_b)];
    let opened = |m: &Option<NodeProcess>| sessions_opened(m.as_ref().unwrap());
    let before: Vec<usize> = middles.iter().map(opened).collect();
    // Wait for the client's first answer bytes, then kill the middle node it opened a session on.
    let mut stdout = BufReader::new(client.stdout.take().unwrap());
    let mut first_bytes = [0u8; 8];
    std::io::Read::read_exact(&mut stdout, &mut first_bytes).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let in_use = loop {
        if let Some(i) = (0..2).find(|&i| opened(&middles[i]) > before[i]) {
            break i;
        }
        assert!(Instant::now() < deadline, "no middle node opened a session");
        std::thread::sleep(Duration::from_millis(20));
    };
    drop(middles[in_use].take());
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    let output = client.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{log}");
    let text = format!("{}{rest}", String::from_utf8_lossy(&first_bytes));
    assert_eq!(text, alone, "{log}");
    assert!(log.contains("failover: blocks 10-20"), "{log}");
    drop(last);
}

/// Sessions `node` has logged opening.
#[test]
fn a_node_reachable_only_through_a_relay_serves_its_blocks_in_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let files = shards(dir.path());
    let state = |name: &str| dir.path().join(format!("{name}.redb"));
    let relay = NodeProcess::start_with(&files[0], &state("relay"), None, &["--relay-server"]);
    let boot = relay.addr.clone();
    // The middle node listens on no address of its own: only through the relay.
    let mut cmd = Command::new(veil_bin());
    cmd.args(["--log", "info", "node", "--threads", "1", "--only-relayed"])
        .arg("--shard")
        .arg(&files[1])
        .arg("--state")
        .arg(state("hidden"))
        .args(["--bootstrap", &boot, "--relay", &boot]);
    let hidden = NodeProcess::spawn(cmd);
    assert!(
        hidden
            .addr
            .contains(&format!("{}/p2p-circuit/p2p/", peer_id(&boot))),
        "{}",
        hidden.addr
    );
    // The last node names no relay: it finds the relay's announcement in the DHT.
    let mut cmd = Command::new(veil_bin());
    cmd.args(["--log", "info", "node", "--threads", "1", "--only-relayed"])
        .args(["--find-relays", "1", "--shard"])
        .arg(&files[2])
        .arg("--state")
        .arg(state("found"))
        .args(["--bootstrap", &boot]);
    let found = NodeProcess::spawn(cmd);
    assert!(found.addr.contains("/p2p-circuit/"), "{}", found.addr);
    wait_for_route(&boot);

    let (alone, _) = generate(&[]);
    let (chained, log) = generate(&["--bootstrap", &boot]);
    assert_eq!(chained, alone, "{log}");
    // The route says which hops the client reaches through the relay, and only those.
    for (blocks, node) in [("10-20", &hidden), ("20-30", &found)] {
        let id = peer_id(&node.addr);
        assert!(
            log.contains(&format!("blocks {blocks} on {id} (relayed)")),
            "{log}"
        );
    }
    assert_eq!(log.matches("(relayed)").count(), 2, "{log}");
    found.wait_for_log("found relay");
    hidden.wait_for_log("reserved a slot on relay");
    relay.wait_for_log("relay: circuit from");
}

#[test]
fn a_verified_split_chain_of_processes_answers_like_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let files = shards(dir.path());
    let state = |name: &str| dir.path().join(format!("{name}.redb"));
    let first = NodeProcess::start(&files[0], &state("a0"), None);
    let boot = first.addr.clone();
    // Two nodes per range: one serves the hop, the other judges it.
    let _others: Vec<NodeProcess> = [(0, "b0"), (1, "a1"), (1, "b1"), (2, "a2"), (2, "b2")]
        .iter()
        .map(|&(i, name)| NodeProcess::start(&files[i], &state(name), Some(&boot)))
        .collect();
    wait_for_route(&boot);
    std::thread::sleep(Duration::from_secs(2));

    let (alone, _) = generate(&[]);
    let client_state = dir.path().join("client.redb");
    let (verified, log) = generate(&[
        "--bootstrap",
        &boot,
        "--verify",
        "2",
        "--chain",
        "--state",
        client_state.to_str().unwrap(),
    ]);
    assert_eq!(verified, alone, "{log}");
    for blocks in ["blocks  0-10", "blocks 10-20", "blocks 20-30"] {
        let line = log
            .lines()
            .find(|l| l.contains(blocks))
            .unwrap_or_else(|| panic!("{log}"));
        assert!(line.contains("passed by 1 of 1 judges"), "{log}");
    }

    // A liar joins the middle range, with a third honest node so that two judges per hop
    // (and a spare for ties) can always be honest. Routes pick the faster node, so requests go
    // on until one takes the liar: its judges fail it, the evidence is written, and anyone
    // holding the model replays the hop from the evidence alone.
    let _c1 = NodeProcess::start(&files[1], &state("c1"), Some(&boot));
    let liar = NodeProcess::start_with(
        &files[1],
        &state("liar"),
        Some(&boot),
        &["--misbehave", "other-model"],
    );
    std::thread::sleep(Duration::from_secs(2));
    let evidence_dir = dir.path().join("evidence");
    let mut attempts = 0;
    let file = loop {
        attempts += 1;
        let (text, log) = generate(&[
            "--bootstrap",
            &boot,
            "--verify",
            "3",
            "--chain",
            "--state",
            dir.path()
                .join(format!("client-{attempts}.redb"))
                .to_str()
                .unwrap(),
            "--evidence-dir",
            evidence_dir.to_str().unwrap(),
        ]);
        assert_eq!(text, alone, "{log}");
        if let Some(file) = std::fs::read_dir(&evidence_dir)
            .ok()
            .and_then(|mut d| d.next())
        {
            break file.unwrap().path();
        }
        // Four nodes serve the middle range and the fastest answer wins, so about one request
        // in four takes the liar; 40 misses in a row happen about once in 100,000 runs.
        assert!(
            attempts < 40,
            "no route took the liar in {attempts} requests"
        );
    };
    let out = verify_evidence(&file, &model_path());
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.contains(&format!("evidence holds: {}", peer_id(&liar.addr)))
            && said.contains("blocks 10-20")
            && said.contains("replayed here"),
        "{said}"
    );
}

fn sessions_opened(node: &NodeProcess) -> usize {
    node.log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("opened session"))
        .count()
}

#[test]
fn a_client_side_split_keeps_ids_and_logits_on_the_client_and_answers_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(veil_bin())
        .args([
            "shard",
            "--client-layers",
            "4",
            "--ranges",
            "4-17,17-30",
            "--model",
        ])
        .arg(model_path())
        .arg("--out")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let file = |r: &str| {
        dir.path()
            .join(format!("SmolLM2-135M-Instruct.Q4_1.{r}.gguf"))
    };
    // Neither file can take ids or give logits.
    for r in ["4-17", "17-30"] {
        let gguf = veil_model::GgufFile::open(file(r)).unwrap();
        let m = veil_model::ShardManifest::of(&gguf).unwrap();
        assert!(!m.embedding && !m.head, "{m:?}");
        assert!(!gguf.has_tensor("token_embd.weight") && !gguf.has_tensor("output_norm.weight"));
    }
    let first = NodeProcess::start(&file("4-17"), &dir.path().join("a.redb"), None);
    let _second = NodeProcess::start(
        &file("17-30"),
        &dir.path().join("b.redb"),
        Some(&first.addr),
    );
    std::thread::sleep(Duration::from_secs(2));

    let (alone, _) = generate(&[]);
    let (split, log) = generate(&["--bootstrap", &first.addr, "--client-layers", "4"]);
    assert_eq!(split, alone, "{log}");
    assert!(
        log.contains("route: blocks  4-17") && log.contains("route: blocks 17-30"),
        "{log}"
    );

    // Without the split, no route: the nodes lack the embedding and the head.
    let out = Command::new(veil_bin())
        .args([
            "generate",
            "--max-tokens",
            "4",
            "--prompt",
            "hi",
            "--bootstrap",
            &first.addr,
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("no route"), "{err}");
}

#[test]
fn the_demo_runs_an_encrypted_swarm_of_processes_and_cleans_up() {
    let home = tempfile::tempdir().unwrap();
    // The demo's work directory lives under VEIL_HOME; point it at a fresh one that holds
    // (a link to) the cached model.
    let model = model_path();
    let models = home.path().join("models");
    std::fs::create_dir_all(&models).unwrap();
    std::os::unix::fs::symlink(&model, models.join(model.file_name().unwrap())).unwrap();
    let out = Command::new(veil_bin())
        .env("VEIL_HOME", home.path())
        .args(["demo", "--max-tokens", "16"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("Paris"), "{stdout}\n{stderr}");
    assert!(stderr.contains("started 4 node processes"), "{stderr}");
    assert!(stderr.contains("the nodes see ids"), "{stderr}");
    assert!(
        stderr.contains("route:") && stderr.contains("stopped the nodes"),
        "{stderr}"
    );
    // Nothing left behind but the model.
    let left: Vec<_> = std::fs::read_dir(home.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, vec![std::ffi::OsString::from("models")], "{left:?}");
}

#[test]
fn a_committee_of_four_with_one_liar_accepts_the_honest_answer_and_proves_the_lie() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_path();
    let state = |name: &str| dir.path().join(format!("{name}.redb"));
    // The stored Q4_1 weights on Veil's kernels: every node gives the same bits, so the
    // committee commits exactly (the gateway's test covers tolerant F32 committees).
    let boot_node = NodeProcess::start_with(&model, &state("a"), None, &[]);
    let boot = boot_node.addr.clone();
    let honest_b = NodeProcess::start_with(&model, &state("b"), Some(&boot), &[]);
    let honest_c = NodeProcess::start_with(&model, &state("c"), Some(&boot), &[]);
    let liar = NodeProcess::start_with(
        &model,
        &state("liar"),
        Some(&boot),
        &["--misbehave", "other-model"],
    );
    wait_for_route(&boot);
    let peers: Vec<String> = [&boot_node, &honest_b, &honest_c, &liar]
        .iter()
        .map(|n| peer_id(&n.addr))
        .collect();
    let liar_id = peer_id(&liar.addr);
    // A request id for which the liar ranks first, so it generates and is judged.
    let request_id = (0u32..)
        .map(|n| format!("{:064x}", n))
        .find(|id| veil_verify::committee(id, "veil", &peers, 4)[0] == liar_id)
        .unwrap();

    let (alone, _) = generate(&[]);
    let evidence_dir = dir.path().join("evidence");
    let client_state = dir.path().join("client.redb");
    let args = |id: &str| {
        vec![
            "--bootstrap".to_string(),
            boot.clone(),
            "--verify".into(),
            "4".into(),
            "--request-id".into(),
            id.to_string(),
            "--evidence-dir".into(),
            evidence_dir.display().to_string(),
            "--state".into(),
            client_state.display().to_string(),
        ]
    };
    // With --recheck the client recomputes the rejected answer itself before punishing: it
    // fails here too, so the liar is caught all the same.
    let mut first = args(&request_id);
    first.push("--recheck".into());
    let (text, log) = generate(&first.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(text, alone, "{log}");
    assert!(log.contains("rechecking a rejected answer here"), "{log}");
    assert!(log.contains(&format!("caught {liar_id} lying")), "{log}");
    assert!(log.contains("(exact commitments)"), "{log}");
    let files: Vec<PathBuf> = std::fs::read_dir(&evidence_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");

    // The evidence re-checks offline, and not once a byte is changed.
    let check = |file: &Path| verify_evidence(file, &model);
    let out = check(&files[0]);
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        report.contains(&format!("{liar_id} signed an answer that fails")),
        "{report}"
    );
    let mut bytes = std::fs::read(&files[0]).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x01;
    let tampered = dir.path().join("tampered.json");
    std::fs::write(&tampered, &bytes).unwrap();
    let out = check(&tampered);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("tampered.json"));
    // Evidence about another model is refused with a clear message.
    let other = dir.path().join("other.gguf");
    std::fs::copy(&model, &other).unwrap();
    std::fs::OpenOptions::new()
        .append(true)
        .open(&other)
        .and_then(|mut f| std::io::Write::write_all(&mut f, b"\0"))
        .unwrap();
    let out = verify_evidence(&files[0], &other);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("has digest"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The client remembers: the liar is left out of the next committee, whatever the id.
    let again = args(&request_id);
    let (text, log) = generate(&again.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(text, alone, "{log}");
    let committee_line = log
        .lines()
        .find(|l| l.contains("committee"))
        .unwrap_or_default();
    assert!(!committee_line.contains(&liar_id), "{log}");
    assert!(!log.contains("lying"), "{log}");

    // And out of plain, unverified routes: with two honest nodes gone, the route has the
    // bootstrap node and the liar to choose from, and never takes the liar.
    drop(honest_b);
    drop(honest_c);
    for _ in 0..3 {
        let plain = [
            "--bootstrap",
            boot.as_str(),
            "--state",
            client_state.to_str().unwrap(),
        ];
        let (text, log) = generate(&plain);
        assert_eq!(text, alone, "{log}");
        assert!(log.contains("route:"), "{log}");
        assert!(
            !log.contains(&liar_id),
            "the liar served a plain route: {log}"
        );
    }
}

/// `veil verify-evidence FILE --model MODEL`.
fn verify_evidence(file: &Path, model: &Path) -> std::process::Output {
    Command::new(veil_bin())
        .arg("verify-evidence")
        .arg(file)
        .arg("--model")
        .arg(model)
        .output()
        .unwrap()
}

/// Runs `veil ARGS` with the test passphrase; panics with its stderr if it fails.
fn veil_ok(args: &[&std::ffi::OsStr]) -> String {
    let out = Command::new(veil_bin())
        .env("VEIL_KEY_PASSPHRASE", "test passphrase")
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "veil {args:?}: {stderr}");
    stderr
}

/// A key and the model encrypted with it, in `dir` under `name`.
fn encrypt(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let (key, enc) = (
        dir.join(format!("{name}.key")),
        dir.join(format!("{name}.gguf")),
    );
    let model = model_path();
    let log = veil_ok(&[
        "ee".as_ref(),
        "keygen".as_ref(),
        "--model".as_ref(),
        model.as_os_str(),
        "--out".as_ref(),
        key.as_os_str(),
    ]);
    assert!(log.contains("group-local key"), "{log}");
    veil_ok(&[
        "ee".as_ref(),
        "encrypt".as_ref(),
        "--model".as_ref(),
        model.as_os_str(),
        "--key".as_ref(),
        key.as_os_str(),
        "--out".as_ref(),
        enc.as_os_str(),
    ]);
    (key, enc)
}

/// A whole-model shard file of `model` that claims to be a shard of the model with `digest`:
/// what a node that wants a committee seat without the right weights would serve.
fn impostor(dir: &Path, model: &Path, digest: &str, name: &str) -> PathBuf {
    let out = dir.join(name);
    std::fs::create_dir_all(&out).unwrap();
    veil_ok(&[
        "shard".as_ref(),
        "--ranges".as_ref(),
        "0-30".as_ref(),
        "--model".as_ref(),
        model.as_os_str(),
        "--out".as_ref(),
        out.as_os_str(),
    ]);
    let file = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "gguf"))
        .expect("a shard file");
    let own = veil_model::store::file_digest(model).unwrap().1;
    let mut bytes = std::fs::read(&file).unwrap();
    let at = bytes
        .windows(own.len())
        .position(|w| w == own.as_bytes())
        .expect("the shard names its model");
    bytes[at..at + own.len()].copy_from_slice(digest.as_bytes());
    std::fs::write(&file, bytes).unwrap();
    file
}

#[test]
fn a_committee_on_an_encrypted_quantized_model_answers_and_catches_other_keys_and_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let state = |name: &str| dir.path().join(format!("{name}.redb"));
    let (key, enc) = encrypt(dir.path(), "enc");
    let (_, other_key) = encrypt(dir.path(), "other");
    let digest = veil_model::store::file_digest(&enc).unwrap().1;
    // Two impostors claim the encrypted model: one serves it under another key, one serves
    // the plaintext model.
    let under_other_key = impostor(dir.path(), &other_key, &digest, "other-key");
    let plaintext = impostor(dir.path(), &model_path(), &digest, "plaintext");

    let boot_node = NodeProcess::start_with(&enc, &state("a"), None, &[]);
    let boot = boot_node.addr.clone();
    let honest_b = NodeProcess::start_with(&enc, &state("b"), Some(&boot), &[]);
    let honest_c = NodeProcess::start_with(&enc, &state("c"), Some(&boot), &[]);
    let liars = [
        NodeProcess::start_with(&under_other_key, &state("k"), Some(&boot), &[]),
        NodeProcess::start_with(&plaintext, &state("p"), Some(&boot), &[]),
    ];
    wait_for_route_with(
        &boot,
        &[
            "--encrypted".as_ref(),
            enc.as_os_str(),
            "--key".as_ref(),
            key.as_os_str(),
        ],
    );
    let honest: Vec<String> = [&boot_node, &honest_b, &honest_c]
        .iter()
        .map(|n| peer_id(&n.addr))
        .collect();
    let liar_ids: Vec<String> = liars.iter().map(|n| peer_id(&n.addr)).collect();
    let mut everyone = honest.clone();
    everyone.extend(liar_ids.iter().cloned());

    let (alone, _) = generate(&[]);
    let evidence_dir = dir.path().join("evidence");
    let client_state = dir.path().join("client.redb");
    // Runs `veil generate` on the encrypted model with `args`; checks it answers as one process
    // does and returns its log.
    let ask_encrypted = |args: &[String]| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (text, log) = generate(&args);
        assert_eq!(text, alone, "{log}");
        log
    };
    for (n, liar) in liar_ids.iter().enumerate() {
        // A request id whose committee of 4 has this liar first and no other liar (the one
        // caught before is avoided anyway).
        let other = &liar_ids[1 - n];
        let request_id = (0u32..)
            .map(|i| format!("{:064x}", i))
            .find(|id| {
                let members = veil_verify::committee(id, "veil", &everyone, 4);
                members[0] == *liar && !members.contains(other)
            })
            .unwrap();
        let args: Vec<String> = vec![
            "--bootstrap".into(),
            boot.clone(),
            "--encrypted".into(),
            enc.display().to_string(),
            "--key".into(),
            key.display().to_string(),
            "--verify".into(),
            "4".into(),
            "--request-id".into(),
            request_id,
            "--evidence-dir".into(),
            evidence_dir.display().to_string(),
            "--state".into(),
            client_state.display().to_string(),
            // Believe what nodes announce, so the liars reach the committee and are caught by
            // their digests (the weights check would refuse them first: see below).
            "--weights-openings".into(),
            "0".into(),
        ];
        let log = ask_encrypted(&args);
        assert!(log.contains(&format!("caught {liar} lying")), "{log}");
        assert!(log.contains("(exact commitments)"), "{log}");
    }

    // With the weights check (the default), neither impostor is seated: both hold files other
    // than the one they claim, so their roots differ from the client's copy's.
    let fresh = dir.path().join("fresh-client.redb");
    let log = ask_encrypted(&[
        "--bootstrap".into(),
        boot.clone(),
        "--verify".into(),
        "4".into(),
        "--state".into(),
        fresh.display().to_string(),
        "--encrypted".into(),
        enc.display().to_string(),
        "--key".into(),
        key.display().to_string(),
    ]);
    assert!(!log.contains("lying"), "{log}");
    for liar in &liar_ids {
        assert!(
            log.contains(&format!("node {liar} failed the weights check"))
                && log.contains("holds other weights"),
            "{log}"
        );
    }

    // The evidence re-checks against the encrypted file, and says what is missing without it.
    let files: Vec<PathBuf> = std::fs::read_dir(&evidence_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 2, "{files:?}");
    for file in &files {
        let out = verify_evidence(file, &enc);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = verify_evidence(file, &model_path());
        assert!(!out.status.success());
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(said.contains("the encrypted GGUF"), "{said}");
    }
}

/// The run records in a stopped node's database, through `veil meta export`.
fn exported_runs(state: &Path, out: &Path) -> Vec<serde_json::Value> {
    let export = Command::new(veil_bin())
        .args(["meta", "export", "--history"])
        .arg(state)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    assert!(
        export.status.success(),
        "{}",
        String::from_utf8_lossy(&export.stderr)
    );
    std::fs::read_to_string(out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn whole_model_nodes_record_their_runs_and_share_them_over_gossip() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_path();
    let (state_a, state_b) = (dir.path().join("a.redb"), dir.path().join("b.redb"));
    let b = NodeProcess::start(&model, &state_b, None);
    let a = NodeProcess::start(&model, &state_a, Some(&b.addr));
    wait_for_route(&b.addr);

    // The generation is recorded by the node that served it and gossiped to the other.
    let out = Command::new(veil_bin())
        .args([
            "generate",
            "--threads",
            "1",
            "--max-tokens",
            "8",
            "--prompt",
            PROMPT,
        ])
        .args(["--bootstrap", &b.addr])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let served_eight = |n: &NodeProcess| {
        n.log
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("kept run record: ") && l.contains(", 8 generated"))
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let (server, other) = loop {
        if served_eight(&a) {
            break (&a, &b);
        }
        if served_eight(&b) {
            break (&b, &a);
        }
        assert!(Instant::now() < deadline, "no node recorded the run");
        std::thread::sleep(Duration::from_millis(200));
    };
    let server_id = peer_id(&server.addr);
    other.wait_for_log(&format!("kept run record from peer {server_id}"));

    // A running node holds its database: export says what to do.
    let busy = Command::new(veil_bin())
        .args(["meta", "export", "--history"])
        .arg(&state_a)
        .args(["--out", "unused.jsonl"])
        .output()
        .unwrap();
    assert!(!busy.status.success());
    let stderr = String::from_utf8_lossy(&busy.stderr);
    assert!(stderr.contains("still running"), "{stderr}");
    drop((a, b));

    for (name, state) in [("a", &state_a), ("b", &state_b)] {
        let runs = exported_runs(state, &dir.path().join(format!("{name}.jsonl")));
        let run = runs
            .iter()
            .find(|r| r["node"] == server_id.as_str() && r["tokens"] == 8)
            .unwrap_or_else(|| panic!("node {name} lacks the 8-token run: {runs:?}"));
        assert_eq!(run["features"]["workload"]["output_tokens"], 8);
        assert!(
            run["features"]["workload"]["prompt_tokens"]
                .as_u64()
                .unwrap()
                > 5
        );
        assert_eq!(run["method"], "plain");
        assert!(run["perplexity"].as_f64().unwrap() > 1.0);
    }

    let missing = Command::new(veil_bin())
        .args(["meta", "export", "--history"])
        .arg(dir.path().join("missing.redb"))
        .args(["--out", "unused.jsonl"])
        .output()
        .unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no history at"));
}

#[test]
fn a_node_holding_other_weights_fails_the_weights_challenge() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_path();
    let files = shards(dir.path());
    // A copy of the middle shard with one byte changed deep inside one tensor: it still claims
    // to be blocks 10-20 of the model.
    let tampered = dir.path().join("tampered.gguf");
    std::fs::copy(&files[1], &tampered).unwrap();
    let at = {
        let gguf = veil_model::GgufFile::open(&tampered).unwrap();
        let content = gguf.content();
        content.tensor_data_offset + content.tensor_infos["blk.15.ffn_down.weight"].offset + 1000
    };
    let mut bytes = std::fs::read(&tampered).unwrap();
    bytes[at as usize] ^= 0x10;
    std::fs::write(&tampered, bytes).unwrap();

    let state = |n: &str| dir.path().join(format!("{n}.redb"));
    let a = NodeProcess::start(&files[0], &state("a"), None);
    let b = NodeProcess::start(&files[1], &state("b"), Some(&a.addr));
    let liar = NodeProcess::start(&tampered, &state("liar"), Some(&a.addr));
    let d = NodeProcess::start(&files[2], &state("d"), Some(&a.addr));
    let deadline = Instant::now() + Duration::from_secs(60);
    let (out, stdout) = loop {
        let out = Command::new(veil_bin())
            .args([
                "zk",
                "challenge",
                "--openings",
                "8",
                "--bootstrap",
                &a.addr,
                "--model",
            ])
            .arg(&model)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        if stdout.lines().filter(|l| l.starts_with("node ")).count() == 4 {
            break (out, stdout);
        }
        assert!(Instant::now() < deadline, "not all nodes found: {stdout}");
        std::thread::sleep(Duration::from_millis(300));
    };
    assert!(!out.status.success(), "{stdout}");
    let line = |node: &NodeProcess| {
        let id = peer_id(&node.addr);
        stdout
            .lines()
            .find(|l| l.contains(&id))
            .unwrap_or_else(|| panic!("no line for {id}: {stdout}"))
            .to_string()
    };
    for honest in [&a, &b, &d] {
        assert!(
            line(honest).contains("ok: root matches the model; 8 random chunks"),
            "{stdout}"
        );
    }
    let caught = line(&liar);
    assert!(
        caught.contains("FAIL") && caught.contains("holds other weights"),
        "{caught}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("1 of 4 nodes failed"));

    // Bad input is a clear error.
    for (args, says) in [
        (
            vec!["zk", "commit", "--model", "/nonexistent.gguf"],
            "nonexistent",
        ),
        (
            vec![
                "zk",
                "commit",
                "--model",
                model.to_str().unwrap(),
                "--ranges",
                "5-3",
            ],
            "5",
        ),
        (
            vec![
                "zk",
                "commit",
                "--model",
                model.to_str().unwrap(),
                "--ranges",
                "0-40",
            ],
            "40",
        ),
    ] {
        let out = Command::new(veil_bin()).args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(
            stderr.contains(says) && !stderr.contains("panicked"),
            "{args:?}: {stderr}"
        );
    }
}

/// Gemma 3 270M (a base model of another architecture, K-quant file) served by two shard
/// nodes gives the text it gives in one process.
#[test]
fn a_gemma_chain_of_two_nodes_answers_like_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(veil_bin())
        .args([
            "shard",
            "--model",
            "gemma3-270m",
            "--ranges",
            "0-9,9-18",
            "--out",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let file = |r: &str| dir.path().join(format!("gemma-3-270m-q4_k_m.{r}.gguf"));
    let state = |name: &str| dir.path().join(format!("{name}.redb"));
    let first = NodeProcess::start(&file("0-9"), &state("first"), None);
    let boot = first.addr.clone();
    let _last = NodeProcess::start(&file("9-18"), &state("last"), Some(&boot));

    let gemma = |extra: &[&str]| {
        let out = Command::new(veil_bin())
            .args([
                "generate",
                "--model",
                "gemma3-270m",
                "--raw",
                "--threads",
                "1",
            ])
            .args(["--max-tokens", "12", "--prompt", "The capital of France is"])
            .args(extra)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            stderr,
        )
    };
    let (ok, alone, log) = gemma(&[]);
    assert!(ok, "{log}");
    assert!(alone.starts_with(" the capital of"), "{alone}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let (chained, log) = loop {
        let (ok, text, log) = gemma(&["--bootstrap", &boot]);
        if ok {
            break (text, log);
        }
        assert!(Instant::now() < deadline, "no route: {log}");
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(chained, alone, "{log}");
    assert!(
        log.lines()
            .any(|l| l.starts_with("route: blocks") && l.contains(" 9-18 ")),
        "{log}"
    );
}
