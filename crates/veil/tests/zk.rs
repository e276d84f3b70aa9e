//! `veil zk setup|prove|verify` as separate processes: the prover keeps the secret file, the
//! verifier sees only the public files and the proof; bad files are clear errors.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::veil_bin;

fn veil(args: &[&str]) -> Output {
    Command::new(veil_bin())
        .args(args)
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."))
        .output()
        .unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn fails(out: &Output, says: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(says) && !stderr.contains("panicked"),
        "{stderr}"
    );
}

#[test]
fn a_proof_made_in_one_process_verifies_in_another_and_a_corrupted_one_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let setup = dir.path().join("cnn");
    let s = setup.to_str().unwrap();
    ok(&veil(&[
        "zk",
        "setup",
        "--model",
        "models/zk/cnn.json",
        "--out",
        s,
    ]));
    let proof = dir.path().join("proof.json");
    let p = proof.to_str().unwrap();
    let said = ok(&veil(&[
        "zk", "prove", "--setup", s, "--digit", "0", "--out", p,
    ]));
    assert!(said.contains("proved in"), "{said}");
    // The verifier gets the public files only.
    let public = dir.path().join("public");
    std::fs::create_dir(&public).unwrap();
    for f in ["public.json", "params.bin"] {
        std::fs::copy(setup.join(f), public.join(f)).unwrap();
    }
    let verify = |proof: &str| {
        veil(&[
            "zk",
            "verify",
            "--public",
            public.join("public.json").to_str().unwrap(),
            "--params",
            public.join("params.bin").to_str().unwrap(),
            "--proof",
            proof,
        ])
    };
    let said = ok(&verify(p));
    assert!(said.contains("verified"), "{said}");

    // A corrupted proof file: a flipped digit of the proof, garbage, a missing file.
    let text = std::fs::read_to_string(&proof).unwrap();
    let mut value: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut bytes = value["proof"].as_str().unwrap().to_string().into_bytes();
    bytes[300] = if bytes[300] == b'0' { b'1' } else { b'0' };
    value["proof"] = serde_json::Value::String(String::from_utf8(bytes).unwrap());
    let corrupt = dir.path().join("corrupt.json");
    std::fs::write(&corrupt, value.to_string()).unwrap();
    fails(&verify(corrupt.to_str().unwrap()), "does not verify");
    let garbage = dir.path().join("garbage.json");
    std::fs::write(&garbage, "{\"proof\": 3}").unwrap();
    fails(&verify(garbage.to_str().unwrap()), "not a valid proof");
    fails(&verify("/nonexistent/proof.json"), "cannot read the proof");
    // A proof under another setup's commitment (same model, fresh salt) is refused.
    let other = dir.path().join("other");
    ok(&veil(&[
        "zk",
        "setup",
        "--model",
        "models/zk/cnn.json",
        "--out",
        other.to_str().unwrap(),
    ]));
    let other_proof = dir.path().join("other-proof.json");
    ok(&veil(&[
        "zk",
        "prove",
        "--setup",
        other.to_str().unwrap(),
        "--digit",
        "0",
        "--out",
        other_proof.to_str().unwrap(),
    ]));
    fails(&verify(other_proof.to_str().unwrap()), "another commitment");
    // Bad inputs to prove.
    fails(
        &veil(&["zk", "prove", "--setup", s, "--digit", "100000", "--out", p]),
        "held-out digits",
    );
    let input = dir.path().join("input.json");
    std::fs::write(&input, "{\"input\": [1, 2, 3]}").unwrap();
    fails(
        &veil(&[
            "zk",
            "prove",
            "--setup",
            s,
            "--input",
            input.to_str().unwrap(),
            "--out",
            p,
        ]),
        "64 pixels",
    );
}

#[test]
fn the_benchmark_against_ezkl_prints_both_engines_and_the_ratio() {
    let out = veil(&[
        "zk",
        "bench",
        "--runs",
        "1",
        "--models",
        "models/zk/mlp.json",
    ]);
    let stdout = ok(&out);
    assert!(stdout.contains("| mlp | veil | 2^13 |"), "{stdout}");
    assert!(stdout.contains("| mlp | ezkl | 2^16 |"), "{stdout}");
    assert!(stdout.contains("Veil proves in"), "{stdout}");
}
