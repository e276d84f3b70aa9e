//! Fuzz targets: every decoder that takes bytes from a peer, a client or a file, run the way
//! Veil runs it, on arbitrary bytes. Each target must return (with an error or not) and never
//! panic, abort or allocate without bound.
//!
//! cargo-fuzz drives these functions from `fuzz/` (coverage-guided, libFuzzer); the tests here
//! replay the committed corpus (`fuzz/corpus/<target>/`) on the stable toolchain, so CI runs
//! every input the fuzzer ever kept.

use std::io::Write;
use std::sync::OnceLock;

use halo2_proofs::pasta::EqAffine;
use halo2_proofs::plonk::VerifyingKey;
use halo2_proofs::poly::commitment::Params;
use libp2p::identity::Keypair;
use veil_net::protocol::{infer, prove, verify};
use veil_net::wire::{ShardInfo, StepInput};
use veil_verify::{Evidence, HopJob, Job, Signed};

/// Builds what targets share once, before the first input (the proof target's verifying key
/// takes seconds, which would count against the first input's time limit).
pub fn prepare() {
    let _ = zk_keys();
}

/// A target: bytes in, nothing out.
pub type Target = fn(&[u8]);

/// Every target, by the name its corpus folder and `fuzz/fuzz_targets/` file carry.
pub const TARGETS: [(&str, Target); 9] = [
    ("wire_request", wire_request),
    ("wire_response", wire_response),
    ("signed_job", signed_job),
    ("evidence", evidence),
    ("run_record", run_record),
    ("tee_evidence", tee_evidence),
    ("zk_proof", zk_proof),
    ("gguf_header", gguf_header),
    ("ee_key", ee_key),
];

/// A shard like the default model's middle blocks, for the checks a node makes on a step.
fn shard_info(embedding: bool) -> ShardInfo {
    ShardInfo {
        model_digest: "0".repeat(64),
        first_block: if embedding { 0 } else { 10 },
        end_block: 20,
        block_count: 30,
        embedding,
        head: false,
        hidden_size: 576,
        max_session_tokens: 8192,
        format: "q4_1".into(),
        tee: None,
        weights: None,
        zk_commitment: None,
        exact: true,
    }
}

/// What a node does with a step's input before the model sees it.
fn check_step(input: &StepInput) {
    for info in [shard_info(true), shard_info(false)] {
        if info.check_input(input, 49_152).is_ok() {
            if let StepInput::Hidden(t) = input {
                let _ = t.to_tensor();
            }
            let _ = input.to_hop_input();
        }
    }
}

/// What a judge checks of a signed answer before it recomputes anything.
fn check_job(job: &Signed<Job>) {
    let _ = job.verify();
    let _ = job.body.digest();
    let claim = &job.body.claim;
    let _ = claim.commitment.check(576, claim.output.len());
    let _ = claim.sampling.params();
}

/// What a judge checks of a signed hop record.
fn check_hop(job: &Signed<HopJob>) {
    let _ = job.verify();
    let _ = job.body.digest();
    let digests = &job.body.digests;
    // Counted, never expanded: a stranger's record may claim any number of steps.
    let _ = digests.step_count();
    let _ = digests.byte_len();
}

/// A request as a node's codecs decode it (CBOR, under each protocol), then the node's checks
/// on its parts.
pub fn wire_request(data: &[u8]) {
    if let Ok(infer::Request::Step { input, .. }) = cbor4ii::serde::from_slice(data) {
        check_step(&input);
    }
    if let Ok(request) = cbor4ii::serde::from_slice::<verify::Request>(data) {
        match &request {
            verify::Request::Judge { job } => check_job(job),
            verify::Request::JudgeHop { job, inputs } => {
                check_hop(job);
                inputs.iter().take(64).for_each(check_step);
            }
            verify::Request::OpenVerified { sampling, .. } => {
                let _ = sampling.params();
            }
            _ => {}
        }
    }
    let _ = cbor4ii::serde::from_slice::<prove::Request>(data);
}

/// A response as a client's codecs decode it, then the client's checks.
pub fn wire_response(data: &[u8]) {
    if let Ok(infer::Response::Output(t)) = cbor4ii::serde::from_slice(data) {
        let _ = t.to_tensor();
    }
    if let Ok(response) = cbor4ii::serde::from_slice::<verify::Response>(data) {
        match &response {
            verify::Response::Finished(job) => check_job(job),
            verify::Response::HopFinished(job) => check_hop(job),
            verify::Response::Committed(c) => {
                let _ = c.verify();
            }
            verify::Response::Revealed(r) => {
                let _ = r.verify();
            }
            _ => {}
        }
    }
    match cbor4ii::serde::from_slice::<prove::Response>(data) {
        Ok(prove::Response::Attested(evidence)) => check_tee(&evidence),
        Ok(prove::Response::InferenceProof(proof)) => check_proof(&proof),
        _ => {}
    }
}

