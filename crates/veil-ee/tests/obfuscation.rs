//! The obfuscated mode: exact maps under noise. Without noise it is the plaintext model in a
//! dense basis; the attack built for it undoes the maps, so only the noise protects.

use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use veil_ee::attack::{match_obfuscated, ResidualView};
use veil_ee::{
    decrypt_logits, encrypt_model_with, encrypt_tokens, match_embeddings, model_digest,
    obfuscation_noise, EeError, EeKey, Obfuscate,
};
use veil_model::{GgufFile, LlamaConfig, ShardModel, WeightFormat};

mod common;

use common::{conformance_dir, step};

fn fixture(name: &str) -> PathBuf {
    conformance_dir().join(name)
}

fn load(path: &Path) -> ShardModel {
    common::load(path, WeightFormat::F32)
}

/// Obfuscates `base` with a fresh full key and `noise`; the key and the file.
fn obfuscate(base: &Path, noise: f32, out: &Path, seed: u64) -> EeKey {
    let config = LlamaConfig::from_gguf(&GgufFile::open(base).unwrap()).unwrap();
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let key = EeKey::generate_with(&config, &model_digest(base).unwrap(), &mut rng);
    let settings = Obfuscate {
        noise,
        format: None,
    };
    encrypt_model_with(base, &key, Some(settings), out).unwrap();
    key
}

/// Largest logit difference over the plaintext logits' scale, over a prompt and a few steps.
fn logit_gap(base: &Path, key: &EeKey, obfuscated: &Path) -> f32 {
    let (plain, enc) = (load(base), load(obfuscated));
    let vocab = plain.config().vocab_size as u32;
    let mut rng = ChaCha20Rng::seed_from_u64(9);
    let prompt: Vec<u32> = (0..11).map(|_| rng.random_range(0..vocab)).collect();
    let (mut pc, mut ec) = (plain.new_cache(), enc.new_cache());
    let mut p = step(&plain, &mut pc, &prompt);
    let mut e = step(&enc, &mut ec, &encrypt_tokens(key, &prompt));
    let mut worst = 0f32;
    for _ in 0..5 {
        let back = decrypt_logits(key, &e);
        let scale = p.iter().fold(0f32, |m, x| m.max(x.abs()));
        let gap = p
            .iter()
            .zip(&back)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        worst = worst.max(gap / scale);
        let next = rng.random_range(0..vocab);
        p = step(&plain, &mut pc, &[next]);
        e = step(&enc, &mut ec, &encrypt_tokens(key, &[next]));
    }
    worst
}

#[test]
fn without_noise_the_obfuscated_model_is_the_plaintext_model_in_a_dense_basis() {
    let dir = tempfile::tempdir().unwrap();
    for (n, name) in ["tiny-llama-q8_0.gguf", "tiny-llama3rope-q8_0.gguf"]
        .iter()
        .enumerate()
    {
        let base = fixture(name);
        let out = dir.path().join(name);
        let key = obfuscate(&base, 0.0, &out, n as u64);
        assert_eq!(obfuscation_noise(&GgufFile::open(&out).unwrap()), Some(0.0));
        let gap = logit_gap(&base, &key, &out);
        assert!(gap < 1e-3, "{name}: logits {gap} apart without noise");

        // The dense map defeats weight matching by sorted rows, which reads a permutation.
        let embedding = |p: &Path| {
            GgufFile::open(p)
                .unwrap()
                .tensor("token_embd.weight")
                .unwrap()
                .dequantize(&candle_core::Device::Cpu)
                .unwrap()
        };
        let (vocab, _) = match_embeddings(&embedding(&base), &embedding(&out))
            .unwrap()
            .score(&key);
        assert_eq!(vocab, 0.0, "{name}: sorted rows still match");
    }
}

#[test]
fn noise_changes_the_model_and_the_file_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let base = fixture("tiny-llama-q8_0.gguf");
    let out = dir.path().join("noisy.gguf");
    let key = obfuscate(&base, 1.0, &out, 3);
    assert_eq!(obfuscation_noise(&GgufFile::open(&out).unwrap()), Some(1.0));
    assert_eq!(obfuscation_noise(&GgufFile::open(&base).unwrap()), None);
    let gap = logit_gap(&base, &key, &out);
    assert!(gap > 1e-2, "noise changed the logits by only {gap}");
}

#[test]
fn the_adaptive_attack_undoes_the_maps_and_only_noise_stands_in_its_way() {
    let dir = tempfile::tempdir().unwrap();
    let base = fixture("tiny-llama-q8_0.gguf");
    let public = ResidualView::read(&mut GgufFile::open(&base).unwrap()).unwrap();
    let vocab = public.embedding.dim(0).unwrap() as u32;
    let all: Vec<u32> = (0..vocab).collect();
    let mut recovered = Vec::new();
    for (seed, noise) in [0.0f32, 8.0].into_iter().enumerate() {
        let out = dir.path().join(format!("{noise}.gguf"));
        let key = obfuscate(&base, noise, &out, 20 + seed as u64);
        let seen = ResidualView::read(&mut GgufFile::open(&out).unwrap()).unwrap();
        let found = match_obfuscated(&public, &seen, &all).unwrap();
        assert_eq!(found.guesses.len(), all.len());
        recovered.push(found.score(&key));
    }
    assert_eq!(recovered[0], 1.0, "without noise every row is read");
    assert!(
        recovered[1] < recovered[0],
        "noise did not hide a single row: {recovered:?}"
    );
}

#[test]
fn obfuscation_is_refused_where_it_cannot_hold() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.gguf");
    let llama = fixture("tiny-llama-q8_0.gguf");
    let config = LlamaConfig::from_gguf(&GgufFile::open(&llama).unwrap()).unwrap();
    let digest = model_digest(&llama).unwrap();
    let full = EeKey::generate(&config, &digest);
    for noise in [f32::NAN, -1.0, 9.0] {
        let settings = Obfuscate {
            noise,
            format: None,
        };
        let err = encrypt_model_with(&llama, &full, Some(settings), &out).unwrap_err();
        assert!(matches!(err, EeError::Invalid(_)), "{noise}: {err}");
    }
    let settings = Obfuscate {
        noise: 0.5,
        format: None,
    };
    let group_local = EeKey::generate_group_local(&config, &digest);
    let err = encrypt_model_with(&llama, &group_local, Some(settings), &out).unwrap_err();
    assert!(err.to_string().contains("--transform full"), "{err}");

    let qwen3 = fixture("tiny-qwen3-q8_0.gguf");
    let config = LlamaConfig::from_gguf(&GgufFile::open(&qwen3).unwrap()).unwrap();
    let key = EeKey::generate(&config, &model_digest(&qwen3).unwrap());
    let err = encrypt_model_with(&qwen3, &key, Some(settings), &out).unwrap_err();
    assert!(
        matches!(err, EeError::UnsupportedArchitecture { .. }),
        "{err}"
    );
    assert!(!out.exists(), "a refused obfuscation left a file");
}
