//! `veil tee` on published evidence and on a directory that mimics configfs-tsm: verdicts
//! with their reasons, evidence bound to the node's key, clear errors for bad input.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{tee_fixture, veil_bin, FakeTsm};

/// Inside the samples' collateral validity (2025-06-19 to 2025-07-19): 2025-07-01.
const AT: &str = "1751328000";
/// The TDX sample's MRTD.
const TDX_MRTD: &str = "91eb2b44d141d4ece09f0c75c2c53d247a3c68edd7fafe8a3520c942a604a407de03ae6dc5f87f27428b2538873118b7";

fn veil(args: &[&str]) -> Output {
    Command::new(veil_bin()).args(args).output().unwrap()
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// Writes a policy file named after its contents, so several can live side by side.
fn policy(dir: &Path, body: &str) -> String {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    body.hash(&mut hasher);
    let path = dir.join(format!("{:016x}.toml", hasher.finish()));
    std::fs::write(&path, body).unwrap();
    path.to_str().unwrap().to_string()
}

fn allow_tdx(dir: &Path, extra: &str) -> String {
    policy(
        dir,
        &format!("{extra}\n[[measurement]]\nkind = \"tdx\"\nvalue = \"{TDX_MRTD}\"\nnote = \"the dcap-qvl sample\"\n"),
    )
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn verify_prints_the_verdict_and_why() {
    let dir = tempfile::tempdir().unwrap();
    let quote = tee_fixture("tdx_quote");
    let collateral = tee_fixture("tdx_quote_collateral.json");
    let args = |policy: &str, extra: &[&str]| -> Output {
        let mut all = vec![
            "tee",
            "verify",
            "--evidence",
            path(&quote),
            "--collateral",
            path(&collateral),
            "--policy",
            policy,
        ];
        all.extend_from_slice(extra);
        veil(&all)
    };
    let allowed = allow_tdx(dir.path(), "");
    let out = args(&allowed, &["--at", AT]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("verdict: ACCEPTED (tdx evidence)"),
        "{stdout}"
    );
    assert!(stdout.contains("the dcap-qvl sample"), "{stdout}");

    // Now (the collateral expired in 2025), for another node, with an old nonce, under a
    // policy that lists another image: each fails with its reason, and the exit code says so.
    let out = args(&allowed, &[]);
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(stdout.contains("FAIL signature"), "{stdout}");
    assert!(stderr.contains("evidence rejected"), "{stderr}");
    let peer = "12D3KooWEcoGXdt7brTUwv7XoviBNzyBZYq8dTh9LtcFH1jihqt6";
    let out = args(
        &allowed,
        &["--at", AT, "--peer", peer, "--nonce", &"ab".repeat(32)],
    );
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(
        stderr.contains("wrong key binding") && stderr.contains("nonce"),
        "{stderr}"
    );
    let other = policy(
        dir.path(),
        &format!(
            "[[measurement]]\nkind = \"tdx\"\nvalue = \"{}\"\n",
            "0".repeat(96)
        ),
    );
    let (_, stderr) = text(&args(&other, &["--at", AT]));
    assert!(stderr.contains("not on the allow-list"), "{stderr}");

    // Bad input: a clear error, never a panic.
    let garbage = dir.path().join("garbage");
    std::fs::write(&garbage, b"\x00\x01 not a quote").unwrap();
    for (extra, says) in [
        (
            vec!["--evidence", path(&garbage), "--policy", &allowed],
            "header matches none",
        ),
        (
            vec!["--evidence", "/nonexistent", "--policy", &allowed],
            "cannot read the evidence",
        ),
        (
            vec!["--evidence", path(&quote), "--policy", &allowed],
            "needs its DCAP collateral",
        ),
        (
            vec![
                "--evidence",
                path(&quote),
                "--collateral",
                path(&quote),
                "--policy",
                &allowed,
            ],
            "not DCAP collateral",
        ),
        (
            vec![
                "--evidence",
                path(&quote),
                "--collateral",
                path(&collateral),
                "--policy",
                &policy(dir.path(), "allow_debug = 3"),
            ],
            "bad policy",
        ),
        (
            vec![
                "--evidence",
                path(&quote),
                "--collateral",
                path(&collateral),
                "--policy",
                &allowed,
                "--peer",
                "nobody",
            ],
            "not a peer id",
        ),
        (
            vec![
                "--evidence",
                path(&quote),
                "--collateral",
                path(&collateral),
                "--policy",
                &allowed,
                "--nonce",
                "abc",
            ],
            "nonce",
        ),
    ] {
        let mut all = vec!["tee", "verify"];
        all.extend(extra);
        let out = veil(&all);
        let (_, stderr) = text(&out);
        assert!(!out.status.success(), "{all:?}");
        assert!(stderr.contains(says), "{all:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[test]
fn report_binds_the_node_key_through_configfs_tsm() {
    let tsm = FakeTsm::start(
        "tdx_guest",
        std::fs::read(tee_fixture("tdx_quote")).unwrap(),
    );
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("node.redb");
    let bundle = dir.path().join("evidence.json");
    let collateral = tee_fixture("tdx_quote_collateral.json");
    let out = veil(&[
        "tee",
        "report",
        "--state",
        path(&state),
        "--report-dir",
        path(tsm.dir.path()),
        "--collateral",
        path(&collateral),
        "--out",
        path(&bundle),
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let peer: libp2p::PeerId = stdout
        .split("for node ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or_else(|| panic!("no node in {stdout:?}"))
        .parse()
        .unwrap();

    // What the node asked its TEE to sign: its own key and the time it names in the bundle.
    let evidence: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&bundle).unwrap()).unwrap();
    let at = evidence["produced_at"].as_u64().unwrap();
    let key = veil_net::public_key_of(&peer).unwrap();
    let want = veil_tee::report_data(&key, &veil_tee::Freshness::Time(at));
    assert_eq!(tsm.inblobs.lock().unwrap().as_slice(), [want.to_vec()]);
    // The report entry is gone afterwards.
    assert_eq!(std::fs::read_dir(tsm.dir.path()).unwrap().count(), 0);

    // The bundle verifies as far as the hardware goes, but the sample quote names no Veil node
    // and no time, so a verifier expecting this node refuses it.
    let allowed = allow_tdx(dir.path(), "max_age_seconds = 600");
    let out = veil(&[
        "tee",
        "verify",
        "--evidence",
        path(&bundle),
        "--policy",
        &allowed,
        "--at",
        AT,
        "--peer",
        &peer.to_string(),
    ]);
    let (stdout, _) = text(&out);
    assert!(!out.status.success());
    assert!(stdout.contains("ok   signature"), "{stdout}");
    assert!(stdout.contains("FAIL binding"), "{stdout}");
    assert!(stdout.contains("FAIL freshness"), "{stdout}");

    // No interface, or an unknown provider: clear errors.
    let out = veil(&[
        "tee",
        "report",
        "--state",
        path(&state),
        "--report-dir",
        "/nonexistent/tsm",
        "--out",
        path(&bundle),
    ]);
    assert!(text(&out).1.contains("not present"), "{:?}", text(&out));
    let odd = FakeTsm::start("nitro_guest", vec![1, 2, 3]);
    let out = veil(&[
        "tee",
        "report",
        "--state",
        path(&state),
        "--report-dir",
        path(odd.dir.path()),
        "--out",
        path(&bundle),
    ]);
    assert!(
        text(&out).1.contains("unknown provider"),
        "{:?}",
        text(&out)
    );
}
