//! The attacks must keep working: on small data they recover what they claim to.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use veil_ee::{encrypt_weights, match_embeddings, EeKey};
use veil_model::LlamaConfig;

#[test]
fn weight_matching_recovers_the_vocabulary_and_residual_permutations() {
    let config = LlamaConfig::llama(1, 32, 32, 4, 2, 16, 300);
    let mut rng = ChaCha20Rng::seed_from_u64(3);
    let data: Vec<f32> = (0..300 * 32).map(|_| rng.random_range(-1.0..1.0)).collect();
    let public = Tensor::from_vec(data, (300, 32), &Device::Cpu).unwrap();
    let key = EeKey::generate_with(&config, "tiny", &mut rng);
    let mut weights = HashMap::from([("token_embd.weight".to_string(), public.clone())]);
    encrypt_weights(&key, &config, &mut weights).unwrap();

    let found = match_embeddings(&public, &weights["token_embd.weight"]).unwrap();
    assert_eq!(found.score(&key), (1.0, 1.0));
    // A wrong key scores near zero, so the score is not trivially 1.
    let other = EeKey::generate_with(&config, "tiny", &mut rng);
    let (v, h) = found.score(&other);
    assert!(v < 0.1 && h < 0.2, "{v} {h}");
}
