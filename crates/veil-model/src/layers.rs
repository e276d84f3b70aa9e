//! The parts every architecture's block is built from: RoPE, attention over a session's cache
//! (with the options the families differ by: biases, QK-norm, a sliding window), the gated
//! feed-forward network, and reading checked tensors from the file.

use candle_core::quantized::QTensor;
use candle_core::{CpuStorage, CustomOp2, DType, Device, Layout, Shape, Storage, Tensor};

use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;
use crate::kv::KvStore;
use crate::linear::{Kernels, Linear};
use crate::weights::WeightFormat;
pub(crate) use veil_kernels::GateActivation;

/// One session's rows in a batched step: `len` new positions from `start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Segment {
    /// The session's position before the step.
    pub(crate) start: usize,
    /// Positions the step adds.
    pub(crate) len: usize,
}

/// Rotary position embedding for one kind of layer. Angles are computed for the positions of
/// each call rather than tabled for the whole context: Gemma 3's 32k context and 256-wide
/// heads would make tables of 32 MB per RoPE base.
#[derive(Debug, Clone)]
pub(crate) struct Rope {
    inv_freq: Vec<f32>,
    /// Positions are multiplied by this (linear RoPE scaling).
    scale: f32,
    interleaved: bool,
}

impl Rope {
    /// RoPE over heads of `head_dim` values with frequency base `base`, positions scaled by
    /// `scale`; `factors` divide the frequencies (Llama 3's `rope_freqs.weight`).
    pub(crate) fn new(
        config: &LlamaConfig,
        base: f32,
        scale: f32,
        factors: Option<&[f32]>,
    ) -> Result<Self> {
        let half = config.head_dim / 2;
        if let Some(f) = factors {
            if f.len() != half || f.iter().any(|x| !(*x > 0.0 && x.is_finite())) {
                return Err(ModelError::BadTensor {
                    name: "rope_freqs.weight".into(),
                    reason: format!("expected {half} positive frequency factors"),
                });
            }
        }
        let inv_freq = (0..half)
            .map(|i| {
                let f = 1.0 / base.powf(2.0 * i as f32 / config.head_dim as f32);
                factors.map_or(f, |factors| f / factors[i])
            })
            .collect();
        Ok(Self {
            inv_freq,
            scale,
            interleaved: config.architecture.rope_interleaved(),
        })
    }

