//! A verified split chain: each hop signs digests of what it was sent and handed on, and
//! `judges` other nodes serving the same blocks replay it; the text is handed over once every
//! hop is accepted.

use std::sync::Arc;

use super::{
    keep_evidence, Answer, Backend, Failure, Request, Route, Seating, SwarmConnection, Verification,
};

/// Verified split chains with `judges` judges per hop.
pub struct VerifiedChain {
    connection: Arc<SwarmConnection>,
    judges: usize,
    /// Who sits on the committees.
    seating: Seating,
}

impl VerifiedChain {
    /// Chains over `connection`'s nodes, each hop replayed by `judges` others.
    pub fn new(connection: Arc<SwarmConnection>, judges: usize) -> Self {
        Self {
            connection,
            judges,
            seating: Seating::default(),
        }
    }

    /// Seats committees by `seating` (a seed of the user's, a fixed request id).
    pub fn seated(mut self, seating: Seating) -> Self {
        self.seating = seating;
        self
    }
}

impl Backend for VerifiedChain {
    fn generate(
        &self,
        request: &Request<'_>,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Answer, Failure> {
        let swarm = &self.connection;
        let config = &swarm.text.config;
        let verified = veil_net::VerifiedChainRequest {
            model_digest: &swarm.digest,
            block_count: config.block_count,
            prompt: request.prompt,
            params: request.params,
            context_length: config.context_length,
            judges: self.judges,
            seed: &self.seating.seed,
            request_id: self.seating.request_id(),
            gate: swarm.admission.clone(),
            cancelled: request.cancelled,
        };
        let mut evidence = Vec::new();
        let outcome = veil_net::generate_verified_chain(
            &swarm.client,
            &swarm.runtime,
            &swarm.text.tokenizer,
            &verified,
            swarm.state.as_ref(),
            &mut |record| {
                let hop = &record.job.body;
                let against = format!(
                    "hop {} (blocks {}-{})",
                    hop.node, hop.first_block, hop.end_block
                );
                keep_evidence(&swarm.evidence_dir, against, record, &mut evidence)
            },
        );
        let answer = outcome.map_err(Failure::of_verified)?;
        on_text(&answer.completion.text);
        Ok(Answer {
            completion: answer.completion.clone(),
            route: Route::VerifiedChain {
                hops: answer.hops.len(),
            },
            verification: Some(Verification::Chain(Box::new(answer))),
            accel: "plain".into(),
            evidence,
        })
    }

    fn describe(&self) -> String {
        "verified chain".into()
    }
}
