//! Shard files: one GGUF per layer range holding only that range's tensors, so a node never
//! needs the whole model, plus a JSON manifest describing each.
//!
//! A shard file keeps the model's metadata (so the architecture and, for plaintext models, the
//! tokenizer are still there) and adds `veil.shard.*` keys saying which part it is and which
//! whole model it was cut from.

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;
use crate::shard::Shard;
use crate::store::file_digest;

const MODEL_DIGEST: &str = "veil.shard.model_digest";
const FIRST_BLOCK: &str = "veil.shard.first_block";
const END_BLOCK: &str = "veil.shard.end_block";
const EMBEDDING: &str = "veil.shard.embedding";
const HEAD: &str = "veil.shard.head";

/// What a GGUF file serves: which part of which whole model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardManifest {
    /// blake3 (hex) of the whole model file the shard was cut from: the swarm's model id.
    pub model_digest: String,
    /// First block served.
    pub first_block: usize,
    /// One past the last block served.
    pub end_block: usize,
    /// Blocks in the whole model.
    pub block_count: usize,
    /// Whether the shard takes token ids.
    pub embedding: bool,
    /// Whether the shard returns logits.
    pub head: bool,
    /// The shard's file name, beside the manifest.
    pub file: String,
}

impl ShardManifest {
    /// The part of the model this is.
    pub fn shard(&self) -> Shard {
        Shard {
            layers: self.first_block..self.end_block,
            embedding: self.embedding,
            head: self.head,
        }
    }

    /// Reads what `gguf` serves: its `veil.shard.*` keys, or, for a whole model file, the whole
    /// model with the file's own digest.
    pub fn of(gguf: &GgufFile) -> Result<Self> {
        let config = LlamaConfig::from_gguf(gguf)?;
        let file = gguf
            .path()
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !gguf.content().metadata.contains_key(MODEL_DIGEST) {
            return Ok(Self {
                model_digest: file_digest(gguf.path())?.1,
                first_block: 0,
                end_block: config.block_count,
                block_count: config.block_count,
                embedding: true,
                head: true,
                file,
            });
        }
        let flag = |key: &str| -> Result<bool> {
            match gguf.value(key)? {
                Value::Bool(b) => Ok(*b),
                other => Err(ModelError::BadMetadata {
                    key: key.to_string(),
                    reason: format!("expected a bool, found {other:?}"),
                }),
            }
        };
        let manifest = Self {
            model_digest: gguf.string(MODEL_DIGEST)?.to_string(),
            first_block: gguf.usize(FIRST_BLOCK)?,
            end_block: gguf.usize(END_BLOCK)?,
            block_count: config.block_count,
            embedding: flag(EMBEDDING)?,
            head: flag(HEAD)?,
            file,
        };
        manifest.shard().check(config.block_count)?;
        Ok(manifest)
    }
}

/// The tensor names a shard needs from a model that has (or lacks) a separate `output.weight`,
/// sorted: what a shard file holds, and what a commitment to its weights covers.
pub fn shard_tensor_names(gguf: &GgufFile, shard: &Shard) -> Vec<String> {
    let tied_head = shard.head && !gguf.has_tensor("output.weight");
    let mut names: Vec<String> = gguf
        .content()
        .tensor_infos
        .keys()
        .filter(|name| {
            let block = name
                .strip_prefix("blk.")
                .and_then(|rest| rest.split('.').next())
                .and_then(|n| n.parse::<usize>().ok());
            match block {
                Some(b) => shard.layers.contains(&b),
                None => match name.as_str() {
                    "token_embd.weight" => shard.embedding || tied_head,
                    "output_norm.weight" | "output.weight" => shard.head,
                    _ => false,
                },
            }
        })
        .cloned()
        .collect();
    names.sort();
    names
}

