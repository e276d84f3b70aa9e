//! Opening a GGUF file and checking it before anything trusts it.
//!
//! candle parses the format; this module adds the checks a user-facing tool needs: that the file
//! is GGUF at all, that every tensor's bytes are really in the file (a half-downloaded model must
//! fail at open time, with its name, not deep inside a forward pass), and typed metadata reads.

use std::fs::File;
use std::io::{BufReader, Read, Seek};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::QTensor;
use candle_core::Device;

use crate::error::{ModelError, Result};

/// An open, checked GGUF file: its parsed header and a reader for its tensors.
pub struct GgufFile {
    path: PathBuf,
    content: Content,
    reader: BufReader<File>,
    /// The vocabulary's size, kept when [`shed_tokenizer`](Self::shed_tokenizer) dropped it.
    token_count: Option<usize>,
}

impl GgufFile {
    /// Opens `path`, parses the header and checks that every tensor lies inside the file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|e| ModelError::io(&path, e))?;
        let file_len = file.metadata().map_err(|e| ModelError::io(&path, e))?.len();
        let mut reader = BufReader::new(file);

        let mut magic = [0u8; 4];
        if file_len < 4 || reader.read_exact(&mut magic).is_err() || &magic != b"GGUF" {
            return Err(ModelError::NotGguf { path });
        }
        reader.rewind().map_err(|e| ModelError::io(&path, e))?;
        let content = Content::read(&mut reader).map_err(|e| {
            let reason = e.to_string();
            match reason
                .strip_prefix("unknown dtype for tensor ")
                .and_then(|rest| rest.split_whitespace().next()?.parse::<u32>().ok())
            {
                Some(id) => ModelError::UnsupportedTensorType {
                    path: path.clone(),
                    found: ggml_type_name(id),
                },
                None => ModelError::CorruptGguf {
                    path: path.clone(),
                    reason,
                },
            }
        })?;

