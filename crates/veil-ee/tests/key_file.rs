//! Key files: sealed with a passphrase, refused when wrong, damaged or mismatched.

use rand::SeedableRng;
use veil_ee::{EeError, EeKey};
use veil_model::LlamaConfig;

fn tiny_config() -> LlamaConfig {
    LlamaConfig::llama(2, 16, 24, 4, 2, 64, 50)
}

fn key() -> EeKey {
    EeKey::generate_with(
        &tiny_config(),
        "abc",
        &mut rand_chacha::ChaCha20Rng::seed_from_u64(1),
    )
}

#[test]
fn sealed_key_opens_with_the_right_passphrase_only() {
    let key = key();
    let sealed = key.seal_with_work_factor("correct horse", Some(4)).unwrap();
    assert_eq!(EeKey::open(&sealed, "correct horse").unwrap(), key);
    assert!(matches!(
        EeKey::open(&sealed, "wrong"),
        Err(EeError::WrongPassphrase)
    ));
    let mut damaged = sealed.clone();
    let n = damaged.len();
    damaged[n - 5] ^= 0x40;
    assert!(EeKey::open(&damaged, "correct horse").is_err());
    assert!(matches!(
        EeKey::open(b"not a key at all", "x"),
        Err(EeError::CorruptKey(_))
    ));
}

#[test]
fn keys_that_do_not_fit_the_model_are_rejected() {
    let key = key();
    key.check(&tiny_config()).unwrap();
    let mut other = tiny_config();
    other.vocab_size = 51;
    assert!(matches!(key.check(&other), Err(EeError::KeyMismatch(_))));
    let mut broken = key.clone();
    broken.hidden[0] = broken.hidden[1];
    assert!(matches!(
        broken.check(&tiny_config()),
        Err(EeError::KeyMismatch(_))
    ));
}

#[test]
fn value_maps_are_orthogonal() {
    let key = key();
    for m in &key.layers[0].value_maps {
        let d = 4;
        for i in 0..d {
            for j in 0..d {
                let dot: f32 = (0..d).map(|k| m[i * d + k] * m[j * d + k]).sum();
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((dot - want).abs() < 1e-5);
            }
        }
    }
}

#[test]
fn architectures_whose_symmetries_fail_are_refused_with_the_reason() {
    use veil_model::Architecture;
    for (arch, says) in [
        (Architecture::Qwen2, "biases"),
        (Architecture::Qwen3, "RoPE pair"),
        (Architecture::Gemma3, "QK-norm"),
    ] {
        let config = LlamaConfig {
            architecture: arch,
            ..tiny_config()
        };
        let err = key().check(&config).unwrap_err().to_string();
        assert!(err.contains(arch.name()) && err.contains(says), "{err}");
    }
    key().check(&tiny_config()).unwrap();
}
