//! The secret of equivariant encryption: which basis the encrypted model works in.
//!
//! Each part of a key is a symmetry of a llama block (DESIGN.md, "Equivariant encryption"), so
//! the transformed model computes the same function in a basis only the key holder can read.
//! Keys are drawn from a CSPRNG, tied to one model by its digest, and stored encrypted with a
//! passphrase by `age`.

use nalgebra::DMatrix;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};
use veil_model::LlamaConfig;
use veil_model::SCALE_GROUP;

use crate::error::{EeError, Result};

/// The key file format this build writes and reads.
pub const KEY_VERSION: u32 = 1;

/// Bytes that start every decrypted key, so a file that decrypts to something else is caught.
const KEY_MAGIC: &[u8; 8] = b"VEILKEY\0";

/// Secret permutations and rotations for one block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerKey {
    /// FFN inner dimension: encrypted unit `i` is plaintext unit `ffn[i]`.
    pub ffn: Vec<u32>,
    /// KV heads (each with its query group): encrypted head `j` is plaintext head `kv_heads[j]`.
    pub kv_heads: Vec<u32>,
    /// Per encrypted KV head, an orthogonal `head_dim × head_dim` map on value vectors
    /// (row-major), undone in the output projection.
    pub value_maps: Vec<Vec<f32>>,
    /// Per encrypted KV head, one angle per RoPE pair, applied to both queries and keys.
    pub rope_angles: Vec<Vec<f32>>,
}

/// Which transforms a key holds, and so in which formats its encrypted model is exact.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyKind {
    /// Every symmetry of the llama block: whole permutations of the residual stream, FFN units
    /// and KV heads, orthogonal maps on values, rotations of RoPE pairs. Exact in real
    /// arithmetic only, so the encrypted model is written in F32.
    Full,
    /// Only moves that commute with block quantization: the vocabulary permutation, and
    /// permutations of the residual stream, the FFN units and each head's value coordinates
    /// that keep every coordinate inside its aligned group of [`SCALE_GROUP`]. The encrypted
    /// model keeps the plaintext file's formats and, on Veil's kernels, its bits.
    GroupLocal,
}

impl KeyKind {
    /// The name `veil ee keygen --transform` takes.
    pub fn name(self) -> &'static str {
        match self {
            KeyKind::Full => "full",
            KeyKind::GroupLocal => "group-local",
        }
    }
}

impl std::fmt::Display for KeyKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for KeyKind {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "full" => Ok(KeyKind::Full),
            "group-local" => Ok(KeyKind::GroupLocal),
            other => Err(format!(
                "unknown transform {other:?}: use `full` (F32 models) or `group-local` (quantized models)"
            )),
        }
    }
}

impl LayerKey {
    /// The value map of KV head `head` as a permutation (encrypted coordinate `r` is plaintext
    /// coordinate `p[r]`), when it is one: the group-local transform moves codes with it.
    pub fn value_permutation(&self, head: usize) -> Option<Vec<u32>> {
        let map = self.value_maps.get(head)?;
        let d = (map.len() as f64).sqrt() as usize;
        if d * d != map.len() {
            return None;
        }
        let mut p = Vec::with_capacity(d);
        for row in map.chunks_exact(d) {
            let ones: Vec<usize> = (0..d).filter(|&c| row[c] == 1.0).collect();
            let zeros = row.iter().filter(|&&x| x == 0.0).count();
            match ones[..] {
                [c] if zeros == d - 1 => p.push(c as u32),
                _ => return None,
            }
        }
        let mut seen = vec![false; d];
        for &c in &p {
            if std::mem::replace(&mut seen[c as usize], true) {
                return None;
            }
        }
        Some(p)
    }
}

/// A complete equivariant-encryption key for one model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EeKey {
    /// Format version ([`KEY_VERSION`]).
    pub version: u32,
    /// blake3 digest (hex) of the plaintext GGUF this key belongs to.
    pub model_digest: String,
    /// Vocabulary: plaintext token `t` is encrypted as `vocab[t]`.
    pub vocab: Vec<u32>,
    /// Residual stream: encrypted coordinate `i` is plaintext coordinate `hidden[i]`.
    pub hidden: Vec<u32>,
    /// One entry per block.
    pub layers: Vec<LayerKey>,
}

