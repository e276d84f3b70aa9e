//! Applying a [`KeyKind::GroupLocal`](crate::KeyKind) key to a model's stored tensors, in their
//! own formats.
//!
//! Rows move whole (each output is its own dot product); columns move only inside their group
//! of [`SCALE_GROUP`], as codes inside their quantization block, so no value is quantized again
//! and every block sum stays the same integer.

use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType, QTensor};
use candle_core::Device;
use veil_model::{LlamaConfig, QuantFormat};

use crate::error::{EeError, Result};
use crate::key::{inverse, EeKey};

/// Where each row and column of a tensor comes from: new index `i` is old index `p[i]`.
struct Moves {
    rows: Option<Vec<u32>>,
    cols: Option<Vec<u32>>,
}

/// The moves the key makes on tensor `name`, or `None` for tensors it leaves alone. Unknown
/// names are refused: their basis cannot be told, and leaving one unmoved would break the
/// model silently.
fn moves(key: &EeKey, config: &LlamaConfig, name: &str) -> Result<Option<Moves>> {
    let hidden = || Some(key.hidden.clone());
    let m = |rows: Option<Vec<u32>>, cols: Option<Vec<u32>>| Ok(Some(Moves { rows, cols }));
    match name {
        "token_embd.weight" | "output.weight" => return m(Some(inverse(&key.vocab)), hidden()),
        "output_norm.weight" => return m(None, hidden()),
        "rope_freqs.weight" => return Ok(None),
        _ => {}
    }
    let unknown = || EeError::KeyMismatch(format!("tensor {name} has no known place in a block"));
    let rest = name.strip_prefix("blk.").ok_or_else(unknown)?;
    let (block, tensor) = rest.split_once('.').ok_or_else(unknown)?;
    let layer = block
        .parse::<usize>()
        .ok()
        .and_then(|b| key.layers.get(b))
        .ok_or_else(unknown)?;
    let values = || -> Result<Vec<u32>> {
        // Value coordinates of every KV head, each head's permutation applied in its place.
        let d = config.head_dim;
        let mut p = Vec::with_capacity(config.kv_head_count * d);
        for h in 0..config.kv_head_count {
            let local = layer.value_permutation(h).ok_or_else(|| {
                EeError::KeyMismatch(format!("block {block}: value map {h} is not a permutation"))
            })?;
            p.extend(local.iter().map(|&c| (h * d) as u32 + c));
        }
        Ok(p)
    };
    match tensor {
        "attn_norm.weight"
        | "ffn_norm.weight"
        | "post_attention_norm.weight"
        | "post_ffw_norm.weight" => m(None, hidden()),
        "attn_q.weight" | "attn_k.weight" => m(None, hidden()),
        "attn_q.bias" | "attn_k.bias" | "attn_q_norm.weight" | "attn_k_norm.weight" => Ok(None),
        "attn_v.weight" => m(Some(values()?), hidden()),
        "attn_v.bias" => m(None, Some(values()?)),
        "attn_output.weight" => {
            // Each query head reads the values of its KV head.
            let (d, values) = (config.head_dim, values()?);
            let group = config.head_count / config.kv_head_count.max(1);
            let cols = (0..config.head_count * d)
                .map(|c| {
                    let (head, r) = (c / d, c % d);
                    let kv = head / group.max(1);
                    (head * d) as u32 + values[kv * d + r] - (kv * d) as u32
                })
                .collect();
            m(hidden(), Some(cols))
        }
        "ffn_gate.weight" | "ffn_up.weight" => m(Some(layer.ffn.clone()), hidden()),
        "ffn_down.weight" => m(hidden(), Some(layer.ffn.clone())),
        _ => Err(unknown()),
    }
}

/// Tensor `name` with the key's moves applied, in its own format.
pub(crate) fn move_tensor(
    key: &EeKey,
    config: &LlamaConfig,
    name: &str,
    q: QTensor,
) -> Result<QTensor> {
    let Some(moves) = moves(key, config, name)? else {
        return Ok(q);
    };
    let dims = q.shape().dims().to_vec();
    let (rows, cols) = match dims[..] {
        [n] => (1, n),
        [r, c] => (r, c),
        _ => {
            return Err(EeError::KeyMismatch(format!(
                "tensor {name} has shape {dims:?}, not a vector or a matrix"
            )))
        }
    };
    let fits = |p: &Option<Vec<u32>>, n: usize, what: &str| match p {
        Some(p) if p.len() != n => Err(EeError::KeyMismatch(format!(
            "tensor {name} has {n} {what}, the key moves {}",
            p.len()
        ))),
        _ => Ok(()),
    };
    fits(&moves.rows, rows, "rows")?;
    fits(&moves.cols, cols, "columns")?;
    let dtype = q.dtype();
    let bytes = q.data()?;
    let layout = Layout::of(dtype).ok_or_else(|| {
        EeError::KeyMismatch(format!(
            "tensor {name} is stored as {dtype:?}, which the group-local transform cannot move \
             exactly; requantize the model to a GGUF block format or F32 first"
        ))
    })?;
    let row_bytes = bytes.len() / rows;
    let mut out = Vec::with_capacity(bytes.len());
    for r in 0..rows {
        let from = moves.rows.as_ref().map_or(r, |p| p[r] as usize);
        let row = &bytes[from * row_bytes..(from + 1) * row_bytes];
        match &moves.cols {
            None => out.extend_from_slice(row),
            Some(cols) => layout.move_columns(row, cols, &mut out)?,
        }
    }
    Ok(qtensor_from_ggml(dtype, &out, dims, &Device::Cpu)?)
}

/// How a row's values are stored.
enum Layout {
    /// One value per `usize` bytes (F32, F16).
    Plain(usize),
    /// Quantized blocks.
    Blocks(QuantFormat),
}

impl Layout {
    fn of(dtype: GgmlDType) -> Option<Self> {
        match dtype {
            GgmlDType::F32 => Some(Layout::Plain(4)),
            GgmlDType::F16 | GgmlDType::BF16 => Some(Layout::Plain(2)),
            other => QuantFormat::from_ggml(other).map(Layout::Blocks),
        }
    }

    /// Appends `row` with column `i` taken from column `cols[i]`.
    fn move_columns(&self, row: &[u8], cols: &[u32], out: &mut Vec<u8>) -> Result<()> {
        match *self {
            Layout::Plain(width) => {
                for &c in cols {
                    let c = c as usize;
                    out.extend_from_slice(&row[c * width..(c + 1) * width]);
                }
            }
            Layout::Blocks(format) => {
                let n = format.block_values();
                for (b, block) in row.chunks_exact(format.block_bytes()).enumerate() {
                    let first = b * n;
                    let local: Vec<usize> = cols[first..first + n]
                        .iter()
                        .map(|&c| (c as usize).wrapping_sub(first))
                        .collect();
                    let moved = format
                        .permute_block(block, &local)
                        .map_err(|e| EeError::KeyMismatch(e.to_string()))?;
                    out.extend(moved);
                }
            }
        }
        Ok(())
    }
}