    /// Rotates queries and keys `(batch, n, tokens, head_dim)` for positions
    /// `start..start + tokens`, computing the angles once for both.
    pub(crate) fn apply(&self, q: &Tensor, k: &Tensor, start: usize) -> Result<(Tensor, Tensor)> {
        let tokens = q.dim(2)?;
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(tokens * half);
        let mut sin = Vec::with_capacity(tokens * half);
        for p in start..start + tokens {
            let position = p as f32 * self.scale;
            for f in &self.inv_freq {
                let angle = position * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let cos = Tensor::from_vec(cos, (tokens, half), &Device::Cpu)?;
        let sin = Tensor::from_vec(sin, (tokens, half), &Device::Cpu)?;
        let rotate = |x: &Tensor| -> Result<Tensor> {
            let x = x.contiguous()?;
            Ok(if self.interleaved {
                candle_nn::rotary_emb::rope_i(&x, &cos, &sin)?
            } else {
                candle_nn::rotary_emb::rope(&x, &cos, &sin)?
            })
        };
        Ok((rotate(q)?, rotate(k)?))
    }
}

/// A block's self-attention: projections, optional biases (Qwen 2) and per-head norms
/// (Qwen 3, Gemma 3), RoPE, and Veil's causal attention kernel over the session's cache.
#[derive(Debug, Clone)]
pub(crate) struct Attention {
    pub wq: Linear,
    pub wk: Linear,
    pub wv: Linear,
    pub wo: Linear,
    biases: Option<[Tensor; 3]>,
    qk_norm: Option<(Tensor, Tensor)>,
    rope: Rope,
    /// The sliding window, for a local layer.
    window: Option<usize>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    eps: f32,
}

impl Attention {
    /// Reads block `i`'s attention; `rope` is the one this layer uses.
    pub(crate) fn load(
        weights: &mut BlockWeights<'_>,
        config: &LlamaConfig,
        rope: Rope,
    ) -> Result<Self> {
        let (h, q, kv) = (config.hidden_size, config.q_size(), config.kv_size());
        let i = weights.block;
        let biases = if weights.has("attn_q.bias") {
            Some([
                weights.vector("attn_q.bias", q)?,
                weights.vector("attn_k.bias", kv)?,
                weights.vector("attn_v.bias", kv)?,
            ])
        } else {
            None
        };
        let qk_norm = if weights.has("attn_q_norm.weight") {
            Some((
                weights.vector("attn_q_norm.weight", config.head_dim)?,
                weights.vector("attn_k_norm.weight", config.head_dim)?,
            ))
        } else {
            None
        };
        Ok(Self {
            wq: weights.matrix("attn_q", &[q, h])?,
            wk: weights.matrix("attn_k", &[kv, h])?,
            wv: weights.matrix("attn_v", &[kv, h])?,
            wo: weights.matrix("attn_output", &[h, q])?,
            biases,
            qk_norm,
            rope,
            window: config.window(i),
            heads: config.head_count,
            kv_heads: config.kv_head_count,
            head_dim: config.head_dim,
            eps: config.rms_eps as f32,
        })
    }

    /// Attention of normed hidden states `h` `(1, tokens, hidden)` at positions `start..`,
    /// after the output projection.
    pub(crate) fn forward(&self, h: &Tensor, kv: &mut KvStore, start: usize) -> Result<Tensor> {
        let (q, k, v) = self.project(h)?;
        let y = self.attend(q, k, v, kv, start)?;
        self.wo.forward(&y)
    }

    /// One decode step for several sessions: row `i` of `h` `(1, sessions, hidden)` is the
    /// next position of the session whose cache is `kvs[i]`, at position `starts[i]`. The
    /// projections run once over every row; attention runs per session.
    pub(crate) fn forward_batch(
        &self,
        h: &Tensor,
        kvs: &mut [&mut KvStore],
        segments: &[Segment],
    ) -> Result<Tensor> {
        let (q, k, v) = self.project(h)?;
        let mut offset = 0;
        let rows = kvs
            .iter_mut()
            .zip(segments)
            .map(|(kv, segment)| {
                let rows = |t: &Tensor| t.narrow(2, offset, segment.len);
                let attended = self.attend(rows(&q)?, rows(&k)?, rows(&v)?, kv, segment.start);
                offset += segment.len;
                attended
            })
            .collect::<Result<Vec<_>>>()?;
        self.wo.forward(&Tensor::cat(&rows, 1)?)
    }

    /// The weight matrices, for the cheats that perturb them.
    pub(crate) fn matrices_mut(&mut self) -> [&mut Linear; 4] {
        [&mut self.wq, &mut self.wk, &mut self.wv, &mut self.wo]
    }

    /// Queries, keys and values `(1, heads, tokens, head_dim)` of normed hidden states, with
    /// biases and per-head norms applied (before RoPE).
    fn project(&self, h: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let [mut q, mut k, mut v] = Linear::forward_shared([&self.wq, &self.wk, &self.wv], h)?;
        if let Some([bq, bk, bv]) = &self.biases {
            q = q.broadcast_add(bq)?;
            k = k.broadcast_add(bk)?;
            v = v.broadcast_add(bv)?;
        }
        let (batch, tokens, _) = q.dims3()?;
        let dim = self.head_dim;
        let heads = |t: Tensor, n: usize| t.reshape((batch, tokens, n, dim));
        let (mut q, mut k) = (heads(q, self.heads)?, heads(k, self.kv_heads)?);
        if let Some((q_norm, k_norm)) = &self.qk_norm {
            q = rms_norm(&q, q_norm, f64::from(self.eps))?;
            k = rms_norm(&k, k_norm, f64::from(self.eps))?;
        }
        let v = heads(v, self.kv_heads)?;
        Ok((q.transpose(1, 2)?, k.transpose(1, 2)?, v.transpose(1, 2)?))
    }

    /// Causal attention of queries, keys and values `(1, n, tokens, head_dim)` at positions
    /// `start..` over a session's cache, with Veil's kernel: each query is computed the same
    /// way however many share the call, so chunked prompts, checked drafts and batched
    /// sessions give the bits of one plain pass. Returns `(1, tokens, heads * head_dim)`.
    fn attend(
        &self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        kv: &mut KvStore,
        start: usize,
    ) -> Result<Tensor> {
        let (batch, _, tokens, _) = q.dims4()?;
        let (q, k) = self.rope.apply(&q, &k, start)?;
        let (keys, values) = kv.append(&k, &v.contiguous()?)?;
        let shape = veil_kernels::AttentionShape {
            heads: self.heads,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            tokens,
            start,
            key_capacity: keys.dim(2)?,
            window: self.window,
        };
        let queries = q.flatten_all()?.to_vec1::<f32>()?;
        let mut out = vec![0.0f32; queries.len()];
        let (key_storage, key_layout) = keys.storage_and_layout();
        let (value_storage, value_layout) = values.storage_and_layout();
        let (Storage::Cpu(key_data), Storage::Cpu(value_data)) = (&*key_storage, &*value_storage)
        else {
            return Err(ModelError::InvalidInput(
                "the KV cache is not in CPU memory".into(),
            ));
        };
        let key_slice =
            &key_data.as_slice::<f32>()?[key_layout.start_offset()..][..keys.elem_count()];
        let value_slice =
            &value_data.as_slice::<f32>()?[value_layout.start_offset()..][..values.elem_count()];
        veil_kernels::causal_attention(&shape, &queries, key_slice, value_slice, &mut out)
            .map_err(|e| ModelError::InvalidInput(format!("attention: {e}")))?;
        Ok(Tensor::from_vec(
            out,
            (batch, tokens, self.heads * self.head_dim),
            &Device::Cpu,
        )?)
    }
}

/// A gated feed-forward network: `down(act(gate(x)) * up(x))`.
#[derive(Debug, Clone)]
pub(crate) struct FeedForward {
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
    act: GateActivation,
}

impl FeedForward {
    pub(crate) fn load(
        weights: &mut BlockWeights<'_>,
        config: &LlamaConfig,
        act: GateActivation,
    ) -> Result<Self> {
        let (h, ffn) = (config.hidden_size, config.ffn_size);
        Ok(Self {
            gate: weights.matrix("ffn_gate", &[ffn, h])?,
            up: weights.matrix("ffn_up", &[ffn, h])?,
            down: weights.matrix("ffn_down", &[h, ffn])?,
            act,
        })
    }

    pub(crate) fn forward(&self, h: &Tensor) -> Result<Tensor> {
        let [gate, up] = Linear::forward_shared([&self.gate, &self.up], h)?;
        let gated = gate
            .contiguous()?
            .apply_op2_no_bwd(&up.contiguous()?, &Gated(self.act))?;
        self.down.forward(&gated)
    }

    pub(crate) fn matrices_mut(&mut self) -> [&mut Linear; 3] {
        [&mut self.gate, &mut self.up, &mut self.down]
    }
}

/// `act(gate) · up` as a candle op, on Veil's kernel (one pass, on the pool's threads).
struct Gated(GateActivation);

impl CustomOp2 for Gated {
    fn name(&self) -> &'static str {
        "veil-gated-activation"
    }

    fn cpu_fwd(
        &self,
        gate: &CpuStorage,
        gate_layout: &Layout,
        up: &CpuStorage,
        up_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (gate, up) = contiguous_f32_pair(self.name(), (gate, gate_layout), (up, up_layout))?;
        if gate_layout.shape() != up_layout.shape() {
            candle_core::bail!(
                "{}: gate {:?} and up {:?} differ in shape",
                self.name(),
                gate_layout.shape(),
                up_layout.shape()
            );
        }
        let mut out = vec![0f32; gate.len()];
        veil_kernels::gated_activation(self.0, gate, up, &mut out)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        Ok((CpuStorage::F32(out), gate_layout.shape().clone()))
    }
}

/// Reads block `block`'s tensors (`blk.{block}.{name}`) with their shapes checked.
pub(crate) struct BlockWeights<'a> {
    pub gguf: &'a mut GgufFile,
    pub block: usize,
    pub format: WeightFormat,
    pub kernels: Kernels,
}