impl EeKey {
    /// Draws a fresh key for a model from the operating system's entropy.
    pub fn generate(config: &LlamaConfig, model_digest: &str) -> Self {
        Self::generate_with(config, model_digest, &mut ChaCha20Rng::from_os_rng())
    }

    /// Draws a key from `rng` (seeded in tests; the OS in [`generate`](Self::generate)).
    pub fn generate_with(config: &LlamaConfig, model_digest: &str, rng: &mut impl Rng) -> Self {
        let d = config.head_dim;
        let layers = (0..config.block_count)
            .map(|_| LayerKey {
                ffn: permutation(config.ffn_size, rng),
                kv_heads: permutation(config.kv_head_count, rng),
                value_maps: (0..config.kv_head_count)
                    .map(|_| orthogonal(d, rng))
                    .collect(),
                rope_angles: (0..config.kv_head_count)
                    .map(|_| {
                        (0..d / 2)
                            .map(|_| rng.random_range(0.0..std::f32::consts::TAU))
                            .collect()
                    })
                    .collect(),
            })
            .collect();
        Self {
            version: KEY_VERSION,
            model_digest: model_digest.to_string(),
            vocab: permutation(config.vocab_size, rng),
            hidden: permutation(config.hidden_size, rng),
            layers,
        }
    }

    /// Draws a fresh key of `kind` from the operating system's entropy.
    pub fn generate_of_kind(config: &LlamaConfig, model_digest: &str, kind: KeyKind) -> Self {
        match kind {
            KeyKind::Full => Self::generate(config, model_digest),
            KeyKind::GroupLocal => Self::generate_group_local(config, model_digest),
        }
    }

    /// Draws a [`KeyKind::GroupLocal`] key from the operating system's entropy.
    pub fn generate_group_local(config: &LlamaConfig, model_digest: &str) -> Self {
        Self::generate_group_local_with(config, model_digest, &mut ChaCha20Rng::from_os_rng())
    }

    /// Draws a [`KeyKind::GroupLocal`] key from `rng`: a fresh permutation inside every group
    /// of [`SCALE_GROUP`] of the residual stream, of each block's FFN units and of each KV
    /// head's value coordinates; the vocabulary permuted whole. Heads keep their places and
    /// their RoPE pairs their angles: moving a head moves 64 columns of the output projection
    /// across quantization blocks, and rotating a pair mixes values.
    pub fn generate_group_local_with(
        config: &LlamaConfig,
        model_digest: &str,
        rng: &mut impl Rng,
    ) -> Self {
        let mut key = Self::identity(config, model_digest);
        key.vocab = permutation(config.vocab_size, rng);
        key.hidden = group_local_permutation(config.hidden_size, rng);
        let d = config.head_dim;
        for layer in &mut key.layers {
            layer.ffn = group_local_permutation(config.ffn_size, rng);
            for map in &mut layer.value_maps {
                let p = group_local_permutation(d, rng);
                *map = vec![0.0; d * d];
                for (r, &c) in p.iter().enumerate() {
                    map[r * d + c as usize] = 1.0;
                }
            }
        }
        key
    }

    /// Which transforms this key holds, read from the key itself: a key whose only moves stay
    /// inside groups of [`SCALE_GROUP`] is [`KeyKind::GroupLocal`].
    pub fn kind(&self) -> KeyKind {
        let local = is_group_local;
        let group_local = local(&self.hidden)
            && self.layers.iter().all(|layer| {
                local(&layer.ffn)
                    && layer
                        .kv_heads
                        .iter()
                        .enumerate()
                        .all(|(i, &h)| h as usize == i)
                    && layer.rope_angles.iter().flatten().all(|&a| a == 0.0)
                    && (0..layer.value_maps.len())
                        .all(|h| layer.value_permutation(h).is_some_and(|p| local(&p)))
            });
        if group_local {
            KeyKind::GroupLocal
        } else {
            KeyKind::Full
        }
    }

