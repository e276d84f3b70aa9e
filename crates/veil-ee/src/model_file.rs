//! Writing the encrypted model: a GGUF the unchanged runtime loads like any other.
//!
//! The tokenizer metadata is left out (its strings in encrypted order would be the vocabulary
//! permutation in plain sight); the key holder keeps the tokenizer of the plaintext model.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufWriter;
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Device;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use veil_model::{GgufFile, LlamaConfig, ModelError};

use crate::error::{EeError, Result};
use crate::group_local::move_tensor;
use crate::key::{EeKey, KeyKind};
use crate::obfuscation::obfuscate_weights;
use crate::transform::encrypt_weights;

/// Metadata key of the encrypted model that names the key it was made with.
pub const KEY_FINGERPRINT: &str = "veil.ee.key_fingerprint";

/// Checks that `key` is the key an encrypted model was made with.
pub fn check_key(encrypted: &GgufFile, key: &EeKey) -> Result<()> {
    let config = LlamaConfig::from_gguf(encrypted)?;
    key.check(&config)?;
    let stored = encrypted.string(KEY_FINGERPRINT).map_err(|_| {
        EeError::KeyMismatch(format!(
            "{} is not an encrypted model",
            encrypted.path().display()
        ))
    })?;
    if stored != key.fingerprint() {
        return Err(EeError::KeyMismatch(format!(
            "{} was encrypted with another key",
            encrypted.path().display()
        )));
    }
    Ok(())
}

/// The key kind that keeps a model file exact: [`KeyKind::GroupLocal`] when every matrix is in
/// a quantized format Veil's kernels run (their block sums do not depend on order inside a
/// block), [`KeyKind::Full`] otherwise (F32 and F16 matrices go through float products whose
/// order a group-local move would change, so they are better served by the full transform).
pub fn natural_kind(gguf: &GgufFile) -> KeyKind {
    let all_quantized = gguf
        .content()
        .tensor_infos
        .values()
        .filter(|info| info.shape.rank() == 2)
        .all(|info| veil_model::QuantFormat::from_ggml(info.ggml_dtype).is_some());
    if all_quantized {
        KeyKind::GroupLocal
    } else {
        KeyKind::Full
    }
}

/// The blake3 digest (hex) of a model file, which keys are tied to.
pub fn model_digest(path: &Path) -> Result<String> {
    Ok(veil_model::store::file_digest(path)?.1)
}

/// The obfuscated mode's settings for [`encrypt_model_with`] (see `obfuscation.rs`).
#[derive(Debug, Clone, Copy)]
pub struct Obfuscate {
    /// Noise on the embedding and head, as a multiple of each matrix's own spread.
    pub noise: f32,
    /// The format the matrices are written in (F32 when `None`); quantizing again loses nothing
    /// exact, since the obfuscated model is no longer the plaintext one.
    pub format: Option<GgmlDType>,
}

/// The noise an obfuscated model was made with, `None` for any other model.
pub fn obfuscation_noise(gguf: &GgufFile) -> Option<f32> {
    gguf.content()
        .metadata
        .get(crate::obfuscation::NOISE_KEY)
        .and_then(|v| v.to_f32().ok())
}

/// Transforms the plaintext GGUF at `base` with `key` and writes the encrypted GGUF to `out`:
/// in F32 for a [`KeyKind::Full`] key, in the file's own formats for a
/// [`KeyKind::GroupLocal`] one.
pub fn encrypt_model(base: &Path, key: &EeKey, out: &Path) -> Result<()> {
    encrypt_model_with(base, key, None, out)
}

/// [`encrypt_model`], obfuscated when `obfuscate` is given (a [`KeyKind::Full`] key only: the
/// obfuscation's maps are dense, like the full transform's).
pub fn encrypt_model_with(
    base: &Path,
    key: &EeKey,
    obfuscate: Option<Obfuscate>,
    out: &Path,
) -> Result<()> {
    if obfuscate.is_some() && key.kind() != KeyKind::Full {
        return Err(EeError::Invalid(format!(
            "obfuscation builds on the full transform, but this is a {} key: draw one with `veil ee keygen --transform full`",
            key.kind()
        )));
    }
    let digest = model_digest(base)?;
    if digest != key.model_digest {
        return Err(EeError::WrongModel {
            key: key.model_digest.clone(),
            model: digest,
        });
    }
    let mut gguf = GgufFile::open(base)?;
    let config = LlamaConfig::from_gguf(&gguf)?;
    key.check(&config)?;
    let names: Vec<String> = gguf.content().tensor_infos.keys().cloned().collect();
    let mut tensors: Vec<(String, QTensor)> = match key.kind() {
        KeyKind::Full => {
            let mut weights = HashMap::new();
            for name in names {
                let dense = gguf.tensor(&name)?.dequantize(&Device::Cpu)?;
                weights.insert(name, dense);
            }
            if let Some(o) = obfuscate {
                let mut rng = ChaCha20Rng::from_os_rng();
                obfuscate_weights(o.noise, &config, &mut weights, &mut rng)?;
            }
            encrypt_weights(key, &config, &mut weights)?;
            let format = obfuscate.and_then(|o| o.format).unwrap_or(GgmlDType::F32);
            weights
                .into_iter()
                .map(|(name, t)| {
                    let dtype = if t.rank() == 2 {
                        format
                    } else {
                        GgmlDType::F32
                    };
                    Ok((name, QTensor::quantize(&t, dtype)?))
                })
                .collect::<Result<_>>()?
        }
        KeyKind::GroupLocal => names
            .into_iter()
            .map(|name| {
                let moved = move_tensor(key, &config, &name, gguf.tensor(&name)?)?;
                Ok((name, moved))
            })
            .collect::<Result<_>>()?,
    };

    let arch = gguf.string("general.architecture")?.to_string();
    let vocab_key = format!("{arch}.vocab_size");
    let vocab_size = Value::U32(config.vocab_size as u32);
    let mut metadata: Vec<(&str, &Value)> = gguf
        .content()
        .metadata
        .iter()
        .filter(|(k, _)| !k.starts_with("tokenizer.") && **k != vocab_key)
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    metadata.push((vocab_key.as_str(), &vocab_size));
    let fingerprint = Value::String(key.fingerprint());
    metadata.push((KEY_FINGERPRINT, &fingerprint));
    let noise = obfuscate.map(|o| Value::F32(o.noise));
    if let Some(noise) = &noise {
        metadata.push((crate::obfuscation::NOISE_KEY, noise));
    }
    metadata.sort_by_key(|(k, _)| *k);

    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();

    let partial = out.with_extension("partial");
    let file = File::create(&partial).map_err(|e| ModelError::io(&partial, e))?;
    let mut writer = BufWriter::new(file);
    gguf_file::write(&mut writer, &metadata, &tensor_refs)?;
    writer
        .into_inner()
        .map_err(|e| ModelError::io(&partial, e.into_error()))?
        .sync_all()
        .map_err(|e| ModelError::io(&partial, e))?;
    std::fs::rename(&partial, out).map_err(|e| ModelError::io(out, e))?;
    Ok(())
}