impl BlockWeights<'_> {
    fn name(&self, name: &str) -> String {
        format!("blk.{}.{name}", self.block)
    }

    /// Whether the block has tensor `name`.
    pub(crate) fn has(&self, name: &str) -> bool {
        self.gguf.has_tensor(&self.name(name))
    }

    /// Matrix `{name}.weight` of shape `(out, in)`, ready to multiply.
    pub(crate) fn matrix(&mut self, name: &str, shape: &[usize]) -> Result<Linear> {
        let name = self.name(&format!("{name}.weight"));
        Linear::load(self.gguf, &name, shape, self.format, self.kernels)
    }

    /// Vector `name` of length `len` (a norm weight or a bias) as dense f32.
    pub(crate) fn vector(&mut self, name: &str, len: usize) -> Result<Tensor> {
        dense(self.gguf, &self.name(name), len)
    }
}

/// `x` through RMSNorm with weight `w`, over the last dimension.
///
/// Veil's own norm (`veil_kernels::rms_norm`) rather than candle's: its sum of squares gives
/// the same bits in every order of the features, so a model whose residual stream is permuted
/// by an encryption key computes exactly what the plaintext model does.
pub(crate) fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let w = w.to_dtype(DType::F32)?.contiguous()?;
    Ok(x.contiguous()?
        .apply_op2_no_bwd(&w, &RmsNorm { eps: eps as f32 })?)
}