    /// The key that changes nothing. Tests build single-transform keys from it to show that each
    /// transform is applied and needed.
    pub fn identity(config: &LlamaConfig, model_digest: &str) -> Self {
        let id = |n: usize| (0..n as u32).collect::<Vec<_>>();
        let d = config.head_dim;
        let eye: Vec<f32> = (0..d * d)
            .map(|i| if i / d == i % d { 1.0 } else { 0.0 })
            .collect();
        Self {
            version: KEY_VERSION,
            model_digest: model_digest.to_string(),
            vocab: id(config.vocab_size),
            hidden: id(config.hidden_size),
            layers: (0..config.block_count)
                .map(|_| LayerKey {
                    ffn: id(config.ffn_size),
                    kv_heads: id(config.kv_head_count),
                    value_maps: vec![eye.clone(); config.kv_head_count],
                    rope_angles: vec![vec![0.0; d / 2]; config.kv_head_count],
                })
                .collect(),
        }
    }

    /// Checks that every part has the model's sizes and every permutation is one.
    pub fn check(&self, config: &LlamaConfig) -> Result<()> {
        let bad = |what: String| Err(EeError::KeyMismatch(what));
        refuse_inexact(config, self.kind())?;
        if self.version != KEY_VERSION {
            return Err(EeError::KeyVersion(self.version));
        }
        check_permutation("vocabulary", &self.vocab, config.vocab_size)?;
        check_permutation("residual stream", &self.hidden, config.hidden_size)?;
        if self.layers.len() != config.block_count {
            return bad(format!(
                "key has {} blocks, model has {}",
                self.layers.len(),
                config.block_count
            ));
        }
        let d = config.head_dim;
        for (i, layer) in self.layers.iter().enumerate() {
            check_permutation(&format!("block {i} FFN"), &layer.ffn, config.ffn_size)?;
            check_permutation(
                &format!("block {i} KV heads"),
                &layer.kv_heads,
                config.kv_head_count,
            )?;
            let maps_ok = layer.value_maps.len() == config.kv_head_count
                && layer
                    .value_maps
                    .iter()
                    .all(|m| m.len() == d * d && m.iter().all(|x| x.is_finite()));
            let angles_ok = layer.rope_angles.len() == config.kv_head_count
                && layer
                    .rope_angles
                    .iter()
                    .all(|a| a.len() == d / 2 && a.iter().all(|x| x.is_finite()));
            if !maps_ok || !angles_ok {
                return bad(format!(
                    "block {i}: value maps or RoPE angles do not match head size {d}"
                ));
            }
        }
        Ok(())
    }

    /// A digest of the whole key, stored in the encrypted model so a wrong key is caught
    /// before it produces nonsense. It is a hash of 256 bits of secret randomness and more, so it
    /// reveals nothing usable about the key.
    pub fn fingerprint(&self) -> String {
        let bytes = postcard::to_stdvec(self).unwrap_or_default();
        blake3::hash(&bytes).to_hex().to_string()
    }

    /// Encrypts the key with a passphrase (age, scrypt) for storage.
    pub fn seal(&self, passphrase: &str) -> Result<Vec<u8>> {
        self.seal_with_work_factor(passphrase, None)
    }

    /// [`seal`](Self::seal) with an explicit scrypt work factor (log2), for fast tests.
    pub fn seal_with_work_factor(
        &self,
        passphrase: &str,
        work_factor: Option<u8>,
    ) -> Result<Vec<u8>> {
        let mut plain = KEY_MAGIC.to_vec();
        plain.extend_from_slice(&KEY_VERSION.to_le_bytes());
        plain.extend(postcard::to_stdvec(self).map_err(|e| EeError::CorruptKey(e.to_string()))?);
        let mut recipient = age::scrypt::Recipient::new(passphrase.to_string().into());
        if let Some(n) = work_factor {
            recipient.set_work_factor(n);
        }
        age::encrypt(&recipient, &plain).map_err(|e| EeError::CorruptKey(e.to_string()))
    }

    /// Decrypts and decodes a sealed key.
    pub fn open(sealed: &[u8], passphrase: &str) -> Result<Self> {
        let identity = age::scrypt::Identity::new(passphrase.to_string().into());
        let plain = age::decrypt(&identity, sealed).map_err(|e| match e {
            age::DecryptError::DecryptionFailed | age::DecryptError::NoMatchingKeys => {
                EeError::WrongPassphrase
            }
            other => EeError::CorruptKey(other.to_string()),
        })?;
        let body = plain
            .strip_prefix(KEY_MAGIC.as_slice())
            .ok_or_else(|| EeError::CorruptKey("not a Veil key".into()))?;
        let (version, body) = body
            .split_first_chunk::<4>()
            .ok_or_else(|| EeError::CorruptKey("key is cut short".into()))?;
        let version = u32::from_le_bytes(*version);
        if version != KEY_VERSION {
            return Err(EeError::KeyVersion(version));
        }
        postcard::from_bytes(body).map_err(|e| EeError::CorruptKey(e.to_string()))
    }
}

