//! An obfuscated model stays verifiable: judges that run the same obfuscated weights reproduce
//! its answers bit for bit, and a node serving the plaintext model or another obfuscation in
//! its place is caught.

use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use veil_ee::{encrypt_model_with, encrypt_tokens, model_digest, EeKey, Obfuscate};
use veil_model::{GgufFile, LlamaConfig, SamplingParams, Shard, ShardModel, WeightFormat};
use veil_verify::{serve_fixed_length, validate, CommitmentMode, ServingSession, Tolerances};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../veil-model/tests/fixtures/conformance/tiny-llama-q8_0.gguf")
}

fn load(path: &Path) -> [ShardModel; 1] {
    let mut gguf = GgufFile::open(path).unwrap();
    let blocks = LlamaConfig::from_gguf(&gguf).unwrap().block_count;
    [ShardModel::load(&mut gguf, &Shard::whole(blocks), WeightFormat::AsStored).unwrap()]
}

/// Obfuscates the fixture into `out` in Q8_0 under a key drawn from `seed`.
fn obfuscate(out: &Path, seed: u64) -> EeKey {
    let base = fixture();
    let config = LlamaConfig::from_gguf(&GgufFile::open(&base).unwrap()).unwrap();
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let key = EeKey::generate_with(&config, &model_digest(&base).unwrap(), &mut rng);
    let settings = Obfuscate {
        noise: 0.5,
        format: Some(GgmlDType::Q8_0),
    };
    encrypt_model_with(&base, &key, Some(settings), out).unwrap();
    key
}

#[test]
fn judges_on_the_same_obfuscated_weights_pass_it_and_catch_a_swap() {
    let dir = tempfile::tempdir().unwrap();
    let (file, other_file) = (dir.path().join("a.gguf"), dir.path().join("b.gguf"));
    let key = obfuscate(&file, 1);
    obfuscate(&other_file, 2);
    let generator = load(&file);
    assert!(generator[0].bit_reproducible());
    let prompt = encrypt_tokens(&key, &[1, 5, 9, 14, 3, 7]);
    let session = ServingSession::new(&generator, SamplingParams::greedy(), None, 0)
        .unwrap()
        .with_commitment(&generator, CommitmentMode::Exact)
        .unwrap();
    let answer = serve_fixed_length(&generator, session, &prompt, 40).unwrap();
    let tol = Tolerances::default();

    let judge = load(&file);
    assert!(validate(&judge, &answer, &tol).unwrap().verdict.passed());
    // The plaintext model, or the model under another obfuscation, is not the committed one.
    for other in [fixture(), other_file] {
        let verdict = validate(&load(&other), &answer, &tol).unwrap().verdict;
        assert!(!verdict.passed(), "{}: {verdict:?}", other.display());
    }
}
