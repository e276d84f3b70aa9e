//! The key holder's side of a round trip: plaintext tokens in, plaintext logits out, with only
//! encrypted ids and activations reaching the encrypted model.

use veil_model::{LogitsAt, Result, ShardCache, ShardInput, ShardModel, TokenStep};

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
        let mut input = ShardInput::Tokens(&encrypted);
        let mut out = None;
        for (shard, cache) in self.shards.iter().zip(&mut self.caches) {
            let y = shard.forward(input, cache, LogitsAt::Last)?;
            input = ShardInput::Hidden(y.clone());
            out = Some(y);
        }
        let logits = out
            .ok_or_else(|| veil_model::ModelError::InvalidShard("no shards".into()))?
            .squeeze(0)?
            .to_vec1::<f32>()?;
        Ok(decrypt_logits(self.key, &logits))
    }
}
