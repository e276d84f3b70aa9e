//! Writes the fuzzers' starting inputs into `fuzz/corpus/<target>/seed-*`: one well-formed
//! example of each message and file, so the fuzzer starts past the outer syntax. Run once:
//! `cargo run --release -p veil-fuzz --example seeds`.

use std::path::{Path, PathBuf};

use libp2p::identity::Keypair;
use veil_net::protocol::{infer, prove, verify, ErrorKind, Refusal};
use veil_net::wire::{SessionId, StepInput, WireDType, WireTensor};
use veil_verify::{
    ActivationCommitment, Claim, CommitmentBuilder, CommitmentMode, Evidence, HopInput, HopJob,
    HopTranscript, Job, SamplingSpec, Signed, Verdict, VerdictReveal, EVIDENCE_VERSION,
};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = root().join("fuzz/corpus").join(target);
    std::fs::create_dir_all(&dir).expect("corpus folder");
    std::fs::write(dir.join(format!("seed-{name}")), bytes).expect("seed written");
}

fn cbor<T: serde::Serialize>(value: &T) -> Vec<u8> {
    cbor4ii::serde::to_vec(Vec::new(), value).expect("encodes")
}

fn tensor(rows: usize, cols: usize) -> WireTensor {
    WireTensor {
        dtype: WireDType::F32,
        shape: vec![rows, cols],
        data: (0..rows * cols)
            .flat_map(|i| (i as f32 * 0.01).to_le_bytes())
            .collect(),
    }
}

fn commitment(tokens: usize) -> ActivationCommitment {
    let mut builder = CommitmentBuilder::new(576, CommitmentMode::Exact).expect("builder");
    for t in 0..tokens {
        let row: Vec<f32> = (0..576).map(|i| (i + t) as f32 * 1e-3).collect();
        builder.push(&row).expect("a row");
    }
    builder.finish()
}

fn job(key: &Keypair) -> Signed<Job> {
    let body = Job {
        request_id: "ab".repeat(32),
        model_digest: "cd".repeat(32),
        format: "q4_1".into(),
        generator: key.public().to_peer_id().to_string(),
        claim: Claim {
            prompt: vec![1, 2, 3],
            output: vec![4, 5],
            sampling: SamplingSpec {
                temperature: 0.0,
                top_k: None,
                top_p: None,
                seed: 0,
            },
            commitment: commitment(2),
        },
    };
    Signed::sign(body, key).expect("signed")
}

/// Inputs of a first hop: a prompt, then one token.
fn token_inputs() -> Vec<HopInput> {
    vec![HopInput::Tokens(vec![1, 2, 3]), HopInput::Tokens(vec![4])]
}

fn signed_hop(key: &Keypair, inputs: &[HopInput]) -> Signed<HopJob> {
    let mut transcript = HopTranscript::new();
    for input in inputs {
        transcript.push(input, &[0.5; 8]);
    }
    let body = HopJob {
        request_id: "ab".repeat(32),
        model_digest: "cd".repeat(32),
        format: "q4_1".into(),
        node: key.public().to_peer_id().to_string(),
        first_block: 0,
        end_block: 15,
        digests: transcript.finish(),
    };
    Signed::sign(body, key).expect("signed")
}

/// Evidence two judges signed against `job`, carrying `inputs` (a hop's).
fn evidence<J: veil_verify::Judged + Clone>(job: &Signed<J>, inputs: Vec<HopInput>) -> Vec<u8> {
    let digest = veil_verify::job_digest(&job.body).expect("digest");
    let (mut commits, mut reveals) = (Vec::new(), Vec::new());
    for _ in 0..2 {
        let judge = Keypair::generate_ed25519();
        let reveal = VerdictReveal::new(
            digest.clone(),
            Verdict::Fail {
                token: 0,
                reason: "differs".into(),
            },
        );
        let commit = reveal.commit(&judge.public().to_peer_id()).expect("commit");
        commits.push(Signed::sign(commit, &judge).expect("signed"));
        reveals.push(Signed::sign(reveal, &judge).expect("signed"));
    }
    Evidence {
        version: EVIDENCE_VERSION,
        job: job.clone(),
        commits,
        reveals,
        inputs,
    }
    .to_bytes()
    .expect("bytes")
}

fn copy(target: &str, from: &Path) {
    let name = from.file_name().and_then(|n| n.to_str()).expect("a name");
    write(target, name, &std::fs::read(from).expect("fixture"));
}

