//! An encrypted model run in this process: the key and the tokenizer stay on this side, the
//! shards see only permuted ids and rotated activations. The key may rotate between requests
//! (see [`crate::key_rotation`]); a request keeps the key it started with to its end.

use std::sync::Arc;

use veil_model::LocalModel;

use super::{Answer, Backend, Cancellable, Failure, Request, Route};
use crate::key_rotation::KeyedModel;

/// An encrypted model in this process.
pub struct EncryptedLocal {
    /// The plaintext model's tokenizer and configuration (its weights are not loaded).
    text: Arc<LocalModel>,
    keyed: Arc<KeyedModel>,
}

impl EncryptedLocal {
    /// Runs `keyed`'s shards, tokenizing with `text`.
    pub fn new(text: Arc<LocalModel>, keyed: Arc<KeyedModel>) -> Self {
        Self { text, keyed }
    }
}

impl Backend for EncryptedLocal {
    fn generate(
        &self,
        request: &Request<'_>,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Answer, Failure> {
        let privacy = self.keyed.current();
        let mut session = Cancellable {
            inner: veil_ee::EncryptedSession::new(&privacy.key, &privacy.shards),
            cancelled: request.cancelled,
        };
        let completion = veil_model::generate(
            &mut session,
            &self.text.tokenizer,
            request.prompt,
            self.text.config.context_length,
            request.params,
            on_text,
        )?;
        self.keyed.spent(
            &privacy,
            (request.prompt.len() + completion.tokens.len()) as u64,
        );
        Ok(Answer {
            completion,
            route: Route::Local {
                blocks: self.text.config.block_count,
            },
            verification: None,
            accel: "plain".into(),
            evidence: Vec::new(),
        })
    }

    fn describe(&self) -> String {
        Route::Local {
            blocks: self.text.config.block_count,
        }
        .to_string()
    }
}
