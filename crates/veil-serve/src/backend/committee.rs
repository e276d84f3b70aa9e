//! A committee of whole-model nodes: one generates and signs its answer, the others recompute
//! it and vote; the text is handed over only once a majority accepts it. On an encrypted
//! model the committee generates and judges in the key's token order.

use std::sync::Arc;

use super::{
    keep_evidence, Answer, Backend, Failure, Request, Route, Seating, SwarmConnection, Verification,
};
use crate::key_rotation::KeyedModel;

/// A committee of `size` nodes per request.
pub struct Committee {
    connection: Arc<SwarmConnection>,
    size: usize,
    /// Who sits on the committees.
    seating: Seating,
    /// The key of the encrypted model the nodes serve (`None`: plaintext).
    key: Option<Arc<KeyedModel>>,
}

impl Committee {
    /// Committees of `size` (one generator, `size - 1` judges) over `connection`'s nodes.
    pub fn new(
        connection: Arc<SwarmConnection>,
        size: usize,
        key: Option<Arc<KeyedModel>>,
    ) -> Self {
        Self {
            connection,
            size,
            seating: Seating::default(),
            key,
        }
    }

    /// Seats committees by `seating` (a seed of the user's, a fixed request id).
    pub fn seated(mut self, seating: Seating) -> Self {
        self.seating = seating;
        self
    }
}

impl Backend for Committee {
    fn generate(
        &self,
        request: &Request<'_>,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Answer, Failure> {
        let swarm = &self.connection;
        let privacy = self.key.as_ref().map(|keyed| keyed.current());
        let order: Box<dyn veil_model::TokenOrder + Sync> = match &privacy {
            Some(privacy) => Box::new(veil_ee::EncryptedOrder::new(&privacy.key)),
            None => Box::new(veil_model::PlainOrder),
        };
        let (digest, admission) = swarm.target(privacy.as_deref());
        let recheck = |job: &veil_verify::Job| match &swarm.recheck {
            Some(local) => local.passes(job),
            None => Err("no recheck".into()),
        };
        let verified = veil_net::VerifiedRequest {
            model_digest: digest,
            prompt: request.prompt,
            order: order.as_ref(),
            params: request.params,
            context_length: swarm.text.config.context_length,
            size: self.size,
            seed: &self.seating.seed,
            request_id: self.seating.request_id(),
            gate: admission.as_deref(),
            cancelled: request.cancelled,
            recheck: swarm
                .recheck
                .as_ref()
                .map(|_| &recheck as &veil_net::Recheck),
        };
        let mut evidence = Vec::new();
        let outcome = veil_net::generate_verified(
            &swarm.client,
            &swarm.runtime,
            &swarm.text.tokenizer,
            &verified,
            swarm.state.as_ref(),
            &mut |record| {
                let against = record.job.body.generator.clone();
                keep_evidence(&swarm.evidence_dir, against, record, &mut evidence)
            },
        );
        let answer = outcome.map_err(Failure::of_verified)?;
        if let (Some(keyed), Some(privacy)) = (&self.key, &privacy) {
            let tokens = request.prompt.len() + answer.completion.tokens.len();
            keyed.spent(privacy, tokens as u64);
        }
        on_text(&answer.completion.text);
        Ok(Answer {
            completion: answer.completion.clone(),
            route: Route::Committee {
                size: self.size,
                generator: answer.generator.clone(),
            },
            verification: Some(Verification::Committee(Box::new(answer))),
            accel: "plain".into(),
            evidence,
        })
    }

    fn describe(&self) -> String {
        format!("committee of {}", self.size)
    }
}
