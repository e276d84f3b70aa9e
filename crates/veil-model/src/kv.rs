//! One block's key/value cache for one session.
//!
//! Written here rather than taken from `candle_nn::kv_cache::KvCache` because the acceleration
//! methods need two things that cache cannot do: drop the last positions (speculative decoding
//! keeps only the drafts the model confirms) and copy a prefix into an independent cache (prefix
//! caching; a candle cache's clone shares its storage, so two sessions grown from one prefix
//! would overwrite each other).

use candle_core::{Device, Tensor};

use crate::error::Result;

/// Keys and values `(1, kv_heads, positions, head_dim)` for the positions seen so far, in
/// storage that grows in steps so appending does not copy every time.
#[derive(Debug)]
pub(crate) struct KvStore {
    /// Storage `(keys, values)`, each `(1, kv_heads, capacity, head_dim)`; `None` until the
    /// first append.
    storage: Option<(Tensor, Tensor)>,
    len: usize,
    grow_step: usize,
}

impl KvStore {
    pub(crate) fn new(grow_step: usize) -> Self {
        Self {
            storage: None,
            len: 0,
            grow_step: grow_step.max(1),
        }
    }

    /// Forgets every position.
    pub(crate) fn reset(&mut self) {
        self.len = 0;
    }

    /// Forgets positions from `len` on.
    pub(crate) fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Appends `k`, `v` `(1, kv_heads, tokens, head_dim)` and returns the whole storage
    /// `(1, kv_heads, capacity, head_dim)`: positions past the held ones are unused.
    pub(crate) fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let tokens = k.dim(2)?;
        let needed = self.len + tokens;
        let capacity = self.storage.as_ref().map_or(Ok(0), |(k, _)| k.dim(2))?;
        if needed > capacity {
            let (_, heads, _, dim) = k.dims4()?;
            let capacity = needed.div_ceil(self.grow_step) * self.grow_step;
            let fresh = || Tensor::zeros((1, heads, capacity, dim), k.dtype(), &Device::Cpu);
            let (new_k, new_v) = (fresh()?, fresh()?);
            if let Some((old_k, old_v)) = &self.storage {
                if self.len > 0 {
                    new_k.slice_set(&old_k.narrow(2, 0, self.len)?, 2, 0)?;
                    new_v.slice_set(&old_v.narrow(2, 0, self.len)?, 2, 0)?;
                }
            }
            self.storage = Some((new_k, new_v));
        }
        let (all_k, all_v) = self.storage.as_ref().expect("storage was just made");
        all_k.slice_set(&k.contiguous()?, 2, self.len)?;
        all_v.slice_set(&v.contiguous()?, 2, self.len)?;
        self.len = needed;
        Ok((all_k.clone(), all_v.clone()))
    }

    /// An independent copy of the first `len` positions.
    pub(crate) fn copy_prefix(&self, len: usize) -> Result<Self> {
        self.copy_prefix_growing(len, self.grow_step)
    }

    /// [`copy_prefix`](Self::copy_prefix), the copy growing `grow_step` positions at a time.
    pub(crate) fn copy_prefix_growing(&self, len: usize, grow_step: usize) -> Result<Self> {
        let len = len.min(self.len);
        let storage = match &self.storage {
            Some((k, v)) if len > 0 => {
                Some((owned(k.narrow(2, 0, len)?)?, owned(v.narrow(2, 0, len)?)?))
            }
            _ => None,
        };
        Ok(Self {
            storage,
            len,
            grow_step: grow_step.max(1),
        })
    }

    /// Bytes of storage held (keys and values, room to grow included).
    pub(crate) fn bytes(&self) -> usize {
        self.storage
            .as_ref()
            .map_or(0, |(k, _)| 2 * k.elem_count() * k.dtype().size_in_bytes())
    }
}

/// `t` in storage of its own (`contiguous` alone would share storage that is already laid out).
fn owned(t: Tensor) -> Result<Tensor> {
    Ok(if t.is_contiguous() {
        t.copy()?
    } else {
        t.contiguous()?
    })
}