/// Cuts the model at `model` into `shards`, writing `<stem>.<first>-<end>.gguf` files and a
/// `manifest.json` into `out_dir`; `progress(done, total)` follows along. Weights are copied
/// block for block, so a shard computes exactly what the same range of the whole model does.
pub fn write_shard_files(
    model: &Path,
    shards: &[Shard],
    out_dir: &Path,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<ShardManifest>> {
    let mut gguf = GgufFile::open(model)?;
    let config = LlamaConfig::from_gguf(&gguf)?;
    for shard in shards {
        shard.check(config.block_count)?;
    }
    let digest = file_digest(model)?.1;
    std::fs::create_dir_all(out_dir).map_err(|e| ModelError::io(out_dir, e))?;
    let stem = model
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());

    let mut manifests = Vec::new();
    for (i, shard) in shards.iter().enumerate() {
        progress(i, shards.len());
        let names = shard_tensor_names(&gguf, shard);
        let tensors: Vec<(String, QTensor)> = names
            .into_iter()
            .map(|name| Ok((name.clone(), gguf.tensor(&name)?)))
            .collect::<Result<_>>()?;
        let extra = [
            (MODEL_DIGEST, Value::String(digest.clone())),
            (FIRST_BLOCK, Value::U32(shard.layers.start as u32)),
            (END_BLOCK, Value::U32(shard.layers.end as u32)),
            (EMBEDDING, Value::Bool(shard.embedding)),
            (HEAD, Value::Bool(shard.head)),
        ];
        let mut metadata: Vec<(&str, &Value)> = gguf
            .content()
            .metadata
            .iter()
            .filter(|(k, _)| !k.starts_with("veil.shard."))
            .map(|(k, v)| (k.as_str(), v))
            .chain(extra.iter().map(|(k, v)| (*k, v)))
            .collect();
        metadata.sort_by_key(|(k, _)| *k);
        let file = format!("{stem}.{}-{}.gguf", shard.layers.start, shard.layers.end);
        let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        write_atomically(&out_dir.join(&file), |w| {
            Ok(gguf_file::write(w, &metadata, &refs)?)
        })?;
        manifests.push(ShardManifest {
            model_digest: digest.clone(),
            first_block: shard.layers.start,
            end_block: shard.layers.end,
            block_count: config.block_count,
            embedding: shard.embedding,
            head: shard.head,
            file,
        });
    }
    let json = serde_json::to_vec_pretty(&manifests)
        .map_err(|e| ModelError::InvalidShard(format!("cannot encode the manifest: {e}")))?;
    write_atomically(&out_dir.join("manifest.json"), |w| {
        std::io::Write::write_all(w, &json).map_err(|e| ModelError::io(out_dir, e))
    })?;
    progress(shards.len(), shards.len());
    Ok(manifests)
}

/// Writes a copy of the model at `model` to `out` with every matrix weight converted to
/// `dtype` (F32, F16 or a block format) and everything else as it was: the same model in
/// another format, for engines that run files as stored (the llama.cpp benchmark).
pub fn write_converted(model: &Path, dtype: GgmlDType, out: &Path) -> Result<()> {
    let mut gguf = GgufFile::open(model)?;
    let names: Vec<String> = gguf.content().tensor_infos.keys().cloned().collect();
    let mut tensors = Vec::with_capacity(names.len());
    for name in names {
        let tensor = gguf.tensor(&name)?;
        let tensor = if tensor.shape().rank() == 2 && tensor.dtype() != dtype {
            QTensor::quantize(&tensor.dequantize(&Device::Cpu)?, dtype)?
        } else {
            tensor
        };
        tensors.push((name, tensor));
    }
    let mut metadata: Vec<(&str, &Value)> = gguf
        .content()
        .metadata
        .iter()
        .filter(|(k, _)| k.as_str() != "general.file_type")
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    metadata.sort_by_key(|(k, _)| *k);
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    write_atomically(out, |w| Ok(gguf_file::write(w, &metadata, &refs)?))
}

/// Writes `path` through a `.partial` file renamed into place, so a cut-off run leaves no
/// half-written shard behind.
fn write_atomically(
    path: &Path,
    write: impl FnOnce(&mut BufWriter<File>) -> Result<()>,
) -> Result<()> {
    let partial = PathBuf::from(format!("{}.partial", path.display()));
    let file = File::create(&partial).map_err(|e| ModelError::io(&partial, e))?;
    let mut writer = BufWriter::new(file);
    write(&mut writer)?;
    writer
        .into_inner()
        .map_err(|e| ModelError::io(&partial, e.into_error()))?
        .sync_all()
        .map_err(|e| ModelError::io(&partial, e))?;
    std::fs::rename(&partial, path).map_err(|e| ModelError::io(path, e))
}