/// The inverse of a permutation: `inverse(p)[p[i]] == i`.
pub fn inverse(p: &[u32]) -> Vec<u32> {
    let mut inv = vec![0u32; p.len()];
    for (i, &x) in p.iter().enumerate() {
        inv[x as usize] = i as u32;
    }
    inv
}

fn permutation(n: usize, rng: &mut impl Rng) -> Vec<u32> {
    let mut p: Vec<u32> = (0..n as u32).collect();
    p.shuffle(rng);
    p
}

/// A uniformly random orthogonal matrix: the Q of a Gaussian matrix's QR decomposition, with
/// signs fixed so the distribution is Haar.
pub(crate) fn orthogonal(n: usize, rng: &mut impl Rng) -> Vec<f32> {
    let gaussian = DMatrix::<f64>::from_fn(n, n, |_, _| StandardNormal.sample(rng));
    let qr = gaussian.qr();
    let (mut q, r) = (qr.q(), qr.r());
    for j in 0..n {
        if r[(j, j)] < 0.0 {
            q.column_mut(j).neg_mut();
        }
    }
    (0..n)
        .flat_map(|i| (0..n).map(move |j| (i, j)))
        .map(|(i, j)| q[(i, j)] as f32)
        .collect()
}

/// A permutation of `n` coordinates that moves each only inside its aligned group of
/// [`SCALE_GROUP`] (the last group may be shorter).
fn group_local_permutation(n: usize, rng: &mut impl Rng) -> Vec<u32> {
    let mut p: Vec<u32> = (0..n as u32).collect();
    for group in p.chunks_mut(SCALE_GROUP) {
        group.shuffle(rng);
    }
    p
}

/// Whether `p` keeps every coordinate inside its group of [`SCALE_GROUP`].
pub(crate) fn is_group_local(p: &[u32]) -> bool {
    p.iter()
        .enumerate()
        .all(|(i, &j)| j as usize / SCALE_GROUP == i / SCALE_GROUP)
}

fn check_permutation(what: &str, p: &[u32], n: usize) -> Result<()> {
    let mut seen = vec![false; n];
    if p.len() != n {
        return Err(EeError::KeyMismatch(format!(
            "{what} permutation has {} entries, model has {n}",
            p.len()
        )));
    }
    for &x in p {
        match seen.get_mut(x as usize) {
            Some(s) if !*s => *s = true,
            _ => {
                return Err(EeError::KeyMismatch(format!(
                    "{what} permutation is not a permutation"
                )))
            }
        }
    }
    Ok(())
}

/// Refuses architectures whose blocks a key of `kind` would not leave computing the same
/// function, naming the symmetry that fails.
///
/// The group-local transform only permutes coordinates of the residual stream, the FFN and
/// each head's values, and leaves queries and keys alone, so every architecture Veil runs
/// keeps it: norms are computed in an order-free way, QK-norm and RoPE see unmoved queries and
/// keys, and Qwen 2's value bias moves with the values.
pub fn refuse_inexact(config: &LlamaConfig, kind: KeyKind) -> Result<()> {
    use veil_model::Architecture;
    if kind == KeyKind::GroupLocal {
        return Ok(());
    }
    let reason = match config.architecture {
        Architecture::Llama => return Ok(()),
        Architecture::Qwen2 => {
            "its query/key/value biases would have to move with the head permutations, value \
             maps and RoPE-pair rotations (not implemented), and its RoPE pairs are split halves, \
             not the interleaved pairs the key rotates"
        }
        Architecture::Qwen3 => {
            "its per-head RMSNorm on queries and keys scales each coordinate by its own weight, \
             which does not commute with the secret rotation of each RoPE pair"
        }
        Architecture::Gemma3 => {
            "its per-head QK-norm does not commute with the RoPE-pair rotations, and its \
             post-attention and post-FFN norms pin the residual basis (only a permutation of \
             the residual stream would survive them)"
        }
    };
    Err(EeError::UnsupportedArchitecture {
        arch: config.architecture,
        reason,
    })
}
