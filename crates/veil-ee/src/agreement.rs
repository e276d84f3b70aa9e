//! How closely an encrypted model follows its plaintext original: the exactness figure.

use veil_model::prompts::SAMPLE_PROMPTS;
use veil_model::sampling::argmax;
use veil_model::{ChatMessage, LocalModel, Result, ShardModel, TokenStep};

use crate::key::EeKey;
use crate::session::EncryptedSession;

/// Twenty varied prompts (facts, code, lists, stories, arithmetic, other languages): the first
/// twenty of [`veil_model::prompts::SAMPLE_PROMPTS`].
pub const EVAL_PROMPTS: [&str; 20] = match SAMPLE_PROMPTS.first_chunk::<20>() {
    Some(first) => *first,
    None => panic!("SAMPLE_PROMPTS holds at least twenty prompts"),
};

/// Plaintext and encrypted greedy outputs compared over a set of prompts.
#[derive(Debug, Clone, PartialEq)]
pub struct Agreement {
    /// Prompts compared.
    pub prompts: usize,
    /// Prompts whose whole greedy output was identical.
    pub identical: usize,
    /// Share of generated tokens before the first divergence, over all prompts.
    pub token_agreement: f64,
    /// Largest `max |plain - decrypted| / max |plain|` over the logits of the first step.
    pub max_relative_logit_error: f64,
}

/// Generates `tokens` greedy tokens for each prompt with the plaintext model and with the
/// encrypted shards, and compares them.
pub fn agreement(
    plain: &LocalModel,
    key: &EeKey,
    encrypted: &[ShardModel],
    prompts: &[&str],
    tokens: usize,
) -> Result<Agreement> {
    let (mut identical, mut agreed, mut total, mut worst) = (0, 0, 0, 0f64);
    for prompt in prompts {
        let ids = plain.chat_prompt(&[ChatMessage::user(*prompt)])?;
        let mut a = plain.session();
        let mut b = EncryptedSession::new(key, encrypted);
        let (mut la, mut lb) = (a.step(&ids)?, b.step(&ids)?);
        let scale = la
            .iter()
            .fold(0f32, |m, x| m.max(x.abs()))
            .max(f32::MIN_POSITIVE);
        let err = la
            .iter()
            .zip(&lb)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        worst = worst.max(f64::from(err / scale));
        let mut same = 0;
        while same < tokens {
            let (ta, tb) = (argmax(&la), argmax(&lb));
            if ta != tb {
                break;
            }
            same += 1;
            if ta == plain.tokenizer.eos() || same == tokens {
                same = tokens; // both stopped together: the rest agrees trivially
                break;
            }
            la = a.step(&[ta])?;
            lb = b.step(&[tb])?;
        }
        identical += usize::from(same == tokens);
        agreed += same;
        total += tokens;
    }
    Ok(Agreement {
        prompts: prompts.len(),
        identical,
        token_agreement: agreed as f64 / total.max(1) as f64,
        max_relative_logit_error: worst,
    })
}
