//! The key holder's side of a round trip: plaintext tokens in, plaintext logits out, with only
//! encrypted ids and activations reaching the encrypted model.

use veil_model::{forward_chain, LogitsAt, Result, ShardCache, ShardModel, TokenStep};

use crate::key::EeKey;
use crate::transform::{decrypt_logits, encrypt_tokens};

/// A generation session over encrypted shards, seen from the key holder.
pub struct EncryptedSession<'a> {
    key: &'a EeKey,
    shards: &'a [ShardModel],
    caches: Vec<ShardCache>,
}

impl<'a> EncryptedSession<'a> {
    /// A session over `shards` (which together cover the encrypted model) using `key`.
    pub fn new(key: &'a EeKey, shards: &'a [ShardModel]) -> Self {
        Self {
            key,
            shards,
            caches: shards.iter().map(ShardModel::new_cache).collect(),
        }
    }
}

impl TokenStep for EncryptedSession<'_> {
    fn step(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        let encrypted = encrypt_tokens(self.key, tokens);
        let logits = forward_chain(self.shards, &mut self.caches, &encrypted, LogitsAt::Last)?
            .squeeze(0)?
            .to_vec1::<f32>()?;
        Ok(decrypt_logits(self.key, &logits))
    }
}

/// Any session over an encrypted model (a remote chain, say), seen from the key holder: ids are
/// encrypted on the way in and logits decrypted on the way out.
pub struct EncryptedStep<'a, S> {
    key: &'a EeKey,
    inner: S,
}

impl<'a, S: TokenStep> EncryptedStep<'a, S> {
    /// Wraps `inner`, which runs the model encrypted with `key`.
    pub fn new(key: &'a EeKey, inner: S) -> Self {
        Self { key, inner }
    }
}

impl<S: TokenStep> TokenStep for EncryptedStep<'_, S> {
    fn step(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        let logits = self.inner.step(&encrypt_tokens(self.key, tokens))?;
        Ok(decrypt_logits(self.key, &logits))
    }
}
