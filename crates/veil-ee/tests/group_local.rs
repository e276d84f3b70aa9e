//! The group-local key keeps quantized models exact: encrypted in their own formats, the
//! models of every architecture and format Veil runs give the plaintext logits bit for bit.

use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use veil_ee::{decrypt_logits, encrypt_model, encrypt_tokens, model_digest, EeKey, KeyKind};
use veil_model::{GgufFile, LlamaConfig, ShardModel, WeightFormat};

mod common;

use common::{conformance_dir, step};

fn fixtures() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(conformance_dir())
        .expect("the conformance fixtures")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "gguf"))
        .collect();
    files.sort();
    files
}

fn load(path: &Path) -> ShardModel {
    common::load(path, WeightFormat::AsStored)
}

#[test]
fn every_architecture_and_format_gives_the_plaintext_bits() {
    let dir = tempfile::tempdir().unwrap();
    let files = fixtures();
    assert!(files.len() >= 10, "fixtures: {files:?}");
    for (n, base) in files.iter().enumerate() {
        let name = base.file_name().unwrap().to_string_lossy().to_string();
        let config = LlamaConfig::from_gguf(&GgufFile::open(base).unwrap()).unwrap();
        let mut rng = ChaCha20Rng::seed_from_u64(n as u64);
        let key = EeKey::generate_group_local_with(&config, &model_digest(base).unwrap(), &mut rng);
        assert_eq!(key.kind(), KeyKind::GroupLocal, "{name}");
        let out = dir.path().join(&name);
        encrypt_model(base, &key, &out).unwrap();

        // Encryption keeps each tensor's format and moves its values.
        let (plain_file, enc_file) = (GgufFile::open(base).unwrap(), GgufFile::open(&out).unwrap());
        let (plain_infos, enc_infos) = (
            &plain_file.content().tensor_infos,
            &enc_file.content().tensor_infos,
        );
        for (tensor, info) in plain_infos {
            assert_eq!(
                info.ggml_dtype, enc_infos[tensor].ggml_dtype,
                "{name} {tensor}"
            );
        }

        let (plain, enc) = (load(base), load(&out));
        let (mut plain_cache, mut enc_cache) = (plain.new_cache(), enc.new_cache());
        let prompt: Vec<u32> = (0..13)
            .map(|_| rng.random_range(0..config.vocab_size as u32))
            .collect();
        let mut plain_logits = step(&plain, &mut plain_cache, &prompt);
        let mut enc_logits = step(&enc, &mut enc_cache, &encrypt_tokens(&key, &prompt));
        assert_ne!(plain_logits, enc_logits, "{name}: the key changed nothing");
        for position in 0..6 {
            let back = decrypt_logits(&key, &enc_logits);
            let same = back
                .iter()
                .zip(&plain_logits)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{name}: logits differ at step {position}");
            let next = rng.random_range(0..config.vocab_size as u32);
            plain_logits = step(&plain, &mut plain_cache, &[next]);
            enc_logits = step(&enc, &mut enc_cache, &encrypt_tokens(&key, &[next]));
        }
    }
}

#[test]
fn the_full_key_is_not_taken_for_a_group_local_one() {
    let base = &fixtures()[0];
    let config = LlamaConfig::from_gguf(&GgufFile::open(base).unwrap()).unwrap();
    let mut rng = ChaCha20Rng::seed_from_u64(5);
    assert_eq!(
        EeKey::generate_with(&config, "x", &mut rng).kind(),
        KeyKind::Full
    );
    // One coordinate moved out of its group makes a key full.
    let mut key = EeKey::generate_group_local_with(&config, "x", &mut rng);
    key.hidden.swap(0, veil_model::SCALE_GROUP);
    assert_eq!(key.kind(), KeyKind::Full);
}