        for (name, info) in &content.tensor_infos {
            let dtype = info.ggml_dtype;
            let elems = info.shape.elem_count();
            if elems % dtype.block_size() != 0 {
                return Err(ModelError::CorruptGguf {
                    path,
                    reason: format!("tensor {name} has {elems} elements, not a whole number of {dtype:?} blocks"),
                });
            }
            let bytes = (elems / dtype.block_size() * dtype.type_size()) as u64;
            let end = content
                .tensor_data_offset
                .checked_add(info.offset)
                .and_then(|start| start.checked_add(bytes));
            match end {
                Some(end) if end <= file_len => {}
                _ => {
                    return Err(ModelError::CorruptGguf {
                        path,
                        reason: format!(
                            "tensor {name} ends past the end of the file ({file_len} bytes): the file is cut short"
                        ),
                    })
                }
            }
        }
        Ok(Self {
            path,
            content,
            reader,
            token_count: None,
        })
    }

    /// Forgets the tokenizer's arrays (tokens, scores, types, merges) when only the weights
    /// are wanted: parsed, Gemma 3's 262,144 tokens take about 30 MB, which a load would
    /// otherwise hold beside the weights it reads (the peak memory `veil bench` reports).
    /// The vocabulary's size stays readable through [`token_count`](Self::token_count).
    pub fn shed_tokenizer(&mut self) {
        if self.token_count.is_none() {
            self.token_count = self.array(TOKENS).ok().map(Vec::len);
        }
        self.content.metadata.retain(|key, value| {
            !(key.starts_with("tokenizer.ggml.") && matches!(value, Value::Array(_)))
        });
    }

    /// How many tokens the vocabulary holds (`tokenizer.ggml.tokens`).
    pub fn token_count(&self) -> Result<usize> {
        match self.token_count {
            Some(n) => Ok(n),
            None => Ok(self.array(TOKENS)?.len()),
        }
    }

    /// The file this was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The parsed header (metadata and tensor infos).
    pub fn content(&self) -> &Content {
        &self.content
    }

    /// Whether the file holds a tensor of this name.
    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// Every tensor's name, sorted.
    pub fn tensor_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.content.tensor_infos.keys().cloned().collect();
        names.sort();
        names
    }

    /// One tensor's bytes as stored.
    pub fn tensor_bytes(&mut self, name: &str) -> Result<Vec<u8>> {
        let len = self.tensor_len(name)?;
        self.tensor_range(name, 0, len)
    }

    /// `len` bytes of a tensor as stored, from byte `start` of it.
    pub fn tensor_range(&mut self, name: &str, start: u64, len: usize) -> Result<Vec<u8>> {
        let size = self.tensor_len(name)?;
        if start
            .checked_add(len as u64)
            .is_none_or(|end| end > size as u64)
        {
            return Err(ModelError::BadTensor {
                name: name.to_string(),
                reason: format!("bytes {start}..+{len} lie outside its {size} bytes"),
            });
        }
        let info = &self.content.tensor_infos[name];
        let at = self.content.tensor_data_offset + info.offset + start;
        let mut bytes = vec![0u8; len];
        self.reader
            .seek(std::io::SeekFrom::Start(at))
            .and_then(|_| self.reader.read_exact(&mut bytes))
            .map_err(|e| ModelError::io(&self.path, e))?;
        Ok(bytes)
    }

    /// A tensor's size in bytes (checked against the file at open).
    fn tensor_len(&self, name: &str) -> Result<usize> {
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| ModelError::BadTensor {
                name: name.to_string(),
                reason: "missing from the GGUF file".to_string(),
            })?;
        let dtype = info.ggml_dtype;
        Ok(info.shape.elem_count() / dtype.block_size() * dtype.type_size())
    }

    /// Reads one tensor as stored (quantized or not).
    pub fn tensor(&mut self, name: &str) -> Result<QTensor> {
        if !self.has_tensor(name) {
            return Err(ModelError::BadTensor {
                name: name.to_string(),
                reason: "missing from the GGUF file".to_string(),
            });
        }
        self.content
            .tensor(&mut self.reader, name, &Device::Cpu)
            .map_err(|e| ModelError::BadTensor {
                name: name.to_string(),
                reason: e.to_string(),
            })
    }

    /// The raw metadata value under `key`.
    pub fn value(&self, key: &str) -> Result<&Value> {
        self.content
            .metadata
            .get(key)
            .ok_or_else(|| ModelError::MissingMetadata {
                key: key.to_string(),
            })
    }

    /// A string metadata value.
    pub fn string(&self, key: &str) -> Result<&str> {
        self.value(key)?
            .to_string()
            .map(String::as_str)
            .map_err(|e| bad(key, e))
    }

    /// An unsigned integer metadata value, whatever its stored width.
    pub fn usize(&self, key: &str) -> Result<usize> {
        let v = self.value(key)?;
        let signed = |x: i64| u64::try_from(x).map_err(|_| bad(key, format!("{x} is negative")));
        let n = match v {
            Value::U8(x) => u64::from(*x),
            Value::U16(x) => u64::from(*x),
            Value::U32(x) => u64::from(*x),
            Value::U64(x) => *x,
            Value::I8(x) => signed(i64::from(*x))?,
            Value::I16(x) => signed(i64::from(*x))?,
            Value::I32(x) => signed(i64::from(*x))?,
            Value::I64(x) => signed(*x)?,
            other => return Err(bad(key, format!("expected an integer, found {other:?}"))),
        };
        usize::try_from(n).map_err(|_| bad(key, format!("{n} is too large")))
    }

    /// A float metadata value (f32 or f64 in the file).
    pub fn f64(&self, key: &str) -> Result<f64> {
        match self.value(key)? {
            Value::F32(x) => Ok(*x as f64),
            Value::F64(x) => Ok(*x),
            other => Err(bad(key, format!("expected a float, found {other:?}"))),
        }
    }

    /// An array metadata value.
    pub fn array(&self, key: &str) -> Result<&Vec<Value>> {
        self.value(key)?.to_vec().map_err(|e| bad(key, e))
    }
}

/// The metadata key of the vocabulary.
const TOKENS: &str = "tokenizer.ggml.tokens";

fn bad(key: &str, reason: impl ToString) -> ModelError {
    ModelError::BadMetadata {
        key: key.to_string(),
        reason: reason.to_string(),
    }
}

/// ggml's name for tensor type `id`, for the types candle cannot read (ggml.h's numbering).
fn ggml_type_name(id: u32) -> String {
    let name = match id {
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => return format!("type {id}"),
    };
    format!("{name} (type {id})")
}
