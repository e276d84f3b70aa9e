//! Key files: sealed with a passphrase, refused when wrong, damaged or mismatched.

use rand::SeedableRng;
use veil_ee::{EeError, EeKey};
use veil_model::LlamaConfig;

fn tiny_config() -> LlamaConfig {
    LlamaConfig {
        block_count: 2,
        hidden_size: 16,
        ffn_size: 24,
        head_count: 4,
        kv_head_count: 2,
        head_dim: 4,
        rope_base: 10_000.0,
        rms_eps: 1e-5,
        context_length: 64,
        vocab_size: 50,
    }
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
