//! The vocabulary-matching inversion reads a prompt back from the hidden states a node sees,
//! with the public weights: in plaintext (a client-side split) and, sorting each state, under
//! EE's residual permutation. Comparing coordinate by coordinate fails under the permutation,
//! so the test would notice an attack that matched trivially.

use veil_ee::{
    encrypt_model, encrypt_tokens, hidden_states_seen, invert_hidden_states, model_digest,
    natural_kind, EeKey, HiddenView, InversionBudget,
};
use veil_model::{
    GgufFile, LlamaConfig, LocalModel, ModelStore, Shard, ShardModel, WeightFormat, SMOLLM2_135M,
};

const TEXT: &str = "The old clockmaker repaired watches in a shop no wider than a corridor.";

fn blocks(path: &std::path::Path, k: usize) -> ShardModel {
    let mut gguf = GgufFile::open(path).unwrap();
    let shard = Shard {
        layers: 0..k,
        embedding: true,
        head: false,
    };
    ShardModel::load(&mut gguf, &shard, WeightFormat::AsStored).unwrap()
}

#[test]
fn the_attack_reads_a_prompt_back_from_split_and_permuted_hidden_states() {
    let path = ModelStore::from_env()
        .ensure(&SMOLLM2_135M, &mut |_| {})
        .unwrap();
    let public = LocalModel::load(&path, WeightFormat::AsStored, &[]).unwrap();
    let ids = public.raw_prompt(TEXT).unwrap();
    let gguf = GgufFile::open(&path).unwrap();
    let config = LlamaConfig::from_gguf(&gguf).unwrap();
    let key = EeKey::generate_of_kind(&config, &model_digest(&path).unwrap(), natural_kind(&gguf));
    let dir = tempfile::tempdir().unwrap();
    let encrypted = dir.path().join("enc.gguf");
    encrypt_model(&path, &key, &encrypted).unwrap();
    let budget = InversionBudget::default();

    let k = 2;
    let public_blocks = blocks(&path, k);
    let split = hidden_states_seen(&public_blocks, &ids).unwrap();
    let read =
        invert_hidden_states(&public_blocks, &public, &split, HiddenView::Plain, budget).unwrap();
    assert_eq!(read.tokens, ids, "{read:?}");
    assert_eq!(read.matched, ids.len());

    let ee = hidden_states_seen(&blocks(&encrypted, k), &encrypt_tokens(&key, &ids)).unwrap();
    assert_ne!(ee, split, "EE hands the node other states");
    let read =
        invert_hidden_states(&public_blocks, &public, &ee, HiddenView::Permuted, budget).unwrap();
    assert_eq!(read.tokens, ids, "{read:?}");

    // Without sorting, the permuted states match nothing (the first 512 candidates are enough
    // to show it).
    let short = InversionBudget {
        max_candidates: 512,
        ..budget
    };
    let blind =
        invert_hidden_states(&public_blocks, &public, &ee, HiddenView::Plain, short).unwrap();
    assert_eq!(blind.matched, 0, "{blind:?}");
    assert!(blind.recovered(&ids) < 0.5, "{blind:?}");

    // States of another width are refused, not compared in part.
    let narrow = vec![split[0][..100].to_vec()];
    let err = invert_hidden_states(&public_blocks, &public, &narrow, HiddenView::Plain, budget)
        .unwrap_err();
    assert!(err.to_string().contains("576 wide"), "{err}");
}