/// A signed answer as JSON (how jobs are stored and shown).
pub fn signed_job(data: &[u8]) {
    if let Ok(job) = serde_json::from_slice::<Signed<Job>>(data) {
        check_job(&job);
    }
    if let Ok(job) = serde_json::from_slice::<Signed<HopJob>>(data) {
        check_hop(&job);
    }
}

/// An evidence file, as `veil verify-evidence` reads it, of an answer or of a chain hop.
pub fn evidence(data: &[u8]) {
    if let Ok(record) = <Evidence>::from_bytes(data) {
        let _ = record.check();
    }
    if let Ok(record) = Evidence::<HopJob>::from_bytes(data) {
        let _ = record.check();
    }
}

/// The peer every gossiped record in this target claims to come from.
fn gossip_source() -> libp2p::PeerId {
    static KEY: OnceLock<Keypair> = OnceLock::new();
    KEY.get_or_init(Keypair::generate_ed25519)
        .public()
        .to_peer_id()
}

/// A run record from gossip, as a node accepts it.
pub fn run_record(data: &[u8]) {
    let _ = veil_net::history::accept_gossiped(data, Some(gossip_source()));
    let _ = veil_meta::parse_jsonl(data);
}

/// What a verifier does with TEE evidence.
fn check_tee(evidence: &veil_tee::Evidence) {
    static POLICY: OnceLock<veil_tee::Policy> = OnceLock::new();
    let policy = POLICY.get_or_init(|| veil_tee::Policy::from_toml("").expect("empty policy"));
    let expect = veil_tee::Expectation {
        peer_key: None,
        nonce: Some([7; 32]),
    };
    let _ = veil_tee::verify(evidence, policy, &expect, 1_780_000_000);
}

/// TEE evidence as a file or a peer presents it (a JSON bundle, or a bare quote or report).
pub fn tee_evidence(data: &[u8]) {
    if let Ok(evidence) = veil_tee::Evidence::read(data) {
        check_tee(&evidence);
    }
}

/// Parameters and the verifying key of the one private-model shape the proof target checks
/// against.
type ZkKeys = (Params<EqAffine>, VerifyingKey<EqAffine>);

fn zk_keys() -> &'static ZkKeys {
    static KEYS: OnceLock<ZkKeys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let params = veil_zk::proof::parameters();
        let vk = veil_zk::proof::verifying_key(&params, &zk_shape()).expect("a verifying key");
        (params, vk)
    })
}

/// What a client does with a proof of a private model's answer.
fn check_proof(proof: &veil_zk::proof::InferenceProof) {
    let (params, vk) = zk_keys();
    if let Ok(commitment) = veil_zk::proof::fp_from_hex(&proof.commitment) {
        let _ = veil_zk::proof::verify(params, vk, &commitment, proof);
    }
}

/// A proof file (JSON), and a public model file, as `veil zk verify` reads them.
pub fn zk_proof(data: &[u8]) {
    if let Ok(proof) = serde_json::from_slice::<veil_zk::proof::InferenceProof>(data) {
        check_proof(&proof);
    }
    if let Ok(public) = serde_json::from_slice::<veil_zk::proof::PublicModel>(data) {
        // Rebuilding a verifying key is seconds of work: only for the target's own shape.
        if public.shape == zk_shape() {
            let _ = public.verifying_key(&zk_keys().0);
        }
    }
}

/// 64 pixels to 10 logits, one dense layer.
fn zk_shape() -> veil_zk::model::ModelShape {
    serde_json::from_str(
        r#"{"layers":[{"kind":"dense","inputs":64,"outputs":10,"weight_bits":6,"activation":"none"}]}"#,
    )
    .expect("the target's shape parses")
}

/// A GGUF file's header, then everything Veil reads from its metadata: the architecture, the
/// tokenizer and a shard's manifest.
pub fn gguf_header(data: &[u8]) {
    let Ok(mut file) = tempfile::NamedTempFile::new() else {
        return;
    };
    if file.write_all(data).is_err() || file.flush().is_err() {
        return;
    }
    let Ok(gguf) = veil_model::GgufFile::open(file.path()) else {
        return;
    };
    let _ = veil_model::LlamaConfig::from_gguf(&gguf);
    let _ = veil_model::ShardManifest::of(&gguf);
    let _ = veil_model::tokenizer::GgufTokenizer::from_gguf(&gguf);
}

/// A sealed EE key file, opened with a passphrase (the wrong one, for most inputs).
pub fn ee_key(data: &[u8]) {
    if let Ok(key) = veil_ee::EeKey::open(data, "fuzz passphrase") {
        let _ = key.fingerprint();
        let _ = key.kind();
    }
}
