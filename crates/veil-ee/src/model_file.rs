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
use veil_model::{GgufFile, LlamaConfig, ModelError};

use crate::error::{EeError, Result};
use crate::group_local::move_tensor;
use crate::key::{EeKey, KeyKind};
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

/// Transforms the plaintext GGUF at `base` with `key` and writes the encrypted GGUF to `out`:
/// in F32 for a [`KeyKind::Full`] key, in the file's own formats for a
/// [`KeyKind::GroupLocal`] one.
pub fn encrypt_model(base: &Path, key: &EeKey, out: &Path) -> Result<()> {
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
            encrypt_weights(key, &config, &mut weights)?;
            weights
                .into_iter()
                .map(|(name, t)| Ok((name, QTensor::quantize(&t, GgmlDType::F32)?)))
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
