//! Each transform in a key is applied to the weights and is needed: on a tiny random llama model,
//! a key with only that transform keeps the model exact, changes the tensors it should, and
//! breaks exactness when any one of those tensors is left untransformed.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use veil_ee::{decrypt_logits, encrypt_tokens, encrypt_weights, EeKey};
use veil_model::{GgufFile, LlamaConfig, LogitsAt, Shard, ShardInput, ShardModel, WeightFormat};

fn config() -> LlamaConfig {
    LlamaConfig::llama(2, 32, 48, 4, 2, 64, 40)
}

/// Random weights (tied head) for the tiny model; norms random too, so permuting them matters.
fn weights(rng: &mut ChaCha20Rng) -> HashMap<String, Tensor> {
    let c = config();
    let (h, kv, f, v) = (c.hidden_size, c.kv_size(), c.ffn_size, c.vocab_size);
    let mut rand = |shape: (usize, usize)| {
        let data: Vec<f32> = (0..shape.0 * shape.1)
            .map(|_| rng.random_range(-0.5..0.5))
            .collect();
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
    };
    let mut w = HashMap::new();
    w.insert("token_embd.weight".to_string(), rand((v, h)));
    w.insert(
        "output_norm.weight".to_string(),
        (rand((1, h)).squeeze(0).unwrap() + 1.0).unwrap(),
    );
    for i in 0..c.block_count {
        for (n, shape) in [
            ("attn_q", (h, h)),
            ("attn_k", (kv, h)),
            ("attn_v", (kv, h)),
            ("attn_output", (h, h)),
            ("ffn_gate", (f, h)),
            ("ffn_up", (f, h)),
            ("ffn_down", (h, f)),
        ] {
            w.insert(format!("blk.{i}.{n}.weight"), rand(shape));
        }
        for n in ["attn_norm", "ffn_norm"] {
            w.insert(
                format!("blk.{i}.{n}.weight"),
                (rand((1, h)).squeeze(0).unwrap() + 1.0).unwrap(),
            );
        }
    }
    w
}

/// Writes the weights as a GGUF and loads them back as a whole-model shard.
fn load(weights: &HashMap<String, Tensor>) -> ShardModel {
    let c = config();
    let u = |x: usize| Value::U32(x as u32);
    let meta = [
        ("general.architecture", Value::String("llama".into())),
        ("llama.block_count", u(c.block_count)),
        ("llama.embedding_length", u(c.hidden_size)),
        ("llama.feed_forward_length", u(c.ffn_size)),
        ("llama.attention.head_count", u(c.head_count)),
        ("llama.attention.head_count_kv", u(c.kv_head_count)),
        ("llama.rope.freq_base", Value::F32(c.rope_base)),
        (
            "llama.attention.layer_norm_rms_epsilon",
            Value::F32(c.rms_eps as f32),
        ),
        ("llama.context_length", u(c.context_length)),
        ("llama.vocab_size", u(c.vocab_size)),
    ];
    let tensors: Vec<(String, QTensor)> = weights
        .iter()
        .map(|(n, t)| (n.clone(), QTensor::quantize(t, GgmlDType::F32).unwrap()))
        .collect();
    let file = tempfile::NamedTempFile::new().unwrap();
    let mut out = std::fs::File::create(file.path()).unwrap();
    gguf_file::write(
        &mut out,
        &meta.iter().map(|(k, v)| (*k, v)).collect::<Vec<_>>(),
        &tensors
            .iter()
            .map(|(n, t)| (n.as_str(), t))
            .collect::<Vec<_>>(),
    )
    .unwrap();
    drop(out);
    let mut gguf = GgufFile::open(file.path()).unwrap();
    ShardModel::load(&mut gguf, &Shard::whole(c.block_count), WeightFormat::F32).unwrap()
}

const TOKENS: [u32; 12] = [3, 17, 5, 39, 0, 22, 8, 8, 31, 12, 1, 26];

/// Largest difference between plaintext logits and decrypted encrypted logits, at every position.
fn error(key: &EeKey, plain: &ShardModel, enc: &ShardModel) -> f32 {
    let want = plain
        .forward(
            ShardInput::Tokens(&TOKENS),
            &mut plain.new_cache(),
            LogitsAt::All,
        )
        .unwrap();
    let enc_tokens = encrypt_tokens(key, &TOKENS);
    let got = enc
        .forward(
            ShardInput::Tokens(&enc_tokens),
            &mut enc.new_cache(),
            LogitsAt::All,
        )
        .unwrap();
    let (want, got) = (
        want.to_vec2::<f32>().unwrap(),
        got.to_vec2::<f32>().unwrap(),
    );
    want.iter()
        .zip(&got)
        .flat_map(|(w, g)| {
            w.iter()
                .zip(decrypt_logits(key, g))
                .map(|(a, b)| (a - b).abs())
                .collect::<Vec<_>>()
        })
        .fold(0f32, f32::max)
}

