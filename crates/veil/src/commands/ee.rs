//! `veil ee`: equivariant-encryption keys and encrypted models.

use std::collections::{HashMap, HashSet};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use veil_ee::{
    encrypt_model, encrypt_model_with, model_digest, EeKey, FrequencyAttack, FrequencyGuess,
    KeyKind, Obfuscate,
};
use veil_model::{ChatMessage, GgufFile, LlamaConfig, LocalModel, ShardModel};

use crate::args::ModelArgs;

/// Subcommands of `veil ee`.
#[derive(Subcommand, Debug)]
pub enum EeCommand {
    /// Draw a fresh key for a model and store it sealed with a passphrase.
    Keygen {
        #[command(flatten)]
        model: ModelArgs,
        /// Where to write the key file.
        #[arg(long)]
        out: PathBuf,
        /// Which transforms the key holds: `group-local` (permutations inside groups of 16;
        /// the encrypted model keeps the file's quantized formats and gives the plaintext
        /// model's bits) or `full` (rotations too; the encrypted model is written in F32).
        /// Default: group-local for files whose matrices are all in a quantized format Veil's
        /// kernels run, full otherwise.
        #[arg(long)]
        transform: Option<KeyKind>,
    },
    /// Write the model transformed by a key: a GGUF any node can serve without reading it.
    Encrypt {
        #[command(flatten)]
        model: ModelArgs,
        /// The key file from `veil ee keygen`.
        #[arg(long)]
        key: PathBuf,
        /// Where to write the encrypted GGUF.
        #[arg(long)]
        out: PathBuf,
        /// Obfuscate (for public models; needs a `full` key): add this much noise to the
        /// embedding and the head, as a multiple of each matrix's spread (0 to 8; AloePri uses
        /// 0.5-1), under dense secret maps. The model's output then differs from the plaintext
        /// model's; `veil ee obfuscation-curve` measures by how much, and what attacks recover.
        #[arg(long)]
        obfuscate: Option<f32>,
        /// The format an obfuscated model's matrices are written in: `f32` or `q8_0`.
        #[arg(long, default_value = "f32", requires = "obfuscate")]
        format: ObfuscatedFormat,
    },
    /// Compare the encrypted model's greedy output with the plaintext model's on 20 prompts.
    Agreement {
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        pair: EncryptedPair,
        /// Greedy tokens per prompt.
        #[arg(long, default_value_t = 64)]
        tokens: usize,
    },
    /// Weight matching: recover the key's permutations from the encrypted GGUF and the public
    /// base model (`--model`); the key is used only to score the guess.
    AttackWeights {
        #[command(flatten)]
        model: ModelArgs,
        /// The key only scores the recovery.
        #[command(flatten)]
        pair: EncryptedPair,
    },
    /// Frequency analysis: recover token ids from a ciphertext token stream alone, for several
    /// stream lengths, by frequency ranks and bigram-scored hill climbing.
    ///
    /// The text files (plain text; passages separated by blank lines or `%` lines, as in
    /// fortune files) are shuffled into passages, half becoming the attacker's reference and
    /// half the victim's chats, encrypted under a fresh key.
    AttackFrequency {
        #[command(flatten)]
        model: ModelArgs,
        /// English text files to draw passages from.
        #[arg(long = "text", required = true)]
        texts: Vec<PathBuf>,
        /// Ciphertext tokens the node sees under one key, one measurement each.
        #[arg(long, value_delimiter = ',', default_value = "1000,10000,100000")]
        tokens: Vec<usize>,
        /// Seed for the passage shuffle and the key, so a run can be repeated.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Vocabulary-matching inversion: read a text back from the hidden states a node is
    /// handed, with the public weights (`--model`), for a client-side split of K client blocks
    /// (plaintext states) and for EE (the same states, residual stream permuted, from the model
    /// encrypted under a fresh key). Prints tokens recovered per K and mode, and the cost.
    AttackInversion {
        #[command(flatten)]
        model: ModelArgs,
        /// Client blocks before the node's first (0: the embedding's output).
        #[arg(long, value_delimiter = ',', default_value = "0,1,2,4")]
        client_layers: Vec<usize>,
        /// A text file to read back (raw text, no chat template); default: a held-out passage
        /// written for Veil.
        #[arg(long)]
        text: Option<PathBuf>,
        /// Candidates tried at one position before the closest is taken (default: the whole
        /// vocabulary).
        #[arg(long)]
        max_candidates: Option<usize>,
    },
    /// The obfuscated mode's trade-off: for each noise level, a model obfuscated under a fresh
    /// full key, its perplexity on held-out text and its greedy agreement with the plaintext
    /// model, against the tokens each attack with the public weights (`--model`) recovers.
    ObfuscationCurve {
        #[command(flatten)]
        model: ModelArgs,
        /// Noise levels, as multiples of the embedding's and head's spread.
        #[arg(long, value_delimiter = ',', default_value = "0,0.5,1,2,4")]
        noise: Vec<f32>,
        /// Greedy tokens per sample prompt for the agreement.
        #[arg(long, default_value_t = 32)]
        tokens: usize,
        /// Random vocabulary entries the adaptive attack reads, besides the held-out text's.
        #[arg(long, default_value_t = 1000)]
        vocabulary_sample: usize,
    },
}

/// The formats `veil ee encrypt --obfuscate` writes.
#[derive(clap::ValueEnum, Debug, Clone, Copy)]
pub enum ObfuscatedFormat {
    /// 32-bit floats: the obfuscated model exactly as transformed.
    F32,
    /// 8-bit blocks: a quarter of the size, at Q8_0's speed.
    #[value(name = "q8_0")]
    Q8_0,
}

/// An encrypted model and the key it was made with.
#[derive(Args, Debug)]
pub struct EncryptedPair {
    /// The encrypted model from `veil ee encrypt`.
    #[arg(long)]
    encrypted: PathBuf,
    /// The key it was made with.
    #[arg(long)]
    key: PathBuf,
}

/// Runs `veil ee ...`.
pub fn run(command: EeCommand) -> Result<()> {
    match command {
        EeCommand::Keygen {
            model,
            out,
            transform,
        } => {
            if out.exists() {
                bail!(
                    "{} already exists: refusing to overwrite a key",
                    out.display()
                );
            }
            let path = model.resolve_path()?;
            let gguf = GgufFile::open(&path)?;
            let config = LlamaConfig::from_gguf(&gguf)?;
            let kind = transform.unwrap_or_else(|| veil_ee::natural_kind(&gguf));
            let digest = model_digest(&path)?;
            let key = EeKey::generate_of_kind(&config, &digest, kind);
            key.check(&config)?;
            let sealed = key.seal(&passphrase()?)?;
            crate::commands::write_secret(&out, &sealed)?;
            eprintln!(
                "wrote a {kind} key for {} to {}",
                path.display(),
                out.display()
            );
        }
        EeCommand::Encrypt {
            model,
            key,
            out,
            obfuscate,
            format,
        } => {
            let path = model.resolve_path()?;
            let key = read_key(&key)?;
            let started = Instant::now();
            let obfuscate = obfuscate.map(|noise| Obfuscate {
                noise,
                format: match format {
                    ObfuscatedFormat::F32 => None,
                    ObfuscatedFormat::Q8_0 => Some(candle_core::quantized::GgmlDType::Q8_0),
                },
            });
            encrypt_model_with(&path, &key, obfuscate, &out)?;
            eprintln!(
                "wrote encrypted model to {} in {:.1} s",
                out.display(),
                started.elapsed().as_secs_f64()
            );
        }
        EeCommand::Agreement {
            model,
            pair,
            tokens,
        } => {
            let key = read_key(&pair.key)?;
            if let Some(noise) = veil_ee::obfuscation_noise(&GgufFile::open(&pair.encrypted)?) {
                bail!(
                    "{} is obfuscated (noise {noise}): its output differs from the plaintext model's by design, so identical output cannot be asked of it; `veil ee obfuscation-curve` measures how close it stays",
                    pair.encrypted.display()
                );
            }
            let shards = load_encrypted(&pair.encrypted, &key, &model)?;
            let plain = model.load()?;
            let r = veil_ee::agreement(&plain, &key, &shards, &veil_ee::EVAL_PROMPTS, tokens)?;
            println!(
                "{} of {} prompts identical over {tokens} greedy tokens ({}); token agreement {:.1}%; max relative logit error {:.2e}",
                r.identical,
                r.prompts,
                model.dtype,
                100.0 * r.token_agreement,
                r.max_relative_logit_error
            );
        }
        EeCommand::AttackWeights { model, pair } => {
            let key = read_key(&pair.key)?;
            let embedding = |path: &Path| -> Result<veil_model::Tensor> {
                let q = GgufFile::open(path)?.tensor("token_embd.weight")?;
                Ok(q.dequantize(&candle_core::Device::Cpu)?)
            };
            let started = Instant::now();
            let found = veil_ee::match_embeddings(
                &embedding(&model.resolve_path()?)?,
                &embedding(&pair.encrypted)?,
            )?;
            let (vocab, hidden) = found.score(&key);
            println!(
                "weight matching recovered {:.1}% of the vocabulary permutation and {:.1}% of the residual permutation in {:.1} s",
                100.0 * vocab,
                100.0 * hidden,
                started.elapsed().as_secs_f64()
            );
        }
        EeCommand::AttackFrequency {
            model,
            texts,
            tokens,
            seed,
        } => attack_frequency(&model, &texts, &tokens, seed)?,
        EeCommand::AttackInversion {
            model,
            client_layers,
            text,
            max_candidates,
        } => attack_inversion(&model, &client_layers, text.as_deref(), max_candidates)?,
        EeCommand::ObfuscationCurve {
            model,
            noise,
            tokens,
            vocabulary_sample,
        } => crate::commands::ee_obfuscation::curve(&model, &noise, tokens, vocabulary_sample)?,
    }
    Ok(())
}

/// Runs the inversion attack for each K in `client_layers`, on plaintext and EE states.
fn attack_inversion(
    model: &ModelArgs,
    client_layers: &[usize],
    text: Option<&Path>,
    max_candidates: Option<usize>,
) -> Result<()> {
    let path = model.resolve_path()?;
    let public = model.load()?;
    let blocks = public.config.block_count;
    if let Some(&k) = client_layers.iter().find(|&&k| k >= blocks) {
        bail!("--client-layers {k}: the model has {blocks} blocks, so K must be below {blocks}");
    }
    let (text, source) = match text {
        Some(file) => (
            std::fs::read_to_string(file)
                .with_context(|| format!("cannot read {}", file.display()))?,
            file.display().to_string(),
        ),
        None => (
            veil_serve::accel::HELD_OUT.to_string(),
            "the held-out passage".into(),
        ),
    };
    let ids = public.raw_prompt(text.trim())?;
    let budget = veil_ee::InversionBudget {
        max_candidates: max_candidates.unwrap_or(usize::MAX),
        ..Default::default()
    };
    if budget.max_candidates == 0 {
        bail!("--max-candidates must be at least 1");
    }

    let gguf = GgufFile::open(&path)?;
    let kind = veil_ee::natural_kind(&gguf);
    let key = EeKey::generate_of_kind(&public.config, &model_digest(&path)?, kind);
    let dir = tempfile::tempdir()?;
    let encrypted = dir.path().join("encrypted.gguf");
    encrypt_model(&path, &key, &encrypted)?;
    let encrypted_ids = veil_ee::encrypt_tokens(&key, &ids);
    let first_blocks = |file: &Path, k: usize| -> Result<ShardModel> {
        let shard = veil_model::Shard {
            layers: 0..k,
            embedding: true,
            head: false,
        };
        Ok(ShardModel::load_with(
            &mut GgufFile::open(file)?,
            &shard,
            model.dtype,
            model.kernels,
        )?)
    };
    println!(
        "reading back {} tokens of {source} with the public weights of {} ({}); EE under a fresh {kind} key",
        ids.len(),
        path.display(),
        model.dtype,
    );
    println!(
        "| K | node sees | tokens recovered | matched exactly | candidates per token | time |"
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    for &k in client_layers {
        let public_blocks = first_blocks(&path, k)?;
        let split = veil_ee::hidden_states_seen(&public_blocks, &ids)?;
        let ee = veil_ee::hidden_states_seen(&first_blocks(&encrypted, k)?, &encrypted_ids)?;
        for (seen, states, view) in [
            ("split (plaintext)", &split, veil_ee::HiddenView::Plain),
            ("EE (permuted)", &ee, veil_ee::HiddenView::Permuted),
        ] {
            let started = Instant::now();
            let read =
                veil_ee::invert_hidden_states(&public_blocks, &public, states, view, budget)?;
            println!(
                "| {k} | {seen} | {:.1}% | {} of {} | {:.0} | {:.1} s |",
                100.0 * read.recovered(&ids),
                read.matched,
                ids.len(),
                read.candidates_tried as f64 / ids.len() as f64,
                started.elapsed().as_secs_f64()
            );
        }
    }
    Ok(())
}

/// Runs the frequency attack on chats built from `texts` and prints one line per stream length.
fn attack_frequency(
    model: &ModelArgs,
    texts: &[PathBuf],
    tokens: &[usize],
    seed: u64,
) -> Result<()> {
    if tokens.contains(&0) {
        bail!("--tokens must be positive");
    }
    let mut passages = Vec::new();
    for path in texts {
        let bytes =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        passages.extend(split_passages(&String::from_utf8_lossy(&bytes)));
    }
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    passages.shuffle(&mut rng);
    let text = LocalModel::open_text(&model.resolve_path()?)?;
    let (reference, victim) = passages.split_at(passages.len() / 2);
    let reference = chat_stream(&text, reference)?;
    let victim = chat_stream(&text, victim)?;
    let longest = tokens.iter().copied().max().unwrap_or(0);
    if victim.len() < longest {
        bail!(
            "the text gives {} victim tokens (and {} reference tokens), fewer than --tokens {longest}: pass more text",
            victim.len(),
            reference.len()
        );
    }

    let key = EeKey::generate_with(&text.config, "frequency-attack", &mut rng);
    let truth = veil_ee::key::inverse(&key.vocab);
    println!(
        "reference: {} tokens from {} passages; fresh key per run",
        reference.len(),
        passages.len() / 2
    );
    // Content tokens: outside the reference's 1000 most frequent, where names and numbers live.
    let mut by_count: HashMap<u32, usize> = HashMap::new();
    reference
        .iter()
        .for_each(|&t| *by_count.entry(t).or_default() += 1);
    let mut common: Vec<(u32, usize)> = by_count.into_iter().collect();
    common.sort_by_key(|&(t, n)| (std::cmp::Reverse(n), t));
    let common: HashSet<u32> = common.iter().take(1000).map(|&(t, _)| t).collect();
    println!(
        "tokens seen | distinct ids | recovered by rank | after climb | content tokens: share, recovered | time"
    );
    for &n in tokens {
        let cipher = veil_ee::encrypt_tokens(&key, &victim[..n]);
        let started = Instant::now();
        let guess = FrequencyAttack::default().run(&reference, &cipher, text.config.vocab_size);
        let elapsed = started.elapsed().as_secs_f64();
        let plain = |c: u32| truth[c as usize];
        let content: Vec<u32> = cipher
            .iter()
            .copied()
            .filter(|&c| !common.contains(&plain(c)))
            .collect();
        let score = |g, stream: &[u32]| 100.0 * FrequencyGuess::recovered(g, stream, plain);
        println!(
            "{n:>11} | {:>12} | {:>16.1}% | {:>10.1}% | {:>20.1}%, {:>8.1}% | {elapsed:.1} s",
            guess.climbed.len(),
            score(&guess.by_rank, &cipher),
            score(&guess.climbed, &cipher),
            100.0 * content.len() as f64 / n as f64,
            score(&guess.climbed, &content),
        );
    }
    Ok(())
}

/// Passages of a text: runs of lines split at blank lines and at `%` lines (fortune files).
fn split_passages(text: &str) -> Vec<String> {
    let mut passages = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        if line.trim().is_empty() || line.trim() == "%" {
            if !current.trim().is_empty() {
                passages.push(std::mem::take(&mut current).trim().to_string());
            }
            current.clear();
        } else {
            current.push_str(line);
            current.push('\n');
        }
    }
    if !current.trim().is_empty() {
        passages.push(current.trim().to_string());
    }
    passages
}

/// Token ids of two-turn chats (user, assistant) made of consecutive passages, as a node would
/// see them, concatenated.
fn chat_stream(text: &LocalModel, passages: &[String]) -> Result<Vec<u32>> {
    let mut ids = Vec::new();
    for turn in passages.chunks(2) {
        let mut messages = vec![ChatMessage::user(turn[0].clone())];
        if let Some(answer) = turn.get(1) {
            messages.push(ChatMessage::assistant(answer.clone()));
        }
        ids.extend(
            text.tokenizer
                .encode(&text.chat_template()?.render(&messages, false)?)?,
        );
    }
    Ok(ids)
}

/// Checks that `key` made the encrypted model at `path` and loads its shards with the
/// `--layers` and `--dtype` given.
pub fn load_encrypted(path: &Path, key: &EeKey, args: &ModelArgs) -> Result<Vec<ShardModel>> {
    let mut gguf = GgufFile::open(path)?;
    veil_ee::check_key(&gguf, key)?;
    Ok(ShardModel::load_chain(
        &mut gguf,
        &args.ranges(),
        args.dtype,
        args.kernels,
    )?)
}

/// Reads and opens a sealed key file.
pub fn read_key(path: &Path) -> Result<EeKey> {
    Ok(read_key_and_passphrase(path)?.0)
}

/// [`read_key`], and the passphrase that opened it (a gateway seals its rotated keys with it).
pub fn read_key_and_passphrase(path: &Path) -> Result<(EeKey, String)> {
    let sealed =
        std::fs::read(path).with_context(|| format!("cannot read key file {}", path.display()))?;
    let passphrase = passphrase()?;
    let key = EeKey::open(&sealed, &passphrase)
        .with_context(|| format!("cannot open key file {}", path.display()))?;
    Ok((key, passphrase))
}

/// The key passphrase: `$VEIL_KEY_PASSPHRASE`, or one line read from stdin.
fn passphrase() -> Result<String> {
    if let Ok(p) = std::env::var("VEIL_KEY_PASSPHRASE") {
        return Ok(p);
    }
    eprint!("key passphrase: ");
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    let line = line.trim_end_matches(['\r', '\n']).to_string();
    if line.is_empty() {
        bail!("no passphrase given: set VEIL_KEY_PASSPHRASE or type one");
    }
    Ok(line)
}
