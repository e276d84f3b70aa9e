//! `veil ee`: equivariant-encryption keys and encrypted models.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use veil_ee::{encrypt_model, model_digest, EeKey};
use veil_model::{GgufFile, LlamaConfig, ShardModel};

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
        EeCommand::Keygen { model, out } => {
            if out.exists() {
                bail!(
                    "{} already exists: refusing to overwrite a key",
                    out.display()
                );
            }
            let path = model.resolve_path()?;
            let config = LlamaConfig::from_gguf(&GgufFile::open(&path)?)?;
            let key = EeKey::generate(&config, &model_digest(&path)?);
            let sealed = key.seal(&passphrase()?)?;
            std::fs::write(&out, sealed)
                .with_context(|| format!("cannot write {}", out.display()))?;
            eprintln!("wrote key for {} to {}", path.display(), out.display());
        }
        EeCommand::Encrypt { model, key, out } => {
            let path = model.resolve_path()?;
            let key = read_key(&key)?;
            let started = Instant::now();
            encrypt_model(&path, &key, &out)?;
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
    }
    Ok(())
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
    )?)
}

/// Reads and opens a sealed key file.
pub fn read_key(path: &Path) -> Result<EeKey> {
    let sealed =
        std::fs::read(path).with_context(|| format!("cannot read key file {}", path.display()))?;
    EeKey::open(&sealed, &passphrase()?)
        .with_context(|| format!("cannot open key file {}", path.display()))
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
