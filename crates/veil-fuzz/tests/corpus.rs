//! Replays every input the fuzzer kept (`fuzz/corpus/<target>/`) through its target, on the
//! stable toolchain: CI runs them all on every change, so a decoder that starts to panic on
//! any of them fails here.

use std::path::PathBuf;

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus")
}

#[test]
fn every_target_has_a_corpus_and_survives_it() {
    for (name, target) in veil_fuzz::TARGETS {
        let dir = corpus_dir().join(name);
        let mut inputs: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("no corpus for {name} in {}: {e}", dir.display()))
            .map(|entry| entry.unwrap().path())
            .collect();
        inputs.sort();
        assert!(!inputs.is_empty(), "the corpus of {name} is empty");
        for input in &inputs {
            let data = std::fs::read(input).unwrap();
            let outcome = std::panic::catch_unwind(|| target(&data));
            assert!(outcome.is_ok(), "{name} panicked on {}", input.display());
        }
        eprintln!("{name}: {} inputs", inputs.len());
    }
}

#[test]
fn a_stranger_cannot_make_a_judge_expand_a_huge_hop_record() {
    // Four billion one-position steps, claimed in a few bytes: counting must not allocate.
    let record = br#"{"body":{"request_id":"","model_digest":"","format":"","node":"","first_block":0,"end_block":1,"digests":{"steps":[[1,4294967295]],"inputs":[],"outputs":[]}},"signer":"","public_key":"","signature":""}"#;
    veil_fuzz::signed_job(record);
}
