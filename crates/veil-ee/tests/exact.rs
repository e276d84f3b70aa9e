//! The encrypted model is the plaintext model in another basis: same greedy text, same logits.

use veil_ee::{
    agreement, decrypt_logits, decrypt_tokens, encrypt_model, encrypt_tokens, model_digest,
    EeError, EeKey, EVAL_PROMPTS,
};
use veil_model::sampling::argmax;
use veil_model::{
    ChatMessage, GgufFile, LocalModel, LogitsAt, ModelStore, Shard, ShardInput, ShardModel,
    TokenStep, WeightFormat, SMOLLM2_135M,
};

fn model_path() -> std::path::PathBuf {
    ModelStore::from_env()
        .ensure(&SMOLLM2_135M, &mut |_| {})
        .unwrap()
}

#[test]
fn encrypted_model_computes_the_same_function() {
    let base = model_path();
    let plain = LocalModel::load(&base, WeightFormat::F32, &[]).unwrap();
    let key = EeKey::generate(&plain.config, &model_digest(&base).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let enc_path = dir.path().join("enc.gguf");
    encrypt_model(&base, &key, &enc_path).unwrap();
    let mut enc_file = GgufFile::open(&enc_path).unwrap();
    assert!(!enc_file
        .content()
        .metadata
        .keys()
        .any(|k| k.starts_with("tokenizer.")));
    let enc = ShardModel::load(
        &mut enc_file,
        &Shard::whole(plain.config.block_count),
        WeightFormat::F32,
    )
    .unwrap();

    for question in [
        "What is the capital of France?",
        "Write a haiku about rain.",
        "List three prime numbers.",
    ] {
        let prompt = plain.chat_prompt(&[ChatMessage::user(question)]).unwrap();
        let mut session = plain.session();
        let mut enc_cache = enc.new_cache();
        let mut plain_logits = session.step(&prompt).unwrap();
        let enc_prompt = encrypt_tokens(&key, &prompt);
        assert_ne!(enc_prompt, prompt);
        let mut enc_logits = enc
            .forward(
                ShardInput::Tokens(&enc_prompt),
                &mut enc_cache,
                LogitsAt::Last,
            )
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let (mut plain_tokens, mut enc_tokens) = (Vec::new(), Vec::new());
        for _ in 0..24 {
            let back = decrypt_logits(&key, &enc_logits);
            let scale = plain_logits.iter().fold(0f32, |m, x| m.max(x.abs()));
            let diff = plain_logits
                .iter()
                .zip(&back)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                diff <= 1e-3 * scale,
                "{question}: max abs diff {diff} (scale {scale})"
            );
            let (p, e) = (argmax(&plain_logits), argmax(&enc_logits));
            plain_tokens.push(p);
            enc_tokens.push(e);
            plain_logits = session.step(&[p]).unwrap();
            enc_logits = enc
                .forward(ShardInput::Tokens(&[e]), &mut enc_cache, LogitsAt::Last)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
        }
        assert_eq!(
            decrypt_tokens(&key, &enc_tokens),
            plain_tokens,
            "{question}"
        );
    }

    // The acceptance figure is 20 varied prompts, 64 greedy tokens each, all identical
    // (`veil ee agreement`); the suite checks the same measure on 6 of them, 32 tokens each.
    let prompts = &EVAL_PROMPTS[..6];
    let report = agreement(&plain, &key, std::slice::from_ref(&enc), prompts, 32).unwrap();
    eprintln!("{report:?}");
    assert_eq!(report.identical, prompts.len(), "{report:?}");
    assert!(report.max_relative_logit_error <= 1e-3, "{report:?}");
}

#[test]
fn a_key_for_another_model_is_refused() {
    let base = model_path();
    let plain = LocalModel::load(&base, WeightFormat::AsStored, &[]).unwrap();
    let key = EeKey::generate(&plain.config, "0000");
    let dir = tempfile::tempdir().unwrap();
    let err = encrypt_model(&base, &key, &dir.path().join("x.gguf")).unwrap_err();
    assert!(matches!(err, EeError::WrongModel { .. }), "{err}");
}