/// [`rms_norm`] as a candle op.
struct RmsNorm {
    eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "veil-rms-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        w: &CpuStorage,
        w_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, w) = contiguous_f32_pair(self.name(), (x, x_layout), (w, w_layout))?;
        let features = x_layout.shape().dims().last().copied().unwrap_or(0);
        if features != w.len() || features == 0 {
            candle_core::bail!(
                "{}: values {:?} do not end in the weight's {} features",
                self.name(),
                x_layout.shape(),
                w.len()
            );
        }
        let mut out = vec![0f32; x.len()];
        veil_kernels::rms_norm(x, w, self.eps, &mut out);
        Ok((CpuStorage::F32(out), x_layout.shape().clone()))
    }
}

/// The values of a two-input candle op's operands, which Veil's ops take as contiguous f32.
fn contiguous_f32_pair<'a>(
    op: &str,
    (a, a_layout): (&'a CpuStorage, &Layout),
    (b, b_layout): (&'a CpuStorage, &Layout),
) -> candle_core::Result<(&'a [f32], &'a [f32])> {
    let (CpuStorage::F32(a), CpuStorage::F32(b)) = (a, b) else {
        candle_core::bail!("{op} takes f32 values");
    };
    let (Some((a0, a1)), Some((b0, b1))) =
        (a_layout.contiguous_offsets(), b_layout.contiguous_offsets())
    else {
        candle_core::bail!("{op} takes contiguous tensors");
    };
    Ok((&a[a0..a1], &b[b0..b1]))
}

/// Reads a tensor and checks its shape (GGUF stores `(out, in)` as candle sees it).
pub(crate) fn load(gguf: &mut GgufFile, name: &str, shape: &[usize]) -> Result<QTensor> {
    let q = gguf.tensor(name)?;
    if q.shape().dims() != shape {
        return Err(ModelError::BadTensor {
            name: name.to_string(),
            reason: format!("shape {:?}, expected {shape:?}", q.shape().dims()),
        });
    }
    Ok(q)
}

/// Reads a vector tensor (norm weight, bias) as dense f32 of length `len`.
pub(crate) fn dense(gguf: &mut GgufFile, name: &str, len: usize) -> Result<Tensor> {
    let t = load(gguf, name, &[len])?.dequantize(&Device::Cpu)?;
    Ok(if t.dtype() == DType::F32 {
        t
    } else {
        t.to_dtype(DType::F32)?
    })
}