fn differs(a: &Tensor, b: &Tensor) -> bool {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        > 1e-3
}

#[test]
fn the_full_key_is_exact() {
    let mut rng = ChaCha20Rng::seed_from_u64(7);
    let plain_w = weights(&mut rng);
    let key = EeKey::generate_with(&config(), "tiny", &mut rng);
    let mut enc_w = plain_w.clone();
    encrypt_weights(&key, &config(), &mut enc_w).unwrap();
    let err = error(&key, &load(&plain_w), &load(&enc_w));
    assert!(err < 1e-4, "max logit error {err}");
}

#[test]
fn every_transform_is_applied_and_needed() {
    let c = config();
    let mut rng = ChaCha20Rng::seed_from_u64(11);
    let plain_w = weights(&mut rng);
    let plain = load(&plain_w);
    let full = EeKey::generate_with(&c, "tiny", &mut rng);
    let blk = |n: &str| {
        (0..c.block_count)
            .map(|i| format!("blk.{i}.{n}.weight"))
            .collect::<Vec<_>>()
    };
    let all = |names: &[&str]| names.iter().flat_map(|n| blk(n)).collect::<Vec<_>>();

    type Apply = fn(&mut EeKey, &EeKey);
    let cases: Vec<(&str, Apply, Vec<String>)> = vec![
        (
            "vocabulary",
            |k, f| k.vocab = f.vocab.clone(),
            vec!["token_embd.weight".into()],
        ),
        (
            "residual stream",
            |k, f| k.hidden = f.hidden.clone(),
            [
                vec!["token_embd.weight".to_string(), "output_norm.weight".into()],
                all(&[
                    "attn_norm",
                    "attn_q",
                    "attn_k",
                    "attn_v",
                    "attn_output",
                    "ffn_norm",
                    "ffn_gate",
                    "ffn_up",
                    "ffn_down",
                ]),
            ]
            .concat(),
        ),
        (
            "FFN",
            |k, f| {
                k.layers
                    .iter_mut()
                    .zip(&f.layers)
                    .for_each(|(l, fl)| l.ffn = fl.ffn.clone())
            },
            all(&["ffn_gate", "ffn_up", "ffn_down"]),
        ),
        (
            "KV heads",
            |k, _| k.layers.iter_mut().for_each(|l| l.kv_heads.reverse()),
            all(&["attn_q", "attn_k", "attn_v", "attn_output"]),
        ),
        (
            "value maps",
            |k, f| {
                k.layers
                    .iter_mut()
                    .zip(&f.layers)
                    .for_each(|(l, fl)| l.value_maps = fl.value_maps.clone())
            },
            all(&["attn_v", "attn_output"]),
        ),
        (
            "RoPE pair rotations",
            |k, f| {
                k.layers
                    .iter_mut()
                    .zip(&f.layers)
                    .for_each(|(l, fl)| l.rope_angles = fl.rope_angles.clone())
            },
            all(&["attn_q", "attn_k"]),
        ),
    ];
    for (what, apply, touched) in cases {
        let mut key = EeKey::identity(&c, "tiny");
        apply(&mut key, &full);
        let mut enc_w = plain_w.clone();
        encrypt_weights(&key, &c, &mut enc_w).unwrap();
        let err = error(&key, &plain, &load(&enc_w));
        assert!(err < 1e-4, "{what} alone: max logit error {err}");
        for name in &touched {
            assert!(
                differs(&plain_w[name], &enc_w[name]),
                "{what} left {name} unchanged"
            );
            // Leave just this tensor untransformed: the model must no longer be exact.
            let mut half = enc_w.clone();
            half.insert(name.clone(), plain_w[name].clone());
            let err = error(&key, &plain, &load(&half));
            assert!(
                err > 1e-2,
                "{what}: dropping the transform of {name} kept the model exact ({err})"
            );
        }
        for (name, t) in &plain_w {
            if !touched.contains(name) {
                assert!(
                    !differs(t, &enc_w[name]),
                    "{what} changed {name}, which it should not touch"
                );
            }
        }
    }
    // Without the vocabulary transform on the token side, the encrypted model reads the wrong ids.
    let mut key = EeKey::identity(&c, "tiny");
    key.vocab = full.vocab.clone();
    let mut enc_w = plain_w.clone();
    encrypt_weights(&key, &c, &mut enc_w).unwrap();
    assert!(error(&EeKey::identity(&c, "tiny"), &plain, &load(&enc_w)) > 1e-2);
}
