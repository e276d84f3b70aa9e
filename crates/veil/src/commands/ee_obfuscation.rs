//! `veil ee obfuscation-curve`: the obfuscated mode's noise against its quality and against
//! what the attacks with the public weights recover.

use std::time::Instant;

use anyhow::{bail, Result};
use rand::seq::index::sample;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use veil_ee::attack::{match_obfuscated, ResidualView};
use veil_ee::{encrypt_model_with, model_digest, EeKey, Obfuscate};
use veil_model::{GgufFile, LocalModel, LogitsAt, Shard, ShardInput, ShardModel, WeightFormat};

use veil_serve::accel::perplexity_of;

use crate::args::ModelArgs;

/// Prints one line per noise level (see `EeCommand::ObfuscationCurve`).
pub fn curve(
    model: &ModelArgs,
    noise: &[f32],
    tokens: usize,
    vocabulary_sample: usize,
) -> Result<()> {
    let path = model.resolve_path()?;
    // Obfuscated models are written in F32; the plaintext model is compared in the same format.
    let format = match model.dtype {
        WeightFormat::AsStored => WeightFormat::F32,
        other => other,
    };
    let plain = LocalModel::load_with(&path, format, &[], model.kernels)?;
    let config = plain.config.clone();
    let vocab = config.vocab_size;
    if vocabulary_sample > vocab {
        bail!("--vocabulary-sample {vocabulary_sample}: the model has {vocab} tokens");
    }
    let digest = model_digest(&path)?;
    let held_out = plain.raw_prompt(veil_serve::accel::HELD_OUT)?;
    let plain_logits = plain
        .session()
        .forward(&held_out[..held_out.len() - 1], LogitsAt::All)?
        .to_vec2::<f32>()?;
    let plain_ppl = perplexity_of(&plain_logits, &held_out[1..]);
    let public_view = ResidualView::read(&mut GgufFile::open(&path)?)?;
    let public_embedding = public_view.embedding.clone();
    let mut rng = ChaCha20Rng::seed_from_u64(0);
    let sampled: Vec<u32> = sample(&mut rng, vocab, vocabulary_sample)
        .into_iter()
        .map(|i| i as u32)
        .collect();

    println!(
        "{} ({format}), perplexity {plain_ppl:.3} on the held-out passage ({} tokens); agreement over {} prompts x {tokens} greedy tokens",
        path.display(),
        held_out.len(),
        veil_ee::EVAL_PROMPTS.len()
    );
    println!("| noise | perplexity | increase | prompts identical | token agreement | weight matching (sorted rows) | adaptive: held-out text | adaptive: {vocabulary_sample} vocabulary entries | time |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    let dir = tempfile::tempdir()?;
    for &level in noise {
        let started = Instant::now();
        let key = EeKey::generate(&config, &digest);
        let file = dir.path().join("obfuscated.gguf");
        let settings = Obfuscate {
            noise: level,
            format: None,
        };
        encrypt_model_with(&path, &key, Some(settings), &file)?;
        let mut gguf = GgufFile::open(&file)?;
        let shard = Shard::whole(config.block_count);
        let obfuscated = ShardModel::load_with(&mut gguf, &shard, format, model.kernels)?;

        let encrypted = veil_ee::encrypt_tokens(&key, &held_out);
        let logits = obfuscated
            .forward(
                ShardInput::Tokens(&encrypted[..encrypted.len() - 1]),
                &mut obfuscated.new_cache(),
                LogitsAt::All,
            )?
            .to_vec2::<f32>()?;
        let ppl = perplexity_of(&logits, &encrypted[1..]);
        let shards = [obfuscated];
        let agree = veil_ee::agreement(&plain, &key, &shards, &veil_ee::EVAL_PROMPTS, tokens)?;
        drop(shards);

        let seen = ResidualView::read(&mut gguf)?;
        let (sorted, _) =
            veil_ee::match_embeddings(&public_embedding, &seen.embedding)?.score(&key);
        let text = match_obfuscated(&public_view, &seen, &encrypted)?.score(&key);
        let sampled_ids = veil_ee::encrypt_tokens(&key, &sampled);
        let entries = match_obfuscated(&public_view, &seen, &sampled_ids)?.score(&key);
        println!(
            "| {level} | {} | {} | {} of {} | {:.1}% | {:.1}% | {:.1}% | {:.1}% | {:.0} s |",
            readable(ppl),
            increase(ppl / plain_ppl),
            agree.identical,
            agree.prompts,
            100.0 * agree.token_agreement,
            100.0 * sorted,
            100.0 * text,
            100.0 * entries,
            started.elapsed().as_secs_f64()
        );
    }
    println!(
        "frequency analysis reads only ids, which the obfuscated mode permutes as EE does: `veil ee attack-frequency` applies unchanged"
    );
    Ok(())
}

/// A perplexity as people read it: 3 decimals, or powers of ten once the model is broken.
fn readable(ppl: f64) -> String {
    if ppl < 1e5 {
        format!("{ppl:.3}")
    } else {
        format!("{ppl:.2e}")
    }
}

/// A perplexity ratio as an increase in percent, or a factor once it is large.
fn increase(ratio: f64) -> String {
    if ratio < 10.0 {
        format!("{:+.1}%", 100.0 * (ratio - 1.0))
    } else {
        format!("×{ratio:.2e}")
    }
}
