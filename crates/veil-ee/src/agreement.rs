//! How closely an encrypted model follows its plaintext original: the exactness figure.

use veil_model::sampling::argmax;
use veil_model::{ChatMessage, LocalModel, Result, ShardModel, TokenStep};

use crate::key::EeKey;
use crate::session::EncryptedSession;

/// Twenty varied prompts (facts, code, lists, stories, arithmetic, other languages).
pub const EVAL_PROMPTS: [&str; 20] = [
    "What is the capital of France?",
    "Write a haiku about autumn rain.",
    "Explain photosynthesis to a ten-year-old.",
    "List three prime numbers greater than 50.",
    "Write a Python function that reverses a string.",
    "What is 17 times 23?",
    "Give me a recipe for pancakes.",
    "Translate 'good morning' into Spanish and German.",
    "Why is the sky blue?",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "What are the benefits of regular exercise?",
    "Write a short story that begins with a knock at the door.",
    "How does a bicycle stay upright?",
    "Name five animals that live in the ocean.",
    "What is the difference between weather and climate?",
    "Write a SQL query that counts rows in a table named users.",
    "Describe the water cycle.",
    "Quelle est la plus grande ville du Canada ?",
    "Suggest a name for a friendly robot.",
    "What should I pack for a weekend hiking trip?",
];

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