fn main() {
    let key = Keypair::generate_ed25519();
    let session = SessionId([9; 16]);
    let (signed, hop) = (job(&key), signed_hop(&key, &token_inputs()));

    let infer_requests = [
        ("info", infer::Request::Info { model: None }),
        ("open", infer::Request::Open { model: None }),
        (
            "step-tokens",
            infer::Request::Step {
                session,
                input: StepInput::Tokens(vec![1, 2, 3]),
            },
        ),
        (
            "step-hidden",
            infer::Request::Step {
                session,
                input: StepInput::Hidden(tensor(2, 576)),
            },
        ),
        ("close", infer::Request::Close { session }),
    ];
    for (name, request) in infer_requests {
        write("wire_request", name, &cbor(&request));
    }
    let verify_requests = [
        (
            "open-verified",
            verify::Request::OpenVerified {
                request_id: "ab".repeat(32),
                sampling: signed.body.claim.sampling.clone(),
                commitment: CommitmentMode::Exact,
                model: None,
            },
        ),
        ("finish", verify::Request::Finish { session }),
        (
            "open-hop",
            verify::Request::OpenHop {
                request_id: "ab".repeat(32),
                model: None,
            },
        ),
        ("finish-hop", verify::Request::FinishHop { session }),
        (
            "judge",
            verify::Request::Judge {
                job: Box::new(signed.clone()),
            },
        ),
        (
            "judge-hop",
            verify::Request::JudgeHop {
                job: Box::new(hop.clone()),
                inputs: vec![StepInput::Tokens(vec![1, 2, 3]), StepInput::Tokens(vec![4])],
            },
        ),
        (
            "reveal",
            verify::Request::Reveal {
                job: "ef".repeat(32),
            },
        ),
    ];
    for (name, request) in verify_requests {
        write("wire_request", name, &cbor(&request));
    }
    let prove_requests = [
        (
            "open-weights",
            prove::Request::OpenWeights {
                leaves: vec![0, 5],
                model: None,
            },
        ),
        ("attest", prove::Request::Attest { nonce: [3; 32] }),
        (
            "prove-inference",
            prove::Request::ProveInference { input: vec![1; 64] },
        ),
    ];
    for (name, request) in prove_requests {
        write("wire_request", name, &cbor(&request));
    }
    let busy = Refusal::new(ErrorKind::Busy, "busy");
    write(
        "wire_response",
        "output",
        &cbor(&infer::Response::Output(tensor(1, 16))),
    );
    write(
        "wire_response",
        "error",
        &cbor(&infer::Response::Refused(busy.clone())),
    );
    for (name, response) in [
        ("opened", verify::Response::Opened { session }),
        (
            "finished",
            verify::Response::Finished(Box::new(signed.clone())),
        ),
        (
            "hop-finished",
            verify::Response::HopFinished(Box::new(hop.clone())),
        ),
        ("refused", verify::Response::Refused(busy)),
    ] {
        write("wire_response", name, &cbor(&response));
    }
    write(
        "signed_job",
        "job",
        &serde_json::to_vec(&signed).expect("json"),
    );
    write(
        "signed_job",
        "hop",
        &serde_json::to_vec(&hop).expect("json"),
    );
    write("evidence", "job", &evidence(&signed, Vec::new()));
    write("evidence", "hop", &evidence(&hop, token_inputs()));
    let hidden = vec![HopInput::Hidden {
        positions: 1,
        values: vec![0.5, -1.0, 3.25, f32::MIN_POSITIVE],
    }];
    write(
        "evidence",
        "hop-hidden",
        &evidence(&signed_hop(&key, &hidden), hidden),
    );

    let record = serde_json::json!({
        "features": {
            "model": {"name": "smollm2", "parameters_m": 135.0, "layers": 30, "hidden": 576, "stored_bits": 5.0},
            "hardware": {"cores": 2, "memory_gib": 24.0, "avx2": true, "avx512_vnni": true, "price_per_hour": 1.0},
            "workload": {"prompt_tokens": 37, "output_tokens": 64, "batch": 1, "shared_prefix": 0.0, "rewrite": false}
        },
        "method": "plain", "seconds": 1.0, "tokens": 64, "latency_ms": 1000.0,
        "perplexity": 10.0, "node": "seed", "at_unix": 1
    });
    write("run_record", "record", record.to_string().as_bytes());

    let tee = root().join("crates/veil-tee/tests/fixtures");
    for name in ["report_milan.hex", "sgx_quote", "tdx_quote"] {
        copy("tee_evidence", &tee.join(name));
    }

    let proof = serde_json::json!({
        "commitment": "00".repeat(32), "input": vec![0u8; 64], "output": vec![0i64; 10],
        "proof": "00".repeat(64)
    });
    write("zk_proof", "proof", proof.to_string().as_bytes());

    let fixtures = root().join("crates/veil-model/tests/fixtures/conformance");
    let gguf = fixtures.join("tiny-llama-q8_0.gguf");
    let bytes = std::fs::read(&gguf).expect("fixture");
    // The header and metadata (the tensor data matters less and is large).
    write(
        "gguf_header",
        "tiny-llama",
        &bytes[..bytes.len().min(64 << 10)],
    );
    write("gguf_header", "tiny-llama-whole", &bytes);

    let file = veil_model::GgufFile::open(&gguf).expect("fixture opens");
    let config = veil_model::LlamaConfig::from_gguf(&file).expect("config");
    let key = veil_ee::EeKey::generate_group_local(&config, &"cd".repeat(32));
    // The lowest work factor, so the fuzzer's runs are not all spent in scrypt.
    let sealed = key
        .seal_with_work_factor("fuzz passphrase", Some(1))
        .expect("sealed");
    write("ee_key", "group-local", &sealed);
    println!(
        "seeds written under {}",
        root().join("fuzz/corpus").display()
    );
}
